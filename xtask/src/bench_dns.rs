//! `cargo xtask bench-dns`: what the DNS interceptor costs per packet,
//! measured with BPF_PROG_TEST_RUN on the real kernel (root needed).
//!
//! The kernel object is built, loaded without attaching anything, and the
//! ingress program is run on hand-made frames. Nothing is sent anywhere.
//!
//! Two methods, because a matched response consumes its pending query:
//! - *repeat*: the kernel runs the program `--repeat` times on the same
//!   frame and reports the mean. Honest only for paths where every run
//!   does the same work: a non-DNS packet, an unsolicited response.
//! - *single*: for the learning path, the pending query is put back from
//!   userspace before each run, and the program runs once; the kernel's
//!   duration of that one run is recorded, and the median over `--samples`
//!   runs is reported. A single run also carries the test harness's own
//!   per-call cost (reading the clock around the run); that cost is
//!   estimated as single-run median minus repeat mean of the non-DNS
//!   packet and is subtracted in the "net" column.
//!
//! Each learning case runs in four states: the same answer came a moment
//! ago (the common case of a client asking again); the client's first
//! answer from the service, about addresses this CPU's answer cache knows
//! (another client got them before); the client's first answer with the
//! cache cold too (the agent just changed `dns_addrs`, or the answer is new
//! to the node): every address read from `addr_table`, which the bench
//! fills as the agent does, and one insert; and a known client with the
//! cache cold.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData},
    programs::{CgroupSkb, TestRun, TestRunOptions},
};
use headway_common::{
    AddrIndex, AddrKey, AddrSlot, NameEntry, OBS_MAX_PAGES, ObservationKey, ObservationPage,
    PendingQuery, PendingQueryKey, PodRef, addr_slot_flags, dns_name_hash, map_names, name_kind,
    program_names,
};
use hickory_proto::{
    op::{Message, OpCode, Query},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, CNAME},
    },
};

use crate::build_ebpf;

const NAME: &str = "web.demo.svc.cluster.local";
const SERVICE_ID: u32 = 1;
const QUERY_ID: u16 = 0x4242;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 53);
const CLIENT_PORT: u16 = 40_000;

#[derive(clap::Args)]
pub struct Options {
    /// Runs per BPF_PROG_TEST_RUN call for the repeat method.
    #[arg(long, default_value_t = 100_000)]
    pub repeat: u32,
    /// Single runs per case for the learning path (median reported).
    #[arg(long, default_value_t = 20_000)]
    pub samples: usize,
    /// Only the learning cases whose label contains this (e.g. "16 A,
    /// first time, cold"), to profile one path.
    #[arg(long)]
    pub only: Option<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    measure(opts).map(|_| ())
}

/// What `cargo xtask bench` keeps of this benchmark (ns per packet).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DnsFigures {
    pub repeat: u32,
    pub samples: usize,
    /// Program name -> verified instructions.
    pub verified_instructions: Vec<(String, Option<u32>)>,
    /// Paths measured with the repeat method: case -> mean ns.
    pub repeat_ns: Vec<(String, f64)>,
    pub harness_ns: f64,
    /// The learning path: case -> (raw median ns, net of harness ns).
    pub learning_ns: Vec<(String, f64, f64)>,
}

/// Runs the benchmark, printing as it goes, and returns the figures.
pub fn measure(opts: &Options) -> anyhow::Result<DnsFigures> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench-dns loads BPF programs: run it as root");
    }
    let object_path = build_ebpf::run(&build_ebpf::Options { release: true })?;
    let object = std::fs::read(&object_path)
        .with_context(|| format!("reading {}", object_path.display()))?;
    let mut bench = Bench::load(&object)?;
    let mut figures = DnsFigures {
        repeat: opts.repeat,
        samples: opts.samples,
        ..DnsFigures::default()
    };
    print_verified(&bench, &mut figures)?;
    print_table_rebuild(&mut bench)?;
    let harness = bench_repeatable(&mut bench, opts, &mut figures)?;
    bench_learning(&mut bench, opts, harness, &mut figures)?;
    Ok(figures)
}

fn print_verified(bench: &Bench, figures: &mut DnsFigures) -> anyhow::Result<()> {
    println!("verified instructions (ProgramInfo::verified_instruction_count):");
    for name in [program_names::SKB_EGRESS, program_names::SKB_INGRESS] {
        let count = bench.program(name)?.info()?.verified_instruction_count();
        figures.verified_instructions.push((name.to_owned(), count));
        let count = count.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
        println!("  {name:<16} {count}");
    }
    Ok(())
}

/// What the agent's start costs for `addr_table` (done twice: before
/// the programs attach, and when the writer takes the maps over).
fn print_table_rebuild(bench: &mut Bench) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    headway::addr_table::fill_before_attach(&mut bench.ebpf)?;
    println!(
        "addr_table rewritten whole ({} entries): {:.1} ms",
        headway_common::addr_table::SIZE,
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// The paths where every run does the same work, with `repeat`. Returns
/// the harness cost of one single run (see the module docs).
fn bench_repeatable(
    bench: &mut Bench,
    opts: &Options,
    figures: &mut DnsFigures,
) -> anyhow::Result<Duration> {
    let other_port = udp_frame(5353, CLIENT_PORT, &response(&pod_ips(1), false).0);
    let other_repeat = bench.run(&other_port, opts.repeat)?;
    let other_single = bench.single_median(&other_port, opts.samples, |_| Ok(()))?;
    let unsolicited = udp_frame(53, CLIENT_PORT, &response(&pod_ips(16), false).0);
    let cases = [
        ("non-DNS UDP (port 5353)", other_repeat),
        ("TCP from port 53", bench.run(&tcp_frame(), opts.repeat)?),
        (
            "DNS response, 16 A, unsolicited",
            bench.run(&unsolicited, opts.repeat)?,
        ),
    ];
    println!(
        "\nhw_skb_ingress, ns per packet (repeat = {}):",
        opts.repeat
    );
    for (case, cost) in cases {
        println!("  {case:<44} {:>8.1}", ns(cost));
        figures.repeat_ns.push((case.to_owned(), ns(cost)));
    }
    let harness = other_single.saturating_sub(other_repeat);
    figures.harness_ns = ns(harness);
    println!(
        "harness cost per single run: {:.1} ns (non-DNS single-run median {:.1} - repeat mean {:.1})",
        ns(harness),
        ns(other_single),
        ns(other_repeat)
    );
    Ok(harness)
}

/// The learning path: single runs, the pending query put back before each.
fn bench_learning(
    bench: &mut Bench,
    opts: &Options,
    harness: Duration,
    figures: &mut DnsFigures,
) -> anyhow::Result<()> {
    println!(
        "\nhw_skb_ingress, learning path: median of {} single runs, pending query \
         re-inserted before each; net = raw - harness cost",
        opts.samples
    );
    println!("  {:<44} {:>8} {:>8}", "case", "raw", "net");
    let cases = [
        ("1 A", response(&pod_ips(1), false)),
        ("CNAME + 3 A", response(&pod_ips(3), true)),
        ("4 A", response(&pod_ips(4), false)),
        ("16 A", response(&pod_ips(16), false)),
        (
            "16 A, no headless addresses",
            response(&other_ips(16), false),
        ),
        ("32 A", response(&pod_ips(32), false)),
    ];
    for (name, (payload, ips)) in cases {
        let frame = udp_frame(53, CLIENT_PORT, &payload);
        let _ = ips;
        for state in [
            State::Repeated,
            State::FirstCached,
            State::FirstTime,
            State::KnownCold,
        ] {
            let case = format!("{name}, {}", state.label());
            if opts
                .only
                .as_ref()
                .is_some_and(|only| !case.contains(only.as_str()))
            {
                continue;
            }
            let raw = bench.single_median(&frame, opts.samples, |b| {
                if matches!(state, State::FirstCached | State::FirstTime) {
                    b.forget_pages()?;
                }
                if matches!(state, State::FirstTime | State::KnownCold) {
                    b.bump_generation()?;
                }
                b.expect_query()
            })?;
            let net = raw.saturating_sub(harness);
            println!("  {case:<44} {:>8.1} {:>8.1}", ns(raw), ns(net));
            figures.learning_ns.push((case, ns(raw), ns(net)));
        }
    }
    Ok(())
}

/// What the client netns and this CPU knew before the benchmarked response.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// The same answer a moment ago: its page exists, the cache holds it.
    Repeated,
    /// The client's first answer from the service (no `dns_obs` page); the
    /// answer cache holds the addresses (another client got them).
    FirstCached,
    /// The client's first answer, and the cache is cold (no CPU has this
    /// answer under the current generation): every address is read from
    /// `addr_table`, the page inserted.
    FirstTime,
    /// The page exists, the cache is cold (the agent changed `dns_addrs`).
    KnownCold,
}

impl State {
    fn label(self) -> &'static str {
        match self {
            State::Repeated => "repeated",
            State::FirstCached => "first time, answer cached",
            State::FirstTime => "first time, cold",
            State::KnownCold => "known, cache cold",
        }
    }
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

/// The loaded object, with the maps set up as the agent would for one
/// headless service whose pods are the answer addresses.
struct Bench {
    ebpf: Ebpf,
    netns_cookie: u64,
}

impl Bench {
    fn load(object: &[u8]) -> anyhow::Result<Bench> {
        let mut ebpf = EbpfLoader::new()
            .load(object)
            .context("loading the object")?;
        for name in [program_names::SKB_EGRESS, program_names::SKB_INGRESS] {
            let program: &mut CgroupSkb = ebpf
                .program_mut(name)
                .with_context(|| format!("{name} missing"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
        let mut bench = Bench {
            ebpf,
            netns_cookie: netns_cookie()?,
        };
        bench.setup_maps()?;
        Ok(bench)
    }

    fn program(&self, name: &str) -> anyhow::Result<&CgroupSkb> {
        let program = self.ebpf.program(name).context("program missing")?;
        Ok(program.try_into()?)
    }

    fn map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> anyhow::Result<HashMap<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("no map {name}"))?;
        Ok(HashMap::try_from(map)?)
    }

    fn setup_maps(&mut self) -> anyhow::Result<()> {
        let hash = dns_name_hash(NAME).context("bad name")?;
        let entry = NameEntry {
            service_id: SERVICE_ID,
            kind: name_kind::SERVICE,
        };
        self.map::<u64, NameEntry>(map_names::DNS_NAMES)?
            .insert(hash, entry, 0)?;
        for i in 0..32 {
            let pod = PodRef {
                pod_id: i as u32,
                _pad: 0,
            };
            self.map::<AddrKey, PodRef>(map_names::POD_ADDRS)?.insert(
                addr_key(pod_ip(i)),
                pod,
                0,
            )?;
            // What the agent writes for an endpoint: its pod and its slot.
            let mut index = AddrIndex {
                pod_id: i as u32,
                n: 1,
                ..AddrIndex::default()
            };
            index.slots[0] = AddrSlot {
                service_id: SERVICE_ID,
                slot: i as u16,
                flags: addr_slot_flags::KNOWN | addr_slot_flags::MEMBER | addr_slot_flags::ELIGIBLE,
                since_ns: 1,
            };
            // The address filter first, as the agent does.
            let filter = self
                .ebpf
                .map_mut(map_names::ADDR_FILTER)
                .context("no address filter")?;
            headway::addr_filter::add_to(&mut Array::try_from(filter)?, &addr_key(pod_ip(i)))?;
            self.map::<AddrKey, AddrIndex>(map_names::DNS_ADDRS)?
                .insert(addr_key(pod_ip(i)), index, 0)?;
            // And its copy in the table the interceptor reads first.
            let table = self
                .ebpf
                .map_mut(map_names::ADDR_TABLE)
                .context("no address table")?;
            if !headway::addr_table::put(
                &mut Array::try_from(table)?,
                &addr_key(pod_ip(i)),
                &index,
            )? {
                bail!("no room in the address table for {}", pod_ip(i));
            }
        }
        Ok(())
    }

    /// Puts the query the benchmark response answers in `dns_pending`.
    fn expect_query(&mut self) -> anyhow::Result<()> {
        let key = PendingQueryKey {
            netns_cookie: self.netns_cookie,
            server: addr_key(SERVER),
            client_port: CLIENT_PORT.to_be(),
            query_id: QUERY_ID.to_be(),
            _pad: 0,
        };
        let value = PendingQuery {
            name_hash: dns_name_hash(NAME).context("bad name")?,
            qtype: 1,
            _pad: 0,
        };
        self.map::<PendingQueryKey, PendingQuery>(map_names::DNS_PENDING)?
            .insert(key, value, 0)?;
        Ok(())
    }

    /// Removes the client's `dns_obs` pages of the benchmark's service.
    fn forget_pages(&mut self) -> anyhow::Result<()> {
        let cookie = self.netns_cookie;
        let mut pages = self.map::<ObservationKey, ObservationPage>(map_names::DNS_OBS)?;
        for page in 0..OBS_MAX_PAGES as u16 {
            let key = ObservationKey {
                netns_cookie: cookie,
                service_id: SERVICE_ID,
                family: 4,
                page,
            };
            // Absent before the first run of a case: nothing to forget.
            let _ = pages.remove(&key);
        }
        Ok(())
    }

    /// What the agent does after changing `dns_addrs`: every cached
    /// answer is stale.
    fn bump_generation(&mut self) -> anyhow::Result<()> {
        let map = self
            .ebpf
            .map_mut(map_names::POD_ADDRS_GEN)
            .context("no pod_addrs_gen")?;
        let mut generation: Array<&mut MapData, u64> = Array::try_from(map)?;
        let now = generation.get(&0, 0)?;
        generation.set(0, now.wrapping_add(1), 0)?;
        Ok(())
    }

    /// Runs the ingress program `repeat` times inside the kernel; returns
    /// the mean duration of one run.
    fn run(&self, frame: &[u8], repeat: u32) -> anyhow::Result<Duration> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::new()
        };
        let result = self.program(program_names::SKB_INGRESS)?.test_run(opts)?;
        if result.return_value != 1 {
            bail!("the program dropped a packet ({})", result.return_value);
        }
        Ok(result.duration)
    }

    /// Median duration of `samples` single runs, each after `prepare`.
    fn single_median(
        &mut self,
        frame: &[u8],
        samples: usize,
        mut prepare: impl FnMut(&mut Bench) -> anyhow::Result<()>,
    ) -> anyhow::Result<Duration> {
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples.max(1) {
            prepare(self)?;
            times.push(self.run(frame, 1)?);
        }
        times.sort();
        if std::env::var_os("BENCH_DNS_PCT").is_some() {
            let p = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_nanos();
            eprintln!(
                "    p10 {} p25 {} p50 {} p75 {} p90 {}",
                p(0.1),
                p(0.25),
                p(0.5),
                p(0.75),
                p(0.9)
            );
        }
        Ok(times[times.len() / 2])
    }
}

fn netns_cookie() -> anyhow::Result<u64> {
    headway::netns::current_netns_cookie().context("SO_NETNS_COOKIE")
}

fn addr_key(ip: Ipv4Addr) -> AddrKey {
    AddrKey::from_v4_be(u32::from_ne_bytes(ip.octets()))
}

/// Pod addresses 10.77.1.1 and up (in `pod_addrs`).
fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 1, i as u8 + 1)
}

fn pod_ips(n: usize) -> Vec<Ipv4Addr> {
    (0..n).map(pod_ip).collect()
}

/// Addresses 10.77.2.1 and up: no headless service's (not in `dns_addrs`),
/// so nothing to count or stamp.
fn other_ips(n: usize) -> Vec<Ipv4Addr> {
    (0..n)
        .map(|i| Ipv4Addr::new(10, 77, 2, i as u8 + 1))
        .collect()
}

/// A response to `NAME` IN A answering `ips`, compressed the way DNS
/// servers do (owner names point back), optionally through a CNAME.
/// Returns the payload and the addresses.
fn response(ips: &[Ipv4Addr], cname: bool) -> (Vec<u8>, Vec<Ipv4Addr>) {
    let name = |s: &str| {
        let mut name = Name::from_ascii(s).expect("valid name");
        name.set_fqdn(true);
        name
    };
    let question = name(NAME);
    let mut owner = question.clone();
    let mut msg = Message::response(QUERY_ID, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(question.clone(), RecordType::A));
    if cname {
        let target = name("web-primary.demo.svc.cluster.local");
        let rdata = RData::CNAME(CNAME(target.clone()));
        msg.add_answer(Record::from_rdata(question, 5, rdata));
        owner = target;
    }
    for ip in ips {
        msg.add_answer(Record::from_rdata(owner.clone(), 5, RData::A(A(*ip))));
    }
    (msg.to_vec().expect("encodable"), ips.to_vec())
}

/// Ethernet + IPv4 + UDP from the server to the client.
fn udp_frame(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend(sport.to_be_bytes());
    l4.extend(dport.to_be_bytes());
    l4.extend((8 + payload.len() as u16).to_be_bytes());
    l4.extend([0, 0]);
    l4.extend(payload);
    ipv4_frame(17, &l4)
}

/// A TCP segment from the server's port 53: not what the parser wants.
fn tcp_frame() -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend(53u16.to_be_bytes());
    l4.extend(CLIENT_PORT.to_be_bytes());
    l4.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    ipv4_frame(6, &l4)
}

fn ipv4_frame(protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut out = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    out.extend([0x45, 0]);
    out.extend((20 + l4.len() as u16).to_be_bytes());
    out.extend([0, 1, 0x40, 0, 64, protocol, 0, 0]);
    out.extend(SERVER.octets());
    out.extend(CLIENT.octets());
    out.extend(l4);
    out
}
