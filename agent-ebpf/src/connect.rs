//! connect4/connect6: the per-connection hooks on the attached cgroup.
//! For now they only account; they always let the connection proceed to
//! the address the client asked for.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use headway_common::AddrKey;

use crate::accounting::count_connect;

/// Return value of a sock_addr hook that lets the call proceed.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn hw_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the hook a valid bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    count_connect(&AddrKey::from_v4_be(sa.user_ip4), sa.protocol);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn hw_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // The verifier wants each word of user_ip6 read on its own, at a fixed
    // offset (a whole-array copy is rejected).
    let mut words = [0u32; 4];
    // SAFETY: in-bounds reads of the context the kernel handed us.
    unsafe {
        words[0] = core::ptr::read_volatile(&raw const (*sa).user_ip6[0]);
        words[1] = core::ptr::read_volatile(&raw const (*sa).user_ip6[1]);
        words[2] = core::ptr::read_volatile(&raw const (*sa).user_ip6[2]);
        words[3] = core::ptr::read_volatile(&raw const (*sa).user_ip6[3]);
        count_connect(&AddrKey::from_v6_words(words), (*sa).protocol);
    }
    ALLOW
}
