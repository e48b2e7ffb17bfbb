//! `muster healthcheck`: a dependency-free HTTP(S) probe for images without curl.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::cli::HealthcheckArgs;

/// A URL to probe, split up.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    https: bool,
    /// `host:port`, the port filled in from the scheme.
    authority: String,
    path: String,
}

/// Splits `http://host:port/path` (or `https://`) into its parts.
fn split_url(url: &str) -> Result<Target, String> {
    let (https, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => return Err(format!("--url must start with http:// or https://, got {url:?}")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:{}", if https { 443 } else { 80 })
    };
    Ok(Target {
        https,
        authority,
        path: path.to_string(),
    })
}

/// The TLS files a probe of an `https://` URL uses (the global `--cacert`,
/// `--cert` and `--key`).
pub struct ProbeTls<'a> {
    /// The CA file.
    pub ca: Option<&'a Path>,
    /// Client certificate and key.
    pub identity: Option<(&'a PathBuf, &'a PathBuf)>,
}

async fn probe(url: &str, tls: &ProbeTls<'_>) -> Result<u16, String> {
    let target = split_url(url)?;
    let stream = tokio::net::TcpStream::connect(&target.authority)
        .await
        .map_err(|e| format!("connecting to {}: {e}", target.authority))?;
    if !target.https {
        return ask(stream, &target).await;
    }
    let ca = tls.ca.ok_or("an https:// --url needs --cacert")?;
    let connector = muster_server::tls::https_connector(ca, tls.identity.map(|(c, k)| (c.as_path(), k.as_path())))
        .map_err(|e| e.to_string())?;
    let name = muster_server::tls::server_name(&target.authority).map_err(|e| e.to_string())?;
    let stream = connector
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS with {}: {e}", target.authority))?;
    ask(stream, &target).await
}

/// Sends the request and reads the status code of the answer.
async fn ask(mut stream: impl AsyncRead + AsyncWrite + Unpin, target: &Target) -> Result<u16, String> {
    let Target { authority, path, .. } = target;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let mut head = vec![0u8; 64];
    let n = stream.read(&mut head).await.map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {line:?}"))
}

/// Probes the URL; exit 0 on HTTP 200, 1 otherwise.
pub async fn run(args: &HealthcheckArgs, tls: &ProbeTls<'_>) -> ExitCode {
    match tokio::time::timeout(args.timeout, probe(&args.url, tls)).await {
        Ok(Ok(200)) => ExitCode::SUCCESS,
        Ok(Ok(code)) => {
            eprintln!("unhealthy: {} answered {code}", args.url);
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("unhealthy: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("unhealthy: no answer from {} within {:?}", args.url, args.timeout);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        let target = |https, authority: &str, path: &str| Target {
            https,
            authority: authority.into(),
            path: path.into(),
        };
        assert_eq!(
            split_url("http://127.0.0.1:8500/healthz"),
            Ok(target(false, "127.0.0.1:8500", "/healthz"))
        );
        assert_eq!(split_url("http://host"), Ok(target(false, "host:80", "/")));
        assert_eq!(
            split_url("https://node-1:8500/readyz"),
            Ok(target(true, "node-1:8500", "/readyz"))
        );
        assert_eq!(split_url("https://host"), Ok(target(true, "host:443", "/")));
        assert!(split_url("ftp://x").unwrap_err().contains("--url"));
    }
}
