//! `muster gateway` refuses a command line that cannot work, before binding its
//! port, with exit code 64 and a message naming the flag.

use std::path::Path;
use std::process::{Command, Output};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_muster"))
}

fn gateway(args: &[&str]) -> Output {
    // A port already taken: were the flags accepted, binding would fail with
    // another message and exit code, so a pass cannot come from the wrong check
    // (and the process cannot go on serving).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let listen = taken.local_addr().expect("its address").to_string();
    Command::new(bin())
        .arg("gateway")
        .args(["--listen", listen.as_str()])
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running muster")
}

fn assert_refused(args: &[&str], needle: &str) {
    let out = gateway(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in: {stderr}");
}

#[test]
fn an_unknown_strategy_is_refused_naming_the_flag() {
    assert_refused(&["--strategy", "bogus"], "--strategy");
    assert_refused(&["--strategy", "bogus"], "round_robin, weighted or random");
}

#[test]
fn bad_values_are_refused_naming_the_flag() {
    assert_refused(&["--upstream-timeout", "5"], "--upstream-timeout");
    assert_refused(&["--max-body-bytes", "0"], "--max-body-bytes");
    assert_refused(&["--namespace", "Not_A_Label"], "--namespace");
    assert_refused(&["--nodes", "localhost"], "--nodes");
    assert_refused(&["--fallback-file", "/nonexistent/fallback.toml"], "--fallback-file");
    assert_refused(
        &["--breaker-failures", "3", "--breaker-cool-down", "0s"],
        "--breaker-cool-down",
    );
}

#[test]
fn an_unusable_tls_certificate_is_refused_naming_the_file() {
    let missing = [
        "--tls-cert",
        "/nonexistent/gw.pem",
        "--tls-key",
        "/nonexistent/gw-key.pem",
    ];
    assert_refused(&missing, "tls cert");
    assert_refused(&missing, "/nonexistent/gw.pem");
}

#[test]
fn sigterm_stops_the_gateway_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::Duration;

    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    // No node needs to run: nothing is dialled before the first proxied request.
    let mut child = Command::new(bin())
        .args(["gateway", "--listen", "127.0.0.1:0", "--nodes", "127.0.0.1:1"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running muster");
    let stderr = child.stderr.take().expect("stderr");
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    loop {
        match lines.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => {
                let listening = line.contains("gateway listening");
                seen.push(line);
                if listening {
                    break;
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!("the gateway did not start ({e}): {seen:#?}");
            }
        }
    }

    let pid = Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let status = done
        .recv_timeout(Duration::from_secs(20))
        .expect("the gateway exits after SIGTERM")
        .expect("its exit status");
    assert!(status.success(), "{status:?}");
    // The process has exited, so its stderr ends and the reader thread with it.
    let rest: Vec<String> = lines.iter().collect();
    assert!(rest.iter().any(|l| l.contains("SIGTERM")), "{rest:#?}");
}
