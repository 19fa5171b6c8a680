//! Where Palisade keeps its state on bpffs. Everything lives under one directory per map
//! layout version (`<root>/v<N>/{maps,links}`), so an agent never reopens maps whose layout
//! it does not understand, an upgrade builds the new version's pins beside the old ones
//! (see `upgrade`), and `--cleanup` removes exactly what Palisade created.

use std::path::{Path, PathBuf};

use palisade_common::LAYOUT_VERSION;

/// Default bpffs directory for pins.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/palisade";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
    version: u32,
}

impl Layout {
    /// This binary's layout version under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_version(root, LAYOUT_VERSION)
    }

    /// Another layout version under `root` (upgrades, and tests that simulate them).
    pub fn with_version(root: impl Into<PathBuf>, version: u32) -> Self {
        Self {
            root: root.into(),
            version,
        }
    }

    /// The `--bpffs-dir` the layout was made from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Directory of this layout version.
    pub fn versioned(&self) -> PathBuf {
        self.root.join(format!("v{}", self.version))
    }

    /// The other layout versions that have pins under the same root, oldest first.
    pub fn others(&self) -> Vec<Layout> {
        let mut out: Vec<Layout> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let v: u32 = name.to_str()?.strip_prefix('v')?.parse().ok()?;
                (v != self.version).then(|| Layout::with_version(self.root.clone(), v))
            })
            .collect();
        out.sort_by_key(Layout::version);
        out
    }

    /// This version and every other one under the same root.
    pub fn all_versions(&self) -> Vec<Layout> {
        let mut v = self.others();
        v.push(self.clone());
        v
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.versioned().join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.versioned().join("links")
    }

    /// Pin of the link attaching `program` to the interface `ifindex`.
    pub fn link(&self, ifindex: u32, hook: Hook) -> PathBuf {
        self.links_dir()
            .join(format!("{ifindex}-{}", hook.suffix()))
    }

    /// The TCX link of `palisade_uplink` on the uplink `ifindex`.
    pub fn uplink_link(&self, ifindex: u32) -> PathBuf {
        self.links_dir().join(format!("uplink-{ifindex}"))
    }
}

/// The two tc hooks on a pod's host-side interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// tc ingress of the host veth: packets from the pod (its egress check).
    FromPod,
    /// tc egress of the host veth: packets to the pod (its ingress check).
    ToPod,
}

impl Hook {
    pub const ALL: [Hook; 2] = [Hook::FromPod, Hook::ToPod];

    pub fn suffix(self) -> &'static str {
        match self {
            Hook::FromPod => "from-pod",
            Hook::ToPod => "to-pod",
        }
    }

    pub fn program(self) -> &'static str {
        match self {
            Hook::FromPod => palisade_common::programs::FROM_POD,
            Hook::ToPod => palisade_common::programs::TO_POD,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_versioned_by_layout() {
        let l = Layout::new("/sys/fs/bpf/x");
        assert_eq!(
            l.map("POLICY"),
            PathBuf::from(format!("/sys/fs/bpf/x/v{LAYOUT_VERSION}/maps/POLICY"))
        );
        assert!(l
            .link(7, Hook::ToPod)
            .ends_with(format!("v{LAYOUT_VERSION}/links/7-to-pod")));
        let v9 = Layout::with_version("/sys/fs/bpf/x", 9);
        assert_eq!(v9.maps_dir(), PathBuf::from("/sys/fs/bpf/x/v9/maps"));
    }
}
