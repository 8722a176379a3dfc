//! Bytes per pod: the cgroup_skb programs (see `skb`) count the packets of
//! client sockets marked in `sock_state` (see `sock_state`) towards the
//! pod the mark names. Unmarked sockets (servers, anything not talking to
//! a pod) cost one storage lookup and count nothing.
//!
//! What is counted: transport payload, i.e. each packet's length minus its
//! IP header (IPv4 with options; IPv6 as its fixed 40 bytes) and its TCP
//! (with options) or UDP header. That is what the application wrote and
//! read, independent of GSO/GRO batching. UDP: each datagram's payload.
//! TCP: what the kernel counts as delivered (`bytes_acked`,
//! `bytes_received` of the socket), read on each of its packets, so a
//! retransmitted or reordered segment counts once; from the established
//! state on.
use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{bindings::bpf_sock, helpers::bpf_tcp_sock, programs::sk_buff::SkBuff};
use headway_common::{SocketState, sock_flags};

use crate::{
    accounting::count_bytes,
    sock_state::{IPPROTO_TCP, IPPROTO_UDP, state_of},
};

const IPV6_HDR_LEN: u32 = 40;
const UDP_HDR_LEN: u32 = 8;
/// Offset of the data-offset nibble in the TCP header.
const TCP_DOFF_BYTE: usize = 12;

/// Counts the packet's bytes to the pod its socket is marked for.
#[inline(always)]
pub fn count(skb: &SkBuff, sent: bool) {
    // SAFETY: the packet's socket as the kernel hands it (may be null, or
    // not a full socket: then the helper returns null).
    let sk = unsafe { (*skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: as above.
    let slot = unsafe { state_of(sk) };
    if slot.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket; copied out at once.
    let mark = unsafe { *slot };
    if mark.flags & sock_flags::ACCOUNTED == 0 {
        return;
    }
    if mark.protocol == IPPROTO_TCP {
        // SAFETY: the storage of this (TCP) socket.
        if let Some((out, got)) = unsafe { tcp_delivered(sk, slot) } {
            if out > 0 {
                count_bytes(mark.pod_id, mark.generation, true, out);
            }
            if got > 0 {
                count_bytes(mark.pod_id, mark.generation, false, got);
            }
        }
        return;
    }
    let payload = payload_len(skb, mark.protocol).0;
    if payload > 0 {
        count_bytes(mark.pod_id, mark.generation, sent, u64::from(payload));
    }
}

/// TCP: what the socket delivered each way since it was last counted,
/// from the kernel's own counters (`bytes_acked`: sent and acknowledged;
/// `bytes_received`: received in order). A retransmission or a reordered
/// segment does not move them twice. The packet that makes them grow is
/// counted on the socket's next packet (either way), which TCP always
/// sends (an ACK, a FIN). The first packet only records where they stand
/// (the SYN's sequence number is not a byte).
///
/// # Safety
/// `slot` is the non-null storage of `sk`, a TCP socket.
#[inline(always)]
unsafe fn tcp_delivered(sk: *mut bpf_sock, slot: *mut SocketState) -> Option<(u64, u64)> {
    // SAFETY: `sk` is the packet's socket; the helper checks it is TCP.
    let tp = unsafe { bpf_tcp_sock(sk) };
    if tp.is_null() {
        return None;
    }
    // SAFETY: non-null pointers from the helpers (caller's contract for
    // `slot`); raw field access only.
    unsafe {
        let (acked, received) = ((*tp).bytes_acked, (*tp).bytes_received);
        let fresh = (*slot).seen_known == 0;
        // Ingress runs without the socket lock (before TCP takes it), so
        // the two directions' programs can run at once on two CPUs: each
        // claims its growth with a compare-and-swap, so none is counted
        // twice (a plain read-then-write counted ~64 KiB twice now and
        // then).
        let sent = advance(&raw mut (*slot).sent_seen, acked);
        let got = advance(&raw mut (*slot).received_seen, received);
        (*slot).seen_known = 1;
        if fresh { None } else { Some((sent, got)) }
    }
}

/// Moves `*seen` up to `now` and returns by how much, unless another CPU
/// moved it first (then that CPU counts its part). Never moves it back.
///
/// # Safety
/// `seen` points into a live map value.
#[inline(always)]
unsafe fn advance(seen: *mut u64, now: u64) -> u64 {
    // SAFETY: caller's contract.
    let mut old = unsafe { core::ptr::read_volatile(seen) };
    // A few tries: each failure means another CPU just advanced it.
    for _ in 0..4 {
        if now <= old {
            return 0;
        }
        // SAFETY: as above; an atomic compare-and-swap of an aligned u64.
        let (prev, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                seen, old, now,
            )
        };
        if swapped {
            return now - old;
        }
        old = prev;
    }
    0
}

/// Transport payload bytes of the packet (see the module docs; 0 when the
/// headers cannot be read) and the length of its IP header.
#[inline(always)]
fn payload_len(skb: &SkBuff, protocol: u8) -> (u32, u32) {
    let len = skb.len();
    let Some(first) = byte_at::<0>(skb) else {
        return (0, 0);
    };
    let ip_len = match first >> 4 {
        4 => u32::from(first & 0x0f) * 4,
        6 => IPV6_HDR_LEN,
        _ => return (0, 0),
    };
    let l4_len = match protocol {
        IPPROTO_UDP => UDP_HDR_LEN,
        IPPROTO_TCP => {
            // Direct reads need constant offsets (the verifier cannot follow
            // a variable one here); those cover IPv4 without options and
            // IPv6. Other IPv4 header lengths go through the helper.
            let doff = match ip_len {
                20 => byte_at::<{ 20 + TCP_DOFF_BYTE }>(skb),
                40 => byte_at::<{ 40 + TCP_DOFF_BYTE }>(skb),
                _ => skb
                    .load::<u8>((ip_len + TCP_DOFF_BYTE as u32) as usize)
                    .ok(),
            };
            match doff {
                Some(byte) => u32::from(byte >> 4) * 4,
                None => return (0, ip_len),
            }
        }
        _ => return (0, ip_len),
    };
    (len.saturating_sub(ip_len + l4_len), ip_len)
}

/// The byte at `OFFSET` from the IP header: straight from the linear data
/// when it is there (it always is for headers the stack built or pulled),
/// through `bpf_skb_load_bytes` otherwise.
#[inline(always)]
fn byte_at<const OFFSET: usize>(skb: &SkBuff) -> Option<u8> {
    // SAFETY: data/data_end are the context's packet bounds; the read is
    // checked against them first. The check asks for a few bytes more than
    // the one read: LLVM turns `p + 1 <= end` into `p < end`, from which
    // the verifier grants no range at offset 0. Every header read here is
    // longer than that anyway.
    unsafe {
        let data = (*skb.skb).data as usize;
        let end = (*skb.skb).data_end as usize;
        if data + OFFSET + 4 <= end {
            return Some(*((data + OFFSET) as *const u8));
        }
    }
    skb.load::<u8>(OFFSET).ok()
}
