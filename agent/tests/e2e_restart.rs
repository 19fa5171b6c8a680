//! `kill -9` of the agent under traffic, and its restart: the real `palisade` binary runs as
//! a subprocess in a node namespace made by the CNI plugins (bridged and routed).
//!
//! While the agent is killed and restarted, an allowed TCP connection (IPv4 and IPv6) keeps
//! exchanging data and a denied client keeps trying TCP and UDP. The test asserts what users
//! see: no denied packet reaches the server (counted on the server's own interface), the
//! allowed connections never break and no packet of theirs is dropped, new allowed
//! connections work after the restart, and the restarted agent adopted the pinned state
//! (same maps, same links with the new programs swapped in, same slots, the drop counter
//! kept counting every denied packet the client sent, including while no agent ran).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use palisade::dataplane::{link_ids, map_ids, read_counters, Hook, Maps};
use palisade_tests::agent::{AgentDirs, AgentProcess};
use palisade_tests::sniff::Sniffer;
use palisade_tests::stream::{echo_once, EchoServer, Sprayer, Stream};
use palisade_tests::{manifests, require_root, udp_probe, wait_until, Family, Flavour, Node};
use palisade_tests::{Pod, Proto, Server};

const BIN: &str = env!("CARGO_BIN_EXE_palisade");
const NODE: &str = "n1";
const T: Duration = Duration::from_secs(2);

/// x/b accepts TCP and UDP 80 from x/a only and sends nothing of its own; x/a may only
/// reach x/b on 80 and accepts nothing. Replies pass only through connection tracking.
const POLICIES: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: a}}
    ports:
    - {protocol: TCP, port: 80}
    - {protocol: UDP, port: 80}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-to-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  egress:
  - to:
    - podSelector: {matchLabels: {pod: b}}
    ports:
    - {protocol: TCP, port: 80}
    - {protocol: UDP, port: 80}
"#;

const PROGRAMMED: &[&str] = &[
    "Pod/x/a",
    "Pod/x/b",
    "Pod/y/c",
    "NetworkPolicy/x/b-from-a",
    "NetworkPolicy/x/a-to-b",
];

fn objects(pods: &[&Pod]) -> String {
    let mut s = manifests::namespace("x") + &manifests::namespace("y");
    for p in pods {
        s += &manifests::pod(p, NODE);
    }
    s
}

/// Packets of `slot` counted under a drop reason in `direction` ("ingress"/"egress").
fn dropped(layout_maps: &Maps, slot: u32, direction: &str) -> u64 {
    read_counters(layout_maps, Some(&[slot]))
        .unwrap()
        .iter()
        .filter(|r| r.drop && r.direction == direction)
        .map(|r| r.packets)
        .sum()
}

fn pairs(from: &Pod, to: &Pod) -> Vec<(IpAddr, IpAddr)> {
    Family::BOTH
        .iter()
        .map(|f| (from.ip(*f), to.ip(*f)))
        .collect()
}

fn restart_under_traffic(flavour: Flavour, tag: &str) {
    require_root();
    let node = Node::new(tag, flavour).unwrap();
    let a = node.add_pod("x/a").unwrap();
    let b = node.add_pod("x/b").unwrap();
    let c = node.add_pod("y/c").unwrap();
    let echo = EchoServer::start(b.ns(), 80).unwrap();
    let _udp = Server::udp(b.ns(), 80, "x/b").unwrap();

    let dirs = AgentDirs::new(tag, None).unwrap();
    let layout = dirs.pins.layout();
    manifests::write(&dirs.manifests, "00-objects.yaml", &objects(&[&a, &b, &c])).unwrap();
    manifests::write(&dirs.manifests, "10-policies.yaml", POLICIES).unwrap();
    let mut agent = AgentProcess::spawn(Path::new(BIN), node.ns(), NODE, &dirs, &[]).unwrap();
    agent.wait_ready(&dirs, PROGRAMMED).unwrap();

    let maps = Maps::open(&layout).unwrap();
    let (slot_a, slot_b) = (dirs.slot("x/a").unwrap(), dirs.slot("x/b").unwrap());
    let ep_b = maps.endpoints.get(&b.host_ifindex(), 0).unwrap();
    let maps_before = map_ids(&layout);
    let links_before: Vec<_> = Hook::ALL
        .iter()
        .map(|h| link_ids(&layout, b.host_ifindex(), *h).expect("x/b has pinned links"))
        .collect();

    // Enforcement is on before the traffic starts.
    for f in Family::BOTH {
        a.ns().run(|| echo_once(b.addr(f, 80), T)).unwrap();
        assert!(
            c.ns()
                .run(|| echo_once(b.addr(f, 80), Duration::from_millis(300)))
                .is_err(),
            "y/c must not reach x/b"
        );
    }

    let streams: Vec<Stream> = Family::BOTH
        .iter()
        .map(|f| Stream::start(a.ns(), b.addr(*f, 80), Duration::from_millis(2)).unwrap())
        .collect();
    let arrived = Sniffer::start(b.ns(), "eth0", &pairs(&c, &b)).unwrap();
    // The same kind of sniffer sees the allowed traffic: a zero above means something.
    let control = Sniffer::start(b.ns(), "eth0", &pairs(&a, &b)).unwrap();
    let sent = Sniffer::start(c.ns(), "eth0", &pairs(&c, &b)).unwrap();
    let drops_before = dropped(&maps, slot_b, "ingress");
    let quiet = |m: &Maps| {
        [
            dropped(m, slot_a, "ingress"),
            dropped(m, slot_a, "egress"),
            dropped(m, slot_b, "egress"),
        ]
    };
    let quiet_before = quiet(&maps);
    let targets: Vec<(Proto, SocketAddr)> = Family::BOTH
        .iter()
        .flat_map(|f| [(Proto::Tcp, b.addr(*f, 80)), (Proto::Udp, b.addr(*f, 80))])
        .collect();
    let sprayer = Sprayer::start(c.ns(), &targets, Duration::from_millis(20)).unwrap();

    // Traffic flows in each phase: before the kill, while no agent runs, after the restart.
    let progress = |what: &str| {
        let base: Vec<u64> = streams.iter().map(Stream::round_trips).collect();
        let rounds = sprayer.rounds();
        let ok = wait_until(Duration::from_secs(20), || {
            streams
                .iter()
                .zip(&base)
                .all(|(s, b)| s.round_trips() >= b + 100)
                && sprayer.rounds() >= rounds + 15
        });
        assert!(ok, "traffic stalled {what}");
    };
    progress("before the kill");
    let drops_at_kill = dropped(&maps, slot_b, "ingress");
    agent.kill9().unwrap();
    progress("while no agent runs");
    let drops_while_down = dropped(&maps, slot_b, "ingress");
    assert!(
        drops_while_down > drops_at_kill,
        "the programs kept dropping (and counting) with no agent"
    );

    let mut agent = AgentProcess::spawn(Path::new(BIN), node.ns(), NODE, &dirs, &[]).unwrap();
    agent.wait_ready(&dirs, PROGRAMMED).unwrap();
    progress("after the restart");

    // New allowed connections and datagrams work after the restart.
    for f in Family::BOTH {
        a.ns().run(|| echo_once(b.addr(f, 80), T)).unwrap();
        assert_eq!(udp_probe(a.ns(), b.ip(f), 80, T).as_deref(), Ok("x/b"));
    }

    let spray = sprayer.stop();
    let reports: Vec<_> = streams.into_iter().map(Stream::stop).collect();
    let sent_total = sent.stop().unwrap();
    let drops = |m: &Maps| dropped(m, slot_b, "ingress") - drops_before;
    // Counters are updated as the packets cross x/b's interface, just after c's eth0.
    wait_until(Duration::from_secs(2), || drops(&maps) >= sent_total);
    let arrived_total = arrived.stop().unwrap();
    let control_total = control.stop().unwrap();

    eprintln!(
        "{tag}: denied packets sent {sent_total} (attempts per target {:?}), arrived {arrived_total}, \
         counted as dropped {}; allowed streams: {}",
        spray.attempts,
        drops(&maps),
        reports
            .iter()
            .map(|r| format!(
                "{} round trips / {} bytes, longest gap {:?}, {} retransmits",
                r.round_trips, r.bytes, r.longest_gap, r.retransmits
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );

    // No denied packet reached the server, whatever the protocol or family.
    assert!(sent_total > 0);
    assert!(
        control_total > 0,
        "the sniffer on x/b saw no allowed packet either"
    );
    assert_eq!(arrived_total, 0, "denied packets arrived at x/b");
    assert_eq!(
        spray.answered,
        Vec::<String>::new(),
        "denied attempts answered"
    );
    assert_eq!(echo.accepted_from(c.ipv4().into()), 0);
    assert_eq!(echo.accepted_from(c.ipv6().into()), 0);
    // Every one of them was dropped and counted by x/b's ingress check, also those sent
    // while no agent ran: the counter was adopted, not reset.
    // Every denied packet the client sent was counted; the kernel may still retransmit a
    // denied SYN after the sniffer stopped, which is counted too, hence >=.
    let counted = drops(&maps);
    assert!(
        counted >= sent_total,
        "drop counter {counted} < packets sent {sent_total}"
    );

    // The allowed connections never broke and none of their packets was dropped.
    for r in &reports {
        assert_eq!(r.error, None, "allowed connection broke: {r:?}");
    }
    assert_eq!(quiet(&maps), quiet_before, "drops on the allowed path");

    // The restarted agent adopted the pinned state.
    assert_eq!(map_ids(&layout), maps_before, "maps were replaced");
    assert_eq!(maps.endpoints.get(&b.host_ifindex(), 0).unwrap(), ep_b);
    assert_eq!(dirs.slot("x/b"), Some(slot_b));
    assert_eq!(dirs.slot("x/a"), Some(slot_a));
    for (h, before) in Hook::ALL.iter().zip(&links_before) {
        let after = link_ids(&layout, b.host_ifindex(), *h).unwrap();
        assert_eq!(after.link, before.link, "{h:?}: the link was replaced");
        assert_ne!(
            after.program, before.program,
            "{h:?}: the restarted agent's program was not swapped in"
        );
    }
    drop(agent);
}

#[test]
fn agent_restart_under_traffic_on_a_bridged_node() {
    restart_under_traffic(Flavour::Bridged, "rsbr");
}

#[test]
fn agent_restart_under_traffic_on_a_routed_node() {
    restart_under_traffic(Flavour::Routed, "rsrt");
}
