//! The Consul-compatible HTTP API against an in-process three-node cluster (real
//! sockets, fsynced logs, sled on disk), spoken to over HTTP: by `reqwest` for each
//! endpoint family, and by real third-party clients: the `py-consul` package and a
//! Prometheus server discovering scrape targets with `consul_sd_configs`.
//!
//! The third-party tests need `python3` with py-consul, and `prometheus` (Debian's
//! package, or the binary named by `PROMETHEUS_BIN`). When one is missing they print
//! a loud SKIPPED line and pass, unless `MUSTER_REQUIRE_EXTERNAL=1` (CI sets it), in
//! which case they fail. Debian builds Prometheus without Consul service discovery
//! (its Go client is not packaged); the Prometheus test detects that with `promtool`
//! and skips loudly whatever the setting, since no package offers a build with it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use muster_testkit::{eventually, init_tracing, TestCluster};
use muster_tests::{missing, python_has, run_python_check};
use serde_json::{json, Value};

/// A Consul API client for one node.
struct Consul {
    http: reqwest::Client,
    base: String,
}

/// One answer: status, `X-Consul-Index` (if sent) and the body.
struct Answer {
    status: u16,
    index: Option<u64>,
    known_leader: Option<String>,
    /// The `Connection` header.
    connection: Option<String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {:?}", self.body))
    }
}

impl Consul {
    fn new(addr: SocketAddr) -> Self {
        Consul {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        }
    }

    fn on(cluster: &TestCluster, id: u64) -> Self {
        Self::new(cluster.nodes[&id].config.http_addr)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer> {
        let response = request.timeout(Duration::from_secs(60)).send().await?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let index = header("X-Consul-Index").map(|v| v.parse()).transpose()?;
        let known_leader = header("X-Consul-KnownLeader");
        let connection = header("Connection");
        let status = response.status().as_u16();
        Ok(Answer {
            status,
            index,
            known_leader,
            connection,
            body: response.text().await?,
        })
    }

    async fn get(&self, path: &str) -> Result<Answer> {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    async fn put(&self, path: &str, body: &Value) -> Result<Answer> {
        self.send(self.http.put(format!("{}{path}", self.base)).body(body.to_string()))
            .await
    }

    async fn put_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Result<Answer> {
        self.send(self.http.put(format!("{}{path}", self.base)).body(body))
            .await
    }

    /// Registers and expects Consul's empty 200.
    async fn register(&self, body: Value) -> Result<()> {
        let a = self.put("/v1/agent/service/register", &body).await?;
        if a.status != 200 {
            bail!("register answered {}: {}", a.status, a.body);
        }
        Ok(())
    }

    /// `/v1/health/service/:name` entries.
    async fn health(&self, query: &str) -> Result<(u64, Vec<Value>)> {
        let a = self.get(&format!("/v1/health/service/{query}")).await?;
        if a.status != 200 {
            bail!("health answered {}: {}", a.status, a.body);
        }
        let index = a.index.context("no X-Consul-Index on a health read")?;
        let Value::Array(entries) = a.json()? else {
            bail!("health did not answer a list: {}", a.body)
        };
        Ok((index, entries))
    }

    /// Status of one check as `/v1/agent/checks` shows it.
    async fn check(&self, check_id: &str) -> Result<Option<(String, String)>> {
        let checks = self.get("/v1/agent/checks").await?.json()?;
        Ok(checks.get(check_id).map(|c| {
            (
                c["Status"].as_str().unwrap_or_default().to_string(),
                c["Output"].as_str().unwrap_or_default().to_string(),
            )
        }))
    }
}

fn ids(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["Service"]["ID"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn web(id: &str, port: u16) -> Value {
    json!({"ID": id, "Name": "web", "Address": "10.0.0.1", "Port": port, "Tags": ["v1", "blue"], "Meta": {"version": "1"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_shows_in_catalog_health_and_agent_endpoints_on_the_node_that_took_it() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let c = Consul::on(&cluster, cluster.follower().await?);

    let a = c.put("/v1/agent/service/register", &web("web-1", 8080)).await?;
    assert_eq!((a.status, a.body.as_str()), (200, ""), "writes answer an empty 200");
    c.register(web("web-2", 8081)).await?;

    // Read-your-writes on the node that took the write, with no waiting.
    let services = c.get("/v1/catalog/services").await?;
    assert_eq!(services.status, 200);
    assert!(services.index.is_some(), "catalog/services carries X-Consul-Index");
    assert_eq!(services.known_leader.as_deref(), Some("true"));
    assert_eq!(services.json()?, json!({"web": ["v1", "blue"]}));

    let catalog = c.get("/v1/catalog/service/web").await?;
    assert!(catalog.index.is_some());
    let catalog = catalog.json()?;
    assert_eq!(catalog[0]["ServiceID"], "web-1");
    assert_eq!(catalog[0]["ServiceName"], "web");
    assert_eq!(catalog[0]["ServiceAddress"], "10.0.0.1");
    assert_eq!(catalog[0]["ServicePort"], 8080);
    assert_eq!(catalog[0]["ServiceMeta"]["version"], "1");
    assert_eq!(catalog[1]["ServiceID"], "web-2");

    let (_, entries) = c.health("web").await?;
    assert_eq!(ids(&entries), ["web-1", "web-2"]);
    assert_eq!(entries[0]["Node"]["Address"], "10.0.0.1");
    assert_eq!(entries[0]["Checks"], json!([]), "no checks: healthy, nothing to show");

    let agent = c.get("/v1/agent/services").await?.json()?;
    assert_eq!(agent["web-1"]["Service"], "web");
    assert_eq!(agent["web-2"]["Port"], 8081);
    let one = c.get("/v1/agent/service/web-2").await?;
    assert_eq!((one.status, one.json()?["ID"].clone()), (200, json!("web-2")));
    assert_eq!(c.get("/v1/agent/service/nope").await?.status, 404);

    // Every node serves the same data (replicated through Raft).
    for id in cluster.running() {
        let other = Consul::on(&cluster, id);
        eventually(Duration::from_secs(5), "replication to every node", || async {
            Ok(ids(&other.health("web").await?.1) == ["web-1", "web-2"])
        })
        .await?;
    }

    let a = c.put("/v1/agent/service/deregister/web-1", &json!(null)).await?;
    assert_eq!((a.status, a.body.as_str()), (200, ""));
    assert_eq!(ids(&c.health("web").await?.1), ["web-2"]);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowercase_keys_snake_case_aliases_and_tag_filters_work_as_in_consul() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let c = Consul::on(&cluster, cluster.wait_for_leader(Duration::from_secs(10)).await?);
    // py-consul's shape: lowercase keys, a `checks` list, a Go-marshalled duration.
    c.register(json!({
        "name": "api", "id": "api-1", "address": "10.0.0.2", "port": 9000, "tags": ["a", "b"],
        "meta": {"team": "core"}, "enabletagoverride": true,
        "checks": [{"ttl": "30s", "deregister_critical_service_after": 3_600_000_000_000u64}]
    }))
    .await?;
    c.register(json!({"Name": "api", "ID": "api-2", "Address": "10.0.0.3", "Port": 9000, "Tags": ["a"]}))
        .await?;

    let (_, all) = c.health("api").await?;
    assert_eq!(ids(&all), ["api-1", "api-2"]);
    assert_eq!(all[0]["Checks"][0]["CheckID"], "service:api-1");
    assert_eq!(all[0]["Checks"][0]["Status"], "critical");
    assert_eq!(all[0]["Service"]["Meta"]["team"], "core");

    assert_eq!(ids(&c.health("api?tag=a").await?.1), ["api-1", "api-2"]);
    assert_eq!(
        ids(&c.health("api?tag=a&tag=b").await?.1),
        ["api-1"],
        "several tags: all of them"
    );
    assert_eq!(ids(&c.health("api?tag=b&tag=c").await?.1), Vec::<String>::new());
    assert_eq!(
        ids(&c.health("api?passing").await?.1),
        ["api-2"],
        "?passing leaves out the critical one"
    );
    assert_eq!(ids(&c.health("api?passing=1&tag=a").await?.1), ["api-2"]);
    let catalog = c.get("/v1/catalog/service/api?tag=b").await?.json()?;
    assert_eq!(catalog.as_array().map(Vec::len), Some(1));
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_check_starts_critical_passes_and_turns_critical_when_its_ttl_runs_out() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let follower = cluster.follower().await?;
    let c = Consul::on(&cluster, follower);
    c.register(json!({"Name": "ttl", "ID": "ttl-1", "Address": "10.0.0.1", "Port": 80, "Check": {"TTL": "1s"}}))
        .await?;
    let check = "service:ttl-1";
    assert_eq!(c.check(check).await?, Some(("critical".into(), String::new())));
    assert_eq!(c.health("ttl?passing").await?.1.len(), 0);

    // Reported through a follower: forwarded to the leader, which keeps the TTL.
    let a = c
        .put_raw(&format!("/v1/agent/check/pass/{check}?note=ready"), "")
        .await?;
    assert_eq!((a.status, a.body.as_str()), (200, ""));
    assert_eq!(c.check(check).await?, Some(("passing".into(), "ready".into())));
    assert_eq!(ids(&c.health("ttl?passing").await?.1), ["ttl-1"]);

    eventually(Duration::from_secs(10), "the check to expire", || async {
        Ok(c.check(check).await? == Some(("critical".into(), "TTL expired".into())))
    })
    .await?;
    let (_, entries) = c.health("ttl").await?;
    assert_eq!(entries[0]["Checks"][0]["Status"], "critical");

    // A report brings it back.
    c.put_raw(&format!("/v1/agent/check/pass/{check}"), "").await?;
    assert_eq!(c.check(check).await?.map(|s| s.0), Some("passing".into()));
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warn_fail_and_update_set_the_status_and_output_of_numbered_checks_listed_by_state() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let c = Consul::on(&cluster, cluster.follower().await?);
    c.register(json!({
        "Name": "multi", "ID": "m1", "Address": "10.0.0.1", "Port": 80,
        "Checks": [{"TTL": "1m", "Status": "passing"}, {"TTL": "1m", "Status": "passing"}]
    }))
    .await?;
    assert_eq!(c.check("service:m1:1").await?.map(|s| s.0), Some("passing".into()));
    assert_eq!(c.check("service:m1:2").await?.map(|s| s.0), Some("passing".into()));

    c.put_raw("/v1/agent/check/warn/service:m1:2?note=slow", "").await?;
    assert_eq!(c.check("service:m1:2").await?, Some(("warning".into(), "slow".into())));
    let (_, entries) = c.health("multi").await?;
    assert_eq!(entries[0]["Checks"][1]["Status"], "warning");
    assert_eq!(c.health("multi?passing").await?.1.len(), 0, "warning is not passing");

    c.put_raw("/v1/agent/check/fail/service:m1:1?note=down", "").await?;
    assert_eq!(c.check("service:m1:1").await?, Some(("critical".into(), "down".into())));

    let a = c
        .put(
            "/v1/agent/check/update/service:m1:1",
            &json!({"Status": "passing", "Output": "back"}),
        )
        .await?;
    assert_eq!(a.status, 200);
    assert_eq!(c.check("service:m1:1").await?, Some(("passing".into(), "back".into())));
    let checks = c.get("/v1/health/checks/multi").await?;
    assert!(checks.index.is_some());
    let checks = checks.json()?;
    assert_eq!(checks[0]["CheckID"], "service:m1:1");
    assert_eq!(checks[1]["Status"], "warning");

    // Checks by state, across services; `any` is all of them.
    let in_state = |state: &'static str| {
        let c = &c;
        async move {
            let answer = c.get(&format!("/v1/health/state/{state}")).await?;
            assert!(answer.index.is_some(), "{state}: {}", answer.body);
            let ids: Vec<String> = answer
                .json()?
                .as_array()
                .context("an array")?
                .iter()
                .map(|check| check["CheckID"].as_str().unwrap_or_default().to_owned())
                .collect();
            anyhow::Ok(ids)
        }
    };
    assert_eq!(in_state("warning").await?, ["service:m1:2"]);
    assert_eq!(in_state("passing").await?, ["service:m1:1"]);
    assert_eq!(in_state("critical").await?, Vec::<String>::new());
    assert_eq!(in_state("any").await?, ["service:m1:1", "service:m1:2"]);
    let bad = c.get("/v1/health/state/broken").await?;
    assert_eq!(bad.status, 400);
    assert!(
        bad.body.contains("state") && bad.body.contains("critical"),
        "{}",
        bad.body
    );
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_service_health_answers_the_status_code_a_load_balancer_probe_reads() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let c = Consul::on(&cluster, cluster.follower().await?);
    for id in ["p1", "p2"] {
        c.register(json!({
            "Name": "probed", "ID": id, "Address": "10.0.0.1", "Port": 80,
            "Check": {"TTL": "1m", "Status": "passing"}
        }))
        .await?;
    }
    let by_id = c.get("/v1/agent/health/service/id/p1").await?;
    assert_eq!(by_id.status, 200, "{}", by_id.body);
    let entry = by_id.json()?;
    assert_eq!(entry["AggregatedStatus"], "passing");
    assert_eq!(entry["Service"]["ID"], "p1");
    assert_eq!(entry["Checks"][0]["CheckID"], "service:p1");
    assert_eq!(c.get("/v1/agent/health/service/name/probed").await?.status, 200);

    // The worst instance sets the code of the service: 429 warning, 503 critical.
    c.put_raw("/v1/agent/check/warn/service:p2?note=slow", "").await?;
    let by_name = c.get("/v1/agent/health/service/name/probed").await?;
    assert_eq!(by_name.status, 429, "{}", by_name.body);
    let statuses: Vec<Value> = by_name
        .json()?
        .as_array()
        .context("an array")?
        .iter()
        .map(|e| e["AggregatedStatus"].clone())
        .collect();
    assert_eq!(statuses, [json!("passing"), json!("warning")]);
    assert_eq!(c.get("/v1/agent/health/service/id/p1").await?.status, 200);
    c.put_raw("/v1/agent/check/fail/service:p1?note=down", "").await?;
    let text = c.get("/v1/agent/health/service/id/p1?format=text").await?;
    assert_eq!((text.status, text.body.as_str()), (503, "critical"));
    let text = c.get("/v1/agent/health/service/name/probed?format=text").await?;
    assert_eq!((text.status, text.body.as_str()), (503, "critical"));

    // Unknown ids and names are 404, other formats 400.
    let missing = c.get("/v1/agent/health/service/id/nope").await?;
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert!(missing.body.contains("nope"), "{}", missing.body);
    assert_eq!(c.get("/v1/agent/health/service/name/nothing").await?.status, 404);
    let bad = c.get("/v1/agent/health/service/id/p1?format=xml").await?;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("format"), "{}", bad.body);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_takes_an_instance_out_of_passing_reads_on_every_node_until_it_ends() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let c = Consul::on(&cluster, cluster.follower().await?);
    let leader = Consul::on(&cluster, cluster.wait_for_leader(Duration::from_secs(10)).await?);
    c.register(json!({
        "Name": "maint", "ID": "m1", "Address": "10.0.0.1", "Port": 80,
        "Check": {"TTL": "1m", "Status": "passing"}
    }))
    .await?;
    c.register(json!({"Name": "maint", "ID": "m2", "Address": "10.0.0.2", "Port": 80}))
        .await?;
    let (before, passing) = c.health("maint?passing").await?;
    assert_eq!(ids(&passing), ["m1", "m2"]);

    let a = c
        .put_raw("/v1/agent/service/maintenance/m1?enable=true&reason=kernel+upgrade", "")
        .await?;
    assert_eq!(a.status, 200, "{}", a.body);
    let (after, passing) = c.health("maint?passing").await?;
    assert!(after > before, "the index moves: {after} > {before}");
    assert_eq!(ids(&passing), ["m2"]);
    let (_, consistent) = leader.health("maint?passing&consistent").await?;
    assert_eq!(ids(&consistent), ["m2"], "the leader sees it too");
    let (_, all) = c.health("maint").await?;
    let checks = all[0]["Checks"].as_array().context("checks")?;
    let check_ids: Vec<&str> = checks.iter().filter_map(|c| c["CheckID"].as_str()).collect();
    assert_eq!(check_ids, ["service:m1", "_service_maintenance:m1"]);
    let m = &checks[1];
    assert_eq!(
        (&m["Status"], &m["Notes"], &m["Type"], &m["ServiceID"]),
        (
            &json!("critical"),
            &json!("kernel upgrade"),
            &json!("maintenance"),
            &json!("m1")
        )
    );
    assert_eq!(c.get("/v1/agent/health/service/id/m1").await?.status, 503);

    // The TTL check still takes reports; the maintenance check takes none.
    let a = c.put_raw("/v1/agent/check/warn/service:m1?note=slow", "").await?;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = c.put_raw("/v1/agent/check/pass/_service_maintenance:m1", "").await?;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.starts_with("Invalid CheckID"), "{}", a.body);

    // Bad requests name what is wrong and change nothing.
    for (query, status, start) in [
        ("m1", 400, "Invalid enable"),
        ("m1?enable=maybe", 400, "Invalid enable"),
        ("nope?enable=true", 404, "No service registered"),
    ] {
        let a = c.put_raw(&format!("/v1/agent/service/maintenance/{query}"), "").await?;
        assert_eq!(a.status, status, "{query}: {}", a.body);
        assert!(a.body.starts_with(start), "{query}: {}", a.body);
    }
    let long = "x".repeat(1025);
    let a = c
        .put_raw(
            &format!("/v1/agent/service/maintenance/m2?enable=true&reason={long}"),
            "",
        )
        .await?;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.starts_with("Invalid reason"), "{}", a.body);

    // Ending it gives back the health the TTL check has now: warning.
    let a = c.put_raw("/v1/agent/service/maintenance/m1?enable=false", "").await?;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(c.check("_service_maintenance:m1").await?, None);
    assert_eq!(c.check("service:m1").await?, Some(("warning".into(), "slow".into())));
    assert_eq!(c.get("/v1/agent/health/service/id/m1").await?.status, 429);
    let (_, passing) = c.health("maint?passing").await?;
    assert_eq!(ids(&passing), ["m2"]);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_the_addresses_instances_run_on() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let c = Consul::on(&cluster, cluster.follower().await?);
    for (name, id, address) in [
        ("x", "a1", "10.0.0.1"),
        ("y", "a2", "10.0.0.1"),
        ("x", "b1", "10.0.0.2"),
    ] {
        c.register(json!({
            "Name": name, "ID": id, "Address": address, "Port": 80,
            "Check": {"TTL": "1m", "Status": "passing"}
        }))
        .await?;
    }
    assert_eq!(c.get("/v1/catalog/datacenters").await?.json()?, json!(["dc1"]));

    let nodes = c.get("/v1/catalog/nodes").await?;
    assert!(nodes.index.is_some());
    let names: Vec<Value> = nodes
        .json()?
        .as_array()
        .context("an array")?
        .iter()
        .map(|n| n["Node"].clone())
        .collect();
    assert_eq!(names, [json!("10.0.0.1"), json!("10.0.0.2")]);

    let node = c.get("/v1/catalog/node/10.0.0.1").await?.json()?;
    assert_eq!(node["Node"]["Address"], "10.0.0.1");
    let services: Vec<&String> = node["Services"].as_object().context("a map")?.keys().collect();
    assert_eq!(services, ["a1", "a2"]);
    assert_eq!(node["Services"]["a2"]["Service"], "y");
    // An unknown node is `null`, as Consul answers it.
    let unknown = c.get("/v1/catalog/node/10.9.9.9").await?;
    assert_eq!((unknown.status, unknown.body.as_str()), (200, "null"));

    let checks = c.get("/v1/health/node/10.0.0.2").await?.json()?;
    assert_eq!(checks.as_array().map(Vec::len), Some(1), "{checks}");
    assert_eq!(checks[0]["CheckID"], "service:b1");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregister_critical_service_after_removes_an_instance_left_critical() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let c = Consul::on(&cluster, cluster.follower().await?);
    c.register(json!({
        "Name": "doomed", "ID": "d2", "Address": "10.0.0.2", "Port": 80,
        "Check": {"TTL": "1m", "DeregisterCriticalServiceAfter": "2s", "Status": "passing"}
    }))
    .await?;
    // Passing at first, d1 turns critical when its TTL runs out (1 s) and goes 2 s
    // later: registered last, it is still there for the read right after.
    c.register(json!({
        "Name": "doomed", "ID": "d1", "Address": "10.0.0.1", "Port": 80,
        "Check": {"TTL": "1s", "DeregisterCriticalServiceAfter": "2s", "Status": "passing"}
    }))
    .await?;
    assert_eq!(ids(&c.health("doomed").await?.1), ["d1", "d2"]);
    eventually(
        Duration::from_secs(15),
        "the critical instance to be removed",
        || async { Ok(ids(&c.health("doomed").await?.1) == ["d2"]) },
    )
    .await?;
    // The passing one stays.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ids(&c.health("doomed").await?.1), ["d2"]);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_query_returns_when_its_service_changes_and_not_when_another_does() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let c = Consul::on(&cluster, cluster.follower().await?);
    c.register(json!({"Name": "alpha", "ID": "a1", "Address": "10.0.0.1", "Port": 80}))
        .await?;
    let (index, _) = c.health("alpha").await?;

    let blocked = {
        let c = Consul::new(cluster.nodes[&cluster.follower().await?].config.http_addr);
        tokio::spawn(async move { c.health(&format!("alpha?index={index}&wait=30s")).await })
    };
    // Another service changes, again and again: the query on alpha keeps waiting.
    for n in 0..5 {
        c.register(json!({"Name": "beta", "ID": format!("b{n}"), "Address": "10.0.0.9", "Port": 80}))
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !blocked.is_finished(),
        "a change to beta woke a blocking query on alpha"
    );

    c.register(json!({"Name": "alpha", "ID": "a2", "Address": "10.0.0.2", "Port": 80}))
        .await?;
    let (new_index, entries) = tokio::time::timeout(Duration::from_secs(10), blocked)
        .await
        .context("the blocking query did not return after its service changed")???;
    assert!(new_index > index, "{new_index} > {index}");
    assert_eq!(ids(&entries), ["a1", "a2"]);

    // Nothing changes: it answers after its wait with the same index.
    let started = tokio::time::Instant::now();
    let (same, _) = c.health(&format!("alpha?index={new_index}&wait=1s")).await?;
    assert_eq!(same, new_index);
    assert!(started.elapsed() >= Duration::from_secs(1));

    // An index the client has not seen yet (an old one) answers at once.
    let (now, _) = c.health(&format!("alpha?index={index}&wait=30s")).await?;
    assert_eq!(now, new_index);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_query_returns_when_its_service_disappears_and_catalog_services_blocks_too() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let c = Consul::on(&cluster, cluster.follower().await?);
    c.register(json!({"Name": "gone", "ID": "g1", "Address": "10.0.0.1", "Port": 80}))
        .await?;
    let (index, _) = c.health("gone").await?;
    let services = c.get("/v1/catalog/services").await?;
    let services_index = services.index.context("no index")?;

    let on_service = {
        let c = Consul::new(cluster.nodes[&cluster.follower().await?].config.http_addr);
        tokio::spawn(async move { c.health(&format!("gone?index={index}&wait=30s")).await })
    };
    let on_catalog = {
        let c = Consul::new(cluster.nodes[&cluster.follower().await?].config.http_addr);
        tokio::spawn(async move {
            c.get(&format!("/v1/catalog/services?index={services_index}&wait=30s"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!on_service.is_finished() && !on_catalog.is_finished());
    c.put("/v1/agent/service/deregister/g1", &json!(null)).await?;

    let (after, entries) = tokio::time::timeout(Duration::from_secs(10), on_service).await???;
    assert!(after > index);
    assert!(entries.is_empty());
    let catalog = tokio::time::timeout(Duration::from_secs(10), on_catalog).await???;
    assert!(catalog.index.context("no index")? > services_index);
    assert_eq!(catalog.json()?, json!({}));

    // The index of a service that is gone never falls back below the removal.
    let (still, _) = c.health("gone").await?;
    assert!(still >= after);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_check_stays_passing_across_a_leader_change_and_reports_reach_the_new_leader() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let survivor = cluster.follower().await?;
    let c = Consul::on(&cluster, survivor);
    c.register(json!({"Name": "steady", "ID": "s1", "Address": "10.0.0.1", "Port": 80, "Check": {"TTL": "3s"}}))
        .await?;
    c.put_raw("/v1/agent/check/pass/service:s1", "").await?;

    cluster.stop(leader).await;
    let new_leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    assert_ne!(new_leader, leader);
    // The new leader gives the check its full TTL: no flap to critical on election.
    for _ in 0..10 {
        assert_eq!(c.check("service:s1").await?.map(|s| s.0), Some("passing".into()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // With nobody reporting, the new leader expires it ...
    eventually(Duration::from_secs(15), "expiry under the new leader", || async {
        Ok(c.check("service:s1").await?.map(|s| s.0) == Some("critical".into()))
    })
    .await?;
    // ... and a report through any node reaches it.
    for id in cluster.running() {
        let a = Consul::on(&cluster, id)
            .put_raw("/v1/agent/check/pass/service:s1", "")
            .await?;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert_eq!(c.check("service:s1").await?.map(|s| s.0), Some("passing".into()));
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_answers_400_naming_the_field_and_unknown_ids_404_and_the_node_keeps_serving() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let c = Consul::on(&cluster, cluster.follower().await?);
    let bad = |body: Value| {
        let c = &c;
        async move { c.put("/v1/agent/service/register", &body).await }
    };
    for (body, field) in [
        (json!({"Name": "Web_Service", "Port": 80}), "Invalid Name"),
        (json!({"Port": 80}), "Invalid Name"),
        (json!({"Name": "web", "Port": "80"}), "Invalid Port"),
        (json!({"Name": "web", "Port": 70000}), "Invalid Port"),
        (json!({"Name": "web", "Port": 80, "ID": "a b"}), "Invalid ID"),
        (
            json!({"Name": "web", "Port": 80, "Tags": ["ok", ""]}),
            "Invalid Tags[1]",
        ),
        (json!({"Name": "web", "Port": 80, "Meta": {"k": 1}}), "Invalid Meta"),
        (
            json!({"Name": "web", "Port": 80, "Check": {"TTL": "10"}}),
            "Invalid Check.TTL",
        ),
        (
            json!({"Name": "web", "Port": 80, "Check": {"TTL": "100ms"}}),
            "Invalid Check.TTL",
        ),
        (
            json!({"Name": "web", "Port": 80, "Checks": [{"TTL": "1s"}, {"TTL": "1s", "DeregisterCriticalServiceAfter": true}]}),
            "Invalid Checks[1].DeregisterCriticalServiceAfter",
        ),
        (
            json!({"Name": "web", "Port": 80, "Check": {"HTTP": "http://10.0.0.1/health", "Interval": "10s"}}),
            "Invalid Check.HTTP",
        ),
    ] {
        let a = bad(body.clone()).await?;
        assert_eq!(a.status, 400, "{body}: {}", a.body);
        assert!(a.body.starts_with(field), "{body}: {:?} should name {field}", a.body);
    }
    let a = c.put_raw("/v1/agent/service/register", "{not json").await?;
    assert_eq!(a.status, 400);
    assert!(a.body.starts_with("Request decode failed"), "{}", a.body);
    // The node answers 413 as soon as the declared length is over the limit and
    // closes the connection, so the client may see the 413 or, when it is still
    // writing the body, a broken pipe: either way the body is refused. The 413 says
    // the connection closes, so the client does not send its next request on it.
    match c
        .put_raw("/v1/agent/service/register", vec![b' '; 2 * 1024 * 1024])
        .await
    {
        Ok(a) => {
            assert_eq!(a.status, 413, "oversized bodies are refused");
            assert_eq!(a.connection.as_deref(), Some("close"), "the 413 closes its connection");
        }
        Err(e) => assert!(
            format!("{e:#}").contains("Broken pipe") || format!("{e:#}").contains("reset"),
            "oversized body: {e:#}"
        ),
    }

    let a = c.put("/v1/agent/service/deregister/nope", &json!(null)).await?;
    assert_eq!(a.status, 404);
    assert!(a.body.contains("Unknown service ID"), "{}", a.body);
    let a = c.put_raw("/v1/agent/check/pass/service:nope", "").await?;
    assert_eq!(a.status, 404);
    assert!(a.body.contains("Unknown check ID"), "{}", a.body);
    c.register(json!({"Name": "web", "ID": "w1", "Address": "10.0.0.1", "Port": 80, "Check": {"TTL": "1m"}}))
        .await?;
    let a = c
        .put("/v1/agent/check/update/service:w1", &json!({"Status": "fine"}))
        .await?;
    assert_eq!(a.status, 400);
    assert!(a.body.starts_with("Invalid Status"), "{}", a.body);

    for query in [
        "web?index=abc",
        "web?index=1&wait=forever",
        "Web_Service",
        "web?filter=Service.Port==80",
    ] {
        let a = c.get(&format!("/v1/health/service/{query}")).await?;
        assert_eq!(a.status, 400, "{query}: {}", a.body);
    }

    // Nothing was registered by the bad requests, and the node still serves.
    let services = c.get("/v1/catalog/services").await?;
    assert_eq!((services.status, services.json()?), (200, json!({"web": []})));
    assert_eq!(c.get("/v1/status/leader").await?.status, 200);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_agent_self_describe_the_raft_cluster() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let leader_peer = cluster.nodes[&leader].config.advertised_peer_addr();
    for id in cluster.running() {
        let c = Consul::on(&cluster, id);
        assert_eq!(c.get("/v1/status/leader").await?.json()?, json!(leader_peer));
        let peers = c.get("/v1/status/peers").await?.json()?;
        let mut peers: Vec<String> = serde_json::from_value(peers)?;
        peers.sort();
        let mut expected: Vec<String> = cluster
            .nodes
            .values()
            .map(|n| n.config.advertised_peer_addr())
            .collect();
        expected.sort();
        assert_eq!(peers, expected);
        let me = c.get("/v1/agent/self").await?.json()?;
        assert_eq!(me["Config"]["Datacenter"], "dc1");
        assert_eq!(me["Config"]["NodeName"], format!("muster-{id}"));
    }
    cluster.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Real third-party clients.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_registers_reports_blocks_and_deregisters() -> Result<()> {
    init_tracing();
    if !python_has("consul.exceptions") {
        return missing("py-consul");
    }
    let cluster = TestCluster::start(3).await?;
    // A follower: every write is forwarded, every report goes to the leader.
    let addr = cluster.nodes[&cluster.follower().await?].config.http_addr;
    run_python_check(
        "consul/py_consul_check.py",
        &[addr.to_string(), "3".into()],
        "py-consul: all checks passed",
    )
    .await?;
    cluster.shutdown().await;
    Ok(())
}

fn prometheus_binary() -> Option<String> {
    let candidates = [std::env::var("PROMETHEUS_BIN").ok(), Some("/usr/bin/prometheus".into())];
    candidates.into_iter().flatten().find(|p| {
        std::process::Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Whether the Prometheus next to `binary` accepts `consul_sd_configs`, judged by
/// `promtool check config` (assumed when there is no promtool).
fn supports_consul_sd(binary: &str, config: &std::path::Path) -> bool {
    let promtool = std::path::Path::new(binary).with_file_name("promtool");
    match std::process::Command::new(&promtool)
        .args(["check", "config"])
        .arg(config)
        .output()
    {
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            !text.contains("consul_sd_configs not found")
        }
        Err(_) => true,
    }
}

/// Prometheus's active targets discovered for `service`, as `__address__` values.
async fn prometheus_targets(http: &reqwest::Client, prometheus: &str, service: &str) -> Result<Vec<Value>> {
    let body: Value = http
        .get(format!("http://{prometheus}/api/v1/targets"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .json()
        .await?;
    Ok(body["data"]["activeTargets"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t["discoveredLabels"]["__meta_consul_service"] == service)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_consul_sd_discovers_registered_instances_and_drops_deregistered_ones() -> Result<()> {
    init_tracing();
    let Some(binary) = prometheus_binary() else {
        return missing("prometheus (Debian package `prometheus`)");
    };
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("prometheus.yml");
    let write_config = |server: &str| {
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: muster\n    consul_sd_configs:\n      - server: '{server}'\n        refresh_interval: 1s\n"
            ),
        )
    };
    write_config("127.0.0.1:8500")?;
    if !supports_consul_sd(&binary, &config) {
        let line = format!(
            "SKIPPED: {binary} was built without consul_sd_configs (Debian strips Consul discovery); \
             set PROMETHEUS_BIN to an upstream Prometheus to run this test"
        );
        eprintln!("\n{}\n{line}\n{}\n", "*".repeat(line.len()), "*".repeat(line.len()));
        println!("{line}");
        return Ok(());
    }

    let cluster = TestCluster::start(3).await?;
    let node = cluster.follower().await?;
    let http_addr = cluster.nodes[&node].config.http_addr;
    write_config(&http_addr.to_string())?;
    let c = Consul::new(http_addr);
    // The target is the node's own /metrics, so Prometheus can scrape it too.
    c.register(json!({
        "Name": "scraped", "ID": "scraped-1", "Address": http_addr.ip().to_string(), "Port": http_addr.port(),
        "Tags": ["metrics"], "Meta": {"team": "core"}
    }))
    .await?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let prometheus = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(&binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={prometheus}"))
        .arg("--log.level=warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting prometheus")?;

    let http = reqwest::Client::new();
    let found = eventually(Duration::from_secs(60), "Prometheus to discover the target", || async {
        let targets = prometheus_targets(&http, &prometheus, "scraped").await?;
        Ok(targets.iter().any(|t| {
            let labels = &t["discoveredLabels"];
            labels["__address__"] == http_addr.to_string().as_str()
                && labels["__meta_consul_service_id"] == "scraped-1"
                && labels["__meta_consul_tags"] == ",metrics,"
                && labels["__meta_consul_service_metadata_team"] == "core"
                && labels["__meta_consul_dc"] == "dc1"
                && labels["__meta_consul_health"] == "passing"
        }))
    })
    .await;
    if let Err(e) = found {
        let targets = prometheus_targets(&http, &prometheus, "scraped").await.ok();
        bail!("{e}; targets: {targets:?}");
    }

    // Deregistering wakes Prometheus's blocking catalog query; the target goes.
    c.put("/v1/agent/service/deregister/scraped-1", &json!(null)).await?;
    eventually(Duration::from_secs(60), "Prometheus to drop the target", || async {
        Ok(prometheus_targets(&http, &prometheus, "scraped").await?.is_empty())
    })
    .await?;
    child.kill().await?;
    cluster.shutdown().await;
    Ok(())
}
