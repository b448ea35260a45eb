//! `cdp plugin new|build|inspect|test`: partner tooling around the connector
//! host. Exit codes: 0 ok, 1 the plugin failed (build error, failed checks),
//! 2 could not run (bad arguments, unreadable file).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::Format;
use crate::plugin::{self, Grants, Host, Kind, Mount, conformance};

/// Template files of `cdp plugin new`, by kind: (path in the crate, text).
const SOURCE_TEMPLATE: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../../plugins/templates/source/Cargo.toml.tmpl")),
    ("src/lib.rs", include_str!("../../plugins/templates/source/src/lib.rs.tmpl")),
    ("README.md", include_str!("../../plugins/templates/source/README.md.tmpl")),
    (".cargo/config.toml", include_str!("../../plugins/templates/source/.cargo/config.toml.tmpl")),
];
const DESTINATION_TEMPLATE: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("../../plugins/templates/destination/Cargo.toml.tmpl")),
    ("src/lib.rs", include_str!("../../plugins/templates/destination/src/lib.rs.tmpl")),
    ("README.md", include_str!("../../plugins/templates/destination/README.md.tmpl")),
    (".cargo/config.toml", include_str!("../../plugins/templates/destination/.cargo/config.toml.tmpl")),
];

/// The wasm target plugins build for.
pub const TARGET: &str = "wasm32-wasip2";

/// `cdp plugin new NAME --kind K [--dir D] [--sdk S]`.
pub fn new(name: &str, kind: Kind, dir: Option<&Path>, sdk: Option<&Path>) -> Result<ExitCode> {
    let valid = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-');
    if !valid {
        bail!(
            "`{name}` is not a crate name cdp scaffolds: use lowercase letters, digits and dashes, e.g. `source-members`"
        );
    }
    let dir = dir.map_or_else(|| PathBuf::from(name), Path::to_path_buf);
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} already exists and is not empty; pass --dir for another place", dir.display());
    }
    let sdk = sdk_path(sdk)?;
    let files = match kind {
        Kind::Source => SOURCE_TEMPLATE,
        Kind::Destination => DESTINATION_TEMPLATE,
    };
    for (rel, text) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let text = text
            .replace("{{name}}", name)
            .replace("{{crate_name}}", &name.replace('-', "_"))
            .replace("{{sdk_path}}", &sdk.display().to_string());
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("created {kind} plugin `{name}` in {}", dir.display());
    println!("next:");
    println!("  cd {} && cargo test          # native unit tests", dir.display());
    println!("  cdp plugin build {}           # the component, and its manifest pin", dir.display());
    println!("  cdp plugin test FILE --config '{{…}}'   # the conformance suite in the sandbox");
    Ok(ExitCode::SUCCESS)
}

/// The SDK crate: `--sdk`, `$CDP_SDK_PATH`, or the one in the source tree this cdp was built from.
fn sdk_path(explicit: Option<&Path>) -> Result<PathBuf> {
    let candidate = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("CDP_SDK_PATH").map(PathBuf::from))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/sdk"));
    let manifest = candidate.join("Cargo.toml");
    if !manifest.exists() {
        bail!(
            "the plugin SDK is not at {} (no Cargo.toml there); pass --sdk PATH or set CDP_SDK_PATH to cdp's plugins/sdk",
            candidate.display()
        );
    }
    candidate.canonicalize().with_context(|| format!("cannot resolve {}", candidate.display()))
}

/// `cdp plugin build [DIR] [--debug]`: cargo for wasm32-wasip2, then the
/// component is loaded in the host (so it is known to be a connector) and its
/// manifest pin printed.
pub fn build(dir: &Path, debug: bool, timeout: Option<&str>) -> Result<ExitCode> {
    let timeout = call_timeout(timeout)?;
    if !dir.join("Cargo.toml").exists() {
        bail!("{} has no Cargo.toml; pass the plugin crate's directory", dir.display());
    }
    if let Ok(out) = Command::new("rustup").args(["target", "list", "--installed"]).output()
        && !String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == TARGET)
    {
        bail!("the {TARGET} target is not installed; run `rustup target add {TARGET}`");
    }
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(dir).args(["build", "--lib", "--target", TARGET, "--message-format=json-render-diagnostics"]);
    if !debug {
        cmd.arg("--release");
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output().context("cannot run cargo")?;
    if !out.status.success() {
        eprintln!("error: the build failed (see above)");
        return Ok(ExitCode::from(1));
    }
    let mut wasm = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else { continue };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|x| x == "cdylib"))
        {
            for f in msg["filenames"].as_array().into_iter().flatten() {
                if let Some(f) = f.as_str().filter(|f| f.ends_with(".wasm")) {
                    wasm = Some(PathBuf::from(f));
                }
            }
        }
    }
    let Some(wasm) = wasm else {
        bail!("cargo built no .wasm: the crate needs `crate-type = [\"cdylib\", …]` under [lib]");
    };
    let host = Host::with_default_cache()?;
    let p = match host.load(&wasm, None) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let spec = match block(p.spec_within("build", plugin::DEFAULT_MEMORY, timeout))? {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    println!("built {} ({} {} {}, {} KiB)", wasm.display(), p.kind(), spec.name, spec.version, p.size().div_ceil(1024));
    println!("pin it in the manifest:");
    println!("  plugins:");
    println!("    {}: {{ path: {}, sha256: \"{}\" }}", short_name(&spec.name), wasm.display(), p.sha256());
    Ok(ExitCode::SUCCESS)
}

fn short_name(name: &str) -> &str {
    name.strip_prefix("source-").or_else(|| name.strip_prefix("dest-")).unwrap_or(name)
}

/// `--timeout` of `build`, `inspect` and `test`: the deadline of each call
/// into the plugin.
fn call_timeout(text: Option<&str>) -> Result<std::time::Duration> {
    match text {
        None => Ok(plugin::DEFAULT_TIMEOUT),
        Some(t) => crate::manifest::units::parse_duration(t).map_err(|e| anyhow::anyhow!("--timeout: {e}")),
    }
}

fn block<F: std::future::Future>(f: F) -> Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f))
}

/// `cdp plugin inspect FILE [--format json]`.
pub fn inspect(file: &Path, format: Format, timeout: Option<&str>) -> Result<ExitCode> {
    let timeout = call_timeout(timeout)?;
    let host = Host::with_default_cache()?;
    let p = match host.load(file, None) {
        Ok(p) => p,
        Err(e @ plugin::PluginError::Read { .. }) => return Err(e.into()),
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let spec = match block(p.spec_within("inspect", plugin::DEFAULT_MEMORY, timeout))? {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    if format == Format::Json {
        let out = json!({
            "file": file.display().to_string(),
            "sha256": p.sha256(),
            "size": p.size(),
            "kind": p.kind(),
            "protocol": p.protocol(),
            "spec": spec,
            "imports": p.imports(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("file          {}", file.display());
    println!("sha256        {}", p.sha256());
    println!("size          {} KiB", p.size().div_ceil(1024));
    println!("kind          {} (cdp:connector@{})", p.kind(), p.protocol());
    println!("name          {} {}", spec.name, spec.version);
    if !spec.description.is_empty() {
        println!("description   {}", spec.description);
    }
    let caps: Vec<String> = spec
        .capabilities
        .iter()
        .map(|c| match plugin::CAPABILITIES.iter().find(|k| k.0 == c) {
            Some((_, about)) => format!("{c} ({about})"),
            None => format!("{c} (unknown to this cdp)"),
        })
        .collect();
    println!("capabilities  {}", if caps.is_empty() { "none".into() } else { caps.join("\n              ") });
    println!("imports       {}", p.imports().join("\n              "));
    let secrets = secret_fields(&spec.config_schema, "config");
    if !secrets.is_empty() {
        println!("secrets       {} (use ${{env:…}} in the manifest)", secrets.join(", "));
    }
    println!("config schema\n{}", serde_json::to_string_pretty(&spec.config_schema)?);
    println!("pin           {{ path: {}, sha256: \"{}\" }}", file.display(), p.sha256());
    Ok(ExitCode::SUCCESS)
}

/// Config fields marked `"x-secret": true`, as dotted paths.
fn secret_fields(schema: &Value, at: &str) -> Vec<String> {
    let mut out = Vec::new();
    if schema.get("x-secret").and_then(Value::as_bool) == Some(true) {
        out.push(at.to_owned());
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            out.extend(secret_fields(v, &format!("{at}.{k}")));
        }
    }
    out
}

/// Arguments of `cdp plugin test`.
pub struct TestArgs<'a> {
    pub file: &'a Path,
    pub config: Option<&'a str>,
    pub fixtures: Option<&'a Path>,
    pub mounts: &'a [String],
    pub allow_hosts: &'a [String],
    pub timeout: Option<&'a str>,
    pub format: Format,
}

/// `cdp plugin test FILE [--config C] [--fixtures DIR] [--mount HOST:GUEST] [--allow-host H]`.
pub fn test(a: TestArgs<'_>) -> Result<ExitCode> {
    let config = match a.config {
        None => json!({}),
        Some(text) => parse_config(text)?,
    };
    let grants_timeout = call_timeout(a.timeout)?;
    let mut grants = Grants { allow_hosts: a.allow_hosts.to_vec(), timeout: grants_timeout, ..Grants::default() };
    for m in a.mounts {
        let (host, guest) =
            m.split_once(':').with_context(|| format!("--mount `{m}`: write HOST_DIR:GUEST_PATH, e.g. data:/input"))?;
        let host = Path::new(host).canonicalize().with_context(|| format!("--mount: cannot open {host}"))?;
        grants.mounts.push(Mount { host, guest: guest.to_owned(), writable: false });
    }
    let host = Host::with_default_cache()?;
    let p = match host.load(a.file, None) {
        Ok(p) => p,
        Err(e @ plugin::PluginError::Read { .. }) => return Err(e.into()),
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    if p.kind() == Kind::Destination {
        for m in &mut grants.mounts {
            m.writable = true;
        }
    }
    let mut opts = conformance::Options::new(config, grants);
    opts.fixtures = a.fixtures.map(Path::to_path_buf);
    let report = block(conformance::run(&p, "test", &opts))?;
    match a.format {
        Format::Json => {
            println!("{}", serde_json::to_string_pretty(&json!({"passed": report.passed(), "report": report}))?)
        }
        _ => print!("{}", report.render(a.file)),
    }
    Ok(if report.passed() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `--config`: JSON or YAML text, or `@FILE`.
fn parse_config(text: &str) -> Result<Value> {
    let owned;
    let text = match text.strip_prefix('@') {
        Some(path) => {
            owned = std::fs::read_to_string(path).with_context(|| format!("--config: cannot read {path}"))?;
            owned.as_str()
        }
        None => text,
    };
    let doc = crate::manifest::yaml::parse(text);
    if let Some(d) = doc.diagnostics.iter().find(|d| d.is_error()) {
        bail!("--config is not valid JSON or YAML: {} (line {}, column {})", d.message, d.line, d.column);
    }
    match doc.value {
        Some(v @ Value::Object(_)) => Ok(v),
        _ => bail!("--config must be a mapping, e.g. '{{\"path\": \"/input/members.csv\"}}'"),
    }
}
