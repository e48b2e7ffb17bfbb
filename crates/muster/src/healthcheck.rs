//! `muster healthcheck`: a dependency-free HTTP probe for images without curl.

use std::process::ExitCode;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cli::HealthcheckArgs;

/// Splits `http://host:port/path` into (`host:port`, `/path`).
fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url must start with http://, got {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

async fn probe(url: &str) -> Result<u16, String> {
    let (authority, path) = split_url(url)?;
    let mut stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = vec![0u8; 64];
    let n = stream.read(&mut head).await.map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {line:?}"))
}

/// Probes the URL; exit 0 on HTTP 200, 1 otherwise.
pub async fn run(args: &HealthcheckArgs) -> ExitCode {
    match tokio::time::timeout(args.timeout, probe(&args.url)).await {
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
        assert_eq!(
            split_url("http://127.0.0.1:8500/healthz"),
            Ok(("127.0.0.1:8500".into(), "/healthz".into()))
        );
        assert_eq!(split_url("http://host"), Ok(("host:80".into(), "/".into())));
        assert!(split_url("https://x").is_err());
    }
}
