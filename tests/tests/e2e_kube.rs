//! The whole agent fed by the Kubernetes source: a scripted API server (the same one the
//! source's conversation tests use) lists the upstream e2e netpol model and then streams
//! policy changes; the agent, running in the node's network namespace, programs the maps
//! and the 9×9 matrix on the wire follows.

#[allow(dead_code)]
#[path = "../../agent/tests/kube_source/apiserver.rs"]
mod apiserver;

use std::time::Duration;

use apiserver::{gone, max_requests, ApiServer, WatchStream, NAMESPACES, NETWORK_POLICIES, PODS};
use palisade::source::{KubeConnection, SourceSpec};
use palisade_tests::agent::TempDir;
use palisade_tests::inproc::{self, InProcessAgent};
use palisade_tests::pins::PinDir;
use palisade_tests::{require_root, Flavour, Model, Proto};
use serde_json::{json, Value};

const NODE: &str = "n1";

/// The agent in the node's namespace on its own thread; stopped on drop.
struct AgentGuard {
    agent: InProcessAgent,
    // Dropped after the agent: removes the pins and run dir once it has stopped.
    _pins: PinDir,
    _tmp: TempDir,
}

impl AgentGuard {
    fn start(model: &Model, tag: &str, client: kube::Client) -> AgentGuard {
        let pins = PinDir::new(tag);
        let tmp = TempDir::new(&format!("e2e-{tag}")).unwrap();
        let cfg = inproc::config(
            NODE,
            SourceSpec::Kubernetes(KubeConnection::Client(client)),
            pins.layout(),
            &tmp.path().join("run"),
        );
        AgentGuard {
            agent: InProcessAgent::spawn(model.node().ns(), cfg),
            _pins: pins,
            _tmp: tmp,
        }
    }

    /// Waits on the status contract until `check` holds.
    fn wait_status(&self, what: &str, check: impl Fn(&Value) -> bool) {
        self.agent.wait_status(what, Duration::from_secs(15), check);
    }
}

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({"kind": kind, "apiVersion": api_version,
           "metadata": {"resourceVersion": "500"}, "items": items})
}

/// The model as the API server would list it, plus a pod of another node whose address
/// is outside this node (a peer, never enforced here).
fn model_lists(model: &Model) -> (Value, Value) {
    let namespaces = ["x", "y", "z"]
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            json!({"metadata": {"name": ns, "resourceVersion": (10 + i).to_string(),
                "labels": {"kubernetes.io/metadata.name": ns, "ns": ns}},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
        })
        .collect();
    let port = |name: &str, n: u16, proto: &str| json!({"name": name, "containerPort": n, "protocol": proto});
    let ports = json!([
        port("serve-80-tcp", 80, "TCP"),
        port("serve-81-tcp", 81, "TCP"),
        port("serve-80-udp", 80, "UDP"),
        port("serve-81-udp", 81, "UDP")
    ]);
    let pod = |ns: &str, name: &str, rv: usize, node: &str, v4: String, v6: String| {
        json!({
            "metadata": {"name": name, "namespace": ns, "resourceVersion": rv.to_string(),
                "uid": format!("00000000-0000-4000-8000-{rv:012}"), "labels": {"pod": name}},
            "spec": {"nodeName": node, "containers": [{"name": "agnhost",
                "image": "registry.k8s.io/e2e-test-images/agnhost:2.53", "args": ["porter"],
                "ports": ports}]},
            "status": {"phase": "Running", "podIP": v4, "podIPs": [{"ip": v4}, {"ip": v6}]}
        })
    };
    let mut pods: Vec<Value> = model
        .names()
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let p = model.pod(name);
            let (ns, n) = name.split_once('/').unwrap();
            pod(
                ns,
                n,
                100 + i,
                NODE,
                p.ipv4().to_string(),
                p.ipv6().to_string(),
            )
        })
        .collect();
    pods.push(pod(
        "y",
        "remote",
        199,
        "n2",
        "198.19.254.10".into(),
        "fd00:198:18:fe::10".into(),
    ));
    (
        list("NamespaceList", "v1", namespaces),
        list("PodList", "v1", pods),
    )
}

const DENY_INGRESS_X: &str = r#"{"metadata": {"name": "deny-ingress", "namespace": "x",
    "resourceVersion": "600"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}"#;
const DENY_INGRESS_Y: &str = r#"{"metadata": {"name": "deny-ingress", "namespace": "y",
    "resourceVersion": "790"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}"#;

fn policy(json: &str) -> Value {
    let mut obj: Value = serde_json::from_str(json).unwrap();
    obj["kind"] = json!("NetworkPolicy");
    obj["apiVersion"] = json!("networking.k8s.io/v1");
    obj
}

fn policy_event(kind: &str, json: &str) -> Value {
    json!({"type": kind, "object": policy(json)})
}

fn programmed(v: &Value, key: &str) -> Option<String> {
    v["programmed"].get(key)?.as_str().map(str::to_string)
}

/// The API server's runtime, outliving the agent (declared first, dropped last).
fn api_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Answers the agent's first lists (the model's namespaces and pods, `policies`) and
/// returns the policy watch it opens next.
fn serve_first_sync(
    api_rt: &tokio::runtime::Runtime,
    api: &mut ApiServer,
    model: &Model,
    policies: Vec<Value>,
) -> WatchStream {
    let (namespaces, pods) = model_lists(model);
    api_rt.block_on(async {
        api.expect_list(NAMESPACES, None)
            .await
            .reply(200, &namespaces);
        api.expect_list(PODS, None).await.reply(200, &pods);
        api.expect_list(NETWORK_POLICIES, None).await.reply(
            200,
            &list("NetworkPolicyList", "networking.k8s.io/v1", policies),
        );
        api.expect_watch(NETWORK_POLICIES, "500").await.stream()
    })
}

fn kube_source_drives_the_matrix(flavour: Flavour, tag: &str) {
    require_root();
    // The API server's runtime outlives the agent (declared first, dropped last).
    let api_rt = api_runtime();
    let model = Model::new(tag, flavour).unwrap();
    let (client, mut api) = api_rt.block_on(async { ApiServer::start() });
    let agent = AgentGuard::start(&model, tag, client);

    let policies = serve_first_sync(&api_rt, &mut api, &model, vec![]);
    agent.wait_status("first sync programmed", |v| {
        v["synced"] == true
            && programmed(v, "Pod/x/a").as_deref() == Some("100")
            && programmed(v, "Pod/z/c").is_some()
            && programmed(v, "Namespace/z").as_deref() == Some("12")
    });
    let st = agent.agent.status().unwrap();
    let endpoints: Vec<&str> = st["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pod"].as_str().unwrap())
        .collect();
    assert_eq!(endpoints.len(), 9, "only this node's pods: {endpoints:?}");
    assert!(!endpoints.contains(&"y/remote"));
    model.assert_reach(&model.expect(true), 80, Proto::Tcp);

    // A policy arrives on the watch: x is closed to everyone.
    policies.send(&policy_event("ADDED", DENY_INGRESS_X));
    agent.wait_status("deny-ingress programmed", |v| {
        programmed(v, "NetworkPolicy/x/deny-ingress").as_deref() == Some("600")
    });
    let mut want = model.expect(true);
    for p in ["x/a", "x/b", "x/c"] {
        want.set_to(p, false);
    }
    model.assert_reach(&want, 80, Proto::Tcp);

    // It is deleted: x opens again.
    policies.send(&policy_event("DELETED", DENY_INGRESS_X));
    agent.wait_status("deny-ingress removed", |v| {
        v["programmed"]
            .get("NetworkPolicy/x/deny-ingress")
            .is_none()
    });
    model.assert_reach(&model.expect(true), 80, Proto::Tcp);
    drop(agent);
    drop(api_rt);
}

#[test]
fn kube_source_drives_the_matrix_on_a_routed_node() {
    kube_source_drives_the_matrix(Flavour::Routed, "kbrt");
}

/// How long the API server is away in the whole-agent outage test: real time, so short,
/// but long enough for the backoff to double three times.
const OUTAGE: Duration = Duration::from_secs(8);

fn kube_outage_keeps_enforcing_then_converges(flavour: Flavour, tag: &str) {
    require_root();
    let api_rt = api_runtime();
    let model = Model::new(tag, flavour).unwrap();
    let (client, mut api) = api_rt.block_on(async { ApiServer::start() });
    let agent = AgentGuard::start(&model, tag, client);

    // First sync: x closed by deny-ingress.
    let policies = serve_first_sync(&api_rt, &mut api, &model, vec![policy(DENY_INGRESS_X)]);
    agent.wait_status("first sync programmed", |v| {
        v["synced"] == true
            && programmed(v, "NetworkPolicy/x/deny-ingress").as_deref() == Some("600")
            && programmed(v, "Pod/z/c").is_some()
    });
    let mut x_closed = model.expect(true);
    for p in ["x/a", "x/b", "x/c"] {
        x_closed.set_to(p, false);
    }
    model.assert_reach(&x_closed, 80, Proto::Tcp);
    let before = agent.agent.status().unwrap()["programmed"].clone();

    // The API server goes away (the open watch breaks, every request fails) while the
    // matrix is probed: enforcement is what it was, and the status says why nothing moves.
    drop(policies);
    let outage = api_rt.spawn(async move {
        let requests = api.outage(OUTAGE, "500").await;
        (api, requests)
    });
    agent.wait_status("outage reported", |v| {
        v["source_errors"].as_array().is_some_and(|e| e.len() == 3)
    });
    model.assert_reach(&x_closed, 80, Proto::Tcp);
    let (mut api, requests) = api_rt.block_on(outage).unwrap();
    let st = agent.agent.status().unwrap();
    assert_eq!(
        st["programmed"], before,
        "programmed changed during the outage"
    );
    let bound = max_requests(OUTAGE);
    for resource in [NAMESPACES, NETWORK_POLICIES, PODS] {
        let n = requests.get(resource).map_or(0, Vec::len);
        eprintln!("{tag}: {resource}: {n} requests in {OUTAGE:?} (backoff allows {bound})");
        assert!((2..=bound).contains(&n), "{resource}: {n} requests");
    }

    // Back, having compacted past the agent's resume point, with a changed world:
    // deny-ingress moved from x to y, x/b relabelled, y/remote gone.
    let up_at = std::time::Instant::now();
    let (namespaces, mut pods) = model_lists(&model);
    pods["metadata"]["resourceVersion"] = json!("800");
    let items = pods["items"].as_array_mut().unwrap();
    items.retain(|p| p["metadata"]["name"] != "remote");
    for p in items.iter_mut() {
        if p["metadata"]["namespace"] == "x" && p["metadata"]["name"] == "b" {
            p["metadata"]["resourceVersion"] = json!("780");
            p["metadata"]["labels"]["tier"] = json!("db");
        }
    }
    let _watches = api_rt.block_on(async {
        // Namespaces resume and deliver a change (which also proves the watch is back).
        let ns_watch = api.expect_watch(NAMESPACES, "500").await.stream();
        let mut z = namespaces["items"][2].clone();
        z["metadata"]["resourceVersion"] = json!("810");
        ns_watch.send(&json!({"type": "MODIFIED", "object": z}));
        // Pods: the watch request is refused with 410; a new list.
        api.expect_watch(PODS, "500").await.reply(410, &gone());
        api.expect_list(PODS, None).await.reply(200, &pods);
        let pod_watch = api.expect_watch(PODS, "800").await.stream();
        // Policies: the watch opens and expires with an ERROR event; a new list.
        let np = api.expect_watch(NETWORK_POLICIES, "500").await.stream();
        np.send(&json!({"type": "ERROR", "object": gone()}));
        api.expect_list(NETWORK_POLICIES, None).await.reply(
            200,
            &json!({"kind": "NetworkPolicyList", "apiVersion": "networking.k8s.io/v1",
                    "metadata": {"resourceVersion": "800"}, "items": [policy(DENY_INGRESS_Y)]}),
        );
        let np_watch = api.expect_watch(NETWORK_POLICIES, "800").await.stream();
        (ns_watch, pod_watch, np_watch)
    });
    agent.wait_status("the new world programmed, problems cleared", |v| {
        programmed(v, "NetworkPolicy/y/deny-ingress").as_deref() == Some("790")
            && programmed(v, "NetworkPolicy/x/deny-ingress").is_none()
            && programmed(v, "Pod/x/b").as_deref() == Some("780")
            && programmed(v, "Pod/y/remote").is_none()
            && programmed(v, "Namespace/z").as_deref() == Some("810")
            && v["source_errors"] == json!([])
    });
    eprintln!(
        "{tag}: converged {:?} after the API server came back",
        up_at.elapsed()
    );
    let mut y_closed = model.expect(true);
    for p in ["y/a", "y/b", "y/c"] {
        y_closed.set_to(p, false);
    }
    model.assert_reach(&y_closed, 80, Proto::Tcp);
    drop(agent);
    drop(api_rt);
}

#[test]
fn kube_api_outage_keeps_enforcing_then_converges_on_a_routed_node() {
    kube_outage_keeps_enforcing_then_converges(Flavour::Routed, "kbout");
}
