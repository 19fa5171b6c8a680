//! Part 3: the real agent (`palisade agent` as a subprocess, in a simulated node's
//! namespace) on a synthetic cluster: how long a manifest change takes to change a
//! verdict on the wire, how long the agent takes to sync, and its memory.
//!
//! The latency probe: a sender in the probe pod sends one UDP datagram per millisecond to
//! the target pod, each from a fresh source port (a new flow, so conntrack never carries a
//! verdict over from an earlier datagram); a receiver in the target pod records which
//! arrived. A change is the atomic rename of a policy file that allows or no longer
//! allows the probe pod; its latency is from just before the rename to the send time of
//! the first datagram from which on every datagram has the new verdict.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use palisade_tests::pins::PinDir;
use palisade_tests::{Node, Pod};
use serde_json::json;

use super::cluster::{self, LocalPod, BENCH_NS, PROBE_PORT};
use super::interrupt;
use super::proc::ChildGuard;
use super::report::{int, num, Section, Table, Target, Verdict};
use super::stats::percentile;

const NODE_NAME: &str = "bench-node";
const PROBE_PERIOD: Duration = Duration::from_millis(1);
/// A datagram not received this long after it was sent counts as dropped.
const GRACE: Duration = Duration::from_millis(100);
/// Consecutive datagrams with the new verdict that settle a change.
const SETTLE: usize = 20;
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Source ports come round again after ~64 s at one datagram per ms, later than
/// Palisade's UDP conntrack timeout (60 s): a reused port is always a new flow.
const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 1024..=u16::MAX;
/// Manifest-only pods per file. The agent's reader pads every document with the lines
/// before it (for file line numbers in errors), so parsing a file is quadratic in its
/// document count; the report shows the cost of one 10,000-document file beside this.
const REMOTE_CHUNK: usize = 500;

pub struct Opts {
    pub local_pods: usize,
    /// Cluster size for the latency measurement.
    pub latency_cluster: usize,
    pub changes: usize,
    /// The latency phase stops after this long even if fewer changes were made (a slow
    /// agent must not stretch the whole benchmark); the report says how many were made.
    pub latency_budget: Duration,
    /// How long the agent may take to sync before its memory is read anyway.
    pub sync_timeout: Duration,
    /// Cluster sizes at which the agent's sync time and memory are measured.
    pub sizes: Vec<usize>,
}

impl Opts {
    pub fn new(quick: bool) -> Opts {
        if quick {
            Opts {
                local_pods: 10,
                latency_cluster: 10_000,
                changes: 10,
                latency_budget: Duration::from_secs(30),
                sync_timeout: Duration::from_secs(60),
                sizes: vec![10_000],
            }
        } else {
            Opts {
                local_pods: 100,
                latency_cluster: 10_000,
                changes: 40,
                latency_budget: Duration::from_secs(150),
                sync_timeout: Duration::from_secs(240),
                sizes: vec![10_000, 100_000],
            }
        }
    }
}

/// The agent subprocess with its pins and run directory; stopped and cleaned on drop.
struct AgentProc {
    child: ChildGuard,
    run_dir: PathBuf,
    log: PathBuf,
    // Dropped after the child: removes every link and map pin the agent made.
    _pins: PinDir,
}

impl AgentProc {
    fn start(bin: &Path, node: &Node, manifests: &Path, work: &Path) -> anyhow::Result<Self> {
        let pins = PinDir::new("benchag");
        let _ = palisade::dataplane::cleanup(&pins.layout());
        let run_dir = work.join("run");
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir)?;
        let log = work.join("agent.log");
        let logfile = std::fs::File::create(&log)?;
        let child = ChildGuard::spawn(
            Command::new(bin)
                .args(["--netns", node.ns().name(), "--log-format", "json", "agent"])
                .arg("--manifests")
                .arg(manifests)
                .args(["--node-name", NODE_NAME])
                .arg("--bpffs-dir")
                .arg(pins.path())
                .arg("--run-dir")
                .arg(&run_dir)
                .stdout(Stdio::null())
                .stderr(logfile),
            "palisade agent",
        )?;
        Ok(AgentProc {
            child,
            run_dir,
            log,
            _pins: pins,
        })
    }

    fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(self.run_dir.join("status.json")).ok()?).ok()
    }

    /// Waits until the agent has synced and programmed every local pod (interfaces found)
    /// and the probe policy; false when `timeout` passed first.
    fn wait_synced(&mut self, pods: &[LocalPod], timeout: Duration) -> anyhow::Result<bool> {
        let keys: Vec<String> = pods
            .iter()
            .map(|p| format!("Pod/{}/{}", p.namespace, p.name))
            .chain([format!("NetworkPolicy/{BENCH_NS}/probe-target")])
            .collect();
        let deadline = Instant::now() + timeout;
        loop {
            interrupt::check()?;
            self.child.ensure_running()?;
            if let Some(v) = self.status() {
                if v["synced"] == true && keys.iter().all(|k| v["programmed"].get(k).is_some()) {
                    return Ok(true);
                }
            }
            if Instant::now() > deadline {
                eprintln!(
                    "    agent: not synced after {timeout:?}; log tail: {}",
                    tail(&self.log, 3)
                );
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (VmRSS, VmHWM) in KiB.
    fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.pid()))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {name} in /proc/{}/status", self.child.pid()))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// `elapsed_ms` of the agent's "reconciled" log records, in order.
    fn reconcile_times(&self) -> Vec<f64> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "reconciled")
            .filter_map(|v| v["fields"]["elapsed_ms"].as_f64())
            .collect()
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

/// Removes the benchmark's manifest and run directories.
struct WorkDir(PathBuf);
impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Rig {
    node: Node,
    pods: Vec<Pod>,
    local: Vec<LocalPod>,
    create_s: f64,
}

/// The third octet of a node's IPv4 pod subnet (198.18.X.0/24).
fn subnet_of(node: &Node) -> u8 {
    node.pod_cidr_v4()
        .split('.')
        .nth(2)
        .and_then(|x| x.parse().ok())
        .unwrap_or(255)
}

fn build_node(n: usize) -> anyhow::Result<Rig> {
    // Pod subnets are leased machine-wide; nodes whose lease falls in the manifest-only
    // plan (X >= 64) are held until a usable one is leased, then released.
    let mut rejected = Vec::new();
    let node = loop {
        let node = Node::routed("benchag")?;
        if subnet_of(&node) < 64 {
            break node;
        }
        ensure!(
            rejected.len() < 250,
            "no pod subnet below 198.18.64.0 is free (leases in /run/palisade-tests/subnets)"
        );
        rejected.push(node);
    };
    drop(rejected);
    let started = Instant::now();
    let mut pods = Vec::new();
    let mut local = Vec::new();
    for k in 0..n {
        interrupt::check()?;
        let (ns, name, labels) = match k {
            0 => (
                BENCH_NS.to_string(),
                "probe".to_string(),
                ("role", "probe".to_string()),
            ),
            1 => (
                BENCH_NS.to_string(),
                "target".to_string(),
                ("role", "target".to_string()),
            ),
            _ => (
                cluster::ns_name(k % cluster::NAMESPACES),
                format!("local-{k}"),
                ("app", format!("app-{}", k % cluster::APPS)),
            ),
        };
        let pod = node.add_pod(&format!("{ns}/{name}"))?;
        local.push(LocalPod {
            namespace: ns,
            name,
            labels: vec![(labels.0.to_string(), labels.1)],
            ipv4: pod.ipv4(),
            ipv6: pod.ipv6(),
        });
        pods.push(pod);
    }
    Ok(Rig {
        node,
        pods,
        local,
        create_s: started.elapsed().as_secs_f64(),
    })
}

fn write_manifests(dir: &Path, rig: &Rig, cluster_pods: usize, chunk: usize) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("00-namespaces.yaml"), cluster::namespaces_yaml())?;
    std::fs::write(
        dir.join("10-local-pods.yaml"),
        cluster::local_pods_yaml(&rig.local, NODE_NAME),
    )?;
    let remote = cluster_pods.saturating_sub(rig.local.len());
    for (k, from) in (0..remote).step_by(chunk).enumerate() {
        let to = (from + chunk).min(remote);
        std::fs::write(
            dir.join(format!("20-remote-{k:03}.yaml")),
            cluster::remote_pods_yaml(from, to),
        )?;
    }
    std::fs::write(dir.join("30-policies.yaml"), cluster::policies_yaml())?;
    std::fs::write(dir.join("50-probe.yaml"), cluster::probe_policy_yaml(false))?;
    Ok(())
}

/// One UDP datagram per period from a fresh source port; what was sent when, and what
/// arrived.
struct Probe {
    sent: Arc<Mutex<Vec<Instant>>>,
    arrived: Arc<Mutex<Vec<bool>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Probe {
    fn start(from: &Pod, to: &Pod) -> anyhow::Result<Probe> {
        let sent = Arc::new(Mutex::new(Vec::<Instant>::new()));
        let arrived = Arc::new(Mutex::new(Vec::<bool>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let rx = to
            .ns()
            .run(|| UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, PROBE_PORT))))?;
        rx.set_read_timeout(Some(Duration::from_millis(20)))?;
        let (a, st) = (arrived.clone(), stop.clone());
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !st.load(Ordering::Relaxed) {
                if let Ok((8, _)) = rx.recv_from(&mut buf) {
                    let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default()) as usize;
                    let mut a = a.lock().unwrap_or_else(|e| e.into_inner());
                    if a.len() <= seq {
                        a.resize(seq + 1, false);
                    }
                    a[seq] = true;
                }
            }
        });
        let dst = SocketAddrV4::new(to.ipv4(), PROBE_PORT);
        let src_ip = from.ipv4();
        let (s, st) = (sent.clone(), stop.clone());
        let sender = from.ns().spawn(move || {
            let mut port: u16 = *SOURCE_PORTS.start();
            let mut next = Instant::now();
            while !st.load(Ordering::Relaxed) {
                port = if port == *SOURCE_PORTS.end() {
                    *SOURCE_PORTS.start()
                } else {
                    port + 1
                };
                let Ok(sock) = UdpSocket::bind(SocketAddrV4::new(src_ip, port)) else {
                    continue;
                };
                let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
                let seq = s.len() as u64;
                s.push(Instant::now());
                drop(s);
                let _ = sock.send_to(&seq.to_be_bytes(), dst);
                next += PROBE_PERIOD;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
        })?;
        Ok(Probe {
            sent,
            arrived,
            stop,
            threads: vec![receiver, sender],
        })
    }

    /// Waits for the verdict of datagrams sent after `t0` to settle on `allowed`; the
    /// latency from `t0` to the first datagram of the settled run.
    fn settle(&self, t0: Instant, allowed: bool) -> Option<Duration> {
        let deadline = t0 + CHANGE_TIMEOUT;
        loop {
            if Instant::now() > deadline || interrupt::requested() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
            let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let arrived = self
                .arrived
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let Some(first) = sent.iter().position(|t| *t >= t0) else {
                continue;
            };
            let now = Instant::now();
            // Datagrams old enough that "not arrived" means dropped.
            let decided = sent[first..]
                .iter()
                .take_while(|t| now.duration_since(**t) >= GRACE)
                .count();
            let verdict = |s: usize| arrived.get(s).copied().unwrap_or(false) == allowed;
            let end = first + decided;
            let run = (first..end).rev().take_while(|&s| verdict(s)).count();
            if run >= SETTLE {
                return Some(sent[end - run].duration_since(t0));
            }
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct LatencyResult {
    allow: Vec<f64>,
    deny: Vec<f64>,
    timeouts: usize,
    reconcile_ms: Vec<f64>,
}

fn measure_latency(
    agent: &AgentProc,
    rig: &Rig,
    manifests: &Path,
    staging: &Path,
    changes: usize,
    budget: Duration,
) -> anyhow::Result<LatencyResult> {
    let probe = Probe::start(&rig.pods[0], &rig.pods[1])?;
    let logged_before = agent.reconcile_times().len();
    let phase = Instant::now();
    let (mut allow, mut deny, mut timeouts) = (Vec::new(), Vec::new(), 0);
    // The initial state is "denied": settle on it first.
    if probe.settle(Instant::now(), false).is_none() {
        bail!("the probe is not denied before the first change");
    }
    let mut jitter: u64 = 0x9e37_79b9;
    for k in 0..changes {
        interrupt::check()?;
        if phase.elapsed() > budget {
            eprintln!("    agent: latency budget of {budget:?} used up after {k} changes");
            break;
        }
        let to_allowed = k % 2 == 0;
        let tmp = staging.join("50-probe.yaml");
        std::fs::write(&tmp, cluster::probe_policy_yaml(to_allowed))?;
        let t0 = Instant::now();
        std::fs::rename(&tmp, manifests.join("50-probe.yaml"))?;
        match probe.settle(t0, to_allowed) {
            Some(d) => {
                let ms = d.as_secs_f64() * 1e3;
                if to_allowed {
                    allow.push(ms);
                } else {
                    deny.push(ms);
                }
            }
            None => {
                timeouts += 1;
                // Leave the state known before the next change.
                std::fs::write(&tmp, cluster::probe_policy_yaml(false))?;
                std::fs::rename(&tmp, manifests.join("50-probe.yaml"))?;
                if probe.settle(Instant::now(), false).is_none() {
                    bail!("the probe never settled after a timed-out change");
                }
                if !to_allowed {
                    continue;
                }
            }
        }
        // Pacing: changes must not fall on a fixed phase of the agent's timers.
        jitter = jitter
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(10 + (jitter >> 33) % 50));
    }
    probe.stop();
    let reconcile_ms = agent.reconcile_times()[logged_before..].to_vec();
    Ok(LatencyResult {
        allow,
        deny,
        timeouts,
        reconcile_ms,
    })
}

struct SizeResult {
    cluster: usize,
    /// None: not synced within the timeout.
    sync_s: Option<f64>,
    /// `palisade::source::load_dir` on the same directory, in-process: the share of a
    /// reload that is reading and parsing the manifests.
    load_dir_ms: f64,
    /// The same with all manifest-only pods in one file.
    one_file_ms: Option<f64>,
    rss_kib: u64,
    hwm_kib: u64,
    latency: Option<LatencyResult>,
}

pub fn run(quick: bool, bin: &Path) -> anyhow::Result<Section> {
    let o = Opts::new(quick);
    ensure!(bin.exists(), "agent binary {} not built", bin.display());
    let work = WorkDir(std::env::temp_dir().join(format!("palisade-bench-{}", std::process::id())));
    let staging = work.0.join("staging");
    std::fs::create_dir_all(&staging)?;
    eprintln!(
        "    agent: creating {} pods with real interfaces",
        o.local_pods
    );
    let rig = build_node(o.local_pods)?;
    let mut sizes = o.sizes.clone();
    if !sizes.contains(&o.latency_cluster) {
        sizes.insert(0, o.latency_cluster);
    }
    let mut results = Vec::new();
    for &n in &sizes {
        interrupt::check()?;
        eprintln!("    agent: {} cluster pods", int(n));
        let manifests = work.0.join(format!("manifests-{n}"));
        write_manifests(&manifests, &rig, n, REMOTE_CHUNK)?;
        let load_dir_ms = time_load_dir(&manifests, 3)?;
        let one_file_ms = if !quick && n == o.latency_cluster {
            let other = work.0.join("one-file");
            write_manifests(&other, &rig, n, n)?;
            let ms = time_load_dir(&other, 1)?;
            std::fs::remove_dir_all(&other)?;
            Some(ms)
        } else {
            None
        };
        let started = Instant::now();
        let mut agent = AgentProc::start(
            bin,
            &rig.node,
            &manifests,
            &work.0.join(format!("agent-{n}")),
        )?;
        let synced = agent.wait_synced(&rig.local, o.sync_timeout)?;
        let sync_s = synced.then(|| started.elapsed().as_secs_f64());
        let latency = if n == o.latency_cluster && synced {
            Some(measure_latency(
                &agent,
                &rig,
                &manifests,
                &staging,
                o.changes,
                o.latency_budget,
            )?)
        } else {
            None
        };
        let (rss_kib, hwm_kib) = agent.memory()?;
        results.push(SizeResult {
            cluster: n,
            sync_s,
            load_dir_ms,
            one_file_ms,
            rss_kib,
            hwm_kib,
            latency,
        });
        drop(agent);
        std::fs::remove_dir_all(&manifests)?;
    }
    let create_s = rig.create_s;
    let local = rig.local.len();
    drop(rig);
    Ok(section(&o, bin, local, create_s, &results))
}

/// Median of `n` in-process reads of the directory, in ms.
fn time_load_dir(dir: &Path, n: usize) -> anyhow::Result<f64> {
    let mut t = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        let snap = palisade::source::load_dir(dir)?;
        t.push(started.elapsed().as_secs_f64() * 1e3);
        ensure!(snap.errors.is_empty(), "manifest errors: {:?}", snap.errors);
    }
    Ok(pct(&t, 50.0))
}

fn pct(v: &[f64], p: f64) -> f64 {
    percentile(v, p).unwrap_or(f64::NAN)
}

fn section(o: &Opts, bin: &Path, local: usize, create_s: f64, results: &[SizeResult]) -> Section {
    let mut s = Section::new(
        "agent",
        "3. Policy programming latency and agent memory (real agent)",
    );
    s.method.push(format!(
        "A simulated node (network namespace) with {local} pods that have real \
         interfaces, made by the CNI `ptp` plugin (creating them took {create_s:.1} s), \
         and a manifest directory describing the whole cluster: {} namespaces with 2 \
         NetworkPolicies each (same-namespace ingress on 8080; app-0 from app-1 of the \
         next namespace on 9000), 10 apps per namespace, the local pods, and the rest of \
         the cluster as manifest-only pods on 50 other nodes (addresses in \
         198.18.0.0/15). The agent is the release binary run as a subprocess \
         (`palisade --netns NODE agent --manifests DIR ...`).",
        cluster::NAMESPACES
    ));
    s.method.push(format!(
        "Latency: the probe pod sends one UDP datagram per {} ms to the target pod, each \
         from a new source port (a new flow: conntrack never carries an old verdict \
         over); the target records what arrives. A change is an atomic rename of \
         `50-probe.yaml` (written beside the directory, renamed into it) that makes the \
         target's policy allow or stop allowing the probe pod. Latency = time from just \
         before the rename to the send time of the first datagram from which on every \
         datagram (≥ {SETTLE} in a row, each given {} ms to arrive) has the new verdict; \
         the probe period bounds the resolution (the figure is high by < 1 ms). Changes \
         alternate allow/deny, up to {} or until {} s of changes have passed, with a \
         10–60 ms random pause between them. The agent's own `reconciled` log records \
         (compile + map writes of the changed file's objects) during the changes are \
         shown beside it, and `load_dir alone` is the agent library's manifest reader \
         timed in-process on the whole directory (median of 3): what the first read at \
         start costs (later changes re-read only the files inotify names).",
        PROBE_PERIOD.as_millis(),
        GRACE.as_millis(),
        o.changes,
        o.latency_budget.as_secs()
    ));
    let mut lt = Table::new(
        format!(
            "Manifest change → verdict on the wire, {} local pods / {} cluster pods (ms):",
            local,
            int(o.latency_cluster)
        ),
        &["change", "n", "p50", "p99", "max", "timed out (> 10 s)"],
    );
    let mut mt = Table::new(
        format!(
            "Agent sync and memory (release binary; VmRSS/VmHWM from /proc/PID/status after \
             sync, and for the {} row after the latency changes):",
            int(o.latency_cluster)
        ),
        &[
            "cluster pods",
            "local pods",
            "start → synced (s)",
            "VmRSS (MiB)",
            "VmHWM (MiB)",
            "load_dir alone (ms)",
        ],
    );
    let mut data = Vec::new();
    for r in results {
        mt.row(vec![
            int(r.cluster),
            local.to_string(),
            match r.sync_s {
                Some(t) => format!("{t:.2}"),
                None => format!("not synced in {} s", o.sync_timeout.as_secs()),
            },
            format!("{:.1}", r.rss_kib as f64 / 1024.0),
            format!("{:.1}", r.hwm_kib as f64 / 1024.0),
            num(r.load_dir_ms),
        ]);
        let mut d = json!({"cluster_pods": r.cluster, "local_pods": local, "sync_seconds": r.sync_s,
                           "vm_rss_kib": r.rss_kib, "vm_hwm_kib": r.hwm_kib,
                           "load_dir_ms": r.load_dir_ms,
                           "load_dir_one_file_ms": r.one_file_ms});
        if let Some(ms) = r.one_file_ms {
            s.notes.push(format!(
                "The manifest-only pods are written {} per file. The same {} pods in one \
                 file take {} ms to read with `load_dir` (against {} ms in files of {}). \
                 Reading the whole directory is paid at start only: afterwards the agent \
                 re-reads just the files its inotify watch names.",
                REMOTE_CHUNK,
                int(r.cluster),
                num(ms),
                num(r.load_dir_ms),
                REMOTE_CHUNK
            ));
        }
        if let Some(l) = &r.latency {
            let all: Vec<f64> = l.allow.iter().chain(&l.deny).copied().collect();
            for (name, v) in [
                ("deny → allow", &l.allow),
                ("allow → deny", &l.deny),
                ("all", &all),
            ] {
                lt.row(vec![
                    name.into(),
                    v.len().to_string(),
                    num(pct(v, 50.0)),
                    num(pct(v, 99.0)),
                    num(v.iter().copied().fold(f64::NAN, f64::max)),
                    if name == "all" {
                        l.timeouts.to_string()
                    } else {
                        String::new()
                    },
                ]);
            }
            lt.row(vec![
                "agent `reconciled` records".into(),
                l.reconcile_ms.len().to_string(),
                num(pct(&l.reconcile_ms, 50.0)),
                num(pct(&l.reconcile_ms, 99.0)),
                num(l.reconcile_ms.iter().copied().fold(f64::NAN, f64::max)),
                String::new(),
            ]);
            let p99 = pct(&all, 99.0);
            let enough = all.len() >= 30;
            s.targets.push(Target::new(
                "programming latency p99 < 100 ms (≥ 30 changes)",
                if l.timeouts > 0 {
                    Verdict::NotMet
                } else if !enough && !p99.is_nan() {
                    if p99 < 100.0 {
                        Verdict::NotMeasured
                    } else {
                        Verdict::NotMet
                    }
                } else {
                    Verdict::from_bool(p99 < 100.0)
                },
                format!(
                    "p50 {} ms, p99 {} ms over {} changes{}{}",
                    num(pct(&all, 50.0)),
                    num(p99),
                    all.len(),
                    if l.timeouts > 0 {
                        format!(", {} timed out", l.timeouts)
                    } else {
                        String::new()
                    },
                    if enough {
                        ""
                    } else {
                        " (fewer than 30: quick run)"
                    }
                ),
            ));
            d["latency_ms"] = json!({
                "deny_to_allow": l.allow, "allow_to_deny": l.deny, "timeouts": l.timeouts,
                "p50": pct(&all, 50.0), "p99": pct(&all, 99.0),
                "agent_reconcile_ms": l.reconcile_ms,
            });
        }
        data.push(d);
    }
    if !results.iter().any(|r| r.latency.is_some()) {
        s.targets.push(Target::new(
            "programming latency p99 < 100 ms (≥ 30 changes)",
            Verdict::NotMeasured,
            format!(
                "the agent did not sync within {} s at {} cluster pods",
                o.sync_timeout.as_secs(),
                int(o.latency_cluster)
            ),
        ));
    }
    s.tables.push(lt);
    s.tables.push(mt);
    let at = |n: usize| results.iter().find(|r| r.cluster == n);
    match at(100_000) {
        Some(r) => s.targets.push(Target::new(
            "agent RSS < 100 MiB at 100k cluster pods",
            Verdict::from_bool(r.rss_kib < 100 * 1024),
            format!(
                "VmRSS {:.1} MiB, VmHWM {:.1} MiB{}",
                r.rss_kib as f64 / 1024.0,
                r.hwm_kib as f64 / 1024.0,
                if r.sync_s.is_none() {
                    " (read before the agent had synced)"
                } else {
                    ""
                }
            ),
        )),
        None => s.targets.push(Target::new(
            "agent RSS < 100 MiB at 100k cluster pods",
            Verdict::NotMeasured,
            "not run in quick mode",
        )),
    }
    s.commands = vec![
        format!(
            "{} --netns <node-netns> --log-format json agent --manifests <dir> --node-name {NODE_NAME} --bpffs-dir /sys/fs/bpf/palisade-test-benchag-<pid>-<n> --run-dir <tmp>/run",
            bin.display()
        ),
        "# change: write <tmp>/staging/50-probe.yaml, then rename(2) it to <dir>/50-probe.yaml".into(),
    ];
    s.data = json!({"local_pods": local, "pod_creation_seconds": create_s, "changes": o.changes, "sizes": data});
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe_with(pattern: &[bool], allowed: bool) -> Option<Duration> {
        // Datagrams sent 1 ms apart starting at t0, all older than GRACE.
        let t0 = Instant::now() - GRACE - Duration::from_millis(pattern.len() as u64 + 5);
        let p = Probe {
            sent: Arc::new(Mutex::new(
                (0..pattern.len())
                    .map(|i| t0 + Duration::from_millis(i as u64))
                    .collect(),
            )),
            arrived: Arc::new(Mutex::new(pattern.to_vec())),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        p.settle(t0, allowed)
    }

    #[test]
    fn latency_is_the_start_of_the_settled_run() {
        // Denied for 7 datagrams, one lost after the change, then allowed for good.
        let mut pattern = vec![false; 7];
        pattern.extend([true, false]);
        pattern.extend(vec![true; SETTLE]);
        assert_eq!(probe_with(&pattern, true), Some(Duration::from_millis(9)));
        // Allowed then denied.
        let mut pattern = vec![true; 3];
        pattern.extend(vec![false; SETTLE]);
        assert_eq!(probe_with(&pattern, false), Some(Duration::from_millis(3)));
    }
}
