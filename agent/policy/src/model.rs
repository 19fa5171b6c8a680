//! The parts of Pods and Namespaces the compiler looks at, normalized once per change.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde::Serialize;

use crate::ports::{self, NamedPort};
use crate::selector::{Labels, NAMESPACE_NAME_LABEL};

/// A namespaced object: (namespace, name). Endpoint plans are keyed by it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub(crate) fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }

    /// The first and last possible refs of a namespace, for range scans.
    pub(crate) fn namespace_range(ns: &str) -> std::ops::RangeInclusive<ObjectRef> {
        // Names are DNS labels, so no real name sorts after a run of U+10FFFF.
        ObjectRef::new(ns, "")..=ObjectRef::new(ns, "\u{10FFFF}\u{10FFFF}")
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub type PodRef = ObjectRef;
pub type PolicyRef = ObjectRef;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodState {
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    pub host_network: bool,
    pub terminated: bool,
    pub named_ports: Vec<NamedPort>,
}

impl PodState {
    pub fn from_pod(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .filter(|v| !v.is_empty())
            .map(|v| v.iter().filter_map(|p| p.ip.parse().ok()).collect())
            .or_else(|| {
                status
                    .and_then(|s| s.pod_ip.as_ref())
                    .and_then(|ip| ip.parse().ok())
                    .map(|ip| vec![ip])
            })
            .unwrap_or_default();
        ips.sort();
        ips.dedup();
        Self {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ips,
            node: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminated: matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            named_ports: ports::named_ports(pod),
        }
    }

    /// Its IPs stand for it as a policy peer.
    pub fn is_peer(&self) -> bool {
        !self.ips.is_empty() && !self.host_network && !self.terminated
    }

    /// It gets an endpoint plan on `node`.
    pub fn is_local(&self, node: &str) -> bool {
        self.is_peer() && self.node.as_deref() == Some(node)
    }
}

/// The labels selectors see on a namespace, including the name label the API server adds.
pub(crate) fn namespace_labels(name: &str, labels: Option<&Labels>) -> Labels {
    let mut l = labels.cloned().unwrap_or_default();
    l.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
    l
}

pub(crate) fn namespace_of(ns: &Namespace) -> (String, Labels) {
    let name = ns.metadata.name.clone().unwrap_or_default();
    let labels = namespace_labels(&name, ns.metadata.labels.as_ref());
    (name, labels)
}
