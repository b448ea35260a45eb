//! The event collector: Segment's HTTP tracking API (`/v1/track`,
//! `/v1/identify`, `/v1/page`, `/v1/screen`, `/v1/group`, `/v1/alias`,
//! `/v1/batch`), which Segment's and RudderStack's SDKs speak, as the
//! built-in streaming source of every source with `collector:`.
//!
//! A request is checked here (write key, size, JSON, ids, type), its
//! messages completed the way Segment completes them (`messageId`,
//! `receivedAt`, a `timestamp` corrected for the client's clock skew), and
//! handed to the committer. The committer maps them by their source's `map`
//! through the ingest pipeline and commits everything that arrived while
//! the previous commit ran in one transaction (group commit), then answers
//! each request. So a 200 means the events are durably stored, and
//! concurrency turns into larger commits rather than more of them.
//!
//! A bad message is rejected with its index and reason; the good messages
//! of its batch are stored.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use super::auth::KeyCache;
use super::{AppState, error};
use crate::ingest::pipeline::{Committer, Job};
use crate::ingest::{Mapper, Rejection, content_id, parse_time};
use crate::metrics as m;
use crate::runtime::Snapshot;
use crate::store::ingest::BatchReport;
use crate::store::{Store, now_ms};

/// Largest message, as Segment documents it.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Largest `/v1/batch` request (after decompression), as Segment documents it.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Message types of the tracking API.
pub const KINDS: &[&str] = &["track", "identify", "page", "screen", "group", "alias"];
/// Most messages one commit takes; more wait for the next.
const GROUP_MAX: usize = 20_000;
/// Requests waiting for the committer; more wait for a slot (backpressure).
const QUEUE: usize = 1_024;

/// Hands checked messages to the committer.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Submission>,
    keys: KeyCache,
}

impl Handle {
    /// The credentials of `snap`'s manifest.
    pub fn keys(&self, snap: &Snapshot) -> Arc<super::auth::Keys> {
        self.keys.get(snap)
    }
}

/// One request's messages, waiting to be committed.
struct Submission {
    source: String,
    messages: Vec<Value>,
    reply: oneshot::Sender<Result<Vec<Option<Rejection>>, String>>,
}

/// Starts the committer on `tracker`; it ends when every [`Handle`] is gone.
pub fn start(
    store: Arc<Store>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    tracker: &tokio_util::task::TaskTracker,
) -> Handle {
    let (tx, rx) = mpsc::channel(QUEUE);
    tracker.spawn(committer(store, snapshot, rx));
    Handle { tx, keys: KeyCache::default() }
}

/// The collector's routes, with CORS for browser SDKs.
pub fn routes() -> Router<AppState> {
    let mut r = Router::new().route("/v1/batch", post(batch).options(preflight));
    for &kind in KINDS {
        r = r.route(
            &format!("/v1/{kind}"),
            post(move |s: State<AppState>, h: HeaderMap, b: Result<Bytes, BytesRejection>| single(s, h, b, kind))
                .options(preflight),
        );
    }
    r.layer(axum::middleware::from_fn(cors)).layer(axum::extract::DefaultBodyLimit::max(MAX_BATCH_BYTES))
}

async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// Lets browser SDKs on any origin post events (the write key, not the
/// origin, authorises them).
async fn cors(req: axum::extract::Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let preflight = req.method() == Method::OPTIONS;
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.unwrap_or(HeaderValue::from_static("*")));
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    if preflight {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("POST, OPTIONS"));
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Content-Type, Authorization, Content-Encoding"),
        );
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("86400"));
    }
    res
}

async fn batch(state: State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    receive(state, headers, body, None).await
}

async fn single(
    state: State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: &'static str,
) -> Response {
    receive(state, headers, body, Some(kind)).await
}

/// Why a request was refused: its status and message.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl Refusal {
    fn response(&self) -> Response {
        error(self.0, &self.1)
    }
}

/// A `/v1/batch` body; a single-message body is the message itself.
#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Option<Vec<&'a RawValue>>,
    #[serde(rename = "sentAt")]
    sent_at: Option<Value>,
    context: Option<Value>,
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
}

/// A message refused: its index in the request and why.
#[derive(Debug, serde::Serialize)]
struct Rejected {
    index: usize,
    #[serde(rename = "messageId", skip_serializing_if = "Option::is_none")]
    message_id: Option<String>,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    reason: String,
}

async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Option<&'static str>,
) -> Response {
    let limit = if kind.is_some() { MAX_MESSAGE_BYTES } else { MAX_BATCH_BYTES };
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return too_large(limit, kind);
        }
        Err(e) => return error(e.status(), &e.body_text()),
    };
    if let Err(r) = content_type(&headers) {
        return r.response();
    }
    // A basic-auth key is checked before the body is read further.
    let header_key = match headers.get(header::AUTHORIZATION).map(|h| h.to_str().unwrap_or("")) {
        Some(h) => match super::auth::basic_user(h) {
            Some(k) => Some(k),
            None => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "the Authorization header is not HTTP basic auth with the write key as user name",
                );
            }
        },
        None => None,
    };
    let keys = state.collector.keys.get(&state.snap());
    if let Some(k) = &header_key
        && keys.source(k).is_none()
    {
        return error(StatusCode::UNAUTHORIZED, "unknown write key");
    }
    let raw = match decode(&headers, &body, limit) {
        Ok(raw) => raw,
        Err(Refusal(StatusCode::PAYLOAD_TOO_LARGE, _)) => return too_large(limit, kind),
        Err(r) => return r.response(),
    };
    let (source, messages, mut rejected) = match parse(&raw, kind, header_key, &keys) {
        Ok(p) => p,
        Err(r) => return r.response(),
    };
    let total = messages.len() + rejected.len();
    metrics::counter!(m::EVENTS_RECEIVED, "source" => source.clone()).increment(total as u64);
    for r in &rejected {
        metrics::counter!(m::EVENTS_REJECTED, "source" => source.clone(), "reason" => r.code).increment(1);
    }
    if messages.is_empty() {
        return answer(&source, total, rejected, kind);
    }
    let ids: Vec<(usize, Option<String>)> = messages.iter().map(|(i, v)| (*i, message_id(v))).collect();
    let (reply, wait) = oneshot::channel();
    let sub = Submission { source: source.clone(), messages: messages.into_iter().map(|(_, v)| v).collect(), reply };
    if state.collector.tx.send(sub).await.is_err() {
        return unavailable("the collector is shutting down");
    }
    match wait.await {
        Ok(Ok(outcomes)) => {
            for ((index, message_id), outcome) in ids.into_iter().zip(outcomes) {
                if let Some(reason) = outcome {
                    metrics::counter!(m::EVENTS_REJECTED, "source" => source.clone(), "reason" => reason.code)
                        .increment(1);
                    rejected.push(Rejected {
                        index,
                        message_id,
                        code: reason.code,
                        field: reason.field,
                        reason: reason.message,
                    });
                }
            }
            rejected.sort_by_key(|r| r.index);
            answer(&source, total, rejected, kind)
        }
        Ok(Err(e)) => {
            tracing::error!(source, error = %e, "events could not be stored");
            unavailable("the events could not be stored; send them again")
        }
        Err(_) => unavailable("the events were not stored; send them again"),
    }
}

/// 200 when anything was stored (the rejected messages are listed), else 400.
fn answer(source: &str, total: usize, rejected: Vec<Rejected>, kind: Option<&str>) -> Response {
    let stored = total - rejected.len();
    metrics::counter!(m::EVENTS_ACCEPTED, "source" => source.to_owned()).increment(stored as u64);
    if rejected.is_empty() {
        return axum::Json(json!({"success": true})).into_response();
    }
    if stored > 0 {
        return axum::Json(json!({"success": true, "stored": stored, "rejected": rejected})).into_response();
    }
    let what = match (kind, rejected.first()) {
        (Some(_), Some(r)) => format!("the message was rejected: {}", r.reason),
        _ => format!("all {} messages were rejected", rejected.len()),
    };
    (StatusCode::BAD_REQUEST, axum::Json(json!({"success": false, "code": 400, "message": what, "rejected": rejected})))
        .into_response()
}

fn unavailable(message: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn too_large(limit: usize, kind: Option<&str>) -> Response {
    let what = if kind.is_some() { "a message" } else { "a batch" };
    let body = json!({
        "success": false,
        "code": 413,
        "message": format!("the request is larger than {} KB, the limit for {what}", limit / 1024),
        "limit_bytes": limit,
    });
    (StatusCode::PAYLOAD_TOO_LARGE, axum::Json(body)).into_response()
}

/// JSON (`application/json`), or `text/plain` as browsers' `sendBeacon` sends it.
fn content_type(headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    let ct = ct.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if ct == "application/json" || ct == "text/plain" || ct.ends_with("+json") {
        Ok(())
    } else {
        Err(Refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type `{ct}` is not accepted; send `application/json`"),
        ))
    }
}

/// The body, decompressed when it is gzip, at most `limit` bytes.
fn decode<'b>(headers: &HeaderMap, body: &'b Bytes, limit: usize) -> Result<std::borrow::Cow<'b, [u8]>, Refusal> {
    use std::io::Read;
    let encoding = headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    match encoding.as_deref() {
        None | Some("") | Some("identity") => {
            if body.len() > limit {
                return Err(Refusal(StatusCode::PAYLOAD_TOO_LARGE, String::new()));
            }
            Ok(std::borrow::Cow::Borrowed(body))
        }
        Some("gzip") => {
            let mut out = Vec::with_capacity((body.len() * 4).min(limit + 1));
            let read = flate2::read::MultiGzDecoder::new(&body[..]).take(limit as u64 + 1).read_to_end(&mut out);
            match read {
                Ok(_) if out.len() > limit => Err(Refusal(StatusCode::PAYLOAD_TOO_LARGE, String::new())),
                Ok(_) => Ok(std::borrow::Cow::Owned(out)),
                Err(e) => Err(Refusal(StatusCode::BAD_REQUEST, format!("the gzip body cannot be read: {e}"))),
            }
        }
        Some(other) => Err(Refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding `{other}` is not accepted; send gzip or no encoding"),
        )),
    }
}

type Parsed = (String, Vec<(usize, Value)>, Vec<Rejected>);

/// The request's source and its messages, checked and completed; the
/// messages refused are listed with their reason.
fn parse(
    raw: &[u8],
    kind: Option<&'static str>,
    header_key: Option<String>,
    keys: &super::auth::Keys,
) -> Result<Parsed, Refusal> {
    let malformed = |e: serde_json::Error| Refusal(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}"));
    let (body_key, sent_at, context, raws): (Option<String>, Option<Value>, Option<Value>, Vec<&RawValue>) = match kind
    {
        None => {
            let b: BatchBody<'_> = serde_json::from_slice(raw).map_err(malformed)?;
            let Some(batch) = b.batch else {
                return Err(Refusal(StatusCode::BAD_REQUEST, "the body has no `batch` list of messages".into()));
            };
            (b.write_key, b.sent_at, b.context, batch)
        }
        Some(_) => {
            let one: &RawValue = serde_json::from_slice(raw).map_err(malformed)?;
            let key = serde_json::from_str::<Value>(one.get())
                .ok()
                .and_then(|v| v.get("writeKey")?.as_str().map(str::to_owned));
            (key, None, None, vec![one])
        }
    };
    let source = match header_key.or(body_key) {
        None => {
            return Err(Refusal(
                StatusCode::UNAUTHORIZED,
                "no write key: send it as the HTTP basic-auth user name or as `writeKey` in the body".into(),
            ));
        }
        Some(k) => match keys.source(&k) {
            Some(s) => s.to_owned(),
            None => return Err(Refusal(StatusCode::UNAUTHORIZED, "unknown write key".into())),
        },
    };
    let received = now_ms();
    let mut good = Vec::with_capacity(raws.len());
    let mut rejected = Vec::new();
    for (index, r) in raws.into_iter().enumerate() {
        match message(r, index, kind, sent_at.as_ref(), context.as_ref(), received) {
            Ok(v) => good.push((index, v)),
            Err(r) => {
                rejected.push(Rejected { index, message_id: None, code: r.code, field: r.field, reason: r.message })
            }
        }
    }
    Ok((source, good, rejected))
}

/// One message checked and completed.
fn message(
    raw: &RawValue,
    index: usize,
    kind: Option<&'static str>,
    batch_sent_at: Option<&Value>,
    batch_context: Option<&Value>,
    received: i64,
) -> Result<Value, Rejection> {
    let at = || if kind.is_some() { "the message".to_owned() } else { format!("message {index}") };
    if raw.get().len() > MAX_MESSAGE_BYTES {
        return Err(Rejection::new(
            "too_large",
            None,
            format!("{} is larger than {} KB, the limit for a message", at(), MAX_MESSAGE_BYTES / 1024),
        ));
    }
    let Ok(Value::Object(mut msg)) = serde_json::from_str::<Value>(raw.get()) else {
        return Err(Rejection::new("not_object", None, format!("{} is not a JSON object", at())));
    };
    match (kind, msg.get("type").and_then(Value::as_str)) {
        (Some(k), _) => {
            msg.insert("type".into(), Value::String(k.into()));
        }
        (None, Some(t)) if KINDS.contains(&t) => {}
        (None, Some(t)) => {
            return Err(Rejection::new(
                "type",
                Some("type"),
                format!("{} has `type` `{t}`; it must be one of {}", at(), KINDS.join(", ")),
            ));
        }
        (None, None) => {
            return Err(Rejection::new(
                "type",
                Some("type"),
                format!("{} has no `type`; it must be one of {}", at(), KINDS.join(", ")),
            ));
        }
    }
    let id_present = |f: &str| match msg.get(f) {
        Some(Value::String(s)) => !s.trim().is_empty(),
        Some(Value::Number(_)) => true,
        _ => false,
    };
    if !id_present("userId") && !id_present("anonymousId") {
        return Err(Rejection::new(
            "no_id",
            Some("userId"),
            format!("{} has neither `userId` nor `anonymousId`", at()),
        ));
    }
    if msg.get("type").and_then(Value::as_str) == Some("alias") && !id_present("previousId") {
        return Err(Rejection::new("no_id", Some("previousId"), format!("{} is an alias without `previousId`", at())));
    }
    // Alias links a previous id (usually the anonymous one) to the user id.
    if msg.get("type").and_then(Value::as_str) == Some("alias")
        && !id_present("anonymousId")
        && let Some(prev) = msg.get("previousId").cloned()
    {
        msg.insert("anonymousId".into(), prev);
    }
    // Traits sent in `context.traits` (RudderStack's identify, analytics.js
    // on every call) are read as `traits` when the message has none.
    if !msg.contains_key("traits")
        && let Some(t) = msg.get("context").and_then(|c| c.get("traits")).cloned()
    {
        msg.insert("traits".into(), t);
    }
    if let Some(Value::Number(n)) = msg.get("userId") {
        let s = n.to_string();
        msg.insert("userId".into(), Value::String(s));
    }
    if !msg.contains_key("context")
        && let Some(c) = batch_context
    {
        msg.insert("context".into(), c.clone());
    }
    complete_times(&mut msg, batch_sent_at, received);
    if !matches!(msg.get("messageId"), Some(Value::String(s)) if !s.is_empty()) {
        // Retries of the same message get the same id, so it is stored once.
        let id = content_id(&Value::Object(msg.clone()));
        msg.insert("messageId".into(), Value::String(format!("cdp-{id}")));
    }
    Ok(Value::Object(msg))
}

/// Sets `receivedAt`, keeps the client's `timestamp` as
/// `originalTimestamp`, and corrects `timestamp` for the client's clock
/// the way Segment does: `receivedAt - (sentAt - originalTimestamp)`.
fn complete_times(msg: &mut Map<String, Value>, batch_sent_at: Option<&Value>, received: i64) {
    let original = msg.get("timestamp").or_else(|| msg.get("originalTimestamp")).and_then(parse_time);
    let sent = msg.get("sentAt").or(batch_sent_at).and_then(parse_time);
    let corrected = match (original, sent) {
        (Some(o), Some(s)) => received - (s - o),
        (Some(o), None) => o,
        (None, _) => received,
    };
    let rfc = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
            .unwrap_or(Value::Null)
    };
    if let Some(o) = original
        && !msg.contains_key("originalTimestamp")
    {
        msg.insert("originalTimestamp".into(), rfc(o));
    }
    msg.insert("receivedAt".into(), rfc(received));
    msg.insert("timestamp".into(), rfc(corrected));
}

fn message_id(v: &Value) -> Option<String> {
    v.get("messageId").and_then(Value::as_str).map(str::to_owned)
}

/// Commits what arrived while the previous commit ran, in one transaction,
/// and answers each request with its messages' outcomes. While one group
/// is committed the next is gathered and mapped.
async fn committer(store: Arc<Store>, snapshot: watch::Receiver<Arc<Snapshot>>, mut rx: mpsc::Receiver<Submission>) {
    let mut committer: Option<(String, Committer<Replies>)> = None;
    while let Some(first) = rx.recv().await {
        let mut n = first.messages.len();
        let mut group = vec![first];
        while n < GROUP_MAX {
            match rx.try_recv() {
                Ok(s) => {
                    n += s.messages.len();
                    group.push(s);
                }
                Err(_) => break,
            }
        }
        let snap = snapshot.borrow().clone();
        let (records, outcomes) = map_group(&snap, &mut group);
        let replies: Replies = group.into_iter().map(|s| s.reply).zip(outcomes).collect();
        // A reload with other identity rules gets its own committer, after
        // the old one's batch is in.
        if committer.as_ref().is_some_and(|(sha, _)| *sha != snap.sha256)
            && let Some((_, mut old)) = committer.take()
        {
            answer_group(old.wait().await);
        }
        let (_, c) = committer.get_or_insert_with(|| {
            (snap.sha256.clone(), Committer::new(store.clone(), snap.identity.clone(), "collector"))
        });
        let job = Job { records, cursor: None, fence: None, tag: replies };
        answer_group(c.submit(job).await);
        if rx.is_empty() {
            // Nothing to gather meanwhile: answer this group now.
            answer_group(c.wait().await);
        }
    }
    if let Some((_, mut c)) = committer {
        answer_group(c.wait().await);
    }
}

/// Each request's reply channel and its messages' outcomes.
type Replies = Vec<(oneshot::Sender<Result<Vec<Option<Rejection>>, String>>, Vec<Option<Rejection>>)>;

/// Answers the requests of a committed (or failed) group.
fn answer_group(done: Option<Result<(BatchReport, Replies), crate::store::StoreError>>) {
    match done {
        None => {}
        Some(Ok((_, replies))) => {
            for (reply, outcomes) in replies {
                let _ = reply.send(Ok(outcomes));
            }
        }
        Some(Err(e)) => {
            // The replies went with the failed task; their requests see the
            // channel close and answer 503, and the SDKs send them again.
            tracing::error!(error = %e, "a collector commit failed");
        }
    }
}

/// Maps every message of the group by its source's `map`: the records to
/// store, and per request each message's rejection (or `None`).
fn map_group(snap: &Snapshot, group: &mut [Submission]) -> (Vec<crate::ingest::Record>, Vec<Vec<Option<Rejection>>>) {
    let now = now_ms();
    let mut mappers: HashMap<String, Result<Mapper<'_>, String>> = HashMap::new();
    let mut records = Vec::new();
    let mut outcomes = Vec::with_capacity(group.len());
    for s in group.iter_mut() {
        let mapper = mappers.entry(s.source.clone()).or_insert_with(|| Mapper::new(&snap.manifest, &s.source));
        let mut out = Vec::with_capacity(s.messages.len());
        for msg in std::mem::take(&mut s.messages) {
            match mapper {
                Ok(mapper) => match mapper.map(&msg, now) {
                    Ok(r) => {
                        records.push(r);
                        out.push(None);
                    }
                    Err(r) => out.push(Some(r)),
                },
                Err(e) => out.push(Some(Rejection::new(
                    "source",
                    None,
                    format!("the source is not in the running manifest: {e}"),
                ))),
            }
        }
        outcomes.push(out);
    }
    (records, outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: &Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).expect("raw")
    }

    #[test]
    fn skew_is_corrected_from_sent_at() {
        // The client's clock is 10 minutes fast: it stamped the event 1 s
        // before sending it; the server received it at `received`.
        let received = 1_700_000_000_000;
        let msg = json!({"type": "track", "userId": "u1", "event": "x",
            "timestamp": "2023-11-14T22:23:19.000Z", "sentAt": "2023-11-14T22:23:20.000Z"});
        let v = message(&raw(&msg), 0, None, None, None, received).expect("ok");
        let ts = parse_time(&v["timestamp"]).expect("timestamp");
        assert_eq!(ts, received - 1_000);
        assert_eq!(v["originalTimestamp"], "2023-11-14T22:23:19.000Z");
        assert!(v["messageId"].as_str().is_some_and(|s| s.starts_with("cdp-")));
    }

    #[test]
    fn messages_need_an_id_and_a_known_type() {
        let none = json!({"type": "track", "event": "x"});
        let e = message(&raw(&none), 3, None, None, None, 0).expect_err("no id");
        assert!(e.message.contains("message 3 has neither `userId` nor `anonymousId`"), "{e}");
        assert_eq!((e.code, e.field.as_deref()), ("no_id", Some("userId")));
        let bad = json!({"type": "tracked", "userId": "u"});
        let e = message(&raw(&bad), 0, None, None, None, 0).expect_err("bad type");
        assert!(e.message.contains("`tracked`"), "{e}");
        // On a single-message route the route decides the type.
        let v = message(&raw(&json!({"userId": 7})), 0, Some("identify"), None, None, 0).expect("ok");
        assert_eq!(v["type"], "identify");
        assert_eq!(v["userId"], "7");
        let alias = json!({"type": "alias", "userId": "u"});
        assert!(message(&raw(&alias), 0, None, None, None, 0).is_err());
    }

    #[test]
    fn message_ids_are_stable_for_retries() {
        let msg = json!({"type": "track", "userId": "u1", "event": "x", "timestamp": "2023-11-14T22:23:19.000Z"});
        let a = message(&raw(&msg), 0, None, None, None, 5).expect("ok");
        let b = message(&raw(&msg), 0, None, None, None, 5).expect("ok");
        assert_eq!(a["messageId"], b["messageId"]);
    }

    #[test]
    fn gzip_bodies_are_bounded() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b' '; 2 * MAX_BATCH_BYTES]).expect("write");
        let bomb = Bytes::from(enc.finish().expect("gzip"));
        assert!(bomb.len() < 10_000);
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let e = decode(&h, &bomb, MAX_BATCH_BYTES).expect_err("bomb");
        assert_eq!(e.0, StatusCode::PAYLOAD_TOO_LARGE);
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert_eq!(decode(&h, &bomb, MAX_BATCH_BYTES).expect_err("br").0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
