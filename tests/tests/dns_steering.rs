//! DNS-aware steering end to end on the real kernel: a CoreDNS-like server
//! in its own namespace, clients resolving through glibc (and dig), the
//! agent learning from the real responses, and connects landing where the
//! semantics say (product.md, "Semantics").
//!
//! Privileged. Every address lives in namespaces the test creates; every
//! client and the DNS server run inside them.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::Duration,
};

use headway_testbed::{
    Cgroup, Cluster, ConnectReport, MalformedKind, ResolvConf, Zone,
    agent::{Agent, Bpffs, free_port, status_json, wait_for_status, wait_ready, wait_synced},
    manifests::{HeadlessService, PodEndpoint, write_whole},
    require_root, resolve_in, run_client, run_client_by_name, start_dns_server, start_pod_servers,
};
use serde_json::Value;

const PORT: u16 = 8080;
const DNS: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 53);
const DOMAIN: &str = "demo.svc.cluster.local";

/// A pod of the test: name, IPv4, IPv6.
const PODS: [(&str, [u8; 4], u16); 5] = [
    ("web-0", [10, 77, 0, 10], 0x10),
    ("web-1", [10, 77, 0, 11], 0x11),
    ("web-2", [10, 77, 0, 12], 0x12),
    ("web-3", [10, 77, 0, 20], 0x20),
    ("api-0", [10, 77, 0, 30], 0x30),
];

fn v4(pod: &str) -> Ipv4Addr {
    let (_, o, _) = PODS.iter().find(|(n, _, _)| *n == pod).unwrap();
    Ipv4Addr::from(*o)
}

fn v6(pod: &str) -> Ipv6Addr {
    let (_, _, last) = PODS.iter().find(|(n, _, _)| *n == pod).unwrap();
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, *last)
}

fn build_cluster() -> Cluster {
    let mut b = Cluster::builder();
    for (name, _, _) in PODS {
        b = b.pod(name, v4(name), Some(v6(name)));
    }
    b.client_at("dns", DNS, Some("fd77::53".parse().unwrap()))
        .client("client")
        .client("client2")
        .client("client3")
        .build()
        .expect("build the test cluster")
}

/// A headless service whose endpoints are `pods` (name, ready), both families,
/// with hostnames like a StatefulSet's.
fn service_yaml(service: &str, pods: &[(&str, bool)]) -> String {
    let mut svc = HeadlessService::new("demo", service);
    for (pod, ready) in pods {
        let addrs: [IpAddr; 2] = [v4(pod).into(), v6(pod).into()];
        svc = svc.endpoint(PodEndpoint::new(pod, addrs).ready(*ready));
    }
    svc.to_yaml()
}

/// The zone CoreDNS would serve for `services` (name → pods), plus a
/// ClusterIP-style name (`api`) that is not a headless service.
fn zone_for(services: &[(&str, &[&str])]) -> Zone {
    let mut zone = Zone::new();
    for (service, pods) in services {
        let svc_name = format!("{service}.{DOMAIN}");
        for pod in *pods {
            zone = zone
                .a(&svc_name, v4(pod))
                .aaaa(&svc_name, v6(pod))
                .a(&format!("{pod}.{svc_name}"), v4(pod))
                .aaaa(&format!("{pod}.{svc_name}"), v6(pod));
        }
    }
    zone.a(&format!("api.{DOMAIN}"), v4("api-0"))
}

struct Setup {
    cluster: Cluster,
    cg: Cgroup,
    bpffs: Bpffs,
    manifests: tempfile::TempDir,
    zone_dir: tempfile::TempDir,
    agent: Agent,
    metrics_port: u16,
    _servers: Vec<headway_testbed::Child>,
    _dns: headway_testbed::Child,
    _resolvers: Vec<ResolvConf>,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let cluster = build_cluster();
        let servers = start_pod_servers(&cluster, PORT).expect("pod servers");
        let zone_dir = tempfile::tempdir().unwrap();
        zone_for(&[("web", &["web-0", "web-1", "web-2", "web-3"])])
            .write(&zone_dir.path().join("zone.json"))
            .unwrap();
        let dns = start_dns_server(
            cluster.client_ns("dns"),
            &zone_dir.path().join("zone.json"),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        )
        .expect("DNS server");
        let resolvers = ["client", "client2", "client3"]
            .iter()
            .map(|c| ResolvConf::new(cluster.client_ns(c), DNS.into(), &[DOMAIN]).unwrap())
            .collect();
        let cg = Cgroup::new(name).unwrap();
        let bpffs = Bpffs::new().unwrap();
        let manifests = tempfile::tempdir().unwrap();
        fs::write(
            manifests.path().join("web.yaml"),
            service_yaml(
                "web",
                &[
                    ("web-0", true),
                    ("web-1", true),
                    ("web-2", true),
                    ("web-3", true),
                ],
            ),
        )
        .unwrap();
        let metrics_port = free_port().unwrap();
        let metrics = format!("--metrics-addr=127.0.0.1:{metrics_port}");
        let mut agent = Agent::start(manifests.path(), cg.path(), &bpffs, &[&metrics]).unwrap();
        wait_for_status(&bpffs, &mut agent, Duration::from_secs(15), |s| {
            pod_count(s, "web") == 4
        })
        .unwrap();
        // The DNS interceptor learns from `dns_names` and the DNS index,
        // written after what the status shows (the index by a thread of
        // its own): resolve only once the first sync is complete.
        wait_ready(&mut agent, metrics_port, Duration::from_secs(15)).unwrap();
        Setup {
            cluster,
            cg,
            bpffs,
            manifests,
            zone_dir,
            agent,
            metrics_port,
            _servers: servers,
            _dns: dns,
            _resolvers: resolvers,
        }
    }

    /// Replaces the manifests (`file` → yaml, each written whole) and
    /// waits until `ready`, then until the agent has written the change
    /// to the end: the status shows it before the DNS index (which
    /// connect() reads an address's pod from) has it.
    fn apply(&mut self, files: &[(&str, String)], ready: impl Fn(&Value) -> bool) {
        for (file, yaml) in files {
            write_whole(&self.manifests.path().join(file), yaml).unwrap();
        }
        let timeout = Duration::from_secs(15);
        wait_for_status(&self.bpffs, &mut self.agent, timeout, ready).unwrap();
        let dir = self.manifests.path();
        wait_synced(&mut self.agent, self.metrics_port, dir, timeout).unwrap();
    }

    fn resolve(&self, client: &str, name: &str) -> Vec<IpAddr> {
        let report = resolve_in(self.cluster.client_ns(client), Some(&self.cg), name).unwrap();
        assert!(report.error.is_none(), "resolving {name}: {report:?}");
        report.addrs
    }

    fn connect(&self, client: &str, addr: IpAddr, count: u32) -> ConnectReport {
        let r = run_client(
            &self.cluster,
            client,
            Some(&self.cg),
            addr,
            PORT,
            count,
            false,
        )
        .expect("client runs");
        assert_eq!(r.failures, 0, "connects to {addr}: {r:?}");
        r
    }

    fn status(&self) -> Value {
        status_json(&self.bpffs).unwrap()
    }
}

fn pod_count(status: &Value, service: &str) -> usize {
    status["services"]
        .as_array()
        .and_then(|v| v.iter().find(|s| s["name"] == service))
        .and_then(|s| s["pods"].as_array())
        .map_or(0, Vec::len)
}

fn counters(status: &Value, key: &str) -> BTreeMap<String, u64> {
    serde_json::from_value(status[key].clone()).unwrap()
}

fn only(report: &ConnectReport, pods: &[&str]) -> bool {
    !report.answers.is_empty() && report.answers.keys().all(|p| pods.contains(&p.as_str()))
}

#[test]
fn stale_cache_fails_over_to_a_live_pod_of_the_resolved_service() {
    if !require_root("stale_cache_fails_over_to_a_live_pod_of_the_resolved_service") {
        return;
    }
    let mut s = Setup::new("dns-stale");
    // The client resolves the service name (glibc) and keeps the answer.
    let cached = s.resolve("client", &format!("web.{DOMAIN}"));
    assert_eq!(cached.len(), 8, "4 pods x 2 families: {cached:?}");
    let status = s.status();
    assert!(counters(&status, "dns")["addrs_learned"] >= 8, "{status:#}");
    // glibc asks A and AAAA: two answered lookups of the service-wide name.
    assert_eq!(counters(&status, "dns")["lookups_service"], 2, "{status:#}");
    let dns_answers: u64 = status["services"][0]["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["counters"]["dns_answers"].as_u64().unwrap())
        .sum();
    assert!(dns_answers >= 8, "{status:#}");

    // web-2 is deleted; its address stays in the client's cache.
    s.apply(
        &[(
            "web.yaml",
            service_yaml("web", &[("web-0", true), ("web-1", true), ("web-3", true)]),
        )],
        |st| pod_count(st, "web") == 3,
    );
    let live = ["web-0", "web-1", "web-3"];
    let r = s.connect("client", v4("web-2").into(), 12);
    assert!(only(&r, &live), "IPv4 to the deleted pod: {r:?}");
    let r6 = s.connect("client", v6("web-2").into(), 6);
    assert!(only(&r6, &live), "IPv6 to the deleted pod: {r6:?}");
    // A live pod's address is left alone.
    let r = s.connect("client", v4("web-1").into(), 3);
    assert_eq!(r.answers.get("web-1"), Some(&3));

    // web-3's address is reused by a pod of another service (api).
    s.apply(
        &[
            (
                "web.yaml",
                service_yaml("web", &[("web-0", true), ("web-1", true)]),
            ),
            ("api.yaml", service_yaml("api", &[("web-3", true)])),
        ],
        |st| pod_count(st, "web") == 2 && pod_count(st, "api") == 1,
    );
    let r = s.connect("client", v4("web-3").into(), 10);
    assert!(only(&r, &["web-0", "web-1"]), "reused address: {r:?}");

    let status = s.status();
    let steering = counters(&status, "steering");
    assert_eq!(steering["steered_gone"], 18, "{steering:?}");
    assert_eq!(steering["steered_reused"], 10, "{steering:?}");
    // The same, for the service whose name was resolved.
    let web = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "web")
        .unwrap();
    assert_eq!(web["counters"]["decisions"]["steered_gone"], 18, "{web:#}");
    assert_eq!(
        web["counters"]["decisions"]["steered_reused"], 10,
        "{web:#}"
    );
    assert_eq!(web["counters"]["lookups_service"], 2, "{web:#}");
    s.agent.check_running().unwrap();
}

#[test]
fn pod_names_and_addresses_without_dns_are_never_moved() {
    if !require_root("pod_names_and_addresses_without_dns_are_never_moved") {
        return;
    }
    let mut s = Setup::new("dns-keep");
    // web-2 is not ready (but still in the service).
    s.apply(
        &[(
            "web.yaml",
            service_yaml(
                "web",
                &[
                    ("web-0", true),
                    ("web-1", true),
                    ("web-2", false),
                    ("web-3", true),
                ],
            ),
        )],
        |st| {
            st["services"][0]["pods"].as_array().is_some_and(|p| {
                p.iter()
                    .any(|p| p["state"].as_array().is_some_and(Vec::is_empty))
            })
        },
    );
    // client2 asks for web-2 by its own name, through glibc, every attempt.
    let r = run_client_by_name(
        s.cluster.client_ns("client2"),
        Some(&s.cg),
        &format!("web-2.web.{DOMAIN}"),
        PORT,
        5,
        false,
        Some(4),
    )
    .unwrap();
    assert_eq!(r.report.answers.get("web-2"), Some(&5), "{r:?}");
    assert_eq!(
        counters(&s.status(), "dns")["lookups_pod"],
        10,
        "5 lookups x A, AAAA"
    );
    // dig (run in the cgroup, so the interceptor sees its answer) asks for
    // web-2's own name, and client2 connects to what it said.
    let mut dig = Command::new("dig");
    dig.args(["+short", "-t", "A"])
        .arg(format!("@{DNS}"))
        .arg(format!("web-2.web.{DOMAIN}"));
    let (status, out) = s
        .cluster
        .client_ns("client2")
        .spawn(Some(&s.cg), &dig)
        .unwrap()
        .wait_output(Duration::from_secs(10))
        .unwrap();
    assert!(status.success());
    assert_eq!(out.trim(), v4("web-2").to_string());
    let r = s.connect("client2", v4("web-2").into(), 3);
    assert_eq!(r.answers.get("web-2"), Some(&3));

    // client3 never resolved anything: a hard-coded IP is never moved.
    let r = s.connect("client3", v4("web-2").into(), 4);
    assert_eq!(r.answers.get("web-2"), Some(&4));

    // A name that is not a headless service's teaches nothing.
    let before = counters(&s.status(), "dns");
    let api = s.resolve("client3", &format!("api.{DOMAIN}"));
    assert_eq!(api, [IpAddr::from(v4("api-0"))]);
    let after = counters(&s.status(), "dns");
    assert!(after["name_unknown"] > before["name_unknown"], "{after:?}");
    assert_eq!(after["addrs_learned"], before["addrs_learned"], "{after:?}");

    let steering = counters(&s.status(), "steering");
    // 5 + 3 connects, plus glibc's own: getaddrinfo sorts its answers (RFC
    // 3484) by connect()ing a UDP socket to each address (no packet is
    // sent), so each of the 5 lookups adds one connect per family.
    assert_eq!(steering["kept_pod_name"], 8 + 5 * 2, "{steering:?}");
    assert_eq!(steering["kept_no_dns"], 4, "{steering:?}");
    assert_eq!(
        steering["steered_gone"] + steering["steered_reused"] + steering["steered_not_eligible"],
        0,
        "{steering:?}"
    );
}

#[test]
fn malformed_responses_teach_nothing_and_are_counted() {
    if !require_root("malformed_responses_teach_nothing_and_are_counted") {
        return;
    }
    let mut s = Setup::new("dns-bad");
    // Every malformed kind answers the service-wide name of a headless
    // service of its own, so the parser is reached with a known name.
    let mut zone = zone_for(&[("web", &["web-0", "web-1", "web-2", "web-3"])]);
    let mut yaml = String::new();
    for kind in MalformedKind::ALL {
        let service = format!("bad-{}", kind.as_str());
        zone = zone.malformed(&format!("{service}.{DOMAIN}"), kind);
        yaml.push_str(&service_yaml(&service, &[("web-0", false)]));
        yaml.push_str("---\n");
    }
    zone.write(&s.zone_dir.path().join("zone.json")).unwrap();
    let want = MalformedKind::ALL.len() + 1;
    s.apply(&[("bad.yaml", yaml)], |st| {
        st["services"].as_array().is_some_and(|v| v.len() == want)
    });

    let before = counters(&s.status(), "dns");
    for kind in MalformedKind::ALL {
        let name = format!("bad-{}.{DOMAIN}", kind.as_str());
        // glibc may fail, retry over TCP or accept a partial answer: what
        // matters is what the kernel learned.
        let _ = resolve_in(s.cluster.client_ns("client"), Some(&s.cg), &name).unwrap();
    }
    let after = counters(&s.status(), "dns");
    let grew = |k: &str| after[k] - before[k];
    assert_eq!(
        grew("addrs_learned"),
        0,
        "before {before:?} after {after:?}"
    );
    let errors = grew("truncated")
        + grew("bad_pointer")
        + grew("bad_label")
        + grew("bad_header")
        + grew("question_mismatch");
    assert!(
        errors >= MalformedKind::ALL.len() as u64,
        "every malformed response is counted: before {before:?} after {after:?}"
    );
    assert!(grew("bad_pointer") >= 2, "{after:?}");
    assert!(grew("bad_label") >= 1, "{after:?}");
    assert!(grew("truncated") >= 2, "{after:?}");

    // The interceptor still works after all that.
    let learned = after["addrs_learned"];
    s.resolve("client", &format!("web.{DOMAIN}"));
    assert!(counters(&s.status(), "dns")["addrs_learned"] > learned);
}
