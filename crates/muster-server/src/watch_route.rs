//! `muster.v1.Registry/Watch` served with pre-encoded messages.
//!
//! The generated server would encode every event once per watcher. Here the Registry
//! service is wrapped: the Watch path is answered by a codec that writes the bytes
//! the watch hub encoded once per event, and every other path goes to the generated
//! server. On the wire nothing changes: clients decode ordinary `WatchResponse`s.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use futures::Stream;
use muster_proto::v1 as pb;
use muster_proto::v1::registry_server::RegistryServer;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError};
use tonic::server::{NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::grpc::RegistryApi;
use crate::node::NodeCore;

const WATCH_PATH: &str = "/muster.v1.Registry/Watch";

/// Opens a watch stream of encoded `WatchResponse`s after validating the request;
/// its watcher is woken with the others of the client's connection.
pub fn open_watch(
    core: &NodeCore,
    request: Request<pb::WatchRequest>,
) -> Result<crate::watch::WatchStream<Bytes>, ApiError> {
    let connection = request.remote_addr();
    let req = request.into_inner();
    core.watch(
        &req.namespace,
        &req.service,
        req.start_revision,
        connection,
        crate::watch::ProtobufEncoder,
    )
}

/// The Registry service with Watch answered from pre-encoded events.
#[derive(Clone)]
pub struct RegistryService {
    inner: RegistryServer<RegistryApi>,
    core: Arc<NodeCore>,
    max_message_bytes: usize,
}

impl RegistryService {
    /// Wraps the generated server.
    pub fn new(inner: RegistryServer<RegistryApi>, core: Arc<NodeCore>, max_message_bytes: usize) -> Self {
        RegistryService {
            inner,
            core,
            max_message_bytes,
        }
    }
}

impl NamedService for RegistryService {
    const NAME: &'static str = "muster.v1.Registry";
}

impl<B> Service<http::Request<B>> for RegistryService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != WATCH_PATH {
            return self.inner.call(req);
        }
        let method = WatchMethod {
            core: self.core.clone(),
        };
        let max = self.max_message_bytes;
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(PreEncodedCodec).apply_max_message_size_config(Some(max), Some(max));
            Ok(grpc.server_streaming(method, req).await)
        })
    }
}

type EncodedStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

struct WatchMethod {
    core: Arc<NodeCore>,
}

impl ServerStreamingService<pb::WatchRequest> for WatchMethod {
    type Response = Bytes;
    type ResponseStream = EncodedStream;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<pb::WatchRequest>) -> Self::Future {
        let core = self.core.clone();
        Box::pin(async move {
            let stream: EncodedStream = Box::pin(open_watch(&core, request)?.map(Ok));
            Ok(Response::new(stream))
        })
    }
}

/// Writes pre-encoded messages as they are; decodes `WatchRequest`s.
struct PreEncodedCodec;

impl Codec for PreEncodedCodec {
    type Encode = Bytes;
    type Decode = pb::WatchRequest;
    type Encoder = PreEncodedEncoder;
    type Decoder = WatchRequestDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        PreEncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        WatchRequestDecoder
    }
}

struct PreEncodedEncoder;

impl Encoder for PreEncodedEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

struct WatchRequestDecoder;

impl Decoder for WatchRequestDecoder {
    type Item = pb::WatchRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<pb::WatchRequest>, Status> {
        pb::WatchRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("undecodable WatchRequest: {e}")))
    }
}
