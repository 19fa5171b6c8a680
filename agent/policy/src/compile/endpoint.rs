//! One local pod's entries as a multiset of contributions, and the journal of what a change
//! did to them.
//!
//! An entry is in the plan while at least one (rule, identity) contributes it. Counting
//! contributions lets a change add or withdraw exactly its own — one rule's, one identity's —
//! without recomputing the endpoint from every policy that selects it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::fxhash::FxBuild;
use crate::model::{PodState, PolicyRef};
use crate::plan::{EndpointHeader, EndpointPlan, PolicyEntry};
use crate::policy::CompiledPolicy;

/// The compiler's bookkeeping for one local pod (its entries are in the plan).
pub(super) struct Endpoint {
    /// The pod as the contributions were computed (ingress named ports resolve on it).
    pub pod: PodState,
    /// The policies contributing, in the version that contributed.
    pub selecting: Vec<(PolicyRef, Arc<CompiledPolicy>)>,
    /// Contributions beyond the first, per entry. An entry in the plan has one contribution
    /// plus its count here; most have exactly one, so this stays small.
    pub extra: HashMap<PolicyEntry, u32, FxBuild>,
}

impl Endpoint {
    pub fn new(pod: PodState) -> Self {
        Self {
            pod,
            selecting: Vec::new(),
            extra: HashMap::default(),
        }
    }

    /// Builds the entry set of a new endpoint from all its contributions at once (sorting
    /// once is much cheaper than inserting one by one).
    pub fn fill(
        &mut self,
        entries: &mut BTreeSet<PolicyEntry>,
        mut contributions: Vec<PolicyEntry>,
    ) {
        contributions.sort_unstable();
        let mut unique = Vec::with_capacity(contributions.len());
        for e in contributions {
            if unique.last() == Some(&e) {
                *self.extra.entry(e).or_insert(0) += 1;
            } else {
                unique.push(e);
            }
        }
        debug_assert!(entries.is_empty(), "filling an endpoint that has entries");
        *entries = unique.into_iter().collect();
    }
}

/// What one `apply` did to one endpoint.
pub(super) struct EpJournal {
    pub header_before: Option<EndpointHeader>,
    /// The endpoint existed before, so entry changes are logged; a new endpoint's entries
    /// are all added and need no log.
    pub tracked: bool,
    /// Every insertion (`true`) and removal of an entry, in order. An entry's first event
    /// tells whether it was there before (it was, if it is first removed).
    log: Vec<(PolicyEntry, bool)>,
}

impl EpJournal {
    pub fn open(before: Option<&EndpointPlan>) -> Self {
        Self {
            header_before: before.map(EndpointPlan::header),
            tracked: before.is_some(),
            log: Vec::new(),
        }
    }

    fn record(&mut self, e: PolicyEntry, inserted: bool) {
        if self.tracked {
            self.log.push((e, inserted));
        }
    }

    /// Records the removal of all of `entries` (the endpoint goes).
    pub fn remove_all(&mut self, entries: &BTreeSet<PolicyEntry>) {
        if self.tracked {
            self.log.extend(entries.iter().map(|e| (*e, false)));
        }
    }

    /// The net change: (added, removed), each sorted, given the entries now.
    pub fn net(
        mut self,
        now: Option<&BTreeSet<PolicyEntry>>,
    ) -> (Vec<PolicyEntry>, Vec<PolicyEntry>) {
        if !self.tracked {
            let all = now.map(|s| s.iter().copied().collect());
            return (all.unwrap_or_default(), Vec::new());
        }
        // Stable: each entry's events stay in order.
        self.log.sort_by_key(|(e, _)| *e);
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < self.log.len() {
            let (e, first) = self.log[i];
            while i < self.log.len() && self.log[i].0 == e {
                i += 1;
            }
            let before = !first;
            let after = now.is_some_and(|s| s.contains(&e));
            match (before, after) {
                (false, true) => added.push(e),
                (true, false) => removed.push(e),
                _ => {}
            }
        }
        (added, removed)
    }
}

/// The entry sets one contribution change works on.
pub(super) struct Sink<'a> {
    pub extra: &'a mut HashMap<PolicyEntry, u32, FxBuild>,
    pub entries: &'a mut BTreeSet<PolicyEntry>,
    pub journal: &'a mut EpJournal,
}

impl Sink<'_> {
    pub fn add(&mut self, e: PolicyEntry) {
        if self.entries.insert(e) {
            self.journal.record(e, true);
        } else {
            *self.extra.entry(e).or_insert(0) += 1;
        }
    }

    pub fn sub(&mut self, e: PolicyEntry) {
        if !self.extra.is_empty() {
            if let Some(c) = self.extra.get_mut(&e) {
                *c -= 1;
                if *c == 0 {
                    self.extra.remove(&e);
                }
                return;
            }
        }
        let was = self.entries.remove(&e);
        debug_assert!(was, "withdrawing {e:?}, which was never contributed");
        self.journal.record(e, false);
    }

    /// Drops every entry of identity `id`, whoever contributed it (the identity died).
    pub fn purge(&mut self, id: u32) {
        let gone: Vec<PolicyEntry> = self.entries.range(entry_range(id)).copied().collect();
        for e in gone {
            self.extra.remove(&e);
            self.entries.remove(&e);
            self.journal.record(e, false);
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
