//! Series of deleted pods and services, kept for a grace period.
//!
//! `/metrics` is rendered from what the pinned maps hold at scrape time, so
//! a pod deleted between two scrapes would vanish with the connections it
//! took since the previous one. Instead its last values stay exported for
//! a grace period (`--metrics-grace`, 5 minutes by default): a scrape
//! shortly after the deletion still sees the final counts, and the series
//! set does not grow forever. The memory lives in the agent process: pods
//! deleted while no agent ran are gone at the next scrape.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use crate::status::{PodStatus, ServiceStatus, Status};

/// How long series of deleted pods and services stay exported by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);

type Key = (String, String);

fn key(namespace: &str, name: &str) -> Key {
    (namespace.to_string(), name.to_string())
}

struct KeptService {
    /// As last seen (its `pods` is not used: see `pods`).
    last: ServiceStatus,
    seen: Instant,
    pods: BTreeMap<Key, (PodStatus, Instant)>,
}

/// What recent scrapes exported, by service and pod.
#[derive(Default)]
pub struct Retained {
    services: BTreeMap<Key, KeptService>,
}

impl Retained {
    /// Remembers everything in `status` as seen at `now`, then adds to it
    /// the pods and services seen within `grace` before `now` that are no
    /// longer there, with their last values. Forgets the older ones.
    pub fn apply(&mut self, status: &mut Status, now: Instant, grace: Duration) {
        let fresh = |seen: Instant| now.saturating_duration_since(seen) < grace;
        let mut current: BTreeSet<Key> = BTreeSet::new();
        for svc in &mut status.services {
            let k = key(&svc.namespace, &svc.name);
            current.insert(k.clone());
            let kept = self.services.entry(k).or_insert_with(|| KeptService {
                last: svc.clone(),
                seen: now,
                pods: BTreeMap::new(),
            });
            kept.last = ServiceStatus {
                pods: Vec::new(),
                ..svc.clone()
            };
            kept.seen = now;
            let mut present = BTreeSet::new();
            for pod in &svc.pods {
                let k = key(&pod.namespace, &pod.name);
                kept.pods.insert(k.clone(), (pod.clone(), now));
                present.insert(k);
            }
            kept.pods
                .retain(|k, (_, seen)| present.contains(k) || fresh(*seen));
            for (k, (pod, _)) in &kept.pods {
                if !present.contains(k) {
                    svc.pods.push(pod.clone());
                }
            }
        }
        self.services.retain(|k, kept| {
            if current.contains(k) {
                return true;
            }
            kept.pods.retain(|_, (_, seen)| fresh(*seen));
            fresh(kept.seen)
        });
        for (k, kept) in &self.services {
            if current.contains(k) {
                continue;
            }
            status.services.push(ServiceStatus {
                pods: kept.pods.values().map(|(p, _)| p.clone()).collect(),
                ..kept.last.clone()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Counters, ServiceCountersStatus};

    fn pod(name: &str, tcp: u64) -> PodStatus {
        PodStatus {
            namespace: "ns".into(),
            name: name.into(),
            addresses: vec![],
            state: vec!["ready"],
            counters: Counters {
                tcp_connects: tcp,
                ..Counters::default()
            },
            dns_share: None,
            connection_share: None,
        }
    }

    fn status(services: &[(&str, Vec<PodStatus>)]) -> Status {
        Status {
            programs: vec![],
            steering: BTreeMap::new(),
            dns: BTreeMap::new(),
            sockets: BTreeMap::new(),
            services: services
                .iter()
                .map(|(name, pods)| ServiceStatus {
                    namespace: "ns".into(),
                    name: name.to_string(),
                    policy: "failover".into(),
                    topology: "none".into(),
                    ports: Vec::new(),
                    backends_v4: 0,
                    backends_v6: 0,
                    preferred_v4: 0,
                    preferred_v6: 0,
                    counters: ServiceCountersStatus::default(),
                    totals: Counters::default(),
                    pods: pods.clone(),
                })
                .collect(),
        }
    }

    /// (service, pod, tcp) for every pod, sorted.
    fn series(status: &Status) -> Vec<(String, String, u64)> {
        let mut out: Vec<_> = status
            .services
            .iter()
            .flat_map(|s| {
                s.pods
                    .iter()
                    .map(|p| (s.name.clone(), p.name.clone(), p.counters.tcp_connects))
            })
            .collect();
        out.sort();
        out
    }

    fn row(svc: &str, pod: &str, tcp: u64) -> (String, String, u64) {
        (svc.into(), pod.into(), tcp)
    }

    #[test]
    fn a_deleted_pod_keeps_its_last_values_for_the_grace_period() {
        let grace = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut kept = Retained::default();

        let mut s = status(&[("web", vec![pod("web-0", 5), pod("web-1", 7)])]);
        kept.apply(&mut s, t0, grace);
        assert_eq!(series(&s), [row("web", "web-0", 5), row("web", "web-1", 7)]);

        // web-1 deleted: still there with its last count.
        let mut s = status(&[("web", vec![pod("web-0", 6)])]);
        kept.apply(&mut s, t0 + Duration::from_secs(30), grace);
        assert_eq!(series(&s), [row("web", "web-0", 6), row("web", "web-1", 7)]);

        // Grace over (counted from when it was last seen): gone for good.
        let mut s = status(&[("web", vec![pod("web-0", 6)])]);
        kept.apply(&mut s, t0 + Duration::from_secs(60), grace);
        assert_eq!(series(&s), [row("web", "web-0", 6)]);
        let mut s = status(&[("web", vec![pod("web-0", 6)])]);
        kept.apply(&mut s, t0 + Duration::from_secs(61), grace);
        assert_eq!(series(&s), [row("web", "web-0", 6)]);
    }

    #[test]
    fn a_deleted_service_keeps_its_pods_then_goes() {
        let grace = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut kept = Retained::default();
        let mut s = status(&[("db", vec![pod("db-0", 3)]), ("web", vec![pod("web-0", 1)])]);
        kept.apply(&mut s, t0, grace);

        let mut s = status(&[("web", vec![pod("web-0", 2)])]);
        kept.apply(&mut s, t0 + Duration::from_secs(9), grace);
        assert_eq!(series(&s), [row("db", "db-0", 3), row("web", "web-0", 2)]);
        assert_eq!(s.services.len(), 2);

        let mut s = status(&[("web", vec![pod("web-0", 2)])]);
        kept.apply(&mut s, t0 + Duration::from_secs(10), grace);
        assert_eq!(series(&s), [row("web", "web-0", 2)]);
        assert_eq!(s.services.len(), 1);
        assert_eq!(kept.services.len(), 1, "forgotten, not just hidden");
    }

    #[test]
    fn a_pod_that_comes_back_is_shown_once_with_its_new_values() {
        let grace = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut kept = Retained::default();
        let mut s = status(&[("web", vec![pod("web-0", 4)])]);
        kept.apply(&mut s, t0, grace);
        let mut s = status(&[("web", vec![])]);
        kept.apply(&mut s, t0 + Duration::from_secs(1), grace);
        assert_eq!(series(&s), [row("web", "web-0", 4)]);
        // Recreated: its counters start again (a new pod id).
        let mut s = status(&[("web", vec![pod("web-0", 1)])]);
        kept.apply(&mut s, t0 + Duration::from_secs(2), grace);
        assert_eq!(series(&s), [row("web", "web-0", 1)]);
    }

    #[test]
    fn zero_grace_exports_only_what_is_there() {
        let t0 = Instant::now();
        let mut kept = Retained::default();
        let mut s = status(&[("web", vec![pod("web-0", 4)])]);
        kept.apply(&mut s, t0, Duration::ZERO);
        let mut s = status(&[("web", vec![])]);
        kept.apply(&mut s, t0, Duration::ZERO);
        assert!(series(&s).is_empty());
    }
}
