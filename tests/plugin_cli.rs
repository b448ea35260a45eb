//! `cdp plugin …` and the plugin checks of `cdp validate`, through the real
//! binary and the real components.

mod plugins;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn cdp(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdp"))
        .current_dir(dir)
        .env("CDP_CACHE_DIR", dir.join(".cache"))
        .args(args)
        .output()
        .expect("run cdp")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn inspect_shows_spec_imports_and_pin() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = plugins::shipped("dest_webhook");
    let o = cdp(dir.path(), &["plugin", "inspect", wasm.to_str().unwrap(), "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "destination");
    assert_eq!(v["spec"]["name"], "dest-webhook");
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
    assert!(v["imports"].as_array().unwrap().iter().any(|i| i.as_str().unwrap().starts_with("cdp:connector/http@")));
    let o = cdp(dir.path(), &["plugin", "inspect", wasm.to_str().unwrap()]);
    let t = text(&o);
    assert!(t.contains("capabilities  http"), "{t}");
    assert!(
        t.contains("secrets       config.headers, config.signing_secret") || t.contains("config.signing_secret"),
        "{t}"
    );
    let o = cdp(dir.path(), &["plugin", "inspect", "missing.wasm"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("cannot read plugin missing.wasm"));
}

#[test]
fn test_runs_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/m.csv"), "member_no,email\nM1,a@x.com\nM2,b@x.com\nM3,c@x.com\n").unwrap();
    let csv = plugins::shipped("source_csv");
    let o = cdp(
        dir.path(),
        &["plugin", "test", csv.to_str().unwrap(), "--config", "{file: /input/m.csv}", "--mount", "data:/input"],
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("ok    reads to the end: 3 records"), "{t}");
    assert!(t.contains("0 failed"), "{t}");

    // A config the plugin's schema refuses fails the suite, naming the field.
    let o = cdp(dir.path(), &["plugin", "test", csv.to_str().unwrap(), "--config", "{file: 3}", "--format", "json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["passed"], false);
    let failed: Vec<&Value> =
        v["report"]["checks"].as_array().unwrap().iter().filter(|c| c["passed"] == false).collect();
    assert!(failed.iter().any(|c| c["detail"].as_str().unwrap().contains("config.file")), "{failed:?}");
}

#[test]
fn validate_checks_configs_against_the_plugins_schema() {
    let dir = tempfile::tempdir().unwrap();
    let csv = plugins::shipped("source_csv");
    let file = plugins::shipped("dest_file");
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let manifest = format!(
        "version: 1
name: t
plugins:
  csv: {{ path: {csv} }}
  file: {{ path: {file} }}
identity:
  keys:
    email: {{ normalize: email }}
consent:
  purposes: [advertising]
sources:
  members:
    plugin: csv
    schedule: \"0 0 * * * *\"
    config:
      file: /input/m.csv
      delimiter: \";;\"
    mount: {{ data: /input }}
    map:
      identities: {{ email: email }}
  wrong:
    plugin: file
    schedule: \"0 0 * * * *\"
    config: {{ path: /x }}
    map:
      identities: {{ email: email }}
destinations:
  list:
    plugin: file
    purpose: advertising
    config: {{ path: /out/ }}
    mount: {{ data: /out }}
",
        csv = csv.display(),
        file = file.display()
    );
    std::fs::write(dir.path().join("cdp.yaml"), manifest).unwrap();
    let o = cdp(dir.path(), &["validate", "--format", "json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let diags = v["diagnostics"].as_array().unwrap();
    let find = |code: &str| diags.iter().find(|d| d["code"] == code).unwrap_or_else(|| panic!("{code} in {diags:?}"));
    let d = find("CDP071");
    assert_eq!(d["path"], "sources.members.config.delimiter");
    assert_eq!(d["line"], 17);
    let d = find("CDP070");
    assert_eq!(d["path"], "sources.wrong.plugin");
    let d = find("CDP072");
    assert_eq!(d["path"], "destinations.list.config");
    assert!(d["message"].as_str().unwrap().contains("must name a file"), "{d}");
}

#[test]
fn new_build_and_test_a_scaffolded_plugin() {
    let dir = tempfile::tempdir().unwrap();
    for (name, kind) in [("source-members", "source"), ("dest-crm", "destination")] {
        let o = cdp(dir.path(), &["plugin", "new", name, "--kind", kind]);
        assert!(o.status.success(), "{}", text(&o));
        let crate_dir = dir.path().join(name);
        assert!(crate_dir.join("src/lib.rs").exists());
        // Reuse the plugins workspace's compiled dependencies.
        let o = Command::new(env!("CARGO_BIN_EXE_cdp"))
            .current_dir(dir.path())
            .env("CDP_CACHE_DIR", dir.path().join(".cache"))
            .env("CARGO_TARGET_DIR", plugins::root().join("plugins/target"))
            .args(["plugin", "build", name])
            .output()
            .unwrap();
        let t = text(&o);
        assert!(o.status.success(), "{t}");
        assert!(t.contains("sha256: \""), "{t}");
        let wasm = plugins::root()
            .join("plugins/target/wasm32-wasip2/release")
            .join(format!("{}.wasm", name.replace('-', "_")));
        let config = if kind == "source" { "{rows: [{id: 1}, {id: 2}, {id: 3}], page_size: 2}" } else { "{}" };
        let o = cdp(dir.path(), &["plugin", "test", wasm.to_str().unwrap(), "--config", config]);
        assert!(o.status.success(), "{name}: {}", text(&o));
    }
    let o = cdp(dir.path(), &["plugin", "new", "source-members", "--kind", "source"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("already exists"));
    let o = cdp(dir.path(), &["plugin", "new", "Bad_Name", "--kind", "source"]);
    assert!(text(&o).contains("not a crate name"));
}

#[test]
fn spec_honours_the_timeout_of_inspect_build_and_test() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = plugins::hostile_source();
    let wasm = wasm.to_str().unwrap();
    // Its spec computes for 300 ms: fine within the default deadline …
    let o = cdp(dir.path(), &["plugin", "inspect", wasm]);
    assert!(o.status.success(), "{}", text(&o));
    // … and stopped within a shorter one.
    let o = cdp(dir.path(), &["plugin", "inspect", wasm, "--timeout", "100ms"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("`spec` did not return within its deadline of 100ms"), "{}", text(&o));
    let o = cdp(dir.path(), &["plugin", "test", wasm, "--timeout", "100ms", "--config", "{behave: checkpoint}"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("`spec` did not return within its deadline of 100ms"), "{}", text(&o));
    let o = cdp(dir.path(), &["plugin", "inspect", wasm, "--timeout", "soon"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--timeout"), "{}", text(&o));
}

#[test]
fn validate_runs_check_with_the_entrys_timeout_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = plugins::hostile();
    let manifest = format!(
        "version: 1
name: t
plugins:
  slow: {{ path: {hostile}, timeout: 1s }}
  tiny: {{ path: {hostile}, memory: 1MiB }}
identity:
  keys:
    email: {{ normalize: email }}
consent:
  purposes: [advertising]
destinations:
  sleepy:
    plugin: slow
    purpose: advertising
    config: {{ behave: check_sleep, secs: 30 }}
  small:
    plugin: tiny
    purpose: advertising
    config: {{ behave: ok }}
",
        hostile = hostile.display()
    );
    std::fs::write(dir.path().join("cdp.yaml"), manifest).unwrap();
    let started = std::time::Instant::now();
    let o = cdp(dir.path(), &["validate", "--format", "json"]);
    // Compiling the plugin takes seconds; sleeping out the check would take 30.
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "{:?}", started.elapsed());
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let diags = v["diagnostics"].as_array().unwrap();
    let at = |path: &str| diags.iter().find(|d| d["path"] == path).unwrap_or_else(|| panic!("{path} in {diags:?}"));
    let d = at("destinations.sleepy.config");
    assert!(d["message"].as_str().unwrap().contains("`check` did not return within its deadline of 1s"), "{d}");
    let d = at("plugins.tiny.path");
    assert!(d["message"].as_str().unwrap().contains("memory"), "{d}");
}
