//! `muster gateway`: an HTTP proxy for services that cannot embed the client.
//!
//! A request to `/{service}/{path...}` goes to an instance of `service` picked by
//! the client library's [`Resolver`](muster_client::Resolver) (one per service,
//! created by its first request and kept current by a watch), at
//! `http://{instance}/{path...}` with the query string kept. A request carrying
//! the header `muster-service: {service}` ([`SERVICE_HEADER`]) goes to that service
//! with its whole path, which is how gRPC clients reach a service.
//!
//! - the gateway speaks HTTP/1.1 and HTTP/2 without TLS (h2c, as gRPC clients do
//!   with a plain `http://` target), or HTTPS with HTTP/2 by ALPN when
//!   [`GatewayConfig::listener_tls`] is set; a gRPC call that came over HTTP/2 goes on to
//!   the instance over HTTP/2, so it passes through (streaming too, with its
//!   trailers and `TE: trailers`), and every other request goes on over HTTP/1.1,
//!   which every instance speaks; a gRPC call the gateway cannot serve is
//!   answered with a gRPC status (`UNAVAILABLE`, `INVALID_ARGUMENT`,
//!   `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `NOT_FOUND`) whose message names
//!   the service and the reason;
//! - any method; request and response bodies are streamed; headers are kept
//!   except the hop-by-hop ones, and `X-Forwarded-For` (appended to),
//!   `X-Forwarded-Host` and `X-Forwarded-Proto` are added;
//! - request bodies larger than [`GatewayConfig::max_body_bytes`] get 413;
//! - an HTTP/1.1 request asking for an upgrade (`Connection: upgrade`, e.g.
//!   WebSocket) is sent with its `Upgrade` header; when the instance answers 101,
//!   the client gets that answer and the two connections are relayed byte for byte
//!   until both sides finish, the second within 10 s of the first (at most [`GatewayConfig::max_tunnels`] at once, beyond
//!   which an upgrade request gets 503);
//! - when the connection to the instance fails before any answer, a request that
//!   may be repeated (an idempotent method, or any method when the connection
//!   could not even be opened) whose body is small enough to be held in memory
//!   ([`REPLAYABLE_BODY_BYTES`]) is sent once more to another instance;
//! - connection failures, timeouts and 502/503/504 answers count against the
//!   instance's circuit breaker, other answers close it;
//! - the gateway answers itself, with a JSON body `{"error", "service",
//!   "reason"}`, 400 for a path that names no valid service, 503 when no instance
//!   can be picked, 502 when the instance failed and no retry was possible, and
//!   504 when it did not answer within [`GatewayConfig::upstream_timeout`].
//!
//! The path prefix `/gateway/` is the gateway's own (a service named `gateway`
//! cannot be proxied): `/gateway/status` (nodes, and each followed service's
//! cache and breakers, as JSON), `/gateway/metrics` (Prometheus) and
//! `/gateway/healthz`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod config;
mod error;
mod headers;
mod metrics;
mod proxy;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

pub use config::{ConfigError, GatewayConfig, ListenerTls, REPLAYABLE_BODY_BYTES};
pub use error::{ProxyError, ServeError};
pub use proxy::{RESERVED_PREFIX, SERVICE_HEADER};

use proxy::Gateway;

/// Serves the gateway on `listener` until `shutdown` completes, then stops
/// accepting connections and returns once the requests in flight are answered.
///
/// The configuration is validated first; nothing is dialled until the first
/// request for a service.
pub async fn serve(
    listener: TcpListener,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let acceptor = config.listener_tls.as_ref().map(listener_acceptor).transpose()?;
    let gateway = Arc::new(Gateway::new(config).await?);
    tracing::info!(
        addr = %listener.local_addr()?,
        nodes = ?gateway.registry.nodes(),
        tls = acceptor.is_some(),
        "gateway listening"
    );
    let app = router(gateway).into_make_service_with_connect_info::<SocketAddr>();
    match acceptor {
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await?,
        Some(acceptor) => {
            use axum::serve::ListenerExt;
            // `tap_io` gives the listener axum's client address (`ConnectInfo`).
            let listener =
                muster_server::tls::HttpsListener::with_acceptor(listener, move || acceptor.clone())?.tap_io(|_| {});
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await?
        }
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// The TLS acceptor of the gateway's listener: HTTP/2 (for gRPC) and HTTP/1.1 by
/// ALPN. Fails naming the file that cannot be used.
pub fn listener_acceptor(tls: &ListenerTls) -> Result<tokio_rustls::TlsAcceptor, muster_server::tls::TlsError> {
    muster_server::tls::server_acceptor(&tls.cert, &tls.key, &[b"h2", b"http/1.1"])
}

fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/gateway/status", get(status))
        .route("/gateway/metrics", get(metrics))
        .route("/gateway/healthz", get(healthz))
        .fallback(proxy::proxy)
        .with_state(gateway)
}

/// `/gateway/status`: the nodes, the one in use, and every followed service's
/// cache (revision, staleness, source) with its instances and their breakers.
async fn status(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    let mut services: Vec<_> = gateway.resolvers().iter().map(|r| r.status()).collect();
    services.sort_by(|a, b| a.service.cmp(&b.service));
    let config = &gateway.config;
    Json(json!({
        "nodes": gateway.registry.nodes(),
        "current_node": gateway.registry.current_node(),
        "namespace": if config.namespace.is_empty() { "default" } else { config.namespace.as_str() },
        "strategy": config.strategy,
        "prefer_zone": config.prefer_zone,
        "breaker": {
            "failure_threshold": config.breaker.failure_threshold,
            "cool_down_ms": u64::try_from(config.breaker.cool_down.as_millis()).unwrap_or(u64::MAX),
        },
        "services": services,
    }))
}

/// `/gateway/metrics`: Prometheus text format 0.0.4.
async fn metrics(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        gateway.metrics.render_text(),
    )
}

/// `/gateway/healthz`: 200 while the process serves.
async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}
