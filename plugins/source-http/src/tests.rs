use std::cell::RefCell;
use std::rc::Rc;

use cdp_plugin_sdk::http::{HttpError, HttpErrorKind, Request, Response};
use cdp_plugin_sdk::testing::{self, checkpoints_of, read_to_end, records_of};
use cdp_plugin_sdk::{ErrorClass, ReadEvent, SourceReader};
use serde_json::{Value, json};

use super::*;

type Log = Rc<RefCell<Vec<Request>>>;

/// Serves fixed responses by exact URL; anything else is a 404.
fn serve(routes: Vec<(String, Response)>) -> Log {
    let log: Log = Rc::default();
    let seen = log.clone();
    testing::mock_http(move |req| {
        seen.borrow_mut().push(req.clone());
        Ok(routes
            .iter()
            .find(|(url, _)| *url == req.url)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| Response::new(404).with_body(format!("no route for {}", req.url))))
    });
    log
}

fn json_response(body: Value) -> Response {
    Response::new(200)
        .with_header("Content-Type", "application/json")
        .with_body(body.to_string())
}

fn urls(log: &Log) -> Vec<String> {
    log.borrow().iter().map(|r| r.url.clone()).collect()
}

fn open(cfg: &Value, state: Option<&Value>) -> HttpReader {
    let state = state.map(Value::to_string);
    testing::open_source::<HttpSource>(&cfg.to_string(), state.as_deref()).unwrap()
}

fn cursor_api() -> Vec<(String, Response)> {
    let base = "https://api.example.com/v2/customers";
    vec![
        (
            format!("{base}?updated_since=2026-01-01T00%3A00%3A00Z"),
            json_response(json!({
                "data": {"items": [
                    {"id": 1, "updated_at": "2026-01-03T00:00:00Z"},
                    {"id": 2, "updated_at": "2026-01-05T00:00:00Z"},
                    {"id": 3, "updated_at": "2026-01-02T00:00:00Z"}
                ]},
                "meta": {"next": "c2"}
            })),
        ),
        (
            format!("{base}?updated_since=2026-01-01T00%3A00%3A00Z&cursor=c2"),
            json_response(json!({
                "data": {"items": [{"id": 4, "updated_at": "2026-01-04T00:00:00Z"}]},
                "meta": {"next": "c3"}
            })),
        ),
        (
            format!("{base}?updated_since=2026-01-01T00%3A00%3A00Z&cursor=c3"),
            json_response(json!({
                "data": {"items": [{"id": 5, "updated_at": "2026-01-06T00:00:00Z"}, "not an object"]},
                "meta": {"next": null}
            })),
        ),
    ]
}

fn cursor_config() -> Value {
    json!({
        "url": "https://api.example.com/v2/customers",
        "headers": {"X-Tenant": "acme"},
        "auth": {"bearer": "s3cr3t"},
        "records_path": "data.items",
        "pagination": {"type": "cursor", "cursor_path": "meta.next", "param": "cursor"},
        "incremental": {"cursor_field": "updated_at", "param": "updated_since"}
    })
}

fn ids(records: &[Value]) -> Vec<i64> {
    records.iter().map(|r| r["id"].as_i64().unwrap()).collect()
}

#[test]
fn cursor_pagination_with_incremental_checkpoints_every_page() {
    let log = serve(cursor_api());
    let state = json!({"next": null, "cursor": "2026-01-01T00:00:00Z"});
    let mut reader = open(&cursor_config(), Some(&state));
    let events = read_to_end(&mut reader, 100).unwrap();
    assert_eq!(ids(&records_of(&events)), [1, 2, 3, 4, 5]);
    assert_eq!(
        checkpoints_of(&events),
        [
            json!({"next": "c2", "cursor": "2026-01-05T00:00:00Z", "since": "2026-01-01T00:00:00Z"}),
            json!({"next": "c3", "cursor": "2026-01-05T00:00:00Z", "since": "2026-01-01T00:00:00Z"}),
            json!({"next": null, "cursor": "2026-01-06T00:00:00Z", "since": "2026-01-01T00:00:00Z"}),
        ]
    );
    let first = &log.borrow()[0];
    assert_eq!(first.method, "GET");
    assert_eq!(first.header_value("authorization"), Some("Bearer s3cr3t"));
    assert_eq!(first.header_value("x-tenant"), Some("acme"));
    assert_eq!(first.header_value("accept"), Some("application/json"));
    assert!(testing::take_logs().iter().any(|(_, m)| m.contains("not JSON objects")));
}

#[test]
fn resuming_from_every_checkpoint_continues_exactly() {
    let api = cursor_api();
    serve(api.clone());
    let state0 = json!({"next": null, "cursor": "2026-01-01T00:00:00Z"});
    let events = read_to_end(&mut open(&cursor_config(), Some(&state0)), 100).unwrap();
    let all = ids(&records_of(&events));
    let mut emitted = 0;
    for event in &events {
        match event {
            ReadEvent::Records(r) => emitted += r.len() as usize,
            ReadEvent::Checkpoint(cp) if !cp["next"].is_null() => {
                let log = serve(api.clone());
                let rest = read_to_end(&mut open(&cursor_config(), Some(cp)), 100).unwrap();
                assert_eq!(ids(&records_of(&rest)), all[emitted..], "from {cp}");
                // The resumed run keeps sending the interrupted run's `since`.
                assert!(
                    urls(&log)
                        .iter()
                        .all(|u| u.contains("updated_since=2026-01-01T00%3A00%3A00Z"))
                );
            }
            ReadEvent::Checkpoint(_) => {}
        }
    }
}

#[test]
fn a_finished_run_starts_the_next_from_the_largest_cursor() {
    let log = serve(vec![(
        "https://api.example.com/v2/customers?updated_since=2026-01-06T00%3A00%3A00Z".to_string(),
        json_response(json!({"data": {"items": []}, "meta": {}})),
    )]);
    let state = json!({"next": null, "cursor": "2026-01-06T00:00:00Z", "since": "2026-01-01T00:00:00Z"});
    let events = read_to_end(&mut open(&cursor_config(), Some(&state)), 100).unwrap();
    assert!(records_of(&events).is_empty());
    assert_eq!(
        checkpoints_of(&events),
        [json!({"next": null, "cursor": "2026-01-06T00:00:00Z", "since": "2026-01-06T00:00:00Z"})]
    );
    assert_eq!(log.borrow().len(), 1);
}

#[test]
fn records_are_handed_out_in_chunks_of_max_with_the_checkpoint_last() {
    serve(cursor_api());
    let state = json!({"cursor": "2026-01-01T00:00:00Z"});
    let mut reader = open(&cursor_config(), Some(&state));
    let first = reader.next(2).unwrap();
    assert_eq!(first.len(), 1, "two records, no checkpoint yet");
    let second = reader.next(2).unwrap();
    assert_eq!(ids(&records_of(&second)), [3]);
    assert_eq!(checkpoints_of(&second)[0]["next"], "c2");
}

#[test]
fn page_pagination_stops_at_a_short_page() {
    let base = "https://api.example.com/members";
    let page = |n: u64, ids: &[u64]| {
        (
            format!("{base}?page={n}&per_page=2"),
            json_response(Value::Array(ids.iter().map(|i| json!({"id": i})).collect())),
        )
    };
    let log = serve(vec![page(1, &[1, 2]), page(2, &[3, 4]), page(3, &[5])]);
    let cfg = json!({
        "url": base,
        "auth": {"header": "X-Api-Key", "value": "k"},
        "pagination": {"type": "page", "param": "page", "start": 1, "size_param": "per_page", "size": 2}
    });
    let events = read_to_end(&mut open(&cfg, None), 10).unwrap();
    assert_eq!(ids(&records_of(&events)), [1, 2, 3, 4, 5]);
    assert_eq!(
        checkpoints_of(&events)
            .iter()
            .map(|c| c["next"].clone())
            .collect::<Vec<_>>(),
        [json!(2), json!(3), Value::Null]
    );
    assert_eq!(log.borrow().len(), 3);
    assert_eq!(log.borrow()[0].header_value("x-api-key"), Some("k"));

    // Resume at page 3.
    let log = serve(vec![page(3, &[5])]);
    let events = read_to_end(&mut open(&cfg, Some(&json!({"next": 3, "cursor": null}))), 10).unwrap();
    assert_eq!(ids(&records_of(&events)), [5]);
    assert_eq!(urls(&log), [format!("{base}?page=3&per_page=2")]);
}

#[test]
fn page_pagination_without_size_stops_at_an_empty_page() {
    let base = "https://api.example.com/members";
    serve(vec![
        (format!("{base}?p=0"), json_response(json!({"items": [{"id": 1}]}))),
        (format!("{base}?p=1"), json_response(json!({"items": []}))),
    ]);
    let cfg = json!({"url": base, "records_path": "items", "pagination": {"type": "page", "param": "p", "start": 0}});
    let events = read_to_end(&mut open(&cfg, None), 10).unwrap();
    assert_eq!(ids(&records_of(&events)), [1]);
    assert_eq!(checkpoints_of(&events).last().unwrap()["next"], Value::Null);
}

#[test]
fn link_pagination_follows_rel_next() {
    let base = "https://api.example.com/v1/people";
    let log = serve(vec![
        (
            format!("{base}?since=5"),
            json_response(json!([{"id": 1, "seq": 7}]))
                .with_header("Link", r#"<https://api.example.com/v1/people?since=5&page=2>; rel="next", <https://api.example.com/v1/people?page=9>; rel="last""#),
        ),
        (
            format!("{base}?since=5&page=2"),
            json_response(json!([{"id": 2, "seq": 10}])).with_header("link", r#"</v1/people?since=5&page=3>; rel=next"#),
        ),
        (format!("{base}?since=5&page=3"), json_response(json!([{"id": 3, "seq": 9}]))),
    ]);
    let cfg = json!({
        "url": base,
        "pagination": {"type": "link"},
        "incremental": {"cursor_field": "seq", "param": "since"}
    });
    let events = read_to_end(&mut open(&cfg, Some(&json!({"cursor": 5}))), 10).unwrap();
    assert_eq!(ids(&records_of(&events)), [1, 2, 3]);
    let cps = checkpoints_of(&events);
    assert_eq!(cps[0]["next"], format!("{base}?since=5&page=2"));
    assert_eq!(cps[1]["next"], format!("{base}?since=5&page=3"));
    // Numbers compare as numbers: 10 > 9 > 7.
    assert_eq!(cps[2], json!({"next": null, "cursor": 10, "since": 5}));
    assert_eq!(log.borrow().len(), 3);
}

#[test]
fn no_pagination_is_one_request() {
    let log = serve(vec![(
        "https://api.example.com/all".to_string(),
        json_response(json!({"results": [{"id": 1}, {"id": 2}]})),
    )]);
    let cfg = json!({"url": "https://api.example.com/all", "records_path": "results", "method": "post"});
    let events = read_to_end(&mut open(&cfg, None), 10).unwrap();
    assert_eq!(ids(&records_of(&events)), [1, 2]);
    assert_eq!(
        checkpoints_of(&events),
        [json!({"next": null, "cursor": null, "since": null})]
    );
    assert_eq!(log.borrow()[0].method, "POST");
}

fn error_for(resp: Response) -> cdp_plugin_sdk::ConnectorError {
    testing::mock_http(move |_| Ok(resp.clone()));
    let mut reader = open(&json!({"url": "https://api.example.com/x"}), None);
    reader.next(10).unwrap_err()
}

#[test]
fn status_codes_map_to_error_classes() {
    let e = error_for(Response::new(429).with_header("Retry-After", "30"));
    assert_eq!(
        (e.class, e.retryable, e.retry_after_ms),
        (ErrorClass::RateLimited, true, Some(30_000))
    );
    let e = error_for(Response::new(429).with_header("Retry-After", "Thu, 01 Jan 1970 00:00:00 GMT"));
    assert_eq!((e.class, e.retry_after_ms), (ErrorClass::RateLimited, Some(0)));
    let e = error_for(Response::new(503));
    assert_eq!(
        (e.class, e.retryable, e.code.as_str()),
        (ErrorClass::Transient, true, "http_status_503")
    );
    assert_eq!(error_for(Response::new(401)).class, ErrorClass::Auth);
    assert_eq!(error_for(Response::new(403)).class, ErrorClass::Permission);
    let e = error_for(Response::new(404));
    assert_eq!((e.class, e.retryable), (ErrorClass::Config, false));
    assert_eq!(
        error_for(Response::new(200).with_body("<html>")).code,
        "response_not_json"
    );
    assert_eq!(error_for(json_response(json!({"a": 1}))).code, "records_not_array");

    testing::mock_http(|_| {
        Err(HttpError {
            kind: HttpErrorKind::Timeout,
            message: "slow".into(),
        })
    });
    let e = open(&json!({"url": "https://api.example.com/x"}), None)
        .next(1)
        .unwrap_err();
    assert_eq!((e.class, e.retryable), (ErrorClass::Transient, true));
    testing::mock_http(|_| {
        Err(HttpError {
            kind: HttpErrorKind::Denied,
            message: "not allowed".into(),
        })
    });
    let e = open(&json!({"url": "https://api.example.com/x"}), None)
        .next(1)
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Config);
}

#[test]
fn a_failed_page_is_fetched_again_on_the_next_call() {
    let calls = Rc::new(RefCell::new(0));
    let c = calls.clone();
    testing::mock_http(move |_| {
        *c.borrow_mut() += 1;
        Ok(if *c.borrow() == 1 {
            Response::new(502)
        } else {
            json_response(json!([{"id": 1}]))
        })
    });
    let mut reader = open(&json!({"url": "https://api.example.com/x"}), None);
    assert_eq!(reader.next(10).unwrap_err().class, ErrorClass::Transient);
    let events = read_to_end(&mut reader, 10).unwrap();
    assert_eq!(ids(&records_of(&events)), [1]);
    assert_eq!(*calls.borrow(), 2);
}

#[test]
fn a_repeated_cursor_ends_the_run() {
    serve(vec![(
        "https://api.example.com/x?c=same".to_string(),
        json_response(json!({"items": [{"id": 1}], "next": "same"})),
    )]);
    let cfg = json!({
        "url": "https://api.example.com/x",
        "records_path": "items",
        "pagination": {"type": "cursor", "cursor_path": "next", "param": "c"}
    });
    let events = read_to_end(&mut open(&cfg, Some(&json!({"next": "same"}))), 10).unwrap();
    assert_eq!(ids(&records_of(&events)), [1]);
    assert_eq!(checkpoints_of(&events)[0]["next"], Value::Null);
}

#[test]
fn helpers() {
    let v = json!({"a": {"b": [{"c": 1}]}});
    assert_eq!(reader::get_path(&v, "a.b.0.c"), Some(&json!(1)));
    assert_eq!(reader::get_path(&v, ""), Some(&v));
    assert_eq!(reader::get_path(&v, "a.x"), None);
    use std::cmp::Ordering::*;
    assert_eq!(reader::compare_cursor(&json!(10), &json!(9)), Greater);
    assert_eq!(reader::compare_cursor(&json!("10"), &json!("9")), Less);
    assert_eq!(
        reader::compare_cursor(&json!("2026-01-02"), &json!("2026-01-01T23:59:59Z")),
        Greater
    );
}

#[test]
fn config_validation() {
    let check = |cfg: Value| testing::check_source::<HttpSource>(&cfg.to_string());
    assert!(check(cursor_config()).is_ok());
    let code = |cfg: Value| check(cfg.clone()).expect_err(&cfg.to_string()).code;
    assert_eq!(code(json!({"url": "ftp://x"})), "invalid_url");
    assert_eq!(code(json!({"url": "https://x", "method": "DELETE"})), "invalid_method");
    assert_eq!(
        code(json!({"url": "https://x", "auth": {"bearer": ""}})),
        "missing_value"
    );
    assert_eq!(
        code(json!({"url": "https://x", "auth": {"token": "t"}})),
        "invalid_config"
    );
    assert_eq!(
        code(json!({"url": "https://x", "pagination": {"type": "cursor", "param": "c"}})),
        "invalid_config"
    );
    assert_eq!(
        code(json!({"url": "https://x", "pagination": {"type": "page", "size": 0}})),
        "invalid_page_size"
    );
    assert_eq!(
        code(json!({"url": "https://x", "pagination": {"type": "page", "size_param": "n"}})),
        "missing_page_size"
    );
    assert_eq!(
        code(json!({"url": "https://x", "pagination": {"type": "none", "extra": 1}})),
        "invalid_config"
    );
    assert_eq!(
        code(json!({"url": "https://x", "incremental": {"cursor_field": "u"}})),
        "invalid_config"
    );
    assert!(check(json!({"url": "https://x", "pagination": {"type": "link"}})).is_ok());

    // Secrets stay out of Debug output.
    let cfg: Config = cdp_plugin_sdk::parse_config(&cursor_config().to_string()).unwrap();
    assert!(!format!("{cfg:?}").contains("s3cr3t"));
}

#[test]
fn spec_marks_secret_fields() {
    let spec = <HttpSource as cdp_plugin_sdk::Source>::spec();
    assert_eq!(spec.name, "source-http");
    let auth = &spec.config_schema["properties"]["auth"]["oneOf"];
    assert_eq!(auth[0]["properties"]["bearer"]["x-secret"], true);
    assert_eq!(auth[1]["properties"]["value"]["x-secret"], true);
}
