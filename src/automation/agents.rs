//! The agents one process serves: one agent file (names as they always were) or many (every
//! automation run and outbox endpoint named `<agent>/...`, so nothing of one agent can be taken
//! for another's).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::config::{ActionSet, AutomationSpec, InboundAuth};

/// The agents of one [`crate::Automations`] (and of its event bus): built once, replaced whole
/// by a reload. Cheap to clone.
#[derive(Clone)]
pub struct Agents {
    sets: Vec<Arc<ActionSet>>,
    by_id: HashMap<String, usize>,
    qualified: bool,
}

impl std::fmt::Debug for Agents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agents")
            .field("agents", &self.ids())
            .field("qualified", &self.qualified)
            .finish()
    }
}

impl Agents {
    /// One agent, its automations and endpoints named as in its file (`notify`,
    /// `automation notify step 1`, the webhook's label).
    pub fn one(set: Arc<ActionSet>) -> Agents {
        let by_id = HashMap::from([(set.agent().id.clone(), 0)]);
        Agents {
            sets: vec![set],
            by_id,
            qualified: false,
        }
    }

    /// Many agents (`serve DIR`): run and endpoint names carry the agent
    /// (`front-desk/notify`, `front-desk/events`). Refused, naming the agents: two with one id;
    /// an id with `/`; different `[egress]` sections (one process has one egress policy: run
    /// them apart); and two tenants whose inbound credentials read the same secret (a key of
    /// one would start the other's automations).
    pub fn many(sets: Vec<Arc<ActionSet>>) -> Result<Agents, String> {
        let mut by_id = HashMap::new();
        for (i, s) in sets.iter().enumerate() {
            let id = &s.agent().id;
            if id.contains('/') {
                return Err(format!(
                    "agent \"{id}\": an agent id served with others may not contain '/'"
                ));
            }
            if by_id.insert(id.clone(), i).is_some() {
                return Err(format!("two agent files have [agent] id = \"{id}\""));
            }
        }
        if let Some(first) = sets.first() {
            for s in &sets[1..] {
                if s.egress() != first.egress() {
                    return Err(format!(
                        "agents \"{}\" and \"{}\" have different [egress] sections; one process has one egress policy: serve them in separate processes",
                        first.agent().id,
                        s.agent().id
                    ));
                }
            }
        }
        let mut readers: BTreeMap<String, (String, String)> = BTreeMap::new();
        for s in &sets {
            for name in inbound_secret_names(s) {
                let tenant = &s.agent().tenant;
                match readers.get(&name) {
                    Some((t, agent)) if t != tenant => {
                        return Err(format!(
                            "agents \"{agent}\" (tenant \"{t}\") and \"{}\" (tenant \"{tenant}\") both authenticate inbound webhooks with secrets.{name}: a key of one tenant would start the other's automations; give each tenant its own secret",
                            s.agent().id
                        ));
                    }
                    Some(_) => {}
                    None => {
                        readers.insert(name, (tenant.clone(), s.agent().id.clone()));
                    }
                }
            }
        }
        Ok(Agents {
            sets,
            by_id,
            qualified: true,
        })
    }

    /// Every agent, in load order.
    pub fn sets(&self) -> &[Arc<ActionSet>] {
        &self.sets
    }

    /// The agent ids, in load order.
    pub fn ids(&self) -> Vec<&str> {
        self.sets.iter().map(|s| s.agent().id.as_str()).collect()
    }

    /// An agent by id.
    pub fn get(&self, agent: &str) -> Option<&Arc<ActionSet>> {
        self.by_id.get(agent).map(|&i| &self.sets[i])
    }

    /// Whether names carry the agent (many agents).
    pub fn qualified(&self) -> bool {
        self.qualified
    }

    /// The first agent (the only one of [`Agents::one`]).
    pub fn first(&self) -> &Arc<ActionSet> {
        &self.sets[0]
    }

    /// `name` as stored for `agent`: `agent/name` when qualified.
    pub fn name(&self, agent: &str, name: &str) -> String {
        if self.qualified {
            format!("{agent}/{name}")
        } else {
            name.to_string()
        }
    }

    /// The agent a stored name belongs to, and the name without it.
    pub fn split<'a>(&'a self, stored: &'a str) -> Option<(&'a Arc<ActionSet>, &'a str)> {
        if self.qualified {
            let (agent, rest) = stored.split_once('/')?;
            Some((self.get(agent)?, rest))
        } else {
            Some((self.first(), stored))
        }
    }

    /// The automation a stored run name (see [`Agents::name`]) stands for.
    pub fn automation<'a>(
        &'a self,
        stored: &'a str,
    ) -> Option<(&'a Arc<ActionSet>, &'a AutomationSpec)> {
        let (set, id) = self.split(stored)?;
        Some((set, set.automation(id)?))
    }

    /// The agents of `tenant`.
    pub fn of_tenant<'a>(&'a self, tenant: &'a str) -> impl Iterator<Item = &'a Arc<ActionSet>> {
        self.sets.iter().filter(move |s| s.agent().tenant == tenant)
    }
}

/// The secret names an agent's inbound credentials read.
fn inbound_secret_names(set: &ActionSet) -> Vec<String> {
    let mut out = Vec::new();
    let mut add = |auth: &InboundAuth| {
        for t in [&auth.bearer, &auth.signing_secret].into_iter().flatten() {
            out.extend(secret_refs(t.source()));
        }
    };
    if let Some(a) = &set.inbound().auth {
        add(a);
    }
    for a in set.automations() {
        if let Some(auth) = &a.auth {
            add(auth);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `NAME` for every `secrets.NAME` in a template's source.
fn secret_refs(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(i) = rest.find("secrets.") {
        rest = &rest[i + "secrets.".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::secret_refs;

    #[test]
    fn secret_references_are_found() {
        assert_eq!(
            secret_refs("{{secrets.A_1}} x {{ secrets.b }}"),
            vec!["A_1".to_string(), "b".to_string()]
        );
        assert!(secret_refs("{{payload.x}}").is_empty());
    }
}
