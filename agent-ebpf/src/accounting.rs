//! Per-pod counters. Entries live in `pod_stats`, shared by all CPUs, and
//! are bumped with atomic adds so no increment is lost or doubled.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use headway_common::{AddrKey, PodCounters, steer_counter};

use crate::maps::{POD_ADDRS, POD_DNS_ANSWERS, POD_STATS, STEER_COUNTERS, SVC_STATS};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

#[inline(always)]
fn add(counter: *mut u64, n: u64) {
    // SAFETY: `counter` points into a live map value (the kernel keeps hash
    // map values alive for the whole program run).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

/// The counters of pod `pod_id`: a slot of an array, so the lookup is a
/// bounds check the verifier inlines, not a hash walk. `None` only for an id
/// past the array (the agent never hands one out).
#[inline(always)]
fn counters(pod_id: u32) -> Option<*mut PodCounters> {
    POD_STATS.get_ptr_mut(pod_id)
}

/// The pod an address belongs to, if any.
#[inline(always)]
pub fn pod_of(addr: &AddrKey) -> Option<u32> {
    // SAFETY: the value is copied out before any other map call.
    unsafe { POD_ADDRS.get(addr) }.map(|p| p.pod_id)
}

/// The generation of pod `pod_id`'s slot (see `PodCounters::generation`),
/// its low 32 bits as a socket's record keeps it (a slot would have to be
/// given to 2^32 pods while one socket lives for two to be confused).
#[inline(always)]
pub fn generation(pod_id: u32) -> Option<u32> {
    // SAFETY: a plain read of a live array slot.
    counters(pod_id).map(|stats| unsafe { (*stats).generation } as u32)
}

/// The counters of pod `pod_id`, if its slot still belongs to the pod a
/// socket was marked for (`generation` unchanged): a connection to a pod
/// that is gone never counts towards the next pod given the same id.
#[inline(always)]
fn counters_of(pod_id: u32, generation: u32) -> Option<*mut PodCounters> {
    let stats = counters(pod_id)?;
    // SAFETY: a plain read of a live array slot.
    (unsafe { (*stats).generation } as u32 == generation).then_some(stats)
}

/// One more established TCP connection to the pod.
#[inline(always)]
pub fn open_active(pod_id: u32, generation: u32) {
    if let Some(stats) = counters_of(pod_id, generation) {
        // SAFETY: raw field pointer into the map value.
        unsafe { add(&raw mut (*stats).active_tcp, 1) };
    }
}

/// One established TCP connection to the pod fewer (wrapping add of -1).
#[inline(always)]
pub fn close_active(pod_id: u32, generation: u32) {
    if let Some(stats) = counters_of(pod_id, generation) {
        // SAFETY: as above.
        unsafe { add(&raw mut (*stats).active_tcp, u64::MAX) };
    }
}

/// Adds `sent` bytes sent to and `received` bytes received from the pod
/// (one look at its slot for both; a zero is not added).
#[inline(always)]
pub fn count_bytes(pod_id: u32, generation: u32, sent: u64, received: u64) {
    if let Some(stats) = counters_of(pod_id, generation) {
        // SAFETY: as above.
        unsafe {
            if sent > 0 {
                add(&raw mut (*stats).bytes_sent, sent);
            }
            if received > 0 {
                add(&raw mut (*stats).bytes_received, received);
            }
        }
    }
}

/// Counts a connect() to pod `pod_id`.
#[inline(always)]
pub fn count_connect(pod_id: u32, protocol: u32) {
    let Some(stats) = counters(pod_id) else {
        return;
    };
    // SAFETY: raw field pointers into the map value; no reference is made.
    unsafe {
        match protocol {
            IPPROTO_TCP => add(&raw mut (*stats).tcp_connects, 1),
            IPPROTO_UDP => add(&raw mut (*stats).udp_connects, 1),
            _ => {}
        }
    }
}

/// Counts a connection steered from pod `from` (if the address still was
/// one) to pod `to`.
#[inline(always)]
pub fn count_steer(from: Option<u32>, to: u32) {
    if let Some(stats) = from.and_then(counters) {
        // SAFETY: as above.
        unsafe { add(&raw mut (*stats).steered_away, 1) };
    }
    if let Some(stats) = counters(to) {
        // SAFETY: as above.
        unsafe { add(&raw mut (*stats).steered_in, 1) };
    }
}

/// Adds one to `steer_counters[index]` (per CPU: no atomics needed).
#[inline(always)]
pub fn bump_steer_counter(index: u32) {
    if let Some(slot) = STEER_COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot; BPF programs do not migrate mid-run.
        unsafe { *slot += 1 };
    }
}

/// Counts a DNS answer that handed out an address of pod `pod_id`.
#[inline(always)]
pub fn count_dns_answer(pod_id: u32) {
    if let Some(answers) = POD_DNS_ANSWERS.get_ptr_mut(pod_id) {
        add(answers, 1);
    }
}

/// Counts a connect decision: globally per CPU, and for the service whose
/// name the client resolved, when there is one.
#[inline(always)]
pub fn count_decision(service_id: Option<u32>, reason: u32) {
    bump_steer_counter(reason);
    let Some(stats) = service_id.and_then(|id| SVC_STATS.get_ptr_mut(id)) else {
        return;
    };
    if reason < steer_counter::COUNT {
        // SAFETY: `reason` is in bounds (checked); raw pointer into the map value.
        unsafe { add(&raw mut (*stats).decisions[reason as usize], 1) };
    }
}

/// Counts an answered lookup of one of `service_id`'s names.
#[inline(always)]
pub fn count_lookup(service_id: u32, service_wide: bool) {
    if let Some(stats) = SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: raw field pointers into the map value.
        unsafe {
            if service_wide {
                add(&raw mut (*stats).lookups_service, 1);
            } else {
                add(&raw mut (*stats).lookups_pod, 1);
            }
        }
    }
}
