//! The manifest directory as a stream of [`Update`]s: read what the watcher says changed,
//! send the objects whose versions moved, wait for the next change.

use std::path::PathBuf;

use tokio::sync::mpsc;

use super::dir_index::DirIndex;
use super::manifests::Changed;
use super::{DirWatcher, SourceError, Update};

/// Files per update during the first read: the compiler absorbs a large directory in
/// slices instead of holding every parsed object at once. Only the first read is sliced:
/// nothing has been sent yet, so no slice can carry a deletion that a later one undoes.
const FIRST_READ_FILES_PER_UPDATE: usize = 8;

/// Starts following `dir`. The watch is set up before the first read, so no change is
/// missed between the two. The task ends when the receiver is dropped.
pub fn spawn_directory(dir: PathBuf) -> Result<mpsc::Receiver<Update>, SourceError> {
    let mut watcher = DirWatcher::new(&dir)?;
    // Room for two slices: parsing runs ahead of compiling by at most that much, which
    // bounds the first read's peak memory at ~2 x 8 files' objects.
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let mut index = DirIndex::default();
        let mut synced = false;
        let mut last_errors = None;
        let mut changed = Changed::All;
        loop {
            let errors = match index.candidates(&dir, &changed) {
                Ok(files) => {
                    let slice = if synced {
                        files.len().max(1)
                    } else {
                        FIRST_READ_FILES_PER_UPDATE
                    };
                    for files in files.chunks(slice) {
                        let trust_stamps = matches!(changed, Changed::All);
                        let changes = index.refresh(files, trust_stamps);
                        if !changes.is_empty() && tx.send(Update::Changes(changes)).await.is_err() {
                            return;
                        }
                    }
                    if !synced {
                        synced = true;
                        if tx.send(Update::Synced).await.is_err() {
                            return;
                        }
                    }
                    index.errors().iter().map(|e| e.to_string()).collect()
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
            changed = tokio::select! {
                changed = watcher.changed() => changed,
                _ = tx.closed() => return,
            };
        }
    });
    Ok(rx)
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
                .map(|o| (o.key.to_string(), o.version.as_deref().map(str::to_string)))
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
