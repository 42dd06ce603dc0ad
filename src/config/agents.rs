//! The agents one process serves: one agent file (names as they always were) or many (every
//! automation run and outbox endpoint named `<agent>/...`, so nothing of one agent can be taken
//! for another's).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::config::{ActionSet, AutomationSpec};

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
    /// them apart); and two tenants reading a secret of the same name (one would get the
    /// other's value: an inbound key of one would start the other's automations).
    pub fn many(sets: Vec<Arc<ActionSet>>) -> Result<Agents, AgentsError> {
        Self::many_inner(sets).map_err(AgentsError)
    }

    /// See [`Self::many`].
    fn many_inner(sets: Vec<Arc<ActionSet>>) -> Result<Agents, String> {
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
        // Secrets are read by name from one environment: a name two tenants both read would
        // give one tenant's value to the other (an inbound key that opens both, a token sent
        // to the other's server).
        let mut readers: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for s in &sets {
            let (agent, tenant) = (s.agent().id.as_str(), s.agent().tenant.as_str());
            for name in s.secret_names() {
                match readers.get(name.as_str()) {
                    Some((t, other)) if t != &tenant => {
                        return Err(format!(
                            "agents \"{other}\" (tenant \"{t}\") and \"{agent}\" (tenant \"{tenant}\") both read secrets.{name}: one tenant would get the other's value (its inbound key would open the other's automations); give each tenant its own secret names"
                        ));
                    }
                    Some(_) => {}
                    None => {
                        readers.insert(name, (tenant, agent));
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

    /// The id of the agent a stored name belongs to (it may no longer be loaded).
    pub fn owner<'a>(&'a self, stored: &'a str) -> Option<&'a str> {
        if self.qualified {
            stored.split_once('/').map(|(agent, _)| agent)
        } else {
            Some(self.first().agent().id.as_str())
        }
    }

    /// What the stored names of these agents start with: `agent/` each when qualified;
    /// `None` (every name) for the one agent of [`Agents::one`], `Some(empty)` (no name) when
    /// `ids` leaves it out.
    pub fn name_prefixes(&self, ids: &[&str]) -> Option<Vec<String>> {
        if self.qualified {
            Some(ids.iter().map(|a| format!("{a}/")).collect())
        } else if ids.is_empty() {
            Some(Vec::new())
        } else {
            None
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

    /// Refuses agents that read the secret `name` (the admin key's: no agent file may read
    /// it).
    pub fn refuse_secret(&self, name: &str, what: &str) -> Result<(), AgentsError> {
        match self
            .sets
            .iter()
            .find(|s| s.secret_names().iter().any(|n| n == name))
        {
            Some(s) => Err(AgentsError(format!(
                "agent \"{}\" reads secrets.{name}, the {what}: an agent file may not read it",
                s.agent().id
            ))),
            None => Ok(()),
        }
    }

    /// The agents of `tenant`.
    pub fn of_tenant<'a>(&'a self, tenant: &'a str) -> impl Iterator<Item = &'a Arc<ActionSet>> {
        self.sets.iter().filter(move |s| s.agent().tenant == tenant)
    }
}

crate::text_error! {
    /// Why agents cannot be served together (the agent files' fault): the message names them.
    AgentsError
}
