//! The Kubernetes API as a stream of [`Update`]s: one kube-runtime watcher per kind
//! (Namespaces, NetworkPolicies, Pods of every node: remote pods are policy peers), all
//! cluster-wide, with list+watch only.
//!
//! # What reaches the agent, and when
//!
//! * **First sync.** Nothing is sent until all three kinds have completed their first list;
//!   then everything goes in one [`Update::Changes`], followed by [`Update::Synced`]. An
//!   agent restarting over pinned state therefore never compiles pods without their
//!   policies (which would open them for a moment), and removes nothing before it knows
//!   the whole cluster.
//! * **Watching.** Each added, modified or deleted object is one change; an object seen
//!   again with the resourceVersion already sent is not re-sent. Bookmarks only move the
//!   resume point.
//! * **Errors** back off (kube-runtime's default: 0.8 s doubling to 30 s, each delay
//!   jittered up to twice itself) and the watch resumes from the last resourceVersion
//!   seen, so nothing is reprogrammed. An API server that is unreachable for minutes
//!   therefore costs about one request per kind per 30-60 s and changes nothing the agent
//!   enforces. Each kind's current problem is sent as [`Update::Errors`] (a 403 names the
//!   RBAC rule the agent lacks) and cleared when that kind delivers again, or when none
//!   of its requests has failed for [`PROBLEM_QUIET`] (a resumed watch of a kind that
//!   does not change delivers nothing).
//! * **Expired watch (410 Gone)**, as an event of an open watch or as the answer to the
//!   watch request. The kind is listed again; changed objects are sent and objects absent
//!   from the new list are deleted, both only once the list is complete.
//!
//! # Memory
//!
//! Objects are reduced to the fields the compiler reads ([`slim`]) as soon as they are
//! decoded, and this source keeps only key → resourceVersion per object (no reflector
//! store); lists are paged ([`PAGE_SIZE`]) so a 100k-pod cluster is never one response.

mod problem;
pub mod slim;
mod tracker;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client};
use palisade_policy::Change;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::manifests::meta_key;
use super::{ObjectChange, Update};
pub use problem::Access;
use problem::Problem;
use tracker::{Entry, Tracker};

/// Objects per list page (client-go's default): bounds the memory of a (re)list.
pub const PAGE_SIZE: u32 = 500;

/// How the agent reaches the API server.
#[derive(Clone)]
pub enum KubeConnection {
    /// In-cluster service account, or `KUBECONFIG` / `~/.kube/config` when present
    /// (kube's `Client::try_default`).
    Infer,
    /// These kubeconfig files (`:`-separated like `KUBECONFIG`, merged in order).
    Kubeconfig(PathBuf),
    /// A client built elsewhere (tests inject a mocked API server this way).
    Client(Client),
}

impl fmt::Debug for KubeConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Infer => f.write_str("Infer"),
            Self::Kubeconfig(p) => f.debug_tuple("Kubeconfig").field(p).finish(),
            Self::Client(_) => f.write_str("Client(..)"),
        }
    }
}

impl fmt::Display for KubeConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Infer => f.write_str("kubernetes"),
            Self::Kubeconfig(p) => write!(f, "kubernetes:{}", p.display()),
            Self::Client(_) => f.write_str("kubernetes:client"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes client configuration (neither in-cluster service account nor \
         KUBECONFIG/~/.kube/config)"
    )]
    Infer(#[source] kube::Error),
    #[error("cannot build a Kubernetes client from {}", path.display())]
    Client {
        path: PathBuf,
        #[source]
        source: kube::Error,
    },
}

/// Builds the client. Nothing is sent to the API server yet: problems reaching it show up
/// later as [`Update::Errors`].
pub async fn connect(conn: &KubeConnection) -> Result<Client, ConnectError> {
    use kube::config::{Config, KubeConfigOptions, Kubeconfig};
    let path = match conn {
        KubeConnection::Client(c) => return Ok(c.clone()),
        KubeConnection::Infer => return Client::try_default().await.map_err(ConnectError::Infer),
        KubeConnection::Kubeconfig(p) => p,
    };
    let kubeconfig_err = |source| ConnectError::Kubeconfig {
        path: path.clone(),
        source,
    };
    let mut merged: Option<Kubeconfig> = None;
    for file in std::env::split_paths(path).filter(|p| !p.as_os_str().is_empty()) {
        let next = Kubeconfig::read_from(&file).map_err(kubeconfig_err)?;
        merged = Some(match merged {
            Some(m) => m.merge(next).map_err(kubeconfig_err)?,
            None => next,
        });
    }
    // `KUBECONFIG=` (empty) names no file: same as not setting it.
    let Some(kubeconfig) = merged else {
        return Client::try_default().await.map_err(ConnectError::Infer);
    };
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig_err)?;
    Client::try_from(config).map_err(|source| ConnectError::Client {
        path: path.clone(),
        source,
    })
}

/// Starts watching the cluster through `client`. The task ends when the receiver is
/// dropped. Must be called within a tokio runtime.
pub fn spawn_kube(client: Client) -> mpsc::Receiver<Update> {
    let (tx, rx) = mpsc::channel(16);
    let events = stream::select_all([
        watch::<Namespace>(Kind::Namespace, client.clone()),
        watch::<NetworkPolicy>(Kind::NetworkPolicy, client.clone()),
        watch::<Pod>(Kind::Pod, client),
    ]);
    tokio::spawn(run(events, tx));
    rx
}

/// The kinds, in the order their first-sync changes are sent (namespaces first, so
/// policies and pods arrive with their namespace's labels known).
#[derive(Clone, Copy, Debug)]
enum Kind {
    Namespace = 0,
    NetworkPolicy = 1,
    Pod = 2,
}
const KINDS: usize = 3;

/// A kind the agent watches.
trait Watched:
    kube::Resource<DynamicType = ()>
    + k8s_openapi::Resource
    + k8s_openapi::Metadata<Ty = ObjectMeta>
    + Clone
    + serde::de::DeserializeOwned
    + fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// Reduces the object to what the compiler reads and wraps it in its upsert.
    fn upsert(self) -> Change;
}

impl Watched for Namespace {
    fn upsert(self) -> Change {
        Change::UpsertNamespace(Box::new(slim::namespace(self)))
    }
}
impl Watched for NetworkPolicy {
    fn upsert(self) -> Change {
        Change::UpsertPolicy(Box::new(slim::policy(self)))
    }
}
impl Watched for Pod {
    fn upsert(self) -> Change {
        Change::UpsertPod(Box::new(slim::pod(self)))
    }
}

fn access<K: Watched>() -> Access {
    Access {
        group: <K as k8s_openapi::Resource>::GROUP,
        resource: <K as k8s_openapi::Resource>::URL_PATH_SEGMENT,
    }
}

fn entry<K: Watched>(obj: K) -> Entry {
    let m = obj.metadata();
    let key = meta_key(<K as k8s_openapi::Resource>::KIND, m);
    let version = m.resource_version.clone().unwrap_or_default();
    Entry {
        key,
        version,
        upsert: obj.upsert(),
    }
}

type KindEvent = (Kind, Result<Event<Entry>, Problem>);

fn watch<K: Watched>(kind: Kind, client: Client) -> BoxStream<'static, KindEvent> {
    let config = watcher::Config::default().page_size(PAGE_SIZE);
    relisting(Api::<K>::all(client), config)
        .default_backoff()
        .map(move |item| {
            let item = match item {
                Ok(event) => Ok(match event {
                    Event::Init => Event::Init,
                    Event::InitApply(o) => Event::InitApply(entry(o)),
                    Event::InitDone => Event::InitDone,
                    Event::Apply(o) => Event::Apply(entry(o)),
                    Event::Delete(o) => Event::Delete(entry(o)),
                }),
                Err(e) => Err(problem::describe(access::<K>(), &e)),
            };
            (kind, item)
        })
        .boxed()
}

/// kube-runtime's watcher, adjusted for what an API server back from an outage does.
///
/// * A watch *request* refused with 410 Gone (an API server that compacted past the
///   agent's resume point can answer so; client-go relists on it) starts a fresh watcher,
///   i.e. a full list. kube-runtime's watcher relists when the 410 arrives as an event of
///   an open watch, but retries a refused one from the same expired resourceVersion
///   forever: the agent would never see the cluster again.
/// * Any 410 resets the backoff (an `Init`, which the tracker reads as "a list starts",
///   goes out just before it): the API server answered, and the relist should follow in
///   about a second, not after the 30-60 s the outage's failures had built up. The
///   expiry itself still goes out as an error, so the shortest backoff (0.8 s) still
///   separates the lists of a server that expires every watch at once.
fn relisting<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
) -> impl futures::Stream<Item = watcher::Result<Event<K>>> + Send {
    type Inner<K> = BoxStream<'static, watcher::Result<Event<K>>>;
    type Item<K> = watcher::Result<Event<K>>;
    let state: (Option<Inner<K>>, Option<Item<K>>) = (None, None);
    stream::unfold(state, move |(inner, pending)| {
        let (api, config) = (api.clone(), config.clone());
        async move {
            if let Some(item) = pending {
                return Some((item, (inner, None)));
            }
            let mut inner = inner.unwrap_or_else(|| watcher::watcher(api, config).boxed());
            let item = inner.next().await?;
            let status = match &item {
                Err(watcher::Error::WatchStartFailed(kube::Error::Api(s))) => Some((s.code, true)),
                Err(watcher::Error::WatchError(s)) => Some((s.code, false)),
                _ => None,
            };
            Some(match status {
                Some((410, refused)) => {
                    let inner = (!refused).then_some(inner);
                    (Ok(Event::Init), (inner, Some(item)))
                }
                _ => (item, (Some(inner), None)),
            })
        }
    })
}

/// How long a kind must go without a failed request before its problem is cleared
/// although it delivered nothing: a watch that restarts successfully produces no event,
/// and a quiet kind (namespaces rarely change) would otherwise report an outage long
/// over. The watcher retries within 60 s of a failure (30 s backoff, jittered) and a
/// retry fails within kube's 30 s connect timeout, so silence this long means the
/// retry succeeded, or is hanging without an answer: an open watch that hangs looks like
/// a quiet one, which no client can tell apart.
pub const PROBLEM_QUIET: Duration = Duration::from_secs(120);

/// The kinds' events merged into updates; see the module docs for the rules.
#[derive(Default)]
struct Merger {
    trackers: [Tracker; KINDS],
    listed: [bool; KINDS],
    held: [Vec<ObjectChange>; KINDS],
    synced: bool,
    /// Each kind's current problem and when its request last failed.
    problems: [Option<(String, Instant)>; KINDS],
}

impl Merger {
    fn event(&mut self, kind: Kind, item: Result<Event<Entry>, Problem>, out: &mut Vec<Update>) {
        let k = kind as usize;
        let event = match item {
            Ok(event) => event,
            Err(p) if p.expired => {
                info!(kind = ?kind, reason = %p.message, "watch expired; listing again");
                return;
            }
            Err(p) => {
                warn!(kind = ?kind, error = %p.message, "kubernetes watch failed; backing off");
                self.problems[k] = Some((p.message, Instant::now()));
                return;
            }
        };
        // `Init` comes before the list request is made: it proves nothing yet.
        if !matches!(event, Event::Init) {
            self.problems[k] = None;
        }
        if matches!(event, Event::InitDone) {
            self.listed[k] = true;
        }
        let changes = self.trackers[k].handle(event);
        if self.synced {
            if !changes.is_empty() {
                out.push(Update::Changes(changes));
            }
            return;
        }
        self.held[k].extend(changes);
        if self.listed.iter().all(|&l| l) {
            self.synced = true;
            let all: Vec<ObjectChange> = self.held.iter_mut().flat_map(std::mem::take).collect();
            info!(
                namespaces = self.trackers[Kind::Namespace as usize].len(),
                network_policies = self.trackers[Kind::NetworkPolicy as usize].len(),
                pods = self.trackers[Kind::Pod as usize].len(),
                "kubernetes source: first list complete"
            );
            if !all.is_empty() {
                out.push(Update::Changes(all));
            }
            out.push(Update::Synced);
        }
    }

    /// When the oldest problem has been quiet for [`PROBLEM_QUIET`].
    fn next_quiet(&self) -> Option<Instant> {
        let oldest = self.problems.iter().flatten().map(|(_, at)| *at).min()?;
        Some(oldest + PROBLEM_QUIET)
    }

    fn clear_quiet(&mut self, now: Instant) {
        for p in &mut self.problems {
            if p.as_ref().is_some_and(|(_, at)| now >= *at + PROBLEM_QUIET) {
                *p = None;
            }
        }
    }

    fn problems(&self) -> Vec<String> {
        self.problems
            .iter()
            .flatten()
            .map(|(m, _)| m.clone())
            .collect()
    }
}

async fn run(mut events: impl futures::Stream<Item = KindEvent> + Unpin, tx: mpsc::Sender<Update>) {
    let mut merger = Merger::default();
    let mut sent_problems: Vec<String> = Vec::new();
    loop {
        let quiet_at = merger.next_quiet();
        let quiet = async move {
            match quiet_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let mut out = Vec::new();
        tokio::select! {
            next = events.next() => match next {
                Some((kind, item)) => merger.event(kind, item, &mut out),
                None => return,
            },
            _ = tx.closed() => return,
            _ = quiet => merger.clear_quiet(Instant::now()),
        }
        let current = merger.problems();
        if current != sent_problems {
            sent_problems = current.clone();
            out.push(Update::Errors(current));
        }
        for update in out {
            if tx.send(update).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
        contexts:\n- name: test\n  context: {cluster: c, user: u, namespace: palisade-test}\n\
        clusters:\n- name: c\n  cluster: {server: 'https://198.18.0.1:6443', insecure-skip-tls-verify: true}\n";
    const USER: &str = "apiVersion: v1\nkind: Config\nusers:\n- name: u\n  user: {token: abc}\n";

    #[tokio::test]
    async fn kubeconfig_files_are_merged_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, CLUSTER).unwrap();
        std::fs::write(&b, USER).unwrap();
        let both = std::env::join_paths([&a, &b]).unwrap();
        let client = connect(&KubeConnection::Kubeconfig(both.into()))
            .await
            .unwrap();
        assert_eq!(client.default_namespace(), "palisade-test");
    }

    #[tokio::test]
    async fn unreadable_kubeconfig_names_the_file() {
        let missing = PathBuf::from("/nonexistent/palisade/kubeconfig");
        let err = connect(&KubeConnection::Kubeconfig(missing))
            .await
            .err()
            .expect("connected without a kubeconfig");
        let msg = err.to_string();
        assert!(
            msg.starts_with("cannot read kubeconfig /nonexistent/palisade/kubeconfig"),
            "{msg}"
        );
    }
}
