//! Full maps through the whole agent, with real traffic: the agent runs with POLICY or
//! IDENTITY_V4 shrunk to a handful of entries, so that a policy's entries do not all fit.
//! What must hold: the agent keeps running, the isolated pod stays isolated (nothing is
//! allowed that the policies do not allow), the flows whose entries fit keep passing, the
//! status and `/metrics` name the full map, and the error clears once there is room.

use std::time::Duration;

use palisade::dataplane::Maps;
use palisade_common::maps as names;
use palisade_tests::http;
use palisade_tests::inproc::{ManifestAgent, PROGRAM_TIMEOUT};
use palisade_tests::manifests;
use palisade_tests::probe::{expecting_reply, tcp_connect, ProbeError};
use palisade_tests::{require_root, Family, Node, Pod, Server};
use serde_json::Value;

const NODE: &str = "n1";
const HTTP_ADDR: &str = "127.0.0.1:9979";
/// How long a probe that must be dropped waits for an answer.
const DENIED: Duration = Duration::from_millis(700);
const ALLOWED: Duration = Duration::from_secs(1);

/// An in-process agent on its own manifest directory and pins.
struct Agent(ManifestAgent);

impl std::ops::Deref for Agent {
    type Target = ManifestAgent;
    fn deref(&self) -> &ManifestAgent {
        &self.0
    }
}

impl Agent {
    /// Starts with `objects` and the given map sizes, serving `/metrics` if `http`; waits
    /// for the first sync.
    fn start(
        node: &Node,
        tag: &str,
        sizes: &[(&'static str, u32)],
        objects: &str,
        http: bool,
    ) -> Agent {
        let m = ManifestAgent::spawn(
            node.ns(),
            NODE,
            &format!("e2e-{tag}"),
            &[("00-objects.yaml", objects)],
            |cfg| {
                cfg.http_addr = http.then(|| HTTP_ADDR.parse().unwrap());
                cfg.max_entries = sizes.iter().copied().collect();
            },
        );
        m.agent
            .wait_status("agent did not sync", PROGRAM_TIMEOUT, |v| {
                v["synced"] == true
            });
        Agent(m)
    }

    /// Waits until the status has an error for `map` (`Some`) or none at all (`None`).
    fn wait_map_error(&self, map: Option<&str>) -> Value {
        self.agent.wait_status(
            &format!("map error of {map:?} not reported as expected"),
            PROGRAM_TIMEOUT,
            |v| {
                let errors = v["map_errors"].as_array().cloned().unwrap_or_default();
                match map {
                    Some(m) => errors.iter().any(|e| e["map"] == m),
                    None => errors.is_empty(),
                }
            },
        );
        let status = self.agent.status().unwrap();
        match map {
            Some(m) => status["map_errors"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["map"] == m)
                .cloned()
                .unwrap(),
            None => Value::Null,
        }
    }
}

/// GET /metrics from inside the node namespace.
fn metrics(node: &Node) -> String {
    let (code, text) = http::http_get(node.ns(), HTTP_ADDR, "/metrics");
    assert_eq!(code, 200, "{text}");
    text
}

/// The value of `metric{map="<map>"}`.
fn sample(text: &str, metric: &str, map: &str) -> Option<f64> {
    http::sample(text, metric, &[&format!("map=\"{map}\"")])
}

fn passes(from: &Pod, to: &Pod, port: u16) -> bool {
    expecting_reply(ALLOWED, |t| {
        tcp_connect(from.ns(), to.ip(Family::V4), port, t)
    })
    .is_ok()
}

fn dropped(from: &Pod, to: &Pod, port: u16) -> bool {
    tcp_connect(from.ns(), to.ip(Family::V4), port, DENIED) == Err(ProbeError::Timeout)
}

const SRV_FROM_CLI: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: srv-from-cli, namespace: x}
spec:
  podSelector: {matchLabels: {pod: srv}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: cli}}}]
    ports: [{protocol: TCP, port: 80}]
"#;

const OTH_FROM_CLI: &str = r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: oth-from-cli, namespace: y}
spec:
  podSelector: {matchLabels: {pod: oth}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: cli}}}]
    ports: [{protocol: TCP, port: 80}, {protocol: TCP, port: 81}]
"#;

/// POLICY holds 2 entries: srv-from-cli needs 1, oth-from-cli 2 more.
#[test]
fn policy_full_isolates_allows_what_fits_reports_and_recovers() {
    require_root();
    let node = Node::bridged("mfpol").unwrap();
    let cli = node.add_pod("x/cli").unwrap();
    let srv = node.add_pod("x/srv").unwrap();
    let oth = node.add_pod("y/oth").unwrap();
    let _servers: Vec<Server> = [(&srv, 80), (&oth, 80), (&oth, 81), (&oth, 82)]
        .into_iter()
        .map(|(p, port)| Server::tcp(p.ns(), port, p.name()).unwrap())
        .collect();
    let mut objects = manifests::namespace("x") + &manifests::namespace("y");
    for p in [&cli, &srv, &oth] {
        objects += &manifests::pod(p, NODE);
    }
    let agent = Agent::start(&node, "mfpol", &[(names::POLICY_EXACT, 2)], &objects, true);
    agent.apply(
        "10-srv.yaml",
        SRV_FROM_CLI,
        &["NetworkPolicy/x/srv-from-cli", "Pod/x/srv"],
    );
    assert!(
        passes(&cli, &srv, 80),
        "x/cli -> x/srv:80 before POLICY is full"
    );

    // The second policy's entries: one fits, one does not.
    agent.write("20-oth.yaml", OTH_FROM_CLI);
    let err = agent.wait_map_error(Some(names::POLICY_EXACT));
    assert_eq!(err["capacity"], 2, "{err}");
    assert_eq!(err["missing"], 1, "{err}");
    assert_eq!(err["pods"], serde_json::json!(["y/oth"]), "{err}");
    assert_eq!(
        err["policies"],
        serde_json::json!(["y/oth-from-cli"]),
        "{err}"
    );
    let status = agent.agent.status().unwrap();
    assert!(
        status["programmed"]
            .get("NetworkPolicy/y/oth-from-cli")
            .is_none(),
        "a policy missing entries is not programmed: {status}"
    );
    // (a) y/oth is isolated: no rule, dropped; of its two allowed ports exactly the one
    // whose entry fits passes (fewer than the policy says, never more).
    assert!(dropped(&cli, &oth, 82), "x/cli -> y/oth:82 must be dropped");
    let open: Vec<u16> = [80, 81]
        .into_iter()
        .filter(|p| passes(&cli, &oth, *p))
        .collect();
    assert_eq!(open.len(), 1, "ports of y/oth that passed: {open:?}");
    // (b) The flow whose entry fit keeps passing; srv stays isolated too.
    assert!(
        passes(&cli, &srv, 80),
        "x/cli -> x/srv:80 while POLICY is full"
    );
    assert!(dropped(&oth, &srv, 80), "y/oth -> x/srv:80 must be dropped");
    // (c) /metrics names the map.
    let text = metrics(&node);
    assert!(
        sample(
            &text,
            "palisade_map_write_failures_total",
            names::POLICY_EXACT
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "palisade_map_entries_missing", names::POLICY_EXACT),
        Some(1.0),
        "{text}"
    );

    // (d) Room freed by removing the first policy: the missing entry is written at the
    // next reconcile, the error clears, both ports pass.
    agent.remove("10-srv.yaml");
    agent.wait_map_error(None);
    agent
        .agent
        .wait_programmed(&["NetworkPolicy/y/oth-from-cli", "Pod/y/oth"]);
    assert!(passes(&cli, &oth, 80) && passes(&cli, &oth, 81));
    assert!(
        dropped(&cli, &oth, 82),
        "x/cli -> y/oth:82 must still be dropped"
    );
    let text = metrics(&node);
    assert_eq!(
        sample(&text, "palisade_map_entries_missing", names::POLICY_EXACT),
        Some(0.0),
        "{text}"
    );
    // And removing the extra policy opens y/oth again.
    agent.delete("20-oth.yaml", "NetworkPolicy/y/oth-from-cli");
    assert!(passes(&cli, &oth, 82), "y/oth is no longer isolated");
}

/// An ipBlock policy on x/srv for port `port`: 198.18.0.0/15, except `except` if given.
fn block_policy(name: &str, port: u16, except: Option<&str>) -> String {
    let except = except.map_or(String::new(), |e| format!(", except: [\"{e}\"]"));
    format!(
        r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: {name}, namespace: x}}
spec:
  podSelector: {{matchLabels: {{pod: srv}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{ipBlock: {{cidr: 198.18.0.0/15{except}}}}}]
    ports: [{{protocol: TCP, port: {port}}}]
"#
    )
}

/// x/srv admits 198.18.0.0/15 on port 80 (policy `any`) and, except a /28 holding
/// `stranger` (an address no pod object claims, so only prefixes judge it), on port 81
/// (policy `most`). IDENTITY4_CIDR is full once `any` is in: `most`'s except does not fit.
/// Left as it is, the /15 (now carrying both blocks) would hand the stranger port 81; the
/// agent withholds what would grant more.
#[test]
fn identity_full_never_lets_an_excepted_address_in() {
    require_root();
    let node = Node::bridged("mfid").unwrap();
    let srv = node.add_pod("x/srv").unwrap();
    let oth = node.add_pod("y/oth").unwrap();
    // Alone in its /28 (hosts 32..47 of the node's /24).
    let stranger = node.add_pod_at("z/stranger", Some(40), |_| Ok(())).unwrap();
    let _servers: Vec<Server> = [80, 81]
        .into_iter()
        .map(|port| Server::tcp(srv.ns(), port, "x/srv").unwrap())
        .collect();
    let mut objects = manifests::namespace("x") + &manifests::namespace("y");
    for p in [&srv, &oth] {
        objects += &manifests::pod(p, NODE);
    }
    let std::net::IpAddr::V4(s) = stranger.ip(Family::V4) else {
        unreachable!()
    };
    let o = s.octets();
    let except = format!("{}.{}.{}.32/28", o[0], o[1], o[2]);
    let any = block_policy("any", 80, None);
    let most = block_policy("most", 81, Some(&except));

    // How many entries IDENTITY4_CIDR holds with `any`, on a first agent.
    let full = {
        let first = Agent::start(&node, "mfid0", &[], &objects, false);
        first.apply(
            "10-any.yaml",
            &any,
            &["Pod/x/srv", "Pod/y/oth", "NetworkPolicy/x/any"],
        );
        let maps = Maps::open(&first.layout()).unwrap();
        // The except is a shorter-than-host prefix: it goes to the CIDR trie.
        let n = maps.identity_v4.trie.keys().filter_map(Result::ok).count() as u32;
        n // the first agent stops here
    };
    let agent = Agent::start(
        &node,
        "mfid",
        &[(names::IDENTITY4_CIDR, full)],
        &objects,
        true,
    );
    agent.apply(
        "10-any.yaml",
        &any,
        &["Pod/x/srv", "Pod/y/oth", "NetworkPolicy/x/any"],
    );
    assert!(passes(&stranger, &srv, 80), "x/any admits the stranger");
    assert!(dropped(&stranger, &srv, 81), "nothing admits port 81 yet");

    agent.write("20-most.yaml", &most);
    let err = agent.wait_map_error(Some(names::IDENTITY4_CIDR));
    assert_eq!(err["capacity"], full, "{err}");
    assert!(err["missing"].as_u64().is_some_and(|n| n >= 1), "{err}");
    // The excepted address never gets port 81; the pod in both blocks keeps its own entry
    // and both ports.
    assert!(
        dropped(&stranger, &srv, 81),
        "an address in the except got the block's rights: {err}"
    );
    assert!(passes(&oth, &srv, 80), "y/oth is in x/any's block: {err}");
    assert!(passes(&oth, &srv, 81), "y/oth is in x/most's block: {err}");
    let text = metrics(&node);
    assert!(
        sample(&text, "palisade_map_entries_missing", names::IDENTITY4_CIDR)
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "palisade_map_write_failures_total",
            names::IDENTITY4_CIDR
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );

    // Without `most` everything fits again and the stranger has port 80 back.
    agent.remove("20-most.yaml");
    agent.wait_map_error(None);
    agent.agent.wait_gone("NetworkPolicy/x/most");
    assert!(
        passes(&stranger, &srv, 80),
        "x/any admits the stranger again"
    );
    assert!(dropped(&stranger, &srv, 81), "nothing admits port 81");
}

/// ENDPOINTS holds 2 entries for 3 local pods, two of them isolated: the pod that nothing
/// isolates gives its entry up, both isolated pods are enforced, and it gets an entry back
/// once a pod is gone.
#[test]
fn endpoints_full_keeps_isolated_pods_enforced() {
    require_root();
    let node = Node::bridged("mfep").unwrap();
    let cli = node.add_pod("x/cli").unwrap();
    let srv = node.add_pod("x/srv").unwrap();
    let oth = node.add_pod("y/oth").unwrap();
    let _servers: Vec<Server> = [(&srv, 80), (&oth, 80), (&oth, 82)]
        .into_iter()
        .map(|(p, port)| Server::tcp(p.ns(), port, p.name()).unwrap())
        .collect();
    let namespaces = manifests::namespace("x") + &manifests::namespace("y");
    let mut objects = namespaces.clone() + SRV_FROM_CLI + OTH_FROM_CLI;
    for p in [&cli, &srv, &oth] {
        objects += &manifests::pod(p, NODE);
    }
    let agent = Agent::start(&node, "mfep", &[(names::ENDPOINTS, 2)], &objects, true);
    let err = agent.wait_map_error(Some(names::ENDPOINTS));
    assert_eq!(err["capacity"], 2, "{err}");
    assert_eq!(err["pods"], serde_json::json!(["x/cli"]), "{err}");
    agent
        .agent
        .wait_programmed(&["Pod/x/srv", "Pod/y/oth", "NetworkPolicy/y/oth-from-cli"]);
    // Both isolated pods are enforced: what their policies allow passes, nothing else.
    assert!(passes(&cli, &srv, 80), "x/cli -> x/srv:80");
    assert!(passes(&cli, &oth, 80), "x/cli -> y/oth:80");
    assert!(dropped(&cli, &oth, 82), "x/cli -> y/oth:82 must be dropped");
    assert!(dropped(&oth, &srv, 80), "y/oth -> x/srv:80 must be dropped");
    let text = metrics(&node);
    assert_eq!(
        sample(&text, "palisade_map_entries_missing", names::ENDPOINTS),
        Some(1.0),
        "{text}"
    );

    // x/srv gone: x/cli gets an entry again, the error clears.
    let mut without_srv = namespaces + SRV_FROM_CLI + OTH_FROM_CLI;
    for p in [&cli, &oth] {
        without_srv += &manifests::pod(p, NODE);
    }
    agent.write("00-objects.yaml", &without_srv);
    agent.wait_map_error(None);
    agent.agent.wait_programmed(&["Pod/x/cli", "Pod/y/oth"]);
    assert!(passes(&cli, &oth, 80), "x/cli -> y/oth:80");
    assert!(dropped(&cli, &oth, 82), "x/cli -> y/oth:82 must be dropped");
}
