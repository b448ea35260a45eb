use std::time::Instant;

use cdp_plugin_sdk::http::{HttpError, HttpErrorKind, Response};
use cdp_plugin_sdk::log::Level;
use cdp_plugin_sdk::{ErrorClass, testing};
use serde_json::{Value, json};
use tempfile::TempDir;

use super::*;

const BATCH: &str = concat!(
    r#"{"key":"k1","op":"upsert","profile_id":"p1"}"#,
    "\n",
    r#"{"key":"k2","op":"upsert","profile_id":"p2"}"#,
    "\n",
);

fn parse(cfg: Value) -> Result<Config, ConnectorError> {
    cdp_plugin_sdk::parse_config::<Config>(&cfg.to_string())
}

fn open(cfg: Value) -> HostileWriter {
    testing::open_destination::<Hostile>(&cfg.to_string()).unwrap()
}

#[test]
fn every_mode_parses() {
    let modes = [
        ("ok", Behave::Ok),
        ("spin", Behave::Spin),
        ("alloc", Behave::Alloc),
        ("panic", Behave::Panic),
        ("trap", Behave::Trap),
        ("http", Behave::Http),
        ("read", Behave::Read),
        ("write_file", Behave::WriteFile),
        ("stdout", Behave::Stdout),
        ("slow_ok", Behave::SlowOk),
        ("sleep", Behave::Sleep),
        ("open_files", Behave::OpenFiles),
        ("huge_error", Behave::HugeError),
        ("log_flood", Behave::LogFlood),
        ("stack_overflow", Behave::StackOverflow),
        ("check_sleep", Behave::CheckSleep),
    ];
    assert_eq!(modes.map(|(name, _)| name), Behave::NAMES);
    for (name, behave) in modes {
        let cfg = parse(json!({"behave": name})).unwrap();
        assert_eq!(
            cfg,
            Config {
                behave,
                url: None,
                path: None,
                lines: None,
                secs: None,
                count: None,
                size: None,
            }
        );
        assert!(testing::check_destination::<Hostile>(&json!({"behave": name, "secs": 0}).to_string()).is_ok());
    }
}

#[test]
fn optional_fields_parse() {
    let cfg = parse(json!({"behave": "stdout", "url": "https://a.example/", "path": "/input/a", "lines": 7})).unwrap();
    assert_eq!(cfg.url.as_deref(), Some("https://a.example/"));
    assert_eq!(cfg.path.as_deref(), Some("/input/a"));
    assert_eq!(cfg.lines, Some(7));
}

#[test]
fn bad_configs_are_config_errors() {
    let cases = [
        (json!({}), "missing field `behave`"),
        (json!({"behave": "explode"}), "config.behave: unknown variant `explode`"),
        (json!({"behave": "ok", "extra": 1}), "unknown field `extra`"),
        (json!({"behave": "stdout", "lines": -1}), "config.lines: invalid value"),
        (json!({"behave": "stdout", "lines": "3"}), "config.lines: invalid type"),
        (json!({"behave": "http", "url": 5}), "config.url: invalid type"),
    ];
    for (cfg, needle) in cases {
        let e = testing::check_destination::<Hostile>(&cfg.to_string()).unwrap_err();
        assert_eq!(
            (e.class, e.code.as_str()),
            (ErrorClass::Config, "invalid_config"),
            "{cfg}"
        );
        assert!(e.message.contains(needle), "{cfg}: {}", e.message);
        assert!(testing::open_destination::<Hostile>(&cfg.to_string()).is_err());
    }
}

#[test]
fn spec_describes_the_config() {
    let spec = Hostile::spec();
    assert_eq!(spec.name, "test-hostile");
    assert_eq!(spec.capabilities, ["http"]);
    let schema = &spec.config_schema;
    assert_eq!(schema["required"], json!(["behave"]));
    assert_eq!(schema["properties"]["behave"]["enum"], json!(Behave::NAMES));
    for field in ["url", "path", "lines", "secs", "count", "size"] {
        assert!(schema["properties"][field].is_object(), "{field}");
    }
}

#[test]
fn ok_accepts_everything_and_flushes() {
    let mut w = open(json!({"behave": "ok"}));
    let ack = testing::write(&mut w, BATCH).unwrap();
    assert_eq!((ack.accepted, ack.rejected.len()), (2, 0));
    w.flush().unwrap();
    let e = testing::delete(&mut w, r#"{"key":"d1","profile_id":"p1","identities":{}}"#).unwrap_err();
    assert_eq!(e.class, ErrorClass::Unsupported);
}

#[test]
fn stdout_prints_and_accepts() {
    let mut w = open(json!({"behave": "stdout", "lines": 2}));
    assert_eq!(testing::write(&mut w, BATCH).unwrap().accepted, 2);
}

#[test]
fn sleep_sleeps_and_huge_error_is_huge() {
    let mut w = open(json!({"behave": "sleep", "secs": 0}));
    assert_eq!(testing::write(&mut w, BATCH).unwrap().accepted, 2);
    let mut w = open(json!({"behave": "huge_error", "size": 1000}));
    let e = testing::write(&mut w, BATCH).unwrap_err();
    assert_eq!((e.code.as_str(), e.message.len()), ("huge_error", 1000));
}

#[test]
fn open_files_keeps_handles_and_log_flood_logs() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("a.txt");
    std::fs::write(&file, "x").unwrap();
    testing::take_logs();
    let mut w = open(json!({"behave": "open_files", "path": file, "count": 3}));
    assert_eq!(testing::write(&mut w, BATCH).unwrap().accepted, 2);
    assert!(testing::take_logs()[0].1.starts_with("holding 3 handles"));
    let mut w = open(json!({"behave": "log_flood", "lines": 5}));
    assert_eq!(testing::write(&mut w, BATCH).unwrap().accepted, 2);
    assert_eq!(testing::take_logs().len(), 5);
}

#[test]
fn slow_ok_takes_about_200_ms() {
    let mut w = open(json!({"behave": "slow_ok"}));
    let start = Instant::now();
    assert_eq!(testing::write(&mut w, BATCH).unwrap().accepted, 2);
    assert!(start.elapsed() >= SLOW_OK_FOR);
}

#[test]
#[should_panic(expected = "hostile guest panics on purpose")]
fn panic_panics() {
    let mut w = open(json!({"behave": "panic"}));
    let _ = testing::write(&mut w, BATCH);
}

#[test]
#[should_panic(expected = "traps on purpose")]
fn trap_panics_natively() {
    let mut w = open(json!({"behave": "trap"}));
    let _ = testing::write(&mut w, BATCH);
}

#[test]
fn http_gets_the_url_and_maps_host_errors() {
    testing::mock_http(|req| {
        assert_eq!((req.method.as_str(), req.url.as_str()), ("GET", "https://a.example/x"));
        Ok(Response::new(302).with_header("Location", "https://b.example/"))
    });
    let mut w = open(json!({"behave": "http", "url": "https://a.example/x"}));
    assert_eq!(testing::write(&mut w, BATCH).unwrap().accepted, 2);

    testing::mock_http(|_| {
        Err(HttpError {
            kind: HttpErrorKind::Denied,
            message: "blocked.example is not in allow_hosts".into(),
        })
    });
    let e = testing::write(&mut w, BATCH).unwrap_err();
    assert_eq!((e.class, e.code.as_str()), (ErrorClass::Config, "http_denied"));
    assert!(e.message.contains("blocked.example"), "{}", e.message);

    testing::mock_http(|_| {
        Err(HttpError {
            kind: HttpErrorKind::Timeout,
            message: "deadline".into(),
        })
    });
    let e = testing::write(&mut w, BATCH).unwrap_err();
    assert_eq!(
        (e.class, e.code.as_str(), e.retryable),
        (ErrorClass::Transient, "http_timeout", true)
    );
    testing::clear_http_mock();

    let mut w = open(json!({"behave": "http"}));
    assert_eq!(testing::write(&mut w, BATCH).unwrap_err().code, "missing_url");
}

#[test]
fn read_and_write_file_map_io_errors_to_permission() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("a.txt");
    let file = file.to_str().unwrap();

    let mut w = open(json!({"behave": "read", "path": file}));
    let e = testing::write(&mut w, BATCH).unwrap_err();
    assert_eq!((e.class, e.code.as_str()), (ErrorClass::Permission, "read_failed"));
    assert!(e.message.starts_with(&format!("{file}: ")), "{}", e.message);

    let mut w = open(json!({"behave": "write_file", "path": file}));
    assert_eq!(testing::write(&mut w, BATCH).unwrap().accepted, 2);
    assert_eq!(std::fs::read(file).unwrap(), b"x");
    testing::take_logs();

    let mut w = open(json!({"behave": "read", "path": file}));
    assert_eq!(testing::write(&mut w, BATCH).unwrap().accepted, 2);
    assert_eq!(
        testing::take_logs(),
        [(Level::Info, format!("read 1 bytes from {file}"))]
    );

    let missing_dir = dir.path().join("no/such/dir/b.txt");
    let mut w = open(json!({"behave": "write_file", "path": missing_dir}));
    let e = testing::write(&mut w, BATCH).unwrap_err();
    assert_eq!((e.class, e.code.as_str()), (ErrorClass::Permission, "write_failed"));

    let mut w = open(json!({"behave": "read"}));
    assert_eq!(testing::write(&mut w, BATCH).unwrap_err().code, "missing_path");
}

#[test]
fn empty_batches_never_reach_write() {
    // The SDK answers an empty batch itself, so even `panic` survives one.
    let mut w = open(json!({"behave": "panic"}));
    let ack = testing::write(&mut w, "").unwrap();
    assert_eq!((ack.accepted, ack.rejected.len()), (0, 0));
}
