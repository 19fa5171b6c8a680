//! Why a connection is allowed or dropped: the reference evaluator's reasoning, written down.
//!
//! [`explain`] walks exactly the path of [`Cluster::allowed`] — the source's egress check,
//! then the destination's ingress check — and records at each step what decided it: which
//! end is not enforced and why, which policies isolate it (rejected ones with their errors),
//! and for every rule of those policies whether its peers and its ports match, naming the
//! peer (podSelector / namespaceSelector / ipBlock) and the port entry (named ports with the
//! number they resolve to). The matching itself is the reference evaluator's own
//! (`peer_matches`, `port_matches`, `coverage`), so the reasons cannot drift from the
//! verdict; a property test checks the verdict against [`Cluster::allowed`] and the
//! compiled plans.
//!
//! Input is a [`Cluster`] (namespaces, pods, policies, node addresses), so the offline CLI
//! (a manifest directory) and a live agent (its watched objects, its node name and
//! addresses) can both explain.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use palisade_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};
use serde::{Serialize, Serializer};

use crate::error::Rejection;
use crate::model::PodRef;
use crate::policy;
use crate::reference::{self, coverage, Cluster, Dir};

/// One end of a connection as a user names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Pod(PodRef),
    Ip(IpAddr),
}

impl FromStr for Subject {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Subject::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Subject::Pod(PodRef::new(ns, name)))
            }
            _ => Err(format!(
                "{s:?} is neither namespace/pod nor an IP address (e.g. x/a, 198.18.0.5, fd00::5)"
            )),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Pod(p) => write!(f, "{p}"),
            Subject::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The transport protocols a connection can be explained for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// ICMP or ICMPv6 (by address family). No port; only rules without `ports` allow it.
    Icmp,
}

impl Protocol {
    /// The IP protocol number on an address family.
    pub fn number(self, ipv4: bool) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
            Protocol::Sctp => PROTO_SCTP,
            Protocol::Icmp if ipv4 => PROTO_ICMP,
            Protocol::Icmp => PROTO_ICMPV6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Icmp => "ICMP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

fn proto_name(n: u8) -> &'static str {
    match n {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        PROTO_SCTP => "SCTP",
        PROTO_ICMP | PROTO_ICMPV6 => "ICMP",
        _ => "?",
    }
}

/// What is sent: `PORT[/PROTO]` (TCP by default) or `icmp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Traffic {
    pub protocol: Protocol,
    /// 0 for ICMP.
    pub port: u16,
}

impl fmt::Display for Traffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            Protocol::Icmp => f.write_str("ICMP"),
            p => write!(f, "{}/{p}", self.port),
        }
    }
}

impl FromStr for Traffic {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage =
            "expected PORT[/PROTO] with PROTO one of TCP, UDP, SCTP (e.g. 80, 53/UDP), or icmp";
        if s.eq_ignore_ascii_case("icmp") {
            return Ok(Traffic {
                protocol: Protocol::Icmp,
                port: 0,
            });
        }
        let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
        let protocol = match proto.to_ascii_uppercase().as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            "ICMP" => return Err(format!("{s:?}: ICMP has no port, write just icmp")),
            _ => return Err(format!("{s:?}: unknown protocol {proto:?}; {usage}")),
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{s:?}: port must be a number in 1..=65535; {usage}"))?;
        Ok(Traffic { protocol, port })
    }
}

/// Why [`explain`] could not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("unknown pod \"{pod}\"; {}", known_pods(pod, .known))]
    UnknownPod {
        pod: PodRef,
        /// Every pod there is, `namespace/name`, sorted.
        known: Vec<String>,
    },
    #[error(
        "{} and {} have no address family in common: name addresses of one family",
        labelled(.src, .src_ips),
        labelled(.dst, .dst_ips)
    )]
    NoCommonFamily {
        src: String,
        src_ips: Vec<IpAddr>,
        dst: String,
        dst_ips: Vec<IpAddr>,
    },
}

/// The pods of the same namespace if there are any, else all; at most 30.
fn known_pods(pod: &PodRef, known: &[String]) -> String {
    const MAX: usize = 30;
    let prefix = format!("{}/", pod.namespace);
    let same: Vec<&String> = known.iter().filter(|k| k.starts_with(&prefix)).collect();
    let (what, shown): (String, Vec<&String>) = if same.is_empty() {
        ("the pods are".into(), known.iter().collect())
    } else {
        (format!("the pods of namespace {} are", pod.namespace), same)
    };
    if shown.is_empty() {
        return "there are no pods at all: check the manifests".to_string();
    }
    let mut s = format!(
        "{what}: {}",
        shown
            .iter()
            .take(MAX)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if shown.len() > MAX {
        s += &format!(" and {} more", shown.len() - MAX);
    }
    s
}

/// `x/a (198.18.0.1, fd00::1)`, or just the address when that is what was named.
fn labelled(subject: &str, ips: &[IpAddr]) -> String {
    if ips.len() == 1 && ips[0].to_string() == subject {
        return subject.to_string();
    }
    let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
    format!("{subject} ({})", ips.join(", "))
}

/// The pair of addresses a connection between two ends with these addresses uses: IPv4
/// when both have one, else IPv6; `None` when they share no family (or one has none).
pub fn pick_addresses(src: &[IpAddr], dst: &[IpAddr]) -> Option<(IpAddr, IpAddr)> {
    [true, false].into_iter().find_map(|v4| {
        let s = src.iter().find(|ip| ip.is_ipv4() == v4)?;
        let d = dst.iter().find(|ip| ip.is_ipv4() == v4)?;
        Some((*s, *d))
    })
}

/// Every policy the compiler rejects, with its problems (they isolate and allow nothing).
pub fn rejections<'a>(policies: impl IntoIterator<Item = &'a NetworkPolicy>) -> Vec<Rejection> {
    policies
        .into_iter()
        .flat_map(|np| policy::compile(np).rejections)
        .collect()
}

/// One end of the explained connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Side {
    /// As given: `namespace/name` or an address.
    pub subject: String,
    /// The address the connection uses; `None` when the pod has none yet.
    pub ip: Option<IpAddr>,
    /// The pod that address stands for in policies (a live pod with its own network).
    pub pod: Option<String>,
}

/// A policy that isolates a pod in the explained direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Isolation {
    /// `namespace/name`.
    pub policy: String,
    /// Non-empty when the compiler rejects it: then it isolates and allows nothing.
    pub rejected: Vec<Rejection>,
}

/// Whether a rule's peers (or ports) match, and which entry and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Match {
    pub matched: bool,
    /// Index into `from`/`to` (or `ports`) of the entry that matches; `None` when the rule
    /// has no such list (it matches everything) or nothing matches.
    pub index: Option<usize>,
    /// The matching entry and why, or each entry and why it does not match.
    pub why: String,
}

/// One rule of an isolating policy, evaluated against the connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleEval {
    /// `namespace/name`.
    pub policy: String,
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// Index into `spec.ingress` / `spec.egress`.
    pub rule: usize,
    pub peer: Match,
    pub port: Match,
    /// Peer and port both match: this rule allows the connection.
    pub allows: bool,
}

/// Why nobody checks one end in one direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum Unenforced {
    /// The address is no pod's (and no node's we know of).
    NotAPod { ip: IpAddr },
    /// The address of a node (from its host-network pods or given).
    NodeAddress { ip: IpAddr, node: String },
    /// A host-network pod: no interface of its own, its address is its node's.
    HostNetwork { pod: String },
    /// Succeeded or Failed: neither enforced nor a pod peer; its address is a plain address.
    Terminated { pod: String, phase: String },
    /// No `spec.nodeName` yet: no node enforces it.
    NotScheduled { pod: String },
    /// Only one node's view was asked for, and the pod runs elsewhere.
    OtherNode { pod: String, node: String },
}

impl fmt::Display for Unenforced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unenforced::NotAPod { ip } => write!(f, "{ip} is not a pod's address"),
            Unenforced::NodeAddress { ip, node } => {
                write!(f, "{ip} is an address of node {node}, not a pod")
            }
            Unenforced::HostNetwork { pod } => write!(
                f,
                "{pod} uses the host network: it is not enforced and its address is its node's"
            ),
            Unenforced::Terminated { pod, phase } => write!(
                f,
                "{pod} has terminated ({phase}): it is not enforced and not a pod peer"
            ),
            Unenforced::NotScheduled { pod } => {
                write!(f, "{pod} has no node (spec.nodeName): nothing enforces it")
            }
            Unenforced::OtherNode { pod, node } => write!(
                f,
                "{pod} runs on node {node}, which enforces it (this view is one node's)"
            ),
        }
    }
}

/// The outcome of one end's check (the source's egress or the destination's ingress).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Check {
    /// No check happens for this end.
    NotEnforced {
        #[serde(flatten)]
        why: Unenforced,
    },
    /// The pod is enforced, but no policy isolates it in this direction.
    NotIsolated { pod: String },
    /// Ingress from the destination's own node: always let in (kubelet probes).
    FromNode { pod: String, node: String },
    /// Isolated; at least one rule allows it.
    Allowed {
        pod: String,
        isolated_by: Vec<Isolation>,
        rules: Vec<RuleEval>,
    },
    /// Isolated and no rule allows it.
    Denied {
        pod: String,
        isolated_by: Vec<Isolation>,
        rules: Vec<RuleEval>,
    },
    /// Not judged: one end has no address, so no packet can be sent. Lists the policies
    /// that isolate the pod in this direction.
    Unknown {
        pod: Option<String>,
        reason: String,
        isolated_by: Vec<Isolation>,
    },
}

impl Check {
    /// The check lets the connection through.
    pub fn passes(&self) -> bool {
        !matches!(self, Check::Denied { .. } | Check::Unknown { .. })
    }
}

/// The verdict on one connection and the reasoning behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub src: Side,
    pub dst: Side,
    pub protocol: Protocol,
    /// 0 for ICMP.
    pub port: u16,
    /// The node whose view this is (`None`: every node enforces its own pods).
    pub node: Option<String>,
    /// `None` when one end has no address: there is nothing to judge.
    pub allowed: Option<bool>,
    /// The source's egress check.
    pub egress: Check,
    /// The destination's ingress check.
    pub ingress: Check,
}

fn pod_name(p: &Pod) -> String {
    format!("{}/{}", reference::ns_of(p), reference::name_of(p))
}

fn node_of(p: &Pod) -> Option<&str> {
    p.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// Explains a new connection from `src` to `dst`. `node`: judge as the agent of that node
/// does (only its pods are enforced); `None`: the whole cluster (each pod by its node), the
/// verdict of [`Cluster::allowed`].
pub fn explain(
    cluster: &Cluster,
    node: Option<&str>,
    src: &Subject,
    dst: &Subject,
    traffic: Traffic,
) -> Result<Explanation, ExplainError> {
    let (src_pod, src_ips) = resolve(cluster, src)?;
    let (dst_pod, dst_ips) = resolve(cluster, dst)?;
    let side = |s: &Subject, ip: Option<IpAddr>| Side {
        subject: s.to_string(),
        ip,
        pod: ip.and_then(|ip| cluster.pod_with_ip(ip)).map(pod_name),
    };
    let explanation = |src_ip, dst_ip, allowed, egress, ingress| Explanation {
        src: side(src, src_ip),
        dst: side(dst, dst_ip),
        protocol: traffic.protocol,
        port: traffic.port,
        node: node.map(str::to_string),
        allowed,
        egress,
        ingress,
    };
    if src_ips.is_empty() || dst_ips.is_empty() {
        // Nothing can be sent; say which policies will isolate the ends once it can.
        let first = |ips: &[IpAddr]| ips.iter().find(|ip| ip.is_ipv4()).or(ips.first()).copied();
        let missing = if src_ips.is_empty() { src } else { dst };
        let reason = format!("{missing} has no IP address yet: no packet can be sent");
        let unknown = |p: Option<&Pod>, dir| Check::Unknown {
            pod: p.map(pod_name),
            reason: reason.clone(),
            isolated_by: p.map(|p| isolations(cluster, p, dir)).unwrap_or_default(),
        };
        return Ok(explanation(
            first(&src_ips),
            first(&dst_ips),
            None,
            unknown(src_pod, Dir::Egress),
            unknown(dst_pod, Dir::Ingress),
        ));
    }
    let (src_ip, dst_ip) =
        pick_addresses(&src_ips, &dst_ips).ok_or_else(|| ExplainError::NoCommonFamily {
            src: src.to_string(),
            src_ips: src_ips.clone(),
            dst: dst.to_string(),
            dst_ips: dst_ips.clone(),
        })?;
    let proto = traffic.protocol.number(src_ip.is_ipv4());
    let port = traffic.port;

    // The path of Cluster::allowed, step by step.
    let enforced = |p: &Pod| match node {
        None => node_of(p).is_some(),
        Some(n) => node_of(p) == Some(n),
    };
    let src_peer = cluster.pod_with_ip(src_ip);
    let dst_peer = cluster.pod_with_ip(dst_ip);
    let egress = match src_peer.filter(|p| enforced(p)) {
        None => Check::NotEnforced {
            why: unenforced(cluster, src_ip, src_peer, src_pod),
        },
        Some(p) => check(cluster, p, Dir::Egress, dst_ip, dst_peer, proto, port),
    };
    let ingress = match dst_peer.filter(|p| enforced(p)) {
        None => Check::NotEnforced {
            why: unenforced(cluster, dst_ip, dst_peer, dst_pod),
        },
        Some(p) => {
            let own_node = node_of(p).filter(|n| {
                cluster
                    .nodes
                    .get(*n)
                    .is_some_and(|ips| ips.contains(&src_ip))
            });
            match own_node {
                Some(n) => Check::FromNode {
                    pod: pod_name(p),
                    node: n.to_string(),
                },
                None => check(cluster, p, Dir::Ingress, src_ip, Some(p), proto, port),
            }
        }
    };
    let allowed = Some(egress.passes() && ingress.passes());
    Ok(explanation(
        Some(src_ip),
        Some(dst_ip),
        allowed,
        egress,
        ingress,
    ))
}

/// The named pod and the addresses the connection may use.
fn resolve<'a>(
    cluster: &'a Cluster,
    s: &Subject,
) -> Result<(Option<&'a Pod>, Vec<IpAddr>), ExplainError> {
    match s {
        Subject::Ip(ip) => Ok((None, vec![*ip])),
        Subject::Pod(r) => {
            let pod = cluster
                .pods
                .iter()
                .find(|p| reference::ns_of(p) == r.namespace && reference::name_of(p) == r.name)
                .ok_or_else(|| {
                    let mut known: Vec<String> = cluster.pods.iter().map(pod_name).collect();
                    known.sort();
                    known.dedup();
                    ExplainError::UnknownPod {
                        pod: r.clone(),
                        known,
                    }
                })?;
            Ok((Some(pod), reference::pod_ips(pod)))
        }
    }
}

/// Why the end at `ip` is not checked. `peer` is the live pod owning `ip`, if any; `named`
/// the pod the user named, if any.
fn unenforced(
    cluster: &Cluster,
    ip: IpAddr,
    peer: Option<&Pod>,
    named: Option<&Pod>,
) -> Unenforced {
    if let Some(p) = peer {
        return match node_of(p) {
            None => Unenforced::NotScheduled { pod: pod_name(p) },
            Some(n) => Unenforced::OtherNode {
                pod: pod_name(p),
                node: n.to_string(),
            },
        };
    }
    // A pod that has the address but does not stand for it: the named one first.
    let holder = named.into_iter().chain(&cluster.pods).find(|p| {
        reference::pod_ips(p).contains(&ip)
            && (p.spec.as_ref().and_then(|s| s.host_network) == Some(true)
                || matches!(phase(p), Some("Succeeded" | "Failed")))
    });
    if let Some(p) = holder {
        if p.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return Unenforced::HostNetwork { pod: pod_name(p) };
        }
        return Unenforced::Terminated {
            pod: pod_name(p),
            phase: phase(p).unwrap_or_default().to_string(),
        };
    }
    match cluster.nodes.iter().find(|(_, ips)| ips.contains(&ip)) {
        Some((n, _)) => Unenforced::NodeAddress {
            ip,
            node: n.clone(),
        },
        None => Unenforced::NotAPod { ip },
    }
}

fn phase(p: &Pod) -> Option<&str> {
    p.status.as_ref().and_then(|s| s.phase.as_deref())
}

fn policy_name(np: &NetworkPolicy) -> String {
    format!(
        "{}/{}",
        np.metadata.namespace.as_deref().unwrap_or_default(),
        np.metadata.name.as_deref().unwrap_or_default()
    )
}

fn isolations(cluster: &Cluster, pod: &Pod, dir: Dir) -> Vec<Isolation> {
    cluster
        .policies
        .iter()
        .filter_map(|np| {
            coverage(np, pod, dir).map(|c| Isolation {
                policy: policy_name(np),
                rejected: c.rejections,
            })
        })
        .collect()
}

/// The check of `pod` in `dir` against `peer_ip`, rule by rule (reference `check`).
fn check(
    cluster: &Cluster,
    pod: &Pod,
    dir: Dir,
    peer_ip: IpAddr,
    dst_pod: Option<&Pod>,
    proto: u8,
    port: u16,
) -> Check {
    let peer_pod = cluster.pod_with_ip(peer_ip);
    let mut isolated_by = Vec::new();
    let mut rules = Vec::new();
    let (direction, peer_field) = match dir {
        Dir::Ingress => ("ingress", "from"),
        Dir::Egress => ("egress", "to"),
    };
    for np in &cluster.policies {
        let Some(cov) = coverage(np, pod, dir) else {
            continue;
        };
        isolated_by.push(Isolation {
            policy: policy_name(np),
            rejected: cov.rejections,
        });
        for (i, (peers, ports)) in cov.rules.iter().enumerate() {
            let peer = match_peers(cluster, np, peers.as_deref(), peer_field, peer_ip, peer_pod);
            let port = match_ports(ports.as_deref(), dst_pod, proto, port);
            rules.push(RuleEval {
                policy: policy_name(np),
                direction,
                rule: i,
                allows: peer.matched && port.matched,
                peer,
                port,
            });
        }
    }
    let pod = pod_name(pod);
    if isolated_by.is_empty() {
        Check::NotIsolated { pod }
    } else if rules.iter().any(|r| r.allows) {
        Check::Allowed {
            pod,
            isolated_by,
            rules,
        }
    } else {
        Check::Denied {
            pod,
            isolated_by,
            rules,
        }
    }
}

fn match_peers(
    cluster: &Cluster,
    np: &NetworkPolicy,
    peers: Option<&[NetworkPolicyPeer]>,
    field: &str,
    ip: IpAddr,
    pod: Option<&Pod>,
) -> Match {
    let Some(peers) = peers.filter(|v| !v.is_empty()) else {
        return Match {
            matched: true,
            index: None,
            why: format!("no `{field}`: every peer"),
        };
    };
    first_match(peers, |i, p| {
        let matched = cluster.peer_matches(np, p, ip, pod);
        let why = peer_why(cluster, np, p, ip, pod, matched);
        (matched, format!("{field}[{i}] {why}"))
    })
}

/// The first item that matches, with why; otherwise why none did (each item's reason).
fn first_match<T>(items: &[T], mut judge: impl FnMut(usize, &T) -> (bool, String)) -> Match {
    let mut misses = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let (matched, why) = judge(i, item);
        if matched {
            return Match {
                matched,
                index: Some(i),
                why,
            };
        }
        misses.push(why);
    }
    Match {
        matched: false,
        index: None,
        why: misses.join("; "),
    }
}

fn peer_why(
    cluster: &Cluster,
    np: &NetworkPolicy,
    p: &NetworkPolicyPeer,
    ip: IpAddr,
    pod: Option<&Pod>,
    matched: bool,
) -> String {
    if let Some(b) = &p.ip_block {
        let contains = |s: &String| {
            s.parse::<ipnetwork::IpNetwork>()
                .is_ok_and(|n| n.contains(ip))
        };
        let except = b.except.iter().flatten();
        return if matched {
            let holes: Vec<&str> = except.map(String::as_str).collect();
            if holes.is_empty() {
                format!("ipBlock {} contains {ip}", b.cidr)
            } else {
                format!(
                    "ipBlock {} contains {ip}, outside its except {}",
                    b.cidr,
                    holes.join(", ")
                )
            }
        } else if !contains(&b.cidr) {
            format!("ipBlock {} does not contain {ip}", b.cidr)
        } else {
            let hole = except.into_iter().find(|e| contains(e));
            format!(
                "ipBlock {}: {ip} is in its except {}",
                b.cidr,
                hole.map(String::as_str).unwrap_or("?")
            )
        };
    }
    let Some(pod) = pod else {
        let sel = |s: &Option<LabelSelector>| s.as_ref().map(selector).unwrap_or_default();
        let what = match (&p.namespace_selector, &p.pod_selector) {
            (Some(n), None) => format!("namespaceSelector {}", sel(&Some(n.clone()))),
            (None, s) => format!("podSelector {}", sel(s)),
            (Some(n), Some(s)) => format!(
                "namespaceSelector {} and podSelector {}",
                selector(n),
                selector(s)
            ),
        };
        return format!("{what} selects pods only, and {ip} is not a pod's address");
    };
    let name = pod_name(pod);
    let ns = reference::ns_of(pod);
    let policy_ns = np.metadata.namespace.as_deref().unwrap_or_default();
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let ns_sel = p.namespace_selector.as_ref();
    let pod_sel = p.pod_selector.as_ref();
    let ns_ok = ns_sel.map(|s| reference::labels_match(s, &cluster.namespace_labels(ns)));
    let pod_ok = pod_sel.map(|s| reference::labels_match(s, labels));
    let sel = |s: Option<&LabelSelector>| s.map(selector).unwrap_or_default();
    if matched {
        return match (ns_sel, pod_sel) {
            (None, _) => format!(
                "podSelector {} selects {name} in the policy's namespace",
                sel(pod_sel)
            ),
            (Some(n), None) => format!(
                "namespaceSelector {} selects namespace {ns}, which holds {name}",
                selector(n)
            ),
            (Some(n), Some(s)) => format!(
                "namespaceSelector {} selects namespace {ns} and podSelector {} selects {name}",
                selector(n),
                selector(s)
            ),
        };
    }
    // A miss names the parts that fail.
    let mut misses = Vec::new();
    match ns_ok {
        None if ns != policy_ns => {
            return format!(
                "podSelector {}: {name} is not in the policy's namespace {policy_ns}",
                sel(pod_sel)
            )
        }
        Some(false) => misses.push(format!(
            "namespaceSelector {} does not select namespace {ns}",
            sel(ns_sel)
        )),
        _ => {}
    }
    if pod_ok == Some(false) {
        misses.push(format!(
            "podSelector {} does not select {name} {}",
            sel(pod_sel),
            label_set(labels)
        ));
    }
    misses.join(" and ")
}

fn match_ports(
    ports: Option<&[NetworkPolicyPort]>,
    dst_pod: Option<&Pod>,
    proto: u8,
    port: u16,
) -> Match {
    let Some(ports) = ports.filter(|v| !v.is_empty()) else {
        return Match {
            matched: true,
            index: None,
            why: "no `ports`: every port and protocol".to_string(),
        };
    };
    first_match(ports, |i, p| {
        let matched = Cluster::port_matches(p, dst_pod, proto, port);
        let why = port_why(p, dst_pod, proto, port, matched);
        (matched, format!("ports[{i}] {why}"))
    })
}

fn port_why(
    p: &NetworkPolicyPort,
    dst_pod: Option<&Pod>,
    proto: u8,
    port: u16,
    matched: bool,
) -> String {
    let want = p.protocol.as_deref().unwrap_or("TCP");
    let got = proto_name(proto);
    if want != got {
        return format!("is {want}, not {got}");
    }
    match &p.port {
        None => format!("every {want} port"),
        Some(IntOrString::Int(n)) => {
            let entry = match p.end_port {
                Some(e) => format!("{n}-{e}/{want}"),
                None => format!("{n}/{want}"),
            };
            match (matched, p.end_port) {
                (true, _) => entry,
                (false, Some(_)) => format!("{entry} does not contain {port}"),
                (false, None) => format!("{entry} is not {port}"),
            }
        }
        Some(IntOrString::String(name)) => {
            let Some(d) = dst_pod else {
                return format!(
                    "named port {name}: resolves on the destination pod, and the destination is not a pod"
                );
            };
            let dname = pod_name(d);
            // Several containers may declare the name (bad input): the one that matches,
            // else the first.
            let declared: Vec<(String, i32)> = d
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| {
                    c.ports
                        .iter()
                        .flatten()
                        .filter(|cp| {
                            cp.name.as_deref() == Some(name.as_str())
                                && cp.protocol.as_deref().unwrap_or("TCP") == want
                        })
                        .map(|cp| (c.name.clone(), cp.container_port))
                })
                .collect();
            let shown = declared
                .iter()
                .find(|(_, n)| *n == i32::from(port))
                .or(declared.first());
            match shown {
                None => format!("named port {name}: {dname} declares no {want} port named {name}"),
                Some((c, n)) if matched => {
                    format!("named port {name} is {n}/{want} on {dname} (container {c})")
                }
                Some((c, n)) => format!(
                    "named port {name} is {n}/{want} on {dname} (container {c}), not {port}"
                ),
            }
        }
    }
}

/// A label selector in kubectl's notation: `{app=web,tier in (a,b),!debug}`; `{}` = all.
pub fn selector(s: &LabelSelector) -> String {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            op => format!("{} {op} ({values})", e.key),
        });
    }
    format!("{{{}}}", parts.join(","))
}

fn label_set(labels: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_traffic_parse() {
        assert_eq!(
            "x/a".parse::<Subject>(),
            Ok(Subject::Pod(PodRef::new("x", "a")))
        );
        assert_eq!(
            "fd00::5".parse::<Subject>(),
            Ok(Subject::Ip("fd00::5".parse().unwrap()))
        );
        assert!("a".parse::<Subject>().is_err());
        assert!("x/a/b".parse::<Subject>().is_err());
        let t = |s: &str| s.parse::<Traffic>();
        assert_eq!(
            t("80"),
            Ok(Traffic {
                protocol: Protocol::Tcp,
                port: 80
            })
        );
        assert_eq!(
            t("53/udp"),
            Ok(Traffic {
                protocol: Protocol::Udp,
                port: 53
            })
        );
        assert_eq!(t("icmp").map(|t| t.protocol), Ok(Protocol::Icmp));
        assert!(t("0").is_err());
        assert!(t("80/icmp").unwrap_err().contains("just icmp"));
        assert!(t("80/xyz").unwrap_err().contains("unknown protocol"));
    }

    #[test]
    fn addresses_prefer_ipv4_then_ipv6() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let dual = [ip("198.18.0.1"), ip("fd00::1")];
        assert_eq!(
            pick_addresses(&dual, &[ip("fd00::2"), ip("198.18.0.2")]),
            Some((ip("198.18.0.1"), ip("198.18.0.2")))
        );
        assert_eq!(
            pick_addresses(&dual, &[ip("fd00::2")]),
            Some((ip("fd00::1"), ip("fd00::2")))
        );
        assert_eq!(pick_addresses(&[ip("198.18.0.1")], &[ip("fd00::2")]), None);
    }
}
