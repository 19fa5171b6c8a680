//! Issue #7's node paths through the whole agent, with real traffic: a NodePort reached from
//! outside the node, a pod reaching its own node, and the node reaching a pod (kubelet
//! probes). On a bridged node with kube-proxy in iptables mode and on a routed node with
//! kube-proxy in nftables mode (`palisade_tests::kube_proxy`); the agent runs in-process on
//! a manifest directory with `--service-cidr` and the node's outside link as `--uplink`, as
//! a real deployment would.
//!
//! Outside the node: an "external client" namespace joined to the node's namespace by a
//! veth pair (per flavour a /30 of 198.19.201.0/24 and a /126 of fd00:198:18:e1::/64: node
//! address `N`, client address `C`). In each family two NodePorts DNAT `N:30080`
//! (`externalTrafficPolicy: Local`: no masquerade, the backend sees `C`) and `N:30081`
//! (`Cluster`: kube-proxy masquerades, the backend sees the node's address on the pods'
//! side, their gateway `G`) to the backend x/web on port 80, which answers each connection
//! with the source address its socket saw, so every probe shows which source was judged.
//!
//! NetworkPolicy judges the packet the pod receives, i.e. after kube-proxy's NAT, by its
//! source. Without masquerade that is the client, which only an `ipBlock` covering `C`
//! lets in. After masquerade it is the node, and the API's exception for "traffic from the
//! node where a Pod is running" (kubelet probes) lets it in whatever the policies say —
//! every enforcer that sits behind kube-proxy sees the same SNATed packet, which is why
//! the Service docs say `Cluster` hides the client's address and `Local` exists to keep
//! it. The test asserts both sides with one policy in place: the `Cluster` request passes
//! (counted `allowed-from-node` on x/web's ingress) while the same request unmasqueraded
//! is dropped (`dropped-no-rule`), so it proves which rule applied.
//!
//! A pod reaching its own node is judged by the pod's egress check like any destination
//! (README, "Choices worth knowing": egress to the node is judged by policy). Host-network
//! peers are identified by the node's IPs: only an `ipBlock` covering the address used
//! allows them, the node's other addresses stay closed, and a `podSelector` matching a
//! hostNetwork pod (whose IPs are the node's) allows nothing (hostNetwork pods are not
//! pod peers). Note the Kubernetes concept page words its exception as traffic "to and
//! from" the node being always allowed; Palisade keeps it for traffic from the node only.

#[path = "e2e_netpol/common.rs"]
mod common;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;
use std::time::Duration;

use common::{labels, namespace, pod, policy, programmed, Agent, ProxyMode};
use palisade::dataplane::{read_counters, Maps, ServiceOptions};
use palisade_common::SVC_DEFAULT_MARK_MASK;
use palisade_tests::agent::slot_in;
use palisade_tests::kube_proxy::{NodePort, TrafficPolicy};
use palisade_tests::probe::expecting_reply;
use palisade_tests::{require_root, tcp_connect, Family, Flavour, NetNs, Node, ProbeError, Proto};
use palisade_tests::{Pod, Server};
use serde_json::{json, Value};

/// What a blocked connection costs; connections expected through are retried on timeouts.
const T: Duration = Duration::from_millis(700);
const BACKEND_PORT: u16 = 80;
const NODE_PORT_LOCAL: u16 = 30080;
const NODE_PORT_CLUSTER: u16 = 30081;
/// A server in the node's own namespace (host network), on the kubelet's port.
const HOST_PORT: u16 = 10250;
/// Nothing is sent to it: it is set so the agent runs as it would on a cluster.
const SERVICE_CIDR: &str = "198.19.202.0/24";
/// The node's end of the outside link (its client's end is `eth0` in the client's netns).
const EXT_IF: &str = "npext0";

/// The external client: its own namespace on a veth pair to the node, default routes via
/// the node. Dropping it deletes the pair, then the namespace.
struct External {
    node_ns: String,
    /// The node's and the client's addresses on the link: (IPv4, IPv6).
    node_ips: (Ipv4Addr, Ipv6Addr),
    client_ips: (Ipv4Addr, Ipv6Addr),
    ns: NetNs,
}

impl External {
    /// Joins a new namespace to `node` on the `k`-th /30 of 198.19.201.0/24 and /126 of
    /// fd00:198:18:e1::/64 (no node subnet or underlay takes that group, see
    /// `palisade_tests::cni`).
    fn connect(node: &Node, tag: &str, k: u8) -> External {
        let ns = NetNs::new(&format!("{tag}x")).unwrap();
        let v6 = |n: u8| Ipv6Addr::new(0xfd00, 0x198, 0x18, 0xe1, 0, 0, 0, n.into());
        let ext = External {
            node_ns: node.ns().name().to_string(),
            node_ips: (Ipv4Addr::new(198, 19, 201, 4 * k + 1), v6(4 * k + 1)),
            client_ips: (Ipv4Addr::new(198, 19, 201, 4 * k + 2), v6(4 * k + 2)),
            ns,
        };
        let n = node.ns();
        n.ip(&[
            "link",
            "add",
            EXT_IF,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ext.ns.name(),
        ])
        .unwrap();
        for (ns, dev, (v4, v6)) in [(n, EXT_IF, ext.node_ips), (&ext.ns, "eth0", ext.client_ips)] {
            ns.ip(&["addr", "add", &format!("{v4}/30"), "dev", dev])
                .unwrap();
            ns.ip(&["addr", "add", &format!("{v6}/126"), "dev", dev, "nodad"])
                .unwrap();
            ns.ip(&["link", "set", dev, "up"]).unwrap();
        }
        let (gw4, gw6) = ext.node_ips;
        ext.ns
            .ip(&["route", "add", "default", "via", &gw4.to_string()])
            .unwrap();
        ext.ns
            .ip(&["-6", "route", "add", "default", "via", &gw6.to_string()])
            .unwrap();
        ext
    }

    fn node_ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.node_ips.0.into(),
            Family::V6 => self.node_ips.1.into(),
        }
    }

    fn client_ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.client_ips.0.into(),
            Family::V6 => self.client_ips.1.into(),
        }
    }

    /// Connects to the node's outside address of `family` on `port`; the backend's
    /// answer is the source address it saw.
    fn node_port(
        &self,
        family: Family,
        port: u16,
        timeout: Duration,
    ) -> Result<String, ProbeError> {
        tcp_connect(&self.ns, self.node_ip(family), port, timeout)
    }

    fn node_port_expecting_reply(&self, family: Family, port: u16) -> Result<String, ProbeError> {
        expecting_reply(T, |t| self.node_port(family, port, t))
    }
}

impl Drop for External {
    fn drop(&mut self) {
        // Deleting one end removes both; the node namespace may already be gone.
        let _ = std::process::Command::new("ip")
            .args(["-n", &self.node_ns, "link", "del", EXT_IF])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A TCP server in a pod that answers every connection with the peer address its socket
/// saw (what the backend learns of the client after kube-proxy's NAT). Stopped on drop.
struct PeerEcho {
    fd: RawFd,
    thread: Option<JoinHandle<()>>,
}

impl PeerEcho {
    fn start(ns: &NetNs, port: u16) -> PeerEcho {
        let listener = ns
            .run(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)))
            .unwrap();
        let fd = listener.as_raw_fd();
        let thread = std::thread::spawn(move || {
            // accept() fails once Drop shuts the socket down.
            while let Ok((mut s, peer)) = listener.accept() {
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = s.write_all(peer.ip().to_canonical().to_string().as_bytes());
            }
        });
        PeerEcho {
            fd,
            thread: Some(thread),
        }
    }
}

impl Drop for PeerEcho {
    fn drop(&mut self) {
        // SAFETY: the thread owns the listener, so `fd` stays open until it is joined;
        // shutdown() on a listening socket wakes a blocked accept() with EINVAL.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Packets of `pod` counted under `reason` in `direction` by the pinned counters.
fn counted(agent: &Agent, pod: &str, direction: &str, reason: &str) -> u64 {
    let status = agent.status().unwrap();
    let slot = slot_in(&status, pod).unwrap_or_else(|| panic!("{pod} has no slot: {status}"));
    let maps = Maps::open(&agent.layout()).unwrap();
    read_counters(&maps, Some(&[slot]))
        .unwrap()
        .iter()
        .filter(|r| r.direction == direction && r.reason == reason)
        .map(|r| r.packets)
        .sum()
}

/// The pod object of harness pod `p` labelled `app: <app>`.
fn pod_object(p: &Pod, app: &str, rv: u64) -> Value {
    let (ns, name) = p.name().split_once('/').unwrap();
    pod(
        ns,
        name,
        &labels(&[("app", app)]),
        &[p.ipv4().into(), p.ipv6().into()],
        rv,
    )
}

/// Writes `spec` as policy `x/<name>` and waits until it is programmed.
fn apply(agent: &Agent, name: &str, spec: Value, rv: u64) {
    let o = policy("x", name, spec, rv);
    agent.write(&format!("np-{name}.json"), std::slice::from_ref(&o));
    agent.wait(&[programmed(&o)]);
}

fn delete(agent: &Agent, name: &str) {
    agent.remove(&format!("np-{name}.json"));
    agent.wait(&[(format!("NetworkPolicy/x/{name}"), None)]);
}

/// Ingress rules allowing TCP to the backend port from `peers`.
fn tcp80_from(peers: Value) -> Value {
    json!([{"from": peers, "ports": [{"protocol": "TCP", "port": BACKEND_PORT}]}])
}

fn node_paths(flavour: Flavour, mode: ProxyMode, tag: &str, k: u8) {
    require_root();
    let node = Node::new(tag, flavour).unwrap();
    let web = node.add_pod("x/web").unwrap();
    let client = node.add_pod("x/client").unwrap();
    let ext = External::connect(&node, tag, k);
    let _echo = PeerEcho::start(web.ns(), BACKEND_PORT);
    let _host_srv = Server::tcp(node.ns(), HOST_PORT, "node").unwrap();
    // The node's address on the pods' side (`node.gateway`) is where masquerade and the
    // node's own connections to pods come from.

    let mut nodeports = Vec::new();
    for ip in [IpAddr::from(web.ipv4()), web.ipv6().into()] {
        for (port, policy) in [
            (NODE_PORT_LOCAL, TrafficPolicy::Local),
            (NODE_PORT_CLUSTER, TrafficPolicy::Cluster),
        ] {
            nodeports.push(NodePort {
                proto: Proto::Tcp,
                port,
                policy,
                endpoints: vec![SocketAddr::new(ip, BACKEND_PORT)],
            });
        }
    }
    mode.install(node.ns(), &[], &nodeports);
    // kube-proxy's rules alone: Local keeps the client's address, Cluster shows the node's.
    for f in Family::BOTH {
        assert_eq!(
            ext.node_port_expecting_reply(f, NODE_PORT_LOCAL),
            Ok(ext.client_ip(f).to_string()),
            "{f:?} Local NodePort before the agent"
        );
        assert_eq!(
            ext.node_port_expecting_reply(f, NODE_PORT_CLUSTER),
            Ok(node.gateway(f).to_string()),
            "{f:?} Cluster NodePort before the agent"
        );
    }

    // A hostNetwork pod on this node: its IP is the node's, its label `app: hostsrv`.
    let mut hostsrv = pod(
        "x",
        "hostsrv",
        &labels(&[("app", "hostsrv")]),
        &[ext.node_ip(Family::V4), ext.node_ip(Family::V6)],
        1,
    );
    hostsrv["spec"]["hostNetwork"] = json!(true);
    // x/web is ingress-isolated, allowing TCP 80 from pods of x only; x/client is
    // egress-isolated, allowed nothing.
    let web_from_pods = policy(
        "x",
        "web-from-pods",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
            "ingress": tcp80_from(json!([{"podSelector": {}}]))}),
        1,
    );
    let client_no_egress = policy(
        "x",
        "client-no-egress",
        json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"]}),
        1,
    );
    let objects = vec![
        namespace("x", &labels(&[]), 1),
        pod_object(&web, "web", 1),
        pod_object(&client, "client", 1),
        hostsrv,
        web_from_pods,
        client_no_egress,
    ];
    let want: Vec<_> = objects.iter().map(programmed).collect();
    let files = vec![("00-objects.json".to_string(), objects)];
    let services = ServiceOptions {
        cidrs: vec![SERVICE_CIDR.parse().unwrap()],
        mark_mask: SVC_DEFAULT_MARK_MASK,
        uplinks: vec![EXT_IF.to_string()],
    };
    let agent = Agent::start_with_services(node.ns(), tag, &files, services);
    agent.wait(&want);
    let mut rv = 1;

    for f in Family::BOTH {
        // --- NodePort, Cluster: masqueraded to the node's address, let in as node traffic.
        let from_node = counted(&agent, "x/web", "ingress", "allowed-from-node");
        assert_eq!(
            ext.node_port_expecting_reply(f, NODE_PORT_CLUSTER),
            Ok(node.gateway(f).to_string()),
            "{f:?} Cluster NodePort: the backend sees the node, and node traffic is let in"
        );
        assert!(
            counted(&agent, "x/web", "ingress", "allowed-from-node") > from_node,
            "{f:?} Cluster NodePort connection not judged as node traffic"
        );
        // --- NodePort, Local: the same request with the client's address, no rule for it.
        let no_rule = counted(&agent, "x/web", "ingress", "dropped-no-rule");
        assert_eq!(
            ext.node_port(f, NODE_PORT_LOCAL, T),
            Err(ProbeError::Timeout),
            "{f:?} Local NodePort without an ipBlock for the client"
        );
        assert!(
            counted(&agent, "x/web", "ingress", "dropped-no-rule") > no_rule,
            "{f:?} Local NodePort drop not counted on x/web's ingress"
        );
        // --- Node → pod (kubelet probes) into the ingress-isolated x/web.
        let ip = web.ip(f);
        assert_eq!(
            expecting_reply(T, |t| tcp_connect(node.ns(), ip, BACKEND_PORT, t)),
            Ok(node.gateway(f).to_string()),
            "node -> {ip}"
        );
    }

    // An ipBlock covering the client lets the Local NodePort in, with the client's address.
    let client_blocks: Vec<Value> = [(Family::V4, 32), (Family::V6, 128)]
        .iter()
        .map(|(f, len)| json!({"ipBlock": {"cidr": format!("{}/{len}", ext.client_ip(*f))}}))
        .collect();
    rv += 1;
    apply(
        &agent,
        "web-from-client",
        json!({"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
            "ingress": tcp80_from(json!(client_blocks))}),
        rv,
    );
    for f in Family::BOTH {
        assert_eq!(
            ext.node_port_expecting_reply(f, NODE_PORT_LOCAL),
            Ok(ext.client_ip(f).to_string()),
            "{f:?} Local NodePort with an ipBlock for the client"
        );
    }
    // Removing it closes the NodePort again; the Cluster one stays open.
    delete(&agent, "web-from-client");
    for f in Family::BOTH {
        let no_rule = counted(&agent, "x/web", "ingress", "dropped-no-rule");
        assert_eq!(
            ext.node_port(f, NODE_PORT_LOCAL, T),
            Err(ProbeError::Timeout),
            "{f:?} Local NodePort after the ipBlock went"
        );
        assert!(counted(&agent, "x/web", "ingress", "dropped-no-rule") > no_rule);
        assert_eq!(
            ext.node_port_expecting_reply(f, NODE_PORT_CLUSTER),
            Ok(node.gateway(f).to_string()),
            "{f:?} Cluster NodePort after the ipBlock went"
        );
    }

    // --- Pod → its own node: judged by the pod's egress like any destination.
    let host = |ip: IpAddr, t: Duration| tcp_connect(client.ns(), ip, HOST_PORT, t);
    for f in Family::BOTH {
        let no_rule = counted(&agent, "x/client", "egress", "dropped-no-rule");
        assert_eq!(
            host(ext.node_ip(f), T),
            Err(ProbeError::Timeout),
            "{f:?} pod -> node without an egress rule"
        );
        assert!(
            counted(&agent, "x/client", "egress", "dropped-no-rule") > no_rule,
            "{f:?} pod -> node drop not counted on x/client's egress"
        );
    }
    // A podSelector matching the hostNetwork pod does not reach it: not a pod peer.
    rv += 1;
    apply(
        &agent,
        "client-to-hostsrv",
        json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "hostsrv"}}}],
                "ports": [{"protocol": "TCP", "port": HOST_PORT}]}]}),
        rv,
    );
    for f in Family::BOTH {
        assert_eq!(
            host(ext.node_ip(f), T),
            Err(ProbeError::Timeout),
            "{f:?} pod -> node allowed by a podSelector matching a hostNetwork pod"
        );
    }
    // An ipBlock with the node's IP does; the node's other address stays closed.
    let node_blocks: Vec<Value> = [(Family::V4, 32), (Family::V6, 128)]
        .iter()
        .map(|(f, len)| json!({"ipBlock": {"cidr": format!("{}/{len}", ext.node_ip(*f))}}))
        .collect();
    rv += 1;
    apply(
        &agent,
        "client-to-node",
        json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
            "egress": [{"to": node_blocks,
                "ports": [{"protocol": "TCP", "port": HOST_PORT}]}]}),
        rv,
    );
    for f in Family::BOTH {
        let ip = ext.node_ip(f);
        assert_eq!(
            expecting_reply(T, |t| host(ip, t)).as_deref(),
            Ok("node"),
            "pod -> node with an egress ipBlock for {ip}"
        );
        assert_eq!(
            host(node.gateway(f), T),
            Err(ProbeError::Timeout),
            "pod -> the node's address {} outside the ipBlock",
            node.gateway(f)
        );
    }
    delete(&agent, "client-to-node");
    for f in Family::BOTH {
        assert_eq!(
            host(ext.node_ip(f), T),
            Err(ProbeError::Timeout),
            "{f:?} pod -> node after the ipBlock went"
        );
    }
}

#[test]
fn node_paths_bridged_iptables() {
    node_paths(Flavour::Bridged, ProxyMode::Iptables, "npb", 0);
}

#[test]
fn node_paths_routed_nftables() {
    node_paths(Flavour::Routed, ProxyMode::Nftables, "npr", 1);
}
