//! The agent on the real kernel: it loads, attaches to a cgroup, pins maps
//! and links, and counts per pod exactly what real clients did — while it
//! runs, while it is stopped, and across a restart — until `headway reset`.
//!
//! Privileged: needs root (CI runs it as root). Every address lives in
//! namespaces the test creates; the client runs inside one of them.
use std::{path::Path, time::Duration};

use headway_testbed::{
    Cgroup, Cluster, ConnectReport,
    agent::{
        Agent, Bpffs, bpftool_dump, cgroup_programs, free_port, http_get, parse_openmetrics,
        pod_counters, settle, status_json, wait_for_status, wait_ready, wait_synced,
    },
    manifests::{HeadlessService, PodEndpoint, write_whole},
    require_root, run_client, start_pod_servers,
};
use serde_json::Value;

const PORT: u16 = 8080;
const SYNC_TIMEOUT: Duration = Duration::from_secs(15);

/// The headless `web` service over `pods`, IPv4 and IPv6.
fn web_service(cluster: &Cluster, pods: &[&str]) -> HeadlessService {
    let mut web = HeadlessService::new("demo", "web").port("http", PORT);
    for name in pods {
        let pod = cluster.pod(name);
        let addrs = [pod.addr(false).unwrap(), pod.addr(true).unwrap()];
        web = web.endpoint(PodEndpoint::new(name, addrs));
    }
    web
}

/// Manifests for the cluster: a headless `web` service (three pods, IPv4
/// and IPv6 slices) and a ClusterIP `api` service that must be ignored.
fn write_manifests(dir: &Path, cluster: &Cluster) {
    web_service(cluster, &["web-0", "web-1", "web-2"])
        .write_to(dir)
        .unwrap();
    let api = cluster.pod("api-0").addr(false).unwrap();
    let api_yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: demo}}\n\
         spec:\n  clusterIP: 10.96.0.10\n  ports: [{{port: {PORT}}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: api-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: api}}\n\
         addressType: IPv4\nendpoints:\n  - addresses: [\"{api}\"]\n"
    );
    write_whole(&dir.join("api.yaml"), &api_yaml).unwrap();
}

fn build_cluster() -> Cluster {
    Cluster::builder()
        .pod(
            "web-0",
            "10.77.0.10".parse().unwrap(),
            Some("fd77::10".parse().unwrap()),
        )
        .pod(
            "web-1",
            "10.77.0.11".parse().unwrap(),
            Some("fd77::11".parse().unwrap()),
        )
        .pod(
            "web-2",
            "10.77.0.12".parse().unwrap(),
            Some("fd77::12".parse().unwrap()),
        )
        .pod("api-0", "10.77.0.20".parse().unwrap(), None)
        .client("client")
        .build()
        .expect("build the test cluster")
}

/// Connects `count` times to `pod` and checks that pod itself answered
/// each time (nothing is steered yet).
fn connect(cluster: &Cluster, cg: &Cgroup, pod: &str, ipv6: bool, udp: bool, count: u32) {
    let addr = cluster.pod(pod).addr(ipv6).unwrap();
    let report: ConnectReport =
        run_client(cluster, "client", Some(cg), addr, PORT, count, udp).expect("run the client");
    assert_eq!(
        report.failures, 0,
        "client to {pod} ({addr}) failed: {report:?}"
    );
    assert_eq!(
        report.answers.get(pod).copied(),
        Some(u64::from(count)),
        "answers from {addr}: {report:?}"
    );
}

fn counts(status: &Value, pod: &str) -> (u64, u64) {
    let c = pod_counters(status, "demo", "web", pod)
        .unwrap_or_else(|| panic!("pod {pod} missing from status: {status:#}"));
    (
        c["tcp_connects"].as_u64().unwrap(),
        c["udp_connects"].as_u64().unwrap(),
    )
}

fn web_pod_count(status: &Value) -> usize {
    status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .and_then(|s| s["pods"].as_array())
        .map_or(0, Vec::len)
}

#[test]
fn counts_connections_per_pod_exactly_across_agent_restart() {
    if !require_root("counts_connections_per_pod_exactly_across_agent_restart") {
        return;
    }
    let cluster = build_cluster();
    let _servers = start_pod_servers(&cluster, PORT).expect("start pod servers");
    let cg = Cgroup::new("agent-datapath").expect("create the client cgroup");
    let bpffs = Bpffs::new().expect("mount a private bpffs");
    let manifests = tempfile::tempdir().unwrap();
    write_manifests(manifests.path(), &cluster);

    let port = free_port().unwrap();
    let metrics_flag = format!("--metrics-addr=127.0.0.1:{port}");
    let mut agent =
        Agent::start(manifests.path(), cg.path(), &bpffs, &[&metrics_flag]).expect("start agent");
    let status = wait_for_status(&bpffs, &mut agent, SYNC_TIMEOUT, |s| web_pod_count(s) == 3)
        .expect("agent syncs the manifests");
    // Only the headless service is known.
    let names: Vec<&str> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web"], "{status:#}");
    // The status lists the pods from `svc_endpoints`; connect() finds an
    // address's pod in the DNS index, written after it (on a thread of
    // its own in a first sync): connect only once the sync is complete.
    wait_ready(&mut agent, port, SYNC_TIMEOUT).expect("the agent becomes ready");
    // status reports both hooks attached, as the kernel verified them.
    for prog in status["programs"].as_array().unwrap() {
        assert_eq!(prog["attached"], true, "{prog}");
        assert!(
            prog["verified_instructions"].as_u64().unwrap() > 0,
            "{prog}"
        );
    }
    // One link per hook on our cgroup.
    let mut progs = cgroup_programs(cg.path()).unwrap();
    progs.sort();
    assert_eq!(
        progs,
        [
            "hw_connect4",
            "hw_connect6",
            "hw_getpeer4",
            "hw_getpeer6",
            "hw_recvmsg4",
            "hw_recvmsg6",
            "hw_sendmsg4",
            "hw_sendmsg6",
            "hw_skb_egress",
            "hw_skb_ingress",
            "hw_sock_ops",
            "hw_sock_release",
        ]
    );

    connect(&cluster, &cg, "web-0", false, false, 5);
    connect(&cluster, &cg, "web-1", true, false, 3);
    connect(&cluster, &cg, "web-1", false, true, 2);
    connect(&cluster, &cg, "api-0", false, false, 4); // not headless: not counted

    let status = status_json(&bpffs).unwrap();
    assert_eq!(counts(&status, "web-0"), (5, 0), "{status:#}");
    assert_eq!(counts(&status, "web-1"), (3, 2), "{status:#}");
    assert_eq!(counts(&status, "web-2"), (0, 0), "{status:#}");

    // bpftool sees the same numbers, with named fields (BTF).
    let pods = bpftool_dump(&bpffs.pin("pods")).unwrap();
    let stats = bpftool_dump(&bpffs.pin("pod_stats")).unwrap();
    let pod_id = |name: &str| -> u64 {
        pods.iter()
            .find(|e| {
                let raw: Vec<u8> = e["value"]["name"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_u64().unwrap() as u8)
                    .take_while(|b| *b != 0)
                    .collect();
                raw == name.as_bytes()
            })
            .unwrap_or_else(|| panic!("{name} not in bpftool dump of pods: {pods:#?}"))["key"]
            .as_u64()
            .unwrap()
    };
    let stat = |name: &str| -> Value {
        let id = pod_id(name);
        stats
            .iter()
            .find(|e| e["key"].as_u64() == Some(id))
            .unwrap_or_else(|| panic!("no pod_stats entry for {name}: {stats:#?}"))["value"]
            .clone()
    };
    assert_eq!(stat("web-0")["tcp_connects"], 5);
    assert_eq!(stat("web-1")["tcp_connects"], 3);
    assert_eq!(stat("web-1")["udp_connects"], 2);

    // /metrics says the same, through a real OpenMetrics parser.
    assert_eq!(http_get(port, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
    let (code, body) = http_get(port, "/metrics").unwrap();
    assert_eq!(code, 200, "{body}");
    let samples = parse_openmetrics(&body).unwrap();
    let sample = |name: &str, pod: &str, protocol: Option<&str>| -> f64 {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.get("pod").map(String::as_str) == Some(pod)
                    && l.get("service").map(String::as_str) == Some("web")
                    && l.get("protocol").map(String::as_str) == protocol
            })
            .unwrap_or_else(|| panic!("no {name} for {pod} in {body}"))
            .2
    };
    assert_eq!(
        sample("headway_connections_total", "web-0", Some("tcp")),
        5.0
    );
    assert_eq!(
        sample("headway_connections_total", "web-1", Some("tcp")),
        3.0
    );
    assert_eq!(
        sample("headway_connections_total", "web-1", Some("udp")),
        2.0
    );
    assert_eq!(
        sample("headway_connections_total", "web-2", Some("tcp")),
        0.0
    );
    assert_eq!(sample("headway_active_connections", "web-0", None), 0.0);
    assert!(
        samples.iter().any(|(n, l, v)| n == "headway_map_capacity"
            && l.get("map").map(String::as_str) == Some("pod_addrs")
            && *v > 0.0),
        "{body}"
    );

    // A manifest broken by an edit keeps what it held (checked once the
    // agent has synced with the broken file, not after a fixed while).
    write_whole(
        &manifests.path().join("web.yaml"),
        "kind: Service\nspec: [oops\n",
    )
    .unwrap();
    wait_synced(&mut agent, port, manifests.path(), SYNC_TIMEOUT).unwrap();
    assert_eq!(web_pod_count(&status_json(&bpffs).unwrap()), 3);
    write_manifests(manifests.path(), &cluster);

    // The agent stops; the datapath keeps counting.
    agent.stop().expect("agent stops cleanly on SIGTERM");
    assert_eq!(
        cgroup_programs(cg.path()).unwrap().len(),
        12,
        "links stay pinned"
    );
    connect(&cluster, &cg, "web-2", false, false, 2);
    connect(&cluster, &cg, "web-2", true, false, 1);
    let status = status_json(&bpffs).expect("status works while the agent is down");
    assert!(
        status["programs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["attached"] == true),
        "{status:#}"
    );
    assert_eq!(counts(&status, "web-2"), (3, 0), "{status:#}");

    // A map an older headway pinned (socket storage, long since replaced
    // by the socket table): the new agent has no use for it and removes it.
    let retired = bpffs.pin("acct_socks");
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&retired)
        .args(["type", "array", "key", "4", "value", "4", "entries", "1"])
        .args(["name", "acct_socks"])
        .status()
        .expect("run bpftool");
    assert!(created.success() && retired.exists(), "bpftool map create");
    // And `svc_steering` as the agent before inline ports pinned it (32-byte
    // entries): derived from other maps, it is replaced, not refused.
    let steering = bpffs.pin("svc_steering");
    let entries = headway::pinned::pinned_max_entries(bpffs.path(), "svc_steering").unwrap();
    std::fs::remove_file(&steering).unwrap();
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&steering)
        .args(["type", "array", "key", "4", "value", "32", "entries"])
        .arg(entries.to_string())
        .args(["name", "svc_steering"])
        .status()
        .expect("run bpftool");
    assert!(created.success(), "bpftool map create");
    // Until this version's agent replaces it, status says so (not "reset").
    let err = status_json(&bpffs).unwrap_err().to_string();
    assert!(err.contains("agent replaces it when it starts"), "{err}");

    // A new agent takes over: nothing reset, nothing attached twice. The
    // status reads the pins, so it is complete before the new agent has
    // even attached: everything is checked once it is ready (attached,
    // retired pins removed, synced).
    let port = free_port().unwrap();
    let metrics_flag = format!("--metrics-addr=127.0.0.1:{port}");
    let mut agent =
        Agent::start(manifests.path(), cg.path(), &bpffs, &[&metrics_flag]).expect("restart agent");
    wait_ready(&mut agent, port, SYNC_TIMEOUT).expect("the new agent becomes ready");
    let status =
        wait_for_status(&bpffs, &mut agent, SYNC_TIMEOUT, |s| web_pod_count(s) == 3).unwrap();
    assert_eq!(counts(&status, "web-0"), (5, 0), "{status:#}");
    assert_eq!(counts(&status, "web-2"), (3, 0), "{status:#}");
    assert_eq!(
        cgroup_programs(cg.path()).unwrap().len(),
        12,
        "no second attachment"
    );
    assert!(!retired.exists(), "a retired map pin is removed");
    let shown = |path: &Path| {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(path)
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let steering_map = shown(&steering);
    assert_eq!(steering_map["bytes_value"], 128, "svc_steering replaced");
    // Mappable, so that its 128-byte values start on a page (two whole
    // cache lines each).
    const BPF_F_MMAPABLE: u64 = 1 << 10;
    let flags = steering_map["flags"].as_u64().unwrap_or(0);
    assert_ne!(flags & BPF_F_MMAPABLE, 0, "{steering_map}");
    let live: Vec<Value> = bpftool_dump(&steering)
        .unwrap()
        .into_iter()
        .filter(|e| e["value"]["live"] == 1)
        .collect();
    assert_eq!(live.len(), 1, "web's entry written anew: {live:#?}");
    connect(&cluster, &cg, "web-0", false, false, 1);
    assert_eq!(counts(&status_json(&bpffs).unwrap(), "web-0"), (6, 0));

    // Reset detaches and unpins everything.
    agent.stop().unwrap();
    let out = std::process::Command::new(headway_testbed::agent::headway_bin().unwrap())
        .arg("reset")
        .arg("--bpffs")
        .arg(bpffs.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "reset: {out:?}");
    // The kernel lets go of an unpinned link after an RCU grace period
    // (the bpffs inode is freed from an RCU callback): give it a moment.
    let deadline = std::time::Instant::now() + SYNC_TIMEOUT;
    while !cgroup_programs(cg.path()).unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(cgroup_programs(cg.path()).unwrap(), Vec::<String>::new());
    assert!(!bpffs.pin("pod_stats").exists());
    let err = status_json(&bpffs).unwrap_err().to_string();
    assert!(err.contains("nothing is pinned"), "{err}");
}

#[test]
fn pod_removed_from_manifests_disappears_from_maps() {
    if !require_root("pod_removed_from_manifests_disappears_from_maps") {
        return;
    }
    let cluster = build_cluster();
    let cg = Cgroup::new("agent-remove").expect("create cgroup");
    let bpffs = Bpffs::new().expect("mount a private bpffs");
    let manifests = tempfile::tempdir().unwrap();
    write_manifests(manifests.path(), &cluster);
    let mut agent = Agent::start(manifests.path(), cg.path(), &bpffs, &[]).expect("start agent");
    wait_for_status(&bpffs, &mut agent, SYNC_TIMEOUT, |s| web_pod_count(s) == 3).unwrap();
    let generation_before = pod_addrs_gen(&bpffs);

    // Drop web-2 from both slices.
    web_service(&cluster, &["web-0", "web-1"])
        .write_to(manifests.path())
        .unwrap();
    wait_for_status(&bpffs, &mut agent, SYNC_TIMEOUT, |s| web_pod_count(s) == 2).unwrap();
    // `pods` is written last; the status shows the change before.
    let pods = settle(
        SYNC_TIMEOUT,
        || bpftool_dump(&bpffs.pin("pods")).unwrap(),
        |p| p.len() == 2,
    );
    assert_eq!(pods.len(), 2, "the removed pod is forgotten: {pods:#?}");
    let addrs = bpftool_dump(&bpffs.pin("pod_addrs")).unwrap();
    assert_eq!(addrs.len(), 4, "two pods x two families: {addrs:#?}");
    let endpoints = bpftool_dump(&bpffs.pin("svc_endpoints")).unwrap();
    assert_eq!(endpoints.len(), 4, "{endpoints:#?}");
    // The DNS interceptor's cached pod ids are stale now: the agent says so.
    assert!(
        pod_addrs_gen(&bpffs) > generation_before,
        "pod_addrs changed but pod_addrs_gen did not move"
    );
    agent.stop().unwrap();
}

/// `pod_addrs_gen[0]`: how many times the agent changed `pod_addrs`.
fn pod_addrs_gen(bpffs: &Bpffs) -> u64 {
    let entries = bpftool_dump(&bpffs.pin("pod_addrs_gen")).unwrap();
    entries[0]["value"]
        .as_u64()
        .unwrap_or_else(|| panic!("pod_addrs_gen: {entries:#?}"))
}
