//! The status the agent publishes after every reconcile, atomically (write + rename), in
//! its run directory. `palisade status --json` prints it; its shape is a contract:
//! `programmed` maps `Kind/namespace/name` to the resourceVersion the kernel reflects.
//!
//! # Who may write it
//!
//! The CLI believes what the status says (which pod a counter belongs to, which source
//! the agent follows), so only root or the reading user may have written it. The agent
//! keeps its run directory `0700` and owned by itself (creating it so, tightening it with
//! a warning otherwise) and writes the status `0600` through a fresh temporary file that
//! is never a symlink. The CLI refuses a run directory or status file that any user can
//! write, or that belongs to someone other than root or itself, naming the path and the
//! fix ([`StatusError::Untrusted`]).

use std::io::Write as _;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

pub const STATUS_FILE: &str = "status.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub source: String,
    /// The first full sync has been programmed.
    pub synced: bool,
    /// Keys and versions shared with the agent's record (no copy per publish).
    pub programmed: BTreeMap<Arc<str>, Arc<str>>,
    pub rejected: Vec<Rejected>,
    pub endpoints: Vec<EndpointStatus>,
    /// Manifests that could not be read, with file and line.
    pub source_errors: Vec<String>,
    pub pid: u32,
    /// Fill level of each map the agent writes.
    #[serde(default)]
    pub maps: BTreeMap<String, MapFill>,
    /// Maps that were too full to take every entry the policies need: enforcement is
    /// partial (fewer flows allowed than the policies say) until they have room.
    #[serde(default)]
    pub map_errors: Vec<MapError>,
    /// Interfaces attached isolated because a pod a policy selects may be behind them
    /// but none is identified yet (see the quarantine rule in the README).
    #[serde(default)]
    pub quarantined: Vec<QuarantinedStatus>,
    /// Pins on bpffs that are missing and could not be put back: the CLI, the next agent
    /// and `--cleanup` cannot reach those objects (enforcement is unaffected).
    #[serde(default)]
    pub pin_problems: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuarantinedStatus {
    pub ifindex: u32,
    /// The interface's name when the agent knows it.
    pub name: Option<String>,
    pub isolation: String,
    /// Addresses the pod side of the interface holds, as far as the agent has seen.
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
}

/// A full map, and whose entries it lacks.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MapError {
    pub map: String,
    pub capacity: u32,
    /// Entries the policies need that are not in the map.
    pub missing: usize,
    /// What it means, in one sentence.
    pub error: String,
    /// Local pods (`namespace/name`) whose entries are missing.
    pub pods: Vec<String>,
    /// Policies (`namespace/name`) selecting those pods.
    pub policies: Vec<String>,
    /// Identity prefixes not in the map (left out, or withheld so that addresses of a
    /// missing prefix gain nothing from a wider one); at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct MapFill {
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rejected {
    pub object: String,
    pub error: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub pod: String,
    pub slot: u32,
    /// Host-side interface; None while the pod's interface is not found yet.
    pub ifindex: Option<u32>,
    pub isolation: String,
    /// The pod's IPs, so tools can name local pods in packet events.
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
    /// Policies (`namespace/name`) isolating the pod for ingress.
    #[serde(default)]
    pub isolated_ingress_by: Vec<String>,
    /// Policies (`namespace/name`) isolating the pod for egress.
    #[serde(default)]
    pub isolated_egress_by: Vec<String>,
}

/// Why a status cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a status the agent wrote: {source}", path.display())]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("refusing to trust {}: {why}; fix: {fix}", path.display())]
    Untrusted {
        path: PathBuf,
        why: String,
        fix: String,
    },
}

impl Status {
    /// Reads the status in `run_dir`, if the directory and the file are trustworthy (see
    /// the module docs).
    pub fn read(run_dir: &Path) -> Result<Self, StatusError> {
        let unreadable = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StatusError::Unreadable { path, source }
        };
        let dir = std::fs::metadata(run_dir).map_err(unreadable(run_dir))?;
        trusted(run_dir, &dir, true)?;
        let path = run_dir.join(STATUS_FILE);
        let file = std::fs::File::open(&path).map_err(unreadable(&path))?;
        let meta = file.metadata().map_err(unreadable(&path))?;
        trusted(&path, &meta, false)?;
        serde_json::from_reader(std::io::BufReader::new(file))
            .map_err(|source| StatusError::Malformed { path, source })
    }

    /// Publishes the status: run directory `0700`, file `0600`, replaced atomically.
    pub fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        private_dir(run_dir)?;
        let tmp = run_dir.join(format!(".{STATUS_FILE}.tmp"));
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // A new file (O_EXCL never follows a symlink), readable by the agent's user only.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        // Streamed: at 100,000 objects the text is megabytes, not worth holding.
        let mut out = std::io::BufWriter::new(f);
        serde_json::to_writer_pretty(&mut out, self)?;
        out.flush()?;
        drop(out);
        std::fs::rename(tmp, run_dir.join(STATUS_FILE))
    }

    pub fn agent_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why a file or directory with `mode` owned by `owner` cannot be trusted by user `me`.
fn distrust(mode: u32, owner: u32, me: u32) -> Option<String> {
    if mode & 0o002 != 0 {
        return Some(format!(
            "it is world-writable (mode {:04o}), so any user could have written it",
            mode & 0o7777
        ));
    }
    if owner != 0 && owner != me {
        return Some(format!(
            "it is owned by uid {owner}, neither root nor you (uid {me})"
        ));
    }
    None
}

/// Refuses `path` (the run directory when `dir`, else the status) unless this user can
/// trust what it holds, naming the fix.
fn trusted(path: &Path, meta: &std::fs::Metadata, dir: bool) -> Result<(), StatusError> {
    let me = euid();
    let Some(why) = distrust(meta.mode(), meta.uid(), me) else {
        return Ok(());
    };
    let p = path.display();
    let foreign_owner = meta.uid() != 0 && meta.uid() != me;
    let fix = match (foreign_owner, dir) {
        (true, _) => format!("chown root {p} (or pass the agent's --run-dir)"),
        (false, true) => format!("chmod 0700 {p} (the agent creates it so)"),
        (false, false) => format!("chmod 0600 {p} (the agent writes it so)"),
    };
    Err(StatusError::Untrusted {
        path: path.to_path_buf(),
        why,
        fix,
    })
}

/// Creates `dir` `0700`, or makes an existing one `0700` and the agent's own, warning
/// about what it had to change.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    let meta = match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
        }
        other => other?,
    };
    let me = euid();
    if meta.uid() != me {
        tracing::warn!(dir = %dir.display(), owner = meta.uid(), "run directory owned by another user; taking it over");
        std::os::unix::fs::chown(dir, Some(me), None)?;
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:04o}", meta.mode() & 0o7777),
            "run directory readable or writable by others; tightening it to 0700"
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_writable_or_foreign_is_distrusted() {
        assert_eq!(distrust(0o40700, 0, 0), None);
        assert_eq!(distrust(0o40755, 1000, 1000), None);
        let why = distrust(0o41777, 0, 0).unwrap();
        assert!(why.contains("world-writable (mode 1777)"), "{why}");
        let why = distrust(0o40700, 1000, 0).unwrap();
        assert!(
            why.contains("owned by uid 1000, neither root nor you (uid 0)"),
            "{why}"
        );
        // Root's files are trusted by everyone; group-writable is the owner's choice.
        assert_eq!(distrust(0o100660, 0, 1000), None);
    }
}
