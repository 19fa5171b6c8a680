//! Applying the diffs of a sequence of changes to an empty plan gives what a full compile
//! of the final state gives.

mod common;

use common::*;
use palisade_policy::{compile, Compiler, Plan};
use proptest::prelude::*;

fn run(
    a: &palisade_policy::reference::Cluster,
    b: &palisade_policy::reference::Cluster,
    order: &[usize],
) -> Result<(), TestCaseError> {
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
    let full = compile(
        &b.namespaces,
        &b.pods,
        &b.policies,
        NODES[0].0,
        &node_ips(0),
    );
    prop_assert_eq!(compiler.plan().canonical(), full.canonical());
    prop_assert_eq!(mirror.canonical(), full.canonical());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn diffs_replayed_equal_full_compile(a in cluster(8, 4), b in cluster(8, 4), order in proptest::collection::vec(any::<usize>(), 0..20)) {
        run(&a, &b, &order)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10000, ..ProptestConfig::default() })]

    #[test]
    #[ignore = "long: run with --ignored"]
    fn diffs_replayed_equal_full_compile_long(a in cluster(12, 6), b in cluster(12, 6), order in proptest::collection::vec(any::<usize>(), 0..40)) {
        run(&a, &b, &order)?;
    }
}
