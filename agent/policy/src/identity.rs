//! Identity classes and their numbering.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use crate::compile::fxhash::FxBuild;
use crate::policy::IpBlock;
use crate::ports::NamedPort;
use crate::selector::Labels;

/// What policies can tell about a pod peer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodAttrs {
    pub namespace: String,
    /// Including `kubernetes.io/metadata.name`.
    pub namespace_labels: Labels,
    pub labels: Labels,
    /// Needed to resolve named ports of egress rules on the destination.
    pub named_ports: Vec<NamedPort>,
}

/// Everything policies can tell about an address: all addresses of one class are treated
/// alike by every rule, so they share one identity. The empty class is the world (id 0).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityClass {
    /// The pod owning the address, if it is a pod IP.
    pub pod: Option<Arc<PodAttrs>>,
    /// The address is one of this node's.
    pub host: bool,
    /// The ipBlock peers (cidr minus excepts) of all policies that contain the address.
    pub blocks: BTreeSet<Arc<IpBlock>>,
}

impl IdentityClass {
    pub fn is_world(&self) -> bool {
        self.pod.is_none() && !self.host && self.blocks.is_empty()
    }
}

struct Entry {
    class: Arc<IdentityClass>,
    members: usize,
}

/// A class with its hash computed once: classes are deep (labels, blocks), and the intern
/// table rehashes every key when it grows.
#[derive(Clone, PartialEq, Eq)]
struct ClassKey {
    hash: u64,
    class: Arc<IdentityClass>,
}

impl ClassKey {
    fn new(class: &Arc<IdentityClass>) -> Self {
        Self {
            hash: FxBuild::default().hash_one(&**class),
            class: class.clone(),
        }
    }
}

impl Hash for ClassKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Interns classes to ids. Ids of live classes never change; an id is freed only when its
/// class has no member left, and reused afterwards, so a change renumbers nothing else.
///
/// Also indexes the live ids the way rules look for them — pod identities by namespace,
/// every identity by the ipBlocks containing it — so that finding what a rule's peers match
/// looks at the candidate namespaces and blocks, not at every identity.
#[derive(Default)]
pub(crate) struct Identities {
    by_class: HashMap<ClassKey, u32, FxBuild>,
    /// Indexed by id (ids are small and reused, so the table stays dense).
    by_id: Vec<Option<Entry>>,
    live: usize,
    free: Vec<u32>,
    by_namespace: HashMap<String, BTreeSet<u32>, FxBuild>,
    by_block: HashMap<Arc<IpBlock>, BTreeSet<u32>, FxBuild>,
}

impl Identities {
    fn entry(&self, id: u32) -> Option<&Entry> {
        self.by_id.get(id as usize).and_then(Option::as_ref)
    }

    /// Adds a member to `class`; returns its id and whether the class is new.
    pub fn acquire(&mut self, class: &Arc<IdentityClass>) -> (u32, bool) {
        if class.is_world() {
            return (palisade_common::IDENTITY_WORLD, false);
        }
        let key = ClassKey::new(class);
        if let Some(&id) = self.by_class.get(&key) {
            let e = self.by_id[id as usize]
                .as_mut()
                .expect("by_class and by_id agree");
            e.members += 1;
            return (id, false);
        }
        // Id 0 is the world.
        let id = self
            .free
            .pop()
            .unwrap_or_else(|| self.by_id.len().max(1) as u32);
        if self.by_id.len() <= id as usize {
            self.by_id.resize_with(id as usize + 1, || None);
        }
        self.by_class.insert(key, id);
        if let Some(pod) = &class.pod {
            self.by_namespace
                .entry(pod.namespace.clone())
                .or_default()
                .insert(id);
        }
        for b in &class.blocks {
            self.by_block.entry(b.clone()).or_default().insert(id);
        }
        self.by_id[id as usize] = Some(Entry {
            class: class.clone(),
            members: 1,
        });
        self.live += 1;
        (id, true)
    }

    /// Drops a member; a class left empty stays until `collect` so that a member moving
    /// out and back within one change keeps its id.
    pub fn release(&mut self, id: u32) {
        if let Some(Some(e)) = self.by_id.get_mut(id as usize) {
            e.members = e.members.saturating_sub(1);
        }
    }

    pub fn members(&self, id: u32) -> usize {
        self.entry(id).map_or(0, |e| e.members)
    }

    /// Forgets `id` (which must have no members) and makes it reusable.
    pub fn collect(&mut self, id: u32) {
        let Some(e) = self.by_id.get_mut(id as usize).and_then(Option::take) else {
            return;
        };
        self.live -= 1;
        if let Some(pod) = &e.class.pod {
            if let Some(ids) = self.by_namespace.get_mut(&pod.namespace) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_namespace.remove(&pod.namespace);
                }
            }
        }
        for b in &e.class.blocks {
            if let Some(ids) = self.by_block.get_mut(b) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_block.remove(b);
                }
            }
        }
        self.by_class.remove(&ClassKey::new(&e.class));
        self.free.push(id);
    }

    pub fn class(&self, id: u32) -> Option<&Arc<IdentityClass>> {
        self.entry(id).map(|e| &e.class)
    }

    pub fn ids(&self) -> impl Iterator<Item = (u32, &Arc<IdentityClass>)> {
        self.by_id
            .iter()
            .enumerate()
            .filter_map(|(id, e)| e.as_ref().map(|e| (id as u32, &e.class)))
    }

    pub fn len(&self) -> usize {
        self.live
    }

    /// Pod identities by namespace.
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &BTreeSet<u32>)> {
        self.by_namespace.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn in_namespace(&self, ns: &str) -> Option<&BTreeSet<u32>> {
        self.by_namespace.get(ns)
    }

    /// Identities whose addresses are inside `b`.
    pub fn in_block(&self, b: &IpBlock) -> Option<&BTreeSet<u32>> {
        self.by_block.get(b)
    }
}
