//! `muster.v1.Registry/Watch` and `/Discover` served with pre-encoded messages.
//!
//! The generated server would encode every event once per watcher, and every
//! instance of a service once per read. Here the Registry service is wrapped: the
//! Watch path is answered by a codec that writes the bytes the watch hub encoded
//! once per event, Discover by one that writes an answer whose instances were
//! encoded once per service revision ([`crate::discover_cache`]), and every other
//! path goes to the generated server. On the wire nothing changes: clients decode
//! ordinary `WatchResponse`s and `DiscoverResponse`s.

use std::convert::Infallible;
use std::marker::PhantomData;
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
use tonic::server::{NamedService, ServerStreamingService, UnaryService};
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::grpc::{discover_encoded, EncodedDiscover, RegistryApi};
use crate::node::NodeCore;

const WATCH_PATH: &str = "/muster.v1.Registry/Watch";
const DISCOVER_PATH: &str = "/muster.v1.Registry/Discover";

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

/// The Registry service with Watch answered from pre-encoded events and Discover from
/// pre-encoded instances.
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
        let max = self.max_message_bytes;
        match req.uri().path() {
            WATCH_PATH => {
                let core = self.core.clone();
                Box::pin(async move {
                    let mut grpc = tonic::server::Grpc::new(PreEncodedCodec::<Bytes, pb::WatchRequest>::default())
                        .apply_max_message_size_config(Some(max), Some(max));
                    Ok(grpc.server_streaming(WatchMethod { core }, req).await)
                })
            }
            DISCOVER_PATH => {
                let core = self.core.clone();
                Box::pin(async move {
                    let mut grpc =
                        tonic::server::Grpc::new(PreEncodedCodec::<EncodedDiscover, pb::DiscoverRequest>::default())
                            .apply_max_message_size_config(Some(max), Some(max));
                    Ok(grpc.unary(DiscoverMethod { core }, req).await)
                })
            }
            _ => self.inner.call(req),
        }
    }
}

struct DiscoverMethod {
    core: Arc<NodeCore>,
}

impl UnaryService<pb::DiscoverRequest> for DiscoverMethod {
    type Response = EncodedDiscover;
    type Future = BoxFuture<Response<EncodedDiscover>, Status>;

    fn call(&mut self, request: Request<pb::DiscoverRequest>) -> Self::Future {
        let core = self.core.clone();
        Box::pin(async move { Ok(Response::new(discover_encoded(&core, request.into_inner()).await?)) })
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

/// A message already encoded, written as it is.
trait PreEncoded: Send + 'static {
    fn put_into(&self, dst: &mut EncodeBuf<'_>);
}

impl PreEncoded for Bytes {
    fn put_into(&self, dst: &mut EncodeBuf<'_>) {
        dst.put_slice(self);
    }
}

impl PreEncoded for EncodedDiscover {
    fn put_into(&self, dst: &mut EncodeBuf<'_>) {
        EncodedDiscover::put_into(self, dst);
    }
}

/// Writes pre-encoded messages (`E`) as they are; decodes requests (`D`).
struct PreEncodedCodec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for PreEncodedCodec<E, D> {
    fn default() -> Self {
        PreEncodedCodec(PhantomData)
    }
}

impl<E: PreEncoded, D: Message + Default + 'static> Codec for PreEncodedCodec<E, D> {
    type Encode = E;
    type Decode = D;
    type Encoder = PreEncodedEncoder<E>;
    type Decoder = RequestDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        PreEncodedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(PhantomData)
    }
}

struct PreEncodedEncoder<E>(PhantomData<fn(E)>);

impl<E: PreEncoded> Encoder for PreEncodedEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.put_into(dst);
        Ok(())
    }
}

struct RequestDecoder<D>(PhantomData<fn() -> D>);

impl<D: Message + Default> Decoder for RequestDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        D::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("undecodable {}: {e}", short_type_name::<D>())))
    }
}

/// `WatchRequest` for `muster_proto::v1::WatchRequest`.
fn short_type_name<T>() -> &'static str {
    let name = std::any::type_name::<T>();
    name.rsplit("::").next().unwrap_or(name)
}
