//! Keeping the pins: the agent holds an fd of every object it pinned (maps and TCX links)
//! and puts back any pin that disappears.
//!
//! Pins are how everything outside the agent's process reaches the dataplane: the CLI
//! (`palisade drops`, `status`, `monitor`), the next agent (which adopts the maps instead
//! of starting empty) and `--cleanup`. A pinned TCX link is also what keeps a program
//! attached once no fd refers to it: a `rm -r` of the pin directory, or an unmounted
//! bpffs, would detach every program at once if the agent held no fd of its links. So
//! the dataplane holds one, and [`Keeper::check`] (every agent heartbeat) re-pins, from
//! those fds, whatever is missing: the very objects the attached programs use, never a
//! new copy. A path that now holds another object is left alone and reported: something
//! else (a second agent on the same directory?) put it there.
//!
//! When the `--bpffs-dir` is no longer on bpffs (unmounted), bpffs is mounted again: at
//! the directory itself if it still exists, or at `/sys/fs/bpf` when that is what went
//! away. Without CAP_SYS_ADMIN (the DaemonSet) the mount fails and the problem is
//! reported; enforcement continues either way, since the held fds keep everything alive.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::preflight::{fs_magic, BPF_FS_MAGIC};
use super::sys;

/// Where systemd (and the DaemonSet's hostPath) mounts bpffs; the only ancestor of the
/// pin directory the agent will mount bpffs on.
const SYSTEM_BPFFS: &str = "/sys/fs/bpf";

struct Held {
    fd: OwnedFd,
    id: u32,
    /// (st_dev, st_ino) of the pin when last seen holding this object: a pin whose inode
    /// is unchanged still holds it, which a stat proves without opening the object.
    inode: Option<(u64, u64)>,
}

/// The objects the agent pinned, by pin path.
#[derive(Default)]
pub struct Keeper {
    held: BTreeMap<PathBuf, Held>,
}

/// What one [`Keeper::check`] found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PinReport {
    /// Pins that were missing and are back.
    pub repinned: Vec<PathBuf>,
    /// Where bpffs was mounted again.
    pub mounted: Option<PathBuf>,
    /// What could not be repaired, in sentences for `palisade status`.
    pub problems: Vec<String>,
}

impl Keeper {
    /// Starts holding the object pinned at `path` (just pinned or adopted by the agent).
    pub fn hold(&mut self, path: PathBuf) -> io::Result<()> {
        let fd = sys::obj_get(&path)?;
        let id = sys::obj_id(fd.as_fd())?;
        let inode = inode_of(&path);
        self.held.insert(path, Held { fd, id, inode });
        Ok(())
    }

    /// Stops holding the object pinned at `path`: with its pin removed, the object goes
    /// (a link detaches) once nothing else refers to it.
    pub fn release(&mut self, path: &Path) {
        self.held.remove(path);
    }

    /// Makes sure `root` is on bpffs and every held object is pinned where it was.
    pub fn check(&mut self, root: &Path) -> PinReport {
        let mut report = PinReport::default();
        match ensure_bpffs(root) {
            Ok(mounted) => report.mounted = mounted,
            Err(problem) => {
                report.problems.push(problem);
                return report;
            }
        }
        for (path, held) in &mut self.held {
            if held.inode.is_some() && inode_of(path) == held.inode {
                continue;
            }
            match pin_state(path, held.id) {
                PinState::Ours => held.inode = inode_of(path),
                PinState::Missing => match repin(path, held) {
                    Ok(()) => {
                        held.inode = inode_of(path);
                        report.repinned.push(path.clone());
                    }
                    Err(e) => report
                        .problems
                        .push(format!("cannot pin {} again: {e}", path.display())),
                },
                PinState::Other(id) => report.problems.push(format!(
                    "{} holds object id {id}, not the agent's (id {}); left alone",
                    path.display(),
                    held.id
                )),
                PinState::Unreadable(e) => report
                    .problems
                    .push(format!("cannot read the pin {}: {e}", path.display())),
            }
        }
        report
    }
}

/// Raises the soft limit of open files to the hard one: the agent holds two link fds per
/// local pod (up to `MAX_ENDPOINTS`, 2048), beyond the usual soft limit of 1024.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(
                    error = %io::Error::last_os_error(),
                    "cannot raise the open-file limit"
                );
            }
        }
    }
}

enum PinState {
    Ours,
    Missing,
    Other(u32),
    Unreadable(io::Error),
}

fn pin_state(path: &Path, id: u32) -> PinState {
    match sys::obj_get(path).and_then(|fd| sys::obj_id(fd.as_fd())) {
        Ok(found) if found == id => PinState::Ours,
        Ok(found) => PinState::Other(found),
        Err(e) if e.kind() == io::ErrorKind::NotFound => PinState::Missing,
        Err(e) => PinState::Unreadable(e),
    }
}

fn repin(path: &Path, held: &Held) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    sys::obj_pin(held.fd.as_fd(), path)
}

fn inode_of(path: &Path) -> Option<(u64, u64)> {
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

fn on_bpffs(path: &Path) -> bool {
    fs_magic(path) == Some(BPF_FS_MAGIC)
}

/// Makes `root` a directory on bpffs, mounting bpffs if it is gone (see the module docs
/// for where). Returns where it mounted, or the problem in a sentence.
fn ensure_bpffs(root: &Path) -> Result<Option<PathBuf>, String> {
    if on_bpffs(root) {
        return Ok(None);
    }
    let target = if root.exists() {
        root.to_path_buf()
    } else {
        let ancestor = root
            .ancestors()
            .find(|a| a.exists())
            .unwrap_or(Path::new("/"));
        if on_bpffs(ancestor) {
            // Only the directory was removed.
            return std::fs::create_dir_all(root)
                .map(|()| None)
                .map_err(|e| format!("cannot create the pin directory {}: {e}", root.display()));
        }
        if ancestor != Path::new(SYSTEM_BPFFS) {
            return Err(format!(
                "the pin directory {} is gone and {} is not on bpffs; mount bpffs there \
                 (mount -t bpf bpf DIR) or restart the agent",
                root.display(),
                ancestor.display()
            ));
        }
        ancestor.to_path_buf()
    };
    mount_bpffs(&target).map_err(|e| {
        format!(
            "{} is not on bpffs any more and mounting it failed ({e}){}; pins stay \
             missing (enforcement continues): mount bpffs there (mount -t bpf bpf {})",
            target.display(),
            if e.raw_os_error() == Some(libc::EPERM) {
                ": the agent lacks CAP_SYS_ADMIN"
            } else {
                ""
            },
            target.display()
        )
    })?;
    std::fs::create_dir_all(root)
        .map_err(|e| format!("cannot create the pin directory {}: {e}", root.display()))?;
    Ok(Some(target))
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = sys::c_path(target)?;
    // SAFETY: every argument is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_mounts_bpffs_over_an_unrelated_directory() {
        // The pin directory is gone and its nearest ancestor is `/`: mounting there would
        // hide the whole filesystem, so the agent reports instead.
        let root = Path::new("/nonexistent-palisade-repin-test/pins");
        let e = ensure_bpffs(root).unwrap_err();
        assert!(
            e.contains("/nonexistent-palisade-repin-test/pins is gone and / is not on bpffs"),
            "{e}"
        );
        assert!(!root.exists());
    }

    #[test]
    fn without_cap_sys_admin_an_unmounted_bpffs_is_reported_with_the_fix() {
        // The DaemonSet's agent: the pin directory is no longer on bpffs, and it may not
        // mount one.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let e = std::thread::spawn(move || {
            palisade_tests::privilege::drop_cap_sys_admin_from_this_thread();
            ensure_bpffs(&root).unwrap_err()
        })
        .join()
        .unwrap();
        let d = dir.path().display();
        assert!(
            e.contains(&format!(
                "{d} is not on bpffs any more and mounting it failed"
            )) && e.contains("the agent lacks CAP_SYS_ADMIN")
                && e.contains(&format!("mount -t bpf bpf {d}")),
            "{e}"
        );
        assert!(!on_bpffs(dir.path()));
    }
}
