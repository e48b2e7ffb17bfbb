//! Watch streams that survive node failures.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use muster_core::{DeleteReason, Event, EventKind, Instance, InstanceKey, Revision};
use muster_proto::convert;
use muster_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::client::{registry_client, Client};
use crate::error::{is_retryable, retry_after, ClientError};

/// One message of a watch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WatchItem {
    /// A change.
    Event(Event),
    /// The complete matching state at `revision`: replaces whatever the watcher
    /// held (sent when the server's history no longer reaches back to the
    /// requested revision, or the watcher fell behind).
    Reset {
        /// The revision of the snapshot.
        revision: Revision,
        /// Every matching instance at that revision.
        instances: Vec<Instance>,
    },
    /// Nothing matching changed up to this revision.
    Progress(Revision),
}

impl WatchItem {
    /// The revision this item brings the watcher to.
    pub fn revision(&self) -> Revision {
        match self {
            WatchItem::Event(e) => e.revision,
            WatchItem::Reset { revision, .. } => *revision,
            WatchItem::Progress(r) => *r,
        }
    }
}

fn delete_reason_from_pb(value: i32) -> Result<DeleteReason, ClientError> {
    match pb::DeleteReason::try_from(value) {
        Ok(pb::DeleteReason::Deregistered) => Ok(DeleteReason::Deregistered),
        Ok(pb::DeleteReason::LeaseExpired) => Ok(DeleteReason::LeaseExpired),
        Ok(pb::DeleteReason::LeaseRevoked) => Ok(DeleteReason::LeaseRevoked),
        Ok(pb::DeleteReason::HealthEvicted) => Ok(DeleteReason::HealthEvicted),
        _ => Err(ClientError::MalformedResponse(format!("unknown delete reason {value}"))),
    }
}

/// Reads one watch message into core types.
pub(crate) fn item_from_pb(message: pb::WatchResponse) -> Result<WatchItem, ClientError> {
    use pb::watch_response::Response;
    let missing = |what: &str| ClientError::MalformedResponse(format!("{what} is missing"));
    match message.response.ok_or_else(|| missing("WatchResponse.response"))? {
        Response::Event(event) => {
            let kind = match event.kind.ok_or_else(|| missing("Event.kind"))? {
                pb::event::Kind::Put(instance) => EventKind::Put(Arc::new(convert::instance_from_pb(&instance))),
                pb::event::Kind::Delete(delete) => {
                    let key = delete.key.ok_or_else(|| missing("Delete.key"))?;
                    EventKind::Delete {
                        key: InstanceKey::new(&key.namespace, &key.service, &key.instance_id),
                        reason: delete_reason_from_pb(delete.reason)?,
                    }
                }
            };
            Ok(WatchItem::Event(Event {
                revision: event.revision,
                kind,
            }))
        }
        Response::Reset(reset) => Ok(WatchItem::Reset {
            revision: reset.revision,
            instances: reset.instances.iter().map(convert::instance_from_pb).collect(),
        }),
        Response::Progress(p) => Ok(WatchItem::Progress(p.revision)),
    }
}

/// A stream of [`WatchItem`]s from [`Client::watch`]. Dropping it ends the watch.
#[derive(Debug)]
pub struct WatchStream {
    rx: mpsc::Receiver<Result<WatchItem, ClientError>>,
    task: AbortHandle,
}

impl WatchStream {
    pub(crate) fn start(client: Client, namespace: String, service: String, start_revision: Revision) -> Self {
        let (tx, rx) = mpsc::channel(256);
        let task = tokio::spawn(run(client, namespace, service, start_revision, tx)).abort_handle();
        WatchStream { rx, task }
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchItem, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Feeds `tx` until the receiver goes away or the watch cannot go on.
async fn run(
    client: Client,
    namespace: String,
    service: String,
    start_revision: Revision,
    tx: mpsc::Sender<Result<WatchItem, ClientError>>,
) {
    // "From now on" is pinned to a revision first, so that a reopened stream knows
    // where to resume even before the first message arrives.
    let mut next = start_revision;
    if next == 0 {
        match client.status().await {
            Ok(status) => next = status.revision + 1,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
    let max = client.options().max_message_bytes;
    let mut backoff = client.backoff();
    loop {
        let (idx, node) = client.current();
        let request = pb::WatchRequest {
            namespace: namespace.clone(),
            service: service.clone(),
            start_revision: next,
        };
        let mut rpc = registry_client(node.channel.clone(), max);
        let opened = tokio::select! {
            _ = tx.closed() => return,
            opened = rpc.watch(request) => opened,
        };
        let failure = match opened {
            Err(status) => status,
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    let message = tokio::select! {
                        _ = tx.closed() => return,
                        message = stream.message() => message,
                    };
                    match message {
                        Ok(Some(message)) => {
                            backoff.reset(client.node_count());
                            let item = match item_from_pb(message) {
                                Ok(item) => item,
                                Err(e) => {
                                    let _ = tx.send(Err(e)).await;
                                    return;
                                }
                            };
                            next = next.max(item.revision() + 1);
                            if let WatchItem::Reset { revision, .. } = &item {
                                next = revision + 1;
                            }
                            if tx.send(Ok(item)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break tonic::Status::unavailable("the node ended the watch"),
                        Err(status) => break status,
                    }
                }
            }
        };
        if !is_retryable(&failure) && failure.code() != tonic::Code::Cancelled {
            let _ = tx.send(Err(ClientError::from_status(&failure))).await;
            return;
        }
        client.advance_from(idx);
        match backoff.next_delay(retry_after(&failure)) {
            Some(delay) => {
                tracing::debug!(node = %node.addr, error = %failure.message(), resume_from = next, "watch interrupted; reopening");
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            None => {
                let _ = tx
                    .send(Err(ClientError::Unavailable {
                        attempts: backoff.failures(),
                        last: format!("{}: {}", node.addr, failure.message()),
                    }))
                    .await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delete_event_is_read_into_core_types() {
        let message = pb::WatchResponse {
            response: Some(pb::watch_response::Response::Event(pb::Event {
                revision: 7,
                kind: Some(pb::event::Kind::Delete(pb::Delete {
                    key: Some(pb::InstanceRef {
                        namespace: String::new(),
                        service: "web".into(),
                        instance_id: "w1".into(),
                    }),
                    reason: pb::DeleteReason::LeaseExpired as i32,
                })),
            })),
        };
        let item = item_from_pb(message).unwrap();
        assert_eq!(item.revision(), 7);
        let WatchItem::Event(Event {
            kind: EventKind::Delete { key, reason },
            ..
        }) = item
        else {
            panic!("expected a delete");
        };
        assert_eq!(key, InstanceKey::new("default", "web", "w1"));
        assert_eq!(reason, DeleteReason::LeaseExpired);
    }

    #[test]
    fn a_message_without_content_is_malformed_not_a_panic() {
        assert!(matches!(
            item_from_pb(pb::WatchResponse { response: None }),
            Err(ClientError::MalformedResponse(_))
        ));
        let event = pb::WatchResponse {
            response: Some(pb::watch_response::Response::Event(pb::Event {
                revision: 1,
                kind: None,
            })),
        };
        assert!(matches!(item_from_pb(event), Err(ClientError::MalformedResponse(_))));
    }
}
