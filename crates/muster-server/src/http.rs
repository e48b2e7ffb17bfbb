//! The HTTP endpoint: `/health`, `/healthz`, `/readyz`, `/metrics`, the REST API
//! ([`crate::rest`]), the action API ([`crate::actions`]) and the web console
//! ([`crate::ui`]). Request bodies are limited to 1 MiB; every request is counted
//! and timed by route.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::node::NodeCore;
use crate::status::NodeStatus;
use crate::tls::HttpsListener;

/// Largest HTTP request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Serves HTTP on `listener` until the node shuts down.
pub async fn serve(core: Arc<NodeCore>, listener: TcpListener) {
    let app = router(core.clone());
    let shutdown = core.shutdown.clone().cancelled_owned();
    let result = match core.tls.clone() {
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
        Some(tls) => match HttpsListener::new(listener, tls) {
            Ok(listener) => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// The HTTP routes. Each API family is merged in with one line.
pub fn router(core: Arc<NodeCore>) -> Router {
    let metrics = core.metrics.clone();
    Router::new()
        .route("/health", get(health))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .merge(crate::rest::routes())
        .merge(crate::actions::routes())
        .merge(crate::consul::routes())
        .merge(crate::ui::routes())
        .fallback(unknown_path)
        .method_not_allowed_fallback(method_not_allowed)
        // Streamed bodies are cut at the limit (extractors then answer 413) ...
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        // ... and declared ones are refused before they are read, with a JSON error.
        .layer(axum::middleware::from_fn(refuse_oversized_bodies))
        .layer(axum::middleware::from_fn_with_state(
            metrics,
            crate::request_metrics::track_http,
        ))
        .with_state(core)
}

/// Answers 413 with the REST error shape when `Content-Length` exceeds
/// [`MAX_BODY_BYTES`].
async fn refuse_oversized_bodies(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return crate::rest::extract::RestError::body_too_large().into_response();
    }
    next.run(request).await
}

/// 404 in the REST error shape for a path no endpoint serves.
async fn unknown_path(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    crate::rest::extract::RestError::not_found("path", format!("no endpoint serves {method} {}", uri.path()))
        .into_response()
}

/// 405 in the REST error shape for a known path asked with the wrong method.
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    crate::rest::extract::RestError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        field: Some("method".into()),
        message: format!("{} does not accept {method}", uri.path()),
        retry_after_ms: None,
    }
    .into_response()
}

/// `/health`: where this node stands (always 200 while the process serves).
async fn health(State(core): State<Arc<NodeCore>>) -> Json<NodeStatus> {
    Json(core.status())
}

/// The `/readyz` answer.
#[derive(Serialize)]
struct Readiness {
    ready: bool,
    /// Why not, when not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    node: u64,
    leader: Option<u64>,
    lag: u64,
    ms_since_leader_contact: u64,
}

/// `/readyz`: 200 when the node knows a leader, has heard from it recently and has
/// caught up; 503 with the reason otherwise.
async fn readyz(State(core): State<Arc<NodeCore>>) -> impl IntoResponse {
    let status = core.status();
    let reason = status.not_ready_reason(core.contact_grace());
    let code = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        ready: reason.is_none(),
        reason,
        node: status.node,
        leader: status.leader,
        lag: status.lag,
        ms_since_leader_contact: status.ms_since_leader_contact,
    };
    (code, Json(body))
}

/// `/metrics`: OpenMetrics when the scraper asks for it (Prometheus does), the
/// classic text format otherwise (curl, promtool).
async fn metrics_handler(State(core): State<Arc<NodeCore>>, headers: HeaderMap) -> impl IntoResponse {
    crate::metrics::refresh_gauges(&core);
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            core.metrics.render(),
        )
    } else {
        (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            core.metrics.render_text(),
        )
    }
}
