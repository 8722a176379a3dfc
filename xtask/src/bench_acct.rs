//! `cargo xtask bench-acct`: what per-pod accounting costs, measured live
//! with the kernel's BPF run statistics (`kernel.bpf_stats_enabled=1`,
//! restored afterwards) while real clients move data through the hooks.
//!
//! A cluster of network namespaces has two sink servers: `web-0`, a pod of
//! a headless service, and `other-0`, an address headway does not know.
//! The same transfers go to each, so every hook is measured on both its
//! counting path (a socket marked for a pod) and its baseline path (an
//! unmarked socket: one storage lookup) in the same run:
//! - bulk: one TCP connection moving `--megabytes` each way: the
//!   cgroup_skb byte counters per packet (per skb, as GSO/GRO hand them to
//!   the hooks);
//! - churn: `--connections` short TCP connections: sock_ops per callback.
//!
//! The bpf_stats clock reads are part of every number; for scale, the DNS
//! hooks, which see the same packets and leave after a header check or
//! two, are printed too.
//! Everything runs in namespaces made here; nothing leaves the machine.
use std::{fs, net::IpAddr};

use anyhow::bail;
use headway_common::program_names;
use headway_testbed::{
    Cgroup, Cluster,
    agent::{Agent, Bpffs, wait_for_status},
    bulk::{Bulk, run_bulk, start_sinks},
};

use crate::{bpf_stats, util};

const PORT: u16 = 8080;

#[derive(clap::Args)]
pub struct Options {
    /// Megabytes each way in the bulk phase.
    #[arg(long, default_value_t = 256)]
    pub megabytes: u64,
    /// Short connections in the churn phase.
    #[arg(long, default_value_t = 2000)]
    pub connections: u32,
}

fn manifest(cluster: &Cluster) -> String {
    let v4 = cluster.pod("web-0").addr(false).expect("IPv4");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: bench}}\n\
         spec:\n  clusterIP: None\n  ports: [{{port: {PORT}}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: web-v4\n  namespace: bench\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{{port: {PORT}}}]\nendpoints:\n\
         \x20 - addresses: [\"{v4}\"]\n    conditions: {{ready: true}}\n    targetRef: {{kind: Pod, namespace: bench, name: web-0}}\n"
    )
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    // The kernel programs are what is measured, not the binaries' speed.
    util::prepare_root_task("bench-acct")?;

    let cluster = Cluster::builder()
        .pod("web-0", "10.77.0.10".parse()?, None)
        .pod("other-0", "10.77.0.20".parse()?, None)
        .client("client")
        .build()?;
    let _sinks = start_sinks(&cluster, PORT, None)?;
    let cg = Cgroup::new("bench-acct")?;
    let bpffs = Bpffs::new()?;
    let manifests = tempdir()?;
    fs::write(manifests.join("web.yaml"), manifest(&cluster))?;
    let mut agent = Agent::start(&manifests, cg.path(), &bpffs, &[])?;
    wait_for_status(
        &bpffs,
        &mut agent,
        std::time::Duration::from_secs(15),
        |s| {
            s["services"].as_array().is_some_and(|v| {
                v.iter()
                    .any(|s| s["pods"].as_array().is_some_and(|p| !p.is_empty()))
            })
        },
    )?;
    let _stats = bpf_stats::BpfStats::enable()?;

    let bulk = Bulk {
        up: opts.megabytes << 20,
        down: opts.megabytes << 20,
        count: 1,
        udp: false,
        server_closes: false,
    };
    let churn = Bulk {
        up: 100,
        down: 100,
        count: opts.connections,
        udp: false,
        server_closes: false,
    };
    let client = cluster.client_ns("client");
    let mut rows = Vec::new();
    for (phase, work) in [("bulk", bulk), ("churn", churn)] {
        for target in ["other-0", "web-0"] {
            let addr: IpAddr = cluster.pod(target).addr(false).expect("IPv4");
            let before = bpf_stats::program_stats(&bpffs)?;
            let report = run_bulk(client, Some(&cg), addr, PORT, work)?;
            if report.failures > 0 {
                bail!("{phase} to {target} failed: {report:?}");
            }
            let after = bpf_stats::program_stats(&bpffs)?;
            for name in [
                program_names::SKB_EGRESS,
                program_names::SKB_INGRESS,
                program_names::SOCK_OPS,
            ] {
                let (r0, t0) = before.get(name).copied().unwrap_or_default();
                let (r1, t1) = after.get(name).copied().unwrap_or_default();
                rows.push((phase, target, name, r1 - r0, t1 - t0));
            }
        }
    }
    agent.stop()?;

    println!(
        "\n{:<6} {:<8} {:<17} {:>9} {:>8}",
        "phase", "to", "program", "runs", "ns/run"
    );
    for (phase, target, name, runs, ns) in &rows {
        let per = if *runs > 0 {
            *ns as f64 / *runs as f64
        } else {
            0.0
        };
        println!("{phase:<6} {target:<8} {name:<17} {runs:>9} {per:>8.1}");
    }
    println!(
        "\nto other-0: sockets not marked (baseline path); to web-0: marked for a pod \
         (counting path). For scale: the DNS hooks see the same TCP packets and leave \
         after a header check or two. Every number includes bpf_stats' own clock reads."
    );
    let _ = fs::remove_dir_all(&manifests);
    Ok(())
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "headway-bench-acct-{}",
        headway_testbed::unique_suffix()
    ));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}
