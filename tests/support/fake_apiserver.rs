//! A stand-in for kube-apiserver at the HTTP level, for the two resources
//! the webhook reads: ConfigMaps and MutatingWebhookConfigurations.
//!
//! What it reproduces (the parts a kube-rs watcher and `replace` rely on):
//! - one global, increasing `resourceVersion`; every write gets the next one
//!   and is recorded in a history that watches replay;
//! - LIST: `{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"N"},"items":[…]}`
//!   with items *without* `kind`/`apiVersion`, as the real server sends them;
//! - WATCH (`?watch=true&resourceVersion=N`): `200`, `Content-Type:
//!   application/json`, chunked, one `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK","object":…}`
//!   per line; replays the history after N; `resourceVersion` absent or `0`
//!   starts with synthetic ADDED events for the current objects; a version
//!   older than the last compaction gets the watch cache's answer — one
//!   `ERROR` event carrying a `Status` with code 410 (reason `Expired`) —
//!   and the stream ends; `timeoutSeconds` ends the stream;
//! - `fieldSelector=metadata.name=NAME` (and `metadata.namespace`) on LIST
//!   and WATCH; other selectors are refused with 400 as the server does for
//!   unsupported field labels;
//! - GET / POST / PUT / DELETE of one object; PUT requires
//!   `Content-Type: application/json` (415 otherwise), `apiVersion`/`kind`
//!   (400), the name of the URL (400); a stale `metadata.resourceVersion`
//!   gets 409 with a `Status` (reason `Conflict`), an absent one is an
//!   unconditional update; errors are `Status` objects with the real
//!   messages and reasons (`NotFound`, `AlreadyExists`, `Conflict`, …).
//!
//! And what a test needs to make happen: closing every open watch,
//! stopping the listener (connections drop, new ones are refused) and
//! restarting it on the same port, compacting the history, making the next
//! N updates conflict as if another client had written in between.

#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The two kinds the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    ConfigMap,
    MutatingWebhookConfiguration,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::ConfigMap => "v1",
            Kind::MutatingWebhookConfiguration => "admissionregistration.k8s.io/v1",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::ConfigMap => "ConfigMap",
            Kind::MutatingWebhookConfiguration => "MutatingWebhookConfiguration",
        }
    }
    fn plural(self) -> &'static str {
        match self {
            Kind::ConfigMap => "configmaps",
            Kind::MutatingWebhookConfiguration => "mutatingwebhookconfigurations",
        }
    }
    /// `resource.group` as Status messages spell it.
    fn qualified(self) -> &'static str {
        match self {
            Kind::ConfigMap => "configmaps",
            Kind::MutatingWebhookConfiguration => {
                "mutatingwebhookconfigurations.admissionregistration.k8s.io"
            }
        }
    }
    fn group(self) -> &'static str {
        match self {
            Kind::ConfigMap => "",
            Kind::MutatingWebhookConfiguration => "admissionregistration.k8s.io",
        }
    }
}

type Key = (Kind, String, String); // kind, namespace ("" if cluster scoped), name

#[derive(Debug, Clone)]
struct Recorded {
    rv: u64,
    kind: Kind,
    namespace: String,
    name: String,
    kind_of_event: &'static str,
    object: Value,
}

struct Watch {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watch {
    fn matches(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.kind == kind
            && self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.name.as_deref().is_none_or(|n| n == name)
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path_and_query: String,
    pub status: u16,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Recorded>,
    /// Watches from a resourceVersion older than this get 410.
    compacted: u64,
    watches: Vec<Watch>,
    log: Vec<Logged>,
    conflicts_to_inject: u32,
    uid: u64,
    /// Added before answering each PUT (a slow etcd, a distant API server).
    write_delay: Duration,
}

struct Inner {
    state: Mutex<State>,
    /// Cancelled by `stop`: drops every connection of the current listener.
    running: Mutex<CancellationToken>,
    /// Parent of every listener's token, cancelled when the last handle
    /// drops (the accept loop's own `Arc<Inner>` does not keep it alive).
    root: CancellationToken,
}

/// A running fake API server; it stops when its last clone drops.
#[derive(Clone)]
pub struct FakeApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    _stop: Arc<tokio_util::sync::DropGuard>,
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let t = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn status(code: u16, reason: &str, message: String, details: Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    })
}

fn details(kind: Kind, name: &str) -> Value {
    let mut d = json!({ "name": name, "kind": kind.plural() });
    if !kind.group().is_empty() {
        d["group"] = json!(kind.group());
    }
    d
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn json_response(code: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("Content-Type", "application/json")
        .header("Cache-Control", "no-cache, private")
        .body(Full::new(Bytes::from(serde_json::to_vec(value).unwrap())).boxed_unsync())
        .unwrap()
}

/// Parses the URL path into (kind, namespace, name).
fn route(path: &str) -> Option<(Kind, Option<String>, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "configmaps"] => Some((Kind::ConfigMap, None, None)),
        ["api", "v1", "namespaces", ns, "configmaps"] => {
            Some((Kind::ConfigMap, Some(ns.to_string()), None))
        }
        ["api", "v1", "namespaces", ns, "configmaps", name] => Some((
            Kind::ConfigMap,
            Some(ns.to_string()),
            Some(name.to_string()),
        )),
        [
            "apis",
            "admissionregistration.k8s.io",
            "v1",
            "mutatingwebhookconfigurations",
        ] => Some((Kind::MutatingWebhookConfiguration, None, None)),
        [
            "apis",
            "admissionregistration.k8s.io",
            "v1",
            "mutatingwebhookconfigurations",
            name,
        ] => Some((
            Kind::MutatingWebhookConfiguration,
            None,
            Some(name.to_string()),
        )),
        _ => None,
    }
}

fn query(uri: &hyper::Uri) -> BTreeMap<String, String> {
    uri.query()
        .map(|q| {
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
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
    String::from_utf8_lossy(&out).into_owned()
}

/// `metadata.name=x,metadata.namespace=y` → (name, namespace); Err for
/// anything else (the real server answers 400 for unsupported field labels).
fn field_selector(sel: Option<&String>) -> Result<(Option<String>, Option<String>), String> {
    let mut name = None;
    let mut namespace = None;
    let Some(sel) = sel else {
        return Ok((None, None));
    };
    for term in sel.split(',').filter(|t| !t.is_empty()) {
        let (k, v) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .ok_or_else(|| format!("invalid field selector term {term:?}"))?;
        match k {
            "metadata.name" => name = Some(v.to_owned()),
            "metadata.namespace" => namespace = Some(v.to_owned()),
            other => {
                return Err(format!("field label not supported: {other}"));
            }
        }
    }
    Ok((name, namespace))
}

/// The object as a watch event or GET carries it (with kind/apiVersion).
fn typed(kind: Kind, mut obj: Value) -> Value {
    obj["apiVersion"] = json!(kind.api_version());
    obj["kind"] = json!(kind.name());
    obj
}

fn event_line(kind_of_event: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind_of_event, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Records a change and sends it to matching watches.
    fn record(&mut self, kind: Kind, namespace: &str, name: &str, ev: &'static str, obj: Value) {
        let rv = obj["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(self.rv);
        let object = typed(kind, obj);
        self.history.push(Recorded {
            rv,
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            kind_of_event: ev,
            object: object.clone(),
        });
        let line = event_line(ev, &object);
        self.watches.retain(|w| {
            if w.matches(kind, namespace, name) {
                w.tx.send(line.clone()).is_ok()
            } else {
                !w.tx.is_closed()
            }
        });
    }

    fn put_object(
        &mut self,
        kind: Kind,
        namespace: &str,
        mut obj: Value,
        ev: &'static str,
    ) -> Value {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let rv = self.next_rv();
        let meta = obj["metadata"].as_object_mut().unwrap();
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        if !namespace.is_empty() {
            meta.insert("namespace".into(), json!(namespace));
        }
        if !meta.contains_key("uid") {
            self.uid += 1;
            meta.insert(
                "uid".into(),
                json!(format!("00000000-0000-4000-8000-{:012x}", self.uid)),
            );
        }
        meta.entry("creationTimestamp")
            .or_insert(json!(now_rfc3339()));
        // Stored without type fields, as list items come back.
        if let Some(o) = obj.as_object_mut() {
            o.remove("apiVersion");
            o.remove("kind");
        }
        self.objects
            .insert((kind, namespace.to_owned(), name.clone()), obj.clone());
        self.record(kind, namespace, &name, ev, obj.clone());
        typed(kind, obj)
    }
}

impl FakeApiServer {
    /// Starts on an ephemeral loopback port.
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let root = CancellationToken::new();
        let token = root.child_token();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                rv: 1000,
                ..State::default()
            }),
            running: Mutex::new(token.clone()),
            root: root.clone(),
        });
        tokio::spawn(accept_loop(listener, inner.clone(), token));
        FakeApiServer {
            inner,
            addr,
            _stop: Arc::new(root.drop_guard()),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap()
    }

    /// A kubeconfig pointing at the fake over plain HTTP.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
                 users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: istio-vault-webhook\n\
                 current-context: fake\n",
                self.url()
            ),
        )
        .unwrap();
        path
    }

    // --- what a test does (as kubectl would) -------------------------------

    /// Creates or updates (unconditionally) a ConfigMap with `data`.
    pub fn apply_configmap(&self, namespace: &str, name: &str, data: &[(&str, &str)]) -> u64 {
        let data: BTreeMap<&str, &str> = data.iter().copied().collect();
        let mut st = self.state();
        let key = (Kind::ConfigMap, namespace.to_owned(), name.to_owned());
        let (obj, ev) = match st.objects.get(&key) {
            Some(old) => {
                let mut obj = old.clone();
                obj["data"] = json!(data);
                (obj, "MODIFIED")
            }
            None => (
                json!({"metadata": {"name": name, "namespace": namespace}, "data": data}),
                "ADDED",
            ),
        };
        let written = st.put_object(Kind::ConfigMap, namespace, obj, ev);
        written["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn delete_configmap(&self, namespace: &str, name: &str) -> bool {
        self.delete(Kind::ConfigMap, namespace, name)
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let mut st = self.state();
        let key = (kind, namespace.to_owned(), name.to_owned());
        let Some(mut obj) = st.objects.remove(&key) else {
            return false;
        };
        let rv = st.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.record(kind, namespace, name, "DELETED", obj);
        true
    }

    /// Creates or replaces (unconditionally, like `kubectl apply` of a
    /// full object) a MutatingWebhookConfiguration.
    pub fn apply_webhook_config(&self, obj: Value) {
        let mut st = self.state();
        let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
        let key = (Kind::MutatingWebhookConfiguration, String::new(), name);
        let mut obj = obj;
        let ev = match st.objects.get(&key) {
            Some(old) => {
                obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
                obj["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
                "MODIFIED"
            }
            None => "ADDED",
        };
        st.put_object(Kind::MutatingWebhookConfiguration, "", obj, ev);
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .cloned()
            .map(|o| typed(kind, o))
    }

    /// The decoded caBundle of every webhook of a configuration.
    pub fn ca_bundles(&self, name: &str) -> Vec<Vec<u8>> {
        let Some(obj) = self.get(Kind::MutatingWebhookConfiguration, "", name) else {
            return Vec::new();
        };
        obj["webhooks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| {
                BASE64
                    .decode(w["clientConfig"]["caBundle"].as_str().unwrap_or(""))
                    .unwrap()
            })
            .collect()
    }

    pub fn resource_version(&self) -> u64 {
        self.state().rv
    }

    // --- what a test makes the server do ------------------------------------

    /// Ends every open watch stream cleanly (as the server does at
    /// `timeoutSeconds`, or when an API server replica goes away).
    pub fn close_watches(&self) -> usize {
        let mut st = self.state();
        let n = st.watches.len();
        st.watches.clear();
        n
    }

    /// Open watch streams (that have not been noticed as closed).
    pub fn open_watches(&self, kind: Kind) -> usize {
        let mut st = self.state();
        st.watches.retain(|w| !w.tx.is_closed());
        st.watches.iter().filter(|w| w.kind == kind).count()
    }

    /// Forgets the history: watches from an older resourceVersion get 410.
    pub fn compact(&self) {
        let mut st = self.state();
        st.compacted = st.rv;
        st.history.clear();
    }

    /// Sends a BOOKMARK with the current resourceVersion to every watch that
    /// asked for bookmarks (all kube-rs watches do).
    pub fn bookmark(&self) {
        let mut st = self.state();
        let rv = st.rv.to_string();
        st.watches.retain(|w| {
            let obj = json!({"kind": w.kind.name(), "apiVersion": w.kind.api_version(),
                             "metadata": {"resourceVersion": rv}});
            w.tx.send(event_line("BOOKMARK", &obj)).is_ok()
        });
    }

    /// The next `n` updates fail with 409 after another (simulated) client
    /// wrote the object, as when two replicas race.
    pub fn inject_conflicts(&self, n: u32) {
        self.state().conflicts_to_inject = n;
    }

    /// Makes every PUT take `delay` longer.
    pub fn delay_writes(&self, delay: Duration) {
        self.state().write_delay = delay;
    }

    /// Stops listening and drops every connection: clients get
    /// "connection refused" until `restart`.
    pub async fn stop(&self) {
        self.inner.running.lock().unwrap().cancel();
        self.state().watches.clear();
        // Let the accept loop and connections notice.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Listens again on the same port, with the same stored objects.
    pub async fn restart(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("fake API server cannot rebind {}: {e}", self.addr),
            }
        };
        let token = self.inner.root.child_token();
        *self.inner.running.lock().unwrap() = token.clone();
        tokio::spawn(accept_loop(listener, self.inner.clone(), token));
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.state().log.clone()
    }

    /// Requests with this method whose path starts with `prefix` and that
    /// were answered with `status`.
    pub fn count(&self, method: &str, prefix: &str, status: u16) -> usize {
        self.state()
            .log
            .iter()
            .filter(|l| {
                l.method == method && l.path_and_query.starts_with(prefix) && l.status == status
            })
            .count()
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, token: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = token.cancelled() => return,
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        let inner = inner.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let inner = inner.clone();
                async move { Ok::<_, Infallible>(handle(&inner, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = token.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

async fn handle(inner: &Inner, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let response = dispatch(inner, req).await;
    inner.state.lock().unwrap().log.push(Logged {
        method: method.to_string(),
        path_and_query,
        status: response.status().as_u16(),
    });
    response
}

async fn dispatch(inner: &Inner, req: Request<Incoming>) -> Response<Body> {
    let Some((kind, namespace, name)) = route(req.uri().path()) else {
        return json_response(
            404,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
                json!({}),
            ),
        );
    };
    let q = query(req.uri());
    let ns = namespace.clone().unwrap_or_default();
    match (req.method().clone(), name) {
        (Method::GET, None) => {
            let (sel_name, sel_ns) = match field_selector(q.get("fieldSelector")) {
                Ok(s) => s,
                Err(e) => return json_response(400, &status(400, "BadRequest", e, json!({}))),
            };
            let ns_filter = namespace.clone().or(sel_ns);
            let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
            if watching {
                watch(inner, kind, ns_filter, sel_name, &q)
            } else {
                list(inner, kind, ns_filter, sel_name)
            }
        }
        (Method::GET, Some(name)) => {
            let st = inner.state.lock().unwrap();
            match st.objects.get(&(kind, ns.clone(), name.clone())) {
                Some(obj) => json_response(200, &typed(kind, obj.clone())),
                None => not_found(kind, &name),
            }
        }
        (Method::PUT, Some(name)) => {
            let body = match read_json(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let delay = inner.state.lock().unwrap().write_delay;
            tokio::time::sleep(delay).await;
            update(inner, kind, &ns, &name, body)
        }
        (Method::POST, None) => {
            let body = match read_json(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            create(inner, kind, &ns, body)
        }
        (Method::DELETE, Some(name)) => {
            let mut st = inner.state.lock().unwrap();
            let Some(mut obj) = st.objects.remove(&(kind, ns.clone(), name.clone())) else {
                return not_found(kind, &name);
            };
            let rv = st.next_rv();
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.record(kind, &ns, &name, "DELETED", obj.clone());
            json_response(200, &typed(kind, obj))
        }
        (m, _) => json_response(
            405,
            &status(
                405,
                "MethodNotAllowed",
                format!("the server does not allow this method on the requested resource ({m})"),
                json!({}),
            ),
        ),
    }
}

fn not_found(kind: Kind, name: &str) -> Response<Body> {
    json_response(
        404,
        &status(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified()),
            details(kind, name),
        ),
    )
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Response<Body>> {
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !ct.starts_with("application/json") {
        return Err(json_response(
            415,
            &status(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf (got {ct:?})"
                ),
                json!({}),
            ),
        ));
    }
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    serde_json::from_slice(&bytes).map_err(|e| {
        json_response(
            400,
            &status(
                400,
                "BadRequest",
                format!("the object provided is unrecognized: {e}"),
                json!({}),
            ),
        )
    })
}

fn check_type(kind: Kind, body: &Value) -> Result<(), Response<Body>> {
    let api_version = body["apiVersion"].as_str().unwrap_or("");
    let k = body["kind"].as_str().unwrap_or("");
    if k.is_empty() {
        return Err(json_response(
            400,
            &status(
                400,
                "BadRequest",
                "Object 'Kind' is missing in the request body".into(),
                json!({}),
            ),
        ));
    }
    if k != kind.name() || api_version != kind.api_version() {
        return Err(json_response(
            400,
            &status(
                400,
                "BadRequest",
                format!(
                    "the API version in the data ({api_version}) does not match the expected API version ({})",
                    kind.api_version()
                ),
                json!({}),
            ),
        ));
    }
    Ok(())
}

fn update(inner: &Inner, kind: Kind, ns: &str, name: &str, body: Value) -> Response<Body> {
    if let Err(r) = check_type(kind, &body) {
        return r;
    }
    if body["metadata"]["name"].as_str() != Some(name) {
        return json_response(
            400,
            &status(
                400,
                "BadRequest",
                "the name of the object does not match the name on the URL".into(),
                json!({}),
            ),
        );
    }
    let mut st = inner.state.lock().unwrap();
    let key = (kind, ns.to_owned(), name.to_owned());
    let Some(current) = st.objects.get(&key).cloned() else {
        return not_found(kind, name);
    };
    let conflict = || {
        json_response(
            409,
            &status(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    kind.qualified()
                ),
                details(kind, name),
            ),
        )
    };
    if st.conflicts_to_inject > 0 {
        st.conflicts_to_inject -= 1;
        // Another client's write lands first.
        st.put_object(kind, ns, current, "MODIFIED");
        return conflict();
    }
    let current_rv = current["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("");
    match body["metadata"]["resourceVersion"].as_str() {
        Some(rv) if !rv.is_empty() && rv != current_rv => return conflict(),
        _ => {}
    }
    let mut obj = body;
    obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
    obj["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
    let written = st.put_object(kind, ns, obj, "MODIFIED");
    json_response(200, &written)
}

fn create(inner: &Inner, kind: Kind, ns: &str, body: Value) -> Response<Body> {
    if let Err(r) = check_type(kind, &body) {
        return r;
    }
    let Some(name) = body["metadata"]["name"].as_str().map(str::to_owned) else {
        return json_response(
            422,
            &status(
                422,
                "Invalid",
                "metadata.name: Required value: name is required".into(),
                json!({}),
            ),
        );
    };
    let mut st = inner.state.lock().unwrap();
    if st
        .objects
        .contains_key(&(kind, ns.to_owned(), name.clone()))
    {
        return json_response(
            409,
            &status(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.qualified()),
                details(kind, &name),
            ),
        );
    }
    let mut obj = body;
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    let written = st.put_object(kind, ns, obj, "ADDED");
    json_response(201, &written)
}

fn list(inner: &Inner, kind: Kind, ns: Option<String>, name: Option<String>) -> Response<Body> {
    let st = inner.state.lock().unwrap();
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|((k, n, nm), _)| {
            *k == kind
                && ns.as_deref().is_none_or(|x| x == n)
                && name.as_deref().is_none_or(|x| x == nm)
        })
        .map(|(_, o)| o.clone())
        .collect();
    json_response(
        200,
        &json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        }),
    )
}

fn watch(
    inner: &Inner,
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let from = q.get("resourceVersion").cloned().unwrap_or_default();
    {
        let mut st = inner.state.lock().unwrap();
        let w = Watch {
            kind,
            namespace,
            name,
            tx: tx.clone(),
        };
        if from.is_empty() || from == "0" {
            for ((k, n, nm), obj) in &st.objects {
                if w.matches(*k, n, nm) {
                    let _ = tx.send(event_line("ADDED", &typed(*k, obj.clone())));
                }
            }
        } else {
            let rv: u64 = from.parse().unwrap_or(0);
            if rv < st.compacted {
                let err = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure",
                    "message": format!("too old resource version: {rv} ({})", st.compacted),
                    "reason": "Expired", "code": 410
                });
                let _ = tx.send(event_line("ERROR", &err));
                drop(tx);
                return stream_response(rx, None);
            }
            for r in &st.history {
                if r.rv > rv && w.matches(r.kind, &r.namespace, &r.name) {
                    let _ = tx.send(event_line(r.kind_of_event, &r.object));
                }
            }
        }
        st.watches.push(w);
    }
    drop(tx);
    stream_response(rx, timeout)
}

fn stream_response(
    rx: mpsc::UnboundedReceiver<Bytes>,
    timeout: Option<Duration>,
) -> Response<Body> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let stream = futures::stream::unfold(rx, move |mut rx| async move {
        let next = match deadline {
            Some(d) => tokio::time::timeout_at(d, rx.recv()).await.ok().flatten(),
            None => rx.recv().await,
        };
        next.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("Content-Type", "application/json")
        .header("Cache-Control", "no-cache, private")
        .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
        .unwrap()
}

/// A MutatingWebhookConfiguration as a chart would install it, with
/// `webhooks` webhooks and the given caBundle (PEM; empty for none).
pub fn webhook_config(name: &str, webhooks: usize, ca_bundle_pem: &[u8]) -> Value {
    let hooks: Vec<Value> = (0..webhooks)
        .map(|i| {
            let mut client_config = json!({
                "service": {"name": "istio-vault-webhook", "namespace": "istio-vault-webhook",
                            "path": "/mutate", "port": 443}
            });
            if !ca_bundle_pem.is_empty() {
                client_config["caBundle"] = json!(BASE64.encode(ca_bundle_pem));
            }
            json!({
                "name": format!("hook{i}.istio-vault-webhook.io"),
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
                "clientConfig": client_config,
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "namespaceSelector": {"matchLabels": {"istio-vault-webhook/inject": "enabled"}},
                // A field a newer API server might add: must survive updates.
                "x-future-field": {"kept": true}
            })
        })
        .collect();
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app": "istio-vault-webhook"}},
        "webhooks": hooks
    })
}
