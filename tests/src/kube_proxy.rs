//! kube-proxy's NAT rules, written into a node namespace the way kube-proxy writes them,
//! minus comments and masquerade marks (kube-proxy without `--cluster-cidr` or
//! `masqueradeAll` does not masquerade pod → ClusterIP traffic; only a pod reaching itself
//! would need it, and no test here does).
//!
//! - iptables mode (as `iptables-save` shows it): `PREROUTING → KUBE-SERVICES →
//!   KUBE-SVC-*` matching ClusterIP, protocol and port, then `-m statistic --mode random`
//!   over `KUBE-SEP-*` chains that DNAT to one endpoint each. Loaded in one
//!   `iptables-restore` (`ip6tables-restore` for IPv6) transaction, as kube-proxy syncs.
//! - nftables mode: per family a `kube-proxy` table with a `service-ips` verdict map
//!   (ClusterIP . protocol . port), a `service-*` chain per Service port that picks an
//!   `endpoint-*` chain with `numgen random`, and `dnat to` in the endpoint chain. Loaded
//!   in one `nft -f` transaction.
//!
//! NodePorts ([`NodePort`], installed with the `*_with_nodeports` variants) follow kube-proxy
//! too: the last rule of `KUBE-SERVICES` / `services` sends packets to one of the node's own
//! addresses (`addrtype --dst-type LOCAL` / `fib daddr type local`) to `KUBE-NODEPORTS` /
//! `nodeports`, which matches protocol and node port and goes to a `KUBE-EXT-*` /
//! `external-*` chain. With `externalTrafficPolicy: Cluster` that chain marks the packet
//! (`0x4000`, kube-proxy's masquerade bit) and `KUBE-POSTROUTING` / `masquerading`
//! masquerades it to the node's address on the way out; with `Local` there is no mark and
//! the backend sees the client's address.
//!
//! Every endpoint has its own port, as a named targetPort resolves per backend. Chains are
//! named by index, so install once per namespace; the rules go away with the namespace.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;

use anyhow::{bail, ensure, Result};

use crate::netns::{output_with_input, NetNs};
use crate::probe::Proto;

/// One TCP Service: its ClusterIP and port, and its endpoints (backend IP and port).
pub struct Service {
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<SocketAddrV4>,
}

/// One port of a Service (what kube-proxy makes one `KUBE-SVC-*` / `service-*` chain
/// for): ClusterIP, protocol and port, and the endpoints (backend address and port). All
/// addresses of one `ServicePort` are of the ClusterIP's family.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub cluster_ip: IpAddr,
    pub proto: Proto,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
}

impl From<&Service> for ServicePort {
    fn from(s: &Service) -> ServicePort {
        ServicePort {
            cluster_ip: s.cluster_ip.into(),
            proto: Proto::Tcp,
            port: s.port,
            endpoints: s.endpoints.iter().map(|&e| e.into()).collect(),
        }
    }
}

/// A Service's `externalTrafficPolicy`: what kube-proxy does to the source of a packet
/// arriving at a node port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// Masquerade to the node's address (any endpoint may be picked).
    Cluster,
    /// Keep the client's address (only endpoints on this node).
    Local,
}

/// One node port of a Service: protocol and port on every node address, the traffic
/// policy, and the endpoints it DNATs to (all of one family: IPv4 ones go to the
/// `iptables`/`ip` tables, IPv6 ones to `ip6tables`/`ip6`).
#[derive(Clone, Debug)]
pub struct NodePort {
    pub proto: Proto,
    pub port: u16,
    pub policy: TrafficPolicy,
    pub endpoints: Vec<SocketAddr>,
}

impl NodePort {
    fn is_ipv4(&self) -> bool {
        self.endpoints.first().is_some_and(SocketAddr::is_ipv4)
    }
}

/// kube-proxy's masquerade bit (`--iptables-masquerade-bit` 14).
const MASQ_MARK: &str = "0x4000";

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

/// Installs the iptables-mode rules of the TCP `services` in `ns`'s nat table.
pub fn install_iptables(ns: &NetNs, services: &[Service]) -> Result<()> {
    let ports: Vec<ServicePort> = services.iter().map(ServicePort::from).collect();
    install_iptables_ports(ns, &ports)
}

/// Installs the iptables-mode rules of `ports` in `ns`'s nat tables: IPv4 ones through
/// `iptables-restore`, IPv6 ones through `ip6tables-restore`.
pub fn install_iptables_ports(ns: &NetNs, ports: &[ServicePort]) -> Result<()> {
    install_iptables_with_nodeports(ns, ports, &[])
}

/// [`install_iptables_ports`] plus the `nodeports` (see the module doc), in the same
/// transaction per family.
pub fn install_iptables_with_nodeports(
    ns: &NetNs,
    ports: &[ServicePort],
    nodeports: &[NodePort],
) -> Result<()> {
    let [(v4, n4), (v6, n6)] = by_family(ports, nodeports)?;
    for (tool, family, nps) in [("iptables-restore", v4, n4), ("ip6tables-restore", v6, n6)] {
        if !family.is_empty() || !nps.is_empty() {
            feed(
                ns,
                &[tool, "--noflush"],
                &iptables_restore_input(&family, &nps),
            )?;
        }
    }
    Ok(())
}

/// The `iptables-restore` input for one family's Service ports and node ports.
fn iptables_restore_input(ports: &[&ServicePort], nodeports: &[&NodePort]) -> String {
    let mut chains = String::from(":KUBE-SERVICES - [0:0]\n");
    let mut rules = String::from("-A PREROUTING -j KUBE-SERVICES\n");
    for (i, sp) in ports.iter().enumerate() {
        let (svc, proto) = (format!("KUBE-SVC-{i}"), proto_name(sp.proto));
        let prefix = if sp.cluster_ip.is_ipv4() { 32 } else { 128 };
        chains += &format!(":{svc} - [0:0]\n");
        rules += &format!(
            "-A KUBE-SERVICES -d {}/{prefix} -p {proto} -m {proto} --dport {} -j {svc}\n",
            sp.cluster_ip, sp.port
        );
        iptables_endpoints(
            &svc,
            &format!("KUBE-SEP-{i}"),
            sp.proto,
            &sp.endpoints,
            &mut chains,
            &mut rules,
        );
    }
    if !nodeports.is_empty() {
        for c in ["KUBE-NODEPORTS", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"] {
            chains += &format!(":{c} - [0:0]\n");
        }
        rules += "-A POSTROUTING -j KUBE-POSTROUTING\n";
        rules += &format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}\n");
        rules +=
            &format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n");
        rules += &format!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n");
        rules += "-A KUBE-POSTROUTING -j MASQUERADE\n";
        // Last in KUBE-SERVICES, as kube-proxy puts it: ClusterIPs match first.
        rules += "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";
        for (k, np) in nodeports.iter().enumerate() {
            let (ext, svc, proto) = (
                format!("KUBE-EXT-NP{k}"),
                format!("KUBE-SVC-NP{k}"),
                proto_name(np.proto),
            );
            chains += &format!(":{ext} - [0:0]\n:{svc} - [0:0]\n");
            rules += &format!(
                "-A KUBE-NODEPORTS -p {proto} -m {proto} --dport {} -j {ext}\n",
                np.port
            );
            if np.policy == TrafficPolicy::Cluster {
                rules += &format!("-A {ext} -j KUBE-MARK-MASQ\n");
            }
            rules += &format!("-A {ext} -j {svc}\n");
            iptables_endpoints(
                &svc,
                &format!("KUBE-SEP-NP{k}"),
                np.proto,
                &np.endpoints,
                &mut chains,
                &mut rules,
            );
        }
    }
    format!("*nat\n{chains}{rules}COMMIT\n")
}

/// The rules of one `KUBE-SVC-*` chain `svc` picking among `endpoints`, each DNATed in its
/// own chain `{sep}-{j}`.
fn iptables_endpoints(
    svc: &str,
    sep: &str,
    proto: Proto,
    endpoints: &[SocketAddr],
    chains: &mut String,
    rules: &mut String,
) {
    let proto = proto_name(proto);
    for (j, ep) in endpoints.iter().enumerate() {
        let sep = format!("{sep}-{j}");
        *chains += &format!(":{sep} - [0:0]\n");
        // kube-proxy's arithmetic: endpoint j of n is taken with 1/(n-j), the last always.
        let left = endpoints.len() - j;
        if left > 1 {
            *rules += &format!(
                "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}\n",
                1.0 / left as f64
            );
        } else {
            *rules += &format!("-A {svc} -j {sep}\n");
        }
        // SocketAddr prints IPv6 as `[addr]:port`, which is what DNAT takes.
        *rules += &format!("-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {ep}\n");
    }
}

/// Installs the nftables-mode rules of `ports` in `ns`: an `ip kube-proxy` and/or an
/// `ip6 kube-proxy` table.
pub fn install_nftables(ns: &NetNs, ports: &[ServicePort]) -> Result<()> {
    install_nftables_with_nodeports(ns, ports, &[])
}

/// [`install_nftables`] plus the `nodeports` (see the module doc), in the same transaction.
pub fn install_nftables_with_nodeports(
    ns: &NetNs,
    ports: &[ServicePort],
    nodeports: &[NodePort],
) -> Result<()> {
    let [(v4, n4), (v6, n6)] = by_family(ports, nodeports)?;
    let mut script = String::new();
    for (family, ports, nps) in [("ip", v4, n4), ("ip6", v6, n6)] {
        if !ports.is_empty() || !nps.is_empty() {
            script += &nft_table(family, &ports, &nps);
        }
    }
    feed(ns, &["nft", "-f", "-"], &script)
}

fn nft_table(family: &str, ports: &[&ServicePort], nodeports: &[&NodePort]) -> String {
    let addr_type = if family == "ip" {
        "ipv4_addr"
    } else {
        "ipv6_addr"
    };
    let elements: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, sp)| {
            format!(
                "{} . {} . {} : goto service-{i}",
                sp.cluster_ip,
                proto_name(sp.proto),
                sp.port
            )
        })
        .collect();
    let mut s = format!("table {family} kube-proxy {{\n");
    s += "  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }\n";
    let mut services = String::new();
    // An empty `elements = { }` does not parse: no map without ClusterIPs.
    if !ports.is_empty() {
        s += &format!(
            "  map service-ips {{ type {addr_type} . inet_proto . inet_service : verdict; elements = {{ {} }} }}\n",
            elements.join(", ")
        );
        services += &format!(" {family} daddr . meta l4proto . th dport vmap @service-ips;");
    }
    for (i, sp) in ports.iter().enumerate() {
        s += &nft_endpoints(
            &format!("service-{i}"),
            &format!("endpoint-{i}"),
            sp.proto,
            &sp.endpoints,
        );
    }
    if !nodeports.is_empty() {
        let elements: Vec<String> = nodeports
            .iter()
            .enumerate()
            .map(|(k, np)| {
                format!(
                    "{} . {} : goto external-np{k}",
                    proto_name(np.proto),
                    np.port
                )
            })
            .collect();
        s += &format!(
            "  map service-nodeports {{ type inet_proto . inet_service : verdict; elements = {{ {} }} }}\n",
            elements.join(", ")
        );
        // Last in `services`, as kube-proxy puts it: ClusterIPs match first.
        services += " fib daddr type local jump nodeports;";
        s += "  chain nodeports { meta l4proto . th dport vmap @service-nodeports; }\n";
        s += &format!("  chain mark-for-masquerade {{ mark set mark or {MASQ_MARK}; }}\n");
        s += &format!(
            "  chain masquerading {{ mark and {MASQ_MARK} == 0 return; mark set mark xor {MASQ_MARK}; masquerade fully-random; }}\n"
        );
        s += "  chain nat-postrouting { type nat hook postrouting priority srcnat; policy accept; jump masquerading; }\n";
        for (k, np) in nodeports.iter().enumerate() {
            let masq = if np.policy == TrafficPolicy::Cluster {
                " jump mark-for-masquerade;"
            } else {
                ""
            };
            s += &format!("  chain external-np{k} {{{masq} goto service-np{k}; }}\n");
            s += &nft_endpoints(
                &format!("service-np{k}"),
                &format!("endpoint-np{k}"),
                np.proto,
                &np.endpoints,
            );
        }
    }
    s += &format!("  chain services {{{services} }}\n");
    s + "}\n"
}

/// The `service` chain picking one of `endpoints` with `numgen`, and each endpoint's
/// chain `{endpoint}-{j}` with its DNAT.
fn nft_endpoints(service: &str, endpoint: &str, proto: Proto, endpoints: &[SocketAddr]) -> String {
    let arms: Vec<String> = (0..endpoints.len())
        .map(|j| format!("{j} : goto {endpoint}-{j}"))
        .collect();
    let mut s = format!(
        "  chain {service} {{ numgen random mod {} vmap {{ {} }}; }}\n",
        endpoints.len(),
        arms.join(", ")
    );
    for (j, ep) in endpoints.iter().enumerate() {
        s += &format!(
            "  chain {endpoint}-{j} {{ meta l4proto {} dnat to {ep}; }}\n",
            proto_name(proto)
        );
    }
    s
}

/// The ports and node ports of each family, IPv4 first, once both are checked.
fn by_family<'a>(
    ports: &'a [ServicePort],
    nodeports: &'a [NodePort],
) -> Result<[(Vec<&'a ServicePort>, Vec<&'a NodePort>); 2]> {
    check_families(ports)?;
    check_nodeports(nodeports)?;
    let (v4, v6): (Vec<_>, Vec<_>) = ports.iter().partition(|p| p.cluster_ip.is_ipv4());
    let (n4, n6): (Vec<_>, Vec<_>) = nodeports.iter().partition(|n| n.is_ipv4());
    Ok([(v4, n4), (v6, n6)])
}

fn check_families(ports: &[ServicePort]) -> Result<()> {
    for sp in ports {
        ensure!(
            !sp.endpoints.is_empty(),
            "{} {:?}/{}: no endpoints (kube-proxy would reject, not DNAT)",
            sp.cluster_ip,
            sp.proto,
            sp.port
        );
        ensure!(
            sp.endpoints
                .iter()
                .all(|e| e.is_ipv4() == sp.cluster_ip.is_ipv4()),
            "{}: endpoints {:?} of another family",
            sp.cluster_ip,
            sp.endpoints
        );
    }
    Ok(())
}

fn check_nodeports(nodeports: &[NodePort]) -> Result<()> {
    for np in nodeports {
        ensure!(
            !np.endpoints.is_empty(),
            "node port {:?}/{}: no endpoints",
            np.proto,
            np.port
        );
        ensure!(
            np.endpoints.iter().all(|e| e.is_ipv4() == np.is_ipv4()),
            "node port {:?}/{}: endpoints {:?} of two families",
            np.proto,
            np.port,
            np.endpoints
        );
    }
    Ok(())
}

/// Runs `argv` in `ns` with `input` on its stdin.
fn feed(ns: &NetNs, argv: &[&str], input: &str) -> Result<()> {
    let out = output_with_input(
        Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .args(argv),
        input,
    )?;
    if !out.status.success() {
        bail!(
            "{} in {} failed ({}): {}\ninput:\n{input}",
            argv.join(" "),
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
