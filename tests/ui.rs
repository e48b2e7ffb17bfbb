//! The web console (`/ui/`) in a real browser: headless Chromium from Debian driven
//! through chromedriver's W3C WebDriver endpoints (see `ui/webdriver.rs`), against
//! an in-process three-node cluster (real sockets, fsynced logs, sled on disk).
//!
//! The tests change the registry through the REST and gRPC APIs while the page is
//! open and wait — polling the page with a deadline, never sleeping a fixed time —
//! until the page shows the change. A marker set on `window` after the first load
//! must survive to the end: the page was never reloaded.
//!
//! They need `chromium` and `chromedriver` (Debian: `apt-get install chromium
//! chromium-driver`; or set `CHROME_BIN` and `CHROMEDRIVER`). When either is missing
//! they print a loud SKIPPED line and pass, unless `MUSTER_REQUIRE_EXTERNAL=1` (CI
//! sets it), in which case they fail. The main test saves a screenshot to
//! `target/ui-test/console.png` (the one in `docs/ui.png` is a copy).

#[path = "ui/webdriver.rs"]
mod webdriver;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use muster_proto::v1 as pb;
use muster_testkit::{init_tracing, TestCluster};
use serde_json::{json, Value};
use webdriver::{Browsers, Driver, Session};

/// How long the page may take to show a change.
const SHOW_TIMEOUT: Duration = Duration::from_secs(20);

/// One browser at a time: the machines running these tests have few cores.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where the tests write screenshots and the chromedriver log.
fn output_dir() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("ui-test");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The browsers, or `None` after printing why the test is skipped.
fn browsers_or_skip(test: &str) -> Result<Option<Browsers>> {
    if let Some(found) = Browsers::find() {
        return Ok(Some(found));
    }
    if std::env::var("MUSTER_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
        bail!("chromium/chromedriver not installed, and MUSTER_REQUIRE_EXTERNAL=1");
    }
    eprintln!();
    eprintln!("=================================================================");
    eprintln!("SKIPPED: chromium/chromedriver not installed ({test})");
    eprintln!("         apt-get install -y chromium chromium-driver");
    eprintln!("=================================================================");
    eprintln!();
    Ok(None)
}

fn base(cluster: &TestCluster, id: u64) -> String {
    format!("http://{}", cluster.nodes[&id].config.http_addr)
}

/// Sends a REST request and insists on a 200.
async fn rest(http: &reqwest::Client, method: reqwest::Method, url: String, body: Option<Value>) -> Result<Value> {
    let mut request = http.request(method.clone(), &url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.with_context(|| format!("{method} {url}"))?;
    let status = response.status();
    let text = response.text().await?;
    ensure!(status == reqwest::StatusCode::OK, "{method} {url}: {status}: {text}");
    serde_json::from_str(&text).with_context(|| format!("{method} {url}: not JSON: {text}"))
}

async fn rest_register(http: &reqwest::Client, node: &str, service: &str, id: &str, body: Value) -> Result<Value> {
    rest(
        http,
        reqwest::Method::PUT,
        format!("{node}/v1/registry/services/{service}/instances/{id}"),
        Some(body),
    )
    .await
}

async fn rest_deregister(http: &reqwest::Client, node: &str, service: &str, id: &str) -> Result<()> {
    rest(
        http,
        reqwest::Method::DELETE,
        format!("{node}/v1/registry/services/{service}/instances/{id}"),
        None,
    )
    .await
    .map(drop)
}

/// What the page shows, read from its DOM.
const PAGE_STATE: &str = r#"
const text = (node) => (node ? node.textContent.trim() : null);
const services = [...document.querySelectorAll('#services tbody tr')].map((row) => ({
  service: row.dataset.service,
  instances: Number(text(row.querySelector('[data-count="instances"]'))),
  text: text(row),
}));
const table = document.getElementById('instances');
const instances = table.hidden ? [] : [...table.querySelectorAll('tbody tr')].map((row) => ({
  id: row.dataset.instance,
  text: text(row),
  health: row.querySelector('[data-health]') ? row.querySelector('[data-health]').dataset.health : null,
  ttl: text(row.querySelector('[data-lease]')),
  tags: [...row.querySelectorAll('.tags li')].map(text),
  metadata: Object.fromEntries([...row.querySelectorAll('.metadata div')].map((d) => [text(d.querySelector('dt')), text(d.querySelector('dd'))])),
  elements_from_data: row.querySelectorAll('img, script, b, i').length,
}));
const error = document.getElementById('error');
return {
  stream: document.body.dataset.stream,
  marker: window.__musterUiTest === undefined ? null : window.__musterUiTest,
  node: text(document.getElementById('node-id')),
  leader: text(document.querySelector('[data-fact="leader"] dd')),
  registry: text(document.querySelector('[data-fact="registry"] dd')),
  cluster_id: text(document.querySelector('[data-fact="cluster-id"] dd')),
  command_level: text(document.querySelector('[data-fact="command-level"] dd')),
  members: [...document.querySelectorAll('#members tbody tr')].map((row) => text(row)),
  services,
  instances_title: text(document.getElementById('instances-title')),
  instances_hint: document.getElementById('instances-hint').hidden ? null : text(document.getElementById('instances-hint')),
  instances,
  error: error.hidden ? null : text(error),
};
"#;

/// Polls the page until `check` holds for what it shows, or fails after `timeout`
/// with the last state seen.
async fn wait_for(session: &Session, what: &str, check: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + SHOW_TIMEOUT;
    loop {
        let state = session.execute(PAGE_STATE, json!([])).await?;
        if check(&state) {
            return Ok(state);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the page did not show {what} within {SHOW_TIMEOUT:?}; it shows:\n{state:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn service_row<'a>(state: &'a Value, service: &str) -> Option<&'a Value> {
    state["services"]
        .as_array()?
        .iter()
        .find(|s| s["service"] == format!("default/{service}"))
}

fn instance_row<'a>(state: &'a Value, id: &str) -> Option<&'a Value> {
    state["instances"].as_array()?.iter().find(|i| i["id"] == id)
}

/// Sets a marker on the page's `window`; a reload would lose it.
async fn mark(session: &Session) -> Result<()> {
    session
        .execute("window.__musterUiTest = 'never reloaded'; return true;", json!([]))
        .await
        .map(drop)
}

fn never_reloaded(state: &Value) -> Result<()> {
    ensure!(state["marker"] == "never reloaded", "the page was reloaded: {state:#}");
    Ok(())
}

/// Starts chromedriver and a window, runs `scenario`, and closes the browser
/// whatever the outcome.
async fn with_browser<F, Fut>(test: &str, scenario: F) -> Result<()>
where
    F: FnOnce(Session) -> Fut,
    Fut: std::future::Future<Output = (Session, Result<()>)>,
{
    let Some(browsers) = browsers_or_skip(test)? else {
        return Ok(());
    };
    let _one_at_a_time = BROWSER.lock().await;
    let log = output_dir()?.join(format!("chromedriver-{test}.log"));
    let driver = Driver::start(&browsers, &log).await?;
    let session = driver.session(1400, 1000).await?;
    let (session, result) = scenario(session).await;
    let quit = session.quit().await;
    result.and(quit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_instances_come_and_go_live_without_reloading() -> Result<()> {
    init_tracing();
    with_browser("live", |session| async move {
        let result = live_scenario(&session).await;
        (session, result)
    })
    .await
}

async fn live_scenario(session: &Session) -> Result<()> {
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = cluster.follower().await?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
    // The page talks to the leader (which knows exact lease TTLs); writes go
    // through a follower, so what the page shows has travelled through Raft.
    let page_node = base(&cluster, leader);
    let write_node = base(&cluster, follower);

    // Something registered before the page opens.
    for (id, zone, health) in [("api-1", "eu-west-1a", "passing"), ("api-2", "eu-west-1b", "passing")] {
        rest_register(
            &http,
            &write_node,
            "api",
            id,
            json!({"address": "10.0.1.7", "port": 8080, "ports": {"grpc": 9090}, "tags": ["http", "v3"],
                   "metadata": {"version": "3.2.0"}, "zone": zone, "health": health, "ttl": "45s"}),
        )
        .await?;
    }
    rest_register(
        &http,
        &write_node,
        "billing",
        "billing-1",
        json!({"address": "10.0.2.4", "port": 7000, "health": "critical"}),
    )
    .await?;

    session.goto(&format!("{page_node}/ui")).await?;
    let state = wait_for(session, "the live stream, the cluster and the existing services", |s| {
        s["stream"] == "live"
            && s["node"].as_str() == Some(leader.to_string().as_str())
            && s["members"].as_array().is_some_and(|m| m.len() == 3)
            && service_row(s, "api").is_some_and(|r| r["instances"] == 2)
            && service_row(s, "billing").is_some_and(|r| r["instances"] == 1)
    })
    .await?;
    ensure!(
        service_row(&state, "web").is_none(),
        "web shown before it exists: {state:#}"
    );
    ensure!(
        state["leader"] == format!("node {leader}"),
        "leader not shown: {state:#}"
    );
    let cluster_id = cluster
        .status(leader)
        .cluster_id
        .context("a founding member knows its cluster id")?;
    ensure!(
        state["cluster_id"] == cluster_id.as_str(),
        "cluster id {cluster_id} not shown: {state:#}"
    );
    ensure!(
        state["command_level"] == muster_core::COMMAND_LEVEL.to_string().as_str(),
        "command level not shown: {state:#}"
    );
    mark(session).await?;

    // Registered while the page is open, through a follower, with data that must
    // be shown as text, not parsed as markup.
    rest_register(
        &http,
        &write_node,
        "web",
        "web-1",
        json!({
            "address": "10.0.0.5", "port": 8080, "ports": {"health": 8081},
            "tags": ["v2", "<b>bold</b>"],
            "metadata": {"version": "1.4.2", "note": "<img src=x onerror=\"window.__xss=1\">"},
            "zone": "eu-west-1a", "ttl": "30s",
        }),
    )
    .await?;
    wait_for(session, "service web with 1 instance", |s| {
        service_row(s, "web").is_some_and(|r| r["instances"] == 1)
    })
    .await?;

    // Choose the service, as a user would.
    session.click(r#"#services tr[data-service="default/web"] a"#).await?;
    let state = wait_for(session, "instance web-1 with a lease counting down", |s| {
        instance_row(s, "web-1").is_some_and(|i| {
            i["ttl"]
                .as_str()
                .is_some_and(|t| t.ends_with(" s") && !t.starts_with('≤'))
        })
    })
    .await?;
    let row = instance_row(&state, "web-1").context("web-1")?;
    ensure!(
        row["text"].as_str().is_some_and(|t| t.contains("10.0.0.5:8080")),
        "{row:#}"
    );
    ensure!(
        row["tags"] == json!(["v2", "<b>bold</b>"]),
        "tags not shown as text: {row:#}"
    );
    ensure!(
        row["metadata"]["note"] == "<img src=x onerror=\"window.__xss=1\">",
        "metadata not shown as text: {row:#}"
    );
    ensure!(
        row["metadata"]["health"].is_null(),
        "ports mixed into metadata: {row:#}"
    );
    ensure!(row["elements_from_data"] == 0, "user data became markup: {row:#}");
    ensure!(row["health"] == "passing", "{row:#}");
    let xss = session.execute("return window.__xss === undefined;", json!([])).await?;
    ensure!(xss == json!(true), "a handler from user data ran");

    // A second instance through gRPC, then a health change.
    let mut grpc = cluster.registry(follower).await?;
    grpc.register(pb::RegisterRequest {
        instance: Some(pb::Instance {
            service: "web".into(),
            instance_id: "web-2".into(),
            address: "10.0.0.6".into(),
            port: 8080,
            tags: vec!["v2".into(), "canary".into()],
            metadata: [("version".to_string(), "1.5.0-rc1".to_string())].into(),
            zone: "eu-west-1b".into(),
            ..Default::default()
        }),
        ttl_ms: 30_000,
    })
    .await?;
    rest(
        &http,
        reqwest::Method::PUT,
        format!("{write_node}/v1/registry/services/web/instances/web-2/health"),
        Some(json!({"health": "warning"})),
    )
    .await?;
    let state = wait_for(session, "web-2 in warning, web with 2 instances", |s| {
        instance_row(s, "web-2").is_some_and(|i| i["health"] == "warning")
            && service_row(s, "web")
                .is_some_and(|r| r["instances"] == 2 && r["text"].as_str().is_some_and(|t| t.contains("1 warning")))
            && s["registry"]
                .as_str()
                .is_some_and(|r| r.starts_with("5 instances · 3 services"))
    })
    .await?;
    never_reloaded(&state)?;

    // The whole page in one picture.
    let height = session
        .execute(
            "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight;",
            json!([]),
        )
        .await?
        .as_u64()
        .unwrap_or(1000)
        .clamp(600, 2400);
    session.resize(1400, height as u32).await?;
    let png = session.screenshot().await?;
    ensure!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    let shot = output_dir()?.join("console.png");
    std::fs::write(&shot, &png).with_context(|| format!("writing {}", shot.display()))?;
    eprintln!("screenshot: {}", shot.display());

    // The lease column counts down between polls.
    wait_for(session, "web-1's lease counting down below 29 s", |s| {
        instance_row(s, "web-1")
            .and_then(|i| i["ttl"].as_str())
            .and_then(|t| t.strip_suffix(" s"))
            .and_then(|t| t.parse::<f64>().ok())
            .is_some_and(|left| left < 29.0)
    })
    .await?;

    // Deregistered while the page is open: gone from the page.
    rest_deregister(&http, &write_node, "web", "web-1").await?;
    wait_for(session, "web-1 gone, web with 1 instance", |s| {
        instance_row(s, "web-1").is_none()
            && instance_row(s, "web-2").is_some()
            && service_row(s, "web").is_some_and(|r| r["instances"] == 1)
    })
    .await?;
    rest_deregister(&http, &write_node, "web", "web-2").await?;
    let state = wait_for(session, "service web gone", |s| {
        service_row(s, "web").is_none()
            && s["instances"].as_array().is_some_and(Vec::is_empty)
            && s["instances_hint"]
                .as_str()
                .is_some_and(|h| h.contains("No instances of web"))
    })
    .await?;
    ensure!(
        service_row(&state, "api").is_some(),
        "other services vanished: {state:#}"
    );
    never_reloaded(&state)?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_catches_up_after_its_node_restarts() -> Result<()> {
    init_tracing();
    with_browser("restart", |session| async move {
        let result = restart_scenario(&session).await;
        (session, result)
    })
    .await
}

async fn restart_scenario(session: &Session) -> Result<()> {
    let mut cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = cluster.follower().await?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
    let leader_url = base(&cluster, leader);
    let page_node = base(&cluster, follower);

    rest_register(
        &http,
        &leader_url,
        "gone",
        "gone-1",
        json!({"address": "10.0.3.1", "port": 80}),
    )
    .await?;
    session.goto(&format!("{page_node}/ui/#/services/default/gone")).await?;
    // The node's name comes with the page's first answers, not with the stream.
    let follower_name = follower.to_string();
    wait_for(session, "service gone with its instance, from the follower", |s| {
        s["stream"] == "live" && instance_row(s, "gone-1").is_some() && s["node"].as_str() == Some(&follower_name)
    })
    .await?;
    mark(session).await?;

    // The page's node goes away: the page says so and keeps trying.
    cluster.stop(follower).await;
    wait_for(session, "the stream interrupted and the node unreachable", |s| {
        s["stream"] == "reconnecting" && s["error"].as_str().is_some_and(|e| e.contains("Cannot reach"))
    })
    .await?;

    // Changes it misses while down.
    rest_deregister(&http, &leader_url, "gone", "gone-1").await?;
    rest_register(
        &http,
        &leader_url,
        "late",
        "late-1",
        json!({"address": "10.0.3.2", "port": 80}),
    )
    .await?;

    // Back on the same address: the page resumes (replay or reset) by itself.
    cluster.restart(follower).await?;
    let state = wait_for(session, "the missed changes after the restart", |s| {
        s["stream"] == "live"
            && s["error"].is_null()
            && service_row(s, "late").is_some_and(|r| r["instances"] == 1)
            && service_row(s, "gone").is_none()
            && s["instances"].as_array().is_some_and(Vec::is_empty)
    })
    .await?;
    never_reloaded(&state)?;
    cluster.shutdown().await;
    Ok(())
}

/// The REST endpoint behind the lease column (no browser needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_listing_gives_the_leaders_exact_time_left_and_an_upper_bound_elsewhere() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let follower = cluster.follower().await?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
    let (leader_url, follower_url) = (base(&cluster, leader), base(&cluster, follower));
    let registered = rest_register(
        &http,
        &follower_url,
        "web",
        "web-1",
        json!({"address": "10.0.0.5", "port": 80, "ttl": "30s"}),
    )
    .await?;
    let lease = registered["lease_id"].as_u64().context("no lease granted")?;

    // The leader counts the lease down from its own deadline.
    let deadline = tokio::time::Instant::now() + SHOW_TIMEOUT;
    loop {
        let one = rest(
            &http,
            reqwest::Method::GET,
            format!("{leader_url}/v1/registry/leases/{lease}"),
            None,
        )
        .await?;
        ensure!(
            one["lease_id"] == lease && one["ttl_ms"] == 30_000 && one["instances"] == 1,
            "{one:#}"
        );
        ensure!(
            one["remaining_exact"] == true,
            "the leader's answer is not exact: {one:#}"
        );
        let left = one["remaining_ms"].as_u64().context("remaining_ms")?;
        ensure!(left <= 30_000, "{one:#}");
        if left < 30_000 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the leader never counted down: {one:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A follower gives an upper bound and says so; unknown ids are left out.
    let url = format!("{follower_url}/v1/registry/leases?lease_id={lease}&lease_id=999999&lease_id={lease}");
    let deadline = tokio::time::Instant::now() + SHOW_TIMEOUT;
    let listed = loop {
        let listed = rest(&http, reqwest::Method::GET, url.clone(), None).await?;
        if listed["leases"].as_array().is_some_and(|l| !l.is_empty()) {
            break listed;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the follower never saw the lease: {listed:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let leases = listed["leases"].as_array().context("leases")?;
    ensure!(leases.len() == 1 && leases[0]["lease_id"] == lease, "{listed:#}");
    ensure!(leases[0]["remaining_exact"] == false, "{listed:#}");
    ensure!(leases[0]["remaining_ms"] == 30_000, "{listed:#}");
    ensure!(listed["node"] == follower, "{listed:#}");

    // Bad input names the field; an unknown lease is a 404.
    for (path, status, field) in [
        ("/v1/registry/leases/abc", 400, "lease_id"),
        ("/v1/registry/leases?lease_id=x", 400, "lease_id"),
        ("/v1/registry/leases?lease=1", 400, "lease"),
        ("/v1/registry/leases/999999", 404, "lease_id"),
    ] {
        let response = http.get(format!("{leader_url}{path}")).send().await?;
        ensure!(response.status().as_u16() == status, "{path}: {}", response.status());
        let body: Value = response.json().await?;
        ensure!(body["error"]["field"] == field, "{path}: {body:#}");
    }
    cluster.shutdown().await;
    Ok(())
}
