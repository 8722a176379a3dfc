//! Per-pod counters. Entries live in `pod_stats`, shared by all CPUs, and
//! are bumped with atomic adds so no increment is lost or doubled.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::bindings::BPF_NOEXIST;
use headway_common::{AddrKey, PodCounters};

use crate::maps::{POD_ADDRS, POD_STATS, STEER_COUNTERS};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

#[inline(always)]
fn add(counter: *mut u64, n: u64) {
    // SAFETY: `counter` points into a live map value (the kernel keeps hash
    // map values alive for the whole program run).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

/// A zero value in read-only data: building one on the stack compiles to a
/// byte-by-byte memset that the verifier walks at every call site.
static ZEROED: PodCounters = PodCounters {
    tcp_connects: 0,
    udp_connects: 0,
    active_tcp: 0,
    bytes_sent: 0,
    bytes_received: 0,
    steered_in: 0,
    steered_away: 0,
    dns_answers: 0,
};

/// The counters of pod `pod_id`, created zeroed if the agent has not made
/// them yet. `None` only when the map is full.
#[inline(always)]
fn counters(pod_id: u32) -> Option<*mut PodCounters> {
    if let Some(ptr) = POD_STATS.get_ptr_mut(pod_id) {
        return Some(ptr);
    }
    // Another CPU may create it at the same time; NOEXIST keeps its counts.
    let _ = POD_STATS.insert(pod_id, &ZEROED, BPF_NOEXIST as u64);
    POD_STATS.get_ptr_mut(pod_id)
}

/// The pod an address belongs to, if any.
#[inline(always)]
pub fn pod_of(addr: &AddrKey) -> Option<u32> {
    // SAFETY: the value is copied out before any other map call.
    unsafe { POD_ADDRS.get(addr) }.map(|p| p.pod_id)
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
    if let Some(stats) = counters(pod_id) {
        // SAFETY: as above.
        unsafe { add(&raw mut (*stats).dns_answers, 1) };
    }
}
