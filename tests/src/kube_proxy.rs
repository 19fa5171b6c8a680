//! kube-proxy's iptables-mode NAT rules, written into a node namespace the way kube-proxy
//! writes them (as `iptables-save` shows them, minus comments and masquerade marks):
//! `PREROUTING → KUBE-SERVICES → KUBE-SVC-*` matching ClusterIP and port, then
//! `-m statistic --mode random` over `KUBE-SEP-*` chains that DNAT to one endpoint each.
//! Every endpoint has its own port, as a named targetPort resolves per backend.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};

use crate::netns::NetNs;

/// One TCP Service: its ClusterIP and port, and its endpoints (backend IP and port).
pub struct Service {
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<SocketAddrV4>,
}

fn iptables(ns: &NetNs, args: &[&str]) -> Result<()> {
    let mut argv = vec!["iptables", "-t", "nat"];
    argv.extend_from_slice(args);
    ns.exec(&argv).map(drop).with_context(|| argv.join(" "))
}

/// Installs the rules of `services` in `ns`'s nat table. Chains are named by index, so
/// call it once per namespace. They go away with the namespace.
pub fn install_iptables(ns: &NetNs, services: &[Service]) -> Result<()> {
    iptables(ns, &["-N", "KUBE-SERVICES"])?;
    iptables(ns, &["-A", "PREROUTING", "-j", "KUBE-SERVICES"])?;
    for (i, svc) in services.iter().enumerate() {
        let chain = format!("KUBE-SVC-{i}");
        iptables(ns, &["-N", &chain])?;
        let (dst, port) = (format!("{}/32", svc.cluster_ip), svc.port.to_string());
        iptables(
            ns,
            &[
                "-A",
                "KUBE-SERVICES",
                "-d",
                &dst,
                "-p",
                "tcp",
                "-m",
                "tcp",
                "--dport",
                &port,
                "-j",
                &chain,
            ],
        )?;
        for (j, ep) in svc.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i}-{j}");
            iptables(ns, &["-N", &sep])?;
            let to = ep.to_string();
            iptables(
                ns,
                &[
                    "-A",
                    &sep,
                    "-p",
                    "tcp",
                    "-m",
                    "tcp",
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &to,
                ],
            )?;
            // kube-proxy's arithmetic: endpoint j of n is taken with 1/(n-j), the last always.
            let left = svc.endpoints.len() - j;
            if left > 1 {
                let prob = format!("{:.11}", 1.0 / left as f64);
                iptables(
                    ns,
                    &[
                        "-A",
                        &chain,
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &prob,
                        "-j",
                        &sep,
                    ],
                )?;
            } else {
                iptables(ns, &["-A", &chain, "-j", &sep])?;
            }
        }
    }
    Ok(())
}
