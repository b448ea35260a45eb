//! The `cdp` binary: a thin shell over the library; see `cli`.

fn main() -> std::process::ExitCode {
    cdp::cli::run()
}
