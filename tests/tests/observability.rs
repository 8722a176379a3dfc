//! Observability on the real kernel: /metrics keeps a deleted pod's series
//! for the grace period, /healthz and /readyz flip, logs report a problem
//! once per change, `headway top` draws the pods in a real terminal, and
//! the Grafana dashboard asks only for metrics the agent exports.
//!
//! Privileged: needs root (CI runs it as root). Every pod address lives in
//! namespaces the test creates; clients run inside one of them. Tests that
//! make no connection still write pod addresses into the maps, but nothing
//! ever sends a packet to them.
use std::{
    collections::BTreeSet,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use headway_testbed::{
    Cgroup, Cluster, ConnectReport,
    agent::{
        Agent, Bpffs, Sample, free_port, headway_bin, http_get, metric_families, parse_openmetrics,
        settle, status_json, wait_for_status, wait_ready,
    },
    manifests::{HeadlessService, PodEndpoint, write_whole},
    require_root, run_client, start_pod_servers, unique_suffix,
};
use serde_json::Value;

const PORT: u16 = 8080;
const SYNC_TIMEOUT: Duration = Duration::from_secs(15);
const DASHBOARD: &str = "deploy/grafana/headway-dashboard.json";

/// A headless service `demo/web` over `pods` (name, IPv4), with an
/// optional `headway.dev/policy`.
fn web_manifest(pods: &[(&str, IpAddr)], policy: Option<&str>) -> String {
    let mut web = HeadlessService::new("demo", "web").port("http", PORT);
    if let Some(policy) = policy {
        web = web.policy(policy);
    }
    for (name, addr) in pods {
        web = web.endpoint(PodEndpoint::new(name, [*addr]).without_hostname());
    }
    web.to_yaml()
}

/// Pods that only exist as map entries (no namespace, never connected to).
fn paper_pods() -> Vec<(&'static str, IpAddr)> {
    vec![
        ("web-0", "10.78.0.10".parse().unwrap()),
        ("web-1", "10.78.0.11".parse().unwrap()),
    ]
}

fn web_pods(status: &Value) -> Vec<String> {
    status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .and_then(|s| s["pods"].as_array())
        .map(|pods| {
            pods.iter()
                .map(|p| p["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn scrape(port: u16) -> (String, Vec<Sample>) {
    let (code, body) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    let samples = parse_openmetrics(&body).expect("the reference parser reads /metrics");
    (body, samples)
}

/// The value of the sample `name` whose labels include all of `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
}

/// Polls `check` every 200 ms until it holds or `timeout` passes.
fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    check()
}

#[test]
fn metrics_keep_a_deleted_pods_series_for_the_grace_period() {
    if !require_root("metrics_keep_a_deleted_pods_series_for_the_grace_period") {
        return;
    }
    let cluster = Cluster::builder()
        .pod("web-0", "10.77.0.10".parse().unwrap(), None)
        .pod("web-1", "10.77.0.11".parse().unwrap(), None)
        .client("client")
        .build()
        .expect("build the test cluster");
    let _servers = start_pod_servers(&cluster, PORT).expect("start pod servers");
    let cg = Cgroup::new("obs-grace").unwrap();
    let bpffs = Bpffs::new().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    let addr = |pod: &str| cluster.pod(pod).addr(false).unwrap();
    let both = [("web-0", addr("web-0")), ("web-1", addr("web-1"))];
    fs::write(manifests.path().join("web.yaml"), web_manifest(&both, None)).unwrap();

    let port = free_port().unwrap();
    let flags = [
        format!("--metrics-addr=127.0.0.1:{port}"),
        "--metrics-grace=5s".to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut agent = Agent::start(manifests.path(), cg.path(), &bpffs, &flags).unwrap();
    wait_for_status(&bpffs, &mut agent, SYNC_TIMEOUT, |s| web_pods(s).len() == 2).unwrap();
    // connect() finds an address's pod in the DNS index, written after
    // what the status shows (by a thread of its own in a first sync).
    wait_ready(&mut agent, port, SYNC_TIMEOUT).unwrap();

    for (pod, count) in [("web-0", 2), ("web-1", 3)] {
        let report: ConnectReport =
            run_client(&cluster, "client", Some(&cg), addr(pod), PORT, count, false).unwrap();
        assert_eq!(
            report.answers.get(pod),
            Some(&u64::from(count)),
            "{report:?}"
        );
    }
    let conns = |samples: &[Sample], pod: &str| {
        value(
            samples,
            "headway_connections_total",
            &[("service", "web"), ("pod", pod), ("protocol", "tcp")],
        )
    };
    let (body, samples) = scrape(port);
    assert_eq!(conns(&samples, "web-0"), Some(2.0), "{body}");
    assert_eq!(conns(&samples, "web-1"), Some(3.0), "{body}");
    assert_eq!(
        value(&samples, "headway_map_entries", &[("map", "pods")]),
        Some(2.0),
        "{body}"
    );
    // The families the issue names are there, with their labels.
    for (name, labels) in [
        ("headway_no_eligible_pod_total", vec![("service", "web")]),
        (
            "headway_steered_connections_total",
            vec![("service", "web"), ("reason", "gone")],
        ),
        (
            "headway_dns_lookups_total",
            vec![("service", "web"), ("kind", "service")],
        ),
        (
            "headway_dns_parse_errors_total",
            vec![("reason", "bad_pointer")],
        ),
        ("headway_program_attached", vec![("program", "hw_connect4")]),
        (
            "headway_build_info",
            vec![("version", env!("CARGO_PKG_VERSION"))],
        ),
    ] {
        assert!(
            value(&samples, name, &labels).is_some(),
            "no {name}{labels:?} in {body}"
        );
    }
    let attached: Vec<f64> = samples
        .iter()
        .filter(|(n, _, _)| n == "headway_program_attached")
        .map(|s| s.2)
        .collect();
    assert_eq!(attached, [1.0; 12], "{body}");

    // web-1 is deleted: the maps forget it at once...
    write_whole(
        &manifests.path().join("web.yaml"),
        &web_manifest(&both[..1], None),
    )
    .unwrap();
    // ...but a scrape right after still has its final count. Scraped until
    // the agent's last write of the change (`pods`, after the endpoints the
    // series come from): the grace period runs from the last scrape that
    // saw web-1 in the maps, so it never depends on how long the agent took.
    let pod_entries =
        |samples: &[Sample]| value(samples, "headway_map_entries", &[("map", "pods")]);
    let (body, samples) = settle(
        SYNC_TIMEOUT,
        || scrape(port),
        |(_, s)| pod_entries(s) == Some(1.0),
    );
    println!("/metrics right after web-1 was deleted:\n{body}");
    assert_eq!(
        web_pods(&status_json(&bpffs).unwrap()),
        ["web-0"],
        "web-1 left the maps"
    );
    assert_eq!(conns(&samples, "web-1"), Some(3.0), "{body}");
    assert_eq!(conns(&samples, "web-0"), Some(2.0), "{body}");
    assert_eq!(
        value(&samples, "headway_map_entries", &[("map", "pods")]),
        Some(1.0),
        "{body}"
    );
    // After the grace period its series are gone; web-0's stay.
    let gone = eventually(Duration::from_secs(30), || {
        let (_, samples) = scrape(port);
        conns(&samples, "web-1").is_none()
    });
    let (body, samples) = scrape(port);
    assert!(
        gone,
        "web-1 still exported long after the grace period: {body}"
    );
    assert!(
        !samples
            .iter()
            .any(|(_, l, _)| l.get("pod").map(String::as_str) == Some("web-1")),
        "no series of web-1 is left: {body}"
    );
    assert_eq!(conns(&samples, "web-0"), Some(2.0), "{body}");
    agent.stop().unwrap();
}

/// Starts an agent on `manifests` with the metrics port given, and waits
/// until /healthz answers 200.
fn start_healthy(manifests: &Path, cg: &Cgroup, bpffs: &Bpffs, extra: &[&str]) -> (Agent, u16) {
    let port = free_port().unwrap();
    let flag = format!("--metrics-addr=127.0.0.1:{port}");
    let mut flags = vec![flag.as_str()];
    flags.extend_from_slice(extra);
    let mut agent = Agent::start(manifests, cg.path(), bpffs, &flags).unwrap();
    let healthy = eventually(SYNC_TIMEOUT, || {
        agent.check_running().unwrap();
        http_get(port, "/healthz").is_ok_and(|(code, _)| code == 200)
    });
    assert!(healthy, "/healthz never answered 200");
    (agent, port)
}

#[test]
fn healthz_fails_when_a_hook_is_detached_behind_the_agents_back() {
    if !require_root("healthz_fails_when_a_hook_is_detached_behind_the_agents_back") {
        return;
    }
    let cg = Cgroup::new("obs-health").unwrap();
    let bpffs = Bpffs::new().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    fs::write(
        manifests.path().join("web.yaml"),
        web_manifest(&paper_pods(), None),
    )
    .unwrap();
    let (mut agent, port) = start_healthy(manifests.path(), &cg, &bpffs, &[]);
    let ready = eventually(SYNC_TIMEOUT, || {
        http_get(port, "/readyz").is_ok_and(|(code, _)| code == 200)
    });
    assert!(ready, "/readyz never became ready");

    // Someone detaches one hook (the link stays pinned, attached to nothing).
    let link = bpffs.pin("link_hw_connect4");
    let out = Command::new("bpftool")
        .args(["link", "detach", "pinned"])
        .arg(&link)
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "bpftool link detach: {out:?}");
    assert!(link.exists(), "the pin stays: only the attachment is gone");

    let (code, body) = http_get(port, "/healthz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("hw_connect4"), "names the hook: {body}");
    let (code, body) = http_get(port, "/readyz").unwrap();
    assert_eq!(code, 503, "not ready either: {body}");
    // status and /metrics say the same.
    let status = status_json(&bpffs).unwrap();
    let detached: Vec<&str> = status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["attached"] == false)
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(detached, ["hw_connect4"], "{status:#}");
    let (body, samples) = scrape(port);
    assert_eq!(
        value(
            &samples,
            "headway_program_attached",
            &[("program", "hw_connect4")]
        ),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        value(
            &samples,
            "headway_program_attached",
            &[("program", "hw_connect6")]
        ),
        Some(1.0),
        "{body}"
    );

    // The pin removed altogether: still unhealthy, and says why.
    fs::remove_file(&link).unwrap();
    let (code, body) = http_get(port, "/healthz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("hw_connect4"), "{body}");
    agent.check_running().unwrap();
}

#[test]
fn readyz_waits_for_the_first_sync() {
    if !require_root("readyz_waits_for_the_first_sync") {
        return;
    }
    let cg = Cgroup::new("obs-ready").unwrap();
    let bpffs = Bpffs::new().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    // The manifest is a FIFO: the agent's first read blocks until the
    // test writes it, like a source that has not delivered yet.
    let fifo = manifests.path().join("web.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();

    let (agent, port) = start_healthy(manifests.path(), &cg, &bpffs, &[]);
    // Attached and healthy, but nothing synced: not ready, several times.
    for _ in 0..5 {
        let (code, body) = http_get(port, "/readyz").unwrap();
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("not synced"), "{body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(web_pods(&status_json(&bpffs).unwrap()).is_empty());

    // Deliver the manifest, then put a plain file in the FIFO's place so
    // later reads never block.
    fs::write(&fifo, web_manifest(&paper_pods(), None)).unwrap();
    let plain = manifests.path().join(".web.yaml.tmp");
    fs::write(&plain, web_manifest(&paper_pods(), None)).unwrap();
    fs::rename(&plain, &fifo).unwrap();

    let ready = eventually(SYNC_TIMEOUT, || {
        http_get(port, "/readyz").is_ok_and(|(code, _)| code == 200)
    });
    assert!(ready, "/readyz never became ready after the sync");
    assert_eq!(web_pods(&status_json(&bpffs).unwrap()), ["web-0", "web-1"]);
    agent.stop().unwrap();
}

/// The agent's JSON log lines so far.
fn log_lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))
        })
        .collect()
}

fn message(line: &Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or_default()
}

#[test]
fn unknown_annotation_is_logged_once_per_change_in_json() {
    if !require_root("unknown_annotation_is_logged_once_per_change_in_json") {
        return;
    }
    let cg = Cgroup::new("obs-logs").unwrap();
    let bpffs = Bpffs::new().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("agent.log");
    let write = |policy: &str| {
        fs::write(
            manifests.path().join("web.yaml"),
            web_manifest(&paper_pods(), Some(policy)),
        )
        .unwrap();
    };
    write("round-robin");
    let mut agent = Agent::start_with_log(
        manifests.path(),
        cg.path(),
        &bpffs,
        &["--log-format=json"],
        &log,
    )
    .unwrap();
    let syncs = |log: &Path| {
        log_lines(log)
            .iter()
            .filter(|l| message(l) == "maps synced")
            .count()
    };
    assert!(
        eventually(SYNC_TIMEOUT, || syncs(&log) >= 1),
        "no sync logged"
    );
    // Touch the directory: each change is a sync of the same input.
    for i in 0..4 {
        let before = syncs(&log);
        fs::write(manifests.path().join(format!("other-{i}.yaml")), "").unwrap();
        assert!(
            eventually(SYNC_TIMEOUT, || syncs(&log) > before),
            "change {i} did not sync"
        );
        agent.check_running().unwrap();
    }
    let about_web = |log: &Path| -> Vec<Value> {
        log_lines(log)
            .into_iter()
            .filter(|l| l["fields"]["object"] == "Service demo/web")
            .collect()
    };
    let warnings = about_web(&log);
    assert_eq!(warnings.len(), 1, "once, not per sync: {warnings:#?}");
    let w = &warnings[0];
    assert_eq!(w["level"], "WARN", "{w}");
    assert!(
        message(w).contains("headway.dev/policy") && message(w).contains("round-robin"),
        "{w}"
    );

    // A different bad value is a new problem: logged once more.
    let before = syncs(&log);
    write("fastest");
    assert!(eventually(SYNC_TIMEOUT, || syncs(&log) > before));
    let before = syncs(&log);
    fs::write(manifests.path().join("other-9.yaml"), "").unwrap();
    assert!(eventually(SYNC_TIMEOUT, || syncs(&log) > before));
    let warnings = about_web(&log);
    assert_eq!(warnings.len(), 2, "{warnings:#?}");
    assert!(message(&warnings[1]).contains("fastest"), "{warnings:#?}");
    agent.stop().unwrap();
}

/// A tmux server of its own (`-L`), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        Tmux {
            socket: format!("headway-top-{}", unique_suffix()),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux (apt-get install tmux)");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The CONNS column of the screen line of `pod` (`  web-0  ready  1.0  5 ...`).
fn screen_connections(screen: &str, pod: &str) -> Option<u64> {
    screen.lines().find_map(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        (words.first() == Some(&pod))
            .then(|| words.get(3)?.parse().ok())
            .flatten()
    })
}

#[test]
fn top_shows_the_pods_live_and_quits_on_q() {
    if !require_root("top_shows_the_pods_live_and_quits_on_q") {
        return;
    }
    let bin = headway_bin().unwrap();
    // Nothing pinned: a clear message, the terminal untouched.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(&bin)
        .args(["top", "--bpffs"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing is pinned"), "{err}");

    let cluster = Cluster::builder()
        .pod("web-0", "10.77.0.10".parse().unwrap(), None)
        .pod("web-1", "10.77.0.11".parse().unwrap(), None)
        .client("client")
        .build()
        .expect("build the test cluster");
    let _servers = start_pod_servers(&cluster, PORT).expect("start pod servers");
    let cg = Cgroup::new("obs-top").unwrap();
    let bpffs = Bpffs::new().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    let addr = |pod: &str| cluster.pod(pod).addr(false).unwrap();
    let pods = [("web-0", addr("web-0")), ("web-1", addr("web-1"))];
    fs::write(manifests.path().join("web.yaml"), web_manifest(&pods, None)).unwrap();
    let (mut agent, port) = start_healthy(manifests.path(), &cg, &bpffs, &[]);
    wait_for_status(&bpffs, &mut agent, SYNC_TIMEOUT, |s| web_pods(s).len() == 2).unwrap();
    // connect() finds an address's pod in the DNS index, written after
    // what the status shows (by a thread of its own in a first sync).
    wait_ready(&mut agent, port, SYNC_TIMEOUT).unwrap();
    let connect = |pod: &str, count: u32| {
        let report = run_client(&cluster, "client", Some(&cg), addr(pod), PORT, count, false)
            .expect("run the client");
        assert_eq!(
            report.answers.get(pod),
            Some(&u64::from(count)),
            "{report:?}"
        );
    };
    connect("web-0", 4);

    let exit_file: PathBuf = empty.path().join("top.exit");
    let command = format!(
        "{} top --interval 300ms --bpffs {}; echo $? > {}",
        bin.display(),
        bpffs.path().display(),
        exit_file.display()
    );
    let tmux = Tmux::new();
    tmux.run(&[
        "new-session",
        "-d",
        "-x",
        "160",
        "-y",
        "40",
        "-s",
        "top",
        &command,
    ]);
    let shows = |pod: &str, n: u64| {
        eventually(Duration::from_secs(10), || {
            screen_connections(&tmux.screen(), pod) == Some(n)
        })
    };
    assert!(shows("web-0", 4), "screen:\n{}", tmux.screen());
    assert!(shows("web-1", 0), "screen:\n{}", tmux.screen());
    // Live: new connections show up without restarting it.
    connect("web-1", 3);
    connect("web-0", 1);
    assert!(shows("web-1", 3), "screen:\n{}", tmux.screen());
    assert!(shows("web-0", 5), "screen:\n{}", tmux.screen());
    let screen = tmux.screen();
    assert!(screen.contains("demo/web"), "{screen}");
    assert!(screen.contains("hooks 12/12 attached"), "{screen}");
    println!("headway top, captured with tmux capture-pane:\n{screen}");

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let exited = eventually(Duration::from_secs(10), || exit_file.exists());
    assert!(exited, "top did not quit on q; screen:\n{}", tmux.screen());
    let code = fs::read_to_string(&exit_file).unwrap();
    assert_eq!(code.trim(), "0", "exit code");
    agent.stop().unwrap();
}

/// Metric names (after Grafana's variables are filled in) in a PromQL
/// expression, by a real PromQL parser.
fn promql_metric_names(expr: &str) -> Vec<String> {
    use promql_parser::parser::{Expr, parse};
    fn walk(e: &Expr, out: &mut Vec<String>) {
        match e {
            Expr::Aggregate(a) => {
                walk(&a.expr, out);
                if let Some(p) = &a.param {
                    walk(p, out);
                }
            }
            Expr::Unary(u) => walk(&u.expr, out),
            Expr::Binary(b) => {
                walk(&b.lhs, out);
                walk(&b.rhs, out);
            }
            Expr::Paren(p) => walk(&p.expr, out),
            Expr::Subquery(s) => walk(&s.expr, out),
            Expr::VectorSelector(v) => out.extend(v.name.clone()),
            Expr::MatrixSelector(m) => out.extend(m.vs.name.clone()),
            Expr::Call(c) => c.args.args.iter().for_each(|a| walk(a, out)),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }
    let filled = expr
        .replace("$__rate_interval", "5m")
        .replace("$__range", "1h")
        .replace("$namespace", ".*")
        .replace("$service", ".*");
    assert!(!filled.contains('$'), "unknown variable in {expr}");
    let parsed = parse(&filled).unwrap_or_else(|e| panic!("not PromQL: {expr}: {e}"));
    let mut names = Vec::new();
    walk(&parsed, &mut names);
    names
}

/// Every PromQL expression of the dashboard: panel targets, and the series
/// selectors of its `label_values(...)` variables.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(selector, _)| selector.to_string())
                .unwrap_or_else(|| panic!("unexpected variable query {q}"));
            out.push(inner);
        }
    }
    out
}

#[test]
fn dashboard_asks_only_for_metrics_the_agent_exports() {
    if !require_root("dashboard_asks_only_for_metrics_the_agent_exports") {
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DASHBOARD);
    let text = fs::read_to_string(&path).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(dashboard["title"].is_string());
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Connections per second, per pod",
        "DNS share vs connection share, per pod",
        "Steered connections by reason",
        "DNS parse errors by reason",
        "No eligible pod",
        "Agent errors",
        "Active connections, per pod",
        "Bytes per second, per pod",
    ] {
        assert!(
            titles.contains(&wanted),
            "no panel {wanted:?} in {titles:?}"
        );
    }
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() > 10, "{queries:#?}");

    // What a running agent exports: each family's sample names.
    let cg = Cgroup::new("obs-dash").unwrap();
    let bpffs = Bpffs::new().unwrap();
    let manifests = tempfile::tempdir().unwrap();
    fs::write(
        manifests.path().join("web.yaml"),
        web_manifest(&paper_pods(), None),
    )
    .unwrap();
    let (mut agent, port) = start_healthy(manifests.path(), &cg, &bpffs, &[]);
    // Pod and service families have series (and so appear) once synced.
    wait_for_status(&bpffs, &mut agent, SYNC_TIMEOUT, |s| web_pods(s).len() == 2).unwrap();
    let (code, body) = http_get(port, "/metrics").unwrap();
    assert_eq!(code, 200, "{body}");
    let mut exported = BTreeSet::new();
    for (name, kind) in metric_families(&body).unwrap() {
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        for s in suffixes {
            exported.insert(format!("{name}{s}"));
        }
    }
    assert!(
        exported.contains("headway_connections_total"),
        "{exported:?}"
    );

    let mut used = BTreeSet::new();
    for q in &queries {
        let names = promql_metric_names(q);
        assert!(!names.is_empty(), "no metric in {q}");
        used.extend(names);
    }
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard uses metrics the agent does not export: {unknown:?}\nexported: {exported:?}"
    );
    agent.stop().unwrap();
}
