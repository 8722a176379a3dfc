//! The node agent's run loop: start the datapath, then keep the maps equal
//! to what the source says, until SIGTERM/SIGINT. Stopping leaves the
//! datapath pinned and working.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::Instant,
};

use anyhow::Context;
use headway_common::{Config, config_flags};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use crate::{
    datapath::Datapath,
    http::{self, HttpState},
    log_once::SyncLogs,
    map_plan::{self, Ids, PlanSettings},
    map_writer::MapWriter,
    metrics::AgentMetrics,
    model::{self, Policy},
    netns,
    source::{
        Objects,
        dir::{self, DirWatcher},
    },
};

/// Quiet time after a manifest change before the directory is read.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Where the agent learns about services and endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// Plain manifests in a directory, followed for changes.
    Dir(PathBuf),
}

impl std::str::FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(SourceSpec::Dir(PathBuf::from(path))),
            _ if s == "kube" => {
                Err("the `kube` source is not available in this build yet; use `dir:PATH`".into())
            }
            _ => Err(format!(
                "unknown source {s:?}: expected `kube` or `dir:PATH`"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub source: SourceSpec,
    pub cgroup_path: PathBuf,
    pub bpffs: PathBuf,
    pub default_policy: Policy,
    /// Only services in these namespaces (all when empty).
    pub namespaces: Vec<String>,
    pub cluster_domain: String,
    /// Steer sockets of the host network namespace too.
    pub steer_host_netns: bool,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// This agent's node (for `prefer-node`; its Node object's zone label
    /// serves `prefer-zone`).
    pub node_name: Option<String>,
    /// How long `/metrics` keeps the series of deleted pods and services.
    pub metrics_grace: std::time::Duration,
}

/// Runs until a termination signal arrives.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;

    let http_state = Arc::new(HttpState {
        bpffs: cfg.bpffs.clone(),
        metrics: AgentMetrics::new(cfg.metrics_grace),
        synced: AtomicBool::new(false),
    });
    // Bind first: a taken port is a configuration error worth failing on.
    let server = http::serve(cfg.metrics_addr, http_state.clone())
        .await
        .with_context(|| format!("cannot serve metrics on {}", cfg.metrics_addr))?;
    tokio::spawn(async move {
        if let Err(e) = server.await {
            error!(error = %e, "metrics server stopped");
        }
    });

    let mut datapath = Datapath::start(&cfg.bpffs, &cfg.cgroup_path)?;
    for (program, how) in &datapath.attachments {
        info!(program, attachment = ?how, cgroup = %cfg.cgroup_path.display(), "program attached");
    }
    let mut syncer = Syncer::new(datapath.take_maps()?, &cfg, http_state.clone())?;
    let host_netns_cookie =
        netns::current_netns_cookie().context("cannot read this network namespace's cookie")?;
    syncer
        .writer
        .write_config(Config {
            host_netns_cookie,
            flags: if cfg.steer_host_netns {
                config_flags::STEER_HOST_NETNS
            } else {
                0
            },
            _pad: 0,
        })
        .context("cannot write the datapath settings")?;

    let SourceSpec::Dir(dir) = &cfg.source;
    // Watch before the first read, so no change between the two is missed.
    let (_watcher, mut changes) =
        DirWatcher::new(dir).with_context(|| format!("cannot watch {}", dir.display()))?;
    syncer.sync_dir(dir);
    http_state.mark_synced();
    info!(source = %dir.display(), metrics = %cfg.metrics_addr, "agent running");

    loop {
        tokio::select! {
            Some(()) = changes.recv() => {
                // Let a burst of writes (truncate, write, close) settle, so
                // a file is not read half-written.
                tokio::time::sleep(SETTLE).await;
                while changes.try_recv().is_ok() {}
                syncer.sync_dir(dir);
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    info!("stopping; programs stay attached and maps stay pinned");
    Ok(())
}

/// Turns source snapshots into map writes.
struct Syncer {
    writer: MapWriter,
    ids: Ids,
    settings: PlanSettings,
    namespaces: Vec<String>,
    /// What each manifest file last parsed to without error, so a file
    /// broken by an edit keeps contributing its previous objects.
    last_good: dir::FileObjects,
    http: Arc<HttpState>,
    /// Problems already reported, so each is logged once per change.
    logs: SyncLogs,
}

impl Syncer {
    fn new(
        maps: crate::pinned::Maps,
        cfg: &AgentConfig,
        http: Arc<HttpState>,
    ) -> anyhow::Result<Syncer> {
        let writer = MapWriter::new(maps).context("cannot read the pinned maps")?;
        let ids = Ids::from_contents(writer.current());
        Ok(Syncer {
            writer,
            ids,
            settings: PlanSettings {
                default_policy: cfg.default_policy,
                cluster_domain: cfg.cluster_domain.clone(),
                node_name: cfg.node_name.clone(),
                zone: None,
            },
            namespaces: cfg.namespaces.clone(),
            last_good: Default::default(),
            http,
            logs: SyncLogs::default(),
        })
    }

    fn sync_dir(&mut self, dir: &Path) {
        let snapshot = match dir::load_dir(dir) {
            Ok(s) => s,
            Err(e) => {
                // Keep the maps as they are: losing the directory must not
                // wipe the datapath.
                error!(source = %dir.display(), error = %e, "cannot read manifests; keeping the last state");
                return;
            }
        };
        let metrics = &self.http.metrics;
        metrics.manifest_errors.inc_by(snapshot.errors.len() as u64);
        self.logs.manifest_errors(&snapshot.errors);
        let objects = self.last_good.merge(snapshot);
        self.sync(&objects);
    }

    fn sync(&mut self, objects: &Objects) {
        let started = Instant::now();
        self.settings.zone = self
            .settings
            .node_name
            .as_deref()
            .and_then(|node| model::node_zone(&objects.nodes, node));
        let (mut desired, warnings) =
            model::desired_state(&objects.services, &objects.slices, &objects.pods);
        self.logs.model_warnings(&warnings);
        if !self.namespaces.is_empty() {
            desired
                .services
                .retain(|key, _| self.namespaces.contains(&key.namespace));
        }
        let wanted = map_plan::plan(&desired, &self.settings, &mut self.ids);
        let (summary, errors) = self.writer.apply(&wanted);
        self.logs.write_errors(&errors);
        let metrics = &self.http.metrics;
        metrics.map_write_errors.inc_by(errors.len() as u64);
        metrics.syncs.inc();
        metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        info!(
            services = wanted.services.len(),
            pods = wanted.pods.len(),
            names = wanted.dns_names.len(),
            upserted = summary.upserted,
            removed = summary.removed,
            failed = summary.failed,
            "maps synced"
        );
    }
}
