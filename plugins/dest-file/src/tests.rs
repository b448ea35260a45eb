use cdp_plugin_sdk::{ErrorClass, testing};
use serde_json::{Value, json};
use tempfile::TempDir;

use super::*;

fn line(key: &str, op: &str, identities: Value, traits: Value) -> String {
    let mut v =
        json!({"key": key, "op": op, "profile_id": format!("p-{key}"), "identities": identities, "traits": traits});
    if op != "upsert" {
        v["audience"] = json!("vip");
    }
    v.to_string()
}

fn open(cfg: Value) -> FileWriter {
    testing::open_destination::<FileDestination>(&cfg.to_string()).unwrap()
}

const ADA: &str = "b5fc85e55755f9e0d030a10ab4429b6b2944855f9a0d60077fe832becbc41d72";
const ADA_PHONE: &str = "a7274f98c43038d9c630738ac54c4cd06495600f29d7904131a2474a91d3d042";

#[test]
fn csv_export_with_hashing_appends_and_syncs() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("out/vip.csv");
    let cfg = json!({"path": path, "fields": ["country", "email"]});
    let mut w = open(cfg.clone());
    let batch = [
        line(
            "k1",
            "enter",
            json!({"email": [" Ada@Example.com "], "phone": ["+46 70-123 45 67"]}),
            json!({"country": "SE", "email": "x"}),
        ),
        line(
            "k2",
            "exit",
            json!({"email": ["not-an-email"], "device": ["d1"]}),
            json!({}),
        ),
        line(
            "k3",
            "enter",
            json!({"email": ["a@x.com", "b@x.com"]}),
            json!({"country": "Sweden, \"SE\""}),
        ),
    ]
    .join("\n");
    let ack = testing::write(&mut w, &batch).unwrap();
    assert_eq!(ack.accepted, 2);
    assert_eq!(ack.rejected.len(), 1);
    assert_eq!(
        (ack.rejected[0].index, ack.rejected[0].reason.class),
        (1, ErrorClass::Data)
    );
    assert_eq!(ack.rejected[0].reason.code, "no_identifiers");
    w.flush().unwrap();

    let a = normalize::sha256_hex("a@x.com");
    let b = normalize::sha256_hex("b@x.com");
    let expected = format!(
        "key,op,audience,email,phone,country,trait.email\r\n\
         k1,enter,vip,{ADA},{ADA_PHONE},SE,x\r\n\
         k3,enter,vip,{a},,\"Sweden, \"\"SE\"\"\",\r\n\
         k3,enter,vip,{b},,\"Sweden, \"\"SE\"\"\",\r\n"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), expected);

    // Reopened with the same config: appends without a second header; exit rows keep their op.
    drop(w);
    let mut w = open(cfg);
    testing::write(
        &mut w,
        &line("k4", "exit", json!({"email": ["ada@example.com"]}), json!({})),
    )
    .unwrap();
    w.flush().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, format!("{expected}k4,exit,vip,{ADA},,,\r\n"));
}

#[test]
fn unhashed_jsonl_export() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("list.jsonl");
    let mut w = open(json!({
        "path": path,
        "format": "jsonl",
        "hash_identifiers": false,
        "identities": ["phone", "email"],
        "fields": ["tier"],
        "default_country_code": "46"
    }));
    let batch = [
        line(
            "k1",
            "upsert",
            json!({"email": ["ADA@example.com"], "phone": ["070-123 45 67", "n/a"]}),
            json!({"tier": "gold", "secret": 1}),
        ),
        line("k2", "exit", json!({"phone": ["+1 650 555 1234"]}), json!({})),
    ]
    .join("\n");
    testing::take_logs();
    let ack = testing::write(&mut w, &batch).unwrap();
    assert_eq!(ack.accepted, 2);
    assert!(
        testing::take_logs()
            .iter()
            .any(|(_, m)| m == "record k1: phone value is not usable; left out")
    );
    w.flush().unwrap();
    let lines: Vec<Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            json!({"key": "k1", "op": "upsert", "identities": {"phone": ["46701234567"], "email": ["ada@example.com"]}, "traits": {"tier": "gold"}}),
            json!({"key": "k2", "op": "exit", "audience": "vip", "identities": {"phone": ["16505551234"]}, "traits": {}}),
        ]
    );
}

#[test]
fn other_identity_types_are_trimmed_and_hashed() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("ids.csv");
    let mut w = open(json!({"path": path, "identities": ["crm_id"]}));
    testing::write(&mut w, &line("k1", "enter", json!({"crm_id": [" C-42 "]}), json!({}))).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text,
        format!(
            "key,op,audience,crm_id\r\nk1,enter,vip,{}\r\n",
            normalize::sha256_hex("C-42")
        )
    );
}

#[test]
fn an_existing_file_with_other_columns_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("vip.csv");
    std::fs::write(&path, "email\r\nabc\r\n").unwrap();
    let e = testing::open_destination::<FileDestination>(&json!({"path": path}).to_string()).unwrap_err();
    assert_eq!((e.class, e.code.as_str()), (ErrorClass::Config, "header_mismatch"));
}

#[test]
fn a_cut_short_last_row_gets_a_line_break() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("vip.jsonl");
    std::fs::write(&path, "{\"key\":\"k0\"").unwrap();
    let mut w = open(json!({"path": path, "format": "jsonl", "hash_identifiers": false}));
    testing::write(&mut w, &line("k1", "enter", json!({"email": ["a@x.com"]}), json!({}))).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("{\"key\":\"k0\""));
    assert!(lines.next().unwrap().starts_with("{\"key\":\"k1\""));
}

#[test]
fn config_validation_and_spec() {
    let check = |cfg: Value| testing::check_destination::<FileDestination>(&cfg.to_string());
    assert!(check(json!({"path": "/output/vip.csv"})).is_ok());
    let code = |cfg: Value| check(cfg.clone()).expect_err(&cfg.to_string()).code;
    assert_eq!(code(json!({"path": ""})), "invalid_path");
    assert_eq!(code(json!({"path": "/output/"})), "invalid_path");
    assert_eq!(code(json!({"path": "/o/a", "identities": []})), "missing_identities");
    assert_eq!(
        code(json!({"path": "/o/a", "default_country_code": "+46"})),
        "invalid_country_code"
    );
    assert_eq!(code(json!({"path": "/o/a", "fields": ["x", "x"]})), "duplicate_column");
    assert_eq!(code(json!({"path": "/o/a", "format": "xlsx"})), "invalid_config");
    let e =
        testing::open_destination::<FileDestination>(r#"{"path": "/proc/definitely/not/writable.csv"}"#).unwrap_err();
    assert_ne!(e.class, ErrorClass::Internal);

    let spec = <FileDestination as Destination>::spec();
    assert_eq!(spec.name, "dest-file");
    assert_eq!(spec.capabilities, ["mount"]);
}

#[test]
fn phone_format_and_formula_cells() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("out.csv");
    let mut w = open(json!({"path": path, "hash_identifiers": false, "phone_format": "e164", "fields": ["note"]}));
    let batch = line(
        "=cmd|' /C calc'!A0",
        "upsert",
        json!({"phone": ["+46 70-123 45 67"]}),
        json!({"note": "@SUM(A1)"}),
    );
    testing::write(&mut w, &batch).unwrap();
    drop(w);
    let out = std::fs::read_to_string(&path).unwrap();
    assert!(out.contains(",+46701234567,"), "{out}");
    assert!(out.contains("'=cmd"), "{out}");
    assert!(out.contains("'@SUM(A1)"), "{out}");
}

#[test]
fn identifiers_hashed_before_they_arrive_are_written_as_they_are() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("pre.csv");
    let mut w = open(json!({"path": path}));
    let pre = ADA.to_uppercase();
    let batch = [
        line(
            "k1",
            "enter",
            json!({"email": [pre], "phone": ["+46 70-123 45 67"]}),
            json!({}),
        ),
        line("k2", "enter", json!({"email": ["a@x.com"]}), json!({})),
    ]
    .join("\n");
    let ack = testing::write(&mut w, &batch).unwrap();
    assert_eq!((ack.accepted, ack.rejected.len()), (2, 0));
    w.flush().unwrap();
    let a = normalize::sha256_hex("a@x.com");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("key,op,audience,email,phone\r\nk1,enter,vip,{ADA},{ADA_PHONE}\r\nk2,enter,vip,{a},\r\n")
    );
}
