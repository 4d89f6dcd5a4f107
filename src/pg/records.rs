//! Records and consents in PostgreSQL: what [`crate::records::RecordStore`] keeps in
//! sled and in content files, as rows that every replica reads and writes. The same
//! operations with the same meaning, as async methods; the gateway does not use it
//! yet.
//!
//! # Tables (migration 2)
//! | table | row |
//! | --- | --- |
//! | `records` | `id`, `subject_ref`, `sealed_meta` (the sled store's metadata JSON, sealed with `<id>/meta` as associated data), `sealed_content` (sealed with `<id>/content`), `retain_until_micros` |
//! | `consents` | `id`, `subject_ref`, `sealed` (the sled store's statement JSON with notes and NHS number, sealed with the id as associated data) |
//!
//! Indexes on `subject_ref` (FindRecords, and the consent check of every
//! disclosure: one index scan each) and on `retain_until_micros` (the purge
//! sweeper). The serialization and sealing are the sled store's own
//! ([`StoredRecord`], [`StoredConsent`], the same associated data and data key), so
//! nothing is in clear but ids, the child's keyed hash and times.
//!
//! # Differences from the sled store, and why they do not change the meaning
//! - A record's metadata, content and retention date are one row, so `put_record`
//!   and `purge` are one statement each: atomic, no content without metadata (the
//!   sled store's orphan clean-up has nothing to do here) and no retention entry
//!   without its record. [`PgRecordStore::forget`] therefore has nothing to drop and
//!   succeeds; the sweeper calls it only when the record is already gone.
//! - Every statement commits on its own with `synchronous_commit=on` (set on every
//!   session, see [`super::config`]): a write is durable when the method returns,
//!   as after the sled store's flush and fdatasync.
//! - Nothing is cached: with several replicas a cache on one would not see a purge
//!   made by another. Consents are read at every call in both stores; a statement
//!   committed through one replica is seen by the next call on any replica
//!   (READ COMMITTED: each statement sees everything committed before it began).
//! - A purged row's sealed bytes stay in the table's dead tuples and the WAL until
//!   VACUUM and WAL recycling reclaim them, as sled's deleted values stay in its
//!   segments until they are rewritten: sealed, never in clear.

use std::sync::Arc;

use deadpool_postgres::Pool;
use time::OffsetDateTime;

use super::config::{PgConfig, PgError};
use super::describe;
use crate::records::model::{Consent, ConsentId, Record, RecordId};
use crate::records::store::{
    content_context, meta_context, micros, open_consent, open_record, seal, StoreError,
    StoredConsent, StoredRecord,
};
use crate::store::keys::SubjectRef;
use crate::store::Keys;

const UPSERT_RECORD: &str = "INSERT INTO records \
     (id, subject_ref, sealed_meta, sealed_content, retain_until_micros) \
     VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (id) DO UPDATE SET subject_ref = EXCLUDED.subject_ref, \
       sealed_meta = EXCLUDED.sealed_meta, sealed_content = EXCLUDED.sealed_content, \
       retain_until_micros = EXCLUDED.retain_until_micros";
const SELECT_RECORD: &str = "SELECT subject_ref, sealed_meta FROM records WHERE id = $1";
const SELECT_RECORDS_ABOUT: &str =
    "SELECT id, sealed_meta FROM records WHERE subject_ref = $1 ORDER BY id";
const SELECT_CONTENT: &str = "SELECT sealed_content FROM records WHERE id = $1";
const SELECT_EXPIRED: &str = "SELECT id, retain_until_micros FROM records \
     WHERE retain_until_micros <= $1 ORDER BY retain_until_micros, id LIMIT $2";
const DELETE_RECORD: &str = "DELETE FROM records WHERE id = $1";
const UPSERT_CONSENT: &str = "INSERT INTO consents (id, subject_ref, sealed) VALUES ($1, $2, $3) \
     ON CONFLICT (id) DO UPDATE SET subject_ref = EXCLUDED.subject_ref, sealed = EXCLUDED.sealed";
const SELECT_CONSENT: &str = "SELECT subject_ref, sealed FROM consents WHERE id = $1";
const SELECT_CONSENTS_ABOUT: &str =
    "SELECT id, sealed FROM consents WHERE subject_ref = $1 ORDER BY id";

/// A record due for purging, as [`PgRecordStore::expired_by`] names it (the
/// counterpart of [`crate::records::Due`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgDue {
    /// The record.
    pub id: RecordId,
    /// Its retention date, microseconds since the epoch.
    pub retain_until_micros: i64,
}

/// Records and consents in PostgreSQL. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct PgRecordStore {
    pool: Pool,
    keys: Arc<Keys>,
}

impl PgRecordStore {
    /// Connects and applies migrations.
    pub async fn open(config: &PgConfig, keys: Arc<Keys>) -> Result<PgRecordStore, PgError> {
        Self::open_pool(config.pool()?, keys).await
    }

    /// [`PgRecordStore::open`] over an existing pool (shared with the rest of this
    /// replica's PostgreSQL storage).
    pub async fn open_pool(pool: Pool, keys: Arc<Keys>) -> Result<PgRecordStore, PgError> {
        super::migrate::migrate(&pool).await?;
        Ok(PgRecordStore { pool, keys })
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    // --- records ---

    /// Stores a record: metadata, content and retention date in one row, durably
    /// when this returns. Storing an id again replaces it.
    pub async fn put_record(&self, record: &Record, content: &[u8]) -> Result<(), StoreError> {
        let sealed_content = seal(&self.keys, &content_context(&record.id), content)?;
        let meta = serde_json::to_vec(&StoredRecord::from(record))
            .map_err(|e| StoreError::Io(format!("encoding: {e}")))?;
        let sealed_meta = seal(&self.keys, &meta_context(&record.id), &meta)?;
        let client = self.client().await?;
        let stmt = client.prepare_cached(UPSERT_RECORD).await.map_err(pg)?;
        client
            .execute(
                &stmt,
                &[
                    &record.id.as_str(),
                    &record.subject_ref.as_str(),
                    &sealed_meta,
                    &sealed_content,
                    &micros(record.retain_until),
                ],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// The record with this id, if there is one.
    pub async fn record(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(SELECT_RECORD).await.map_err(pg)?;
        let Some(row) = client.query_opt(&stmt, &[&id.as_str()]).await.map_err(pg)? else {
            return Ok(None);
        };
        let record = open_record(&self.keys, id, row.get(1))?;
        filed_under(&record.subject_ref, row.get(0), || format!("record {id}"))?;
        Ok(Some(record))
    }

    /// Every record filed about a child, in id order.
    pub async fn records_about(&self, subject: &SubjectRef) -> Result<Vec<Record>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(SELECT_RECORDS_ABOUT)
            .await
            .map_err(pg)?;
        let rows = client
            .query(&stmt, &[&subject.as_str()])
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|row| {
                let id = parse_id(row.get(0), RecordId::parse)?;
                let record = open_record(&self.keys, &id, row.get(1))?;
                filed_under(&record.subject_ref, subject.as_str(), || {
                    format!("record {id}")
                })?;
                Ok(record)
            })
            .collect()
    }

    /// A record's content. A record that is not stored (never, or purged) is
    /// [`StoreError::Corrupt`], as in the sled store: callers ask only for records
    /// they have just read.
    pub async fn content(&self, id: &RecordId) -> Result<Vec<u8>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(SELECT_CONTENT).await.map_err(pg)?;
        let row = client
            .query_opt(&stmt, &[&id.as_str()])
            .await
            .map_err(pg)?
            .ok_or_else(|| StoreError::Corrupt(format!("record {id}: content missing")))?;
        self.keys
            .data_seal
            .open(&content_context(id), row.get(0))
            .map_err(|_| StoreError::Corrupt(format!("record {id}: content does not open")))
    }

    /// The records whose retention ended at or before `now`, soonest first (then by
    /// id), at most `limit` of them.
    pub async fn expired_by(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<PgDue>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let stmt = client.prepare_cached(SELECT_EXPIRED).await.map_err(pg)?;
        let rows = client
            .query(&stmt, &[&micros(now), &limit])
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|row| {
                Ok(PgDue {
                    id: parse_id(row.get(0), RecordId::parse)?,
                    retain_until_micros: row.get(1),
                })
            })
            .collect()
    }

    /// Drops a retention entry whose record is gone: here the retention date is a
    /// column of the record's row, so there is nothing left to drop.
    pub async fn forget(&self, _due: &PgDue) -> Result<(), StoreError> {
        Ok(())
    }

    /// Deletes a record: metadata, content and retention date, in one statement,
    /// durably. Deleting what is already gone is not an error.
    pub async fn purge(&self, record: &Record) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(DELETE_RECORD).await.map_err(pg)?;
        client
            .execute(&stmt, &[&record.id.as_str()])
            .await
            .map_err(pg)?;
        Ok(())
    }

    // --- consents ---

    /// Stores a consent statement, new or changed (a withdrawal), durably when this
    /// returns.
    pub async fn put_consent(&self, consent: &Consent) -> Result<(), StoreError> {
        let plain = serde_json::to_vec(&StoredConsent::from(consent))
            .map_err(|e| StoreError::Io(format!("encoding: {e}")))?;
        let sealed = seal(&self.keys, consent.id().as_bytes(), &plain)?;
        let client = self.client().await?;
        let stmt = client.prepare_cached(UPSERT_CONSENT).await.map_err(pg)?;
        client
            .execute(
                &stmt,
                &[&consent.id(), &consent.subject_ref().as_str(), &sealed],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// The consent statement with this id, if there is one.
    pub async fn consent(&self, id: &ConsentId) -> Result<Option<Consent>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(SELECT_CONSENT).await.map_err(pg)?;
        let Some(row) = client.query_opt(&stmt, &[&id.as_str()]).await.map_err(pg)? else {
            return Ok(None);
        };
        let consent = open_consent(&self.keys, id.as_str(), row.get(1))?;
        filed_under(&consent.subject_ref(), row.get(0), || {
            format!("consent {id}")
        })?;
        Ok(Some(consent))
    }

    /// Every consent statement about a child, in id order. Read from the database at
    /// each call: nothing caches a statement, so a withdrawal committed through any
    /// replica applies to the very next disclosure on every replica.
    pub async fn consents_about(&self, subject: &SubjectRef) -> Result<Vec<Consent>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(SELECT_CONSENTS_ABOUT)
            .await
            .map_err(pg)?;
        let rows = client
            .query(&stmt, &[&subject.as_str()])
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|row| {
                let id = parse_id(row.get(0), ConsentId::parse)?;
                let consent = open_consent(&self.keys, id.as_str(), row.get(1))?;
                filed_under(&consent.subject_ref(), subject.as_str(), || {
                    format!("consent {id}")
                })?;
                Ok(consent)
            })
            .collect()
    }

    // --- helpers ---

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Io(format!("postgres: {e}")))
    }
}

/// The row's clear `subject_ref` must be the one sealed inside it: otherwise a row
/// was moved under another child (the sled store's keys give the same assurance).
fn filed_under(
    sealed: &SubjectRef,
    column: &str,
    what: impl FnOnce() -> String,
) -> Result<(), StoreError> {
    if sealed.as_str() == column {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "{}: filed under another child",
            what()
        )))
    }
}

fn parse_id<T>(text: &str, parse: fn(&str) -> Result<T, String>) -> Result<T, StoreError> {
    parse(text).map_err(|_| StoreError::Corrupt("malformed id in the database".into()))
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Io(format!("postgres: {}", describe(&e)))
}
