//! Client sockets that talk to a pod carry a mark in their own storage
//! (`acct_socks`, freed with the socket): which pod, as of which generation
//! of its counters' slot, over which protocol. The pod is fixed when the
//! socket connects, so its bytes and its close always go to the pod it
//! really talks to, even if the agent gives the address to another pod
//! meanwhile. Only client sockets are marked (TCP in `sock_ops` on
//! ACTIVE_ESTABLISHED, connected UDP at connect()), so a server pod's own
//! sockets are never counted as traffic to some pod.
use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    programs::SockAddrContext,
};
use headway_common::{AccountedSocket, AddrKey};

use crate::{
    accounting::{generation, pod_of},
    maps::ACCT_SOCKS,
};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The map as the storage helpers take it (aya-ebpf's own accessors only
/// work from sock_addr hooks).
#[inline(always)]
fn map() -> *mut c_void {
    ptr::from_ref(&ACCT_SOCKS).cast_mut().cast()
}

/// The mark of `sk`, or null if it has none (or is not a full socket).
///
/// # Safety
/// `sk` is a socket pointer the kernel handed the program (may be null).
#[inline(always)]
pub unsafe fn mark_of(sk: *mut bpf_sock) -> *mut AccountedSocket {
    // SAFETY: the helper accepts any socket the verifier let us hold.
    unsafe { bpf_sk_storage_get(map(), sk.cast(), ptr::null_mut(), 0) }.cast()
}

/// Marks `sk` as talking to pod `pod_id` over `protocol`. Null if the pod
/// has no slot or no storage could be made (then the socket is simply not
/// counted: fail open).
///
/// # Safety
/// As for [`mark_of`]; `sk` is not null.
#[inline(always)]
pub unsafe fn mark(sk: *mut bpf_sock, pod_id: u32, protocol: u8) -> *mut AccountedSocket {
    let Some(generation) = generation(pod_id) else {
        return ptr::null_mut();
    };
    // SAFETY: as above; a zeroed value is created when there is none.
    let slot: *mut AccountedSocket = unsafe {
        bpf_sk_storage_get(
            map(),
            sk.cast(),
            ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast();
    if !slot.is_null() {
        // SAFETY: non-null storage of this socket.
        unsafe {
            (*slot).generation = generation;
            (*slot).pod_id = pod_id;
            (*slot).protocol = protocol;
            (*slot).active = 0;
            (*slot).seen_known = 0;
        }
    }
    slot
}

/// connect() of a UDP socket, to `to` (after any steering): mark it for
/// the pod at `to`, or drop the mark of an earlier connect elsewhere. TCP
/// sockets are marked once established (see `sock_ops`). Called from the
/// connect hooks.
#[inline(always)]
pub fn on_connect(ctx: &SockAddrContext, to: &AddrKey, protocol: u32) {
    if protocol != u32::from(IPPROTO_UDP) {
        return;
    }
    // SAFETY: the hook's socket is a valid full socket.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        match pod_of(to) {
            Some(pod_id) => {
                mark(sk, pod_id, IPPROTO_UDP);
            }
            None => {
                let _ = bpf_sk_storage_delete(map(), sk.cast());
            }
        }
    }
}
