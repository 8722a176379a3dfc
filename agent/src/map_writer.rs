//! Puts planned map entries into the pinned maps, one service at a time
//! (in a first sync, a batch of new services at a time), writing only
//! what differs from what the maps hold.
//!
//! Each service's wanted entries (its *fragment*, from
//! [`crate::map_plan::plan_service`]) are kept, so a change to one service
//! touches only that service's keys. `pods`, `pod_addrs` and `dns_names`
//! may be wanted by several services: every service *claims* its keys, the
//! lowest service id's value is the one written, and an entry goes only
//! when its last claim does (a pod shared by two services stays while
//! either lists it).
//!
//! Order keeps the datapath consistent at every step: metadata and
//! counters first, then the entries the kernel looks up; removals go the
//! other way round.
use std::{
    collections::{BTreeMap, BTreeSet},
    hash::Hash,
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use std::os::fd::{AsFd, BorrowedFd};

use aya::maps::{Array, HashMap, IterableMap, Map, MapData, MapError};
use headway_common::{
    AddrKey, Backend, BackendKey, Config, EndpointState, NameEntry, PodCounters, PodMeta, PodRef,
    ServiceCounters, ServiceEndpointKey, ServiceMeta, ServicePortKey, ServiceSteering,
    endpoint_flags, map_names,
};

use crate::{
    addr_table::AddrTable,
    bpf_sys::{self, BatchError},
    dns_index::{DnsIndex, DnsJob, DnsMaps},
    generation::Generation,
    map_plan::MapContents,
    pinned::Maps,
    service_steering,
};

/// A `PodCounters::generation` no slot had before: the wall clock in ns
/// (it moves on between agent runs), and past the last one this process
/// handed out. Never zero.
fn new_generation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let previous = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or_default();
    now.max(previous + 1)
}

#[derive(Debug, thiserror::Error)]
#[error("cannot {op} an entry of map {map}: {source}")]
pub struct WriteError {
    pub op: &'static str,
    pub map: &'static str,
    /// The object whose entry it was (`Service ns/name`), when known.
    pub object: Option<String>,
    #[source]
    pub source: Box<MapError>,
}

impl WriteError {
    /// The map had no room for a new key (the kernel says E2BIG), or an
    /// id lies beyond an array map's end. Entries already in the map are
    /// unaffected and still updatable.
    pub fn is_full(&self) -> bool {
        match &*self.source {
            MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::E2BIG),
            MapError::OutOfBounds { .. } => true,
            _ => false,
        }
    }
}

/// How many entries one write changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteSummary {
    pub upserted: usize,
    pub removed: usize,
    /// Entries that could not be written (full map, kernel error); each is
    /// also reported in `errors`. The rest of the write still went through.
    pub failed: usize,
}

impl std::ops::AddAssign for WriteSummary {
    fn add_assign(&mut self, other: WriteSummary) {
        self.upserted += other.upserted;
        self.removed += other.removed;
        self.failed += other.failed;
    }
}

/// What one write did.
#[derive(Debug, Default)]
pub struct Written {
    pub summary: WriteSummary,
    pub errors: Vec<WriteError>,
    /// Pod ids no service claims any more (their ids may be reused).
    pub unclaimed_pods: Vec<u32>,
}

/// The services that want a key, with their values, sorted by service id.
/// One owner (the common case) costs no allocation of its own.
enum Owners<V> {
    One([(u32, V); 1]),
    Many(Vec<(u32, V)>),
}

impl<V> Owners<V> {
    fn as_slice(&self) -> &[(u32, V)] {
        match self {
            Owners::One(one) => one,
            Owners::Many(list) => list,
        }
    }
}

/// Which services want a key, and with which value. Never walked in
/// order, so a hash map: a first sync claims ~300,000 keys, and each
/// write looks every key it touches up again.
struct Claims<K, V>(std::collections::HashMap<K, Owners<V>>);

impl<K, V> Default for Claims<K, V> {
    fn default() -> Self {
        Claims(std::collections::HashMap::new())
    }
}

impl<K: Hash + Ord + Copy, V: Copy> Claims<K, V> {
    fn set(&mut self, key: K, owner: u32, value: V) {
        // One lookup for the common case of a single owner.
        let owners = match self.0.entry(key) {
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(Owners::One([(owner, value)]));
                return;
            }
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
        };
        let mut list = match std::mem::replace(owners, Owners::Many(Vec::new())) {
            Owners::One(one) => one.to_vec(),
            Owners::Many(list) => list,
        };
        match list.binary_search_by_key(&owner, |(o, _)| *o) {
            Ok(i) => list[i].1 = value,
            Err(i) => list.insert(i, (owner, value)),
        }
        *owners = match list.as_slice() {
            [one] => Owners::One([*one]),
            _ => Owners::Many(list),
        };
    }

    fn release(&mut self, key: &K, owner: u32) {
        let Some(owners) = self.0.get_mut(key) else {
            return;
        };
        let rest: Vec<(u32, V)> = owners
            .as_slice()
            .iter()
            .filter(|(o, _)| *o != owner)
            .copied()
            .collect();
        match rest.as_slice() {
            [] => {
                self.0.remove(key);
            }
            [one] => *owners = Owners::One([*one]),
            _ => *owners = Owners::Many(rest),
        }
    }

    fn winner(&self, key: &K) -> Option<V> {
        self.0.get(key).map(|o| o.as_slice()[0].1)
    }

    fn owners(&self, key: &K) -> &[(u32, V)] {
        self.0.get(key).map_or(&[], Owners::as_slice)
    }

    /// Moves `owner`'s claims from the keys `old` to the entries `new`;
    /// returns every key either mentions.
    fn replace<'a>(
        &mut self,
        owner: u32,
        old: impl Iterator<Item = &'a K>,
        new: impl Iterator<Item = (K, V)> + Clone,
    ) -> BTreeSet<K>
    where
        K: 'a,
    {
        // The keys of `old` are distinct: one that `touched` holds before
        // it is added is wanted.
        let mut touched: BTreeSet<K> = new.clone().map(|(k, _)| k).collect();
        for k in old {
            if touched.insert(*k) {
                self.release(k, owner);
            }
        }
        for (k, v) in new {
            self.set(k, owner, v);
        }
        touched
    }
}

#[derive(Default)]
struct SharedClaims {
    /// A pod's entry is the same whichever service lists it (it names
    /// the pod): only who claims it is kept.
    pods: Claims<u32, ()>,
    pod_addrs: Claims<AddrKey, PodRef>,
    dns_names: Claims<u64, NameEntry>,
}

/// One service's entries, as sorted slices: a map per service and kind of
/// entry would cost a tree node each, and pods' entries (192 bytes of
/// names) are only needed while writing.
///
/// The shared kinds (`pods`, `pod_addrs`, `dns_names`) say what the
/// service last asked for (its claims). The kinds keyed by its id say what
/// the maps hold for it: they are the writer's mirror of those entries
/// (a second copy in one big tree per map cost ~15 MB at 10,000 services),
/// so a write the kernel refused leaves the old value here.
#[derive(Default)]
struct Fragment {
    services: Box<[(u32, ServiceMeta)]>,
    pods: Box<[u32]>,
    pod_addrs: Box<[(AddrKey, PodRef)]>,
    svc_endpoints: Box<[(ServiceEndpointKey, EndpointState)]>,
    svc_backends: Box<[(BackendKey, Backend)]>,
    svc_ports: Box<[(ServicePortKey, u32)]>,
    dns_names: Box<[(u64, NameEntry)]>,
}

impl Fragment {
    /// From what the service asked for (`wanted`) and what the maps now
    /// hold for its own keys (`held`).
    fn of<P>(wanted: &MapContents, held: &MapContents<P>) -> Fragment {
        fn pairs<K: Copy, V: Copy>(m: &BTreeMap<K, V>) -> Box<[(K, V)]> {
            m.iter().map(|(k, v)| (*k, *v)).collect()
        }
        Fragment {
            services: pairs(&held.services),
            pods: wanted.pods.keys().copied().collect(),
            pod_addrs: pairs(&wanted.pod_addrs),
            svc_endpoints: pairs(&held.svc_endpoints),
            svc_backends: pairs(&held.svc_backends),
            svc_ports: pairs(&held.svc_ports),
            dns_names: pairs(&wanted.dns_names),
        }
    }
}

/// What the maps hold for `keys`: the fragment's entry where it has one,
/// else an entry no fragment describes (`loose`).
fn held<K: Ord + Copy, V: Copy>(
    keys: &BTreeSet<K>,
    fragment: &[(K, V)],
    loose: &BTreeMap<K, V>,
) -> BTreeMap<K, V> {
    keys.iter()
        .filter_map(|k| {
            let v = match fragment.binary_search_by(|(f, _)| f.cmp(k)) {
                Ok(i) => fragment[i].1,
                Err(_) => *loose.get(k)?,
            };
            Some((*k, v))
        })
        .collect()
}

/// Moves every entry of `from` into `into`.
fn move_into<K: Ord, V>(into: &mut BTreeMap<K, V>, from: &mut BTreeMap<K, V>) {
    into.append(from);
}

fn keys<K, V>(entries: &[(K, V)]) -> impl Iterator<Item = &K> + '_ {
    entries.iter().map(|(k, _)| k)
}

fn holds<K: Ord, V>(entries: &[(K, V)], key: &K) -> bool {
    entries.binary_search_by(|(k, _)| k.cmp(key)).is_ok()
}

/// A 64-bit fingerprint of a map value, for a mirror that only compares
/// values and need not keep them (std's SipHash with fixed keys: the same
/// value always gives the same print).
pub(crate) fn fingerprint<T: std::hash::Hash + ?Sized>(value: &T) -> u64 {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// A pod entry's fingerprint: the writer only ever compares pod entries
/// (192 bytes of names each, ~36 MB at 100,000 pods), so it keeps this.
type PodPrint = u64;

fn pod_print(meta: &PodMeta) -> PodPrint {
    fingerprint(&(meta.namespace, meta.name))
}

/// The writer's mirror of the maps (see [`MapWriter`]'s `current`). The
/// shared kinds are looked up key by key (~300,000 keys in a first sync)
/// and never walked in order: hash maps.
#[derive(Default)]
struct Mirror {
    services: BTreeMap<u32, ServiceMeta>,
    pods: std::collections::HashMap<u32, PodPrint>,
    pod_addrs: std::collections::HashMap<AddrKey, PodRef>,
    svc_endpoints: BTreeMap<ServiceEndpointKey, EndpointState>,
    svc_backends: BTreeMap<BackendKey, Backend>,
    svc_ports: BTreeMap<ServicePortKey, u32>,
    dns_names: std::collections::HashMap<u64, NameEntry>,
}

impl Mirror {
    /// Drops the entries keyed by service id among `touched` from the
    /// loose part of the mirror: a write made them a service's own (or
    /// deleted them).
    fn forget_loose(&mut self, touched: &Touched) {
        for k in &touched.services {
            self.services.remove(k);
        }
        for k in &touched.svc_endpoints {
            self.svc_endpoints.remove(k);
        }
        for k in &touched.svc_backends {
            self.svc_backends.remove(k);
        }
        for k in &touched.svc_ports {
            self.svc_ports.remove(k);
        }
    }
}

/// A mirror of one map, as [`upsert`] and [`remove`] keep it.
trait MirrorMap<K, M> {
    fn get(&self, key: &K) -> Option<&M>;
    fn insert(&mut self, key: K, value: M);
    fn remove(&mut self, key: &K);
}

impl<K: Ord, M> MirrorMap<K, M> for BTreeMap<K, M> {
    fn get(&self, key: &K) -> Option<&M> {
        BTreeMap::get(self, key)
    }
    fn insert(&mut self, key: K, value: M) {
        BTreeMap::insert(self, key, value);
    }
    fn remove(&mut self, key: &K) {
        BTreeMap::remove(self, key);
    }
}

impl<K: Hash + Eq, M> MirrorMap<K, M> for std::collections::HashMap<K, M> {
    fn get(&self, key: &K) -> Option<&M> {
        std::collections::HashMap::get(self, key)
    }
    fn insert(&mut self, key: K, value: M) {
        std::collections::HashMap::insert(self, key, value);
    }
    fn remove(&mut self, key: &K) {
        std::collections::HashMap::remove(self, key);
    }
}

pub struct MapWriter {
    maps: Maps,
    /// Mirror of what the shared maps hold (pods as fingerprints). Of the
    /// maps keyed by service id, only the entries no fragment describes:
    /// a previous agent's, until a sync or the sweep takes them over, and
    /// what a removed service left because the kernel refused to delete.
    current: Mirror,
    /// Each service's (by id) claims and entries.
    fragments: BTreeMap<u32, Fragment>,
    shared: SharedClaims,
    /// `dns_addrs`: each service's address slots for DNS observations.
    dns_index: DnsIndex,
    /// While [`MapWriter::with_dns_thread`] runs: where the `dns_addrs`
    /// writes go instead of `dns_index`.
    dns_jobs: Option<std::sync::mpsc::SyncSender<Vec<DnsJob>>>,
    /// Jobs not handed over yet (they go a few at a time).
    dns_pending: Vec<DnsJob>,
}

impl MapWriter {
    /// Takes over the maps, reading what a previous agent left in them.
    /// Nothing is claimed yet: until [`MapWriter::sweep`], entries no
    /// service asked for stay as they are.
    ///
    /// `current` is what the maps hold (read with
    /// [`Maps::read_contents`]). The address filter already holds every
    /// address in them: the datapath rewrote it from the pins before
    /// attaching (`addr_filter::fill_before_attach`), and the writer only
    /// adds to it from here on.
    pub fn new(mut maps: Maps, current: MapContents) -> MapWriter {
        let dns_index = DnsIndex::load(&mut maps);
        let MapContents {
            services,
            pods,
            pod_addrs,
            svc_endpoints,
            svc_backends,
            svc_ports,
            dns_names,
        } = current;
        let current = Mirror {
            services,
            pods: pods
                .iter()
                .map(|(id, meta)| (*id, pod_print(meta)))
                .collect(),
            pod_addrs: pod_addrs.into_iter().collect(),
            svc_endpoints,
            svc_backends,
            svc_ports,
            dns_names: dns_names.into_iter().collect(),
        };
        MapWriter {
            maps,
            current,
            fragments: BTreeMap::new(),
            shared: SharedClaims::default(),
            dns_index,
            dns_jobs: None,
            dns_pending: Vec::new(),
        }
    }

    /// The service ids that currently have a fragment.
    pub fn service_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.fragments.keys().copied()
    }

    pub fn has_service(&self, service_id: u32) -> bool {
        self.fragments.contains_key(&service_id)
    }

    /// Pod ids in service `service_id`'s entries that no other service
    /// claims.
    pub fn pods_only_of(&self, service_id: u32) -> Vec<u32> {
        let Some(fragment) = self.fragments.get(&service_id) else {
            return Vec::new();
        };
        fragment
            .pods
            .iter()
            .filter(|id| {
                let owners = self.shared.pods.owners(id);
                !owners.is_empty() && owners.iter().all(|(owner, _)| *owner == service_id)
            })
            .copied()
            .collect()
    }

    pub fn pod_claimed(&self, pod_id: u32) -> bool {
        self.shared.pods.0.contains_key(&pod_id)
    }

    /// Tells the kernel programs the agent's settings.
    pub fn write_config(&mut self, config: Config) -> Result<(), WriteError> {
        self.maps
            .config
            .set(0, config, 0)
            .map_err(|source| WriteError {
                object: None,
                op: "write",
                map: map_names::CONFIG,
                source: Box::new(source),
            })
    }

    /// Makes the maps hold what service `service_id` wants (`None`: the
    /// service is gone), touching only the keys its old or new fragment
    /// mentions. Entries that fail are skipped (and returned).
    pub fn apply_service(&mut self, service_id: u32, wanted: Option<MapContents>) -> Written {
        let gone = wanted.is_none();
        let old = self.fragments.remove(&service_id).unwrap_or_default();
        let new = wanted.unwrap_or_default();
        let shared = &mut self.shared;
        let pods = shared.pods.replace(
            service_id,
            old.pods.iter(),
            new.pods.keys().map(|k| (*k, ())),
        );
        let pod_addrs = shared.pod_addrs.replace(
            service_id,
            keys(&old.pod_addrs),
            new.pod_addrs.iter().map(|(k, v)| (*k, *v)),
        );
        let dns_names = shared.dns_names.replace(
            service_id,
            keys(&old.dns_names),
            new.dns_names.iter().map(|(k, v)| (*k, *v)),
        );
        // A pod another service still claims keeps the entry it has (an
        // entry names the pod, whichever service lists it): not touched.
        let unclaimed_pods: Vec<u32> = pods
            .iter()
            .copied()
            .filter(|id| shared.pods.winner(id).is_none())
            .collect();
        let pods: BTreeSet<u32> = pods
            .into_iter()
            .filter(|id| new.pods.contains_key(id) || shared.pods.winner(id).is_none())
            .collect();
        let keys = Touched {
            unclaimed_pods,
            pods,
            pod_addrs,
            dns_names,
            services: union(keys(&old.services), new.services.keys()),
            svc_endpoints: union(keys(&old.svc_endpoints), new.svc_endpoints.keys()),
            svc_backends: union(keys(&old.svc_backends), new.svc_backends.keys()),
            svc_ports: union(keys(&old.svc_ports), new.svc_ports.keys()),
        };
        // What the maps hold for this service's own keys, as a small
        // mirror the write updates.
        let loose = &self.current;
        let mut own = MapContents::<PodPrint> {
            services: held(&keys.services, &old.services, &loose.services),
            svc_endpoints: held(
                &keys.svc_endpoints,
                &old.svc_endpoints,
                &loose.svc_endpoints,
            ),
            svc_backends: held(&keys.svc_backends, &old.svc_backends, &loose.svc_backends),
            svc_ports: held(&keys.svc_ports, &old.svc_ports, &loose.svc_ports),
            ..MapContents::default()
        };
        let written = write_keys(
            &mut self.maps,
            &mut self.current,
            &mut own,
            &keys,
            &|k| new.pods.get(k).copied(),
            &|k| self.shared.pod_addrs.winner(k),
            &|k| self.shared.dns_names.winner(k),
            &|k| new.services.get(k).copied(),
            &|k| new.svc_endpoints.get(k).copied(),
            &|k| new.svc_backends.get(k).copied(),
            &|k| new.svc_ports.get(k).copied(),
        );
        // The service's address slots, once `pod_addrs` is written, with
        // each endpoint's eligibility (the plan of one service has an
        // endpoint for each of its pod addresses).
        let current: BTreeMap<AddrKey, bool> = new
            .svc_endpoints
            .iter()
            .map(|(k, ep)| (k.addr, ep.flags & endpoint_flags::ELIGIBLE != 0))
            .collect();
        let pods = keys
            .pod_addrs
            .iter()
            .map(|a| (*a, self.shared.pod_addrs.winner(a).map(|p| p.pod_id)))
            .collect();
        let errors = self.sync_dns(service_id, gone, current, pods);
        let mut written = written;
        written.summary.failed += errors.len();
        written.errors.extend(errors);
        // The touched keys are this service's now (or gone).
        self.current.forget_loose(&keys);
        let loose = &mut self.current;
        if !new.is_empty() {
            self.fragments.insert(service_id, Fragment::of(&new, &own));
        } else {
            // A removed service's entries the kernel kept.
            move_into(&mut loose.services, &mut own.services);
            move_into(&mut loose.svc_endpoints, &mut own.svc_endpoints);
            move_into(&mut loose.svc_backends, &mut own.svc_backends);
            move_into(&mut loose.svc_ports, &mut own.svc_ports);
        }
        written
    }

    /// [`Self::apply_service`] for services this writer has no entries of
    /// yet (a first sync), written together: one batched write per map
    /// for all of them instead of a dozen syscalls per service (~120,000
    /// at 10,000 services). The order across maps is the same as for one
    /// service, so each service's tables are written before the entries
    /// that point into them, and its `svc_steering` entry after its
    /// `services` entry. Refusals name no service (the keys of several
    /// are written at once): the caller says which services they were.
    pub fn apply_new_services(&mut self, services: Vec<(u32, MapContents)>) -> Written {
        if services
            .iter()
            .any(|(id, _)| self.fragments.contains_key(id))
        {
            debug_assert!(false, "apply_new_services with a service already written");
            let mut total = Written::default();
            for (id, wanted) in services {
                let w = self.apply_service(id, Some(wanted));
                total.summary += w.summary;
                total.errors.extend(w.errors);
                total.unclaimed_pods.extend(w.unclaimed_pods);
            }
            return total;
        }
        // Every claim first: the lowest service id's value is written once
        // (one by one, a later but lower id would overwrite it).
        let shared = &mut self.shared;
        let mut touched = Touched::default();
        let mut wanted_parts = Vec::with_capacity(services.len());
        // Where each service's and pod's wanted entries are (moving them
        // into one map per kind cost more than the lookups).
        let mut part_of: BTreeMap<u32, usize> = BTreeMap::new();
        let mut pod_part: std::collections::HashMap<u32, usize> = Default::default();
        for (service_id, new) in services {
            for id in new.pods.keys() {
                shared.pods.set(*id, service_id, ());
                touched.pods.insert(*id);
            }
            for (k, v) in &new.pod_addrs {
                shared.pod_addrs.set(*k, service_id, *v);
                touched.pod_addrs.insert(*k);
            }
            for (k, v) in &new.dns_names {
                shared.dns_names.set(*k, service_id, *v);
                touched.dns_names.insert(*k);
            }
            touched.services.extend(new.services.keys());
            touched.svc_endpoints.extend(new.svc_endpoints.keys());
            touched.svc_backends.extend(new.svc_backends.keys());
            touched.svc_ports.extend(new.svc_ports.keys());
            let asked = !new.is_empty();
            // A pod's entry is the same whichever service lists it.
            for id in new.pods.keys() {
                pod_part.entry(*id).or_insert(wanted_parts.len());
            }
            part_of.insert(service_id, wanted_parts.len());
            let eligible: BTreeMap<AddrKey, bool> = new
                .svc_endpoints
                .iter()
                .map(|(k, ep)| (k.addr, ep.flags & endpoint_flags::ELIGIBLE != 0))
                .collect();
            wanted_parts.push((service_id, asked, new, eligible));
        }
        let loose = &self.current;
        let mut own = MapContents::<PodPrint> {
            services: held(&touched.services, &[], &loose.services),
            svc_endpoints: held(&touched.svc_endpoints, &[], &loose.svc_endpoints),
            svc_backends: held(&touched.svc_backends, &[], &loose.svc_backends),
            svc_ports: held(&touched.svc_ports, &[], &loose.svc_ports),
            ..MapContents::default()
        };
        let part = |service_id: u32| part_of.get(&service_id).map(|i| &wanted_parts[*i].2);
        let mut written = write_keys(
            &mut self.maps,
            &mut self.current,
            &mut own,
            &touched,
            &|k| wanted_parts[*pod_part.get(k)?].2.pods.get(k).copied(),
            &|k| self.shared.pod_addrs.winner(k),
            &|k| self.shared.dns_names.winner(k),
            &|k| part(*k)?.services.get(k).copied(),
            &|k| part(k.service_id)?.svc_endpoints.get(k).copied(),
            &|k| part(k.service_id)?.svc_backends.get(k).copied(),
            &|k| part(k.service_id)?.svc_ports.get(k).copied(),
        );
        // `dns_addrs` once `pod_addrs` is written, service by service.
        for (service_id, _, new, eligible) in &mut wanted_parts {
            let pods: Vec<(AddrKey, Option<u32>)> = new
                .pod_addrs
                .keys()
                .map(|a| (*a, self.shared.pod_addrs.winner(a).map(|p| p.pod_id)))
                .collect();
            let eligible = std::mem::take(eligible);
            let errors = self.sync_dns(*service_id, false, eligible, pods);
            written.summary.failed += errors.len();
            written.errors.extend(errors);
        }
        self.current.forget_loose(&touched);
        let mut services_held = split_by_service(own.services, |k| *k);
        let mut endpoints_held = split_by_service(own.svc_endpoints, |k| k.service_id);
        let mut backends_held = split_by_service(own.svc_backends, |k| k.service_id);
        let mut ports_held = split_by_service(own.svc_ports, |k| k.service_id);
        for (service_id, asked, new, _) in wanted_parts {
            let mut held = MapContents::<PodPrint> {
                services: services_held.remove(&service_id).unwrap_or_default(),
                svc_endpoints: endpoints_held.remove(&service_id).unwrap_or_default(),
                svc_backends: backends_held.remove(&service_id).unwrap_or_default(),
                svc_ports: ports_held.remove(&service_id).unwrap_or_default(),
                ..MapContents::default()
            };
            if asked {
                self.fragments.insert(service_id, Fragment::of(&new, &held));
            } else {
                let loose = &mut self.current;
                move_into(&mut loose.services, &mut held.services);
                move_into(&mut loose.svc_endpoints, &mut held.svc_endpoints);
                move_into(&mut loose.svc_backends, &mut held.svc_backends);
                move_into(&mut loose.svc_ports, &mut held.svc_ports);
            }
        }
        written
    }

    /// Writes service `service_id`'s `dns_addrs` entries, or hands them
    /// to the DNS thread while [`Self::with_dns_thread`] runs.
    fn sync_dns(
        &mut self,
        service_id: u32,
        gone: bool,
        current: BTreeMap<AddrKey, bool>,
        pods: Vec<(AddrKey, Option<u32>)>,
    ) -> Vec<WriteError> {
        match &self.dns_jobs {
            Some(jobs) => {
                self.dns_pending.push(DnsJob {
                    service_id,
                    gone,
                    current,
                    pods,
                });
                if self.dns_pending.len() >= DNS_JOB_BATCH {
                    let batch = std::mem::take(&mut self.dns_pending);
                    // A thread that is gone panicked: that comes out when
                    // it is joined.
                    let _ = jobs.send(batch);
                }
                Vec::new()
            }
            None => {
                self.dns_index
                    .sync_service(&mut self.maps.dns(), service_id, gone, &current, pods)
            }
        }
    }

    /// Runs `work` with each service's `dns_addrs` writes handed to a
    /// thread of their own (the first sync writes ~100,000 entries there):
    /// they go in the order the services were applied, each after its
    /// `pod_addrs` entries as before, while this thread writes the next
    /// services. Returns what `work` returned and the writes that failed
    /// there, by service id, once every one is done. Without a thread (it
    /// cannot start), the writes are made as usual.
    pub fn with_dns_thread<R>(
        &mut self,
        work: impl FnOnce(&mut MapWriter) -> R,
    ) -> (R, Vec<(u32, WriteError)>) {
        // Handles of its own on `dns_addrs` and the table (the real table,
        // which keeps where each address sits, goes to the thread).
        let reopen = |fd: std::os::fd::BorrowedFd<'_>| -> Result<Map, MapError> {
            let fd = fd.try_clone_to_owned().map_err(|io_error| {
                MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error,
                })
            })?;
            Map::from_map_data(MapData::from_fd(fd)?)
        };
        let handles = (|| -> Result<_, MapError> {
            let dns_addrs: HashMap<MapData, AddrKey, _> =
                HashMap::try_from(reopen(self.maps.dns_addrs.map().fd().as_fd())?)?;
            let spare = AddrTable::new(Array::try_from(reopen(self.maps.addr_table.map_fd())?)?);
            Ok((dns_addrs, spare))
        })();
        let (dns_addrs, spare) = match handles {
            Ok(handles) => handles,
            Err(error) => {
                tracing::warn!(%error, "cannot hand the DNS index to a thread; writing it here");
                return (work(self), Vec::new());
            }
        };
        // Run here or on the thread's side, whichever starts.
        let mut work = Some(work);
        let mut table = std::mem::replace(&mut self.maps.addr_table, spare);
        let mut index = std::mem::take(&mut self.dns_index);
        let generation = self.maps.pod_addrs_gen.clone();
        let (jobs, queue) = std::sync::mpsc::sync_channel(DNS_JOBS_AHEAD);
        let (result, errors) = std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("headway-dns".into())
                .spawn_scoped(scope, || {
                    let mut maps = DnsMaps {
                        dns_addrs: &dns_addrs,
                        addr_table: &mut table,
                        pod_addrs_gen: &generation,
                    };
                    index.serve(&mut maps, queue)
                });
            let thread = match thread {
                Ok(thread) => thread,
                Err(error) => {
                    tracing::warn!(%error, "cannot start a thread for the DNS index; writing it here");
                    return None;
                }
            };
            self.dns_jobs = Some(jobs);
            let work = work.take().expect("not run yet");
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(self)));
            // The thread ends once the queue is empty and closed.
            if let Some(jobs) = self.dns_jobs.take() {
                let _ = jobs.send(std::mem::take(&mut self.dns_pending));
            }
            let errors = thread.join();
            let result = result.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            let errors = errors.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            Some((result, errors))
        })
        .map_or((None, Vec::new()), |(r, e)| (Some(r), e));
        self.maps.addr_table = table;
        self.dns_index = index;
        match result {
            Some(result) => (result, errors),
            None => (work.take().expect("not run yet")(self), Vec::new()),
        }
    }

    /// Removes every entry no service claims: what a previous agent wrote
    /// for services that are gone. Run once the first full state has been
    /// applied.
    pub fn sweep(&mut self) -> Written {
        let cur = &self.current;
        let frag = |id: u32| self.fragments.get(&id);
        let keys = Touched {
            pods: unclaimed(cur.pods.keys(), |k| self.shared.pods.winner(k).is_none()),
            pod_addrs: unclaimed(cur.pod_addrs.keys(), |k| {
                self.shared.pod_addrs.winner(k).is_none()
            }),
            dns_names: unclaimed(cur.dns_names.keys(), |k| {
                self.shared.dns_names.winner(k).is_none()
            }),
            services: unclaimed(cur.services.keys(), |k| frag(*k).is_none()),
            svc_endpoints: unclaimed(cur.svc_endpoints.keys(), |k| {
                frag(k.service_id).is_none_or(|f| !holds(&f.svc_endpoints, k))
            }),
            svc_backends: unclaimed(cur.svc_backends.keys(), |k| {
                frag(k.service_id).is_none_or(|f| !holds(&f.svc_backends, k))
            }),
            svc_ports: unclaimed(cur.svc_ports.keys(), |k| {
                frag(k.service_id).is_none_or(|f| !holds(&f.svc_ports, k))
            }),
            unclaimed_pods: Vec::new(),
        };
        // Entries keyed by service id that no fragment describes.
        let loose = &mut self.current;
        let mut own = MapContents::<PodPrint> {
            services: std::mem::take(&mut loose.services),
            svc_endpoints: std::mem::take(&mut loose.svc_endpoints),
            svc_backends: std::mem::take(&mut loose.svc_backends),
            svc_ports: std::mem::take(&mut loose.svc_ports),
            ..MapContents::default()
        };
        let mut written = write_keys(
            &mut self.maps,
            &mut self.current,
            &mut own,
            &keys,
            &|_| None,
            &|_| None,
            &|_| None,
            &|_| None,
            &|_| None,
            &|_| None,
            &|_| None,
        );
        let loose = &mut self.current;
        loose.services = own.services;
        loose.svc_endpoints = own.svc_endpoints;
        loose.svc_backends = own.svc_backends;
        loose.svc_ports = own.svc_ports;
        written.unclaimed_pods = keys.pods.into_iter().collect();
        let fragments = &self.fragments;
        let errors = self.dns_index.retain_services(
            &mut self.maps.dns(),
            |id| fragments.contains_key(&id),
            keys.pod_addrs.iter().map(|a| (*a, None)),
        );
        written.summary.failed += errors.len();
        written.errors.extend(errors);
        written
    }
}

/// Batches of services [`MapWriter::with_dns_thread`] may be ahead of the
/// thread writing their `dns_addrs` entries by.
const DNS_JOBS_AHEAD: usize = 8;
/// Jobs handed to that thread at once (one wake-up each).
const DNS_JOB_BATCH: usize = 32;

/// The keys one write may change, per map.
#[derive(Default)]
struct Touched {
    pods: BTreeSet<u32>,
    pod_addrs: BTreeSet<AddrKey>,
    dns_names: BTreeSet<u64>,
    services: BTreeSet<u32>,
    svc_endpoints: BTreeSet<ServiceEndpointKey>,
    svc_backends: BTreeSet<BackendKey>,
    svc_ports: BTreeSet<ServicePortKey>,
    unclaimed_pods: Vec<u32>,
}

/// `map`'s entries grouped by the service id of their key (each group
/// keeps the order).
fn split_by_service<K: Ord, V>(
    map: BTreeMap<K, V>,
    service_of: impl Fn(&K) -> u32,
) -> std::collections::HashMap<u32, BTreeMap<K, V>> {
    let mut groups: std::collections::HashMap<u32, BTreeMap<K, V>> = Default::default();
    for (k, v) in map {
        groups.entry(service_of(&k)).or_default().insert(k, v);
    }
    groups
}

fn union<'a, K: Ord + Copy + 'a>(
    a: impl Iterator<Item = &'a K>,
    b: impl Iterator<Item = &'a K>,
) -> BTreeSet<K> {
    a.chain(b).copied().collect()
}

fn unclaimed<'a, K: Ord + Copy + 'a>(
    current: impl Iterator<Item = &'a K>,
    is_unclaimed: impl Fn(&K) -> bool,
) -> BTreeSet<K> {
    current.filter(|k| is_unclaimed(k)).copied().collect()
}

/// Writes services' `svc_steering` entries (see `service_steering`).
fn write_steering(m: &Maps, entries: &[(u32, ServiceSteering)], errors: &mut Vec<WriteError>) {
    if let Err(e) = service_steering::write(&m.svc_steering, entries) {
        errors.push(WriteError {
            object: None,
            op: "write",
            map: map_names::SVC_STEERING,
            source: Box::new(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error: e.error,
            })),
        });
    }
}

/// Brings each touched key to what its `*_wanted` function says (`None`:
/// remove), in the order that keeps the kernel's lookups consistent.
/// `cur` mirrors the shared maps, `own` the touched keys of the maps keyed
/// by service id.
#[allow(clippy::too_many_arguments)]
fn write_keys(
    m: &mut Maps,
    cur: &mut Mirror,
    own: &mut MapContents<PodPrint>,
    keys: &Touched,
    pods_wanted: &dyn Fn(&u32) -> Option<PodMeta>,
    pod_addrs_wanted: &dyn Fn(&AddrKey) -> Option<PodRef>,
    dns_names_wanted: &dyn Fn(&u64) -> Option<NameEntry>,
    services_wanted: &dyn Fn(&u32) -> Option<ServiceMeta>,
    svc_endpoints_wanted: &dyn Fn(&ServiceEndpointKey) -> Option<EndpointState>,
    svc_backends_wanted: &dyn Fn(&BackendKey) -> Option<Backend>,
    svc_ports_wanted: &dyn Fn(&ServicePortKey) -> Option<u32>,
) -> Written {
    let mut out = Written {
        unclaimed_pods: keys.unclaimed_pods.clone(),
        ..Written::default()
    };
    let sum = &mut out.summary;
    let errors = &mut out.errors;

    // A pod id handed to a new pod starts its counters at zero (the slot
    // may hold a deleted pod's, even one deleted in this very write), under
    // a new generation so the deleted pod's sockets no longer count here.
    // Ids the maps already had for the same pod keep theirs: that is what
    // makes counters survive agent restarts. A pod whose counters cannot
    // exist (its id lies beyond `pod_stats`) is not written either: readers
    // find every pod's counters.
    let fresh: Vec<u32> = keys
        .pods
        .iter()
        .filter(|id| {
            pods_wanted(id).is_some_and(|meta| cur.pods.get(id) != Some(&pod_print(&meta)))
        })
        .copied()
        .collect();
    let counters: Vec<PodCounters> = fresh
        .iter()
        .map(|_| PodCounters {
            generation: new_generation(),
            ..PodCounters::default()
        })
        .collect();
    let mut no_counters = BTreeSet::new();
    let stats = m.pod_stats.map().fd().as_fd();
    zero_fresh(
        stats,
        map_names::POD_STATS,
        &fresh,
        &counters,
        &mut no_counters,
        errors,
    );
    // Its DNS answers start at zero too (the interceptor's count of the
    // slot's previous pod would otherwise carry over).
    let answers = m.pod_dns_answers.map().fd().as_fd();
    let zeros = vec![0u64; fresh.len()];
    zero_fresh(
        answers,
        map_names::POD_DNS_ANSWERS,
        &fresh,
        &zeros,
        &mut no_counters,
        errors,
    );
    let pods_to_write: BTreeSet<u32> = keys.pods.difference(&no_counters).copied().collect();
    upsert(
        &mut m.pods,
        map_names::PODS,
        &mut cur.pods,
        &pods_to_write,
        pods_wanted,
        pod_print,
        sum,
        errors,
    );
    // Likewise for a service id handed to a new service (by name: a
    // changed policy is the same service), in one batch.
    let new_services: Vec<u32> = keys
        .services
        .iter()
        .filter(|id| {
            services_wanted(id).is_some_and(|meta| {
                own.services
                    .get(id)
                    .is_none_or(|c| (c.namespace, c.name) != (meta.namespace, meta.name))
            })
        })
        .copied()
        .collect();
    let zeros = vec![ServiceCounters::default(); new_services.len()];
    let svc_stats = m.svc_stats.map().fd().as_fd();
    for_each_batch(
        &new_services,
        |from| bpf_sys::map_update_batch(svc_stats, &new_services[from..], &zeros[from..]),
        |_| {},
        |_, source| {
            errors.push(WriteError {
                object: None,
                op: "zero",
                map: map_names::SVC_STATS,
                source: Box::new(source),
            })
        },
    );
    // What each touched service's `svc_steering` entry says now (its
    // ports and inline slots as the maps had them), to be compared with
    // what it must say once its tables are written.
    let ports_had: BTreeSet<ServicePortKey> = own.svc_ports.keys().copied().collect();
    let steering_had: BTreeMap<u32, ServiceSteering> = keys
        .services
        .iter()
        .filter_map(|id| {
            let meta = own.services.get(id)?;
            let ports = service_steering::ports_of(&ports_had, *id);
            let slots = service_steering::first_v4_slots(*id, |k| own.svc_backends.get(k).copied());
            Some((
                *id,
                ServiceSteering::of(meta)
                    .with_ports(ports)
                    .with_backends(slots),
            ))
        })
        .collect();
    // Backend slots and ports before the service entry whose counts and
    // flags reach them; what the kernel looks up last, once everything it
    // points to exists.
    upsert(
        &mut m.svc_backends,
        map_names::SVC_BACKENDS,
        &mut own.svc_backends,
        &keys.svc_backends,
        svc_backends_wanted,
        copy,
        sum,
        errors,
    );
    upsert(
        &mut m.svc_ports,
        map_names::SVC_PORTS,
        &mut own.svc_ports,
        &keys.svc_ports,
        svc_ports_wanted,
        copy,
        sum,
        errors,
    );
    // connect() reads a service from `svc_steering`: it follows the
    // service's entry in, and goes out before it. It carries the ports and
    // the first IPv4 slots wanted (ports and slots going are removed after
    // it), compared with what it had.
    let steering_in: Vec<(u32, ServiceSteering)> = keys
        .services
        .iter()
        .filter_map(|id| {
            let wanted_ports = service_steering::ports_of(&keys.svc_ports, *id)
                .filter(|k| svc_ports_wanted(k).is_some());
            let want = ServiceSteering::of(&services_wanted(id)?)
                .with_ports(wanted_ports)
                .with_backends(service_steering::first_v4_slots(*id, svc_backends_wanted));
            (steering_had.get(id) != Some(&want)).then_some((*id, want))
        })
        .collect();
    upsert(
        &mut m.services,
        map_names::SERVICES,
        &mut own.services,
        &keys.services,
        services_wanted,
        copy,
        sum,
        errors,
    );
    write_steering(m, &steering_in, errors);
    upsert(
        &mut m.svc_endpoints,
        map_names::SVC_ENDPOINTS,
        &mut own.svc_endpoints,
        &keys.svc_endpoints,
        svc_endpoints_wanted,
        copy,
        sum,
        errors,
    );
    // An address enters the filter before `pod_addrs` so the hooks never
    // skip an address they could find. The filter only grows.
    let new_addrs = keys
        .pod_addrs
        .iter()
        .filter(|addr| !cur.pod_addrs.contains_key(addr) && pod_addrs_wanted(addr).is_some());
    if let Err(e) = add_to_filter(m, new_addrs) {
        errors.push(e);
    }
    let changed = sum.upserted + sum.removed;
    upsert(
        &mut m.pod_addrs,
        map_names::POD_ADDRS,
        &mut cur.pod_addrs,
        &keys.pod_addrs,
        pod_addrs_wanted,
        copy,
        sum,
        errors,
    );
    if sum.upserted + sum.removed != changed {
        bump_pod_addrs_gen(m, errors);
    }
    upsert(
        &mut m.dns_names,
        map_names::DNS_NAMES,
        &mut cur.dns_names,
        &keys.dns_names,
        dns_names_wanted,
        copy,
        sum,
        errors,
    );

    // Removal in the opposite order: names stop teaching first, and
    // counts shrink before the slots beyond them go.
    remove(
        &mut m.dns_names,
        map_names::DNS_NAMES,
        &mut cur.dns_names,
        &keys.dns_names,
        dns_names_wanted,
        sum,
        errors,
    );
    let changed = sum.upserted + sum.removed;
    remove(
        &mut m.pod_addrs,
        map_names::POD_ADDRS,
        &mut cur.pod_addrs,
        &keys.pod_addrs,
        pod_addrs_wanted,
        sum,
        errors,
    );
    if sum.upserted + sum.removed != changed {
        bump_pod_addrs_gen(m, errors);
    }
    remove(
        &mut m.svc_endpoints,
        map_names::SVC_ENDPOINTS,
        &mut own.svc_endpoints,
        &keys.svc_endpoints,
        svc_endpoints_wanted,
        sum,
        errors,
    );
    let steering_out: Vec<(u32, ServiceSteering)> = keys
        .services
        .iter()
        .filter(|id| services_wanted(id).is_none() && own.services.contains_key(id))
        .map(|id| (*id, ServiceSteering::default()))
        .collect();
    write_steering(m, &steering_out, errors);
    remove(
        &mut m.services,
        map_names::SERVICES,
        &mut own.services,
        &keys.services,
        services_wanted,
        sum,
        errors,
    );
    remove(
        &mut m.svc_backends,
        map_names::SVC_BACKENDS,
        &mut own.svc_backends,
        &keys.svc_backends,
        svc_backends_wanted,
        sum,
        errors,
    );
    remove(
        &mut m.svc_ports,
        map_names::SVC_PORTS,
        &mut own.svc_ports,
        &keys.svc_ports,
        svc_ports_wanted,
        sum,
        errors,
    );
    remove(
        &mut m.pods,
        map_names::PODS,
        &mut cur.pods,
        &keys.pods,
        pods_wanted,
        sum,
        errors,
    );
    sum.failed = errors.len();
    out
}

/// Adds `addrs` to the address filter (before `pod_addrs` can hold them).
fn add_to_filter<'a>(
    maps: &mut Maps,
    addrs: impl IntoIterator<Item = &'a AddrKey>,
) -> Result<(), WriteError> {
    maps.addr_filter
        .insert_all(addrs)
        .map_err(|source| WriteError {
            object: None,
            op: "add",
            map: map_names::ADDR_FILTER,
            source: Box::new(source),
        })
}

/// Tells the DNS interceptor that the pods and slots it cached per answer
/// may be stale: after `pod_addrs` or `dns_addrs` changed, never before.
pub(crate) fn bump_pod_addrs_gen(maps: &mut Maps, errors: &mut Vec<WriteError>) {
    bump_generation(&maps.pod_addrs_gen, errors);
}

/// [`bump_pod_addrs_gen`] with the generation alone.
pub(crate) fn bump_generation(generation: &Generation, errors: &mut Vec<WriteError>) {
    if let Err(source) = generation.bump() {
        errors.push(WriteError {
            object: None,
            op: "bump",
            map: map_names::POD_ADDRS_GEN,
            source: Box::new(source),
        });
    }
}

/// Writes the slots of the pod ids `fresh` (`values`, one each) in
/// batches; an id whose slot could not be written joins `failed`, with
/// its error.
fn zero_fresh<V: aya::Pod>(
    map: BorrowedFd<'_>,
    name: &'static str,
    fresh: &[u32],
    values: &[V],
    failed: &mut BTreeSet<u32>,
    errors: &mut Vec<WriteError>,
) {
    for_each_batch(
        fresh,
        |from| bpf_sys::map_update_batch(map, &fresh[from..], &values[from..]),
        |_| {},
        |i, source| {
            failed.insert(fresh[i]);
            errors.push(WriteError {
                object: None,
                op: "zero",
                map: name,
                source: Box::new(source),
            });
        },
    );
}

/// Runs `batch(from)` over `items[from..]` until every item has been
/// tried: an item the kernel refuses is reported to `failed` and skipped,
/// the ones it took to `done`.
fn for_each_batch<T>(
    items: &[T],
    mut batch: impl FnMut(usize) -> Result<(), BatchError>,
    mut done: impl FnMut(std::ops::Range<usize>),
    mut failed: impl FnMut(usize, MapError),
) {
    let mut from = 0;
    while from < items.len() {
        match batch(from) {
            Ok(()) => {
                done(from..items.len());
                return;
            }
            Err(BatchError { done: n, error }) => {
                done(from..from + n);
                let at = from + n;
                if at < items.len() {
                    failed(
                        at,
                        MapError::SyscallError(aya::sys::SyscallError {
                            call: "bpf_map_batch",
                            io_error: error,
                        }),
                    );
                }
                from = at + 1;
            }
        }
    }
}

/// Writes `keys[i] = values[i]` into `map` in batches; returns the
/// indexes written. An entry the kernel refuses is reported to `errors`
/// and skipped.
pub(crate) fn write_batch<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
    keys: &[K],
    values: &[V],
    errors: &mut Vec<WriteError>,
) -> Vec<usize> {
    let fd = map.map().fd().as_fd();
    let mut written = Vec::new();
    for_each_batch(
        keys,
        |from| bpf_sys::map_update_batch(fd, &keys[from..], &values[from..]),
        |range| written.extend(range),
        |_, source| {
            errors.push(WriteError {
                object: None,
                op: "write",
                map: name,
                source: Box::new(source),
            })
        },
    );
    written
}

/// Deletes `keys` from `map` in batches; returns the indexes now gone (a
/// key that was already gone counts). Other refusals go to `errors`.
pub(crate) fn delete_batch<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
    keys: &[K],
    errors: &mut Vec<WriteError>,
) -> Vec<usize> {
    let fd = map.map().fd().as_fd();
    let mut gone = Vec::new();
    let mut missing = Vec::new();
    for_each_batch(
        keys,
        |from| bpf_sys::map_delete_batch(fd, &keys[from..]),
        |range| gone.extend(range),
        |i, source| match &source {
            MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                missing.push(i)
            }
            _ => errors.push(WriteError {
                object: None,
                op: "remove",
                map: name,
                source: Box::new(source),
            }),
        },
    );
    gone.extend(missing);
    gone
}

/// The mirror of most maps keeps the values themselves.
fn copy<V: Copy>(v: &V) -> V {
    *v
}

/// Writes every key of `keys` whose wanted value differs from the map's
/// (as the mirror `current` keeps it: `mirror` of the value), in batches.
#[allow(clippy::too_many_arguments)]
fn upsert<K: aya::Pod + Ord, V: aya::Pod, M: PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    current: &mut impl MirrorMap<K, M>,
    keys: &BTreeSet<K>,
    wanted: &dyn Fn(&K) -> Option<V>,
    mirror: fn(&V) -> M,
    sum: &mut WriteSummary,
    errors: &mut Vec<WriteError>,
) {
    let mut ks = Vec::new();
    let mut vs = Vec::new();
    let mut ms = Vec::new();
    for k in keys {
        let Some(v) = wanted(k) else { continue };
        let m = mirror(&v);
        if current.get(k) != Some(&m) {
            ks.push(*k);
            vs.push(v);
            ms.push(Some(m));
        }
    }
    let written = write_batch(map, name, &ks, &vs, errors);
    sum.upserted += written.len();
    for i in written {
        if let Some(m) = ms[i].take() {
            current.insert(ks[i], m);
        }
    }
}

/// Deletes every key of `keys` that the map holds and nobody wants, in
/// batches; a key already gone counts as removed.
fn remove<K: aya::Pod + Ord, V: aya::Pod, M>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    current: &mut impl MirrorMap<K, M>,
    keys: &BTreeSet<K>,
    wanted: &dyn Fn(&K) -> Option<V>,
    sum: &mut WriteSummary,
    errors: &mut Vec<WriteError>,
) {
    let ks: Vec<K> = keys
        .iter()
        .filter(|k| wanted(k).is_none() && current.get(k).is_some())
        .copied()
        .collect();
    let gone = delete_batch(map, name, &ks, errors);
    sum.removed += gone.len();
    for i in gone {
        current.remove(&ks[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_are_never_zero_and_never_repeat() {
        let all: Vec<u64> = (0..1000).map(|_| new_generation()).collect();
        assert!(all.iter().all(|g| *g != 0));
        assert!(all.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
    }
}
