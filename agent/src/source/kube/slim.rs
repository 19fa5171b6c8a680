//! The parts of an API object the compiler reads, and nothing else.
//!
//! A Pod as the API server sends it is mostly fields no NetworkPolicy can observe
//! (managedFields, annotations, volumes, env, probes, container statuses, conditions):
//! several KiB each. The compiler reads labels, `spec.nodeName`, `spec.hostNetwork`,
//! `spec.containers[].ports` (named ports), `status.phase` and `status.podIP(s)`, so that is
//! all that is kept: the full object lives only while its page or watch event is decoded.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, ContainerPort, Namespace, Pod, PodSpec, PodStatus};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Name, namespace, labels and resourceVersion.
pub fn meta(m: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        labels: m.labels.filter(|l: &BTreeMap<_, _>| !l.is_empty()),
        resource_version: m.resource_version,
        ..Default::default()
    }
}

pub fn pod(pod: Pod) -> Pod {
    let Pod {
        metadata,
        spec,
        status,
    } = pod;
    Pod {
        metadata: meta(metadata),
        spec: spec.map(|s| PodSpec {
            node_name: s.node_name,
            host_network: s.host_network,
            containers: named_ports(s.containers),
            ..Default::default()
        }),
        status: status.map(|s| PodStatus {
            phase: s.phase,
            pod_ip: s.pod_ip,
            pod_ips: s.pod_ips,
            ..Default::default()
        }),
    }
}

/// The compiler resolves named ports across all containers and ignores unnamed ones, so
/// every named port goes into one nameless container, and a pod without named ports keeps
/// none: a `Container` is 2 KiB even when empty, and the first sync of a large cluster
/// holds every pod at once.
fn named_ports(containers: Vec<Container>) -> Vec<Container> {
    let ports: Vec<ContainerPort> = containers
        .into_iter()
        .flat_map(|c| c.ports.unwrap_or_default())
        .filter(|p| p.name.is_some())
        .map(|p| ContainerPort {
            name: p.name,
            container_port: p.container_port,
            protocol: p.protocol,
            ..Default::default()
        })
        .collect();
    if ports.is_empty() {
        return Vec::new();
    }
    vec![Container {
        ports: Some(ports),
        ..Default::default()
    }]
}

pub fn namespace(ns: Namespace) -> Namespace {
    Namespace {
        metadata: meta(ns.metadata),
        spec: None,
        status: None,
    }
}

/// The spec is what a policy is; only its metadata is trimmed (a `kubectl apply`'d policy
/// carries a copy of itself in the last-applied annotation).
pub fn policy(np: NetworkPolicy) -> NetworkPolicy {
    NetworkPolicy {
        metadata: meta(np.metadata),
        spec: np.spec,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "a", "namespace": "x", "uid": "0b7c", "resourceVersion": "7",
                "labels": {"pod": "a"},
                "annotations": {"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z"},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "a-1", "uid": "1"}]
            },
            "spec": {
                "nodeName": "n1",
                "hostNetwork": false,
                "serviceAccountName": "default",
                "initContainers": [{"name": "init", "image": "busybox"}],
                "containers": [
                    {"name": "web", "image": "nginx", "env": [{"name": "A", "value": "b"}],
                     "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP", "hostPort": 8080}]},
                    {"name": "sidecar", "image": "envoy", "ports": [
                        {"containerPort": 15000, "protocol": "TCP"},
                        {"name": "admin", "containerPort": 15001}
                    ]},
                    {"name": "log", "image": "fluentd"}
                ],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {
                "phase": "Running", "podIP": "198.18.0.2", "podIPs": [{"ip": "198.18.0.2"}],
                "hostIP": "198.18.1.1",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "web", "image": "nginx", "imageID": "", "ready": true, "restartCount": 0}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn pod_keeps_exactly_what_the_compiler_reads() {
        let slim = serde_json::to_value(pod(full_pod())).unwrap();
        assert_eq!(
            slim,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "a", "namespace": "x", "resourceVersion": "7", "labels": {"pod": "a"}},
                "spec": {
                    "nodeName": "n1",
                    "hostNetwork": false,
                    "containers": [{"name": "", "ports": [
                        {"name": "http", "containerPort": 80, "protocol": "TCP"},
                        {"name": "admin", "containerPort": 15001}
                    ]}]
                },
                "status": {"phase": "Running", "podIP": "198.18.0.2", "podIPs": [{"ip": "198.18.0.2"}]}
            })
        );
    }

    #[test]
    fn pod_compiles_the_same_slim_or_full() {
        use palisade_policy::{Change, Compiler};
        let plan = |p: Pod| {
            let mut c = Compiler::new("n1", []);
            c.apply(Change::UpsertPod(Box::new(p)));
            c.plan().canonical()
        };
        assert_eq!(plan(full_pod()), plan(pod(full_pod())));
    }

    #[test]
    fn namespace_and_policy_lose_only_metadata() {
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "resourceVersion": "3", "labels": {"ns": "x"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        }))
        .unwrap();
        assert_eq!(
            serde_json::to_value(namespace(ns)).unwrap(),
            serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "x", "resourceVersion": "3", "labels": {"ns": "x"}}})
        );
        let spec = serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"]});
        let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "deny", "namespace": "x", "resourceVersion": "9", "generation": 1,
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": spec
        }))
        .unwrap();
        assert_eq!(
            serde_json::to_value(policy(np)).unwrap(),
            serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "deny", "namespace": "x", "resourceVersion": "9"}, "spec": spec})
        );
    }
}
