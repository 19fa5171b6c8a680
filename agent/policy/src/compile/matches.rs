//! What rules grant: which identities a peer set matches (cached once per distinct peer
//! set, kept current as identities are born and die) and the entries a rule grants one
//! identity.

use std::collections::BTreeSet;

use palisade_common::{DIR_INGRESS, IDENTITY_WORLD};

use crate::identity::Identities;
use crate::plan::PolicyEntry;
use crate::policy::{Peer, PeerSet, Rule};
use crate::ports::{port_blocks, NamedPort, PortMatch};
use crate::selector::Selector;

/// The identities one peer set matches.
pub(super) struct PeerCache {
    pub ids: BTreeSet<u32>,
    /// How many held rules (over all endpoints) use it; it is dropped at zero.
    pub users: usize,
}

impl PeerCache {
    /// Looks the peers up in the identity indexes: the policy's own namespace or the
    /// namespaces a selector matches, and the ipBlocks named.
    pub fn build(set: &PeerSet, ids: &Identities) -> Self {
        let mut out = BTreeSet::new();
        for peer in &set.peers {
            match peer {
                Peer::Pods { ns: None, pods } => {
                    let own = set.namespace.as_deref().and_then(|ns| ids.in_namespace(ns));
                    out.extend(pod_ids(ids, own, pods));
                }
                Peer::Pods {
                    ns: Some(sel),
                    pods,
                } => {
                    for (_, in_ns) in ids.namespaces() {
                        // Every identity of a namespace carries that namespace's current
                        // labels (a label change re-classes all its pods), so the first
                        // one speaks for all.
                        let ns_labels = in_ns
                            .first()
                            .and_then(|id| ids.class(*id))
                            .and_then(|c| c.pod.as_ref())
                            .map(|a| &a.namespace_labels);
                        if ns_labels.is_some_and(|l| sel.matches(l)) {
                            out.extend(pod_ids(ids, Some(in_ns), pods));
                        }
                    }
                }
                Peer::Block(b) => out.extend(ids.in_block(b).into_iter().flatten()),
            }
        }
        Self { ids: out, users: 0 }
    }
}

fn pod_ids<'a>(
    ids: &'a Identities,
    in_ns: Option<&'a BTreeSet<u32>>,
    pods: &'a Selector,
) -> impl Iterator<Item = u32> + 'a {
    in_ns.into_iter().flatten().copied().filter(move |id| {
        ids.class(*id)
            .and_then(|c| c.pod.as_ref())
            .is_some_and(|a| pods.matches(&a.labels))
    })
}

/// The entries `rule` (in direction `dir`, of a policy selecting a local pod whose named
/// container ports are `local_ports`) grants to identity `id`.
pub(super) fn port_entries(
    rule: &Rule,
    dir: u8,
    local_ports: &[NamedPort],
    ids: &Identities,
    id: u32,
    out: &mut impl FnMut(PolicyEntry),
) {
    let entry = |proto, port, bits| PolicyEntry {
        identity: id,
        dir,
        proto,
        port,
        port_prefix_bits: bits,
    };
    let Some(specs) = &rule.ports else {
        out(entry(None, 0, 0));
        return;
    };
    for s in specs {
        match &s.port {
            PortMatch::All => out(entry(Some(s.proto), 0, 0)),
            PortMatch::Range(lo, hi) => {
                for (p, bits) in port_blocks(*lo, *hi) {
                    out(entry(Some(s.proto), p, bits));
                }
            }
            PortMatch::Named(name) => {
                // The destination pod names the port: the local pod for ingress, the peer
                // for egress (addresses that are no pod name nothing).
                let named = if dir == DIR_INGRESS {
                    local_ports
                } else {
                    ids.class(id)
                        .and_then(|c| c.pod.as_ref())
                        .map_or(&[][..], |a| &a.named_ports[..])
                };
                for (n, proto, port) in named {
                    if n == name && *proto == s.proto {
                        out(entry(Some(s.proto), *port, 16));
                    }
                }
            }
        }
    }
}

/// Every entry `rule` grants, one call per (identity, port entry): the same entry may come
/// several times, and withdrawing the rule must repeat exactly the calls that granted it.
/// `matched` is the rule's peer cache, `None` for a rule without peers (every identity and
/// the world).
pub(super) fn rule_contributions(
    rule: &Rule,
    dir: u8,
    matched: Option<&PeerCache>,
    local_ports: &[NamedPort],
    ids: &Identities,
    out: &mut impl FnMut(PolicyEntry),
) {
    match matched {
        None => {
            port_entries(rule, dir, local_ports, ids, IDENTITY_WORLD, out);
            for (id, _) in ids.ids() {
                port_entries(rule, dir, local_ports, ids, id, out);
            }
        }
        Some(c) => {
            for &id in &c.ids {
                port_entries(rule, dir, local_ports, ids, id, out);
            }
        }
    }
}
