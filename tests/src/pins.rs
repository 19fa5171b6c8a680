//! A private Palisade pin directory on bpffs per test, removed with everything Palisade
//! attached from it when the guard drops (also on panic).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use palisade::dataplane::{cleanup, Layout};

pub struct PinDir {
    layout: Layout,
}

impl PinDir {
    /// `/sys/fs/bpf/palisade-test-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> PinDir {
        static N: AtomicU32 = AtomicU32::new(0);
        ensure_bpffs();
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/palisade-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        PinDir {
            layout: Layout::new(dir),
        }
    }

    /// Pins under `root` (e.g. a [`PrivateBpffs`]), removed on drop like any other.
    pub fn at(root: PathBuf) -> PinDir {
        PinDir {
            layout: Layout::new(root),
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout.clone()
    }

    pub fn path(&self) -> PathBuf {
        self.layout.root().to_path_buf()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = cleanup(&self.layout) {
            eprintln!("cleanup of {}: {e}", self.layout.root().display());
        }
        let _ = std::fs::remove_dir_all(self.layout.root());
    }
}

/// Mounts bpffs at /sys/fs/bpf when the machine has none (a fresh CI machine).
fn ensure_bpffs() {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
        })
        .unwrap_or(false);
    if !mounted {
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("run mount");
        assert!(status.success(), "cannot mount bpffs at /sys/fs/bpf");
    }
}

/// A bpffs instance of its own, mounted on a fresh directory: a test can remove every pin
/// or unmount it without touching /sys/fs/bpf. On drop, every bpffs mounted there (the
/// agent under test may mount one again) is unmounted and the directory removed; declare
/// it before the `PinDir` using it, so the pins are cleaned up first.
pub struct PrivateBpffs {
    dir: PathBuf,
}

impl PrivateBpffs {
    /// `<tmp>/palisade-bpffs-<tag>-<pid>-<n>`, mounted.
    pub fn new(tag: &str) -> PrivateBpffs {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "palisade-bpffs-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("mkdir for bpffs");
        let fs = PrivateBpffs { dir };
        fs.mount();
        fs
    }

    pub fn path(&self) -> PathBuf {
        self.dir.clone()
    }

    /// Whether a bpffs is mounted on the directory.
    pub fn mounted(&self) -> bool {
        palisade::dataplane::fs_magic(&self.dir) == Some(palisade::dataplane::BPF_FS_MAGIC)
    }

    pub fn mount(&self) {
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&self.dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount bpffs on {}",
            self.dir.display()
        );
    }

    /// Unmounts the topmost bpffs on the directory; false if that failed.
    pub fn unmount(&self) -> bool {
        std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        // Bounded: a mount that cannot go (busy) is reported, not waited for.
        for _ in 0..8 {
            if !self.mounted() || !self.unmount() {
                break;
            }
        }
        if self.mounted() {
            eprintln!("bpffs still mounted on {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}
