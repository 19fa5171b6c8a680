//! The `palisade agent` binary as a subprocess in a node namespace: started, waited for on
//! its status contract (`status.json`), killed with SIGKILL and restarted. Each agent has
//! its own manifest directory, run directory and pin directory, so several simulated nodes
//! run side by side.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::netns::NetNs;
use crate::pins::PinDir;
use crate::util::wait_until;

/// How long an agent may take from start to a programmed status.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "palisade-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where one node's agent keeps its state.
pub struct AgentDirs {
    pub manifests: PathBuf,
    pub run_dir: PathBuf,
    pub log: PathBuf,
    pub pins: PinDir,
    _tmp: TempDir,
}

impl AgentDirs {
    /// Fresh directories; `manifests` may be shared between nodes (pass `Some`).
    pub fn new(tag: &str, manifests: Option<&Path>) -> Result<AgentDirs> {
        let tmp = TempDir::new(tag)?;
        let own = tmp.path().join("manifests");
        std::fs::create_dir_all(&own)?;
        Ok(AgentDirs {
            manifests: manifests.map(Path::to_path_buf).unwrap_or(own),
            run_dir: tmp.path().join("run"),
            log: tmp.path().join("agent.log"),
            pins: PinDir::new(tag),
            _tmp: tmp,
        })
    }

    /// Fresh directories with the pins in `pins` (e.g. on a private bpffs).
    pub fn with_pins(tag: &str, pins: PinDir) -> Result<AgentDirs> {
        let mut dirs = AgentDirs::new(tag, None)?;
        dirs.pins = pins;
        Ok(dirs)
    }

    /// The agent's `status.json`, if it wrote one.
    pub fn status(&self) -> Option<Value> {
        read_status(&self.run_dir)
    }

    /// Slot of `pod` (`ns/name`) in the agent's status.
    pub fn slot(&self, pod: &str) -> Option<u32> {
        slot_in(&self.status()?, pod)
    }
}

/// The `status.json` an agent wrote in `run_dir`, if any.
pub fn read_status(run_dir: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(run_dir.join("status.json")).ok()?).ok()
}

/// Slot of `pod` (`ns/name`) in an agent's `status`.
pub fn slot_in(status: &Value, pod: &str) -> Option<u32> {
    status["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["pod"] == pod)?["slot"]
        .as_u64()
        .map(|s| s as u32)
}

/// A running `palisade agent`; SIGKILLed on drop (pins stay, as after a crash; the
/// `PinDir` of its `AgentDirs` removes them).
pub struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts `bin agent` inside `node` (via `--netns`, never `ip netns exec`, which would
    /// hide /sys/fs/bpf) with the given node name and directories, plus `extra` flags.
    pub fn spawn(
        bin: &Path,
        node: &NetNs,
        node_name: &str,
        dirs: &AgentDirs,
        extra: &[&str],
    ) -> Result<AgentProcess> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&dirs.log)
            .with_context(|| format!("open {}", dirs.log.display()))?;
        let child = Command::new(bin)
            .arg("--netns")
            .arg(node.name())
            .arg("agent")
            .arg("--manifests")
            .arg(&dirs.manifests)
            .arg("--node-name")
            .arg(node_name)
            .arg("--bpffs-dir")
            .arg(dirs.pins.path())
            .arg("--run-dir")
            .arg(&dirs.run_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        Ok(AgentProcess {
            child,
            log: dirs.log.clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until this process (not an earlier agent whose status is still on disk) has
    /// published a synced status with every key of `programmed`. Returns the status.
    pub fn wait_ready(&mut self, dirs: &AgentDirs, programmed: &[&str]) -> Result<Value> {
        let pid = u64::from(self.pid());
        let mut exited = None;
        let ready = wait_until(READY_TIMEOUT, || {
            if let Ok(Some(st)) = self.child.try_wait() {
                exited = Some(st);
                return true;
            }
            dirs.status().is_some_and(|v| {
                v["pid"].as_u64() == Some(pid)
                    && v["synced"] == true
                    && programmed.iter().all(|k| v["programmed"].get(*k).is_some())
            })
        });
        if let Some(st) = exited {
            bail!(
                "agent exited ({st}) before it was ready:\n{}",
                self.log_tail()
            );
        }
        if !ready {
            bail!(
                "agent {pid} did not program {programmed:?} within {READY_TIMEOUT:?}; status: {}\n{}",
                dirs.status().map(|v| v.to_string()).unwrap_or_default(),
                self.log_tail()
            );
        }
        dirs.status().context("status vanished")
    }

    /// SIGKILL, as a crash or an OOM kill would; returns once the process is gone.
    pub fn kill9(mut self) -> Result<()> {
        self.child.kill().context("SIGKILL the agent")?;
        self.child.wait().context("reap the agent")?;
        Ok(())
    }

    /// The end of the agent's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!("--- agent log ---\n{}", lines[from..].join("\n"))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// Runs `bin args...` to completion (no namespace); returns (success, stdout+stderr).
pub fn run_to_end(bin: &Path, args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}
