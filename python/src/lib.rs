//! `midcall._native`: the Rust side of the Python package.
//!
//! One tokio runtime per process, on its own threads (`midcall-worker`), runs every tool call.
//! Results come back to asyncio through one wake-up queue per event loop ([`Waker`]: a socket
//! the loop watches), so no runtime thread ever takes the GIL. The Python layer in
//! `midcall/__init__.py` wraps these classes in `async def` methods, so what users get are
//! real coroutines (they work with `await` and with `asyncio.create_task`).
//!
//! Nothing a caller passes may crash the interpreter: every conversion is checked and names
//! the place of a bad value; the GIL is released while Rust loads, builds or runs.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures_util::FutureExt;
use pyo3::exceptions::{PyException, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

use midcall::demo::{DemoSecrets, Mock};
use midcall::exec::Budget;
use midcall::time;
use midcall::{
    ActionSet, Automations, CallEnd, CallInfo, CallSession, EnvSecrets, Format, MapSecrets,
    SecretSource, ToolCall, Turn,
};

pyo3::create_exception!(
    midcall,
    ConfigError,
    PyException,
    "The agent file cannot be used: the message is the located text `midcall check` prints."
);

/// How deep a value from Python may nest (a list that holds itself would never end).
const MAX_DEPTH: usize = 64;
/// The default turn budget of a tool call (the action's own `timeout_ms` still applies).
const DEFAULT_BUDGET_MS: u64 = 2000;
/// The longest budget a tool call may be given.
const MAX_BUDGET_MS: u64 = 600_000;

/// The process's runtime, started when the module is imported.
static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

fn tokio() -> &'static tokio::runtime::Runtime {
    RUNTIME
        .get()
        .expect("the runtime is started when midcall._native is imported")
}

// ---------------------------------------------------------------------------------------------
// Values between Python and JSON.

/// A Python value as JSON; `at` names the place for the error (`arguments.phone`). The place
/// is built only when something is wrong: a good value costs no path strings.
fn to_json(v: &Bound<'_, PyAny>, at: &str) -> PyResult<Value> {
    convert(v, 0).map_err(|bad| {
        let mut place = at.to_string();
        for seg in bad.path.iter().rev() {
            place.push_str(seg);
        }
        match bad.why {
            Why::Type(m) => PyTypeError::new_err(format!("{place}: {m}")),
            Why::Value(m) => PyValueError::new_err(format!("{place}: {m}")),
            Why::Python(e) => e,
        }
    })
}

/// What is wrong with a value, and where (innermost segment first: `.when`, `[2]`).
struct Bad {
    path: Vec<String>,
    why: Why,
}

enum Why {
    Type(String),
    Value(String),
    Python(PyErr),
}

impl Bad {
    fn new(why: Why) -> Bad {
        Bad {
            path: Vec::new(),
            why,
        }
    }

    fn at(mut self, seg: String) -> Bad {
        self.path.push(seg);
        self
    }
}

impl From<PyErr> for Bad {
    fn from(e: PyErr) -> Bad {
        Bad::new(Why::Python(e))
    }
}

fn convert(v: &Bound<'_, PyAny>, depth: usize) -> Result<Value, Bad> {
    if depth > MAX_DEPTH {
        return Err(Bad::new(Why::Value(format!(
            "nested more than {MAX_DEPTH} levels deep"
        ))));
    }
    if v.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = v.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if let Ok(i) = v.cast::<PyInt>() {
        if let Ok(n) = i.extract::<i64>() {
            return Ok(Value::from(n));
        }
        if let Ok(n) = i.extract::<u64>() {
            return Ok(Value::from(n));
        }
        return Err(Bad::new(Why::Value(
            "the integer does not fit in 64 bits".into(),
        )));
    }
    if let Ok(f) = v.cast::<PyFloat>() {
        let x = f.value();
        return Number::from_f64(x).map(Value::Number).ok_or_else(|| {
            Bad::new(Why::Value(format!(
                "{x} is not a JSON number (NaN or infinite)"
            )))
        });
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(Value::String(s.to_cow()?.into_owned()));
    }
    if let Ok(d) = v.cast::<PyDict>() {
        let mut m = Map::with_capacity(d.len());
        for (k, x) in d.iter() {
            let Ok(key) = k.cast::<PyString>() else {
                return Err(Bad::new(Why::Type(format!(
                    "a key of type {} is not JSON-compatible (keys are str)",
                    type_name(&k)
                ))));
            };
            let key = key.to_cow()?.into_owned();
            match convert(&x, depth + 1) {
                Ok(val) => {
                    m.insert(key, val);
                }
                Err(bad) => return Err(bad.at(format!(".{key}"))),
            }
        }
        return Ok(Value::Object(m));
    }
    if let Ok(l) = v.cast::<PyList>() {
        return array(l.iter(), l.len(), depth);
    }
    if let Ok(t) = v.cast::<PyTuple>() {
        return array(t.iter(), t.len(), depth);
    }
    Err(Bad::new(Why::Type(format!(
        "a value of type {} is not JSON-compatible (use dict, list, str, int, float, bool or None)",
        type_name(v)
    ))))
}

fn array<'py>(
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    len: usize,
    depth: usize,
) -> Result<Value, Bad> {
    let mut out = Vec::with_capacity(len);
    for (i, x) in items.enumerate() {
        out.push(convert(&x, depth + 1).map_err(|bad| bad.at(format!("[{i}]")))?);
    }
    Ok(Value::Array(out))
}

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// JSON as Python objects (dicts keep the JSON's key order).
fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(a) => {
            let l = PyList::empty(py);
            for x in a {
                l.append(to_py(py, x)?)?;
            }
            l.into_any()
        }
        Value::Object(m) => {
            let d = PyDict::new(py);
            for (k, x) in m {
                d.set_item(k, to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The runtime.

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
struct PyRuntime {
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

// ---------------------------------------------------------------------------------------------
// The call.

/// One live call (a `CallSession`).
#[pyclass(module = "midcall._native", name = "Call", frozen)]
struct PyCall {
    session: CallSession,
    started: Instant,
}

impl std::fmt::Debug for PyCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.session.fmt(f)
    }
}

#[pymethods]
impl PyCall {
    #[getter]
    fn id(&self) -> String {
        self.session.info().id
    }

    /// The call's facts (id, agent_id, tenant, numbers, started_at) as a dict.
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = serde_json::to_value(self.session.info()).unwrap_or(Value::Null);
        to_py(py, &v)
    }

    /// The conversation variables now, one nested dict (a copy).
    #[getter]
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = self.session.state_value();
        to_py(py, &v)
    }

    /// The transcript now, a list of turn dicts (a copy).
    #[getter]
    fn transcript<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.session.transcript().to_value())
    }

    /// Tool calls started and not yet ended.
    #[getter]
    fn running(&self) -> usize {
        self.session.running()
    }

    /// Every ended tool call's outcome, in the order they ended.
    fn records(&self) -> Vec<PyOutcome> {
        self.session.records().into_iter().map(PyOutcome).collect()
    }

    /// Appends a turn: role "user" (the caller) or "ai" / "assistant" / "agent".
    fn add_turn(&self, role: &str, text: &str) -> PyResult<()> {
        let at = time::rfc3339_ms(time::now_ms());
        let turn = match role {
            "user" | "caller" => Turn::user(text, at),
            "ai" | "assistant" | "agent" => Turn::ai(text, at, None, None),
            other => {
                return Err(PyValueError::new_err(format!(
                    "add_turn(role={other:?}): use \"user\" or \"ai\""
                )))
            }
        };
        self.session.add_turn(turn);
        Ok(())
    }

    /// Sets one variable by dotted path (`call_outcome`, `customer.tier`).
    fn set(&self, path: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let v = to_json(value, &format!("set({path:?})"))?;
        let p = midcall::StatePath::parse(path)
            .map_err(|e| PyValueError::new_err(format!("set({path:?}): {e}")))?;
        self.session
            .set(&p, v)
            .map_err(|e| PyValueError::new_err(format!("set({path:?}): {e}")))
    }

    /// Starts the tool call: the outcome now (a cache hit, an unknown tool), or an asyncio
    /// future of `waker`'s loop that the waker completes.
    #[pyo3(signature = (name, arguments, tool_call_id, budget_ms, on_filler, waker))]
    #[allow(clippy::too_many_arguments)]
    fn tool<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        arguments: Option<&Bound<'py, PyAny>>,
        tool_call_id: Option<String>,
        budget_ms: Option<u64>,
        on_filler: Option<Py<PyAny>>,
        waker: &Bound<'py, Waker>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let args = match arguments {
            Some(a) => to_json(a, "arguments")?,
            None => Value::Object(Map::new()),
        };
        let ms = budget_ms.unwrap_or(DEFAULT_BUDGET_MS);
        if ms == 0 || ms > MAX_BUDGET_MS {
            return Err(PyValueError::new_err(format!(
                "tool({name:?}, budget_ms={ms}): 1 to {MAX_BUDGET_MS}"
            )));
        }
        if let Some(cb) = &on_filler {
            if !cb.bind(py).is_callable() {
                return Err(PyTypeError::new_err(format!(
                    "tool({name:?}, on_filler=...): must be callable"
                )));
            }
        }
        let call = ToolCall {
            id: tool_call_id,
            args,
        };
        let budget = Budget::new(Duration::from_millis(ms));
        // Rendering, validating and spawning run without the GIL: other Python threads go on.
        let session = &self.session;
        let mut handle = py.detach(|| {
            let _enter = tokio().enter();
            session.tool(name, call, budget)
        });
        if let Some(cb) = on_filler {
            let q = waker.get().queue.clone();
            handle = handle.on_filler(move |line: &str| q.push(Done::Filler(cb, line.to_string())));
        }
        // A fresh cache hit or a refusal has ended already: no task, no future.
        if let Some(o) = (&mut handle).now_or_never() {
            return Ok(Bound::new(py, PyOutcome(o))?.into_any());
        }
        // Cancelling the asyncio task awaiting it aborts the task holding the handle:
        // dropping the handle is the session's cancel.
        spawn(py, waker, async move {
            let o = handle.await;
            done(move |py| Ok(Bound::new(py, PyOutcome(o))?.into_any().unbind()))
        })
    }

    /// Sends the calls held for the end of the turn (`hold = "end_of_turn"`).
    fn end_turn(&self) {
        let _enter = tokio().enter();
        self.session.end_turn();
    }

    /// The caller talked over the agent: held calls are discarded, running ones follow their
    /// `on_interrupt`.
    fn barge_in(&self) {
        let _enter = tokio().enter();
        self.session.barge_in();
    }

    /// Ends the call: an awaitable of the automation runs it queued.
    #[pyo3(signature = (reason, outcome, waker))]
    fn end<'py>(
        &self,
        py: Python<'py>,
        reason: String,
        outcome: Option<String>,
        waker: &Bound<'py, Waker>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut end = CallEnd::new(self.started.elapsed(), reason);
        if let Some(o) = outcome {
            end = end.outcome(o);
        }
        let session = self.session.clone();
        spawn(py, waker, async move {
            let r = session.end(end).await;
            done(move |py| match r {
                Ok(runs) => Ok(runs.into_pyobject(py)?.into_any().unbind()),
                Err(e) => Err(PyRuntimeError::new_err(e.to_string())),
            })
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "midcall.Call(id={:?}, running={})",
            self.session.info().id,
            self.session.running()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Waking the event loop.
//
// A tool call's outcome and its filler line come back to Python through one queue per event
// loop and one socket the loop watches (`loop.add_reader`): the runtime's threads push and,
// when the queue was empty, write a byte; the loop drains everything queued in one callback.
// No runtime thread ever takes the GIL for a tool call (so none can block on it, or touch an
// interpreter that is exiting), and at high concurrency one wake-up delivers many outcomes.

/// Makes a future's result (or exception) once the loop holds the GIL.
type Make = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

enum Done {
    /// Complete this asyncio future.
    Ready(Py<PyAny>, Make),
    /// Call this filler callback with the line.
    Filler(Py<PyAny>, String),
}

fn done(f: impl FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send + 'static) -> Make {
    Box::new(f)
}

/// Runs `work` on the runtime; returns an asyncio future of `waker`'s loop that the waker
/// completes with what `work` makes. A cancel of the future aborts `work` (dropping it).
fn spawn<'py>(
    py: Python<'py>,
    waker: &Bound<'py, Waker>,
    work: impl std::future::Future<Output = Make> + Send + 'static,
) -> PyResult<Bound<'py, PyAny>> {
    // The waker holds its loop weakly (a weakref.ref), so a closed loop can be collected.
    let event_loop = waker.get().event_loop.bind(py).call0()?;
    if event_loop.is_none() {
        return Err(PyRuntimeError::new_err("the event loop is gone"));
    }
    let fut = event_loop.call_method0("create_future")?;
    let target = fut.clone().unbind();
    let queue = waker.get().queue.clone();
    let task = tokio().spawn(async move {
        let make = work.await;
        queue.push(Done::Ready(target, make));
    });
    fut.call_method1("add_done_callback", (AbortOnCancel(task.abort_handle()),))?;
    Ok(fut)
}

struct Queue {
    items: std::sync::Mutex<Vec<Done>>,
    tx: std::os::unix::net::UnixStream,
}

impl Queue {
    fn push(&self, d: Done) {
        let first = {
            let mut q = self.items.lock().unwrap_or_else(|e| e.into_inner());
            q.push(d);
            q.len() == 1
        };
        if first {
            // Full means a wake-up is already pending; either way the loop will drain.
            let _ = std::io::Write::write(&mut &self.tx, &[1]);
        }
    }
}

/// The wake-up queue of one asyncio event loop (made by the Python layer, once per loop).
#[pyclass(module = "midcall._native", name = "Waker", frozen)]
struct Waker {
    queue: Arc<Queue>,
    rx: std::os::unix::net::UnixStream,
    /// `weakref.ref(loop)`.
    event_loop: Py<PyAny>,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker").finish_non_exhaustive()
    }
}

#[pymethods]
impl Waker {
    #[new]
    fn new(event_loop: Py<PyAny>) -> PyResult<Self> {
        let (rx, tx) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| PyRuntimeError::new_err(format!("wake-up socket: {e}")))?;
        rx.set_nonblocking(true)
            .and_then(|_| tx.set_nonblocking(true))
            .map_err(|e| PyRuntimeError::new_err(format!("wake-up socket: {e}")))?;
        Ok(Waker {
            queue: Arc::new(Queue {
                items: std::sync::Mutex::new(Vec::new()),
                tx,
            }),
            rx,
            event_loop,
        })
    }

    /// The socket the loop watches.
    fn fileno(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(&self.rx)
    }

    /// Called by the loop when the socket is readable: completes every queued future and
    /// calls every queued filler callback.
    fn drain(&self, py: Python<'_>) {
        let mut buf = [0u8; 256];
        while matches!(std::io::Read::read(&mut &self.rx, &mut buf), Ok(n) if n > 0) {}
        let items =
            std::mem::take(&mut *self.queue.items.lock().unwrap_or_else(|e| e.into_inner()));
        for d in items {
            let r = match d {
                Done::Ready(fut, make) => {
                    let fut = fut.bind(py);
                    match fut.call_method0("done") {
                        Ok(d) if d.is_truthy().unwrap_or(true) => Ok(()),
                        _ => match make(py) {
                            Ok(v) => fut.call_method1("set_result", (v,)).map(|_| ()),
                            Err(e) => fut
                                .call_method1("set_exception", (e.value(py),))
                                .map(|_| ()),
                        },
                    }
                }
                Done::Filler(cb, line) => cb.call1(py, (line,)).map(|_| ()),
            };
            if let Err(e) = r {
                // A filler callback raised: report it as asyncio reports a callback's error.
                e.write_unraisable(py, None);
            }
        }
    }
}

/// `add_done_callback` of a tool call's future: a cancel aborts the task holding the handle.
#[pyclass(module = "midcall._native", frozen)]
struct AbortOnCancel(tokio::task::AbortHandle);

impl std::fmt::Debug for AbortOnCancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AbortOnCancel")
    }
}

#[pymethods]
impl AbortOnCancel {
    fn __call__(&self, fut: &Bound<'_, PyAny>) -> PyResult<()> {
        if fut.call_method0("cancelled")?.is_truthy()? {
            self.0.abort();
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The outcome.

/// How one tool call ended.
#[pyclass(module = "midcall._native", name = "Outcome", frozen)]
#[derive(Debug)]
struct PyOutcome(midcall::Outcome);

#[pymethods]
impl PyOutcome {
    /// "ok", "timed_out", "http_error", "cancelled", ... (the CLI's JSON strings).
    #[getter]
    fn status(&self) -> &'static str {
        self.0.status.as_str()
    }

    /// Whether the status counts as success ("ok", "stale").
    #[getter]
    fn ok(&self) -> bool {
        self.0.status.is_success()
    }

    #[getter]
    fn action(&self) -> &str {
        &self.0.action
    }

    #[getter]
    fn tool_call_id(&self) -> Option<&str> {
        self.0.tool_call_id.as_deref()
    }

    /// The values written to state, keyed by state path.
    #[getter]
    fn values<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &midcall::exec::values_json(&self.0.values))
    }

    /// The compact result to give the model.
    #[getter]
    fn llm_result<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.0.llm_result)
    }

    /// The line to say (the fallback's, on failure).
    #[getter]
    fn say(&self) -> Option<&str> {
        self.0.say.as_deref()
    }

    #[getter]
    fn filler_fired(&self) -> bool {
        self.0.filler_fired
    }

    /// "hit", "miss", "stale", "bypass", ...
    #[getter]
    fn cache(&self) -> String {
        self.0.cache.as_str().to_string()
    }

    #[getter]
    fn deduplicated(&self) -> bool {
        self.0.deduplicated
    }

    #[getter]
    fn detached(&self) -> bool {
        self.0.detached
    }

    #[getter]
    fn http_status(&self) -> Option<u16> {
        self.0.http_status
    }

    #[getter]
    fn attempts(&self) -> u32 {
        self.0.attempts
    }

    #[getter]
    fn elapsed_ms(&self) -> f64 {
        (self.0.timings.total.as_micros() as f64) / 1000.0
    }

    /// Why it did not succeed (None on success).
    #[getter]
    fn error(&self) -> Option<String> {
        self.0.error.as_ref().map(|e| e.to_string())
    }

    /// The outcome as the CLI's JSON object (`midcall exec --json`), as a dict.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.0.to_json())
    }

    /// The outcome as the CLI's JSON text.
    fn to_json(&self) -> String {
        self.0.to_json().to_string()
    }

    fn __repr__(&self) -> String {
        let mut s = format!(
            "midcall.Outcome(action={:?}, status={:?}",
            self.0.action,
            self.0.status.as_str()
        );
        if let Some(h) = self.0.http_status {
            s.push_str(&format!(", http_status={h}"));
        }
        s.push_str(&format!(
            ", elapsed_ms={:.3}, cache={:?}",
            self.elapsed_ms(),
            self.0.cache.as_str()
        ));
        if self.0.deduplicated {
            s.push_str(", deduplicated=True");
        }
        s.push(')');
        s
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    if RUNTIME.get().is_none() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("midcall-worker")
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("starting midcall's runtime: {e}")))?;
        // A second import in the same process (a subinterpreter) keeps the first runtime.
        let _ = RUNTIME.set(rt);
    }
    m.add_class::<PyRuntime>()?;
    m.add_class::<PyCall>()?;
    m.add_class::<PyOutcome>()?;
    m.add_class::<Waker>()?;
    m.add("ConfigError", m.py().get_type::<ConfigError>())?;
    m.add("DEFAULT_BUDGET_MS", DEFAULT_BUDGET_MS)?;
    Ok(())
}
