//! The agent's side of the address filter (`addr_bits`, see
//! `headway_common::addr_filter`): the connect hooks skip every address
//! the filter does not hold, so it must hold every address in `pod_addrs`
//! and `dns_addrs` before the kernel can find it there.
//!
//! While the agent runs the filter only grows: an address is added before
//! it is written anywhere, and a bit is never cleared under a hook that
//! may need it. When the agent starts, it writes the filter anew from what
//! the pinned maps hold (`rebuild`), which drops the bits of addresses
//! gone meanwhile; every bit still needed is set in both the old and the
//! new words, so no hook ever misses an address during the rewrite.
use std::borrow::{Borrow, BorrowMut};
use std::collections::BTreeMap;
use std::os::fd::AsFd;

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap, MapData, MapError},
};
use headway_common::{AddrIndex, AddrKey, PodRef, addr_filter, map_names};

use crate::bpf_sys;

/// The filter map and the agent's copy of its words (the agent is its
/// only writer).
pub struct AddrFilter<T = MapData> {
    map: Array<T, u64>,
    /// Read from the map on first use (`headway status` never needs it).
    words: Option<Vec<u64>>,
}

impl<T: Borrow<MapData> + BorrowMut<MapData>> AddrFilter<T> {
    pub fn new(map: Array<T, u64>) -> AddrFilter<T> {
        AddrFilter { map, words: None }
    }

    /// Whether the filter holds `addr` (or a false positive).
    pub fn may_hold(&self, addr: &AddrKey) -> Result<bool, MapError> {
        let (word, mask) = addr_filter::bits(addr);
        Ok(self.map.get(&word, 0)? & mask == mask)
    }

    /// The map and the agent's copy of its words, read on first use.
    fn parts(&mut self) -> Result<(&mut Array<T, u64>, &mut Vec<u64>), MapError> {
        if self.words.is_none() {
            let read = (0..addr_filter::WORDS)
                .map(|i| self.map.get(&i, 0))
                .collect::<Result<Vec<u64>, MapError>>()?;
            self.words = Some(read);
        }
        let words = self.words.get_or_insert_default();
        Ok((&mut self.map, words))
    }

    /// Adds `addr` (one map write, none if its bits are already set).
    pub fn insert(&mut self, addr: &AddrKey) -> Result<(), MapError> {
        self.insert_all([addr])
    }

    /// Adds every address of `addrs` with one batched write of the words
    /// that change (a sync adds thousands: one syscall each cost ~5% of a
    /// full sync). On an error, the words written before it are kept.
    pub fn insert_all<'a>(
        &mut self,
        addrs: impl IntoIterator<Item = &'a AddrKey>,
    ) -> Result<(), MapError> {
        let (map, words) = self.parts()?;
        let mut changed: BTreeMap<u32, u64> = BTreeMap::new();
        for addr in addrs {
            let (word, mask) = addr_filter::bits(addr);
            let value = changed.entry(word).or_insert(words[word as usize]);
            *value |= mask;
        }
        changed.retain(|word, value| words[*word as usize] != *value);
        let (indexes, values): (Vec<u32>, Vec<u64>) = changed.into_iter().unzip();
        let fd = map.map().fd().as_fd();
        let result = bpf_sys::map_update_batch(fd, &indexes, &values);
        let done = match &result {
            Ok(()) => indexes.len(),
            Err(e) => e.done,
        };
        for (word, value) in indexes.iter().zip(&values).take(done) {
            words[*word as usize] = *value;
        }
        result.map_err(|e| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error: e.error,
            })
        })
    }

    /// Makes the filter hold exactly `addrs`, writing only the words that
    /// change. Every bit `addrs` needs is set in the old words too if they
    /// held them, so hooks running meanwhile never miss an address.
    pub fn rebuild<'a>(
        &mut self,
        addrs: impl IntoIterator<Item = &'a AddrKey>,
    ) -> Result<(), MapError> {
        let mut wanted = vec![0u64; addr_filter::WORDS as usize];
        for addr in addrs {
            let (word, mask) = addr_filter::bits(addr);
            wanted[word as usize] |= mask;
        }
        let (map, words) = self.parts()?;
        for (i, (have, want)) in words.iter_mut().zip(&wanted).enumerate() {
            if have != want {
                // Set the new bits first, then drop the stale ones: a bit
                // some address needs is never cleared, even for a moment.
                map.set(i as u32, *have | *want, 0)?;
                map.set(i as u32, *want, 0)?;
                *have = *want;
            }
        }
        Ok(())
    }
}

/// Adds `addr` to a filter map with one read and one write of its word,
/// for tools and tests that fill maps by hand (the agent keeps a copy of
/// the words instead: [`AddrFilter::insert`]).
pub fn add_to<T: Borrow<MapData> + BorrowMut<MapData>>(
    map: &mut Array<T, u64>,
    addr: &AddrKey,
) -> Result<(), MapError> {
    let (word, mask) = addr_filter::bits(addr);
    let old = map.get(&word, 0)?;
    map.set(word, old | mask, 0)
}

/// Writes the filter of a freshly loaded object from the address maps it
/// took over from pins, before any of its programs is attached: after an
/// upgrade from a build that kept no such filter, the new programs would
/// otherwise skip every address until the first sync.
pub fn fill_before_attach(ebpf: &mut Ebpf) -> Result<(), FillError> {
    let mut addrs: Vec<AddrKey> = Vec::new();
    if let Some(map) = ebpf.map(map_names::POD_ADDRS) {
        let pod_addrs = HashMap::<_, AddrKey, PodRef>::try_from(map)?;
        addrs.extend(pod_addrs.keys().filter_map(Result::ok));
    }
    if let Some(map) = ebpf.map(map_names::DNS_ADDRS) {
        let dns_addrs = HashMap::<_, AddrKey, AddrIndex>::try_from(map)?;
        addrs.extend(dns_addrs.keys().filter_map(Result::ok));
    }
    let map = ebpf
        .map_mut(map_names::ADDR_FILTER)
        .ok_or(FillError::NoFilter)?;
    AddrFilter::new(Array::try_from(map)?).rebuild(&addrs)?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("the kernel object has no map {}", map_names::ADDR_FILTER)]
    NoFilter,
    #[error(transparent)]
    Map(#[from] MapError),
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use headway_common::addr_filter::{WORDS, bits};

    use crate::map_plan::addr_key;

    #[test]
    fn two_distinct_bits_in_a_word_in_range() {
        for i in 0..10_000u32 {
            let addr = addr_key(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
            let (word, mask) = bits(&addr);
            assert!(word < WORDS);
            assert!(mask.count_ones() >= 1 && mask.count_ones() <= 2);
        }
    }

    /// The hash spreads a pod CIDR's consecutive addresses: 20,000 of them
    /// in 8,192 words give about 1% false positives on other addresses of
    /// both families (a filter that clumped them would give far more).
    #[test]
    fn false_positives_stay_near_the_design_rate() {
        let mut words = vec![0u64; WORDS as usize];
        for i in 0..20_000u32 {
            let (word, mask) = bits(&addr_key(IpAddr::V4(Ipv4Addr::from(0x0a2a_0000 + i))));
            words[word as usize] |= mask;
        }
        let held = |addr: IpAddr| {
            let (word, mask) = bits(&addr_key(addr));
            words[word as usize] & mask == mask
        };
        let probes = 100_000u32;
        let v4 = (0..probes)
            .filter(|i| held(IpAddr::V4(Ipv4Addr::from(0xc0a8_0000 + i))))
            .count();
        let v6 = (0..probes)
            .filter(|i| {
                held(IpAddr::V6(Ipv6Addr::new(
                    0xfd00,
                    0,
                    0,
                    0,
                    0,
                    0,
                    (i >> 16) as u16,
                    *i as u16,
                )))
            })
            .count();
        for (family, hits) in [("IPv4", v4), ("IPv6", v6)] {
            let rate = hits as f64 / f64::from(probes);
            assert!(rate < 0.03, "{family}: {rate:.4} false positives");
        }
    }
}
