//! The tables the connect hooks draw a pod from (`svc_backends`): per
//! service and address family, one over every eligible pod and one over the
//! eligible pods the service's topology prefers. The kernel draws a slot
//! uniformly (per socket, `headway_common::draw`), so the policy lives in
//! how slots are handed out:
//! one per pod, or under `weighted` in proportion to the pod's weight.
//! Pure: unit-tested on its own.
use std::net::IpAddr;

use crate::model::{Endpoint, Policy, ServiceSpec, Topology};

/// The most slots one weighted table gets; weights are scaled down to fit
/// (each pod with a non-zero weight keeps at least one slot), so a table
/// stays small whatever numbers the labels hold.
pub const MAX_WEIGHTED_SLOTS: u32 = 1000;

/// Where this agent runs, for topology preferences.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    pub node_name: Option<String>,
    pub zone: Option<String>,
}

impl Locality {
    /// Whether `topology` prefers `ep` from here. Nothing is preferred when
    /// the agent does not know its node (or zone): every pod is then equal.
    pub fn prefers(&self, topology: Topology, ep: &Endpoint) -> bool {
        let same = |mine: &Option<String>, theirs: &Option<String>| {
            mine.is_some() && mine.as_deref() == theirs.as_deref()
        };
        match topology {
            Topology::None => false,
            Topology::PreferNode => same(&self.node_name, &ep.node_name),
            Topology::PreferZone => same(&self.zone, &ep.zone),
        }
    }
}

/// One family's two tables: the endpoints in slot order (a pod appears as
/// many times as it has slots).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FamilyTables<'a> {
    pub all: Vec<&'a Endpoint>,
    pub preferred: Vec<&'a Endpoint>,
}

/// The IPv4 and IPv6 tables of `svc` under `policy`.
pub fn tables<'a>(
    svc: &'a ServiceSpec,
    policy: Policy,
    locality: &Locality,
) -> (FamilyTables<'a>, FamilyTables<'a>) {
    let family = |v4: bool| {
        let eligible: Vec<&Endpoint> = svc
            .eligible_endpoints()
            .filter(|ep| matches!(ep.addr, IpAddr::V4(_)) == v4)
            .collect();
        let preferred: Vec<&Endpoint> = eligible
            .iter()
            .copied()
            .filter(|ep| locality.prefers(svc.topology, ep))
            .collect();
        FamilyTables {
            all: fill(&eligible, policy),
            preferred: fill(&preferred, policy),
        }
    };
    (family(true), family(false))
}

/// Slots for `endpoints` (in address order, so an unrelated change moves
/// little): one each, or weighted.
fn fill<'a>(endpoints: &[&'a Endpoint], policy: Policy) -> Vec<&'a Endpoint> {
    let counts = if policy == Policy::Weighted {
        let weights: Vec<u32> = endpoints.iter().map(|ep| ep.weight).collect();
        weighted_slots(&weights, MAX_WEIGHTED_SLOTS)
    } else {
        vec![1; endpoints.len()]
    };
    endpoints
        .iter()
        .zip(counts)
        .flat_map(|(ep, n)| std::iter::repeat_n(*ep, n as usize))
        .collect()
}

/// Slots per entry in proportion to `weights`, at most about `max_slots` in
/// all. Weights are first divided by their greatest common divisor (100,
/// 200, 300 → 1, 2, 3). A weight of 0 gets no slot; when every weight is 0
/// they all count as equal, so the table is never empty while pods are
/// eligible (fail open to plain random rather than to nothing).
pub fn weighted_slots(weights: &[u32], max_slots: u32) -> Vec<u32> {
    if weights.iter().all(|w| *w == 0) {
        return vec![1; weights.len()];
    }
    let divisor = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
    let reduced: Vec<u64> = weights.iter().map(|w| u64::from(w / divisor)).collect();
    let total: u64 = reduced.iter().sum();
    if total <= u64::from(max_slots) {
        return reduced.iter().map(|w| *w as u32).collect();
    }
    reduced
        .iter()
        .map(|w| match *w {
            0 => 0,
            w => ((w * u64::from(max_slots) + total / 2) / total).max(1) as u32,
        })
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceKey;

    fn ep(addr: &str, node: &str, zone: &str, weight: u32) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            pod: None,
            hostname: None,
            node_name: Some(node.into()),
            zone: Some(zone.into()),
            ready: true,
            serving: true,
            terminating: false,
            drained: false,
            weight,
        }
    }

    fn svc(topology: Topology, endpoints: Vec<Endpoint>) -> ServiceSpec {
        ServiceSpec {
            key: ServiceKey::new("db", "pg"),
            policy: None,
            topology,
            ports: vec![],
            publish_not_ready: false,
            endpoints: endpoints.into_iter().map(|e| (e.addr, e)).collect(),
        }
    }

    fn addrs(table: &[&Endpoint]) -> Vec<String> {
        table.iter().map(|e| e.addr.to_string()).collect()
    }

    #[test]
    fn weights_reduce_by_their_gcd() {
        assert_eq!(weighted_slots(&[100, 200, 300], 1000), [1, 2, 3]);
        assert_eq!(weighted_slots(&[100, 100], 1000), [1, 1]);
        assert_eq!(weighted_slots(&[7, 0, 14], 1000), [1, 0, 2]);
        assert_eq!(weighted_slots(&[0, 0], 1000), [1, 1]);
        assert_eq!(weighted_slots(&[], 1000), Vec::<u32>::new());
    }

    #[test]
    fn large_weights_scale_down_and_keep_every_pod() {
        let slots = weighted_slots(&[1, 997, 1999, 3001], 100);
        assert_eq!(slots[0], 1, "a tiny weight keeps one slot: {slots:?}");
        let total: u32 = slots.iter().sum();
        assert!((99..=102).contains(&total), "{slots:?}");
        // Proportions hold within a slot of rounding.
        assert!((16..=18).contains(&slots[1]), "{slots:?}");
        assert!((32..=34).contains(&slots[2]), "{slots:?}");
        assert!((49..=51).contains(&slots[3]), "{slots:?}");
    }

    #[test]
    fn weighted_tables_repeat_pods_and_others_list_each_once() {
        let s = svc(
            Topology::None,
            vec![
                ep("10.0.0.1", "n1", "a", 100),
                ep("10.0.0.2", "n2", "a", 300),
                ep("fd00::1", "n1", "a", 100),
            ],
        );
        let here = Locality::default();
        let (v4, v6) = tables(&s, Policy::Weighted, &here);
        assert_eq!(
            addrs(&v4.all),
            ["10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.2"]
        );
        assert_eq!(addrs(&v6.all), ["fd00::1"]);
        let (v4, _) = tables(&s, Policy::Random, &here);
        assert_eq!(addrs(&v4.all), ["10.0.0.1", "10.0.0.2"]);
        assert!(v4.preferred.is_empty());
    }

    #[test]
    fn topology_prefers_local_eligible_pods() {
        let mut drained = ep("10.0.0.3", "n1", "b", 100);
        drained.drained = true;
        let endpoints = vec![
            ep("10.0.0.1", "n1", "a", 100),
            ep("10.0.0.2", "n2", "a", 100),
            drained,
            ep("10.0.0.4", "n3", "b", 100),
        ];
        let here = Locality {
            node_name: Some("n1".into()),
            zone: Some("b".into()),
        };
        let node = svc(Topology::PreferNode, endpoints.clone());
        let (v4, _) = tables(&node, Policy::Random, &here);
        assert_eq!(addrs(&v4.all), ["10.0.0.1", "10.0.0.2", "10.0.0.4"]);
        assert_eq!(addrs(&v4.preferred), ["10.0.0.1"]);

        // Zone b's only eligible pod is on n3 (the drained one is skipped).
        let zone = svc(Topology::PreferZone, endpoints.clone());
        let (v4, _) = tables(&zone, Policy::Random, &here);
        assert_eq!(addrs(&v4.preferred), ["10.0.0.4"]);

        // An agent that does not know where it runs prefers nothing.
        let (v4, _) = tables(&node, Policy::Random, &Locality::default());
        assert!(v4.preferred.is_empty());
        // No topology, no preferred table.
        let none = svc(Topology::None, endpoints);
        let (v4, _) = tables(&none, Policy::Random, &here);
        assert!(v4.preferred.is_empty());
    }

    #[test]
    fn not_eligible_pods_get_no_slot() {
        let mut not_ready = ep("10.0.0.1", "n1", "a", 100);
        not_ready.ready = false;
        let mut terminating = ep("10.0.0.2", "n1", "a", 100);
        terminating.terminating = true;
        let s = svc(
            Topology::None,
            vec![not_ready, terminating, ep("10.0.0.3", "n1", "a", 100)],
        );
        let (v4, _) = tables(&s, Policy::Random, &Locality::default());
        assert_eq!(addrs(&v4.all), ["10.0.0.3"]);
        // publishNotReadyAddresses: the not-ready pod is eligible again, the
        // terminating one is not.
        let mut publish = s.clone();
        publish.publish_not_ready = true;
        let (v4, _) = tables(&publish, Policy::Random, &Locality::default());
        assert_eq!(addrs(&v4.all), ["10.0.0.1", "10.0.0.3"]);
    }
}
