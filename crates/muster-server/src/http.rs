//! The HTTP endpoint: `/health`, `/healthz`, `/readyz` and `/metrics`. Request bodies
//! are limited to 1 MiB.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::node::NodeCore;

/// Largest HTTP request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Serves HTTP on `listener` until the node shuts down.
pub async fn serve(core: Arc<NodeCore>, listener: TcpListener) {
    let app = router(core.clone());
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(core.shutdown.clone().cancelled_owned())
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// The HTTP routes.
pub fn router(core: Arc<NodeCore>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .with_state(core)
}

/// The `/health` answer.
#[derive(Serialize)]
pub struct Health {
    /// This node.
    pub node: u64,
    /// leader, follower, candidate, learner or shutdown.
    pub role: &'static str,
    /// The leader, if known.
    pub leader: Option<u64>,
    /// Raft term.
    pub term: u64,
    /// Applied revision.
    pub revision: u64,
    /// Applied log index.
    pub applied_index: u64,
    /// Last log index.
    pub last_log_index: u64,
    /// Milliseconds since the leader was last heard from.
    pub ms_since_leader_contact: u64,
}

fn health_of(core: &NodeCore) -> Health {
    let m = core.raft.metrics().borrow().clone();
    let view = core.view();
    Health {
        node: core.id,
        role: match m.state {
            openraft::ServerState::Leader => "leader",
            openraft::ServerState::Follower => "follower",
            openraft::ServerState::Candidate => "candidate",
            openraft::ServerState::Learner => "learner",
            openraft::ServerState::Shutdown => "shutdown",
        },
        leader: m.current_leader,
        term: m.current_term,
        revision: view.revision,
        applied_index: m.last_applied.map_or(0, |l| l.index),
        last_log_index: m.last_log_index.unwrap_or(0),
        ms_since_leader_contact: view.ms_since_leader_contact,
    }
}

async fn health(State(core): State<Arc<NodeCore>>) -> Json<Health> {
    Json(health_of(&core))
}

async fn readyz(State(core): State<Arc<NodeCore>>) -> impl IntoResponse {
    let h = health_of(&core);
    let caught_up = h.last_log_index.saturating_sub(h.applied_index) < 1000;
    if h.leader.is_some() && caught_up && h.ms_since_leader_contact < 5_000 {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: no leader or not caught up")
    }
}

async fn metrics(State(core): State<Arc<NodeCore>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        core.metrics.render(),
    )
}
