//! PostgreSQL storage, so that several stateless gateway replicas can share one
//! database (`[storage] backend = "postgres"`): the audit log, records and consents,
//! concerns and inboxes, behind the same traits as the sled stores
//! ([`backend`]).
//!
//! - [`config`]: connection settings and the connection pool (deadpool-postgres).
//! - [`migrate`]: versioned schema migrations, applied at start, safe when several
//!   replicas start at once.
//! - [`audit`]: [`PgAuditLog`], the tamper-evident audit log in tables: group commit
//!   as one transaction that locks the log head, Merkle nodes stored as tiles,
//!   proofs in O(log n) reads, offline verification.
//! - [`records`]: [`PgRecordStore`], records (sealed metadata and content) and
//!   consent statements, the same operations as the sled record store.
//! - [`concerns`]: [`PgConcernStore`], sealed concerns, per-agency inboxes with
//!   cursors that mean the same on every replica, idempotency keys and deadlines;
//!   `LISTEN`/`NOTIFY` wakes subscribers on the other replicas, polling backs it up.
//! - [`lease`]: lease rows (one holder at a time, cluster-wide) and the checkpoints
//!   that only the lease holder signs.
//!
//! # What the guarantees rest on
//! - Every connection sets `synchronous_commit=on` at startup, so a COMMIT returns
//!   only once its WAL is flushed on the server (and on synchronous standbys, when the
//!   operator configured any). An `audit_seq` handed to a caller is durable then. The
//!   server itself must run with `fsync=on` (the default).
//! - Only portable SQL: row locks (`SELECT ... FOR UPDATE`), `ON CONFLICT`, `unnest`
//!   of arrays; no advisory locks, no stored procedures. LISTEN/NOTIFY only as a
//!   wake-up for inbox subscribers (the tables are the truth; polling backs it up).
//! - Transactions that lock the log head run at READ COMMITTED, so each statement
//!   after the lock sees everything the previous holder committed.
//!
//! # Not done today (written down on purpose)
//! - **No TLS to PostgreSQL.** Connections use `NoTls`. [`config::PgConfig`] refuses
//!   any host other than loopback or a Unix socket unless the operator sets
//!   `allow_plaintext_network` (for a private link or a local TLS tunnel they
//!   manage). Entries are sealed (AES-256-GCM) before they leave the gateway, but the
//!   index columns (subject ref, actor and agency ids, action) and the SQL traffic
//!   are not encrypted on the wire. Adding `tokio-postgres-rustls` (ring, no OpenSSL)
//!   is the way to close this.

pub mod audit;
pub mod backend;
pub mod cluster;
pub mod concerns;
pub mod config;
pub mod lease;
pub mod migrate;
pub mod records;

pub use audit::{Appended, PgAuditLog, PgAuditSettings, VerifySummary};
pub use backend::{Backend, PgAudit};
pub use concerns::{PgConcernStore, PgInboxSettings};
pub use config::{PgConfig, PgError};
pub use lease::Lease;
pub use records::{PgDue, PgRecordStore};

/// One line describing a driver error, with the SQLSTATE and server message when
/// the server sent one (tokio-postgres's own `Display` says only "db error").
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", e, db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}
