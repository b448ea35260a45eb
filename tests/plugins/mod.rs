//! Shared by the plugin tests: the real components, built once per test binary.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A shipped connector from `plugins/dist`, built by `plugins/build.sh` when missing.
pub fn shipped(crate_name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = root().join("plugins/dist").join(format!("{crate_name}.wasm"));
    if !path.exists() {
        BUILT.get_or_init(|| {
            let ok = Command::new("bash")
                .arg(root().join("plugins/build.sh"))
                .env("JOBS", "2")
                .status()
                .expect("run plugins/build.sh")
                .success();
            assert!(ok, "plugins/build.sh failed");
        });
    }
    path
}

/// The hostile test guest (`plugins/testing/hostile`), built once per test binary.
pub fn hostile() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| test_guest("test-hostile")).clone()
}

/// The hostile source test guest (`plugins/testing/hostile-source`), built once per test binary.
pub fn hostile_source() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| test_guest("test-hostile-source")).clone()
}

fn test_guest(package: &str) -> PathBuf {
    let ok = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root().join("plugins"))
        .args(["build", "-j2", "--release", "--locked", "--target", "wasm32-wasip2", "-p", package])
        .status()
        .expect("run cargo")
        .success();
    assert!(ok, "building the test guest {package} failed");
    root().join("plugins/target/wasm32-wasip2/release").join(format!("{}.wasm", package.replace('-', "_")))
}

/// One recorded request of [`serve`].
#[derive(Debug, Clone)]
pub struct Seen {
    pub request_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A minimal HTTP/1.1 server on 127.0.0.1 answering every request with
/// `status` and `body`, for at most `max` connections; returns the port and
/// a receiver of what it saw.
pub fn serve(status: u16, body: &'static str, max: usize) -> (u16, std::sync::mpsc::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut headers = Vec::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    headers.push((k.to_ascii_lowercase(), v.trim().to_owned()));
                }
            }
            let mut received = vec![0; len];
            let _ = reader.read_exact(&mut received);
            let _ = tx.send(Seen { request_line: request_line.trim_end().to_owned(), headers, body: received });
            let reply = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    (port, rx)
}
