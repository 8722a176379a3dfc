//! Ingress: learns from the answer to a query `query` recorded, and from
//! nothing else (product.md, "What the DNS interceptor may believe").
//!
//! In order: the response must match a pending query (same network
//! namespace, server, client port and ID; the entry is consumed), have a
//! sane header, repeat the question that was asked, be about a name of a
//! headless service, and parse to the end of its answer section. Only then
//! is anything written, so a malformed packet teaches nothing, not even its
//! first answers.
//!
//! What a response teaches is stamped into the client's `dns_obs` page of
//! the service's address slots (the agent gives every address of a
//! headless service a slot, in `dns_addrs`): one map write per response,
//! whatever the number of answers; see `learn`. Each stamp also goes to
//! the observation cache connect() reads first (`obs_cache`).
use core::intrinsics::{AtomicOrdering, atomic_xchg};

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    btf_maps::PerCpuArray,
    helpers::{bpf_get_netns_cookie, bpf_ktime_get_ns},
    macros::btf_map,
    programs::SkBuffContext,
};
use headway_common::{
    AddrKey, NO_POD, NO_SLOT, NameEntry, OBS_MAX_PAGES, OBS_PAGE_SLOTS, ObservationKey,
    PendingQuery, PendingQueryKey, dns_counter, name_kind, obs_stamp,
};

use super::{
    ANSWERED, CLASS_IN, Direction, Fault, HEADER_LEN, MAX_ANSWERS, MAX_LABEL_LEN, MAX_NAME_LEN,
    MAX_PAYLOAD, POINTER_BITS, Scratch, TYPE_A, TYPE_AAAA, add, addr_table::known, bump,
    copy_payload, dns_datagram, obs_cache, query_id, question,
};
use crate::{
    accounting::count_dns_answer,
    maps::{DNS_NAMES, DNS_OBS, DNS_PENDING, POD_ADDRS_GEN},
};

/// Labels walked in one owner name before giving up (ERR_BAD_LABEL). Owner
/// names are usually a single compression pointer; 32 labels is far more
/// than any Kubernetes name has (`a.b.c.svc.cluster.local` is 6).
const MAX_LABELS: usize = 32;
/// Entries of the per-CPU answer cache (`dns_answers`).
const ANSWER_CACHE_SLOTS: u32 = 64;

const FLAG_QR: u16 = 0x8000;
const FLAG_TC: u16 = 0x0200;
const OPCODE_MASK: u16 = 0x7800;
const RCODE_MASK: u16 = 0x000F;
/// Fixed part of a resource record after its name: TYPE, CLASS, TTL,
/// RDLENGTH.
const RR_FIXED_LEN: usize = 10;

/// The slots and pods of one answer's addresses, as `dns_addrs` gave them
/// under `pod_gen`: the same answer again (any order: the fingerprint is a
/// sum) needs no per-address lookup. Nothing in it is per client, so one
/// client's answer serves the next one's first.
#[repr(C)]
pub struct CachedAnswer {
    fingerprint: u64,
    pod_gen: u64,
    service_id: u32,
    qtype: u16,
    n: u16,
    slots: [u32; MAX_ANSWERS],
    pod_ids: [u32; MAX_ANSWERS],
}

// Not pinned: a per-CPU cache (no locking: one program runs on a CPU at a
// time), rebuilt from `dns_addrs` whenever it misses.
#[btf_map(name = "dns_answers")]
static DNS_ANSWERS: PerCpuArray<CachedAnswer, { ANSWER_CACHE_SLOTS as usize }> = PerCpuArray::new();

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
        if let Some(next) = compressed_a(s, name, qtype)? {
            pos = next;
            continue;
        }
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

/// The record at `start` if it has the shape nearly every answer of an A
/// query has: its owner a compression pointer, then an A record of class
/// IN, 16 bytes in all. Read with one load instead of the six checked reads
/// of the general walk, with the same checks and outcome; returns the
/// offset after it, or `None` for any other shape (the general walk then
/// takes it).
#[inline(always)]
fn compressed_a(s: &mut Scratch, start: usize, qtype: u16) -> Result<Option<usize>, Fault> {
    const LEN: usize = 2 + RR_FIXED_LEN + 4;
    if qtype != TYPE_A {
        return Ok(None);
    }
    let Ok(r) = s.bytes::<LEN>(start) else {
        return Ok(None);
    };
    let rtype = u16::from_be_bytes([r[2], r[3]]);
    let rclass = u16::from_be_bytes([r[4], r[5]]);
    let rdlen = u16::from_be_bytes([r[10], r[11]]);
    if r[0] & POINTER_BITS != POINTER_BITS || rtype != TYPE_A || rclass != CLASS_IN || rdlen != 4 {
        return Ok(None);
    }
    let target = usize::from(u16::from_be_bytes([r[0] & !POINTER_BITS, r[1]]));
    if target < HEADER_LEN || target >= start {
        return Err(Fault::BadPointer);
    }
    s.push_addr(AddrKey::from_v4_be(u32::from_ne_bytes([
        r[12], r[13], r[14], r[15],
    ])));
    Ok(Some(start + LEN))
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

/// Stamps every collected address as handed out to this client network
/// namespace by `entry`'s name, and counts each for the pod it belongs to.
///
/// Per address this needs its pod and its slot in the service: one
/// `dns_addrs` lookup, or none when this CPU's answer cache already holds
/// the same answer (the common case: clients ask again, and every client of
/// a service gets the same addresses). Then one aligned store per address
/// into the client's `dns_obs` page, which is looked up once, or created
/// with one insert the first time.
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
    // Read before any `dns_addrs` lookup: an agent change after this read
    // bumps the generation past what the cache stores.
    let pod_gen = POD_ADDRS_GEN.get(0).copied().unwrap_or(0);
    let fingerprint = s.fingerprint();
    let index = (fingerprint ^ u64::from(entry.service_id)) as u32 % ANSWER_CACHE_SLOTS;
    let Some(c) = DNS_ANSWERS.get_ptr_mut(index) else {
        return;
    };
    let hit = load!((*c).fingerprint) == fingerprint
        && load!((*c).pod_gen) == pod_gen
        && load!((*c).service_id) == entry.service_id
        && load!((*c).qtype) == qtype
        && load!((*c).n) as usize == n;
    if !hit {
        fill_cache(s, c, entry.service_id, n);
        store!((*c).fingerprint, fingerprint);
        store!((*c).pod_gen, pod_gen);
        store!((*c).service_id, entry.service_id);
        store!((*c).qtype, qtype);
        store!((*c).n, n as u16);
    }
    let family = if qtype == TYPE_A { 4 } else { 6 };
    let learned = stamp_pages(s, c, n, netns_cookie, entry, family, now);
    add(dns_counter::ADDRS_LEARNED, learned);
}

/// Looks up every collected address (`addr_table`): its pod (counted) and
/// its slot in `service_id` (or `NO_SLOT`: never an endpoint of it, as far
/// as the agent knows, so connect() would not look for it there either).
#[inline(always)]
fn fill_cache(s: &Scratch, c: *mut CachedAnswer, service_id: u32, n: usize) {
    for i in 0..MAX_ANSWERS {
        if i >= n {
            break;
        }
        let known = s.addr(i).and_then(|addr| known(&addr, service_id));
        let (pod_id, slot) = known.map_or((NO_POD, NO_SLOT), |k| (k.pod_id, k.slot));
        store!((*c).pod_ids[i], pod_id);
        store!((*c).slots[i], slot);
    }
}

/// Counts each address for its pod and stamps it into the client's page of
/// its slot; returns how many were stamped. A page the client has no entry
/// for yet is built in the scratch space and inserted whole: the one map
/// update of a first answer.
#[inline(always)]
fn stamp_pages(
    s: &mut Scratch,
    c: *mut CachedAnswer,
    n: usize,
    netns_cookie: u64,
    entry: NameEntry,
    family: u16,
    now: u64,
) -> u64 {
    let stamp = obs_stamp(now, entry.kind);
    store!(s.todo, 0);
    store!(s.stamped, 0);
    for i in 0..MAX_ANSWERS {
        if i >= n {
            break;
        }
        count_dns_answer(load!((*c).pod_ids[i]));
        let slot = load!((*c).slots[i]);
        // The cache gets every stamp a page may get, first: the page
        // writes below may stop early (a full map), and a cache entry
        // older than its page would hide the page's newer stamp.
        if slot < (OBS_MAX_PAGES * OBS_PAGE_SLOTS) as u32 {
            obs_cache::put(netns_cookie, entry.service_id, family, slot as u16, stamp);
        }
        if slot != NO_SLOT {
            let todo = load!(s.todo);
            store!(s.todo, todo | 1 << i);
        }
    }
    for _ in 0..OBS_MAX_PAGES {
        if load!(s.todo) == 0 {
            break;
        }
        // The page of the first address still to stamp; the others in the
        // same page go with it.
        let mut page = 0;
        for i in 0..MAX_ANSWERS {
            if load!(s.todo) & (1 << i) != 0 {
                page = load!((*c).slots[i]) as usize / OBS_PAGE_SLOTS;
                break;
            }
        }
        let key = ObservationKey {
            netns_cookie,
            service_id: entry.service_id,
            family,
            page: page as u16,
        };
        if let Some(p) = DNS_OBS.get_ptr_mut(&key) {
            for i in 0..MAX_ANSWERS {
                if no_more_todo(s, i) {
                    break;
                }
                if let Some(slot) = take_slot(s, c, i, page) {
                    // One aligned store: a concurrent connect() reads the
                    // old stamp or the new one.
                    store!((*p).stamps[slot], stamp);
                }
            }
        } else {
            for slot in 0..OBS_PAGE_SLOTS {
                store!(s.page.stamps[slot], 0);
            }
            for i in 0..MAX_ANSWERS {
                if no_more_todo(s, i) {
                    break;
                }
                if let Some(slot) = take_slot(s, c, i, page) {
                    store!(s.page.stamps[slot], stamp);
                }
            }
            if !insert_page(s, &key) {
                bump(dns_counter::ERR_MAP_FULL);
                return 0;
            }
        }
    }
    // Slots beyond the pages one response may touch (the agent keeps a
    // service's slots within them): not learned, and said so.
    if load!(s.todo) != 0 {
        bump(dns_counter::ERR_MAP_FULL);
    }
    load!(s.stamped)
}

/// Whether no answer address from `i` on is still to stamp (read from
/// memory, like `todo` itself: a bound the verifier does not track, so the
/// loops that stop here do not split its states).
#[inline(always)]
fn no_more_todo(s: &Scratch, i: usize) -> bool {
    load!(s.todo) >> i == 0
}

/// If answer address `i` is still to stamp and its slot is in `page`,
/// marks it done and returns its index in the page.
#[inline(always)]
fn take_slot(s: &mut Scratch, c: *mut CachedAnswer, i: usize, page: usize) -> Option<usize> {
    let todo = load!(s.todo);
    if todo & (1 << i) == 0 {
        return None;
    }
    let slot = load!((*c).slots[i]) as usize;
    if slot / OBS_PAGE_SLOTS != page {
        return None;
    }
    store!(s.todo, todo & !(1 << i));
    let stamped = load!(s.stamped);
    store!(s.stamped, stamped + 1);
    Some(slot % OBS_PAGE_SLOTS)
}

/// Inserts the page built in the scratch space. If another CPU created it
/// meanwhile, its stamps stay and ours are added to them.
#[inline(always)]
fn insert_page(s: &Scratch, key: &ObservationKey) -> bool {
    // An LRU map: a full one evicts the least recently used page.
    if DNS_OBS.insert(key, &s.page, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    let Some(p) = DNS_OBS.get_ptr_mut(key) else {
        return false;
    };
    for slot in 0..OBS_PAGE_SLOTS {
        let stamp = load!(s.page.stamps[slot]);
        if stamp != 0 {
            store!((*p).stamps[slot], stamp);
        }
    }
    true
}
