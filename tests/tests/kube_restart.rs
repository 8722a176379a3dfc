//! Restart without disruption, on the real kernel, with the kube source:
//! a client keeps connecting to an address from its stale DNS cache (a pod
//! that is gone) while the agent is stopped and a new one starts, waits
//! for its watchers and syncs. Every connection must succeed and be
//! steered to a live pod of the service — before, during and after.
//!
//! Privileged. Pods, the DNS server and the client live in namespaces the
//! test creates; the fake API server is on the host's loopback.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use headway_testbed::{
    Cgroup, Cluster, ConnectReport, FakeApi, ResolvConf, Zone,
    agent::{
        Agent, Bpffs, Source, free_port, http_get, indexed_pod, settle, status_json,
        wait_for_status, wait_ready,
    },
    fake_api::{eventually, objects::headless_service},
    require_root, resolve_in, run_client, start_dns_server, start_pod_servers,
};
use serde_json::{Value, json};

const PORT: u16 = 8080;
const DNS: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 53);
const DOMAIN: &str = "demo.svc.cluster.local";
const PODS: [(&str, [u8; 4]); 4] = [
    ("web-0", [10, 78, 0, 10]),
    ("web-1", [10, 78, 0, 11]),
    ("web-2", [10, 78, 0, 12]),
    ("web-3", [10, 78, 0, 13]),
];
const LIVE: [&str; 3] = ["web-0", "web-1", "web-2"];

fn v4(pod: &str) -> Ipv4Addr {
    Ipv4Addr::from(PODS.iter().find(|(n, _)| *n == pod).unwrap().1)
}

/// The slice of `web` listing `pods`.
fn web_slice(pods: &[&str]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|pod| {
            json!({
                "addresses": [v4(pod).to_string()],
                "hostname": pod,
                "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "namespace": "demo", "name": pod},
            })
        })
        .collect();
    json!({
        "kind": "EndpointSlice",
        "metadata": {"name": "web-v4", "namespace": "demo", "labels": {
            "kubernetes.io/service-name": "web",
            "service.kubernetes.io/headless": "",
        }},
        "addressType": "IPv4",
        "endpoints": endpoints,
    })
}

fn web_pods(status: &Value) -> usize {
    status["services"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["name"] == "web"))
        .and_then(|s| s["pods"].as_array())
        .map_or(0, Vec::len)
}

/// Totals of every client run, and how many runs were made.
#[derive(Default, Debug)]
struct Totals {
    runs: u64,
    answers: BTreeMap<String, u64>,
    failures: u64,
    errors: BTreeMap<String, u64>,
}

impl Totals {
    fn add(&mut self, r: &ConnectReport) {
        self.runs += 1;
        for (pod, n) in &r.answers {
            *self.answers.entry(pod.clone()).or_default() += n;
        }
        self.failures += r.failures;
        for (e, n) in &r.errors {
            *self.errors.entry(e.clone()).or_default() += n;
        }
    }

    fn connects(&self) -> u64 {
        self.answers.values().sum::<u64>() + self.failures
    }
}

fn start_agent(source: &Source, cg: &Cgroup, bpffs: &Bpffs, port: u16) -> Agent {
    let metrics = format!("--metrics-addr=127.0.0.1:{port}");
    Agent::start_with(source, cg.path(), bpffs, &[&metrics]).expect("start the agent")
}

fn ready(port: u16) -> bool {
    http_get(port, "/readyz").map(|r| r.0).ok() == Some(200)
}

#[test]
fn agent_restart_mid_traffic_fails_no_connection_and_keeps_steering() {
    if !require_root("agent_restart_mid_traffic_fails_no_connection_and_keeps_steering") {
        return;
    }
    let mut builder = Cluster::builder();
    for (name, _) in PODS {
        builder = builder.pod(name, v4(name), None);
    }
    let cluster = builder
        .client_at(
            "dns",
            DNS,
            Some(Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 0x53)),
        )
        .client("client")
        .build()
        .expect("build the test cluster");
    let _servers = start_pod_servers(&cluster, PORT).expect("pod servers");
    // DNS still hands out all four (a stale answer, as a cache would keep).
    let zone_dir = tempfile::tempdir().unwrap();
    let mut zone = Zone::new();
    for (pod, _) in PODS {
        zone = zone.a(&format!("web.{DOMAIN}"), v4(pod));
    }
    zone.write(&zone_dir.path().join("zone.json")).unwrap();
    let _dns = start_dns_server(
        cluster.client_ns("dns"),
        &zone_dir.path().join("zone.json"),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    )
    .expect("DNS server");
    let _resolv = ResolvConf::new(cluster.client_ns("client"), DNS.into(), &[DOMAIN]).unwrap();

    let api = FakeApi::start().unwrap();
    let mut web = headless_service("demo", "web", json!({}));
    // Only declared ports are steered: declare the one the pods serve.
    web["spec"]["ports"] = json!([{"name": "tcp", "port": PORT}]);
    api.apply(web).unwrap();
    let all: Vec<&str> = PODS.iter().map(|(name, _)| *name).collect();
    api.apply(web_slice(&all)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = Source::Kube(api.write_kubeconfig(dir.path()).unwrap());
    let cg = Cgroup::new("kube-restart-traffic").unwrap();
    let bpffs = Bpffs::new().unwrap();
    let port = free_port().unwrap();
    let mut agent = start_agent(&source, &cg, &bpffs, port);
    wait_for_status(&bpffs, &mut agent, Duration::from_secs(20), |s| {
        web_pods(s) == 4
    })
    .unwrap();
    // The interceptor learns from `dns_names` and the DNS index, written
    // after what the status shows: resolve once the first sync is done.
    wait_ready(&mut agent, port, Duration::from_secs(20)).unwrap();

    // The client resolves the service name once (glibc, through the
    // interceptor) and from then on uses web-3's address from its cache.
    let resolved = resolve_in(
        cluster.client_ns("client"),
        Some(&cg),
        &format!("web.{DOMAIN}"),
    )
    .unwrap();
    assert!(
        resolved.addrs.contains(&IpAddr::V4(v4("web-3"))),
        "{resolved:?}"
    );
    // web-3 leaves the service (its process still answers, so a connection
    // that is not steered shows).
    api.apply(web_slice(&LIVE)).unwrap();
    wait_for_status(&bpffs, &mut agent, Duration::from_secs(20), |s| {
        web_pods(s) == 3
    })
    .unwrap();
    // The status shows web-3 gone from `svc_endpoints` before the DNS
    // index (written last) forgets its pod: until then a connect to its
    // address is decided as a reused address, not a gone one.
    let web3 = IpAddr::V4(v4("web-3"));
    let pod = settle(
        Duration::from_secs(20),
        || indexed_pod(&bpffs, web3).unwrap(),
        Option::is_none,
    );
    assert_eq!(pod, None, "web-3's address still leads to its pod");

    // glibc's address sorting connect()s a UDP socket to each answer, so
    // resolving already steered one socket: count from here.
    let steered_before = status_json(&bpffs).unwrap()["steering"]["steered_gone"]
        .as_u64()
        .unwrap();

    // A steady stream of connections to the stale address, in runs of 20.
    let totals = Arc::new(Mutex::new(Totals::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = std::thread::scope(|scope| {
        let stream = scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let r = run_client(
                    &cluster,
                    "client",
                    Some(&cg),
                    v4("web-3").into(),
                    PORT,
                    20,
                    false,
                )
                .expect("client runs");
                totals.lock().unwrap().add(&r);
            }
        });
        let runs = || totals.lock().unwrap().runs;
        eventually(
            Duration::from_secs(20),
            "traffic before the restart",
            || runs() >= 3,
        )
        .unwrap();

        // Restart: SIGTERM, no agent for a moment, a new agent that must
        // list before it writes.
        agent.stop().expect("agent stops cleanly");
        let at_stop = runs();
        eventually(Duration::from_secs(20), "traffic with no agent", || {
            runs() >= at_stop + 3
        })
        .unwrap();
        let without_agent = runs() - at_stop;
        let mut agent = start_agent(&source, &cg, &bpffs, port);
        eventually(Duration::from_secs(20), "new agent ready", || ready(port)).unwrap();
        let at_ready = runs();
        eventually(Duration::from_secs(20), "traffic after the restart", || {
            runs() >= at_ready + 3
        })
        .unwrap();
        stop.store(true, Ordering::Relaxed);
        stream.join().unwrap();
        agent.check_running().unwrap();
        (agent, without_agent, at_ready - at_stop)
    });
    let (agent, without_agent, across_restart) = traffic;
    let totals = totals.lock().unwrap();
    eprintln!(
        "restart test: {} connections in {} runs ({} runs with no agent, {} between stop and the new agent's readiness): {:?}",
        totals.connects(),
        totals.runs,
        without_agent,
        across_restart,
        totals
    );
    assert_eq!(totals.failures, 0, "failed connections: {totals:?}");
    assert!(
        totals.answers.keys().all(|p| LIVE.contains(&p.as_str())),
        "every connection steered away from the gone pod: {totals:?}"
    );
    // The kernel counted every one of them as steered (counters live in
    // the pinned maps, across both agents).
    let status = status_json(&bpffs).unwrap();
    assert_eq!(
        status["steering"]["steered_gone"].as_u64().unwrap() - steered_before,
        totals.connects(),
        "{status:#}"
    );
    agent.stop().expect("agent stops cleanly");
}
