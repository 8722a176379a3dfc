//! `headway`: the node agent and its command-line tools.
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use headway::{
    agent::{self, AgentConfig, SourceSpec},
    cgroup, datapath,
    model::Policy,
    pinned::MapSizes,
    status, top,
};

#[derive(Parser)]
#[command(
    name = "headway",
    version,
    about = "Per-pod steering and accounting for Kubernetes headless services"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "HEADWAY_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent: attach the programs and keep the maps in sync.
    Agent(AgentArgs),
    /// Show services, pods, their state and counters from the pinned maps
    /// (works while the agent is down).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Where bpffs is mounted.
        #[arg(long, env = "HEADWAY_BPFFS", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// A live view of per-pod connection and byte rates, by service, from
    /// the pinned maps (like `top`; `q` quits).
    Top {
        /// How often to read the maps and redraw (e.g. `500ms`, `2s`).
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Where bpffs is mounted.
        #[arg(long, env = "HEADWAY_BPFFS", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// Detach the programs and remove every pinned map and link.
    Reset {
        /// Where bpffs is mounted.
        #[arg(long, env = "HEADWAY_BPFFS", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Where services and endpoints come from: `kube` watches the
    /// Kubernetes API (the default inside a pod); `dir:PATH` reads Service,
    /// EndpointSlice and Pod manifests from a directory and follows changes.
    #[arg(long, env = "HEADWAY_SOURCE")]
    source: Option<SourceSpec>,
    /// Kubeconfig for the kube source (default: in-cluster credentials,
    /// then $KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "HEADWAY_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The cgroup v2 directory to attach to (default: the cgroup v2 root,
    /// found from /proc/mounts).
    #[arg(long, env = "HEADWAY_CGROUP_PATH")]
    cgroup_path: Option<PathBuf>,
    /// Where bpffs is mounted (mounted there if it is not).
    #[arg(long, env = "HEADWAY_BPFFS", default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Policy for services without a `headway.dev/policy` annotation.
    #[arg(long, env = "HEADWAY_DEFAULT_POLICY", default_value = "failover")]
    default_policy: Policy,
    /// Only handle services in this namespace (repeatable; default: all).
    #[arg(long = "namespace", env = "HEADWAY_NAMESPACE", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// The cluster's DNS domain (service names end in `svc.<domain>`).
    #[arg(long, env = "HEADWAY_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Steer sockets in the host network namespace too (by default they
    /// are only accounted: kubelet probes must reach the pod they name).
    #[arg(long, env = "HEADWAY_STEER_HOST_NETNS")]
    steer_host_netns: bool,
    /// Room for this many pod addresses and pods (per-service endpoint
    /// maps get twice as many entries, DNS names four times). Changing it
    /// for maps already pinned needs `headway reset`.
    #[arg(long, env = "HEADWAY_MAX_ENDPOINTS", default_value_t = MapSizes::default().max_endpoints,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_endpoints: u32,
    /// Room for this many headless services (at most 65,536).
    #[arg(long, env = "HEADWAY_MAX_SERVICES", default_value_t = MapSizes::default().max_services,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(headway_common::MAX_SERVICES)))]
    max_services: u32,
    /// Room for this many client sockets talking to pods from this node at
    /// once (the socket table; rounded up to a power of two). A socket
    /// that finds it full is neither accounted nor steered transparently.
    /// Changing it for maps already pinned needs `headway reset`.
    #[arg(long, env = "HEADWAY_MAX_SOCKETS", default_value_t = MapSizes::default().max_sockets,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_sockets: u32,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, env = "HEADWAY_METRICS_ADDR", default_value = "0.0.0.0:9970")]
    metrics_addr: std::net::SocketAddr,
    /// The node this agent runs on (for `headway.dev/topology`; its Node
    /// object's `topology.kubernetes.io/zone` label gives the zone).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Start the kube source's watches with streaming lists
    /// (`sendInitialEvents`; API servers with the WatchList feature)
    /// instead of paged lists.
    #[arg(long, env = "HEADWAY_STREAMING_LISTS")]
    streaming_lists: bool,
    /// How long /metrics keeps exporting the last values of a deleted pod
    /// or service before its series go (e.g. `5m`, `30s`).
    #[arg(long, env = "HEADWAY_METRICS_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    metrics_grace: std::time::Duration,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: `kubectl logs` and log files get plain
    // text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// glibc gives each thread that allocates its own arena, and memory freed
/// in one arena serves only that arena: the lists decoded on the runtime's
/// workers left garbage the sync (on the main thread) could not reuse. One
/// arena for the agent's three threads: 10,000 services x 10 endpoints
/// peaked at 150.6 MB instead of 162-164 MB.
fn one_malloc_arena() {
    // SAFETY: mallopt only sets a tunable; called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Agent(args) => {
            let cgroup_path = match args.cgroup_path {
                Some(path) => path,
                None => cgroup::cgroup2_root()?,
            };
            let source = match args.source {
                Some(source) => source,
                // Inside a pod the API is right there.
                None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => SourceSpec::Kube,
                None => anyhow::bail!(
                    "--source is required outside a Kubernetes pod: `kube` (with --kubeconfig) or `dir:PATH`"
                ),
            };
            let cfg = AgentConfig {
                source,
                kubeconfig: args.kubeconfig,
                cgroup_path,
                bpffs: args.bpffs,
                default_policy: args.default_policy,
                namespaces: args.namespaces,
                cluster_domain: args.cluster_domain,
                steer_host_netns: args.steer_host_netns,
                metrics_addr: args.metrics_addr,
                node_name: args.node_name.filter(|n| !n.is_empty()),
                metrics_grace: args.metrics_grace,
                streaming_lists: args.streaming_lists,
                map_sizes: MapSizes {
                    max_endpoints: args.max_endpoints,
                    max_services: args.max_services,
                    max_sockets: args.max_sockets,
                },
            };
            one_malloc_arena();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?
                .block_on(agent::run(cfg))
        }
        Command::Status { json, bpffs } => {
            let status = status::read(&bpffs)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status::render_table(&status));
            }
            Ok(())
        }
        Command::Top { interval, bpffs } => top::run(&bpffs, interval),
        Command::Reset { bpffs } => {
            let removed = datapath::reset(&bpffs)?;
            if removed.is_empty() {
                println!("nothing pinned under {}", bpffs.join("headway").display());
            }
            for path in removed {
                println!("removed {}", path.display());
            }
            Ok(())
        }
    }
}
