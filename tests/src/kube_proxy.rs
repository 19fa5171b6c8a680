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
//! Every endpoint has its own port, as a named targetPort resolves per backend. Chains are
//! named by index, so install once per namespace; the rules go away with the namespace.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use crate::netns::NetNs;
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
    check_families(ports)?;
    let (v4, v6): (Vec<&ServicePort>, Vec<&ServicePort>) =
        ports.iter().partition(|p| p.cluster_ip.is_ipv4());
    for (tool, family) in [("iptables-restore", v4), ("ip6tables-restore", v6)] {
        if !family.is_empty() {
            feed(ns, &[tool, "--noflush"], &iptables_restore_input(&family))?;
        }
    }
    Ok(())
}

/// The `iptables-restore` input for one family's Service ports.
fn iptables_restore_input(ports: &[&ServicePort]) -> String {
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
        for (j, ep) in sp.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i}-{j}");
            chains += &format!(":{sep} - [0:0]\n");
            // kube-proxy's arithmetic: endpoint j of n is taken with 1/(n-j), the last always.
            let left = sp.endpoints.len() - j;
            if left > 1 {
                rules += &format!(
                    "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}\n",
                    1.0 / left as f64
                );
            } else {
                rules += &format!("-A {svc} -j {sep}\n");
            }
            // SocketAddr prints IPv6 as `[addr]:port`, which is what DNAT takes.
            rules += &format!("-A {sep} -p {proto} -m {proto} -j DNAT --to-destination {ep}\n");
        }
    }
    format!("*nat\n{chains}{rules}COMMIT\n")
}

/// Installs the nftables-mode rules of `ports` in `ns`: an `ip kube-proxy` and/or an
/// `ip6 kube-proxy` table.
pub fn install_nftables(ns: &NetNs, ports: &[ServicePort]) -> Result<()> {
    check_families(ports)?;
    let (v4, v6): (Vec<&ServicePort>, Vec<&ServicePort>) =
        ports.iter().partition(|p| p.cluster_ip.is_ipv4());
    let mut script = String::new();
    for (family, ports) in [("ip", v4), ("ip6", v6)] {
        if !ports.is_empty() {
            script += &nft_table(family, &ports);
        }
    }
    feed(ns, &["nft", "-f", "-"], &script)
}

fn nft_table(family: &str, ports: &[&ServicePort]) -> String {
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
    s += &format!(
        "  map service-ips {{ type {addr_type} . inet_proto . inet_service : verdict; elements = {{ {} }} }}\n",
        elements.join(", ")
    );
    s += "  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }\n";
    s += &format!(
        "  chain services {{ {family} daddr . meta l4proto . th dport vmap @service-ips; }}\n"
    );
    for (i, sp) in ports.iter().enumerate() {
        let arms: Vec<String> = (0..sp.endpoints.len())
            .map(|j| format!("{j} : goto endpoint-{i}-{j}"))
            .collect();
        s += &format!(
            "  chain service-{i} {{ numgen random mod {} vmap {{ {} }}; }}\n",
            sp.endpoints.len(),
            arms.join(", ")
        );
        for (j, ep) in sp.endpoints.iter().enumerate() {
            s += &format!(
                "  chain endpoint-{i}-{j} {{ meta l4proto {} dnat to {ep}; }}\n",
                proto_name(sp.proto)
            );
        }
    }
    s + "}\n"
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

/// Runs `argv` in `ns` with `input` on its stdin.
fn feed(ns: &NetNs, argv: &[&str], input: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", argv.join(" ")))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
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
