//! The `Runtime(...)` object: its options from Python, its build through `midcall::Stack`, and
//! what it offers (tool definitions, starting a call, closing).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::Value;

use midcall::demo::{DemoSecrets, Mock};
use midcall::time;
use midcall::{ActionSet, Automations, CallInfo, EnvSecrets, Format, MapSecrets, SecretSource};

use crate::bridge::{done, spawn, tokio, Waker};
use crate::call::{PyCall, MAX_BUDGET_MS};
use crate::convert::{to_py, type_name};
use crate::ConfigError;

/// Secrets from a Python dict; they live in Rust memory only and are shown as `***`.
fn secrets_from(d: &Bound<'_, PyDict>) -> PyResult<MapSecrets> {
    let mut s = MapSecrets::new();
    for (k, v) in d.iter() {
        let Ok(name) = k.extract::<String>() else {
            return Err(PyTypeError::new_err("secrets: every name must be a str"));
        };
        // Never echo the value: name the secret, not what it holds.
        let Ok(value) = v.extract::<String>() else {
            return Err(PyTypeError::new_err(format!(
                "secrets[\"{name}\"]: the value must be a str (got {})",
                type_name(&v)
            )));
        };
        s = s.with(name, value);
    }
    Ok(s)
}

/// The agent's runtime: the loaded agent file, the connection pool, the cache, the breakers,
/// and (with an outbox) the event bus and the automations.
#[pyclass(module = "midcall._native", name = "Runtime", frozen)]
pub(crate) struct PyRuntime {
    rt: midcall::Runtime,
    agent: Arc<ActionSet>,
    path: String,
    automations: Option<Automations>,
    mock: Option<Mock>,
}

impl std::fmt::Debug for PyRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRuntime")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Everything `Runtime(...)` was given, once extracted from Python (no GIL needed to build).
struct Options {
    path: String,
    secrets: Option<MapSecrets>,
    allow_http: bool,
    allow_networks: Vec<String>,
    ca_certs: Vec<String>,
    outbox: Option<String>,
    mock: bool,
}

fn build(o: Options) -> PyResult<PyRuntime> {
    let set = ActionSet::load(&o.path).map_err(|e| ConfigError::new_err(e.to_string()))?;
    let agent = Arc::new(set);
    let mut policy = agent
        .egress()
        .policy()
        .allow_http(agent.egress().allow_http || o.allow_http);
    for (i, cidr) in o.allow_networks.iter().enumerate() {
        let net = midcall::config::parse_network(cidr).ok_or_else(|| {
            PyValueError::new_err(format!(
                "allow_networks[{i}]: \"{cidr}\" is not a CIDR such as 10.0.0.0/8"
            ))
        })?;
        policy = policy.allow_network(net);
    }
    let mut builder = midcall::Stack::for_agent(agent.clone()).egress(policy);
    if o.mock {
        if o.secrets.is_some() {
            return Err(PyValueError::new_err(
                "mock=True brings demo secrets (or MIDCALL_SECRET_<NAME> where set): pass no secrets",
            ));
        }
        builder = builder.mock(Vec::new(), Arc::new(DemoSecrets::env_first()));
    } else {
        let secrets: Arc<dyn SecretSource> = match o.secrets {
            Some(s) => Arc::new(s),
            None => Arc::new(EnvSecrets),
        };
        builder = builder.secrets(secrets);
    }
    for (i, path) in o.ca_certs.iter().enumerate() {
        let pem = std::fs::read(path)
            .map_err(|e| PyValueError::new_err(format!("ca_certs[{i}] {path}: {e}")))?;
        builder = builder.add_roots_pem(format!("ca_certs[{i}] {path}"), pem);
    }
    if let Some(db) = &o.outbox {
        builder = builder.outbox(db, |bus| bus);
    }
    let stack = tokio().block_on(builder.build()).map_err(|e| match e {
        midcall::StackError::Roots { .. } => PyValueError::new_err(e.to_string()),
        midcall::StackError::Runtime(e) => {
            PyRuntimeError::new_err(format!("outbox {:?}: {e}", o.outbox))
        }
        e => PyRuntimeError::new_err(e.to_string()),
    })?;
    let (rt, automations, mock) = (stack.runtime, stack.automations, stack.mock);
    Ok(PyRuntime {
        rt,
        agent,
        path: o.path,
        automations,
        mock,
    })
}

#[pymethods]
impl PyRuntime {
    #[new]
    #[pyo3(signature = (agent, *, secrets=None, allow_http=false, allow_networks=Vec::new(), ca_certs=Vec::new(), outbox=None, mock=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        agent: std::path::PathBuf,
        secrets: Option<Bound<'_, PyDict>>,
        allow_http: bool,
        allow_networks: Vec<String>,
        ca_certs: Vec<std::path::PathBuf>,
        outbox: Option<std::path::PathBuf>,
        mock: bool,
    ) -> PyResult<Self> {
        let o = Options {
            path: agent.display().to_string(),
            secrets: secrets.as_ref().map(secrets_from).transpose()?,
            allow_http,
            allow_networks,
            ca_certs: ca_certs.iter().map(|p| p.display().to_string()).collect(),
            outbox: outbox.map(|p| p.display().to_string()),
            mock,
        };
        py.detach(|| build(o))
    }

    /// The tool definitions for the model: "openai" or "anthropic" (what `midcall tools` prints).
    #[pyo3(signature = (format="openai"))]
    fn tools<'py>(&self, py: Python<'py>, format: &str) -> PyResult<Bound<'py, PyAny>> {
        let f = match format {
            "openai" => Format::OpenAi,
            "anthropic" => Format::Anthropic,
            other => {
                return Err(PyValueError::new_err(format!(
                    "tools(): format {other:?} is not one of \"openai\", \"anthropic\""
                )))
            }
        };
        to_py(py, &self.agent.tool_definitions(f))
    }

    /// The agent's id, tenant and action names.
    #[getter]
    fn agent_id(&self) -> String {
        self.agent.agent().id.clone()
    }

    #[getter]
    fn tenant(&self) -> String {
        self.agent.agent().tenant.clone()
    }

    #[getter]
    fn actions(&self) -> Vec<String> {
        self.agent
            .actions()
            .iter()
            .map(|a| a.name().to_string())
            .collect()
    }

    /// Requests the bundled mock CRM answered (with `mock=True`), as dicts.
    fn mock_requests<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let hits = self.mock.as_ref().map(|m| m.hits()).unwrap_or_default();
        let v = Value::Array(
            hits.iter()
                .map(|h| {
                    serde_json::json!({"method": h.method, "host": h.host, "path": h.path, "status": h.status})
                })
                .collect(),
        );
        to_py(py, &v)
    }

    /// Connections opened so far (a warm call opens none).
    fn connections_opened(&self) -> usize {
        self.rt.connections_opened()
    }

    /// Starts a call: an awaitable of a `Call` (see `midcall.Runtime.start_call`).
    #[pyo3(signature = (id, from_number, to_number, is_outgoing, within_ms, waker))]
    #[allow(clippy::too_many_arguments)]
    fn start_call<'py>(
        &self,
        py: Python<'py>,
        id: Option<String>,
        from_number: String,
        to_number: Option<String>,
        is_outgoing: bool,
        within_ms: u64,
        waker: &Bound<'py, Waker>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if within_ms > MAX_BUDGET_MS {
            return Err(PyValueError::new_err(format!(
                "start_call(within_ms={within_ms}): at most {MAX_BUDGET_MS}"
            )));
        }
        let now = time::now_ms();
        let id = id.unwrap_or_else(|| format!("call_py_{now:x}_{}", next_serial()));
        if id.is_empty() || id.len() > 256 {
            return Err(PyValueError::new_err(
                "start_call(id=...): 1 to 256 characters",
            ));
        }
        let info = CallInfo {
            id,
            agent_id: self.agent.agent().id.clone(),
            tenant: self.agent.agent().tenant.clone(),
            from_number,
            to_number: to_number
                .or_else(|| self.agent.agent().phone_number.clone())
                .unwrap_or_default(),
            is_outgoing,
            started_at: time::rfc3339_ms(now),
        };
        let rt = self.rt.clone();
        let agent = self.agent.clone();
        spawn(py, waker, async move {
            let session = rt
                .start_call(agent, info, Duration::from_millis(within_ms))
                .await;
            let call = PyCall {
                session,
                started: Instant::now(),
            };
            done(move |py| Ok(Bound::new(py, call)?.into_any().unbind()))
        })
    }

    /// Waits for queued events to be written to the outbox, then stops the automations.
    fn close<'py>(
        &self,
        py: Python<'py>,
        waker: &Bound<'py, Waker>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let bus = self.rt.event_bus().cloned();
        let automations = self.automations.clone();
        spawn(py, waker, async move {
            if let Some(a) = automations {
                a.shutdown(Duration::from_secs(5)).await;
            }
            if let Some(b) = bus {
                b.close().await;
            }
            done(|py| Ok(py.None()))
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "midcall.Runtime({:?}, agent={:?}, actions={})",
            self.path,
            self.agent.agent().id,
            self.agent.actions().len()
        )
    }
}

fn next_serial() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
