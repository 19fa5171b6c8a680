//! Random clusters for property tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_policy::reference::Cluster;
use palisade_policy::{compile, Change, ObjectRef, Plan};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{json, Value};

pub const NODES: [(&str, &str, &str); 2] = [
    ("node-a", "198.18.255.1", "fd00:198:18:ff::1"),
    ("node-b", "198.18.255.2", "fd00:198:18:ff::2"),
];

pub fn node_ips(i: usize) -> Vec<IpAddr> {
    vec![NODES[i].1.parse().unwrap(), NODES[i].2.parse().unwrap()]
}

fn labels(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = Value> {
    proptest::collection::btree_map(select(keys), select(values), 0..=2).prop_map(|m| json!(m))
}

fn selector(
    keys: &'static [&'static str],
    values: &'static [&'static str],
) -> impl Strategy<Value = Value> {
    let expr = (
        select(keys),
        prop_oneof![
            6 => select(&["In", "NotIn", "Exists", "DoesNotExist"][..]),
            1 => Just("Matches"),
        ],
        proptest::collection::vec(select(values), 0..=2),
        proptest::bool::weighted(0.95),
    )
        .prop_map(|(k, op, vals, valid)| {
            let vals: Vec<&str> = match (op, valid) {
                ("Exists" | "DoesNotExist", true) => vec![],
                ("In" | "NotIn", true) if vals.is_empty() => vec!["x"],
                _ => vals,
            };
            if vals.is_empty() {
                json!({"key": k, "operator": op})
            } else {
                json!({"key": k, "operator": op, "values": vals})
            }
        });
    (
        proptest::option::weighted(
            0.6,
            proptest::collection::btree_map(select(keys), select(values), 0..=2),
        ),
        proptest::option::weighted(0.4, proptest::collection::vec(expr, 0..=2)),
    )
        .prop_map(|(ml, me)| {
            let mut s = serde_json::Map::new();
            if let Some(ml) = ml {
                s.insert("matchLabels".into(), json!(ml));
            }
            if let Some(me) = me {
                s.insert("matchExpressions".into(), json!(me));
            }
            Value::Object(s)
        })
}

const POD_KEYS: &[&str] = &["app", "tier"];
const POD_VALUES: &[&str] = &["x", "y", "z"];
const NS_KEYS: &[&str] = &["team", "env", "kubernetes.io/metadata.name"];
const NS_VALUES: &[&str] = &["a", "b", "ns0", "ns1"];
const NS_LABEL_KEYS: &[&str] = &["team", "env"];
const NS_LABEL_VALUES: &[&str] = &["a", "b"];
const PORT_NAMES: &[&str] = &["http", "dns", "metrics"];

pub fn pod_v4(i: usize) -> String {
    format!("198.{}.{}.{}", 18 + (i % 2), (i / 2) % 4, 1 + i)
}

pub fn pod_v6(i: usize) -> String {
    format!("fd00:198:18:{}::{:x}", i % 2, 1 + i)
}

fn pod(i: usize) -> impl Strategy<Value = Value> {
    (
        0..4usize,
        labels(POD_KEYS, POD_VALUES),
        select(&["v4", "v6", "dual", "dual", "dual", "none"][..]),
        prop_oneof![4 => Just(Some(0usize)), 3 => Just(Some(1usize)), 1 => Just(None)],
        proptest::bool::weighted(0.08),
        select(&["Running", "Running", "Running", "Pending", "Succeeded", "Failed"][..]),
        proptest::collection::vec(
            (select(PORT_NAMES), select(&[53, 80, 8080, 9090][..]), select(&["TCP", "UDP", "TCP"][..])),
            0..=2,
        ),
    )
        .prop_map(move |(ns, labels, fam, node, host_net, phase, ports)| {
            let (v4, v6) = if host_net {
                let n = node.unwrap_or(0);
                (NODES[n].1.to_string(), NODES[n].2.to_string())
            } else {
                (pod_v4(i), pod_v6(i))
            };
            let ips: Vec<String> = match (fam, node) {
                (_, None) | ("none", _) => vec![],
                ("v4", _) => vec![v4],
                ("v6", _) => vec![v6],
                _ => vec![v4, v6],
            };
            let mut seen = std::collections::BTreeSet::new();
            let cports: Vec<Value> = ports
                .into_iter()
                .filter(|(n, _, _)| seen.insert(*n))
                .map(|(n, p, proto)| json!({"name": n, "containerPort": p, "protocol": proto}))
                .collect();
            let mut spec = json!({"containers": [{"name": "c", "image": "i", "ports": cports}], "hostNetwork": host_net});
            if let Some(n) = node {
                spec["nodeName"] = json!(NODES[n].0);
            }
            let mut status = json!({"phase": phase});
            if let Some(first) = ips.first() {
                status["podIP"] = json!(first);
                status["podIPs"] = json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
            }
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p{i}"), "namespace": format!("ns{ns}"), "labels": labels},
                "spec": spec, "status": status,
            })
        })
}

const CIDRS: &[&str] = &[
    "198.18.0.0/15",
    "198.18.0.0/24",
    "198.18.0.0/29",
    "198.19.0.0/16",
    "198.18.255.0/24",
    "198.18.1.3/32",
    "fd00:198:18::/48",
    "fd00:198:18::/64",
    "fd00:198:18::/125",
    "fd00:198:18:1::/64",
];

fn except_of(cidr: &str, extra: u8, bits: u128) -> String {
    let net: ipnetwork::IpNetwork = cidr.parse().unwrap();
    let max = if net.is_ipv4() { 32 } else { 128 };
    let len = (net.prefix() + extra).min(max);
    let shift = max - len;
    let width = len - net.prefix();
    match net.ip() {
        IpAddr::V4(a) => {
            let base = u32::from(a);
            let add = if width == 0 {
                0
            } else {
                ((bits as u32) & ((1u32 << width.min(31)) - 1)) << shift
            };
            format!("{}/{}", std::net::Ipv4Addr::from(base | add), len)
        }
        IpAddr::V6(a) => {
            let base = u128::from(a);
            let add = if width == 0 {
                0
            } else {
                (bits & ((1u128 << width.min(127)) - 1)) << shift
            };
            format!("{}/{}", std::net::Ipv6Addr::from(base | add), len)
        }
    }
}

fn peer() -> impl Strategy<Value = Value> {
    let block = (
        select(CIDRS),
        proptest::collection::vec((0u8..12, any::<u128>()), 0..=2),
        0..20u8,
    )
        .prop_map(|(cidr, excepts, bad)| {
            let mut except: Vec<String> = excepts
                .iter()
                .map(|(e, b)| except_of(cidr, *e, *b))
                .collect();
            let cidr = match bad {
                0 => "198.18.0.0/33".to_string(),
                1 => {
                    except.push("203.0.113.0/24".into());
                    cidr.to_string()
                }
                _ => cidr.to_string(),
            };
            if except.is_empty() {
                json!({"ipBlock": {"cidr": cidr}})
            } else {
                json!({"ipBlock": {"cidr": cidr, "except": except}})
            }
        });
    prop_oneof![
        3 => selector(POD_KEYS, POD_VALUES).prop_map(|s| json!({"podSelector": s})),
        2 => selector(NS_KEYS, NS_VALUES).prop_map(|s| json!({"namespaceSelector": s})),
        2 => (selector(POD_KEYS, POD_VALUES), selector(NS_KEYS, NS_VALUES))
            .prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
        3 => block,
    ]
}

fn port() -> impl Strategy<Value = Value> {
    (
        prop_oneof![4 => Just(None), 3 => Just(Some("TCP")), 2 => Just(Some("UDP")), 1 => Just(Some("SCTP")), 1 => Just(Some("ICMP"))],
        prop_oneof![
            2 => Just(None),
            4 => select(&[53, 80, 443, 1000, 8080, 9090][..]).prop_map(|p| Some(json!(p))),
            3 => select(PORT_NAMES).prop_map(|p| Some(json!(p))),
            1 => select(&[0, 70000][..]).prop_map(|p| Some(json!(p))),
        ],
        prop_oneof![6 => Just(None), 2 => (0..70i32).prop_map(Some), 1 => Just(Some(-1))],
    )
        .prop_map(|(proto, port, end)| {
            let mut p = serde_json::Map::new();
            if let Some(proto) = proto {
                // ICMP is invalid in a policy: rare on purpose (weight 1 of 11).
                p.insert("protocol".into(), json!(proto));
            }
            if let Some(port) = &port {
                p.insert("port".into(), port.clone());
            }
            if let Some(e) = end {
                let base = port.as_ref().and_then(|p| p.as_i64()).unwrap_or(100) as i32;
                p.insert("endPort".into(), json!(base + e));
            }
            Value::Object(p)
        })
}

fn rules(peer_key: &'static str) -> impl Strategy<Value = Option<Value>> {
    let rule = (
        prop_oneof![2 => Just(None), 1 => Just(Some(vec![])), 5 => proptest::collection::vec(peer(), 1..=2).prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => Just(Some(vec![])), 4 => proptest::collection::vec(port(), 1..=2).prop_map(Some)],
    )
        .prop_map(move |(peers, ports)| {
            let mut r = serde_json::Map::new();
            if let Some(p) = peers {
                r.insert(peer_key.into(), json!(p));
            }
            if let Some(p) = ports {
                r.insert("ports".into(), json!(p));
            }
            Value::Object(r)
        });
    proptest::option::weighted(
        0.6,
        proptest::collection::vec(rule, 0..=2).prop_map(|v| json!(v)),
    )
}

fn policy(i: usize) -> impl Strategy<Value = Value> {
    (
        0..4usize,
        proptest::option::weighted(0.9, selector(POD_KEYS, POD_VALUES)),
        prop_oneof![
            5 => Just(None),
            2 => Just(Some(vec!["Ingress"])),
            2 => Just(Some(vec!["Egress"])),
            2 => Just(Some(vec!["Ingress", "Egress"])),
            1 => Just(Some(vec![])),
            1 => Just(Some(vec!["Sideways"])),
        ],
        rules("from"),
        rules("to"),
    )
        .prop_map(move |(ns, sel, types, ingress, egress)| {
            let mut spec = serde_json::Map::new();
            spec.insert("podSelector".into(), sel.unwrap_or(json!({})));
            if let Some(t) = types {
                spec.insert("policyTypes".into(), json!(t));
            }
            if let Some(r) = ingress {
                spec.insert("ingress".into(), r);
            }
            if let Some(r) = egress {
                spec.insert("egress".into(), r);
            }
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("np{i}"), "namespace": format!("ns{ns}")},
                "spec": spec,
            })
        })
}

fn namespace(i: usize) -> impl Strategy<Value = Option<Value>> {
    proptest::option::weighted(0.85, labels(NS_LABEL_KEYS, NS_LABEL_VALUES)).prop_map(move |l| {
        l.map(|l| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("ns{i}"), "labels": l}}))
    })
}

/// A random cluster: up to 4 namespaces (some unknown), pods, policies.
pub fn cluster(max_pods: usize, max_policies: usize) -> impl Strategy<Value = Cluster> {
    (
        (namespace(0), namespace(1), namespace(2), namespace(3)),
        proptest::collection::vec(proptest::bool::ANY, 0..=max_pods).prop_flat_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, _)| pod(i))
                .collect::<Vec<_>>()
        }),
        proptest::collection::vec(proptest::bool::ANY, 0..=max_policies).prop_flat_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, _)| policy(i))
                .collect::<Vec<_>>()
        }),
    )
        .prop_map(|((a, b, c, d), pods, policies)| Cluster {
            namespaces: [a, b, c, d]
                .into_iter()
                .flatten()
                .map(|v| serde_json::from_value::<Namespace>(v).unwrap())
                .collect(),
            pods: pods
                .into_iter()
                .map(|v| serde_json::from_value::<Pod>(v).unwrap())
                .collect(),
            policies: policies
                .into_iter()
                .map(|v| serde_json::from_value::<NetworkPolicy>(v).unwrap())
                .collect(),
            nodes: NODES
                .iter()
                .enumerate()
                .map(|(i, n)| (n.0.to_string(), node_ips(i)))
                .collect::<BTreeMap<_, _>>(),
        })
}

/// Addresses worth sending packets between.
pub fn interesting_ips(c: &Cluster) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = [
        "198.18.0.2",
        "198.18.0.200",
        "198.19.3.3",
        "198.18.255.7",
        "203.0.113.9",
        "fd00:198:18::3",
        "fd00:198:18:1::ffff",
        "fd00:198:18:ff::9",
        "2001:db8::1",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    for i in 0..NODES.len() {
        v.extend(node_ips(i));
    }
    for p in &c.pods {
        for ip in p.status.iter().flat_map(|s| s.pod_ips.iter().flatten()) {
            v.push(ip.ip.parse().unwrap());
        }
    }
    v.sort();
    v.dedup();
    v
}

pub fn plans(c: &Cluster) -> Vec<Plan> {
    (0..NODES.len())
        .map(|i| {
            compile(
                &c.namespaces,
                &c.pods,
                &c.policies,
                NODES[i].0,
                &node_ips(i),
            )
        })
        .collect()
}

/// What the dataplanes of all nodes together decide.
pub fn cluster_verdict(plans: &[Plan], src: IpAddr, dst: IpAddr, proto: u8, port: u16) -> bool {
    plans.iter().all(|p| p.verdict(src, dst, proto, port))
}

pub fn all_changes(c: &Cluster) -> Vec<Change> {
    let mut v: Vec<Change> = Vec::new();
    v.extend(
        c.namespaces
            .iter()
            .map(|n| Change::UpsertNamespace(Box::new(n.clone()))),
    );
    v.extend(
        c.pods
            .iter()
            .cloned()
            .map(|p| Change::UpsertPod(Box::new(p))),
    );
    v.extend(
        c.policies
            .iter()
            .cloned()
            .map(|p| Change::UpsertPolicy(Box::new(p))),
    );
    v
}

/// The changes that take cluster `a` to cluster `b`, object by object.
pub fn changes_between(a: &Cluster, b: &Cluster) -> Vec<Change> {
    let mut v = all_changes(b);
    let name = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        ObjectRef::new(
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    };
    for ns in &a.namespaces {
        if !b
            .namespaces
            .iter()
            .any(|x| x.metadata.name == ns.metadata.name)
        {
            v.push(Change::DeleteNamespace(ns.metadata.name.clone().unwrap()));
        }
    }
    for p in &a.pods {
        if !b
            .pods
            .iter()
            .any(|x| name(&x.metadata) == name(&p.metadata))
        {
            v.push(Change::DeletePod(name(&p.metadata)));
        }
    }
    for p in &a.policies {
        if !b
            .policies
            .iter()
            .any(|x| name(&x.metadata) == name(&p.metadata))
        {
            v.push(Change::DeletePolicy(name(&p.metadata)));
        }
    }
    v
}

/// `c` with `change` applied, as the API server would hold it.
pub fn apply_to_cluster(c: &mut Cluster, change: &Change) {
    fn key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
        ObjectRef::new(
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    }
    fn upsert<T: Clone>(v: &mut Vec<T>, x: &T, same: impl Fn(&T) -> bool) {
        match v.iter().position(same) {
            Some(i) => v[i] = x.clone(),
            None => v.push(x.clone()),
        }
    }
    match change {
        Change::UpsertNamespace(n) => {
            upsert(&mut c.namespaces, n, |x| x.metadata.name == n.metadata.name)
        }
        Change::DeleteNamespace(name) => c
            .namespaces
            .retain(|x| x.metadata.name.as_deref() != Some(name.as_str())),
        Change::UpsertPod(p) => upsert(&mut c.pods, p, |x| key(&x.metadata) == key(&p.metadata)),
        Change::DeletePod(r) => c.pods.retain(|x| key(&x.metadata) != *r),
        Change::UpsertPolicy(p) => {
            upsert(&mut c.policies, p, |x| key(&x.metadata) == key(&p.metadata))
        }
        Change::DeletePolicy(r) => c.policies.retain(|x| key(&x.metadata) != *r),
    }
}

/// One small edit of a cluster: `(what, which object, detail)`.
pub type Edit = (u8, usize, usize);

pub fn edits() -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec((0u8..9, any::<usize>(), any::<usize>()), 1..8)
}

fn edit_rules(spec: &mut Value, aux: usize, f: impl FnOnce(&mut Vec<Value>, usize)) {
    let dir = if aux.is_multiple_of(2) {
        "ingress"
    } else {
        "egress"
    };
    if !spec[dir].is_array() {
        spec[dir] = json!([]);
    }
    if let Some(rules) = spec[dir].as_array_mut() {
        f(rules, aux / 2);
    }
}

/// `c` after the edits: policies losing, gaining, reordering or re-porting one rule (so
/// most of a policy stays the same), pods changing labels, node or named ports, namespaces
/// changing labels. The objects keep their names, so every edit is an update.
pub fn edited(c: &Cluster, edits: &[Edit]) -> Cluster {
    let mut c = c.clone();
    for &(what, target, aux) in edits {
        match what {
            0..=3 if !c.policies.is_empty() => {
                let i = target % c.policies.len();
                let mut v = serde_json::to_value(&c.policies[i]).unwrap();
                let spec = &mut v["spec"];
                match what {
                    0 => edit_rules(spec, aux, |r, k| {
                        let n = r.len().max(1);
                        let copy = r.get(k % n).cloned().unwrap_or(json!({}));
                        r.push(copy)
                    }),
                    1 => edit_rules(spec, aux, |r, k| {
                        if !r.is_empty() {
                            let n = r.len();
                            r.remove(k % n);
                        }
                    }),
                    2 => edit_rules(spec, aux, |r, k| {
                        let n = r.len().max(1);
                        if let Some(rule) = r.get_mut(k % n) {
                            rule["ports"] = match k % 3 {
                                0 => json!([{"port": 80}]),
                                1 => json!([{"port": "http"}, {"port": 1000, "endPort": 1030}]),
                                _ => Value::Null,
                            };
                        }
                    }),
                    _ => edit_rules(spec, aux, |r, _| r.reverse()),
                }
                c.policies[i] = serde_json::from_value(v).unwrap();
            }
            4 if !c.policies.is_empty() => {
                let i = target % c.policies.len();
                let mut v = serde_json::to_value(&c.policies[i]).unwrap();
                v["spec"]["podSelector"] = match aux % 3 {
                    0 => json!({}),
                    1 => json!({"matchLabels": {"app": POD_VALUES[aux / 3 % 3]}}),
                    _ => json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
                };
                c.policies[i] = serde_json::from_value(v).unwrap();
            }
            5..=7 if !c.pods.is_empty() => {
                let i = target % c.pods.len();
                let mut v = serde_json::to_value(&c.pods[i]).unwrap();
                match what {
                    5 => {
                        let key = POD_KEYS[aux % 2];
                        if aux / 2 % 4 == 3 {
                            if let Some(m) = v["metadata"]["labels"].as_object_mut() {
                                m.remove(key);
                            }
                        } else {
                            v["metadata"]["labels"][key] = json!(POD_VALUES[aux / 2 % 4]);
                        }
                    }
                    6 => v["spec"]["nodeName"] = json!(NODES[aux % 2].0),
                    _ => {
                        v["spec"]["containers"][0]["ports"] = match aux % 3 {
                            0 => json!([]),
                            1 => json!([{"name": "http", "containerPort": 80 + aux % 7}]),
                            _ => {
                                json!([{"name": "http", "containerPort": 8080, "protocol": "UDP"}, {"name": PORT_NAMES[aux % 3], "containerPort": 9090}])
                            }
                        }
                    }
                }
                c.pods[i] = serde_json::from_value(v).unwrap();
            }
            8 if !c.namespaces.is_empty() => {
                let i = target % c.namespaces.len();
                let mut v = serde_json::to_value(&c.namespaces[i]).unwrap();
                v["metadata"]["labels"][NS_LABEL_KEYS[aux % 2]] =
                    json!(NS_LABEL_VALUES[aux / 2 % 2]);
                c.namespaces[i] = serde_json::from_value(v).unwrap();
            }
            _ => {}
        }
    }
    c
}

/// `changes` cut into batches: a batch ends after change `i` when `cuts[i % len]` says so.
pub fn batches(changes: Vec<Change>, cuts: &[bool]) -> Vec<Vec<Change>> {
    let mut out = vec![Vec::new()];
    for (i, ch) in changes.into_iter().enumerate() {
        out.last_mut().unwrap().push(ch);
        if cuts.is_empty() || cuts[i % cuts.len()] {
            out.push(Vec::new());
        }
    }
    out.retain(|b| !b.is_empty());
    out
}

/// The number of cases for a long (`--ignored`) property test: `PROPTEST_CASES` if set.
pub fn long_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Ports the generated policies and packets favour, so rules and packets meet.
pub const PORTS: &[u16] = &[0, 53, 79, 80, 443, 999, 1000, 1001, 1030, 8080, 9090, 65535];

/// `n` random packets: (source pod index, destination pod index, protocol, port); the
/// indexes are taken modulo the cluster's pods by the test.
pub fn packets(n: usize) -> impl Strategy<Value = Vec<(usize, usize, u8, u16)>> {
    use palisade_common::{PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
    proptest::collection::vec(
        (
            any::<usize>(),
            any::<usize>(),
            select(&[PROTO_TCP, PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_ICMP][..]),
            prop_oneof![4 => select(PORTS), 1 => any::<u16>()],
        ),
        n,
    )
}
