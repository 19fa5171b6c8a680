//! Tier 3, the first slice: the real programs on the host veths of pods made by the CNI
//! plugins (bridged and routed nodes), real traffic, counters read back from the maps.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use palisade::dataplane::{read_counters, Dataplane, LoadOptions};
use palisade_common::{Config, Endpoint, EP_ISOLATED_INGRESS};
use palisade_tests::pins::PinDir;
use palisade_tests::{require_root, tcp_connect, Family, Flavour, Node, ProbeError, Server};

const T: Duration = Duration::from_millis(500);

fn isolate_ingress_drops_and_counts(flavour: Flavour, tag: &str) {
    require_root();
    let pins = PinDir::new(tag);
    let node = Node::new(tag, flavour).unwrap();
    let a = node.add_pod("x/a").unwrap();
    let b = node.add_pod("x/b").unwrap();
    let _srv = Server::tcp(b.ns(), 80, "x/b").unwrap();

    // Open before Palisade.
    assert_eq!(
        tcp_connect(a.ns(), b.ip(Family::V4), 80, T).as_deref(),
        Ok("x/b")
    );

    let mut dp = Dataplane::load(pins.layout(), &LoadOptions::default()).unwrap();
    let mut maps = dp.maps().unwrap();
    maps.set_config(Config {
        events_per_sec: 1000,
        ..Default::default()
    })
    .unwrap();
    let slot = 3;
    maps.reset_counters(slot).unwrap();
    maps.set_endpoint(
        b.host_ifindex(),
        Endpoint {
            slot,
            flags: EP_ISOLATED_INGRESS,
        },
    )
    .unwrap();
    let ifindex = b.host_ifindex();
    node.ns().run(|| dp.attach(ifindex)).unwrap();

    // Isolated with no allow entries: TCP times out, UDP datagrams are dropped and counted.
    assert_eq!(
        tcp_connect(a.ns(), b.ip(Family::V4), 80, T),
        Err(ProbeError::Timeout)
    );
    let before = dropped(&maps, slot);
    let sent = 25u64;
    let to = SocketAddr::new(b.ip(Family::V4), 9);
    a.ns().run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..sent {
            s.send_to(b"palisade", to).unwrap();
        }
    });
    let counted = palisade_tests::wait_until(Duration::from_secs(2), || {
        dropped(&maps, slot) - before >= sent
    });
    assert!(counted, "drop counter did not reach the datagrams sent");
    assert_eq!(
        dropped(&maps, slot) - before,
        sent,
        "every datagram, no more"
    );

    // Detaching restores traffic.
    dp.detach(ifindex).unwrap();
    assert_eq!(
        tcp_connect(a.ns(), b.ip(Family::V4), 80, T).as_deref(),
        Ok("x/b")
    );
}

fn dropped(maps: &palisade::dataplane::Maps, slot: u32) -> u64 {
    read_counters(maps, Some(&[slot]))
        .unwrap()
        .iter()
        .filter(|r| r.drop && r.direction == "ingress")
        .map(|r| r.packets)
        .sum()
}

#[test]
fn isolated_pod_drops_and_counts_on_a_bridged_node() {
    isolate_ingress_drops_and_counts(Flavour::Bridged, "isobr");
}

#[test]
fn isolated_pod_drops_and_counts_on_a_routed_node() {
    isolate_ingress_drops_and_counts(Flavour::Routed, "isort");
}
