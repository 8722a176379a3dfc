//! Egress: remembers each A/AAAA query a socket in the cgroup sends, keyed
//! by what only that socket's real answer will match (network namespace,
//! server, client port, query ID). `response` learns from nothing else.
use aya_ebpf::{
    EbpfContext, bindings::BPF_ANY, helpers::bpf_get_netns_cookie, programs::SkBuffContext,
};
use headway_common::{PendingQuery, PendingQueryKey, dns_counter};

use super::{
    ANSWERED, CLASS_IN, Direction, MAX_QUERY_COPY, Scratch, TYPE_A, TYPE_AAAA, bump, copy_payload,
    dns_datagram, query_id, question,
};
use crate::maps::DNS_PENDING;

/// A packet leaving a socket of the cgroup: if it is an A/AAAA query,
/// remember it until its answer comes.
#[inline(always)]
pub fn record_query(ctx: &SkBuffContext) -> Option<()> {
    let d = dns_datagram(ctx, Direction::Egress)?;
    let s = Scratch::get()?;
    copy_payload(ctx, &d, s, MAX_QUERY_COPY)?;
    if !is_plain_query(s) {
        return None;
    }
    // A malformed query is the client's own problem: nothing to remember.
    let q = question(s).ok()?;
    if (q.qtype != TYPE_A && q.qtype != TYPE_AAAA) || q.qclass != CLASS_IN {
        return None;
    }
    // That hash marks an answered query; such a name cannot be learned.
    if q.hash == ANSWERED {
        return None;
    }
    let key = PendingQueryKey {
        // SAFETY: the helper only reads the skb's socket or device.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        server: d.server,
        client_port: d.client_port,
        query_id: query_id(s),
        _pad: 0,
    };
    let pending = PendingQuery {
        name_hash: q.hash,
        qtype: u32::from(q.qtype),
        _pad: 0,
    };
    // An LRU map: a full one evicts the oldest query in flight.
    DNS_PENDING.insert(key, pending, u64::from(BPF_ANY)).ok()?;
    bump(dns_counter::QUERIES);
    Some(())
}

/// QR=0 (a query), OPCODE 0 (standard query), exactly one question.
#[inline(always)]
fn is_plain_query(s: &Scratch) -> bool {
    const QR_AND_OPCODE: u8 = 0xF8;
    s.buf[2] & QR_AND_OPCODE == 0 && u16::from_be_bytes([s.buf[4], s.buf[5]]) == 1
}
