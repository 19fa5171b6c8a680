//! The manifest-directory source: Namespaces, Pods and NetworkPolicies read from
//! `*.yaml`/`*.yml`/`*.json` files, plus a watcher that says when to read them again.
//!
//! Error granularity is the YAML document: a broken document is reported and skipped, and
//! every other document, in the same file or in others, stays in the snapshot. Dropping
//! the whole file instead would not fail safer (a missing policy opens traffic either
//! way) and would turn one typo into many missing objects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, Resource};
use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_yaml::Value;
use tokio::sync::Notify;
use tracing::{debug, warn};

/// The namespace the API server gives namespaced objects that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Set on every Namespace by the API server (since 1.21); policies select namespaces by
/// name through it, so manifests written without it must still match.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Quiet time that ends a burst while a file may still be being written (modified, not
/// yet closed): reading it mid-write would see half a file.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// Quiet time that ends a burst once every written file is closed or renamed into place:
/// just enough to take a multi-file save in one read. It is most of the latency from a
/// saved file to programmed maps, so it is short.
const SETTLE: Duration = Duration::from_millis(2);

/// A burst never holds a reload back longer than this, so a file rewritten in a tight
/// loop cannot starve the agent.
const MAX_BURST: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read manifest directory {}: {source}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch manifest directory {}: {source}", dir.display())]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// A file, document or object that was left out of the snapshot, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based; `None` when the problem is not tied to a line (unreadable file).
    pub line: Option<usize>,
    pub reason: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

/// Everything one read of the directory produced. Objects carry the API server's
/// defaults; each appears once (the first definition in file-name order wins).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub policies: Vec<NetworkPolicy>,
    /// [`object_key`] -> `metadata.resourceVersion` as written, or a short content hash
    /// when absent, so callers can tell which objects changed between two snapshots.
    pub versions: BTreeMap<String, String>,
    pub errors: Vec<ManifestError>,
}

/// `Kind/namespace/name`, or `Kind/name` for cluster-scoped objects.
pub fn object_key(kind: &str, ns: Option<&str>, name: &str) -> String {
    match ns {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

/// [`object_key`] of an object by its metadata (a missing name keys as empty).
pub(crate) fn meta_key(kind: &str, m: &ObjectMeta) -> String {
    object_key(
        kind,
        m.namespace.as_deref(),
        m.name.as_deref().unwrap_or(""),
    )
}

/// The one wording of the "first definition wins" report, wherever a redefinition is found.
pub(super) fn duplicate_reason(key: &str, first_file: &Path, first_line: usize) -> String {
    format!(
        "duplicate {key}, first defined at {}:{first_line}",
        first_file.display()
    )
}

/// What one file held, as parsed, and where each object was defined.
#[derive(Default)]
pub(super) struct FileLoad {
    pub snapshot: Snapshot,
    /// Object key -> line of its definition.
    pub lines: HashMap<String, usize>,
    /// The file exists but could not be read (permissions, I/O): its objects are unknown,
    /// not gone.
    pub unreadable: bool,
}

/// Parses one manifest file; a file that vanished reads as empty.
pub(super) fn parse_file(file: &Path) -> FileLoad {
    let mut loader = Loader::default();
    loader.load_file(file);
    FileLoad {
        lines: loader.seen,
        snapshot: loader.snapshot,
        unreadable: loader.unreadable,
    }
}

/// The manifest files directly in `dir`, sorted: read_dir order is whatever the filesystem
/// keeps, and duplicates must resolve the same way on every node and every reload.
pub(super) fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let read_err = |source| SourceError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        match name.to_str() {
            Some(name) if is_manifest_name(name) => files.push(entry.path()),
            _ => debug!(file = %entry.path().display(), "skipping non-manifest file"),
        }
    }
    files.sort();
    Ok(files)
}

/// Reads every manifest file directly in `dir`. Only failing to list `dir` is an error;
/// problems inside files end up in [`Snapshot::errors`].
pub fn load_dir(dir: &Path) -> Result<Snapshot, SourceError> {
    let mut out = Snapshot::default();
    let mut first: HashMap<String, (PathBuf, usize)> = HashMap::new();
    for file in manifest_files(dir)? {
        merge(&mut out, &mut first, &file, &parse_file(&file));
    }
    Ok(out)
}

/// Adds one file's objects to `out`; an object already defined by an earlier file is a
/// duplicate, reported where it is redefined.
fn merge(
    out: &mut Snapshot,
    first: &mut HashMap<String, (PathBuf, usize)>,
    file: &Path,
    load: &FileLoad,
) {
    out.errors.extend(load.snapshot.errors.iter().cloned());
    let mut admit = |key: String, out: &mut Snapshot| -> bool {
        let line = load.lines.get(&key).copied().unwrap_or(1);
        if let Some((first_file, first_line)) = first.get(&key) {
            out.errors.push(ManifestError {
                file: file.to_owned(),
                line: Some(line),
                reason: duplicate_reason(&key, first_file, *first_line),
            });
            return false;
        }
        if let Some(v) = load.snapshot.versions.get(&key) {
            out.versions.insert(key.clone(), v.clone());
        }
        first.insert(key, (file.to_owned(), line));
        true
    };
    for ns in &load.snapshot.namespaces {
        if admit(meta_key("Namespace", &ns.metadata), out) {
            out.namespaces.push(ns.clone());
        }
    }
    for pod in &load.snapshot.pods {
        if admit(meta_key("Pod", &pod.metadata), out) {
            out.pods.push(pod.clone());
        }
    }
    for np in &load.snapshot.policies {
        if admit(meta_key("NetworkPolicy", &np.metadata), out) {
            out.policies.push(np.clone());
        }
    }
}

/// Editors leave swap, backup and probe files next to the real ones (vim: `.x.swp`,
/// `x~`, `4913`; emacs: `.#x`, `#x#`); none of them ends in a manifest extension or all
/// of them are hidden. ConfigMap volumes keep their real data under hidden `..data`.
pub(super) fn is_manifest_name(name: &str) -> bool {
    !name.starts_with('.')
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.len() > ext.len() && name.ends_with(ext))
}

#[derive(Default)]
struct Loader {
    snapshot: Snapshot,
    unreadable: bool,
    /// key -> line of its first definition in the file, for the duplicate report (a
    /// loader reads one file).
    seen: HashMap<String, usize>,
}

/// Where a document or list item came from, for error reports.
struct Origin<'a> {
    file: &'a Path,
    /// First line of the document.
    line: usize,
    /// `items[3]` inside a List; `None` for a top-level document.
    item: Option<usize>,
    /// Lines of the file before the document: serde_yaml counts from the document's start.
    offset: usize,
}

impl Origin<'_> {
    fn prefix(&self, reason: impl fmt::Display) -> String {
        match self.item {
            Some(i) => format!("items[{i}]: {reason}"),
            None => reason.to_string(),
        }
    }
}

/// Decodes an object from its document's text when there is one, so serde_yaml reports
/// the line of the offending field; list items only exist as values.
fn decode<K: DeserializeOwned>(value: Value, text: Option<&str>) -> Result<K, serde_yaml::Error> {
    match text {
        Some(text) => serde_yaml::from_str(text),
        None => serde_yaml::from_value(value),
    }
}

/// The three kinds the agent consumes, so one code path admits all of them.
trait Manifest: Resource + Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned {
    const NAMESPACED: bool;
    fn apply_defaults(&mut self) {}
    fn push(self, snapshot: &mut Snapshot);
}

impl Manifest for Namespace {
    const NAMESPACED: bool = false;
    fn apply_defaults(&mut self) {
        if let Some(name) = self.metadata.name.clone() {
            self.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(NAMESPACE_NAME_LABEL.to_owned(), name);
        }
    }
    fn push(self, snapshot: &mut Snapshot) {
        snapshot.namespaces.push(self);
    }
}

impl Manifest for Pod {
    const NAMESPACED: bool = true;
    fn push(self, snapshot: &mut Snapshot) {
        snapshot.pods.push(self);
    }
}

impl Manifest for NetworkPolicy {
    const NAMESPACED: bool = true;
    fn push(self, snapshot: &mut Snapshot) {
        snapshot.policies.push(self);
    }
}

impl Loader {
    fn error(&mut self, file: &Path, line: Option<usize>, reason: String) {
        self.snapshot.errors.push(ManifestError {
            file: file.to_owned(),
            line,
            reason,
        });
    }

    fn load_file(&mut self, file: &Path) {
        let text = match fs::read_to_string(file) {
            Ok(text) => text,
            // Deleted between listing and reading: the watcher reports that deletion, and
            // the next load sees the directory without it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            // A directory that happens to be named `x.yaml`: not a manifest file.
            Err(e) if e.kind() == io::ErrorKind::IsADirectory => return,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return self.error(file, None, "not valid UTF-8".to_owned())
            }
            Err(e) => {
                self.unreadable = true;
                return self.error(file, None, format!("cannot read: {e}"));
            }
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        for (start, doc) in split_documents(text) {
            if let Some(content) = first_content_line(doc) {
                self.load_document(file, start, start + content, doc);
            }
        }
    }

    /// `start` is the document's first line in the file, `line` its first content line.
    fn load_document(&mut self, file: &Path, start: usize, line: usize, doc: &str) {
        // Each document parses on its own (a syntax error in one cannot hide the documents
        // after it); serde_yaml's lines are shifted by the lines before it. Padding the text
        // instead would make reading a file quadratic in its number of documents.
        let offset = start - 1;
        let value: Value = match serde_yaml::from_str(doc) {
            Ok(value) => value,
            Err(e) => {
                let (at, reason) = split_location(&e);
                let reason = shift_lines(&reason, offset);
                return self.error(file, Some(at.map_or(line, |l| l + offset)), reason);
            }
        };
        let origin = Origin {
            file,
            line,
            item: None,
            offset,
        };
        self.load_value(&origin, value, Some(doc));
    }

    fn load_value(&mut self, origin: &Origin<'_>, value: Value, text: Option<&str>) {
        if value.is_null() {
            return;
        }
        if !value.is_mapping() {
            let reason = origin.prefix("not an object");
            return self.error(origin.file, Some(origin.line), reason);
        }
        let Some(kind) = value.get("kind").and_then(Value::as_str) else {
            let reason = origin.prefix("missing kind");
            return self.error(origin.file, Some(origin.line), reason);
        };
        let api_version = value.get("apiVersion").and_then(Value::as_str);
        if origin.item.is_none() && kind.ends_with("List") && value.get("items").is_some() {
            return self.load_list(origin.file, origin.line, &value);
        }
        // A missing apiVersion still selects the kind, so the user hears about the
        // missing field instead of having the object silently ignored; another
        // apiVersion is another API (Calico's NetworkPolicy, say) and is not ours.
        let is = |k: &str, v: &str| kind == k && api_version.is_none_or(|a| a == v);
        if is(Namespace::KIND, Namespace::API_VERSION) {
            self.admit::<Namespace>(origin, value, text);
        } else if is(Pod::KIND, Pod::API_VERSION) {
            self.admit::<Pod>(origin, value, text);
        } else if is(NetworkPolicy::KIND, NetworkPolicy::API_VERSION) {
            self.admit::<NetworkPolicy>(origin, value, text);
        } else {
            debug!(
                file = %origin.file.display(),
                line = origin.line,
                kind,
                api_version,
                "ignoring object of a kind the agent does not use"
            );
        }
    }

    /// `kind: List` as `kubectl get -o yaml` writes it, and typed lists (`PodList`) as the
    /// API server returns them, whose items carry no kind or apiVersion of their own.
    fn load_list(&mut self, file: &Path, line: usize, list: &Value) {
        let Some(items) = list.get("items").and_then(Value::as_sequence) else {
            return self.error(file, Some(line), "items is not a list".to_owned());
        };
        let kind = list.get("kind").and_then(Value::as_str).unwrap_or("List");
        let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
        let api_version = list.get("apiVersion").cloned();
        for (i, item) in items.iter().enumerate() {
            let mut item = item.clone();
            if let (Some(item_kind), Value::Mapping(map)) = (item_kind, &mut item) {
                map.entry("kind".into()).or_insert_with(|| item_kind.into());
                if let Some(api_version) = &api_version {
                    map.entry("apiVersion".into())
                        .or_insert_with(|| api_version.clone());
                }
            }
            let origin = Origin {
                file,
                line,
                item: Some(i),
                offset: 0,
            };
            self.load_value(&origin, item, None);
        }
    }

    fn admit<K: Manifest>(&mut self, origin: &Origin<'_>, value: Value, text: Option<&str>) {
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty());
        let Some(name) = name.map(str::to_owned) else {
            let reason = origin.prefix(format!("{} without metadata.name", K::KIND));
            return self.error(origin.file, Some(origin.line), reason);
        };
        let mut obj: K = match decode(value, text) {
            Ok(obj) => obj,
            Err(e) => {
                let (at, reason) = split_location(&e);
                let reason = origin.prefix(format!("{} {name}: {reason}", K::KIND));
                let reason = shift_lines(&reason, origin.offset);
                let at = at.map_or(origin.line, |l| l + origin.offset);
                return self.error(origin.file, Some(at), reason);
            }
        };
        let meta = obj.metadata_mut();
        let ns = if K::NAMESPACED {
            let ns = meta.namespace.get_or_insert_with(String::new);
            if ns.is_empty() {
                DEFAULT_NAMESPACE.clone_into(ns);
            }
            Some(ns.clone())
        } else {
            None
        };
        let key = object_key(K::KIND, ns.as_deref(), &name);
        if let Some(&first_line) = self.seen.get(&key) {
            let reason = origin.prefix(duplicate_reason(&key, origin.file, first_line));
            return self.error(origin.file, Some(origin.line), reason);
        }
        obj.apply_defaults();
        let version = obj
            .metadata()
            .resource_version
            .clone()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| content_hash(&obj));
        self.seen.insert(key.clone(), origin.line);
        self.snapshot.versions.insert(key, version);
        obj.push(&mut self.snapshot);
    }
}

/// Splits YAML text into `(first line, text)` per document. `---` at the start of a line
/// opens a document and `...` closes one; YAML forbids both inside content, so no parse is
/// needed to find them.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let line_no = i + 1;
        if is_marker(line, "---") && offset > start {
            docs.push((start_line, &text[start..offset]));
            (start, start_line) = (offset, line_no);
        }
        offset += line.len();
        if is_marker(line, "...") {
            docs.push((start_line, &text[start..offset]));
            (start, start_line) = (offset, line_no + 1);
        }
    }
    if offset > start {
        docs.push((start_line, &text[start..]));
    }
    docs
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

/// Index of the document's first line holding anything but markers, directives and
/// comments: the line reported for the document as a whole. `None` for a document with
/// no content (a file ending in `---`, or made of comments), which is not an error.
fn first_content_line(doc: &str) -> Option<usize> {
    doc.lines().position(|line| {
        let line = ["---", "..."]
            .iter()
            .find_map(|m| line.strip_prefix(m).filter(|_| is_marker(line, m)))
            .unwrap_or(line)
            .trim();
        !(line.is_empty() || line.starts_with('#') || line.starts_with('%'))
    })
}

/// serde_yaml's message without the `at line L column C` that the report already
/// carries as its line.
/// Makes the document-relative `line N` mentions in a serde_yaml message file lines.
fn shift_lines(message: &str, offset: usize) -> String {
    if offset == 0 {
        return message.to_owned();
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("line ") {
        let (head, tail) = rest.split_at(i + "line ".len());
        out.push_str(head);
        let digits = tail.chars().take_while(char::is_ascii_digit).count();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

fn split_location(e: &serde_yaml::Error) -> (Option<usize>, String) {
    let message = e.to_string();
    let Some(loc) = e.location() else {
        return (None, message);
    };
    let suffix = format!(" at line {} column {}", loc.line(), loc.column());
    let message = message.replacen(&suffix, &format!(" (column {})", loc.column()), 1);
    (Some(loc.line()), message)
}

/// 64-bit FNV-1a of the object's JSON: stable across runs and Rust versions (unlike
/// `DefaultHasher`), and k8s-openapi serializes deterministically (fields in declaration
/// order, maps sorted), so equal content gives equal versions.
fn content_hash<T: Serialize>(obj: &T) -> String {
    let bytes = serde_json::to_vec(obj).unwrap_or_default();
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Follows a manifest directory and says which files are worth reading again.
///
/// The directory itself is watched (not its files), so files created later, atomic
/// saves (write a temp file, rename it over) and ConfigMap volume updates (a swap of the
/// hidden `..data` symlink) are all seen. An event on a manifest file names that file; any
/// other event (the `..data` swap, a watch overflow) asks for every file to be checked.
pub struct DirWatcher {
    dir: PathBuf,
    shared: Arc<Shared>,
    /// Generation of the last burst `changed()` returned for.
    seen: u64,
    // Dropping it stops the inotify thread.
    _watcher: RecommendedWatcher,
}

/// Which files a burst of events touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Check every file (stamps tell which really changed).
    All,
    /// These manifest files (created, written, renamed or removed).
    Files(BTreeSet<PathBuf>),
}

#[derive(Default)]
struct Pending {
    /// Bumped for every relevant event. A counter, not a flag: `changed()` compares it
    /// with what it saw, so an event racing with the end of a burst, or one arriving
    /// while `changed()` is not being polled, is still reported next time.
    generation: u64,
    files: BTreeSet<PathBuf>,
    all: bool,
    /// Files written since their last close: a writer may still be mid-file.
    writing: BTreeSet<PathBuf>,
}

struct Shared {
    pending: std::sync::Mutex<Pending>,
    /// Stores a permit when nobody waits, so a wake-up is never lost.
    notify: Notify,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // The inotify callback cannot panic while holding it; recover the data anyway.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn generation(&self) -> u64 {
        self.pending().generation
    }

    fn record(&self, res: notify::Result<notify::Event>) {
        let mut p = self.pending();
        match res {
            Ok(event) if is_read(&event.kind) => return,
            Ok(event) => {
                let manifests: Vec<&PathBuf> = event
                    .paths
                    .iter()
                    .filter(|path| {
                        path.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(is_manifest_name)
                    })
                    .collect();
                // Editors' swap and temp files are skipped: their rename into place is an
                // event on the manifest itself. Anything else (the `..data` swap of a
                // ConfigMap volume, the directory itself) may change every file.
                let other = event.paths.iter().any(|path| {
                    path.file_name()
                        .and_then(|n| n.to_str())
                        .is_none_or(|n| !is_manifest_name(n) && !is_editor_temp(n))
                });
                if other || event.paths.is_empty() || event.need_rescan() {
                    p.all = true;
                }
                for path in manifests {
                    match event.kind {
                        EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_)) => {
                            p.writing.insert(path.clone());
                        }
                        EventKind::Access(AccessKind::Close(AccessMode::Write))
                        | EventKind::Remove(_)
                        | EventKind::Modify(ModifyKind::Name(_)) => {
                            p.writing.remove(path);
                        }
                        _ => {}
                    }
                    p.files.insert(path.clone());
                }
            }
            // Queue overflow and the like: the only safe answer is a full check.
            Err(e) => {
                warn!(error = %e, "manifest directory watch error");
                p.all = true;
            }
        }
        p.generation += 1;
        drop(p);
        self.notify.notify_one();
    }
}

impl fmt::Debug for DirWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirWatcher")
            .field("dir", &self.dir)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl DirWatcher {
    /// Starts watching; changes from this point on are reported. Load the directory after
    /// creating the watcher, not before, or a change in between goes unnoticed.
    pub fn new(dir: &Path) -> Result<Self, SourceError> {
        let watch_err = |source| SourceError::Watch {
            dir: dir.to_owned(),
            source,
        };
        let shared = Arc::new(Shared {
            pending: Default::default(),
            notify: Notify::new(),
        });
        let events = Arc::clone(&shared);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            events.record(res)
        })
        .map_err(watch_err)?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(watch_err)?;
        Ok(Self {
            dir: dir.to_owned(),
            shared,
            seen: 0,
            _watcher: watcher,
        })
    }

    /// Resolves once the directory has changed since the previous call returned (or since
    /// `new`) and the burst is over: quiet for [`SETTLE`] when every written file has been
    /// closed or renamed into place, for [`DEBOUNCE`] while a writer may still be mid-file.
    /// Cancel-safe: dropping the future mid-burst leaves the change pending for the next
    /// call.
    pub async fn changed(&mut self) -> Changed {
        let shared = &*self.shared;
        while shared.generation() == self.seen {
            shared.notify.notified().await;
        }
        let deadline = tokio::time::Instant::now() + MAX_BURST;
        loop {
            let (generation, writing) = {
                let p = shared.pending();
                (p.generation, !p.writing.is_empty())
            };
            let quiet = if writing { DEBOUNCE } else { SETTLE };
            let quiet_until = (tokio::time::Instant::now() + quiet).min(deadline);
            let woke = tokio::time::timeout_at(quiet_until, shared.notify.notified()).await;
            let mut p = shared.pending();
            // A permit can be left over from an event already counted, so quiet means
            // "no new generation", not "no wake-up".
            if (woke.is_err() && p.generation == generation)
                || tokio::time::Instant::now() >= deadline
            {
                self.seen = p.generation;
                let files = std::mem::take(&mut p.files);
                return if std::mem::take(&mut p.all) {
                    Changed::All
                } else {
                    Changed::Files(files)
                };
            }
        }
    }
}

/// Swap, backup and temp files of editors and atomic writers (`.x.yaml.swp`, `.x.tmp`,
/// `x.yaml~`); not the `..data` links of a ConfigMap volume.
fn is_editor_temp(name: &str) -> bool {
    (name.starts_with('.') && !name.starts_with("..")) || name.ends_with('~')
}

/// Our own reads of the manifests show up as open/close-nowrite events; counting them
/// would make every reload trigger the next one.
fn is_read(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::time::timeout;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "palisade-source-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }

        fn write(&self, name: &str, content: &str) {
            fs::write(self.0.join(name), content).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const MULTI_DOC: &str = r#"# a comment before the first document
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    team: web
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  nodeName: node-a
  containers:
  - name: nginx
    image: nginx
    ports:
    - name: http
      containerPort: 80
      protocol: TCP
status:
  podIP: 10.0.0.5
  podIPs:
  - ip: 10.0.0.5
  - ip: fd00::5
---
apiVersion: v1
kind: Pod
metadata:
  name: db
spec:
  nodeName: node-b
  containers:
  - name: pg
    image: postgres
    ports:
    - name: pg
      containerPort: 5432
status:
  podIP: 10.0.0.6
  podIPs:
  - ip: 10.0.0.6
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-ingress
  namespace: shop
spec:
  podSelector:
    matchLabels: {app: web}
  policyTypes: [Ingress]
  ingress:
  - ports:
    - port: http
---
"#;

    fn pod<'a>(snap: &'a Snapshot, name: &str) -> &'a Pod {
        snap.pods
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("pod {name} missing from {snap:#?}"))
    }

    #[test]
    fn multi_document_yaml_with_defaults() {
        let dir = TempDir::new();
        dir.write("cluster.yaml", MULTI_DOC);
        let snap = load_dir(dir.path()).unwrap();
        assert_eq!(snap.errors, vec![]);
        assert_eq!(snap.namespaces.len(), 1);
        assert_eq!(snap.pods.len(), 2);
        assert_eq!(snap.policies.len(), 1);

        let labels = snap.namespaces[0].metadata.labels.as_ref().unwrap();
        assert_eq!(labels["kubernetes.io/metadata.name"], "shop");
        assert_eq!(labels["team"], "web");

        let web = pod(&snap, "web");
        assert_eq!(web.metadata.namespace.as_deref(), Some("shop"));
        let spec = web.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        let port = &spec.containers[0].ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("http"), 80)
        );
        let status = web.status.as_ref().unwrap();
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.5"));
        let ips: Vec<_> = status
            .pod_ips
            .iter()
            .flatten()
            .map(|ip| ip.ip.as_str())
            .collect();
        assert_eq!(ips, ["10.0.0.5", "fd00::5"]);

        let db = pod(&snap, "db");
        assert_eq!(db.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(
            db.spec.as_ref().unwrap().containers[0]
                .ports
                .as_ref()
                .unwrap()[0]
                .name
                .as_deref(),
            Some("pg")
        );

        assert_eq!(snap.policies[0].metadata.namespace.as_deref(), Some("shop"));
        let keys: Vec<_> = snap.versions.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "Namespace/shop",
                "NetworkPolicy/shop/web-ingress",
                "Pod/default/db",
                "Pod/shop/web",
            ]
        );
    }

    #[test]
    fn list_and_json_files() {
        let dir = TempDir::new();
        dir.write(
            "list.yml",
            r#"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: prod}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: deny-all}
  spec: {podSelector: {}}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: ignored}
"#,
        );
        dir.write(
            "pod.json",
            r#"{
	"apiVersion": "v1",
	"kind": "Pod",
	"metadata": {"name": "api", "namespace": "prod"},
	"spec": {"containers": [{"name": "api", "image": "api",
		"ports": [{"name": "grpc", "containerPort": 9090}]}]},
	"status": {"podIP": "10.1.0.1", "podIPs": [{"ip": "10.1.0.1"}]}
}"#,
        );
        // API-server style typed list: items carry no kind or apiVersion.
        dir.write(
            "pods.json",
            r#"{"apiVersion": "v1", "kind": "PodList", "metadata": {},
                "items": [{"metadata": {"name": "worker"}, "spec": {"containers": []}}]}"#,
        );
        let snap = load_dir(dir.path()).unwrap();
        assert_eq!(snap.errors, vec![]);
        let keys: Vec<_> = snap.versions.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "Namespace/prod",
                "NetworkPolicy/default/deny-all",
                "Pod/default/worker",
                "Pod/prod/api",
            ]
        );
        let api = pod(&snap, "api");
        assert_eq!(
            api.status.as_ref().unwrap().pod_ip.as_deref(),
            Some("10.1.0.1")
        );
        let port = &api.spec.as_ref().unwrap().containers[0]
            .ports
            .as_ref()
            .unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("grpc"), 9090)
        );
    }

    #[test]
    fn broken_file_is_reported_and_other_objects_stay() {
        let dir = TempDir::new();
        dir.write("a-good.yaml", MULTI_DOC);
        // Line 4 has a syntax error (a mapping where a scalar value goes).
        dir.write(
            "b-syntax.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web: x\n",
        );
        // Second document (starting at line 5) has a type error at line 12; the first
        // and third documents are fine and must stay.
        dir.write(
            "c-mixed.yaml",
            r#"apiVersion: v1
kind: Namespace
metadata: {name: ok-ns}
---
apiVersion: v1
kind: Pod
metadata:
  name: bad-port
spec:
  containers:
  - name: c
    ports: [{containerPort: eighty}]
---
apiVersion: v1
kind: Pod
metadata: {namespace: x}
"#,
        );
        let snap = load_dir(dir.path()).unwrap();
        assert_eq!(snap.pods.len(), 2, "{:#?}", snap.errors);
        assert_eq!(snap.policies.len(), 1);
        assert_eq!(snap.namespaces.len(), 2);
        assert!(snap.versions.contains_key("Namespace/ok-ns"));

        assert_eq!(snap.errors.len(), 3, "{:#?}", snap.errors);
        let syntax = &snap.errors[0];
        assert!(syntax.file.ends_with("b-syntax.yaml"));
        assert_eq!(syntax.line, Some(4), "{syntax}");

        let typed = &snap.errors[1];
        assert!(typed.file.ends_with("c-mixed.yaml"));
        assert_eq!(typed.line, Some(12), "{typed}");
        assert!(typed.reason.contains("bad-port"), "{typed}");
        assert!(typed.reason.contains("containerPort"), "{typed}");
        let shown = typed.to_string();
        assert!(shown.contains("c-mixed.yaml:12: "), "{shown}");
        assert!(!shown.contains("at line"), "{shown}");

        let unnamed = &snap.errors[2];
        assert_eq!(unnamed.line, Some(14), "{unnamed}");
        assert!(unnamed.reason.contains("metadata.name"), "{unnamed}");
    }

    #[test]
    fn syntax_error_in_one_document_spares_the_next() {
        let dir = TempDir::new();
        dir.write(
            "docs.yaml",
            "kind: Unknown\n...\n--- # empty document\n---\napiVersion: v1\nkind: Namespace\n\
             metadata:\n  name: a: b\n--- {apiVersion: v1, kind: Namespace, metadata: {name: z}}\n",
        );
        let snap = load_dir(dir.path()).unwrap();
        assert_eq!(snap.errors.len(), 1, "{:#?}", snap.errors);
        assert_eq!(snap.errors[0].line, Some(8), "{}", snap.errors[0]);
        let keys: Vec<_> = snap.versions.keys().map(String::as_str).collect();
        assert_eq!(keys, ["Namespace/z"]);
    }

    #[test]
    fn duplicates_keep_the_first_by_file_name() {
        let dir = TempDir::new();
        let pod = |image: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\n\
                 spec: {{containers: [{{name: c, image: {image}}}]}}\n"
            )
        };
        dir.write("b.yaml", &pod("second"));
        dir.write("a.yaml", &pod("first"));
        let snap = load_dir(dir.path()).unwrap();
        assert_eq!(snap.pods.len(), 1);
        let image = &snap.pods[0].spec.as_ref().unwrap().containers[0].image;
        assert_eq!(image.as_deref(), Some("first"));
        assert_eq!(snap.errors.len(), 1);
        assert!(snap.errors[0].file.ends_with("b.yaml"));
        assert!(
            snap.errors[0].reason.contains("duplicate Pod/default/p"),
            "{}",
            snap.errors[0]
        );
    }

    #[test]
    fn versions_use_resource_version_or_content_hash() {
        let dir = TempDir::new();
        dir.write(
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, resourceVersion: \"42\"}\n",
        );
        let policy = |port: u16| {
            format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{name: np}}\nspec:\n  podSelector: {{}}\n  \
                 ingress: [{{ports: [{{port: {port}}}]}}]\n"
            )
        };
        dir.write("np.yaml", &policy(80));
        let first = load_dir(dir.path()).unwrap();
        assert_eq!(first.versions["Namespace/a"], "42");
        let hash = &first.versions["NetworkPolicy/default/np"];
        assert_eq!(hash.len(), 16);

        // Same content, different formatting: same version.
        dir.write(
            "np.yaml",
            &format!("# reformatted\n{}", policy(80).replace("{}", "{ }")),
        );
        let again = load_dir(dir.path()).unwrap();
        assert_eq!(&again.versions["NetworkPolicy/default/np"], hash);

        dir.write("np.yaml", &policy(443));
        let changed = load_dir(dir.path()).unwrap();
        assert_ne!(&changed.versions["NetworkPolicy/default/np"], hash);
        assert_eq!(changed.versions["Namespace/a"], "42");
    }

    #[test]
    fn skips_other_kinds_and_non_manifest_files() {
        let dir = TempDir::new();
        let ns =
            |name: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
        dir.write("real.yaml", &ns("real"));
        for junk in [
            ".real.yaml.swp",
            "real.yaml~",
            "4913",
            ".hidden.yaml",
            "notes.txt",
        ] {
            dir.write(junk, &ns("junk"));
        }
        fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        fs::create_dir(dir.path().join("nested")).unwrap();
        fs::write(dir.path().join("nested/inner.yaml"), ns("nested")).unwrap();
        dir.write(
            "other.yaml",
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: c}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n---\n# only a comment\n",
        );
        dir.write("empty.yaml", "");
        let snap = load_dir(dir.path()).unwrap();
        assert_eq!(snap.errors, vec![]);
        let keys: Vec<_> = snap.versions.keys().map(String::as_str).collect();
        assert_eq!(keys, ["Namespace/real"]);
    }

    #[test]
    fn unreadable_directory_is_an_error() {
        let dir = TempDir::new();
        let missing = dir.path().join("missing");
        let err = load_dir(&missing).unwrap_err();
        assert!(matches!(err, SourceError::ReadDir { .. }), "{err}");
        assert!(DirWatcher::new(&missing).is_err());
    }

    #[test]
    fn object_keys() {
        assert_eq!(object_key("Pod", Some("ns"), "p"), "Pod/ns/p");
        assert_eq!(object_key("Namespace", None, "ns"), "Namespace/ns");
    }

    const WAIT: Duration = Duration::from_secs(5);

    /// Absorbs the tail of the previous step's events, so the next wake-up can only come
    /// from the next step.
    async fn drain(watcher: &mut DirWatcher) {
        while timeout(Duration::from_millis(200), watcher.changed())
            .await
            .is_ok()
        {}
    }

    async fn expect_change(watcher: &mut DirWatcher, step: &str) -> Changed {
        timeout(WAIT, watcher.changed())
            .await
            .unwrap_or_else(|_| panic!("no change reported after {step}"))
    }

    fn only(dir: &TempDir, name: &str) -> Changed {
        Changed::Files([dir.path().join(name)].into())
    }

    fn pod_names(dir: &TempDir) -> Vec<String> {
        let snap = load_dir(dir.path()).unwrap();
        assert_eq!(snap.errors, vec![]);
        snap.pods
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect()
    }

    fn pod_yaml(name: &str) -> String {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\n")
    }

    #[tokio::test]
    async fn watcher_reports_create_modify_delete_and_atomic_save() {
        let dir = TempDir::new();
        let mut watcher = DirWatcher::new(dir.path()).unwrap();

        // Each change is made before `changed()` is polled: the watcher must remember it.
        dir.write("a.yaml", &pod_yaml("one"));
        assert_eq!(
            expect_change(&mut watcher, "create").await,
            only(&dir, "a.yaml")
        );
        assert_eq!(pod_names(&dir), ["one"]);
        drain(&mut watcher).await;

        dir.write("a.yaml", &pod_yaml("two"));
        assert_eq!(
            expect_change(&mut watcher, "modify").await,
            only(&dir, "a.yaml")
        );
        assert_eq!(pod_names(&dir), ["two"]);
        drain(&mut watcher).await;

        // Editors' atomic save: write a hidden temp file, rename it over the target. The
        // temp file alone is not a change worth a read.
        dir.write(".a.yaml.tmp", &pod_yaml("three"));
        fs::rename(dir.path().join(".a.yaml.tmp"), dir.path().join("a.yaml")).unwrap();
        assert_eq!(
            expect_change(&mut watcher, "rename into place").await,
            only(&dir, "a.yaml")
        );
        assert_eq!(pod_names(&dir), ["three"]);
        drain(&mut watcher).await;

        fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert_eq!(
            expect_change(&mut watcher, "delete").await,
            only(&dir, "a.yaml")
        );
        assert!(pod_names(&dir).is_empty());
        drain(&mut watcher).await;

        // A ConfigMap volume swaps its hidden `..data` link: every file may have changed.
        std::os::unix::fs::symlink("nowhere", dir.path().join("..data_tmp")).unwrap();
        fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert_eq!(
            expect_change(&mut watcher, "..data swap").await,
            Changed::All
        );
    }

    #[tokio::test]
    async fn watcher_ignores_its_own_reads_and_survives_cancellation() {
        let dir = TempDir::new();
        dir.write("a.yaml", &pod_yaml("one"));
        let mut watcher = DirWatcher::new(dir.path()).unwrap();

        // Reading the directory opens files; that must not look like a change.
        assert_eq!(pod_names(&dir), ["one"]);
        assert!(
            timeout(Duration::from_millis(300), watcher.changed())
                .await
                .is_err(),
            "a read was reported as a change"
        );

        // A caller that gives up on `changed()` mid-burst (a `select!` branch losing to
        // shutdown) must still get the change on its next call. Wait until the event has
        // been counted and its wake-up consumed, so the single poll below is in the
        // debounce phase when it is dropped.
        dir.write("b.yaml", &pod_yaml("two"));
        timeout(WAIT, async {
            while watcher.shared.generation() == watcher.seen {
                watcher.shared.notify.notified().await;
            }
        })
        .await
        .expect("event for b.yaml");
        {
            let fut = watcher.changed();
            tokio::pin!(fut);
            assert!(poll_once(fut.as_mut()).await.is_none());
        }
        expect_change(&mut watcher, "create after a cancelled wait").await;
    }

    /// Polls a future once, then drops it: a cancelled `select!` branch.
    async fn poll_once<F: std::future::Future + Unpin>(fut: F) -> Option<F::Output> {
        let mut fut = fut;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
