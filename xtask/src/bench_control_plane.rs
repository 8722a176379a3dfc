//! `cargo xtask bench-control-plane`: the kube source at scale, against
//! the test bed's fake API server (HTTP on loopback), with the release
//! agent on the real kernel (root needed; programs attach to a cgroup made
//! for the run, no traffic is sent).
//!
//! Per size (headless services × endpoints, one EndpointSlice each):
//! - *synced*: from spawning the agent to `/readyz` answering 200 (every
//!   watcher listed, the maps written);
//! - *event → map*: from the fake API server accepting an EndpointSlice
//!   change (one endpoint's `ready` flips) to the new state being readable
//!   in the pinned `svc_endpoints` map (polled), p50 and p99;
//! - *peak RSS*: the agent's VmHWM from /proc after all of that.
//!
//! The figures also go to `<out>/control-plane.json`, which `cargo xtask
//! bench` folds into its report.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use aya::maps::{HashMap, MapData};
use headway::{
    map_plan::{addr_key, decode_name},
    pinned::Maps,
};
use headway_common::{EndpointState, ServiceEndpointKey, endpoint_flags};
use headway_testbed::{
    Cgroup, FakeApi,
    agent::{Bpffs, free_port, http_get},
    fake_api::objects::headless_service,
};
use serde_json::{Value, json};

use crate::{
    bench::report::{ControlPlaneRow, ControlPlaneRun},
    build_ebpf, util,
};

const NAMESPACE: &str = "bench";

#[derive(clap::Args)]
pub struct Options {
    /// Numbers of headless services to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub services: Vec<usize>,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    pub endpoints: usize,
    /// EndpointSlice events timed per size.
    #[arg(long, default_value_t = 300)]
    pub events: usize,
    /// Where control-plane.json goes (relative to the workspace root).
    #[arg(long, default_value = "bench/results")]
    pub out: std::path::PathBuf,
    /// Measure this agent binary instead of building the workspace's (to
    /// compare two builds in one sitting).
    #[arg(long)]
    pub agent: Option<std::path::PathBuf>,
    /// Start the agent's watches with streaming lists (`--streaming-lists`).
    #[arg(long)]
    pub streaming_lists: bool,
}

struct Row {
    services: usize,
    endpoints: usize,
    synced: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    rss_mb: f64,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench-control-plane loads and attaches BPF programs: run it as root");
    }
    let load_average = load_average()?;
    let bin = match &opts.agent {
        Some(bin) => bin.clone(),
        None => {
            build_ebpf::run(&build_ebpf::Options { release: true })?;
            util::run(util::cargo().args([
                "build",
                "--release",
                "-p",
                "headway",
                "--bin",
                "headway",
            ]))?;
            util::target_dir().join("release").join("headway")
        }
    };
    let mut rows = Vec::new();
    for &services in &opts.services {
        eprintln!(
            "measuring {services} services x {} endpoints",
            opts.endpoints
        );
        rows.push(measure(
            &bin,
            services,
            opts.endpoints,
            opts.events,
            opts.streaming_lists,
        )?);
    }
    println!(
        "\n{:>9} {:>10} {:>10} {:>13} {:>13} {:>13} {:>13}",
        "services", "endpoints", "synced", "event p50", "event p99", "event max", "peak RSS"
    );
    for r in &rows {
        println!(
            "{:>9} {:>10} {:>8.0}ms {:>11.2}ms {:>11.2}ms {:>11.2}ms {:>10.1} MB",
            r.services,
            r.services * r.endpoints,
            ms(r.synced),
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            r.rss_mb
        );
    }
    let run = ControlPlaneRun {
        generated_at: util::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?,
        load_average,
        events: opts.events,
        rows: rows
            .iter()
            .map(|r| ControlPlaneRow {
                services: r.services,
                endpoints_per_service: r.endpoints,
                synced_ms: ms(r.synced),
                event_p50_ms: ms(r.p50),
                event_p99_ms: ms(r.p99),
                event_max_ms: ms(r.max),
                peak_rss_mb: r.rss_mb,
            })
            .collect(),
    };
    let dir = util::workspace_root().join(&opts.out);
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("control-plane.json");
    std::fs::write(&file, serde_json::to_string_pretty(&run)? + "\n")
        .with_context(|| format!("writing {}", file.display()))?;
    eprintln!("wrote {}", file.display());
    println!(
        "\ntargets (issue 5): 10,000 x 10 synced <= 2 s, event p99 <= 5 ms, RSS <= 150 MB.\n\
         event = fake API server accepts the change -> entry readable in svc_endpoints \
         ({} events per size; includes the fake server's HTTP streaming).",
        opts.events
    );
    Ok(())
}

fn load_average() -> anyhow::Result<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg")?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>());
    let mut out = [0.0; 3];
    for slot in &mut out {
        *slot = it.next().context("short /proc/loadavg")??;
    }
    Ok(out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Endpoint `j` of service `i`: a unique 10.x.y.z (never connected to).
fn addr(i: usize, j: usize, endpoints: usize) -> String {
    let idx = i * endpoints + j;
    format!(
        "10.{}.{}.{}",
        100 + idx / 65_536,
        (idx / 256) % 256,
        idx % 256
    )
}

/// Service `i`'s slice; endpoint 0's readiness is `first_ready`.
fn slice(i: usize, endpoints: usize, first_ready: bool) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|j| {
            json!({
                "addresses": [addr(i, j, endpoints)],
                "conditions": {"ready": j != 0 || first_ready},
                "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": format!("s{i}-{j}")},
            })
        })
        .collect();
    json!({
        "kind": "EndpointSlice",
        "metadata": {"name": format!("s{i}-abc"), "namespace": NAMESPACE, "labels": {
            "kubernetes.io/service-name": format!("s{i}"),
            "service.kubernetes.io/headless": "",
        }},
        "addressType": "IPv4",
        "endpoints": eps,
    })
}

fn peak_rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kb / 1024.0)
}

fn measure(
    bin: &Path,
    services: usize,
    endpoints: usize,
    events: usize,
    streaming_lists: bool,
) -> anyhow::Result<Row> {
    let api = FakeApi::start()?;
    for i in 0..services {
        api.apply(headless_service(NAMESPACE, &format!("s{i}"), json!({})))?;
        api.apply(slice(i, endpoints, true))?;
    }
    let dir = tempfile::tempdir()?;
    let kubeconfig = api.write_kubeconfig(dir.path())?;
    let bpffs = Bpffs::new()?;
    let cg = Cgroup::new("bench-cp")?;
    let port = free_port()?;

    let started = Instant::now();
    // A profiler may wrap the agent (`HEADWAY_BENCH_WRAP="heaptrack -o
    // /tmp/cp"`); its figures are then the wrapper's, not the agent's.
    let wrap = std::env::var("HEADWAY_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut agent = match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(bin);
            cmd
        }
        None => Command::new(bin),
    };
    let mut agent = agent
        .arg("agent")
        .arg("--source=kube")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg("--cgroup-path")
        .arg(cg.path())
        .arg("--bpffs")
        .arg(bpffs.path())
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        // Room for every endpoint (100,000 pods exceed the default 65,536).
        .arg(format!(
            "--max-endpoints={}",
            (services * endpoints).next_power_of_two().max(65_536)
        ))
        .args(streaming_lists.then_some("--streaming-lists"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the agent")?;
    let result = (|| -> anyhow::Result<Row> {
        let synced = loop {
            if let Ok((200, _)) = http_get(port, "/readyz") {
                break started.elapsed();
            }
            if let Some(status) = agent.try_wait()? {
                bail!("the agent exited: {status}");
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("the agent did not sync within 120 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let maps = Maps::open_pinned(bpffs.path())?;
        let contents = maps.read_contents()?;
        if contents.services.len() != services
            || contents.svc_endpoints.len() != services * endpoints
        {
            bail!(
                "maps hold {} services and {} endpoints after sync, expected {services} and {}",
                contents.services.len(),
                contents.svc_endpoints.len(),
                services * endpoints
            );
        }
        let ids: std::collections::HashMap<String, u32> = contents
            .services
            .iter()
            .map(|(id, meta)| (decode_name(&meta.name), *id))
            .collect();
        drop(contents);
        let table: HashMap<MapData, ServiceEndpointKey, EndpointState> = maps.svc_endpoints;

        let mut ready = vec![true; services];
        let mut latencies = Vec::with_capacity(events);
        for e in 0..events {
            // Spread over the services (a prime stride).
            let i = (e * 7_919) % services;
            ready[i] = !ready[i];
            let key = ServiceEndpointKey {
                service_id: ids[&format!("s{i}")],
                _pad: 0,
                addr: addr_key(addr(i, 0, endpoints).parse()?),
            };
            let t0 = Instant::now();
            api.apply(slice(i, endpoints, ready[i]))?;
            loop {
                let state = table.get(&key, 0)?;
                if (state.flags & endpoint_flags::READY != 0) == ready[i] {
                    latencies.push(t0.elapsed());
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    bail!("event {e} (service s{i}) not in the map after 10 s");
                }
                std::thread::yield_now();
            }
        }
        latencies.sort();
        let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
        Ok(Row {
            services,
            endpoints,
            synced,
            p50: pick(0.5),
            p99: pick(0.99),
            max: *latencies.last().context("no events")?,
            rss_mb: peak_rss_mb(agent.id())?,
        })
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = agent.wait();
    result
}
