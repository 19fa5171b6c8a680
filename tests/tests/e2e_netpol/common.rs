//! Shared by the `e2e_netpol*` tests: one agent running in-process in a node's network
//! namespace, fed a manifest directory with one object per file, every object carrying a
//! `metadata.resourceVersion`, so a test waits on `status.json` for exactly the versions
//! it wrote.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use palisade::agent::{run_until, AgentConfig};
use palisade::dataplane::Layout;
use palisade_tests::pins::PinDir;
use palisade_tests::{wait_until, NetNs};
use serde_json::{json, Value};

pub const NODE: &str = "n1";

/// How long an agent may take to program a change before a test gives up.
pub const PROGRAM_TIMEOUT: Duration = Duration::from_secs(15);

pub type Labels = BTreeMap<String, String>;

pub fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The agent on its own thread inside the node's namespace; stopped on drop, then its
/// pins and directories are removed.
pub struct Agent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    base: PathBuf,
    pub run_dir: PathBuf,
    pub manifests: PathBuf,
    // Dropped last: removes the pins after the agent has stopped.
    pins: PinDir,
}

impl Agent {
    /// Starts an agent on `files` (name -> objects) and waits for its first sync.
    pub fn start(node: &NetNs, tag: &str, files: &[(String, Vec<Value>)]) -> Agent {
        let pins = PinDir::new(tag);
        let base = std::env::temp_dir().join(format!(
            "palisade-{tag}-{}-{}",
            std::process::id(),
            pins.path().file_name().unwrap().to_string_lossy()
        ));
        let manifests = base.join("manifests");
        let run_dir = base.join("run");
        std::fs::create_dir_all(&manifests).unwrap();
        for (name, objs) in files {
            write_objects(&manifests.join(name), objs);
        }
        let cfg = AgentConfig {
            node_name: NODE.into(),
            source: palisade::source::SourceSpec::Manifests(manifests.clone()),
            layout: pins.layout(),
            run_dir: run_dir.clone(),
            conntrack_entries: 65_536,
            revoke_untracked: false,
            http_addr: None,
            services: Default::default(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = node
            .spawn(move || {
                // Threads the runtime starts inherit this thread's network namespace.
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?;
                rt.block_on(run_until(cfg, async {
                    let _ = rx.await;
                }))
            })
            .unwrap();
        let agent = Agent {
            stop: Some(tx),
            thread: Some(thread),
            base,
            run_dir,
            manifests,
            pins,
        };
        let ok = wait_until(PROGRAM_TIMEOUT, || {
            agent.status().is_some_and(|s| s["synced"] == true)
        });
        assert!(ok, "agent did not sync; status: {:?}", agent.status());
        agent
    }

    pub fn layout(&self) -> Layout {
        self.pins.layout()
    }

    /// Writes `objs` as one JSON `List` file (atomically: write + rename).
    pub fn write(&self, file: &str, objs: &[Value]) {
        write_objects(&self.manifests.join(file), objs);
    }

    pub fn remove(&self, file: &str) {
        let _ = std::fs::remove_file(self.manifests.join(file));
    }

    pub fn status(&self) -> Option<Value> {
        serde_json::from_slice(&std::fs::read(self.run_dir.join("status.json")).ok()?).ok()
    }

    /// Waits until `programmed` holds every `(key, Some(version))` and none of the
    /// `(key, None)`.
    pub fn wait(&self, want: &[(String, Option<String>)]) {
        let ok = wait_until(PROGRAM_TIMEOUT, || {
            self.status().is_some_and(|s| {
                want.iter().all(|(k, v)| match v {
                    Some(v) => s["programmed"][k.as_str()].as_str() == Some(v.as_str()),
                    None => s["programmed"].get(k.as_str()).is_none(),
                })
            })
        });
        assert!(
            ok,
            "agent did not program {want:?}; status: {}",
            self.status()
                .map(|s| serde_json::to_string_pretty(&s).unwrap())
                .unwrap_or_default()
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Err(e)) if !std::thread::panicking() => panic!("agent failed: {e:#}"),
                _ => {}
            }
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn write_objects(path: &Path, objs: &[Value]) {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objs});
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `status.json` key of an object.
pub fn key(obj: &Value) -> String {
    let kind = obj["kind"].as_str().unwrap();
    let name = obj["metadata"]["name"].as_str().unwrap();
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

/// `(key, version)` of an object, for [`Agent::wait`].
pub fn programmed(obj: &Value) -> (String, Option<String>) {
    (
        key(obj),
        obj["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_string),
    )
}

pub fn namespace(name: &str, labels: &Labels, rv: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels, "resourceVersion": rv.to_string()}})
}

/// A pod of the e2e model on [`NODE`]: containers declare the named ports
/// `serve-{80,81}-{tcp,udp}`; `ips` empty = not reported yet (as right after scheduling).
pub fn pod(ns: &str, name: &str, labels: &Labels, ips: &[IpAddr], rv: u64) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
            "resourceVersion": rv.to_string()},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "agnhost", "ports": [
            {"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"},
            {"name": "serve-81-tcp", "containerPort": 81, "protocol": "TCP"},
            {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"},
            {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}]}]},
        "status": {"phase": "Running"}});
    if let Some(first) = ips.first() {
        p["status"]["podIP"] = json!(first.to_string());
        p["status"]["podIPs"] = json!(ips
            .iter()
            .map(|ip| json!({"ip": ip.to_string()}))
            .collect::<Vec<_>>());
    }
    p
}

pub fn policy(ns: &str, name: &str, spec: Value, rv: u64) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": rv.to_string()},
        "spec": spec})
}
