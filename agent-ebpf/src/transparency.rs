//! Transparency for steered sockets: the client keeps seeing the address
//! it asked for. connect() records (asked, chosen) in the socket's own
//! storage, freed with the socket; getpeername reports `asked`, and UDP
//! replies from `chosen` are reported as coming from `asked`.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use headway_common::{AddrKey, SteeredSocket};

use crate::{
    maps::STEERED_SOCKS,
    sock_addr::{set_user_ip6, user_ip6},
};

/// Return value of a sock_addr hook that lets the call proceed.
const ALLOW: i32 = 1;

/// Remembers that the socket of `ctx` asked for `asked` and goes to
/// `chosen`. Fails open: without storage the socket just reports `chosen`.
#[inline(always)]
pub fn remember(ctx: &SockAddrContext, asked: &AddrKey, chosen: &AddrKey) {
    // SAFETY: the context's socket is valid for the hook's duration.
    let slot = unsafe { STEERED_SOCKS.get_or_insert_ptr_mut(ctx, None) };
    if slot.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket.
    unsafe {
        (*slot).asked = *asked;
        (*slot).chosen = *chosen;
    }
}

/// Forgets a previous steering of this socket (a socket connected again,
/// to an address that is not steered).
#[inline(always)]
pub fn forget(ctx: &SockAddrContext) {
    // SAFETY: as above; a lookup without create.
    let slot = unsafe { STEERED_SOCKS.get_ptr_mut(ctx) };
    if slot.is_null() {
        return;
    }
    // SAFETY: the socket pointer comes from the same context.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        let _ = STEERED_SOCKS.delete(sk);
    }
}

/// The steering of this socket, if it was steered.
#[inline(always)]
pub fn steered(ctx: &SockAddrContext) -> Option<SteeredSocket> {
    // SAFETY: as above.
    let slot = unsafe { STEERED_SOCKS.get_ptr_mut(ctx) };
    if slot.is_null() {
        None
    } else {
        // SAFETY: non-null storage of this socket.
        Some(unsafe { *slot })
    }
}

/// IPv4: the peer (getpeername) or the source (recvmsg) is `user_ip4`.
#[inline(always)]
fn rewrite_v4(ctx: &SockAddrContext) {
    let Some(s) = steered(ctx) else {
        return;
    };
    let sa = ctx.sock_addr;
    // SAFETY: fields of the context the kernel handed us.
    unsafe {
        if (*sa).user_ip4 == s.chosen.addr[3] && crate::steer::is_v4_mapped(&s.chosen) {
            (*sa).user_ip4 = s.asked.addr[3];
        }
    }
}

/// IPv6: the same, through `sock_addr`'s word-by-word accessors.
#[inline(always)]
fn rewrite_v6(ctx: &SockAddrContext) {
    let Some(s) = steered(ctx) else {
        return;
    };
    let sa = ctx.sock_addr;
    // SAFETY: the context the kernel handed us.
    unsafe {
        if user_ip6(sa) == s.chosen {
            set_user_ip6(sa, &s.asked);
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
