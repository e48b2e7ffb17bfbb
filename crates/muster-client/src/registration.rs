//! A registration kept alive by a background task.
//!
//! The task holds one `KeepAlive` stream open on the node in use and renews the
//! lease every TTL/3. When the stream breaks it moves to the next node (with
//! backoff, never giving up); when the server says the lease is gone (an answer
//! with `ttl_ms == 0`, e.g. after an outage longer than the TTL) it registers the
//! instance again on a new lease.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use muster_core::{InstanceKey, InstanceSpec, LeaseId};
use muster_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{registry_client, Client};
use crate::error::ClientError;
use crate::types::Registered;

/// An instance registered on its own lease, kept alive until [`deregister`] is
/// awaited or the handle is dropped.
///
/// Dropping the handle stops the keep-alives and revokes the lease in a spawned
/// task (best effort: it needs a running Tokio runtime). Await [`deregister`] to
/// know the instance is gone.
///
/// [`deregister`]: Registration::deregister
#[derive(Debug)]
pub struct Registration {
    client: Client,
    key: InstanceKey,
    ttl: Duration,
    initial: Registered,
    lease: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Registration {
    pub(crate) async fn start(client: Client, mut spec: InstanceSpec, ttl: Duration) -> Result<Self, ClientError> {
        // The lease is granted with the instance, so the handle owns it alone.
        spec.lease_id = None;
        let initial = client.register(spec.clone(), Some(ttl)).await?;
        let lease_id = initial
            .lease_id
            .ok_or_else(|| ClientError::MalformedResponse("RegisterResponse.lease_id is 0 for a TTL".into()))?;
        let lease = Arc::new(AtomicU64::new(lease_id));
        let (stop, stopped) = watch::channel(false);
        let key = spec.key();
        let task = tokio::spawn(keep_alive(client.clone(), spec, ttl, lease.clone(), stopped));
        Ok(Registration {
            client,
            key,
            ttl,
            initial,
            lease,
            stop,
            task: Some(task),
        })
    }

    /// The lease keeping the instance alive. It changes if the instance had to be
    /// registered again after its lease was lost.
    pub fn lease_id(&self) -> LeaseId {
        self.lease.load(Ordering::Acquire)
    }

    /// The registered instance's key.
    pub fn key(&self) -> &InstanceKey {
        &self.key
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The answer to the first registration.
    pub fn registered(&self) -> &Registered {
        &self.initial
    }

    /// Stops the keep-alives and revokes the lease, removing the instance.
    ///
    /// A lease that has already expired counts as success.
    pub async fn deregister(mut self) -> Result<(), ClientError> {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            // The task stops at its next await point; a re-registration in flight
            // finishes first, so the lease revoked below is the latest one.
            let _ = tokio::time::timeout(self.ttl, task).await;
        }
        match self.client.revoke_lease(self.lease_id()).await {
            Ok(_) | Err(ClientError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        let _ = self.stop.send(true);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            task.abort();
            return;
        };
        let client = self.client.clone();
        let lease = self.lease.clone();
        let ttl = self.ttl;
        runtime.spawn(async move {
            let _ = tokio::time::timeout(ttl, task).await;
            let lease_id = lease.load(Ordering::Acquire);
            if let Err(e) = client.revoke_lease(lease_id).await {
                tracing::debug!(lease_id, error = %e, "revoking the lease of a dropped registration failed");
            }
        });
    }
}

/// What one keep-alive exchange found.
enum Beat {
    Renewed,
    /// The lease is gone; `stream_ended` when the answer was an error that closed
    /// the stream.
    LeaseGone {
        stream_ended: bool,
    },
    StreamBroken(String),
}

async fn keep_alive(
    client: Client,
    spec: InstanceSpec,
    ttl: Duration,
    lease: Arc<AtomicU64>,
    mut stopped: watch::Receiver<bool>,
) {
    let every = (ttl / 3).max(Duration::from_millis(100));
    let max = client.options().max_message_bytes;
    let mut backoff = client.backoff();
    loop {
        let (idx, node) = client.current();
        let (requests, outbound) = mpsc::channel(4);
        let mut rpc = registry_client(node.channel.clone(), max);
        let opened = tokio::select! {
            _ = stopped.changed() => return,
            opened = rpc.keep_alive(ReceiverStream::new(outbound)) => opened,
        };
        // Why the stream has to be opened again, and whether on another node.
        let (why, move_on) = match opened {
            Err(status) => (status.message().to_string(), true),
            Ok(response) => {
                let mut inbound = response.into_inner();
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stopped.changed() => return,
                        _ = tick.tick() => {}
                    }
                    let lease_id = lease.load(Ordering::Acquire);
                    let beat = if requests.send(pb::KeepAliveRequest { lease_id }).await.is_err() {
                        Beat::StreamBroken("keep-alive stream closed".into())
                    } else {
                        tokio::select! {
                            _ = stopped.changed() => return,
                            answer = tokio::time::timeout(every, inbound.message()) => match answer {
                                Ok(Ok(Some(a))) if a.ttl_ms > 0 => Beat::Renewed,
                                Ok(Ok(Some(_))) => Beat::LeaseGone { stream_ended: false },
                                Ok(Ok(None)) => Beat::StreamBroken("keep-alive stream ended".into()),
                                Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                                    Beat::LeaseGone { stream_ended: true }
                                }
                                Ok(Err(status)) => Beat::StreamBroken(status.message().to_string()),
                                Err(_) => Beat::StreamBroken(format!("no keep-alive answer within {every:?}")),
                            }
                        }
                    };
                    match beat {
                        Beat::Renewed => backoff.reset(client.node_count()),
                        Beat::LeaseGone { stream_ended } => {
                            reregister(&client, &spec, ttl, &lease, lease_id).await;
                            if stream_ended {
                                break ("stream ended with the lease".to_string(), false);
                            }
                        }
                        Beat::StreamBroken(why) => break (why, true),
                    }
                }
            }
        };
        if move_on {
            tracing::debug!(node = %node.addr, error = %why, "keep-alive stream broken; moving to the next node");
            client.advance_from(idx);
        }
        // Keep-alives never give up: when the budget is spent, start it afresh.
        let delay = match backoff.next_delay(None) {
            Some(d) => d,
            None => {
                tracing::warn!(instance = %spec.key(), error = %why, "no node accepts keep-alives; still trying");
                backoff.reset(client.node_count());
                client.options().retry.max_delay
            }
        };
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Registers the instance again on a new lease after `old` was lost. A failure is
/// logged and tried again on the next beat.
async fn reregister(client: &Client, spec: &InstanceSpec, ttl: Duration, lease: &AtomicU64, old: LeaseId) {
    tracing::warn!(lease_id = old, instance = %spec.key(), "lease lost; registering again");
    match client.register(spec.clone(), Some(ttl)).await {
        Ok(Registered {
            lease_id: Some(new), ..
        }) => {
            lease.store(new, Ordering::Release);
            tracing::info!(lease_id = new, instance = %spec.key(), "registered again on a new lease");
        }
        Ok(_) => tracing::warn!(instance = %spec.key(), "registered again but the server granted no lease"),
        Err(e) => tracing::warn!(instance = %spec.key(), error = %e, "registering again failed; will retry"),
    }
}
