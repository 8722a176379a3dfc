//! Driving the `headway-peer` binary: servers in pods, clients in clients.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{Cgroup, Child, Cluster, NetNs};

const PEER: &str = "headway-peer";
/// Overrides where [`peer_bin`] looks (e.g. for an installed demo).
const PEER_ENV: &str = "HEADWAY_PEER";
/// Upper bound for one connect attempt of `headway-peer connect`
/// (2 s connect + 2 s answer), used to bound a whole run.
const ATTEMPT_BOUND: Duration = Duration::from_secs(4);

/// What `headway-peer connect --json` saw.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReport {
    /// Answering pod name -> number of attempts it answered.
    pub answers: BTreeMap<String, u64>,
    /// Attempts that got no answer.
    pub failures: u64,
    /// getpeername() of the socket after connect ("ip:port" or
    /// "[ip]:port") -> number of attempts; recorded whenever connect
    /// succeeded, even if no answer followed.
    pub peer_addrs: BTreeMap<String, u64>,
    /// Error message -> number of failed attempts, for diagnosis.
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
}

/// The `headway-peer` binary next to the running executable; see
/// [`sibling_bin`]. `HEADWAY_PEER=/path` overrides the search.
pub fn peer_bin() -> Result<PathBuf> {
    sibling_bin(PEER, PEER_ENV, "cargo build -p headway-testbed --bins")
}

/// A workspace binary `name`, found next to the running executable or in
/// its parent directory: integration tests run from target/<profile>/deps/,
/// binaries live in target/<profile>/. The env var `env` overrides the
/// search; `build` is the command to suggest when it is missing.
pub(crate) fn sibling_bin(name: &str, env: &str, build: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(path.into());
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    let dir = exe
        .parent()
        .context("current executable has no directory")?;
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{name} not found next to {} or in its parent directory; \
                 run `{build}` first (or set {env})",
                exe.display()
            )
        })
}

/// Waits until `child` prints `ready` (10 s at most); see [`Child::wait_ready`].
pub fn wait_ready(child: &mut Child) -> Result<()> {
    child.wait_ready()
}

/// Starts `headway-peer serve --name <pod> --port <port>` in every pod's
/// namespace (in no test cgroup: servers are not what headway steers) and
/// waits until all are listening. Dropping the children stops them.
pub fn start_pod_servers(cluster: &Cluster, port: u16) -> Result<Vec<Child>> {
    let bin = peer_bin()?;
    let mut servers = Vec::new();
    for pod in cluster.pods() {
        let mut cmd = Command::new(&bin);
        cmd.args(["serve", "--name", &pod.name, "--port", &port.to_string()]);
        let mut server = pod.ns().spawn(None, &cmd)?;
        server.wait_ready()?;
        servers.push(server);
    }
    Ok(servers)
}

/// Runs `headway-peer connect` in the namespace of client `client` (a
/// logical name) and, if given, `cgroup`: `count` sequential attempts to
/// `addr:port` over TCP, or UDP if `udp`.
pub fn run_client(
    cluster: &Cluster,
    client: &str,
    cgroup: Option<&Cgroup>,
    addr: IpAddr,
    port: u16,
    count: u32,
    udp: bool,
) -> Result<ConnectReport> {
    run_client_in(cluster.client_ns(client), cgroup, addr, port, count, udp)
}

/// [`run_client`] for any namespace (e.g. one the test made itself).
pub fn run_client_in(
    ns: &NetNs,
    cgroup: Option<&Cgroup>,
    addr: IpAddr,
    port: u16,
    count: u32,
    udp: bool,
) -> Result<ConnectReport> {
    let mut cmd = Command::new(peer_bin()?);
    cmd.args(["connect", "--json", "--addr", &addr.to_string()])
        .args(["--port", &port.to_string(), "--count", &count.to_string()]);
    if udp {
        cmd.arg("--udp");
    }
    let mut child = ns.spawn(cgroup, &cmd)?;
    let bound = ATTEMPT_BOUND * count + Duration::from_secs(10);
    let (status, stdout) = child.wait_output(bound)?;
    if !status.success() {
        bail!("{} failed ({status}); stdout: {stdout}", child.label());
    }
    serde_json::from_str(&stdout).with_context(|| format!("parsing connect report {stdout:?}"))
}
