//! Named network namespaces (`ip netns` compatible) and running code in them.

use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

/// Where `ip netns` keeps its bind mounts; CNI plugins get paths below it.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Every namespace this harness creates starts with this, so leftovers from a
/// SIGKILLed run are recognisable.
pub const PREFIX: &str = "pt-";

static COUNTER: AtomicU32 = AtomicU32::new(0);
// The first `ip netns add` on a machine creates and bind-mounts the netns dir;
// two racing first calls can stack mounts, so creation is serialised.
static CREATE_LOCK: Mutex<()> = Mutex::new(());
static SWEEP: Once = Once::new();

/// A per-process unique name `pt-<tag>-<pid>-<n>`, so parallel tests (threads
/// and processes) never collide.
pub fn unique_name(tag: &str) -> String {
    let tag: String = tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(10)
        .collect::<String>()
        .to_ascii_lowercase();
    let tag = if tag.is_empty() { "t".into() } else { tag };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{tag}-{}-{n}", std::process::id())
}

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates `pt-<tag>-<pid>-<n>` with `lo` up.
    pub fn new(tag: &str) -> Result<NetNs> {
        SWEEP.call_once(sweep_stale);
        let name = unique_name(tag);
        {
            let _g = CREATE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            run_cmd(Command::new("ip").args(["netns", "add", &name]))?;
        }
        let ns = NetNs {
            path: Path::new(NETNS_DIR).join(&name),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mount path (what CNI_NETNS expects).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `argv` inside the namespace via `ip netns exec`; returns stdout.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        run_cmd(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv),
        )
    }

    /// `ip -n <ns> <args>`; returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_cmd(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Like [`NetNs::ip`] with `-j`, parsed.
    pub fn ip_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = run_cmd(Command::new("ip").args(["-j", "-n", &self.name]).args(args))?;
        serde_json::from_str(&out).with_context(|| format!("ip -j {args:?}: {out}"))
    }

    /// Writes a per-namespace sysctl in-process (`net.ipv6.conf.default.accept_dad`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))
            .with_context(|| format!("sysctl {key}={value} in {}", self.name))
    }

    /// Reads a per-namespace sysctl.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        Ok(self
            .run(|| std::fs::read_to_string(&path))?
            .trim()
            .to_string())
    }

    /// An fd for `setns`, e.g. for worker threads that hop between namespaces.
    pub fn open(&self) -> io::Result<File> {
        File::open(&self.path)
    }

    /// Runs `f` on a fresh thread that has joined this namespace, and waits.
    ///
    /// A fresh thread because `setns` is per thread: the caller's namespace is
    /// never touched, and sockets created inside `f` stay in this namespace
    /// for their lifetime even after being handed back. Panics in `f` are
    /// propagated; failing to join the namespace panics too.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        let file = self
            .open()
            .unwrap_or_else(|e| panic!("open netns {}: {e}", self.name));
        let name = &self.name;
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&file).unwrap_or_else(|e| panic!("setns into {name}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Starts a long-lived thread inside this namespace (servers, probers).
    pub fn spawn<T, F>(&self, f: F) -> io::Result<JoinHandle<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = self.open()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(format!("ns:{}", self.name))
            .spawn(move || {
                let entered = enter(&file);
                let ok = entered.is_ok();
                let _ = tx.send(entered);
                assert!(ok, "setns failed");
                f()
            })?;
        // Report a failed setns to the caller instead of a later mystery.
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => Err(io::Error::other("netns thread died before setns")),
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run_cmd(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("palisade-tests: deleting netns {}: {e:#}", self.name);
        }
    }
}

/// Moves the calling thread into the network namespace behind `ns`.
pub fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; affects only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Names from `ip netns list` (without the "(id: n)" suffix).
pub fn list() -> Result<Vec<String>> {
    let out = run_cmd(Command::new("ip").args(["netns", "list"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Deletes `pt-<tag>-<pid>-<n>` namespaces whose creating process is gone
/// (a SIGKILLed or OOM-killed test run cannot run its Drop guards).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_owner(&name) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

fn stale_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let mut parts = rest.split('-');
    let (tag, pid, n) = (parts.next()?, parts.next()?, parts.next()?);
    let valid = parts.next().is_none()
        && !tag.is_empty()
        && tag.chars().all(|c| c.is_ascii_alphanumeric())
        && n.parse::<u32>().is_ok();
    if valid {
        pid.parse().ok()
    } else {
        None
    }
}

pub(crate) fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` with `input` on its stdin (a config, a ruleset); its output, whatever the
/// exit status.
pub(crate) fn output_with_input(cmd: &mut Command, input: &str) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    Ok(child.wait_with_output()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_owner_parses_only_our_pattern() {
        assert_eq!(stale_owner("pt-br-1234-7"), Some(1234));
        assert_eq!(stale_owner("pt-br-x-7"), None);
        assert_eq!(stale_owner("pt-br-1234-7-8"), None);
        assert_eq!(stale_owner("cni-1234-7"), None);
    }

    #[test]
    fn unique_names_are_short_and_distinct() {
        let a = unique_name("Very-Long-Tag-Name!");
        let b = unique_name("Very-Long-Tag-Name!");
        assert_ne!(a, b);
        assert!(a.starts_with("pt-verylongta-"), "{a}");
        assert!(stale_owner(&a).is_some(), "{a}");
    }
}
