//! The Kubernetes source against a scripted API server: each test is a conversation —
//! which requests the source makes (method, path, every query parameter), what the API
//! server answers (real JSON payloads from `tests/fixtures/kube/`), and which updates the
//! agent receives as a result.
//!
//! Time is paused (tokio test-util): the watcher's backoff sleeps are skipped over, not
//! waited for, and every wait has a deadline so a missing request fails instead of hanging.

#[path = "kube_source/apiserver.rs"]
mod apiserver;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use apiserver::{
    fixture_events, fixture_json, gone, max_requests, ApiServer, WatchStream, NAMESPACES,
    NETWORK_POLICIES, PODS, STEP,
};
use palisade::source::kube::PROBLEM_QUIET;
use palisade::source::{spawn_kube, ObjectChange, Update};
use palisade_policy::{Change, Compiler, PodRef};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

const TCP: u8 = 6;

async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
    tokio::time::timeout(STEP, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no update within {STEP:?}"))
        .expect("source ended")
}

async fn next_changes(rx: &mut mpsc::Receiver<Update>) -> Vec<ObjectChange> {
    match next(rx).await {
        Update::Changes(c) => c,
        other => panic!("expected changes, got {other:?}"),
    }
}

async fn next_errors(rx: &mut mpsc::Receiver<Update>) -> Vec<String> {
    match next(rx).await {
        Update::Errors(e) => e,
        other => panic!("expected errors, got {other:?}"),
    }
}

fn summary(changes: &[ObjectChange]) -> Vec<(&str, Option<&str>)> {
    changes
        .iter()
        .map(|c| (&*c.key, c.version.as_deref()))
        .collect()
}

/// Nothing was sent to the agent (yet).
fn assert_quiet(rx: &mut mpsc::Receiver<Update>) {
    if let Ok(u) = rx.try_recv() {
        panic!("unexpected update {u:?}");
    }
}

/// The keys and versions of the fixtures' first full list.
const FIRST_SYNC: [(&str, Option<&str>); 7] = [
    ("Namespace/x", Some("801")),
    ("Namespace/y", Some("802")),
    ("NetworkPolicy/x/allow-client", Some("850")),
    ("Pod/x/a", Some("901")),
    ("Pod/x/b", Some("902")),
    ("Pod/y/client", Some("903")),
    ("Pod/y/other", Some("904")),
];

struct Watches {
    namespaces: WatchStream,
    policies: WatchStream,
    pods: WatchStream,
}

/// Serves the first full list of every kind (pods in two pages) and opens their watches;
/// returns what the agent received before `Synced`.
async fn first_sync(
    api: &mut ApiServer,
    rx: &mut mpsc::Receiver<Update>,
) -> (Vec<ObjectChange>, Watches) {
    api.serve_list(NAMESPACES, &["namespaces-list.json"]).await;
    api.serve_list(NETWORK_POLICIES, &["networkpolicies-list.json"])
        .await;
    api.serve_list(PODS, &["pods-list-page1.json", "pods-list-page2.json"])
        .await;
    let changes = next_changes(rx).await;
    assert!(matches!(next(rx).await, Update::Synced));
    let watches = Watches {
        namespaces: api.expect_watch(NAMESPACES, "1000").await.stream(),
        policies: api.expect_watch(NETWORK_POLICIES, "1000").await.stream(),
        pods: api.expect_watch(PODS, "1000").await.stream(),
    };
    (changes, watches)
}

#[tokio::test(start_paused = true)]
async fn first_sync_waits_for_every_list_then_sends_slim_objects_once() {
    let (client, mut api) = ApiServer::start();
    let mut rx = spawn_kube(client);

    api.serve_list(NAMESPACES, &["namespaces-list.json"]).await;
    api.serve_list(PODS, &["pods-list-page1.json", "pods-list-page2.json"])
        .await;
    // The watches start only once the source has taken in the whole list of their kind.
    let _ns_watch = api.expect_watch(NAMESPACES, "1000").await.stream();
    let _pod_watch = api.expect_watch(PODS, "1000").await.stream();
    // Policies are not listed yet: pods without their policies must not reach the agent.
    assert_quiet(&mut rx);

    api.serve_list(NETWORK_POLICIES, &["networkpolicies-list.json"])
        .await;
    let changes = next_changes(&mut rx).await;
    assert_eq!(summary(&changes), FIRST_SYNC);
    assert!(matches!(next(&mut rx).await, Update::Synced));
    let _np_watch = api.expect_watch(NETWORK_POLICIES, "1000").await.stream();

    // What the agent holds of a pod is what the compiler reads, not the API object.
    let pod = changes
        .iter()
        .find_map(|c| match &c.change {
            Change::UpsertPod(p) if &*c.key == "Pod/x/a" => Some(p),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        serde_json::to_value(pod).unwrap(),
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "x", "resourceVersion": "901", "labels": {"pod": "a"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "", "ports": [
                {"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"},
                {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}
            ]}]},
            "status": {"phase": "Running", "podIP": "198.18.0.10", "podIPs": [{"ip": "198.18.0.10"}]}
        })
    );
    let policy = changes
        .iter()
        .find_map(|c| match &c.change {
            Change::UpsertPolicy(p) => Some(p),
            _ => None,
        })
        .unwrap();
    assert!(policy.metadata.annotations.is_none() && policy.metadata.managed_fields.is_none());
    assert_eq!(
        serde_json::to_value(&policy.spec).unwrap(),
        fixture_json("networkpolicies-list.json")["items"][0]["spec"]
    );
}

#[tokio::test(start_paused = true)]
async fn watch_events_added_modified_deleted_and_bookmark_resume() {
    let (client, mut api) = ApiServer::start();
    let mut rx = spawn_kube(client);
    let (_, w) = first_sync(&mut api, &mut rx).await;

    let events = fixture_events("pods-watch.jsonl");
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]);

    w.pods.send(&events[0]);
    let added = next_changes(&mut rx).await;
    assert_eq!(summary(&added), [("Pod/x/new", Some("1101"))]);
    w.pods.send(&events[1]);
    assert_eq!(
        summary(&next_changes(&mut rx).await),
        [("Pod/x/new", Some("1102"))]
    );
    w.pods.send(&events[2]);
    let deleted = next_changes(&mut rx).await;
    assert_eq!(summary(&deleted), [("Pod/y/other", None)]);
    assert!(matches!(&deleted[0].change, Change::DeletePod(r) if *r == PodRef::new("y", "other")));
    // The bookmark sends nothing and moves the resume point: when the API server ends the
    // watch (timeoutSeconds), the source watches again from the bookmark's version.
    w.pods.send(&events[3]);
    w.pods.end();
    let pods = api.expect_watch(PODS, "1200").await.stream();
    assert_quiet(&mut rx);

    // An event repeating the version already sent is not sent again; the next real
    // change is the very next update.
    pods.send(&events[1]);
    let mut later = events[1].clone();
    later["object"]["metadata"]["resourceVersion"] = json!("1300");
    later["object"]["metadata"]["labels"] = json!({"pod": "new", "v": "2"});
    pods.send(&later);
    assert_eq!(
        summary(&next_changes(&mut rx).await),
        [("Pod/x/new", Some("1300"))]
    );

    // Namespace and policy watches feed the same channel.
    let mut ns = fixture_json("namespaces-list.json")["items"][1].clone();
    ns["metadata"]["resourceVersion"] = json!("1301");
    ns["metadata"]["labels"]["team"] = json!("blue");
    w.namespaces
        .send(&json!({"type": "MODIFIED", "object": ns}));
    let got = next_changes(&mut rx).await;
    assert_eq!(summary(&got), [("Namespace/y", Some("1301"))]);
    let np = fixture_json("networkpolicies-list.json")["items"][0].clone();
    w.policies.send(&json!({"type": "DELETED", "object": np}));
    assert_eq!(
        summary(&next_changes(&mut rx).await),
        [("NetworkPolicy/x/allow-client", None)]
    );
}

#[tokio::test(start_paused = true)]
async fn watch_error_backs_off_and_resumes_from_the_last_version() {
    let (client, mut api) = ApiServer::start();
    let mut rx = spawn_kube(client);
    let (_, w) = first_sync(&mut api, &mut rx).await;

    // The watch ends; restarting it fails (etcd leader change).
    w.pods.end();
    api.expect_watch(PODS, "1000")
        .await
        .reply(500, &fixture_json("status-internal-error.json"));
    let failed_at = tokio::time::Instant::now();
    let errors = next_errors(&mut rx).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("cannot watch pods"), "{}", errors[0]);
    assert!(
        errors[0].contains("etcdserver: leader changed"),
        "{}",
        errors[0]
    );

    // After a backoff, the watch resumes where it was: no list, nothing reprogrammed.
    let pods = api.expect_watch(PODS, "1000").await.stream();
    let waited = failed_at.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(800),
        "retried after {waited:?}"
    );
    assert_quiet(&mut rx);
    let events = fixture_events("pods-watch.jsonl");
    pods.send(&events[0]);
    assert_eq!(
        summary(&next_changes(&mut rx).await),
        [("Pod/x/new", Some("1101"))]
    );
    assert!(next_errors(&mut rx).await.is_empty(), "problem not cleared");
    let lists = api
        .calls()
        .iter()
        .filter(|c| c.path == PODS && c.rbac().0 == "list")
        .count();
    assert_eq!(lists, 2, "pods were listed again");
}

#[tokio::test(start_paused = true)]
async fn gone_relists_and_deletes_only_once_the_relist_is_complete() {
    let (client, mut api) = ApiServer::start();
    let mut rx = spawn_kube(client);
    let (_, w) = first_sync(&mut api, &mut rx).await;
    let pods = &w.pods;

    // The resume point is too old: the API server ends the watch with 410.
    pods.send(&fixture_events("watch-error-gone.jsonl")[0]);
    let page1 = fixture_json("pods-relist-page1.json");
    api.expect_list(PODS, None).await.reply(200, &page1);
    // Half the relist is in: x/b changed, y/other is not listed (yet). Nothing may be
    // removed or sent before the list is complete, and the 410 is no problem to report.
    let page2_request = api
        .expect_list(PODS, page1["metadata"]["continue"].as_str())
        .await;
    assert_quiet(&mut rx);
    page2_request.reply(200, &fixture_json("pods-relist-page2.json"));

    // x/a and y/client are unchanged (same resourceVersion): not re-sent.
    let changes = next_changes(&mut rx).await;
    assert_eq!(
        summary(&changes),
        [("Pod/x/b", Some("1450")), ("Pod/y/other", None)]
    );
    let _pods = api.expect_watch(PODS, "1500").await.stream();
    let ns_lists = api.calls().iter().filter(|c| c.path == NAMESPACES).count();
    assert_eq!(ns_lists, 2, "namespaces: one list and one watch, no relist");
}

#[tokio::test(start_paused = true)]
async fn forbidden_names_the_missing_permission_until_granted() {
    let (client, mut api) = ApiServer::start();
    let mut rx = spawn_kube(client);

    api.expect_list(PODS, None)
        .await
        .reply(403, &fixture_json("status-forbidden-list-pods.json"));
    let errors = next_errors(&mut rx).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains(
            r#"may not list pods cluster-wide; its ClusterRole needs apiGroups: [""], resources: ["pods"], verbs: ["list"]"#
        ),
        "{}",
        errors[0]
    );

    // The other kinds list fine; without pods there is no sync.
    api.serve_list(NAMESPACES, &["namespaces-list.json"]).await;
    api.serve_list(NETWORK_POLICIES, &["networkpolicies-list.json"])
        .await;
    let _ns = api.expect_watch(NAMESPACES, "1000").await.stream();
    let np_watch = api.expect_watch(NETWORK_POLICIES, "1000").await;
    assert_quiet(&mut rx);

    // The permission is granted: the retried list succeeds and the problem goes away.
    api.serve_list(PODS, &["pods-list-page1.json", "pods-list-page2.json"])
        .await;
    assert!(next_errors(&mut rx).await.is_empty());
    assert_eq!(summary(&next_changes(&mut rx).await), FIRST_SYNC);
    assert!(matches!(next(&mut rx).await, Update::Synced));

    // A watch that is refused names the watch verb and the API group.
    np_watch.reply(
        403,
        &fixture_json("status-forbidden-watch-networkpolicies.json"),
    );
    let errors = next_errors(&mut rx).await;
    assert!(
        errors[0].contains(
            r#"its ClusterRole needs apiGroups: ["networking.k8s.io"], resources: ["networkpolicies"], verbs: ["watch"]"#
        ),
        "{errors:?}"
    );
}

/// Feeds the source's updates into the compiler the way the agent does.
fn compile(compiler: &mut Compiler, changes: Vec<ObjectChange>) {
    compiler.apply_batch(changes.into_iter().map(|c| c.change));
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// [`first_sync`] compiled as node-1's agent would, with the fixture pods' addresses:
/// x/a and x/b (this node), the remote client and the other remote pod.
async fn compiled_first_sync(
    api: &mut ApiServer,
    rx: &mut mpsc::Receiver<Update>,
) -> (Compiler, Watches, (IpAddr, IpAddr, IpAddr, IpAddr)) {
    let (changes, w) = first_sync(api, rx).await;
    let mut compiler = Compiler::new("node-1", [ip("198.19.0.1")]);
    compile(&mut compiler, changes);
    let pods = (
        ip("198.18.0.10"),
        ip("198.18.0.11"),
        ip("198.18.1.10"),
        ip("198.18.1.11"),
    );
    (compiler, w, pods)
}

#[tokio::test(start_paused = true)]
async fn only_pods_of_this_node_are_enforced_and_remote_pods_are_peers() {
    let (client, mut api) = ApiServer::start();
    let mut rx = spawn_kube(client);
    let (mut compiler, w, (a, b, client_pod, other)) = compiled_first_sync(&mut api, &mut rx).await;

    let plan = compiler.plan();
    let local: BTreeSet<String> = plan.endpoints.keys().map(|p| p.to_string()).collect();
    assert_eq!(local, BTreeSet::from(["x/a".into(), "x/b".into()]));
    // allow-client: x/a accepts TCP 80 from app=client pods, which run on node-2.
    assert!(plan.verdict(client_pod, a, TCP, 80));
    assert!(!plan.verdict(client_pod, a, TCP, 81));
    assert!(!plan.verdict(other, a, TCP, 80));
    assert!(
        plan.verdict(other, b, TCP, 80),
        "x/b is selected by no policy"
    );

    // A new local pod is enforced once it has an IP.
    let events = fixture_events("pods-watch.jsonl");
    w.pods.send(&events[0]);
    compile(&mut compiler, next_changes(&mut rx).await);
    assert!(!compiler
        .plan()
        .endpoints
        .contains_key(&PodRef::new("x", "new")));
    w.pods.send(&events[1]);
    compile(&mut compiler, next_changes(&mut rx).await);
    assert!(compiler
        .plan()
        .endpoints
        .contains_key(&PodRef::new("x", "new")));
    // The remote peer goes away: its address is no longer a pod that policies can name.
    let mut gone = events[2].clone();
    gone["object"] = fixture_json("pods-list-page2.json")["items"][0].clone();
    gone["object"]["metadata"]["resourceVersion"] = json!("1105");
    w.pods.send(&gone);
    compile(&mut compiler, next_changes(&mut rx).await);
    assert!(!compiler.plan().verdict(client_pod, a, TCP, 80));
}

/// RBAC cannot drift from the code: every request the source makes in a full
/// conversation (lists with pages, watches, a resumed watch, a relist) is allowed by
/// `manifests/rbac.yaml`, and every verb/resource that file grants is used.
#[tokio::test(start_paused = true)]
async fn rbac_allows_every_request_and_grants_nothing_unused() {
    let (client, mut api) = ApiServer::start();
    let mut rx = spawn_kube(client);
    let (_, w) = first_sync(&mut api, &mut rx).await;
    w.pods.send(&fixture_events("pods-watch.jsonl")[3]);
    w.pods.end();
    let pods = api.expect_watch(PODS, "1200").await.stream();
    pods.send(&fixture_events("watch-error-gone.jsonl")[0]);
    api.serve_list(PODS, &["pods-relist-page1.json", "pods-relist-page2.json"])
        .await;
    let _pods = api.expect_watch(PODS, "1500").await;

    let used: BTreeSet<(String, String, String)> = api.calls().iter().map(|c| c.rbac()).collect();
    let role = cluster_role();
    let granted: BTreeSet<(String, String, String)> = role.iter().cloned().collect();
    for call in api.calls() {
        assert!(
            granted.contains(&call.rbac()),
            "request {} {}?{:?} needs {:?}, which manifests/rbac.yaml does not grant",
            call.method,
            call.path,
            call.query,
            call.rbac()
        );
    }
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "manifests/rbac.yaml grants what the agent never uses: {unused:?}"
    );
}

/// The (verb, apiGroup, resource) triples the `palisade` ClusterRole grants, after
/// checking that it is bound to the agent's ServiceAccount.
fn cluster_role() -> Vec<(String, String, String)> {
    use serde::Deserialize;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/rbac.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|d| !d.is_null())
        .collect();
    let of_kind = |kind: &str| -> Vec<&serde_yaml::Value> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect()
    };
    let sa = of_kind("ServiceAccount");
    assert_eq!(sa.len(), 1);
    let (sa_name, sa_ns) = (
        sa[0]["metadata"]["name"].as_str().unwrap(),
        sa[0]["metadata"]["namespace"].as_str().unwrap(),
    );
    assert_eq!((sa_name, sa_ns), ("palisade", "palisade-system"));
    let roles = of_kind("ClusterRole");
    assert_eq!(roles.len(), 1, "one ClusterRole");
    let role_name = roles[0]["metadata"]["name"].as_str().unwrap();
    let bound = of_kind("ClusterRoleBinding").iter().any(|b| {
        b["roleRef"]["kind"].as_str() == Some("ClusterRole")
            && b["roleRef"]["name"].as_str() == Some(role_name)
            && b["subjects"].as_sequence().unwrap().iter().any(|s| {
                s["kind"].as_str() == Some("ServiceAccount")
                    && s["name"].as_str() == Some(sa_name)
                    && s["namespace"].as_str() == Some(sa_ns)
            })
    });
    assert!(
        bound,
        "ClusterRole {role_name} is not bound to {sa_ns}/{sa_name}"
    );
    let strings = |v: &serde_yaml::Value| -> Vec<String> {
        v.as_sequence()
            .map(|s| s.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for rule in roles[0]["rules"].as_sequence().unwrap() {
        assert!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "unexpected rule {rule:?}"
        );
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    assert!(
                        ![&group, &resource, &verb].contains(&&"*".to_string()),
                        "wildcard in {rule:?}"
                    );
                    out.push((verb, group.clone(), resource.clone()));
                }
            }
        }
    }
    out
}

/// How long the API server is away in [`api_outage_changes_nothing_then_relists_into_the_new_world`].
const OUTAGE: Duration = Duration::from_secs(300);

#[tokio::test(start_paused = true)]
async fn api_outage_changes_nothing_then_relists_into_the_new_world() {
    let (client, mut api) = ApiServer::start();
    let mut rx = spawn_kube(client);
    let (mut compiler, w, (a, b, client_pod, other)) = compiled_first_sync(&mut api, &mut rx).await;
    let before = compiler.plan().canonical();
    assert!(compiler.plan().verdict(client_pod, a, TCP, 80));
    assert!(!compiler.plan().verdict(client_pod, a, TCP, 81));

    // The API server goes away: the open watches break, and for five minutes every
    // request fails: first refused connections, then 503s while it starts up again.
    drop(w);
    let requests = api.outage(OUTAGE, "1000").await;
    let bound = max_requests(OUTAGE);
    for resource in [NAMESPACES, NETWORK_POLICIES, PODS] {
        let times = &requests[resource];
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        println!(
            "{resource}: {} requests in {OUTAGE:?}, last gap {:?}",
            times.len(),
            gaps.last()
        );
        assert!(
            (3..=bound).contains(&times.len()),
            "{resource}: {} requests in {OUTAGE:?} (backoff allows at most {bound})",
            times.len()
        );
        assert!(
            *gaps.last().unwrap() >= Duration::from_secs(30),
            "{resource}: retries not backed off to 30 s: {gaps:?}"
        );
    }

    // What the agent got meanwhile: each kind's problem, and nothing to enforce
    // differently. Its policy is what it was before the outage.
    let mut problems = None;
    while let Ok(update) = rx.try_recv() {
        match update {
            Update::Errors(e) => problems = Some(e),
            other => panic!("update during the outage: {other:?}"),
        }
    }
    let problems = problems.expect("the outage was not reported");
    assert_eq!(problems.len(), 3, "{problems:?}");
    for (p, resource) in problems
        .iter()
        .zip(["namespaces", "networkpolicies", "pods"])
    {
        assert!(p.starts_with(&format!("cannot watch {resource}")), "{p}");
        assert!(p.contains("503"), "{p}");
    }
    assert_eq!(compiler.plan().canonical(), before);

    // The API server is back, having compacted past the agent's resume point, with a
    // changed world: allow-client deleted, protect-db added, x/b relabelled tier=db
    // (selected by protect-db), x/a relabelled, y/other gone.
    let up_at = Instant::now();
    let _namespaces = api.expect_watch(NAMESPACES, "1000").await.stream();
    // Pods: the watch request itself is refused with 410.
    api.expect_watch(PODS, "1000").await.reply(410, &gone());
    let expired_at = Instant::now();
    let mut page1 = fixture_json("pods-relist-page1.json");
    page1["items"][0]["metadata"]["resourceVersion"] = json!("1460");
    page1["items"][0]["metadata"]["labels"] = json!({"pod": "a", "tier": "web"});
    let relist = api.expect_list(PODS, None).await;
    // The API server answered: the relist follows after the shortest backoff (0.8 s,
    // jittered up to 1.6 s), not the 30-60 s the outage had built up.
    let relisted_after = expired_at.elapsed();
    assert!(
        relisted_after < Duration::from_millis(1600),
        "pods relisted {relisted_after:?} after the 410"
    );
    relist.reply(200, &page1);
    let page2 = api
        .expect_list(PODS, page1["metadata"]["continue"].as_str())
        .await;
    // Half the relist is in: nothing is removed (or sent) before it is complete.
    while let Ok(update) = rx.try_recv() {
        assert!(
            matches!(update, Update::Errors(_)),
            "sent before the relist was complete: {update:?}"
        );
    }
    page2.reply(200, &fixture_json("pods-relist-page2.json"));
    let _pods = api.expect_watch(PODS, "1500").await.stream();
    // Policies: the watch opens, then expires with an ERROR event.
    let policies = api.expect_watch(NETWORK_POLICIES, "1000").await.stream();
    policies.send(&json!({"type": "ERROR", "object": gone()}));
    let expired_at = Instant::now();
    let protect_db = json!({
        "metadata": {"name": "protect-db", "namespace": "x", "resourceVersion": "1490"},
        "spec": {"podSelector": {"matchLabels": {"tier": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"namespaceSelector": {},
                                        "podSelector": {"matchLabels": {"app": "client"}}}]}]}
    });
    let relist = api.expect_list(NETWORK_POLICIES, None).await;
    let relisted_after = expired_at.elapsed();
    assert!(
        relisted_after < Duration::from_millis(1600),
        "policies relisted {relisted_after:?} after the 410"
    );
    relist.reply(
        200,
        &json!({"kind": "NetworkPolicyList", "apiVersion": "networking.k8s.io/v1",
                "metadata": {"resourceVersion": "1500"}, "items": [protect_db]}),
    );
    let _policies = api.expect_watch(NETWORK_POLICIES, "1500").await.stream();

    // The agent converges on the new world. Pods and policies delivered, so their
    // problems are gone; namespaces' watch resumed and has been quiet since: its problem
    // goes once no request failed for PROBLEM_QUIET.
    let deadline = up_at + PROBLEM_QUIET + STEP;
    let mut got: Vec<(String, Option<String>)> = Vec::new();
    let mut problems = vec!["not cleared".to_string()];
    let (mut converged, mut cleared) = (None, None);
    while got.len() < 5 || !problems.is_empty() {
        let update = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("not converged: {got:?}, problems {problems:?}"))
            .expect("source ended");
        match update {
            Update::Changes(c) => {
                got.extend(
                    summary(&c)
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.map(str::to_string))),
                );
                compile(&mut compiler, c);
                converged = Some(up_at.elapsed());
            }
            Update::Errors(e) => {
                problems = e;
                cleared = Some(up_at.elapsed());
            }
            Update::Synced => panic!("synced twice"),
        }
    }
    println!(
        "after the API server came back: changes in {converged:?}, problems cleared in {cleared:?}"
    );
    got.sort();
    let want: Vec<(String, Option<String>)> = [
        ("NetworkPolicy/x/allow-client", None),
        ("NetworkPolicy/x/protect-db", Some("1490")),
        ("Pod/x/a", Some("1460")),
        ("Pod/x/b", Some("1450")),
        ("Pod/y/other", None),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
    .collect();
    assert_eq!(got, want);
    let plan = compiler.plan();
    assert!(plan.verdict(client_pod, a, TCP, 81), "x/a is open again");
    assert!(
        plan.verdict(client_pod, b, TCP, 80),
        "client may reach the db"
    );
    assert!(!plan.verdict(other, b, TCP, 80), "y/other is gone: no peer");
    assert!(
        !plan.verdict(ip("198.18.1.12"), b, TCP, 80),
        "the db is isolated"
    );
    assert_quiet(&mut rx);
}
