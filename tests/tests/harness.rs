//! Tests of the harness itself: real CNI pods, real sockets, real cleanup.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use palisade_tests::cni::ifindex_in;
use palisade_tests::matrix::{assert_matrix, Model};
use palisade_tests::probe::{tcp_connect, udp_probe, Family, ProbeError, Prober, Proto, Server};
use palisade_tests::{netns, require_root, Flavour, Node, Pod};

const T: Duration = Duration::from_secs(2);

fn serve(pod: &Pod, port: u16) -> Vec<Server> {
    vec![
        Server::tcp(pod.ns(), port, pod.name()).unwrap(),
        Server::udp(pod.ns(), port, pod.name()).unwrap(),
    ]
}

/// Both protocols, both families, both directions, plus "refused" on a
/// port nobody serves.
fn assert_pods_talk(a: &Pod, b: &Pod) {
    let _sa = serve(a, 80);
    let _sb = serve(b, 80);
    for (from, to) in [(a, b), (b, a)] {
        for f in Family::BOTH {
            let ip = to.ip(f);
            assert_eq!(
                tcp_connect(from.ns(), ip, 80, T).as_deref(),
                Ok(to.name()),
                "tcp {ip}"
            );
            assert_eq!(
                udp_probe(from.ns(), ip, 80, T).as_deref(),
                Ok(to.name()),
                "udp {ip}"
            );
            assert_eq!(
                tcp_connect(from.ns(), ip, 9, T),
                Err(ProbeError::Refused),
                "tcp {ip}:9"
            );
            assert_eq!(
                udp_probe(from.ns(), ip, 9, T),
                Err(ProbeError::Refused),
                "udp {ip}:9"
            );
        }
    }
}

fn same_node(flavour: Flavour) {
    require_root();
    let node = Node::new("same", flavour).unwrap();
    let a = node.add_pod("x/a").unwrap();
    let b = node.add_pod("x/b").unwrap();
    assert_ne!(a.host_ifname(), b.host_ifname());
    assert_eq!(
        ifindex_in(node.ns(), a.host_ifname()),
        Some(a.host_ifindex())
    );
    // In-process sysctl writes must land in the namespace, not the caller's.
    let dad = node
        .ns()
        .exec(&["sysctl", "-n", "net.ipv6.conf.default.accept_dad"]);
    assert_eq!(dad.unwrap().trim(), "0");
    if flavour == Flavour::Routed {
        let route = node
            .ns()
            .ip(&["route", "get", &b.ipv4().to_string()])
            .unwrap();
        assert!(route.contains(b.host_ifname()), "{route}");
    }
    assert_pods_talk(&a, &b);
}

#[test]
fn bridged_pods_reach_each_other() {
    same_node(Flavour::Bridged);
}

#[test]
fn routed_pods_reach_each_other() {
    same_node(Flavour::Routed);
}

#[test]
fn pods_on_joined_nodes_reach_each_other() {
    require_root();
    let na = Node::bridged("ra").unwrap();
    let nb = Node::routed("rb").unwrap();
    assert_ne!(na.pod_cidr_v4(), nb.pod_cidr_v4());
    let _link = na.join(&nb).unwrap();
    let a = na.add_pod("x/a").unwrap();
    let b = nb.add_pod("y/b").unwrap();
    assert_pods_talk(&a, &b);
}

#[test]
fn everything_is_removed_even_on_panic() {
    require_root();
    let mut names = HashSet::new();
    let mut veths = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let na = Node::bridged("cl").unwrap();
        let nb = Node::routed("cl").unwrap();
        let _link = na.join(&nb).unwrap();
        let pods: Vec<Pod> = (0..2)
            .flat_map(|i| {
                [
                    na.add_pod(&format!("p{i}")).unwrap(),
                    nb.add_pod("q").unwrap(),
                ]
            })
            .collect();
        names.extend([na.ns().name().to_string(), nb.ns().name().to_string()]);
        names.extend(pods.iter().map(|p| p.ns().name().to_string()));
        let _servers = serve(&pods[0], 80);
        let _prober = Prober::start(
            pods[1].ns(),
            pods[0].addr(Family::V4, 80),
            Duration::from_millis(5),
            Duration::from_millis(200),
        )
        .unwrap();

        // Dropping one pod while its node lives must take its host veth.
        let victim = nb.add_pod("victim").unwrap();
        let (vname, vveth) = (
            victim.ns().name().to_string(),
            victim.host_ifname().to_string(),
        );
        drop(victim);
        assert!(!netns::list().unwrap().contains(&vname));
        assert_eq!(ifindex_in(nb.ns(), &vveth), None);
        let links = nb.ns().ip(&["-br", "link"]).unwrap();
        assert!(!links.contains(&vveth), "{links}");
        veths.push(vveth);

        panic!("deliberate panic with live guards");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 6);
    let left: Vec<String> = netns::list()
        .unwrap()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[test]
fn prober_sees_outage_and_recovery() {
    require_root();
    let node = Node::routed("pr").unwrap();
    let a = node.add_pod("a").unwrap();
    let b = node.add_pod("b").unwrap();
    let server = Server::tcp(b.ns(), 81, "b").unwrap();
    let prober = Prober::start(
        a.ns(),
        b.addr(Family::V6, 81),
        Duration::from_millis(5),
        Duration::from_millis(200),
    )
    .unwrap();
    assert!(
        prober.wait_for(T, |l| l.successes() >= 5),
        "{:?}",
        prober.snapshot()
    );
    drop(server);
    assert!(prober.wait_for(T, |l| l.failures() >= 5));
    let _server = Server::tcp(b.ns(), 81, "b").unwrap();
    let back = prober.snapshot().attempts.len();
    assert!(prober.wait_for(T, |l| l.since_index(back).successes() >= 3));
    let log = prober.stop();
    assert!(
        log.failed().all(|(_, e)| *e == ProbeError::Refused),
        "{log:?}"
    );
    assert!(log.longest_outage() > Duration::ZERO);
    assert!(log
        .attempts
        .iter()
        .all(|a| a.result.as_deref().unwrap_or("b") == "b"));
}

fn model_matrix(flavour: Flavour) {
    require_root();
    let t0 = Instant::now();
    let model = Model::new("mx", flavour).unwrap();
    let built = t0.elapsed();

    let t1 = Instant::now();
    let all = model.expect(true);
    assert_matrix(&all, &model.probe_matrix(80, Proto::Tcp));
    assert_matrix(&all, &model.probe_matrix_family(Family::V6, 81, Proto::Udp));
    let open = t1.elapsed();

    // Drop everything x/a sends at its host veth (tc ingress = from the pod).
    // Stateless, so replies die too: x/a is isolated both ways, and shows
    // up as timeouts (what a policy drop looks like), not refusals.
    let veth = model.pod("x/a").host_ifname().to_string();
    let ns = model.node().ns();
    ns.exec(&["tc", "qdisc", "add", "dev", &veth, "clsact"])
        .unwrap();
    ns.exec(&[
        "tc",
        "filter",
        "add",
        "dev",
        &veth,
        "ingress",
        "bpf",
        "da",
        "bytecode",
        "1,6 0 0 2,",
    ])
    .unwrap();
    let t2 = Instant::now();
    let observed = model.probe_matrix(81, Proto::Tcp);
    let denied = t2.elapsed();
    let mut want = model.expect(true);
    want.set_from("x/a", false).set_to("x/a", false);
    assert_matrix(&want, &observed);
    let table = palisade_tests::truth_table(&all, &observed);
    assert!(table.contains("comparison (16 wrong of 72)"), "{table}");
    assert!(
        table.contains("x/a -> z/c: expected reachable, got timeout"),
        "{table}"
    );
    assert!(
        denied < Duration::from_secs(4),
        "denied matrix took {denied:?}"
    );
    eprintln!(
        "{flavour:?}: model {built:?}, 2 open matrices {open:?}, 1 with a denied row {denied:?}"
    );
}

#[test]
fn bridged_model_matrix() {
    model_matrix(Flavour::Bridged);
}

#[test]
fn routed_model_matrix() {
    model_matrix(Flavour::Routed);
}
