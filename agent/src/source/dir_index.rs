//! What the manifest-directory source remembers between reads, so that a change to one
//! file costs that file, not the directory: per file its stamp, the objects it defines
//! and its problems; per object the files defining it (the first by file name wins, as in
//! [`load_dir`](super::load_dir)). The version last sent is the winner's version: a
//! refresh notes the winners of the keys it touches before it changes anything.
//!
//! Objects themselves are not kept: the compiler holds what it needs, and a 100,000-pod
//! directory would otherwise sit in memory twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use palisade_policy::Change;

use super::manifests::{duplicate_reason, manifest_files, meta_key, parse_file, Changed, FileLoad};
use super::{ManifestError, ObjectChange, SourceError};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

/// `None` when the file is gone.
fn stamp(file: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(file).ok()?;
    Some(Stamp {
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// Keys are shared by the maps below: at 100,000 objects every copy counts.
type Key = Arc<str>;

struct Indexed {
    /// The same allocation as the paths in [`Def`]s.
    path: Arc<Path>,
    stamp: Stamp,
    keys: Vec<Key>,
    errors: Vec<ManifestError>,
}

#[derive(Clone, Debug)]
struct Def {
    file: Arc<Path>,
    version: Arc<str>,
    line: usize,
}

#[derive(Default)]
pub(crate) struct DirIndex {
    files: BTreeMap<PathBuf, Indexed>,
    /// Object key -> the files defining it, sorted by path (the first wins). A Vec: nearly
    /// always one file.
    defs: HashMap<Key, Vec<Def>>,
    /// Keys defined by more than one file, for the duplicate report.
    duplicates: BTreeSet<Key>,
}

/// Key -> the version its winner had before this refresh (what the compiler holds).
type Before = BTreeMap<Key, Option<Arc<str>>>;

/// Notes `key`'s winner before the first change this refresh makes to it.
fn note(before: &mut Before, defs: &HashMap<Key, Vec<Def>>, key: &Key) {
    if !before.contains_key(key) {
        let winner = defs.get(key).and_then(|d| d.first());
        before.insert(Arc::clone(key), winner.map(|d| d.version.clone()));
    }
}

impl DirIndex {
    /// The files to look at for `changed`, in precedence order.
    pub fn candidates(&self, dir: &Path, changed: &Changed) -> Result<Vec<PathBuf>, SourceError> {
        match changed {
            Changed::All => {
                let mut files: BTreeSet<PathBuf> = manifest_files(dir)?.into_iter().collect();
                // Known files that are no longer listed: their objects are gone.
                files.extend(self.files.keys().cloned());
                Ok(files.into_iter().collect())
            }
            Changed::Files(files) => Ok(files.iter().cloned().collect()),
        }
    }

    /// Re-reads `files` and returns what that changes for the compiler: upserts
    /// (namespaces, then pods, then policies) before deletions. With `trust_stamps` (a
    /// scan of every file) a file whose inode, size and mtime are unchanged is skipped;
    /// files the watcher named are always read: an in-place edit of the same size within
    /// one mtime tick of the previous read keeps the stamp.
    pub fn refresh(&mut self, files: &[PathBuf], trust_stamps: bool) -> Vec<ObjectChange> {
        let mut fresh: HashMap<PathBuf, HashMap<String, Change>> = HashMap::new();
        let mut before = Before::new();
        for file in files {
            let now = stamp(file);
            if trust_stamps && now.is_some() && self.files.get(file).map(|f| f.stamp) == now {
                continue;
            }
            let mut load = match now {
                Some(_) => parse_file(file),
                None => FileLoad::default(),
            };
            if load.unreadable {
                // Unknown is not empty: keep its objects, retry on the next event.
                if let Some(f) = self.files.get_mut(file) {
                    f.errors = load.snapshot.errors;
                }
                continue;
            }
            let path: Arc<Path> = match self.files.remove(file) {
                Some(old) => {
                    for key in old.keys {
                        note(&mut before, &self.defs, &key);
                        if let Some(defs) = self.defs.get_mut(&key) {
                            defs.retain(|d| *d.file != **file);
                            if defs.is_empty() {
                                self.defs.remove(&key);
                            }
                        }
                    }
                    old.path
                }
                None => Arc::from(file.as_path()),
            };
            let objects = objects_of(&mut load);
            let mut keys = Vec::with_capacity(objects.len());
            for (key, version) in std::mem::take(&mut load.snapshot.versions) {
                let line = load.lines.get(&key).copied().unwrap_or(1);
                let key: Key = self
                    .defs
                    .get_key_value(key.as_str())
                    .map_or_else(|| Arc::from(key), |(k, _)| Arc::clone(k));
                note(&mut before, &self.defs, &key);
                let def = Def {
                    file: Arc::clone(&path),
                    version: version.into(),
                    line,
                };
                let defs = self.defs.entry(Arc::clone(&key)).or_default();
                let at = defs.partition_point(|d| d.file < def.file);
                // A first push would reserve room for four: 120 bytes per object unused.
                defs.reserve_exact(1);
                defs.insert(at, def);
                keys.push(key);
            }
            if let Some(stamp) = now {
                let errors = load.snapshot.errors;
                let entry = Indexed {
                    path,
                    stamp,
                    keys,
                    errors,
                };
                self.files.insert(file.clone(), entry);
            }
            fresh.insert(file.clone(), objects);
        }
        self.resolve(before, &mut fresh)
    }

    fn resolve(
        &mut self,
        before: Before,
        fresh: &mut HashMap<PathBuf, HashMap<String, Change>>,
    ) -> Vec<ObjectChange> {
        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        for (key, was) in before {
            let defs = self.defs.get(&key);
            if defs.is_some_and(|d| d.len() > 1) {
                self.duplicates.insert(Arc::clone(&key));
            } else {
                self.duplicates.remove(&key);
            }
            let Some(def) = defs.and_then(|d| d.first()) else {
                if was.is_some() {
                    deletes.extend(ObjectChange::deleted(key));
                }
                continue;
            };
            if was.as_ref() == Some(&def.version) {
                continue;
            }
            // The winner may be a file that did not change (the previous winner went
            // away): read it again, which only happens for duplicated keys.
            let objects = fresh
                .entry(def.file.to_path_buf())
                .or_insert_with(|| objects_of(&mut parse_file(&def.file)));
            let Some(change) = objects.remove(&*key) else {
                // That file changed since it was indexed and its event re-reads it. Until
                // then the compiler keeps the previous winner, so the def must not pass for
                // sent: no version is empty.
                if let Some(d) = self.defs.get_mut(&key).and_then(|d| d.first_mut()) {
                    d.version = "".into();
                }
                continue;
            };
            upserts.push(ObjectChange {
                version: Some(Arc::clone(&def.version)),
                key,
                change,
            });
        }
        upserts.sort_by_key(|c| kind_rank(&c.change));
        upserts.extend(deletes);
        upserts
    }

    /// The problems of the current files: what they failed to define, and duplicates
    /// where they are redefined.
    pub fn errors(&self) -> Vec<ManifestError> {
        let mut out: Vec<ManifestError> = self
            .files
            .values()
            .flat_map(|f| f.errors.iter().cloned())
            .collect();
        for key in &self.duplicates {
            let Some([first, later @ ..]) = self.defs.get(key).map(Vec::as_slice) else {
                continue;
            };
            for def in later {
                out.push(ManifestError {
                    file: def.file.to_path_buf(),
                    line: Some(def.line),
                    reason: duplicate_reason(key, &first.file, first.line),
                });
            }
        }
        out.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        out
    }
}

/// Takes the parsed objects out of `load`, reduced to what the compiler reads.
fn objects_of(load: &mut FileLoad) -> HashMap<String, Change> {
    use super::kube::slim;
    let snap = &mut load.snapshot;
    let ns = std::mem::take(&mut snap.namespaces).into_iter().map(|n| {
        let key = meta_key("Namespace", &n.metadata);
        (key, Change::UpsertNamespace(Box::new(slim::namespace(n))))
    });
    let pods = std::mem::take(&mut snap.pods).into_iter().map(|p| {
        let key = meta_key("Pod", &p.metadata);
        (key, Change::UpsertPod(Box::new(slim::pod(p))))
    });
    let policies = std::mem::take(&mut snap.policies).into_iter().map(|p| {
        let key = meta_key("NetworkPolicy", &p.metadata);
        (key, Change::UpsertPolicy(Box::new(slim::policy(p))))
    });
    ns.chain(pods).chain(policies).collect()
}

/// Namespaces first so pods and policies see their labels in the same batch.
fn kind_rank(change: &Change) -> u8 {
    match change {
        Change::UpsertNamespace(_) | Change::DeleteNamespace(_) => 0,
        Change::UpsertPod(_) | Change::DeletePod(_) => 1,
        Change::UpsertPolicy(_) | Change::DeletePolicy(_) => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::load_dir;

    fn pod_yaml(name: &str, label: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {label}}}}}\n"
        )
    }

    struct Dir(tempfile::TempDir);

    impl Dir {
        fn new() -> Self {
            Self(tempfile::tempdir().unwrap())
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.path().join(name)
        }
        fn write(&self, name: &str, text: &str) {
            // Through a rename, as the source's users do, so the inode always changes.
            let tmp = self.path(&format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(tmp, self.path(name)).unwrap();
        }
        fn refresh_all(&self, index: &mut DirIndex) -> Vec<(String, Option<String>)> {
            let files = index.candidates(self.0.path(), &Changed::All).unwrap();
            summary(index.refresh(&files, true))
        }
        /// What the index sends when the watcher names only `name`.
        fn refresh_named(&self, index: &mut DirIndex, name: &str) -> Vec<ObjectChange> {
            let named = Changed::Files([self.path(name)].into());
            let files = index.candidates(self.0.path(), &named).unwrap();
            index.refresh(&files, false)
        }
    }

    /// (key, label `app` or "deleted").
    fn summary(changes: Vec<ObjectChange>) -> Vec<(String, Option<String>)> {
        changes
            .into_iter()
            .map(|c| {
                let label = match c.change {
                    Change::UpsertPod(p) => p.metadata.labels.map(|l| l["app"].clone()),
                    _ => None,
                };
                (c.key.to_string(), label)
            })
            .collect()
    }

    /// What [`load_dir`] reports, in the index's order (by file, then line).
    fn full_read_errors(dir: &Dir) -> Vec<ManifestError> {
        let mut errors = load_dir(dir.0.path()).unwrap().errors;
        errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        errors
    }

    fn upsert(key: &str, label: &str) -> (String, Option<String>) {
        (key.to_string(), Some(label.to_string()))
    }

    #[test]
    fn sends_what_changed_in_the_files_that_changed() {
        let dir = Dir::new();
        dir.write("a.yaml", &pod_yaml("a", "one"));
        dir.write("b.yaml", &pod_yaml("b", "one"));
        let mut index = DirIndex::default();
        assert_eq!(
            dir.refresh_all(&mut index),
            [upsert("Pod/x/a", "one"), upsert("Pod/x/b", "one")]
        );
        assert_eq!(dir.refresh_all(&mut index), [], "nothing changed");

        dir.write("a.yaml", &pod_yaml("a", "two"));
        assert_eq!(
            summary(dir.refresh_named(&mut index, "a.yaml")),
            [upsert("Pod/x/a", "two")]
        );

        std::fs::remove_file(dir.path("b.yaml")).unwrap();
        assert_eq!(
            dir.refresh_all(&mut index),
            [("Pod/x/b".to_string(), None)],
            "a vanished file deletes its objects"
        );
    }

    #[test]
    fn a_named_file_is_read_even_when_its_stamp_did_not_move() {
        let dir = Dir::new();
        dir.write("a.yaml", &pod_yaml("a", "one"));
        let mut index = DirIndex::default();
        assert_eq!(dir.refresh_all(&mut index), [upsert("Pod/x/a", "one")]);
        // Rewritten in place, same size, mtime put back: what a quick second save within
        // one timestamp tick looks like.
        let path = dir.path("a.yaml");
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, pod_yaml("a", "two")).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(mtime).unwrap();
        drop(file);
        assert_eq!(
            summary(dir.refresh_named(&mut index, "a.yaml")),
            [upsert("Pod/x/a", "two")],
            "the watcher said a.yaml was written"
        );
    }

    #[test]
    fn duplicates_resolve_by_file_name_as_a_full_read_does() {
        let dir = Dir::new();
        dir.write("b.yaml", &pod_yaml("a", "from-b"));
        let mut index = DirIndex::default();
        assert_eq!(dir.refresh_all(&mut index), [upsert("Pod/x/a", "from-b")]);

        // An earlier file takes the key over; the later one is reported where it redefines.
        dir.write("a.yaml", &pod_yaml("a", "from-a"));
        assert_eq!(dir.refresh_all(&mut index), [upsert("Pod/x/a", "from-a")]);
        let errors = index.errors();
        assert_eq!(errors, full_read_errors(&dir));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].file.ends_with("b.yaml"), "{errors:?}");
        assert!(errors[0].reason.contains("duplicate Pod/x/a"), "{errors:?}");

        // The winner goes away: the unchanged later file's definition is sent, not a delete.
        std::fs::remove_file(dir.path("a.yaml")).unwrap();
        assert_eq!(dir.refresh_all(&mut index), [upsert("Pod/x/a", "from-b")]);
        assert_eq!(index.errors(), []);
    }

    #[test]
    fn broken_document_is_reported_and_the_rest_of_the_file_stays() {
        let dir = Dir::new();
        let two = format!("{}---\n{}", pod_yaml("a", "one"), pod_yaml("b", "one"));
        dir.write("a.yaml", &two);
        let mut index = DirIndex::default();
        assert_eq!(dir.refresh_all(&mut index).len(), 2);
        let broken = format!("{}---\nkind: Pod\nmetadata: [\n", pod_yaml("a", "one"));
        dir.write("a.yaml", &broken);
        assert_eq!(dir.refresh_all(&mut index), [("Pod/x/b".to_string(), None)]);
        let errors = index.errors();
        assert_eq!(errors, full_read_errors(&dir));
        assert_eq!(errors.len(), 1, "{errors:?}");
    }

    /// Any sequence of edits ends where a full read of the directory is: the objects sent
    /// so far (upserts minus deletions) are exactly the full read's, with its versions.
    #[test]
    fn incremental_refreshes_agree_with_a_full_read() {
        use proptest::prelude::*;
        let strategy = proptest::collection::vec((0..4usize, 0..5usize, 0..3usize), 1..25);
        proptest!(ProptestConfig::with_cases(64), |(edits in strategy)| {
            let dir = Dir::new();
            let mut index = DirIndex::default();
            let mut live: BTreeMap<String, String> = BTreeMap::new();
            for (file, pod, label) in edits {
                let name = format!("f{file}.yaml");
                if label == 0 && pod % 2 == 0 {
                    let _ = std::fs::remove_file(dir.path(&name));
                } else {
                    let text = format!("{}---\n{}", pod_yaml(&format!("p{pod}"), &format!("l{label}")),
                        pod_yaml(&format!("p{}", (pod + file) % 5), "shared"));
                    dir.write(&name, &text);
                }
                for c in dir.refresh_named(&mut index, &name) {
                    match c.version {
                        Some(v) => live.insert(c.key.to_string(), v.to_string()),
                        None => live.remove(&*c.key),
                    };
                }
                let full = load_dir(dir.0.path()).unwrap();
                prop_assert_eq!(&live, &full.versions);
                prop_assert_eq!(index.errors(), full_read_errors(&dir));
            }
        });
    }
}
