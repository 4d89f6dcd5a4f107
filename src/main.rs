//! `sgw`: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sgw::cli::Cli::parse();
    match sgw::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sgw: {e:#}");
            ExitCode::FAILURE
        }
    }
}
