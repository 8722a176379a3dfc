//! A real DNS server and resolver setup for tests, answering like CoreDNS
//! does for Kubernetes headless services.
//!
//! - [`Zone`]: the zone file (JSON) the `headway-dns` binary serves, with a
//!   builder. The server re-reads it whenever it changes (written by
//!   [`Zone::write`], which renames a new file into place), so a test
//!   changes answers by writing the zone again (e.g. a pod deleted).
//! - [`Responder`]: the pure query -> response logic of `headway-dns`
//!   (wire format by `hickory-proto`), including the [`MalformedKind`]
//!   responses, crafted byte by byte.
//! - [`start_dns_server`], [`ResolvConf`], [`resolve_in`],
//!   [`run_client_by_name`] and [`dns_query_in`]: running the server in a
//!   test namespace and asking it through glibc (`headway-peer`) or raw
//!   (`headway-dns query`).
//!
//! Network safety (shared/docs/testing.md): the server and every client
//! run inside test namespaces; the binaries refuse non-loopback addresses
//! anywhere else.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use hickory_proto::op::{Edns, Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde::{Deserialize, Serialize};

use crate::peer::{peer_bin, sibling_bin};
use crate::{Cgroup, Child, ConnectReport, NetNs};

/// The port `headway-dns` listens on in [`start_dns_server`].
pub const DNS_PORT: u16 = 53;
/// The zone CoreDNS serves in a default cluster.
pub const DEFAULT_ORIGIN: &str = "cluster.local";
/// CoreDNS's default TTL for the kubernetes plugin.
pub const DEFAULT_TTL: u32 = 5;
/// EDNS payload size we announce (CoreDNS's default since 1.8).
const EDNS_PAYLOAD: u16 = 1232;
/// How many CNAMEs a lookup follows before it gives up (CoreDNS: 8 too).
const MAX_CNAME_CHAIN: usize = 8;
/// Addresses put into crafted responses when the zone has fewer than two of
/// the asked family for the name: inside the default test subnets, so even
/// a client that used them would stay inside the test namespaces.
const FALLBACK_V4: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 77, 254, 1), Ipv4Addr::new(10, 77, 254, 2)];
const FALLBACK_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0xfe, 1),
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0xfe, 2),
];

const DNS_BIN: &str = "headway-dns";
/// Overrides where [`dns_bin`] looks.
const DNS_ENV: &str = "HEADWAY_DNS";
/// Bound for one short-lived client process (resolve, query).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound of one `headway-peer connect --name` attempt: a lookup
/// through the whole search list (glibc: 5 s timeout, 2 tries per query in
/// the worst case, but our server answers at once) plus 4 s connect+answer.
const NAMED_ATTEMPT_BOUND: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Zone file

/// The zone `headway-dns` serves: the JSON zone file, with a builder.
///
/// ```json
/// {"origin": "cluster.local", "ttl": 5, "rotate": false,
///  "records": [{"name": "web.demo.svc.cluster.local", "type": "A", "addr": "10.77.0.10"}],
///  "cnames": [{"name": "alias.demo.svc.cluster.local", "target": "web.demo.svc.cluster.local"}],
///  "malformed": [{"name": "bad-ptr.demo.svc.cluster.local", "kind": "pointer-loop"}]}
/// ```
///
/// Every field may be left out (origin `cluster.local`, TTL 5). Names are
/// matched case-insensitively, with or without a trailing dot, and must lie
/// inside `origin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zone {
    /// The zone apex: names below it are answered (NXDOMAIN if unknown),
    /// names outside it are REFUSED, as CoreDNS does without `forward`.
    #[serde(default = "default_origin")]
    pub origin: String,
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// Rotate the addresses of a name by one on every query for it (per
    /// name and type), like CoreDNS's `loadbalance` plugin. Off: zone order.
    #[serde(default)]
    pub rotate: bool,
    #[serde(default)]
    pub records: Vec<AddrRecord>,
    #[serde(default)]
    pub cnames: Vec<Cname>,
    #[serde(default)]
    pub malformed: Vec<Malformed>,
}

/// An A or AAAA record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrRecord {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: AddrType,
    pub addr: IpAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddrType {
    A,
    #[allow(clippy::upper_case_acronyms)]
    AAAA,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cname {
    pub name: String,
    pub target: String,
}

/// A name whose queries are answered with crafted, broken bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Malformed {
    pub name: String,
    pub kind: MalformedKind,
}

/// What is wrong with the response to a query for a [`Malformed`] name.
///
/// Every crafted response carries the query's ID, echoes its question as
/// asked, comes from the server's address and port 53 to the query's
/// source port, and sets QR and AA (unless said otherwise), so it looks
/// genuine. Its answers are A records (AAAA for an AAAA query) for the
/// name's addresses in the zone, or 10.77.254.1/.2 (fd77::fe:1/:2) if it
/// has fewer than two; the first answer starts right after the question.
/// Over TCP the same bytes are sent (length-prefixed), except for `tc-bit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MalformedKind {
    /// ANCOUNT 2, but the packet ends in the middle of the second answer
    /// (after half of its bytes: inside the TTL for A, inside the address
    /// for AAAA). TC is not set.
    Truncated,
    /// TC=1 with the first answer only (ANCOUNT 1), as CoreDNS truncates
    /// an answer that does not fit. A well-formed packet. Over TCP the
    /// name is answered normally from the zone, so glibc's TCP retry gets
    /// the full answer.
    TcBit,
    /// ANCOUNT 1; the answer's owner name is the label "a" followed by a
    /// pointer back to that label (to the name's own start: an earlier
    /// offset, so a parser that only checks "pointers go backwards" loops).
    PointerLoop,
    /// ANCOUNT 1; the answer's owner name is a pointer to offset 0x3FFF,
    /// far past the end of the packet.
    PointerOutOfPacket,
    /// ANCOUNT 1; the answer's owner name starts with a label of 64 bytes
    /// (length octet 0x40, 64 'a's), then a pointer to the question name.
    LabelTooLong,
    /// ANCOUNT 10, but only 2 (valid) answers follow.
    AncountLie,
    /// ANCOUNT 65535, but only 2 (valid) answers follow.
    HugeAncount,
    /// A well-formed response with 2 answers, except that QR=0.
    NotAResponse,
}

impl MalformedKind {
    pub const ALL: [Self; 8] = [
        Self::Truncated,
        Self::TcBit,
        Self::PointerLoop,
        Self::PointerOutOfPacket,
        Self::LabelTooLong,
        Self::AncountLie,
        Self::HugeAncount,
        Self::NotAResponse,
    ];

    /// The name used in zone files ("pointer-loop").
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::TcBit => "tc-bit",
            Self::PointerLoop => "pointer-loop",
            Self::PointerOutOfPacket => "pointer-out-of-packet",
            Self::LabelTooLong => "label-too-long",
            Self::AncountLie => "ancount-lie",
            Self::HugeAncount => "huge-ancount",
            Self::NotAResponse => "not-a-response",
        }
    }
}

fn default_origin() -> String {
    DEFAULT_ORIGIN.to_owned()
}

fn default_ttl() -> u32 {
    DEFAULT_TTL
}

impl Default for Zone {
    fn default() -> Self {
        Self {
            origin: default_origin(),
            ttl: DEFAULT_TTL,
            rotate: false,
            records: Vec::new(),
            cnames: Vec::new(),
            malformed: Vec::new(),
        }
    }
}

impl Zone {
    /// An empty `cluster.local` zone with TTL 5.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn origin(mut self, origin: &str) -> Self {
        self.origin = origin.to_owned();
        self
    }

    pub fn ttl(mut self, ttl: u32) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn rotate(mut self, rotate: bool) -> Self {
        self.rotate = rotate;
        self
    }

    /// Adds an A record. A name may have several: they are answered
    /// together, in the order added (see [`Zone::rotate`]).
    pub fn a(self, name: &str, ip: Ipv4Addr) -> Self {
        self.addr(name, ip.into())
    }

    /// Adds an AAAA record.
    pub fn aaaa(self, name: &str, ip: Ipv6Addr) -> Self {
        self.addr(name, ip.into())
    }

    /// Adds an A or AAAA record, depending on the address.
    pub fn addr(mut self, name: &str, addr: IpAddr) -> Self {
        let kind = if addr.is_ipv4() {
            AddrType::A
        } else {
            AddrType::AAAA
        };
        self.records.push(AddrRecord {
            name: name.to_owned(),
            kind,
            addr,
        });
        self
    }

    pub fn cname(mut self, name: &str, target: &str) -> Self {
        self.cnames.push(Cname {
            name: name.to_owned(),
            target: target.to_owned(),
        });
        self
    }

    pub fn malformed(mut self, name: &str, kind: MalformedKind) -> Self {
        self.malformed.push(Malformed {
            name: name.to_owned(),
            kind,
        });
        self
    }

    /// Removes every record with this address (under any name): what
    /// deleting a pod does to its service's and its own names.
    pub fn without_addr(mut self, addr: IpAddr) -> Self {
        self.records.retain(|r| r.addr != addr);
        self
    }

    /// Removes everything (records, CNAME, malformed entry) of this name.
    pub fn without_name(mut self, name: &str) -> Self {
        let key = name_key(name);
        self.records.retain(|r| name_key(&r.name) != key);
        self.cnames.retain(|c| name_key(&c.name) != key);
        self.malformed.retain(|m| name_key(&m.name) != key);
        self
    }

    /// Writes the zone file atomically (a new file renamed over `path`), so
    /// the server never reads half a file and always notices the change
    /// (new inode), however quickly the writes follow each other.
    pub fn write(&self, path: &Path) -> Result<()> {
        // Fail here, not in the server.
        ZoneIndex::new(self).context("invalid zone")?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let json = serde_json::to_string_pretty(self)?;
        fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing zone {}", path.display()))
    }
}

/// Lower case, trailing dot: the key names are looked up by.
fn name_key(name: &str) -> String {
    let mut key = name.trim_end_matches('.').to_ascii_lowercase();
    key.push('.');
    key
}

fn parse_name(name: &str) -> Result<Name> {
    let mut parsed = Name::from_ascii(name).with_context(|| format!("bad DNS name {name:?}"))?;
    parsed.set_fqdn(true);
    Ok(parsed)
}

fn key_of(name: &Name) -> String {
    name_key(&name.to_ascii())
}

/// A validated zone, indexed by [`name_key`].
#[derive(Debug)]
struct ZoneIndex {
    origin: Name,
    ttl: u32,
    rotate: bool,
    addrs: HashMap<String, Vec<IpAddr>>,
    cnames: HashMap<String, Name>,
    malformed: HashMap<String, MalformedKind>,
    /// Every owner name and every ancestor of one down to the origin:
    /// names that exist (NOERROR, possibly without data).
    existing: BTreeSet<String>,
}

impl ZoneIndex {
    fn new(zone: &Zone) -> Result<Self> {
        let origin = parse_name(&zone.origin)?;
        let mut index = Self {
            ttl: zone.ttl,
            rotate: zone.rotate,
            addrs: HashMap::new(),
            cnames: HashMap::new(),
            malformed: HashMap::new(),
            existing: BTreeSet::from([key_of(&origin)]),
            origin,
        };
        for record in &zone.records {
            let v4 = record.addr.is_ipv4();
            ensure!(
                v4 == (record.kind == AddrType::A),
                "{} record for {} with address {}",
                if v4 { "AAAA" } else { "A" },
                record.name,
                record.addr
            );
            let key = index.add_name(&record.name)?;
            index.addrs.entry(key).or_default().push(record.addr);
        }
        for cname in &zone.cnames {
            let target = parse_name(&cname.target)?;
            let key = index.add_name(&cname.name)?;
            ensure!(
                index.cnames.insert(key, target).is_none(),
                "two CNAMEs for {}",
                cname.name
            );
        }
        for entry in &zone.malformed {
            let key = index.add_name(&entry.name)?;
            ensure!(
                index.malformed.insert(key, entry.kind).is_none(),
                "two malformed kinds for {}",
                entry.name
            );
        }
        for key in index.cnames.keys() {
            ensure!(
                !index.addrs.contains_key(key),
                "{key} has a CNAME and other data"
            );
        }
        Ok(index)
    }

    /// Checks `name` and records it and its ancestors as existing.
    fn add_name(&mut self, name: &str) -> Result<String> {
        let mut parsed = parse_name(name)?;
        ensure!(
            self.origin.zone_of(&parsed),
            "{name} is outside the zone {}",
            self.origin
        );
        let key = key_of(&parsed);
        while parsed.num_labels() > self.origin.num_labels() {
            self.existing.insert(key_of(&parsed));
            parsed = parsed.base_name();
        }
        Ok(key)
    }

    fn addrs_of(&self, key: &str, ipv6: bool) -> Vec<IpAddr> {
        self.addrs
            .get(key)
            .map(|all| {
                all.iter()
                    .copied()
                    .filter(|a| a.is_ipv6() == ipv6)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn soa(&self) -> Record {
        let origin = self.origin.clone();
        let child = |label: &str| parse_name(&format!("{label}.{origin}")).unwrap_or_default();
        let soa = SOA::new(
            child("ns.dns"),
            child("hostmaster"),
            1,
            7200,
            1800,
            86400,
            self.ttl,
        );
        Record::from_rdata(origin, self.ttl, RData::SOA(soa))
    }
}

// ---------------------------------------------------------------------------
// Responder

/// The answer to one query, with a line for the server's log.
#[derive(Debug, Clone)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub summary: String,
}

/// Turns queries into responses for one zone, like CoreDNS's kubernetes
/// plugin: all addresses of a name in one answer section (optionally
/// rotated), A and AAAA asked separately, NXDOMAIN (with the SOA) for
/// unknown names in the zone, NOERROR without data (with the SOA) for
/// names that exist without the asked type, CNAMEs followed inside the
/// zone, names matched case-insensitively with the question echoed as
/// asked, AA set. Queries for [`Malformed`] names get crafted bytes.
#[derive(Debug)]
pub struct Responder {
    zone: ZoneIndex,
    /// Per (name, type): how many answers were given, for rotation. Kept
    /// across zone reloads.
    rotation: HashMap<(String, RecordType), usize>,
}

impl Responder {
    pub fn new(zone: &Zone) -> Result<Self> {
        Ok(Self {
            zone: ZoneIndex::new(zone)?,
            rotation: HashMap::new(),
        })
    }

    /// Replaces the zone (a reload); rotation counters carry on.
    pub fn set_zone(&mut self, zone: &Zone) -> Result<()> {
        self.zone = ZoneIndex::new(zone)?;
        Ok(())
    }

    /// The response to `query`, or `None` if it deserves none (not a
    /// query, or too short to carry an ID). `udp` selects the size limit
    /// (512 bytes, or the EDNS payload size) and the `tc-bit` behaviour.
    pub fn respond(&mut self, query: &[u8], udp: bool) -> Option<Reply> {
        if query.len() < 12 || query[2] & 0x80 != 0 {
            return None;
        }
        let request = match Message::from_vec(query) {
            Ok(request) => request,
            Err(e) => {
                let id = u16::from_be_bytes([query[0], query[1]]);
                let summary = format!("undecodable query ({e}) -> FORMERR");
                return Some(error_reply(id, ResponseCode::FormErr, summary));
            }
        };
        let id = request.metadata.id;
        if request.metadata.op_code != OpCode::Query {
            let summary = format!("opcode {:?} -> NOTIMP", request.metadata.op_code);
            return Some(error_reply(id, ResponseCode::NotImp, summary));
        }
        let [question] = request.queries.as_slice() else {
            let summary = format!("{} questions -> FORMERR", request.queries.len());
            return Some(error_reply(id, ResponseCode::FormErr, summary));
        };
        let (qname, qtype) = (question.name(), question.query_type());
        let prefix = format!("{qname} {qtype}");
        let key = key_of(qname);

        if let Some(&kind) = self.zone.malformed.get(&key)
            && (udp || kind != MalformedKind::TcBit)
            && let Some(raw_question) = raw_question(query)
        {
            let ipv6 = qtype == RecordType::AAAA;
            let addrs = crafted_addrs(&self.zone.addrs_of(&key, ipv6), ipv6);
            let rd = request.metadata.recursion_desired;
            let bytes = craft(kind, id, rd, raw_question, addrs, self.zone.ttl);
            let summary = format!("{prefix} -> malformed {}", kind.as_str());
            return Some(Reply { bytes, summary });
        }

        let mut response = Message::response(id, OpCode::Query);
        response.metadata.authoritative = true;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.checking_disabled = request.metadata.checking_disabled;
        response.add_query(question.clone());
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            response.set_edns(edns);
        }

        if !self.zone.origin.zone_of(qname) {
            response.metadata.response_code = ResponseCode::Refused;
            response.metadata.authoritative = false;
        } else {
            self.answer(&mut response, qname, qtype);
        }

        let limit = if udp {
            request
                .edns
                .as_ref()
                .map_or(512, |e| e.max_payload().max(512))
        } else {
            u16::MAX
        };
        let bytes = match encode_within(&mut response, limit.into()) {
            Ok(bytes) => bytes,
            Err(e) => {
                let summary = format!("{prefix} -> SERVFAIL (encoding: {e})");
                return Some(error_reply(id, ResponseCode::ServFail, summary));
            }
        };
        let summary = format!(
            "{prefix} -> {:?}, {} answers{}",
            response.metadata.response_code,
            response.answers.len(),
            if response.metadata.truncation {
                " (truncated)"
            } else {
                ""
            }
        );
        Some(Reply { bytes, summary })
    }

    /// Fills answers, authority and the response code for a name inside
    /// the zone.
    fn answer(&mut self, response: &mut Message, qname: &Name, qtype: RecordType) {
        let zone = &self.zone;
        let ttl = zone.ttl;
        // Owner names: the question as asked, then the CNAME targets as
        // written in the zone.
        let mut owner = qname.clone();
        let mut key = key_of(qname);
        let mut inside = true;
        if qtype != RecordType::CNAME {
            for _ in 0..MAX_CNAME_CHAIN {
                let Some(target) = zone.cnames.get(&key) else {
                    break;
                };
                let rdata = RData::CNAME(CNAME(target.clone()));
                response.add_answer(Record::from_rdata(owner, ttl, rdata));
                owner = target.clone();
                key = key_of(target);
                if !zone.origin.zone_of(target) {
                    // Not ours to answer; a recursive resolver would go on.
                    inside = false;
                    break;
                }
            }
        }
        if !inside {
            return;
        }

        let mut data = Vec::new();
        match qtype {
            RecordType::A | RecordType::AAAA | RecordType::ANY => {
                let mut addrs = Vec::new();
                if qtype != RecordType::AAAA {
                    addrs.extend(zone.addrs_of(&key, false));
                }
                if qtype != RecordType::A {
                    addrs.extend(zone.addrs_of(&key, true));
                }
                if zone.rotate && !addrs.is_empty() {
                    let turns = self.rotation.entry((key.clone(), qtype)).or_default();
                    let len = addrs.len();
                    addrs.rotate_left(*turns % len);
                    *turns += 1;
                }
                data.extend(addrs.into_iter().map(|addr| {
                    let rdata = match addr {
                        IpAddr::V4(v4) => RData::A(A(v4)),
                        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                    };
                    Record::from_rdata(owner.clone(), ttl, rdata)
                }));
            }
            RecordType::CNAME => {
                if let Some(target) = zone.cnames.get(&key) {
                    let rdata = RData::CNAME(CNAME(target.clone()));
                    data.push(Record::from_rdata(owner.clone(), ttl, rdata));
                }
            }
            RecordType::SOA if key == key_of(&zone.origin) => data.push(zone.soa()),
            _ => {}
        }
        if data.is_empty() {
            if !zone.existing.contains(&key) {
                response.metadata.response_code = ResponseCode::NXDomain;
            }
            response.add_authority(zone.soa());
        }
        response.add_answers(data);
    }
}

/// Encodes `response`; if it is longer than `limit`, drops answers from
/// the end (and the authority) until it fits and sets TC, as CoreDNS does.
fn encode_within(response: &mut Message, limit: usize) -> Result<Vec<u8>> {
    loop {
        let bytes = response.to_vec()?;
        if bytes.len() <= limit {
            return Ok(bytes);
        }
        response.metadata.truncation = true;
        response.authorities.clear();
        if response.answers.pop().is_none() {
            bail!("{} bytes without any answer", bytes.len());
        }
    }
}

fn error_reply(id: u16, code: ResponseCode, summary: String) -> Reply {
    let message = Message::error_msg(id, OpCode::Query, code);
    let bytes = message.to_vec().unwrap_or_else(|_| {
        // A bare header cannot fail to encode; keep a fallback anyway.
        let mut header = id.to_be_bytes().to_vec();
        header.extend([0x80, u16::from(code) as u8, 0, 0, 0, 0, 0, 0, 0, 0]);
        header
    });
    Reply { bytes, summary }
}

// ---------------------------------------------------------------------------
// Crafted responses

/// Header flag bits.
const QR: u16 = 0x8000;
const AA: u16 = 0x0400;
const TC: u16 = 0x0200;
const RD: u16 = 0x0100;
const HEADER_LEN: usize = 12;
/// Offset of the question name: where answer names point to.
const QNAME_POINTER: [u8; 2] = [0xC0, HEADER_LEN as u8];

/// The raw question section of a query (name as asked, type, class),
/// which a query has right after the header and without compression.
fn raw_question(query: &[u8]) -> Option<&[u8]> {
    let mut pos = HEADER_LEN;
    loop {
        let len = usize::from(*query.get(pos)?);
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        pos += 1 + len;
    }
    query.get(HEADER_LEN..pos + 1 + 4)
}

/// Two addresses of one family: the zone's first two, topped up with the
/// fallbacks.
fn crafted_addrs(zone_addrs: &[IpAddr], ipv6: bool) -> [IpAddr; 2] {
    let fallbacks: [IpAddr; 2] = if ipv6 {
        FALLBACK_V6.map(IpAddr::V6)
    } else {
        FALLBACK_V4.map(IpAddr::V4)
    };
    let mut addrs = zone_addrs.to_vec();
    for fallback in fallbacks {
        if !addrs.contains(&fallback) {
            addrs.push(fallback);
        }
    }
    [addrs[0], addrs[1]]
}

fn header(id: u16, flags: u16, qdcount: u16, ancount: u16) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(512);
    for word in [id, flags, qdcount, ancount, 0, 0] {
        bytes.extend(word.to_be_bytes());
    }
    bytes
}

/// One resource record: `name` (raw wire bytes), type A or AAAA by the
/// address, class IN.
fn answer_rr(name: &[u8], addr: IpAddr, ttl: u32) -> Vec<u8> {
    let (rtype, rdata): (u16, Vec<u8>) = match addr {
        IpAddr::V4(v4) => (1, v4.octets().to_vec()),
        IpAddr::V6(v6) => (28, v6.octets().to_vec()),
    };
    let mut rr = name.to_vec();
    rr.extend(rtype.to_be_bytes());
    rr.extend(1u16.to_be_bytes());
    rr.extend(ttl.to_be_bytes());
    rr.extend((rdata.len() as u16).to_be_bytes());
    rr.extend(rdata);
    rr
}

/// The bytes of a [`MalformedKind`] response; see its variants.
fn craft(
    kind: MalformedKind,
    id: u16,
    rd: bool,
    question: &[u8],
    addrs: [IpAddr; 2],
    ttl: u32,
) -> Vec<u8> {
    let flags = QR | AA | if rd { RD } else { 0 };
    let valid = |i: usize| answer_rr(&QNAME_POINTER, addrs[i], ttl);
    let with_answers = |flags: u16, ancount: u16, answers: &[Vec<u8>]| {
        let mut bytes = header(id, flags, 1, ancount);
        bytes.extend(question);
        for answer in answers {
            bytes.extend(answer);
        }
        bytes
    };
    // Where the first answer starts.
    let first = HEADER_LEN + question.len();
    match kind {
        MalformedKind::Truncated => {
            let second = valid(1);
            let mut bytes = with_answers(flags, 2, &[valid(0), second.clone()]);
            bytes.truncate(bytes.len() - second.len() / 2);
            bytes
        }
        MalformedKind::TcBit => with_answers(flags | TC, 1, &[valid(0)]),
        MalformedKind::PointerLoop => {
            let [hi, lo] = (0xC000 | first as u16).to_be_bytes();
            let name = [1, b'a', hi, lo];
            with_answers(flags, 1, &[answer_rr(&name, addrs[0], ttl)])
        }
        MalformedKind::PointerOutOfPacket => {
            let name = [0xFF, 0xFF];
            with_answers(flags, 1, &[answer_rr(&name, addrs[0], ttl)])
        }
        MalformedKind::LabelTooLong => {
            let mut name = vec![64];
            name.extend([b'a'; 64]);
            name.extend(QNAME_POINTER);
            with_answers(flags, 1, &[answer_rr(&name, addrs[0], ttl)])
        }
        MalformedKind::AncountLie => with_answers(flags, 10, &[valid(0), valid(1)]),
        MalformedKind::HugeAncount => with_answers(flags, u16::MAX, &[valid(0), valid(1)]),
        MalformedKind::NotAResponse => with_answers(flags & !QR, 2, &[valid(0), valid(1)]),
    }
}

// ---------------------------------------------------------------------------
// A zone file that is re-read when it changes

/// The zone file behind a [`Responder`]: [`ZoneFile::responder`] re-reads
/// it whenever its inode, size or mtime changed since the last read.
#[derive(Debug)]
pub struct ZoneFile {
    path: PathBuf,
    stamp: Stamp,
    responder: Responder,
}

type Stamp = (u64, u64, u64, i64, i64);

fn stamp(path: &Path) -> io::Result<Stamp> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

impl ZoneFile {
    /// Reads the zone; fails if it is missing or invalid.
    pub fn open(path: &Path) -> Result<Self> {
        let stamp = stamp(path).with_context(|| format!("stat {}", path.display()))?;
        let responder = Responder::new(&Zone::load(path)?)?;
        Ok(Self {
            path: path.to_owned(),
            stamp,
            responder,
        })
    }

    /// The responder for the current zone. A zone that cannot be read
    /// (yet) leaves the previous one in place; the error is returned next
    /// to it, for the log.
    pub fn responder(&mut self) -> (&mut Responder, Option<anyhow::Error>) {
        let error = self.reload().err();
        (&mut self.responder, error)
    }

    fn reload(&mut self) -> Result<()> {
        let now = stamp(&self.path).with_context(|| format!("stat {}", self.path.display()))?;
        if now == self.stamp {
            return Ok(());
        }
        let zone = Zone::load(&self.path)?;
        self.responder.set_zone(&zone)?;
        self.stamp = now;
        eprintln!("headway-dns: reloaded {}", self.path.display());
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Running the server and clients in test namespaces

/// The `headway-dns` binary next to the running executable (see
/// [`crate::peer_bin`]); `HEADWAY_DNS=/path` overrides the search.
pub fn dns_bin() -> Result<PathBuf> {
    sibling_bin(DNS_BIN, DNS_ENV, "cargo build -p headway-testbed --bins")
}

/// Starts `headway-dns --zone ZONE --listen LISTEN:53` (UDP and TCP) in
/// `ns` and waits until it is bound. Dropping the child stops it. `listen`
/// may be `::` (both families) or `0.0.0.0`.
pub fn start_dns_server(ns: &NetNs, zone_path: &Path, listen: IpAddr) -> Result<Child> {
    let mut cmd = Command::new(dns_bin()?);
    cmd.arg("--zone")
        .arg(zone_path)
        .arg("--listen")
        .arg(SocketAddr::new(listen, DNS_PORT).to_string());
    let mut child = ns.spawn(None, &cmd)?;
    child.wait_ready()?;
    Ok(child)
}

/// The resolver configuration of one network namespace, like the kubelet
/// writes for a pod: `/etc/netns/NAME/resolv.conf` with the nameserver,
/// the search list and `options ndots:5`. `ip netns exec` (and so
/// [`NetNs::spawn`]) bind-mounts it over /etc/resolv.conf for processes it
/// starts from then on.
///
/// Also writes `/etc/netns/NAME/nsswitch.conf`: the host's, with the
/// `hosts:` line set to `files dns`, so glibc asks exactly this nameserver
/// (and never e.g. a host's systemd-resolved, which would forward the
/// query out of the machine).
///
/// Dropping it removes both files and the directory (and /etc/netns if it
/// created it and it is empty).
#[derive(Debug)]
pub struct ResolvConf {
    dir: PathBuf,
    created_parent: bool,
}

const NETNS_ETC: &str = "/etc/netns";

impl ResolvConf {
    pub fn new(ns: &NetNs, nameserver: IpAddr, search: &[&str]) -> Result<Self> {
        let parent = Path::new(NETNS_ETC);
        let created_parent = match fs::create_dir(parent) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e).context("creating /etc/netns"),
        };
        let dir = parent.join(ns.name());
        if let Err(e) = fs::create_dir(&dir) {
            if created_parent {
                let _ = fs::remove_dir(parent);
            }
            return Err(e).with_context(|| format!("creating {}", dir.display()));
        }
        // From here on, dropping the guard cleans up whatever was written.
        let guard = Self {
            dir,
            created_parent,
        };
        fs::write(
            guard.dir.join("resolv.conf"),
            resolv_conf(nameserver, search),
        )?;
        let host = fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
        fs::write(guard.dir.join("nsswitch.conf"), nsswitch_conf(&host))?;
        Ok(guard)
    }

    /// The directory `/etc/netns/NAME`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        for file in ["resolv.conf", "nsswitch.conf"] {
            let _ = fs::remove_file(self.dir.join(file));
        }
        if let Err(e) = fs::remove_dir(&self.dir) {
            eprintln!("headway-testbed: removing {}: {e}", self.dir.display());
        }
        if self.created_parent {
            // Fails (and stays) if another test uses it meanwhile.
            let _ = fs::remove_dir(NETNS_ETC);
        }
    }
}

fn resolv_conf(nameserver: IpAddr, search: &[&str]) -> String {
    let mut text = format!("# written by headway-testbed\nnameserver {nameserver}\n");
    if !search.is_empty() {
        text.push_str(&format!("search {}\n", search.join(" ")));
    }
    text.push_str("options ndots:5\n");
    text
}

fn nsswitch_conf(host: &str) -> String {
    let mut lines: Vec<String> = host
        .lines()
        .filter(|l| !l.trim_start().starts_with("hosts:"))
        .map(str::to_owned)
        .collect();
    lines.push("hosts: files dns".to_owned());
    lines.join("\n") + "\n"
}

/// What `headway-peer resolve --name NAME` saw: the addresses glibc's
/// getaddrinfo returned, in its order, or its error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolveReport {
    pub name: String,
    pub addrs: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Runs `headway-peer resolve --name NAME` in `ns` (see [`ResolvConf`]).
/// A failed lookup is a report with `error` set, not an `Err`.
pub fn resolve_in(ns: &NetNs, cgroup: Option<&Cgroup>, name: &str) -> Result<ResolveReport> {
    let mut cmd = Command::new(peer_bin()?);
    cmd.args(["resolve", "--name", name]);
    let mut child = ns.spawn(cgroup, &cmd)?;
    let (_status, stdout) = child.wait_output(CLIENT_TIMEOUT)?;
    serde_json::from_str(&stdout).with_context(|| format!("parsing resolve report {stdout:?}"))
}

/// What `headway-peer connect --name --json` saw.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedConnectReport {
    #[serde(flatten)]
    pub report: ConnectReport,
    /// The address each attempt connected to (the first getaddrinfo
    /// returned, of the asked family) -> number of attempts.
    #[serde(default)]
    pub resolved: BTreeMap<String, u64>,
}

/// Runs `headway-peer connect --name NAME` in `ns` and, if given, `cgroup`:
/// `count` attempts, each resolving `name` anew (glibc) and connecting to
/// the first address (of `family` 4 or 6, if given).
pub fn run_client_by_name(
    ns: &NetNs,
    cgroup: Option<&Cgroup>,
    name: &str,
    port: u16,
    count: u32,
    udp: bool,
    family: Option<u8>,
) -> Result<NamedConnectReport> {
    let mut cmd = Command::new(peer_bin()?);
    cmd.args(["connect", "--json", "--name", name]).args([
        "--port",
        &port.to_string(),
        "--count",
        &count.to_string(),
    ]);
    if udp {
        cmd.arg("--udp");
    }
    if let Some(family) = family {
        cmd.args(["--family", &family.to_string()]);
    }
    let mut child = ns.spawn(cgroup, &cmd)?;
    let bound = NAMED_ATTEMPT_BOUND * count + Duration::from_secs(10);
    let (status, stdout) = child.wait_output(bound)?;
    if !status.success() {
        bail!("{} failed ({status}); stdout: {stdout}", child.label());
    }
    serde_json::from_str(&stdout).with_context(|| format!("parsing connect report {stdout:?}"))
}

/// One raw exchange made by `headway-dns query`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawExchange {
    /// The ID of the query sent.
    pub id: u16,
    /// The response, as received (without the TCP length prefix), in hex.
    pub response: String,
}

impl RawExchange {
    pub fn bytes(&self) -> Result<Vec<u8>> {
        from_hex(&self.response)
    }
}

/// Sends one query (`qtype` like "A", "AAAA") for `name` to `server`:53
/// from inside `ns` with `headway-dns query`, and returns the raw response.
pub fn dns_query_in(
    ns: &NetNs,
    server: IpAddr,
    name: &str,
    qtype: &str,
    tcp: bool,
) -> Result<RawExchange> {
    let mut cmd = Command::new(dns_bin()?);
    cmd.args(["query", "--server", &server.to_string()])
        .args(["--name", name, "--type", qtype]);
    if tcp {
        cmd.arg("--tcp");
    }
    let mut child = ns.spawn(None, &cmd)?;
    let (status, stdout) = child.wait_output(CLIENT_TIMEOUT)?;
    if !status.success() {
        bail!("{} failed ({status}); stdout: {stdout}", child.label());
    }
    serde_json::from_str(&stdout).with_context(|| format!("parsing query output {stdout:?}"))
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(text: &str) -> Result<Vec<u8>> {
    ensure!(text.len().is_multiple_of(2), "odd-length hex");
    (0..text.len())
        .step_by(2)
        .map(|i| {
            let pair = text.get(i..i + 2).context("non-ASCII hex")?;
            u8::from_str_radix(pair, 16).with_context(|| format!("bad hex {pair:?}"))
        })
        .collect()
}

/// Whether our network namespace is one of those under /run/netns (made
/// with `ip netns add`). The binaries refuse non-loopback addresses
/// otherwise. (Comparing with pid 1's namespace would be simpler, but
/// sandboxes often hide it.)
pub fn in_named_netns() -> bool {
    let Ok(ours) = fs::metadata("/proc/self/ns/net") else {
        return false;
    };
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return false;
    };
    entries
        .filter_map(|e| fs::metadata(e.ok()?.path()).ok())
        .any(|m| (m.dev(), m.ino()) == (ours.dev(), ours.ino()))
}

/// Decodes a response only as far as the header: (flags, QDCOUNT,
/// ANCOUNT, NSCOUNT, ARCOUNT).
pub fn header_fields(bytes: &[u8]) -> Option<(u16, [u16; 4])> {
    let word = |i: usize| Some(u16::from_be_bytes([*bytes.get(i)?, *bytes.get(i + 1)?]));
    Some((word(2)?, [word(4)?, word(6)?, word(8)?, word(10)?]))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use hickory_proto::op::{MessageType, Query};
    use hickory_proto::rr::RecordType;
    use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

    use super::*;
    use crate::{Cluster, require_root, start_pod_servers};

    const SVC: &str = "web.demo.svc.cluster.local";
    const POD0: &str = "web-0.web.demo.svc.cluster.local";
    const POD1: &str = "web-1.web.demo.svc.cluster.local";
    const ALIAS: &str = "alias.demo.svc.cluster.local";
    const PORT: u16 = 8080;

    fn v4(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, last)
    }

    fn v6(last: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, last)
    }

    fn malformed_name(kind: MalformedKind) -> String {
        format!("{}.demo.svc.cluster.local", kind.as_str())
    }

    /// Two pods behind a headless service, a CNAME, and one name per
    /// malformed kind; `tc-bit` has the service's addresses.
    fn test_zone() -> Zone {
        let mut zone = Zone::new()
            .a(SVC, v4(10))
            .a(SVC, v4(11))
            .aaaa(SVC, v6(0x10))
            .aaaa(SVC, v6(0x11))
            .a(POD0, v4(10))
            .aaaa(POD0, v6(0x10))
            .a(POD1, v4(11))
            .aaaa(POD1, v6(0x11))
            .cname(ALIAS, SVC);
        for kind in MalformedKind::ALL {
            zone = zone.malformed(&malformed_name(kind), kind);
        }
        zone.a(&malformed_name(MalformedKind::TcBit), v4(10))
            .a(&malformed_name(MalformedKind::TcBit), v4(11))
    }

    fn query_bytes(name: &str, qtype: RecordType, edns: bool) -> (u16, Vec<u8>) {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if edns {
            message.set_edns(Edns::new());
        }
        (message.metadata.id, message.to_vec().unwrap())
    }

    fn ask(responder: &mut Responder, name: &str, qtype: RecordType) -> Message {
        let (id, query) = query_bytes(name, qtype, false);
        let reply = responder.respond(&query, true).expect("a reply");
        let message = Message::from_vec(&reply.bytes).expect("a well-formed reply");
        assert_eq!(message.metadata.id, id);
        message
    }

    fn answer_addrs(message: &Message) -> Vec<IpAddr> {
        message
            .answers
            .iter()
            .filter_map(|r| r.data.ip_addr())
            .collect()
    }

    /// Checks that `bytes` answer the query `query` (ID, question echoed as
    /// asked) and are broken exactly as `kind` says.
    fn check_malformed(kind: MalformedKind, query: &[u8], bytes: &[u8]) {
        let ctx = format!("{kind:?}: {}", to_hex(bytes));
        let question = raw_question(query).expect("query has a question");
        let first = HEADER_LEN + question.len();
        assert_eq!(bytes[..2], query[..2], "ID, {ctx}");
        assert_eq!(&bytes[HEADER_LEN..first], question, "question, {ctx}");
        let (flags, [qd, an, ns, ar]) = header_fields(bytes).expect("a header");
        assert_eq!((qd, ns, ar), (1, 0, 0), "{ctx}");
        let expect_qr = kind != MalformedKind::NotAResponse;
        assert_eq!(flags & QR != 0, expect_qr, "QR, {ctx}");
        assert_eq!(flags & TC != 0, kind == MalformedKind::TcBit, "TC, {ctx}");
        let parsed = Message::from_vec(bytes);
        // One valid answer (16 bytes for A: pointer, type, class, TTL,
        // length, address) decoded at `at`.
        let valid_at = |at: usize| {
            let mut decoder = BinDecoder::new(bytes);
            decoder.read_slice(at).unwrap();
            let record = Record::read(&mut decoder).expect("a valid answer");
            assert!(record.data.ip_addr().is_some(), "{ctx}");
            decoder.index()
        };
        match kind {
            MalformedKind::Truncated => {
                assert_eq!(an, 2, "{ctx}");
                assert!(parsed.is_err(), "{ctx}");
                let second = valid_at(first);
                assert!(bytes.len() > second && bytes.len() < second + 16, "{ctx}");
            }
            MalformedKind::TcBit => {
                let message = parsed.expect("tc-bit is well-formed");
                assert!(message.metadata.truncation, "{ctx}");
                assert_eq!(message.answers.len(), 1, "{ctx}");
            }
            MalformedKind::PointerLoop => {
                assert_eq!(an, 1, "{ctx}");
                assert!(parsed.is_err(), "{ctx}");
                let target = (0xC000 | first as u16).to_be_bytes();
                assert_eq!(
                    bytes[first..first + 4],
                    [1, b'a', target[0], target[1]],
                    "{ctx}"
                );
            }
            MalformedKind::PointerOutOfPacket => {
                assert_eq!(an, 1, "{ctx}");
                assert!(parsed.is_err(), "{ctx}");
                let pointer = u16::from_be_bytes([bytes[first], bytes[first + 1]]);
                assert_eq!(pointer & 0xC000, 0xC000, "{ctx}");
                assert!(usize::from(pointer & 0x3FFF) >= bytes.len(), "{ctx}");
            }
            MalformedKind::LabelTooLong => {
                assert_eq!(an, 1, "{ctx}");
                assert!(parsed.is_err(), "{ctx}");
                assert_eq!(bytes[first], 64, "{ctx}");
                assert!(
                    bytes[first + 1..first + 65].iter().all(|&b| b == b'a'),
                    "{ctx}"
                );
            }
            MalformedKind::AncountLie | MalformedKind::HugeAncount => {
                let lie = if kind == MalformedKind::AncountLie {
                    10
                } else {
                    u16::MAX
                };
                assert_eq!(an, lie, "{ctx}");
                assert!(parsed.is_err(), "{ctx}");
                let end = valid_at(valid_at(first));
                assert_eq!(end, bytes.len(), "exactly two answers, {ctx}");
            }
            MalformedKind::NotAResponse => {
                let message = parsed.expect("not-a-response is well-formed");
                assert_eq!(message.metadata.message_type, MessageType::Query, "{ctx}");
                assert_eq!(message.answers.len(), 2, "{ctx}");
            }
        }
    }

    // --- unit tests: no root needed -------------------------------------

    #[test]
    fn zone_file_format_parses() {
        let json = r#"{"records": [{"name": "web.demo.svc.cluster.local", "type": "A", "addr": "10.77.0.10"},
                                   {"name": "web.demo.svc.cluster.local", "type": "AAAA", "addr": "fd77::10"}],
                       "cnames": [{"name": "alias.demo.svc.cluster.local", "target": "web.demo.svc.cluster.local"}],
                       "ttl": 5,
                       "malformed": [{"name": "bad-ptr.demo.svc.cluster.local", "kind": "pointer-loop"},
                                     {"name": "x.demo.svc.cluster.local", "kind": "pointer-out-of-packet"}]}"#;
        let zone: Zone = serde_json::from_str(json).unwrap();
        let expected = Zone::new()
            .a(SVC, v4(10))
            .aaaa(SVC, v6(0x10))
            .cname(ALIAS, SVC)
            .malformed("bad-ptr.demo.svc.cluster.local", MalformedKind::PointerLoop)
            .malformed(
                "x.demo.svc.cluster.local",
                MalformedKind::PointerOutOfPacket,
            );
        assert_eq!(zone, expected);
        Responder::new(&zone).unwrap();
        let back: Zone = serde_json::from_str(&serde_json::to_string(&zone).unwrap()).unwrap();
        assert_eq!(back, zone);
    }

    #[test]
    fn invalid_zones_are_rejected() {
        let outside = Zone::new().a("web.example.com", v4(1));
        assert!(Responder::new(&outside).is_err());
        let mut wrong_family = Zone::new().a(SVC, v4(1));
        wrong_family.records[0].addr = v6(1).into();
        assert!(Responder::new(&wrong_family).is_err());
        let cname_and_data = Zone::new().a(SVC, v4(1)).cname(SVC, POD0);
        assert!(Responder::new(&cname_and_data).is_err());
        let long_label = format!("{}.cluster.local", "a".repeat(64));
        assert!(Responder::new(&Zone::new().a(&long_label, v4(1))).is_err());
    }

    #[test]
    fn service_name_gets_every_address_of_the_asked_family() {
        let mut responder = Responder::new(&test_zone()).unwrap();
        let a = ask(&mut responder, SVC, RecordType::A);
        assert_eq!(a.metadata.message_type, MessageType::Response);
        assert!(a.metadata.authoritative);
        assert!(a.metadata.recursion_desired);
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert_eq!(answer_addrs(&a), [IpAddr::from(v4(10)), v4(11).into()]);
        assert!(a.answers.iter().all(|r| r.ttl == DEFAULT_TTL));
        assert_eq!(a.queries.len(), 1);
        let aaaa = ask(&mut responder, SVC, RecordType::AAAA);
        assert_eq!(
            answer_addrs(&aaaa),
            [IpAddr::from(v6(0x10)), v6(0x11).into()]
        );
        let pod = ask(&mut responder, POD1, RecordType::A);
        assert_eq!(answer_addrs(&pod), [IpAddr::from(v4(11))]);
        // No rotation unless asked for: zone order every time.
        let again = ask(&mut responder, SVC, RecordType::A);
        assert_eq!(answer_addrs(&again), answer_addrs(&a));
    }

    #[test]
    fn names_match_case_insensitively_and_echo_the_question() {
        let mut responder = Responder::new(&test_zone()).unwrap();
        let asked = Name::from_ascii("WeB.Demo.SVC.cluster.LOCAL.").unwrap();
        let reply = ask(&mut responder, "WeB.Demo.SVC.cluster.LOCAL.", RecordType::A);
        assert_eq!(reply.answers.len(), 2);
        assert!(reply.queries[0].name().eq_case(&asked));
        assert!(reply.answers.iter().all(|r| r.name.eq_case(&asked)));
    }

    #[test]
    fn unknown_names_get_nxdomain_and_known_ones_nodata() {
        let mut responder = Responder::new(&Zone::new().a(SVC, v4(10))).unwrap();
        let soa_only = |m: &Message| {
            m.answers.is_empty()
                && m.authorities.len() == 1
                && m.authorities[0].record_type() == RecordType::SOA
        };
        let unknown = ask(&mut responder, "nope.demo.svc.cluster.local", RecordType::A);
        assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
        assert!(unknown.metadata.authoritative && soa_only(&unknown));
        // The search list's first candidates, as glibc sends them.
        let searched = ask(
            &mut responder,
            &format!("{SVC}.demo.svc.cluster.local"),
            RecordType::A,
        );
        assert_eq!(searched.metadata.response_code, ResponseCode::NXDomain);
        for (name, qtype) in [
            (SVC, RecordType::AAAA),
            (SVC, RecordType::TXT),
            ("demo.svc.cluster.local", RecordType::A),
            ("cluster.local", RecordType::A),
        ] {
            let nodata = ask(&mut responder, name, qtype);
            assert_eq!(
                nodata.metadata.response_code,
                ResponseCode::NoError,
                "{name} {qtype}"
            );
            assert!(soa_only(&nodata), "{name} {qtype}");
        }
        let soa = ask(&mut responder, "cluster.local", RecordType::SOA);
        assert_eq!(soa.answers.len(), 1);
        let outside = ask(&mut responder, "example.com", RecordType::A);
        assert_eq!(outside.metadata.response_code, ResponseCode::Refused);
        assert!(outside.answers.is_empty());
    }

    #[test]
    fn cnames_are_followed_inside_the_zone() {
        let zone = test_zone().cname("out.demo.svc.cluster.local", "example.com");
        let mut responder = Responder::new(&zone).unwrap();
        let reply = ask(&mut responder, ALIAS, RecordType::A);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        let types: Vec<RecordType> = reply.answers.iter().map(Record::record_type).collect();
        assert_eq!(types, [RecordType::CNAME, RecordType::A, RecordType::A]);
        assert_eq!(reply.answers[1].name, parse_name(SVC).unwrap());
        let cname = ask(&mut responder, ALIAS, RecordType::CNAME);
        assert_eq!(cname.answers.len(), 1);
        let out = ask(&mut responder, "out.demo.svc.cluster.local", RecordType::A);
        assert_eq!(out.metadata.response_code, ResponseCode::NoError);
        assert_eq!(out.answers.len(), 1);
    }

    #[test]
    fn rotation_turns_the_answer_per_query() {
        let mut responder = Responder::new(&test_zone().rotate(true)).unwrap();
        let firsts: Vec<IpAddr> = (0..4)
            .map(|_| answer_addrs(&ask(&mut responder, SVC, RecordType::A))[0])
            .collect();
        let (a, b) = (IpAddr::from(v4(10)), IpAddr::from(v4(11)));
        assert_eq!(firsts, [a, b, a, b]);
        // Per name and type: AAAA queries do not turn the A answers.
        ask(&mut responder, SVC, RecordType::AAAA);
        assert_eq!(answer_addrs(&ask(&mut responder, SVC, RecordType::A))[0], a);
    }

    #[test]
    fn edns_is_answered_and_big_answers_are_truncated_over_udp() {
        let mut zone = Zone::new();
        for i in 0..100 {
            zone = zone.a(SVC, Ipv4Addr::new(10, 77, 1, i));
        }
        let mut responder = Responder::new(&zone).unwrap();
        let (_, plain) = query_bytes(SVC, RecordType::A, false);
        let udp = Message::from_vec(&responder.respond(&plain, true).unwrap().bytes).unwrap();
        assert!(udp.metadata.truncation);
        assert!(!udp.answers.is_empty() && udp.answers.len() < 100);
        assert!(udp.to_vec().unwrap().len() <= 512);
        let tcp = Message::from_vec(&responder.respond(&plain, false).unwrap().bytes).unwrap();
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 100);
        let (_, with_edns) = query_bytes(SVC, RecordType::A, true);
        let bytes = responder.respond(&with_edns, true).unwrap().bytes;
        let edns = Message::from_vec(&bytes).unwrap();
        assert_eq!(
            edns.edns.as_ref().map(Edns::max_payload),
            Some(EDNS_PAYLOAD)
        );
        // hickory asks for 1232 too: 100 answers (1612 bytes) still do not fit.
        assert!(edns.metadata.truncation && bytes.len() <= 1232);
    }

    #[test]
    fn non_queries_are_ignored_or_refused() {
        let mut responder = Responder::new(&test_zone()).unwrap();
        assert!(responder.respond(&[0; 5], true).is_none());
        let (_, mut query) = query_bytes(SVC, RecordType::A, false);
        query[2] |= 0x80;
        assert!(responder.respond(&query, true).is_none(), "a response");
        let garbage = [0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0];
        let reply = responder.respond(&garbage, true).unwrap();
        let message = Message::from_vec(&reply.bytes).unwrap();
        assert_eq!(message.metadata.id, 0x1234);
        assert_eq!(message.metadata.response_code, ResponseCode::FormErr);
    }

    #[test]
    fn malformed_kinds_are_crafted_as_documented() {
        let mut responder = Responder::new(&test_zone()).unwrap();
        for kind in MalformedKind::ALL {
            for qtype in [RecordType::A, RecordType::AAAA] {
                let (_, query) = query_bytes(&malformed_name(kind), qtype, false);
                let reply = responder.respond(&query, true).unwrap();
                assert!(reply.summary.contains(kind.as_str()), "{}", reply.summary);
                check_malformed(kind, &query, &reply.bytes);
            }
        }
        // As asked: case kept in the echoed question.
        let mixed = malformed_name(MalformedKind::AncountLie).to_uppercase();
        let (_, query) = query_bytes(&mixed, RecordType::A, false);
        let reply = responder.respond(&query, true).unwrap();
        check_malformed(MalformedKind::AncountLie, &query, &reply.bytes);
        // The zone's addresses are used when it has them.
        let (_, query) = query_bytes(&malformed_name(MalformedKind::TcBit), RecordType::A, false);
        let bytes = responder.respond(&query, true).unwrap().bytes;
        let message = Message::from_vec(&bytes).unwrap();
        assert_eq!(answer_addrs(&message), [IpAddr::from(v4(10))]);
        // Over TCP, tc-bit gets the real answer; the others stay broken.
        let tcp = Message::from_vec(&responder.respond(&query, false).unwrap().bytes).unwrap();
        assert!(!tcp.metadata.truncation);
        assert_eq!(answer_addrs(&tcp).len(), 2);
        let (_, query) = query_bytes(
            &malformed_name(MalformedKind::PointerLoop),
            RecordType::A,
            false,
        );
        let bytes = responder.respond(&query, false).unwrap().bytes;
        check_malformed(MalformedKind::PointerLoop, &query, &bytes);
    }

    #[test]
    fn zone_file_is_reread_when_it_changes() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("zone.json");
        test_zone().write(&path)?;
        let mut file = ZoneFile::open(&path)?;
        let (responder, error) = file.responder();
        assert!(error.is_none());
        assert_eq!(answer_addrs(&ask(responder, SVC, RecordType::A)).len(), 2);
        // Written again at once: a new inode, so noticed even within the
        // same mtime tick.
        test_zone().without_addr(v4(11).into()).write(&path)?;
        let (responder, error) = file.responder();
        assert!(error.is_none());
        assert_eq!(
            answer_addrs(&ask(responder, SVC, RecordType::A)),
            [IpAddr::from(v4(10))]
        );
        let pod1 = ask(responder, POD1, RecordType::A);
        assert_eq!(
            pod1.metadata.response_code,
            ResponseCode::NoError,
            "AAAA left"
        );
        // A broken file keeps the last good zone.
        fs::write(&path, "{not json")?;
        let (responder, error) = file.responder();
        assert!(error.is_some());
        assert_eq!(answer_addrs(&ask(responder, SVC, RecordType::A)).len(), 1);
        Ok(())
    }

    #[test]
    fn resolver_files_look_like_the_kubelets() {
        let text = resolv_conf(
            "10.77.0.53".parse().unwrap(),
            &[
                "demo.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
            ],
        );
        assert!(text.contains("\nnameserver 10.77.0.53\n"));
        assert!(text.contains("\nsearch demo.svc.cluster.local svc.cluster.local cluster.local\n"));
        assert!(text.ends_with("options ndots:5\n"));
        let ns = nsswitch_conf("passwd: files\nhosts:  files resolve [!UNAVAIL=return] dns\n");
        assert_eq!(ns, "passwd: files\nhosts: files dns\n");
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(to_hex(&bytes), "0001abff");
        assert_eq!(from_hex("0001abff").unwrap(), bytes);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
    }

    // --- privileged tests: the real server, glibc and dig ---------------

    const SEARCH: [&str; 3] = [
        "demo.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
    ];

    /// Two dual-stack pods serving PORT, a client whose resolv.conf points
    /// at a `headway-dns` in its own namespace (10.77.0.53, fd77::53).
    struct DnsBed {
        // Drop order: processes and files first, the namespaces last.
        _resolv: ResolvConf,
        _server: Child,
        _pods: Vec<Child>,
        zone_path: PathBuf,
        _dir: tempfile::TempDir,
        cluster: Cluster,
    }

    const DNS_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 53);
    const DNS_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x53);

    impl DnsBed {
        fn new(zone: &Zone) -> Result<Self> {
            let cluster = Cluster::builder()
                .pod("web-0", v4(10), Some(v6(0x10)))
                .pod("web-1", v4(11), Some(v6(0x11)))
                .client("client")
                // Not a pod: start_pod_servers leaves it alone.
                .client_at("dns", DNS_V4, Some(DNS_V6))
                .build()?;
            let dir = tempfile::tempdir()?;
            let zone_path = dir.path().join("zone.json");
            zone.write(&zone_path)?;
            let pods = start_pod_servers(&cluster, PORT)?;
            let server = start_dns_server(
                cluster.client_ns("dns"),
                &zone_path,
                Ipv6Addr::UNSPECIFIED.into(),
            )?;
            let resolv = ResolvConf::new(cluster.client_ns("client"), DNS_V4.into(), &SEARCH)?;
            Ok(Self {
                _resolv: resolv,
                _server: server,
                _pods: pods,
                zone_path,
                _dir: dir,
                cluster,
            })
        }

        fn client(&self) -> &NetNs {
            self.cluster.client_ns("client")
        }

        fn resolve(&self, name: &str) -> Result<ResolveReport> {
            resolve_in(self.client(), None, name)
        }

        /// `dig` in the client namespace; its stdout.
        fn dig(&self, server: IpAddr, args: &[&str]) -> Result<String> {
            let mut cmd = self.client().exec("dig");
            cmd.args(["+time=2", "+tries=1", &format!("@{server}")])
                .args(args);
            crate::netns::run(&mut cmd)
        }
    }

    fn addr_set<I: IntoIterator<Item = IpAddr>>(addrs: I) -> BTreeSet<IpAddr> {
        addrs.into_iter().collect()
    }

    fn lines_as_addrs(text: &str) -> BTreeSet<IpAddr> {
        text.lines()
            .map(|l| {
                l.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("not an address: {l:?}"))
            })
            .collect()
    }

    #[test]
    fn glibc_and_dig_resolve_the_headless_service() -> Result<()> {
        if !require_root("glibc_and_dig_resolve_the_headless_service") {
            return Ok(());
        }
        let bed = DnsBed::new(&test_zone())?;
        let all = addr_set([
            v4(10).into(),
            v4(11).into(),
            v6(0x10).into(),
            v6(0x11).into(),
        ]);

        // glibc: full name, short name through the search list, a CNAME.
        for name in [SVC, "web", "web.demo", &format!("{SVC}."), ALIAS] {
            let report = bed.resolve(name)?;
            assert_eq!(report.error, None, "{report:?}");
            assert_eq!(
                addr_set(report.addrs.iter().copied()),
                all,
                "{name}: {report:?}"
            );
        }
        let pod = bed.resolve(POD0)?;
        assert_eq!(
            addr_set(pod.addrs),
            addr_set([v4(10).into(), v6(0x10).into()])
        );
        let unknown = bed.resolve("nope.demo.svc.cluster.local")?;
        assert!(
            unknown.addrs.is_empty() && unknown.error.is_some(),
            "{unknown:?}"
        );

        // dig, over both of the server's addresses.
        for server in [IpAddr::from(DNS_V4), DNS_V6.into()] {
            let a = bed.dig(server, &["+short", SVC, "A"])?;
            assert_eq!(lines_as_addrs(&a), addr_set([v4(10).into(), v4(11).into()]));
            let aaaa = bed.dig(server, &["+short", SVC, "AAAA"])?;
            assert_eq!(
                lines_as_addrs(&aaaa),
                addr_set([v6(0x10).into(), v6(0x11).into()])
            );
            let pod = bed.dig(server, &["+short", POD1, "A"])?;
            assert_eq!(lines_as_addrs(&pod), addr_set([v4(11).into()]));
            let nx = bed.dig(server, &["nope.demo.svc.cluster.local", "A"])?;
            assert!(nx.contains("status: NXDOMAIN"), "{nx}");
            assert!(nx.contains(" aa"), "authoritative: {nx}");
            let tcp = bed.dig(server, &["+tcp", "+short", SVC, "A"])?;
            assert_eq!(lines_as_addrs(&tcp).len(), 2, "{tcp}");
        }

        // A pod deleted: the zone changes, the next lookups see it.
        test_zone()
            .without_addr(v4(11).into())
            .without_addr(v6(0x11).into())
            .write(&bed.zone_path)?;
        let after = bed.resolve(SVC)?;
        assert_eq!(
            addr_set(after.addrs),
            addr_set([v4(10).into(), v6(0x10).into()])
        );
        let gone = bed.resolve(POD1)?;
        assert!(gone.error.is_some(), "{gone:?}");
        Ok(())
    }

    #[test]
    fn malformed_responses_arrive_as_crafted() -> Result<()> {
        if !require_root("malformed_responses_arrive_as_crafted") {
            return Ok(());
        }
        let bed = DnsBed::new(&test_zone())?;
        for kind in MalformedKind::ALL {
            for (qtype, tcp) in [("A", false), ("AAAA", false), ("A", true)] {
                let name = malformed_name(kind);
                let exchange = dns_query_in(bed.client(), DNS_V4.into(), &name, qtype, tcp)?;
                let bytes = exchange.bytes()?;
                assert_eq!(bytes[..2], exchange.id.to_be_bytes(), "{kind:?}");
                let qtype: RecordType = qtype.parse()?;
                let mut query = Message::new(exchange.id, MessageType::Query, OpCode::Query);
                query.metadata.recursion_desired = true;
                query.add_query(Query::query(parse_name(&name)?, qtype));
                let query = query.to_vec()?;
                if kind == MalformedKind::TcBit && tcp {
                    let message = Message::from_vec(&bytes)?;
                    assert!(!message.metadata.truncation);
                    assert_eq!(answer_addrs(&message).len(), 2);
                } else {
                    check_malformed(kind, &query, &bytes);
                }
            }
        }
        // glibc gets TC=1 over UDP, retries over TCP, and gets everything.
        let tc = bed.resolve(&malformed_name(MalformedKind::TcBit))?;
        assert_eq!(addr_set(tc.addrs), addr_set([v4(10).into(), v4(11).into()]));
        // The server survived all of it.
        let report = bed.resolve(SVC)?;
        assert_eq!(report.addrs.len(), 4, "{report:?}");
        Ok(())
    }

    #[test]
    fn connect_by_name_resolves_before_every_attempt() -> Result<()> {
        if !require_root("connect_by_name_resolves_before_every_attempt") {
            return Ok(());
        }
        let bed = DnsBed::new(&test_zone().rotate(true))?;
        let client = bed.client();
        let (a, b) = (v4(10).to_string(), v4(11).to_string());

        // Rotation turns the DNS answer per lookup; one lookup per attempt.
        let report = run_client_by_name(client, None, SVC, PORT, 4, false, Some(4))?;
        let two_each = |x: &str, y: &str| BTreeMap::from([(x.to_owned(), 2), (y.to_owned(), 2)]);
        assert_eq!(report.resolved, two_each(&a, &b), "{report:?}");
        assert_eq!(
            report.report.answers,
            two_each("web-0", "web-1"),
            "{report:?}"
        );
        assert_eq!(report.report.failures, 0, "{report:?}");
        assert_eq!(
            report.report.peer_addrs,
            two_each(&format!("{a}:{PORT}"), &format!("{b}:{PORT}")),
            "{report:?}"
        );

        // A pod by name, over IPv6 and UDP.
        let pod = run_client_by_name(client, None, POD1, PORT, 2, true, Some(6))?;
        let v6_pod1 = v6(0x11).to_string();
        assert_eq!(pod.resolved, BTreeMap::from([(v6_pod1, 2)]), "{pod:?}");
        assert_eq!(
            pod.report.answers,
            BTreeMap::from([("web-1".to_owned(), 2)]),
            "{pod:?}"
        );

        // web-1 deleted: every later attempt goes to web-0.
        test_zone()
            .rotate(true)
            .without_addr(v4(11).into())
            .write(&bed.zone_path)?;
        let after = run_client_by_name(client, None, SVC, PORT, 3, false, Some(4))?;
        assert_eq!(after.resolved, BTreeMap::from([(a, 3)]), "{after:?}");
        assert_eq!(
            after.report.answers,
            BTreeMap::from([("web-0".to_owned(), 3)])
        );

        // An unknown name: every attempt fails at the lookup.
        let unknown = run_client_by_name(client, None, "nope", PORT, 2, false, None)?;
        assert!(unknown.resolved.is_empty() && unknown.report.answers.is_empty());
        assert_eq!(unknown.report.failures, 2, "{unknown:?}");
        assert!(
            unknown
                .report
                .errors
                .keys()
                .all(|e| e.contains("resolving nope"))
        );
        Ok(())
    }
}
