//! Per-pod accounting on the real kernel: active TCP connections (from
//! sock_ops state changes) and payload bytes (cgroup_skb), compared with
//! what real clients in their own namespaces did, through
//! `headway status --json` and /metrics, across an agent restart and a pod
//! id handed to a new pod.
//!
//! Privileged: needs root (CI runs it as root). Every address lives in
//! namespaces the test creates; clients (and, where said, servers) run
//! inside the test's cgroup.
use std::{net::IpAddr, path::Path, time::Duration};

use headway_testbed::{
    Cgroup, Child, Cluster,
    agent::{
        Agent, Bpffs, bpftool_dump, free_port, http_get, parse_openmetrics, pod_counters,
        status_json, wait_for_status, wait_synced,
    },
    bulk::{Bulk, BulkReport, HEADER_LEN, run_bulk, start_holder, start_sinks},
    manifests::{HeadlessService, PodEndpoint},
    require_root, run_client,
};
use serde_json::Value;

const PORT: u16 = 8080;
const SYNC_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a closed connection may take to reach TCP_CLOSE (the peer's
/// FIN or ACK arrives asynchronously after the client process is gone).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

const KB: u64 = 1024;
const MB: u64 = 1024 * KB;

/// A headless `web` service in namespace `demo` with `pods` (IPv4 and IPv6
/// slices), written to `dir/web.yaml`.
fn write_manifests(dir: &Path, cluster: &Cluster, pods: &[&str]) {
    let mut web = HeadlessService::new("demo", "web").port("http", PORT);
    for name in pods {
        let pod = cluster.pod(name);
        let addrs = [pod.addr(false).unwrap(), pod.addr(true).unwrap()];
        web = web.endpoint(PodEndpoint::new(name, addrs));
    }
    web.write_to(dir).unwrap();
}

/// Cluster, cgroup, private bpffs and a running agent with /metrics.
struct Bed {
    cluster: Cluster,
    cg: Cgroup,
    bpffs: Bpffs,
    manifests: tempfile::TempDir,
    agent: Option<Agent>,
    metrics_port: u16,
}

impl Bed {
    /// Pods web-0..web-{n-1} (dual stack) and pod-like `client`; the
    /// service lists `listed` of them.
    fn new(name: &str, pods: usize, listed: &[&str]) -> Bed {
        let mut builder = Cluster::builder();
        for i in 0..pods {
            builder = builder.pod(
                &format!("web-{i}"),
                format!("10.77.0.{}", 10 + i).parse().unwrap(),
                Some(format!("fd77::{}", 10 + i).parse().unwrap()),
            );
        }
        let cluster = builder.client("client").build().expect("build the cluster");
        let cg = Cgroup::new(name).expect("create the test cgroup");
        let bpffs = Bpffs::new().expect("mount a private bpffs");
        let manifests = tempfile::tempdir().unwrap();
        write_manifests(manifests.path(), &cluster, listed);
        let mut bed = Bed {
            cluster,
            cg,
            bpffs,
            manifests,
            agent: None,
            metrics_port: free_port().unwrap(),
        };
        bed.start_agent();
        let n = listed.len();
        let agent = bed.agent.as_mut().unwrap();
        wait_for_status(&bed.bpffs, agent, SYNC_TIMEOUT, |s| web_pods(s) == n)
            .expect("the agent syncs the manifests");
        bed
    }

    /// Starts the agent and waits until it serves /metrics (then it has
    /// attached its programs and written the maps once).
    fn start_agent(&mut self) {
        let flag = format!("--metrics-addr=127.0.0.1:{}", self.metrics_port);
        let agent = Agent::start(self.manifests.path(), self.cg.path(), &self.bpffs, &[&flag])
            .expect("start the agent");
        let agent = self.agent.insert(agent);
        let deadline = std::time::Instant::now() + SYNC_TIMEOUT;
        while http_get(self.metrics_port, "/readyz").map(|r| r.0).ok() != Some(200) {
            agent.check_running().expect("the agent runs");
            assert!(
                std::time::Instant::now() < deadline,
                "agent not ready after {SYNC_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn addr(&self, pod: &str, ipv6: bool) -> IpAddr {
        self.cluster.pod(pod).addr(ipv6).unwrap()
    }

    fn client_ns(&self) -> &headway_testbed::NetNs {
        self.cluster.client_ns("client")
    }

    /// A bulk run from the client namespace, inside the cgroup; every
    /// exchange must complete.
    fn bulk(&self, pod: &str, ipv6: bool, bulk: Bulk) -> BulkReport {
        let addr = self.addr(pod, ipv6);
        let report = run_bulk(self.client_ns(), Some(&self.cg), addr, PORT, bulk)
            .expect("run the bulk client");
        assert_eq!(report.failures, 0, "bulk to {pod} ({addr}): {report:?}");
        assert_eq!(report.completed, u64::from(bulk.count), "{report:?}");
        report
    }

    /// `count` connections to `pod` held open by a client in the cgroup.
    fn hold(&self, pod: &str, ipv6: bool, count: u32) -> Child {
        start_holder(
            self.client_ns(),
            Some(&self.cg),
            self.addr(pod, ipv6),
            PORT,
            count,
            false,
        )
        .expect("hold connections open")
    }

    fn status(&self) -> Value {
        status_json(&self.bpffs).expect("headway status --json")
    }

    /// `(namespace demo, service web, pod) -> counters` as `headway status`
    /// reports them.
    fn counter(&self, pod: &str, field: &str) -> u64 {
        counter(&self.status(), pod, field)
    }

    /// Polls status until `field` of `pod` is `want` (closes land
    /// asynchronously), or fails with the last status.
    fn wait_counter(&self, pod: &str, field: &str, want: u64) {
        let deadline = std::time::Instant::now() + CLOSE_TIMEOUT;
        loop {
            let status = self.status();
            let got = counter(&status, pod, field);
            if got == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{pod}.{field} is {got}, want {want}: {status:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of metric `name` for pod `pod` of demo/web.
    fn metric(&self, name: &str, pod: &str) -> f64 {
        let (code, body) = http_get(self.metrics_port, "/metrics").unwrap();
        assert_eq!(code, 200, "{body}");
        let samples = parse_openmetrics(&body).unwrap();
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.get("pod").map(String::as_str) == Some(pod)
                    && l.get("service").map(String::as_str) == Some("web")
            })
            .unwrap_or_else(|| panic!("no {name} for {pod} in {body}"))
            .2
    }
}

fn web_pods(status: &Value) -> usize {
    status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .and_then(|s| s["pods"].as_array())
        .map_or(0, Vec::len)
}

fn counter(status: &Value, pod: &str, field: &str) -> u64 {
    let c = pod_counters(status, "demo", "web", pod)
        .unwrap_or_else(|| panic!("pod {pod} missing from status: {status:#}"));
    c[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{pod}.{field} missing or not a count: {c}"))
}

/// `counted` within 1% of `moved` (the issue's bound); both are printed so
/// the run shows how close they really are.
fn assert_within_1pct(what: &str, counted: u64, moved: u64) {
    eprintln!("{what}: counted {counted}, clients moved {moved}");
    let diff = counted.abs_diff(moved);
    assert!(
        diff * 100 <= moved,
        "{what}: counted {counted}, clients moved {moved} (off by {diff})"
    );
}

fn kill(mut child: Child) {
    child.kill().expect("kill the client");
}

#[test]
fn active_tcp_connections_are_exact_and_return_to_zero() {
    if !require_root("active_tcp_connections_are_exact_and_return_to_zero") {
        return;
    }
    let bed = Bed::new("acct-active", 2, &["web-0", "web-1"]);
    let _sinks = start_sinks(&bed.cluster, PORT, None).expect("start sinks");

    // Held open: 3 over IPv4 and 2 over IPv6 to web-0, 4 over IPv6 to web-1.
    let held = [
        bed.hold("web-0", false, 3),
        bed.hold("web-0", true, 2),
        bed.hold("web-1", true, 4),
    ];
    // A connection the server resets: "ready" comes after the client saw
    // the reset, so it has come and gone by now.
    let reset = start_holder(
        bed.client_ns(),
        Some(&bed.cg),
        bed.addr("web-1", false),
        PORT,
        1,
        true,
    )
    .expect("a connection the server resets");
    // A refused connect: never established, never active.
    let refused = run_client(
        &bed.cluster,
        "client",
        Some(&bed.cg),
        bed.addr("web-1", false),
        PORT + 1,
        2,
        false,
    )
    .unwrap();
    assert_eq!(refused.failures, 2, "{refused:?}");

    let status = bed.status();
    eprintln!(
        "held: web-0 active {} (want 5), web-1 active {} (want 4); web-1 tcp_connects {}",
        counter(&status, "web-0", "active_tcp"),
        counter(&status, "web-1", "active_tcp"),
        counter(&status, "web-1", "tcp_connects"),
    );
    assert_eq!(counter(&status, "web-0", "active_tcp"), 5, "{status:#}");
    assert_eq!(counter(&status, "web-1", "active_tcp"), 4, "{status:#}");
    // 4 held + 1 reset + 2 refused connect() calls.
    assert_eq!(counter(&status, "web-1", "tcp_connects"), 7, "{status:#}");
    assert_eq!(bed.metric("headway_active_connections", "web-0"), 5.0);
    assert_eq!(bed.metric("headway_active_connections", "web-1"), 4.0);

    // Short connections closed by the client first and by the server
    // first, while the others stay open: none of them is left counted.
    let quick = |server_closes| Bulk {
        up: 10 * KB,
        down: 10 * KB,
        count: 5,
        udp: false,
        server_closes,
    };
    bed.bulk("web-0", false, quick(false));
    bed.bulk("web-0", true, quick(true));
    bed.wait_counter("web-0", "active_tcp", 5);

    // Everyone closes (the holders exit): back to exactly zero.
    for child in held {
        kill(child);
    }
    kill(reset);
    bed.wait_counter("web-0", "active_tcp", 0);
    bed.wait_counter("web-1", "active_tcp", 0);
    assert_eq!(bed.metric("headway_active_connections", "web-0"), 0.0);
    assert_eq!(bed.metric("headway_active_connections", "web-1"), 0.0);
    // And stays there: nothing decremented twice (a wrapped counter would
    // show as a huge number).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(bed.counter("web-0", "active_tcp"), 0);
    assert_eq!(bed.counter("web-1", "active_tcp"), 0);
    // Every record those sockets took in the socket table went back with
    // them (given back on TCP_CLOSE, after the last bytes).
    let sockets = &bed.status()["sockets"];
    eprintln!("socket table: {sockets}");
    assert_eq!(sockets["in_use"], 0, "{sockets:#}");
    assert_eq!(sockets["taken"], sockets["freed"], "{sockets:#}");
    // 9 held, 1 reset, 10 short: one record each (a refused connect
    // never got one).
    assert_eq!(sockets["taken"], 20, "{sockets:#}");
}

#[test]
fn bytes_per_pod_match_what_the_clients_moved() {
    if !require_root("bytes_per_pod_match_what_the_clients_moved") {
        return;
    }
    // web-2 runs a sink but is no pod of the service: traffic to it is
    // nobody's.
    let bed = Bed::new("acct-bytes", 3, &["web-0", "web-1"]);
    let _sinks = start_sinks(&bed.cluster, PORT, None).expect("start sinks");

    // web-0 over IPv4: 1 MB up, 3 MB down in two connections.
    let tcp4 = bed.bulk(
        "web-0",
        false,
        Bulk {
            up: 512 * KB,
            down: 1536 * KB,
            count: 2,
            udp: false,
            server_closes: false,
        },
    );
    // web-1 over IPv6, the server closing first.
    let tcp6 = bed.bulk(
        "web-1",
        true,
        Bulk {
            up: MB,
            down: 3 * MB,
            count: 1,
            udp: false,
            server_closes: true,
        },
    );
    // web-1 over connected UDP (IPv4): 200 request/reply pairs.
    let udp = bed.bulk(
        "web-1",
        false,
        Bulk {
            up: 1000,
            down: 3000,
            count: 200,
            udp: true,
            server_closes: false,
        },
    );
    // One UDP socket connects to web-1, then to web-2, then back to
    // web-1: only what it exchanged while connected to web-1 counts.
    let (reconnect_sent, reconnect_received) = udp_reconnect(&bed);
    assert_eq!(tcp4.sent, MB + 2 * HEADER_LEN);
    assert_eq!(tcp4.received, 3 * MB);
    assert_eq!(udp.received, 200 * 3000);

    let status = bed.status();
    let web1_sent = tcp6.sent + udp.sent + reconnect_sent;
    let web1_received = tcp6.received + udp.received + reconnect_received;
    assert_within_1pct(
        "web-0 bytes_sent",
        counter(&status, "web-0", "bytes_sent"),
        tcp4.sent,
    );
    assert_within_1pct(
        "web-0 bytes_received",
        counter(&status, "web-0", "bytes_received"),
        tcp4.received,
    );
    assert_within_1pct(
        "web-1 bytes_sent",
        counter(&status, "web-1", "bytes_sent"),
        web1_sent,
    );
    assert_within_1pct(
        "web-1 bytes_received",
        counter(&status, "web-1", "bytes_received"),
        web1_received,
    );
    assert_eq!(counter(&status, "web-1", "udp_connects"), 3, "{status:#}");
    // /metrics reports the same counters.
    assert_within_1pct(
        "web-0 headway_bytes_sent_total",
        bed.metric("headway_bytes_sent_total", "web-0") as u64,
        tcp4.sent,
    );
    assert_within_1pct(
        "web-1 headway_bytes_received_total",
        bed.metric("headway_bytes_received_total", "web-1") as u64,
        web1_received,
    );
    // What each hook cost in this run (reported, not asserted: timings
    // are for benchmarks). Counts only while kernel.bpf_stats_enabled=1.
    for prog in status["programs"].as_array().unwrap() {
        let (runs, ns) = (
            prog["run_count"].as_u64().unwrap_or(0),
            prog["run_time_ns"].as_u64().unwrap_or(0),
        );
        if runs > 0 {
            eprintln!(
                "{}: {runs} runs, {:.1} ns/run",
                prog["name"].as_str().unwrap_or("?"),
                ns as f64 / runs as f64
            );
        }
    }
    // Every socket of the run is closed (the UDP one connected to a pod,
    // elsewhere and back): no record is left in the socket table.
    let deadline = std::time::Instant::now() + CLOSE_TIMEOUT;
    loop {
        let sockets = bed.status()["sockets"].clone();
        if sockets["in_use"] == 0 && sockets["taken"].as_u64() > Some(0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "records left: {sockets:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A python client in the client namespace (and cgroup) whose one UDP
/// socket exchanges datagrams with web-1, then web-2 (not a pod of the
/// service), then web-1 again. Returns the bytes it sent to and received
/// from web-1.
fn udp_reconnect(bed: &Bed) -> (u64, u64) {
    const SCRIPT: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
def exchange(addr, up, down):
    s.connect((addr, int(sys.argv[3])))
    sent = s.send(struct.pack(">Q", down) + bytes(up - 8))
    return sent, len(s.recv(65536))
a = exchange(sys.argv[1], 108, 50)
b = exchange(sys.argv[2], 30000, 60000)
c = exchange(sys.argv[1], 208, 70)
print(a[0] + c[0], a[1] + c[1], b[0], b[1])
"#;
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", SCRIPT])
        .arg(bed.addr("web-1", false).to_string())
        .arg(bed.addr("web-2", false).to_string())
        .arg(PORT.to_string());
    let mut child = bed.client_ns().spawn(Some(&bed.cg), &cmd).unwrap();
    let (status, out) = child.wait_output(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "python UDP client: {status}: {out}");
    let n: Vec<u64> = out.split_whitespace().map(|w| w.parse().unwrap()).collect();
    // What went to web-2 is more than 1% of what web-1 gets in the test:
    // counting it for web-1 would fail the comparison.
    assert_eq!(n, [316, 120, 30000, 60000], "what the UDP client moved");
    (n[0], n[1])
}

#[test]
fn a_server_pods_own_traffic_is_not_counted() {
    if !require_root("a_server_pods_own_traffic_is_not_counted") {
        return;
    }
    let bed = Bed::new("acct-server", 2, &["web-0", "web-1"]);
    // The servers run inside the hooked cgroup too, and the client is pod
    // web-0 itself: web-1's replies go to a pod address, yet they are
    // web-0's traffic to web-1, counted once, on web-1.
    let _sinks = start_sinks(&bed.cluster, PORT, Some(&bed.cg)).expect("start sinks");
    let web0 = bed.cluster.pod("web-0").ns();
    let report = run_bulk(
        web0,
        Some(&bed.cg),
        bed.addr("web-1", false),
        PORT,
        Bulk {
            up: 256 * KB,
            down: 768 * KB,
            count: 2,
            udp: false,
            server_closes: false,
        },
    )
    .expect("bulk from web-0 to web-1");
    assert_eq!(report.failures, 0, "{report:?}");
    let holder = start_holder(web0, Some(&bed.cg), bed.addr("web-1", true), PORT, 3, false)
        .expect("hold from web-0 to web-1");

    let status = bed.status();
    for field in ["tcp_connects", "active_tcp", "bytes_sent", "bytes_received"] {
        assert_eq!(
            counter(&status, "web-0", field),
            0,
            "web-0 {field}: {status:#}"
        );
    }
    assert_eq!(counter(&status, "web-1", "tcp_connects"), 5, "{status:#}");
    assert_eq!(counter(&status, "web-1", "active_tcp"), 3, "{status:#}");
    assert_within_1pct(
        "web-1 bytes_sent",
        counter(&status, "web-1", "bytes_sent"),
        report.sent + 3 * HEADER_LEN,
    );
    assert_within_1pct(
        "web-1 bytes_received",
        counter(&status, "web-1", "bytes_received"),
        report.received,
    );
    kill(holder);
    bed.wait_counter("web-1", "active_tcp", 0);
    assert_eq!(bed.counter("web-0", "active_tcp"), 0);
}

/// One connection moving 300 KiB up and 900 KiB down (the restart and
/// upgrade tests).
const ONE_TRANSFER: Bulk = Bulk {
    up: 300 * KB,
    down: 900 * KB,
    count: 1,
    udp: false,
    server_closes: false,
};

#[test]
fn counts_survive_an_agent_restart() {
    if !require_root("counts_survive_an_agent_restart") {
        return;
    }
    let mut bed = Bed::new("acct-restart", 1, &["web-0"]);
    let _sinks = start_sinks(&bed.cluster, PORT, None).expect("start sinks");
    let transfer = ONE_TRANSFER;
    let holder = bed.hold("web-0", false, 3);
    let first = bed.bulk("web-0", false, transfer);
    let programs_before = program_ids(&bed.status());

    // The agent stops; the pinned links keep the programs attached and
    // counting.
    bed.agent
        .take()
        .unwrap()
        .stop()
        .expect("agent stops cleanly");
    assert_eq!(bed.counter("web-0", "active_tcp"), 3);
    let second = bed.bulk("web-0", false, transfer);
    let held_for_restart = bed.hold("web-0", true, 2);
    assert_eq!(bed.counter("web-0", "active_tcp"), 5);

    // A new agent swaps its own programs into the links: nothing reset,
    // nothing counted twice, and the new programs close what the old ones
    // opened.
    bed.start_agent();
    let status = bed.status();
    let programs_after = program_ids(&status);
    for ((name, before), (_, after)) in programs_before.iter().zip(&programs_after) {
        assert_ne!(
            before, after,
            "{name}: the restarted agent's program is in the link"
        );
    }
    let sent = HEADER_LEN * 5 + first.sent + second.sent;
    let received = first.received + second.received;
    assert_eq!(counter(&status, "web-0", "active_tcp"), 5, "{status:#}");
    assert_within_1pct(
        "bytes_sent after restart",
        counter(&status, "web-0", "bytes_sent"),
        sent,
    );
    assert_within_1pct(
        "bytes_received after restart",
        counter(&status, "web-0", "bytes_received"),
        received,
    );

    kill(holder);
    kill(held_for_restart);
    bed.wait_counter("web-0", "active_tcp", 0);
    let third = bed.bulk("web-0", false, transfer);
    let status = bed.status();
    assert_eq!(counter(&status, "web-0", "active_tcp"), 0, "{status:#}");
    assert_within_1pct(
        "bytes_sent at the end",
        counter(&status, "web-0", "bytes_sent"),
        sent + third.sent,
    );
    assert_within_1pct(
        "bytes_received at the end",
        counter(&status, "web-0", "bytes_received"),
        received + third.received,
    );
    assert_eq!(counter(&status, "web-0", "tcp_connects"), 8, "{status:#}");
}

/// The counters `pod_stats` keeps per pod besides its generation, in the
/// order of the older layout (which then has the DNS answers and the
/// generation).
const COUNTERS: [&str; 7] = [
    "tcp_connects",
    "udp_connects",
    "active_tcp",
    "bytes_sent",
    "bytes_received",
    "steered_in",
    "steered_away",
];

/// What an upgrade from the build before `pod_stats` became one cache
/// line per pod finds, and how far a previous attempt got.
#[derive(Debug, Clone, Copy, PartialEq)]
enum UpgradeFrom {
    /// The older 72-byte layout pinned as `pod_stats`.
    OlderLayout,
    /// An agent died right after setting it aside as `pod_stats_v1`.
    SetAside,
    /// An agent died after its new `pod_stats` was pinned and before any
    /// link ran a program that uses it.
    NewMapNotLive,
    /// An agent died after its programs (and the new `pod_stats`) went
    /// live, before removing `pod_stats_v1`.
    NewMapLive,
}

/// The agent finds the older 72-byte layout (DNS answers inside), or what
/// an interrupted upgrade left, and carries every count over, generation
/// included, so connections opened before the upgrade are still counted
/// and closed after it.
#[test]
fn counts_survive_an_upgrade_from_the_older_pod_stats_layout() {
    if !require_root("counts_survive_an_upgrade_from_the_older_pod_stats_layout") {
        return;
    }
    for from in [
        UpgradeFrom::OlderLayout,
        UpgradeFrom::SetAside,
        UpgradeFrom::NewMapNotLive,
        UpgradeFrom::NewMapLive,
    ] {
        upgrade_keeps_every_count(from);
    }
}

fn upgrade_keeps_every_count(from: UpgradeFrom) {
    let mut bed = Bed::new("acct-upgrade", 1, &["web-0"]);
    let _sinks = start_sinks(&bed.cluster, PORT, None).expect("start sinks");
    let transfer = ONE_TRANSFER;
    let holder = bed.hold("web-0", false, 3);
    let first = bed.bulk("web-0", false, transfer);
    bed.agent
        .take()
        .unwrap()
        .stop()
        .expect("agent stops cleanly");
    let before = pod_counters(&bed.status(), "demo", "web", "web-0").unwrap();
    assert_eq!(before["active_tcp"], 3, "{from:?}: {before}");

    // What an older build (or an interrupted upgrade) left pinned. The
    // attached programs are this build's: except for `NewMapLive`, they
    // count into a map no longer pinned, so nothing may connect now.
    let id = pod_id(&bed.bpffs, "web-0");
    let older = older_pod_stats_layout(&bed.bpffs, id, 7);
    let stats = bed.bpffs.pin("pod_stats");
    let aside = bed.bpffs.pin("pod_stats_v1");
    let entries = headway::pinned::pinned_max_entries(bed.bpffs.path(), "pod_stats").unwrap();
    match from {
        UpgradeFrom::OlderLayout => {
            std::fs::remove_file(&stats).unwrap();
            std::fs::remove_file(bed.bpffs.pin("pod_dns_answers")).unwrap();
            older.pin(&stats, entries);
            let err = status_json(&bed.bpffs).unwrap_err().to_string();
            assert!(err.contains("agent replaces it when it starts"), "{err}");
        }
        UpgradeFrom::SetAside => {
            std::fs::remove_file(&stats).unwrap();
            std::fs::remove_file(bed.bpffs.pin("pod_dns_answers")).unwrap();
            older.pin(&aside, entries);
        }
        UpgradeFrom::NewMapNotLive => {
            std::fs::remove_file(&stats).unwrap();
            older.pin(&aside, entries);
            // The dead agent's new map, with nothing copied in yet.
            bpftool(&[
                "map",
                "create",
                &stats.display().to_string(),
                "type",
                "array",
                "key",
                "4",
                "value",
                "64",
                "entries",
                &entries.to_string(),
                "name",
                "pod_stats",
                "flags",
                "1024",
            ]);
        }
        UpgradeFrom::NewMapLive => older.pin(&aside, entries),
    }

    bed.start_agent();
    let status = bed.status();
    let after = pod_counters(&status, "demo", "web", "web-0").unwrap();
    for field in COUNTERS {
        assert_eq!(after[field], before[field], "{from:?} {field}: {status:#}");
    }
    // A live new map already held the truth; the old one's answers are
    // not added again.
    let answers = if from == UpgradeFrom::NewMapLive {
        0
    } else {
        7
    };
    assert_eq!(after["dns_answers"], answers, "{from:?}: {status:#}");
    assert!(!aside.exists(), "{from:?}: the old map's pin is removed");
    let shown = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&stats)
        .output()
        .unwrap();
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["bytes_value"], 64, "{shown}");
    const BPF_F_MMAPABLE: u64 = 1 << 10;
    assert_ne!(
        shown["flags"].as_u64().unwrap_or(0) & BPF_F_MMAPABLE,
        0,
        "{shown}"
    );

    // The generation came along: the new programs close what was opened
    // before the upgrade, and keep counting the pod's bytes.
    kill(holder);
    bed.wait_counter("web-0", "active_tcp", 0);
    let second = bed.bulk("web-0", false, transfer);
    let status = bed.status();
    assert_within_1pct(
        "bytes_sent after the upgrade",
        counter(&status, "web-0", "bytes_sent"),
        HEADER_LEN * 3 + first.sent + second.sent,
    );
    assert_within_1pct(
        "bytes_received after the upgrade",
        counter(&status, "web-0", "bytes_received"),
        first.received + second.received,
    );
    assert_eq!(
        counter(&status, "web-0", "tcp_connects"),
        5,
        "{from:?}: {status:#}"
    );
}

fn bpftool(args: &[&str]) {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool {args:?}: {out:?}");
}

/// One pod's slot in the layout headway pinned before `pod_stats` became
/// one line per pod (72 bytes: tcp and udp connects, active, bytes sent
/// and received, steered in and away, DNS answers, generation; the array
/// not mappable).
struct OlderSlot {
    key: Vec<String>,
    value: Vec<String>,
}

impl OlderSlot {
    /// Pins at `path` an array of the older layout holding this slot.
    fn pin(&self, path: &Path, entries: u32) {
        let path = path.display().to_string();
        let entries = entries.to_string();
        bpftool(&[
            "map",
            "create",
            &path,
            "type",
            "array",
            "key",
            "4",
            "value",
            "72",
            "entries",
            &entries,
            "name",
            "pod_stats",
        ]);
        let mut args = vec!["map", "update", "pinned", &path, "key"];
        args.extend(self.key.iter().map(String::as_str));
        args.push("value");
        args.extend(self.value.iter().map(String::as_str));
        bpftool(&args);
    }
}

/// Pod `id`'s slot of the pinned `pod_stats`, in the older layout, with
/// `dns_answers`.
fn older_pod_stats_layout(bpffs: &Bpffs, id: u64, dns_answers: u64) -> OlderSlot {
    let key: Vec<String> = (id as u32)
        .to_le_bytes()
        .iter()
        .map(u8::to_string)
        .collect();
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "lookup", "pinned"])
        .arg(bpffs.pin("pod_stats"))
        .arg("key")
        .args(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool map lookup: {out:?}");
    let slot: Value = serde_json::from_slice(&out.stdout).unwrap();
    let value = &slot["formatted"]["value"];
    let words = COUNTERS
        .map(|f| value[f].as_u64().unwrap_or_else(|| panic!("{f} in {slot}")))
        .into_iter()
        .chain([dns_answers, value["generation"].as_u64().unwrap()]);
    OlderSlot {
        key,
        value: words
            .flat_map(u64::to_le_bytes)
            .map(|b| b.to_string())
            .collect(),
    }
}

/// An upgrade from the socket table older agents kept (`sock_cookies`,
/// `sock_records`, `sock_spills`): the records of sockets open across it
/// move to `sock_table` when their sockets are next seen, so their closes
/// still take `active_tcp` back to exactly zero; the older maps stay
/// pinned while they hold records and go with the first agent that finds
/// them empty.
#[test]
fn open_sockets_keep_their_records_across_an_upgrade_from_the_older_socket_table() {
    if !require_root(
        "open_sockets_keep_their_records_across_an_upgrade_from_the_older_socket_table",
    ) {
        return;
    }
    let mut bed = Bed::new("acct-socktable", 1, &["web-0"]);
    let _sinks = start_sinks(&bed.cluster, PORT, None).expect("start sinks");
    let holder = bed.hold("web-0", false, 3);
    bed.wait_counter("web-0", "active_tcp", 3);
    bed.agent
        .take()
        .unwrap()
        .stop()
        .expect("agent stops cleanly");

    // What an older agent would have left: the three sockets' records in
    // the older layout, and no `sock_table`. The attached programs (this
    // build's) keep the table no longer pinned, emptied: the held sockets
    // are idle meanwhile.
    let generation = pod_generation(&bed.bpffs, "web-0");
    let moved = move_records_to_the_older_table(&bed.bpffs, generation);
    assert_eq!(moved, 3, "the held sockets' records");
    let older = ["sock_cookies", "sock_records", "sock_spills"].map(|m| bed.bpffs.pin(m));

    bed.start_agent();
    let agent = bed.agent.as_mut().unwrap();
    wait_for_status(&bed.bpffs, agent, SYNC_TIMEOUT, |s| web_pods(s) == 1)
        .expect("the agent syncs the manifests");
    assert!(bed.bpffs.pin("sock_table").exists());
    assert!(
        older.iter().all(|p| p.exists()),
        "the older table's pins stay while it holds records"
    );
    assert_eq!(bed.counter("web-0", "active_tcp"), 3);

    // The closes find the records in the older table, move them, and take
    // the count back, once each.
    kill(holder);
    bed.wait_counter("web-0", "active_tcp", 0);
    let sockets = &bed.status()["sockets"];
    assert_eq!(sockets["in_use"], 0, "{sockets}");

    // Empty now: the next agent removes its pins.
    bed.agent
        .take()
        .unwrap()
        .stop()
        .expect("agent stops cleanly");
    bed.start_agent();
    assert!(
        older.iter().all(|p| !p.exists()),
        "an empty older table's pins go"
    );
    // And connections are counted as before.
    let holder = bed.hold("web-0", false, 2);
    bed.wait_counter("web-0", "active_tcp", 2);
    kill(holder);
    bed.wait_counter("web-0", "active_tcp", 0);
    bed.agent
        .take()
        .unwrap()
        .stop()
        .expect("agent stops cleanly");
}

/// The generation of `pod`'s `pod_stats` slot, all 64 bits.
fn pod_generation(bpffs: &Bpffs, pod: &str) -> u64 {
    use aya::maps::{Array, Map, MapData};
    let id = pod_id(bpffs, pod) as u32;
    let data = MapData::from_pin(bpffs.pin("pod_stats")).unwrap();
    let stats: Array<MapData, headway_common::PodCounters> =
        Array::try_from(Map::Array(data)).unwrap();
    stats.get(&id, 0).unwrap().generation
}

/// Moves every record of the pinned `sock_table` into new pins of the
/// older socket table's three maps (32 buckets), as that layout kept them,
/// empties `sock_table` and removes its pin. Returns the records moved.
fn move_records_to_the_older_table(bpffs: &Bpffs, generation: u64) -> u32 {
    use aya::maps::{Array, Map, MapData};
    use headway_common::{
        SockSlot, sock_flags,
        sock_table_v1::{self, SockBucket, SocketState},
    };
    const BUCKETS: u32 = 32;
    let create = |name: &str, value: usize, entries: u32| {
        let path = bpffs.pin(name);
        bpftool(&[
            "map",
            "create",
            &path.display().to_string(),
            "type",
            "array",
            "key",
            "4",
            "value",
            &value.to_string(),
            "entries",
            &entries.to_string(),
            "name",
            name,
        ]);
        Map::Array(MapData::from_pin(&path).unwrap())
    };
    let mut cookies: Array<MapData, SockBucket> =
        Array::try_from(create("sock_cookies", size_of::<SockBucket>(), BUCKETS)).unwrap();
    let mut records: Array<MapData, SocketState> = Array::try_from(create(
        "sock_records",
        size_of::<SocketState>(),
        BUCKETS * sock_table_v1::BUCKET_SLOTS,
    ))
    .unwrap();
    create(
        "sock_spills",
        4,
        BUCKETS / sock_table_v1::HOMES_PER_SPILL_COUNT,
    );

    let table_pin = bpffs.pin("sock_table");
    let mut table: Array<MapData, SockSlot> =
        Array::try_from(Map::Array(MapData::from_pin(&table_pin).unwrap())).unwrap();
    let mut moved = 0;
    for position in 0..table.len() {
        let slot = table.get(&position, 0).unwrap();
        if slot.cookie == 0 {
            continue;
        }
        let r = slot.record;
        assert_eq!(r.generation, generation as u32, "{slot:?}");
        let (home, _) = sock_table_v1::buckets(slot.cookie, BUCKETS - 1);
        let mut bucket = cookies.get(&home, 0).unwrap();
        let i = bucket.cookies.iter().position(|c| *c == 0).unwrap();
        bucket.cookies[i] = slot.cookie;
        let older = SocketState {
            asked: r.asked,
            chosen: r.chosen,
            service_id: u32::from(r.service_id),
            _pad: 0,
            generation,
            pod_id: r.pod_id,
            protocol: if r.flags & sock_flags::UDP != 0 {
                17
            } else {
                6
            },
            active: r.active,
            seen_known: 1,
            flags: r.flags & (sock_flags::STEERED | sock_flags::ACCOUNTED),
            sent_seen: u64::from(r.sent_seen),
            received_seen: u64::from(r.received_seen),
        };
        records
            .set(home * sock_table_v1::BUCKET_SLOTS + i as u32, older, 0)
            .unwrap();
        cookies.set(home, bucket, 0).unwrap();
        table.set(position, SockSlot::default(), 0).unwrap();
        moved += 1;
    }
    std::fs::remove_file(&table_pin).unwrap();
    moved
}

#[test]
fn a_pod_id_given_to_a_new_pod_is_not_touched_by_the_old_pods_sockets() {
    if !require_root("a_pod_id_given_to_a_new_pod_is_not_touched_by_the_old_pods_sockets") {
        return;
    }
    let mut bed = Bed::new("acct-reuse", 3, &["web-0", "web-1"]);
    let _sinks = start_sinks(&bed.cluster, PORT, None).expect("start sinks");
    let holder = bed.hold("web-1", false, 2);
    assert_eq!(bed.counter("web-1", "active_tcp"), 2);
    let old_id = pod_id(&bed.bpffs, "web-1");

    // web-1 goes away and web-2 arrives in the same change: web-2 gets the
    // freed id (the lowest free one) and a zeroed slot.
    write_manifests(bed.manifests.path(), &bed.cluster, &["web-0", "web-2"]);
    let agent = bed.agent.as_mut().unwrap();
    let status = wait_for_status(&bed.bpffs, agent, SYNC_TIMEOUT, |s| {
        pod_counters(s, "demo", "web", "web-2").is_some()
            && pod_counters(s, "demo", "web", "web-1").is_none()
    })
    .expect("the agent replaces web-1 with web-2");
    // The status can show web-2 (its `pods` entry over web-1's, on web-1's
    // endpoints) before web-2's addresses lead to it: connect() finds an
    // address's pod in the DNS index, which the agent writes last.
    wait_synced(agent, bed.metrics_port, bed.manifests.path(), SYNC_TIMEOUT)
        .expect("the agent finishes the change");
    assert_eq!(pod_id(&bed.bpffs, "web-2"), old_id, "the id is reused");
    assert_eq!(counter(&status, "web-2", "active_tcp"), 0, "{status:#}");

    // The old pod's connections close: web-2's count must not move (it
    // would wrap below zero without the slot's generation).
    let web2_holder = bed.hold("web-2", false, 1);
    kill(holder);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(bed.counter("web-2", "active_tcp"), 1);
    kill(web2_holder);
    bed.wait_counter("web-2", "active_tcp", 0);
}

/// The pod id (`pod_stats` slot) of `pod`, from bpftool's view of the
/// pinned `pods` map (BTF gives it named fields).
fn pod_id(bpffs: &Bpffs, pod: &str) -> u64 {
    let pods = bpftool_dump(&bpffs.pin("pods")).unwrap();
    let named = |e: &&Value| {
        let raw: Vec<u8> = e["value"]["name"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .take_while(|b| *b != 0)
            .collect();
        raw == pod.as_bytes()
    };
    pods.iter()
        .find(named)
        .unwrap_or_else(|| panic!("{pod} not in the pods map: {pods:#?}"))["key"]
        .as_u64()
        .unwrap()
}

fn program_ids(status: &Value) -> Vec<(String, u64)> {
    status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["program_id"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// `RetransSegs` of the TCP MIB in `ns` (`/proc/net/snmp` is per netns).
fn retransmitted_segments(ns: &headway_testbed::NetNs) -> u64 {
    let out = ns
        .exec("cat")
        .arg("/proc/net/snmp")
        .output()
        .expect("read /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// Drops a share of the TCP segments arriving in `ns` that carry data
/// (iptables `statistic`), so the peer has to send them again.
fn drop_some_incoming_data(ns: &headway_testbed::NetNs) {
    for ip in ["iptables", "ip6tables"] {
        let status = ns
            .exec(ip)
            .args([
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "-m",
                "length",
                "--length",
                "200:65535",
            ])
            .args([
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                "0.05",
            ])
            .args(["-j", "DROP"])
            .status()
            .expect("run iptables");
        assert!(status.success(), "{ip} rule in {}", ns.name());
    }
}

#[test]
fn retransmitted_tcp_payload_is_counted_once() {
    if !require_root("retransmitted_tcp_payload_is_counted_once") {
        return;
    }
    let bed = Bed::new("acct-retrans", 1, &["web-0"]);
    let _sinks = start_sinks(&bed.cluster, PORT, None).expect("start sinks");
    // Lose data both ways: the pod drops some of what the client sends,
    // the client some of what the pod sends.
    drop_some_incoming_data(bed.cluster.pod_ns("web-0"));
    drop_some_incoming_data(bed.client_ns());
    let before = retransmitted_segments(bed.client_ns())
        + retransmitted_segments(bed.cluster.pod_ns("web-0"));
    let mut moved = (0, 0);
    for ipv6 in [false, true] {
        let r = bed.bulk(
            "web-0",
            ipv6,
            Bulk {
                up: MB,
                down: MB,
                count: 1,
                udp: false,
                server_closes: false,
            },
        );
        moved = (moved.0 + r.sent, moved.1 + r.received);
    }
    let retransmitted = retransmitted_segments(bed.client_ns())
        + retransmitted_segments(bed.cluster.pod_ns("web-0"))
        - before;
    assert!(retransmitted > 0, "the drops must cause retransmissions");
    eprintln!("{retransmitted} segments retransmitted; moved {moved:?}");
    let status = bed.status();
    assert_within_1pct(
        "bytes_sent",
        counter(&status, "web-0", "bytes_sent"),
        moved.0,
    );
    assert_within_1pct(
        "bytes_received",
        counter(&status, "web-0", "bytes_received"),
        moved.1,
    );
}
