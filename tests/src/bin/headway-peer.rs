//! Test peer: a server that answers with its pod name, and a client that
//! counts who answered. Meant to run inside test network namespaces only.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use headway_testbed::ConnectReport;
use socket2::{Domain, Socket, Type};

/// Per-step timeout of a connect attempt (connect, then the answer).
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(about = "headway test peer (run inside test network namespaces)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer every TCP connection and UDP datagram on PORT with "NAME\n".
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        /// `::` (the default) serves IPv4 and IPv6 on one socket.
        #[arg(long, default_value = "::")]
        bind: IpAddr,
    },
    /// Connect COUNT times, one after the other, and report who answered.
    Connect {
        #[arg(long)]
        addr: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long)]
        udp: bool,
        /// Print the report as JSON (for the test bed) instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve { name, port, bind } => serve(&name, SocketAddr::new(bind, port)),
        Cmd::Connect {
            addr,
            port,
            count,
            udp,
            json,
        } => {
            refuse_host_namespace(addr)?;
            let report = connect(SocketAddr::new(addr, port), count, udp);
            print_report(&report, json)
        }
    }
}

fn serve(name: &str, addr: SocketAddr) -> Result<()> {
    let reply = format!("{name}\n").into_bytes();
    let tcp = listen_tcp(addr)?;
    let udp: UdpSocket = bind(addr, Type::DGRAM)?.into();
    let udp_reply = reply.clone();
    thread::spawn(move || serve_udp(&udp, &udp_reply));
    // Both sockets are bound: tell the test bed it may start clients.
    println!("ready");
    io::stdout().flush()?;
    serve_tcp(&tcp, &reply);
    Ok(())
}

fn listen_tcp(addr: SocketAddr) -> Result<TcpListener> {
    let socket = bind(addr, Type::STREAM)?;
    socket.listen(128)?;
    Ok(socket.into())
}

fn bind(addr: SocketAddr, ty: Type) -> Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // Dual-stack regardless of net.ipv6.bindv6only.
        socket.set_only_v6(false)?;
    }
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    Ok(socket)
}

fn serve_tcp(listener: &TcpListener, reply: &[u8]) {
    for conn in listener.incoming() {
        // Dropping the stream closes it right after the answer.
        match conn.and_then(|mut stream| stream.write_all(reply)) {
            Ok(()) => {}
            Err(e) => eprintln!("headway-peer: tcp: {e}"),
        }
    }
}

fn serve_udp(socket: &UdpSocket, reply: &[u8]) {
    let mut buf = [0u8; 1500];
    loop {
        let result = socket
            .recv_from(&mut buf)
            .and_then(|(_, from)| socket.send_to(reply, from));
        if let Err(e) = result {
            eprintln!("headway-peer: udp: {e}");
        }
    }
}

/// The safety net of testing.md: test addresses are reachable only from
/// namespaces the test made, so a client anywhere else (the host namespace
/// above all) is a bug, and if a hook misbehaved, a packet leaving the
/// machine.
fn refuse_host_namespace(addr: IpAddr) -> Result<()> {
    if !addr.is_loopback() && !in_named_netns() {
        bail!(
            "refusing to connect to {addr}: not inside a namespace made with `ip netns add` \
             (run me via `ip netns exec`)"
        );
    }
    Ok(())
}

/// Whether our network namespace is one of those under /run/netns. (Comparing
/// with pid 1's namespace would be simpler, but sandboxes often hide it.)
fn in_named_netns() -> bool {
    let Ok(ours) = std::fs::metadata("/proc/self/ns/net") else {
        return false;
    };
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return false;
    };
    entries
        .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
        .any(|m| (m.dev(), m.ino()) == (ours.dev(), ours.ino()))
}

/// The outcome of one attempt: getpeername() if connected, and the answer.
struct Attempt {
    peer: Option<SocketAddr>,
    answer: io::Result<String>,
}

fn connect(target: SocketAddr, count: u32, udp: bool) -> ConnectReport {
    let mut report = ConnectReport::default();
    for _ in 0..count {
        let attempt = if udp {
            udp_attempt(target)
        } else {
            tcp_attempt(target)
        };
        record(&mut report, attempt);
    }
    report
}

fn record(report: &mut ConnectReport, attempt: Attempt) {
    if let Some(peer) = attempt.peer {
        *report.peer_addrs.entry(peer.to_string()).or_default() += 1;
    }
    match attempt.answer {
        Ok(name) => *report.answers.entry(name).or_default() += 1,
        Err(e) => {
            report.failures += 1;
            *report.errors.entry(e.to_string()).or_default() += 1;
        }
    }
}

fn tcp_attempt(target: SocketAddr) -> Attempt {
    let stream = match TcpStream::connect_timeout(&target, TIMEOUT) {
        Ok(stream) => stream,
        Err(e) => {
            return Attempt {
                peer: None,
                answer: Err(e),
            };
        }
    };
    let peer = stream.peer_addr().ok();
    Attempt {
        peer,
        answer: read_answer(stream),
    }
}

/// The server writes one line and closes.
fn read_answer(mut stream: TcpStream) -> io::Result<String> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    parse_answer(text.as_bytes())
}

fn udp_attempt(target: SocketAddr) -> Attempt {
    let local: IpAddr = match target {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = match UdpSocket::bind((local, 0)).and_then(|s| s.connect(target).map(|()| s)) {
        Ok(socket) => socket,
        Err(e) => {
            return Attempt {
                peer: None,
                answer: Err(e),
            };
        }
    };
    let peer = socket.peer_addr().ok();
    Attempt {
        peer,
        answer: udp_exchange(&socket),
    }
}

fn udp_exchange(socket: &UdpSocket) -> io::Result<String> {
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send(b"hi")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    parse_answer(&buf[..n])
}

fn parse_answer(bytes: &[u8]) -> io::Result<String> {
    let name = String::from_utf8_lossy(bytes).trim().to_owned();
    if name.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "empty answer"));
    }
    Ok(name)
}

fn print_report(report: &ConnectReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    let lines = [
        ("answer", &report.answers),
        ("peer", &report.peer_addrs),
        ("error", &report.errors),
    ];
    for (what, counts) in lines {
        print_counts(what, counts);
    }
    println!("failures: {}", report.failures);
    Ok(())
}

fn print_counts(what: &str, counts: &BTreeMap<String, u64>) {
    for (key, n) in counts {
        println!("{what} {key}: {n}");
    }
}
