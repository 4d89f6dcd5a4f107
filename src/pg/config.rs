//! Connection settings and the pool.

use std::net::IpAddr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::NoTls;

/// Why the PostgreSQL store could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgError {
    /// The settings are not usable; the message says which and why.
    #[error("postgres settings: {0}")]
    Config(String),
    /// The server could not be reached or refused the connection.
    #[error("postgres: {0}")]
    Connect(String),
    /// A migration failed, or the schema is newer than this build.
    #[error("postgres schema: {0}")]
    Schema(String),
}

/// How to reach the database. `url` is a libpq-style URL or key/value string
/// (`postgres://user@127.0.0.1:5432/sgw`).
#[derive(Clone)]
pub struct PgConfig {
    /// The connection URL. May hold a password: never logged ([`std::fmt::Debug`]
    /// leaves it out).
    pub url: String,
    /// The most connections this replica opens.
    pub pool_size: usize,
    /// `statement_timeout` of every session; also its
    /// `idle_in_transaction_session_timeout`, so a replica that stops mid-transaction
    /// cannot hold the log head's lock for longer than this.
    pub statement_timeout: Duration,
    /// How long to wait for a new connection or a free one from the pool.
    pub connect_timeout: Duration,
    /// Allow a host other than loopback or a Unix socket, although the connection is
    /// not encrypted (no TLS to PostgreSQL yet): for a private link or a tunnel the
    /// operator runs. Off by default.
    pub allow_plaintext_network: bool,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &"<redacted>")
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("allow_plaintext_network", &self.allow_plaintext_network)
            .finish()
    }
}

impl PgConfig {
    /// Settings for `url` with the defaults: 16 connections, 5 s statement timeout,
    /// 5 s connect timeout, loopback only.
    pub fn new(url: impl Into<String>) -> Self {
        PgConfig {
            url: url.into(),
            pool_size: 16,
            statement_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            allow_plaintext_network: false,
        }
    }

    /// The driver's settings: the URL plus the session settings the guarantees rest
    /// on, checked against what is supported today.
    pub fn driver_config(&self) -> Result<tokio_postgres::Config, PgError> {
        let mut pg: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| PgError::Config(format!("url does not parse: {e}")))?;
        if self.pool_size == 0 {
            return Err(PgError::Config("pool_size must be at least 1".into()));
        }
        if pg.get_ssl_mode() == SslMode::Require {
            return Err(PgError::Config(
                "sslmode=require: TLS to PostgreSQL is not supported yet; connect over loopback or a Unix socket".into(),
            ));
        }
        if !self.allow_plaintext_network {
            check_local(&pg)?;
        }
        let ms = self.statement_timeout.as_millis().max(1);
        // Startup options outrank role and database defaults (ALTER ROLE ... SET), so
        // nothing on the server can turn these off for our sessions.
        let mut options = pg
            .get_options()
            .map(|o| format!("{o} "))
            .unwrap_or_default();
        options.push_str(&format!(
            "-c synchronous_commit=on -c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms} -c client_min_messages=warning"
        ));
        pg.options(&options);
        if pg.get_application_name().is_none() {
            pg.application_name("sgw");
        }
        pg.connect_timeout(self.connect_timeout);
        Ok(pg)
    }

    /// A pool of connections; none is opened until first used.
    pub fn pool(&self) -> Result<Pool, PgError> {
        let manager = Manager::from_config(
            self.driver_config()?,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.connect_timeout))
            .create_timeout(Some(self.connect_timeout))
            .build()
            .map_err(|e| PgError::Config(e.to_string()))
    }
}

/// Refuses hosts that are not loopback addresses, `localhost` or Unix sockets.
fn check_local(pg: &tokio_postgres::Config) -> Result<(), PgError> {
    let local_ip = |ip: &IpAddr| ip.is_loopback();
    for host in pg.get_hosts() {
        let ok = match host {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<IpAddr>()
                        .is_ok_and(|ip| local_ip(&ip))
            }
        };
        if !ok {
            return Err(PgError::Config(format!(
                "host {host:?} is not loopback: connections to PostgreSQL are not encrypted yet \
                 (no TLS); use a loopback address or Unix socket, or set allow_plaintext_network \
                 for a private link"
            )));
        }
    }
    if pg.get_hostaddrs().iter().any(|ip| !local_ip(ip)) {
        return Err(PgError::Config(
            "hostaddr is not loopback: connections to PostgreSQL are not encrypted yet".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_sockets_only_unless_allowed() {
        for ok in [
            "postgres://sgw@127.0.0.1:5432/sgw",
            "postgres://sgw@localhost/sgw",
            "postgres://sgw@[::1]:5432/sgw",
            "host=/var/run/postgresql user=sgw",
        ] {
            PgConfig::new(ok).driver_config().expect(ok);
        }
        let remote = PgConfig::new("postgres://sgw@db.example:5432/sgw");
        assert!(
            matches!(remote.driver_config(), Err(PgError::Config(m)) if m.contains("not encrypted"))
        );
        let allowed = PgConfig {
            allow_plaintext_network: true,
            ..remote
        };
        allowed.driver_config().unwrap();
        let tls = PgConfig::new("postgres://sgw@127.0.0.1/sgw?sslmode=require");
        assert!(matches!(tls.driver_config(), Err(PgError::Config(m)) if m.contains("TLS")));
    }

    #[test]
    fn sessions_get_durable_commits_and_timeouts() {
        let mut c = PgConfig::new("postgres://sgw@127.0.0.1/sgw?options=-c%20work_mem%3D8MB");
        c.statement_timeout = Duration::from_millis(1500);
        let pg = c.driver_config().unwrap();
        let opts = pg.get_options().unwrap();
        assert!(opts.starts_with("-c work_mem=8MB "), "{opts}");
        assert!(opts.contains("synchronous_commit=on"));
        assert!(opts.contains("statement_timeout=1500"));
        assert!(opts.contains("idle_in_transaction_session_timeout=1500"));
        assert!(!format!("{c:?}").contains("127.0.0.1"));
    }
}
