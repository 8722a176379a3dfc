//! The paired measurement of persistent connections: one client process,
//! in the headway contender's client namespace, holds per thread three
//! keep-alive connections to the same pod and alternates its requests
//! over them in a random order per cycle:
//!
//! - `direct`: a socket created while the process sits in a cgroup with no
//!   programs (`direct`'s own cgroup);
//! - `control`: a second such socket, the A/A control;
//! - `headway`: a socket created after the process moved itself into the
//!   cgroup headway's programs are attached to (it resolves the service
//!   name there first, so the DNS interceptor learns the answer, and the
//!   connect goes through connect4 and the policy).
//!
//! Cgroup socket hooks and cgroup_skb programs run for the cgroup a socket
//! was created in, so each socket keeps its side whatever the process does
//! afterwards (it moves back to the plain cgroup). Whatever load other
//! tenants put on the machine lands on all three sides alike, within the
//! same cycle. Every request's latency goes into a histogram per side and
//! per 1-second block; `paired_stats` compares the sides.
//!
//! The same client measures new connections (`--new-connections`): per
//! cycle every side makes one connection, each from a socket it made in
//! its cgroup before the clock started (a socket's cgroup is fixed when it
//! is made, and moving the process every cycle would cost more than the
//! connection). Under `random` the plain sides pick a random pod per
//! cycle, so all three sides spread alike.
//!
//! The client is this binary again (`cargo xtask paired-client`, hidden),
//! spawned inside the bench's client namespace, never in the host's.
use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use super::{
    bed::Bed,
    contenders::Contender,
    paired_stats::{Block, Rng, Side, SideBlock, WireSide},
    workload::{HTTP_PORT, Workload},
};

/// Length of a block: the unit of the per-block ratios and the bootstrap.
pub const BLOCK: Duration = Duration::from_secs(1);
/// Unrecorded cycles per thread before the clock starts.
const WARM_UP_CYCLES: usize = 200;
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The path every pod answers with its own address (nginx `$server_addr`).
pub const WHOAMI_PATH: &str = "/whoami";

/// `cargo xtask paired-client` (hidden): what the bench passes.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientOptions {
    /// The cgroup with no programs (relative to the cgroup2 root): the
    /// direct and control sockets are made here, and the process stays
    /// here while it measures.
    #[arg(long)]
    pub plain_cgroup: PathBuf,
    /// The cgroup headway's programs are attached to (relative to the
    /// cgroup2 root); with `--service`, the headway sockets are made here.
    /// Without both: A/A only.
    #[arg(long, requires = "service")]
    pub headway_cgroup: Option<PathBuf>,
    /// The name the headway side resolves (glibc, the namespace's
    /// resolv.conf) and connects to.
    #[arg(long, requires = "headway_cgroup")]
    pub service: Option<String>,
    /// Pods for the A/A-only mode (thread i takes pod i mod n).
    #[arg(long, value_delimiter = ',')]
    pub pods: Vec<Ipv4Addr>,
    #[arg(long, default_value_t = HTTP_PORT)]
    pub port: u16,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long, default_value_t = 1000)]
    pub millis: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// New connections instead of keep-alive ones: per cycle, each side
    /// makes one (see [`new_connection`]), from pools of sockets made
    /// beforehand in the side's cgroup, this many per side and thread at a
    /// time (fewer if the open-file limit says so).
    #[arg(long)]
    pub new_connections: Option<usize>,
    /// With `--new-connections`: the direct and control sides go to a
    /// random pod of `--pods` each cycle (as `random` spreads the headway
    /// side's), not to the thread's pod.
    #[arg(long, requires = "new_connections")]
    pub spread: bool,
}

/// One thread's connections, as the client set them up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThreadSetup {
    /// The pod every side of this thread talks to (its `/whoami`).
    pub pod: String,
    /// The address the headway socket asked for (before any steering).
    #[serde(default)]
    pub asked: Option<String>,
    /// Side → local port of its socket.
    pub local_ports: BTreeMap<Side, u16>,
    /// Side → the socket's cgroup, as the kernel reports it (`ss
    /// --cgroup`, relative to the cgroup2 mount).
    pub cgroups: BTreeMap<Side, String>,
    /// Side → the real remote address of the socket (`ss`, which no hook
    /// rewrites), to check every side reaches `pod`.
    pub remotes: BTreeMap<Side, String>,
}

/// What the client prints: the setup and every block's histograms.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientReport {
    pub threads: Vec<ThreadSetup>,
    /// blocks[b][side index]
    pub blocks: Vec<Vec<WireSide>>,
}

impl ClientReport {
    pub fn blocks(&self) -> Vec<Block> {
        self.blocks
            .iter()
            .map(|sides| {
                let mut b = Block::default();
                for (slot, wire) in b.sides.iter_mut().zip(sides) {
                    *slot = SideBlock::from_wire(wire);
                }
                b
            })
            .collect()
    }
}

/// A keep-alive HTTP/1.1 connection, one request in flight.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        Conn::of(stream)
    }

    /// A connected stream, set up as every side's is.
    fn of(stream: TcpStream) -> anyhow::Result<Conn> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    fn local_port(&self) -> anyhow::Result<u16> {
        Ok(self.stream.local_addr()?.port())
    }

    /// Sends `request` and reads the whole response (status 200, a
    /// Content-Length body); returns where its body starts in `buf`.
    fn exchange(&mut self, request: &[u8]) -> anyhow::Result<usize> {
        self.stream.write_all(request)?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        let mut body: Option<(usize, usize)> = None;
        loop {
            if body.is_none()
                && let Some(head) = find(&self.buf, b"\r\n\r\n")
            {
                let start = head + 4;
                body = Some((start, start + response_body_len(&self.buf[..head])?));
            }
            if let Some((start, total)) = body {
                if self.buf.len() == total {
                    return Ok(start);
                }
                if self.buf.len() > total {
                    bail!("more bytes than one response: pipelining is not expected");
                }
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                bail!("the server closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Checks a response head for status 200 and returns its Content-Length.
fn response_body_len(head: &[u8]) -> anyhow::Result<usize> {
    let text = std::str::from_utf8(head).context("response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200 ") {
        bail!("unexpected response status {status:?}");
    }
    lines
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .context("response without Content-Length")
}

fn request(path: &str, host: &str, port: u16) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").into_bytes()
}

/// `request` asking the server to close the connection after answering.
fn closing_request(path: &str, host: &str, port: u16) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// Moves this whole process into `cgroup` (relative to the cgroup2 root
/// `root`): sockets made from now on belong to it; existing ones keep
/// theirs.
fn join(root: &Path, cgroup: &Path) -> anyhow::Result<()> {
    let path = root.join(cgroup);
    fs::write(path.join("cgroup.procs"), "0")
        .with_context(|| format!("moving into {}", path.display()))
}

/// Where cgroup2 is mounted for this process. `ip netns exec` gives the
/// process a private mount namespace with a fresh /sys, without the
/// host's cgroup2 mount; then mount cgroup2 at /sys/fs/cgroup in that
/// namespace (never in the bench's own: it checks), which is
/// also where `ss --cgroup` finds it.
fn cgroup_root() -> anyhow::Result<PathBuf> {
    if let Ok(root) = headway_testbed::cgroup2_mount() {
        return Ok(root);
    }
    // The bench is the parent (`ip netns exec` execs this in place).
    let mine = fs::read_link("/proc/self/ns/mnt")?;
    let parent = fs::read_link(format!(
        "/proc/{}/ns/mnt",
        std::os::unix::process::parent_id()
    ))?;
    if mine == parent {
        bail!("no cgroup2 mount, and this is the bench's mount namespace: not mounting one");
    }
    let root = PathBuf::from("/sys/fs/cgroup");
    nix::mount::mount(
        Some("cgroup2"),
        &root,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting cgroup2 in the client's mount namespace")?;
    Ok(root)
}

/// The client: set up every thread's connections, then measure.
pub fn client(opts: &ClientOptions) -> anyhow::Result<()> {
    let port = opts.port;
    let threads = opts.threads.max(1);
    let root = cgroup_root()?;
    let mut setups = vec![ThreadSetup::default(); threads];
    let mut conns: Vec<BTreeMap<Side, Conn>> = (0..threads).map(|_| BTreeMap::new()).collect();
    let whoami = |conn: &mut Conn| -> anyhow::Result<String> {
        let start = conn.exchange(&request(WHOAMI_PATH, "whoami", port))?;
        Ok(String::from_utf8_lossy(&conn.buf[start..])
            .trim()
            .to_owned())
    };

    // The headway side first: its pod (steered or not) decides the pod
    // of the other two.
    if let (Some(cgroup), Some(service)) = (&opts.headway_cgroup, &opts.service) {
        join(&root, cgroup)?;
        let addrs: Vec<SocketAddr> = (service.as_str(), port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {service}"))?
            .filter(SocketAddr::is_ipv4)
            .collect();
        if addrs.is_empty() {
            bail!("{service} resolved to no IPv4 address");
        }
        for (i, setup) in setups.iter_mut().enumerate() {
            let asked = addrs[i % addrs.len()];
            let mut conn = Conn::open(asked)?;
            setup.pod = whoami(&mut conn)?;
            setup.asked = Some(asked.ip().to_string());
            conns[i].insert(Side::Headway, conn);
        }
    } else {
        if opts.pods.is_empty() {
            bail!("A/A mode needs --pods");
        }
        for (i, setup) in setups.iter_mut().enumerate() {
            setup.pod = opts.pods[i % opts.pods.len()].to_string();
        }
    }
    join(&root, &opts.plain_cgroup)?;
    for (i, setup) in setups.iter_mut().enumerate() {
        let pod: IpAddr = setup
            .pod
            .parse()
            .with_context(|| format!("pod address {:?}", setup.pod))?;
        for side in [Side::Direct, Side::Control] {
            let mut conn = Conn::open(SocketAddr::new(pod, port))?;
            let answered = whoami(&mut conn)?;
            if answered != setup.pod {
                bail!("{} answered {answered}, not {}", side.id(), setup.pod);
            }
            conns[i].insert(side, conn);
        }
        for (side, conn) in &conns[i] {
            setup.local_ports.insert(*side, conn.local_port()?);
        }
    }
    read_socket_facts(&mut setups)?;

    // Measure: every thread alternates over its sides, in a fresh random
    // order each cycle, recording into the block of the cycle's start.
    let duration = Duration::from_millis(opts.millis);
    let n_blocks = usize::try_from(duration.as_millis().div_ceil(BLOCK.as_millis()))?.max(1);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let start = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut handles = Vec::new();
    let refill = match (opts.new_connections, &opts.headway_cgroup) {
        (Some(n), Some(headway)) => Some(Arc::new(Refill {
            root: root.clone(),
            headway: headway.clone(),
            plain: opts.plain_cgroup.clone(),
            per_side: n.min(fd_budget()? / (3 * threads)).max(1),
            lock: std::sync::Mutex::new(()),
        })),
        (Some(_), None) => bail!("--new-connections needs the headway side"),
        _ => None,
    };
    for (i, (mut sides, setup)) in conns.into_iter().zip(&setups).enumerate() {
        let clock = Clock {
            barrier: Arc::clone(&barrier),
            start: Arc::clone(&start),
            duration,
            n_blocks,
        };
        let rng = Rng::new(opts.seed.wrapping_mul(1000).wrapping_add(i as u64));
        if let Some(refill) = &refill {
            let targets = NewTargets::of(setup, port, opts.spread.then_some(&opts.pods))?;
            let req = closing_request("/", &setup.pod, port);
            let refill = Arc::clone(refill);
            // The keep-alive connections were only for the checks.
            drop(sides);
            handles.push(thread::spawn(move || {
                new_connection_cycles(&refill, &targets, &req, &clock, rng)
            }));
            continue;
        }
        let req = request("/", &setup.pod, port);
        handles.push(thread::spawn(move || -> anyhow::Result<Vec<Block>> {
            let mut order: Vec<Side> = sides.keys().copied().collect();
            run_cycles(&clock, WARM_UP_CYCLES, rng, |rng, record| {
                rng.shuffle(&mut order);
                for &side in &order {
                    let conn = sides.get_mut(&side).context("side without socket")?;
                    record(side, timed(|| conn.exchange(&req).map(drop))?);
                }
                Ok(())
            })
        }));
    }
    barrier.wait();
    start
        .set(Instant::now())
        .map_err(|_| anyhow::anyhow!("start set twice"))?;
    let mut merged = vec![Block::default(); n_blocks];
    for h in handles {
        let blocks = h
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        for (m, b) in merged.iter_mut().zip(&blocks) {
            m.add(b);
        }
    }
    let report = ClientReport {
        threads: setups,
        blocks: merged
            .iter()
            .map(|b| b.sides.iter().map(SideBlock::to_wire).collect())
            .collect(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The block a cycle that starts `since_start` into the run records into
/// (the last one for a cycle started at the very end).
fn block_of(since_start: Duration, n_blocks: usize) -> usize {
    usize::try_from(since_start.as_nanos() / BLOCK.as_nanos())
        .unwrap_or(usize::MAX)
        .min(n_blocks - 1)
}

/// Unrecorded cycles per thread before the clock starts, with new
/// connections (each costs a pooled socket per side).
const NEW_WARM_UP_CYCLES: usize = 50;

/// Makes the pooled sockets of the new-connection mode, each in its
/// side's cgroup: a socket's cgroup is the one its maker is in when it is
/// made, so this moves the whole process (under a lock: one thread at a
/// time), between cycles, off the clock. Sockets only connect later, so a
/// thread measuring meanwhile is not affected.
struct Refill {
    root: PathBuf,
    headway: PathBuf,
    plain: PathBuf,
    per_side: usize,
    lock: std::sync::Mutex<()>,
}

impl Refill {
    /// Fills every side's pool with `per_side` new sockets.
    fn fill(&self, pools: &mut BTreeMap<Side, Vec<Socket>>) -> anyhow::Result<()> {
        let _one_at_a_time = self
            .lock
            .lock()
            .map_err(|_| anyhow::anyhow!("a thread panicked while refilling"))?;
        let make = |n: usize| -> anyhow::Result<Vec<Socket>> {
            (0..n)
                .map(|_| {
                    Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                        .context("making a pooled socket")
                })
                .collect()
        };
        join(&self.root, &self.headway)?;
        let headway = make(self.per_side);
        // Back to the plain cgroup whatever happened.
        join(&self.root, &self.plain)?;
        pools.entry(Side::Headway).or_default().extend(headway?);
        for side in [Side::Direct, Side::Control] {
            pools.entry(side).or_default().extend(make(self.per_side)?);
        }
        Ok(())
    }
}

/// File descriptors the pools may hold: half the open-file limit (raised
/// to the hard limit first, which needs no privilege), the other half
/// left for everything else.
fn fd_budget() -> anyhow::Result<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                bail!("setrlimit: {}", std::io::Error::last_os_error());
            }
        }
    }
    let limit = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    Ok(limit / 2)
}

/// Where each side's new connections go: the headway side to the address
/// the name gave it (headway's policy then decides), the plain sides to
/// the thread's pod, or to a random one of `spread`.
struct NewTargets {
    headway: Option<SocketAddr>,
    pod: SocketAddr,
    spread: Vec<SocketAddr>,
}

impl NewTargets {
    fn of(setup: &ThreadSetup, port: u16, spread: Option<&Vec<Ipv4Addr>>) -> anyhow::Result<Self> {
        let addr = |text: &str| -> anyhow::Result<SocketAddr> {
            let ip: IpAddr = text.parse().with_context(|| format!("address {text:?}"))?;
            Ok(SocketAddr::new(ip, port))
        };
        let spread: Vec<SocketAddr> = spread
            .into_iter()
            .flatten()
            .map(|ip| SocketAddr::new(IpAddr::V4(*ip), port))
            .collect();
        Ok(NewTargets {
            headway: setup.asked.as_deref().map(addr).transpose()?,
            pod: addr(&setup.pod)?,
            spread,
        })
    }

    fn of_side(&self, side: Side, plain: SocketAddr) -> anyhow::Result<SocketAddr> {
        match side {
            Side::Headway => self.headway.context("no headway address"),
            _ => Ok(plain),
        }
    }

    /// This cycle's pod for the plain sides.
    fn plain(&self, rng: &mut Rng) -> SocketAddr {
        if self.spread.is_empty() {
            self.pod
        } else {
            self.spread[rng.below(self.spread.len())]
        }
    }
}

/// When a measuring thread starts and how its time is cut into blocks.
struct Clock {
    barrier: Arc<Barrier>,
    start: Arc<std::sync::OnceLock<Instant>>,
    duration: Duration,
    n_blocks: usize,
}

/// Runs `cycle` (each side's timed work in the cycle's order, reported
/// through `record`): `warm_up` times unrecorded, then from the clock's
/// start until its end, each cycle recording into the block of its start.
fn run_cycles(
    clock: &Clock,
    warm_up: usize,
    mut rng: Rng,
    mut cycle: impl FnMut(&mut Rng, &mut dyn FnMut(Side, u64)) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Block>> {
    for _ in 0..warm_up {
        cycle(&mut rng, &mut |_, _| {})?;
    }
    clock.barrier.wait();
    let t0 = *clock.start.wait();
    let end = t0 + clock.duration;
    let mut blocks = vec![Block::default(); clock.n_blocks];
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let b = block_of(now - t0, clock.n_blocks);
        cycle(&mut rng, &mut |side, ns| {
            blocks[b].sides[side.index()].record(ns)
        })?;
    }
    Ok(blocks)
}

/// How long `work` took, in ns.
fn timed(work: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<u64> {
    let began = Instant::now();
    work()?;
    Ok(u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

/// A thread's measurement with new connections: per cycle, each side in
/// a random order takes a socket from its pool and makes one connection
/// (timed from connect() to close). Empty pools (all at once: they are
/// the same size) are refilled between cycles, off the clock.
fn new_connection_cycles(
    refill: &Refill,
    targets: &NewTargets,
    req: &[u8],
    clock: &Clock,
    rng: Rng,
) -> anyhow::Result<Vec<Block>> {
    let mut pools = BTreeMap::new();
    refill.fill(&mut pools)?;
    let mut order: Vec<Side> = pools.keys().copied().collect();
    run_cycles(clock, NEW_WARM_UP_CYCLES, rng, |rng, record| {
        if pools.values().any(Vec::is_empty) {
            refill.fill(&mut pools)?;
        }
        rng.shuffle(&mut order);
        let plain = targets.plain(rng);
        for &side in &order {
            let socket = pools
                .get_mut(&side)
                .and_then(Vec::pop)
                .context("side without a pool")?;
            let to = targets.of_side(side, plain)?;
            record(side, timed(|| new_connection(socket, to, req))?);
        }
        Ok(())
    })
}

/// One new connection on `socket` to `to`: connect, `req` (a
/// [`closing_request`]), its whole response, then the pod's close (so the
/// pod, not this client, holds the TIME_WAIT, as with wrk's new
/// connections).
fn new_connection(socket: Socket, to: SocketAddr, req: &[u8]) -> anyhow::Result<()> {
    socket
        .connect_timeout(&to.into(), IO_TIMEOUT)
        .with_context(|| format!("connecting to {to}"))?;
    let mut conn = Conn::of(TcpStream::from(socket))?;
    conn.exchange(req)?;
    let mut rest = [0u8; 64];
    if conn.stream.read(&mut rest)? != 0 {
        bail!("{to} sent more than one response");
    }
    Ok(())
}

/// Each socket's cgroup and real remote address, as the kernel reports
/// them (`ss -tn --cgroup`, sock_diag inside this namespace; no packet).
fn read_socket_facts(setups: &mut [ThreadSetup]) -> anyhow::Result<()> {
    let out = Command::new("ss")
        .args(["-Htn", "--cgroup", "state", "established"])
        .output()
        .context("running ss (iproute2)")?;
    if !out.status.success() {
        bail!("ss failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let sockets = parse_ss(&text);
    for setup in setups {
        for (side, port) in &setup.local_ports {
            let (remote, cgroup) = sockets
                .get(port)
                .with_context(|| format!("ss does not list local port {port}:\n{text}"))?;
            setup.cgroups.insert(*side, cgroup.clone());
            setup.remotes.insert(*side, remote.clone());
        }
    }
    Ok(())
}

/// `ss -Htn --cgroup state established` lines → local port → (remote
/// address, cgroup path).
fn parse_ss(text: &str) -> BTreeMap<u16, (String, String)> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let addrs: Vec<SocketAddr> = tokens.iter().filter_map(|t| t.parse().ok()).collect();
        let cgroup = tokens.iter().find_map(|t| t.strip_prefix("cgroup:"));
        if let ([local, remote], Some(cgroup)) = (addrs.as_slice(), cgroup) {
            out.insert(local.port(), (remote.ip().to_string(), cgroup.to_owned()));
        }
    }
    out
}

/// How many client threads a paired workload runs.
pub fn threads(w: Workload, pods: usize) -> usize {
    match w {
        Workload::PairedLoad => pods.max(2),
        // One per CPU of the machines this runs on: each thread is busy
        // (no think time), and new connections cost the pods' CPU too.
        Workload::PairedNew => 2,
        _ => 1,
    }
}

/// One paired run of workload `w` for headway contender `c`, as the bench
/// keeps it: the client's setup and the blocks (not serialized: the
/// summary carries their figures).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairedSample {
    pub round: usize,
    pub workload: Workload,
    pub contender: Contender,
    pub threads: Vec<ThreadSetup>,
    /// The service's connect decisions during the run.
    pub decisions: BTreeMap<String, u64>,
    /// Requests per side over the run.
    pub requests: BTreeMap<Side, u64>,
    #[serde(skip)]
    pub blocks: Vec<Block>,
}

/// Runs the paired client for `c` (a headway contender) on the bed:
/// headway's policy set, the client in `c`'s namespace, `direct`'s cgroup
/// as the plain one. Checks that every socket sits in the cgroup its side
/// says and reaches the pod the thread talks to.
pub fn run(
    bed: &mut Bed,
    round: usize,
    w: Workload,
    c: Contender,
    duration: Duration,
) -> anyhow::Result<PairedSample> {
    if !c.is_paired() {
        bail!("the paired workloads compare headway (or the floor) with direct");
    }
    let rig = bed.headway.as_mut().context("no headway agent")?;
    if let Some(policy) = c.headway_policy() {
        rig.set_policy(policy)?;
    }
    let before = rig.counters()?;
    let (ns, headway_cgroup) = bed.client(c)?;
    let (_, plain) = bed.client(Contender::Direct)?;
    let mut cmd = Command::new(client_bin()?);
    cmd.arg("paired-client")
        .arg("--plain-cgroup")
        .arg(relative(plain.path())?)
        .arg("--headway-cgroup")
        .arg(relative(headway_cgroup.path())?)
        .args(["--service", super::headway::SERVICE])
        .args(["--port", &HTTP_PORT.to_string()])
        .args(["--threads", &threads(w, bed.pods.len()).to_string()])
        .args(["--millis", &duration.as_millis().to_string()])
        .args(["--seed", &(round as u64 * 7 + 1).to_string()]);
    if w == Workload::PairedNew {
        cmd.args(["--new-connections", "2000"]);
        if c == Contender::HeadwayRandom {
            let pods: Vec<String> = bed.pods.iter().map(Ipv4Addr::to_string).collect();
            cmd.arg("--spread").args(["--pods", &pods.join(",")]);
        }
    }
    let expected = BTreeMap::from([
        (Side::Direct, relative(plain.path())?),
        (Side::Control, relative(plain.path())?),
        (Side::Headway, relative(headway_cgroup.path())?),
    ]);
    let mut child = ns.spawn(Some(plain), &cmd)?;
    let (status, stdout) = child.wait_output(duration + Duration::from_secs(60))?;
    if !status.success() {
        bail!("paired client failed ({status}) in {}", ns.name());
    }
    let report: ClientReport = serde_json::from_str(stdout.trim())
        .with_context(|| format!("parsing the paired client's report {stdout:.200}"))?;
    check_sockets(&report.threads, &expected)?;
    let rig = bed.headway.as_mut().context("no headway agent")?;
    let decisions = rig.counters()?.since(&before).decisions;
    let blocks = report.blocks();
    let requests = Side::ALL
        .iter()
        .map(|s| (*s, blocks.iter().map(|b| b.side(*s).requests).sum()))
        .collect();
    Ok(PairedSample {
        round,
        workload: w,
        contender: c,
        threads: report.threads,
        decisions,
        requests,
        blocks,
    })
}

/// A cgroup's path relative to the cgroup2 root (what the client and
/// `ss --cgroup` use, whatever the mount point).
fn relative(cgroup: &Path) -> anyhow::Result<PathBuf> {
    let root = headway_testbed::cgroup2_mount()?;
    Ok(cgroup
        .strip_prefix(&root)
        .with_context(|| format!("{} is not under {}", cgroup.display(), root.display()))?
        .to_owned())
}

/// The xtask binary, to run as the client. `cargo xtask bench` rebuilds
/// the workspace's binaries after it started, which can replace this very
/// file: Linux then reports the running one as "PATH (deleted)", and the
/// file now at PATH is the rebuilt xtask of the same sources. From a test
/// binary (target/debug/deps/xtask-HASH), the xtask binary next to it or
/// one directory up.
fn client_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let text = exe.to_string_lossy();
    let exe = match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    };
    if exe.file_name().is_some_and(|n| n == "xtask") {
        return Ok(exe);
    }
    let dir = exe.parent().context("the executable has no directory")?;
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join("xtask"))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no xtask binary near {} (cargo build -p xtask)",
                exe.display()
            )
        })
}

/// Every side's socket is in the cgroup it is meant to be in and reaches
/// the thread's pod; the method means nothing otherwise.
fn check_sockets(
    threads: &[ThreadSetup],
    expected: &BTreeMap<Side, PathBuf>,
) -> anyhow::Result<()> {
    for (i, t) in threads.iter().enumerate() {
        for (side, want) in expected {
            let got = t
                .cgroups
                .get(side)
                .with_context(|| format!("thread {i}: no {} socket", side.id()))?;
            if Path::new(got.trim_start_matches('/')) != want {
                bail!(
                    "thread {i}: the {} socket is in cgroup {got}, not {}",
                    side.id(),
                    want.display()
                );
            }
            let remote = t.remotes.get(side).map(String::as_str);
            if remote != Some(t.pod.as_str()) {
                bail!(
                    "thread {i}: the {} socket reaches {remote:?}, not the pod {}",
                    side.id(),
                    t.pod
                );
            }
        }
    }
    Ok(())
}

/// The program-run check (BPF stats on): the client in A/A mode only (no
/// headway socket) and then paired, for one headway contender; how many
/// runs of the per-packet programs each made, per request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramRuns {
    pub contender: Contender,
    /// Requests of the A/A-only run, and the runs of any headway program
    /// meanwhile (expected: none).
    pub control_only_requests: u64,
    pub control_only_runs: BTreeMap<String, u64>,
    /// The paired run: requests on the headway side and on the two plain
    /// sides, and each program's runs.
    pub headway_requests: u64,
    pub plain_requests: u64,
    pub paired_runs: BTreeMap<String, u64>,
}

impl ProgramRuns {
    /// Runs of cgroup_skb programs per headway-side request.
    pub fn skb_runs_per_headway_request(&self) -> f64 {
        let skb: u64 = self
            .paired_runs
            .iter()
            .filter(|(k, _)| k.starts_with("hw_skb_"))
            .map(|(_, v)| v)
            .sum();
        skb as f64 / self.headway_requests.max(1) as f64
    }

    pub fn control_only_total_runs(&self) -> u64 {
        self.control_only_runs.values().sum()
    }
}

/// With BPF stats on (the caller enables them): the A/A-only client, then
/// the paired one-connection client, each for `duration`, counting the
/// programs' runs.
pub fn program_runs(
    bed: &mut Bed,
    c: Contender,
    duration: Duration,
) -> anyhow::Result<ProgramRuns> {
    let rig = bed.headway.as_mut().context("no headway agent")?;
    rig.set_policy(c.headway_policy().context("not a headway contender")?)?;
    let stats = |bed: &mut Bed| -> anyhow::Result<BTreeMap<String, u64>> {
        let rig = bed.headway.as_mut().context("no headway agent")?;
        Ok(rig
            .program_stats()?
            .into_iter()
            .map(|(k, (runs, _))| (k, runs))
            .collect())
    };
    let delta = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
        b.iter()
            .map(|(k, v)| (k.clone(), v.saturating_sub(a.get(k).copied().unwrap_or(0))))
            .collect::<BTreeMap<_, _>>()
    };

    let s0 = stats(bed)?;
    let (ns, _) = bed.client(c)?;
    let (_, plain) = bed.client(Contender::Direct)?;
    let pods: Vec<String> = bed.pods.iter().map(Ipv4Addr::to_string).collect();
    let mut cmd = Command::new(client_bin()?);
    cmd.arg("paired-client")
        .arg("--plain-cgroup")
        .arg(relative(plain.path())?)
        .args(["--pods", &pods.join(",")])
        .args(["--millis", &duration.as_millis().to_string()]);
    let mut child = ns.spawn(Some(plain), &cmd)?;
    let (status, stdout) = child.wait_output(duration + Duration::from_secs(60))?;
    if !status.success() {
        bail!("A/A paired client failed ({status})");
    }
    let report: ClientReport = serde_json::from_str(stdout.trim())?;
    let control_only_requests = report
        .blocks()
        .iter()
        .map(|b| b.side(Side::Direct).requests + b.side(Side::Control).requests)
        .sum();
    let s1 = stats(bed)?;
    let sample = run(bed, 0, Workload::PairedOne, c, duration)?;
    let s2 = stats(bed)?;
    Ok(ProgramRuns {
        contender: c,
        control_only_requests,
        control_only_runs: delta(&s0, &s1),
        headway_requests: sample.requests[&Side::Headway],
        plain_requests: sample.requests[&Side::Direct] + sample.requests[&Side::Control],
        paired_runs: delta(&s1, &s2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_lines_into_ports_remotes_and_cgroups() {
        let text = "0      0      10.77.0.7:40112  10.77.0.11:80 cgroup:/hw1a-bench-direct\n\
                    0      0      10.77.0.7:40114  10.77.0.12:80 cgroup:/hw1a-bench-headway\n\
                    0      0      10.77.0.7:40116  10.77.0.12:80\n";
        let s = parse_ss(text);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[&40114],
            ("10.77.0.12".to_owned(), "/hw1a-bench-headway".to_owned())
        );
    }

    #[test]
    fn new_connections_go_where_their_side_says() {
        let setup = ThreadSetup {
            pod: "10.77.0.11".into(),
            asked: Some("10.77.0.10".into()),
            ..ThreadSetup::default()
        };
        let pods: Vec<Ipv4Addr> = ["10.77.0.10", "10.77.0.11", "10.77.0.12"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let mut rng = Rng::new(7);
        // Without spreading, the plain sides follow the headway side's pod.
        let fixed = NewTargets::of(&setup, 80, None).unwrap();
        let at = |t: &NewTargets, side, plain| t.of_side(side, plain).unwrap().to_string();
        let plain = fixed.plain(&mut rng);
        assert_eq!(plain.to_string(), "10.77.0.11:80");
        assert_eq!(at(&fixed, Side::Headway, plain), "10.77.0.10:80");
        assert_eq!(at(&fixed, Side::Control, plain), "10.77.0.11:80");
        // Spreading: every pod comes up, the headway side still asks for
        // the address it resolved.
        let spread = NewTargets::of(&setup, 80, Some(&pods)).unwrap();
        let seen: std::collections::BTreeSet<String> = (0..200)
            .map(|_| spread.plain(&mut rng).ip().to_string())
            .collect();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(at(&spread, Side::Headway, plain), "10.77.0.10:80");
        let no_headway = ThreadSetup {
            asked: None,
            ..setup
        };
        let t = NewTargets::of(&no_headway, 80, None).unwrap();
        assert!(t.of_side(Side::Headway, plain).is_err());
    }

    #[test]
    fn reads_status_and_length_of_a_response_head() {
        let head =
            b"HTTP/1.1 200 OK\r\nServer: nginx\r\ncontent-length: 3\r\nConnection: keep-alive";
        assert_eq!(response_body_len(head).unwrap(), 3);
        assert!(response_body_len(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3").is_err());
        assert!(response_body_len(b"HTTP/1.1 200 OK\r\nServer: nginx").is_err());
    }

    #[test]
    fn sockets_must_sit_in_their_side_s_cgroup_and_reach_the_pod() {
        let expected = BTreeMap::from([
            (Side::Direct, PathBuf::from("hw1-bench-direct")),
            (Side::Headway, PathBuf::from("hw1-bench-headway")),
        ]);
        let mut t = ThreadSetup {
            pod: "10.77.0.10".into(),
            ..ThreadSetup::default()
        };
        for (side, cg) in [
            (Side::Direct, "/hw1-bench-direct"),
            (Side::Headway, "/hw1-bench-headway"),
        ] {
            t.cgroups.insert(side, cg.into());
            t.remotes.insert(side, "10.77.0.10".into());
        }
        assert!(check_sockets(std::slice::from_ref(&t), &expected).is_ok());
        let mut wrong = t.clone();
        wrong
            .cgroups
            .insert(Side::Headway, "/hw1-bench-direct".into());
        assert!(check_sockets(&[wrong], &expected).is_err());
        let mut root = t.clone();
        root.cgroups.insert(Side::Direct, "/".into());
        assert!(check_sockets(&[root], &expected).is_err());
        let mut elsewhere = t;
        elsewhere.remotes.insert(Side::Headway, "10.77.0.11".into());
        assert!(check_sockets(&[elsewhere], &expected).is_err());
    }
}
