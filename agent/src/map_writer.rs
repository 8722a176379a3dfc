//! Applies a planned [`MapContents`] to the maps, writing only what differs
//! from what they hold. Order keeps the datapath consistent at every step:
//! metadata and counters first, then the entries the kernel looks up;
//! removals go the other way round.
use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::maps::{HashMap, MapData, MapError};
use headway_common::{
    AddrKey, Config, PodCounters, PodMeta, ServiceCounters, ServiceMeta, map_names,
};

use crate::{map_plan::MapContents, pinned::Maps};

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
    #[source]
    pub source: MapError,
}

/// How many entries one sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteSummary {
    pub upserted: usize,
    pub removed: usize,
    /// Entries that could not be written (full map, kernel error); each is
    /// also reported in `errors`. The rest of the sync still went through.
    pub failed: usize,
}

pub struct MapWriter {
    maps: Maps,
    /// Mirror of what the agent-owned maps hold.
    current: MapContents,
}

impl MapWriter {
    /// Takes over the maps, reading what a previous agent left in them.
    /// Every address already in `pod_addrs` goes into the address filter
    /// again (it may be new, e.g. recreated by hand): an address missing
    /// from it would skip the connect hooks entirely.
    pub fn new(maps: Maps) -> Result<MapWriter, crate::pinned::PinnedError> {
        let current = maps.read_contents()?;
        let mut writer = MapWriter { maps, current };
        let addrs: Vec<AddrKey> = writer.current.pod_addrs.keys().copied().collect();
        for addr in addrs {
            if let Err(e) = writer.filter(&addr) {
                tracing::error!(error = %e, "cannot fill the address filter");
            }
        }
        Ok(writer)
    }

    /// Adds `addr` to the address filter (before it can be looked up).
    fn filter(&mut self, addr: &AddrKey) -> Result<(), WriteError> {
        self.maps
            .addr_filter
            .insert(addr, 0)
            .map_err(|source| WriteError {
                op: "add",
                map: map_names::ADDR_FILTER,
                source,
            })
    }

    pub fn current(&self) -> &MapContents {
        &self.current
    }

    /// Tells the kernel programs the agent's settings.
    pub fn write_config(&mut self, config: Config) -> Result<(), WriteError> {
        self.maps
            .config
            .set(0, config, 0)
            .map_err(|source| WriteError {
                op: "write",
                map: map_names::CONFIG,
                source,
            })
    }

    /// Makes the maps hold exactly `wanted`. Entries that fail are skipped
    /// (and returned), the rest is applied.
    pub fn apply(&mut self, wanted: &MapContents) -> (WriteSummary, Vec<WriteError>) {
        let mut sum = WriteSummary::default();
        let mut errors = Vec::new();
        let m = &mut self.maps;
        let cur = &mut self.current;

        // Both steps below apply one map's part of `wanted`; `$field` names
        // the map in `Maps`, in `MapContents` and (upper-cased) its pin name.
        macro_rules! step {
            ($op:ident, $field:ident, $name:expr) => {
                $op(
                    &mut m.$field,
                    $name,
                    &mut cur.$field,
                    &wanted.$field,
                    &mut sum,
                    &mut errors,
                )
            };
        }
        // A pod id handed to a new pod starts its counters at zero (the
        // slot may hold a deleted pod's, even one deleted in this very
        // sync), under a new generation so the deleted pod's sockets no
        // longer count here. Ids the maps already had for the same pod keep
        // theirs: that is what makes counters survive agent restarts.
        let new_pod = |(id, meta): &(&u32, &PodMeta)| cur.pods.get(id) != Some(meta);
        for (pod_id, _) in wanted.pods.iter().filter(new_pod) {
            let fresh = PodCounters {
                generation: new_generation(),
                ..PodCounters::default()
            };
            if let Err(source) = m.pod_stats.set(*pod_id, fresh, 0) {
                errors.push(WriteError {
                    op: "zero",
                    map: map_names::POD_STATS,
                    source,
                });
            }
        }
        step!(upsert, pods, map_names::PODS);
        // Likewise for a service id handed to a new service (by name: a
        // changed policy is the same service).
        let new_service = |(id, meta): &(&u32, &ServiceMeta)| {
            cur.services
                .get(id)
                .is_none_or(|c| (c.namespace, c.name) != (meta.namespace, meta.name))
        };
        for (service_id, _) in wanted.services.iter().filter(new_service) {
            if let Err(source) = m.svc_stats.set(*service_id, ServiceCounters::default(), 0) {
                errors.push(WriteError {
                    op: "zero",
                    map: map_names::SVC_STATS,
                    source,
                });
            }
        }
        // Backend slots and ports before the service entry whose counts and
        // flags reach them; what the kernel looks up last, once everything
        // it points to exists.
        step!(upsert, svc_backends, map_names::SVC_BACKENDS);
        step!(upsert, svc_ports, map_names::SVC_PORTS);
        step!(upsert, services, map_names::SERVICES);
        step!(upsert, svc_endpoints, map_names::SVC_ENDPOINTS);
        // An address enters the filter before `pod_addrs` so the hooks never
        // skip an address they could find. The filter only grows.
        let new_addrs: Vec<AddrKey> = wanted
            .pod_addrs
            .keys()
            .filter(|a| !cur.pod_addrs.contains_key(a))
            .copied()
            .collect();
        for addr in &new_addrs {
            if let Err(source) = m.addr_filter.insert(addr, 0) {
                errors.push(WriteError {
                    op: "add",
                    map: map_names::ADDR_FILTER,
                    source,
                });
            }
        }
        let changed = sum.upserted + sum.removed;
        step!(upsert, pod_addrs, map_names::POD_ADDRS);
        if sum.upserted + sum.removed != changed {
            bump_pod_addrs_gen(m, &mut errors);
        }
        step!(upsert, dns_names, map_names::DNS_NAMES);

        // Removal in the opposite order: names stop teaching first, and
        // counts shrink before the slots beyond them go.
        step!(remove_stale, dns_names, map_names::DNS_NAMES);
        let changed = sum.upserted + sum.removed;
        step!(remove_stale, pod_addrs, map_names::POD_ADDRS);
        if sum.upserted + sum.removed != changed {
            bump_pod_addrs_gen(m, &mut errors);
        }
        step!(remove_stale, svc_endpoints, map_names::SVC_ENDPOINTS);
        step!(remove_stale, services, map_names::SERVICES);
        step!(remove_stale, svc_backends, map_names::SVC_BACKENDS);
        step!(remove_stale, svc_ports, map_names::SVC_PORTS);
        step!(remove_stale, pods, map_names::PODS);
        sum.failed = errors.len();
        (sum, errors)
    }
}

/// Tells the DNS interceptor that pod ids it cached per address may be
/// stale (`dns_resp`): called after `pod_addrs` changed, never before.
fn bump_pod_addrs_gen(maps: &mut crate::pinned::Maps, errors: &mut Vec<WriteError>) {
    let generation = maps.pod_addrs_gen.get(&0, 0).unwrap_or(0);
    if let Err(source) = maps.pod_addrs_gen.set(0, generation.wrapping_add(1), 0) {
        errors.push(WriteError {
            op: "bump",
            map: map_names::POD_ADDRS_GEN,
            source,
        });
    }
}

fn upsert<K: aya::Pod + Ord, V: aya::Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    current: &mut BTreeMap<K, V>,
    wanted: &BTreeMap<K, V>,
    sum: &mut WriteSummary,
    errors: &mut Vec<WriteError>,
) {
    for (k, v) in wanted {
        if current.get(k) == Some(v) {
            continue;
        }
        match map.insert(k, v, 0) {
            Ok(()) => {
                current.insert(*k, *v);
                sum.upserted += 1;
            }
            Err(source) => errors.push(WriteError {
                op: "write",
                map: name,
                source,
            }),
        }
    }
}

fn remove_stale<K: aya::Pod + Ord, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    current: &mut BTreeMap<K, V>,
    wanted: &BTreeMap<K, V>,
    sum: &mut WriteSummary,
    errors: &mut Vec<WriteError>,
) {
    let stale: Vec<K> = current
        .keys()
        .filter(|k| !wanted.contains_key(k))
        .copied()
        .collect();
    for k in stale {
        match map.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => {
                current.remove(&k);
                sum.removed += 1;
            }
            Err(source) => errors.push(WriteError {
                op: "remove",
                map: name,
                source,
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
