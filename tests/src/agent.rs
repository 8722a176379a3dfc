//! Driving the `headway` binary from tests and the demo: a private bpffs
//! instance for its pins, the agent as a child process, and readers for
//! what it pinned (`headway status --json`, `bpftool map dump pinned`).
use std::{
    collections::BTreeMap,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Child, NetNs, unique_suffix};

const HEADWAY: &str = "headway";
/// Overrides where [`headway_bin`] looks.
const HEADWAY_ENV: &str = "HEADWAY_BIN";

/// The `headway` binary next to the running executable (see `peer_bin`).
pub fn headway_bin() -> Result<PathBuf> {
    crate::peer::sibling_bin(HEADWAY, HEADWAY_ENV, "cargo build -p headway")
}

/// A bpffs instance of its own, mounted on a fresh directory, so a test's
/// pins never meet another run's (or a real agent's). Drop runs
/// `headway reset` on it, unmounts it and removes the directory.
pub struct Bpffs {
    dir: PathBuf,
}

impl Bpffs {
    pub fn new() -> Result<Bpffs> {
        let dir = std::env::temp_dir().join(format!("headway-bpffs-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .context("running mount")?;
        if !status.success() {
            let _ = std::fs::remove_dir(&dir);
            bail!("mount -t bpf on {} failed: {status}", dir.display());
        }
        Ok(Bpffs { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `<bpffs>/headway/<name>`
    pub fn pin(&self, name: &str) -> PathBuf {
        self.dir.join("headway").join(name)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if let Ok(bin) = headway_bin() {
            let _ = Command::new(bin)
                .arg("reset")
                .arg("--bpffs")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .status();
        }
        match Command::new("umount").arg(&self.dir).status() {
            Ok(s) if s.success() => {
                let _ = std::fs::remove_dir(&self.dir);
            }
            other => eprintln!(
                "headway-testbed: umount {} failed: {other:?}",
                self.dir.display()
            ),
        }
    }
}

/// Where the agent under test reads the cluster from.
#[derive(Clone, Debug)]
pub enum Source {
    /// `--source dir:PATH`
    Dir(PathBuf),
    /// `--source kube --kubeconfig PATH` (e.g. [`crate::FakeApi::write_kubeconfig`]).
    Kube(PathBuf),
}

impl Source {
    fn args(&self) -> Vec<String> {
        match self {
            Source::Dir(dir) => vec![format!("--source=dir:{}", dir.display())],
            Source::Kube(kubeconfig) => vec![
                "--source=kube".into(),
                format!("--kubeconfig={}", kubeconfig.display()),
            ],
        }
    }
}

fn agent_command(
    bin: &Path,
    source: &Source,
    cgroup: &Path,
    bpffs: &Bpffs,
    extra: &[&str],
) -> Result<Command> {
    let mut cmd = Command::new(bin);
    cmd.arg("agent")
        .args(source.args())
        .arg("--cgroup-path")
        .arg(cgroup)
        .arg("--bpffs")
        .arg(bpffs.path())
        .args(extra);
    if !extra.iter().any(|a| a.starts_with("--metrics-addr")) {
        // Any free loopback port, so agents of different tests never clash.
        cmd.arg("--metrics-addr=127.0.0.1:0");
    }
    cmd.stdin(Stdio::null())
        // Piped so `Child::wait_output` can collect it; the agent logs to
        // stderr, which the test shows.
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    Ok(cmd)
}

/// A running `headway agent`. Drop kills it (SIGKILL); [`Agent::stop`] ends
/// it the way an operator would (SIGTERM) and checks it exited cleanly.
pub struct Agent {
    child: Child,
    /// The binary it runs (its `headway status` reads the pins its way).
    bin: PathBuf,
}

impl Agent {
    /// Starts `headway agent` with `--source dir:<manifests>`, attached to
    /// `cgroup`, pinning under `bpffs`; extra flags are appended.
    pub fn start(manifests: &Path, cgroup: &Path, bpffs: &Bpffs, extra: &[&str]) -> Result<Agent> {
        Agent::start_with(&Source::Dir(manifests.into()), cgroup, bpffs, extra)
    }

    /// Like [`Agent::start`] with any [`Source`].
    pub fn start_with(
        source: &Source,
        cgroup: &Path,
        bpffs: &Bpffs,
        extra: &[&str],
    ) -> Result<Agent> {
        Agent::start_bin(&headway_bin()?, source, cgroup, bpffs, extra)
    }

    /// Like [`Agent::start_with`], running the `headway` binary `bin`
    /// (another build, for comparisons).
    pub fn start_bin(
        bin: &Path,
        source: &Source,
        cgroup: &Path,
        bpffs: &Bpffs,
        extra: &[&str],
    ) -> Result<Agent> {
        let mut cmd = agent_command(bin, source, cgroup, bpffs, extra)?;
        let child = cmd.spawn().context("starting headway agent")?;
        Ok(Agent {
            child: Child::new(child, format!("headway agent ({})", bin.display())),
            bin: bin.to_path_buf(),
        })
    }

    /// Like [`Agent::start`], with the agent's stderr (its logs) written
    /// to the file `log` instead of the test's stderr.
    pub fn start_with_log(
        manifests: &Path,
        cgroup: &Path,
        bpffs: &Bpffs,
        extra: &[&str],
        log: &Path,
    ) -> Result<Agent> {
        let bin = headway_bin()?;
        let mut cmd = agent_command(&bin, &Source::Dir(manifests.into()), cgroup, bpffs, extra)?;
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stderr(file);
        let child = cmd.spawn().context("starting headway agent")?;
        Ok(Agent {
            child: Child::new(child, "headway agent".into()),
            bin,
        })
    }

    /// Like [`Agent::start`], but the agent runs in network namespace `ns`,
    /// which it then treats as the host's. Only the network namespace
    /// changes (`ip netns exec` would also remount /sys and hide the
    /// cgroup hierarchy from the agent).
    pub fn start_in(
        ns: &NetNs,
        manifests: &Path,
        cgroup: &Path,
        bpffs: &Bpffs,
        extra: &[&str],
    ) -> Result<Agent> {
        Agent::start_in_with(ns, &Source::Dir(manifests.into()), cgroup, bpffs, extra)
    }

    /// Like [`Agent::start_in`] with any [`Source`]. A kube source's API
    /// server must be reachable from `ns` (the fake one listens on the
    /// host's loopback: use [`Agent::start_with`] for it).
    pub fn start_in_with(
        ns: &NetNs,
        source: &Source,
        cgroup: &Path,
        bpffs: &Bpffs,
        extra: &[&str],
    ) -> Result<Agent> {
        let netns = std::fs::File::open(Path::new("/run/netns").join(ns.name()))
            .with_context(|| format!("opening netns {}", ns.name()))?;
        let bin = headway_bin()?;
        let mut cmd = agent_command(&bin, source, cgroup, bpffs, extra)?;
        let fd = netns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; `netns` outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting headway agent")?;
        drop(netns);
        Ok(Agent {
            child: Child::new(child, format!("headway agent in {}", ns.name())),
            bin,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The `headway` binary it runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub fn stop(mut self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("SIGTERM")?;
        let (status, _) = self.child.wait_output(Duration::from_secs(10))?;
        if !status.success() {
            bail!("headway agent exited with {status} after SIGTERM");
        }
        Ok(())
    }

    /// Fails if the agent has exited (e.g. it could not attach).
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("headway agent exited early: {status}");
        }
        Ok(())
    }
}

/// `headway status --json --bpffs <bpffs>`, parsed.
pub fn status_json(bpffs: &Bpffs) -> Result<Value> {
    status_json_of(&headway_bin()?, bpffs)
}

/// [`status_json`] as the `headway` binary `bin` reads the pins (the
/// build of the agent that wrote them, when builds are compared).
pub fn status_json_of(bin: &Path, bpffs: &Bpffs) -> Result<Value> {
    let out = Command::new(bin)
        .args(["status", "--json", "--bpffs"])
        .arg(bpffs.path())
        .output()
        .context("running headway status")?;
    if !out.status.success() {
        bail!(
            "headway status failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing headway status --json")
}

/// Polls `headway status --json` until `ready` holds for it (the agent
/// syncs asynchronously), or fails after `timeout` with the last status.
pub fn wait_for_status(
    bpffs: &Bpffs,
    agent: &mut Agent,
    timeout: Duration,
    ready: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        agent.check_running()?;
        if let Ok(status) = status_json_of(agent.bin(), bpffs) {
            if ready(&status) {
                return Ok(status);
            }
            last = Some(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("status never became ready within {timeout:?}; last: {last:#?}")
}

/// Reads `read` every 10 ms until `done` holds for what it read, or
/// `timeout` passes; returns the last read either way. The agent writes
/// one change as a sequence of map writes, and `headway status` can show
/// its end (a service gone) a moment before the last write (the pods it
/// named): a test that checks other maps after a status wait polls them
/// with this.
pub fn settle<T>(timeout: Duration, mut read: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let now = read();
        if done(&now) || Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `/readyz` on `port` until it answers 200, or fails after
/// `timeout`. Ready means the first sync is complete: every map written,
/// the DNS index (`dns_addrs`, which connect() reads an address's pod
/// from, written by a thread of its own) included. `headway status` shows
/// the pods before that, from `svc_endpoints`: a test that connects, or
/// resolves a name, right after the status shows them waits for this.
pub fn wait_ready(agent: &mut Agent, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        agent.check_running()?;
        match http_get(port, "/readyz") {
            Ok((200, _)) => return Ok(()),
            other => last = Some(other),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("/readyz never answered 200 within {timeout:?}; last: {last:?}")
}

/// `headway_syncs_total` of the agent serving metrics on `port`: the
/// syncs it has finished (counted after the last map write of each).
pub fn syncs(port: u16) -> Result<u64> {
    let (code, body) = http_get(port, "/metrics")?;
    if code != 200 {
        bail!("/metrics answered {code}: {body}");
    }
    let value = body
        .lines()
        .find_map(|l| l.strip_prefix("headway_syncs_total "))
        .with_context(|| format!("no headway_syncs_total in {body}"))?;
    Ok(value.trim().parse::<f64>()? as u64)
}

/// Waits until the `dir:`-source agent (manifests in `dir`, metrics on
/// `port`) has finished a sync that began after this call: what the
/// manifests said when it was called is then in every map, down to the
/// last write (`pods` removals, the DNS index). A change shows in
/// `headway status` in the middle of the agent's writes; a test that
/// acts on the datapath or reads other maps after a change calls this.
///
/// The agent syncs on any change in `dir`, one sync at a time, counting
/// each at its end. Twice: write a hidden file (a change that it does not
/// read, so every sync reads the same), and wait for the count to pass
/// what it was just before. The first round ends any sync running when it
/// started (the first one to finish after is that one); a sync that
/// finishes in the second round therefore began after this call.
pub fn wait_synced(agent: &mut Agent, port: u16, dir: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for round in 0..2 {
        let before = syncs(port)?;
        std::fs::write(
            dir.join(".headway-test-nudge"),
            format!("{} {round}\n", unique_suffix()),
        )
        .context("writing the nudge file")?;
        loop {
            agent.check_running()?;
            let now = syncs(port)?;
            if now > before {
                break;
            }
            if Instant::now() >= deadline {
                bail!("the agent did not sync within {timeout:?} (syncs {now})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// The pod id the datapath finds at `addr` now: the DNS index's entry
/// (`dns_addrs`), which connect() accounts and steers by, and which the
/// agent writes last for a change (after `svc_endpoints`, which `headway
/// status` shows, and `pod_addrs`). None: no entry, or no pod there.
pub fn indexed_pod(bpffs: &Bpffs, addr: std::net::IpAddr) -> Result<Option<u32>> {
    let maps = headway::pinned::Maps::open_pinned(bpffs.path())?;
    let key = headway::map_plan::addr_key(addr);
    // `headway_common::NO_POD`: the address has slots, but no pod.
    const NO_POD: u32 = u32::MAX;
    Ok(maps
        .dns_addrs
        .get(&key, 0)
        .ok()
        .map(|index| index.pod_id)
        .filter(|id| *id != NO_POD))
}

/// Whether the DNS index has caught up with the endpoints the maps list:
/// every address in `svc_endpoints` is in `pod_addrs`, and `dns_addrs`
/// gives it the same pod. The agent writes those three in that order, the
/// index last (in a first sync by a thread of its own), so this holds at
/// the end of a sync that added or kept addresses, and not in the middle
/// of one that adds them. For an agent whose /readyz a test cannot reach
/// (one in a network namespace).
pub fn index_caught_up(bpffs: &Bpffs) -> Result<bool> {
    let maps = headway::pinned::Maps::open_pinned(bpffs.path())?;
    let contents = maps.read_contents()?;
    Ok(contents.svc_endpoints.keys().all(|key| {
        let Some(pod) = contents.pod_addrs.get(&key.addr) else {
            return false;
        };
        maps.dns_addrs
            .get(&key.addr, 0)
            .is_ok_and(|index| index.pod_id == pod.pod_id)
    }))
}

/// The counters of pod `pod` under service `ns/service` in a status JSON.
pub fn pod_counters(status: &Value, ns: &str, service: &str, pod: &str) -> Option<Value> {
    status["services"]
        .as_array()?
        .iter()
        .find(|s| s["namespace"] == ns && s["name"] == service)?["pods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == pod)
        .map(|p| p["counters"].clone())
}

/// `bpftool -j map dump pinned <path>`: one `{"key", "value"}` object per
/// entry, with the named fields BTF gives (bpftool's "formatted" view).
pub fn bpftool_dump(path: &Path) -> Result<Vec<Value>> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .context("running bpftool (apt-get install bpftool)")?;
    if !out.status.success() {
        bail!(
            "bpftool map dump pinned {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let entries: Vec<Value> =
        serde_json::from_slice(&out.stdout).context("parsing bpftool JSON")?;
    entries
        .into_iter()
        .map(|e| {
            e.get("formatted").cloned().with_context(|| {
                format!("bpftool printed no named fields (is the map BTF-typed?): {e}")
            })
        })
        .collect()
}

/// Program names attached to `cgroup` (`bpftool cgroup show`), one entry
/// per attachment.
pub fn cgroup_programs(cgroup: &Path) -> Result<Vec<String>> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .context("running bpftool cgroup show")?;
    if !out.status.success() {
        bail!(
            "bpftool cgroup show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let entries: Vec<Value> =
        serde_json::from_slice(&out.stdout).context("parsing bpftool JSON")?;
    Ok(entries
        .iter()
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect())
}

/// The cookie of network namespace `ns` (what `bpf_get_netns_cookie`
/// returns for its sockets), read from a socket made inside it by a
/// thread that joins it.
pub fn netns_cookie(ns: &NetNs) -> Result<u64> {
    let path = Path::new("/run/netns").join(ns.name());
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::spawn(move || -> Result<u64> {
        // Only this thread moves; it ends right after.
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        headway::netns::current_netns_cookie().context("SO_NETNS_COOKIE")
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns cookie thread panicked"))?
}

/// `GET path` from the agent's HTTP endpoint on loopback; (status, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status: u16 = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A free TCP port on loopback (bound and released: good enough for tests).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One sample of a scrape: metric name, labels, value.
pub type Sample = (String, BTreeMap<String, String>, f64);

/// Parses an OpenMetrics exposition with the reference parser (the
/// `prometheus_client` Python package) into (name, labels, value) samples.
pub fn parse_openmetrics(text: &str) -> Result<Vec<Sample>> {
    const SCRIPT: &str = "import json, sys\n\
from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
out = [[s.name, s.labels, s.value] for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]\n\
print(json.dumps(out))\n";
    run_parser(SCRIPT, text)
}

/// Runs the Python `script` on `text` (stdin) and parses its JSON output.
fn run_parser<T: serde::de::DeserializeOwned>(script: &str, text: &str) -> Result<T> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running python3 (pip install prometheus_client)")?;
    child
        .stdin
        .take()
        .context("python stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "the OpenMetrics parser rejected the exposition: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing the parser's JSON")
}

/// The metric families of an OpenMetrics exposition, as (name, type), by
/// the reference parser: families without samples are listed too.
pub fn metric_families(text: &str) -> Result<Vec<(String, String)>> {
    const SCRIPT: &str = "import json, sys\n\
from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
print(json.dumps([[f.name, f.type] for f in text_string_to_metric_families(sys.stdin.read())]))\n";
    run_parser(SCRIPT, text)
}
