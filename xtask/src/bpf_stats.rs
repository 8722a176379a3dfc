//! The kernel's own per-program run statistics, for the benchmarks:
//! `kernel.bpf_stats_enabled=1` makes it time every run of every program
//! (`run_time_ns`, `run_cnt`). The numbers include the two clock reads
//! around each run.
use std::{collections::BTreeMap, fs, path::Path};

use anyhow::Context;
use headway_testbed::agent::{Bpffs, headway_bin, status_json_of};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns bpf_stats on and puts the old value back on drop.
pub struct BpfStats {
    old: String,
}

impl BpfStats {
    pub fn enable() -> anyhow::Result<BpfStats> {
        let old = fs::read_to_string(STATS_SYSCTL).context("reading bpf_stats_enabled")?;
        fs::write(STATS_SYSCTL, "1").context("enabling bpf_stats")?;
        Ok(BpfStats {
            old: old.trim().to_string(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = fs::write(STATS_SYSCTL, &self.old) {
            eprintln!("could not restore {STATS_SYSCTL} to {}: {e}", self.old);
        }
    }
}

/// (runs, run time in ns) per headway program, from `headway status --json`.
pub fn program_stats(bpffs: &Bpffs) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    program_stats_of(&headway_bin()?, bpffs)
}

/// [`program_stats`] as the `headway` binary `bin` reads the pins (the
/// build of the running agent, when builds are compared).
pub fn program_stats_of(bin: &Path, bpffs: &Bpffs) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let status = status_json_of(bin, bpffs)?;
    let programs = status["programs"]
        .as_array()
        .context("status has no programs")?;
    Ok(programs
        .iter()
        .map(|p| {
            let n = |k: &str| p[k].as_u64().unwrap_or(0);
            (
                p["name"].as_str().unwrap_or("?").to_string(),
                (n("run_count"), n("run_time_ns")),
            )
        })
        .collect())
}

/// Per program that ran between two readings: (runs, mean ns per run).
pub fn per_run(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
) -> BTreeMap<String, (u64, f64)> {
    after
        .iter()
        .filter_map(|(name, (count, time))| {
            let (c0, t0) = before.get(name).copied().unwrap_or_default();
            let runs = count.saturating_sub(c0);
            (runs > 0).then(|| {
                let ns = time.saturating_sub(t0) as f64 / runs as f64;
                (name.clone(), (runs, ns))
            })
        })
        .collect()
}
