//! The workloads and the one load generator every contender gets: wrk
//! (Debian's `wrk`) against nginx in the pods, with a Lua script that
//! spreads wrk's threads over the target addresses and prints the result
//! as one JSON line.
use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context, bail};
use headway_testbed::{Cgroup, NetNs};
use serde::{Deserialize, Serialize};

/// The HTTP port of every pod (nginx), of the virtual IPs and of HAProxy.
pub const HTTP_PORT: u16 = 80;
/// Size of the file the bulk workload fetches over and over.
pub const BULK_BYTES: u64 = 64 << 20;
pub const BULK_PATH: &str = "/bulk/64m";

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// New connections: connect, one small request/response, close.
    Connect,
    /// Requests on persistent connections, many in flight.
    KeepAlive,
    /// One persistent connection, one request in flight: round-trip time.
    Latency,
    /// One connection fetching a large file: throughput.
    Bulk,
    /// Paired (not wrk): one client thread alternates requests over a
    /// direct, an A/A control and a headway keep-alive connection to the
    /// same pod (`paired.rs`).
    #[value(name = "paired-1conn")]
    #[serde(rename = "paired-1conn")]
    PairedOne,
    /// Paired under load: one such thread per pod, all at once.
    PairedLoad,
    /// Paired new connections: per cycle, each thread makes one new
    /// connection on each side (connect, one request with `Connection:
    /// close`, read until the pod closes), from sockets made beforehand in
    /// each side's cgroup.
    #[value(name = "paired-new")]
    #[serde(rename = "paired-new")]
    PairedNew,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::Connect,
        Workload::KeepAlive,
        Workload::Latency,
        Workload::Bulk,
        Workload::PairedOne,
        Workload::PairedLoad,
        Workload::PairedNew,
    ];
    /// The workloads wrk runs, once per contender.
    pub const WRK: [Workload; 4] = [
        Workload::Connect,
        Workload::KeepAlive,
        Workload::Latency,
        Workload::Bulk,
    ];

    /// Measured by the paired client, once per headway contender.
    pub fn is_paired(self) -> bool {
        matches!(
            self,
            Workload::PairedOne | Workload::PairedLoad | Workload::PairedNew
        )
    }

    pub fn id(self) -> &'static str {
        match self {
            Workload::Connect => "connect",
            Workload::KeepAlive => "keep-alive",
            Workload::Latency => "latency",
            Workload::Bulk => "bulk",
            Workload::PairedOne => "paired-1conn",
            Workload::PairedLoad => "paired-load",
            Workload::PairedNew => "paired-new",
        }
    }

    /// (wrk threads, connections). Threads are one per pod at least, so
    /// `direct` spreads over every pod like the balancers do.
    pub fn shape(self, pods: usize) -> (usize, usize) {
        match self {
            Workload::Connect | Workload::KeepAlive => (pods, pods * 4),
            Workload::Latency | Workload::Bulk => (1, 1),
            Workload::PairedOne | Workload::PairedLoad | Workload::PairedNew => {
                let t = super::paired::threads(self, pods);
                (t, 3 * t)
            }
        }
    }

    pub fn describe(self, pods: usize) -> String {
        let (t, c) = self.shape(pods);
        match self {
            Workload::Connect => {
                format!("wrk -t{t} -c{c}, `Connection: close`: every request on a new connection")
            }
            Workload::KeepAlive => format!("wrk -t{t} -c{c}, persistent connections"),
            Workload::Latency => {
                "wrk -t1 -c1: one persistent connection, one request at a time".into()
            }
            Workload::Bulk => format!(
                "wrk -t1 -c1 GET {BULK_PATH} ({} MiB, nginx sendfile), one persistent connection",
                BULK_BYTES >> 20
            ),
            Workload::PairedNew => {
                let t = super::paired::threads(self, pods);
                format!(
                    "paired client, {t} threads: per cycle and thread a new connection on each \
                     side (direct, A/A control, headway), in a random order; connect, one \
                     request with `Connection: close`, read until the pod closes; the direct \
                     and control sides go to a random pod per cycle under `random`, to the \
                     headway side's pod otherwise; sockets made beforehand; 1-s blocks"
                )
            }
            Workload::PairedOne | Workload::PairedLoad => {
                let (t, c) = self.shape(pods);
                format!(
                    "paired client, {t} thread{s}, {c} keep-alive connections: per thread a \
                     direct, an A/A control and a headway connection to the same pod, one \
                     request at a time, in a random order per cycle; 1-s blocks",
                    s = if t == 1 { "" } else { "s" }
                )
            }
        }
    }

    fn path(self) -> &'static str {
        match self {
            Workload::Bulk => BULK_PATH,
            _ => "/",
        }
    }
}

/// Where a contender's client sends its load: the host of the URL (a name
/// glibc resolves, or an address) and, optionally, a list of addresses
/// the threads spread over instead (`direct` lists the pods).
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub spread_over: Vec<String>,
    /// Every new connection goes to a random address of `spread_over`
    /// (the script's `response()` picks it), instead of each thread
    /// keeping one. Costs a Lua call per response.
    pub pick_per_connection: bool,
}

/// wrk's errors, by kind (wrk's own counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub status: u64,
    pub timeout: u64,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.status + self.timeout
    }
}

/// What one wrk run measured (the JSON line the script prints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub requests: u64,
    pub duration_us: u64,
    pub bytes: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: Errors,
}

impl Measured {
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / (self.duration_us as f64 / 1e6)
    }

    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / (self.duration_us as f64 / 1e6)
    }

    /// Finds the script's JSON line in wrk's stdout.
    pub fn parse(stdout: &str) -> anyhow::Result<Measured> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with("{\"requests\""))
            .with_context(|| format!("no result line in wrk's output:\n{stdout}"))?;
        serde_json::from_str(line).with_context(|| format!("parsing wrk result {line:?}"))
    }
}

/// The Lua script: threads take the target addresses in turn (from
/// `BENCH_TARGETS` if set, else what wrk resolved for the URL's host,
/// through glibc), and `done` prints the result as JSON.
pub const WRK_SCRIPT: &str = r#"-- headway bench (xtask/src/bench/workload.rs)
local addrs = nil
local next_thread = 0

local function target_addrs()
  local list = os.getenv("BENCH_TARGETS")
  if list == nil or list == "" then
    return wrk.addrs
  end
  local out = {}
  for host in string.gmatch(list, "%S+") do
    for _, addr in ipairs(wrk.lookup(host, os.getenv("BENCH_PORT"))) do
      table.insert(out, addr)
    end
  end
  return out
end

function setup(thread)
  if addrs == nil then
    addrs = target_addrs()
  end
  thread.addr = addrs[(next_thread % #addrs) + 1]
  thread:set("seed", os.time() * 1000 + next_thread)
  next_thread = next_thread + 1
end

-- BENCH_PICK=random: a client-side random balancer. wrk reconnects to
-- its thread's address right after it hands a response to response(),
-- so every new connection goes to an address drawn for it alone (drawn
-- in request() instead, the connections a thread reopens in one pass of
-- its event loop would all go to the same pod). Defined only then:
-- response() makes wrk hand over every response's headers and body.
if os.getenv("BENCH_PICK") == "random" then
  local pool = nil
  function init(args)
    pool = target_addrs()
    math.randomseed(wrk.thread:get("seed"))
  end
  function response(status, headers, body)
    wrk.thread.addr = pool[math.random(#pool)]
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%.1f,"p99_us":%.1f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"#;

/// Runs one workload with wrk inside `ns` and `cgroup` for `duration`.
pub fn run_wrk(
    ns: &NetNs,
    cgroup: &Cgroup,
    script: &Path,
    workload: Workload,
    pods: usize,
    target: &Target,
    duration: Duration,
) -> anyhow::Result<Measured> {
    let (threads, connections) = workload.shape(pods);
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .args(["--timeout", "2s", "-s"])
        .arg(script)
        .env("BENCH_TARGETS", target.spread_over.join(" "))
        .env(
            "BENCH_PICK",
            if target.pick_per_connection {
                "random"
            } else {
                "thread"
            },
        )
        .env("BENCH_PORT", HTTP_PORT.to_string());
    if workload == Workload::Connect {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!(
        "http://{}:{HTTP_PORT}{}",
        target.host,
        workload.path()
    ));
    let mut child = ns.spawn(Some(cgroup), &cmd)?;
    let (status, stdout) = child.wait_output(duration + Duration::from_secs(30))?;
    if !status.success() {
        bail!("wrk failed ({status}) in {}:\n{stdout}", ns.name());
    }
    Measured::parse(&stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_script_line_among_wrk_output() {
        let out = "Running 1s test @ http://10.77.0.10:80/\n  4 threads\n\
                   {\"requests\":2000,\"duration_us\":2000000,\"bytes\":300000,\
                   \"p50_us\":120.0,\"p99_us\":900.5,\"errors\":{\"connect\":0,\
                   \"read\":1,\"write\":0,\"status\":0,\"timeout\":2}}\n";
        let m = Measured::parse(out).unwrap();
        assert_eq!(m.requests_per_sec(), 1000.0);
        assert_eq!(m.bytes_per_sec(), 150_000.0);
        assert_eq!(m.p99_us, 900.5);
        assert_eq!(m.errors.total(), 3);
        assert!(Measured::parse("Running 1s test\n").is_err());
    }

    #[test]
    fn every_pod_gets_a_thread_where_load_is_spread() {
        assert_eq!(Workload::Connect.shape(4), (4, 16));
        assert_eq!(Workload::Latency.shape(4), (1, 1));
    }
}
