//! Tier 3 for issue #7: egress through Services beside kube-proxy. Two simulated nodes
//! (routed CNI, joined by an underlay), kube-proxy's rules written into node A's namespace
//! the way kube-proxy writes them (iptables: KUBE-SERVICES → KUBE-SVC-* with
//! `-m statistic --mode random` → KUBE-SEP-* DNAT; nftables: a service verdict map and
//! `numgen random` DNAT), the real programs on the pods' veths and on node A's uplink.
//! The client may egress only to app=db on TCP 5432 (the Services' targetPort; their port
//! is 80): a connection to a ClusterIP succeeds exactly when kube-proxy picked a db backend.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipnetwork::IpNetwork;
use palisade::dataplane::{program_services, read_counters, Dataplane, LoadOptions, Maps};
use palisade_common::{
    Config, Endpoint, IdentityValue, PolicyKey, SvcConfig, DIR_EGRESS, DIR_INGRESS,
    EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, POLICY_PREFIX_FULL, PROTO_TCP, SVC_DEFAULT_MARK_MASK,
};
use palisade_tests::kube_proxy::{install_iptables_ports, install_nftables, ServicePort};
use palisade_tests::netns::NetNs;
use palisade_tests::pins::PinDir;
use palisade_tests::{require_root, tcp_connect, Family, Node, ProbeError, Proto, Server};

const T: Duration = Duration::from_millis(700);
const SVC_PORT: u16 = 80;
const TARGET_PORT: u16 = 5432;
const SERVICE_CIDR: &str = "198.19.128.0/24";
const CLIENT_SLOT: u32 = 1;
const DB1_SLOT: u32 = 2;
const WEB1_SLOT: u32 = 3;
const CLIENT_ID: u32 = 10;
const DB_ID: u32 = 20;
const WEB_ID: u32 = 30;

#[derive(Clone, Copy)]
enum Mode {
    Iptables,
    Nftables,
}

fn cip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 128, n)
}

/// kube-proxy's rules for `services` (ClusterIP, backends) in `ns`, in `mode`: TCP on
/// [`SVC_PORT`], every backend on [`TARGET_PORT`].
fn kube_proxy_rules(ns: &NetNs, mode: Mode, services: &[(Ipv4Addr, Vec<Ipv4Addr>)]) {
    let ports: Vec<ServicePort> = services
        .iter()
        .map(|(vip, eps)| ServicePort {
            cluster_ip: (*vip).into(),
            proto: Proto::Tcp,
            port: SVC_PORT,
            endpoints: eps
                .iter()
                .map(|ep| SocketAddr::new((*ep).into(), TARGET_PORT))
                .collect(),
        })
        .collect();
    match mode {
        Mode::Iptables => install_iptables_ports(ns, &ports),
        Mode::Nftables => install_nftables(ns, &ports),
    }
    .unwrap();
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    }
}

fn egress_drops(maps: &Maps) -> u64 {
    read_counters(maps, Some(&[CLIENT_SLOT]))
        .unwrap()
        .iter()
        .filter(|r| r.drop && r.direction == "egress")
        .map(|r| r.packets)
        .sum()
}

fn scenario(mode: Mode, tag: &str) {
    require_root();
    let pins = PinDir::new(tag);
    let a = Node::routed(&format!("{tag}a")).unwrap();
    let b = Node::routed(&format!("{tag}b")).unwrap();
    let underlay = a.join(&b).unwrap();
    let client = a.add_pod("x/client").unwrap();
    let db1 = a.add_pod("x/db1").unwrap();
    let web1 = a.add_pod("x/web1").unwrap();
    let db2 = b.add_pod("x/db2").unwrap();
    let _s1 = Server::tcp(db1.ns(), TARGET_PORT, "x/db1").unwrap();
    let web_srv = Server::tcp(web1.ns(), TARGET_PORT, "x/web1").unwrap();
    let _s2 = Server::tcp(db2.ns(), TARGET_PORT, "x/db2").unwrap();
    let (d1, w1, d2) = (
        v4(db1.ip(Family::V4)),
        v4(web1.ip(Family::V4)),
        v4(db2.ip(Family::V4)),
    );
    let services = vec![
        (cip(10), vec![d1]),     // local db backend
        (cip(11), vec![d2]),     // remote db backend
        (cip(12), vec![w1]),     // local web backend
        (cip(13), vec![d1, w1]), // one allowed, one denied (local)
        (cip(14), vec![d2, w1]), // one allowed (remote), one denied
    ];
    kube_proxy_rules(a.ns(), mode, &services);
    let connect = |vip: Ipv4Addr| tcp_connect(client.ns(), IpAddr::V4(vip), SVC_PORT, T);
    // kube-proxy's rules work before Palisade is there.
    assert_eq!(connect(cip(12)).as_deref(), Ok("x/web1"));

    let mut dp = Dataplane::load(pins.layout(), &LoadOptions::default()).unwrap();
    let mut maps = dp.maps().unwrap();
    maps.set_config(Config {
        events_per_sec: 1000,
        ..Default::default()
    })
    .unwrap();
    for (pod, slot, flags) in [
        (
            &client,
            CLIENT_SLOT,
            EP_ISOLATED_EGRESS | EP_ISOLATED_INGRESS,
        ),
        (&db1, DB1_SLOT, EP_ISOLATED_INGRESS),
        (&web1, WEB1_SLOT, 0),
    ] {
        maps.reset_counters(slot).unwrap();
        maps.set_endpoint(pod.host_ifindex(), Endpoint { slot, flags })
            .unwrap();
    }
    for (pod, id) in [
        (&client, CLIENT_ID),
        (&db1, DB_ID),
        (&db2, DB_ID),
        (&web1, WEB_ID),
    ] {
        let net = IpNetwork::new(pod.ip(Family::V4), 32).unwrap();
        maps.set_identity(net, IdentityValue { id, flags: 0 })
            .unwrap();
    }
    let egress_db = PolicyKey::new(CLIENT_SLOT, DB_ID, DIR_EGRESS, PROTO_TCP, TARGET_PORT);
    maps.insert_policy(POLICY_PREFIX_FULL, egress_db).unwrap();
    // db1's ingress is isolated too: ingress policy keeps working through the Service.
    maps.insert_policy(
        POLICY_PREFIX_FULL,
        PolicyKey::new(DB1_SLOT, CLIENT_ID, DIR_INGRESS, PROTO_TCP, TARGET_PORT),
    )
    .unwrap();
    let svc = SvcConfig::new(SVC_DEFAULT_MARK_MASK).unwrap();
    program_services(&pins.layout(), svc, &[SERVICE_CIDR.parse().unwrap()]).unwrap();
    let ifs = [
        client.host_ifindex(),
        db1.host_ifindex(),
        web1.host_ifindex(),
    ];
    let ul = underlay.ifname().to_string();
    a.ns()
        .run(|| -> Result<(), palisade::dataplane::DataplaneError> {
            for i in ifs {
                dp.attach(i)?;
            }
            dp.attach_uplink(&ul)
        })
        .unwrap();

    // Single-backend Services: each backend forced in turn; replies come back un-DNATed.
    assert_eq!(connect(cip(10)).as_deref(), Ok("x/db1"), "local db backend");
    assert_eq!(
        connect(cip(11)).as_deref(),
        Ok("x/db2"),
        "remote db backend"
    );
    let drops = egress_drops(&maps);
    assert_eq!(connect(cip(12)), Err(ProbeError::Timeout), "web backend");
    assert!(
        egress_drops(&maps) > drops,
        "counted on the client's egress"
    );
    // Straight to the pods, no Service: the same verdicts.
    assert_eq!(
        tcp_connect(client.ns(), db1.ip(Family::V4), TARGET_PORT, T).as_deref(),
        Ok("x/db1")
    );

    // Two-backend Services: every success landed on the db backend, never on web.
    for (vip, allowed) in [(cip(13), "x/db1"), (cip(14), "x/db2")] {
        let web_hits = web_srv.hits();
        let (mut ok, mut blocked) = (0, 0);
        for _ in 0..24 {
            match connect(vip) {
                Ok(who) => {
                    assert_eq!(who, allowed, "{vip}: a success on the denied backend");
                    ok += 1;
                }
                Err(ProbeError::Timeout) => blocked += 1,
                Err(e) => panic!("{vip}: {e:?}"),
            }
        }
        assert!(
            ok > 0 && blocked > 0,
            "{vip}: {ok} through, {blocked} blocked"
        );
        assert_eq!(
            web_srv.hits(),
            web_hits,
            "{vip}: the web backend saw a connection"
        );
    }

    // Without the egress rule the db Services are blocked too.
    maps.remove_policy(POLICY_PREFIX_FULL, egress_db).unwrap();
    assert_eq!(connect(cip(10)), Err(ProbeError::Timeout));
    assert_eq!(connect(cip(11)), Err(ProbeError::Timeout));
}

#[test]
fn service_egress_follows_the_backend_with_kube_proxy_iptables() {
    scenario(Mode::Iptables, "svcipt");
}

#[test]
fn service_egress_follows_the_backend_with_kube_proxy_nftables() {
    scenario(Mode::Nftables, "svcnft");
}
