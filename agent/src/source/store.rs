//! The kube source's view of the cluster: the headless Services, their
//! EndpointSlices and the labels of headway-labelled Pods, indexed so that
//! each change names the services it affects. Pure (no I/O): the watchers
//! in [`super::kube`] feed it, and it is unit-tested on its own.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::{
    self, DesiredState, LABEL_SERVICE_NAME, PodKey, PodLabels, ServiceKey, ServiceSpec, Warning,
};

/// Services whose spec may have changed.
pub type Affected = BTreeSet<ServiceKey>;

/// An EndpointSlice by namespace and name.
type SliceKey = (String, String);

struct SliceEntry {
    slice: EndpointSlice,
    /// From its `kubernetes.io/service-name` label.
    service: Option<ServiceKey>,
    /// The pods its endpoints name.
    pods: BTreeSet<PodKey>,
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

#[derive(Default)]
pub struct ClusterStore {
    services: HashMap<ServiceKey, Service>,
    slices: HashMap<SliceKey, SliceEntry>,
    /// Slice names per service, sorted (the model merges them in order).
    slices_of: HashMap<ServiceKey, BTreeSet<String>>,
    pods: HashMap<PodKey, PodCopies>,
    /// The effective labels of every pod a watcher reported.
    labels: BTreeMap<PodKey, PodLabels>,
    /// Which services' slices name each pod, with how many slices.
    services_of_pod: HashMap<PodKey, BTreeMap<ServiceKey, usize>>,
    warnings: Vec<Warning>,
}

fn key_of(meta: &ObjectMeta) -> Option<(String, String)> {
    Some((model::namespace_of(meta).to_owned(), meta.name.clone()?))
}

fn in_scope(namespace: &str, scope: Option<&str>) -> bool {
    scope.is_none_or(|s| s == namespace)
}

/// resourceVersions are opaque strings, but every API server (etcd) hands
/// out increasing integers; anything else sorts first.
fn resource_version(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0)
}

impl ClusterStore {
    pub fn new() -> ClusterStore {
        ClusterStore::default()
    }

    /// Warnings raised since the last call (bad pod labels).
    pub fn take_warnings(&mut self) -> Vec<Warning> {
        std::mem::take(&mut self.warnings)
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// A Service was added or changed. One that is not headless is
    /// treated as gone.
    pub fn apply_service(&mut self, svc: Service) -> Affected {
        let Some((ns, name)) = key_of(&svc.metadata) else {
            return Affected::new();
        };
        let key = ServiceKey::new(ns, name);
        if !model::is_headless(&svc) {
            return self.remove_service(&key);
        }
        if self.services.get(&key) == Some(&svc) {
            return Affected::new();
        }
        self.services.insert(key.clone(), svc);
        Affected::from([key])
    }

    pub fn delete_service(&mut self, svc: &Service) -> Affected {
        match key_of(&svc.metadata) {
            Some((ns, name)) => self.remove_service(&ServiceKey::new(ns, name)),
            None => Affected::new(),
        }
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Affected {
        match self.services.remove(key) {
            Some(_) => Affected::from([key.clone()]),
            None => Affected::new(),
        }
    }

    /// A (re)list of services in `scope` (a namespace, or all): whatever
    /// the store held there and the list lacks was deleted meanwhile.
    pub fn replace_services(&mut self, scope: Option<&str>, list: Vec<Service>) -> Affected {
        let listed: BTreeSet<ServiceKey> = list
            .iter()
            .filter_map(|s| key_of(&s.metadata))
            .map(|(ns, name)| ServiceKey::new(ns, name))
            .collect();
        let stale: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| in_scope(&k.namespace, scope) && !listed.contains(k))
            .cloned()
            .collect();
        let mut affected = Affected::new();
        for key in stale {
            affected.extend(self.remove_service(&key));
        }
        for svc in list {
            affected.extend(self.apply_service(svc));
        }
        affected
    }

    pub fn apply_slice(&mut self, slice: EndpointSlice) -> Affected {
        let Some(key) = key_of(&slice.metadata) else {
            return Affected::new();
        };
        if self.slices.get(&key).is_some_and(|e| e.slice == slice) {
            return Affected::new();
        }
        let mut affected = self.remove_slice(&key);
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .map(|name| ServiceKey::new(key.0.clone(), name));
        let pods: BTreeSet<PodKey> = slice
            .endpoints
            .iter()
            .filter_map(|ep| ep.target_ref.as_ref())
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .filter_map(|r| {
                let ns = r.namespace.clone().unwrap_or_else(|| key.0.clone());
                Some(PodKey::new(ns, r.name.clone()?))
            })
            .collect();
        if let Some(service) = &service {
            self.slices_of
                .entry(service.clone())
                .or_default()
                .insert(key.1.clone());
            for pod in &pods {
                *self
                    .services_of_pod
                    .entry(pod.clone())
                    .or_default()
                    .entry(service.clone())
                    .or_default() += 1;
            }
            affected.insert(service.clone());
        }
        self.slices.insert(
            key,
            SliceEntry {
                slice,
                service,
                pods,
            },
        );
        affected
    }

    pub fn delete_slice(&mut self, slice: &EndpointSlice) -> Affected {
        match key_of(&slice.metadata) {
            Some(key) => self.remove_slice(&key),
            None => Affected::new(),
        }
    }

    fn remove_slice(&mut self, key: &SliceKey) -> Affected {
        let Some(entry) = self.slices.remove(key) else {
            return Affected::new();
        };
        let Some(service) = entry.service else {
            return Affected::new();
        };
        if let Some(names) = self.slices_of.get_mut(&service) {
            names.remove(&key.1);
            if names.is_empty() {
                self.slices_of.remove(&service);
            }
        }
        for pod in &entry.pods {
            if let Some(services) = self.services_of_pod.get_mut(pod) {
                if let Some(count) = services.get_mut(&service) {
                    *count -= 1;
                    if *count == 0 {
                        services.remove(&service);
                    }
                }
                if services.is_empty() {
                    self.services_of_pod.remove(pod);
                }
            }
        }
        Affected::from([service])
    }

    /// A (re)list of EndpointSlices in `scope`; see [`Self::replace_services`].
    pub fn replace_slices(&mut self, scope: Option<&str>, list: Vec<EndpointSlice>) -> Affected {
        let listed: BTreeSet<SliceKey> = list.iter().filter_map(|s| key_of(&s.metadata)).collect();
        let stale: Vec<SliceKey> = self
            .slices
            .keys()
            .filter(|k| in_scope(&k.0, scope) && !listed.contains(*k))
            .cloned()
            .collect();
        let mut affected = Affected::new();
        for key in stale {
            affected.extend(self.remove_slice(&key));
        }
        for slice in list {
            affected.extend(self.apply_slice(slice));
        }
        affected
    }

    /// Pod watcher `watch` saw a pod added or changed.
    pub fn apply_pod(&mut self, watch: usize, pod: &Pod) -> Affected {
        let Some((ns, name)) = key_of(&pod.metadata) else {
            return Affected::new();
        };
        let key = PodKey::new(ns, name);
        let labels = model::pod_labels(&pod.metadata, &mut self.warnings);
        let rv = resource_version(&pod.metadata);
        self.pods
            .entry(key.clone())
            .or_default()
            .by_watch
            .insert(watch, (rv, labels));
        self.refresh_labels(&key)
    }

    /// Pod watcher `watch` no longer sees the pod (deleted, or it lost the
    /// label that watcher selects).
    pub fn delete_pod(&mut self, watch: usize, pod: &Pod) -> Affected {
        match key_of(&pod.metadata) {
            Some((ns, name)) => self.forget_pod(watch, &PodKey::new(ns, name)),
            None => Affected::new(),
        }
    }

    fn forget_pod(&mut self, watch: usize, key: &PodKey) -> Affected {
        if let Some(copies) = self.pods.get_mut(key) {
            copies.by_watch.remove(&watch);
            if copies.by_watch.is_empty() {
                self.pods.remove(key);
            }
        }
        self.refresh_labels(key)
    }

    /// A (re)list of pod watcher `watch` in `scope`.
    pub fn replace_pods(&mut self, watch: usize, scope: Option<&str>, list: Vec<Pod>) -> Affected {
        let listed: BTreeSet<PodKey> = list
            .iter()
            .filter_map(|p| key_of(&p.metadata))
            .map(|(ns, name)| PodKey::new(ns, name))
            .collect();
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
            affected.extend(self.forget_pod(watch, &key));
        }
        for pod in &list {
            affected.extend(self.apply_pod(watch, pod));
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
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The spec of one headless service (`None`: no such service), and
    /// what the model had to ignore or default.
    pub fn service_spec(&self, key: &ServiceKey) -> (Option<ServiceSpec>, Vec<Warning>) {
        let mut warnings = Vec::new();
        let Some(svc) = self.services.get(key) else {
            return (None, warnings);
        };
        let slices: Vec<&EndpointSlice> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| self.slices.get(&(key.namespace.clone(), name.clone())))
            .map(|e| &e.slice)
            .collect();
        let spec = model::service_spec(key.clone(), svc, &slices, &self.labels, &mut warnings);
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
    use serde_json::json;

    fn service(ns: &str, name: &str, headless: bool) -> Service {
        let ip = if headless { "None" } else { "10.96.0.1" };
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"},
            "spec": {"clusterIP": ip},
        }))
        .unwrap()
    }

    fn slice(ns: &str, name: &str, svc: &str, eps: &[(&str, &str)]) -> EndpointSlice {
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
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns,
                "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn pod(ns: &str, name: &str, rv: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "resourceVersion": rv, "labels": labels},
        }))
        .unwrap()
    }

    fn key(ns: &str, name: &str) -> ServiceKey {
        ServiceKey::new(ns, name)
    }

    fn addrs(store: &ClusterStore, svc: &ServiceKey) -> Vec<String> {
        let spec = store.service_spec(svc).0.expect("service known");
        spec.endpoints.keys().map(|a| a.to_string()).collect()
    }

    #[test]
    fn slices_of_a_service_merge_and_each_change_names_its_service() {
        let mut store = ClusterStore::new();
        assert_eq!(
            store.apply_service(service("a", "db", true)),
            Affected::from([key("a", "db")])
        );
        // The same object again changes nothing.
        assert!(store.apply_service(service("a", "db", true)).is_empty());
        store.apply_service(service("a", "web", true));
        let touched = store.apply_slice(slice("a", "db-1", "db", &[("10.0.0.1", "db-0")]));
        assert_eq!(touched, Affected::from([key("a", "db")]));
        store.apply_slice(slice("a", "db-2", "db", &[("10.0.0.2", "db-1")]));
        store.apply_slice(slice("a", "web-1", "web", &[("10.0.1.1", "web-0")]));
        assert_eq!(addrs(&store, &key("a", "db")), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(
            store.delete_slice(&slice("a", "db-1", "db", &[])),
            Affected::from([key("a", "db")])
        );
        assert_eq!(addrs(&store, &key("a", "db")), ["10.0.0.2"]);
        // A slice whose service is unknown (yet) is kept for later.
        store.apply_slice(slice("a", "late-1", "late", &[("10.0.2.1", "late-0")]));
        store.apply_service(service("a", "late", true));
        assert_eq!(addrs(&store, &key("a", "late")), ["10.0.2.1"]);
        // Not headless: gone.
        assert_eq!(
            store.apply_service(service("a", "late", false)),
            Affected::from([key("a", "late")])
        );
        assert_eq!(store.service_spec(&key("a", "late")).0, None);
    }

    #[test]
    fn an_endpoint_moving_between_slices_never_leaves_the_plan() {
        let settings = PlanSettings {
            default_policy: Policy::Failover,
            cluster_domain: "cluster.local".into(),
            node_name: None,
            zone: None,
        };
        let mut ids = Ids::default();
        let mut store = ClusterStore::new();
        store.apply_service(service("a", "db", true));
        store.apply_slice(slice(
            "a",
            "s1",
            "db",
            &[("10.0.0.1", "db-0"), ("10.0.0.2", "db-1")],
        ));
        store.apply_slice(slice("a", "s2", "db", &[("10.0.0.3", "db-2")]));
        let plan = |store: &ClusterStore, ids: &mut Ids| {
            let spec = store.service_spec(&key("a", "db")).0.unwrap();
            plan_service(&spec, &settings, ids)
        };
        let before = plan(&store, &mut ids);
        // The controller adds db-1 to s2 first, then takes it out of s1:
        // every intermediate state plans the same entries.
        store.apply_slice(slice(
            "a",
            "s2",
            "db",
            &[("10.0.0.3", "db-2"), ("10.0.0.2", "db-1")],
        ));
        assert_eq!(plan(&store, &mut ids), before);
        store.apply_slice(slice("a", "s1", "db", &[("10.0.0.1", "db-0")]));
        assert_eq!(plan(&store, &mut ids), before);
    }

    #[test]
    fn pod_labels_affect_only_the_services_that_list_the_pod() {
        let mut store = ClusterStore::new();
        store.apply_service(service("a", "db", true));
        store.apply_service(service("a", "web", true));
        store.apply_slice(slice("a", "db-1", "db", &[("10.0.0.1", "db-0")]));
        store.apply_slice(slice("a", "web-1", "web", &[("10.0.1.1", "web-0")]));
        let drained = |store: &ClusterStore| {
            let spec = store.service_spec(&key("a", "db")).0.unwrap();
            spec.endpoints.values().next().unwrap().drained
        };
        // Watcher 0 selects the drain label, watcher 1 the weight label.
        let touched = store.apply_pod(
            0,
            &pod("a", "db-0", "5", json!({"headway.dev/drain": "true"})),
        );
        assert_eq!(touched, Affected::from([key("a", "db")]));
        assert!(drained(&store));
        // A pod no slice lists affects nothing.
        assert!(
            store
                .apply_pod(
                    0,
                    &pod("a", "lone", "6", json!({"headway.dev/drain": "true"}))
                )
                .is_empty()
        );
        // The drain label is replaced by a weight label: the weight
        // watcher's newer copy wins even before the drain watcher's delete.
        store.apply_pod(
            1,
            &pod("a", "db-0", "7", json!({"headway.dev/weight": "5"})),
        );
        assert!(!drained(&store));
        store.delete_pod(0, &pod("a", "db-0", "7", json!({})));
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
        store.apply_service(service("a", "db", true));
        store.apply_service(service("b", "db", true));
        let touched = store.replace_services(Some("a"), vec![]);
        assert_eq!(touched, Affected::from([key("a", "db")]));
        assert_eq!(store.service_count(), 1);
        store.apply_slice(slice("b", "s", "db", &[("10.0.0.1", "p")]));
        let touched = store.replace_slices(None, vec![]);
        assert_eq!(touched, Affected::from([key("b", "db")]));
        assert!(addrs(&store, &key("b", "db")).is_empty());
        let (state, _) = store.desired_state();
        assert_eq!(state.services.len(), 1);
    }
}
