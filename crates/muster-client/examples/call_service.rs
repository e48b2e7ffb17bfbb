//! A caller that resolves `hello` through Muster and calls its instances in turn
//! (run `register_service` first).
//!
//! The resolver keeps `hello`'s instances in memory, fed by a watch, so each call
//! picks an instance with no registry round trip; failures feed the per-instance
//! circuit breaker. With every node down it keeps answering from the last known
//! instances, and `MUSTER_FALLBACK_HELLO=127.0.0.1:8081` (or a TOML file named by
//! `MUSTER_FALLBACK_FILE`) answers if the registry was never reached.
//!
//! ```sh
//! cargo run -p muster-client --example call_service
//! ```

use std::time::Duration;

use muster_client::{Client, ClientOptions, StaticFallback};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(authority: &str, path: &str) -> std::io::Result<String> {
    let mut socket = tokio::net::TcpStream::connect(authority).await?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await?;
    Ok(response.split("\r\n\r\n").nth(1).unwrap_or_default().trim().to_string())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = std::env::var("MUSTER_ADDR").unwrap_or_else(|_| "127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102".into());
    let options = ClientOptions {
        fallback: StaticFallback::from_env()?,
        ..ClientOptions::default()
    };
    let client = Client::connect_with(nodes.split(',').map(str::to_string).collect(), options).await?;
    let hello = client.resolver("hello").await;
    for _ in 0..10 {
        match hello.pick() {
            Err(e) => println!("{e}"),
            Ok(picked) => {
                let id = &picked.instance.instance_id;
                let stale = if picked.stale { " (stale)" } else { "" };
                match get(&picked.authority(), "/").await {
                    Ok(body) => {
                        hello.record_success(id);
                        println!("{id}{stale} -> {body}");
                    }
                    Err(e) => {
                        hello.record_failure(id);
                        println!("{id}{stale} failed: {e}");
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
