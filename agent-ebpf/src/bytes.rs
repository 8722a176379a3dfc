//! Bytes per pod: the cgroup_skb programs (see `skb`) count the packets of
//! client sockets marked in their records (see `sock_table`) towards the
//! pod the mark names. A packet whose remote address is outside the
//! address filter (servers' clients, anything not talking to a pod) costs
//! one read of the filter and counts nothing.
//!
//! What is counted: transport payload, i.e. each packet's length minus its
//! IP header (IPv4 with options; IPv6 as its fixed 40 bytes) and its TCP
//! (with options) or UDP header. That is what the application wrote and
//! read, independent of GSO/GRO batching. UDP: each datagram's payload.
//! TCP: what the kernel counts as delivered (`bytes_acked`,
//! `bytes_received` of the socket), read on each packet it sends and at
//! its close, so a retransmitted or reordered segment counts once; from
//! the established state on. Its incoming packets are not looked at (the
//! ingress program returns at once): an incoming segment that moves the
//! counters is followed by one going out (our ACK of its data, or more of
//! ours), except the ACK of our last data on a connection that then sends
//! nothing, which is counted at the close. Reading them on the way out
//! only halves what accounting costs a TCP connection's packets.
use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_cxchg},
    mem::offset_of,
};

use aya_ebpf::{helpers::bpf_get_socket_cookie, helpers::bpf_tcp_sock, programs::sk_buff::SkBuff};
use headway_common::{AddrKey, SockSlot, SocketRecord, sock_flags};

use crate::{
    accounting::count_bytes,
    sock_table::{IPPROTO_TCP, IPPROTO_UDP, find},
    steer::never_known,
};

const IPV6_HDR_LEN: u32 = 40;
const UDP_HDR_LEN: u32 = 8;
/// Offset of the data-offset nibble in the TCP header.
const TCP_DOFF_BYTE: usize = 12;
/// An IPv4 header without options.
const IPV4_HDR_MIN: usize = 20;
/// Where the addresses sit in the IP headers.
const IPV4_SADDR: usize = 12;
const IPV4_DADDR: usize = 16;
const IPV6_SADDR: usize = 8;
const IPV6_DADDR: usize = 24;

/// Counts the packet's bytes to the pod its socket is marked for.
#[inline(always)]
pub fn count(skb: &SkBuff, sent: bool) {
    // Only a socket talking to a pod can be marked: the filter turns every
    // other packet away after one read.
    let Some(remote) = remote_of(skb, sent) else {
        return;
    };
    if never_known(&remote) {
        return;
    }
    // SAFETY: the packet's socket as the kernel hands it (cgroup_skb runs
    // only for full sockets; may still be null).
    let sk = unsafe { (*skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: the helper reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(skb.skb.cast::<c_void>()) };
    let Some(entry) = find(cookie) else {
        return;
    };
    let record = entry.record;
    // SAFETY: the socket's record; the fields needed, read at once.
    let (flags, pod_id, generation) =
        unsafe { ((*record).flags, (*record).pod_id, (*record).generation) };
    // A record read while its socket closed may already be another's.
    if flags & sock_flags::ACCOUNTED == 0 || !entry.still_held() {
        return;
    }
    if flags & sock_flags::UDP == 0 {
        // SAFETY: `sk` is the packet's socket; the helper checks it is TCP.
        let tp = unsafe { bpf_tcp_sock(sk) };
        if tp.is_null() {
            return;
        }
        // SAFETY: non-null pointers from the helpers; the socket's record.
        unsafe { count_delivered(record, (*tp).bytes_acked, (*tp).bytes_received) };
        return;
    }
    let payload = payload_len(skb, IPPROTO_UDP).0;
    if payload > 0 {
        let payload = u64::from(payload);
        if sent {
            count_bytes(pod_id, generation, payload, 0);
        } else {
            count_bytes(pod_id, generation, 0, payload);
        }
    }
}

/// The packet's remote address: its destination going out, its source
/// coming in. None when the IP header is not in the linear data (never
/// for packets the stack built or delivered to a socket).
#[inline(always)]
fn remote_of(skb: &SkBuff, sent: bool) -> Option<AddrKey> {
    // SAFETY: data/data_end are the context's packet bounds; every read is
    // checked against them first.
    unsafe {
        let data = (*skb.skb).data as usize;
        let end = (*skb.skb).data_end as usize;
        if data + IPV4_HDR_MIN > end {
            return None;
        }
        match *(data as *const u8) >> 4 {
            4 => {
                let at = if sent { IPV4_DADDR } else { IPV4_SADDR };
                Some(AddrKey::from_v4_be(word_at(data + at)))
            }
            6 if data + IPV6_HDR_LEN as usize <= end => {
                let at = data + if sent { IPV6_DADDR } else { IPV6_SADDR };
                Some(AddrKey::from_v6_words([
                    word_at(at),
                    word_at(at + 4),
                    word_at(at + 8),
                    word_at(at + 12),
                ]))
            }
            _ => None,
        }
    }
}

/// A 32-bit word of packet data as it lies in memory (network byte
/// order, as `AddrKey` keeps it).
///
/// # Safety
/// `at..at + 4` lies inside the packet bounds the caller checked.
#[inline(always)]
unsafe fn word_at(at: usize) -> u32 {
    // SAFETY: caller's contract; IP headers need not be 4-byte aligned.
    unsafe { core::ptr::read_unaligned(at as *const u32) }
}

/// TCP: counts what the socket delivered each way since it was last
/// counted, from the kernel's own counters (`bytes_acked`: sent and
/// acknowledged; `bytes_received`: received in order; passed in by the
/// caller, read from the socket). A retransmission or a reordered segment
/// does not move them twice. The packet that makes them grow is counted
/// on the socket's next packet out or at its close. `sock_ops` sets where
/// they stand when the socket is established (the SYN's sequence number
/// is not a byte); before that, only SYNs leave, and egress skips them.
///
/// # Safety
/// `record` is the record of a TCP socket marked for accounting.
#[inline(always)]
pub unsafe fn count_delivered(record: *mut SocketRecord, acked: u64, received: u64) {
    // SAFETY: caller's contract; raw field access only.
    unsafe {
        // Packets leave from the socket's owner and from softirq (ACKs,
        // timers) on another CPU, and the close counts from `sock_ops`:
        // each claims its growth with a compare-and-swap, so none is
        // counted twice (a plain read-then-write, when ingress counted
        // too, counted ~64 KiB twice now and then). Both counters in one
        // swap: they are neighbours in an aligned word.
        let (sent, got) = advance(seen_pair(record), acked as u32, received as u32);
        if sent > 0 || got > 0 {
            let (pod_id, generation) = ((*record).pod_id, (*record).generation);
            count_bytes(pod_id, generation, u64::from(sent), u64::from(got));
        }
    }
}

/// `sent_seen` (low half) and `received_seen` (high half) of a record as
/// one word.
///
/// # Safety
/// `record` is the record of a slot of the socket table.
#[inline(always)]
unsafe fn seen_pair(record: *mut SocketRecord) -> *mut u64 {
    const _: () = assert!(
        (offset_of!(SockSlot, record) + offset_of!(SocketRecord, sent_seen)) % 8 == 0
            && offset_of!(SocketRecord, received_seen) == offset_of!(SocketRecord, sent_seen) + 4
    );
    // SAFETY: caller's contract: slots are 64-byte aligned, so the pair is
    // an aligned u64 (checked above).
    unsafe { (&raw mut (*record).sent_seen).cast::<u64>() }
}

/// Sets where the socket's counters stand (`sock_ops`, when it is
/// established), both halves in one write.
///
/// # Safety
/// As for [`count_delivered`].
#[inline(always)]
pub unsafe fn set_seen(record: *mut SocketRecord, acked: u64, received: u64) {
    let pair = u64::from(acked as u32) | u64::from(received as u32) << 32;
    // SAFETY: caller's contract.
    unsafe { core::ptr::write_volatile(seen_pair(record), pair) };
}

/// How far a counter grew from `seen` to `now` (its low 32 bits), or 0 if
/// `now` is behind (read before another CPU advanced it: at most a little
/// behind, where real growth between two counted packets is below 2 GiB,
/// so the wrapped difference tells them apart).
#[inline(always)]
fn growth(seen: u32, now: u32) -> u32 {
    let grown = now.wrapping_sub(seen);
    if grown > i32::MAX as u32 { 0 } else { grown }
}

/// Moves the pair at `seen` up to `(sent, received)` and returns by how
/// much each moved, unless another CPU moved it first (then that CPU
/// counts its part). Never moves either back.
///
/// # Safety
/// `seen` is an aligned word of a live map value.
#[inline(always)]
unsafe fn advance(seen: *mut u64, sent: u32, received: u32) -> (u32, u32) {
    // SAFETY: caller's contract.
    let mut old = unsafe { core::ptr::read_volatile(seen) };
    // A few tries: each failure means another CPU just advanced it.
    for _ in 0..4 {
        let grown_sent = growth(old as u32, sent);
        let grown_received = growth((old >> 32) as u32, received);
        if grown_sent == 0 && grown_received == 0 {
            return (0, 0);
        }
        let new = u64::from((old as u32).wrapping_add(grown_sent))
            | u64::from(((old >> 32) as u32).wrapping_add(grown_received)) << 32;
        // SAFETY: as above; an atomic compare-and-swap of an aligned u64.
        let (prev, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                seen, old, new,
            )
        };
        if swapped {
            return (grown_sent, grown_received);
        }
        old = prev;
    }
    (0, 0)
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

/// Offset of the flags byte in the TCP header, and its SYN bit.
const TCP_FLAGS_BYTE: usize = 13;
const TCP_SYN: u8 = 0x02;

/// Whether a TCP packet is a SYN (or SYN-ACK). False when its header is
/// not where the fixed offsets look (IPv4 with options): then it is
/// counted as any other packet.
#[inline(always)]
pub fn is_syn(skb: &SkBuff) -> bool {
    /// IPv4, a 20-byte header.
    const IPV4_NO_OPTIONS: u8 = 0x45;
    let flags = match byte_at::<0>(skb) {
        Some(IPV4_NO_OPTIONS) => byte_at::<{ IPV4_HDR_MIN + TCP_FLAGS_BYTE }>(skb),
        Some(first) if first >> 4 == 6 => {
            byte_at::<{ IPV6_HDR_LEN as usize + TCP_FLAGS_BYTE }>(skb)
        }
        _ => None,
    };
    flags.is_some_and(|f| f & TCP_SYN != 0)
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
