//! The `cdp` binary end to end: hostile manifests are refused with a
//! diagnostic and never a crash, the checked-in schema equals the types, and
//! every shipped example validates.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cdp(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdp")).current_dir(dir).args(args).output().expect("run cdp")
}

fn validate_json(file: &Path) -> (serde_json::Value, Output) {
    let out = cdp(&["validate", "--format", "json", "-f", file.to_str().expect("utf-8 path")], &root());
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: stdout {} stderr {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    (v, out)
}

#[test]
fn hostile_manifests_are_refused_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, bytes) in cdp::bench::validate::hostile_inputs() {
        let file = dir.path().join("hostile.yaml");
        std::fs::write(&file, &bytes).expect("write");
        let start = Instant::now();
        let (v, out) = validate_json(&file);
        let elapsed = start.elapsed();
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert_eq!(v["valid"], false, "{name}");
        let first = &v["diagnostics"][0];
        assert!(first["code"].as_str().is_some_and(|c| c.starts_with("CDP0")), "{name}: {v}");
        assert!(first["line"].as_u64().is_some_and(|l| l >= 1), "{name}: {v}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked") && !stderr.contains("overflow"), "{name}: {stderr}");
        eprintln!("{name}: refused in {elapsed:?} (debug build)");
    }
}

#[test]
fn oversize_file_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("big.yaml");
    let f = std::fs::File::create(&file).expect("create");
    f.set_len(50 << 20).expect("sparse 50 MB file");
    let (v, out) = validate_json(&file);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(v["diagnostics"][0]["code"], "CDP002");
}

#[test]
fn checked_in_schema_matches_the_types() {
    let out = cdp(&["schema"], &root());
    assert!(out.status.success());
    let path = root().join("schemas/cdp.schema.json");
    if std::env::var_os("CDP_BLESS").is_some() {
        std::fs::write(&path, &out.stdout).expect("write schema");
    }
    let checked_in = std::fs::read_to_string(&path).expect("schemas/cdp.schema.json");
    assert!(
        checked_in == String::from_utf8_lossy(&out.stdout),
        "schemas/cdp.schema.json is stale: run `cargo run -- schema > schemas/cdp.schema.json`"
    );
    let schema: serde_json::Value = serde_json::from_str(&checked_in).expect("json");
    assert!(schema["properties"]["destinations"]["description"].is_string());
}

#[test]
fn shipped_examples_validate() {
    let manifests = ["cdp.yaml", "examples/retail/cdp.yaml", "examples/travel/cdp.yaml"];
    for m in manifests {
        let file = root().join(m);
        let (v, out) = validate_json(&file);
        let errors: Vec<_> =
            v["diagnostics"].as_array().into_iter().flatten().filter(|d| d["severity"] == "error").collect();
        assert!(errors.is_empty() && out.status.success(), "{m}: {errors:#?}");
        let warnings: Vec<_> = v["diagnostics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["severity"] == "warning" && d["code"] != "CDP049")
            .collect();
        assert!(warnings.is_empty(), "{m} should have no warnings but unset variables: {warnings:#?}");
    }
}

#[test]
fn stdin_manifest_validates() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args(["validate", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(b"version: 1\nname: piped\n").expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("<stdin>: valid"));
}

/// Replaces the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`.
fn splice(doc: &str, name: &str, body: &str) -> String {
    let start = format!("<!-- {name}:start -->\n");
    let end = format!("<!-- {name}:end -->");
    let (Some(a), Some(b)) = (doc.find(&start), doc.find(&end)) else {
        panic!("README.md lacks the {name} markers");
    };
    format!("{}{start}{body}{}", &doc[..a], &doc[b..])
}

#[test]
fn readme_tables_are_generated_from_the_code() {
    let path = root().join("README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md");
    let want = splice(&readme, "codes", &cdp::cli::schema::codes_markdown());
    let want = splice(&want, "reference", &cdp::cli::schema::reference_markdown());
    if std::env::var_os("CDP_BLESS").is_some() {
        std::fs::write(&path, &want).expect("write README");
        return;
    }
    assert!(want == readme, "README tables are stale: run `CDP_BLESS=1 cargo test --test cli`");
}

/// Eight deliberate errors, each in a part whose inputs are intact, are all
/// reported by one run, although two destinations carry unknown keys and
/// other parts of the manifest are wrong too (plugin configs included).
#[test]
fn one_run_reports_all_eight_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wasm = root().join("plugins/dist/dest_webhook.wasm");
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&wasm).expect("plugins/dist/dest_webhook.wasm")))
    };
    let manifest = format!(
        r#"version: 1
name: eight
plugins:
  hook: {{ path: {wasm}, sha256: "{sha}" }}
identity:
  keys:
    email: {{ normalize: email }}
model:
  traits:
    tier: {{ type: string, enum: [gold, silver] }}
consent:
  purposes: [email_marketing, advertising]
  policies:
    - {{ deny_labels: [pii], for: [advertising] }}
audiences:
  vip: {{ where: 'tier == "platnum"' }}
  nightly: {{ where: 'tier == "gold"', refresh: "0 61 * * * *" }}
destinations:
  vip_hook:
    plugin: hook
    audience: vip
    purpose: advertising
    shedule: "0 0 * * * *"
    fields: [email]
    rate_limit: 20
    config: {{ url: "https://hooks.example.com/x", format: xls }}
  ads:
    plugin: hook
    purpose: advertsing
    batch: {{ max_wiat: 5s }}
    config: {{ url: "https://ads.example.com/in" }}
"#,
        wasm = wasm.display()
    );
    let file = dir.path().join("cdp.yaml");
    std::fs::write(&file, manifest).expect("write");
    let (v, out) = validate_json(&file);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let found: Vec<(String, String)> = v["diagnostics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["severity"] == "error")
        .map(|d| (d["code"].as_str().unwrap_or("").to_owned(), d["path"].as_str().unwrap_or("").to_owned()))
        .collect();
    let expected = [
        ("CDP023", "audiences.vip.where"),
        ("CDP043", "audiences.nightly.refresh"),
        ("CDP020", "destinations.vip_hook.shedule"),
        ("CDP048", "destinations.vip_hook.fields[0]"),
        ("CDP021", "destinations.vip_hook.rate_limit"),
        ("CDP071", "destinations.vip_hook.config.format"),
        ("CDP034", "destinations.ads.purpose"),
        ("CDP020", "destinations.ads.batch.max_wiat"),
    ];
    for (code, path) in expected {
        assert!(found.iter().any(|(c, p)| c == code && p == path), "{code} at {path} missing from {found:#?}");
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
}

/// Docs are interface: every command the schema's descriptions name exists
/// in the binary.
#[test]
fn docs_claim_only_what_is_built() {
    let schema = cdp(&["schema"], &root()).stdout;
    let schema = String::from_utf8_lossy(&schema);
    let named: std::collections::BTreeSet<&str> = schema
        .match_indices("`cdp ")
        .filter_map(|(i, _)| schema[i + 5..].split(|c: char| !c.is_ascii_alphanumeric() && c != '-').next())
        .filter(|w| !w.is_empty())
        .collect();
    assert!(named.contains("run") && named.contains("plan"), "{named:?}");
    for command in named {
        let out = cdp(&[command, "--help"], &root());
        assert!(out.status.success(), "the schema names `cdp {command}`, which the binary lacks");
    }
    let guide = std::fs::read_to_string(root().join("plugins/README.md")).expect("plugins/README.md");
    assert!(!guide.contains("`cdp run` uses"), "plugins/README.md describes `cdp run` as existing");
}
