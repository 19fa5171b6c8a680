//! Shared by the `e2e_netpol*` tests: one agent running in-process in a node's network
//! namespace, fed a manifest directory with one object per file, every object carrying a
//! `metadata.resourceVersion`, so a test waits on `status.json` for exactly the versions
//! it wrote; and the policy [`Suite`] on the e2e model that `e2e_netpol` runs by pod IP
//! and `e2e_netpol_services` by ClusterIP.

#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use palisade::dataplane::{Layout, ServiceOptions};
use palisade_tests::inproc::ManifestAgent;
use palisade_tests::kube_proxy::{
    install_iptables_with_nodeports, install_nftables_with_nodeports, NodePort, ServicePort,
};
use palisade_tests::matrix::{self, truth_table, Matrix, ModelPod};
use palisade_tests::probe::{Family, Proto};
use palisade_tests::{Model, NetNs};
use serde_json::{json, Value};

pub const NODE: &str = "n1";

pub use palisade_tests::inproc::PROGRAM_TIMEOUT;

pub type Labels = BTreeMap<String, String>;

pub fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A blocked pair costs one timeout; a reachable one answers in well under a
/// millisecond, so this is short. Pairs expected reachable that time out are probed
/// again with a long timeout before being judged (`probe::expecting_reply`).
pub const FAST_TIMEOUT: Duration = Duration::from_millis(300);
pub const WORKERS: usize = 64;
/// What every matrix of the model is probed on.
pub const COMBOS: [(u16, Proto); 4] = [
    (80, Proto::Tcp),
    (81, Proto::Tcp),
    (80, Proto::Udp),
    (81, Proto::Udp),
];

/// The file a model pod's object is written to.
pub fn pod_file(name: &str) -> String {
    format!("pod-{}.json", name.replace('/', "-"))
}

/// Model pod `ns/name` with labels `l`, at the addresses the node gave it.
pub fn pod_object(model: &Model, name: &str, l: &Labels, rv: u64) -> Value {
    let (ns, p) = name.split_once('/').unwrap();
    let pd = model.pod(name);
    let ips: [IpAddr; 2] = [pd.ipv4().into(), pd.ipv6().into()];
    pod(ns, p, l, &ips, rv)
}

pub fn sel(kv: &[(&str, &str)]) -> Value {
    json!({"matchLabels": labels(kv)})
}

/// A `matchExpressions` entry; `values` empty = none (`Exists`, `DoesNotExist`).
pub fn expr(key: &str, op: &str, values: &[&str]) -> Value {
    if values.is_empty() {
        json!({"key": key, "operator": op})
    } else {
        json!({"key": key, "operator": op, "values": values})
    }
}

/// kube-proxy's mode: which rules of `palisade_tests::kube_proxy` a test's node gets.
#[derive(Clone, Copy, Debug)]
pub enum ProxyMode {
    Iptables,
    Nftables,
}

impl ProxyMode {
    /// Writes the rules of `ports` and `nodeports` into `node` as kube-proxy in this mode
    /// would.
    pub fn install(self, node: &NetNs, ports: &[ServicePort], nodeports: &[NodePort]) {
        match self {
            ProxyMode::Iptables => install_iptables_with_nodeports(node, ports, nodeports),
            ProxyMode::Nftables => install_nftables_with_nodeports(node, ports, nodeports),
        }
        .unwrap_or_else(|e| panic!("kube-proxy {self:?} rules: {e:#}"))
    }
}

/// The agent on its own thread inside the node's namespace; stopped on drop, then its
/// pins and directories are removed.
pub struct Agent(ManifestAgent);

impl Agent {
    /// Starts an agent on `files` (name -> objects) and waits for its first sync.
    pub fn start(node: &NetNs, tag: &str, files: &[(String, Vec<Value>)]) -> Agent {
        Agent::start_with_services(node, tag, files, ServiceOptions::default())
    }

    /// [`Agent::start`] with `--service-cidr`, `--mark-mask` and `--uplink` as `services`.
    pub fn start_with_services(
        node: &NetNs,
        tag: &str,
        files: &[(String, Vec<Value>)],
        services: ServiceOptions,
    ) -> Agent {
        let lists: Vec<(&str, String)> = files
            .iter()
            .map(|(name, objs)| (name.as_str(), list(objs)))
            .collect();
        let lists: Vec<(&str, &str)> = lists.iter().map(|(n, l)| (*n, l.as_str())).collect();
        let agent = Agent(ManifestAgent::spawn(node, NODE, tag, &lists, |cfg| {
            cfg.services = services
        }));
        agent
            .0
            .agent
            .wait_status("agent did not sync", PROGRAM_TIMEOUT, |s| {
                s["synced"] == true
            });
        agent
    }

    pub fn layout(&self) -> Layout {
        self.0.layout()
    }

    /// Writes `objs` as one JSON `List` file (atomically: write + rename).
    pub fn write(&self, file: &str, objs: &[Value]) {
        self.0.write(file, &list(objs));
    }

    pub fn remove(&self, file: &str) {
        let _ = std::fs::remove_file(self.0.manifests.join(file));
    }

    pub fn status(&self) -> Option<Value> {
        self.0.agent.status()
    }

    /// Waits until the status satisfies `check`, or fails naming `what`.
    pub fn wait_status(&self, what: &str, check: impl Fn(&Value) -> bool) {
        self.0.agent.wait_status(what, PROGRAM_TIMEOUT, check);
    }

    /// Waits until `programmed` holds every `(key, Some(version))` and none of the
    /// `(key, None)`.
    pub fn wait(&self, want: &[(String, Option<String>)]) {
        self.0.agent.wait_status(
            &format!("agent did not program {want:?}"),
            PROGRAM_TIMEOUT,
            |s| {
                want.iter().all(|(k, v)| match v {
                    Some(v) => s["programmed"][k.as_str()].as_str() == Some(v.as_str()),
                    None => s["programmed"].get(k.as_str()).is_none(),
                })
            },
        );
    }
}

/// `objs` as one JSON `List`.
fn list(objs: &[Value]) -> String {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objs});
    serde_json::to_string_pretty(&list).unwrap()
}

/// `status.json` key of an object.
pub fn key(obj: &Value) -> String {
    let kind = obj["kind"].as_str().unwrap();
    let name = obj["metadata"]["name"].as_str().unwrap();
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

/// `(key, version)` of an object, for [`Agent::wait`].
pub fn programmed(obj: &Value) -> (String, Option<String>) {
    (
        key(obj),
        obj["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_string),
    )
}

pub fn namespace(name: &str, labels: &Labels, rv: u64) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels, "resourceVersion": rv.to_string()}})
}

/// A pod of the e2e model on [`NODE`]: containers declare the named ports
/// `serve-{80,81}-{tcp,udp}`; `ips` empty = not reported yet (as right after scheduling).
pub fn pod(ns: &str, name: &str, labels: &Labels, ips: &[IpAddr], rv: u64) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
            "resourceVersion": rv.to_string()},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "agnhost", "ports": [
            {"name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP"},
            {"name": "serve-81-tcp", "containerPort": 81, "protocol": "TCP"},
            {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"},
            {"name": "serve-81-udp", "containerPort": 81, "protocol": "UDP"}]}]},
        "status": {"phase": "Running"}});
    if let Some(first) = ips.first() {
        p["status"]["podIP"] = json!(first.to_string());
        p["status"]["podIPs"] = json!(ips
            .iter()
            .map(|ip| json!({"ip": ip.to_string()}))
            .collect::<Vec<_>>());
    }
    p
}

pub fn policy(ns: &str, name: &str, spec: Value, rv: u64) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": rv.to_string()},
        "spec": spec})
}

/// Labels a model namespace starts (and is reset) with.
pub fn base_ns_labels(ns: &str) -> Labels {
    labels(&[("ns", ns)])
}

/// Labels a model pod (`ns/name`) starts (and is reset) with.
pub fn base_pod_labels(name: &str) -> Labels {
    labels(&[("pod", name.split_once('/').unwrap().1)])
}

pub fn ns_file(ns: &str) -> String {
    format!("ns-{ns}.json")
}

/// How a suite's probes reach their target pod.
pub enum Target {
    /// The pod's own IP.
    PodIp,
    /// The ClusterIPs (IPv4, IPv6) of the pod's own Service, by pod name.
    ClusterIp(BTreeMap<String, (IpAddr, IpAddr)>),
}

impl Target {
    fn addr(&self, family: Family, target: &ModelPod, port: u16) -> SocketAddr {
        match self {
            Target::PodIp => target.pod.addr(family, port),
            Target::ClusterIp(vips) => {
                let (v4, v6) = vips[&target.name];
                SocketAddr::new(if family == Family::V4 { v4 } else { v6 }, port)
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Target::PodIp => "pod IP",
            Target::ClusterIp(_) => "ClusterIP",
        }
    }
}

/// What an expectation sees of a pod.
pub struct View<'a> {
    /// `ns/pod`
    pub name: &'a str,
    pub ns: &'a str,
    pub labels: &'a Labels,
    pub ns_labels: &'a Labels,
}

impl View<'_> {
    pub fn is(&self, name: &str) -> bool {
        self.name == name
    }

    pub fn pod(&self) -> &str {
        self.labels.get("pod").map_or("", String::as_str)
    }
}

/// `expect(from, to, port, proto)`: whether `from` reaches `to` on `port`/`proto`.
pub type Expect<'e> = &'e dyn Fn(&View, &View, u16, Proto) -> bool;

/// A policy suite on the model: one agent fed the model's namespaces, pods and the
/// current case's policies, one object per file. Every change bumps the resourceVersion
/// and waits until the agent has programmed (or forgotten) it; every check probes the
/// matrices of [`COMBOS`] at the suite's [`Target`] against an expectation.
pub struct Suite {
    // The agent stops before the model's pods and node go.
    agent: Agent,
    pub model: Model,
    target: Target,
    tag: &'static str,
    /// Labels as last written, by namespace and by pod name.
    ns_labels: BTreeMap<String, Labels>,
    pod_labels: BTreeMap<String, Labels>,
    /// Policy files written by the current case: (file, status key).
    policy_files: Vec<(String, String)>,
    rv: u64,
    /// Matrix checks run, and cells compared (ordered pod pairs × (port, protocol)).
    pub checks: usize,
    pub cells: usize,
}

impl Suite {
    /// Starts an agent with `services` in `model`'s node on its namespaces and pods with
    /// their base labels, and waits until it has programmed them all.
    pub fn start(
        model: Model,
        tag: &'static str,
        services: ServiceOptions,
        target: Target,
    ) -> Suite {
        let rv = 1;
        let ns_labels: BTreeMap<String, Labels> = matrix::NAMESPACES
            .iter()
            .map(|ns| (ns.to_string(), base_ns_labels(ns)))
            .collect();
        let pod_labels: BTreeMap<String, Labels> = model
            .names()
            .into_iter()
            .map(|n| {
                let l = base_pod_labels(&n);
                (n, l)
            })
            .collect();
        let mut files = Vec::new();
        let mut want = Vec::new();
        for (ns, l) in &ns_labels {
            let o = namespace(ns, l, rv);
            want.push(programmed(&o));
            files.push((ns_file(ns), vec![o]));
        }
        for (name, l) in &pod_labels {
            let o = pod_object(&model, name, l, rv);
            want.push(programmed(&o));
            files.push((pod_file(name), vec![o]));
        }
        let agent = Agent::start_with_services(model.node().ns(), tag, &files, services);
        agent.wait(&want);
        Suite {
            agent,
            model,
            target,
            tag,
            ns_labels,
            pod_labels,
            policy_files: Vec::new(),
            rv: rv + 1,
            checks: 0,
            cells: 0,
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Writes (or rewrites) a policy of the current case and waits until it is live.
    pub fn apply(&mut self, ns: &str, name: &str, spec: Value) {
        let rv = self.next_rv();
        let o = policy(ns, name, spec, rv);
        let file = format!("np-{ns}-{name}.json");
        self.agent.write(&file, std::slice::from_ref(&o));
        if !self.policy_files.iter().any(|(f, _)| *f == file) {
            self.policy_files.push((file, key(&o)));
        }
        self.agent.wait(&[programmed(&o)]);
    }

    pub fn delete_policy(&mut self, ns: &str, name: &str) {
        let file = format!("np-{ns}-{name}.json");
        self.agent.remove(&file);
        self.policy_files.retain(|(f, _)| *f != file);
        self.agent
            .wait(&[(format!("NetworkPolicy/{ns}/{name}"), None)]);
    }

    pub fn set_ns_labels(&mut self, ns: &str, l: Labels) {
        let rv = self.next_rv();
        let o = namespace(ns, &l, rv);
        self.agent.write(&ns_file(ns), std::slice::from_ref(&o));
        self.ns_labels.insert(ns.to_string(), l);
        self.agent.wait(&[programmed(&o)]);
    }

    /// Writes the object of the model's pod `name` (`ns/name`) with labels `l`.
    pub fn set_pod_labels(&mut self, name: &str, l: Labels) {
        let rv = self.next_rv();
        let o = pod_object(&self.model, name, &l, rv);
        self.agent.write(&pod_file(name), std::slice::from_ref(&o));
        self.pod_labels.insert(name.to_string(), l);
        self.agent.wait(&[programmed(&o)]);
    }

    /// Adds pod `name` to the model (CNI ADD, servers) and writes its object with its
    /// base labels.
    pub fn add_pod(&mut self, name: &str) {
        self.model.add_pod(name).unwrap();
        self.set_pod_labels(name, base_pod_labels(name));
    }

    /// Removes pod `name`'s object, waits until the agent has forgotten it, and removes
    /// the pod from the model.
    pub fn remove_pod(&mut self, name: &str) {
        self.agent.remove(&pod_file(name));
        self.agent.wait(&[(format!("Pod/{name}"), None)]);
        self.pod_labels.remove(name);
        self.model.remove_pod(name);
    }

    /// Removes the case's policies and restores the base labels of the model's objects.
    pub fn reset(&mut self) {
        let files = std::mem::take(&mut self.policy_files);
        for (f, _) in &files {
            self.agent.remove(f);
        }
        let gone: Vec<_> = files.into_iter().map(|(_, k)| (k, None)).collect();
        self.agent.wait(&gone);
        for ns in matrix::NAMESPACES {
            if self.ns_labels[ns] != base_ns_labels(ns) {
                self.set_ns_labels(ns, base_ns_labels(ns));
            }
        }
        for name in self.model.names() {
            if self.pod_labels[&name] != base_pod_labels(&name) {
                self.set_pod_labels(&name, base_pod_labels(&name));
            }
        }
    }

    /// Checks every matrix of [`COMBOS`] (IPv4) against `expect`.
    pub fn check(&mut self, case: &str, expect: Expect) {
        self.check_family(case, Family::V4, expect);
    }

    /// Probes every matrix of [`COMBOS`] at the [`Target`]'s addresses of `family` and
    /// compares it with `expect`.
    pub fn check_family(&mut self, case: &str, family: Family, expect: Expect) {
        self.checks += 1;
        let n = self.model.pods().len();
        self.cells += COMBOS.len() * n * (n - 1);
        let started = Instant::now();
        let names = self.model.names();
        let views: Vec<View> = names
            .iter()
            .map(|n| {
                let (ns, _) = n.split_once('/').unwrap();
                View {
                    name: n,
                    ns,
                    labels: &self.pod_labels[n],
                    ns_labels: &self.ns_labels[ns],
                }
            })
            .collect();
        let wanted: Vec<Matrix> = COMBOS
            .iter()
            .map(|&(port, proto)| {
                let mut m = Matrix::new(names.clone(), false);
                for f in &views {
                    for t in &views {
                        m.set(f.name, t.name, expect(f, t, port, proto));
                    }
                }
                m
            })
            .collect();
        let target = &self.target;
        let seen =
            self.model
                .probe_many_at(&COMBOS, FAST_TIMEOUT, WORKERS, &wanted, |pod, port| {
                    target.addr(family, pod, port)
                });
        let mut failures = String::new();
        for (c, (want, got)) in wanted.iter().zip(&seen).enumerate() {
            if !want.diff(got).is_empty() {
                let (port, proto) = COMBOS[c];
                failures += &format!(
                    "--- {proto:?}/{port} {family:?} by {}\n{}\n",
                    target.name(),
                    truth_table(want, got)
                );
            }
        }
        assert!(
            failures.is_empty(),
            "[{}] case {case:?}: reachability mismatch\n{failures}",
            self.tag
        );
        eprintln!(
            "[{}] {case}: ok ({} ms)",
            self.tag,
            started.elapsed().as_millis()
        );
    }

    /// The node's IPv4 pod CIDR.
    pub fn cidr(&self) -> String {
        self.model.node().pod_cidr_v4()
    }

    /// The /32 of model pod `name`'s IPv4 address.
    pub fn host(&self, name: &str) -> String {
        format!("{}/32", self.model.pod(name).ipv4())
    }
}

// Cases both suites run as they stand (by pod IP and by ClusterIP, where the API judges
// the backend a Service reaches the same way).

pub fn allow_all_egress_wins_over_default_deny(s: &mut Suite) {
    s.apply(
        "x",
        "deny-egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    s.apply(
        "x",
        "allow-all-egress",
        json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
    );
    s.check(
        "allow-all egress wins over default-deny-egress",
        &|_, _, _, _| true,
    );
    s.reset();
}

pub fn ingress_and_egress_in_one_policy(s: &mut Suite) {
    s.apply(
        "x",
        "a-both",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"namespaceSelector": sel(&[("ns", "y")])}]}],
            "egress": [{"to": [{"namespaceSelector": sel(&[("ns", "z")])}]}]}),
    );
    s.check("ingress and egress in one policy", &|f, t, _, _| {
        (!t.is("x/a") || f.ns == "y") && (!f.is("x/a") || t.ns == "z")
    });
    s.reset();
}

pub fn client_egress_deny_holds_if_the_server_allows(s: &mut Suite) {
    s.apply(
        "z",
        "allow-all",
        json!({"podSelector": {}, "ingress": [{}]}),
    );
    s.apply(
        "x",
        "a-egress-y",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": sel(&[("ns", "y")])}]}]}),
    );
    s.check(
        "client egress deny holds even if the server allows",
        &|f, t, _, _| !f.is("x/a") || t.ns == "y",
    );
    s.reset();
}

/// An egress ipBlock over the pod CIDR with y/b excepted, then the hole filled by another
/// policy's ipBlock.
pub fn egress_ip_block_with_except(s: &mut Suite) {
    let (cidr, yb) = (s.cidr(), s.host("y/b"));
    s.apply(
        "x",
        "a-egress-block",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": cidr, "except": [yb]}}]}]}),
    );
    s.check("ipBlock with except, egress", &|f, t, _, _| {
        !f.is("x/a") || !t.is("y/b")
    });
    s.apply(
        "x",
        "a-egress-yb",
        json!({"podSelector": sel(&[("pod", "a")]), "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": yb}}]}]}),
    );
    s.check(
        "an except hole allowed by another policy's ipBlock",
        &|_, _, _, _| true,
    );
    s.reset();
}
