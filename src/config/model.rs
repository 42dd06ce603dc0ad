//! The compiled agent: what the runtime executes. Built once at load by `compile.rs`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::tools::ArgSchema;
use super::EventType;
use crate::jsonpath::Extractor;
use crate::state::StatePath;
use crate::template::{BodyTemplate, Template, UrlTemplate};

/// Default action timeout when `timeout_ms` is not given: 1000 ms.
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
/// Largest allowed `timeout_ms`: 30 000 ms.
pub const MAX_TIMEOUT_MS: u64 = 30_000;
/// Default cap on a response body: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 1024 * 1024;
/// Largest allowed `max_response_bytes`: 64 MiB.
pub const MAX_RESPONSE_BYTES_LIMIT: u64 = 64 * 1024 * 1024;

/// The agent a config file describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// The agent's id.
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// A display name (defaults to the id).
    pub name: Option<String>,
    /// The agent's phone number, if it has one.
    pub phone_number: Option<String>,
}

/// An HTTP method an action may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// GET.
    Get,
    /// HEAD.
    Head,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}

impl Method {
    /// The method's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => return None,
        })
    }

    /// GET and HEAD: safe to repeat and to cache.
    pub fn is_safe(self) -> bool {
        matches!(self, Method::Get | Method::Head)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The line to say when an action is still running after a while.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filler {
    /// How long after the action starts.
    pub after: Duration,
    /// What to say.
    pub say: String,
}

/// Who may see a cached response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheScope {
    /// Only the same call (the default).
    Call,
    /// Every call of the same agent.
    Agent,
    /// Every agent of the same tenant.
    Tenant,
    /// The same as `Tenant` (an alias kept for configs that say "global"): a cache entry is
    /// never shared across tenants.
    Global,
}

impl CacheScope {
    pub(crate) fn parse(s: &str) -> Option<CacheScope> {
        Some(match s {
            "call" => CacheScope::Call,
            "agent" => CacheScope::Agent,
            "tenant" => CacheScope::Tenant,
            "global" => CacheScope::Global,
            _ => return None,
        })
    }

    /// The name as written in config.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheScope::Call => "call",
            CacheScope::Agent => "agent",
            CacheScope::Tenant => "tenant",
            CacheScope::Global => "global",
        }
    }
}

/// An action's cache policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePolicy {
    /// How long an entry is fresh.
    pub ttl: Duration,
    /// Who may see it. Default `call`.
    pub scope: CacheScope,
    /// How long after expiry a stale entry may still be served while it is refreshed. Default 0.
    pub stale: Duration,
    /// Header names (lowercase) whose rendered values are part of the key.
    pub key_headers: Vec<String>,
    /// How long a 404 is remembered, if at all. Default: not cached.
    pub negative_ttl: Option<Duration>,
}

/// When an action runs without being asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// When the call connects, before the first turn.
    CallStart,
}

/// What a barge-in (or a cancelled tool call) does to an action already running
/// (`on_interrupt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnInterrupt {
    /// Drop the request and its connection at once; the tool call ends `cancelled`. The
    /// default for GET/HEAD and idempotent actions.
    Cancel,
    /// A request already handed to the transport completes detached within the action's own
    /// timeout; its values are applied to state and its outcome answers the model's re-issued
    /// identical call. The default for other actions.
    Finish,
}

/// When a read sends a second, identical request if the first has not answered
/// (`hedge_after_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Hedge {
    /// After this long.
    After(Duration),
    /// After the host's running p95 (bounded: 5 ms to half the action's timeout; no hedge
    /// before 20 requests to the host have been seen).
    Auto,
}

/// When an action's request may be sent (`hold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Hold {
    /// At once. The default.
    No,
    /// Only when the embedder ends the turn (`CallSession::end_turn`); a barge-in before that
    /// discards it and nothing is sent. Never for reads.
    EndOfTurn,
}

/// What happens when an action does not succeed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fallback {
    /// The line for the agent to say.
    pub say: Option<String>,
    /// Variables to set.
    pub set: Vec<(StatePath, Value)>,
}

/// One compiled action: everything needed to render, send and read it.
#[derive(Debug)]
pub struct ActionSpec {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) method: Method,
    pub(crate) url: UrlTemplate,
    pub(crate) headers: Vec<(String, Template)>,
    pub(crate) body: Option<BodyTemplate>,
    pub(crate) parameters: Option<ArgSchema>,
    pub(crate) timeout: Duration,
    pub(crate) filler: Option<Filler>,
    pub(crate) cache: Option<CachePolicy>,
    pub(crate) prefetch: Option<Prefetch>,
    pub(crate) extract: Arc<Extractor>,
    /// Identifies what the action extracts, so cache entries are shared only by actions that
    /// would extract the same values (name and rules).
    pub(crate) fingerprint: u64,
    /// The cache entries a success drops: (fingerprint, scope) of each `invalidates` target
    /// that is cacheable.
    pub(crate) invalidates_resolved: Vec<(u64, CacheScope)>,
    pub(crate) on_failure: Fallback,
    pub(crate) idempotent: bool,
    pub(crate) is_async: bool,
    pub(crate) dedupe: bool,
    pub(crate) on_interrupt: OnInterrupt,
    pub(crate) hold: Hold,
    pub(crate) max_in_flight: Option<u32>,
    pub(crate) hedge: Option<Hedge>,
    pub(crate) invalidates: Vec<String>,
    pub(crate) max_response_bytes: u64,
}

impl ActionSpec {
    /// The tool name the model calls.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// What the tool does, for the model.
    pub fn description(&self) -> &str {
        &self.description
    }
    /// The HTTP method.
    pub fn method(&self) -> Method {
        self.method
    }
    /// The URL template.
    pub fn url(&self) -> &UrlTemplate {
        &self.url
    }
    /// Header names (lowercase) and value templates.
    pub fn headers(&self) -> &[(String, Template)] {
        &self.headers
    }
    /// The JSON body template, if any.
    pub fn body(&self) -> Option<&BodyTemplate> {
        self.body.as_ref()
    }
    /// The argument schema, if the action takes arguments.
    pub fn parameters(&self) -> Option<&ArgSchema> {
        self.parameters.as_ref()
    }
    /// The action's own time limit (`timeout_ms`, default [`DEFAULT_TIMEOUT_MS`]).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// The filler line, if any.
    pub fn filler(&self) -> Option<&Filler> {
        self.filler.as_ref()
    }
    /// The cache policy, if the action is cacheable.
    pub fn cache(&self) -> Option<&CachePolicy> {
        self.cache.as_ref()
    }
    /// When the action is prefetched, if ever.
    pub fn prefetch(&self) -> Option<Prefetch> {
        self.prefetch
    }
    /// The extraction rules.
    pub fn extractor(&self) -> &Extractor {
        &self.extract
    }
    pub(crate) fn extractor_arc(&self) -> Arc<Extractor> {
        self.extract.clone()
    }
    /// The fallback.
    pub fn on_failure(&self) -> &Fallback {
        &self.on_failure
    }
    /// Safe to send twice: GET/HEAD, or `idempotent = true`.
    pub fn is_idempotent(&self) -> bool {
        self.idempotent || self.method.is_safe()
    }
    /// Runs in the background (`async = true`); never writes state.
    pub fn is_async(&self) -> bool {
        self.is_async
    }
    /// Re-issued identical tool calls return the earlier outcome (default true).
    pub fn dedupe(&self) -> bool {
        self.dedupe
    }

    /// What a barge-in does to this action while it runs.
    pub fn on_interrupt(&self) -> OnInterrupt {
        self.on_interrupt
    }

    /// When its request may be sent.
    pub fn hold(&self) -> Hold {
        self.hold
    }

    /// When a second identical request is sent if the first has not answered, if ever.
    pub fn hedge(&self) -> Option<Hedge> {
        self.hedge
    }

    /// The most requests in flight to this action's origin at once (`max_in_flight`), if
    /// capped. Unlimited unless set.
    pub fn max_in_flight(&self) -> Option<u32> {
        self.max_in_flight
    }
    /// Actions whose cache entries this one drops after it succeeds.
    pub fn invalidates(&self) -> &[String] {
        &self.invalidates
    }
    /// Cap on the response body in bytes (default [`DEFAULT_MAX_RESPONSE_BYTES`]).
    pub fn max_response_bytes(&self) -> u64 {
        self.max_response_bytes
    }
}

/// An outbound webhook subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSpec {
    /// A label for people.
    pub label: Option<String>,
    /// Where events are POSTed.
    pub url: UrlTemplate,
    /// The event types it receives.
    pub subscriptions: Vec<EventType>,
    /// Extra headers.
    pub headers: Vec<(String, Template)>,
    /// The `whsec_` signing secret, usually `{{secrets.NAME}}`.
    pub signing_secret: Option<Template>,
    /// An ed25519 key (`whsk_`, from `{{secrets.NAME}}` only): every delivery also carries a
    /// Standard Webhooks `v1a` signature that receivers check with the public key
    /// (`midcall webhooks public-key`). Default none.
    pub signing_key: Option<Template>,
    /// The most deliveries per second this endpoint is sent, per process (a receiver coming
    /// back from an outage is not flattened by the backlog). Default unlimited.
    pub max_per_second: Option<f64>,
    /// Disabled webhooks receive nothing (default true).
    pub enabled: bool,
}

/// Which agents a call_completed automation listens to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentScope {
    /// Every agent.
    All,
    /// These agent ids.
    Only(Vec<String>),
}

/// What starts an automation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Trigger {
    /// A call of a matching agent completed.
    CallCompleted {
        /// Which agents.
        agents: AgentScope,
    },
    /// An authenticated POST to the inbound webhook endpoint.
    Webhook,
}

impl AgentScope {
    /// Whether an agent is in scope.
    pub fn includes(&self, agent_id: &str) -> bool {
        match self {
            AgentScope::All => true,
            AgentScope::Only(ids) => ids.iter().any(|i| i == agent_id),
        }
    }
}

impl Trigger {
    /// The name as written in config.
    pub fn name(&self) -> &'static str {
        match self {
            Trigger::CallCompleted { .. } => "call_completed",
            Trigger::Webhook => "webhook",
        }
    }
}

/// Credentials an inbound webhook must present.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundAuth {
    /// `Authorization: Bearer <key>`.
    pub bearer: Option<Template>,
    /// A Standard Webhooks signing secret.
    pub signing_secret: Option<Template>,
}

/// One step of an automation.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// POST a JSON body through the event outbox.
    SendWebhook {
        /// Where.
        url: UrlTemplate,
        /// Extra headers.
        headers: Vec<(String, Template)>,
        /// The body.
        body: Option<BodyTemplate>,
        /// The signing secret.
        signing_secret: Option<Template>,
    },
    /// Run one of the agent's actions.
    RunAction {
        /// The action's name.
        action: String,
        /// Its arguments.
        args: Option<BodyTemplate>,
    },
}

/// An automation.
#[derive(Debug, Clone, PartialEq)]
pub struct AutomationSpec {
    /// Its id (the inbound URL uses it).
    pub id: String,
    /// Disabled automations never run (default true).
    pub enabled: bool,
    /// What starts it.
    pub trigger: Trigger,
    /// Inbound credentials (webhook triggers).
    pub auth: Option<InboundAuth>,
    /// The steps, run in order.
    pub steps: Vec<Step>,
}

/// Where actions may send requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressConfig {
    /// Allow plain `http://` (default false).
    pub allow_http: bool,
    /// Networks exempt from the private-address block (default none).
    pub allow_networks: Vec<ipnet::IpNet>,
}

impl EgressConfig {
    /// The egress policy this section describes, as the transport enforces it.
    pub fn policy(&self) -> crate::transport::EgressPolicy {
        self.allow_networks.iter().fold(
            crate::transport::EgressPolicy::new().allow_http(self.allow_http),
            |p, net| p.allow_network(*net),
        )
    }
}

/// A network as written in `[egress] allow_networks` or `--allow-network`: a CIDR
/// (`10.0.0.0/8`) or a single address (`127.0.0.1`).
pub fn parse_network(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Default limit on an inbound webhook body: 256 KiB.
pub const DEFAULT_INBOUND_MAX_BODY_BYTES: usize = 256 * 1024;
/// Largest allowed `inbound.max_body_bytes`: 16 MiB.
pub const MAX_INBOUND_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Default inbound rate: 10 requests per second per key, sustained.
pub const DEFAULT_INBOUND_RATE_PER_SECOND: f64 = 10.0;
/// Default inbound burst: 20 requests per key.
pub const DEFAULT_INBOUND_BURST: u32 = 20;

/// The inbound webhook endpoint's settings (`[inbound]`).
#[derive(Debug, Clone, PartialEq)]
pub struct InboundConfig {
    /// Credentials for every webhook automation without its own `auth`.
    pub auth: Option<InboundAuth>,
    /// The largest body accepted (default [`DEFAULT_INBOUND_MAX_BODY_BYTES`]).
    pub max_body_bytes: usize,
    /// Tokens a key regains per second (default [`DEFAULT_INBOUND_RATE_PER_SECOND`]).
    pub rate_per_second: f64,
    /// The most tokens a key holds (default [`DEFAULT_INBOUND_BURST`]).
    pub burst: u32,
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            auth: None,
            max_body_bytes: DEFAULT_INBOUND_MAX_BODY_BYTES,
            rate_per_second: DEFAULT_INBOUND_RATE_PER_SECOND,
            burst: DEFAULT_INBOUND_BURST,
        }
    }
}

/// A loaded, compiled agent config: its actions, webhooks, automations and egress policy.
#[derive(Debug, Clone)]
pub struct ActionSet {
    pub(crate) source: String,
    pub(crate) agent: Agent,
    pub(crate) actions: Vec<Arc<ActionSpec>>,
    pub(crate) by_name: HashMap<String, usize>,
    pub(crate) webhooks: Vec<WebhookSpec>,
    pub(crate) automations: Vec<AutomationSpec>,
    pub(crate) egress: EgressConfig,
    pub(crate) inbound: InboundConfig,
    pub(crate) secret_names: Vec<String>,
}

impl ActionSet {
    /// Every secret the file's templates name (`{{secrets.NAME}}`), sorted, each once: what
    /// a process serving it should have (`serve` warns at start about those not set).
    pub fn secret_names(&self) -> &[String] {
        &self.secret_names
    }

    /// The file (or name) it was loaded from.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// The agent.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }
    /// The actions, in file order.
    pub fn actions(&self) -> &[Arc<ActionSpec>] {
        &self.actions
    }
    /// An action by name.
    pub fn action(&self, name: &str) -> Option<&Arc<ActionSpec>> {
        self.by_name.get(name).map(|i| &self.actions[*i])
    }
    /// The webhooks.
    pub fn webhooks(&self) -> &[WebhookSpec] {
        &self.webhooks
    }
    /// The automations.
    pub fn automations(&self) -> &[AutomationSpec] {
        &self.automations
    }
    /// The egress policy settings.
    pub fn egress(&self) -> &EgressConfig {
        &self.egress
    }
    /// The inbound webhook endpoint's settings.
    pub fn inbound(&self) -> &InboundConfig {
        &self.inbound
    }
    /// An automation by id.
    pub fn automation(&self, id: &str) -> Option<&AutomationSpec> {
        self.automations.iter().find(|a| a.id == id)
    }
}
