//! The kube-proxy contender: a ClusterIP-style virtual IP with iptables
//! DNAT rules laid out the way kube-proxy's iptables mode lays them out
//! (KUBE-SERVICES → KUBE-SVC-* → `statistic --mode random` → KUBE-SEP-*
//! DNAT), among the rules of many other services, loaded with one
//! `iptables-restore` inside the client's namespace.
//!
//! Where our service sits in KUBE-SERVICES matters (the chain is matched
//! rule by rule for the first packet of every connection): kube-proxy
//! writes services in map order, so a service lands anywhere; we place it
//! in the middle, the expected position.
use std::{
    io::Write,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};
use headway_testbed::NetNs;

use super::workload::HTTP_PORT;

/// The cluster (pod) CIDR: traffic from inside it is not masqueraded, as
/// with kube-proxy's `--cluster-cidr`. Our clients live in it.
pub const CLUSTER_CIDR: &str = "10.77.0.0/16";
/// The virtual IP of the measured service, inside the on-link /16 so the
/// client needs no extra route before DNAT.
pub const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 128, 1);
/// Endpoints of each of the other services (never contacted).
const OTHER_ENDPOINTS: usize = 2;

/// One service as kube-proxy would program it.
struct Service {
    name: String,
    vip: Ipv4Addr,
    endpoints: Vec<Ipv4Addr>,
}

impl Service {
    /// kube-proxy names chains by a hash of the service port; any stable
    /// unique suffix serves here.
    fn chain(&self) -> String {
        format!("KUBE-SVC-{}", chain_suffix(&self.name))
    }

    fn sep_chain(&self, i: usize) -> String {
        format!("KUBE-SEP-{}", chain_suffix(&format!("{}#{i}", self.name)))
    }
}

/// 16 upper-case base-32 characters, like kube-proxy's chain names.
fn chain_suffix(s: &str) -> String {
    // FNV-1a, widened by a second pass: only uniqueness matters.
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in s.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000000001000000000000000000013b);
    }
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..16)
        .map(|i| ALPHABET[((h >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// Other services get virtual IPs from 10.96.0.0/16 and endpoints from
/// 10.98.0.0/16 and 10.99.0.0/16 (nothing listens there; no rule for them
/// ever matches our traffic).
fn other_service(i: usize) -> Service {
    let i16 = u16::try_from(i).expect("at most 65535 other services");
    let [hi, lo] = i16.to_be_bytes();
    Service {
        name: format!("bench-other/svc-{i}:http"),
        vip: Ipv4Addr::new(10, 96, hi, lo),
        endpoints: (0..OTHER_ENDPOINTS)
            .map(|e| Ipv4Addr::new(10, 98 + e as u8, hi, lo))
            .collect(),
    }
}

/// The `iptables-restore` input: the nat and filter tables kube-proxy
/// would write for `others` other services plus ours (`pods` behind
/// [`SERVICE_VIP`]).
pub fn rules(pods: &[Ipv4Addr], others: usize) -> String {
    let ours = Service {
        name: "demo/web:http".into(),
        vip: SERVICE_VIP,
        endpoints: pods.to_vec(),
    };
    let mut services: Vec<Service> = (0..others).map(other_service).collect();
    services.insert(others / 2, ours);

    let mut nat = String::from("*nat\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        nat.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for svc in &services {
        nat.push_str(&format!(":{} - [0:0]\n", svc.chain()));
        for i in 0..svc.endpoints.len() {
            nat.push_str(&format!(":{} - [0:0]\n", svc.sep_chain(i)));
        }
    }
    let portals = "-m comment --comment \"kubernetes service portals\"";
    nat.push_str(&format!("-A PREROUTING {portals} -j KUBE-SERVICES\n"));
    nat.push_str(&format!("-A OUTPUT {portals} -j KUBE-SERVICES\n"));
    nat.push_str(
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for svc in &services {
        nat.push_str(&format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m tcp --dport {HTTP_PORT} -j {}\n",
            svc.vip,
            svc.name,
            svc.chain()
        ));
    }
    nat.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    for svc in &services {
        service_chains(&mut nat, svc);
    }
    nat.push_str("COMMIT\n");

    // The filter table's per-packet part: kube-proxy's jumps for new
    // connections (the chains hold rules only for services without
    // endpoints, which we have none of).
    let mut filter = String::from("*filter\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        filter.push_str(&format!(":{chain} - [0:0]\n"));
    }
    filter.push_str(
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A INPUT -j KUBE-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -j KUBE-FIREWALL\n\
         -A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
         COMMIT\n",
    );
    nat + &filter
}

/// KUBE-SVC-*: masquerade traffic from outside the cluster CIDR, then
/// pick an endpoint: endpoint i of n with probability 1/(n-i), the last
/// one unconditionally, which makes the choice uniform.
fn service_chains(out: &mut String, svc: &Service) {
    let chain = svc.chain();
    out.push_str(&format!(
        "-A {chain} ! -s {CLUSTER_CIDR} -d {}/32 -p tcp -m comment --comment \"{} cluster IP\" -m tcp --dport {HTTP_PORT} -j KUBE-MARK-MASQ\n",
        svc.vip, svc.name
    ));
    let n = svc.endpoints.len();
    for (i, ep) in svc.endpoints.iter().enumerate() {
        let comment = format!("-m comment --comment \"{} -> {ep}:{HTTP_PORT}\"", svc.name);
        let sep = svc.sep_chain(i);
        if i + 1 < n {
            let p = 1.0 / (n - i) as f64;
            out.push_str(&format!(
                "-A {chain} {comment} -m statistic --mode random --probability {p:.11} -j {sep}\n"
            ));
        } else {
            out.push_str(&format!("-A {chain} {comment} -j {sep}\n"));
        }
    }
    for (i, ep) in svc.endpoints.iter().enumerate() {
        let sep = svc.sep_chain(i);
        out.push_str(&format!(
            "-A {sep} -s {ep}/32 -m comment --comment \"{}\" -j KUBE-MARK-MASQ\n\
             -A {sep} -p tcp -m comment --comment \"{}\" -m tcp -j DNAT --to-destination {ep}:{HTTP_PORT}\n",
            svc.name, svc.name
        ));
    }
}

/// Loads `rules` into `ns` with one `iptables-restore` (the system's
/// iptables: nf_tables backend on Debian 12, like current nodes).
pub fn apply(ns: &NetNs, rules: &str) -> anyhow::Result<()> {
    let mut child = ns
        .exec("iptables-restore")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iptables-restore (apt-get install iptables)")?;
    child
        .stdin
        .take()
        .context("iptables-restore stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore in {} failed: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// How many rules a namespace holds (`iptables -S` lines starting -A),
/// to record what was really loaded.
pub fn count_rules(ns: &NetNs) -> anyhow::Result<usize> {
    let mut n = 0;
    for table in ["nat", "filter"] {
        let out = ns
            .exec("iptables")
            .args(["-t", table, "-S"])
            .output()
            .context("running iptables -S")?;
        if !out.status.success() {
            bail!("iptables -t {table} -S failed in {}", ns.name());
        }
        n += String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count();
    }
    Ok(n)
}

/// Why the IPVS contender cannot run here, or `None` if it can: it needs
/// `ipvsadm` and a kernel with IP_VS (`ipvsadm -Ln` in a namespace).
pub fn ipvs_unavailable(ns: &NetNs) -> Option<String> {
    let out = match ns.exec("ipvsadm").arg("-Ln").output() {
        Ok(out) => out,
        Err(e) => {
            return Some(format!(
                "ipvsadm not runnable ({e}); apt-get install ipvsadm"
            ));
        }
    };
    if out.status.success() {
        return None;
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let config = kernel_config_line("CONFIG_IP_VS");
    Some(format!(
        "ipvsadm -Ln: {err}{}",
        config
            .map(|c| format!(" (kernel: {c})"))
            .unwrap_or_default()
    ))
}

fn kernel_config_line(key: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", "zcat /proc/config.gz 2>/dev/null"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with(&format!("{key}=")) || *l == format!("# {key} is not set"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> Vec<Ipv4Addr> {
        (10..14).map(|i| Ipv4Addr::new(10, 77, 0, i)).collect()
    }

    #[test]
    fn our_service_sits_in_the_middle_of_kube_services() {
        let text = rules(&pods(), 100);
        let portals: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -d "))
            .collect();
        assert_eq!(portals.len(), 101);
        assert!(portals[50].starts_with("-A KUBE-SERVICES -d 10.77.128.1/32"));
    }

    #[test]
    fn endpoints_are_chosen_uniformly_then_dnatted() {
        let text = rules(&pods(), 0);
        let probs: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(probs, ["0.25000000000", "0.33333333333", "0.50000000000"]);
        for pod in pods() {
            let dnat = format!("-j DNAT --to-destination {pod}:80");
            assert_eq!(text.lines().filter(|l| l.ends_with(&dnat)).count(), 1);
        }
        // Chains are declared once each, and every jump has a chain.
        let declared: std::collections::BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        for line in text.lines().filter(|l| l.contains("-j KUBE-")) {
            let target = line.rsplit("-j ").next().unwrap().split_whitespace().next();
            assert!(declared.contains(target.unwrap()), "{line}");
        }
    }

    #[test]
    fn ten_thousand_services_make_kube_proxy_sized_tables() {
        let text = rules(&pods(), 10_000);
        let appends = text.lines().filter(|l| l.starts_with("-A ")).count();
        // Per other service: portal, masquerade, 2 picks, 2 x (masq, DNAT);
        // ours has 4 endpoints; then the nat jumps and masquerade (7), the
        // nodeports rule and the filter table (7).
        assert_eq!(appends, 10_000 * 8 + (1 + 1 + 4 + 8) + 7 + 1 + 7);
        let suffixes: std::collections::BTreeSet<String> =
            (0..10_000).map(|i| other_service(i).chain()).collect();
        assert_eq!(suffixes.len(), 10_000);
    }
}
