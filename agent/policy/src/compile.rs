//! The stateful, incremental compiler.
//!
//! Every change marks what it may affect — address prefixes whose identity class may
//! differ, local endpoints whose entries must be recomputed — and `settle` brings exactly
//! those up to date. Class births and deaths are then pushed to the per-rule match caches
//! and, as single-identity entry deltas, to the endpoints that were not recomputed anyway.

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

use crate::identity::{Identities, IdentityClass, PodAttrs};
use crate::model::{self, ObjectRef, PodRef, PodState, PolicyRef};
use crate::net;
use crate::plan::{EndpointDiff, EndpointHeader, Plan, PlanDiff, PolicyEntry, DIRS};
use crate::policy::{self, CompiledPolicy, IpBlock, Peer, Rule};
use crate::ports::{port_blocks, PortMatch};
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
    /// Peer pods with this IP; the first one (by namespace/name) gives the pod attributes,
    /// which only matters for inconsistent input where two live pods share an IP.
    pods: BTreeSet<PodRef>,
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

#[derive(Default)]
struct EpJournal {
    header_before: Option<EndpointHeader>,
    added: BTreeSet<PolicyEntry>,
    removed: BTreeSet<PolicyEntry>,
}

/// What one `apply` has touched so far.
#[derive(Default)]
struct Tx {
    dirty_prefixes: BTreeSet<IpNetwork>,
    dirty_endpoints: BTreeSet<PodRef>,
    ident_before: BTreeMap<IpNetwork, Option<IdentityValue>>,
    eps: BTreeMap<PodRef, EpJournal>,
    rejections: BTreeSet<PolicyRef>,
    created: BTreeSet<u32>,
    released: BTreeSet<u32>,
    classes: BTreeMap<u32, Option<Arc<IdentityClass>>>,
}

/// The incremental policy compiler of one node.
pub struct Compiler {
    node: String,
    namespaces: BTreeMap<String, Labels>,
    pods: BTreeMap<PodRef, PodState>,
    policies: BTreeMap<PolicyRef, Arc<CompiledPolicy>>,
    prefixes: BTreeMap<IpNetwork, PrefixSrc>,
    /// Live ipBlock peers by cidr, with the number of peers referencing each.
    blocks: BTreeMap<IpNetwork, BTreeMap<Arc<IpBlock>, usize>>,
    ids: Identities,
    /// Per policy, per direction, per rule: ids of the classes its peers match (rules with
    /// no peer list match all and are not cached). Filled lazily, only for policies that
    /// select a local pod, and kept current on class births and deaths.
    rule_cache: HashMap<PolicyRef, [Vec<BTreeSet<u32>>; 2]>,
    plan: Plan,
}

impl Compiler {
    /// A compiler for `node`, whose own addresses are `node_ips`.
    pub fn new(node: impl Into<String>, node_ips: impl IntoIterator<Item = IpAddr>) -> Self {
        let mut c = Self {
            node: node.into(),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            policies: BTreeMap::new(),
            prefixes: BTreeMap::new(),
            blocks: BTreeMap::new(),
            ids: Identities::default(),
            rule_cache: HashMap::new(),
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
                        header: Some(EndpointHeader {
                            ips: e.ips.clone(),
                            flags: e.flags,
                        }),
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
        for st in self
            .pods
            .range(ObjectRef::namespace_range(&name))
            .map(|(_, s)| s)
        {
            if st.is_peer() {
                tx.dirty_prefixes
                    .extend(st.ips.iter().map(|ip| net::host(*ip)));
            }
        }
    }

    fn set_pod(&mut self, r: PodRef, new: Option<PodState>, tx: &mut Tx) {
        let old = self.pods.remove(&r);
        if old == new {
            if let Some(o) = old {
                self.pods.insert(r, o);
            }
            return;
        }
        if let Some(o) = &old {
            if o.is_peer() {
                for ip in &o.ips {
                    let p = net::host(*ip);
                    if let Some(src) = self.prefixes.get_mut(&p) {
                        src.pods.remove(&r);
                    }
                    tx.dirty_prefixes.insert(p);
                }
            }
            if o.is_local(&self.node) {
                tx.dirty_endpoints.insert(r.clone());
            }
        }
        if let Some(n) = new {
            if n.is_peer() {
                for ip in &n.ips {
                    let p = net::host(*ip);
                    self.prefixes.entry(p).or_default().pods.insert(r.clone());
                    tx.dirty_prefixes.insert(p);
                }
            }
            if n.is_local(&self.node) {
                tx.dirty_endpoints.insert(r.clone());
            }
            self.pods.insert(r, n);
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
        self.rule_cache.remove(&r);
        // Only pods selected before or after can see a difference.
        let selects = |p: &Option<Arc<CompiledPolicy>>, labels: &Labels| {
            p.as_ref().is_some_and(|p| p.selector.matches(labels))
        };
        for (k, _) in self
            .plan
            .endpoints
            .range(ObjectRef::namespace_range(&r.namespace))
        {
            let labels = self.pods.get(k).map(|p| &p.labels);
            if labels.is_none_or(|l| selects(&old, l) || selects(&new, l)) {
                tx.dirty_endpoints.insert(k.clone());
            }
        }
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
            let st = self.pods.get(r)?;
            Some(Arc::new(PodAttrs {
                namespace: r.namespace.clone(),
                namespace_labels: self.namespace_labels(&r.namespace),
                labels: st.labels.clone(),
                named_ports: st.named_ports.clone(),
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

    fn settle(&mut self, tx: &mut Tx) {
        // 1. Prefix classes.
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
            src.class = Some(class);
            self.trie_set(p, Some(IdentityValue { id, flags }));
        }

        // 2. Class births and deaths.
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

        if !born.is_empty() || !died.is_empty() {
            for (pref, cache) in self.rule_cache.iter_mut() {
                let Some(pol) = self.policies.get(pref) else {
                    continue;
                };
                for d in DIRS {
                    for (i, rule) in pol.rules[d as usize].iter().enumerate() {
                        let set = &mut cache[d as usize][i];
                        for id in &died {
                            set.remove(id);
                        }
                        for (id, c) in &born {
                            if rule.peers.is_some() && rule_matches(rule, &pol.namespace, c) {
                                set.insert(*id);
                            }
                        }
                    }
                }
            }
            let eps: Vec<PodRef> = self
                .plan
                .endpoints
                .keys()
                .filter(|k| !tx.dirty_endpoints.contains(*k))
                .cloned()
                .collect();
            for r in eps {
                for &id in &died {
                    let gone: Vec<PolicyEntry> = self.plan.endpoints[&r]
                        .entries
                        .range(entry_range(id))
                        .copied()
                        .collect();
                    for e in gone {
                        self.remove_entry(&r, e, tx);
                    }
                }
                if born.is_empty() {
                    continue;
                }
                let Some(pod) = self.pods.get(&r) else {
                    continue;
                };
                let mut out = BTreeSet::new();
                for (_, pol) in self
                    .policies
                    .range(ObjectRef::namespace_range(&r.namespace))
                {
                    if !pol.selector.matches(&pod.labels) {
                        continue;
                    }
                    for d in DIRS {
                        for rule in &pol.rules[d as usize] {
                            for (id, c) in &born {
                                if rule_matches(rule, &pol.namespace, c) {
                                    port_entries(rule, d, pod, c, *id, &mut out);
                                }
                            }
                        }
                    }
                }
                for e in out {
                    self.add_entry(&r, e, tx);
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

        // 3. Endpoints recomputed in full.
        for r in std::mem::take(&mut tx.dirty_endpoints) {
            self.recompute_endpoint(&r, tx);
        }
    }

    fn journal<'a>(&self, r: &PodRef, tx: &'a mut Tx) -> &'a mut EpJournal {
        tx.eps.entry(r.clone()).or_insert_with(|| EpJournal {
            header_before: self.plan.endpoints.get(r).map(|e| EndpointHeader {
                ips: e.ips.clone(),
                flags: e.flags,
            }),
            ..Default::default()
        })
    }

    fn add_entry(&mut self, r: &PodRef, e: PolicyEntry, tx: &mut Tx) {
        let j = self.journal(r, tx);
        if let Some(ep) = self.plan.endpoints.get_mut(r) {
            if ep.entries.insert(e) && !j.removed.remove(&e) {
                j.added.insert(e);
            }
        }
    }

    fn remove_entry(&mut self, r: &PodRef, e: PolicyEntry, tx: &mut Tx) {
        let j = self.journal(r, tx);
        if let Some(ep) = self.plan.endpoints.get_mut(r) {
            if ep.entries.remove(&e) && !j.added.remove(&e) {
                j.removed.insert(e);
            }
        }
    }

    fn ensure_cache(&mut self, pref: &PolicyRef) {
        if self.rule_cache.contains_key(pref) {
            return;
        }
        let Some(pol) = self.policies.get(pref) else {
            return;
        };
        let cache = DIRS.map(|d| {
            pol.rules[d as usize]
                .iter()
                .map(|rule| match rule.peers {
                    None => BTreeSet::new(),
                    Some(_) => self
                        .ids
                        .ids()
                        .filter(|(_, c)| rule_matches(rule, &pol.namespace, c))
                        .map(|(id, _)| id)
                        .collect(),
                })
                .collect()
        });
        self.rule_cache.insert(pref.clone(), cache);
    }

    fn recompute_endpoint(&mut self, r: &PodRef, tx: &mut Tx) {
        let pod = self.pods.get(r).filter(|p| p.is_local(&self.node)).cloned();
        let Some(pod) = pod else {
            if self.plan.endpoints.contains_key(r) {
                let j = self.journal(r, tx);
                let ep = self.plan.endpoints.remove(r).expect("checked");
                for e in ep.entries {
                    if !j.added.remove(&e) {
                        j.removed.insert(e);
                    }
                }
            }
            return;
        };
        let selecting: Vec<PolicyRef> = self
            .policies
            .range(ObjectRef::namespace_range(&r.namespace))
            .filter(|(_, p)| p.selector.matches(&pod.labels))
            .map(|(k, _)| k.clone())
            .collect();
        let mut flags = 0;
        let mut entries = BTreeSet::new();
        for pref in &selecting {
            self.ensure_cache(pref);
            let pol = &self.policies[pref];
            let cache = &self.rule_cache[pref];
            for d in DIRS {
                if pol.isolates[d as usize] {
                    flags |= if d == DIR_INGRESS {
                        EP_ISOLATED_INGRESS
                    } else {
                        EP_ISOLATED_EGRESS
                    };
                }
                for (i, rule) in pol.rules[d as usize].iter().enumerate() {
                    let world = IdentityClass::default();
                    if rule.peers.is_none() {
                        port_entries(rule, d, &pod, &world, IDENTITY_WORLD, &mut entries);
                        for (id, c) in self.ids.ids() {
                            port_entries(rule, d, &pod, c, id, &mut entries);
                        }
                    } else {
                        for &id in &cache[d as usize][i] {
                            if let Some(c) = self.ids.class(id) {
                                port_entries(rule, d, &pod, c, id, &mut entries);
                            }
                        }
                    }
                }
            }
        }
        self.journal(r, tx);
        let ep = self.plan.endpoints.entry(r.clone()).or_default();
        ep.ips.clone_from(&pod.ips);
        ep.flags = flags;
        let old = std::mem::replace(&mut ep.entries, entries);
        let j = tx.eps.get_mut(r).expect("journal opened above");
        for e in old.difference(&ep.entries) {
            if !j.added.remove(e) {
                j.removed.insert(*e);
            }
        }
        for e in ep.entries.difference(&old) {
            if !j.removed.remove(e) {
                j.added.insert(*e);
            }
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
            let header = self.plan.endpoints.get(&r).map(|e| EndpointHeader {
                ips: e.ips.clone(),
                flags: e.flags,
            });
            let header_changed = header != j.header_before;
            if !header_changed && j.added.is_empty() && j.removed.is_empty() {
                continue;
            }
            diff.endpoints.insert(
                r,
                EndpointDiff {
                    header,
                    header_changed,
                    added: j.added.into_iter().collect(),
                    removed: j.removed.into_iter().collect(),
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

fn entry_range(id: u32) -> std::ops::RangeInclusive<PolicyEntry> {
    let lo = PolicyEntry {
        identity: id,
        dir: 0,
        proto: None,
        port: 0,
        port_prefix_bits: 0,
    };
    let hi = PolicyEntry {
        identity: id,
        dir: u8::MAX,
        proto: Some(u8::MAX),
        port: u16::MAX,
        port_prefix_bits: u8::MAX,
    };
    lo..=hi
}

/// Whether `rule`'s peers (of a policy in namespace `ns`) match addresses of `class`.
fn rule_matches(rule: &Rule, ns: &str, class: &IdentityClass) -> bool {
    let Some(peers) = &rule.peers else {
        return true;
    };
    peers.iter().any(|peer| match peer {
        Peer::Pods { ns: ns_sel, pods } => class.pod.as_ref().is_some_and(|a| {
            let ns_ok = match ns_sel {
                None => a.namespace == ns,
                Some(s) => s.matches(&a.namespace_labels),
            };
            ns_ok && pods.matches(&a.labels)
        }),
        Peer::Block(b) => class.blocks.contains(b),
    })
}

/// The entries `rule` (in direction `dir`, of a policy selecting the local `pod`) grants to
/// peers of `class`, numbered `id`.
fn port_entries(
    rule: &Rule,
    dir: u8,
    pod: &PodState,
    class: &IdentityClass,
    id: u32,
    out: &mut BTreeSet<PolicyEntry>,
) {
    let entry = |proto, port, bits| PolicyEntry {
        identity: id,
        dir,
        proto,
        port,
        port_prefix_bits: bits,
    };
    let Some(specs) = &rule.ports else {
        out.insert(entry(None, 0, 0));
        return;
    };
    for s in specs {
        match &s.port {
            PortMatch::All => {
                out.insert(entry(Some(s.proto), 0, 0));
            }
            PortMatch::Range(lo, hi) => {
                for (p, bits) in port_blocks(*lo, *hi) {
                    out.insert(entry(Some(s.proto), p, bits));
                }
            }
            PortMatch::Named(name) => {
                // The destination pod names the port: the local pod for ingress, the peer
                // for egress.
                let named = if dir == DIR_INGRESS {
                    &pod.named_ports[..]
                } else {
                    class.pod.as_ref().map_or(&[][..], |a| &a.named_ports[..])
                };
                for (n, proto, port) in named {
                    if n == name && *proto == s.proto {
                        out.insert(entry(Some(s.proto), *port, 16));
                    }
                }
            }
        }
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
