//! Command-line interface: argument parsing and dispatch only. Each command
//! lives in its own file and returns an exit code; `main` maps errors to the
//! codes of the CLI contract (see README).

mod validate;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// cdp: a customer data platform run from one YAML manifest in git.
#[derive(Debug, Parser)]
#[command(name = "cdp", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a manifest: syntax, schema and semantic rules, all at once, offline.
    Validate {
        /// The manifest file (`-` reads standard input).
        #[arg(short = 'f', long = "file", default_value = "cdp.yaml")]
        file: PathBuf,
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
    /// Benchmarks, each next to a baseline measured in the same run.
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Validate a generated manifest; compare with a bare YAML scan; time hostile inputs.
    Validate {
        /// Lines of the generated manifest.
        #[arg(long, default_value_t = 5_000)]
        lines: usize,
        /// Runs per measurement (the median is shown).
        #[arg(long, default_value_t = 11)]
        runs: usize,
    },
}

/// Output formats of `validate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Source lines with carets, for people.
    Human,
    /// `{"valid": bool, "diagnostics": [...]}`.
    Json,
    /// GitHub Actions annotations (`::error file=…,line=…::…`).
    Github,
}

/// Parses arguments and runs the command.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { file, format } => validate::run(&file, format),
        Command::Bench(Bench::Validate { lines, runs }) => {
            print!("{}", crate::bench::validate::run(lines, runs));
            ExitCode::SUCCESS
        }
        Command::Schema { markdown } => {
            if markdown {
                print!("{}", crate::manifest::schema::reference_markdown());
            } else {
                print!("{}", crate::manifest::schema::schema_text());
            }
            ExitCode::SUCCESS
        }
    }
}
