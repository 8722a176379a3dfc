//! `cargo xtask demo`: headway's main job on a small cluster made of network
//! namespaces, built from the plain manifests in `examples/demo/`:
//!
//! - every endpoint address becomes a namespace running a server that
//!   answers with its pod name;
//! - a DNS server answers like CoreDNS for those services;
//! - the agent follows a working copy of the manifests;
//! - a client (own namespace and cgroup) resolves the service name through
//!   glibc, keeps the answer like a stale cache would, and connects;
//! - one pod is deleted from the manifests: the client's next connects to
//!   its cached address land on live pods; a pod-specific name is never
//!   moved; the status table ends it.
//!
//! Everything (namespaces, cgroup, a private bpffs, processes, files) is
//! removed at the end. All addresses live only inside the namespaces made
//! here.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};
use headway::{
    map_plan::dashed_addr,
    model::{self, DesiredState},
    source::dir,
};
use headway_testbed::{
    Cgroup, Cluster, ResolvConf, Zone,
    agent::{Agent, Bpffs, headway_bin, wait_for_status},
    resolve_in, run_client, run_client_by_name, start_dns_server, start_pod_servers,
};

use crate::util::{self, workspace_root};

const PORT: u16 = 8080;
const DNS_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 53);
const DNS_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x53);
const DOMAIN: &str = "cluster.local";

#[derive(clap::Args)]
pub struct Options {
    /// Directory of manifests to build the cluster from.
    #[arg(long, default_value = "examples/demo")]
    manifests: PathBuf,
    /// The service whose pod the demo deletes (namespace/name).
    #[arg(long, default_value = "demo/db")]
    service: String,
    /// Connections the client makes in each step.
    #[arg(long, default_value_t = 6)]
    connections: u32,
}

/// One pod of the demo: its addresses, from the manifests.
#[derive(Default)]
struct DemoPod {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    util::prepare_root_task("the demo")?;
    let (namespace, service) = opts
        .service
        .split_once('/')
        .context("--service is namespace/name")?;

    // The agent follows a working copy, so the demo can delete a pod.
    let source = workspace_root().join(&opts.manifests);
    let work = tempdir("headway-demo")?;
    for entry in fs::read_dir(&source)? {
        let path = entry?.path();
        if path.is_file() {
            fs::copy(&path, work.join(path.file_name().unwrap()))?;
        }
    }
    let desired = desired_state(&work)?;
    let pods = pods_of(&desired);

    println!("\n== Demo cluster from {}", source.display());
    let mut builder = Cluster::builder();
    for (name, pod) in &pods {
        let v4 = pod
            .v4
            .with_context(|| format!("demo pod {name} needs an IPv4 address"))?;
        let v6 = pod.v6.map(|a| a.to_string()).unwrap_or_default();
        println!("   pod {name:<22} {v4:<12} {v6}");
        builder = builder.pod(name, v4, pod.v6);
    }
    let cluster = builder
        .client_at("dns", DNS_V4, Some(DNS_V6))
        .client("client")
        .build()?;
    let _servers = start_pod_servers(&cluster, PORT)?;
    // Not in the manifest directory: the agent reads every .json there.
    let zone_dir = tempdir("headway-demo-dns")?;
    let zone_path = zone_dir.join("zone.json");
    zone_of(&desired).write(&zone_path)?;
    let _dns = start_dns_server(
        cluster.client_ns("dns"),
        &zone_path,
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    )?;
    let search = format!("{namespace}.svc.{DOMAIN}");
    let _resolv = ResolvConf::new(cluster.client_ns("client"), DNS_V4.into(), &[&search])?;
    let cgroup = Cgroup::new("demo-client")?;
    let bpffs = Bpffs::new()?;

    println!("\n== headway agent --source dir:{}", work.display());
    let mut agent = Agent::start(&work, cgroup.path(), &bpffs, &[])?;
    wait_for_status(&bpffs, &mut agent, Duration::from_secs(15), |s| {
        s["services"].as_array().is_some_and(|v| !v.is_empty())
    })?;

    let svc_name = format!("{service}.{namespace}.svc.{DOMAIN}");
    println!("\n== The client resolves {svc_name} (glibc) and keeps the answer");
    let cached = resolve_in(cluster.client_ns("client"), Some(&cgroup), &svc_name)?;
    if let Some(e) = cached.error {
        bail!("resolving {svc_name}: {e}");
    }
    let cached_v4: Vec<IpAddr> = cached
        .addrs
        .iter()
        .copied()
        .filter(IpAddr::is_ipv4)
        .collect();
    println!("   cached: {:?}", cached.addrs);
    for addr in &cached_v4 {
        let r = run_client(&cluster, "client", Some(&cgroup), *addr, PORT, 2, false)?;
        println!("   connect {addr:<12} -> {:?}", r.answers);
    }

    let victim = desired
        .services
        .values()
        .find(|s| s.key.namespace == namespace && s.key.name == service)
        .and_then(|s| s.endpoints.values().rev().find_map(|e| e.pod.clone()))
        .context("the demo service has no pods")?
        .name;
    println!(
        "\n== {victim} is deleted (removed from the manifests); the client's cache still has it"
    );
    delete_pod(&work, &victim)?;
    let desired_after = desired_state(&work)?;
    zone_of(&desired_after).write(&zone_path)?;
    wait_for_status(&bpffs, &mut agent, Duration::from_secs(15), |s| {
        !s.to_string().contains(&format!("\"name\":\"{victim}\""))
    })?;
    let victim_addr = pods[&*victim].v4.context("victim has IPv4")?;
    let r = run_client(
        &cluster,
        "client",
        Some(&cgroup),
        victim_addr.into(),
        PORT,
        opts.connections,
        false,
    )?;
    println!(
        "   connect {victim_addr} (cached, {victim} is gone) x{} -> answered by {:?}, failures {}",
        opts.connections, r.answers, r.failures
    );

    let keeper = desired_after
        .services
        .values()
        .find(|s| s.key.namespace == namespace && s.key.name == service)
        .and_then(|s| s.endpoints.values().find_map(|e| e.hostname.clone()));
    if let Some(host) = keeper {
        let pod_name = format!("{host}.{svc_name}");
        println!("\n== A pod-specific name is never moved: {pod_name}");
        let r = run_client_by_name(
            cluster.client_ns("client"),
            Some(&cgroup),
            &pod_name,
            PORT,
            3,
            false,
            Some(4),
        )?;
        println!("   connect x3 -> answered by {:?}", r.report.answers);
    }

    println!("\n== headway status");
    let status = Command::new(headway_bin()?)
        .args(["status", "--bpffs"])
        .arg(bpffs.path())
        .output()
        .context("running headway status")?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    agent.stop()?;
    let _ = fs::remove_dir_all(&work);
    let _ = fs::remove_dir_all(&zone_dir);
    println!("\n(demo done: agent stopped, pins reset, namespaces removed)");
    Ok(())
}

fn tempdir(prefix: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn desired_state(dir: &Path) -> anyhow::Result<DesiredState> {
    let snapshot = dir::load_dir(dir)
        .with_context(|| format!("cannot read manifests in {}", dir.display()))?;
    if let Some(e) = snapshot.errors.first() {
        bail!("bad demo manifest: {e}");
    }
    let o = snapshot.objects;
    Ok(model::desired_state(&o.services, &o.slices, &o.pods).0)
}

/// Every pod the headless services name, with its addresses.
fn pods_of(desired: &DesiredState) -> BTreeMap<String, DemoPod> {
    let mut pods: BTreeMap<String, DemoPod> = BTreeMap::new();
    for ep in desired.services.values().flat_map(|s| s.endpoints.values()) {
        let name = ep
            .pod
            .as_ref()
            .map(|p| p.name.to_string())
            .unwrap_or_else(|| ep.addr.to_string());
        let pod = pods.entry(name).or_default();
        match ep.addr {
            IpAddr::V4(a) => pod.v4 = Some(a),
            IpAddr::V6(a) => pod.v6 = Some(a),
        }
    }
    pods
}

/// The records CoreDNS would serve: the service-wide name with every ready
/// endpoint, and each endpoint's own name (hostname or dashed address).
fn zone_of(desired: &DesiredState) -> Zone {
    let mut zone = Zone::new().origin(DOMAIN);
    for svc in desired.services.values() {
        let name = format!("{}.{}.svc.{DOMAIN}", svc.key.name, svc.key.namespace);
        for ep in svc.endpoints.values() {
            if ep.ready || svc.publish_not_ready {
                zone = zone.addr(&name, ep.addr);
            }
            let label = ep.hostname.clone().unwrap_or_else(|| dashed_addr(ep.addr));
            zone = zone.addr(&format!("{label}.{name}"), ep.addr);
        }
    }
    zone
}

/// Removes every endpoint whose targetRef names `pod` from the manifests.
fn delete_pod(dir: &Path, pod: &str) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = fs::read_to_string(&path)?;
        let lines: Vec<&str> = text.lines().collect();
        let mut out: Vec<&str> = Vec::new();
        let mut i = 0;
        while i < lines.len() {
            // An endpoint is the "- addresses:" line and its indented fields.
            if lines[i].trim_start().starts_with("- addresses:") {
                let indent = lines[i].len() - lines[i].trim_start().len();
                let mut end = i + 1;
                while end < lines.len() && {
                    let l = lines[end];
                    l.len() - l.trim_start().len() > indent && !l.trim().is_empty()
                } {
                    end += 1;
                }
                let names_pod = lines[i..end]
                    .iter()
                    .any(|l| l.contains(&format!("name: {pod}}}")));
                if !names_pod {
                    out.extend(&lines[i..end]);
                }
                i = end;
            } else {
                out.push(lines[i]);
                i += 1;
            }
        }
        fs::write(&path, out.join("\n") + "\n")?;
    }
    Ok(())
}
