//! The parts of Pods and Namespaces the compiler looks at, normalized once per change.

use std::collections::HashSet;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

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
    /// Shared by every pod with the same labels (replicas): see [`Interner`].
    pub labels: Arc<Labels>,
    pub ips: Vec<IpAddr>,
    pub node: Option<Arc<str>>,
    pub host_network: bool,
    pub terminated: bool,
    /// Shared like the labels: the replicas of a Deployment declare the same ports.
    pub named_ports: Arc<[NamedPort]>,
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
        // Collected without a size hint: room for four otherwise, kept for the pod's life.
        ips.shrink_to_fit();
        Self {
            labels: Arc::new(pod.metadata.labels.clone().unwrap_or_default()),
            ips,
            node: spec.and_then(|s| s.node_name.as_deref()).map(Arc::from),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            terminated: matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            named_ports: ports::named_ports(pod).into(),
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

/// One shared copy of each distinct value (label sets, node names, named ports) held by
/// cluster pods: at 100,000 pods the replicas of a Deployment would otherwise each keep
/// their own.
pub(crate) struct Interner<T: ?Sized>(HashSet<Arc<T>>);

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Self(HashSet::new())
    }
}

impl<T: Hash + Eq + ?Sized> Interner<T> {
    pub fn intern(&mut self, v: Arc<T>) -> Arc<T> {
        match self.0.get(&v) {
            Some(shared) => Arc::clone(shared),
            None => {
                self.0.insert(Arc::clone(&v));
                v
            }
        }
    }

    /// Forgets `v`'s value once the caller's copy is the last one outside the interner.
    pub fn release(&mut self, v: Arc<T>) {
        if Arc::strong_count(&v) == 2 {
            self.0.remove(&*v);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// The interners of the values pods share.
#[derive(Default)]
pub(crate) struct PodInterners {
    labels: Interner<Labels>,
    nodes: Interner<str>,
    ports: Interner<[NamedPort]>,
}

impl PodState {
    pub fn intern(mut self, i: &mut PodInterners) -> Self {
        self.labels = i.labels.intern(self.labels);
        self.node = self.node.map(|n| i.nodes.intern(n));
        self.named_ports = i.ports.intern(self.named_ports);
        self
    }

    pub fn release(self, i: &mut PodInterners) {
        i.labels.release(self.labels);
        if let Some(n) = self.node {
            i.nodes.release(n);
        }
        i.ports.release(self.named_ports);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interner_shares_equal_values_and_forgets_unused_ones() {
        let mut interner = Interner::<str>::default();
        let a = interner.intern(Arc::from("node-1"));
        let b = interner.intern(Arc::from("node-1"));
        assert!(Arc::ptr_eq(&a, &b), "equal values share one allocation");
        let c = interner.intern(Arc::from("node-2"));
        assert_eq!(interner.len(), 2);

        interner.release(a);
        assert_eq!(interner.len(), 2, "node-1 is still held by b");
        interner.release(b);
        interner.release(c);
        assert_eq!(interner.len(), 0, "nothing outlives its last holder");
    }
}
