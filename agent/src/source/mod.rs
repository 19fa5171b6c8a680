//! Where the agent learns the cluster state it enforces. Today that is a directory of
//! manifests (`palisade agent --manifests DIR`), which lets the agent run without an API
//! server: in tests, on a single node, or fed by a ConfigMap volume.

mod manifests;

pub use manifests::{
    load_dir, object_key, DirWatcher, ManifestError, Snapshot, SourceError, DEFAULT_NAMESPACE,
};
