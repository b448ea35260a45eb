//! # source-http
//!
//! A cdp source connector that pulls records from a paginated JSON REST API
//! through the host's `http.send` (so only the manifest entry's
//! `allow_hosts` are reachable). Every item of the response's records array
//! is emitted as one raw record, as received.
//!
//! ```yaml
//! sources:
//!   shop:
//!     plugin: http
//!     allow_hosts: [api.shop.example]
//!     config:
//!       url: https://api.shop.example/v2/customers
//!       headers: { Accept: application/json }
//!       auth: { bearer: "${SHOP_TOKEN}" }
//!       records_path: data.items
//!       pagination: { type: cursor, cursor_path: meta.next, param: cursor }
//!       incremental: { cursor_field: updated_at, param: updated_since }
//! ```
//!
//! ## Config
//!
//! * `url`, `method` (`GET` or `POST`, default `GET`), `headers`.
//! * `auth`: `{bearer: "<token>"}` sends `Authorization: Bearer <token>`;
//!   `{header: "X-Api-Key", value: "<key>"}` sends that header. Both secret
//!   fields are marked `"x-secret": true` in the schema.
//! * `records_path`: dotted path to the records array in the response
//!   (`data.items`; numeric segments index arrays); empty = the body is the
//!   array. A missing path or `null` is an empty page. Items that are not
//!   JSON objects are skipped with a warning.
//! * `pagination`:
//!   * `{type: cursor, cursor_path, param}` — the next cursor is read from
//!     the body at `cursor_path` and sent as `param`; done when it is
//!     missing, `null`, `""` or repeats.
//!   * `{type: page, param: page, start: 1, size_param, size}` — pages
//!     `start`, `start+1`, …; done at an empty page, or a page shorter than
//!     `size` when `size` is set.
//!   * `{type: link}` — follows the RFC 8288 `Link: <…>; rel="next"` header
//!     (relative references resolved against the request URL).
//!   * `{type: none}` (default) — one request.
//! * `incremental: {cursor_field, param}` — the largest `cursor_field` value
//!   of the last finished run is sent as `param` on the next run (numbers
//!   compare as numbers, anything else as strings, so ISO 8601 timestamps
//!   work). The source does not filter on it itself.
//!
//! ## Checkpoints
//!
//! After every page: `{"next": <where to resume>, "cursor": <largest
//! cursor_field value seen>, "since": <the value this run sends as
//! incremental param>}`. `next` is the next cursor (cursor pagination), the
//! next page number (page), the next URL (link), or `null` when the run has
//! read the last page. A run opened with `next` set continues the
//! interrupted run at that page with the same `since`; a run opened with
//! `next: null` starts from the first page with `since` = `cursor`.
//!
//! ## Errors
//!
//! 429 → `rate-limited` with `Retry-After` (seconds or an HTTP date) in
//! milliseconds; 5xx and 408 → `transient` (retryable); 401 → `auth`; 403 →
//! `permission`; other 4xx and unfollowed redirects → `config`; a body that
//! is not JSON or has no array at `records_path` → `data`. Network failures
//! reported by the host: timeouts and connection errors are `transient`, a
//! host outside `allow_hosts` is `config`.

pub mod link;
mod reader;

pub use reader::HttpReader;

use std::collections::BTreeMap;

use cdp_plugin_sdk::{ConnectorError, Source, Spec, capability};
use serde::Deserialize;
use serde_json::{Value, json};

/// The `config:` of an HTTP source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The first page's URL.
    pub url: String,
    /// `GET` (default) or `POST`.
    #[serde(default = "default_method")]
    pub method: String,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Credentials.
    #[serde(default)]
    pub auth: Option<Auth>,
    /// Dotted path to the records array; empty = the body.
    #[serde(default)]
    pub records_path: String,
    /// How to get the next page.
    #[serde(default)]
    pub pagination: Pagination,
    /// Server-side filtering by the last run's largest cursor value.
    #[serde(default)]
    pub incremental: Option<IncrementalConfig>,
}

fn default_method() -> String {
    "GET".to_string()
}

/// Credentials sent with every request.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Auth {
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The token.
        bearer: String,
    },
    /// A custom header, e.g. `X-Api-Key`.
    Header {
        /// Header name.
        header: String,
        /// Header value.
        value: String,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Bearer { .. } => f.write_str("Auth::Bearer(***)"),
            Auth::Header { header, .. } => write!(f, "Auth::Header({header}: ***)"),
        }
    }
}

/// How to get the next page.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Pagination {
    /// A cursor read from the body and sent back as a query parameter.
    Cursor {
        /// Dotted path of the next cursor in the body.
        cursor_path: String,
        /// Query parameter carrying it.
        param: String,
    },
    /// Numbered pages.
    Page {
        /// Query parameter of the page number.
        #[serde(default = "default_page_param")]
        param: String,
        /// First page number.
        #[serde(default = "default_start")]
        start: u64,
        /// Query parameter of the page size.
        #[serde(default)]
        size_param: Option<String>,
        /// Page size; a shorter page is the last.
        #[serde(default)]
        size: Option<u64>,
    },
    /// RFC 8288 `Link: <…>; rel="next"`.
    Link {},
    /// A single request.
    None {},
}

impl Default for Pagination {
    fn default() -> Self {
        Pagination::None {}
    }
}

fn default_page_param() -> String {
    "page".to_string()
}

fn default_start() -> u64 {
    1
}

/// Server-side incremental filtering.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncrementalConfig {
    /// Record field whose largest value is remembered, e.g. `updated_at`.
    pub cursor_field: String,
    /// Query parameter sending it, e.g. `updated_since`.
    pub param: String,
}

fn non_empty(value: &str, field: &str) -> Result<(), ConnectorError> {
    if value.trim().is_empty() {
        return Err(ConnectorError::config(
            "missing_value",
            format!("config.{field}: must not be empty"),
        ));
    }
    Ok(())
}

impl Config {
    /// Checks the config without sending anything.
    pub fn validate(&self) -> Result<(), ConnectorError> {
        let lower = self.url.to_ascii_lowercase();
        if !(lower.starts_with("https://") || lower.starts_with("http://")) || self.url.len() < 9 {
            return Err(ConnectorError::config(
                "invalid_url",
                "config.url: must be an absolute http:// or https:// URL",
            ));
        }
        if !matches!(self.method.to_ascii_uppercase().as_str(), "GET" | "POST") {
            return Err(ConnectorError::config(
                "invalid_method",
                format!("config.method: must be GET or POST, got {:?}", self.method),
            ));
        }
        match &self.auth {
            Some(Auth::Bearer { bearer }) => non_empty(bearer, "auth.bearer")?,
            Some(Auth::Header { header, value }) => {
                non_empty(header, "auth.header")?;
                non_empty(value, "auth.value")?;
            }
            None => {}
        }
        match &self.pagination {
            Pagination::Cursor { cursor_path, param } => {
                non_empty(cursor_path, "pagination.cursor_path")?;
                non_empty(param, "pagination.param")?;
            }
            Pagination::Page {
                param,
                size,
                size_param,
                ..
            } => {
                non_empty(param, "pagination.param")?;
                if *size == Some(0) {
                    return Err(ConnectorError::config(
                        "invalid_page_size",
                        "config.pagination.size: must be > 0",
                    ));
                }
                if size_param.is_some() && size.is_none() {
                    return Err(ConnectorError::config(
                        "missing_page_size",
                        "config.pagination.size: required with size_param",
                    ));
                }
            }
            Pagination::Link {} | Pagination::None {} => {}
        }
        if let Some(inc) = &self.incremental {
            non_empty(&inc.cursor_field, "incremental.cursor_field")?;
            non_empty(&inc.param, "incremental.param")?;
        }
        Ok(())
    }
}

/// The JSON Schema of [`Config`].
pub fn config_schema() -> Value {
    let name = json!({"type": "string", "minLength": 1});
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "additionalProperties": false,
        "required": ["url"],
        "properties": {
            "url": {"type": "string", "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://"},
            "method": {"enum": ["GET", "POST"], "default": "GET"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "auth": {
                "oneOf": [
                    {
                        "type": "object", "additionalProperties": false, "required": ["bearer"],
                        "properties": {"bearer": {"type": "string", "x-secret": true}}
                    },
                    {
                        "type": "object", "additionalProperties": false, "required": ["header", "value"],
                        "properties": {"header": name, "value": {"type": "string", "x-secret": true}}
                    }
                ]
            },
            "records_path": {"type": "string", "default": ""},
            "pagination": {
                "oneOf": [
                    {
                        "type": "object", "additionalProperties": false,
                        "required": ["type", "cursor_path", "param"],
                        "properties": {"type": {"const": "cursor"}, "cursor_path": name, "param": name}
                    },
                    {
                        "type": "object", "additionalProperties": false, "required": ["type"],
                        "properties": {
                            "type": {"const": "page"},
                            "param": {"type": "string", "default": "page"},
                            "start": {"type": "integer", "minimum": 0, "default": 1},
                            "size_param": name,
                            "size": {"type": "integer", "minimum": 1}
                        }
                    },
                    {
                        "type": "object", "additionalProperties": false, "required": ["type"],
                        "properties": {"type": {"const": "link"}}
                    },
                    {
                        "type": "object", "additionalProperties": false, "required": ["type"],
                        "properties": {"type": {"const": "none"}}
                    }
                ]
            },
            "incremental": {
                "type": "object", "additionalProperties": false,
                "required": ["cursor_field", "param"],
                "properties": {"cursor_field": name, "param": name}
            }
        }
    })
}

/// The HTTP source.
pub struct HttpSource;

impl Source for HttpSource {
    type Config = Config;
    type Reader = HttpReader;

    fn spec() -> Spec {
        Spec::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
            .description("Records from a paginated JSON REST API")
            .config_schema(config_schema())
            .capability(capability::HTTP)
            .capability(capability::INCREMENTAL)
    }

    fn check(config: &Config) -> Result<(), ConnectorError> {
        config.validate()
    }

    fn open(config: Config, state: Option<Value>) -> Result<HttpReader, ConnectorError> {
        HttpReader::open(config, state)
    }
}

cdp_plugin_sdk::export_source!(HttpSource);

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests;
