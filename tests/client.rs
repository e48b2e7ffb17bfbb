//! The client library against a real three-node cluster: the resolver's
//! watch-fed cache, keep-alive and resolution across the loss of the node in use,
//! survival with every node down, and the circuit breaker.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use muster_client::{
    BreakerPolicy, BreakerState, Client, ClientError, ClientOptions, DiscoverOptions, PickSource, PickStrategy,
    ReadMode, Resolver, ResolverOptions, RetryPolicy, StaticEndpoint, StaticFallback,
};
use muster_core::{Health, Instance, InstanceSpec};
use muster_testkit::{eventually, init_tracing, TestCluster};

const WAIT: Duration = Duration::from_secs(15);

fn spec(service: &str, id: &str, port: u16) -> InstanceSpec {
    InstanceSpec {
        service: service.into(),
        instance_id: id.into(),
        address: "127.0.0.1".into(),
        port,
        ..Default::default()
    }
}

/// A client of every node, `first` in use first.
async fn client_of(cluster: &TestCluster, first: u64, options: ClientOptions) -> Result<Client> {
    let mut ids = cluster.running();
    ids.sort_by_key(|id| *id != first);
    let addrs = ids.iter().map(|id| cluster.grpc_addr(*id).to_string()).collect();
    Ok(Client::connect_with(addrs, options).await?)
}

fn node_id_of(cluster: &TestCluster, addr: &str) -> u64 {
    cluster
        .running()
        .into_iter()
        .find(|id| cluster.grpc_addr(*id).to_string() == addr)
        .expect("the client uses a running node")
}

/// Waits, on the resolver's own change notifications, until `condition` holds.
async fn until(resolver: &Resolver, what: &str, condition: impl Fn(&Resolver) -> bool) -> Result<()> {
    let wait = async {
        loop {
            let changed = resolver.changed();
            if condition(resolver) {
                return;
            }
            changed.await;
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .with_context(|| format!("timed out after {WAIT:?} waiting for {what}"))
}

fn ids(instances: &[Arc<Instance>]) -> Vec<String> {
    let mut ids: Vec<String> = instances.iter().map(|i| i.instance_id.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn the_resolver_follows_registrations_health_and_removals() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let follower = cluster.follower().await?;
    let client = client_of(&cluster, follower, ClientOptions::default()).await?;

    client.register(spec("web", "web-1", 9001), None).await?;
    let web = client.resolver("web").await;
    ensure!(web.has_registry_answer() && !web.is_stale());
    ensure!(ids(&web.instances()) == ["web-1"]);
    ensure!(web.pick()?.url("/a?b=1") == "http://127.0.0.1:9001/a?b=1");

    // A new instance arrives through the watch.
    client.register(spec("web", "web-2", 9002), None).await?;
    until(&web, "web-2 in the cache", |r| r.instances().len() == 2).await?;
    let picks: Vec<String> = (0..4)
        .map(|_| web.pick().map(|p| p.instance.instance_id.clone()))
        .collect::<Result<_, _>>()?;
    ensure!(
        picks[0] != picks[1] && picks[0] == picks[2] && picks[1] == picks[3],
        "round robin: {picks:?}"
    );

    // A critical instance is skipped; with none healthy left, the reason says so.
    client.set_health("", "web", "web-1", Health::Critical).await?;
    until(&web, "web-1 critical", |r| {
        r.instances()
            .iter()
            .any(|i| i.instance_id == "web-1" && i.health == Health::Critical)
    })
    .await?;
    for _ in 0..4 {
        ensure!(web.pick()?.instance.instance_id == "web-2");
    }

    // A removed instance disappears.
    client.deregister("", "web", "web-2").await?;
    until(&web, "web-2 gone", |r| r.instances().len() == 1).await?;
    match web.pick() {
        Err(ClientError::NoInstance { service, reason }) => {
            ensure!(service == "web" && reason.contains("critical"), "{reason}")
        }
        other => anyhow::bail!("expected no instance, got {other:?}"),
    }

    // service_url keeps one resolver per service.
    client.register(spec("api", "api-1", 9100), None).await?;
    ensure!(client.service_url("api", "/v1/x").await? == "http://127.0.0.1:9100/v1/x");
    ensure!(client.service_url("api", "v1/y").await? == "http://127.0.0.1:9100/v1/y");
    ensure!(client.cached_resolvers().len() == 1);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn maintenance_drains_an_instance_from_resolvers_and_discovery_until_it_ends() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let client = client_of(&cluster, cluster.follower().await?, ClientOptions::default()).await?;
    client.register(spec("shop", "shop-1", 9201), None).await?;
    client.register(spec("shop", "shop-2", 9202), None).await?;
    let shop = client.resolver("shop").await;
    until(&shop, "both instances", |r| r.instances().len() == 2).await?;

    let drained = client
        .set_maintenance("", "shop", "shop-1", Some("rolling deploy"))
        .await?;
    ensure!(drained.health == Health::Critical);
    let m = drained.maintenance().context("the answer shows maintenance")?;
    ensure!(
        m.notes == "rolling deploy" && m.id == "_service_maintenance:shop-1",
        "{m:?}"
    );
    ensure!(drained.health_without_maintenance() == Health::Passing);

    // The resolver hears it through its watch: still listed, never picked.
    until(&shop, "shop-1 in maintenance", |r| {
        r.instances()
            .iter()
            .any(|i| i.instance_id == "shop-1" && i.maintenance().is_some())
    })
    .await?;
    for _ in 0..4 {
        ensure!(shop.pick()?.instance.instance_id == "shop-2");
    }
    let healthy = DiscoverOptions {
        health: vec![Health::Passing],
        ..Default::default()
    };
    let (found, _) = client.discover("shop", &healthy).await?;
    ensure!(found.iter().map(|i| i.instance_id.as_str()).collect::<Vec<_>>() == ["shop-2"]);

    let back = client.set_maintenance("", "shop", "shop-1", None).await?;
    ensure!(back.health == Health::Passing && back.maintenance().is_none());
    until(&shop, "shop-1 back", |r| {
        r.instances()
            .iter()
            .all(|i| i.health == Health::Passing && i.maintenance().is_none())
    })
    .await?;
    let unknown = client.set_maintenance("", "shop", "nope", Some("x")).await;
    ensure!(matches!(unknown, Err(ClientError::NotFound(_))), "{unknown:?}");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn weighted_and_zone_preferring_picks_follow_the_registry() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let client = client_of(&cluster, 1, ClientOptions::default()).await?;
    for (id, port, weight, zone) in [("a", 9001, 3, "z1"), ("b", 9002, 1, "z1"), ("c", 9003, 1, "z2")] {
        let mut s = spec("pay", id, port);
        s.weight = weight;
        s.zone = zone.into();
        client.register(s, None).await?;
    }
    let in_z1 = client
        .resolver_with(
            "pay",
            ResolverOptions {
                strategy: PickStrategy::Weighted,
                prefer_zone: Some("z1".into()),
                ..ResolverOptions::default()
            },
        )
        .await;
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..8 {
        *counts.entry(in_z1.pick()?.instance.instance_id.clone()).or_insert(0) += 1;
    }
    ensure!(
        counts == [("a".to_string(), 6), ("b".to_string(), 2)].into_iter().collect(),
        "weights 3:1 within zone z1: {counts:?}"
    );

    // With zone z1 gone, the other zone serves.
    client.deregister("", "pay", "a").await?;
    client.deregister("", "pay", "b").await?;
    until(&in_z1, "zone z1 empty", |r| r.instances().len() == 1).await?;
    ensure!(in_z1.pick()?.instance.instance_id == "c");
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn losing_the_node_in_use_stops_neither_keep_alive_nor_resolution() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    let leader = cluster.wait_for_leader(WAIT).await?;
    // Use the leader first, so its loss also moves leadership.
    let client = client_of(&cluster, leader, ClientOptions::default()).await?;
    let ttl = Duration::from_secs(2);
    let registration = client
        .register_with_keepalive(spec("orders", "orders-1", 9301), ttl)
        .await?;
    let lease = registration.lease_id();
    let orders = client.resolver("orders").await;
    ensure!(ids(&orders.instances()) == ["orders-1"]);

    let in_use = node_id_of(&cluster, client.current_node());
    cluster.stop(in_use).await;

    // Resolution goes on: a registration made through a surviving node reaches
    // the resolver, whose watch moved to another node.
    let survivor = cluster.running()[0];
    let other = client_of(&cluster, survivor, ClientOptions::default()).await?;
    other.register(spec("orders", "orders-2", 9302), None).await?;
    until(&orders, "orders-2 through the moved watch", |r| {
        r.instances().len() == 2
    })
    .await?;

    // The lease outlives several TTLs: the keep-alive moved too. (Waiting here is
    // the scenario, not synchronisation: only time passing can expire a lease.)
    tokio::time::sleep(ttl * 3).await;
    let (found, _) = other
        .discover(
            "orders",
            &DiscoverOptions {
                mode: ReadMode::Linearizable,
                ..Default::default()
            },
        )
        .await?;
    let kept = found
        .iter()
        .find(|i| i.instance_id == "orders-1")
        .context("orders-1 expired")?;
    ensure!(kept.lease_id == Some(lease), "the same lease, not a re-registration");
    ensure!(registration.lease_id() == lease);
    ensure!(orders.instances().iter().any(|i| i.instance_id == "orders-1"));
    ensure!(client.current_node() != cluster.grpc_addr(in_use).to_string());
    registration.deregister().await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn with_every_node_stopped_the_cache_and_the_fallback_answer() -> Result<()> {
    init_tracing();
    let mut cluster = TestCluster::start(3).await?;
    let mut fallback = StaticFallback::none();
    fallback.insert(
        "legacy",
        vec![StaticEndpoint::parse("10.1.2.3:8080").map_err(anyhow::Error::msg)?],
    );
    let options = ClientOptions {
        connect_timeout: Duration::from_millis(200),
        retry: RetryPolicy {
            max_elapsed: Duration::from_secs(1),
            ..RetryPolicy::default()
        },
        fallback,
        ..ClientOptions::default()
    };
    let client = client_of(&cluster, 1, options).await?;
    client.register(spec("search", "search-1", 9401), None).await?;
    client.register(spec("search", "search-2", 9402), None).await?;
    let search = client.resolver("search").await;
    ensure!(search.instances().len() == 2 && !search.is_stale());

    for id in cluster.running() {
        cluster.stop(id).await;
    }
    until(&search, "the cache marked stale", Resolver::is_stale).await?;
    let picked = search.pick()?;
    ensure!(picked.stale && picked.source == PickSource::Registry);
    ensure!(ids(&search.instances()) == ["search-1", "search-2"]);
    let status = search.status();
    ensure!(status.stale && status.last_error.is_some(), "{status:?}");

    // A service never seen answers from the static fallback.
    ensure!(client.service_url("legacy", "/health").await? == "http://10.1.2.3:8080/health");
    let legacy = client.cached_resolver("legacy").await;
    ensure!(legacy.pick()?.source == PickSource::Fallback);
    // One neither seen nor in the fallback is a clear error.
    match client.service_url("nowhere", "/").await {
        Err(ClientError::NoInstance { service, reason }) => {
            ensure!(service == "nowhere" && reason.contains("fallback"), "{reason}")
        }
        other => anyhow::bail!("expected no instance, got {other:?}"),
    }

    // When the nodes come back, the cache is current again.
    for id in [1, 2, 3] {
        cluster.restart(id).await?;
    }
    cluster.wait_for_leader(WAIT).await?;
    until(&search, "the cache fresh again", |r| !r.is_stale()).await?;
    client.deregister("", "search", "search-1").await?;
    until(&search, "search-1 gone after the outage", |r| r.instances().len() == 1).await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_breaker_skips_a_failing_instance_and_lets_it_back() -> Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3).await?;
    let client = client_of(&cluster, 1, ClientOptions::default()).await?;
    client.register(spec("cart", "cart-1", 9501), None).await?;
    client.register(spec("cart", "cart-2", 9502), None).await?;
    let cart = client
        .resolver_with(
            "cart",
            ResolverOptions {
                breaker: BreakerPolicy {
                    failure_threshold: 2,
                    cool_down: Duration::from_millis(300),
                },
                ..ResolverOptions::default()
            },
        )
        .await;
    ensure!(cart.instances().len() == 2);

    cart.record_failure("cart-1");
    ensure!(cart.breaker_state("cart-1") == BreakerState::Closed);
    cart.record_failure("cart-1");
    ensure!(cart.breaker_state("cart-1") == BreakerState::Open);
    for _ in 0..6 {
        ensure!(cart.pick()?.instance.instance_id == "cart-2");
    }

    // After the cool-down one trial call goes to cart-1; its success closes the breaker.
    eventually(WAIT, "the breaker half-open", || async {
        Ok(cart.breaker_state("cart-1") == BreakerState::HalfOpen)
    })
    .await?;
    let trial = (0..2)
        .map(|_| cart.pick().map(|p| p.instance.instance_id.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    ensure!(trial.iter().filter(|id| *id == "cart-1").count() == 1, "{trial:?}");
    cart.record_success("cart-1");
    ensure!(cart.breaker_state("cart-1") == BreakerState::Closed);
    let after = (0..4)
        .map(|_| cart.pick().map(|p| p.instance.instance_id.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    ensure!(after.iter().filter(|id| *id == "cart-1").count() == 2, "{after:?}");

    // The status page shows the breakers.
    cart.record_failure("cart-2");
    let status = cart.status();
    let cart2 = status
        .instances
        .iter()
        .find(|i| i.instance_id == "cart-2")
        .context("cart-2")?;
    ensure!(cart2.consecutive_failures == 1 && cart2.breaker == BreakerState::Closed);
    cluster.shutdown().await;
    Ok(())
}
