//! Tier 3 through the whole agent: manifests in a directory → compiler → maps → verdicts on
//! the wire, on the upstream e2e netpol model (namespaces x, y, z; pods a, b, c serving 80
//! and 81), on a bridged and a routed node made by the CNI plugins.

use palisade_tests::cases::{ALLOW_A_FROM_Y_ON_NAMED_80, DENY_EGRESS_Z_C, DENY_INGRESS_X};
use palisade_tests::http::{http_get, sample};
use palisade_tests::inproc::ManifestAgent;
use palisade_tests::{require_root, Flavour, Model, Proto};

const NODE: &str = "n1";
const HTTP_ADDR: &str = "127.0.0.1:9977";

/// The agent in the node's namespace on the model's objects, serving HTTP; waits for the
/// model's pods to be programmed.
fn start_agent(model: &Model, tag: &str) -> ManifestAgent {
    let agent = ManifestAgent::spawn(
        model.node().ns(),
        NODE,
        &format!("e2e-{tag}"),
        &[("00-model.yaml", &model_yaml(model))],
        // The node namespace has its own loopback, so the port cannot collide.
        |cfg| cfg.http_addr = Some(HTTP_ADDR.parse().unwrap()),
    );
    agent.agent.wait_programmed(&["Pod/x/a", "Pod/z/c"]);
    agent
}

/// The first drop event of `pod` in the ring buffer, through `palisade monitor`'s code.
fn first_drop_event(agent: &ManifestAgent, pod: &str) -> palisade::cli::monitor::Event {
    use palisade::cli::monitor::{stream, MonitorArgs};
    let args = MonitorArgs {
        filters: palisade::cli::Filters {
            namespace: None,
            pod: Some(pod.into()),
            reason: Some("dropped-no-rule".into()),
        },
        json: false,
        count: Some(1),
        duration: Some(10.0),
        dirs: palisade::cli::Dirs {
            bpffs_dir: agent.layout().root().to_owned(),
            run_dir: agent.agent.run_dir().to_owned(),
        },
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut found = None;
    rt.block_on(stream(&args, |ev| {
        found = Some(ev.clone());
        false
    }))
    .unwrap();
    found.unwrap_or_else(|| panic!("no drop event of {pod} within 10 s"))
}

/// `palisade explain SRC DST PORT` with no --manifests, in the node's namespace, as a user
/// on the node runs it: the verdict it prints.
fn explain_live(model: &Model, agent: &ManifestAgent, src: &str, dst: &str, port: &str) -> bool {
    use clap::Parser as _;
    let run_dir = agent.agent.run_dir().to_str().unwrap();
    let cli = palisade::cli::Cli::try_parse_from([
        "palisade",
        "explain",
        src,
        dst,
        port,
        "--run-dir",
        run_dir,
    ])
    .unwrap();
    let palisade::cli::Command::Explain(args) = cli.command else {
        unreachable!()
    };
    model
        .node()
        .ns()
        .run(|| palisade::cli::explain::run(args))
        .unwrap()
}

fn model_yaml(model: &Model) -> String {
    let mut s = String::new();
    for ns in ["x", "y", "z"] {
        s += &format!("---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    ns: {ns}\n");
    }
    for name in model.names() {
        let pod = model.pod(&name);
        let (ns, p) = name.split_once('/').unwrap();
        s += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {p}\n  namespace: {ns}\n  labels:\n    pod: {p}\nspec:\n  nodeName: {NODE}\n  containers:\n  - name: c\n    image: agnhost\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80, protocol: TCP}}\n    - {{name: serve-81-tcp, containerPort: 81, protocol: TCP}}\n    - {{name: serve-80-udp, containerPort: 80, protocol: UDP}}\n    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}\nstatus:\n  phase: Running\n  podIP: {v4}\n  podIPs: [{{ip: {v4}}}, {{ip: {v6}}}]\n",
            v4 = pod.ipv4(),
            v6 = pod.ipv6(),
        );
    }
    s
}

fn policies_change_the_matrix(flavour: Flavour, tag: &str) {
    require_root();
    let model = Model::new(tag, flavour).unwrap();
    let agent = start_agent(&model, tag);

    model.assert_reach(&model.expect(true), 80, Proto::Tcp);

    // Default-deny ingress in x: nothing reaches x's pods.
    agent.apply(
        "10-deny.yaml",
        DENY_INGRESS_X,
        &["NetworkPolicy/x/deny-ingress"],
    );
    let mut want = model.expect(true);
    for p in ["x/a", "x/b", "x/c"] {
        want.set_to(p, false);
    }
    model.assert_reach(&want, 80, Proto::Tcp);

    // The drops just probed show on /metrics under the pod's name, and the agent is ready.
    assert_eq!(http_get(model.node().ns(), HTTP_ADDR, "/readyz").0, 200);
    assert_eq!(http_get(model.node().ns(), HTTP_ADDR, "/healthz").0, 200);
    let (code, text) = http_get(model.node().ns(), HTTP_ADDR, "/metrics");
    assert_eq!(code, 200);
    let dropped = sample(
        &text,
        "palisade_packets_total",
        &[
            "namespace=\"x\"",
            "pod=\"a\"",
            "reason=\"dropped-no-rule\"",
            "direction=\"ingress\"",
        ],
    );
    assert!(
        dropped.is_some_and(|n| n >= 1.0),
        "no drops of x/a in /metrics:\n{text}"
    );
    assert_eq!(
        sample(&text, "palisade_objects", &["kind=\"NetworkPolicy\""]),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "palisade_programming_latency_seconds_count", &[]).is_some_and(|n| n >= 2.0)
    );

    // `palisade monitor` names those drops: the pod judged, its direction and the peer pod.
    let ev = first_drop_event(&agent, "x/a");
    assert_eq!(
        (ev.direction, ev.reason, ev.dport, ev.proto.as_str()),
        ("ingress", "dropped-no-rule", 80, "TCP")
    );
    assert!(
        model
            .names()
            .iter()
            .any(|p| ev.src.starts_with(&format!("{p} ("))),
        "source not named as a pod: {}",
        ev.src
    );
    assert_eq!(
        ev.isolated_by,
        ["x/deny-ingress"],
        "isolating policies of x/a"
    );

    // `palisade explain` against the live agent agrees with the wire.
    assert!(!explain_live(&model, &agent, "y/a", "x/a", "80"));
    assert!(explain_live(&model, &agent, "x/a", "y/a", "80"));

    // Plus: x/a accepts namespace y on the named port serve-80-tcp (80), not on 81.
    agent.apply(
        "20-allow.yaml",
        ALLOW_A_FROM_Y_ON_NAMED_80,
        &["NetworkPolicy/x/allow-a-from-y"],
    );
    let mut want80 = want.clone();
    for p in ["y/a", "y/b", "y/c"] {
        want80.set(p, "x/a", true);
    }
    model.assert_reach(&want80, 80, Proto::Tcp);
    model.assert_reach(&want, 81, Proto::Tcp);

    // Deleting the deny restores x for everyone but keeps the allow's isolation of x/a.
    agent.delete("10-deny.yaml", "NetworkPolicy/x/deny-ingress");
    let mut after = model.expect(true);
    after.set_to("x/a", false);
    for p in ["y/a", "y/b", "y/c"] {
        after.set(p, "x/a", true);
    }
    model.assert_reach(&after, 80, Proto::Tcp);

    // Egress isolation of z/c: its connections fail, replies to others still flow.
    agent.apply(
        "30-egress.yaml",
        DENY_EGRESS_Z_C,
        &["NetworkPolicy/z/deny-egress-c"],
    );
    after.set_from("z/c", false);
    model.assert_reach(&after, 80, Proto::Tcp);
}

#[test]
fn agent_enforces_policy_changes_on_a_bridged_node() {
    policies_change_the_matrix(Flavour::Bridged, "agbr");
}

#[test]
fn agent_enforces_policy_changes_on_a_routed_node() {
    policies_change_the_matrix(Flavour::Routed, "agrt");
}
