//! `muster-bench`: Muster and etcd side by side on one machine, in one run, driven by
//! the same process with the same client concurrency. Prints one table per workload
//! and writes them to BENCHMARKS.md.

mod cluster;
mod load;
mod report;
mod workloads;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, ValueEnum};

use crate::cluster::{Cluster, Kind};
use crate::report::Table;

/// The load generator allocates with jemalloc, as the node does: with glibc's malloc
/// its client threads contended for the allocator's arena locks, CPU taken from the
/// same two cores as the systems under test (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    Floor,
    Register,
    RegisterUnderReads,
    Discover,
    DiscoverLinearizable,
    Keepalive,
    Watch,
    Memory,
    Failover,
    ColdStart,
    /// Muster alone, plain and with TLS (not in the default set).
    Tls,
}

/// Systems.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Systems {
    Both,
    Muster,
    Etcd,
}

#[derive(Parser, Debug)]
#[command(about = "Muster vs etcd: register, discover, watch fan-out, memory, failover, cold start")]
struct Args {
    /// Workloads to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    workload: Vec<Workload>,
    /// Which systems.
    #[arg(long, value_enum, default_value = "both")]
    system: Systems,
    /// Measured time per load point.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Client counts for the load workloads.
    #[arg(long, value_delimiter = ',', default_value = "1,16,200")]
    clients: Vec<usize>,
    /// The muster binary.
    #[arg(long, default_value = "target/release/muster")]
    bin: PathBuf,
    /// Where to write the report (empty: do not write).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: String,
    /// Largest instance count for the memory and cold-start workloads.
    #[arg(long, default_value_t = 100_000)]
    max_instances: usize,
}

/// Settings every workload reads.
pub struct Settings {
    /// Measured time per point.
    pub duration: Duration,
    /// Client counts.
    pub clients: Vec<usize>,
    /// Largest instance count.
    pub max_instances: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let workloads = if args.workload.is_empty() {
        vec![
            Workload::Floor,
            Workload::Register,
            Workload::RegisterUnderReads,
            Workload::Discover,
            Workload::DiscoverLinearizable,
            Workload::Keepalive,
            Workload::Watch,
            Workload::Failover,
            Workload::Memory,
            Workload::ColdStart,
        ]
    } else {
        args.workload.clone()
    };
    let settings = Settings {
        duration: args.duration,
        clients: args.clients.clone(),
        max_instances: args.max_instances,
    };
    let kinds: Vec<Kind> = match args.system {
        Systems::Both => vec![Kind::Muster, Kind::Etcd],
        Systems::Muster => vec![Kind::Muster],
        Systems::Etcd => vec![Kind::Etcd],
    };
    let mut tables: Vec<Table> = Vec::new();
    for w in workloads {
        eprintln!("== {w:?}");
        let table = match w {
            Workload::Floor => workloads::floor(&args.bin, &settings).await?,
            Workload::Register => workloads::register(&args.bin, &kinds, &settings).await?,
            Workload::RegisterUnderReads => workloads::register_under_reads(&args.bin, &kinds, &settings).await?,
            Workload::Discover => workloads::discover(&args.bin, &kinds, &settings, false).await?,
            Workload::DiscoverLinearizable => workloads::discover(&args.bin, &kinds, &settings, true).await?,
            Workload::Keepalive => workloads::keepalive(&args.bin, &kinds, &settings).await?,
            Workload::Watch => workloads::watch(&args.bin, &kinds, &settings).await?,
            Workload::Failover => workloads::failover(&args.bin, &kinds, &settings).await?,
            Workload::Tls => workloads::tls_cost(&args.bin, &settings).await?,
            Workload::Memory | Workload::ColdStart => {
                if tables.iter().any(|t| t.title.starts_with("Memory")) {
                    continue;
                }
                let (mem, cold) = workloads::memory_and_cold_start(&args.bin, &kinds, &settings).await?;
                tables.push(mem);
                cold
            }
        };
        println!("{}", table.markdown());
        tables.push(table);
    }
    if !args.out.is_empty() {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
            .unwrap_or(0);
        let etcd_version = std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_string))
            .unwrap_or_else(|| "etcd not run".into());
        let date = std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .unwrap_or_default();
        let mut md = String::new();
        md.push_str("# Benchmarks\n\n");
        md.push_str("Muster and etcd measured side by side by `muster-bench` (`make bench`): three nodes of each on loopback, one after the other, with the load generated by the same process and the same client concurrency (tonic for Muster, the `etcd-client` crate for etcd). etcd runs with auto-compaction and is compacted and defragmented before each workload. Every Muster write is fsynced on a majority before it is acknowledged. Ratios are Muster / etcd.\n\n");
        md.push_str(&format!(
            "Machine: {cores} cores, {:.1} GiB memory. Date: {}. {etcd_version}. Duration per point: {:?}.\n\n",
            mem_kb as f64 / 1024.0 / 1024.0,
            date.trim(),
            settings.duration
        ));
        for t in &tables {
            md.push_str(&t.markdown());
            md.push('\n');
        }
        if let Ok(existing) = std::fs::read_to_string(&args.out) {
            if let Some(idx) = existing.find("\n## Notes") {
                md.push_str(&existing[idx..]);
            }
        }
        std::fs::write(&args.out, md)?;
        eprintln!("wrote {}", args.out);
    }
    Ok(())
}

/// Starts a cluster of `kind`.
pub async fn start(kind: Kind, bin: &std::path::Path) -> Result<Cluster> {
    match kind {
        Kind::Muster => Cluster::muster(bin, 17100).await,
        Kind::Etcd => Cluster::etcd(23790).await,
    }
}
