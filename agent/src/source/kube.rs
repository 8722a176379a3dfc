//! The `kube` source: kube-rs watchers over the headless Services, their
//! EndpointSlices (label `service.kubernetes.io/headless`) and the Pods
//! carrying a headway label, feeding a [`ClusterStore`] that says which
//! services each change affects.
//!
//! Watch errors never end the streams: kube's watcher retries with its
//! default backoff (and relists after `410 Gone`), the error is logged and
//! counted, and the store (so the maps) keeps its last good state.
use std::{collections::BTreeMap, path::Path, pin::Pin};

use futures::{FutureExt, Stream, StreamExt, stream::select_all};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};

use super::store::{Affected, ClusterStore};
use crate::model::{LABEL_DRAIN, LABEL_HEADLESS, LABEL_WEIGHT};

/// Node label naming the node's zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Most events folded into one batch (bounds the latency of the first).
const MAX_BATCH: usize = 4096;

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

/// The zone label of node `name` (`None` if it has none). One GET.
pub async fn node_zone(client: &Client, name: &str) -> Result<Option<String>, kube::Error> {
    let node = Api::<Node>::all(client.clone()).get(name).await?;
    Ok(node.metadata.labels.and_then(|mut l| l.remove(LABEL_ZONE)))
}

/// Which resource a watcher follows (metric label and log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    /// Pods with the drain label (0) or the weight label (1).
    Pods(usize),
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Services => "services",
            Resource::EndpointSlices => "endpointslices",
            Resource::Pods(_) => "pods",
        }
    }
}

/// One watcher: a resource in one namespace (or all).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct WatchId {
    resource: Resource,
    namespace: Option<String>,
}

/// Boxed: the variants' sizes differ a lot, and events are moved around.
enum Object {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Pod(Box<Pod>),
}

type Item = (WatchId, Result<watcher::Event<Object>, watcher::Error>);
type Events = Pin<Box<dyn Stream<Item = Item> + Send>>;

/// What one batch of watch events did.
#[derive(Default)]
pub struct Batch {
    /// Services whose spec may have changed.
    pub affected: Affected,
    /// Watch errors, by resource (each is retried by the watcher).
    pub errors: Vec<(Resource, String)>,
    /// Relists that completed after the first list, by resource.
    pub relists: Vec<Resource>,
}

pub struct KubeSource {
    events: Events,
    store: ClusterStore,
    /// Objects of a list in progress, per watcher.
    listing: BTreeMap<WatchId, Vec<Object>>,
    /// Watchers whose first list is done.
    listed: BTreeMap<WatchId, bool>,
}

fn watch<K>(api: Api<K>, config: watcher::Config, id: WatchId, wrap: fn(K) -> Object) -> Events
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    watcher(api, config)
        .default_backoff()
        .map(move |event| (id.clone(), event.map(|e| wrap_event(e, wrap))))
        .boxed()
}

fn wrap_event<K>(event: watcher::Event<K>, wrap: fn(K) -> Object) -> watcher::Event<Object> {
    use watcher::Event;
    match event {
        Event::Apply(k) => Event::Apply(wrap(k)),
        Event::Delete(k) => Event::Delete(wrap(k)),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(wrap(k)),
        Event::InitDone => Event::InitDone,
    }
}

impl KubeSource {
    /// Starts the watchers: per namespace in `namespaces`, or cluster-wide
    /// when it is empty.
    pub fn start(client: Client, namespaces: &[String]) -> KubeSource {
        let scopes: Vec<Option<String>> = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.iter().cloned().map(Some).collect()
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
            // version can select on it, so the store filters instead.
            streams.push(watch(
                api::<Service>(&client, &scope),
                watcher::Config::default(),
                id(Resource::Services),
                |s| Object::Service(Box::new(s)),
            ));
            streams.push(watch(
                api::<EndpointSlice>(&client, &scope),
                watcher::Config::default().labels(LABEL_HEADLESS),
                id(Resource::EndpointSlices),
                |s| Object::Slice(Box::new(s)),
            ));
            // A selector cannot say "has label A or label B": one watcher
            // per label, merged by the store.
            for (i, label) in [LABEL_DRAIN, LABEL_WEIGHT].into_iter().enumerate() {
                streams.push(watch(
                    api::<Pod>(&client, &scope),
                    watcher::Config::default().labels(label),
                    id(Resource::Pods(i)),
                    |p| Object::Pod(Box::new(p)),
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
        KubeSource {
            events: select_all(streams).boxed(),
            store: ClusterStore::new(),
            listing: BTreeMap::new(),
            listed,
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

    /// Waits for the next event, then takes every event already waiting
    /// too (so an endpoint moving between two slices updated together is
    /// one change, not a remove and an add).
    pub async fn next_batch(&mut self) -> Batch {
        let mut batch = Batch::default();
        let Some(first) = self.events.next().await else {
            // The watchers never end; an empty batch just loops.
            return batch;
        };
        self.handle(first, &mut batch);
        for _ in 1..MAX_BATCH {
            match self.events.next().now_or_never() {
                Some(Some(item)) => self.handle(item, &mut batch),
                _ => break,
            }
        }
        batch
    }

    fn handle(&mut self, (id, event): Item, batch: &mut Batch) {
        use watcher::Event;
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                warn!(resource = id.resource.as_str(), namespace = ?id.namespace, error = %e,
                    "watch failed; retrying, the maps keep their last state");
                batch.errors.push((id.resource, e.to_string()));
                return;
            }
        };
        let store = &mut self.store;
        let affected = match event {
            Event::Init => {
                self.listing.insert(id, Vec::new());
                return;
            }
            Event::InitApply(obj) => {
                self.listing.entry(id).or_default().push(obj);
                return;
            }
            Event::InitDone => {
                let objects = self.listing.remove(&id).unwrap_or_default();
                let scope = id.namespace.as_deref();
                let affected = replace(store, id.resource, scope, objects);
                let first = !self.listed.insert(id.clone(), true).unwrap_or(false);
                if first {
                    info!(resource = id.resource.as_str(), namespace = ?id.namespace, "listed");
                } else {
                    info!(resource = id.resource.as_str(), namespace = ?id.namespace, changed_services = affected.len(), "relisted");
                    batch.relists.push(id.resource);
                }
                affected
            }
            Event::Apply(obj) => match (obj, id.resource) {
                (Object::Service(s), _) => store.apply_service(*s),
                (Object::Slice(s), _) => store.apply_slice(*s),
                (Object::Pod(p), Resource::Pods(w)) => store.apply_pod(w, &p),
                (Object::Pod(_), _) => Affected::new(),
            },
            Event::Delete(obj) => match (obj, id.resource) {
                (Object::Service(s), _) => store.delete_service(&s),
                (Object::Slice(s), _) => store.delete_slice(&s),
                (Object::Pod(p), Resource::Pods(w)) => store.delete_pod(w, &p),
                (Object::Pod(_), _) => Affected::new(),
            },
        };
        batch.affected.extend(affected);
    }
}

fn replace(
    store: &mut ClusterStore,
    resource: Resource,
    scope: Option<&str>,
    objects: Vec<Object>,
) -> Affected {
    match resource {
        Resource::Services => store.replace_services(
            scope,
            objects
                .into_iter()
                .filter_map(|o| match o {
                    Object::Service(s) => Some(*s),
                    _ => None,
                })
                .collect(),
        ),
        Resource::EndpointSlices => store.replace_slices(
            scope,
            objects
                .into_iter()
                .filter_map(|o| match o {
                    Object::Slice(s) => Some(*s),
                    _ => None,
                })
                .collect(),
        ),
        Resource::Pods(w) => store.replace_pods(
            w,
            scope,
            objects
                .into_iter()
                .filter_map(|o| match o {
                    Object::Pod(p) => Some(*p),
                    _ => None,
                })
                .collect(),
        ),
    }
}
