//! The record headway keeps for a client socket, in the socket table
//! (`sock_cookies` + `sock_records`; layout and claim protocol in
//! `headway_common::sock_table`). Preallocated: a hook that needs a record
//! takes a free slot with one compare-and-swap instead of allocating socket
//! storage, which cost more than the rest of a steered connect() together.
//!
//! Two concerns share a record. Steering: connect()/sendmsg record the
//! address asked for and the pod chosen, so getpeername and recvmsg can
//! report the former. Accounting: the pod the socket talks to, as of which
//! generation of its counters' slot, over which protocol; fixed when the
//! socket connects, so its bytes and its close always go to the pod it
//! really talks to, even if the agent gives the address to another pod
//! meanwhile. Only client sockets are marked for accounting (TCP in
//! `sock_ops` on ACTIVE_ESTABLISHED, or at connect() when it is steered;
//! connected UDP at connect()), so a server pod's own sockets are never
//! counted as traffic to some pod.
//!
//! Records are given back when the socket is done: a TCP socket counted as
//! established on its move to TCP_CLOSE (`sock_ops`), every other one when
//! its owner closes it (`release`).
use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg},
    ptr,
};

use aya_ebpf::{EbpfContext, helpers::bpf_get_socket_cookie};
use aya_log_ebpf::warn;
use headway_common::{AddrKey, SocketState, sock_counter, sock_flags, sock_table};

use crate::{
    accounting::generation,
    kernel_log::{self, event},
    maps::{SOCK_COOKIES, SOCK_COUNTERS, SOCK_RECORDS, SOCK_SPILLS},
};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

const SLOTS: u32 = sock_table::BUCKET_SLOTS;

/// The table's bucket count minus one, as the agent sized the maps
/// (`--max-sockets`): set before the programs load, so the verifier sees
/// a constant.
#[unsafe(no_mangle)]
static SOCK_BUCKET_MASK: u32 = sock_table::BUCKETS - 1;

#[inline(always)]
fn bucket_mask() -> u32 {
    // SAFETY: a read of a read-only global (the volatile read keeps the
    // compiler from folding in the default).
    unsafe { ptr::read_volatile(&raw const SOCK_BUCKET_MASK) }
}

/// The cookie of the socket of a hook's context (the helper takes any
/// context that has a socket). Never 0 for a socket.
#[inline(always)]
pub fn cookie_of<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper only reads the context's socket.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// A socket's place in the table: the slot holding its cookie, and its
/// record.
#[derive(Clone, Copy)]
pub struct Entry {
    cookie: u64,
    slot: *mut u64,
    pub record: *mut SocketState,
    /// The home bucket's spill count, when the entry sits in its spill
    /// bucket.
    spilled_from: Option<u32>,
}

impl Entry {
    /// Whether the slot still holds this socket (a reader that raced with
    /// the socket's close re-checks before trusting what it read).
    #[inline(always)]
    pub fn still_held(&self) -> bool {
        // SAFETY: the slot is an element of a live array map value.
        unsafe { ptr::read_volatile(self.slot) == self.cookie }
    }
}

/// Where `cookie` sits in `bucket`, if it does.
#[inline(always)]
fn scan(bucket: u32, cookie: u64) -> Option<Entry> {
    let cookies = SOCK_COOKIES.get_ptr_mut(bucket)?;
    for i in 0..SLOTS {
        // SAFETY: an element of a live array map value.
        let slot = unsafe { &raw mut (*cookies).cookies[i as usize] };
        // SAFETY: as above.
        if unsafe { ptr::read_volatile(slot) } == cookie {
            let record = SOCK_RECORDS.get_ptr_mut(bucket * SLOTS + i)?;
            return Some(Entry {
                cookie,
                slot,
                record,
                spilled_from: None,
            });
        }
    }
    None
}

/// The record of the socket with `cookie`, if it has one.
#[inline(always)]
pub fn find(cookie: u64) -> Option<Entry> {
    if cookie == 0 {
        return None;
    }
    let (home, spill) = sock_table::buckets(cookie, bucket_mask());
    if let Some(entry) = scan(home, cookie) {
        return Some(entry);
    }
    // Only when some socket of these home buckets spilled (most lookups
    // miss: a socket that has no record), so a miss usually costs one
    // cache line, and the spill buckets' lines (random ones) are not read.
    // SAFETY: an aligned u32 of a live map value.
    if spill_count(home).is_none_or(|n| unsafe { ptr::read_volatile(n) } == 0) {
        return None;
    }
    let spilled = |entry: Entry| Entry {
        spilled_from: Some(home),
        ..entry
    };
    scan(spill[0], cookie)
        .or_else(|| scan(spill[1], cookie))
        .map(spilled)
}

/// The count of spilled sockets `home` shares with its neighbours.
#[inline(always)]
fn spill_count(home: u32) -> Option<*mut u32> {
    SOCK_SPILLS.get_ptr_mut(home / sock_table::HOMES_PER_SPILL_COUNT)
}

/// The record of the socket with `cookie`, taken (zeroed) when it has
/// none. None when both its buckets are full (counted, logged): the caller
/// then fails open.
#[inline(always)]
pub fn find_or_take(cookie: u64) -> Option<Entry> {
    if cookie == 0 {
        return None;
    }
    if let Some(entry) = find(cookie) {
        return Some(entry);
    }
    take(cookie)
}

/// A new record for `cookie`, which the caller just failed to [`find`]
/// (a socket has one record at most: only its own hooks take one, and
/// they run one at a time for it, except unconnected UDP sends; see
/// `release`). None when the table is full (counted and logged) or for
/// cookie 0.
#[inline(always)]
pub fn take(cookie: u64) -> Option<Entry> {
    if cookie == 0 {
        return None;
    }
    // The home bucket while it has room: it is the one the socket's
    // neighbours in time use too (see `headway_common::sock_table`).
    let (home, spill) = sock_table::buckets(cookie, bucket_mask());
    let taken = take_in(home, cookie, None)
        .or_else(|| take_in(spill[0], cookie, Some(home)))
        .or_else(|| take_in(spill[1], cookie, Some(home)));
    if taken.is_none() {
        bump(sock_counter::FULL);
        if kernel_log::due(event::SOCKET_TABLE_FULL) {
            log_table_full();
        }
    }
    taken
}

/// Claims a free slot of `bucket` for `cookie`: reserve it, zero its
/// record, then publish the cookie, so that no reader matches a record
/// still being written.
#[inline(always)]
fn take_in(bucket: u32, cookie: u64, spilled_from: Option<u32>) -> Option<Entry> {
    let cookies = SOCK_COOKIES.get_ptr_mut(bucket)?;
    for i in 0..SLOTS {
        // SAFETY: an element of a live array map value.
        let slot = unsafe { &raw mut (*cookies).cookies[i as usize] };
        // SAFETY: as above.
        if unsafe { ptr::read_volatile(slot) } != 0 {
            continue;
        }
        // SAFETY: an aligned u64 of a live map value.
        let (_, won) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                slot,
                0,
                sock_table::RESERVED,
            )
        };
        if !won {
            continue;
        }
        let Some(record) = SOCK_RECORDS.get_ptr_mut(bucket * SLOTS + i) else {
            // SAFETY: as above; the slot is ours to give back.
            unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(slot, 0) };
            return None;
        };
        // Counted as spilled before it can be found there.
        if let Some(count) = spilled_from.and_then(spill_count) {
            // SAFETY: an aligned u32 of a live map value.
            unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(count, 1) };
        }
        // SAFETY: the record of a slot we hold reserved: nobody else
        // writes it, and no reader matches it yet.
        unsafe {
            ptr::write_volatile(record, SocketState::default());
            atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(slot, cookie);
        }
        bump(sock_counter::TAKEN);
        return Some(Entry {
            cookie,
            slot,
            record,
            spilled_from,
        });
    }
    None
}

/// Gives the record back (if the socket still holds it).
#[inline(always)]
pub fn free(entry: &Entry) {
    // SAFETY: an aligned u64 of a live map value.
    let (_, won) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            entry.slot,
            entry.cookie,
            0,
        )
    };
    if won {
        bump(sock_counter::FREED);
        if let Some(count) = entry.spilled_from.and_then(spill_count) {
            // SAFETY: an aligned u32 of a live map value (wrapping add of -1).
            unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(count, u32::MAX) };
        }
    }
}

/// Adds one to `sock_counters[index]` (per CPU: no atomics needed).
#[inline(always)]
fn bump(index: u32) {
    if let Some(counter) = SOCK_COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot; BPF programs do not migrate mid-run.
        unsafe { *counter += 1 };
    }
}

/// The log line for a full table (see `kernel_log`).
#[inline(never)]
fn log_table_full() {
    warn!(
        &(),
        "socket table full: a socket is neither accounted nor steered transparently"
    );
}

/// Marks the record as its socket talking to pod `pod_id` over
/// `protocol`, keeping any steering it holds. False if the pod has no
/// slot (the socket is then simply not counted: fail open).
///
/// # Safety
/// `record` is the record of an entry the caller's socket holds.
#[inline(always)]
pub unsafe fn mark(record: *mut SocketState, pod_id: u32, protocol: u8) -> bool {
    let Some(generation) = generation(pod_id) else {
        return false;
    };
    // SAFETY: caller's contract.
    unsafe {
        (*record).generation = generation;
        (*record).pod_id = pod_id;
        (*record).protocol = protocol;
        (*record).active = 0;
        (*record).seen_known = 0;
        (*record).flags |= sock_flags::ACCOUNTED;
    }
    true
}

/// A steering as a socket keeps it.
#[derive(Clone, Copy)]
pub struct Steering {
    /// The address the client asked for.
    pub asked: AddrKey,
    /// The pod it goes to instead.
    pub chosen: AddrKey,
    /// The service `asked` was resolved from.
    pub service_id: u32,
}

/// Writes `steering` into a socket's record.
///
/// # Safety
/// As for [`mark`].
#[inline(always)]
pub unsafe fn record_steering(record: *mut SocketState, steering: &Steering) {
    // SAFETY: caller's contract.
    unsafe {
        (*record).asked = steering.asked;
        (*record).chosen = steering.chosen;
        (*record).service_id = steering.service_id;
        (*record).flags |= sock_flags::STEERED;
    }
}

/// The steering of the socket with `cookie`, if it was steered.
#[inline(always)]
pub fn steering(cookie: u64) -> Option<Steering> {
    let entry = find(cookie)?;
    let record = entry.record;
    // SAFETY: the record of the socket's own entry; copied out at once.
    unsafe {
        ((*record).flags & sock_flags::STEERED != 0).then(|| Steering {
            asked: (*record).asked,
            chosen: (*record).chosen,
            service_id: (*record).service_id,
        })
    }
}
