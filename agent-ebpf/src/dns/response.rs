//! Ingress: learns from the answer to a query `query` recorded, and from
//! nothing else (product.md, "What the DNS interceptor may believe").
//!
//! In order: the response must match a pending query (same network
//! namespace, server, client port and ID; the entry is consumed), have a
//! sane header, repeat the question that was asked, be about a name of a
//! headless service, and parse to the end of its answer section. Only then
//! are its addresses written to `dns_obs`, so a malformed packet teaches
//! nothing, not even its first answers.
//!
//! Most answers repeat what the client was told a moment ago. `dns_resp`
//! remembers the last answer per client netns, service, kind of name and
//! family (a fingerprint of its addresses and their pods), so such an
//! answer costs one lookup and one counter add per address instead of two
//! hash lookups per address; see `learn`.
use core::intrinsics::{AtomicOrdering, atomic_xchg};

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_ns},
    programs::SkBuffContext,
};
use headway_common::{
    AddrKey, NO_POD, NameEntry, Observation, ObservationKey, PendingQuery, PendingQueryKey,
    ResponseKey, ResponseRecord, dns_counter, name_kind,
};

use super::{
    ANSWERED, CLASS_IN, Direction, Fault, HEADER_LEN, MAX_ANSWERS, MAX_LABEL_LEN, MAX_NAME_LEN,
    MAX_PAYLOAD, POINTER_BITS, Scratch, TYPE_A, TYPE_AAAA, add, bump, copy_payload, dns_datagram,
    query_id, question,
};
use crate::{
    accounting::{count_dns_answer, pod_of},
    maps::{DNS_NAMES, DNS_OBS, DNS_PENDING, DNS_RESP, POD_ADDRS_GEN},
};

/// Labels walked in one owner name before giving up (ERR_BAD_LABEL). Owner
/// names are usually a single compression pointer; 32 labels is far more
/// than any Kubernetes name has (`a.b.c.svc.cluster.local` is 6).
const MAX_LABELS: usize = 32;
/// How long a `dns_resp` record vouches for the `dns_obs` entries of its
/// addresses. Within it a repeated answer does not look them up; after
/// it, they are checked again (and restored if LRU pressure evicted one).
const TRUST_NS: u64 = 1_000_000_000;
/// An observation that already says the same thing is rewritten only to
/// move `learned_ns` on, and not more often than this: most answers repeat
/// what the client learned a moment ago, and a lookup is cheaper than an
/// update.
const REFRESH_NS: u64 = 1_000_000_000;

const FLAG_QR: u16 = 0x8000;
const FLAG_TC: u16 = 0x0200;
const OPCODE_MASK: u16 = 0x7800;
const RCODE_MASK: u16 = 0x000F;
/// Fixed part of a resource record after its name: TYPE, CLASS, TTL,
/// RDLENGTH.
const RR_FIXED_LEN: usize = 10;

/// A packet arriving at a socket of the cgroup: if it is the answer to a
/// recorded query, learn from it.
#[inline(always)]
pub fn on_response(ctx: &SkBuffContext) -> Option<()> {
    let d = dns_datagram(ctx, Direction::Ingress)?;
    bump(dns_counter::RESPONSES);
    let s = Scratch::get()?;
    copy_payload(ctx, &d, s, MAX_PAYLOAD)?;
    // SAFETY: the helper only reads the skb's socket or device.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = PendingQueryKey {
        netns_cookie,
        server: d.server,
        client_port: d.client_port,
        query_id: query_id(s),
        _pad: 0,
    };
    let Some(pending) = consume(&key) else {
        // Not an answer to anything this socket asked: spoofed, late or
        // a duplicate. It must teach nothing.
        bump(dns_counter::UNSOLICITED);
        return None;
    };
    match check(s, d.len, &pending) {
        Ok(entry) => learn(s, netns_cookie, entry, pending.qtype as u16),
        Err(fault) => {
            if let Some(counter) = fault.counter() {
                bump(counter);
            }
        }
    }
    Some(())
}

/// Takes the pending query `key` names, if there is one: one query, one
/// answer, so a second response to it is unsolicited.
///
/// The entry is marked answered (name hash 0) rather than deleted: an
/// atomic exchange settles a race between two responses on two CPUs just
/// as well, without the LRU map's delete path (a bucket lock, then the
/// LRU's global free-list lock: ~130 ns here, a third of the whole fixed
/// cost). The answered entry is among the oldest in the map and the first
/// to be evicted; a new query with the same key overwrites it. (A name
/// hashing to exactly 0 is never recorded: a 2^-64 chance.)
#[inline(always)]
fn consume(key: &PendingQueryKey) -> Option<PendingQuery> {
    let entry = DNS_PENDING.get_ptr_mut(key)?;
    // SAFETY: a live map value; name_hash is an aligned u64 (the BPF
    // target has no 32-bit exchange).
    let name_hash = unsafe {
        atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(&raw mut (*entry).name_hash, ANSWERED)
    };
    if name_hash == ANSWERED {
        return None;
    }
    Some(PendingQuery {
        name_hash,
        // SAFETY: as above; written only together with the whole entry.
        qtype: unsafe { (*entry).qtype },
        _pad: 0,
    })
}

/// Checks the whole response; on success the addresses of its answers are
/// in the scratch space and the name they answer is returned.
#[inline(always)]
fn check(s: &mut Scratch, udp_len: usize, pending: &PendingQuery) -> Result<NameEntry, Fault> {
    let ancount = header(s, udp_len)?;
    let q = question(s)?;
    if q.hash != pending.name_hash || u32::from(q.qtype) != pending.qtype || q.qclass != CLASS_IN {
        return Err(Fault::QuestionMismatch);
    }
    // SAFETY: copied out at once.
    let entry = (unsafe { DNS_NAMES.get(q.hash) })
        .copied()
        .ok_or(Fault::NameUnknown)?;
    walk_answers(s, q.end, ancount, q.qtype)?;
    Ok(entry)
}

/// Checks the header of a response and returns its ANCOUNT.
#[inline(always)]
fn header(s: &Scratch, udp_len: usize) -> Result<usize, Fault> {
    let flags = s.be16(2)?;
    let qdcount = s.be16(4)?;
    let ancount = usize::from(s.be16(6)?);
    if flags & FLAG_QR == 0 || flags & OPCODE_MASK != 0 || qdcount != 1 {
        return Err(Fault::BadHeader);
    }
    if flags & FLAG_TC != 0 {
        // The client will ask again over TCP; the UDP part is incomplete.
        return Err(Fault::Truncated);
    }
    // More than the parser copies or walks: refuse rather than trust part.
    if udp_len > MAX_PAYLOAD || ancount > MAX_ANSWERS {
        return Err(Fault::BadHeader);
    }
    if flags & RCODE_MASK != 0 {
        return Err(Fault::NoAnswer);
    }
    Ok(ancount)
}

/// Walks `ancount` answers from `pos`, checking every name and record
/// length, and collects the addresses of the records of the asked type
/// (class IN, A with 4 or AAAA with 16 bytes of data). CNAME records, and
/// anything else, are skipped: their targets own the addresses that follow,
/// and the question matched our own query, so any owner is accepted.
#[inline(always)]
fn walk_answers(s: &mut Scratch, start: usize, ancount: usize, qtype: u16) -> Result<(), Fault> {
    s.clear_addrs();
    let mut pos = start;
    for i in 0..MAX_ANSWERS {
        if i >= ancount {
            return Ok(());
        }
        let name = s.launder(pos)?;
        let fixed = skip_name(s, name)?;
        let fixed = s.launder(fixed)?;
        let rtype = s.be16(fixed)?;
        let rclass = s.be16(fixed + 2)?;
        let rdlen = usize::from(s.be16(fixed + 8)?);
        let rdata = fixed + RR_FIXED_LEN;
        if rdata + rdlen > s.len() {
            return Err(Fault::Truncated);
        }
        if rtype == qtype && rclass == CLASS_IN {
            collect(s, rdata, rdlen, qtype)?;
        }
        pos = rdata + rdlen;
    }
    Ok(())
}

/// Skips the name at `start`; returns the offset after it. A compression
/// pointer ends a name and must point back before the name's own start
/// (and after the header): that rules out loops and pointers out of the
/// packet without following them, which skipping does not need.
#[inline(always)]
fn skip_name(s: &Scratch, start: usize) -> Result<usize, Fault> {
    let mut pos = start;
    for _ in 0..MAX_LABELS {
        let b = s.byte(pos)?;
        if b == 0 {
            return Ok(pos + 1);
        }
        if b & POINTER_BITS == POINTER_BITS {
            let low = s.byte(pos + 1)?;
            let target = usize::from(u16::from_be_bytes([b & !POINTER_BITS, low]));
            if target < HEADER_LEN || target >= start {
                return Err(Fault::BadPointer);
            }
            return Ok(pos + 2);
        }
        if b > MAX_LABEL_LEN {
            return Err(Fault::BadLabel);
        }
        pos += 1 + usize::from(b);
        if pos - start >= MAX_NAME_LEN {
            return Err(Fault::BadLabel);
        }
    }
    Err(Fault::BadLabel)
}

/// Collects the address in an A/AAAA record's data.
#[inline(always)]
fn collect(s: &mut Scratch, rdata: usize, rdlen: usize, qtype: u16) -> Result<(), Fault> {
    let addr = if qtype == TYPE_A && rdlen == 4 {
        AddrKey::from_v4_be(u32::from_ne_bytes(s.bytes::<4>(rdata)?))
    } else if qtype == TYPE_AAAA && rdlen == 16 {
        AddrKey::from_octets(s.bytes::<16>(rdata)?)
    } else {
        // An address record of the wrong size teaches nothing by itself.
        return Ok(());
    };
    s.push_addr(addr);
    Ok(())
}

/// Records every collected address as handed out to this client network
/// namespace by `entry`'s name, and counts each for the pod it belongs to.
///
/// The common case is a client asking again and getting what it got a
/// moment ago. `dns_resp` keeps, per client netns, service, kind of name
/// and family, the last answer's fingerprint and the pods of its
/// addresses; when this answer has the same addresses, every `dns_obs`
/// entry was checked within `TRUST_NS` and no pod address changed since,
/// the response costs that one lookup plus one counter add per address.
/// Otherwise each address is checked (and written if new or different),
/// its pod looked up, and the record rewritten: one map update for the
/// response.
#[inline(always)]
fn learn(s: &mut Scratch, netns_cookie: u64, entry: NameEntry, qtype: u16) {
    // One lookup of a headless name answered, by kind of name.
    let service_wide = entry.kind == name_kind::SERVICE;
    bump(if service_wide {
        dns_counter::LOOKUPS_SERVICE
    } else {
        dns_counter::LOOKUPS_POD
    });
    crate::accounting::count_lookup(entry.service_id, service_wide);
    let n = s.n_addrs();
    if n == 0 {
        return;
    }
    // SAFETY: no arguments, no side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    // Read before any pod lookup: an agent change after this read bumps
    // the generation past what the record stores.
    let pod_gen = POD_ADDRS_GEN.get(0).copied().unwrap_or(0);
    let key = response_key(netns_cookie, entry.service_id, entry.kind, qtype);
    let fingerprint = s.fingerprint();
    let mut obs_fresh = false;
    let mut pods_fresh = false;
    let mut verified_ns = now;
    let record = DNS_RESP.get_ptr_mut(&key);
    if let Some(r) = record {
        // Fields of a live map value, read one by one.
        if load!((*r).fingerprint) == fingerprint && load!((*r).n_addrs) as usize == n {
            let verified = load!((*r).verified_ns);
            obs_fresh = verified != 0 && now.wrapping_sub(verified) < TRUST_NS;
            pods_fresh = load!((*r).pod_gen) == pod_gen;
            if obs_fresh {
                verified_ns = verified;
            }
        }
    }
    if let (true, true, Some(r)) = (obs_fresh, pods_fresh, record) {
        count_cached_pods(r, n);
        add(dns_counter::ADDRS_LEARNED, n as u64);
        return;
    }

    let mut learned = n as u64;
    if !obs_fresh {
        learned = 0;
        for i in 0..MAX_ANSWERS {
            if i >= s.n_addrs() {
                break;
            }
            let Some(addr) = s.addr(i) else {
                break;
            };
            if observe(netns_cookie, addr, entry, qtype, now) {
                learned += 1;
            } else {
                bump(dns_counter::ERR_MAP_FULL);
            }
        }
    }
    add(dns_counter::ADDRS_LEARNED, learned);
    // A map that refused an address must not be vouched for: the next
    // answer checks them all again.
    let vouch = learned == n as u64;
    if let (true, Some(r)) = (pods_fresh, record) {
        count_cached_pods(r, n);
        // Same addresses, same pods, each entry just checked: only the
        // time of the check moves on (one aligned store, no map update).
        if vouch {
            store!((*r).verified_ns, now);
        }
        return;
    }
    look_up_pods(s);
    if !vouch {
        return;
    }
    store!(s.record.fingerprint, fingerprint);
    store!(s.record.verified_ns, verified_ns);
    store!(s.record.pod_gen, pod_gen);
    store!(s.record.n_addrs, n as u32);
    // An LRU map: a full one evicts the least recently used record.
    if DNS_RESP
        .insert(&key, &s.record, u64::from(BPF_ANY))
        .is_err()
    {
        bump(dns_counter::ERR_MAP_FULL);
    }
}

#[inline(always)]
fn response_key(netns_cookie: u64, service_id: u32, kind: u32, qtype: u16) -> ResponseKey {
    ResponseKey {
        netns_cookie,
        service_id,
        kind: kind as u16,
        qtype,
    }
}

/// Counts one DNS answer for each pod a record remembers.
#[inline(always)]
fn count_cached_pods(r: *mut ResponseRecord, n: usize) {
    for i in 0..MAX_ANSWERS {
        if i >= n {
            break;
        }
        // A field of a live map value; `i` is in bounds.
        let pod_id = load!((*r).pod_ids[i]);
        count_dns_answer(pod_id);
    }
}

/// Looks up the pod of every collected address, counts the answer for it
/// and notes it in the record being built.
#[inline(always)]
fn look_up_pods(s: &mut Scratch) {
    for i in 0..MAX_ANSWERS {
        if i >= s.n_addrs() {
            break;
        }
        let pod_id = s.addr(i).and_then(|addr| pod_of(&addr)).unwrap_or(NO_POD);
        count_dns_answer(pod_id);
        if let Some(slot) = s.record.pod_ids.get_mut(i) {
            *slot = pod_id;
        }
    }
}

/// Writes one observation, unless the map already says the same thing
/// (the lookup alone refreshes the entry's LRU position). False if the map
/// refused it.
#[inline(always)]
fn observe(netns_cookie: u64, addr: AddrKey, entry: NameEntry, qtype: u16, now: u64) -> bool {
    let key = ObservationKey { netns_cookie, addr };
    if let Some(obs) = DNS_OBS.get_ptr_mut(&key) {
        // SAFETY: a live map value; the fields are read and written one
        // by one (the u64 store is atomic for a concurrent reader).
        let (service_id, kind) = unsafe {
            if (*obs).service_id == entry.service_id && (*obs).kind == entry.kind {
                if now.wrapping_sub((*obs).learned_ns) > REFRESH_NS {
                    (*obs).learned_ns = now;
                }
                return true;
            }
            ((*obs).service_id, (*obs).kind)
        };
        // The address now says something else: the record that vouched
        // for it under its old service and kind must check again.
        invalidate(response_key(netns_cookie, service_id, kind, qtype));
    }
    // New, or learned from another name: replace the whole value at once
    // so a concurrent connect() never sees half of each.
    let obs = Observation {
        service_id: entry.service_id,
        kind: entry.kind,
        learned_ns: now,
    };
    DNS_OBS.insert(key, obs, u64::from(BPF_ANY)).is_ok()
}

/// Makes a `dns_resp` record vouch for nothing until its next rewrite.
#[inline(always)]
fn invalidate(key: ResponseKey) {
    if let Some(r) = DNS_RESP.get_ptr_mut(&key) {
        // An aligned u64 of a live map value: one atomic store.
        store!((*r).verified_ns, 0);
    }
}
