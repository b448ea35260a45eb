//! Outbound HTTP through the host's `http.send` import.
//!
//! The host only reaches the hosts listed in the manifest entry's
//! `allow_hosts`, caps the timeout and the response size, and refuses private,
//! loopback and link-local addresses unless listed.
//!
//! ```no_run
//! use cdp_plugin_sdk::{ErrorClass, http::{self, Request}};
//!
//! # fn main() -> Result<(), cdp_plugin_sdk::ConnectorError> {
//! let resp = http::send(
//!     Request::get("https://api.example.com/members?page=1")
//!         .header("Authorization", "Bearer s3cr3t")
//!         .timeout_ms(10_000),
//! )?;
//! resp.error_for_status(ErrorClass::Config)?;
//! let body: serde_json::Value = resp.json()?;
//! # let _ = body;
//! # Ok(())
//! # }
//! ```
//!
//! Outside a wasm32 build there is no host: [`send`] calls the handler set by
//! [`crate::testing::mock_http`], so connector logic can be unit-tested
//! natively.

use std::fmt;
use std::time::SystemTime;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ConnectorError, ErrorClass};

/// An outbound request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// Absolute `http` or `https` URL.
    pub url: String,
    /// Header names and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body, if any.
    pub body: Option<Vec<u8>>,
    /// Timeout; capped by the host's own limit.
    pub timeout_ms: Option<u32>,
}

impl Request {
    /// A request with any method.
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        Request {
            method: method.into().to_ascii_uppercase(),
            url: url.into(),
            headers: Vec::new(),
            body: None,
            timeout_ms: None,
        }
    }

    /// A `GET` request.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new("GET", url)
    }

    /// A `POST` request.
    pub fn post(url: impl Into<String>) -> Self {
        Self::new("POST", url)
    }

    /// A `PUT` request.
    pub fn put(url: impl Into<String>) -> Self {
        Self::new("PUT", url)
    }

    /// Adds a header (several with the same name are kept).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Adds several headers.
    pub fn headers<I, K, V>(mut self, headers: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.headers
            .extend(headers.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sets a JSON body and, unless already set, `Content-Type: application/json`.
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Result<Self, ConnectorError> {
        let body = serde_json::to_vec(value)
            .map_err(|e| ConnectorError::internal("request_serialize", format!("cannot serialise the body: {e}")))?;
        let req = if self.header_value("content-type").is_none() {
            self.header("Content-Type", "application/json")
        } else {
            self
        };
        Ok(req.body(body))
    }

    /// Sets the timeout.
    pub fn timeout_ms(mut self, timeout_ms: u32) -> Self {
        self.timeout_ms = Some(timeout_ms);
        self
    }

    /// The first value of a header, by case-insensitive name.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Sends the request; see [`send`].
    pub fn send(self) -> Result<Response, HttpError> {
        send(self)
    }
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a status, no header and an empty body (handy in tests).
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Every value of a header, by case-insensitive name.
    pub fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; a body that does not parse is a `data` error.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ConnectorError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ConnectorError::data(
                "response_not_json",
                format!("HTTP {} response is not the expected JSON: {e}", self.status),
            )
        })
    }

    /// `Retry-After` in milliseconds from now (seconds or an HTTP date).
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.header("retry-after")
            .and_then(|v| parse_retry_after(v, SystemTime::now()))
    }

    /// Maps a failure status to an error; 1xx–2xx are `Ok`.
    ///
    /// | status | class |
    /// | --- | --- |
    /// | 3xx (redirects are not followed) | `config` |
    /// | 401 | `auth` |
    /// | 403 | `permission` |
    /// | 408 | `transient` |
    /// | 429 | `rate-limited`, with `Retry-After` |
    /// | other 4xx | `client_error` (e.g. `config` for a source, `data` for a destination) |
    /// | 5xx and anything else | `transient` |
    ///
    /// The code is `http_status_<status>`; the message carries the start of
    /// the response body.
    pub fn error_for_status(&self, client_error: ErrorClass) -> Result<(), ConnectorError> {
        let status = self.status;
        if status < 300 {
            return Ok(());
        }
        let code = format!("http_status_{status}");
        let message = format!("HTTP {status}{}", body_excerpt(&self.body));
        Err(match status {
            300..=399 => {
                let to = self.header("location").unwrap_or("an unknown location");
                ConnectorError::config(code, format!("{message} (redirect to {to} not followed)"))
            }
            401 => ConnectorError::auth(code, message),
            403 => ConnectorError::permission(code, message),
            408 => ConnectorError::transient(code, message),
            429 => ConnectorError::rate_limited(self.retry_after_ms(), code, message),
            400..=499 => ConnectorError::new(client_error, code, message),
            _ => ConnectorError::transient(code, message),
        })
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn body_excerpt(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(body);
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        return String::new();
    }
    let mut excerpt: String = collapsed.chars().take(MAX).collect();
    if collapsed.chars().count() > MAX {
        excerpt.push('…');
    }
    format!(": {excerpt}")
}

/// Why the host could not complete a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpErrorKind {
    /// The host is not in `allow_hosts`, or resolves to a forbidden address.
    Denied,
    /// The request was malformed (bad URL, method or header).
    InvalidRequest,
    /// No response within the timeout.
    Timeout,
    /// The connection could not be made.
    Connect,
    /// The response body exceeded the host's size limit.
    TooLarge,
    /// Anything else.
    Other,
}

/// A request that got no HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// What went wrong.
    pub kind: HttpErrorKind,
    /// Details from the host.
    pub message: String,
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for HttpError {}

impl From<HttpError> for ConnectorError {
    /// `denied` and `invalid-request` are `config` errors (fix `allow_hosts`
    /// or the URL); `too-large` is `config` (ask for smaller pages);
    /// `timeout`, `connect` and `other` are `transient`.
    fn from(e: HttpError) -> Self {
        match e.kind {
            HttpErrorKind::Denied => ConnectorError::config(
                "http_denied",
                format!(
                    "request refused by the host (is the host in allow_hosts?): {}",
                    e.message
                ),
            ),
            HttpErrorKind::InvalidRequest => ConnectorError::config("http_invalid_request", e.message),
            HttpErrorKind::TooLarge => ConnectorError::config(
                "http_response_too_large",
                format!(
                    "response exceeds the host's size limit; request smaller pages: {}",
                    e.message
                ),
            ),
            HttpErrorKind::Timeout => ConnectorError::transient("http_timeout", e.message),
            HttpErrorKind::Connect => ConnectorError::transient("http_connect", e.message),
            HttpErrorKind::Other => ConnectorError::transient("http_error", e.message),
        }
    }
}

/// Sends a request through the host.
pub fn send(request: Request) -> Result<Response, HttpError> {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::bindings::http as wit;
        let req = wit::Request {
            method: request.method,
            url: request.url,
            headers: request.headers,
            body: request.body,
            timeout_ms: request.timeout_ms,
        };
        match wit::send(&req) {
            Ok(r) => Ok(Response {
                status: r.status,
                headers: r.headers,
                body: r.body,
            }),
            Err(e) => Err(HttpError {
                kind: match e.kind {
                    wit::HttpErrorKind::Denied => HttpErrorKind::Denied,
                    wit::HttpErrorKind::InvalidRequest => HttpErrorKind::InvalidRequest,
                    wit::HttpErrorKind::Timeout => HttpErrorKind::Timeout,
                    wit::HttpErrorKind::Connect => HttpErrorKind::Connect,
                    wit::HttpErrorKind::TooLarge => HttpErrorKind::TooLarge,
                    wit::HttpErrorKind::Other => HttpErrorKind::Other,
                },
                message: e.message,
            }),
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::mocked_send(request)
}

/// Parses a `Retry-After` value into milliseconds from `now`.
///
/// Accepts delay-seconds (`120`) and HTTP dates (`Wed, 21 Oct 2015 07:28:00
/// GMT`, plus the obsolete RFC 850 and asctime forms). A date in the past
/// gives `0`; anything else gives `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<u64> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = value.parse().unwrap_or(u64::MAX);
        return Some(secs.saturating_mul(1000));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(match when.duration_since(now) {
        Ok(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        Err(_) => 0,
    })
}

/// Percent-encodes a query component: everything but RFC 3986 unreserved
/// characters (`A-Z a-z 0-9 - . _ ~`).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex_val(bytes[i + 1]), hex_val(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
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

/// Sets query parameters on `url`: a parameter already present with the same
/// name is replaced, others are kept, new ones are appended percent-encoded.
/// A `#fragment` stays at the end.
///
/// ```
/// use cdp_plugin_sdk::http::with_query;
/// assert_eq!(
///     with_query("https://a.example/x?page=1&q=a", &[("page", "2"), ("since", "2026-01-01T00:00:00Z")]),
///     "https://a.example/x?q=a&page=2&since=2026-01-01T00%3A00%3A00Z"
/// );
/// ```
pub fn with_query(url: &str, params: &[(&str, &str)]) -> String {
    let (rest, fragment) = match url.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (url, None),
    };
    let (base, query) = match rest.split_once('?') {
        Some((b, q)) => (b, q),
        None => (rest, ""),
    };
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let name = percent_decode(p.split('=').next().unwrap_or(""));
            !params.iter().any(|(k, _)| *k == name)
        })
        .map(str::to_string)
        .collect();
    for (k, v) in params {
        pairs.push(format!("{}={}", percent_encode(k), percent_encode(v)));
    }
    let mut out = base.to_string();
    if !pairs.is_empty() {
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::testing;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn retry_after_seconds_and_dates() {
        // 2015-10-21T07:28:00Z
        let date = UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(parse_retry_after("120", date), Some(120_000));
        assert_eq!(parse_retry_after(" 0 ", date), Some(0));
        let now = date - Duration::from_millis(90_500);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now), Some(90_500));
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:28:00 GMT", now),
            Some(90_500)
        );
        assert_eq!(parse_retry_after("Wed Oct 21 07:28:00 2015", now), Some(90_500));
        let later = date + Duration::from_secs(5);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", later), Some(0));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(u64::MAX));
    }

    #[test]
    fn status_mapping() {
        let class = |status: u16, client: ErrorClass| {
            Response::new(status)
                .with_body("  too\n many   requests ")
                .error_for_status(client)
                .map_err(|e| (e.class, e.retryable, e.code, e.message))
        };
        assert!(class(200, ErrorClass::Config).is_ok());
        assert!(class(204, ErrorClass::Config).is_ok());
        assert_eq!(class(401, ErrorClass::Config).unwrap_err().0, ErrorClass::Auth);
        assert_eq!(class(403, ErrorClass::Config).unwrap_err().0, ErrorClass::Permission);
        assert_eq!(class(404, ErrorClass::Config).unwrap_err().0, ErrorClass::Config);
        assert_eq!(class(422, ErrorClass::Data).unwrap_err().0, ErrorClass::Data);
        assert_eq!(class(301, ErrorClass::Data).unwrap_err().0, ErrorClass::Config);
        let (c, retry, code, msg) = class(503, ErrorClass::Config).unwrap_err();
        assert_eq!(
            (c, retry, code.as_str()),
            (ErrorClass::Transient, true, "http_status_503")
        );
        assert_eq!(msg, "HTTP 503: too many requests");
        assert_eq!(class(408, ErrorClass::Config).unwrap_err().0, ErrorClass::Transient);

        let e = Response::new(429)
            .with_header("Retry-After", "7")
            .error_for_status(ErrorClass::Config)
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::RateLimited);
        assert!(e.retryable);
        assert_eq!(e.retry_after_ms, Some(7000));
        let e = Response::new(429).error_for_status(ErrorClass::Config).unwrap_err();
        assert_eq!(e.retry_after_ms, None);
    }

    #[test]
    fn long_bodies_are_cut() {
        let e = Response::new(500)
            .with_body("x".repeat(500))
            .error_for_status(ErrorClass::Config)
            .unwrap_err();
        assert_eq!(e.message.chars().count(), "HTTP 500: ".len() + 200 + 1);
    }

    #[test]
    fn http_errors_map_to_classes() {
        let map = |kind| {
            ConnectorError::from(HttpError {
                kind,
                message: "m".into(),
            })
            .class
        };
        assert_eq!(map(HttpErrorKind::Denied), ErrorClass::Config);
        assert_eq!(map(HttpErrorKind::InvalidRequest), ErrorClass::Config);
        assert_eq!(map(HttpErrorKind::TooLarge), ErrorClass::Config);
        assert_eq!(map(HttpErrorKind::Timeout), ErrorClass::Transient);
        assert_eq!(map(HttpErrorKind::Connect), ErrorClass::Transient);
        assert_eq!(map(HttpErrorKind::Other), ErrorClass::Transient);
    }

    #[test]
    fn request_builder_and_headers() {
        let req = Request::new("post", "https://x.example/")
            .header("X-A", "1")
            .headers([("X-B", "2")])
            .json(&serde_json::json!({"a": 1}))
            .unwrap()
            .timeout_ms(500);
        assert_eq!(req.method, "POST");
        assert_eq!(req.header_value("content-type"), Some("application/json"));
        assert_eq!(req.header_value("x-b"), Some("2"));
        assert_eq!(req.body.as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(req.timeout_ms, Some(500));
        let resp = Response::new(200)
            .with_header("Link", "a")
            .with_header("link", "b")
            .with_body("{\"ok\":true}");
        assert_eq!(resp.header_all("LINK").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(resp.json::<serde_json::Value>().unwrap()["ok"], true);
        assert_eq!(
            Response::new(200)
                .with_body("<html>")
                .json::<serde_json::Value>()
                .unwrap_err()
                .code,
            "response_not_json"
        );
    }

    #[test]
    fn send_goes_to_the_mock_natively() {
        assert_eq!(
            send(Request::get("https://x.example/")).unwrap_err().kind,
            HttpErrorKind::Other
        );
        testing::mock_http(|req| Ok(Response::new(200).with_body(req.url.clone())));
        let resp = Request::get("https://x.example/a").send().unwrap();
        assert_eq!(resp.text(), "https://x.example/a");
        testing::clear_http_mock();
    }

    #[test]
    fn query_building() {
        assert_eq!(with_query("https://a/x", &[("a b", "c&d")]), "https://a/x?a%20b=c%26d");
        assert_eq!(with_query("https://a/x?", &[]), "https://a/x");
        assert_eq!(
            with_query("https://a/x?p=1#frag", &[("p", "2")]),
            "https://a/x?p=2#frag"
        );
        assert_eq!(
            with_query("https://a/x?a%20b=1&c=2", &[("a b", "3")]),
            "https://a/x?c=2&a%20b=3"
        );
        assert_eq!(percent_decode("a%2Fb+c%zz%4"), "a/b c%zz%4");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }
}
