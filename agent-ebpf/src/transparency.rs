//! Transparency for steered sockets: the client keeps seeing the address
//! it asked for. connect() records (asked, chosen) in the socket's own
//! record (`sock_state`, freed with the socket); getpeername reports
//! `asked`, and UDP replies from `chosen` are reported as coming from
//! `asked`.
use aya_ebpf::{bindings::bpf_sock, macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    sock_addr::{set_user_ip6, user_ip6},
    sock_state::{Steering, steering},
};

/// Return value of a sock_addr hook that lets the call proceed.
const ALLOW: i32 = 1;

/// The socket of a sock_addr hook.
#[inline(always)]
pub fn socket(ctx: &SockAddrContext) -> *mut bpf_sock {
    // SAFETY: the kernel hands the hook a valid bpf_sock_addr, whose
    // socket is a full socket for the hook's duration.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }
}

/// The steering of this socket, if it was steered.
#[inline(always)]
pub fn steered(ctx: &SockAddrContext) -> Option<Steering> {
    // SAFETY: the hook's own socket.
    unsafe { steering(socket(ctx)) }
}

/// IPv4: the peer (getpeername) or the source (recvmsg) is `user_ip4`.
#[inline(always)]
fn rewrite_v4(ctx: &SockAddrContext) {
    let Some(Steering { asked, chosen, .. }) = steered(ctx) else {
        return;
    };
    let sa = ctx.sock_addr;
    // SAFETY: fields of the context the kernel handed us.
    unsafe {
        if (*sa).user_ip4 == chosen.addr[3] && crate::steer::is_v4_mapped(&chosen) {
            (*sa).user_ip4 = asked.addr[3];
        }
    }
}

/// IPv6: the same, through `sock_addr`'s word-by-word accessors.
#[inline(always)]
fn rewrite_v6(ctx: &SockAddrContext) {
    let Some(Steering { asked, chosen, .. }) = steered(ctx) else {
        return;
    };
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel handed us.
    unsafe {
        if user_ip6(sa) == chosen {
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
