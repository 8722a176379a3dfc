//! Reading the destination of a `bpf_sock_addr` and rewriting its IPv6
//! address. The verifier wants each word of `user_ip6` accessed on its own,
//! at a fixed offset (a whole-array copy is rejected: "dereference of
//! modified ctx ptr"), so every hook goes through these functions.
use aya_ebpf::bindings::bpf_sock_addr;
use headway_common::AddrKey;

/// `user_ip6` as an address key.
///
/// # Safety
/// `sa` is the context the kernel handed a sock_addr hook.
#[inline(always)]
pub unsafe fn user_ip6(sa: *mut bpf_sock_addr) -> AddrKey {
    // SAFETY: in-bounds reads of the hook's context (caller's contract).
    unsafe {
        AddrKey::from_v6_words([
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
        ])
    }
}

/// Sets `user_ip6` to `addr`.
///
/// # Safety
/// As for [`user_ip6`].
#[inline(always)]
pub unsafe fn set_user_ip6(sa: *mut bpf_sock_addr, addr: &AddrKey) {
    // SAFETY: in-bounds writes to the hook's context (caller's contract).
    unsafe {
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], addr.addr[0]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], addr.addr[1]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], addr.addr[2]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], addr.addr[3]);
    }
}

/// The destination port in host byte order (`user_port` holds it in
/// network order in its low 16 bits).
///
/// # Safety
/// As for [`user_ip6`].
#[inline(always)]
pub unsafe fn user_port(sa: *mut bpf_sock_addr) -> u16 {
    // SAFETY: an in-bounds read of the hook's context (caller's contract).
    let raw = unsafe { core::ptr::read_volatile(&raw const (*sa).user_port) };
    u16::from_be(raw as u16)
}
