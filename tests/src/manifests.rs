//! Plain Kubernetes manifests for the agent's `dir:` source: a headless
//! Service and its EndpointSlices (one per address family), built as API
//! objects and written as YAML, so tests say what a service is rather than
//! how its YAML is spelled.
use std::{collections::BTreeMap, fs, net::IpAddr, path::Path};

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// One pod as an endpoint of the service.
#[derive(Clone, Debug)]
pub struct PodEndpoint {
    pub pod: String,
    pub addrs: Vec<IpAddr>,
    pub ready: bool,
    pub terminating: bool,
    /// Whether the endpoint carries the pod's name as its hostname (a
    /// StatefulSet pod: it gets a pod-specific DNS name).
    pub hostname: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// Labels of the pod; a pod with any is also written as a Pod object
    /// (headway reads `headway.dev/drain` and `headway.dev/weight` there).
    pub labels: BTreeMap<String, String>,
}

impl PodEndpoint {
    /// A ready pod with a hostname, at `addrs`.
    pub fn new(pod: &str, addrs: impl IntoIterator<Item = IpAddr>) -> PodEndpoint {
        PodEndpoint {
            pod: pod.to_owned(),
            addrs: addrs.into_iter().collect(),
            ready: true,
            terminating: false,
            hostname: true,
            node: None,
            zone: None,
            labels: BTreeMap::new(),
        }
    }

    pub fn ready(mut self, ready: bool) -> PodEndpoint {
        self.ready = ready;
        self
    }

    pub fn without_hostname(mut self) -> PodEndpoint {
        self.hostname = false;
        self
    }

    pub fn terminating(mut self, terminating: bool) -> PodEndpoint {
        self.terminating = terminating;
        self
    }

    /// The node the pod runs on, and that node's zone.
    pub fn on_node(mut self, node: &str, zone: &str) -> PodEndpoint {
        self.node = Some(node.to_owned());
        self.zone = Some(zone.to_owned());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> PodEndpoint {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }
}

/// A headless Service (`clusterIP: None`) with its endpoints.
#[derive(Clone, Debug)]
pub struct HeadlessService {
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    /// (name, port), TCP; declared on the Service and on its slices.
    pub ports: Vec<(String, u16)>,
    pub publish_not_ready: bool,
    pub endpoints: Vec<PodEndpoint>,
}

impl HeadlessService {
    pub fn new(namespace: &str, name: &str) -> HeadlessService {
        HeadlessService {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            annotations: BTreeMap::new(),
            ports: Vec::new(),
            publish_not_ready: false,
            endpoints: Vec::new(),
        }
    }

    /// `spec.publishNotReadyAddresses`.
    pub fn publish_not_ready(mut self, publish: bool) -> HeadlessService {
        self.publish_not_ready = publish;
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> HeadlessService {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// `headway.dev/policy`.
    pub fn policy(self, policy: &str) -> HeadlessService {
        self.annotation("headway.dev/policy", policy)
    }

    pub fn port(mut self, name: &str, port: u16) -> HeadlessService {
        self.ports.push((name.to_owned(), port));
        self
    }

    pub fn endpoint(mut self, endpoint: PodEndpoint) -> HeadlessService {
        self.endpoints.push(endpoint);
        self
    }

    /// The Service and one EndpointSlice per address family its endpoints
    /// use, as API objects.
    pub fn objects(&self) -> Vec<Value> {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|(name, port)| json!({"name": name, "port": port, "protocol": "TCP"}))
            .collect();
        let mut spec = json!({"clusterIP": "None"});
        if self.publish_not_ready {
            spec["publishNotReadyAddresses"] = json!(true);
        }
        if !ports.is_empty() {
            spec["ports"] = json!(ports);
        }
        let mut objects = vec![json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "annotations": self.annotations,
            },
            "spec": spec,
        })];
        for (family, suffix, is_family) in [
            ("IPv4", "v4", IpAddr::is_ipv4 as fn(&IpAddr) -> bool),
            ("IPv6", "v6", IpAddr::is_ipv6),
        ] {
            let endpoints: Vec<Value> = self
                .endpoints
                .iter()
                .filter_map(|e| {
                    let addrs: Vec<String> = e
                        .addrs
                        .iter()
                        .filter(|a| is_family(a))
                        .map(IpAddr::to_string)
                        .collect();
                    (!addrs.is_empty()).then(|| self.endpoint_object(e, addrs))
                })
                .collect();
            if endpoints.is_empty() {
                continue;
            }
            let mut slice = json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{}-{suffix}", self.name),
                    "namespace": self.namespace,
                    "labels": {"kubernetes.io/service-name": self.name},
                },
                "addressType": family,
                "endpoints": endpoints,
            });
            if !ports.is_empty() {
                slice["ports"] = json!(ports);
            }
            objects.push(slice);
        }
        for e in self.endpoints.iter().filter(|e| !e.labels.is_empty()) {
            objects.push(json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": e.pod, "namespace": self.namespace, "labels": e.labels},
            }));
        }
        objects
    }

    fn endpoint_object(&self, e: &PodEndpoint, addrs: Vec<String>) -> Value {
        let mut ep = json!({
            "addresses": addrs,
            "conditions": {"ready": e.ready},
            "targetRef": {"kind": "Pod", "namespace": self.namespace, "name": e.pod},
        });
        if e.terminating {
            ep["conditions"]["terminating"] = json!(true);
        }
        if e.hostname {
            ep["hostname"] = json!(e.pod);
        }
        if let Some(node) = &e.node {
            ep["nodeName"] = json!(node);
        }
        if let Some(zone) = &e.zone {
            ep["zone"] = json!(zone);
        }
        ep
    }

    /// The manifests as one multi-document YAML text.
    pub fn to_yaml(&self) -> String {
        documents(&self.objects())
    }

    /// Writes the manifests to `dir/<name>.yaml`, whole: written aside and
    /// renamed, so the agent never reads half a file.
    pub fn write_to(&self, dir: &Path) -> Result<()> {
        write_whole(&dir.join(format!("{}.yaml", self.name)), &self.to_yaml())
    }
}

/// A Node in `zone` (label `topology.kubernetes.io/zone`).
pub fn node(name: &str, zone: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
    })
}

/// Objects as one multi-document YAML text.
pub fn documents(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| serde_yaml_ng::to_string(o).expect("JSON values always serialize"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_whole(path: &Path, text: &str) -> Result<()> {
    let name = path
        .file_name()
        .context("a manifest path names a file")?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dual_stack_service_gets_one_slice_per_family_with_its_ports() {
        let svc = HeadlessService::new("demo", "web")
            .policy("random")
            .port("http", 8080)
            .endpoint(PodEndpoint::new(
                "web-0",
                ["10.77.0.10".parse().unwrap(), "fd77::10".parse().unwrap()],
            ))
            .endpoint(PodEndpoint::new("web-1", ["10.77.0.11".parse().unwrap()]).ready(false));
        let objects = svc.objects();
        assert_eq!(objects.len(), 3);
        assert_eq!(objects[0]["spec"]["clusterIP"], "None");
        assert_eq!(
            objects[0]["metadata"]["annotations"]["headway.dev/policy"],
            "random"
        );
        assert_eq!(objects[1]["addressType"], "IPv4");
        assert_eq!(objects[1]["endpoints"].as_array().unwrap().len(), 2);
        assert_eq!(objects[1]["endpoints"][1]["conditions"]["ready"], false);
        assert_eq!(objects[2]["addressType"], "IPv6");
        assert_eq!(objects[2]["endpoints"][0]["addresses"][0], "fd77::10");
        assert_eq!(objects[2]["ports"][0]["port"], 8080);
        // What the agent's dir: source reads back.
        let text = svc.to_yaml();
        assert_eq!(text.matches("---\n").count(), 2, "{text}");
    }
}
