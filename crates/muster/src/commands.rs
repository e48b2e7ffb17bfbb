//! The client commands: register, deregister, discover, services, watch, cluster.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use futures::StreamExt;
use muster_client::{Client, ClientOptions, ClientTls, DiscoverOptions, ReadMode};
use muster_core::{Health, InstanceSpec};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{
    ClusterCommand, DeregisterArgs, DiscoverArgs, MaintenanceArgs, RegisterArgs, ServicesArgs, WatchArgs,
};
use crate::output::{self, header_json, header_line, instance_json};

/// Options every client command shares.
#[derive(Debug)]
pub struct Ctx {
    /// The client, over every `--addr`.
    pub client: Client,
    /// `--json`.
    pub json: bool,
    /// `--verbose`.
    pub verbose: bool,
}

impl Ctx {
    /// A context for the nodes at `addrs`, over TLS when `tls` is given.
    pub async fn new(addrs: Vec<String>, tls: Option<ClientTls>, json: bool, verbose: bool) -> Result<Self> {
        let options = ClientOptions {
            tls,
            ..ClientOptions::default()
        };
        Ok(Ctx {
            client: Client::connect_with(addrs, options).await?,
            json,
            verbose,
        })
    }
}

fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

/// Waits for Ctrl-C or SIGTERM.
async fn interrupted() -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// `muster register`.
pub async fn register(ctx: &Ctx, args: RegisterArgs) -> Result<()> {
    // Fields the command line does not set (e.g. checks) keep their defaults.
    #[allow(clippy::needless_update)]
    let spec = InstanceSpec {
        namespace: args.ns.namespace,
        service: args.service,
        instance_id: args.id,
        address: args.address,
        port: args.port,
        ports: args.named_ports.into_iter().collect(),
        tags: args.tags,
        metadata: args.meta.into_iter().collect::<BTreeMap<_, _>>(),
        weight: args.weight.unwrap_or(0),
        zone: args.zone.unwrap_or_default(),
        health: Health::from(args.health),
        lease_id: None,
        ..InstanceSpec::default()
    };
    let key = spec.key();
    let Some(ttl) = args.ttl else {
        let done = ctx.client.register(spec, None).await?;
        if ctx.json {
            print_json(&json!({
                "revision": done.revision,
                "lease_id": done.lease_id,
                "instance": instance_json(&done.instance),
                "header": header_json(&done.header),
            }));
        } else {
            println!("registered {key} at revision {}", done.revision);
        }
        return Ok(());
    };

    let registration = ctx.client.register_with_keepalive(spec, ttl).await?;
    let done = registration.registered();
    if ctx.json {
        print_json(&json!({
            "revision": done.revision,
            "lease_id": registration.lease_id(),
            "ttl_ms": u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            "instance": instance_json(&done.instance),
            "header": header_json(&done.header),
        }));
    } else {
        println!(
            "registered {key} at revision {} on lease {} (ttl {}); keeping it alive, Ctrl-C to deregister",
            done.revision,
            registration.lease_id(),
            humantime::format_duration(ttl)
        );
    }
    interrupted().await?;
    let lease = registration.lease_id();
    registration.deregister().await?;
    if ctx.json {
        println!("{}", json!({"deregistered": key.to_string(), "lease_id": lease}));
    } else {
        println!("deregistered {key} (revoked lease {lease})");
    }
    Ok(())
}

/// `muster deregister`.
pub async fn deregister(ctx: &Ctx, args: DeregisterArgs) -> Result<()> {
    let revision = ctx
        .client
        .deregister(&args.ns.namespace, &args.service, &args.id)
        .await?;
    if ctx.json {
        print_json(&json!({ "revision": revision }));
    } else {
        println!(
            "deregistered {}/{}/{} at revision {revision}",
            args.ns.namespace, args.service, args.id
        );
    }
    Ok(())
}

/// `muster maintenance`.
pub async fn maintenance(ctx: &Ctx, args: MaintenanceArgs) -> Result<()> {
    let reason = (!args.off).then(|| args.reason.unwrap_or_default());
    let instance = ctx
        .client
        .set_maintenance(&args.ns.namespace, &args.service, &args.id, reason.as_deref())
        .await?;
    if ctx.json {
        print_json(&instance_json(&instance));
    } else if let Some(m) = instance.maintenance() {
        println!(
            "{}/{}/{} is in maintenance ({}), revision {}",
            args.ns.namespace, args.service, args.id, m.notes, instance.mod_revision
        );
    } else {
        println!(
            "{}/{}/{} is out of maintenance, {}, revision {}",
            args.ns.namespace, args.service, args.id, instance.health, instance.mod_revision
        );
    }
    Ok(())
}

/// `muster discover`.
pub async fn discover(ctx: &Ctx, args: DiscoverArgs) -> Result<()> {
    let health = if args.healthy {
        vec![Health::Passing]
    } else {
        args.health.into_iter().map(Health::from).collect()
    };
    let mode = match (args.linearizable, args.min_revision) {
        (true, _) => ReadMode::Linearizable,
        (false, Some(r)) => ReadMode::MinRevision(r),
        (false, None) => ReadMode::Local,
    };
    let options = DiscoverOptions {
        namespace: args.ns.namespace,
        tags: args.tags,
        zone: args.zone,
        health,
        mode,
        min_revision: args.min_revision.unwrap_or(0),
    };
    let (instances, header) = ctx.client.discover(&args.service, &options).await?;
    if ctx.json {
        print_json(&json!({
            "instances": instances.iter().map(instance_json).collect::<Vec<_>>(),
            "header": header_json(&header),
        }));
    } else if instances.is_empty() {
        println!("no instances of {} ({})", args.service, header_line(&header));
    } else {
        print!("{}", output::instances_table(&instances));
        if ctx.verbose {
            println!("{}", header_line(&header));
        }
    }
    Ok(())
}

/// `muster services`.
pub async fn services(ctx: &Ctx, args: ServicesArgs) -> Result<()> {
    let mode = if args.linearizable {
        ReadMode::Linearizable
    } else {
        ReadMode::Local
    };
    let (services, header) = ctx.client.list_services(args.namespace.as_deref(), mode).await?;
    if ctx.json {
        print_json(&json!({
            "services": services.iter().map(output::service_json).collect::<Vec<_>>(),
            "header": header_json(&header),
        }));
    } else if services.is_empty() {
        println!("no services ({})", header_line(&header));
    } else {
        print!("{}", output::services_table(&services));
        if ctx.verbose {
            println!("{}", header_line(&header));
        }
    }
    Ok(())
}

/// `muster watch`: one line per event until Ctrl-C.
pub async fn watch(ctx: &Ctx, args: WatchArgs) -> Result<()> {
    let mut stream = ctx.client.watch(
        args.namespace.as_deref().unwrap_or_default(),
        args.service.as_deref().unwrap_or_default(),
        args.from,
    );
    let stop = interrupted();
    tokio::pin!(stop);
    loop {
        let item = tokio::select! {
            _ = &mut stop => return Ok(()),
            item = stream.next() => item,
        };
        match item {
            Some(Ok(item)) => {
                if ctx.json {
                    println!("{}", output::watch_json(&item));
                } else if let Some(line) = output::watch_line(&item, ctx.verbose) {
                    println!("{line}");
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => return Ok(()),
        }
    }
}

/// `muster cluster ...`.
pub async fn cluster(ctx: &Ctx, command: ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Status => {
            let rows: Vec<_> = ctx
                .client
                .status_of_each()
                .await
                .into_iter()
                .map(|(addr, r)| (addr, r.map_err(|e| e.to_string())))
                .collect();
            if ctx.json {
                let value: Vec<_> = rows
                    .iter()
                    .map(|(addr, r)| match r {
                        Ok(s) => json!({"address": addr, "status": s}),
                        Err(e) => json!({"address": addr, "error": e}),
                    })
                    .collect();
                print_json(&json!(value));
            } else {
                print!("{}", output::status_table(&rows));
            }
            if rows.iter().all(|(_, r)| r.is_err()) {
                bail!("no node answered");
            }
        }
        ClusterCommand::Members => {
            let members = ctx.client.members().await?;
            if ctx.json {
                print_json(&serde_json::to_value(&members)?);
            } else {
                print!("{}", output::members_table(&members.members));
            }
        }
        ClusterCommand::AddLearner { id, peer_addr } => {
            let change = ctx.client.add_learner(id, &peer_addr).await?;
            membership_changed(ctx, &format!("added node {id} ({peer_addr}) as a learner"), &change)?;
        }
        ClusterCommand::Promote { id } => {
            let change = ctx.client.promote(id).await?;
            membership_changed(ctx, &format!("promoted node {id} to voter"), &change)?;
        }
        ClusterCommand::Remove { id } => {
            let change = ctx.client.remove_member(id).await?;
            membership_changed(ctx, &format!("removed node {id}"), &change)?;
        }
    }
    Ok(())
}

fn membership_changed(ctx: &Ctx, what: &str, change: &muster_client::MembershipChange) -> Result<()> {
    if ctx.json {
        print_json(&serde_json::to_value(change)?);
    } else {
        println!("{what} at log index {}", change.log_index);
        print!("{}", output::members_table(&change.members));
    }
    Ok(())
}
