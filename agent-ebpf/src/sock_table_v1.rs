//! Adopting records from the socket table as older agents kept it
//! (`headway_common::sock_table_v1`: `sock_cookies` + `sock_records` +
//! `sock_spills`). An agent that finds those maps pinned when it replaces
//! the programs passes them to its own (and says so in `SOCK_V1_LIVE`):
//! the sockets the old programs gave records to still need them (a
//! steered socket's getpeername, the bytes and the close of a counted
//! one). A lookup that misses in `sock_table` then looks there, and moves
//! the record it finds into `sock_table`, so the old table only drains.
//!
//! The move is claimed on the old slot (its cookie swapped for
//! `RESERVED`), so that of two hooks of one socket adopting at once (a
//! packet going out on another CPU during its close), one moves the
//! record and the other waits for it, then finds it in `sock_table`. The
//! new slot is written in full before the socket can be found there.
use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg},
    ptr,
};

use headway_common::{SocketRecord, sock_counter, sock_flags, sock_table::RESERVED, sock_table_v1};

use crate::{
    maps::{SOCK_COOKIES_V1, SOCK_RECORDS_V1, SOCK_SPILLS_V1},
    sock_table::{IPPROTO_UDP, bump, take_with},
};

/// 1 when the agent passed the older table's maps in (set before the
/// programs load, like the mask of its buckets).
#[unsafe(no_mangle)]
static SOCK_V1_LIVE: u32 = 0;
#[unsafe(no_mangle)]
static SOCK_V1_BUCKET_MASK: u32 = 0;

/// How long a hook waits for another CPU's move of the same record
/// (reads of the old slot; a move takes well under a microsecond).
const WAIT_READS: u32 = 64;

/// Moves the record of the socket with `cookie` from the older table into
/// `sock_table`, if the agent handed the programs one and it has that
/// socket. True if the socket's record is in `sock_table` now (moved
/// here, or by another CPU meanwhile). Every lookup that misses asks: the
/// test of `SOCK_V1_LIVE` is inline, the move out of line (a call and its
/// return cost ~12 ns here, which no lookup should pay for nothing).
#[inline(always)]
pub fn adopt(cookie: u64) -> bool {
    // SAFETY: a read of a read-only global (volatile: the agent sets it).
    let live = unsafe { ptr::read_volatile(&raw const SOCK_V1_LIVE) };
    live != 0 && adopt_from_older_table(cookie)
}

#[inline(never)]
fn adopt_from_older_table(cookie: u64) -> bool {
    // SAFETY: as above.
    let mask = unsafe { ptr::read_volatile(&raw const SOCK_V1_BUCKET_MASK) };
    if cookie == 0 || cookie == RESERVED {
        return false;
    }
    let (home, spill) = sock_table_v1::buckets(cookie, mask);
    let found = locate(home, cookie).map(|(slot, index)| (slot, index, false));
    let found = found.or_else(|| {
        // SAFETY: an aligned u32 of a live map value.
        let spilled = spill_count(home).is_some_and(|n| unsafe { ptr::read_volatile(n) } != 0);
        if !spilled {
            return None;
        }
        locate(spill[0], cookie)
            .or_else(|| locate(spill[1], cookie))
            .map(|(slot, index)| (slot, index, true))
    });
    let Some((slot, index, spilled)) = found else {
        return false;
    };
    // SAFETY: an aligned u64 of a live map value.
    let (_, won) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            slot, cookie, RESERVED,
        )
    };
    if !won {
        // Another CPU is moving it (or the socket's close freed it).
        for _ in 0..WAIT_READS {
            // SAFETY: as above.
            if unsafe { ptr::read_volatile(slot) } != RESERVED {
                return true;
            }
        }
        return false;
    }
    let Some(old) = SOCK_RECORDS_V1.get_ptr(index) else {
        // SAFETY: as above; the slot is ours to give back.
        unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(slot, cookie) };
        return false;
    };
    // SAFETY: the record of a slot we hold reserved: no other hook writes it.
    let record = unsafe { converted(old) };
    if take_with(cookie, &record).is_none() {
        // `sock_table` full (counted there): the record stays where it was.
        // SAFETY: as above.
        unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(slot, cookie) };
        return false;
    }
    // SAFETY: as above.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(slot, 0) };
    if spilled && let Some(count) = spill_count(home) {
        // SAFETY: an aligned u32 of a live map value (wrapping add of -1).
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(count, u32::MAX) };
    }
    // `take_with` counted one taken: the old record is one freed.
    bump(sock_counter::FREED);
    true
}

/// The slot of bucket `bucket` of `sock_cookies` holding `cookie`, and the
/// index of its record.
#[inline(always)]
fn locate(bucket: u32, cookie: u64) -> Option<(*mut u64, u32)> {
    let cookies = SOCK_COOKIES_V1.get_ptr_mut(bucket)?;
    for i in 0..sock_table_v1::BUCKET_SLOTS {
        // SAFETY: an element of a live array map value.
        let slot = unsafe { &raw mut (*cookies).cookies[i as usize] };
        // SAFETY: as above.
        if unsafe { ptr::read_volatile(slot) } == cookie {
            return Some((slot, bucket * sock_table_v1::BUCKET_SLOTS + i));
        }
    }
    None
}

#[inline(always)]
fn spill_count(home: u32) -> Option<*mut u32> {
    SOCK_SPILLS_V1.get_ptr_mut(home / sock_table_v1::HOMES_PER_SPILL_COUNT)
}

/// An older record in this table's layout. The counters' seen values and
/// the generation keep their low 32 bits, as records here do. A TCP
/// socket whose counters were never seen (not established yet) starts
/// from 0, where they stand until it is.
///
/// # Safety
/// `old` points at a live record no other hook writes.
#[inline(always)]
unsafe fn converted(old: *const sock_table_v1::SocketState) -> SocketRecord {
    // SAFETY: caller's contract; field reads.
    unsafe {
        let udp = if (*old).protocol == IPPROTO_UDP {
            sock_flags::UDP
        } else {
            0
        };
        let (sent_seen, received_seen) = if (*old).seen_known != 0 {
            ((*old).sent_seen as u32, (*old).received_seen as u32)
        } else {
            (0, 0)
        };
        SocketRecord {
            asked: (*old).asked,
            chosen: (*old).chosen,
            pod_id: (*old).pod_id,
            generation: (*old).generation as u32,
            sent_seen,
            received_seen,
            service_id: (*old).service_id as u16,
            flags: ((*old).flags & (sock_flags::STEERED | sock_flags::ACCOUNTED)) | udp,
            active: (*old).active,
        }
    }
}
