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
//!
//! A second scene upgrades from layout 1 itself, whose identity and allow maps were one LPM
//! trie each (`IDENTITY_V4`/`_V6`, `POLICY`: every prefix): the new agent must rebuild its
//! split maps (`IDENTITY{4,6}_EXACT`, `POLICY_EXACT` hash maps of full-length entries,
//! `IDENTITY{4,6}_CIDR`, `POLICY_WILDCARD` tries of the rest) rather than adopt the old tries,
//! share everything else, and keep allowed traffic flowing and denied traffic out.

use std::path::PathBuf;
use std::time::Duration;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Map, MapData, MapInfo};
use palisade::dataplane::{link_ids, map_ids, pinned_link_ids, Hook, Layout, Maps};
use palisade::source::SourceSpec;
use palisade_common::maps as names;
use palisade_common::{IdentityValue, PolicyKey, PolicyValue, POLICY_PREFIX_FULL};
use palisade_tests::agent::TempDir;
use palisade_tests::inproc::{self, InProcessAgent};
use palisade_tests::pins::PinDir;
use palisade_tests::stream::echo_once;
use palisade_tests::traffic::{dropped, Traffic, Trio, POLICIES, PROGRAMMED};
use palisade_tests::{manifests, require_root, udp_probe, Family, Flavour, Node};

const NODE: &str = "n1";
const T: Duration = Duration::from_secs(2);

/// Replaces the allow policies: nothing in x may talk to anything.
const DENY_ALL: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"#;

const ALLOWING: &[&str] = PROGRAMMED;

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

    fn slot(&self, pod: &str) -> u32 {
        self.0.slot(pod).unwrap()
    }
}

struct Dirs {
    manifests: PathBuf,
    run: PathBuf,
    _tmp: TempDir,
}

impl Dirs {
    /// A manifest directory holding the trio's objects and [`POLICIES`], and a run dir.
    fn new(tag: &str, trio: &Trio) -> Dirs {
        let tmp = TempDir::new(tag).unwrap();
        let dirs = Dirs {
            manifests: tmp.path().join("manifests"),
            run: tmp.path().join("run"),
            _tmp: tmp,
        };
        std::fs::create_dir_all(&dirs.manifests).unwrap();
        manifests::write(&dirs.manifests, "00-objects.yaml", &trio.objects(NODE)).unwrap();
        manifests::write(&dirs.manifests, "10-policies.yaml", POLICIES).unwrap();
        dirs
    }
}

fn conntrack_size(layout: &Layout) -> u32 {
    MapInfo::from_pin(layout.map(names::CONNTRACK))
        .unwrap()
        .max_entries()
}

fn upgrade_under_traffic(flavour: Flavour, tag: &str) {
    require_root();
    let node = Node::new(tag, flavour).unwrap();
    let trio = Trio::new(&node).unwrap();
    let (a, b) = (&trio.a, &trio.b);
    let dirs = Dirs::new(tag, &trio);

    let pins = PinDir::new(tag);
    let root = pins.path();
    let v1 = Layout::with_version(&root, 1);
    let agent = Agent::start(&node, v1.clone(), &dirs, 65_536, ALLOWING);
    let (slot_a, slot_b) = (agent.slot("x/a"), agent.slot("x/b"));
    let maps_v1 = map_ids(&v1);
    assert_eq!(maps_v1.len(), names::PINNED.len());
    let links_v1: Vec<_> = Hook::ALL
        .iter()
        .map(|h| link_ids(&v1, b.host_ifindex(), *h).unwrap())
        .collect();
    let maps = Maps::open(&v1).unwrap();

    let denied_in_b = |m: &Maps| dropped(m, slot_b, Some("ingress"));
    let quiet = |m: &Maps| {
        [
            dropped(m, slot_a, Some("ingress")),
            dropped(m, slot_a, Some("egress")),
            dropped(m, slot_b, Some("egress")),
        ]
    };
    let drops_before = denied_in_b(&maps);
    let traffic = Traffic::start(&trio, Duration::from_millis(20)).unwrap();
    traffic.progress("under v1", 10);

    // From here on no policy allows the connections: they live on conntrack alone.
    manifests::write(&dirs.manifests, "10-policies.yaml", DENY_ALL).unwrap();
    agent.wait(DENYING);
    for f in Family::BOTH {
        let short = Duration::from_millis(300);
        assert!(a.ns().run(|| echo_once(b.addr(f, 80), short)).is_err());
    }
    // Those attempts were dropped on x/a's egress; from here on nothing may be.
    let quiet_before = quiet(&maps);
    traffic.progress("under v1, with deny-all", 10);

    // v1 -> v2, same map definitions: every map shared, links moved, v1's pins gone.
    agent.stop();
    traffic.progress("with no agent", 10);
    let v2 = Layout::with_version(&root, 2);
    let agent = Agent::start(&node, v2.clone(), &dirs, 65_536, DENYING);
    assert!(!v1.versioned().exists(), "v1 pins left behind");
    assert_eq!(map_ids(&v2), maps_v1, "v2 did not share v1's maps");
    for (h, before) in Hook::ALL.iter().zip(&links_v1) {
        let after = link_ids(&v2, b.host_ifindex(), *h).expect("link moved to v2");
        assert_eq!(after.link, before.link, "{h:?}: the link was recreated");
        assert_ne!(after.program, before.program, "{h:?}: program not swapped");
    }
    traffic.progress("under v2", 10);

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
    traffic.progress("under v3", 10);

    // Allowed again: new connections work.
    manifests::write(&dirs.manifests, "10-policies.yaml", POLICIES).unwrap();
    agent.wait(ALLOWING);
    for f in Family::BOTH {
        a.ns().run(|| echo_once(b.addr(f, 80), T)).unwrap();
        assert_eq!(udp_probe(a.ns(), b.ip(f), 80, T).as_deref(), Ok("x/b"));
    }
    let report = traffic.stop();
    let maps = Maps::open(&v3).unwrap();
    let counted = || denied_in_b(&maps) - drops_before;
    report.assert_enforced_throughout(tag, &trio, counted);
    assert_eq!(quiet(&maps), quiet_before, "drops on the allowed path");
    assert_eq!((agent.slot("x/a"), agent.slot("x/b")), (slot_a, slot_b));
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

/// Layout 1's LPM maps of every prefix, and the (trie, hash map) pairs they became.
const LAYOUT1_TRIES: [(&str, &str, &str); 3] = [
    ("IDENTITY_V4", names::IDENTITY4_CIDR, names::IDENTITY4_EXACT),
    ("IDENTITY_V6", names::IDENTITY6_CIDR, names::IDENTITY6_EXACT),
    ("POLICY", names::POLICY_WILDCARD, names::POLICY_EXACT),
];

/// The split maps of this layout.
const SPLIT_MAPS: [&str; 6] = [
    names::IDENTITY4_EXACT,
    names::IDENTITY4_CIDR,
    names::IDENTITY6_EXACT,
    names::IDENTITY6_CIDR,
    names::POLICY_EXACT,
    names::POLICY_WILDCARD,
];

fn trie<K: aya::Pod, V: aya::Pod>(path: PathBuf) -> LpmTrie<MapData, K, V> {
    let data = MapData::from_pin(path).unwrap();
    LpmTrie::try_from(Map::from_map_data(data).unwrap()).unwrap()
}

/// Every identity entry of `maps` as "network/prefix" (both maps of both families).
fn identity_nets(maps: &Maps) -> Vec<String> {
    let mut out: Vec<String> = maps
        .identity_v4
        .keys()
        .map(|k| {
            let k = k.unwrap();
            format!("{}/{}", std::net::Ipv4Addr::from(k.data()), k.prefix_len())
        })
        .chain(maps.identity_v6.keys().map(|k| {
            let k = k.unwrap();
            format!("{}/{}", std::net::Ipv6Addr::from(k.data()), k.prefix_len())
        }))
        .collect();
    out.sort();
    out
}

/// Turns `v1`'s pins into what an agent of layout 1 leaves behind: each family's identity
/// entries all in one trie pinned as `IDENTITY_V4`/`_V6`, every allow entry in one trie
/// pinned as `POLICY`, and no split maps. The attached programs keep the maps they were
/// loaded with; an upgrading agent only reads pins.
fn pin_as_layout_1(v1: &Layout) {
    let maps = Maps::open(v1).unwrap();
    let hosts4: Vec<_> = maps.identity_v4.exact.iter().map(Result::unwrap).collect();
    let hosts6: Vec<_> = maps.identity_v6.exact.iter().map(Result::unwrap).collect();
    let exact_policy: Vec<_> = maps.policy.exact.iter().map(Result::unwrap).collect();
    drop(maps);
    for (old, trie, exact) in LAYOUT1_TRIES {
        std::fs::rename(v1.map(trie), v1.map(old)).unwrap();
        std::fs::remove_file(v1.map(exact)).unwrap();
    }
    let mut t4 = trie::<[u8; 4], IdentityValue>(v1.map(LAYOUT1_TRIES[0].0));
    for (a, v) in hosts4 {
        t4.insert(&Key::new(32, a), v, 0).unwrap();
    }
    let mut t6 = trie::<[u8; 16], IdentityValue>(v1.map(LAYOUT1_TRIES[1].0));
    for (a, v) in hosts6 {
        t6.insert(&Key::new(128, a), v, 0).unwrap();
    }
    let mut p = trie::<PolicyKey, PolicyValue>(v1.map(LAYOUT1_TRIES[2].0));
    for (k, v) in exact_policy {
        p.insert(&Key::new(POLICY_PREFIX_FULL, k), v, 0).unwrap();
    }
}

#[test]
fn upgrade_from_layout_1_rebuilds_the_identity_and_allow_maps_split_under_traffic() {
    require_root();
    let tag = "upl1";
    const { assert!(palisade_common::LAYOUT_VERSION > 1) };
    let node = Node::new(tag, Flavour::Routed).unwrap();
    let trio = Trio::new(&node).unwrap();
    let (a, b) = (&trio.a, &trio.b);
    let dirs = Dirs::new(tag, &trio);

    let pins = PinDir::new(tag);
    let root = pins.path();
    let v1 = Layout::with_version(&root, 1);
    let agent = Agent::start(&node, v1.clone(), &dirs, 65_536, ALLOWING);
    let slot_b = agent.slot("x/b");
    let nets_v1 = identity_nets(&Maps::open(&v1).unwrap());
    let policy_v1 = Maps::open(&v1).unwrap().policy.keys().count();
    assert!(policy_v1 > 0);
    assert!(
        nets_v1.iter().any(|n| n.ends_with("/32")) && nets_v1.iter().any(|n| n.ends_with("/128")),
        "no pod addresses among the identities: {nets_v1:?}"
    );
    let drops_before = dropped(&Maps::open(&v1).unwrap(), slot_b, Some("ingress"));
    let traffic = Traffic::start(&trio, Duration::from_millis(20)).unwrap();
    traffic.progress("under layout 1", 10);
    agent.stop();
    pin_as_layout_1(&v1);
    let ids_v1 = map_ids(&v1);
    let old_tries: Vec<u32> = LAYOUT1_TRIES
        .iter()
        .map(|(old, _, _)| MapInfo::from_pin(v1.map(old)).unwrap().id())
        .collect();
    traffic.progress("with layout 1's pins and no agent", 10);

    let v2 = Layout::new(&root);
    let agent = Agent::start(&node, v2.clone(), &dirs, 65_536, ALLOWING);
    assert!(!v1.versioned().exists(), "layout 1 pins left behind");
    let ids_v2 = map_ids(&v2);
    assert_eq!(ids_v2.len(), names::PINNED.len());
    for (name, id) in &ids_v1 {
        assert_eq!(ids_v2[name], *id, "{name} was not shared");
    }
    for name in SPLIT_MAPS {
        assert!(
            !old_tries.contains(&ids_v2[name]),
            "{name} adopted a layout 1 trie of every prefix"
        );
    }
    let maps = Maps::open(&v2).unwrap();
    assert_eq!(
        identity_nets(&maps),
        nets_v1,
        "identities rebuilt differently"
    );
    assert_eq!(
        maps.policy.keys().count(),
        policy_v1,
        "allow entries rebuilt differently"
    );
    for k in maps.policy.trie.keys() {
        assert!(
            k.unwrap().prefix_len() < POLICY_PREFIX_FULL,
            "an exact entry in the trie"
        );
    }
    for k in maps.identity_v4.trie.keys() {
        assert!(
            k.unwrap().prefix_len() < 32,
            "a host entry in the IPv4 trie"
        );
    }
    for k in maps.identity_v6.trie.keys() {
        assert!(
            k.unwrap().prefix_len() < 128,
            "a host entry in the IPv6 trie"
        );
    }
    traffic.progress("under layout 2", 10);

    // New flows are judged through the rebuilt identity maps.
    for f in Family::BOTH {
        a.ns().run(|| echo_once(b.addr(f, 80), T)).unwrap();
        assert_eq!(udp_probe(a.ns(), b.ip(f), 80, T).as_deref(), Ok("x/b"));
    }
    let report = traffic.stop();
    let counted = || dropped(&maps, slot_b, Some("ingress")) - drops_before;
    report.assert_enforced_throughout(tag, &trio, counted);
    agent.stop();
}

/// The uplink program's link moves to a new layout version like a pod's: same link, new
/// program, and the old version retired once no link is left in it. (It used to be
/// attached afresh beside the old link, which kept running the old program and kept the
/// old version alive.)
#[test]
fn uplink_link_follows_a_layout_upgrade() {
    require_root();
    let ns = palisade_tests::NetNs::new("upuplink").unwrap();
    ns.exec(&[
        "ip", "link", "add", "upl0", "type", "veth", "peer", "name", "upl1",
    ])
    .unwrap();
    ns.exec(&["ip", "link", "set", "upl0", "up"]).unwrap();
    let pins = PinDir::new("upuplink");
    let root = pins.path();
    ns.run(|| {
        let ifindex = palisade::dataplane::ifindex_of("upl0").unwrap();
        let opts = palisade::dataplane::LoadOptions::default();
        let v1 = Layout::with_version(&root, 1);
        let mut dp = palisade::dataplane::Dataplane::load(v1.clone(), &opts).unwrap();
        dp.attach_uplink("upl0").unwrap();
        let before = pinned_link_ids(&v1.uplink_link(ifindex)).expect("v1 uplink link");
        drop(dp);

        let v2 = Layout::with_version(&root, 2);
        let mut dp = palisade::dataplane::Dataplane::load(v2.clone(), &opts).unwrap();
        dp.attach_uplink("upl0").unwrap();
        let after = pinned_link_ids(&v2.uplink_link(ifindex)).expect("link moved to v2");
        assert_eq!(after.link, before.link, "the uplink link was recreated");
        assert_ne!(
            after.program, before.program,
            "the uplink program was not swapped"
        );
        assert!(
            !v1.versioned().exists(),
            "v1 not retired after its uplink link moved"
        );
    });
}
