//! TLS on every port a node opens, and on the connections it makes.
//!
//! One certificate and key serve the node's client gRPC port, its HTTP port and its
//! peer port, and the same pair is presented as the client certificate when the
//! node dials a peer or joins through another node. The CA file holds the roots
//! peers are checked against: every peer connection is mutually authenticated, so
//! only holders of a certificate from that CA can send Raft traffic. Clients of the
//! gRPC and HTTP ports are asked for a certificate from the same CA only when
//! [`TlsSettings::require_client_certs`] is set.
//!
//! A node certificate therefore needs both the server and the client usage (when it
//! states extended key usages at all), and names (DNS or IP) for the hosts other
//! nodes and clients reach it at.
//!
//! Handshakes run concurrently, at most [`MAX_CONCURRENT_HANDSHAKES`] per port, each
//! bounded by [`HANDSHAKE_TIMEOUT`]; a connection whose handshake fails is closed
//! and logged, and the port keeps accepting.
//!
//! The files are read again when they change (looked at every
//! [`RELOAD_CHECK_INTERVAL`]) or when the node is asked to (SIGHUP), so certificates
//! rotate without a restart ([`run_reloader`]). Without TLS settings nothing here
//! is on the path of a connection: plain TCP is served and dialled as it is.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Longest a TLS handshake on an accepted connection may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once on one port; further connections wait to be
/// accepted.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 64;
/// Largest certificate, key or CA file read.
const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;

/// Where a node's TLS material lives, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain of this node, leaf first.
    pub cert: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM certificates of the CA(s) that sign peers' (and, when required, clients')
    /// certificates.
    pub ca: PathBuf,
    /// Whether clients of the gRPC and HTTP ports must present a certificate signed
    /// by [`TlsSettings::ca`].
    pub require_client_certs: bool,
}

/// Why a node's TLS material could not be used. Each names the file and setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("tls {setting}: cannot read {path}: {source}")]
    Unreadable {
        /// The setting naming the file (`cert`, `key`, `ca`).
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file is larger than any PEM file a node needs.
    #[error("tls {setting}: {path} is larger than {MAX_PEM_FILE_BYTES} bytes")]
    TooLarge {
        /// The setting naming the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The file holds no PEM item of the kind the setting needs, or one that does
    /// not parse.
    #[error("tls {setting}: {path}: {reason}")]
    Invalid {
        /// The setting naming the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The material parsed but does not make a TLS configuration (a key that does
    /// not match the certificate, for example).
    #[error("tls: {0}")]
    Unusable(String),
}

/// A node's TLS configuration: acceptors for its ports and a connector for its
/// peers, made from the files of its [`TlsSettings`] and made again from them by
/// [`NodeTls::reload`] (certificates are rotated without a restart). Clones share
/// the configuration; connections opened after a reload use the new one, those
/// open keep theirs. One shared allocation: a clone (one per peer call, inside the
/// peer transport) costs one reference count.
#[derive(Clone)]
pub struct NodeTls(Arc<SharedTls>);

/// What the clones of a [`NodeTls`] share.
struct SharedTls {
    settings: TlsSettings,
    current: RwLock<Arc<Loaded>>,
    /// Wakes [`run_reloader`] to read the files again.
    reload_requested: tokio::sync::Notify,
}

/// One loading of the files.
struct Loaded {
    grpc: TlsAcceptor,
    http: TlsAcceptor,
    peer: TlsAcceptor,
    connector: TlsConnector,
    /// The PEM text of the CA file and of this node's certificate and key, for
    /// tonic's client (joining through another node's gRPC port).
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    /// The files' modification times and sizes when they were read.
    stamps: Vec<FileStamp>,
}

/// A port of a node that serves TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPort {
    /// The client gRPC port.
    Grpc,
    /// The HTTP port.
    Http,
    /// The peer port (peers must present a certificate).
    Peer,
}

/// What a file looked like: changed files are read again by
/// [`NodeTls::reload_if_changed`].
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
}

fn stamps_of(settings: &TlsSettings) -> Vec<FileStamp> {
    [&settings.cert, &settings.key, &settings.ca]
        .iter()
        .map(|path| match std::fs::metadata(path) {
            Ok(meta) => FileStamp {
                modified: meta.modified().ok(),
                len: meta.len(),
            },
            Err(_) => FileStamp { modified: None, len: 0 },
        })
        .collect()
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").finish_non_exhaustive()
    }
}

/// ALPN protocol ids.
const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP1: &[u8] = b"http/1.1";

impl NodeTls {
    /// Reads and checks the files `settings` names.
    pub fn load(settings: &TlsSettings) -> Result<NodeTls, TlsError> {
        let loaded = Loaded::read(settings)?;
        Ok(NodeTls(Arc::new(SharedTls {
            settings: settings.clone(),
            current: RwLock::new(Arc::new(loaded)),
            reload_requested: tokio::sync::Notify::new(),
        })))
    }

    fn current(&self) -> Arc<Loaded> {
        self.0.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the files again and, when they make a usable configuration, uses it
    /// for every connection opened from now on. On an error the configuration in
    /// use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = Loaded::read(&self.0.settings)?;
        *self.0.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(())
    }

    /// Asks [`run_reloader`] to read the files again now, changed or not.
    pub fn request_reload(&self) {
        self.0.reload_requested.notify_one();
    }

    /// [`NodeTls::reload`] when a file's modification time or size changed since
    /// it was last read; whether it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        if stamps_of(&self.0.settings) == self.current().stamps {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// The acceptor of `port`, as of now.
    pub fn acceptor(&self, port: TlsPort) -> TlsAcceptor {
        let current = self.current();
        match port {
            TlsPort::Grpc => current.grpc.clone(),
            TlsPort::Http => current.http.clone(),
            TlsPort::Peer => current.peer.clone(),
        }
    }

    /// Opens TLS to a peer at `addr` (`host:port`) over `stream`, checking that its
    /// certificate names `host`.
    pub async fn connect_peer(
        &self,
        addr: &str,
        stream: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = server_name(addr)?;
        let connector = self.current().connector.clone();
        connector.connect(name, stream).await
    }

    /// tonic's client configuration for calls to another node's gRPC port.
    pub fn tonic_client(&self) -> tonic::transport::ClientTlsConfig {
        let current = self.current();
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&current.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &current.cert_pem,
                &current.key_pem,
            ))
    }
}

impl Loaded {
    fn read(settings: &TlsSettings) -> Result<Loaded, TlsError> {
        let stamps = stamps_of(settings);
        let identity = Identity::load(&settings.cert, &settings.key)?;
        let (ca_pem, roots) = load_roots(&settings.ca)?;
        let peer_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Unusable(format!("peer verifier: {e}")))?;
        let client_verifier = settings.require_client_certs.then(|| peer_verifier.clone());
        let grpc = acceptor(&identity, client_verifier.clone(), &[ALPN_H2])?;
        let http = acceptor(&identity, client_verifier, &[ALPN_HTTP1])?;
        let peer = acceptor(&identity, Some(peer_verifier), &[ALPN_H2])?;
        let connector = connector(roots, Some(&identity), ALPN_H2)?;
        Ok(Loaded {
            grpc,
            http,
            peer,
            connector,
            ca_pem,
            cert_pem: identity.cert_pem,
            key_pem: identity.key_pem,
            stamps,
        })
    }
}

/// How often a node looks at its TLS files for changes.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Reloads the node's TLS files when they change (checked every
/// [`RELOAD_CHECK_INTERVAL`]) and, even unchanged, when
/// [`crate::node::NodeCore::request_tls_reload`] asks (`muster server` does on
/// SIGHUP). A file that cannot be used leaves the configuration in use, logged and
/// counted.
pub async fn run_reloader(core: Arc<crate::node::NodeCore>) {
    let Some(tls) = core.tls.clone() else {
        return;
    };
    loop {
        let forced = tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = tokio::time::sleep(RELOAD_CHECK_INTERVAL) => false,
            _ = tls.0.reload_requested.notified() => true,
        };
        let outcome = if forced {
            tls.reload().map(|()| true)
        } else {
            tls.reload_if_changed()
        };
        match outcome {
            Ok(false) => {}
            Ok(true) => {
                core.metrics.tls_reloads.inc();
                tracing::info!(cert = %tls.0.settings.cert.display(), "TLS certificate, key and CA reloaded");
            }
            Err(e) => {
                core.metrics.tls_reload_failures.inc();
                tracing::error!(error = %e, "TLS files not reloaded; the configuration in use stays");
            }
        }
    }
}

/// A certificate chain and its key, read from PEM files.
struct Identity {
    /// The files, for messages.
    cert_path: PathBuf,
    key_path: PathBuf,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    fn load(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let cert_pem = read_pem_file("cert", cert)?;
        let key_pem = read_pem_file("key", key)?;
        let chain = certificates("cert", cert, &cert_pem)?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid {
            setting: "key",
            path: key.to_path_buf(),
            reason: format!("no usable PEM private key: {e}"),
        })?;
        Ok(Identity {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            cert_pem,
            key_pem,
            chain,
            key: key_der,
        })
    }

    /// rustls refused the pair (a key that does not match its certificate): the
    /// error names both files.
    fn mismatch(&self, e: rustls::Error) -> TlsError {
        TlsError::Unusable(format!(
            "cert {} with key {}: {e}",
            self.cert_path.display(),
            self.key_path.display()
        ))
    }
}

/// The PEM text of the CA file at `path`, and its certificates as trust roots.
fn load_roots(path: &Path) -> Result<(Vec<u8>, Arc<RootCertStore>), TlsError> {
    let pem = read_pem_file("ca", path)?;
    let mut roots = RootCertStore::empty();
    for ca in certificates("ca", path, &pem)? {
        roots.add(ca).map_err(|e| TlsError::Invalid {
            setting: "ca",
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok((pem, Arc::new(roots)))
}

/// The cryptography under every TLS configuration here.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // ring builds with a C compiler alone (as tonic's client TLS here does);
    // rustls marks it deprecated for lacking post-quantum key exchange.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client trusting `roots`, presenting `identity` if given, offering `alpn`.
fn connector(roots: Arc<RootCertStore>, identity: Option<&Identity>, alpn: &[u8]) -> Result<TlsConnector, TlsError> {
    let unusable = |e: rustls::Error| TlsError::Unusable(e.to_string());
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(unusable)?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(identity) => builder
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
            .map_err(|e| identity.mismatch(e))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A server serving the certificate chain in `cert` with the key in `key`, asking
/// clients for no certificate, offering the ALPN protocols `alpn` (for
/// `muster gateway`'s listener).
pub fn server_acceptor(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
    acceptor(&Identity::load(cert, key)?, None, alpn)
}

/// A server serving `identity`, checking client certificates with `verifier` (none
/// asked for without one), offering the ALPN protocols `alpn`. A key that does not
/// match its certificate is refused naming both files.
fn acceptor(
    identity: &Identity,
    verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    alpn: &[&[u8]],
) -> Result<TlsAcceptor, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Unusable(e.to_string()))?;
    let builder = match verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| identity.mismatch(e))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// An HTTPS (HTTP/1.1) client trusting the CA file `ca`, presenting the
/// certificate and key `identity` if given: for probes of a node's HTTP port.
pub fn https_connector(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<TlsConnector, TlsError> {
    let (_, roots) = load_roots(ca)?;
    let identity = identity.map(|(cert, key)| Identity::load(cert, key)).transpose()?;
    connector(roots, identity.as_ref(), ALPN_HTTP1)
}

/// The host of `addr` (`host:port`, `[v6]:port`) as a TLS server name.
pub fn server_name(addr: &str) -> io::Result<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((host, _port)) => host,
        None => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is no TLS server name: {e}"),
        )
    })
}

fn read_pem_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let unreadable = |source| TlsError::Unreadable {
        setting,
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(unreadable)?.len();
    if size > MAX_PEM_FILE_BYTES {
        return Err(TlsError::TooLarge {
            setting,
            path: path.to_path_buf(),
        });
    }
    std::fs::read(path).map_err(unreadable)
}

fn certificates(setting: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        setting,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("unreadable PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// A TLS connection accepted on a node's port.
pub type TlsAccepted = tokio_rustls::server::TlsStream<TcpStream>;

/// Connections accepted on `listener`, with Nagle's algorithm off and TCP
/// keep-alive on (tonic applies its own TCP settings only to listeners it binds
/// itself).
pub fn tcp_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}

/// Connections accepted on `listener` as [`tcp_incoming`], after a TLS handshake
/// with the configuration of `port` as of each connection. Connections whose
/// handshake fails or times out are dropped (logged at debug level).
pub fn accept_tls(listener: TcpListener, tls: NodeTls, port: TlsPort) -> BoxStream<'static, TlsAccepted> {
    accept_tls_with(listener, move || tls.acceptor(port))
}

/// Connections accepted on `listener` as [`tcp_incoming`], after a TLS handshake
/// with the acceptor `acceptor` gives for each connection.
pub fn accept_tls_with(
    listener: TcpListener,
    acceptor: impl Fn() -> TlsAcceptor + Send + 'static,
) -> BoxStream<'static, TlsAccepted> {
    tcp_incoming(listener)
        .filter_map(|accepted| async move {
            accepted
                .inspect_err(|e| tracing::debug!(error = %e, "accept failed"))
                .ok()
        })
        .map(move |stream| handshake(acceptor(), stream))
        .buffer_unordered(MAX_CONCURRENT_HANDSHAKES)
        .filter_map(std::future::ready)
        .boxed()
}

async fn handshake(acceptor: TlsAcceptor, stream: TcpStream) -> Option<TlsAccepted> {
    let remote: Option<SocketAddr> = stream.peer_addr().ok();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(?remote, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(?remote, "TLS handshake timed out");
            None
        }
    }
}

/// An HTTPS listener over [`accept_tls`], for `axum::serve`.
pub struct HttpsListener {
    accepted: BoxStream<'static, TlsAccepted>,
    local: SocketAddr,
}

impl HttpsListener {
    /// Accepts on `listener` with the HTTP port's TLS configuration.
    pub fn new(listener: TcpListener, tls: NodeTls) -> io::Result<Self> {
        Self::with_acceptor(listener, move || tls.acceptor(TlsPort::Http))
    }

    /// Accepts on `listener` with the acceptor `acceptor` gives for each connection.
    pub fn with_acceptor(
        listener: TcpListener,
        acceptor: impl Fn() -> TlsAcceptor + Send + 'static,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(HttpsListener {
            accepted: accept_tls_with(listener, acceptor),
            local,
        })
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsAccepted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsAccepted, SocketAddr) {
        loop {
            match self.accepted.next().await {
                Some(conn) => {
                    let remote = conn.get_ref().0.peer_addr().unwrap_or(self.local);
                    return (conn, remote);
                }
                // The TCP listener never ends; wait for shutdown to drop this.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_name_is_the_host_of_the_address() {
        assert_eq!(
            server_name("node-1.muster.svc:7300").unwrap(),
            ServerName::try_from("node-1.muster.svc").unwrap()
        );
        assert!(matches!(
            server_name("127.0.0.1:7300").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(server_name("[::1]:7300").unwrap(), ServerName::IpAddress(_)));
        assert!(server_name("bad host:1").is_err());
    }
}
