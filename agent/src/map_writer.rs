//! Applies a planned [`MapContents`] to the maps, writing only what differs
//! from what they hold. Order keeps the datapath consistent at every step:
//! metadata and counters first, then the entries the kernel looks up;
//! removals go the other way round.
use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{HashMap, MapData, MapError};
use headway_common::{Config, PodCounters, map_names};

use crate::{map_plan::MapContents, pinned::Maps};

/// `BPF_NOEXIST`: create only, never reset an existing entry.
const NOEXIST: u64 = 1;

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
    /// Pod ids that have an entry in `pod_stats`.
    stats_known: BTreeSet<u32>,
}

impl MapWriter {
    /// Takes over the maps, reading what a previous agent left in them.
    pub fn new(maps: Maps) -> Result<MapWriter, crate::pinned::PinnedError> {
        let current = maps.read_contents()?;
        let stats_known = maps.pod_stats.keys().filter_map(Result::ok).collect();
        Ok(MapWriter {
            maps,
            current,
            stats_known,
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
        step!(upsert, pods, map_names::PODS);
        for pod_id in wanted.pods.keys() {
            if self.stats_known.contains(pod_id) {
                continue;
            }
            // Counters start at zero for a new pod; NOEXIST keeps any the
            // kernel created in the meantime.
            match m.pod_stats.insert(pod_id, PodCounters::default(), NOEXIST) {
                Ok(()) => {}
                Err(_) if m.pod_stats.get(pod_id, 0).is_ok() => {}
                Err(source) => {
                    errors.push(WriteError {
                        op: "create",
                        map: map_names::POD_STATS,
                        source,
                    });
                    continue;
                }
            }
            self.stats_known.insert(*pod_id);
        }
        // Backend slots before the counts (in `services`) that reach them;
        // what the kernel looks up last, once everything it points to exists.
        step!(upsert, svc_backends, map_names::SVC_BACKENDS);
        step!(upsert, services, map_names::SERVICES);
        step!(upsert, svc_endpoints, map_names::SVC_ENDPOINTS);
        step!(upsert, pod_addrs, map_names::POD_ADDRS);
        step!(upsert, dns_names, map_names::DNS_NAMES);

        // Removal in the opposite order: names stop teaching first, and
        // counts shrink before the slots beyond them go.
        step!(remove_stale, dns_names, map_names::DNS_NAMES);
        step!(remove_stale, pod_addrs, map_names::POD_ADDRS);
        step!(remove_stale, svc_endpoints, map_names::SVC_ENDPOINTS);
        step!(remove_stale, services, map_names::SERVICES);
        step!(remove_stale, svc_backends, map_names::SVC_BACKENDS);
        let pods_before = cur.pods.len();
        step!(remove_stale, pods, map_names::PODS);
        if cur.pods.len() < pods_before {
            self.collect_orphan_stats(&mut sum, &mut errors);
        }
        sum.failed = errors.len();
        (sum, errors)
    }

    /// Drops counters of pods no longer known (deleted pods, or an entry the
    /// kernel created in a race with a delete).
    fn collect_orphan_stats(&mut self, sum: &mut WriteSummary, errors: &mut Vec<WriteError>) {
        let orphans: Vec<u32> = self
            .maps
            .pod_stats
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !self.current.pods.contains_key(id))
            .collect();
        for id in orphans {
            match self.maps.pod_stats.remove(&id) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.stats_known.remove(&id);
                    sum.removed += 1;
                }
                Err(source) => errors.push(WriteError {
                    op: "remove",
                    map: map_names::POD_STATS,
                    source,
                }),
            }
        }
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
