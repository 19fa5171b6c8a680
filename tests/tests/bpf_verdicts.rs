//! Tier 2: the real tc programs judge crafted frames through BPF_PROG_TEST_RUN.
//!
//! Every test loads its own copy of the programs with maps pinned in a private bpffs
//! directory, registers a pod under the interface BPF_PROG_TEST_RUN uses (loopback), and
//! checks both the verdict and which counter moved: each frame must be counted under
//! exactly one (direction, reason) pair, by one packet and its length in bytes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use ipnetwork::IpNetwork;
use palisade::dataplane::testrun::{TC_ACT_OK, TC_ACT_SHOT, TEST_RUN_IFINDEX};
use palisade::dataplane::{
    cleanup, monotonic_now_ns, read_counters, Dataplane, Hook, LoadOptions, Maps, GC_GRACE,
};
use palisade_common::{
    Config, CtKey, Endpoint, FragKey, IdentityValue, PolicyKey, CFG_REVOKE_UNTRACKED,
    CT_DEFAULT_TCP_TIMEOUT_S, CT_DEFAULT_UDP_TIMEOUT_S, DIR_EGRESS, DIR_INGRESS,
    EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, FRAGMENT_TIMEOUT_NS, IDENTITY_FLAG_HOST,
    POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
};
use palisade_tests::packets::*;
use palisade_tests::pins::PinDir;
use palisade_tests::require_root;

const SLOT: u32 = 3;
const ISOLATED: u32 = EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS;

const ALLOWED_POLICY: &str = "allowed-by-policy";
const ALLOWED_TRACKED: &str = "allowed-tracked";
const ALLOWED_NOT_ISOLATED: &str = "allowed-not-isolated";
const ALLOWED_HOST: &str = "allowed-from-node";
const DROPPED_NO_RULE: &str = "dropped-no-rule";
const DROPPED_MALFORMED: &str = "dropped-malformed";
const DROPPED_FRAGMENT: &str = "dropped-fragment";

// The pod, a peer pod (identity PEER_ID), the node, and an address nobody maps (world).
const POD4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const PEER4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
const NODE4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const WORLD4: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 7);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 0x10);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 1, 0, 0, 0, 0x20);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 1);
const WORLD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0x77, 0, 0, 0, 7);
const PEER_ID: u32 = 20;
const NODE_ID: u32 = 1;

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}
fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

/// One loaded dataplane with a pod at `SLOT` on the test-run interface.
struct Fx {
    dp: Dataplane,
    maps: Maps,
    frags: BpfHashMap<MapData, FragKey, u64>,
    _pins: PinDir,
}

impl Fx {
    /// `ep_flags: None` leaves the interface out of ENDPOINTS.
    fn new(name: &str, ep_flags: Option<u32>, cfg_flags: u32) -> Fx {
        Fx::with_conntrack(name, ep_flags, cfg_flags, 4096)
    }

    /// Like [`Fx::new`] with a conntrack map of `conntrack_entries`.
    fn with_conntrack(
        name: &str,
        ep_flags: Option<u32>,
        cfg_flags: u32,
        conntrack_entries: u32,
    ) -> Fx {
        require_root();
        let pins = PinDir::new(name);
        let layout = pins.layout();
        // A stale directory of an earlier run with the same pid would reopen old maps.
        let _ = cleanup(&layout);
        let opts = LoadOptions {
            conntrack_entries,
            ..Default::default()
        };
        let dp = Dataplane::load(layout.clone(), &opts).expect("load the programs");
        let mut maps = dp.maps().expect("open the maps");
        maps.set_config(Config {
            flags: cfg_flags,
            events_per_sec: 1000,
            ..Default::default()
        })
        .unwrap();
        if let Some(flags) = ep_flags {
            maps.set_endpoint(TEST_RUN_IFINDEX, Endpoint { slot: SLOT, flags })
                .unwrap();
        }
        let data = MapData::from_pin(layout.map(palisade_common::maps::FRAGMENTS)).unwrap();
        let frags = BpfHashMap::try_from(Map::from_map_data(data).unwrap()).unwrap();
        let mut fx = Fx {
            dp,
            maps,
            frags,
            _pins: pins,
        };
        fx.identity("198.18.1.0/24", PEER_ID, 0);
        fx.identity("fd00:198:18:1::/64", PEER_ID, 0);
        fx.identity("198.18.0.1/32", NODE_ID, IDENTITY_FLAG_HOST);
        fx.identity("fd00:198:18::1/128", NODE_ID, IDENTITY_FLAG_HOST);
        fx
    }

    fn identity(&mut self, net: &str, id: u32, flags: u32) {
        let net: IpNetwork = net.parse().unwrap();
        self.maps
            .set_identity(net, IdentityValue { id, flags })
            .unwrap();
    }

    fn allow(&mut self, prefix: u32, identity: u32, dir: u8, proto: u8, port: u16) {
        self.maps
            .insert_policy(prefix, PolicyKey::new(SLOT, identity, dir, proto, port))
            .unwrap();
    }

    fn counters(&self) -> BTreeMap<(&'static str, &'static str), (u64, u64)> {
        read_counters(&self.maps, Some(&[SLOT]))
            .unwrap()
            .into_iter()
            .map(|r| ((r.direction, r.reason), (r.packets, r.bytes)))
            .collect()
    }

    fn verdict(&mut self, hook: Hook, frame: &[u8]) -> u32 {
        match self.dp.test_run(hook, frame, 1) {
            Ok(r) => r.verdict,
            Err(e) => panic!("BPF_PROG_TEST_RUN of {hook:?} on {}: {e:?}", hex(frame)),
        }
    }

    /// Runs `frame` and returns the verdict and the one counter it moved (None when it
    /// moved none); panics when it moved several or by other amounts than one packet.
    fn run(&mut self, hook: Hook, frame: &[u8]) -> (u32, Option<&'static str>) {
        let before = self.counters();
        let verdict = self.verdict(hook, frame);
        let after = self.counters();
        let mut moved = Vec::new();
        for (k, &(p, b)) in &after {
            let (p0, b0) = before.get(k).copied().unwrap_or((0, 0));
            if (p, b) != (p0, b0) {
                moved.push((*k, p - p0, b - b0));
            }
        }
        match moved.as_slice() {
            [] => (verdict, None),
            [((dir, reason), p, b)] => {
                assert_eq!(*dir, dir_name(hook), "counted in the wrong direction");
                assert_eq!((*p, *b), (1, frame.len() as u64), "one packet, its bytes");
                (verdict, Some(*reason))
            }
            _ => panic!("one frame moved several counters: {moved:?}"),
        }
    }

    /// [`Fx::run`], then forgets the flow (and fragments) a passed frame left behind: for
    /// the randomized tests, whose every frame must be judged on the rules alone.
    fn run_alone(&mut self, hook: Hook, frame: &[u8]) -> (u32, Option<&'static str>) {
        let r = self.run(hook, frame);
        if r.0 == TC_ACT_OK {
            self.forget_flows();
        }
        r
    }

    /// Asserts the verdict that `reason` implies and that exactly its counter moved.
    #[track_caller]
    fn expect(&mut self, hook: Hook, frame: &[u8], reason: &str) {
        let got = self.run(hook, frame);
        let want_verdict = if reason.starts_with("dropped") {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK
        };
        assert_eq!(
            got,
            (want_verdict, Some(reason_static(reason))),
            "{hook:?} frame {}",
            hex(frame)
        );
    }

    /// A frame that passes without being judged (link-level control, unmanaged interface).
    #[track_caller]
    fn expect_uncounted_pass(&mut self, hook: Hook, frame: &[u8]) {
        assert_eq!(
            self.run(hook, frame),
            (TC_ACT_OK, None),
            "{hook:?} frame {}",
            hex(frame)
        );
    }

    /// Forgets every tracked flow and fragment.
    fn forget_flows(&mut self) {
        let keys: Vec<_> = self.maps.conntrack.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.maps.conntrack.remove(&k);
        }
        let keys: Vec<_> = self.frags.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.frags.remove(&k);
        }
    }
}

fn reason_static(r: &str) -> &'static str {
    palisade_common::REASON_NAMES
        .iter()
        .find(|n| **n == r)
        .unwrap_or_else(|| panic!("unknown reason {r}"))
}

fn dir_name(hook: Hook) -> &'static str {
    match hook {
        Hook::FromPod => "egress",
        Hook::ToPod => "ingress",
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Frames of the pod talking to `peer` (egress) and of `peer` talking to the pod.
fn out4(peer: Ipv4Addr, l4: &L4) -> Vec<u8> {
    frame(v4(POD4), v4(peer), l4)
}
fn in4(peer: Ipv4Addr, l4: &L4) -> Vec<u8> {
    frame(v4(peer), v4(POD4), l4)
}
fn out6(peer: Ipv6Addr, l4: &L4) -> Vec<u8> {
    frame(v6(POD6), v6(peer), l4)
}
fn in6(peer: Ipv6Addr, l4: &L4) -> Vec<u8> {
    frame(v6(peer), v6(POD6), l4)
}
/// A frame of the pod to `peer`, from the pod's address of `peer`'s family.
fn out(peer: IpAddr, l4: &L4) -> Vec<u8> {
    let pod = if peer.is_ipv4() { v4(POD4) } else { v6(POD6) };
    frame(pod, peer, l4)
}

/// Whether an allow entry under `prefix` (any protocol, any port of `proto`, a block of
/// ports around `port`, or `port` alone) covers a packet of `pproto` to `pport`: the
/// reading of one entry the randomized tests judge the programs against.
fn entry_covers(prefix: u32, proto: u8, port: u16, pproto: u8, pport: u16) -> bool {
    if prefix == POLICY_PREFIX_ANY_PROTO {
        return true;
    }
    // The port's leading `bits` bits are significant (none for any port).
    let bits = prefix - POLICY_PREFIX_ANY_PORT;
    let mask = u16::MAX.checked_shl(16 - bits).unwrap_or(0);
    proto == pproto && pport & mask == port & mask
}

// ---------------------------------------------------------------------------------------
// Isolation and the unjudged cases
// ---------------------------------------------------------------------------------------

#[test]
fn isolated_pod_drops_syn_without_rule_and_counts_exactly_it() {
    let mut fx = Fx::new("norule", Some(ISOLATED), 0);
    let out = out4(PEER4, &L4::tcp(40000, 80, TCP_SYN));
    let inc = in6(PEER6, &L4::tcp(40000, 80, TCP_SYN));
    let before = fx.counters();
    for _ in 0..3 {
        assert_eq!(fx.verdict(Hook::FromPod, &out), TC_ACT_SHOT);
    }
    for _ in 0..2 {
        assert_eq!(fx.verdict(Hook::ToPod, &inc), TC_ACT_SHOT);
    }
    let after = fx.counters();
    assert!(before.is_empty(), "fresh maps count nothing: {before:?}");
    let want: BTreeMap<_, _> = [
        (("egress", DROPPED_NO_RULE), (3, 3 * out.len() as u64)),
        (("ingress", DROPPED_NO_RULE), (2, 2 * inc.len() as u64)),
    ]
    .into_iter()
    .collect();
    assert_eq!(after, want);
}

#[test]
fn isolation_is_per_direction_and_not_isolated_counts_allowed_not_isolated() {
    // Only ingress is isolated: the pod may send anything, nothing may come in unasked.
    let mut fx = Fx::new("notiso", Some(EP_ISOLATED_INGRESS), 0);
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::tcp(40001, 9999, TCP_SYN)),
        ALLOWED_NOT_ISOLATED,
    );
    fx.expect(
        Hook::FromPod,
        &out6(WORLD6, &L4::udp(40001, 7)),
        ALLOWED_NOT_ISOLATED,
    );
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::tcp(40002, 9999, TCP_SYN)),
        DROPPED_NO_RULE,
    );

    let mut fx = Fx::new("notiso2", Some(0), 0);
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::tcp(40002, 9999, TCP_SYN)),
        ALLOWED_NOT_ISOLATED,
    );
    fx.expect(
        Hook::ToPod,
        &in6(WORLD6, &L4::sctp(1, 2)),
        ALLOWED_NOT_ISOLATED,
    );
}

#[test]
fn interface_not_in_endpoints_passes_unjudged() {
    let mut fx = Fx::new("noep", None, 0);
    for hook in Hook::ALL {
        fx.expect_uncounted_pass(hook, &out4(PEER4, &L4::tcp(40000, 80, TCP_SYN)));
        fx.expect_uncounted_pass(hook, &ether(0x88b5, &[0; 46]));
    }
    let all = read_counters(&fx.maps, None).unwrap();
    assert!(all.is_empty(), "nothing counted anywhere: {all:?}");
    // Registering the endpoint makes the same frame judged.
    fx.maps
        .set_endpoint(
            TEST_RUN_IFINDEX,
            Endpoint {
                slot: SLOT,
                flags: ISOLATED,
            },
        )
        .unwrap();
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::tcp(40000, 80, TCP_SYN)),
        DROPPED_NO_RULE,
    );
}

// ---------------------------------------------------------------------------------------
// Policy entries: ports, protocols, ranges
// ---------------------------------------------------------------------------------------

#[test]
fn exact_port_rule_allows_that_port_only() {
    let mut fx = Fx::new("exact", Some(ISOLATED), 0);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_TCP, 80);
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::tcp(40000, 80, TCP_SYN)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::FromPod,
        &out6(PEER6, &L4::tcp(40000, 80, TCP_SYN)),
        ALLOWED_POLICY,
    );
    for port in [79, 81, 8080, 0] {
        fx.expect(
            Hook::FromPod,
            &out4(PEER4, &L4::tcp(40000, port, TCP_SYN)),
            DROPPED_NO_RULE,
        );
    }
    // The entry is for egress: the same port inbound is not allowed.
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::tcp(40000, 80, TCP_SYN)),
        DROPPED_NO_RULE,
    );
}

#[test]
fn any_port_rule_allows_every_port_of_its_protocol() {
    let mut fx = Fx::new("anyport", Some(ISOLATED), 0);
    fx.allow(POLICY_PREFIX_ANY_PORT, PEER_ID, DIR_INGRESS, PROTO_UDP, 0);
    for port in [0, 1, 53, 4789, 65535] {
        fx.expect(
            Hook::ToPod,
            &in4(PEER4, &L4::udp(50000, port)),
            ALLOWED_POLICY,
        );
        fx.expect(
            Hook::ToPod,
            &in6(PEER6, &L4::udp(50000, port)),
            ALLOWED_POLICY,
        );
    }
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::tcp(50000, 53, TCP_SYN)),
        DROPPED_NO_RULE,
    );
}

#[test]
fn any_protocol_rule_allows_everything_from_that_identity_only() {
    let mut fx = Fx::new("anyproto", Some(ISOLATED), 0);
    fx.allow(POLICY_PREFIX_ANY_PROTO, PEER_ID, DIR_EGRESS, 0, 0);
    let l4s = [
        L4::tcp(40000, 22, TCP_SYN),
        L4::udp(40000, 53),
        L4::sctp(40000, 38412),
        L4::echo(false, true, 7, 1),
        L4::Raw {
            proto: 47,
            bytes: vec![0; 8],
        },
    ];
    for l4 in &l4s {
        fx.expect(Hook::FromPod, &out4(PEER4, l4), ALLOWED_POLICY);
        fx.expect(Hook::FromPod, &out4(WORLD4, l4), DROPPED_NO_RULE);
    }
    fx.expect(
        Hook::FromPod,
        &out6(PEER6, &L4::echo(true, true, 7, 1)),
        ALLOWED_POLICY,
    );
}

#[test]
fn port_range_block_covers_exactly_its_aligned_ports() {
    let mut fx = Fx::new("range", Some(ISOLATED), 0);
    // 80..=95: 16 ports, the 12 leading bits of the port fixed.
    fx.allow(
        POLICY_PREFIX_ANY_PORT + 12,
        PEER_ID,
        DIR_EGRESS,
        PROTO_TCP,
        80,
    );
    for port in 80..=95 {
        fx.expect(
            Hook::FromPod,
            &out4(PEER4, &L4::tcp(40000, port, TCP_SYN)),
            ALLOWED_POLICY,
        );
    }
    for port in [79, 96, 64, 112, 80 + 256] {
        fx.expect(
            Hook::FromPod,
            &out4(PEER4, &L4::tcp(40000, port, TCP_SYN)),
            DROPPED_NO_RULE,
        );
    }
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::udp(40000, 85)),
        DROPPED_NO_RULE,
    );
}

#[test]
fn protocol_mismatch_is_dropped() {
    let mut fx = Fx::new("protomis", Some(ISOLATED), 0);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_TCP, 53);
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::udp(40000, 53)),
        DROPPED_NO_RULE,
    );
    fx.expect(
        Hook::FromPod,
        &out6(PEER6, &L4::sctp(40000, 53)),
        DROPPED_NO_RULE,
    );
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::tcp(40000, 53, TCP_SYN)),
        ALLOWED_POLICY,
    );
}

#[test]
fn sctp_is_judged_on_its_ports() {
    let mut fx = Fx::new("sctp", Some(ISOLATED), 0);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_INGRESS, PROTO_SCTP, 5000);
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::sctp(6000, 5000)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::ToPod,
        &in6(PEER6, &L4::sctp(6000, 5000)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::sctp(6000, 5001)),
        DROPPED_NO_RULE,
    );
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::tcp(6000, 5000, TCP_SYN)),
        DROPPED_NO_RULE,
    );
    fx.expect(
        Hook::ToPod,
        &in4(WORLD4, &L4::sctp(6000, 5000)),
        DROPPED_NO_RULE,
    );
}

// ---------------------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------------------

#[test]
fn identity_longest_prefix_wins() {
    let mut fx = Fx::new("lpm", Some(ISOLATED), 0);
    // ipBlock 198.18.2.0/24 except 198.18.2.128/25, and a pod inside the block.
    fx.identity("198.18.2.0/24", 30, 0);
    fx.identity("198.18.2.128/25", 31, 0);
    fx.identity("198.18.2.7/32", 32, 0);
    fx.identity("fd00:198:18:2::/64", 30, 0);
    fx.identity("fd00:198:18:2:8000::/65", 31, 0);
    fx.identity("fd00:198:18:2::7/128", 32, 0);
    fx.allow(POLICY_PREFIX_FULL, 30, DIR_EGRESS, PROTO_TCP, 80);
    fx.allow(POLICY_PREFIX_FULL, 32, DIR_EGRESS, PROTO_TCP, 8080);
    let cases4: [(&str, u16, &str); 6] = [
        ("198.18.2.50", 80, ALLOWED_POLICY),
        ("198.18.2.127", 80, ALLOWED_POLICY),
        ("198.18.2.128", 80, DROPPED_NO_RULE),
        ("198.18.2.200", 80, DROPPED_NO_RULE),
        ("198.18.2.7", 80, DROPPED_NO_RULE),
        ("198.18.2.7", 8080, ALLOWED_POLICY),
    ];
    for (addr, port, want) in cases4 {
        fx.expect(
            Hook::FromPod,
            &out4(addr.parse().unwrap(), &L4::tcp(40000, port, TCP_SYN)),
            want,
        );
    }
    fx.expect(
        Hook::FromPod,
        &out4(
            "198.18.2.50".parse().unwrap(),
            &L4::tcp(40000, 8080, TCP_SYN),
        ),
        DROPPED_NO_RULE,
    );
    let cases6: [(&str, u16, &str); 4] = [
        ("fd00:198:18:2::50", 80, ALLOWED_POLICY),
        ("fd00:198:18:2:8000::1", 80, DROPPED_NO_RULE),
        ("fd00:198:18:2::7", 80, DROPPED_NO_RULE),
        ("fd00:198:18:2::7", 8080, ALLOWED_POLICY),
    ];
    for (addr, port, want) in cases6 {
        fx.expect(
            Hook::FromPod,
            &out6(addr.parse().unwrap(), &L4::tcp(40000, port, TCP_SYN)),
            want,
        );
    }
}

#[test]
fn world_is_allowed_only_by_an_entry_for_identity_zero() {
    let mut fx = Fx::new("world", Some(ISOLATED), 0);
    fx.expect(
        Hook::FromPod,
        &out4(WORLD4, &L4::tcp(40000, 443, TCP_SYN)),
        DROPPED_NO_RULE,
    );
    fx.allow(POLICY_PREFIX_FULL, 0, DIR_EGRESS, PROTO_TCP, 443);
    fx.expect(
        Hook::FromPod,
        &out4(WORLD4, &L4::tcp(40001, 443, TCP_SYN)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::FromPod,
        &out6(WORLD6, &L4::tcp(40001, 443, TCP_SYN)),
        ALLOWED_POLICY,
    );
    // A known identity is not "world".
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::tcp(40001, 443, TCP_SYN)),
        DROPPED_NO_RULE,
    );
    fx.expect(
        Hook::FromPod,
        &out4(WORLD4, &L4::tcp(40001, 444, TCP_SYN)),
        DROPPED_NO_RULE,
    );
}

#[test]
fn node_may_reach_the_pod_but_egress_to_node_needs_a_rule() {
    let mut fx = Fx::new("host", Some(ISOLATED), 0);
    fx.expect(
        Hook::ToPod,
        &in4(NODE4, &L4::tcp(40000, 8080, TCP_SYN)),
        ALLOWED_HOST,
    );
    fx.expect(Hook::ToPod, &in6(NODE6, &L4::udp(40000, 53)), ALLOWED_HOST);
    fx.expect(
        Hook::FromPod,
        &out4(NODE4, &L4::tcp(40001, 10250, TCP_SYN)),
        DROPPED_NO_RULE,
    );
    fx.expect(
        Hook::FromPod,
        &out6(NODE6, &L4::tcp(40001, 10250, TCP_SYN)),
        DROPPED_NO_RULE,
    );
}

// ---------------------------------------------------------------------------------------
// Conntrack
// ---------------------------------------------------------------------------------------

#[test]
fn tcp_reply_passes_as_tracked_but_a_new_connection_from_the_peer_does_not() {
    let mut fx = Fx::new("cttcp", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_TCP, 80);
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::tcp(40000, 80, TCP_SYN)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::tcp(80, 40000, TCP_SYN | TCP_ACK)),
        ALLOWED_TRACKED,
    );
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::tcp(40000, 80, TCP_ACK)),
        ALLOWED_TRACKED,
    );
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::tcp(80, 40000, TCP_ACK | TCP_PSH)),
        ALLOWED_TRACKED,
    );
    // The peer opening a connection on the reversed tuple is a new connection.
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::tcp(80, 40000, TCP_SYN)),
        DROPPED_NO_RULE,
    );
    // A reply to a port the pod never used is not a reply.
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::tcp(80, 40001, TCP_SYN | TCP_ACK)),
        DROPPED_NO_RULE,
    );
    fx.expect(
        Hook::FromPod,
        &out6(PEER6, &L4::tcp(40000, 80, TCP_SYN)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::ToPod,
        &in6(PEER6, &L4::tcp(80, 40000, TCP_SYN | TCP_ACK)),
        ALLOWED_TRACKED,
    );
    fx.expect(
        Hook::ToPod,
        &in6(PEER6, &L4::tcp(80, 40000, TCP_SYN)),
        DROPPED_NO_RULE,
    );
}

#[test]
fn udp_reply_passes_as_tracked() {
    let mut fx = Fx::new("ctudp", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_UDP, 53);
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::udp(33333, 53)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::udp(53, 33333)),
        ALLOWED_TRACKED,
    );
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::udp(53, 33334)),
        DROPPED_NO_RULE,
    );
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::udp(54, 33333)),
        DROPPED_NO_RULE,
    );
    fx.expect(
        Hook::FromPod,
        &out6(PEER6, &L4::udp(33333, 53)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::ToPod,
        &in6(PEER6, &L4::udp(53, 33333)),
        ALLOWED_TRACKED,
    );
    fx.expect(
        Hook::ToPod,
        &in6(WORLD6, &L4::udp(53, 33333)),
        DROPPED_NO_RULE,
    );
}

#[test]
fn icmp_echo_reply_passes_as_tracked_v4_and_v6() {
    let mut fx = Fx::new("ctecho", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_ANY_PORT, PEER_ID, DIR_EGRESS, PROTO_ICMP, 0);
    fx.allow(POLICY_PREFIX_ANY_PORT, PEER_ID, DIR_EGRESS, PROTO_ICMPV6, 0);
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::echo(false, true, 0x4242, 1)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::echo(false, false, 0x4242, 1)),
        ALLOWED_TRACKED,
    );
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::echo(false, false, 0x4243, 1)),
        DROPPED_NO_RULE,
    );
    fx.expect(
        Hook::FromPod,
        &out6(PEER6, &L4::echo(true, true, 0x4242, 1)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::ToPod,
        &in6(PEER6, &L4::echo(true, false, 0x4242, 1)),
        ALLOWED_TRACKED,
    );
    fx.expect(
        Hook::ToPod,
        &in6(PEER6, &L4::echo(true, false, 0x4243, 1)),
        DROPPED_NO_RULE,
    );
}

#[test]
fn icmp_error_quoting_a_tracked_flow_passes() {
    let mut fx = Fx::new("icmperr", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_UDP, 53);
    let router4 = WORLD4;
    let router6 = WORLD6;
    let q4 = out4(PEER4, &L4::udp(33333, 53));
    fx.expect(Hook::FromPod, &q4, ALLOWED_POLICY);
    fx.expect(
        Hook::ToPod,
        &in4(router4, &L4::unreachable(false, &q4[L3..])),
        ALLOWED_TRACKED,
    );
    // Quoting a flow nobody opened: judged as plain ICMP, and nothing allows it.
    let other = out4(PEER4, &L4::udp(33334, 53));
    fx.expect(
        Hook::ToPod,
        &in4(router4, &L4::unreachable(false, &other[L3..])),
        DROPPED_NO_RULE,
    );

    let q6 = out6(PEER6, &L4::udp(33333, 53));
    fx.expect(Hook::FromPod, &q6, ALLOWED_POLICY);
    fx.expect(
        Hook::ToPod,
        &in6(router6, &L4::unreachable(true, &q6[L3..])),
        ALLOWED_TRACKED,
    );
    let other = out6(PEER6, &L4::udp(33334, 53));
    fx.expect(
        Hook::ToPod,
        &in6(router6, &L4::unreachable(true, &other[L3..])),
        DROPPED_NO_RULE,
    );
}

#[test]
fn icmp_error_quoting_a_reply_of_an_accepted_flow_passes() {
    let mut fx = Fx::new("icmperr-reply", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_INGRESS, PROTO_TCP, 80);
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::tcp(40000, 80, TCP_SYN)),
        ALLOWED_POLICY,
    );
    let reply = out4(PEER4, &L4::tcp(80, 40000, TCP_SYN | TCP_ACK));
    fx.expect(Hook::FromPod, &reply, ALLOWED_TRACKED);
    // A router on the way back: fragmentation needed, quoting the pod's reply.
    let mut err = L4::unreachable(false, &reply[L3..]);
    if let L4::Icmp { code, rest, .. } = &mut err {
        *code = 4;
        *rest = [0, 0, 0x05, 0x00];
    }
    fx.expect(Hook::ToPod, &in4(WORLD4, &err), ALLOWED_TRACKED);
}

#[test]
fn mid_stream_ack_is_adopted_by_default_and_dropped_when_revoking() {
    let mut fx = Fx::new("keep", Some(ISOLATED), 0);
    let ack = out4(PEER4, &L4::tcp(40000, 5432, TCP_ACK | TCP_PSH));
    fx.expect(Hook::FromPod, &ack, ALLOWED_TRACKED);
    // The adopted flow's replies pass too.
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::tcp(5432, 40000, TCP_ACK)),
        ALLOWED_TRACKED,
    );
    // A SYN is never adopted.
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::tcp(40001, 5432, TCP_SYN)),
        DROPPED_NO_RULE,
    );

    fx.maps
        .set_config(Config {
            flags: CFG_REVOKE_UNTRACKED,
            events_per_sec: 1000,
            ..Default::default()
        })
        .unwrap();
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::tcp(40002, 5432, TCP_ACK | TCP_PSH)),
        DROPPED_NO_RULE,
    );
    fx.expect(
        Hook::ToPod,
        &in6(PEER6, &L4::tcp(5432, 40002, TCP_ACK)),
        DROPPED_NO_RULE,
    );
}

// ---------------------------------------------------------------------------------------
// Header shapes: options, extension headers, fragments, control, malformed
// ---------------------------------------------------------------------------------------

#[test]
fn ipv6_extension_headers_are_skipped_to_the_ports() {
    let mut fx = Fx::new("ext6", Some(ISOLATED), 0);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_TCP, 80);
    let exts = [
        Ext::options(IPV6_HOP_BY_HOP, 0),
        Ext::options(IPV6_DEST_OPTS, 1),
    ];
    let f = |dport| frame_v6(POD6, PEER6, &exts, &L4::tcp(40000, dport, TCP_SYN));
    fx.expect(Hook::FromPod, &f(80), ALLOWED_POLICY);
    fx.expect(Hook::FromPod, &f(81), DROPPED_NO_RULE);
    // If the options were taken for TCP, the "port" would be the PadN bytes.
    let exts = [
        Ext::options(IPV6_HOP_BY_HOP, 1),
        Ext::options(IPV6_ROUTING, 0),
        Ext {
            kind: IPV6_AUTH,
            body: vec![0; 10],
        },
        Ext::options(IPV6_DEST_OPTS, 2),
    ];
    fx.expect(
        Hook::FromPod,
        &frame_v6(POD6, PEER6, &exts, &L4::tcp(40001, 80, TCP_SYN)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::FromPod,
        &frame_v6(POD6, PEER6, &exts, &L4::tcp(40001, 82, TCP_SYN)),
        DROPPED_NO_RULE,
    );
}

#[test]
fn ipv4_options_are_skipped_to_the_ports() {
    let mut fx = Fx::new("opt4", Some(ISOLATED), 0);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_TCP, 80);
    for n in [4usize, 8, 40] {
        // Router alert then NOPs; an option byte pattern that would read as port 0x9404.
        let mut options = vec![0x94, 0x04, 0, 0];
        options.resize(n, 1);
        let o = V4Opts {
            options,
            ..Default::default()
        };
        let sport = 40000 + n as u16;
        fx.expect(
            Hook::FromPod,
            &frame_v4(POD4, PEER4, &L4::tcp(sport, 80, TCP_SYN), &o),
            ALLOWED_POLICY,
        );
        fx.expect(
            Hook::FromPod,
            &frame_v4(POD4, PEER4, &L4::tcp(sport, 81, TCP_SYN), &o),
            DROPPED_NO_RULE,
        );
    }
}

#[test]
fn later_fragments_follow_the_verdict_of_their_first_fragment() {
    let mut fx = Fx::new("frag", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_UDP, 53);
    let chunk = L4::Raw {
        proto: PROTO_UDP,
        bytes: vec![0xab; 64],
    };
    let v4f = |dport: u16, id: u16, first: bool| {
        if first {
            let o = V4Opts {
                id,
                more_fragments: true,
                ..Default::default()
            };
            frame_v4(POD4, PEER4, &L4::udp(33333, dport), &o)
        } else {
            let o = V4Opts {
                id,
                frag_offset: 2,
                ..Default::default()
            };
            frame_v4(POD4, PEER4, &chunk, &o)
        }
    };
    fx.expect(Hook::FromPod, &v4f(53, 0x1234, true), ALLOWED_POLICY);
    fx.expect(Hook::FromPod, &v4f(53, 0x1234, false), ALLOWED_TRACKED);
    // Another datagram's later fragment, without its first: dropped.
    fx.expect(Hook::FromPod, &v4f(53, 0x1235, false), DROPPED_FRAGMENT);
    // A denied first fragment does not open the way for its later fragments.
    fx.expect(Hook::FromPod, &v4f(54, 0x2000, true), DROPPED_NO_RULE);
    fx.expect(Hook::FromPod, &v4f(54, 0x2000, false), DROPPED_FRAGMENT);

    let v6f = |dport: u16, id: u32, first: bool| {
        if first {
            frame_v6(
                POD6,
                PEER6,
                &[Ext::fragment(0, true, id)],
                &L4::udp(33333, dport),
            )
        } else {
            frame_v6(POD6, PEER6, &[Ext::fragment(2, false, id)], &chunk)
        }
    };
    fx.expect(Hook::FromPod, &v6f(53, 0xdead_beef, true), ALLOWED_POLICY);
    fx.expect(Hook::FromPod, &v6f(53, 0xdead_beef, false), ALLOWED_TRACKED);
    fx.expect(
        Hook::FromPod,
        &v6f(53, 0xdead_bee0, false),
        DROPPED_FRAGMENT,
    );
    fx.expect(Hook::FromPod, &v6f(54, 7, true), DROPPED_NO_RULE);
    fx.expect(Hook::FromPod, &v6f(54, 7, false), DROPPED_FRAGMENT);
    // Not isolated: fragments are not judged.
    let mut open = Fx::new("frag-open", Some(0), 0);
    open.expect(Hook::FromPod, &v4f(54, 0x3000, false), ALLOWED_NOT_ISOLATED);
}

#[test]
fn ipv6_later_fragment_with_dest_options_in_the_fragmentable_part_follows_its_first() {
    let mut fx = Fx::new("frag-dopt", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_UDP, 53);
    // First fragment: Fragment(next=DestOpts) DestOpts(next=UDP) UDP...
    let first = frame_v6(
        POD6,
        PEER6,
        &[Ext::fragment(0, true, 99), Ext::options(IPV6_DEST_OPTS, 0)],
        &L4::udp(33333, 53),
    );
    fx.expect(Hook::FromPod, &first, ALLOWED_POLICY);
    // Later fragment: Fragment(next=DestOpts) then data (the destination options were in
    // the first fragment only).
    let mut later = frame_v6(
        POD6,
        PEER6,
        &[Ext::fragment(2, false, 99)],
        &L4::Raw {
            proto: PROTO_UDP,
            bytes: vec![0xab; 64],
        },
    );
    // Fragment header's next-header byte: the first fragment's (DestOpts).
    later[L3 + 40] = IPV6_DEST_OPTS;
    fx.expect(Hook::FromPod, &later, ALLOWED_TRACKED);
}

#[test]
fn arp_and_neighbour_discovery_pass_an_isolated_pod_but_unknown_ethertypes_do_not() {
    let mut fx = Fx::new("control", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    for hook in Hook::ALL {
        fx.expect_uncounted_pass(hook, &arp_request(POD4, PEER4));
        let sol = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0x20);
        let ns = frame(v6(POD6), v6(sol), &L4::neighbour_solicitation(PEER6));
        fx.expect_uncounted_pass(hook, &ns);
        fx.expect(hook, &ether(0x88b5, &[0x5a; 46]), DROPPED_NO_RULE);
        // An 802.1Q tag is not looked through: a tagged IP packet is another ethertype.
        let ip = out4(PEER4, &L4::udp(1, 2));
        let mut tagged = ip[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        tagged.extend_from_slice(&ip[12..]);
        fx.expect(hook, &tagged, DROPPED_NO_RULE);
    }
}

/// Frames that are broken in one way each; the unbroken frame would be allowed.
fn malformed_frames() -> Vec<(&'static str, Vec<u8>)> {
    let syn4 = out4(PEER4, &L4::tcp(40000, 80, TCP_SYN));
    let syn6 = out6(PEER6, &L4::tcp(40000, 80, TCP_SYN));
    let udp4 = out4(PEER4, &L4::udp(40000, 80));
    let sctp6 = out6(PEER6, &L4::sctp(40000, 80));
    let mut v = Vec::new();
    // BPF_PROG_TEST_RUN refuses frames shorter than the fixed IPv4 (20 bytes) or IPv6
    // (40 bytes) header, so truncation is tested past the fixed part.
    let mut f = syn4[..L3 + 22].to_vec();
    f[L3] = 0x46;
    f[L3 + 2..L3 + 4].copy_from_slice(&22u16.to_be_bytes());
    v.push(("ipv4 header truncated inside its options", f));
    let mut f = syn4.clone();
    f[L3] = 0x4f;
    v.push(("ipv4 header length beyond total length", f));
    let mut f = syn4.clone();
    f[L3 + 2..L3 + 4].copy_from_slice(&((syn4.len() - L3 + 1) as u16).to_be_bytes());
    v.push(("ipv4 total length beyond frame", f));
    let mut f = syn4.clone();
    f[L3 + 2..L3 + 4].copy_from_slice(&19u16.to_be_bytes());
    v.push(("ipv4 total length below header", f));
    let mut f = syn4.clone();
    f[L3] = 0x44;
    v.push(("ipv4 ihl below 5", f));
    let mut f = syn4.clone();
    f[L3] = 0x55;
    v.push(("bad ip version in ipv4 frame", f));
    let mut f = syn6.clone();
    f[L3] = 0x45;
    v.push(("bad ip version in ipv6 frame", f));
    let mut f = syn4[..L3 + 20 + 10].to_vec();
    f[L3 + 2..L3 + 4].copy_from_slice(&30u16.to_be_bytes());
    v.push(("tcp header truncated (ipv4)", f));
    let mut f = syn6[..L3 + 40 + 8].to_vec();
    f[L3 + 4..L3 + 6].copy_from_slice(&8u16.to_be_bytes());
    v.push(("tcp header truncated (ipv6)", f));
    let mut f = syn4.clone();
    f[L3 + 20 + 12] = 0x40;
    v.push(("tcp data offset below 5", f));
    let mut f = udp4[..L3 + 20 + 6].to_vec();
    f[L3 + 2..L3 + 4].copy_from_slice(&26u16.to_be_bytes());
    v.push(("udp header truncated", f));
    let mut f = sctp6[..L3 + 40 + 10].to_vec();
    f[L3 + 4..L3 + 6].copy_from_slice(&10u16.to_be_bytes());
    v.push(("sctp common header truncated", f));
    let mut f = syn6.clone();
    f[L3 + 4..L3 + 6].copy_from_slice(&((syn6.len() - L3 - 40 + 1) as u16).to_be_bytes());
    v.push(("ipv6 payload length beyond frame", f));
    let exts: Vec<Ext> = (0..7).map(|_| Ext::options(IPV6_DEST_OPTS, 0)).collect();
    v.push((
        "more ipv6 extension headers than followed",
        frame_v6(POD6, PEER6, &exts, &L4::tcp(40000, 80, TCP_SYN)),
    ));
    let mut f = frame_v6(
        POD6,
        PEER6,
        &[Ext::options(IPV6_HOP_BY_HOP, 3)],
        &L4::tcp(40000, 80, TCP_SYN),
    );
    f.truncate(L3 + 40 + 10);
    f[L3 + 4..L3 + 6].copy_from_slice(&10u16.to_be_bytes());
    v.push(("ipv6 extension header truncated", f));
    let q = out4(PEER4, &L4::udp(1, 2));
    let mut quoted = q[L3..L3 + 20].to_vec();
    quoted[0] = 0x65;
    v.push((
        "icmp error quoting a non-ipv4 packet",
        out4(PEER4, &L4::unreachable(false, &quoted)),
    ));
    v.push((
        "icmp error quote truncated",
        out4(PEER4, &L4::unreachable(false, &q[L3..L3 + 22])),
    ));
    let mut f = out4(PEER4, &L4::echo(false, true, 1, 1));
    f.truncate(L3 + 20 + 6);
    f[L3 + 2..L3 + 4].copy_from_slice(&26u16.to_be_bytes());
    v.push(("icmp header truncated", f));
    v
}

#[test]
fn malformed_packets_are_dropped_for_an_isolated_pod() {
    let mut fx = Fx::new("malformed", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_ANY_PROTO, PEER_ID, DIR_EGRESS, 0, 0);
    // The intact frames pass: what drops the broken ones is the breakage.
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::tcp(40000, 80, TCP_SYN)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::FromPod,
        &out6(PEER6, &L4::tcp(40000, 80, TCP_SYN)),
        ALLOWED_POLICY,
    );
    fx.forget_flows();
    let mut wrong = Vec::new();
    for (what, f) in malformed_frames() {
        let got = fx.run(Hook::FromPod, &f);
        if got != (TC_ACT_SHOT, Some(DROPPED_MALFORMED)) {
            wrong.push(format!("{what}: got {got:?} for {}", hex(&f)));
        }
    }
    assert!(
        wrong.is_empty(),
        "not dropped as malformed:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn malformed_packets_pass_for_a_pod_that_is_not_isolated() {
    let mut fx = Fx::new("malformed-open", Some(0), 0);
    for (what, f) in malformed_frames() {
        let got = fx.run(Hook::FromPod, &f);
        assert_eq!(got, (TC_ACT_OK, Some(ALLOWED_NOT_ISOLATED)), "{what}");
    }
}

#[test]
fn tcp_header_shorter_than_its_data_offset_is_malformed() {
    let mut fx = Fx::new("tcpshort", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_ANY_PROTO, PEER_ID, DIR_EGRESS, 0, 0);
    let syn = out4(PEER4, &L4::tcp(40000, 80, TCP_SYN));
    for tcp_len in 14..20usize {
        let mut f = syn[..L3 + 20 + tcp_len].to_vec();
        f[L3 + 2..L3 + 4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        fx.expect(Hook::FromPod, &f, DROPPED_MALFORMED);
    }
}

#[test]
fn l4_header_outside_the_ip_datagram_is_malformed() {
    let mut fx = Fx::new("padding", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_ANY_PROTO, PEER_ID, DIR_EGRESS, 0, 0);
    let mut f = out4(PEER4, &L4::tcp(40000, 80, TCP_SYN));
    // The IPv4 datagram is just its header; the TCP header sits in trailing bytes.
    f[L3 + 2..L3 + 4].copy_from_slice(&20u16.to_be_bytes());
    fx.expect(Hook::FromPod, &f, DROPPED_MALFORMED);
    let mut f = out6(PEER6, &L4::udp(40000, 80));
    f[L3 + 4..L3 + 6].copy_from_slice(&0u16.to_be_bytes());
    fx.expect(Hook::FromPod, &f, DROPPED_MALFORMED);
}

#[test]
fn icmpv6_inside_ipv4_is_not_neighbour_discovery() {
    let mut fx = Fx::new("nd-in-v4", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    // An ICMPv6 neighbour solicitation body carried as IPv4 protocol 58, to the world.
    let ns = L4::neighbour_solicitation(PEER6);
    let raw = L4::Raw {
        proto: PROTO_ICMPV6,
        bytes: ns.bytes(),
    };
    fx.expect(Hook::FromPod, &out4(WORLD4, &raw), DROPPED_NO_RULE);
    fx.expect(Hook::ToPod, &in4(WORLD4, &raw), DROPPED_NO_RULE);
}

#[test]
fn ipv6_later_fragment_cannot_pose_as_a_first_fragment() {
    let mut fx = Fx::new("frag-pose", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_TCP, 80);
    // Fragment(offset 3, next=DestOpts), then data that reads as DestOpts(next=Fragment),
    // Fragment(offset 0, next=TCP) and a TCP SYN to the allowed port.
    let mut data = vec![IPV6_FRAGMENT, 0, 1, 4, 0, 0, 0, 0];
    data.extend_from_slice(&[PROTO_TCP, 0, 0, 0, 0, 0, 0, 0x42]);
    data.extend_from_slice(&L4::tcp(40000, 80, TCP_SYN).bytes());
    let mut f = frame_v6(
        POD6,
        PEER6,
        &[Ext::fragment(3, true, 7)],
        &L4::Raw {
            proto: IPV6_DEST_OPTS,
            bytes: data,
        },
    );
    // Sanity: the real fragment header says offset 3.
    assert_eq!(u16::from_be_bytes([f[L3 + 42], f[L3 + 43]]) >> 3, 3);
    f[L3 + 40] = IPV6_DEST_OPTS;
    fx.expect(Hook::FromPod, &f, DROPPED_FRAGMENT);
}

// ---------------------------------------------------------------------------------------
// Randomized: the programs against an independent parser
// ---------------------------------------------------------------------------------------

#[path = "bpf_verdicts/oracle.rs"]
mod oracle;

#[test]
fn random_frames_match_an_independent_parser() {
    oracle::run();
}

#[path = "bpf_verdicts/identity_split.rs"]
mod identity_split;

#[test]
fn split_identity_maps_judge_random_identity_sets_like_one_longest_prefix_table() {
    identity_split::run();
}

#[path = "bpf_verdicts/policy_split.rs"]
mod policy_split;

#[test]
fn split_policy_maps_judge_random_entry_sets_like_one_trie_of_every_entry() {
    policy_split::run();
}

// ---------------------------------------------------------------------------------------
// Conntrack lifetime: dead entries, garbage collection, a full map
// ---------------------------------------------------------------------------------------

/// The conntrack key of a flow the pod opened towards `peer` (its egress check tracks it).
fn opened4(peer: Ipv4Addr, proto: u8, sport: u16, dport: u16) -> CtKey {
    let (mut saddr, mut daddr) = ([0u8; 16], [0u8; 16]);
    saddr[..4].copy_from_slice(&POD4.octets());
    daddr[..4].copy_from_slice(&peer.octets());
    CtKey {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        family: 4,
        dir: DIR_EGRESS,
        _pad: 0,
        slot: SLOT,
    }
}

/// Makes a tracked flow's last packet `ago` old, as if it had been idle that long.
fn idle(fx: &mut Fx, key: &CtKey, ago: Duration) {
    let mut v = fx.maps.conntrack.get(key, 0).expect("flow is tracked");
    v.last_seen_ns = monotonic_now_ns().saturating_sub(ago.as_nanos() as u64);
    fx.maps.conntrack.insert(key, v, 0).unwrap();
}

fn tracked(fx: &Fx, key: &CtKey) -> bool {
    fx.maps.conntrack.get(key, 0).is_ok()
}

const UDP_TIMEOUT: Duration = Duration::from_secs(CT_DEFAULT_UDP_TIMEOUT_S as u64);
const TCP_TIMEOUT: Duration = Duration::from_secs(CT_DEFAULT_TCP_TIMEOUT_S as u64);
const SEC: Duration = Duration::from_secs(1);

#[test]
fn dead_conntrack_entries_count_as_absent_and_gc_removes_only_them() {
    let mut fx = Fx::new("ctgc", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_UDP, 53);
    fx.allow(POLICY_PREFIX_ANY_PORT, PEER_ID, DIR_EGRESS, PROTO_ICMP, 0);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_TCP, 443);
    let live = opened4(PEER4, PROTO_UDP, 1000, 53);
    let dead_udp = opened4(PEER4, PROTO_UDP, 1001, 53);
    let dead_echo = opened4(PEER4, PROTO_ICMP, 7, 7);
    let dead_tcp = opened4(PEER4, PROTO_TCP, 40000, 443);
    let just_dead = opened4(PEER4, PROTO_UDP, 1002, 53);
    for sport in [1000, 1001, 1002] {
        fx.expect(
            Hook::FromPod,
            &out4(PEER4, &L4::udp(sport, 53)),
            ALLOWED_POLICY,
        );
    }
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::echo(false, true, 7, 1)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::tcp(40000, 443, TCP_SYN)),
        ALLOWED_POLICY,
    );
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::tcp(443, 40000, TCP_SYN | TCP_ACK)),
        ALLOWED_TRACKED,
    );
    idle(&mut fx, &dead_udp, UDP_TIMEOUT + GC_GRACE + SEC);
    idle(&mut fx, &dead_echo, UDP_TIMEOUT + GC_GRACE + SEC);
    idle(&mut fx, &dead_tcp, TCP_TIMEOUT + GC_GRACE + SEC);
    // Dead, but for less than the grace: the collector leaves it for next time.
    idle(&mut fx, &just_dead, UDP_TIMEOUT + SEC);

    // What replies get, with the dead entries still in the map and after collecting them:
    // the same, because the programs treat a dead entry as absent.
    let replies: [(Vec<u8>, &str); 5] = [
        (in4(PEER4, &L4::udp(53, 1000)), ALLOWED_TRACKED),
        (in4(PEER4, &L4::udp(53, 1001)), DROPPED_NO_RULE),
        (in4(PEER4, &L4::udp(53, 1002)), DROPPED_NO_RULE),
        (in4(PEER4, &L4::echo(false, false, 7, 1)), DROPPED_NO_RULE),
        (
            in4(PEER4, &L4::tcp(443, 40000, TCP_ACK | TCP_PSH)),
            DROPPED_NO_RULE,
        ),
    ];
    for (frame, reason) in &replies {
        fx.expect(Hook::ToPod, frame, reason);
    }
    let stats = fx.maps.gc_conntrack(monotonic_now_ns()).unwrap();
    assert_eq!((stats.deleted, stats.restored), (3, 0), "{stats:?}");
    assert!(stats.scanned >= 5, "{stats:?}");
    for key in [&dead_udp, &dead_echo, &dead_tcp] {
        assert!(!tracked(&fx, key), "dead {key:?} was not collected");
    }
    assert!(tracked(&fx, &live), "a live flow was collected");
    assert!(tracked(&fx, &just_dead), "collected within the grace");
    for (frame, reason) in &replies {
        fx.expect(Hook::ToPod, frame, reason);
    }
    // A second pass finds nothing more to do.
    let again = fx.maps.gc_conntrack(monotonic_now_ns()).unwrap();
    assert_eq!((again.deleted, again.restored), (0, 0), "{again:?}");
}

#[test]
fn gc_puts_back_an_entry_a_packet_refreshed_between_scan_and_delete() {
    let mut fx = Fx::new("ctgcrace", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_UDP, 53);
    let key = opened4(PEER4, PROTO_UDP, 2000, 53);
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::udp(2000, 53)),
        ALLOWED_POLICY,
    );
    idle(&mut fx, &key, UDP_TIMEOUT + GC_GRACE + SEC);
    let now = monotonic_now_ns();
    let (dead, _) = fx.maps.conntrack_dead(now).unwrap();
    assert_eq!(dead, vec![key]);

    // The flow wakes up between the scan and the delete: the program finds the dead entry,
    // judges the packet as new (allowed by policy) and tracks the flow afresh.
    fx.expect(
        Hook::FromPod,
        &out4(PEER4, &L4::udp(2000, 53)),
        ALLOWED_POLICY,
    );
    let stats = fx.maps.conntrack_collect(&dead, now).unwrap();
    assert_eq!((stats.deleted, stats.restored), (0, 1), "{stats:?}");
    assert!(tracked(&fx, &key));
    fx.expect(
        Hook::ToPod,
        &in4(PEER4, &L4::udp(53, 2000)),
        ALLOWED_TRACKED,
    );
}

#[test]
fn a_stale_first_fragment_vouches_for_nothing_and_gc_removes_it() {
    let mut fx = Fx::new("fraggc", Some(ISOLATED), CFG_REVOKE_UNTRACKED);
    fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_UDP, 53);
    // Each datagram from its own port, so the second is judged by policy too.
    let first = |id: u16| {
        let o = V4Opts {
            id,
            more_fragments: true,
            ..Default::default()
        };
        frame_v4(POD4, PEER4, &L4::udp(30_000 + id, 53), &o)
    };
    let later = |id| {
        let o = V4Opts {
            id,
            frag_offset: 2,
            ..Default::default()
        };
        let chunk = L4::Raw {
            proto: PROTO_UDP,
            bytes: vec![0xab; 64],
        };
        frame_v4(POD4, PEER4, &chunk, &o)
    };
    fx.expect(Hook::FromPod, &first(0x51), ALLOWED_POLICY);
    fx.expect(Hook::FromPod, &first(0x52), ALLOWED_POLICY);
    // The record of 0x51 is older than the kernel's own reassembly timeout (the IPv4 id
    // will wrap around): its later fragments are dropped.
    let old = fx.frags.keys().filter_map(Result::ok).collect::<Vec<_>>();
    assert_eq!(old.len(), 2);
    let stale = old.iter().find(|k| k.id == 0x51).copied().unwrap();
    let when =
        monotonic_now_ns() - FRAGMENT_TIMEOUT_NS - GC_GRACE.as_nanos() as u64 - 1_000_000_000;
    fx.frags.insert(stale, when, 0).unwrap();
    fx.expect(Hook::FromPod, &later(0x51), DROPPED_FRAGMENT);
    fx.expect(Hook::FromPod, &later(0x52), ALLOWED_TRACKED);
    let stats = fx.maps.gc_conntrack(monotonic_now_ns()).unwrap();
    assert_eq!(stats.deleted, 1, "{stats:?}");
    let left: Vec<u32> = fx
        .frags
        .keys()
        .filter_map(Result::ok)
        .map(|k| k.id)
        .collect();
    assert_eq!(left, vec![0x52]);
    fx.expect(Hook::FromPod, &later(0x52), ALLOWED_TRACKED);
}

#[test]
fn a_full_conntrack_map_never_opens_traffic() {
    // 64 entries for 1,000 flows: the LRU map evicts; nothing may pass because of it.
    const ENTRIES: u32 = 64;
    for cfg in [CFG_REVOKE_UNTRACKED, 0] {
        let mut fx = Fx::with_conntrack("ctfull", Some(ISOLATED), cfg, ENTRIES);
        fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_UDP, 53);
        fx.allow(POLICY_PREFIX_FULL, PEER_ID, DIR_EGRESS, PROTO_TCP, 443);
        // Every new allowed flow is still tracked (eviction makes room; never
        // `dropped-conntrack-full` with an LRU map).
        for i in 0..500u16 {
            fx.expect(
                Hook::FromPod,
                &out4(PEER4, &L4::udp(10_000 + i, 53)),
                ALLOWED_POLICY,
            );
            fx.expect(
                Hook::FromPod,
                &out4(PEER4, &L4::tcp(20_000 + i, 443, TCP_SYN)),
                ALLOWED_POLICY,
            );
        }
        let entries = fx.maps.conntrack.keys().filter_map(Result::ok).count();
        assert!(entries <= ENTRIES as usize, "{entries} entries");
        // A reply passes exactly when its flow is still tracked; an evicted flow's reply is
        // dropped like any packet nothing allows. A SYN-ACK is never adopted mid-stream.
        let (mut passed, mut dropped) = (0, 0);
        for i in 0..500u16 {
            for (key, frame) in [
                (
                    opened4(PEER4, PROTO_UDP, 10_000 + i, 53),
                    in4(PEER4, &L4::udp(53, 10_000 + i)),
                ),
                (
                    opened4(PEER4, PROTO_TCP, 20_000 + i, 443),
                    in4(PEER4, &L4::tcp(443, 20_000 + i, TCP_SYN | TCP_ACK)),
                ),
            ] {
                let want = if tracked(&fx, &key) {
                    passed += 1;
                    ALLOWED_TRACKED
                } else {
                    dropped += 1;
                    DROPPED_NO_RULE
                };
                fx.expect(Hook::ToPod, &frame, want);
            }
        }
        assert!(
            passed <= ENTRIES && dropped >= 1000 - ENTRIES,
            "{passed} passed"
        );
        // The most recent flow survived eviction.
        assert!(tracked(&fx, &opened4(PEER4, PROTO_TCP, 20_499, 443)));
        // New connections from the peer, and packets of flows never opened, stay dropped.
        fx.expect(
            Hook::ToPod,
            &in4(PEER4, &L4::tcp(5555, 22, TCP_SYN)),
            DROPPED_NO_RULE,
        );
        fx.expect(
            Hook::ToPod,
            &in4(PEER4, &L4::udp(5555, 22)),
            DROPPED_NO_RULE,
        );
        fx.expect(
            Hook::FromPod,
            &out4(PEER4, &L4::udp(5555, 54)),
            DROPPED_NO_RULE,
        );
        // A mid-stream TCP packet of an evicted flow: dropped when revoking; adopted by
        // the keep-open-connections rule otherwise, exactly as for a connection that was
        // open before the pod was isolated (it opens no new connection: the pod's stack
        // answers an unknown connection with a reset).
        let evicted = (0..500u16)
            .find(|i| !tracked(&fx, &opened4(PEER4, PROTO_TCP, 20_000 + i, 443)))
            .expect("some flow was evicted");
        let ack = in4(PEER4, &L4::tcp(443, 20_000 + evicted, TCP_ACK | TCP_PSH));
        let want = if cfg == 0 {
            ALLOWED_TRACKED
        } else {
            DROPPED_NO_RULE
        };
        fx.expect(Hook::ToPod, &ack, want);
    }
}
