//! The asyncio bridge: the process's tokio runtime, and the futures and wake-up queue that bring
//! its results back to an event loop.
//!
//! A tool call's outcome and its filler line come back to Python through one queue per event
//! loop and one socket the loop watches (`loop.add_reader`): the runtime's threads push and,
//! when the queue was empty, write a byte; the loop drains everything queued in one callback.
//! No runtime thread ever takes the GIL for a tool call (so none can block on it, or touch an
//! interpreter that is exiting), and at high concurrency one wake-up delivers many outcomes.

use std::sync::Arc;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// The process's runtime, started when the module is imported.
static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

/// Starts the process's runtime unless an earlier import did.
pub(crate) fn start_runtime() -> PyResult<()> {
    if RUNTIME.get().is_none() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("midcall-worker")
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("starting midcall's runtime: {e}")))?;
        // A second import in the same process (a subinterpreter) keeps the first runtime.
        let _ = RUNTIME.set(rt);
    }
    Ok(())
}

pub(crate) fn tokio() -> &'static tokio::runtime::Runtime {
    RUNTIME
        .get()
        .expect("the runtime is started when midcall._native is imported")
}

/// Makes a future's result (or exception) once the loop holds the GIL.
pub(crate) type Make = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

pub(crate) enum Done {
    /// Complete this asyncio future.
    Ready(Py<PyAny>, Make),
    /// Call this filler callback with the line.
    Filler(Py<PyAny>, String),
}

pub(crate) fn done(f: impl FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send + 'static) -> Make {
    Box::new(f)
}

/// Runs `work` on the runtime; returns an asyncio future of `waker`'s loop that the waker
/// completes with what `work` makes. A cancel of the future aborts `work` (dropping it).
pub(crate) fn spawn<'py>(
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

pub(crate) struct Queue {
    items: std::sync::Mutex<Vec<Done>>,
    tx: std::os::unix::net::UnixStream,
}

impl Queue {
    pub(crate) fn push(&self, d: Done) {
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
pub(crate) struct Waker {
    pub(crate) queue: Arc<Queue>,
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
