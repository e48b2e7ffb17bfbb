//! `muster gateway` against a real three-node cluster and real HTTP backends
//! started in the test: requests are proxied with method, path, query, body and
//! headers intact and X-Forwarded-* added, spread over the instances, sent again
//! to another instance when one is stopped (whose breaker then opens), and
//! refused with a JSON reason when they cannot be served; WebSockets (a real
//! client and server) are relayed, at most `max_tunnels` at once; gRPC calls
//! (tonic, and Python's grpcio) are routed by the `muster-service` header over
//! HTTP/2. The metrics pass `promtool check metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use axum::routing::{any, get};
use axum::{Json, Router};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use muster_client::{BreakerPolicy, Client};
use muster_core::InstanceSpec;
use muster_gateway::{GatewayConfig, ServeError};
use muster_testkit::{eventually, init_tracing, promtool_check, TestCluster};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite;

const WAIT: Duration = Duration::from_secs(15);

/// A small HTTP server that answers every request with its own name and what it
/// received; `/hang` never answers.
struct Backend {
    name: String,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn echo(
    State(name): State<Arc<str>>,
    method: Method,
    version: axum::http::Version,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Json<Value> {
    let mut seen: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (k, v) in &headers {
        seen.entry(k.to_string()).or_default().push(v.to_str().unwrap_or("?"));
    }
    let headers: BTreeMap<String, String> = seen.into_iter().map(|(k, v)| (k, v.join(", "))).collect();
    Json(json!({
        "name": &*name,
        "method": method.as_str(),
        "version": format!("{version:?}"),
        "path": uri.path(),
        "query": uri.query(),
        "body": String::from_utf8_lossy(&body),
        "headers": headers,
    }))
}

/// `/ws`: a WebSocket that answers each text message with the backend's name in
/// front of it and each binary message with itself.
async fn ws_echo(State(name): State<Arc<str>>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |mut socket| async move {
        while let Some(Ok(message)) = socket.recv().await {
            let reply = match message {
                Message::Text(text) => Message::Text(format!("{name}: {}", text.as_str()).into()),
                Message::Binary(bytes) => Message::Binary(bytes),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

impl Backend {
    async fn start(name: &str) -> Result<Backend> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/hang", any(std::future::pending::<()>))
            .route("/ws", get(ws_echo))
            .fallback(echo)
            .with_state(Arc::<str>::from(name));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Backend {
            name: name.to_string(),
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// Stops accepting, closes idle connections, and returns once the port is closed.
    async fn stop(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await?;
        Ok(())
    }

    fn spec(&self, service: &str) -> InstanceSpec {
        instance_at(service, &self.name, self.addr)
    }
}

/// An instance `id` of `service` listening at `addr`.
fn instance_at(service: &str, id: &str, addr: SocketAddr) -> InstanceSpec {
    InstanceSpec {
        service: service.into(),
        instance_id: id.into(),
        address: addr.ip().to_string(),
        port: addr.port(),
        ..Default::default()
    }
}

/// The gateway, in-process on a loopback port.
struct Gateway {
    base: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

fn nodes(cluster: &TestCluster) -> Vec<String> {
    cluster
        .running()
        .into_iter()
        .map(|id| cluster.grpc_addr(id).to_string())
        .collect()
}

impl Gateway {
    async fn start(config: GatewayConfig) -> Result<Gateway> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(muster_gateway::serve(listener, config, async {
            let _ = stopped.await;
        }));
        Ok(Gateway {
            base,
            stop: Some(stop),
            task,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn status(&self, http: &reqwest::Client) -> Result<Value> {
        let response = http.get(self.url("/gateway/status")).send().await?;
        ensure!(
            response.status() == StatusCode::OK,
            "status answered {}",
            response.status()
        );
        Ok(response.json().await?)
    }

    /// Stops the gateway gracefully; returns what `serve` returned.
    async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, self.task)
            .await
            .context("the gateway did not stop after its shutdown signal")??
            .context("serve failed")
    }
}

/// The status of `service` in `/gateway/status`, if the gateway follows it.
fn service_status<'a>(status: &'a Value, service: &str) -> Option<&'a Value> {
    status["services"].as_array()?.iter().find(|s| s["service"] == service)
}

fn breaker_of(status: &Value, service: &str, instance: &str) -> Option<String> {
    service_status(status, service)?["instances"]
        .as_array()?
        .iter()
        .find(|i| i["instance_id"] == instance)
        .and_then(|i| i["breaker"].as_str())
        .map(str::to_string)
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("an HTTP client")
}

/// Reads a JSON answer, failing with the body when the status is not `want`.
async fn json_with(response: reqwest::Response, want: StatusCode) -> Result<Value> {
    let status = response.status();
    let text = response.text().await?;
    ensure!(status == want, "expected {want}, got {status}: {text}");
    serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
}

/// Waits until the gateway follows `service` with `n` instances (the first request
/// creates its resolver).
async fn wait_for_instances(gateway: &Gateway, http: &reqwest::Client, service: &str, n: usize) -> Result<()> {
    eventually(
        WAIT,
        &format!("the gateway to know {n} instance(s) of {service}"),
        || async {
            let _ = http.get(gateway.url(&format!("/{service}/"))).send().await?;
            let status = gateway.status(http).await?;
            Ok(service_status(&status, service)
                .and_then(|s| s["instances"].as_array())
                .is_some_and(|i| i.len() == n))
        },
    )
    .await
}

fn test_config(cluster: &TestCluster) -> GatewayConfig {
    GatewayConfig {
        nodes: nodes(cluster),
        breaker: BreakerPolicy {
            failure_threshold: 2,
            // Long enough never to end during the test: an open breaker stays open.
            cool_down: Duration::from_secs(3600),
        },
        max_body_bytes: 1024,
        ..GatewayConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_proxies_balances_and_fails_over_when_a_backend_stops() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let registry = Client::connect(nodes(&cluster)).await?;
    let mut a = Backend::start("echo-a").await?;
    let b = Backend::start("echo-b").await?;
    registry.register(a.spec("echo"), None).await?;
    registry.register(b.spec("echo"), None).await?;
    let gateway = Gateway::start(test_config(&cluster)).await?;
    let http = http_client();
    wait_for_instances(&gateway, &http, "echo", 2).await?;

    // Method, path, query, body and headers reach the instance; X-Forwarded-* added.
    let answer = json_with(
        http.post(gateway.url("/echo/some/deep/path?x=1&y=two%20words"))
            .header("x-custom", "kept")
            .header("x-forwarded-for", "203.0.113.9")
            .header("content-type", "text/plain")
            .body("hello through the gateway")
            .send()
            .await?,
        StatusCode::OK,
    )
    .await?;
    assert_eq!(answer["method"], "POST");
    assert_eq!(answer["path"], "/some/deep/path");
    assert_eq!(answer["query"], "x=1&y=two%20words");
    assert_eq!(answer["body"], "hello through the gateway");
    let headers = &answer["headers"];
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(headers["content-type"], "text/plain");
    assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(headers["x-forwarded-host"], gateway.base.trim_start_matches("http://"));
    assert_eq!(headers["x-forwarded-proto"], "http");
    let instance_addr = if answer["name"] == "echo-a" { a.addr } else { b.addr };
    assert_eq!(headers["host"], instance_addr.to_string());

    // Every method goes through as sent; `/echo` alone is the instance's `/`.
    for method in [Method::GET, Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS] {
        let answer = json_with(
            http.request(method.clone(), gateway.url("/echo")).send().await?,
            StatusCode::OK,
        )
        .await?;
        assert_eq!(answer["method"], method.as_str());
        assert_eq!(answer["path"], "/");
    }

    // Round-robin: ten requests, five on each instance.
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..10 {
        let answer = json_with(http.get(gateway.url("/echo/hi")).send().await?, StatusCode::OK).await?;
        *by_name
            .entry(answer["name"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    assert_eq!(by_name.get("echo-a"), Some(&5), "{by_name:?}");
    assert_eq!(by_name.get("echo-b"), Some(&5), "{by_name:?}");

    // Stop echo-a (still registered): every GET still succeeds, sent again to
    // echo-b when echo-a refuses the connection, until echo-a's breaker opens.
    a.stop().await?;
    let mut opened_after = None;
    for n in 1..=20 {
        let answer = json_with(http.get(gateway.url("/echo/after")).send().await?, StatusCode::OK).await?;
        assert_eq!(answer["name"], "echo-b");
        if breaker_of(&gateway.status(&http).await?, "echo", "echo-a").as_deref() == Some("open") {
            opened_after = Some(n);
            break;
        }
    }
    let opened_after = opened_after.context("echo-a's breaker never opened")?;
    let status = gateway.status(&http).await?;
    assert_eq!(
        breaker_of(&status, "echo", "echo-a").as_deref(),
        Some("open"),
        "{status:#}"
    );
    assert_eq!(
        breaker_of(&status, "echo", "echo-b").as_deref(),
        Some("closed"),
        "{status:#}"
    );
    let echo = service_status(&status, "echo").context("echo in the status")?;
    assert_eq!(echo["stale"], false);
    assert_eq!(echo["source"], "registry");
    assert!(echo["revision"].as_u64().is_some_and(|r| r > 0), "{echo:#}");
    assert_eq!(status["nodes"].as_array().map(Vec::len), Some(3));
    assert!(status["current_node"].is_string());

    // With the breaker open, echo-b takes everything without retries.
    for _ in 0..4 {
        let answer = json_with(http.get(gateway.url("/echo/open")).send().await?, StatusCode::OK).await?;
        assert_eq!(answer["name"], "echo-b");
    }

    // The metrics tell the story and pass promtool.
    let response = http.get(gateway.url("/gateway/metrics")).send().await?;
    assert!(response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain; version=0.0.4")));
    let text = response.text().await?;
    for needle in [
        r#"muster_gateway_requests_total{service="echo",class="2xx"} "#,
        r#"muster_gateway_upstream_duration_seconds_count{service="echo"} "#,
        r#"muster_gateway_breaker_opens_total{service="echo"} 1"#,
        "muster_gateway_services 1",
    ] {
        assert!(text.contains(needle), "/gateway/metrics lacks {needle:?}:\n{text}");
    }
    let retries = metric_value(&text, r#"muster_gateway_retries_total{service="echo"}"#)?;
    assert!(
        retries >= 1.0 && retries <= opened_after as f64,
        "retries {retries} after {opened_after} requests:\n{text}"
    );
    promtool_check(&text)?;

    gateway.shutdown().await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_answers_json_reasons_when_it_cannot_serve() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let registry = Client::connect(nodes(&cluster)).await?;
    let backend = Backend::start("slow-1").await?;
    registry.register(backend.spec("slow"), None).await?;
    // An instance whose port is closed: bound, then released.
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    registry
        .register(
            InstanceSpec {
                service: "dead".into(),
                instance_id: "dead-1".into(),
                address: "127.0.0.1".into(),
                port: closed_port,
                ..Default::default()
            },
            None,
        )
        .await?;
    let gateway = Gateway::start(GatewayConfig {
        upstream_timeout: Duration::from_millis(300),
        ..test_config(&cluster)
    })
    .await?;
    let http = http_client();

    // A service with no instance: 503 with the reason.
    let answer = json_with(
        http.get(gateway.url("/nothing/here")).send().await?,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await?;
    assert_eq!(answer["error"], "no_instance");
    assert_eq!(answer["service"], "nothing");
    assert_eq!(answer["reason"], "no instance is registered");

    // A path that names no valid service: 400 naming the field.
    let answer = json_with(
        http.get(gateway.url("/Not_A_Service/x")).send().await?,
        StatusCode::BAD_REQUEST,
    )
    .await?;
    assert_eq!(answer["field"], "service");
    assert!(
        answer["reason"].as_str().is_some_and(|r| r.contains("service")),
        "{answer}"
    );
    json_with(http.get(gateway.url("/")).send().await?, StatusCode::BAD_REQUEST).await?;

    // The gateway's own prefix is never proxied.
    let answer = json_with(
        http.get(gateway.url("/gateway/other")).send().await?,
        StatusCode::NOT_FOUND,
    )
    .await?;
    assert_eq!(answer["error"], "reserved_path");
    json_with(http.get(gateway.url("/gateway/healthz")).send().await?, StatusCode::OK).await?;

    // Bodies over --max-body-bytes (1024): 413, whether their length is announced
    // or they are streamed.
    wait_for_instances(&gateway, &http, "slow", 1).await?;
    let answer = json_with(
        http.post(gateway.url("/slow/upload"))
            .body(vec![b'x'; 4096])
            .send()
            .await?,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await?;
    assert_eq!(answer["error"], "body_too_large");
    assert_eq!(answer["service"], "slow");
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..4).map(|_| Ok(Bytes::from(vec![b'y'; 600]))).collect();
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let answer = json_with(
        http.post(gateway.url("/slow/upload")).body(streamed).send().await?,
        StatusCode::PAYLOAD_TOO_LARGE,
    )
    .await?;
    assert_eq!(answer["error"], "body_too_large");
    // A body within the limit still goes through.
    let answer = json_with(
        http.post(gateway.url("/slow/upload"))
            .body(vec![b'z'; 1000])
            .send()
            .await?,
        StatusCode::OK,
    )
    .await?;
    assert_eq!(answer["body"].as_str().map(str::len), Some(1000));

    // An instance that does not answer: 504.
    let answer = json_with(
        http.get(gateway.url("/slow/hang")).send().await?,
        StatusCode::GATEWAY_TIMEOUT,
    )
    .await?;
    assert_eq!(answer["error"], "upstream_timeout");
    assert_eq!(answer["instance"], "slow-1");

    // An instance that refuses connections, with no other to go to: 502. (Until
    // the gateway's cache has the instance, the answer is 503 "no instance is
    // registered"; no attempt, so no failure, is made before.)
    let first = std::sync::Mutex::new(None);
    eventually(WAIT, "the gateway to know dead-1", || {
        let (http, gateway, first) = (&http, &gateway, &first);
        async move {
            let response = http.get(gateway.url("/dead/x")).send().await?;
            let status = response.status();
            let answer: Value = response.json().await?;
            if status == StatusCode::SERVICE_UNAVAILABLE && answer["reason"] == "no instance is registered" {
                return Ok(false);
            }
            *first.lock().unwrap_or_else(|e| e.into_inner()) = Some((status, answer));
            Ok(true)
        }
    })
    .await?;
    let (status, answer) = first
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .context("an answer")?;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{answer}");
    assert_eq!(answer["error"], "upstream_failed");
    assert_eq!(answer["instance"], "dead-1");
    // The second failure in a row (--breaker-failures 2) opens its breaker ...
    let answer = json_with(http.get(gateway.url("/dead/x")).send().await?, StatusCode::BAD_GATEWAY).await?;
    assert_eq!(answer["instance"], "dead-1");
    let status = gateway.status(&http).await?;
    assert_eq!(
        breaker_of(&status, "dead", "dead-1").as_deref(),
        Some("open"),
        "{status:#}"
    );
    // ... and then no instance is left: 503 with the reason.
    let answer = json_with(
        http.get(gateway.url("/dead/x")).send().await?,
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await?;
    assert_eq!(answer["error"], "no_instance");
    assert!(
        answer["reason"].as_str().is_some_and(|r| r.contains("circuit breaker")),
        "{answer}"
    );

    let text = http.get(gateway.url("/gateway/metrics")).send().await?.text().await?;
    for needle in [
        r#"muster_gateway_no_instance_total{service="nothing"} 1"#,
        r#"muster_gateway_requests_total{service="(none)",class="4xx"} "#,
        r#"muster_gateway_requests_total{service="slow",class="4xx"} 2"#,
        r#"muster_gateway_requests_total{service="slow",class="5xx"} 1"#,
    ] {
        assert!(text.contains(needle), "/gateway/metrics lacks {needle:?}:\n{text}");
    }
    promtool_check(&text)?;

    gateway.shutdown().await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websockets_are_relayed_and_their_number_is_bounded() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let registry = Client::connect(nodes(&cluster)).await?;
    let backend = Backend::start("chat-1").await?;
    registry.register(backend.spec("chat"), None).await?;
    let gateway = Gateway::start(GatewayConfig {
        max_tunnels: 1,
        ..test_config(&cluster)
    })
    .await?;
    let http = http_client();
    wait_for_instances(&gateway, &http, "chat", 1).await?;
    let ws_url = gateway.url("/chat/ws").replacen("http://", "ws://", 1);

    // The handshake goes through and messages go both ways, a large one too.
    let (mut socket, handshake) = tokio_tungstenite::connect_async(&ws_url).await?;
    assert_eq!(handshake.status(), StatusCode::SWITCHING_PROTOCOLS);
    socket.send(tungstenite::Message::text("hello")).await?;
    let reply = socket.next().await.context("the tunnel closed")??;
    assert_eq!(reply, tungstenite::Message::text("chat-1: hello"));
    let large: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    socket.send(tungstenite::Message::binary(large.clone())).await?;
    let reply = socket.next().await.context("the tunnel closed")??;
    assert_eq!(reply, tungstenite::Message::binary(large));

    // Plain requests to the same service still go through meanwhile.
    let answer = json_with(http.get(gateway.url("/chat/plain")).send().await?, StatusCode::OK).await?;
    assert_eq!(answer["name"], "chat-1");

    // A second tunnel is one more than max_tunnels: 503 with the reason.
    match tokio_tungstenite::connect_async(&ws_url).await {
        Err(tungstenite::Error::Http(refused)) => {
            assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
            let body = refused.body().as_deref().context("a refusal with a body")?;
            let answer: Value = serde_json::from_slice(body)?;
            assert_eq!(answer["error"], "too_many_tunnels");
            assert_eq!(answer["service"], "chat");
        }
        Ok(_) => bail!("a second tunnel was opened past max_tunnels 1"),
        Err(e) => bail!("the second tunnel failed otherwise: {e}"),
    }
    let text = http.get(gateway.url("/gateway/metrics")).send().await?.text().await?;
    assert_eq!(metric_value(&text, "muster_gateway_tunnels")?, 1.0, "{text}");
    assert_eq!(
        metric_value(&text, r#"muster_gateway_tunnels_opened_total{service="chat"}"#)?,
        1.0
    );
    promtool_check(&text)?;

    // Closing the first frees its place: the gauge goes back to 0 and a new tunnel opens.
    socket.close(None).await?;
    while let Some(message) = socket.next().await {
        if message.is_err() {
            break;
        }
    }
    drop(socket);
    eventually(WAIT, "the closed tunnel to be counted out", || async {
        let text = http.get(gateway.url("/gateway/metrics")).send().await?.text().await?;
        Ok(metric_value(&text, "muster_gateway_tunnels")? == 0.0)
    })
    .await?;
    let (mut socket, _) = tokio_tungstenite::connect_async(&ws_url).await?;
    socket.send(tungstenite::Message::text("again")).await?;
    let reply = socket.next().await.context("the tunnel closed")??;
    assert_eq!(reply, tungstenite::Message::text("chat-1: again"));
    socket.close(None).await?;

    gateway.shutdown().await?;
    cluster.shutdown().await;
    Ok(())
}

/// The value of the sample whose name and labels are `series`.
fn metric_value(text: &str, series: &str) -> Result<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .with_context(|| format!("no sample {series} in:\n{text}"))
}

/// A gRPC server (the standard health service) on a loopback port, reporting
/// `orders.v1.Orders` as serving.
async fn grpc_backend() -> Result<(SocketAddr, oneshot::Sender<()>, JoinHandle<()>)> {
    use tonic_health::ServingStatus;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("orders.v1.Orders", ServingStatus::Serving)
        .await;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        // The reporter lives as long as the server, or watches end.
        let _reporter = reporter;
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok((addr, stop, task))
}

/// A gRPC health client through the gateway whose calls name `service` in the
/// `muster-service` header.
async fn grpc_through(
    gateway: &Gateway,
    service: &'static str,
) -> Result<
    tonic_health::pb::health_client::HealthClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone,
        >,
    >,
> {
    let channel = tonic::transport::Endpoint::from_shared(gateway.base.clone())?
        .connect()
        .await?;
    Ok(tonic_health::pb::health_client::HealthClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            request.metadata_mut().insert(
                muster_gateway::SERVICE_HEADER,
                tonic::metadata::MetadataValue::from_static(service),
            );
            Ok(request)
        },
    ))
}

/// gRPC through the gateway: a call naming the service in the `muster-service`
/// header reaches an instance over HTTP/2 with its path unchanged, unary and
/// server-streaming calls answer with the instance's status in trailers, and calls
/// the gateway cannot serve get a gRPC status naming the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plain_http2_request_goes_on_over_http1_and_a_grpc_call_over_http2() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let registry = Client::connect(nodes(&cluster)).await?;
    let mut backend = Backend::start("echo-a").await?;
    registry.register(backend.spec("echo"), None).await?;
    let gateway = Gateway::start(test_config(&cluster)).await?;
    let http = http_client();
    wait_for_instances(&gateway, &http, "echo", 1).await?;

    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(20))
        .build()?;
    let response = h2.get(gateway.url("/echo/over-h2")).send().await?;
    assert_eq!(
        response.version(),
        reqwest::Version::HTTP_2,
        "the gateway spoke HTTP/2 to its client"
    );
    let answer = json_with(response, StatusCode::OK).await?;
    assert_eq!(
        answer["version"], "HTTP/1.1",
        "every instance speaks HTTP/1.1: {answer}"
    );
    assert_eq!(answer["path"], "/over-h2");

    // A gRPC call (by its content type) keeps HTTP/2, which gRPC needs.
    let response = h2
        .post(gateway.url("/echo/pkg.Svc/Method"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(vec![0u8; 5])
        .send()
        .await?;
    let answer = json_with(response, StatusCode::OK).await?;
    assert_eq!(answer["version"], "HTTP/2.0", "{answer}");
    assert_eq!(answer["headers"]["te"], "trailers");
    backend.stop().await?;
    gateway.shutdown().await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_calls_are_routed_by_the_service_header() -> Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let registry = Client::connect(nodes(&cluster)).await?;
    let (addr, stop, task) = grpc_backend().await?;
    registry.register(instance_at("orders", "orders-1", addr), None).await?;
    let gateway = Gateway::start(test_config(&cluster)).await?;
    let http = http_client();

    let mut health = grpc_through(&gateway, "orders").await?;
    let check = |service: &str| HealthCheckRequest {
        service: service.to_string(),
    };
    // The first call creates the gateway's resolver, from a node that may not have
    // applied the registration yet.
    eventually(WAIT, "a health check through the gateway", || {
        let mut health = health.clone();
        async move {
            let answer = health.check(check("orders.v1.Orders")).await;
            Ok(answer.is_ok_and(|a| {
                a.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            }))
        }
    })
    .await?;
    // The instance's own error status comes back in its trailers.
    let unknown = health
        .check(check("no.such.Service"))
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    // A server stream passes as it is sent.
    let mut watch = health.watch(check("orders.v1.Orders")).await?.into_inner();
    let first = tokio::time::timeout(WAIT, watch.message())
        .await
        .context("no watch message")??
        .context("the watch ended")?;
    assert_eq!(
        first.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    drop(watch);

    // The gateway's own refusals, in gRPC terms.
    let mut nowhere = grpc_through(&gateway, "payments").await?;
    let refused = nowhere.check(check("")).await.expect_err("no instance of payments");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("\"payments\""), "{}", refused.message());
    let mut invalid = grpc_through(&gateway, "Not_A_Name").await?;
    let refused = invalid.check(check("")).await.expect_err("invalid service");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("Not_A_Name"), "{}", refused.message());

    // The instance stops: the call fails as unavailable, naming the instance.
    let _ = stop.send(());
    task.await?;
    let refused = health
        .check(check("orders.v1.Orders"))
        .await
        .expect_err("the instance stopped");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("orders-1"), "{}", refused.message());

    let text = http.get(gateway.url("/gateway/metrics")).send().await?.text().await?;
    assert!(
        metric_value(&text, r#"muster_gateway_requests_total{service="orders",class="2xx"}"#)? >= 3.0,
        "{text}"
    );
    gateway.shutdown().await?;
    cluster.shutdown().await;
    Ok(())
}

/// A third-party gRPC implementation, Python's grpcio with stubs generated from
/// proto/ by grpcio-tools, against the registry directly (writes through a
/// follower, read-your-writes on another node, a watch, a keep-alive stream, a
/// refused bad request) and through the gateway, with the registry's own gRPC
/// port registered as the service behind it (tests/grpc/py_grpc_check.py).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcio_drives_the_registry_directly_and_through_the_gateway() -> Result<()> {
    init_tracing();
    if !muster_tests::python_has("grpc, grpc_tools.protoc") {
        return muster_tests::missing("grpcio and grpcio-tools (PyPI)");
    }
    let cluster = TestCluster::start(3).await?;
    let follower = cluster.follower().await?;
    let other = cluster
        .running()
        .into_iter()
        .find(|id| *id != follower)
        .context("a second node")?;
    let registry = Client::connect(nodes(&cluster)).await?;
    let node = cluster.grpc_addr(other);
    registry
        .register(instance_at("muster-node", &format!("node-{other}"), node), None)
        .await?;
    let gateway = Gateway::start(test_config(&cluster)).await?;
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    muster_tests::run_python_check(
        "grpc/py_grpc_check.py",
        &[
            proto.to_string(),
            cluster.grpc_addr(follower).to_string(),
            node.to_string(),
            gateway.base.trim_start_matches("http://").to_string(),
            "muster-node".to_string(),
        ],
        "grpcio: all checks passed",
    )
    .await?;
    gateway.shutdown().await?;
    cluster.shutdown().await;
    Ok(())
}
