//! The `Call` object: one live call session, its state and transcript, and its tool calls.

use std::time::Duration;

use tokio::time::Instant;

use futures_util::FutureExt;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use serde_json::{Map, Value};

use midcall::exec::Budget;
use midcall::time;
use midcall::{CallEnd, CallSession, ToolCall, Turn};

use crate::bridge::{done, spawn, tokio, Done, Waker};
use crate::convert::{to_json, to_py};
use crate::outcome::PyOutcome;

/// The default turn budget of a tool call (the action's own `timeout_ms` still applies).
pub(crate) const DEFAULT_BUDGET_MS: u64 = 2000;
/// The longest budget a tool call may be given.
pub(crate) const MAX_BUDGET_MS: u64 = 600_000;

/// One live call (a `CallSession`).
#[pyclass(module = "midcall._native", name = "Call", frozen)]
pub(crate) struct PyCall {
    pub(crate) session: CallSession,
    pub(crate) started: Instant,
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
