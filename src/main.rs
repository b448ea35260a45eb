//! The `cdp` binary: a thin shell over the library; see `cli`.

// Ingest allocates and frees many small strings per record (bind parameters,
// JSON payloads); mimalloc handles that churn far better than the system
// allocator (measured with `cdp bench ingest`). Its `override` feature also
// gives it C's `malloc`, so the bundled SQLite allocates from it too (~5 %
// of `bench ingest`'s time went to the C library's allocator). It is built
// without transparent huge pages (`no_thp`): with them, memory it purged and
// took back was faulted in 2 MiB at a time, each zeroed by the kernel — a
// quarter of the mapping thread's time in a CRM ingest, ~10 % of its wall time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cdp::cli::run()
}
