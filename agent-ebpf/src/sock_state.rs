//! The one record headway keeps on a client socket (`sock_state`, socket
//! storage freed with the socket; see `headway_common::SocketState`).
//!
//! Two concerns share it. Steering: connect()/sendmsg record the address
//! asked for and the pod chosen, so getpeername and recvmsg can report the
//! former. Accounting: the pod the socket talks to, as of which generation
//! of its counters' slot, over which protocol; fixed when the socket
//! connects, so its bytes and its close always go to the pod it really
//! talks to, even if the agent gives the address to another pod meanwhile.
//! Only client sockets are marked for accounting (TCP in `sock_ops` on
//! ACTIVE_ESTABLISHED, or at connect() when it is steered; connected UDP
//! at connect()), so a server pod's own sockets are never counted as
//! traffic to some pod.
//!
//! Creating storage is the most expensive thing a hook here does (two
//! allocations the first time), so a steered TCP socket creates it once,
//! at connect(), and sock_ops finds it there.
use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
};
use aya_log_ebpf::warn;
use headway_common::{AddrKey, SocketState, sock_flags};

use crate::{
    accounting::generation,
    kernel_log::{self, event},
    maps::SOCK_STATE,
};

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The map as the storage helpers take it (aya-ebpf's own accessors only
/// work from sock_addr hooks).
#[inline(always)]
fn map() -> *mut c_void {
    ptr::from_ref(&SOCK_STATE).cast_mut().cast()
}

/// The record of `sk`, or null if it has none (or is not a full socket).
///
/// # Safety
/// `sk` is a socket pointer the kernel handed the program (may be null).
#[inline(always)]
pub unsafe fn state_of(sk: *mut bpf_sock) -> *mut SocketState {
    // SAFETY: the helper accepts any socket the verifier let us hold.
    unsafe { bpf_sk_storage_get(map(), sk.cast(), ptr::null_mut(), 0) }.cast()
}

/// The record of `sk`, created (zeroed) when it has none. Null if no
/// storage could be made: the caller then fails open.
///
/// # Safety
/// `sk` is a non-null full socket the kernel handed the program.
#[inline(always)]
unsafe fn state_or_new(sk: *mut bpf_sock) -> *mut SocketState {
    // SAFETY: as above.
    let state: *mut SocketState = unsafe {
        bpf_sk_storage_get(
            map(),
            sk.cast(),
            ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast();
    if state.is_null() && kernel_log::due(event::NO_SOCKET_STORAGE) {
        log_no_storage();
    }
    state
}

/// The log line for a socket without storage (see `kernel_log`).
#[inline(never)]
fn log_no_storage() {
    warn!(
        &(),
        "no socket storage (out of memory?): a socket is neither steered transparently nor accounted"
    );
}

/// Drops the record of `sk`, if it has one.
///
/// # Safety
/// As for [`state_or_new`].
#[inline(always)]
pub unsafe fn drop_state(sk: *mut bpf_sock) {
    // SAFETY: as above; -ENOENT when there is none, which is fine.
    let _ = unsafe { bpf_sk_storage_delete(map(), sk.cast()) };
}

/// Marks `sk` as talking to pod `pod_id` over `protocol`, keeping any
/// steering it holds. Null if the pod has no slot or no storage could be
/// made (then the socket is simply not counted: fail open).
///
/// # Safety
/// As for [`state_or_new`].
#[inline(always)]
pub unsafe fn mark(sk: *mut bpf_sock, pod_id: u32, protocol: u8) -> *mut SocketState {
    let Some(generation) = generation(pod_id) else {
        return ptr::null_mut();
    };
    // SAFETY: caller's contract.
    let state = unsafe { state_or_new(sk) };
    if !state.is_null() {
        // SAFETY: non-null storage of this socket.
        unsafe {
            (*state).generation = generation;
            (*state).pod_id = pod_id;
            (*state).protocol = protocol;
            (*state).active = 0;
            (*state).seen_known = 0;
            (*state).flags |= sock_flags::ACCOUNTED;
        }
    }
    state
}

/// A steering as a socket keeps it.
#[derive(Clone, Copy)]
pub struct Steering {
    /// The address the client asked for.
    pub asked: AddrKey,
    /// The pod it goes to instead.
    pub chosen: AddrKey,
    /// The service `asked` was resolved from.
    pub service_id: u32,
}

/// Records the steering of `sk`; returns the record (null if no storage
/// could be made: the socket then just reports `chosen`, fail open).
///
/// # Safety
/// As for [`state_or_new`].
#[inline(always)]
pub unsafe fn set_steered(sk: *mut bpf_sock, steering: &Steering) -> *mut SocketState {
    // SAFETY: caller's contract.
    let state = unsafe { state_or_new(sk) };
    if !state.is_null() {
        // SAFETY: non-null storage of this socket.
        unsafe { record_steering(state, steering) };
    }
    state
}

/// Writes `steering` into a socket's record.
///
/// # Safety
/// `state` is a non-null record from this socket's storage.
#[inline(always)]
pub unsafe fn record_steering(state: *mut SocketState, steering: &Steering) {
    // SAFETY: caller's contract.
    unsafe {
        (*state).asked = steering.asked;
        (*state).chosen = steering.chosen;
        (*state).service_id = steering.service_id;
        (*state).flags |= sock_flags::STEERED;
    }
}

/// The steering of `sk`, if it was steered.
///
/// # Safety
/// As for [`state_of`].
#[inline(always)]
pub unsafe fn steering(sk: *mut bpf_sock) -> Option<Steering> {
    // SAFETY: caller's contract.
    let state = unsafe { state_of(sk) };
    if state.is_null() {
        return None;
    }
    // SAFETY: non-null storage of this socket; copied out at once.
    unsafe {
        ((*state).flags & sock_flags::STEERED != 0).then(|| Steering {
            asked: (*state).asked,
            chosen: (*state).chosen,
            service_id: (*state).service_id,
        })
    }
}
