//! Test peer: a server that answers with its pod name, and a client that
//! counts who answered (connecting to an address, or to a name resolved by
//! glibc before every attempt). Meant to run inside test network
//! namespaces only.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket,
};
use std::thread;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{ArgGroup, Parser, Subcommand};
use headway_testbed::bulk;
use headway_testbed::dns::in_named_netns;
use headway_testbed::{ConnectReport, NamedConnectReport, ResolveReport};
use socket2::Type;

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
    #[command(group = ArgGroup::new("target").required(true).args(["addr", "name"]))]
    Connect {
        #[arg(long)]
        addr: Option<IpAddr>,
        /// Resolve HOST with the system resolver (glibc getaddrinfo, so
        /// /etc/resolv.conf, search list and ndots apply) before every
        /// attempt, and connect to the first address it returns.
        #[arg(long, value_name = "HOST")]
        name: Option<String>,
        /// With --name: take the first address of this family (4 or 6).
        #[arg(long, requires = "name", value_parser = parse_family)]
        family: Option<u8>,
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
    /// Print, as JSON, the addresses getaddrinfo returns for NAME (in its
    /// order), or its error (then the exit status is 1).
    Resolve {
        #[arg(long)]
        name: String,
    },
    /// Serve known amounts of traffic on PORT (TCP and UDP; see
    /// headway_testbed::bulk for the protocol).
    Sink {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "::")]
        bind: IpAddr,
    },
    /// Move UP bytes to a sink and DOWN bytes back, COUNT times (TCP
    /// connections, or datagrams on one connected UDP socket); print what
    /// moved.
    Bulk {
        #[arg(long)]
        addr: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        up: u64,
        #[arg(long)]
        down: u64,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long)]
        udp: bool,
        /// TCP: the server closes first (otherwise the client does).
        #[arg(long)]
        server_closes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Open COUNT TCP connections to a sink, print "ready", and keep them
    /// open until killed.
    Hold {
        #[arg(long)]
        addr: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The server resets each connection at once.
        #[arg(long)]
        reset: bool,
    },
}

fn parse_family(text: &str) -> Result<u8, String> {
    match text {
        "4" => Ok(4),
        "6" => Ok(6),
        _ => Err("must be 4 or 6".to_owned()),
    }
}

/// Where the attempts go.
enum Target {
    Addr(SocketAddr),
    /// Resolved anew before every attempt.
    Name {
        name: String,
        port: u16,
        family: Option<u8>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve { name, port, bind } => serve(&name, SocketAddr::new(bind, port)),
        Cmd::Connect {
            addr,
            name,
            family,
            port,
            count,
            udp,
            json,
        } => {
            let target = match (addr, name) {
                (Some(addr), _) => {
                    refuse_host_namespace(addr)?;
                    Target::Addr(SocketAddr::new(addr, port))
                }
                (None, Some(name)) => {
                    refuse_resolving_outside(&name)?;
                    Target::Name { name, port, family }
                }
                (None, None) => bail!("--addr or --name is required"),
            };
            let report = connect(&target, count, udp)?;
            print_report(&report, matches!(target, Target::Name { .. }), json)
        }
        Cmd::Sink { port, bind } => bulk::serve_sink(SocketAddr::new(bind, port)),
        Cmd::Bulk {
            addr,
            port,
            up,
            down,
            count,
            udp,
            server_closes,
            json,
        } => {
            refuse_host_namespace(addr)?;
            let target = SocketAddr::new(addr, port);
            let report = if udp {
                bulk::bulk_udp(target, up, down, count)
            } else {
                let flags = if server_closes {
                    bulk::SERVER_CLOSES
                } else {
                    0
                };
                bulk::bulk_tcp(target, bulk::Request { up, down, flags }, count)
            };
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{report:?}");
            }
            Ok(())
        }
        Cmd::Hold {
            addr,
            port,
            count,
            reset,
        } => {
            refuse_host_namespace(addr)?;
            let flags = if reset { bulk::RESET } else { 0 };
            bulk::hold(SocketAddr::new(addr, port), count, flags)
        }
        Cmd::Resolve { name } => {
            refuse_resolving_outside(&name)?;
            let report = match lookup(&name, 0) {
                Ok(addrs) => ResolveReport {
                    name,
                    addrs: addrs.iter().map(SocketAddr::ip).collect(),
                    error: None,
                },
                Err(e) => ResolveReport {
                    name,
                    addrs: Vec::new(),
                    error: Some(e.to_string()),
                },
            };
            println!("{}", serde_json::to_string(&report)?);
            if report.error.is_some() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn serve(name: &str, addr: SocketAddr) -> Result<()> {
    let reply = format!("{name}\n").into_bytes();
    let tcp = listen_tcp(addr)?;
    let udp: UdpSocket = headway_testbed::bind_server(addr, Type::DGRAM)?.into();
    let udp_reply = reply.clone();
    thread::spawn(move || serve_udp(&udp, &udp_reply));
    // Both sockets are bound: tell the test bed it may start clients.
    println!("ready");
    io::stdout().flush()?;
    serve_tcp(&tcp, &reply);
    Ok(())
}

fn listen_tcp(addr: SocketAddr) -> Result<TcpListener> {
    let socket = headway_testbed::bind_server(addr, Type::STREAM)?;
    socket.listen(128)?;
    Ok(socket.into())
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

/// A lookup asks the nameserver of /etc/resolv.conf: in the host
/// namespace that is a real one, and the query (a test name) would leave
/// the machine.
fn refuse_resolving_outside(name: &str) -> Result<()> {
    if !in_named_netns() {
        bail!(
            "refusing to resolve {name}: not inside a namespace made with `ip netns add` \
             (run me via `ip netns exec`)"
        );
    }
    Ok(())
}

/// glibc's getaddrinfo (std calls it with AI_SOCKTYPE=SOCK_STREAM), in the
/// order it returns: a fresh lookup on every call (nothing caches it in
/// process; nscd does not run in the test namespaces).
fn lookup(name: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    Ok((name, port).to_socket_addrs()?.collect())
}

/// The first address `lookup` returns, of `family` if given.
fn resolve_first(name: &str, port: u16, family: Option<u8>) -> io::Result<SocketAddr> {
    let wanted = |a: &SocketAddr| match family {
        Some(4) => a.is_ipv4(),
        Some(6) => a.is_ipv6(),
        _ => true,
    };
    lookup(name, port)?.into_iter().find(wanted).ok_or_else(|| {
        let family = family.map_or(String::new(), |f| format!("IPv{f} "));
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no {family}address for {name}"),
        )
    })
}

/// The outcome of one attempt: getpeername() if connected, and the answer.
struct Attempt {
    peer: Option<SocketAddr>,
    answer: io::Result<String>,
}

fn connect(target: &Target, count: u32, udp: bool) -> Result<NamedConnectReport> {
    let mut report = NamedConnectReport::default();
    for _ in 0..count {
        let addr = match target {
            Target::Addr(addr) => *addr,
            Target::Name { name, port, family } => match resolve_first(name, *port, *family) {
                Ok(addr) => {
                    refuse_host_namespace(addr.ip())?;
                    *report.resolved.entry(addr.ip().to_string()).or_default() += 1;
                    addr
                }
                Err(e) => {
                    let answer = Err(io::Error::new(e.kind(), format!("resolving {name}: {e}")));
                    record(&mut report.report, Attempt { peer: None, answer });
                    continue;
                }
            },
        };
        let attempt = if udp {
            udp_attempt(addr)
        } else {
            tcp_attempt(addr)
        };
        record(&mut report.report, attempt);
    }
    Ok(report)
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

/// With `named`, the report has `resolved` next to the fields of
/// [`ConnectReport`]; without, it is exactly a `ConnectReport`.
fn print_report(report: &NamedConnectReport, named: bool, json: bool) -> Result<()> {
    if json {
        let text = if named {
            serde_json::to_string(report)?
        } else {
            serde_json::to_string(&report.report)?
        };
        println!("{text}");
        return Ok(());
    }
    let inner: &ConnectReport = &report.report;
    let lines = [
        ("resolved", &report.resolved),
        ("answer", &inner.answers),
        ("peer", &inner.peer_addrs),
        ("error", &inner.errors),
    ];
    for (what, counts) in lines {
        print_counts(what, counts);
    }
    println!("failures: {}", inner.failures);
    Ok(())
}

fn print_counts(what: &str, counts: &BTreeMap<String, u64>) {
    for (key, n) in counts {
        println!("{what} {key}: {n}");
    }
}
