//! The upstream e2e netpol model reached through Services (issue #7): each of the nine
//! model pods (namespaces x, y, z × pods a, b, c, serving TCP and UDP on 80 and 81) has its
//! own Service, whose ClusterIP kube-proxy's rules in the node's namespace DNAT to that pod
//! on the same port (TCP and UDP, 80 and 81). The real agent runs in-process with
//! `--service-cidr`, fed a manifest directory, and every matrix is probed by ClusterIP
//! instead of pod IP (the same `common::Suite` as `e2e_netpol.rs`, with
//! `Target::ClusterIp`). The API judges a connection to a Service on the backend it
//! reaches (egress of the client, ingress of the backend), so each case's expected matrix
//! is exactly the pod-IP expectation of the same case in `e2e_netpol.rs`: a predicate over
//! the pods' names and labels, not the compiler. A pod probing its own ClusterIP is not
//! judged (the model skips self pairs, and that hairpin would need masquerade).
//!
//! On both kinds of node the CNI plugins make: every case on a bridged node with
//! kube-proxy in iptables mode and on a routed node with kube-proxy in nftables mode
//! (`palisade_tests::kube_proxy`), and the core cases with the modes swapped.
//!
//! The bridged node's hairpin: a pod reaching a backend on the same bridge through a
//! ClusterIP is DNATed by the host, but the backend's reply is addressed to a neighbour on
//! the bridge and would be switched straight back, never seeing the host's netfilter, so
//! never un-DNATed (the client would get a reply from the backend's IP and drop it).
//! Real clusters on bridged CNIs (bridge plugin, flannel, docker) solve it the way
//! kube-proxy documents and kubeadm's preflight checks: `br_netfilter` with
//! `net.bridge.bridge-nf-call-iptables=1` (and `…-ip6tables=1`), so bridged frames pass
//! the IP hooks and conntrack un-DNATs the reply. (The other cure, masquerading pod →
//! ClusterIP traffic, would show the backend the node's address instead of the client's,
//! which the API's ingress semantics rule out.) This test takes the br_netfilter way. The
//! sysctls are per network namespace on this kernel, so they are set in the bridged
//! node's namespace only (after `modprobe br_netfilter` if that namespace lacks them),
//! never in the root namespace. (With them at 0, no pair of the bridged node answers
//! through a ClusterIP.) The routed node needs nothing: every packet is routed by the host.
//!
//! The agent needs an uplink for service packets to remote backends; every backend here
//! is local, so it is one end of a veth pair inside the node's namespace (this kernel has
//! no dummy driver) that no packet uses.

#[path = "e2e_netpol/common.rs"]
mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::time::Instant;

use common::{expr, labels, sel, ProxyMode, Suite, Target, View, COMBOS};
use palisade::dataplane::ServiceOptions;
use palisade_common::SVC_DEFAULT_MARK_MASK;
use palisade_tests::kube_proxy::ServicePort;
use palisade_tests::probe::{Family, Proto};
use palisade_tests::{require_root, Flavour, Model, NetNs};
use serde_json::json;

/// Inside 198.19.0.0/16 below the underlays (see `palisade_tests::cni`), and a v6 range
/// inside fd00:198:18::/48 no node subnet (decimal digits as hex groups) or underlay
/// (`f0NN`) can take.
const SERVICE_CIDR_V4: &str = "198.19.192.0/24";
const SERVICE_CIDR_V6: &str = "fd00:198:18:c1::/112";
/// The agent's uplink (see the module doc) and its veth peer.
const UPLINK: &str = "svcup0";
const UPLINK_PEER: &str = "svcup1";
/// The pod a case creates after its policies (with its Service).
const LATE_POD: &str = "x/d";

/// The ClusterIP of the Service of the model pod at `index`.
fn cluster_ip(family: Family, index: usize) -> IpAddr {
    let host = 10 + index as u8;
    match family {
        Family::V4 => Ipv4Addr::new(198, 19, 192, host).into(),
        Family::V6 => Ipv6Addr::new(0xfd00, 0x198, 0x18, 0xc1, 0, 0, 0, host.into()).into(),
    }
}

/// The suite on a `flavour` node whose model pods are reached through their own Services,
/// whose rules kube-proxy in `mode` wrote; also the addresses [`LATE_POD`]'s Service
/// sends to.
fn start(flavour: Flavour, mode: ProxyMode, tag: &'static str) -> (Suite, (Ipv4Addr, Ipv6Addr)) {
    let model = Model::new(tag, flavour).unwrap();
    let node = model.node().ns();
    if flavour == Flavour::Bridged {
        bridge_calls_netfilter(node);
    }
    node.ip(&[
        "link",
        "add",
        UPLINK,
        "type",
        "veth",
        "peer",
        "name",
        UPLINK_PEER,
    ])
    .unwrap();
    node.ip(&["link", "set", UPLINK, "up"]).unwrap();

    // One Service per model pod, and one for the pod a case creates later, whose
    // addresses the node will hand out next (kube-proxy would add it once the pod is
    // ready; its rules are in place before, so only Palisade's programming is timed).
    let (late_v4, late_v6) = model.node().next_pod_ips();
    let backends = model
        .pods()
        .iter()
        .map(|mp| (mp.name.clone(), mp.pod.ipv4(), mp.pod.ipv6()))
        .chain([(LATE_POD.to_string(), late_v4, late_v6)]);
    let mut vips = BTreeMap::new();
    let mut ports = Vec::new();
    for (i, (name, ip4, ip6)) in backends.enumerate() {
        let (v4, v6) = (cluster_ip(Family::V4, i), cluster_ip(Family::V6, i));
        vips.insert(name, (v4, v6));
        for (vip, ip) in [(v4, IpAddr::from(ip4)), (v6, IpAddr::from(ip6))] {
            for (port, proto) in COMBOS {
                ports.push(ServicePort {
                    cluster_ip: vip,
                    proto,
                    port,
                    endpoints: vec![SocketAddr::new(ip, port)],
                });
            }
        }
    }
    mode.install(node, &ports, &[]);

    let services = ServiceOptions {
        cidrs: vec![
            SERVICE_CIDR_V4.parse().unwrap(),
            SERVICE_CIDR_V6.parse().unwrap(),
        ],
        mark_mask: SVC_DEFAULT_MARK_MASK,
        uplinks: vec![UPLINK.to_string()],
    };
    let suite = Suite::start(model, tag, services, Target::ClusterIp(vips));
    (suite, (late_v4, late_v6))
}

/// `net.bridge.bridge-nf-call-ip{,6}tables=1` in the bridged node's namespace (see the
/// module doc), loading `br_netfilter` first if the namespace has no such sysctl.
fn bridge_calls_netfilter(node: &NetNs) {
    const KEYS: [&str; 2] = [
        "net.bridge.bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-ip6tables",
    ];
    if node.sysctl_get(KEYS[0]).is_err() {
        let out = Command::new("modprobe")
            .arg("br_netfilter")
            .output()
            .expect("spawning modprobe");
        assert!(
            out.status.success(),
            "modprobe br_netfilter: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for key in KEYS {
        node.sysctl(key, "1").unwrap();
        assert_eq!(node.sysctl_get(key).unwrap(), "1", "{key}");
    }
}

/// Egress judged on the backend kube-proxy picked (including the usual DNS exception),
/// ingress judged by the backend's own check on the client behind the ClusterIP, and a
/// policy updated and deleted.
fn core_cases(s: &mut Suite) {
    s.apply(
        "x",
        "deny-egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    s.check("default-deny-egress", &|f, _, _, _| f.ns != "x");
    s.check_family("default-deny-egress (IPv6)", Family::V6, &|f, _, _, _| {
        f.ns != "x"
    });
    s.reset();

    s.apply(
        "x",
        "a-to-b",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": sel(&[("pod", "b")])}]}]}),
    );
    s.check(
        "egress to a podSelector (own namespace only)",
        &|f, t, _, _| !f.is("x/a") || t.is("x/b"),
    );
    s.check_family(
        "egress to a podSelector (own namespace only) (IPv6)",
        Family::V6,
        &|f, t, _, _| !f.is("x/a") || t.is("x/b"),
    );
    s.reset();

    s.apply(
        "x",
        "a-named-egress",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": "serve-80-udp", "protocol": "UDP"},
                {"port": "serve-81-tcp"}]}]}),
    );
    s.check(
        "egress on named ports (resolved on the backend)",
        &|f, _, port, proto| {
            !f.is("x/a") || (port, proto) == (80, Proto::Udp) || (port, proto) == (81, Proto::Tcp)
        },
    );
    s.reset();

    // Default-deny egress, then the usual DNS exception: UDP to the resolver pods (z/c
    // plays kube-dns, port 81 plays 53).
    s.apply(
        "x",
        "deny-egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    s.apply(
        "x",
        "allow-dns",
        json!({"podSelector": {}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": sel(&[("ns", "z")]),
                    "podSelector": sel(&[("pod", "c")])}],
                "ports": [{"port": 81, "protocol": "UDP"}]}]}),
    );
    s.check(
        "deny-all egress, then DNS-like UDP allowed",
        &|f, t, port, proto| f.ns != "x" || (t.is("z/c") && (port, proto) == (81, Proto::Udp)),
    );
    s.check_family(
        "deny-all egress, then DNS-like UDP allowed (IPv6)",
        Family::V6,
        &|f, t, port, proto| f.ns != "x" || (t.is("z/c") && (port, proto) == (81, Proto::Udp)),
    );
    s.reset();

    // Ingress only: the backend's own check sees the client behind the ClusterIP.
    s.apply("x", "deny-ingress", json!({"podSelector": {}}));
    s.check("default-deny-ingress", &|_, t, _, _| t.ns != "x");
    s.reset();

    s.apply(
        "x",
        "a-from-y-named",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [{"namespaceSelector": sel(&[("ns", "y")])}],
                "ports": [{"port": "serve-80-tcp"}]}]}),
    );
    s.check(
        "ingress from a namespaceSelector on a named port",
        &|f, t, port, proto| !t.is("x/a") || (f.ns == "y" && (port, proto) == (80, Proto::Tcp)),
    );
    s.check_family(
        "ingress from a namespaceSelector on a named port (IPv6)",
        Family::V6,
        &|f, t, port, proto| !t.is("x/a") || (f.ns == "y" && (port, proto) == (80, Proto::Tcp)),
    );
    s.reset();

    common::ingress_and_egress_in_one_policy(s);

    // Both ends isolated: the deferred egress check of the client and the backend's own
    // ingress check run one after the other on the backend's hook.
    s.apply(
        "x",
        "a-to-b",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": sel(&[("pod", "b")])}],
                "ports": [{"port": 80}, {"port": 81, "protocol": "UDP"}]}]}),
    );
    s.apply(
        "x",
        "b-from-a",
        json!({"podSelector": sel(&[("pod", "b")]),
            "ingress": [{"from": [{"podSelector": sel(&[("pod", "a")])}],
                "ports": [{"port": 80}, {"port": 80, "protocol": "UDP"}]}]}),
    );
    // x/a → x/b: TCP 80 passes both; UDP 81 only the egress check, UDP 80 only the
    // ingress check.
    let both_ends = |f: &View, t: &View, port, proto| {
        let pp = (port, proto);
        let egress =
            !f.is("x/a") || (t.is("x/b") && [(80, Proto::Tcp), (81, Proto::Udp)].contains(&pp));
        let ingress =
            !t.is("x/b") || (f.is("x/a") && [(80, Proto::Tcp), (80, Proto::Udp)].contains(&pp));
        egress && ingress
    };
    s.check(
        "client egress and backend ingress both isolated",
        &both_ends,
    );
    s.check_family(
        "client egress and backend ingress both isolated (IPv6)",
        Family::V6,
        &both_ends,
    );
    s.reset();

    s.apply(
        "x",
        "a-to",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": sel(&[("pod", "b")])}]}]}),
    );
    s.check("egress before update", &|f, t, _, _| {
        !f.is("x/a") || t.is("x/b")
    });
    s.apply(
        "x",
        "a-to",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": sel(&[("pod", "c")])}]}]}),
    );
    s.check("egress policy updated", &|f, t, _, _| {
        !f.is("x/a") || t.is("x/c")
    });
    s.delete_policy("x", "a-to");
    s.check("egress policy deleted", &|_, _, _, _| true);
    s.reset();
}

/// The other egress-relevant cases of the upstream suite; `late_ips`: the addresses
/// [`LATE_POD`]'s Service sends to.
fn more_cases(s: &mut Suite, late_ips: (Ipv4Addr, Ipv6Addr)) {
    s.apply(
        "x",
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    );
    s.check("default-deny-all", &|f, t, _, _| f.ns != "x" && t.ns != "x");
    s.delete_policy("x", "deny-all");
    s.check("deny-all deleted", &|_, _, _, _| true);
    s.reset();

    common::allow_all_egress_wins_over_default_deny(s);

    s.apply(
        "x",
        "a-to-y",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": sel(&[("ns", "y")])}]}]}),
    );
    s.check("egress to a namespaceSelector", &|f, t, _, _| {
        !f.is("x/a") || t.ns == "y"
    });
    s.reset();

    s.apply(
        "x",
        "a-to-and",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{
                "namespaceSelector": {"matchExpressions": [expr("ns", "NotIn", &["x"])]},
                "podSelector": sel(&[("pod", "b")])}]}]}),
    );
    s.check(
        "egress to namespaceSelector AND podSelector in one peer",
        &|f, t, _, _| !f.is("x/a") || (t.ns != "x" && t.name.ends_with("/b")),
    );
    s.reset();

    s.apply(
        "x",
        "a-endport",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": 80, "endPort": 81, "protocol": "UDP"}]}]}),
    );
    s.apply(
        "y",
        "b-endport",
        json!({"podSelector": sel(&[("pod", "b")]), "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": 81, "endPort": 1000}]}]}),
    );
    s.check("egress endPort ranges", &|f, _, port, proto| {
        (!f.is("x/a") || proto == Proto::Udp) && (!f.is("y/b") || (port, proto) == (81, Proto::Tcp))
    });
    s.reset();

    s.apply(
        "x",
        "a-sctp",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}),
    );
    s.check("egress SCTP rule is not TCP nor UDP", &|f, _, _, _| {
        !f.is("x/a")
    });
    s.reset();

    // An ipBlock sees the backend too (the ClusterIP is outside the pod CIDR).
    common::egress_ip_block_with_except(s);

    common::client_egress_deny_holds_if_the_server_allows(s);

    // Labels change under a live policy: the backend's identity (peer) or the client's
    // (subject) moves.
    s.apply(
        "x",
        "a-to-updated-ns",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": sel(&[("ns2", "updated")])}]}]}),
    );
    s.check("egress before namespace relabel", &|f, _, _, _| {
        !f.is("x/a")
    });
    s.set_ns_labels("y", labels(&[("ns", "y"), ("ns2", "updated")]));
    s.check(
        "namespace relabelled into the egress peer selector",
        &|f, t, _, _| !f.is("x/a") || t.ns == "y",
    );
    s.reset();

    s.apply(
        "x",
        "a-to-updated-pod",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": sel(&[("pod2", "updated")])}]}]}),
    );
    s.set_pod_labels("x/b", labels(&[("pod", "b"), ("pod2", "updated")]));
    s.check(
        "pod relabelled into the egress peer selector",
        &|f, t, _, _| !f.is("x/a") || t.is("x/b"),
    );
    s.reset();

    s.apply(
        "x",
        "isolate-target",
        json!({"podSelector": sel(&[("target", "isolated")]), "policyTypes": ["Egress"]}),
    );
    s.set_pod_labels("x/a", labels(&[("pod", "a"), ("target", "isolated")]));
    s.check(
        "pod relabelled into an egress policy's podSelector",
        &|f, _, _, _| !f.is("x/a"),
    );
    s.reset();

    // A pod created after the policies, reached through its own Service: its egress is
    // isolated from the start, and the client's egress policy selects it as a backend.
    s.apply(
        "x",
        "d-to-y",
        json!({"podSelector": sel(&[("pod", "d")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": sel(&[("ns", "y")])}]}]}),
    );
    s.apply(
        "x",
        "a-to-d",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": sel(&[("pod", "d")])}]}]}),
    );
    s.check("before the pod exists", &|f, _, _, _| !f.is("x/a"));
    s.add_pod(LATE_POD);
    let late = s.model.pod(LATE_POD);
    assert_eq!(
        (late.ipv4(), late.ipv6()),
        late_ips,
        "{LATE_POD} did not get the addresses its Service's endpoints point to"
    );
    s.check("pod created after the policies (10 pods)", &|f, t, _, _| {
        (!f.is("x/d") || t.ns == "y") && (!f.is("x/a") || t.is("x/d"))
    });
    s.remove_pod(LATE_POD);
    s.reset();
}

/// Which cases a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cases {
    /// Every case of this file.
    All,
    /// The egress, DNS, ingress and update cases only (the other kube-proxy mode on a
    /// node: what differs is the rules' shape, not Palisade's path).
    Core,
}

fn run_suite(flavour: Flavour, mode: ProxyMode, cases: Cases, tag: &'static str) {
    require_root();
    let started = Instant::now();
    let (mut s, late_ips) = start(flavour, mode, tag);
    let setup = started.elapsed();
    s.check("no policy: every ClusterIP answers", &|_, _, _, _| true);

    core_cases(&mut s);
    if cases == Cases::All {
        more_cases(&mut s, late_ips);
    }
    s.check("back to open after the last case", &|_, _, _, _| true);

    eprintln!(
        "[{tag}] {flavour:?} node, kube-proxy {mode:?}, {cases:?} cases: {} matrix checks \
         (9 or 10 pods x 4 (port, protocol), by ClusterIP), {} cells, in {:.1} s (setup {:.1} s)",
        s.checks,
        s.cells,
        started.elapsed().as_secs_f64(),
        setup.as_secs_f64()
    );
}

// Full runs first: the test harness starts tests in name order, two at a time here.
#[test]
fn netpol_suite_through_cluster_ips_bridged_node_kube_proxy_iptables() {
    run_suite(Flavour::Bridged, ProxyMode::Iptables, Cases::All, "nsbrip");
}

#[test]
fn netpol_suite_through_cluster_ips_routed_node_kube_proxy_nftables() {
    run_suite(Flavour::Routed, ProxyMode::Nftables, Cases::All, "nsrtnf");
}

#[test]
fn other_kube_proxy_mode_through_cluster_ips_bridged_node_nftables() {
    run_suite(Flavour::Bridged, ProxyMode::Nftables, Cases::Core, "nsbrnf");
}

#[test]
fn other_kube_proxy_mode_through_cluster_ips_routed_node_iptables() {
    run_suite(Flavour::Routed, ProxyMode::Iptables, Cases::Core, "nsrtip");
}
