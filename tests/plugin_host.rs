//! The connector host against real components: the shipped connectors and a
//! hostile guest built from `plugins/testing/hostile`. Each hostile behaviour
//! fails its own call with a clear error while the host, and every other
//! instance, goes on.

mod plugins;

use std::time::{Duration, Instant};

use cdp::plugin::{ErrorClass, Grants, Host, Kind, LogLine, Mount, Origin, PluginError, ReadEvent, conformance};
use serde_json::{Value, json};

fn host() -> (Host, tempfile::TempDir) {
    let cache = tempfile::tempdir().unwrap();
    (Host::new(Some(cache.path().to_path_buf())).unwrap(), cache)
}

const ONE_RECORD: &str =
    "{\"key\":\"k1\",\"op\":\"upsert\",\"profile_id\":\"p1\",\"identities\":{\"email\":[\"a@x.com\"]}}\n";

/// Opens the hostile guest with `config` and writes one record.
async fn hostile_write(
    host: &Host,
    grants: &Grants,
    config: Value,
) -> (Result<cdp::plugin::WriteAck, PluginError>, Vec<LogLine>) {
    let p = host.load(&plugins::hostile(), None).unwrap();
    let mut inst = p.destination("hostile", grants).await.unwrap();
    inst.open(&config).await.unwrap();
    let r = inst.write(ONE_RECORD.into(), 1).await;
    (r, inst.take_logs())
}

#[tokio::test]
async fn shipped_connectors_load_with_their_kind_and_cache() {
    let (host, _cache) = host();
    for (name, kind) in [
        ("source_csv", Kind::Source),
        ("source_http", Kind::Source),
        ("dest_webhook", Kind::Destination),
        ("dest_file", Kind::Destination),
    ] {
        let path = plugins::shipped(name);
        let p = host.load(&path, None).unwrap();
        assert_eq!(p.kind(), kind, "{name}");
        assert_eq!(p.origin(), Origin::Compiled);
        let spec = p.spec(name).await.unwrap();
        assert_eq!(spec.name, name.replace('_', "-"));
        assert_eq!(spec.protocol, "0.1.0");
        assert!(conformance::schema_valid(&spec.config_schema).is_ok(), "{name}");
        let again = host.load(&path, Some(p.sha256())).unwrap();
        assert_eq!(again.origin(), Origin::Cached, "{name}: the second load comes from the cache");
        assert!(again.load_time() < p.load_time());
    }
}

#[tokio::test]
async fn pins_and_formats_are_enforced() {
    let (host, _cache) = host();
    let path = plugins::shipped("dest_file");
    let e = host.load(&path, Some(&"0".repeat(64))).unwrap_err();
    assert!(matches!(e, PluginError::Digest { .. }), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x01\0\0\0garbage").unwrap();
    let e = host.load(&junk, None).unwrap_err();
    assert!(matches!(e, PluginError::Compile { .. }), "{e}");
    let text = dir.path().join("text.wasm");
    std::fs::write(&text, "not wasm").unwrap();
    assert!(matches!(host.load(&text, None).unwrap_err(), PluginError::Compile { .. }));
    let p = host.load(&path, None).unwrap();
    let e = p.source("x", &Grants::default()).await.err().unwrap();
    assert!(matches!(e, PluginError::WrongKind { found: Kind::Destination, wanted: Kind::Source, .. }), "{e}");
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_at_the_deadline() {
    let (host, _cache) = host();
    let grants = Grants { timeout: Duration::from_millis(300), ..Grants::default() };
    let started = Instant::now();
    let (r, _) = hostile_write(&host, &grants, json!({"behave": "spin"})).await;
    let e = r.unwrap_err();
    assert!(matches!(e, PluginError::Deadline { call: "write", .. }), "{e}");
    assert!(e.to_string().contains("deadline of 300ms"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "stopped promptly: {:?}", started.elapsed());
    // The host is fine: a new instance of the same plugin works.
    let (r, _) = hostile_write(&host, &grants, json!({"behave": "ok"})).await;
    assert_eq!(r.unwrap().accepted, 1);
}

#[tokio::test]
async fn a_trapped_instance_refuses_further_calls() {
    let (host, _cache) = host();
    let p = host.load(&plugins::hostile(), None).unwrap();
    let mut inst = p.destination("hostile", &Grants::default()).await.unwrap();
    inst.open(&json!({"behave": "trap"})).await.unwrap();
    let e = inst.write(ONE_RECORD.into(), 1).await.unwrap_err();
    assert!(matches!(e, PluginError::Trap { .. }), "{e}");
    assert!(inst.is_poisoned());
    let e = inst.flush().await.unwrap_err();
    assert!(matches!(e, PluginError::Poisoned { .. }), "{e}");
}

#[tokio::test]
async fn allocating_past_the_cap_fails_cleanly() {
    let (host, _cache) = host();
    let grants = Grants { memory: 32 << 20, ..Grants::default() };
    let (r, _) = hostile_write(&host, &grants, json!({"behave": "alloc"})).await;
    let e = r.unwrap_err();
    match &e {
        PluginError::Memory { cap, requested, call, .. } => {
            assert_eq!(*cap, 32 << 20);
            assert!(*requested > 32 << 20);
            assert_eq!(*call, "write");
        }
        other => panic!("expected a memory error, got {other}"),
    }
}

#[tokio::test]
async fn a_panic_is_an_error_with_the_message() {
    let (host, _cache) = host();
    let (r, logs) = hostile_write(&host, &Grants::default(), json!({"behave": "panic"})).await;
    let e = r.unwrap_err();
    assert!(matches!(e, PluginError::Trap { .. }), "{e}");
    assert!(e.to_string().contains("panics on purpose"), "{e}");
    assert!(logs.iter().any(|l| l.level == "stderr" && l.message.contains("panics on purpose")), "{logs:?}");
}

#[tokio::test]
async fn output_is_captured_into_logs() {
    let (host, _cache) = host();
    let (r, logs) = hostile_write(&host, &Grants::default(), json!({"behave": "stdout", "lines": 3})).await;
    assert_eq!(r.unwrap().accepted, 1);
    let out: Vec<&str> = logs.iter().filter(|l| l.level == "stdout").map(|l| l.message.as_str()).collect();
    assert_eq!(out, ["hostile line 1", "hostile line 2", "hostile line 3"]);
    assert!(logs.iter().any(|l| l.level == "stderr" && l.message == "hostile stderr"), "{logs:?}");
}

#[tokio::test]
async fn http_reaches_only_granted_addresses() {
    let (host, _cache) = host();
    let (port, seen) = plugins::serve(200, "{}", 4);
    let url = format!("http://127.0.0.1:{port}/hook");

    // Nothing granted: denied before any connection.
    let (r, _) = hostile_write(&host, &Grants::default(), json!({"behave": "http", "url": url})).await;
    let e = r.unwrap_err();
    let c = e.connector().unwrap_or_else(|| panic!("a connector error, got {e}"));
    assert_eq!(c.class, ErrorClass::Config);
    assert!(c.message.contains("allow_hosts"), "{c:?}");

    // A name that resolves to loopback is refused even when the name is listed.
    let grants = Grants { allow_hosts: vec![format!("localhost:{port}")], ..Grants::default() };
    let (r, _) =
        hostile_write(&host, &grants, json!({"behave": "http", "url": format!("http://localhost:{port}/")})).await;
    let e = r.unwrap_err();
    assert!(e.to_string().contains("internal"), "{e}");

    // Another public-looking host than the one granted.
    let grants = Grants { allow_hosts: vec!["hooks.example.com".into()], ..Grants::default() };
    let (r, _) =
        hostile_write(&host, &grants, json!({"behave": "http", "url": "http://169.254.169.254/latest/meta-data"}))
            .await;
    assert!(r.unwrap_err().to_string().contains("allow_hosts"));

    assert!(seen.try_recv().is_err(), "no request reached the server");

    // The explicit loopback grant tests use.
    let grants = Grants { allow_hosts: vec![format!("127.0.0.1:{port}")], ..Grants::default() };
    let (r, _) = hostile_write(&host, &grants, json!({"behave": "http", "url": url})).await;
    assert_eq!(r.unwrap().accepted, 1);
    let req = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(req.request_line, "GET /hook HTTP/1.1");
}

#[tokio::test]
async fn files_outside_the_mount_are_out_of_reach() {
    let (host, _cache) = host();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ok.txt"), "hello").unwrap();
    let grants = Grants {
        mounts: vec![Mount { host: dir.path().canonicalize().unwrap(), guest: "/data".into(), writable: false }],
        ..Grants::default()
    };
    let (r, logs) = hostile_write(&host, &grants, json!({"behave": "read", "path": "/data/ok.txt"})).await;
    assert_eq!(r.unwrap().accepted, 1, "{logs:?}");
    for path in ["/etc/passwd", "/data/../etc/passwd", "/data/../../etc/hostname", "/proc/self/environ", "ok.txt"] {
        let (r, _) = hostile_write(&host, &grants, json!({"behave": "read", "path": path})).await;
        let e = r.unwrap_err();
        let c = e.connector().unwrap_or_else(|| panic!("{path}: a connector error, got {e}"));
        assert_eq!(c.code, "read_failed", "{path}");
    }
    // Source mounts are read-only.
    let (r, _) = hostile_write(&host, &grants, json!({"behave": "write_file", "path": "/data/new.txt"})).await;
    assert_eq!(r.unwrap_err().connector().unwrap().code, "write_failed");
    assert!(!dir.path().join("new.txt").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_instances_keep_running_while_one_spins() {
    let (host, _cache) = host();
    let hostile = host.load(&plugins::hostile(), None).unwrap();
    let file = host.load(&plugins::shipped("dest_file"), None).unwrap();
    let spin = tokio::spawn(async move {
        let grants = Grants { timeout: Duration::from_secs(3), ..Grants::default() };
        let mut inst = hostile.destination("spinner", &grants).await.unwrap();
        inst.open(&json!({"behave": "spin"})).await.unwrap();
        let r = inst.write(ONE_RECORD.into(), 1).await;
        (r, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dir = tempfile::tempdir().unwrap();
    let grants = Grants {
        mounts: vec![Mount { host: dir.path().canonicalize().unwrap(), guest: "/out".into(), writable: true }],
        ..Grants::default()
    };
    let mut inst = file.destination("file", &grants).await.unwrap();
    inst.open(&json!({"path": "/out/list.csv"})).await.unwrap();
    let batches = cdp::bench::plugin::batches(5_000, 1);
    for (text, n) in batches {
        assert_eq!(inst.write(text, n).await.unwrap().accepted, n);
    }
    inst.flush().await.unwrap();
    let done = Instant::now();
    let (r, stopped) = spin.await.unwrap();
    assert!(matches!(r.unwrap_err(), PluginError::Deadline { .. }));
    assert!(done < stopped, "the file destination finished while the other instance was still spinning");
    assert_eq!(std::fs::read_to_string(dir.path().join("list.csv")).unwrap().lines().count(), 5_001);
}

#[tokio::test]
async fn a_source_reads_and_resumes_from_its_checkpoints() {
    let (host, _cache) = host();
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::from("member_no,email,tier\n");
    for i in 0..250 {
        csv.push_str(&format!("M{i:04},m{i}@example.com,gold\n"));
    }
    std::fs::write(dir.path().join("members.csv"), csv).unwrap();
    let grants = Grants {
        mounts: vec![Mount { host: dir.path().canonicalize().unwrap(), guest: "/input".into(), writable: false }],
        ..Grants::default()
    };
    let p = host.load(&plugins::shipped("source_csv"), None).unwrap();
    let mut inst = p.source("members", &grants).await.unwrap();
    let config = json!({"file": "/input/members.csv", "incremental": {"by": "offset"}});
    inst.check(&config).await.unwrap();
    inst.open(&config, None).await.unwrap();
    let (mut records, mut checkpoints) = (0, Vec::new());
    loop {
        let events = inst.next(100).await.unwrap();
        if events.is_empty() {
            break;
        }
        for e in events {
            match e {
                ReadEvent::Records { count, .. } => records += count,
                ReadEvent::Checkpoint(c) => checkpoints.push(c),
            }
        }
    }
    assert_eq!(records, 250);
    assert!(!checkpoints.is_empty());

    let mut opts = conformance::Options::new(config, grants);
    opts.page = 40;
    let report = conformance::run(&p, "members", &opts).await;
    assert!(report.passed(), "{}", report.render(std::path::Path::new("source_csv.wasm")));
    assert!(
        report.checks.iter().any(|c| c.name == "resumes from every checkpoint" && c.detail.contains("checkpoints"))
    );
}

#[tokio::test]
async fn destinations_pass_the_conformance_suite() {
    let (host, _cache) = host();
    let dir = tempfile::tempdir().unwrap();
    let grants = Grants {
        mounts: vec![Mount { host: dir.path().canonicalize().unwrap(), guest: "/out".into(), writable: true }],
        ..Grants::default()
    };
    let p = host.load(&plugins::shipped("dest_file"), None).unwrap();
    let report = conformance::run(&p, "file", &conformance::Options::new(json!({"path": "/out/x.csv"}), grants)).await;
    assert!(report.passed(), "{}", report.render(std::path::Path::new("dest_file.wasm")));
    let write = report.checks.iter().find(|c| c.name == "writes a batch").unwrap();
    assert!(write.detail.contains("1 rejected"), "the sample record without identities is refused: {}", write.detail);

    let (port, seen) = plugins::serve(200, "{}", 8);
    let grants = Grants { allow_hosts: vec![format!("127.0.0.1:{port}")], ..Grants::default() };
    let p = host.load(&plugins::shipped("dest_webhook"), None).unwrap();
    let config = json!({
        "url": format!("http://127.0.0.1:{port}/hook"),
        "delete_url": format!("http://127.0.0.1:{port}/erase"),
        "signing_secret": "s3cret",
    });
    let report = conformance::run(&p, "webhook", &conformance::Options::new(config, grants)).await;
    assert!(report.passed(), "{}", report.render(std::path::Path::new("dest_webhook.wasm")));
    let delete = report.checks.iter().find(|c| c.name == "delete").unwrap();
    assert!(delete.detail.contains("1 erased"), "{delete:?}");
    let req = seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(req.request_line.starts_with("POST /hook"), "{req:?}");
    assert!(req.headers.iter().any(|(k, v)| k == "x-cdp-signature" || v.starts_with("sha256=")), "{req:?}");
}

#[tokio::test]
async fn the_conformance_suite_reports_a_broken_plugin() {
    let (host, _cache) = host();
    let p = host.load(&plugins::hostile(), None).unwrap();
    let grants = Grants { timeout: Duration::from_millis(300), ..Grants::default() };
    let report = conformance::run(&p, "hostile", &conformance::Options::new(json!({"behave": "spin"}), grants)).await;
    assert!(!report.passed());
    let write = report.checks.iter().find(|c| c.name == "writes a batch").unwrap();
    assert!(!write.passed && write.detail.contains("deadline"), "{write:?}");
}

/// dest-file hashes identifiers through the host's `sha256` import: the file
/// written in the sandbox holds the SHA-256 of each normalised value, and a
/// record without a usable identifier is rejected while the rest are written.
#[tokio::test]
async fn dest_file_hashes_through_the_host() {
    let (host, _cache) = host();
    let file = host.load(&plugins::shipped("dest_file"), None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let grants = Grants {
        mounts: vec![Mount { host: dir.path().canonicalize().unwrap(), guest: "/out".into(), writable: true }],
        ..Grants::default()
    };
    let mut inst = file.destination("file", &grants).await.unwrap();
    inst.open(&json!({"path": "/out/h.csv", "identities": ["email", "phone"]})).await.unwrap();
    let batch = [
        json!({"key": "a", "op": "enter", "profile_id": "p1", "identities": {"email": [" Ada@Example.com", "b@x.io"], "phone": ["+46 70 123 45 67"]}}),
        json!({"key": "b", "op": "enter", "profile_id": "p2", "identities": {"email": ["not an email"]}}),
        json!({"key": "c", "op": "exit", "profile_id": "p3", "identities": {"phone": ["+1 (650) 555-1234"]}}),
    ]
    .iter()
    .map(|r| format!("{r}\n"))
    .collect::<String>();
    let ack = inst.write(batch, 3).await.unwrap();
    assert_eq!(ack.accepted, 2);
    assert_eq!(ack.rejected.iter().map(|r| r.0).collect::<Vec<_>>(), [1]);
    inst.flush().await.unwrap();
    let sha = |s: &str| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(s.as_bytes()))
    };
    let text = std::fs::read_to_string(dir.path().join("h.csv")).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows[0], "key,op,audience,email,phone");
    assert_eq!(rows[1], format!("a,enter,,{},{}", sha("ada@example.com"), sha("46701234567")));
    assert_eq!(rows[2], format!("a,enter,,{},", sha("b@x.io")));
    assert_eq!(rows[3], format!("c,exit,,,{}", sha("16505551234")));
    assert_eq!(rows.len(), 4);
}

/// Grants lending `dir` at `/data`, read-only, with call deadline `timeout`.
fn mounted(dir: &std::path::Path, timeout: Duration) -> Grants {
    Grants {
        mounts: vec![Mount { host: dir.canonicalize().unwrap(), guest: "/data".into(), writable: false }],
        timeout,
        ..Grants::default()
    }
}

/// The host's peak resident memory so far (VmHWM), in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// The hostile guest, opened with `config`, ready to `write`.
async fn hostile_open(host: &Host, grants: &Grants, config: Value) -> cdp::plugin::DestinationInstance {
    let p = host.load(&plugins::hostile(), None).unwrap();
    let mut inst = p.destination("hostile", grants).await.unwrap();
    inst.open(&config).await.unwrap();
    inst
}

#[tokio::test]
async fn a_blocking_sleep_ends_at_the_deadline() {
    let (host, _cache) = host();
    let grants = Grants { timeout: Duration::from_secs(1), ..Grants::default() };
    let mut inst = hostile_open(&host, &grants, json!({"behave": "sleep", "secs": 20})).await;
    let started = Instant::now();
    let r = inst.write(ONE_RECORD.into(), 1).await;
    let e = r.unwrap_err();
    assert!(matches!(e, PluginError::Deadline { call: "write", .. }), "{e}");
    assert!(e.to_string().contains("deadline of 1s"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3), "stopped at the deadline: {:?}", started.elapsed());
}

#[tokio::test]
async fn a_fifo_in_a_mount_is_refused_without_blocking() {
    let (host, _cache) = host();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let grants = mounted(dir.path(), Duration::from_secs(2));
    let mut inst = hostile_open(&host, &grants, json!({"behave": "read", "path": "/data/pipe"})).await;
    let started = Instant::now();
    let r = inst.write(ONE_RECORD.into(), 1).await;
    let logs = inst.take_logs();
    let e = r.unwrap_err();
    assert_eq!(e.connector().map(|c| c.code.as_str()), Some("read_failed"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(
        logs.iter().any(|l| l.level == "warn"
            && l.message.contains("refused to open `pipe`: it is a FIFO, socket or other special file")),
        "{logs:?}"
    );
    // /dev/zero never ends: a device is refused the same way.
    let grants = Grants {
        mounts: vec![Mount { host: "/dev".into(), guest: "/dev".into(), writable: false }],
        timeout: Duration::from_secs(2),
        ..Grants::default()
    };
    let (r, logs) = hostile_write(&host, &grants, json!({"behave": "read", "path": "/dev/zero"})).await;
    assert_eq!(r.unwrap_err().connector().map(|c| c.code.as_str()), Some("read_failed"));
    assert!(logs.iter().any(|l| l.message.contains("character device")), "{logs:?}");
}

#[tokio::test]
async fn handle_exhaustion_stops_at_the_limit() {
    let (host, _cache) = host();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.txt"), "x").unwrap();
    let grants = mounted(dir.path(), Duration::from_secs(10));
    let started = Instant::now();
    let (r, _) =
        hostile_write(&host, &grants, json!({"behave": "open_files", "path": "/data/f.txt", "count": 20_000})).await;
    let e = r.unwrap_err();
    assert!(matches!(e, PluginError::Limit { call: "write", .. }), "{e}");
    assert!(e.to_string().contains(&format!("more than {} handles", cdp::plugin::MAX_HANDLES)), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Under the limit is fine.
    let (r, logs) =
        hostile_write(&host, &grants, json!({"behave": "open_files", "path": "/data/f.txt", "count": 500})).await;
    assert_eq!(r.unwrap().accepted, 1, "{logs:?}");
}

#[tokio::test]
async fn oversized_checkpoints_and_batches_are_refused() {
    let (host, _cache) = host();
    let p = host.load(&plugins::hostile_source(), None).unwrap();
    let grants = Grants { timeout: Duration::from_secs(10), ..Grants::default() };
    let mut inst = p.source("hostile-source", &grants).await.unwrap();
    inst.open(&json!({"behave": "checkpoint", "size": 16 << 20}), None).await.unwrap();
    let e = inst.next(100).await.unwrap_err();
    assert!(matches!(e, PluginError::Limit { call: "next", .. }), "{e}");
    let text = e.to_string();
    assert!(text.contains(&format!("a checkpoint of {} bytes", (16 << 20) + 10)), "{text}");
    assert!(text.contains(&format!("the limit is {} bytes per checkpoint", cdp::plugin::MAX_CHECKPOINT)), "{text}");
    assert!(inst.is_poisoned());

    let mut inst = p.source("hostile-source", &grants).await.unwrap();
    inst.open(&json!({"behave": "records", "size": 40 << 20}), None).await.unwrap();
    let e = inst.next(100).await.unwrap_err();
    assert!(e.to_string().contains(&format!("the limit is {} bytes per call", cdp::plugin::MAX_RECORDS_BYTES)), "{e}");

    // Within the limits the same plugin reads.
    let mut inst = p.source("hostile-source", &grants).await.unwrap();
    inst.open(&json!({"behave": "checkpoint", "size": 1000}), None).await.unwrap();
    let events = inst.next(100).await.unwrap();
    assert!(matches!(&events[1], ReadEvent::Checkpoint(c) if c.len() == 1010), "{events:?}");
}

#[tokio::test]
async fn a_huge_error_message_is_cut_to_the_limit() {
    let (host, _cache) = host();
    let started = Instant::now();
    let (r, _) = hostile_write(&host, &Grants::default(), json!({"behave": "huge_error", "size": 64 << 20})).await;
    let e = r.unwrap_err();
    let c = e.connector().unwrap_or_else(|| panic!("a connector error, got {e}"));
    let limit = cdp::plugin::MAX_ERROR_MESSAGE;
    assert!(c.message.len() < limit + 100, "{}", c.message.len());
    assert!(c.message.ends_with(&format!("… (cut at {limit} of {} bytes)", 64 << 20)), "{}", &c.message[limit..]);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_log_flood_is_capped_per_call_and_counted() {
    let (host, _cache) = host();
    let p = host.load(&plugins::hostile(), None).unwrap();
    let mut inst = p.destination("hostile", &Grants::default()).await.unwrap();
    inst.open(&json!({"behave": "log_flood", "lines": 100_000})).await.unwrap();
    let started = Instant::now();
    assert_eq!(inst.write(ONE_RECORD.into(), 1).await.unwrap().accepted, 1);
    assert!(started.elapsed() < Duration::from_secs(30));
    let kept = cdp::plugin::MAX_LOG_LINES;
    assert_eq!(inst.dropped_output(), 200_000 - kept);
    let logs = inst.take_logs();
    let last = logs.last().unwrap();
    assert_eq!(last.level, "warn");
    assert!(
        last.message.starts_with(&format!("`write` dropped {} lines", 200_000 - kept))
            && last.message.contains(&format!("over the limit of {kept} lines")),
        "{last:?}"
    );
    // The budget is per call: the next call logs again.
    inst.open(&json!({"behave": "log_flood", "lines": 2})).await.unwrap();
    inst.write(ONE_RECORD.into(), 1).await.unwrap();
    assert_eq!(inst.take_logs().len(), 4);
    assert_eq!(inst.dropped_output(), 200_000 - kept);
}

#[tokio::test]
async fn a_stack_overflow_is_reported_as_one() {
    let (host, _cache) = host();
    let (r, _) = hostile_write(&host, &Grants::default(), json!({"behave": "stack_overflow"})).await;
    let e = r.unwrap_err();
    assert!(matches!(e, PluginError::Trap { .. }), "{e}");
    assert!(e.to_string().contains("stack overflow"), "{e}");
}

/// Every hostile behaviour in a row, then the host's peak memory: what a
/// guest makes the host hold is bounded by the limits, not by the guest.
#[tokio::test]
async fn hostile_guests_leave_the_host_memory_bounded() {
    let (host, _cache) = host();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.txt"), "x").unwrap();
    let grants = mounted(dir.path(), Duration::from_secs(2));
    let before = peak_rss_mib();
    for config in [
        json!({"behave": "log_flood", "lines": 300_000}),
        json!({"behave": "huge_error", "size": 64 << 20}),
        json!({"behave": "open_files", "path": "/data/f.txt", "count": 20_000}),
        json!({"behave": "sleep", "secs": 20}),
        json!({"behave": "stack_overflow"}),
    ] {
        let started = Instant::now();
        let _ = hostile_write(&host, &grants, config.clone()).await;
        assert!(started.elapsed() < Duration::from_secs(20), "{config}: {:?}", started.elapsed());
    }
    let p = host.load(&plugins::hostile_source(), None).unwrap();
    for config in [json!({"behave": "checkpoint", "size": 16 << 20}), json!({"behave": "records", "size": 40 << 20})] {
        let mut inst = p.source("hostile-source", &grants).await.unwrap();
        inst.open(&config, None).await.unwrap();
        assert!(inst.next(100).await.is_err(), "{config}");
    }
    let after = peak_rss_mib();
    eprintln!("host peak resident memory: {before} MiB before the hostile guests, {after} MiB after");
    assert!(after < 1024, "peak {after} MiB");
}
