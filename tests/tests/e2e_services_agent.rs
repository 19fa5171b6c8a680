//! Tier 3 for issue #7 through the whole agent: manifests in a directory → compiler →
//! maps → verdicts on the wire, with `--service-cidr` on and kube-proxy's iptables rules
//! in the node's namespace (see `palisade_tests::kube_proxy`). Two routed nodes joined by
//! an underlay; the agent runs in-process on node n1 with the underlay as its uplink, so
//! backends on n2 are judged by `palisade_uplink`. Every Service's port (80) differs from
//! its targetPort, and a connection to a ClusterIP is judged on the backend kube-proxy
//! picked: its labels and its own port.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use palisade::dataplane::ServiceOptions;
use palisade_common::SVC_DEFAULT_MARK_MASK;
use palisade_tests::inproc::ManifestAgent;
use palisade_tests::kube_proxy::{install_iptables, Service};
use palisade_tests::{manifests, require_root, tcp_connect, Node, Pod, ProbeError, Server};

const T: Duration = Duration::from_millis(700);
const NODE_A: &str = "n1";
const NODE_B: &str = "n2";
const SVC_PORT: u16 = 80;
const SERVICE_CIDR: &str = "198.19.128.0/24";
/// Connections made to a two-backend Service: a backend is missed with p = 2^-24.
const SPREAD: usize = 24;

fn cip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 128, n)
}

/// A Service on port 80 whose endpoints are (backend, its target port).
fn service(n: u8, endpoints: &[(&Pod, u16)]) -> Service {
    Service {
        cluster_ip: cip(n),
        port: SVC_PORT,
        endpoints: endpoints
            .iter()
            .map(|(p, port)| SocketAddrV4::new(p.ipv4(), *port))
            .collect(),
    }
}

/// A running Pod labelled `app: <app>` on `node`, declaring `ports` as (name, containerPort).
fn pod_yaml(p: &Pod, node: &str, app: &str, ports: &[(&str, u16)]) -> String {
    let (ns, name) = p.name().split_once('/').unwrap();
    let mut s = format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    app: {app}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: agnhost\n"
    );
    if !ports.is_empty() {
        s += "    ports:\n";
        for (pname, port) in ports {
            s += &format!("    - {{name: {pname}, containerPort: {port}, protocol: TCP}}\n");
        }
    }
    s += &format!(
        "status:\n  phase: Running\n  podIP: {v4}\n  podIPs: [{{ip: {v4}}}, {{ip: {v6}}}]\n",
        v4 = p.ipv4(),
        v6 = p.ipv6()
    );
    s
}

/// x/client may egress to pods labelled `app: <app>` on `port` (a number or a name).
fn allow_egress(name: &str, app: &str, port: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - podSelector: {{matchLabels: {{app: {app}}}}}\n    ports:\n    - {{protocol: TCP, port: {port}}}\n"
    )
}

/// Starts the agent of `node` (named `node_name`) on `yaml`, with service egress deferral
/// for [`SERVICE_CIDR`] and `uplink`; returns once `keys` are programmed.
fn start_agent(
    node: &Node,
    node_name: &str,
    uplink: &str,
    yaml: &str,
    keys: &[&str],
) -> ManifestAgent {
    let agent = ManifestAgent::spawn(
        node.ns(),
        node_name,
        node.ns().name(),
        &[("00-objects.yaml", yaml)],
        |cfg| {
            cfg.services = ServiceOptions {
                cidrs: vec![SERVICE_CIDR.parse().unwrap()],
                mark_mask: SVC_DEFAULT_MARK_MASK,
                uplinks: vec![uplink.to_string()],
            }
        },
    );
    agent.agent.wait_programmed(keys);
    agent
}

fn connect(client: &Pod, vip: Ipv4Addr) -> Result<String, ProbeError> {
    tcp_connect(client.ns(), IpAddr::V4(vip), SVC_PORT, T)
}

/// [`SPREAD`] connections to `vip`: how many each backend answered, and how many timed out.
fn spread(client: &Pod, vip: Ipv4Addr) -> (BTreeMap<String, usize>, usize) {
    let (mut answered, mut blocked) = (BTreeMap::new(), 0);
    for _ in 0..SPREAD {
        match connect(client, vip) {
            Ok(who) => *answered.entry(who).or_insert(0) += 1,
            Err(ProbeError::Timeout) => blocked += 1,
            Err(e) => panic!("{vip}: {e:?}"),
        }
    }
    (answered, blocked)
}

/// Over [`spread`] connections to `vip`, only backend `only` answers, some are dropped
/// (those the Service sent to a denied backend), and the denied backend's server `denied`
/// (named `what`) never sees a connection.
fn assert_only_backend(client: &Pod, vip: Ipv4Addr, only: &str, denied: &Server, what: &str) {
    let hits = denied.hits();
    let (answered, blocked) = spread(client, vip);
    assert!(
        answered.keys().all(|k| k == only) && answered.contains_key(only) && blocked > 0,
        "{vip}: {answered:?} answered, {blocked} blocked"
    );
    assert_eq!(denied.hits(), hits, "{what} saw a connection");
}

#[test]
fn agent_judges_service_egress_on_the_backend_with_kube_proxy_iptables() {
    require_root();
    let a = Node::routed("sagla").unwrap();
    let b = Node::routed("saglb").unwrap();
    let underlay = a.join(&b).unwrap();
    let client = a.add_pod("x/client").unwrap();
    let db1 = a.add_pod("x/db1").unwrap();
    let web1 = a.add_pod("x/web1").unwrap();
    let db2 = b.add_pod("x/db2").unwrap();
    let _s1 = Server::tcp(db1.ns(), 5432, "x/db1").unwrap();
    let web_srv = Server::tcp(web1.ns(), 5432, "x/web1").unwrap();
    let _s2 = Server::tcp(db2.ns(), 5432, "x/db2").unwrap();
    install_iptables(
        a.ns(),
        &[
            service(40, &[(&db1, 5432)]),                // local db backend
            service(41, &[(&db2, 5432)]),                // remote db backend
            service(42, &[(&web1, 5432)]),               // local web backend
            service(43, &[(&db1, 5432), (&web1, 5432)]), // one of each
        ],
    )
    .unwrap();
    // kube-proxy's rules work before Palisade is there.
    assert_eq!(connect(&client, cip(42)).as_deref(), Ok("x/web1"));

    let yaml = [
        manifests::namespace("x"),
        pod_yaml(&client, NODE_A, "client", &[]),
        pod_yaml(&db1, NODE_A, "db", &[]),
        pod_yaml(&web1, NODE_A, "web", &[]),
        pod_yaml(&db2, NODE_B, "db", &[]),
    ]
    .concat();
    let agent = start_agent(
        &a,
        NODE_A,
        underlay.ifname(),
        &yaml,
        &["Pod/x/client", "Pod/x/db1", "Pod/x/web1"],
    );
    // No policy: every Service answers.
    for (n, who) in [(40, "x/db1"), (41, "x/db2"), (42, "x/web1")] {
        assert_eq!(connect(&client, cip(n)).as_deref(), Ok(who), "{}", cip(n));
    }

    // Egress to app=db on 5432: the db Services answer, web's does not.
    agent.apply(
        "10-db.yaml",
        &allow_egress("allow-db", "db", "5432"),
        &["NetworkPolicy/x/allow-db"],
    );
    assert_eq!(
        connect(&client, cip(40)).as_deref(),
        Ok("x/db1"),
        "local db"
    );
    assert_eq!(
        connect(&client, cip(41)).as_deref(),
        Ok("x/db2"),
        "remote db"
    );
    assert_eq!(connect(&client, cip(42)), Err(ProbeError::Timeout), "web");
    assert_only_backend(&client, cip(43), "x/db1", &web_srv, "the web backend");

    // Plus egress to app=web: both backends of the mixed Service answer.
    agent.apply(
        "20-web.yaml",
        &allow_egress("allow-web", "web", "5432"),
        &["NetworkPolicy/x/allow-web"],
    );
    assert_eq!(connect(&client, cip(42)).as_deref(), Ok("x/web1"), "web");
    let (answered, blocked) = spread(&client, cip(43));
    assert!(
        answered.len() == 2 && blocked == 0,
        "{}: {answered:?} answered, {blocked} blocked",
        cip(43)
    );

    // Only app=web: the verdicts swap.
    agent.delete("10-db.yaml", "NetworkPolicy/x/allow-db");
    assert_eq!(
        connect(&client, cip(40)),
        Err(ProbeError::Timeout),
        "local db"
    );
    assert_eq!(
        connect(&client, cip(41)),
        Err(ProbeError::Timeout),
        "remote db"
    );
    assert_eq!(connect(&client, cip(42)).as_deref(), Ok("x/web1"), "web");

    // No policy left: the client is not isolated, everything answers again.
    agent.delete("20-web.yaml", "NetworkPolicy/x/allow-web");
    for (n, who) in [(40, "x/db1"), (41, "x/db2"), (42, "x/web1")] {
        assert_eq!(connect(&client, cip(n)).as_deref(), Ok(who), "{}", cip(n));
    }
}

#[test]
fn service_egress_follows_each_backends_own_target_port() {
    require_root();
    let a = Node::routed("sapta").unwrap();
    let b = Node::routed("saptb").unwrap();
    let underlay = a.join(&b).unwrap();
    let client = a.add_pod("x/client").unwrap();
    // Backends of one Service whose targetPort is the name `db`: A serves it on 5432,
    // B and the remote C on 6432. B also serves 5432, under no name.
    let dba = a.add_pod("x/dba").unwrap();
    let dbb = a.add_pod("x/dbb").unwrap();
    let dbc = b.add_pod("x/dbc").unwrap();
    let _sa = Server::tcp(dba.ns(), 5432, "x/dba").unwrap();
    let sb = Server::tcp(dbb.ns(), 6432, "x/dbb").unwrap();
    let _sb2 = Server::tcp(dbb.ns(), 5432, "x/dbb:5432").unwrap();
    let _sc = Server::tcp(dbc.ns(), 6432, "x/dbc").unwrap();
    install_iptables(
        a.ns(),
        &[
            service(50, &[(&dba, 5432)]),
            service(51, &[(&dbb, 6432)]),
            service(52, &[(&dba, 5432), (&dbb, 6432)]),
            service(53, &[(&dbc, 6432)]),
            service(54, &[(&dbb, 5432)]),
        ],
    )
    .unwrap();
    assert_eq!(connect(&client, cip(51)).as_deref(), Ok("x/dbb"));

    let yaml = [
        manifests::namespace("x"),
        pod_yaml(&client, NODE_A, "client", &[]),
        pod_yaml(&dba, NODE_A, "db", &[("db", 5432)]),
        pod_yaml(&dbb, NODE_A, "db", &[("db", 6432)]),
        pod_yaml(&dbc, NODE_B, "db", &[("db", 6432)]),
    ]
    .concat();
    let agent = start_agent(
        &a,
        NODE_A,
        underlay.ifname(),
        &yaml,
        &["Pod/x/client", "Pod/x/dba", "Pod/x/dbb"],
    );

    // Egress to app=db on 5432 only: through a ClusterIP exactly when DNAT picks port 5432.
    agent.apply(
        "10-num.yaml",
        &allow_egress("allow-5432", "db", "5432"),
        &["NetworkPolicy/x/allow-5432"],
    );
    assert_eq!(connect(&client, cip(50)).as_deref(), Ok("x/dba"), "A:5432");
    assert_eq!(
        connect(&client, cip(51)),
        Err(ProbeError::Timeout),
        "B:6432"
    );
    assert_eq!(
        connect(&client, cip(53)),
        Err(ProbeError::Timeout),
        "C:6432"
    );
    assert_eq!(
        connect(&client, cip(54)).as_deref(),
        Ok("x/dbb:5432"),
        "B:5432"
    );
    assert_only_backend(&client, cip(52), "x/dba", &sb, "B on 6432");

    // Egress to app=db on the named port `db`: each backend's own number.
    agent.apply(
        "20-named.yaml",
        &allow_egress("allow-named", "db", "db"),
        &["NetworkPolicy/x/allow-named"],
    );
    agent.delete("10-num.yaml", "NetworkPolicy/x/allow-5432");
    assert_eq!(connect(&client, cip(50)).as_deref(), Ok("x/dba"), "A:5432");
    assert_eq!(connect(&client, cip(51)).as_deref(), Ok("x/dbb"), "B:6432");
    assert_eq!(connect(&client, cip(53)).as_deref(), Ok("x/dbc"), "C:6432");
    // 5432 is not B's `db` port.
    assert_eq!(
        connect(&client, cip(54)),
        Err(ProbeError::Timeout),
        "B:5432"
    );
    let (answered, blocked) = spread(&client, cip(52));
    assert!(
        answered.len() == 2 && blocked == 0,
        "{}: {answered:?} answered, {blocked} blocked",
        cip(52)
    );
}
