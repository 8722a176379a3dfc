//! Desired state → the exact contents the pinned maps must hold. Pure: no
//! I/O, so the translation is unit-tested on its own and the writer only
//! has to apply a diff.
//!
//! Services and pods are known to the kernel by small numeric ids. Ids are
//! stable: they are recovered from the pinned maps when the agent starts, so
//! a restarted agent keeps writing counters under the same keys.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use headway_common::{
    AddrKey, Backend, BackendKey, EndpointState, NAMESPACE_LEN, NameEntry, POD_NAME_LEN, PodMeta,
    PodRef, SERVICE_NAME_LEN, ServiceEndpointKey, ServiceMeta, ServicePortKey, dns_name_hash,
    endpoint_flags, name_kind, policy, service_flags, topology,
};

use crate::{
    choice_table::{self, FamilyTables, Locality},
    model::{DesiredState, Endpoint, PodKey, Policy, ServiceKey, ServiceSpec, Topology},
};

/// Everything the agent owns in the maps (the kernel owns `pod_stats`).
/// `P` is what is kept of a pod's entry: the entry itself, or (in the
/// writer's mirror) a fingerprint of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapContents<P = PodMeta> {
    pub services: BTreeMap<u32, ServiceMeta>,
    pub pods: BTreeMap<u32, P>,
    pub pod_addrs: BTreeMap<AddrKey, PodRef>,
    pub svc_endpoints: BTreeMap<ServiceEndpointKey, EndpointState>,
    pub svc_backends: BTreeMap<BackendKey, Backend>,
    /// The ports each service declares (value unused).
    pub svc_ports: BTreeMap<ServicePortKey, u32>,
    /// name hash → service and kind of name.
    pub dns_names: BTreeMap<u64, NameEntry>,
}

impl<P> Default for MapContents<P> {
    fn default() -> Self {
        MapContents {
            services: BTreeMap::new(),
            pods: BTreeMap::new(),
            pod_addrs: BTreeMap::new(),
            svc_endpoints: BTreeMap::new(),
            svc_backends: BTreeMap::new(),
            svc_ports: BTreeMap::new(),
            dns_names: BTreeMap::new(),
        }
    }
}

/// What the plan needs besides the desired state.
#[derive(Debug, Clone)]
pub struct PlanSettings {
    pub default_policy: Policy,
    /// `cluster.local` unless the cluster says otherwise.
    pub cluster_domain: String,
    /// This agent's node, for `prefer-node` (none: nothing is preferred).
    pub node_name: Option<String>,
    /// This node's zone (label `topology.kubernetes.io/zone`), for
    /// `prefer-zone`.
    pub zone: Option<String>,
}

/// Id assignment for services and pods.
#[derive(Debug, Default, Clone)]
pub struct Ids {
    services: IdSpace<ServiceKey>,
    pods: IdSpace<PodKey>,
}

/// Small numeric ids for keys: the lowest free id ≥ 1 goes to a new key
/// (0 is never handed out, so a zeroed value can never be mistaken for a
/// real reference). Allocation and release are O(log n), which matters
/// with 65,536 pods. Both directions share one copy of each key (a pod
/// key is two strings: kept twice, 100,000 of them cost ~10 MB more).
#[derive(Debug, Clone)]
struct IdSpace<K> {
    by_key: BTreeMap<Arc<K>, u32>,
    by_id: BTreeMap<u32, Arc<K>>,
    /// Released ids below `next`.
    free: BTreeSet<u32>,
    next: u32,
}

impl<K> Default for IdSpace<K> {
    fn default() -> Self {
        IdSpace {
            by_key: BTreeMap::new(),
            by_id: BTreeMap::new(),
            free: BTreeSet::new(),
            next: 1,
        }
    }
}

impl<K: Ord + Clone> IdSpace<K> {
    fn recover(pairs: impl Iterator<Item = (K, u32)>) -> Self {
        let mut space = IdSpace::default();
        for (key, id) in pairs.filter(|(_, id)| *id != 0) {
            let key = Arc::new(key);
            space.by_key.insert(key.clone(), id);
            space.by_id.insert(id, key);
        }
        space.next = space.by_id.keys().next_back().map_or(1, |max| max + 1);
        space.free = (1..space.next)
            .filter(|id| !space.by_id.contains_key(id))
            .collect();
        space
    }

    fn get_or_assign(&mut self, key: &K) -> u32 {
        if let Some(id) = self.by_key.get(key) {
            return *id;
        }
        let id = self.free.pop_first().unwrap_or_else(|| {
            let id = self.next;
            self.next = self.next.saturating_add(1);
            id
        });
        let key = Arc::new(key.clone());
        self.by_key.insert(key.clone(), id);
        self.by_id.insert(id, key);
        id
    }

    fn release(&mut self, id: u32) {
        if let Some(key) = self.by_id.remove(&id) {
            self.by_key.remove(&key);
            self.free.insert(id);
        }
    }

    fn retain(&mut self, keep: impl Fn(&u32, &K) -> bool) {
        let gone: Vec<u32> = self
            .by_id
            .iter()
            .filter(|(id, k)| !keep(id, k.as_ref()))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.release(id);
        }
    }
}

impl Ids {
    /// Recovers the ids already in use from what the maps hold.
    pub fn from_contents(contents: &MapContents) -> Ids {
        let services = contents.services.iter().map(|(id, meta)| {
            let key = ServiceKey {
                namespace: decode_name(&meta.namespace),
                name: decode_name(&meta.name),
            };
            (key, *id)
        });
        let pods = contents.pods.iter().map(|(id, meta)| {
            let key = PodKey::new(decode_name(&meta.namespace), decode_name(&meta.name));
            (key, *id)
        });
        Ids {
            services: IdSpace::recover(services),
            pods: IdSpace::recover(pods),
        }
    }

    /// Forgets ids of objects that no longer exist, so they can be reused.
    fn retain(&mut self, services: &BTreeSet<&ServiceKey>, pods: &BTreeSet<PodKey>) {
        self.services.retain(|_, k| services.contains(k));
        self.pods.retain(|_, k| pods.contains(k));
    }

    /// The service's id, assigning one if it has none.
    pub fn service(&mut self, key: &ServiceKey) -> u32 {
        self.services.get_or_assign(key)
    }

    /// The service's id, if it has one.
    pub fn service_id(&self, key: &ServiceKey) -> Option<u32> {
        self.services.by_key.get(key).copied()
    }

    fn pod(&mut self, key: &PodKey) -> u32 {
        self.pods.get_or_assign(key)
    }

    /// Frees a service id (its service is gone from the maps).
    pub fn release_service(&mut self, id: u32) {
        self.services.release(id);
    }

    /// The service an id stands for.
    pub fn service_key(&self, id: u32) -> Option<&ServiceKey> {
        self.services.by_id.get(&id).map(Arc::as_ref)
    }

    /// The pod an id stands for.
    pub fn pod_key(&self, id: u32) -> Option<&PodKey> {
        self.pods.by_id.get(&id).map(Arc::as_ref)
    }

    /// Frees a pod id (no service refers to the pod any more).
    pub fn release_pod(&mut self, id: u32) {
        self.pods.release(id);
    }

    /// Frees every service and pod id for which the predicates say no.
    pub fn retain_ids(
        &mut self,
        keep_service: impl Fn(u32) -> bool,
        keep_pod: impl Fn(u32) -> bool,
    ) {
        self.services.retain(|id, _| keep_service(*id));
        self.pods.retain(|id, _| keep_pod(*id));
    }
}

impl<P> MapContents<P> {
    /// Adds `other`'s entries; where both have a key, the entry already
    /// here stays.
    pub fn merge(&mut self, other: MapContents<P>) {
        fn keep_first<K: Ord, V>(into: &mut BTreeMap<K, V>, from: BTreeMap<K, V>) {
            for (k, v) in from {
                into.entry(k).or_insert(v);
            }
        }
        keep_first(&mut self.services, other.services);
        keep_first(&mut self.pods, other.pods);
        keep_first(&mut self.pod_addrs, other.pod_addrs);
        keep_first(&mut self.svc_endpoints, other.svc_endpoints);
        keep_first(&mut self.svc_backends, other.svc_backends);
        keep_first(&mut self.svc_ports, other.svc_ports);
        keep_first(&mut self.dns_names, other.dns_names);
    }

    /// Number of entries over all maps.
    pub fn len(&self) -> usize {
        self.services.len()
            + self.pods.len()
            + self.pod_addrs.len()
            + self.svc_endpoints.len()
            + self.svc_backends.len()
            + self.svc_ports.len()
            + self.dns_names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Computes the map contents for `desired`, assigning ids through `ids`.
/// The same as planning each service on its own ([`plan_service`]) and
/// merging in service-id order (the lower id wins an address or name two
/// services claim), which is what the incremental writer ends up with.
pub fn plan(desired: &DesiredState, settings: &PlanSettings, ids: &mut Ids) -> MapContents {
    let live_services: BTreeSet<&ServiceKey> = desired.services.keys().collect();
    let live_pods: BTreeSet<PodKey> = desired
        .services
        .values()
        .flat_map(|svc| svc.endpoints.values().map(|ep| pod_key(&svc.key, ep)))
        .collect();
    ids.retain(&live_services, &live_pods);

    let mut fragments: BTreeMap<u32, MapContents> = BTreeMap::new();
    for svc in desired.services.values() {
        let fragment = plan_service(svc, settings, ids);
        fragments.insert(ids.service(&svc.key), fragment);
    }
    let mut out = MapContents::default();
    for fragment in fragments.into_values() {
        out.merge(fragment);
    }
    out
}

/// The map entries one service wants, assigning ids through `ids`. Its
/// `pods`, `pod_addrs` and `dns_names` entries may be shared with other
/// services; the other maps' keys carry this service's id.
pub fn plan_service(svc: &ServiceSpec, settings: &PlanSettings, ids: &mut Ids) -> MapContents {
    let locality = Locality {
        node_name: settings.node_name.clone(),
        zone: settings.zone.clone(),
    };
    let mut out = MapContents::default();
    let service_id = ids.service(&svc.key);
    let policy = svc.policy.unwrap_or(settings.default_policy);
    let pod_ids: BTreeMap<IpAddr, u32> = svc
        .endpoints
        .values()
        .map(|ep| (ep.addr, ids.pod(&pod_key(&svc.key, ep))))
        .collect();
    let (v4, v6) = choice_table::tables(svc, policy, &locality);
    let (backends_v4, preferred_v4) =
        plan_backends(service_id, 4, &v4, &pod_ids, &mut out.svc_backends);
    let (backends_v6, preferred_v6) =
        plan_backends(service_id, 6, &v6, &pod_ids, &mut out.svc_backends);
    let ports_declared = plan_ports(svc, service_id, &mut out.svc_ports);
    out.services.insert(
        service_id,
        ServiceMeta {
            namespace: encode_name::<NAMESPACE_LEN>(&svc.key.namespace),
            name: encode_name::<SERVICE_NAME_LEN>(&svc.key.name),
            policy: policy_value(policy),
            topology: topology_value(svc.topology),
            backends_v4,
            backends_v6,
            preferred_v4,
            preferred_v6,
            flags: if ports_declared {
                service_flags::PORTS_DECLARED
            } else {
                0
            },
            _pad: 0,
        },
    );
    plan_names(
        svc,
        service_id,
        &settings.cluster_domain,
        &mut out.dns_names,
    );
    for ep in svc.endpoints.values() {
        let pod = pod_key(&svc.key, ep);
        let pod_id = pod_ids[&ep.addr];
        out.pods.insert(
            pod_id,
            PodMeta {
                namespace: encode_name::<NAMESPACE_LEN>(&pod.namespace),
                name: encode_name::<POD_NAME_LEN>(&pod.name),
            },
        );
        let addr = addr_key(ep.addr);
        // An address belongs to one pod at a time; if two services
        // disagree (a stale slice), the lower service id wins (merge).
        out.pod_addrs
            .entry(addr)
            .or_insert(PodRef { pod_id, _pad: 0 });
        out.svc_endpoints.insert(
            ServiceEndpointKey {
                service_id,
                _pad: 0,
                addr,
            },
            EndpointState {
                pod_id,
                flags: endpoint_state_flags(ep, svc.publish_not_ready),
            },
        );
    }
    out
}

/// The pod an endpoint stands for: its targetRef, or its address when the
/// slice names no pod (hand-made slices).
pub fn pod_key(service: &ServiceKey, ep: &Endpoint) -> PodKey {
    ep.pod
        .clone()
        .unwrap_or_else(|| PodKey::new(service.namespace.as_str(), ep.addr.to_string()))
}

pub fn addr_key(addr: IpAddr) -> AddrKey {
    match addr {
        IpAddr::V4(v4) => AddrKey::from_octets(v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => AddrKey::from_octets(v6.octets()),
    }
}

/// The address a key stands for (IPv4-mapped keys come back as IPv4).
pub fn key_addr(key: &AddrKey) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(key.octets());
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Writes one family's choice tables into `svc_backends`: the table over
/// all eligible pods in slots `0..all`, the preferred one right after it.
/// Returns the two slot counts.
fn plan_backends(
    service_id: u32,
    family: u32,
    tables: &FamilyTables<'_>,
    pod_ids: &BTreeMap<IpAddr, u32>,
    out: &mut BTreeMap<BackendKey, Backend>,
) -> (u32, u32) {
    let slots = tables.all.iter().chain(&tables.preferred);
    for (slot, ep) in (0u32..).zip(slots) {
        let key = BackendKey {
            service_id,
            family,
            slot,
        };
        let backend = Backend {
            addr: addr_key(ep.addr),
            pod_id: pod_ids[&ep.addr],
            _pad: 0,
        };
        out.insert(key, backend);
    }
    (tables.all.len() as u32, tables.preferred.len() as u32)
}

/// Writes the ports the service declares into `svc_ports`. Returns whether
/// it declares any (then only those are steered).
fn plan_ports(svc: &ServiceSpec, service_id: u32, out: &mut BTreeMap<ServicePortKey, u32>) -> bool {
    for port in &svc.ports {
        let protocol = match port.protocol.as_str() {
            "UDP" => 17,
            "SCTP" => 132,
            _ => 6,
        };
        let key = ServicePortKey {
            service_id,
            port: port.port,
            protocol,
            _pad: 0,
        };
        out.insert(key, 0);
    }
    !svc.ports.is_empty()
}

/// The names CoreDNS serves for a headless service: the service-wide name,
/// and per endpoint its hostname or, without one, its dashed address.
fn plan_names(
    svc: &ServiceSpec,
    service_id: u32,
    domain: &str,
    out: &mut BTreeMap<u64, NameEntry>,
) {
    let service_name = format!("{}.{}.svc.{}", svc.key.name, svc.key.namespace, domain);
    let mut add = |name: &str, kind: u32| {
        if let Some(hash) = dns_name_hash(name) {
            // On a (64-bit) collision the first name keeps the slot.
            out.entry(hash).or_insert(NameEntry { service_id, kind });
        }
    };
    add(&service_name, name_kind::SERVICE);
    for ep in svc.endpoints.values() {
        let label = match &ep.hostname {
            Some(hostname) => hostname.clone(),
            None => dashed_addr(ep.addr),
        };
        add(&format!("{label}.{service_name}"), name_kind::POD);
    }
}

/// `10.0.0.1` → `10-0-0-1`, `fd00::1` → `fd00--1`, as CoreDNS names
/// endpoints without a hostname.
pub fn dashed_addr(addr: IpAddr) -> String {
    addr.to_string().replace(['.', ':'], "-")
}

fn endpoint_state_flags(ep: &Endpoint, publish_not_ready: bool) -> u32 {
    let mut flags = 0;
    if ep.is_eligible(publish_not_ready) {
        flags |= endpoint_flags::ELIGIBLE;
    }
    if ep.ready {
        flags |= endpoint_flags::READY;
    }
    if ep.serving {
        flags |= endpoint_flags::SERVING;
    }
    if ep.terminating {
        flags |= endpoint_flags::TERMINATING;
    }
    if ep.drained {
        flags |= endpoint_flags::DRAINED;
    }
    flags
}

pub fn policy_value(p: Policy) -> u32 {
    match p {
        Policy::Observe => policy::OBSERVE,
        Policy::Failover => policy::FAILOVER,
        Policy::Random => policy::RANDOM,
        Policy::LeastConnections => policy::LEAST_CONNECTIONS,
        Policy::Weighted => policy::WEIGHTED,
    }
}

pub fn policy_from_value(v: u32) -> Option<Policy> {
    Some(match v {
        policy::OBSERVE => Policy::Observe,
        policy::FAILOVER => Policy::Failover,
        policy::RANDOM => Policy::Random,
        policy::LEAST_CONNECTIONS => Policy::LeastConnections,
        policy::WEIGHTED => Policy::Weighted,
        _ => return None,
    })
}

pub fn topology_value(t: Topology) -> u32 {
    match t {
        Topology::None => topology::NONE,
        Topology::PreferNode => topology::PREFER_NODE,
        Topology::PreferZone => topology::PREFER_ZONE,
    }
}

pub fn topology_from_value(v: u32) -> Option<Topology> {
    Some(match v {
        topology::NONE => Topology::None,
        topology::PREFER_NODE => Topology::PreferNode,
        topology::PREFER_ZONE => Topology::PreferZone,
        _ => return None,
    })
}

/// NUL-padded, truncated at a character boundary when too long.
pub fn encode_name<const N: usize>(name: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut end = name.len().min(N);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&name.as_bytes()[..end]);
    out
}

pub fn decode_name(raw: &[u8]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(policy: Policy) -> PlanSettings {
        PlanSettings {
            default_policy: policy,
            cluster_domain: "cluster.local".into(),
            node_name: None,
            zone: None,
        }
    }

    fn endpoint(addr: &str, pod: Option<&str>, ready: bool) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            pod: pod.map(|name| PodKey {
                namespace: "db".into(),
                name: name.into(),
            }),
            hostname: None,
            node_name: None,
            zone: None,
            ready,
            serving: ready,
            terminating: false,
            drained: false,
            weight: 100,
        }
    }

    fn service(name: &str, endpoints: Vec<Endpoint>) -> ServiceSpec {
        ServiceSpec {
            key: ServiceKey {
                namespace: "db".into(),
                name: name.into(),
            },
            policy: None,
            topology: Topology::None,
            ports: vec![],
            publish_not_ready: false,
            endpoints: endpoints.into_iter().map(|e| (e.addr, e)).collect(),
        }
    }

    fn state(services: Vec<ServiceSpec>) -> DesiredState {
        DesiredState {
            services: services.into_iter().map(|s| (s.key.clone(), s)).collect(),
        }
    }

    #[test]
    fn dual_stack_pod_gets_one_id_and_two_addresses() {
        let desired = state(vec![service(
            "pg",
            vec![
                endpoint("10.0.0.1", Some("pg-0"), true),
                endpoint("fd00::1", Some("pg-0"), true),
                endpoint("10.0.0.2", Some("pg-1"), false),
            ],
        )]);
        let plan = plan(&desired, &settings(Policy::Failover), &mut Ids::default());
        assert_eq!(plan.services.len(), 1);
        assert_eq!(plan.pods.len(), 2);
        assert_eq!(plan.pod_addrs.len(), 3);
        let id_of = |a: &str| plan.pod_addrs[&addr_key(a.parse().unwrap())].pod_id;
        assert_eq!(id_of("10.0.0.1"), id_of("fd00::1"));
        assert_ne!(id_of("10.0.0.1"), id_of("10.0.0.2"));
        let not_ready = plan
            .svc_endpoints
            .iter()
            .find(|(k, _)| k.addr == addr_key("10.0.0.2".parse().unwrap()))
            .unwrap()
            .1;
        assert_eq!(not_ready.flags & endpoint_flags::READY, 0);
        assert_eq!(
            plan.services.values().next().unwrap().policy,
            policy::FAILOVER
        );
    }

    #[test]
    fn ids_survive_a_restart_and_freed_ids_are_reused() {
        let first = state(vec![service(
            "pg",
            vec![
                endpoint("10.0.0.1", Some("pg-0"), true),
                endpoint("10.0.0.2", Some("pg-1"), true),
            ],
        )]);
        let contents = plan(&first, &settings(Policy::Failover), &mut Ids::default());

        // A new agent recovers the ids from the maps and plans the same.
        let mut recovered = Ids::from_contents(&contents);
        assert_eq!(
            plan(&first, &settings(Policy::Failover), &mut recovered),
            contents
        );

        // pg-0 goes away, pg-2 arrives: pg-1 keeps its id, pg-2 takes pg-0's.
        let second = state(vec![service(
            "pg",
            vec![
                endpoint("10.0.0.2", Some("pg-1"), true),
                endpoint("10.0.0.3", Some("pg-2"), true),
            ],
        )]);
        let after = plan(&second, &settings(Policy::Failover), &mut recovered);
        let id = |c: &MapContents, a: &str| c.pod_addrs[&addr_key(a.parse().unwrap())].pod_id;
        assert_eq!(id(&after, "10.0.0.2"), id(&contents, "10.0.0.2"));
        assert_eq!(id(&after, "10.0.0.3"), id(&contents, "10.0.0.1"));
    }

    #[test]
    fn endpoint_without_pod_is_its_own_pod() {
        let desired = state(vec![service("raw", vec![endpoint("10.0.0.9", None, true)])]);
        let plan = plan(&desired, &settings(Policy::Observe), &mut Ids::default());
        let meta = plan.pods.values().next().unwrap();
        assert_eq!(decode_name(&meta.name), "10.0.0.9");
        assert_eq!(
            plan.services.values().next().unwrap().policy,
            policy::OBSERVE
        );
    }

    #[test]
    fn eligible_pods_fill_backend_slots_per_family_and_names_match_coredns() {
        let mut with_host = endpoint("10.0.0.1", Some("pg-0"), true);
        with_host.hostname = Some("pg-0".into());
        let desired = state(vec![service(
            "pg",
            vec![
                with_host,
                endpoint("10.0.0.2", Some("pg-1"), false), // not ready: no slot
                endpoint("10.0.0.3", Some("pg-2"), true),
                endpoint("fd00::1", Some("pg-0"), true),
            ],
        )]);
        let plan = plan(&desired, &settings(Policy::Failover), &mut Ids::default());
        let meta = plan.services.values().next().unwrap();
        assert_eq!((meta.backends_v4, meta.backends_v6), (2, 1));
        let slots: Vec<(u32, u32, IpAddr)> = plan
            .svc_backends
            .iter()
            .map(|(k, b)| (k.family, k.slot, key_addr(&b.addr)))
            .collect();
        assert_eq!(
            slots,
            [
                (4, 0, "10.0.0.1".parse().unwrap()),
                (4, 1, "10.0.0.3".parse().unwrap()),
                (6, 0, "fd00::1".parse().unwrap()),
            ]
        );
        let kind = |name: &str| {
            plan.dns_names
                .get(&dns_name_hash(name).unwrap())
                .map(|e| e.kind)
        };
        assert_eq!(kind("pg.db.svc.cluster.local"), Some(name_kind::SERVICE));
        assert_eq!(kind("PG-0.pg.db.svc.cluster.local"), Some(name_kind::POD));
        assert_eq!(
            kind("10-0-0-2.pg.db.svc.cluster.local"),
            Some(name_kind::POD)
        );
        assert_eq!(
            kind("fd00--1.pg.db.svc.cluster.local"),
            Some(name_kind::POD)
        );
        assert_eq!(kind("pg.db.svc.cluster.example"), None);
        let flags = |a: &str| {
            plan.svc_endpoints
                .iter()
                .find(|(k, _)| k.addr == addr_key(a.parse().unwrap()))
                .unwrap()
                .1
                .flags
        };
        assert_ne!(flags("10.0.0.1") & endpoint_flags::ELIGIBLE, 0);
        assert_eq!(flags("10.0.0.2") & endpoint_flags::ELIGIBLE, 0);
    }

    #[test]
    fn names_round_trip_and_truncate_on_char_boundary() {
        assert_eq!(decode_name(&encode_name::<8>("web")), "web");
        let long = "é".repeat(10); // 20 bytes
        assert_eq!(decode_name(&encode_name::<7>(&long)), "ééé");
    }

    #[test]
    fn addresses_round_trip_both_families() {
        for a in ["10.1.2.3", "fd00::7", "::ffff:10.1.2.3"] {
            let ip: IpAddr = a.parse().unwrap();
            let back = key_addr(&addr_key(ip));
            // A v4-mapped IPv6 address is the same key as the IPv4 one.
            assert_eq!(addr_key(back), addr_key(ip));
        }
        assert_eq!(
            key_addr(&addr_key("10.1.2.3".parse().unwrap())),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }
}
