//! The DNS interceptor (product.md, "What the DNS interceptor may
//! believe"): `query` records every A/AAAA query a socket in the cgroup
//! sends, `response` learns from the answer to it, and only from that.
//!
//! Both run inside the cgroup_skb programs (see `skb`), so they see
//! packets from the IP header on. They never drop anything: whatever they
//! cannot parse is let through and, on ingress, counted in `dns_counters`
//! under its reason.
//!
//! The parsers work on a copy of the DNS payload in a per-CPU scratch
//! buffer. kernel-notes.md, "DNS parsing in the kernel": every exit of a
//! name loop carries its own offset, and the verifier would explore the
//! rest of the parser once per exit. [`Scratch::launder`] passes offsets
//! through a map field with volatile accesses, which the verifier does not
//! track, so the exits merge; bounds are checked again after each pass.
use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map, programs::SkBuffContext};
use headway_common::{
    ADDR_MAX_SERVICES, AddrIndex, AddrKey, DNS_HASH_INIT, NO_POD, OBS_PAGE_SLOTS, Observation,
    ObservationKey, ObservationPage, RESPONSE_MAX_ADDRS, dns_hash_byte, obs_kind, obs_time,
};

use crate::maps::{DNS_COUNTERS, DNS_OBS};

const DNS_PORT: u16 = 53;
const IPPROTO_UDP: u8 = 17;
/// `__sk_buff.protocol` (the ethertype, network byte order) of IPv4/IPv6.
const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;
const ETH_P_IPV6_BE: u32 = 0x86DDu16.to_be() as u32;
const IPV4_HDR_LEN: usize = 20;
const IPV6_HDR_LEN: usize = 40;
const UDP_HDR_LEN: usize = 8;

/// DNS payload bytes copied and parsed. 1232 is the EDNS buffer size that
/// CoreDNS and most resolvers announce (DNS flag day 2020): the largest
/// UDP answer a client normally gets. 512 (plain DNS) would not hold 32 A
/// answers. Longer responses are not parsed (ERR_BAD_HEADER).
pub const MAX_PAYLOAD: usize = 1232;
/// Readers check only the start offset against `MAX_PAYLOAD`; the slack
/// keeps a read of up to 16 bytes from there inside the buffer.
const SLACK: usize = 16;
/// Bytes of a query worth copying: header, a 255-byte name, QTYPE, QCLASS.
const MAX_QUERY_COPY: usize = HEADER_LEN + MAX_NAME_LEN + 4;

pub const HEADER_LEN: usize = 12;
/// Longest name in wire form, length bytes and root byte included.
const MAX_NAME_LEN: usize = 255;
const MAX_LABEL_LEN: u8 = 63;
/// Top two bits of a length byte that mark a compression pointer.
const POINTER_BITS: u8 = 0xC0;

/// Answers walked per response; a response announcing more is refused.
pub const MAX_ANSWERS: usize = RESPONSE_MAX_ADDRS;

/// `PendingQuery::name_hash` of a query that got its answer (see
/// `response::consume`).
const ANSWERED: u64 = 0;

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
pub const CLASS_IN: u16 = 1;

/// Why a DNS response teaches nothing.
#[derive(Clone, Copy)]
pub enum Fault {
    Truncated,
    BadPointer,
    BadLabel,
    BadHeader,
    QuestionMismatch,
    NameUnknown,
    /// A well-formed response without addresses to learn (an error RCODE
    /// such as NXDOMAIN): not a fault of the packet, counted nowhere.
    NoAnswer,
}

impl Fault {
    /// The `dns_counters` index this outcome is counted under.
    #[inline(always)]
    pub fn counter(self) -> Option<u32> {
        use headway_common::dns_counter::*;
        match self {
            Fault::Truncated => Some(ERR_TRUNCATED),
            Fault::BadPointer => Some(ERR_BAD_POINTER),
            Fault::BadLabel => Some(ERR_BAD_LABEL),
            Fault::BadHeader => Some(ERR_BAD_HEADER),
            Fault::QuestionMismatch => Some(ERR_QUESTION_MISMATCH),
            Fault::NameUnknown => Some(NAME_UNKNOWN),
            Fault::NoAnswer => None,
        }
    }
}

/// Per-CPU working memory of the parsers: the copied payload, values the
/// verifier must forget (see the module docs) and the addresses of a
/// response being checked.
///
/// The payload length lives here too, read afresh by every bounds check:
/// a register holding it would be narrowed by each comparison, differently
/// on every path, and keep those paths from merging (with it in a register
/// the ingress program did not verify within 1M instructions; the name
/// loop alone doubled to ~100k).
#[repr(C)]
pub struct Scratch {
    pub buf: [u8; MAX_PAYLOAD + SLACK],
    len: u64,
    cursor: u64,
    n_addrs: u64,
    /// Sum of [`addr_hash`] over `addrs`: equal for the same addresses in
    /// any order (DNS servers rotate them).
    fingerprint: u64,
    addrs: [AddrKey; MAX_ANSWERS],
    /// A `dns_obs` page being built for a client's first answer about it.
    pub page: ObservationPage,
    /// Bit i: answer address i is still to be stamped. In memory, so the
    /// verifier does not carry one state per bit pattern through the loops.
    todo: u64,
    /// Addresses stamped so far (in memory for the same reason).
    stamped: u64,
}

// Not pinned: per-CPU scratch space, its contents mean nothing between runs.
#[btf_map(name = "dns_scratch")]
static DNS_SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// A volatile read of a field of a live map value.
macro_rules! load {
    ($place:expr) => {
        // SAFETY: a plain field of a live map value.
        unsafe { core::ptr::read_volatile(&raw const $place) }
    };
}

/// A volatile write to a field of a live map value.
macro_rules! store {
    ($place:expr, $v:expr) => {
        // SAFETY: a plain field of a live map value.
        unsafe { core::ptr::write_volatile(&raw mut $place, $v) }
    };
}

// After the macros, which the parsers use too.
pub mod addr_table;
pub mod obs_cache;
pub mod query;
pub mod response;

impl Scratch {
    /// This CPU's scratch space.
    #[inline(always)]
    pub fn get() -> Option<&'static mut Scratch> {
        // SAFETY: a per-CPU slot; one program runs on a CPU at a time, and
        // nothing else holds a reference to it across runs.
        DNS_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
    }

    /// Bytes of payload in `buf`.
    #[inline(always)]
    pub fn len(&self) -> usize {
        load!(self.len) as usize
    }

    /// Returns `pos` as an offset the verifier knows nothing about, checked
    /// again to be at most the payload length.
    #[inline(always)]
    pub fn launder(&mut self, pos: usize) -> Result<usize, Fault> {
        store!(self.cursor, pos as u64);
        let pos = load!(self.cursor) as usize;
        if pos > self.len() || pos > MAX_PAYLOAD {
            return Err(Fault::Truncated);
        }
        Ok(pos)
    }

    /// Byte `pos` of the payload.
    #[inline(always)]
    pub fn byte(&self, pos: usize) -> Result<u8, Fault> {
        if pos >= self.len() || pos >= MAX_PAYLOAD {
            return Err(Fault::Truncated);
        }
        // SAFETY: pos < MAX_PAYLOAD, inside `buf`.
        Ok(unsafe { *self.buf.as_ptr().add(pos) })
    }

    /// Big-endian u16 at `pos`.
    #[inline(always)]
    pub fn be16(&self, pos: usize) -> Result<u16, Fault> {
        Ok(u16::from_be_bytes(self.bytes::<2>(pos)?))
    }

    /// `N` (at most `SLACK`) bytes at `pos`.
    #[inline(always)]
    pub fn bytes<const N: usize>(&self, pos: usize) -> Result<[u8; N], Fault> {
        const { assert!(N <= SLACK) };
        if pos + N > self.len() || pos >= MAX_PAYLOAD {
            return Err(Fault::Truncated);
        }
        // SAFETY: pos < MAX_PAYLOAD and N <= SLACK: inside `buf`.
        Ok(unsafe { core::ptr::read_unaligned(self.buf.as_ptr().add(pos).cast::<[u8; N]>()) })
    }

    /// Forgets the addresses collected so far.
    #[inline(always)]
    pub fn clear_addrs(&mut self) {
        store!(self.n_addrs, 0);
        store!(self.fingerprint, 0);
    }

    /// The fingerprint of the addresses collected.
    #[inline(always)]
    pub fn fingerprint(&self) -> u64 {
        load!(self.fingerprint)
    }

    /// How many addresses were collected (read from memory, so that the
    /// verifier does not carry one state per count through the loops).
    #[inline(always)]
    pub fn n_addrs(&self) -> usize {
        (load!(self.n_addrs) as usize).min(MAX_ANSWERS)
    }

    /// Adds an address; at most `MAX_ANSWERS` are kept.
    #[inline(always)]
    pub fn push_addr(&mut self, addr: AddrKey) {
        let n = self.n_addrs();
        if let Some(slot) = self.addrs.get_mut(n) {
            *slot = addr;
            store!(self.n_addrs, n as u64 + 1);
            let sum = load!(self.fingerprint).wrapping_add(addr_hash(&addr));
            store!(self.fingerprint, sum);
        }
    }

    /// Address `i` of those collected (`i < n_addrs()`).
    #[inline(always)]
    pub fn addr(&self, i: usize) -> Option<AddrKey> {
        self.addrs.get(i).copied()
    }
}

/// A 64-bit hash of an address for [`Scratch::fingerprint`]: a bijection
/// of the low half (murmur3's finalizer), so two IPv4 addresses, or two
/// IPv6 addresses of one /64, never hash alike; a sum over distinct sets
/// collides with odds of about 2^-64.
#[inline(always)]
fn addr_hash(addr: &AddrKey) -> u64 {
    let [a, b, c, d] = addr.addr;
    let high = (u64::from(a) << 32) | u64::from(b);
    let low = (u64::from(c) << 32) | u64::from(d);
    let mut k = high.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ low;
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// A UDP datagram to or from port 53, as far as the interceptor cares.
pub struct Datagram {
    /// The DNS server: destination on egress, source on ingress.
    pub server: AddrKey,
    /// The client's UDP port, network byte order.
    pub client_port: u16,
    /// Offset of the DNS payload from the IP header.
    pub offset: usize,
    /// Length of the DNS payload (from the UDP header).
    pub len: usize,
}

/// Which way a packet goes, relative to the client socket in the cgroup.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A query leaving: destination port 53.
    Egress,
    /// A response arriving: source port 53.
    Ingress,
}

/// The packet as a DNS datagram, or `None` (the fast path: one context
/// read and one header load for anything that is not UDP port 53).
/// Fragments and IPv6 extension headers are not followed (fail open).
#[inline(always)]
pub fn dns_datagram(ctx: &SkBuffContext, dir: Direction) -> Option<Datagram> {
    let protocol = ctx.skb.protocol();
    if protocol == ETH_P_IP_BE {
        ipv4(ctx, dir)
    } else if protocol == ETH_P_IPV6_BE {
        ipv6(ctx, dir)
    } else {
        None
    }
}

#[inline(always)]
fn ipv4(ctx: &SkBuffContext, dir: Direction) -> Option<Datagram> {
    // The IP header without options and, when there are none, the UDP
    // header: one load for the common case.
    let h: [u8; IPV4_HDR_LEN + UDP_HDR_LEN] = ctx.load(0).ok()?;
    let ihl = usize::from(h[0] & 0x0F) * 4;
    // More-fragments flag or a fragment offset: not a whole datagram.
    let fragment = u16::from_be_bytes([h[6], h[7]]) & 0x3FFF != 0;
    if h[0] >> 4 != 4 || h[9] != IPPROTO_UDP || fragment || ihl < IPV4_HDR_LEN {
        return None;
    }
    let udp: [u8; UDP_HDR_LEN] = if ihl == IPV4_HDR_LEN {
        [h[20], h[21], h[22], h[23], h[24], h[25], h[26], h[27]]
    } else {
        ctx.load(ihl).ok()?
    };
    let src = AddrKey::from_v4_be(u32::from_ne_bytes([h[12], h[13], h[14], h[15]]));
    let dst = AddrKey::from_v4_be(u32::from_ne_bytes([h[16], h[17], h[18], h[19]]));
    udp_datagram(ctx, dir, &udp, src, dst, ihl)
}

#[inline(always)]
fn ipv6(ctx: &SkBuffContext, dir: Direction) -> Option<Datagram> {
    let h: [u8; IPV6_HDR_LEN + UDP_HDR_LEN] = ctx.load(0).ok()?;
    // Next header must be UDP: extension headers are not walked.
    if h[0] >> 4 != 6 || h[6] != IPPROTO_UDP {
        return None;
    }
    let word = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let src = AddrKey::from_v6_words([word(8), word(12), word(16), word(20)]);
    let dst = AddrKey::from_v6_words([word(24), word(28), word(32), word(36)]);
    let udp = [h[40], h[41], h[42], h[43], h[44], h[45], h[46], h[47]];
    udp_datagram(ctx, dir, &udp, src, dst, IPV6_HDR_LEN)
}

#[inline(always)]
fn udp_datagram(
    ctx: &SkBuffContext,
    dir: Direction,
    udp: &[u8; UDP_HDR_LEN],
    src: AddrKey,
    dst: AddrKey,
    l4: usize,
) -> Option<Datagram> {
    let sport = u16::from_ne_bytes([udp[0], udp[1]]);
    let dport = u16::from_ne_bytes([udp[2], udp[3]]);
    let (server, client_port, server_port) = match dir {
        Direction::Egress => (dst, sport, dport),
        Direction::Ingress => (src, dport, sport),
    };
    if server_port != DNS_PORT.to_be() {
        return None;
    }
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    let offset = l4 + UDP_HDR_LEN;
    // The UDP length must cover a DNS header and fit in the packet.
    if udp_len < UDP_HDR_LEN + HEADER_LEN || l4 + udp_len > ctx.len() as usize {
        return None;
    }
    Some(Datagram {
        server,
        client_port,
        offset,
        len: udp_len - UDP_HDR_LEN,
    })
}

/// Copies up to `max` (at most `MAX_PAYLOAD`) bytes of the DNS payload into
/// the scratch buffer.
#[inline(always)]
pub fn copy_payload(ctx: &SkBuffContext, d: &Datagram, s: &mut Scratch, max: usize) -> Option<()> {
    let len = d.len.min(max).min(MAX_PAYLOAD);
    if len < HEADER_LEN {
        return None;
    }
    // SAFETY: 12 <= len <= MAX_PAYLOAD, the size of the destination.
    let ret = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            d.offset as u32,
            s.buf.as_mut_ptr().cast(),
            len as u32,
        )
    };
    store!(s.len, len as u64);
    (ret == 0).then_some(())
}

/// The question of a message with QDCOUNT 1.
pub struct Question {
    /// [`headway_common::dns_name_hash`] of the name.
    pub hash: u64,
    pub qtype: u16,
    pub qclass: u16,
    /// Offset of the first byte after the question.
    pub end: usize,
}

/// Parses the question that starts right after the header: hashes the
/// name (case-folded, the way `dns_name_hash` does in the agent), checks
/// labels (<= 63 bytes, no compression: the first name of a message has
/// nothing to point back to) and the total length (<= 255).
#[inline(always)]
pub fn question(s: &mut Scratch) -> Result<Question, Fault> {
    let mut hash = DNS_HASH_INIT;
    // Bytes left in the current label; 0: the next byte is a length.
    let mut left: u8 = 0;
    let mut end = None;
    for i in 0..MAX_NAME_LEN {
        let pos = HEADER_LEN + i;
        let b = s.byte(pos)?;
        if left > 0 {
            left -= 1;
        } else if b == 0 {
            end = Some(pos + 1);
            break;
        } else if b & POINTER_BITS == POINTER_BITS {
            return Err(Fault::BadPointer);
        } else if b > MAX_LABEL_LEN {
            return Err(Fault::BadLabel);
        } else {
            left = b;
        }
        hash = dns_hash_byte(hash, b);
    }
    // No root byte within 255 bytes: the name is too long.
    let end = end.ok_or(Fault::BadLabel)?;
    let pos = s.launder(end)?;
    Ok(Question {
        hash,
        qtype: s.be16(pos)?,
        qclass: s.be16(pos + 2)?,
        end: pos + 4,
    })
}

/// The query ID as on the wire (network byte order).
#[inline(always)]
pub fn query_id(s: &Scratch) -> u16 {
    u16::from_ne_bytes([s.buf[0], s.buf[1]])
}

/// What the agent says of an address (`dns_addrs`, read through
/// `addr_table`): the pod that has it now and its slots in the services
/// it is or was an endpoint of, with what it is to each now. The connect
/// hooks take all of it from this one read.
#[derive(Clone, Copy)]
pub struct KnownAddress(AddrIndex);

impl KnownAddress {
    #[inline(always)]
    pub fn of(addr: &AddrKey) -> Option<KnownAddress> {
        addr_table::index(addr).map(KnownAddress)
    }

    /// The pod that has the address now, if any.
    #[inline(always)]
    pub fn pod(&self) -> Option<u32> {
        (self.0.pod_id != NO_POD).then_some(self.0.pod_id)
    }
}

/// What a client learned of an address, and what the address is to the
/// service it learned it from (`headway_common::addr_slot_flags`).
pub struct Learned {
    pub observation: Observation,
    pub flags: u16,
}

/// What the client network namespace `netns_cookie` learned about `addr`
/// (whose index is `known`) from DNS, if anything (read by the
/// connect-time decision): the newest stamp among the services `dns_addrs`
/// gives the address a slot in, each from the observation cache or, when
/// it misses, from `dns_obs`. A stamp older than the slot's `since_ns`
/// was about the slot's previous address and says nothing about this one.
#[inline(always)]
pub fn observation(netns_cookie: u64, addr: &AddrKey, known: &KnownAddress) -> Option<Learned> {
    let index = &known.0;
    let family: u16 = if crate::steer::is_v4_mapped(addr) {
        4
    } else {
        6
    };
    let n = (index.n as usize).min(ADDR_MAX_SERVICES);
    let mut best = Observation::default();
    let mut flags = 0;
    for i in 0..ADDR_MAX_SERVICES {
        if i >= n {
            break;
        }
        let entry = index.slots[i];
        let cached = obs_cache::get(netns_cookie, entry.service_id, family, entry.slot);
        let Some(stamp) = cached.or_else(|| {
            let key = ObservationKey {
                netns_cookie,
                service_id: entry.service_id,
                family,
                page: (entry.slot as usize / OBS_PAGE_SLOTS) as u16,
            };
            let page = DNS_OBS.get_ptr(&key)?;
            // One aligned u64: time and kind always belong together.
            let slot = entry.slot as usize % OBS_PAGE_SLOTS;
            // SAFETY: a field of a live map value; `slot` is in bounds.
            Some(unsafe { core::ptr::read_volatile(&raw const (*page).stamps[slot]) })
        }) else {
            continue;
        };
        let learned_ns = obs_time(stamp);
        if stamp == 0 || learned_ns < obs_time(entry.since_ns) || learned_ns <= best.learned_ns {
            continue;
        }
        best = Observation {
            service_id: entry.service_id,
            kind: obs_kind(stamp),
            learned_ns,
        };
        flags = entry.flags;
    }
    (best.learned_ns != 0).then_some(Learned {
        observation: best,
        flags,
    })
}

/// Adds one to `dns_counters[index]`.
#[inline(always)]
pub fn bump(index: u32) {
    add(index, 1);
}

/// Adds `n` to `dns_counters[index]` (per CPU: no atomics needed).
#[inline(always)]
pub fn add(index: u32, n: u64) {
    if let Some(slot) = DNS_COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot; BPF programs do not migrate mid-run.
        unsafe { *slot += n };
    }
}
