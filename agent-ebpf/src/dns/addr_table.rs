//! What the agent says of an answer address, for the DNS interceptor: its
//! pod and its slot in the service whose name handed it out. Read from
//! `addr_table` with inline array loads when the address is there
//! (see `headway_common::addr_table`), from `dns_addrs` otherwise.
use headway_common::{
    ADDR_MAX_SERVICES, AddrIndex, AddrKey, AddrSlot, NO_SLOT,
    addr_table::{self, CHECK_WORD, LINE_WORDS, PROBES, SINCE_CHECK_WORD, SINCE_WORD},
};

use crate::{
    maps::{ADDR_TABLE, DNS_ADDRS},
    steer::never_known,
};

/// An answer address as `dns_addrs` has it.
pub struct Known {
    /// The pod that has the address now, or `headway_common::NO_POD`.
    pub pod_id: u32,
    /// Its slot in the service asked about, or `NO_SLOT`.
    pub slot: u32,
}

/// `addr`'s pod and slot in `service_id`, or `None` if `dns_addrs` does
/// not have it.
#[inline(always)]
pub fn known(addr: &AddrKey, service_id: u32) -> Option<Known> {
    if let Some(k) = from_table(addr, service_id) {
        return Some(k);
    }
    // The address filter holds every key of `dns_addrs`: an address
    // outside it needs no hash lookup. It is asked only after the table,
    // which holds the addresses a headless name hands out (filter first:
    // 16 pod addresses cold 983-1033 ns net against 972; 16 others 541-572
    // against 582-592).
    if never_known(addr) {
        return None;
    }
    from_hash(addr, service_id)
}

/// The first line of the table's entry for `addr`, checked, if one of its
/// positions holds a whole one (a read that mixes two versions fails the
/// check: a miss), with a pointer to the entry's words.
#[inline(always)]
fn line(addr: &AddrKey) -> Option<(*const u64, [u64; LINE_WORDS])> {
    let home = addr_table::home(addr);
    let [a0, a1] = addr_table::addr_words(addr);
    for probe in 0..PROBES {
        let e = ADDR_TABLE.get_ptr(addr_table::position(home, probe))?;
        // Each word read once, then checked and used from the copy.
        let w = e.cast::<u64>();
        // SAFETY: aligned words of a live 128-byte map value.
        let word = |i: usize| unsafe { core::ptr::read_volatile(w.add(i)) };
        let check = word(CHECK_WORD);
        if check == 0 {
            // Empty: the address is rarely further on, and a miss only
            // costs the hash lookup.
            return None;
        }
        let words = [a0, a1, check, word(3), word(4), word(5), word(6), word(7)];
        if word(0) != a0 || word(1) != a1 {
            continue;
        }
        if addr_table::check(&words) != check {
            return None;
        }
        return Some((w, words));
    }
    None
}

/// The table's entry for `addr`, if one of its positions holds a whole
/// one: its pod and slot in `service_id`.
#[inline(always)]
fn from_table(addr: &AddrKey, service_id: u32) -> Option<Known> {
    let (_, words) = line(addr)?;
    let pod_id = words[3] as u32;
    let n = (words[3] >> 32) as usize;
    let mut slot = NO_SLOT;
    for i in 0..ADDR_MAX_SERVICES {
        let (id, s, _) = addr_table::slot_of_word(words[4 + i]);
        if i < n && id == service_id {
            slot = u32::from(s);
            break;
        }
    }
    Some(Known { pod_id, slot })
}

/// Everything `dns_addrs` says of `addr` (for connect()), from the table
/// when both lines of its entry there are whole, else from `dns_addrs`.
#[inline(always)]
pub fn index(addr: &AddrKey) -> Option<AddrIndex> {
    if let Some(index) = index_from_table(addr) {
        return Some(index);
    }
    // SAFETY: copied out at once.
    unsafe { DNS_ADDRS.get(addr) }.copied()
}

#[inline(always)]
fn index_from_table(addr: &AddrKey) -> Option<AddrIndex> {
    let (w, words) = line(addr)?;
    // SAFETY: aligned words of the live 128-byte map value `line` found.
    let word = |i: usize| unsafe { core::ptr::read_volatile(w.add(i)) };
    let since = [
        word(SINCE_WORD),
        word(SINCE_WORD + 1),
        word(SINCE_WORD + 2),
        word(SINCE_WORD + 3),
    ];
    if addr_table::since_check(words[CHECK_WORD], &since) != word(SINCE_CHECK_WORD) {
        return None;
    }
    let mut index = AddrIndex {
        pod_id: words[3] as u32,
        n: ((words[3] >> 32) as u32).min(ADDR_MAX_SERVICES as u32),
        ..AddrIndex::default()
    };
    for (i, slot) in index.slots.iter_mut().enumerate() {
        let (service_id, s, flags) = addr_table::slot_of_word(words[4 + i]);
        *slot = AddrSlot {
            service_id,
            slot: s,
            flags,
            since_ns: since[i],
        };
    }
    Some(index)
}

#[inline(always)]
fn from_hash(addr: &AddrKey, service_id: u32) -> Option<Known> {
    let index = DNS_ADDRS.get_ptr(addr)?;
    // SAFETY: fields of a live map value, read one by one.
    let pod_id = unsafe { (*index).pod_id };
    let entries = (unsafe { (*index).n } as usize).min(ADDR_MAX_SERVICES);
    let mut slot = NO_SLOT;
    for j in 0..ADDR_MAX_SERVICES {
        if j >= entries {
            break;
        }
        // SAFETY: as above; `j` is in bounds.
        let e = unsafe { (*index).slots[j] };
        if e.service_id == service_id {
            slot = u32::from(e.slot);
            break;
        }
    }
    Some(Known { pod_id, slot })
}
