//! What a record is, as the records capability sees it, and the requests it takes.
//! Enums and NHS numbers arrive parsed; lengths, limits and times are checked by
//! the capability ([`super::Records`]) against the configuration.

use std::fmt;

use time::OffsetDateTime;

use crate::domain::consent::{ConsentGiver, ConsentState, ConsentStatement};
use crate::domain::policy::{Basis, OverrideRequest, RecordAccess};
use crate::domain::{AgencyId, NhsNumber, Purpose, RecordCategory, Sector};
use crate::store::keys::SubjectRef;

/// Longest `media_type`, in bytes (RFC 6838 allows 127 for each of type and subtype).
pub const MAX_MEDIA_TYPE_BYTES: usize = 255;

/// Longest override `lawful_basis`, in characters.
pub const MAX_LAWFUL_BASIS_CHARS: usize = 500;

/// Declares an id of the form `<prefix>` + 32 lower-case hex digits (128 random bits).
macro_rules! random_id {
    ($(#[$meta:meta])* $name:ident, $prefix:literal, $field:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The id made from 16 random bytes.
            pub fn from_random(bytes: [u8; 16]) -> Self {
                $name(format!("{}{}", $prefix, crate::tls::hex(&bytes)))
            }

            /// Parses an id: the prefix, then 32 lower-case hex digits. The error
            /// names the field and never echoes the input.
            pub fn parse(s: &str) -> Result<Self, String> {
                let ok = s.len() == $prefix.len() + 32
                    && s.starts_with($prefix)
                    && s[$prefix.len()..]
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if ok {
                    Ok($name(s.to_owned()))
                } else if s.is_empty() {
                    Err(format!("{} is required", $field))
                } else {
                    Err(format!(
                        "{} must be \"{}\" followed by 32 lower-case hex digits",
                        $field, $prefix
                    ))
                }
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

random_id!(
    /// A record's id: `r-` + 32 hex digits.
    RecordId,
    "r-",
    "record_id"
);
random_id!(
    /// A consent statement's id: `k-` + 32 hex digits.
    ConsentId,
    "k-",
    "consent_id"
);

/// A stored record: its metadata, without its content (which is read only to be
/// disclosed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its id.
    pub id: RecordId,
    /// The child.
    pub subject: NhsNumber,
    /// The child's keyed hash, for indexes and audit entries.
    pub subject_ref: SubjectRef,
    /// The agency that shared, and owns, it.
    pub owner: AgencyId,
    /// The owner's sector when it shared the record: agreements are between sectors.
    pub owner_sector: Sector,
    /// What kind of information it is.
    pub category: RecordCategory,
    /// The owner's short description, shown to agencies that find it.
    pub summary: String,
    /// The content's media type.
    pub media_type: String,
    /// The content's size in bytes.
    pub content_len: u64,
    /// When it was shared.
    pub shared_at: OffsetDateTime,
    /// When it stops being disclosed and is purged (exclusive).
    pub retain_until: OffsetDateTime,
}

/// A ShareRecord request, enums and NHS number parsed.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// The child.
    pub subject: NhsNumber,
    /// What kind of information it is.
    pub category: RecordCategory,
    /// Short description: 1 to `limits.max_summary_chars` characters.
    pub summary: String,
    /// The content: 1 to `limits.max_content_bytes` bytes.
    pub content: Vec<u8>,
    /// The media type, e.g. `application/pdf`.
    pub media_type: String,
    /// When to purge it; `None` means `limits.default_retention_days` from now.
    pub retain_until: Option<OffsetDateTime>,
}

/// A record found by FindRecords, and what the caller may do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The record's metadata.
    pub record: Record,
    /// What the caller may do with it now.
    pub access: RecordAccess,
}

/// A GetRecord request, enums parsed.
#[derive(Debug, Clone)]
pub struct DiscloseRequest {
    /// The record asked for.
    pub record_id: RecordId,
    /// Why the caller asks.
    pub purpose: Purpose,
    /// A safeguarding override, if the caller set one.
    pub r#override: Option<OverrideRequest>,
}

/// A disclosed record: built only after its RECORD_DISCLOSED entry is durable.
#[derive(Debug, Clone)]
pub struct Disclosure {
    /// The record's metadata.
    pub record: Record,
    /// Its content.
    pub content: Vec<u8>,
    /// The ground it was disclosed on.
    pub basis: Basis,
    /// The seq of the durable RECORD_DISCLOSED entry.
    pub audit_seq: u64,
    /// An override was given but not needed, so it was not relied on.
    pub override_ignored: bool,
}

/// A RecordConsent request, enums and NHS number parsed.
#[derive(Debug, Clone)]
pub struct NewConsent {
    /// The child.
    pub subject: NhsNumber,
    /// GIVEN or REFUSED.
    pub state: ConsentState,
    /// Who said it.
    pub given_by: ConsentGiver,
    /// Purposes covered.
    pub purposes: Vec<Purpose>,
    /// Recipient sectors covered.
    pub recipient_sectors: Vec<Sector>,
    /// Recipient agencies covered, as given (checked against the registry).
    pub recipient_agency_ids: Vec<String>,
    /// Categories covered.
    pub categories: Vec<RecordCategory>,
    /// When it lapses (exclusive), if ever.
    pub valid_until: Option<OffsetDateTime>,
    /// How and when it was obtained; at most `limits.max_note_chars`.
    pub note: String,
}

/// A consent statement as stored, with the child's NHS number and the notes, which
/// the pure [`ConsentStatement`] does not carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consent {
    /// The statement (its `subject` is the child's [`SubjectRef`] text).
    pub statement: ConsentStatement,
    /// The child.
    pub subject: NhsNumber,
    /// The note given when it was recorded.
    pub note: String,
    /// The note given when it was withdrawn, if it was.
    pub withdrawal_note: String,
}

impl Consent {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.statement.consent_id
    }

    /// The child's keyed hash.
    pub fn subject_ref(&self) -> SubjectRef {
        SubjectRef::from_hex(self.statement.subject.clone())
    }
}
