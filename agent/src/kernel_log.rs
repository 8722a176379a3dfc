//! The kernel programs' log (aya-log): they write rare events (a connect
//! that failed open, a socket without storage; see the kernel crate's
//! `kernel_log`) to a ring buffer, and this task drains it into the
//! agent's log as the records arrive.
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

/// Starts forwarding `logger`'s records on the current runtime.
pub fn forward(logger: EbpfLogger<&'static dyn log::Log>) -> std::io::Result<()> {
    // SAFETY: the logger owns the ring buffer's fd, which stays open and
    // the same until the logger is dropped with the `AsyncFd`.
    let mut ring = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    tokio::spawn(async move {
        loop {
            match ring.readable_mut().await {
                Ok(mut ready) => {
                    ready.get_inner_mut().flush();
                    ready.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "stopped following the kernel programs' log");
                    return;
                }
            }
        }
    });
    Ok(())
}
