//! TLS: a cluster whose ports speak TLS only replicates over mutually authenticated
//! peer connections, serves clients that trust its CA (and, when asked, only those
//! with a certificate from it), lets a node join over TLS, refuses peers and
//! clients without the right certificate, rotates its certificate without a
//! restart, and serves third-party clients over TLS (py-consul over HTTPS, grpcio).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use muster_client::{Client, ClientOptions, ClientTls, DiscoverOptions, RetryPolicy};
use muster_core::InstanceSpec;
use muster_proto::v1::peer::PeerMessage;
use muster_server::identity::ClusterIdentity;
use muster_server::network::PeerChannels;
use muster_server::tls::{NodeTls, TlsError, TlsSettings};
use muster_testkit::pki::{IssuedPair, TestPki};
use muster_testkit::{eventually, init_tracing, TestCluster};

const WAIT: Duration = Duration::from_secs(15);

/// A three-node cluster with a certificate per node from `pki`.
async fn tls_cluster(pki: &mut TestPki, require_client_certs: bool) -> Result<TestCluster> {
    let mut settings = Vec::new();
    for id in 1..=3 {
        settings.push(pki.node_settings(&format!("node-{id}"), require_client_certs)?);
    }
    TestCluster::start_with(3, |config| {
        config.tls = Some(settings[config.id as usize - 1].clone());
    })
    .await
}

/// A client of node `id` that gives up after its first failed attempt.
async fn client_of(cluster: &TestCluster, id: u64, tls: Option<ClientTls>) -> Result<Client> {
    let options = ClientOptions {
        tls,
        connect_timeout: Duration::from_secs(2),
        retry: RetryPolicy {
            max_elapsed: Duration::ZERO,
            ..RetryPolicy::default()
        },
        ..ClientOptions::default()
    };
    Ok(Client::connect_with(vec![cluster.grpc_addr(id).to_string()], options).await?)
}

fn trusting(pki: &TestPki, identity: Option<&IssuedPair>) -> Result<ClientTls> {
    Ok(ClientTls::from_files(
        &pki.ca_file,
        identity.map(|p| p.cert.as_path()),
        identity.map(|p| p.key.as_path()),
    )?)
}

fn spec(id: &str) -> InstanceSpec {
    InstanceSpec {
        service: "web".into(),
        instance_id: id.into(),
        address: "127.0.0.1".into(),
        port: 8080,
        ..Default::default()
    }
}

fn http_addr(cluster: &TestCluster, id: u64) -> std::net::SocketAddr {
    cluster.nodes[&id].config.http_addr
}

/// An HTTPS client trusting `pki`'s CA, presenting `identity` if given.
fn https_client(pki: &TestPki, identity: Option<&IssuedPair>) -> Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca_file)?)?;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(5));
    if let Some(pair) = identity {
        let mut pem = std::fs::read(&pair.cert)?;
        pem.extend(std::fs::read(&pair.key)?);
        builder = builder.identity(reqwest::Identity::from_pem(&pem)?);
    }
    Ok(builder.build()?)
}

#[tokio::test]
async fn a_tls_cluster_replicates_and_serves_clients_that_trust_its_ca_only_over_tls() -> Result<()> {
    init_tracing();
    let mut pki = TestPki::new("muster test CA")?;
    let cluster = tls_cluster(&mut pki, false).await?;
    let leader = cluster.wait_for_leader(WAIT).await?;
    let follower = cluster.follower().await?;

    // A write through a follower travels to the leader and back over the peer
    // port's TLS; a read on the other follower waits for it.
    let writer = client_of(&cluster, follower, Some(trusting(&pki, None)?)).await?;
    let registered = writer.register(spec("web-1"), None).await?;
    let other = cluster
        .running()
        .into_iter()
        .find(|id| *id != leader && *id != follower)
        .unwrap();
    let reader = client_of(&cluster, other, Some(trusting(&pki, None)?)).await?;
    let options = DiscoverOptions {
        min_revision: registered.revision,
        ..DiscoverOptions::default()
    };
    let (found, _) = reader.discover("web", &options).await?;
    ensure!(found.len() == 1 && found[0].instance_id == "web-1", "{found:?}");

    // REST and Consul's API on the HTTP port, over HTTPS.
    let https = https_client(&pki, None)?;
    let url = format!(
        "https://localhost:{}/v1/health/service/web",
        http_addr(&cluster, other).port()
    );
    let body: serde_json::Value = https.get(&url).send().await?.error_for_status()?.json().await?;
    ensure!(body[0]["Service"]["ID"] == "web-1", "{body}");

    // Plain TCP gets nothing from any port.
    let plain = client_of(&cluster, other, None).await?;
    if let Ok(answer) = plain.discover("web", &DiscoverOptions::default()).await {
        bail!("a plaintext gRPC client was answered: {answer:?}");
    }
    let plain_http = format!("http://{}/healthz", http_addr(&cluster, other));
    ensure!(
        reqwest::get(&plain_http).await.is_err(),
        "plain HTTP was answered on a TLS port"
    );

    // A client that trusts another CA does not trust the nodes.
    let stranger = TestPki::new("another CA")?;
    let doubting = client_of(&cluster, other, Some(trusting(&stranger, None)?)).await?;
    ensure!(
        doubting.discover("web", &DiscoverOptions::default()).await.is_err(),
        "a client that does not trust the nodes' CA was answered"
    );
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn with_client_auth_only_clients_with_a_certificate_from_the_ca_are_served() -> Result<()> {
    init_tracing();
    let mut pki = TestPki::new("muster test CA")?;
    let cluster = tls_cluster(&mut pki, true).await?;
    let node = cluster.follower().await?;
    let holder = pki.client("ops")?;

    let with_cert = client_of(&cluster, node, Some(trusting(&pki, Some(&holder))?)).await?;
    with_cert.register(spec("web-1"), None).await?;

    let without = client_of(&cluster, node, Some(trusting(&pki, None)?)).await?;
    ensure!(
        without.discover("web", &DiscoverOptions::default()).await.is_err(),
        "a client without a certificate was answered"
    );
    let mut stranger = TestPki::new("another CA")?;
    let foreign = stranger.client("intruder")?;
    let mut forged = trusting(&pki, None)?;
    forged.identity = Some((std::fs::read(&foreign.cert)?, std::fs::read(&foreign.key)?));
    let with_foreign = client_of(&cluster, node, Some(forged)).await?;
    ensure!(
        with_foreign.discover("web", &DiscoverOptions::default()).await.is_err(),
        "a client with a certificate from another CA was answered"
    );

    let url = format!(
        "https://127.0.0.1:{}/v1/registry/services/web/instances",
        http_addr(&cluster, node).port()
    );
    ensure!(
        https_client(&pki, None)?.get(&url).send().await.is_err(),
        "an HTTPS client without a certificate was answered"
    );
    let body: serde_json::Value = https_client(&pki, Some(&holder))?
        .get(&url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    ensure!(body.to_string().contains("web-1"), "{body}");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_peer_port_serves_only_peers_with_a_certificate_from_the_ca() -> Result<()> {
    init_tracing();
    let mut pki = TestPki::new("muster test CA")?;
    let cluster = tls_cluster(&mut pki, false).await?;
    let node = cluster.follower().await?;
    let core = cluster.nodes[&node].handle.as_ref().unwrap().core().clone();
    let peer_addr = core.config.advertised_peer_addr();
    let identity = || Arc::new(ClusterIdentity::new(core.cluster.id(), None));
    let vote = || -> Result<PeerMessage> {
        let request = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(1, 9), None);
        Ok(PeerMessage {
            data: bincode::serialize(&request)?,
        })
    };

    // A peer with a node certificate from the CA is answered.
    let member = PeerChannels::new(identity()).with_tls(Some(NodeTls::load(&pki.node_settings("node-9", false)?)?));
    member.client(&peer_addr)?.vote(vote()?).await?;

    // Plain TCP, and TLS with a certificate from another CA, are not.
    let plain = PeerChannels::new(identity());
    let refused = plain.client(&peer_addr)?.vote(vote()?).await.unwrap_err();
    ensure!(refused.code() == tonic::Code::Unavailable, "{refused}");
    let mut stranger = TestPki::new("another CA")?;
    let mut foreign = stranger.node_settings("node-9", false)?;
    // It even trusts the cluster's CA: only its own certificate is wrong.
    foreign.ca = pki.ca_file.clone();
    let intruder = PeerChannels::new(identity()).with_tls(Some(NodeTls::load(&foreign)?));
    let refused = intruder.client(&peer_addr)?.vote(vote()?).await.unwrap_err();
    ensure!(refused.code() == tonic::Code::Unavailable, "{refused}");

    // The node is unharmed and still replicating.
    let client = client_of(&cluster, node, Some(trusting(&pki, None)?)).await?;
    client.register(spec("web-2"), None).await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_node_joins_a_tls_cluster_over_tls() -> Result<()> {
    init_tracing();
    let mut pki = TestPki::new("muster test CA")?;
    let mut cluster = tls_cluster(&mut pki, true).await?;
    cluster.add_joining_node(4, 2).await?;
    let holder = pki.client("ops")?;
    let admin = client_of(&cluster, 1, Some(trusting(&pki, Some(&holder))?)).await?;
    eventually(WAIT, "node 4 is a member", || async {
        Ok(admin.members().await?.members.iter().any(|m| m.node_id == 4))
    })
    .await?;
    let written = admin.register(spec("web-3"), None).await?;
    let on_new = client_of(&cluster, 4, Some(trusting(&pki, Some(&holder))?)).await?;
    let options = DiscoverOptions {
        min_revision: written.revision,
        ..DiscoverOptions::default()
    };
    let (found, _) = on_new.discover("web", &options).await?;
    ensure!(found.iter().any(|i| i.instance_id == "web-3"), "{found:?}");
    cluster.shutdown().await;
    Ok(())
}

#[test]
fn unusable_tls_files_are_refused_naming_the_setting_and_file() -> Result<()> {
    let mut pki = TestPki::new("muster test CA")?;
    let good = pki.node_settings("node-1", false)?;
    let missing = TlsSettings {
        cert: pki.dir().join("nope.pem"),
        ..good.clone()
    };
    let e = NodeTls::load(&missing).unwrap_err();
    ensure!(matches!(e, TlsError::Unreadable { setting: "cert", .. }), "{e}");
    ensure!(e.to_string().contains("nope.pem"), "{e}");

    let not_a_key = TlsSettings {
        key: good.cert.clone(),
        ..good.clone()
    };
    let e = NodeTls::load(&not_a_key).unwrap_err();
    ensure!(matches!(e, TlsError::Invalid { setting: "key", .. }), "{e}");

    let other = pki.node("node-2")?;
    let mismatched = TlsSettings {
        key: other.key.clone(),
        ..good.clone()
    };
    let e = NodeTls::load(&mismatched).unwrap_err();
    ensure!(matches!(e, TlsError::Unusable(_)), "a key of another certificate: {e}");
    ensure!(
        e.to_string().contains(&other.key.display().to_string()),
        "names the key: {e}"
    );

    let no_ca = TlsSettings {
        ca: good.key.clone(),
        ..good
    };
    let e = NodeTls::load(&no_ca).unwrap_err();
    ensure!(matches!(e, TlsError::Invalid { setting: "ca", .. }), "{e}");
    Ok(())
}

#[tokio::test]
async fn the_gateway_follows_a_tls_registry_and_serves_https() -> Result<()> {
    init_tracing();
    let mut pki = TestPki::new("muster test CA")?;
    let cluster = tls_cluster(&mut pki, true).await?;
    let holder = pki.client("gateway")?;
    let tls = trusting(&pki, Some(&holder))?;
    let gateway_cert = pki.node("gateway")?;

    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let backend_port = backend.local_addr()?.port();
    // Answers with the scheme the gateway says its client used.
    let app = axum::Router::new().route(
        "/hello",
        axum::routing::get(|headers: axum::http::HeaderMap| async move {
            let proto = headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            format!("hello over {proto}")
        }),
    );
    let backend_task = tokio::spawn(async move { axum::serve(backend, app).await });
    let registry = client_of(&cluster, 1, Some(tls.clone())).await?;
    registry
        .register(
            InstanceSpec {
                port: backend_port,
                ..spec("web-1")
            },
            None,
        )
        .await?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gateway_addr = listener.local_addr()?;
    let config = muster_gateway::GatewayConfig {
        nodes: cluster
            .running()
            .iter()
            .map(|id| cluster.grpc_addr(*id).to_string())
            .collect(),
        registry_tls: Some(tls),
        listener_tls: Some(muster_gateway::ListenerTls {
            cert: gateway_cert.cert.clone(),
            key: gateway_cert.key.clone(),
        }),
        ..muster_gateway::GatewayConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(muster_gateway::serve(listener, config, async {
        let _ = stopped.await;
    }));
    let url = format!("https://127.0.0.1:{}/web/hello", gateway_addr.port());
    let https = https_client(&pki, None)?;
    eventually(WAIT, "the gateway reaches the instance", || async {
        let answer = https.get(&url).send().await?;
        Ok(answer.status().is_success() && answer.text().await? == "hello over https")
    })
    .await?;
    // HTTP/2 by ALPN, as gRPC clients speak it over TLS.
    let answer = https_client(&pki, None)?
        .get(&url)
        .version(reqwest::Version::HTTP_2)
        .send()
        .await?;
    ensure!(answer.version() == reqwest::Version::HTTP_2, "{:?}", answer.version());
    ensure!(
        reqwest::get(format!("http://{gateway_addr}/web/hello")).await.is_err(),
        "plain HTTP was answered on the gateway's TLS listener"
    );
    let _ = stop.send(());
    gateway.await??;
    backend_task.abort();
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_speaks_https_to_a_tls_node() -> Result<()> {
    init_tracing();
    if !muster_tests::python_has("consul.exceptions") {
        return muster_tests::missing("py-consul");
    }
    let mut pki = TestPki::new("muster test CA")?;
    let cluster = tls_cluster(&mut pki, false).await?;
    let addr = http_addr(&cluster, cluster.follower().await?);
    muster_tests::run_python_check(
        "consul/py_consul_check.py",
        &[addr.to_string(), "3".into(), pki.ca_file.display().to_string()],
        "py-consul: all checks passed",
    )
    .await?;
    cluster.shutdown().await;
    Ok(())
}

/// The leaf certificate a TLS server at `addr` presents to a client trusting `pki`.
async fn served_certificate(addr: std::net::SocketAddr, pki: &TestPki) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls::pki_types::CertificateDer::pem_file_iter(&pki.ca_file)? {
        roots.add(ca?)?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let served = tls.get_ref().1.peer_certificates().context("no certificate")?;
    Ok(served[0].to_vec())
}

fn certificate_in(path: &std::path::Path) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    Ok(rustls::pki_types::CertificateDer::from_pem_file(path)?.to_vec())
}

#[tokio::test]
async fn a_node_serves_a_rotated_certificate_without_a_restart_and_keeps_it_when_a_file_breaks() -> Result<()> {
    init_tracing();
    let mut pki = TestPki::new("muster test CA")?;
    let cluster = tls_cluster(&mut pki, false).await?;
    let node = cluster.follower().await?;
    let core = cluster.nodes[&node].handle.as_ref().unwrap().core().clone();
    let settings = core.config.tls.clone().context("TLS settings")?;
    let addr = http_addr(&cluster, node);
    ensure!(served_certificate(addr, &pki).await? == certificate_in(&settings.cert)?);

    // Rotation: a new certificate from the same CA written over the files.
    let rotated = pki.node("node-rotated")?;
    std::fs::copy(&rotated.cert, &settings.cert)?;
    std::fs::copy(&rotated.key, &settings.key)?;
    core.request_tls_reload();
    let wanted = certificate_in(&rotated.cert)?;
    eventually(WAIT, "the node serves the rotated certificate", || async {
        Ok(served_certificate(addr, &pki).await? == wanted)
    })
    .await?;
    ensure!(cluster.metric(node, "muster_tls_reloads_total") == 1.0);

    // A broken key: the reload fails and the rotated configuration stays, for
    // clients and for peers (a write through the node still commits).
    std::fs::write(&settings.key, b"not a key")?;
    core.request_tls_reload();
    eventually(WAIT, "the failed reload is counted", || async {
        Ok(cluster.metric(node, "muster_tls_reload_failures_total") == 1.0)
    })
    .await?;
    ensure!(served_certificate(addr, &pki).await? == wanted);
    let client = client_of(&cluster, node, Some(trusting(&pki, None)?)).await?;
    client.register(spec("web-9"), None).await?;
    cluster.shutdown().await;
    Ok(())
}

#[test]
fn only_changed_files_are_read_again() -> Result<()> {
    let mut pki = TestPki::new("muster test CA")?;
    let settings = pki.node_settings("node-1", false)?;
    let tls = NodeTls::load(&settings)?;
    ensure!(!tls.reload_if_changed()?, "nothing changed");
    let other = pki.node("node-1-renewed-with-a-longer-name")?;
    std::fs::copy(&other.cert, &settings.cert)?;
    std::fs::copy(&other.key, &settings.key)?;
    ensure!(tls.reload_if_changed()?, "the files changed");
    ensure!(!tls.reload_if_changed()?, "read already");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_speaks_tls_to_a_tls_cluster() -> Result<()> {
    init_tracing();
    if !muster_tests::python_has("grpc, grpc_tools.protoc") {
        return muster_tests::missing("grpcio and grpcio-tools (PyPI)");
    }
    let mut pki = TestPki::new("muster test CA")?;
    let cluster = tls_cluster(&mut pki, false).await?;
    let follower = cluster.follower().await?;
    let other = cluster
        .running()
        .into_iter()
        .find(|id| *id != follower)
        .context("another node")?;
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    muster_tests::run_python_check(
        "grpc/py_grpc_check.py",
        &[
            proto.to_string(),
            cluster.grpc_addr(follower).to_string(),
            cluster.grpc_addr(other).to_string(),
            "-".into(),
            "-".into(),
            pki.ca_file.display().to_string(),
        ],
        "grpcio: all checks passed",
    )
    .await?;
    cluster.shutdown().await;
    Ok(())
}
