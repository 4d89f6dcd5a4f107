//! The concerns' sled database, `data_dir/store`, apart from the audit log.
//!
//! One tree, `concerns`, holds five key spaces, so that everything one change
//! touches is written in **one** atomic sled batch:
//!
//! | key | value |
//! | --- | --- |
//! | `c/<concern id>` | the whole concern, JSON, sealed (AES-256-GCM, the concern id as associated data) |
//! | `i/<agency>/<cursor u64 BE>` | an inbox event, JSON (ids, agency ids and times only) |
//! | `n/<agency>` | the agency's last inbox cursor, u64 BE (cursors start at 1) |
//! | `k/<SHA-256(sender ‖ 0 ‖ request_id)>` | the concern an idempotency key raised |
//! | `d/<due, µs, sign-flipped u64 BE>/<concern id>` | a deadline for the sweeper |
//!
//! No NHS number, narrative or note is ever written in clear: they live only in the
//! sealed concern. Idempotency keys are hashed because a caller chooses them.
//!
//! **Durability.** Writers take a short lock (so cursors are handed out in order and
//! never twice), apply their batch, release the lock, then make it durable: sled's
//! flush, then `fdatasync` of the database file (sled 0.34's flush alone does not
//! empty the disk cache). Only then is a change reported, and only then is an
//! agency's *durable cursor* raised. Readers of inboxes (streams, ListInbox) never
//! look past the durable cursor, so no subscriber ever sees an event that a crash
//! could take back and hand out again under the same cursor.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;

use super::model::{
    Concern, ConcernId, Decision, DecisionRecord, Delivery, Escalation, InboxEvent,
    OverrideNoticeEvent,
};
use crate::domain::{AgencyId, ConcernCategory, NhsNumber, Urgency};
use crate::store::keys::SubjectRef;
use crate::store::Keys;

/// Why the store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// sled or the file system failed.
    #[error("concern store I/O: {0}")]
    Io(String),
    /// A stored value is malformed or does not open.
    #[error("concern store damaged: {0}")]
    Corrupt(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// The idempotency key of a raise: a hash of the sender and its `request_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(pub(crate) [u8; 32]);

impl IdempotencyKey {
    /// The key of `request_id` from `sender`.
    pub fn new(sender: &AgencyId, request_id: &str) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(sender.as_str().as_bytes());
        ctx.update(&[0]);
        ctx.update(request_id.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        IdempotencyKey(out)
    }

    /// As text, e.g. for a lock's name.
    pub fn hex(&self) -> String {
        crate::tls::hex(&self.0)
    }
}

/// What [`ConcernStore::raise`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raised {
    /// Stored, with one inbox event per recipient.
    New,
    /// The idempotency key had already raised this concern; nothing was written.
    Existing(ConcernId),
}

/// The part of a change beyond the concern's own record.
#[derive(Debug, Default)]
pub struct Edit {
    /// Whether the concern's record changed and must be rewritten.
    pub record: bool,
    /// Events to append, in order.
    pub events: Vec<(AgencyId, InboxEvent)>,
    /// Remove the concern's deadline entries due at or before this moment.
    pub settle_until: Option<OffsetDateTime>,
}

const TREE: &str = "concerns";

/// The concern store. Cheap to clone.
#[derive(Clone)]
pub struct ConcernStore {
    tree: sled::Tree,
    sync_point: Arc<crate::store::SyncPoint>,
    keys: Arc<Keys>,
    writer: Arc<Mutex<()>>,
    durable: Arc<HashMap<AgencyId, watch::Sender<u64>>>,
}

// === impl ConcernStore ===

impl ConcernStore {
    /// Opens (creating) the store in `dir`. `agencies` are those whose durable cursors
    /// are watched (the registered agencies).
    pub fn open(
        dir: &Path,
        keys: Arc<Keys>,
        agencies: impl IntoIterator<Item = AgencyId>,
    ) -> Result<ConcernStore, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .open()?;
        let tree = db.open_tree(TREE)?;
        let data_file = File::open(dir.join("db"))
            .map_err(|e| StoreError::Io(format!("cannot open the store's database file: {e}")))?;
        // The sync point keeps the database open for as long as the store lives.
        let sync_point = Arc::new(crate::store::SyncPoint::new(db.clone(), data_file));
        let mut durable = HashMap::new();
        for agency in agencies {
            let last = read_u64(tree.get(cursor_key(&agency))?.as_deref())?;
            durable.insert(agency, watch::channel(last).0);
        }
        Ok(ConcernStore {
            tree,
            sync_point,
            keys,
            writer: Arc::new(Mutex::new(())),
            durable: Arc::new(durable),
        })
    }

    /// The durability point: sled's flush, then fdatasync of its file.
    pub fn sync(&self) -> Result<(), StoreError> {
        // Concurrent writers share one flush + fdatasync (group commit).
        self.sync_point
            .sync()
            .map_err(|e| StoreError::Io(format!("flush + fdatasync: {e}")))
    }

    /// The concern with this id.
    pub fn get(&self, id: &ConcernId) -> Result<Option<Concern>, StoreError> {
        match self.tree.get(concern_key(id))? {
            Some(sealed) => open_concern(&self.keys, id, &sealed).map(Some),
            None => Ok(None),
        }
    }

    /// The concern an idempotency key raised, if any.
    pub fn raised_by_key(&self, key: &IdempotencyKey) -> Result<Option<ConcernId>, StoreError> {
        match self.tree.get(idempotency_key(key))? {
            Some(v) => {
                let text = std::str::from_utf8(&v)
                    .map_err(|_| StoreError::Corrupt("idempotency entry".into()))?;
                ConcernId::parse(text)
                    .map(Some)
                    .map_err(|_| StoreError::Corrupt("idempotency entry".into()))
            }
            None => Ok(None),
        }
    }

    /// Stores a new concern with its idempotency key, its deadlines, and a Concern
    /// event in every recipient's inbox, atomically and durably. If the key has
    /// already raised a concern, writes nothing and names it.
    pub fn raise(
        &self,
        concern: &Concern,
        key: Option<&IdempotencyKey>,
    ) -> Result<Raised, StoreError> {
        let sealed = seal_concern(&self.keys, concern)?;
        let appended = {
            let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(key) = key {
                if let Some(existing) = self.raised_by_key(key)? {
                    return Ok(Raised::Existing(existing));
                }
            }
            let mut batch = sled::Batch::default();
            batch.insert(concern_key(&concern.id), sealed);
            if let Some(key) = key {
                batch.insert(idempotency_key(key), concern.id.as_str().as_bytes());
            }
            for d in &concern.recipients {
                batch.insert(deadline_key(d.due_at, &concern.id), &[]);
            }
            let events: Vec<(AgencyId, InboxEvent)> = concern
                .recipients
                .iter()
                .map(|d| (d.agency.clone(), InboxEvent::Concern(concern.id.clone())))
                .collect();
            let appended = self.append_events(&mut batch, &events)?;
            self.tree.apply_batch(batch)?;
            appended
        };
        self.sync()?;
        self.publish(&appended);
        Ok(Raised::New)
    }

    /// Changes a concern: `edit` may modify it and says what else to write. The
    /// concern's record, the events and the deadline removals are written in one
    /// batch and made durable before this returns the concern as it now stands.
    /// `None` when there is no such concern.
    pub fn update(
        &self,
        id: &ConcernId,
        edit: impl FnOnce(&mut Concern) -> Edit,
    ) -> Result<Option<Concern>, StoreError> {
        let (concern, appended) = {
            let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let Some(mut concern) = self.get(id)? else {
                return Ok(None);
            };
            let edit = edit(&mut concern);
            if !edit.record && edit.events.is_empty() && edit.settle_until.is_none() {
                return Ok(Some(concern));
            }
            let mut batch = sled::Batch::default();
            if edit.record {
                batch.insert(concern_key(id), seal_concern(&self.keys, &concern)?);
            }
            if let Some(until) = edit.settle_until {
                for key in self.deadline_keys(id, until)? {
                    batch.remove(key);
                }
            }
            let appended = self.append_events(&mut batch, &edit.events)?;
            self.tree.apply_batch(batch)?;
            (concern, appended)
        };
        self.sync()?;
        self.publish(&appended);
        Ok(Some(concern))
    }

    /// Removes a concern's deadline entries due at or before `until` (its recipients
    /// have acknowledged, so there is nothing to escalate).
    pub fn settle(&self, id: &ConcernId, until: OffsetDateTime) -> Result<(), StoreError> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch = sled::Batch::default();
        for key in self.deadline_keys(id, until)? {
            batch.remove(key);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// The concerns with a deadline at or before `now`, each once, earliest first.
    pub fn due_by(&self, now: OffsetDateTime) -> Result<Vec<ConcernId>, StoreError> {
        let end = deadline_prefix_until(now);
        let mut out: Vec<ConcernId> = Vec::new();
        for kv in self.tree.range(b"d/".to_vec()..end) {
            let (k, _) = kv?;
            let id = std::str::from_utf8(&k[10..])
                .ok()
                .and_then(|s| ConcernId::parse(s).ok())
                .ok_or_else(|| StoreError::Corrupt("deadline entry".into()))?;
            if !out.contains(&id) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Up to `limit` events of `agency`'s inbox with cursors in `after+1..=upto`.
    pub fn events(
        &self,
        agency: &AgencyId,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, InboxEvent)>, StoreError> {
        if after >= upto {
            return Ok(Vec::new());
        }
        let start = inbox_key(agency, after.saturating_add(1));
        let end = inbox_key(agency, upto);
        let mut out = Vec::new();
        for kv in self.tree.range(start..=end).take(limit) {
            let (k, v) = kv?;
            let cursor = read_u64(Some(&k[k.len() - 8..]))?;
            out.push((cursor, decode_event(&self.keys, &v)?));
        }
        Ok(out)
    }

    /// Appends one event to `agency`'s inbox durably (flush + fdatasync) and
    /// announces it to subscribers. Returns its cursor.
    pub fn append_event(&self, agency: &AgencyId, event: InboxEvent) -> Result<u64, StoreError> {
        let appended = {
            let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let mut batch = sled::Batch::default();
            let appended = self.append_events(&mut batch, &[(agency.clone(), event)])?;
            self.tree.apply_batch(batch)?;
            appended
        };
        self.sync()?;
        self.publish(&appended);
        appended
            .first()
            .map(|(_, cursor)| *cursor)
            .ok_or_else(|| StoreError::Corrupt("event not appended".into()))
    }

    /// A watch on `agency`'s durable cursor: the newest event a reader may see.
    pub fn durable_cursor(&self, agency: &AgencyId) -> Option<watch::Receiver<u64>> {
        self.durable.get(agency).map(|s| s.subscribe())
    }

    /// Makes everything durable (at shutdown).
    pub fn close(&self) -> Result<(), StoreError> {
        self.sync()
    }

    // --- helpers ---

    /// Adds events to `batch` with the next cursors of their agencies. The writer
    /// lock must be held.
    fn append_events(
        &self,
        batch: &mut sled::Batch,
        events: &[(AgencyId, InboxEvent)],
    ) -> Result<Vec<(AgencyId, u64)>, StoreError> {
        let mut next: HashMap<&AgencyId, u64> = HashMap::new();
        let mut appended = Vec::with_capacity(events.len());
        for (agency, event) in events {
            let last = match next.get(agency) {
                Some(n) => *n,
                None => read_u64(self.tree.get(cursor_key(agency))?.as_deref())?,
            };
            let cursor = last + 1;
            next.insert(agency, cursor);
            batch.insert(inbox_key(agency, cursor), encode_event(&self.keys, event)?);
            appended.push((agency.clone(), cursor));
        }
        for (agency, cursor) in next {
            batch.insert(cursor_key(agency), &cursor.to_be_bytes());
        }
        Ok(appended)
    }

    fn publish(&self, appended: &[(AgencyId, u64)]) {
        for (agency, cursor) in appended {
            if let Some(tx) = self.durable.get(agency) {
                tx.send_if_modified(|v| {
                    let newer = *cursor > *v;
                    if newer {
                        *v = *cursor;
                    }
                    newer
                });
            }
        }
    }

    fn deadline_keys(
        &self,
        id: &ConcernId,
        until: OffsetDateTime,
    ) -> Result<Vec<sled::IVec>, StoreError> {
        let mut keys = Vec::new();
        for kv in self
            .tree
            .range(b"d/".to_vec()..deadline_prefix_until(until))
        {
            let (k, _) = kv?;
            if &k[10..] == id.as_str().as_bytes() {
                keys.push(k);
            }
        }
        Ok(keys)
    }
}

fn concern_key(id: &ConcernId) -> Vec<u8> {
    [b"c/".as_slice(), id.as_str().as_bytes()].concat()
}

fn idempotency_key(key: &IdempotencyKey) -> Vec<u8> {
    [b"k/".as_slice(), &key.0].concat()
}

fn cursor_key(agency: &AgencyId) -> Vec<u8> {
    [b"n/".as_slice(), agency.as_str().as_bytes()].concat()
}

/// `i/<agency>/<cursor>`: agency ids have no `/`, so one agency's events are
/// contiguous and in cursor order.
fn inbox_key(agency: &AgencyId, cursor: u64) -> Vec<u8> {
    [
        b"i/".as_slice(),
        agency.as_str().as_bytes(),
        b"/",
        &cursor.to_be_bytes(),
    ]
    .concat()
}

/// Microseconds with the sign bit flipped sort as unsigned big-endian bytes.
fn sortable_micros(t: OffsetDateTime) -> [u8; 8] {
    ((micros(t) as u64) ^ (1 << 63)).to_be_bytes()
}

fn deadline_key(due: OffsetDateTime, id: &ConcernId) -> Vec<u8> {
    [
        b"d/".as_slice(),
        &sortable_micros(due),
        id.as_str().as_bytes(),
    ]
    .concat()
}

/// The exclusive end of the deadline keys due at or before `t`.
fn deadline_prefix_until(t: OffsetDateTime) -> Vec<u8> {
    let next = micros(t).saturating_add(1);
    [
        b"d/".as_slice(),
        &(((next as u64) ^ (1 << 63)).to_be_bytes()),
    ]
    .concat()
}

fn read_u64(v: Option<&[u8]>) -> Result<u64, StoreError> {
    match v {
        None => Ok(0),
        Some(b) => b
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("malformed counter".into())),
    }
}

/// Microseconds since the epoch.
pub fn micros(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1000) as i64
}

/// The instant `micros` microseconds after the epoch (saturating at the ends of
/// what `time` represents).
pub fn from_micros(micros: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).unwrap_or(if micros < 0 {
        time::PrimitiveDateTime::MIN.assume_utc()
    } else {
        time::PrimitiveDateTime::MAX.assume_utc()
    })
}

// === stored forms ===

#[derive(Serialize, Deserialize)]
pub(crate) struct StoredConcern {
    id: String,
    nhs_number: String,
    subject_ref: String,
    raised_by: String,
    category: String,
    urgency: String,
    narrative: String,
    recipients: Vec<StoredDelivery>,
    raised_at: i64,
    decision: Option<StoredDecision>,
    /// Absent in concerns stored before concerns recorded their front door.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    front_door: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct StoredDelivery {
    agency: String,
    due_at: i64,
    delivered_at: Option<i64>,
    acknowledged_at: Option<i64>,
    note: String,
    escalated: bool,
}

#[derive(Serialize, Deserialize)]
struct StoredDecision {
    decision: String,
    lead_practitioner: String,
    note: String,
    decided_at: i64,
    decided_by: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StoredEvent {
    Concern {
        concern_id: String,
    },
    Escalation {
        concern_id: String,
        reason: String,
        due_at: i64,
    },
    OverrideNotice {
        record_id: String,
        recipient: String,
        /// The justification, sealed (base64): it is free text.
        justification: String,
        audit_seq: u64,
    },
}

/// The sealing context of an override notice's justification.
fn notice_context(record_id: &str, audit_seq: u64) -> Vec<u8> {
    format!("override-notice:{record_id}:{audit_seq}").into_bytes()
}

impl From<&Concern> for StoredConcern {
    fn from(c: &Concern) -> Self {
        StoredConcern {
            id: c.id.as_str().to_owned(),
            nhs_number: c.subject.digits(),
            subject_ref: c.subject_ref.as_str().to_owned(),
            raised_by: c.raised_by.as_str().to_owned(),
            category: c.category.as_str().to_owned(),
            urgency: c.urgency.as_str().to_owned(),
            narrative: c.narrative.clone(),
            recipients: c
                .recipients
                .iter()
                .map(|d| StoredDelivery {
                    agency: d.agency.as_str().to_owned(),
                    due_at: micros(d.due_at),
                    delivered_at: d.delivered_at.map(micros),
                    acknowledged_at: d.acknowledged_at.map(micros),
                    note: d.note.clone(),
                    escalated: d.escalated,
                })
                .collect(),
            raised_at: micros(c.raised_at),
            decision: c.decision.as_ref().map(|d| StoredDecision {
                decision: d.decision.as_str().to_owned(),
                lead_practitioner: d.lead_practitioner.clone(),
                note: d.note.clone(),
                decided_at: micros(d.decided_at),
                decided_by: d.decided_by.as_str().to_owned(),
            }),
            front_door: c.front_door.as_ref().map(|a| a.as_str().to_owned()),
        }
    }
}

impl StoredConcern {
    pub(crate) fn into_concern(self) -> Option<Concern> {
        let mut recipients = Vec::with_capacity(self.recipients.len());
        for d in self.recipients {
            recipients.push(Delivery {
                agency: AgencyId::parse(&d.agency).ok()?,
                due_at: from_micros(d.due_at),
                delivered_at: d.delivered_at.map(from_micros),
                acknowledged_at: d.acknowledged_at.map(from_micros),
                note: d.note,
                escalated: d.escalated,
            });
        }
        let decision = match self.decision {
            Some(d) => Some(DecisionRecord {
                decision: Decision::from_name(&d.decision)?,
                lead_practitioner: d.lead_practitioner,
                note: d.note,
                decided_at: from_micros(d.decided_at),
                decided_by: AgencyId::parse(&d.decided_by).ok()?,
            }),
            None => None,
        };
        let front_door = match self.front_door {
            Some(a) => Some(AgencyId::parse(&a).ok()?),
            None => None,
        };
        Some(Concern {
            id: ConcernId::parse(&self.id).ok()?,
            subject: NhsNumber::parse(&self.nhs_number).ok()?,
            subject_ref: SubjectRef::from_hex(self.subject_ref),
            raised_by: AgencyId::parse(&self.raised_by).ok()?,
            category: self.category.parse::<ConcernCategory>().ok()?,
            urgency: self.urgency.parse::<Urgency>().ok()?,
            narrative: self.narrative,
            recipients,
            raised_at: from_micros(self.raised_at),
            decision,
            front_door,
        })
    }
}

// === sealing, shared by every concern store (sled here, PostgreSQL in `crate::pg`) ===

/// Seals a concern with the data key, its id as associated data.
pub(crate) fn seal_concern(keys: &Keys, concern: &Concern) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_vec(&StoredConcern::from(concern))
        .map_err(|e| StoreError::Corrupt(format!("encoding a concern: {e}")))?;
    keys.data_seal
        .seal(concern.id.as_str().as_bytes(), &json)
        .map_err(|e| StoreError::Io(e.to_string()))
}

/// Opens the concern sealed under `id`; corrupt if it does not open, does not
/// parse, or holds another concern.
pub(crate) fn open_concern(
    keys: &Keys,
    id: &ConcernId,
    sealed: &[u8],
) -> Result<Concern, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("concern {id}: {what}"));
    let json = keys
        .data_seal
        .open(id.as_str().as_bytes(), sealed)
        .map_err(|_| corrupt("does not open"))?;
    let stored: StoredConcern =
        serde_json::from_slice(&json).map_err(|_| corrupt("malformed record"))?;
    let concern = stored
        .into_concern()
        .ok_or_else(|| corrupt("malformed field"))?;
    if &concern.id != id {
        return Err(corrupt("stored under another id"));
    }
    Ok(concern)
}

pub(crate) fn encode_event(keys: &Keys, event: &InboxEvent) -> Result<Vec<u8>, StoreError> {
    use base64::Engine as _;
    let stored = match event {
        InboxEvent::Concern(id) => StoredEvent::Concern {
            concern_id: id.as_str().to_owned(),
        },
        InboxEvent::Escalation(e) => StoredEvent::Escalation {
            concern_id: e.concern_id.as_str().to_owned(),
            reason: e.reason.clone(),
            due_at: micros(e.due_at),
        },
        InboxEvent::OverrideNotice(n) => {
            let sealed = keys
                .data_seal
                .seal(
                    &notice_context(&n.record_id, n.audit_seq),
                    n.justification.as_bytes(),
                )
                .map_err(|e| StoreError::Io(e.to_string()))?;
            StoredEvent::OverrideNotice {
                record_id: n.record_id.clone(),
                recipient: n.recipient.as_str().to_owned(),
                justification: base64::engine::general_purpose::STANDARD.encode(sealed),
                audit_seq: n.audit_seq,
            }
        }
    };
    serde_json::to_vec(&stored).map_err(|e| StoreError::Corrupt(format!("encoding an event: {e}")))
}

pub(crate) fn decode_event(keys: &Keys, v: &[u8]) -> Result<InboxEvent, StoreError> {
    use base64::Engine as _;
    let corrupt = || StoreError::Corrupt("malformed inbox event".into());
    let stored: StoredEvent = serde_json::from_slice(v).map_err(|_| corrupt())?;
    Ok(match stored {
        StoredEvent::Concern { concern_id } => {
            InboxEvent::Concern(ConcernId::parse(&concern_id).map_err(|_| corrupt())?)
        }
        StoredEvent::Escalation {
            concern_id,
            reason,
            due_at,
        } => InboxEvent::Escalation(Escalation {
            concern_id: ConcernId::parse(&concern_id).map_err(|_| corrupt())?,
            reason,
            due_at: from_micros(due_at),
        }),
        StoredEvent::OverrideNotice {
            record_id,
            recipient,
            justification,
            audit_seq,
        } => {
            let sealed = base64::engine::general_purpose::STANDARD
                .decode(justification)
                .map_err(|_| corrupt())?;
            let plain = keys
                .data_seal
                .open(&notice_context(&record_id, audit_seq), &sealed)
                .map_err(|_| corrupt())?;
            InboxEvent::OverrideNotice(OverrideNoticeEvent {
                recipient: AgencyId::parse(&recipient).map_err(|_| corrupt())?,
                justification: String::from_utf8(plain).map_err(|_| corrupt())?,
                record_id,
                audit_seq,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn agency(s: &str) -> AgencyId {
        AgencyId::parse(s).unwrap()
    }

    fn open(dir: &Path) -> ConcernStore {
        let keys = Arc::new(Keys::load_or_create(dir, None).unwrap());
        ConcernStore::open(
            &dir.join("store"),
            keys,
            ["school-oakfield", "csc-southwark", "police-met"].map(agency),
        )
        .unwrap()
    }

    fn concern(id: u8, due: OffsetDateTime) -> Concern {
        let keys_free_ref = SubjectRef::from_hex("cd".repeat(32));
        Concern {
            id: ConcernId::from_random([id; 16]),
            subject: NhsNumber::parse("9434765919").unwrap(),
            subject_ref: keys_free_ref,
            raised_by: agency("police-met"),
            category: ConcernCategory::DomesticAbuse,
            urgency: Urgency::Urgent,
            narrative: "bruising seen on the left arm".into(),
            recipients: ["school-oakfield", "csc-southwark"]
                .map(|a| Delivery {
                    agency: agency(a),
                    due_at: due,
                    delivered_at: None,
                    acknowledged_at: None,
                    note: String::new(),
                    escalated: false,
                })
                .to_vec(),
            raised_at: datetime!(2026-11-23 10:00:00.123456 UTC),
            decision: None,
            front_door: Some(agency("csc-southwark")),
        }
    }

    #[test]
    fn a_concern_sealed_without_its_front_door_opens_with_none() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::load_or_create(dir.path(), None).unwrap();
        let mut older = concern(3, datetime!(2026-11-23 14:00 UTC));
        older.front_door = None;
        let sealed = seal_concern(&keys, &older).unwrap();
        let json = keys
            .data_seal
            .open(older.id.as_str().as_bytes(), &sealed)
            .unwrap();
        assert!(
            !String::from_utf8(json).unwrap().contains("front_door"),
            "stored as an older gateway stored it"
        );
        assert_eq!(open_concern(&keys, &older.id, &sealed).unwrap(), older);
    }

    #[test]
    fn a_raise_is_stored_sealed_with_one_event_per_recipient_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let due = datetime!(2026-11-23 14:00 UTC);
        let c = concern(1, due);
        let key = IdempotencyKey::new(&c.raised_by, "req-1");
        {
            let store = open(dir.path());
            let mut school = store.durable_cursor(&agency("school-oakfield")).unwrap();
            assert_eq!(*school.borrow_and_update(), 0);
            assert_eq!(store.raise(&c, Some(&key)).unwrap(), Raised::New);
            assert_eq!(*school.borrow(), 1, "durable cursor published");
            // The same key raises nothing new.
            let again = concern(2, due);
            assert_eq!(
                store.raise(&again, Some(&key)).unwrap(),
                Raised::Existing(c.id.clone())
            );
            assert_eq!(store.get(&again.id).unwrap(), None);
            assert_eq!(store.get(&c.id).unwrap(), Some(c.clone()));
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.get(&c.id).unwrap(), Some(c.clone()));
        assert_eq!(store.raised_by_key(&key).unwrap(), Some(c.id.clone()));
        let school = agency("school-oakfield");
        assert_eq!(*store.durable_cursor(&school).unwrap().borrow(), 1);
        assert_eq!(
            store.events(&school, 0, 1, 10).unwrap(),
            vec![(1, InboxEvent::Concern(c.id.clone()))]
        );
        assert!(store.events(&school, 1, 1, 10).unwrap().is_empty());
        drop(store);

        for file in files_under(dir.path()) {
            let bytes = std::fs::read(&file).unwrap();
            for needle in [b"bruising".as_slice(), b"9434765919"] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "{} holds clear text",
                    file.display()
                );
            }
        }
    }

    #[test]
    fn updates_append_events_with_increasing_cursors_and_settle_deadlines() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let early = datetime!(2026-11-23 11:00 UTC);
        let a = concern(1, early);
        let b = concern(2, datetime!(2026-11-23 15:00 UTC));
        store.raise(&a, None).unwrap();
        store.raise(&b, None).unwrap();
        assert_eq!(
            store.due_by(datetime!(2026-11-23 10:59 UTC)).unwrap(),
            vec![]
        );
        assert_eq!(store.due_by(early).unwrap(), vec![a.id.clone()]);
        assert_eq!(
            store.due_by(datetime!(2026-11-24 00:00 UTC)).unwrap(),
            vec![a.id.clone(), b.id.clone()]
        );

        let police = agency("police-met");
        let escalation = InboxEvent::Escalation(Escalation {
            concern_id: a.id.clone(),
            reason: "late".into(),
            due_at: early,
        });
        let after = store
            .update(&a.id, |c| {
                c.mark_escalated(&[agency("school-oakfield")]);
                Edit {
                    record: true,
                    events: vec![(police.clone(), escalation.clone())],
                    settle_until: Some(early),
                }
            })
            .unwrap()
            .unwrap();
        assert!(after.recipients[0].escalated);
        assert_eq!(store.get(&a.id).unwrap().unwrap(), after);
        assert_eq!(
            store.events(&police, 0, 99, 10).unwrap(),
            vec![(1, escalation)]
        );
        assert_eq!(*store.durable_cursor(&police).unwrap().borrow(), 1);
        assert_eq!(
            store.due_by(datetime!(2026-11-24 00:00 UTC)).unwrap(),
            vec![b.id.clone()]
        );
        store
            .settle(&b.id, datetime!(2026-11-24 00:00 UTC))
            .unwrap();
        assert!(store
            .due_by(datetime!(2026-11-24 00:00 UTC))
            .unwrap()
            .is_empty());

        let school = agency("school-oakfield");
        let events = store.events(&school, 0, 2, 10).unwrap();
        assert_eq!(events.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(store.events(&school, 1, 2, 10).unwrap().len(), 1);
        assert_eq!(
            store.events(&school, 0, 1, 10).unwrap().len(),
            1,
            "upto bounds"
        );
        assert!(store
            .update(&ConcernId::from_random([9; 16]), |_| Edit::default())
            .unwrap()
            .is_none());
    }

    fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
        out
    }

    #[test]
    fn times_before_and_after_the_epoch_sort_in_order() {
        let before = datetime!(1969-12-31 23:59:59 UTC);
        let after = datetime!(1970-01-01 00:00:01 UTC);
        assert!(sortable_micros(before) < sortable_micros(after));
        assert_eq!(from_micros(micros(after)), after);
    }
}
