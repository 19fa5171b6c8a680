//! `explain` reaches the same verdict as the reference evaluator and the compiled plans
//! (looked up as the dataplane does), for the whole cluster and for each node's view, and
//! its reasoning is consistent with its verdict.

mod common;

use common::*;
use palisade_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use palisade_policy::explain::{explain, pick_addresses, Check, Protocol, Subject, Traffic};
use palisade_policy::reference::Cluster;
use palisade_policy::ObjectRef;
use proptest::prelude::*;

fn traffic(proto: u8, port: u16) -> Traffic {
    let protocol = match proto {
        PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        PROTO_SCTP => Protocol::Sctp,
        _ => Protocol::Icmp,
    };
    let port = if protocol == Protocol::Icmp { 0 } else { port };
    Traffic { protocol, port }
}

/// The reasoning says what the verdict says.
fn consistent(c: &Check) -> Result<(), TestCaseError> {
    match c {
        Check::Allowed {
            isolated_by, rules, ..
        } => {
            prop_assert!(!isolated_by.is_empty());
            prop_assert!(rules
                .iter()
                .any(|r| r.allows && r.peer.matched && r.port.matched));
        }
        Check::Denied {
            isolated_by, rules, ..
        } => {
            prop_assert!(!isolated_by.is_empty());
            prop_assert!(rules.iter().all(|r| !r.allows));
        }
        _ => {}
    }
    Ok(())
}

fn check_cluster(c: &Cluster, seeds: &[(usize, usize, u8, u16)]) -> Result<(), TestCaseError> {
    let plans = plans(c);
    let ips = interesting_ips(c);
    for &(s, d, proto, port) in seeds {
        let src = ips[s % ips.len()];
        let same: Vec<_> = ips
            .iter()
            .filter(|ip| ip.is_ipv4() == src.is_ipv4())
            .collect();
        let dst = *same[d % same.len()];
        let t = traffic(proto, port);
        let number = t.protocol.number(src.is_ipv4());
        let want = c.allowed(src, dst, number, t.port);
        let compiled = cluster_verdict(&plans, src, dst, number, t.port);
        let e = explain(c, None, &Subject::Ip(src), &Subject::Ip(dst), t).unwrap();
        prop_assert_eq!(
            e.allowed,
            Some(want),
            "{} -> {} {}\nexplanation: {:#?}\ncluster: {:#?}",
            src,
            dst,
            t,
            e,
            c
        );
        prop_assert_eq!(compiled, want);
        consistent(&e.egress)?;
        consistent(&e.ingress)?;
        // One node's view is what that node's plan enforces.
        for (i, plan) in plans.iter().enumerate() {
            let e = explain(c, Some(NODES[i].0), &Subject::Ip(src), &Subject::Ip(dst), t).unwrap();
            prop_assert_eq!(
                e.allowed,
                Some(plan.verdict(src, dst, number, t.port)),
                "node {}: {} -> {} {}\nexplanation: {:#?}\ncluster: {:#?}",
                NODES[i].0,
                src,
                dst,
                t,
                e,
                c
            );
        }
    }
    // Pods by name: the same verdict as their addresses.
    let names: Vec<(ObjectRef, Vec<std::net::IpAddr>)> = c
        .pods
        .iter()
        .map(|p| {
            let r = ObjectRef::new(
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            );
            let ips = p
                .status
                .iter()
                .flat_map(|s| s.pod_ips.iter().flatten())
                .map(|i| i.ip.parse().unwrap())
                .collect();
            (r, ips)
        })
        .collect();
    for (a, a_ips) in &names {
        for (b, b_ips) in &names {
            let t = traffic(PROTO_TCP, 80);
            let got = explain(
                c,
                None,
                &Subject::Pod(a.clone()),
                &Subject::Pod(b.clone()),
                t,
            );
            match (
                a_ips.is_empty() || b_ips.is_empty(),
                pick_addresses(a_ips, b_ips),
            ) {
                (true, _) => prop_assert_eq!(got.unwrap().allowed, None),
                (false, None) => prop_assert!(got.is_err()),
                (false, Some((s, d))) => {
                    prop_assert_eq!(got.unwrap().allowed, Some(c.allowed(s, d, PROTO_TCP, 80)))
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn explain_agrees_with_reference_and_plans(c in cluster(8, 4), pk in packets(40)) {
        check_cluster(&c, &pk)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: long_cases(20000), ..ProptestConfig::default() })]

    #[test]
    #[ignore = "long: run with --ignored"]
    fn explain_agrees_with_reference_and_plans_long(c in cluster(12, 6), pk in packets(40)) {
        check_cluster(&c, &pk)?;
    }
}
