//! `cargo xtask bench-hooks`: what each attached hook costs per run on the
//! real kernel, from the kernel's own statistics (`kernel.bpf_stats_enabled`
//! makes it time every program run: `run_time_ns / run_cnt`).
//!
//! A small cluster of network namespaces, the agent following manifests of
//! one headless service, and a client making `--connections` TCP connects
//! per case: to an address of no headless service (the fast path), to a
//! known pod it never resolved (accounted only), and to the address it got
//! from the service name under each policy (kept, or chosen afresh). The
//! per-case figures are the deltas of the counters around the case.
//!
//! bpf_stats itself adds to every run (two clock reads, dear in a VM); the
//! numbers include it. So that they can be read, each hook gets a floor
//! program beside it (`floor`: `r0 = 1; exit`), timed on the same events:
//! the report gives each figure net of its hook's floor too. The old sysctl value is restored at the end. Run it
//! on a quiet machine: a program run can be preempted, and the time it
//! spends preempted counts too, so load inflates every figure.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context, bail};
use headway_testbed::{
    Cgroup, Cluster, ResolvConf, Zone,
    agent::{Agent, Bpffs, status_json, wait_for_status},
    manifests::{HeadlessService, PodEndpoint},
    resolve_in, run_client, start_dns_server, start_pod_servers,
};
use serde_json::Value;

use crate::{
    bpf_stats,
    floor::{self, Floors},
    util,
};

const PORT: u16 = 8080;
const DNS: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 53);
const DOMAIN: &str = "demo.svc.cluster.local";
const PODS: [(&str, u8); 4] = [("web-0", 10), ("web-1", 11), ("web-2", 12), ("web-3", 13)];
/// A server that is no headless service's pod.
const OUTSIDER: (&str, u8) = ("plain-0", 40);

#[derive(clap::Args)]
pub struct Options {
    /// TCP connects per case.
    #[arg(long, default_value_t = 10_000)]
    pub connections: u32,
}

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, last)
}

fn v6(last: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, u16::from(last))
}

fn manifest(policy: &str) -> String {
    let mut web = HeadlessService::new("demo", "web").policy(policy);
    for (name, last) in PODS {
        web = web.endpoint(PodEndpoint::new(name, [IpAddr::V4(v4(last))]));
    }
    web.to_yaml()
}

/// One case's result: ns per run of each hook that ran.
struct CaseResult {
    case: &'static str,
    per_run: BTreeMap<String, (u64, f64)>,
    decisions: BTreeMap<String, u64>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    // The binaries' own speed does not enter the kernel's figures.
    util::prepare_root_task("bench-hooks")?;

    let mut builder = Cluster::builder();
    for (name, last) in PODS.iter().chain([&OUTSIDER]) {
        builder = builder.pod(name, v4(*last), Some(v6(*last)));
    }
    let cluster = builder
        .client_at("dns", DNS, None)
        .client("client")
        .client("stranger")
        .build()?;
    let _servers = start_pod_servers(&cluster, PORT)?;
    let zone_dir = tempfile::tempdir()?;
    let zone_path = zone_dir.path().join("zone.json");
    let mut zone = Zone::new();
    for (_, last) in PODS {
        zone = zone.a(&format!("web.{DOMAIN}"), v4(last));
    }
    zone.write(&zone_path)?;
    let _dns = start_dns_server(
        cluster.client_ns("dns"),
        &zone_path,
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    )?;
    let _resolv = ResolvConf::new(cluster.client_ns("client"), DNS.into(), &[DOMAIN])?;
    let cg = Cgroup::new("bench-hooks")?;
    let bpffs = Bpffs::new()?;
    let manifests = tempfile::tempdir()?;
    let write_policy =
        |policy: &str| fs::write(manifests.path().join("web.yaml"), manifest(policy));
    write_policy("failover")?;
    let mut agent = Agent::start(manifests.path(), cg.path(), &bpffs, &[])?;
    let synced = |s: &Value| {
        s["services"][0]["pods"]
            .as_array()
            .is_some_and(|p| p.len() == 4)
    };
    wait_for_status(&bpffs, &mut agent, Duration::from_secs(20), synced)?;

    // The client learns the service name's addresses; its first one is
    // what it connects to in the DNS cases.
    let report = resolve_in(
        cluster.client_ns("client"),
        Some(&cg),
        &format!("web.{DOMAIN}"),
    )?;
    let cached = *report
        .addrs
        .first()
        .with_context(|| format!("resolving web: {report:?}"))?;

    // Beside each hook, the cheapest program it can run: the floor that
    // every figure below contains.
    let floors = Floors::attach(cg.path())?;
    let programs = || -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
        let mut stats = bpf_stats::program_stats(&bpffs)?;
        for (name, s) in floors.stats()? {
            stats.insert(name.to_string(), s);
        }
        Ok(stats)
    };
    let _stats = bpf_stats::BpfStats::enable()?;
    let n = opts.connections;
    let mut results = Vec::new();
    let mut measure = |case: &'static str,
                       client: &str,
                       addr: IpAddr,
                       policy: Option<&str>|
     -> anyhow::Result<()> {
        if let Some(policy) = policy {
            write_policy(policy)?;
            let want = policy.to_owned();
            wait_for_status(&bpffs, &mut agent, Duration::from_secs(20), |s| {
                s["services"][0]["policy"] == want.as_str()
            })?;
        }
        let before = programs()?;
        let decisions_before = decisions(&bpffs)?;
        let r = run_client(&cluster, client, Some(&cg), addr, PORT, n, false)?;
        if r.failures > 0 {
            bail!("{case}: {} of {n} connects failed: {r:?}", r.failures);
        }
        let after = programs()?;
        let per_run = bpf_stats::per_run(&before, &after);
        let decisions = decisions(&bpffs)?
            .into_iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v - decisions_before.get(&k).copied().unwrap_or(0),
                )
            })
            .filter(|(_, v)| *v > 0)
            .collect();
        results.push(CaseResult {
            case,
            per_run,
            decisions,
        });
        Ok(())
    };
    let outsider = IpAddr::V4(v4(OUTSIDER.1));
    measure(
        "fast path: not a headless service's address",
        "client",
        outsider,
        None,
    )?;
    measure(
        "known pod, never resolved (accounted)",
        "stranger",
        IpAddr::V4(v4(10)),
        None,
    )?;
    measure(
        "service name, failover, eligible (kept)",
        "client",
        cached,
        None,
    )?;
    measure(
        "service name, random (chosen)",
        "client",
        cached,
        Some("random"),
    )?;
    measure(
        "service name, least-connections (chosen)",
        "client",
        cached,
        Some("least-connections"),
    )?;
    measure("service name, observe", "client", cached, Some("observe"))?;
    agent.check_running()?;

    // A busy machine inflates every figure (a program run can be
    // preempted, and the preempted time counts): say how busy it was.
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\n== Hook cost per run (bpf_stats), {n} TCP connects per case");
    println!("   load average during the run: {}\n", load.trim());
    println!("   floor: `r0 = 1; exit` attached beside each hook (see xtask/src/floor.rs)\n");
    println!("| case | hook | runs | ns/run | floor ns/run | net of floor | decisions |");
    println!("|---|---|---:|---:|---:|---:|---|");
    for r in &results {
        let decisions: Vec<String> = r
            .decisions
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let floor_of = |hook: &str| {
            r.per_run
                .iter()
                .find(|(name, _)| name.starts_with("floor_") && floor::beside(name) == hook)
                .map(|(_, (_, ns))| *ns)
        };
        let hooks = r
            .per_run
            .iter()
            .filter(|(name, _)| !name.starts_with("floor_"));
        for (i, (hook, (runs, ns))) in hooks.enumerate() {
            let (case, d) = if i == 0 {
                (r.case, decisions.join(" "))
            } else {
                ("", String::new())
            };
            let (floor, net) = match floor_of(hook) {
                Some(f) => (format!("{f:.0}"), format!("{:.0}", ns - f)),
                None => ("–".to_string(), "–".to_string()),
            };
            println!("| {case} | {hook} | {runs} | {ns:.0} | {floor} | {net} | {d} |");
        }
    }
    Ok(())
}

/// Connect decisions so far, by reason.
fn decisions(bpffs: &Bpffs) -> anyhow::Result<BTreeMap<String, u64>> {
    let status = status_json(bpffs)?;
    Ok(serde_json::from_value(status["steering"].clone())?)
}
