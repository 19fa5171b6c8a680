//! The manifest directory as a stream of [`Update`]s: read it, diff against the previous
//! read by object version, send what changed, wait for the directory to change.

use std::collections::BTreeMap;
use std::path::PathBuf;

use palisade_policy::Change;
use tokio::sync::mpsc;

use super::manifests::{load_dir_cached, DirCache};
use super::{object_key, DirWatcher, ObjectChange, Snapshot, SourceError, Update};

/// Starts following `dir`. The watch is set up before the first read, so no change is
/// missed between the two. The task ends when the receiver is dropped.
pub fn spawn_directory(dir: PathBuf) -> Result<mpsc::Receiver<Update>, SourceError> {
    let mut watcher = DirWatcher::new(&dir)?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut versions = BTreeMap::new();
        let mut synced = false;
        let mut last_errors = None;
        let mut cache = DirCache::default();
        loop {
            let errors = match load_dir_cached(&dir, &mut cache) {
                Ok(snap) => {
                    let changes = changes_between(&versions, &snap);
                    versions = snap.versions.clone();
                    if !changes.is_empty() && tx.send(Update::Changes(changes)).await.is_err() {
                        return;
                    }
                    if !synced {
                        synced = true;
                        if tx.send(Update::Synced).await.is_err() {
                            return;
                        }
                    }
                    snap.errors.iter().map(|e| e.to_string()).collect()
                }
                // Nothing is removed on a failed read: a directory that vanished for a
                // moment (a ConfigMap volume swap, an unmount) must not open every pod.
                Err(e) => vec![e.to_string()],
            };
            if last_errors.as_ref() != Some(&errors) {
                last_errors = Some(errors.clone());
                if tx.send(Update::Errors(errors)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = watcher.changed() => {}
                _ = tx.closed() => return,
            }
        }
    });
    Ok(rx)
}

/// The changes that take the objects of `prev` (key -> version) to `snap`'s.
pub(crate) fn changes_between(
    prev: &BTreeMap<String, String>,
    snap: &Snapshot,
) -> Vec<ObjectChange> {
    let mut out = Vec::new();
    let mut push = |key: String, change: Change| {
        let version = snap.versions.get(&key);
        if prev.get(&key) != version {
            out.push(ObjectChange {
                version: version.cloned(),
                key,
                change,
            });
        }
    };
    // Namespaces first so pods and policies see their labels.
    for ns in &snap.namespaces {
        let key = object_key("Namespace", None, ns.metadata.name.as_deref().unwrap_or(""));
        push(key, Change::UpsertNamespace(Box::new(ns.clone())));
    }
    for pod in &snap.pods {
        let m = &pod.metadata;
        let key = object_key(
            "Pod",
            m.namespace.as_deref(),
            m.name.as_deref().unwrap_or(""),
        );
        push(key, Change::UpsertPod(Box::new(pod.clone())));
    }
    for np in &snap.policies {
        let m = &np.metadata;
        let key = object_key(
            "NetworkPolicy",
            m.namespace.as_deref(),
            m.name.as_deref().unwrap_or(""),
        );
        push(key, Change::UpsertPolicy(Box::new(np.clone())));
    }
    out.extend(
        prev.keys()
            .filter(|k| !snap.versions.contains_key(*k))
            .filter_map(|k| ObjectChange::deleted(k)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\n\
        spec: {nodeName: n1, containers: [{name: c, image: i}]}\n\
        status: {podIP: 198.18.0.2}\n";

    async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no update within 10 s")
            .expect("source ended")
    }

    fn keys(update: &Update) -> Vec<(String, Option<String>)> {
        match update {
            Update::Changes(c) => c
                .iter()
                .map(|o| (o.key.clone(), o.version.clone()))
                .collect(),
            other => panic!("expected changes, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn sends_objects_then_synced_then_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ns.yaml"), NS).unwrap();
        std::fs::write(dir.path().join("pod.yaml"), POD).unwrap();
        let mut rx = spawn_directory(dir.path().to_owned()).unwrap();

        let first = keys(&next(&mut rx).await);
        let names: Vec<_> = first.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["Namespace/x", "Pod/x/a"]);
        assert!(first.iter().all(|(_, v)| v.is_some()));
        assert!(matches!(next(&mut rx).await, Update::Synced));
        assert!(matches!(next(&mut rx).await, Update::Errors(e) if e.is_empty()));

        std::fs::remove_file(dir.path().join("pod.yaml")).unwrap();
        let gone = keys(&next(&mut rx).await);
        assert_eq!(gone, [("Pod/x/a".to_string(), None)]);

        std::fs::write(dir.path().join("bad.yaml"), "kind: Pod\nmetadata: [\n").unwrap();
        match next(&mut rx).await {
            Update::Errors(e) => assert!(e[0].contains("bad.yaml"), "{e:?}"),
            other => panic!("expected errors, got {other:?}"),
        }
    }
}
