//! connect4/connect6: the per-connection hooks on the attached cgroup
//! (TCP, and UDP sockets that connect). They account the connection and,
//! when `steer` says so, rewrite its destination; the port is never
//! touched. They always let the call proceed.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use headway_common::{AddrKey, sock_flags};

use crate::{
    sock_addr::{set_user_ip6, user_ip6, user_port},
    sock_state::{IPPROTO_UDP, drop_state, mark, record_steering, set_steered},
    steer::{Request, on_connect},
    transparency::socket,
};

/// Return value of a sock_addr hook that lets the call proceed.
const ALLOW: i32 = 1;

/// What both hooks do once the destination is read: decide, account, keep
/// the socket's record up to date, and on a steering let `write` put the
/// new address in the context.
///
/// The record: a steered socket remembers (asked, chosen) for
/// getpeername/recvmsg, and is marked for the pod chosen in the same
/// record (sock_ops then finds a steered TCP socket's pod there, with no
/// lookup). A connected UDP socket is marked for the pod it talks to (its
/// bytes are counted from here on); an unsteered TCP socket is marked once
/// established (`sock_ops`). A UDP socket can connect again, elsewhere, so
/// an unsteered UDP connect clears what an earlier one left; a TCP socket
/// connects once and needs no such care.
///
/// # Safety
/// `ctx` is the hook's context.
#[inline(always)]
unsafe fn connect(ctx: &SockAddrContext, dst: AddrKey, write: impl FnOnce(&AddrKey)) {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands the hook a valid bpf_sock_addr.
    let req = unsafe {
        Request {
            dst,
            port: user_port(sa),
            protocol: (*sa).protocol,
        }
    };
    let to = on_connect(ctx, &req);
    let udp = req.protocol == u32::from(IPPROTO_UDP);
    let sk = socket(ctx);
    // SAFETY: the hook's own socket, valid for the hook's duration; the
    // records returned are this socket's storage (or null).
    unsafe {
        if let Some(steering) = to.steered {
            // Marked and steered in the same record: one storage lookup,
            // not two.
            let state = match to.pod {
                Some(pod_id) => mark(sk, pod_id, req.protocol as u8),
                None => core::ptr::null_mut(),
            };
            if state.is_null() {
                set_steered(sk, &steering);
            } else {
                record_steering(state, &steering);
            }
            write(&steering.chosen);
        } else if udp {
            match to.pod {
                Some(pod_id) => {
                    let state = mark(sk, pod_id, IPPROTO_UDP);
                    if !state.is_null() {
                        (*state).flags &= !sock_flags::STEERED;
                    }
                }
                None => drop_state(sk),
            }
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn hw_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands the hook a valid bpf_sock_addr.
    unsafe {
        let dst = AddrKey::from_v4_be((*sa).user_ip4);
        connect(&ctx, dst, |new| (*sa).user_ip4 = new.addr[3]);
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn hw_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands the hook a valid bpf_sock_addr.
    unsafe {
        connect(&ctx, user_ip6(sa), |new| set_user_ip6(sa, new));
    }
    ALLOW
}
