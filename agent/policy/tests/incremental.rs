//! Applying the diffs of a sequence of changes to an empty plan gives what a full compile
//! of the final state gives.
//!
//! Nightly-style run: the `#[ignore]`d `_long` tests, larger clusters and `PROPTEST_CASES`
//! cases each (default 10,000; 100,000 take about 4 minutes in release on 2 cores):
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test --release -p palisade-policy --test incremental -- --ignored
//! ```

mod common;

use common::*;
use palisade_policy::reference::Cluster;
use palisade_policy::{compile, Compiler, Plan};
use proptest::prelude::*;

fn full(c: &Cluster) -> Plan {
    compile(
        &c.namespaces,
        &c.pods,
        &c.policies,
        NODES[0].0,
        &node_ips(0),
    )
}

fn run(a: &Cluster, b: &Cluster, order: &[usize]) -> Result<(), TestCaseError> {
    let mut compiler = Compiler::new(NODES[0].0, node_ips(0));
    let mut mirror = Plan::default();
    mirror.apply_diff(&compiler.full_diff());
    let mut changes = all_changes(a);
    changes.extend(changes_between(a, b));
    // Shuffle within each half without breaking "a then b" so the end state is b.
    let n = all_changes(a).len();
    let (first, second) = changes.split_at_mut(n);
    for (i, &k) in order.iter().enumerate() {
        if !first.is_empty() {
            first.swap(i % first.len(), k % first.len());
        }
        if !second.is_empty() {
            second.swap(i % second.len(), k % second.len());
        }
    }
    for ch in changes {
        let diff = compiler.apply(ch);
        mirror.apply_diff(&diff);
    }
    let full = full(b);
    prop_assert_eq!(compiler.plan().canonical(), full.canonical());
    prop_assert_eq!(mirror.canonical(), full.canonical());
    Ok(())
}

/// From `a`, through the edits that make `b`, in batches; every intermediate state is
/// compared with a full compile of the objects applied so far.
fn run_edits(a: &Cluster, b: &Cluster, cuts: &[bool]) -> Result<(), TestCaseError> {
    let mut compiler = Compiler::new(NODES[0].0, node_ips(0));
    let mut mirror = Plan::default();
    mirror.apply_diff(&compiler.full_diff());
    mirror.apply_diff(&compiler.apply_batch(all_changes(a)));
    let mut now = a.clone();
    for batch in batches(changes_between(a, b), cuts) {
        for ch in &batch {
            apply_to_cluster(&mut now, ch);
        }
        let diff = compiler.apply_batch(batch);
        mirror.apply_diff(&diff);
        let want = full(&now).canonical();
        prop_assert_eq!(&compiler.plan().canonical(), &want);
        prop_assert_eq!(&mirror.canonical(), &want);
    }
    Ok(())
}

/// The node's addresses change under a compiled cluster: to none, to another node's
/// (so former node traffic is judged again, and a peer pod may now be the node), to both.
fn node_ips_changed(c: &Cluster, which: usize) -> Result<(), TestCaseError> {
    let mut compiler = Compiler::new(NODES[0].0, node_ips(0));
    let mut mirror = Plan::default();
    mirror.apply_diff(&compiler.full_diff());
    mirror.apply_diff(&compiler.apply_batch(all_changes(c)));
    let ips = match which {
        0 => vec![],
        1 => node_ips(1),
        2 => [node_ips(0), node_ips(1)].concat(),
        _ => c
            .pods
            .iter()
            .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
            .take(1)
            .collect(),
    };
    mirror.apply_diff(&compiler.set_node_ips(ips.clone()));
    let want = compile(&c.namespaces, &c.pods, &c.policies, NODES[0].0, &ips).canonical();
    prop_assert_eq!(&compiler.plan().canonical(), &want);
    prop_assert_eq!(&mirror.canonical(), &want);
    Ok(())
}

fn edited_pair(pods: usize, policies: usize) -> impl Strategy<Value = (Cluster, Cluster)> {
    (cluster(pods, policies), edits(), edits()).prop_map(|(a, e1, e2)| {
        // Two rounds, so that edited objects are edited again.
        let b = edited(&edited(&a, &e1), &e2);
        (a, b)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn diffs_replayed_equal_full_compile(a in cluster(8, 4), b in cluster(8, 4), order in proptest::collection::vec(any::<usize>(), 0..20)) {
        run(&a, &b, &order)?;
    }

    #[test]
    fn batched_edits_equal_full_compile_at_every_step((a, b) in edited_pair(8, 4), cuts in proptest::collection::vec(any::<bool>(), 0..8)) {
        run_edits(&a, &b, &cuts)?;
    }

    #[test]
    fn node_address_changes_equal_full_compile(c in cluster(8, 4), which in 0..4usize) {
        node_ips_changed(&c, which)?;
    }

    #[test]
    fn batches_of_unrelated_changes_equal_full_compile(a in cluster(8, 4), b in cluster(8, 4), cuts in proptest::collection::vec(any::<bool>(), 0..8)) {
        run_edits(&a, &b, &cuts)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: long_cases(10000), ..ProptestConfig::default() })]

    #[test]
    #[ignore = "long: run with --ignored"]
    fn diffs_replayed_equal_full_compile_long(a in cluster(12, 6), b in cluster(12, 6), order in proptest::collection::vec(any::<usize>(), 0..40)) {
        run(&a, &b, &order)?;
    }

    #[test]
    #[ignore = "long: run with --ignored"]
    fn batched_edits_equal_full_compile_at_every_step_long((a, b) in edited_pair(12, 6), cuts in proptest::collection::vec(any::<bool>(), 0..12)) {
        run_edits(&a, &b, &cuts)?;
    }
}

// Scenarios for each incremental path of the compiler, checked step by step against a full
// compile (the property tests reach them too, but not reliably every run).

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_policy::{Change, ObjectRef};
use serde_json::{json, Value};

fn ns(name: &str, labels: Value) -> Change {
    Change::UpsertNamespace(Box::new(
        serde_json::from_value::<Namespace>(json!({"metadata": {"name": name, "labels": labels}}))
            .unwrap(),
    ))
}

fn pod(ns: &str, name: &str, node: usize, ip: &str, labels: Value, ports: Value) -> Change {
    Change::UpsertPod(Box::new(
        serde_json::from_value::<Pod>(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": NODES[node].0, "containers": [{"name": "c", "ports": ports}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }))
        .unwrap(),
    ))
}

fn np(ns: &str, name: &str, spec: Value) -> Change {
    Change::UpsertPolicy(Box::new(
        serde_json::from_value::<NetworkPolicy>(
            json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
        )
        .unwrap(),
    ))
}

/// Applies the batches in order; after each, the compiler's plan and a copy kept by its
/// diffs must equal a full compile of everything applied so far. Returns the number of map
/// writes of each batch.
fn steps(batches: Vec<Vec<Change>>) -> Vec<usize> {
    let mut compiler = Compiler::new(NODES[0].0, node_ips(0));
    let mut mirror = Plan::default();
    mirror.apply_diff(&compiler.full_diff());
    let mut now = Cluster::default();
    let mut writes = Vec::new();
    for (i, batch) in batches.into_iter().enumerate() {
        for ch in &batch {
            apply_to_cluster(&mut now, ch);
        }
        let diff = compiler.apply_batch(batch);
        writes.push(diff.len());
        mirror.apply_diff(&diff);
        let want = full(&now).canonical();
        assert_eq!(compiler.plan().canonical(), want, "after batch {i}");
        assert_eq!(mirror.canonical(), want, "diffs of batch {i}");
    }
    writes
}

fn base() -> Vec<Change> {
    vec![
        ns("ns0", json!({"env": "a"})),
        ns("ns1", json!({"env": "b"})),
        pod(
            "ns0",
            "local",
            0,
            "198.18.0.1",
            json!({"app": "x"}),
            json!([{"name": "http", "containerPort": 80}]),
        ),
        pod(
            "ns0",
            "peer",
            1,
            "198.18.0.2",
            json!({"app": "y"}),
            json!([{"name": "http", "containerPort": 8080}]),
        ),
        pod(
            "ns1",
            "other",
            1,
            "198.18.0.3",
            json!({"app": "y"}),
            json!([]),
        ),
    ]
}

#[test]
fn local_pod_named_port_change_re_resolves_ingress_rules() {
    let policy = np(
        "ns0",
        "p",
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]}),
    );
    let writes = steps(vec![
        [base(), vec![policy]].concat(),
        vec![pod(
            "ns0",
            "local",
            0,
            "198.18.0.1",
            json!({"app": "x"}),
            json!([{"name": "http", "containerPort": 81}]),
        )],
        vec![pod(
            "ns0",
            "local",
            0,
            "198.18.0.1",
            json!({"app": "x"}),
            json!([]),
        )],
    ]);
    assert!(writes[1] > 0 && writes[2] > 0, "{writes:?}");
}

#[test]
fn policy_edit_changes_only_the_rules_that_differ() {
    let v1 = json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"namespaceSelector": {}}]}, {"ports": [{"port": 53, "protocol": "UDP"}]}],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "y"}}}]}]});
    let mut v2 = v1.clone();
    v2["ingress"][1]["ports"] = json!([{"port": 5353, "protocol": "UDP"}]);
    let mut v3 = v2.clone();
    v3["ingress"] = json!([
        v2["ingress"][1].clone(),
        v2["ingress"][0].clone(),
        v2["ingress"][0].clone()
    ]);
    let writes = steps(vec![
        [base(), vec![np("ns0", "p", v1)]].concat(),
        vec![np("ns0", "p", v2)],
        // Reordered and duplicated rules: the same entries, so no writes.
        vec![np("ns0", "p", v3)],
        vec![Change::DeletePolicy(ObjectRef::new("ns0", "p"))],
    ]);
    assert_eq!(writes[2], 0, "{writes:?}");
}

#[test]
fn local_pod_label_change_moves_it_between_policies() {
    let web = np(
        "ns0",
        "web",
        json!({"podSelector": {"matchLabels": {"app": "x"}},
        "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}]}),
    );
    let db = np(
        "ns0",
        "db",
        json!({"podSelector": {"matchLabels": {"app": "z"}},
        "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 5432}]}]}),
    );
    let all = np(
        "ns0",
        "all",
        json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
    );
    steps(vec![
        [base(), vec![web, db, all]].concat(),
        vec![pod(
            "ns0",
            "local",
            0,
            "198.18.0.1",
            json!({"app": "z"}),
            json!([{"name": "http", "containerPort": 80}]),
        )],
        vec![pod(
            "ns0",
            "local",
            0,
            "198.18.0.1",
            json!({"app": "w"}),
            json!([{"name": "http", "containerPort": 80}]),
        )],
        // Moves to the other node: its endpoint goes.
        vec![pod(
            "ns0",
            "local",
            1,
            "198.18.0.1",
            json!({"app": "x"}),
            json!([]),
        )],
        vec![pod(
            "ns0",
            "local",
            0,
            "198.18.0.1",
            json!({"app": "x"}),
            json!([]),
        )],
    ]);
}

#[test]
fn identity_births_and_deaths_in_one_batch_with_policy_changes() {
    let p = |port: u16| {
        np(
            "ns0",
            "p",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "y"}}}], "ports": [{"port": port}]}],
        "egress": [{"ports": [{"port": "http"}]}]}),
        )
    };
    steps(vec![
        [base(), vec![p(80)]].concat(),
        // `peer` takes a new identity (birth) and leaves its old one empty (death), a new
        // pod joins the old one, the policy changes, and a namespace relabels: all at once.
        vec![
            pod(
                "ns0",
                "peer",
                1,
                "198.18.0.2",
                json!({"app": "y", "v": "2"}),
                json!([{"name": "http", "containerPort": 9090}]),
            ),
            pod(
                "ns0",
                "peer2",
                1,
                "198.18.0.4",
                json!({"app": "y"}),
                json!([]),
            ),
            p(81),
            ns("ns1", json!({"env": "a"})),
        ],
        vec![
            Change::DeletePod(ObjectRef::new("ns0", "peer2")),
            pod(
                "ns0",
                "peer",
                1,
                "198.18.0.2",
                json!({"app": "y"}),
                json!([]),
            ),
        ],
        vec![Change::DeletePod(ObjectRef::new("ns0", "peer"))],
    ]);
}

#[test]
fn peer_sets_shared_by_policies_survive_either_going() {
    let peers = json!([{"namespaceSelector": {"matchLabels": {"env": "b"}}}, {"ipBlock": {"cidr": "198.18.0.0/16", "except": ["198.18.0.2/32"]}}]);
    let a = np(
        "ns0",
        "a",
        json!({"podSelector": {}, "ingress": [{"from": peers.clone()}]}),
    );
    let b = np(
        "ns0",
        "b",
        json!({"podSelector": {"matchLabels": {"app": "x"}}, "ingress": [{"from": peers, "ports": [{"port": 1}]}]}),
    );
    steps(vec![
        [base(), vec![a.clone(), b]].concat(),
        vec![Change::DeletePolicy(ObjectRef::new("ns0", "b"))],
        // A new identity in the shared peer set while only one policy uses it.
        vec![pod(
            "ns1",
            "late",
            1,
            "198.18.0.9",
            json!({"app": "q"}),
            json!([]),
        )],
        vec![Change::DeletePolicy(ObjectRef::new("ns0", "a"))],
        vec![a],
    ]);
}
