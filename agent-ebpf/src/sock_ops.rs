//! sock_ops: the exact number of established TCP connections per pod.
//!
//! ACTIVE_ESTABLISHED (a connect() on this node completed its handshake)
//! to a pod address marks the socket (`sock_state`; a steered socket was
//! marked at connect() already), asks the kernel for state-change
//! callbacks and adds one to the pod's `active_tcp`. An address outside
//! the address filter costs nothing more than the filter's one read. The
//! callback for the move to TCP_CLOSE takes it back, once: the mark's
//! `active` flag is cleared on the way. Every end of a connection goes
//! through TCP_CLOSE (FIN either way, reset, timeout, the owner exiting);
//! a refused or timed-out connect never reached ESTABLISHED and was never
//! counted. The mark and the callback flag live on the socket, so a
//! program swapped into the pinned link by a restarted agent closes what
//! the previous one opened.
use aya_ebpf::bindings::bpf_sock;
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use headway_common::{AddrKey, SocketState, sock_flags};

use crate::{
    accounting::{close_active, open_active, pod_of},
    sock_state::{IPPROTO_TCP, mark, state_of},
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
    // SAFETY: the context's socket (null for non-full sockets).
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: non-null socket of this context.
    let slot = unsafe { marked_or_mark(sk, &remote) };
    if slot.is_null() {
        return;
    }
    // Without the state callback the close would go unseen: then the
    // connection is not counted as active at all (its bytes still are).
    if ctx
        .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_err()
    {
        return;
    }
    // SAFETY: non-null storage of this socket; sock_ops runs under the
    // socket's lock, so `active` has one writer at a time.
    unsafe {
        (*slot).active = 1;
        open_active((*slot).pod_id, (*slot).generation);
    }
}

/// The socket's record, marked for the pod it talks to: as connect() left
/// it for a steered socket (marked for the pod chosen), else marked now
/// for the pod that has `remote` (null if none, or no storage).
///
/// # Safety
/// `sk` is the context's non-null full socket.
#[inline(always)]
unsafe fn marked_or_mark(sk: *mut bpf_sock, remote: &AddrKey) -> *mut SocketState {
    // SAFETY: caller's contract; a lookup without create.
    let slot = unsafe { state_of(sk) };
    // SAFETY: non-null storage of this socket.
    if !slot.is_null() && unsafe { (*slot).flags } & sock_flags::ACCOUNTED != 0 {
        return slot;
    }
    let Some(pod_id) = pod_of(remote) else {
        return core::ptr::null_mut();
    };
    // SAFETY: caller's contract.
    unsafe { mark(sk, pod_id, IPPROTO_TCP) }
}

#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    // SAFETY: as above.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: as above; a lookup without create.
    let slot = unsafe { state_of(sk) };
    if slot.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket, under the socket's lock.
    unsafe {
        if (*slot).active != 0 {
            (*slot).active = 0;
            close_active((*slot).pod_id, (*slot).generation);
        }
    }
}
