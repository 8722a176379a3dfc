//! Applies a planned [`MapContents`] to the maps, writing only what differs
//! from what they hold. Order keeps the datapath consistent at every step:
//! metadata and counters first, then the entries the kernel looks up;
//! removals go the other way round.
use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{HashMap, MapData, MapError};
use headway_common::{PodCounters, map_names};

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

    /// Makes the maps hold exactly `wanted`. Entries that fail are skipped
    /// (and returned), the rest is applied.
    pub fn apply(&mut self, wanted: &MapContents) -> (WriteSummary, Vec<WriteError>) {
        let mut sum = WriteSummary::default();
        let mut errors = Vec::new();
        let m = &mut self.maps;
        let cur = &mut self.current;

        upsert(
            &mut m.pods,
            map_names::PODS,
            &mut cur.pods,
            &wanted.pods,
            &mut sum,
            &mut errors,
        );
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
        upsert(
            &mut m.services,
            map_names::SERVICES,
            &mut cur.services,
            &wanted.services,
            &mut sum,
            &mut errors,
        );
        upsert(
            &mut m.svc_endpoints,
            map_names::SVC_ENDPOINTS,
            &mut cur.svc_endpoints,
            &wanted.svc_endpoints,
            &mut sum,
            &mut errors,
        );
        upsert(
            &mut m.pod_addrs,
            map_names::POD_ADDRS,
            &mut cur.pod_addrs,
            &wanted.pod_addrs,
            &mut sum,
            &mut errors,
        );

        remove_stale(
            &mut m.pod_addrs,
            map_names::POD_ADDRS,
            &mut cur.pod_addrs,
            &wanted.pod_addrs,
            &mut sum,
            &mut errors,
        );
        remove_stale(
            &mut m.svc_endpoints,
            map_names::SVC_ENDPOINTS,
            &mut cur.svc_endpoints,
            &wanted.svc_endpoints,
            &mut sum,
            &mut errors,
        );
        remove_stale(
            &mut m.services,
            map_names::SERVICES,
            &mut cur.services,
            &wanted.services,
            &mut sum,
            &mut errors,
        );
        let pods_before = cur.pods.len();
        remove_stale(
            &mut m.pods,
            map_names::PODS,
            &mut cur.pods,
            &wanted.pods,
            &mut sum,
            &mut errors,
        );
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
