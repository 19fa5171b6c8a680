//! Every pod of the cluster as the compiler keeps it. At 100,000 pods this table and the
//! address index that points into it are most of the compiler's memory, so a pod's name is
//! stored once and shared ([`PodName`]), and its namespace once per namespace.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::fxhash::FxBuild;
use crate::model::{PodRef, PodState};

/// A pod's namespace and name, shared by the table and the address index; ordered like
/// [`PodRef`] (namespace, then name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PodName {
    pub ns: Arc<str>,
    pub name: Arc<str>,
}

#[derive(Default)]
pub(crate) struct PodTable {
    by_namespace: HashMap<Arc<str>, BTreeMap<Arc<str>, PodState>, FxBuild>,
}

impl PodTable {
    pub fn get(&self, ns: &str, name: &str) -> Option<&PodState> {
        self.by_namespace.get(ns)?.get(name)
    }

    pub fn get_ref(&self, r: &PodRef) -> Option<&PodState> {
        self.get(&r.namespace, &r.name)
    }

    /// Removes `r`, returning its shared name with its state.
    pub fn remove(&mut self, r: &PodRef) -> Option<(PodName, PodState)> {
        let pods = self.by_namespace.get_mut(&*r.namespace)?;
        let (name, st) = pods.remove_entry(&*r.name)?;
        let ns = if pods.is_empty() {
            self.by_namespace.remove_entry(&*r.namespace)?.0
        } else {
            Arc::clone(self.by_namespace.get_key_value(&*r.namespace)?.0)
        };
        Some((PodName { ns, name }, st))
    }

    /// The name to store `r` under: its namespace shared with the pods already there.
    pub fn name_for(&self, r: &PodRef) -> PodName {
        let ns = match self.by_namespace.get_key_value(&*r.namespace) {
            Some((ns, _)) => Arc::clone(ns),
            None => Arc::from(&*r.namespace),
        };
        PodName {
            ns,
            name: Arc::from(&*r.name),
        }
    }

    pub fn insert(&mut self, name: PodName, st: PodState) {
        self.by_namespace
            .entry(name.ns)
            .or_default()
            .insert(name.name, st);
    }

    pub fn in_namespace(&self, ns: &str) -> impl Iterator<Item = &PodState> {
        self.by_namespace
            .get(ns)
            .into_iter()
            .flat_map(|m| m.values())
    }
}
