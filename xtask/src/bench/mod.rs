//! `cargo xtask bench`: headway against the alternatives, side by side in
//! one run (issue #8).
//!
//! Every round builds a fresh cluster of network namespaces (pods running
//! nginx, a client namespace per contender, a DNS server, HAProxy's
//! namespace) and runs every workload against every contender, in an
//! order rotated per round, with the same load generator (wrk) and the
//! same TCP settings everywhere. The report gives medians over rounds and
//! per-round ratios to `direct`. The persistent-connection targets are
//! read from the paired workloads instead (`paired.rs`): one client holds
//! a direct, an A/A control and a headway connection to the same pod and
//! alternates its requests over them, so the machine's noise hits all
//! three alike; the new-connection target likewise, from the same client
//! making a new connection per side and cycle. Then, on the last round's bed, extra
//! headway runs with BPF stats on give the kernel cost per hook, and the
//! DNS interceptor is measured with BPF_PROG_TEST_RUN (`bench-dns`).
//!
//! Network safety: every address lives inside the namespaces a round
//! creates; wrk, the paired client, nginx, HAProxy and the iptables rules
//! all run inside them, never in the host namespace.
mod bed;
mod chart;
mod contenders;
mod headway;
mod kube_proxy;
pub mod paired;
pub mod paired_stats;
pub mod report;
mod servers;
pub mod stats;
mod workload;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};
use headway_testbed::{NetNs, unique_suffix};

use self::{
    bed::Bed,
    contenders::Contender,
    report::{ControlPlane, HookCost, Machine, Results, Sample, Setup, Skipped},
    workload::{Workload, run_wrk},
};
use crate::{
    bench_dns, bpf_stats,
    util::{self, workspace_root},
};

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// A short smoke run: 2 rounds of 1 s per run, a short DNS benchmark.
    #[arg(long)]
    pub quick: bool,
    /// Rounds (each on fresh namespaces); default 5, or 2 with --quick.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Seconds per wrk run; default 5, or 1 with --quick.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Pods (server namespaces) behind every contender.
    #[arg(long, default_value_t = 4)]
    pub pods: usize,
    /// Other services' rules in the iptables contender's namespace.
    #[arg(long, default_value_t = 10_000)]
    pub other_services: usize,
    /// Where latest.{md,json,png} go (relative to the workspace root).
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Skip the BPF_PROG_TEST_RUN benchmark of the DNS interceptor.
    #[arg(long)]
    pub no_dns: bool,
    /// Measure nothing: re-render latest.md and latest.png in --out from
    /// a results JSON written earlier (no root needed).
    #[arg(long, value_name = "JSON")]
    pub render: Option<PathBuf>,
    /// Only these workloads (comma-separated; default: all).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<Workload>,
    /// Only these contenders (comma-separated; default: all); `direct`,
    /// the baseline of every ratio, always runs.
    #[arg(long, value_delimiter = ',')]
    pub contenders: Vec<Contender>,
    /// Profile every measured run: `perf record -a -g` (Debian's
    /// linux-perf) writes DIR/<round>-<workload>-<contender>.data, to
    /// read with `perf report -i`. System-wide, so other tenants' work is
    /// in it too (`--comms wrk,nginx` keeps the bench's own).
    #[arg(long, value_name = "DIR")]
    pub perf: Option<PathBuf>,
}

impl Options {
    fn rounds(&self) -> usize {
        self.rounds.unwrap_or(if self.quick { 2 } else { 5 })
    }

    fn seconds(&self) -> u64 {
        self.seconds.unwrap_or(if self.quick { 1 } else { 5 })
    }

    fn workloads(&self) -> Vec<Workload> {
        Workload::ALL
            .into_iter()
            .filter(|w| self.workloads.is_empty() || self.workloads.contains(w))
            .collect()
    }

    fn wants(&self, c: Contender) -> bool {
        c == Contender::Direct || self.contenders.is_empty() || self.contenders.contains(&c)
    }
}

/// Debian packages the bench drives (`.ci/run` installs them).
const TOOLS: [(&str, &str); 6] = [
    ("wrk", "wrk"),
    ("nginx", "nginx"),
    ("haproxy", "haproxy"),
    ("iptables-restore", "iptables"),
    ("ss", "iproute2"),
    ("bpftool", "bpftool"),
];

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let out = workspace_root().join(&opts.out);
    if let Some(json) = &opts.render {
        let text =
            fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let results: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bench results file", json.display()))?;
        write_results(&results, &out)?;
        println!("{}", report::results_table(&results));
        return Ok(());
    }
    check_tools()?;
    util::prepare_root_task("the bench")?;
    let results = measure(opts)?;
    write_results(&results, &out)?;
    println!("\n{}", report::results_table(&results));
    for t in &results.targets {
        println!(
            "{} {}: ×{:.3} (threshold {:.2})",
            if t.met { "met   " } else { "MISSED" },
            t.name,
            t.ratio,
            t.threshold
        );
    }
    println!("\nwritten: {}/latest.{{md,json,png}}", out.display());
    Ok(())
}

fn check_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(bin, _)| which(bin).is_none())
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        bail!(
            "the bench needs: apt-get install {} (see .ci/run)",
            missing.join(" ")
        );
    }
    Ok(())
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    })
}

/// Everything but building and writing: the rounds, the hook costs, the
/// DNS figures. Needs root, the tools and the workspace's binaries.
pub fn measure(opts: &Options) -> anyhow::Result<Results> {
    let (rounds, seconds) = (opts.rounds(), opts.seconds());
    if rounds == 0 || opts.pods == 0 {
        bail!("--rounds and --pods must be at least 1");
    }
    let duration = Duration::from_secs(seconds);
    let load_before = load_average()?;
    let (contenders, skipped) = available_contenders(opts)?;
    let workloads = opts.workloads();
    eprintln!(
        "bench: {rounds} rounds × {} workloads × {} contenders × {seconds} s",
        workloads.len(),
        contenders.len()
    );

    let scratch = std::env::temp_dir().join(format!("headway-bench-{}", unique_suffix()));
    let _cleanup = RemoveDir(scratch.clone());
    let www = scratch.join("www");
    servers::make_www(&www)?;
    let script = scratch.join("bench.lua");
    fs::write(&script, workload::WRK_SCRIPT)?;

    let mut samples = Vec::new();
    let mut paired_samples = Vec::new();
    let mut program_runs = Vec::new();
    let headway_contenders: Vec<Contender> = contenders
        .iter()
        .copied()
        .filter(|c| c.headway_policy().is_some())
        .collect();
    let paired_contenders: Vec<Contender> = contenders
        .iter()
        .copied()
        .filter(|c| c.is_paired())
        .collect();
    let mut hook_costs = Vec::new();
    let mut iptables_rules = None;
    for round in 0..rounds {
        eprintln!("bench: round {}/{rounds}: building the bed", round + 1);
        let mut bed = Bed::build(&contenders, opts.pods, opts.other_services, &www)?;
        iptables_rules = bed.facts.iptables_rules.or(iptables_rules);
        warm_up(&mut bed, &script, &contenders)?;
        for &w in &workloads {
            if w.is_paired() {
                for c in contenders::order(&paired_contenders, round) {
                    let p = paired::run(&mut bed, round, w, c, duration)
                        .with_context(|| format!("{} / {}", w.id(), c.id()))?;
                    eprintln!("bench: round {} {}", round + 1, paired_line(&p));
                    paired_samples.push(p);
                }
                continue;
            }
            for c in contenders::order(&contenders, round) {
                let profile = opts
                    .perf
                    .as_ref()
                    .map(|dir| dir.join(format!("{}-{}-{}.data", round + 1, w.id(), c.id())));
                let sample = run_one(&mut bed, &script, round, w, c, duration, profile)?;
                let m = &sample.measured;
                eprintln!(
                    "bench: round {} {:<10} {:<16} {:>10.0} req/s p50 {:>6.0} µs p99 {:>6.0} µs {:>6.2} Gbit/s cpu {:>5.2} s errors {}",
                    round + 1,
                    w.id(),
                    c.id(),
                    m.requests_per_sec(),
                    m.p50_us,
                    m.p99_us,
                    m.bytes_per_sec() * 8.0 / 1e9,
                    sample.cpu_us as f64 / 1e6,
                    m.errors.total()
                );
                samples.push(sample);
            }
        }
        if round + 1 == rounds && bed.headway.is_some() {
            hook_costs = measure_hook_costs(&mut bed, &script, &contenders, &workloads, duration)?;
            if workloads.iter().any(|w| w.is_paired()) {
                let _stats = bpf_stats::BpfStats::enable()?;
                for &c in &headway_contenders {
                    program_runs.push(paired::program_runs(&mut bed, c, duration)?);
                }
            }
        }
        if let Some(rig) = bed.headway.take() {
            rig.stop()?;
        }
    }

    let dns_interceptor = if opts.no_dns {
        None
    } else {
        let dns_opts = if opts.quick {
            bench_dns::Options {
                repeat: 10_000,
                samples: 2_000,
                only: None,
            }
        } else {
            bench_dns::Options {
                repeat: 100_000,
                samples: 20_000,
                only: None,
            }
        };
        Some(bench_dns::measure(&dns_opts)?)
    };

    let summary = report::summarize(&samples, &contenders);
    let paired = report::summarize_paired(&paired_samples);
    let targets = report::check_targets(&summary, &samples, &paired);
    Ok(Results {
        generated_at: util::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?,
        quick: opts.quick,
        machine: machine(load_before)?,
        setup: Setup {
            rounds,
            seconds_per_run: seconds,
            pods: opts.pods,
            other_services: opts.other_services,
            iptables_rules,
            sysctls: servers::SYSCTLS
                .iter()
                .map(|(k, v)| (k.replace('/', "."), (*v).to_owned()))
                .collect(),
            workloads: workloads
                .iter()
                .map(|w| (*w, w.describe(opts.pods)))
                .collect(),
            contenders: contenders.iter().map(|c| (*c, c.label().into())).collect(),
        },
        skipped,
        samples,
        summary,
        targets,
        paired_samples,
        paired,
        program_runs,
        hook_costs,
        dns_interceptor,
        control_plane: control_plane(&opts.out),
    })
}

/// Every contender that can run on this machine, and why the others not.
fn available_contenders(opts: &Options) -> anyhow::Result<(Vec<Contender>, Vec<Skipped>)> {
    let probe = NetNs::new(&format!("hw{}-probe", unique_suffix()))?;
    let mut run = Vec::new();
    let mut skipped = Vec::new();
    for c in Contender::ALL.into_iter().filter(|c| opts.wants(*c)) {
        if c == Contender::Ipvs {
            let reason = kube_proxy::ipvs_unavailable(&probe).unwrap_or_else(|| {
                "IPVS is available here, but the bench has no IPVS contender yet".into()
            });
            skipped.push(Skipped {
                contender: c,
                reason,
            });
            continue;
        }
        run.push(c);
    }
    Ok((run, skipped))
}

/// One wrk run of workload `w` for contender `c`; for headway, with the
/// policy set first and the service's connect decisions recorded; profiled
/// into `profile` when given.
fn run_one(
    bed: &mut Bed,
    script: &Path,
    round: usize,
    w: Workload,
    c: Contender,
    duration: Duration,
    profile: Option<PathBuf>,
) -> anyhow::Result<Sample> {
    let before = match (c.headway_policy(), bed.headway.as_mut()) {
        (Some(policy), Some(rig)) => {
            rig.set_policy(policy)?;
            Some(rig.counters()?)
        }
        _ => None,
    };
    let target = bed.target(c);
    let (ns, cgroup) = bed.client(c)?;
    let recorder = profile.map(|file| Profiler::start(&file)).transpose()?;
    let cpu_before = bed.cpu_usage_us(c)?;
    let measured = run_wrk(ns, cgroup, script, w, bed.pods.len(), &target, duration)
        .with_context(|| format!("{} / {}", w.id(), c.id()))?;
    let cpu_us = bed.cpu_usage_us(c)? - cpu_before;
    if let Some(recorder) = recorder {
        recorder.stop(measured.requests)?;
    }
    if measured.requests == 0 {
        bail!("{} / {}: no request completed", w.id(), c.id());
    }
    let decisions = match (before, bed.headway.as_mut()) {
        (Some(before), Some(rig)) => Some(rig.counters()?.since(&before).decisions),
        _ => None,
    };
    Ok(Sample {
        round,
        workload: w,
        contender: c,
        measured,
        cpu_us,
        decisions,
    })
}

/// One paired run's figures, for the progress log.
fn paired_line(p: &paired::PairedSample) -> String {
    use paired_stats::Side;
    let merged = paired_stats::merge(&p.blocks);
    let f = |s: Side| merged.side(s).figures();
    let (d, a, h) = (f(Side::Direct), f(Side::Control), f(Side::Headway));
    format!(
        "{:<12} {:<16} direct {:>8.0} req/s p99 {:>6.1} µs | A/A ×{:.3} p99 ×{:.3} | headway ×{:.3} p99 ×{:.3} | pods {}",
        p.workload.id(),
        p.contender.id(),
        d.rate,
        d.p99_ns / 1e3,
        a.rate / d.rate,
        a.p99_ns / d.p99_ns,
        h.rate / d.rate,
        h.p99_ns / d.p99_ns,
        p.threads
            .iter()
            .map(|t| t.pod.as_str())
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// One unrecorded keep-alive second per contender on a new bed, so no
/// contender's first measured run pays for cold caches, neighbour
/// discovery or freshly started servers.
fn warm_up(bed: &mut Bed, script: &Path, contenders: &[Contender]) -> anyhow::Result<()> {
    for &c in contenders {
        run_one(
            bed,
            script,
            0,
            Workload::KeepAlive,
            c,
            Duration::from_secs(1),
            None,
        )?;
    }
    Ok(())
}

/// `perf record -a -g` around one run (`--perf`), and the system-wide
/// counters that say how the kernel spent the run (context switches,
/// IPIs, softirqs, steal), per request, in DIR/counters.tsv.
struct Profiler {
    child: std::process::Child,
    file: PathBuf,
    counters: BTreeMap<String, u64>,
}

impl Profiler {
    fn start(file: &Path) -> anyhow::Result<Profiler> {
        if let Some(dir) = file.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let child = Command::new("perf")
            .args(["record", "-a", "-g", "-q", "-o"])
            .arg(file)
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting perf record (apt-get install linux-perf)")?;
        // perf needs a moment to open its events on every CPU.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Profiler {
            child,
            file: file.to_owned(),
            counters: kernel_counters()?,
        })
    }

    /// Stops the recording (SIGINT makes perf write its file and exit)
    /// and appends the counters' growth per request to counters.tsv.
    fn stop(mut self, requests: u64) -> anyhow::Result<()> {
        let after = kernel_counters()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        let status = self.child.wait()?;
        // perf writes its file, then ends itself with the same signal.
        use std::os::unix::process::ExitStatusExt as _;
        if !status.success() && status.signal() != Some(libc_sigint()) {
            bail!("perf record for {} failed: {status}", self.file.display());
        }
        let tsv = self.file.with_file_name("counters.tsv");
        let mut text = String::new();
        if !tsv.exists() {
            text.push_str("run\trequests");
            for key in after.keys() {
                // Ticks (1/100 s) are too coarse per request: whole run.
                let per = if key.starts_with("ticks_") {
                    ""
                } else {
                    "/req"
                };
                text.push_str(&format!("\t{key}{per}"));
            }
            text.push('\n');
        }
        let run = self.file.file_stem().unwrap_or_default().to_string_lossy();
        text.push_str(&format!("{run}\t{requests}"));
        for (key, value) in &after {
            let grew = value.saturating_sub(self.counters.get(key).copied().unwrap_or(0));
            if key.starts_with("ticks_") {
                text.push_str(&format!("\t{grew}"));
            } else {
                text.push_str(&format!("\t{:.3}", grew as f64 / requests.max(1) as f64));
            }
        }
        text.push('\n');
        use std::io::Write as _;
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&tsv)?
            .write_all(text.as_bytes())?;
        Ok(())
    }
}

fn libc_sigint() -> i32 {
    nix::sys::signal::Signal::SIGINT as i32
}

/// System-wide kernel counters, summed over CPUs: context switches and
/// time (USER_HZ ticks) from /proc/stat, IPIs from /proc/interrupts,
/// softirqs from /proc/softirqs.
fn kernel_counters() -> anyhow::Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let sum = |fields: &[&str]| fields.iter().filter_map(|f| f.parse::<u64>().ok()).sum();
    for line in fs::read_to_string("/proc/stat")?.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.first() {
            Some(&"ctxt") => {
                out.insert("ctxt".into(), sum(&f[1..]));
            }
            Some(&"cpu") => {
                for (i, name) in [
                    "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
                ]
                .iter()
                .enumerate()
                {
                    if let Some(v) = f.get(i + 1).and_then(|v| v.parse().ok()) {
                        out.insert(format!("ticks_{name}"), v);
                    }
                }
            }
            _ => {}
        }
    }
    for line in fs::read_to_string("/proc/interrupts")?.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let Some(&name @ ("RES:" | "CAL:")) = f.first() {
            out.insert(format!("ipi_{}", name.trim_end_matches(':')), sum(&f[1..]));
        }
    }
    for line in fs::read_to_string("/proc/softirqs")?.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let Some(&name @ ("NET_RX:" | "RCU:" | "SCHED:" | "TIMER:")) = f.first() {
            out.insert(
                format!("softirq_{}", name.trim_end_matches(':')),
                sum(&f[1..]),
            );
        }
    }
    Ok(out)
}

impl Drop for Profiler {
    /// A run that failed midway leaves no perf behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Extra headway runs with BPF run-time statistics on
/// (`kernel.bpf_stats_enabled=1`, restored afterwards): the cost of every
/// hook per request. Separate from the measured rounds because the
/// statistics add their own clock reads to every program run.
fn measure_hook_costs(
    bed: &mut Bed,
    script: &Path,
    contenders: &[Contender],
    workloads: &[Workload],
    duration: Duration,
) -> anyhow::Result<Vec<HookCost>> {
    let _stats = bpf_stats::BpfStats::enable()?;
    let mut costs = Vec::new();
    for &c in contenders.iter().filter(|c| c.headway_policy().is_some()) {
        for &w in workloads.iter().filter(|w| Workload::WRK.contains(w)) {
            let rig = bed.headway.as_mut().context("no headway agent")?;
            rig.set_policy(c.headway_policy().unwrap_or_default())?;
            let before = rig.program_stats()?;
            let target = bed.target(c);
            let (ns, cgroup) = bed.client(c)?;
            let measured = run_wrk(ns, cgroup, script, w, bed.pods.len(), &target, duration)?;
            let rig = bed.headway.as_mut().context("no headway agent")?;
            let after = rig.program_stats()?;
            for (hook, (count, time)) in after {
                let (c0, t0) = before.get(&hook).copied().unwrap_or_default();
                costs.push(HookCost {
                    contender: c,
                    workload: w,
                    hook,
                    runs: count.saturating_sub(c0),
                    run_time_ns: time.saturating_sub(t0),
                    requests: measured.requests,
                });
            }
        }
    }
    Ok(costs)
}

fn write_results(results: &Results, dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(results)?;
    fs::write(dir.join("latest.json"), json + "\n")?;
    fs::write(dir.join("latest.md"), report::markdown(results))?;
    chart::draw(results, &dir.join("latest.png"))?;
    Ok(())
}

/// The slot for `cargo xtask bench-control-plane`'s figures.
fn control_plane(out: &Path) -> ControlPlane {
    let file = out.join("control-plane.json");
    // A file of another shape (an older run) is reported, then left out.
    let figures = fs::read_to_string(workspace_root().join(&file))
        .ok()
        .and_then(|text| match serde_json::from_str(&text) {
            Ok(run) => Some(run),
            Err(e) => {
                eprintln!("ignoring {}: {e}", file.display());
                None
            }
        });
    ControlPlane {
        source: file.display().to_string(),
        figures,
    }
}

fn load_average() -> anyhow::Result<[f64; 3]> {
    let text = fs::read_to_string("/proc/loadavg")?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>());
    let mut out = [0.0; 3];
    for slot in &mut out {
        *slot = it.next().context("short /proc/loadavg")??;
    }
    Ok(out)
}

fn machine(load_before: [f64; 3]) -> anyhow::Result<Machine> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mut tools = BTreeMap::new();
    let version = |cmd: &mut Command| {
        cmd.output()
            .ok()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    tools.insert("wrk".into(), version(Command::new("wrk").arg("-v")));
    tools.insert("nginx".into(), version(Command::new("nginx").arg("-v")));
    tools.insert("haproxy".into(), version(Command::new("haproxy").arg("-v")));
    tools.insert(
        "iptables".into(),
        version(Command::new("iptables").arg("-V")),
    );
    Ok(Machine {
        kernel: util::output(Command::new("uname").arg("-r"))?,
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_owned(),
        memory_mib: meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024),
        load_before,
        load_after: load_average()?,
        tools,
    })
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True if the Debian tools are there; in CI (CI=true) they must be.
    fn tools_present(test: &str) -> bool {
        match check_tools() {
            Ok(()) => true,
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("{test} must run in CI: {e:#}")
            }
            Err(e) => {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {test}: {e:#} ***\n");
                false
            }
        }
    }

    /// The whole bench, shrunk (1 round, 1 s runs, 2 pods, 1,000 other
    /// services): every contender answers every workload without errors,
    /// headway's `random` steers and `observe` does not, the hooks are
    /// costed, and the three result files are written. Checks behaviour
    /// only; no timing is asserted.
    #[test]
    fn smoke_one_short_round_of_everything() {
        if !headway_testbed::require_root("smoke_one_short_round_of_everything")
            || !tools_present("smoke_one_short_round_of_everything")
        {
            return;
        }
        let out = std::env::temp_dir().join(format!("headway-bench-smoke-{}", unique_suffix()));
        let _cleanup = RemoveDir(out.clone());
        let opts = Options {
            quick: true,
            rounds: Some(1),
            seconds: Some(1),
            pods: 2,
            other_services: 1_000,
            out: out.clone(),
            no_dns: true,
            render: None,
            workloads: vec![],
            contenders: vec![],
            perf: None,
        };
        let results = measure(&opts).expect("the bench runs");

        let contenders: Vec<Contender> = results.setup.contenders.iter().map(|c| c.0).collect();
        assert!(contenders.contains(&Contender::Direct));
        assert!(contenders.contains(&Contender::HeadwayRandom));
        assert!(contenders.contains(&Contender::Iptables));
        assert!(contenders.contains(&Contender::Haproxy));
        for &c in &contenders {
            for w in Workload::WRK {
                let s: Vec<&Sample> = results
                    .samples
                    .iter()
                    .filter(|s| s.contender == c && s.workload == w)
                    .collect();
                assert_eq!(s.len(), 1, "{c:?} {w:?}");
                let m = &s[0].measured;
                assert!(m.requests > 0, "{c:?} {w:?}: {m:?}");
                assert!(s[0].cpu_us > 0, "{c:?} {w:?}: no CPU time read");
                // wrk's own counters: a broken path shows up as errors.
                assert!(
                    m.errors.connect + m.errors.status == 0,
                    "{c:?} {w:?}: {m:?}"
                );
            }
        }
        let connect = |c: Contender| {
            results
                .samples
                .iter()
                .find(|s| s.contender == c && s.workload == Workload::Connect)
                .and_then(|s| s.decisions.clone())
                .expect("headway samples carry decisions")
        };
        let random = connect(Contender::HeadwayRandom);
        assert!(
            random.get("steered_balanced").copied().unwrap_or(0) > 0,
            "{random:?}"
        );
        let observe = connect(Contender::HeadwayObserve);
        assert!(
            observe.get("kept_observe").copied().unwrap_or(0) > 0,
            "{observe:?}"
        );
        assert!(
            observe.keys().all(|k| !k.starts_with("steered")),
            "{observe:?}"
        );
        assert!(
            results
                .hook_costs
                .iter()
                .any(|h| h.hook == "hw_connect4" && h.runs > 0 && h.run_time_ns > 0),
            "{:?}",
            results.hook_costs
        );
        assert_eq!(results.setup.iptables_rules.map(|n| n > 8_000), Some(true));
        // The paired workloads: a summary per headway contender, sockets
        // checked (run() fails otherwise), random steered its connection
        // at least once over the runs' connects, and the program check:
        // no program ran for the A/A-only client, the headway side ran the
        // cgroup_skb programs.
        for c in [Contender::HeadwayRandom, Contender::HeadwayObserve] {
            for w in [
                Workload::PairedOne,
                Workload::PairedLoad,
                Workload::PairedNew,
            ] {
                let p = results
                    .paired
                    .iter()
                    .find(|p| p.contender == c && p.workload == w)
                    .unwrap_or_else(|| panic!("no paired summary for {c:?} {w:?}"));
                assert!(p.direct.requests > 0 && p.headway.requests > 0, "{p:?}");
            }
            let runs = results
                .program_runs
                .iter()
                .find(|r| r.contender == c)
                .expect("program runs checked");
            assert!(runs.control_only_requests > 0, "{runs:?}");
            assert_eq!(runs.control_only_total_runs(), 0, "{runs:?}");
            assert!(runs.skb_runs_per_headway_request() >= 1.0, "{runs:?}");
        }
        // The floor is measured paired too, beside direct.
        let floor = results
            .paired
            .iter()
            .find(|p| p.contender == Contender::Floor && p.workload == Workload::PairedNew)
            .expect("a paired-new summary of the floor");
        assert!(floor.headway.requests > 0, "{floor:?}");
        let decided = |c: Contender, key: &str| -> u64 {
            results
                .paired_samples
                .iter()
                .filter(|p| p.contender == c)
                .map(|p| p.decisions.get(key).copied().unwrap_or(0))
                .sum()
        };
        assert!(decided(Contender::HeadwayObserve, "kept_observe") > 0);
        assert!(
            decided(Contender::HeadwayRandom, "steered_balanced")
                + decided(Contender::HeadwayRandom, "kept_balanced")
                > 0
        );

        write_results(&results, &out).expect("results written");
        let md = fs::read_to_string(out.join("latest.md")).unwrap();
        assert!(md.contains("| headway, policy random |"), "{md}");
        let json: Results =
            serde_json::from_str(&fs::read_to_string(out.join("latest.json")).unwrap()).unwrap();
        assert_eq!(json.samples.len(), results.samples.len());
        let png = fs::read(out.join("latest.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    }
}
