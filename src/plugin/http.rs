//! The `cdp:connector/http` host interface: outbound HTTP for plugins, in one
//! place. A request reaches only the manifest entry's `allow_hosts`; names
//! are resolved by the host and private, loopback, link-local and other
//! non-public addresses are refused after resolution (so DNS cannot point an
//! allowed name inward) unless the address itself is listed. Redirects are
//! not followed, proxies from the environment are not used, and timeouts and
//! a response size limit apply.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::PluginError;
use super::bindings::http::{self as wit, HttpError, HttpErrorKind, Request, Response};
use super::sandbox::State;

/// Largest response body handed to a plugin.
pub const MAX_RESPONSE: usize = 16 << 20;
/// Longest any request may take, whatever the plugin asks for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of a request that names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One `allow_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allow {
    host: HostPattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// A name, lower-cased.
    Name(String),
    /// `*.domain`: any name ending in `.domain` (not `domain` itself).
    Suffix(String),
    /// An address, which also grants that address when it is not public.
    Ip(IpAddr),
}

/// Parses one `allow_hosts` entry: `host`, `host:port`, `*.domain`, `1.2.3.4`,
/// `1.2.3.4:80`, `[::1]:8080`.
fn parse_allow(entry: &str) -> Result<Allow, String> {
    let e = entry.trim().to_ascii_lowercase();
    if e.is_empty() || e.contains('/') || e.contains("://") {
        return Err(format!("`{entry}` is not `host`, `host:port` or `*.domain` (no scheme, no path)"));
    }
    if let Ok(ip) = e.parse::<IpAddr>() {
        return Ok(Allow { host: HostPattern::Ip(ip), port: None });
    }
    if let Ok(sa) = e.parse::<SocketAddr>() {
        return Ok(Allow { host: HostPattern::Ip(sa.ip()), port: Some(sa.port()) });
    }
    let (host, port) = match e.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| format!("`{entry}`: `{p}` is not a port"))?)),
        None => (e.as_str(), None),
    };
    let valid = |s: &str| {
        !s.is_empty() && s.split('.').all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    };
    let host = match host.strip_prefix("*.") {
        Some(domain) if valid(domain) => HostPattern::Suffix(domain.to_owned()),
        None if valid(host) => HostPattern::Name(host.to_owned()),
        _ => return Err(format!("`{entry}` is not a host name")),
    };
    Ok(Allow { host, port })
}

impl Allow {
    fn permits(&self, host: &url::Host<&str>, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match (&self.host, host) {
            (HostPattern::Name(n), url::Host::Domain(d)) => n.eq_ignore_ascii_case(d),
            (HostPattern::Suffix(s), url::Host::Domain(d)) => {
                d.len() > s.len() + 1 && d.to_ascii_lowercase().ends_with(&format!(".{s}"))
            }
            (HostPattern::Ip(ip), url::Host::Ipv4(a)) => *ip == IpAddr::V4(*a),
            (HostPattern::Ip(ip), url::Host::Ipv6(a)) => *ip == IpAddr::V6(*a),
            _ => false,
        }
    }
}

/// Whether an address is anything but a public unicast address.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => internal_v4(a),
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return internal_v4(v4);
            }
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x0064 && s[1] == 0xff9b) // NAT64 (may embed an internal IPv4)
                || (s[0..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible
        }
    }
}

fn internal_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    a.is_private()
        || a.is_loopback()
        || a.is_link_local() // includes 169.254.169.254, the cloud metadata address
        || a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || a.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking
        || o[0] >= 240 // reserved
}

/// Why the resolver refused a name; found again in the error chain.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// Resolves with the system resolver, then drops every internal address that
/// is not explicitly granted.
struct Resolver {
    granted: Arc<HashSet<IpAddr>>,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let granted = self.granted.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> =
                all.iter().copied().filter(|a| !is_internal(a.ip()) || granted.contains(&a.ip())).collect();
            if kept.is_empty() {
                let shown: Vec<String> = all.iter().map(|a| a.ip().to_string()).collect();
                return Err(Box::new(Refused(format!(
                    "`{host}` resolves only to internal addresses ({}); list the address in allow_hosts to allow it",
                    shown.join(", ")
                ))) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The outbound HTTP of one instance.
#[derive(Clone)]
pub struct HttpGate {
    allow: Arc<[Allow]>,
    granted: Arc<HashSet<IpAddr>>,
    /// Built on first use: most plugins never call out.
    client: Arc<std::sync::OnceLock<reqwest::Client>>,
}

impl HttpGate {
    /// A gate for these `allow_hosts`; an empty list denies everything.
    pub fn new(allow_hosts: &[String]) -> Result<HttpGate, PluginError> {
        let allow = allow_hosts
            .iter()
            .map(|e| parse_allow(e))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| PluginError::Grant { message })?;
        let granted = allow
            .iter()
            .filter_map(|a| match a.host {
                HostPattern::Ip(ip) => Some(ip),
                _ => None,
            })
            .collect();
        Ok(HttpGate { allow: allow.into(), granted: Arc::new(granted), client: Arc::default() })
    }

    fn client(&self) -> Result<&reqwest::Client, HttpError> {
        if let Some(c) = self.client.get() {
            return Ok(c);
        }
        let c = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(Resolver { granted: self.granted.clone() }))
            .user_agent(concat!("cdp/", env!("CARGO_PKG_VERSION")))
            .timeout(MAX_TIMEOUT)
            .build()
            .map_err(|e| err(HttpErrorKind::Other, format!("cannot start the HTTP client: {e}")))?;
        Ok(self.client.get_or_init(|| c))
    }

    /// Checks a request against the grants; `Ok` carries the parsed URL.
    fn admit(&self, url: &str) -> Result<reqwest::Url, HttpError> {
        let u = reqwest::Url::parse(url).map_err(|e| err(HttpErrorKind::InvalidRequest, format!("`{url}`: {e}")))?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(err(HttpErrorKind::InvalidRequest, format!("`{url}`: only http and https are allowed")));
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err(err(HttpErrorKind::InvalidRequest, "credentials in the URL; send them in a header".into()));
        }
        let (Some(host), Some(port)) = (u.host(), u.port_or_known_default()) else {
            return Err(err(HttpErrorKind::InvalidRequest, format!("`{url}` has no host")));
        };
        if !self.allow.iter().any(|a| a.permits(&host, port)) {
            return Err(err(
                HttpErrorKind::Denied,
                format!("{host}:{port} is not in this entry's allow_hosts; add it there to allow it"),
            ));
        }
        let literal = match host {
            url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
            url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
            url::Host::Domain(_) => None,
        };
        if let Some(ip) = literal.filter(|ip| is_internal(*ip) && !self.granted.contains(ip)) {
            return Err(err(HttpErrorKind::Denied, format!("{ip} is an internal address")));
        }
        Ok(u)
    }

    /// Sends one request within `deadline` (the running call's).
    pub async fn send(&self, req: Request, deadline: Instant) -> Result<Response, HttpError> {
        let url = self.admit(&req.url)?;
        let method = reqwest::Method::from_bytes(req.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| err(HttpErrorKind::InvalidRequest, format!("`{}` is not an HTTP method", req.method)))?;
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &req.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| err(HttpErrorKind::InvalidRequest, format!("`{k}` is not a header name")))?;
            if matches!(name.as_str(), "host" | "connection" | "transfer-encoding" | "content-length" | "upgrade") {
                return Err(err(HttpErrorKind::InvalidRequest, format!("the host sets `{k}` itself")));
            }
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|_| err(HttpErrorKind::InvalidRequest, format!("the value of `{k}` is not a header value")))?;
            headers.append(name, value);
        }
        let asked = req.timeout_ms.map_or(DEFAULT_TIMEOUT, |ms| Duration::from_millis(u64::from(ms)));
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = asked.min(MAX_TIMEOUT).min(left);
        let client = self.client()?;
        let mut builder = client.request(method, url).headers(headers).timeout(timeout);
        if let Some(body) = req.body {
            builder = builder.body(body);
        }
        let started = Instant::now();
        let resp = match tokio::time::timeout(timeout, builder.send()).await {
            Err(_) => return Err(timed_out(timeout)),
            Ok(Err(e)) => return Err(classify(&e, timeout)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        let out_headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        if resp.content_length().is_some_and(|n| n > MAX_RESPONSE as u64) {
            return Err(too_large());
        }
        let body = tokio::time::timeout(timeout.saturating_sub(started.elapsed()), read_body(resp))
            .await
            .map_err(|_| timed_out(timeout))??;
        Ok(Response { status, headers: out_headers, body })
    }
}

async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    while let Some(chunk) =
        resp.chunk().await.map_err(|e| err(HttpErrorKind::Other, format!("reading the body: {e}")))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn err(kind: HttpErrorKind, message: String) -> HttpError {
    HttpError { kind, message }
}

fn timed_out(t: Duration) -> HttpError {
    err(HttpErrorKind::Timeout, format!("no complete response within {} ms", t.as_millis()))
}

fn too_large() -> HttpError {
    err(HttpErrorKind::TooLarge, format!("the response body is larger than {MAX_RESPONSE} bytes"))
}

fn classify(e: &reqwest::Error, timeout: Duration) -> HttpError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return err(HttpErrorKind::Denied, r.0.clone());
        }
        source = s.source();
    }
    let mut message = e.to_string();
    let mut s = std::error::Error::source(e);
    while let Some(inner) = s {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        s = inner.source();
    }
    if e.is_timeout() {
        timed_out(timeout)
    } else if e.is_connect() {
        err(HttpErrorKind::Connect, message)
    } else if e.is_builder() || e.is_request() && e.status().is_none() && message.contains("builder") {
        err(HttpErrorKind::InvalidRequest, message)
    } else {
        err(HttpErrorKind::Other, message)
    }
}

impl wit::Host for State {
    async fn send(&mut self, request: Request) -> Result<Response, HttpError> {
        let started = Instant::now();
        let (method, url) = (request.method.clone(), request.url.clone());
        let r = self.http.send(request, self.deadline).await;
        match &r {
            Ok(resp) => {
                tracing::debug!(target: "cdp::plugin", plugin = &*self.entry, %method, %url, status = resp.status,
                ms = started.elapsed().as_millis() as u64, "http")
            }
            Err(e) => tracing::warn!(target: "cdp::plugin", plugin = &*self.entry, %method, %url, kind = ?e.kind,
                "http refused or failed: {}", e.message),
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(hosts: &[&str]) -> HttpGate {
        HttpGate::new(&hosts.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn kind(r: Result<reqwest::Url, HttpError>) -> Option<HttpErrorKind> {
        r.err().map(|e| e.kind)
    }

    #[test]
    fn allow_entries_parse() {
        assert_eq!(parse_allow("API.example.com").unwrap().host, HostPattern::Name("api.example.com".into()));
        assert_eq!(parse_allow("example.com:8443").unwrap().port, Some(8443));
        assert_eq!(parse_allow("*.example.com").unwrap().host, HostPattern::Suffix("example.com".into()));
        assert_eq!(parse_allow("127.0.0.1:9000").unwrap().port, Some(9000));
        assert_eq!(parse_allow("[::1]:80").unwrap().host, HostPattern::Ip("::1".parse().unwrap()));
        for bad in ["https://x.com", "x.com/path", "", "*", "x.com:http", "a..b"] {
            assert!(parse_allow(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_listed_hosts_are_admitted() {
        let g = gate(&["hooks.example.com", "*.api.example.org", "127.0.0.1:9000"]);
        assert!(g.admit("https://hooks.example.com/x").is_ok());
        assert!(g.admit("https://HOOKS.example.com/x").is_ok());
        assert!(g.admit("https://eu.api.example.org/").is_ok());
        assert_eq!(kind(g.admit("https://api.example.org/")), Some(HttpErrorKind::Denied));
        assert_eq!(kind(g.admit("https://evil.example.com/")), Some(HttpErrorKind::Denied));
        assert_eq!(kind(g.admit("https://hooks.example.com.evil.net/")), Some(HttpErrorKind::Denied));
        assert!(g.admit("http://127.0.0.1:9000/").is_ok());
        assert_eq!(kind(g.admit("http://127.0.0.1:9001/")), Some(HttpErrorKind::Denied));
        assert_eq!(kind(g.admit("file:///etc/passwd")), Some(HttpErrorKind::InvalidRequest));
        assert_eq!(kind(g.admit("https://u:p@hooks.example.com/")), Some(HttpErrorKind::InvalidRequest));
        assert_eq!(kind(gate(&[]).admit("https://hooks.example.com/")), Some(HttpErrorKind::Denied));
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(a.parse().unwrap()), "{a}");
        }
        for a in ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(!is_internal(a.parse().unwrap()), "{a}");
        }
    }

    #[tokio::test]
    async fn names_resolving_inward_are_refused() {
        // `localhost` is allowed by name but resolves to loopback, which is not granted.
        let g = gate(&["localhost:9"]);
        let req = Request {
            method: "GET".into(),
            url: "http://localhost:9/".into(),
            headers: vec![],
            body: None,
            timeout_ms: Some(2_000),
        };
        let e = g.send(req, Instant::now() + Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(e.kind, HttpErrorKind::Denied, "{}", e.message);
        assert!(e.message.contains("internal"), "{}", e.message);
    }
}
