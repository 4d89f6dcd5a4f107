//! What an audit entry says, before the writer gives it a seq and a time.

use crate::identity::Caller;
use crate::proto::v1::{
    ActorRole, AuditAction, AuditEntry, AuditOutcome, DisclosureBasis, Purpose as PbPurpose,
};
use crate::store::keys::SubjectRef;

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// The registered id, or `system`.
    pub id: String,
    /// The role.
    pub role: ActorRole,
    /// Lower-case hex SHA-256 of the actor's certificate; empty for the system.
    pub cert_sha256: String,
}

impl Actor {
    /// The gateway itself (sweepers, SIGHUP reloads).
    pub fn system() -> Self {
        Actor {
            id: "system".to_owned(),
            role: ActorRole::System,
            cert_sha256: String::new(),
        }
    }
}

impl From<&Caller> for Actor {
    fn from(c: &Caller) -> Self {
        Actor {
            id: c.id.as_str().to_owned(),
            role: match c.role {
                crate::domain::Role::Agency => ActorRole::Agency,
                crate::domain::Role::Auditor => ActorRole::Auditor,
                crate::domain::Role::Operator => ActorRole::Operator,
            },
            cert_sha256: crate::tls::hex(&c.cert_sha256),
        }
    }
}

/// An entry to append: everything but its seq and time, which the writer assigns.
/// Holds no NHS number (only a [`SubjectRef`]) and no narrative or content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// Who acted.
    pub actor: Actor,
    /// What happened.
    pub action: AuditAction,
    /// The child concerned, by keyed hash.
    pub subject: Option<SubjectRef>,
    /// The other agency involved (recipient, owner), if any.
    pub target_agency_id: String,
    /// The concern, record, consent or certificate serial acted on.
    pub object_id: String,
    /// The purpose a disclosure was asked for.
    pub purpose: Option<PbPurpose>,
    /// The basis a disclosure rested on.
    pub basis: DisclosureBasis,
    /// The lawful basis of the agreement or override.
    pub lawful_basis: String,
    /// The consent statement relied on.
    pub consent_id: String,
    /// A safeguarding override's justification (sealed at rest with the entry).
    pub justification: String,
    /// Allowed or denied.
    pub outcome: AuditOutcome,
    /// Why, in a few words (never content).
    pub reason: String,
    /// The request's correlation id.
    pub request_id: String,
}

impl NewEntry {
    /// An entry with only the essentials set; callers fill in the rest.
    pub fn new(actor: Actor, action: AuditAction, outcome: AuditOutcome, request_id: &str) -> Self {
        NewEntry {
            actor,
            action,
            subject: None,
            target_agency_id: String::new(),
            object_id: String::new(),
            purpose: None,
            basis: DisclosureBasis::Unspecified,
            lawful_basis: String::new(),
            consent_id: String::new(),
            justification: String::new(),
            outcome,
            reason: String::new(),
            request_id: request_id.to_owned(),
        }
    }

    /// The entry as it will be stored at `seq` and `time_micros`, `canonical` empty.
    pub fn into_record(self, seq: u64, time_micros: i64) -> AuditEntry {
        AuditEntry {
            seq,
            time: Some(timestamp_from_micros(time_micros)),
            actor_id: self.actor.id,
            actor_role: self.actor.role as i32,
            action: self.action as i32,
            subject_ref: self
                .subject
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            target_agency_id: self.target_agency_id,
            object_id: self.object_id,
            purpose: self.purpose.map(|p| p as i32).unwrap_or_default(),
            basis: self.basis as i32,
            lawful_basis: self.lawful_basis,
            consent_id: self.consent_id,
            justification: self.justification,
            outcome: self.outcome as i32,
            reason: self.reason,
            request_id: self.request_id,
            actor_cert_sha256: self.actor.cert_sha256,
            canonical: Vec::new(),
        }
    }
}

/// The canonical bytes of an entry: its protobuf encoding with `canonical` empty.
pub fn canonical_bytes(entry: &AuditEntry) -> Vec<u8> {
    use prost::Message;
    debug_assert!(entry.canonical.is_empty());
    entry.encode_to_vec()
}

/// A protobuf timestamp from microseconds since the epoch.
pub fn timestamp_from_micros(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Microseconds since the epoch of a protobuf timestamp (saturating).
pub fn micros_from_timestamp(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(ts.nanos) / 1000)
}
