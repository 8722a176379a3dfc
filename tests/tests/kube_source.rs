//! The agent's `kube` source, with the real kube-rs client, against the
//! in-test fake API server (headway_testbed::fake_api): initial sync,
//! add/update/delete of services, slices and labelled pods, namespace
//! filter, watch dropped, 410 Gone and relist, API server down for a
//! while (with paged lists and with streaming lists), an endpoint moving
//! between slices removal first, the node's zone label changing, and an
//! agent restart that writes only what differs.
//!
//! Privileged: the agent loads and attaches its programs (to a cgroup the
//! test creates; no traffic is sent here). The API server is on loopback.
use std::{collections::BTreeMap, time::Duration};

use headway_testbed::{
    Cgroup, FakeApi,
    agent::{
        Agent, Bpffs, Source, bpftool_dump, free_port, http_get, parse_openmetrics, settle,
        status_json, syncs, wait_for_status, wait_ready,
    },
    fake_api::objects::{cluster_ip_service, headless_service, node, pod, slice},
    require_root,
};
use serde_json::{Value, json};

const SYNC: Duration = Duration::from_secs(20);

/// service (`ns/name`) → pod → (addresses, state), from `headway status`.
type View = BTreeMap<String, BTreeMap<String, (Vec<String>, Vec<String>)>>;

fn view(status: &Value) -> View {
    let mut out = View::new();
    for svc in status["services"].as_array().into_iter().flatten() {
        let key = format!(
            "{}/{}",
            svc["namespace"].as_str().unwrap(),
            svc["name"].as_str().unwrap()
        );
        let pods = out.entry(key).or_default();
        for p in svc["pods"].as_array().into_iter().flatten() {
            let strings = |v: &Value| -> Vec<String> {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect()
            };
            pods.insert(
                p["name"].as_str().unwrap().to_string(),
                (strings(&p["addresses"]), strings(&p["state"])),
            );
        }
    }
    out
}

fn pods_of<'a>(v: &'a View, svc: &str) -> Vec<&'a str> {
    v.get(svc)
        .map(|p| p.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

fn state_of<'a>(v: &'a View, svc: &str, pod: &str) -> Vec<&'a str> {
    v.get(svc)
        .and_then(|p| p.get(pod))
        .map(|(_, s)| s.iter().map(String::as_str).collect())
        .unwrap_or_default()
}

/// Waits until `headway status` satisfies `ok` (on the view).
fn wait_view(bpffs: &Bpffs, agent: &mut Agent, what: &str, ok: impl Fn(&View) -> bool) -> View {
    let status = wait_for_status(bpffs, agent, SYNC, |s| ok(&view(s)))
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    view(&status)
}

/// Entries in each map the agent writes, from bpftool.
fn map_sizes(bpffs: &Bpffs) -> BTreeMap<&'static str, usize> {
    [
        "services",
        "pods",
        "pod_addrs",
        "svc_endpoints",
        "svc_backends",
        "dns_names",
    ]
    .into_iter()
    .map(|m| (m, bpftool_dump(&bpffs.pin(m)).unwrap().len()))
    .collect()
}

/// The value of metric `name` with label `resource` (0 if absent).
fn metric(port: u16, name: &str, resource: &str) -> f64 {
    let (code, body) = http_get(port, "/metrics").unwrap();
    assert_eq!(code, 200, "{body}");
    parse_openmetrics(&body)
        .unwrap()
        .iter()
        .filter(|(n, l, _)| n == name && l.get("resource").map(String::as_str) == Some(resource))
        .map(|(_, _, v)| *v)
        .sum()
}

/// A fake API holding: headless `data/db` (db-0, db-1 in slice db-a;
/// db-2 in db-b), a ClusterIP `data/api` with a slice, headless
/// `shop/cart` (cart-0), headless `skip/hidden` (outside the agent's
/// namespaces), pod db-1 drained, and this node in zone-a.
fn seeded_api() -> FakeApi {
    let api = FakeApi::start().expect("start the fake API server");
    let apply = |v: Value| {
        api.apply(v).unwrap();
    };
    apply(headless_service(
        "data",
        "db",
        json!({"headway.dev/policy": "random"}),
    ));
    apply(slice(
        "data",
        "db-a",
        "db",
        &[("10.70.0.10", "db-0", true), ("10.70.0.11", "db-1", true)],
    ));
    apply(slice("data", "db-b", "db", &[("10.70.0.12", "db-2", true)]));
    apply(cluster_ip_service("data", "api"));
    let mut api_slice = slice("data", "api-x", "api", &[("10.70.0.20", "api-0", true)]);
    // A ClusterIP service's slices are not labelled headless.
    api_slice["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("service.kubernetes.io/headless");
    apply(api_slice);
    apply(headless_service("shop", "cart", json!({})));
    apply(slice(
        "shop",
        "cart-1",
        "cart",
        &[("10.70.1.10", "cart-0", true)],
    ));
    apply(headless_service("skip", "hidden", json!({})));
    apply(slice(
        "skip",
        "hidden-1",
        "hidden",
        &[("10.70.2.10", "hidden-0", true)],
    ));
    apply(pod("data", "db-1", json!({"headway.dev/drain": "true"})));
    apply(pod("data", "db-0", json!({"app": "db"}))); // no headway label
    apply(node("node-1", "zone-a"));
    api
}

struct Setup {
    api: FakeApi,
    bpffs: Bpffs,
    cg: Cgroup,
    port: u16,
    agent: Agent,
    _dir: tempfile::TempDir,
    source: Source,
}

fn start(test: &str) -> Setup {
    start_with(test, &[])
}

fn start_with(test: &str, extra: &[&str]) -> Setup {
    let api = seeded_api();
    let dir = tempfile::tempdir().unwrap();
    let source = Source::Kube(api.write_kubeconfig(dir.path()).unwrap());
    let bpffs = Bpffs::new().expect("mount a private bpffs");
    let cg = Cgroup::new(test).expect("create a cgroup");
    let port = free_port().unwrap();
    let agent = start_agent_with(&source, &cg, &bpffs, port, extra);
    Setup {
        api,
        bpffs,
        cg,
        port,
        agent,
        _dir: dir,
        source,
    }
}

fn start_agent(source: &Source, cg: &Cgroup, bpffs: &Bpffs, port: u16) -> Agent {
    start_agent_with(source, cg, bpffs, port, &[])
}

fn start_agent_with(
    source: &Source,
    cg: &Cgroup,
    bpffs: &Bpffs,
    port: u16,
    extra: &[&str],
) -> Agent {
    let metrics = format!("--metrics-addr=127.0.0.1:{port}");
    let mut args = vec![
        metrics.as_str(),
        "--namespace=data",
        "--namespace=shop",
        "--node-name=node-1",
    ];
    args.extend_from_slice(extra);
    Agent::start_with(source, cg.path(), bpffs, &args).expect("start the agent")
}

fn initial_view(v: &View) -> bool {
    pods_of(v, "data/db") == ["db-0", "db-1", "db-2"] && pods_of(v, "shop/cart") == ["cart-0"]
}

#[test]
fn kube_source_initial_sync_and_incremental_updates() {
    if !require_root("kube_source_initial_sync_and_incremental_updates") {
        return;
    }
    let mut s = start("kube-sync");
    let v = wait_view(&s.bpffs, &mut s.agent, "initial sync", initial_view);
    // Only headless services, only in the agent's namespaces.
    assert_eq!(
        v.keys().collect::<Vec<_>>(),
        ["data/db", "shop/cart"],
        "{v:#?}"
    );
    assert_eq!(
        state_of(&v, "data/db", "db-1"),
        ["ready", "serving", "drained"]
    );
    assert_eq!(
        state_of(&v, "data/db", "db-0"),
        ["ready", "serving", "eligible"]
    );
    // Ready once the first sync is complete, which the view shows before
    // its end (the DNS index and the sweep come after `svc_endpoints`).
    wait_ready(&mut s.agent, s.port, SYNC).expect("ready after the first sync");
    // Watches are per namespace, with the label selectors that keep the
    // agent's view small. Ready needs every list done, not the watches
    // that follow them: wait for those to be asked for.
    headway_testbed::fake_api::eventually(SYNC, "the slice watches", || {
        s.api.selectors("endpointslices").len() >= 4
    })
    .unwrap();
    assert_eq!(
        s.api.selectors("endpointslices"),
        ["service.kubernetes.io/headless"; 4],
        "one list and one watch per namespace"
    );
    let mut pod_selectors = s.api.selectors("pods");
    pod_selectors.sort();
    pod_selectors.dedup();
    assert_eq!(pod_selectors, ["headway.dev/drain", "headway.dev/weight"]);

    // A new service with its slice.
    s.api
        .apply(headless_service("shop", "queue", json!({})))
        .unwrap();
    s.api
        .apply(slice(
            "shop",
            "queue-1",
            "queue",
            &[
                ("10.70.1.20", "queue-0", true),
                ("10.70.1.21", "queue-1", false),
            ],
        ))
        .unwrap();
    let v = wait_view(&s.bpffs, &mut s.agent, "new service", |v| {
        pods_of(v, "shop/queue") == ["queue-0", "queue-1"]
    });
    assert_eq!(state_of(&v, "shop/queue", "queue-1"), Vec::<&str>::new());

    // A slice update: queue-1 becomes ready.
    s.api
        .apply(slice(
            "shop",
            "queue-1",
            "queue",
            &[
                ("10.70.1.20", "queue-0", true),
                ("10.70.1.21", "queue-1", true),
            ],
        ))
        .unwrap();
    wait_view(&s.bpffs, &mut s.agent, "slice update", |v| {
        state_of(v, "shop/queue", "queue-1") == ["ready", "serving", "eligible"]
    });

    // Labels: db-1 undrained (its pod loses the label: the drain watcher
    // sees it deleted), db-2 drained through a new labelled pod.
    s.api
        .apply(pod("data", "db-1", json!({"headway.dev/weight": "50"})))
        .unwrap();
    s.api
        .apply(pod("data", "db-2", json!({"headway.dev/drain": "true"})))
        .unwrap();
    wait_view(&s.bpffs, &mut s.agent, "pod labels", |v| {
        state_of(v, "data/db", "db-1") == ["ready", "serving", "eligible"]
            && state_of(v, "data/db", "db-2") == ["ready", "serving", "drained"]
    });
    // Deleting the labelled pod undrains it (its endpoint stays).
    assert!(s.api.delete("Pod", "data", "db-2"));
    wait_view(&s.bpffs, &mut s.agent, "pod deleted", |v| {
        state_of(v, "data/db", "db-2") == ["ready", "serving", "eligible"]
    });

    // An endpoint moves from slice db-a to db-b (new slice first, as the
    // EndpointSlice controller does): db-0 stays in the maps throughout.
    s.api
        .apply(slice(
            "data",
            "db-b",
            "db",
            &[("10.70.0.12", "db-2", true), ("10.70.0.10", "db-0", true)],
        ))
        .unwrap();
    s.api
        .apply(slice("data", "db-a", "db", &[("10.70.0.11", "db-1", true)]))
        .unwrap();
    // Removing a slice removes only its endpoints.
    assert!(s.api.delete("EndpointSlice", "data", "db-a"));
    let v = wait_view(&s.bpffs, &mut s.agent, "slice deleted", |v| {
        pods_of(v, "data/db") == ["db-0", "db-2"]
    });
    assert_eq!(v["data/db"]["db-0"].0, ["10.70.0.10"]);

    // A service in a namespace the agent does not watch never appears;
    // a service turned ClusterIP... cannot happen (immutable). Delete
    // everything: every map the services touched is empty again.
    s.api
        .apply(headless_service("skip", "other", json!({})))
        .unwrap();
    for (ns, name) in [("data", "db"), ("shop", "cart"), ("shop", "queue")] {
        assert!(s.api.delete("Service", ns, name));
    }
    wait_view(&s.bpffs, &mut s.agent, "services deleted", View::is_empty);
    let sizes = settle(
        SYNC,
        || map_sizes(&s.bpffs),
        |m| m.values().all(|n| *n == 0),
    );
    for (map, n) in sizes {
        assert_eq!(n, 0, "map {map} still has entries after every service went");
    }
    assert_eq!(status_json(&s.bpffs).unwrap()["services"], json!([]));
    s.agent.stop().expect("agent stops cleanly");
    drop(s.cg);
}

#[test]
fn kube_source_survives_watch_drops_expiry_and_api_outage() {
    if !require_root("kube_source_survives_watch_drops_expiry_and_api_outage") {
        return;
    }
    survives_faults(false);
}

/// The same faults with `--streaming-lists`: every (re)list is a watch
/// with `sendInitialEvents` ending at the `k8s.io/initial-events-end`
/// bookmark, and no list request is made at all.
#[test]
fn kube_source_with_streaming_lists_survives_watch_drops_expiry_and_api_outage() {
    if !require_root("kube_source_with_streaming_lists_survives_watch_drops_expiry_and_api_outage")
    {
        return;
    }
    survives_faults(true);
}

fn survives_faults(streaming: bool) {
    let (mut s, lists) = if streaming {
        (
            start_with("kube-faults-s", &["--streaming-lists"]),
            "stream",
        )
    } else {
        (start("kube-faults"), "list")
    };
    wait_view(&s.bpffs, &mut s.agent, "initial sync", initial_view);
    let lists_before = s.api.requests("services", lists);
    assert!(lists_before >= 1, "the first list was a {lists} request");
    if streaming {
        for plural in ["services", "endpointslices", "pods", "nodes"] {
            assert_eq!(
                s.api.requests(plural, "list"),
                0,
                "no paged list of {plural}"
            );
        }
    }

    // 1. Watches dropped: the watcher resumes from its resourceVersion
    // (no relist) and sees what changed.
    s.api.drop_watches();
    s.api
        .apply(slice(
            "shop",
            "cart-1",
            "cart",
            &[
                ("10.70.1.10", "cart-0", true),
                ("10.70.1.11", "cart-1", true),
            ],
        ))
        .unwrap();
    wait_view(
        &s.bpffs,
        &mut s.agent,
        "change after a dropped watch",
        |v| pods_of(v, "shop/cart") == ["cart-0", "cart-1"],
    );
    assert_eq!(
        s.api.requests("services", lists),
        lists_before,
        "a dropped watch resumes without relisting"
    );

    // 2. API server down for a while: the maps keep their last state and
    // the agent stays ready; meanwhile the cluster changes and history is
    // compacted, so the watcher's resourceVersion has expired when the
    // server comes back: 410 inside the stream, relist, converge
    // (including deletions that only a relist can reveal).
    let before_outage = view(&status_json(&s.bpffs).unwrap());
    s.api.set_down(true).unwrap();
    assert!(s.api.delete("Service", "shop", "cart"));
    s.api
        .apply(slice("data", "db-b", "db", &[("10.70.0.13", "db-3", true)]))
        .unwrap();
    s.api.expire();
    std::thread::sleep(Duration::from_secs(3));
    s.agent.check_running().unwrap();
    assert_eq!(
        view(&status_json(&s.bpffs).unwrap()),
        before_outage,
        "maps keep their last good state while the API is down"
    );
    assert_eq!(http_get(s.port, "/readyz").unwrap().0, 200);
    // The failed watch comes back to the agent after kube's backoff: wait
    // for it to be counted rather than assume the 3 s above were enough.
    headway_testbed::fake_api::eventually(SYNC, "the outage is counted", || {
        metric(s.port, "headway_watch_restarts_total", "services") >= 1.0
    })
    .unwrap();
    s.api.set_down(false).unwrap();
    wait_view(
        &s.bpffs,
        &mut s.agent,
        "converge after outage and 410",
        |v| !v.contains_key("shop/cart") && pods_of(v, "data/db") == ["db-0", "db-1", "db-3"],
    );
    assert!(s.api.requests("services", lists) > lists_before, "relisted");
    assert!(metric(s.port, "headway_relists_total", "services") >= 1.0);

    // 3. Expiry alone (server up): a dropped watch resuming from an
    // expired resourceVersion relists too.
    s.api.expire();
    let slice_lists = s.api.requests("endpointslices", lists);
    s.api.drop_watches();
    s.api
        .apply(pod("data", "db-0", json!({"headway.dev/drain": "true"})))
        .unwrap();
    wait_view(&s.bpffs, &mut s.agent, "converge after 410", |v| {
        state_of(v, "data/db", "db-0") == ["ready", "serving", "drained"]
    });
    eventually_more(|| s.api.requests("endpointslices", lists), slice_lists);
    if streaming {
        assert_eq!(s.api.requests("services", "list"), 0, "still no paged list");
    }
    s.agent.stop().expect("agent stops cleanly");
}

fn eventually_more(count: impl Fn() -> u64, than: u64) {
    headway_testbed::fake_api::eventually(SYNC, "relist", || count() > than).unwrap();
}

#[test]
fn kube_source_restart_writes_only_what_changed() {
    if !require_root("kube_source_restart_writes_only_what_changed") {
        return;
    }
    let mut s = start("kube-restart");
    wait_view(&s.bpffs, &mut s.agent, "initial sync", initial_view);
    let pods_before = bpftool_dump(&s.bpffs.pin("pods")).unwrap();
    s.agent.stop().expect("agent stops cleanly");

    // While no agent runs: one service goes, one pod is drained. The maps
    // still hold the old state (the datapath keeps working).
    assert!(s.api.delete("Service", "shop", "cart"));
    s.api
        .apply(pod("data", "db-0", json!({"headway.dev/drain": "true"})))
        .unwrap();
    let v = view(&status_json(&s.bpffs).unwrap());
    assert!(initial_view(&v), "{v:#?}");

    // A new agent with the API down cannot sync: it keeps the maps as they
    // are and is not ready.
    s.api.set_down(true).unwrap();
    let port = free_port().unwrap();
    let mut agent = start_agent(&s.source, &s.cg, &s.bpffs, port);
    headway_testbed::fake_api::eventually(SYNC, "metrics served", || {
        http_get(port, "/readyz").is_ok()
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    agent.check_running().unwrap();
    assert_eq!(http_get(port, "/readyz").unwrap().0, 503);
    assert_eq!(view(&status_json(&s.bpffs).unwrap()), v, "maps untouched");

    // API back: it syncs, and unchanged pods keep their ids (counters).
    s.api.set_down(false).unwrap();
    let after = wait_view(&s.bpffs, &mut agent, "sync after restart", |v| {
        !v.contains_key("shop/cart")
            && state_of(v, "data/db", "db-0") == ["ready", "serving", "drained"]
    });
    assert_eq!(pods_of(&after, "data/db"), ["db-0", "db-1", "db-2"]);
    headway_testbed::fake_api::eventually(SYNC, "ready", || {
        http_get(port, "/readyz").map(|r| r.0).ok() == Some(200)
    })
    .unwrap();
    let pods_after = bpftool_dump(&s.bpffs.pin("pods")).unwrap();
    let kept: Vec<&Value> = pods_after
        .iter()
        .filter(|p| pods_before.contains(p))
        .collect();
    assert_eq!(kept.len(), 3, "db-0..2 keep their ids: {pods_after:#?}");
    assert_eq!(pods_after.len(), 3, "cart-0 is gone: {pods_after:#?}");
    agent.stop().expect("agent stops cleanly");
}

#[test]
fn kube_source_full_maps_refuse_new_entries_and_count_them() {
    if !require_root("kube_source_full_maps_refuse_new_entries_and_count_them") {
        return;
    }
    let api = FakeApi::start().unwrap();
    api.apply(headless_service("data", "small", json!({})))
        .unwrap();
    api.apply(slice(
        "data",
        "small-1",
        "small",
        &[("10.71.0.1", "small-0", true)],
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = Source::Kube(api.write_kubeconfig(dir.path()).unwrap());
    let bpffs = Bpffs::new().unwrap();
    let cg = Cgroup::new("kube-full").unwrap();
    let port = free_port().unwrap();
    let metrics = format!("--metrics-addr=127.0.0.1:{port}");
    let mut agent = Agent::start_with(
        &source,
        cg.path(),
        &bpffs,
        &[&metrics, "--max-endpoints=16", "--max-services=8"],
    )
    .unwrap();
    wait_view(&bpffs, &mut agent, "small synced", |v| {
        pods_of(v, "data/small") == ["small-0"]
    });
    // 20 endpoints into maps with room for 16 (one is taken).
    let addrs: Vec<(String, String)> = (0..20)
        .map(|i| (format!("10.71.1.{i}"), format!("big-{i}")))
        .collect();
    let eps: Vec<(&str, &str, bool)> = addrs
        .iter()
        .map(|(a, p)| (a.as_str(), p.as_str(), true))
        .collect();
    api.apply(headless_service("data", "big", json!({})))
        .unwrap();
    api.apply(slice("data", "big-1", "big", &eps)).unwrap();
    headway_testbed::fake_api::eventually(SYNC, "refusals counted", || {
        let (_, body) = http_get(port, "/metrics").unwrap();
        parse_openmetrics(&body)
            .unwrap()
            .iter()
            .any(|(n, l, v)| n == "headway_map_full_total" && l["map"] == "pod_addrs" && *v >= 5.0)
    })
    .unwrap();
    agent.check_running().unwrap();
    assert_eq!(map_sizes(&bpffs)["pod_addrs"], 16);
    // Existing entries keep working: small-0 turns not ready.
    api.apply(slice(
        "data",
        "small-1",
        "small",
        &[("10.71.0.1", "small-0", false)],
    ))
    .unwrap();
    wait_view(&bpffs, &mut agent, "existing entry updated", |v| {
        state_of(v, "data/small", "small-0").is_empty()
    });
    // The capacity metric says what the agent chose.
    let (_, body) = http_get(port, "/metrics").unwrap();
    let capacity = parse_openmetrics(&body)
        .unwrap()
        .into_iter()
        .find(|(n, l, _)| n == "headway_map_capacity" && l["map"] == "pod_addrs")
        .map(|(_, _, v)| v);
    assert_eq!(capacity, Some(16.0));
    agent.stop().unwrap();
}

/// What the pinned maps say about one address of service `ns/name`:
/// (pod id in `pod_addrs`, pod id in the service's `svc_endpoints` entry);
/// `None` where the entry is missing.
fn address_entries(
    maps: &headway::pinned::Maps,
    service_id: u32,
    addr: &str,
) -> (Option<u32>, Option<u32>) {
    let key = headway::map_plan::addr_key(addr.parse().unwrap());
    let pod = maps.pod_addrs.get(&key, 0).ok().map(|r| r.pod_id);
    let endpoint = maps
        .svc_endpoints
        .get(
            &headway_common::ServiceEndpointKey {
                service_id,
                _pad: 0,
                addr: key,
            },
            0,
        )
        .ok()
        .map(|e| e.pod_id);
    (pod, endpoint)
}

/// Polls one address's entries until `ok` holds (returned) or `SYNC`
/// passes (the last entries read, as the error).
fn wait_entries(
    maps: &headway::pinned::Maps,
    service_id: u32,
    addr: &str,
    ok: impl Fn(&Entries) -> bool,
) -> Result<Entries, Entries> {
    let last = settle(SYNC, || address_entries(maps, service_id, addr), &ok);
    if ok(&last) { Ok(last) } else { Err(last) }
}

fn service_id(maps: &headway::pinned::Maps, ns: &str, name: &str) -> u32 {
    let contents = maps.read_contents().unwrap();
    contents
        .services
        .iter()
        .find(|(_, m)| {
            headway::map_plan::decode_name(&m.namespace) == ns
                && headway::map_plan::decode_name(&m.name) == name
        })
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("service {ns}/{name} not in the maps"))
}

/// Polls one address's entries every millisecond on a thread until told
/// to stop; returns every distinct settled state seen, in order.
struct Watcher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Option<u32>, Option<u32>)>>,
}

impl Watcher {
    /// Returns once the first state is read.
    fn start(bpffs: &Bpffs, service_id: u32, addr: &'static str) -> Watcher {
        let maps = headway::pinned::Maps::open_pinned(bpffs.path()).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let (started, first_read) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut seen: Vec<(Option<u32>, Option<u32>)> = Vec::new();
            loop {
                // Read after the flag: the last state is read after
                // `stop` was called (a poller that last ran before the
                // agent's write it waited for would miss it).
                let stopping = flag.load(std::sync::atomic::Ordering::Relaxed);
                // The two maps are read one after the other: a pair read
                // across one of the agent's writes mixes before and after
                // (seen once under load). A state counts when two reads in
                // a row agree.
                let mut now = address_entries(&maps, service_id, addr);
                loop {
                    let again = address_entries(&maps, service_id, addr);
                    if again == now {
                        break;
                    }
                    now = again;
                }
                if seen.last() != Some(&now) {
                    seen.push(now);
                }
                let _ = started.send(());
                if stopping {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            seen
        });
        first_read
            .recv_timeout(SYNC)
            .expect("the map poller reads its first state");
        Watcher { stop, thread }
    }

    fn stop(self) -> Vec<(Option<u32>, Option<u32>)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("map poller")
    }
}

/// An endpoint moves from one slice of a service to another, and the API
/// delivers the removal first, in an earlier batch than the addition: the
/// address keeps its pod id in `pod_addrs` and `svc_endpoints` throughout
/// (polled every millisecond). A real removal still goes, after the grace
/// period, and the same poller sees it go.
#[test]
fn kube_source_endpoint_moving_between_slices_removal_first_is_not_flapped() {
    if !require_root("kube_source_endpoint_moving_between_slices_removal_first_is_not_flapped") {
        return;
    }
    let mut s = start("kube-move");
    wait_view(&s.bpffs, &mut s.agent, "initial sync", initial_view);
    // The sync count below must move for the removal, not for the end of
    // the first sync.
    wait_ready(&mut s.agent, s.port, SYNC).expect("ready after the first sync");
    let maps = headway::pinned::Maps::open_pinned(s.bpffs.path()).unwrap();
    let db = service_id(&maps, "data", "db");
    // `headway status` lists a pod from `svc_endpoints`, which the agent
    // writes before `pod_addrs`: the view can be complete a moment before
    // the address is (seen in CI).
    let before = wait_entries(&maps, db, "10.70.0.11", |e| e.0.is_some() && e.0 == e.1)
        .unwrap_or_else(|e| panic!("db-1 never in both maps: last {e:?}"));

    let watcher = Watcher::start(&s.bpffs, db, "10.70.0.11");
    // db-1 leaves db-a ...
    let synced = syncs(s.port).unwrap();
    s.api
        .apply(slice("data", "db-a", "db", &[("10.70.0.10", "db-0", true)]))
        .unwrap();
    // ... and arrives in db-b after the agent handled the removal (in a
    // batch of its own: the sync count moves once it is written), so that
    // it really comes first.
    headway_testbed::fake_api::eventually(SYNC, "the removal handled", || {
        syncs(s.port).unwrap() > synced
    })
    .unwrap();
    s.api
        .apply(slice(
            "data",
            "db-b",
            "db",
            &[("10.70.0.12", "db-2", true), ("10.70.0.11", "db-1", true)],
        ))
        .unwrap();
    // Past the grace period: a hold that was not cancelled would end now.
    std::thread::sleep(Duration::from_millis(1800));
    let seen = watcher.stop();
    assert_eq!(seen, [before], "db-1's entries while it moved");
    let v = view(&status_json(&s.bpffs).unwrap());
    assert_eq!(pods_of(&v, "data/db"), ["db-0", "db-1", "db-2"]);

    // A real removal: held for the grace period, then gone.
    let watcher = Watcher::start(&s.bpffs, db, "10.70.0.11");
    s.api
        .apply(slice("data", "db-b", "db", &[("10.70.0.12", "db-2", true)]))
        .unwrap();
    wait_view(&s.bpffs, &mut s.agent, "db-1 removed", |v| {
        pods_of(v, "data/db") == ["db-0", "db-2"]
    });
    let seen = watcher.stop();
    assert_went_once(&seen, before);
    s.agent.stop().expect("agent stops cleanly");
}

/// One address's entries: (pod id in `pod_addrs`, pod id in `svc_endpoints`).
type Entries = (Option<u32>, Option<u32>);

/// `seen` (the poller's states of one address) starts at `before` and
/// ends with both entries gone, and each map's entry went once, never to
/// come back. The two maps are written by separate syscalls (`pod_addrs`
/// first, then `svc_endpoints`), so a poller may catch the moment between
/// them (seen once under load in CI): that is one removal, not a flap.
fn assert_went_once(seen: &[Entries], before: Entries) {
    assert_eq!(seen.first(), Some(&before), "db-1's first state: {seen:?}");
    assert_eq!(seen.last(), Some(&(None, None)), "db-1 went: {seen:?}");
    let one_map = |entry: fn(&Entries) -> Option<u32>| {
        let mut states: Vec<Option<u32>> = seen.iter().map(entry).collect();
        states.dedup();
        states
    };
    assert_eq!(
        one_map(|s| s.0),
        [before.0, None],
        "db-1 left pod_addrs once: {seen:?}"
    );
    assert_eq!(
        one_map(|s| s.1),
        [before.1, None],
        "db-1 left svc_endpoints once: {seen:?}"
    );
}

/// The pods in the preferred (same-zone) IPv4 table of service `ns/name`.
/// The maps are read one after the other: a read that straddles one of
/// the agent's writes (the service's count read before its slots went) is
/// read again.
fn preferred_pods(bpffs: &Bpffs, ns: &str, name: &str) -> Vec<String> {
    let maps = headway::pinned::Maps::open_pinned(bpffs.path()).unwrap();
    for _ in 0..100 {
        let contents = maps.read_contents().unwrap();
        let id = service_id(&maps, ns, name);
        let meta = contents.services[&id];
        let pods: Option<Vec<String>> = (meta.backends_v4..meta.backends_v4 + meta.preferred_v4)
            .map(|slot| {
                let key = headway_common::BackendKey {
                    service_id: id,
                    family: 4,
                    slot,
                };
                let pod_id = contents.svc_backends.get(&key)?.pod_id;
                Some(headway::map_plan::decode_name(
                    &contents.pods.get(&pod_id)?.name,
                ))
            })
            .collect();
        if let Some(mut pods) = pods {
            pods.sort();
            return pods;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{ns}/{name}: the preferred table never read whole (100 tries)");
}

/// The agent watches its own Node (by name): a change of the node's zone
/// label moves the prefer-zone tables to the new zone; other nodes'
/// labels do not matter.
#[test]
fn kube_source_follows_the_node_zone_label() {
    if !require_root("kube_source_follows_the_node_zone_label") {
        return;
    }
    let mut s = start("kube-zone");
    wait_view(&s.bpffs, &mut s.agent, "initial sync", initial_view);
    s.api
        .apply(headless_service(
            "shop",
            "zonal",
            json!({"headway.dev/topology": "prefer-zone"}),
        ))
        .unwrap();
    let mut zonal = slice(
        "shop",
        "zonal-1",
        "zonal",
        &[
            ("10.70.3.10", "z-0", true),
            ("10.70.3.11", "z-1", true),
            ("10.70.3.12", "z-2", true),
        ],
    );
    for (ep, zone) in zonal["endpoints"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .zip(["zone-a", "zone-b", "zone-b"])
    {
        ep["zone"] = json!(zone);
    }
    s.api.apply(zonal).unwrap();
    wait_view(&s.bpffs, &mut s.agent, "zonal synced", |v| {
        pods_of(v, "shop/zonal") == ["z-0", "z-1", "z-2"]
    });
    assert_eq!(preferred_pods(&s.bpffs, "shop", "zonal"), ["z-0"], "zone-a");
    headway_testbed::fake_api::eventually(SYNC, "the node watch", || {
        s.api.field_selectors("nodes").len() >= 2
    })
    .unwrap();
    assert_eq!(
        s.api.field_selectors("nodes"),
        ["metadata.name=node-1"; 2],
        "one list and one watch of this node only"
    );

    // Another node's zone is none of this agent's business.
    s.api.apply(node("node-2", "zone-b")).unwrap();
    // This node moves to zone-b.
    s.api.apply(node("node-1", "zone-b")).unwrap();
    headway_testbed::fake_api::eventually(SYNC, "preferred table in zone-b", || {
        preferred_pods(&s.bpffs, "shop", "zonal") == ["z-1", "z-2"]
    })
    .unwrap();
    // Its zone label removed: nothing is preferred.
    s.api
        .apply(json!({"kind": "Node", "metadata": {"name": "node-1", "labels": {}}}))
        .unwrap();
    headway_testbed::fake_api::eventually(SYNC, "no preferred table", || {
        preferred_pods(&s.bpffs, "shop", "zonal").is_empty()
    })
    .unwrap();
    // Services without prefer-zone were never touched by it.
    let v = view(&status_json(&s.bpffs).unwrap());
    assert!(initial_view(&v), "{v:#?}");
    s.agent.stop().expect("agent stops cleanly");
}
