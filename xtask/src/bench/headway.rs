//! The headway contender: the agent follows a `dir:` manifest of one
//! headless service over the bench's pods, attached to the cgroup the
//! headway clients run in; the policy is switched by rewriting the
//! manifest (the agent follows it) before each run.
use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use headway_testbed::{
    Cgroup,
    agent::{Agent, Bpffs, status_json, wait_for_status},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::workload::HTTP_PORT;

pub const NAMESPACE: &str = "demo";
pub const SERVICE: &str = "web";
pub const DOMAIN: &str = "cluster.local";

/// The names the pods get in the manifest and in DNS.
pub fn pod_name(i: usize) -> String {
    format!("web-{i}")
}

/// The service, its IPv4 EndpointSlice and its pods, as plain manifests.
pub fn manifest(policy: &str, pods: &[Ipv4Addr]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {SERVICE}\n  namespace: {NAMESPACE}\n\
         \x20 annotations: {{headway.dev/policy: {policy}}}\n\
         spec:\n  clusterIP: None\n  ports:\n  - {{name: http, port: {HTTP_PORT}, protocol: TCP}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {SERVICE}-ipv4\n\
         \x20 namespace: {NAMESPACE}\n  labels: {{kubernetes.io/service-name: {SERVICE}}}\n\
         addressType: IPv4\nports:\n- {{name: http, port: {HTTP_PORT}, protocol: TCP}}\nendpoints:\n"
    );
    for (i, addr) in pods.iter().enumerate() {
        let name = pod_name(i);
        out.push_str(&format!(
            "- addresses: [\"{addr}\"]\n  hostname: {name}\n  conditions: {{ready: true}}\n\
             \x20 targetRef: {{kind: Pod, namespace: {NAMESPACE}, name: {name}}}\n"
        ));
    }
    for i in 0..pods.len() {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {NAMESPACE}\n",
            pod_name(i)
        ));
    }
    out
}

/// What the datapath decided about the service's connects, by reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub decisions: BTreeMap<String, u64>,
}

impl Counters {
    fn from_status(status: &Value) -> Counters {
        let decisions = status["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == SERVICE))
            .and_then(|s| s["counters"]["decisions"].as_object())
            .map(|d| {
                d.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        Counters { decisions }
    }

    /// What changed between `before` and `self` (counters only grow).
    pub fn since(&self, before: &Counters) -> Counters {
        let decisions = self
            .decisions
            .iter()
            .map(|(k, v)| {
                let b = before.decisions.get(k).copied().unwrap_or(0);
                (k.clone(), v.saturating_sub(b))
            })
            .filter(|(_, v)| *v > 0)
            .collect();
        Counters { decisions }
    }
}

/// The running agent and everything it owns for one round.
pub struct HeadwayRig {
    pub cgroup: Cgroup,
    bpffs: Bpffs,
    agent: Agent,
    manifests: PathBuf,
    pods: Vec<Ipv4Addr>,
    policy: String,
}

impl HeadwayRig {
    pub fn start(dir: &Path, pods: &[Ipv4Addr]) -> anyhow::Result<HeadwayRig> {
        let manifests = dir.join("manifests");
        fs::create_dir_all(&manifests)?;
        let policy = "random".to_owned();
        fs::write(manifests.join("web.yaml"), manifest(&policy, pods))?;
        let cgroup = Cgroup::new("bench-headway")?;
        let bpffs = Bpffs::new()?;
        let agent = Agent::start(&manifests, cgroup.path(), &bpffs, &[])?;
        let mut rig = HeadwayRig {
            cgroup,
            bpffs,
            agent,
            manifests,
            pods: pods.to_vec(),
            policy,
        };
        rig.wait_policy()?;
        Ok(rig)
    }

    /// Switches the service's policy and waits until the maps say so.
    pub fn set_policy(&mut self, policy: &str) -> anyhow::Result<()> {
        if self.policy != policy {
            self.policy = policy.to_owned();
            fs::write(
                self.manifests.join("web.yaml"),
                manifest(policy, &self.pods),
            )?;
            self.wait_policy()?;
        }
        Ok(())
    }

    fn wait_policy(&mut self) -> anyhow::Result<()> {
        let (policy, pods) = (self.policy.clone(), self.pods.len());
        wait_for_status(&self.bpffs, &mut self.agent, Duration::from_secs(20), |s| {
            s["services"].as_array().is_some_and(|svcs| {
                svcs.iter().any(|svc| {
                    svc["name"] == SERVICE
                        && svc["policy"] == policy.as_str()
                        && svc["pods"].as_array().map_or(0, Vec::len) == pods
                })
            })
        })
        .with_context(|| format!("the agent never applied policy {policy}"))?;
        Ok(())
    }

    pub fn counters(&mut self) -> anyhow::Result<Counters> {
        self.agent.check_running()?;
        Ok(Counters::from_status(&status_json(&self.bpffs)?))
    }

    /// (runs, run time in ns) per hook, from the pinned programs.
    pub fn program_stats(&mut self) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
        self.agent.check_running()?;
        crate::bpf_stats::program_stats(&self.bpffs)
    }

    pub fn stop(self) -> anyhow::Result<()> {
        self.agent.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest is what the agent's `dir:` source reads, error-free.
    #[test]
    fn manifest_declares_policy_port_and_every_pod() {
        let pods = [Ipv4Addr::new(10, 77, 0, 10), Ipv4Addr::new(10, 77, 0, 11)];
        let text = manifest("observe", &pods);
        assert!(text.contains("headway.dev/policy: observe"));
        assert!(text.contains("- addresses: [\"10.77.0.11\"]\n  hostname: web-1"));
        let dir = std::env::temp_dir().join(format!(
            "headway-bench-manifest-{}",
            headway_testbed::unique_suffix()
        ));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("web.yaml"), &text).unwrap();
        let snapshot = headway::source::dir::load_dir(&dir);
        fs::remove_dir_all(&dir).unwrap();
        let snapshot = snapshot.unwrap();
        assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
        let o = snapshot.objects;
        assert_eq!((o.services.len(), o.slices.len(), o.pods.len()), (1, 1, 2));
    }

    #[test]
    fn counters_subtract_and_drop_unchanged_decisions() {
        let status = |steered: u64| {
            serde_json::json!({
                "services": [{"name": "web", "counters": {"decisions": {"steered_balanced": steered, "kept_observe": 3}}}],
            })
        };
        let before = Counters::from_status(&status(10));
        let after = Counters::from_status(&status(25));
        let delta = after.since(&before);
        assert_eq!(
            delta.decisions,
            BTreeMap::from([("steered_balanced".into(), 15)])
        );
    }
}
