//! sock_ops: the exact number of established TCP connections per pod.
//!
//! ACTIVE_ESTABLISHED (a connect() on this node completed its handshake)
//! to a pod address marks the socket's record (`sock_table`; a steered
//! socket was marked at connect() already), asks the kernel for
//! state-change callbacks and adds one to the pod's `active_tcp`. An
//! address outside the address filter costs nothing more than the
//! filter's one read. The callback for the move to TCP_CLOSE takes it
//! back, once (the record's `active` flag is cleared on the way), counts
//! the bytes delivered since the socket's last packet, and gives the
//! record back (any record an established socket has: `release` leaves
//! them all to this program). Every end of a connection goes through
//! TCP_CLOSE (FIN either way, reset, timeout, the owner exiting); a
//! refused or timed-out connect never reached ESTABLISHED and was never
//! counted (its record, if connect() took one, goes back when its owner
//! closes it: `release`). The record and the callback flag outlive the
//! agent, so a program swapped into the pinned link by a restarted agent
//! closes what the previous one opened.
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use headway_common::{AddrKey, sock_flags};

use crate::{
    accounting::{close_active, open_active, pod_of},
    bytes::{count_delivered, set_seen},
    sock_table::{Entry, IPPROTO_TCP, cookie_of, find, free, mark, take},
    steer::never_known,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The return value of sock_ops matters only for ops that ask for a
/// reply; 1 is the conventional "ok".
const OK: u32 = 1;

#[sock_ops]
pub fn hw_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => closed(&ctx),
        _ => {}
    }
    OK
}

/// The peer of the connection. An IPv6 socket talking IPv4 reports the
/// v4-mapped address, which is how `pod_addrs` keys IPv4 anyway.
#[inline(always)]
fn remote(ctx: &SockOpsContext) -> Option<AddrKey> {
    let ops = ctx.ops;
    // SAFETY: reads of the context; each word of remote_ip6 on its own, at
    // a fixed offset, as the verifier wants.
    unsafe {
        match (*ops).family {
            AF_INET => Some(AddrKey::from_v4_be((*ops).remote_ip4)),
            AF_INET6 => Some(AddrKey::from_v6_words([
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[3]),
            ])),
            _ => None,
        }
    }
}

#[inline(always)]
fn established(ctx: &SockOpsContext) {
    // Most connections on a node go to no pod: one filter read says so.
    let Some(remote) = remote(ctx).filter(|a| !never_known(a)) else {
        return;
    };
    // Every record of an established socket is given back at its close
    // (`release` leaves connected TCP sockets to this program), so the
    // close must be seen even when the socket is not counted (a steered
    // socket whose pod's counters could not be marked).
    let Some((entry, accounted)) = record_marked(cookie_of(ctx), &remote) else {
        return;
    };
    // Cannot fail for an established (full) socket with a known flag; if
    // it did, the record would stay taken until `headway reset`.
    if ctx
        .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_err()
        || !accounted
    {
        return;
    }
    let record = entry.record;
    // SAFETY: this socket's record; sock_ops runs under the socket's lock,
    // so `active` has one writer at a time. Nothing was delivered yet
    // either way (the SYN counts in `bytes_acked`, and is no byte): from
    // here on, what the counters grow by is payload.
    unsafe {
        set_seen(record, (*ctx.ops).bytes_acked, (*ctx.ops).bytes_received);
        (*record).active = 1;
        open_active((*record).pod_id, (*record).generation);
    }
}

/// The socket's record, if it has one, and whether it is marked for the
/// pod it talks to: as connect() left it for a steered socket (marked for
/// the pod chosen), else marked now for the pod that has `remote` (a
/// record taken for it if it had none). None when the socket has no
/// record and gets none.
#[inline(always)]
fn record_marked(cookie: u64, remote: &AddrKey) -> Option<(Entry, bool)> {
    let found = find(cookie);
    if let Some(entry) = found {
        // SAFETY: this socket's record.
        if unsafe { (*entry.record).flags } & sock_flags::ACCOUNTED != 0 {
            return Some((entry, true));
        }
    }
    let Some(pod_id) = pod_of(remote) else {
        return found.map(|entry| (entry, false));
    };
    // The lookup above already missed: take a slot without a second one.
    let entry = found.or_else(|| take(cookie))?;
    // SAFETY: this socket's record.
    if unsafe { mark(entry.record, pod_id, IPPROTO_TCP) } {
        return Some((entry, true));
    }
    // SAFETY: as above.
    if unsafe { (*entry.record).flags } == 0 {
        free(&entry);
        return None;
    }
    Some((entry, false))
}

#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    let Some(entry) = find(cookie_of(ctx)) else {
        return;
    };
    let record = entry.record;
    // SAFETY: this socket's record, under the socket's lock; the context's
    // counters are the socket's own.
    unsafe {
        if (*record).active != 0 {
            (*record).active = 0;
            close_active((*record).pod_id, (*record).generation);
        }
        let flags = (*record).flags;
        if flags & sock_flags::ACCOUNTED != 0 && flags & sock_flags::UDP == 0 {
            count_delivered(record, (*ctx.ops).bytes_acked, (*ctx.ops).bytes_received);
        }
    }
    // The socket sends and receives nothing more: its record can go.
    free(&entry);
}
