//! A caller that resolves `hello` through Muster and calls its instances in turn,
//! re-reading the registry on every call (run `register_service` first).
//!
//! ```sh
//! cargo run -p muster-client --example call_service
//! ```

use std::time::Duration;

use muster_client::{Client, DiscoverOptions};
use muster_core::Health;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(address: &str, port: u16, path: &str) -> std::io::Result<String> {
    let mut socket = tokio::net::TcpStream::connect((address, port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await?;
    Ok(response.split("\r\n\r\n").nth(1).unwrap_or_default().trim().to_string())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nodes = std::env::var("MUSTER_ADDR").unwrap_or_else(|_| "127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102".into());
    let client = Client::connect(nodes.split(',').map(str::to_string).collect()).await?;
    let healthy = DiscoverOptions {
        health: vec![Health::Passing],
        ..Default::default()
    };
    for call in 0..10usize {
        let (instances, header) = client.discover("hello", &healthy).await?;
        if instances.is_empty() {
            println!("no healthy instance of hello (revision {})", header.revision);
        } else {
            // Round robin over what the registry answered.
            let instance = &instances[call % instances.len()];
            match get(&instance.address, instance.port, "/").await {
                Ok(body) => println!("{} -> {body}", instance.instance_id),
                Err(e) => println!("{} failed: {e}", instance.instance_id),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
