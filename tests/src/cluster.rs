//! A fake cluster network: pods and clients in their own network
//! namespaces, all on one bridge that lives in a "switch" namespace.
//!
//! Nothing here is ever created in the host namespace (the veth pairs are
//! made inside the namespaces) and no namespace has a default route, so no
//! packet to a pod or client address can leave the machine.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{Cgroup, Child, NetNs, sanitize, unique_suffix};

/// Prefix lengths of every address: one flat subnet per family.
const V4_PREFIX: u8 = 16;
const V6_PREFIX: u8 = 64;
/// Used for clients when there is no pod to take the subnet from.
const DEFAULT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 0);
const DEFAULT_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0);

/// A pod or client: a logical name, its addresses (on `eth0`) and its
/// network namespace.
#[derive(Debug)]
pub struct Endpoint {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    ns: NetNs,
}

impl Endpoint {
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The address of the given family, if it has one.
    pub fn addr(&self, ipv6: bool) -> Option<IpAddr> {
        if ipv6 {
            self.ipv6.map(IpAddr::V6)
        } else {
            Some(IpAddr::V4(self.ipv4))
        }
    }
}

#[derive(Debug)]
struct Spec {
    name: String,
    /// `None` for clients whose addresses the builder picks.
    addrs: Option<(Ipv4Addr, Option<Ipv6Addr>)>,
}

/// Collects pods and clients; [`ClusterBuilder::build`] creates them.
#[derive(Debug, Default)]
pub struct ClusterBuilder {
    pods: Vec<Spec>,
    clients: Vec<Spec>,
}

impl ClusterBuilder {
    /// A pod with an IPv4 address (/16) and optionally an IPv6 one (/64).
    pub fn pod(mut self, name: &str, ipv4: Ipv4Addr, ipv6: Option<Ipv6Addr>) -> Self {
        let addrs = Some((ipv4, ipv6));
        self.pods.push(Spec {
            name: name.into(),
            addrs,
        });
        self
    }

    /// A client whose addresses are picked in the pods' subnets (those of
    /// the first pod): the n-th client gets x.y.255.n and, if any pod has
    /// IPv6, <the first such pod's /64>::ff:n.
    pub fn client(mut self, name: &str) -> Self {
        self.clients.push(Spec {
            name: name.into(),
            addrs: None,
        });
        self
    }

    /// A client with the given addresses.
    pub fn client_at(mut self, name: &str, ipv4: Ipv4Addr, ipv6: Option<Ipv6Addr>) -> Self {
        let addrs = Some((ipv4, ipv6));
        self.clients.push(Spec {
            name: name.into(),
            addrs,
        });
        self
    }

    /// Creates the namespaces, bridge and links. On error everything made
    /// so far is torn down again.
    pub fn build(self) -> Result<Cluster> {
        self.check_names()?;
        let prefix = format!("hw{}", unique_suffix());
        let switch = NetNs::new(&format!("{prefix}-switch"))?;
        let mut cluster = Cluster {
            prefix,
            pods: Vec::new(),
            clients: Vec::new(),
            switch,
        };
        cluster.setup_switch()?;
        for spec in &self.pods {
            let (ipv4, ipv6) = spec.addrs.expect("pods always have addresses");
            let pod = cluster.add_endpoint(&spec.name, ipv4, ipv6)?;
            cluster.pods.push(pod);
        }
        for (i, spec) in self.clients.iter().enumerate() {
            let (ipv4, ipv6) = spec.addrs.unwrap_or_else(|| self.client_addrs(i + 1));
            let client = cluster.add_endpoint(&spec.name, ipv4, ipv6)?;
            cluster.clients.push(client);
        }
        Ok(cluster)
    }

    /// Logical names must map to distinct namespace names (they are
    /// sanitized and truncated).
    fn check_names(&self) -> Result<()> {
        let mut seen = BTreeSet::from(["switch".to_owned()]);
        for spec in self.pods.iter().chain(&self.clients) {
            if !seen.insert(ns_part(&spec.name)) {
                bail!(
                    "name {:?} clashes with another pod/client (or \"switch\")",
                    spec.name
                );
            }
        }
        Ok(())
    }

    fn client_addrs(&self, n: usize) -> (Ipv4Addr, Option<Ipv6Addr>) {
        let n = u8::try_from(n).expect("at most 255 auto-addressed clients");
        let first = self.pods.first().and_then(|p| p.addrs);
        // IPv6 from the first pod that has one, so a v4-only pod listed
        // first does not leave the client without IPv6.
        let first_v6 = self
            .pods
            .iter()
            .find_map(|p| p.addrs.and_then(|(_, v6)| v6));
        let (v4, v6) = match first {
            Some((v4, _)) => (v4, first_v6),
            None => (DEFAULT_V4, Some(DEFAULT_V6)),
        };
        let [a, b, _, _] = v4.octets();
        let ipv4 = Ipv4Addr::new(a, b, 255, n);
        let ipv6 = v6.map(|v6| {
            let s = v6.segments();
            Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0xff, n.into())
        });
        (ipv4, ipv6)
    }
}

/// The running topology. Dropping it deletes every namespace (killing what
/// runs inside), which also destroys the veths and the bridge.
#[derive(Debug)]
pub struct Cluster {
    prefix: String,
    pods: Vec<Endpoint>,
    clients: Vec<Endpoint>,
    switch: NetNs,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// `hw<suffix>`: the prefix of every namespace name of this cluster.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn pods(&self) -> &[Endpoint] {
        &self.pods
    }

    pub fn clients(&self) -> &[Endpoint] {
        &self.clients
    }

    /// The pod with this logical name. Panics if there is none: that is a
    /// bug in the test.
    pub fn pod(&self, name: &str) -> &Endpoint {
        find(&self.pods, name).unwrap_or_else(|| panic!("no pod {name:?} in this cluster"))
    }

    /// The client with this logical name; panics if there is none.
    pub fn client(&self, name: &str) -> &Endpoint {
        find(&self.clients, name).unwrap_or_else(|| panic!("no client {name:?} in this cluster"))
    }

    pub fn pod_ns(&self, name: &str) -> &NetNs {
        self.pod(name).ns()
    }

    pub fn client_ns(&self, name: &str) -> &NetNs {
        self.client(name).ns()
    }

    /// The namespace holding the bridge `br0` (and the `vpN` ports).
    pub fn switch_ns(&self) -> &NetNs {
        &self.switch
    }

    /// Starts `cmd` inside `ns` and, if given, `cgroup`; see [`NetNs::spawn`].
    pub fn spawn_in(&self, ns: &NetNs, cgroup: Option<&Cgroup>, cmd: &Command) -> Result<Child> {
        ns.spawn(cgroup, cmd)
    }

    fn setup_switch(&self) -> Result<()> {
        prepare_ns(&self.switch)?;
        // Without a multicast querier, snooping can drop IPv6 neighbour
        // solicitations; a test switch should just flood.
        self.switch.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        self.switch.ip(&["link", "set", "br0", "up"])?;
        Ok(())
    }

    /// Creates the namespace of one pod or client and plugs it into the
    /// bridge. Its `eth0` is made inside it and the peer inside the switch
    /// namespace, so the host namespace never sees either.
    fn add_endpoint(&self, name: &str, ipv4: Ipv4Addr, ipv6: Option<Ipv6Addr>) -> Result<Endpoint> {
        let ns = NetNs::new(&format!("{}-{}", self.prefix, ns_part(name)))?;
        let endpoint = Endpoint {
            name: name.into(),
            ipv4,
            ipv6,
            ns,
        };
        self.plug(&endpoint)
            .with_context(|| format!("setting up {name}"))?;
        Ok(endpoint)
    }

    fn plug(&self, ep: &Endpoint) -> Result<()> {
        let port = format!("vp{}", self.pods.len() + self.clients.len());
        prepare_ns(&ep.ns)?;
        let switch = self.switch.name();
        ep.ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", switch,
        ])?;
        self.switch
            .ip(&["link", "set", &port, "master", "br0", "up"])?;
        ep.ns.ip(&[
            "addr",
            "add",
            &format!("{}/{V4_PREFIX}", ep.ipv4),
            "dev",
            "eth0",
        ])?;
        if let Some(v6) = ep.ipv6 {
            // nodad: usable at once instead of "tentative" for a second.
            ep.ns.ip(&[
                "addr",
                "add",
                &format!("{v6}/{V6_PREFIX}"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        ep.ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }
}

fn find<'a>(endpoints: &'a [Endpoint], name: &str) -> Option<&'a Endpoint> {
    endpoints.iter().find(|e| e.name == name)
}

/// The part of a namespace name that comes from a logical name.
fn ns_part(name: &str) -> String {
    sanitize(name, 24)
}

/// Loopback up, and DAD off for every interface created later (link-local
/// addresses included), so IPv6 works as soon as a link is up.
fn prepare_ns(ns: &NetNs) -> Result<()> {
    ns.ip(&["link", "set", "lo", "up"])?;
    let script = "echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad && \
                  echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad";
    crate::netns::run(ns.exec("sh").args(["-c", script]))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_get_addresses_in_the_first_pods_subnets() {
        let b = Cluster::builder().pod(
            "web-0",
            "10.77.0.10".parse().unwrap(),
            Some("fd77::10".parse().unwrap()),
        );
        let (v4, v6) = b.client_addrs(2);
        assert_eq!(v4, "10.77.255.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(v6, Some("fd77::ff:2".parse().unwrap()));
    }

    #[test]
    fn clashing_names_are_rejected() {
        let ip = "10.77.0.1".parse().unwrap();
        let b = Cluster::builder()
            .pod("web/0", ip, None)
            .pod("web_0", ip, None);
        assert!(b.check_names().is_err());
        assert!(Cluster::builder().client("switch").check_names().is_err());
    }
}
