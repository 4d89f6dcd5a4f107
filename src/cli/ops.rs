//! `sgw ops`: the operator's client over mutual TLS (status, reload, revoke).

use std::process::ExitCode;

use anyhow::Context as _;

use super::client::ClientArgs;
use crate::proto::v1::operations_service_client::OperationsServiceClient;
use crate::proto::v1::*;

/// The `sgw ops` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum OpsCommand {
    /// Show the gateway's TLS material: server certificate, trusted CAs, revocations.
    Status {
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the certificate, key, CA bundle and CRL files now.
    Reload {
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
    /// Revoke a client certificate by serial, at once and for good.
    Revoke {
        /// The certificate's serial, hex (colons allowed).
        #[arg(long)]
        serial: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        #[allow(missing_docs)]
        client: ClientArgs,
    },
}

/// Runs an `sgw ops` subcommand.
pub fn run(cmd: OpsCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        match cmd {
            OpsCommand::Status { client, json } => {
                let mut ops = OperationsServiceClient::new(client.connect("operator-ops").await?);
                let status = ops
                    .get_tls_status(GetTlsStatusRequest {})
                    .await?
                    .into_inner()
                    .status;
                print_status(status.as_ref(), json);
            }
            OpsCommand::Reload { client } => {
                let mut ops = OperationsServiceClient::new(client.connect("operator-ops").await?);
                match ops.reload_tls(ReloadTlsRequest {}).await {
                    Ok(resp) => {
                        out!("reloaded");
                        print_status(resp.into_inner().status.as_ref(), false);
                    }
                    Err(status) => {
                        eprintln!(
                            "sgw: reload refused ({:?}): {}",
                            status.code(),
                            status.message()
                        );
                        return Ok(ExitCode::from(1));
                    }
                }
            }
            OpsCommand::Revoke {
                serial,
                reason,
                client,
            } => {
                let mut ops = OperationsServiceClient::new(client.connect("operator-ops").await?);
                let req = RevokeCertificateRequest {
                    serial_hex: serial.clone(),
                    reason,
                };
                match ops.revoke_certificate(req).await {
                    Ok(_) => out!("revoked {serial}"),
                    Err(status) => {
                        eprintln!(
                            "sgw: revocation refused ({:?}): {}",
                            status.code(),
                            status.message()
                        );
                        return Ok(ExitCode::from(1));
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn rfc3339(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn print_status(status: Option<&TlsStatus>, json: bool) {
    let Some(s) = status else {
        out!("(no status)");
        return;
    };
    if json {
        let v = serde_json::json!({
            "server_cert_serial": s.server_cert_serial,
            "server_cert_sha256": s.server_cert_sha256,
            "server_not_after": rfc3339(s.server_not_after.as_ref()),
            "server_days_until_expiry": s.server_days_until_expiry,
            "client_cas": s.client_cas.iter().map(|c| serde_json::json!({
                "sha256": c.sha256, "subject": c.subject,
                "not_after": rfc3339(c.not_after.as_ref()), "days_until_expiry": c.days_until_expiry,
            })).collect::<Vec<_>>(),
            "revoked_serials": s.revoked_serials,
            "reloaded_at": rfc3339(s.reloaded_at.as_ref()),
        });
        out!("{v}");
        return;
    }
    out!("server certificate  serial {}", s.server_cert_serial);
    out!("                    sha256 {}", s.server_cert_sha256);
    out!(
        "                    expires {} ({} days)",
        rfc3339(s.server_not_after.as_ref()),
        s.server_days_until_expiry
    );
    for ca in &s.client_cas {
        out!("client CA           {} ({})", ca.subject, ca.sha256);
        out!(
            "                    expires {} ({} days)",
            rfc3339(ca.not_after.as_ref()),
            ca.days_until_expiry
        );
    }
    out!(
        "revoked serials     {}",
        if s.revoked_serials.is_empty() {
            "none".to_owned()
        } else {
            s.revoked_serials.join(", ")
        }
    );
    out!("loaded at           {}", rfc3339(s.reloaded_at.as_ref()));
}
