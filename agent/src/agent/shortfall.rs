//! What the maps could not take: entries left out because a map was full, and the rule that
//! keeps a partial identity map fail closed. Pure bookkeeping; the reconciler does the IO.
//!
//! A full map makes the kernel refuse a *new* key (E2BIG for hash maps, ENOSPC for LPM
//! tries); the agent leaves that entry out, applies the rest of the diff, remembers the entry
//! here and writes it again after a later reconcile freed room. What a missing entry does:
//!
//! * **POLICY**: every entry allows; a missing one allows less (a shorter match that is
//!   present is itself an entry the plan wants). Safe as it is.
//! * **ENDPOINTS**: see the reconciler: a pod without its entry is not bound.
//! * **IDENTITY4/6 (exact and CIDR)**: an address whose prefix p is missing gets the identity of the
//!   longest prefix present that contains p (or the world). That can allow *more*: an
//!   ipBlock's `except` is a prefix whose class lacks the block, the cidr around it has it.
//!   So a present prefix f that such a fallback lands on is **withheld** (removed from the
//!   map, not written) when f's class could be allowed something p's class is not; the
//!   addresses of p and of f then fall back further, which is checked the same way, down to
//!   the world, which only peerless rules allow (and those allow every identity). Identity
//!   writes go longest prefix first and [`gains`] is asked before a prefix is written, so a
//!   withheld prefix is not in the map even for the moment between two writes.
//!
//! A class f allows no more than a class p when f is not another pod, f is not the node
//! unless p is, and every ipBlock containing f contains p: rules match peers only by pod
//! attributes, node-ness and ipBlocks, and port entries (named ports) only by pod.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ipnetwork::IpNetwork;
use palisade_common::IdentityValue;
use palisade_policy::{net, IdentityClass, Plan, PodRef, PolicyEntry};

/// Identity prefixes left out, with the map that refused each.
pub type Missing = BTreeMap<IpNetwork, &'static str>;

/// Entries the maps could not take, remembered until a later write succeeds.
#[derive(Debug, Default)]
pub struct Shortfall {
    /// Allow entries of each pod that POLICY had no room for.
    pub policy: BTreeMap<PodRef, BTreeSet<PolicyEntry>>,
    /// Identity prefixes the maps had no room for, with the map that refused each.
    pub identities: Missing,
    /// Prefixes that fit but are kept out of the map (see the module doc).
    pub withheld: BTreeSet<IpNetwork>,
    /// Local pods that got no slot (every slot is taken).
    pub no_slot: BTreeSet<PodRef>,
    /// Local pods whose ENDPOINTS entry did not fit: not bound, not enforced.
    pub no_endpoint: BTreeSet<PodRef>,
    /// Interfaces whose quarantine entry did not fit.
    pub unquarantined: BTreeSet<u32>,
    /// Writes refused for a full map since the agent started, by map.
    pub failures: BTreeMap<&'static str, u64>,
}

impl Shortfall {
    pub fn failed(&mut self, map: &'static str) {
        *self.failures.entry(map).or_default() += 1;
    }

    /// Forgets everything about a pod that is gone.
    pub fn forget_pod(&mut self, pod: &PodRef) {
        self.policy.remove(pod);
        self.no_slot.remove(pod);
        self.no_endpoint.remove(pod);
    }
}

/// The identity the plan wants at `net`, if any.
pub fn wanted(plan: &Plan, net: IpNetwork) -> Option<IdentityValue> {
    match net {
        IpNetwork::V4(n) => plan.identities_v4.get(&n).copied(),
        IpNetwork::V6(n) => plan.identities_v6.get(&n).copied(),
    }
}

/// The prefixes to withhold so that no address gets an identity allowed more than its own,
/// given the wanted prefixes that are `missing` from the map.
pub fn withheld(plan: &Plan, missing: &Missing) -> BTreeSet<IpNetwork> {
    let mut absent: BTreeSet<IpNetwork> = missing.keys().copied().collect();
    let mut out = BTreeSet::new();
    let mut todo: Vec<IpNetwork> = missing.keys().copied().collect();
    while let Some(p) = todo.pop() {
        let Some(pv) = wanted(plan, p) else { continue };
        let Some((f, fv)) = fallback(plan, p, &absent) else {
            continue; // the world: allowed nothing a peerless rule does not allow everyone
        };
        if allows_no_more(class(plan, fv.id), class(plan, pv.id)) {
            continue;
        }
        absent.insert(f);
        out.insert(f);
        // f's own addresses fall back further, and so do p's now.
        todo.push(f);
        todo.push(p);
    }
    out
}

/// Whether writing `f` now would give an address of an absent prefix inside it (`missing`
/// or `withheld`) more rights than its own. Identity writes go from the longest prefix to
/// the shortest, so every prefix inside `f` is decided when `f` is written: a prefix that
/// must be withheld is never in the map, not even for a moment.
pub fn gains(plan: &Plan, f: IpNetwork, missing: &Missing, withheld: &BTreeSet<IpNetwork>) -> bool {
    let Some(fv) = wanted(plan, f) else {
        return false;
    };
    let bits = if f.is_ipv4() { 32 } else { 128 };
    let (Ok(lo), Ok(hi)) = (
        IpNetwork::new(f.network(), 0),
        IpNetwork::new(f.broadcast(), bits),
    ) else {
        return false;
    };
    // Ordered by address, then prefix length: everything inside f is in lo..=hi.
    let inside: Vec<IpNetwork> = missing
        .range(lo..=hi)
        .map(|(p, _)| *p)
        .chain(withheld.range(lo..=hi).copied())
        .filter(|p| p.prefix() > f.prefix() && f.contains(p.network()))
        .collect();
    let absent = |n: &IpNetwork| missing.contains_key(n) || withheld.contains(n);
    inside.into_iter().any(|p| {
        let Some(pv) = wanted(plan, p) else {
            return false;
        };
        fallback_by(plan, p, &absent).is_some_and(|(g, _)| g == f)
            && !allows_no_more(class(plan, fv.id), class(plan, pv.id))
    })
}

/// The longest wanted prefix strictly containing `p` that is not `absent`.
fn fallback(
    plan: &Plan,
    p: IpNetwork,
    absent: &BTreeSet<IpNetwork>,
) -> Option<(IpNetwork, IdentityValue)> {
    fallback_by(plan, p, &|n| absent.contains(n))
}

fn fallback_by(
    plan: &Plan,
    p: IpNetwork,
    absent: &dyn Fn(&IpNetwork) -> bool,
) -> Option<(IpNetwork, IdentityValue)> {
    (0..p.prefix()).rev().find_map(|len| {
        let f = net::truncate(p.network(), len);
        if absent(&f) {
            return None;
        }
        wanted(plan, f).map(|v| (f, v))
    })
}

fn class(plan: &Plan, id: u32) -> Option<&Arc<IdentityClass>> {
    plan.classes.get(&id)
}

/// Whether every rule that allows class `f` also allows class `p` (unknown: assume not).
fn allows_no_more(f: Option<&Arc<IdentityClass>>, p: Option<&Arc<IdentityClass>>) -> bool {
    let world = IdentityClass::default();
    let (f, p): (&IdentityClass, &IdentityClass) = match (f, p) {
        (Some(f), Some(p)) => (f, p),
        (None, Some(p)) => (&world, p),
        (Some(f), None) => (f, &world),
        (None, None) => return true,
    };
    (f.pod.is_none() || f.pod == p.pod) && (!f.host || p.host) && f.blocks.is_subset(&p.blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::IpBlock;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn lost(nets: &[&str]) -> Missing {
        nets.iter().map(|n| (net(n), "IDENTITY4_CIDR")).collect()
    }

    fn block(cidr: &str, except: &[&str]) -> Arc<IpBlock> {
        Arc::new(IpBlock {
            cidr: net(cidr),
            except: except.iter().map(|e| net(e)).collect(),
        })
    }

    /// A plan with the given prefixes, each with its own class of the given blocks.
    fn plan(prefixes: &[(&str, Vec<Arc<IpBlock>>)]) -> Plan {
        let mut p = Plan::default();
        for (i, (n, blocks)) in prefixes.iter().enumerate() {
            let id = i as u32 + 1;
            let IpNetwork::V4(n) = net(n) else { panic!() };
            p.identities_v4.insert(n, IdentityValue { id, flags: 0 });
            p.classes.insert(
                id,
                Arc::new(IdentityClass {
                    blocks: blocks.iter().cloned().collect(),
                    ..Default::default()
                }),
            );
        }
        p
    }

    #[test]
    fn a_missing_except_withholds_the_cidr_around_it() {
        let b = block("198.18.0.0/16", &["198.18.5.0/24"]);
        let p = plan(&[
            ("198.18.0.0/16", vec![b.clone()]),
            ("198.18.5.0/24", vec![]),
        ]);
        let missing = lost(&["198.18.5.0/24"]);
        assert_eq!(withheld(&p, &missing), [net("198.18.0.0/16")].into());
    }

    #[test]
    fn a_missing_pod_ip_inside_an_allowed_block_withholds_nothing() {
        let b = block("198.18.0.0/16", &[]);
        let p = plan(&[
            ("198.18.0.0/16", vec![b.clone()]),
            ("198.18.0.7/32", vec![b.clone()]),
        ]);
        let missing = lost(&["198.18.0.7/32"]);
        assert!(withheld(&p, &missing).is_empty());
    }

    #[test]
    fn withholding_cascades_to_every_wider_prefix_that_gains() {
        // 0/15 allowed by a; 198.18/16 is a's except but allowed by b; 198.18.5/24 is
        // b's except. With the /24 missing, the /16 gains b over it; with the /16 gone,
        // the /15 gains a over the /24 and the /16.
        let a = block("198.18.0.0/15", &["198.18.0.0/16"]);
        let b = block("198.18.0.0/16", &["198.18.5.0/24"]);
        let p = plan(&[
            ("198.18.0.0/15", vec![a.clone()]),
            ("198.18.0.0/16", vec![b.clone()]),
            ("198.18.5.0/24", vec![]),
        ]);
        let missing = lost(&["198.18.5.0/24"]);
        assert_eq!(
            withheld(&p, &missing),
            [net("198.18.0.0/15"), net("198.18.0.0/16")].into()
        );
    }

    #[test]
    fn a_prefix_is_not_written_over_a_missing_except() {
        let b = block("198.18.0.0/16", &["198.18.5.0/24"]);
        let p = plan(&[
            ("198.18.0.0/16", vec![b.clone()]),
            ("198.18.5.0/24", vec![]),
        ]);
        let missing = lost(&["198.18.5.0/24"]);
        let none = BTreeSet::new();
        assert!(gains(&p, net("198.18.0.0/16"), &missing, &none));
        // Missing elsewhere, or nothing missing: written.
        assert!(!gains(
            &p,
            net("198.18.0.0/16"),
            &lost(&["198.19.5.0/24"]),
            &none
        ));
        assert!(!gains(&p, net("198.18.0.0/16"), &Missing::new(), &none));
        // Through a withheld prefix in between, it still is the fallback.
        let a = block("198.18.0.0/15", &["198.18.0.0/16"]);
        let q = plan(&[
            ("198.18.0.0/15", vec![a.clone()]),
            ("198.18.0.0/16", vec![b.clone()]),
            ("198.18.5.0/24", vec![]),
        ]);
        let withheld = [net("198.18.0.0/16")].into();
        assert!(gains(&q, net("198.18.0.0/15"), &missing, &withheld));
    }

    #[test]
    fn a_fallback_that_allows_no_more_is_kept_even_if_the_next_would_gain() {
        // The /32 (a pod in no block) falls back to the /24 except (no block): fine, the
        // /16 around it is not reached.
        let b = block("198.18.0.0/16", &["198.18.5.0/24"]);
        let p = plan(&[
            ("198.18.0.0/16", vec![b.clone()]),
            ("198.18.5.0/24", vec![]),
            ("198.18.5.9/32", vec![]),
        ]);
        let missing = lost(&["198.18.5.9/32"]);
        assert!(withheld(&p, &missing).is_empty());
    }
}
