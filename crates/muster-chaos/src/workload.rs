//! The load a round runs while faults happen: writers (register, deregister,
//! maintenance and linearizable discovery against every node), lease owners (register under a
//! lease, keep it alive, revoke it) and watchers (one stream each, resumed on
//! another node when it breaks). Everything is recorded with call and return times.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use muster_proto::v1 as pb;
use muster_proto::v1::registry_client::RegistryClient;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::history::{
    KeepAliveRecord, LeaseRecord, Micros, OpRecord, Recorder, Request, Response, Seen, WatchItem, WatchRecord,
};

/// The one service every instance of a round belongs to.
pub const SERVICE: &str = "chaos";
/// TTL of the owners' leases.
pub const LEASE_TTL_MS: u64 = 4_000;
/// How often an owner renews.
const KEEPALIVE_EVERY: Duration = Duration::from_millis(300);
/// How long an owner waits for a renewal before trying another node.
const KEEPALIVE_PATIENCE: Duration = Duration::from_millis(900);
/// Client-side deadline of one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The shape of the load.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Writer clients.
    pub writers: usize,
    /// Plain keys the writers share.
    pub keys: usize,
    /// Lease owners (one leased key each).
    pub lease_owners: usize,
    /// Watchers.
    pub watchers: usize,
    /// Pause between a writer's operations (random up to this).
    pub think: Duration,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            writers: 5,
            keys: 6,
            lease_owners: 2,
            watchers: 3,
            think: Duration::from_millis(25),
        }
    }
}

impl LoadConfig {
    /// The plain keys.
    pub fn plain_keys(&self) -> Vec<String> {
        (0..self.keys).map(|i| format!("k{i}")).collect()
    }

    /// The leased key of each owner.
    pub fn lease_keys(&self) -> Vec<String> {
        (0..self.lease_owners).map(|i| format!("lease-{i}")).collect()
    }
}

/// Channels to every node, reconnecting by themselves after a node restarts.
#[derive(Clone)]
pub struct Nodes {
    channels: BTreeMap<u64, Channel>,
}

impl Nodes {
    /// Lazily connected channels to `addrs`.
    pub fn new(addrs: &BTreeMap<u64, SocketAddr>) -> anyhow::Result<Self> {
        let mut channels = BTreeMap::new();
        for (id, addr) in addrs {
            let channel = Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_millis(500))
                .timeout(REQUEST_TIMEOUT)
                .tcp_nodelay(true)
                .connect_lazy();
            channels.insert(*id, channel);
        }
        Ok(Nodes { channels })
    }

    /// Node ids.
    pub fn ids(&self) -> Vec<u64> {
        self.channels.keys().copied().collect()
    }

    fn registry(&self, id: u64) -> RegistryClient<Channel> {
        RegistryClient::new(self.channels[&id].clone())
    }

    fn pick(&self, rng: &mut StdRng) -> u64 {
        let ids = self.ids();
        ids[rng.gen_range(0..ids.len())]
    }
}

/// Whether an error proves the request had no effect.
fn classify(status: &tonic::Status) -> Response {
    let message = status.message().to_string();
    let not_sent = ["Connection refused", "tcp connect error", "error trying to connect"]
        .iter()
        .any(|m| message.contains(m))
        || format!("{status:?}").contains("Connection refused");
    match status.code() {
        tonic::Code::NotFound => Response::NotFound,
        tonic::Code::InvalidArgument
        | tonic::Code::AlreadyExists
        | tonic::Code::FailedPrecondition
        | tonic::Code::PermissionDenied
        | tonic::Code::Unauthenticated
        | tonic::Code::OutOfRange
        | tonic::Code::Unimplemented => Response::Failed {
            error: format!("{:?}: {message}", status.code()),
        },
        _ if not_sent => Response::Failed {
            error: format!("not sent: {message}"),
        },
        code => Response::Unknown {
            error: format!("{code:?}: {message}"),
        },
    }
}

fn seen(i: &pb::Instance) -> Seen {
    Seen {
        key: i.instance_id.clone(),
        value: i.metadata.get("v").cloned().unwrap_or_default(),
        mod_revision: i.mod_revision,
        lease_id: i.lease_id,
        maintenance: i.maintenance.is_some(),
    }
}

fn instance(key: &str, value: &str, lease_id: u64) -> pb::Instance {
    pb::Instance {
        service: SERVICE.into(),
        instance_id: key.into(),
        address: "10.0.0.1".into(),
        port: 8080,
        metadata: [("v".to_string(), value.to_string())].into(),
        lease_id,
        ..Default::default()
    }
}

/// Sends one request and records it.
pub async fn perform(nodes: &Nodes, rec: &Recorder, client: usize, node: u64, request: Request) -> OpRecord {
    let mut c = nodes.registry(node);
    let call = rec.now();
    let response = match &request {
        Request::Register {
            key,
            value,
            leased,
            lease_id,
        } => {
            let ttl_ms = if *leased && *lease_id == 0 { LEASE_TTL_MS } else { 0 };
            match c
                .register(pb::RegisterRequest {
                    instance: Some(instance(key, value, *lease_id)),
                    ttl_ms,
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    Response::Ok {
                        lease_id: r.lease_id,
                        revision: r.header.map_or(0, |h| h.revision),
                    }
                }
                Err(s) => classify(&s),
            }
        }
        Request::Deregister { key } => match c
            .deregister(pb::DeregisterRequest {
                namespace: String::new(),
                service: SERVICE.into(),
                instance_id: key.clone(),
            })
            .await
        {
            Ok(r) => Response::Ok {
                lease_id: 0,
                revision: r.into_inner().header.map_or(0, |h| h.revision),
            },
            Err(s) => classify(&s),
        },
        Request::GrantLease => match c
            .grant_lease(pb::GrantLeaseRequest {
                ttl_ms: LEASE_TTL_MS,
                lease_id: 0,
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                Response::Ok {
                    lease_id: r.lease_id,
                    revision: r.header.map_or(0, |h| h.revision),
                }
            }
            Err(s) => classify(&s),
        },
        Request::Revoke { lease_id, .. } => {
            match c.revoke_lease(pb::RevokeLeaseRequest { lease_id: *lease_id }).await {
                Ok(r) => Response::Revoked {
                    removed: r.into_inner().removed,
                },
                Err(s) => classify(&s),
            }
        }
        Request::SetMaintenance { key, enable } => match c
            .set_maintenance(pb::SetMaintenanceRequest {
                namespace: String::new(),
                service: SERVICE.into(),
                instance_id: key.clone(),
                enable: *enable,
                reason: format!("chaos client {client}"),
            })
            .await
        {
            Ok(r) => Response::Ok {
                lease_id: 0,
                revision: r.into_inner().header.map_or(0, |h| h.revision),
            },
            Err(s) => classify(&s),
        },
        Request::Read => match c
            .discover(pb::DiscoverRequest {
                service: SERVICE.into(),
                mode: pb::ReadMode::Linearizable as i32,
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                let mut instances: Vec<Seen> = r.instances.iter().map(seen).collect();
                instances.sort();
                Response::Read {
                    instances,
                    service_revision: r.service_revision,
                    revision: r.header.map_or(0, |h| h.revision),
                }
            }
            Err(s) => classify(&s),
        },
    };
    let op = OpRecord {
        client,
        node,
        call,
        ret: rec.now(),
        request,
        response,
    };
    rec.record(op.clone());
    op
}

/// A local read of the service on one node (after recovery).
pub async fn local_read(nodes: &Nodes, node: u64) -> anyhow::Result<(Vec<Seen>, u64)> {
    let r = nodes
        .registry(node)
        .discover(pb::DiscoverRequest {
            service: SERVICE.into(),
            mode: pb::ReadMode::Local as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut instances: Vec<Seen> = r.instances.iter().map(seen).collect();
    instances.sort();
    Ok((instances, r.service_revision))
}

/// A writer: random registrations, deregistrations, maintenance and linearizable
/// reads of the plain keys against random nodes, until `stop`.
pub async fn writer(
    nodes: Nodes,
    rec: Recorder,
    config: LoadConfig,
    client: usize,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let keys = config.plain_keys();
    let mut n = 0u64;
    while !*stop.borrow() {
        let node = nodes.pick(&mut rng);
        let key = keys[rng.gen_range(0..keys.len())].clone();
        let roll = rng.gen_range(0..100);
        let request = if roll < 35 {
            n += 1;
            Request::Register {
                key,
                value: format!("w{client}-{n}"),
                leased: false,
                lease_id: 0,
            }
        } else if roll < 50 {
            Request::Deregister { key }
        } else if roll < 58 {
            Request::SetMaintenance {
                key,
                enable: rng.gen_bool(0.6),
            }
        } else {
            Request::Read
        };
        perform(&nodes, &rec, client, node, request).await;
        let think = rng.gen_range(Duration::ZERO..=config.think);
        tokio::select! {
            _ = tokio::time::sleep(think) => {}
            _ = stop.changed() => {}
        }
    }
}

/// A lease owner: registers its key under a fresh lease (granted with the
/// registration or beforehand), keeps the lease alive through a keep-alive stream
/// (moving to another node when one does not answer), revokes it after a while, and
/// starts over, until `stop`. Returns the leases it held.
pub async fn lease_owner(
    nodes: Nodes,
    rec: Recorder,
    owner: usize,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) -> Vec<LeaseRecord> {
    let mut rng = StdRng::seed_from_u64(seed);
    let client = 100 + owner;
    let key = format!("lease-{owner}");
    let mut leases = Vec::new();
    let mut n = 0u64;
    let mut node = nodes.pick(&mut rng);
    while !*stop.borrow() {
        n += 1;
        let value = format!("l{owner}-{n}");
        // Lease first (half the time), else granted with the registration.
        let mut lease_id = 0;
        let mut grant_call = None;
        if rng.gen_bool(0.5) {
            let op = perform(&nodes, &rec, client, node, Request::GrantLease).await;
            grant_call = Some(op.call);
            match op.response {
                Response::Ok { lease_id: id, .. } => lease_id = id,
                _ => {
                    node = nodes.pick(&mut rng);
                    pause(&mut stop, Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let op = perform(
            &nodes,
            &rec,
            client,
            node,
            Request::Register {
                key: key.clone(),
                value,
                leased: true,
                lease_id,
            },
        )
        .await;
        let granted = grant_call.unwrap_or(op.call);
        let lease_id = match op.response {
            Response::Ok { lease_id, .. } if lease_id != 0 => lease_id,
            _ => {
                // Not registered (or unknown): a lease granted beforehand is left to
                // expire, which is allowed.
                if lease_id != 0 {
                    leases.push(LeaseRecord {
                        owner,
                        lease_id,
                        ttl_ms: LEASE_TTL_MS,
                        key: key.clone(),
                        granted: grant_call.unwrap_or(op.call),
                        released_at: Some(op.ret),
                        keepalives: Vec::new(),
                    });
                }
                node = nodes.pick(&mut rng);
                pause(&mut stop, Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut lease = LeaseRecord {
            owner,
            lease_id,
            ttl_ms: LEASE_TTL_MS,
            key: key.clone(),
            granted,
            released_at: None,
            keepalives: Vec::new(),
        };
        let hold = Duration::from_millis(rng.gen_range(2_000..6_000));
        let lost = keep_alive(&nodes, &rec, &mut lease, &mut node, hold, &mut stop).await;
        if !lost {
            lease.released_at = Some(rec.now());
            perform(
                &nodes,
                &rec,
                client,
                node,
                Request::Revoke {
                    key: key.clone(),
                    lease_id,
                },
            )
            .await;
        }
        leases.push(lease);
    }
    leases
}

async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.changed() => {}
    }
}

/// Keeps `lease` alive for `hold` (or until `stop`); answers whether it was lost.
async fn keep_alive(
    nodes: &Nodes,
    rec: &Recorder,
    lease: &mut LeaseRecord,
    node: &mut u64,
    hold: Duration,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let until = tokio::time::Instant::now() + hold;
    let ids = nodes.ids();
    'streams: while tokio::time::Instant::now() < until && !*stop.borrow() {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::KeepAliveRequest>(4);
        let mut client = nodes.registry(*node);
        let opened = tokio::time::timeout(
            KEEPALIVE_PATIENCE,
            client.keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)),
        );
        // The stream opens only once the first request is queued.
        let _ = tx.try_send(pb::KeepAliveRequest {
            lease_id: lease.lease_id,
        });
        let mut first_call = Some(rec.now());
        let mut inbound = match opened.await {
            Ok(Ok(r)) => r.into_inner(),
            _ => {
                lease.keepalives.push(KeepAliveRecord {
                    lease_id: lease.lease_id,
                    node: *node,
                    call: first_call.unwrap_or_default(),
                    ret: rec.now(),
                    ttl_ms: None,
                });
                *node = next(&ids, *node);
                continue 'streams;
            }
        };
        loop {
            let call = match first_call.take() {
                Some(c) => c,
                None => {
                    let c = rec.now();
                    if tx
                        .send(pb::KeepAliveRequest {
                            lease_id: lease.lease_id,
                        })
                        .await
                        .is_err()
                    {
                        *node = next(&ids, *node);
                        continue 'streams;
                    }
                    c
                }
            };
            let answer = tokio::time::timeout(KEEPALIVE_PATIENCE, inbound.next()).await;
            let ret = rec.now();
            let ttl = match answer {
                Ok(Some(Ok(r))) => Some(r.ttl_ms),
                _ => None,
            };
            lease.keepalives.push(KeepAliveRecord {
                lease_id: lease.lease_id,
                node: *node,
                call,
                ret,
                ttl_ms: ttl,
            });
            match ttl {
                Some(0) => return true,
                Some(_) => {}
                None => {
                    *node = next(&ids, *node);
                    continue 'streams;
                }
            }
            if tokio::time::Instant::now() >= until || *stop.borrow() {
                return false;
            }
            pause(stop, KEEPALIVE_EVERY).await;
        }
    }
    false
}

fn next(ids: &[u64], current: u64) -> u64 {
    let i = ids.iter().position(|x| *x == current).unwrap_or(0);
    ids[(i + 1) % ids.len()]
}

/// A watcher of the whole registry: from revision 1, resumed after the last revision
/// it got on another node whenever its stream breaks. Stops once it has reached the
/// revision sent on `until` (or that channel closes).
pub async fn watcher(
    nodes: Nodes,
    rec: Recorder,
    seed: u64,
    mut until: watch::Receiver<Option<u64>>,
) -> Vec<WatchRecord> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut last = 0u64;
    let done = |last: u64, until: &watch::Receiver<Option<u64>>| until.borrow().is_some_and(|t| last >= t);
    let deadline_after_target = Duration::from_secs(15);
    let mut target_seen: Option<tokio::time::Instant> = None;
    loop {
        if done(last, &until) {
            return out;
        }
        if let Some(t) = target_seen {
            if t.elapsed() > deadline_after_target {
                out.push(WatchRecord {
                    at: rec.now(),
                    item: WatchItem::Disconnect {
                        error: format!("gave up catching up at revision {last}"),
                    },
                });
                return out;
            }
        }
        let node = nodes.pick(&mut rng);
        // Now and then a watcher starts over from revision 1, as a new client
        // would: once the history no longer reaches back that far, the node must
        // answer with a Reset carrying the whole state.
        if last > 0 && until.borrow().is_none() && rng.gen_bool(0.3) {
            last = 0;
        }
        let start = last + 1;
        out.push(WatchRecord {
            at: rec.now(),
            item: WatchItem::Connect { node, start },
        });
        let mut client = nodes.registry(node);
        let opened = client
            .watch(pb::WatchRequest {
                namespace: String::new(),
                service: String::new(),
                start_revision: start,
            })
            .await;
        let mut stream = match opened {
            Ok(s) => s.into_inner(),
            Err(e) => {
                out.push(WatchRecord {
                    at: rec.now(),
                    item: WatchItem::Disconnect { error: e.to_string() },
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Each stream lives a few seconds, so watchers move between nodes (and
        // resume, or start over) even when nothing fails.
        let stream_end = tokio::time::Instant::now() + Duration::from_millis(rng.gen_range(2_000..6_000));
        loop {
            if done(last, &until) {
                return out;
            }
            if until.borrow().is_none() && tokio::time::Instant::now() >= stream_end {
                out.push(WatchRecord {
                    at: rec.now(),
                    item: WatchItem::Disconnect {
                        error: "moving to another node".into(),
                    },
                });
                break;
            }
            if until.borrow().is_some() && target_seen.is_none() {
                target_seen = Some(tokio::time::Instant::now());
            }
            // A silent stream (a cut-off or paused node sends no progress either)
            // is abandoned for another node.
            let next = tokio::select! {
                m = tokio::time::timeout(Duration::from_secs(4), stream.next()) => m,
                _ = until.changed() => continue,
            };
            let message = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    out.push(WatchRecord {
                        at: rec.now(),
                        item: WatchItem::Disconnect { error: e.to_string() },
                    });
                    break;
                }
                Ok(None) => {
                    out.push(WatchRecord {
                        at: rec.now(),
                        item: WatchItem::Disconnect {
                            error: "stream ended".into(),
                        },
                    });
                    break;
                }
                Err(_) => {
                    out.push(WatchRecord {
                        at: rec.now(),
                        item: WatchItem::Disconnect {
                            error: "silent for 4s".into(),
                        },
                    });
                    break;
                }
            };
            let at = rec.now();
            let item = match message.response {
                Some(pb::watch_response::Response::Event(e)) => match e.kind {
                    Some(pb::event::Kind::Put(i)) => WatchItem::Put {
                        revision: e.revision,
                        instance: seen(&i),
                    },
                    Some(pb::event::Kind::Delete(d)) => WatchItem::Delete {
                        revision: e.revision,
                        key: d.key.map(|k| k.instance_id).unwrap_or_default(),
                        reason: d.reason,
                    },
                    None => continue,
                },
                Some(pb::watch_response::Response::Reset(r)) => {
                    let mut instances: Vec<Seen> = r.instances.iter().map(seen).collect();
                    instances.sort();
                    WatchItem::Reset {
                        revision: r.revision,
                        instances,
                    }
                }
                Some(pb::watch_response::Response::Progress(p)) => WatchItem::Progress { revision: p.revision },
                None => continue,
            };
            match &item {
                WatchItem::Put { revision, .. }
                | WatchItem::Delete { revision, .. }
                | WatchItem::Reset { revision, .. } => last = last.max(*revision),
                _ => {}
            }
            out.push(WatchRecord { at, item });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When, in round time, a record happened (for sorting reports).
pub fn at(record: &WatchRecord) -> Micros {
    record.at
}
