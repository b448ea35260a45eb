//! # dest-webhook
//!
//! A cdp destination connector that delivers profile changes to an HTTP
//! endpoint, `batch_size` records per request, through the host's
//! `http.send` (only the manifest entry's `allow_hosts` are reachable).
//!
//! ```yaml
//! destinations:
//!   crm:
//!     plugin: webhook
//!     allow_hosts: [hooks.crm.example]
//!     config:
//!       url: https://hooks.crm.example/cdp
//!       format: json            # json | ndjson | xml | csv
//!       signing_secret: "${CRM_HOOK_SECRET}"
//!       batch_size: 100
//!       fields: [first_name, tier]
//!       delete_url: https://hooks.crm.example/cdp/erase
//! ```
//!
//! ## Requests
//!
//! * Body by `format`:
//!   * `json`: `{"records": [<record>, …]}`, each record as the host sent it
//!     (`key`, `op`, `profile_id`, `audience`, `identities`, `traits`,
//!     `occurred_at`).
//!   * `ndjson`: one record per line.
//!   * `xml`: `<records><record key="…" op="…"><profile_id>…</profile_id>
//!     <audience>…</audience><identities><email>…</email></identities>
//!     <traits><first_name>…</first_name></traits><occurred_at>…</occurred_at>
//!     </record></records>`. Text and attributes are escaped; a name that is
//!     not a valid XML element name has its invalid characters replaced by
//!     `_` (and a `_` prefix if needed) and carries the original in a
//!     `name="…"` attribute. Arrays become repeated `<item>` elements,
//!     objects nested elements, `null` an empty element.
//!   * `csv`: a header row `key,op,profile_id,audience,<identity types…>,
//!     <traits…>,occurred_at` (union of the batch's keys in first-seen
//!     order, or `fields` for the traits), RFC 4180 quoting, CRLF line ends;
//!     several values of one identity type are joined with `;`.
//! * `fields` limits the traits sent to the listed names.
//! * `Idempotency-Key`: the SHA-256 hex of the request's record keys joined
//!   by `\n`, so a retried request carries the same key.
//! * With `signing_secret`: `X-Cdp-Timestamp: <unix seconds>` and
//!   `X-Cdp-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
//!   (the scheme of Stripe's webhooks). To verify: take `t` and `v1` from the
//!   header, compute HMAC-SHA256 with the secret over the bytes of `t`, a
//!   `.` and the exact body, compare with `v1` in constant time, and refuse
//!   a `t` more than a few minutes from your clock (replays).
//! * `csv` cells that start with `=`, `+`, `-`, `@`, a tab or a carriage
//!   return get a leading `'`, so a spreadsheet shows them as text instead of
//!   running them as formulas (OWASP, CSV injection).
//!
//! ## Responses
//!
//! * 2xx with a JSON body `{"results": [{"index": i, "status": "rejected",
//!   "reason": "…"}]}` or `{"rejected": [{"index": i, "reason": "…"}]}`:
//!   those records (indexes within the request) are rejected as `data`
//!   errors, the rest accepted. Any other 2xx: all accepted.
//! * 429 → `rate-limited` with `Retry-After`; 5xx, 408 → `transient`;
//!   401 → `auth`; 403 → `permission`; 404, 405 and redirects → `config`
//!   (the URL is wrong): the whole `write` fails and the host retries or
//!   stops. Requests of the batch already delivered are sent again on retry
//!   with the same `Idempotency-Key`.
//! * Any other 4xx: every record of that request is rejected as a `data`
//!   error; the other requests of the batch go on.
//!
//! ## Erasure
//!
//! With `delete_url`, `delete` POSTs `{"delete": [{"key", "profile_id",
//! "identities"}, …]}` there (same signing and idempotency headers, same
//! response handling); without it `delete` answers `unsupported`.

pub mod body;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use cdp_plugin_sdk::http::{self, Request, Response};
use cdp_plugin_sdk::{
    ConnectorError, DeleteRecord, Destination, DestinationRecord, DestinationWriter, ErrorClass, Rejection, Spec,
    WriteAck, capability, log,
};
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub use body::Format;

/// The `config:` of a webhook destination.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Endpoint receiving the batches.
    pub url: String,
    /// `POST` (default), `PUT` or `PATCH`.
    #[serde(default = "default_method")]
    pub method: String,
    /// Body format.
    #[serde(default)]
    pub format: Format,
    /// Extra request headers (values are treated as secrets).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Key for the `X-Cdp-Signature` HMAC.
    #[serde(default)]
    pub signing_secret: Option<String>,
    /// Records per request.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Traits to send; all when absent.
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    /// Endpoint receiving erasure requests; `delete` is unsupported without it.
    #[serde(default)]
    pub delete_url: Option<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("url", &self.url)
            .field("method", &self.method)
            .field("format", &self.format)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("signing_secret", &self.signing_secret.as_ref().map(|_| "***"))
            .field("batch_size", &self.batch_size)
            .field("fields", &self.fields)
            .field("delete_url", &self.delete_url)
            .finish()
    }
}

fn default_method() -> String {
    "POST".to_string()
}

fn default_batch_size() -> usize {
    100
}

fn check_url(url: &str, field: &str) -> Result<(), ConnectorError> {
    let lower = url.to_ascii_lowercase();
    if (lower.starts_with("https://") || lower.starts_with("http://")) && url.len() > 8 {
        Ok(())
    } else {
        Err(ConnectorError::config(
            "invalid_url",
            format!("config.{field}: must be an absolute http:// or https:// URL"),
        ))
    }
}

impl Config {
    /// Checks the config without sending anything.
    pub fn validate(&self) -> Result<(), ConnectorError> {
        check_url(&self.url, "url")?;
        if let Some(u) = &self.delete_url {
            check_url(u, "delete_url")?;
        }
        if !matches!(self.method.to_ascii_uppercase().as_str(), "POST" | "PUT" | "PATCH") {
            return Err(ConnectorError::config(
                "invalid_method",
                format!("config.method: must be POST, PUT or PATCH, got {:?}", self.method),
            ));
        }
        if self.batch_size == 0 {
            return Err(ConnectorError::config(
                "invalid_batch_size",
                "config.batch_size: must be > 0",
            ));
        }
        if self.signing_secret.as_deref() == Some("") {
            return Err(ConnectorError::config(
                "empty_signing_secret",
                "config.signing_secret: must not be empty (omit it to send unsigned requests)",
            ));
        }
        Ok(())
    }
}

/// The JSON Schema of [`Config`].
pub fn config_schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": false,
        "required": ["url"],
        "properties": {
            "url": {"type": "string", "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://"},
            "method": {"enum": ["POST", "PUT", "PATCH"], "default": "POST"},
            "format": {"enum": ["json", "ndjson", "xml", "csv"], "default": "json"},
            "headers": {"type": "object", "additionalProperties": {"type": "string", "x-secret": true}},
            "signing_secret": {"type": "string", "minLength": 1, "x-secret": true},
            "batch_size": {"type": "integer", "minimum": 1, "default": 100},
            "fields": {"type": "array", "items": {"type": "string"}},
            "delete_url": {"type": "string", "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://"}
        }
    })
}

/// Hex HMAC-SHA256 of `message` keyed with `secret`.
pub fn hmac_hex(secret: &[u8], message: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

/// `X-Cdp-Signature`: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
/// The timestamp is signed with the body, so a receiver that rejects old
/// timestamps is safe from replays (a body signed alone could be resent).
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut message = Vec::with_capacity(body.len() + 21);
    message.extend_from_slice(timestamp.to_string().as_bytes());
    message.push(b'.');
    message.extend_from_slice(body);
    format!("t={timestamp},v1={}", hmac_hex(secret, &message))
}

/// SHA-256 hex of the keys joined by `\n`.
pub fn idempotency_key<'a>(keys: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = Sha256::new();
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            h.update(b"\n");
        }
        h.update(k.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Per-record rejections in a 2xx response body, as `(index, reason)`;
/// `None` when the body does not carry per-record results.
pub fn parse_results(body: &[u8]) -> Option<Vec<(usize, String)>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let reason = |item: &Value| match item.get("reason") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "rejected by the endpoint".to_string(),
        Some(other) => other.to_string(),
    };
    let index = |item: &Value| item.get("index").and_then(Value::as_u64).map(|i| i as usize);
    if let Some(results) = v.get("results").and_then(Value::as_array) {
        return Some(
            results
                .iter()
                .filter(|r| {
                    r.get("status")
                        .and_then(Value::as_str)
                        .is_some_and(|s| matches!(s.to_ascii_lowercase().as_str(), "rejected" | "error" | "failed"))
                })
                .filter_map(|r| Some((index(r)?, reason(r))))
                .collect(),
        );
    }
    if let Some(rejected) = v.get("rejected").and_then(Value::as_array) {
        return Some(rejected.iter().filter_map(|r| Some((index(r)?, reason(r)))).collect());
    }
    None
}

/// The outcome of one request: rejections within it, or an error for the
/// whole `write`.
fn outcome(resp: &Response, len: usize) -> Result<Vec<Rejection>, ConnectorError> {
    match resp.status {
        200..=299 => {
            let results = parse_results(&resp.body).unwrap_or_default();
            let mut rejected = Vec::new();
            for (i, reason) in results {
                if i < len {
                    rejected.push(Rejection::new(i, ConnectorError::data("rejected_by_endpoint", reason)));
                } else {
                    log::warn!("the endpoint rejected record {i} of a request of {len}; ignored");
                }
            }
            Ok(rejected)
        }
        404 | 405 => Err(ConnectorError::config(
            format!("http_status_{}", resp.status),
            format!(
                "HTTP {}: the endpoint does not accept this request; check url and method",
                resp.status
            ),
        )),
        400..=499 if !matches!(resp.status, 401 | 403 | 408 | 429) => {
            let e = status_error(resp);
            Ok((0..len).map(|i| Rejection::new(i, e.clone())).collect())
        }
        300..=599 => Err(status_error(resp)),
        other => Err(ConnectorError::transient(
            format!("http_status_{other}"),
            format!("unexpected HTTP status {other}"),
        )),
    }
}

/// The error [`Response::error_for_status`] gives a 3xx–5xx response.
fn status_error(resp: &Response) -> ConnectorError {
    match resp.error_for_status(ErrorClass::Data) {
        Err(e) => e,
        Ok(()) => ConnectorError::internal("status_not_error", format!("HTTP {} is not an error", resp.status)),
    }
}

/// The webhook destination.
pub struct Webhook;

impl Destination for Webhook {
    type Config = Config;
    type Writer = WebhookWriter;

    fn spec() -> Spec {
        Spec::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
            .description("Delivers profile changes to an HTTP endpoint as JSON, NDJSON, XML or CSV")
            .config_schema(config_schema())
            .capability(capability::HTTP)
            .capability(capability::DELETE)
    }

    fn check(config: &Config) -> Result<(), ConnectorError> {
        config.validate()
    }

    fn open(config: Config) -> Result<WebhookWriter, ConnectorError> {
        config.validate()?;
        Ok(WebhookWriter { cfg: config })
    }
}

/// An open webhook writer.
#[derive(Debug)]
pub struct WebhookWriter {
    cfg: Config,
}

impl WebhookWriter {
    fn request(&self, method: &str, url: &str, content_type: &str, body: Vec<u8>, idempotency: String) -> Request {
        let mut req = Request::new(method, url)
            .headers(self.cfg.headers.clone())
            .header("Content-Type", content_type)
            .header("Idempotency-Key", idempotency);
        if let Some(secret) = &self.cfg.signing_secret {
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            req = req
                .header("X-Cdp-Timestamp", ts.to_string())
                .header("X-Cdp-Signature", signature(secret.as_bytes(), ts, &body));
        }
        req.body(body)
    }
}

impl DestinationWriter for WebhookWriter {
    fn write(&mut self, batch: Vec<DestinationRecord>) -> Result<WriteAck, ConnectorError> {
        let fields = self.cfg.fields.as_deref();
        let mut rejected = Vec::new();
        for (n, chunk) in batch.chunks(self.cfg.batch_size).enumerate() {
            let offset = n * self.cfg.batch_size;
            let records: Vec<DestinationRecord> = chunk.iter().map(|r| body::select_traits(r, fields)).collect();
            let body = body::render(self.cfg.format, &records, fields)?;
            let key = idempotency_key(chunk.iter().map(|r| r.key.as_str()));
            let req = self.request(
                &self.cfg.method,
                &self.cfg.url,
                self.cfg.format.content_type(),
                body,
                key,
            );
            let resp = http::send(req)?;
            for r in outcome(&resp, chunk.len())? {
                rejected.push(Rejection {
                    index: r.index + offset as u32,
                    reason: r.reason,
                });
            }
            log::metric("requests_total", 1.0);
        }
        Ok(WriteAck::with_rejections(batch.len(), rejected))
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        // Every accepted record was acknowledged by the endpoint already.
        Ok(())
    }

    fn delete(&mut self, batch: Vec<DeleteRecord>) -> Result<WriteAck, ConnectorError> {
        let Some(url) = self.cfg.delete_url.clone() else {
            return Err(ConnectorError::unsupported(
                "delete_unsupported",
                "no delete_url is configured for this webhook",
            ));
        };
        let mut rejected = Vec::new();
        for (n, chunk) in batch.chunks(self.cfg.batch_size).enumerate() {
            let offset = n * self.cfg.batch_size;
            let body = serde_json::to_vec(&json!({ "delete": chunk }))
                .map_err(|e| ConnectorError::internal("body_serialize", e.to_string()))?;
            let key = idempotency_key(chunk.iter().map(|r| r.key.as_str()));
            let req = self.request("POST", &url, "application/json", body, key);
            let resp = http::send(req)?;
            for r in outcome(&resp, chunk.len())? {
                rejected.push(Rejection {
                    index: r.index + offset as u32,
                    reason: r.reason,
                });
            }
        }
        Ok(WriteAck::with_rejections(batch.len(), rejected))
    }
}

cdp_plugin_sdk::export_destination!(Webhook);

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests;
