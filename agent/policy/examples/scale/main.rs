//! Figures for issue #3 at 10,000 pods / 500 namespaces / 2,000 policies with 100 local pods:
//! full compile time and peak heap, incremental change times (p50/p99), map entry totals,
//! and how the entries grow with cluster pods and with policies.
//!
//! ```text
//! cargo run --release -p palisade-policy --example scale            # human-readable
//! cargo run --release -p palisade-policy --example scale -- --json  # for cargo xtask bench
//! cargo run --release -p palisade-policy --example scale -- --reps 500
//! ```
//!
//! The heap is measured by a counting global allocator (live bytes, high-water mark). Times
//! are given twice: wall clock, and the CPU time of the measuring thread — on a shared
//! machine the wall clock's tail is mostly other processes' time slices.

mod world;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use palisade_policy::{Compiler, Plan};
use serde_json::{json, Value};
use world::Scale;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Heap taken by the input objects of the last full compile.
static INPUT: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                grew(new - l.size());
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MIB: f64 = 1024.0 * 1024.0;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// CPU time consumed by this thread so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wall and CPU time of `f`, in ms.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (w, c) = (Instant::now(), thread_cpu());
    let out = f();
    let cpu = ms(thread_cpu() - c);
    (out, ms(w.elapsed()), cpu)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(wall: Vec<f64>, cpu: Vec<f64>) -> Value {
    let stats = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        json!({"p50_ms": percentile(&v, 0.5), "p99_ms": percentile(&v, 0.99), "max_ms": v[v.len() - 1]})
    };
    json!({"n": wall.len(), "wall": stats(wall), "cpu": stats(cpu)})
}

fn policy_entries(p: &Plan) -> usize {
    p.endpoints.values().map(|e| e.entries.len()).sum()
}

fn identity_entries(p: &Plan) -> usize {
    p.identities_v4.len() + p.identities_v6.len()
}

fn sizes(c: &Compiler) -> Value {
    let p = c.plan();
    json!({
        "identities": c.identity_count(),
        "identity_entries": identity_entries(p),
        "endpoints": p.endpoints.len(),
        "policy_entries": policy_entries(p),
        "map_entries": p.map_entries(),
    })
}

/// One full compile, from the objects to the plan and the diff that programs it: wall and
/// CPU ms, peak heap during it (live bytes above what was live before, the input objects
/// included: the compiler consumes them one by one), heap still held after, and the
/// compiler. The input objects' size is left in `INPUT`.
fn full_compile(s: Scale) -> (f64, f64, usize, usize, Compiler) {
    let base = LIVE.load(Ordering::Relaxed);
    let changes = world::world(s);
    INPUT.store(LIVE.load(Ordering::Relaxed) - base, Ordering::Relaxed);
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let (c, wall, cpu) = timed(|| {
        let mut c = Compiler::new(world::NODE, world::node_ips());
        let diff = c.apply_batch(changes);
        drop(diff);
        c
    });
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let held = LIVE.load(Ordering::Relaxed) - base;
    (wall, cpu, peak, held, c)
}

/// Full compile (three runs) and every incremental scenario at scale `s`.
fn measure(s: Scale, reps: usize) -> Value {
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    let (mut peak, mut held) = (0, 0);
    let mut c = None;
    for _ in 0..3 {
        drop(c.take());
        let (wall, cpu, pk, h, compiler) = full_compile(s);
        walls.push(wall);
        cpus.push(cpu);
        peak = peak.max(pk);
        held = h;
        c = Some(compiler);
    }
    let mut c = c.expect("compiled");
    let full_sizes = sizes(&c);

    // Each forward change then its undo, `reps` times per kind.
    let mut incremental = serde_json::Map::new();
    for kind in world::STEPS {
        let (mut fw, mut fc, mut bw, mut bc) = (vec![], vec![], vec![], vec![]);
        let (mut fwd_writes, mut back_writes) = (0usize, 0usize);
        for n in 0..reps {
            let st = world::step(s, kind, n);
            let (d, w, cpu) = timed(|| c.apply(st.forward));
            fwd_writes += d.len();
            fw.push(w);
            fc.push(cpu);
            let (d, w, cpu) = timed(|| c.apply(st.back));
            back_writes += d.len();
            bw.push(w);
            bc.push(cpu);
        }
        let avg = |w: usize, n: usize| json!(w as f64 / n as f64);
        let mut add = |name: String, w: Vec<f64>, cpu: Vec<f64>, writes: Value| {
            let mut sm = summary(w, cpu);
            sm["avg_map_writes"] = writes;
            incremental.insert(name, sm);
        };
        if kind.starts_with("pod_add") {
            add(kind.into(), fw, fc, avg(fwd_writes, reps));
            add(
                kind.replace("add", "delete"),
                bw,
                bc,
                avg(back_writes, reps),
            );
        } else {
            fw.extend(bw);
            fc.extend(bc);
            add(kind.into(), fw, fc, avg(fwd_writes + back_writes, 2 * reps));
        }
    }
    assert_eq!(
        full_sizes,
        sizes(&c),
        "every change was undone, so the plan must be back to its size"
    );
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        json!({"min": v[0], "median": v[v.len() / 2], "runs": v})
    };
    json!({
        "scale": {"namespaces": s.namespaces, "pods": s.pods, "policies": s.policies,
                  "nodes": world::NODES, "local_pods": world::LOCAL_PODS,
                  "ipblock_excepts_split_pod_range": s.fragment},
        "full_compile_wall_ms": med(walls),
        "full_compile_cpu_ms": med(cpus),
        "peak_heap_bytes": peak,
        "peak_heap_mib": peak as f64 / MIB,
        "heap_held_after_mib": held as f64 / MIB,
        "input_objects_mib": INPUT.load(Ordering::Relaxed) as f64 / MIB,
        "plan": full_sizes,
        "incremental": incremental,
    })
}

/// Entry totals when the cluster pods double (same policies, same local pods) and when the
/// policies halve (same pods).
fn growth(s: Scale) -> Vec<Value> {
    let mut out = Vec::new();
    for (pods, policies) in [
        (s.pods, s.policies),
        (2 * s.pods, s.policies),
        (s.pods, s.policies / 2),
    ] {
        let g = Scale {
            pods,
            policies,
            ..s
        };
        let (wall, cpu, pk, _, c) = full_compile(g);
        let mut v = sizes(&c);
        v["pods"] = json!(pods);
        v["policies"] = json!(policies);
        v["full_compile_wall_ms"] = json!(wall);
        v["full_compile_cpu_ms"] = json!(cpu);
        v["peak_heap_mib"] = json!(pk as f64 / MIB);
        out.push(v);
    }
    out
}

fn print_human(name: &str, m: &Value) {
    let sc = &m["scale"];
    let f = |v: &Value| v.as_f64().unwrap_or_default();
    println!(
        "== {name}: {} pods, {} namespaces, {} policies, {} local pods",
        sc["pods"], sc["namespaces"], sc["policies"], sc["local_pods"]
    );
    println!(
        "full compile: cpu median {:.0} ms (wall median {:.0} ms); peak heap {:.1} MiB \
         (input objects {:.1} MiB of it), {:.1} MiB held after",
        f(&m["full_compile_cpu_ms"]["median"]),
        f(&m["full_compile_wall_ms"]["median"]),
        f(&m["peak_heap_mib"]),
        f(&m["input_objects_mib"]),
        f(&m["heap_held_after_mib"]),
    );
    println!("plan: {}", m["plan"]);
    for (k, v) in m["incremental"].as_object().into_iter().flatten() {
        println!(
            "{k:>20}: cpu p50 {:.3} p99 {:.3} ms | wall p50 {:.3} p99 {:.3} ms | n={} {:.0} writes avg",
            f(&v["cpu"]["p50_ms"]),
            f(&v["cpu"]["p99_ms"]),
            f(&v["wall"]["p50_ms"]),
            f(&v["wall"]["p99_ms"]),
            v["n"],
            f(&v["avg_map_writes"]),
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json_out = args.iter().any(|a| a == "--json");
    let reps: usize = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("--reps takes a number"))
        .unwrap_or(200);
    let typical = Scale::ISSUE;
    let fragmented = Scale {
        fragment: true,
        ..typical
    };
    // `--only typical|fragmented|growth` runs one part (for profiling).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let mut out = json!({});
    if run("typical") {
        out["typical"] = measure(typical, reps);
    }
    if run("fragmented") {
        out["fragmented"] = measure(fragmented, reps);
    }
    // `--only compile-fragmented`: full compiles alone (for profiling).
    if only.as_deref() == Some("compile-fragmented") {
        for _ in 0..5 {
            let (_, cpu, _, _, _) = full_compile(fragmented);
            println!("full compile: cpu {cpu:.0} ms");
        }
    }
    if run("growth") {
        out["growth"] = json!(growth(typical));
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serializable")
        );
        return;
    }
    if run("typical") {
        print_human("typical", &out["typical"]);
    }
    if run("fragmented") {
        print_human("ipBlock excepts split the pod range", &out["fragmented"]);
    }
    for g in out["growth"].as_array().into_iter().flatten() {
        println!("growth: {g}");
    }
}
