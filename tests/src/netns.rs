//! Named network namespaces (`ip netns`), removed on drop.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::{Cgroup, Child};

/// A named network namespace. Dropping it kills whatever still runs inside
/// (so the kernel can really free it) and deletes the name.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace with `ip netns add NAME`. Fails if it exists:
    /// names carry a unique suffix, so an existing one is someone else's.
    pub fn new(name: &str) -> Result<Self> {
        if !is_valid_name(name) {
            bail!("invalid netns name {name:?} (use [A-Za-z0-9._-], at most 64 chars)");
        }
        run(Command::new("ip").args(["netns", "add", name]))?;
        Ok(Self {
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside this namespace
    /// (`ip netns exec NAME program`); add arguments to it as usual.
    pub fn exec(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `ip -n NAME ARGS...` and fails with its stderr if it fails.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Starts `cmd` (program, arguments, environment and working directory
    /// are taken from it) inside this namespace and, if given, `cgroup`.
    ///
    /// The forked child joins the cgroup before it execs anything, so no
    /// user code (and no socket) ever exists outside it; `ip netns exec`
    /// then enters the namespace and execs the program in place, so the
    /// returned pid is the program's own.
    ///
    /// Stdio: stdin is null, stdout is piped (read it with
    /// [`Child::take_stdout`], [`crate::wait_ready`] or
    /// [`Child::wait_output`]), stderr is inherited.
    pub fn spawn(&self, cgroup: Option<&Cgroup>, cmd: &Command) -> Result<Child> {
        let mut outer = self.wrap(cmd);
        if let Some(cgroup) = cgroup {
            let procs = cgroup.path().join("cgroup.procs");
            let procs = CString::new(procs.as_os_str().as_bytes())?;
            // SAFETY: the hook only makes async-signal-safe calls, as
            // required between fork and exec.
            unsafe {
                outer.pre_exec(move || join_cgroup(&procs));
            }
        }
        let label = format!("{} in {}", cmd.get_program().to_string_lossy(), self.name);
        let child = outer.spawn().with_context(|| format!("spawning {label}"))?;
        Ok(Child::new(child, label))
    }

    /// Pids of the processes whose network namespace is this one.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let out = run(Command::new("ip").args(["netns", "pids", &self.name]))?;
        Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    fn wrap(&self, cmd: &Command) -> Command {
        let mut outer = self.exec(cmd.get_program());
        outer.args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(value) => outer.env(key, value),
                None => outer.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            outer.current_dir(dir);
        }
        outer
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        outer
    }

    /// A namespace lives on while any process is in it, so deleting the name
    /// alone would leave its interfaces (and addresses) behind.
    fn kill_all(&self) -> Result<()> {
        for pid in self.pids()? {
            let pid = nix::unistd::Pid::from_raw(pid);
            // ESRCH only means it already exited.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = self.kill_all() {
            eprintln!(
                "headway-testbed: killing processes in netns {}: {e:#}",
                self.name
            );
        }
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("headway-testbed: deleting netns {}: {e:#}", self.name);
        }
    }
}

/// Netns names become file names under /run/netns.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is given
/// ("0" means "myself"). Runs between fork and exec: raw syscalls only.
fn join_cgroup(procs: &CString) -> io::Result<()> {
    // SAFETY: plain syscalls on a valid NUL-terminated path and buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(err);
        }
    }
    Ok(())
}

/// Runs a short command to completion; its stdout on success, its stderr in
/// the error otherwise.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
