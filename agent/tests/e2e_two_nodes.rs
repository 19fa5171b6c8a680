//! Two simulated nodes (a bridged one and a routed one, made by the CNI plugins) joined by
//! an underlay veth, each with its own `palisade agent` subprocess (own pins, own run
//! directory) fed the same manifest directory. Real TCP and UDP, IPv4 and IPv6, between
//! pods on different nodes: a connection leaving an egress-isolated pod is judged on its
//! own node, one entering an ingress-isolated pod on the remote node, replies pass through
//! each node's connection tracking, and the counters show which node dropped what.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use palisade::dataplane::{read_counters, Maps};
use palisade_tests::agent::{AgentDirs, AgentProcess, TempDir};
use palisade_tests::probe::{exchange, exchange_expecting_reply, ProbeError};
use palisade_tests::{manifests, require_root, Family, Node, Pod, Proto, Server};

const BIN: &str = env!("CARGO_BIN_EXE_palisade");
const T: Duration = Duration::from_millis(600);

/// y/a (node B) accepts TCP/UDP 80 from x/a (node A) only and opens nothing itself;
/// x/a may only reach y/a on 80 and accepts nothing. x/b and y/b are not isolated.
const POLICIES: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-x-a, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: x}}
      podSelector: {matchLabels: {pod: a}}
    ports:
    - {protocol: TCP, port: 80}
    - {protocol: UDP, port: 80}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-to-y-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: a}}
    ports:
    - {protocol: TCP, port: 80}
    - {protocol: UDP, port: 80}
"#;

const PROGRAMMED: &[&str] = &[
    "Pod/x/a",
    "Pod/x/b",
    "Pod/y/a",
    "Pod/y/b",
    "NetworkPolicy/y/a-from-x-a",
    "NetworkPolicy/x/a-to-y-a",
];

/// One node: its pods (with TCP and UDP servers on 80), its agent and where it keeps state.
struct Site {
    name: &'static str,
    agent: AgentProcess,
    dirs: AgentDirs,
    maps: Maps,
}

impl Site {
    /// (allowed, dropped) packets of `pod` in `direction`, as this node counted them.
    fn counts(&self, pod: &str, direction: &str) -> (u64, u64) {
        let slot = self
            .dirs
            .slot(pod)
            .unwrap_or_else(|| panic!("{pod} has no slot on {}", self.name));
        read_counters(&self.maps, Some(&[slot]))
            .unwrap()
            .iter()
            .filter(|r| r.direction == direction)
            .fold((0, 0), |(a, d), r| {
                if r.drop {
                    (a, d + r.packets)
                } else {
                    (a + r.packets, d)
                }
            })
    }
}

/// TCP and UDP on 80 to `to`, in both families, in parallel; the replies (or errors).
/// Probes that should get through (`allowed`) retry timeouts.
fn probe_all(from: &Pod, to: &Pod, allowed: bool) -> Vec<(String, Result<String, ProbeError>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = Family::BOTH
            .iter()
            .flat_map(|f| [(Proto::Tcp, *f), (Proto::Udp, *f)])
            .map(|(proto, f)| {
                let to: SocketAddr = to.addr(f, 80);
                s.spawn(move || {
                    let r = from.ns().run(|| {
                        if allowed {
                            exchange_expecting_reply(proto, to, T)
                        } else {
                            exchange(proto, to, T)
                        }
                    });
                    (format!("{proto:?} {to}"), r)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[track_caller]
fn assert_reaches(from: &Pod, to: &Pod) {
    for (what, r) in probe_all(from, to, true) {
        assert_eq!(
            r.as_deref(),
            Ok(to.name()),
            "{} -> {}: {what}",
            from.name(),
            to.name()
        );
    }
}

#[track_caller]
fn assert_blocked(from: &Pod, to: &Pod) {
    for (what, r) in probe_all(from, to, false) {
        assert_eq!(
            r,
            Err(ProbeError::Timeout),
            "{} -> {}: {what}",
            from.name(),
            to.name()
        );
    }
}

#[test]
fn pods_on_two_nodes_are_enforced_by_each_nodes_agent() {
    require_root();
    let node_a = Node::bridged("2na").unwrap();
    let node_b = Node::routed("2nb").unwrap();
    let _underlay = node_a.join(&node_b).unwrap();
    let xa = node_a.add_pod("x/a").unwrap();
    let xb = node_a.add_pod("x/b").unwrap();
    let ya = node_b.add_pod("y/a").unwrap();
    let yb = node_b.add_pod("y/b").unwrap();
    let _servers: Vec<Server> = [&xa, &xb, &ya, &yb]
        .iter()
        .flat_map(|p| {
            [Proto::Tcp, Proto::Udp].map(|proto| Server::new(p.ns(), proto, 80, p.name()).unwrap())
        })
        .collect();

    let shared = TempDir::new("2n-manifests").unwrap();
    let mut objects = manifests::namespace("x") + &manifests::namespace("y");
    for p in [&xa, &xb] {
        objects += &manifests::pod(p, "node-a");
    }
    for p in [&ya, &yb] {
        objects += &manifests::pod(p, "node-b");
    }
    manifests::write(shared.path(), "00-objects.yaml", &objects).unwrap();
    manifests::write(shared.path(), "10-policies.yaml", POLICIES).unwrap();

    // Both agents start at once, then each is waited for.
    let mut started = Vec::new();
    for (name, node) in [("node-a", &node_a), ("node-b", &node_b)] {
        let dirs = AgentDirs::new(&format!("2n{}", &name[5..]), Some(shared.path())).unwrap();
        let agent = AgentProcess::spawn(Path::new(BIN), node.ns(), name, &dirs, &[]).unwrap();
        started.push((name, agent, dirs));
    }
    let mut sites: Vec<Site> = started
        .into_iter()
        .map(|(name, mut agent, dirs)| {
            let status = agent.wait_ready(&dirs, PROGRAMMED).unwrap();
            let maps = Maps::open(&dirs.pins.layout()).unwrap();
            // Each agent enforces its own node's pods only, on their own interfaces.
            let local: Vec<(&str, Option<u64>)> = status["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["pod"].as_str().unwrap_or(""), e["ifindex"].as_u64()))
                .collect();
            let mine = if name == "node-a" {
                [&xa, &xb]
            } else {
                [&ya, &yb]
            };
            let want: Vec<(&str, Option<u64>)> = mine
                .iter()
                .map(|p| (p.name(), Some(u64::from(p.host_ifindex()))))
                .collect();
            assert_eq!(local, want, "{name} enforces the wrong pods or interfaces");
            Site {
                name,
                agent,
                dirs,
                maps,
            }
        })
        .collect();
    let site_b = sites.pop().unwrap();
    let site_a = sites.pop().unwrap();

    // Allowed across nodes, with replies through both nodes' connection tracking.
    let before = (
        site_a.counts("x/a", "egress"),
        site_b.counts("y/a", "ingress"),
    );
    assert_reaches(&xa, &ya);
    let after = (
        site_a.counts("x/a", "egress"),
        site_b.counts("y/a", "ingress"),
    );
    assert!(after.0 .0 > before.0 .0, "node A judged x/a's egress");
    assert!(after.1 .0 > before.1 .0, "node B judged y/a's ingress");
    assert_eq!((after.0 .1, after.1 .1), (before.0 .1, before.1 .1));
    // The reply direction was tracked on both nodes: every probe got its answer (above),
    // and the replies were let through as tracked. A bare segment the server sends after
    // the probe client has reset the connection may be dropped as untracked (the entry is
    // closed by the RST; seen once in a few runs, 54 bytes) — a late packet of a finished
    // connection, not a lost reply, so drops are not asserted to be zero here.
    let tracked = |site: &Site, pod: &str, dir: &str| {
        read_counters(&site.maps, Some(&[site.dirs.slot(pod).unwrap()]))
            .unwrap()
            .iter()
            .filter(|r| r.direction == dir && r.reason == "allowed-tracked")
            .map(|r| r.packets)
            .sum::<u64>()
    };
    assert!(
        tracked(&site_a, "x/a", "ingress") > 0,
        "replies into x/a not tracked"
    );
    assert!(
        tracked(&site_b, "y/a", "egress") > 0,
        "replies from y/a not tracked"
    );

    // Not isolated on either side.
    assert_reaches(&xb, &yb);
    assert_reaches(&yb, &xb);

    // Denied on the remote node's ingress: it left node A, node B dropped it.
    let a_out = site_a.counts("x/b", "egress");
    let b_in = site_b.counts("y/a", "ingress");
    assert_blocked(&xb, &ya);
    assert!(site_a.counts("x/b", "egress").0 > a_out.0, "left node A");
    assert!(
        site_b.counts("y/a", "ingress").1 > b_in.1,
        "node B dropped it"
    );

    // Denied on the local node's egress: node A dropped it, node B never saw it.
    let a_out = site_a.counts("x/a", "egress");
    let b_in = site_b.counts("y/b", "ingress");
    assert_blocked(&xa, &yb);
    assert!(
        site_a.counts("x/a", "egress").1 > a_out.1,
        "node A dropped it"
    );
    assert_eq!(site_b.counts("y/b", "ingress"), b_in, "reached node B");

    // The other way round: y/a opens nothing (node B's egress), x/a accepts nothing (node
    // A's ingress), while x/b still accepts y/b.
    let b_out = site_b.counts("y/a", "egress");
    assert_blocked(&ya, &xb);
    assert!(
        site_b.counts("y/a", "egress").1 > b_out.1,
        "node B dropped it"
    );
    let a_in = site_a.counts("x/a", "ingress");
    assert_blocked(&yb, &xa);
    assert!(
        site_a.counts("x/a", "ingress").1 > a_in.1,
        "node A dropped it"
    );

    // Both agents were up throughout.
    for s in [site_a, site_b] {
        let mut agent = s.agent;
        agent.wait_ready(&s.dirs, PROGRAMMED).unwrap();
    }
}
