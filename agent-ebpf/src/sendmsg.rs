//! sendmsg4/sendmsg6: datagrams of unconnected UDP sockets (sendto without
//! connect). The first datagram to a steered address picks a pod; the
//! socket keeps that choice for the address afterwards, as long as the pod
//! stays eligible in the service (then the next datagram chooses again),
//! and recvmsg makes the replies come from the address asked for (see
//! `transparency`).
use core::cell::Cell;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use headway_common::AddrKey;

use crate::{
    sock_addr::{set_user_ip6, user_ip6, user_port},
    sock_table::{cookie_of, find_or_take, record_steering, steering},
    steer::{Request, never_known, on_sendmsg, still_eligible},
};

const IPPROTO_UDP: u32 = 17;

/// Return value of a sock_addr hook that lets the call proceed.
const ALLOW: i32 = 1;

/// Where a datagram to `dst` goes: the socket's earlier choice for it, or
/// a new decision.
#[inline(always)]
fn destination(ctx: &SockAddrContext, dst: AddrKey, port: u16) -> Option<AddrKey> {
    // An address the filter does not hold was never steered from, nor
    // can be (`on_sendmsg` would say the same).
    if never_known(&dst) {
        return None;
    }
    let cookie = cookie_of(ctx);
    if let Some(s) = steering(cookie)
        && s.asked == dst
        && still_eligible(s.service_id, &s.chosen)
    {
        return Some(s.chosen);
    }
    let req = Request {
        dst,
        port,
        protocol: IPPROTO_UDP,
        cookie: Cell::new(cookie),
    };
    let steering = on_sendmsg(ctx, &req)?;
    // Without a record the choice is made again for the next datagram
    // (fail open).
    if let Some(entry) = find_or_take(cookie) {
        // SAFETY: this socket's own record.
        unsafe { record_steering(entry.record, &steering) };
    }
    Some(steering.chosen)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn hw_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: fields of the context the kernel handed us.
    unsafe {
        let dst = AddrKey::from_v4_be((*sa).user_ip4);
        if let Some(new) = destination(&ctx, dst, user_port(sa)) {
            (*sa).user_ip4 = new.addr[3];
        }
    }
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn hw_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel handed us.
    unsafe {
        if let Some(new) = destination(&ctx, user_ip6(sa), user_port(sa)) {
            set_user_ip6(sa, &new);
        }
    }
    ALLOW
}
