//! The HTTP/2 transport under the peer gRPC client: one connection per peer and lane
//! (snapshot chunks have their own, `network::Lane`), and
//! each call's headers and message handed to the connection together.
//!
//! A peer call is a small unary message on the commit path of every write. Sent
//! through a general-purpose channel it leaves as three TCP segments (HEADERS, DATA,
//! an empty DATA ending the stream), and a second follower's append can wait behind
//! the first's. Here the request body is collected first, then the headers and the
//! message are queued on the connection back to back with the end of the stream set
//! on the message, so one write carries the whole call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::identity::{ClusterIdentity, CLUSTER_ID_HEADER};
use crate::tls::NodeTls;

/// How long opening a connection to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How often an idle connection is pinged, and how long a ping may go unanswered.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// How long a ping may go unanswered after a call on the connection was given up
/// without an answer.
const SUSPECT_PATIENCE: Duration = Duration::from_millis(250);
/// Receive window of one call (one large append or snapshot chunk in flight).
const STREAM_WINDOW_BYTES: u32 = 2 * 1024 * 1024;
/// Receive window of the whole connection.
const CONNECTION_WINDOW_BYTES: u32 = 5 * 1024 * 1024;
/// Bytes buffered per call ahead of the peer's window.
const SEND_BUFFER_BYTES: usize = 1024 * 1024;
/// Largest header block accepted from a peer.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// A gRPC transport to one peer: a tower service from requests to responses over a
/// single HTTP/2 connection, opened on first use and reopened after it fails.
#[derive(Clone)]
pub struct PeerTransport {
    addr: Arc<str>,
    origin: http::Uri,
    slot: Arc<Mutex<ConnectionSlot>>,
    cluster: Arc<ClusterIdentity>,
    tls: Option<NodeTls>,
}

/// The open connection, if any, numbered so that a failure reported by a call made
/// on an old connection never closes a newer one.
#[derive(Default)]
struct ConnectionSlot {
    open: Option<OpenConnection>,
    opened: u64,
}

/// A connection in the slot.
#[derive(Clone)]
struct OpenConnection {
    number: u64,
    sender: SendRequest<Bytes>,
    /// Wakes the connection's keep-alive to ping at once (a call went unanswered).
    suspect: Arc<tokio::sync::Notify>,
}

impl PeerTransport {
    /// A transport to the peer at `addr` (`host:port`) whose calls name the cluster
    /// `cluster` once it is known, over TLS when `tls` is given; nothing is opened
    /// yet. Fails when `addr` is not a `host:port` address.
    pub fn new(addr: &str, cluster: Arc<ClusterIdentity>, tls: Option<NodeTls>) -> Result<Self, http::uri::InvalidUri> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(PeerTransport {
            addr: addr.into(),
            origin: http::Uri::try_from(format!("{scheme}://{addr}"))?,
            slot: Arc::new(Mutex::new(ConnectionSlot::default())),
            cluster,
            tls,
        })
    }

    /// The origin (`http://host:port`, `https://` with TLS) the peer's gRPC calls are
    /// addressed to.
    pub fn origin(&self) -> &http::Uri {
        &self.origin
    }

    fn unreachable(&self, message: impl std::fmt::Display) -> tonic::Status {
        tonic::Status::unavailable(format!("peer {} unreachable: {message}", self.addr))
    }

    /// The open connection, opening one if there is none. Callers queue behind an
    /// opening connection instead of each opening their own.
    async fn connection(&self) -> Result<OpenConnection, tonic::Status> {
        let mut slot = self.slot.lock().await;
        if let Some(open) = &slot.open {
            return Ok(open.clone());
        }
        let number = slot.opened + 1;
        let open = self.open(number).await?;
        slot.opened = number;
        slot.open = Some(open.clone());
        drop(slot);
        tracing::debug!(peer = %self.addr, connection = number, "peer connection opened");
        Ok(open)
    }

    /// Drops connection `number` if it is still the open one.
    async fn forget(&self, number: u64) {
        forget(&self.slot, number).await;
    }

    /// Opens connection `number` and starts the task that drives it; when that
    /// connection ends, the task takes it out of the slot.
    async fn open(&self, number: u64) -> Result<OpenConnection, tonic::Status> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&*self.addr))
            .await
            .map_err(|_| self.unreachable(format!("connect timed out after {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| self.unreachable(e))?;
        stream.set_nodelay(true).map_err(|e| self.unreachable(e))?;
        // Plain TCP goes to h2 as it is, with nothing in between.
        match &self.tls {
            None => self.start(number, stream).await,
            Some(tls) => {
                let handshake = tls.connect_peer(&self.addr, stream);
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
                    .await
                    .map_err(|_| self.unreachable(format!("TLS handshake timed out after {CONNECT_TIMEOUT:?}")))?
                    .map_err(|e| self.unreachable(format!("TLS: {e}")))?;
                self.start(number, stream).await
            }
        }
    }

    /// Opens HTTP/2 over `stream` as connection `number`, and starts the task that
    /// drives it.
    async fn start<T>(&self, number: u64, stream: T) -> Result<OpenConnection, tonic::Status>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_send_buffer_size(SEND_BUFFER_BYTES)
            .max_header_list_size(MAX_HEADER_LIST_BYTES)
            .enable_push(false)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| self.unreachable(e))?;
        let ping_pong = connection.ping_pong();
        let suspect = Arc::new(tokio::sync::Notify::new());
        let addr = self.addr.clone();
        let slot = Arc::downgrade(&self.slot);
        let suspected = suspect.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                result = connection => result.map_err(|e| e.to_string()),
                failure = keep_alive(ping_pong, suspected) => Err(failure),
            };
            match outcome {
                Ok(()) => tracing::debug!(peer = %addr, "peer connection closed"),
                Err(error) => tracing::debug!(peer = %addr, %error, "peer connection failed"),
            }
            if let Some(slot) = slot.upgrade() {
                forget(&slot, number).await;
            }
        });
        Ok(OpenConnection {
            number,
            sender,
            suspect,
        })
    }

    /// Sends one call: the whole message, then the response as it arrives.
    async fn send(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<PeerResponseBody>, tonic::Status> {
        let (mut parts, body) = request.into_parts();
        if let Some(header) = self.cluster.header() {
            parts.headers.insert(CLUSTER_ID_HEADER, header.clone());
        }
        let message = body.collect().await?.to_bytes();
        let OpenConnection {
            number,
            sender,
            suspect,
        } = self.connection().await?;
        let mut unanswered = UnansweredCall {
            suspect,
            answered: false,
        };
        let result = async {
            let mut sender = sender.ready().await?;
            let (response, mut stream) = sender.send_request(http::Request::from_parts(parts, ()), false)?;
            stream.send_data(message, true)?;
            response.await
        }
        .await;
        unanswered.answered = true;
        match result {
            Ok(response) => Ok(response.map(PeerResponseBody::new)),
            Err(error) if error.is_reset() => Err(tonic::Status::from_error(Box::new(error))),
            Err(error) => {
                if error.is_io() || error.is_go_away() {
                    self.forget(number).await;
                }
                Err(self.unreachable(error))
            }
        }
    }
}

/// Takes connection `number` out of `slot` if it is still the open one.
async fn forget(slot: &Mutex<ConnectionSlot>, number: u64) {
    let mut slot = slot.lock().await;
    if matches!(&slot.open, Some(open) if open.number == number) {
        slot.open = None;
    }
}

/// A call sent on a connection: given up before its answer came (its deadline
/// passed), it has the connection pinged at once.
struct UnansweredCall {
    suspect: Arc<tokio::sync::Notify>,
    answered: bool,
}

impl Drop for UnansweredCall {
    fn drop(&mut self) {
        if !self.answered {
            self.suspect.notify_one();
        }
    }
}

/// Pings the peer every [`KEEP_ALIVE`], and at once when a call went unanswered
/// (`suspect`), and returns why the connection is dead once a ping goes unanswered
/// for as long ([`SUSPECT_PATIENCE`] after an unanswered call).
///
/// A call can go unanswered because the peer is slow, which a ping tells apart: the
/// peer's HTTP/2 layer answers it at once. Or because the connection is stalled: a
/// network cut keeps TCP retransmitting with a timer that doubles each time, so
/// after a cut of a few seconds the connection stays silent for seconds after the
/// network is back, and the peer's replication with it. (Found timing recovery in
/// the fault suite: a leader cut off for 6.5 s caught up 0.2 s after the heal in
/// some rounds and more than 2 s in others.) A new connection starts a new timer.
async fn keep_alive(ping_pong: Option<h2::PingPong>, suspect: Arc<tokio::sync::Notify>) -> String {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        let patience = tokio::select! {
            _ = tokio::time::sleep(KEEP_ALIVE) => KEEP_ALIVE,
            _ = suspect.notified() => SUSPECT_PATIENCE,
        };
        match tokio::time::timeout(patience, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(error)) => return format!("keep-alive ping failed: {error}"),
            Err(_) => return format!("keep-alive ping unanswered for {patience:?}"),
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for PeerTransport {
    type Response = http::Response<PeerResponseBody>;
    type Error = tonic::Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is awaited per call on the connection itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let transport = self.clone();
        Box::pin(async move { transport.send(request).await })
    }
}

/// Where a response body is: in its data, at its trailers, or finished.
enum BodyState {
    Data,
    Trailers,
    Done,
}

/// A response body read from an HTTP/2 stream, giving flow-control capacity back to
/// the peer as each piece of data is taken.
pub struct PeerResponseBody {
    stream: h2::RecvStream,
    state: BodyState,
}

impl PeerResponseBody {
    fn new(stream: h2::RecvStream) -> Self {
        PeerResponseBody {
            stream,
            state: BodyState::Data,
        }
    }
}

impl http_body::Body for PeerResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        loop {
            match self.state {
                BodyState::Data => match ready!(self.stream.poll_data(cx)) {
                    Some(Ok(data)) => {
                        // Fails only once the stream is gone, which the next poll reports.
                        let _ = self.stream.flow_control().release_capacity(data.len());
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Some(Err(error)) => {
                        self.state = BodyState::Done;
                        return Poll::Ready(Some(Err(error)));
                    }
                    None => self.state = BodyState::Trailers,
                },
                BodyState::Trailers => {
                    let trailers = ready!(self.stream.poll_trailers(cx));
                    self.state = BodyState::Done;
                    return Poll::Ready(match trailers {
                        Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
                        Ok(None) => None,
                        Err(error) => Some(Err(error)),
                    });
                }
                BodyState::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }
}
