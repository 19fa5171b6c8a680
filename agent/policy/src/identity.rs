//! Identity classes and their numbering.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

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

/// Interns classes to ids. Ids of live classes never change; an id is freed only when its
/// class has no member left, and reused afterwards, so a change renumbers nothing else.
#[derive(Default)]
pub(crate) struct Identities {
    by_class: HashMap<Arc<IdentityClass>, u32>,
    by_id: HashMap<u32, Entry>,
    free: Vec<u32>,
    next: u32,
}

impl Identities {
    /// Adds a member to `class`; returns its id and whether the class is new.
    pub fn acquire(&mut self, class: &Arc<IdentityClass>) -> (u32, bool) {
        if class.is_world() {
            return (palisade_common::IDENTITY_WORLD, false);
        }
        if let Some(&id) = self.by_class.get(class) {
            let e = self.by_id.get_mut(&id).expect("by_class and by_id agree");
            e.members += 1;
            return (id, false);
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.by_class.insert(class.clone(), id);
        self.by_id.insert(
            id,
            Entry {
                class: class.clone(),
                members: 1,
            },
        );
        (id, true)
    }

    /// Drops a member; a class left empty stays until `collect` so that a member moving
    /// out and back within one change keeps its id.
    pub fn release(&mut self, id: u32) {
        if let Some(e) = self.by_id.get_mut(&id) {
            e.members = e.members.saturating_sub(1);
        }
    }

    pub fn members(&self, id: u32) -> usize {
        self.by_id.get(&id).map_or(0, |e| e.members)
    }

    /// Forgets `id` (which must have no members) and makes it reusable.
    pub fn collect(&mut self, id: u32) {
        if let Some(e) = self.by_id.remove(&id) {
            self.by_class.remove(&e.class);
            self.free.push(id);
        }
    }

    pub fn class(&self, id: u32) -> Option<&Arc<IdentityClass>> {
        self.by_id.get(&id).map(|e| &e.class)
    }

    pub fn ids(&self) -> impl Iterator<Item = (u32, &Arc<IdentityClass>)> {
        self.by_id.iter().map(|(id, e)| (*id, &e.class))
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }
}
