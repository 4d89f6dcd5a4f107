//! Versioned schema migrations, applied at start.
//!
//! `schema_migrations(version, name, applied_at)` records what has been applied. Its
//! row `version = 0` is a lock row: each migration runs in its own transaction that
//! first takes that row with `SELECT ... FOR UPDATE`, checks whether its version is
//! already recorded, and if not applies it and records it. So replicas starting at
//! the same moment apply each migration exactly once, the others wait on the row and
//! then find it done. No advisory locks (portable SQL). A database whose schema is
//! newer than this build is refused rather than written with old assumptions.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::error::SqlState;
use tokio_postgres::IsolationLevel;

use super::config::PgError;
use super::describe;

/// One migration: its version (ascending from 1), a name, and its SQL (several
/// statements, run in one transaction).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Ascending from 1; 0 is the lock row.
    pub version: i32,
    /// What it does, in a few words.
    pub name: &'static str,
    /// The statements.
    pub sql: &'static str,
}

/// Every migration, in order. Never edit one that has shipped: add another.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "audit log, tiles, checkpoints, leases",
        sql: r#"
CREATE TABLE audit_head (
    id smallint PRIMARY KEY CHECK (id = 1),
    size bigint NOT NULL CHECK (size >= 0),
    last_time_micros bigint NOT NULL,
    origin text
);
INSERT INTO audit_head (id, size, last_time_micros) VALUES (1, 0, -9223372036854775808);

-- One row per entry: its canonical bytes sealed with AES-256-GCM, the seq as
-- associated data. The index columns hold what sled's index keys hold (a keyed hash
-- of the child, ids of agencies and actors, the action), never content.
CREATE TABLE audit_entries (
    seq bigint PRIMARY KEY CHECK (seq >= 0),
    time_micros bigint NOT NULL,
    sealed bytea NOT NULL,
    subject_ref text,
    actor_id text NOT NULL,
    target_agency_id text,
    action integer NOT NULL
);
CREATE INDEX audit_entries_subject ON audit_entries (subject_ref, seq) WHERE subject_ref IS NOT NULL;
CREATE INDEX audit_entries_actor ON audit_entries (actor_id, seq);
CREATE INDEX audit_entries_target ON audit_entries (target_agency_id, seq) WHERE target_agency_id IS NOT NULL;
CREATE INDEX audit_entries_action ON audit_entries (action, seq);

-- Merkle nodes as C2SP tlog-tiles: node `index` of `level` (the hash of leaves
-- [index*2^level, (index+1)*2^level)) is in tile index/64 at slot index%64.
CREATE TABLE audit_tiles (
    level smallint NOT NULL CHECK (level >= 0 AND level < 64),
    tile_index bigint NOT NULL CHECK (tile_index >= 0),
    hashes bytea NOT NULL CHECK (length(hashes) % 32 = 0 AND length(hashes) BETWEEN 32 AND 2048),
    PRIMARY KEY (level, tile_index)
);

CREATE TABLE audit_checkpoints (
    tree_size bigint PRIMARY KEY CHECK (tree_size >= 0),
    timestamp_secs bigint NOT NULL,
    root_hash bytea NOT NULL CHECK (length(root_hash) = 32),
    signature bytea NOT NULL CHECK (length(signature) = 64),
    public_key bytea NOT NULL CHECK (length(public_key) = 32)
);

-- One holder at a time per name, until expires_at (the database's clock).
CREATE TABLE leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    expires_at timestamptz NOT NULL
);
"#,
    },
    Migration {
        version: 2,
        name: "records and consents",
        sql: r#"
-- What the sled record store keeps, one row per record and per consent. In clear
-- only ids, the child's keyed hash (subject_ref, HMAC-SHA256 hex) and times
-- (microseconds since the epoch); the metadata (with the NHS number and summary),
-- the content and the consent statements (with their notes) are sealed with
-- AES-256-GCM under the data key, with the associated data of the sled store:
-- `<record id>/meta`, `<record id>/content`, the consent id.
CREATE TABLE records (
    id text PRIMARY KEY,
    subject_ref text NOT NULL,
    sealed_meta bytea NOT NULL,
    sealed_content bytea NOT NULL,
    retain_until_micros bigint NOT NULL
);
CREATE INDEX records_subject ON records (subject_ref, id);
CREATE INDEX records_retention ON records (retain_until_micros, id);

CREATE TABLE consents (
    id text PRIMARY KEY,
    subject_ref text NOT NULL,
    sealed bytea NOT NULL
);
CREATE INDEX consents_subject ON consents (subject_ref, id);
"#,
    },
    Migration {
        version: 3,
        name: "concerns, inboxes, idempotency keys, deadlines",
        sql: r#"
-- What the sled concern store keeps (src/concerns/store.rs), as rows. In clear only
-- ids, agency ids, times and event kinds; the concern (NHS number, narrative, notes,
-- decision) is the sled store's JSON sealed with AES-256-GCM under the data key, the
-- concern id as associated data.
CREATE TABLE concerns (
    id text PRIMARY KEY,
    sealed bytea NOT NULL
);

-- One row per agency: its newest cursor. A writer locks the row (an upsert: a
-- row lock held until COMMIT) to take the next cursors, so an agency's cursors are
-- dense and in commit order on every replica, and a committed last_cursor means
-- every event up to it is committed.
CREATE TABLE inbox_heads (
    agency_id text PRIMARY KEY,
    last_cursor bigint NOT NULL CHECK (last_cursor >= 0)
);

-- An agency's inbox: `event` is the sled store's event JSON (ids, agency ids and
-- times; an override notice's justification sealed).
CREATE TABLE inbox_events (
    agency_id text NOT NULL,
    seq bigint NOT NULL CHECK (seq >= 1),
    kind text NOT NULL CHECK (kind IN ('concern', 'escalation', 'override_notice')),
    concern_id text,
    event bytea NOT NULL,
    PRIMARY KEY (agency_id, seq)
);

-- SHA-256(sender || 0 || request_id): one concern per key, whichever replica
-- inserts first; the others find it.
CREATE TABLE concern_idempotency (
    key bytea PRIMARY KEY CHECK (length(key) = 32),
    concern_id text NOT NULL REFERENCES concerns (id) DEFERRABLE INITIALLY DEFERRED
);

-- A recipient's acknowledgement deadline, for the deadline sweeper.
CREATE TABLE concern_deadlines (
    due_micros bigint NOT NULL,
    concern_id text NOT NULL REFERENCES concerns (id),
    PRIMARY KEY (due_micros, concern_id)
);
CREATE INDEX concern_deadlines_concern ON concern_deadlines (concern_id, due_micros);
"#,
    },
    Migration {
        version: 4,
        name: "subject locks",
        sql: r#"
-- One row per child (its keyed hash), locked FOR SHARE by a disclosure from before
-- it reads consent until its audit entry is committed, and FOR UPDATE by a consent
-- change from before its audit entry until the statement is stored: disclosures
-- and consent changes about one child are ordered across every replica.
CREATE TABLE subject_locks (
    subject_ref text PRIMARY KEY
);
"#,
    },
    Migration {
        version: 5,
        name: "replicas and the cluster's TLS generation",
        sql: r#"
-- Each live replica's report: the log size up to which it has applied
-- CERTIFICATE_REVOKED entries, the TLS generation it has reloaded for (and why not,
-- when its files were refused), and when it last reported.
CREATE TABLE replicas (
    name text PRIMARY KEY,
    revoked_upto bigint NOT NULL CHECK (revoked_upto >= 0),
    tls_generation bigint NOT NULL CHECK (tls_generation >= 0),
    tls_error text,
    seen_at timestamptz NOT NULL
);

-- Bumped by an operator's ReloadTls: every replica reloads its files once for it.
CREATE TABLE cluster_state (
    id smallint PRIMARY KEY CHECK (id = 1),
    tls_generation bigint NOT NULL CHECK (tls_generation >= 0)
);
INSERT INTO cluster_state (id, tls_generation) VALUES (1, 0);
"#,
    },
    Migration {
        version: 6,
        name: "subject gates",
        sql: r#"
-- A turnstile per child in front of its subject_locks row: a consent change holds
-- it while it waits for the disclosures already sharing the row, so disclosures
-- that start later queue behind the change instead of starving it.
CREATE TABLE subject_gates (
    subject_ref text PRIMARY KEY
);
"#,
    },
    Migration {
        version: 7,
        name: "key check",
        sql: r#"
-- What the first replica's keys make of fixed inputs: a canary sealed with each
-- sealing key, a child's keyed hash, the checkpoint public key. A replica whose key
-- files differ refuses to start instead of writing what the others cannot read.
CREATE TABLE key_check (
    id smallint PRIMARY KEY CHECK (id = 1),
    audit_canary bytea NOT NULL,
    data_canary bytea NOT NULL,
    subject_ref text NOT NULL,
    public_key bytea NOT NULL
);
"#,
    },
];

/// The newest schema this build knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Applies every migration not yet applied; returns the versions this call applied.
pub async fn migrate(pool: &Pool) -> Result<Vec<i32>, PgError> {
    migrate_with(pool, MIGRATIONS).await
}

/// [`migrate`] with a given list (tests).
pub async fn migrate_with(pool: &Pool, migrations: &[Migration]) -> Result<Vec<i32>, PgError> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| PgError::Connect(e.to_string()))?;
    bootstrap(&client).await?;
    let mut applied = Vec::new();
    for m in migrations {
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(schema_error)?;
        tx.query_one(
            "SELECT version FROM schema_migrations WHERE version = 0 FOR UPDATE",
            &[],
        )
        .await
        .map_err(schema_error)?;
        let done = tx
            .query_opt(
                "SELECT version FROM schema_migrations WHERE version = $1",
                &[&m.version],
            )
            .await
            .map_err(schema_error)?
            .is_some();
        if done {
            tx.rollback().await.map_err(schema_error)?;
            continue;
        }
        tx.batch_execute(m.sql).await.map_err(|e| {
            PgError::Schema(format!(
                "migration {} ({}) failed: {}",
                m.version,
                m.name,
                describe(&e)
            ))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .map_err(schema_error)?;
        tx.commit().await.map_err(schema_error)?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "applied postgres migration"
        );
        applied.push(m.version);
    }
    let newest: i32 = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await
        .map_err(schema_error)?
        .get(0);
    let known = migrations.last().map_or(0, |m| m.version);
    if newest > known {
        return Err(PgError::Schema(format!(
            "the database's schema is at version {newest}, newer than this sgw knows ({known}): upgrade sgw"
        )));
    }
    Ok(applied)
}

/// Creates `schema_migrations` and its lock row if missing. Concurrent
/// `CREATE TABLE IF NOT EXISTS` can still collide in PostgreSQL's catalogue (a
/// unique violation on `pg_type`, or `type "schema_migrations" already exists`,
/// SQLSTATE 42710), so a collision is retried: the other starter made the table.
async fn bootstrap(client: &tokio_postgres::Client) -> Result<(), PgError> {
    let mut attempt = 0u32;
    loop {
        let result = client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version integer PRIMARY KEY,
                     name text NOT NULL,
                     applied_at timestamptz NOT NULL DEFAULT now()
                 );
                 INSERT INTO schema_migrations (version, name) VALUES (0, 'lock row')
                     ON CONFLICT (version) DO NOTHING;",
            )
            .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e)
                if attempt < 10
                    && matches!(
                        e.code(),
                        Some(&SqlState::UNIQUE_VIOLATION)
                            | Some(&SqlState::DUPLICATE_TABLE)
                            | Some(&SqlState::DUPLICATE_OBJECT)
                    ) =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
            }
            Err(e) => return Err(schema_error(e)),
        }
    }
}

fn schema_error(e: tokio_postgres::Error) -> PgError {
    PgError::Schema(describe(&e))
}
