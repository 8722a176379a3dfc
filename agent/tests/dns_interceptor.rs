//! The DNS interceptor's kernel programs on the real kernel: the object is
//! loaded (not attached: nothing here touches a cgroup or sends a packet)
//! and `hw_skb_egress` / `hw_skb_ingress` are driven with
//! BPF_PROG_TEST_RUN on hand-made Ethernet frames. The maps are then read
//! back: what was learned (`dns_obs`, read through the address slots of
//! `dns_addrs` the way connect() reads it), what is pending (`dns_pending`),
//! what was counted (`dns_counters`, `pod_stats`).
//!
//! Privileged (root). Run one at a time:
//! `cargo xtask build-ebpf --release && cargo test -p headway --test dns_interceptor -- --test-threads=1`
//!
//! Addresses in the frames (10.77.x, fd77::) are bytes handed to the
//! program in memory; BPF_PROG_TEST_RUN sends nothing anywhere.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{CgroupSkb, TestRun, TestRunOptions},
};
use headway_common::{
    AddrIndex, AddrKey, AddrSlot, AddrTableEntry, NO_POD, NameEntry, OBS_PAGE_SLOTS, Observation,
    ObservationCacheEntry, ObservationKey, ObservationPage, PendingQuery, PendingQueryKey, PodRef,
    addr_slot_flags, addr_table, dns_counter, dns_name_hash, map_names, name_kind, obs_cache,
    program_names,
};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};

const SERVICE_NAME: &str = "web.demo.svc.cluster.local";
const POD_NAME: &str = "web-0.web.demo.svc.cluster.local";
const SERVICE_ID: u32 = 7;
const CLIENT_PORT: u16 = 40_000;
const QUERY_ID: u16 = 0x4242;
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 53);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x53);
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

// ---------------------------------------------------------------------------
// The programs and their maps

/// The kernel object loaded fresh (new, empty maps) with the two DNS
/// programs verified and ready for test runs.
struct Interceptor {
    ebpf: Ebpf,
    /// The test removed `dns_obs` pages: the cache may hold stamps whose
    /// page is gone.
    evicted: bool,
}

impl Interceptor {
    fn load() -> Interceptor {
        let object = headway::datapath::kernel_object();
        assert!(
            !object.is_empty(),
            "kernel object not built: run `cargo xtask build-ebpf --release` first"
        );
        let mut ebpf = EbpfLoader::new()
            .load(object)
            .unwrap_or_else(|e| panic!("loading the kernel object: {e:?}"));
        for name in [program_names::SKB_EGRESS, program_names::SKB_INGRESS] {
            let program: &mut CgroupSkb = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("{name} is not in the object"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name} is not a cgroup_skb program: {e}"));
            program
                .load()
                .unwrap_or_else(|e| panic!("the verifier rejected {name}: {e:?}"));
        }
        Interceptor {
            ebpf,
            evicted: false,
        }
    }

    fn program(&self, name: &str) -> &CgroupSkb {
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .unwrap_or_else(|| panic!("{name} not loaded"))
    }

    /// Runs `program` once on `frame` and checks it let the packet pass.
    fn run(&self, name: &str, frame: &[u8]) {
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        };
        let result = self
            .program(name)
            .test_run(opts)
            .unwrap_or_else(|e| panic!("test run of {name}: {e:?}"));
        assert_eq!(result.return_value, 1, "{name} must never drop a packet");
    }

    fn egress(&self, frame: &[u8]) {
        self.run(program_names::SKB_EGRESS, frame);
    }

    fn ingress(&self, frame: &[u8]) {
        self.run(program_names::SKB_INGRESS, frame);
    }

    fn hash_map<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> HashMap<&MapData, K, V> {
        let map = self
            .ebpf
            .map(name)
            .unwrap_or_else(|| panic!("no map {name}"));
        HashMap::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"))
    }

    fn hash_map_mut<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> HashMap<&mut MapData, K, V> {
        let map = self
            .ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("no map {name}"));
        HashMap::try_from(map).unwrap_or_else(|e| panic!("map {name}: {e}"))
    }

    /// Makes `name` a DNS name of headless service `SERVICE_ID`.
    fn add_name(&mut self, name: &str, kind: u32) {
        self.add_name_of(name, SERVICE_ID, kind);
    }

    fn add_name_of(&mut self, name: &str, service_id: u32, kind: u32) {
        let hash = dns_name_hash(name).expect("valid name");
        let entry = NameEntry { service_id, kind };
        self.hash_map_mut::<u64, NameEntry>(map_names::DNS_NAMES)
            .insert(hash, entry, 0)
            .expect("insert into dns_names");
    }

    /// Makes `addr` pod `pod_id`'s, in `pod_addrs` and in `dns_addrs`, as
    /// the agent does.
    fn add_pod_addr(&mut self, addr: IpAddr, pod_id: u32) {
        let pod = PodRef { pod_id, _pad: 0 };
        self.hash_map_mut::<AddrKey, PodRef>(map_names::POD_ADDRS)
            .insert(addr_key(addr), pod, 0)
            .expect("insert into pod_addrs");
        let mut index = self.index_of(addr).unwrap_or_default();
        index.pod_id = pod_id;
        self.set_index(addr, index);
    }

    fn index_of(&self, addr: IpAddr) -> Option<AddrIndex> {
        self.hash_map::<AddrKey, AddrIndex>(map_names::DNS_ADDRS)
            .get(&addr_key(addr), 0)
            .ok()
    }

    fn set_index(&mut self, addr: IpAddr, index: AddrIndex) {
        // The address filter first, as the agent does: the interceptor
        // looks up no address the filter does not hold.
        let filter = self
            .ebpf
            .map_mut(map_names::ADDR_FILTER)
            .expect("no address filter");
        let mut filter = Array::try_from(filter).expect("address filter");
        headway::addr_filter::add_to(&mut filter, &addr_key(addr)).expect("add to the filter");
        // The table entry goes while `dns_addrs` changes and comes back
        // after, as the agent does (`headway::addr_table`).
        self.set_table_entry(addr, AddrTableEntry::default());
        self.hash_map_mut::<AddrKey, AddrIndex>(map_names::DNS_ADDRS)
            .insert(addr_key(addr), index, 0)
            .expect("insert into dns_addrs");
        let placed = headway::addr_table::put(&mut self.table(), &addr_key(addr), &index)
            .expect("write addr_table");
        assert!(placed, "no room for {addr} in addr_table");
    }

    fn table(&mut self) -> Array<&mut MapData, AddrTableEntry> {
        let map = self
            .ebpf
            .map_mut(map_names::ADDR_TABLE)
            .expect("no addr_table");
        Array::try_from(map).expect("addr_table array")
    }

    /// The table position that holds `addr`, if any.
    fn table_position(&mut self, addr: IpAddr) -> Option<u32> {
        let key = addr_key(addr);
        let home = addr_table::home(&key);
        let table = self.table();
        (0..addr_table::PROBES)
            .map(|probe| addr_table::position(home, probe))
            .find(|p| table.get(p, 0).is_ok_and(|e| e.check != 0 && e.addr == key))
    }

    /// Writes `entry` where `addr`'s entry is (nothing if it has none).
    fn set_table_entry(&mut self, addr: IpAddr, entry: AddrTableEntry) {
        if let Some(position) = self.table_position(addr) {
            self.table()
                .set(position, entry, 0)
                .expect("write addr_table");
        }
    }

    /// Gives `addr` slot `slot` of service `service_id`, handed over at
    /// `since_ns` (CLOCK_MONOTONIC), as the agent does for an endpoint.
    fn add_slot(&mut self, addr: IpAddr, service_id: u32, slot: u32, since_ns: u64) {
        let mut index = self.index_of(addr).unwrap_or(AddrIndex {
            pod_id: NO_POD,
            ..AddrIndex::default()
        });
        let n = index.n as usize;
        index.slots[n] = AddrSlot {
            service_id,
            slot: u16::try_from(slot).expect("a slot below 256"),
            flags: addr_slot_flags::KNOWN | addr_slot_flags::MEMBER | addr_slot_flags::ELIGIBLE,
            since_ns,
        };
        index.n += 1;
        self.set_index(addr, index);
    }

    /// The DNS answers counted for pod `pod_id` (`pod_dns_answers`).
    fn dns_answers(&self, pod_id: u32) -> Option<u64> {
        let map = self
            .ebpf
            .map(map_names::POD_DNS_ANSWERS)
            .expect("no pod_dns_answers");
        let answers: Array<&MapData, u64> = Array::try_from(map).expect("pod_dns_answers array");
        answers.get(&pod_id, 0).ok()
    }

    /// Records a query in flight the way the egress program would.
    fn add_pending(&mut self, flow: &Flow, name: &str, qtype: u16) {
        let value = PendingQuery {
            name_hash: dns_name_hash(name).expect("valid name"),
            qtype: u32::from(qtype),
            _pad: 0,
        };
        self.hash_map_mut::<PendingQueryKey, PendingQuery>(map_names::DNS_PENDING)
            .insert(flow.pending_key(), value, 0)
            .expect("insert into dns_pending");
    }

    /// Queries still waiting for their answer. An answered query stays in
    /// the LRU map, marked with name hash 0, until it is evicted.
    fn pending(&self) -> Vec<(PendingQueryKey, PendingQuery)> {
        self.hash_map::<PendingQueryKey, PendingQuery>(map_names::DNS_PENDING)
            .iter()
            .map(|e| e.expect("read dns_pending"))
            .filter(|(_, query)| query.name_hash != 0)
            .collect()
    }

    /// What this process's netns learned, read as connect() reads it.
    fn observations(&self) -> Vec<(AddrKey, Observation)> {
        headway::dns_index::observations_of(
            &self.hash_map::<ObservationKey, ObservationPage>(map_names::DNS_OBS),
            &self.hash_map::<AddrKey, AddrIndex>(map_names::DNS_ADDRS),
            netns_cookie(),
        )
    }

    /// The `dns_obs` pages, by key.
    fn pages(&self) -> Vec<(ObservationKey, ObservationPage)> {
        let mut pages: Vec<_> = self
            .hash_map::<ObservationKey, ObservationPage>(map_names::DNS_OBS)
            .iter()
            .map(|e| e.expect("read dns_obs"))
            .collect();
        pages.sort_by_key(|(k, _)| *k);
        pages
    }

    /// The observation cache's entries that are not empty, by index.
    fn cache_entries(&self) -> Vec<(u32, ObservationCacheEntry)> {
        let map = self
            .ebpf
            .map(obs_cache::MAP_NAME)
            .expect("no observation cache");
        let cache: Array<&MapData, ObservationCacheEntry> =
            Array::try_from(map).expect("observation cache array");
        (0..obs_cache::ENTRIES)
            .map(|i| (i, cache.get(&i, 0).expect("read the observation cache")))
            .filter(|(_, e)| e.check != 0)
            .collect()
    }

    /// Checks the observation cache against the pages, the way connect()
    /// relies on it: every entry is whole, at its key's index, this
    /// netns's, and holds the stamp its page holds (while the page is
    /// there); every stamp in a page is in the cache, unless another
    /// stamped key took its entry since.
    fn check_cache(&self) {
        let cookie = netns_cookie();
        let pages: std::collections::BTreeMap<_, _> = self.pages().into_iter().collect();
        let page_stamp = |tag: u64| {
            let (service_id, family, slot) = (tag as u32, (tag >> 32) as u16, tag >> 48);
            let key = ObservationKey {
                netns_cookie: cookie,
                service_id,
                family,
                page: (slot / OBS_PAGE_SLOTS as u64) as u16,
            };
            pages
                .get(&key)
                .map(|p| p.stamps[slot as usize % OBS_PAGE_SLOTS])
        };
        let cache: std::collections::BTreeMap<_, _> = self.cache_entries().into_iter().collect();
        for (i, e) in &cache {
            let whole = obs_cache::check(e.netns_cookie, e.tag, e.stamp);
            assert_eq!(e.check, whole, "cache entry {i} fails its check: {e:?}");
            assert_eq!(*i, obs_cache::index(e.netns_cookie, e.tag), "{e:?}");
            assert_eq!(e.netns_cookie, cookie, "a cache entry for another netns");
            match page_stamp(e.tag) {
                Some(stamp) => assert_eq!(stamp, e.stamp, "cache and page disagree: {e:?}"),
                None => assert!(self.evicted, "a cache entry with no page: {e:?}"),
            }
        }
        for (key, page) in &pages {
            for (i, stamp) in page.stamps.iter().enumerate() {
                if *stamp == 0 {
                    continue;
                }
                let slot = key.page * OBS_PAGE_SLOTS as u16 + i as u16;
                let tag = obs_cache::tag(key.service_id, key.family, slot);
                let entry = cache.get(&obs_cache::index(cookie, tag));
                assert!(entry.is_some(), "stamp {key:?} slot {slot} is not cached");
            }
        }
    }

    /// Removes every page of the client, the way LRU pressure would.
    fn evict_pages(&mut self) {
        self.evicted = true;
        let keys: Vec<_> = self.pages().into_iter().map(|(k, _)| k).collect();
        let mut map = self.hash_map_mut::<ObservationKey, ObservationPage>(map_names::DNS_OBS);
        for key in keys {
            map.remove(&key).expect("remove from dns_obs");
        }
    }

    /// Moves `addr` to pod `pod_id` the way the agent does: `pod_addrs` and
    /// `dns_addrs` first, then the generation that tells the kernel its
    /// cache is stale.
    fn move_pod_addr(&mut self, addr: IpAddr, pod_id: u32) {
        self.add_pod_addr(addr, pod_id);
        self.bump_generation();
    }

    fn bump_generation(&mut self) {
        let map = self
            .ebpf
            .map_mut(map_names::POD_ADDRS_GEN)
            .expect("no pod_addrs_gen");
        let mut generation: Array<&mut MapData, u64> =
            Array::try_from(map).expect("pod_addrs_gen array");
        let now = generation.get(&0, 0).expect("read pod_addrs_gen");
        generation.set(0, now + 1, 0).expect("write pod_addrs_gen");
    }

    /// `dns_counters[index]`, summed over CPUs.
    fn counter(&self, index: u32) -> u64 {
        let map = self
            .ebpf
            .map(map_names::DNS_COUNTERS)
            .expect("no dns_counters");
        let counters = PerCpuArray::<_, u64>::try_from(map).expect("dns_counters");
        counters
            .get(&index, 0)
            .expect("read dns_counters")
            .iter()
            .sum()
    }

    /// Every counter that is not zero, by name, for readable assertions.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        COUNTER_NAMES
            .iter()
            .map(|&(name, index)| (name, self.counter(index)))
            .filter(|&(_, n)| n != 0)
            .collect()
    }

    /// The addresses learned, with the service and kind they were learned
    /// for; checks every observation is for this process's netns.
    fn learned(&self) -> Vec<(IpAddr, u32, u32)> {
        self.check_cache();
        let cookie = netns_cookie();
        for (key, _) in self.pages() {
            assert_eq!(key.netns_cookie, cookie, "a page for another netns");
        }
        let mut learned: Vec<_> = self
            .observations()
            .into_iter()
            .map(|(addr, obs)| {
                assert_ne!(obs.learned_ns, 0, "learned_ns not set");
                (ip_of(&addr), obs.service_id, obs.kind)
            })
            .collect();
        learned.sort();
        learned
    }
}

const COUNTER_NAMES: [(&str, u32); 13] = [
    ("RESPONSES", dns_counter::RESPONSES),
    ("UNSOLICITED", dns_counter::UNSOLICITED),
    ("NAME_UNKNOWN", dns_counter::NAME_UNKNOWN),
    ("ADDRS_LEARNED", dns_counter::ADDRS_LEARNED),
    ("ERR_TRUNCATED", dns_counter::ERR_TRUNCATED),
    ("ERR_BAD_POINTER", dns_counter::ERR_BAD_POINTER),
    ("ERR_BAD_LABEL", dns_counter::ERR_BAD_LABEL),
    ("ERR_BAD_HEADER", dns_counter::ERR_BAD_HEADER),
    ("ERR_QUESTION_MISMATCH", dns_counter::ERR_QUESTION_MISMATCH),
    ("QUERIES", dns_counter::QUERIES),
    ("ERR_MAP_FULL", dns_counter::ERR_MAP_FULL),
    ("LOOKUPS_SERVICE", dns_counter::LOOKUPS_SERVICE),
    ("LOOKUPS_POD", dns_counter::LOOKUPS_POD),
];

/// The network namespace cookie of this process, as the kernel reports it
/// for a socket here. BPF_PROG_TEST_RUN runs a cgroup_skb program on an skb
/// owned by a socket in the caller's namespace, so this is the cookie the
/// programs see (checked by `egress_records_the_query_in_flight`).
fn netns_cookie() -> u64 {
    headway::netns::current_netns_cookie().expect("SO_NETNS_COOKIE")
}

fn addr_key(addr: IpAddr) -> AddrKey {
    match addr {
        IpAddr::V4(v4) => AddrKey::from_v4_be(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => AddrKey::from_octets(v6.octets()),
    }
}

fn ip_of(key: &AddrKey) -> IpAddr {
    let v6 = Ipv6Addr::from(key.octets());
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

// ---------------------------------------------------------------------------
// Frames

/// One client socket talking to one DNS server.
struct Flow {
    client: IpAddr,
    server: IpAddr,
    client_port: u16,
    server_port: u16,
}

impl Flow {
    fn v4() -> Flow {
        Flow {
            client: CLIENT_V4.into(),
            server: SERVER_V4.into(),
            client_port: CLIENT_PORT,
            server_port: 53,
        }
    }

    fn v6() -> Flow {
        Flow {
            client: CLIENT_V6.into(),
            server: SERVER_V6.into(),
            ..Flow::v4()
        }
    }

    fn pending_key(&self) -> PendingQueryKey {
        PendingQueryKey {
            netns_cookie: netns_cookie(),
            server: addr_key(self.server),
            client_port: self.client_port.to_be(),
            query_id: QUERY_ID.to_be(),
            _pad: 0,
        }
    }

    /// A UDP datagram from the client to the server.
    fn query_frame(&self, payload: &[u8]) -> Vec<u8> {
        frame(
            self.client,
            self.server,
            IPPROTO_UDP,
            &udp(self.client_port, self.server_port, payload),
        )
    }

    /// A UDP datagram from the server to the client.
    fn response_frame(&self, payload: &[u8]) -> Vec<u8> {
        frame(
            self.server,
            self.client,
            IPPROTO_UDP,
            &udp(self.server_port, self.client_port, payload),
        )
    }
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("datagram fits");
    let mut out = Vec::with_capacity(len.into());
    out.extend(sport.to_be_bytes());
    out.extend(dport.to_be_bytes());
    out.extend(len.to_be_bytes());
    // Checksum 0: "none" for IPv4; the programs do not look at it.
    out.extend([0, 0]);
    out.extend(payload);
    out
}

/// An Ethernet frame carrying `l4` in an IPv4 or IPv6 packet.
fn frame(src: IpAddr, dst: IpAddr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut out = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.extend(0x0800u16.to_be_bytes());
            let total = u16::try_from(20 + l4.len()).expect("packet fits");
            let mut ip = vec![0x45, 0];
            ip.extend(total.to_be_bytes());
            // ID, DF, TTL 64, protocol, checksum filled in below.
            ip.extend([0, 1, 0x40, 0, 64, protocol, 0, 0]);
            ip.extend(src.octets());
            ip.extend(dst.octets());
            let sum = ipv4_checksum(&ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            out.extend(ip);
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            out.extend(0x86DDu16.to_be_bytes());
            out.extend([0x60, 0, 0, 0]);
            out.extend(u16::try_from(l4.len()).expect("fits").to_be_bytes());
            out.extend([protocol, 64]);
            out.extend(src.octets());
            out.extend(dst.octets());
        }
        _ => panic!("mixed address families"),
    }
    out.extend(l4);
    out
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `frame` (Ethernet + IPv4) with 4 bytes of IP options (NOPs) added.
fn with_ipv4_options(frame: &[u8]) -> Vec<u8> {
    const ETH: usize = 14;
    let mut ip = frame[ETH..ETH + 20].to_vec();
    ip[0] = 0x46;
    let total = u16::from_be_bytes([ip[2], ip[3]]) + 4;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend([1, 1, 1, 1]);
    ip[10..12].fill(0);
    let sum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut out = frame[..ETH].to_vec();
    out.extend(ip);
    out.extend(&frame[ETH + 20..]);
    out
}

/// A minimal TCP segment (header only) between the flow's ports.
fn tcp(sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(sport.to_be_bytes());
    out.extend(dport.to_be_bytes());
    out.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    out
}

// ---------------------------------------------------------------------------
// DNS messages: well-formed ones by hickory-proto, broken ones by hand

fn name(s: &str) -> Name {
    let mut name = Name::from_ascii(s).expect("valid name");
    name.set_fqdn(true);
    name
}

fn query_msg(qname: &str, qtype: RecordType) -> Vec<u8> {
    let mut msg = Message::new(QUERY_ID, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name(qname), qtype));
    msg.to_vec().expect("encode query")
}

fn response_msg(qname: &str, qtype: RecordType, answers: Vec<Record>) -> Vec<u8> {
    let mut msg = Message::response(QUERY_ID, OpCode::Query);
    msg.metadata.authoritative = true;
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name(qname), qtype));
    msg.add_answers(answers);
    msg.to_vec().expect("encode response")
}

fn a(owner: &str, ip: Ipv4Addr) -> Record {
    Record::from_rdata(name(owner), 5, RData::A(A(ip)))
}

fn aaaa(owner: &str, ip: Ipv6Addr) -> Record {
    Record::from_rdata(name(owner), 5, RData::AAAA(AAAA(ip)))
}

fn cname(owner: &str, target: &str) -> Record {
    Record::from_rdata(name(owner), 5, RData::CNAME(CNAME(name(target))))
}

/// Pod addresses 10.77.1.1, 10.77.1.2, ...
fn pod_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 1, u8::try_from(i + 1).expect("at most 255 pods"))
}

/// fd77:0:0:1::`i`: the IPv6 endpoints.
fn pod_v6(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, 1, 0, 0, 0, i)
}

fn a_records(owner: &str, n: usize) -> Vec<Record> {
    (0..n).map(|i| a(owner, pod_v4(i))).collect()
}

/// DNS header bytes.
fn header(flags: u16, qdcount: u16, ancount: u16) -> Vec<u8> {
    let mut out = Vec::new();
    for word in [QUERY_ID, flags, qdcount, ancount, 0, 0] {
        out.extend(word.to_be_bytes());
    }
    out
}

/// QR, AA, RD, RA: an ordinary successful response.
const RESPONSE_FLAGS: u16 = 0x8580;
const FLAG_TC: u16 = 0x0200;

/// A name in wire form, uncompressed.
fn wire_name(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in s.trim_end_matches('.').split('.') {
        out.push(u8::try_from(label.len()).expect("short label"));
        out.extend(label.as_bytes());
    }
    out.push(0);
    out
}

/// The question section for `qname` IN A.
fn question_a(qname: &str) -> Vec<u8> {
    let mut out = wire_name(qname);
    out.extend(TYPE_A.to_be_bytes());
    out.extend(1u16.to_be_bytes());
    out
}

/// An A record whose owner is a pointer to the question name (offset 12).
fn answer_a(ip: Ipv4Addr) -> Vec<u8> {
    answer_a_owned(&[0xC0, 12], ip)
}

fn answer_a_owned(owner: &[u8], ip: Ipv4Addr) -> Vec<u8> {
    let mut out = owner.to_vec();
    out.extend(TYPE_A.to_be_bytes());
    out.extend(1u16.to_be_bytes());
    out.extend(5u32.to_be_bytes());
    out.extend(4u16.to_be_bytes());
    out.extend(ip.octets());
    out
}

/// A response to `qname` IN A: the given header fields, then the question,
/// then `answers` verbatim.
fn crafted(flags: u16, ancount: u16, qname: &str, answers: &[Vec<u8>]) -> Vec<u8> {
    let mut out = header(flags, 1, ancount);
    out.extend(question_a(qname));
    for answer in answers {
        out.extend(answer);
    }
    out
}

// ---------------------------------------------------------------------------
// Scenarios

/// A fresh interceptor that knows the service and pod names of `web`.
fn setup(test: &str) -> Option<Interceptor> {
    if !headway_testbed::require_root(test) {
        return None;
    }
    let mut ix = Interceptor::load();
    ix.add_name(SERVICE_NAME, name_kind::SERVICE);
    ix.add_name(POD_NAME, name_kind::POD);
    // The addresses the responses hand out are the service's endpoints
    // (no pod unless a test adds one): the agent gives each a slot.
    for i in 0..40 {
        ix.add_slot(pod_v4(i).into(), SERVICE_ID, i as u32, 1);
    }
    for i in 1..=9 {
        ix.add_slot(pod_v6(i).into(), SERVICE_ID, u32::from(i) - 1, 1);
    }
    Some(ix)
}

/// Asks `qname` through the egress program, then hands the ingress
/// program `response`.
fn exchange(ix: &Interceptor, flow: &Flow, qname: &str, qtype: RecordType, response: &[u8]) {
    ix.egress(&flow.query_frame(&query_msg(qname, qtype)));
    assert_eq!(ix.pending().len(), 1, "the query was not recorded");
    ix.ingress(&flow.response_frame(response));
}

fn service_obs(ips: impl IntoIterator<Item = Ipv4Addr>) -> Vec<(IpAddr, u32, u32)> {
    let mut want: Vec<_> = ips
        .into_iter()
        .map(|ip| (IpAddr::V4(ip), SERVICE_ID, name_kind::SERVICE))
        .collect();
    want.sort();
    want
}

/// Feeds a hand-made response to a pending `SERVICE_NAME` A query and
/// checks it taught nothing and was counted under `counter` only.
fn assert_rejected(test: &str, response: &[u8], counter: &'static str) {
    let Some(mut ix) = setup(test) else { return };
    let flow = Flow::v4();
    ix.add_pending(&flow, SERVICE_NAME, TYPE_A);
    ix.ingress(&flow.response_frame(response));
    assert_eq!(ix.learned(), vec![], "a rejected response taught something");
    assert_eq!(ix.counters(), vec![("RESPONSES", 1), (counter, 1)]);
    assert!(
        ix.pending().is_empty(),
        "the pending query was not consumed"
    );
}

#[test]
fn egress_records_the_query_in_flight() {
    let Some(ix) = setup("egress_records_the_query_in_flight") else {
        return;
    };
    let flow = Flow::v4();
    ix.egress(&flow.query_frame(&query_msg(SERVICE_NAME, RecordType::A)));
    let pending = ix.pending();
    assert_eq!(pending.len(), 1, "one query in flight");
    let (key, value) = pending[0];
    // The assumption every other test rests on: under test_run the program
    // sees this process's network namespace.
    assert_eq!(key.netns_cookie, netns_cookie(), "netns cookie");
    assert_eq!(key, flow.pending_key());
    assert_eq!(value.name_hash, dns_name_hash(SERVICE_NAME).unwrap());
    assert_eq!(value.qtype, u32::from(TYPE_A));
    assert_eq!(ix.counters(), vec![("QUERIES", 1)]);
}

#[test]
fn egress_records_aaaa_queries_over_ipv6() {
    let Some(ix) = setup("egress_records_aaaa_queries_over_ipv6") else {
        return;
    };
    let flow = Flow::v6();
    ix.egress(&flow.query_frame(&query_msg(SERVICE_NAME, RecordType::AAAA)));
    let pending = ix.pending();
    assert_eq!(pending.len(), 1, "one query in flight");
    assert_eq!(pending[0].0, flow.pending_key());
    assert_eq!(pending[0].1.qtype, u32::from(TYPE_AAAA));
}

#[test]
fn egress_ignores_other_queries_and_traffic() {
    let Some(ix) = setup("egress_ignores_other_queries_and_traffic") else {
        return;
    };
    let flow = Flow::v4();
    // Not A/AAAA, not a query, not port 53, not UDP.
    ix.egress(&flow.query_frame(&query_msg(SERVICE_NAME, RecordType::TXT)));
    ix.egress(&flow.query_frame(&response_msg(SERVICE_NAME, RecordType::A, vec![])));
    let other_port = Flow {
        server_port: 5353,
        ..Flow::v4()
    };
    ix.egress(&other_port.query_frame(&query_msg(SERVICE_NAME, RecordType::A)));
    ix.egress(&frame(
        flow.client,
        flow.server,
        IPPROTO_TCP,
        &tcp(CLIENT_PORT, 53),
    ));
    assert!(ix.pending().is_empty(), "nothing should be pending");
    assert_eq!(ix.counters(), vec![]);
}

#[test]
fn cname_then_three_a_records_are_learned() {
    let Some(ix) = setup("cname_then_three_a_records_are_learned") else {
        return;
    };
    let target = "web-primary.demo.svc.cluster.local";
    let mut answers = vec![cname(SERVICE_NAME, target)];
    answers.extend(a_records(target, 3));
    let response = response_msg(SERVICE_NAME, RecordType::A, answers);
    exchange(&ix, &Flow::v4(), SERVICE_NAME, RecordType::A, &response);
    assert_eq!(ix.learned(), service_obs((0..3).map(pod_v4)));
    assert_eq!(
        ix.counters(),
        vec![
            ("RESPONSES", 1),
            ("ADDRS_LEARNED", 3),
            ("QUERIES", 1),
            ("LOOKUPS_SERVICE", 1)
        ]
    );
    assert!(
        ix.pending().is_empty(),
        "the pending query was not consumed"
    );
}

#[test]
fn sixteen_a_records_are_learned() {
    let Some(ix) = setup("sixteen_a_records_are_learned") else {
        return;
    };
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 16));
    exchange(&ix, &Flow::v4(), SERVICE_NAME, RecordType::A, &response);
    assert_eq!(ix.learned(), service_obs((0..16).map(pod_v4)));
    assert_eq!(ix.counter(dns_counter::ADDRS_LEARNED), 16);
}

/// An address the table does not hold (all its positions taken, or its
/// entry being rewritten) is read from `dns_addrs`: learned the same.
#[test]
fn addresses_missing_from_the_table_are_read_from_dns_addrs() {
    let Some(mut ix) = setup("addresses_missing_from_the_table_are_read_from_dns_addrs") else {
        return;
    };
    for i in (0..16).step_by(2) {
        ix.set_table_entry(pod_v4(i).into(), AddrTableEntry::default());
        assert_eq!(ix.table_position(pod_v4(i).into()), None);
    }
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 16));
    exchange(&ix, &Flow::v4(), SERVICE_NAME, RecordType::A, &response);
    assert_eq!(ix.learned(), service_obs((0..16).map(pod_v4)));
    assert_eq!(ix.counter(dns_counter::ADDRS_LEARNED), 16);
}

/// A table entry read while the agent rewrites it can mix two versions:
/// its check then fails, and the kernel reads `dns_addrs` instead of
/// trusting any of it. Here each entry says another slot (one of the
/// other answers': stamping it would teach a wrong address) and keeps its
/// old check, as a read of the new words and the old check would.
#[test]
fn a_table_entry_that_fails_its_check_is_not_trusted() {
    let Some(mut ix) = setup("a_table_entry_that_fails_its_check_is_not_trusted") else {
        return;
    };
    let served: Vec<Ipv4Addr> = (0..4).map(pod_v4).collect();
    for (i, ip) in served.iter().enumerate() {
        let position = ix.table_position((*ip).into()).expect("placed");
        let mut torn = ix.table().get(&position, 0).expect("read addr_table");
        torn.slots[0] = addr_table::slot_word(SERVICE_ID, 20 + i as u16, 0);
        ix.table().set(position, torn, 0).expect("write addr_table");
    }
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 4));
    exchange(&ix, &Flow::v4(), SERVICE_NAME, RecordType::A, &response);
    // Learned at their own slots (from `dns_addrs`), not at 20..24.
    assert_eq!(ix.learned(), service_obs(served));
    assert_eq!(ix.counter(dns_counter::ADDRS_LEARNED), 4);
}

/// A whole table entry is what the kernel goes by (the agent keeps it
/// from ever saying more than `dns_addrs`): one that gives an address
/// another slot, with a check that fits, is followed. This shows the
/// table is read, and read first.
#[test]
fn a_whole_table_entry_is_read_before_dns_addrs() {
    let Some(mut ix) = setup("a_whole_table_entry_is_read_before_dns_addrs") else {
        return;
    };
    let ip = pod_v4(0);
    let position = ix.table_position(ip.into()).expect("placed");
    let slots = [addr_table::slot_word(SERVICE_ID, 30, 0), 0, 0, 0];
    let entry = AddrTableEntry::new(addr_key(ip.into()), NO_POD, 1, slots, [0; 4]);
    ix.table()
        .set(position, entry, 0)
        .expect("write addr_table");
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 1));
    exchange(&ix, &Flow::v4(), SERVICE_NAME, RecordType::A, &response);
    // Slot 30 is pod_v4(30)'s in `dns_addrs`: that is what was stamped.
    assert_eq!(ix.learned(), service_obs([pod_v4(30)]));
}

#[test]
fn thirty_two_a_records_are_learned() {
    let Some(ix) = setup("thirty_two_a_records_are_learned") else {
        return;
    };
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 32));
    assert!(response.len() > 512, "needs EDNS-sized responses");
    exchange(&ix, &Flow::v4(), SERVICE_NAME, RecordType::A, &response);
    assert_eq!(ix.learned(), service_obs((0..32).map(pod_v4)));
    assert_eq!(ix.counter(dns_counter::ADDRS_LEARNED), 32);
}

#[test]
fn aaaa_records_are_learned_over_ipv6() {
    let Some(ix) = setup("aaaa_records_are_learned_over_ipv6") else {
        return;
    };
    let ips: Vec<Ipv6Addr> = (1..=3)
        .map(|i| Ipv6Addr::new(0xfd77, 0, 0, 1, 0, 0, 0, i))
        .collect();
    let answers = ips.iter().map(|ip| aaaa(SERVICE_NAME, *ip)).collect();
    let response = response_msg(SERVICE_NAME, RecordType::AAAA, answers);
    exchange(&ix, &Flow::v6(), SERVICE_NAME, RecordType::AAAA, &response);
    let want: Vec<_> = ips
        .iter()
        .map(|ip| (IpAddr::V6(*ip), SERVICE_ID, name_kind::SERVICE))
        .collect();
    assert_eq!(ix.learned(), want);
}

#[test]
fn only_records_of_the_asked_type_are_learned() {
    let Some(ix) = setup("only_records_of_the_asked_type_are_learned") else {
        return;
    };
    let v6 = Ipv6Addr::new(0xfd77, 0, 0, 1, 0, 0, 0, 9);
    let answers = vec![a(SERVICE_NAME, pod_v4(0)), aaaa(SERVICE_NAME, v6)];
    let response = response_msg(SERVICE_NAME, RecordType::A, answers);
    exchange(&ix, &Flow::v4(), SERVICE_NAME, RecordType::A, &response);
    assert_eq!(ix.learned(), service_obs([pod_v4(0)]));
}

#[test]
fn pod_name_is_recorded_as_pod_kind() {
    let Some(ix) = setup("pod_name_is_recorded_as_pod_kind") else {
        return;
    };
    let response = response_msg(POD_NAME, RecordType::A, vec![a(POD_NAME, pod_v4(0))]);
    exchange(&ix, &Flow::v4(), POD_NAME, RecordType::A, &response);
    assert_eq!(ix.counter(dns_counter::LOOKUPS_POD), 1);
    assert_eq!(ix.counter(dns_counter::LOOKUPS_SERVICE), 0);
    assert_eq!(
        ix.learned(),
        vec![(IpAddr::V4(pod_v4(0)), SERVICE_ID, name_kind::POD)]
    );
}

#[test]
fn later_answer_from_another_name_replaces_the_kind() {
    let Some(ix) = setup("later_answer_from_another_name_replaces_the_kind") else {
        return;
    };
    let flow = Flow::v4();
    let by_pod = response_msg(POD_NAME, RecordType::A, vec![a(POD_NAME, pod_v4(0))]);
    exchange(&ix, &flow, POD_NAME, RecordType::A, &by_pod);
    let by_service = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 2));
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &by_service);
    assert_eq!(ix.learned(), service_obs((0..2).map(pod_v4)));
}

#[test]
fn mixed_case_question_is_matched() {
    let Some(ix) = setup("mixed_case_question_is_matched") else {
        return;
    };
    // What a resolver using 0x20 randomisation sends and gets echoed.
    let asked = "wEb.DeMo.SVC.cluster.LOCAL";
    let response = response_msg(asked, RecordType::A, a_records(asked, 2));
    exchange(&ix, &Flow::v4(), asked, RecordType::A, &response);
    assert_eq!(ix.learned(), service_obs((0..2).map(pod_v4)));
}

#[test]
fn answers_count_for_the_pods_they_hand_out() {
    let Some(mut ix) = setup("answers_count_for_the_pods_they_hand_out") else {
        return;
    };
    ix.add_pod_addr(pod_v4(0).into(), 100);
    ix.add_pod_addr(pod_v4(1).into(), 101);
    let flow = Flow::v4();
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 3));
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &response);
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &response);
    let answers = |pod| ix.dns_answers(pod);
    assert_eq!(answers(100), Some(2));
    assert_eq!(answers(101), Some(2));
    // 10.77.1.3 is no pod: nothing to count it under.
    assert_eq!(ix.counter(dns_counter::ADDRS_LEARNED), 6);
}

#[test]
fn unsolicited_response_teaches_nothing() {
    let Some(ix) = setup("unsolicited_response_teaches_nothing") else {
        return;
    };
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 2));
    ix.ingress(&Flow::v4().response_frame(&response));
    assert_eq!(ix.learned(), vec![]);
    assert_eq!(ix.counters(), vec![("RESPONSES", 1), ("UNSOLICITED", 1)]);
}

#[test]
fn response_to_another_socket_or_server_teaches_nothing() {
    let Some(mut ix) = setup("response_to_another_socket_or_server_teaches_nothing") else {
        return;
    };
    let flow = Flow::v4();
    ix.add_pending(&flow, SERVICE_NAME, TYPE_A);
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 2));
    let other_port = Flow {
        client_port: CLIENT_PORT + 1,
        ..Flow::v4()
    };
    let other_server = Flow {
        server: Ipv4Addr::new(10, 77, 0, 54).into(),
        ..Flow::v4()
    };
    ix.ingress(&other_port.response_frame(&response));
    ix.ingress(&other_server.response_frame(&response));
    let mut wrong_id = response.clone();
    wrong_id[0] ^= 0xff;
    ix.ingress(&flow.response_frame(&wrong_id));
    assert_eq!(ix.learned(), vec![]);
    assert_eq!(ix.counters(), vec![("RESPONSES", 3), ("UNSOLICITED", 3)]);
    assert_eq!(ix.pending().len(), 1, "the real query is still pending");
}

#[test]
fn second_response_to_one_query_is_unsolicited() {
    let Some(ix) = setup("second_response_to_one_query_is_unsolicited") else {
        return;
    };
    let flow = Flow::v4();
    let first = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 1));
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &first);
    let second = response_msg(
        SERVICE_NAME,
        RecordType::A,
        vec![a(SERVICE_NAME, pod_v4(9))],
    );
    ix.ingress(&flow.response_frame(&second));
    assert_eq!(ix.learned(), service_obs([pod_v4(0)]));
    assert_eq!(ix.counter(dns_counter::UNSOLICITED), 1);
}

#[test]
fn question_mismatch_teaches_nothing() {
    let Some(ix) = setup("question_mismatch_teaches_nothing") else {
        return;
    };
    let flow = Flow::v4();
    // Asked for the pod, "answered" for the service.
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 2));
    exchange(&ix, &flow, POD_NAME, RecordType::A, &response);
    // Asked A, "answered" AAAA.
    let v6 = vec![aaaa(
        SERVICE_NAME,
        Ipv6Addr::new(0xfd77, 0, 0, 1, 0, 0, 0, 1),
    )];
    let response = response_msg(SERVICE_NAME, RecordType::AAAA, v6);
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &response);
    assert_eq!(ix.learned(), vec![]);
    assert_eq!(ix.counter(dns_counter::ERR_QUESTION_MISMATCH), 2);
}

#[test]
fn unknown_name_teaches_nothing() {
    let Some(ix) = setup("unknown_name_teaches_nothing") else {
        return;
    };
    let other = "api.other.svc.cluster.local";
    let response = response_msg(other, RecordType::A, a_records(other, 2));
    exchange(&ix, &Flow::v4(), other, RecordType::A, &response);
    assert_eq!(ix.learned(), vec![]);
    assert_eq!(
        ix.counters(),
        vec![("RESPONSES", 1), ("NAME_UNKNOWN", 1), ("QUERIES", 1)]
    );
}

#[test]
fn negative_answer_teaches_nothing() {
    let Some(ix) = setup("negative_answer_teaches_nothing") else {
        return;
    };
    let mut msg = Message::response(QUERY_ID, OpCode::Query);
    msg.metadata.response_code = ResponseCode::NXDomain;
    msg.add_query(Query::query(name(SERVICE_NAME), RecordType::A));
    let response = msg.to_vec().expect("encode");
    exchange(&ix, &Flow::v4(), SERVICE_NAME, RecordType::A, &response);
    assert_eq!(ix.learned(), vec![]);
    assert_eq!(ix.counters(), vec![("RESPONSES", 1), ("QUERIES", 1)]);
}

#[test]
fn truncated_packet_teaches_nothing() {
    // ANCOUNT 2, but the packet ends 8 bytes into the second answer.
    let answers = [answer_a(pod_v4(0)), answer_a(pod_v4(1))[..8].to_vec()];
    let response = crafted(RESPONSE_FLAGS, 2, SERVICE_NAME, &answers);
    assert_rejected(
        "truncated_packet_teaches_nothing",
        &response,
        "ERR_TRUNCATED",
    );
}

#[test]
fn tc_bit_teaches_nothing() {
    let response = crafted(
        RESPONSE_FLAGS | FLAG_TC,
        1,
        SERVICE_NAME,
        &[answer_a(pod_v4(0))],
    );
    assert_rejected("tc_bit_teaches_nothing", &response, "ERR_TRUNCATED");
}

#[test]
fn pointer_loop_teaches_nothing() {
    // Owner: the label "a", then a pointer back to that label.
    let question_end = 12 + question_a(SERVICE_NAME).len();
    let owner = [1, b'a', 0xC0, u8::try_from(question_end).expect("short")];
    let response = crafted(
        RESPONSE_FLAGS,
        1,
        SERVICE_NAME,
        &[answer_a_owned(&owner, pod_v4(0))],
    );
    assert_rejected("pointer_loop_teaches_nothing", &response, "ERR_BAD_POINTER");
}

#[test]
fn pointer_beyond_the_packet_teaches_nothing() {
    let owner = [0xFF, 0xFF];
    let response = crafted(
        RESPONSE_FLAGS,
        1,
        SERVICE_NAME,
        &[answer_a_owned(&owner, pod_v4(0))],
    );
    assert_rejected(
        "pointer_beyond_the_packet_teaches_nothing",
        &response,
        "ERR_BAD_POINTER",
    );
}

#[test]
fn label_over_63_bytes_teaches_nothing() {
    let mut owner = vec![64];
    owner.extend([b'a'; 64]);
    owner.extend([0xC0, 12]);
    // A valid answer first: it must not be learned either.
    let answers = [answer_a(pod_v4(0)), answer_a_owned(&owner, pod_v4(1))];
    let response = crafted(RESPONSE_FLAGS, 2, SERVICE_NAME, &answers);
    assert_rejected(
        "label_over_63_bytes_teaches_nothing",
        &response,
        "ERR_BAD_LABEL",
    );
}

#[test]
fn ancount_larger_than_the_packet_teaches_nothing() {
    let answers = [answer_a(pod_v4(0)), answer_a(pod_v4(1))];
    let response = crafted(RESPONSE_FLAGS, 10, SERVICE_NAME, &answers);
    assert_rejected(
        "ancount_larger_than_the_packet_teaches_nothing",
        &response,
        "ERR_TRUNCATED",
    );
}

#[test]
fn huge_ancount_teaches_nothing() {
    let answers = [answer_a(pod_v4(0)), answer_a(pod_v4(1))];
    let response = crafted(RESPONSE_FLAGS, u16::MAX, SERVICE_NAME, &answers);
    assert_rejected("huge_ancount_teaches_nothing", &response, "ERR_BAD_HEADER");
}

#[test]
fn query_packet_on_ingress_teaches_nothing() {
    // QR=0 with answers: not a response.
    let answers = [answer_a(pod_v4(0))];
    let response = crafted(RESPONSE_FLAGS & !0x8000, 1, SERVICE_NAME, &answers);
    assert_rejected(
        "query_packet_on_ingress_teaches_nothing",
        &response,
        "ERR_BAD_HEADER",
    );
}

#[test]
fn non_dns_traffic_is_ignored() {
    let Some(mut ix) = setup("non_dns_traffic_is_ignored") else {
        return;
    };
    let flow = Flow::v4();
    ix.add_pending(&flow, SERVICE_NAME, TYPE_A);
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 2));
    // The same bytes from another port, and TCP from port 53.
    let other_port = Flow {
        server_port: 5353,
        ..Flow::v4()
    };
    ix.ingress(&other_port.response_frame(&response));
    ix.ingress(&frame(
        flow.server,
        flow.client,
        IPPROTO_TCP,
        &tcp(53, CLIENT_PORT),
    ));
    let v6 = Flow::v6();
    ix.ingress(&frame(
        v6.server,
        v6.client,
        IPPROTO_TCP,
        &tcp(53, CLIENT_PORT),
    ));
    assert_eq!(ix.learned(), vec![]);
    assert_eq!(ix.counters(), vec![]);
    assert_eq!(ix.pending().len(), 1, "the query is still pending");
}

#[test]
fn ipv4_options_are_skipped() {
    let Some(ix) = setup("ipv4_options_are_skipped") else {
        return;
    };
    let flow = Flow::v4();
    let query = flow.query_frame(&query_msg(SERVICE_NAME, RecordType::A));
    ix.egress(&with_ipv4_options(&query));
    assert_eq!(ix.pending().len(), 1, "the query was not recorded");
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 2));
    ix.ingress(&with_ipv4_options(&flow.response_frame(&response)));
    assert_eq!(ix.learned(), service_obs((0..2).map(pod_v4)));
}

#[test]
fn uncompressed_owner_names_are_walked() {
    let Some(mut ix) = setup("uncompressed_owner_names_are_walked") else {
        return;
    };
    let flow = Flow::v4();
    ix.add_pending(&flow, SERVICE_NAME, TYPE_A);
    let owner = wire_name(SERVICE_NAME);
    let answers = [
        answer_a_owned(&owner, pod_v4(0)),
        answer_a_owned(&owner, pod_v4(1)),
    ];
    ix.ingress(&flow.response_frame(&crafted(RESPONSE_FLAGS, 2, SERVICE_NAME, &answers)));
    assert_eq!(ix.learned(), service_obs((0..2).map(pod_v4)));
}

#[test]
fn forward_pointer_teaches_nothing() {
    // The first answer's owner points at the second answer's owner: inside
    // the packet, but not back to anything already seen.
    let second_owner = 12 + question_a(SERVICE_NAME).len() + 16;
    let owner = [0xC0, u8::try_from(second_owner).expect("short")];
    let answers = [answer_a_owned(&owner, pod_v4(0)), answer_a(pod_v4(1))];
    let response = crafted(RESPONSE_FLAGS, 2, SERVICE_NAME, &answers);
    assert_rejected(
        "forward_pointer_teaches_nothing",
        &response,
        "ERR_BAD_POINTER",
    );
}

#[test]
fn pointer_in_the_question_teaches_nothing() {
    let mut response = header(RESPONSE_FLAGS, 1, 1);
    // The question name is a pointer (to the header): nothing to point to.
    response.extend([0xC0, 2]);
    response.extend(TYPE_A.to_be_bytes());
    response.extend(1u16.to_be_bytes());
    response.extend(answer_a(pod_v4(0)));
    assert_rejected(
        "pointer_in_the_question_teaches_nothing",
        &response,
        "ERR_BAD_POINTER",
    );
}

#[test]
fn response_longer_than_the_parser_copies_teaches_nothing() {
    let answers = [answer_a(pod_v4(0)), answer_a(pod_v4(1))];
    let mut response = crafted(RESPONSE_FLAGS, 2, SERVICE_NAME, &answers);
    // Trailing bytes (as if an additional section followed) past 1232.
    response.resize(1300, 0);
    assert_rejected(
        "response_longer_than_the_parser_copies_teaches_nothing",
        &response,
        "ERR_BAD_HEADER",
    );
}

// ---------------------------------------------------------------------------
// The pages (`dns_obs`) and the answer cache: one write per response, and
// exactly what a write per address would teach and count.

/// When `ip` was learned, if it was.
fn learned_ns(ix: &Interceptor, ip: IpAddr) -> Option<u64> {
    ix.observations()
        .into_iter()
        .find(|(addr, _)| ip_of(addr) == ip)
        .map(|(_, o)| o.learned_ns)
}

#[test]
fn repeated_answer_is_counted_from_the_cache() {
    let Some(mut ix) = setup("repeated_answer_is_counted_from_the_cache") else {
        return;
    };
    ix.add_pod_addr(pod_v4(0).into(), 100);
    ix.add_pod_addr(pod_v4(1).into(), 101);
    let flow = Flow::v4();
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 3));
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &response);
    let pages = ix.pages();
    assert_eq!(pages.len(), 1, "one page per netns, service, family");
    assert_eq!(
        pages[0].0,
        ObservationKey {
            netns_cookie: netns_cookie(),
            service_id: SERVICE_ID,
            family: 4,
            page: 0,
        }
    );
    let first = learned_ns(&ix, pod_v4(0).into()).expect("learned");

    // The same addresses in another order (servers rotate them): the
    // cached answer matches, counts for the same pods and stamps again.
    let mut rotated = a_records(SERVICE_NAME, 3);
    rotated.rotate_left(1);
    let again = response_msg(SERVICE_NAME, RecordType::A, rotated);
    for _ in 0..3 {
        exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &again);
    }
    assert_eq!(ix.pages().len(), 1);
    assert!(learned_ns(&ix, pod_v4(0).into()).expect("learned") > first);
    let answers = |pod| ix.dns_answers(pod);
    assert_eq!(answers(100), Some(4));
    assert_eq!(answers(101), Some(4));
    assert_eq!(ix.counter(dns_counter::ADDRS_LEARNED), 12);
    assert_eq!(ix.learned(), service_obs((0..3).map(pod_v4)));
}

#[test]
fn another_answer_keeps_what_was_learned() {
    let Some(ix) = setup("another_answer_keeps_what_was_learned") else {
        return;
    };
    let flow = Flow::v4();
    let first = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 3));
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &first);
    let later: Vec<_> = (3..5).map(|i| a(SERVICE_NAME, pod_v4(i))).collect();
    let later = response_msg(SERVICE_NAME, RecordType::A, later);
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &later);
    // Observations outlive the answer that taught them.
    assert_eq!(ix.learned(), service_obs((0..5).map(pod_v4)));
    assert_eq!(ix.pages().len(), 1);
}

#[test]
fn address_relearned_under_the_other_kind_follows_the_latest_answer() {
    let Some(ix) = setup("address_relearned_under_the_other_kind_follows_the_latest_answer") else {
        return;
    };
    let flow = Flow::v4();
    let by_pod = response_msg(POD_NAME, RecordType::A, vec![a(POD_NAME, pod_v4(0))]);
    let by_service = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 2));
    let kind_of = |ip: Ipv4Addr| {
        ix.learned()
            .into_iter()
            .find(|(addr, _, _)| *addr == IpAddr::V4(ip))
            .map(|(_, _, kind)| kind)
    };
    // Both answers stay cached all along: each must still stamp the kind.
    for round in 0..3 {
        exchange(&ix, &flow, POD_NAME, RecordType::A, &by_pod);
        assert_eq!(kind_of(pod_v4(0)), Some(name_kind::POD), "round {round}");
        exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &by_service);
        assert_eq!(
            kind_of(pod_v4(0)),
            Some(name_kind::SERVICE),
            "round {round}"
        );
        assert_eq!(
            kind_of(pod_v4(1)),
            Some(name_kind::SERVICE),
            "round {round}"
        );
    }
    assert_eq!(ix.pages().len(), 1, "both kinds stamp the same page");
}

#[test]
fn address_reused_by_another_service_follows_the_latest_answer() {
    let Some(mut ix) = setup("address_reused_by_another_service_follows_the_latest_answer") else {
        return;
    };
    const OTHER: u32 = 8;
    let other_name = "api.demo.svc.cluster.local";
    ix.add_name_of(other_name, OTHER, name_kind::SERVICE);
    // pod_v4(0) was web's; its IP now belongs to a pod of `api` too.
    ix.add_slot(pod_v4(0).into(), OTHER, 5, 1);
    let flow = Flow::v4();
    let by_web = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 2));
    let by_api = response_msg(other_name, RecordType::A, vec![a(other_name, pod_v4(0))]);
    let service_of = |ix: &Interceptor, ip: Ipv4Addr| {
        ix.learned()
            .into_iter()
            .find(|(addr, _, _)| *addr == IpAddr::V4(ip))
            .map(|(_, service, _)| service)
    };
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &by_web);
    assert_eq!(service_of(&ix, pod_v4(0)), Some(SERVICE_ID));
    exchange(&ix, &flow, other_name, RecordType::A, &by_api);
    assert_eq!(service_of(&ix, pod_v4(0)), Some(OTHER));
    assert_eq!(service_of(&ix, pod_v4(1)), Some(SERVICE_ID));
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &by_web);
    assert_eq!(service_of(&ix, pod_v4(0)), Some(SERVICE_ID));
}

#[test]
fn a_stamp_older_than_the_slot_holder_says_nothing_about_it() {
    let Some(mut ix) = setup("a_stamp_older_than_the_slot_holder_says_nothing_about_it") else {
        return;
    };
    let flow = Flow::v4();
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 2));
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &response);
    // The agent hands pod_v4(0)'s slot to a new address (pod_v4(0) gave
    // it up): what the client learned about pod_v4(0) is not the new one's.
    let newcomer = Ipv4Addr::new(10, 77, 9, 9);
    ix.set_index(
        pod_v4(0).into(),
        AddrIndex {
            pod_id: NO_POD,
            ..AddrIndex::default()
        },
    );
    ix.add_slot(
        newcomer.into(),
        SERVICE_ID,
        0,
        headway::dns_index::monotonic_ns(),
    );
    ix.bump_generation();
    assert_eq!(ix.learned(), service_obs([pod_v4(1)]));
    // Until the client gets it from DNS.
    let answer = response_msg(SERVICE_NAME, RecordType::A, vec![a(SERVICE_NAME, newcomer)]);
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &answer);
    assert_eq!(ix.learned(), service_obs([pod_v4(1), newcomer]));
}

#[test]
fn an_address_without_a_slot_is_not_learned() {
    let Some(ix) = setup("an_address_without_a_slot_is_not_learned") else {
        return;
    };
    // No headless service ever had 10.77.2.1 as an endpoint, so connect()
    // would never look for it: nothing to stamp, nothing to count.
    let stranger = Ipv4Addr::new(10, 77, 2, 1);
    let answers = vec![a(SERVICE_NAME, pod_v4(0)), a(SERVICE_NAME, stranger)];
    let response = response_msg(SERVICE_NAME, RecordType::A, answers);
    exchange(&ix, &Flow::v4(), SERVICE_NAME, RecordType::A, &response);
    assert_eq!(ix.learned(), service_obs([pod_v4(0)]));
    assert_eq!(ix.counter(dns_counter::ADDRS_LEARNED), 1);
}

#[test]
fn evicted_page_is_rebuilt_from_the_next_answer() {
    let Some(mut ix) = setup("evicted_page_is_rebuilt_from_the_next_answer") else {
        return;
    };
    ix.add_pod_addr(pod_v4(0).into(), 100);
    let flow = Flow::v4();
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 2));
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &response);
    ix.evict_pages();
    assert_eq!(ix.learned(), vec![]);
    // The cache in front of the pages keeps both stamps until other keys
    // take their entries (connect() still finds them there).
    assert_eq!(ix.cache_entries().len(), 2, "{:?}", ix.cache_entries());
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &response);
    assert_eq!(ix.learned(), service_obs((0..2).map(pod_v4)));
    assert_eq!(ix.dns_answers(100), Some(2));
}

#[test]
fn answers_count_for_the_new_pod_after_an_address_moves() {
    let Some(mut ix) = setup("answers_count_for_the_new_pod_after_an_address_moves") else {
        return;
    };
    ix.add_pod_addr(pod_v4(0).into(), 100);
    let flow = Flow::v4();
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 1));
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &response);
    // The address now belongs to another pod (reused): the cached pod is
    // stale and must not be counted.
    ix.move_pod_addr(pod_v4(0).into(), 200);
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &response);
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &response);
    let answers = |pod| ix.dns_answers(pod);
    assert_eq!(answers(100), Some(1));
    assert_eq!(answers(200), Some(2));
}

#[test]
fn aaaa_and_a_answers_have_pages_of_their_own() {
    let Some(ix) = setup("aaaa_and_a_answers_have_pages_of_their_own") else {
        return;
    };
    let flow = Flow::v4();
    let v4 = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 2));
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &v4);
    let v6 = pod_v6(1);
    let answer = response_msg(SERVICE_NAME, RecordType::AAAA, vec![aaaa(SERVICE_NAME, v6)]);
    exchange(&ix, &flow, SERVICE_NAME, RecordType::AAAA, &answer);
    exchange(&ix, &flow, SERVICE_NAME, RecordType::A, &v4);
    let families: Vec<_> = ix.pages().iter().map(|(k, _)| k.family).collect();
    assert_eq!(families, vec![4, 6]);
    let mut want = service_obs((0..2).map(pod_v4));
    want.push((IpAddr::V6(v6), SERVICE_ID, name_kind::SERVICE));
    want.sort();
    assert_eq!(ix.learned(), want);
}

#[test]
fn thirty_three_answers_teach_nothing() {
    let Some(ix) = setup("thirty_three_answers_teach_nothing") else {
        return;
    };
    let response = response_msg(SERVICE_NAME, RecordType::A, a_records(SERVICE_NAME, 33));
    exchange(&ix, &Flow::v4(), SERVICE_NAME, RecordType::A, &response);
    assert_eq!(ix.learned(), vec![]);
    assert_eq!(ix.pages(), vec![]);
    assert_eq!(ix.counter(dns_counter::ERR_BAD_HEADER), 1);
}
