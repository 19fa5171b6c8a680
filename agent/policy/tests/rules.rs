//! One test per NetworkPolicy rule, on manifests as they would be written. Each checks the
//! compiled plan (looked up as the dataplane does) and the reference evaluator.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_common::{
    EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};
use palisade_policy::reference::Cluster;
use palisade_policy::{compile, ObjectRef, Plan};

const NODE: &str = "node-a";
const NODE_IP: &str = "10.0.0.1";

const BASE: &str = r#"
kind: Namespace
metadata: {name: prod, labels: {env: prod}}
---
kind: Namespace
metadata: {name: dev, labels: {env: dev}}
---
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec:
  nodeName: node-a
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.1.0.1, podIPs: [{ip: 10.1.0.1}, {ip: "fd00::1"}]}
---
kind: Pod
metadata: {name: db, namespace: prod, labels: {app: db}}
spec:
  nodeName: node-a
  containers: [{name: c, ports: [{name: sql, containerPort: 5432}, {name: dns, containerPort: 53, protocol: UDP}]}]
status: {podIP: 10.1.0.2}
---
kind: Pod
metadata: {name: client, namespace: dev, labels: {app: web}}
spec:
  nodeName: node-b
  containers: [{name: c}]
status: {podIP: 10.2.0.1, podIPs: [{ip: 10.2.0.1}, {ip: "fd00::2"}]}
---
kind: Pod
metadata: {name: tool, namespace: prod, labels: {app: tool}}
spec:
  nodeName: node-b
  containers: [{name: c, ports: [{name: http, containerPort: 9000}]}]
status: {podIP: 10.1.0.3}
"#;

const WEB: &str = "10.1.0.1";
const WEB6: &str = "fd00::1";
const DB: &str = "10.1.0.2";
const CLIENT: &str = "10.2.0.1";
const CLIENT6: &str = "fd00::2";
const TOOL: &str = "10.1.0.3";
const OUTSIDE: &str = "192.0.2.7";

struct Fixture {
    cluster: Cluster,
    plan: Plan,
}

fn fixture(policies: &str) -> Fixture {
    let mut c = Cluster::default();
    for doc in BASE.split("\n---\n").chain(policies.split("\n---\n")) {
        if doc.trim().is_empty() {
            continue;
        }
        let v: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
        match v["kind"].as_str() {
            Some("Namespace") => c
                .namespaces
                .push(serde_yaml::from_value::<Namespace>(v).unwrap()),
            Some("Pod") => c.pods.push(serde_yaml::from_value::<Pod>(v).unwrap()),
            Some("NetworkPolicy") => c
                .policies
                .push(serde_yaml::from_value::<NetworkPolicy>(v).unwrap()),
            k => panic!("unexpected kind {k:?}"),
        }
    }
    c.nodes.insert(NODE.into(), vec![NODE_IP.parse().unwrap()]);
    let node_ips: Vec<IpAddr> = vec![NODE_IP.parse().unwrap()];
    let plan = compile(&c.namespaces, &c.pods, &c.policies, NODE, &node_ips);
    Fixture { cluster: c, plan }
}

impl Fixture {
    /// Verdict of node-a's plan, asserted equal to the reference's view of node-a's checks.
    /// (Pods of node-b are never isolated in these fixtures unless a test says so.)
    fn allows(&self, src: &str, dst: &str, proto: u8, port: u16) -> bool {
        let (s, d): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let got = self.plan.verdict(s, d, proto, port);
        let want = self.cluster.allowed(s, d, proto, port);
        assert_eq!(
            got, want,
            "plan and reference disagree on {src} -> {dst} {proto}/{port}"
        );
        got
    }

    fn tcp(&self, src: &str, dst: &str, port: u16) -> bool {
        self.allows(src, dst, PROTO_TCP, port)
    }
}

#[test]
fn pods_without_policies_are_not_isolated() {
    let f = fixture("");
    assert!(f.tcp(CLIENT, WEB, 1));
    assert!(f
        .plan
        .endpoints
        .values()
        .all(|e| e.flags == 0 && e.entries.is_empty()));
    assert_eq!(f.plan.endpoints.len(), 2, "only node-a pods get plans");
}

#[test]
fn empty_ingress_denies_everything_but_the_node() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: deny, namespace: prod}
spec: {podSelector: {}}
"#,
    );
    assert!(!f.tcp(CLIENT, WEB, 80));
    assert!(!f.tcp(DB, WEB, 80));
    assert!(!f.allows(OUTSIDE, WEB, PROTO_ICMP, 0));
    assert!(f.tcp(NODE_IP, WEB, 80), "kubelet probes pass");
    assert!(f.tcp(WEB, CLIENT, 80), "egress is not isolated");
}

#[test]
fn policy_types_default_egress_only_when_egress_rules_present() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  egress: []
"#,
    );
    assert!(
        !f.tcp(WEB, CLIENT, 80),
        "egress: [] makes it an egress policy"
    );
    assert!(!f.tcp(CLIENT, WEB, 80), "and ingress is always defaulted");
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  ingress: [{}]
"#,
    );
    assert!(
        f.tcp(CLIENT, WEB, 80),
        "ingress rules are ignored when not in policyTypes"
    );
    assert!(!f.tcp(WEB, CLIENT, 80));
}

#[test]
fn pod_and_namespace_selector_in_one_peer_are_anded() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {env: dev}}
      podSelector: {matchLabels: {app: web}}
"#,
    );
    assert!(f.tcp(CLIENT, DB, 5432));
    assert!(!f.tcp(WEB, DB, 5432), "right labels, wrong namespace");
}

#[test]
fn separate_peers_are_ored() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {env: dev}}
    - podSelector: {matchLabels: {app: web}}
"#,
    );
    assert!(f.tcp(CLIENT, DB, 5432));
    assert!(f.tcp(WEB, DB, 5432));
    assert!(!f.tcp(TOOL, DB, 5432));
}

#[test]
fn pod_selector_alone_means_the_policy_namespace() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]
"#,
    );
    assert!(f.tcp(WEB, DB, 1));
    assert!(!f.tcp(CLIENT, DB, 1), "app=web in dev does not count");
}

#[test]
fn namespace_name_label_is_implicit() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: dev}}}]}]
"#,
    );
    assert!(f.tcp(CLIENT, DB, 1));
    assert!(!f.tcp(WEB, DB, 1));
}

#[test]
fn match_expressions_not_in_matches_missing_keys() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - podSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [x]}, {key: app, operator: In, values: [tool, web]}]}
"#,
    );
    assert!(f.tcp(WEB, DB, 1));
    assert!(f.tcp(TOOL, DB, 1));
}

#[test]
fn except_narrows_only_its_own_peer() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.2.0.0/16]}
  - from:
    - ipBlock: {cidr: 10.2.0.0/24}
    ports: [{port: 53, protocol: UDP}]
"#,
    );
    assert!(f.tcp(WEB, DB, 5432));
    assert!(!f.tcp(CLIENT, DB, 5432), "excepted");
    assert!(
        f.allows(CLIENT, DB, PROTO_UDP, 53),
        "the other peer still allows it"
    );
    assert!(!f.tcp(OUTSIDE, DB, 5432));
}

#[test]
fn absent_from_allows_every_source_including_the_world() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{ports: [{port: 8080}]}]
"#,
    );
    assert!(f.tcp(OUTSIDE, WEB, 8080));
    assert!(f.tcp(CLIENT, WEB, 8080));
    assert!(f.tcp(CLIENT6, WEB6, 8080));
    assert!(!f.tcp(OUTSIDE, WEB, 8081));
}

#[test]
fn protocol_defaults_to_tcp() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 53}]}]
"#,
    );
    assert!(f.tcp(CLIENT, DB, 53));
    assert!(!f.allows(CLIENT, DB, PROTO_UDP, 53));
}

#[test]
fn protocol_without_port_allows_all_its_ports() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  ingress: [{ports: [{protocol: UDP}]}]
"#,
    );
    assert!(f.allows(CLIENT, DB, PROTO_UDP, 1));
    assert!(f.allows(CLIENT, DB, PROTO_UDP, 65535));
    assert!(!f.tcp(CLIENT, DB, 1));
    assert!(!f.allows(CLIENT, DB, PROTO_ICMP, 0));
}

#[test]
fn absent_ports_allow_every_protocol() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {}}]}]
"#,
    );
    assert!(f.allows(CLIENT, DB, PROTO_ICMP, 0));
    assert!(f.tcp(CLIENT, DB, 22));
    assert!(
        !f.tcp(OUTSIDE, DB, 22),
        "namespaceSelector {{}} is all pods, not all addresses"
    );
}

#[test]
fn end_port_is_inclusive() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 1000, endPort: 2000}]}]
"#,
    );
    assert!(!f.tcp(CLIENT, DB, 999));
    assert!(f.tcp(CLIENT, DB, 1000));
    assert!(f.tcp(CLIENT, DB, 2000));
    assert!(!f.tcp(CLIENT, DB, 2001));
    let n = f
        .plan
        .endpoints
        .values()
        .map(|e| e.entries.len())
        .max()
        .unwrap();
    assert!(
        n < 100,
        "a range is a few LPM blocks per identity, got {n} entries"
    );
}

#[test]
fn ingress_named_port_resolves_on_the_local_pod() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: in, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{ports: [{port: http}]}]
"#,
    );
    assert!(f.tcp(CLIENT, WEB, 8080), "web's own http port");
    assert!(
        !f.tcp(CLIENT, WEB, 9000),
        "not the http port of another pod"
    );
}

#[test]
fn egress_named_port_resolves_on_the_peer() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: out, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress: [{ports: [{port: http}]}]
"#,
    );
    assert!(f.tcp(WEB, TOOL, 9000), "tool's http port, not web's");
    assert!(!f.tcp(WEB, TOOL, 8080));
    assert!(!f.tcp(WEB, DB, 8080), "db declares no http port");
    assert!(!f.tcp(WEB, OUTSIDE, 8080), "no pod to resolve on");
}

#[test]
fn named_port_resolving_on_no_pod_allows_nothing_but_isolates() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Egress]
  ingress: [{ports: [{port: nosuch}]}]
  egress: [{ports: [{port: nosuch}]}]
"#,
    );
    for port in [0, 53, 5432, 8080, 9000] {
        assert!(!f.tcp(CLIENT, DB, port), "ingress {port}");
        assert!(!f.tcp(DB, TOOL, port), "egress {port}");
    }
    let db = &f.plan.endpoints[&ObjectRef::new("prod", "db")];
    assert_eq!(db.flags, EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS);
    assert!(db.entries.is_empty(), "{:?}", db.entries);
}

#[test]
fn named_port_needs_matching_protocol() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{ports: [{port: dns}, {port: dns, protocol: UDP}]}]
"#,
    );
    assert!(f.allows(CLIENT, DB, PROTO_UDP, 53));
    assert!(!f.tcp(CLIENT, DB, 53), "dns is a UDP port on db");
}

#[test]
fn egress_and_ingress_must_both_allow() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: out, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]
---
kind: NetworkPolicy
metadata: {name: in, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: tool}}}]}]
"#,
    );
    assert!(!f.tcp(WEB, DB, 5432), "web may send, db does not accept");
    assert!(f.tcp(TOOL, DB, 5432));
}

#[test]
fn policies_are_additive() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: a, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]
---
kind: NetworkPolicy
metadata: {name: b, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: tool}}}]}]
"#,
    );
    assert!(f.tcp(WEB, DB, 1));
    assert!(f.tcp(TOOL, DB, 1));
    assert!(!f.tcp(CLIENT, DB, 1));
}

#[test]
fn policy_only_selects_pods_in_its_namespace() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: deny, namespace: dev}
spec: {podSelector: {}}
"#,
    );
    assert!(f.tcp(CLIENT, WEB, 80));
    assert!(f.plan.endpoints.values().all(|e| e.flags == 0));
}

#[test]
fn rejected_policy_keeps_pods_isolated() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: bad, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}]}]
---
kind: NetworkPolicy
metadata: {name: good, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{}]
"#,
    );
    assert!(
        !f.tcp(CLIENT, WEB, 80),
        "the rejected policy allows nothing"
    );
    assert!(
        f.tcp(WEB, CLIENT, 80),
        "and isolates only what its policyTypes say"
    );
    assert!(f.tcp(CLIENT, DB, 80), "other policies keep working");
    let r = &f.plan.rejections;
    assert_eq!(r.len(), 1);
    let rej = &r.values().next().unwrap()[0];
    assert_eq!(rej.object, "NetworkPolicy/prod/bad");
    assert_eq!(rej.field, "spec.ingress[0].from[0].ipBlock.except[0]");
}

#[test]
fn invalid_pod_selector_isolates_the_whole_namespace_both_ways() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: bad, namespace: prod}
spec:
  podSelector: {matchExpressions: [{key: app, operator: Equals, values: [web]}]}
  policyTypes: [Ingress]
"#,
    );
    assert!(!f.tcp(CLIENT, DB, 80));
    assert!(!f.tcp(DB, CLIENT, 80));
    assert_eq!(
        f.plan.rejections.values().next().unwrap()[0].field,
        "spec.podSelector.matchExpressions[0].operator"
    );
}

#[test]
fn invalid_fields_are_rejected_naming_the_policy_and_field() {
    let cases = [
        ("{ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}", "spec.ingress[0].from[0].ipBlock.cidr"),
        ("{ingress: [{ports: [{protocol: ICMP}]}]}", "spec.ingress[0].ports[0].protocol"),
        ("{ingress: [{ports: [{port: 80, endPort: 79}]}]}", "spec.ingress[0].ports[0].endPort"),
        ("{ingress: [{ports: [{port: http, endPort: 90}]}]}", "spec.ingress[0].ports[0].endPort"),
        ("{ingress: [{ports: [{port: 0}]}]}", "spec.ingress[0].ports[0].port"),
        ("{ingress: [{ports: [{port: 80, endPort: 65536}]}]}", "spec.ingress[0].ports[0].endPort"),
        ("{egress: [{to: [{podSelector: {matchExpressions: [{key: a, operator: In}]}}]}]}", "spec.egress[0].to[0].podSelector.matchExpressions[0].values"),
        ("{egress: [{to: [{namespaceSelector: {matchExpressions: [{key: a, operator: Exists, values: [b]}]}}]}]}", "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values"),
        ("{policyTypes: [Inbound]}", "spec.policyTypes[0]"),
        ("{ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/4]}}]}]}", "spec.ingress[0].from[0].ipBlock.except[0]"),
        ("{ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.0.2.0/24]}}]}]}", "spec.ingress[0].from[0].ipBlock.except[0]"),
        ("{ingress: [{ports: [{protocol: SCTPX, port: 80}]}]}", "spec.ingress[0].ports[0].protocol"),
    ];
    // Valid policies next to the invalid one (web may reach db): they must keep working.
    const GOOD: &str = r#"
kind: NetworkPolicy
metadata: {name: good-in, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]
---
kind: NetworkPolicy
metadata: {name: good-out, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]
"#;
    for (rest, field) in cases {
        let mut spec: serde_yaml::Value = serde_yaml::from_str(rest).unwrap();
        spec["podSelector"] = serde_yaml::from_str("{}").unwrap();
        let doc = serde_yaml::to_string(
            &serde_yaml::from_str::<serde_yaml::Value>(&format!(
                "kind: NetworkPolicy\nmetadata: {{name: bad, namespace: prod}}\nspec: {}",
                serde_json::to_string(&serde_yaml::from_value::<serde_json::Value>(spec).unwrap())
                    .unwrap()
            ))
            .unwrap(),
        )
        .unwrap();
        let f = fixture(&format!("{doc}\n---\n{GOOD}"));
        let r = f
            .plan
            .rejections
            .values()
            .flatten()
            .map(|r| (r.object.as_str(), r.field.as_str()))
            .collect::<Vec<_>>();
        assert_eq!(r, vec![("NetworkPolicy/prod/bad", field)], "for {rest}");
        assert!(
            !f.tcp(CLIENT, WEB, 80) && !f.tcp(CLIENT, DB, 80),
            "{rest}: the pods it selects stay isolated"
        );
        assert!(f.tcp(WEB, DB, 80), "{rest}: the valid policy keeps working");
    }
}

#[test]
fn terminated_pods_are_neither_enforced_nor_peers() {
    let f = fixture(
        r#"
kind: Pod
metadata: {name: done, namespace: prod, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: c}]}
status: {phase: Succeeded, podIP: 10.1.0.9}
---
kind: Pod
metadata: {name: crashed, namespace: prod, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: c}]}
status: {phase: Failed, podIP: 10.1.0.10}
---
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]
"#,
    );
    assert!(!f.tcp("10.1.0.9", DB, 80), "a Succeeded pod is no peer");
    assert!(!f.tcp("10.1.0.10", DB, 80), "a Failed pod is no peer");
    assert!(f.tcp(WEB, DB, 80), "a running pod with the same labels is");
    assert_eq!(f.plan.endpoints.len(), 2, "terminated pods get no plan");
}

#[test]
fn host_network_pods_are_the_node_not_pods() {
    let f = fixture(
        r#"
kind: Pod
metadata: {name: agent, namespace: prod, labels: {app: web}}
spec: {nodeName: node-a, hostNetwork: true, containers: [{name: c}]}
status: {podIP: 10.0.0.1}
---
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{podSelector: {matchLabels: {app: tool}}}]}]
"#,
    );
    assert_eq!(f.plan.endpoints.len(), 2, "no plan for a host-network pod");
    assert!(
        f.tcp(NODE_IP, DB, 80),
        "its traffic is the node's: let in although app=web is not allowed"
    );
    assert!(
        !f.tcp(DB, NODE_IP, 80),
        "and it is no app=web peer for egress"
    );
    assert!(!f.tcp(DB, WEB, 80));
}

#[test]
fn pods_without_an_ip_get_no_plan_yet() {
    let f = fixture(
        r#"
kind: Pod
metadata: {name: starting, namespace: prod, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: c}]}
status: {phase: Pending}
---
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec: {podSelector: {matchLabels: {app: web}}}
"#,
    );
    assert!(!f
        .plan
        .endpoints
        .contains_key(&ObjectRef::new("prod", "starting")));
    assert!(!f.tcp(CLIENT, WEB, 80), "the pods with an IP are enforced");
}

#[test]
fn pods_on_other_nodes_are_peers_but_not_enforced_here() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  ingress: [{from: [{podSelector: {matchLabels: {app: tool}}}]}]
"#,
    );
    assert!(f.tcp(TOOL, DB, 80), "tool (node-b) is a peer");
    assert!(!f.tcp(CLIENT, DB, 80));
    assert!(
        !f.plan
            .endpoints
            .contains_key(&ObjectRef::new("prod", "tool")),
        "node-b enforces tool"
    );
}

#[test]
fn traffic_from_the_pods_own_node_is_always_allowed() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"#,
    );
    assert!(f.tcp(NODE_IP, WEB, 80));
    assert!(f.allows(NODE_IP, DB, PROTO_UDP, 53));
    assert!(
        !f.tcp(WEB, NODE_IP, 80),
        "only traffic from the node, not to it"
    );
    assert!(!f.tcp("10.0.0.2", WEB, 80), "another node's address is not");
}

#[test]
fn ipv6_is_enforced_like_ipv4() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{ipBlock: {cidr: "fd00::/120", except: ["fd00::2/128"]}}]}]
"#,
    );
    assert!(!f.tcp(CLIENT6, WEB6, 80), "excepted");
    assert!(f.tcp("fd00::7", WEB6, 80), "inside the v6 block");
    assert!(!f.tcp(CLIENT, WEB, 80), "a v6 block admits no v4 address");
    assert!(f.plan.identities_v6.len() >= 3);
}

#[test]
fn pod_peers_match_both_address_families() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}}]}]
"#,
    );
    assert!(f.tcp(CLIENT, WEB, 80));
    assert!(f.tcp(CLIENT6, WEB6, 80));
    assert!(!f.tcp("fd00::9", WEB6, 80), "an address that is no pod");
    let web = &f.plan.endpoints[&ObjectRef::new("prod", "web")];
    assert_eq!(web.ips.len(), 2, "both podIPs are the endpoint's");
}

#[test]
fn ipv4_blocks_do_not_match_ipv6_addresses() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{ipBlock: {cidr: 0.0.0.0/0}}]}]
"#,
    );
    assert!(f.tcp(OUTSIDE, WEB, 80));
    assert!(f.tcp(CLIENT, WEB, 80), "pods are addresses too");
    assert!(!f.tcp(CLIENT6, WEB6, 80));
}

#[test]
fn namespace_selector_alone_matches_every_pod_of_those_namespaces() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}}]}]
"#,
    );
    assert!(f.tcp(CLIENT, DB, 1));
    assert!(!f.tcp(WEB, DB, 1), "its own namespace is not env=dev");
}

#[test]
fn empty_pod_selector_peer_means_every_pod_of_the_namespace() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {}}]}]
"#,
    );
    assert!(f.tcp(WEB, DB, 1));
    assert!(f.tcp(TOOL, DB, 1));
    assert!(!f.tcp(CLIENT, DB, 1), "another namespace");
    assert!(!f.tcp(OUTSIDE, DB, 1), "not an address that is no pod");
}

#[test]
fn empty_from_and_empty_ports_mean_everything() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [], ports: []}]
"#,
    );
    assert!(f.tcp(OUTSIDE, DB, 1));
    assert!(f.allows(CLIENT, DB, PROTO_UDP, 9));
    assert!(f.allows(CLIENT, DB, PROTO_ICMP, 0));
}

#[test]
fn absent_to_allows_every_destination() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  egress: [{ports: [{port: 53, protocol: UDP}]}]
"#,
    );
    assert!(f.allows(WEB, OUTSIDE, PROTO_UDP, 53));
    assert!(f.allows(WEB, CLIENT, PROTO_UDP, 53));
    assert!(!f.tcp(WEB, OUTSIDE, 53));
    assert!(!f.tcp(CLIENT, WEB, 80), "ingress is isolated too (always)");
}

#[test]
fn exists_and_does_not_exist_test_the_key_only() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - podSelector: {matchExpressions: [{key: app, operator: Exists}, {key: tier, operator: DoesNotExist}]}
"#,
    );
    assert!(f.tcp(WEB, DB, 1), "has app, lacks tier");
    assert!(f.tcp(TOOL, DB, 1));
}

#[test]
fn match_labels_and_match_expressions_are_anded() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: web}, matchExpressions: [{key: app, operator: In, values: [tool]}]}
"#,
    );
    assert!(!f.tcp(WEB, DB, 1), "app=web but not In [tool]");
    assert!(!f.tcp(TOOL, DB, 1), "In [tool] but not app=web");
}

#[test]
fn sctp_is_matched_by_protocol() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{ports: [{port: 3868, protocol: SCTP}, {port: 2905, endPort: 2906, protocol: SCTP}]}]
"#,
    );
    assert!(f.allows(CLIENT, DB, PROTO_SCTP, 3868));
    assert!(f.allows(CLIENT, DB, PROTO_SCTP, 2906));
    assert!(!f.allows(CLIENT, DB, PROTO_SCTP, 3869));
    assert!(!f.tcp(CLIENT, DB, 3868), "SCTP only");
    assert!(!f.allows(CLIENT, DB, PROTO_UDP, 3868));
}

#[test]
fn except_narrows_only_its_own_peer_within_one_rule() {
    let f = fixture(
        r#"
kind: NetworkPolicy
metadata: {name: p, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.2.0.0/16]}
    - ipBlock: {cidr: 10.2.0.0/31}
"#,
    );
    assert!(
        f.tcp(CLIENT, DB, 1),
        "10.2.0.1 is excepted by one peer, inside the other"
    );
    assert!(!f.tcp("10.2.0.9", DB, 1), "inside no peer");
    assert!(f.tcp(WEB, DB, 1));
}

#[test]
fn policy_entries_map_to_lpm_keys() {
    use palisade_common::{PolicyKey, DIR_INGRESS};
    use palisade_policy::PolicyEntry;
    let e = |proto, port, bits| PolicyEntry {
        identity: 7,
        dir: DIR_INGRESS,
        proto,
        port,
        port_prefix_bits: bits,
    };
    assert_eq!(
        e(None, 0, 0).lpm_key(3),
        (72, PolicyKey::new(3, 7, DIR_INGRESS, 0, 0))
    );
    assert_eq!(
        e(Some(6), 0, 0).lpm_key(3),
        (80, PolicyKey::new(3, 7, DIR_INGRESS, 6, 0))
    );
    assert_eq!(
        e(Some(6), 443, 16).lpm_key(3),
        (96, PolicyKey::new(3, 7, DIR_INGRESS, 6, 443))
    );
    assert_eq!(
        e(Some(17), 1024, 6).lpm_key(3),
        (86, PolicyKey::new(3, 7, DIR_INGRESS, 17, 1024))
    );
}
