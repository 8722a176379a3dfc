//! The results: what was measured (every sample), the summary (medians,
//! spreads, ratios to `direct`), the targets of issue #8, the per-hook
//! kernel cost, and their Markdown rendering.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use super::{
    contenders::Contender,
    paired::{PairedSample, ProgramRuns},
    paired_stats::{self, Comparison, Estimate, Side, SideFigures},
    stats::{Better, Spread, TargetCheck, paired_ratios},
    workload::{Measured, Workload},
};
use crate::bench_dns::DnsFigures;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_mib: u64,
    /// /proc/loadavg (1, 5, 15 min) before and after the run: the machine
    /// is shared, and this says how busy it was.
    pub load_before: [f64; 3],
    pub load_after: [f64; 3],
    /// Versions of the programs involved.
    pub tools: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Setup {
    pub rounds: usize,
    pub seconds_per_run: u64,
    pub pods: usize,
    pub other_services: usize,
    /// Rules really loaded in the iptables client's namespace (last round).
    pub iptables_rules: Option<usize>,
    /// Set identically in every client, proxy and pod namespace.
    pub sysctls: Vec<(String, String)>,
    pub workloads: Vec<(Workload, String)>,
    pub contenders: Vec<(Contender, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    pub contender: Contender,
    pub reason: String,
}

/// One wrk run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub round: usize,
    pub workload: Workload,
    pub contender: Contender,
    pub measured: Measured,
    /// CPU time of the client, the pods and the proxy during the run (µs).
    #[serde(default)]
    pub cpu_us: u64,
    /// headway only: the service's connect decisions during the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions: Option<BTreeMap<String, u64>>,
}

/// A figure taken from a wrk run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    RequestsPerSec,
    P50Us,
    P99Us,
    BytesPerSec,
    /// Requests per second of CPU time the client, pods and proxy used:
    /// what a request costs, whatever else ran on the machine meanwhile.
    RequestsPerCpuSec,
    BytesPerCpuSec,
}

impl Metric {
    fn of(self, s: &Sample) -> f64 {
        let m = &s.measured;
        let cpu_s = s.cpu_us.max(1) as f64 / 1e6;
        match self {
            Metric::RequestsPerSec => m.requests_per_sec(),
            Metric::P50Us => m.p50_us,
            Metric::P99Us => m.p99_us,
            Metric::BytesPerSec => m.bytes_per_sec(),
            Metric::RequestsPerCpuSec => m.requests as f64 / cpu_s,
            Metric::BytesPerCpuSec => m.bytes as f64 / cpu_s,
        }
    }

    pub fn better(self) -> Better {
        match self {
            Metric::P50Us | Metric::P99Us => Better::Lower,
            _ => Better::Higher,
        }
    }

    fn show(self, value: f64) -> String {
        match self {
            Metric::RequestsPerSec | Metric::RequestsPerCpuSec => thousands(value),
            Metric::P50Us | Metric::P99Us => format!("{value:.0} µs"),
            Metric::BytesPerSec => format!("{:.2} Gbit/s", value * 8.0 / 1e9),
            Metric::BytesPerCpuSec => format!("{:.2} GB", value / 1e9),
        }
    }
}

/// The columns of the report, in order: (workload, metric, header). The
/// first [`WALL_CLOCK_COLUMNS`] are wall-clock figures, the rest per
/// CPU-second.
pub const COLUMNS: [(Workload, Metric, &str); 10] = [
    (Workload::Connect, Metric::RequestsPerSec, "new conn/s"),
    (
        Workload::KeepAlive,
        Metric::RequestsPerSec,
        "keep-alive req/s",
    ),
    (Workload::KeepAlive, Metric::P50Us, "keep-alive p50"),
    (Workload::KeepAlive, Metric::P99Us, "keep-alive p99"),
    (Workload::Latency, Metric::P50Us, "1-conn p50"),
    (Workload::Latency, Metric::P99Us, "1-conn p99"),
    (Workload::Bulk, Metric::BytesPerSec, "bulk, 1 conn"),
    (
        Workload::Connect,
        Metric::RequestsPerCpuSec,
        "new conn per CPU-s",
    ),
    (
        Workload::KeepAlive,
        Metric::RequestsPerCpuSec,
        "keep-alive req per CPU-s",
    ),
    (Workload::Bulk, Metric::BytesPerCpuSec, "bulk per CPU-s"),
];
pub const WALL_CLOCK_COLUMNS: usize = 7;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SummaryRow {
    pub workload: Workload,
    pub metric: Metric,
    pub contender: Contender,
    pub value: Spread,
    /// Per-round ratio to `direct` (None for direct itself).
    pub ratio: Option<Spread>,
}

/// What one hook cost during one workload (BPF stats on).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookCost {
    pub contender: Contender,
    pub workload: Workload,
    pub hook: String,
    pub runs: u64,
    pub run_time_ns: u64,
    pub requests: u64,
}

impl HookCost {
    pub fn ns_per_run(&self) -> f64 {
        if self.runs == 0 {
            0.0
        } else {
            self.run_time_ns as f64 / self.runs as f64
        }
    }

    pub fn runs_per_request(&self) -> f64 {
        self.runs as f64 / self.requests.max(1) as f64
    }

    pub fn ns_per_request(&self) -> f64 {
        self.run_time_ns as f64 / self.requests.max(1) as f64
    }
}

/// The control-plane figures come from `cargo xtask bench-control-plane`,
/// which writes them to `source`; read from there if it exists.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlPlane {
    pub source: String,
    pub figures: Option<ControlPlaneRun>,
}

/// One run of `cargo xtask bench-control-plane`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlPlaneRun {
    pub generated_at: String,
    /// /proc/loadavg before the run (the machine may be shared).
    pub load_average: [f64; 3],
    /// EndpointSlice events timed per size.
    pub events: usize,
    pub rows: Vec<ControlPlaneRow>,
}

/// One size: headless services × endpoints per service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlPlaneRow {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Agent start → `/readyz` 200 (every watcher listed, maps written).
    pub synced_ms: f64,
    /// Fake API server accepts a slice change → entry readable in the map.
    pub event_p50_ms: f64,
    pub event_p99_ms: f64,
    pub event_max_ms: f64,
    /// The agent's VmHWM.
    pub peak_rss_mb: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub generated_at: String,
    pub quick: bool,
    pub machine: Machine,
    pub setup: Setup,
    pub skipped: Vec<Skipped>,
    pub samples: Vec<Sample>,
    pub summary: Vec<SummaryRow>,
    pub targets: Vec<TargetCheck>,
    /// The paired runs (their histograms are not kept: `paired` has the
    /// figures).
    #[serde(default)]
    pub paired_samples: Vec<PairedSample>,
    #[serde(default)]
    pub paired: Vec<PairedSummary>,
    /// BPF stats run counts with the paired client (program check).
    #[serde(default)]
    pub program_runs: Vec<ProgramRuns>,
    pub hook_costs: Vec<HookCost>,
    pub dns_interceptor: Option<DnsFigures>,
    pub control_plane: ControlPlane,
}

/// One paired workload for one headway contender, over every round: each
/// side's figures from all blocks merged, and headway and the A/A control
/// each against direct.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairedSummary {
    pub workload: Workload,
    pub contender: Contender,
    pub runs: usize,
    pub direct: SideFigures,
    pub control: SideFigures,
    pub headway: SideFigures,
    pub headway_vs_direct: Comparison,
    pub control_vs_direct: Comparison,
}

/// A target's interval: the bootstrap's, widened on both sides by how far
/// the A/A control of the same figure is from 1. The bootstrap treats
/// blocks as independent, and over a day of runs the A/A ratio left its
/// own interval now and then (by up to half a point): what the control
/// shows the method can get wrong is added as a margin.
pub fn widened(e: &Estimate, control: &Estimate) -> (f64, f64) {
    let margin = (control.ratio - 1.0).abs();
    (e.ci_low - margin, e.ci_high + margin)
}

/// Fewer blocks than this give a target no interval.
pub const MIN_BLOCKS_FOR_INTERVAL: usize = 10;

/// Bootstrap resamples per comparison.
pub const BOOTSTRAP: usize = 500;

/// Pools every round's blocks per (paired workload, headway contender).
pub fn summarize_paired(samples: &[PairedSample]) -> Vec<PairedSummary> {
    let mut groups: BTreeMap<(Workload, Contender), Vec<&PairedSample>> = BTreeMap::new();
    for p in samples {
        groups.entry((p.workload, p.contender)).or_default().push(p);
    }
    let mut out = Vec::new();
    for ((workload, contender), runs) in groups {
        let blocks: Vec<paired_stats::Block> =
            runs.iter().flat_map(|p| p.blocks.iter().cloned()).collect();
        let merged = paired_stats::merge(&blocks);
        let seed = workload as u64 * 31 + contender as u64;
        let (Some(hw), Some(aa)) = (
            paired_stats::compare(&blocks, Side::Headway, Side::Direct, BOOTSTRAP, seed),
            paired_stats::compare(&blocks, Side::Control, Side::Direct, BOOTSTRAP, seed),
        ) else {
            continue;
        };
        out.push(PairedSummary {
            workload,
            contender,
            runs: runs.len(),
            direct: merged.side(Side::Direct).figures(),
            control: merged.side(Side::Control).figures(),
            headway: merged.side(Side::Headway).figures(),
            headway_vs_direct: hw,
            control_vs_direct: aa,
        });
    }
    out
}

/// The per-round values of one (workload, metric, contender).
fn series(samples: &[Sample], w: Workload, m: Metric, c: Contender) -> Vec<(usize, f64)> {
    samples
        .iter()
        .filter(|s| s.workload == w && s.contender == c)
        .map(|s| (s.round, m.of(s)))
        .collect()
}

/// Medians and spreads of every column for every contender, with the
/// per-round ratios to `direct`.
pub fn summarize(samples: &[Sample], contenders: &[Contender]) -> Vec<SummaryRow> {
    let mut rows = Vec::new();
    for (w, m, _) in COLUMNS {
        let direct = series(samples, w, m, Contender::Direct);
        for &c in contenders {
            let values = series(samples, w, m, c);
            let Some(value) = Spread::of(&values.iter().map(|v| v.1).collect::<Vec<_>>()) else {
                continue;
            };
            let ratio = (c != Contender::Direct)
                .then(|| Spread::of(&paired_ratios(&values, &direct)))
                .flatten();
            rows.push(SummaryRow {
                workload: w,
                metric: m,
                contender: c,
                value,
                ratio,
            });
        }
    }
    rows
}

fn ratio_of(summary: &[SummaryRow], w: Workload, m: Metric, c: Contender) -> Option<f64> {
    summary
        .iter()
        .find(|r| r.workload == w && r.metric == m && r.contender == c)?
        .ratio
        .map(|r| r.median)
}

/// A target read from a paired workload, and the wrk figure it replaces.
pub struct PairedTarget {
    pub workload: Workload,
    pub pick: fn(&Comparison) -> Estimate,
    pub threshold: f64,
    pub better: Better,
    pub name: &'static str,
    /// The chart's label.
    pub short: &'static str,
    pub replaces: (Workload, Metric),
}

pub const PAIRED_TARGETS: [PairedTarget; 4] = [
    PairedTarget {
        workload: Workload::PairedNew,
        pick: |c| c.rate,
        threshold: 0.97,
        better: Better::Higher,
        name: "new-connection rate ≥ 0.97 × direct (paired)",
        short: "paired new conn",
        replaces: (Workload::Connect, Metric::RequestsPerSec),
    },
    PairedTarget {
        workload: Workload::PairedLoad,
        pick: |c| c.rate,
        threshold: 0.99,
        better: Better::Higher,
        name: "keep-alive request rate ≥ 0.99 × direct (paired, under load)",
        short: "paired rate",
        replaces: (Workload::KeepAlive, Metric::RequestsPerSec),
    },
    PairedTarget {
        workload: Workload::PairedOne,
        pick: |c| c.p99,
        threshold: 1.05,
        better: Better::Lower,
        name: "p99, one persistent connection, ≤ 1.05 × direct (paired)",
        short: "paired 1-conn p99",
        replaces: (Workload::Latency, Metric::P99Us),
    },
    PairedTarget {
        workload: Workload::PairedLoad,
        pick: |c| c.p99,
        threshold: 1.05,
        better: Better::Lower,
        name: "p99, persistent connections under load, ≤ 1.05 × direct (paired)",
        short: "paired p99",
        replaces: (Workload::KeepAlive, Metric::P99Us),
    },
];

/// Issue #8's targets for each headway contender that ran. Where a paired
/// workload ran, the keep-alive rate and the p99 targets read its pooled
/// ratio (with its 95% interval) instead of wrk's separate runs.
pub fn check_targets(
    summary: &[SummaryRow],
    samples: &[Sample],
    paired: &[PairedSummary],
) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    for c in [Contender::HeadwayRandom, Contender::HeadwayObserve] {
        let id = c.id();
        let paired_of = |w: Workload| {
            paired
                .iter()
                .find(|p| p.workload == w && p.contender == c)
                .map(|p| (p.headway_vs_direct, p.control_vs_direct))
        };
        // The wrk figures the paired ones replace, when they ran.
        let mut replaced: Vec<(Workload, Metric)> = Vec::new();
        for t in &PAIRED_TARGETS {
            if let Some((cmp, aa)) = paired_of(t.workload) {
                let e = (t.pick)(&cmp);
                let mut check =
                    TargetCheck::new(&format!("{id}: {}", t.name), e.ratio, t.threshold, t.better);
                // A bootstrap over a handful of blocks (a --quick run) says
                // little: no interval, so never "resolved".
                if cmp.blocks >= MIN_BLOCKS_FOR_INTERVAL {
                    check.interval = Some(widened(&e, &(t.pick)(&aa)));
                }
                out.push(check);
                replaced.push(t.replaces);
            }
        }
        let checks = [
            (
                Workload::Connect,
                Metric::RequestsPerSec,
                0.97,
                "new-connection rate ≥ 0.97 × direct",
            ),
            (
                Workload::KeepAlive,
                Metric::RequestsPerSec,
                0.99,
                "keep-alive request rate ≥ 0.99 × direct",
            ),
            (
                Workload::Latency,
                Metric::P99Us,
                1.05,
                "p99, one persistent connection, ≤ 1.05 × direct",
            ),
            (
                Workload::KeepAlive,
                Metric::P99Us,
                1.05,
                "p99, persistent connections under load, ≤ 1.05 × direct",
            ),
            (
                Workload::Connect,
                Metric::RequestsPerCpuSec,
                0.97,
                "new connections per CPU-second ≥ 0.97 × direct",
            ),
            (
                Workload::KeepAlive,
                Metric::RequestsPerCpuSec,
                0.99,
                "keep-alive requests per CPU-second ≥ 0.99 × direct",
            ),
        ];
        for (w, m, threshold, name) in checks {
            if replaced.contains(&(w, m)) {
                continue;
            }
            if let Some(ratio) = ratio_of(summary, w, m, c) {
                out.push(TargetCheck::new(
                    &format!("{id}: {name}"),
                    ratio,
                    threshold,
                    m.better(),
                ));
            }
        }
        // Better than the iptables path: paired per round, headway over
        // iptables, on new connections (where DNAT rules are walked).
        let (w, m) = (Workload::Connect, Metric::RequestsPerSec);
        let ours = series(samples, w, m, c);
        let theirs = series(samples, w, m, Contender::Iptables);
        if let Some(r) = Spread::of(&paired_ratios(&ours, &theirs)) {
            out.push(TargetCheck::new(
                &format!("{id}: new-connection rate > kube-proxy iptables (10k services)"),
                r.median,
                1.0,
                Better::Higher,
            ));
        }
    }
    out
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The main table: one row per contender, one column per figure; a cell
/// is the median over rounds and, for all but `direct`, the median
/// per-round ratio to `direct` with its range.
pub fn results_table(results: &Results) -> String {
    table(results, &COLUMNS[..WALL_CLOCK_COLUMNS])
}

/// headway `random` against `direct-random`, round by round: both spread
/// every new connection over the pods at random, so their ratio is what
/// headway's datapath costs, apart from what spreading itself costs
/// (`direct-random` against `direct`). Empty when either did not run.
pub fn spread_ratios(samples: &[Sample]) -> Vec<(Workload, Metric, Spread, Option<Spread>)> {
    let mut out = Vec::new();
    let rows = [
        (Workload::Connect, Metric::RequestsPerSec),
        (Workload::Connect, Metric::RequestsPerCpuSec),
        (Workload::KeepAlive, Metric::RequestsPerSec),
        (Workload::KeepAlive, Metric::RequestsPerCpuSec),
        (Workload::Latency, Metric::P50Us),
        (Workload::Latency, Metric::P99Us),
    ];
    for (w, m) in rows {
        let direct = series(samples, w, m, Contender::Direct);
        let spread = series(samples, w, m, Contender::DirectRandom);
        let headway = series(samples, w, m, Contender::HeadwayRandom);
        let Some(spreading) = Spread::of(&paired_ratios(&spread, &direct)) else {
            continue;
        };
        // One connection, never reopened: nothing is spread, so there is
        // no datapath-only ratio to give.
        let datapath = (w != Workload::Latency)
            .then(|| Spread::of(&paired_ratios(&headway, &spread)))
            .flatten();
        out.push((w, m, spreading, datapath));
    }
    out
}

fn spread_section(samples: &[Sample]) -> String {
    let rows = spread_ratios(samples);
    if rows.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n## Spreading connections vs steering them\n\n\
         `direct` keeps each client thread on one pod; a balancer spreads every new \
         connection. `direct-random` is a client that picks a random pod IP itself for \
         each new connection (no programs): against `direct` it shows what spreading \
         costs (more cross-CPU wake-ups), and headway `random` against it shows what \
         headway's datapath adds. Keep-alive connections are made once per run, and \
         the latency connection once: there `direct-random` keeps `direct`'s pods \
         (with one Lua call per response more), so its ratio to `direct` is the noise \
         floor of the method, while headway `random` spreads them. Median of per-round \
         ratios [min–max].\n\n\
         | workload | metric | direct-random / direct | headway random / direct-random |\n\
         |---|---|---|---|\n",
    );
    let cell = |s: &Spread| format!("×{:.2} [{:.2}–{:.2}]", s.median, s.min, s.max);
    for (w, m, spreading, datapath) in rows {
        let metric = match m {
            Metric::RequestsPerCpuSec => "per CPU-second",
            Metric::P50Us => "p50",
            Metric::P99Us => "p99",
            _ => "per second",
        };
        let _ = writeln!(
            out,
            "| {} | {metric} | {} | {} |",
            w.id(),
            cell(&spreading),
            datapath.as_ref().map_or("–".into(), cell)
        );
    }
    out
}

fn estimate_cell(e: &Estimate) -> String {
    format!("×{:.3} [{:.3}–{:.3}]", e.ratio, e.ci_low, e.ci_high)
}

/// The paired measurement: ratios with intervals, each side's figures,
/// and what was checked about the sockets.
pub fn paired_section(results: &Results) -> String {
    if results.paired.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n## Paired measurements\n\n\
         One client process (this bench's own, in the headway contender's client namespace) \
         holds, per thread, three keep-alive connections to the same pod: `direct` and \
         `control` made in a cgroup with no programs, `headway` made after the process moved \
         itself into the cgroup headway's programs are attached to (resolving the service name \
         there, so its connect goes through the DNS observation and the policy; `random` picks \
         the pod, and the other two follow it). Cgroup programs run for the cgroup a socket \
         was created in, so each connection keeps its side. The threads alternate requests \
         over their three connections in a random order per cycle, one request in flight, \
         and record every latency per side and per 1-s block. Load from other tenants then \
         hits the three sides alike. Rate = requests per second of the time spent waiting \
         on that side's requests. Ratios are pooled over all blocks of all rounds, \
         [95% block-bootstrap interval]; `control / direct` is the A/A noise floor of the \
         method. For latencies a ratio below 1 is better.\n\n\
         `paired-new` is the same client making new connections instead: per cycle each \
         side takes a socket it made beforehand in its cgroup (so its cgroup is fixed; \
         moving the process every cycle would cost more than the connection), connects, \
         sends one request with `Connection: close` and reads until the pod closes; the \
         time from connect() to close is that connection's latency, and the rate is \
         connections per second of that time. Under `random` the direct and control sides \
         go to a random pod each cycle, as headway spreads its side, so all three pay the \
         same spreading; under `observe` all three go to the headway side's pod. For the \
         `floor` contender the `headway` side is a socket made in the floor's cgroup (a \
         do-nothing program on each hook), which connects to the resolved address.\n\n\
         | workload | contender | blocks | rate | p50 | p99 | p99.9 | A/A rate | A/A p50 | A/A p99 | A/A p99.9 |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in &results.paired {
        let (h, a) = (&p.headway_vs_direct, &p.control_vs_direct);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.workload.id(),
            p.contender.id(),
            h.blocks,
            estimate_cell(&h.rate),
            estimate_cell(&h.p50),
            estimate_cell(&h.p99),
            estimate_cell(&h.p999),
            estimate_cell(&a.rate),
            estimate_cell(&a.p50),
            estimate_cell(&a.p99),
            estimate_cell(&a.p999),
        );
    }
    out.push_str(
        "\nPer-block ratios (1-s blocks), headway / direct, median [min–max]:\n\n\
         | workload | contender | rate | p50 | p99 | p99.9 |\n|---|---|---|---|---|---|\n",
    );
    let block = |e: &Estimate| {
        format!(
            "×{:.3} [{:.3}–{:.3}]",
            e.block_median, e.block_min, e.block_max
        )
    };
    for p in &results.paired {
        let h = &p.headway_vs_direct;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            p.workload.id(),
            p.contender.id(),
            block(&h.rate),
            block(&h.p50),
            block(&h.p99),
            block(&h.p999)
        );
    }
    out.push_str(
        "\nEach side's figures, all rounds pooled:\n\n\
         | workload | contender | side | requests | req/s of its time | p50 | p99 | p99.9 |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for p in &results.paired {
        for (side, f) in [
            (Side::Direct, &p.direct),
            (Side::Control, &p.control),
            (Side::Headway, &p.headway),
        ] {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.1} µs | {:.1} µs | {:.1} µs |",
                p.workload.id(),
                p.contender.id(),
                side.id(),
                thousands(f.requests as f64),
                thousands(f.rate),
                f.p50_ns / 1e3,
                f.p99_ns / 1e3,
                f.p999_ns / 1e3
            );
        }
    }
    // What was checked about the sockets.
    let threads: usize = results.paired_samples.iter().map(|p| p.threads.len()).sum();
    let mut decisions: BTreeMap<(Contender, String), u64> = BTreeMap::new();
    let mut moved = BTreeMap::<Contender, (usize, usize)>::new();
    for p in &results.paired_samples {
        for (k, v) in &p.decisions {
            *decisions.entry((p.contender, k.clone())).or_default() += v;
        }
        let m = moved.entry(p.contender).or_default();
        for t in &p.threads {
            m.1 += 1;
            if t.asked.as_deref().is_some_and(|a| a != t.pod) {
                m.0 += 1;
            }
        }
    }
    let _ = writeln!(
        out,
        "\nChecked in every run, from the kernel's socket table (`ss --cgroup` in the \
         client's namespace; {threads} threads × 3 sockets): each `headway` socket is in \
         headway's cgroup, each `direct` and `control` socket in the plain one, and all three \
         reach the thread's pod."
    );
    for (c, (m, n)) in &moved {
        let ds: Vec<String> = decisions
            .iter()
            .filter(|((dc, _), _)| dc == c)
            .map(|((_, k), v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            out,
            "- {}: the headway connection reached another pod than the address it asked for in \
             {m} of {n} threads; connect decisions: {}.",
            c.id(),
            if ds.is_empty() {
                "none".to_owned()
            } else {
                ds.join(", ")
            }
        );
    }
    if !results.program_runs.is_empty() {
        out.push_str(
            "\nProgram runs (BPF stats on, separate runs after the rounds): the client with \
             only the two plain sockets, then paired on one connection.\n\n\
             | contender | A/A-only requests | program runs meanwhile | headway-side requests | \
             plain-side requests | cgroup_skb runs per headway request |\n\
             |---|---|---|---|---|---|\n",
        );
        for r in &results.program_runs {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.2} |",
                r.contender.id(),
                thousands(r.control_only_requests as f64),
                r.control_only_total_runs(),
                thousands(r.headway_requests as f64),
                thousands(r.plain_requests as f64),
                r.skb_runs_per_headway_request()
            );
        }
    }
    out
}

/// The same per CPU-second of the bench's own processes.
pub fn cpu_table(results: &Results) -> String {
    table(results, &COLUMNS[WALL_CLOCK_COLUMNS..])
}

fn table(results: &Results, columns: &[(Workload, Metric, &str)]) -> String {
    let mut out = String::from("| contender |");
    for (_, _, header) in columns {
        let _ = write!(out, " {header} |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(columns.len()));
    out.push('\n');
    for (c, label) in &results.setup.contenders {
        let _ = write!(out, "| {label} |");
        for &(w, m, _) in columns {
            let row = results
                .summary
                .iter()
                .find(|r| r.workload == w && r.metric == m && r.contender == *c);
            let cell = match row {
                None => "–".to_owned(),
                Some(r) => match r.ratio {
                    None => format!(
                        "{} [{}–{}]",
                        m.show(r.value.median),
                        m.show(r.value.min),
                        m.show(r.value.max)
                    ),
                    Some(ratio) => format!(
                        "{} **×{:.2}** [{:.2}–{:.2}]",
                        m.show(r.value.median),
                        ratio.median,
                        ratio.min,
                        ratio.max
                    ),
                },
            };
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}

/// The whole Markdown report.
pub fn markdown(results: &Results) -> String {
    let mut out = String::new();
    let m = &results.machine;
    let s = &results.setup;
    let _ = writeln!(
        out,
        "# headway benchmark{}\n",
        if results.quick {
            " (quick smoke run)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "Generated {} by `cargo xtask bench{}`. Machine: {} vCPU ({}), {} MiB, kernel {}. \
         Load average before/after: {:.2} {:.2} {:.2} / {:.2} {:.2} {:.2} (1/5/15 min; \
         the machine is shared, anything above ~0 is other tenants' work).\n",
        results.generated_at,
        if results.quick { " --quick" } else { "" },
        m.cpus,
        m.cpu_model,
        m.memory_mib,
        m.kernel,
        m.load_before[0],
        m.load_before[1],
        m.load_before[2],
        m.load_after[0],
        m.load_after[1],
        m.load_after[2],
    );
    let _ = writeln!(
        out,
        "{} rounds × {} s per run, contenders interleaved (order rotated each round), \
         fresh namespaces every round; {} pods (nginx, 1 worker each); medians over rounds, \
         **×ratio** = median of the per-round ratios to `direct` [min–max]. \
         For latencies a ratio below 1 is better.\n",
        s.rounds, s.seconds_per_run, s.pods
    );
    out.push_str(&results_table(results));
    out.push_str(
        "\nPer CPU-second: requests (or bytes) divided by the CPU time the client, the pods \
         and the proxy used during the run (cgroup v2 `cpu.stat`), so other tenants' load \
         on the machine does not count against whoever ran while it peaked. Packet \
         processing that runs in softirq context outside these processes, and the headway \
         agent (control plane), are not included.\n\n",
    );
    out.push_str(&cpu_table(results));

    out.push_str("\n## Targets (issue #8)\n\n");
    if !results.paired.is_empty() {
        out.push_str(
            "Targets marked *(paired)* read the paired measurement below (headway and direct \
             sockets in one client, requests or new connections alternated, all blocks \
             pooled) instead of wrk's \
             separate runs, which cannot resolve a 1% difference on this machine. [interval] = \
             the 95% block-bootstrap interval, widened on each side by how far the A/A \
             control's same figure is from 1 (none below 10 one-second blocks); *resolved* \
             means the whole interval is on one side of the threshold.\n\n",
        );
    }
    for t in &results.targets {
        let interval = match (t.interval, t.resolved()) {
            (Some((low, high)), Some(resolved)) => format!(
                " [{low:.3}–{high:.3}]{}",
                if resolved {
                    ", resolved"
                } else {
                    ", not resolved"
                }
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "- {} {}: ×{:.3}{interval} vs {:.2} ({} by {:.1} points)",
            if t.met { "✅" } else { "❌" },
            t.name,
            t.ratio,
            t.threshold,
            if t.met { "met" } else { "missed" },
            t.margin_points.abs()
        );
    }

    out.push_str(&paired_section(results));

    out.push_str(&spread_section(&results.samples));

    out.push_str("\n## Kernel cost per hook (BPF stats, separate runs)\n\n");
    if results.hook_costs.is_empty() {
        out.push_str("Not measured in this run.\n");
    } else {
        out.push_str(
            "Measured in extra runs after the rounds, with `kernel.bpf_stats_enabled=1` \
             (restored afterwards; it adds two clock reads to every program run, so these \
             runs are not among the ratios above). For `bulk` a request is 64 MiB.\n\n\
             | contender | workload | hook | runs per request | ns per run | ns per request |\n\
             |---|---|---|---|---|---|\n",
        );
        let mut totals: BTreeMap<(Contender, Workload), f64> = BTreeMap::new();
        for h in &results.hook_costs {
            *totals.entry((h.contender, h.workload)).or_default() += h.ns_per_request();
            if h.runs == 0 {
                continue;
            }
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2} | {:.0} | {:.0} |",
                h.contender.id(),
                h.workload.id(),
                h.hook,
                h.runs_per_request(),
                h.ns_per_run(),
                h.ns_per_request()
            );
        }
        for ((c, w), total) in totals {
            let _ = writeln!(
                out,
                "| {} | {} | **all hooks** | | | **{total:.0}** |",
                c.id(),
                w.id()
            );
        }
    }

    out.push_str("\n## DNS interceptor (BPF_PROG_TEST_RUN, `cargo xtask bench-dns`)\n\n");
    match &results.dns_interceptor {
        None => out.push_str("Not measured in this run.\n"),
        Some(d) => {
            let _ = writeln!(
                out,
                "hw_skb_ingress, ns per packet (repeat method: mean of {} runs; learning path: \
                 median of {} single runs, net of {:.1} ns harness cost).\n\n| case | ns |\n|---|---|",
                d.repeat, d.samples, d.harness_ns
            );
            for (case, ns) in &d.repeat_ns {
                let _ = writeln!(out, "| {case} | {ns:.1} |");
            }
            for (case, _raw, net) in &d.learning_ns {
                let _ = writeln!(out, "| learning: {case} | {net:.1} |");
            }
        }
    }

    out.push_str("\n## Control plane\n\n");
    match &results.control_plane.figures {
        Some(run) => {
            let _ = writeln!(
                out,
                "From `{}` ({}, load average {:.1} {:.1} {:.1}; {} EndpointSlice events per size). \
                 Targets: 10,000 × 10 synced ≤ 2 s, event p99 ≤ 5 ms, peak RSS ≤ 150 MB.\n",
                results.control_plane.source,
                run.generated_at,
                run.load_average[0],
                run.load_average[1],
                run.load_average[2],
                run.events
            );
            out.push_str(
                "| services × endpoints | synced | event p50 | event p99 | event max | peak RSS |\n\
                 |---|---|---|---|---|---|\n",
            );
            for r in &run.rows {
                let _ = writeln!(
                    out,
                    "| {} × {} | {:.0} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} MB |",
                    r.services,
                    r.endpoints_per_service,
                    r.synced_ms,
                    r.event_p50_ms,
                    r.event_p99_ms,
                    r.event_max_ms,
                    r.peak_rss_mb
                );
            }
        }
        None => {
            let _ = writeln!(
                out,
                "Not measured yet: `cargo xtask bench-control-plane` writes `{}`; \
                 the next bench run includes it.",
                results.control_plane.source
            );
        }
    }

    out.push_str("\n## Setup\n\n");
    for (w, d) in &s.workloads {
        let _ = writeln!(out, "- `{}`: {d}", w.id());
    }
    let _ = writeln!(
        out,
        "- iptables contender: kube-proxy's chain layout, {} other services \
         (2 endpoints each) plus ours in the middle of KUBE-SERVICES; {} rules loaded.",
        s.other_services,
        s.iptables_rules
            .map_or_else(|| "–".to_owned(), |n| thousands(n as f64))
    );
    let sysctls: Vec<String> = s.sysctls.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        out,
        "- every client, proxy and pod namespace: {}",
        sysctls.join(", ")
    );
    let tools: Vec<String> = m.tools.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(out, "- versions: {}", tools.join("; "));
    for sk in &results.skipped {
        let _ = writeln!(
            out,
            "- not measured: {}: {}",
            sk.contender.label(),
            sk.reason
        );
    }
    let errors: u64 = results
        .samples
        .iter()
        .map(|s| s.measured.errors.total())
        .sum();
    let _ = writeln!(
        out,
        "- wrk errors over all {} runs: {errors}",
        results.samples.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::Errors;

    fn sample(round: usize, w: Workload, c: Contender, rps: f64, p99: f64) -> Sample {
        Sample {
            round,
            workload: w,
            contender: c,
            measured: Measured {
                requests: rps as u64,
                duration_us: 1_000_000,
                bytes: rps as u64 * 100,
                p50_us: p99 / 2.0,
                p99_us: p99,
                errors: Errors::default(),
            },
            cpu_us: 2_000_000,
            decisions: None,
        }
    }

    fn fixture() -> Vec<Sample> {
        let mut s = Vec::new();
        for (round, scale) in [(0, 1.0), (1, 0.5), (2, 1.0)] {
            for w in Workload::WRK {
                s.push(sample(round, w, Contender::Direct, 1000.0 * scale, 100.0));
                s.push(sample(
                    round,
                    w,
                    Contender::HeadwayRandom,
                    980.0 * scale,
                    104.0,
                ));
                s.push(sample(round, w, Contender::Iptables, 900.0 * scale, 120.0));
            }
        }
        s
    }

    #[test]
    fn ratios_are_paired_per_round_so_a_slow_round_cancels_out() {
        let contenders = [
            Contender::Direct,
            Contender::HeadwayRandom,
            Contender::Iptables,
        ];
        let summary = summarize(&fixture(), &contenders);
        let row = summary
            .iter()
            .find(|r| {
                r.workload == Workload::Connect
                    && r.metric == Metric::RequestsPerSec
                    && r.contender == Contender::HeadwayRandom
            })
            .unwrap();
        assert_eq!(row.value.median, 980.0);
        assert_eq!((row.value.min, row.value.max), (490.0, 980.0));
        let ratio = row.ratio.unwrap();
        assert!((ratio.median - 0.98).abs() < 1e-9 && (ratio.max - ratio.min).abs() < 1e-9);
        assert!(
            summary
                .iter()
                .filter(|r| r.contender == Contender::Direct)
                .all(|r| r.ratio.is_none())
        );
        // Every column for every contender.
        assert_eq!(summary.len(), COLUMNS.len() * contenders.len());
    }

    #[test]
    fn targets_say_met_and_missed_with_margins() {
        let samples = fixture();
        let contenders = [
            Contender::Direct,
            Contender::HeadwayRandom,
            Contender::Iptables,
        ];
        let targets = check_targets(&summarize(&samples, &contenders), &samples, &[]);
        let by_name = |part: &str| targets.iter().find(|t| t.name.contains(part)).unwrap();
        assert!(by_name("new-connection rate ≥ 0.97").met);
        assert!(!by_name("keep-alive request rate ≥ 0.99").met);
        assert!((by_name("keep-alive request rate").margin_points + 1.0).abs() < 1e-6);
        assert!(by_name("one persistent connection").met);
        let vs_iptables = by_name("kube-proxy iptables");
        assert!(vs_iptables.met && (vs_iptables.ratio - 980.0 / 900.0).abs() < 1e-9);
        // No observe samples: no observe targets.
        assert!(
            targets
                .iter()
                .all(|t| !t.name.starts_with("headway-observe"))
        );
    }

    #[test]
    fn table_has_a_row_per_contender_and_a_cell_per_column() {
        let samples = fixture();
        let contenders = [
            Contender::Direct,
            Contender::HeadwayRandom,
            Contender::Iptables,
        ];
        let summary = summarize(&samples, &contenders);
        let results = Results {
            generated_at: "now".into(),
            quick: true,
            machine: Machine::default(),
            setup: Setup {
                contenders: contenders.iter().map(|c| (*c, c.label().into())).collect(),
                ..Setup::default()
            },
            skipped: vec![],
            targets: check_targets(&summary, &samples, &[]),
            paired_samples: vec![],
            paired: vec![],
            program_runs: vec![],
            summary,
            samples,
            hook_costs: vec![],
            dns_interceptor: None,
            control_plane: ControlPlane {
                source: "bench/results/control-plane.json".into(),
                figures: None,
            },
        };
        let table = results_table(&results);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2 + contenders.len());
        assert!(
            lines
                .iter()
                .all(|l| l.matches('|').count() == WALL_CLOCK_COLUMNS + 2)
        );
        // 1,000 requests in 2 CPU-seconds.
        assert!(
            cpu_table(&results).contains("| direct (pod IPs, no programs) | 500 [250–500] |"),
            "{}",
            cpu_table(&results)
        );
        assert!(lines[2].starts_with("| direct") && lines[2].contains("1,000 [500–1,000]"));
        assert!(lines[3].contains("980 **×0.98** [0.98–0.98]"));
        let md = markdown(&results);
        assert!(md.contains("Not measured yet: `cargo xtask bench-control-plane`"));
        // The JSON round-trips.
        let json = serde_json::to_string(&results).unwrap();
        let back: Results = serde_json::from_str(&json).unwrap();
        assert_eq!(back.summary.len(), results.summary.len());
    }

    #[test]
    fn spreading_and_steering_are_told_apart_round_by_round() {
        // Without direct-random there is nothing to tell apart.
        assert!(spread_ratios(&fixture()).is_empty());
        assert_eq!(spread_section(&fixture()), "");
        let mut samples = fixture();
        for (round, scale) in [(0, 1.0), (1, 0.5), (2, 1.0)] {
            for w in Workload::WRK {
                samples.push(sample(
                    round,
                    w,
                    Contender::DirectRandom,
                    950.0 * scale,
                    100.0,
                ));
            }
        }
        let rows = spread_ratios(&samples);
        // connect and keep-alive, each per second and per CPU-second; the
        // latency workload's p50 and p99, without a datapath-only ratio.
        assert_eq!(rows.len(), 6);
        for (w, m, spreading, datapath) in &rows {
            if *w == Workload::Latency {
                assert_eq!(*datapath, None);
                // The fixture's latencies are the same for both.
                assert!((spreading.median - 1.0).abs() < 1e-9, "{m:?} {spreading:?}");
                continue;
            }
            // Round 1 ran at half speed for everyone: the ratios stay put.
            assert!((spreading.median - 0.95).abs() < 1e-9, "{spreading:?}");
            assert!((spreading.max - spreading.min).abs() < 1e-9);
            let datapath = datapath.expect("a datapath ratio");
            assert!(
                (datapath.median - 980.0 / 950.0).abs() < 1e-9,
                "{datapath:?}"
            );
        }
        let md = spread_section(&samples);
        assert!(
            md.contains("| connect | per second | ×0.95 [0.95–0.95] | ×1.03 [1.03–1.03] |"),
            "{md}"
        );
        assert!(
            md.contains("| latency | p99 | ×1.00 [1.00–1.00] | – |"),
            "{md}"
        );
    }

    fn paired_summary(w: Workload, rate: f64, p99: f64, blocks: usize) -> PairedSummary {
        paired_summary_aa(w, rate, p99, blocks, 1.0)
    }

    fn paired_summary_aa(
        w: Workload,
        rate: f64,
        p99: f64,
        blocks: usize,
        aa: f64,
    ) -> PairedSummary {
        let e = |r: f64| Estimate {
            ratio: r,
            ci_low: r - 0.005,
            ci_high: r + 0.005,
            block_min: r - 0.02,
            block_median: r,
            block_max: r + 0.02,
        };
        let cmp = |rate: f64, p99: f64| Comparison {
            rate: e(rate),
            p50: e(1.0),
            p99: e(p99),
            p999: e(1.0),
            blocks,
        };
        PairedSummary {
            workload: w,
            contender: Contender::HeadwayRandom,
            runs: 1,
            direct: SideFigures::default(),
            control: SideFigures::default(),
            headway: SideFigures::default(),
            headway_vs_direct: cmp(rate, p99),
            control_vs_direct: cmp(aa, aa),
        }
    }

    #[test]
    fn paired_figures_replace_wrk_s_for_keep_alive_rate_and_p99() {
        let samples = fixture();
        let contenders = [
            Contender::Direct,
            Contender::HeadwayRandom,
            Contender::Iptables,
        ];
        let summary = summarize(&samples, &contenders);
        let paired = [
            paired_summary(Workload::PairedLoad, 0.98, 1.01, 25),
            paired_summary(Workload::PairedOne, 0.99, 1.06, 25),
        ];
        let targets = check_targets(&summary, &samples, &paired);
        let named = |part: &str| -> Vec<&TargetCheck> {
            targets.iter().filter(|t| t.name.contains(part)).collect()
        };
        // One keep-alive rate target, the paired one, resolved as missed.
        let rate = named("keep-alive request rate");
        assert_eq!(rate.len(), 1, "{targets:?}");
        assert!(rate[0].name.contains("(paired, under load)"));
        assert!(!rate[0].met && rate[0].resolved() == Some(true));
        let (low, high) = rate[0].interval.unwrap();
        assert!((low - 0.975).abs() < 1e-9 && (high - 0.985).abs() < 1e-9);
        // p99: both from the paired runs; one connection missed, load met.
        let one = named("one persistent connection");
        assert_eq!(one.len(), 1);
        assert!(!one[0].met && one[0].name.contains("(paired)"));
        let load = named("under load, ≤ 1.05");
        assert_eq!(load.len(), 1);
        assert!(load[0].met && load[0].resolved() == Some(true));
        // wrk's per-CPU-second and new-connection targets stay.
        assert_eq!(named("keep-alive requests per CPU-second").len(), 1);
        assert_eq!(named("new-connection rate ≥ 0.97").len(), 1);
        // An A/A control 1% off widens the interval by a point each side:
        // 0.98 [0.975–0.985] becomes [0.965–0.995], no longer resolved.
        let noisy = [paired_summary_aa(
            Workload::PairedLoad,
            0.98,
            1.01,
            25,
            0.99,
        )];
        let targets = check_targets(&summary, &samples, &noisy);
        let rate = targets
            .iter()
            .find(|t| t.name.contains("keep-alive request rate"))
            .unwrap();
        let (low, high) = rate.interval.unwrap();
        assert!((low - 0.965).abs() < 1e-9 && (high - 0.995).abs() < 1e-9);
        assert_eq!(rate.resolved(), Some(false));
        // Two blocks (a --quick run): a ratio, but no interval.
        let few = [paired_summary(Workload::PairedLoad, 0.985, 1.01, 2)];
        let targets = check_targets(&summary, &samples, &few);
        let rate = targets
            .iter()
            .find(|t| t.name.contains("keep-alive request rate"))
            .unwrap();
        assert_eq!((rate.interval, rate.resolved()), (None, None));
        // wrk's p99 for one connection is back when no paired run has it.
        assert!(targets.iter().any(|t| {
            t.name
                .ends_with("one persistent connection, ≤ 1.05 × direct")
        }));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}
