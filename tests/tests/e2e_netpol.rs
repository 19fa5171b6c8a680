//! The NetworkPolicy conformance suite, end to end through the manifest directory, on the
//! upstream Kubernetes e2e netpol model: namespaces x, y, z labelled `ns`, pods a, b, c
//! labelled `pod`, every pod serving TCP and UDP on 80 and 81. One node and one agent run
//! the whole sequence of cases (once on a bridged node, once on a routed node); each case
//! writes its objects, waits until `status.json` shows their versions programmed, and
//! checks the full matrix — every ordered pod pair, TCP and UDP, ports 80 and 81 —
//! against an expectation written from the Kubernetes semantics for that case (a plain
//! predicate over the pods' names and labels, not the compiler).
//!
//! Cases follow the Kubernetes documentation and the descriptions of the upstream
//! `network_policy.go` tests.

#[path = "e2e_netpol/common.rs"]
mod common;

use std::time::Instant;

use common::{expr, labels, sel, Suite, Target};
use palisade::dataplane::ServiceOptions;
use palisade_tests::matrix::{NAMESPACES, PODS};
use palisade_tests::probe::{Family, Proto};
use palisade_tests::{require_root, Flavour, Model};
use serde_json::json;

fn run_suite(flavour: Flavour, tag: &'static str) {
    require_root();
    let started = Instant::now();
    let model = Model::new(tag, flavour).unwrap();
    let mut s = Suite::start(model, tag, ServiceOptions::default(), Target::PodIp);
    let setup = started.elapsed();
    s.check("no policy: everything reachable", &|_, _, _, _| true);

    // --- Default policies.
    s.apply("x", "deny-ingress", json!({"podSelector": {}}));
    s.check("default-deny-ingress", &|_, t, _, _| t.ns != "x");
    s.check_family("default-deny-ingress (IPv6)", Family::V6, &|_, t, _, _| {
        t.ns != "x"
    });
    s.reset();

    s.apply(
        "x",
        "deny-egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    s.check("default-deny-egress", &|f, _, _, _| f.ns != "x");
    s.reset();

    s.apply(
        "x",
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
    );
    s.check("default-deny-all", &|f, t, _, _| f.ns != "x" && t.ns != "x");
    s.check_family("default-deny-all (IPv6)", Family::V6, &|f, t, _, _| {
        f.ns != "x" && t.ns != "x"
    });
    // Policy delete: enforcement stops.
    s.delete_policy("x", "deny-all");
    s.check("deny-all deleted", &|_, _, _, _| true);
    s.reset();

    s.apply("x", "deny-ingress", json!({"podSelector": {}}));
    s.apply(
        "x",
        "allow-all-ingress",
        json!({"podSelector": {}, "ingress": [{}]}),
    );
    s.check(
        "allow-all ingress wins over default-deny-ingress",
        &|_, _, _, _| true,
    );
    s.reset();

    common::allow_all_egress_wins_over_default_deny(&mut s);

    // --- Selectors.
    s.apply(
        "x",
        "a-from-b",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [{"podSelector": sel(&[("pod", "b")])}]}]}),
    );
    s.check("podSelector peer (own namespace only)", &|f, t, _, _| {
        !t.is("x/a") || f.is("x/b")
    });
    s.reset();

    s.apply(
        "x",
        "a-from-y",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [{"namespaceSelector": sel(&[("ns", "y")])}]}]}),
    );
    s.check("namespaceSelector peer", &|f, t, _, _| {
        !t.is("x/a") || f.ns == "y"
    });
    s.reset();

    s.apply(
        "x",
        "a-from-y-name",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [{"namespaceSelector":
                sel(&[("kubernetes.io/metadata.name", "y")])}]}]}),
    );
    s.check(
        "namespaceSelector on the default kubernetes.io/metadata.name label",
        &|f, t, _, _| !t.is("x/a") || f.ns == "y",
    );
    s.reset();

    s.apply(
        "x",
        "a-and",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [{
                "namespaceSelector": {"matchExpressions": [expr("ns", "NotIn", &["x"])]},
                "podSelector": sel(&[("pod", "b")])}]}]}),
    );
    s.check(
        "namespaceSelector AND podSelector in one peer",
        &|f, t, _, _| !t.is("x/a") || (f.ns != "x" && f.pod() == "b"),
    );
    s.reset();

    s.apply(
        "x",
        "a-or",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [
                {"podSelector": sel(&[("pod", "b")])},
                {"namespaceSelector": sel(&[("ns", "y")])}]}]}),
    );
    s.check(
        "podSelector OR namespaceSelector (two peers)",
        &|f, t, _, _| !t.is("x/a") || f.is("x/b") || f.ns == "y",
    );
    s.reset();

    s.apply(
        "x",
        "in",
        json!({"podSelector": {"matchExpressions": [expr("pod", "In", &["a", "b"])]},
            "ingress": [{"from": [{"podSelector":
                {"matchExpressions": [expr("pod", "In", &["c"])]}}]}]}),
    );
    s.check("matchExpressions In", &|f, t, _, _| {
        !(t.is("x/a") || t.is("x/b")) || f.is("x/c")
    });
    s.reset();

    s.apply(
        "x",
        "notin-exists",
        json!({"podSelector": {"matchExpressions": [expr("pod", "Exists", &[])]},
            "ingress": [{"from": [{
                "namespaceSelector": {"matchExpressions": [expr("ns", "Exists", &[])]},
                "podSelector": {"matchExpressions": [expr("pod", "NotIn", &["a"])]}}]}]}),
    );
    s.check("matchExpressions NotIn and Exists", &|f, t, _, _| {
        t.ns != "x" || f.pod() != "a"
    });
    s.reset();

    s.set_ns_labels("z", labels(&[("ns", "z"), ("team", "blue")]));
    s.apply(
        "x",
        "doesnotexist",
        json!({"podSelector": {"matchExpressions": [expr("role", "DoesNotExist", &[])]},
            "ingress": [{"from": [{"namespaceSelector":
                {"matchExpressions": [expr("team", "DoesNotExist", &[])]}}]}]}),
    );
    s.check("matchExpressions DoesNotExist", &|f, t, _, _| {
        t.ns != "x" || !f.ns_labels.contains_key("team")
    });
    s.reset();

    // --- Ports and protocols.
    s.apply(
        "x",
        "a-81",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 81}]}]}),
    );
    s.check("numbered port (TCP by default)", &|_, t, port, proto| {
        !t.is("x/a") || (port == 81 && proto == Proto::Tcp)
    });
    s.reset();

    s.apply(
        "x",
        "a-named",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"ports": [{"port": "serve-81-tcp"},
                {"port": "serve-80-udp", "protocol": "UDP"}]}]}),
    );
    s.check("named ports, ingress", &|_, t, port, proto| {
        !t.is("x/a") || (port, proto) == (81, Proto::Tcp) || (port, proto) == (80, Proto::Udp)
    });
    s.reset();

    s.apply(
        "x",
        "a-named-egress",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}]}),
    );
    s.check(
        "named port, egress (resolved on the destination)",
        &|f, _, port, proto| !f.is("x/a") || (port, proto) == (80, Proto::Udp),
    );
    s.reset();

    s.apply(
        "x",
        "a-endport",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"ports": [{"port": 80, "endPort": 81, "protocol": "UDP"}]}]}),
    );
    s.apply(
        "y",
        "b-endport",
        json!({"podSelector": sel(&[("pod", "b")]),
            "ingress": [{"ports": [{"port": 81, "endPort": 1000}]}]}),
    );
    s.check("endPort ranges", &|_, t, port, proto| {
        (!t.is("x/a") || proto == Proto::Udp) && (!t.is("y/b") || (port, proto) == (81, Proto::Tcp))
    });
    s.reset();

    s.apply(
        "x",
        "a-udp",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"ports": [{"port": 80, "protocol": "UDP"}]}]}),
    );
    s.check("UDP-only rule does not allow TCP", &|_, t, port, proto| {
        !t.is("x/a") || (port, proto) == (80, Proto::Udp)
    });
    s.reset();

    s.apply(
        "x",
        "a-sctp",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}),
    );
    s.check("SCTP rule is not TCP nor UDP", &|_, t, _, _| !t.is("x/a"));
    s.reset();

    // --- ipBlock.
    common::egress_ip_block_with_except(&mut s);

    let xa = s.host("x/a");
    s.apply(
        "z",
        "c-from-block",
        json!({"podSelector": sel(&[("pod", "c")]),
            "ingress": [{"from": [{"ipBlock": {"cidr": xa}}]}]}),
    );
    s.check("ipBlock, ingress", &|f, t, _, _| {
        !t.is("z/c") || f.is("x/a")
    });
    s.reset();

    // --- Several policies and directions.
    s.apply(
        "x",
        "a-b-80",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [{"podSelector": sel(&[("pod", "b")])}], "ports": [{"port": 80}]}]}),
    );
    s.apply(
        "x",
        "a-y-81",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [{"namespaceSelector": sel(&[("ns", "y")])}],
                "ports": [{"port": 81}]}]}),
    );
    s.check("stacked policies add up", &|f, t, port, proto| {
        !t.is("x/a")
            || (proto == Proto::Tcp && ((f.is("x/b") && port == 80) || (f.ns == "y" && port == 81)))
    });
    s.reset();

    common::ingress_and_egress_in_one_policy(&mut s);

    common::client_egress_deny_holds_if_the_server_allows(&mut s);

    // --- Changes.
    s.apply(
        "x",
        "a-from",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [{"podSelector": sel(&[("pod", "b")])}]}]}),
    );
    s.check("before update", &|f, t, _, _| !t.is("x/a") || f.is("x/b"));
    s.apply(
        "x",
        "a-from",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [{"podSelector": sel(&[("pod", "c")])}]}]}),
    );
    s.check("policy updated", &|f, t, _, _| !t.is("x/a") || f.is("x/c"));
    s.reset();

    s.apply(
        "x",
        "a-from-updated-ns",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [{"namespaceSelector": sel(&[("ns2", "updated")])}]}]}),
    );
    s.check("before namespace relabel", &|_, t, _, _| !t.is("x/a"));
    s.set_ns_labels("y", labels(&[("ns", "y"), ("ns2", "updated")]));
    s.check("namespace relabelled into the selector", &|f, t, _, _| {
        !t.is("x/a") || f.ns == "y"
    });
    s.reset();

    s.apply(
        "x",
        "a-from-updated-pod",
        json!({"podSelector": sel(&[("pod", "a")]),
            "ingress": [{"from": [{"podSelector": sel(&[("pod2", "updated")])}]}]}),
    );
    s.check("before pod relabel", &|_, t, _, _| !t.is("x/a"));
    s.set_pod_labels("x/b", labels(&[("pod", "b"), ("pod2", "updated")]));
    s.check("pod relabelled into the peer selector", &|f, t, _, _| {
        !t.is("x/a") || f.is("x/b")
    });
    s.reset();

    s.apply(
        "x",
        "isolate-target",
        json!({"podSelector": sel(&[("target", "isolated")])}),
    );
    s.check("target label on no pod yet", &|_, _, _, _| true);
    s.set_pod_labels("x/a", labels(&[("pod", "a"), ("target", "isolated")]));
    s.check(
        "pod relabelled into the policy's podSelector",
        &|_, t, _, _| !t.is("x/a"),
    );
    s.reset();

    // --- A pod created after the policy is isolated from the start.
    s.apply("x", "deny-ingress", json!({"podSelector": {}}));
    s.apply(
        "x",
        "from-d",
        json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": sel(&[("pod", "d")])}]}]}),
    );
    s.add_pod("x/d");
    s.check("pod created after the policy (10 pods)", &|f, t, _, _| {
        t.ns != "x" || f.is("x/d")
    });
    s.remove_pod("x/d");
    s.reset();
    s.check("back to open after the last case", &|_, _, _, _| true);

    eprintln!(
        "[{tag}] {} matrix checks of {}x{} pods x 4 (port, protocol) in {:.1} s (setup {:.1} s)",
        s.checks,
        PODS.len() * NAMESPACES.len(),
        PODS.len() * NAMESPACES.len(),
        started.elapsed().as_secs_f64(),
        setup.as_secs_f64()
    );
}

#[test]
fn netpol_suite_on_a_bridged_node() {
    run_suite(Flavour::Bridged, "npbr");
}

#[test]
fn netpol_suite_on_a_routed_node() {
    run_suite(Flavour::Routed, "nprt");
}
