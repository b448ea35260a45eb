//! The HTTP server of `cdp run`, through the real binary on loopback: the
//! collector's answers to good and bad requests, group commit that never
//! answers 200 for unstored events (SIGKILL during load), the admin API's
//! roles and its audit rows, health and metrics.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const WRITE_KEY: &str = "wk_test_2f9c";
const ADMIN: &str = "tok_admin_5d1e";
const OPS: &str = "tok_ops_77aa";
const PRIV: &str = "tok_priv_31b0";

const MANIFEST: &str = r#"
version: 1
name: server-test
storage: { url: "sqlite://cdp.db" }
server:
  admin_token: "${env:T_ADMIN}"
  tokens:
    ops: { token: "${env:T_OPS}", role: read_only }
    dpo: { token: "${env:T_PRIV}", role: privacy }
sources:
  web:
    collector: { write_keys: ["${env:T_WRITE}"] }
    map:
      message_id: messageId
      timestamp: timestamp
      identities: { user_id: userId, anonymous_id: anonymousId, email: traits.email }
      traits: { first_name: traits.first_name }
      event:
        name_field: event
        names: { "Order Completed": order_completed }
identity:
  keys:
    user_id: { limit: 1 }
    email: { normalize: email, limit: 5 }
    anonymous_id: { limit: 100 }
model:
  traits:
    email: { type: string, labels: [pii] }
    first_name: { type: string, labels: [pii] }
  events:
    order_completed: { properties: { order_id: string, revenue: number } }
consent:
  purposes: [analytics]
  default: denied
"#;

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn cdp(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdp"))
        .current_dir(dir)
        .args(args)
        .env("T_ADMIN", ADMIN)
        .env("T_OPS", OPS)
        .env("T_PRIV", PRIV)
        .env("T_WRITE", WRITE_KEY)
        .output()
        .expect("run cdp")
}

mod support;

const ENV: &[(&str, &str)] = &[("T_ADMIN", ADMIN), ("T_OPS", OPS), ("T_PRIV", PRIV), ("T_WRITE", WRITE_KEY)];

/// A `cdp run` of the test manifest on a free loopback port.
struct Server;

impl Server {
    fn start(dir: &Path) -> support::run::CdpRun {
        support::run::CdpRun::start(dir, ENV)
    }
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cdp.yaml"), MANIFEST).expect("manifest");
    let out = cdp(dir.path(), &["validate"]);
    assert!(out.status.success(), "the test manifest is invalid:\n{}", text(&out));
    dir
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime")
}

fn event(id: &str, user: &str) -> Value {
    json!({"type": "track", "messageId": id, "userId": user, "event": "Order Completed",
           "properties": {"order_id": id, "revenue": 10.5}, "timestamp": "2026-11-05T10:00:00Z"})
}

async fn post(c: &reqwest::Client, url: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = c.post(url).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("send");
    let status = res.status().as_u16();
    let text = res.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn basic(key: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{key}:")))
}

/// Message ids of every stored record.
fn stored_ids(dir: &Path) -> std::collections::HashSet<String> {
    let out = cdp(dir, &["export", "records", "--format", "jsonl", "--quiet"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["message_id"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn events_in_profiles_out_through_the_admin_api() {
    let dir = setup();
    let server = Server::start(dir.path());
    rt().block_on(async {
        let c = client();
        let auth = basic(WRITE_KEY);
        let batch = json!({"batch": [
            {"type": "identify", "messageId": "m1", "anonymousId": "anon-1", "userId": "u-1",
             "traits": {"email": "Ada.Lovelace@Example.org", "first_name": "Ada"}},
            event("m2", "u-1"),
        ], "sentAt": "2026-11-05T10:00:01Z"});
        let (s, body) = post(
            &c,
            &format!("{}/v1/batch", server.base),
            body_bytes(&batch),
            &[("authorization", &auth), ("content-type", "application/json")],
        )
        .await;
        assert_eq!((s, &body["success"]), (200, &json!(true)), "{body}");
        // The key in the body, as browser SDKs send it, and a single-message route.
        let mut one = event("m3", "u-1");
        one["writeKey"] = json!(WRITE_KEY);
        let (s, body) = post(&c, &format!("{}/v1/track", server.base), body_bytes(&one), &[]).await;
        assert_eq!(s, 200, "{body}");

        let url = format!("{}/admin/v1/profiles/email/ada.lovelace%40example.org?events=10", server.base);
        let res = c.get(&url).bearer_auth(ADMIN).send().await.expect("profile");
        assert_eq!(res.status().as_u16(), 200);
        let api: Value = res.json_text().await;
        let out = cdp(
            dir.path(),
            &["profile", "get", "email=ada.lovelace@example.org", "--format", "json", "--events", "10"],
        );
        assert!(out.status.success(), "{}", text(&out));
        let cli: Value = serde_json::from_slice(&out.stdout).expect("cli json");
        assert_eq!(api["profile_id"], cli["profile_id"]);
        assert_eq!(api["identities"], cli["identities"]);
        assert_eq!(api["traits"], cli["traits"]);
        assert_eq!(api["events"].as_array().map(Vec::len), Some(2), "{api}");

        for path in ["/healthz", "/readyz"] {
            let res = c.get(format!("{}{path}", server.base)).send().await.expect("health");
            assert_eq!(res.status().as_u16(), 200, "{path}");
        }
        let metrics =
            c.get(format!("{}/metrics", server.base)).send().await.expect("metrics").text().await.expect("text");
        assert!(metrics.contains("cdp_events_received_total{source=\"web\"} 3"), "{metrics}");
        assert!(metrics.contains("cdp_http_request_duration_seconds_bucket"), "{metrics}");
    });
    server.stop();
}

fn body_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

trait JsonText {
    async fn json_text(self) -> Value;
}

impl JsonText for reqwest::Response {
    async fn json_text(self) -> Value {
        let t = self.text().await.expect("body");
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

/// What is sent, where, with which headers; the status and a text the answer must hold.
type Case<'a> = (&'a str, &'a str, Vec<u8>, Vec<(&'a str, String)>, u16, &'a str);

#[test]
fn bad_requests_get_their_status_and_store_nothing() {
    let dir = setup();
    let server = Server::start(dir.path());
    let base = server.base.clone();
    rt().block_on(async {
        let c = client();
        let auth = basic(WRITE_KEY);
        let json_ct = ("content-type", "application/json");
        let batch_url = format!("{base}/v1/batch");
        let track_url = format!("{base}/v1/track");
        let big = "x".repeat(33 * 1024);
        let one_bad = json!({"batch": [event("good-1", "u-9"), {"type": "track", "messageId": "bad-1", "event": "x"}]});
        let bomb = gzip(&vec![b' '; 8 * 1024 * 1024]);
        let huge_batch: Vec<Value> = (0..300)
            .map(|i| {
                let mut e = event(&format!("huge-{i}"), "u");
                e["pad"] = json!("y".repeat(2000));
                e
            })
            .collect();
        let cases: Vec<Case<'_>> = vec![
            (
                "no key",
                batch_url.as_str(),
                body_bytes(&json!({"batch": [event("nokey", "u")]})),
                vec![],
                401,
                "no write key",
            ),
            (
                "wrong key",
                batch_url.as_str(),
                body_bytes(&json!({"batch": [event("wrong", "u")]})),
                vec![("authorization", basic("nope"))],
                401,
                "unknown write key",
            ),
            (
                "oversized message",
                track_url.as_str(),
                body_bytes(&json!({"userId": "u", "messageId": "big-1", "event": "x", "properties": {"p": big}})),
                vec![("authorization", auth.clone())],
                413,
                "32 KB",
            ),
            (
                "oversized batch",
                batch_url.as_str(),
                body_bytes(&json!({"batch": huge_batch})),
                vec![("authorization", auth.clone())],
                413,
                "500 KB",
            ),
            (
                "malformed JSON",
                batch_url.as_str(),
                b"{\"batch\": [".to_vec(),
                vec![("authorization", auth.clone())],
                400,
                "malformed JSON",
            ),
            (
                "gzip bomb",
                batch_url.as_str(),
                bomb,
                vec![("authorization", auth.clone()), ("content-encoding", "gzip".into())],
                413,
                "500 KB",
            ),
            (
                "wrong content type",
                batch_url.as_str(),
                body_bytes(&json!({"batch": []})),
                vec![("authorization", auth.clone()), ("content-type", "application/xml".into())],
                415,
                "application/json",
            ),
            (
                "message without an id",
                track_url.as_str(),
                body_bytes(&json!({"event": "x", "messageId": "noid"})),
                vec![("authorization", auth.clone())],
                400,
                "neither `userId` nor `anonymousId`",
            ),
            (
                "one bad message of two",
                batch_url.as_str(),
                body_bytes(&one_bad),
                vec![("authorization", auth.clone())],
                200,
                "neither `userId` nor `anonymousId`",
            ),
        ];
        for (what, url, body, headers, want, says) in cases {
            let mut h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            if !h.iter().any(|(k, _)| *k == "content-type") {
                h.push(json_ct);
            }
            let (status, body) = post(&c, url, body, &h).await;
            assert_eq!(status, want, "{what}: {body}");
            assert!(body.to_string().contains(says), "{what}: `{says}` not in {body}");
        }
        // The batch with one bad message: the bad one is named, the good one stored.
        let (_, body) = post(&c, &batch_url, body_bytes(&one_bad), &[("authorization", &auth), json_ct]).await;
        assert_eq!(body["rejected"][0]["index"], 1, "{body}");
        assert_eq!(body["stored"], 1, "{body}");

        // Many slow clients that never finish their request head do not stop
        // the server from answering others, and are closed after the head
        // timeout.
        let addr = base.trim_start_matches("http://").to_owned();
        let mut slow = Vec::new();
        for _ in 0..10_000 {
            match tokio::net::TcpStream::connect(&addr).await {
                Ok(mut s) => {
                    use tokio::io::AsyncWriteExt;
                    let _ = s.write_all(b"POST /v1/batch HTTP/1.1\r\nHost: x\r\n").await;
                    slow.push(s);
                }
                Err(e) => panic!("connection {} refused: {e}", slow.len()),
            }
        }
        let started = Instant::now();
        let (status, body) = post(
            &c,
            &batch_url,
            body_bytes(&json!({"batch": [event("during-slow", "u-9")]})),
            &[("authorization", &auth), json_ct],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answered in {:?} with 10,000 slow connections open",
            started.elapsed()
        );
        let mut first = slow.swap_remove(0);
        let mut buf = [0u8; 512];
        use tokio::io::AsyncReadExt;
        let closed = tokio::time::timeout(Duration::from_secs(20), first.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(_)) | Ok(Err(_))), "a slow connection was not closed after the head timeout");
        drop(slow);
    });
    let ids = stored_ids(dir.path());
    let want: std::collections::HashSet<String> = ["good-1", "during-slow"].iter().map(|s| s.to_string()).collect();
    assert_eq!(ids, want, "only the good messages are stored");
    server.stop();
}

#[test]
fn roles_decide_what_a_token_may_do_and_every_request_is_audited() {
    let dir = setup();
    let server = Server::start(dir.path());
    let base = server.base.clone();
    rt().block_on(async {
        let c = client();
        let (s, body) = post(&c, &format!("{base}/v1/batch"), body_bytes(&json!({"batch": [event("r1", "u-1")]})), &[("authorization", &basic(WRITE_KEY)), ("content-type", "application/json")]).await;
        assert_eq!(s, 200, "{body}");
        let reads = ["/admin/v1/status", "/admin/v1/profiles/user_id/u-1", "/admin/v1/profiles/user_id/u-1/explain", "/admin/v1/audiences", "/admin/v1/syncs", "/admin/v1/audit"];
        let writes = ["/admin/v1/reload", "/admin/v1/profiles/user_id/u-1/unmerge", "/admin/v1/syncs/web/run"];
        let mut requests = 0;
        for r in reads {
            let res = c.get(format!("{base}{r}")).bearer_auth(OPS).send().await.expect("read");
            assert_eq!(res.status().as_u16(), 200, "read-only GET {r}");
            requests += 1;
        }
        for w in writes {
            let res = c.post(format!("{base}{w}")).bearer_auth(OPS).send().await.expect("write");
            assert_eq!(res.status().as_u16(), 403, "read-only POST {w}");
            requests += 1;
        }
        let res = c.get(format!("{base}/admin/v1/status")).send().await.expect("no token");
        assert_eq!(res.status().as_u16(), 401);
        let res = c.get(format!("{base}/admin/v1/status")).bearer_auth("guess").send().await.expect("bad token");
        assert_eq!(res.status().as_u16(), 401);
        requests += 2;
        let res = c.post(format!("{base}/admin/v1/reload")).bearer_auth(ADMIN).send().await.expect("reload");
        assert_eq!(res.status().as_u16(), 202);
        let res = c.post(format!("{base}/admin/v1/syncs/web/run")).bearer_auth(ADMIN).send().await.expect("run");
        assert_eq!(res.status().as_u16(), 404, "the collector is not a plugin sync");
        requests += 2;

        let res = c.get(format!("{base}/admin/v1/audit")).bearer_auth(ADMIN).send().await.expect("audit");
        let rows = res.json_text().await["rows"].as_array().cloned().unwrap_or_default();
        assert_eq!(rows.len(), requests, "one row per request before this one: {rows:#?}");
        let denied = rows.iter().filter(|r| r["actor"] == "ops" && r["outcome"] == "denied").count();
        assert_eq!(denied, writes.len());
        let unauthorized = rows.iter().filter(|r| r["actor"] == "-" && r["outcome"] == "unauthorized").count();
        assert_eq!(unauthorized, 2);
        assert!(rows.iter().any(|r| r["action"] == "GET /admin/v1/profiles/{key}/{value}" && r["target"] == "profiles/user_id/u-1"), "{rows:#?}");
        assert!(rows.iter().all(|r| !r.to_string().contains(OPS) && !r.to_string().contains(ADMIN)), "tokens are never stored");
    });
    server.stop();
    assert!(!server_log_has_secret(dir.path()), "a token or write key reached the log");
}

#[test]
fn privacy_operations_are_for_the_privacy_role_and_name_no_one_in_the_audit_log() {
    let dir = setup();
    let server = Server::start(dir.path());
    let base = server.base.clone();
    rt().block_on(async {
        let c = client();
        let batch = json!({"batch": [
            {"type": "identify", "messageId": "p1", "userId": "u-9", "traits": {"email": "zed@example.org", "first_name": "Zed"}},
            event("p2", "u-9"),
        ]});
        let (s, body) = post(&c, &format!("{base}/v1/batch"), body_bytes(&batch), &[("authorization", &basic(WRITE_KEY)), ("content-type", "application/json")]).await;
        assert_eq!(s, 200, "{body}");
        let who = json!({"key": "email", "value": "zed@example.org"}).to_string();
        let res = c.post(format!("{base}/admin/v1/privacy/export")).bearer_auth(OPS).body(who.clone()).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 403, "read-only may not");
        let res = c.post(format!("{base}/admin/v1/privacy/export")).bearer_auth(PRIV).body(who.clone()).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 200);
        let doc = res.json_text().await;
        assert_eq!(doc["export"]["records"].as_array().map(Vec::len), Some(2), "{doc}");
        let res = c.post(format!("{base}/admin/v1/privacy/delete")).bearer_auth(PRIV).body(who.clone()).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 200);
        let id = res.json_text().await["request_id"].as_i64().unwrap();
        let res = c.get(format!("{base}/admin/v1/privacy/requests/{id}")).bearer_auth(PRIV).send().await.unwrap();
        assert_eq!(res.json_text().await["state"], "done");
        let res = c.get(format!("{base}/admin/v1/profiles/email/zed%40example.org")).bearer_auth(ADMIN).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 404, "erased");
        let res = c.post(format!("{base}/admin/v1/privacy/delete")).bearer_auth(PRIV).body(who).send().await.unwrap();
        assert_eq!(res.status().as_u16(), 404, "nothing left to erase");
        let rows = c.get(format!("{base}/admin/v1/audit")).bearer_auth(ADMIN).send().await.unwrap().json_text().await;
        let text = rows.to_string();
        assert!(text.contains("privacy/delete") && text.contains("\"actor\":\"dpo\""), "{rows:#}");
    });
    server.stop();
    let out = cdp(dir.path(), &["audit", "--format", "json"]);
    let rows: Value = serde_json::from_slice(&out.stdout).expect("audit json");
    let privacy: Vec<&Value> =
        rows["rows"].as_array().unwrap().iter().filter(|r| r.to_string().contains("privacy")).collect();
    assert_eq!(privacy.len(), 5, "{rows:#}");
    assert!(
        privacy.iter().all(|r| !r.to_string().contains("zed@example.org")),
        "privacy rows name no one: {privacy:#?}"
    );
}

fn server_log_has_secret(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("run-"))
        .any(|e| {
            let log = std::fs::read_to_string(e.path()).unwrap_or_default();
            log.contains(ADMIN) || log.contains(OPS) || log.contains(WRITE_KEY)
        })
}

/// SIGKILL during a load run: every event answered 200 is stored after a
/// restart.
#[test]
fn events_answered_200_survive_sigkill() {
    let dir = setup();
    let server = Server::start(dir.path());
    let base = server.base.clone();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let rt = rt();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (base, acked, stop) = (base.clone(), acked.clone(), stop.clone());
        tasks.push(rt.spawn(async move {
            let c = client();
            let auth = basic(WRITE_KEY);
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ids: Vec<String> = (0..50).map(|i| format!("w{w}-b{n}-{i}")).collect();
                let batch: Vec<Value> = ids.iter().map(|id| event(id, &format!("user-{w}-{}", n % 7))).collect();
                n += 1;
                let res = c
                    .post(format!("{base}/v1/batch"))
                    .header("authorization", &auth)
                    .header("content-type", "application/json")
                    .body(body_bytes(&json!({"batch": batch})))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status().as_u16() == 200 => acked.lock().expect("lock").extend(ids),
                    _ => break,
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(2_500));
    server.kill();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 500, "the load run sent too little to mean anything: {}", acked.len());
    // A restart recovers the store; every acknowledged event is in it.
    let again = Server::start(dir.path());
    again.stop();
    let stored = stored_ids(dir.path());
    let missing: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events are not stored, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

/// `server.tls`: HTTPS with the manifest's certificate; plain HTTP on the
/// same port gets no answer.
#[test]
fn tls_from_the_manifest() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A throwaway CA and a server certificate it signed.
    std::fs::write(
        dir.path().join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    let script = "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=cdp-test-ca \
        && openssl req -newkey rsa:2048 -nodes -keyout key.pem -out leaf.csr -subj /CN=localhost \
        && openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 2 -extfile leaf.ext";
    let made = Command::new("sh")
        .current_dir(dir.path())
        .args(["-c", script])
        .output()
        .expect("openssl (Debian package openssl) makes the test certificates");
    assert!(made.status.success(), "{}", text(&made));
    let manifest = MANIFEST.replace("server:\n", "server:\n  tls: { cert: cert.pem, key: key.pem }\n");
    std::fs::write(dir.path().join("cdp.yaml"), manifest).expect("manifest");
    let server = Server::start(dir.path());
    assert!(server.base.starts_with("https://"), "{}", server.base);
    rt().block_on(async {
        let cert = std::fs::read(dir.path().join("ca.pem")).expect("ca");
        let c = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&cert).expect("pem"))
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let res = c.get(format!("{}/healthz", server.base)).send().await.expect("https");
        assert_eq!(res.status().as_u16(), 200);
        let (s, body) = post(
            &c,
            &format!("{}/v1/batch", server.base),
            body_bytes(&json!({"batch": [event("tls-1", "u-1")]})),
            &[("authorization", &basic(WRITE_KEY)), ("content-type", "application/json")],
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let plain = format!("{}/healthz", server.base.replacen("https://", "http://", 1));
        assert!(client().get(plain).send().await.is_err(), "plain HTTP was answered on the TLS port");
    });
    server.stop();
}
