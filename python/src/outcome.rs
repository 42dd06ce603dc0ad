//! The `Outcome` object: how one tool call ended, read field by field or as the CLI's JSON.

use pyo3::prelude::*;

use crate::convert::to_py;

/// How one tool call ended.
#[pyclass(module = "midcall._native", name = "Outcome", frozen)]
#[derive(Debug)]
pub(crate) struct PyOutcome(pub(crate) midcall::Outcome);

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
