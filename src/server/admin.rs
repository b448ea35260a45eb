//! The admin API under `/admin/v1/`: look inside a running cdp — profiles
//! (the same JSON as `cdp profile get --format json`), their explanation,
//! audiences, syncs, runs, status, the audit log — and act on it: run a
//! sync now, reload the manifest, split an identifier off a profile.
//!
//! Every request needs a bearer token from `server.tokens` (or
//! `server.admin_token`). Roles: `admin` may do everything; `read_only`
//! and `privacy` may read, and every state-changing route answers them 403,
//! except the privacy operations under `/admin/v1/privacy/`, which are for
//! `privacy` and `admin` only.
//! Every request — allowed or not — appends a row to the audit log with the
//! token's name; if that row cannot be written, personal data is not
//! returned.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{AppState, Control, RunRefused, error};
use crate::manifest::types::Role;
use crate::store::audit::AuditEntry;
use crate::store::profile::LookupError;

/// Most events a profile read returns.
const MAX_EVENTS: usize = 1_000;

/// The caller, as the auth layer found it.
#[derive(Debug, Clone)]
struct Caller {
    name: String,
    role: Role,
}

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/admin/v1/status", get(status))
        .route("/admin/v1/profiles/{key}/{value}", get(profile))
        .route("/admin/v1/profiles/{key}/{value}/explain", get(explain))
        .route("/admin/v1/profiles/{key}/{value}/unmerge", post(unmerge))
        .route("/admin/v1/audiences", get(audiences))
        .route("/admin/v1/syncs", get(syncs))
        .route("/admin/v1/syncs/{name}/runs", get(runs))
        .route("/admin/v1/syncs/{name}/run", post(run_sync))
        .route("/admin/v1/reload", post(reload))
        .route("/admin/v1/audit", get(audit))
        .route("/admin/v1/privacy/requests", get(privacy_requests))
        .route("/admin/v1/privacy/requests/{id}", get(privacy_request))
        .route("/admin/v1/privacy/{kind}", post(privacy))
        .route_layer(axum::middleware::from_fn_with_state(state, guard))
}

/// Authenticates the bearer token, enforces its role, and writes the
/// audit row.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or_else(String::new, |p| p.as_str().to_owned());
    let action = format!("{} {route}", req.method());
    let target = target(req.uri().path());
    let keys = state.collector.keys(&state.snap());
    let presented =
        req.headers().get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()).and_then(super::auth::bearer);
    let caller = presented.and_then(|t| keys.token(t)).map(|(name, role)| Caller { name: name.to_owned(), role });
    let response = match &caller {
        None if !keys.has_tokens() => error(
            StatusCode::UNAUTHORIZED,
            "the admin API has no tokens: add `server.tokens` (or `server.admin_token`) to the manifest",
        ),
        None => {
            let mut r = error(StatusCode::UNAUTHORIZED, "a valid `Authorization: Bearer TOKEN` header is required");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"cdp\""));
            r
        }
        Some(c) if !allowed(c.role, req.method(), &route) => error(
            StatusCode::FORBIDDEN,
            &if route.starts_with(PRIVACY) {
                format!(
                    "token `{}` has role `{}`; privacy operations need `privacy` or `admin`",
                    c.name,
                    c.role.as_str()
                )
            } else {
                format!("token `{}` has role `{}`, which may not change state", c.name, c.role.as_str())
            },
        ),
        Some(c) => {
            let mut req = req;
            req.extensions_mut().insert(c.clone());
            next.run(req).await
        }
    };
    let actor = caller.as_ref().map_or("-", |c| c.name.as_str());
    let outcome = outcome(response.status());
    let entry = AuditEntry { actor, via: "api", action: &action, target: &target, outcome: &outcome };
    match state.store.audit_append(&entry).await {
        Ok(_) => response,
        Err(e) => {
            tracing::error!(error = %e, action, "cannot write the audit log; refusing the request");
            error(StatusCode::SERVICE_UNAVAILABLE, "the audit log cannot be written; nothing is returned without it")
        }
    }
}

/// Routes of privacy operations.
const PRIVACY: &str = "/admin/v1/privacy/";

/// Privacy routes for `privacy` and `admin`; elsewhere reads for every
/// role and changes for `admin` only.
fn allowed(role: Role, method: &Method, route: &str) -> bool {
    if route.starts_with(PRIVACY) {
        return matches!(role, Role::Privacy | Role::Admin);
    }
    matches!(*method, Method::GET | Method::HEAD) || role == Role::Admin
}

/// What the request is about, for the audit log: the path after
/// `/admin/v1/`, percent-decoded (`profiles/email/ada@example.org`).
fn target(path: &str) -> String {
    let rest = path.strip_prefix("/admin/v1/").unwrap_or(path);
    percent_decode(rest)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn outcome(status: StatusCode) -> String {
    match status.as_u16() {
        200..=299 => "ok".into(),
        401 => "unauthorized".into(),
        403 => "denied".into(),
        404 => "not_found".into(),
        s => format!("error {s}"),
    }
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "admin API request failed");
    error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
}

fn lookup_error(e: LookupError) -> Response {
    match e {
        LookupError::NotFound(..) => error(StatusCode::NOT_FOUND, &e.to_string()),
        LookupError::UnknownKey(..) | LookupError::Invalid(..) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        LookupError::AlreadyIsolated(..) => error(StatusCode::CONFLICT, &e.to_string()),
        other => internal(other),
    }
}

/// The status document of the running manifest (`cdp status --format json`).
async fn status_document(state: &AppState) -> Result<Value, Response> {
    let snap = state.snap();
    let applied = state.store.applied_manifest().await.map_err(internal)?;
    crate::runtime::status::document(&state.store, &snap.resolved, applied.as_ref()).await.map_err(internal)
}

async fn status(State(state): State<AppState>) -> Response {
    match status_document(&state).await {
        Ok(doc) => axum::Json(doc).into_response(),
        Err(r) => r,
    }
}

async fn profile(
    State(state): State<AppState>,
    Path((key, value)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let events = q.get("events").and_then(|e| e.parse::<usize>().ok()).unwrap_or(20).min(MAX_EVENTS);
    let snap = state.snap();
    let p = match state.store.find_profile(&snap.manifest, &key, &value).await {
        Ok(p) => p,
        Err(e) => return lookup_error(e),
    };
    match state.store.golden_with(&snap.manifest, &snap.model, p, events).await {
        Ok(g) => axum::Json(g).into_response(),
        Err(e) => internal(e),
    }
}

async fn explain(State(state): State<AppState>, Path((key, value)): Path<(String, String)>) -> Response {
    let snap = state.snap();
    let p = match state.store.find_profile(&snap.manifest, &key, &value).await {
        Ok(p) => p,
        Err(e) => return lookup_error(e),
    };
    match state.store.explain(p).await {
        Ok(x) => axum::Json(x).into_response(),
        Err(e) => internal(e),
    }
}

async fn unmerge(State(state): State<AppState>, Path((key, value)): Path<(String, String)>) -> Response {
    let snap = state.snap();
    match state.store.unmerge(&snap.manifest, &key, &value).await {
        Ok((from, to)) => {
            axum::Json(json!({"split": format!("{key}={value}"), "from": from, "into": to})).into_response()
        }
        Err(e) => lookup_error(e),
    }
}

async fn audiences(State(state): State<AppState>) -> Response {
    let snap = state.snap();
    let list: Vec<Value> =
        snap.manifest.audiences.iter().map(|(name, a)| json!({"name": name, "definition": a})).collect();
    axum::Json(json!({"audiences": list})).into_response()
}

async fn syncs(State(state): State<AppState>) -> Response {
    match status_document(&state).await {
        Ok(doc) => axum::Json(json!({"syncs": doc["syncs"]})).into_response(),
        Err(r) => r,
    }
}

async fn runs(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !state.snap().manifest.sources.contains_key(&name) {
        return error(StatusCode::NOT_FOUND, &format!("`{name}` is not a source in the running manifest"));
    }
    let limit = q.get("limit").and_then(|l| l.parse::<i64>().ok()).unwrap_or(20).clamp(1, 1_000);
    match state.store.runs(&name, limit).await {
        Ok(rows) => {
            let runs: Vec<Value> = rows.iter().map(crate::runtime::status::run_json).collect();
            axum::Json(json!({"sync": name, "runs": runs})).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn run_sync(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let (reply, wait) = tokio::sync::oneshot::channel();
    if state.control.send(Control::RunSync { name: name.clone(), reply }).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the runtime is shutting down");
    }
    match wait.await {
        Ok(Ok(())) => (StatusCode::ACCEPTED, axum::Json(json!({"sync": name, "started": true}))).into_response(),
        Ok(Err(RunRefused::Unknown(m))) => error(StatusCode::NOT_FOUND, &m),
        Ok(Err(RunRefused::Busy(m))) => error(StatusCode::CONFLICT, &m),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the runtime is shutting down"),
    }
}

async fn reload(State(state): State<AppState>) -> Response {
    match state.control.send(Control::Reload).await {
        Ok(()) => {
            (StatusCode::ACCEPTED, axum::Json(json!({"reload": "requested", "see": "/admin/v1/status → reload"})))
                .into_response()
        }
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the runtime is shutting down"),
    }
}

async fn audit(State(state): State<AppState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let since = match q.get("since") {
        None => None,
        Some(s) => match crate::ingest::parse_time(&Value::String(s.clone())) {
            Some(t) => Some(t),
            None => return error(StatusCode::BAD_REQUEST, "`since` must be RFC 3339 or epoch seconds/milliseconds"),
        },
    };
    let limit = q.get("limit").and_then(|l| l.parse::<i64>().ok()).unwrap_or(1_000).clamp(1, 10_000);
    match state.store.audit_rows(since, limit).await {
        Ok(rows) => axum::Json(json!({"rows": rows})).into_response(),
        Err(e) => internal(e),
    }
}

/// `POST /admin/v1/privacy/{kind}` with `{"key": …, "value": …}` in the
/// body (so the identifier never appears in a URL or the audit log).
async fn privacy(
    State(state): State<AppState>,
    Path(kind): Path<String>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: axum::body::Bytes,
) -> Response {
    let Some(kind) = crate::privacy::Kind::parse(&kind) else {
        return error(StatusCode::NOT_FOUND, "privacy operations: export, delete, suppress, unsuppress");
    };
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the body must be JSON {{\"key\", \"value\"}}: {e}")),
    };
    let (Some(key), Some(value)) = (req["key"].as_str(), req["value"].as_str()) else {
        return error(StatusCode::BAD_REQUEST, "the body needs `key` (an identity key) and `value`");
    };
    let snap = state.snap();
    let deletes = |d: &str| snap.sinks.get(d).map(|x| x.deletes);
    let actor = format!("api:{}", caller.name);
    match crate::privacy::perform(&state.store, &snap.manifest, kind, key, value, &actor, &deletes).await {
        Ok(o) if o.not_found => {
            let mut r = error(StatusCode::NOT_FOUND, &o.summary);
            r.headers_mut().insert("x-cdp-request", HeaderValue::from(o.request));
            r
        }
        Ok(o) => {
            let mut doc = json!({"request_id": o.request, "kind": kind.as_str(), "summary": o.summary});
            if let Some(e) = o.export {
                doc["export"] = e;
            }
            if let Some(er) = o.erasure {
                doc["destinations"] = json!(er.destinations);
                doc["rows"] = json!(er.rows);
            }
            axum::Json(doc).into_response()
        }
        Err(crate::privacy::RequestError::Lookup(e)) => lookup_error(e),
        Err(e) => internal(e),
    }
}

async fn privacy_requests(State(state): State<AppState>) -> Response {
    match state.store.requests(None, 100).await {
        Ok(rows) => axum::Json(json!({"requests": rows})).into_response(),
        Err(e) => internal(e),
    }
}

async fn privacy_request(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    match state.store.requests(Some(id), 1).await {
        Ok(mut rows) if !rows.is_empty() => axum::Json(rows.remove(0)).into_response(),
        Ok(_) => error(StatusCode::NOT_FOUND, &format!("no privacy request {id}")),
        Err(e) => internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_decoded_paths() {
        assert_eq!(target("/admin/v1/profiles/email/ada%40example.org"), "profiles/email/ada@example.org");
        assert_eq!(target("/admin/v1/syncs/loyalty/run"), "syncs/loyalty/run");
        assert_eq!(target("/admin/v1/x%zz"), "x%zz");
    }

    #[test]
    fn read_only_roles_only_read() {
        assert!(allowed(Role::ReadOnly, &Method::GET, "/admin/v1/status"));
        assert!(!allowed(Role::ReadOnly, &Method::POST, "/admin/v1/reload"));
        assert!(!allowed(Role::Privacy, &Method::POST, "/admin/v1/reload"));
        assert!(allowed(Role::Admin, &Method::POST, "/admin/v1/reload"));
        assert!(allowed(Role::Privacy, &Method::POST, "/admin/v1/privacy/{kind}"));
        assert!(allowed(Role::Admin, &Method::POST, "/admin/v1/privacy/{kind}"));
        assert!(!allowed(Role::ReadOnly, &Method::GET, "/admin/v1/privacy/requests"));
    }
}
