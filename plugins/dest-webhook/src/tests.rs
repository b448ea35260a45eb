use std::cell::RefCell;
use std::rc::Rc;

use cdp_plugin_sdk::http::{Request, Response};
use cdp_plugin_sdk::{ErrorClass, Op, testing};
use serde_json::{Value, json};

use super::body::{Format, render, render_csv, render_xml, select_traits, xml_escape, xml_name};
use super::*;

fn rec(key: &str, op: Op, profile: &str, identities: Value, traits: Value) -> DestinationRecord {
    serde_json::from_value(json!({
        "key": key,
        "op": op,
        "profile_id": profile,
        "identities": identities,
        "traits": traits,
    }))
    .unwrap()
}

fn sample() -> Vec<DestinationRecord> {
    let mut a = rec(
        "k1",
        Op::Enter,
        "p1",
        json!({"email": ["ada@example.com"], "phone": ["+46701234567"]}),
        json!({"first_name": "Ada", "tier": "gold"}),
    );
    a.audience = Some("vip".into());
    a.occurred_at = Some("2026-11-22T10:00:00Z".into());
    let b = rec(
        "k2",
        Op::Upsert,
        "p2",
        json!({"email": ["a@x.com", "b@x.com"]}),
        json!({"first_name": "Bob \"the\" Builder, Jr.", "score": 9.5, "city": "Malmö\nSkåne"}),
    );
    vec![a, b]
}

#[test]
fn hmac_sha256_matches_rfc_4231() {
    // Test case 2.
    assert_eq!(
        hmac_hex(b"Jefe", b"what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    // Test case 1.
    assert_eq!(
        hmac_hex(&[0x0b; 20], b"Hi There"),
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
    );
}

#[test]
fn the_signature_covers_the_timestamp() {
    let s = signature(b"topsecret", 1_700_000_000, b"{}");
    assert_eq!(
        s,
        format!("t=1700000000,v1={}", hmac_hex(b"topsecret", b"1700000000.{}"))
    );
    assert_ne!(
        s,
        signature(b"topsecret", 1_700_000_001, b"{}").replace("t=1700000001", "t=1700000000")
    );
}

#[test]
fn csv_cells_that_spreadsheets_would_run_are_neutralised() {
    let mut r = sample().remove(0);
    r.traits
        .insert("note".into(), json!("=HYPERLINK(\"http://evil.example\",\"x\")"));
    r.traits.insert("city".into(), json!("@SUM(1)"));
    r.traits.insert("delta".into(), json!(-5));
    let out = String::from_utf8(render_csv(&[r], None).unwrap()).unwrap();
    assert!(out.contains("\"'=HYPERLINK("), "{out}");
    assert!(out.contains("'@SUM(1)"), "{out}");
    assert!(out.contains(",-5,"), "numbers stay numbers: {out}");
}

#[test]
fn idempotency_key_hashes_the_keys() {
    assert_eq!(
        idempotency_key(["k1", "k2"]),
        "f418ef775552103f1b7be000b4505b96fcdbb33b83a258d0f05d1769bd691f54"
    );
    assert_eq!(
        idempotency_key([]),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn xml_body_is_escaped_and_well_formed() {
    let mut records = sample();
    records[1].key = "k<2>&\"'".into();
    records[1].traits.insert("2nd phone".into(), json!(null));
    records[1].traits.insert("xmlish".into(), json!(["a", 1]));
    records[1]
        .traits
        .insert("addr".into(), json!({"zip": "211 20", "ns:x": true}));
    records[1].traits.insert("ctl".into(), json!("bell\u{7}"));
    let xml = render_xml(&records);
    let expected = concat!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<records>",
        "<record key=\"k1\" op=\"enter\"><profile_id>p1</profile_id><audience>vip</audience>",
        "<identities><email>ada@example.com</email><phone>+46701234567</phone></identities>",
        "<traits><first_name>Ada</first_name><tier>gold</tier></traits>",
        "<occurred_at>2026-11-22T10:00:00Z</occurred_at></record>",
        "<record key=\"k&lt;2&gt;&amp;&quot;&apos;\" op=\"upsert\"><profile_id>p2</profile_id>",
        "<identities><email>a@x.com</email><email>b@x.com</email></identities>",
        "<traits><first_name>Bob &quot;the&quot; Builder, Jr.</first_name><score>9.5</score>",
        "<city>Malmö\nSkåne</city><_2nd_phone name=\"2nd phone\"/>",
        "<_xmlish name=\"xmlish\"><item>a</item><item>1</item></_xmlish>",
        "<addr><zip>211 20</zip><ns_x name=\"ns:x\">true</ns_x></addr>",
        "<ctl>bell\u{FFFD}</ctl></traits></record></records>\n",
    );
    assert_eq!(xml, expected);
}

#[test]
fn xml_names_and_escaping() {
    assert_eq!(xml_name("first_name"), ("first_name".to_string(), false));
    assert_eq!(xml_name("e-mail.work"), ("e-mail.work".to_string(), false));
    assert_eq!(xml_name("1st"), ("_1st".to_string(), true));
    assert_eq!(xml_name("-x"), ("_-x".to_string(), true));
    assert_eq!(xml_name(""), ("_".to_string(), true));
    assert_eq!(xml_name("XMLdata"), ("_XMLdata".to_string(), true));
    assert_eq!(xml_name("a b/c"), ("a_b_c".to_string(), true));
    assert_eq!(xml_name("prénom"), ("prénom".to_string(), false));
    assert_eq!(xml_escape("a<b>&\"c'\u{0}\t"), "a&lt;b&gt;&amp;&quot;c&apos;\u{FFFD}\t");
}

#[test]
fn csv_body_has_union_header_and_rfc4180_quoting() {
    let csv = String::from_utf8(render_csv(&sample(), None).unwrap()).unwrap();
    let expected = concat!(
        "key,op,profile_id,audience,email,phone,first_name,tier,score,city,occurred_at\r\n",
        "k1,enter,p1,vip,ada@example.com,+46701234567,Ada,gold,,,2026-11-22T10:00:00Z\r\n",
        "k2,upsert,p2,,a@x.com;b@x.com,,\"Bob \"\"the\"\" Builder, Jr.\",,9.5,\"Malmö\nSkåne\",\r\n",
    );
    assert_eq!(csv, expected);

    // `fields` fixes the trait columns; a trait named like a column is prefixed.
    let mut records = sample();
    records[0].traits.insert("email".into(), json!("trait-email"));
    let fields = vec!["tier".to_string(), "email".to_string(), "missing".to_string()];
    let filtered: Vec<_> = records.iter().map(|r| select_traits(r, Some(&fields))).collect();
    let csv = String::from_utf8(render_csv(&filtered, Some(&fields)).unwrap()).unwrap();
    let mut lines = csv.split("\r\n");
    assert_eq!(
        lines.next().unwrap(),
        "key,op,profile_id,audience,email,phone,tier,trait.email,missing,occurred_at"
    );
    assert_eq!(
        lines.next().unwrap(),
        "k1,enter,p1,vip,ada@example.com,+46701234567,gold,trait-email,,2026-11-22T10:00:00Z"
    );
}

#[test]
fn json_and_ndjson_bodies() {
    let records = sample();
    let body: Value = serde_json::from_slice(&render(Format::Json, &records, None).unwrap()).unwrap();
    assert_eq!(body["records"].as_array().unwrap().len(), 2);
    assert_eq!(body["records"][0]["audience"], "vip");
    assert_eq!(body["records"][1]["identities"]["email"], json!(["a@x.com", "b@x.com"]));
    let nd = String::from_utf8(render(Format::Ndjson, &records, None).unwrap()).unwrap();
    let lines: Vec<Value> = nd.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["key"], "k1");
    assert_eq!(lines[1]["op"], "upsert");
    let only = select_traits(&records[1], Some(&["score".to_string()]));
    assert_eq!(Value::Object(only.traits), json!({"score": 9.5}));
}

#[test]
fn per_record_results_parsing() {
    let r = parse_results(br#"{"results": [{"index": 0, "status": "ok"}, {"index": 1, "status": "rejected", "reason": "bad email"}, {"index": 2, "status": "ERROR", "reason": {"code": 7}}]}"#);
    assert_eq!(
        r,
        Some(vec![(1, "bad email".to_string()), (2, r#"{"code":7}"#.to_string())])
    );
    let r = parse_results(br#"{"rejected": [{"index": 3, "reason": "dup"}, {"index": 4}]}"#);
    assert_eq!(
        r,
        Some(vec![
            (3, "dup".to_string()),
            (4, "rejected by the endpoint".to_string())
        ])
    );
    assert_eq!(parse_results(b"OK"), None);
    assert_eq!(parse_results(br#"{"status": "ok"}"#), None);
}

type Log = Rc<RefCell<Vec<Request>>>;

fn serve(mut respond: impl FnMut(usize, &Request) -> Response + 'static) -> Log {
    let log: Log = Rc::default();
    let seen = log.clone();
    testing::mock_http(move |req| {
        let n = seen.borrow().len();
        seen.borrow_mut().push(req.clone());
        Ok(respond(n, req))
    });
    log
}

fn batch(n: usize) -> String {
    (0..n)
        .map(|i| {
            json!({"key": format!("k{i}"), "op": "upsert", "profile_id": format!("p{i}"),
                   "identities": {"email": [format!("u{i}@example.com")]}, "traits": {"n": i}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn writer(cfg: Value) -> WebhookWriter {
    testing::open_destination::<Webhook>(&cfg.to_string()).unwrap()
}

#[test]
fn batches_are_chunked_signed_and_keyed() {
    let log = serve(|_, _| Response::new(200).with_body("accepted"));
    let mut w = writer(json!({
        "url": "https://hooks.example.com/cdp",
        "format": "ndjson",
        "batch_size": 2,
        "signing_secret": "topsecret",
        "headers": {"Authorization": "Token abc"}
    }));
    let ack = testing::write(&mut w, &batch(5)).unwrap();
    assert_eq!((ack.accepted, ack.rejected.len()), (5, 0));
    let reqs = log.borrow();
    assert_eq!(reqs.len(), 3);
    for (req, keys) in reqs.iter().zip([vec!["k0", "k1"], vec!["k2", "k3"], vec!["k4"]]) {
        assert_eq!(req.method, "POST");
        assert_eq!(req.url, "https://hooks.example.com/cdp");
        assert_eq!(req.header_value("content-type"), Some("application/x-ndjson"));
        assert_eq!(req.header_value("authorization"), Some("Token abc"));
        assert_eq!(
            req.header_value("idempotency-key").unwrap(),
            idempotency_key(keys.iter().copied())
        );
        let body = req.body.as_deref().unwrap();
        assert_eq!(body.iter().filter(|b| **b == b'\n').count(), keys.len());
        let ts: u64 = req.header_value("x-cdp-timestamp").unwrap().parse().unwrap();
        assert!(ts > 1_700_000_000);
        assert_eq!(
            req.header_value("x-cdp-signature").unwrap(),
            signature(b"topsecret", ts, body)
        );
    }
}

#[test]
fn unsigned_requests_carry_no_signature() {
    let log = serve(|_, _| Response::new(204));
    let mut w = writer(json!({"url": "https://hooks.example.com/cdp", "format": "xml"}));
    testing::write(&mut w, &batch(1)).unwrap();
    let req = &log.borrow()[0];
    assert!(req.header_value("x-cdp-signature").is_none());
    assert!(req.header_value("x-cdp-timestamp").is_none());
    assert_eq!(req.header_value("content-type"), Some("application/xml; charset=utf-8"));
    assert!(
        String::from_utf8(req.body.clone().unwrap())
            .unwrap()
            .contains("<record key=\"k0\" op=\"upsert\">")
    );
}

#[test]
fn per_record_rejections_map_to_batch_indexes() {
    serve(|n, _| match n {
        0 => Response::new(200)
            .with_body(r#"{"results": [{"index": 1, "status": "rejected", "reason": "invalid email"}]}"#),
        1 => Response::new(207).with_body(
            r#"{"rejected": [{"index": 0, "reason": "duplicate"}, {"index": 5, "reason": "out of range"}]}"#,
        ),
        _ => Response::new(422).with_body("unprocessable"),
    });
    let mut w = writer(json!({"url": "https://hooks.example.com/cdp", "batch_size": 2}));
    // Line 2 of the batch does not decode: the SDK rejects it, the writer sees 5 records.
    let mut lines: Vec<String> = batch(5).lines().map(str::to_string).collect();
    lines.insert(2, "{broken".into());
    let ack = testing::write(&mut w, &lines.join("\n")).unwrap();
    let got: Vec<(u32, ErrorClass, String)> = ack
        .rejected
        .iter()
        .map(|r| (r.index, r.reason.class, r.reason.message.clone()))
        .collect();
    assert_eq!(got.len(), 4);
    assert_eq!((got[0].0, got[0].2.as_str()), (1, "invalid email"));
    assert_eq!(got[1].0, 2); // the undecodable line
    assert_eq!((got[2].0, got[2].2.as_str()), (3, "duplicate"));
    assert_eq!((got[3].0, got[3].1), (5, ErrorClass::Data));
    assert!(got[3].2.contains("HTTP 422: unprocessable"));
    assert_eq!(ack.accepted, 2);
}

#[test]
fn retryable_and_fatal_statuses_fail_the_write() {
    let cases = [
        (
            Response::new(429).with_header("Retry-After", "12"),
            ErrorClass::RateLimited,
            true,
        ),
        (Response::new(500), ErrorClass::Transient, true),
        (Response::new(503), ErrorClass::Transient, true),
        (Response::new(401), ErrorClass::Auth, false),
        (Response::new(403), ErrorClass::Permission, false),
        (Response::new(404), ErrorClass::Config, false),
        (
            Response::new(302).with_header("Location", "https://elsewhere/"),
            ErrorClass::Config,
            false,
        ),
    ];
    for (resp, class, retryable) in cases {
        let status = resp.status;
        serve(move |_, _| resp.clone());
        let mut w = writer(json!({"url": "https://hooks.example.com/cdp"}));
        let e = testing::write(&mut w, &batch(3)).unwrap_err();
        assert_eq!((e.class, e.retryable), (class, retryable), "HTTP {status}");
        if status == 429 {
            assert_eq!(e.retry_after_ms, Some(12_000));
        }
    }
}

#[test]
fn delete_posts_to_delete_url_or_is_unsupported() {
    let mut w = writer(json!({"url": "https://hooks.example.com/cdp"}));
    let line = r#"{"key": "d1", "profile_id": "p1", "identities": {"email": ["a@x.com"]}}"#;
    assert_eq!(
        testing::delete(&mut w, line).unwrap_err().class,
        ErrorClass::Unsupported
    );

    let log = serve(|_, _| Response::new(200).with_body(r#"{"rejected": [{"index": 1, "reason": "unknown person"}]}"#));
    let mut w = writer(json!({
        "url": "https://hooks.example.com/cdp",
        "delete_url": "https://hooks.example.com/cdp/erase",
        "signing_secret": "s"
    }));
    let two = format!(
        "{line}\n{}",
        r#"{"key": "d2", "profile_id": "p2", "identities": {"phone": ["+1555"]}}"#
    );
    let ack = testing::delete(&mut w, &two).unwrap();
    assert_eq!(ack.accepted, 1);
    assert_eq!(ack.rejected[0].index, 1);
    let req = &log.borrow()[0];
    assert_eq!(req.url, "https://hooks.example.com/cdp/erase");
    let body: Value = serde_json::from_slice(req.body.as_deref().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"delete": [
            {"key": "d1", "profile_id": "p1", "identities": {"email": ["a@x.com"]}},
            {"key": "d2", "profile_id": "p2", "identities": {"phone": ["+1555"]}}
        ]})
    );
    assert_eq!(
        req.header_value("idempotency-key").unwrap(),
        idempotency_key(["d1", "d2"])
    );
    assert!(req.header_value("x-cdp-signature").is_some());
}

#[test]
fn config_validation_and_spec() {
    let check = |cfg: Value| testing::check_destination::<Webhook>(&cfg.to_string());
    assert!(check(json!({"url": "https://h.example/x", "format": "csv"})).is_ok());
    let code = |cfg: Value| check(cfg.clone()).expect_err(&cfg.to_string()).code;
    assert_eq!(code(json!({"url": "h.example"})), "invalid_url");
    assert_eq!(
        code(json!({"url": "https://h.example", "delete_url": "x"})),
        "invalid_url"
    );
    assert_eq!(
        code(json!({"url": "https://h.example", "method": "GET"})),
        "invalid_method"
    );
    assert_eq!(
        code(json!({"url": "https://h.example", "batch_size": 0})),
        "invalid_batch_size"
    );
    assert_eq!(
        code(json!({"url": "https://h.example", "signing_secret": ""})),
        "empty_signing_secret"
    );
    assert_eq!(
        code(json!({"url": "https://h.example", "format": "yaml"})),
        "invalid_config"
    );
    let cfg: Config = cdp_plugin_sdk::parse_config(
        r#"{"url": "https://h.example", "signing_secret": "hush", "headers": {"A": "tok"}}"#,
    )
    .unwrap();
    let dbg = format!("{cfg:?}");
    assert!(!dbg.contains("hush") && !dbg.contains("tok"), "{dbg}");

    let spec = <Webhook as Destination>::spec();
    assert_eq!(spec.name, "dest-webhook");
    assert_eq!(spec.capabilities, ["http", "delete"]);
    assert_eq!(spec.config_schema["properties"]["signing_secret"]["x-secret"], true);
}
