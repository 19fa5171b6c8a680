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

use std::path::Path;
use std::time::Duration;

use palisade::dataplane::{link_ids, map_ids, Hook, Maps};
use palisade_tests::agent::{AgentDirs, AgentProcess};
use palisade_tests::stream::echo_once;
use palisade_tests::traffic::{dropped, Traffic, Trio, POLICIES, PROGRAMMED};
use palisade_tests::{manifests, require_root, udp_probe, Family, Flavour, Node};

const BIN: &str = env!("CARGO_BIN_EXE_palisade");
const NODE: &str = "n1";
const T: Duration = Duration::from_secs(2);

fn restart_under_traffic(flavour: Flavour, tag: &str) {
    require_root();
    let node = Node::new(tag, flavour).unwrap();
    let trio = Trio::new(&node).unwrap();
    let (a, b, c) = (&trio.a, &trio.b, &trio.c);

    let dirs = AgentDirs::new(tag, None).unwrap();
    let layout = dirs.pins.layout();
    manifests::write(&dirs.manifests, "00-objects.yaml", &trio.objects(NODE)).unwrap();
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

    let denied_in_b = |m: &Maps| dropped(m, slot_b, Some("ingress"));
    let quiet = |m: &Maps| {
        [
            dropped(m, slot_a, Some("ingress")),
            dropped(m, slot_a, Some("egress")),
            dropped(m, slot_b, Some("egress")),
        ]
    };
    let drops_before = denied_in_b(&maps);
    let quiet_before = quiet(&maps);
    let traffic = Traffic::start(&trio, Duration::from_millis(20)).unwrap();

    // Traffic flows in each phase: before the kill, while no agent runs, after the restart.
    traffic.progress("before the kill", 15);
    let drops_at_kill = denied_in_b(&maps);
    agent.kill9().unwrap();
    traffic.progress("while no agent runs", 15);
    assert!(
        denied_in_b(&maps) > drops_at_kill,
        "the programs kept dropping (and counting) with no agent"
    );

    let mut agent = AgentProcess::spawn(Path::new(BIN), node.ns(), NODE, &dirs, &[]).unwrap();
    agent.wait_ready(&dirs, PROGRAMMED).unwrap();
    traffic.progress("after the restart", 15);

    // New allowed connections and datagrams work after the restart.
    for f in Family::BOTH {
        a.ns().run(|| echo_once(b.addr(f, 80), T)).unwrap();
        assert_eq!(udp_probe(a.ns(), b.ip(f), 80, T).as_deref(), Ok("x/b"));
    }

    let report = traffic.stop();
    let counted = || denied_in_b(&maps) - drops_before;
    // Every denied packet was dropped and counted by x/b's ingress check, also those sent
    // while no agent ran: the counter was adopted, not reset.
    report.assert_enforced_throughout(tag, &trio, counted);
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
