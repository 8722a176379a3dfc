//! Puts planned map entries into the pinned maps, one service at a time,
//! writing only what differs from what the maps hold.
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
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::maps::{HashMap, MapData, MapError};
use headway_common::{
    AddrKey, Backend, BackendKey, Config, NameEntry, PodCounters, PodMeta, PodRef, ServiceCounters,
    ServiceEndpointKey, ServicePortKey, map_names,
};

use crate::{dns_index::DnsIndex, map_plan::MapContents, pinned::Maps};

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

/// Which services want a key, and with which value; sorted by service id.
struct Claims<K, V>(BTreeMap<K, Vec<(u32, V)>>);

impl<K, V> Default for Claims<K, V> {
    fn default() -> Self {
        Claims(BTreeMap::new())
    }
}

impl<K: Ord + Copy, V: Copy> Claims<K, V> {
    fn set(&mut self, key: K, owner: u32, value: V) {
        let claims = self.0.entry(key).or_default();
        match claims.binary_search_by_key(&owner, |(o, _)| *o) {
            Ok(i) => claims[i].1 = value,
            Err(i) => claims.insert(i, (owner, value)),
        }
    }

    fn release(&mut self, key: &K, owner: u32) {
        if let Some(claims) = self.0.get_mut(key) {
            claims.retain(|(o, _)| *o != owner);
            if claims.is_empty() {
                self.0.remove(key);
            }
        }
    }

    fn winner(&self, key: &K) -> Option<V> {
        self.0.get(key).and_then(|c| c.first()).map(|(_, v)| *v)
    }

    /// Moves `owner`'s claims from `old` to `new`; returns every key
    /// either mentions.
    fn replace(&mut self, owner: u32, old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> BTreeSet<K> {
        for k in old.keys().filter(|k| !new.contains_key(k)) {
            self.release(k, owner);
        }
        for (k, v) in new {
            self.set(*k, owner, *v);
        }
        old.keys().chain(new.keys()).copied().collect()
    }
}

#[derive(Default)]
struct SharedClaims {
    pods: Claims<u32, PodMeta>,
    pod_addrs: Claims<AddrKey, PodRef>,
    dns_names: Claims<u64, NameEntry>,
}

pub struct MapWriter {
    maps: Maps,
    /// Mirror of what the agent-owned maps hold.
    current: MapContents,
    /// What each service (by id) last asked for.
    fragments: BTreeMap<u32, MapContents>,
    shared: SharedClaims,
    /// `dns_addrs`: each service's address slots for DNS observations.
    dns_index: DnsIndex,
}

impl MapWriter {
    /// Takes over the maps, reading what a previous agent left in them.
    /// Nothing is claimed yet: until [`MapWriter::sweep`], entries no
    /// service asked for stay as they are.
    ///
    /// Every address already in `pod_addrs` goes into the address filter
    /// again (it may be new, e.g. recreated by hand): an address missing
    /// from it would skip the connect hooks entirely.
    pub fn new(maps: Maps) -> Result<MapWriter, crate::pinned::PinnedError> {
        let current = maps.read_contents()?;
        let dns_index = DnsIndex::load(&maps.dns_addrs);
        let mut writer = MapWriter {
            maps,
            current,
            fragments: BTreeMap::new(),
            shared: SharedClaims::default(),
            dns_index,
        };
        for addr in writer.current.pod_addrs.keys() {
            if let Err(e) = add_to_filter(&mut writer.maps, addr) {
                tracing::error!(error = %e, "cannot fill the address filter");
            }
        }
        Ok(writer)
    }

    pub fn current(&self) -> &MapContents {
        &self.current
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
            .keys()
            .filter(|id| {
                self.shared
                    .pods
                    .0
                    .get(id)
                    .is_some_and(|c| c.iter().all(|(owner, _)| *owner == service_id))
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
        let pods = shared.pods.replace(service_id, &old.pods, &new.pods);
        let pod_addrs = shared
            .pod_addrs
            .replace(service_id, &old.pod_addrs, &new.pod_addrs);
        let dns_names = shared
            .dns_names
            .replace(service_id, &old.dns_names, &new.dns_names);
        let keys = Touched {
            unclaimed_pods: pods
                .iter()
                .copied()
                .filter(|id| shared.pods.winner(id).is_none())
                .collect(),
            pods,
            pod_addrs,
            dns_names,
            services: union(&old.services, &new.services),
            svc_endpoints: union(&old.svc_endpoints, &new.svc_endpoints),
            svc_backends: union(&old.svc_backends, &new.svc_backends),
            svc_ports: union(&old.svc_ports, &new.svc_ports),
        };
        let written = write_keys(
            &mut self.maps,
            &mut self.current,
            &keys,
            &|k| self.shared.pods.winner(k),
            &|k| self.shared.pod_addrs.winner(k),
            &|k| self.shared.dns_names.winner(k),
            &|k| new.services.get(k).copied(),
            &|k| new.svc_endpoints.get(k).copied(),
            &|k| new.svc_backends.get(k).copied(),
            &|k| new.svc_ports.get(k).copied(),
        );
        // The service's address slots, once `pod_addrs` is written.
        let current: BTreeSet<AddrKey> = new.pod_addrs.keys().copied().collect();
        let pods = keys
            .pod_addrs
            .iter()
            .map(|a| (*a, self.shared.pod_addrs.winner(a).map(|p| p.pod_id)));
        let errors = self
            .dns_index
            .sync_service(&mut self.maps, service_id, gone, &current, pods);
        let mut written = written;
        written.summary.failed += errors.len();
        written.errors.extend(errors);
        if !new.is_empty() {
            self.fragments.insert(service_id, new);
        }
        written
    }

    /// Removes every entry no service claims: what a previous agent wrote
    /// for services that are gone. Run once the first full state has been
    /// applied.
    pub fn sweep(&mut self) -> Written {
        let cur = &self.current;
        let frag = |id: u32| self.fragments.get(&id);
        let keys = Touched {
            pods: unclaimed(&cur.pods, |k| self.shared.pods.winner(k).is_none()),
            pod_addrs: unclaimed(&cur.pod_addrs, |k| {
                self.shared.pod_addrs.winner(k).is_none()
            }),
            dns_names: unclaimed(&cur.dns_names, |k| {
                self.shared.dns_names.winner(k).is_none()
            }),
            services: unclaimed(&cur.services, |k| frag(*k).is_none()),
            svc_endpoints: unclaimed(&cur.svc_endpoints, |k| {
                frag(k.service_id).is_none_or(|f| !f.svc_endpoints.contains_key(k))
            }),
            svc_backends: unclaimed(&cur.svc_backends, |k| {
                frag(k.service_id).is_none_or(|f| !f.svc_backends.contains_key(k))
            }),
            svc_ports: unclaimed(&cur.svc_ports, |k| {
                frag(k.service_id).is_none_or(|f| !f.svc_ports.contains_key(k))
            }),
            unclaimed_pods: Vec::new(),
        };
        let mut written = write_keys(
            &mut self.maps,
            &mut self.current,
            &keys,
            &|_| None,
            &|_| None,
            &|_| None,
            &|_| None,
            &|_| None,
            &|_| None,
            &|_| None,
        );
        written.unclaimed_pods = keys.pods.into_iter().collect();
        let fragments = &self.fragments;
        let errors = self.dns_index.retain_services(
            &mut self.maps,
            |id| fragments.contains_key(&id),
            keys.pod_addrs.iter().map(|a| (*a, None)),
        );
        written.summary.failed += errors.len();
        written.errors.extend(errors);
        written
    }
}

/// The keys one write may change, per map.
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

fn union<K: Ord + Copy, V>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> BTreeSet<K> {
    a.keys().chain(b.keys()).copied().collect()
}

fn unclaimed<K: Ord + Copy, V>(
    current: &BTreeMap<K, V>,
    is_unclaimed: impl Fn(&K) -> bool,
) -> BTreeSet<K> {
    current
        .keys()
        .filter(|k| is_unclaimed(k))
        .copied()
        .collect()
}

/// Brings each touched key to what its `*_wanted` function says (`None`:
/// remove), in the order that keeps the kernel's lookups consistent.
#[allow(clippy::too_many_arguments)]
fn write_keys(
    m: &mut Maps,
    cur: &mut MapContents,
    keys: &Touched,
    pods_wanted: &dyn Fn(&u32) -> Option<PodMeta>,
    pod_addrs_wanted: &dyn Fn(&AddrKey) -> Option<PodRef>,
    dns_names_wanted: &dyn Fn(&u64) -> Option<NameEntry>,
    services_wanted: &dyn Fn(&u32) -> Option<headway_common::ServiceMeta>,
    svc_endpoints_wanted: &dyn Fn(&ServiceEndpointKey) -> Option<headway_common::EndpointState>,
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
    let mut no_counters = BTreeSet::new();
    for pod_id in &keys.pods {
        let Some(meta) = pods_wanted(pod_id) else {
            continue;
        };
        if cur.pods.get(pod_id) == Some(&meta) {
            continue;
        }
        let fresh = PodCounters {
            generation: new_generation(),
            ..PodCounters::default()
        };
        if let Err(source) = m.pod_stats.set(*pod_id, fresh, 0) {
            no_counters.insert(*pod_id);
            errors.push(WriteError {
                object: None,
                op: "zero",
                map: map_names::POD_STATS,
                source: Box::new(source),
            });
        }
    }
    let pods_to_write: BTreeSet<u32> = keys.pods.difference(&no_counters).copied().collect();
    upsert(
        &mut m.pods,
        map_names::PODS,
        &mut cur.pods,
        &pods_to_write,
        pods_wanted,
        sum,
        errors,
    );
    // Likewise for a service id handed to a new service (by name: a
    // changed policy is the same service).
    for service_id in &keys.services {
        let Some(meta) = services_wanted(service_id) else {
            continue;
        };
        let same = cur
            .services
            .get(service_id)
            .is_some_and(|c| (c.namespace, c.name) == (meta.namespace, meta.name));
        if !same && let Err(source) = m.svc_stats.set(*service_id, ServiceCounters::default(), 0) {
            errors.push(WriteError {
                object: None,
                op: "zero",
                map: map_names::SVC_STATS,
                source: Box::new(source),
            });
        }
    }
    // Backend slots and ports before the service entry whose counts and
    // flags reach them; what the kernel looks up last, once everything it
    // points to exists.
    upsert(
        &mut m.svc_backends,
        map_names::SVC_BACKENDS,
        &mut cur.svc_backends,
        &keys.svc_backends,
        svc_backends_wanted,
        sum,
        errors,
    );
    upsert(
        &mut m.svc_ports,
        map_names::SVC_PORTS,
        &mut cur.svc_ports,
        &keys.svc_ports,
        svc_ports_wanted,
        sum,
        errors,
    );
    upsert(
        &mut m.services,
        map_names::SERVICES,
        &mut cur.services,
        &keys.services,
        services_wanted,
        sum,
        errors,
    );
    upsert(
        &mut m.svc_endpoints,
        map_names::SVC_ENDPOINTS,
        &mut cur.svc_endpoints,
        &keys.svc_endpoints,
        svc_endpoints_wanted,
        sum,
        errors,
    );
    // An address enters the filter before `pod_addrs` so the hooks never
    // skip an address they could find. The filter only grows.
    for addr in &keys.pod_addrs {
        if !cur.pod_addrs.contains_key(addr)
            && pod_addrs_wanted(addr).is_some()
            && let Err(e) = add_to_filter(m, addr)
        {
            errors.push(e);
        }
    }
    let changed = sum.upserted + sum.removed;
    upsert(
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
    upsert(
        &mut m.dns_names,
        map_names::DNS_NAMES,
        &mut cur.dns_names,
        &keys.dns_names,
        dns_names_wanted,
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
        &mut cur.svc_endpoints,
        &keys.svc_endpoints,
        svc_endpoints_wanted,
        sum,
        errors,
    );
    remove(
        &mut m.services,
        map_names::SERVICES,
        &mut cur.services,
        &keys.services,
        services_wanted,
        sum,
        errors,
    );
    remove(
        &mut m.svc_backends,
        map_names::SVC_BACKENDS,
        &mut cur.svc_backends,
        &keys.svc_backends,
        svc_backends_wanted,
        sum,
        errors,
    );
    remove(
        &mut m.svc_ports,
        map_names::SVC_PORTS,
        &mut cur.svc_ports,
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

/// Tells the DNS interceptor that pod ids it cached per address may be
/// stale (the answer cache): called after `pod_addrs` changed, never before.
/// Adds `addr` to the address filter (before `pod_addrs` can hold it).
fn add_to_filter(maps: &mut Maps, addr: &AddrKey) -> Result<(), WriteError> {
    maps.addr_filter
        .insert(addr, 0)
        .map_err(|source| WriteError {
            object: None,
            op: "add",
            map: map_names::ADDR_FILTER,
            source: Box::new(source),
        })
}

fn bump_pod_addrs_gen(maps: &mut Maps, errors: &mut Vec<WriteError>) {
    let generation = maps.pod_addrs_gen.get(&0, 0).unwrap_or(0);
    if let Err(source) = maps.pod_addrs_gen.set(0, generation.wrapping_add(1), 0) {
        errors.push(WriteError {
            object: None,
            op: "bump",
            map: map_names::POD_ADDRS_GEN,
            source: Box::new(source),
        });
    }
}

fn upsert<K: aya::Pod + Ord, V: aya::Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    current: &mut BTreeMap<K, V>,
    keys: &BTreeSet<K>,
    wanted: &dyn Fn(&K) -> Option<V>,
    sum: &mut WriteSummary,
    errors: &mut Vec<WriteError>,
) {
    for k in keys {
        let Some(v) = wanted(k) else { continue };
        if current.get(k) == Some(&v) {
            continue;
        }
        match map.insert(k, v, 0) {
            Ok(()) => {
                current.insert(*k, v);
                sum.upserted += 1;
            }
            Err(source) => errors.push(WriteError {
                object: None,
                op: "write",
                map: name,
                source: Box::new(source),
            }),
        }
    }
}

fn remove<K: aya::Pod + Ord, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    current: &mut BTreeMap<K, V>,
    keys: &BTreeSet<K>,
    wanted: &dyn Fn(&K) -> Option<V>,
    sum: &mut WriteSummary,
    errors: &mut Vec<WriteError>,
) {
    for k in keys {
        if wanted(k).is_some() || !current.contains_key(k) {
            continue;
        }
        match map.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => {
                current.remove(k);
                sum.removed += 1;
            }
            Err(source) => errors.push(WriteError {
                object: None,
                op: "remove",
                map: name,
                source: Box::new(source),
            }),
        }
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
