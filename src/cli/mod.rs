//! Command-line interface: argument parsing and dispatch only. Each command
//! lives in its own file; `run` maps results to the exit codes of the CLI
//! contract (see README) and prints error chains.

/// `println!` that returns the write error instead of panicking, so a reader
/// that goes away (`cdp … | head`) ends the command quietly (see [`run`]).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)?
    }};
}

/// `print!` counterpart of [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($arg)*)?
    }};
}

mod activation;
mod audit;
mod export;
mod ingest;
mod plan;
mod plugin;
mod privacy;
mod profile;
mod render;
mod run;
pub mod schema;
mod test;
mod validate;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// cdp: a customer data platform run from one YAML manifest in git.
#[derive(Debug, Parser)]
#[command(name = "cdp", version, about, long_about = None)]
pub struct Cli {
    /// The manifest file (`-` reads standard input, for `validate`).
    #[arg(short = 'f', long = "manifest", global = true, default_value = "cdp.yaml")]
    pub file: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a manifest: syntax, schema and semantic rules, all at once, offline.
    Validate {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Print the manifest's JSON Schema (or its Markdown field reference).
    Schema {
        /// Print the field reference as Markdown instead (the README embeds it).
        #[arg(long)]
        markdown: bool,
    },
    /// Load records from a JSON Lines or CSV file as if SOURCE had produced them.
    Ingest {
        /// The source (from `sources`) whose mapping applies.
        source: String,
        /// The input file: `.csv` with a header row, anything else JSON Lines.
        #[arg(long = "file", short = 'i')]
        input: PathBuf,
        /// The largest batch, in records per transaction (batches start at 10,000 and double up to it);
        /// default 100,000 on SQLite, 20,000 on PostgreSQL.
        #[arg(long)]
        batch: Option<usize>,
        /// Skip the lines a previous ingest of this file already committed.
        #[arg(long)]
        resume: bool,
        /// Write every rejected line (number and reason) to this JSON Lines file.
        #[arg(long)]
        rejects: Option<PathBuf>,
        /// No progress bar or summary.
        #[arg(long, short)]
        quiet: bool,
        /// Skip probabilistic matching after the ingest.
        #[arg(long)]
        no_match: bool,
        /// Exit 3 when more lines than this are rejected: a count (`100`) or a percentage of the lines read (`2%`).
        #[arg(long, value_name = "N|P%")]
        max_rejects: Option<ingest::RejectLimit>,
    },
    /// Probabilistic matching over all profiles (`identity.match`); links above the threshold.
    Match,
    /// Stream golden records or ingested records out in bulk (JSON Lines or CSV).
    #[command(subcommand)]
    Export(ExportCmd),
    /// The runtime: runs every plugin source on its schedule or continuously, reloads the
    /// manifest when it changes, drains on SIGINT/SIGTERM.
    Run {
        /// How long in-flight batches may take to finish on shutdown, e.g. `30s`.
        #[arg(long, default_value = "30s")]
        drain: String,
        /// Serve HTTP (collector, admin API, metrics) on HOST:PORT instead of `server.listen`;
        /// port 0 picks a free port (`cdp status` shows it).
        #[arg(long, env = "CDP_LISTEN", value_name = "HOST:PORT")]
        listen: Option<String>,
    },
    /// Run one source sync now, through the same code `cdp run` uses; `cdp sync resume NAME`
    /// releases a destination the shrink guard paused.
    #[command(args_conflicts_with_subcommands = true)]
    Sync {
        #[command(subcommand)]
        action: Option<SyncCmd>,
        /// The source (from `sources`, one that runs a plugin).
        name: Option<String>,
        /// Ignore the stored checkpoint and read everything again (stored records are skipped).
        #[arg(long)]
        full: bool,
    },
    /// A person's rights: export everything held about them, erase them everywhere, suppress them.
    #[command(subcommand)]
    Privacy(PrivacyCmd),
    /// Audiences: size, mode, recent entries and exits, members.
    #[command(subcommand)]
    Audience(AudienceCmd),
    /// The dead-letter store: deliveries that failed for good, and replaying them.
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// What applying the manifest would change, against the manifest applied to the store, and
    /// what it would do to the data. Exit 0 no change, 2 changes, 1 error.
    Plan {
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
    },
    /// Run fixture files (given records per source → expected profiles, audience members,
    /// consent) against a scratch store. Exit 0 all passed, 1 a mismatch.
    Test {
        /// Directory of fixture files (default: tests/cdp beside the manifest).
        dir: Option<PathBuf>,
    },
    /// Every sync's state, last and next run, last error; the applied manifest; the last reload.
    Status {
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
    },
    /// Golden records: look up, explain and split profiles (each appends an audit row).
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// The audit log: who read personal data or changed state, when, and the outcome; oldest first.
    Audit {
        /// Rows at or after this time: RFC 3339, a date (`2026-12-01`), or how long ago (`24h`, `7d`).
        #[arg(long, value_name = "T")]
        since: Option<audit::Since>,
        /// At most this many rows.
        #[arg(long, default_value_t = audit::DEFAULT_LIMIT, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
    },
    /// Connector plugins: scaffold, build, inspect and test them.
    #[command(subcommand)]
    Plugin(PluginCmd),
    /// Benchmarks, each next to a baseline measured in the same run.
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Debug, Subcommand)]
pub enum PluginCmd {
    /// Scaffold a connector crate that builds and passes `cdp plugin test` as is.
    New {
        /// Crate name, e.g. `source-members` or `dest-crm`.
        name: String,
        #[arg(long, value_enum)]
        kind: KindArg,
        /// Where to create it (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The cdp-plugin-sdk crate (default: $CDP_SDK_PATH, else this cdp's plugins/sdk).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Build a plugin crate for wasm32-wasip2 and print its manifest pin.
    Build {
        /// The plugin crate.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// A debug build instead of release.
        #[arg(long)]
        debug: bool,
        /// Deadline of the call into the built plugin (`spec`), e.g. `5s` (default 30s).
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Show a component's spec, capabilities, imports and config schema.
    Inspect {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
        /// Deadline of the call into the plugin (`spec`), e.g. `5s` (default 30s).
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Run the conformance suite against a component, in the sandbox.
    Test {
        file: PathBuf,
        /// The plugin's config: JSON or YAML text, or @FILE.
        #[arg(long)]
        config: Option<String>,
        /// records.jsonl / deletes.jsonl (destinations), expected.jsonl (sources).
        #[arg(long)]
        fixtures: Option<PathBuf>,
        /// Lend a directory: HOST_DIR:GUEST_PATH (read-only for sources, writable for destinations).
        #[arg(long = "mount")]
        mounts: Vec<String>,
        /// A host the plugin may reach (`host`, `host:port`, `*.domain`, an address).
        #[arg(long = "allow-host")]
        allow_hosts: Vec<String>,
        /// Deadline of each call, e.g. `5s` (default 30s).
        #[arg(long)]
        timeout: Option<String>,
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
    },
}

/// Connector kinds on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    Source,
    Destination,
}

#[derive(Debug, Subcommand)]
pub enum ProfileCmd {
    /// The golden record: identifiers, traits with provenance, consent, audiences, recent events.
    Get {
        /// An identifier of the person, e.g. `email=ada@example.org`.
        key_value: String,
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
        /// How many recent events to show.
        #[arg(long, default_value_t = 20)]
        events: usize,
    },
    /// Why these identifiers were joined: the records and rules behind each.
    Explain {
        key_value: String,
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
    },
    /// Split one identifier off its profile for good (recorded in the ledger).
    Unmerge { key_value: String },
}

#[derive(Debug, Subcommand)]
pub enum PrivacyCmd {
    /// Everything held about the person, across their whole identity graph, as one JSON
    /// document.
    Export {
        key_value: String,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Erase the person from every table (keyed-hash tombstones stay so nothing re-creates
    /// them) and from every destination whose plugin can delete.
    Delete { key_value: String },
    /// Privacy requests and, for erasures, each destination's receipt.
    Status {
        id: Option<i64>,
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
    },
    /// Stop collecting and activating for the person without erasing them.
    Suppress { key_value: String },
    /// Lift a suppression.
    Unsuppress { key_value: String },
}

#[derive(Debug, Subcommand)]
pub enum SyncCmd {
    /// Release a destination the shrink guard paused: its held-back changes are sent.
    Resume {
        /// The destination (from `destinations`).
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AudienceCmd {
    /// Every audience: mode, members, entries and exits in the last 24 h, last evaluation.
    List {
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
    },
    /// One audience: its rule, size, recent changes and destinations; `--members` lists
    /// members (appends an audit row).
    Show {
        name: String,
        #[arg(long)]
        members: bool,
        /// At most this many members.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// Dead letters, oldest first, with the reason each failed.
    List {
        #[arg(long)]
        destination: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
        format: ReportFormat,
    },
    /// Queue dead letters again (same idempotency keys); consent and supersession are
    /// checked again when they are sent.
    Replay {
        #[arg(long)]
        destination: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ExportCmd {
    /// Golden records: identities, traits, computed traits, consent, audiences, entities.
    Profiles(ExportArgs),
    /// Every ingested record: source, message id, observed time, kind, profile id, anchor identifier.
    Records(ExportArgs),
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[arg(long, value_enum, default_value_t = export::ExportFormat::Jsonl)]
    format: export::ExportFormat,
    /// Write here (replaced only when the export completes) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar or summary.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Erase people from a populated store (every table, tombstones), next to plain SQL
    /// deletes of the same rows.
    Erase {
        /// Records in the store.
        #[arg(long, default_value_t = 1_000_000)]
        records: usize,
        /// People erased.
        #[arg(long, default_value_t = 10_000)]
        people: usize,
    },
    /// Time from the collector's acknowledgement to the webhook delivery it causes, at a
    /// steady rate, through a real `cdp run`.
    Activation {
        /// Events per second.
        #[arg(long, default_value_t = 1000)]
        rate: usize,
        /// How long to send, in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: usize,
        /// The webhook component (default plugins/dist/dest_webhook.wasm).
        #[arg(long)]
        plugin: Option<PathBuf>,
    },
    /// Ten audiences over every profile of generated customers; compare with the same rules as SQL.
    Audience {
        /// How many customers (one profile each, about 4 records each).
        #[arg(long, default_value_t = 1_000_000)]
        profiles: usize,
        /// Evaluations of each kind, alternating (medians are shown).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Identity accuracy: pairwise precision, recall and F1 against generated ground truth.
    Identity {
        /// How many people (about 12 records each).
        #[arg(long, default_value_t = 10_000)]
        people: usize,
    },
    /// Validate a generated manifest; compare with a bare YAML scan; time hostile inputs.
    Validate {
        /// Lines of the generated manifest.
        #[arg(long, default_value_t = 5_000)]
        lines: usize,
        /// Runs per measurement (the median is shown).
        #[arg(long, default_value_t = 11)]
        runs: usize,
    },
    /// A destination plugin's write path next to the same connector code natively; load and instantiation costs.
    Plugin {
        /// How many records (batches of 1,000).
        #[arg(long, default_value_t = 200_000)]
        records: usize,
        /// Runs of each path, alternating (medians are shown).
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// The dest-file component (default: plugins/dist/dest_file.wasm).
        #[arg(long)]
        plugin: Option<PathBuf>,
    },
    /// `cdp profile get` while `cdp ingest` writes to the same SQLite store, next to the same reads idle.
    Reads {
        /// How many CSV rows the ingest writes.
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        /// Milliseconds between reads.
        #[arg(long, default_value_t = 50)]
        gap_ms: u64,
    },
    /// A CSV file through `cdp sync` (the source-csv plugin, sandboxed) next to `cdp ingest --file`.
    Sync {
        /// How many CSV rows.
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        /// Runs of each path, alternating (medians are shown).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// The source-csv component (default: plugins/dist/source_csv.wasm).
        #[arg(long)]
        plugin: Option<PathBuf>,
    },
    /// Events through the HTTP collector of a real `cdp run` (durable 200s) next to `cdp ingest --file`.
    Collector {
        /// How many events (requests of 100).
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// Concurrent connections of the load generator.
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Runs of each path, alternating (medians are shown).
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Ingest generated records end to end; compare with raw inserts (and COPY) of the same rows.
    Ingest {
        /// How many records.
        #[arg(long, default_value_t = 1_000_000)]
        records: usize,
        /// The largest batch, in records per transaction (as `cdp ingest --batch`; its default per backend).
        #[arg(long)]
        batch: Option<usize>,
        /// Also run on PostgreSQL: a database URL to create a scratch database from.
        #[arg(long)]
        postgres: Option<String>,
        /// Directory for the SQLite files (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Output formats of commands that report (everything but `validate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// For people.
    Human,
    /// Stable JSON (see README).
    Json,
}

/// Output formats of `validate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    Human,
    /// Stable JSON (see README).
    Json,
    /// GitHub Actions annotations.
    Github,
}

/// Parses arguments and runs the command.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    if cli.command.is_short() {
        no_huge_pages();
    }
    let file = cli.file;
    let result = match cli.command {
        Command::Validate { format } => return validate::run(&file, format),
        Command::Schema { markdown } => schema::run(markdown),
        Command::Bench(Bench::Validate { lines, runs }) => {
            print!("{}", crate::bench::validate::run(lines, runs));
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(Bench::Plugin { records, runs, plugin }) => block_on(async {
            out!("{}", crate::bench::plugin::run(records, runs, plugin.as_deref()).await?);
            Ok(ExitCode::SUCCESS)
        }),
        Command::Plugin(cmd) => match cmd {
            PluginCmd::New { name, kind, dir, sdk } => {
                let kind = match kind {
                    KindArg::Source => crate::plugin::Kind::Source,
                    KindArg::Destination => crate::plugin::Kind::Destination,
                };
                plugin::new(&name, kind, dir.as_deref(), sdk.as_deref())
            }
            PluginCmd::Build { dir, debug, timeout } => plugin::build(&dir, debug, &file, timeout.as_deref()),
            PluginCmd::Inspect { file, format, timeout } => plugin::inspect(&file, format, timeout.as_deref()),
            PluginCmd::Test { file, config, fixtures, mounts, allow_hosts, timeout, format } => {
                plugin::test(plugin::TestArgs {
                    file: &file,
                    config: config.as_deref(),
                    fixtures: fixtures.as_deref(),
                    mounts: &mounts,
                    allow_hosts: &allow_hosts,
                    timeout: timeout.as_deref(),
                    format,
                })
            }
        },
        Command::Bench(Bench::Sync { rows, runs, plugin }) => (|| {
            let tmp = tempfile::tempdir()?;
            out!("{}", crate::bench::sync::run(rows, runs, plugin.as_deref(), tmp.path())?);
            Ok(ExitCode::SUCCESS)
        })(),
        Command::Bench(Bench::Reads { rows, gap_ms }) => (|| {
            let tmp = tempfile::tempdir()?;
            let gap = std::time::Duration::from_millis(gap_ms);
            out!("{}", crate::bench::reads::run(rows, gap, tmp.path())?);
            Ok(ExitCode::SUCCESS)
        })(),
        Command::Bench(Bench::Collector { events, connections, runs }) => block_on(async {
            let tmp = tempfile::tempdir()?;
            out!("{}", crate::bench::collector::run(events, connections, runs, tmp.path()).await?);
            Ok(ExitCode::SUCCESS)
        }),
        Command::Bench(Bench::Activation { rate, seconds, plugin }) => block_on(async {
            let tmp = tempfile::tempdir()?;
            out!("{}", crate::bench::activation::run(rate, seconds, plugin.as_deref(), tmp.path()).await?);
            Ok(ExitCode::SUCCESS)
        }),
        Command::Bench(Bench::Erase { records, people }) => block_on(async {
            let tmp = tempfile::tempdir()?;
            out!("{}", crate::bench::erase::run(records, people.max(1), tmp.path()).await?);
            Ok(ExitCode::SUCCESS)
        }),
        Command::Bench(Bench::Audience { profiles, runs }) => block_on(async {
            let tmp = tempfile::tempdir()?;
            out!("{}", crate::bench::audience::run(profiles, runs, tmp.path()).await?);
            Ok(ExitCode::SUCCESS)
        }),
        Command::Bench(Bench::Identity { people }) => block_on(async {
            let tmp = tempfile::tempdir()?;
            out!("{}", crate::bench::identity::run(people, tmp.path()).await?);
            Ok(ExitCode::SUCCESS)
        }),
        Command::Bench(Bench::Ingest { records, batch, postgres, dir }) => block_on(async {
            let tmp = tempfile::tempdir()?;
            let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
            std::fs::create_dir_all(&dir)?;
            out!("{}", crate::bench::ingest::run(records, batch, &dir, postgres.as_deref()).await?);
            Ok(ExitCode::SUCCESS)
        }),
        Command::Ingest { source, input, batch, resume, rejects, quiet, no_match, max_rejects } => block_on(async {
            let s = ingest::run(ingest::Args {
                manifest: &file,
                source: &source,
                file: &input,
                batch,
                resume,
                rejects: rejects.as_deref(),
                quiet,
                run_match: !no_match,
            })
            .await?;
            Ok(match s.over_limit(max_rejects) {
                Some(msg) => {
                    eprintln!("error: {msg}");
                    ExitCode::from(ingest::EXIT_TOO_MANY_REJECTS)
                }
                None => ExitCode::SUCCESS,
            })
        }),
        Command::Match => block_on(async {
            let r = load_manifest(&file)?;
            let (m, base) = (&*r.manifest, r.base.as_path());
            if m.identity.matching.is_none() {
                bail!("the manifest has no `identity.match` section");
            }
            let store = connect(m, base).await?;
            let r = store.match_profiles(m).await?;
            ingest::print_match(&r)?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Export(cmd) => block_on(async {
            let (what, a) = match cmd {
                ExportCmd::Profiles(a) => (export::What::Profiles, a),
                ExportCmd::Records(a) => (export::What::Records, a),
            };
            let args = export::Args { manifest: &file, what, format: a.format, out: a.out.as_deref(), quiet: a.quiet };
            export::run(args).await.map(|_| ExitCode::SUCCESS)
        }),
        Command::Run { drain, listen } => block_on(async {
            let drain = crate::manifest::units::parse_duration(&drain).map_err(|e| anyhow::anyhow!("--drain: {e}"))?;
            run::run(&file, drain, listen).await
        }),
        Command::Sync { action: Some(SyncCmd::Resume { name }), .. } => block_on(activation::resume(&file, &name)),
        Command::Sync { action: None, name: Some(name), full } => block_on(run::sync(&file, &name, full)),
        Command::Sync { action: None, name: None, .. } => {
            Err(anyhow::anyhow!("name the source to sync: `cdp sync NAME` (or `cdp sync resume DESTINATION`)"))
        }
        Command::Privacy(cmd) => block_on(async {
            match cmd {
                PrivacyCmd::Export { key_value, out } => privacy::export(&file, &key_value, out.as_deref()).await,
                PrivacyCmd::Delete { key_value } => privacy::delete(&file, &key_value).await,
                PrivacyCmd::Status { id, format } => privacy::status(&file, id, format).await,
                PrivacyCmd::Suppress { key_value } => privacy::suppress(&file, &key_value, true).await,
                PrivacyCmd::Unsuppress { key_value } => privacy::suppress(&file, &key_value, false).await,
            }
        }),
        Command::Audience(AudienceCmd::List { format }) => block_on(activation::list(&file, format)),
        Command::Audience(AudienceCmd::Show { name, members, limit, format }) => {
            block_on(activation::show(&file, &name, members, limit, format))
        }
        Command::Dlq(DlqCmd::List { destination, limit, format }) => {
            block_on(activation::dlq_list(&file, destination.as_deref(), limit, format))
        }
        Command::Dlq(DlqCmd::Replay { destination }) => block_on(activation::dlq_replay(&file, destination.as_deref())),
        Command::Status { format } => block_on(run::status(&file, format)),
        Command::Plan { format } => block_on(plan::run(&file, format)),
        Command::Test { dir } => block_on(test::run(&file, dir.as_deref())),
        Command::Audit { since, limit, format } => block_on(audit::run(&file, since, limit, format)),
        // Reading one profile is a few queries: one thread runs them, with
        // no hand-overs between worker threads to wait for a busy core.
        Command::Profile(cmd) => block_on_one_thread(async {
            match cmd {
                ProfileCmd::Get { key_value, format, events } => profile::get(&file, &key_value, format, events).await,
                ProfileCmd::Explain { key_value, format } => profile::explain(&file, &key_value, format).await,
                ProfileCmd::Unmerge { key_value } => profile::unmerge(&file, &key_value).await,
            }
        }),
    };
    match result {
        Ok(code) => code,
        // The reader of standard output went away (`| head`): nothing is left to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(1)
        }
    }
}

/// Whether an error is a write to a closed pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CDP_LOG").unwrap_or_else(|_| "warn".into());
    // Colour only on a terminal: logs piped to a file or CI stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

fn block_on<F: std::future::Future<Output = Result<ExitCode>>>(f: F) -> Result<ExitCode> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(f)
}

impl Command {
    /// A command that reads a little and ends: started often (by scripts,
    /// CI, an operator), so its start-up cost is most of what it costs.
    fn is_short(&self) -> bool {
        matches!(
            self,
            Command::Validate { .. }
                | Command::Schema { .. }
                | Command::Plan { .. }
                | Command::Status { .. }
                | Command::Profile(_)
                | Command::Audience(_)
                | Command::Dlq(_)
                | Command::Audit { .. }
        )
    }
}

/// Keeps this process off transparent huge pages: a short command touches
/// a few MiB, and the kernel zeroes a whole 2 MiB page at the first touch
/// of each huge page the allocator's arenas ask for (a quarter of
/// `cdp profile get`'s CPU time). Long-running commands keep them.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: `PR_SET_THP_DISABLE` takes integers and touches no memory of
    // this process; it only marks the address space for later page faults.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// [`block_on`] for a short command that does little besides waiting for the store.
fn block_on_one_thread<F: std::future::Future<Output = Result<ExitCode>>>(f: F) -> Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

/// Resolves the manifest for a command that acts on it: errors stop the
/// command, with the same diagnostics `validate` prints.
pub(crate) fn load_manifest(path: &Path) -> Result<crate::resolved::Resolved> {
    use crate::resolved::ResolveError;
    let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    match crate::resolved::resolve_file(path, &crate::manifest::Options::validate(&base)) {
        Ok(r) => Ok(r),
        Err(e @ ResolveError::Read { .. }) => Err(e.into()),
        Err(e @ ResolveError::Invalid { .. }) => {
            eprint!("{}", render::load_error(&e));
            bail!("{} is invalid; fix it (see `cdp validate`) and run again", path.display());
        }
    }
}

/// Opens the manifest's store.
pub(crate) async fn connect(m: &crate::manifest::Manifest, base: &Path) -> Result<crate::store::Store> {
    connect_with_readers(m, base, 4).await
}

/// Opens the manifest's store for a command that reads one thing after
/// another on one thread ([`block_on_one_thread`]): one reading connection.
pub(crate) async fn connect_one_reader(m: &crate::manifest::Manifest, base: &Path) -> Result<crate::store::Store> {
    connect_with_readers(m, base, 1).await
}

async fn connect_with_readers(m: &crate::manifest::Manifest, base: &Path, readers: u32) -> Result<crate::store::Store> {
    if crate::manifest::env::is_reference(&m.storage.url) {
        bail!("storage.url needs an environment variable that is not set: {}", m.storage.url);
    }
    crate::store::Store::connect_with_readers(&m.storage.url, base, readers)
        .await
        .with_context(|| format!("cannot open the store at {}", m.storage.url))
}

/// Opens the store a manifest file names, reading only `storage.url` from
/// its YAML: for commands that read the store whatever state the rest of the
/// file is in (`status` after a failed reload, `audit`). Returns the store
/// and the directory relative paths resolve against.
pub(crate) async fn connect_file(path: &Path) -> Result<(crate::store::Store, PathBuf)> {
    use crate::manifest;
    let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let Some(doc) = manifest::yaml::parse(&text).value else {
        bail!("cannot read `storage.url` from {}: fix its YAML syntax (see `cdp validate`)", path.display());
    };
    let url = match doc.pointer("/storage/url") {
        None => manifest::types::Storage::default().url,
        Some(serde_json::Value::String(u)) => u.clone(),
        Some(_) => bail!("`storage.url` in {} is not a string (see `cdp validate`)", path.display()),
    };
    if manifest::env::is_reference(&url) {
        bail!("storage.url needs an environment variable that is not set: {url}");
    }
    let store =
        crate::store::Store::connect(&url, &base).await.with_context(|| format!("cannot open the store at {url}"))?;
    Ok((store, base))
}

/// Records the manifest file as the one applied to `store` (`cdp ingest`
/// applies it as much as `cdp run` does: `cdp plan` compares with it).
pub(crate) async fn record_applied(store: &crate::store::Store, path: &Path, by: &str) -> Result<()> {
    use sha2::Digest;
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let sha = hex::encode(sha2::Sha256::digest(text.as_bytes()));
    store.record_manifest(&sha, &text, by).await?;
    Ok(())
}
