//! Finding a local pod's host-side interface, the way the node's CNI wired it:
//! routed CNIs (ptp, Calico, Cilium, kindnet) have a route to the pod IP through the pod's
//! veth; bridge CNIs (bridge, flannel) put every pod behind one bridge, so the pod's veth is
//! the bridge port whose peer holds the pod IP (found by looking into the pod namespaces).
//! Uses iproute2's JSON output; every candidate is cross-checked (veth, peer ifindex) so a
//! wrong interface is never enforced as a pod's.

use std::{collections::BTreeMap, net::IpAddr, process::Command};

use serde_json::Value;

fn ip_json(args: &[&str]) -> Option<Value> {
    let out = Command::new("ip").arg("-j").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

#[derive(Debug, Clone)]
struct Link {
    ifindex: u32,
    kind: Option<String>,
    master: Option<String>,
    /// For a veth: the peer's ifindex (in the peer's namespace).
    peer_ifindex: Option<u32>,
}

fn link(dev: &str) -> Option<Link> {
    let v = ip_json(&["-d", "link", "show", "dev", dev])?;
    let l = v.get(0)?;
    Some(Link {
        ifindex: l.get("ifindex")?.as_u64()? as u32,
        kind: l
            .pointer("/linkinfo/info_kind")
            .and_then(Value::as_str)
            .map(str::to_string),
        master: l.get("master").and_then(Value::as_str).map(str::to_string),
        peer_ifindex: l
            .get("link_index")
            .and_then(Value::as_u64)
            .map(|i| i as u32),
    })
}

/// Resolves the host-side interfaces of the given pod IPs. Returns ip -> ifindex for those
/// found; the others are not wired yet.
pub fn resolve(ips: &[IpAddr]) -> BTreeMap<IpAddr, u32> {
    let mut found = BTreeMap::new();
    let mut behind_bridge: BTreeMap<IpAddr, String> = BTreeMap::new();
    for ip in ips {
        let Some(route) = ip_json(&["route", "get", &ip.to_string()]) else {
            continue;
        };
        let Some(dev) = route.pointer("/0/dev").and_then(Value::as_str) else {
            continue;
        };
        let Some(l) = link(dev) else { continue };
        match l.kind.as_deref() {
            Some("veth") => {
                found.insert(*ip, l.ifindex);
            }
            Some("bridge") => {
                behind_bridge.insert(*ip, dev.to_string());
            }
            _ => {}
        }
    }
    if !behind_bridge.is_empty() {
        for (ip, (ifindex, _)) in scan_bridge_ports(&behind_bridge) {
            found.insert(ip, ifindex);
        }
    }
    found
}

/// For pods behind a bridge: look into every named network namespace for the interface
/// that holds the IP; its veth peer on this node is the pod's host interface.
fn scan_bridge_ports(wanted: &BTreeMap<IpAddr, String>) -> BTreeMap<IpAddr, (u32, String)> {
    let mut out = BTreeMap::new();
    let Some(list) = ip_json(&["netns", "list"]) else {
        return out;
    };
    for ns in list.as_array().into_iter().flatten() {
        let Some(name) = ns.get("name").and_then(Value::as_str) else {
            continue;
        };
        let Some(addrs) = ip_json(&["-n", name, "addr", "show"]) else {
            continue;
        };
        for iface in addrs.as_array().into_iter().flatten() {
            let pod_ifindex = iface.get("ifindex").and_then(Value::as_u64);
            let host_ifindex = iface.get("link_index").and_then(Value::as_u64);
            let (Some(pod_ifindex), Some(host_ifindex)) = (pod_ifindex, host_ifindex) else {
                continue;
            };
            for a in iface
                .get("addr_info")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(ip) = a
                    .get("local")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<IpAddr>().ok())
                else {
                    continue;
                };
                let Some(bridge) = wanted.get(&ip) else {
                    continue;
                };
                if let Some(host) = host_link(host_ifindex as u32) {
                    // Both ends must point at each other and hang off the pod's bridge.
                    if host.kind.as_deref() == Some("veth")
                        && host.master.as_deref() == Some(bridge.as_str())
                        && host.peer_ifindex == Some(pod_ifindex as u32)
                    {
                        out.insert(ip, (host.ifindex, name.to_string()));
                    }
                }
            }
        }
    }
    out
}

fn host_link(ifindex: u32) -> Option<Link> {
    let links = ip_json(&["-d", "link", "show"])?;
    let name = links
        .as_array()?
        .iter()
        .find(|l| l.get("ifindex").and_then(Value::as_u64) == Some(ifindex as u64))?
        .get("ifname")?
        .as_str()?
        .to_string();
    link(&name)
}

/// Every address of this network namespace: the node's own IPs.
pub fn node_ips() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let Some(addrs) = ip_json(&["addr", "show"]) else {
        return out;
    };
    for iface in addrs.as_array().into_iter().flatten() {
        for a in iface
            .get("addr_info")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(ip) = a
                .get("local")
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<IpAddr>().ok())
            {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    out
}
