//! Forwarding one request: name the service from the path (or the
//! [`SERVICE_HEADER`]), pick an instance from
//! that service's resolver, send the request over the pooled HTTP client, and
//! send it once more to another instance when the connection failed before any
//! answer and the request may be repeated. A request asking for an upgrade
//! (WebSocket) that the instance accepts with 101 becomes a tunnel: both
//! connections are handed over and their bytes copied both ways until both sides
//! have finished.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, TE, UPGRADE};
use http::{Method, StatusCode, Uri, Version};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Body as _;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use muster_client::{Client, ClientError, ClientOptions, Picked, Resolver, ResolverOptions};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};

use crate::config::{GatewayConfig, REPLAYABLE_BODY_BYTES};
use crate::error::{ProxyError, ServeError};
use crate::headers::{ask_upgrade, remove_hop_by_hop, requested_upgrade, upstream_request_headers};
use crate::metrics::Metrics;

/// The path prefix of the gateway's own endpoints; no service of this name can
/// be proxied.
pub const RESERVED_PREFIX: &str = "gateway";

/// A request carrying this header goes to the service it names with its path
/// unchanged, the way gRPC clients (whose paths are `/{package.Service}/{Method}`)
/// reach a service through the gateway.
pub const SERVICE_HEADER: &str = "muster-service";

/// The `service` label of requests that named no valid, followed service.
const NO_SERVICE_LABEL: &str = "(none)";

type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Body>;

/// One resolver per service, created by the service's first request. The cell
/// lets concurrent first requests share one creation (which may wait for the
/// registry's first answer) without holding up requests for other services.
type Resolvers = RwLock<BTreeMap<String, Arc<OnceCell<Resolver>>>>;

/// The gateway's shared state.
pub(crate) struct Gateway {
    pub(crate) config: GatewayConfig,
    pub(crate) registry: Client,
    /// For everything but gRPC calls over HTTP/2.
    http1: HttpClient,
    /// For gRPC calls that came over HTTP/2: HTTP/2 without TLS (h2c), one
    /// multiplexed connection per instance.
    http2: HttpClient,
    resolvers: Resolvers,
    /// One permit per upgraded connection relayed ([`GatewayConfig::max_tunnels`]).
    tunnels: Arc<Semaphore>,
    pub(crate) metrics: Metrics,
}

/// A client's request for an upgrade, until the instance answers it.
struct UpgradeAsked {
    /// The protocol asked for (the `Upgrade` header).
    protocol: HeaderValue,
    /// The client's connection, handed over once the 101 answer is sent.
    client: OnUpgrade,
    /// The tunnel's place among [`GatewayConfig::max_tunnels`].
    slot: OwnedSemaphorePermit,
}

/// The request body as it will be sent: held in memory (so it can be sent
/// again) or streamed from the client (once).
enum Outgoing {
    Buffered(Bytes),
    Streamed(Option<Body>),
}

impl Outgoing {
    fn replayable(&self) -> bool {
        matches!(self, Outgoing::Buffered(_))
    }

    fn take(&mut self) -> Body {
        match self {
            Outgoing::Buffered(bytes) => Body::from(bytes.clone()),
            Outgoing::Streamed(body) => body.take().unwrap_or_else(Body::empty),
        }
    }
}

/// Requests that may be repeated without changing their effect (RFC 9110 §9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The service a request names and the path to send the instance: the
/// [`SERVICE_HEADER`] and the whole path when the request carries it, else
/// [`split_path`].
fn target<'a>(headers: &'a HeaderMap, path: &'a str) -> (&'a str, &'a str) {
    match headers.get(SERVICE_HEADER) {
        // Not text: no valid service, refused as such.
        Some(named) => (named.to_str().unwrap_or("\u{fffd}"), path),
        None => split_path(path),
    }
}

/// Whether a request is a gRPC call, which is answered in gRPC's own terms and
/// goes on over HTTP/2.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Whether a request goes on to the instance over HTTP/2: a gRPC call that came
/// over HTTP/2 (gRPC needs it). Every other request goes over HTTP/1.1, which
/// every HTTP server speaks, whichever version the client used.
fn upstream_over_http2(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_2 && is_grpc(headers)
}

/// Whether the request's `TE` header accepts trailers (gRPC's status travels in
/// them; RFC 9113 §8.2.2 keeps `TE: trailers` on HTTP/2).
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|option| option.trim().eq_ignore_ascii_case("trailers"))
}

/// `/web/a/b` → (`web`, `/a/b`); `/web` and `/web/` → (`web`, `/`).
fn split_path(path: &str) -> (&str, &str) {
    let rest = path.strip_prefix('/').unwrap_or(path);
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Whether the request body hit the size limit somewhere under `error`.
fn is_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<LengthLimitError>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether the request failed on our side (the client's body broke off, or the
/// request could not be written), which says nothing about the instance.
fn is_request_side(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_user) {
            return true;
        }
        next = e.source();
    }
    false
}

/// The error and its causes on one line.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

fn lock_read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // The map is only ever inserted into; a panic elsewhere leaves it consistent.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn lock_write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

impl Gateway {
    /// Validates the configuration and builds the registry and HTTP clients
    /// (nothing is dialled yet).
    pub(crate) async fn new(config: GatewayConfig) -> Result<Gateway, ServeError> {
        config.validate()?;
        let options = ClientOptions {
            resolver: ResolverOptions {
                namespace: config.namespace.clone(),
                strategy: config.strategy,
                prefer_zone: config.prefer_zone.clone(),
                breaker: config.breaker.clone(),
                ..ResolverOptions::default()
            },
            fallback: config.fallback.clone(),
            tls: config.registry_tls.clone(),
            ..ClientOptions::default()
        };
        let registry = Client::connect_with(config.nodes.clone(), options).await?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let http1 = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector.clone());
        let http2 = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        let tunnels = Arc::new(Semaphore::new(config.max_tunnels.min(Semaphore::MAX_PERMITS)));
        Ok(Gateway {
            config,
            registry,
            http1,
            http2,
            resolvers: RwLock::default(),
            tunnels,
            metrics: Metrics::new(),
        })
    }

    /// The resolver of `service`, created (and its watch started) on first use.
    async fn resolver(&self, service: &str) -> Result<Resolver, ProxyError> {
        let existing = lock_read(&self.resolvers).get(service).cloned();
        let cell = match existing {
            Some(cell) => cell,
            None => {
                let mut resolvers = lock_write(&self.resolvers);
                if resolvers.len() >= self.config.max_services && !resolvers.contains_key(service) {
                    return Err(ProxyError::TooManyServices {
                        service: service.to_string(),
                        max: self.config.max_services,
                    });
                }
                let cell = resolvers.entry(service.to_string()).or_default().clone();
                self.metrics
                    .services
                    .set(i64::try_from(resolvers.len()).unwrap_or(i64::MAX));
                cell
            }
        };
        let resolver = cell
            .get_or_init(|| async {
                tracing::info!(service, "following a new service");
                self.registry.resolver(service).await
            })
            .await;
        Ok(resolver.clone())
    }

    /// Every resolver created so far, by service.
    pub(crate) fn resolvers(&self) -> Vec<Resolver> {
        lock_read(&self.resolvers)
            .values()
            .filter_map(|cell| cell.get().cloned())
            .collect()
    }

    /// Whether `service` has a resolver.
    fn follows(&self, service: &str) -> bool {
        lock_read(&self.resolvers).contains_key(service)
    }

    /// Reports a failed call, counting the breaker if this failure opened it.
    fn report_failure(&self, resolver: &Resolver, instance_id: &str) {
        if resolver.record_failure(instance_id) {
            self.metrics.breaker_opened(resolver.service());
        }
    }

    /// Forwards one request and answers with the instance's response, or with
    /// the gateway's reason for not having one.
    async fn forward(&self, peer: SocketAddr, request: Request) -> Result<Response, ProxyError> {
        let (mut parts, body) = request.into_parts();
        let (service, path) = target(&parts.headers, parts.uri.path());
        let service = service.to_string();
        if service == RESERVED_PREFIX {
            return Err(ProxyError::Reserved { service });
        }
        if let Err(e) = muster_core::validate::dns_label("service", &service) {
            return Err(ProxyError::InvalidService {
                service,
                reason: e.reason,
            });
        }
        let path_and_query = match parts.uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path.to_string(),
        };

        let max = self.config.max_body_bytes;
        if content_length(&parts.headers).is_some_and(|len| len > max) {
            return Err(ProxyError::BodyTooLarge { service, max });
        }
        let resolver = self.resolver(&service).await?;
        // Only an HTTP/1.1 connection can be handed over (HTTP/2 has no Upgrade).
        let mut upgrade = match requested_upgrade(&parts.headers).zip(parts.extensions.remove::<OnUpgrade>()) {
            Some((protocol, client)) => {
                let slot = self
                    .tunnels
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| ProxyError::TooManyTunnels {
                        service: service.clone(),
                        max: self.config.max_tunnels,
                    })?;
                Some(UpgradeAsked { protocol, client, slot })
            }
            None => None,
        };

        let host = parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| parts.headers.get(http::header::HOST)?.to_str().ok().map(str::to_string));
        let upstream_http2 = upstream_over_http2(parts.version, &parts.headers);
        let trailers = upstream_http2 && accepts_trailers(&parts.headers);
        parts.headers.remove(SERVICE_HEADER);
        let scheme = if self.config.listener_tls.is_some() {
            "https"
        } else {
            "http"
        };
        upstream_request_headers(&mut parts.headers, peer.ip(), host.as_deref(), scheme);
        if trailers {
            parts.headers.insert(TE, HeaderValue::from_static("trailers"));
        }
        if let Some(asked) = &upgrade {
            ask_upgrade(&mut parts.headers, asked.protocol.clone());
        }
        let replayable_size = body.size_hint().upper().is_some_and(|n| n <= REPLAYABLE_BODY_BYTES);
        let limit = usize::try_from(max).unwrap_or(usize::MAX);
        let limited = Limited::new(body, limit);
        let mut outgoing = if replayable_size {
            match limited.collect().await {
                Ok(collected) => Outgoing::Buffered(collected.to_bytes()),
                Err(e) if is_length_limit(&*e) => return Err(ProxyError::BodyTooLarge { service, max }),
                Err(e) => {
                    return Err(ProxyError::BadRequestBody {
                        service,
                        reason: describe(&*e),
                    })
                }
            }
        } else {
            Outgoing::Streamed(Some(Body::new(limited)))
        };

        let mut failed: Option<(String, String)> = None;
        loop {
            let picked = match self.pick(&resolver, failed.as_ref().map(|(id, _)| id.as_str())) {
                Ok(Some(picked)) => picked,
                Ok(None) => {
                    // Nowhere else to go: answer with the first failure.
                    let (instance, reason) = failed.unwrap_or_default();
                    return Err(ProxyError::Upstream {
                        service,
                        instance,
                        reason,
                    });
                }
                Err(ClientError::NoInstance { reason, .. }) if failed.is_none() => {
                    return Err(ProxyError::NoInstance { service, reason })
                }
                Err(e) => {
                    let (instance, reason) = failed.unwrap_or_else(|| (String::new(), e.to_string()));
                    return Err(ProxyError::Upstream {
                        service,
                        instance,
                        reason,
                    });
                }
            };
            let instance = picked.instance.instance_id.clone();
            let uri: Uri = match format!("http://{}{path_and_query}", picked.authority()).parse() {
                Ok(uri) => uri,
                Err(e) => {
                    return Err(ProxyError::Upstream {
                        service,
                        instance,
                        reason: format!("the instance's address makes no valid URI: {e}"),
                    })
                }
            };
            let mut upstream = http::Request::new(outgoing.take());
            *upstream.method_mut() = parts.method.clone();
            *upstream.uri_mut() = uri;
            *upstream.headers_mut() = parts.headers.clone();
            let client = if upstream_http2 {
                *upstream.version_mut() = Version::HTTP_2;
                &self.http2
            } else {
                &self.http1
            };

            let started = Instant::now();
            let sent = tokio::time::timeout(self.config.upstream_timeout, client.request(upstream)).await;
            match sent {
                Err(_elapsed) => {
                    self.report_failure(&resolver, &instance);
                    tracing::warn!(%service, %instance, "upstream timed out");
                    return Err(ProxyError::Timeout {
                        service,
                        instance,
                        timeout_ms: u64::try_from(self.config.upstream_timeout.as_millis()).unwrap_or(u64::MAX),
                    });
                }
                Ok(Err(e)) if is_length_limit(&e) => return Err(ProxyError::BodyTooLarge { service, max }),
                Ok(Err(e)) if is_request_side(&e) => {
                    return Err(ProxyError::BadRequestBody {
                        service,
                        reason: describe(&e),
                    })
                }
                Ok(Err(e)) => {
                    self.report_failure(&resolver, &instance);
                    let reason = describe(&e);
                    // Nothing reached the instance when the connection could not be
                    // opened; otherwise only an idempotent request may be repeated.
                    let may_retry =
                        failed.is_none() && outgoing.replayable() && (idempotent(&parts.method) || e.is_connect());
                    tracing::warn!(%service, %instance, error = %reason, retry = may_retry, "upstream connection failed");
                    if !may_retry {
                        return Err(ProxyError::Upstream {
                            service,
                            instance,
                            reason,
                        });
                    }
                    self.metrics.retry(&service);
                    failed = Some((instance, reason));
                }
                Ok(Ok(response)) => {
                    self.metrics.upstream(&service, started.elapsed());
                    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        return self.open_tunnel(&resolver, service, instance, upgrade.take(), response);
                    }
                    let status = response.status();
                    if matches!(
                        status,
                        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
                    ) {
                        self.report_failure(&resolver, &instance);
                    } else {
                        resolver.record_success(&instance);
                    }
                    let (mut head, body) = response.into_parts();
                    remove_hop_by_hop(&mut head.headers);
                    return Ok(Response::from_parts(head, Body::new(body)));
                }
            }
        }
    }

    /// Answers the client with the instance's 101 and relays the two connections
    /// once both are handed over ([`relay`]). A 101 to a request that asked for no
    /// upgrade is the instance's failure.
    fn open_tunnel(
        &self,
        resolver: &Resolver,
        service: String,
        instance: String,
        upgrade: Option<UpgradeAsked>,
        mut response: http::Response<hyper::body::Incoming>,
    ) -> Result<Response, ProxyError> {
        let Some(asked) = upgrade else {
            self.report_failure(resolver, &instance);
            return Err(ProxyError::Upstream {
                service,
                instance,
                reason: "the instance switched protocols (101) on a request that asked for no upgrade".into(),
            });
        };
        resolver.record_success(&instance);
        let protocol = response.headers().get(UPGRADE).cloned().unwrap_or(asked.protocol);
        let upstream = hyper::upgrade::on(&mut response);
        let (mut head, _) = response.into_parts();
        remove_hop_by_hop(&mut head.headers);
        ask_upgrade(&mut head.headers, protocol);
        self.metrics.tunnel_opened(&service);
        tokio::spawn(relay(
            service,
            instance,
            asked.client,
            upstream,
            asked.slot,
            self.metrics.tunnels.clone(),
        ));
        Ok(Response::from_parts(head, Body::empty()))
    }

    /// The next instance, avoiding `avoid` (the instance that just failed):
    /// `Ok(None)` when every usable instance is that one.
    fn pick(&self, resolver: &Resolver, avoid: Option<&str>) -> Result<Option<Picked>, ClientError> {
        match avoid {
            None => resolver.pick().map(Some),
            // No other usable instance: no retry.
            Some(avoid) => Ok(resolver.pick_excluding(&[avoid]).ok()),
        }
    }
}

/// How long a tunnel one side has finished sending on may wait for the other side
/// to finish too before both connections are closed, so that a peer that never
/// closes cannot hold a tunnel's place.
const HALF_CLOSED_GRACE: Duration = Duration::from_secs(10);

/// Copies `from` to `to` until `from` ends, then ends `to`: the bytes copied.
async fn pipe(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) -> std::io::Result<u64> {
    let copied = tokio::io::copy(&mut from, &mut to).await?;
    to.shutdown().await?;
    Ok(copied)
}

/// What one direction of a tunnel did, for the log.
fn outcome(copied: Option<std::io::Result<u64>>) -> String {
    match copied {
        Some(Ok(bytes)) => format!("{bytes} bytes"),
        Some(Err(e)) => format!("broke off: {e}"),
        None => format!("cut after {}s half-closed", HALF_CLOSED_GRACE.as_secs()),
    }
}

/// Copies bytes both ways between the client's and the instance's upgraded
/// connections until both sides have finished (the second within
/// [`HALF_CLOSED_GRACE`] of the first); `open` counts the tunnel until then, and
/// `slot` holds its place among the gateway's tunnels.
async fn relay(
    service: String,
    instance: String,
    client: OnUpgrade,
    upstream: OnUpgrade,
    slot: OwnedSemaphorePermit,
    open: Gauge,
) {
    match tokio::try_join!(client, upstream) {
        Err(e) => tracing::debug!(%service, %instance, reason = %describe(&e), "tunnel not handed over"),
        Ok((client, upstream)) => {
            let (client_read, client_write) = tokio::io::split(TokioIo::new(client));
            let (upstream_read, upstream_write) = tokio::io::split(TokioIo::new(upstream));
            let to_instance = pipe(client_read, upstream_write);
            let to_client = pipe(upstream_read, client_write);
            tokio::pin!(to_instance, to_client);
            let (to_instance, to_client) = tokio::select! {
                sent = &mut to_instance => (Some(sent), tokio::time::timeout(HALF_CLOSED_GRACE, to_client).await.ok()),
                sent = &mut to_client => (tokio::time::timeout(HALF_CLOSED_GRACE, to_instance).await.ok(), Some(sent)),
            };
            tracing::debug!(
                %service,
                %instance,
                to_instance = %outcome(to_instance),
                to_client = %outcome(to_client),
                "tunnel closed"
            );
        }
    }
    open.dec();
    drop(slot);
}

/// The handler of every path outside `/gateway/`.
pub(crate) async fn proxy(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (service, _) = target(request.headers(), request.uri().path());
    let service = service.to_string();
    let grpc = is_grpc(request.headers());
    let response = match gateway.forward(peer, request).await {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!(error = %e, "request answered by the gateway");
            if matches!(e, ProxyError::NoInstance { .. }) {
                gateway.metrics.no_instance(&service);
            }
            if grpc {
                e.into_grpc_response()
            } else {
                e.into_response()
            }
        }
    };
    // Only followed services get their own label, so clients cannot grow the set.
    let label = if gateway.follows(&service) {
        service.as_str()
    } else {
        NO_SERVICE_LABEL
    };
    gateway.metrics.request(label, response.status().as_u16());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_segment_is_the_service_and_the_rest_the_upstream_path() {
        assert_eq!(split_path("/web/a/b"), ("web", "/a/b"));
        assert_eq!(split_path("/web"), ("web", "/"));
        assert_eq!(split_path("/web/"), ("web", "/"));
        assert_eq!(split_path("/"), ("", "/"));
    }

    #[test]
    fn the_service_header_names_the_service_and_keeps_the_whole_path() {
        let mut headers = HeaderMap::new();
        assert_eq!(target(&headers, "/web/a"), ("web", "/a"));
        headers.insert(SERVICE_HEADER, HeaderValue::from_static("orders"));
        assert_eq!(
            target(&headers, "/orders.v1.Orders/Get"),
            ("orders", "/orders.v1.Orders/Get")
        );
        headers.insert(SERVICE_HEADER, HeaderValue::from_bytes(b"caf\xe9").unwrap());
        assert_eq!(target(&headers, "/x").0, "\u{fffd}");
    }

    #[test]
    fn grpc_calls_and_their_trailers_are_recognised() {
        let mut headers = HeaderMap::new();
        assert!(!is_grpc(&headers) && !accepts_trailers(&headers));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc+proto"));
        headers.insert(TE, HeaderValue::from_static("gzip, Trailers"));
        assert!(is_grpc(&headers) && accepts_trailers(&headers));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_grpc(&headers));
    }

    #[test]
    fn only_idempotent_methods_are_repeated() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
            Method::TRACE,
        ] {
            assert!(idempotent(&m), "{m}");
        }
        assert!(!idempotent(&Method::POST));
        assert!(!idempotent(&Method::PATCH));
    }
}
