//! `palisade matrix` (its compute, with per-node plans and memoised lookups) agrees with the
//! reference evaluator on every pod pair of random clusters, the generators of the
//! compiler's own property tests.

#[path = "../policy/tests/common/mod.rs"]
mod common;

use common::cluster;
use palisade::cli::matrix::{compute, Family};
use palisade_policy::explain::{pick_addresses, Protocol, Traffic};
use proptest::prelude::*;
use proptest::sample::select;

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn matrix_agrees_with_reference(
        c in cluster(10, 5),
        protocol in select(&[Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Icmp][..]),
        port in select(&[53u16, 80, 443, 1000, 8080, 9090][..]),
        family in select(&[Family::Auto, Family::Ipv4, Family::Ipv6][..]),
    ) {
        let port = if protocol == Protocol::Icmp { 0 } else { port };
        let m = compute(&c, Traffic { protocol, port }, family);
        let by_name = |name: &str| {
            c.pods
                .iter()
                .find(|p| {
                    format!(
                        "{}/{}",
                        p.metadata.namespace.as_deref().unwrap_or_default(),
                        p.metadata.name.as_deref().unwrap_or_default()
                    ) == name
                })
                .unwrap()
        };
        let ips = |name: &str| -> Vec<std::net::IpAddr> {
            by_name(name)
                .status
                .iter()
                .flat_map(|s| s.pod_ips.iter().flatten())
                .map(|i| i.ip.parse().unwrap())
                .filter(|ip: &std::net::IpAddr| match family {
                    Family::Auto => true,
                    Family::Ipv4 => ip.is_ipv4(),
                    Family::Ipv6 => ip.is_ipv6(),
                })
                .collect()
        };
        let mut sorted = m.pods.clone();
        sorted.sort();
        prop_assert_eq!(&sorted, &m.pods);
        for (i, from) in m.pods.iter().enumerate() {
            let phase = by_name(from).status.as_ref().and_then(|s| s.phase.clone());
            prop_assert!(!matches!(phase.as_deref(), Some("Succeeded" | "Failed")));
            prop_assert!(!ips(from).is_empty());
            for (j, to) in m.pods.iter().enumerate() {
                let want = pick_addresses(&ips(from), &ips(to)).is_some_and(|(s, d)| {
                    c.allowed(s, d, protocol.number(s.is_ipv4()), port)
                });
                prop_assert_eq!(m.allowed[i][j], want, "{} -> {}\n{:#?}", from, to, c);
            }
        }
    }
}
