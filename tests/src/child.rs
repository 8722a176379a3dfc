//! Spawned processes that are killed and reaped on drop.

use std::io::{BufRead, BufReader, Read};
use std::process::{ChildStdout, ExitStatus};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// How long a server may take to print `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running process. Dropping it kills (SIGKILL) and reaps it, so a failing
/// test never leaves servers or clients behind.
#[derive(Debug)]
pub struct Child {
    inner: std::process::Child,
    label: String,
}

impl Child {
    pub fn new(inner: std::process::Child, label: String) -> Self {
        Self { inner, label }
    }

    pub fn id(&self) -> u32 {
        self.inner.id()
    }

    /// What this process is, for messages ("headway-peer in hwab12-web-0").
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Takes the piped stdout; `None` if already taken or not piped.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.inner.stdout.take()
    }

    /// The exit status if it has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.inner.try_wait()?)
    }

    /// Kills and reaps the process (no-op if it already exited).
    pub fn kill(&mut self) -> Result<()> {
        if self.inner.try_wait()?.is_none() {
            self.inner.kill()?;
            self.inner.wait()?;
        }
        Ok(())
    }

    /// Waits for exit and collects stdout. Kills the process and fails if it
    /// has not exited within `timeout`, so a hung client cannot hang a test.
    pub fn wait_output(&mut self, timeout: Duration) -> Result<(ExitStatus, String)> {
        let stdout = self
            .take_stdout()
            .context("stdout is not piped or already taken")?;
        let output = read_in_background(stdout);
        let status = self.wait_timeout(timeout)?;
        // The pipe closes when the process exits; the short grace period
        // only matters if it left a grandchild holding it open.
        let text = output
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("{}: stdout still open after exit", self.label))??;
        Ok((status, text))
    }

    /// Waits until the process prints a line `ready` on stdout. The rest of
    /// its stdout is copied to stderr (prefixed with the label) from then
    /// on, both for debugging and so the pipe never fills up and blocks it.
    pub fn wait_ready(&mut self) -> Result<()> {
        let stdout = self
            .take_stdout()
            .context("stdout is not piped or already taken")?;
        let ready = forward_lines(stdout, self.label.clone());
        if ready.recv_timeout(READY_TIMEOUT).is_ok() {
            return Ok(());
        }
        match self.try_wait()? {
            Some(status) => bail!("{} exited ({status}) before it was ready", self.label),
            None => bail!("{} not ready after {READY_TIMEOUT:?}", self.label),
        }
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.inner.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill()?;
                bail!("{} still running after {timeout:?}; killed", self.label);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!(
                "headway-testbed: killing {} (pid {}): {e:#}",
                self.label,
                self.id()
            );
        }
    }
}

/// Reads `stdout` to the end on a thread; the text arrives on the channel.
fn read_in_background(mut stdout: ChildStdout) -> mpsc::Receiver<Result<String>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        let result = stdout.read_to_string(&mut text).map(|_| text);
        let _ = tx.send(result.map_err(Into::into));
    });
    rx
}

/// Copies lines to stderr on a thread until EOF; signals the first `ready`.
fn forward_lines(stdout: ChildStdout, label: String) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim() == "ready" {
                let _ = tx.send(());
            } else {
                eprintln!("[{label}] {line}");
            }
        }
    });
    rx
}
