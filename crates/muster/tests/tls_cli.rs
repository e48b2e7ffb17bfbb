//! `muster server` with TLS flags, and the client commands with `--cacert`,
//! `--cert` and `--key`, as separate processes.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use muster_testkit::pki::TestPki;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_muster"))
}

fn muster(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running muster")
}

/// Three free loopback ports (bound, read, released).
fn free_ports() -> [u16; 3] {
    let listeners: Vec<_> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port"))
        .collect();
    let ports: Vec<u16> = listeners.iter().map(|l| l.local_addr().unwrap().port()).collect();
    [ports[0], ports[1], ports[2]]
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_tls_node_serves_the_cli_with_the_ca_and_a_client_certificate() {
    let mut pki = TestPki::new("muster test CA").expect("a CA");
    let node = pki.node("node-1").expect("a node certificate");
    let ops = pki.client("ops").expect("a client certificate");
    let data = tempfile::tempdir().expect("a data dir");
    let [grpc, peer, http] = free_ports();
    // Beside the data directory: a node refuses a directory with files it did not write.
    let logs = tempfile::tempdir().expect("a log dir");
    let log = logs.path().join("server.log");
    let path = |p: &Path| p.to_str().expect("a UTF-8 path").to_string();
    let (ca, cert, key) = (path(&pki.ca_file), path(&ops.cert), path(&ops.key));
    let server = Command::new(bin())
        .args(["server", "--id", "1", "--data-dir"])
        .arg(data.path())
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--peer-addr", &format!("127.0.0.1:{peer}")])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--initial-cluster", &format!("1=127.0.0.1:{peer}")])
        .args(["--tls-cert", &path(&node.cert), "--tls-key", &path(&node.key)])
        .args(["--tls-ca", &ca, "--tls-client-auth"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("a log file"))
        .spawn()
        .expect("starting muster server");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(server.id()).expect("a pid"));
    let _server = Killed(server);
    let addr = format!("127.0.0.1:{grpc}");
    let tls = ["--addr", &addr, "--cacert", &ca, "--cert", &cert, "--key", &key];
    let with_tls = |more: &[&str]| {
        let mut args = tls.to_vec();
        args.extend_from_slice(more);
        muster(&args)
    };

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = with_tls(&["--json", "cluster", "status"]);
        if status.status.success() && String::from_utf8_lossy(&status.stdout).contains(r#""role": "leader""#) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node never reported a leader: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let registered = with_tls(&[
        "register",
        "web",
        "--id",
        "web-1",
        "--address",
        "10.0.0.1",
        "--port",
        "80",
    ]);
    assert!(
        registered.status.success(),
        "{}",
        String::from_utf8_lossy(&registered.stderr)
    );
    let found = with_tls(&["--json", "discover", "web"]);
    assert!(found.status.success(), "{}", String::from_utf8_lossy(&found.stderr));
    assert!(String::from_utf8_lossy(&found.stdout).contains("web-1"));

    // The probe for images without curl speaks HTTPS to the HTTP port.
    let url = format!("https://127.0.0.1:{http}/readyz");
    let probe = with_tls(&["healthcheck", "--url", &url]);
    assert!(probe.status.success(), "{}", String::from_utf8_lossy(&probe.stderr));
    let probe = muster(&["healthcheck", "--url", &url]);
    assert!(!probe.status.success());
    assert!(String::from_utf8_lossy(&probe.stderr).contains("--cacert"));

    // SIGHUP reads the files again: a renewed certificate is served without a restart.
    let renewed = pki.node("node-1-renewed").expect("a renewed certificate");
    std::fs::copy(&renewed.cert, &node.cert).expect("the certificate replaced");
    std::fs::copy(&renewed.key, &node.key).expect("the key replaced");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("TLS certificate, key and CA reloaded")
    {
        assert!(Instant::now() < deadline, "no reload logged after SIGHUP");
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = with_tls(&[
        "register",
        "web",
        "--id",
        "web-2",
        "--address",
        "10.0.0.2",
        "--port",
        "80",
    ]);
    assert!(after.status.success(), "{}", String::from_utf8_lossy(&after.stderr));

    // Without a client certificate, or without TLS, the node serves nothing.
    let no_cert = muster(&["--addr", &addr, "--cacert", &ca, "discover", "web"]);
    assert!(!no_cert.status.success());
    let plain = muster(&["--addr", &addr, "discover", "web"]);
    assert!(!plain.status.success());

    // A certificate without its key is refused by the command line itself.
    let half = muster(&["--addr", &addr, "--cacert", &ca, "--cert", &cert, "discover", "web"]);
    assert!(!half.status.success());
    assert!(String::from_utf8_lossy(&half.stderr).contains("--key"));
}

#[test]
fn unusable_tls_flags_are_refused_before_any_port_is_bound() {
    let mut pki = TestPki::new("muster test CA").expect("a CA");
    let node = pki.node("node-1").expect("a node certificate");
    let data = tempfile::tempdir().expect("a data dir");
    // A taken port: were the TLS flags accepted, binding would fail with another
    // message, so a pass cannot come from the wrong check.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let taken = taken.local_addr().expect("its address").to_string();
    let base = |extra: &[&str]| {
        let mut args = vec![
            "server".to_string(),
            "--id".into(),
            "1".into(),
            "--data-dir".into(),
            data.path().display().to_string(),
            "--initial-cluster".into(),
            "1=127.0.0.1:1".into(),
            "--grpc-addr".into(),
            taken.clone(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = Command::new(bin())
            .args(&args)
            .env_remove("RUST_LOG")
            .output()
            .expect("running muster");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let cert = node.cert.display().to_string();
    let key = node.key.display().to_string();
    let ca = pki.ca_file.display().to_string();

    let (_, stderr) = base(&["--tls-cert", &cert]);
    assert!(stderr.contains("--tls-key"), "{stderr}");

    let (code, stderr) = base(&[
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        &key,
        "--tls-ca",
        &ca,
    ]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("tls cert") && stderr.contains("/nonexistent/cert.pem"),
        "{stderr}"
    );

    let (code, stderr) = base(&["--tls-cert", &cert, "--tls-key", &ca, "--tls-ca", &ca]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("tls key"), "{stderr}");
}
