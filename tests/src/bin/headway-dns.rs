//! Test DNS server: answers a JSON zone file like CoreDNS answers for
//! headless services (see `headway_testbed::dns`), over UDP and TCP.
//! `headway-dns query` is its raw client: it prints the response bytes.
//! Meant to run inside test network namespaces only.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use headway_testbed::dns::{RawExchange, ZoneFile, in_named_netns, to_hex};
use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RecordType};
use socket2::Type;

/// A TCP client gets this long for each message before we hang up.
const TCP_IDLE: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(
    about = "headway test DNS server (run inside test network namespaces)",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// The zone file (JSON); re-read whenever it changes.
    #[arg(long, required = true)]
    zone: Option<PathBuf>,
    /// Where to listen, UDP and TCP (`[::]:53` serves both families).
    #[arg(long, required = true)]
    listen: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Send one query and print the raw response as JSON
    /// `{"id": ID, "response": "HEX"}`.
    Query {
        #[arg(long)]
        server: IpAddr,
        #[arg(long, default_value_t = 53)]
        port: u16,
        #[arg(long)]
        name: String,
        #[arg(long = "type", default_value = "A")]
        qtype: String,
        /// Over TCP instead of UDP.
        #[arg(long)]
        tcp: bool,
        /// Add an EDNS OPT record, as dig does.
        #[arg(long)]
        edns: bool,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Query {
            server,
            port,
            name,
            qtype,
            tcp,
            edns,
            timeout_ms,
        }) => {
            refuse_host_namespace(server)?;
            let server = SocketAddr::new(server, port);
            let timeout = Duration::from_millis(timeout_ms);
            let exchange = query(server, &name, &qtype, tcp, edns, timeout)?;
            println!("{}", serde_json::to_string(&exchange)?);
            Ok(())
        }
        None => {
            let zone = cli.zone.context("--zone is required")?;
            let listen = cli.listen.context("--listen is required")?;
            refuse_host_namespace(listen.ip())?;
            serve(&zone, listen)
        }
    }
}

/// Test addresses exist only in namespaces the test made: anywhere else
/// (the host namespace above all) a non-loopback address is a bug.
fn refuse_host_namespace(addr: IpAddr) -> Result<()> {
    if !addr.is_loopback() && !in_named_netns() {
        bail!(
            "refusing to use {addr}: not inside a namespace made with `ip netns add` \
             (run me via `ip netns exec`)"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Server

type Shared = Arc<Mutex<ZoneFile>>;

fn serve(zone: &Path, listen: SocketAddr) -> Result<()> {
    let zone: Shared = Arc::new(Mutex::new(ZoneFile::open(zone)?));
    let udp: UdpSocket = headway_testbed::bind_server(listen, Type::DGRAM)?.into();
    let tcp = headway_testbed::bind_server(listen, Type::STREAM)?;
    tcp.listen(64)?;
    let tcp: TcpListener = tcp.into();
    let tcp_zone = Arc::clone(&zone);
    thread::spawn(move || serve_tcp(&tcp, &tcp_zone));
    println!("ready");
    io::stdout().flush()?;
    serve_udp(&udp, &zone);
    Ok(())
}

/// The reply to one message, logging the query and any reload error.
fn answer(zone: &Shared, query: &[u8], from: SocketAddr, udp: bool) -> Option<Vec<u8>> {
    let mut zone = zone.lock().unwrap_or_else(|e| e.into_inner());
    let (responder, reload_error) = zone.responder();
    if let Some(e) = reload_error {
        eprintln!("headway-dns: keeping the previous zone: {e:#}");
    }
    let proto = if udp { "udp" } else { "tcp" };
    match responder.respond(query, udp) {
        Some(reply) => {
            eprintln!("headway-dns: {proto} {from}: {}", reply.summary);
            Some(reply.bytes)
        }
        None => {
            eprintln!(
                "headway-dns: {proto} {from}: ignored {} bytes (not a query)",
                query.len()
            );
            None
        }
    }
}

fn serve_udp(socket: &UdpSocket, zone: &Shared) {
    let mut buf = [0u8; 65535];
    loop {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(e) => {
                eprintln!("headway-dns: udp: {e}");
                continue;
            }
        };
        if let Some(reply) = answer(zone, &buf[..n], from, true)
            && let Err(e) = socket.send_to(&reply, from)
        {
            eprintln!("headway-dns: udp: sending to {from}: {e}");
        }
    }
}

fn serve_tcp(listener: &TcpListener, zone: &Shared) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let zone = Arc::clone(zone);
                thread::spawn(move || {
                    if let Err(e) = serve_conn(stream, &zone) {
                        eprintln!("headway-dns: tcp: {e}");
                    }
                });
            }
            Err(e) => eprintln!("headway-dns: tcp: {e}"),
        }
    }
}

/// Length-prefixed messages (RFC 1035 4.2.2), until the client closes.
fn serve_conn(mut stream: TcpStream, zone: &Shared) -> io::Result<()> {
    let from = stream.peer_addr()?;
    stream.set_read_timeout(Some(TCP_IDLE))?;
    loop {
        let mut len = [0u8; 2];
        match stream.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut query)?;
        let Some(reply) = answer(zone, &query, from, false) else {
            continue;
        };
        let len = u16::try_from(reply.len()).map_err(io::Error::other)?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend(reply);
        stream.write_all(&framed)?;
    }
}

// ---------------------------------------------------------------------------
// Raw client

fn query(
    server: SocketAddr,
    name: &str,
    qtype: &str,
    tcp: bool,
    edns: bool,
    timeout: Duration,
) -> Result<RawExchange> {
    let qtype = RecordType::from_str(&qtype.to_ascii_uppercase())
        .with_context(|| format!("unknown record type {qtype}"))?;
    let mut qname = Name::from_ascii(name).with_context(|| format!("bad name {name:?}"))?;
    qname.set_fqdn(true);
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(qname, qtype));
    if edns {
        message.set_edns(Edns::new());
    }
    let id = message.metadata.id;
    let request = message.to_vec()?;
    let response = if tcp {
        exchange_tcp(server, &request, timeout)?
    } else {
        exchange_udp(server, &request, timeout)?
    };
    Ok(RawExchange {
        id,
        response: to_hex(&response),
    })
}

fn exchange_udp(server: SocketAddr, request: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let local: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(local)?;
    // Connected: only datagrams from the server's address and port arrive.
    socket.connect(server)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(request)?;
    let mut buf = vec![0u8; 65535];
    let n = socket
        .recv(&mut buf)
        .with_context(|| format!("no answer from {server}"))?;
    buf.truncate(n);
    Ok(buf)
}

fn exchange_tcp(server: SocketAddr, request: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&server, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut framed = u16::try_from(request.len())?.to_be_bytes().to_vec();
    framed.extend(request);
    stream.write_all(&framed)?;
    let mut len = [0u8; 2];
    stream
        .read_exact(&mut len)
        .with_context(|| format!("no answer from {server}"))?;
    let len = usize::from(u16::from_be_bytes(len));
    let mut response = vec![0u8; len];
    stream.read_exact(&mut response)?;
    Ok(response)
}
