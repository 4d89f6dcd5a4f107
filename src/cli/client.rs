//! Connecting to a gateway as a client over mutual TLS, for the auditor's and
//! operator's commands. Without explicit files it uses the development PKI in
//! `certs/dev/` and the sample identity of the command's role.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where and as whom to connect.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// The gateway's address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// PEM bundle of the CA that issued the gateway's certificate [default: certs/dev/ca.pem].
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) [default: the dev identity of this command's role].
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM) [default: the dev identity's key].
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The name to expect in the gateway's certificate.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
}

impl ClientArgs {
    /// Connects, using `dev_stem` (e.g. `auditor-dpo`) from certs/dev for any file
    /// not given.
    pub async fn connect(&self, dev_stem: &str) -> anyhow::Result<Channel> {
        let dev = Path::new(crate::cli::serve::DEV_PKI_DIR);
        let ca = self.ca.clone().unwrap_or_else(|| dev.join("ca.pem"));
        let cert = self
            .cert
            .clone()
            .unwrap_or_else(|| dev.join(format!("{dev_stem}.pem")));
        let key = self
            .key
            .clone()
            .unwrap_or_else(|| dev.join(format!("{dev_stem}.key")));
        let read =
            |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&ca)?))
            .identity(Identity::from_pem(read(&cert)?, read(&key)?))
            .domain_name(self.server_name.clone());
        let endpoint = Endpoint::from_shared(format!("https://{}", self.addr))
            .with_context(|| format!("bad address {}", self.addr))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(10));
        endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {} over mutual TLS", self.addr))
    }
}
