//! One round's test bed: fresh namespaces (pods, one client namespace per
//! contender, a DNS server, HAProxy's namespace), the same TCP settings
//! in every one of them, nginx in every pod, and each contender's own
//! machinery (the headway agent, the iptables rules, HAProxy).
//!
//! A fresh bed per round means no contender inherits another's TIME_WAIT
//! sockets or conntrack entries from an earlier round. Every address lives
//! in these namespaces only (no default route anywhere), and every client
//! and proxy runs inside them.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use headway_testbed::{
    Cgroup, Child, Cluster, NetNs, ResolvConf, Zone, start_dns_server, unique_suffix,
};

use super::{
    super::floor::Floors,
    contenders::Contender,
    headway::{self, HeadwayRig},
    kube_proxy, servers,
    workload::Target,
};

const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 53);
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 80);
const LB: &str = "lb";
const DNS: &str = "dns";

pub fn pod_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + u8::try_from(i).expect("few pods"))
}

/// What setting up a round found out, for the results.
#[derive(Debug, Clone, Default)]
pub struct RoundFacts {
    /// `-A` rules in the iptables contender's namespace.
    pub iptables_rules: Option<usize>,
}

/// Removes a directory tree on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Field order is drop order: processes stop before their namespaces go.
pub struct Bed {
    pub headway: Option<HeadwayRig>,
    _haproxy: Option<Child>,
    _nginx: Vec<Child>,
    /// nginx of every pod, and HAProxy: their CPU time is read per run.
    pods_cgroup: Cgroup,
    lb_cgroup: Cgroup,
    _dns: Child,
    _resolvers: Vec<ResolvConf>,
    /// The floor contender's programs (detached before its cgroup goes).
    _floors: Option<Floors>,
    cgroups: BTreeMap<Contender, Cgroup>,
    cluster: Cluster,
    pub pods: Vec<Ipv4Addr>,
    pub facts: RoundFacts,
    _dir: TempDir,
}

impl Bed {
    pub fn build(
        contenders: &[Contender],
        pods: usize,
        other_services: usize,
        www: &Path,
    ) -> anyhow::Result<Bed> {
        let dir = TempDir(std::env::temp_dir().join(format!("headway-bench-{}", unique_suffix())));
        fs::create_dir_all(&dir.0)?;
        let pod_addrs: Vec<Ipv4Addr> = (0..pods).map(pod_addr).collect();

        let mut builder = Cluster::builder();
        for (i, addr) in pod_addrs.iter().enumerate() {
            builder = builder.pod(&headway::pod_name(i), *addr, None);
        }
        builder = builder
            .client_at(DNS, DNS_ADDR, None)
            .client_at(LB, LB_ADDR, None);
        for c in contenders {
            builder = builder.client(&c.client());
        }
        let cluster = builder.build()?;
        let namespaces = cluster.pods().iter().chain(cluster.clients());
        for ns in namespaces.map(|e| e.ns()) {
            servers::apply_sysctls(ns)?;
        }

        let pods_cgroup = Cgroup::new("bench-pods")?;
        let lb_cgroup = Cgroup::new("bench-lb")?;
        let mut nginx = Vec::new();
        for pod in cluster.pods() {
            let pod_dir = dir.0.join(&pod.name);
            nginx.push(servers::start_nginx(pod.ns(), &pods_cgroup, &pod_dir, www)?);
        }

        let zone_path = dir.0.join("zone.json");
        zone(&pod_addrs).write(&zone_path)?;
        let dns = start_dns_server(
            cluster.client_ns(DNS),
            &zone_path,
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        )?;
        let search = format!("{}.svc.{}", headway::NAMESPACE, headway::DOMAIN);
        let mut resolvers = Vec::new();
        for c in contenders {
            let ns = cluster.client_ns(&c.client());
            resolvers.push(ResolvConf::new(ns, DNS_ADDR.into(), &[&search])?);
        }

        let mut cgroups = BTreeMap::new();
        let mut headway = None;
        let mut haproxy = None;
        let mut floors = None;
        let mut facts = RoundFacts::default();
        for &c in contenders {
            match c {
                Contender::HeadwayRandom | Contender::HeadwayObserve => {
                    if headway.is_none() {
                        headway = Some(HeadwayRig::start(&dir.0, &pod_addrs)?);
                    }
                    continue;
                }
                Contender::Iptables => {
                    let ns = cluster.client_ns(&c.client());
                    kube_proxy::apply(ns, &kube_proxy::rules(&pod_addrs, other_services))?;
                    facts.iptables_rules = Some(kube_proxy::count_rules(ns)?);
                }
                // `available_contenders` never schedules it (see there).
                Contender::Ipvs => bail!("the bench has no IPVS contender yet"),
                Contender::Haproxy => {
                    let lb_dir = dir.0.join(LB);
                    fs::create_dir_all(&lb_dir)?;
                    let ns = cluster.client_ns(LB);
                    haproxy = Some(servers::start_haproxy(
                        ns, &lb_cgroup, &lb_dir, LB_ADDR, &pod_addrs,
                    )?);
                }
                Contender::Floor => {
                    let cgroup = Cgroup::new(&format!("bench-{}", c.id()))?;
                    floors = Some(Floors::attach(cgroup.path())?);
                    cgroups.insert(c, cgroup);
                    continue;
                }
                Contender::Direct | Contender::DirectRandom => {}
            }
            cgroups.insert(c, Cgroup::new(&format!("bench-{}", c.id()))?);
        }

        Ok(Bed {
            headway,
            _haproxy: haproxy,
            _nginx: nginx,
            pods_cgroup,
            lb_cgroup,
            _dns: dns,
            _resolvers: resolvers,
            _floors: floors,
            cgroups,
            cluster,
            pods: pod_addrs,
            facts,
            _dir: dir,
        })
    }

    /// The namespace and cgroup contender `c`'s client runs in.
    pub fn client(&self, c: Contender) -> anyhow::Result<(&NetNs, &Cgroup)> {
        let ns = self.cluster.client_ns(&c.client());
        let cgroup = match c.headway_policy() {
            Some(_) => &self.headway.as_ref().context("no headway agent")?.cgroup,
            None => self.cgroups.get(&c).context("contender not set up")?,
        };
        Ok((ns, cgroup))
    }

    /// CPU time (µs) used so far by contender `c`'s client, the pods and
    /// the proxy: the whole path of a request except the switch. Read
    /// around a run, it says what the run cost whatever else the machine
    /// was doing (cgroup v2 `cpu.stat`, kept without any controller).
    pub fn cpu_usage_us(&self, c: Contender) -> anyhow::Result<u64> {
        let (_, client) = self.client(c)?;
        let mut total = 0;
        for cgroup in [client, &self.pods_cgroup, &self.lb_cgroup] {
            total += usage_us(cgroup)?;
        }
        Ok(total)
    }

    /// Where contender `c`'s client sends its load.
    pub fn target(&self, c: Contender) -> Target {
        match c {
            Contender::Direct | Contender::DirectRandom | Contender::Floor => Target {
                host: self.pods[0].to_string(),
                spread_over: self.pods.iter().map(Ipv4Addr::to_string).collect(),
                pick_per_connection: c == Contender::DirectRandom,
            },
            // The short name, expanded by the search list like in a pod.
            Contender::HeadwayRandom | Contender::HeadwayObserve => Target {
                host: headway::SERVICE.to_owned(),
                spread_over: vec![],
                pick_per_connection: false,
            },
            Contender::Iptables | Contender::Ipvs => Target {
                host: kube_proxy::SERVICE_VIP.to_string(),
                spread_over: vec![],
                pick_per_connection: false,
            },
            Contender::Haproxy => Target {
                host: LB_ADDR.to_string(),
                spread_over: vec![],
                pick_per_connection: false,
            },
        }
    }
}

fn usage_us(cgroup: &Cgroup) -> anyhow::Result<u64> {
    let path = cgroup.path().join("cpu.stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no usage_usec in {}", path.display()))
}

/// What CoreDNS serves for the headless service: the service-wide name
/// with every pod, and each pod's own name.
fn zone(pods: &[Ipv4Addr]) -> Zone {
    let mut zone = Zone::new().origin(headway::DOMAIN);
    let name = format!(
        "{}.{}.svc.{}",
        headway::SERVICE,
        headway::NAMESPACE,
        headway::DOMAIN
    );
    for (i, addr) in pods.iter().enumerate() {
        zone = zone
            .a(&name, *addr)
            .a(&format!("{}.{name}", headway::pod_name(i)), *addr);
    }
    zone
}
