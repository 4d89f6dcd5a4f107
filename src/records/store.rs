//! The records' storage: a sled database in `data_dir/records` (apart from the audit
//! log and the concerns), and one sealed file per record content in
//! `data_dir/record-content`.
//!
//! One tree, `records`, holds four key spaces, so that everything one change touches
//! is written in **one** atomic sled batch:
//!
//! | key | value |
//! | --- | --- |
//! | `s/<subject ref>/<record id>` | the record's metadata (owner, category, summary, media type, times, NHS number), JSON, sealed with `<record id>/meta` as associated data |
//! | `r/<record id>` | the subject ref under which the record is filed |
//! | `t/<retain_until µs, sign-flipped u64 BE>/<record id>` | a retention date, for the purge sweeper |
//! | `c/<subject ref>/<consent id>` | a consent statement with its notes and NHS number, JSON, sealed with the consent id as associated data |
//! | `k/<consent id>` | the subject ref under which the consent is filed |
//!
//! Records and consents are filed under the child's keyed hash, so FindRecords and
//! the consent check of every disclosure are one prefix scan each. No NHS number,
//! summary, content or note is ever written in clear.
//!
//! **Why content lives in files.** sled 0.34 writes any value (or any node holding
//! values) larger than about an eighth of its 512 KiB segment to a separate blob
//! file, and never fsyncs blob files; record content is up to 1 MiB, so a node
//! holding it could reach the log's durable pointer before its blob reached the
//! disk. Content is therefore a file of its own, written to a temporary name, synced,
//! renamed and its folder synced, before the metadata that points to it is written.
//! Everything in sled stays small.
//!
//! **Caching.** A record's metadata and its sealed content never change until the
//! purge, so reads of them go through a bounded [`RecordCache`] (content stays
//! sealed there). Consents are read from the database at every call.
//!
//! **Durability.** Every change is followed by the durability point: sled's flush,
//! then `fdatasync` of `records/db` (sled 0.34's flush ends in `sync_file_range`,
//! which does not empty the disk's write cache). Only then is it reported.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::cache::{CacheLimits, RecordCache};
use super::model::{Consent, ConsentId, Record, RecordId};
use crate::domain::consent::{ConsentScope, ConsentStatement};
use crate::domain::{AgencyId, NhsNumber};
use crate::store::keys::SubjectRef;
use crate::store::Keys;

/// Why the store failed. The detail goes to the log, never to a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// sled or the file system failed.
    #[error("record store I/O: {0}")]
    Io(String),
    /// A stored value is malformed, missing or does not open.
    #[error("record store damaged: {0}")]
    Corrupt(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

const TREE: &str = "records";

/// A record due for purging, as the retention index names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The record.
    pub id: RecordId,
    /// Where the backend's retention index names it (empty where the retention
    /// date is a column of the record's row).
    pub(crate) key: Vec<u8>,
}

/// The record store. Cheap to clone.
#[derive(Clone)]
pub struct RecordStore {
    tree: sled::Tree,
    sync_point: Arc<crate::store::SyncPoint>,
    content_dir: PathBuf,
    keys: Arc<Keys>,
    cache: Arc<RecordCache>,
}

// === impl RecordStore ===

impl RecordStore {
    /// Opens (creating) the database in `dir` and the content folder `content_dir`,
    /// and removes content files that no record points to (left by a crash between
    /// writing a content file and its metadata).
    pub fn open(
        dir: &Path,
        content_dir: &Path,
        keys: Arc<Keys>,
    ) -> Result<RecordStore, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(32 * 1024 * 1024)
            .open()?;
        let tree = db.open_tree(TREE)?;
        let data_file = File::open(dir.join("db"))
            .map_err(|e| StoreError::Io(format!("cannot open the record database file: {e}")))?;
        // The sync point keeps the database open for as long as the store lives.
        let sync_point = Arc::new(crate::store::SyncPoint::new(db.clone(), data_file));
        create_private_dir(content_dir)?;
        let store = RecordStore {
            tree,
            sync_point,
            content_dir: content_dir.to_owned(),
            keys,
            cache: Arc::new(RecordCache::new(CacheLimits::default())),
        };
        store.remove_orphans()?;
        Ok(store)
    }

    /// The durability point: sled's flush, then fdatasync of its file.
    pub fn sync(&self) -> Result<(), StoreError> {
        // Concurrent writers share one flush + fdatasync (group commit).
        self.sync_point
            .sync()
            .map_err(|e| StoreError::Io(format!("flush + fdatasync: {e}")))
    }

    /// Makes everything durable; called at shutdown.
    pub fn close(&self) -> Result<(), StoreError> {
        self.sync()
    }

    // --- records ---

    /// Stores a new record: its content file first (durably), then its metadata and
    /// indexes in one batch, durably.
    pub fn put_record(&self, record: &Record, content: &[u8]) -> Result<(), StoreError> {
        let sealed_content = seal(&self.keys, &content_context(&record.id), content)?;
        self.write_content(&record.id, &sealed_content)?;
        let sealed_meta = seal(
            &self.keys,
            &meta_context(&record.id),
            &json(&StoredRecord::from(record))?,
        )?;
        let mut batch = sled::Batch::default();
        batch.insert(record_key(&record.subject_ref, &record.id), sealed_meta);
        batch.insert(
            record_ref_key(&record.id),
            record.subject_ref.as_str().as_bytes(),
        );
        batch.insert(retention_key(record.retain_until, &record.id), &[]);
        self.tree.apply_batch(batch)?;
        self.sync()
    }

    /// The record with this id, if there is one.
    pub fn record(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        if let Some(cached) = self.cache.record(id) {
            return Ok(Some(Record::clone(&cached)));
        }
        let seen = self.cache.epoch();
        let Some(subject) = self.tree.get(record_ref_key(id))? else {
            return Ok(None);
        };
        let subject = subject_ref_of(&subject)?;
        match self.tree.get(record_key(&subject, id))? {
            Some(sealed) => {
                let record = open_record(&self.keys, id, &sealed)?;
                self.cache.keep_record(seen, Arc::new(record.clone()));
                Ok(Some(record))
            }
            None => Err(StoreError::Corrupt(format!(
                "record {id}: index without metadata"
            ))),
        }
    }

    /// Every record filed about a child, in no particular order.
    pub fn records_about(&self, subject: &SubjectRef) -> Result<Vec<Record>, StoreError> {
        let prefix = subject_prefix(b"s/", subject);
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (key, sealed) = item?;
            let id = id_after(&key, prefix.len(), RecordId::parse)?;
            out.push(open_record(&self.keys, &id, &sealed)?);
        }
        Ok(out)
    }

    /// A record's content, if its sealed form is in the cache: no file I/O, so it
    /// may run on an async worker.
    pub fn cached_content(&self, id: &RecordId) -> Result<Option<Vec<u8>>, StoreError> {
        self.cache
            .content(id)
            .map(|sealed| open_content(&self.keys, id, &sealed))
            .transpose()
    }

    /// A record's content: from the cache, or read from its file (blocking I/O).
    pub fn content(&self, id: &RecordId) -> Result<Vec<u8>, StoreError> {
        let sealed = match self.cache.content(id) {
            Some(sealed) => sealed,
            None => {
                let seen = self.cache.epoch();
                let path = self.content_dir.join(id.as_str());
                let sealed: Arc<[u8]> = fs::read(&path)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => {
                            StoreError::Corrupt(format!("record {id}: content file missing"))
                        }
                        _ => StoreError::Io(format!("reading content of {id}: {e}")),
                    })?
                    .into();
                self.cache.keep_content(seen, id, sealed.clone());
                sealed
            }
        };
        open_content(&self.keys, id, &sealed)
    }

    /// The records whose retention ended at or before `now`, soonest first, at most
    /// `limit` of them.
    pub fn expired_by(&self, now: OffsetDateTime, limit: usize) -> Result<Vec<Due>, StoreError> {
        let mut end = b"t/".to_vec();
        end.extend_from_slice(&time_key(now));
        // Keys of records due exactly at `now` continue past `end`: include them.
        end.push(0xff);
        let mut out = Vec::new();
        for item in self.tree.range(b"t/".to_vec()..end).take(limit) {
            let (key, _) = item?;
            out.push(Due {
                id: id_after(&key, 2 + 8 + 1, RecordId::parse)?,
                key: key.to_vec(),
            });
        }
        Ok(out)
    }

    /// Drops a retention entry whose record is gone (a crash mid-purge).
    pub fn forget(&self, due: &Due) -> Result<(), StoreError> {
        self.tree.remove(&due.key)?;
        self.sync()
    }

    /// Deletes a record: its content file first (so content is never left behind by
    /// a crash), then its metadata and indexes, durably. Deleting what is already
    /// gone is not an error.
    pub fn purge(&self, record: &Record) -> Result<(), StoreError> {
        let path = self.content_dir.join(record.id.as_str());
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.content_dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StoreError::Io(format!(
                    "removing content of {}: {e}",
                    record.id
                )))
            }
        }
        let mut batch = sled::Batch::default();
        batch.remove(record_key(&record.subject_ref, &record.id));
        batch.remove(record_ref_key(&record.id));
        batch.remove(retention_key(record.retain_until, &record.id));
        self.tree.apply_batch(batch)?;
        self.cache.forget(&record.id);
        self.sync()
    }

    // --- consents ---

    /// Stores a consent statement, new or changed, durably.
    pub fn put_consent(&self, consent: &Consent) -> Result<(), StoreError> {
        let subject = consent.subject_ref();
        let sealed = seal(
            &self.keys,
            consent.id().as_bytes(),
            &json(&StoredConsent::from(consent))?,
        )?;
        let mut batch = sled::Batch::default();
        batch.insert(consent_key(&subject, consent.id()), sealed);
        batch.insert(consent_ref_key(consent.id()), subject.as_str().as_bytes());
        self.tree.apply_batch(batch)?;
        self.sync()
    }

    /// The consent statement with this id, if there is one.
    pub fn consent(&self, id: &ConsentId) -> Result<Option<Consent>, StoreError> {
        let Some(subject) = self.tree.get(consent_ref_key(id.as_str()))? else {
            return Ok(None);
        };
        let subject = subject_ref_of(&subject)?;
        match self.tree.get(consent_key(&subject, id.as_str()))? {
            Some(sealed) => open_consent(&self.keys, id.as_str(), &sealed).map(Some),
            None => Err(StoreError::Corrupt(format!(
                "consent {id}: index without statement"
            ))),
        }
    }

    /// Every consent statement about a child, in no particular order, read from the
    /// database. ([`super::repo::SledRecords`] caches what this returns, and drops a
    /// child's statements on every consent write, before the write is answered.)
    pub fn consents_about(&self, subject: &SubjectRef) -> Result<Vec<Consent>, StoreError> {
        let prefix = subject_prefix(b"c/", subject);
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (key, sealed) = item?;
            let id = id_after(&key, prefix.len(), ConsentId::parse)?;
            out.push(open_consent(&self.keys, id.as_str(), &sealed)?);
        }
        Ok(out)
    }

    // --- helpers ---

    fn write_content(&self, id: &RecordId, sealed: &[u8]) -> Result<(), StoreError> {
        let io =
            |what: &str, e: std::io::Error| StoreError::Io(format!("{what} content of {id}: {e}"));
        let path = self.content_dir.join(id.as_str());
        let tmp = self.content_dir.join(format!("{id}.tmp"));
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp).map_err(|e| io("creating", e))?;
        file.write_all(sealed).map_err(|e| io("writing", e))?;
        file.sync_data().map_err(|e| io("syncing", e))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(|e| io("naming", e))?;
        sync_dir(&self.content_dir)
    }

    /// Removes content files no record points to, and temporary files.
    fn remove_orphans(&self) -> Result<(), StoreError> {
        let entries = fs::read_dir(&self.content_dir)
            .map_err(|e| StoreError::Io(format!("listing record content: {e}")))?;
        let mut removed = 0usize;
        for entry in entries {
            let entry =
                entry.map_err(|e| StoreError::Io(format!("listing record content: {e}")))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let keep = match RecordId::parse(&name) {
                Ok(id) => self.tree.contains_key(record_ref_key(&id))?,
                Err(_) => false,
            };
            if !keep {
                fs::remove_file(entry.path())
                    .map_err(|e| StoreError::Io(format!("removing orphan content: {e}")))?;
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&self.content_dir)?;
            tracing::info!(
                removed,
                "removed record content files that no record points to"
            );
        }
        Ok(())
    }
}

// === what is stored ===

/// A record's metadata as sealed in the database.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredRecord {
    nhs_number: String,
    subject_ref: String,
    owner: String,
    owner_sector: String,
    category: String,
    summary: String,
    media_type: String,
    content_len: u64,
    shared_at: i64,
    retain_until: i64,
}

impl From<&Record> for StoredRecord {
    fn from(r: &Record) -> Self {
        StoredRecord {
            nhs_number: r.subject.digits(),
            subject_ref: r.subject_ref.as_str().to_owned(),
            owner: r.owner.to_string(),
            owner_sector: r.owner_sector.to_string(),
            category: r.category.to_string(),
            summary: r.summary.clone(),
            media_type: r.media_type.clone(),
            content_len: r.content_len,
            shared_at: micros(r.shared_at),
            retain_until: micros(r.retain_until),
        }
    }
}

impl StoredRecord {
    pub(crate) fn into_record(self, id: RecordId) -> Result<Record, String> {
        Ok(Record {
            id,
            subject: NhsNumber::parse(&self.nhs_number).map_err(|e| e.to_string())?,
            subject_ref: SubjectRef::from_hex(self.subject_ref),
            owner: AgencyId::parse(&self.owner).map_err(|e| e.to_string())?,
            owner_sector: self.owner_sector.parse().map_err(|e| format!("{e}"))?,
            category: self.category.parse().map_err(|e| format!("{e}"))?,
            summary: self.summary,
            media_type: self.media_type,
            content_len: self.content_len,
            shared_at: from_micros(self.shared_at)?,
            retain_until: from_micros(self.retain_until)?,
        })
    }
}

/// A consent statement as sealed in the database.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredConsent {
    nhs_number: String,
    subject_ref: String,
    state: String,
    given_by: String,
    purposes: Vec<String>,
    recipient_sectors: Vec<String>,
    recipient_agency_ids: Vec<String>,
    categories: Vec<String>,
    valid_until: Option<i64>,
    recorded_by: String,
    recorded_at: i64,
    withdrawn_at: Option<i64>,
    note: String,
    withdrawal_note: String,
}

impl From<&Consent> for StoredConsent {
    fn from(c: &Consent) -> Self {
        let s = &c.statement;
        StoredConsent {
            nhs_number: c.subject.digits(),
            subject_ref: s.subject.clone(),
            state: s.state.to_string(),
            given_by: s.given_by.to_string(),
            purposes: s.scope.purposes().iter().map(|p| p.to_string()).collect(),
            recipient_sectors: s
                .scope
                .recipient_sectors()
                .iter()
                .map(|p| p.to_string())
                .collect(),
            recipient_agency_ids: s
                .scope
                .recipient_agency_ids()
                .iter()
                .map(|p| p.to_string())
                .collect(),
            categories: s.scope.categories().iter().map(|p| p.to_string()).collect(),
            valid_until: s.scope.valid_until().map(micros),
            recorded_by: s.recorded_by.to_string(),
            recorded_at: micros(s.recorded_at),
            withdrawn_at: s.withdrawn_at.map(micros),
            note: c.note.clone(),
            withdrawal_note: c.withdrawal_note.clone(),
        }
    }
}

impl StoredConsent {
    pub(crate) fn into_consent(self, id: &str) -> Result<Consent, String> {
        fn parse_all<T: std::str::FromStr + Ord>(
            v: &[String],
        ) -> Result<std::collections::BTreeSet<T>, String>
        where
            T::Err: std::fmt::Display,
        {
            v.iter()
                .map(|s| s.parse::<T>().map_err(|e| e.to_string()))
                .collect()
        }
        let scope = ConsentScope::parse(
            parse_all(&self.purposes)?,
            parse_all(&self.recipient_sectors)?,
            parse_all(&self.recipient_agency_ids)?,
            parse_all(&self.categories)?,
            self.valid_until.map(from_micros).transpose()?,
        )
        .map_err(|e| e.to_string())?;
        Ok(Consent {
            statement: ConsentStatement {
                consent_id: id.to_owned(),
                subject: self.subject_ref,
                state: self.state.parse().map_err(|e| format!("{e}"))?,
                given_by: self.given_by.parse().map_err(|e| format!("{e}"))?,
                scope,
                recorded_by: AgencyId::parse(&self.recorded_by).map_err(|e| e.to_string())?,
                recorded_at: from_micros(self.recorded_at)?,
                withdrawn_at: self.withdrawn_at.map(from_micros).transpose()?,
            },
            subject: NhsNumber::parse(&self.nhs_number).map_err(|e| e.to_string())?,
            note: self.note,
            withdrawal_note: self.withdrawal_note,
        })
    }
}

// === keys, times, files ===

// === sealing, shared by every record store (sled here, PostgreSQL in `crate::pg`) ===

/// Seals `plain` with the data key, `context` as associated data.
pub(crate) fn seal(keys: &Keys, context: &[u8], plain: &[u8]) -> Result<Vec<u8>, StoreError> {
    keys.data_seal
        .seal(context, plain)
        .map_err(|e| StoreError::Io(format!("sealing: {e}")))
}

/// Opens a record's sealed metadata.
pub(crate) fn open_record(keys: &Keys, id: &RecordId, sealed: &[u8]) -> Result<Record, StoreError> {
    let plain = keys
        .data_seal
        .open(&meta_context(id), sealed)
        .map_err(|_| StoreError::Corrupt(format!("record {id}: metadata does not open")))?;
    let stored: StoredRecord = serde_json::from_slice(&plain)
        .map_err(|e| StoreError::Corrupt(format!("record {id}: {e}")))?;
    stored
        .into_record(id.clone())
        .map_err(|e| StoreError::Corrupt(format!("record {id}: {e}")))
}

/// Opens a record's sealed content.
fn open_content(keys: &Keys, id: &RecordId, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
    keys.data_seal
        .open(&content_context(id), sealed)
        .map_err(|_| StoreError::Corrupt(format!("record {id}: content does not open")))
}

/// Opens a sealed consent statement.
pub(crate) fn open_consent(keys: &Keys, id: &str, sealed: &[u8]) -> Result<Consent, StoreError> {
    let plain = keys
        .data_seal
        .open(id.as_bytes(), sealed)
        .map_err(|_| StoreError::Corrupt(format!("consent {id}: does not open")))?;
    let stored: StoredConsent = serde_json::from_slice(&plain)
        .map_err(|e| StoreError::Corrupt(format!("consent {id}: {e}")))?;
    stored
        .into_consent(id)
        .map_err(|e| StoreError::Corrupt(format!("consent {id}: {e}")))
}

/// Microseconds since the epoch (saturating): the precision everything is stored in.
pub fn micros(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1000).unwrap_or(if t.year() < 1970 {
        i64::MIN
    } else {
        i64::MAX
    })
}

/// The moment `micros` microseconds after the epoch.
pub fn from_micros(micros: i64) -> Result<OffsetDateTime, String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .map_err(|e| format!("time out of range: {e}"))
}

/// `t` truncated to what the store keeps, so that what a call returns equals what
/// a later read returns.
pub fn stored_time(t: OffsetDateTime) -> OffsetDateTime {
    from_micros(micros(t)).unwrap_or(t)
}

fn time_key(t: OffsetDateTime) -> [u8; 8] {
    ((micros(t) as u64) ^ (1 << 63)).to_be_bytes()
}

fn subject_prefix(space: &[u8], subject: &SubjectRef) -> Vec<u8> {
    let mut k = space.to_vec();
    k.extend_from_slice(subject.as_str().as_bytes());
    k.push(b'/');
    k
}

fn record_key(subject: &SubjectRef, id: &RecordId) -> Vec<u8> {
    let mut k = subject_prefix(b"s/", subject);
    k.extend_from_slice(id.as_str().as_bytes());
    k
}

fn record_ref_key(id: &RecordId) -> Vec<u8> {
    [b"r/".as_slice(), id.as_str().as_bytes()].concat()
}

fn retention_key(retain_until: OffsetDateTime, id: &RecordId) -> Vec<u8> {
    let mut k = b"t/".to_vec();
    k.extend_from_slice(&time_key(retain_until));
    k.push(b'/');
    k.extend_from_slice(id.as_str().as_bytes());
    k
}

fn consent_key(subject: &SubjectRef, id: &str) -> Vec<u8> {
    let mut k = subject_prefix(b"c/", subject);
    k.extend_from_slice(id.as_bytes());
    k
}

fn consent_ref_key(id: &str) -> Vec<u8> {
    [b"k/".as_slice(), id.as_bytes()].concat()
}

pub(crate) fn meta_context(id: &RecordId) -> Vec<u8> {
    format!("{id}/meta").into_bytes()
}

pub(crate) fn content_context(id: &RecordId) -> Vec<u8> {
    format!("{id}/content").into_bytes()
}

fn subject_ref_of(v: &[u8]) -> Result<SubjectRef, StoreError> {
    let text = std::str::from_utf8(v).map_err(|_| StoreError::Corrupt("subject index".into()))?;
    Ok(SubjectRef::from_hex(text.to_owned()))
}

fn id_after<T>(
    key: &[u8],
    at: usize,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, StoreError> {
    key.get(at..)
        .and_then(|rest| std::str::from_utf8(rest).ok())
        .and_then(|s| parse(s).ok())
        .ok_or_else(|| StoreError::Corrupt("malformed index key".into()))
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Io(format!("encoding: {e}")))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::Io(format!("syncing {}: {e}", dir.display())))
}

fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", path.display()));
    fs::create_dir_all(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{RecordCategory, Sector};
    use time::macros::datetime;

    fn record(keys: &Keys, n: u8, retain_until: OffsetDateTime) -> Record {
        let subject = NhsNumber::parse("9434765919").expect("valid");
        Record {
            id: RecordId::from_random([n; 16]),
            subject_ref: keys.subject_ref(&subject),
            subject,
            owner: AgencyId::parse("nhs-guys").expect("id"),
            owner_sector: Sector::Health,
            category: RecordCategory::UnscheduledCareAttendance,
            summary: "A&E attendance".into(),
            media_type: "text/plain".into(),
            content_len: 5,
            shared_at: datetime!(2026-03-02 09:00 UTC),
            retain_until,
        }
    }

    #[test]
    fn records_round_trip_expire_in_order_and_purge_completely() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = Arc::new(Keys::load_or_create(dir.path(), None).expect("keys"));
        let store = RecordStore::open(
            &dir.path().join("records"),
            &dir.path().join("record-content"),
            keys.clone(),
        )
        .expect("open");
        let early = record(&keys, 1, datetime!(2026-03-03 09:00 UTC));
        let late = record(&keys, 2, datetime!(2026-03-04 09:00 UTC));
        store.put_record(&late, b"late!").expect("put");
        store.put_record(&early, b"early").expect("put");
        assert_eq!(store.record(&early.id).expect("read"), Some(early.clone()));
        assert_eq!(store.content(&early.id).expect("content"), b"early");
        assert_eq!(
            store.records_about(&early.subject_ref).expect("scan").len(),
            2
        );

        assert!(store
            .expired_by(datetime!(2026-03-03 08:59 UTC), 10)
            .expect("due")
            .is_empty());
        let due = |t| -> Vec<RecordId> {
            store
                .expired_by(t, 10)
                .expect("due")
                .into_iter()
                .map(|d| d.id)
                .collect()
        };
        assert_eq!(due(datetime!(2026-03-03 09:00 UTC)), vec![early.id.clone()]);
        assert_eq!(
            due(datetime!(2026-03-05 00:00 UTC)),
            vec![early.id.clone(), late.id.clone()]
        );

        store.purge(&early).expect("purge");
        store.purge(&early).expect("purging again is harmless");
        assert_eq!(store.record(&early.id).expect("read"), None);
        assert!(!dir
            .path()
            .join("record-content")
            .join(early.id.as_str())
            .exists());
        assert_eq!(due(datetime!(2026-03-05 00:00 UTC)), vec![late.id.clone()]);
    }

    #[test]
    fn orphan_content_is_removed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = Arc::new(Keys::load_or_create(dir.path(), None).expect("keys"));
        let content_dir = dir.path().join("record-content");
        {
            let store = RecordStore::open(&dir.path().join("records"), &content_dir, keys.clone())
                .expect("open");
            store
                .put_record(&record(&keys, 1, datetime!(2030-01-01 00:00 UTC)), b"kept")
                .expect("put");
        }
        let orphan = content_dir.join(RecordId::from_random([9; 16]).as_str());
        fs::write(&orphan, b"sealed").expect("write");
        fs::write(content_dir.join("r-x.tmp"), b"partial").expect("write");
        // sled's flusher thread lets go of the database's file lock a moment after
        // the store is dropped: retry while the lock is still held (a loaded
        // machine made this race visible).
        let reopen = || RecordStore::open(&dir.path().join("records"), &content_dir, keys.clone());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let _store = loop {
            match reopen() {
                Ok(store) => break store,
                Err(StoreError::Io(e))
                    if e.contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("reopen: {e:?}"),
            }
        };
        let left: Vec<_> = fs::read_dir(&content_dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
}
