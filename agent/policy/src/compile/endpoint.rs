//! One local pod's entries as a multiset of contributions, and the journal of what a change
//! did to them.
//!
//! An entry is in the plan while at least one (policy, rule, identity) contributes it. Counting
//! contributions lets a change add or withdraw exactly its own — one policy's, one identity's
//! — without recomputing the endpoint from every policy that selects it.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::model::{PodState, PolicyRef};
use crate::plan::{EndpointHeader, EndpointPlan, PolicyEntry};
use crate::policy::CompiledPolicy;

/// A small fast hasher for the entry counts (FxHash's mixing; the keys are not
/// attacker-chosen in a way that matters: they come from the cluster's own objects, and the
/// worst case is slower, not wrong).
#[derive(Default, Clone, Copy)]
pub(super) struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.write_u64(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub(super) type FxBuild = BuildHasherDefault<FxHasher>;

/// The compiler's bookkeeping for one local pod (its entries are in the plan).
pub(super) struct Endpoint {
    /// The pod as the contributions were computed (ingress named ports resolve on it).
    pub pod: PodState,
    /// The policies contributing, in the version that contributed.
    pub selecting: Vec<(PolicyRef, Arc<CompiledPolicy>)>,
    /// Contributions per entry; the plan holds exactly the keys.
    pub counts: HashMap<PolicyEntry, u32, FxBuild>,
}

impl Endpoint {
    pub fn new(pod: PodState) -> Self {
        Self {
            pod,
            selecting: Vec::new(),
            counts: HashMap::default(),
        }
    }
}

/// What one `apply` did to one endpoint.
pub(super) struct EpJournal {
    pub header_before: Option<EndpointHeader>,
    /// The endpoint existed before, so entries are tracked one by one; a new endpoint's
    /// entries are all added and need no tracking.
    pub tracked: bool,
    /// Entries whose presence may have changed, with whether they were present before.
    pub touched: HashMap<PolicyEntry, bool, FxBuild>,
}

impl EpJournal {
    pub fn open(before: Option<&EndpointPlan>) -> Self {
        Self {
            header_before: before.map(EndpointPlan::header),
            tracked: before.is_some(),
            touched: HashMap::default(),
        }
    }

    fn touch(&mut self, e: PolicyEntry, present_before: bool) {
        if self.tracked {
            self.touched.entry(e).or_insert(present_before);
        }
    }
}

/// The entry sets one contribution change works on.
pub(super) struct Sink<'a> {
    pub counts: &'a mut HashMap<PolicyEntry, u32, FxBuild>,
    pub entries: &'a mut BTreeSet<PolicyEntry>,
    pub journal: &'a mut EpJournal,
}

impl Sink<'_> {
    pub fn add(&mut self, e: PolicyEntry) {
        let c = self.counts.entry(e).or_insert(0);
        *c += 1;
        if *c == 1 {
            self.entries.insert(e);
            self.journal.touch(e, false);
        }
    }

    pub fn sub(&mut self, e: PolicyEntry) {
        let Some(c) = self.counts.get_mut(&e) else {
            debug_assert!(false, "withdrawing {e:?}, which was never contributed");
            return;
        };
        *c -= 1;
        if *c == 0 {
            self.counts.remove(&e);
            self.entries.remove(&e);
            self.journal.touch(e, true);
        }
    }

    /// Drops every entry of identity `id`, whoever contributed it (the identity died).
    pub fn purge(&mut self, id: u32) {
        let gone: Vec<PolicyEntry> = self.entries.range(entry_range(id)).copied().collect();
        for e in gone {
            self.counts.remove(&e);
            self.entries.remove(&e);
            self.journal.touch(e, true);
        }
    }
}

pub(super) fn entry_range(id: u32) -> std::ops::RangeInclusive<PolicyEntry> {
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
