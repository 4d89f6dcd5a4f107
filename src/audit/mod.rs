//! The tamper-evident audit log.
//!
//! Every disclosure, refusal and administrative act is appended here *before* its
//! effect reaches anyone: [`Auditor::append`] returns a [`Durable`] receipt only once
//! the entry is on disk (its write-ahead record written and `fdatasync`ed), and
//! every response that discloses something is built from such a receipt, so a
//! handler cannot disclose without having audited (DESIGN.md invariant 1).
//!
//! - [`entry`]: what an entry says and its canonical bytes (the protobuf encoding of
//!   `safeguard.v1.AuditEntry` with `canonical` empty; prost writes fields in field
//!   number order with no maps or unknown fields, so the encoding is deterministic).
//! - [`merkle`]: RFC 6962 hashing and proofs over stored complete subtrees.
//! - `tiles`: where those subtrees live: full tiles of four levels in flat files,
//!   the right edge in memory.
//! - `entry_file`: where the entries' chunks live: appended to a flat file, with
//!   sled holding where each chunk is.
//! - `wal`: the write-ahead file, the durability point of every commit.
//! - `postings`: the current write-ahead round's index lists, in memory until the
//!   round ends.
//! - [`checkpoint`]: signed checkpoints (C2SP signed notes, Ed25519).
//! - [`log`]: the sled layout and every read (entries, proofs, checkpoints, queries).
//! - [`writer`]: the single writer task: group commit, one durability point per batch.
//! - [`verify`]: offline verification of a stopped gateway's log.

pub mod backend;
pub mod checkpoint;
pub(crate) mod early_sync;
pub mod entry;
pub(crate) mod entry_file;
pub mod log;
pub mod merkle;
pub(crate) mod postings;
pub mod query;
pub(crate) mod tiles;
pub mod verify;
pub(crate) mod wal;
pub mod writer;

pub use backend::{AuditHandle, AuditStore};
pub use entry::{Actor, NewEntry};
pub use log::AuditLog;
pub use writer::{Auditor, Durable, LogHealth};

/// Why the audit log could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// The log cannot be written now (disk full, I/O error); nothing that needs an
    /// audit entry may proceed. The gateway keeps trying to recover.
    #[error("the audit log cannot be written: {0}")]
    Unavailable(String),
    /// A stored entry or node is missing or does not open: the log has been damaged.
    #[error("audit log damaged at {0}")]
    Corrupt(String),
    /// A seq, tree size or range is outside the log.
    #[error("{0}")]
    OutOfRange(String),
    /// A page token that this gateway did not issue for this query.
    #[error("page_token is not valid for this query")]
    BadPageToken,
    /// Too many entries to return in one response.
    #[error("{0}")]
    TooMany(String),
}

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        AuditError::Unavailable(e.to_string())
    }
}
