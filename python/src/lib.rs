//! `midcall._native`: the Rust side of the Python package.
//!
//! The binding converts and delegates; it owns no logic. The agent file is loaded by
//! `ActionSet::load` and the runtime (egress, secrets, CA roots, outbox, mock) is built by
//! `midcall::Stack`; calls, tool calls and their outcomes are `midcall`'s own. What lives here
//! is conversion (Python values, options and errors) and the bridge between tokio and asyncio.
//!
//! One tokio runtime per process, on its own threads (`midcall-worker`), runs every tool call.
//! Results come back to asyncio through one wake-up queue per event loop (`Waker`: a socket
//! the loop watches), so no runtime thread ever takes the GIL. The Python layer in
//! `midcall/__init__.py` wraps these classes in `async def` methods, so what users get are
//! real coroutines (they work with `await` and with `asyncio.create_task`).
//!
//! Nothing a caller passes may crash the interpreter: every conversion is checked and names
//! the place of a bad value; the GIL is released while Rust loads, builds or runs.
//!
//! # Layout
//!
//! - `lib.rs`: the `#[pymodule]` and `ConfigError`.
//! - `convert.rs`: Python values to JSON and back, and the limits of that conversion.
//! - `runtime.rs`: `Runtime(...)`: its options, its build through `midcall::Stack`, starting calls.
//! - `call.rs`: `Call`: one live call's state, transcript and tool calls; the budget limits.
//! - `bridge.rs`: the tokio runtime, the asyncio futures and the `Waker` that completes them.
//! - `outcome.rs`: `Outcome`: how one tool call ended.

use pyo3::exceptions::PyException;
use pyo3::prelude::*;

mod bridge;
mod call;
mod convert;
mod outcome;
mod runtime;

pyo3::create_exception!(
    midcall,
    ConfigError,
    PyException,
    "The agent file cannot be used: the message is the located text `midcall check` prints."
);

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    bridge::start_runtime()?;
    m.add_class::<runtime::PyRuntime>()?;
    m.add_class::<call::PyCall>()?;
    m.add_class::<outcome::PyOutcome>()?;
    m.add_class::<bridge::Waker>()?;
    m.add("ConfigError", m.py().get_type::<ConfigError>())?;
    m.add("DEFAULT_BUDGET_MS", call::DEFAULT_BUDGET_MS)?;
    Ok(())
}
