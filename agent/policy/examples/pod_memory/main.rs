//! Heap the compiler keeps per cluster pod, by a counting global allocator:
//! `cargo run --release -p palisade-policy --example pod_memory [-- PODS]`.
//!
//! Pods are spread over 100 namespaces and 1,000 nodes with an `app` label shared by
//! replicas and a `pod-template-hash`, as Deployments make them; 100 are local and a few
//! policies select them, so identities, peer caches and endpoints all exist.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_policy::{Change, Compiler};
use serde_json::json;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn pod(i: usize) -> Pod {
    let ip = format!("198.{}.{}.{}", 18 + (i >> 16), (i >> 8) & 255, i & 255);
    serde_json::from_value(json!({
        "metadata": {"name": format!("app-{}-7d9c5b8f6d-{i:05}", i % 50), "namespace": format!("ns-{}", i % 100),
            "labels": {"app": format!("app-{}", i % 50), "pod-template-hash": format!("7d9c5b{}", i % 50)}},
        "spec": {"nodeName": if i < 100 { "node-local".to_string() } else { format!("node-{}", i % 1000) },
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
        "status": if std::env::var_os("NO_IP").is_some() { json!({}) } else { json!({"podIP": ip, "podIPs": [{"ip": ip}]}) }
    }))
    .unwrap()
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let start = LIVE.load(Ordering::Relaxed);
    let mut c = Compiler::new("node-local", ["198.19.255.1".parse().unwrap()]);
    let mut changes: Vec<Change> = (0..100)
        .map(|i| {
            let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": format!("ns-{i}"),
                "labels": {"kubernetes.io/metadata.name": format!("ns-{i}"), "team": format!("t{}", i % 7)}}}))
            .unwrap();
            Change::UpsertNamespace(Box::new(ns))
        })
        .collect();
    for i in 0..10 {
        let np: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": format!("np-{i}"), "namespace": format!("ns-{i}")},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", i % 7)}},
                "podSelector": {"matchLabels": {"app": format!("app-{i}")}}}], "ports": [{"port": "http"}]}]}
        }))
        .unwrap();
        changes.push(Change::UpsertPolicy(Box::new(np)));
    }
    c.apply_batch(changes);
    let base = LIVE.load(Ordering::Relaxed);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        c.apply_batch(chunk.iter().map(|&i| Change::UpsertPod(Box::new(pod(i)))));
    }
    let after = LIVE.load(Ordering::Relaxed);
    println!(
        "pods {n}: compiler heap {:.1} MiB, {} B/pod (empty compiler {} KiB); {} identities",
        (after - start) as f64 / (1 << 20) as f64,
        (after - base) / n,
        (base - start) / 1024,
        c.identity_count()
    );
}
