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
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{Datapath, DatapathError},
    http::{self, HttpState},
    kernel_log,
    log_once::SyncLogs,
    map_plan::PlanSettings,
    map_writer::Written,
    metrics::{AgentMetrics, MapLabels, ResourceLabels},
    model::{self, DesiredState, Policy},
    netns,
    pinned::MapSizes,
    reconcile::Reconciler,
    source::{
        dir::{self, DirWatcher},
        kube::{self, KubeOptions, KubeSource},
        store::{Affected, ClusterStore},
    },
};

/// Quiet time after a manifest change before the directory is read.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Where the agent learns about services and endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// Plain manifests in a directory, followed for changes.
    Dir(PathBuf),
    /// The Kubernetes API (watch).
    Kube,
}

impl std::str::FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(SourceSpec::Dir(PathBuf::from(path))),
            _ if s == "kube" => Ok(SourceSpec::Kube),
            _ => Err(format!(
                "unknown source {s:?}: expected `kube` or `dir:PATH`"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub source: SourceSpec,
    /// For the kube source: this kubeconfig instead of kube's inference.
    pub kubeconfig: Option<PathBuf>,
    /// This agent's node (for `prefer-node`; its Node object's zone label
    /// serves `prefer-zone`).
    pub node_name: Option<String>,
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
    /// How long `/metrics` keeps the series of deleted pods and services.
    pub metrics_grace: std::time::Duration,
    /// Sizes of the maps that grow with the cluster.
    pub map_sizes: MapSizes,
    /// The kube source starts its watches with streaming lists.
    pub streaming_lists: bool,
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

    // A bad kubeconfig is a configuration error: fail before attaching.
    // The watchers start listing now, in their own tasks, while the
    // programs load (at scale both take a while); nothing is written
    // before both are done.
    let source = match &cfg.source {
        SourceSpec::Kube => {
            let client = kube::client(cfg.kubeconfig.as_deref()).await?;
            let options = KubeOptions {
                namespaces: cfg.namespaces.clone(),
                node_name: cfg.node_name.clone(),
                streaming_lists: cfg.streaming_lists,
            };
            Some(KubeSource::start(client, &options))
        }
        SourceSpec::Dir(_) => None,
    };
    let mut datapath = Datapath::open(&cfg.bpffs, &cfg.map_sizes)?;
    // The kernel's rare events (fail-open, no socket storage) in our log.
    // Without it the datapath works the same, only quieter.
    match datapath.take_logger() {
        Ok(logger) => {
            if let Err(e) = kernel_log::forward(logger) {
                warn!(error = %e, "cannot follow the kernel programs' log");
            }
        }
        Err(e) => warn!(error = %e, "cannot follow the kernel programs' log"),
    }
    let maps = datapath.take_maps()?;
    // The verifier takes a while over the programs: they load and attach
    // on their own thread while the source lists (and the writer reads
    // what the maps hold). Nothing is written to the maps before they are
    // attached, as before: whoever sees the maps synced finds the
    // programs attached.
    let attaching = {
        let bpffs = cfg.bpffs.clone();
        let cgroup_path = cfg.cgroup_path.clone();
        tokio::task::spawn_blocking(move || {
            datapath.attach(&bpffs, &cgroup_path).map(|()| datapath)
        })
    };
    let settings = PlanSettings {
        default_policy: cfg.default_policy,
        cluster_domain: cfg.cluster_domain.clone(),
        node_name: cfg.node_name.clone(),
        // The kube source watches the Node, the dir source reads it.
        zone: None,
    };
    let reconciler = Reconciler::new(maps, settings, cfg.namespaces.clone())
        .context("cannot read the pinned maps")?;
    let mut syncer = Syncer::new(reconciler, http_state.clone());
    let host_netns_cookie =
        netns::current_netns_cookie().context("cannot read this network namespace's cookie")?;
    syncer
        .reconciler
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

    let stop = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    let attaching = Attaching {
        task: Some(attaching),
        datapath: None,
        cgroup_path: cfg.cgroup_path.clone(),
    };
    match (&cfg.source, source) {
        (SourceSpec::Dir(dir), _) => run_dir(dir, &mut syncer, attaching, &cfg, stop).await?,
        (SourceSpec::Kube, Some(source)) => {
            run_kube(source, &mut syncer, attaching, &cfg, stop).await?
        }
        (SourceSpec::Kube, None) => unreachable!("the kube source is started above"),
    }
    info!("stopping; programs stay attached and maps stay pinned");
    Ok(())
}

/// The programs loading and attaching on their own thread, then the
/// attached datapath (kept until the agent stops).
struct Attaching {
    task: Option<tokio::task::JoinHandle<Result<Datapath, DatapathError>>>,
    datapath: Option<Datapath>,
    cgroup_path: PathBuf,
}

impl Attaching {
    fn done(&self) -> bool {
        self.task.is_none()
    }

    /// Waits for the programs to be attached (at once if they are); an
    /// error ends the agent. Cancel-safe: the task stays until it ends.
    async fn wait(&mut self) -> anyhow::Result<()> {
        let Some(task) = &mut self.task else {
            return Ok(());
        };
        let result = task.await;
        self.task = None;
        let datapath = result
            .context("the thread attaching the programs failed")?
            .context("cannot load and attach the programs")?;
        for (program, how) in &datapath.attachments {
            info!(program, attachment = ?how, cgroup = %self.cgroup_path.display(), "program attached");
        }
        for pin in &datapath.replaced {
            info!(pin = %pin.display(), "replaced a pinned map whose layout changed (written anew)");
        }
        if let Some(carried) = &datapath.carried {
            if carried.resumed_live {
                warn!(
                    slots = carried.slots,
                    "finished carrying pod counts over to the new pod_stats after an interrupted \
                     upgrade: what the old programs counted while it was interrupted is lost"
                );
            } else {
                info!(
                    slots = carried.slots,
                    counted_during_swap = carried.counted_during_swap,
                    "carried every pod's counts over to the new layout of pod_stats"
                );
            }
        }
        match datapath.older_sockets_left {
            Some(0) => info!("the socket table an older headway kept is empty: its pins go"),
            Some(left) => info!(
                records = left,
                "sockets with records in the socket table an older headway kept: each record \
                 moves to sock_table when its socket is next seen; those pins stay until empty"
            ),
            None => {}
        }
        for pin in &datapath.retired {
            info!(pin = %pin.display(), "removed a pin an older headway left");
        }
        self.datapath = Some(datapath);
        Ok(())
    }
}

async fn run_dir(
    dir: &Path,
    syncer: &mut Syncer,
    mut attaching: Attaching,
    cfg: &AgentConfig,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Watch before the first read, so no change between the two is missed.
    let (_watcher, mut changes) =
        DirWatcher::new(dir).with_context(|| format!("cannot watch {}", dir.display()))?;
    attaching.wait().await?;
    syncer.sync_dir(dir);
    syncer.http.mark_synced();
    info!(source = %dir.display(), metrics = %cfg.metrics_addr, "agent running");
    tokio::pin!(stop);
    loop {
        tokio::select! {
            Some(()) = changes.recv() => {
                // Let a burst of writes (truncate, write, close) settle, so
                // a file is not read half-written.
                tokio::time::sleep(SETTLE).await;
                while changes.try_recv().is_ok() {}
                syncer.sync_dir(dir);
            }
            _ = &mut stop => return Ok(()),
        }
    }
}

/// Follows the API: nothing is written until every watcher has listed
/// (this node's zone included; a restarted agent keeps the previous maps
/// meanwhile, so the datapath never sees a partial or empty state); then
/// one full sync writes what differs, and every later batch of events
/// updates only the services it affects.
async fn run_kube(
    mut source: KubeSource,
    syncer: &mut Syncer,
    mut attaching: Attaching,
    cfg: &AgentConfig,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut synced = false;
    tokio::pin!(stop);
    loop {
        let batch = tokio::select! {
            batch = source.next_batch() => batch,
            // Reported as soon as it is done (an error ends the agent).
            attached = attaching.wait(), if !attaching.done() => {
                attached?;
                continue;
            }
            _ = &mut stop => return Ok(()),
        };
        let metrics = &syncer.http.metrics;
        // Each error restarts the watch (after kube's backoff).
        for (resource, _) in &batch.errors {
            metrics.watch_restarted(resource.as_str());
        }
        for resource in &batch.relists {
            let labels = ResourceLabels {
                resource: resource.as_str().to_string(),
            };
            metrics.relists.get_or_create(&labels).inc();
        }
        for w in source.store_mut().take_warnings() {
            warn!(object = %w.object, "{}", w.message);
        }
        let mut affected = batch.affected;
        if let Some(zone) = batch.zone {
            // Every prefer-zone service's preferred tables follow the zone.
            syncer.reconciler.settings_mut().zone = zone;
            affected.extend(source.store().prefer_zone_services());
        }
        if synced {
            syncer.update_services(&affected, source.store());
        } else if source.ready() {
            attaching.wait().await?;
            let store = source.store();
            syncer.full_sync_with(&store.service_keys(), |key| {
                let (spec, warnings) = store.service_spec(key);
                for w in &warnings {
                    warn!(object = %w.object, "{}", w.message);
                }
                spec
            });
            syncer.http.mark_synced();
            synced = true;
            info!(services = store.service_count(), metrics = %cfg.metrics_addr, "stores synced; agent running");
        }
    }
}

/// Turns source changes into map writes, with logs and metrics.
struct Syncer {
    reconciler: Reconciler,
    /// What each manifest file last parsed to without error, so a file
    /// broken by an edit keeps contributing its previous objects.
    last_good: dir::FileObjects,
    http: Arc<HttpState>,
    /// Problems of the dir source already reported, so each is logged
    /// once per change.
    logs: SyncLogs,
}

impl Syncer {
    fn new(reconciler: Reconciler, http: Arc<HttpState>) -> Syncer {
        Syncer {
            reconciler,
            last_good: Default::default(),
            http,
            logs: SyncLogs::default(),
        }
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
        // The dir source's zone comes from the Node manifests; a change
        // reaches every service through the full sync below.
        let settings = self.reconciler.settings_mut();
        settings.zone = settings
            .node_name
            .as_deref()
            .and_then(|node| model::node_zone(&objects.nodes, node));
        let (desired, warnings) =
            model::desired_state(&objects.services, &objects.slices, &objects.pods);
        self.logs.model_warnings(&warnings);
        self.full_sync(&desired);
    }

    /// Writes the whole desired state (only what differs reaches the maps).
    fn full_sync(&mut self, desired: &DesiredState) {
        let keys = desired.services.keys().cloned().collect();
        self.full_sync_with(&keys, |k| desired.services.get(k).cloned());
    }

    /// Writes the services `keys`, each spec computed by `spec_of` when
    /// its turn comes.
    fn full_sync_with(
        &mut self,
        keys: &std::collections::BTreeSet<model::ServiceKey>,
        spec_of: impl FnMut(&model::ServiceKey) -> Option<model::ServiceSpec> + Send,
    ) {
        let started = Instant::now();
        let written = self.reconciler.full_sync_with(keys, spec_of);
        self.record(started, &written);
        let s = written.summary;
        info!(
            services = self.reconciler.services(),
            upserted = s.upserted,
            removed = s.removed,
            failed = s.failed,
            "maps synced"
        );
    }

    /// Recomputes and writes only `services`.
    fn update_services(&mut self, services: &Affected, store: &ClusterStore) {
        if services.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut written = Written::default();
        for key in services {
            let (spec, warnings) = store.service_spec(key);
            for w in &warnings {
                warn!(object = %w.object, "{}", w.message);
            }
            let w = self.reconciler.update_service(key, spec.as_ref());
            written.summary += w.summary;
            written.errors.extend(w.errors);
        }
        self.record(started, &written);
        let s = written.summary;
        debug!(
            services = services.len(),
            upserted = s.upserted,
            removed = s.removed,
            failed = s.failed,
            "services updated"
        );
    }

    fn record(&mut self, started: Instant, written: &Written) {
        let metrics = &self.http.metrics;
        for e in written.errors.iter().filter(|e| e.is_full()) {
            metrics
                .map_full
                .get_or_create(&MapLabels { map: e.map })
                .inc();
        }
        // Once per object, map and kind of failure, and again only when
        // that changes: a full map must not flood the log.
        self.logs.write_errors(&written.errors);
        metrics.map_write_errors.inc_by(written.errors.len() as u64);
        metrics.syncs.inc();
        metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
    }
}
