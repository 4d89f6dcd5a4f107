//! The command line: one file per subcommand. `anyhow` is used here and only here.

/// `println!` for the commands' output: a reader that has gone (`sgw audit query |
/// head`) ends the command quietly instead of panicking, as other tools do. (Not by
/// restoring SIGPIPE's default action: the client commands' TLS sockets must see
/// EPIPE as an error, not end the process.)
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("sgw: cannot write to standard output: {e}");
            std::process::exit(1);
        }
    }};
}

pub mod audit;
pub mod bench;
pub mod certs;
pub mod client;
pub mod ops;
pub mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

/// Safeguarding information-sharing gateway.
#[derive(Debug, Parser)]
#[command(name = "sgw", version, about, long_about = None)]
pub struct Cli {
    /// Log line format.
    #[arg(long, value_enum, global = true)]
    pub log_format: Option<LogFormat>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(serve::ServeArgs),
    /// Make development certificates.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Verify or query the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Operate a running gateway: TLS status, reload, revoke.
    #[command(subcommand)]
    Ops(ops::OpsCommand),
    /// Load-test a gateway, optionally against a bare mTLS echo baseline.
    Bench(bench::BenchArgs),
    /// The bench's echo baseline server (used by `sgw bench --baseline`).
    #[command(hide = true)]
    BenchEcho(bench::EchoArgs),
}

/// An error and its causes as one line, `a: b: c`, leaving out a cause whose text
/// the line already ends with: tonic's and rustls's errors repeat their source in
/// their own message (`tcp connect error: tcp connect error: Connection refused`).
pub fn error_text(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(args, cli.log_format),
        Command::Certs(cmd) => certs::run(cmd),
        Command::Audit(cmd) => audit::run(cmd),
        Command::Ops(cmd) => ops::run(cmd),
        Command::Bench(args) => bench::run(args),
        Command::BenchEcho(args) => bench::run_echo(args),
    }
}
