//! Full and incremental compile at 10,000 pods / 500 namespaces / 2,000 policies with 100
//! local pods (the world of `examples/scale/world.rs`, shared with the `scale` example that
//! also reports heap and entry counts).
//!
//! ```text
//! cargo bench -p palisade-policy --bench compile
//! ```
//!
//! Each incremental bench times exactly one change: the change is undone, untimed, before
//! the next one, so the cluster stays the same size.

#[path = "../examples/scale/world.rs"]
mod world;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use palisade_policy::Compiler;
use world::Scale;

fn full(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("compile");
    g.sample_size(10);
    let fragmented = Scale {
        fragment: true,
        ..Scale::ISSUE
    };
    for (name, s) in [
        ("full_typical", Scale::ISSUE),
        ("full_fragmented", fragmented),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || world::world(s),
                |w| {
                    let mut c = Compiler::new(world::NODE, world::node_ips());
                    black_box(c.apply_batch(w).len())
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

fn incremental(cr: &mut Criterion) {
    let s = Scale::ISSUE;
    let mut c = world::compiled(s);
    let mut g = cr.benchmark_group("incremental");
    for kind in world::STEPS {
        let mut n = 0;
        // The forward change (an add, a label change, a policy edit).
        g.bench_function(kind, |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let st = world::step(s, kind, n);
                    n += 1;
                    let start = Instant::now();
                    black_box(c.apply(st.forward).len());
                    t += start.elapsed();
                    c.apply(st.back);
                }
                t
            })
        });
        if kind.starts_with("pod_add") {
            // Its undo: the pod deleted.
            g.bench_function(kind.replace("add", "delete"), |b| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        let st = world::step(s, kind, n);
                        n += 1;
                        c.apply(st.forward);
                        let start = Instant::now();
                        black_box(c.apply(st.back).len());
                        t += start.elapsed();
                    }
                    t
                })
            });
        }
    }
    g.finish();
}

criterion_group!(compile_benches, full, incremental);
criterion_main!(compile_benches);
