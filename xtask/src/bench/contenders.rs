//! Who is measured: the physical baseline and the ways a client can
//! reach the same pods.
use serde::{Deserialize, Serialize};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Contender {
    /// Clients connect straight to pod IPs; no program attached.
    Direct,
    /// Clients connect straight to pod IPs, a random one for every new
    /// connection (a client-side random balancer); no program attached.
    /// The same spread as headway's `random`, without its datapath: the
    /// two side by side tell the cost of spreading connections from the
    /// cost of steering them.
    DirectRandom,
    /// Clients resolve the service name; headway's `random` policy steers.
    HeadwayRandom,
    /// Clients resolve the service name; headway's `observe` policy counts.
    HeadwayObserve,
    /// A virtual IP with kube-proxy-style iptables DNAT rules.
    Iptables,
    /// A virtual IP in IPVS (kube-proxy's IPVS mode).
    Ipvs,
    /// HAProxy in TCP mode in a namespace of its own.
    Haproxy,
    /// `direct`'s traffic from a cgroup with a do-nothing program
    /// (`r0 = 1; exit`, `floor.rs`) on each hook headway uses for IPv4
    /// TCP: what running cgroup programs costs before they do anything.
    Floor,
}

impl Contender {
    pub const ALL: [Contender; 8] = [
        Contender::Direct,
        Contender::DirectRandom,
        Contender::HeadwayRandom,
        Contender::HeadwayObserve,
        Contender::Iptables,
        Contender::Ipvs,
        Contender::Haproxy,
        Contender::Floor,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::DirectRandom => "direct-random",
            Contender::HeadwayRandom => "headway-random",
            Contender::HeadwayObserve => "headway-observe",
            Contender::Iptables => "iptables",
            Contender::Ipvs => "ipvs",
            Contender::Haproxy => "haproxy",
            Contender::Floor => "floor",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Contender::Direct => "direct (pod IPs, no programs)",
            Contender::DirectRandom => "direct, random pod per connection",
            Contender::HeadwayRandom => "headway, policy random",
            Contender::HeadwayObserve => "headway, policy observe",
            Contender::Iptables => "kube-proxy iptables (10k services)",
            Contender::Ipvs => "kube-proxy IPVS (10k services)",
            Contender::Haproxy => "HAProxy 2.6, TCP mode",
            Contender::Floor => "direct + do-nothing cgroup programs (floor)",
        }
    }

    /// The policy the agent runs for this contender, if it is headway.
    pub fn headway_policy(self) -> Option<&'static str> {
        match self {
            Contender::HeadwayRandom => Some("random"),
            Contender::HeadwayObserve => Some("observe"),
            _ => None,
        }
    }

    /// The logical name of this contender's client namespace.
    /// Measured by the paired client beside `direct`: headway's policies,
    /// and the floor.
    pub fn is_paired(self) -> bool {
        self.headway_policy().is_some() || self == Contender::Floor
    }

    pub fn client(self) -> String {
        format!("c-{}", self.id())
    }
}

/// The order of round `round`: the list rotated by one per round, so no
/// contender always runs first (or right after the same neighbour) while
/// the machine warms up or another tenant's load comes and goes.
pub fn order(contenders: &[Contender], round: usize) -> Vec<Contender> {
    let mut out = contenders.to_vec();
    if !out.is_empty() {
        let n = out.len();
        out.rotate_left(round % n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_rotate_the_order() {
        let c = [
            Contender::Direct,
            Contender::HeadwayRandom,
            Contender::Haproxy,
        ];
        assert_eq!(order(&c, 0), c);
        assert_eq!(
            order(&c, 1),
            [
                Contender::HeadwayRandom,
                Contender::Haproxy,
                Contender::Direct
            ]
        );
        assert_eq!(order(&c, 3), c);
        assert!(order(&[], 2).is_empty());
    }

    #[test]
    fn ids_are_distinct() {
        let ids: std::collections::BTreeSet<_> = Contender::ALL.iter().map(|c| c.id()).collect();
        assert_eq!(ids.len(), Contender::ALL.len());
    }
}
