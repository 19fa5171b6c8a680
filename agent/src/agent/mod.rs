//! `palisade agent`: source → compiler → dataplane, and the status that says what is live.

pub mod http;
mod links;
pub mod metrics;
pub mod netdev;
mod pins;
mod reconcile;
mod shortfall;
pub mod status;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use palisade_common::{Config, CFG_REVOKE_UNTRACKED, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS};
use palisade_policy::Compiler;

use crate::dataplane::{Dataplane, Layout, LoadOptions, Maps, ServiceOptions};
use crate::source::{self, SourceSpec, Update};
use metrics::Metrics;
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
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: nowhere.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Service CIDRs, mark range and uplinks of the deferred service egress check.
    pub services: ServiceOptions,
    /// Sizes of other maps by name instead of the built-in ones (tests fill them).
    pub max_entries: BTreeMap<&'static str, u32>,
}

/// This namespace's addresses (the node's IPs), read once over netlink: what the agent
/// treats as node traffic.
pub fn node_ips() -> anyhow::Result<Vec<std::net::IpAddr>> {
    Ok(links::Query::open()?.host_net()?.node_ips())
}

const HEARTBEAT: Duration = Duration::from_secs(1);

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
    let mut dp = Dataplane::load(
        cfg.layout.clone(),
        &LoadOptions {
            conntrack_entries: cfg.conntrack_entries,
            max_entries: cfg.max_entries.clone(),
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
    setup_services(&mut dp, &cfg.services)?;
    // Subscribed before the first snapshot, so no interface change is missed.
    let mut watch = links::Watch::open()?;
    let metrics = Arc::new(Metrics::new(dp.maps()?));
    let caps = metrics::map_capacities(dp.layout());
    metrics.capacities(&caps);
    let health = metrics.health();
    health.beat();
    if let Some(addr) = cfg.http_addr {
        let bound = http::serve(addr, Arc::clone(&metrics))
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz");
    }
    let mut rec = Reconciler::new(dp, maps, &cfg.node_name)?;
    // Dropping the sender (when this function returns) stops the GC thread.
    let _gc_stop = spawn_conntrack_gc(rec.dp.layout().clone(), Arc::clone(&metrics));
    let mut node_ips = rec.net.node_ips();
    tracing::info!(node = %cfg.node_name, ?node_ips, source = %cfg.source, "agent starting");
    let mut compiler = Compiler::new(cfg.node_name.clone(), node_ips.iter().copied());
    // The node's addresses are in the plan from the compiler's start, in no later diff:
    // written now, or traffic from the node (kubelet probes, masqueraded NodePorts) would
    // be judged as the world's until an address changed.
    rec.apply(&compiler.full_diff(), compiler.plan())?;
    let mut updates = spawn_source(&cfg.source).await?;
    let mut versions: Versions = BTreeMap::new();
    let mut status = Status {
        node: cfg.node_name.clone(),
        source: cfg.source.to_string(),
        pid: std::process::id(),
        ..Default::default()
    };
    publish(
        &cfg,
        &rec,
        &compiler,
        &versions,
        &caps,
        &metrics,
        &mut status,
    )?;

    tokio::pin!(stop);
    // Liveness for /healthz: the loop turns at least this often. Each turn also puts back
    // pins that went missing (see `pins`).
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
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
                let (changes, synced_now) = absorb(batch, &mut versions, &mut status);
                let n = changes.len();
                rec.observe(&changes);
                let diff = compiler.apply_batch(changes);
                rec.apply(&diff, compiler.plan())?;
                if synced_now && !status.synced {
                    // Only now is it known what the kernel should not hold.
                    rec.collect_garbage(compiler.plan())?;
                    status.synced = true;
                    health.set_ready();
                }
                metrics.observe_programming(started);
                tracing::info!(
                    changes = n,
                    map_writes = diff.len(),
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "reconciled"
                );
                publish(&cfg, &rec, &compiler, &versions, &caps, &metrics, &mut status)?;
            }
            events = watch.next() => {
                let mut changed = rec.on_netlink(events?)?;
                // An address added to or removed from the node: node traffic is judged
                // by the addresses the node has now, not those it started with.
                let now_ips = rec.net.node_ips();
                if now_ips != node_ips {
                    tracing::info!(?node_ips, ?now_ips, "node addresses changed");
                    let diff = compiler.set_node_ips(now_ips.iter().copied());
                    rec.apply(&diff, compiler.plan())?;
                    node_ips = now_ips;
                    changed = true;
                }
                if changed {
                    publish(&cfg, &rec, &compiler, &versions, &caps, &metrics, &mut status)?;
                }
            }
            _ = heartbeat.tick() => {
                health.beat();
                if pins::check(&mut rec.dp, &mut status, &health) {
                    publish(&cfg, &rec, &compiler, &versions, &caps, &metrics, &mut status)?;
                }
            }
            _ = &mut stop => break,
        }
    }
    // Programs, links and maps stay pinned: enforcement continues while no agent runs.
    tracing::info!("agent stopping; enforcement stays in place");
    Ok(())
}

/// Object key -> the version applied to the compiler, both shared with the source.
type Versions = BTreeMap<Arc<str>, Arc<str>>;

/// Folds a batch of source updates into the compiler changes it carries, keeping each
/// object's version and the source's problems; true when the source has now synced.
fn absorb(
    batch: Vec<Update>,
    versions: &mut Versions,
    status: &mut Status,
) -> (Vec<palisade_policy::Change>, bool) {
    let mut changes = Vec::new();
    let mut synced = false;
    for update in batch {
        match update {
            Update::Changes(objs) => changes.extend(objs.into_iter().map(|obj| {
                match obj.version {
                    Some(v) => versions.insert(obj.key, v),
                    None => versions.remove(&obj.key),
                };
                obj.change
            })),
            Update::Synced => synced = true,
            Update::Errors(errors) => {
                for e in &errors {
                    tracing::warn!(error = %e, "source problem");
                }
                status.source_errors = errors;
            }
        }
    }
    (changes, synced)
}

/// Programs the service CIDRs and mark range, and puts `palisade_uplink` on the uplinks.
/// Refuses to start when an uplink cannot carry it: service packets to remote backends
/// would otherwise leave unjudged.
fn setup_services(dp: &mut Dataplane, opts: &ServiceOptions) -> anyhow::Result<()> {
    let svc = opts.config().map_err(anyhow::Error::msg)?;
    if opts.cidrs.is_empty() {
        crate::dataplane::program_services(dp.layout(), svc, &[])?;
        return Ok(());
    }
    let uplinks = if opts.uplinks.is_empty() {
        crate::dataplane::default_route_devices()
    } else {
        opts.uplinks.clone()
    };
    if uplinks.is_empty() {
        anyhow::bail!(
            "--service-cidr given but no uplink: this node has no default route; pass --uplink IFACE"
        );
    }
    for dev in &uplinks {
        dp.attach_uplink(dev)
            .with_context(|| format!("attaching the uplink program to {dev}"))?;
    }
    crate::dataplane::program_services(dp.layout(), svc, &opts.cidrs)?;
    tracing::info!(cidrs = ?opts.cidrs, mark_mask = format!("{:#010x}", svc.mark_mask), ?uplinks, "service egress deferred to the backend's hook");
    Ok(())
}

/// Conntrack garbage collection on its own thread with its own map handles: a pass blocks
/// about 0.6 s per 100k entries, which the reconcile loop must not wait for. It only ever
/// deletes entries the programs already treat as absent (see dataplane::conntrack).
fn spawn_conntrack_gc(layout: Layout, metrics: Arc<Metrics>) -> std::sync::mpsc::Sender<()> {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("conntrack-gc".into())
        .spawn(move || {
            let mut maps = match Maps::open(&layout) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "conntrack GC disabled");
                    return;
                }
            };
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(crate::dataplane::GC_INTERVAL)
            {
                match maps.gc_conntrack(crate::dataplane::monotonic_now_ns()) {
                    Ok(stats) => {
                        let live = stats.scanned - stats.deleted;
                        metrics.set_conntrack_entries(live);
                        tracing::debug!(?stats, live, "conntrack GC");
                    }
                    Err(e) => tracing::warn!(error = %e, "conntrack GC pass failed"),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "conntrack GC thread not started");
    }
    stop
}

async fn spawn_source(spec: &SourceSpec) -> anyhow::Result<tokio::sync::mpsc::Receiver<Update>> {
    match spec {
        SourceSpec::Manifests(dir) => source::spawn_directory(dir.clone())
            .with_context(|| format!("watching {}", dir.display())),
        SourceSpec::Kubernetes(conn) => {
            let client = source::kube::connect(conn)
                .await
                .context("connecting to the Kubernetes API")?;
            Ok(source::spawn_kube(client))
        }
    }
}

fn publish(
    cfg: &AgentConfig,
    rec: &Reconciler,
    compiler: &Compiler,
    versions: &Versions,
    caps: &BTreeMap<&'static str, u32>,
    metrics: &Metrics,
    status: &mut Status,
) -> anyhow::Result<()> {
    let plan = compiler.plan();
    // Counted once, for the fill levels, the errors and the log.
    let missing = rec.missing_by_map(plan);
    status.maps = metrics::map_fill(plan, rec, &missing, caps);
    status.maps.extend(metrics.conntrack_fill(caps));
    let map_errors = rec.map_errors(plan, &missing, caps);
    log_map_errors(&status.map_errors, &map_errors, &rec.shortfall.failures);
    status.map_errors = map_errors;
    let rejected_keys: std::collections::BTreeSet<String> = plan
        .rejections
        .keys()
        .map(|p| source::object_key("NetworkPolicy", Some(&p.namespace), &p.name))
        .collect();
    let mut unwired: std::collections::BTreeSet<String> = rec
        .endpoints
        .iter()
        .filter(|(_, e)| e.ifindex.is_none())
        .map(|(p, _)| source::object_key("Pod", Some(&p.namespace), &p.name))
        .collect();
    // Whose entries a full map lacks is not what the kernel reflects.
    for e in &status.map_errors {
        for (kind, names) in [("Pod", &e.pods), ("NetworkPolicy", &e.policies)] {
            unwired.extend(names.iter().filter_map(|n| {
                let (ns, name) = n.split_once('/')?;
                Some(source::object_key(kind, Some(ns), name))
            }));
        }
    }
    status.programmed = versions
        .iter()
        .filter(|(k, _)| !rejected_keys.contains(&***k) && !unwired.contains(&***k))
        .map(|(k, v)| (Arc::clone(k), Arc::clone(v)))
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
        .map(|(p, e)| {
            let (isolated_ingress_by, isolated_egress_by) = rec.isolating(p);
            status::EndpointStatus {
                pod: p.to_string(),
                slot: e.slot,
                ifindex: e.ifindex,
                isolation: isolation_name(e.flags).to_string(),
                ips: e.ips.clone(),
                isolated_ingress_by,
                isolated_egress_by,
            }
        })
        .collect();
    status.quarantined = rec
        .quarantined
        .iter()
        .map(|(&ifindex, &flags)| status::QuarantinedStatus {
            ifindex,
            name: rec.net.link(ifindex).map(|l| l.name.clone()),
            isolation: isolation_name(flags).to_string(),
            ips: rec.net.claims(ifindex).into_iter().collect(),
        })
        .collect();
    metrics.record(status, rec);
    status
        .write(&cfg.run_dir)
        .with_context(|| format!("writing status to {}", cfg.run_dir.display()))?;
    // Rebuilt on every publish; between them it would be a second copy of `versions`.
    status.programmed = BTreeMap::new();
    Ok(())
}

/// An error for each map whose shortfall changed since the last status (not one per
/// publish while it stays), and a note for each that recovered.
fn log_map_errors(
    before: &[status::MapError],
    now: &[status::MapError],
    failures: &BTreeMap<&'static str, u64>,
) {
    for e in now {
        if before
            .iter()
            .any(|b| b.map == e.map && b.missing == e.missing)
        {
            continue;
        }
        tracing::error!(
            map = e.map,
            missing = e.missing,
            write_failures = failures.get(e.map.as_str()).copied().unwrap_or(0),
            pods = ?e.pods,
            "map full: entries left out, fewer flows allowed than the policies say"
        );
    }
    for b in before
        .iter()
        .filter(|b| !now.iter().any(|e| e.map == b.map))
    {
        tracing::info!(map = b.map, "map no longer full: every entry is written");
    }
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
