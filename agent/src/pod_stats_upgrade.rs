//! Carries every pod's counts over when an upgrade changes the layout of
//! `pod_stats`, so that no count is lost or doubled.
//!
//! The counts live in the kernel and keep growing while the agent swaps its
//! programs in, so a copy alone would lose what the old programs count
//! between the copy and the swap (the new programs take seconds to
//! verify). Instead:
//! 1. [`begin`]: the old map's pin is renamed aside ([`ASIDE`]); the
//!    programs still attached keep counting into it (a pin is only a name).
//! 2. The new programs load and create `pod_stats` anew; [`Upgrade::copy`]
//!    copies each slot into it, generation included, before anything is
//!    attached, and remembers what it copied.
//! 3. The links are swapped to the new programs.
//! 4. [`Upgrade::finish`] waits until no CPU can still be running an old
//!    program (an RCU grace period), then adds what the old programs
//!    counted since the copy (the old map's final values minus the copy),
//!    atomically, through a mapping of the new map, and removes the aside
//!    pin.
//!
//! An agent that dies in the middle leaves the aside pin, and the next one
//! resumes: if no attached program uses the new map yet, it copies again
//! (slots the dead agent already handed to new pods are kept); if some do,
//! it only finishes, and what the old programs counted between the dead
//! agent's copy and the swap is lost (there is no record of the copy).
//!
//! The only layout carried over is the one before `pod_stats` became one
//! cache line per pod ([`PodCountersV1`]); any other is refused as before.
use std::{
    collections::BTreeSet,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, MapData, MapError, MapType},
    programs::loaded_programs,
};
use headway_common::{PodCounters, map_names, program_names};

use crate::{
    bpf_sys,
    pinned::{self, MapSizes},
    shared_mapping::SharedMapping,
};

/// Where the outgoing `pod_stats` is pinned while its counts are carried
/// over (bpffs refuses names with a dot).
pub const ASIDE: &str = "pod_stats_v1";

/// A `pod_stats` slot as headway pinned it before the DNS answers moved to
/// `pod_dns_answers` (72 bytes, the array not mappable).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCountersV1 {
    pub tcp_connects: u64,
    pub udp_connects: u64,
    pub active_tcp: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub steered_in: u64,
    pub steered_away: u64,
    pub dns_answers: u64,
    pub generation: u64,
}

// SAFETY: #[repr(C)], Copy, u64 fields only, no padding.
unsafe impl aya::Pod for PodCountersV1 {}

impl PodCountersV1 {
    /// The slot in this build's layout: its counters and its DNS answers.
    pub fn split(&self) -> (PodCounters, u64) {
        (
            PodCounters {
                generation: self.generation,
                tcp_connects: self.tcp_connects,
                udp_connects: self.udp_connects,
                active_tcp: self.active_tcp,
                bytes_sent: self.bytes_sent,
                bytes_received: self.bytes_received,
                steered_in: self.steered_in,
                steered_away: self.steered_away,
            },
            self.dns_answers,
        )
    }

    /// What was counted from `self` to `later`, field by field (wrapping:
    /// `active_tcp` is a gauge and may go down).
    pub fn since(&self, later: &PodCountersV1) -> PodCountersV1 {
        let d = |a: u64, b: u64| b.wrapping_sub(a);
        PodCountersV1 {
            tcp_connects: d(self.tcp_connects, later.tcp_connects),
            udp_connects: d(self.udp_connects, later.udp_connects),
            active_tcp: d(self.active_tcp, later.active_tcp),
            bytes_sent: d(self.bytes_sent, later.bytes_sent),
            bytes_received: d(self.bytes_received, later.bytes_received),
            steered_in: d(self.steered_in, later.steered_in),
            steered_away: d(self.steered_away, later.steered_away),
            dns_answers: d(self.dns_answers, later.dns_answers),
            // A delta has no generation of its own.
            generation: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot set the old pod_stats aside ({from} → {to}): {source}")]
    SetAside {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("cannot read {what}: {source}")]
    Read {
        what: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot write {map} while carrying the counts over: {source}")]
    Write {
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot find which maps the attached programs use: {0}")]
    Programs(#[source] io::Error),
    #[error("cannot map {path} to add the counts of the swap: {source}")]
    Mmap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {path}: {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the new programs have no array {0}")]
    NoNewMap(&'static str),
}

/// Whether `info` is the layout [`PodCountersV1`] had; with `sizes` (the
/// agent), also with the capacity this agent gives `pod_stats`.
pub fn is_v1_layout(info: &aya::maps::MapInfo, sizes: Option<&MapSizes>) -> bool {
    matches!(info.map_type(), Ok(MapType::Array))
        && info.key_size() == 4
        && info.value_size() as usize == size_of::<PodCountersV1>()
        && sizes.is_none_or(|s| Some(info.max_entries()) == s.max_entries(map_names::POD_STATS))
}

/// What [`Upgrade::finish`] did, for the agent's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    /// Slots copied before the swap.
    pub slots: usize,
    /// Slots the old programs counted into between the copy and the swap.
    pub counted_during_swap: usize,
    /// True when resuming an upgrade whose new map was already live: the
    /// old programs' counts since that copy are lost.
    pub resumed_live: bool,
}

/// An upgrade of `pod_stats` in progress (see the module docs).
pub struct Upgrade {
    aside: PathBuf,
    outgoing: Array<MapData, PodCountersV1>,
    /// The new map was live already (resuming): only finish.
    live: bool,
    /// (slot, what it held when copied)
    copied: Vec<(u32, PodCountersV1)>,
}

/// Sets the old `pod_stats` aside if it has the old layout, or resumes an
/// upgrade a previous agent left unfinished. None when there is nothing
/// to carry over. Call after the layout checks, before loading.
pub fn begin(bpffs: &Path, sizes: &MapSizes) -> Result<Option<Upgrade>, UpgradeError> {
    let current = pinned::map_pin(bpffs, map_names::POD_STATS);
    let aside = pinned::map_pin(bpffs, ASIDE);
    let mut live = false;
    if aside.exists() {
        // Resuming. A `pod_stats` pin is the new layout here (the layout
        // check refused anything else).
        if current.exists() {
            let new_id = open(&current)?.info().map(|i| i.id());
            let new_id = new_id.map_err(|source| UpgradeError::Open {
                path: current.clone(),
                source,
            })?;
            live = maps_of_attached_programs(bpffs)?.contains(&new_id);
        }
    } else {
        if !current.exists() {
            return Ok(None);
        }
        let info = open(&current)?
            .info()
            .map_err(|source| UpgradeError::Open {
                path: current.clone(),
                source,
            })?;
        if !is_v1_layout(&info, Some(sizes)) {
            return Ok(None);
        }
        std::fs::rename(&current, &aside).map_err(|source| UpgradeError::SetAside {
            from: current.clone(),
            to: aside.clone(),
            source,
        })?;
    }
    let outgoing = Array::try_from(aya::maps::Map::Array(open(&aside)?)).map_err(|source| {
        UpgradeError::Open {
            path: aside.clone(),
            source,
        }
    })?;
    Ok(Some(Upgrade {
        aside,
        outgoing,
        live,
        copied: Vec::new(),
    }))
}

impl Upgrade {
    /// Copies every slot in use from the old map into the new programs'
    /// `pod_stats` and `pod_dns_answers`. Call after loading, before
    /// anything writes to or attaches with the new maps. A slot the new map
    /// already gave another generation (a previous, interrupted upgrade's
    /// agent handed it to a new pod) is left as it is.
    pub fn copy(&mut self, ebpf: &Ebpf) -> Result<(), UpgradeError> {
        if self.live {
            return Ok(());
        }
        let new_stats: Array<&MapData, PodCounters> = ebpf
            .map(map_names::POD_STATS)
            .ok_or(UpgradeError::NoNewMap(map_names::POD_STATS))?
            .try_into()
            .map_err(|source| UpgradeError::Read {
                what: map_names::POD_STATS,
                source,
            })?;
        let mut ids = Vec::new();
        let mut counters = Vec::new();
        let mut answers = Vec::new();
        for id in 0..self.outgoing.len() {
            let old = self
                .outgoing
                .get(&id, 0)
                .map_err(|source| UpgradeError::Read {
                    what: ASIDE,
                    source,
                })?;
            if old == PodCountersV1::default() {
                continue;
            }
            let now = new_stats.get(&id, 0).map_err(|source| UpgradeError::Read {
                what: map_names::POD_STATS,
                source,
            })?;
            if now.generation != 0 && now.generation != old.generation {
                continue;
            }
            let (c, a) = old.split();
            ids.push(id);
            counters.push(c);
            answers.push(a);
            self.copied.push((id, old));
        }
        write_batch(ebpf, map_names::POD_STATS, &ids, &counters)?;
        write_batch(ebpf, map_names::POD_DNS_ANSWERS, &ids, &answers)
    }

    /// Gives up before anything was loaded: the old map goes back to its
    /// pin unless this was a resumed upgrade (whose new map is pinned).
    pub fn abandon(self, bpffs: &Path) {
        let current = pinned::map_pin(bpffs, map_names::POD_STATS);
        if !current.exists() {
            let _ = std::fs::rename(&self.aside, current);
        }
    }

    /// Adds what the old programs counted since [`Upgrade::copy`] and
    /// removes the aside pin. Call once every link runs a new program.
    pub fn finish(self, bpffs: &Path) -> Result<Carried, UpgradeError> {
        let mut carried = Carried {
            slots: self.copied.len(),
            resumed_live: self.live,
            ..Carried::default()
        };
        if !self.copied.is_empty() {
            wait_for_old_programs();
            let stats_path = pinned::map_pin(bpffs, map_names::POD_STATS);
            let answers_path = pinned::map_pin(bpffs, map_names::POD_DNS_ANSWERS);
            let stats = MappedArray::<PodCounters>::open(&stats_path)?;
            let answers = MappedArray::<u64>::open(&answers_path)?;
            for (id, then) in &self.copied {
                let now = self
                    .outgoing
                    .get(id, 0)
                    .map_err(|source| UpgradeError::Read {
                        what: ASIDE,
                        source,
                    })?;
                if now == *then {
                    continue;
                }
                let delta = then.since(&now);
                // The slot may have gone to a new pod meanwhile: then what
                // the old one counted is not the new one's.
                if stats.generation(*id) != Some(then.generation) {
                    continue;
                }
                stats.add_counters(*id, &delta);
                answers.add(*id, 0, delta.dns_answers);
                carried.counted_during_swap += 1;
            }
        }
        std::fs::remove_file(&self.aside).map_err(|source| UpgradeError::Unpin {
            path: self.aside.clone(),
            source,
        })?;
        Ok(carried)
    }
}

fn open(path: &Path) -> Result<MapData, UpgradeError> {
    MapData::from_pin(path).map_err(|source| UpgradeError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `values` at `ids` of the array `name` the new programs created.
fn write_batch<V: aya::Pod>(
    ebpf: &Ebpf,
    name: &'static str,
    ids: &[u32],
    values: &[V],
) -> Result<(), UpgradeError> {
    if ids.is_empty() {
        return Ok(());
    }
    let Some(aya::maps::Map::Array(map)) = ebpf.map(name) else {
        return Err(UpgradeError::NoNewMap(name));
    };
    bpf_sys::map_update_batch(map.fd().as_fd(), ids, values).map_err(|e| UpgradeError::Write {
        map: name,
        source: e.error,
    })
}

/// The ids of the maps the programs behind headway's pinned links use.
fn maps_of_attached_programs(bpffs: &Path) -> Result<BTreeSet<u32>, UpgradeError> {
    let mut prog_ids = BTreeSet::new();
    for name in program_names::ALL {
        let path = pinned::link_pin(bpffs, name);
        if !path.exists() {
            continue;
        }
        let link = bpf_sys::obj_get(&path).map_err(UpgradeError::Programs)?;
        let info = bpf_sys::cgroup_link_info(link.as_fd()).map_err(UpgradeError::Programs)?;
        prog_ids.insert(info.prog_id);
    }
    let mut maps = BTreeSet::new();
    for program in loaded_programs() {
        let program = program.map_err(|e| UpgradeError::Programs(io::Error::other(e)))?;
        if !prog_ids.contains(&program.id()) {
            continue;
        }
        let ids = program
            .map_ids()
            .map_err(|e| UpgradeError::Programs(io::Error::other(e)))?;
        maps.extend(ids.unwrap_or_default());
    }
    Ok(maps)
}

/// Returns once no CPU can still be running a program that was swapped out
/// before the call: cgroup programs run inside RCU read-side sections and
/// a swapped-out program is freed after a grace period, which
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for.
fn wait_for_old_programs() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: a plain syscall with integer arguments.
    let ret = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if ret != 0 {
        // Not available (nohz_full CPUs): a program run takes microseconds.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A whole mappable array of `V` (a multiple of 8 bytes) mapped into the
/// agent, for atomic adds to values the kernel programs update too.
struct MappedArray<V> {
    words: SharedMapping,
    entries: u32,
    _values: std::marker::PhantomData<V>,
}

impl<V> MappedArray<V> {
    /// u64 words per value.
    const WORDS: usize = size_of::<V>() / 8;

    fn open(path: &Path) -> Result<Self, UpgradeError> {
        let mmap_err = |source| UpgradeError::Mmap {
            path: path.to_path_buf(),
            source,
        };
        let map = open(path)?;
        let info = map.info().map_err(|source| UpgradeError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        // Values lie every `value_size` bytes when that is a multiple of 8.
        if info.value_size() as usize != size_of::<V>() || !size_of::<V>().is_multiple_of(8) {
            return Err(mmap_err(io::Error::other("unexpected value size")));
        }
        let entries = info.max_entries();
        let len = (entries as usize * size_of::<V>()).div_ceil(PAGE) * PAGE;
        let words = SharedMapping::new(map.fd().as_fd(), 0, len).map_err(mmap_err)?;
        Ok(MappedArray {
            words,
            entries,
            _values: std::marker::PhantomData,
        })
    }

    /// Adds `n` to the `field`th word of value `id` (nothing past the
    /// array).
    fn add(&self, id: u32, field: usize, n: u64) {
        if n != 0 && id < self.entries && field < Self::WORDS {
            self.words.add(id as usize * Self::WORDS + field, n);
        }
    }
}

/// The page size mappings are made in (bpf array maps are mapped whole
/// pages).
const PAGE: usize = 4096;

impl MappedArray<PodCounters> {
    fn generation(&self, id: u32) -> Option<u64> {
        (id < self.entries).then(|| self.words.load(id as usize * Self::WORDS))
    }

    /// Adds a delta's counters (not its generation) to slot `id`.
    fn add_counters(&self, id: u32, d: &PodCountersV1) {
        // Word positions in `PodCounters` (generation is word 0).
        let fields = [
            d.tcp_connects,
            d.udp_connects,
            d.active_tcp,
            d.bytes_sent,
            d.bytes_received,
            d.steered_in,
            d.steered_away,
        ];
        for (i, n) in fields.into_iter().enumerate() {
            self.add(id, i + 1, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(n: u64) -> PodCountersV1 {
        PodCountersV1 {
            tcp_connects: n,
            udp_connects: n + 1,
            active_tcp: n + 2,
            bytes_sent: n + 3,
            bytes_received: n + 4,
            steered_in: n + 5,
            steered_away: n + 6,
            dns_answers: n + 7,
            generation: 42,
        }
    }

    #[test]
    fn split_moves_every_counter_and_the_generation() {
        let (c, answers) = slot(10).split();
        assert_eq!(
            c,
            PodCounters {
                generation: 42,
                tcp_connects: 10,
                udp_connects: 11,
                active_tcp: 12,
                bytes_sent: 13,
                bytes_received: 14,
                steered_in: 15,
                steered_away: 16,
            }
        );
        assert_eq!(answers, 17);
        assert_eq!(size_of::<PodCountersV1>(), 72);
    }

    #[test]
    fn delta_is_what_grew_and_a_gauge_may_shrink() {
        let then = slot(10);
        let mut now = slot(10);
        now.tcp_connects += 3;
        now.bytes_sent += 1500;
        now.dns_answers += 2;
        now.active_tcp -= 2;
        let d = then.since(&now);
        assert_eq!(d.tcp_connects, 3);
        assert_eq!(d.bytes_sent, 1500);
        assert_eq!(d.dns_answers, 2);
        assert_eq!(d.steered_in, 0);
        // Added with wrapping arithmetic, -2 takes the gauge back down.
        assert_eq!(12u64.wrapping_add(d.active_tcp), 10);
        assert_eq!(then.since(&then), PodCountersV1::default());
    }
}
