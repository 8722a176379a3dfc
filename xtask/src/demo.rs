//! `cargo xtask demo`: headway's main job on a small cluster made of network
//! namespaces. The pods come from the manifests in `examples/demo/` (every
//! endpoint address becomes a namespace running a server that answers with
//! its pod name); the agent follows those manifests; a client in its own
//! namespace and cgroup connects; the status table shows what was counted.
//!
//! Everything (namespaces, cgroup, a private bpffs, processes) is removed at
//! the end. All addresses live only inside the namespaces made here.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};
use headway::{model, source::dir};
use headway_testbed::{
    Cgroup, Cluster,
    agent::{Agent, Bpffs, headway_bin, wait_for_status},
    run_client, start_pod_servers,
};

use crate::{
    build_ebpf,
    util::{self, cargo, workspace_root},
};

const PORT: u16 = 8080;

#[derive(clap::Args)]
pub struct Options {
    /// Directory of manifests to build the cluster from.
    #[arg(long, default_value = "examples/demo")]
    manifests: PathBuf,
    /// Connections the client makes to each pod address.
    #[arg(long, default_value_t = 3)]
    connections: u32,
}

/// One pod of the demo: its name and addresses, from the manifests.
#[derive(Default)]
struct DemoPod {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo attaches eBPF programs and creates network namespaces: run it as root");
    }
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    util::run(
        cargo()
            .current_dir(workspace_root())
            .args(["build", "--bins"]),
    )?;

    let manifests = workspace_root().join(&opts.manifests);
    let pods = pods_from_manifests(&manifests)?;
    println!("\n== Demo cluster from {}", manifests.display());
    let mut builder = Cluster::builder();
    for (name, pod) in &pods {
        let v4 = pod
            .v4
            .with_context(|| format!("demo pod {name} needs an IPv4 address"))?;
        println!(
            "   pod {name:<22} {v4:<12} {}",
            pod.v6.map(|a| a.to_string()).unwrap_or_default()
        );
        builder = builder.pod(name, v4, pod.v6);
    }
    let cluster = builder.client("client").build()?;
    let _servers = start_pod_servers(&cluster, PORT)?;
    let cgroup = Cgroup::new("demo-client")?;
    let bpffs = Bpffs::new()?;

    println!("\n== headway agent --source dir:{}", manifests.display());
    let mut agent = Agent::start(&manifests, cgroup.path(), &bpffs, &[])?;
    wait_for_status(&bpffs, &mut agent, Duration::from_secs(15), |s| {
        s["services"].as_array().is_some_and(|v| !v.is_empty())
    })?;

    println!("\n== The client connects to every pod address (TCP, and UDP over IPv4)");
    for pod in pods.values() {
        let addrs = pod
            .v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(pod.v6.map(IpAddr::V6));
        for addr in addrs {
            let report = run_client(
                &cluster,
                "client",
                Some(&cgroup),
                addr,
                PORT,
                opts.connections,
                false,
            )?;
            println!(
                "   tcp {addr:<12} -> answers {:?}, failures {}",
                report.answers, report.failures
            );
        }
        if let Some(v4) = pod.v4 {
            let report = run_client(
                &cluster,
                "client",
                Some(&cgroup),
                IpAddr::V4(v4),
                PORT,
                1,
                true,
            )?;
            println!(
                "   udp {v4:<12} -> answers {:?}, failures {}",
                report.answers, report.failures
            );
        }
    }

    println!("\n== headway status");
    let status = Command::new(headway_bin()?)
        .args(["status", "--bpffs"])
        .arg(bpffs.path())
        .output()
        .context("running headway status")?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    agent.stop()?;
    println!("\n(demo done: agent stopped, pins reset, namespaces removed)");
    Ok(())
}

/// Every pod the manifests' headless services name, with its addresses.
fn pods_from_manifests(dir: &std::path::Path) -> anyhow::Result<BTreeMap<String, DemoPod>> {
    let snapshot = dir::load_dir(dir)
        .with_context(|| format!("cannot read manifests in {}", dir.display()))?;
    if let Some(e) = snapshot.errors.first() {
        bail!("bad demo manifest: {e}");
    }
    let objects = snapshot.objects;
    let (desired, _warnings) =
        model::desired_state(&objects.services, &objects.slices, &objects.pods);
    let mut pods: BTreeMap<String, DemoPod> = BTreeMap::new();
    for svc in desired.services.values() {
        for ep in svc.endpoints.values() {
            let name = ep
                .pod
                .as_ref()
                .map(|p| p.name.clone())
                .unwrap_or_else(|| ep.addr.to_string());
            let pod = pods.entry(name).or_default();
            match ep.addr {
                IpAddr::V4(a) => pod.v4 = Some(a),
                IpAddr::V6(a) => pod.v6 = Some(a),
            }
        }
    }
    Ok(pods)
}
