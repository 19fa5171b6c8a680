//! Memory of the Kubernetes source at cluster scale (a benchmark: `#[ignore]`d, prints
//! figures, asserts only that every pod arrived). Run with
//!
//! ```text
//! cargo test -p palisade --test kube_memory -- --ignored --nocapture
//! PALISADE_BENCH_PODS=20000 cargo test ...   # smaller cluster
//! ```
//!
//! A mocked API server lists N pods (real payloads: the fixture pod with its name, IP,
//! node and resourceVersion varied; 1000 nodes, so N/1000 are local), 100 namespaces and
//! 10 policies, in pages of 500. Each update is applied to a [`Compiler`] and its version
//! kept, as the agent does. Reported, from a counting allocator: bytes retained per pod
//! after the first sync (source + compiler + versions), the peak during the sync, and the
//! baseline measured in the same run: the same pods kept as decoded API objects, which is
//! what a reflector store of full objects would hold.

// Shared with kube_source.rs; this benchmark uses only part of it.
#[allow(dead_code)]
#[path = "kube_source/apiserver.rs"]
mod apiserver;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use apiserver::{fixture_json, ApiServer, NAMESPACES, NETWORK_POLICIES, PODS};
use k8s_openapi::api::core::v1::Pod;
use palisade::source::kube::PAGE_SIZE;
use palisade::source::{spawn_kube, Update};
use palisade_policy::Compiler;
use serde_json::{json, Value};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn pod(template: &Value, i: usize) -> Value {
    let mut p = template.clone();
    let ip = format!("198.{}.{}.{}", 18 + (i >> 16), (i >> 8) & 255, i & 255);
    p["metadata"]["name"] = json!(format!("pod-{i}"));
    p["metadata"]["namespace"] = json!(format!("ns-{}", i % 100));
    p["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{i:012}"));
    p["metadata"]["resourceVersion"] = json!((10_000 + i).to_string());
    p["metadata"]["labels"] =
        json!({"app": format!("app-{}", i % 50), "pod-template-hash": "7d9c5b8f6d"});
    p["spec"]["nodeName"] = json!(format!("node-{}", i % 1000));
    p["status"]["podIP"] = json!(ip);
    p["status"]["podIPs"] = json!([{ "ip": ip }]);
    p
}

fn page(template: &Value, n: usize, first: usize) -> Value {
    let last = (first + PAGE_SIZE as usize).min(n);
    let mut metadata = json!({"resourceVersion": "200000"});
    if last < n {
        metadata["continue"] = json!(format!("page-{last}"));
        metadata["remainingItemCount"] = json!(n - last);
    }
    json!({
        "kind": "PodList", "apiVersion": "v1", "metadata": metadata,
        "items": (first..last).map(|i| pod(template, i)).collect::<Vec<_>>(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn memory_at_cluster_scale() {
    let n: usize = std::env::var("PALISADE_BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let template = fixture_json("pods-list-page1.json")["items"][0].clone();
    let (client, mut api) = ApiServer::start();
    let base = live();
    let base_rss = rss_kib("VmRSS:");
    PEAK.store(base, Ordering::Relaxed);
    let mut rx = spawn_kube(client);

    let namespaces = json!({"kind": "NamespaceList", "apiVersion": "v1",
        "metadata": {"resourceVersion": "200000"},
        "items": (0..100).map(|i| json!({"metadata": {
            "name": format!("ns-{i}"), "resourceVersion": (100 + i).to_string(),
            "labels": {"kubernetes.io/metadata.name": format!("ns-{i}"), "team": format!("t{}", i % 7)}}}))
            .collect::<Vec<_>>()});
    api.expect_list(NAMESPACES, None)
        .await
        .reply(200, &namespaces);
    let np = fixture_json("networkpolicies-list.json")["items"][0].clone();
    let policies = json!({"kind": "NetworkPolicyList", "apiVersion": "networking.k8s.io/v1",
        "metadata": {"resourceVersion": "200000"},
        "items": (0..10).map(|i| {
            let mut p = np.clone();
            p["metadata"]["name"] = json!(format!("np-{i}"));
            p["metadata"]["namespace"] = json!(format!("ns-{i}"));
            p["spec"]["podSelector"] = json!({"matchLabels": {"app": format!("app-{i}")}});
            p
        }).collect::<Vec<_>>()});
    api.expect_list(NETWORK_POLICIES, None)
        .await
        .reply(200, &policies);

    // The agent side: compile every update and keep versions, like `run_until`.
    let consumer = tokio::spawn(async move {
        let mut compiler = Compiler::new("node-0", []);
        let mut versions: BTreeMap<std::sync::Arc<str>, std::sync::Arc<str>> = BTreeMap::new();
        let mut compile_time = std::time::Duration::ZERO;
        loop {
            match rx.recv().await.expect("source ended") {
                Update::Changes(changes) => {
                    let mut batch = Vec::with_capacity(changes.len());
                    for c in changes {
                        match c.version {
                            Some(v) => versions.insert(c.key, v),
                            None => versions.remove(&c.key),
                        };
                        batch.push(c.change);
                    }
                    let t = std::time::Instant::now();
                    compiler.apply_batch(batch);
                    compile_time += t.elapsed();
                }
                Update::Synced => return (compiler, versions, rx, compile_time),
                Update::Errors(e) => assert!(e.is_empty(), "{e:?}"),
            }
        }
    });

    let started = std::time::Instant::now();
    let mut first = 0;
    while first < n {
        let token = (first > 0).then(|| format!("page-{first}"));
        let body = page(&template, n, first);
        api.expect_list(PODS, token.as_deref())
            .await
            .reply(200, &body);
        drop(body);
        first += PAGE_SIZE as usize;
    }
    let (compiler, versions, rx, compile_time) = consumer.await.unwrap();
    let sync_time = started.elapsed();
    let _watches = (
        api.expect_watch(NAMESPACES, "200000").await,
        api.expect_watch(NETWORK_POLICIES, "200000").await,
        api.expect_watch(PODS, "200000").await,
    );
    assert_eq!(versions.len(), n + 110);
    let local = compiler.plan().endpoints.len();
    assert_eq!(local, n.div_ceil(1000));
    let retained = live().saturating_sub(base);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let rss_after = rss_kib("VmRSS:");

    // Baseline, same run: the same pods decoded as full API objects and kept.
    let before_full = live();
    let mut store: Vec<Pod> = Vec::with_capacity(n);
    let mut first = 0;
    while first < n {
        let body = page(&template, n, first);
        let items: Vec<Pod> = serde_json::from_value(body["items"].clone()).unwrap();
        store.extend(items);
        first += PAGE_SIZE as usize;
    }
    let full = live().saturating_sub(before_full);
    assert_eq!(store.len(), n);

    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    println!(
        "pods: {n} ({local} local), first sync {sync_time:.1?} of which compiling {compile_time:.1?}"
    );
    println!(
        "retained after first sync (source + compiler + versions): {:.1} MiB = {} B/pod",
        mib(retained),
        retained / n
    );
    println!("peak above baseline during the sync: {:.1} MiB", mib(peak));
    println!(
        "baseline, full decoded Pods kept (reflector-store style): {:.1} MiB = {} B/pod",
        mib(full),
        full / n
    );
    println!(
        "retained / full-object store = {:.3}",
        retained as f64 / full as f64
    );
    println!(
        "VmRSS: {} KiB at start, {} KiB after sync, VmHWM {} KiB",
        base_rss,
        rss_after,
        rss_kib("VmHWM:")
    );
    drop(store);
    let l0 = live();
    drop(versions);
    let l1 = live();
    drop(compiler);
    let l2 = live();
    println!(
        "of which: agent versions map {} B/pod, compiler {} B/pod, rest (source key->version maps, client) {} B/pod",
        (l0 - l1) / n,
        (l1 - l2) / n,
        retained.saturating_sub(l0 - l2) / n
    );
    drop(rx);
}
