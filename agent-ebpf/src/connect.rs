//! connect4/connect6: the per-connection hooks on the attached cgroup
//! (TCP, and UDP sockets that connect). They account the connection and,
//! when `steer` says so, rewrite its destination; the port is never
//! touched. They always let the call proceed.
use core::cell::Cell;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use headway_common::{AddrKey, sock_flags};

use crate::{
    sock_addr::{set_user_ip6, user_ip6, user_port},
    sock_table::{IPPROTO_UDP, find, find_or_take, free, mark, record_steering},
    steer::{Request, on_connect},
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
/// connects once and needs no such care. With no record to be had (table
/// full) a steering still happens, without transparency: the connection
/// reaches a live pod either way.
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
            cookie: Cell::new(0),
        }
    };
    let to = on_connect(ctx, &req);
    let udp = req.protocol == u32::from(IPPROTO_UDP);
    // SAFETY: each record is this socket's own entry's.
    unsafe {
        if let Some(steering) = to.steered {
            if let Some(entry) = find_or_take(req.cookie(ctx)) {
                if let Some(pod_id) = to.pod {
                    mark(entry.record, pod_id, req.protocol as u8);
                }
                record_steering(entry.record, &steering);
            }
            write(&steering.chosen);
        } else if udp {
            match to.pod {
                Some(pod_id) => {
                    if let Some(entry) = find_or_take(req.cookie(ctx)) {
                        if mark(entry.record, pod_id, IPPROTO_UDP) {
                            (*entry.record).flags &= !sock_flags::STEERED;
                        } else {
                            free(&entry);
                        }
                    }
                }
                None => {
                    if let Some(entry) = find(req.cookie(ctx)) {
                        free(&entry);
                    }
                }
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
