//! The stateful, incremental compiler.
//!
//! A change first records what it touches: address prefixes whose identity class may differ,
//! local pods, policies. `settle` then brings the plan up to date in two steps, keeping each
//! endpoint's entry counts (see [`endpoint`]) equal to the contributions of the rules it
//! holds — every rule of the policy versions in its `selecting` list — under the current
//! peer caches:
//!
//! 1. **Identities.** Prefix classes are recomputed. Identities born are added to the peer
//!    caches that match them and granted by the rules endpoints hold; identities that died
//!    are dropped from the caches and their entries purged.
//! 2. **Endpoints.** Each local pod that may now be selected differently (it changed, or a
//!    policy of its namespace did) withdraws the rules it no longer holds and is granted the
//!    ones it newly holds. A policy edit is diffed rule by rule, so unchanged rules cost
//!    nothing.
//!
//! So a policy change costs the entries of the rules it changes, a new identity its own
//! entries, and a local pod changing labels the policies it leaves and joins — never a
//! recomputation of whole endpoints. Peer caches are shared by every rule with the same
//! peers (the `env: prod` peer of 500 policies is looked up once) and built from the
//! identity indexes, not by testing every identity.

mod endpoint;
pub(crate) mod fxhash;
mod matches;
mod pods;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use palisade_common::{
    IdentityValue, DIR_INGRESS, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, IDENTITY_FLAG_HOST,
    IDENTITY_WORLD,
};

use self::endpoint::{Endpoint, EpJournal, Sink};
use self::matches::{port_entries, rule_contributions, PeerCache};
use self::pods::{PodName, PodTable};
use crate::identity::{Identities, IdentityClass, PodAttrs};
use crate::model::{self, ObjectRef, PodInterners, PodRef, PodState, PolicyRef};
use crate::net;
use crate::plan::{EndpointDiff, Plan, PlanDiff, PolicyEntry, DIRS};
use crate::policy::{self, CompiledPolicy, IpBlock, PeerSet, Rule};
use crate::ports::NamedPort;
use crate::selector::Labels;

/// One object event, as a watch delivers it.
#[derive(Clone, Debug)]
pub enum Change {
    UpsertNamespace(Box<Namespace>),
    DeleteNamespace(String),
    UpsertPod(Box<Pod>),
    DeletePod(PodRef),
    UpsertPolicy(Box<NetworkPolicy>),
    DeletePolicy(PolicyRef),
}

/// Where an identity-trie prefix comes from; it lives while any source does.
#[derive(Default)]
struct PrefixSrc {
    /// Peer pods with this IP, sorted; the first one (by namespace/name) gives the pod
    /// attributes, which only matters for inconsistent input where two live pods share an
    /// IP. A Vec: nearly always one pod, and a B-tree node per address is ~0.5 KB.
    pods: Vec<PodName>,
    node: bool,
    /// ipBlock cidrs and excepts (counted per referencing peer).
    block_refs: usize,
    id: u32,
    class: Option<Arc<IdentityClass>>,
}

impl PrefixSrc {
    fn is_unused(&self) -> bool {
        self.pods.is_empty() && !self.node && self.block_refs == 0
    }
}

/// What one `apply` has touched so far.
#[derive(Default)]
struct Tx {
    dirty_prefixes: BTreeSet<IpNetwork>,
    /// Pods that changed and are or were local.
    dirty_pods: BTreeSet<PodRef>,
    dirty_policies: BTreeSet<PolicyRef>,
    ident_before: BTreeMap<IpNetwork, Option<IdentityValue>>,
    eps: BTreeMap<PodRef, EpJournal>,
    rejections: BTreeSet<PolicyRef>,
    created: BTreeSet<u32>,
    released: BTreeSet<u32>,
    classes: BTreeMap<u32, Option<Arc<IdentityClass>>>,
}

/// Opens `r`'s journal on first touch, recording the endpoint as it was.
fn journal<'a>(
    plan: &Plan,
    eps: &'a mut BTreeMap<PodRef, EpJournal>,
    r: &PodRef,
) -> &'a mut EpJournal {
    if !eps.contains_key(r) {
        eps.insert(r.clone(), EpJournal::open(plan.endpoints.get(r)));
    }
    eps.get_mut(r).expect("inserted above")
}

type Caches = HashMap<Arc<PeerSet>, PeerCache, fxhash::FxBuild>;

/// Adds the contributions of `rule` (building its peer cache if it is the first user).
fn grant_rule(
    caches: &mut Caches,
    ids: &Identities,
    rule: &Rule,
    dir: u8,
    local_ports: &[NamedPort],
    out: &mut impl FnMut(PolicyEntry),
) {
    let cache = rule.peers.as_ref().map(|p| {
        let c = caches
            .entry(p.clone())
            .or_insert_with(|| PeerCache::build(p, ids));
        c.users += 1;
        &*c
    });
    rule_contributions(rule, dir, cache, local_ports, ids, out);
}

/// Subtracts the contributions of `rule`, computed exactly as `grant_rule` did.
fn withdraw_rule(
    caches: &mut Caches,
    ids: &Identities,
    rule: &Rule,
    dir: u8,
    local_ports: &[NamedPort],
    out: &mut impl FnMut(PolicyEntry),
) {
    let cache = rule.peers.as_ref().map(|p| {
        let c = caches.get_mut(p).expect("a held rule has a peer cache");
        c.users -= 1;
        &*c
    });
    rule_contributions(rule, dir, cache, local_ports, ids, out);
}

/// Lets go of `rule`'s peer cache without computing its contributions (the endpoint goes).
fn release_rule(caches: &mut Caches, rule: &Rule) {
    if let Some(p) = &rule.peers {
        caches
            .get_mut(p)
            .expect("a held rule has a peer cache")
            .users -= 1;
    }
}

/// The rules of `new` that `old` lacks, per direction, as multisets.
fn rules_not_in<'a>(new: &'a CompiledPolicy, old: &CompiledPolicy) -> Vec<(u8, &'a Rule)> {
    let mut out = Vec::new();
    for d in DIRS {
        let olds = &old.rules[d as usize];
        let mut used = vec![false; olds.len()];
        for r in &new.rules[d as usize] {
            match (0..olds.len()).find(|&i| !used[i] && olds[i] == *r) {
                Some(i) => used[i] = true,
                None => out.push((d, r)),
            }
        }
    }
    out
}

/// The `EP_ISOLATED_*` bits the policies give.
fn isolation_flags(policies: &[(PolicyRef, Arc<CompiledPolicy>)]) -> u32 {
    let mut flags = 0;
    for (_, pol) in policies {
        if pol.isolates[DIR_INGRESS as usize] {
            flags |= EP_ISOLATED_INGRESS;
        }
        if pol.isolates[palisade_common::DIR_EGRESS as usize] {
            flags |= EP_ISOLATED_EGRESS;
        }
    }
    flags
}

fn all_rules(p: &CompiledPolicy) -> impl Iterator<Item = (u8, &Rule)> {
    DIRS.into_iter()
        .flat_map(move |d| p.rules[d as usize].iter().map(move |r| (d, r)))
}

/// The incremental policy compiler of one node.
pub struct Compiler {
    node: String,
    namespaces: BTreeMap<String, Labels>,
    pods: PodTable,
    interners: PodInterners,
    policies: BTreeMap<PolicyRef, Arc<CompiledPolicy>>,
    prefixes: BTreeMap<IpNetwork, PrefixSrc>,
    /// Live ipBlock peers by cidr, with the number of peers referencing each.
    blocks: BTreeMap<IpNetwork, BTreeMap<Arc<IpBlock>, usize>>,
    ids: Identities,
    /// Per distinct peer set of a rule some endpoint holds: the identities it matches, kept
    /// current as identities are born and die.
    caches: Caches,
    /// Per local pod: its entry counts and the policy versions they come from.
    endpoints: BTreeMap<PodRef, Endpoint>,
    plan: Plan,
}

impl Compiler {
    /// A compiler for `node`, whose own addresses are `node_ips`.
    pub fn new(node: impl Into<String>, node_ips: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut c = Self {
            node: node.into(),
            namespaces: BTreeMap::new(),
            pods: PodTable::default(),
            interners: PodInterners::default(),
            policies: BTreeMap::new(),
            prefixes: BTreeMap::new(),
            blocks: BTreeMap::new(),
            ids: Identities::default(),
            caches: HashMap::default(),
            endpoints: BTreeMap::new(),
            plan: Plan::default(),
        };
        let mut tx = Tx::default();
        for ip in node_ips {
            let p = net::host(ip);
            c.prefixes.entry(p).or_default().node = true;
            tx.dirty_prefixes.insert(p);
        }
        c.settle(&mut tx);
        c
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Number of identity classes in use (the world excluded).
    pub fn identity_count(&self) -> usize {
        self.ids.len()
    }

    /// The diff from an empty dataplane to the current plan (for a first sync).
    pub fn full_diff(&self) -> PlanDiff {
        let p = &self.plan;
        PlanDiff {
            identities_v4: p
                .identities_v4
                .iter()
                .map(|(k, v)| (*k, Some(*v)))
                .collect(),
            identities_v6: p
                .identities_v6
                .iter()
                .map(|(k, v)| (*k, Some(*v)))
                .collect(),
            endpoints: p
                .endpoints
                .iter()
                .map(|(k, e)| {
                    let d = EndpointDiff {
                        header: Some(e.header()),
                        header_changed: true,
                        added: e.entries.iter().copied().collect(),
                        removed: Vec::new(),
                    };
                    (k.clone(), d)
                })
                .collect(),
            rejections: p
                .rejections
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect(),
            classes: p
                .classes
                .iter()
                .map(|(k, v)| (*k, Some(v.clone())))
                .collect(),
        }
    }

    /// The node's addresses changed (an address added to or removed from an interface):
    /// traffic from the new set is node traffic, from the old set no longer is.
    pub fn set_node_ips(&mut self, node_ips: impl IntoIterator<Item = IpAddr>) -> PlanDiff {
        let new: BTreeSet<IpNetwork> = node_ips.into_iter().map(net::host).collect();
        let mut tx = Tx::default();
        for (p, src) in self.prefixes.iter_mut() {
            if src.node && !new.contains(p) {
                src.node = false;
                tx.dirty_prefixes.insert(*p);
            }
        }
        for p in new {
            let src = self.prefixes.entry(p).or_default();
            if !src.node {
                src.node = true;
                tx.dirty_prefixes.insert(p);
            }
        }
        self.settle(&mut tx);
        self.finish(tx)
    }

    /// Applies one change and returns the map updates it causes.
    pub fn apply(&mut self, change: Change) -> PlanDiff {
        self.apply_batch([change])
    }

    /// Applies several changes at once (cheaper than one by one: shared work is done once).
    pub fn apply_batch(&mut self, changes: impl IntoIterator<Item = Change>) -> PlanDiff {
        let mut tx = Tx::default();
        for change in changes {
            match change {
                Change::UpsertNamespace(ns) => {
                    let (name, labels) = model::namespace_of(&ns);
                    self.set_namespace(name, Some(labels), &mut tx);
                }
                Change::DeleteNamespace(name) => self.set_namespace(name, None, &mut tx),
                Change::UpsertPod(pod) => {
                    let r = ObjectRef::of(&pod.metadata);
                    self.set_pod(r, Some(PodState::from_pod(&pod)), &mut tx);
                }
                Change::DeletePod(r) => self.set_pod(r, None, &mut tx),
                Change::UpsertPolicy(np) => {
                    let r = ObjectRef::of(&np.metadata);
                    self.set_policy(r, Some(Arc::new(policy::compile(&np))), &mut tx);
                }
                Change::DeletePolicy(r) => self.set_policy(r, None, &mut tx),
            }
        }
        self.settle(&mut tx);
        self.finish(tx)
    }

    fn namespace_labels(&self, ns: &str) -> Labels {
        match self.namespaces.get(ns) {
            Some(l) => l.clone(),
            None => model::namespace_labels(ns, None),
        }
    }

    fn set_namespace(&mut self, name: String, labels: Option<Labels>, tx: &mut Tx) {
        let before = self.namespace_labels(&name);
        match labels {
            Some(l) => self.namespaces.insert(name.clone(), l),
            None => self.namespaces.remove(&name),
        };
        if before == self.namespace_labels(&name) {
            return;
        }
        for st in self.pods.in_namespace(&name) {
            if st.is_peer() {
                tx.dirty_prefixes
                    .extend(st.ips.iter().map(|ip| net::host(*ip)));
            }
        }
    }

    fn set_pod(&mut self, r: PodRef, new: Option<PodState>, tx: &mut Tx) {
        let new = new.map(|n| n.intern(&mut self.interners));
        let (key, old) = match self.pods.remove(&r) {
            Some((key, st)) => (key, Some(st)),
            None => (self.pods.name_for(&r), None),
        };
        if old == new {
            if let Some(o) = old {
                self.pods.insert(key, o);
            }
            return;
        }
        if let Some(o) = &old {
            if o.is_peer() {
                for ip in &o.ips {
                    let p = net::host(*ip);
                    if let Some(src) = self.prefixes.get_mut(&p) {
                        src.pods.retain(|x| *x != key);
                    }
                    tx.dirty_prefixes.insert(p);
                }
            }
            if o.is_local(&self.node) {
                tx.dirty_pods.insert(r.clone());
            }
        }
        if let Some(n) = new {
            if n.is_peer() {
                for ip in &n.ips {
                    let p = net::host(*ip);
                    let pods = &mut self.prefixes.entry(p).or_default().pods;
                    if let Err(at) = pods.binary_search(&key) {
                        // A first push would reserve room for four: 96 bytes per address.
                        pods.reserve_exact(1);
                        pods.insert(at, key.clone());
                    }
                    tx.dirty_prefixes.insert(p);
                }
            }
            if n.is_local(&self.node) {
                tx.dirty_pods.insert(r.clone());
            }
            self.pods.insert(key, n);
        }
        if let Some(o) = old {
            o.release(&mut self.interners);
        }
    }

    fn set_policy(&mut self, r: PolicyRef, new: Option<Arc<CompiledPolicy>>, tx: &mut Tx) {
        let old = self.policies.remove(&r);
        if old == new {
            if let Some(o) = old {
                self.policies.insert(r, o);
            }
            return;
        }
        if let Some(o) = &old {
            for b in o.blocks() {
                self.remove_block(b, tx);
            }
        }
        if let Some(n) = &new {
            for b in n.blocks() {
                self.add_block(b, tx);
            }
        }
        tx.rejections.insert(r.clone());
        tx.dirty_policies.insert(r.clone());
        if let Some(n) = new {
            self.policies.insert(r, n);
        }
    }

    fn dirty_range(&self, cidr: IpNetwork, tx: &mut Tx) {
        // Prefixes inside the cidr sort between the cidr itself and its last address.
        let (lo, hi) = (net::normalize(cidr), net::last(cidr));
        tx.dirty_prefixes
            .extend(self.prefixes.range(lo..=hi).map(|(p, _)| *p));
    }

    fn add_block(&mut self, b: &Arc<IpBlock>, tx: &mut Tx) {
        for p in std::iter::once(&b.cidr).chain(&b.except) {
            self.prefixes.entry(*p).or_default().block_refs += 1;
            tx.dirty_prefixes.insert(*p);
        }
        let n = self
            .blocks
            .entry(b.cidr)
            .or_default()
            .entry(b.clone())
            .or_default();
        *n += 1;
        if *n == 1 {
            self.dirty_range(b.cidr, tx);
        }
    }

    fn remove_block(&mut self, b: &Arc<IpBlock>, tx: &mut Tx) {
        for p in std::iter::once(&b.cidr).chain(&b.except) {
            if let Some(src) = self.prefixes.get_mut(p) {
                src.block_refs = src.block_refs.saturating_sub(1);
            }
            tx.dirty_prefixes.insert(*p);
        }
        let Some(by_cidr) = self.blocks.get_mut(&b.cidr) else {
            return;
        };
        let gone = match by_cidr.get_mut(b) {
            Some(n) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        };
        if gone {
            by_cidr.remove(b);
            if by_cidr.is_empty() {
                self.blocks.remove(&b.cidr);
            }
            self.dirty_range(b.cidr, tx);
        }
    }

    fn class_of(&self, p: IpNetwork, src: &PrefixSrc) -> IdentityClass {
        let pod = src.pods.first().and_then(|r| {
            let st = self.pods.get(&r.ns, &r.name)?;
            Some(Arc::new(PodAttrs {
                namespace: r.ns.to_string(),
                namespace_labels: self.namespace_labels(&r.ns),
                labels: (*st.labels).clone(),
                named_ports: st.named_ports.to_vec(),
            }))
        });
        let mut blocks = BTreeSet::new();
        if !self.blocks.is_empty() {
            for len in 0..=p.prefix() {
                if let Some(bs) = self.blocks.get(&net::truncate(p.ip(), len)) {
                    blocks.extend(bs.keys().filter(|b| b.contains_prefix(p)).cloned());
                }
            }
        }
        IdentityClass {
            pod,
            host: src.node,
            blocks,
        }
    }

    fn trie_get(&self, p: IpNetwork) -> Option<IdentityValue> {
        match p {
            IpNetwork::V4(n) => self.plan.identities_v4.get(&n).copied(),
            IpNetwork::V6(n) => self.plan.identities_v6.get(&n).copied(),
        }
    }

    fn trie_set(&mut self, p: IpNetwork, v: Option<IdentityValue>) {
        match (p, v) {
            (IpNetwork::V4(n), Some(v)) => {
                self.plan.identities_v4.insert(n, v);
            }
            (IpNetwork::V4(n), None) => {
                self.plan.identities_v4.remove(&n);
            }
            (IpNetwork::V6(n), Some(v)) => {
                self.plan.identities_v6.insert(n, v);
            }
            (IpNetwork::V6(n), None) => {
                self.plan.identities_v6.remove(&n);
            }
        }
    }

    /// The policies of `ns` that select a pod labelled `labels`.
    fn selecting(&self, ns: &str, labels: &Labels) -> Vec<(PolicyRef, Arc<CompiledPolicy>)> {
        self.policies
            .range(ObjectRef::namespace_range(ns))
            .filter(|(_, p)| p.selector.matches(labels))
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect()
    }

    fn settle(&mut self, tx: &mut Tx) {
        self.update_identities(tx);
        self.update_endpoints(tx);
        self.caches.retain(|_, c| c.users > 0);
    }

    /// Step 1: prefix classes, then identity births and deaths.
    fn update_identities(&mut self, tx: &mut Tx) {
        for p in std::mem::take(&mut tx.dirty_prefixes) {
            let before = self.trie_get(p);
            tx.ident_before.entry(p).or_insert(before);
            let Some(src) = self.prefixes.get(&p) else {
                continue;
            };
            if src.is_unused() {
                let src = self.prefixes.remove(&p).expect("just looked up");
                if src.class.is_some() {
                    self.ids.release(src.id);
                    tx.released.insert(src.id);
                }
                self.trie_set(p, None);
                continue;
            }
            let class = Arc::new(self.class_of(p, src));
            if src.class.as_ref() == Some(&class) {
                continue;
            }
            let (id, created) = self.ids.acquire(&class);
            if created {
                tx.created.insert(id);
            }
            let src = self.prefixes.get_mut(&p).expect("just looked up");
            if src.class.is_some() {
                self.ids.release(src.id);
                tx.released.insert(src.id);
            }
            let flags = if class.host { IDENTITY_FLAG_HOST } else { 0 };
            src.id = id;
            // The identity's own copy: one per class, not one per address.
            src.class = Some(self.ids.class(id).cloned().unwrap_or(class));
            self.trie_set(p, Some(IdentityValue { id, flags }));
        }

        let mut born = Vec::new();
        for &id in &tx.created {
            if self.ids.members(id) == 0 {
                self.ids.collect(id);
            } else if let Some(c) = self.ids.class(id) {
                born.push((id, c.clone()));
            }
        }
        let died: Vec<u32> = tx
            .released
            .iter()
            .copied()
            .filter(|id| *id != IDENTITY_WORLD && !tx.created.contains(id))
            .filter(|id| self.ids.members(*id) == 0 && self.ids.class(*id).is_some())
            .collect();
        tx.created.clear();
        tx.released.clear();
        if born.is_empty() && died.is_empty() {
            return;
        }

        // The caches learn the births and forget the deaths; `born_in` keeps, per peer set,
        // the identities born that it matches.
        let mut born_in: HashMap<&PeerSet, Vec<u32>, fxhash::FxBuild> = HashMap::default();
        for (set, cache) in self.caches.iter_mut() {
            for id in &died {
                cache.ids.remove(id);
            }
            for (id, c) in &born {
                if set.matches(c) {
                    cache.ids.insert(*id);
                    born_in.entry(set).or_default().push(*id);
                }
            }
        }
        let all_born: Vec<u32> = born.iter().map(|(id, _)| *id).collect();
        for (r, ep) in self.endpoints.iter_mut() {
            let entries = &self.plan.endpoints[r].entries;
            let has_dead = died
                .iter()
                .any(|id| entries.range(endpoint::entry_range(*id)).next().is_some());
            let held = || ep.selecting.iter().flat_map(|(_, p)| all_rules(p));
            let has_born = !all_born.is_empty()
                && held().any(|(_, rule)| {
                    rule.peers
                        .as_ref()
                        .is_none_or(|p| born_in.contains_key(&**p))
                });
            if !has_dead && !has_born {
                continue;
            }
            let j = journal(&self.plan, &mut tx.eps, r);
            let entries = &mut self
                .plan
                .endpoints
                .get_mut(r)
                .expect("every endpoint is in the plan")
                .entries;
            let mut sink = Sink {
                extra: &mut ep.extra,
                entries,
                journal: j,
            };
            for id in &died {
                sink.purge(*id);
            }
            if !has_born {
                continue;
            }
            for (_, pol) in &ep.selecting {
                for (d, rule) in all_rules(pol) {
                    let ids = match &rule.peers {
                        None => &all_born[..],
                        Some(p) => born_in.get(&**p).map_or(&[][..], |v| &v[..]),
                    };
                    for &id in ids {
                        port_entries(rule, d, &ep.pod.named_ports, &self.ids, id, &mut |e| {
                            sink.add(e)
                        });
                    }
                }
            }
        }
        for (id, c) in born {
            self.plan.classes.insert(id, c.clone());
            tx.classes.insert(id, Some(c));
        }
        for id in died {
            self.ids.collect(id);
            self.plan.classes.remove(&id);
            tx.classes.insert(id, None);
        }
    }

    /// Step 2: every local pod that may be selected differently withdraws the rules it no
    /// longer holds and is granted the ones it newly holds.
    fn update_endpoints(&mut self, tx: &mut Tx) {
        let mut candidates = std::mem::take(&mut tx.dirty_pods);
        for p in std::mem::take(&mut tx.dirty_policies) {
            candidates.extend(
                self.endpoints
                    .range(ObjectRef::namespace_range(&p.namespace))
                    .map(|(k, _)| k.clone()),
            );
        }
        for r in candidates {
            let state = self
                .pods
                .get_ref(&r)
                .filter(|p| p.is_local(&self.node))
                .cloned();
            if state.is_none() && !self.endpoints.contains_key(&r) {
                continue;
            }
            let want = state
                .as_ref()
                .map(|p| self.selecting(&r.namespace, &p.labels))
                .unwrap_or_default();
            let j = journal(&self.plan, &mut tx.eps, &r);
            let Some(state) = state else {
                // The endpoint goes: its entries all go with it, nothing to count.
                let ep = self.endpoints.remove(&r).expect("checked above");
                for (_, pol) in &ep.selecting {
                    for (_, rule) in all_rules(pol) {
                        release_rule(&mut self.caches, rule);
                    }
                }
                if let Some(pe) = self.plan.endpoints.remove(&r) {
                    j.remove_all(&pe.entries);
                }
                continue;
            };
            let pe = self.plan.endpoints.entry(r.clone()).or_default();
            let ep = match self.endpoints.entry(r.clone()) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    // A new endpoint: everything it gets, built at once.
                    let ep = v.insert(Endpoint::new(state));
                    let mut all = Vec::new();
                    for (_, pol) in &want {
                        for (d, rule) in all_rules(pol) {
                            grant_rule(
                                &mut self.caches,
                                &self.ids,
                                rule,
                                d,
                                &ep.pod.named_ports,
                                &mut |e| all.push(e),
                            );
                        }
                    }
                    ep.fill(&mut pe.entries, all);
                    ep.selecting = want;
                    pe.ips.clone_from(&ep.pod.ips);
                    pe.flags = isolation_flags(&ep.selecting);
                    continue;
                }
            };
            let mut sink = Sink {
                extra: &mut ep.extra,
                entries: &mut pe.entries,
                journal: j,
            };
            // Ingress named ports resolve on the pod: if they changed, every rule is
            // recomputed.
            let same_ports = state.named_ports == ep.pod.named_ports;
            let old_ports = std::mem::take(&mut ep.pod.named_ports);
            let held = std::mem::take(&mut ep.selecting);
            for (pr, pa) in &held {
                let now = want.iter().find(|(wr, _)| wr == pr).map(|(_, w)| w);
                let gone = match now {
                    Some(pb) if same_ports && Arc::ptr_eq(pa, pb) => continue,
                    Some(pb) if same_ports => rules_not_in(pa, pb),
                    _ => all_rules(pa).collect(),
                };
                for (d, rule) in gone {
                    withdraw_rule(&mut self.caches, &self.ids, rule, d, &old_ports, &mut |e| {
                        sink.sub(e)
                    });
                }
            }
            ep.pod = state;
            for (pr, pb) in &want {
                let before = held.iter().find(|(hr, _)| hr == pr).map(|(_, h)| h);
                let fresh = match before {
                    Some(pa) if same_ports && Arc::ptr_eq(pa, pb) => continue,
                    Some(pa) if same_ports => rules_not_in(pb, pa),
                    _ => all_rules(pb).collect(),
                };
                for (d, rule) in fresh {
                    grant_rule(
                        &mut self.caches,
                        &self.ids,
                        rule,
                        d,
                        &ep.pod.named_ports,
                        &mut |e| sink.add(e),
                    );
                }
            }
            ep.selecting = want;
            pe.ips.clone_from(&ep.pod.ips);
            pe.flags = isolation_flags(&ep.selecting);
        }
    }

    fn finish(&mut self, tx: Tx) -> PlanDiff {
        let mut diff = PlanDiff::default();
        for (p, before) in tx.ident_before {
            let after = self.trie_get(p);
            if after != before {
                match p {
                    IpNetwork::V4(n) => diff.identities_v4.insert(n, after),
                    IpNetwork::V6(n) => diff.identities_v6.insert(n, after),
                };
            }
        }
        for (r, j) in tx.eps {
            let now = self.plan.endpoints.get(&r);
            let header = now.map(|e| e.header());
            let header_changed = header != j.header_before;
            let (added, removed) = j.net(now.map(|p| &p.entries));
            if !header_changed && added.is_empty() && removed.is_empty() {
                continue;
            }
            diff.endpoints.insert(
                r,
                EndpointDiff {
                    header,
                    header_changed,
                    added,
                    removed,
                },
            );
        }
        for r in tx.rejections {
            let now = self
                .policies
                .get(&r)
                .map(|p| p.rejections.clone())
                .filter(|v| !v.is_empty());
            let before = self.plan.rejections.get(&r).cloned();
            if now != before {
                match &now {
                    Some(v) => self.plan.rejections.insert(r.clone(), v.clone()),
                    None => self.plan.rejections.remove(&r),
                };
                diff.rejections.insert(r, now);
            }
        }
        diff.classes = tx.classes;
        diff
    }
}

/// Compiles a whole cluster state for `node` in one go.
pub fn compile<'a>(
    namespaces: impl IntoIterator<Item = &'a Namespace>,
    pods: impl IntoIterator<Item = &'a Pod>,
    policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    node: &str,
    node_ips: &[IpAddr],
) -> Plan {
    let mut c = Compiler::new(node, node_ips.iter().copied());
    let changes = namespaces
        .into_iter()
        .map(|n| Change::UpsertNamespace(Box::new(n.clone())))
        .chain(
            pods.into_iter()
                .map(|p| Change::UpsertPod(Box::new(p.clone()))),
        )
        .chain(
            policies
                .into_iter()
                .map(|p| Change::UpsertPolicy(Box::new(p.clone()))),
        );
    c.apply_batch(changes);
    c.plan
}
