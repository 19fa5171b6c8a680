//! A synthetic cluster at the scale of issue #3, shared by `examples/scale` (figures for
//! `cargo xtask bench`) and `benches/compile.rs` (criterion).
//!
//! Shape, chosen to look like a real multi-tenant cluster rather than to flatter the
//! compiler:
//!
//! * `namespaces` namespaces labelled `team: t<i % 20>` and `env: prod|dev|dev`;
//! * pods spread round-robin over namespaces; pod `i` is the `i / namespaces`-th of its
//!   namespace and gets `app: app<j % 5>`, `tier: web|db` by `(j / 5) % 2`, so each namespace
//!   has 10 label sets (identities) whatever the pod count; every pod declares the named
//!   ports `http` (8080) and `metrics` (9090);
//! * [`LOCAL_PODS`] pods on this node (`node-0`), one each in 100 different namespaces (like
//!   a real node, not a slice of one tenant); the others on 99 other nodes. The local pods are
//!   the same ones whatever the cluster size, so sizes can be compared;
//! * policies four per namespace ([`policy`]): db-from-web, web-from-team (namespace AND pod
//!   selector, named port and a port range), an egress policy selecting every pod with a
//!   peer that matches every pod of the `prod` namespaces (about a third of all identities)
//!   plus an external ipBlock, and ingress from a load-balancer ipBlock plus monitoring from
//!   the namespaces of one team on a named port.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_policy::{Change, Compiler, ObjectRef};
use serde_json::{json, Value};

pub const NODE: &str = "node-0";
pub const NODES: usize = 100;
pub const LOCAL_PODS: usize = 100;
/// Pod `k * LOCAL_STRIDE` (k < LOCAL_PODS) is local. 101 is prime to the namespace count, so
/// the local pods land in 100 different namespaces.
pub const LOCAL_STRIDE: usize = 101;

#[derive(Clone, Copy, Debug)]
pub struct Scale {
    pub namespaces: usize,
    pub pods: usize,
    pub policies: usize,
    /// The egress policies also allow `10.0.0.0/8` minus one `/24` inside the pod range
    /// (40 different ones): every such except splits the pods' identities, so nearly every
    /// pod gets an identity of its own. The stress case of the identity model.
    pub fragment: bool,
}

impl Scale {
    /// The scale of issue #3: 10,000 pods in 500 namespaces, 2,000 policies.
    pub const ISSUE: Scale = Scale {
        namespaces: 500,
        pods: 10_000,
        policies: 2_000,
        fragment: false,
    };
}

pub fn node_ips() -> Vec<IpAddr> {
    vec!["172.16.0.1".parse().unwrap()]
}

pub fn namespace(i: usize) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": format!("ns{i}"), "labels": {
        "team": format!("t{}", i % 20),
        "env": (["prod", "dev", "dev"][i % 3]),
    }}}))
    .unwrap()
}

pub fn is_local(i: usize) -> bool {
    i.is_multiple_of(LOCAL_STRIDE) && i < LOCAL_STRIDE * LOCAL_PODS
}

/// The index of the `k`-th local pod.
pub fn local_pod(k: usize) -> usize {
    (k % LOCAL_PODS) * LOCAL_STRIDE
}

pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1)
}

pub fn pod_labels(s: Scale, i: usize) -> Value {
    let j = i / s.namespaces;
    json!({"app": format!("app{}", j % 5), "tier": (["web", "db"][(j / 5) % 2])})
}

/// A pod object; `name`, `node`, `ip` and `labels` may differ from pod `i`'s own.
pub fn pod_object(ns: usize, name: &str, node: usize, ip: Ipv4Addr, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": format!("ns{ns}"), "labels": labels},
        "spec": {"nodeName": format!("node-{node}"),
                 "containers": [{"name": "c", "ports": [
                     {"name": "http", "containerPort": 8080},
                     {"name": "metrics", "containerPort": 9090}]}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    }))
    .unwrap()
}

pub fn pod_node(i: usize) -> usize {
    if is_local(i) {
        0
    } else {
        1 + i % (NODES - 1)
    }
}

pub fn pod(s: Scale, i: usize) -> Pod {
    pod_object(
        i % s.namespaces,
        &format!("pod{i}"),
        pod_node(i),
        pod_ip(i),
        pod_labels(s, i),
    )
}

pub fn pod_ref(s: Scale, i: usize) -> ObjectRef {
    ObjectRef::new(format!("ns{}", i % s.namespaces), format!("pod{i}"))
}

/// Policy `i`: kind `i % 4` in namespace `(i / 4) % namespaces`, so fewer policies cover
/// fewer namespaces with the same mix. `variant` changes the kind-2 egress rule's ports (0 =
/// all ports) so a policy change can be made that touches many entries.
pub fn policy(s: Scale, i: usize, variant: u16) -> NetworkPolicy {
    let ns = (i / 4) % s.namespaces;
    let spec = match i % 4 {
        0 => json!({"podSelector": {"matchLabels": {"tier": "db"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}],
                                 "ports": [{"port": 5432}]}]}),
        1 => json!({"podSelector": {"matchLabels": {"tier": "web"}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", ns % 20)}},
                                            "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["app1", "app2"]}]}}],
                                 "ports": [{"port": "http"}, {"port": 9000, "endPort": 9100}]}]}),
        2 => {
            let ports = if variant == 0 {
                Value::Null
            } else {
                json!([{"port": variant}])
            };
            let mut prod = json!({"to": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}]});
            if !ports.is_null() {
                prod["ports"] = ports;
            }
            let mut egress = vec![prod];
            if s.fragment {
                egress.push(json!({"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.0.{}.0/24", ns % 40)]}}],
                                   "ports": [{"port": 53, "protocol": "UDP"}]}));
            }
            egress.extend([
                              json!({"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}],
                               "ports": [{"port": 443}]}),
                              json!({"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns0"}}}],
                               "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53}]})]);
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": egress})
        }
        _ => json!({"podSelector": {"matchLabels": {"app": "app3"}},
                    "ingress": [{"from": [{"ipBlock": {"cidr": format!("192.168.{}.0/24", ns % 200)}}]},
                                {"from": [{"namespaceSelector": {"matchLabels": {"team": "t0"}}}],
                                 "ports": [{"port": "metrics"}]}]}),
    };
    serde_json::from_value(json!({"metadata": {"name": format!("np{i}"), "namespace": format!("ns{ns}")}, "spec": spec})).unwrap()
}

pub fn world(s: Scale) -> Vec<Change> {
    let mut v: Vec<Change> = (0..s.namespaces)
        .map(|i| Change::UpsertNamespace(Box::new(namespace(i))))
        .collect();
    v.extend((0..s.pods).map(|i| Change::UpsertPod(Box::new(pod(s, i)))));
    v.extend((0..s.policies).map(|i| Change::UpsertPolicy(Box::new(policy(s, i, 0)))));
    v
}

pub fn compiled(s: Scale) -> Compiler {
    let mut c = Compiler::new(NODE, node_ips());
    c.apply_batch(world(s));
    c
}

/// The kind-2 (egress, selects every pod) policy of the namespace of local pod `k`.
pub fn egress_policy_of_local(s: Scale, k: usize) -> usize {
    let ns = local_pod(k) % s.namespaces;
    ns * 4 + 2
}

/// The namespaces labelled `env: prod`.
pub fn is_prod(ns: usize) -> bool {
    ns.is_multiple_of(3)
}

/// One of the incremental changes measured, as a pair (do, undo) so that repeating it keeps
/// the cluster the same size. `n` varies the object touched.
pub struct Step {
    pub name: &'static str,
    pub forward: Change,
    pub back: Change,
}

/// The incremental scenarios: each forward change is measured, then undone (the undo is
/// measured too when it is a different kind of change).
pub fn step(s: Scale, kind: &str, n: usize) -> Step {
    let extra_ip = Ipv4Addr::from(0x0a80_0000u32 + n as u32);
    match kind {
        // A new pod on this node, in the namespace of local pod k, with the labels of an
        // existing identity: one identity entry, one new endpoint with all its entries.
        "pod_add_local" => {
            let i = local_pod(n);
            let ns = i % s.namespaces;
            let name = format!("extra-local{n}");
            Step {
                name: "pod_add_local",
                forward: Change::UpsertPod(Box::new(pod_object(
                    ns,
                    &name,
                    0,
                    extra_ip,
                    pod_labels(s, i),
                ))),
                back: Change::DeletePod(ObjectRef::new(format!("ns{ns}"), name)),
            }
        }
        // A new pod elsewhere whose labels match an existing identity: one identity entry.
        "pod_add_remote" => {
            let i = (n * 7919) % s.pods;
            let ns = i % s.namespaces;
            let name = format!("extra-remote{n}");
            Step {
                name: "pod_add_remote",
                forward: Change::UpsertPod(Box::new(pod_object(
                    ns,
                    &name,
                    1 + n % (NODES - 1),
                    extra_ip,
                    pod_labels(s, i),
                ))),
                back: Change::DeletePod(ObjectRef::new(format!("ns{ns}"), name)),
            }
        }
        // A remote pod of a prod namespace, app1 (so the web-from-team rules of some
        // namespaces and every egress rule reference it), gets a label no other pod has: a
        // new identity is born that every local endpoint's egress rule must allow, and the
        // undo makes it die again.
        "label_change_remote" => {
            let prod: Vec<usize> = (0..s.namespaces).filter(|ns| is_prod(*ns)).collect();
            let ns = prod[n % prod.len()];
            // j = 1: app1, web (j = 2, app2, if that one happens to be local).
            let i = if is_local(ns + s.namespaces) {
                ns + 2 * s.namespaces
            } else {
                ns + s.namespaces
            };
            let mut labels = pod_labels(s, i);
            labels["canary"] = json!("true");
            Step {
                name: "label_change_remote",
                forward: Change::UpsertPod(Box::new(pod_object(
                    ns,
                    &format!("pod{i}"),
                    pod_node(i),
                    pod_ip(i),
                    labels,
                ))),
                back: Change::UpsertPod(Box::new(pod(s, i))),
            }
        }
        // A local pod flips tier web <-> db: other policies select it and its peers' entries
        // change wholesale.
        "label_change_local" => {
            let i = local_pod(n);
            let mut labels = pod_labels(s, i);
            let flipped = if labels["tier"] == "web" { "db" } else { "web" };
            labels["tier"] = json!(flipped);
            Step {
                name: "label_change_local",
                forward: Change::UpsertPod(Box::new(pod_object(
                    i % s.namespaces,
                    &format!("pod{i}"),
                    0,
                    pod_ip(i),
                    labels,
                ))),
                back: Change::UpsertPod(Box::new(pod(s, i))),
            }
        }
        // The egress policy selecting local pod k gets ports on its prod rule: every entry
        // of that rule (one per identity of the prod namespaces) is replaced.
        "policy_change" => {
            let p = egress_policy_of_local(s, n);
            Step {
                name: "policy_change",
                forward: Change::UpsertPolicy(Box::new(policy(s, p, 443))),
                back: Change::UpsertPolicy(Box::new(policy(s, p, 0))),
            }
        }
        other => panic!("unknown step {other}"),
    }
}

pub const STEPS: [&str; 5] = [
    "pod_add_local",
    "pod_add_remote",
    "label_change_remote",
    "label_change_local",
    "policy_change",
];
