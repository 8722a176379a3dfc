//! The kube source's view of the cluster: the headless Services, their
//! EndpointSlices and the labels of headway-labelled Pods, as compact
//! records ([`ServiceRecord`], [`SliceRecord`]), indexed so that each change
//! names the services it affects. Pure (no I/O, no clock): the watchers in
//! [`super::kube`] feed it, and it is unit-tested on its own.
//!
//! An address that leaves every slice of its service is *held* with its
//! last state until the source releases it ([`ClusterStore::release_hold`]):
//! an endpoint moving between two slices of a service, whose removal
//! arrives before its addition, is then never taken out of the maps.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::model::{
    self, DesiredState, EndpointRecord, PodKey, PodLabels, ServiceKey, ServiceRecord, ServiceSpec,
    SliceRecord, Topology, Warning,
};

/// Services whose spec may have changed.
pub type Affected = BTreeSet<ServiceKey>;

/// An EndpointSlice by namespace and name.
pub type SliceKey = (String, String);

struct SliceEntry {
    record: SliceRecord,
    /// Its service (the record's label, in the slice's namespace), shared
    /// with [`ClusterStore::services_of_pod`].
    service: Option<Arc<ServiceKey>>,
}

/// The services whose slices name a pod, with how many of its endpoints.
type ServicesOfPod = SmallVec<[(Arc<ServiceKey>, u32); 1]>;

/// The names of one service's slices, sorted: almost always one or two,
/// so a Vec (a set cost a tree node per service).
#[derive(Default)]
struct SliceNames(Vec<String>);

impl SliceNames {
    fn insert(&mut self, name: &str) {
        if let Err(at) = self.0.binary_search_by(|n| n.as_str().cmp(name)) {
            self.0.insert(at, name.to_owned());
        }
    }

    fn remove(&mut self, name: &str) {
        if let Ok(at) = self.0.binary_search_by(|n| n.as_str().cmp(name)) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a SliceNames {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// One pod's labels as each pod watcher last saw it. A pod matching both
/// label selectors comes from two watchers, whose events interleave: the
/// copy with the newer resourceVersion counts.
#[derive(Default)]
struct PodCopies {
    by_watch: BTreeMap<usize, (u64, PodLabels)>,
}

impl PodCopies {
    fn effective(&self) -> Option<PodLabels> {
        self.by_watch
            .values()
            .max_by_key(|(rv, _)| *rv)
            .map(|(_, labels)| *labels)
    }
}

/// An address held after it left its service's slices.
struct Held {
    record: EndpointRecord,
    /// Tells this hold from a later one of the same address.
    seq: u64,
}

/// A hold the source must release after its grace period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldStarted {
    pub service: ServiceKey,
    pub addr: IpAddr,
    pub seq: u64,
}

#[derive(Default)]
pub struct ClusterStore {
    services: HashMap<ServiceKey, ServiceRecord>,
    slices: HashMap<SliceKey, SliceEntry>,
    /// Slice names per service, sorted (the model merges them in order).
    slices_of: HashMap<ServiceKey, SliceNames>,
    pods: HashMap<PodKey, PodCopies>,
    /// The effective labels of every pod a watcher reported.
    labels: BTreeMap<PodKey, PodLabels>,
    /// Which services' slices name each pod, with how many endpoints:
    /// almost every pod is in one service, so the first is kept inline (a
    /// tree node per pod cost 80 MB at 100,000 pods, a Vec's allocation
    /// ~9 MB); the key shares its strings with the slice's record.
    services_of_pod: HashMap<PodKey, ServicesOfPod>,
    held: HashMap<ServiceKey, BTreeMap<IpAddr, Held>>,
    /// One copy of each namespace name, shared by the pod keys of every
    /// slice record (a cluster has few namespaces and many pods). Never
    /// shrinks: a namespace costs its name.
    namespaces: HashSet<Arc<str>>,
    holds_started: Vec<HoldStarted>,
    next_seq: u64,
    warnings: Vec<Warning>,
}

/// resourceVersions are opaque strings, but every API server (etcd) hands
/// out increasing integers; anything else sorts first.
pub fn resource_version(rv: Option<&str>) -> u64 {
    rv.and_then(|rv| rv.parse().ok()).unwrap_or(0)
}

fn in_scope(namespace: &str, scope: Option<&str>) -> bool {
    scope.is_none_or(|s| s == namespace)
}

impl ClusterStore {
    pub fn new() -> ClusterStore {
        ClusterStore::default()
    }

    /// Warnings raised since the last call (bad pod labels).
    pub fn take_warnings(&mut self) -> Vec<Warning> {
        std::mem::take(&mut self.warnings)
    }

    /// Adds warnings raised while reading objects, to be taken with the rest.
    pub fn warn(&mut self, warnings: impl IntoIterator<Item = Warning>) {
        self.warnings.extend(warnings);
    }

    /// Holds started since the last call; each is to be released (with
    /// [`Self::release_hold`]) once its grace period is over.
    pub fn take_holds_started(&mut self) -> Vec<HoldStarted> {
        std::mem::take(&mut self.holds_started)
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Every headless service's key.
    pub fn service_keys(&self) -> std::collections::BTreeSet<ServiceKey> {
        self.services.keys().cloned().collect()
    }

    /// The services whose choice tables depend on this node's zone.
    pub fn prefer_zone_services(&self) -> Affected {
        self.services
            .iter()
            .filter(|(_, r)| r.topology == Topology::PreferZone)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// A Service was added or changed (`None`: it is not headless, which
    /// counts as gone).
    pub fn apply_service(&mut self, key: ServiceKey, record: Option<ServiceRecord>) -> Affected {
        let Some(record) = record else {
            return self.delete_service(&key);
        };
        if self.services.get(&key) == Some(&record) {
            return Affected::new();
        }
        self.services.insert(key.clone(), record);
        Affected::from([key])
    }

    pub fn delete_service(&mut self, key: &ServiceKey) -> Affected {
        // Its entries go now, held addresses with them.
        self.held.remove(key);
        match self.services.remove(key) {
            Some(_) => Affected::from([key.clone()]),
            None => Affected::new(),
        }
    }

    /// A (re)list of services in `scope` (a namespace, or all): whatever
    /// the store held there and the list lacks was deleted meanwhile.
    pub fn replace_services(
        &mut self,
        scope: Option<&str>,
        list: Vec<(ServiceKey, Option<ServiceRecord>)>,
    ) -> Affected {
        let listed: BTreeSet<&ServiceKey> = list.iter().map(|(k, _)| k).collect();
        let stale: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| in_scope(&k.namespace, scope) && !listed.contains(k))
            .cloned()
            .collect();
        let mut affected = Affected::new();
        for key in stale {
            affected.extend(self.delete_service(&key));
        }
        for (key, record) in list {
            affected.extend(self.apply_service(key, record));
        }
        affected
    }

    pub fn apply_slice(&mut self, key: SliceKey, mut record: SliceRecord) -> Affected {
        if self.slices.get(&key).is_some_and(|e| e.record == record) {
            return Affected::new();
        }
        for pod in record.endpoints.iter_mut().filter_map(|e| e.pod.as_mut()) {
            pod.namespace = self.shared_namespace(&pod.namespace);
        }
        let service = record
            .service
            .as_ref()
            .map(|name| Arc::new(ServiceKey::new(key.0.clone(), name)));
        // Insert before removing the old version, so an address that stays
        // in the slice is never seen leaving the service.
        if let Some(service) = &service {
            self.slices_of
                .entry(ServiceKey::clone(service))
                .or_default()
                .insert(&key.1);
            for pod in record.pods() {
                let services = self.services_of_pod.entry(pod.clone()).or_default();
                match services.iter_mut().find(|(s, _)| s == service) {
                    Some((_, count)) => *count += 1,
                    None => services.push((service.clone(), 1)),
                }
            }
            if let Some(held) = self.held.get_mut(service.as_ref()) {
                for ep in &record.endpoints {
                    held.remove(&ep.addr);
                }
            }
        }
        let old = self
            .slices
            .insert(key.clone(), SliceEntry { record, service });
        let mut affected = match old {
            Some(old) => self.forget_slice(&key, old),
            None => Affected::new(),
        };
        if let Some(service) = &self.slices[&key].service {
            affected.insert(ServiceKey::clone(service));
        }
        affected
    }

    fn shared_namespace(&mut self, namespace: &Arc<str>) -> Arc<str> {
        match self.namespaces.get(namespace) {
            Some(shared) => shared.clone(),
            None => {
                self.namespaces.insert(namespace.clone());
                namespace.clone()
            }
        }
    }

    pub fn delete_slice(&mut self, key: &SliceKey) -> Affected {
        match self.slices.remove(key) {
            Some(old) => self.forget_slice(key, old),
            None => Affected::new(),
        }
    }

    /// Undoes what slice `old` (no longer in `self.slices` under its old
    /// version) contributed to the indexes, and holds the addresses its
    /// service lost with it.
    fn forget_slice(&mut self, key: &SliceKey, old: SliceEntry) -> Affected {
        let Some(service) = old.service else {
            return Affected::new();
        };
        let still_listed = self
            .slices
            .get(key)
            .is_some_and(|e| e.service.as_ref() == Some(&service));
        if !still_listed && let Some(names) = self.slices_of.get_mut(service.as_ref()) {
            names.remove(&key.1);
            if names.is_empty() {
                self.slices_of.remove(service.as_ref());
            }
        }
        for pod in old.record.pods() {
            if let Some(services) = self.services_of_pod.get_mut(pod) {
                if let Some(i) = services.iter().position(|(s, _)| *s == service) {
                    services[i].1 -= 1;
                    if services[i].1 == 0 {
                        services.swap_remove(i);
                    }
                }
                if services.is_empty() {
                    self.services_of_pod.remove(pod);
                }
            }
        }
        if self.services.contains_key(service.as_ref()) {
            let live = self.addresses(&service);
            for ep in old.record.endpoints {
                if !live.contains(&ep.addr) {
                    self.hold(&service, ep);
                }
            }
        }
        Affected::from([Arc::unwrap_or_clone(service)])
    }

    /// Every address the service's slices list now.
    fn addresses(&self, service: &ServiceKey) -> BTreeSet<IpAddr> {
        self.slices_of
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|name| self.slices.get(&(service.namespace.clone(), name.clone())))
            .flat_map(|e| e.record.endpoints.iter().map(|ep| ep.addr))
            .collect()
    }

    fn hold(&mut self, service: &ServiceKey, record: EndpointRecord) {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.holds_started.push(HoldStarted {
            service: service.clone(),
            addr: record.addr,
            seq,
        });
        self.held
            .entry(service.clone())
            .or_default()
            .insert(record.addr, Held { record, seq });
    }

    /// Ends a hold (if it is still the one that `hold` started): the
    /// address leaves its service for good.
    pub fn release_hold(&mut self, hold: &HoldStarted) -> Affected {
        let Some(held) = self.held.get_mut(&hold.service) else {
            return Affected::new();
        };
        if held.get(&hold.addr).is_none_or(|h| h.seq != hold.seq) {
            return Affected::new();
        }
        held.remove(&hold.addr);
        if held.is_empty() {
            self.held.remove(&hold.service);
        }
        Affected::from([hold.service.clone()])
    }

    /// How many addresses are held (for tests and metrics).
    pub fn held_count(&self) -> usize {
        self.held.values().map(BTreeMap::len).sum()
    }

    /// A (re)list of EndpointSlices in `scope`; see [`Self::replace_services`].
    pub fn replace_slices(
        &mut self,
        scope: Option<&str>,
        list: Vec<(SliceKey, SliceRecord)>,
    ) -> Affected {
        let listed: BTreeSet<&SliceKey> = list.iter().map(|(k, _)| k).collect();
        let stale: Vec<SliceKey> = self
            .slices
            .keys()
            .filter(|k| in_scope(&k.0, scope) && !listed.contains(k))
            .cloned()
            .collect();
        let mut affected = Affected::new();
        // New versions first: an address that moved to a listed slice is
        // never seen leaving.
        for (key, record) in list {
            affected.extend(self.apply_slice(key, record));
        }
        for key in stale {
            affected.extend(self.delete_slice(&key));
        }
        affected
    }

    /// Pod watcher `watch` saw a pod added or changed (`rv`: its
    /// resourceVersion).
    pub fn apply_pod(&mut self, watch: usize, key: PodKey, rv: u64, labels: PodLabels) -> Affected {
        self.pods
            .entry(key.clone())
            .or_default()
            .by_watch
            .insert(watch, (rv, labels));
        self.refresh_labels(&key)
    }

    /// Pod watcher `watch` no longer sees the pod (deleted, or it lost the
    /// label that watcher selects).
    pub fn delete_pod(&mut self, watch: usize, key: &PodKey) -> Affected {
        if let Some(copies) = self.pods.get_mut(key) {
            copies.by_watch.remove(&watch);
            if copies.by_watch.is_empty() {
                self.pods.remove(key);
            }
        }
        self.refresh_labels(key)
    }

    /// A (re)list of pod watcher `watch` in `scope`.
    pub fn replace_pods(
        &mut self,
        watch: usize,
        scope: Option<&str>,
        list: Vec<(PodKey, u64, PodLabels)>,
    ) -> Affected {
        let listed: BTreeSet<&PodKey> = list.iter().map(|(k, _, _)| k).collect();
        let stale: Vec<PodKey> = self
            .pods
            .iter()
            .filter(|(k, c)| {
                c.by_watch.contains_key(&watch)
                    && in_scope(&k.namespace, scope)
                    && !listed.contains(k)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut affected = Affected::new();
        for key in stale {
            affected.extend(self.delete_pod(watch, &key));
        }
        for (key, rv, labels) in list {
            affected.extend(self.apply_pod(watch, key, rv, labels));
        }
        affected
    }

    /// Recomputes a pod's effective labels; its services are affected
    /// only if they changed.
    fn refresh_labels(&mut self, key: &PodKey) -> Affected {
        let now = self.pods.get(key).and_then(PodCopies::effective);
        let before = match now {
            Some(labels) => self.labels.insert(key.clone(), labels),
            None => self.labels.remove(key),
        };
        if before == now {
            return Affected::new();
        }
        self.services_of_pod
            .get(key)
            .map(|s| s.iter().map(|(k, _)| ServiceKey::clone(k)).collect())
            .unwrap_or_default()
    }

    /// The spec of one headless service (`None`: no such service), and
    /// what the model had to ignore or default.
    pub fn service_spec(&self, key: &ServiceKey) -> (Option<ServiceSpec>, Vec<Warning>) {
        let mut warnings = Vec::new();
        let Some(svc) = self.services.get(key) else {
            return (None, warnings);
        };
        let slices: Vec<&SliceRecord> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| self.slices.get(&(key.namespace.clone(), name.clone())))
            .map(|e| &e.record)
            .collect();
        let mut spec = model::service_spec(key.clone(), svc, &slices, &self.labels, &mut warnings);
        for (addr, held) in self.held.get(key).into_iter().flatten() {
            spec.endpoints
                .entry(*addr)
                .or_insert_with(|| model::endpoint(&held.record, &self.labels));
        }
        (Some(spec), warnings)
    }

    /// Every headless service's spec.
    pub fn desired_state(&self) -> (DesiredState, Vec<Warning>) {
        let mut state = DesiredState::default();
        let mut warnings = Vec::new();
        for key in self.services.keys() {
            let (spec, w) = self.service_spec(key);
            warnings.extend(w);
            if let Some(spec) = spec {
                state.services.insert(key.clone(), spec);
            }
        }
        (state, warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map_plan::{Ids, PlanSettings, plan_service};
    use crate::model::Policy;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_json::json;

    fn service(headless: bool) -> Option<ServiceRecord> {
        let ip = if headless { "None" } else { "10.96.0.1" };
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "x", "resourceVersion": "1"},
            "spec": {"clusterIP": ip},
        }))
        .unwrap();
        ServiceRecord::of(&svc, &mut Vec::new())
    }

    fn slice(svc: &str, eps: &[(&str, &str)]) -> SliceRecord {
        let endpoints: Vec<_> = eps
            .iter()
            .map(|(addr, pod)| {
                json!({
                    "addresses": [addr],
                    "conditions": {"ready": true},
                    "targetRef": {"kind": "Pod", "name": pod},
                })
            })
            .collect();
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "x", "namespace": "a",
                "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": endpoints,
        }))
        .unwrap();
        SliceRecord::of(&slice, &mut Vec::new())
    }

    fn labels(drained: bool, weight: u32) -> PodLabels {
        PodLabels { drained, weight }
    }

    fn key(ns: &str, name: &str) -> ServiceKey {
        ServiceKey::new(ns, name)
    }

    fn skey(ns: &str, name: &str) -> SliceKey {
        (ns.to_string(), name.to_string())
    }

    fn pkey(name: &str) -> PodKey {
        PodKey::new("a", name)
    }

    fn addrs(store: &ClusterStore, svc: &ServiceKey) -> Vec<String> {
        let spec = store.service_spec(svc).0.expect("service known");
        spec.endpoints.keys().map(|a| a.to_string()).collect()
    }

    #[test]
    fn slices_of_a_service_merge_and_each_change_names_its_service() {
        let mut store = ClusterStore::new();
        assert_eq!(
            store.apply_service(key("a", "db"), service(true)),
            Affected::from([key("a", "db")])
        );
        // The same record again changes nothing.
        assert!(
            store
                .apply_service(key("a", "db"), service(true))
                .is_empty()
        );
        store.apply_service(key("a", "web"), service(true));
        let touched = store.apply_slice(skey("a", "db-1"), slice("db", &[("10.0.0.1", "db-0")]));
        assert_eq!(touched, Affected::from([key("a", "db")]));
        store.apply_slice(skey("a", "db-2"), slice("db", &[("10.0.0.2", "db-1")]));
        store.apply_slice(skey("a", "web-1"), slice("web", &[("10.0.1.1", "web-0")]));
        assert_eq!(addrs(&store, &key("a", "db")), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(
            store.delete_slice(&skey("a", "db-1")),
            Affected::from([key("a", "db")])
        );
        // Held until released.
        assert_eq!(addrs(&store, &key("a", "db")), ["10.0.0.1", "10.0.0.2"]);
        for hold in store.take_holds_started() {
            store.release_hold(&hold);
        }
        assert_eq!(addrs(&store, &key("a", "db")), ["10.0.0.2"]);
        // A slice whose service is unknown (yet) is kept for later.
        store.apply_slice(
            skey("a", "late-1"),
            slice("late", &[("10.0.2.1", "late-0")]),
        );
        store.apply_service(key("a", "late"), service(true));
        assert_eq!(addrs(&store, &key("a", "late")), ["10.0.2.1"]);
        // Not headless: gone.
        assert_eq!(
            store.apply_service(key("a", "late"), service(false)),
            Affected::from([key("a", "late")])
        );
        assert_eq!(store.service_spec(&key("a", "late")).0, None);
        assert_eq!(store.held_count(), 0);
    }

    fn settings() -> PlanSettings {
        PlanSettings {
            default_policy: Policy::Failover,
            cluster_domain: "cluster.local".into(),
            node_name: None,
            zone: None,
        }
    }

    #[test]
    fn an_endpoint_moving_between_slices_never_leaves_the_plan() {
        let settings = settings();
        let mut ids = Ids::default();
        let mut store = ClusterStore::new();
        store.apply_service(key("a", "db"), service(true));
        store.apply_slice(
            skey("a", "s1"),
            slice("db", &[("10.0.0.1", "db-0"), ("10.0.0.2", "db-1")]),
        );
        store.apply_slice(skey("a", "s2"), slice("db", &[("10.0.0.3", "db-2")]));
        let plan = |store: &ClusterStore, ids: &mut Ids| {
            let spec = store.service_spec(&key("a", "db")).0.unwrap();
            plan_service(&spec, &settings, ids)
        };
        let before = plan(&store, &mut ids);
        // The controller adds db-1 to s2 first, then takes it out of s1:
        // every intermediate state plans the same entries.
        store.apply_slice(
            skey("a", "s2"),
            slice("db", &[("10.0.0.3", "db-2"), ("10.0.0.2", "db-1")]),
        );
        assert_eq!(plan(&store, &mut ids), before);
        store.apply_slice(skey("a", "s1"), slice("db", &[("10.0.0.1", "db-0")]));
        assert_eq!(plan(&store, &mut ids), before);
        assert!(store.take_holds_started().is_empty(), "nothing left");

        // The other way round: out of s1 first (held), into s2 later.
        store.apply_slice(skey("a", "s1"), slice("db", &[]));
        let holds = store.take_holds_started();
        assert_eq!(holds.len(), 1, "{holds:?}");
        assert_eq!(plan(&store, &mut ids), before, "held");
        store.apply_slice(
            skey("a", "s2"),
            slice(
                "db",
                &[
                    ("10.0.0.3", "db-2"),
                    ("10.0.0.2", "db-1"),
                    ("10.0.0.1", "db-0"),
                ],
            ),
        );
        assert_eq!(plan(&store, &mut ids), before, "arrived");
        // The grace period ends: the address is listed, nothing changes.
        assert!(store.release_hold(&holds[0]).is_empty());
        assert_eq!(plan(&store, &mut ids), before);
        assert_eq!(store.held_count(), 0);
    }

    #[test]
    fn a_stale_hold_release_does_not_end_a_newer_hold() {
        let mut store = ClusterStore::new();
        store.apply_service(key("a", "db"), service(true));
        store.apply_slice(skey("a", "s1"), slice("db", &[("10.0.0.1", "db-0")]));
        store.delete_slice(&skey("a", "s1"));
        let first = store.take_holds_started();
        store.apply_slice(skey("a", "s1"), slice("db", &[("10.0.0.1", "db-0")]));
        store.delete_slice(&skey("a", "s1"));
        let second = store.take_holds_started();
        assert!(store.release_hold(&first[0]).is_empty());
        assert_eq!(addrs(&store, &key("a", "db")), ["10.0.0.1"]);
        assert_eq!(
            store.release_hold(&second[0]),
            Affected::from([key("a", "db")])
        );
        assert!(addrs(&store, &key("a", "db")).is_empty());
    }

    #[test]
    fn pod_labels_affect_only_the_services_that_list_the_pod() {
        let mut store = ClusterStore::new();
        store.apply_service(key("a", "db"), service(true));
        store.apply_service(key("a", "web"), service(true));
        store.apply_slice(skey("a", "db-1"), slice("db", &[("10.0.0.1", "db-0")]));
        store.apply_slice(skey("a", "web-1"), slice("web", &[("10.0.1.1", "web-0")]));
        let drained = |store: &ClusterStore| {
            let spec = store.service_spec(&key("a", "db")).0.unwrap();
            spec.endpoints.values().next().unwrap().drained
        };
        // Watcher 0 selects the drain label, watcher 1 the weight label.
        let touched = store.apply_pod(0, pkey("db-0"), 5, labels(true, 100));
        assert_eq!(touched, Affected::from([key("a", "db")]));
        assert!(drained(&store));
        // A pod no slice lists affects nothing.
        assert!(
            store
                .apply_pod(0, pkey("lone"), 6, labels(true, 100))
                .is_empty()
        );
        // The drain label is replaced by a weight label: the weight
        // watcher's newer copy wins even before the drain watcher's delete.
        store.apply_pod(1, pkey("db-0"), 7, labels(false, 5));
        assert!(!drained(&store));
        store.delete_pod(0, &pkey("db-0"));
        assert!(!drained(&store));
        // Relisting watcher 1 without the pod forgets it.
        let touched = store.replace_pods(1, Some("a"), vec![]);
        assert_eq!(
            touched,
            Affected::from([key("a", "db")]),
            "weight back to default"
        );
        let spec = store.service_spec(&key("a", "db")).0.unwrap();
        assert_eq!(spec.endpoints.values().next().unwrap().weight, 100);
    }

    #[test]
    fn a_relist_removes_what_vanished_in_its_scope_only() {
        let mut store = ClusterStore::new();
        store.apply_service(key("a", "db"), service(true));
        store.apply_service(key("b", "db"), service(true));
        let touched = store.replace_services(Some("a"), vec![]);
        assert_eq!(touched, Affected::from([key("a", "db")]));
        assert_eq!(store.service_count(), 1);
        store.apply_slice(skey("b", "s"), slice("db", &[("10.0.0.1", "p")]));
        let touched = store.replace_slices(None, vec![]);
        assert_eq!(touched, Affected::from([key("b", "db")]));
        for hold in store.take_holds_started() {
            store.release_hold(&hold);
        }
        assert!(addrs(&store, &key("b", "db")).is_empty());
        let (state, _) = store.desired_state();
        assert_eq!(state.services.len(), 1);
    }

    #[test]
    fn a_relist_that_moves_an_address_holds_nothing() {
        let mut store = ClusterStore::new();
        store.apply_service(key("a", "db"), service(true));
        store.apply_slice(skey("a", "s1"), slice("db", &[("10.0.0.1", "db-0")]));
        store.replace_slices(
            Some("a"),
            vec![(skey("a", "s2"), slice("db", &[("10.0.0.1", "db-0")]))],
        );
        assert!(store.take_holds_started().is_empty());
        assert_eq!(addrs(&store, &key("a", "db")), ["10.0.0.1"]);
    }
}
