//! Load-aware policies, topology, drain, declared ports and
//! publishNotReadyAddresses end to end on the real kernel (product.md,
//! "Semantics"): clients resolve the service name through glibc from a
//! CoreDNS-like server, keep the first address, and connect to it over and
//! over; which pod answers is what the policy chose.
//!
//! Privileged. Every address lives in namespaces the test creates; every
//! client and server runs inside them.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
    time::Duration,
};

use headway_testbed::{
    Cgroup, Child, Cluster, ConnectReport, ResolvConf, Zone,
    agent::{Agent, Bpffs, free_port, status_json, wait_for_status, wait_ready, wait_synced},
    manifests::{HeadlessService, PodEndpoint, documents, node, write_whole},
    require_root, resolve_in, run_client, run_client_by_name, start_dns_server, start_pod_servers,
};
use serde_json::{Value, json};

const PORT: u16 = 8080;
/// A second port every pod serves, which services may leave undeclared.
const OTHER_PORT: u16 = 9091;
/// Where pods run a server that keeps connections open (least-connections,
/// drain).
const HOLD_PORT: u16 = 9000;
const DNS: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 53);
const DOMAIN: &str = "demo.svc.cluster.local";

/// The pods: name, last address byte, node, zone.
const PODS: [(&str, u8, &str, &str); 4] = [
    ("p0", 10, "node-a", "zone-2"),
    ("p1", 11, "node-a", "zone-1"),
    ("p2", 12, "node-b", "zone-1"),
    ("p3", 13, "node-b", "zone-2"),
];

fn v4(pod: &str) -> Ipv4Addr {
    let (_, last, _, _) = PODS.iter().find(|p| p.0 == pod).unwrap();
    Ipv4Addr::new(10, 77, 0, *last)
}

fn v6(pod: &str) -> Ipv6Addr {
    let (_, last, _, _) = PODS.iter().find(|p| p.0 == pod).unwrap();
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, u16::from(*last))
}

/// How one pod appears in the manifests.
#[derive(Clone, Debug)]
struct PodState {
    ready: bool,
    terminating: bool,
    weight: Option<u32>,
    drain: bool,
}

impl Default for PodState {
    fn default() -> Self {
        PodState {
            ready: true,
            terminating: false,
            weight: None,
            drain: false,
        }
    }
}

/// The headless service `web` in namespace `demo`, its slices and pods, and
/// the Node objects (node-a is in zone-1).
#[derive(Clone, Debug)]
struct Manifest {
    policy: &'static str,
    topology: Option<&'static str>,
    ports: Vec<u16>,
    publish_not_ready: bool,
    pods: BTreeMap<&'static str, PodState>,
}

impl Manifest {
    fn new(policy: &'static str) -> Manifest {
        Manifest {
            policy,
            topology: None,
            ports: vec![],
            publish_not_ready: false,
            pods: PODS.iter().map(|p| (p.0, PodState::default())).collect(),
        }
    }

    fn pod(mut self, name: &'static str, edit: impl FnOnce(&mut PodState)) -> Manifest {
        edit(self.pods.get_mut(name).unwrap());
        self
    }

    fn without(mut self, name: &str) -> Manifest {
        self.pods.remove(name);
        self
    }

    fn yaml(&self) -> String {
        let mut svc = HeadlessService::new("demo", "web")
            .policy(self.policy)
            .publish_not_ready(self.publish_not_ready);
        if let Some(t) = self.topology {
            svc = svc.annotation("headway.dev/topology", t);
        }
        for p in &self.ports {
            svc = svc.port(&format!("p{p}"), *p);
        }
        for (name, state) in &self.pods {
            let (_, _, node, zone) = PODS.iter().find(|p| p.0 == *name).unwrap();
            let addrs: [IpAddr; 2] = [v4(name).into(), v6(name).into()];
            let mut pod = PodEndpoint::new(name, addrs)
                .ready(state.ready)
                .terminating(state.terminating)
                .on_node(node, zone)
                .label("app", "web");
            if let Some(w) = state.weight {
                pod = pod.label("headway.dev/weight", &w.to_string());
            }
            if state.drain {
                pod = pod.label("headway.dev/drain", "true");
            }
            svc = svc.endpoint(pod);
        }
        let mut objects = svc.objects();
        objects.extend([node("node-a", "zone-1"), node("node-b", "zone-2")]);
        documents(&objects)
    }
}

/// The pod servers answer with their name on `PORT` and `OTHER_PORT`, and
/// keep connections open on `HOLD_PORT`.
struct Setup {
    cluster: Cluster,
    cg: Cgroup,
    bpffs: Bpffs,
    manifests: tempfile::TempDir,
    agent: Agent,
    metrics_port: u16,
    _servers: Vec<Child>,
    _dns: Child,
    _zone_dir: tempfile::TempDir,
    _resolvers: Vec<ResolvConf>,
}

const CLIENTS: [&str; 3] = ["client", "client2", "holder"];

impl Setup {
    fn new(name: &str, manifest: &Manifest, agent_args: &[&str]) -> Setup {
        let mut b = Cluster::builder();
        for (pod, _, _, _) in PODS {
            b = b.pod(pod, v4(pod), Some(v6(pod)));
        }
        let mut b = b.client_at("dns", DNS, Some("fd77::53".parse().unwrap()));
        for client in CLIENTS {
            b = b.client(client);
        }
        let cluster = b.build().expect("build the test cluster");
        let mut servers = start_pod_servers(&cluster, PORT).expect("pod servers");
        servers.extend(start_pod_servers(&cluster, OTHER_PORT).expect("pod servers"));
        for (pod, _, _, _) in PODS {
            servers.push(start_hold_server(&cluster, pod));
        }
        // DNS lists every pod, whatever its state: the point is what the
        // datapath does with addresses clients already hold.
        let mut zone = Zone::new();
        for (pod, _, _, _) in PODS {
            let name = format!("web.{DOMAIN}");
            zone = zone
                .a(&name, v4(pod))
                .aaaa(&name, v6(pod))
                .a(&format!("{pod}.{name}"), v4(pod))
                .aaaa(&format!("{pod}.{name}"), v6(pod));
        }
        let zone_dir = tempfile::tempdir().unwrap();
        zone.write(&zone_dir.path().join("zone.json")).unwrap();
        let dns = start_dns_server(
            cluster.client_ns("dns"),
            &zone_dir.path().join("zone.json"),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        )
        .expect("DNS server");
        let resolvers = CLIENTS
            .iter()
            .map(|c| ResolvConf::new(cluster.client_ns(c), DNS.into(), &[DOMAIN]).unwrap())
            .collect();
        let cg = Cgroup::new(name).unwrap();
        let bpffs = Bpffs::new().unwrap();
        let manifests = tempfile::tempdir().unwrap();
        fs::write(manifests.path().join("web.yaml"), manifest.yaml()).unwrap();
        let metrics_port = free_port().unwrap();
        let metrics = format!("--metrics-addr=127.0.0.1:{metrics_port}");
        let mut args = vec![metrics.as_str()];
        args.extend_from_slice(agent_args);
        let mut agent = Agent::start(manifests.path(), cg.path(), &bpffs, &args).unwrap();
        let pods = manifest.pods.len();
        wait_for_status(&bpffs, &mut agent, Duration::from_secs(15), |s| {
            pod_count(s) == pods
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
            agent,
            metrics_port,
            _servers: servers,
            _dns: dns,
            _zone_dir: zone_dir,
            _resolvers: resolvers,
        }
    }

    /// Rewrites the manifests (whole) and waits until `ready` holds, then
    /// until the agent has written the change to the end: the status shows
    /// it (`services`, `svc_endpoints`) before `svc_steering` and the DNS
    /// index, which connect() decides by. Returns the status that held.
    fn apply(&mut self, manifest: &Manifest, ready: impl Fn(&Value) -> bool) -> Value {
        write_whole(&self.manifests.path().join("web.yaml"), &manifest.yaml()).unwrap();
        let timeout = Duration::from_secs(15);
        let status = wait_for_status(&self.bpffs, &mut self.agent, timeout, ready).unwrap();
        let dir = self.manifests.path();
        wait_synced(&mut self.agent, self.metrics_port, dir, timeout).unwrap();
        status
    }

    /// Resolves the service name in `client` (glibc); the first IPv4 and
    /// IPv6 addresses it returned.
    fn resolve(&self, client: &str) -> (IpAddr, IpAddr) {
        let name = format!("web.{DOMAIN}");
        let report = resolve_in(self.cluster.client_ns(client), Some(&self.cg), &name).unwrap();
        assert!(report.error.is_none(), "resolving {name}: {report:?}");
        let first = |v4: bool| *report.addrs.iter().find(|a| a.is_ipv4() == v4).unwrap();
        (first(true), first(false))
    }

    fn connect(&self, client: &str, addr: IpAddr, port: u16, count: u32, udp: bool) -> Answers {
        let r = run_client(
            &self.cluster,
            client,
            Some(&self.cg),
            addr,
            port,
            count,
            udp,
        )
        .expect("client runs");
        assert_eq!(r.failures, 0, "connects to {addr}: {r:?}");
        Answers(r)
    }

    fn status(&self) -> Value {
        status_json(&self.bpffs).unwrap()
    }

    /// A counter of every pod of `web`, by pod name.
    fn pod_counter(&self, counter: &str) -> BTreeMap<String, u64> {
        self.status()["services"][0]["pods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["counters"][counter].as_u64().unwrap(),
                )
            })
            .collect()
    }

    fn decisions(&self) -> BTreeMap<String, u64> {
        serde_json::from_value(self.status()["services"][0]["counters"]["decisions"].clone())
            .unwrap()
    }
}

/// The pod an address belongs to.
fn pod_at(addr: IpAddr) -> &'static str {
    PODS.iter()
        .map(|p| p.0)
        .find(|p| IpAddr::from(v4(p)) == addr || IpAddr::from(v6(p)) == addr)
        .unwrap()
}

fn pod_count(status: &Value) -> usize {
    status["services"][0]["pods"].as_array().map_or(0, Vec::len)
}

/// Which pod answered how many attempts.
#[derive(Debug)]
struct Answers(ConnectReport);

impl Answers {
    fn of(&self, pod: &str) -> u64 {
        self.0.answers.get(pod).copied().unwrap_or(0)
    }

    fn total(&self) -> u64 {
        self.0.answers.values().sum()
    }

    fn only(&self, pods: &[&str]) -> bool {
        self.total() > 0 && self.0.answers.keys().all(|p| pods.contains(&p.as_str()))
    }

    /// Every attempt's getpeername() reported `addr:port`.
    fn peer_is(&self, addr: IpAddr, port: u16) -> bool {
        let want = std::net::SocketAddr::new(addr, port).to_string();
        self.0.peer_addrs.keys().all(|p| *p == want)
    }
}

/// Asserts that each pod's share of `answers` is within `tolerance`
/// (relative) of its expected share `expected[pod] / sum(expected)`.
fn assert_shares(answers: &Answers, expected: &[(&str, u64)], tolerance: f64) {
    // The measured distribution, for the record (`--nocapture`).
    eprintln!(
        "distribution {:?} (expected shares {expected:?})",
        answers.0.answers
    );
    let total = answers.total() as f64;
    let weight_sum: u64 = expected.iter().map(|(_, w)| w).sum();
    for (pod, weight) in expected {
        let want = total * *weight as f64 / weight_sum as f64;
        let got = answers.of(pod) as f64;
        assert!(
            (got - want).abs() <= want * tolerance,
            "{pod}: {got} answers, expected {want:.0} ± {:.0}%: {answers:?}",
            tolerance * 100.0
        );
    }
    let listed: Vec<&str> = expected.iter().map(|(p, _)| *p).collect();
    assert!(answers.only(&listed), "{answers:?}");
}

/// A server in `pod`'s namespace on `HOLD_PORT` that keeps each connection
/// open and answers every line with the pod's name.
fn start_hold_server(cluster: &Cluster, pod: &str) -> Child {
    let script = format!(
        "import socket, threading\n\
         s = socket.socket(socket.AF_INET6)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
         s.bind(('::', {HOLD_PORT}))\n\
         s.listen(128)\n\
         print('ready', flush=True)\n\
         def serve(c):\n\
         \x20   f = c.makefile('rwb')\n\
         \x20   for _ in f:\n\
         \x20       f.write(b'{pod}\\n'); f.flush()\n\
         while True:\n\
         \x20   c, _ = s.accept()\n\
         \x20   threading.Thread(target=serve, args=(c,), daemon=True).start()\n"
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-u", "-c", &script]);
    let mut child = cluster.pod_ns(pod).spawn(None, &cmd).unwrap();
    child.wait_ready().unwrap();
    child
}

/// Opens `per_addr` connections to each of `addrs` on `HOLD_PORT` from
/// client `client` (in the test cgroup), keeps them open until `release`
/// exists, then sends a line on each and prints who answered.
fn hold_connections(
    s: &Setup,
    client: &str,
    addrs: &[IpAddr],
    per_addr: u32,
    release: &Path,
) -> Child {
    let targets: Vec<String> = addrs.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "import socket, os, time, json\n\
         socks = []\n\
         for a in [{}]:\n\
         \x20   for _ in range({per_addr}):\n\
         \x20       fam = socket.AF_INET6 if ':' in a else socket.AF_INET\n\
         \x20       c = socket.socket(fam)\n\
         \x20       c.connect((a, {HOLD_PORT}))\n\
         \x20       socks.append(c)\n\
         print('ready', flush=True)\n\
         while not os.path.exists('{}'):\n\
         \x20   time.sleep(0.05)\n\
         answers = {{}}\n\
         for c in socks:\n\
         \x20   c.sendall(b'ping\\n')\n\
         \x20   name = c.makefile('rb').readline().decode().strip()\n\
         \x20   answers[name] = answers.get(name, 0) + 1\n\
         \x20   c.close()\n\
         open('{}.json', 'w').write(json.dumps(answers))\n",
        targets.join(", "),
        release.display(),
        release.display()
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-u", "-c", &script]);
    let mut child = s
        .cluster
        .client_ns(client)
        .spawn(Some(&s.cg), &cmd)
        .unwrap();
    child.wait_ready().unwrap();
    child
}

/// Lets a [`hold_connections`] client go; who answered on its connections.
fn release_held(mut holder: Child, release: &Path) -> BTreeMap<String, u64> {
    fs::write(release, "").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = holder.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "holder still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "holder failed: {status}");
    let out = fs::read_to_string(release.with_extension("json")).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("holder said {out:?}: {e}"))
}

#[test]
fn random_spreads_service_name_connections_evenly_and_stays_transparent() {
    if !require_root("random_spreads_service_name_connections_evenly_and_stays_transparent") {
        return;
    }
    let mut s = Setup::new("pol-random", &Manifest::new("random"), &[]);
    let (a4, a6) = s.resolve("client");
    let even = [("p0", 1), ("p1", 1), ("p2", 1), ("p3", 1)];

    let r4 = s.connect("client", a4, PORT, 1000, false);
    assert_shares(&r4, &even, 0.30);
    assert!(
        r4.peer_is(a4, PORT),
        "getpeername shows the asked address: {r4:?}"
    );
    let r6 = s.connect("client", a6, PORT, 1000, false);
    assert_shares(&r6, &even, 0.30);
    assert!(r6.peer_is(a6, PORT), "{r6:?}");
    // Connected UDP: the replies come back from the asked address (the
    // client drops any other), and they spread too.
    let udp = s.connect("client", a4, PORT, 400, true);
    assert_shares(&udp, &even, 0.30);

    // What headway counted matches what the clients saw, pod by pod.
    let tcp = s.pod_counter("tcp_connects");
    for (pod, _) in even {
        assert_eq!(tcp[pod], r4.of(pod) + r6.of(pod), "{pod}: {tcp:?}");
    }
    let d = s.decisions();
    // 2400 choices, plus glibc's address-sorting UDP connects (one per
    // answer it sorts: 4 per family).
    let chosen = d["steered_balanced"] + d["kept_balanced"];
    assert!((2400..=2400 + 8).contains(&chosen), "{d:?}");
    let kept_at_asked = r4.of(pod_at(a4)) + r6.of(pod_at(a6)) + udp.of(pod_at(a4));
    assert!(
        d["kept_balanced"] >= kept_at_asked,
        "connects that landed on the asked pod are counted as kept: {d:?}"
    );
    s.agent.check_running().unwrap();
}

#[test]
fn weighted_follows_pod_weights() {
    if !require_root("weighted_follows_pod_weights") {
        return;
    }
    let m = Manifest::new("weighted")
        .pod("p0", |p| p.weight = Some(100))
        .pod("p1", |p| p.weight = Some(200))
        .pod("p2", |p| p.weight = Some(300))
        .pod("p3", |p| p.weight = Some(0));
    let s = Setup::new("pol-weighted", &m, &[]);
    let (a4, a6) = s.resolve("client");
    let weights = [("p0", 100), ("p1", 200), ("p2", 300)];
    let r4 = s.connect("client", a4, PORT, 3000, false);
    assert_shares(&r4, &weights, 0.20);
    let r6 = s.connect("client", a6, PORT, 3000, false);
    assert_shares(&r6, &weights, 0.20);
    assert_eq!(r4.of("p3") + r6.of("p3"), 0, "weight 0 gets nothing");

    // Without the label a pod weighs 100: p3 joins with p0's share.
    let m = Manifest::new("weighted")
        .pod("p1", |p| p.weight = Some(200))
        .pod("p2", |p| p.weight = Some(300));
    let mut s = s;
    s.apply(&m, |st| {
        st["services"][0]["backends_v4"].as_u64() == Some(1 + 2 + 3 + 1)
    });
    let r4 = s.connect("client", a4, PORT, 3500, false);
    assert_shares(
        &r4,
        &[("p0", 100), ("p1", 200), ("p2", 300), ("p3", 100)],
        0.20,
    );
}

#[test]
fn least_connections_moves_new_connections_to_less_loaded_pods() {
    if !require_root("least_connections_moves_new_connections_to_less_loaded_pods") {
        return;
    }
    let s = Setup::new("pol-leastconn", &Manifest::new("least-connections"), &[]);
    // The holder never resolved anything: its connections go where it
    // asked (p0 and p1) and only load them.
    let release = s.manifests.path().join("release");
    let busy: Vec<IpAddr> = ["p0", "p1"]
        .iter()
        .flat_map(|p| [IpAddr::from(v4(p)), IpAddr::from(v6(p))])
        .collect();
    let holder = hold_connections(&s, "holder", &busy, 4, &release);
    let active = s.pod_counter("active_tcp");
    assert_eq!(
        (active["p0"], active["p1"], active["p2"], active["p3"]),
        (8, 8, 0, 0),
        "{active:?}"
    );

    // Power of two choices: a loaded pod wins only when both picks are
    // loaded (1 in 6 with 2 loaded pods of 4); random would give half.
    let (a4, a6) = s.resolve("client");
    for addr in [a4, a6] {
        let r = s.connect("client", addr, PORT, 300, false);
        let idle = r.of("p2") + r.of("p3");
        eprintln!("least-connections with p0, p1 loaded: {:?}", r.0.answers);
        assert!(idle >= 210, "at least 70% to the idle pods: {r:?}");
    }
    let held = release_held(holder, &release);
    assert_eq!(held, BTreeMap::from([("p0".into(), 8), ("p1".into(), 8)]));
    // Closed: the counts go back to zero, and the choice is even again.
    // (A close reaches TCP_CLOSE asynchronously: FIN and ACKs.)
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut active = s.pod_counter("active_tcp");
    while !active.values().all(|n| *n == 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        active = s.pod_counter("active_tcp");
    }
    assert!(active.values().all(|n| *n == 0), "{active:?}");
    let r = s.connect("client", a4, PORT, 1000, false);
    assert_shares(&r, &[("p0", 1), ("p1", 1), ("p2", 1), ("p3", 1)], 0.30);
}

#[test]
fn topology_prefers_local_pods_and_falls_back_to_all() {
    if !require_root("topology_prefers_local_pods_and_falls_back_to_all") {
        return;
    }
    // This agent runs on node-a (p0, p1), which is in zone-1 (p1, p2).
    let mut m = Manifest::new("random");
    m.topology = Some("prefer-node");
    let mut s = Setup::new("pol-topology", &m, &["--node-name", "node-a"]);
    let (a4, a6) = s.resolve("client");
    for addr in [a4, a6] {
        let r = s.connect("client", addr, PORT, 200, false);
        assert_shares(&r, &[("p0", 1), ("p1", 1)], 0.35);
    }

    m.topology = Some("prefer-zone");
    s.apply(&m, |st| st["services"][0]["topology"] == "prefer-zone");
    for addr in [a4, a6] {
        let r = s.connect("client", addr, PORT, 200, false);
        assert_shares(&r, &[("p1", 1), ("p2", 1)], 0.35);
    }

    // No eligible pod in the zone: every eligible pod is a candidate again.
    let m = m
        .pod("p1", |p| p.drain = true)
        .pod("p2", |p| p.ready = false);
    s.apply(&m, |st| {
        st["services"][0]["backends_v4"].as_u64() == Some(2)
    });
    for addr in [a4, a6] {
        let r = s.connect("client", addr, PORT, 200, false);
        assert_shares(&r, &[("p0", 1), ("p3", 1)], 0.35);
    }

    // An agent that does not know its node prefers nothing.
    let mut m = Manifest::new("random");
    m.topology = Some("prefer-node");
    let s = Setup::new("pol-nonode", &m, &[]);
    let (a4, _) = s.resolve("client");
    let r = s.connect("client", a4, PORT, 1000, false);
    assert_shares(&r, &[("p0", 1), ("p1", 1), ("p2", 1), ("p3", 1)], 0.30);
}

#[test]
fn drained_pod_gets_no_steered_connections_but_keeps_its_name_and_open_connections() {
    if !require_root(
        "drained_pod_gets_no_steered_connections_but_keeps_its_name_and_open_connections",
    ) {
        return;
    }
    let mut s = Setup::new("pol-drain", &Manifest::new("random"), &[]);
    let (a4, a6) = s.resolve("client");
    // client2 holds connections to p1, opened before the drain.
    let release = s.manifests.path().join("release");
    let p1 = [IpAddr::from(v4("p1")), IpAddr::from(v6("p1"))];
    let holder = hold_connections(&s, "client2", &p1, 2, &release);

    let m = Manifest::new("random").pod("p1", |p| p.drain = true);
    s.apply(&m, |st| {
        st["services"][0]["backends_v4"].as_u64() == Some(3)
    });
    let spread = [("p0", 1), ("p2", 1), ("p3", 1)];
    for addr in [a4, a6] {
        let r = s.connect("client", addr, PORT, 600, false);
        assert_shares(&r, &spread, 0.30);
    }
    // Even the drained pod's own address, learned from the service name,
    // moves away.
    let r = s.connect("client", v4("p1").into(), PORT, 60, false);
    assert_eq!(r.of("p1"), 0, "{r:?}");

    // Its own name still reaches it.
    for family in [4, 6] {
        let r = run_client_by_name(
            s.cluster.client_ns("client2"),
            Some(&s.cg),
            &format!("p1.web.{DOMAIN}"),
            PORT,
            5,
            false,
            Some(family),
        )
        .unwrap();
        assert_eq!(r.report.answers.get("p1"), Some(&5), "{r:?}");
    }
    // Connections open before the drain still talk to p1.
    let held = release_held(holder, &release);
    assert_eq!(held, BTreeMap::from([("p1".into(), 4)]));
}

#[test]
fn only_declared_ports_are_steered_and_publish_not_ready_counts_as_eligible() {
    if !require_root("only_declared_ports_are_steered_and_publish_not_ready_counts_as_eligible") {
        return;
    }
    let mut m = Manifest::new("failover");
    m.ports = vec![PORT];
    let mut s = Setup::new("pol-ports", &m, &[]);
    // The client learns all four pods; then p3 leaves the service (its
    // server still runs) and p2 stops being ready.
    s.resolve("client");
    let m = m.without("p3").pod("p2", |p| p.ready = false);
    let st = s.apply(&m, |st| pod_count(st) == 3);
    assert_eq!(st["services"][0]["ports"], json!(["8080/TCP"]), "{st:#}");

    let live = ["p0", "p1"];
    for addr in [IpAddr::from(v4("p3")), v6("p3").into()] {
        // The declared port fails over; any other port is left alone.
        let r = s.connect("client", addr, PORT, 20, false);
        assert!(r.only(&live), "{r:?}");
        let r = s.connect("client", addr, OTHER_PORT, 10, false);
        assert_eq!(r.of("p3"), 10, "{r:?}");
    }
    let r = s.connect("client", v4("p2").into(), PORT, 20, false);
    assert!(r.only(&live), "not ready moves: {r:?}");
    let d = s.decisions();
    // 20 connects to the other port, and glibc's own: getaddrinfo sorts its
    // 8 answers by connect()ing a UDP socket to each (a port the service
    // does not declare for UDP).
    assert_eq!(d["kept_port"], 20 + 8, "{d:?}");
    assert_eq!(d["steered_gone"], 40, "{d:?}");
    assert_eq!(d["steered_not_eligible"], 20, "{d:?}");

    // Nine declared ports are more than a service's steering entry
    // carries: connect() reads them from `svc_ports`, to the same effect.
    let mut many = m.clone();
    many.ports = (0..9).map(|i| PORT + 100 * i).collect();
    s.apply(&many, |st| {
        st["services"][0]["ports"].as_array().map(Vec::len) == Some(9)
    });
    let r = s.connect("client", v4("p3").into(), PORT, 20, false);
    assert!(r.only(&live), "{r:?}");
    let r = s.connect("client", v4("p3").into(), OTHER_PORT, 10, false);
    assert_eq!(r.of("p3"), 10, "{r:?}");

    // publishNotReadyAddresses: the not-ready pod is eligible again, so a
    // client that holds its address keeps it; a terminating pod is not.
    let mut m = m;
    m.publish_not_ready = true;
    s.apply(&m, |st| {
        st["services"][0]["backends_v4"].as_u64() == Some(3)
    });
    let r = s.connect("client", v4("p2").into(), PORT, 20, false);
    assert_eq!(r.of("p2"), 20, "{r:?}");
    assert!(s.decisions()["kept_eligible"] >= 20);
    let m = m.pod("p1", |p| p.terminating = true);
    s.apply(&m, |st| {
        st["services"][0]["backends_v4"].as_u64() == Some(2)
    });
    let r = s.connect("client", v4("p1").into(), PORT, 20, false);
    assert!(r.only(&["p0", "p2"]), "terminating moves: {r:?}");
}
