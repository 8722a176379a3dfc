//! The userspace servers of the bench: nginx in every pod (the same HTTP
//! server behind every contender) and HAProxy in TCP mode in a namespace
//! of its own. Both come from Debian and run in the foreground as
//! children, so dropping them stops them.
use std::{
    fs,
    net::Ipv4Addr,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use headway_testbed::{Cgroup, Child, NetNs};

use super::{
    paired::WHOAMI_PATH,
    workload::{BULK_BYTES, BULK_PATH, HTTP_PORT},
};

/// nginx for one pod: one worker (the pods share two CPUs), a tiny body
/// on `/` and a large file under `/bulk/` (sendfile). Keep-alive
/// connections are never closed by request count, so the keep-alive
/// workloads measure requests, not reconnects.
fn nginx_conf(dir: &Path, www: &Path) -> String {
    format!(
        "worker_processes 1;\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 sendfile on;\n\
         \x20 keepalive_requests 100000000;\n\
         \x20 keepalive_timeout 60s;\n\
         \x20 client_body_temp_path {dir}/body;\n\
         \x20 default_type text/plain;\n\
         \x20 server {{\n\
         \x20   listen {HTTP_PORT} backlog=4096;\n\
         \x20   location = / {{ return 200 \"ok\\n\"; }}\n\
         \x20   location = {WHOAMI_PATH} {{ return 200 \"$server_addr\\n\"; }}\n\
         \x20   location /bulk/ {{ root {www}; }}\n\
         \x20 }}\n\
         }}\n",
        dir = dir.display(),
        www = www.display(),
    )
}

/// The document root every pod serves: the bulk file, made once.
pub fn make_www(dir: &Path) -> anyhow::Result<()> {
    let file = dir.join(BULK_PATH.trim_start_matches('/'));
    fs::create_dir_all(file.parent().context("bulk path has a parent")?)?;
    // Written out (not sparse) and so already in the page cache: the
    // first contender to fetch it pays no cold read.
    let zeros = vec![0u8; usize::try_from(BULK_BYTES)?];
    fs::write(&file, zeros).with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

/// Starts nginx in `ns` and `cgroup` (whose CPU time the bench reads)
/// with its files under `dir`, serving `www`.
pub fn start_nginx(ns: &NetNs, cgroup: &Cgroup, dir: &Path, www: &Path) -> anyhow::Result<Child> {
    fs::create_dir_all(dir.join("body"))?;
    let conf = dir.join("nginx.conf");
    fs::write(&conf, nginx_conf(dir, www))?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(&conf).args(["-g", "daemon off;"]);
    let mut child = ns.spawn(Some(cgroup), &cmd)?;
    wait_listening(ns, HTTP_PORT, &mut child)?;
    Ok(child)
}

/// HAProxy in TCP mode: one frontend on `listen`, round robin over the
/// pods. Defaults everywhere else (threads: one per CPU; maxconn from the
/// file-descriptor limit).
fn haproxy_conf(listen: Ipv4Addr, pods: &[Ipv4Addr]) -> String {
    let mut conf = format!(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend web\n  bind {listen}:{HTTP_PORT}\n  default_backend pods\n\
         backend pods\n  balance roundrobin\n"
    );
    for (i, pod) in pods.iter().enumerate() {
        conf.push_str(&format!("  server p{i} {pod}:{HTTP_PORT}\n"));
    }
    conf
}

pub fn start_haproxy(
    ns: &NetNs,
    cgroup: &Cgroup,
    dir: &Path,
    listen: Ipv4Addr,
    pods: &[Ipv4Addr],
) -> anyhow::Result<Child> {
    let conf = dir.join("haproxy.cfg");
    fs::write(&conf, haproxy_conf(listen, pods))?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&conf);
    let mut child = ns.spawn(Some(cgroup), &cmd)?;
    wait_listening(ns, HTTP_PORT, &mut child)?;
    Ok(child)
}

/// Waits until something in `ns` listens on TCP `port` (read with `ss`
/// inside the namespace: no packet is sent to find out).
fn wait_listening(ns: &NetNs, port: u16, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("{} exited ({status}) before listening", child.label());
        }
        let out = ns
            .exec("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .context("running ss (iproute2)")?;
        if !out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{} not listening on {port} after 10 s", child.label())
}

/// The TCP settings every client, proxy and pod namespace gets, the same
/// for every contender: the widest ephemeral port range and TIME_WAIT
/// reuse for outgoing connections, so no contender runs out of ports.
pub const SYSCTLS: [(&str, &str); 2] = [
    ("net/ipv4/ip_local_port_range", "1024 65535"),
    ("net/ipv4/tcp_tw_reuse", "1"),
];

pub fn apply_sysctls(ns: &NetNs) -> anyhow::Result<()> {
    for (key, value) in SYSCTLS {
        let status = ns
            .exec("sh")
            .args(["-c", &format!("echo '{value}' > /proc/sys/{key}")])
            .status()?;
        if !status.success() {
            bail!("setting {key} in {}: {status}", ns.name());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_balances_over_every_pod_in_tcp_mode() {
        let pods = [Ipv4Addr::new(10, 77, 0, 10), Ipv4Addr::new(10, 77, 0, 11)];
        let conf = haproxy_conf(Ipv4Addr::new(10, 77, 0, 80), &pods);
        assert!(conf.contains("mode tcp"));
        assert!(conf.contains("bind 10.77.0.80:80"));
        assert!(conf.contains("server p0 10.77.0.10:80\n  server p1 10.77.0.11:80"));
    }

    #[test]
    fn nginx_serves_the_bulk_directory() {
        let conf = nginx_conf(Path::new("/tmp/p0"), Path::new("/tmp/www"));
        assert!(conf.contains("location /bulk/ { root /tmp/www; }"));
        assert!(conf.contains("pid /tmp/p0/nginx.pid;"));
    }
}
