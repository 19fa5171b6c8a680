//! `palisade agent`: source → compiler → dataplane, and the status that says what is live.

mod links;
pub mod netdev;
mod reconcile;
pub mod status;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use palisade_common::{Config, CFG_REVOKE_UNTRACKED, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS};
use palisade_policy::Compiler;

use crate::dataplane::{Dataplane, Layout, LoadOptions};
use crate::source::{self, SourceSpec, Update};
use reconcile::Reconciler;
pub use reconcile::QUARANTINE_SLOT;
pub use status::{Status, STATUS_FILE};

pub struct AgentConfig {
    pub node_name: String,
    pub source: SourceSpec,
    pub layout: Layout,
    pub run_dir: PathBuf,
    pub conntrack_entries: u32,
    pub revoke_untracked: bool,
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    run_until(cfg, stop).await
}

/// Runs until `stop` completes (tests and embedders stop the agent this way).
pub async fn run_until(
    cfg: AgentConfig,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let dp = Dataplane::load(
        cfg.layout.clone(),
        &LoadOptions {
            conntrack_entries: cfg.conntrack_entries,
        },
    )?;
    let mut maps = dp.maps()?;
    maps.set_config(Config {
        flags: if cfg.revoke_untracked {
            CFG_REVOKE_UNTRACKED
        } else {
            0
        },
        events_per_sec: 1000,
        ..Default::default()
    })?;
    // Subscribed before the first snapshot, so no interface change is missed.
    let mut watch = links::Watch::open()?;
    let mut rec = Reconciler::new(dp, maps, &cfg.node_name)?;
    let node_ips = rec.net.node_ips();
    tracing::info!(node = %cfg.node_name, ?node_ips, source = %cfg.source, "agent starting");
    let mut compiler = Compiler::new(cfg.node_name.clone(), node_ips);
    let mut updates = spawn_source(&cfg.source).await?;
    let mut versions: BTreeMap<String, String> = BTreeMap::new();
    let mut status = Status {
        node: cfg.node_name.clone(),
        source: cfg.source.to_string(),
        pid: std::process::id(),
        ..Default::default()
    };
    publish(&cfg, &rec, &compiler, &versions, &mut status)?;

    tokio::pin!(stop);
    loop {
        tokio::select! {
            update = updates.recv() => {
                let Some(first) = update else {
                    anyhow::bail!("the {} source stopped", cfg.source);
                };
                // Everything already queued goes into one batch: one compiler pass and
                // one ordered set of map writes however bursty the source is.
                let mut batch = vec![first];
                while let Ok(more) = updates.try_recv() {
                    batch.push(more);
                }
                let started = std::time::Instant::now();
                let mut changes = Vec::new();
                let mut synced_now = false;
                for update in batch {
                    match update {
                        Update::Changes(objs) => {
                            for obj in objs {
                                match obj.version {
                                    Some(v) => versions.insert(obj.key, v),
                                    None => versions.remove(&obj.key),
                                };
                                changes.push(obj.change);
                            }
                        }
                        Update::Synced => synced_now = true,
                        Update::Errors(errors) => {
                            for e in &errors {
                                tracing::warn!(error = %e, "source problem");
                            }
                            status.source_errors = errors;
                        }
                    }
                }
                let n = changes.len();
                rec.observe(&changes);
                let diff = compiler.apply_batch(changes);
                rec.apply(&diff)?;
                if synced_now && !status.synced {
                    // Only now is it known what the kernel should not hold.
                    rec.collect_garbage(compiler.plan())?;
                    status.synced = true;
                }
                tracing::info!(
                    changes = n,
                    map_writes = diff.len(),
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "reconciled"
                );
                publish(&cfg, &rec, &compiler, &versions, &mut status)?;
            }
            events = watch.next() => {
                if rec.on_netlink(events?)? {
                    publish(&cfg, &rec, &compiler, &versions, &mut status)?;
                }
            }
            _ = &mut stop => break,
        }
    }
    // Programs, links and maps stay pinned: enforcement continues while no agent runs.
    tracing::info!("agent stopping; enforcement stays in place");
    Ok(())
}

async fn spawn_source(spec: &SourceSpec) -> anyhow::Result<tokio::sync::mpsc::Receiver<Update>> {
    match spec {
        SourceSpec::Manifests(dir) => source::spawn_directory(dir.clone())
            .with_context(|| format!("watching {}", dir.display())),
    }
}

fn publish(
    cfg: &AgentConfig,
    rec: &Reconciler,
    compiler: &Compiler,
    versions: &BTreeMap<String, String>,
    status: &mut Status,
) -> anyhow::Result<()> {
    let plan = compiler.plan();
    let rejected_keys: std::collections::BTreeSet<String> = plan
        .rejections
        .keys()
        .map(|p| source::object_key("NetworkPolicy", Some(&p.namespace), &p.name))
        .collect();
    let unwired: std::collections::BTreeSet<String> = rec
        .endpoints
        .iter()
        .filter(|(_, e)| e.ifindex.is_none())
        .map(|(p, _)| source::object_key("Pod", Some(&p.namespace), &p.name))
        .collect();
    status.programmed = versions
        .iter()
        .filter(|(k, _)| !rejected_keys.contains(*k) && !unwired.contains(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    status.rejected = plan
        .rejections
        .values()
        .flatten()
        .map(|r| status::Rejected {
            object: r.object.clone(),
            error: format!("{}: {}", r.field, r.error),
        })
        .collect();
    status.endpoints = rec
        .endpoints
        .iter()
        .map(|(p, e)| status::EndpointStatus {
            pod: p.to_string(),
            slot: e.slot,
            ifindex: e.ifindex,
            isolation: isolation_name(e.flags).to_string(),
        })
        .collect();
    status
        .write(&cfg.run_dir)
        .with_context(|| format!("writing status to {}", cfg.run_dir.display()))
}

fn isolation_name(flags: u32) -> &'static str {
    match (
        flags & EP_ISOLATED_INGRESS != 0,
        flags & EP_ISOLATED_EGRESS != 0,
    ) {
        (false, false) => "open",
        (true, false) => "ingress-isolated",
        (false, true) => "egress-isolated",
        (true, true) => "isolated",
    }
}
