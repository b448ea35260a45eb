//! A `cdp run` of the real binary on a free loopback port, for the tests that
//! talk to its server: started in a directory with the environment its
//! manifest needs, ready once `cdp status` shows it listening.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

static STARTS: AtomicUsize = AtomicUsize::new(0);

pub struct CdpRun {
    child: Child,
    log: PathBuf,
    /// `http://127.0.0.1:PORT` (or `https://…` with TLS).
    pub base: String,
}

impl CdpRun {
    /// Starts `cdp run` in `dir` with `env`; its log goes to `run-N.log` there.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> CdpRun {
        let log = dir.join(format!("run-{}.log", STARTS.fetch_add(1, Ordering::SeqCst)));
        let child = Command::new(env!("CARGO_BIN_EXE_cdp"))
            .current_dir(dir)
            .args(["run", "--drain", "10s", "--listen", "127.0.0.1:0"])
            .envs(env.iter().copied())
            .env("CDP_LOG", "cdp=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start cdp run");
        let mut r = CdpRun { child, log, base: String::new() };
        let started = Instant::now();
        loop {
            let out = Command::new(env!("CARGO_BIN_EXE_cdp"))
                .current_dir(dir)
                .args(["status", "--format", "json"])
                .envs(env.iter().copied())
                .output()
                .expect("cdp status");
            if out.status.success()
                && let Ok(doc) = serde_json::from_slice::<Value>(&out.stdout)
                && doc["runtime"]["pid"] == r.child.id()
                && let Some(listen) = doc["runtime"]["listen"].as_str()
            {
                r.base = format!("{}://{listen}", doc["runtime"]["scheme"].as_str().unwrap_or("http"));
                return r;
            }
            assert!(r.child.try_wait().expect("wait").is_none(), "cdp run exited:\n{}", r.log());
            assert!(started.elapsed() < Duration::from_secs(60), "cdp run did not come up:\n{}", r.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `done` until it holds or `timeout` passes; shows the log if it never does.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < timeout, "timed out waiting for {what}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL.
    pub fn kill(self) {}

    /// SIGTERM; the process must exit 0.
    pub fn stop(mut self) {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "cdp run did not stop cleanly: {status:?}\n{}", self.log());
    }
}

/// A test that fails (or ends) without stopping it leaves no process behind.
impl Drop for CdpRun {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
