//! `sgw certs`: development certificates. Production deployments bring their own CA
//! (see certs/README.md); these commands exist so a newcomer, a test or a demo has a
//! working PKI in one step.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::domain::Role;
use crate::pki;

/// The `sgw certs` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Create a development PKI: CA, server certificate and one identity per role.
    Init {
        /// Folder to write into (created if absent).
        #[arg(long)]
        dir: PathBuf,
        /// The SPIFFE trust domain of the identities.
        #[arg(long)]
        trust_domain: String,
        /// Replace files that already exist.
        #[arg(long)]
        force: bool,
    },
    /// Issue one more client identity from the CA in a folder.
    Issue {
        /// Folder holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// agency, auditor or operator.
        #[arg(long)]
        role: Role,
        /// The registry id, [a-z0-9-]{1,64}.
        #[arg(long)]
        id: String,
        /// Days of validity.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Trust domain (default: the one the folder's PKI was made for).
        #[arg(long)]
        trust_domain: Option<String>,
        /// Replace an existing certificate and key for this identity.
        #[arg(long)]
        force: bool,
    },
    /// Issue a new server certificate and key from the CA, replacing server.pem and
    /// server.key atomically (a watching gateway picks them up).
    RenewServer {
        /// Folder holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Days of validity.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Extra DNS names (localhost is always included).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Extra IP addresses (127.0.0.1 and ::1 are always included).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
    },
    /// Add a serial to the CA folder's CRL (crl.pem), for gateways that load it.
    Revoke {
        /// Folder holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The certificate's serial, hex (colons allowed).
        #[arg(long)]
        serial: String,
    },
}

impl clap::ValueEnum for Role {
    fn value_variants<'a>() -> &'a [Self] {
        Role::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// Runs an `sgw certs` subcommand.
pub fn run(cmd: CertsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CertsCommand::Init {
            dir,
            trust_domain,
            force,
        } => {
            let pki = pki::init_dev_pki(&dir, &trust_domain, super::serve::DEV_IDENTITIES, force)?;
            for path in &pki.written {
                out!("wrote {}", path.display());
            }
            if pki.written.is_empty() {
                out!(
                    "{}: every file already exists (use --force to replace)",
                    dir.display()
                );
            }
        }
        CertsCommand::Issue {
            ca_dir,
            role,
            id,
            days,
            trust_domain,
            force,
        } => {
            let leaf = pki::issue_to_dir(&ca_dir, trust_domain.as_deref(), role, &id, days, force)?;
            out!("certificate {}", leaf.cert.display());
            out!("key         {}", leaf.key.display());
            out!("serial      {}", leaf.serial_hex);
        }
        CertsCommand::RenewServer {
            ca_dir,
            days,
            dns,
            ips,
        } => {
            let leaf = pki::renew_server(&ca_dir, days, &dns, &ips)?;
            out!("certificate {}", leaf.cert.display());
            out!("key         {}", leaf.key.display());
            out!("serial      {}", leaf.serial_hex);
        }
        CertsCommand::Revoke { ca_dir, serial } => {
            let crl = pki::revoke_in_dir(&ca_dir, &serial)?;
            out!("revoked {serial}; CRL written to {}", crl.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
