//! The process-cluster harness itself: a cluster that cannot start says which
//! nodes exited and how their logs end.
//!
//! Needs the `muster` binary: `MUSTER_BIN`, else `target/debug/muster`.

use std::path::PathBuf;
use std::time::Duration;

use muster_testkit::process::{ClusterOptions, ProcessCluster};

#[tokio::test]
async fn a_cluster_that_cannot_start_names_the_exited_nodes_and_their_logs() {
    let bin = std::env::var_os("MUSTER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/debug/muster")));
    let mut options = ClusterOptions::new(3);
    options.extra_args = vec!["--heartbeat-ms".into(), "not-a-number".into()];
    options.leader_timeout = Duration::from_secs(2);
    let Err(e) = ProcessCluster::start_with(&bin, options).await else {
        panic!("a cluster of nodes refusing their flags started");
    };
    let text = format!("{e:#}");
    for id in 1..=3 {
        assert!(text.contains(&format!("node {id} exited")), "{text}");
    }
    assert!(text.contains("heartbeat"), "the logs' ends name the bad flag: {text}");
}
