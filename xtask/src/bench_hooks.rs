//! `cargo xtask bench-hooks`: what each attached hook costs per run on the
//! real kernel, from the kernel's own statistics (`kernel.bpf_stats_enabled`
//! makes it time every program run: `run_time_ns / run_cnt`).
//!
//! A small cluster of network namespaces, the agent following manifests of
//! one headless service (declaring its port, as real ones do), and a
//! client making `--connections` TCP connects per case: to an address of
//! no headless service (the fast path), to a known pod it never resolved
//! (accounted only), and to the address it got from the service name under
//! each policy (kept, or chosen afresh). The per-case figures are the
//! deltas of the counters around the case.
//!
//! bpf_stats itself adds to every run (two clock reads, dear in a VM); the
//! numbers include it. So that they can be read, each hook gets a floor
//! program beside it (`floor`: `r0 = 1; exit`), timed on the same events:
//! the report gives each figure net of its hook's floor too. The old
//! sysctl value is restored at the end. The cases run `--repeat` times,
//! in rotated order, and the report gives medians. Run it on a quiet
//! machine: a program run can be preempted, and the time it
//! spends preempted counts too, so load inflates every figure.
//!
//! Figures drift by up to 2x between sittings on a VM, so two builds only
//! compare when measured together: `--against BIN` runs another `headway`
//! binary's programs on the same cluster, cgroup and pins, alternating
//! the two builds pass by pass (AB, BA, ...; between them the agent stops
//! and `headway reset` removes its pins, so each build runs on maps it
//! created), and reports each hook's ratio of this build's net figure to
//! the other's, per pass pair, and the ratio of their fastest passes.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use headway_testbed::{
    Cgroup, Cluster, ResolvConf, Zone,
    agent::{Agent, Bpffs, Source, headway_bin, status_json_of, wait_for_status},
    manifests::{HeadlessService, PodEndpoint},
    resolve_in, run_client, start_dns_server, start_pod_servers,
};

use crate::{
    bench::stats::Spread,
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
    /// TCP connects per case and pass.
    #[arg(long, default_value_t = 10_000)]
    pub connections: u32,
    /// Passes over all cases (each starting one case later); the report
    /// gives medians over passes.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Run only the cases whose name contains one of these words
    /// (comma-separated, e.g. `random,failover`); all cases when empty.
    #[arg(long, value_delimiter = ',')]
    pub cases: Vec<String>,
    /// Leave the service's ports undeclared (by default it declares its
    /// one port, as real services do: connect() then checks the port).
    #[arg(long)]
    pub undeclared_port: bool,
    /// Another `headway` binary to compare with in the same run (e.g. the
    /// previous commit's `target/debug/headway`, copied aside): the two
    /// builds alternate pass by pass, each on maps it creates (pins are
    /// reset between them), and the report adds their ratios.
    #[arg(long)]
    pub against: Option<PathBuf>,
}

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, last)
}

fn v6(last: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, u16::from(last))
}

fn manifest(policy: &str, declare_port: bool) -> String {
    let mut web = HeadlessService::new("demo", "web").policy(policy);
    if declare_port {
        web = web.port("http", PORT);
    }
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
    let write_policy = |policy: &str| {
        fs::write(
            manifests.path().join("web.yaml"),
            manifest(policy, !opts.undeclared_port),
        )
    };
    write_policy("failover")?;
    // The builds measured: this one, and the one to compare with.
    let mut builds = vec![headway_bin()?];
    builds.extend(opts.against.clone());
    let source = Source::Dir(manifests.path().to_path_buf());
    let start = |bin: &Path, policy: &str| -> anyhow::Result<Agent> {
        let mut agent = Agent::start_bin(bin, &source, cg.path(), &bpffs, &[])?;
        wait_for_status(&bpffs, &mut agent, Duration::from_secs(20), |s| {
            s["services"][0]["policy"] == policy
                && s["services"][0]["pods"]
                    .as_array()
                    .is_some_and(|p| p.len() == 4)
        })?;
        Ok(agent)
    };
    let mut agent = start(&builds[0], "failover")?;
    let mut running = 0;

    // The client learns the service name's addresses; its first one is
    // what it connects to in the DNS cases.
    let resolve = || -> anyhow::Result<IpAddr> {
        let report = resolve_in(
            cluster.client_ns("client"),
            Some(&cg),
            &format!("web.{DOMAIN}"),
        )?;
        report
            .addrs
            .first()
            .copied()
            .with_context(|| format!("resolving web: {report:?}"))
    };
    let cached = resolve()?;

    // Beside each hook, the cheapest program it can run: the floor that
    // every figure below contains.
    let floors = Floors::attach(cg.path())?;
    let programs = |bin: &Path| -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
        let mut stats = bpf_stats::program_stats_of(bin, &bpffs)?;
        for (name, s) in floors.stats()? {
            stats.insert(name.to_string(), s);
        }
        Ok(stats)
    };
    let _stats = bpf_stats::BpfStats::enable()?;
    let n = opts.connections;
    let outsider = IpAddr::V4(v4(OUTSIDER.1));
    let cases: [(&'static str, &str, IpAddr, Option<&str>); 6] = [
        (
            "fast path: not a headless service's address",
            "client",
            outsider,
            None,
        ),
        (
            "known pod, never resolved (accounted)",
            "stranger",
            IpAddr::V4(v4(10)),
            None,
        ),
        (
            "service name, failover, eligible (kept)",
            "client",
            cached,
            Some("failover"),
        ),
        (
            "service name, random (chosen)",
            "client",
            cached,
            Some("random"),
        ),
        (
            "service name, least-connections (chosen)",
            "client",
            cached,
            Some("least-connections"),
        ),
        ("service name, observe", "client", cached, Some("observe")),
    ];
    let cases: Vec<_> = cases
        .into_iter()
        .filter(|(case, ..)| {
            opts.cases.is_empty() || opts.cases.iter().any(|c| case.contains(c.as_str()))
        })
        .collect();
    if cases.is_empty() {
        bail!("no case matches --cases {:?}", opts.cases);
    }
    let mut policy_now = "failover".to_string();
    let measure = |agent: &mut Agent,
                   policy_now: &mut String,
                   case: &'static str,
                   client: &str,
                   addr: IpAddr,
                   policy: Option<&str>|
     -> anyhow::Result<CaseResult> {
        if let Some(policy) = policy
            && policy != policy_now.as_str()
        {
            write_policy(policy)?;
            let want = policy.to_owned();
            wait_for_status(&bpffs, agent, Duration::from_secs(20), |s| {
                s["services"][0]["policy"] == want.as_str()
            })?;
            *policy_now = want;
        }
        let bin = agent.bin().to_path_buf();
        let before = programs(&bin)?;
        let decisions_before = decisions(&bin, &bpffs)?;
        let r = run_client(&cluster, client, Some(&cg), addr, PORT, n, false)?;
        if r.failures > 0 {
            bail!("{case}: {} of {n} connects failed: {r:?}", r.failures);
        }
        let after = programs(&bin)?;
        let per_run = bpf_stats::per_run(&before, &after);
        let decisions: BTreeMap<String, u64> = decisions(&bin, &bpffs)?
            .into_iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v - decisions_before.get(&k).copied().unwrap_or(0),
                )
            })
            .filter(|(_, v)| *v > 0)
            .collect();
        // A case on the service name must have been decided on what the
        // client learned from DNS.
        if policy.is_some()
            && let Some(n) = decisions.get("kept_no_dns")
        {
            bail!("{case}: {n} connects without a DNS observation: {decisions:?}");
        }
        Ok(CaseResult {
            case,
            per_run,
            decisions,
        })
    };
    // Every pass runs every case, starting one case later than the pass
    // before, so a slow stretch of the machine falls on different cases;
    // with two builds, each pass runs both, in alternating order.
    // passes[build][case]: one result per pass.
    let mut passes: Vec<Vec<Vec<CaseResult>>> = builds
        .iter()
        .map(|_| (0..cases.len()).map(|_| Vec::new()).collect())
        .collect();
    for pass in 0..opts.repeat {
        for j in 0..builds.len() {
            let b = (pass + j) % builds.len();
            if b != running {
                // Each build on maps it created itself (their flags and
                // layouts may differ): the pins go with the agent.
                let stopped = agent.bin().to_path_buf();
                agent.stop()?;
                reset(&stopped, &bpffs)?;
                agent = start(&builds[b], &policy_now)?;
                // What the client learned went with the pins: it resolves
                // the name again, and must get the same first address.
                let again = resolve()?;
                if again != cached {
                    bail!("web resolved to {again} first, earlier to {cached}");
                }
                running = b;
            }
            for k in 0..cases.len() {
                let i = (pass + k) % cases.len();
                let (case, client, addr, policy) = cases[i];
                passes[b][i].push(measure(
                    &mut agent,
                    &mut policy_now,
                    case,
                    client,
                    addr,
                    policy,
                )?);
            }
        }
    }
    agent.check_running()?;

    // A busy machine inflates every figure (a program run can be
    // preempted, and the preempted time counts): say how busy it was.
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "\n== Hook cost per run (bpf_stats), {n} TCP connects per case and pass, {} passes",
        opts.repeat
    );
    println!("   load average at the end: {}\n", load.trim());
    println!("   floor: `r0 = 1; exit` attached beside each hook (see xtask/src/floor.rs)");
    println!("   medians over passes; [min–max] of the net figure\n");
    println!(
        "| case | hook | runs per pass | ns/run | floor ns/run | net of floor | decisions (all passes) |"
    );
    for (bin, results) in builds.iter().zip(&passes) {
        if builds.len() > 1 {
            println!("\n   build: {}\n", bin.display());
        }
        println!(
            "| case | hook | runs per pass | ns/run | floor ns/run | net of floor | decisions (all passes) |"
        );
        println!("|---|---|---:|---:|---:|---:|---|");
        for case in results {
            print_case(case);
        }
    }
    if let [this, other] = passes.as_slice() {
        println!(
            "\n== This build against {}: net of floor, median / fastest pass; \
             ratio this/other per pass pair, median [min–max]; ratio of the fastest passes\n",
            builds[1].display()
        );
        println!("| case | hook | this | other | ratio per pair | fastest/fastest |");
        println!("|---|---|---:|---:|---:|---:|");
        for (a, b) in this.iter().zip(other) {
            print_comparison(a, b);
        }
    }
    Ok(())
}

/// `headway reset` as build `bin` does it: programs detached, pins gone.
fn reset(bin: &Path, bpffs: &Bpffs) -> anyhow::Result<()> {
    let status = std::process::Command::new(bin)
        .arg("reset")
        .arg("--bpffs")
        .arg(bpffs.path())
        .stdout(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        bail!("{} reset: {status}", bin.display());
    }
    Ok(())
}

/// The ns per run of the floor program beside `hook` in one case's result.
fn floor_of(result: &CaseResult, hook: &str) -> Option<f64> {
    result
        .per_run
        .iter()
        .find(|(name, _)| name.starts_with("floor_") && floor::beside(name) == hook)
        .map(|(_, (_, ns))| *ns)
}

/// Each hook's net figure per pass: hook -> nets in pass order.
fn nets_by_hook(results: &[CaseResult]) -> BTreeMap<&str, Vec<f64>> {
    let mut nets: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for r in results {
        for (hook, (_, ns)) in &r.per_run {
            if hook.starts_with("floor_") {
                continue;
            }
            if let Some(f) = floor_of(r, hook) {
                nets.entry(hook.as_str()).or_default().push(ns - f);
            }
        }
    }
    nets
}

/// One case's rows of the comparison: per hook, both builds' median net
/// figures and the spread of their ratio over the pass pairs.
fn print_comparison(this: &[CaseResult], other: &[CaseResult]) {
    let Some(first) = this.first() else {
        return;
    };
    let (a, b) = (nets_by_hook(this), nets_by_hook(other));
    for (i, (hook, a)) in a.iter().enumerate() {
        let Some(b) = b.get(hook) else {
            continue;
        };
        let ratios: Vec<f64> = a
            .iter()
            .zip(b)
            .filter(|(_, b)| **b > 0.0)
            .map(|(a, b)| a / b)
            .collect();
        let (sa, sb) = (Spread::of(a), Spread::of(b));
        let ratio = Spread::of(&ratios).map_or("–".to_string(), |r| {
            format!("×{:.3} [{:.3}–{:.3}]", r.median, r.min, r.max)
        });
        // Interference only adds time to a pass: the fastest pass of each
        // build is the steadiest estimate of what its programs cost.
        let (median_of, min_of) = (
            |s: &Option<Spread>| s.as_ref().map_or(0.0, |s| s.median),
            |s: &Option<Spread>| s.as_ref().map_or(0.0, |s| s.min),
        );
        let min_ratio = if min_of(&sb) > 0.0 {
            format!("×{:.3}", min_of(&sa) / min_of(&sb))
        } else {
            "–".to_string()
        };
        let case = if i == 0 { first.case } else { "" };
        println!(
            "| {case} | {hook} | {:.0} / {:.0} | {:.0} / {:.0} | {ratio} | {min_ratio} |",
            median_of(&sa),
            min_of(&sa),
            median_of(&sb),
            min_of(&sb),
        );
    }
}

/// One case's rows: per hook, the medians over passes of its raw and
/// floor figures and of their difference.
fn print_case(results: &[CaseResult]) {
    let Some(first) = results.first() else {
        return;
    };
    let mut decisions: BTreeMap<&str, u64> = BTreeMap::new();
    for r in results {
        for (k, v) in &r.decisions {
            *decisions.entry(k.as_str()).or_default() += v;
        }
    }
    let decisions: Vec<String> = decisions.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let hooks = first
        .per_run
        .keys()
        .filter(|name| !name.starts_with("floor_"));
    for (i, hook) in hooks.enumerate() {
        let mut raw = Vec::new();
        let mut floors = Vec::new();
        let mut nets = Vec::new();
        let mut runs = Vec::new();
        for r in results {
            let Some((count, ns)) = r.per_run.get(hook) else {
                continue;
            };
            raw.push(*ns);
            runs.push(*count as f64);
            if let Some(f) = floor_of(r, hook) {
                floors.push(f);
                nets.push(ns - f);
            }
        }
        let (case, d) = if i == 0 {
            (first.case, decisions.join(" "))
        } else {
            ("", String::new())
        };
        let net = Spread::of(&nets).map_or("–".to_string(), |n| {
            format!("{:.0} [{:.0}–{:.0}]", n.median, n.min, n.max)
        });
        let floor = Spread::of(&floors).map_or("–".to_string(), |f| format!("{:.0}", f.median));
        let median = |v: &[f64]| Spread::of(v).map_or(0.0, |s| s.median);
        println!(
            "| {case} | {hook} | {:.0} | {:.0} | {floor} | {net} | {d} |",
            median(&runs),
            median(&raw),
        );
    }
}

/// Connect decisions so far, by reason (as build `bin` reads the pins).
fn decisions(bin: &Path, bpffs: &Bpffs) -> anyhow::Result<BTreeMap<String, u64>> {
    let status = status_json_of(bin, bpffs)?;
    Ok(serde_json::from_value(status["steering"].clone())?)
}
