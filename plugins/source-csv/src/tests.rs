use std::io::Write;

use cdp_plugin_sdk::testing::{self, checkpoints_of, read_to_end, records_of};
use cdp_plugin_sdk::{ErrorClass, ReadEvent, SourceReader, log::Level};
use serde_json::{Value, json};
use tempfile::TempDir;

use super::*;

fn write_file(dir: &TempDir, name: &str, content: &[u8]) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    path.to_str().unwrap().to_string()
}

fn config(path: &str, extra: Value) -> String {
    let mut cfg = json!({ "file": path });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    cfg.to_string()
}

fn read(config: &str, state: Option<&Value>, max: u32) -> Vec<ReadEvent> {
    let state = state.map(Value::to_string);
    let mut reader = testing::open_source::<CsvSource>(config, state.as_deref()).unwrap();
    read_to_end(&mut reader, max).unwrap()
}

fn warnings() -> Vec<String> {
    testing::take_logs()
        .into_iter()
        .filter(|(l, _)| *l == Level::Warn)
        .map(|(_, m)| m)
        .collect()
}

const MEMBERS: &str = "\u{feff}email,first_name,tier,updated_at\r\n\
ada@example.com,Ada,gold,2026-01-02T00:00:00Z\r\n\
alan@example.com,,silver,2026-01-01T00:00:00Z\r\n\
\"grace@example.com\",\"Grace \"\"Amazing\"\" Hopper\",\"plat,inum\",2026-01-03T00:00:00Z\r\n\
bad@example.com,Bad\r\n\
\"multi@example.com\",\"line one\nline two\",gold,2026-01-04T00:00:00Z\r\n\
\r\n\
last@example.com,Last,bronze,2026-01-05T00:00:00Z";

fn expected_members() -> Vec<Value> {
    vec![
        json!({"email": "ada@example.com", "first_name": "Ada", "tier": "gold", "updated_at": "2026-01-02T00:00:00Z"}),
        json!({"email": "alan@example.com", "tier": "silver", "updated_at": "2026-01-01T00:00:00Z"}),
        json!({"email": "grace@example.com", "first_name": "Grace \"Amazing\" Hopper", "tier": "plat,inum", "updated_at": "2026-01-03T00:00:00Z"}),
        json!({"email": "multi@example.com", "first_name": "line one\nline two", "tier": "gold", "updated_at": "2026-01-04T00:00:00Z"}),
        json!({"email": "last@example.com", "first_name": "Last", "tier": "bronze", "updated_at": "2026-01-05T00:00:00Z"}),
    ]
}

#[test]
fn header_mapping_quotes_bom_and_malformed_rows() {
    let dir = TempDir::new().unwrap();
    let path = write_file(&dir, "m.csv", MEMBERS.as_bytes());
    testing::take_logs();
    let events = read(&config(&path, json!({})), None, 100);
    let records = records_of(&events);
    assert_eq!(records, expected_members());
    // Keys keep the header order, BOM stripped from the first name.
    assert_eq!(
        records[0].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["email", "first_name", "tier", "updated_at"]
    );
    assert!(checkpoints_of(&events).is_empty(), "full reads emit no checkpoint");
    assert_eq!(
        warnings(),
        [format!("{path} line 5: expected 4 fields, found 2; row skipped")]
    );
    assert_eq!(testing::take_metrics(), [("rows_skipped_total".to_string(), 1.0)]);
}

#[test]
fn batches_respect_max() {
    let dir = TempDir::new().unwrap();
    let path = write_file(&dir, "m.csv", MEMBERS.as_bytes());
    let mut reader = testing::open_source::<CsvSource>(&config(&path, json!({})), None).unwrap();
    let sizes: Vec<u32> = std::iter::from_fn(|| {
        let events = reader.next(2).unwrap();
        (!events.is_empty()).then(|| match &events[0] {
            ReadEvent::Records(r) => r.len(),
            ReadEvent::Checkpoint(_) => 0,
        })
    })
    .collect();
    assert_eq!(sizes, [2, 2, 1]);
    assert!(reader.next(2).unwrap().is_empty());
}

#[test]
fn offset_resume_from_every_checkpoint_has_no_gap_or_duplicate() {
    let dir = TempDir::new().unwrap();
    let path = write_file(&dir, "m.csv", MEMBERS.as_bytes());
    let cfg = config(&path, json!({"incremental": {"by": "offset"}}));
    let all = expected_members();
    for max in [1, 2, 3, 100] {
        let events = read(&cfg, None, max);
        assert_eq!(records_of(&events), all);
        // After every checkpoint, the records emitted so far + a resumed read = all.
        let mut emitted = 0;
        for event in &events {
            match event {
                ReadEvent::Records(r) => emitted += r.len() as usize,
                ReadEvent::Checkpoint(cp) => {
                    assert!(cp["offset"].is_u64() && cp["line"].is_u64(), "{cp}");
                    testing::take_logs();
                    let rest = records_of(&read(&cfg, Some(cp), max));
                    assert_eq!(rest, all[emitted..], "max {max}, checkpoint {cp}");
                    // Line numbers in warnings stay those of the whole file.
                    for w in warnings() {
                        assert!(w.contains("line 5:"), "{w}");
                    }
                }
            }
        }
        let last = checkpoints_of(&events).pop().unwrap();
        assert_eq!(last["offset"], MEMBERS.len() as u64);
        assert!(read(&cfg, Some(&last), max).is_empty());
    }
}

#[test]
fn offset_resume_reads_appended_rows_only() {
    let dir = TempDir::new().unwrap();
    let path = write_file(&dir, "log.csv", b"id,v\n1,a\n2,b\n");
    let cfg = config(&path, json!({"incremental": {"by": "offset"}}));
    let events = read(&cfg, None, 10);
    assert_eq!(records_of(&events).len(), 2);
    let cp = checkpoints_of(&events).pop().unwrap();
    assert_eq!(cp, json!({"offset": 13, "line": 3}));

    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"3,c\nbroken\n4,d\n").unwrap();
    drop(f);
    testing::take_logs();
    let events = read(&cfg, Some(&cp), 10);
    assert_eq!(
        records_of(&events),
        [json!({"id": "3", "v": "c"}), json!({"id": "4", "v": "d"})]
    );
    assert_eq!(
        warnings(),
        [format!("{path} line 5: expected 2 fields, found 1; row skipped")]
    );
    assert_eq!(checkpoints_of(&events).pop().unwrap(), json!({"offset": 28, "line": 6}));
}

#[test]
fn unterminated_last_row_is_read_and_an_appended_row_after_it_too() {
    let dir = TempDir::new().unwrap();
    let path = write_file(&dir, "log.csv", b"id\n1\n2");
    let cfg = config(&path, json!({"incremental": {"by": "offset"}}));
    let events = read(&cfg, None, 10);
    assert_eq!(records_of(&events), [json!({"id": "1"}), json!({"id": "2"})]);
    let cp = checkpoints_of(&events).pop().unwrap();
    assert_eq!(cp, json!({"offset": 6, "line": 2}));
    // Unchanged file: nothing new, no restart.
    assert!(read(&cfg, Some(&cp), 10).is_empty());
    // A writer that starts each row with a line break.
    std::fs::write(&path, b"id\n1\n2\n3").unwrap();
    assert_eq!(records_of(&read(&cfg, Some(&cp), 10)), [json!({"id": "3"})]);
}

#[test]
fn rotated_or_rewritten_files_start_over_with_a_warning() {
    let dir = TempDir::new().unwrap();
    let path = write_file(&dir, "log.csv", b"id,v\n1,a\n2,b\n3,c\n");
    let cfg = config(&path, json!({"incremental": {"by": "offset"}}));
    let cp = checkpoints_of(&read(&cfg, None, 10)).pop().unwrap();

    std::fs::write(&path, b"id,v\n9,z\n").unwrap();
    testing::take_logs();
    let events = read(&cfg, Some(&cp), 10);
    assert_eq!(records_of(&events), [json!({"id": "9", "v": "z"})]);
    let w = warnings();
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("rotated or truncated"), "{}", w[0]);

    // Longer, but the old offset is now in the middle of a row.
    std::fs::write(&path, b"id,v\n1,aaaa\n2,bbbb\n3,cccc\n").unwrap();
    testing::take_logs();
    let events = read(&cfg, Some(&cp), 10);
    assert_eq!(records_of(&events).len(), 3);
    assert!(warnings()[0].contains("no longer falls on a row boundary"));

    // A checkpoint of another mode.
    testing::take_logs();
    assert_eq!(records_of(&read(&cfg, Some(&json!({"max": "x"})), 10)).len(), 3);
    assert!(warnings()[0].contains("not an offset checkpoint"));
}

#[test]
fn column_mode_emits_rows_greater_than_the_last_max() {
    let dir = TempDir::new().unwrap();
    let path = write_file(&dir, "m.csv", MEMBERS.as_bytes());
    let cfg = config(&path, json!({"incremental": {"by": "column", "column": "updated_at"}}));
    let events = read(&cfg, None, 2);
    assert_eq!(records_of(&events), expected_members());
    // One checkpoint, at the very end.
    assert!(matches!(events.last(), Some(ReadEvent::Checkpoint(_))));
    let cps = checkpoints_of(&events);
    assert_eq!(cps, [json!({"max": "2026-01-05T00:00:00Z"})]);
    assert!(records_of(&read(&cfg, Some(&cps[0]), 2)).is_empty());

    // Rewritten in full: one row changed, one new, one old unchanged, one without a value.
    std::fs::write(
        &path,
        "email,first_name,tier,updated_at\n\
         ada@example.com,Ada,gold,2026-01-02T00:00:00Z\n\
         alan@example.com,Alan,gold,2026-02-01T00:00:00Z\n\
         new@example.com,New,,2026-01-06T00:00:00Z\n\
         none@example.com,None,gold,\n",
    )
    .unwrap();
    let events = read(&cfg, Some(&cps[0]), 1);
    assert_eq!(
        records_of(&events),
        [
            json!({"email": "alan@example.com", "first_name": "Alan", "tier": "gold", "updated_at": "2026-02-01T00:00:00Z"}),
            json!({"email": "new@example.com", "first_name": "New", "updated_at": "2026-01-06T00:00:00Z"}),
        ]
    );
    assert_eq!(checkpoints_of(&events), [json!({"max": "2026-02-01T00:00:00Z"})]);
}

#[test]
fn delimiters_explicit_columns_and_no_header() {
    let dir = TempDir::new().unwrap();
    let path = write_file(&dir, "t.tsv", b"a\tb\n1\t2\n");
    let events = read(&config(&path, json!({"delimiter": "\t"})), None, 10);
    assert_eq!(records_of(&events), [json!({"a": "1", "b": "2"})]);

    // columns replace the header row's names
    let events = read(
        &config(&path, json!({"delimiter": "\t", "columns": ["x", "y"]})),
        None,
        10,
    );
    assert_eq!(records_of(&events), [json!({"x": "1", "y": "2"})]);

    // no header: every row is data
    let path = write_file(&dir, "s.csv", b"1;2\n3;4\n");
    let cfg = config(
        &path,
        json!({"delimiter": ";", "has_header": false, "columns": ["x", ""]}),
    );
    let events = read(&cfg, None, 10);
    assert_eq!(records_of(&events), [json!({"x": "1"}), json!({"x": "3"})]);
}

#[test]
fn header_quirks() {
    let dir = TempDir::new().unwrap();
    let path = write_file(&dir, "h.csv", b" id , name ,\n1,Ada,\n");
    let events = read(&config(&path, json!({})), None, 10);
    assert_eq!(records_of(&events), [json!({"id": "1", "name": "Ada"})]);

    let path = write_file(&dir, "d.csv", b"id,id\n1,2\n");
    let e = testing::open_source::<CsvSource>(&config(&path, json!({})), None).unwrap_err();
    assert_eq!(e.code, "duplicate_column");

    let path = write_file(&dir, "e.csv", b"");
    assert!(read(&config(&path, json!({})), None, 10).is_empty());
    let path = write_file(&dir, "o.csv", b"id,name\n");
    assert!(read(&config(&path, json!({"incremental": {"by": "offset"}})), None, 10).is_empty());

    let path = write_file(&dir, "u.csv", b"id,name\n1,\xff\xfe\n2,ok\n");
    testing::take_logs();
    assert_eq!(
        records_of(&read(&config(&path, json!({})), None, 10)),
        [json!({"id": "2", "name": "ok"})]
    );
    assert_eq!(warnings(), [format!("{path} line 2: not valid UTF-8; row skipped")]);
}

#[test]
fn config_errors() {
    let check = |cfg: Value| testing::check_source::<CsvSource>(&cfg.to_string());
    assert!(check(json!({"file": "/input/a.csv"})).is_ok());
    assert!(check(json!({"file": "/input/a.csv", "incremental": {"by": "offset"}})).is_ok());
    let code = |cfg: Value| {
        let e = check(cfg.clone()).expect_err(&cfg.to_string());
        assert_eq!(e.class, ErrorClass::Config);
        e.code
    };
    assert_eq!(code(json!({"file": "/a", "delimiter": ";;"})), "invalid_delimiter");
    assert_eq!(code(json!({"file": "/a", "delimiter": "\""})), "invalid_delimiter");
    assert_eq!(code(json!({"file": "/a", "has_header": false})), "missing_columns");
    assert_eq!(code(json!({"file": "/a", "columns": ["a", "a"]})), "duplicate_column");
    assert_eq!(code(json!({"file": ""})), "missing_file");
    assert_eq!(
        code(json!({"file": "/a", "columns": ["a"], "incremental": {"by": "column", "column": "b"}})),
        "unknown_column"
    );
    assert_eq!(
        code(json!({"file": "/a", "incremental": {"by": "lines"}})),
        "invalid_config"
    );
    assert_eq!(
        code(json!({"file": "/a", "incremental": {"by": "offset", "x": 1}})),
        "invalid_config"
    );
    let e = check(json!({"file": "/a", "has_heder": true})).unwrap_err();
    assert!(e.message.contains("has_heder"), "{}", e.message);

    let e = testing::open_source::<CsvSource>(r#"{"file": "/definitely/not/here.csv"}"#, None).unwrap_err();
    assert_eq!((e.class, e.code.as_str()), (ErrorClass::Config, "file_not_found"));

    let dir = TempDir::new().unwrap();
    let path = write_file(&dir, "m.csv", b"a,b\n1,2\n");
    let cfg = config(&path, json!({"incremental": {"by": "column", "column": "c"}}));
    assert_eq!(
        testing::open_source::<CsvSource>(&cfg, None).unwrap_err().code,
        "unknown_column"
    );
}

#[test]
fn spec_describes_the_plugin() {
    let spec = <CsvSource as cdp_plugin_sdk::Source>::spec();
    assert_eq!(spec.name, "source-csv");
    assert_eq!(spec.capabilities, ["mount", "incremental"]);
    assert_eq!(spec.config_schema["required"], json!(["file"]));
}
