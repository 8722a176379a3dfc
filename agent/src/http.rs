//! The agent's HTTP endpoints on `--metrics-addr`: `/metrics`
//! (Prometheus text), `/healthz` (the process answers and every hook is
//! attached) and `/readyz` (healthy, and the maps hold a synced state).
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use headway_common::program_names;

use crate::{metrics::AgentMetrics, pinned};

pub struct HttpState {
    pub bpffs: PathBuf,
    pub metrics: AgentMetrics,
    /// Set once the first sync has written the maps.
    pub synced: AtomicBool,
}

impl HttpState {
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }
}

/// Serves until the listener fails; bind errors are returned at once.
pub async fn serve(
    addr: SocketAddr,
    state: Arc<HttpState>,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    Ok(async move { axum::serve(listener, app).await })
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    let rendered =
        tokio::task::spawn_blocking(move || crate::metrics::render(&state.bpffs, &state.metrics))
            .await;
    match rendered {
        Ok(Ok(body)) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Every hook's link is pinned and attached to a cgroup: two syscalls per
/// hook, no map reads.
fn hooks_attached(state: &HttpState) -> Result<(), String> {
    for name in program_names::ALL {
        pinned::link_attachment(&state.bpffs, name).map_err(|e| {
            let path = pinned::link_pin(&state.bpffs, name);
            format!("{name} is not attached ({}): {e}", path.display())
        })?;
    }
    Ok(())
}

async fn healthz(State(state): State<Arc<HttpState>>) -> Response {
    match hooks_attached(&state) {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e + "\n").into_response(),
    }
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Response {
    if !state.synced.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "maps not synced yet\n").into_response();
    }
    healthz(State(state)).await
}
