//! The layout of every map headway pins, shared by the kernel programs and
//! the agent. Everything here is `#[repr(C)]` with explicit padding and no
//! `bool`/`Option`, so both sides (and bpftool, through BTF) agree on it.
//!
//! Addresses are stored as 16 bytes in network byte order, viewed as four
//! `u32` words the way the socket hooks see them: IPv6 as is, IPv4 as an
//! IPv4-mapped IPv6 address (`::ffff:a.b.c.d`). One map then serves both
//! families.
#![no_std]

/// Directory under the bpffs mount where headway pins its maps and links.
pub const PIN_DIR: &str = "headway";

/// Names of the pinned maps. A BPF object name holds at most 15 bytes.
pub mod map_names {
    /// [`crate::AddrKey`] → [`crate::PodRef`]: every address of a pod behind
    /// a headless service. The connect hooks' fast path is one lookup here.
    pub const POD_ADDRS: &str = "pod_addrs";
    /// pod id (array index) → [`crate::PodCounters`], updated by the kernel.
    /// Mappable, so that it starts on a page and each pod's counters are
    /// one cache line. (72-byte entries with `dns_answers` inside before;
    /// an agent carries such a map's counts over: `pod_stats_upgrade`.)
    pub const POD_STATS: &str = "pod_stats";
    /// pod id (array index) → u64: DNS answers that handed the pod's
    /// address out (the interceptor's count, kept off the line the
    /// datapath's counters share). Mappable, like `pod_stats`.
    pub const POD_DNS_ANSWERS: &str = "pod_dns_answers";
    /// pod id → [`crate::PodMeta`], written by the agent for `status`.
    pub const PODS: &str = "pods";
    /// service id → [`crate::ServiceMeta`], written by the agent.
    pub const SERVICES: &str = "services";
    /// [`crate::ServiceEndpointKey`] → [`crate::EndpointState`]: which pod
    /// addresses belong to which service, and in what state.
    pub const SVC_ENDPOINTS: &str = "svc_endpoints";

    /// name hash ([`crate::dns_name_hash`]) → [`crate::NameEntry`]: every DNS
    /// name that can hand out an address of a headless service.
    pub const DNS_NAMES: &str = "dns_names";
    /// [`crate::PendingQueryKey`] → [`crate::PendingQuery`]: DNS queries sent
    /// and not yet answered (LRU), so only real answers teach anything.
    pub const DNS_PENDING: &str = "dns_pending";
    /// [`crate::ObservationKey`] → [`crate::ObservationPage`]: what each
    /// client network namespace learned from one service's names, one
    /// stamp (time and kind of name) per address slot of the service (LRU).
    /// A response costs one write here, not one per address.
    pub const DNS_OBS: &str = "dns_obs";
    /// [`crate::AddrKey`] → [`crate::AddrIndex`] (agent-written): the pod of
    /// each address and, for every headless service it was ever an endpoint
    /// of (kept after it left, until its slot is needed), its slot there.
    /// The interceptor finds where to stamp an answer; connect() finds
    /// where to read what a client learned.
    pub const DNS_ADDRS: &str = "dns_addrs";
    /// index 0 → u64: bumped by the agent after every change of
    /// `pod_addrs` or `dns_addrs`, so the kernel knows when the pod ids and
    /// slots it cached per answer are stale.
    pub const POD_ADDRS_GEN: &str = "pod_addrs_gen";
    /// index ([`crate::dns_counter`]) → u64, per CPU: DNS interceptor outcomes.
    pub const DNS_COUNTERS: &str = "dns_counters";
    /// [`crate::BackendKey`] → [`crate::Backend`]: each service's choice
    /// tables per family (see [`crate::ServiceMeta`] for the slot ranges).
    pub const SVC_BACKENDS: &str = "svc_backends";
    /// index 0 → [`crate::Config`]: settings the agent hands the kernel.
    pub const CONFIG: &str = "config";
    /// index ([`crate::steer_counter`]) → u64, per CPU: connect decisions.
    pub const STEER_COUNTERS: &str = "steer_counters";
    /// service id (array index) → [`crate::ServiceCounters`].
    pub const SVC_STATS: &str = "svc_stats";
    /// [`crate::ServicePortKey`] → u32 (unused): the ports a service
    /// declares; only connections to them are steered.
    pub const SVC_PORTS: &str = "svc_ports";
    /// u32 word index → u64: a Bloom filter of [`crate::AddrKey`]s with
    /// both of an address's bits in one word ([`crate::addr_filter`]). It
    /// holds every address the agent put in `pod_addrs` since it started,
    /// and every address `dns_addrs` held then. The connect hooks' fast
    /// path is one test here: an address it does not hold is no headless
    /// service's, and no headless name can have handed it out, so nothing
    /// more is looked up.
    pub const ADDR_FILTER: &str = "addr_bits";
    /// u32 position → [`crate::SockSlot`]: what headway keeps for a
    /// client socket while it lives, at a position its cookie picks (see
    /// [`crate::sock_table`]). A steered socket's address asked for and pod
    /// chosen (getpeername/recvmsg report the former); the pod a socket
    /// talks to, so its bytes and its close are counted to that pod.
    /// Preallocated (no allocation per socket), freed when the socket
    /// closes. Pinned so a restarted agent's programs find what the old
    /// ones set.
    pub const SOCK_TABLE: &str = "sock_table";
    /// The socket table's maps before `sock_table` (see
    /// [`crate::sock_table_v1`]): kept pinned while records of live sockets
    /// remain in them, removed by the agent that finds them empty.
    pub mod legacy {
        /// u32 bucket → [`crate::sock_table_v1::SockBucket`].
        pub const SOCK_COOKIES: &str = "sock_cookies";
        /// u32 → [`crate::sock_table_v1::SocketState`].
        pub const SOCK_RECORDS: &str = "sock_records";
        /// u32 → u32: sockets in spill buckets per group of home buckets.
        pub const SOCK_SPILLS: &str = "sock_spills";

        pub const ALL: [&str; 3] = [SOCK_COOKIES, SOCK_RECORDS, SOCK_SPILLS];
    }
    /// u32 → u64, per CPU: the socket table's counters ([`crate::sock_counter`]).
    pub const SOCK_COUNTERS: &str = "sock_counters";

    /// position → [`crate::AddrTableEntry`] (agent-written): a copy of
    /// `dns_addrs` in an array, each address at one of a few positions
    /// ([`crate::addr_table`]), so the DNS interceptor and connect() read
    /// an address's pod and slots inline instead of walking a hash bucket.
    /// A miss (not placed, being rewritten) means "ask `dns_addrs`".
    /// (Named `dns_addr_table`, with 64-byte entries, before it held
    /// `since_ns`; that pin is retired on upgrade.)
    pub const ADDR_TABLE: &str = "addr_table";

    /// service id (array index) → [`crate::ServiceSteering`]
    /// (agent-written): what connect() needs of each service, read inline.
    pub const SVC_STEERING: &str = "svc_steering";

    /// Every map the agent pins, in the order `status` reads them.
    pub const ALL: [&str; 22] = [
        POD_ADDRS,
        POD_STATS,
        POD_DNS_ANSWERS,
        PODS,
        SERVICES,
        SVC_ENDPOINTS,
        DNS_NAMES,
        DNS_PENDING,
        DNS_OBS,
        DNS_COUNTERS,
        SVC_BACKENDS,
        CONFIG,
        STEER_COUNTERS,
        SVC_STATS,
        SVC_PORTS,
        ADDR_FILTER,
        DNS_ADDRS,
        POD_ADDRS_GEN,
        SOCK_TABLE,
        SOCK_COUNTERS,
        ADDR_TABLE,
        SVC_STEERING,
    ];
}

/// Names of the kernel programs; links are pinned as `link_<program>`.
pub mod program_names {
    pub const CONNECT4: &str = "hw_connect4";
    pub const CONNECT6: &str = "hw_connect6";
    /// cgroup_skb egress, every packet sent: records DNS queries in
    /// flight (`dns_pending`) and counts bytes sent by client sockets
    /// talking to a pod. One program per direction: each run costs the
    /// packet a program dispatch, whatever the program does.
    pub const SKB_EGRESS: &str = "hw_skb_egress";
    /// cgroup_skb ingress, every packet received: learns from the answers
    /// to those queries (`dns_obs`) and counts bytes received.
    pub const SKB_INGRESS: &str = "hw_skb_ingress";
    /// getpeername4/6: a steered socket reports the address asked for.
    pub const GETPEERNAME4: &str = "hw_getpeer4";
    pub const GETPEERNAME6: &str = "hw_getpeer6";
    /// recvmsg4/6: replies to a steered UDP socket come from that address.
    pub const RECVMSG4: &str = "hw_recvmsg4";
    pub const RECVMSG6: &str = "hw_recvmsg6";
    /// sendmsg4/6: unconnected UDP datagrams are steered per socket.
    pub const SENDMSG4: &str = "hw_sendmsg4";
    pub const SENDMSG6: &str = "hw_sendmsg6";
    /// sock_ops: active TCP connections per pod (established → closed).
    pub const SOCK_OPS: &str = "hw_sock_ops";
    /// cgroup/sock_release: gives back a closed socket's record in the
    /// socket table.
    pub const SOCK_RELEASE: &str = "hw_sock_release";

    pub const ALL: [&str; 12] = [
        CONNECT4,
        CONNECT6,
        SKB_EGRESS,
        SKB_INGRESS,
        GETPEERNAME4,
        GETPEERNAME6,
        RECVMSG4,
        RECVMSG6,
        SENDMSG4,
        SENDMSG6,
        SOCK_OPS,
        SOCK_RELEASE,
    ];
}

/// Default capacities, sized for 65,536 endpoints cluster-wide.
pub mod capacity {
    pub const POD_ADDRS: u32 = 65_536;
    pub const PODS: u32 = 65_536;
    pub const SERVICES: u32 = 16_384;
    pub const SVC_ENDPOINTS: u32 = 131_072;
    /// Service-wide names, pod names and dashed-IP names.
    pub const DNS_NAMES: u32 = 262_144;
    pub const DNS_PENDING: u32 = 16_384;
    /// One per client netns, service, family and page of 64 address
    /// slots it resolved.
    pub const DNS_OBS: u32 = 65_536;
    /// Addresses of pods behind headless services, current and recently
    /// gone (slots are kept for gone ones until needed).
    pub const DNS_ADDRS: u32 = 131_072;
    /// Choice-table slots: one per eligible pod, more under `weighted`,
    /// twice for the pods a topology preference picks.
    pub const SVC_BACKENDS: u32 = 262_144;
    pub const SVC_PORTS: u32 = 65_536;
    /// Client sockets talking to pods from this node at once (records of
    /// the socket table; see [`crate::sock_table`]).
    pub const SOCKETS: u32 = 65_536;
}

/// The socket table (`map_names::SOCK_TABLE`): what headway keeps per
/// client socket, one cache line per socket ([`SockSlot`]: the cookie and
/// the record together), in a preallocated array, so that no hook
/// allocates per socket (socket storage cost ~0.7 µs to create and ~0.4 µs
/// to free here, more than everything else a connect() does together) and
/// a lookup that hits reads one line.
///
/// A socket's home position is its cookie modulo the table size: the
/// kernel hands out cookies in runs (per CPU), so sockets opened one after
/// another sit on neighbouring lines of the same pages, where hashed
/// positions cost a cache and TLB miss per access (measured: ~0.5 µs more
/// per steered connect). When its home is taken (a socket that lives
/// long, one table length of cookies earlier), it goes to the first free
/// one of [`SPILL_PROBES`] positions its hash picks, and its home counts
/// it (`displaced`), so a lookup that misses at home reads further only
/// when some socket of that home sits elsewhere. A position is claimed
/// with a compare-and-swap from 0 to [`RESERVED`], its record written,
/// and then the cookie published; it is freed by swapping the cookie back
/// to 0. Readers match whole cookies only, so they never see a record
/// being written. The table is full for a socket when its home and every
/// probe are taken: that socket is then neither accounted nor transparent
/// (counted in `sock_counters`). It has twice as many positions as the
/// sockets it is sized for, so that at that many the probes rarely all
/// find a socket.
pub mod sock_table {
    /// Positions probed after the home one, for a socket whose home is
    /// taken.
    pub const SPILL_PROBES: u32 = 15;
    /// The most positions the table may have (2^24: 1 GiB of slots).
    pub const MAX_POSITIONS: u32 = 1 << 24;
    /// The fewest.
    pub const MIN_POSITIONS: u32 = 64;
    /// A position claimed by a hook that is writing its record. No socket
    /// has this cookie (cookies count up from 1).
    pub const RESERVED: u64 = u64::MAX;

    /// Positions for room for `sockets` records: twice their count
    /// rounded up to a power of two, between [`MIN_POSITIONS`] and
    /// [`MAX_POSITIONS`].
    pub const fn positions_for(sockets: u32) -> u32 {
        let rounded = match sockets.checked_next_power_of_two() {
            Some(n) if n <= MAX_POSITIONS / 2 => n * 2,
            _ => return MAX_POSITIONS,
        };
        if rounded < MIN_POSITIONS {
            MIN_POSITIONS
        } else {
            rounded
        }
    }

    /// The sockets a table of `positions` is sized for (what status calls
    /// its capacity).
    pub const fn capacity_of(positions: u32) -> u32 {
        positions / 2
    }

    /// The socket's home position in a table of `mask + 1` positions.
    #[inline(always)]
    pub fn home(cookie: u64, mask: u32) -> u32 {
        cookie as u32 & mask
    }

    /// The hashed positions a socket whose home is taken probes, as a
    /// start and an odd stride (every probe lands elsewhere).
    #[inline(always)]
    pub fn spill_walk(cookie: u64) -> (u32, u32) {
        let h = cookie.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h >> 32) as u32, (h >> 8) as u32 | 1)
    }

    /// Spill probe `i` (from 1) of a walk, in a table of `mask + 1`
    /// positions.
    #[inline(always)]
    pub fn spill_position(walk: (u32, u32), i: u32, mask: u32) -> u32 {
        walk.0.wrapping_add(walk.1.wrapping_mul(i)) & mask
    }
}

/// What headway keeps for a client socket (see [`SockSlot`]). Two
/// concerns share the record so that a socket takes one; [`sock_flags`]
/// says which parts are set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketRecord {
    /// Steering: the address the client connected (or sent) to.
    pub asked: AddrKey,
    /// Steering: the pod it goes to instead.
    pub chosen: AddrKey,
    /// Accounting: the pod (its `pod_stats` slot).
    pub pod_id: u32,
    /// Accounting: the low 32 bits of [`PodCounters::generation`] of the
    /// pod's slot when the socket was marked.
    pub generation: u32,
    /// TCP: the low 32 bits of the kernel's `bytes_acked` /
    /// `bytes_received` of the socket when last counted: each packet adds
    /// what they grew by since (wrapping; a connection cannot deliver 2 GiB
    /// between two of its packets out), so every byte counts once,
    /// retransmitted or reordered.
    pub sent_seen: u32,
    pub received_seen: u32,
    /// Steering: the service whose name the client resolved `asked` from
    /// (an unconnected UDP socket checks `chosen` is still eligible in it
    /// before each datagram). Service ids are below [`MAX_SERVICES`].
    pub service_id: u16,
    /// [`sock_flags`] bits: written by the socket's own connect/sendmsg
    /// and sock_ops, which never run at once for a socket.
    pub flags: u8,
    /// 1 while the socket is counted in `active_tcp` (established, not yet
    /// closed): the close takes it back exactly once.
    pub active: u8,
}

/// A position of the socket table: one cache line (the table is created
/// mappable, so its values start on a page).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockSlot {
    /// The socket whose record this is; 0 when free,
    /// [`sock_table::RESERVED`] while a hook writes the record.
    pub cookie: u64,
    pub record: SocketRecord,
    /// Sockets whose home is this position that sit at a spill position
    /// (a property of the position, not of the socket in it: taking and
    /// freeing the slot leave it alone).
    pub displaced: u32,
}

/// The socket table as agents before it kept it (`sock_cookies` +
/// `sock_records` + `sock_spills`): an agent that finds those pinned lets
/// its programs adopt each record into [`SockSlot`]s when its socket is
/// next seen (`map_names::legacy`), so no live socket loses its record.
pub mod sock_table_v1 {
    use crate::AddrKey;

    /// Slots per bucket of `sock_cookies`: one 64-byte line of cookies.
    pub const BUCKET_SLOTS: u32 = 8;
    /// Consecutive cookies that share a home bucket (log2).
    const RUN_BITS: u32 = 2;
    /// Home buckets that share a count in `sock_spills`.
    pub const HOMES_PER_SPILL_COUNT: u32 = 4;

    /// A bucket of `sock_cookies`: cookies of the sockets whose records
    /// are in its slots (slot `i` of bucket `b` owns record `b * 8 + i`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SockBucket {
        pub cookies: [u64; BUCKET_SLOTS as usize],
    }

    /// A record of `sock_records`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SocketState {
        pub asked: AddrKey,
        pub chosen: AddrKey,
        pub service_id: u32,
        pub _pad: u32,
        /// All 64 bits of the pod slot's generation.
        pub generation: u64,
        pub pod_id: u32,
        /// 6 (TCP) or 17 (UDP).
        pub protocol: u8,
        pub active: u8,
        /// TCP: 1 once `sent_seen`/`received_seen` hold the counters.
        pub seen_known: u8,
        /// [`crate::sock_flags`] STEERED and ACCOUNTED (no UDP bit).
        pub flags: u8,
        pub sent_seen: u64,
        pub received_seen: u64,
    }

    /// The socket's home bucket, and the two it went to when that was
    /// full, in a table of `mask + 1` buckets.
    #[inline(always)]
    pub fn buckets(cookie: u64, mask: u32) -> (u32, [u32; 2]) {
        let home = (cookie >> RUN_BITS) as u32 & mask;
        let h = cookie.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let first = (h >> 40) as u32 & mask;
        let second = (h >> 16) as u32 & mask;
        (home, [first, second])
    }
}

/// The most services the agent can index: a socket's record keeps the id
/// in 16 bits.
pub const MAX_SERVICES: u32 = 1 << 16;

/// Indexes of `sock_counters`.
pub mod sock_counter {
    /// Records taken.
    pub const TAKEN: u32 = 0;
    /// Records given back (a socket closed, or stopped talking to a pod).
    pub const FREED: u32 = 1;
    /// A socket found its home and every probe taken: not accounted, and
    /// steered without transparency.
    pub const FULL: u32 = 2;

    pub const COUNT: u32 = 3;

    /// Name of each index, for status and metrics.
    pub const NAMES: [(u32, &str); 3] = [(TAKEN, "taken"), (FREED, "freed"), (FULL, "full")];
}

/// The address filter (`map_names::ADDR_FILTER`): a Bloom filter whose
/// two bits for an address lie in one 64-bit word, so a test is one array
/// read with no helper call (the fast path of every connect on the node;
/// a kernel Bloom filter map cost 3 hashes and a call, a hash map miss
/// more). The agent and the kernel share this function.
///
/// 8,192 words (64 KiB, 524,288 bits): about 1% false positives at 20,000
/// addresses, 5% at 65,536. A false positive only costs the full path's
/// lookups, never a wrong decision.
pub mod addr_filter {
    use crate::AddrKey;

    /// Words in the filter (a power of two).
    pub const WORDS: u32 = 1 << WORD_INDEX_BITS;
    const WORD_INDEX_BITS: u32 = 13;

    /// The word of the filter that holds `addr`, and its two bits there.
    #[inline(always)]
    pub fn bits(addr: &AddrKey) -> (u32, u64) {
        let [a, b, c, d] = addr.addr;
        // Two multiplicative mixes of the address's halves, folded; the
        // top bits pick the word, the low twelve the two bits.
        let high = ((u64::from(a) << 32) | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let low = ((u64::from(c) << 32) | u64::from(d)).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        let mut h = high ^ low.rotate_left(31);
        h ^= h >> 29;
        h = h.wrapping_mul(0x1656_67B1_9E37_79F9);
        h ^= h >> 32;
        let word = (h >> (64 - WORD_INDEX_BITS)) as u32;
        let mask = (1u64 << (h & 63)) | (1u64 << ((h >> 6) & 63));
        (word, mask)
    }
}

/// The layout of `map_names::ADDR_TABLE`: an open-addressed copy of
/// `dns_addrs` that the kernel reads with inline array loads (a hash map
/// lookup of a 16-byte key costs 30-100 ns here; the DNS interceptor makes
/// one per answer address of a response it has not seen, connect() one
/// per connection to a pod).
///
/// An address lives at one of the `PROBES` positions from
/// [`addr_table::home`], or nowhere (all taken: the kernel then asks
/// `dns_addrs`). The agent writes entries while the kernel reads them, so
/// a read can mix two versions of an entry: [`addr_table::check`] over
/// the entry's first cache line must equal its `check`, or the read is a
/// miss. The agent withdraws an address's entry before changing
/// `dns_addrs`, and puts the new one back after: an entry found is never
/// older than `dns_addrs`.
///
/// An entry is two cache lines. The first holds what the interceptor
/// needs (the pod, and each slot with its flags); the second the slots'
/// `since_ns`, which only connect() reads, under a check of its own that
/// also covers the first line's: a reader that takes both lines from one
/// version of the entry passes both checks.
pub mod addr_table {
    use crate::{ADDR_MAX_SERVICES, AddrKey, AddrTableEntry};

    /// Entries (a power of two, 16 MiB): the default capacity of
    /// `dns_addrs`; at 65,536 endpoint addresses half are taken.
    pub const SIZE: u32 = 1 << SIZE_BITS;
    const SIZE_BITS: u32 = 17;
    /// Positions an address may take: `home`, `home + 1`, ... (wrapping).
    pub const PROBES: u32 = 4;
    /// 64-bit words of an entry; the first `LINE_WORDS` are its first
    /// cache line.
    pub const WORDS: usize = 16;
    pub const LINE_WORDS: usize = 8;

    /// The first position of `addr`.
    #[inline(always)]
    pub fn home(addr: &AddrKey) -> u32 {
        let [a, b, c, d] = addr.addr;
        let high = ((u64::from(a) << 32) | u64::from(b)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        let low = ((u64::from(c) << 32) | u64::from(d)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut h = high ^ low.rotate_left(29);
        h ^= h >> 32;
        h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        (h >> (64 - SIZE_BITS)) as u32
    }

    /// Position `probe` (< `PROBES`) of an address whose home is `home`.
    #[inline(always)]
    pub fn position(home: u32, probe: u32) -> u32 {
        (home + probe) & (SIZE - 1)
    }

    /// Index of `check` among an entry's words (first line).
    pub const CHECK_WORD: usize = 2;
    /// Index of the first `since_ns` word (second line).
    pub const SINCE_WORD: usize = 8;
    /// Index of the second line's check word.
    pub const SINCE_CHECK_WORD: usize = SINCE_WORD + ADDR_MAX_SERVICES;

    /// The first two words of an entry: `addr` as it lies in memory.
    #[inline(always)]
    pub const fn addr_words(addr: &AddrKey) -> [u64; 2] {
        let [a, b, c, d] = addr.addr;
        [(b as u64) << 32 | a as u64, (d as u64) << 32 | c as u64]
    }

    /// The check of an entry's first line (the word at `CHECK_WORD` left
    /// out): never 0, which marks an empty entry. Each word goes through
    /// its own bijection and the results are summed, so two versions mixed
    /// in one read check alike with odds of about 2^-63; and the words are
    /// mixed independently of each other, which a CPU overlaps (a chain of
    /// multiplies costs each answer address its latency).
    #[inline(always)]
    pub fn check(words: &[u64; LINE_WORDS]) -> u64 {
        // The check word itself (index 2) takes no share.
        const M: [u64; 8] = crate::check_word::K;
        const K: [u64; LINE_WORDS] = [M[0], M[1], 0, M[2], M[3], M[4], M[5], M[6]];
        let mix = |i: usize| crate::check_word::mix(words[i], K[i]);
        let h = mix(0)
            .wrapping_add(mix(1))
            .wrapping_add(mix(3))
            .wrapping_add(mix(4))
            .wrapping_add(mix(5))
            .wrapping_add(mix(6))
            .wrapping_add(mix(7));
        crate::check_word::finish(h)
    }

    /// The check of the second line: its `since_ns` words and the first
    /// line's check (so the two lines are tied to one version). Never 0.
    #[inline(always)]
    pub fn since_check(line_check: u64, since: &[u64; ADDR_MAX_SERVICES]) -> u64 {
        const K: [u64; ADDR_MAX_SERVICES] = [
            0xA076_1D64_78BD_642F,
            0xE703_7ED1_A0B4_28DB,
            0x8EBC_6AF0_9C88_C6E3,
            0x5899_65CC_7537_4CC3,
        ];
        let mut h = line_check.wrapping_mul(0x1D8E_4E27_C47D_124F);
        h ^= h >> 31;
        for (word, k) in since.iter().zip(K) {
            h = h.wrapping_add(crate::check_word::mix(*word, k));
        }
        crate::check_word::finish(h)
    }

    /// An address's slot in a service, as one word of an entry: service
    /// id, slot and [`crate::addr_slot_flags`].
    #[inline(always)]
    pub const fn slot_word(service_id: u32, slot: u16, flags: u16) -> u64 {
        ((flags as u64) << 48) | ((slot as u64) << 32) | service_id as u64
    }

    /// The service id, slot and flags of an entry word.
    #[inline(always)]
    pub const fn slot_of_word(word: u64) -> (u32, u16, u16) {
        (word as u32, (word >> 32) as u16, (word >> 48) as u16)
    }

    impl AddrTableEntry {
        /// The entry that says what `dns_addrs` says of `addr`: its pod
        /// and its first `n` slots, with their `since_ns`.
        pub fn new(
            addr: AddrKey,
            pod_id: u32,
            n: u32,
            slots: [u64; ADDR_MAX_SERVICES],
            since_ns: [u64; ADDR_MAX_SERVICES],
        ) -> Self {
            let mut entry = AddrTableEntry {
                addr,
                check: 0,
                pod_id,
                n,
                slots,
                since_ns,
                since_check: 0,
                _reserved: [0; 3],
            };
            entry.check = check(&entry.line());
            entry.since_check = since_check(entry.check, &since_ns);
            entry
        }

        /// The first line as the kernel reads it: eight 64-bit words.
        pub fn line(&self) -> [u64; LINE_WORDS] {
            let [a0, a1] = addr_words(&self.addr);
            [
                a0,
                a1,
                self.check,
                (u64::from(self.n) << 32) | u64::from(self.pod_id),
                self.slots[0],
                self.slots[1],
                self.slots[2],
                self.slots[3],
            ]
        }

        /// The whole entry as 64-bit words, as it lies in memory.
        pub fn words(&self) -> [u64; WORDS] {
            let mut words = [0; WORDS];
            words[..LINE_WORDS].copy_from_slice(&self.line());
            words[SINCE_WORD..SINCE_CHECK_WORD].copy_from_slice(&self.since_ns);
            words[SINCE_CHECK_WORD] = self.since_check;
            words
        }
    }
}

/// Value of `map_names::ADDR_TABLE` (see [`addr_table`]). 128 bytes: two
/// cache lines, read by the kernel as 64-bit words
/// ([`AddrTableEntry::words`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrTableEntry {
    pub addr: AddrKey,
    /// [`addr_table::check`] of the first line's other fields; 0: the
    /// entry is empty.
    pub check: u64,
    /// As [`AddrIndex::pod_id`].
    pub pod_id: u32,
    /// Entries of `slots` in use.
    pub n: u32,
    /// [`addr_table::slot_word`] of each [`AddrSlot`] (without its
    /// `since_ns`).
    pub slots: [u64; ADDR_MAX_SERVICES],
    /// Each slot's [`AddrSlot::since_ns`].
    pub since_ns: [u64; ADDR_MAX_SERVICES],
    /// [`addr_table::since_check`] of `check` and `since_ns`.
    pub since_check: u64,
    pub _reserved: [u64; 3],
}

pub const NAMESPACE_LEN: usize = 64;
pub const SERVICE_NAME_LEN: usize = 64;
pub const POD_NAME_LEN: usize = 128;

/// An address as the socket hooks see it (see the crate docs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    pub addr: [u32; 4],
}

impl AddrKey {
    /// The second word of an IPv4-mapped address (`0000:ffff`) as it lies in
    /// memory on a little-endian machine (BPF is little-endian here).
    pub const V4_MAPPED_WORD: u32 = 0xffff_0000;

    /// `ip` in network byte order, as `bpf_sock_addr.user_ip4` holds it.
    #[inline(always)]
    pub const fn from_v4_be(ip: u32) -> Self {
        AddrKey {
            addr: [0, 0, Self::V4_MAPPED_WORD, ip],
        }
    }

    #[inline(always)]
    pub const fn from_v6_words(words: [u32; 4]) -> Self {
        AddrKey { addr: words }
    }

    /// From the 16 bytes of an address in network order.
    pub fn from_octets(o: [u8; 16]) -> Self {
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        AddrKey {
            addr: [w(0), w(4), w(8), w(12)],
        }
    }

    /// The 16 bytes of the address in network order.
    pub fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = self.addr[i].to_ne_bytes();
            out[i * 4] = b[0];
            out[i * 4 + 1] = b[1];
            out[i * 4 + 2] = b[2];
            out[i * 4 + 3] = b[3];
            i += 1;
        }
        out
    }
}

/// What the kernel needs to know about a pod address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodRef {
    /// Key of the pod's counters in `pod_stats`.
    pub pod_id: u32,
    pub _pad: u32,
}

/// Per-pod counters, a slot per pod id in an array. The kernel adds to them
/// atomically; the agent only zeroes a slot when it hands its id to a new
/// pod, so the counts survive agent restarts. 64 bytes: in the page-aligned
/// array each pod is one cache line, so a counted packet or connect reads
/// the generation and bumps its counter on the same line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCounters {
    /// Set by the agent (never zero) each time it hands the slot to a new
    /// pod. A socket remembers it, so a connection to a pod that is gone
    /// never touches the counters of the next pod given the same id.
    pub generation: u64,
    /// connect() calls on TCP sockets towards this pod.
    pub tcp_connects: u64,
    /// connect() calls on UDP sockets towards this pod.
    pub udp_connects: u64,
    /// Established TCP connections open right now.
    pub active_tcp: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Connections steered to this pod from another address.
    pub steered_in: u64,
    /// Connections steered away from this pod.
    pub steered_away: u64,
}

/// State bits of a pod as an endpoint of one service.
pub mod endpoint_flags {
    pub const READY: u32 = 1 << 0;
    pub const SERVING: u32 = 1 << 1;
    pub const TERMINATING: u32 = 1 << 2;
    pub const DRAINED: u32 = 1 << 3;
    /// The agent's verdict: a steered connection may go here (ready, or not
    /// terminating under publishNotReadyAddresses; not drained).
    pub const ELIGIBLE: u32 = 1 << 4;
}

/// Key of `svc_endpoints`: one pod address as an endpoint of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceEndpointKey {
    pub service_id: u32,
    pub _pad: u32,
    pub addr: AddrKey,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointState {
    pub pod_id: u32,
    /// [`endpoint_flags`] bits.
    pub flags: u32,
}

/// Steering policy of a service (`headway.dev/policy`).
pub mod policy {
    pub const OBSERVE: u32 = 0;
    pub const FAILOVER: u32 = 1;
    pub const RANDOM: u32 = 2;
    pub const LEAST_CONNECTIONS: u32 = 3;
    pub const WEIGHTED: u32 = 4;
}

/// How connect() draws slots of a choice table for a socket, without a
/// helper call: the socket's cookie (unique per socket since boot) through
/// splitmix64's finalizer, whose output bits are uniform and look
/// independent even for consecutive inputs. The two halves give two
/// independent draws (least-connections' two choices). A socket that
/// connects to a service twice draws the same slot.
pub mod draw {
    /// The 64 mixed bits for `cookie`.
    #[inline(always)]
    pub const fn mix(cookie: u64) -> u64 {
        let mut z = cookie;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform index below `n` from 32 bits of the draw (the low half
    /// when `first`, else the high half): multiply and shift, no division.
    #[inline(always)]
    pub const fn below(mixed: u64, n: u32, first: bool) -> u32 {
        let bits = if first {
            mixed as u32
        } else {
            (mixed >> 32) as u32
        };
        ((bits as u64 * n as u64) >> 32) as u32
    }
}

/// Topology preference of a service (`headway.dev/topology`).
pub mod topology {
    pub const NONE: u32 = 0;
    pub const PREFER_NODE: u32 = 1;
    pub const PREFER_ZONE: u32 = 2;
}

/// Bits of [`ServiceMeta::flags`].
pub mod service_flags {
    /// The service declares ports: only connections to one of them (a key
    /// in `svc_ports`) are steered.
    pub const PORTS_DECLARED: u32 = 1 << 0;
}

/// A headless service: what the connect hooks need to steer to it, and its
/// names for `status`. Names are NUL-padded UTF-8.
///
/// Its choice tables live in `svc_backends`, per family: slots
/// `0..backends` draw over every eligible pod (each pod once, or in
/// proportion to its weight under `weighted`); slots
/// `backends..backends + preferred` draw the same way over the eligible pods
/// the topology prefers (same node or zone). `preferred` is 0 when the
/// service has no topology preference or no eligible pod matches it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceMeta {
    pub namespace: [u8; NAMESPACE_LEN],
    pub name: [u8; SERVICE_NAME_LEN],
    /// [`policy`] value.
    pub policy: u32,
    /// [`topology`] value.
    pub topology: u32,
    /// Slots of the IPv4 / IPv6 table over all eligible pods.
    pub backends_v4: u32,
    pub backends_v6: u32,
    /// Slots of the IPv4 / IPv6 table over the preferred eligible pods.
    pub preferred_v4: u32,
    pub preferred_v6: u32,
    /// [`service_flags`] bits.
    pub flags: u32,
    pub _pad: u32,
}

/// How many declared ports [`ServiceSteering`] carries itself. A service
/// that declares more keeps them in `svc_ports` only.
pub const STEERING_PORTS: usize = 8;

/// A declared port as [`ServiceSteering::ports`] holds it: never 0 (the
/// protocol is not).
pub const fn port_word(port: u16, protocol: u8) -> u32 {
    port as u32 | (protocol as u32) << 16
}

/// How many slots of a service's IPv4 choice tables [`ServiceSteering`]
/// carries itself (the first ones: enough for a service of up to 7 pods,
/// or fewer with a topology preference). connect() reads further slots,
/// and IPv6 ones, from `svc_backends`.
pub const STEERING_BACKENDS: usize = 7;

/// What the connect hooks need of a service (value of
/// `map_names::SVC_STEERING`, indexed by service id): [`ServiceMeta`]'s
/// steering fields and the ports it declares (the first cache line), and
/// the first slots of its IPv4 choice tables (the second), in an array the
/// verifier reads inline instead of hash lookups (128 bytes, aligned: the
/// map is mappable, so its values start on a page). An id with no service
/// has `live` 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceSteering {
    pub policy: u32,
    pub topology: u32,
    pub backends_v4: u32,
    pub backends_v6: u32,
    pub preferred_v4: u32,
    pub preferred_v6: u32,
    /// [`service_flags`] bits.
    pub flags: u32,
    /// 1: a service has this id.
    pub live: u32,
    /// The declared ports ([`port_word`]), 0 after the last, when the
    /// service declares at most [`STEERING_PORTS`]; all 0 when it declares
    /// none or more (connect() then looks in `svc_ports`).
    pub ports: [u32; STEERING_PORTS],
    /// Slots `0..` of the IPv4 choice tables (as `svc_backends` has them
    /// under family 4), each as [`steering_backends::word`]; 0 past the
    /// last.
    pub backends: [u64; STEERING_BACKENDS],
    /// [`steering_backends::check`] of `backends` and the IPv4 table
    /// sizes. The entry is rewritten in place, so a reader may see it half
    /// written: one that finds the check wrong reads `svc_backends`.
    pub backends_check: u64,
}

impl ServiceSteering {
    /// The steering fields of `meta`, no ports inline.
    pub const fn of(meta: &ServiceMeta) -> ServiceSteering {
        ServiceSteering {
            policy: meta.policy,
            topology: meta.topology,
            backends_v4: meta.backends_v4,
            backends_v6: meta.backends_v6,
            preferred_v4: meta.preferred_v4,
            preferred_v6: meta.preferred_v6,
            flags: meta.flags,
            live: 1,
            ports: [0; STEERING_PORTS],
            backends: [0; STEERING_BACKENDS],
            backends_check: 0,
        }
    }

    /// `self` with the first slots of its IPv4 choice tables inline:
    /// `slots` yields slot 0, 1, ... of family 4 (as many as there are,
    /// up to [`STEERING_BACKENDS`]; an address that is not IPv4 ends the
    /// inline part). Call after the table sizes are set.
    pub fn with_backends(mut self, slots: impl IntoIterator<Item = Backend>) -> Self {
        let total = self.backends_v4.saturating_add(self.preferred_v4) as usize;
        let mut words = [0; STEERING_BACKENDS];
        for (word, backend) in words.iter_mut().zip(slots).take(total) {
            match steering_backends::word(&backend) {
                Some(w) => *word = w,
                None => break,
            }
        }
        self.backends = words;
        self.backends_check = steering_backends::check(self.backends_v4, self.preferred_v4, &words);
        self
    }

    /// `self` with the declared `ports` inline, if they fit.
    pub fn with_ports(mut self, ports: impl IntoIterator<Item = ServicePortKey>) -> Self {
        let mut inline = [0; STEERING_PORTS];
        for (n, key) in ports.into_iter().enumerate() {
            match inline.get_mut(n) {
                Some(word) => *word = port_word(key.port, key.protocol),
                None => {
                    self.ports = [0; STEERING_PORTS];
                    return self;
                }
            }
        }
        self.ports = inline;
        self
    }
}

/// The check words of entries the agent rewrites in place while the
/// kernel reads them (`addr_table`, [`steering_backends`]): each word goes
/// through its own bijection (a multiply by an odd constant, then an
/// xor-shift) and the results are summed, so a read that mixes two
/// versions checks alike with odds of about 2^-63.
pub mod check_word {
    /// The odd multipliers the checks (and the observation cache's index)
    /// use, one per word position: constants of well-known 64-bit hashes
    /// (golden ratio, xxHash, MurmurHash3's finalizer, wyhash).
    pub const K: [u64; 8] = [
        0x9E37_79B9_7F4A_7C15,
        0xC2B2_AE3D_27D4_EB4F,
        0x1656_67B1_9E37_79F9,
        0xD6E8_FEB8_6659_FD93,
        0xFF51_AFD7_ED55_8CCD,
        0xC4CE_B9FE_1A85_EC53,
        0x8CB9_2BA7_2F3D_8DD7,
        0xA076_1D64_78BD_642F,
    ];

    /// Word `word`'s share of a check, under the constant `k`.
    #[inline(always)]
    pub fn mix(word: u64, k: u64) -> u64 {
        let m = word.wrapping_mul(k);
        m ^ (m >> 29)
    }

    /// The check from the summed shares. Never 0 (0 marks an empty entry).
    #[inline(always)]
    pub fn finish(sum: u64) -> u64 {
        (sum ^ (sum >> 32)) | 1
    }
}

/// The IPv4 choice-table slots [`ServiceSteering`] carries inline.
pub mod steering_backends {
    use crate::{AddrKey, Backend, STEERING_BACKENDS};

    /// A slot as one word: the IPv4 address (network byte order) in the
    /// low half, the pod id in the high half. Never 0 for a pod (no pod has
    /// address 0.0.0.0); `None` for an address that is not IPv4.
    pub fn word(backend: &Backend) -> Option<u64> {
        let a = &backend.addr.addr;
        (a[0] == 0 && a[1] == 0 && a[2] == AddrKey::V4_MAPPED_WORD && a[3] != 0)
            .then(|| u64::from(a[3]) | u64::from(backend.pod_id) << 32)
    }

    /// The slot a word holds.
    #[inline(always)]
    pub fn backend(word: u64) -> Backend {
        Backend {
            addr: AddrKey::from_v4_be(word as u32),
            pod_id: (word >> 32) as u32,
            _pad: 0,
        }
    }

    const K: [u64; STEERING_BACKENDS + 1] = crate::check_word::K;

    /// Word `i`'s share of the check (`i == STEERING_BACKENDS`: the table
    /// sizes'), so a reader can sum it as it reads the words.
    #[inline(always)]
    pub fn mix(i: usize, word: u64) -> u64 {
        crate::check_word::mix(word, K[i])
    }

    /// The first share of the check: the IPv4 table sizes.
    #[inline(always)]
    pub fn sizes_mix(backends_v4: u32, preferred_v4: u32) -> u64 {
        mix(
            STEERING_BACKENDS,
            u64::from(backends_v4) | u64::from(preferred_v4) << 32,
        )
    }

    /// The check of `words` with the table sizes they were written for:
    /// a reader that took the sizes from one version of the entry and the
    /// words from another fails it.
    pub fn check(backends_v4: u32, preferred_v4: u32, words: &[u64; STEERING_BACKENDS]) -> u64 {
        let mut sum = sizes_mix(backends_v4, preferred_v4);
        for (i, w) in words.iter().enumerate() {
            sum = sum.wrapping_add(mix(i, *w));
        }
        crate::check_word::finish(sum)
    }
}

/// Key of `svc_ports`: a port a service declares.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortKey {
    pub service_id: u32,
    /// Host byte order.
    pub port: u16,
    /// IPPROTO_TCP (6) or IPPROTO_UDP (17).
    pub protocol: u8,
    pub _pad: u8,
}

/// A slot of a choice table: the pod to steer to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    pub addr: AddrKey,
    /// Its counters' key in `pod_stats` (least-connections reads them).
    pub pod_id: u32,
    pub _pad: u32,
}

/// Per-service counters, a slot per service id (zeroed when an id goes to
/// a new service). The kernel adds to them atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Connect decisions about addresses resolved through this service's
    /// names, indexed like [`steer_counter`].
    pub decisions: [u64; steer_counter::COUNT as usize],
    /// Answered lookups of the service-wide name.
    pub lookups_service: u64,
    /// Answered lookups of its pods' own names.
    pub lookups_pod: u64,
}

/// Bits of [`SocketRecord::flags`].
pub mod sock_flags {
    /// `asked`/`chosen`/`service_id` hold a steering.
    pub const STEERED: u8 = 1 << 0;
    /// `pod_id`/`generation` name the pod the socket talks to.
    pub const ACCOUNTED: u8 = 1 << 1;
    /// The socket is UDP (else TCP).
    pub const UDP: u8 = 1 << 2;
}

/// Key of `svc_backends`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service_id: u32,
    /// 4 or 6.
    pub family: u32,
    pub slot: u32,
}

/// What the agent tells the kernel programs (`config[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Netns cookie of the host network namespace: its sockets are not
    /// steered unless [`config_flags::STEER_HOST_NETNS`] is set.
    pub host_netns_cookie: u64,
    /// [`config_flags`] bits.
    pub flags: u32,
    pub _pad: u32,
}

pub mod config_flags {
    pub const STEER_HOST_NETNS: u32 = 1 << 0;
}

/// Indexes of `steer_counters`: what the connect hooks decided.
pub mod steer_counter {
    /// Steered: the address is gone from the service it was resolved for.
    pub const STEERED_GONE: u32 = 0;
    /// Steered: the address now belongs to another service's pod.
    pub const STEERED_REUSED: u32 = 1;
    /// Steered: the pod is still there but not eligible.
    pub const STEERED_NOT_ELIGIBLE: u32 = 2;
    /// Would steer, but no eligible pod: left as the client asked.
    pub const NO_ELIGIBLE_POD: u32 = 3;
    /// Resolved through a pod-specific name: never steered.
    pub const KEPT_POD_NAME: u32 = 4;
    /// From the host network namespace: not steered.
    pub const KEPT_HOST_NETNS: u32 = 5;
    /// The service's policy is `observe`.
    pub const KEPT_OBSERVE: u32 = 6;
    /// Known pod address, but this client never resolved it.
    pub const KEPT_NO_DNS: u32 = 7;
    /// `failover`: the address is still eligible, so it stays.
    pub const KEPT_ELIGIBLE: u32 = 8;
    /// `random`/`least-connections`/`weighted` chose another pod.
    pub const STEERED_BALANCED: u32 = 9;
    /// `random`/`least-connections`/`weighted` chose the pod asked for.
    pub const KEPT_BALANCED: u32 = 10;
    /// The service declares ports and this is not one of them.
    pub const KEPT_PORT: u32 = 11;

    pub const COUNT: u32 = 12;

    /// Name of each index, for status and metrics.
    pub const NAMES: [(u32, &str); 12] = [
        (STEERED_GONE, "steered_gone"),
        (STEERED_REUSED, "steered_reused"),
        (STEERED_NOT_ELIGIBLE, "steered_not_eligible"),
        (NO_ELIGIBLE_POD, "no_eligible_pod"),
        (KEPT_POD_NAME, "kept_pod_name"),
        (KEPT_HOST_NETNS, "kept_host_netns"),
        (KEPT_OBSERVE, "kept_observe"),
        (KEPT_NO_DNS, "kept_no_dns"),
        (KEPT_ELIGIBLE, "kept_eligible"),
        (STEERED_BALANCED, "steered_balanced"),
        (KEPT_BALANCED, "kept_balanced"),
        (KEPT_PORT, "kept_port"),
    ];
}

/// A pod as `status` shows it. Names are NUL-padded UTF-8 (truncated when
/// longer than the field). Its addresses are the keys of `pod_addrs` that
/// point at it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: [u8; NAMESPACE_LEN],
    pub name: [u8; POD_NAME_LEN],
}

/// Kind of DNS name (`NameEntry::kind`, `Observation::kind`).
pub mod name_kind {
    /// `<svc>.<ns>.svc.<domain>`: the service's policy may steer.
    pub const SERVICE: u32 = 1;
    /// `<hostname>.<svc>.<ns>.svc.<domain>` or the dashed-IP form: never
    /// steered.
    pub const POD: u32 = 2;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NameEntry {
    pub service_id: u32,
    /// [`name_kind`] value.
    pub kind: u32,
}

/// A DNS query in flight, as the client's socket sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PendingQueryKey {
    /// `bpf_get_netns_cookie` of the client's network namespace.
    pub netns_cookie: u64,
    /// The DNS server's address.
    pub server: AddrKey,
    /// Client UDP port, network byte order.
    pub client_port: u16,
    /// Query ID, network byte order (as on the wire).
    pub query_id: u16,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingQuery {
    /// [`dns_name_hash`] of the question name.
    pub name_hash: u64,
    /// QTYPE of the question (1 = A, 28 = AAAA), host byte order.
    pub qtype: u32,
    pub _pad: u32,
}

/// Address slots in one [`ObservationPage`]. Slot `s` of a service and
/// family lives in page `s / OBS_PAGE_SLOTS`.
pub const OBS_PAGE_SLOTS: usize = 64;
/// Pages per service and family: at most this many writes per response,
/// and the most slots the agent hands out per service and family.
pub const OBS_MAX_PAGES: usize = 4;
/// Headless services one address keeps a slot in at once.
pub const ADDR_MAX_SERVICES: usize = 4;
/// Most addresses one response teaches (`MAX_ANSWERS` in the parser).
pub const RESPONSE_MAX_ADDRS: usize = 32;
/// An address with no pod (gone), or an answer address that is none.
pub const NO_POD: u32 = u32::MAX;
/// An answer address with no slot in the service that handed it out.
pub const NO_SLOT: u32 = u32::MAX;

/// Key of `dns_obs`: a client network namespace's view of one page of a
/// service's address slots, for one family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObservationKey {
    pub netns_cookie: u64,
    pub service_id: u32,
    /// 4 or 6.
    pub family: u16,
    pub page: u16,
}

/// What a client netns learned about the addresses of one page: per slot,
/// an [`obs_stamp`] (0: nothing). A stamp counts for the address holding
/// the slot only if it is not older than [`AddrSlot::since_ns`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObservationPage {
    pub stamps: [u64; OBS_PAGE_SLOTS],
}

impl Default for ObservationPage {
    fn default() -> Self {
        ObservationPage {
            stamps: [0; OBS_PAGE_SLOTS],
        }
    }
}

/// A stamp: `bpf_ktime_get_ns` with its two low bits replaced by the
/// [`name_kind`] that handed the address out, so one aligned u64 store
/// says both (a reader never sees the time of one and the kind of another).
#[inline(always)]
pub const fn obs_stamp(now_ns: u64, kind: u32) -> u64 {
    (now_ns & !3) | (kind as u64 & 3)
}

/// The time part of a stamp.
#[inline(always)]
pub const fn obs_time(stamp: u64) -> u64 {
    stamp & !3
}

/// The [`name_kind`] part of a stamp.
#[inline(always)]
pub const fn obs_kind(stamp: u64) -> u32 {
    (stamp & 3) as u32
}

/// One entry of the observation cache (`obs_cache`): the newest stamp the
/// DNS interceptor wrote for one slot of one service and family in one
/// client network namespace, and a check over the three.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObservationCacheEntry {
    pub netns_cookie: u64,
    /// [`obs_cache::tag`] of the service, family and slot.
    pub tag: u64,
    /// An [`obs_stamp`], as stamped into the slot's `dns_obs` page.
    pub stamp: u64,
    /// [`obs_cache::check`] of the three words above; 0: empty.
    pub check: u64,
}

/// A direct-mapped cache in front of `dns_obs` (kernel-only, not pinned).
///
/// `dns_obs` is an LRU hash: its lookup hashes a 16-byte key and touches a
/// bucket, an element and the page's stamp, three cold cache lines that
/// made up about a third of a steered connect(). The interceptor writes
/// every stamp it puts in a page to this array too, at an index hashed from
/// the same key; connect() reads that one 32-byte entry first and goes to
/// `dns_obs` only when the entry is about something else (a collision) or
/// its check fails (caught mid-write). An entry only ever holds a stamp
/// the interceptor wrote, and the newest one for its key, so a hit says
/// what `dns_obs` would say, or what it said before LRU pressure evicted
/// the page.
pub mod obs_cache {
    use crate::check_word::{K, finish, mix};

    /// The map's name (not pinned: tests find it through the programs).
    pub const MAP_NAME: &str = "dns_obs_cache";
    /// Entries: 2 MiB of 32-byte entries, two per cache line.
    pub const ENTRIES: u32 = 1 << 16;

    const K_COOKIE: u64 = K[0];
    const K_TAG: u64 = K[1];
    const K_STAMP: u64 = K[2];

    /// Service, family (4 or 6) and slot in one word.
    #[inline(always)]
    pub fn tag(service_id: u32, family: u16, slot: u16) -> u64 {
        u64::from(service_id) | u64::from(family) << 32 | u64::from(slot) << 48
    }

    /// The entry a key lives in: every bit of the key stirred into the low
    /// bits (MurmurHash3's 64-bit finalizer, whose multipliers are `K[4]`
    /// and `K[5]`). Cookies, service ids and
    /// slots are small counters, and the slot sits in the tag's top bits.
    #[inline(always)]
    pub fn index(netns_cookie: u64, tag: u64) -> u32 {
        let mut h = netns_cookie.wrapping_mul(K_COOKIE) ^ tag;
        h ^= h >> 33;
        h = h.wrapping_mul(K[4]);
        h ^= h >> 33;
        h = h.wrapping_mul(K[5]);
        h ^= h >> 33;
        (h as u32) & (ENTRIES - 1)
    }

    /// The check an entry holding `stamp` for the key carries: a reader
    /// that sees words of two writes (two CPUs, or a write in progress)
    /// finds it does not hold. Never 0.
    #[inline(always)]
    pub fn check(netns_cookie: u64, tag: u64, stamp: u64) -> u64 {
        finish(
            mix(netns_cookie, K_COOKIE)
                .wrapping_add(mix(tag, K_TAG))
                .wrapping_add(mix(stamp, K_STAMP)),
        )
    }
}

/// An address's slot in one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrSlot {
    pub service_id: u32,
    /// Index among the service's slots for the address's family.
    pub slot: u16,
    /// [`addr_slot_flags`] bits: what the address is to the service now.
    pub flags: u16,
    /// CLOCK_MONOTONIC (= `bpf_ktime_get_ns`) when the agent gave the slot
    /// to this address: older stamps in it were about a previous holder.
    pub since_ns: u64,
}

/// Bits of [`AddrSlot::flags`]: the address as an endpoint of the
/// slot's service, so connect() need not look it up in `svc_endpoints`.
pub mod addr_slot_flags {
    /// The bits below are set (an older agent wrote none: the kernel then
    /// reads `svc_endpoints`).
    pub const KNOWN: u16 = 1 << 0;
    /// An endpoint of the service now (`svc_endpoints` has it).
    pub const MEMBER: u16 = 1 << 1;
    /// And eligible ([`crate::endpoint_flags::ELIGIBLE`]).
    pub const ELIGIBLE: u16 = 1 << 2;
}

/// Value of `dns_addrs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrIndex {
    /// The pod that has the address now, or [`NO_POD`].
    pub pod_id: u32,
    /// Entries of `slots` in use.
    pub n: u32,
    pub slots: [AddrSlot; ADDR_MAX_SERVICES],
}

/// What a client network namespace learned about an address (what the
/// connect hooks ask `dns::observation`): the newest stamp among the
/// services the address has a slot in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// The service whose name handed the address out.
    pub service_id: u32,
    /// [`name_kind`] value.
    pub kind: u32,
    /// `bpf_ktime_get_ns` of the last answer that handed it out.
    pub learned_ns: u64,
}

/// Indexes of `dns_counters`.
pub mod dns_counter {
    /// Responses from port 53 looked at.
    pub const RESPONSES: u32 = 0;
    /// Responses that matched no query this socket sent (spoofed, late).
    pub const UNSOLICITED: u32 = 1;
    /// Answers about names that are not of a headless service.
    pub const NAME_UNKNOWN: u32 = 2;
    /// Addresses learned (or refreshed).
    pub const ADDRS_LEARNED: u32 = 3;
    /// Responses with the TC bit, or cut short of what they claim.
    pub const ERR_TRUNCATED: u32 = 4;
    /// Compression pointer loops or pointers out of the packet.
    pub const ERR_BAD_POINTER: u32 = 5;
    /// A label longer than 63 bytes, or a name over 255 bytes.
    pub const ERR_BAD_LABEL: u32 = 6;
    /// Header flags or counts that make no sense (not a response, QDCOUNT
    /// != 1, more answers than the parser walks).
    pub const ERR_BAD_HEADER: u32 = 7;
    /// The question differs from the one the query asked.
    pub const ERR_QUESTION_MISMATCH: u32 = 8;
    /// Queries recorded on egress.
    pub const QUERIES: u32 = 9;
    /// An observation could not be written (a map error, or more pages
    /// than one response may touch).
    pub const ERR_MAP_FULL: u32 = 10;
    /// Answered lookups of a service-wide name.
    pub const LOOKUPS_SERVICE: u32 = 11;
    /// Answered lookups of a pod-specific name.
    pub const LOOKUPS_POD: u32 = 12;

    pub const COUNT: u32 = 16;

    /// Name of each index in use, for status and metrics.
    pub const NAMES: [(u32, &str); 13] = [
        (RESPONSES, "responses"),
        (UNSOLICITED, "unsolicited"),
        (NAME_UNKNOWN, "name_unknown"),
        (ADDRS_LEARNED, "addrs_learned"),
        (ERR_TRUNCATED, "truncated"),
        (ERR_BAD_POINTER, "bad_pointer"),
        (ERR_BAD_LABEL, "bad_label"),
        (ERR_BAD_HEADER, "bad_header"),
        (ERR_QUESTION_MISMATCH, "question_mismatch"),
        (QUERIES, "queries"),
        (ERR_MAP_FULL, "map_full"),
        (LOOKUPS_SERVICE, "lookups_service"),
        (LOOKUPS_POD, "lookups_pod"),
    ];
}

/// FNV-1a 64 of a DNS name in wire form (each label's length byte, then
/// its bytes with ASCII A-Z folded to a-z; no root byte), computed one
/// byte at a time so the kernel parser and the agent agree exactly.
pub const DNS_HASH_INIT: u64 = 0xcbf2_9ce4_8422_2325;

#[inline(always)]
pub const fn dns_hash_byte(hash: u64, byte: u8) -> u64 {
    let folded = if byte >= b'A' && byte <= b'Z' {
        byte + 32
    } else {
        byte
    };
    (hash ^ folded as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

/// [`dns_hash_byte`] over a dotted name (`web.demo.svc.cluster.local`,
/// trailing dot optional). `None` for an empty label or one over 63 bytes.
pub fn dns_name_hash(name: &str) -> Option<u64> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut hash = DNS_HASH_INIT;
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        hash = dns_hash_byte(hash, label.len() as u8);
        for b in label.bytes() {
            hash = dns_hash_byte(hash, b);
        }
    }
    Some(hash)
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are #[repr(C)], Copy, made of integers only and
    // have no implicit padding, so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::PodRef {}
    unsafe impl aya::Pod for super::PodCounters {}
    unsafe impl aya::Pod for super::ServiceEndpointKey {}
    unsafe impl aya::Pod for super::EndpointState {}
    unsafe impl aya::Pod for super::ServiceMeta {}
    unsafe impl aya::Pod for super::ServiceSteering {}
    unsafe impl aya::Pod for super::PodMeta {}
    unsafe impl aya::Pod for super::NameEntry {}
    unsafe impl aya::Pod for super::PendingQueryKey {}
    unsafe impl aya::Pod for super::PendingQuery {}
    unsafe impl aya::Pod for super::ObservationKey {}
    unsafe impl aya::Pod for super::Observation {}
    unsafe impl aya::Pod for super::ObservationPage {}
    unsafe impl aya::Pod for super::ObservationCacheEntry {}
    unsafe impl aya::Pod for super::AddrSlot {}
    unsafe impl aya::Pod for super::AddrIndex {}
    unsafe impl aya::Pod for super::AddrTableEntry {}
    unsafe impl aya::Pod for super::BackendKey {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::ServiceCounters {}
    unsafe impl aya::Pod for super::ServicePortKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::SocketRecord {}
    unsafe impl aya::Pod for super::sock_table_v1::SocketState {}
    unsafe impl aya::Pod for super::sock_table_v1::SockBucket {}
    unsafe impl aya::Pod for super::SockSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Consecutive cookies (as a client's sockets get them) spread evenly,
    /// and the two halves are independent: every pair of (first, second)
    /// indices is about equally common.
    #[test]
    fn draws_from_consecutive_cookies_are_uniform_and_independent() {
        const N: u32 = 7;
        const DRAWS: u64 = 700_000;
        let mut singles = [0u64; N as usize];
        let mut pairs = [[0u64; N as usize]; N as usize];
        for cookie in 4096..4096 + DRAWS {
            let mixed = draw::mix(cookie);
            let (a, b) = (draw::below(mixed, N, true), draw::below(mixed, N, false));
            assert!(a < N && b < N);
            singles[a as usize] += 1;
            pairs[a as usize][b as usize] += 1;
        }
        let mean = DRAWS as f64 / f64::from(N);
        for count in singles {
            assert!((count as f64 - mean).abs() < mean * 0.01, "{singles:?}");
        }
        let pair_mean = mean / f64::from(N);
        for row in pairs {
            for count in row {
                assert!(
                    (count as f64 - pair_mean).abs() < pair_mean * 0.05,
                    "{pairs:?}"
                );
            }
        }
        assert_eq!(draw::below(u64::MAX, 1, true), 0);
        assert_eq!(draw::below(u64::MAX, 5, false), 4);
    }

    #[test]
    fn v4_mapped_key_matches_octets() {
        let ip = u32::from_ne_bytes([10, 1, 2, 3]);
        let key = AddrKey::from_v4_be(ip);
        let mut want = [0u8; 16];
        want[10] = 0xff;
        want[11] = 0xff;
        want[12..].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(key.octets(), want);
        assert_eq!(AddrKey::from_octets(want), key);
    }

    /// Up to [`STEERING_PORTS`] declared ports go inline, in order; more
    /// leave none inline (connect() then reads `svc_ports`).
    #[test]
    fn declared_ports_go_inline_when_they_fit() {
        let port = |port, protocol| ServicePortKey {
            service_id: 3,
            port,
            protocol,
            _pad: 0,
        };
        let service = ServiceSteering {
            flags: service_flags::PORTS_DECLARED,
            live: 1,
            ..ServiceSteering::default()
        };
        let two = service.with_ports([port(53, 17), port(8080, 6)]);
        assert_eq!(two.ports[..3], [53 | 17 << 16, 8080 | 6 << 16, 0]);
        let eight = (1..=8).map(|p| port(p, 6));
        assert_eq!(service.with_ports(eight).ports[7], 8 | 6 << 16);
        let nine = (1..=9).map(|p| port(p, 6));
        let too_many = two.with_ports(nine);
        assert_eq!(too_many.ports, [0; STEERING_PORTS]);
        assert_eq!(too_many.flags, service_flags::PORTS_DECLARED);
    }

    /// The first IPv4 slots go inline with a check over them and the
    /// table sizes; a mix of two versions fails the check.
    #[test]
    fn first_ipv4_slots_go_inline_with_a_check() {
        let backend = |last: u8, pod_id| Backend {
            addr: AddrKey::from_v4_be(u32::from_be_bytes([10, 0, 0, last]).to_be()),
            pod_id,
            _pad: 0,
        };
        let service = ServiceSteering {
            backends_v4: 2,
            preferred_v4: 1,
            live: 1,
            ..ServiceSteering::default()
        };
        let three =
            service.with_backends([backend(1, 7), backend(2, 8), backend(1, 7), backend(9, 9)]);
        assert_eq!(steering_backends::backend(three.backends[1]), backend(2, 8));
        assert_eq!(three.backends[3], 0, "past the tables: empty");
        assert_eq!(
            three.backends_check,
            steering_backends::check(2, 1, &three.backends)
        );
        assert_ne!(
            three.backends_check,
            steering_backends::check(3, 1, &three.backends)
        );
        let other = service.with_backends([backend(2, 8), backend(1, 7), backend(1, 7)]);
        let mut mixed = three.backends;
        mixed[0] = other.backends[0];
        assert_ne!(three.backends_check, steering_backends::check(2, 1, &mixed));
        // An IPv6 address ends the inline part.
        let v6 = Backend {
            addr: AddrKey { addr: [1, 2, 3, 4] },
            pod_id: 1,
            _pad: 0,
        };
        let cut = service.with_backends([backend(1, 7), v6, backend(1, 7)]);
        assert_eq!(cut.backends[..2], [three.backends[0], 0]);
        // More slots than fit: the first seven.
        let big = ServiceSteering {
            backends_v4: 10,
            ..service
        }
        .with_backends((1..=10).map(|i| backend(i, u32::from(i))));
        assert_eq!(steering_backends::backend(big.backends[6]), backend(7, 7));
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<AddrKey>(), 16);
        assert_eq!(size_of::<PodRef>(), 8);
        assert_eq!(size_of::<PodCounters>(), 64);
        assert_eq!(size_of::<SocketRecord>(), 52);
        assert_eq!(size_of::<SockSlot>(), 64);
        assert_eq!(size_of::<sock_table_v1::SocketState>(), 72);
        assert_eq!(size_of::<sock_table_v1::SockBucket>(), 64);
        assert_eq!(size_of::<ServiceEndpointKey>(), 24);
        assert_eq!(size_of::<EndpointState>(), 8);
        assert_eq!(size_of::<ServiceMeta>(), 64 + 64 + 32);
        assert_eq!(size_of::<ServicePortKey>(), 8);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<ServiceSteering>(), 128);
        assert_eq!(size_of::<BackendKey>(), 12);
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(size_of::<ServiceCounters>(), 12 * 8 + 16);
        assert_eq!(size_of::<PodMeta>(), 64 + 128);
        assert_eq!(size_of::<NameEntry>(), 8);
        assert_eq!(size_of::<PendingQueryKey>(), 8 + 16 + 8);
        assert_eq!(size_of::<PendingQuery>(), 16);
        assert_eq!(size_of::<ObservationKey>(), 16);
        assert_eq!(size_of::<ObservationPage>(), 8 * OBS_PAGE_SLOTS);
        assert_eq!(size_of::<AddrSlot>(), 16);
        assert_eq!(size_of::<AddrIndex>(), 8 + 16 * ADDR_MAX_SERVICES);
        assert_eq!(size_of::<AddrTableEntry>(), 128);
        assert_eq!(size_of::<Observation>(), 16);
        assert_eq!(size_of::<ObservationCacheEntry>(), 32);
    }

    #[test]
    fn observation_cache_keys_spread_and_checks_tell_writes_apart() {
        // Sequential netns cookies (as the kernel hands them out), a few
        // services, a StatefulSet's worth of slots each: 51,200 keys.
        let mut used = [0u64; (obs_cache::ENTRIES / 64) as usize];
        let mut keys = 0u32;
        for cookie in 4096..5120u64 {
            for service_id in 1..=5u32 {
                for slot in 0..10u16 {
                    let tag = obs_cache::tag(service_id, 4, slot);
                    let i = obs_cache::index(cookie, tag) as usize;
                    used[i / 64] |= 1 << (i % 64);
                    keys += 1;
                }
            }
        }
        // Thrown at random into 65,536 entries, 51,200 keys fill
        // 65,536 * (1 - e^(-51200/65536)) ~ 35,500 of them.
        let filled: u32 = used.iter().map(|w| w.count_ones()).sum();
        assert!(filled > 35_000, "{filled} entries for {keys} keys");

        let (cookie, tag, stamp) = (4097, obs_cache::tag(3, 4, 7), obs_stamp(123_456_789, 1));
        let check = obs_cache::check(cookie, tag, stamp);
        assert_ne!(check, 0);
        for (c, t, s) in [
            (cookie + 1, tag, stamp),
            (cookie, obs_cache::tag(3, 4, 8), stamp),
            (cookie, obs_cache::tag(3, 6, 7), stamp),
            (cookie, obs_cache::tag(4, 4, 7), stamp),
            (cookie, tag, obs_stamp(123_456_789, 2)),
            (cookie, tag, stamp + 4),
        ] {
            assert_ne!(obs_cache::check(c, t, s), check, "{c} {t:#x} {s}");
        }
        assert_ne!(obs_cache::check(0, 0, 0), 0, "an empty entry never checks");
    }

    #[test]
    fn socket_cookies_rarely_find_the_table_full() {
        // As the kernel places them: home while free, then the probes.
        let positions = sock_table::positions_for(capacity::SOCKETS);
        let mask = positions - 1;
        let mut taken = [false; sock_table::positions_for(capacity::SOCKETS) as usize];
        let mut place = |cookie: u64| -> bool {
            let home = sock_table::home(cookie, mask);
            if !taken[home as usize] {
                taken[home as usize] = true;
                return true;
            }
            let walk = sock_table::spill_walk(cookie);
            for i in 1..=sock_table::SPILL_PROBES {
                let p = sock_table::spill_position(walk, i, mask);
                if !taken[p as usize] {
                    taken[p as usize] = true;
                    return true;
                }
            }
            false
        };
        // As many sockets as the table is sized for: half held by
        // long-lived sockets opened at random moments (cookies far apart),
        // then half in one run of consecutive cookies (as one CPU hands
        // them out) that wraps around the table onto them.
        let mut full = 0;
        for i in 0..u64::from(capacity::SOCKETS / 2) {
            full += u32::from(!place(i.wrapping_mul(0x5851_F42D_4C95_7F2D) >> 20));
        }
        for cookie in 1u64 << 50..(1u64 << 50) + u64::from(capacity::SOCKETS / 2) {
            full += u32::from(!place(cookie));
        }
        // At the capacity, a few in 10,000 fail open (18 here).
        assert!(
            full * 2_000 < capacity::SOCKETS,
            "{full} sockets found no position"
        );
        // Consecutive cookies take neighbouring positions.
        assert_eq!(sock_table::home(81, mask), sock_table::home(80, mask) + 1);
        // Every probe of a walk lands elsewhere.
        let walk = sock_table::spill_walk(12345);
        let mut probes = [0u32; sock_table::SPILL_PROBES as usize];
        for (i, p) in (1..).zip(probes.iter_mut()) {
            *p = sock_table::spill_position(walk, i, mask);
        }
        probes.sort_unstable();
        assert!(probes.windows(2).all(|w| w[0] != w[1]), "{probes:?}");
        assert_eq!(sock_table::positions_for(65_536), 131_072);
        assert_eq!(sock_table::positions_for(65_537), 262_144);
        assert_eq!(sock_table::positions_for(1), sock_table::MIN_POSITIONS);
        assert_eq!(
            sock_table::positions_for(u32::MAX),
            sock_table::MAX_POSITIONS
        );
        assert_eq!(
            sock_table::capacity_of(sock_table::positions_for(1000)),
            1024
        );
    }

    #[test]
    fn name_hash_folds_case_and_ignores_the_trailing_dot() {
        let a = dns_name_hash("Web.Demo.svc.cluster.local.").unwrap();
        let b = dns_name_hash("web.demo.svc.cluster.local").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, dns_name_hash("web.demo.svc.cluster.locak").unwrap());
        // Label boundaries count: "ab.c" is not "a.bc".
        assert_ne!(dns_name_hash("ab.c"), dns_name_hash("a.bc"));
        assert_eq!(dns_name_hash("a..b"), None);
        assert_eq!(dns_name_hash(&"x".repeat(64)), None);
    }
}
