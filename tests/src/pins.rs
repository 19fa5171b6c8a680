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
