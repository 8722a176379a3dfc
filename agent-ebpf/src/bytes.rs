//! Bytes per pod: cgroup_skb egress and ingress count the packets of
//! client sockets marked in `acct_socks` (see `acct_socks`) towards the
//! pod the mark names. Unmarked sockets (servers, anything not talking to
//! a pod) cost one storage lookup and count nothing.
//!
//! What is counted: transport payload, i.e. each packet's length minus its
//! IP header (IPv4 with options; IPv6 as its fixed 40 bytes) and its TCP
//! (with options) or UDP header. That is what the application wrote and
//! read, independent of GSO/GRO batching; TCP retransmissions count again,
//! handshakes and pure ACKs count zero. TCP counts from the established
//! state on (the handshake carries no payload anyway).
use aya_ebpf::{
    macros::cgroup_skb,
    programs::{SkBuffContext, sk_buff::SkBuff},
};

use crate::{
    accounting::count_bytes,
    acct_socks::{IPPROTO_TCP, IPPROTO_UDP, mark_of},
};

/// cgroup_skb verdict that lets the packet pass. The only one we return.
const ALLOW: i32 = 1;

const IPV6_HDR_LEN: u32 = 40;
const UDP_HDR_LEN: u32 = 8;
/// Offset of the data-offset nibble in the TCP header.
const TCP_DOFF_BYTE: usize = 12;

#[cgroup_skb(egress)]
pub fn hw_bytes_egress(ctx: SkBuffContext) -> i32 {
    count(&ctx.skb, true);
    ALLOW
}

#[cgroup_skb(ingress)]
pub fn hw_bytes_ingress(ctx: SkBuffContext) -> i32 {
    count(&ctx.skb, false);
    ALLOW
}

#[inline(always)]
fn count(skb: &SkBuff, sent: bool) {
    // SAFETY: the packet's socket as the kernel hands it (may be null, or
    // not a full socket: then the helper returns null).
    let slot = unsafe {
        let sk = (*skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return;
        }
        mark_of(sk)
    };
    if slot.is_null() {
        return;
    }
    // SAFETY: non-null storage of this socket; copied out at once.
    let mark = unsafe { *slot };
    let payload = payload_len(skb, mark.protocol);
    if payload > 0 {
        count_bytes(mark.pod_id, mark.generation, sent, u64::from(payload));
    }
}

/// Transport payload bytes of the packet (see the module docs); 0 when
/// the headers cannot be read.
#[inline(always)]
fn payload_len(skb: &SkBuff, protocol: u8) -> u32 {
    let len = skb.len();
    let Some(first) = byte_at::<0>(skb) else {
        return 0;
    };
    let ip_len = match first >> 4 {
        4 => u32::from(first & 0x0f) * 4,
        6 => IPV6_HDR_LEN,
        _ => return 0,
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
                None => return 0,
            }
        }
        _ => return 0,
    };
    len.saturating_sub(ip_len + l4_len)
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
