//! Accepted gRPC connections whose small HTTP/2 frames leave in one write.
//!
//! The HTTP/2 encoder copies a DATA frame into its send buffer only when the frame
//! is small; a larger one is kept aside and written on its own, with a flush of the
//! whole buffer before the next frame can be queued. On a vectored socket "small"
//! means under 256 bytes, so a watch fan-out, where each stream of a connection has
//! one event of a few hundred bytes to send, cost one `writev` per event. On a
//! socket that does not advertise vectored writes the encoder copies frames of up to
//! 1 KiB into its buffer and sends all that is queued at once.
//!
//! [`CoalescedWrites`] is that socket: it reports no vectored writes, and a
//! [`BufWriter`] under it gathers what the encoder writes between two flushes (the
//! head of a large frame and its payload, for example) so that each flush is still
//! one system call.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::tls::{accept_tls, tcp_incoming, NodeTls, TlsAccepted, TlsPort};

/// Bytes gathered between two flushes before they are written through. Larger writes
/// go straight to the socket. Allocated once per connection.
const WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// A connection that gathers small writes until it is flushed and tells its writer
/// not to use vectored writes (see the module documentation).
#[derive(Debug)]
pub struct CoalescedWrites<T> {
    inner: BufWriter<T>,
}

impl<T: AsyncWrite> CoalescedWrites<T> {
    /// Wraps a connection.
    pub fn new(inner: T) -> Self {
        CoalescedWrites {
            inner: BufWriter::with_capacity(WRITE_BUFFER_BYTES, inner),
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        self.inner.get_ref()
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for CoalescedWrites<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl Connected for CoalescedWrites<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.get_ref().connect_info()
    }
}

impl Connected for CoalescedWrites<TlsAccepted> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.get_ref().get_ref().0.connect_info()
    }
}

/// Connections accepted on `listener` ([`tcp_incoming`]), with coalesced writes.
pub fn incoming(
    listener: TcpListener,
) -> impl Stream<Item = Result<CoalescedWrites<TcpStream>, io::Error>> + Send + 'static {
    tcp_incoming(listener).map(|accepted| accepted.map(CoalescedWrites::new))
}

/// Connections accepted on `listener` after a TLS handshake with the configuration
/// of `port` ([`accept_tls`]), with coalesced writes under TLS (each flush is one
/// write of whole records).
pub fn incoming_tls(
    listener: TcpListener,
    tls: NodeTls,
    port: TlsPort,
) -> impl Stream<Item = Result<CoalescedWrites<TlsAccepted>, io::Error>> + Send + 'static {
    accept_tls(listener, tls, port).map(|conn| Ok(CoalescedWrites::new(conn)))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn writes_are_held_until_a_flush_and_then_arrive_whole_and_in_order() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut conn = CoalescedWrites::new(near);
        assert!(!conn.is_write_vectored());
        conn.write_all(b"head").await.unwrap();
        conn.write_all(&[7u8; 300]).await.unwrap();
        let mut probe = [0u8; 1];
        let nothing_yet = tokio::time::timeout(std::time::Duration::from_millis(20), far.read(&mut probe)).await;
        assert!(nothing_yet.is_err(), "nothing is written before the flush");
        conn.flush().await.unwrap();
        let mut got = vec![0u8; 304];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..4], b"head");
        assert!(got[4..].iter().all(|b| *b == 7));
    }

    #[tokio::test]
    async fn a_write_larger_than_the_buffer_goes_through_after_what_was_gathered() {
        let (near, mut far) = tokio::io::duplex(256 * 1024);
        let mut conn = CoalescedWrites::new(near);
        conn.write_all(b"first").await.unwrap();
        let large = vec![9u8; WRITE_BUFFER_BYTES * 3];
        conn.write_all(&large).await.unwrap();
        conn.flush().await.unwrap();
        let mut got = vec![0u8; 5 + large.len()];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..5], b"first");
        assert_eq!(&got[5..], &large[..]);
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut conn = CoalescedWrites::new(near);
        far.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }
}
