//! A NetworkPolicy object turned into what the compiler evaluates: validated selectors,
//! effective policy types, peers and ports. Validation lives here so that the compiler and
//! the reference evaluator reject exactly the same objects.

use std::sync::Arc;

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use palisade_common::{DIR_EGRESS, DIR_INGRESS};

use crate::error::{FieldError, Rejection};
use crate::identity::IdentityClass;
use crate::net;
use crate::ports::{self, PortSpec};
use crate::selector::Selector;

/// An ipBlock peer: `cidr` minus every `except`. Normalized, so equal blocks in different
/// policies are one block.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpBlock {
    pub cidr: IpNetwork,
    pub except: Vec<IpNetwork>,
}

impl IpBlock {
    pub fn contains_prefix(&self, p: IpNetwork) -> bool {
        net::within(p, self.cidr) && !self.except.iter().any(|e| net::within(p, *e))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Peer {
    /// `ns: None` = the policy's own namespace.
    Pods {
        ns: Option<Selector>,
        pods: Selector,
    },
    Block(Arc<IpBlock>),
}

/// The peers of one rule (ORed). Rules with equal peer sets match the same identities, so
/// the compiler keeps one match cache per distinct set.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PeerSet {
    /// The policy's namespace if a peer selects pods of it (`podSelector` without
    /// `namespaceSelector`); `None` if the peers mean the same in every namespace.
    pub namespace: Option<String>,
    pub peers: Vec<Peer>,
}

impl PeerSet {
    fn new(namespace: &str, peers: Vec<Peer>) -> Self {
        let local = peers
            .iter()
            .any(|p| matches!(p, Peer::Pods { ns: None, .. }));
        Self {
            namespace: local.then(|| namespace.to_string()),
            peers,
        }
    }

    /// Whether the peers match addresses of `class`.
    pub fn matches(&self, class: &IdentityClass) -> bool {
        self.peers.iter().any(|peer| match peer {
            Peer::Pods { ns, pods } => class.pod.as_ref().is_some_and(|a| {
                let ns_ok = match ns {
                    None => self.namespace.as_deref() == Some(a.namespace.as_str()),
                    Some(s) => s.matches(&a.namespace_labels),
                };
                ns_ok && pods.matches(&a.labels)
            }),
            Peer::Block(b) => class.blocks.contains(b),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Rule {
    /// `None` = every address, the world included.
    pub peers: Option<Arc<PeerSet>>,
    /// `None` = every protocol and port.
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CompiledPolicy {
    pub namespace: String,
    /// Which pods of the namespace it selects (everything if the selector was invalid).
    pub selector: Selector,
    /// Indexed by DIR_INGRESS / DIR_EGRESS.
    pub isolates: [bool; 2],
    /// Rules per direction; empty for a direction it does not isolate, and for a rejected
    /// policy.
    pub rules: [Vec<Rule>; 2],
    pub rejections: Vec<Rejection>,
}

impl CompiledPolicy {
    pub fn blocks(&self) -> impl Iterator<Item = &Arc<IpBlock>> {
        self.rules.iter().flatten().flat_map(|r| {
            r.peers
                .iter()
                .flat_map(|s| &s.peers)
                .filter_map(|p| match p {
                    Peer::Block(b) => Some(b),
                    Peer::Pods { .. } => None,
                })
        })
    }
}

pub(crate) fn object_name(ns: &str, name: &str) -> String {
    format!("NetworkPolicy/{ns}/{name}")
}

fn parse_cidr(s: &str, field: &str) -> Result<IpNetwork, FieldError> {
    s.parse::<IpNetwork>()
        .map(net::normalize)
        .map_err(|e| FieldError::new(field, format!("{s:?} is not a valid CIDR: {e}")))
}

fn parse_peer(p: &NetworkPolicyPeer, path: &str, errors: &mut Vec<FieldError>) -> Option<Peer> {
    match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
        (Some(b), None, None) => {
            let cidr = parse_cidr(&b.cidr, &format!("{path}.ipBlock.cidr"))
                .map_err(|e| errors.push(e))
                .ok();
            let mut except = Vec::new();
            for (i, e) in b.except.iter().flatten().enumerate() {
                let field = format!("{path}.ipBlock.except[{i}]");
                match parse_cidr(e, &field) {
                    Err(err) => errors.push(err),
                    Ok(e) => match cidr {
                        Some(c) if !net::within(e, c) => errors.push(FieldError::new(
                            field,
                            format!("{e} is not inside cidr {c}"),
                        )),
                        _ => except.push(e),
                    },
                }
            }
            except.sort();
            except.dedup();
            Some(Peer::Block(Arc::new(IpBlock {
                cidr: cidr?,
                except,
            })))
        }
        (Some(_), _, _) => {
            errors.push(FieldError::new(
                format!("{path}.ipBlock"),
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            ));
            None
        }
        (None, None, None) => {
            errors.push(FieldError::new(
                path,
                "a peer needs podSelector, namespaceSelector or ipBlock",
            ));
            None
        }
        (None, pods, ns) => {
            let mut sel = |s: &Option<_>, f: &str| match s {
                None => Some(None),
                Some(s) => Selector::parse(s, &format!("{path}.{f}"))
                    .map_err(|e| errors.extend(e))
                    .ok()
                    .map(Some),
            };
            let pods = sel(pods, "podSelector");
            let ns = sel(ns, "namespaceSelector");
            Some(Peer::Pods {
                ns: ns?,
                pods: pods?.unwrap_or_default(),
            })
        }
    }
}

fn parse_rule(
    namespace: &str,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
    path: &str,
    peer_field: &str,
    errors: &mut Vec<FieldError>,
) -> Rule {
    // An empty list means the same as an absent one: everything.
    let peers = peers.filter(|v| !v.is_empty()).map(|v| {
        let list = v
            .iter()
            .enumerate()
            .filter_map(|(i, p)| parse_peer(p, &format!("{path}.{peer_field}[{i}]"), errors))
            .collect();
        Arc::new(PeerSet::new(namespace, list))
    });
    let ports = ports.filter(|v| !v.is_empty()).map(|v| {
        v.iter()
            .enumerate()
            .filter_map(|(i, p)| {
                ports::parse(p, &format!("{path}.ports[{i}]"))
                    .map_err(|e| errors.extend(e))
                    .ok()
            })
            .collect()
    });
    Rule { peers, ports }
}

/// Compiles one policy. Never fails: problems become rejections and the result fails closed
/// (isolates what it would isolate, allows nothing).
pub(crate) fn compile(np: &NetworkPolicy) -> CompiledPolicy {
    let ns = np.metadata.namespace.clone().unwrap_or_default();
    let name = np.metadata.name.clone().unwrap_or_default();
    let object = object_name(&ns, &name);
    let mut errors: Vec<FieldError> = Vec::new();
    let default_spec = Default::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);

    let selector = match &spec.pod_selector {
        None => Some(Selector::everything()),
        Some(s) => Selector::parse(s, "spec.podSelector")
            .map_err(|e| errors.extend(e))
            .ok(),
    };

    // Defaulting as the API server does it.
    let isolates = match spec.policy_types.as_ref().filter(|t| !t.is_empty()) {
        None => Some([true, spec.egress.is_some()]),
        Some(types) => {
            let mut iso = [false, false];
            let mut ok = true;
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => iso[DIR_INGRESS as usize] = true,
                    "Egress" => iso[DIR_EGRESS as usize] = true,
                    other => {
                        ok = false;
                        errors.push(FieldError::new(
                            format!("spec.policyTypes[{i}]"),
                            format!("unknown policy type {other:?} (expected Ingress or Egress)"),
                        ));
                    }
                }
            }
            ok.then_some(iso)
        }
    };

    let mut rules: [Vec<Rule>; 2] = [Vec::new(), Vec::new()];
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let rule = parse_rule(
            &ns,
            r.from.as_ref(),
            r.ports.as_ref(),
            &format!("spec.ingress[{i}]"),
            "from",
            &mut errors,
        );
        rules[DIR_INGRESS as usize].push(rule);
    }
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let rule = parse_rule(
            &ns,
            r.to.as_ref(),
            r.ports.as_ref(),
            &format!("spec.egress[{i}]"),
            "to",
            &mut errors,
        );
        rules[DIR_EGRESS as usize].push(rule);
    }

    let rejections: Vec<Rejection> = errors
        .into_iter()
        .map(|e| e.into_rejection(&object))
        .collect();
    // Without a valid podSelector we cannot know what the author meant to cover at all.
    let isolates = match (&selector, isolates) {
        (Some(_), Some(iso)) => iso,
        _ => [true, true],
    };
    if !rejections.is_empty() {
        rules = [Vec::new(), Vec::new()];
    }
    for d in [DIR_INGRESS, DIR_EGRESS] {
        if !isolates[d as usize] {
            rules[d as usize].clear();
        }
    }
    CompiledPolicy {
        namespace: ns,
        selector: selector.unwrap_or_default(),
        isolates,
        rules,
        rejections,
    }
}
