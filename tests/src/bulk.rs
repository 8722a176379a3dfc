//! Known amounts of traffic, for checking headway's byte and
//! active-connection counters: a sink server (`headway-peer sink`), a bulk
//! client that moves a given number of bytes each way and reports what it
//! moved (`headway-peer bulk`), and a holder that keeps TCP connections
//! open until it is killed (`headway-peer hold`).
//!
//! TCP protocol: the client sends a [`Request`] header, then `up` bytes;
//! the server reads them, sends `down` bytes, and then either closes first
//! (`SERVER_CLOSES`), resets the connection at once (`RESET`, before any
//! of this), or waits for the client to close. UDP: every datagram starts
//! with the size of the reply it asks for (8 bytes, big endian) and gets a
//! reply of that size.
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use socket2::{SockRef, Type};

use crate::{Cgroup, Child, Cluster, NetNs, peer::peer_bin};

/// Bytes of the TCP request header, counted as payload the client sent.
pub const HEADER_LEN: u64 = 17;
/// Request flag: the server resets the connection instead of answering.
pub const RESET: u8 = 1;
/// Request flag: the server closes first after sending `down` bytes.
pub const SERVER_CLOSES: u8 = 2;
/// Largest UDP reply the sink sends.
pub const MAX_UDP_REPLY: usize = 60_000;
const CHUNK: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(10);

/// What a TCP client asks the sink for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub up: u64,
    pub down: u64,
    pub flags: u8,
}

impl Request {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut out = [0u8; HEADER_LEN as usize];
        out[..8].copy_from_slice(&self.up.to_be_bytes());
        out[8..16].copy_from_slice(&self.down.to_be_bytes());
        out[16] = self.flags;
        out
    }

    fn decode(bytes: &[u8; HEADER_LEN as usize]) -> Request {
        let word = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        Request {
            up: word(0),
            down: word(8),
            flags: bytes[16],
        }
    }
}

/// What `headway-peer bulk --json` moved: payload bytes as the client's
/// socket calls reported them.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkReport {
    /// Exchanges (TCP connections or UDP datagrams) that completed.
    pub completed: u64,
    pub failures: u64,
    pub sent: u64,
    pub received: u64,
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
}

// ---- server -------------------------------------------------------------

/// `headway-peer sink`: TCP and UDP on `addr`, a thread per connection.
pub fn serve_sink(addr: SocketAddr) -> Result<()> {
    let tcp: TcpListener = {
        let socket = crate::bind_server(addr, Type::STREAM)?;
        socket.listen(128)?;
        socket.into()
    };
    let udp: UdpSocket = crate::bind_server(addr, Type::DGRAM)?.into();
    thread::spawn(move || sink_udp(&udp));
    println!("ready");
    io::stdout().flush()?;
    for conn in tcp.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || {
                    if let Err(e) = sink_tcp(stream) {
                        eprintln!("headway-peer sink: tcp: {e}");
                    }
                });
            }
            Err(e) => eprintln!("headway-peer sink: accept: {e}"),
        }
    }
    Ok(())
}

fn sink_tcp(mut stream: TcpStream) -> io::Result<()> {
    let mut header = [0u8; HEADER_LEN as usize];
    stream.read_exact(&mut header)?;
    let req = Request::decode(&header);
    if req.flags & RESET != 0 {
        // Linger 0: close() sends RST instead of FIN.
        SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
        return Ok(());
    }
    let got = io::copy(&mut (&mut stream).take(req.up), &mut io::sink())?;
    if got != req.up {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("client sent {got} of {} bytes", req.up),
        ));
    }
    write_zeros(&mut stream, req.down)?;
    if req.flags & SERVER_CLOSES == 0 {
        // Wait for the client's FIN, so the client closes first.
        io::copy(&mut stream, &mut io::sink())?;
    }
    Ok(())
}

fn sink_udp(socket: &UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    let reply = vec![0u8; MAX_UDP_REPLY];
    loop {
        let result = socket.recv_from(&mut buf).and_then(|(n, from)| {
            let want = buf[..n.min(8)]
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0) as usize;
            socket.send_to(&reply[..want.min(MAX_UDP_REPLY)], from)
        });
        if let Err(e) = result {
            eprintln!("headway-peer sink: udp: {e}");
        }
    }
}

fn write_zeros(stream: &mut TcpStream, mut n: u64) -> io::Result<()> {
    let zeros = [0u8; CHUNK];
    while n > 0 {
        let len = n.min(CHUNK as u64) as usize;
        stream.write_all(&zeros[..len])?;
        n -= len as u64;
    }
    Ok(())
}

// ---- clients ------------------------------------------------------------

/// `headway-peer bulk`, TCP: `count` connections, one after the other.
pub fn bulk_tcp(target: SocketAddr, req: Request, count: u32) -> BulkReport {
    let mut report = BulkReport::default();
    for _ in 0..count {
        let mut moved = (0, 0);
        match tcp_exchange(target, req, &mut moved) {
            Ok(()) => report.completed += 1,
            Err(e) => {
                report.failures += 1;
                *report.errors.entry(e.to_string()).or_default() += 1;
            }
        }
        report.sent += moved.0;
        report.received += moved.1;
    }
    report
}

/// One exchange; `moved` gets (sent, received) even when it fails midway.
fn tcp_exchange(target: SocketAddr, req: Request, moved: &mut (u64, u64)) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(&req.encode())?;
    moved.0 += HEADER_LEN;
    let zeros = [0u8; CHUNK];
    let mut left = req.up;
    while left > 0 {
        let len = left.min(CHUNK as u64) as usize;
        let n = stream.write(&zeros[..len])?;
        moved.0 += n as u64;
        left -= n as u64;
    }
    let mut buf = vec![0u8; CHUNK];
    let mut want = req.down;
    while want > 0 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed early",
            ));
        }
        moved.1 += n as u64;
        want = want.saturating_sub(n as u64);
    }
    if req.flags & SERVER_CLOSES == 0 {
        stream.shutdown(Shutdown::Write)?;
    }
    // Nothing more may come: read up to the server's FIN.
    let extra = io::copy(&mut stream, &mut io::sink())?;
    moved.1 += extra;
    Ok(())
}

/// `headway-peer bulk --udp`: one connected socket, `count` datagrams of
/// `up` bytes (at least 8), each answered with `down` bytes.
pub fn bulk_udp(target: SocketAddr, up: u64, down: u64, count: u32) -> BulkReport {
    let mut report = BulkReport::default();
    let local: IpAddr = if target.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = match UdpSocket::bind((local, 0))
        .and_then(|s| s.connect(target).map(|()| s))
        .and_then(|s| s.set_read_timeout(Some(Duration::from_secs(2))).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => {
            report.failures = u64::from(count);
            report.errors.insert(e.to_string(), u64::from(count));
            return report;
        }
    };
    let mut datagram = vec![0u8; up.max(8) as usize];
    datagram[..8].copy_from_slice(&down.to_be_bytes());
    let mut buf = vec![0u8; 65_536];
    for _ in 0..count {
        let result = socket.send(&datagram).and_then(|n| {
            report.sent += n as u64;
            socket.recv(&mut buf)
        });
        match result {
            Ok(n) => {
                report.received += n as u64;
                report.completed += 1;
            }
            Err(e) => {
                report.failures += 1;
                *report.errors.entry(e.to_string()).or_default() += 1;
            }
        }
    }
    report
}

/// `headway-peer hold`: `count` TCP connections that stay open until the
/// process is killed. With `RESET` in `flags` the server resets each one
/// at once, and "ready" is printed only after the client saw the reset.
pub fn hold(target: SocketAddr, count: u32, flags: u8) -> Result<()> {
    let req = Request {
        up: 0,
        down: 0,
        flags,
    };
    let mut held = Vec::new();
    for i in 0..count {
        let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)
            .with_context(|| format!("connection {i} to {target}"))?;
        stream.write_all(&req.encode())?;
        if flags & RESET != 0 {
            stream.set_read_timeout(Some(TIMEOUT))?;
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                other => bail!("expected a reset from {target}, got {other:?}"),
            }
        }
        held.push(stream);
    }
    println!("ready");
    io::stdout().flush()?;
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

// ---- drivers for tests ----------------------------------------------------

/// Starts `headway-peer sink --port <port>` in every pod's namespace (and
/// in `cgroup`, if given: then the pods' own sockets are hooked too) and
/// waits until all listen.
pub fn start_sinks(cluster: &Cluster, port: u16, cgroup: Option<&Cgroup>) -> Result<Vec<Child>> {
    let bin = peer_bin()?;
    let mut servers = Vec::new();
    for pod in cluster.pods() {
        let mut cmd = Command::new(&bin);
        cmd.args(["sink", "--port", &port.to_string()]);
        let mut server = pod.ns().spawn(cgroup, &cmd)?;
        server.wait_ready()?;
        servers.push(server);
    }
    Ok(servers)
}

/// How a bulk client should run.
#[derive(Debug, Clone, Copy)]
pub struct Bulk {
    pub up: u64,
    pub down: u64,
    pub count: u32,
    pub udp: bool,
    pub server_closes: bool,
}

/// Runs `headway-peer bulk` in `ns` (and `cgroup`) against `addr:port`.
pub fn run_bulk(
    ns: &NetNs,
    cgroup: Option<&Cgroup>,
    addr: IpAddr,
    port: u16,
    bulk: Bulk,
) -> Result<BulkReport> {
    let mut cmd = Command::new(peer_bin()?);
    cmd.args(["bulk", "--json", "--addr", &addr.to_string()])
        .args(["--port", &port.to_string()])
        .args([
            "--up",
            &bulk.up.to_string(),
            "--down",
            &bulk.down.to_string(),
        ])
        .args(["--count", &bulk.count.to_string()]);
    if bulk.udp {
        cmd.arg("--udp");
    }
    if bulk.server_closes {
        cmd.arg("--server-closes");
    }
    let mut child = ns.spawn(cgroup, &cmd)?;
    let bound = Duration::from_secs(30) + TIMEOUT * bulk.count;
    let (status, stdout) = child.wait_output(bound)?;
    if !status.success() {
        bail!("{} failed ({status}); stdout: {stdout}", child.label());
    }
    serde_json::from_str(&stdout).with_context(|| format!("parsing bulk report {stdout:?}"))
}

/// Starts `headway-peer hold` in `ns` (and `cgroup`) and waits until its
/// `count` connections are established (and, with `reset`, reset by the
/// server). Killing the child closes them.
pub fn start_holder(
    ns: &NetNs,
    cgroup: Option<&Cgroup>,
    addr: IpAddr,
    port: u16,
    count: u32,
    reset: bool,
) -> Result<Child> {
    let mut cmd = Command::new(peer_bin()?);
    cmd.args(["hold", "--addr", &addr.to_string()]).args([
        "--port",
        &port.to_string(),
        "--count",
        &count.to_string(),
    ]);
    if reset {
        cmd.arg("--reset");
    }
    let mut child = ns.spawn(cgroup, &cmd)?;
    child.wait_ready()?;
    Ok(child)
}
