//! The local pods of a node as the dataplane must know them *before* the compiler can plan
//! them: a pod scheduled here gets its interface (and its IP) from the CNI before the
//! source reports that IP, and the compiler plans only pods with an IP. To fail closed in
//! that window the agent needs to know which local pods exist and how the policies of
//! their namespace would isolate them — from labels alone, which is all a podSelector
//! looks at. Pure: fed the same [`Change`]s as the compiler.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use palisade_common::{DIR_EGRESS, DIR_INGRESS, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS};

use crate::compile::Change;
use crate::model::{ObjectRef, PodRef, PodState, PolicyRef};
use crate::policy;
use crate::selector::{Labels, Selector};

/// A live pod scheduled on this node (not hostNetwork, not terminated), IP or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub labels: BTreeMap<String, String>,
    /// Empty until the source reports the pod's IPs.
    pub ips: Vec<IpAddr>,
}

/// Local pods and the pod selectors of every policy.
#[derive(Default)]
pub struct LocalPods {
    node: String,
    pods: BTreeMap<PodRef, LocalPod>,
    /// Per policy: which pods of its namespace it selects and which directions it
    /// isolates. A rejected policy keeps the isolation the compiler gives it (its
    /// selector, or every pod when the selector itself is invalid).
    selectors: BTreeMap<PolicyRef, (Selector, [bool; 2])>,
}

impl LocalPods {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            ..Default::default()
        }
    }

    /// Follows one change (the agent passes every change it gives the compiler).
    /// Returns true when a local pod or a policy changed.
    pub fn observe(&mut self, change: &Change) -> bool {
        match change {
            Change::UpsertPod(pod) => {
                let r = ObjectRef::of(&pod.metadata);
                let st = PodState::from_pod(pod);
                let live = !st.host_network && !st.terminated;
                if live && st.node.as_deref() == Some(self.node.as_str()) {
                    let new = LocalPod {
                        labels: Arc::unwrap_or_clone(st.labels),
                        ips: st.ips,
                    };
                    self.pods.insert(r, new.clone()) != Some(new)
                } else {
                    self.pods.remove(&r).is_some()
                }
            }
            Change::DeletePod(r) => self.pods.remove(r).is_some(),
            Change::UpsertPolicy(np) => {
                let c = policy::compile(np);
                let r = ObjectRef::of(&np.metadata);
                let new = (c.selector, c.isolates);
                self.selectors.insert(r, new.clone()) != Some(new)
            }
            Change::DeletePolicy(r) => self.selectors.remove(r).is_some(),
            Change::UpsertNamespace(_) | Change::DeleteNamespace(_) => false,
        }
    }

    pub fn get(&self, pod: &PodRef) -> Option<&LocalPod> {
        self.pods.get(pod)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PodRef, &LocalPod)> {
        self.pods.iter()
    }

    /// The `EP_ISOLATED_*` bits the policies of `namespace` give a pod with `labels`:
    /// exactly the isolation the compiler will plan for it.
    pub fn isolation(&self, namespace: &str, labels: &Labels) -> u32 {
        let range = ObjectRef::namespace_range(namespace);
        let mut flags = 0;
        for (sel, iso) in self.selectors.range(range).map(|(_, v)| v) {
            if sel.matches(labels) {
                if iso[DIR_INGRESS as usize] {
                    flags |= EP_ISOLATED_INGRESS;
                }
                if iso[DIR_EGRESS as usize] {
                    flags |= EP_ISOLATED_EGRESS;
                }
            }
        }
        flags
    }

    /// The policies that select a known local pod, with the directions each isolates
    /// (`[ingress, egress]`): what `palisade monitor` shows beside a drop.
    pub fn isolating_policies(&self, pod: &PodRef) -> Vec<(PolicyRef, [bool; 2])> {
        let Some(p) = self.pods.get(pod) else {
            return Vec::new();
        };
        self.selectors
            .range(ObjectRef::namespace_range(&pod.namespace))
            .filter(|(_, (sel, _))| sel.matches(&p.labels))
            .map(|(r, (_, iso))| (r.clone(), *iso))
            .collect()
    }

    /// [`LocalPods::isolation`] of a known local pod (0 for any other).
    pub fn isolation_of(&self, pod: &PodRef) -> u32 {
        self.pods
            .get(pod)
            .map_or(0, |p| self.isolation(&pod.namespace, &p.labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::networking::v1::NetworkPolicy;

    fn pod(ns: &str, name: &str, node: &str, labels: &[(&str, &str)], ip: Option<&str>) -> Change {
        let mut v = serde_json::json!({
            "metadata": {"name": name, "namespace": ns,
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>()},
            "spec": {"nodeName": node, "containers": []},
        });
        if let Some(ip) = ip {
            v["status"] = serde_json::json!({"podIP": ip});
        }
        Change::UpsertPod(Box::new(serde_json::from_value::<Pod>(v).unwrap()))
    }

    fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Change {
        let v = serde_json::json!({"metadata": {"name": name, "namespace": ns}, "spec": spec});
        Change::UpsertPolicy(Box::new(
            serde_json::from_value::<NetworkPolicy>(v).unwrap(),
        ))
    }

    #[test]
    fn tracks_local_pods_without_ips() {
        let mut l = LocalPods::new("n1");
        assert!(l.observe(&pod("x", "a", "n1", &[("pod", "a")], None)));
        assert!(!l.observe(&pod("x", "a", "n1", &[("pod", "a")], None)));
        assert!(!l.observe(&pod("x", "b", "n2", &[], None)), "other node");
        let a = ObjectRef::new("x", "a");
        assert!(l.get(&a).unwrap().ips.is_empty());
        assert!(l.observe(&pod("x", "a", "n1", &[("pod", "a")], Some("198.18.0.2"))));
        assert_eq!(
            l.get(&a).unwrap().ips,
            vec!["198.18.0.2".parse::<IpAddr>().unwrap()]
        );
        // Moved away (rescheduled under the same name) or deleted: no longer local.
        assert!(l.observe(&pod("x", "a", "n2", &[], None)));
        assert!(l.get(&a).is_none());
    }

    #[test]
    fn isolation_follows_selectors_and_policy_types() {
        let mut l = LocalPods::new("n1");
        l.observe(&pod("x", "a", "n1", &[("pod", "a")], None));
        l.observe(&pod("y", "a", "n1", &[("pod", "a")], None));
        let xa = ObjectRef::new("x", "a");
        let ya = ObjectRef::new("y", "a");
        assert_eq!(l.isolation_of(&xa), 0);
        l.observe(&policy(
            "x",
            "deny-b",
            serde_json::json!({"podSelector": {"matchLabels": {"pod": "b"}}}),
        ));
        assert_eq!(l.isolation_of(&xa), 0, "selects another pod");
        l.observe(&policy(
            "x",
            "eg",
            serde_json::json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a"]}]},
                "policyTypes": ["Egress"]}),
        ));
        assert_eq!(l.isolation_of(&xa), EP_ISOLATED_EGRESS);
        assert_eq!(
            l.isolation_of(&ya),
            0,
            "policies act in their own namespace"
        );
        l.observe(&policy("x", "all", serde_json::json!({"podSelector": {}})));
        assert_eq!(
            l.isolation_of(&xa),
            EP_ISOLATED_EGRESS | EP_ISOLATED_INGRESS
        );
        l.observe(&Change::DeletePolicy(ObjectRef::new("x", "all")));
        assert_eq!(l.isolation_of(&xa), EP_ISOLATED_EGRESS);
        // An invalid selector isolates every pod of the namespace, as the compiler does.
        l.observe(&policy(
            "y",
            "bad",
            serde_json::json!({"podSelector": {"matchExpressions": [{"key": "k", "operator": "Bogus"}]}}),
        ));
        assert_eq!(
            l.isolation_of(&ya),
            EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS
        );
    }
}
