//! A fake Kubernetes API server for the agent's `kube` source: plain
//! HTTP/1.1 on 127.0.0.1, speaking list and watch the way kube-rs expects
//! (shared/docs/testing.md):
//!
//! - Lists carry `metadata.resourceVersion` and are paged (`limit`,
//!   `continue`); watches stream newline-
//!   delimited events from a resourceVersion, with BOOKMARKs when asked.
//! - Streaming lists (`sendInitialEvents=true`): ADDED for every object,
//!   then a BOOKMARK annotated `k8s.io/initial-events-end`.
//! - A resourceVersion older than the last [`FakeApi::expire`] is answered
//!   with an ERROR event (code 410) inside a 200 stream, as the API server
//!   does, which makes the watcher relist.
//! - Label selectors (`key`, `!key`, `key=value`, `key!=value`) and field
//!   selectors on `metadata.name` / `metadata.namespace` are honoured on
//!   lists and watches; an object that stops (starts) matching a watch's
//!   selector is DELETED (ADDED) on it.
//! - Objects are kept serialized too, so a list of 10,000 objects costs
//!   the server a copy, not a re-encoding (the control-plane benchmark
//!   times the agent, not this server).
//! - Faults: [`FakeApi::drop_watches`] ends every open watch,
//!   [`FakeApi::set_down`] closes the listener and every connection.
//!
//! Resources: services, pods, nodes (`/api/v1`) and endpointslices
//! (`/apis/discovery.k8s.io/v1`), cluster-wide or per namespace.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{Request, Response, body::Frame, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The kinds the server knows: (plural, kind, apiVersion, namespaced).
const KINDS: [(&str, &str, &str, bool); 4] = [
    ("services", "Service", "v1", true),
    ("pods", "Pod", "v1", true),
    ("nodes", "Node", "v1", false),
    (
        "endpointslices",
        "EndpointSlice",
        "discovery.k8s.io/v1",
        true,
    ),
];

fn kind_of_plural(plural: &str) -> Option<(&'static str, &'static str, &'static str, bool)> {
    KINDS.iter().copied().find(|k| k.0 == plural)
}

fn plural_of_kind(kind: &str) -> Option<&'static str> {
    KINDS.iter().find(|k| k.1 == kind).map(|k| k.0)
}

/// One change, as watches replay it.
#[derive(Clone, Debug)]
struct Change {
    plural: &'static str,
    rv: u64,
    /// The object before (None: it was created).
    old: Option<Value>,
    /// The object after (None: it was deleted).
    new: Option<Value>,
}

/// An object and its JSON encoding.
struct Stored {
    value: Value,
    json: Bytes,
}

impl Stored {
    fn new(value: Value) -> Stored {
        let json = Bytes::from(value.to_string());
        Stored { value, json }
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    /// plural → (namespace, name) → object.
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Stored>>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410.
    expired_below: u64,
    /// Requests served, by (plural, "list" | "watch" | "stream" (a
    /// streaming list: a watch with `sendInitialEvents`)), and the label
    /// and field selectors they asked for.
    requests: BTreeMap<(String, &'static str), u64>,
    selectors: Vec<(String, String)>,
    field_selectors: Vec<(String, String)>,
}

struct Shared {
    state: Mutex<State>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch.
    drop_watches: watch::Sender<u64>,
    /// Bumped to close every connection (server going down).
    kill_connections: watch::Sender<u64>,
}

/// The server; runs on its own runtime thread until dropped.
pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Runtime,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl FakeApi {
    /// Listens on a free port of 127.0.0.1.
    pub fn start() -> Result<FakeApi> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("fake API runtime")?;
        let (changes, _) = broadcast::channel(1 << 16);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                ..State::default()
            }),
            changes,
            drop_watches: watch::channel(0).0,
            kill_connections: watch::channel(0).0,
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .context("binding the fake API server")?;
        let addr = listener.local_addr()?;
        let accept = runtime.spawn(accept_loop(listener, shared.clone()));
        Ok(FakeApi {
            addr,
            shared,
            runtime,
            accept: Some(accept),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server (no credentials) to
    /// `dir/kubeconfig` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Creates or replaces an object (from its `kind`, `metadata.namespace`
    /// defaulting to `default`, and `metadata.name`); returns its new
    /// resourceVersion.
    pub fn apply(&self, mut object: Value) -> Result<u64> {
        let kind = object["kind"].as_str().context("object without kind")?;
        let plural = plural_of_kind(kind).with_context(|| format!("unknown kind {kind}"))?;
        let (_, _, api_version, namespaced) = kind_of_plural(plural).expect("known plural");
        object["apiVersion"] = json!(api_version);
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without metadata.name")?
            .to_string();
        let namespace = if namespaced {
            let ns = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            object["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        let mut state = self.shared.state.lock().expect("fake API state");
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let old = state
            .objects
            .entry(plural)
            .or_default()
            .insert((namespace, name), Stored::new(object.clone()))
            .map(|o| o.value);
        self.record(
            &mut state,
            Change {
                plural,
                rv,
                old,
                new: Some(object),
            },
        );
        Ok(rv)
    }

    /// Deletes an object; false if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let Some(plural) = plural_of_kind(kind) else {
            return false;
        };
        let mut state = self.shared.state.lock().expect("fake API state");
        let key = (namespace.to_string(), name.to_string());
        let Some(Stored { value: mut old, .. }) =
            state.objects.entry(plural).or_default().remove(&key)
        else {
            return false;
        };
        state.rv += 1;
        let rv = state.rv;
        // A deletion's object carries the deletion's resourceVersion.
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(
            &mut state,
            Change {
                plural,
                rv,
                old: Some(old),
                new: None,
            },
        );
        true
    }

    fn record(&self, state: &mut State, change: Change) {
        state.history.push(change.clone());
        // No receivers is fine: nobody watches yet.
        let _ = self.shared.changes.send(change);
    }

    /// Forgets history: a watch resuming from any resourceVersion before
    /// now gets `410 Gone` and must relist.
    pub fn expire(&self) {
        let mut state = self.shared.state.lock().expect("fake API state");
        // Every resourceVersion handed out so far expires; a fresh list
        // returns the next one, from which watching is fine.
        state.rv += 1;
        state.expired_below = state.rv;
        state.history.clear();
    }

    /// Ends every open watch stream (clients re-watch from where they were).
    pub fn drop_watches(&self) {
        self.shared.drop_watches.send_modify(|n| *n += 1);
    }

    /// Down: the listener closes and every connection is cut, so clients
    /// see connection refused. Up: listens again on the same port.
    pub fn set_down(&mut self, down: bool) -> Result<()> {
        if down {
            if let Some(accept) = self.accept.take() {
                accept.abort();
                let _ = self.runtime.block_on(accept);
            }
            self.shared.kill_connections.send_modify(|n| *n += 1);
        } else if self.accept.is_none() {
            let listener = self
                .runtime
                .block_on(tokio::net::TcpListener::bind(self.addr))
                .with_context(|| format!("rebinding {}", self.addr))?;
            self.accept = Some(
                self.runtime
                    .spawn(accept_loop(listener, self.shared.clone())),
            );
        }
        Ok(())
    }

    /// How many list, watch or stream (`what`: a watch that starts with a
    /// streaming list) requests for `plural` were served.
    pub fn requests(&self, plural: &str, what: &str) -> u64 {
        let state = self.shared.state.lock().expect("fake API state");
        state
            .requests
            .iter()
            .filter(|((p, w), _)| p == plural && *w == what)
            .map(|(_, n)| *n)
            .sum()
    }

    /// The label selectors requested for `plural`, in order.
    pub fn selectors(&self, plural: &str) -> Vec<String> {
        let state = self.shared.state.lock().expect("fake API state");
        state
            .selectors
            .iter()
            .filter(|(p, _)| p == plural)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// The field selectors requested for `plural`, in order.
    pub fn field_selectors(&self, plural: &str) -> Vec<String> {
        let state = self.shared.state.lock().expect("fake API state");
        state
            .field_selectors
            .iter()
            .filter(|(p, _)| p == plural)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state.lock().expect("fake API state").rv
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        self.shared.kill_connections.send_modify(|n| *n += 1);
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // As Go's net/http does: a watch event must not wait for the ACK
        // of the previous one (Nagle + delayed ACK stall ~40 ms).
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut kill = shared.kill_connections.subscribe();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared)) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = kill.changed() => {}
            }
        });
    }
}

fn full(status: u16, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .expect("valid response")
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

/// What a request asks for.
struct Query {
    plural: &'static str,
    namespace: Option<String>,
    name: Option<String>,
    params: BTreeMap<String, String>,
    labels: Selector,
    fields: Selector,
}

impl Query {
    /// Whether `object` is in what this request selects.
    fn selects(&self, object: &Value) -> bool {
        in_namespace(object, &self.namespace)
            && self.labels.matches(object)
            && self.fields.matches_fields(object)
    }
}

fn parse_request(req: &Request<hyper::body::Incoming>) -> Option<Query> {
    let path = req.uri().path();
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| path.strip_prefix("/apis/discovery.k8s.io/v1/"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (namespace, plural, name) = match parts.as_slice() {
        ["namespaces", ns, plural] => (Some(ns.to_string()), *plural, None),
        ["namespaces", ns, plural, name] => (Some(ns.to_string()), *plural, Some(name.to_string())),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(name.to_string())),
        _ => return None,
    };
    let (plural, ..) = kind_of_plural(plural)?;
    let params: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((decode(k)?, decode(v)?))
        })
        .collect();
    let selector = |name: &str| Selector::parse(params.get(name).map_or("", String::as_str));
    Some(Query {
        plural,
        namespace,
        name,
        labels: selector("labelSelector"),
        fields: selector("fieldSelector"),
        params,
    })
}

/// Percent-decoding for query parameters.
fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A label selector: comma-separated `key`, `!key`, `key=value`,
/// `key==value`, `key!=value`.
#[derive(Clone, Debug, Default)]
struct Selector(Vec<(String, Option<String>, bool)>);

impl Selector {
    fn parse(s: &str) -> Selector {
        Selector(
            s.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|term| {
                    if let Some((k, v)) = term.split_once("!=") {
                        (k.trim().into(), Some(v.trim().into()), false)
                    } else if let Some((k, v)) = term.split_once('=') {
                        let v = v.trim_start_matches('=');
                        (k.trim().into(), Some(v.trim().into()), true)
                    } else if let Some(k) = term.strip_prefix('!') {
                        (k.trim().into(), None, false)
                    } else {
                        (term.into(), None, true)
                    }
                })
                .collect(),
        )
    }

    /// Whether `object`'s labels match.
    fn matches(&self, object: &Value) -> bool {
        self.matches_in(&object["metadata"]["labels"])
    }

    /// Whether `object`'s fields match; only `metadata.name` and
    /// `metadata.namespace` are selectable here (as for every kind).
    fn matches_fields(&self, object: &Value) -> bool {
        self.0.iter().all(|(key, value, positive)| {
            let actual = match key.as_str() {
                "metadata.name" => object["metadata"]["name"].as_str(),
                "metadata.namespace" => object["metadata"]["namespace"].as_str(),
                _ => None,
            };
            match value {
                Some(v) => (actual == Some(v.as_str())) == *positive,
                None => false,
            }
        })
    }

    fn matches_in(&self, labels: &Value) -> bool {
        self.0.iter().all(|(key, value, positive)| {
            let actual = labels.get(key).and_then(Value::as_str);
            match (value, positive) {
                (None, true) => actual.is_some(),
                (None, false) => actual.is_none(),
                (Some(v), true) => actual == Some(v.as_str()),
                (Some(v), false) => actual != Some(v.as_str()),
            }
        })
    }
}

fn in_namespace(object: &Value, namespace: &Option<String>) -> bool {
    namespace
        .as_deref()
        .is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
}

fn handle(req: Request<hyper::body::Incoming>, shared: &Arc<Shared>) -> Response<Body> {
    if req.method() != hyper::Method::GET {
        return full(
            405,
            status_object(405, "MethodNotAllowed", "read-only fake"),
        );
    }
    let Some(q) = parse_request(&req) else {
        return full(404, status_object(404, "NotFound", "no such path"));
    };
    let watching = matches!(
        q.params.get("watch").map(String::as_str),
        Some("true" | "1")
    );
    let streaming = q.params.get("sendInitialEvents").map(String::as_str) == Some("true");
    {
        let mut state = shared.state.lock().expect("fake API state");
        let what = match (watching, streaming) {
            (true, true) => "stream",
            (true, false) => "watch",
            (false, _) => "list",
        };
        *state
            .requests
            .entry((q.plural.to_string(), what))
            .or_default() += 1;
        if let Some(s) = q.params.get("labelSelector") {
            state.selectors.push((q.plural.to_string(), s.clone()));
        }
        if let Some(s) = q.params.get("fieldSelector") {
            state
                .field_selectors
                .push((q.plural.to_string(), s.clone()));
        }
    }
    if let Some(name) = &q.name {
        let state = shared.state.lock().expect("fake API state");
        let key = (q.namespace.clone().unwrap_or_default(), name.clone());
        return match state.objects.get(q.plural).and_then(|o| o.get(&key)) {
            Some(object) => json_response(200, object.json.clone()),
            None => full(404, status_object(404, "NotFound", "not found")),
        };
    }
    if watching {
        watch_response(q, shared)
    } else {
        list_response(&q, shared)
    }
}

fn list_response(q: &Query, shared: &Arc<Shared>) -> Response<Body> {
    let state = shared.state.lock().expect("fake API state");
    let (_, kind, api_version, _) = kind_of_plural(q.plural).expect("known plural");
    // Pages (`limit`, `continue`): the token is the offset into the
    // matching objects in key order. Unlike a real API server, later pages
    // read the current state, not the first page's snapshot (tests do not
    // change objects while a list is paged).
    let limit: usize = q
        .params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let offset: usize = q
        .params
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut matching = state
        .objects
        .get(q.plural)
        .into_iter()
        .flat_map(|o| o.values())
        .filter(|o| q.selects(&o.value))
        .skip(offset);
    let items: Vec<&Bytes> = matching.by_ref().take(limit).map(|o| &o.json).collect();
    let mut metadata = json!({"resourceVersion": state.rv.to_string()});
    if matching.next().is_some() {
        metadata["continue"] = json!((offset + items.len()).to_string());
    }
    // The list object around the stored encodings.
    let head =
        json!({"kind": format!("{kind}List"), "apiVersion": api_version, "metadata": metadata})
            .to_string();
    let mut body =
        Vec::with_capacity(head.len() + 16 + items.iter().map(|i| i.len() + 1).sum::<usize>());
    body.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
    body.extend_from_slice(b",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    json_response(200, Bytes::from(body))
}

fn json_response(status: u16, body: Bytes) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body).boxed_unsync())
        .expect("valid response")
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// An event line around an object's stored encoding.
fn event_line_json(kind: &str, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + 32);
    line.extend_from_slice(format!("{{\"type\":\"{kind}\",\"object\":").as_bytes());
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn bookmark(plural: &str, rv: u64, initial_events_end: bool) -> Value {
    let (_, kind, api_version, _) = kind_of_plural(plural).expect("known plural");
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": kind, "apiVersion": api_version, "metadata": meta})
}

/// The event watch `q` sees for `change` (None: nothing).
fn event_for(change: &Change, q: &Query) -> Option<Bytes> {
    if change.plural != q.plural {
        return None;
    }
    fn visible<'a>(o: &'a Option<Value>, q: &Query) -> Option<&'a Value> {
        o.as_ref().filter(|o| q.selects(o))
    }
    match (visible(&change.old, q), visible(&change.new, q)) {
        (None, Some(new)) => Some(event_line("ADDED", new)),
        (Some(_), Some(new)) => Some(event_line("MODIFIED", new)),
        (Some(old), None) => {
            // Deleted, or no longer selected: the client sees it go, with
            // the change's resourceVersion.
            let mut old = change.new.clone().unwrap_or_else(|| old.clone());
            old["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            Some(event_line("DELETED", &old))
        }
        (None, None) => None,
    }
}

fn watch_response(q: Query, shared: &Arc<Shared>) -> Response<Body> {
    let bookmarks = q.params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let initial = q.params.get("sendInitialEvents").map(String::as_str) == Some("true");
    let from: u64 = q
        .params
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    // Subscribe before reading the history, so no change falls between.
    let mut live = shared.changes.subscribe();
    let mut dropped = shared.drop_watches.subscribe();
    let mut first: Vec<Bytes> = Vec::new();
    let mut last = from;
    {
        let state = shared.state.lock().expect("fake API state");
        if initial {
            for o in state
                .objects
                .get(q.plural)
                .into_iter()
                .flat_map(|o| o.values())
            {
                if q.selects(&o.value) {
                    first.push(event_line_json("ADDED", &o.json));
                }
            }
            last = state.rv;
            first.push(event_line("BOOKMARK", &bookmark(q.plural, last, true)));
        } else if from != 0 && from < state.expired_below {
            first.push(event_line(
                "ERROR",
                &status_object(410, "Expired", &format!("too old resource version: {from}")),
            ));
            drop(state);
            let stream = futures::stream::iter(first.into_iter().map(|b| Ok(Frame::data(b))));
            return streaming(BodyExt::boxed_unsync(StreamBody::new(stream)));
        } else {
            for change in state.history.iter().filter(|c| c.rv > from) {
                if let Some(line) = event_for(change, &q) {
                    first.push(line);
                }
                last = change.rv;
            }
            last = last.max(from);
        }
    }
    tokio::spawn(async move {
        for line in first {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                change = live.recv() => {
                    let change = match change {
                        Ok(c) => c,
                        // Too slow to keep up: end the watch; the client resumes.
                        Err(_) => return,
                    };
                    if change.rv <= last {
                        continue;
                    }
                    last = change.rv;
                    if let Some(line) = event_for(&change, &q)
                        && tx.send(line).await.is_err()
                    {
                        return;
                    }
                }
                _ = tick.tick(), if bookmarks => {
                    if tx.send(event_line("BOOKMARK", &bookmark(q.plural, last, false))).await.is_err() {
                        return;
                    }
                }
                _ = dropped.changed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    });
    streaming(BodyExt::boxed_unsync(StreamBody::new(StreamExt::boxed(
        stream,
    ))))
}

fn streaming(body: Body) -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(body)
        .expect("valid response")
}

/// Convenience builders for the objects tests need.
pub mod objects {
    use serde_json::{Value, json};

    /// A headless Service.
    pub fn headless_service(ns: &str, name: &str, annotations: Value) -> Value {
        json!({
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations},
            "spec": {"clusterIP": "None", "ports": [{"name": "tcp", "port": 7000}]},
        })
    }

    /// A Service with a cluster IP (headway ignores it).
    pub fn cluster_ip_service(ns: &str, name: &str) -> Value {
        json!({
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
        })
    }

    /// An endpoint of a slice: (address, pod name, ready).
    pub type SliceEndpoint<'a> = (&'a str, &'a str, bool);

    /// An IPv4 EndpointSlice of `service`, labelled as Kubernetes labels
    /// the slices of headless services.
    pub fn slice(ns: &str, name: &str, service: &str, endpoints: &[SliceEndpoint]) -> Value {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(addr, pod, ready)| {
                json!({
                    "addresses": [addr],
                    "conditions": {"ready": ready, "serving": ready, "terminating": false},
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": pod},
                })
            })
            .collect();
        json!({
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {
                    "kubernetes.io/service-name": service,
                    "service.kubernetes.io/headless": "",
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": "tcp", "port": 7000, "protocol": "TCP"}],
            "endpoints": endpoints,
        })
    }

    /// A Pod with the given labels.
    pub fn pod(ns: &str, name: &str, labels: Value) -> Value {
        json!({"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels}})
    }

    /// A Node with a zone label.
    pub fn node(name: &str, zone: &str) -> Value {
        json!({
            "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        })
    }
}

/// Fails unless `ok` becomes true within `timeout` (polled).
pub fn eventually(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what}: not within {timeout:?}")
}
