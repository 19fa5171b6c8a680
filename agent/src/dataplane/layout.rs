//! Where Palisade keeps its state on bpffs. Everything lives under one directory per map
//! layout version, so an agent never reopens maps whose layout it does not understand and
//! `--cleanup` removes exactly what Palisade created.

use std::path::{Path, PathBuf};

use palisade_common::LAYOUT_VERSION;

/// Default bpffs directory for pins.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/palisade";

#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The `--bpffs-dir` the layout was made from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of this layout version.
    pub fn versioned(&self) -> PathBuf {
        self.root.join(format!("v{LAYOUT_VERSION}"))
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
    }
}
