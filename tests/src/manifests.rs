//! Kubernetes manifests for the agent's manifest-directory source, made from harness pods:
//! a Namespace labelled `ns: <name>`, a Pod labelled `pod: <name>` with its real IPs and
//! node, and NetworkPolicies written inline by the tests.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cni::Pod;

/// `apiVersion: v1, kind: Namespace` with the label `ns: <name>`.
pub fn namespace(name: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    ns: {name}\n"
    )
}

/// A running Pod object for a harness pod named `ns/name`, scheduled on `node`, labelled
/// `pod: <name>`, with its IPv4 and IPv6 addresses as status.podIPs.
pub fn pod(p: &Pod, node: &str) -> String {
    let (ns, name) = p.name().split_once('/').unwrap_or(("default", p.name()));
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    pod: {name}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: agnhost\nstatus:\n  phase: Running\n  podIP: {v4}\n  podIPs: [{{ip: {v4}}}, {{ip: {v6}}}]\n",
        v4 = p.ipv4(),
        v6 = p.ipv6(),
    )
}

/// Writes `yaml` to `dir/file` atomically (write + rename), so the agent's inotify
/// source never reads half a file.
pub fn write(dir: &Path, file: &str, yaml: &str) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(file)).with_context(|| format!("rename to {file}"))
}
