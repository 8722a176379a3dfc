//! What the agent says of an answer address, for the DNS interceptor: its
//! pod and its slot in the service whose name handed it out. Read from
//! `dns_addr_table` with inline array loads when the address is there
//! (see `headway_common::addr_table`), from `dns_addrs` otherwise.
use headway_common::{
    ADDR_MAX_SERVICES, AddrKey, NO_SLOT,
    addr_table::{self, PROBES},
};

use crate::maps::{DNS_ADDR_TABLE, DNS_ADDRS};

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
    match from_table(addr, service_id) {
        Some(k) => Some(k),
        None => from_hash(addr, service_id),
    }
}

/// The table's entry for `addr`, if one of its positions holds a whole
/// one (a read that mixes two versions fails the check: a miss).
#[inline(always)]
fn from_table(addr: &AddrKey, service_id: u32) -> Option<Known> {
    let home = addr_table::home(addr);
    for probe in 0..PROBES {
        let Some(e) = DNS_ADDR_TABLE.get_ptr(addr_table::position(home, probe)) else {
            return None;
        };
        // Each word read once, then checked and used from the copy.
        // SAFETY: fields of a live map value.
        let (stored, check, pod_id, n, slots) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*e).addr),
                core::ptr::read_volatile(&raw const (*e).check),
                core::ptr::read_volatile(&raw const (*e).pod_id),
                core::ptr::read_volatile(&raw const (*e).n),
                core::ptr::read_volatile(&raw const (*e).slots),
            )
        };
        if check == 0 {
            // Empty: the address is rarely further on, and a miss only
            // costs the hash lookup.
            return None;
        }
        if stored != *addr {
            continue;
        }
        if addr_table::check(&stored, pod_id, n, &slots) != check {
            return None;
        }
        let mut slot = NO_SLOT;
        for (i, word) in slots.iter().enumerate() {
            let (id, s) = addr_table::slot_of_word(*word);
            if i < n as usize && id == service_id {
                slot = s;
                break;
            }
        }
        return Some(Known { pod_id, slot });
    }
    None
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
            slot = e.slot;
            break;
        }
    }
    Some(Known { pod_id, slot })
}
