//! Certificates for TLS tests: a CA, node certificates signed by it, client
//! certificates, written as PEM files in a temporary directory.

use std::path::{Path, PathBuf};

use anyhow::Result;
use muster_server::tls::TlsSettings;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct IssuedPair {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A test CA whose certificates name `localhost` and `127.0.0.1`.
pub struct TestPki {
    dir: TempDir,
    ca: Certificate,
    ca_key: KeyPair,
    /// The CA certificate, as a PEM file.
    pub ca_file: PathBuf,
    issued: u32,
}

impl TestPki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca = params.self_signed(&ca_key)?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem())?;
        Ok(TestPki {
            dir,
            ca,
            ca_key,
            ca_file,
            issued: 0,
        })
    }

    /// The directory the files are written to.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn issue(&mut self, name: &str, usages: Vec<ExtendedKeyUsagePurpose>) -> Result<IssuedPair> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = usages;
        let cert = params.signed_by(&key, &self.ca, &self.ca_key)?;
        self.issued += 1;
        let pair = IssuedPair {
            cert: self.dir.path().join(format!("{}-{name}.pem", self.issued)),
            key: self.dir.path().join(format!("{}-{name}-key.pem", self.issued)),
        };
        std::fs::write(&pair.cert, cert.pem())?;
        std::fs::write(&pair.key, key.serialize_pem())?;
        Ok(pair)
    }

    /// A node certificate (server and client usages).
    pub fn node(&mut self, name: &str) -> Result<IssuedPair> {
        self.issue(
            name,
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        )
    }

    /// A client certificate (client usage only).
    pub fn client(&mut self, name: &str) -> Result<IssuedPair> {
        self.issue(name, vec![ExtendedKeyUsagePurpose::ClientAuth])
    }

    /// Node TLS settings with a fresh node certificate from this CA.
    pub fn node_settings(&mut self, name: &str, require_client_certs: bool) -> Result<TlsSettings> {
        let pair = self.node(name)?;
        Ok(TlsSettings {
            cert: pair.cert,
            key: pair.key,
            ca: self.ca_file.clone(),
            require_client_certs,
        })
    }
}
