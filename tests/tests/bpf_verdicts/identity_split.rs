//! Random identity sets through the split identity maps: host entries (/32, /128) go to the
//! exact hash maps, shorter prefixes (ipBlock CIDRs, except holes, nested blocks) to the
//! tries, and the programs must still find, for every address, the identity that a
//! longest-prefix match over all the entries gives. Each identity has its own allowed TCP
//! port, so a SYN to that port passes only when the programs found that identity, and a
//! SYN to the next identity's port is dropped. Checked after writing a set, after deleting
//! a random half of it (deletes must find the map that holds the entry), and with the
//! kernel's own entry counts of the four maps.

use std::collections::BTreeMap;

use ipnetwork::{Ipv4Network, Ipv6Network};
use palisade_tests::util::Rng;

use super::*;

/// Identities 1..=IDS; 0 is the world.
const IDS: u32 = 24;
const ROUNDS: usize = 3;

fn port_of(id: u32) -> u16 {
    1000 + id as u16
}

/// 512 addresses of each family that the sets nest in.
const BASE4: u32 = u32::from_be_bytes([198, 18, 4, 0]);
const BASE6: u128 = 0xfd00_0198_0018_0004_0000_0000_0000_0000;
const SPAN: u32 = 512;

fn random_set(rng: &mut Rng) -> BTreeMap<IpNetwork, u32> {
    let mut set = BTreeMap::new();
    let n = 20 + rng.below(60);
    for _ in 0..n {
        let off = rng.below(SPAN as usize) as u32;
        let id = 1 + rng.below(IDS as usize) as u32;
        // Host entries dominate, as pod IPs do; the rest nest inside each other.
        let short = rng.pick(&[0u32, 0, 0, 0, 1, 2, 4, 5, 7, 8, 9]);
        let net = if rng.coin() {
            let p = 32 - short as u8;
            let a = Ipv4Network::new((BASE4 + off).into(), p).unwrap();
            IpNetwork::V4(Ipv4Network::new(a.network(), p).unwrap())
        } else {
            let p = 128 - short as u8;
            let a = Ipv6Network::new((BASE6 + off as u128).into(), p).unwrap();
            IpNetwork::V6(Ipv6Network::new(a.network(), p).unwrap())
        };
        set.insert(net, id);
    }
    set
}

/// Longest prefix over every entry, as one trie of all of them would answer.
fn longest(set: &BTreeMap<IpNetwork, u32>, a: IpAddr) -> u32 {
    set.iter()
        .filter(|(n, _)| n.contains(a))
        .max_by_key(|(n, _)| n.prefix())
        .map_or(0, |(_, id)| *id)
}

/// Addresses worth asking about: each entry's first, second and last address, random ones
/// in the span, and one just past it (the world).
fn probes(rng: &mut Rng, set: &BTreeMap<IpNetwork, u32>) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for n in set.keys() {
        out.push(n.network());
        out.push(n.broadcast());
        match n {
            IpNetwork::V4(n) => out.push(IpAddr::V4((u32::from(n.network()) + 1).into())),
            IpNetwork::V6(n) => out.push(IpAddr::V6((u128::from(n.network()) + 1).into())),
        }
    }
    for _ in 0..40 {
        let off = rng.below(SPAN as usize) as u32;
        out.push(IpAddr::V4((BASE4 + off).into()));
        out.push(IpAddr::V6((BASE6 + off as u128).into()));
    }
    out.push(IpAddr::V4((BASE4 + SPAN).into()));
    out.push(IpAddr::V6((BASE6 + SPAN as u128).into()));
    out
}

fn syn(peer: IpAddr, port: u16) -> Vec<u8> {
    out(peer, &L4::tcp(40000, port, TCP_SYN))
}

fn check_all(fx: &mut Fx, rng: &mut Rng, set: &BTreeMap<IpNetwork, u32>, when: &str) {
    let mut wrong = Vec::new();
    for peer in probes(rng, set) {
        let want = longest(set, peer);
        let other = (want + 1) % (IDS + 1);
        for (port, reason) in [
            (port_of(want), ALLOWED_POLICY),
            (port_of(other), DROPPED_NO_RULE),
        ] {
            let (verdict, got) = fx.run_alone(Hook::FromPod, &syn(peer, port));
            if got != Some(reason) {
                wrong.push(format!(
                    "{peer} (identity {want}) port {port}: verdict {verdict}, {got:?}"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{when}: {} probes judged as another identity:\n{}\nset: {set:?}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The kernel's entry counts of (exact v4, cidr v4, exact v6, cidr v6).
fn counts(maps: &Maps) -> [usize; 4] {
    [
        maps.identity_v4.exact.keys().count(),
        maps.identity_v4.trie.keys().count(),
        maps.identity_v6.exact.keys().count(),
        maps.identity_v6.trie.keys().count(),
    ]
}

fn expected_counts(set: &BTreeMap<IpNetwork, u32>) -> [usize; 4] {
    let mut c = [0; 4];
    for n in set.keys() {
        let i = match n {
            IpNetwork::V4(n) => usize::from(n.prefix() != 32),
            IpNetwork::V6(n) => 2 + usize::from(n.prefix() != 128),
        };
        c[i] += 1;
    }
    c
}

pub fn run() {
    let mut fx = Fx::new("idsplit", Some(ISOLATED), 0);
    // Start from nothing: the fixture's identities are not part of the sets.
    for net in [
        "198.18.1.0/24",
        "fd00:198:18:1::/64",
        "198.18.0.1/32",
        "fd00:198:18::1/128",
    ] {
        fx.maps.remove_identity(net.parse().unwrap()).unwrap();
    }
    assert_eq!(counts(&fx.maps), [0; 4], "fixture identities left behind");
    for id in 0..=IDS {
        fx.allow(POLICY_PREFIX_FULL, id, DIR_EGRESS, PROTO_TCP, port_of(id));
    }
    let mut rng = Rng(0x1d5e_7a11);
    for round in 0..ROUNDS {
        let mut set = random_set(&mut rng);
        for (net, id) in &set {
            fx.identity(&net.to_string(), *id, 0);
        }
        assert_eq!(
            counts(&fx.maps),
            expected_counts(&set),
            "round {round}: entries in the wrong maps"
        );
        check_all(&mut fx, &mut rng, &set, &format!("round {round}, written"));

        let gone: Vec<IpNetwork> = set.keys().filter(|_| rng.coin()).copied().collect();
        for net in &gone {
            fx.maps.remove_identity(*net).unwrap();
            set.remove(net);
        }
        assert_eq!(
            counts(&fx.maps),
            expected_counts(&set),
            "round {round}: deletes missed their map"
        );
        check_all(
            &mut fx,
            &mut rng,
            &set,
            &format!("round {round}, half deleted"),
        );

        for net in set.keys() {
            fx.maps.remove_identity(*net).unwrap();
        }
        assert_eq!(counts(&fx.maps), [0; 4], "round {round}: not emptied");
    }
}
