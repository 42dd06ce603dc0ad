//! The handle of one running tool call: a future of its outcome, its filler line, its cancel.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::{oneshot, watch};

use super::apply::cancelled;
use super::live::{interrupt, Interrupt};
use super::outcome::Outcome;

type FillerCallback = Box<dyn FnOnce(&str) + Send>;

/// The filler line of one tool call: a callback and a watch, each told once.
pub(crate) struct FillerSlot {
    signal: watch::Sender<FillerSignal>,
    callback: Mutex<Option<FillerCallback>>,
    /// Set when the tool call went on detached: its filler is nobody's any more.
    disarmed: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FillerSignal {
    Pending,
    Fired(String),
    Ended,
}

impl FillerSlot {
    pub(crate) fn disarm(&self) {
        self.disarmed
            .store(true, std::sync::atomic::Ordering::Release);
        self.end();
    }

    pub(crate) fn fire(&self, line: &str) {
        if self.disarmed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        self.signal
            .send_replace(FillerSignal::Fired(line.to_string()));
        let callback = self
            .callback
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(f) = callback {
            f(line);
        }
    }

    pub(crate) fn end(&self) {
        self.signal.send_if_modified(|s| {
            if *s == FillerSignal::Pending {
                *s = FillerSignal::Ended;
                true
            } else {
                false
            }
        });
    }
}

/// A running tool call: a future of its [`Outcome`], its filler line, and its cancel.
///
/// Dropping the handle before the outcome arrives cancels the tool call (the action's
/// `on_interrupt` policy applies); its end state is recorded in the session either way.
#[must_use = "a tool call is cancelled when its handle is dropped"]
pub struct ToolHandle {
    action: String,
    outcome: oneshot::Receiver<Outcome>,
    stop: Arc<Interrupt>,
    pub(crate) filler: Arc<FillerSlot>,
    done: bool,
}

impl std::fmt::Debug for ToolHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolHandle")
            .field("action", &self.action)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl ToolHandle {
    pub(crate) fn new(
        action: &str,
        outcome: oneshot::Receiver<Outcome>,
        stop: Arc<Interrupt>,
        ended: bool,
    ) -> ToolHandle {
        let initial = if ended {
            FillerSignal::Ended
        } else {
            FillerSignal::Pending
        };
        ToolHandle {
            action: action.to_string(),
            outcome,
            stop,
            filler: Arc::new(FillerSlot {
                signal: watch::channel(initial).0,
                callback: Mutex::new(None),
                disarmed: Default::default(),
            }),
            done: false,
        }
    }

    /// Calls `f` once with the filler line when the action is still running `filler.after_ms`
    /// after it started (at once if that has already happened). `f` runs on the runtime's
    /// task that runs the action: keep it short (hand the line to the speech pipeline).
    pub fn on_filler(self, f: impl FnOnce(&str) + Send + 'static) -> ToolHandle {
        let filler = self.filler.clone();
        let mut slot = filler.callback.lock().unwrap_or_else(|e| e.into_inner());
        let fired = match &*filler.signal.borrow() {
            FillerSignal::Fired(line) => Some(line.clone()),
            _ => None,
        };
        match fired {
            Some(line) => {
                drop(slot);
                f(&line);
            }
            None => *slot = Some(Box::new(f)),
        }
        self
    }

    /// The filler line once it fires, or `None` when the tool call ended without one.
    pub fn filler(&self) -> impl Future<Output = Option<String>> + Send + 'static {
        let mut rx = self.filler.signal.subscribe();
        async move {
            let s = rx.wait_for(|s| *s != FillerSignal::Pending).await.ok()?;
            match &*s {
                FillerSignal::Fired(line) => Some(line.clone()),
                _ => None,
            }
        }
    }

    /// Cancels the tool call: awaiting the handle gives `cancelled` at once (a `finish`
    /// action whose request is already sent completes detached and records its own end
    /// state). Does nothing once it has ended.
    pub fn cancel(&self) {
        interrupt(&self.stop, "cancelled by the caller");
    }
}

impl Future for ToolHandle {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = &mut *self;
        match Pin::new(&mut this.outcome).poll(cx) {
            Poll::Ready(r) => {
                this.done = true;
                Poll::Ready(r.unwrap_or_else(|_| {
                    // The task is gone without a word: its runtime is shutting down.
                    let f = cancelled(&this.action, "the runtime stopped");
                    super::apply::ended(&this.action, None, *f, None, None)
                }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for ToolHandle {
    fn drop(&mut self) {
        if !self.done {
            interrupt(&self.stop, "its handle was dropped");
        }
    }
}
