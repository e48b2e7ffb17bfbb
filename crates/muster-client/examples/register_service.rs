//! A service that registers itself: it serves HTTP on a local port, registers that
//! port as an instance of `hello` on a 10 s lease kept alive in the background, and
//! deregisters on Ctrl-C.
//!
//! ```sh
//! make dev                                   # in one terminal
//! cargo run -p muster-client --example register_service -- hello-1 18080
//! ```

use std::time::Duration;

use muster_client::Client;
use muster_core::InstanceSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let id = args.next().unwrap_or_else(|| "hello-1".into());
    let port: u16 = args.next().as_deref().unwrap_or("18080").parse()?;
    let nodes = std::env::var("MUSTER_ADDR").unwrap_or_else(|_| "127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102".into());

    // The service itself: answers every request with its id.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let answer = format!("hello from {id}\n");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });

    let client = Client::connect(nodes.split(',').map(str::to_string).collect()).await?;
    let spec = InstanceSpec {
        service: "hello".into(),
        instance_id: id.clone(),
        address: "127.0.0.1".into(),
        port,
        tags: vec!["example".into()],
        ..Default::default()
    };
    let registration = client.register_with_keepalive(spec, Duration::from_secs(10)).await?;
    println!(
        "registered hello/{id} at 127.0.0.1:{port} on lease {} through {}; Ctrl-C to stop",
        registration.lease_id(),
        client.current_node()
    );
    tokio::signal::ctrl_c().await?;
    registration.deregister().await?;
    println!("deregistered hello/{id}");
    Ok(())
}
