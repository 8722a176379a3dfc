//! `headway status`: what the pinned maps say, per service and pod. Reads
//! only the pins, so it works while the agent is down.
use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, path::Path};

use std::os::fd::AsFd;

use headway_common::{
    PodCounters, ServiceCounters, dns_counter, endpoint_flags, map_names, program_names,
    steer_counter,
};
use serde::Serialize;

use crate::{
    bpf_sys,
    map_plan::{decode_name, key_addr, policy_from_value, topology_from_value},
    pinned::{self, Maps, PinnedError},
};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Status {
    /// The kernel programs behind the pinned links.
    pub programs: Vec<ProgramStatus>,
    /// Connect decisions by reason, summed over CPUs.
    pub steering: BTreeMap<&'static str, u64>,
    /// DNS interceptor outcomes, summed over CPUs.
    pub dns: BTreeMap<&'static str, u64>,
    pub services: Vec<ServiceStatus>,
}

/// One hook as the kernel reports it. Run statistics count only while
/// `kernel.bpf_stats_enabled=1`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ProgramStatus {
    pub name: &'static str,
    /// Whether its link is pinned (the hook is attached).
    pub attached: bool,
    pub program_id: Option<u32>,
    pub cgroup_id: Option<u64>,
    pub verified_instructions: Option<u32>,
    pub run_count: u64,
    pub run_time_ns: u64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    pub policy: String,
    pub topology: String,
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
    pub pods: Vec<PodStatus>,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
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

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub addresses: Vec<IpAddr>,
    /// ready, serving, terminating, drained, eligible — those that hold.
    pub state: Vec<&'static str>,
    pub counters: Counters,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq, Clone, Copy)]
pub struct Counters {
    pub tcp_connects: u64,
    pub udp_connects: u64,
    pub active_tcp: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub steered_in: u64,
    pub steered_away: u64,
    pub dns_answers: u64,
}

impl From<PodCounters> for Counters {
    fn from(c: PodCounters) -> Self {
        Counters {
            tcp_connects: c.tcp_connects,
            udp_connects: c.udp_connects,
            active_tcp: c.active_tcp,
            bytes_sent: c.bytes_sent,
            bytes_received: c.bytes_received,
            steered_in: c.steered_in,
            steered_away: c.steered_away,
            dns_answers: c.dns_answers,
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
            let link = bpf_sys::obj_get(&pinned::link_pin(bpffs, name))
                .and_then(|fd| bpf_sys::cgroup_link_info(fd.as_fd()))
                .ok();
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
                    }
                })
                .collect();
            pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            ServiceStatus {
                namespace: decode_name(&meta.namespace),
                name: decode_name(&meta.name),
                policy: policy_from_value(meta.policy)
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| format!("unknown({})", meta.policy)),
                topology: topology_from_value(meta.topology)
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| format!("unknown({})", meta.topology)),
                backends_v4: meta.backends_v4,
                backends_v6: meta.backends_v6,
                preferred_v4: meta.preferred_v4,
                preferred_v6: meta.preferred_v6,
                counters: maps
                    .svc_stats
                    .get(id, 0)
                    .map(ServiceCountersStatus::from)
                    .unwrap_or_default(),
                pods,
            }
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
    let named = |values: &[u64], names: &[(u32, &'static str)]| {
        names
            .iter()
            .map(|(i, name)| (*name, values.get(*i as usize).copied().unwrap_or(0)))
            .collect()
    };
    Ok(Status {
        programs: read_programs(bpffs),
        steering: named(&steer, &steer_counter::NAMES),
        dns: named(&dns, &dns_counter::NAMES),
        services,
    })
}

/// The human-readable table.
pub fn render_table(status: &Status) -> String {
    let header = [
        "SERVICE",
        "POLICY",
        "TOPOLOGY",
        "POD",
        "ADDRESSES",
        "STATE",
        "TCP",
        "UDP",
        "ACTIVE",
        "STEERED-IN",
        "DNS-ANSWERS",
    ];
    let mut rows: Vec<[String; 11]> = Vec::new();
    for svc in &status.services {
        let service = format!("{}/{}", svc.namespace, svc.name);
        if svc.pods.is_empty() {
            rows.push([
                service.clone(),
                svc.policy.clone(),
                svc.topology.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for pod in &svc.pods {
            let addrs: Vec<String> = pod.addresses.iter().map(|a| a.to_string()).collect();
            rows.push([
                service.clone(),
                svc.policy.clone(),
                svc.topology.clone(),
                pod.name.clone(),
                addrs.join(","),
                if pod.state.is_empty() {
                    "not-ready".into()
                } else {
                    pod.state.join(",")
                },
                pod.counters.tcp_connects.to_string(),
                pod.counters.udp_connects.to_string(),
                pod.counters.active_tcp.to_string(),
                pod.counters.steered_in.to_string(),
                pod.counters.dns_answers.to_string(),
            ]);
        }
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    if status.services.is_empty() {
        let _ = writeln!(out, "(no headless services known)");
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
    let _ = writeln!(out, "\nhooks: {}", hooks.join(", "));
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
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_column_per_field_and_a_row_per_pod() {
        let status = Status {
            programs: vec![],
            steering: BTreeMap::from([("steered_gone", 3)]),
            dns: BTreeMap::new(),
            services: vec![ServiceStatus {
                namespace: "db".into(),
                name: "pg".into(),
                policy: "failover".into(),
                topology: "none".into(),
                backends_v4: 1,
                backends_v6: 0,
                preferred_v4: 0,
                preferred_v6: 0,
                counters: ServiceCountersStatus::default(),
                pods: vec![PodStatus {
                    namespace: "db".into(),
                    name: "pg-0".into(),
                    addresses: vec!["10.0.0.1".parse().unwrap()],
                    state: vec!["ready"],
                    counters: Counters {
                        tcp_connects: 5,
                        steered_in: 3,
                        dns_answers: 7,
                        ..Counters::default()
                    },
                }],
            }],
        };
        let table = render_table(&status);
        let lines: Vec<Vec<&str>> = table
            .lines()
            .take(2)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines[0].len(), 11, "{table}");
        assert_eq!(lines[1].len(), 11, "{table}");
        assert_eq!(lines[1][3], "pg-0");
        assert_eq!(&lines[1][6..], ["5", "0", "0", "3", "7"]);
        assert!(table.contains("steering: steered_gone=3"), "{table}");
    }
}
