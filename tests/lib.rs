//! Integration tests live in the test targets of this package; this library holds
//! the client calls several of them share.

use anyhow::Result;
use muster_proto::v1 as pb;
use muster_proto::v1::registry_client::RegistryClient;
use tonic::transport::Channel;

/// An instance of `service` on 10.0.0.1:`port`, tagged `v1`.
pub fn instance(service: &str, id: &str, port: u32) -> pb::Instance {
    pb::Instance {
        service: service.into(),
        instance_id: id.into(),
        address: "10.0.0.1".into(),
        port,
        tags: vec!["v1".into()],
        ..Default::default()
    }
}

/// Registers `inst` with a lease of `ttl_ms` (0: none).
pub async fn register(
    client: &mut RegistryClient<Channel>,
    inst: pb::Instance,
    ttl_ms: u64,
) -> Result<pb::RegisterResponse> {
    Ok(client
        .register(pb::RegisterRequest {
            instance: Some(inst),
            ttl_ms,
        })
        .await?
        .into_inner())
}

/// Discovers `service` in `mode`, waiting for `min_revision`.
pub async fn discover(
    client: &mut RegistryClient<Channel>,
    service: &str,
    mode: pb::ReadMode,
    min_revision: u64,
) -> Result<pb::DiscoverResponse> {
    Ok(client
        .discover(pb::DiscoverRequest {
            service: service.into(),
            mode: mode as i32,
            min_revision,
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// Whether tests must fail (rather than skip) when a third-party tool is missing.
fn external_required() -> bool {
    std::env::var("MUSTER_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1")
}

/// Skips loudly, or fails under `MUSTER_REQUIRE_EXTERNAL=1`: what a test that needs
/// the third-party tool `what` returns when it is not installed.
pub fn missing(what: &str) -> Result<()> {
    if external_required() {
        anyhow::bail!("{what} is not installed, and MUSTER_REQUIRE_EXTERNAL=1 requires it");
    }
    let line = format!("SKIPPED: {what} not installed (set MUSTER_REQUIRE_EXTERNAL=1 to make this a failure)");
    eprintln!("\n{}\n{line}\n{}\n", "*".repeat(line.len()), "*".repeat(line.len()));
    println!("{line}");
    Ok(())
}

/// Whether `python3` can import every module in `modules` (a third-party client's
/// packages).
pub fn python_has(modules: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs the Python check script `script` (a path under tests/) with `args`, within
/// two minutes, failing with its output unless it exits successfully and prints
/// `passed_line`; its output otherwise.
pub async fn run_python_check(script: &str, args: &[String], passed_line: &str) -> Result<String> {
    use anyhow::Context;
    let path = format!("{}/{script}", env!("CARGO_MANIFEST_DIR"));
    let run = tokio::process::Command::new("python3")
        .arg(&path)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(120), run)
        .await
        .with_context(|| format!("{script} did not finish within 120s"))??;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    anyhow::ensure!(
        output.status.success() && stdout.contains(passed_line),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    Ok(stdout)
}
