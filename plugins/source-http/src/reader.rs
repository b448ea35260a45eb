//! Fetching pages, extracting records and checkpointing.

use std::cmp::Ordering;
use std::collections::VecDeque;

use cdp_plugin_sdk::http::{self, Request, with_query};
use cdp_plugin_sdk::{ConnectorError, ErrorClass, ReadEvent, Records, SourceReader, log};
use serde_json::{Value, json};

use crate::link::find_link;
use crate::{Auth, Config, Pagination};

/// The value at a dotted `path` (`data.items`, `results.0.id`); empty path =
/// `value` itself.
pub fn get_path<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    let path = path.trim();
    if path.is_empty() {
        return Some(value);
    }
    path.split('.').try_fold(value, |v, seg| match v {
        Value::Object(map) => map.get(seg),
        Value::Array(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

/// Orders cursor values: numbers numerically, everything else as strings.
pub fn compare_cursor(a: &Value, b: &Value) -> Ordering {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        _ => param_text(a).cmp(&param_text(b)),
    }
}

/// A JSON value as a query parameter: strings without quotes.
fn param_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Where the next request goes.
#[derive(Debug, Clone, PartialEq)]
enum Position {
    /// The configured URL.
    First,
    /// Cursor pagination: send this cursor.
    Cursor(Value),
    /// Page pagination: this page number.
    Page(u64),
    /// Link pagination: this URL.
    Url(String),
}

impl Position {
    /// The checkpoint's `next`.
    fn to_next(&self) -> Value {
        match self {
            Position::First => Value::Null,
            Position::Cursor(c) => c.clone(),
            Position::Page(n) => json!(n),
            Position::Url(u) => json!(u),
        }
    }
}

/// An open read of an HTTP API.
#[derive(Debug)]
pub struct HttpReader {
    cfg: Config,
    /// `None` once the last page has been fetched.
    position: Option<Position>,
    /// The incremental parameter this run sends.
    since: Option<Value>,
    /// The largest `cursor_field` value seen.
    max_cursor: Option<Value>,
    /// Records of the last page not yet handed out.
    pending: VecDeque<Value>,
    /// The checkpoint following the last page, once its records are out.
    pending_checkpoint: Option<Value>,
}

impl HttpReader {
    /// Opens a read, resuming an interrupted run from `state` if it has a
    /// `next`, or starting a new incremental run from its `cursor`.
    pub fn open(cfg: Config, state: Option<Value>) -> Result<Self, ConnectorError> {
        cfg.validate()?;
        let state = state.unwrap_or(Value::Null);
        let cursor = state.get("cursor").filter(|v| !v.is_null()).cloned();
        let next = state.get("next").filter(|v| !v.is_null());
        let resumed = next.and_then(|n| match (&cfg.pagination, n) {
            (Pagination::Cursor { .. }, Value::String(_) | Value::Number(_)) => Some(Position::Cursor(n.clone())),
            (Pagination::Page { .. }, Value::Number(p)) => p.as_u64().map(Position::Page),
            (Pagination::Link {}, Value::String(u)) => Some(Position::Url(u.clone())),
            _ => None,
        });
        if next.is_some() && resumed.is_none() {
            log::warn!(
                "checkpoint next={} does not fit the configured pagination; starting from the first page",
                next.map(Value::to_string).unwrap_or_default()
            );
        }
        let (position, since) = match resumed {
            Some(p) => (p, state.get("since").filter(|v| !v.is_null()).cloned()),
            None => (Position::First, cursor.clone()),
        };
        let incremental = cfg.incremental.is_some();
        Ok(HttpReader {
            position: Some(position),
            since: since.filter(|_| incremental),
            max_cursor: cursor.filter(|_| incremental),
            pending: VecDeque::new(),
            pending_checkpoint: None,
            cfg,
        })
    }

    fn request_url(&self, position: &Position) -> String {
        let mut params: Vec<(String, String)> = Vec::new();
        if let (Some(inc), Some(since)) = (&self.cfg.incremental, &self.since) {
            params.push((inc.param.clone(), param_text(since)));
        }
        match (&self.cfg.pagination, position) {
            (_, Position::Url(url)) => return url.clone(),
            (Pagination::Cursor { param, .. }, Position::Cursor(c)) => {
                params.push((param.clone(), param_text(c)));
            }
            (
                Pagination::Page {
                    param,
                    start,
                    size_param,
                    size,
                },
                pos,
            ) => {
                let page = match pos {
                    Position::Page(n) => *n,
                    _ => *start,
                };
                params.push((param.clone(), page.to_string()));
                if let (Some(sp), Some(size)) = (size_param, size) {
                    params.push((sp.clone(), size.to_string()));
                }
            }
            _ => {}
        }
        let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if refs.is_empty() {
            self.cfg.url.clone()
        } else {
            with_query(&self.cfg.url, &refs)
        }
    }

    fn build_request(&self, url: &str) -> Request {
        let mut req = Request::new(self.cfg.method.clone(), url).headers(self.cfg.headers.clone());
        if req.header_value("accept").is_none() {
            req = req.header("Accept", "application/json");
        }
        match &self.cfg.auth {
            Some(Auth::Bearer { bearer }) => req.header("Authorization", format!("Bearer {bearer}")),
            Some(Auth::Header { header, value }) => req.header(header.clone(), value.clone()),
            None => req,
        }
    }

    /// Fetches the page at `position`; returns its records and the position
    /// after it.
    fn fetch(&mut self, position: &Position) -> Result<(Vec<Value>, Option<Position>), ConnectorError> {
        let url = self.request_url(position);
        let resp = http::send(self.build_request(&url))?;
        resp.error_for_status(ErrorClass::Config)?;
        let body: Value = resp.json()?;
        let items = match get_path(&body, &self.cfg.records_path) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items.clone(),
            Some(other) => {
                return Err(ConnectorError::data(
                    "records_not_array",
                    format!(
                        "records_path {:?} holds {} instead of an array",
                        self.cfg.records_path,
                        kind(other)
                    ),
                ));
            }
        };
        let mut records = Vec::with_capacity(items.len());
        let mut skipped = 0;
        for item in items {
            if item.is_object() {
                records.push(item);
            } else {
                skipped += 1;
            }
        }
        if skipped > 0 {
            log::warn!("{skipped} items of the page are not JSON objects; skipped");
            log::metric("records_skipped_total", f64::from(skipped));
        }

        let next = match &self.cfg.pagination {
            Pagination::None {} => None,
            Pagination::Cursor { cursor_path, .. } => match get_path(&body, cursor_path) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.is_empty() => None,
                Some(c @ (Value::String(_) | Value::Number(_))) => {
                    if *position == Position::Cursor(c.clone()) {
                        log::warn!("the API returned the cursor it was sent; stopping");
                        None
                    } else {
                        Some(Position::Cursor(c.clone()))
                    }
                }
                Some(other) => {
                    return Err(ConnectorError::data(
                        "cursor_invalid",
                        format!(
                            "cursor_path {cursor_path:?} holds {} instead of a string or number",
                            kind(other)
                        ),
                    ));
                }
            },
            Pagination::Page { start, size, .. } => {
                let page = match position {
                    Position::Page(n) => *n,
                    _ => *start,
                };
                let short = size.is_some_and(|s| (records.len() as u64) < s);
                (!records.is_empty() && !short).then_some(Position::Page(page + 1))
            }
            Pagination::Link {} => find_link(resp.header_all("link"), "next", &url)
                .filter(|next| *next != url)
                .map(Position::Url),
        };

        if let Some(inc) = &self.cfg.incremental {
            for record in &records {
                if let Some(v) = get_path(record, &inc.cursor_field).filter(|v| !v.is_null()) {
                    let greater = self
                        .max_cursor
                        .as_ref()
                        .is_none_or(|m| compare_cursor(v, m) == Ordering::Greater);
                    if greater {
                        self.max_cursor = Some(v.clone());
                    }
                }
            }
        }
        log::metric("pages_fetched_total", 1.0);
        Ok((records, next))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl SourceReader for HttpReader {
    fn next(&mut self, max: u32) -> Result<Vec<ReadEvent>, ConnectorError> {
        let max = max.max(1) as usize;
        loop {
            if !self.pending.is_empty() || self.pending_checkpoint.is_some() {
                let mut events = Vec::new();
                let take = self.pending.len().min(max);
                if take > 0 {
                    let mut records = Records::new();
                    for record in self.pending.drain(..take) {
                        records.push(&record)?;
                    }
                    events.push(ReadEvent::records(records));
                }
                if self.pending.is_empty()
                    && let Some(cp) = self.pending_checkpoint.take()
                {
                    events.push(ReadEvent::checkpoint(cp));
                }
                return Ok(events);
            }
            let Some(position) = self.position.take() else {
                return Ok(Vec::new());
            };
            let (records, next) = match self.fetch(&position) {
                Ok(page) => page,
                Err(e) => {
                    // Keep the position, so a retried call fetches the same page.
                    self.position = Some(position);
                    return Err(e);
                }
            };
            self.pending = records.into();
            self.pending_checkpoint = Some(json!({
                "next": next.as_ref().map_or(Value::Null, Position::to_next),
                "cursor": self.max_cursor,
                "since": self.since,
            }));
            self.position = next;
        }
    }
}
