//! The agent's side of `addr_table` (see `headway_common::addr_table`):
//! a copy of `dns_addrs` the DNS interceptor and the connect hooks read
//! with inline array loads.
//!
//! The kernel trusts an entry it finds whole, so an entry must never say
//! more than `dns_addrs` does. Every change of an address therefore goes:
//! [`AddrTable::withdraw`] (its entry emptied: the kernel misses and asks
//! `dns_addrs`), then `dns_addrs` written, then [`AddrTable::place`]. A
//! crash anywhere in between leaves a miss, never a stale entry. When the
//! agent starts, [`AddrTable::rebuild`] writes every position anew from
//! `dns_addrs` (the datapath before attaching, the writer when it takes
//! the maps over), so what an older agent left is never trusted.
//!
//! A change writes its entries with one batched update. A whole rewrite
//! goes through a shared mapping of the map instead (it is created
//! `BPF_F_MMAPABLE`): 16 MiB of stores take milliseconds where 131,072
//! batched updates took ~110 ms. The mapping is dropped right after, so
//! the table's pages do not stay in the agent's RSS.
//!
//! An address takes the first free of its `PROBES` positions; when all are
//! taken it is not placed and the kernel finds it in `dns_addrs` (at half
//! load that is rare). It gets a position again the next time it changes.
use std::{
    borrow::{Borrow, BorrowMut},
    collections::HashMap,
    os::fd::{AsFd, BorrowedFd},
    sync::atomic::{Ordering, fence},
};

use aya::{
    Ebpf,
    maps::{Array, IterableMap, MapData, MapError},
};
use headway_common::{
    ADDR_MAX_SERVICES, AddrIndex, AddrKey, AddrTableEntry,
    addr_table::{self, CHECK_WORD, PROBES, SIZE},
    map_names,
};

use crate::{bpf_sys, shared_mapping::SharedMapping};

/// The entry that says what `index` says of `addr`.
pub fn entry(addr: &AddrKey, index: &AddrIndex) -> AddrTableEntry {
    let n = (index.n as usize).min(ADDR_MAX_SERVICES);
    let mut slots = [0u64; ADDR_MAX_SERVICES];
    let mut since_ns = [0u64; ADDR_MAX_SERVICES];
    for ((word, since), slot) in slots.iter_mut().zip(&mut since_ns).zip(&index.slots[..n]) {
        *word = addr_table::slot_word(slot.service_id, slot.slot, slot.flags);
        *since = slot.since_ns;
    }
    AddrTableEntry::new(*addr, index.pod_id, n as u32, slots, since_ns)
}

/// The table map and where the agent put each address (the agent is its
/// only writer).
pub struct AddrTable<T = MapData> {
    map: Array<T, AddrTableEntry>,
    positions: HashMap<AddrKey, u32>,
    /// One bit per position: taken.
    taken: Vec<u64>,
}

impl<T: Borrow<MapData> + BorrowMut<MapData>> AddrTable<T> {
    /// The map, with nothing known of its contents: [`AddrTable::rebuild`]
    /// before any other write.
    pub fn new(map: Array<T, AddrTableEntry>) -> AddrTable<T> {
        AddrTable {
            map,
            positions: HashMap::new(),
            taken: vec![0; (SIZE / 64) as usize],
        }
    }

    /// The map's descriptor (another handle on the same map can be
    /// opened from it).
    pub fn map_fd(&self) -> BorrowedFd<'_> {
        self.map.map().fd().as_fd()
    }

    fn is_taken(&self, position: u32) -> bool {
        self.taken[(position / 64) as usize] & (1 << (position % 64)) != 0
    }

    fn set_taken(&mut self, position: u32, taken: bool) {
        let word = &mut self.taken[(position / 64) as usize];
        if taken {
            *word |= 1 << (position % 64);
        } else {
            *word &= !(1 << (position % 64));
        }
    }

    /// A free position for `addr`, taken; `None` if all of its are.
    fn claim(&mut self, addr: &AddrKey) -> Option<u32> {
        let home = addr_table::home(addr);
        let position = (0..PROBES)
            .map(|probe| addr_table::position(home, probe))
            .find(|p| !self.is_taken(*p))?;
        self.set_taken(position, true);
        self.positions.insert(*addr, position);
        Some(position)
    }

    /// Makes the map hold exactly `entries` (each `dns_addrs` entry),
    /// writing every position, empty ones too.
    pub fn rebuild(
        &mut self,
        entries: impl IntoIterator<Item = (AddrKey, AddrIndex)>,
    ) -> Result<(), MapError> {
        self.positions.clear();
        self.taken.fill(0);
        let mut placed = Vec::new();
        for (addr, index) in entries {
            if let Some(position) = self.claim(&addr) {
                placed.push((position, entry(&addr, &index)));
            }
        }
        placed.sort_unstable_by_key(|(position, _)| *position);
        let mut placed = placed.iter().peekable();
        for start in (0..SIZE).step_by(REWRITE_WINDOW as usize) {
            let window = start..start + REWRITE_WINDOW;
            let mapped = Mapped::new(self.map.map().fd().as_fd(), window.clone())?;
            for position in window.clone().filter(|p| !self.is_taken(*p)) {
                mapped.store(position, &AddrTableEntry::default());
            }
            while let Some((position, value)) = placed.next_if(|(p, _)| window.contains(p)) {
                mapped.store(*position, value);
            }
        }
        Ok(())
    }

    /// Puts `addr`'s entry in the map as [`put`] does, outside the agent's
    /// bookkeeping (for tools and tests that stand in for the agent).
    pub fn put_by_hand(&mut self, addr: &AddrKey, index: &AddrIndex) -> Result<bool, MapError> {
        put(&mut self.map, addr, index)
    }

    /// Empties the entries of `addrs` before `dns_addrs` changes for them.
    /// On an error some may still be held: `dns_addrs` must not change.
    pub fn withdraw(&mut self, addrs: &[AddrKey]) -> Result<(), MapError> {
        let held: Vec<(AddrKey, u32)> = addrs
            .iter()
            .filter_map(|a| self.positions.get(a).map(|p| (*a, *p)))
            .collect();
        let positions: Vec<u32> = held.iter().map(|(_, p)| *p).collect();
        let empty = vec![AddrTableEntry::default(); positions.len()];
        let (done, error) = self.write(&positions, &empty);
        for (addr, position) in &held[..done] {
            self.positions.remove(addr);
            self.set_taken(*position, false);
        }
        error.map_or(Ok(()), Err)
    }

    /// Puts the entries of addresses `dns_addrs` now holds as `entries`
    /// say (each withdrawn before, or new). An entry not written leaves
    /// its position empty: the kernel reads `dns_addrs`.
    pub fn place(&mut self, entries: &[(AddrKey, AddrIndex)]) -> Result<(), MapError> {
        let mut positions = Vec::new();
        let mut values = Vec::new();
        for (addr, index) in entries {
            debug_assert!(!self.positions.contains_key(addr), "placed twice");
            if let Some(position) = self.claim(addr) {
                positions.push(position);
                values.push(entry(addr, index));
            }
        }
        let (done, error) = self.write(&positions, &values);
        for (position, value) in positions[done..].iter().zip(&values[done..]) {
            self.positions.remove(&value.addr);
            self.set_taken(*position, false);
        }
        error.map_or(Ok(()), Err)
    }

    /// Writes `values` at `positions` in one batch; returns how many went
    /// through (all, or those before the first refused) and the error.
    fn write(&self, positions: &[u32], values: &[AddrTableEntry]) -> (usize, Option<MapError>) {
        let fd = self.map.map().fd().as_fd();
        match bpf_sys::map_update_batch(fd, positions, values) {
            Ok(()) => (positions.len(), None),
            Err(e) => (
                e.done,
                Some(MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_batch",
                    io_error: e.error,
                })),
            ),
        }
    }
}

/// Positions one mapping of the rewrite covers (512 KiB): the kernel maps
/// all of a window's pages at once, and they count in the agent's RSS
/// while mapped (the whole table at once raised the peak by 8 MiB).
const REWRITE_WINDOW: u32 = 4096;

/// Positions `first..end` of the table, mapped shared.
struct Mapped {
    words: SharedMapping,
    first: u32,
    end: u32,
}

impl Mapped {
    fn new(fd: BorrowedFd<'_>, positions: std::ops::Range<u32>) -> Result<Mapped, MapError> {
        let entry_size = size_of::<AddrTableEntry>();
        let len = positions.len() * entry_size;
        let offset = positions.start as usize * entry_size;
        let words = SharedMapping::new(fd, offset, len).map_err(|io_error| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "mmap",
                io_error,
            })
        })?;
        Ok(Mapped {
            words,
            first: positions.start,
            end: positions.end,
        })
    }

    /// Writes `value` at `position`: the first line's check word cleared
    /// first and set last, so a reader in between sees an empty entry, or
    /// words that fail a check it read before (the second line's check
    /// covers the first's).
    fn store(&self, position: u32, value: &AddrTableEntry) {
        assert!(
            (self.first..self.end).contains(&position),
            "position {position} out of the mapping"
        );
        let words = value.words();
        let at = (position - self.first) as usize * words.len();
        self.words.store(at + CHECK_WORD, 0);
        fence(Ordering::Release);
        for (i, word) in words.iter().enumerate() {
            if i != CHECK_WORD {
                self.words.store(at + i, *word);
            }
        }
        fence(Ordering::Release);
        self.words.store(at + CHECK_WORD, words[CHECK_WORD]);
    }
}

/// Writes the table of a freshly loaded object from the `dns_addrs` it
/// took over from pins, before any of its programs is attached: entries
/// an older agent left may be stale (one that kept no table changed
/// `dns_addrs` without withdrawing them).
pub fn fill_before_attach(ebpf: &mut Ebpf) -> Result<(), FillError> {
    let entries: Vec<(AddrKey, AddrIndex)> = match ebpf.map(map_names::DNS_ADDRS) {
        Some(map) => {
            let dns_addrs = aya::maps::HashMap::<_, AddrKey, AddrIndex>::try_from(map)?;
            dns_addrs.iter().filter_map(Result::ok).collect()
        }
        None => Vec::new(),
    };
    let map = ebpf
        .map_mut(map_names::ADDR_TABLE)
        .ok_or(FillError::NoTable)?;
    AddrTable::new(Array::try_from(map)?).rebuild(entries)?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("the kernel object has no map {}", map_names::ADDR_TABLE)]
    NoTable,
    #[error(transparent)]
    Map(#[from] MapError),
}

/// Puts `addr`'s entry in a table map by hand (reading its positions),
/// for tools and tests that fill maps the way the agent does; false when
/// every position is another address's.
pub fn put<T: Borrow<MapData> + BorrowMut<MapData>>(
    map: &mut Array<T, AddrTableEntry>,
    addr: &AddrKey,
    index: &AddrIndex,
) -> Result<bool, MapError> {
    let home = addr_table::home(addr);
    for probe in 0..PROBES {
        let position = addr_table::position(home, probe);
        let old = map.get(&position, 0)?;
        if old.check == 0 || old.addr == *addr {
            map.set(position, entry(addr, index), 0)?;
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use headway_common::AddrSlot;

    #[test]
    fn an_entry_checks_and_any_changed_word_fails_the_check() {
        let addr = AddrKey::from_v4_be(u32::from_ne_bytes([10, 0, 0, 1]));
        let mut index = AddrIndex {
            pod_id: 3,
            n: 2,
            ..AddrIndex::default()
        };
        index.slots[0] = AddrSlot {
            service_id: 1,
            slot: 5,
            flags: 7,
            since_ns: 9,
        };
        index.slots[1] = AddrSlot {
            service_id: 2,
            slot: 0,
            flags: 1,
            since_ns: 9,
        };
        let e = entry(&addr, &index);
        assert_eq!(addr_table::check(&e.line()), e.check);
        assert_ne!(e.check, 0);
        assert_eq!(addr_table::since_check(e.check, &e.since_ns), e.since_check);
        assert_eq!(
            addr_table::slot_of_word(e.slots[0]),
            (1, 5, 7),
            "a slot word keeps its service, slot and flags apart"
        );
        // A read that mixes in one word of another version.
        let other = AddrTableEntry { pod_id: 4, ..e };
        assert_ne!(addr_table::check(&other.line()), e.check);
        let mut slots = e.slots;
        slots[1] = addr_table::slot_word(2, 1, 1);
        assert_ne!(
            addr_table::check(&AddrTableEntry { slots, ..e }.line()),
            e.check
        );
        // A slot whose flags alone changed.
        slots[1] = addr_table::slot_word(2, 0, 7);
        assert_ne!(
            addr_table::check(&AddrTableEntry { slots, ..e }.line()),
            e.check
        );
        // Or two words of it.
        let both = AddrTableEntry { slots, ..other };
        assert_ne!(addr_table::check(&both.line()), e.check);
        // The second line: a changed `since_ns`, or a first line of
        // another version, fails its check.
        let mut since = e.since_ns;
        since[0] = 10;
        assert_ne!(addr_table::since_check(e.check, &since), e.since_check);
        assert_ne!(
            addr_table::since_check(other_check(&e), &e.since_ns),
            e.since_check
        );
    }

    /// The check of `e`'s first line with its pod changed.
    fn other_check(e: &AddrTableEntry) -> u64 {
        let other = AddrTableEntry { pod_id: 4, ..*e };
        addr_table::check(&other.line())
    }

    #[test]
    fn homes_spread_consecutive_addresses() {
        let mut taken = std::collections::HashSet::new();
        let n = 65_536u32;
        for i in 0..n {
            let addr = AddrKey::from_v4_be((0x0a00_0000 + i).to_be());
            taken.insert(addr_table::home(&addr));
        }
        // Random homes for n keys in 2n positions: ~79% distinct.
        assert!(
            taken.len() as u32 > n * 7 / 10,
            "{} distinct homes",
            taken.len()
        );
    }
}
