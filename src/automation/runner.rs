//! Queues automation runs durably and executes them on a worker task.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{watch, Notify, Semaphore};

use super::runlog::RunLog;
use super::{post_call_payload, RunContext};
use crate::config::Agents;
use crate::config::{ActionSet, AutomationSpec, Step, Trigger};
use crate::events::{Event, EventBus};
use crate::exec::{CallCompletion, Runtime};
use crate::state::{Call, CallEnd, CallInfo};
use crate::store::{Db, OwnedRun, TargetRef};
use crate::template::SecretSource;
use crate::time;

use super::steps::*;

/// How long a `webhook-id` is remembered to refuse replays: 10 minutes (longer than the
/// whole window a timestamp is accepted in).
pub const REPLAY_WINDOW: Duration = Duration::from_secs(600);

/// Why automations could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartupError {
    /// Started outside a tokio runtime (the caller's mistake).
    #[error("automations must be started inside a tokio runtime")]
    NoRuntime,
    /// The run log could not be opened (see [`crate::store::StoreError::is_transient`]).
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

/// Why runs could not be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// No automation has this id.
    #[error("no automation \"{0}\"")]
    NotFound(String),
    /// Several loaded agents have an automation with this id: use the route naming the agent.
    #[error(
        "{0} agents have an automation \"{1}\": use /v1/agents/<agent>/automations/{1}/webhook"
    )]
    Ambiguous(usize, String),
    /// The automation exists but is not started by webhooks.
    #[error("automation \"{id}\" is triggered by {trigger} and cannot be started by a webhook")]
    NotWebhook {
        /// The automation.
        id: String,
        /// Its trigger's name.
        trigger: &'static str,
    },
    /// The automation is disabled in the config.
    #[error("automation \"{0}\" is disabled")]
    Disabled(String),
    /// The payload does not fit the automation's steps.
    #[error("{0}")]
    InvalidPayload(String),
    /// This `webhook-id` started a run within [`REPLAY_WINDOW`].
    #[error("webhook-id \"{0}\" was already used")]
    Replayed(String),
    /// The run could not be stored (or an event not published).
    #[error("could not queue the run: {0}")]
    Storage(String),
}

/// A webhook automation a request may start: its agent's version in service, and its place in
/// it (nothing copied).
#[derive(Clone)]
pub struct WebhookTarget {
    pub(crate) set: Arc<ActionSet>,
    pub(crate) index: usize,
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("agent", &self.set.agent().id)
            .field("automation", &self.automation().id)
            .finish()
    }
}

impl WebhookTarget {
    /// Its agent's config.
    pub fn set(&self) -> &Arc<ActionSet> {
        &self.set
    }

    /// The automation.
    pub fn automation(&self) -> &AutomationSpec {
        &self.set.automations()[self.index]
    }
}

/// How long a claimed run is this process's without renewal (renewed every third of it while
/// it runs; PostgreSQL only: another process resumes a run whose lease ran out).
pub(crate) const RUN_LEASE: Duration = Duration::from_secs(30);

/// Builds [`Automations`]. Every setting has a default, given on its method.
pub struct AutomationsBuilder {
    pub(crate) agents: Agents,
    pub(crate) runtime: Runtime,
    pub(crate) bus: EventBus,
    pub(crate) concurrency: usize,
}

impl std::fmt::Debug for AutomationsBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutomationsBuilder")
            .field("agents", &self.agents)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl AutomationsBuilder {
    /// Runs executed at the same time. Default 16.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.clamp(1, 1024);
        self
    }

    /// Opens the run log in the bus's outbox database, queues again the runs a stopped
    /// process left running, and starts the worker task (call inside a tokio runtime).
    pub fn start(self) -> Result<Automations, StartupError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StartupError::NoRuntime);
        }
        let db = self.bus.store().reopen()?;
        let resumed = db.requeue_running()?;
        if resumed > 0 {
            tracing::info!(resumed, "automation runs resumed");
        }
        let (stop, _) = watch::channel(Stop::Run);
        let agents = Arc::new(RwLock::new(Arc::new(self.agents)));
        let inner = Arc::new(Inner {
            secrets: self.runtime.parts().secret_source(),
            agents: agents.clone(),
            runtime: self.runtime,
            bus: self.bus,
            db,
            notify: Notify::new(),
            stop,
            permits: Arc::new(Semaphore::new(self.concurrency)),
            concurrency: self.concurrency as u32,
            task: Mutex::new(None),
        });
        // Weak registrations: the runtime and the bus must not keep the automations alive.
        inner.bus.register_targets(Arc::new(StepTargets { agents }));
        inner.runtime.register_call_completion(Arc::new(Completion {
            inner: Arc::downgrade(&inner),
        }));
        let task = tokio::spawn(work(inner.clone()));
        if let Ok(mut t) = inner.task.lock() {
            *t = Some(task);
        }
        Ok(Automations { inner })
    }
}

/// Resolves an automation delivery's target: its step's templates and its run's context.
pub(crate) struct StepTargets {
    pub(crate) agents: Shared,
}

/// The agents, replaced whole by a reload.
pub(crate) type Shared = Arc<RwLock<Arc<Agents>>>;

pub(crate) fn current(agents: &Shared) -> Arc<Agents> {
    agents.read().unwrap_or_else(|e| e.into_inner()).clone()
}

impl crate::events::DeliveryTargets for StepTargets {
    fn resolve(
        &self,
        target: &str,
        context: Option<&[u8]>,
    ) -> Result<crate::events::ResolvedTarget, String> {
        let t: TargetRef =
            serde_json::from_str(target).map_err(|_| "unreadable automation target".to_string())?;
        let agents = current(&self.agents);
        let step = agents
            .automation(&t.automation)
            .and_then(|(_, a)| a.steps.get(t.step));
        let Some(Step::SendWebhook {
            url,
            headers,
            signing_secret,
            ..
        }) = step
        else {
            return Err("the automation step is no longer in the config".into());
        };
        let bytes = context.ok_or_else(|| "the run is no longer in the run log".to_string())?;
        let inputs: RunContext = serde_json::from_slice(bytes)
            .map_err(|_| "the run's context is unreadable".to_string())?;
        Ok(crate::events::ResolvedTarget {
            url: url.clone(),
            headers: headers.clone(),
            signing_secret: signing_secret.clone(),
            inputs,
        })
    }
}

/// The call_completed automations, as the runtime's [`CallCompletion`].
pub(crate) struct Completion {
    pub(crate) inner: std::sync::Weak<Inner>,
}

impl CallCompletion for Completion {
    fn complete<'a>(
        &'a self,
        _agent: &'a ActionSet,
        call: &'a Call,
        end: &'a CallEnd,
    ) -> futures_util::future::BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move {
            let inner = self
                .inner
                .upgrade()
                .ok_or_else(|| "the automations have stopped".to_string())?;
            Automations { inner }
                .complete_call(call, end)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Run,
    /// Claim nothing new.
    Drain,
    /// Cancel runs still going (they resume on the next start).
    Abort,
}

pub(crate) struct Inner {
    pub(crate) agents: Shared,
    pub(crate) runtime: Runtime,
    pub(crate) bus: EventBus,
    pub(crate) secrets: Arc<dyn SecretSource>,
    pub(crate) db: Db,
    pub(crate) notify: Notify,
    pub(crate) stop: watch::Sender<Stop>,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) concurrency: u32,
    pub(crate) task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The automations of one agent config: queues runs durably and executes them. Cheap to clone.
#[derive(Clone)]
pub struct Automations {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Automations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Automations")
            .field("agents", &*self.agents())
            .finish_non_exhaustive()
    }
}

impl Automations {
    /// A builder for the automations of `set`, executing `run_action` steps on `runtime` and
    /// delivering `send_webhook` steps through `bus` (whose outbox also holds the run log).
    /// Build `bus` with [`crate::events::EventBusBuilder::webhooks`] of the same `set`.
    pub fn builder(set: Arc<ActionSet>, runtime: Runtime, bus: EventBus) -> AutomationsBuilder {
        Automations::for_agents(Agents::one(set), runtime, bus)
    }

    /// A builder for the automations of many agents (see [`Agents::many`]). Build `bus` with
    /// [`crate::events::EventBusBuilder::agents`] of the same agents.
    pub fn for_agents(agents: Agents, runtime: Runtime, bus: EventBus) -> AutomationsBuilder {
        AutomationsBuilder {
            agents,
            runtime,
            bus,
            concurrency: 16,
        }
    }

    /// The config (the first agent's, when there are several).
    pub fn set(&self) -> Arc<ActionSet> {
        self.agents().first().clone()
    }

    /// The agents, as of now.
    pub fn agents(&self) -> Arc<Agents> {
        current(&self.inner.agents)
    }

    /// Replaces the agents (a reload) and the bus's webhooks with them. Requests, runs and
    /// deliveries under way keep the version they started with; what starts next sees the new
    /// one. A run or delivery whose automation or webhook is gone fails naming it.
    pub fn replace_agents(&self, agents: Agents) {
        self.inner.bus.set_agents(&agents);
        *self.inner.agents.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(agents);
    }

    pub(crate) fn secret_source(&self) -> Arc<dyn SecretSource> {
        self.inner.secrets.clone()
    }

    /// The event bus.
    pub fn bus(&self) -> &EventBus {
        &self.inner.bus
    }

    /// The run log.
    pub fn log(&self) -> Result<RunLog, crate::store::StoreError> {
        RunLog::open(self.inner.bus.db_path())
    }

    /// The call ended: publishes `phone_call_ended` and `post_call_processing_completed` (the
    /// post-call payload, see [`super::post_call_payload`]) durably, then queues every enabled
    /// call_completed automation whose agents include the call's agent. Returns the queued
    /// runs' ids. The runs read `call.*`, `state.*`, `transcript` and `payload.*` (the post-call
    /// payload) as they were at this moment.
    pub async fn complete_call(
        &self,
        call: &Call,
        end: &CallEnd,
    ) -> Result<Vec<String>, StartError> {
        let agents = self.agents();
        let own = match agents.get(&call.info.agent_id) {
            Some(s) => s.clone(),
            // One agent file: its automations choose by their `agents` (as always).
            None if !agents.qualified() => agents.first().clone(),
            // Many: a call of an agent not served here (gone in a reload) starts nothing of
            // another agent's, whatever the tenant; its events still go out (to no webhook).
            None => {
                tracing::warn!(target: "midcall::automation", agent = %call.info.agent_id, call = %call.info.id,
                    "a call of an agent not loaded ended: no automation runs for it");
                return Ok(Vec::new());
            }
        };
        let payload = post_call_payload(&own, call, end);
        let bus = &self.inner.bus;
        let ended = Event::phone_call_ended(
            end.duration.as_millis() as f64 / 1000.0,
            &end.end_reason,
            &call.transcript,
        );
        bus.publish_durable(&ended, &call.info)
            .await
            .map_err(|e| StartError::Storage(e.to_string()))?;
        bus.publish_durable(
            &Event::post_call_processing_completed(payload.clone()),
            &call.info,
        )
        .await
        .map_err(|e| StartError::Storage(e.to_string()))?;
        // Only the automations of the call's own tenant (`agents = "all"` is all of its
        // tenant's agents); with one agent file, that file's.
        let tenant = own.agent().tenant.clone();
        let scope: Vec<&Arc<ActionSet>> = if agents.qualified() {
            agents.of_tenant(&tenant).collect()
        } else {
            vec![agents.first()]
        };
        let matching: Vec<String> = scope
            .iter()
            .flat_map(|s| {
                s.automations()
                    .iter()
                    .filter(|a| {
                        a.enabled
                            && matches!(&a.trigger, Trigger::CallCompleted { agents } if agents.includes(&call.info.agent_id))
                    })
                    .map(|a| agents.name(&s.agent().id, &a.id))
            })
            .collect();
        if matching.is_empty() {
            return Ok(Vec::new());
        }
        let context = RunContext {
            call: call.info.clone(),
            state: call.state.clone(),
            transcript: call.transcript.clone(),
            payload,
        };
        let bytes = serde_json::to_vec(&context).map_err(|e| StartError::Storage(e.to_string()))?;
        let now = time::now_ms();
        let rows: Vec<(String, String)> =
            matching.iter().map(|a| (run_id(now), a.clone())).collect();
        let ids = rows.iter().map(|(id, _)| id.clone()).collect();
        let runs: Vec<OwnedRun> = rows
            .into_iter()
            .map(|(id, automation)| OwnedRun {
                id,
                automation,
                trigger: "call_completed",
                call_id: Some(call.info.id.clone()),
                context: bytes.clone(),
            })
            .collect();
        self.inner
            .db
            .insert_runs(runs, now)
            .await
            .map_err(|e| StartError::Storage(e.to_string()))?;
        self.inner.notify.notify_one();
        Ok(ids)
    }

    /// The agent and automation `id` if a webhook may start it: `agent` names the agent; without
    /// it the id must be unique across the agents ([`StartError::Ambiguous`] otherwise).
    /// [`StartError::NotFound`], [`StartError::NotWebhook`] or [`StartError::Disabled`] when
    /// it may not. The target holds the version of the agent in service now, so a request
    /// finishes on it whatever a reload does meanwhile.
    pub fn webhook_automation(
        &self,
        agent: Option<&str>,
        id: &str,
    ) -> Result<WebhookTarget, StartError> {
        let agents = self.agents();
        let set = match agent {
            Some(agent) => agents
                .get(agent)
                .ok_or_else(|| StartError::NotFound(format!("{agent}/{id}")))?
                .clone(),
            None => {
                let with: Vec<&Arc<ActionSet>> = agents
                    .sets()
                    .iter()
                    .filter(|s| s.automation(id).is_some())
                    .collect();
                match with.as_slice() {
                    [one] => (*one).clone(),
                    [] => return Err(StartError::NotFound(id.to_string())),
                    many => return Err(StartError::Ambiguous(many.len(), id.to_string())),
                }
            }
        };
        let index = set
            .automations()
            .iter()
            .position(|a| a.id == id)
            .ok_or_else(|| StartError::NotFound(id.to_string()))?;
        let a = &set.automations()[index];
        if !matches!(a.trigger, Trigger::Webhook) {
            return Err(StartError::NotWebhook {
                id: id.to_string(),
                trigger: a.trigger.name(),
            });
        }
        if !a.enabled {
            return Err(StartError::Disabled(id.to_string()));
        }
        Ok(WebhookTarget { set, index })
    }

    /// Queues a run of the webhook automation `id` with `payload` (`payload.*` in its
    /// templates) and returns its id once it is stored. The payload is checked against the
    /// steps first: every body and args template must render, and `run_action` args must
    /// satisfy the action's parameters, or [`StartError::InvalidPayload`] says which step and
    /// field. Authentication is the caller's job (the inbound server does it).
    pub async fn start_webhook(&self, id: &str, payload: Value) -> Result<String, StartError> {
        self.start_webhook_once(id, payload, None).await
    }

    /// [`Automations::start_webhook_once`] for the automation `id` of `agent` (or, without
    /// one, the only loaded agent that has it).
    pub async fn start_agent_webhook(
        &self,
        agent: Option<&str>,
        id: &str,
        payload: Value,
        webhook_id: Option<&str>,
    ) -> Result<String, StartError> {
        let target = self.webhook_automation(agent, id)?;
        self.start_target(&target, payload, webhook_id).await
    }

    /// [`Automations::start_webhook`] for a signed request: `webhook_id` is stored with the run,
    /// in the same transaction, and a `webhook_id` seen in the last [`REPLAY_WINDOW`]
    /// is refused with [`StartError::Replayed`] (across restarts too).
    pub async fn start_webhook_once(
        &self,
        id: &str,
        payload: Value,
        webhook_id: Option<&str>,
    ) -> Result<String, StartError> {
        self.start_agent_webhook(None, id, payload, webhook_id)
            .await
    }

    /// [`Automations::start_webhook_once`] for a target [`Automations::webhook_automation`]
    /// found (the inbound server: one lookup per request).
    pub async fn start_target(
        &self,
        target: &WebhookTarget,
        payload: Value,
        webhook_id: Option<&str>,
    ) -> Result<String, StartError> {
        let (set, a) = (&target.set, target.automation());
        let now = time::now_ms();
        let run = run_id(now);
        let context = RunContext {
            call: CallInfo {
                id: run.clone(),
                agent_id: set.agent().id.clone(),
                tenant: set.agent().tenant.clone(),
                from_number: String::new(),
                to_number: String::new(),
                is_outgoing: false,
                started_at: time::rfc3339_ms(now),
            },
            payload,
            ..RunContext::default()
        };
        self.check_payload(set, a, &context)?;
        let bytes = serde_json::to_vec(&context).map_err(|e| StartError::Storage(e.to_string()))?;
        let window = REPLAY_WINDOW.as_millis() as i64;
        let fresh = self
            .inner
            .db
            .insert_run_once(
                OwnedRun {
                    id: run.clone(),
                    automation: self.agents().name(&set.agent().id, &a.id),
                    trigger: "webhook",
                    call_id: None,
                    context: bytes,
                },
                webhook_id.map(str::to_string),
                window,
                now,
            )
            .await
            .map_err(|e| StartError::Storage(e.to_string()))?;
        if !fresh {
            return Err(StartError::Replayed(
                webhook_id.unwrap_or_default().to_string(),
            ));
        }
        self.inner.notify.notify_one();
        Ok(run)
    }

    fn check_payload(
        &self,
        set: &ActionSet,
        a: &AutomationSpec,
        context: &RunContext,
    ) -> Result<(), StartError> {
        for (i, step) in a.steps.iter().enumerate() {
            match step {
                Step::SendWebhook { body, .. } => {
                    if let Some(body) = body {
                        check_body(body, context, &*self.inner.secrets).map_err(|e| {
                            StartError::InvalidPayload(format!("steps[{i}].send_webhook.body: {e}"))
                        })?;
                    }
                }
                Step::RunAction { action, args } => {
                    let args = match args {
                        Some(t) => check_body(t, context, &*self.inner.secrets).map_err(|e| {
                            StartError::InvalidPayload(format!("steps[{i}].run_action.args: {e}"))
                        })?,
                        None => Some(json!({})),
                    };
                    // Arguments that read state are checked when the step runs.
                    let Some(args) = args else { continue };
                    if let Some(schema) = set.action(action).and_then(|s| s.parameters()) {
                        schema.validate(action, &args).map_err(|e| {
                            StartError::InvalidPayload(format!("steps[{i}].run_action.args: {e}"))
                        })?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits until no run is queued or running, at most `within`. True if idle.
    pub async fn wait_idle(&self, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        loop {
            if self.inner.db.unfinished().await.ok() == Some(0) {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops claiming runs, lets runs in progress finish for up to `grace`, then cancels the
    /// rest. Queued and cancelled runs stay in the outbox and resume on the next start;
    /// deliveries already queued stay pending. Does not close the event bus.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.inner.stop.send(Stop::Drain);
        let task = self.inner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = task {
            let _ = t.await;
        }
        let all = self.inner.permits.clone();
        let drained = tokio::time::timeout(grace, all.acquire_many(self.inner.concurrency)).await;
        if !matches!(drained, Ok(Ok(_))) {
            let _ = self.inner.stop.send(Stop::Abort);
            let _ = self
                .inner
                .permits
                .acquire_many(self.inner.concurrency)
                .await;
        }
    }
}
