//! Where the agent's view of the cluster comes from: `dir` produces
//! [`Objects`] snapshots for [`crate::model::desired_state`]; `kube`
//! watches the API and keeps a [`store::ClusterStore`] that recomputes
//! only the services a change affects, through the same model functions.

pub mod dir;
pub mod kube;
pub mod store;

use k8s_openapi::Resource;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::{self, DesiredState, Warning};

/// One kind of API object the agent reads, and the verbs it uses on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group (`""` for the core group).
    pub group: &'static str,
    /// Resource name as RBAC rules spell it (`endpointslices`).
    pub resource: &'static str,
    /// Kind, as the Rust type is named (`EndpointSlice`).
    pub kind: &'static str,
    pub verbs: &'static [&'static str],
}

impl ApiAccess {
    const fn of<K: Resource>(verbs: &'static [&'static str]) -> ApiAccess {
        ApiAccess {
            group: K::GROUP,
            resource: K::URL_PATH_SEGMENT,
            kind: K::KIND,
            verbs,
        }
    }
}

const WATCH: &[&str] = &["get", "list", "watch"];

/// Every API resource the agent reads from the API server: the kube source
/// watches Services, EndpointSlices, Pods and its own Node (zone label). The ClusterRole in deploy/base/rbac.yaml must grant these, and
/// tests/tests/deploy_manifests.rs checks that it does and that no other
/// type is used with `kube::Api` in the agent: a new watcher belongs here.
pub const WATCHED_RESOURCES: [ApiAccess; 4] = [
    ApiAccess::of::<Service>(WATCH),
    ApiAccess::of::<EndpointSlice>(WATCH),
    ApiAccess::of::<Pod>(WATCH),
    ApiAccess::of::<Node>(WATCH),
];

/// The Kubernetes objects headway reads, as one consistent snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    /// Nodes (the agent reads its own node's zone label).
    pub nodes: Vec<Node>,
}

impl Objects {
    /// Appends clones of all of `other`'s objects.
    pub fn extend_from(&mut self, other: &Objects) {
        self.services.extend_from_slice(&other.services);
        self.slices.extend_from_slice(&other.slices);
        self.pods.extend_from_slice(&other.pods);
        self.nodes.extend_from_slice(&other.nodes);
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.slices.is_empty()
            && self.pods.is_empty()
            && self.nodes.is_empty()
    }

    /// Shorthand for [`model::desired_state`] over this snapshot.
    pub fn desired_state(&self) -> (DesiredState, Vec<Warning>) {
        model::desired_state(&self.services, &self.slices, &self.pods)
    }
}
