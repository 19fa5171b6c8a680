//! Random allow-entry sets through the split policy maps: exact-port entries go to the
//! POLICY_EXACT hash map, every wildcard (any protocol, any port, port-range blocks that
//! overlap the exact ports) to the POLICY_WILDCARD trie, and a packet must pass exactly
//! when some entry covers it, as with one trie of every entry. Checked after writing a set,
//! after deleting a random half of it (deletes must find the map that holds the entry),
//! and with the kernel's own entry counts of both maps.

use std::collections::BTreeSet;

use palisade_tests::util::Rng;

use super::*;

const ROUNDS: usize = 3;
/// Ports the entries and probes crowd around, so blocks, exact ports and misses mix.
const AROUND: u16 = 0x2000;

/// (prefix, identity, proto, port) of an egress entry.
type Entry = (u32, u32, u8, u16);

/// The identities the probes reach, by the address they send to.
const EXTRA_ID: u32 = 41;
const EXTRA4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 5);

fn peers() -> [(IpAddr, u32); 5] {
    [
        (v4(PEER4), PEER_ID),
        (v6(PEER6), PEER_ID),
        (v4(WORLD4), 0),
        (v4(NODE4), NODE_ID),
        (v4(EXTRA4), EXTRA_ID),
    ]
}

fn random_set(rng: &mut Rng) -> BTreeSet<Entry> {
    let mut set = BTreeSet::new();
    for _ in 0..20 + rng.below(30) {
        let id = rng.pick(&[PEER_ID, 0, NODE_ID, EXTRA_ID]);
        let proto = rng.pick(&[PROTO_TCP, PROTO_UDP]);
        let port = AROUND - 128 + rng.below(256) as u16;
        // Wildcards sparse enough that most probes meet one entry or none.
        let entry = match rng.below(40) {
            0 => (POLICY_PREFIX_ANY_PROTO, id, 0, 0),
            1 => (POLICY_PREFIX_ANY_PORT, id, proto, 0),
            2..=11 => {
                // A port-range block of 2 to 16 ports, aligned as the compiler writes them.
                let bits = 16 - (1 + rng.below(4)) as u32;
                let mask = u16::MAX << (16 - bits);
                (POLICY_PREFIX_ANY_PORT + bits, id, proto, port & mask)
            }
            _ => (POLICY_PREFIX_FULL, id, proto, port),
        };
        set.insert(entry);
    }
    set
}

fn covers(&(prefix, id, proto, port): &Entry, pid: u32, pproto: u8, pport: u16) -> bool {
    id == pid && entry_covers(prefix, proto, port, pproto, pport)
}

fn frame_to(peer: IpAddr, proto: u8, port: u16, sport: u16) -> Vec<u8> {
    let l4 = if proto == PROTO_TCP {
        L4::tcp(sport, port, TCP_SYN)
    } else {
        L4::udp(sport, port)
    };
    out(peer, &l4)
}

fn check_all(fx: &mut Fx, rng: &mut Rng, set: &BTreeSet<Entry>, when: &str) {
    let mut ports: BTreeSet<u16> = set
        .iter()
        .flat_map(|e| [e.3.wrapping_sub(1), e.3, e.3.wrapping_add(1)])
        .collect();
    for _ in 0..16 {
        ports.insert(AROUND - 192 + rng.below(384) as u16);
    }
    let mut wrong = Vec::new();
    // How many allowed probes only exact entries cover, and only wildcards: both paths
    // must be taken for the comparison to mean anything.
    let (mut by_exact, mut by_wildcard) = (0, 0);
    let mut sport = 20000;
    for (peer, id) in peers() {
        for proto in [PROTO_TCP, PROTO_UDP] {
            for &port in &ports {
                let covering: Vec<&Entry> =
                    set.iter().filter(|e| covers(e, id, proto, port)).collect();
                let exact = covering
                    .iter()
                    .filter(|e| e.0 == POLICY_PREFIX_FULL)
                    .count();
                if exact > 0 && exact == covering.len() {
                    by_exact += 1;
                }
                if exact == 0 && !covering.is_empty() {
                    by_wildcard += 1;
                }
                let want = if covering.is_empty() {
                    DROPPED_NO_RULE
                } else {
                    ALLOWED_POLICY
                };
                sport += 1;
                let (verdict, got) =
                    fx.run_alone(Hook::FromPod, &frame_to(peer, proto, port, sport));
                if got != Some(want) {
                    wrong.push(format!(
                        "{peer} proto {proto} port {port:#06x}: want {want}, verdict {verdict} {got:?}"
                    ));
                }
            }
        }
    }
    assert!(
        by_exact > 0 && by_wildcard > 0,
        "{when}: probes allowed only by exact entries {by_exact}, only by wildcards {by_wildcard}"
    );
    assert!(
        wrong.is_empty(),
        "{when}: {} packets judged against the entries:\n{}\nentries: {set:?}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The kernel's entry counts of (exact, wildcard).
fn counts(maps: &Maps) -> (usize, usize) {
    (
        maps.policy.exact.keys().count(),
        maps.policy.trie.keys().count(),
    )
}

fn expected_counts(set: &BTreeSet<Entry>) -> (usize, usize) {
    let exact = set.iter().filter(|e| e.0 == POLICY_PREFIX_FULL).count();
    (exact, set.len() - exact)
}

pub fn run() {
    let mut fx = Fx::new("polsplit", Some(ISOLATED), 0);
    fx.identity("198.18.3.0/24", EXTRA_ID, 0);
    let mut rng = Rng(0x9017_5e75);
    for round in 0..ROUNDS {
        let mut set = random_set(&mut rng);
        for &(prefix, id, proto, port) in &set {
            fx.allow(prefix, id, DIR_EGRESS, proto, port);
        }
        assert_eq!(
            counts(&fx.maps),
            expected_counts(&set),
            "round {round}: entries in the wrong maps"
        );
        check_all(&mut fx, &mut rng, &set, &format!("round {round}, written"));

        let gone: Vec<Entry> = set.iter().filter(|_| rng.coin()).copied().collect();
        for &(prefix, id, proto, port) in &gone {
            fx.maps
                .remove_policy(prefix, PolicyKey::new(SLOT, id, DIR_EGRESS, proto, port))
                .unwrap();
            set.remove(&(prefix, id, proto, port));
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

        for &(prefix, id, proto, port) in &set {
            fx.maps
                .remove_policy(prefix, PolicyKey::new(SLOT, id, DIR_EGRESS, proto, port))
                .unwrap();
        }
        assert_eq!(counts(&fx.maps), (0, 0), "round {round}: not emptied");
    }
}
