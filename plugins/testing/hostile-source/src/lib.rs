//! # test-hostile-source
//!
//! A cdp source connector that misbehaves on request: returns more than the
//! host accepts from one call, spins, or traps. The host's integration tests load it to prove that a
//! source's output is bounded on the host side. It is not shipped.
//!
//! ```yaml
//! sources:
//!   hostile:
//!     plugin: hostile-source
//!     config: { behave: checkpoint, size: 16777216 }
//! ```
//!
//! The first `next` does what `behave` says; the second returns nothing
//! (done). `spec` computes for [`SLOW_SPEC`] first, so a test can show that
//! a short deadline applies to `spec` too.

use std::hint::black_box;
use std::time::{Duration, Instant};

use cdp_plugin_sdk::{ConnectorError, ReadEvent, Records, Source, SourceReader, Spec};
use serde::Deserialize;
use serde_json::{Value, json};

/// What the first `next` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behave {
    /// One record, then a checkpoint padded to `size` bytes.
    Checkpoint,
    /// Records of about 1 KiB each, `size` bytes in all.
    Records,
    /// Loop forever without yielding (the call's deadline must stop it).
    Spin,
    /// Execute the wasm `unreachable` instruction.
    Trap,
}

/// The `config:` of the hostile source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub behave: Behave,
    /// Bytes of the checkpoint or of the records (default 16 MiB).
    #[serde(default)]
    pub size: Option<u32>,
}

/// How long `spec` computes before it answers.
pub const SLOW_SPEC: Duration = Duration::from_millis(300);

/// The source.
pub struct HostileSource;

impl Source for HostileSource {
    type Config = Config;
    type Reader = Reader;

    fn spec() -> Spec {
        let start = Instant::now();
        let mut x: u64 = 1;
        while start.elapsed() < SLOW_SPEC {
            x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        black_box(x);
        Spec::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
            .description("Test source that returns oversized checkpoints or batches on request")
            .config_schema(json!({
                "type": "object",
                "required": ["behave"],
                "additionalProperties": false,
                "properties": {
                    "behave": {"type": "string", "enum": ["checkpoint", "records", "spin", "trap"]},
                    "size": {"type": "integer", "minimum": 0, "maximum": u32::MAX, "default": 16 << 20}
                }
            }))
    }

    fn check(_cfg: &Config) -> Result<(), ConnectorError> {
        Ok(())
    }

    fn open(cfg: Config, _state: Option<Value>) -> Result<Reader, ConnectorError> {
        Ok(Reader { cfg, done: false })
    }
}

/// An open read.
pub struct Reader {
    cfg: Config,
    done: bool,
}

impl SourceReader for Reader {
    fn next(&mut self, _max: u32) -> Result<Vec<ReadEvent>, ConnectorError> {
        if std::mem::replace(&mut self.done, true) {
            return Ok(Vec::new());
        }
        let size = self.cfg.size.unwrap_or(16 << 20) as usize;
        let mut records = Records::new();
        match self.cfg.behave {
            Behave::Checkpoint => {
                records.push(&json!({"identities": {"email": "a@example.org"}}))?;
                let pad = "p".repeat(size);
                Ok(vec![
                    ReadEvent::records(records),
                    ReadEvent::checkpoint(json!({ "pad": pad })),
                ])
            }
            Behave::Records => {
                let pad = "r".repeat(1000);
                for n in 0..size.div_ceil(1024) {
                    records
                        .push(&json!({"identities": {"email": format!("{n}@example.org")}, "traits": {"pad": pad}}))?;
                }
                Ok(vec![ReadEvent::records(records)])
            }
            Behave::Spin => {
                let mut x: u64 = 1;
                loop {
                    x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
                }
            }
            Behave::Trap => trap(),
        }
    }
}

#[cfg(target_arch = "wasm32")]
fn trap() -> ! {
    core::arch::wasm32::unreachable()
}

#[cfg(not(target_arch = "wasm32"))]
fn trap() -> ! {
    panic!("trap")
}

cdp_plugin_sdk::export_source!(HostileSource);
