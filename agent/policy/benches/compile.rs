//! Full and incremental compile at 10,000 pods / 500 namespaces / 2,000 policies.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_policy::{Change, Compiler};
use serde_json::json;

const NAMESPACES: usize = 500;
const PODS: usize = 10_000;
const POLICIES: usize = 2_000;
const NODES: usize = 100;
const NODE: &str = "node-0";

fn namespace(i: usize) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": format!("ns{i}"), "labels": {"team": format!("t{}", i % 20), "env": (["prod", "dev", "dev"][i % 3])}}})).unwrap()
}

fn pod(i: usize, app_salt: usize) -> Pod {
    let ns = i % NAMESPACES;
    let ip = Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1);
    serde_json::from_value(json!({
        "metadata": {"name": format!("pod{i}"), "namespace": format!("ns{ns}"),
                     "labels": {"app": format!("app{}", (i / NAMESPACES + app_salt) % 5), "tier": (["web", "db"][i % 2])}},
        "spec": {"nodeName": format!("node-{}", i % NODES),
                 "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    }))
    .unwrap()
}

fn policy(i: usize, port: u16) -> NetworkPolicy {
    let ns = i % NAMESPACES;
    let kind = i / NAMESPACES;
    let spec = match kind {
        0 => json!({"podSelector": {"matchLabels": {"tier": "db"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}], "ports": [{"port": port}]}]}),
        1 => json!({"podSelector": {"matchLabels": {"tier": "web"}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", ns % 20)}},
                                            "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["app1", "app2"]}]}}],
                                 "ports": [{"port": "http"}, {"port": 9000, "endPort": 9100}]}]}),
        2 => json!({"podSelector": {}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"env": "prod"}}}]},
                               {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.0.{}.0/24", ns % 40)]}}], "ports": [{"port": 53, "protocol": "UDP"}]}]}),
        _ => json!({"podSelector": {"matchLabels": {"app": "app3"}},
                    "ingress": [{"from": [{"ipBlock": {"cidr": format!("192.168.{}.0/24", ns % 200)}}]}]}),
    };
    serde_json::from_value(json!({"metadata": {"name": format!("np{i}"), "namespace": format!("ns{ns}")}, "spec": spec})).unwrap()
}

fn world() -> Vec<Change> {
    let mut v: Vec<Change> = (0..NAMESPACES)
        .map(|i| Change::UpsertNamespace(Box::new(namespace(i))))
        .collect();
    v.extend((0..PODS).map(|i| Change::UpsertPod(Box::new(pod(i, 0)))));
    v.extend((0..POLICIES).map(|i| Change::UpsertPolicy(Box::new(policy(i, 5432)))));
    v
}

fn node_ips() -> Vec<IpAddr> {
    vec!["172.16.0.1".parse().unwrap()]
}

fn compiled() -> Compiler {
    let mut c = Compiler::new(NODE, node_ips());
    c.apply_batch(world());
    c
}

fn benches(cr: &mut Criterion) {
    let c = compiled();
    let p = c.plan();
    println!(
        "plan: {} identity entries (v4 {} / v6 {}), {} identities, {} endpoints, {} policy entries, {} map entries in all",
        p.identities_v4.len() + p.identities_v6.len(),
        p.identities_v4.len(),
        p.identities_v6.len(),
        c.identity_count(),
        p.endpoints.len(),
        p.endpoints.values().map(|e| e.entries.len()).sum::<usize>(),
        p.map_entries(),
    );

    let mut g = cr.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function("full_10k_pods_500_ns_2k_policies", |b| {
        b.iter_batched(
            world,
            |w| {
                let mut c = Compiler::new(NODE, node_ips());
                black_box(c.apply_batch(w).len())
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();

    let mut g = cr.benchmark_group("incremental");
    let mut c = compiled();
    let mut n = PODS;
    // Alternate add and delete so the state stays the same size.
    g.bench_function("pod_add_remove_local", |b| {
        b.iter(|| {
            n += 1;
            let mut p = pod(n * NODES % (PODS * 10), 0);
            p.metadata.name = Some(format!("extra{n}"));
            p.spec.as_mut().unwrap().node_name = Some(NODE.into());
            let r = palisade_policy::ObjectRef::new(
                p.metadata.namespace.clone().unwrap(),
                format!("extra{n}"),
            );
            let a = c.apply(Change::UpsertPod(Box::new(p))).len();
            let d = c.apply(Change::DeletePod(r)).len();
            black_box(a + d)
        })
    });
    let mut salt = 0;
    g.bench_function("pod_label_change", |b| {
        b.iter(|| {
            salt += 1;
            black_box(c.apply(Change::UpsertPod(Box::new(pod(0, salt)))).len())
        })
    });
    let mut port = 5432u16;
    g.bench_function("policy_change", |b| {
        b.iter(|| {
            port = if port == 5432 { 5433 } else { 5432 };
            black_box(
                c.apply(Change::UpsertPolicy(Box::new(policy(0, port))))
                    .len(),
            )
        })
    });
    g.finish();
}

criterion_group!(compile_benches, benches);
criterion_main!(compile_benches);
