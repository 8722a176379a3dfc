//! Prometheus metrics. Datapath counters live in the pinned maps (so they
//! are monotonic across agent restarts); each scrape reads them fresh, the
//! same way `headway status` does, and renders them with prometheus-client
//! next to the agent's own long-lived metrics. Series of deleted pods and
//! services stay for a grace period (see [`crate::retained`]).
use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    pinned::{MAP_SHAPES, Maps, PinnedError, pinned_max_entries},
    retained::{DEFAULT_GRACE, Retained},
    status::{self, Status},
};
use headway_common::{dns_counter, map_names, steer_counter};

/// Metrics the agent itself keeps (not in the maps), and the memory of
/// recently exported series.
#[derive(Clone)]
pub struct AgentMetrics {
    pub sync_duration: Histogram,
    pub syncs: Counter,
    pub map_write_errors: Counter,
    pub manifest_errors: Counter,
    /// Restarts of a Kubernetes watch (`resource` = services,
    /// endpointslices, pods): relists after an error or an expired
    /// resourceVersion.
    pub watch_restarts: Family<ResourceLabels, Counter>,
    /// Relists after the first list (an expired resourceVersion, 410 Gone),
    /// by resource: the restarts that had to read everything again.
    pub relists: Family<ResourceLabels, Counter>,
    /// New entries a full map refused, by map.
    pub map_full: Family<MapLabels, Counter>,
    /// How long series of deleted pods and services stay exported.
    pub grace: Duration,
    retained: Arc<Mutex<Retained>>,
}

/// The Kubernetes resources the agent watches (`watch_restarts` labels).
pub const WATCHED_RESOURCES: [&str; 3] = ["services", "endpointslices", "pods"];

impl AgentMetrics {
    pub fn new(grace: Duration) -> Self {
        let metrics = AgentMetrics {
            // 100 µs .. ~3 s
            sync_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            syncs: Counter::default(),
            map_write_errors: Counter::default(),
            manifest_errors: Counter::default(),
            watch_restarts: Family::default(),
            relists: Family::default(),
            map_full: Family::default(),
            grace,
            retained: Arc::default(),
        };
        // Exported at 0 from the start, so rate() has a first point (and a
        // source without watches says so rather than saying nothing).
        for resource in WATCHED_RESOURCES {
            let _ = metrics.watch_restarts.get_or_create(&ResourceLabels {
                resource: resource.to_string(),
            });
        }
        metrics
    }

    /// Counts one restart of the watch on `resource`.
    pub fn watch_restarted(&self, resource: &str) {
        self.watch_restarts
            .get_or_create(&ResourceLabels {
                resource: resource.to_string(),
            })
            .inc();
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new(DEFAULT_GRACE)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    service: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodProtocolLabels {
    namespace: String,
    service: String,
    pod: String,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceKindLabels {
    namespace: String,
    service: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceReasonLabels {
    namespace: String,
    service: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    namespace: String,
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The whole exposition: datapath counters from the pins under `bpffs`,
/// plus `agent`'s own metrics.
pub fn render(bpffs: &Path, agent: &AgentMetrics) -> Result<String, PinnedError> {
    let mut status = status::read(bpffs)?;
    let maps = Maps::open_pinned(bpffs)?;
    let mut registry = Registry::with_prefix("headway");
    register_maps(&mut registry, &maps, &status, bpffs)?;
    register_programs(&mut registry, &status);
    agent
        .retained
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .apply(&mut status, Instant::now(), agent.grace);
    register_pods(&mut registry, &status);
    register_datapath(&mut registry, &status);

    registry.register(
        "sync_duration_seconds",
        "Time to turn a source change into map writes",
        agent.sync_duration.clone(),
    );
    registry.register(
        "syncs",
        "Syncs of the maps with the source",
        agent.syncs.clone(),
    );
    registry.register(
        "map_write_errors",
        "Map entries that could not be written (full map, kernel error)",
        agent.map_write_errors.clone(),
    );
    registry.register(
        "manifest_errors",
        "Manifests that could not be read or parsed",
        agent.manifest_errors.clone(),
    );
    registry.register(
        "watch_restarts",
        "Restarts of a Kubernetes watch, by resource",
        agent.watch_restarts.clone(),
    );
    registry.register(
        "relists",
        "Kubernetes relists after the first list (expired watch, 410 Gone), by resource",
        agent.relists.clone(),
    );
    registry.register(
        "map_full",
        "New entries refused because the map was full, by map (existing entries keep working)",
        agent.map_full.clone(),
    );
    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
    registry.register("build_info", "headway build", build);

    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    Ok(out)
}

fn register_pods(registry: &mut Registry, status: &Status) {
    let connections = Family::<PodProtocolLabels, Counter>::default();
    let active = Family::<PodLabels, Gauge>::default();
    let sent = Family::<PodLabels, Counter>::default();
    let received = Family::<PodLabels, Counter>::default();
    let dns_answers = Family::<PodLabels, Counter>::default();
    let steered_in = Family::<PodLabels, Counter>::default();
    let steered_away = Family::<PodLabels, Counter>::default();
    for svc in &status.services {
        for pod in &svc.pods {
            let labels = PodLabels {
                namespace: svc.namespace.clone(),
                service: svc.name.clone(),
                pod: pod.name.clone(),
            };
            let c = &pod.counters;
            for (protocol, n) in [("tcp", c.tcp_connects), ("udp", c.udp_connects)] {
                let l = PodProtocolLabels {
                    namespace: labels.namespace.clone(),
                    service: labels.service.clone(),
                    pod: labels.pod.clone(),
                    protocol,
                };
                connections.get_or_create(&l).inc_by(n);
            }
            active
                .get_or_create(&labels)
                .set(i64::try_from(c.active_tcp).unwrap_or(i64::MAX));
            sent.get_or_create(&labels).inc_by(c.bytes_sent);
            received.get_or_create(&labels).inc_by(c.bytes_received);
            dns_answers.get_or_create(&labels).inc_by(c.dns_answers);
            steered_in.get_or_create(&labels).inc_by(c.steered_in);
            steered_away.get_or_create(&labels).inc_by(c.steered_away);
        }
    }
    registry.register(
        "connections",
        "Connections to the pod (connect() calls)",
        connections,
    );
    registry.register(
        "active_connections",
        "TCP connections from this node to the pod, established and not yet closed",
        active,
    );
    registry.register(
        "bytes_sent",
        "Payload bytes (TCP, connected UDP) that client sockets on this node sent to the pod",
        sent,
    );
    registry.register(
        "bytes_received",
        "Payload bytes (TCP, connected UDP) that client sockets on this node received from the pod",
        received,
    );
    registry.register(
        "dns_answers",
        "DNS answers that handed out the pod's address",
        dns_answers,
    );
    registry.register("steered_in", "Connections steered to the pod", steered_in);
    registry.register(
        "steered_away",
        "Connections steered away from the pod",
        steered_away,
    );
}

fn register_datapath(registry: &mut Registry, status: &Status) {
    let decisions = Family::<ReasonLabels, Counter>::default();
    for (reason, n) in &status.steering {
        decisions.get_or_create(&ReasonLabels { reason }).inc_by(*n);
    }
    registry.register(
        "connect_decisions",
        "Connect decisions on known or resolved addresses, by reason (steered_* moved the connection)",
        decisions,
    );
    let dns = Family::<ReasonLabels, Counter>::default();
    for (reason, n) in &status.dns {
        dns.get_or_create(&ReasonLabels { reason }).inc_by(*n);
    }
    let parse_errors = Family::<ReasonLabels, Counter>::default();
    for (reason, n) in &status.dns {
        let is_parse_error = DNS_PARSE_ERRORS
            .iter()
            .any(|i| counter_name(&dns_counter::NAMES, *i) == *reason);
        if is_parse_error {
            parse_errors
                .get_or_create(&ReasonLabels { reason })
                .inc_by(*n);
        }
    }
    let lookups = Family::<ServiceKindLabels, Counter>::default();
    let decisions_by_service = Family::<ServiceReasonLabels, Counter>::default();
    let steered = Family::<ServiceReasonLabels, Counter>::default();
    let no_eligible = Family::<ServiceLabels, Counter>::default();
    for svc in &status.services {
        let c = &svc.counters;
        for (kind, n) in [("service", c.lookups_service), ("pod", c.lookups_pod)] {
            let labels = ServiceKindLabels {
                namespace: svc.namespace.clone(),
                service: svc.name.clone(),
                kind,
            };
            lookups.get_or_create(&labels).inc_by(n);
        }
        for (reason, n) in &c.decisions {
            let labels = ServiceReasonLabels {
                namespace: svc.namespace.clone(),
                service: svc.name.clone(),
                reason,
            };
            decisions_by_service.get_or_create(&labels).inc_by(*n);
            if let Some(why) = reason.strip_prefix("steered_") {
                let labels = ServiceReasonLabels {
                    reason: why,
                    ..labels
                };
                steered.get_or_create(&labels).inc_by(*n);
            }
        }
        no_eligible
            .get_or_create(&ServiceLabels {
                namespace: svc.namespace.clone(),
                service: svc.name.clone(),
            })
            .inc_by(
                c.decisions
                    .get(counter_name(
                        &steer_counter::NAMES,
                        steer_counter::NO_ELIGIBLE_POD,
                    ))
                    .copied()
                    .unwrap_or(0),
            );
    }
    registry.register(
        "dns_lookups",
        "Answered DNS lookups of the service's names, by kind (service-wide or pod-specific)",
        lookups,
    );
    registry.register(
        "service_connect_decisions",
        "Connect decisions about addresses resolved through the service's names, by reason",
        decisions_by_service,
    );
    registry.register(
        "steered_connections",
        "Connections moved to another pod of the service, by reason: the address asked for was gone, reused or not_eligible, or a balancing policy drew another pod (balanced)",
        steered,
    );
    registry.register(
        "no_eligible_pod",
        "Connections that should have been steered but found no eligible pod (left as asked)",
        no_eligible,
    );
    registry.register(
        "dns_parse_errors",
        "DNS responses the interceptor refused to learn from, by reason",
        parse_errors,
    );
    registry.register(
        "dns_events",
        "DNS interceptor outcomes by reason (queries, responses, learned addresses, parse errors)",
        dns,
    );
}

/// `dns_counters` indexes that count a response the parser refused.
const DNS_PARSE_ERRORS: [u32; 5] = [
    dns_counter::ERR_TRUNCATED,
    dns_counter::ERR_BAD_POINTER,
    dns_counter::ERR_BAD_LABEL,
    dns_counter::ERR_BAD_HEADER,
    dns_counter::ERR_QUESTION_MISMATCH,
];

/// The name a shared counter table gives `index`.
fn counter_name(names: &[(u32, &'static str)], index: u32) -> &'static str {
    names
        .iter()
        .find(|(i, _)| *i == index)
        .map_or("unknown", |(_, name)| name)
}

fn register_maps(
    registry: &mut Registry,
    maps: &Maps,
    status: &Status,
    bpffs: &Path,
) -> Result<(), PinnedError> {
    let entries = Family::<MapLabels, Gauge>::default();
    let capacity = Family::<MapLabels, Gauge>::default();
    let mut counts = maps.entry_counts()?;
    // Arrays indexed by id: the slots in use are the ids handed out.
    let pods: usize = counts.get(map_names::PODS).copied().unwrap_or(0);
    counts.insert(map_names::POD_STATS, pods);
    counts.insert(map_names::SVC_STATS, status.services.len());
    // The socket table: records in use.
    let sockets_in_use = status.sockets.get("in_use").copied().unwrap_or(0);
    counts.insert(map_names::SOCK_TABLE, sockets_in_use as usize);
    for shape in &MAP_SHAPES {
        let labels = MapLabels { map: shape.name };
        if shape.max_entries > 0 {
            // The size the agent chose (--max-endpoints, --max-services).
            let max = pinned_max_entries(bpffs, shape.name).unwrap_or(shape.max_entries);
            capacity.get_or_create(&labels).set(i64::from(max));
        }
        if let Some(n) = counts.get(shape.name) {
            entries.get_or_create(&labels).set(*n as i64);
        }
    }
    registry.register(
        "map_entries",
        "Entries in each map (for arrays indexed by id: the ids in use)",
        entries,
    );
    registry.register("map_capacity", "Capacity of each map", capacity);
    let table_full = Counter::<u64>::default();
    table_full.inc_by(status.sockets.get("full").copied().unwrap_or(0));
    registry.register(
        "socket_table_full",
        "Sockets that found the socket table full: not accounted, and steered without transparency",
        table_full,
    );
    Ok(())
}

/// Each hook: attached or not, and what the kernel counts of its runs
/// (only while `kernel.bpf_stats_enabled=1`).
fn register_programs(registry: &mut Registry, status: &Status) {
    let attached = Family::<ProgramLabels, Gauge>::default();
    let runs = Family::<ProgramLabels, Counter>::default();
    let run_time = Family::<ProgramLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    for p in &status.programs {
        let labels = ProgramLabels { program: p.name };
        attached.get_or_create(&labels).set(i64::from(p.attached));
        runs.get_or_create(&labels).inc_by(p.run_count);
        run_time
            .get_or_create(&labels)
            .inc_by(p.run_time_ns as f64 / 1e9);
    }
    registry.register(
        "program_attached",
        "1 when the hook's pinned link is attached to a cgroup",
        attached,
    );
    registry.register(
        "program_runs",
        "Runs of the hook (counted while kernel.bpf_stats_enabled=1)",
        runs,
    );
    registry.register(
        "program_run_seconds",
        "Time spent in the hook (counted while kernel.bpf_stats_enabled=1)",
        run_time,
    );
}
