//! Activation through the real binary: events posted to the collector move
//! people into audiences and the shipped webhook connector delivers them to
//! a real HTTP server on loopback; consent withdrawals remove them; a
//! misbehaving server (429 with Retry-After, 500, hangs, resets, garbage)
//! loses nothing; the shrink guard holds back a mass removal until resumed;
//! an erasure reaches the destination's delete endpoint, retried while it
//! fails, with its receipt in `cdp privacy status`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WRITE_KEY: &str = "wk_act_91c3";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn cdp(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdp"))
        .current_dir(dir)
        .args(args)
        .env("T_WRITE", WRITE_KEY)
        .output()
        .expect("run cdp")
}

fn json_of(dir: &Path, args: &[&str]) -> Value {
    let out = cdp(dir, args);
    assert!(out.status.success(), "cdp {args:?}:\n{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("cdp {args:?}: {e}\n{}", text(&out)))
}

/// What the loopback server does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Ok,
    TooMany,
    Error,
    Hang,
    Reset,
    Garbage,
}

/// One record the server accepted.
#[derive(Debug, Clone)]
struct Got {
    key: String,
    op: String,
    profile: String,
    email: Option<String>,
}

#[derive(Default)]
struct Hook {
    /// Faults for the coming requests, in order; then `Ok`.
    faults: Vec<Fault>,
    got: Vec<Got>,
    /// Erasures received: (key, emails).
    deleted: Vec<(String, Vec<String>)>,
    requests: usize,
}

/// A real HTTP/1.1 server on loopback that records the records of each
/// request it answers 200, and misbehaves as told.
struct Receiver {
    port: u16,
    hook: Arc<Mutex<Hook>>,
}

impl Receiver {
    fn start(rt: &tokio::runtime::Runtime) -> Receiver {
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hook = Arc::new(Mutex::new(Hook::default()));
        let h = hook.clone();
        rt.spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                tokio::spawn(serve(sock, h.clone()));
            }
        });
        Receiver { port, hook }
    }

    fn got(&self) -> Vec<Got> {
        self.hook.lock().unwrap().got.clone()
    }

    fn set_faults(&self, faults: Vec<Fault>) {
        self.hook.lock().unwrap().faults = faults;
    }
}

async fn serve(mut sock: tokio::net::TcpStream, hook: Arc<Mutex<Hook>>) {
    loop {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end..head_end + len].to_vec();
        let fault = {
            let mut h = hook.lock().unwrap();
            h.requests += 1;
            if h.faults.is_empty() { Fault::Ok } else { h.faults.remove(0) }
        };
        let reply: &[u8] = match fault {
            Fault::Ok => {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let mut h = hook.lock().unwrap();
                for r in v["delete"].as_array().into_iter().flatten() {
                    let emails = r["identities"]["email"].as_array().into_iter().flatten();
                    let emails = emails.filter_map(|e| e.as_str().map(str::to_owned)).collect();
                    h.deleted.push((r["key"].as_str().unwrap_or("").to_owned(), emails));
                }
                for r in v["records"].as_array().into_iter().flatten() {
                    h.got.push(Got {
                        key: r["key"].as_str().unwrap_or("").to_owned(),
                        op: r["op"].as_str().unwrap_or("").to_owned(),
                        profile: r["profile_id"].as_str().unwrap_or("").to_owned(),
                        email: r["identities"]["email"][0].as_str().map(str::to_owned),
                    });
                }
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
            }
            Fault::TooMany => b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n",
            Fault::Error => b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\noops",
            Fault::Hang => {
                tokio::time::sleep(Duration::from_secs(6)).await;
                return;
            }
            Fault::Reset => {
                // SO_LINGER 0: closing sends a reset.
                let _ = sock.set_zero_linger();
                return;
            }
            Fault::Garbage => b"\x00\x13garbage that is not HTTP\r\n\r\n",
        };
        if sock.write_all(reply).await.is_err() || fault == Fault::Garbage {
            return;
        }
    }
}

fn manifest(port: u16, other_port: u16, rule: &str, guard: Option<u32>) -> String {
    let wasm = root().join("plugins/dist/dest_webhook.wasm");
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&wasm).expect("plugins/dist/dest_webhook.wasm")))
    };
    let guard = guard.map(|g| format!("    shrink_guard: {{ max_removal_percent: {g} }}\n")).unwrap_or_default();
    format!(
        r#"version: 1
name: activation-test
storage: {{ url: "sqlite://cdp.db" }}
plugins:
  webhook: {{ path: "{wasm}", sha256: "{sha}", timeout: 2s }}
sources:
  web:
    collector: {{ write_keys: ["${{env:T_WRITE}}"] }}
    map:
      message_id: messageId
      timestamp: timestamp
      identities: {{ email: traits.email }}
      traits: {{ plan: traits.plan, tier: traits.tier }}
      consent: {{ email_marketing: context.consent.email }}
identity:
  keys:
    email: {{ normalize: email }}
model:
  traits:
    plan: {{ type: string }}
    tier: {{ type: string }}
consent:
  purposes: [email_marketing]
  default: denied
audiences:
  pro:
    where: '{rule}'
destinations:
  hook:
    plugin: webhook
    audience: pro
    purpose: email_marketing
    fields: [email, plan]
    config: {{ url: "http://127.0.0.1:{port}/hook", format: json, delete_url: "http://127.0.0.1:{port}/erase" }}
    allow_hosts: ["127.0.0.1:{port}"]
    batch: {{ max_records: 5, max_wait: 50ms }}
    retry: {{ max_attempts: 4, initial_backoff: 100ms, max_backoff: 400ms }}
{guard}  other:
    plugin: webhook
    audience: pro
    purpose: email_marketing
    fields: [email]
    config: {{ url: "http://127.0.0.1:{other_port}/other", format: json }}
    allow_hosts: ["127.0.0.1:{other_port}"]
    batch: {{ max_records: 50, max_wait: 50ms }}
"#,
        wasm = wasm.display()
    )
}

mod support;

/// A `cdp run` of the test manifest on a free loopback port.
struct Run;

impl Run {
    fn start(dir: &Path) -> support::run::CdpRun {
        support::run::CdpRun::start(dir, &[("T_WRITE", WRITE_KEY)])
    }
}

fn identify(email: &str, plan: &str, tier: &str, consent: bool, n: u64) -> Value {
    json!({"type": "identify", "messageId": format!("{email}-{n}"), "userId": email, "traits": {"email": email, "plan": plan, "tier": tier},
           "context": {"consent": {"email": consent}}, "timestamp": format!("2026-11-05T10:{:02}:{:02}Z", n / 60 % 60, n % 60)})
}

fn post(rt: &tokio::runtime::Runtime, base: &str, batch: Vec<Value>) {
    rt.block_on(async {
        use base64::Engine as _;
        let auth = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:")));
        let res = reqwest::Client::new()
            .post(format!("{base}/v1/batch"))
            .header("authorization", auth)
            .header("content-type", "application/json")
            .body(json!({"batch": batch}).to_string())
            .send()
            .await
            .expect("post");
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        assert!(status.is_success(), "collector answered {status}: {body}");
    });
}

fn destination(dir: &Path, name: &str) -> Value {
    let doc = json_of(dir, &["status", "--format", "json"]);
    doc["destinations"].as_array().into_iter().flatten().find(|d| d["name"] == name).cloned().unwrap_or(Value::Null)
}

fn setup(rule: &str, guard: Option<u32>) -> (tempfile::TempDir, tokio::runtime::Runtime, Receiver, Receiver) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let hook = Receiver::start(&rt);
    let other = Receiver::start(&rt);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cdp.yaml"), manifest(hook.port, other.port, rule, guard)).expect("manifest");
    let out = cdp(dir.path(), &["validate"]);
    assert!(out.status.success(), "the test manifest is invalid:\n{}", text(&out));
    (dir, rt, hook, other)
}

#[test]
fn an_event_enters_a_person_and_a_withdrawal_removes_them() {
    let (dir, rt, hook, _other) = setup(r#"plan == "pro""#, None);
    let run = Run::start(dir.path());
    let started = Instant::now();
    post(&rt, &run.base, vec![identify("ada@example.org", "pro", "gold", true, 1)]);
    run.wait_for("the add", Duration::from_secs(20), || hook.got().iter().any(|g| g.op == "enter"));
    let enter_after = started.elapsed();
    let got = hook.got();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].email.as_deref(), Some("ada@example.org"));

    // Someone without consent is in the audience but never sent.
    post(&rt, &run.base, vec![identify("bob@example.org", "pro", "gold", false, 2)]);
    // Withdrawal: the person is removed from the destination.
    post(&rt, &run.base, vec![identify("ada@example.org", "pro", "gold", false, 3)]);
    run.wait_for("the remove", Duration::from_secs(20), || hook.got().iter().any(|g| g.op == "exit"));
    let got = hook.got();
    assert_eq!(got.iter().map(|g| g.op.as_str()).collect::<Vec<_>>(), ["enter", "exit"], "{got:?}");
    assert_eq!(got[1].email.as_deref(), Some("ada@example.org"), "the remove is addressed as the add was");
    assert!(got.iter().all(|g| g.email.as_deref() != Some("bob@example.org")), "no consent, no delivery");

    let list = json_of(dir.path(), &["audience", "list", "--format", "json"]);
    assert_eq!(list["audiences"][0]["name"], "pro");
    assert_eq!(list["audiences"][0]["members"], 2, "{list}");
    let d = destination(dir.path(), "hook");
    assert_eq!(
        (d["state"].as_str(), d["members"].as_i64(), d["delivered"].as_i64()),
        (Some("active"), Some(0), Some(2))
    );
    let metrics =
        rt.block_on(async { reqwest::get(format!("{}/metrics", run.base)).await.unwrap().text().await.unwrap() });
    assert!(metrics.contains("cdp_deliveries_total{destination=\"hook\",outcome=\"delivered\"} 2"), "{metrics}");
    run.stop();
    eprintln!("first add delivered {:.0} ms after the post", enter_after.as_secs_f64() * 1e3);
}

#[test]
fn a_failing_destination_loses_nothing_and_replay_respects_withdrawals() {
    let (dir, rt, hook, other) = setup(r#"plan == "pro""#, None);
    use Fault::*;
    // Every fault in turn, more than the four attempts each record has can
    // always get past: some records are delivered, some dead-lettered.
    let mut faults = Vec::new();
    for _ in 0..4 {
        faults.extend([TooMany, Error, Hang, Reset, Garbage, Ok, Error, Error]);
    }
    hook.set_faults(faults);
    let run = Run::start(dir.path());
    let people: Vec<String> = (0..30).map(|i| format!("p{i:02}@example.org")).collect();
    let batch: Vec<Value> =
        people.iter().enumerate().map(|(i, e)| identify(e, "pro", "silver", true, i as u64 + 1)).collect();
    post(&rt, &run.base, batch);

    // Everyone is delivered or dead-lettered: nothing stays queued.
    run.wait_for("the queue to settle", Duration::from_secs(120), || {
        let d = destination(dir.path(), "hook");
        d["queued"] == 0 && d["delivered"].as_i64().unwrap_or(0) + d["dead"].as_i64().unwrap_or(0) == 30
    });
    let profile_of = |email: &str| -> String {
        json_of(dir.path(), &["profile", "get", &format!("email={email}"), "--format", "json"])["profile_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let ids: BTreeMap<String, String> = people.iter().map(|e| (profile_of(e), e.clone())).collect();
    let dead: BTreeSet<String> =
        json_of(dir.path(), &["dlq", "list", "--destination", "hook", "--format", "json"])["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["profile_id"].as_str().unwrap().to_owned())
            .collect();
    let got = hook.got();
    let delivered: BTreeSet<String> = got.iter().filter(|g| g.op == "enter").map(|g| g.profile.clone()).collect();
    assert!(delivered.is_disjoint(&dead), "delivered and dead: {:?}", delivered.intersection(&dead));
    assert_eq!(delivered.union(&dead).cloned().collect::<BTreeSet<_>>(), ids.keys().cloned().collect(), "none lost");
    assert!(!dead.is_empty() && !delivered.is_empty(), "the faults should leave both: {} dead", dead.len());
    // Duplicates (a request retried after the server stored it) carry one key.
    let mut keys: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for g in &got {
        keys.entry((g.profile.clone(), g.op.clone())).or_default().insert(g.key.clone());
    }
    assert!(keys.values().all(|k| k.len() == 1), "{keys:?}");
    // The other destination was not held up.
    let o = destination(dir.path(), "other");
    assert_eq!((o["delivered"].as_i64(), o["dead"].as_i64()), (Some(30), Some(0)), "{o}");
    assert_eq!(other.got().len(), 30);

    // One dead-lettered person withdraws; then the server recovers and the
    // dead letters are replayed: everyone else arrives, that person never does.
    hook.set_faults(Vec::new());
    let withdrawn = dead.iter().next().unwrap().clone();
    post(&rt, &run.base, vec![identify(&ids[&withdrawn], "pro", "silver", false, 100)]);
    run.wait_for("the withdrawal's remove", Duration::from_secs(20), || {
        hook.got().iter().any(|g| g.op == "exit" && g.profile == withdrawn)
    });
    let out = cdp(dir.path(), &["dlq", "replay", "--destination", "hook"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("{} dead letter(s) queued again", dead.len())), "{}", text(&out));
    run.wait_for("the replay", Duration::from_secs(60), || {
        let d = destination(dir.path(), "hook");
        d["queued"] == 0 && d["dead"] == 0
    });
    let entered: BTreeSet<String> = hook.got().iter().filter(|g| g.op == "enter").map(|g| g.profile.clone()).collect();
    let mut expected: BTreeSet<String> = ids.keys().cloned().collect();
    expected.remove(&withdrawn);
    assert_eq!(entered, expected, "everyone but the withdrawn person");
    run.stop();
}

#[test]
fn the_shrink_guard_holds_a_mass_removal_until_resumed() {
    let (dir, rt, hook, _other) = setup(r#"plan == "pro""#, Some(20));
    let run = Run::start(dir.path());
    let batch: Vec<Value> = (0..10)
        .map(|i| identify(&format!("g{i}@example.org"), "pro", if i < 5 { "gold" } else { "silver" }, true, i + 1))
        .collect();
    post(&rt, &run.base, batch);
    run.wait_for("ten adds", Duration::from_secs(30), || hook.got().len() == 10);

    // The rule now keeps only gold members: half would leave.
    let port = hook.port;
    let text_now = std::fs::read_to_string(dir.path().join("cdp.yaml")).unwrap();
    std::fs::write(
        dir.path().join("cdp.yaml"),
        text_now.replace(r#"where: 'plan == "pro"'"#, r#"where: 'plan == "pro" && tier == "gold"'"#),
    )
    .unwrap();
    run.wait_for("the pause", Duration::from_secs(30), || destination(dir.path(), "hook")["state"] == "paused");
    let d = destination(dir.path(), "hook");
    assert!(d["reason"].as_str().unwrap().contains("5 of 10"), "{d}");
    let status = cdp(dir.path(), &["status"]);
    assert!(text(&status).contains("PAUSED: shrink guard"), "{}", text(&status));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(hook.got().len(), 10, "nothing is removed while paused");
    // The other destination has no guard: it follows the rule.
    assert_eq!(destination(dir.path(), "other")["members"], 5);

    let out = cdp(dir.path(), &["sync", "resume", "hook"]);
    assert!(out.status.success(), "{}", text(&out));
    run.wait_for("five removes", Duration::from_secs(30), || hook.got().iter().filter(|g| g.op == "exit").count() == 5);
    let d = destination(dir.path(), "hook");
    assert_eq!((d["state"].as_str(), d["members"].as_i64()), (Some("active"), Some(5)), "{d}");
    let again = cdp(dir.path(), &["sync", "resume", "hook"]);
    assert_eq!(again.status.code(), Some(1), "not paused any more: {}", text(&again));
    let audit = json_of(dir.path(), &["audit", "--format", "json"]);
    assert!(audit.to_string().contains("sync.resume"), "{audit}");
    let _ = port;
    run.stop();
}

#[test]
fn an_erasure_reaches_the_destination_and_is_retried_until_it_does() {
    let (dir, rt, hook, _other) = setup(r#"plan == "pro""#, None);
    let run = Run::start(dir.path());
    post(&rt, &run.base, vec![identify("eve@example.org", "pro", "gold", true, 1)]);
    run.wait_for("the add", Duration::from_secs(20), || hook.got().len() == 1);

    // The destination fails the first deletes.
    hook.set_faults(vec![Fault::Error, Fault::Error]);
    let out = cdp(dir.path(), &["privacy", "delete", "email=eve@example.org"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("destination(s): hook, other") || text(&out).contains("hook"), "{}", text(&out));
    let status = |dir: &Path| json_of(dir, &["privacy", "status", "--format", "json"])["requests"][0].clone();
    run.wait_for("a failed attempt on record", Duration::from_secs(20), || {
        let r = status(dir.path());
        r["receipts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["destination"] == "hook" && x["attempts"].as_i64() >= Some(1))
    });
    let r = status(dir.path());
    assert_eq!(r["state"], "propagating", "{r}");
    run.wait_for("the receipts", Duration::from_secs(30), || status(dir.path())["state"] == "done");
    let r = status(dir.path());
    let hook_receipt = r["receipts"].as_array().unwrap().iter().find(|x| x["destination"] == "hook").unwrap().clone();
    assert_eq!(hook_receipt["state"], "done", "{r}");
    assert!(hook_receipt["attempts"].as_i64().unwrap() >= 3, "two failures, then done: {r}");
    let deleted = hook.hook.lock().unwrap().deleted.clone();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(deleted[0].1, vec!["eve@example.org".to_owned()]);
    let audit = json_of(dir.path(), &["audit", "--format", "json"]).to_string();
    assert!(audit.contains("privacy.delete") && !audit.contains("eve@example.org"), "{audit}");
    // She is gone from the store; her events are refused from now on.
    let out = cdp(dir.path(), &["profile", "get", "email=eve@example.org"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    post(&rt, &run.base, vec![identify("eve@example.org", "pro", "gold", true, 2)]);
    std::thread::sleep(Duration::from_millis(500));
    let out = cdp(dir.path(), &["profile", "get", "email=eve@example.org"]);
    assert_eq!(out.status.code(), Some(1), "an erased person is not re-created: {}", text(&out));
    let metrics =
        rt.block_on(async { reqwest::get(format!("{}/metrics", run.base)).await.unwrap().text().await.unwrap() });
    assert!(metrics.contains("cdp_privacy_dropped_total{origin=\"collector\",reason=\"erased\"} 1"), "{metrics}");
    run.stop();
}

#[test]
fn a_mirror_destination_deletes_whoever_leaves() {
    let (dir, rt, hook, _other) = setup(r#"plan == "pro""#, None);
    let path = dir.path().join("cdp.yaml");
    let text_now = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text_now.replacen("    fields: [email, plan]\n", "    fields: [email, plan]\n    sync: mirror\n", 1),
    )
    .unwrap();
    let run = Run::start(dir.path());
    post(&rt, &run.base, vec![identify("max@example.org", "pro", "gold", true, 1)]);
    run.wait_for("the add", Duration::from_secs(20), || hook.got().iter().any(|g| g.op == "enter"));
    assert!(hook.hook.lock().unwrap().deleted.is_empty());
    post(&rt, &run.base, vec![identify("max@example.org", "basic", "gold", true, 2)]);
    run.wait_for("the delete", Duration::from_secs(20), || !hook.hook.lock().unwrap().deleted.is_empty());
    let got = hook.got();
    assert_eq!(got.iter().map(|g| g.op.as_str()).collect::<Vec<_>>(), ["enter", "exit"]);
    let deleted = hook.hook.lock().unwrap().deleted.clone();
    assert_eq!(deleted, vec![(got[1].key.clone(), vec!["max@example.org".to_owned()])]);
    run.stop();
}
