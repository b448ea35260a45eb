//! The HTTP collector and the admin API with real, unmodified SDKs, through
//! the real binary: `segment-analytics-python` and `rudder-sdk-python` (gzip
//! bodies) and `@segment/analytics-node` (plain JSON) send the event set of
//! `tests/sdk/` to a `cdp run` on loopback serving the quickstart manifest as
//! shipped. Every message they send is stored; each person's anonymous id and
//! user id join one profile with their email, traits and events; the admin API
//! answers that profile with the JSON of `cdp profile get --format json`; a
//! wrong write key is refused and the SDK reports it.
//!
//! Needs python3, node and npm, the shipped plugins (`plugins/build.sh`), and
//! the package registries on the first run: `scripts/sdk-deps` installs the
//! pinned SDKs once into `$TMPDIR/cdp-sdk-deps` (or `CDP_SDK_DEPS`). The test
//! is skipped, saying so, only when a registry cannot be reached.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

const WRITE_KEY: &str = "wk-sdk-acceptance";
const ADMIN_TOKEN: &str = "admin-token-sdk-acceptance";

/// What the quickstart manifest reads from the environment, and the listen
/// address `cdp run` binds (port 0: any free port, read back from `cdp status`).
const ENV: [(&str, &str); 3] =
    [("WEB_WRITE_KEY", WRITE_KEY), ("CDP_ADMIN_TOKEN", ADMIN_TOKEN), ("CDP_LISTEN", "127.0.0.1:0")];

/// The SDKs, each with the sender script of `tests/sdk/` that drives it.
const SDKS: [Sdk; 3] = [
    Sdk { name: "segment", last_name: "Segment" },
    Sdk { name: "rudder", last_name: "Rudder" },
    Sdk { name: "node", last_name: "Node" },
];

const SENDER_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy)]
struct Sdk {
    /// `segment`, `rudder` or `node`: the sender and the person's name part.
    name: &'static str,
    /// The `last_name` trait its sender sends.
    last_name: &'static str,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cdp(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdp")).current_dir(dir).envs(ENV).args(args).output().expect("run cdp")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn json(o: &Output, what: &str) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {}", text(o)))
}

/// Where the SDKs are installed, after `scripts/sdk-deps` put them there (a
/// no-op when they already are); `None` when a package registry cannot be
/// reached.
fn sdk_deps() -> Option<PathBuf> {
    let dir = std::env::var_os("CDP_SDK_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("cdp-sdk-deps"));
    eprintln!("installing the SDKs into {} (scripts/sdk-deps)", dir.display());
    let out =
        Command::new("bash").arg(repo().join("scripts/sdk-deps")).arg(&dir).output().expect("run scripts/sdk-deps");
    match out.status.code() {
        Some(0) => {
            eprint!("{}", text(&out));
            Some(dir)
        }
        Some(75) => {
            eprintln!(
                "SKIPPED collector_sdks: a package registry cannot be reached, so the SDKs cannot be installed:\n{}",
                text(&out)
            );
            None
        }
        _ => panic!("scripts/sdk-deps {} failed ({}):\n{}", dir.display(), out.status, text(&out)),
    }
}

/// A temp dir laid out like the repository for the quickstart manifest:
/// `cdp.yaml` as shipped, the plugins it pins and the example data its
/// loyalty source mounts.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let dist = repo().join("plugins/dist");
    assert!(dist.join("source_csv.wasm").exists(), "{} is missing: run plugins/build.sh", dist.display());
    copy_dir(&dist, &dir.path().join("plugins/dist"));
    copy_dir(&repo().join("examples/quickstart"), &dir.path().join("examples/quickstart"));
    std::fs::create_dir_all(dir.path().join("examples/quickstart/out")).expect("out dir");
    std::fs::copy(repo().join("cdp.yaml"), dir.path().join("cdp.yaml")).expect("copy cdp.yaml");
    std::fs::create_dir_all(dir.path().join("senders")).expect("senders dir");
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
        }
    }
}

struct Runtime {
    child: Child,
    log: PathBuf,
}

impl Runtime {
    fn start(dir: &Path) -> Runtime {
        let log = dir.join("run.log");
        let child = Command::new(env!("CARGO_BIN_EXE_cdp"))
            .current_dir(dir)
            .args(["run", "--drain", "10s"])
            .envs(ENV)
            .env("CDP_LOG", "cdp=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start cdp run");
        Runtime { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `f` until it returns `Some` or `limit` passes; shows the runtime's log if it never does.
    fn wait_for<T>(&mut self, limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if let Some(exit) = self.child.try_wait().expect("wait") {
                panic!("cdp run exited with {exit} while waiting for {what}; it logged:\n{}", self.log());
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; cdp run logged:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, then the exit status within `limit`.
    fn stop(mut self, limit: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(start.elapsed() < limit, "cdp run did not stop within {limit:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The person one sender sends as, named after the run's tag and the SDK
/// (the names `tests/sdk/` senders derive from the tag).
struct Person {
    sdk: Sdk,
    /// `TAG-SDK`: the prefix of every value the sender sends.
    name: String,
    user_id: String,
    anonymous_id: String,
    email: String,
    /// `(type, message id)` of each message the sender reported sent.
    sent: Vec<(String, String)>,
}

impl Person {
    fn new(tag: &str, sdk: Sdk) -> Person {
        let name = format!("{tag}-{}", sdk.name);
        Person {
            sdk,
            user_id: format!("{name}-user"),
            anonymous_id: format!("{name}-anon"),
            email: format!("{name}@example.org"),
            name,
            sent: Vec::new(),
        }
    }
}

/// The command that runs `sdk`'s sender with the SDKs installed in `deps`.
fn sender(sdk: Sdk, deps: &Path) -> Command {
    let scripts = repo().join("tests/sdk");
    let mut cmd = if sdk.name == "node" {
        let mut cmd = Command::new("node");
        cmd.arg(scripts.join("send.mjs")).env("CDP_SDK_NODE_DIR", deps.join("node"));
        cmd
    } else {
        let mut cmd = Command::new(deps.join("venv/bin/python"));
        cmd.arg(scripts.join(format!("send_{}.py", sdk.name)));
        cmd
    };
    // Loopback never goes through a proxy the environment may name.
    cmd.env("NO_PROXY", "127.0.0.1,localhost").env("no_proxy", "127.0.0.1,localhost");
    cmd
}

/// What a sender run printed and how it ended (`None`: killed at the limit).
struct SenderRun {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl SenderRun {
    /// `(type, message id)` of each `sent TYPE ID` line.
    fn sent(&self) -> Vec<(String, String)> {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("sent "))
            .filter_map(|rest| rest.split_once(' '))
            .map(|(kind, id)| (kind.to_owned(), id.trim().to_owned()))
            .collect()
    }

    fn show(&self) -> String {
        format!("exit {:?}\nstdout:\n{}\nstderr:\n{}", self.status, self.stdout, self.stderr)
    }
}

/// Runs a sender against `url` with `key` and `tag`, in `dir` (a clean
/// directory: rudder-sdk-python reads a `.env` file on import), its output in
/// `dir/NAME.out` and `NAME.err`, killing it after `limit`.
fn run_sender(mut cmd: Command, dir: &Path, name: &str, [url, key, tag]: [&str; 3], limit: Duration) -> SenderRun {
    let stdout_path = dir.join(format!("{name}.out"));
    let stderr_path = dir.join(format!("{name}.err"));
    cmd.args([url, key, tag])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => panic!("start {cmd:?}: {e}"),
    };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    SenderRun { status, stdout: read(&stdout_path), stderr: read(&stderr_path) }
}

/// Message id → the `cdp export records` line of every record of the `web` source.
fn web_records(dir: &Path) -> HashMap<String, Value> {
    let out = cdp(dir, &["export", "records", "--quiet"]);
    assert!(out.status.success(), "cdp export records: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("export line is not JSON ({e}): {l}")))
        .filter(|r| r["source"] == "web")
        .map(|r| (r["message_id"].as_str().unwrap_or_default().to_owned(), r))
        .collect()
}

/// The `web` records once every message `people` sent is among them; within
/// 30 seconds, or a panic naming the missing ones.
fn stored(dir: &Path, people: &[Person], rt: &Runtime) -> HashMap<String, Value> {
    let start = Instant::now();
    loop {
        let records = web_records(dir);
        let missing: Vec<String> = people
            .iter()
            .flat_map(|p| p.sent.iter().map(move |(kind, id)| (p.sdk.name, kind, id)))
            .filter(|(_, _, id)| !records.contains_key(*id))
            .map(|(sdk, kind, id)| format!("{sdk} {kind} {id}"))
            .collect();
        if missing.is_empty() {
            return records;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "delivered but not stored (a message the quickstart's `sources.web.map` cannot place is \
             rejected: `userId`-only messages and `alias` need an identity key for `userId`):\n  {}\n\
             cdp run logged:\n{}",
            missing.join("\n  "),
            rt.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `(type, value)` of each identity of a golden record.
fn identities(golden: &Value) -> BTreeSet<(String, String)> {
    golden["identities"]
        .as_array()
        .unwrap_or_else(|| panic!("no identities: {golden:#}"))
        .iter()
        .map(|i| (i["type"].as_str().unwrap_or("").to_owned(), i["value"].as_str().unwrap_or("").to_owned()))
        .collect()
}

/// The event of the golden record named `name` whose message id is one `person` sent.
fn event<'g>(golden: &'g Value, person: &Person, name: &str) -> &'g Value {
    golden["events"]
        .as_array()
        .and_then(|events| {
            events
                .iter()
                .find(|e| e["name"] == name && person.sent.iter().any(|(_, id)| e["message_id"] == id.as_str()))
        })
        .unwrap_or_else(|| {
            panic!("{}: no `{name}` event of {} in the profile: {golden:#}", person.sdk.name, person.name)
        })
}

/// Asserts the golden record of `person` (by email, through the CLI) joins
/// their ids and holds their traits and events; returns it.
fn check_profile(dir: &Path, person: &Person) -> Value {
    let sdk = person.sdk.name;
    let out = cdp(dir, &["profile", "get", &format!("email={}", person.email), "--format", "json"]);
    assert!(
        out.status.success(),
        "{sdk}: no profile has email {}: {}\n(the identify carries it in `traits.email`; rudder-sdk-python \
         sends identify traits as `context.traits`, which the collector must read as `traits`)",
        person.email,
        text(&out)
    );
    let golden = json(&out, "cdp profile get");

    let ids = identities(&golden);
    assert!(ids.contains(&("email".to_owned(), person.email.clone())), "{sdk}: email missing: {golden:#}");
    assert!(
        ids.contains(&("anonymous_id".to_owned(), person.anonymous_id.clone())),
        "{sdk}: the anonymous id is not joined to the email: {golden:#}"
    );
    assert!(
        ids.iter().any(|(_, v)| *v == person.user_id),
        "{sdk}: the user id `{}` is not an identity of the profile (the quickstart's `sources.web.map` \
         needs an identity key for `userId`): {golden:#}",
        person.user_id
    );

    assert_eq!(golden["traits"]["first_name"]["value"], "Ada", "{sdk}: {golden:#}");
    assert_eq!(golden["traits"]["last_name"]["value"], person.sdk.last_name, "{sdk}: {golden:#}");
    assert_eq!(golden["traits"]["first_name"]["source"], "web", "{sdk}: {golden:#}");

    // The anonymous browsing before the identify is on the profile too.
    let viewed = event(&golden, person, "product_viewed");
    assert_eq!(viewed["properties"]["sku"], format!("{}-sku", person.name), "{sdk}: {viewed:#}");
    let order = event(&golden, person, "order_completed");
    assert_eq!(order["properties"]["order_id"], format!("{}-o1", person.name), "{sdk}: {order:#}");
    assert_eq!(order["properties"]["revenue"].as_f64(), Some(129.5), "{sdk}: {order:#}");
    assert_eq!(order["source"], "web", "{sdk}: {order:#}");
    assert_eq!(golden["computed"]["lifetime_value"].as_f64(), Some(129.5), "{sdk}: {golden:#}");
    golden
}

/// `GET url` with an optional bearer token: the status and the body.
fn admin_get(rt: &tokio::runtime::Runtime, url: &str, token: Option<&str>) -> (u16, String) {
    rt.block_on(async {
        let client =
            reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().expect("http client");
        let mut request = client.get(url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}"));
        (status, body)
    })
}

#[test]
fn real_sdks_deliver_every_event_and_the_admin_api_shows_the_profile_the_cli_shows() {
    let Some(deps) = sdk_deps() else { return };
    let dir = workspace();
    let senders = dir.path().join("senders");
    let mut rt = Runtime::start(dir.path());

    // `cdp run` binds port 0; `cdp status` tells which port it got.
    let listen = rt.wait_for(Duration::from_secs(60), "`runtime.listen` in `cdp status`", || {
        let out = cdp(dir.path(), &["status", "--format", "json"]);
        if !out.status.success() {
            return None;
        }
        json(&out, "cdp status")["runtime"]["listen"].as_str().map(str::to_owned)
    });
    let url = format!("http://{listen}");
    eprintln!("cdp run listens on {url}");

    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() % 1_000_000_000;
    let tag = format!("t{}x{stamp}", std::process::id());
    let mut people: Vec<Person> = SDKS.iter().map(|&sdk| Person::new(&tag, sdk)).collect();
    for person in &mut people {
        let sdk = person.sdk.name;
        let run = run_sender(sender(person.sdk, &deps), &senders, sdk, [&url, WRITE_KEY, &tag], SENDER_LIMIT);
        assert!(
            run.status.is_some_and(|s| s.success()),
            "the {sdk} sender failed (an SDK delivery error, or no answer within {SENDER_LIMIT:?}):\n{}\ncdp run logged:\n{}",
            run.show(),
            rt.log()
        );
        person.sent = run.sent();
        let mut kinds: Vec<&str> = person.sent.iter().map(|(k, _)| k.as_str()).collect();
        kinds.sort_unstable();
        assert_eq!(kinds, ["alias", "identify", "page", "track", "track"], "{sdk}:\n{}", run.show());
        assert!(run.stdout.contains("delivered 5"), "{sdk}:\n{}", run.show());
        eprintln!("{sdk}: 5 messages delivered");
    }

    // Every message is stored: the collector answered 200 only once it was
    // (a few seconds are allowed for the profile side of the write).
    let records = stored(dir.path(), &people, &rt);

    let http = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    for person in &people {
        let sdk = person.sdk.name;
        let golden = check_profile(dir.path(), person);
        // Each message, the alias and the user-id-only order included, is a
        // record of this profile.
        for (kind, id) in &person.sent {
            let record = &records[id];
            assert_eq!(
                record["profile_id"], golden["profile_id"],
                "{sdk}: the {kind} {id} is stored on another profile: {record:#}"
            );
        }

        let path = format!("{url}/admin/v1/profiles/email/{}", person.email);
        let (status, body) = admin_get(&http, &path, Some(ADMIN_TOKEN));
        assert_eq!(status, 200, "{sdk}: GET {path}: {body}");
        let admin: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{sdk}: GET {path} is not JSON ({e}): {body}"));
        for field in ["profile_id", "identities", "traits"] {
            assert_eq!(admin[field], golden[field], "{sdk}: `{field}` of GET {path} differs from `cdp profile get`");
        }
        let (status, body) = admin_get(&http, &path, None);
        assert!(matches!(status, 401 | 403), "{sdk}: GET {path} without a token answered {status}: {body}");
        eprintln!("{sdk}: profile {} checked through the CLI and the admin API", golden["profile_id"]);
    }

    // A wrong write key is refused, and the SDK says so: its sender fails and
    // nothing it sent is stored.
    let wrong_tag = format!("{tag}-wrong");
    let args = [url.as_str(), "not-the-write-key", wrong_tag.as_str()];
    let run = run_sender(sender(SDKS[0], &deps), &senders, "wrong-key", args, SENDER_LIMIT);
    assert!(run.status.is_some_and(|s| !s.success()), "a sender with a wrong write key did not fail:\n{}", run.show());
    let records = web_records(dir.path());
    for (kind, id) in run.sent() {
        assert!(!records.contains_key(&id), "the {kind} {id} sent with a wrong write key was stored");
    }

    let exit = rt.stop(Duration::from_secs(30));
    assert!(exit.success(), "cdp run exited with {exit}");
}
