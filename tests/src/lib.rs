//! Test bed for headway on the real kernel: network namespaces, cgroups,
//! a fake cluster network and the `headway-peer` client/server.
//!
//! Network safety (shared/docs/testing.md): every non-loopback address
//! used here lives only inside namespaces this crate creates, none of
//! which has a route out, and every process that talks to such an address
//! is started inside one of them. Everything is cleaned up by RAII guards.

/// The headway agent as a test child (bpffs, status); kept with tests/tests.
pub mod agent;
/// Known amounts of traffic (`headway-peer sink/bulk/hold`) for the
/// accounting tests.
pub mod bulk;
mod cgroup;
mod child;
mod cluster;
/// A real DNS server (`headway-dns`) answering like CoreDNS, and resolver
/// setup per namespace.
pub mod dns;
/// A fake Kubernetes API server (list/watch over HTTP) for the kube source.
pub mod fake_api;
/// Service and EndpointSlice manifests for the `dir:` source.
pub mod manifests;
mod netns;
mod peer;

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use cgroup::{Cgroup, cgroup2_mount};
pub use child::Child;
pub use cluster::{Cluster, ClusterBuilder, Endpoint};
pub use dns::{
    MalformedKind, NamedConnectReport, ResolvConf, ResolveReport, Zone, dns_query_in, resolve_in,
    run_client_by_name, start_dns_server,
};
pub use fake_api::FakeApi;
pub use netns::NetNs;
pub use peer::{ConnectReport, peer_bin, run_client, run_client_in, start_pod_servers, wait_ready};

/// True if we are root. Otherwise the test cannot run: in CI (CI=true) that
/// is a failure, so this panics; elsewhere it says so loudly and returns
/// false so the caller can return early.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("privileged test {test} must run in CI; run as root");
    }
    // Straight to fd 2: eprintln! inside a test is captured by the harness,
    // and a skip must not go unnoticed.
    let _ = writeln!(io::stderr(), "\n*** SKIPPED (needs root): {test} ***\n");
    false
}

/// A short (at most 6 chars, base36) string that differs between calls and
/// between concurrent processes, for names of namespaces, cgroups and pins.
/// Short because names end up inside 15-char interface-name limits.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = (u64::from(std::process::id()) << 32) ^ (count << 16) ^ u64::from(nanos);
    // 36^6 values: a clash needs two live names hashing alike, and then
    // creating the second fails loudly (EEXIST) rather than sharing.
    base36(splitmix64(seed) % 36u64.pow(6))
}

/// A bijective mixer, so pid, counter and time bits all reach the low
/// digits kept by the modulo.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ASCII digits")
}

/// Makes a logical name usable in namespace and cgroup names: characters
/// other than [A-Za-z0-9._-] become '_', and it is cut to `max` chars
/// (all ASCII by then, so the cut is on a char boundary).
pub(crate) fn sanitize(name: &str, max: usize) -> String {
    let clean = |c: char| {
        if c.is_ascii_alphanumeric() || "._-".contains(c) {
            c
        } else {
            '_'
        }
    };
    name.chars().map(clean).take(max).collect()
}

/// A server socket on `addr` (TCP or UDP by `ty`), with SO_REUSEADDR and,
/// for `::`, dual-stack whatever net.ipv6.bindv6only says. Shared by the
/// `headway-peer` and `headway-dns` servers.
pub fn bind_server(
    addr: std::net::SocketAddr,
    ty: socket2::Type,
) -> anyhow::Result<socket2::Socket> {
    use anyhow::Context;
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{IpAddr, SocketAddr};
    use std::path::Path;
    use std::process::Command;
    use std::time::Duration;

    use super::*;

    const PORT: u16 = 8080;
    const COUNT: u32 = 3;

    #[test]
    fn unique_suffixes_are_short_and_distinct() {
        let all: BTreeSet<String> = (0..1000).map(|_| unique_suffix()).collect();
        assert_eq!(all.len(), 1000);
        assert!(all.iter().all(|s| !s.is_empty() && s.len() <= 6));
    }

    #[test]
    fn sanitize_replaces_and_truncates() {
        assert_eq!(sanitize("web/0 é", 32), "web_0__");
        assert_eq!(sanitize("abcdef", 3), "abc");
    }

    /// Two dual-stack pods and a client: each pod answers for itself over
    /// TCP/IPv4, TCP/IPv6 and UDP/IPv4, and everything is gone afterwards.
    #[test]
    fn smoke_cluster_answers_and_cleans_up() -> anyhow::Result<()> {
        if !require_root("smoke_cluster_answers_and_cleans_up") {
            return Ok(());
        }
        let cluster = Cluster::builder()
            .pod("web-0", "10.77.0.10".parse()?, Some("fd77::10".parse()?))
            .pod("web-1", "10.77.0.11".parse()?, Some("fd77::11".parse()?))
            .client("client")
            .build()?;
        let cgroup = Cgroup::new("smoke")?;
        let servers = start_pod_servers(&cluster, PORT)?;

        assert_no_way_out(&cluster)?;
        assert_spawn_joins_cgroup(&cluster, &cgroup)?;
        for pod in cluster.pods() {
            let (v4, v6) = (IpAddr::V4(pod.ipv4), pod.addr(true).expect("pod has IPv6"));
            for (addr, udp) in [(v4, false), (v6, false), (v4, true)] {
                let report = run_client(&cluster, "client", Some(&cgroup), addr, PORT, COUNT, udp)?;
                assert_only(&report, &pod.name, SocketAddr::new(addr, PORT));
            }
        }
        assert_closed_port_fails(&cluster, &cgroup)?;

        let names = netns_names(&cluster);
        let cgroup_path = cgroup.path().to_path_buf();
        drop(servers);
        drop(cgroup);
        drop(cluster);
        assert_cleaned_up(&names, &cgroup_path)
    }

    fn assert_only(report: &ConnectReport, pod: &str, peer: SocketAddr) {
        let context = format!("{peer}: {report:?}");
        assert_eq!(report.failures, 0, "{context}");
        assert_eq!(
            report.answers,
            BTreeMap::from([(pod.to_owned(), COUNT.into())]),
            "{context}"
        );
        assert_eq!(
            report.peer_addrs,
            BTreeMap::from([(peer.to_string(), COUNT.into())]),
            "{context}"
        );
    }

    /// Nobody listens: every attempt fails, and the report says why.
    fn assert_closed_port_fails(cluster: &Cluster, cgroup: &Cgroup) -> anyhow::Result<()> {
        let addr = IpAddr::V4(cluster.pod("web-0").ipv4);
        let report = run_client(
            cluster,
            "client",
            Some(cgroup),
            addr,
            PORT + 1,
            COUNT,
            false,
        )?;
        assert!(report.answers.is_empty(), "{report:?}");
        assert_eq!(report.failures, u64::from(COUNT), "{report:?}");
        assert!(
            report.errors.keys().all(|e| e.contains("refused")),
            "{report:?}"
        );
        Ok(())
    }

    /// The safety net: no namespace may have a default route.
    fn assert_no_way_out(cluster: &Cluster) -> anyhow::Result<()> {
        let endpoints = cluster.pods().iter().chain(cluster.clients());
        for ns in endpoints.map(Endpoint::ns).chain([cluster.switch_ns()]) {
            for family in ["-4", "-6"] {
                let routes = ns.ip(&[family, "route", "show", "default"])?;
                assert!(routes.trim().is_empty(), "{}: {routes}", ns.name());
            }
        }
        Ok(())
    }

    /// A spawned process is in the cgroup from its first instruction.
    fn assert_spawn_joins_cgroup(cluster: &Cluster, cgroup: &Cgroup) -> anyhow::Result<()> {
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/cgroup");
        let mut child = cluster.spawn_in(cluster.client_ns("client"), Some(cgroup), &cmd)?;
        let (status, out) = child.wait_output(Duration::from_secs(10))?;
        assert!(status.success());
        let leaf = cgroup.path().file_name().unwrap().to_string_lossy();
        assert!(
            out.lines()
                .any(|l| l.starts_with("0::/") && l.ends_with(&*leaf)),
            "{out}"
        );
        Ok(())
    }

    fn netns_names(cluster: &Cluster) -> Vec<String> {
        let endpoints = cluster.pods().iter().chain(cluster.clients());
        let mut names: Vec<String> = endpoints.map(|e| e.ns().name().to_owned()).collect();
        names.push(cluster.switch_ns().name().to_owned());
        names
    }

    fn assert_cleaned_up(names: &[String], cgroup: &Path) -> anyhow::Result<()> {
        let out = Command::new("ip").args(["netns", "list"]).output()?;
        let listed = String::from_utf8_lossy(&out.stdout);
        for name in names {
            let left = listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name));
            assert!(!left, "netns {name} left behind: {listed}");
        }
        assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
        Ok(())
    }
}
