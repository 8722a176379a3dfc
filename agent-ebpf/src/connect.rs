//! connect4/connect6: the per-connection hooks on the attached cgroup
//! (TCP, and UDP sockets that connect). They account the connection and,
//! when `steer` says so, rewrite its destination; the port is never
//! touched. They always let the call proceed.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use headway_common::AddrKey;

use crate::{
    steer::on_connect,
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

#[cgroup_sock_addr(connect4)]
pub fn hw_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands the hook a valid bpf_sock_addr.
    unsafe {
        let dst = AddrKey::from_v4_be((*sa).user_ip4);
        match on_connect(&ctx, &dst, (*sa).protocol) {
            Some(new) => {
                remember(&ctx, &dst, &new);
                (*sa).user_ip4 = new.addr[3];
            }
            None => forget_if_udp(&ctx, (*sa).protocol),
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn hw_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // The verifier wants each word of user_ip6 read and written on its
    // own, at a fixed offset (a whole-array copy is rejected).
    // SAFETY: in-bounds accesses to the context the kernel handed us.
    unsafe {
        let words = [
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
        ];
        let dst = AddrKey::from_v6_words(words);
        let Some(new) = on_connect(&ctx, &dst, (*sa).protocol) else {
            forget_if_udp(&ctx, (*sa).protocol);
            return ALLOW;
        };
        remember(&ctx, &dst, &new);
        {
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], new.addr[0]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], new.addr[1]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], new.addr[2]);
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], new.addr[3]);
        }
    }
    ALLOW
}
