//! Transparency for steered sockets: the client keeps seeing the address
//! it asked for. connect() records (asked, chosen) in the socket's record
//! (`sock_table`); getpeername reports `asked`, and UDP replies from
//! `chosen` are reported as coming from `asked`. The address the hook is
//! handed is the real peer (`chosen`, a pod's): any other address is
//! passed on after one read of the address filter.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use headway_common::AddrKey;

use crate::{
    sock_addr::{set_user_ip6, user_ip6},
    sock_table::{Steering, cookie_of, steering},
    steer::{is_v4_mapped, never_known},
};

/// Return value of a sock_addr hook that lets the call proceed.
const ALLOW: i32 = 1;

/// The address the client asked for, if this socket was steered from it
/// to `peer`.
#[inline(always)]
fn asked_for(ctx: &SockAddrContext, peer: &AddrKey) -> Option<AddrKey> {
    if never_known(peer) {
        return None;
    }
    let Steering { asked, chosen, .. } = steering(cookie_of(ctx))?;
    (chosen == *peer).then_some(asked)
}

/// IPv4: the peer (getpeername) or the source (recvmsg) is `user_ip4`.
#[inline(always)]
fn rewrite_v4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: fields of the context the kernel handed us.
    unsafe {
        let peer = AddrKey::from_v4_be((*sa).user_ip4);
        if let Some(asked) = asked_for(ctx, &peer)
            && is_v4_mapped(&asked)
        {
            (*sa).user_ip4 = asked.addr[3];
        }
    }
}

/// IPv6: the same, through `sock_addr`'s word-by-word accessors.
#[inline(always)]
fn rewrite_v6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel handed us.
    unsafe {
        if let Some(asked) = asked_for(ctx, &user_ip6(sa)) {
            set_user_ip6(sa, &asked);
        }
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn hw_getpeer4(ctx: SockAddrContext) -> i32 {
    rewrite_v4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn hw_getpeer6(ctx: SockAddrContext) -> i32 {
    rewrite_v6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn hw_recvmsg4(ctx: SockAddrContext) -> i32 {
    rewrite_v4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn hw_recvmsg6(ctx: SockAddrContext) -> i32 {
    rewrite_v6(&ctx);
    ALLOW
}
