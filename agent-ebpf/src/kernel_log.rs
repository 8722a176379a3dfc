//! Rare events worth a line in the agent's log (aya-log: the programs
//! write records to a ring buffer the agent drains into its own log). Never
//! the normal path: each kind of event logs at most once per second per
//! CPU, so an outage that makes every connect fail open cannot flood the
//! ring or the log; the counters count every occurrence.
use aya_ebpf::{btf_maps::PerCpuArray, helpers::bpf_ktime_get_ns, macros::btf_map};

/// Kinds of events, each with its own clock.
pub mod event {
    /// A connection to be steered found no eligible pod (fail open).
    pub const NO_ELIGIBLE_POD: u32 = 0;
    /// A socket found no free record in the socket table (fail open: it
    /// is neither accounted nor steered transparently).
    pub const SOCKET_TABLE_FULL: u32 = 1;
    pub const COUNT: u32 = 2;
}

const INTERVAL_NS: u64 = 1_000_000_000;

/// When each kind of event was last logged on this CPU. Not pinned: losing
/// it on a restart costs at most one extra line.
#[btf_map(name = "log_clock")]
static LOG_CLOCK: PerCpuArray<u64, { event::COUNT as usize }> = PerCpuArray::new();

/// Whether an event of kind `event` may be logged now (and, if so, starts
/// its quiet second).
#[inline(always)]
pub fn due(event: u32) -> bool {
    let Some(last) = LOG_CLOCK.get_ptr_mut(event) else {
        return false;
    };
    // SAFETY: a plain helper call; then this CPU's slot of a live map.
    unsafe {
        let now = bpf_ktime_get_ns();
        if *last != 0 && now.wrapping_sub(*last) < INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}
