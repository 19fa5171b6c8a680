//! Program and layout upgrades under traffic: an agent of layout version 1 enforces, then
//! an agent of version 2 (same map definitions: every map is shared) replaces it, then one
//! of version 3 with another conntrack size (the conntrack map is copied into a new one,
//! the others shared). Each new agent loads its programs beside the old ones and moves every
//! link over atomically, then the old version's pins are removed.
//!
//! Throughout, two TCP connections keep exchanging data that no policy allows any more:
//! they were opened under an allow policy that was then replaced by deny-all, so they live
//! on their connection-tracking entries alone, and `--revoke-untracked` is on: had an
//! upgrade lost an entry, the connection would be cut. A denied client keeps trying TCP and
//! UDP. Asserted: no denied packet reaches the server, no connection breaks or loses a
//! packet to a drop, every denied packet is counted (the counters carry over), and each
//! step shares or copies exactly the maps it should.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use aya::maps::MapInfo;
use palisade::dataplane::{link_ids, map_ids, read_counters, Hook, Layout, Maps};
use palisade::source::SourceSpec;
use palisade_common::maps as names;
use palisade_tests::agent::TempDir;
use palisade_tests::inproc::{self, InProcessAgent};
use palisade_tests::pins::PinDir;
use palisade_tests::sniff::Sniffer;
use palisade_tests::stream::{echo_once, EchoServer, Sprayer, Stream};
use palisade_tests::{manifests, require_root, udp_probe, wait_until, Family, Flavour, Node};
use palisade_tests::{Pod, Proto, Server};

const NODE: &str = "n1";
const T: Duration = Duration::from_secs(2);

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

/// Replaces the allow policies: nothing in x may talk to anything.
const DENY_ALL: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"#;

const ALLOWING: &[&str] = &[
    "Pod/x/a",
    "Pod/x/b",
    "Pod/y/c",
    "NetworkPolicy/x/b-from-a",
    "NetworkPolicy/x/a-to-b",
];

const DENYING: &[&str] = &["Pod/x/a", "Pod/x/b", "Pod/y/c", "NetworkPolicy/x/deny-all"];

/// An agent of one layout version, in-process on a thread in the node namespace.
struct Agent(InProcessAgent);

impl Agent {
    fn start(
        node: &Node,
        layout: Layout,
        dirs: &Dirs,
        conntrack_entries: u32,
        programmed: &[&str],
    ) -> Agent {
        let mut cfg = inproc::config(
            NODE,
            SourceSpec::Manifests(dirs.manifests.clone()),
            layout,
            &dirs.run,
        );
        cfg.conntrack_entries = conntrack_entries;
        cfg.revoke_untracked = true;
        let agent = Agent(InProcessAgent::spawn(node.ns(), cfg));
        agent.wait(programmed);
        agent
    }

    /// Waits until the status says exactly `programmed` (pods and policies) is in the kernel.
    fn wait(&self, programmed: &[&str]) {
        let mut want = programmed.to_vec();
        want.sort_unstable();
        self.0.wait_status(
            &format!("agent not ready with exactly {want:?}"),
            Duration::from_secs(30),
            |v| {
                let keys: Vec<&str> = v["programmed"]
                    .as_object()
                    .map(|o| {
                        o.keys()
                            .map(String::as_str)
                            .filter(|k| !k.starts_with("Namespace/"))
                            .collect()
                    })
                    .unwrap_or_default();
                v["synced"] == true && keys == want
            },
        );
    }

    /// Stops the agent the way SIGTERM does; enforcement stays pinned.
    fn stop(self) {
        self.0.stop();
    }
}

struct Dirs {
    manifests: PathBuf,
    run: PathBuf,
    _tmp: TempDir,
}

impl Dirs {
    fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(self.run.join("status.json")).ok()?).ok()
    }

    fn slot(&self, pod: &str) -> u32 {
        self.status().unwrap()["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["pod"] == pod)
            .and_then(|e| e["slot"].as_u64())
            .unwrap() as u32
    }
}

fn dropped(maps: &Maps, slot: u32, direction: &str) -> u64 {
    read_counters(maps, Some(&[slot]))
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

fn conntrack_size(layout: &Layout) -> u32 {
    MapInfo::from_pin(layout.map(names::CONNTRACK))
        .unwrap()
        .max_entries()
}

fn upgrade_under_traffic(flavour: Flavour, tag: &str) {
    require_root();
    let node = Node::new(tag, flavour).unwrap();
    let a = node.add_pod("x/a").unwrap();
    let b = node.add_pod("x/b").unwrap();
    let c = node.add_pod("y/c").unwrap();
    let echo = EchoServer::start(b.ns(), 80).unwrap();
    let _udp = Server::udp(b.ns(), 80, "x/b").unwrap();
    let tmp = TempDir::new(tag).unwrap();
    let dirs = Dirs {
        manifests: tmp.path().join("manifests"),
        run: tmp.path().join("run"),
        _tmp: tmp,
    };
    std::fs::create_dir_all(&dirs.manifests).unwrap();
    let mut objects = manifests::namespace("x") + &manifests::namespace("y");
    for p in [&a, &b, &c] {
        objects += &manifests::pod(p, NODE);
    }
    manifests::write(&dirs.manifests, "00-objects.yaml", &objects).unwrap();
    manifests::write(&dirs.manifests, "10-policies.yaml", POLICIES).unwrap();

    let pins = PinDir::new(tag);
    let root = pins.path();
    let v1 = Layout::with_version(&root, 1);
    let agent = Agent::start(&node, v1.clone(), &dirs, 65_536, ALLOWING);
    let (slot_a, slot_b) = (dirs.slot("x/a"), dirs.slot("x/b"));
    let maps_v1 = map_ids(&v1);
    assert_eq!(maps_v1.len(), names::PINNED.len());
    let links_v1: Vec<_> = Hook::ALL
        .iter()
        .map(|h| link_ids(&v1, b.host_ifindex(), *h).unwrap())
        .collect();
    let maps = Maps::open(&v1).unwrap();

    let streams: Vec<Stream> = Family::BOTH
        .iter()
        .map(|f| Stream::start(a.ns(), b.addr(*f, 80), Duration::from_millis(2)).unwrap())
        .collect();
    let arrived = Sniffer::start(b.ns(), "eth0", &pairs(&c, &b)).unwrap();
    let sent = Sniffer::start(c.ns(), "eth0", &pairs(&c, &b)).unwrap();
    let drops_before = dropped(&maps, slot_b, "ingress");
    let quiet = |m: &Maps| {
        [
            dropped(m, slot_a, "ingress"),
            dropped(m, slot_a, "egress"),
            dropped(m, slot_b, "egress"),
        ]
    };
    let targets: Vec<(Proto, SocketAddr)> = Family::BOTH
        .iter()
        .flat_map(|f| [(Proto::Tcp, b.addr(*f, 80)), (Proto::Udp, b.addr(*f, 80))])
        .collect();
    let sprayer = Sprayer::start(c.ns(), &targets, Duration::from_millis(20)).unwrap();
    let progress = |what: &str| {
        let base: Vec<u64> = streams.iter().map(Stream::round_trips).collect();
        let rounds = sprayer.rounds();
        let ok = wait_until(Duration::from_secs(20), || {
            streams
                .iter()
                .zip(&base)
                .all(|(s, b)| s.round_trips() >= b + 100)
                && sprayer.rounds() >= rounds + 10
        });
        assert!(ok, "traffic stalled {what}");
    };
    progress("under v1");

    // From here on no policy allows the connections: they live on conntrack alone.
    manifests::write(&dirs.manifests, "10-policies.yaml", DENY_ALL).unwrap();
    agent.wait(DENYING);
    for f in Family::BOTH {
        let short = Duration::from_millis(300);
        assert!(a.ns().run(|| echo_once(b.addr(f, 80), short)).is_err());
    }
    // Those attempts were dropped on x/a's egress; from here on nothing may be.
    let quiet_before = quiet(&maps);
    progress("under v1, with deny-all");

    // v1 -> v2, same map definitions: every map shared, links moved, v1's pins gone.
    agent.stop();
    progress("with no agent");
    let v2 = Layout::with_version(&root, 2);
    let agent = Agent::start(&node, v2.clone(), &dirs, 65_536, DENYING);
    assert!(!v1.versioned().exists(), "v1 pins left behind");
    assert_eq!(map_ids(&v2), maps_v1, "v2 did not share v1's maps");
    for (h, before) in Hook::ALL.iter().zip(&links_v1) {
        let after = link_ids(&v2, b.host_ifindex(), *h).expect("link moved to v2");
        assert_eq!(after.link, before.link, "{h:?}: the link was recreated");
        assert_ne!(after.program, before.program, "{h:?}: program not swapped");
    }
    progress("under v2");

    // v2 -> v3 with a larger conntrack: that map is copied into a new one, the rest shared.
    agent.stop();
    let v3 = Layout::with_version(&root, 3);
    let agent = Agent::start(&node, v3.clone(), &dirs, 131_072, DENYING);
    assert!(!v2.versioned().exists(), "v2 pins left behind");
    let maps_v3 = map_ids(&v3);
    for (name, id) in &maps_v1 {
        if *name == names::CONNTRACK {
            assert_ne!(
                maps_v3[name], *id,
                "conntrack was not rebuilt at its new size"
            );
        } else {
            assert_eq!(maps_v3[name], *id, "{name} was not shared");
        }
    }
    assert_eq!(conntrack_size(&v3), 131_072);
    progress("under v3");

    // Allowed again: new connections work.
    manifests::write(&dirs.manifests, "10-policies.yaml", POLICIES).unwrap();
    agent.wait(ALLOWING);
    for f in Family::BOTH {
        a.ns().run(|| echo_once(b.addr(f, 80), T)).unwrap();
        assert_eq!(udp_probe(a.ns(), b.ip(f), 80, T).as_deref(), Ok("x/b"));
    }
    let spray = sprayer.stop();
    let reports: Vec<_> = streams.into_iter().map(Stream::stop).collect();
    let sent_total = sent.stop().unwrap();
    let maps = Maps::open(&v3).unwrap();
    let drops = |m: &Maps| dropped(m, slot_b, "ingress") - drops_before;
    wait_until(Duration::from_secs(2), || drops(&maps) >= sent_total);
    let arrived_total = arrived.stop().unwrap();
    eprintln!(
        "{tag}: denied packets sent {sent_total}, arrived {arrived_total}, counted {}; streams: {}",
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
    assert!(sent_total > 0);
    assert_eq!(arrived_total, 0, "denied packets arrived at x/b");
    assert_eq!(spray.answered, Vec::<String>::new());
    assert_eq!(echo.accepted_from(c.ipv4().into()), 0);
    assert_eq!(echo.accepted_from(c.ipv6().into()), 0);
    // Every denied packet the client sent was counted; the kernel may still retransmit a
    // denied SYN after the sniffer stopped, which is counted too, hence >=.
    let counted = drops(&maps);
    assert!(
        counted >= sent_total,
        "drop counter {counted} < packets sent {sent_total}"
    );
    for r in &reports {
        assert_eq!(r.error, None, "allowed connection broke: {r:?}");
    }
    assert_eq!(quiet(&maps), quiet_before, "drops on the allowed path");
    assert_eq!((dirs.slot("x/a"), dirs.slot("x/b")), (slot_a, slot_b));
    agent.stop();
}

#[test]
fn layout_upgrades_under_traffic_on_a_bridged_node() {
    upgrade_under_traffic(Flavour::Bridged, "upbr");
}

#[test]
fn layout_upgrades_under_traffic_on_a_routed_node() {
    upgrade_under_traffic(Flavour::Routed, "uprt");
}
