//! One builder from agent files to a running stack: the [`Runtime`] (egress policy, trusted
//! roots, secrets, the shared cache), its [`EventBus`] when there is an outbox, the
//! [`Automations`] of every agent on it, and the bundled mock CRM in front of every host the
//! agents call when asked for. `midcall serve`, `simulate`, `exec` and the Python package all
//! build through it, so a new setting is wired once.
//!
//! May call every room below it; nothing in the library calls it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::automation::Automations;
use crate::cache::SharedCacheConfig;
use crate::config::{ActionSet, Agents};
use crate::events::{EventBus, EventBusBuilder};
use crate::exec::{BuildError, Runtime, RuntimeBuilder};
use crate::template::SecretSource;
use crate::transport::EgressPolicy;

/// Why a stack could not be built; the message names the setting at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StackError {
    /// Extra root certificates (PEM) could not be used (the caller's configuration).
    #[error("{what}: {source}")]
    Roots {
        /// Which roots (a file name, an argument).
        what: String,
        /// What was wrong with them.
        source: BuildError,
    },
    /// The mock CRM could not start.
    #[cfg(feature = "demo")]
    #[error("mock CRM: {0}")]
    Mock(crate::demo::MockError),
    /// The runtime or its outbox could not be built.
    #[error("{0}")]
    Runtime(BuildError),
    /// The shared cache tier did not answer.
    #[error("the shared cache: {0}")]
    SharedCache(crate::cache::SharedCacheError),
    /// The automations could not start.
    #[error("automations: {0}")]
    Automations(crate::automation::StartupError),
}

/// A built stack. Dropping it stops the mock; shut the automations down first for a clean end.
#[derive(Debug)]
pub struct Stack {
    /// The executor every tool call goes through.
    pub runtime: Runtime,
    /// The automations of every agent, when the stack has an outbox.
    pub automations: Option<Automations>,
    /// The mock CRM, when asked for: kept for the stack's life.
    #[cfg(feature = "demo")]
    pub mock: Option<crate::demo::Mock>,
}

impl Stack {
    /// A stack for `agents`; the egress policy starts as their `[egress]` (one for all).
    pub fn builder(agents: Agents) -> StackBuilder {
        let policy = agents.first().egress().policy();
        StackBuilder {
            agents,
            policy,
            roots: Vec::new(),
            secrets: None,
            outbox: None,
            runtime: Box::new(|b| b),
            shared_cache: None,
            #[cfg(feature = "demo")]
            mock: None,
        }
    }

    /// A stack for one agent.
    pub fn for_agent(set: Arc<ActionSet>) -> StackBuilder {
        Stack::builder(Agents::one(set))
    }

    /// The event bus (the runtime's), when the stack has an outbox.
    pub fn bus(&self) -> Option<&EventBus> {
        self.runtime.event_bus()
    }
}

type Tune<B> = Box<dyn FnOnce(B) -> B + Send>;

/// Settings of a [`Stack`]; see [`Stack::builder`].
pub struct StackBuilder {
    agents: Agents,
    policy: EgressPolicy,
    roots: Vec<(String, Vec<u8>)>,
    secrets: Option<Arc<dyn SecretSource>>,
    outbox: Option<(PathBuf, Tune<EventBusBuilder>)>,
    runtime: Tune<RuntimeBuilder>,
    shared_cache: Option<SharedCacheConfig>,
    #[cfg(feature = "demo")]
    mock: Option<(Vec<crate::demo::MockRule>, Arc<crate::demo::DemoSecrets>)>,
}

impl std::fmt::Debug for StackBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackBuilder")
            .field("agents", &self.agents)
            .field("policy", &self.policy)
            .field("outbox", &self.outbox.as_ref().map(|(p, _)| p))
            .finish_non_exhaustive()
    }
}

impl StackBuilder {
    /// Replaces the egress policy (default: the agents' `[egress]`).
    pub fn egress(mut self, policy: EgressPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Trusts the certificates in `pem` as extra roots, for actions and webhooks alike;
    /// `what` names them in an error (a file, an argument).
    pub fn add_roots_pem(mut self, what: impl Into<String>, pem: Vec<u8>) -> Self {
        self.roots.push((what.into(), pem));
        self
    }

    /// Where secrets come from. Default: the environment (`MIDCALL_SECRET_<NAME>`), or the
    /// mock's demo secrets with [`StackBuilder::mock`].
    pub fn secrets(mut self, secrets: Arc<dyn SecretSource>) -> Self {
        self.secrets = Some(secrets);
        self
    }

    /// An outbox at `db` (a SQLite file or a `postgres://` URL): the event bus delivering the
    /// agents' webhooks, and the automations on it. `tune` sets the bus's other settings.
    /// Default: none (no events, no automations).
    pub fn outbox(
        mut self,
        db: impl Into<PathBuf>,
        tune: impl FnOnce(EventBusBuilder) -> EventBusBuilder + Send + 'static,
    ) -> Self {
        self.outbox = Some((db.into(), Box::new(tune)));
        self
    }

    /// The runtime's other settings (pool, breaker, dedupe window, …).
    pub fn runtime(
        mut self,
        tune: impl FnOnce(RuntimeBuilder) -> RuntimeBuilder + Send + 'static,
    ) -> Self {
        self.runtime = Box::new(tune);
        self
    }

    /// The shared cache tier; the stack checks it answers (within 2 s) before it is ready.
    pub fn shared_cache(mut self, cfg: SharedCacheConfig) -> Self {
        self.shared_cache = Some(cfg);
        self
    }

    /// Puts the bundled mock CRM in front of every host the agents call (answering `rules`
    /// first), with `secrets` (demo values) unless [`StackBuilder::secrets`] is set, and
    /// allows loopback.
    #[cfg(feature = "demo")]
    pub fn mock(
        mut self,
        rules: Vec<crate::demo::MockRule>,
        secrets: Arc<crate::demo::DemoSecrets>,
    ) -> Self {
        self.mock = Some((rules, secrets));
        self
    }

    /// Builds the stack: inside a tokio runtime (the bus and the mock start tasks).
    pub async fn build(self) -> Result<Stack, StackError> {
        let mut policy = self.policy;
        let mut builder = Runtime::builder();
        let mut secrets = self.secrets;
        #[cfg(feature = "demo")]
        let mut mock = None;
        #[cfg(feature = "demo")]
        if let Some((rules, demo)) = self.mock {
            let hosts: Vec<String> = self
                .agents
                .sets()
                .iter()
                .flat_map(|s| crate::demo::hosts(s))
                .collect();
            let m = crate::demo::Mock::start(&hosts, &rules, demo.clone())
                .await
                .map_err(StackError::Mock)?;
            let loopback = ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(127, 0, 0, 0), 8)
                .map_err(|e| StackError::Mock(e.to_string().into()))?;
            policy = policy.allow_network(loopback.into());
            builder = builder
                .resolver(Arc::new(crate::demo::MockResolver(m.addr)))
                .add_root_certificate(m.cert_der.clone());
            secrets.get_or_insert(demo);
            mock = Some(m);
        }
        if let Some(s) = secrets {
            builder = builder.secrets(s);
        }
        for (what, pem) in &self.roots {
            builder =
                builder
                    .add_root_certificates_pem(pem)
                    .map_err(|source| StackError::Roots {
                        what: what.clone(),
                        source,
                    })?;
        }
        // The bus is built on the runtime's pool, so the roots above serve its webhooks too.
        if let Some((db, tune)) = self.outbox {
            builder = builder.event_bus(tune(EventBus::builder(&db).agents(&self.agents)));
        }
        if let Some(cfg) = self.shared_cache {
            builder = builder.shared_cache(cfg);
        }
        let runtime = (self.runtime)(builder.egress(policy))
            .build()
            .map_err(StackError::Runtime)?;
        // Without a shared tier this answers at once.
        runtime
            .check_shared_cache(Duration::from_secs(2))
            .await
            .map_err(StackError::SharedCache)?;
        let automations = match runtime.event_bus().cloned() {
            Some(bus) => Some(
                Automations::for_agents(self.agents, runtime.clone(), bus)
                    .start()
                    .map_err(StackError::Automations)?,
            ),
            None => None,
        };
        Ok(Stack {
            runtime,
            automations,
            #[cfg(feature = "demo")]
            mock,
        })
    }
}
