//! The `kube` source: kube-rs watchers over the headless Services, their
//! EndpointSlices (label `service.kubernetes.io/headless`), the Pods
//! carrying a headway label and this agent's own Node (its zone label),
//! feeding a [`ClusterStore`] that says which services each change affects.
//!
//! Each watcher runs in its own task (decoding spreads over the runtime's
//! threads, and the lists start while the agent is still loading its
//! programs); it reduces each object to its compact record as it arrives
//! (neither the store nor a list in progress keeps a whole API object) and
//! hands a finished list over whole.
//!
//! Watch errors never end the streams: kube's watcher retries with its
//! default backoff (and relists after `410 Gone`), the error is logged and
//! counted, and the store (so the maps) keeps its last good state.
use std::{
    collections::{BTreeMap, VecDeque},
    path::Path,
    pin::Pin,
    time::Duration,
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use tokio::{sync::mpsc, task::JoinSet, time::Instant};
use tracing::{info, warn};

use super::store::{Affected, ClusterStore, HoldStarted, SliceKey, resource_version};
use crate::model::{
    self, LABEL_DRAIN, LABEL_HEADLESS, LABEL_WEIGHT, PodKey, PodLabels, ServiceKey, ServiceRecord,
    SliceRecord, Warning,
};

/// Node label naming the node's zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Most events folded into one batch (bounds the latency of the first).
const MAX_BATCH: usize = 4096;

/// How long an address that left every slice of its service stays in the
/// maps, as it was: long enough for the slice it moves to to arrive (the
/// EndpointSlice controller writes both in one pass), short next to a
/// pod's termination grace, during which it is already not ready.
pub const MOVE_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot find Kubernetes credentials (in-cluster or ~/.kube/config): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `kubeconfig`, or kube's usual inference (in-cluster
/// service account, then `$KUBECONFIG` / `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let wrap = |source| KubeError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(wrap)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(wrap)?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Which resource a watcher follows (metric label and log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    /// Pods with the drain label (0) or the weight label (1).
    Pods(usize),
    /// This agent's own Node.
    Node,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Services => "services",
            Resource::EndpointSlices => "endpointslices",
            Resource::Pods(_) => "pods",
            Resource::Node => "nodes",
        }
    }
}

/// One watcher: a resource in one namespace (or all).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct WatchId {
    resource: Resource,
    namespace: Option<String>,
}

/// What the agent keeps of one API object: its key and compact record.
enum Record {
    /// `None`: not headless (as good as gone).
    Service(ServiceKey, Option<ServiceRecord>),
    Slice(SliceKey, SliceRecord),
    /// With its resourceVersion.
    Pod(PodKey, u64, PodLabels),
    /// The zone label of this agent's Node.
    Node(Option<String>),
}

/// Reduces an object to its record; `None` for an object without a name.
type Reduce<K> = fn(K, &mut Vec<Warning>) -> Option<Record>;

/// What a watcher task hands over.
enum Change {
    /// A (re)list finished: every object it listed.
    Listed(Vec<Record>),
    /// `None`: an object without a name.
    Applied(Option<Record>),
    Deleted(Option<Record>),
}

/// One watcher's events, reduced to records.
type Events = Pin<
    Box<
        dyn Stream<
                Item = (
                    WatchId,
                    Result<watcher::Event<Option<Record>>, watcher::Error>,
                    Vec<Warning>,
                ),
            > + Send,
    >,
>;
/// What the source receives from the watcher tasks.
type Item = (WatchId, Result<Change, watcher::Error>, Vec<Warning>);

/// Watch items waiting for the source, at most (a list is one item).
const CHANNEL: usize = 1024;

/// What one batch of watch events did.
#[derive(Default)]
pub struct Batch {
    /// Services whose spec may have changed.
    pub affected: Affected,
    /// Watch errors, by resource (each is retried by the watcher).
    pub errors: Vec<(Resource, String)>,
    /// Relists that completed after the first list, by resource.
    pub relists: Vec<Resource>,
    /// This node's zone label, when it changed (inner `None`: removed).
    pub zone: Option<Option<String>>,
}

/// How the kube source watches.
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// Only these namespaces (all when empty).
    pub namespaces: Vec<String>,
    /// This agent's node: its Node is watched for the zone label.
    pub node_name: Option<String>,
    /// Start each watch with a streaming list (`sendInitialEvents`, API
    /// servers with the WatchList feature) instead of paged lists.
    pub streaming_lists: bool,
}

pub struct KubeSource {
    events: mpsc::Receiver<Item>,
    /// The watcher tasks (aborted when the source is dropped).
    _watchers: JoinSet<()>,
    store: ClusterStore,
    /// Watchers whose first list is done.
    listed: BTreeMap<WatchId, bool>,
    /// The node's zone as last seen.
    zone: Option<String>,
    /// Holds to release, in deadline order (one grace period for all).
    holds: VecDeque<(Instant, HoldStarted)>,
}

fn watch<K>(api: Api<K>, config: watcher::Config, id: WatchId, reduce: Reduce<K>) -> Events
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    watcher(api, config)
        .default_backoff()
        .map(move |event| {
            let mut warnings = Vec::new();
            let event = event.map(|e| reduce_event(e, reduce, &mut warnings));
            (id.clone(), event, warnings)
        })
        .boxed()
}

/// Only applied objects warn: a deleted one was read before.
fn reduce_event<K>(
    event: watcher::Event<K>,
    reduce: Reduce<K>,
    warnings: &mut Vec<Warning>,
) -> watcher::Event<Option<Record>> {
    use watcher::Event;
    match event {
        Event::Apply(k) => Event::Apply(reduce(k, warnings)),
        Event::Delete(k) => Event::Delete(reduce(k, &mut Vec::new())),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(reduce(k, warnings)),
        Event::InitDone => Event::InitDone,
    }
}

/// Runs one watcher until the source goes away: records a list in
/// progress and sends it whole when it is done; everything else as it
/// comes. A list's warnings go with it.
async fn forward(mut events: Events, to: mpsc::Sender<Item>) {
    use watcher::Event;
    let mut listing: Option<(Vec<Record>, Vec<Warning>)> = None;
    while let Some((id, event, mut warnings)) = events.next().await {
        let change = match event {
            Err(e) => Err(e),
            Ok(Event::Init) => {
                listing = Some((Vec::new(), warnings));
                continue;
            }
            Ok(Event::InitApply(record)) => {
                let (records, listed_warnings) = listing.get_or_insert_default();
                records.extend(record);
                listed_warnings.append(&mut warnings);
                continue;
            }
            Ok(Event::InitDone) => {
                let (records, mut listed_warnings) = listing.take().unwrap_or_default();
                listed_warnings.append(&mut warnings);
                warnings = listed_warnings;
                Ok(Change::Listed(records))
            }
            Ok(Event::Apply(record)) => Ok(Change::Applied(record)),
            Ok(Event::Delete(record)) => Ok(Change::Deleted(record)),
        };
        if to.send((id, change, warnings)).await.is_err() {
            return;
        }
    }
}

fn key_of(meta: &ObjectMeta) -> Option<(String, String)> {
    Some((model::namespace_of(meta).to_owned(), meta.name.clone()?))
}

fn reduce_service(svc: Service, warnings: &mut Vec<Warning>) -> Option<Record> {
    let (ns, name) = key_of(&svc.metadata)?;
    let record = ServiceRecord::of(&svc, warnings);
    Some(Record::Service(ServiceKey::new(ns, name), record))
}

fn reduce_slice(slice: EndpointSlice, warnings: &mut Vec<Warning>) -> Option<Record> {
    let key = key_of(&slice.metadata)?;
    Some(Record::Slice(key, SliceRecord::of(&slice, warnings)))
}

fn reduce_pod(pod: Pod, warnings: &mut Vec<Warning>) -> Option<Record> {
    let (ns, name) = key_of(&pod.metadata)?;
    let rv = resource_version(pod.metadata.resource_version.as_deref());
    let labels = model::pod_labels(&pod.metadata, warnings);
    Some(Record::Pod(PodKey::new(ns, name), rv, labels))
}

fn reduce_node(node: Node, _: &mut Vec<Warning>) -> Option<Record> {
    let zone = node.metadata.labels.and_then(|mut l| l.remove(LABEL_ZONE));
    Some(Record::Node(zone))
}

impl KubeSource {
    /// Starts the watchers: per namespace in `options.namespaces`, or
    /// cluster-wide when it is empty; and one on this node's Node.
    pub fn start(client: Client, options: &KubeOptions) -> KubeSource {
        let scopes: Vec<Option<String>> = if options.namespaces.is_empty() {
            vec![None]
        } else {
            options.namespaces.iter().cloned().map(Some).collect()
        };
        let config = || {
            let config = watcher::Config::default();
            if options.streaming_lists {
                config.streaming_lists()
            } else {
                config
            }
        };
        let mut streams = Vec::new();
        let mut listed = BTreeMap::new();
        for scope in scopes {
            fn api<K>(client: &Client, scope: &Option<String>) -> Api<K>
            where
                K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
                K::DynamicType: Default,
            {
                match scope {
                    Some(ns) => Api::namespaced(client.clone(), ns),
                    None => Api::all(client.clone()),
                }
            }
            let id = |resource| WatchId {
                resource,
                namespace: scope.clone(),
            };
            // Headless is `spec.clusterIP=None`; not every API server
            // version can select on it, so the records say instead.
            streams.push(watch(
                api::<Service>(&client, &scope),
                config(),
                id(Resource::Services),
                reduce_service,
            ));
            streams.push(watch(
                api::<EndpointSlice>(&client, &scope),
                config().labels(LABEL_HEADLESS),
                id(Resource::EndpointSlices),
                reduce_slice,
            ));
            // A selector cannot say "has label A or label B": one watcher
            // per label, merged by the store.
            for (i, label) in [LABEL_DRAIN, LABEL_WEIGHT].into_iter().enumerate() {
                streams.push(watch(
                    api::<Pod>(&client, &scope),
                    config().labels(label),
                    id(Resource::Pods(i)),
                    reduce_pod,
                ));
            }
            for r in [
                Resource::Services,
                Resource::EndpointSlices,
                Resource::Pods(0),
                Resource::Pods(1),
            ] {
                listed.insert(id(r), false);
            }
        }
        if let Some(node) = &options.node_name {
            let id = WatchId {
                resource: Resource::Node,
                namespace: None,
            };
            streams.push(watch(
                Api::<Node>::all(client.clone()),
                config().fields(&format!("metadata.name={node}")),
                id.clone(),
                reduce_node,
            ));
            listed.insert(id, false);
        }
        let (to, events) = mpsc::channel(CHANNEL);
        let mut watchers = JoinSet::new();
        for stream in streams {
            watchers.spawn(forward(stream, to.clone()));
        }
        KubeSource {
            events,
            _watchers: watchers,
            store: ClusterStore::new(),
            listed,
            zone: None,
            holds: VecDeque::new(),
        }
    }

    pub fn store(&self) -> &ClusterStore {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut ClusterStore {
        &mut self.store
    }

    /// Every watcher has completed its first list.
    pub fn ready(&self) -> bool {
        self.listed.values().all(|done| *done)
    }

    /// This node's zone label, as last seen.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// Waits for the next event or the end of a hold's grace period, then
    /// takes every event already waiting too (so an endpoint moving
    /// between two slices updated together is one change, not a remove and
    /// an add).
    pub async fn next_batch(&mut self) -> Batch {
        let mut batch = Batch::default();
        let deadline = self.holds.front().map(|(at, _)| *at);
        let first = tokio::select! {
            item = self.events.recv() => item,
            _ = sleep_until(deadline) => None,
        };
        if let Some(first) = first {
            self.handle(first, &mut batch);
            for _ in 1..MAX_BATCH {
                match self.events.try_recv() {
                    Ok(item) => self.handle(item, &mut batch),
                    Err(_) => break,
                }
            }
        }
        let now = Instant::now();
        while let Some((at, _)) = self.holds.front()
            && *at <= now
        {
            let (_, hold) = self.holds.pop_front().expect("front exists");
            batch.affected.extend(self.store.release_hold(&hold));
        }
        for hold in self.store.take_holds_started() {
            self.holds.push_back((now + MOVE_GRACE, hold));
        }
        batch
    }

    fn handle(&mut self, (id, change, warnings): Item, batch: &mut Batch) {
        self.store.warn(warnings);
        let change = match change {
            Ok(change) => change,
            Err(e) => {
                warn!(resource = id.resource.as_str(), namespace = ?id.namespace, error = %e,
                    "watch failed; retrying, the maps keep their last state");
                batch.errors.push((id.resource, e.to_string()));
                return;
            }
        };
        let affected = match change {
            Change::Listed(records) => {
                let scope = id.namespace.as_deref();
                let affected = match id.resource {
                    Resource::Node => {
                        let zone = records.into_iter().find_map(|r| match r {
                            Record::Node(zone) => Some(zone),
                            _ => None,
                        });
                        self.set_zone(zone.flatten(), batch);
                        Affected::new()
                    }
                    resource => replace(&mut self.store, resource, scope, records),
                };
                let first = !self.listed.insert(id.clone(), true).unwrap_or(false);
                if first {
                    info!(resource = id.resource.as_str(), namespace = ?id.namespace, "listed");
                } else {
                    info!(resource = id.resource.as_str(), namespace = ?id.namespace, changed_services = affected.len(), "relisted");
                    batch.relists.push(id.resource);
                }
                affected
            }
            Change::Applied(Some(record)) => match (record, id.resource) {
                (Record::Service(key, r), _) => self.store.apply_service(key, r),
                (Record::Slice(key, r), _) => self.store.apply_slice(key, r),
                (Record::Pod(key, rv, labels), Resource::Pods(w)) => {
                    self.store.apply_pod(w, key, rv, labels)
                }
                (Record::Node(zone), _) => {
                    self.set_zone(zone, batch);
                    Affected::new()
                }
                (Record::Pod(..), _) => Affected::new(),
            },
            Change::Deleted(Some(record)) => match (record, id.resource) {
                (Record::Service(key, _), _) => self.store.delete_service(&key),
                (Record::Slice(key, _), _) => self.store.delete_slice(&key),
                (Record::Pod(key, ..), Resource::Pods(w)) => self.store.delete_pod(w, &key),
                (Record::Node(_), _) => {
                    self.set_zone(None, batch);
                    Affected::new()
                }
                (Record::Pod(..), _) => Affected::new(),
            },
            // An object without a name: nothing to key it by.
            Change::Applied(None) | Change::Deleted(None) => Affected::new(),
        };
        batch.affected.extend(affected);
    }

    fn set_zone(&mut self, zone: Option<String>, batch: &mut Batch) {
        if zone != self.zone {
            info!(zone = ?zone, "this node's zone");
            self.zone = zone.clone();
            batch.zone = Some(zone);
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn replace(
    store: &mut ClusterStore,
    resource: Resource,
    scope: Option<&str>,
    records: Vec<Record>,
) -> Affected {
    match resource {
        Resource::Services => store.replace_services(
            scope,
            records
                .into_iter()
                .filter_map(|r| match r {
                    Record::Service(k, s) => Some((k, s)),
                    _ => None,
                })
                .collect(),
        ),
        Resource::EndpointSlices => store.replace_slices(
            scope,
            records
                .into_iter()
                .filter_map(|r| match r {
                    Record::Slice(k, s) => Some((k, s)),
                    _ => None,
                })
                .collect(),
        ),
        Resource::Pods(w) => store.replace_pods(
            w,
            scope,
            records
                .into_iter()
                .filter_map(|r| match r {
                    Record::Pod(k, rv, l) => Some((k, rv, l)),
                    _ => None,
                })
                .collect(),
        ),
        Resource::Node => Affected::new(),
    }
}
