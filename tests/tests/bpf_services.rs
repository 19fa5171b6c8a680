//! Tier 2 for issue #7: egress through Services, judged by the real programs through
//! BPF_PROG_TEST_RUN with the skb mark carried between hooks as the kernel would carry it
//! from the pod's interface through kube-proxy's DNAT to the next tc hook.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use palisade::dataplane::testrun::{TC_ACT_OK, TC_ACT_SHOT, TEST_RUN_IFINDEX};
use palisade::dataplane::{
    cleanup, program_services, read_counters, Dataplane, Hook, LoadOptions, Maps,
};
use palisade_common::{
    Config, Endpoint, IdentityValue, PolicyKey, SvcConfig, DIR_EGRESS, DIR_INGRESS,
    EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
    PROTO_TCP, PROTO_UDP, SVC_DEFAULT_MARK_MASK,
};
use palisade_tests::packets::*;
use palisade_tests::pins::PinDir;
use palisade_tests::require_root;

const SLOT: u32 = 3;
const DB_ID: u32 = 40;
const WEB_ID: u32 = 41;
const POD4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const CIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 10);
const DB4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 20);
const WEB4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 30);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 0x10);
const CIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0x80, 0, 0, 0, 0x10);
const DB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 2, 0, 0, 0, 0x20);
/// kube-proxy's masquerade bit: must survive Palisade's marking and clearing.
const KUBE_MASQ: u32 = 0x4000;
const SYN: u8 = 0x02;
const SYNACK: u8 = 0x12;
const ACK: u8 = 0x10;

struct Fx {
    dp: Dataplane,
    maps: Maps,
    svc: SvcConfig,
    _pins: PinDir,
}

impl Fx {
    fn new(name: &str, ep_flags: u32) -> Fx {
        require_root();
        let pins = PinDir::new(name);
        let layout = pins.layout();
        let _ = cleanup(&layout);
        let opts = LoadOptions {
            conntrack_entries: 4096,
            ..Default::default()
        };
        let dp = Dataplane::load(layout.clone(), &opts).expect("load the programs");
        let mut maps = dp.maps().unwrap();
        maps.set_config(Config {
            events_per_sec: 1000,
            ..Default::default()
        })
        .unwrap();
        maps.set_endpoint(
            TEST_RUN_IFINDEX,
            Endpoint {
                slot: SLOT,
                flags: ep_flags,
            },
        )
        .unwrap();
        let svc = SvcConfig::new(SVC_DEFAULT_MARK_MASK).unwrap();
        let cidrs: Vec<IpNetwork> = vec![
            "198.19.128.0/24".parse().unwrap(),
            "fd00:198:18:80::/64".parse().unwrap(),
        ];
        program_services(&layout, svc, &cidrs).unwrap();
        let mut fx = Fx {
            dp,
            maps,
            svc,
            _pins: pins,
        };
        fx.identity("198.18.2.0/24", DB_ID);
        fx.identity("fd00:198:18:2::/64", DB_ID);
        fx.identity("198.18.3.0/24", WEB_ID);
        // Egress to app=db on TCP 5432 and UDP 53, as the compiler writes it.
        fx.allow(DB_ID, DIR_EGRESS, PROTO_TCP, 5432);
        fx.allow(DB_ID, DIR_EGRESS, PROTO_UDP, 53);
        fx
    }

    fn identity(&mut self, net: &str, id: u32) {
        let net: IpNetwork = net.parse().unwrap();
        self.maps
            .set_identity(net, IdentityValue { id, flags: 0 })
            .unwrap();
    }

    fn allow(&mut self, id: u32, dir: u8, proto: u8, port: u16) {
        self.maps
            .insert_policy(
                POLICY_PREFIX_FULL,
                PolicyKey::new(SLOT, id, dir, proto, port),
            )
            .unwrap();
    }

    fn counters(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        read_counters(&self.maps, Some(&[SLOT]))
            .unwrap()
            .into_iter()
            .map(|r| ((r.direction, r.reason), r.packets))
            .collect()
    }

    /// Runs `frame` with `mark` on `hook` (None: the uplink program); returns the verdict,
    /// the mark left, and every counter that moved, with by how much.
    fn run(
        &mut self,
        hook: Option<Hook>,
        frame: &[u8],
        mark: u32,
    ) -> (u32, u32, Vec<(&'static str, &'static str, u64)>) {
        let before = self.counters();
        let r = self.dp.test_run_marked(hook, frame, mark).unwrap();
        let after = self.counters();
        let moved = after
            .iter()
            .filter_map(|(k, &n)| {
                let n0 = before.get(k).copied().unwrap_or(0);
                (n != n0).then_some((k.0, k.1, n - n0))
            })
            .collect();
        (r.verdict, r.mark, moved)
    }

    fn pending(&self) -> u32 {
        self.svc.pending_mark(KUBE_MASQ, SLOT)
    }
}

fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    frame(src, dst, &L4::tcp(sport, dport, flags))
}
fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}
fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

#[test]
fn service_packet_is_marked_at_the_pod_and_judged_on_the_backend_at_the_uplink() {
    let mut fx = Fx::new("svc-uplink", EP_ISOLATED_EGRESS | EP_ISOLATED_INGRESS);
    let pending = fx.pending();
    // From the pod: to the ClusterIP, not judged, marked, uncounted.
    let syn = tcp(v4(POD4), v4(CIP4), 40000, 5432, SYN);
    assert_eq!(
        fx.run(Some(Hook::FromPod), &syn, KUBE_MASQ),
        (TC_ACT_OK, pending, vec![])
    );
    // After DNAT to a db backend: allowed on the uplink, mark bits cleared, kube-proxy's kept.
    let dnat = tcp(v4(POD4), v4(DB4), 40000, 5432, SYN);
    assert_eq!(
        fx.run(None, &dnat, pending),
        (
            TC_ACT_OK,
            KUBE_MASQ,
            vec![("egress", "allowed-by-policy", 1)]
        )
    );
    // The un-DNATed reply reaches the pod as coming from the ClusterIP: a tracked reply.
    let reply = tcp(v4(CIP4), v4(POD4), 5432, 40000, SYNACK);
    assert_eq!(
        fx.run(Some(Hook::ToPod), &reply, 0),
        (TC_ACT_OK, 0, vec![("ingress", "allowed-tracked", 1)])
    );
    // The next packet of the flow is marked again and tracked on the backend's tuple.
    let ack = tcp(v4(POD4), v4(CIP4), 40000, 5432, ACK);
    assert_eq!(fx.run(Some(Hook::FromPod), &ack, KUBE_MASQ).1, pending);
    let ack_dnat = tcp(v4(POD4), v4(DB4), 40000, 5432, ACK);
    assert_eq!(
        fx.run(None, &ack_dnat, pending),
        (TC_ACT_OK, KUBE_MASQ, vec![("egress", "allowed-tracked", 1)])
    );
    // A packet without the mark is none of the uplink's business: passes, uncounted.
    let other = tcp(v4(WEB4), v4(DB4), 1, 2, SYN);
    assert_eq!(
        fx.run(None, &other, KUBE_MASQ),
        (TC_ACT_OK, KUBE_MASQ, vec![])
    );
}

#[test]
fn service_packet_to_a_denied_backend_is_dropped_and_its_replies_too() {
    let mut fx = Fx::new("svc-deny", EP_ISOLATED_EGRESS | EP_ISOLATED_INGRESS);
    let pending = fx.pending();
    let syn = tcp(v4(POD4), v4(CIP4), 40001, 5432, SYN);
    assert_eq!(
        fx.run(Some(Hook::FromPod), &syn, 0).1,
        fx.svc.pending_mark(0, SLOT)
    );
    // kube-proxy picked a web backend: no egress rule for it.
    let dnat = tcp(v4(POD4), v4(WEB4), 40001, 5432, SYN);
    assert_eq!(
        fx.run(None, &dnat, pending),
        (
            TC_ACT_SHOT,
            KUBE_MASQ,
            vec![("egress", "dropped-no-rule", 1)]
        )
    );
    // Nothing was recorded that would let a reply from the ClusterIP in.
    let reply = tcp(v4(CIP4), v4(POD4), 5432, 40001, SYNACK);
    assert_eq!(
        fx.run(Some(Hook::ToPod), &reply, 0),
        (TC_ACT_SHOT, 0, vec![("ingress", "dropped-no-rule", 1)])
    );
    // Same backend, a port the policy does not name: dropped too.
    let wrong_port = tcp(v4(POD4), v4(DB4), 40002, 5433, SYN);
    assert_eq!(fx.run(None, &wrong_port, pending).0, TC_ACT_SHOT);
}

#[test]
fn reused_tuple_is_judged_again_and_a_denial_revokes_the_reply_entry() {
    let mut fx = Fx::new("svc-reuse", EP_ISOLATED_EGRESS | EP_ISOLATED_INGRESS);
    let pending = fx.pending();
    let syn = tcp(v4(POD4), v4(CIP4), 40003, 5432, SYN);
    fx.run(Some(Hook::FromPod), &syn, 0);
    let dnat = tcp(v4(POD4), v4(DB4), 40003, 5432, SYN);
    assert_eq!(fx.run(None, &dnat, pending).0, TC_ACT_OK);
    let reply = tcp(v4(CIP4), v4(POD4), 5432, 40003, SYNACK);
    assert_eq!(fx.run(Some(Hook::ToPod), &reply, 0).0, TC_ACT_OK);
    // The policy goes away; the same tuple opens a new connection.
    fx.maps
        .remove_policy(
            POLICY_PREFIX_FULL,
            PolicyKey::new(SLOT, DB_ID, DIR_EGRESS, PROTO_TCP, 5432),
        )
        .unwrap();
    fx.run(Some(Hook::FromPod), &syn, 0);
    assert_eq!(
        fx.run(None, &dnat, pending),
        (
            TC_ACT_SHOT,
            KUBE_MASQ,
            vec![("egress", "dropped-no-rule", 1)]
        )
    );
    assert_eq!(
        fx.run(Some(Hook::ToPod), &reply, 0),
        (TC_ACT_SHOT, 0, vec![("ingress", "dropped-no-rule", 1)])
    );
}

#[test]
fn local_backend_hook_judges_the_pending_egress_before_its_own_ingress() {
    // The test-run interface is both the client's and the backend's (a hairpin): the
    // to_pod hook judges the client's egress on the translated packet, then the pod's
    // ingress. Ingress is open to the client's own address here.
    let mut fx = Fx::new("svc-local", EP_ISOLATED_EGRESS | EP_ISOLATED_INGRESS);
    fx.identity("198.18.0.10/32", 77);
    fx.maps
        .insert_policy(
            POLICY_PREFIX_ANY_PROTO,
            PolicyKey::new(SLOT, 77, DIR_INGRESS, 0, 0),
        )
        .unwrap();
    let pending = fx.pending();
    let denied = tcp(v4(POD4), v4(POD4), 40004, 5432, SYN);
    assert_eq!(
        fx.run(Some(Hook::ToPod), &denied, pending),
        (
            TC_ACT_SHOT,
            KUBE_MASQ,
            vec![("egress", "dropped-no-rule", 1)]
        ),
        "a denied egress never reaches the ingress check"
    );
    fx.identity("198.18.0.10/32", DB_ID);
    fx.maps
        .insert_policy(
            POLICY_PREFIX_ANY_PROTO,
            PolicyKey::new(SLOT, DB_ID, DIR_INGRESS, 0, 0),
        )
        .unwrap();
    let allowed = tcp(v4(POD4), v4(POD4), 40005, 5432, SYN);
    let (verdict, mark, mut moved) = fx.run(Some(Hook::ToPod), &allowed, pending);
    moved.sort();
    assert_eq!((verdict, mark), (TC_ACT_OK, KUBE_MASQ));
    assert_eq!(
        moved,
        vec![
            ("egress", "allowed-by-policy", 1),
            ("ingress", "allowed-by-policy", 1)
        ]
    );
}

#[test]
fn not_isolated_pods_and_other_destinations_are_not_deferred() {
    let mut fx = Fx::new("svc-open", EP_ISOLATED_INGRESS);
    let syn = tcp(v4(POD4), v4(CIP4), 40006, 5432, SYN);
    assert_eq!(
        fx.run(Some(Hook::FromPod), &syn, 0),
        (TC_ACT_OK, 0, vec![("egress", "allowed-not-isolated", 1)])
    );
    let mut fx = Fx::new("svc-direct", EP_ISOLATED_EGRESS);
    // Straight to a db pod (no Service): judged at the pod as before, unmarked.
    let direct = tcp(v4(POD4), v4(DB4), 40007, 5432, SYN);
    assert_eq!(
        fx.run(Some(Hook::FromPod), &direct, 0),
        (TC_ACT_OK, 0, vec![("egress", "allowed-by-policy", 1)])
    );
    // ICMP to a ClusterIP is not translated by kube-proxy: judged against the ClusterIP.
    let ping = frame(v4(POD4), v4(CIP4), &L4::echo(false, true, 7, 1));
    assert_eq!(
        fx.run(Some(Hook::FromPod), &ping, 0),
        (TC_ACT_SHOT, 0, vec![("egress", "dropped-no-rule", 1)])
    );
}

#[test]
fn ipv6_and_udp_services_are_deferred_too() {
    let mut fx = Fx::new("svc-v6", EP_ISOLATED_EGRESS | EP_ISOLATED_INGRESS);
    let pending = fx.pending();
    let q = frame(v6(POD6), v6(CIP6), &L4::udp(50000, 53));
    assert_eq!(
        fx.run(Some(Hook::FromPod), &q, KUBE_MASQ),
        (TC_ACT_OK, pending, vec![])
    );
    let dnat = frame(v6(POD6), v6(DB6), &L4::udp(50000, 53));
    assert_eq!(
        fx.run(None, &dnat, pending),
        (
            TC_ACT_OK,
            KUBE_MASQ,
            vec![("egress", "allowed-by-policy", 1)]
        )
    );
    let answer = frame(v6(CIP6), v6(POD6), &L4::udp(53, 50000));
    assert_eq!(
        fx.run(Some(Hook::ToPod), &answer, 0),
        (TC_ACT_OK, 0, vec![("ingress", "allowed-tracked", 1)])
    );
}
