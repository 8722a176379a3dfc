//! The record headway keeps for a client socket, in the socket table
//! (`sock_table`: one cache line per socket; layout and claim protocol in
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
use headway_common::{AddrKey, SockSlot, SocketRecord, sock_counter, sock_flags, sock_table};

use crate::{
    accounting::generation,
    kernel_log::{self, event},
    maps::{SOCK_COUNTERS, SOCK_TABLE},
    sock_table_v1,
};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The table's position count minus one, as the agent sized the map
/// (`--max-sockets`): set before the programs load, so the verifier sees
/// a constant.
#[unsafe(no_mangle)]
static SOCK_TABLE_MASK: u32 = sock_table::positions_for(headway_common::capacity::SOCKETS) - 1;

#[inline(always)]
fn mask() -> u32 {
    // SAFETY: a read of a read-only global (the volatile read keeps the
    // compiler from folding in the default).
    unsafe { ptr::read_volatile(&raw const SOCK_TABLE_MASK) }
}

/// The cookie of the socket of a hook's context (the helper takes any
/// context that has a socket). Never 0 for a socket.
#[inline(always)]
pub fn cookie_of<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper only reads the context's socket.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// A socket's place in the table, and its record.
#[derive(Clone, Copy)]
pub struct Entry {
    cookie: u64,
    slot: *mut SockSlot,
    pub record: *mut SocketRecord,
    /// The home position, when the entry sits at a spill position.
    displaced_from: Option<u32>,
}

impl Entry {
    /// Whether the slot still holds this socket (a reader that raced with
    /// the socket's close re-checks before trusting what it read).
    #[inline(always)]
    pub fn still_held(&self) -> bool {
        // SAFETY: the slot is a live array map value.
        unsafe { ptr::read_volatile(&raw const (*self.slot).cookie) == self.cookie }
    }
}

/// The slot at `position`, if it holds `cookie`.
#[inline(always)]
fn holding(position: u32, cookie: u64) -> Option<*mut SockSlot> {
    let slot = SOCK_TABLE.get_ptr_mut(position)?;
    // SAFETY: a field of a live array map value.
    (unsafe { ptr::read_volatile(&raw const (*slot).cookie) } == cookie).then_some(slot)
}

#[inline(always)]
fn entry(cookie: u64, slot: *mut SockSlot, displaced_from: Option<u32>) -> Entry {
    Entry {
        cookie,
        slot,
        // SAFETY: a field of the same live value.
        record: unsafe { &raw mut (*slot).record },
        displaced_from,
    }
}

/// The record of the socket with `cookie`, if it has one: in this table,
/// or adopted from the one older agents kept (`sock_table_v1`).
#[inline(always)]
pub fn find(cookie: u64) -> Option<Entry> {
    if cookie == 0 {
        return None;
    }
    find_here(cookie).or_else(|| {
        if sock_table_v1::adopt(cookie) {
            find_here(cookie)
        } else {
            None
        }
    })
}

/// The record of the socket with `cookie` in this table, if it has one.
#[inline(always)]
pub fn find_here(cookie: u64) -> Option<Entry> {
    let mask = mask();
    let home = sock_table::home(cookie, mask);
    let home_slot = SOCK_TABLE.get_ptr_mut(home)?;
    // SAFETY: fields of a live array map value.
    unsafe {
        if ptr::read_volatile(&raw const (*home_slot).cookie) == cookie {
            return Some(entry(cookie, home_slot, None));
        }
        // Most lookups that miss at home stop here, on the same line:
        // only a socket whose home was taken sits elsewhere.
        if ptr::read_volatile(&raw const (*home_slot).displaced) == 0 {
            return None;
        }
    }
    let walk = sock_table::spill_walk(cookie);
    for i in 1..=sock_table::SPILL_PROBES {
        if let Some(slot) = holding(sock_table::spill_position(walk, i, mask), cookie) {
            return Some(entry(cookie, slot, Some(home)));
        }
    }
    None
}

/// The record of the socket with `cookie`, taken (zeroed) when it has
/// none. None when the table is full for it (counted, logged): the caller
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
    take_with(cookie, &SocketRecord::default())
}

/// As [`take`], with the record written as `record` before the socket can
/// be found there.
#[inline(always)]
pub fn take_with(cookie: u64, record: &SocketRecord) -> Option<Entry> {
    if cookie == 0 {
        return None;
    }
    let mask = mask();
    let home = sock_table::home(cookie, mask);
    if let Some(entry) = take_at(home, cookie, None, record) {
        return Some(entry);
    }
    let walk = sock_table::spill_walk(cookie);
    for i in 1..=sock_table::SPILL_PROBES {
        let position = sock_table::spill_position(walk, i, mask);
        if let Some(entry) = take_at(position, cookie, Some(home), record) {
            return Some(entry);
        }
    }
    bump(sock_counter::FULL);
    if kernel_log::due(event::SOCKET_TABLE_FULL) {
        log_table_full();
    }
    None
}

/// Claims the slot at `position` for `cookie` if it is free: reserve it,
/// write its record, then publish the cookie, so that no reader matches a
/// record still being written.
#[inline(always)]
fn take_at(
    position: u32,
    cookie: u64,
    displaced_from: Option<u32>,
    record: &SocketRecord,
) -> Option<Entry> {
    let slot = SOCK_TABLE.get_ptr_mut(position)?;
    // SAFETY: a field of a live array map value.
    let cookie_field = unsafe { &raw mut (*slot).cookie };
    // SAFETY: as above.
    if unsafe { ptr::read_volatile(cookie_field) } != 0 {
        return None;
    }
    // SAFETY: an aligned u64 of a live map value.
    let (_, won) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            cookie_field,
            0,
            sock_table::RESERVED,
        )
    };
    if !won {
        return None;
    }
    // Counted at home before it can be found here.
    if let Some(home) = displaced_from {
        add_displaced(home, 1);
    }
    // SAFETY: the record of a slot we hold reserved: nobody else writes
    // it, and no reader matches it yet. `displaced` belongs to the
    // position, not the record, and is left alone.
    unsafe {
        ptr::write_volatile(&raw mut (*slot).record, *record);
        atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(cookie_field, cookie);
    }
    bump(sock_counter::TAKEN);
    Some(entry(cookie, slot, displaced_from))
}

/// Adds `n` (wrapping: `u32::MAX` takes one away) to the count of
/// sockets displaced from `home`.
#[inline(always)]
fn add_displaced(home: u32, n: u32) {
    if let Some(home_slot) = SOCK_TABLE.get_ptr_mut(home) {
        // SAFETY: an aligned u32 of a live map value.
        unsafe {
            atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(&raw mut (*home_slot).displaced, n)
        };
    }
}

/// Gives the record back (if the socket still holds it).
#[inline(always)]
pub fn free(entry: &Entry) {
    // SAFETY: an aligned u64 of a live map value.
    let (_, won) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*entry.slot).cookie,
            entry.cookie,
            0,
        )
    };
    if won {
        bump(sock_counter::FREED);
        if let Some(home) = entry.displaced_from {
            add_displaced(home, u32::MAX);
        }
    }
}

/// Adds one to `sock_counters[index]` (per CPU: no atomics needed).
#[inline(always)]
pub fn bump(index: u32) {
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
/// `protocol` (TCP or UDP), keeping any steering it holds. False if the
/// pod has no slot (the socket is then simply not counted: fail open).
///
/// # Safety
/// `record` is the record of an entry the caller's socket holds.
#[inline(always)]
pub unsafe fn mark(record: *mut SocketRecord, pod_id: u32, protocol: u8) -> bool {
    let Some(generation) = generation(pod_id) else {
        return false;
    };
    let udp = if protocol == IPPROTO_UDP {
        sock_flags::UDP
    } else {
        0
    };
    // SAFETY: caller's contract.
    unsafe {
        (*record).generation = generation;
        (*record).pod_id = pod_id;
        (*record).active = 0;
        (*record).sent_seen = 0;
        (*record).received_seen = 0;
        (*record).flags = ((*record).flags & sock_flags::STEERED) | sock_flags::ACCOUNTED | udp;
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
pub unsafe fn record_steering(record: *mut SocketRecord, steering: &Steering) {
    // SAFETY: caller's contract.
    unsafe {
        (*record).asked = steering.asked;
        (*record).chosen = steering.chosen;
        // Service ids are below `MAX_SERVICES` (the agent's limit).
        (*record).service_id = steering.service_id as u16;
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
            service_id: u32::from((*record).service_id),
        })
    }
}
