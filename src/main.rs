//! `sgw`: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than glibc's malloc: at 64 callers glibc's allocator took about
/// a fifth of the gateway's CPU (fastbin consolidation, chunk unlinking across
/// threads); with mimalloc a durably audited GetRecord costs about a fifth less
/// CPU and the bench's throughput rose by a quarter (benches/README.md). Built
/// without transparent huge pages, which had doubled the resident set.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = sgw::cli::Cli::parse();
    match sgw::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sgw: {}", sgw::cli::error_text(&e));
            ExitCode::FAILURE
        }
    }
}
