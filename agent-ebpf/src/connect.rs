//! connect4/connect6: the per-connection hooks on the attached cgroup
//! (TCP, and UDP sockets that connect). They account the connection and,
//! when `steer` says so, rewrite its destination; the port is never
//! touched. They always let the call proceed.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use headway_common::AddrKey;

use crate::{
    acct_socks,
    sock_addr::{set_user_ip6, user_ip6, user_port},
    steer::{Request, on_connect},
    transparency::{forget, remember},
};

/// Return value of a sock_addr hook that lets the call proceed.
const ALLOW: i32 = 1;

const IPPROTO_UDP: u32 = 17;

/// A UDP socket can connect again, elsewhere: drop what an earlier
/// steering left. A TCP socket connects once, so it skips the lookup.
#[inline(always)]
fn forget_if_udp(ctx: &SockAddrContext, protocol: u32) {
    if protocol == IPPROTO_UDP {
        forget(ctx);
    }
}

/// What both hooks do once the destination is read: decide, account,
/// and on a steering remember it and let `write` put the new address in
/// the context.
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
    acct_socks::on_connect(ctx, to.as_ref().unwrap_or(&req.dst), req.protocol);
    match to {
        Some(new) => {
            remember(ctx, &req.dst, &new);
            write(&new);
        }
        None => forget_if_udp(ctx, req.protocol),
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
