//! A reference evaluator: the NetworkPolicy semantics read straight off the raw objects,
//! with no identities, no caches and no LPM tricks. Slow and obviously correct; the
//! compiler's plans are tested against it, and e2e / eBPF tests use it as the oracle.
//!
//! It shares one thing with the compiler on purpose: which objects are *rejected*
//! (`policy::compile(..).rejections`), because fail-closed handling must be identical and
//! is a validation rule, not a semantic one. Everything else is evaluated independently.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::policy;

/// A whole cluster: the objects plus every node's own addresses.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
    /// Node name → its addresses (traffic from a pod's own node is always let in).
    pub nodes: BTreeMap<String, Vec<IpAddr>>,
}

/// A rule's peers and ports as written.
pub(crate) type RawRule = (
    Option<Vec<NetworkPolicyPeer>>,
    Option<Vec<NetworkPolicyPort>>,
);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    Ingress,
    Egress,
}

pub(crate) fn labels_match(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let ml = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let me = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        let v = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => v.is_some_and(|v| values.contains(v)),
            "NotIn" => v.is_none_or(|v| !values.contains(v)),
            "Exists" => v.is_some(),
            "DoesNotExist" => v.is_none(),
            _ => false,
        }
    });
    ml && me
}

pub(crate) fn pod_ips(p: &Pod) -> Vec<IpAddr> {
    let st = p.status.as_ref();
    match st
        .and_then(|s| s.pod_ips.as_ref())
        .filter(|v| !v.is_empty())
    {
        Some(v) => v.iter().filter_map(|x| x.ip.parse().ok()).collect(),
        None => st
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|ip| ip.parse().ok())
            .into_iter()
            .collect(),
    }
}

/// A pod that stands for its IPs: running (or pending) with its own network namespace.
pub(crate) fn is_peer_pod(p: &Pod) -> bool {
    let host_net = p
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    !host_net && !matches!(phase, Some("Succeeded" | "Failed")) && !pod_ips(p).is_empty()
}

pub(crate) fn ns_of(p: &Pod) -> &str {
    p.metadata.namespace.as_deref().unwrap_or_default()
}

pub(crate) fn name_of(p: &Pod) -> &str {
    p.metadata.name.as_deref().unwrap_or_default()
}

/// How one policy bears on `pod` in `dir`, if it isolates the pod in that direction.
pub(crate) struct Coverage {
    /// Non-empty for a rejected policy: it isolates and allows nothing.
    pub rejections: Vec<crate::Rejection>,
    /// The rules of that direction, in order (empty for a rejected policy).
    pub rules: Vec<RawRule>,
}

/// Whether `np` isolates `pod` in `dir`, and with which rules.
pub(crate) fn coverage(np: &NetworkPolicy, pod: &Pod, dir: Dir) -> Option<Coverage> {
    if np.metadata.namespace.as_deref() != Some(ns_of(pod)) {
        return None;
    }
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let spec = np.spec.clone().unwrap_or_default();
    let compiled = policy::compile(np);
    let rejected = !compiled.rejections.is_empty();
    // Which pods and directions it covers. For a rejected policy, whatever part
    // could not be understood covers everything (fail closed).
    let selects = if rejected {
        compiled.selector.matches(labels)
    } else {
        spec.pod_selector
            .as_ref()
            .is_none_or(|s| labels_match(s, labels))
    };
    if !selects {
        return None;
    }
    let types: Vec<String> = match spec.policy_types.clone().filter(|t| !t.is_empty()) {
        Some(t) => t,
        None => {
            let mut t = vec!["Ingress".to_string()];
            if spec.egress.is_some() {
                t.push("Egress".into());
            }
            t
        }
    };
    let covers = if rejected {
        compiled.isolates[if dir == Dir::Ingress { 0 } else { 1 }]
    } else {
        types.iter().any(|t| {
            t == if dir == Dir::Ingress {
                "Ingress"
            } else {
                "Egress"
            }
        })
    };
    if !covers {
        return None;
    }
    if rejected {
        return Some(Coverage {
            rejections: compiled.rejections,
            rules: Vec::new(),
        });
    }
    let rules: Vec<RawRule> = match dir {
        Dir::Ingress => spec
            .ingress
            .iter()
            .flatten()
            .map(|r| (r.from.clone(), r.ports.clone()))
            .collect(),
        Dir::Egress => spec
            .egress
            .iter()
            .flatten()
            .map(|r| (r.to.clone(), r.ports.clone()))
            .collect(),
    };
    Some(Coverage {
        rejections: Vec::new(),
        rules,
    })
}

impl Cluster {
    /// The pod owning `ip`; if several claim it (bad input), the first by namespace/name.
    pub fn pod_with_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.pods
            .iter()
            .filter(|p| is_peer_pod(p) && pod_ips(p).contains(&ip))
            .min_by_key(|p| (ns_of(p), name_of(p)))
    }

    pub(crate) fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut l = self
            .namespaces
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(ns))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        l.insert("kubernetes.io/metadata.name".into(), ns.into());
        l
    }

    pub(crate) fn peer_matches(
        &self,
        np: &NetworkPolicy,
        peer: &NetworkPolicyPeer,
        ip: IpAddr,
        pod: Option<&Pod>,
    ) -> bool {
        if let Some(b) = &peer.ip_block {
            let inside = |s: &String| s.parse::<IpNetwork>().is_ok_and(|n| n.contains(ip));
            return inside(&b.cidr) && !b.except.iter().flatten().any(inside);
        }
        let Some(pod) = pod else {
            return false;
        };
        let ns_ok = match &peer.namespace_selector {
            None => Some(ns_of(pod)) == np.metadata.namespace.as_deref(),
            Some(s) => labels_match(s, &self.namespace_labels(ns_of(pod))),
        };
        let empty = BTreeMap::new();
        let pod_ok = peer
            .pod_selector
            .as_ref()
            .is_none_or(|s| labels_match(s, pod.metadata.labels.as_ref().unwrap_or(&empty)));
        ns_ok && pod_ok
    }

    pub(crate) fn port_matches(
        p: &NetworkPolicyPort,
        dst_pod: Option<&Pod>,
        proto: u8,
        port: u16,
    ) -> bool {
        let want = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => 6,
            "UDP" => 17,
            "SCTP" => 132,
            _ => return false,
        };
        if want != proto {
            return false;
        }
        match &p.port {
            None => true,
            Some(IntOrString::Int(n)) => {
                let end = p.end_port.unwrap_or(*n);
                (*n..=end).contains(&i32::from(port))
            }
            Some(IntOrString::String(name)) => dst_pod.is_some_and(|d| {
                d.spec.iter().flat_map(|s| &s.containers).any(|c| {
                    c.ports.iter().flatten().any(|cp| {
                        cp.name.as_deref() == Some(name.as_str())
                            && cp.protocol.as_deref().unwrap_or("TCP")
                                == p.protocol.as_deref().unwrap_or("TCP")
                            && cp.container_port == i32::from(port)
                    })
                })
            }),
        }
    }

    /// Whether the enforcement point of `pod` in `dir` lets traffic with `peer_ip` through.
    fn check(
        &self,
        pod: &Pod,
        dir: Dir,
        peer_ip: IpAddr,
        dst_pod: Option<&Pod>,
        proto: u8,
        port: u16,
    ) -> bool {
        let peer_pod = self.pod_with_ip(peer_ip);
        let mut isolated = false;
        for np in &self.policies {
            let Some(cov) = coverage(np, pod, dir) else {
                continue;
            };
            isolated = true;
            if !cov.rejections.is_empty() {
                continue;
            }
            for (peers, ports) in cov.rules {
                let peer_ok = match peers.filter(|v| !v.is_empty()) {
                    None => true,
                    Some(peers) => peers
                        .iter()
                        .any(|p| self.peer_matches(np, p, peer_ip, peer_pod)),
                };
                let port_ok = match ports.filter(|v| !v.is_empty()) {
                    None => true,
                    Some(ports) => ports
                        .iter()
                        .any(|p| Self::port_matches(p, dst_pod, proto, port)),
                };
                if peer_ok && port_ok {
                    return true;
                }
            }
        }
        !isolated
    }

    /// Whether a new connection from `src` to `dst` (`proto` an IP protocol number, `port`
    /// the destination port, 0 for protocols without ports) is allowed in the whole cluster:
    /// the source pod's egress (if the source is an enforced pod) and the destination pod's
    /// ingress (if the destination is one) must both let it through. A pod is enforced when
    /// it has an IP, its own network namespace, a node and is not terminated.
    pub fn allowed(&self, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> bool {
        let enforced = |p: &&Pod| p.spec.as_ref().is_some_and(|s| s.node_name.is_some());
        let src_pod = self.pod_with_ip(src).filter(enforced);
        let dst_pod = self.pod_with_ip(dst);
        let egress = src_pod.is_none_or(|p| self.check(p, Dir::Egress, dst, dst_pod, proto, port));
        let ingress = dst_pod.filter(enforced).is_none_or(|p| {
            let node = p.spec.as_ref().and_then(|s| s.node_name.as_ref());
            let from_own_node = node
                .and_then(|n| self.nodes.get(n))
                .is_some_and(|ips| ips.contains(&src));
            from_own_node || self.check(p, Dir::Ingress, src, Some(p), proto, port)
        });
        egress && ingress
    }
}

/// [`Cluster::allowed`] as a free function.
pub fn allowed(cluster: &Cluster, src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> bool {
    cluster.allowed(src, dst, proto, port)
}
