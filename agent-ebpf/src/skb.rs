//! The cgroup_skb programs: every packet a socket of the cgroup sends or
//! receives passes one of them. Each does two things, in one run: the DNS
//! interceptor's part (`dns::query` on the way out, `dns::response` on the
//! way in) and the byte counters (`bytes`). One program per direction
//! rather than one per concern: every program run costs the packet a
//! dispatch, whatever the program then does.
use aya_ebpf::{
    macros::cgroup_skb,
    programs::{SkBuffContext, sk_buff::SkBuff},
};

use crate::{bytes, dns};

/// cgroup_skb verdict that lets the packet pass. The only one we return.
const ALLOW: i32 = 1;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Where the transport protocol sits: IPv4's protocol byte, IPv6's next
/// header (the DNS parser follows no extension headers either).
const IPV4_PROTOCOL: usize = 9;
const IPV6_NEXT_HEADER: usize = 6;

#[cgroup_skb(egress)]
pub fn hw_skb_egress(ctx: SkBuffContext) -> i32 {
    let protocol = transport(&ctx.skb);
    if protocol.is_none_or(|p| p == IPPROTO_UDP) {
        dns::query::record_query(&ctx);
    }
    // A SYN carries no payload, and what its socket delivered is set when
    // it is established (`sock_ops`): nothing to count, no lookup.
    if protocol == Some(IPPROTO_TCP) && bytes::is_syn(&ctx.skb) {
        return ALLOW;
    }
    bytes::count(&ctx.skb, true);
    ALLOW
}

#[cgroup_skb(ingress)]
pub fn hw_skb_ingress(ctx: SkBuffContext) -> i32 {
    let protocol = transport(&ctx.skb);
    // TCP bytes are read from the socket's own counters on its way out
    // (see `bytes`): an incoming segment needs nothing here.
    if protocol == Some(IPPROTO_TCP) {
        return ALLOW;
    }
    if protocol.is_none_or(|p| p == IPPROTO_UDP) {
        dns::response::on_response(&ctx);
    }
    bytes::count(&ctx.skb, false);
    ALLOW
}

/// The packet's transport protocol, read straight from the linear packet
/// data: most packets are TCP, and this spares them the DNS parser's
/// header copy (a helper call). None when the header is not in the linear
/// data (then the parser decides).
#[inline(always)]
fn transport(skb: &SkBuff) -> Option<u8> {
    // SAFETY: data/data_end are the context's packet bounds; every read is
    // checked against them first (with room to spare: see `bytes::byte_at`
    // on why the check asks for more than the byte read).
    unsafe {
        let data = (*skb.skb).data as usize;
        let end = (*skb.skb).data_end as usize;
        if data + IPV4_PROTOCOL + 4 > end {
            return None;
        }
        let version = *(data as *const u8) >> 4;
        match version {
            4 => Some(*((data + IPV4_PROTOCOL) as *const u8)),
            6 => Some(*((data + IPV6_NEXT_HEADER) as *const u8)),
            _ => None,
        }
    }
}
