//! The HTTP side of real nodes (real sockets, fsynced logs and sled on disk): the
//! REST API, its SSE watch, the action API, bad input, readiness and `/metrics`
//! (checked by Prometheus's own `promtool`).

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use muster_proto::v1 as pb;
use muster_testkit::{eventually, init_tracing, promtool_check, TestCluster};
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};

fn base(cluster: &TestCluster, id: u64) -> String {
    format!("http://{}", cluster.nodes[&id].config.http_addr)
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("an HTTP client")
}

/// Reads a JSON answer, failing with the body when the status is not `want`.
async fn json_with(response: Response, want: StatusCode) -> Result<Value> {
    let status = response.status();
    let text = response.text().await?;
    ensure!(status == want, "expected {want}, got {status}: {text}");
    serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
}

async fn ok_json(response: Response) -> Result<Value> {
    json_with(response, StatusCode::OK).await
}

/// Asserts a REST error answer: the status, and the field it names.
async fn expect_error(response: Response, status: StatusCode, field: &str) -> Result<Value> {
    let body = json_with(response, status).await?;
    ensure!(body["error"]["field"] == field, "expected field {field:?} in {body}");
    ensure!(body["error"]["message"].is_string(), "no message in {body}");
    Ok(body)
}

fn ids(body: &Value) -> Vec<String> {
    body["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["instance_id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn rest_registration_through_one_node_is_read_from_another_with_min_revision() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = cluster.follower().await?;
    let other = cluster
        .running()
        .into_iter()
        .find(|id| *id != follower)
        .context("a third node")?;
    let http = client();

    // Register through a follower, under a new 10 s lease.
    let registered = ok_json(
        http.post(format!(
            "{}/v1/registry/services/web/instances",
            base(&cluster, follower)
        ))
        .json(&json!({
            "instance_id": "web-1",
            "address": "10.0.0.5",
            "port": 8080,
            "ports": {"health": 8081},
            "tags": ["v2", "canary"],
            "metadata": {"version": "2.1"},
            "zone": "eu-1",
            "ttl": "10s"
        }))
        .send()
        .await?,
    )
    .await?;
    let revision = registered["revision"].as_u64().context("revision")?;
    let lease = registered["lease_id"].as_u64().context("lease_id")?;
    assert_eq!(registered["instance"]["ports"]["health"], 8081);
    assert_eq!(registered["instance"]["health"], "passing");
    assert_eq!(registered["instance"]["lease_id"], lease);
    assert_eq!(registered["node"], follower);
    assert_eq!(registered["leader_known"], true);
    ok_json(
        http.put(format!(
            "{}/v1/registry/services/web/instances/web-2",
            base(&cluster, leader)
        ))
        .json(&json!({"address": "10.0.0.6", "port": 8080, "tags": ["v1"], "zone": "us-1"}))
        .send()
        .await?,
    )
    .await?;

    // Read-your-writes on another node.
    let second = ok_json(
        http.get(format!("{}/v1/registry/services/web/instances", base(&cluster, other)))
            .query(&[("min_revision", (revision + 1).to_string())])
            .send()
            .await?,
    )
    .await?;
    assert_eq!(ids(&second), ["web-1", "web-2"]);
    assert!(second["revision"].as_u64() >= Some(revision + 1));
    assert_eq!(second["node"], other);
    assert!(second["ms_since_leader_contact"].is_u64());

    // The node header is in the headers too.
    let response = http
        .get(format!("{}/v1/registry/services/web/instances", base(&cluster, other)))
        .query(&[("tag", "v2"), ("tag", "canary"), ("consistency", "linearizable")])
        .send()
        .await?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    assert_eq!(header("x-muster-node"), Some(other.to_string()));
    assert_eq!(header("x-muster-leader-known").as_deref(), Some("true"));
    assert!(header("x-muster-revision").and_then(|r| r.parse::<u64>().ok()) >= Some(revision + 1));
    assert!(header("x-muster-ms-since-leader-contact").is_some());
    assert_eq!(ids(&ok_json(response).await?), ["web-1"], "tags are ANDed");

    let url = format!("{}/v1/registry/services/web/instances", base(&cluster, other));
    let by_zone = ok_json(http.get(&url).query(&[("zone", "us-1")]).send().await?).await?;
    assert_eq!(ids(&by_zone), ["web-2"]);

    // One instance; services with counts.
    let one = ok_json(
        http.get(format!(
            "{}/v1/registry/services/web/instances/web-1",
            base(&cluster, other)
        ))
        .send()
        .await?,
    )
    .await?;
    assert_eq!(one["instance"]["metadata"]["version"], "2.1");
    let services = ok_json(
        http.get(format!("{}/v1/registry/services", base(&cluster, other)))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(services["services"][0]["service"], "web");
    assert_eq!(services["services"][0]["instances"], 2);

    // Health: critical instances drop out of a passing-only read.
    let set = ok_json(
        http.put(format!(
            "{}/v1/registry/services/web/instances/web-2/health",
            base(&cluster, follower)
        ))
        .json(&json!({"health": "critical"}))
        .send()
        .await?,
    )
    .await?;
    let rev = set["instance"]["mod_revision"].as_u64().context("mod_revision")?;
    let passing = ok_json(
        http.get(&url)
            .query(&[("health", "passing,warning"), ("min_revision", &rev.to_string())])
            .send()
            .await?,
    )
    .await?;
    assert_eq!(ids(&passing), ["web-1"]);

    // Heartbeat through any node; unknown leases are 404 naming the lease.
    for id in cluster.running() {
        let kept = ok_json(
            http.put(format!("{}/v1/registry/leases/{lease}/keepalive", base(&cluster, id)))
                .send()
                .await?,
        )
        .await?;
        assert_eq!(kept["ttl_ms"], 10_000);
    }
    expect_error(
        http.put(format!(
            "{}/v1/registry/leases/999999/keepalive",
            base(&cluster, follower)
        ))
        .send()
        .await?,
        StatusCode::NOT_FOUND,
        "lease_id",
    )
    .await?;

    // Deregister one; revoking the lease removes the other.
    let gone = ok_json(
        http.delete(format!(
            "{}/v1/registry/services/web/instances/web-2",
            base(&cluster, other)
        ))
        .send()
        .await?,
    )
    .await?;
    let gone_rev = gone["revision"].as_u64().context("revision")?;
    expect_error(
        http.delete(format!(
            "{}/v1/registry/services/web/instances/web-2",
            base(&cluster, other)
        ))
        .send()
        .await?,
        StatusCode::NOT_FOUND,
        "instance_id",
    )
    .await?;
    let revoked = ok_json(
        http.delete(format!("{}/v1/registry/leases/{lease}", base(&cluster, follower)))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(revoked["removed"], 1);
    let empty = ok_json(
        http.get(&url)
            .query(&[("min_revision", revoked["revision"].to_string())])
            .send()
            .await?,
    )
    .await?;
    assert!(ids(&empty).is_empty());
    assert!(empty["revision"].as_u64() > Some(gone_rev));

    // A lease granted on its own, then used by a registration.
    let granted = ok_json(
        http.post(format!("{}/v1/registry/leases", base(&cluster, other)))
            .json(&json!({"ttl_ms": 5000}))
            .send()
            .await?,
    )
    .await?;
    let lease2 = granted["lease_id"].as_u64().context("lease_id")?;
    let attached = ok_json(
        http.post(format!("{}/v1/registry/services/api/instances", base(&cluster, other)))
            .json(&json!({"id": "api-1", "address": "api.internal", "port": 443, "lease_id": lease2}))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(attached["lease_id"], lease2);

    // The cluster, from every node.
    for id in cluster.running() {
        let status = ok_json(
            http.get(format!("{}/v1/cluster/status", base(&cluster, id)))
                .send()
                .await?,
        )
        .await?;
        assert_eq!(status["node"], id);
        assert_eq!(status["leader"], leader);
        assert!(status["term"].as_u64() >= Some(1));
        assert!(status["digest"].is_string());
        assert_eq!(
            status["cluster_id"].as_str().map(str::to_owned),
            cluster.nodes[&id]
                .handle
                .as_ref()
                .and_then(|h| h.core().cluster.id())
                .map(muster_server::identity::format_cluster_id)
        );
        assert_eq!(status["command_level"], muster_core::COMMAND_LEVEL);
        let members = ok_json(
            http.get(format!("{}/v1/cluster/members", base(&cluster, id)))
                .send()
                .await?,
        )
        .await?;
        let members = members["members"].as_array().context("members")?;
        assert_eq!(members.len(), 3);
        assert_eq!(members.iter().filter(|m| m["leader"] == true).count(), 1);
        assert!(members.iter().all(|m| m["voter"] == true));
    }

    // The OpenAPI document is served and describes what was used above.
    let doc = ok_json(
        http.get(format!("{}/v1/openapi.json", base(&cluster, other)))
            .send()
            .await?,
    )
    .await?;
    for path in [
        "/v1/registry/services/{service}/instances",
        "/v1/registry/leases/{lease_id}/keepalive",
        "/v1/registry/watch",
        "/v1/actions",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} not documented");
    }
    cluster.shutdown().await;
    Ok(())
}

/// One Server-Sent Event.

#[tokio::test]
async fn maintenance_over_rest_keeps_an_instance_registered_but_out_of_healthy_reads() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let follower = cluster.follower().await?;
    let http = client();
    let node = base(&cluster, follower);
    let instances = format!("{node}/v1/registry/services/pay/instances");
    for (id, health) in [("pay-1", "warning"), ("pay-2", "passing")] {
        ok_json(
            http.put(format!("{instances}/{id}"))
                .json(&json!({"address": "10.0.0.7", "port": 80, "health": health}))
                .send()
                .await?,
        )
        .await?;
    }
    let maintenance = format!("{instances}/pay-1/maintenance");
    let on = ok_json(
        http.put(&maintenance)
            .json(&json!({"enable": true, "reason": "disk swap"}))
            .send()
            .await?,
    )
    .await?;
    let instance = &on["instance"];
    assert_eq!(instance["health"], "critical");
    assert_eq!(instance["maintenance"]["reason"], "disk swap");
    assert_eq!(instance["maintenance"]["health_after"], "warning");
    assert!(instance["maintenance"]["since_ms"].as_u64() > Some(0));
    assert_eq!(instance["checks"][0]["id"], "_service_maintenance:pay-1");
    assert_eq!(instance["checks"][0]["ttl_ms"], 0);

    let revision = on["revision"].as_u64().context("revision")?;
    let other = cluster
        .running()
        .into_iter()
        .find(|id| *id != follower)
        .context("another node")?;
    let serving = ok_json(
        http.get(format!("{}/v1/registry/services/pay/instances", base(&cluster, other)))
            .query(&[("health", "passing,warning"), ("min_revision", &revision.to_string())])
            .send()
            .await?,
    )
    .await?;
    assert_eq!(
        ids(&serving),
        ["pay-2"],
        "another node skips it from the write's revision on"
    );

    // Bad requests name the field; the node keeps the instance as it was.
    for (body, field) in [
        (json!({"reason": "x"}), "enable"),
        (json!({"enable": "yes"}), "enable"),
        (json!({"enable": false, "reason": "x"}), "reason"),
        (json!({"enable": true, "reason": "x".repeat(1025)}), "reason"),
    ] {
        let response = http.put(&maintenance).json(&body).send().await?;
        expect_error(response, StatusCode::BAD_REQUEST, field).await?;
    }
    let unknown = http
        .put(format!("{instances}/nope/maintenance"))
        .json(&json!({"enable": true}))
        .send()
        .await?;
    let body = json_with(unknown, StatusCode::NOT_FOUND).await?;
    assert!(
        body["error"]["message"].as_str().unwrap_or_default().contains("nope"),
        "{body}"
    );

    let off = ok_json(http.put(&maintenance).json(&json!({"enable": false})).send().await?).await?;
    assert_eq!(off["instance"]["health"], "warning", "the health it had comes back");
    assert!(off["instance"].get("maintenance").is_none());
    assert!(off["instance"].get("checks").is_none());
    cluster.shutdown().await;
    Ok(())
}

#[derive(Debug, Default)]
struct Sse {
    event: String,
    id: Option<u64>,
    data: Value,
}

/// Reads events from an SSE response.
struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    fn new(response: Response) -> Self {
        SseReader {
            stream: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event other than `progress`, within 10 s.
    async fn next_change(&mut self) -> Result<Sse> {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), self.next())
                .await
                .context("no SSE event within 10 s")??;
            if event.event != "progress" {
                return Ok(event);
            }
        }
    }

    async fn next(&mut self) -> Result<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Sse::default();
                let mut data = String::new();
                for line in block.lines() {
                    if line.starts_with(':') {
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => event.event = value.to_string(),
                        "id" => event.id = value.parse().ok(),
                        "data" => data.push_str(value),
                        _ => {}
                    }
                }
                if event.event.is_empty() && data.is_empty() {
                    continue; // a keep-alive comment
                }
                event.data = serde_json::from_str(&data).with_context(|| format!("SSE data is not JSON: {data}"))?;
                return Ok(event);
            }
            match self.stream.next().await {
                Some(chunk) => self.buffer.push_str(&String::from_utf8_lossy(&chunk?)),
                None => bail!("the SSE stream ended"),
            }
        }
    }
}

#[tokio::test]
async fn sse_watch_streams_put_then_delete_and_resumes_after_last_event_id() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let follower = cluster.follower().await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let http = client();
    let watch_url = format!("{}/v1/registry/watch?service=web", base(&cluster, follower));
    let register_url = format!("{}/v1/registry/services/web/instances", base(&cluster, leader));

    let response = http.get(&watch_url).send().await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream")));
    let mut watch = SseReader::new(response);

    // Another service's change is filtered out; ours arrive as put then delete.
    ok_json(
        http.post(format!("{}/v1/registry/services/db/instances", base(&cluster, leader)))
            .json(&json!({"instance_id": "db-1", "address": "10.0.0.9", "port": 5432}))
            .send()
            .await?,
    )
    .await?;
    let put = ok_json(
        http.post(&register_url)
            .json(&json!({"instance_id": "web-1", "address": "10.0.0.5", "port": 8080}))
            .send()
            .await?,
    )
    .await?;
    let put_rev = put["instance"]["mod_revision"].as_u64().context("mod_revision")?;
    let event = watch.next_change().await?;
    assert_eq!(event.event, "put");
    assert_eq!(event.id, Some(put_rev));
    assert_eq!(event.data["instance"]["instance_id"], "web-1");
    assert_eq!(event.data["instance"]["address"], "10.0.0.5");

    ok_json(http.delete(format!("{register_url}/web-1")).send().await?).await?;
    let event = watch.next_change().await?;
    assert_eq!(event.event, "delete");
    assert_eq!(event.data["instance_id"], "web-1");
    assert_eq!(event.data["reason"], "deregistered");
    let last_seen = event.id.context("delete has an id")?;
    assert!(last_seen > put_rev);
    drop(watch);

    // While disconnected, web-2 comes. Resuming after the last seen id replays it
    // (and nothing before it), even though the URL asks for live-from-now.
    let missed = ok_json(
        http.post(&register_url)
            .json(&json!({"instance_id": "web-2", "address": "10.0.0.6", "port": 8080}))
            .send()
            .await?,
    )
    .await?;
    let missed_rev = missed["instance"]["mod_revision"].as_u64().context("mod_revision")?;
    let mut resumed = SseReader::new(
        http.get(&watch_url)
            .header("Last-Event-ID", last_seen.to_string())
            .send()
            .await?,
    );
    let event = resumed.next_change().await?;
    assert_eq!((event.event.as_str(), event.id), ("put", Some(missed_rev)));
    assert_eq!(event.data["instance"]["instance_id"], "web-2");

    // start_revision replays from the beginning of the history.
    let mut replay = SseReader::new(http.get(format!("{watch_url}&start_revision=1")).send().await?);
    let first = replay.next_change().await?;
    assert_eq!((first.event.as_str(), first.id), ("put", Some(put_rev)));

    // A bad Last-Event-ID is refused, naming it.
    expect_error(
        http.get(&watch_url).header("Last-Event-ID", "yesterday").send().await?,
        StatusCode::BAD_REQUEST,
        "Last-Event-ID",
    )
    .await?;
    expect_error(
        http.get(format!("{}/v1/registry/watch?service=Web", base(&cluster, follower)))
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "service",
    )
    .await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn sse_watch_older_than_the_history_starts_with_a_reset_then_bookmarks_and_frees_its_watcher() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start_with(1, |c| {
        c.watch.history = 4;
        c.watch.progress_interval = Duration::from_millis(200);
    })
    .await?;
    let http = client();
    let node = base(&cluster, 1);
    let mut last = 0;
    for i in 0..8 {
        let answer = ok_json(
            http.post(format!("{node}/v1/registry/services/web/instances"))
                .json(&json!({"instance_id": format!("web-{i}"), "address": "10.0.0.1", "port": 8000 + i}))
                .send()
                .await?,
        )
        .await?;
        last = answer["instance"]["mod_revision"].as_u64().context("mod_revision")?;
    }

    // Revision 1 fell out of the 4-event history: the stream starts with the whole state.
    let mut watch = SseReader::new(
        http.get(format!("{node}/v1/registry/watch?service=web&start_revision=1"))
            .send()
            .await?,
    );
    let reset = watch.next_change().await?;
    assert_eq!((reset.event.as_str(), reset.id), ("reset", Some(last)));
    assert_eq!(reset.data["revision"], last);
    assert_eq!(reset.data["instances"].as_array().map(Vec::len), Some(8));

    // Idle: a progress bookmark whose id a client may resume from.
    let progress = tokio::time::timeout(Duration::from_secs(5), watch.next()).await??;
    assert_eq!((progress.event.as_str(), progress.id), ("progress", Some(last)));

    // Live after the reset.
    ok_json(
        http.delete(format!("{node}/v1/registry/services/web/instances/web-0"))
            .send()
            .await?,
    )
    .await?;
    let deleted = watch.next_change().await?;
    assert_eq!((deleted.event.as_str(), deleted.id), ("delete", Some(last + 1)));

    // A client that goes away does not leave its watcher behind.
    let core = cluster.nodes[&1].handle.as_ref().context("node 1 runs")?.core().clone();
    assert_eq!(core.metrics.watchers.get(), 1);
    drop(watch);
    eventually(Duration::from_secs(5), "the watcher to end", || {
        let core = core.clone();
        async move { Ok(core.metrics.watchers.get() == 0) }
    })
    .await?;
    assert!(core.metrics.watch_resets.get() >= 1);
    cluster.shutdown().await;
    Ok(())
}

/// A request whose body is over the limit: the node answers 413 as soon as it knows
/// and closes the connection, so the client sees the 413 or, when it was still
/// writing the body, a broken pipe. `Ok(None)` for the latter.
async fn oversized(request: reqwest::RequestBuilder) -> Result<Option<reqwest::Response>> {
    match request.send().await {
        Ok(response) => Ok(Some(response)),
        Err(e) if format!("{e:?}").contains("BrokenPipe") || format!("{e:?}").contains("ConnectionReset") => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn action(http: &Client, url: &str, body: Value) -> Result<(StatusCode, Value)> {
    let response = http.post(url).json(&body).send().await?;
    let status = response.status();
    let text = response.text().await?;
    let value = serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?;
    Ok((status, value))
}

#[tokio::test]
async fn action_api_registers_finds_and_lists_agents_and_answers_errors() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let follower = cluster.follower().await?;
    let http = client();
    let url = format!("{}/v1/actions", base(&cluster, follower));

    let (status, registered) = action(
        &http,
        &url,
        json!({
            "action": "register_agent",
            "agent_id": "planner-1",
            "agent_name": "Planner One",
            "host": "10.0.0.7",
            "port": 9000,
            "health_check_port": 9001,
            "agent_type": "planner",
            "capabilities": ["plan", "search"],
            "metadata": {"version": "3", "gpu": true, "slots": 4},
            "client_version": "ignored"
        }),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{registered}");
    assert_eq!(registered["status"], "success");
    assert_eq!(registered["host"], "10.0.0.7");
    assert_eq!(registered["port"], 9000);
    assert_eq!(registered["health_check_port"], 9001);
    assert_eq!(registered["agent_type"], "planner");
    assert_eq!(registered["capabilities"], json!(["plan", "search"]));
    assert_eq!(
        registered["metadata"],
        json!({"version": "3", "gpu": "true", "slots": "4"})
    );
    assert!(registered["last_registered"].as_str().is_some_and(|t| t.ends_with('Z')));
    let revision = registered["revision"].as_u64().context("revision")?;
    action(
        &http,
        &url,
        json!({"action": "register_agent", "agent_name": "coder", "host": "10.0.0.8", "port": 9100, "agent_type": "coder", "capabilities": ["code"]}),
    )
    .await?;

    // Found from another node (read-your-writes), by id and by name.
    let other = format!(
        "{}/v1/actions",
        base(
            &cluster,
            cluster
                .running()
                .into_iter()
                .find(|id| *id != follower)
                .context("node")?
        )
    );
    let (status, found) = action(
        &http,
        &other,
        json!({"action": "get_agent_endpoint", "agent_id": "planner-1", "min_revision": revision}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(
        (found["host"].clone(), found["port"].clone()),
        (json!("10.0.0.7"), json!(9000))
    );
    assert_eq!(found["agent_name"], "Planner One");
    let (status, by_name) = action(
        &http,
        &url,
        json!({"action": "get_agent_endpoint", "agent_name": "coder"}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{by_name}");
    assert_eq!(by_name["port"], 9100);

    let (_, all) = action(&http, &url, json!({"action": "list_agents"})).await?;
    assert_eq!(all["status"], "success");
    assert_eq!(all["count"], 2);
    let (_, planners) = action(&http, &url, json!({"action": "list_agents", "agent_type": "planner"})).await?;
    assert_eq!(planners["count"], 1);
    assert_eq!(planners["agents"][0]["agent_id"], "planner-1");
    let (_, coders) = action(&http, &url, json!({"action": "list_agents", "capabilities": ["code"]})).await?;
    assert_eq!(coders["agents"][0]["agent_id"], "coder");

    // Agents are ordinary instances: the REST API sees them.
    let rest = ok_json(
        http.get(format!(
            "{}/v1/registry/services/agents/instances",
            base(&cluster, follower)
        ))
        .send()
        .await?,
    )
    .await?;
    assert_eq!(ids(&rest), ["coder", "planner-1"]);
    assert_eq!(rest["instances"][1]["ports"]["health"], 9001);

    // Errors: status "error", a message, the field, and a fitting HTTP status.
    for (body, want_status, field) in [
        (json!({"action": "fly_away"}), StatusCode::BAD_REQUEST, "action"),
        (json!({"agent_id": "x"}), StatusCode::BAD_REQUEST, "action"),
        (json!({"action": 7}), StatusCode::BAD_REQUEST, "action"),
        (
            json!({"action": "get_agent_endpoint", "agent_id": "nobody"}),
            StatusCode::NOT_FOUND,
            "agent_id",
        ),
        (
            json!({"action": "get_agent_endpoint"}),
            StatusCode::BAD_REQUEST,
            "agent_id",
        ),
        (
            json!({"action": "register_agent", "agent_id": "a", "host": "h", "port": "9000"}),
            StatusCode::BAD_REQUEST,
            "port",
        ),
        (
            json!({"action": "register_agent", "agent_id": "a", "host": "h", "port": 70000}),
            StatusCode::BAD_REQUEST,
            "port",
        ),
        (
            json!({"action": "register_agent", "agent_id": "a b", "host": "h", "port": 1}),
            StatusCode::BAD_REQUEST,
            "agent_id",
        ),
        (
            json!({"action": "register_agent", "agent_id": "a", "port": 1}),
            StatusCode::BAD_REQUEST,
            "host",
        ),
        (
            json!({"action": "register_agent", "agent_id": "a", "host": "h", "port": 1, "capabilities": "plan"}),
            StatusCode::BAD_REQUEST,
            "capabilities",
        ),
        (
            json!({"action": "register_agent", "agent_id": "a", "host": "h", "port": 1, "capabilities": ["ok", ""]}),
            StatusCode::BAD_REQUEST,
            "capabilities[1]",
        ),
        (
            json!({"action": "register_agent", "agent_id": "a", "host": "bad host", "port": 1}),
            StatusCode::BAD_REQUEST,
            "host",
        ),
    ] {
        let (status, answer) = action(&http, &url, body.clone()).await?;
        assert_eq!(status, want_status, "{body} -> {answer}");
        assert_eq!(answer["status"], "error", "{body} -> {answer}");
        assert_eq!(answer["field"], field, "{body} -> {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
    }
    let response = http.post(&url).body("{\"action\": \"list_agents\"").send().await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let answer: Value = response.json().await?;
    assert_eq!(
        (answer["status"].clone(), answer["field"].clone()),
        (json!("error"), json!("body"))
    );

    let (status, gone) = action(&http, &url, json!({"action": "deregister_agent", "agent_id": "coder"})).await?;
    assert_eq!(status, StatusCode::OK, "{gone}");
    let (_, all) = action(
        &http,
        &url,
        json!({"action": "list_agents", "min_revision": gone["revision"]}),
    )
    .await?;
    assert_eq!(all["count"], 1);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn bad_input_answers_400_or_413_naming_the_field_and_the_node_keeps_serving() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(1).await?;
    let http = client();
    let node = base(&cluster, 1);
    let register = format!("{node}/v1/registry/services/web/instances");
    let post = |body: &'static str| {
        http.post(&register)
            .header("content-type", "application/json")
            .body(body)
    };

    expect_error(
        post(r#"{"instance_id": "web-1", "address": "#).send().await?,
        StatusCode::BAD_REQUEST,
        "body",
    )
    .await?;
    expect_error(post("").send().await?, StatusCode::BAD_REQUEST, "body").await?;
    expect_error(post("[1, 2]").send().await?, StatusCode::BAD_REQUEST, "body").await?;
    expect_error(
        post(r#"{"instance_id": "web-1", "address": "10.0.0.1", "port": "8080"}"#)
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "port",
    )
    .await?;
    expect_error(
        post(r#"{"instance_id": "web-1", "address": "10.0.0.1", "port": 8080, "tags": ["a", 2]}"#)
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "tags[1]",
    )
    .await?;
    expect_error(
        post(r#"{"instance_id": "web-1", "address": "10.0.0.1", "port": 8080, "adress": "x"}"#)
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "adress",
    )
    .await?;
    expect_error(
        post(r#"{"instance_id": "web-1", "address": "10.0.0.1", "port": 0}"#)
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "port",
    )
    .await?;
    expect_error(
        post(r#"{"instance_id": "web 1", "address": "10.0.0.1", "port": 80}"#)
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "instance_id",
    )
    .await?;
    expect_error(
        post(r#"{"instance_id": "web-1", "address": "10.0.0.1", "port": 80, "ttl": "ten"}"#)
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "ttl",
    )
    .await?;
    expect_error(
        post(r#"{"instance_id": "web-1", "address": "10.0.0.1", "port": 80, "ttl": "10ms"}"#)
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "ttl",
    )
    .await?;
    expect_error(
        post(r#"{"instance_id": "web-1", "address": "10.0.0.1", "port": 80, "health": "sleepy"}"#)
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "health",
    )
    .await?;
    expect_error(
        http.post(format!("{node}/v1/registry/services/Web_Service/instances"))
            .json(&json!({"instance_id": "w", "address": "10.0.0.1", "port": 80}))
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "service",
    )
    .await?;
    expect_error(
        http.get(format!("{node}/v1/registry/services/{}/instances", "a".repeat(64)))
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "service",
    )
    .await?;
    expect_error(
        http.get(&register).query(&[("tags", "v1")]).send().await?,
        StatusCode::BAD_REQUEST,
        "tags",
    )
    .await?;
    expect_error(
        http.get(&register).query(&[("min_revision", "-1")]).send().await?,
        StatusCode::BAD_REQUEST,
        "min_revision",
    )
    .await?;
    expect_error(
        http.get(&register).query(&[("consistency", "eventual")]).send().await?,
        StatusCode::BAD_REQUEST,
        "consistency",
    )
    .await?;
    expect_error(
        http.put(format!("{node}/v1/registry/leases/abc/keepalive"))
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "lease_id",
    )
    .await?;
    expect_error(
        http.post(format!("{node}/v1/registry/leases"))
            .json(&json!({}))
            .send()
            .await?,
        StatusCode::BAD_REQUEST,
        "ttl",
    )
    .await?;

    // Oversized bodies: declared (refused before reading) and streamed (cut off).
    let big = format!(
        r#"{{"instance_id": "web-1", "address": "10.0.0.1", "port": 80, "metadata": {{"pad": "{}"}}}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    if let Some(response) = oversized(http.post(&register).body(big.clone())).await? {
        expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "body").await?;
    }
    let chunks: Vec<reqwest::Result<Vec<u8>>> = big.into_bytes().chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
    let streamed = oversized(
        http.post(&register)
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks))),
    )
    .await?;
    if let Some(response) = streamed {
        expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "body").await?;
    }
    let big_action = json!({"action": "register_agent", "agent_id": "a", "host": "h", "port": 1, "metadata": {"pad": "x".repeat(2 * 1024 * 1024)}});
    if let Some(response) = oversized(http.post(format!("{node}/v1/actions")).json(&big_action)).await? {
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    // Nothing broke: the node serves, and a good registration goes through.
    assert_eq!(
        http.get(format!("{node}/healthz")).send().await?.status(),
        StatusCode::OK
    );
    let ok = ok_json(
        post(r#"{"instance_id": "web-1", "address": "10.0.0.1", "port": 80}"#)
            .send()
            .await?,
    )
    .await?;
    assert_eq!(ok["instance"]["instance_id"], "web-1");
    let listed = ok_json(http.get(&register).send().await?).await?;
    assert_eq!(ids(&listed), ["web-1"]);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn readyz_is_unready_without_a_quorum_and_ready_again_once_it_returns() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    let http = client();
    for id in cluster.running() {
        let url = format!("{}/readyz", base(&cluster, id));
        let http = http.clone();
        eventually(Duration::from_secs(10), "every node ready", || {
            let (http, url) = (http.clone(), url.clone());
            async move { Ok(http.get(&url).send().await?.status() == StatusCode::OK) }
        })
        .await?;
        let health = ok_json(http.get(format!("{}/health", base(&cluster, id))).send().await?).await?;
        for field in [
            "node",
            "role",
            "leader",
            "term",
            "revision",
            "applied_index",
            "commit_index",
            "lag",
        ] {
            assert!(!health[field].is_null(), "/health lacks {field}: {health}");
        }
        assert_eq!(health["ready"], true);
        assert_eq!(
            http.get(format!("{}/healthz", base(&cluster, id)))
                .send()
                .await?
                .status(),
            StatusCode::OK
        );
    }

    // Leave one node alone: it can no longer hear from a quorum and stops being ready.
    let survivor = cluster.follower().await?;
    for id in cluster.running() {
        if id != survivor {
            cluster.stop(id).await;
        }
    }
    let url = format!("{}/readyz", base(&cluster, survivor));
    eventually(Duration::from_secs(15), "the lone node unready", || {
        let (http, url) = (http.clone(), url.clone());
        async move { Ok(http.get(&url).send().await?.status() == StatusCode::SERVICE_UNAVAILABLE) }
    })
    .await?;
    let answer = json_with(http.get(&url).send().await?, StatusCode::SERVICE_UNAVAILABLE).await?;
    assert_eq!(answer["ready"], false);
    assert!(answer["reason"].is_string());
    // Still alive, just not ready.
    assert_eq!(
        http.get(format!("{}/healthz", base(&cluster, survivor)))
            .send()
            .await?
            .status(),
        StatusCode::OK
    );

    // A quorum again: both the survivor and the restarted node become ready.
    let back = cluster
        .nodes
        .keys()
        .copied()
        .find(|id| *id != survivor)
        .context("a stopped node")?;
    cluster.restart(back).await?;
    for id in [survivor, back] {
        let url = format!("{}/readyz", base(&cluster, id));
        eventually(Duration::from_secs(15), "ready again", || {
            let (http, url) = (http.clone(), url.clone());
            async move { Ok(http.get(&url).send().await?.status() == StatusCode::OK) }
        })
        .await?;
    }
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_method_and_pass_promtool() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(1).await?;
    let http = client();
    let node = base(&cluster, 1);
    ok_json(
        http.post(format!("{node}/v1/registry/services/web/instances"))
            .json(&json!({"instance_id": "web-1", "address": "10.0.0.1", "port": 80, "ttl": "30s"}))
            .send()
            .await?,
    )
    .await?;
    ok_json(
        http.get(format!("{node}/v1/registry/services/web/instances"))
            .send()
            .await?,
    )
    .await?;
    // Unknown paths and wrong methods answer in the API's error shape.
    let unknown = http.get(format!("{node}/no/such/path")).send().await?;
    assert_eq!(unknown.status(), 404);
    let body: serde_json::Value = unknown.json().await?;
    assert_eq!(body["error"]["field"], "path", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("/no/such/path"),
        "{body}"
    );
    let wrong_method = http.delete(format!("{node}/readyz")).send().await?;
    assert_eq!(wrong_method.status(), 405);
    let body: serde_json::Value = wrong_method.json().await?;
    assert_eq!(body["error"]["field"], "method", "{body}");
    let mut grpc = cluster.registry(1).await?;
    grpc.list_services(pb::ListServicesRequest::default()).await?;
    let _ = grpc
        .discover(pb::DiscoverRequest {
            service: "Not A Label".into(),
            ..Default::default()
        })
        .await;

    let response = http.get(format!("{node}/metrics")).send().await?;
    assert!(response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain; version=0.0.4")));
    let text = response.text().await?;
    for needle in [
        r#"muster_http_requests_total{method="POST",route="/v1/registry/services/{service}/instances",status="200"} 1"#,
        r#"muster_http_requests_total{method="GET",route="unmatched",status="404"} 1"#,
        r#"muster_http_request_duration_seconds_count{method="GET",route="/v1/registry/services/{service}/instances"} 1"#,
        r#"muster_grpc_requests_total{method="/muster.v1.Registry/ListServices",code="Ok"} 1"#,
        r#"muster_grpc_requests_total{method="/muster.v1.Registry/Discover",code="InvalidArgument"} 1"#,
        r#"muster_grpc_request_duration_seconds_count{method="/muster.v1.Registry/ListServices"} 1"#,
        "muster_raft_term ",
        "muster_raft_leader_id 1",
        "muster_raft_commit_index ",
        "muster_raft_applied_index ",
        "muster_instances 1",
        "muster_services 1",
        "muster_leases 1",
        "muster_lease_expirations_total ",
        "muster_watchers ",
        "muster_watch_events_sent_total ",
        "muster_watch_resets_total ",
        "muster_forwarded_writes_total ",
        "muster_ready 1",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle:?}:\n{text}");
    }
    // Prometheus asks for OpenMetrics and gets it.
    let om = http
        .get(format!("{node}/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await?
        .text()
        .await?;
    assert!(om.trim_end().ends_with("# EOF"));

    promtool_check(&text)?;
    cluster.shutdown().await;
    Ok(())
}
