//! A scripted Kubernetes API server behind a `kube::Client` (tower-test mock service).
//!
//! Every request is logged (for the RBAC check) and routed by resource, so a test scripts
//! each resource's conversation in order — list, next page, watch, ... — independently of
//! how the source interleaves the three watchers. Each expectation checks the method,
//! path and every query parameter of the request it answers.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc as fmpsc;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::client::Body;
use tokio::sync::mpsc;
use tower_test::mock;

type ResBody = UnsyncBoxBody<Bytes, Infallible>;
type Responder = mock::SendResponse<Response<ResBody>>;

/// How long (in the test's clock, paused or not) a step may wait for the source: more
/// than the watcher's longest backoff (30 s, jittered up to 60 s).
pub const STEP: Duration = Duration::from_secs(90);

/// Resources the agent is expected to talk about, by URL path.
pub const PODS: &str = "/api/v1/pods";
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const NETWORK_POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";

/// One request as the API server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: BTreeMap<String, String>,
}

impl Call {
    /// The RBAC (verb, apiGroup, resource) this request needs.
    pub fn rbac(&self) -> (String, String, String) {
        let segs: Vec<&str> = self.path.trim_start_matches('/').split('/').collect();
        // /api/v1/<res>[/name] or /apis/<group>/<version>/<res>[/name] (cluster-wide),
        // /api/v1/namespaces/<ns>/<res>[/name] (namespaced).
        let (group, rest) = match segs.as_slice() {
            ["api", _v, rest @ ..] => ("", rest),
            ["apis", g, _v, rest @ ..] => (*g, rest),
            _ => panic!("not an API path: {}", self.path),
        };
        let rest = match rest {
            ["namespaces", _ns, res, more @ ..] => {
                let mut v = vec![*res];
                v.extend(more);
                v
            }
            other => other.to_vec(),
        };
        let (resource, named) = match rest.as_slice() {
            [res] => (*res, false),
            [res, _name] => (*res, true),
            other => panic!("unexpected path shape {other:?}"),
        };
        let verb = match (&self.method, named) {
            (&Method::GET, false)
                if self.query.get("watch").map(String::as_str) == Some("true") =>
            {
                "watch"
            }
            (&Method::GET, false) => "list",
            (&Method::GET, true) => "get",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, false) => "deletecollection",
            (&Method::DELETE, true) => "delete",
            (m, _) => panic!("unexpected method {m}"),
        };
        (verb.into(), group.into(), resource.into())
    }
}

/// The server side of the mocked API.
pub struct ApiServer {
    routes: HashMap<&'static str, mpsc::UnboundedReceiver<Exchange>>,
    log: Arc<Mutex<Vec<Call>>>,
}

pub struct Exchange {
    pub call: Call,
    respond: Responder,
}

impl ApiServer {
    /// A client for the source under test and the server that answers it.
    pub fn start() -> (kube::Client, ApiServer) {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<ResBody>>();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut senders = HashMap::new();
        let mut routes = HashMap::new();
        for path in [PODS, NAMESPACES, NETWORK_POLICIES] {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.insert(path, tx);
            routes.insert(path, rx);
        }
        let router_log = log.clone();
        tokio::spawn(async move {
            while let Some((req, respond)) = handle.next_request().await {
                let call = Call {
                    method: req.method().clone(),
                    path: req.uri().path().to_string(),
                    query: req
                        .uri()
                        .query()
                        .map(|q| {
                            url_pairs(q)
                                .into_iter()
                                .collect::<BTreeMap<String, String>>()
                        })
                        .unwrap_or_default(),
                };
                router_log.lock().unwrap().push(call.clone());
                match senders.get(call.path.as_str()) {
                    Some(tx) => {
                        let _ = tx.send(Exchange { call, respond });
                    }
                    None => respond.send_response(json(
                        StatusCode::NOT_FOUND,
                        &fixture_json("status-internal-error.json"),
                    )),
                }
            }
        });
        let client = kube::Client::new(service, "default");
        (client, ApiServer { routes, log })
    }

    /// Every request made so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.log.lock().unwrap().clone()
    }

    /// The next request for any resource, or None once `deadline` has passed.
    pub async fn next_request(&mut self, deadline: tokio::time::Instant) -> Option<Exchange> {
        let pending = self.routes.values_mut().map(|rx| Box::pin(rx.recv()));
        let (ex, _, _) = tokio::time::timeout_at(deadline, futures::future::select_all(pending))
            .await
            .ok()?;
        Some(ex.expect("router stopped"))
    }

    /// The API server is away for `outage` (from now): every request fails, first with a
    /// refused connection, in the second half with 503 as while it starts up. Each must
    /// be a watch resuming from `version` (nothing is listed: the agent keeps what it
    /// has). Returns when each resource's requests came.
    pub async fn outage(
        &mut self,
        outage: Duration,
        version: &str,
    ) -> BTreeMap<String, Vec<tokio::time::Instant>> {
        let down_at = tokio::time::Instant::now();
        let mut requests: BTreeMap<String, Vec<tokio::time::Instant>> = BTreeMap::new();
        while let Some(ex) = self.next_request(down_at + outage).await {
            let q = &ex.call.query;
            assert!(
                q.get("watch").map(String::as_str) == Some("true")
                    && q.get("resourceVersion").map(String::as_str) == Some(version),
                "during the outage the source only resumes its watches: {:?}",
                ex.call
            );
            requests
                .entry(ex.call.path.clone())
                .or_default()
                .push(tokio::time::Instant::now());
            if down_at.elapsed() < outage / 2 {
                ex.fail("connection refused");
            } else {
                ex.reply(503, &unavailable());
            }
        }
        requests
    }

    /// The next request for `resource`, which must be a GET with exactly `query`.
    pub async fn expect(&mut self, resource: &str, query: &[(&str, &str)]) -> Exchange {
        let rx = self.routes.get_mut(resource).expect("unknown resource");
        let ex = tokio::time::timeout(STEP, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no request for {resource} within {STEP:?}"))
            .expect("router stopped");
        let want: BTreeMap<String, String> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(ex.call.method, Method::GET, "{:?}", ex.call);
        assert_eq!(ex.call.query, want, "query of {}", ex.call.path);
        ex
    }

    /// The next request for `resource` must be a list: first page, or the page after
    /// `continue_token`.
    pub async fn expect_list(&mut self, resource: &str, continue_token: Option<&str>) -> Exchange {
        let limit = palisade::source::kube::PAGE_SIZE.to_string();
        let mut q = vec![("limit", limit.as_str())];
        if let Some(c) = continue_token {
            q.push(("continue", c));
        }
        self.expect(resource, &q).await
    }

    /// The next request for `resource` must be a watch from `version`, with bookmarks.
    pub async fn expect_watch(&mut self, resource: &str, version: &str) -> Exchange {
        self.expect(
            resource,
            &[
                ("watch", "true"),
                ("timeoutSeconds", "290"),
                ("allowWatchBookmarks", "true"),
                ("resourceVersion", version),
            ],
        )
        .await
    }

    /// Answers one list request per page: `pages[i]` answers the request that carries the
    /// continue token of `pages[i - 1]`.
    pub async fn serve_list(&mut self, resource: &str, pages: &[&str]) {
        let mut token: Option<String> = None;
        for page in pages {
            let body = fixture_json(page);
            self.expect_list(resource, token.as_deref())
                .await
                .reply(200, &body);
            token = body["metadata"]["continue"].as_str().map(str::to_string);
        }
        assert!(
            token.is_none(),
            "the last page of {resource} has a continue token"
        );
    }
}

impl Exchange {
    pub fn reply(self, status: u16, body: &serde_json::Value) {
        self.respond
            .send_response(json(StatusCode::from_u16(status).unwrap(), body));
    }

    /// The connection fails before any response (API server down, connection refused).
    pub fn fail(self, why: &str) {
        self.respond.send_error(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            why.to_string(),
        ));
    }

    /// Answers with an open watch stream (200, chunked) that the test feeds.
    pub fn stream(self) -> WatchStream {
        let (tx, rx) = fmpsc::unbounded::<Result<Frame<Bytes>, Infallible>>();
        let body = StreamBody::new(rx).boxed_unsync();
        let res = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(body)
            .unwrap();
        self.respond.send_response(res);
        WatchStream { tx }
    }
}

/// The server end of one watch response.
pub struct WatchStream {
    tx: fmpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>,
}

impl WatchStream {
    /// Sends one event line (`{"type": ..., "object": ...}`).
    pub fn send(&self, event: &serde_json::Value) {
        let mut line = serde_json::to_vec(event).unwrap();
        line.push(b'\n');
        self.tx
            .unbounded_send(Ok(Frame::data(Bytes::from(line))))
            .expect("the watch was closed by the client");
    }

    /// Ends the response, as the API server does when `timeoutSeconds` elapses.
    pub fn end(self) {}
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<ResBody> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(bytes).boxed_unsync())
        .unwrap()
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Percent-decoding for query strings (`+` is a space in form encoding).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

pub fn fixture_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kube")
        .join(name)
}

pub fn fixture_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_path(name))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// The events of a `.jsonl` fixture, one watch event per line.
pub fn fixture_events(name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(fixture_path(name))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The most requests one kind may make in `outage` under the documented backoff (0.8 s
/// doubling to 30 s, never shorter than that): the first retry plus one per delay that
/// fits.
pub fn max_requests(outage: Duration) -> usize {
    let (mut delay, mut elapsed, mut n) = (Duration::from_millis(800), Duration::ZERO, 1);
    while elapsed + delay <= outage {
        elapsed += delay;
        n += 1;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
    n
}

/// What an API server answers while it starts up.
pub fn unavailable() -> serde_json::Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "the server is currently unable to handle the request",
           "reason": "ServiceUnavailable", "code": 503})
}

/// The 410 of a resume point the API server no longer has: the Status of the
/// `watch-error-gone.jsonl` fixture's ERROR event (read relative to this file, so that
/// tests/tests/e2e_kube.rs, which includes it, finds it too).
pub fn gone() -> serde_json::Value {
    let event: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/kube/watch-error-gone.jsonl")).unwrap();
    event["object"].clone()
}
