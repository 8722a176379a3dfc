//! cgroup/sock_release: a socket's owner closed it. Its record in the
//! socket table goes back, unless the socket is a TCP connection that was
//! established: TCP goes on after close() (FIN, the last ACKs), and
//! `sock_ops` gives every such record back on the move to TCP_CLOSE,
//! after the last bytes. Those are told by their state alone, without a
//! lookup (most sockets that close are such connections).
//!
//! Runs for every socket of the cgroup, so a socket connected to an
//! address outside the address filter costs one filter read: it cannot
//! have a record (a UDP socket that connects elsewhere gives its record
//! back at that connect()). Sockets without a peer look their cookie up:
//! an unconnected UDP socket that sent to a pod has a record, and so may a
//! TCP socket whose connect() failed.
use aya_ebpf::{
    bindings::{
        BPF_TCP_CLOSE_WAIT, BPF_TCP_CLOSING, BPF_TCP_ESTABLISHED, BPF_TCP_FIN_WAIT1,
        BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK, BPF_TCP_TIME_WAIT, bpf_sock,
    },
    macros::cgroup_sock,
    programs::SockContext,
};
use headway_common::AddrKey;

use crate::{
    sock_table::{cookie_of, find, free},
    steer::never_known,
};

/// The hook's return value is ignored for release; 1 is "ok".
const OK: i32 = 1;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[cgroup_sock(sock_release)]
pub fn hw_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the socket the kernel handed the hook.
    if unsafe { was_established(ctx.sock) || talks_to_no_pod(ctx.sock) } {
        return OK;
    }
    let cookie = cookie_of(&ctx);
    // Twice: two threads sending on one unconnected UDP socket at once
    // can each have taken a record for it (sendmsg runs without the
    // socket's lock).
    for _ in 0..2 {
        let Some(entry) = find(cookie) else {
            break;
        };
        // SAFETY: this socket's record; its owner is closing it.
        if unsafe { (*entry.record).active } != 0 {
            break;
        }
        free(&entry);
    }
    OK
}

const IPPROTO_TCP: u32 = 6;

/// A TCP socket in a state only an established connection reaches: its
/// record, if it has one, is `sock_ops`' to give back at TCP_CLOSE.
///
/// # Safety
/// `sk` is the hook's socket.
#[inline(always)]
unsafe fn was_established(sk: *mut bpf_sock) -> bool {
    // SAFETY: reads of the context.
    let (protocol, state) = unsafe { ((*sk).protocol, (*sk).state) };
    protocol == IPPROTO_TCP
        && matches!(
            state,
            BPF_TCP_ESTABLISHED
                | BPF_TCP_FIN_WAIT1
                | BPF_TCP_FIN_WAIT2
                | BPF_TCP_TIME_WAIT
                | BPF_TCP_CLOSE_WAIT
                | BPF_TCP_LAST_ACK
                | BPF_TCP_CLOSING
        )
}

/// A socket connected to an address the filter does not hold.
///
/// # Safety
/// `sk` is the hook's socket.
#[inline(always)]
unsafe fn talks_to_no_pod(sk: *mut bpf_sock) -> bool {
    // SAFETY: reads of the context; each word of dst_ip6 on its own, at a
    // fixed offset, as the verifier wants.
    unsafe {
        let peer = match (*sk).family {
            AF_INET => AddrKey::from_v4_be((*sk).dst_ip4),
            AF_INET6 => AddrKey::from_v6_words([
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[0]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[1]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[2]),
                core::ptr::read_volatile(&raw const (*sk).dst_ip6[3]),
            ]),
            _ => return false,
        };
        let unset = peer == AddrKey::from_v4_be(0) || peer == AddrKey::default();
        !unset && never_known(&peer)
    }
}
