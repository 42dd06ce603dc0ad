//! The config file as written: serde structs, `deny_unknown_fields` everywhere. Validation and
//! compilation happen in `compile.rs`.

use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentFile {
    pub(crate) agent: AgentDef,
    #[serde(default)]
    pub(crate) actions: Vec<ActionDef>,
    #[serde(default)]
    pub(crate) webhooks: Vec<WebhookDef>,
    #[serde(default)]
    pub(crate) automations: Vec<AutomationDef>,
    #[serde(default)]
    pub(crate) egress: EgressDef,
    #[serde(default)]
    pub(crate) inbound: InboundDef,
    #[serde(default)]
    pub(crate) origins: Vec<OriginDef>,
}

/// `[[origins]]`: what applies to every action sent to one origin.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OriginDef {
    pub(crate) url: String,
    #[serde(default)]
    pub(crate) max_in_flight: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentDef {
    pub(crate) id: String,
    pub(crate) tenant: String,
    #[serde(default)]
    pub(crate) name: Option<String>,
    #[serde(default)]
    pub(crate) phone_number: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ActionDef {
    pub(crate) name: String,
    pub(crate) description: String,
    #[serde(default = "default_method")]
    pub(crate) method: String,
    pub(crate) url: String,
    #[serde(default)]
    pub(crate) headers: Pairs<String>,
    #[serde(default)]
    pub(crate) body: Option<Value>,
    #[serde(default)]
    pub(crate) parameters: Option<Value>,
    #[serde(default)]
    pub(crate) timeout_ms: Option<i64>,
    #[serde(default)]
    pub(crate) filler: Option<FillerDef>,
    #[serde(default)]
    pub(crate) cache: Option<CacheDef>,
    #[serde(default)]
    pub(crate) prefetch: Option<String>,
    #[serde(default)]
    pub(crate) extract: Pairs<ExtractDef>,
    #[serde(default)]
    pub(crate) on_failure: Option<OnFailureDef>,
    #[serde(default)]
    pub(crate) idempotent: Option<bool>,
    #[serde(default, rename = "async")]
    pub(crate) is_async: bool,
    #[serde(default)]
    pub(crate) dedupe: Option<bool>,
    #[serde(default)]
    pub(crate) on_interrupt: Option<String>,
    #[serde(default)]
    pub(crate) hold: Option<String>,
    #[serde(default)]
    pub(crate) max_in_flight: Option<i64>,
    #[serde(default)]
    pub(crate) hedge_after_ms: Option<Value>,
    #[serde(default)]
    pub(crate) invalidates: Vec<String>,
    #[serde(default)]
    pub(crate) max_response_bytes: Option<i64>,
}

fn default_method() -> String {
    "GET".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FillerDef {
    pub(crate) after_ms: i64,
    pub(crate) say: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CacheDef {
    pub(crate) ttl_s: i64,
    #[serde(default)]
    pub(crate) scope: Option<String>,
    #[serde(default)]
    pub(crate) stale_s: Option<i64>,
    #[serde(default)]
    pub(crate) key_headers: Vec<String>,
    #[serde(default)]
    pub(crate) negative_ttl_s: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OnFailureDef {
    #[serde(default)]
    pub(crate) say: Option<String>,
    #[serde(default)]
    pub(crate) set: Pairs<Value>,
}

#[derive(Debug)]
pub(crate) enum ExtractDef {
    Short(String),
    Long(ExtractLong),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExtractLong {
    pub(crate) path: String,
    #[serde(default)]
    pub(crate) required: bool,
    #[serde(default)]
    pub(crate) default: Option<Value>,
    #[serde(default, rename = "as")]
    pub(crate) conversion: Option<String>,
    #[serde(default)]
    pub(crate) all: bool,
}

impl<'de> Deserialize<'de> for ExtractDef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ExtractDef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSONPath string or a table { path, required, default, as, all }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ExtractDef, E> {
                Ok(ExtractDef::Short(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ExtractDef, A::Error> {
                ExtractLong::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(ExtractDef::Long)
            }
        }
        d.deserialize_any(V)
    }
}

/// A map that keeps its order and refuses duplicate keys (JSON allows them silently).
#[derive(Debug)]
pub(crate) struct Pairs<T>(pub(crate) Vec<(String, T)>);

impl<T> Default for Pairs<T> {
    fn default() -> Self {
        Pairs(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Pairs<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Pairs<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pairs<T>, A::Error> {
                let mut out: Vec<(String, T)> = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    if out.iter().any(|(existing, _)| *existing == k) {
                        return Err(de::Error::custom(format!("duplicate key \"{k}\"")));
                    }
                    let v = map.next_value::<T>()?;
                    out.push((k, v));
                }
                Ok(Pairs(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebhookDef {
    #[serde(default)]
    pub(crate) label: Option<String>,
    pub(crate) url: String,
    pub(crate) subscriptions: Vec<String>,
    #[serde(default)]
    pub(crate) headers: Pairs<String>,
    #[serde(default)]
    pub(crate) signing_secret: Option<String>,
    #[serde(default)]
    pub(crate) signing_key: Option<String>,
    #[serde(default)]
    pub(crate) max_per_second: Option<f64>,
    #[serde(default = "yes")]
    pub(crate) enabled: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AutomationDef {
    pub(crate) id: String,
    #[serde(default = "yes")]
    pub(crate) enabled: bool,
    pub(crate) trigger: TriggerDef,
    #[serde(default)]
    pub(crate) auth: Option<AuthDef>,
    pub(crate) steps: Vec<StepDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TriggerDef {
    pub(crate) on: String,
    #[serde(default)]
    pub(crate) agents: Option<AgentsDef>,
}

#[derive(Debug)]
pub(crate) enum AgentsDef {
    All,
    List(Vec<String>),
}

impl<'de> Deserialize<'de> for AgentsDef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AgentsDef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"all\" or a list of agent ids")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AgentsDef, E> {
                if v == "all" {
                    Ok(AgentsDef::All)
                } else {
                    Err(E::custom(format!(
                        "agents = \"{v}\": expected \"all\" or a list of agent ids"
                    )))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AgentsDef, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(AgentsDef::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthDef {
    #[serde(default)]
    pub(crate) bearer: Option<String>,
    #[serde(default)]
    pub(crate) signing_secret: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(crate) enum StepDef {
    SendWebhook(SendWebhookDef),
    RunAction(RunActionDef),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendWebhookDef {
    pub(crate) url: String,
    #[serde(default)]
    pub(crate) headers: Pairs<String>,
    #[serde(default)]
    pub(crate) body: Option<Value>,
    #[serde(default)]
    pub(crate) signing_secret: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunActionDef {
    pub(crate) action: String,
    #[serde(default)]
    pub(crate) args: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EgressDef {
    #[serde(default)]
    pub(crate) allow_http: bool,
    #[serde(default)]
    pub(crate) allow_networks: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InboundDef {
    #[serde(default)]
    pub(crate) auth: Option<AuthDef>,
    #[serde(default)]
    pub(crate) max_body_bytes: Option<i64>,
    #[serde(default)]
    pub(crate) rate_limit: Option<RateLimitDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateLimitDef {
    pub(crate) per_second: f64,
    pub(crate) burst: i64,
}
