//! Where the agent learns the cluster state it enforces: the Kubernetes API (`kube`), or a
//! directory of manifests (`palisade agent --manifests DIR`), which lets the agent run
//! without an API server: in tests, on a single node, or fed by a ConfigMap volume.
//!
//! Both sources run as tasks that send [`Update`]s over a channel, so the agent loop does
//! not know which one it is fed by: it applies [`ObjectChange`]s to the compiler, keeps
//! each object's version for `palisade status`, and removes from the kernel what no source
//! object asks for only after [`Update::Synced`].

mod dir_index;
mod directory;
pub mod kube;
mod manifests;

use std::sync::Arc;

use palisade_policy::Change;

pub use directory::spawn_directory;
pub use kube::{spawn_kube, KubeConnection};
pub use manifests::{
    load_dir, object_key, DirWatcher, ManifestError, Snapshot, SourceError, DEFAULT_NAMESPACE,
};

/// What a source tells the agent, in order.
#[derive(Debug)]
pub enum Update {
    /// Objects added, changed or removed since the previous update.
    Changes(Vec<ObjectChange>),
    /// Everything the source knows has been sent at least once (the first full list, or
    /// the first read of the directory). Until then the agent removes nothing it finds
    /// in the kernel. Sent once.
    Synced,
    /// The source's current problems (files that do not parse, failing watches); replaces
    /// the previous list. Objects already sent stay in force.
    Errors(Vec<String>),
}

/// One object's change, with what `palisade status` needs to name it. Key and version
/// are shared with the source's own record of what it sent: at 100,000 objects a second
/// copy of each would cost megabytes.
#[derive(Debug)]
pub struct ObjectChange {
    /// [`object_key`]: `Kind/namespace/name` or `Kind/name`.
    pub key: Arc<str>,
    /// resourceVersion (or content hash) of the new state; `None` when deleted.
    pub version: Option<Arc<str>>,
    pub change: Change,
}

impl ObjectChange {
    /// Parses the kind and name back out of `key` to build the delete change.
    pub fn deleted(key: Arc<str>) -> Option<Self> {
        use palisade_policy::ObjectRef;
        let mut parts = key.splitn(3, '/');
        let change = match (parts.next(), parts.next(), parts.next()) {
            (Some("Namespace"), Some(name), None) => Change::DeleteNamespace(name.to_string()),
            (Some("Pod"), Some(ns), Some(name)) => Change::DeletePod(ObjectRef::new(ns, name)),
            (Some("NetworkPolicy"), Some(ns), Some(name)) => {
                Change::DeletePolicy(ObjectRef::new(ns, name))
            }
            _ => return None,
        };
        Some(Self {
            key,
            version: None,
            change,
        })
    }
}

/// Which source an agent follows.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    /// A manifest directory, followed with inotify.
    Manifests(std::path::PathBuf),
    /// The Kubernetes API: Namespaces, Pods and NetworkPolicies, watched cluster-wide.
    Kubernetes(KubeConnection),
}

impl std::fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceSpec::Manifests(dir) => write!(f, "manifests:{}", dir.display()),
            SourceSpec::Kubernetes(conn) => conn.fmt(f),
        }
    }
}
