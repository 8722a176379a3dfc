//! Prometheus metrics. Datapath counters live in the pinned maps (so they
//! are monotonic across agent restarts); each scrape reads them fresh, the
//! same way `headway status` does, and renders them with prometheus-client
//! next to the agent's own long-lived metrics.
use std::path::Path;

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
    pinned::{MAP_SHAPES, Maps, PinnedError},
    status::{self, Status},
};

/// Metrics the agent itself keeps (not in the maps).
#[derive(Clone)]
pub struct AgentMetrics {
    pub sync_duration: Histogram,
    pub syncs: Counter,
    pub map_write_errors: Counter,
    pub manifest_errors: Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            // 100 µs .. ~3 s
            sync_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            syncs: Counter::default(),
            map_write_errors: Counter::default(),
            manifest_errors: Counter::default(),
        }
    }
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
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The whole exposition: datapath counters from the pins under `bpffs`,
/// plus `agent`'s own metrics.
pub fn render(bpffs: &Path, agent: &AgentMetrics) -> Result<String, PinnedError> {
    let status = status::read(bpffs)?;
    let maps = Maps::open_pinned(bpffs)?;
    let mut registry = Registry::with_prefix("headway");
    register_pods(&mut registry, &status);
    register_datapath(&mut registry, &status);
    register_maps(&mut registry, &maps)?;

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
        "Established TCP connections open now",
        active,
    );
    registry.register("bytes_sent", "Bytes sent to the pod", sent);
    registry.register("bytes_received", "Bytes received from the pod", received);
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
    let lookups = Family::<ServiceKindLabels, Counter>::default();
    let steered = Family::<ServiceReasonLabels, Counter>::default();
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
            steered.get_or_create(&labels).inc_by(*n);
        }
    }
    registry.register(
        "dns_lookups",
        "Answered DNS lookups of the service's names, by kind (service-wide or pod-specific)",
        lookups,
    );
    registry.register(
        "service_connect_decisions",
        "Connect decisions about addresses resolved through the service's names, by reason",
        steered,
    );
    registry.register(
        "dns_events",
        "DNS interceptor outcomes by reason (queries, responses, learned addresses, parse errors)",
        dns,
    );
}

fn register_maps(registry: &mut Registry, maps: &Maps) -> Result<(), PinnedError> {
    let entries = Family::<MapLabels, Gauge>::default();
    let capacity = Family::<MapLabels, Gauge>::default();
    let counts = maps.entry_counts()?;
    for shape in &MAP_SHAPES {
        let labels = MapLabels { map: shape.name };
        capacity
            .get_or_create(&labels)
            .set(i64::from(shape.max_entries));
        if let Some(n) = counts.get(shape.name) {
            entries.get_or_create(&labels).set(*n as i64);
        }
    }
    registry.register("map_entries", "Entries in each hash map", entries);
    registry.register("map_capacity", "Capacity of each map", capacity);
    Ok(())
}
