//! Per-pod counters. Entries live in `pod_stats`, shared by all CPUs, and
//! are bumped with atomic adds so no increment is lost or doubled.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::bindings::BPF_NOEXIST;
use headway_common::{AddrKey, PodCounters};

use crate::maps::{POD_ADDRS, POD_STATS};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

#[inline(always)]
fn add(counter: *mut u64, n: u64) {
    // SAFETY: `counter` points into a live map value (the kernel keeps hash
    // map values alive for the whole program run).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, n) };
}

/// The counters of pod `pod_id`, created zeroed if the agent has not made
/// them yet. `None` only when the map is full.
#[inline(always)]
fn counters(pod_id: u32) -> Option<*mut PodCounters> {
    if let Some(ptr) = POD_STATS.get_ptr_mut(pod_id) {
        return Some(ptr);
    }
    // Another CPU may create it at the same time; NOEXIST keeps its counts.
    let _ = POD_STATS.insert(pod_id, PodCounters::default(), BPF_NOEXIST as u64);
    POD_STATS.get_ptr_mut(pod_id)
}

/// Counts a connect() towards `dst` if it is the address of a known pod.
/// Anything else costs one hash lookup.
#[inline(always)]
pub fn count_connect(dst: &AddrKey, protocol: u32) {
    // SAFETY: the value is only read, and copied before the next map call.
    let Some(pod) = (unsafe { POD_ADDRS.get(dst) }).copied() else {
        return;
    };
    let Some(stats) = counters(pod.pod_id) else {
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
