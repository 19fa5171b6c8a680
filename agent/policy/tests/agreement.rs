//! The plan, looked up exactly as the tc programs do, agrees with the reference evaluator.
//!
//! Nightly-style run: the `#[ignore]`d `_long` tests, larger clusters and `PROPTEST_CASES`
//! cases (default 20,000; 100,000 take about a minute in release on 2 cores):
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test --release -p palisade-policy --test agreement -- --ignored
//! ```

mod common;

use common::*;
use palisade_common::{PROTO_ICMP, PROTO_ICMPV6};
use proptest::prelude::*;

fn check_cluster(
    c: &palisade_policy::reference::Cluster,
    seeds: &[(usize, usize, u8, u16)],
) -> Result<(), TestCaseError> {
    let plans = plans(c);
    let ips = interesting_ips(c);
    for &(s, d, proto, port) in seeds {
        let src = ips[s % ips.len()];
        // Pick a destination of the same family.
        let same: Vec<_> = ips
            .iter()
            .filter(|ip| ip.is_ipv4() == src.is_ipv4())
            .collect();
        let dst = *same[d % same.len()];
        let proto = match (proto, src.is_ipv4()) {
            (PROTO_ICMP, false) => PROTO_ICMPV6,
            (p, _) => p,
        };
        let port = if proto == PROTO_ICMP || proto == PROTO_ICMPV6 {
            0
        } else {
            port
        };
        let want = c.allowed(src, dst, proto, port);
        let got = cluster_verdict(&plans, src, dst, proto, port);
        prop_assert_eq!(
            got,
            want,
            "{} -> {} proto {} port {}\ncluster: {:#?}",
            src,
            dst,
            proto,
            port,
            c
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn plan_agrees_with_reference(c in cluster(8, 4), pk in packets(60)) {
        check_cluster(&c, &pk)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: long_cases(20000), ..ProptestConfig::default() })]

    #[test]
    #[ignore = "long: run with --ignored"]
    fn plan_agrees_with_reference_long(c in cluster(12, 6), pk in packets(60)) {
        check_cluster(&c, &pk)?;
    }
}
