//! Thread priority: an option for the embedder. A voice agent's process is never idle (audio,
//! speech models, token streams); under that load a timer that should end a tool call at its
//! deadline, or fire its filler line, waits for a CPU slice. Giving the runtime's worker
//! threads a better nice value than the CPU-bound work beside them is how the operating
//! system is told which should win.

/// Sets the calling thread's nice value (-20 = most favoured, 19 = least; 0 is the default).
/// Call it from your tokio runtime's `on_thread_start`:
///
/// ```no_run
/// let rt = tokio::runtime::Builder::new_multi_thread()
///     .enable_all()
///     .on_thread_start(|| {
///         // Below 0 needs CAP_SYS_NICE (or root); the error says so, and the thread keeps 0.
///         let _ = midcall::exec::set_thread_nice(-10);
///     })
///     .build()
///     .unwrap();
/// ```
///
/// Linux only (elsewhere: `ErrorKind::Unsupported`). It changes this thread alone, not the
/// process.
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    if !(-20..=19).contains(&nice) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("nice value {nice} is out of range (-20 to 19)"),
        ));
    }
    set(nice)
}

#[cfg(target_os = "linux")]
fn set(nice: i32) -> std::io::Result<()> {
    // On Linux, PRIO_PROCESS with a thread id sets that thread's nice value.
    rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice)
        .map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn set(_nice: i32) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "thread priority is set on Linux only",
    ))
}
