//! Watcher events of one kind → the [`ObjectChange`]s the agent must apply.
//!
//! The tracker remembers key → resourceVersion of what it has sent, nothing more. A list
//! (the first one, or a relist after the watch expired with 410 Gone) is buffered until
//! it is complete: only then is it known which objects are gone, and an object listed
//! with the version already sent is not sent again, so a relist of an unchanged cluster
//! costs no compiler work and no map write.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kube::runtime::watcher::Event;
use palisade_policy::Change;

use crate::source::ObjectChange;

/// One object from a watcher, already reduced to what the agent needs.
#[derive(Debug)]
pub struct Entry {
    pub key: String,
    pub version: String,
    pub upsert: Change,
}

#[derive(Default)]
pub struct Tracker {
    /// Shared with the changes sent (and the agent's record of them).
    versions: HashMap<Arc<str>, Arc<str>>,
    /// Set between `Init` and `InitDone`.
    relist: Option<Relist>,
}

#[derive(Default)]
struct Relist {
    seen: HashSet<String>,
    /// Listed objects whose version differs from the one sent.
    changed: Vec<Entry>,
}

impl Tracker {
    /// Objects this kind has sent and not deleted.
    pub fn len(&self) -> usize {
        self.versions.len()
    }

    pub fn handle(&mut self, event: Event<Entry>) -> Vec<ObjectChange> {
        match event {
            // A list that failed half-way starts over with a new Init: what the partial
            // list saw proves nothing, so its buffer is dropped.
            Event::Init => {
                self.relist = Some(Relist::default());
                Vec::new()
            }
            Event::InitApply(entry) => {
                let sent = self.has_sent(&entry);
                let relist = self.relist.get_or_insert_with(Default::default);
                relist.seen.insert(entry.key.clone());
                if !sent {
                    relist.changed.push(entry);
                }
                Vec::new()
            }
            Event::InitDone => {
                let Relist { seen, changed } = self.relist.take().unwrap_or_default();
                let mut gone: Vec<Arc<str>> = self
                    .versions
                    .keys()
                    .filter(|k| !seen.contains(&***k))
                    .cloned()
                    .collect();
                gone.sort();
                let mut out: Vec<ObjectChange> =
                    changed.into_iter().map(|e| self.record(e)).collect();
                for key in gone {
                    self.versions.remove(&key);
                    out.extend(ObjectChange::deleted(key));
                }
                out
            }
            Event::Apply(entry) => {
                if self.has_sent(&entry) {
                    Vec::new()
                } else {
                    vec![self.record(entry)]
                }
            }
            Event::Delete(entry) => match self.versions.remove_entry(entry.key.as_str()) {
                Some((key, _)) => ObjectChange::deleted(key).into_iter().collect(),
                None => Vec::new(),
            },
        }
    }

    fn has_sent(&self, entry: &Entry) -> bool {
        self.versions.get(entry.key.as_str()).map(|v| &**v) == Some(entry.version.as_str())
    }

    fn record(&mut self, entry: Entry) -> ObjectChange {
        let key: Arc<str> = entry.key.into();
        let version: Arc<str> = entry.version.into();
        self.versions.insert(Arc::clone(&key), Arc::clone(&version));
        ObjectChange {
            key,
            version: Some(version),
            change: entry.upsert,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Namespace;

    fn ns(name: &str, version: &str) -> Entry {
        let mut obj = Namespace::default();
        obj.metadata.name = Some(name.into());
        obj.metadata.resource_version = Some(version.into());
        Entry {
            key: format!("Namespace/{name}"),
            version: version.into(),
            upsert: Change::UpsertNamespace(Box::new(obj)),
        }
    }

    fn summary(changes: &[ObjectChange]) -> Vec<(&str, Option<&str>)> {
        changes
            .iter()
            .map(|c| (&*c.key, c.version.as_deref()))
            .collect()
    }

    fn list(t: &mut Tracker, entries: Vec<Entry>) -> Vec<ObjectChange> {
        assert!(t.handle(Event::Init).is_empty());
        for e in entries {
            assert!(
                t.handle(Event::InitApply(e)).is_empty(),
                "sent before InitDone"
            );
        }
        t.handle(Event::InitDone)
    }

    #[test]
    fn relist_sends_changed_and_deletes_missing_only_at_init_done() {
        let mut t = Tracker::default();
        let first = list(&mut t, vec![ns("a", "1"), ns("b", "2"), ns("c", "3")]);
        assert_eq!(
            summary(&first),
            [
                ("Namespace/a", Some("1")),
                ("Namespace/b", Some("2")),
                ("Namespace/c", Some("3"))
            ]
        );
        let second = list(&mut t, vec![ns("a", "1"), ns("b", "5"), ns("d", "6")]);
        assert_eq!(
            summary(&second),
            [
                ("Namespace/b", Some("5")),
                ("Namespace/d", Some("6")),
                ("Namespace/c", None)
            ]
        );
        assert!(matches!(second[2].change, Change::DeleteNamespace(ref n) if n == "c"));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn interrupted_list_starts_over() {
        let mut t = Tracker::default();
        list(&mut t, vec![ns("a", "1"), ns("b", "2")]);
        t.handle(Event::Init);
        t.handle(Event::InitApply(ns("a", "4")));
        // The list failed; the watcher restarts with a fresh Init.
        let again = list(&mut t, vec![ns("a", "4"), ns("b", "2")]);
        assert_eq!(summary(&again), [("Namespace/a", Some("4"))]);
    }

    #[test]
    fn watch_events_skip_what_was_already_sent() {
        let mut t = Tracker::default();
        list(&mut t, vec![ns("a", "1")]);
        assert!(t.handle(Event::Apply(ns("a", "1"))).is_empty());
        assert_eq!(
            summary(&t.handle(Event::Apply(ns("a", "2")))),
            [("Namespace/a", Some("2"))]
        );
        assert_eq!(
            summary(&t.handle(Event::Delete(ns("a", "3")))),
            [("Namespace/a", None)]
        );
        // A delete of something never sent has nothing to undo.
        assert!(t.handle(Event::Delete(ns("zz", "4"))).is_empty());
        assert_eq!(t.len(), 0);
    }
}
