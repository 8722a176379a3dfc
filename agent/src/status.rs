//! `headway status`: what the pinned maps say, per service and pod. Reads
//! only the pins, so it works while the agent is down.
use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, path::Path};

use headway_common::{
    ServiceCounters, ServicePortKey, capacity, dns_counter, endpoint_flags, map_names,
    program_names, sock_counter, sock_table, steer_counter,
};
use serde::Serialize;

use crate::{
    map_plan::{decode_name, key_addr, policy_from_value, topology_from_value},
    pinned::{self, Maps, PinnedError, PodTally, pinned_max_entries},
};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    /// The kernel programs behind the pinned links.
    pub programs: Vec<ProgramStatus>,
    /// Connect decisions by reason, summed over CPUs.
    pub steering: BTreeMap<&'static str, u64>,
    /// DNS interceptor outcomes, summed over CPUs.
    pub dns: BTreeMap<&'static str, u64>,
    /// The socket table: records in use, its capacity, and the counters
    /// behind them (`taken`, `freed`, `full`), summed over CPUs.
    pub sockets: BTreeMap<&'static str, u64>,
    pub services: Vec<ServiceStatus>,
}

/// One hook as the kernel reports it. Run statistics count only while
/// `kernel.bpf_stats_enabled=1`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProgramStatus {
    pub name: &'static str,
    /// Whether its link is pinned and attached to a cgroup.
    pub attached: bool,
    pub program_id: Option<u32>,
    pub cgroup_id: Option<u64>,
    pub verified_instructions: Option<u32>,
    pub run_count: u64,
    pub run_time_ns: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    pub policy: String,
    pub topology: String,
    /// The ports it declares (`8080/TCP`), the only ones steered; empty:
    /// every port is.
    pub ports: Vec<String>,
    /// Slots of its choice tables (see `headway_common::ServiceMeta`): per
    /// family, over all eligible pods (more than one per pod under
    /// `weighted`) and over the pods its topology prefers.
    pub backends_v4: u32,
    pub backends_v6: u32,
    pub preferred_v4: u32,
    pub preferred_v6: u32,
    /// Answered lookups of its names and connect decisions about the
    /// addresses they handed out.
    pub counters: ServiceCountersStatus,
    /// Its pods' counters added up.
    pub totals: Counters,
    pub pods: Vec<PodStatus>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ServiceCountersStatus {
    pub lookups_service: u64,
    pub lookups_pod: u64,
    /// By reason, like the global `steering` counters.
    pub decisions: BTreeMap<&'static str, u64>,
}

impl From<ServiceCounters> for ServiceCountersStatus {
    fn from(c: ServiceCounters) -> Self {
        ServiceCountersStatus {
            lookups_service: c.lookups_service,
            lookups_pod: c.lookups_pod,
            decisions: steer_counter::NAMES
                .iter()
                .map(|(i, name)| (*name, c.decisions.get(*i as usize).copied().unwrap_or(0)))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub addresses: Vec<IpAddr>,
    /// ready, serving, terminating, drained, eligible — those that hold.
    pub state: Vec<&'static str>,
    pub counters: Counters,
    /// Its part of the DNS answers that handed out one of the service's
    /// pods (0..=1; none before any answer). Next to `connection_share`
    /// it shows the skew between what DNS handed out and where
    /// connections went.
    pub dns_share: Option<f64>,
    /// Its part of the connections (TCP and UDP) to the service's pods.
    pub connection_share: Option<f64>,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq, Clone, Copy)]
pub struct Counters {
    pub tcp_connects: u64,
    pub udp_connects: u64,
    /// TCP connections from this node to the pod, established and open now.
    pub active_tcp: u64,
    /// Transport payload bytes that client sockets on this node sent to
    /// the pod and received from it (TCP, connected UDP).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub steered_in: u64,
    pub steered_away: u64,
    pub dns_answers: u64,
}

impl Counters {
    /// connect() calls of both protocols.
    pub fn connections(&self) -> u64 {
        self.tcp_connects + self.udp_connects
    }

    fn add(&mut self, o: &Counters) {
        self.tcp_connects += o.tcp_connects;
        self.udp_connects += o.udp_connects;
        self.active_tcp += o.active_tcp;
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.steered_in += o.steered_in;
        self.steered_away += o.steered_away;
        self.dns_answers += o.dns_answers;
    }
}

/// `part / whole`, or none when the whole is zero.
fn share(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// Fills the service's totals and each pod's DNS and connection shares
/// from the pods' counters.
pub fn fill_shares(svc: &mut ServiceStatus) {
    let mut totals = Counters::default();
    for pod in &svc.pods {
        totals.add(&pod.counters);
    }
    for pod in &mut svc.pods {
        pod.dns_share = share(pod.counters.dns_answers, totals.dns_answers);
        pod.connection_share = share(pod.counters.connections(), totals.connections());
    }
    svc.totals = totals;
}

impl From<PodTally> for Counters {
    fn from(
        PodTally {
            counters: c,
            dns_answers,
        }: PodTally,
    ) -> Self {
        Counters {
            tcp_connects: c.tcp_connects,
            udp_connects: c.udp_connects,
            active_tcp: c.active_tcp,
            bytes_sent: c.bytes_sent,
            bytes_received: c.bytes_received,
            steered_in: c.steered_in,
            steered_away: c.steered_away,
            dns_answers,
        }
    }
}

fn state_names(flags: u32) -> Vec<&'static str> {
    [
        (endpoint_flags::READY, "ready"),
        (endpoint_flags::SERVING, "serving"),
        (endpoint_flags::TERMINATING, "terminating"),
        (endpoint_flags::DRAINED, "drained"),
        (endpoint_flags::ELIGIBLE, "eligible"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

/// What the kernel says about each program whose link is pinned.
fn read_programs(bpffs: &Path) -> Vec<ProgramStatus> {
    let loaded: Vec<aya::programs::ProgramInfo> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .collect();
    program_names::ALL
        .iter()
        .map(|name| {
            let link = pinned::link_attachment(bpffs, name).ok();
            let info = link.and_then(|l| loaded.iter().find(|p| p.id() == l.prog_id));
            ProgramStatus {
                name,
                attached: link.is_some(),
                program_id: link.map(|l| l.prog_id),
                cgroup_id: link.map(|l| l.cgroup_id),
                verified_instructions: info.and_then(|i| i.verified_instruction_count()),
                run_count: info.map_or(0, |i| i.run_count()),
                run_time_ns: info.map_or(0, |i| i.run_time().as_nanos() as u64),
            }
        })
        .collect()
}

/// The ports service `service_id` declares in `svc_ports`, as
/// `port/PROTOCOL`, in port order.
fn declared_ports(svc_ports: &BTreeMap<ServicePortKey, u32>, service_id: u32) -> Vec<String> {
    svc_ports
        .keys()
        .filter(|k| k.service_id == service_id)
        .map(|k| {
            let protocol = match k.protocol {
                6 => "TCP".to_string(),
                17 => "UDP".to_string(),
                132 => "SCTP".to_string(),
                other => format!("proto-{other}"),
            };
            format!("{}/{protocol}", k.port)
        })
        .collect()
}

/// Reads the pinned maps and links under `bpffs`.
pub fn read(bpffs: &Path) -> Result<Status, PinnedError> {
    let maps = Maps::open_pinned(bpffs)?;
    let contents = maps.read_contents()?;
    let stats = maps.read_stats(contents.pods.keys().copied())?;

    // service id → pod id → (addresses, state flags)
    let mut members: BTreeMap<u32, BTreeMap<u32, (Vec<IpAddr>, u32)>> = BTreeMap::new();
    for (key, ep) in &contents.svc_endpoints {
        let entry = members
            .entry(key.service_id)
            .or_default()
            .entry(ep.pod_id)
            .or_default();
        entry.0.push(key_addr(&key.addr));
        entry.1 |= ep.flags;
    }

    let mut services: Vec<ServiceStatus> = contents
        .services
        .iter()
        .map(|(id, meta)| {
            let mut pods: Vec<PodStatus> = members
                .remove(id)
                .unwrap_or_default()
                .into_iter()
                .map(|(pod_id, (addresses, flags))| {
                    let meta = contents.pods.get(&pod_id);
                    PodStatus {
                        namespace: meta.map(|m| decode_name(&m.namespace)).unwrap_or_default(),
                        name: meta
                            .map(|m| decode_name(&m.name))
                            .unwrap_or_else(|| format!("#{pod_id}")),
                        addresses,
                        state: state_names(flags),
                        counters: stats
                            .get(&pod_id)
                            .copied()
                            .map(Counters::from)
                            .unwrap_or_default(),
                        dns_share: None,
                        connection_share: None,
                    }
                })
                .collect();
            pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            let mut svc = ServiceStatus {
                namespace: decode_name(&meta.namespace),
                name: decode_name(&meta.name),
                policy: policy_from_value(meta.policy)
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| format!("unknown({})", meta.policy)),
                topology: topology_from_value(meta.topology)
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| format!("unknown({})", meta.topology)),
                ports: declared_ports(&contents.svc_ports, *id),
                backends_v4: meta.backends_v4,
                backends_v6: meta.backends_v6,
                preferred_v4: meta.preferred_v4,
                preferred_v6: meta.preferred_v6,
                counters: maps
                    .svc_stats
                    .get(id, 0)
                    .map(ServiceCountersStatus::from)
                    .unwrap_or_default(),
                totals: Counters::default(),
                pods,
            };
            fill_shares(&mut svc);
            svc
        })
        .collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let steer = Maps::sum_counters(
        map_names::STEER_COUNTERS,
        &maps.steer_counters,
        steer_counter::COUNT,
    )?;
    let dns = Maps::sum_counters(
        map_names::DNS_COUNTERS,
        &maps.dns_counters,
        dns_counter::COUNT,
    )?;
    let sock = Maps::sum_counters(
        map_names::SOCK_COUNTERS,
        &maps.sock_counters,
        sock_counter::COUNT,
    )?;
    let named = |values: &[u64], names: &[(u32, &'static str)]| {
        names
            .iter()
            .map(|(i, name)| (*name, values.get(*i as usize).copied().unwrap_or(0)))
            .collect::<BTreeMap<_, _>>()
    };
    let mut sockets = named(&sock, &sock_counter::NAMES);
    // Per-CPU counts are read one CPU after another: a record taken on one
    // CPU and freed on another may show as freed first.
    let in_use =
        sock[sock_counter::TAKEN as usize].saturating_sub(sock[sock_counter::FREED as usize]);
    sockets.insert("in_use", in_use);
    sockets.insert(
        "capacity",
        u64::from(
            pinned_max_entries(bpffs, map_names::SOCK_TABLE)
                .map_or(capacity::SOCKETS, sock_table::capacity_of),
        ),
    );
    Ok(Status {
        programs: read_programs(bpffs),
        steering: named(&steer, &steer_counter::NAMES),
        dns: named(&dns, &dns_counter::NAMES),
        sockets,
        services,
    })
}

/// Bytes in binary units, short enough for a table cell (`0 B`, `12.3 KiB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A share as a whole percentage, `-` when there is nothing to share.
pub fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| "-".to_string(), |s| format!("{:.0}%", s * 100.0))
}

/// Left-aligned columns, two spaces apart, each as wide as its widest cell.
fn columns(rows: &[Vec<String>], indent: &str) -> Vec<String> {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let n = cell.chars().count();
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(n),
                None => widths.push(n),
            }
        }
    }
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            format!("{indent}{}", cells.join("  ").trim_end())
        })
        .collect()
}

const POD_HEADER: [&str; 13] = [
    "POD",
    "ADDRESSES",
    "STATE",
    "TCP",
    "UDP",
    "ACTIVE",
    "SENT",
    "RECEIVED",
    "STEERED-IN",
    "STEERED-AWAY",
    "DNS-ANSWERS",
    "DNS-SHARE",
    "CONN-SHARE",
];

fn pod_row(name: &str, addresses: String, state: String, c: &Counters) -> Vec<String> {
    vec![
        name.to_string(),
        addresses,
        state,
        c.tcp_connects.to_string(),
        c.udp_connects.to_string(),
        c.active_tcp.to_string(),
        human_bytes(c.bytes_sent),
        human_bytes(c.bytes_received),
        c.steered_in.to_string(),
        c.steered_away.to_string(),
        c.dns_answers.to_string(),
    ]
}

/// The human-readable table: per service a line with its policy,
/// topology and service counters, then a row per pod (state, connections,
/// active, bytes, steering, DNS share next to connection share) and the
/// service's totals. Columns line up across services.
pub fn render_table(status: &Status) -> String {
    let mut out = String::new();
    let mut rows: Vec<Vec<String>> = vec![POD_HEADER.iter().map(|h| h.to_string()).collect()];
    // Where each service's rows start in `rows`.
    let mut starts = Vec::new();
    for svc in &status.services {
        starts.push(rows.len());
        for pod in &svc.pods {
            let addrs: Vec<String> = pod.addresses.iter().map(|a| a.to_string()).collect();
            let state = if pod.state.is_empty() {
                "not-ready".to_string()
            } else {
                pod.state.join(",")
            };
            let mut row = pod_row(&pod.name, addrs.join(","), state, &pod.counters);
            row.push(percent(pod.dns_share));
            row.push(percent(pod.connection_share));
            rows.push(row);
        }
        if !svc.pods.is_empty() {
            rows.push(pod_row(
                "(total)",
                String::new(),
                String::new(),
                &svc.totals,
            ));
        }
    }
    let lines = columns(&rows, "  ");
    for (i, svc) in status.services.iter().enumerate() {
        let c = &svc.counters;
        let decided = |name: &str| c.decisions.get(name).copied().unwrap_or(0);
        let steered: u64 = c
            .decisions
            .iter()
            .filter(|(k, _)| k.starts_with("steered_"))
            .map(|(_, v)| v)
            .sum();
        let _ = writeln!(
            out,
            "{}/{}  policy={}  topology={}  ports={}  pods={}  choices: v4={} v6={}  lookups: service={} pod={}  steered={} no-eligible-pod={}",
            svc.namespace,
            svc.name,
            svc.policy,
            svc.topology,
            if svc.ports.is_empty() {
                "any".to_string()
            } else {
                svc.ports.join(",")
            },
            svc.pods.len(),
            svc.backends_v4,
            svc.backends_v6,
            c.lookups_service,
            c.lookups_pod,
            steered,
            decided("no_eligible_pod"),
        );
        if svc.pods.is_empty() {
            let _ = writeln!(out, "  (no pods)\n");
            continue;
        }
        let end = starts.get(i + 1).copied().unwrap_or(rows.len());
        let _ = writeln!(out, "{}", lines[0]);
        for line in &lines[starts[i]..end] {
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
    }
    if status.services.is_empty() {
        let _ = writeln!(out, "(no headless services known)\n");
    }
    let hooks: Vec<String> = status
        .programs
        .iter()
        .map(|p| {
            format!(
                "{} {}",
                p.name,
                if p.attached { "attached" } else { "DETACHED" }
            )
        })
        .collect();
    let _ = writeln!(out, "hooks: {}", hooks.join(", "));
    let nonzero = |counters: &BTreeMap<&str, u64>| {
        let parts: Vec<String> = counters
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if parts.is_empty() {
            "-".to_string()
        } else {
            parts.join(" ")
        }
    };
    let _ = writeln!(out, "steering: {}", nonzero(&status.steering));
    let _ = writeln!(out, "dns: {}", nonzero(&status.dns));
    let socket = |what: &str| status.sockets.get(what).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "sockets: {} of {} records in use, {} sockets found the table full",
        socket("in_use"),
        socket("capacity"),
        socket("full"),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, counters: Counters) -> PodStatus {
        PodStatus {
            namespace: "db".into(),
            name: name.into(),
            addresses: vec!["10.0.0.1".parse().unwrap()],
            state: vec!["ready"],
            counters,
            dns_share: None,
            connection_share: None,
        }
    }

    fn service(pods: Vec<PodStatus>) -> ServiceStatus {
        let mut svc = ServiceStatus {
            namespace: "db".into(),
            name: "pg".into(),
            policy: "failover".into(),
            topology: "none".into(),
            ports: vec!["5432/TCP".into()],
            backends_v4: 1,
            backends_v6: 0,
            preferred_v4: 0,
            preferred_v6: 0,
            counters: ServiceCountersStatus::default(),
            totals: Counters::default(),
            pods,
        };
        fill_shares(&mut svc);
        svc
    }

    #[test]
    fn shares_split_dns_answers_and_connections_among_pods() {
        let svc = service(vec![
            pod(
                "pg-0",
                Counters {
                    tcp_connects: 1,
                    udp_connects: 2,
                    dns_answers: 9,
                    ..Counters::default()
                },
            ),
            pod(
                "pg-1",
                Counters {
                    tcp_connects: 1,
                    dns_answers: 1,
                    ..Counters::default()
                },
            ),
            pod("pg-2", Counters::default()),
        ]);
        let shares: Vec<_> = svc
            .pods
            .iter()
            .map(|p| (p.dns_share, p.connection_share))
            .collect();
        assert_eq!(
            shares,
            [
                (Some(0.9), Some(0.75)),
                (Some(0.1), Some(0.25)),
                (Some(0.0), Some(0.0))
            ]
        );
        assert_eq!(svc.totals.connections(), 4);
        assert_eq!(svc.totals.dns_answers, 10);
        // Nothing counted yet: no share rather than a division by zero.
        let idle = service(vec![pod("pg-0", Counters::default())]);
        assert_eq!(idle.pods[0].dns_share, None);
        assert_eq!(idle.pods[0].connection_share, None);
    }

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }

    #[test]
    fn table_has_a_line_per_service_and_a_row_per_pod() {
        let mut svc = service(vec![
            pod(
                "pg-0",
                Counters {
                    tcp_connects: 5,
                    steered_in: 3,
                    dns_answers: 1,
                    bytes_sent: 2048,
                    ..Counters::default()
                },
            ),
            pod(
                "pg-1",
                Counters {
                    tcp_connects: 15,
                    dns_answers: 3,
                    ..Counters::default()
                },
            ),
        ]);
        svc.counters.lookups_service = 4;
        svc.counters.decisions.insert("steered_gone", 3);
        let status = Status {
            programs: vec![],
            steering: BTreeMap::from([("steered_gone", 3)]),
            dns: BTreeMap::new(),
            sockets: BTreeMap::new(),
            services: vec![svc],
        };
        let table = render_table(&status);
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            [
                "db/pg",
                "policy=failover",
                "topology=none",
                "ports=5432/TCP",
                "pods=2",
                "choices:",
                "v4=1",
                "v6=0",
                "lookups:",
                "service=4",
                "pod=0",
                "steered=3",
                "no-eligible-pod=0"
            ],
            "{table}"
        );
        assert_eq!(lines[1], POD_HEADER, "{table}");
        assert_eq!(
            lines[2],
            [
                "pg-0", "10.0.0.1", "ready", "5", "0", "0", "2.0", "KiB", "0", "B", "3", "0", "1",
                "25%", "25%"
            ],
            "{table}"
        );
        assert_eq!(lines[3][0], "pg-1", "{table}");
        assert_eq!(&lines[3][lines[3].len() - 2..], ["75%", "75%"], "{table}");
        assert_eq!(lines[4][..3], ["(total)", "20", "0"], "{table}");
        assert!(table.contains("steering: steered_gone=3"), "{table}");
    }
}
