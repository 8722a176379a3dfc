//! The connect-time decision on the real kernel, rule by rule (product.md,
//! "Semantics"). What a client learned from DNS is planted straight into
//! `dns_obs` here, so these cases test the decision alone; the DNS
//! interceptor that learns it has tests of its own.
//!
//! Privileged. Every address lives in namespaces the test creates and every
//! client runs in one of them. The agent runs in the "node" namespace, which
//! it therefore treats as the host's.
use std::{collections::BTreeMap, fs, net::IpAddr, path::Path, time::Duration};

use aya::maps::{Array, Map, MapData};
use headway::{map_plan::addr_key, pinned::Maps};
use headway_common::{
    AddrIndex, AddrSlot, Backend, NO_POD, OBS_MAX_PAGES, OBS_PAGE_SLOTS, ObservationCacheEntry,
    ServiceSteering, SockSlot, addr_slot_flags, map_names, name_kind, obs_cache, obs_stamp,
    program_names, steering_backends,
};
use headway_testbed::{
    Cgroup, Child, Cluster, ConnectReport,
    agent::{Agent, Bpffs, index_caught_up, netns_cookie, settle, status_json, wait_for_status},
    bulk::{start_holder, start_sinks},
    manifests::{HeadlessService, PodEndpoint},
    require_root, run_client, start_pod_servers,
};
use serde_json::Value;

const PORT: u16 = 8080;

/// Service `name` (policy `policy`) over `pods` (name, ready), with each
/// pod's IPv4 address and, with `ipv6`, its IPv6 address.
fn service(
    c: &Cluster,
    name: &str,
    policy: &str,
    pods: &[(&str, bool)],
    ipv6: bool,
) -> HeadlessService {
    let mut svc = HeadlessService::new("demo", name).policy(policy);
    for (pod, ready) in pods {
        let p = c.pod(pod);
        let addrs = p
            .addr(false)
            .into_iter()
            .chain(p.addr(true).filter(|_| ipv6));
        svc = svc.endpoint(PodEndpoint::new(pod, addrs).ready(*ready));
    }
    svc
}

fn write_manifests(dir: &Path, c: &Cluster) {
    let web = [("web-0", true), ("web-1", true), ("web-2", false)];
    service(c, "web", "failover", &web, true)
        .write_to(dir)
        .unwrap();
    service(c, "other", "failover", &[("other-0", true)], false)
        .write_to(dir)
        .unwrap();
    service(c, "watch", "observe", &[("watch-0", false)], false)
        .write_to(dir)
        .unwrap();
}

fn build_cluster() -> Cluster {
    let v6 = |s: &str| Some(s.parse().unwrap());
    Cluster::builder()
        .pod("web-0", "10.77.0.10".parse().unwrap(), v6("fd77::10"))
        .pod("web-1", "10.77.0.11".parse().unwrap(), v6("fd77::11"))
        .pod("web-2", "10.77.0.12".parse().unwrap(), v6("fd77::12"))
        .pod("other-0", "10.77.0.20".parse().unwrap(), None)
        .pod("watch-0", "10.77.0.30".parse().unwrap(), None)
        .client("client")
        .client("node")
        .build()
        .expect("build the test cluster")
}

/// The cluster with its pod servers, and the agent (in the "node"
/// namespace, which it therefore treats as the host's) following
/// `write_manifests`, synced.
struct Bed {
    cluster: Cluster,
    _servers: Vec<Child>,
    cg: Cgroup,
    bpffs: Bpffs,
    manifests: tempfile::TempDir,
    agent: Agent,
}

impl Bed {
    fn start(cgroup: &str) -> Bed {
        Bed::start_with(cgroup, &[])
    }

    /// [`Bed::start`] with more agent flags.
    fn start_with(cgroup: &str, flags: &[&str]) -> Bed {
        let cluster = build_cluster();
        let servers = start_pod_servers(&cluster, PORT).expect("start pod servers");
        let cg = Cgroup::new(cgroup).unwrap();
        let bpffs = Bpffs::new().unwrap();
        let manifests = tempfile::tempdir().unwrap();
        write_manifests(manifests.path(), &cluster);
        let node = cluster.client_ns("node");
        let mut agent = Agent::start_in(node, manifests.path(), cg.path(), &bpffs, flags).unwrap();
        wait_for_status(&bpffs, &mut agent, Duration::from_secs(15), |s| {
            s["services"].as_array().is_some_and(|v| v.len() == 3)
        })
        .unwrap();
        wait_indexed(&bpffs);
        Bed {
            cluster,
            _servers: servers,
            cg,
            bpffs,
            manifests,
            agent,
        }
    }
}

/// Waits until the DNS index has every address the status shows, with its
/// pod: connect() accounts and decides by it, and the first sync writes it
/// last, on a thread of its own (the status lists pods before).
fn wait_indexed(bpffs: &Bpffs) {
    let caught_up = settle(
        Duration::from_secs(15),
        || index_caught_up(bpffs).unwrap(),
        |done| *done,
    );
    assert!(
        caught_up,
        "the DNS index never caught up with the endpoints"
    );
}

/// Plants "netns `cookie` got `addr` from a name of `service`".
fn plant(maps: &mut Maps, cookie: u64, addr: &str, service: &str, kind: u32) {
    let contents = maps.read_contents().unwrap();
    let service_id = contents
        .services
        .iter()
        .find(|(_, m)| headway::map_plan::decode_name(&m.name) == service)
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("service {service} not in the maps"));
    let addr = addr_key(addr.parse().unwrap());
    // An address a headless name handed out was an endpoint of its service
    // when it did, so the agent gave it a slot there (and kept it after the
    // pod was gone). 10.77.0.99 stands for such a pod; it gets a slot at
    // the top of the range, which the agent does not reach here.
    let has_slot = |maps: &Maps| {
        maps.dns_addrs.get(&addr, 0).is_ok_and(|i| {
            i.slots[..i.n as usize]
                .iter()
                .any(|s| s.service_id == service_id)
        })
    };
    // A pod's own address gets its slot when the agent writes the
    // endpoint, which may come just after the service shows in status: an
    // observation planted before would predate the slot, and say nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while maps.pod_addrs.get(&addr, 0).is_ok()
        && !has_slot(maps)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let has_slot = has_slot(maps);
    if !has_slot {
        let mut index = maps.dns_addrs.get(&addr, 0).unwrap_or(AddrIndex {
            pod_id: NO_POD,
            ..AddrIndex::default()
        });
        let i = index.n as usize;
        index.slots[i] = AddrSlot {
            service_id,
            slot: (OBS_PAGE_SLOTS * OBS_MAX_PAGES - 1 - i) as u16,
            // No endpoint of the service now, as the agent says of an
            // address that left it.
            flags: addr_slot_flags::KNOWN,
            since_ns: 1,
        };
        index.n += 1;
        maps.dns_addrs.insert(addr, index, 0).unwrap();
        // And in the table connect() reads first, as the agent would.
        assert!(maps.addr_table.put_by_hand(&addr, &index).unwrap());
    }
    headway::dns_index::stamp_observation(
        &mut maps.dns_obs,
        &maps.dns_addrs,
        cookie,
        &addr,
        service_id,
        kind,
    )
    .unwrap();
    // ... and in `pod_addrs`, and in the address filter, which keeps it
    // after the pod is gone.
    maps.addr_filter.insert(&addr).unwrap();
}

fn connect(c: &Cluster, client: &str, cg: &Cgroup, addr: &str, count: u32) -> ConnectReport {
    let addr: IpAddr = addr.parse().unwrap();
    let report = run_client(c, client, Some(cg), addr, PORT, count, false).expect("client runs");
    assert_eq!(report.failures, 0, "connects to {addr} failed: {report:?}");
    report
}

/// Runs a Python script as a client (its namespace and the test cgroup)
/// and returns what it printed; panics if it fails.
fn python_in_client(c: &Cluster, cg: &Cgroup, script: &str) -> String {
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", script]);
    let (status, out) = c
        .client_ns("client")
        .spawn(Some(cg), &cmd)
        .unwrap()
        .wait_output(Duration::from_secs(15))
        .unwrap();
    assert!(status.success(), "python client failed: {out}");
    out
}

/// One request/response over a connected UDP socket from the client, in
/// Python (a real client that is not ours): returns the reply's source
/// address and port, the answering pod, and getpeername's address.
fn udp_exchange(
    c: &Cluster,
    cg: &Cgroup,
    addr: &str,
    family: &str,
) -> (String, u16, String, String) {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         s.connect(('{addr}', {PORT}))\n\
         s.send(b'hi')\n\
         data, src = s.recvfrom(100)\n\
         print(src[0], src[1], data.decode().strip(), s.getpeername()[0])\n"
    );
    let out = python_in_client(c, cg, &script);
    let f: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(f.len(), 4, "{out}");
    (
        f[0].to_string(),
        f[1].parse().unwrap(),
        f[2].to_string(),
        f[3].to_string(),
    )
}

/// `count` datagrams from one unconnected UDP socket (Python `sendto`),
/// each answered: (reply source "ip:port", answering pod) per datagram.
fn udp_sendto(c: &Cluster, cg: &Cgroup, addr: &str, count: u32) -> Vec<(String, String)> {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         for _ in range({count}):\n\
         \x20   s.sendto(b'hi', ('{addr}', {PORT}))\n\
         \x20   data, src = s.recvfrom(100)\n\
         \x20   print(f'{{src[0]}}:{{src[1]}}', data.decode().strip())\n"
    );
    let out = python_in_client(c, cg, &script);
    out.lines()
        .map(|l| {
            let (src, pod) = l.split_once(' ').unwrap();
            (src.to_string(), pod.to_string())
        })
        .collect()
}

fn answered_only_by(report: &ConnectReport, pods: &[&str]) -> bool {
    report.answers.keys().all(|p| pods.contains(&p.as_str()))
}

fn steering(status: &Value) -> BTreeMap<String, u64> {
    serde_json::from_value(status["steering"].clone()).unwrap()
}

#[test]
fn failover_steers_only_service_name_lookups_of_ineligible_addresses() {
    if !require_root("failover_steers_only_service_name_lookups_of_ineligible_addresses") {
        return;
    }
    let Bed {
        cluster,
        _servers,
        cg,
        bpffs,
        manifests: _manifests,
        agent,
    } = Bed::start("steering");
    let node = cluster.client_ns("node");

    let client = netns_cookie(cluster.client_ns("client")).unwrap();
    let host = netns_cookie(node).unwrap();
    let mut maps = Maps::open_pinned(bpffs.path()).unwrap();
    let svc = name_kind::SERVICE;
    // A pod that is gone (10.77.0.99 is nobody now), one not ready, one
    // whose address another service's pod has taken, and an eligible one.
    plant(&mut maps, client, "10.77.0.99", "web", svc);
    plant(&mut maps, client, "10.77.0.12", "web", svc);
    plant(&mut maps, client, "10.77.0.20", "web", svc);
    plant(&mut maps, client, "10.77.0.11", "web", svc);
    plant(&mut maps, client, "fd77::99", "web", svc);
    // The pod-specific name of a not-ready pod: never moved.
    plant(&mut maps, client, "fd77::12", "web", name_kind::POD);
    // An `observe` service: never moved, even when not ready.
    plant(&mut maps, client, "10.77.0.30", "watch", svc);
    // The host (the agent's netns) resolved web-2 by the service name.
    plant(&mut maps, host, "10.77.0.12", "web", svc);

    let live = ["web-0", "web-1"];
    let gone = connect(&cluster, "client", &cg, "10.77.0.99", 20);
    assert!(answered_only_by(&gone, &live), "{gone:?}");
    // Transparent: getpeername reports the address the client asked for.
    assert_eq!(
        gone.peer_addrs,
        BTreeMap::from([("10.77.0.99:8080".to_string(), 20)]),
        "{gone:?}"
    );
    let not_ready = connect(&cluster, "client", &cg, "10.77.0.12", 20);
    assert!(answered_only_by(&not_ready, &live), "{not_ready:?}");
    let reused = connect(&cluster, "client", &cg, "10.77.0.20", 20);
    assert!(answered_only_by(&reused, &live), "{reused:?}");
    let gone_v6 = connect(&cluster, "client", &cg, "fd77::99", 10);
    assert!(answered_only_by(&gone_v6, &live), "{gone_v6:?}");
    assert_eq!(
        gone_v6.peer_addrs,
        BTreeMap::from([("[fd77::99]:8080".to_string(), 10)]),
        "{gone_v6:?}"
    );
    // Connected UDP: the reply is answered by a live pod but comes from
    // the address asked for (recvmsg), and getpeername agrees.
    for (addr, family) in [("10.77.0.99", "AF_INET"), ("fd77::99", "AF_INET6")] {
        let (src, port, pod, peer) = udp_exchange(&cluster, &cg, addr, family);
        assert_eq!((src.as_str(), port, peer.as_str()), (addr, PORT, addr));
        assert!(live.contains(&pod.as_str()), "answered by {pod}");
    }
    // Unconnected UDP (sendto): one pod is chosen for the socket and kept;
    // every reply comes from the address asked for.
    let replies = udp_sendto(&cluster, &cg, "10.77.0.99", 3);
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert!(
        replies.iter().all(|(src, _)| src == "10.77.0.99:8080"),
        "{replies:?}"
    );
    assert!(
        replies.iter().all(|(_, pod)| *pod == replies[0].1),
        "{replies:?}"
    );
    assert!(live.contains(&replies[0].1.as_str()), "{replies:?}");
    // Random choice over two pods: 20 tries all on one has p = 2^-19.
    assert_eq!(
        not_ready.answers.len(),
        2,
        "both live pods get some: {not_ready:?}"
    );

    let eligible = connect(&cluster, "client", &cg, "10.77.0.11", 5);
    assert_eq!(eligible.answers.get("web-1"), Some(&5));
    let pod_name = connect(&cluster, "client", &cg, "fd77::12", 5);
    assert_eq!(pod_name.answers.get("web-2"), Some(&5));
    let observed = connect(&cluster, "client", &cg, "10.77.0.30", 5);
    assert_eq!(observed.answers.get("watch-0"), Some(&5));
    let from_host = connect(&cluster, "node", &cg, "10.77.0.12", 5);
    assert_eq!(from_host.answers.get("web-2"), Some(&5));
    // No DNS observation at all: never moved.
    let other = connect(&cluster, "node", &cg, "10.77.0.20", 3);
    assert_eq!(other.answers.get("other-0"), Some(&3));

    let status = status_json(&bpffs).unwrap();
    let s = steering(&status);
    // 20 + 10 TCP, the 2 connected UDP exchanges, and 1 unconnected UDP
    // socket (its choice is made once, not per datagram).
    assert_eq!(s["steered_gone"], 33, "{s:?}");
    assert_eq!(s["steered_not_eligible"], 20, "{s:?}");
    assert_eq!(s["steered_reused"], 20, "{s:?}");
    assert_eq!(s["kept_pod_name"], 5, "{s:?}");
    assert_eq!(s["kept_observe"], 5, "{s:?}");
    assert_eq!(s["kept_host_netns"], 5, "{s:?}");
    assert_eq!(s["kept_no_dns"], 3, "{s:?}");
    assert_eq!(s["no_eligible_pod"], 0, "{s:?}");

    // Per pod: what was steered in adds up, and the connects counted are
    // where the connections really went.
    let pods = &status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap()["pods"];
    let counter = |pod: &str, field: &str| -> u64 {
        pods.as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == pod)
            .unwrap()["counters"][field]
            .as_u64()
            .unwrap()
    };
    let steered_in = counter("web-0", "steered_in") + counter("web-1", "steered_in");
    assert_eq!(steered_in, 73);
    let answers = |pod: &str| -> u64 {
        [&gone, &not_ready, &reused, &gone_v6, &eligible]
            .iter()
            .map(|r| r.answers.get(pod).copied().unwrap_or(0))
            .sum()
    };
    assert_eq!(counter("web-0", "tcp_connects"), answers("web-0"));
    assert_eq!(counter("web-1", "tcp_connects"), answers("web-1"));
    assert_eq!(counter("web-2", "tcp_connects"), 10, "pod name + host");
    assert_eq!(counter("web-2", "steered_away"), 20);

    // A steered connect that is refused (no server on that port): its
    // record, taken at connect(), goes back when the client closes the
    // socket. Then every socket of this test is closed, and the socket
    // table holds nothing: no record outlives its socket.
    let refused = run_client(
        &cluster,
        "client",
        Some(&cg),
        "10.77.0.99".parse().unwrap(),
        PORT + 1,
        4,
        false,
    )
    .unwrap();
    assert_eq!(refused.failures, 4, "{refused:?}");
    let mut agent = agent;
    let sockets = |s: &Value, what: &str| s["sockets"][what].as_u64().unwrap();
    let released = wait_for_status(&bpffs, &mut agent, Duration::from_secs(15), |s| {
        sockets(s, "in_use") == 0
    });
    let status = status_json(&bpffs).unwrap();
    assert!(released.is_ok(), "records left: {:#}", status["sockets"]);
    eprintln!("socket table: {}", status["sockets"]);
    // 70 steered TCP + 4 refused, 3 UDP, 23 unsteered TCP to pods.
    assert!(sockets(&status, "taken") >= 100, "{:#}", status["sockets"]);
    assert_eq!(sockets(&status, "taken"), sockets(&status, "freed"));
    assert_eq!(sockets(&status, "full"), 0);
    agent.stop().unwrap();
}

/// The state names of pod `pod` of service `service` in `headway status`
/// (None while the pod is not there).
fn pod_state(status: &Value, service: &str, pod: &str) -> Option<Vec<String>> {
    let services = status["services"].as_array().cloned().unwrap_or_default();
    let pods = services
        .iter()
        .find(|s| s["name"] == service)
        .map(|s| s["pods"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default();
    pods.iter()
        .find(|p| p["name"] == pod)
        .map(|p| serde_json::from_value(p["state"].clone()).unwrap())
}

#[test]
fn unconnected_udp_socket_leaves_a_pod_that_becomes_ineligible() {
    if !require_root("unconnected_udp_socket_leaves_a_pod_that_becomes_ineligible") {
        return;
    }
    let Bed {
        cluster,
        _servers,
        cg,
        bpffs,
        manifests,
        mut agent,
    } = Bed::start("udp-move");
    let client = netns_cookie(cluster.client_ns("client")).unwrap();
    let mut maps = Maps::open_pinned(bpffs.path()).unwrap();
    plant(&mut maps, client, "10.77.0.99", "web", name_kind::SERVICE);

    // One socket, three datagrams; then it waits for `go` and sends three
    // more. Files in a shared directory pace it.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let script = format!(
        "import os, socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         def ask():\n\
         \x20   s.sendto(b'hi', ('10.77.0.99', {PORT}))\n\
         \x20   data, src = s.recvfrom(100)\n\
         \x20   return f'{{src[0]}}:{{src[1]}} {{data.decode().strip()}}'\n\
         first = [ask() for _ in range(3)]\n\
         open('{d}/first.tmp', 'w').write('\\n'.join(first))\n\
         os.rename('{d}/first.tmp', '{d}/first')\n\
         deadline = time.time() + 30\n\
         while not os.path.exists('{d}/go'):\n\
         \x20   if time.time() > deadline: raise SystemExit('never told to go on')\n\
         \x20   time.sleep(0.05)\n\
         for _ in range(3): print(ask())\n"
    );
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", &script]);
    let mut child = cluster
        .client_ns("client")
        .spawn(Some(&cg), &cmd)
        .expect("start the UDP client");
    let first_path = dir.path().join("first");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !first_path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the client never got its first replies"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let replies = |text: &str| -> Vec<(String, String)> {
        text.lines()
            .map(|l| {
                let (src, pod) = l.split_once(' ').unwrap();
                (src.to_string(), pod.to_string())
            })
            .collect()
    };
    let first = replies(&fs::read_to_string(&first_path).unwrap());
    assert_eq!(first.len(), 3, "{first:?}");
    let chosen = first[0].1.clone();
    assert!(["web-0", "web-1"].contains(&chosen.as_str()), "{first:?}");
    assert!(
        first
            .iter()
            .all(|(src, pod)| src == "10.77.0.99:8080" && *pod == chosen),
        "{first:?}"
    );

    // The chosen pod stops being ready.
    let other = if chosen == "web-0" { "web-1" } else { "web-0" };
    let web = [(chosen.as_str(), false), (other, true), ("web-2", false)];
    service(&cluster, "web", "failover", &web, false)
        .write_to(manifests.path())
        .unwrap();
    wait_for_status(&bpffs, &mut agent, Duration::from_secs(15), |s| {
        pod_state(s, "web", &chosen).is_some_and(|state| !state.iter().any(|f| f == "eligible"))
    })
    .unwrap();
    fs::write(dir.path().join("go"), "").unwrap();
    let (status, out) = child.wait_output(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "UDP client failed: {out}");
    let after = replies(&out);
    // The socket's next datagram chooses again: the other live pod, still
    // seen as the address asked for.
    assert_eq!(
        after,
        vec![("10.77.0.99:8080".to_string(), other.to_string()); 3],
        "moved off {chosen}"
    );
    let s = steering(&status_json(&bpffs).unwrap());
    assert_eq!(s["steered_gone"], 2, "one choice per socket and pod: {s:?}");
    agent.stop().unwrap();
}

#[test]
fn no_eligible_pod_fails_open() {
    if !require_root("no_eligible_pod_fails_open") {
        return;
    }
    let cluster = build_cluster();
    let _servers = start_pod_servers(&cluster, PORT).expect("start pod servers");
    let cg = Cgroup::new("failopen").unwrap();
    let bpffs = Bpffs::new().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    // web has only its not-ready pod.
    service(&cluster, "web", "failover", &[("web-2", false)], false)
        .write_to(manifests.path())
        .unwrap();
    // Its log in a file: the kernel programs report the fail-open there.
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("agent.log");
    let mut agent = Agent::start_with_log(manifests.path(), cg.path(), &bpffs, &[], &log).unwrap();
    // Synced with its pod: an observation planted before the agent gave
    // the pod's address its slot would predate the slot, and say nothing.
    wait_for_status(&bpffs, &mut agent, Duration::from_secs(15), |s| {
        s["services"]
            .as_array()
            .is_some_and(|v| v.len() == 1 && v[0]["pods"].as_array().is_some_and(|p| p.len() == 1))
    })
    .unwrap();
    wait_indexed(&bpffs);
    let client = netns_cookie(cluster.client_ns("client")).unwrap();
    let mut maps = Maps::open_pinned(bpffs.path()).unwrap();
    plant(&mut maps, client, "10.77.0.12", "web", name_kind::SERVICE);

    let report = connect(&cluster, "client", &cg, "10.77.0.12", 4);
    assert_eq!(report.answers.get("web-2"), Some(&4), "goes where asked");
    let s = steering(&status_json(&bpffs).unwrap());
    assert_eq!(s["no_eligible_pod"], 4, "{s:?}");

    // One line, not one per connect: at most one per second per CPU.
    let fail_open_lines = || {
        fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("no eligible pod") && l.contains("10.77.0.12"))
            .count()
    };
    // The kernel's log reaches the agent's asynchronously.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while fail_open_lines() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let cpus = std::thread::available_parallelism().unwrap().get();
    let lines = fail_open_lines();
    for line in fs::read_to_string(&log).unwrap().lines() {
        if line.contains("no eligible pod") {
            println!("agent log: {line}");
        }
    }
    assert!(
        (1..=cpus.min(4)).contains(&lines),
        "{lines} fail-open lines for 4 connects:\n{}",
        fs::read_to_string(&log).unwrap()
    );
    agent.stop().unwrap();
}

/// Positions of the socket table with `--max-sockets=1000` (room for
/// 1,024 sockets).
const SMALL_TABLE_POSITIONS: u32 = 2048;
/// Cookies from here up are far above any the kernel has handed out.
const FAKE_COOKIES: u64 = 1 << 62;

/// An agent with the small socket table, the client taught that
/// 10.77.0.99 came from `web`'s service-wide name (gone: connects to it
/// are steered), and the pinned table opened.
fn small_socket_table(name: &str) -> (Bed, Array<MapData, SockSlot>) {
    let bed = Bed::start_with(name, &["--max-sockets=1000"]);
    let client = netns_cookie(bed.cluster.client_ns("client")).unwrap();
    let mut maps = Maps::open_pinned(bed.bpffs.path()).unwrap();
    plant(&mut maps, client, "10.77.0.99", "web", name_kind::SERVICE);
    let pin = headway::pinned::map_pin(bed.bpffs.path(), map_names::SOCK_TABLE);
    let data = MapData::from_pin(&pin).expect("open the socket table");
    let table: Array<MapData, SockSlot> =
        Array::try_from(Map::from_map_data(data).unwrap()).unwrap();
    assert_eq!(table.len(), SMALL_TABLE_POSITIONS);
    (bed, table)
}

/// A slot holding a cookie no socket has, at position `p`.
fn fake_slot(p: u32) -> SockSlot {
    SockSlot {
        cookie: FAKE_COOKIES + u64::from(p),
        ..SockSlot::default()
    }
}

/// The socket table full (every position filled with cookies no socket
/// has): a steered connect still reaches a live pod, only without
/// transparency (fail open), and the full table is counted; once there is
/// room again, steered sockets are transparent again. The table is sized
/// with `--max-sockets` (1,000 → room for 1,024 in 2,048 positions): were
/// the programs placing sockets over the default 131,072 positions, most
/// would find theirs free even with these 2,048 taken.
#[test]
fn a_full_socket_table_fails_open() {
    if !require_root("a_full_socket_table_fails_open") {
        return;
    }
    let (bed, mut table) = small_socket_table("socktable-full");
    let (cluster, cg, bpffs) = (&bed.cluster, &bed.cg, &bed.bpffs);
    let positions = SMALL_TABLE_POSITIONS;
    for p in 0..positions {
        table.set(p, fake_slot(p), 0).unwrap();
    }
    let live = ["web-0", "web-1"];
    let full = connect(cluster, "client", cg, "10.77.0.99", 5);
    assert!(answered_only_by(&full, &live), "{full:?}");
    // No record: getpeername reports the pod the connection went to.
    assert!(
        full.peer_addrs
            .keys()
            .all(|a| a == "10.77.0.10:8080" || a == "10.77.0.11:8080"),
        "{full:?}"
    );
    let status = status_json(bpffs).unwrap();
    eprintln!("socket table full: {}", status["sockets"]);
    assert!(
        status["sockets"]["full"].as_u64().unwrap() >= 5,
        "{:#}",
        status["sockets"]
    );
    assert_eq!(status["sockets"]["capacity"], 1024);
    assert_eq!(steering(&status)["steered_gone"], 5);

    // Room again.
    for p in 0..positions {
        table.set(p, SockSlot::default(), 0).unwrap();
    }
    let again = connect(cluster, "client", cg, "10.77.0.99", 5);
    assert!(answered_only_by(&again, &live), "{again:?}");
    assert_eq!(
        again.peer_addrs,
        BTreeMap::from([("10.77.0.99:8080".to_string(), 5)]),
        "{again:?}"
    );
    bed.agent.stop().unwrap();
}

/// Sockets whose home position in the socket table is taken (here: every
/// other position, by cookies no socket has) go to a spill position,
/// counted at their home, and every hook still finds them there: steered
/// connections stay transparent, none finds the table full, and when they
/// close, their records and their homes' counts go back to zero.
#[test]
fn sockets_whose_home_is_taken_spill_and_are_found() {
    if !require_root("sockets_whose_home_is_taken_spill_and_are_found") {
        return;
    }
    let (bed, mut table) = small_socket_table("socktable-spill");
    let (cluster, cg, bpffs) = (&bed.cluster, &bed.cg, &bed.bpffs);
    let positions = SMALL_TABLE_POSITIONS;
    let mask = u64::from(positions - 1);
    for p in (0..positions).step_by(2) {
        table.set(p, fake_slot(p), 0).unwrap();
    }
    // The real sockets' slots: (position, cookie, displaced at it).
    let real = |table: &Array<MapData, SockSlot>| -> Vec<(u32, u64)> {
        (0..positions)
            .filter_map(|p| {
                let slot = table.get(&p, 0).unwrap();
                (slot.cookie != 0 && slot.cookie < FAKE_COOKIES).then_some((p, slot.cookie))
            })
            .collect()
    };
    let displaced_total = |table: &Array<MapData, SockSlot>| -> u64 {
        (0..positions)
            .map(|p| u64::from(table.get(&p, 0).unwrap().displaced))
            .sum()
    };

    // Connections held open (to sinks, which keep them open; the service
    // declares no port, so any is steered): consecutive cookies, so about
    // half of them find their home taken.
    const SINK_PORT: u16 = 9090;
    let _sinks = start_sinks(cluster, SINK_PORT, None).expect("start sinks");
    let holder = start_holder(
        cluster.client_ns("client"),
        Some(cg),
        "10.77.0.99".parse().unwrap(),
        SINK_PORT,
        16,
        false,
    )
    .expect("hold connections open");
    let held = real(&table);
    assert_eq!(held.len(), 16, "{held:?}");
    let spilled = held
        .iter()
        .filter(|(p, cookie)| u64::from(*p) != cookie & mask)
        .count() as u64;
    eprintln!("{spilled} of 16 held sockets sit at a spill position");
    assert!(spilled > 0, "no socket spilled: {held:?}");
    assert_eq!(displaced_total(&table), spilled, "{held:?}");

    // Short connections meanwhile: every one transparent.
    let live = ["web-0", "web-1"];
    let report = connect(cluster, "client", cg, "10.77.0.99", 20);
    assert!(answered_only_by(&report, &live), "{report:?}");
    assert_eq!(
        report.peer_addrs,
        BTreeMap::from([("10.77.0.99:8080".to_string(), 20)]),
        "{report:?}"
    );
    let status = status_json(bpffs).unwrap();
    assert_eq!(status["sockets"]["full"], 0, "{:#}", status["sockets"]);

    // Closed: no record, no count left.
    drop(holder);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !real(&table).is_empty() || displaced_total(&table) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "records left: {:?}, displaced {}",
            real(&table),
            displaced_total(&table)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = status_json(bpffs).unwrap();
    assert_eq!(status["sockets"]["in_use"], 0, "{:#}", status["sockets"]);
    bed.agent.stop().unwrap();
}

/// Sets the flags of every slot of `addr` in `dns_addrs` and its
/// `addr_table` entry, as an agent would write them.
fn set_slot_flags(maps: &mut Maps, addr: &str, flags: u16) {
    let addr = addr_key(addr.parse().unwrap());
    let mut index = maps.dns_addrs.get(&addr, 0).unwrap();
    for slot in &mut index.slots[..index.n as usize] {
        slot.flags = flags;
    }
    maps.dns_addrs.insert(addr, index, 0).unwrap();
    assert!(maps.addr_table.put_by_hand(&addr, &index).unwrap());
}

/// connect() takes an address's state in the service it was resolved
/// from out of the flags of its slot (no `svc_endpoints` lookup), and
/// from `svc_endpoints` when the slot has none (written by an agent older
/// than the flags: what a new datapath finds after an upgrade until the
/// agent has rewritten the slot).
#[test]
fn slot_flags_decide_eligibility_and_slots_without_them_ask_svc_endpoints() {
    if !require_root("slot_flags_decide_eligibility_and_slots_without_them_ask_svc_endpoints") {
        return;
    }
    let bed = Bed::start("slot-flags");
    let (cluster, cg, bpffs) = (&bed.cluster, &bed.cg, &bed.bpffs);
    let client = netns_cookie(cluster.client_ns("client")).unwrap();
    let mut maps = Maps::open_pinned(bpffs.path()).unwrap();
    let svc = name_kind::SERVICE;
    plant(&mut maps, client, "10.77.0.11", "web", svc);
    plant(&mut maps, client, "10.77.0.12", "web", svc);
    let live = ["web-0", "web-1"];
    let decisions = |bpffs: &Bpffs| steering(&status_json(bpffs).unwrap());

    // As the agent wrote them: web-1 eligible (kept), web-2 not ready.
    let kept = connect(cluster, "client", cg, "10.77.0.11", 5);
    assert_eq!(kept.answers.get("web-1"), Some(&5), "{kept:?}");
    let moved = connect(cluster, "client", cg, "10.77.0.12", 5);
    assert!(answered_only_by(&moved, &live), "{moved:?}");
    let s = decisions(bpffs);
    assert_eq!(
        (s["kept_eligible"], s["steered_not_eligible"]),
        (5, 5),
        "{s:?}"
    );

    // The flags are what connect() goes by: web-1's slot saying "not
    // eligible" sends its connections to the choice table, though
    // `svc_endpoints` says it is (the table, from `svc_endpoints`, still
    // holds web-1: a draw of it is kept as balanced).
    set_slot_flags(
        &mut maps,
        "10.77.0.11",
        addr_slot_flags::KNOWN | addr_slot_flags::MEMBER,
    );
    let flagged = connect(cluster, "client", cg, "10.77.0.11", 10);
    assert!(answered_only_by(&flagged, &live), "{flagged:?}");
    let s = decisions(bpffs);
    assert_eq!(s["kept_eligible"], 5, "{s:?}");
    assert_eq!(s["steered_not_eligible"] + s["kept_balanced"], 15, "{s:?}");

    // Slots without flags: `svc_endpoints` decides, as before the flags.
    set_slot_flags(&mut maps, "10.77.0.11", 0);
    set_slot_flags(&mut maps, "10.77.0.12", 0);
    let kept = connect(cluster, "client", cg, "10.77.0.11", 5);
    assert_eq!(kept.answers.get("web-1"), Some(&5), "{kept:?}");
    let moved = connect(cluster, "client", cg, "10.77.0.12", 5);
    assert!(answered_only_by(&moved, &live), "{moved:?}");
    let s = decisions(bpffs);
    assert_eq!(s["kept_eligible"], 10, "{s:?}");
    assert_eq!(s["steered_not_eligible"] + s["kept_balanced"], 20, "{s:?}");
}

/// connect() draws a pod from the first IPv4 slots its `svc_steering`
/// entry carries when their check holds, and from `svc_backends` when it
/// does not (an entry caught half written).
#[test]
fn inline_slots_are_used_when_their_check_holds_and_svc_backends_otherwise() {
    if !require_root("inline_slots_are_used_when_their_check_holds_and_svc_backends_otherwise") {
        return;
    }
    let bed = Bed::start("inline-slots");
    let (cluster, cg, bpffs) = (&bed.cluster, &bed.cg, &bed.bpffs);
    let client = netns_cookie(cluster.client_ns("client")).unwrap();
    let mut maps = Maps::open_pinned(bpffs.path()).unwrap();
    // web-2 is not ready: its address, resolved from web's name, is
    // steered to web-0 or web-1.
    plant(&mut maps, client, "10.77.0.12", "web", name_kind::SERVICE);
    let web = maps
        .read_contents()
        .unwrap()
        .services
        .iter()
        .find(|(_, m)| headway::map_plan::decode_name(&m.name) == "web")
        .map(|(id, _)| *id)
        .unwrap();
    let entry = maps.svc_steering.get(&web, 0).unwrap();
    assert_eq!(entry.backends_v4, 2, "{entry:?}");
    let pods: Vec<Backend> = entry.backends[..2]
        .iter()
        .map(|w| steering_backends::backend(*w))
        .collect();
    let web0 = addr_key("10.77.0.10".parse().unwrap());
    let web0_word = entry.backends[pods.iter().position(|b| b.addr == web0).unwrap()];
    let both = connect(cluster, "client", cg, "10.77.0.12", 20);
    assert!(answered_only_by(&both, &["web-0", "web-1"]), "{both:?}");
    assert_eq!(both.answers.len(), 2, "a draw over both: {both:?}");

    // Inline slots that name web-0 twice, with a good check: every draw
    // is web-0 (were `svc_backends` read, web-1 would get about half).
    let mut only_web0 = entry;
    only_web0.backends[..2].copy_from_slice(&[web0_word, web0_word]);
    only_web0.backends_check =
        steering_backends::check(entry.backends_v4, entry.preferred_v4, &only_web0.backends);
    maps.svc_steering.set(web, only_web0, 0).unwrap();
    let inline = connect(cluster, "client", cg, "10.77.0.12", 20);
    assert_eq!(inline.answers.get("web-0"), Some(&20), "{inline:?}");

    // The same slots with a check that does not hold: `svc_backends`.
    let torn = ServiceSteering {
        backends_check: only_web0.backends_check ^ 2,
        ..only_web0
    };
    maps.svc_steering.set(web, torn, 0).unwrap();
    let fallback = connect(cluster, "client", cg, "10.77.0.12", 20);
    assert!(
        answered_only_by(&fallback, &["web-0", "web-1"]),
        "{fallback:?}"
    );
    assert_eq!(fallback.answers.len(), 2, "a draw over both: {fallback:?}");
    let s = steering(&status_json(bpffs).unwrap());
    assert_eq!(s["steered_not_eligible"], 60, "{s:?}");
}

/// The observation cache of the programs attached under `bpffs` (it is
/// not pinned: found through the connect4 link's program).
fn obs_cache_of(bpffs: &Bpffs) -> Array<MapData, ObservationCacheEntry> {
    let link = headway::pinned::link_attachment(bpffs.path(), program_names::CONNECT4)
        .expect("connect4's link is pinned and attached");
    let program = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == link.prog_id)
        .expect("connect4's program is loaded");
    let id = program
        .map_ids()
        .expect("connect4's maps")
        .unwrap_or_default()
        .into_iter()
        .find(|id| {
            aya::maps::MapInfo::from_id(*id)
                .is_ok_and(|m| m.name_as_str() == Some(obs_cache::MAP_NAME))
        })
        .expect("connect4 uses the observation cache");
    let data = MapData::from_id(id).expect("open the observation cache");
    Array::try_from(Map::from_map_data(data).unwrap()).unwrap()
}

/// connect() takes what a client learned from the observation cache when
/// the entry for its key is whole and about that key, and from `dns_obs`
/// otherwise: a cache entry alone steers, one with a bad check or about
/// another netns says nothing, and a whole one wins over the page; the
/// same for IPv6 (connect6).
#[test]
fn observations_are_read_from_the_cache_first_and_dns_obs_when_it_misses() {
    if !require_root("observations_are_read_from_the_cache_first_and_dns_obs_when_it_misses") {
        return;
    }
    let bed = Bed::start("obs-cache");
    let (cluster, cg, bpffs) = (&bed.cluster, &bed.cg, &bed.bpffs);
    let client = netns_cookie(cluster.client_ns("client")).unwrap();
    let maps = Maps::open_pinned(bpffs.path()).unwrap();
    let mut cache = obs_cache_of(bpffs);
    // web-2 (10.77.0.12) is not ready: resolved from web's name, a
    // connect to it goes to web-0 or web-1.
    let web2 = addr_key("10.77.0.12".parse().unwrap());
    let index = maps.dns_addrs.get(&web2, 0).expect("web-2 has slots");
    let slot = index.slots[..index.n as usize][0];
    let tag = obs_cache::tag(slot.service_id, 4, slot.slot);
    let at = obs_cache::index(client, tag);
    let entry_for = |tag: u64, cookie: u64, kind: u32| {
        let stamp = obs_stamp(headway::dns_index::monotonic_ns(), kind);
        ObservationCacheEntry {
            netns_cookie: cookie,
            tag,
            stamp,
            check: obs_cache::check(cookie, tag, stamp),
        }
    };
    let entry = |cookie: u64, kind: u32| entry_for(tag, cookie, kind);
    let live = ["web-0", "web-1"];

    // Only the cache knows: steered.
    cache.set(at, entry(client, name_kind::SERVICE), 0).unwrap();
    let cached = connect(cluster, "client", cg, "10.77.0.12", 10);
    assert!(answered_only_by(&cached, &live), "{cached:?}");

    // The same entry with a check that does not hold (caught mid-write):
    // not trusted, and `dns_obs` has nothing.
    let mut torn = entry(client, name_kind::SERVICE);
    torn.check ^= 2;
    cache.set(at, torn, 0).unwrap();
    let unknown = connect(cluster, "client", cg, "10.77.0.12", 10);
    assert_eq!(unknown.answers.get("web-2"), Some(&10), "{unknown:?}");

    // The page says the service's name; a newer, whole cache entry says
    // the pod's own name: the cache is read first.
    let mut maps = maps;
    plant(&mut maps, client, "10.77.0.12", "web", name_kind::SERVICE);
    cache.set(at, entry(client, name_kind::POD), 0).unwrap();
    let by_pod_name = connect(cluster, "client", cg, "10.77.0.12", 10);
    assert_eq!(
        by_pod_name.answers.get("web-2"),
        Some(&10),
        "{by_pod_name:?}"
    );

    // The entry at the client's index is another netns's (a collision):
    // the page decides.
    cache
        .set(at, entry(client + 1_000_000, name_kind::POD), 0)
        .unwrap();
    let from_page = connect(cluster, "client", cg, "10.77.0.12", 10);
    assert!(answered_only_by(&from_page, &live), "{from_page:?}");

    // connect6 reads the cache too: an entry for web-2's IPv6 slot only.
    let web2_v6 = addr_key("fd77::12".parse().unwrap());
    let index_v6 = maps.dns_addrs.get(&web2_v6, 0).expect("web-2's IPv6 slots");
    let slot_v6 = index_v6.slots[..index_v6.n as usize][0];
    let tag_v6 = obs_cache::tag(slot_v6.service_id, 6, slot_v6.slot);
    let entry_v6 = entry_for(tag_v6, client, name_kind::SERVICE);
    cache
        .set(obs_cache::index(client, tag_v6), entry_v6, 0)
        .unwrap();
    let cached_v6 = connect(cluster, "client", cg, "fd77::12", 10);
    assert!(answered_only_by(&cached_v6, &live), "{cached_v6:?}");

    let s = steering(&status_json(bpffs).unwrap());
    assert_eq!(s["steered_not_eligible"], 30, "{s:?}");
    assert_eq!(s["kept_no_dns"], 10, "{s:?}");
    assert_eq!(s["kept_pod_name"], 10, "{s:?}");
}
