//! The desired state: what the agent wants the BPF maps to say, computed from
//! Kubernetes objects by pure functions (no I/O, no clock, no randomness).
//!
//! [`desired_state`] keeps the headless Services, attaches the endpoints of
//! all their EndpointSlices and the drain/weight labels of their Pods, and
//! reports everything it had to ignore or default as [`Warning`]s instead of
//! failing: one bad object must never stop the rest of the cluster from being
//! served.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::{self as discovery, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Service annotation selecting the [`Policy`].
pub const ANNOTATION_POLICY: &str = "headway.dev/policy";
/// Service annotation selecting the [`Topology`].
pub const ANNOTATION_TOPOLOGY: &str = "headway.dev/topology";
/// Pod label that, when `"true"`, makes the pod ineligible for steering.
pub const LABEL_DRAIN: &str = "headway.dev/drain";
/// Pod label giving the pod's share under the `weighted` policy.
pub const LABEL_WEIGHT: &str = "headway.dev/weight";
/// Label linking an EndpointSlice to its Service (set by Kubernetes).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Weight of a pod without a (valid) [`LABEL_WEIGHT`].
pub const DEFAULT_WEIGHT: u32 = 100;
/// The Node label that names its zone (EndpointSlices copy it per endpoint).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Namespace of an object whose metadata names none (as `kubectl` assumes).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Label Kubernetes puts on the EndpointSlices of headless services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// A Service, by namespace and name. Displays as `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Pod, by namespace and name. Displays as `namespace/name`.
///
/// A pod's key is kept in several places (its slice's record, the store's
/// index of pods, the id table): the strings are shared, so a copy costs no
/// allocation (at 100,000 pods, two small strings per copy were ~16 MB).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl PodKey {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An annotation or flag value that names no known policy or topology.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "unknown policy {0:?} (expected one of observe, failover, random, least-connections, weighted)"
    )]
    Policy(String),
    #[error("unknown topology {0:?} (expected one of none, prefer-node, prefer-zone)")]
    Topology(String),
}

/// How connections resolved through the service-wide name are steered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Policy {
    /// Account only, never rewrite.
    Observe,
    /// Rewrite only when the chosen IP is not eligible.
    #[default]
    Failover,
    /// Uniform over eligible pods.
    Random,
    /// Power of two choices on this node's active connection counts.
    LeastConnections,
    /// Proportional to each pod's weight.
    Weighted,
}

impl Policy {
    /// Every policy, in declaration order.
    pub const ALL: [Policy; 5] = [
        Policy::Observe,
        Policy::Failover,
        Policy::Random,
        Policy::LeastConnections,
        Policy::Weighted,
    ];

    /// The annotation spelling, e.g. `least-connections`.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Observe => "observe",
            Policy::Failover => "failover",
            Policy::Random => "random",
            Policy::LeastConnections => "least-connections",
            Policy::Weighted => "weighted",
        }
    }
}

impl FromStr for Policy {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ParseError::Policy(s.to_owned()))
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether steering prefers pods close to the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Topology {
    /// Any eligible pod.
    #[default]
    None,
    /// Eligible pods on the client's node, when there is at least one.
    PreferNode,
    /// Eligible pods in the client's zone, when there is at least one.
    PreferZone,
}

impl Topology {
    /// Every topology, in declaration order.
    pub const ALL: [Topology; 3] = [Topology::None, Topology::PreferNode, Topology::PreferZone];

    /// The annotation spelling, e.g. `prefer-node`.
    pub fn as_str(self) -> &'static str {
        match self {
            Topology::None => "none",
            Topology::PreferNode => "prefer-node",
            Topology::PreferZone => "prefer-zone",
        }
    }
}

impl FromStr for Topology {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Topology::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| ParseError::Topology(s.to_owned()))
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port the service declares.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePort {
    /// The Service port's name.
    pub name: Option<String>,
    /// The port clients connect to on the pods: a headless service has no
    /// proxy, so this is the `targetPort` (a named one resolved through the
    /// EndpointSlices), or `port` when no `targetPort` is given.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// One headless Service and everything needed to steer to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub key: ServiceKey,
    /// From [`ANNOTATION_POLICY`]; `None` means the agent's default.
    pub policy: Option<Policy>,
    /// From [`ANNOTATION_TOPOLOGY`].
    pub topology: Topology,
    /// Declared ports, in declaration order; empty means "any port".
    pub ports: Vec<ServicePort>,
    /// `spec.publishNotReadyAddresses`.
    pub publish_not_ready: bool,
    /// Merged across all EndpointSlices of the service.
    pub endpoints: BTreeMap<IpAddr, Endpoint>,
}

impl ServiceSpec {
    /// The endpoints a steered connection may go to.
    pub fn eligible_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints
            .values()
            .filter(|e| e.is_eligible(self.publish_not_ready))
    }
}

/// One address of one EndpointSlice endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: IpAddr,
    /// From `targetRef` of kind Pod.
    pub pod: Option<PodKey>,
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Pod label [`LABEL_DRAIN`] is `"true"`.
    pub drained: bool,
    /// Pod label [`LABEL_WEIGHT`], default [`DEFAULT_WEIGHT`].
    pub weight: u32,
}

impl Endpoint {
    /// Eligible for steered connections: ready (or, when the service
    /// publishes not-ready addresses, merely present), not terminating, not
    /// drained.
    pub fn is_eligible(&self, publish_not_ready: bool) -> bool {
        (self.ready || publish_not_ready) && !self.terminating && !self.drained
    }
}

/// Everything the agent steers, keyed by service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<ServiceKey, ServiceSpec>,
}

/// Something in the input was ignored or defaulted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// Kind and `namespace/name`, e.g. `Service default/web`.
    pub object: String,
    pub message: String,
}

impl Warning {
    fn new(kind: &str, meta: &ObjectMeta, message: impl Into<String>) -> Self {
        let name = meta.name.as_deref().unwrap_or("<unnamed>");
        let object = format!("{kind} {}/{name}", namespace_of(meta));
        Self {
            object,
            message: message.into(),
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.message)
    }
}

/// Computes the desired state from a snapshot of the cluster.
///
/// The result depends only on the inputs' contents and order: when the same
/// Service or Pod appears twice, the first one counts. Warnings come in a
/// stable order: Pods by key, then each service by key (its annotations,
/// ports, then its slices by name).
pub fn desired_state(
    services: &[Service],
    slices: &[EndpointSlice],
    pods: &[Pod],
) -> (DesiredState, Vec<Warning>) {
    let mut warnings = Vec::new();
    let headless = headless_services(services, &mut warnings);
    let pods = pod_index(pods, &mut warnings);
    let mut by_service = slices_by_service(slices, &headless);
    let services = headless
        .into_iter()
        .filter_map(|(key, svc)| {
            // Always a record: `headless_services` kept headless ones only.
            let record = ServiceRecord::of(svc, &mut warnings)?;
            // Slice warnings after the service's own (annotations, ports).
            let mut slice_warnings = Vec::new();
            let slices: Vec<SliceRecord> = by_service
                .remove(&key)
                .unwrap_or_default()
                .into_iter()
                .map(|s| SliceRecord::of(s, &mut slice_warnings))
                .collect();
            let slices: Vec<&SliceRecord> = slices.iter().collect();
            let spec = service_spec(key.clone(), &record, &slices, &pods, &mut warnings);
            warnings.extend(slice_warnings);
            Some((key, spec))
        })
        .collect();
    (DesiredState { services }, warnings)
}

/// What headway reads of a headless Service. Sources keep this, not the
/// object: a Service's status, managedFields and other annotations are
/// never needed again, and a change to them is no change here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    /// From [`ANNOTATION_POLICY`]; `None` means the agent's default.
    pub policy: Option<Policy>,
    /// From [`ANNOTATION_TOPOLOGY`].
    pub topology: Topology,
    pub ports: Vec<DeclaredPort>,
    pub publish_not_ready: bool,
}

/// A port as the Service declares it (its target may be a name that the
/// EndpointSlices resolve).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredPort {
    pub name: Option<String>,
    pub port: i32,
    pub target_port: Option<IntOrString>,
    pub protocol: String,
}

impl ServiceRecord {
    /// The record of a Service; `None` if it is not headless. Bad
    /// annotations warn and fall back to the defaults.
    pub fn of(svc: &Service, warnings: &mut Vec<Warning>) -> Option<ServiceRecord> {
        if !is_headless(svc) {
            return None;
        }
        let spec = svc.spec.as_ref();
        let ports = spec
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|p| DeclaredPort {
                name: p.name.clone(),
                port: p.port,
                target_port: p.target_port.clone(),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
            })
            .collect();
        Some(ServiceRecord {
            policy: annotation(svc, ANNOTATION_POLICY, warnings),
            topology: annotation(svc, ANNOTATION_TOPOLOGY, warnings).unwrap_or_default(),
            ports,
            publish_not_ready: spec
                .and_then(|s| s.publish_not_ready_addresses)
                .unwrap_or(false),
        })
    }
}

/// What headway reads of an EndpointSlice: its service, its named ports
/// and one record per address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceRecord {
    /// From the [`LABEL_SERVICE_NAME`] label (same namespace).
    pub service: Option<String>,
    /// `(name, protocol, port)`, for Service ports with a named target.
    pub ports: Vec<(Option<String>, String, i32)>,
    pub endpoints: Vec<EndpointRecord>,
}

/// One address of an EndpointSlice endpoint: an [`Endpoint`] without what
/// the Pod's labels say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointRecord {
    pub addr: IpAddr,
    pub pod: Option<PodKey>,
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl SliceRecord {
    /// The record of a slice: FQDN slices and unparsable addresses yield
    /// no endpoints (the latter and unknown address types warn).
    pub fn of(slice: &EndpointSlice, warnings: &mut Vec<Warning>) -> SliceRecord {
        let ports = slice
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter_map(|p| {
                let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
                Some((p.name.clone(), protocol, p.port?))
            })
            .collect();
        SliceRecord {
            service: slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE_NAME))
                .cloned(),
            ports,
            endpoints: slice_endpoints(slice, warnings),
        }
    }

    /// The pods this slice's endpoints name.
    pub fn pods(&self) -> impl Iterator<Item = &PodKey> {
        self.endpoints.iter().filter_map(|e| e.pod.as_ref())
    }
}

/// The zone of node `node_name`, from its [`LABEL_ZONE`] label.
pub fn node_zone(nodes: &[Node], node_name: &str) -> Option<String> {
    nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name))
        .and_then(|n| n.metadata.labels.as_ref()?.get(LABEL_ZONE).cloned())
}

/// The object's namespace, or [`DEFAULT_NAMESPACE`].
pub fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
}

/// A headless Service has `clusterIP: None`; ExternalName services may
/// carry that too but have no endpoints of their own.
pub fn is_headless(svc: &Service) -> bool {
    svc.spec.as_ref().is_some_and(|spec| {
        spec.cluster_ip.as_deref() == Some("None") && spec.type_.as_deref() != Some("ExternalName")
    })
}

/// The headless services by key, sorted; later duplicates are dropped.
fn headless_services<'a>(
    services: &'a [Service],
    warnings: &mut Vec<Warning>,
) -> BTreeMap<ServiceKey, &'a Service> {
    let mut out = BTreeMap::new();
    for svc in services.iter().filter(|s| is_headless(s)) {
        let Some(name) = &svc.metadata.name else {
            warnings.push(Warning::new(
                "Service",
                &svc.metadata,
                "no metadata.name, ignored",
            ));
            continue;
        };
        let key = ServiceKey::new(namespace_of(&svc.metadata), name);
        if let Entry::Vacant(slot) = out.entry(key) {
            slot.insert(svc);
        } else {
            warnings.push(Warning::new(
                "Service",
                &svc.metadata,
                "duplicate object, ignored",
            ));
        }
    }
    out
}

/// The EndpointSlices of each known headless service, sorted by slice name
/// so that merging duplicates is deterministic.
fn slices_by_service<'a>(
    slices: &'a [EndpointSlice],
    headless: &BTreeMap<ServiceKey, &Service>,
) -> BTreeMap<ServiceKey, Vec<&'a EndpointSlice>> {
    let mut out: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        let labels = slice.metadata.labels.as_ref();
        let Some(service) = labels.and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
            continue;
        };
        let key = ServiceKey::new(namespace_of(&slice.metadata), service);
        if headless.contains_key(&key) {
            out.entry(key).or_default().push(slice);
        }
    }
    for list in out.values_mut() {
        // Stable sort: equal names keep their input order.
        list.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    out
}

/// One headless service's spec from its record, its EndpointSlices'
/// records (sorted by slice name) and the labels of the pods they name.
/// Both sources end up here: [`desired_state`] for a snapshot, the kube
/// store per service.
pub fn service_spec(
    key: ServiceKey,
    svc: &ServiceRecord,
    slices: &[&SliceRecord],
    pods: &BTreeMap<PodKey, PodLabels>,
    warnings: &mut Vec<Warning>,
) -> ServiceSpec {
    ServiceSpec {
        policy: svc.policy,
        topology: svc.topology,
        ports: service_ports(&key, svc, slices, warnings),
        publish_not_ready: svc.publish_not_ready,
        endpoints: merged_endpoints(slices, pods),
        key,
    }
}

/// Parses a Service annotation; absent → `None`, unknown → warning and `None`.
fn annotation<T>(svc: &Service, name: &str, warnings: &mut Vec<Warning>) -> Option<T>
where
    T: FromStr<Err = ParseError>,
{
    let value = svc.metadata.annotations.as_ref()?.get(name)?;
    match value.trim().parse() {
        Ok(parsed) => Some(parsed),
        Err(err) => {
            let message = format!("annotation {name}: {err}, using the default");
            warnings.push(Warning::new("Service", &svc.metadata, message));
            None
        }
    }
}

/// The declared ports as pod ports (see [`ServicePort::port`]), without
/// duplicates, in declaration order.
fn service_ports(
    key: &ServiceKey,
    svc: &ServiceRecord,
    slices: &[&SliceRecord],
    warnings: &mut Vec<Warning>,
) -> Vec<ServicePort> {
    let mut out: Vec<ServicePort> = Vec::new();
    for port in &svc.ports {
        for number in target_ports(port, slices) {
            let Some(number) = valid_port(number) else {
                warnings.push(Warning {
                    object: format!("Service {key}"),
                    message: format!("port {number} out of range, ignored"),
                });
                continue;
            };
            let entry = ServicePort {
                name: port.name.clone(),
                port: number,
                protocol: port.protocol.clone(),
            };
            if !out.contains(&entry) {
                out.push(entry);
            }
        }
    }
    out
}

/// The pod port numbers one Service port stands for. A named `targetPort`
/// may resolve to different numbers on different pods; the EndpointSlices
/// carry the resolved numbers under the Service port's name. With no slices
/// yet there is nothing to steer to, so an unresolved name yields nothing.
fn target_ports(port: &DeclaredPort, slices: &[&SliceRecord]) -> Vec<i32> {
    match &port.target_port {
        None => vec![port.port],
        Some(IntOrString::Int(n)) => vec![*n],
        Some(IntOrString::String(_)) => {
            let mut numbers: Vec<i32> = slices
                .iter()
                .flat_map(|s| &s.ports)
                .filter(|(name, protocol, _)| *name == port.name && *protocol == port.protocol)
                .map(|(_, _, number)| *number)
                .collect();
            numbers.sort_unstable();
            numbers.dedup();
            numbers
        }
    }
}

fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// What headway reads from a Pod's labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodLabels {
    pub drained: bool,
    pub weight: u32,
}

impl Default for PodLabels {
    fn default() -> Self {
        Self {
            drained: false,
            weight: DEFAULT_WEIGHT,
        }
    }
}

/// Pod labels by key. Warnings are raised here, once per Pod, rather than
/// per endpoint (a dual-stack pod appears in two slices), in key order.
fn pod_index(pods: &[Pod], warnings: &mut Vec<Warning>) -> BTreeMap<PodKey, PodLabels> {
    let mut metas = BTreeMap::new();
    for pod in pods {
        let Some(name) = &pod.metadata.name else {
            continue;
        };
        let key = PodKey::new(namespace_of(&pod.metadata), name.as_str());
        metas.entry(key).or_insert(&pod.metadata);
    }
    metas
        .into_iter()
        .map(|(key, meta)| (key, pod_labels(meta, warnings)))
        .collect()
}

/// What headway reads from one Pod's labels; bad values warn and default.
pub fn pod_labels(meta: &ObjectMeta, warnings: &mut Vec<Warning>) -> PodLabels {
    let mut out = PodLabels::default();
    let Some(labels) = &meta.labels else {
        return out;
    };
    match labels.get(LABEL_DRAIN).map(String::as_str) {
        None | Some("false") => {}
        Some("true") => out.drained = true,
        Some(other) => {
            let message =
                format!("label {LABEL_DRAIN}={other:?} is neither true nor false, not drained");
            warnings.push(Warning::new("Pod", meta, message));
        }
    }
    if let Some(value) = labels.get(LABEL_WEIGHT) {
        match value.parse::<u32>() {
            Ok(weight) => out.weight = weight,
            Err(_) => {
                let message = format!(
                    "label {LABEL_WEIGHT}={value:?} is not a non-negative integer, using {DEFAULT_WEIGHT}"
                );
                warnings.push(Warning::new("Pod", meta, message));
            }
        }
    }
    out
}

/// All addresses of all slices (already sorted by slice name). For an
/// address listed twice the first ready entry wins, else the first entry.
fn merged_endpoints(
    slices: &[&SliceRecord],
    pods: &BTreeMap<PodKey, PodLabels>,
) -> BTreeMap<IpAddr, Endpoint> {
    let mut out: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
    for record in slices.iter().flat_map(|s| &s.endpoints) {
        match out.entry(record.addr) {
            Entry::Vacant(slot) => {
                slot.insert(endpoint(record, pods));
            }
            Entry::Occupied(mut slot) if record.ready && !slot.get().ready => {
                slot.insert(endpoint(record, pods));
            }
            Entry::Occupied(_) => {}
        }
    }
    out
}

/// An endpoint record with its pod's labels applied.
pub fn endpoint(record: &EndpointRecord, pods: &BTreeMap<PodKey, PodLabels>) -> Endpoint {
    let labels = record
        .pod
        .as_ref()
        .and_then(|k| pods.get(k))
        .copied()
        .unwrap_or_default();
    Endpoint {
        addr: record.addr,
        pod: record.pod.clone(),
        hostname: record.hostname.clone(),
        node_name: record.node_name.clone(),
        zone: record.zone.clone(),
        ready: record.ready,
        serving: record.serving,
        terminating: record.terminating,
        drained: labels.drained,
        weight: labels.weight,
    }
}

/// One [`EndpointRecord`] per address of an IPv4 or IPv6 slice.
fn slice_endpoints(slice: &EndpointSlice, warnings: &mut Vec<Warning>) -> Vec<EndpointRecord> {
    match slice.address_type.as_str() {
        "IPv4" | "IPv6" => {}
        // FQDN slices name hosts, not addresses: nothing to steer to.
        "FQDN" => return Vec::new(),
        other => {
            let message = format!("unknown addressType {other:?}, ignored");
            warnings.push(Warning::new("EndpointSlice", &slice.metadata, message));
            return Vec::new();
        }
    }
    let namespace = namespace_of(&slice.metadata);
    let mut out = Vec::new();
    for ep in &slice.endpoints {
        let template = endpoint_template(namespace, ep);
        for address in &ep.addresses {
            match address.parse::<IpAddr>() {
                Ok(addr) => out.push(EndpointRecord {
                    addr,
                    ..template.clone()
                }),
                Err(_) => {
                    let message = format!("address {address:?} is not an IP address, ignored");
                    warnings.push(Warning::new("EndpointSlice", &slice.metadata, message));
                }
            }
        }
    }
    // Records are kept for as long as the slice exists: no spare capacity
    // (growing by doubling left ~40% of it unused, ~8 MB at 100,000).
    out.shrink_to_fit();
    out
}

/// Everything about an endpoint except its address.
fn endpoint_template(slice_namespace: &str, ep: &discovery::Endpoint) -> EndpointRecord {
    let pod = ep
        .target_ref
        .as_ref()
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .and_then(|r| {
            let namespace = r.namespace.as_deref().unwrap_or(slice_namespace);
            Some(PodKey::new(namespace, r.name.as_deref()?))
        });
    let conditions = ep.conditions.as_ref();
    // Kubernetes API semantics for unset conditions.
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    EndpointRecord {
        addr: IpAddr::from([0, 0, 0, 0]),
        pod,
        hostname: ep.hostname.clone(),
        node_name: ep.node_name.clone(),
        zone: ep.zone.clone(),
        ready,
        serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// A StatefulSet-style cluster: a headless `db` with three hostnamed
    /// pods in an IPv4 and an IPv6 slice, a ClusterIP `api` to be dropped,
    /// and a headless `web` whose endpoints are split over two slices.
    const CLUSTER: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: data
  annotations:
    headway.dev/policy: least-connections
    headway.dev/topology: prefer-zone
spec:
  clusterIP: None
  ipFamilies: [IPv4, IPv6]
  selector: {app: db}
  ports:
    - {name: pg, port: 5432}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-v4
  namespace: data
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports:
  - {name: pg, port: 5432, protocol: TCP}
endpoints:
  - addresses: [10.1.0.10]
    hostname: db-0
    nodeName: node-a
    zone: zone-1
    conditions: {ready: true, serving: true, terminating: false}
    targetRef: {kind: Pod, name: db-0, namespace: data}
  - addresses: [10.1.0.11]
    hostname: db-1
    nodeName: node-b
    zone: zone-2
    conditions: {ready: false, serving: true, terminating: true}
    targetRef: {kind: Pod, name: db-1}
  - addresses: [10.1.0.12]
    hostname: db-2
    nodeName: node-c
    zone: zone-3
    targetRef: {kind: Pod, name: db-2}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-v6
  namespace: data
  labels: {kubernetes.io/service-name: db}
addressType: IPv6
endpoints:
  - addresses: ["fd00::10"]
    hostname: db-0
    targetRef: {kind: Pod, name: db-0}
  - addresses: ["fd00::11"]
    hostname: db-1
    conditions: {ready: false}
    targetRef: {kind: Pod, name: db-1}
  - addresses: ["fd00::12"]
    hostname: db-2
    targetRef: {kind: Pod, name: db-2}
---
apiVersion: v1
kind: Pod
metadata:
  name: db-1
  namespace: data
  labels: {app: db, headway.dev/drain: "true"}
---
apiVersion: v1
kind: Pod
metadata:
  name: db-2
  namespace: data
  labels: {app: db, headway.dev/weight: "250"}
---
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-xyz
  labels: {kubernetes.io/service-name: api}
addressType: IPv4
endpoints:
  - addresses: [10.2.0.1]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  ports:
    - {name: http, port: 80, targetPort: web-http}
    - {name: metrics, port: 9090, targetPort: 9091, protocol: TCP}
    - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-b
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
  - {name: http, port: 8080, protocol: TCP}
endpoints:
  - addresses: [10.3.0.3]
    conditions: {ready: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
  - {name: http, port: 8080, protocol: TCP}
endpoints:
  - addresses: [10.3.0.1, 10.3.0.2]
    conditions: {ready: true, serving: true}
"#;

    /// Splits a multi-document YAML string into typed objects.
    fn parse(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>, Vec<Pod>) {
        let (mut services, mut slices, mut pods) = (Vec::new(), Vec::new(), Vec::new());
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value = serde_yaml_ng::Value::deserialize(doc).expect("valid YAML");
            match value["kind"].as_str().expect("kind") {
                "Service" => services.push(serde_yaml_ng::from_value(value).expect("Service")),
                "EndpointSlice" => slices.push(serde_yaml_ng::from_value(value).expect("slice")),
                "Pod" => pods.push(serde_yaml_ng::from_value(value).expect("Pod")),
                other => panic!("unexpected kind {other}"),
            }
        }
        (services, slices, pods)
    }

    fn state_of(yaml: &str) -> (DesiredState, Vec<Warning>) {
        let (services, slices, pods) = parse(yaml);
        desired_state(&services, &slices, &pods)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    fn service<'a>(state: &'a DesiredState, ns: &str, name: &str) -> &'a ServiceSpec {
        state
            .services
            .get(&ServiceKey::new(ns, name))
            .unwrap_or_else(|| panic!("{ns}/{name} missing"))
    }

    #[test]
    fn keeps_only_headless_services() {
        let (state, warnings) = state_of(CLUSTER);
        let keys: Vec<String> = state.services.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["data/db", "default/web"]);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(
            state
                .services
                .values()
                .all(|s| !s.endpoints.contains_key(&ip("10.2.0.1")))
        );
    }

    #[test]
    fn statefulset_endpoints_across_families() {
        let (state, _) = state_of(CLUSTER);
        let db = service(&state, "data", "db");
        assert_eq!(db.policy, Some(Policy::LeastConnections));
        assert_eq!(db.topology, Topology::PreferZone);
        assert!(!db.publish_not_ready);
        assert_eq!(
            db.ports,
            [ServicePort {
                name: Some("pg".into()),
                port: 5432,
                protocol: "TCP".into()
            }]
        );
        assert_eq!(db.endpoints.len(), 6);
        let db0 = &db.endpoints[&ip("10.1.0.10")];
        assert_eq!(db0.hostname.as_deref(), Some("db-0"));
        assert_eq!(db0.pod, Some(PodKey::new("data", "db-0")));
        assert_eq!(db0.node_name.as_deref(), Some("node-a"));
        assert_eq!(db0.zone.as_deref(), Some("zone-1"));
        assert_eq!(db0.weight, DEFAULT_WEIGHT);
        let db0_v6 = &db.endpoints[&ip("fd00::10")];
        assert_eq!(
            db0_v6.pod, db0.pod,
            "targetRef namespace defaults to the slice's"
        );
        assert_eq!(db0_v6.hostname.as_deref(), Some("db-0"));
    }

    #[test]
    fn conditions_follow_api_defaults() {
        let (state, _) = state_of(CLUSTER);
        let db = service(&state, "data", "db");
        let terminating = &db.endpoints[&ip("10.1.0.11")];
        assert_eq!(
            (
                terminating.ready,
                terminating.serving,
                terminating.terminating
            ),
            (false, true, true)
        );
        let unset = &db.endpoints[&ip("10.1.0.12")];
        assert_eq!(
            (unset.ready, unset.serving, unset.terminating),
            (true, true, false)
        );
        let not_ready = &db.endpoints[&ip("fd00::11")];
        assert_eq!(
            (not_ready.ready, not_ready.serving, not_ready.terminating),
            (false, false, false)
        );
    }

    #[test]
    fn pod_labels_drain_and_weight() {
        let (state, _) = state_of(CLUSTER);
        let db = service(&state, "data", "db");
        assert!(db.endpoints[&ip("10.1.0.11")].drained);
        assert!(db.endpoints[&ip("fd00::11")].drained);
        assert_eq!(db.endpoints[&ip("fd00::12")].weight, 250);
        let eligible: Vec<IpAddr> = db.eligible_endpoints().map(|e| e.addr).collect();
        assert_eq!(
            eligible,
            [
                ip("10.1.0.10"),
                ip("10.1.0.12"),
                ip("fd00::10"),
                ip("fd00::12")
            ]
        );
    }

    #[test]
    fn split_slices_and_publish_not_ready() {
        let (state, _) = state_of(CLUSTER);
        let web = service(&state, "default", "web");
        assert_eq!(web.policy, None);
        assert_eq!(web.topology, Topology::None);
        assert!(web.publish_not_ready);
        let addrs: Vec<IpAddr> = web.endpoints.keys().copied().collect();
        assert_eq!(addrs, [ip("10.3.0.1"), ip("10.3.0.2"), ip("10.3.0.3")]);
        // Not ready, but published: eligible.
        assert!(web.endpoints[&ip("10.3.0.3")].is_eligible(web.publish_not_ready));
        assert_eq!(web.eligible_endpoints().count(), 3);
    }

    #[test]
    fn ports_resolve_target_ports() {
        let (state, _) = state_of(CLUSTER);
        let ports: Vec<(Option<&str>, u16, &str)> = service(&state, "default", "web")
            .ports
            .iter()
            .map(|p| (p.name.as_deref(), p.port, p.protocol.as_str()))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("http"), 8080, "TCP"),
                (Some("metrics"), 9091, "TCP"),
                (Some("dns"), 53, "UDP")
            ]
        );
    }

    const DUPLICATES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: dup}
spec: {clusterIP: None}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dup-c, labels: {kubernetes.io/service-name: dup}}
addressType: IPv4
endpoints:
  - {addresses: [10.0.0.1], hostname: from-c, conditions: {ready: true}}
  - {addresses: [10.0.0.2], hostname: from-c, conditions: {ready: false}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dup-b, labels: {kubernetes.io/service-name: dup}}
addressType: IPv4
endpoints:
  - {addresses: [10.0.0.2], hostname: from-b, conditions: {ready: false}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dup-a, labels: {kubernetes.io/service-name: dup}}
addressType: IPv4
endpoints:
  - {addresses: [10.0.0.1], hostname: from-a, conditions: {ready: false}}
"#;

    #[test]
    fn duplicate_addresses_prefer_ready_then_slice_name() {
        let (state, _) = state_of(DUPLICATES);
        let dup = service(&state, "default", "dup");
        assert_eq!(
            dup.endpoints[&ip("10.0.0.1")].hostname.as_deref(),
            Some("from-c")
        );
        assert_eq!(
            dup.endpoints[&ip("10.0.0.2")].hostname.as_deref(),
            Some("from-b")
        );
    }

    #[test]
    fn result_does_not_depend_on_slice_or_service_order() {
        let (mut services, mut slices, mut pods) = parse(CLUSTER);
        let expected = desired_state(&services, &slices, &pods);
        services.reverse();
        slices.reverse();
        pods.reverse();
        assert_eq!(desired_state(&services, &slices, &pods), expected);
        let (_, mut slices, _) = parse(DUPLICATES);
        let (services, _, _) = parse(DUPLICATES);
        let expected = desired_state(&services, &slices, &[]);
        slices.rotate_left(1);
        assert_eq!(desired_state(&services, &slices, &[]), expected);
    }

    const BAD_VALUES: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: odd
  namespace: shop
  annotations: {headway.dev/policy: round-robin, headway.dev/topology: prefer-rack}
spec: {clusterIP: None}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com, clusterIP: None}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: odd-1, namespace: shop, labels: {kubernetes.io/service-name: odd}}
addressType: IPv4
endpoints:
  - addresses: [10.9.0.1, not-an-ip]
    targetRef: {kind: Pod, name: odd-0}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: odd-fqdn, namespace: shop, labels: {kubernetes.io/service-name: odd}}
addressType: FQDN
endpoints:
  - addresses: [db.example.com]
---
apiVersion: v1
kind: Pod
metadata:
  name: odd-0
  namespace: shop
  labels: {headway.dev/weight: heavy, headway.dev/drain: "yes"}
"#;

    #[test]
    fn bad_values_warn_and_fall_back() {
        let (state, warnings) = state_of(BAD_VALUES);
        let keys: Vec<String> = state.services.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["shop/odd"], "ExternalName is not headless");
        let odd = service(&state, "shop", "odd");
        assert_eq!((odd.policy, odd.topology), (None, Topology::None));
        let addrs: Vec<IpAddr> = odd.endpoints.keys().copied().collect();
        assert_eq!(
            addrs,
            [ip("10.9.0.1")],
            "bad IP skipped, FQDN slice ignored"
        );
        let endpoint = &odd.endpoints[&ip("10.9.0.1")];
        assert_eq!((endpoint.weight, endpoint.drained), (DEFAULT_WEIGHT, false));

        let objects: Vec<&str> = warnings.iter().map(|w| w.object.as_str()).collect();
        assert_eq!(
            objects,
            [
                "Pod shop/odd-0",
                "Pod shop/odd-0",
                "Service shop/odd",
                "Service shop/odd",
                "EndpointSlice shop/odd-1"
            ]
        );
        let text: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        assert!(text[0].contains("\"yes\""), "{text:?}");
        assert!(text[1].contains("heavy"), "{text:?}");
        assert!(
            text[2].starts_with("Service shop/odd: annotation headway.dev/policy"),
            "{text:?}"
        );
        assert!(text[2].contains("round-robin"), "{text:?}");
        assert!(text[3].contains("prefer-rack"), "{text:?}");
        assert!(text[4].contains("not-an-ip"), "{text:?}");
    }

    #[test]
    fn policy_and_topology_round_trip() {
        for policy in Policy::ALL {
            assert_eq!(policy.to_string().parse::<Policy>(), Ok(policy));
        }
        for topology in Topology::ALL {
            assert_eq!(topology.to_string().parse::<Topology>(), Ok(topology));
        }
        assert_eq!(Policy::default(), Policy::Failover);
        assert_eq!(Topology::default(), Topology::None);
        assert_eq!("least-connections".parse(), Ok(Policy::LeastConnections));
        assert_eq!("prefer-node".parse(), Ok(Topology::PreferNode));
        assert!("Failover".parse::<Policy>().is_err());
        assert!("zone".parse::<Topology>().is_err());
    }

    #[test]
    fn keys_display_and_order() {
        let a = ServiceKey::new("a", "z");
        let b = ServiceKey::new("b", "a");
        assert!(a < b);
        assert_eq!(a.to_string(), "a/z");
        assert_eq!(PodKey::new("ns", "p-0").to_string(), "ns/p-0");
    }

    #[test]
    fn eligibility() {
        let base = Endpoint {
            addr: ip("10.0.0.1"),
            pod: None,
            hostname: None,
            node_name: None,
            zone: None,
            ready: true,
            serving: true,
            terminating: false,
            drained: false,
            weight: DEFAULT_WEIGHT,
        };
        assert!(base.is_eligible(false));
        assert!(
            !Endpoint {
                ready: false,
                ..base.clone()
            }
            .is_eligible(false)
        );
        assert!(
            Endpoint {
                ready: false,
                ..base.clone()
            }
            .is_eligible(true)
        );
        assert!(
            !Endpoint {
                terminating: true,
                ..base.clone()
            }
            .is_eligible(true)
        );
        assert!(
            !Endpoint {
                drained: true,
                ..base
            }
            .is_eligible(true)
        );
    }
}
