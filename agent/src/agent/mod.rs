//! `palisade agent`: source → compiler → dataplane, and the status that says what is live.

pub mod netdev;
mod reconcile;
pub mod status;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use palisade_common::{Config, CFG_REVOKE_UNTRACKED, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS};
use palisade_policy::{Change, Compiler, ObjectRef};

use crate::dataplane::{Dataplane, Layout, LoadOptions};
use crate::source::{self, Snapshot};
use reconcile::Reconciler;
pub use status::{Status, STATUS_FILE};

pub struct AgentConfig {
    pub node_name: String,
    pub manifests: PathBuf,
    pub layout: Layout,
    pub run_dir: PathBuf,
    pub conntrack_entries: u32,
    pub revoke_untracked: bool,
}

/// How often pods whose interface is not wired yet are looked for again.
const RESOLVE_INTERVAL: Duration = Duration::from_millis(200);

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
    let node_ips = netdev::node_ips();
    tracing::info!(node = %cfg.node_name, ?node_ips, manifests = %cfg.manifests.display(), "agent starting");
    let mut compiler = Compiler::new(cfg.node_name.clone(), node_ips);
    let mut rec = Reconciler::new(dp, maps);
    let mut watcher = source::DirWatcher::new(&cfg.manifests)
        .with_context(|| format!("watching {}", cfg.manifests.display()))?;
    let mut versions: BTreeMap<String, String> = BTreeMap::new();
    let mut status = Status {
        node: cfg.node_name.clone(),
        source: format!("manifests:{}", cfg.manifests.display()),
        pid: std::process::id(),
        ..Default::default()
    };

    tokio::pin!(stop);
    let mut tick = tokio::time::interval(RESOLVE_INTERVAL);
    let mut dirty = true;
    loop {
        if dirty {
            dirty = false;
            let started = std::time::Instant::now();
            match source::load_dir(&cfg.manifests) {
                Ok(snap) => {
                    let changes = changes_between(&versions, &snap);
                    let n = changes.len();
                    let diff = compiler.apply_batch(changes);
                    rec.apply(&diff)?;
                    if !status.synced {
                        rec.collect_garbage(compiler.plan())?;
                        status.synced = true;
                    }
                    versions = snap.versions.clone();
                    status.source_errors = snap.errors.iter().map(|e| e.to_string()).collect();
                    for e in &status.source_errors {
                        tracing::warn!(error = %e, "manifest not loaded");
                    }
                    tracing::info!(
                        changes = n,
                        map_writes = diff.len(),
                        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                        "reconciled"
                    );
                }
                Err(e) => tracing::error!(error = %e, "reading manifests"),
            }
            publish(&cfg, &rec, &compiler, &versions, &mut status)?;
        }
        tokio::select! {
            _ = watcher.changed() => dirty = true,
            _ = tick.tick() => {
                if rec.resolve_pending()? > 0 {
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

/// The compiler changes that take the previous snapshot's objects to `snap`'s.
fn changes_between(prev: &BTreeMap<String, String>, snap: &Snapshot) -> Vec<Change> {
    let changed = |key: &str| prev.get(key) != snap.versions.get(key);
    let mut out = Vec::new();
    // Namespaces first so pods and policies see their labels.
    for ns in &snap.namespaces {
        let name = ns.metadata.name.clone().unwrap_or_default();
        if changed(&source::object_key("Namespace", None, &name)) {
            out.push(Change::UpsertNamespace(Box::new(ns.clone())));
        }
    }
    for pod in &snap.pods {
        let m = &pod.metadata;
        let key = source::object_key(
            "Pod",
            m.namespace.as_deref(),
            m.name.as_deref().unwrap_or(""),
        );
        if changed(&key) {
            out.push(Change::UpsertPod(Box::new(pod.clone())));
        }
    }
    for np in &snap.policies {
        let m = &np.metadata;
        let key = source::object_key(
            "NetworkPolicy",
            m.namespace.as_deref(),
            m.name.as_deref().unwrap_or(""),
        );
        if changed(&key) {
            out.push(Change::UpsertPolicy(Box::new(np.clone())));
        }
    }
    for key in prev.keys().filter(|k| !snap.versions.contains_key(*k)) {
        let mut parts = key.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("Namespace"), Some(name), None) => {
                out.push(Change::DeleteNamespace(name.to_string()))
            }
            (Some("Pod"), Some(ns), Some(name)) => {
                out.push(Change::DeletePod(ObjectRef::new(ns, name)))
            }
            (Some("NetworkPolicy"), Some(ns), Some(name)) => {
                out.push(Change::DeletePolicy(ObjectRef::new(ns, name)))
            }
            _ => {}
        }
    }
    out
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
