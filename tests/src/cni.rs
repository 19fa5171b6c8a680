//! Simulated Kubernetes nodes whose pod networking is made by the real CNI
//! plugins (containernetworking-plugins), invoked exactly like a runtime.
//!
//! Address plan (all inside 198.18.0.0/15 and fd00:198:18::/48):
//! - node pods: 198.18.X.0/24 and fd00:198:18:X::/64, X (1..=250) leased per
//!   node machine-wide (see [`SubnetLease`]), gateway .1 / ::1, pods from .2 / ::2;
//! - underlay links between nodes: 198.19.255.0/24 in /30s and
//!   fd00:198:18:f0NN::/64;
//! - 198.19.0.0/16 below that is left free for test service VIPs.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::netns::{output_with_input, NetNs};
use crate::probe::Family;
use crate::util::wait_until;

pub const CNI_PATH: &str = "/usr/lib/cni";
/// Name of the Linux bridge the bridge plugin creates in a bridged node.
pub const BRIDGE: &str = "cnbr0";

static SUBNET: AtomicU32 = AtomicU32::new(0);
/// Where subnet leases live: one file per leased X, holding the owner's pid.
pub const LEASE_DIR: &str = "/run/palisade-tests/subnets";
static UNDERLAY: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// bridge plugin: all pods on one L2 bridge (flannel, docker style).
    Bridged,
    /// ptp plugin: a routed veth per pod (Calico, Cilium, kindnet style).
    Routed,
}

/// A simulated node: its own netns plays the host side of pod networking.
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    ns: NetNs,
    flavour: Flavour,
    subnet: u8,
    next_host: Mutex<u8>,
    tag: String,
    _lease: SubnetLease,
}

/// A pod subnet X no other live process on the machine uses. Pod IPs must be unique
/// machine-wide, not only per process: an agent behind a bridge finds a pod's veth by
/// looking into every named namespace for the pod IP, and would otherwise find another
/// test process's pod. The lease is a file created with O_EXCL; a file whose pid is gone
/// (a SIGKILLed run) is taken over. Dropping the lease removes the file.
struct SubnetLease {
    subnet: u8,
    path: std::path::PathBuf,
}

impl SubnetLease {
    fn take() -> Result<SubnetLease> {
        std::fs::create_dir_all(LEASE_DIR).with_context(|| format!("mkdir {LEASE_DIR}"))?;
        let me = std::process::id();
        // Start where this process left off, so one process cycles through subnets, from a
        // per-process offset, so processes rarely contend for the same file.
        let start = SUBNET.fetch_add(1, Ordering::Relaxed) + me % 250;
        for i in 0..250u32 {
            let subnet = 1 + ((start + i) % 250) as u8;
            let path = std::path::Path::new(LEASE_DIR).join(subnet.to_string());
            for _ in 0..2 {
                match std::fs::File::options()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(mut f) => {
                        f.write_all(me.to_string().as_bytes())?;
                        return Ok(SubnetLease { subnet, path });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let owner = std::fs::read_to_string(&path).unwrap_or_default();
                        let alive = owner.trim().parse::<u32>().is_ok_and(|pid| {
                            std::path::Path::new(&format!("/proc/{pid}")).exists()
                        });
                        // An empty file is a lease being written right now: leave it.
                        if alive || owner.is_empty() {
                            break;
                        }
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(e) => return Err(e).with_context(|| format!("lease {}", path.display())),
                }
            }
        }
        bail!("all 250 pod subnets are leased (see {LEASE_DIR})")
    }
}

impl Drop for SubnetLease {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Node {
    pub fn bridged(tag: &str) -> Result<Node> {
        Node::new(tag, Flavour::Bridged)
    }

    pub fn routed(tag: &str) -> Result<Node> {
        Node::new(tag, Flavour::Routed)
    }

    pub fn new(tag: &str, flavour: Flavour) -> Result<Node> {
        let ns = NetNs::new(tag)?;
        // DAD would leave the gateway addresses tentative for ~2 s after the
        // first ADD; forwarding is on before any pod so underlay routing
        // works whichever order a test builds things in.
        for (k, v) in [
            ("net.ipv6.conf.default.accept_dad", "0"),
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
        ] {
            ns.sysctl(k, v)?;
        }
        let lease = SubnetLease::take()?;
        Ok(Node {
            inner: Arc::new(NodeInner {
                ns,
                flavour,
                subnet: lease.subnet,
                next_host: Mutex::new(2),
                tag: tag.to_string(),
                _lease: lease,
            }),
        })
    }

    /// The node ("host") namespace: where tc programs and the agent attach.
    pub fn ns(&self) -> &NetNs {
        &self.inner.ns
    }

    pub fn flavour(&self) -> Flavour {
        self.inner.flavour
    }

    /// Pod CIDR, e.g. `198.18.7.0/24`.
    pub fn pod_cidr_v4(&self) -> String {
        format!("198.18.{}.0/24", self.inner.subnet)
    }

    /// Pod CIDR, e.g. `fd00:198:18:7::/64`.
    pub fn pod_cidr_v6(&self) -> String {
        format!("fd00:198:18:{}::/64", self.inner.subnet)
    }

    /// The pods' gateway: on `cnbr0` (bridged) or on every host veth (routed).
    pub fn gateway(&self, family: Family) -> IpAddr {
        self.inner.addr(family, 1)
    }

    /// Creates a pod netns and runs loopback + bridge/ptp ADD for it.
    /// `name` may be `namespace/pod` (fills K8S_POD_NAMESPACE).
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        self.add_pod_with(name, |_| Ok(()))
    }

    /// [`Node::add_pod`], calling `before_add` with the pod's namespace once it exists
    /// and before CNI ADD runs (e.g. to start a sender that fires the moment the pod's
    /// networking works).
    pub fn add_pod_with(
        &self,
        name: &str,
        before_add: impl FnOnce(&NetNs) -> Result<()>,
    ) -> Result<Pod> {
        self.add_pod_at(name, None, before_add)
    }

    /// The addresses the next [`Node::add_pod`] will give.
    pub fn next_pod_ips(&self) -> (Ipv4Addr, Ipv6Addr) {
        let host = *self
            .inner
            .next_host
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.inner.pod_ips(host)
    }

    /// [`Node::add_pod_with`] with a chosen host number (`Some(n)`: the pod gets
    /// `198.18.X.n`, e.g. the address of a deleted pod, as an IPAM reusing it would).
    pub fn add_pod_at(
        &self,
        name: &str,
        host: Option<u8>,
        before_add: impl FnOnce(&NetNs) -> Result<()>,
    ) -> Result<Pod> {
        let host = if let Some(h) = host {
            ensure!((2..255).contains(&h), "host number {h} out of 2..255");
            h
        } else {
            let mut next = self
                .inner
                .next_host
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            ensure!(
                *next < 255,
                "node {} is out of pod addresses",
                self.inner.ns.name()
            );
            let h = *next;
            *next += 1;
            h
        };
        let ns = NetNs::new(&self.inner.tag)?;
        // ptp ADD would otherwise block ~2 s on the pod's own DAD.
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        // Per-peer ICMP rate limits would turn "port unreachable" (refused)
        // into silence when a matrix probes the same pod many times.
        ns.sysctl("net.ipv4.icmp_ratelimit", "0")?;
        ns.sysctl("net.ipv6.icmp.ratelimit", "0")?;

        let (ipv4, ipv6) = self.inner.pod_ips(host);
        let mut pod = Pod {
            name: name.to_string(),
            ipv4,
            ipv6,
            host_ifname: String::new(),
            host_ifindex: 0,
            conf: self.inner.conf(host),
            ns: Some(ns),
            node: self.inner.clone(),
        };
        // From here on Pod's Drop runs DEL, which also cleans a half-done ADD.
        let pod_ns = pod.ns();
        before_add(pod_ns)?;
        self.inner
            .cni("loopback", "ADD", pod_ns, "lo", &loopback_conf(), name)?;
        let result = self
            .inner
            .cni(self.inner.plugin(), "ADD", pod_ns, "eth0", &pod.conf, name)?;
        let result: Value =
            serde_json::from_str(&result).with_context(|| format!("CNI result: {result}"))?;
        pod.check_ips(&result)?;
        let (ifname, ifindex) = pod.host_side(&result)?;
        pod.host_ifname = ifname;
        pod.host_ifindex = ifindex;
        Ok(pod)
    }

    /// Joins this node and `other` with an underlay veth and routes each
    /// node's pod CIDRs via the other, so their pods reach each other
    /// (un-NATed, like a flat cluster network).
    pub fn join(&self, other: &Node) -> Result<Underlay> {
        let k = UNDERLAY.fetch_add(1, Ordering::Relaxed) % 63;
        // Unique per process so one node can have several links; the names
        // live in node namespaces, so no cross-test collisions.
        let ifname = format!("ul{k}");
        let (a, b) = (&self.inner, &other.inner);
        a.ns.ip(&[
            "link",
            "add",
            &ifname,
            "type",
            "veth",
            "peer",
            "name",
            &ifname,
            "netns",
            b.ns.name(),
        ])?;
        let link = Underlay {
            a: a.clone(),
            _b: b.clone(),
            ifname: ifname.clone(),
            v4: [
                Ipv4Addr::new(198, 19, 255, (4 * k + 1) as u8),
                Ipv4Addr::new(198, 19, 255, (4 * k + 2) as u8),
            ],
            v6: [
                format!("fd00:198:18:{:x}::1", 0xf000 + k).parse()?,
                format!("fd00:198:18:{:x}::2", 0xf000 + k).parse()?,
            ],
        };
        for (i, (me, peer)) in [(a, b), (b, a)].into_iter().enumerate() {
            let j = 1 - i;
            me.ns
                .ip(&["addr", "add", &format!("{}/30", link.v4[i]), "dev", &ifname])?;
            me.ns.ip(&[
                "addr",
                "add",
                &format!("{}/64", link.v6[i]),
                "dev",
                &ifname,
                "nodad",
            ])?;
            me.ns.ip(&["link", "set", &ifname, "up"])?;
            let (p4, p6) = (peer.cidr(Family::V4), peer.cidr(Family::V6));
            me.ns
                .ip(&["route", "add", &p4, "via", &link.v4[j].to_string()])?;
            me.ns
                .ip(&["-6", "route", "add", &p6, "via", &link.v6[j].to_string()])?;
        }
        Ok(link)
    }
}

impl NodeInner {
    fn plugin(&self) -> &'static str {
        match self.flavour {
            Flavour::Bridged => "bridge",
            Flavour::Routed => "ptp",
        }
    }

    fn addr(&self, family: Family, host: u8) -> IpAddr {
        match family {
            Family::V4 => Ipv4Addr::new(198, 18, self.subnet, host).into(),
            // Decimal digits reused as hex groups, like 198.18.1.2 ~
            // fd00:198:18:1::2: unique and readable in `ip` output.
            Family::V6 => format!("fd00:198:18:{}::{}", self.subnet, host)
                .parse::<Ipv6Addr>()
                .expect("valid v6")
                .into(),
        }
    }

    fn pod_ips(&self, host: u8) -> (Ipv4Addr, Ipv6Addr) {
        let v4 = match self.addr(Family::V4, host) {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => unreachable!(),
        };
        let v6 = match self.addr(Family::V6, host) {
            IpAddr::V6(a) => a,
            IpAddr::V4(_) => unreachable!(),
        };
        (v4, v6)
    }

    fn cidr(&self, family: Family) -> String {
        match family {
            Family::V4 => format!("198.18.{}.0/24", self.subnet),
            Family::V6 => format!("fd00:198:18:{}::/64", self.subnet),
        }
    }

    fn conf(&self, host: u8) -> String {
        let ipam = json!({
            "type": "static",
            "addresses": [
                {"address": format!("{}/24", self.addr(Family::V4, host)),
                 "gateway": self.addr(Family::V4, 1).to_string()},
                {"address": format!("{}/64", self.addr(Family::V6, host)),
                 "gateway": self.addr(Family::V6, 1).to_string()},
            ],
        });
        let conf = match self.flavour {
            Flavour::Bridged => json!({
                "cniVersion": "1.0.0", "name": "palisade-br", "type": "bridge",
                "bridge": BRIDGE, "isGateway": true, "isDefaultGateway": true,
                "ipam": ipam,
            }),
            Flavour::Routed => {
                let mut ipam = ipam;
                ipam["routes"] = json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]);
                json!({"cniVersion": "1.0.0", "name": "palisade-ptp", "type": "ptp", "ipam": ipam})
            }
        };
        conf.to_string()
    }

    /// One plugin invocation as a runtime does it: in the node netns, config
    /// on stdin, CNI_* env; `IgnoreUnknown=1` because the K8S_* args are not
    /// known to these plugins.
    fn cni(
        &self,
        plugin: &str,
        command: &str,
        pod_ns: &NetNs,
        ifname: &str,
        conf: &str,
        pod_name: &str,
    ) -> Result<String> {
        let (k8s_ns, k8s_pod) = pod_name.split_once('/').unwrap_or(("default", pod_name));
        let id = pod_ns.name();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={k8s_ns};K8S_POD_NAME={k8s_pod};\
             K8S_POD_INFRA_CONTAINER_ID={id}"
        );
        let out = output_with_input(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    self.ns.name(),
                    &format!("{CNI_PATH}/{plugin}"),
                ])
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", id)
                .env("CNI_NETNS", pod_ns.path())
                .env("CNI_IFNAME", ifname)
                .env("CNI_PATH", CNI_PATH)
                .env("CNI_ARGS", args),
            conf,
        )
        .with_context(|| format!("CNI plugin {plugin}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "CNI {plugin} {command} for {id} failed ({}): {} {}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }
}

fn loopback_conf() -> String {
    json!({"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}).to_string()
}

/// A pod: its own netns wired to the node by the CNI plugin. Drop runs CNI
/// DEL (plugin, then loopback) and deletes the netns.
pub struct Pod {
    name: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    host_ifname: String,
    host_ifindex: u32,
    conf: String,
    ns: Option<NetNs>,
    node: Arc<NodeInner>,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ns(&self) -> &NetNs {
        self.ns.as_ref().expect("pod netns lives until drop")
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.ipv4.into(),
            Family::V6 => self.ipv6.into(),
        }
    }

    pub fn addr(&self, family: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(family), port)
    }

    /// Host-side veth in the node netns (where tc ingress = from the pod).
    pub fn host_ifname(&self) -> &str {
        &self.host_ifname
    }

    pub fn host_ifindex(&self) -> u32 {
        self.host_ifindex
    }

    fn check_ips(&self, result: &Value) -> Result<()> {
        let got: Vec<&str> = result["ips"]
            .as_array()
            .ok_or_else(|| anyhow!("CNI result without ips: {result}"))?
            .iter()
            .filter_map(|ip| ip["address"].as_str())
            .collect();
        for want in [format!("{}/24", self.ipv4), format!("{}/64", self.ipv6)] {
            ensure!(
                got.contains(&want.as_str()),
                "CNI result lacks {want}: {result}"
            );
        }
        Ok(())
    }

    /// The result's interface without `sandbox` (minus the bridge itself),
    /// cross-checked against the pod eth0's peer ifindex so we never attach
    /// to the wrong veth.
    fn host_side(&self, result: &Value) -> Result<(String, u32)> {
        let hosts: Vec<&str> = result["interfaces"]
            .as_array()
            .ok_or_else(|| anyhow!("CNI result without interfaces: {result}"))?
            .iter()
            .filter(|i| i.get("sandbox").is_none())
            .filter_map(|i| i["name"].as_str())
            .filter(|n| *n != BRIDGE)
            .collect();
        let [ifname] = hosts[..] else {
            bail!("expected one host veth in CNI result, got {hosts:?}: {result}");
        };
        let ifindex = ifindex_in(&self.node.ns, ifname)
            .with_context(|| format!("host veth {ifname} not in node netns"))?;
        let eth0 = self.ns().ip_json(&["link", "show", "dev", "eth0"])?;
        let peer = eth0[0]["link_index"].as_u64();
        ensure!(
            peer == Some(ifindex as u64),
            "pod eth0 peer ifindex {peer:?} != host veth {ifname} ifindex {ifindex}"
        );
        Ok((ifname.to_string(), ifindex))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let Some(ns) = self.ns.take() else { return };
        let node = &self.node;
        let plugin = node.plugin();
        if let Err(e) = node.cni(plugin, "DEL", &ns, "eth0", &self.conf, &self.name) {
            eprintln!("palisade-tests: {e:#}");
        }
        if let Err(e) = node.cni("loopback", "DEL", &ns, "lo", &loopback_conf(), &self.name) {
            eprintln!("palisade-tests: {e:#}");
        }
        drop(ns);
        // The veth pair dies with the netns a little after `ip netns del`
        // returns if DEL failed; make "pod dropped" mean "veth gone".
        if !self.host_ifname.is_empty()
            && !wait_until(Duration::from_secs(3), || {
                ifindex_in(&node.ns, &self.host_ifname).is_none()
            })
        {
            eprintln!(
                "palisade-tests: host veth {} of pod {} still present",
                self.host_ifname, self.name
            );
        }
    }
}

/// A veth between two nodes' namespaces plus the pod-CIDR routes over it.
/// Drop removes the link (and with it the routes).
pub struct Underlay {
    a: Arc<NodeInner>,
    // Only held so the peer node outlives the link and its routes.
    _b: Arc<NodeInner>,
    ifname: String,
    v4: [Ipv4Addr; 2],
    v6: [Ipv6Addr; 2],
}

impl Underlay {
    /// Interface name, the same in both node namespaces.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Underlay addresses of (first node, second node).
    pub fn addrs(&self, family: Family) -> (IpAddr, IpAddr) {
        match family {
            Family::V4 => (self.v4[0].into(), self.v4[1].into()),
            Family::V6 => (self.v6[0].into(), self.v6[1].into()),
        }
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        // Deleting one end removes both; the link may already be gone with a node.
        if ifindex_in(&self.a.ns, &self.ifname).is_some() {
            if let Err(e) = self.a.ns.ip(&["link", "del", &self.ifname]) {
                eprintln!("palisade-tests: {e:#}");
            }
        }
    }
}

/// ifindex of `ifname` inside `ns`, in-process (no fork).
pub fn ifindex_in(ns: &NetNs, ifname: &str) -> Option<u32> {
    let c = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: valid NUL-terminated string; if_nametoindex only reads it.
    let idx = ns.run(|| unsafe { libc::if_nametoindex(c.as_ptr()) });
    (idx != 0).then_some(idx)
}
