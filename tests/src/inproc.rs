//! The agent in-process: `palisade::agent::run_until` on its own thread inside a node's
//! network namespace, stopped (as by SIGTERM) on drop. Faster to start than the binary and
//! lets a test hand it a mocked Kubernetes client; `crate::agent` runs the real binary.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use palisade::agent::{run_until, AgentConfig};
use palisade::dataplane::Layout;
use palisade::source::SourceSpec;
use serde_json::Value;

use crate::agent::{read_status, slot_in, TempDir};
use crate::netns::NetNs;
use crate::pins::PinDir;
use crate::util::wait_until;

/// How long a change may take to show as programmed in the status.
pub const PROGRAM_TIMEOUT: Duration = Duration::from_secs(15);

/// The settings tests start from: the given source, node and directories; no HTTP port,
/// no service CIDRs, connections kept when a pod becomes isolated.
pub fn config(node: &str, source: SourceSpec, layout: Layout, run_dir: &Path) -> AgentConfig {
    AgentConfig {
        node_name: node.into(),
        source,
        layout,
        run_dir: run_dir.to_owned(),
        conntrack_entries: 65_536,
        revoke_untracked: false,
        http_addr: None,
        services: Default::default(),
        max_entries: Default::default(),
    }
}

/// A running in-process agent. Declare it before the `PinDir` of its layout in a struct,
/// so the agent stops before its pins are removed.
pub struct InProcessAgent {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    run_dir: PathBuf,
}

impl InProcessAgent {
    /// Starts the agent in `node`; returns at once (wait on the status for what you need).
    pub fn spawn(node: &NetNs, cfg: AgentConfig) -> InProcessAgent {
        Self::spawn_with(node, cfg, || {})
    }

    /// Like [`InProcessAgent::spawn`], running `setup` first on the agent's thread (e.g. to
    /// drop capabilities, which its runtime's threads then inherit).
    pub fn spawn_with(
        node: &NetNs,
        cfg: AgentConfig,
        setup: impl FnOnce() + Send + 'static,
    ) -> InProcessAgent {
        let run_dir = cfg.run_dir.clone();
        // The status of an earlier agent on the same run dir is not this one's.
        let _ = std::fs::remove_file(run_dir.join("status.json"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = node
            .spawn(move || {
                setup();
                // Threads the runtime starts inherit this thread's network namespace.
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?;
                rt.block_on(run_until(cfg, async {
                    let _ = rx.await;
                }))
            })
            .expect("spawning the agent thread in the node namespace");
        InProcessAgent {
            stop: Some(tx),
            thread: Some(thread),
            run_dir,
        }
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The agent's `status.json`, if it wrote one.
    pub fn status(&self) -> Option<Value> {
        read_status(&self.run_dir)
    }

    /// Slot of `pod` (`ns/name`) in the agent's status.
    pub fn slot(&self, pod: &str) -> Option<u32> {
        slot_in(&self.status()?, pod)
    }

    /// Waits (at most `timeout`) until `check` holds on the status; panics naming `what`
    /// with the last status otherwise, or at once if the agent exited.
    pub fn wait_status(&self, what: &str, timeout: Duration, check: impl Fn(&Value) -> bool) {
        let ok = wait_until(timeout, || {
            self.exited() || self.status().is_some_and(|v| check(&v))
        });
        assert!(
            ok && !self.exited(),
            "{what}; agent {}; status: {}",
            if self.exited() { "exited" } else { "running" },
            self.status()
                .map(|s| serde_json::to_string_pretty(&s).unwrap_or_default())
                .unwrap_or_default()
        );
    }

    /// Waits until the first sync is done and every key is in `programmed`.
    pub fn wait_programmed(&self, keys: &[&str]) {
        self.wait_status(
            &format!("agent did not program {keys:?}"),
            PROGRAM_TIMEOUT,
            |v| v["synced"] == true && keys.iter().all(|k| v["programmed"].get(*k).is_some()),
        );
    }

    /// Waits until `key` is no longer in `programmed`.
    pub fn wait_gone(&self, key: &str) {
        self.wait_status(&format!("{key} still programmed"), PROGRAM_TIMEOUT, |v| {
            v["programmed"].get(key).is_none()
        });
    }

    fn exited(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| t.is_finished())
    }

    /// Stops the agent as SIGTERM does (enforcement stays pinned) and surfaces its error.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Err(e)) if !std::thread::panicking() => panic!("agent failed: {e:#}"),
                Err(_) if !std::thread::panicking() => panic!("agent thread panicked"),
                _ => {}
            }
        }
    }
}

impl Drop for InProcessAgent {
    fn drop(&mut self) {
        self.halt();
    }
}

/// An in-process agent on a manifest directory and pins of its own: the agent stops on
/// drop, before its pins and directories are removed.
pub struct ManifestAgent {
    pub agent: InProcessAgent,
    /// The directory the agent reads its objects from.
    pub manifests: PathBuf,
    // Dropped after the agent: removes the pins and directories once it has stopped.
    pins: PinDir,
    _tmp: TempDir,
}

impl ManifestAgent {
    /// Writes `files` (name, contents) to a new manifest directory and starts an agent on
    /// it in `node` as node `node_name`, its config adjusted by `configure`; returns at once.
    pub fn spawn(
        node: &NetNs,
        node_name: &str,
        tag: &str,
        files: &[(&str, &str)],
        configure: impl FnOnce(&mut AgentConfig),
    ) -> ManifestAgent {
        let pins = PinDir::new(tag);
        let tmp = TempDir::new(tag).expect("creating the agent's directory");
        let manifests = tmp.path().join("manifests");
        std::fs::create_dir_all(&manifests).expect("creating the manifest directory");
        for (name, contents) in files {
            crate::manifests::write(&manifests, name, contents).expect("writing a manifest");
        }
        let mut cfg = config(
            node_name,
            SourceSpec::Manifests(manifests.clone()),
            pins.layout(),
            &tmp.path().join("run"),
        );
        configure(&mut cfg);
        ManifestAgent {
            agent: InProcessAgent::spawn(node, cfg),
            manifests,
            pins,
            _tmp: tmp,
        }
    }

    pub fn layout(&self) -> Layout {
        self.pins.layout()
    }

    /// Writes (or replaces, atomically) manifest `file`.
    pub fn write(&self, file: &str, contents: &str) {
        crate::manifests::write(&self.manifests, file, contents).expect("writing a manifest");
    }

    /// Removes manifest `file`, which must exist.
    pub fn remove(&self, file: &str) {
        std::fs::remove_file(self.manifests.join(file)).expect("removing a manifest");
    }

    /// [`ManifestAgent::write`]s `file` and waits until every key of `programmed` is
    /// programmed.
    pub fn apply(&self, file: &str, contents: &str, programmed: &[&str]) {
        self.write(file, contents);
        self.agent.wait_programmed(programmed);
    }

    /// [`ManifestAgent::remove`]s `file` and waits until `gone` is no longer programmed.
    pub fn delete(&self, file: &str, gone: &str) {
        self.remove(file);
        self.agent.wait_gone(gone);
    }
}
