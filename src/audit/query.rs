//! Auditors' queries: filters, the index that drives each, and paging.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::digest::{digest, SHA256};

use super::entry::micros_from_timestamp;
use super::log::{self, AuditLog};
use super::AuditError;
use crate::proto::v1::AuditEntry;
use crate::store::keys::SubjectRef;

/// What a query asks for; every field is optional and they combine with AND.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Entries about this child.
    pub subject: Option<SubjectRef>,
    /// Entries by this actor.
    pub actor_id: Option<String>,
    /// Entries with this target agency.
    pub target_agency_id: Option<String>,
    /// Entries with this action (protobuf value).
    pub action: Option<i32>,
    /// At or after, microseconds since the epoch.
    pub since_micros: Option<i64>,
    /// Before (exclusive), microseconds since the epoch.
    pub until_micros: Option<i64>,
}

impl Filter {
    /// Whether `e` passes every filter (checked on the decoded entry, whatever an
    /// index said).
    pub(crate) fn matches(&self, e: &AuditEntry) -> bool {
        let t = e
            .time
            .as_ref()
            .map(micros_from_timestamp)
            .unwrap_or(i64::MIN);
        self.subject
            .as_ref()
            .is_none_or(|s| s.as_str() == e.subject_ref)
            && self.actor_id.as_ref().is_none_or(|a| *a == e.actor_id)
            && self
                .target_agency_id
                .as_ref()
                .is_none_or(|a| *a == e.target_agency_id)
            && self.action.is_none_or(|a| a == e.action)
            && self.since_micros.is_none_or(|s| t >= s)
            && self.until_micros.is_none_or(|u| t < u)
    }

    /// A fingerprint binding page tokens to the query that issued them.
    fn fingerprint(&self) -> [u8; 8] {
        let text = format!("{self:?}");
        let d = digest(&SHA256, text.as_bytes());
        let mut fp = [0u8; 8];
        fp.copy_from_slice(&d.as_ref()[..8]);
        fp
    }

    /// A short description for the AUDIT_QUERIED entry: which filters were used,
    /// never their values beyond ids (the subject appears only as its keyed hash).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.subject {
            parts.push(format!("subject={}", s.as_str()));
        }
        if let Some(a) = &self.actor_id {
            parts.push(format!("actor={a}"));
        }
        if let Some(t) = &self.target_agency_id {
            parts.push(format!("target={t}"));
        }
        if let Some(a) = self.action {
            let name = crate::proto::v1::AuditAction::try_from(a)
                .map(|a| {
                    a.as_str_name()
                        .trim_start_matches("AUDIT_ACTION_")
                        .to_owned()
                })
                .unwrap_or_else(|_| a.to_string());
            parts.push(format!("action={name}"));
        }
        if let Some(s) = self.since_micros {
            parts.push(format!("since={s}"));
        }
        if let Some(u) = self.until_micros {
            parts.push(format!("until={u}"));
        }
        parts.join(" ")
    }
}

/// One page of results.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Matching entries, oldest first.
    pub entries: Vec<AuditEntry>,
    /// Token for the next page, when there may be more.
    pub next_page_token: Option<String>,
}

/// Opaque page token: the next seq to look at, bound to the query's filters. The
/// PostgreSQL log (`crate::pg::PgAuditLog::query`) issues and reads the same tokens.
pub(crate) fn encode_token(seq: u64, filter: &Filter) -> String {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&seq.to_be_bytes());
    raw[8..].copy_from_slice(&filter.fingerprint());
    URL_SAFE_NO_PAD.encode(raw)
}

/// The seq a token from [`encode_token`] holds, if it was issued for `filter`.
pub(crate) fn decode_token(token: &str, filter: &Filter) -> Result<u64, AuditError> {
    let raw = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| AuditError::BadPageToken)?;
    if raw.len() != 16 || raw[8..] != filter.fingerprint() {
        return Err(AuditError::BadPageToken);
    }
    log::read_u64(&raw[..8]).ok_or(AuditError::BadPageToken)
}

/// Runs a query. `max_scan` bounds the entries examined for one page, so a sparse
/// filter returns a short (even empty) page with a token instead of scanning the
/// whole log in one call.
pub fn run(
    log: &AuditLog,
    filter: &Filter,
    page_token: &str,
    page_size: usize,
    max_scan: usize,
) -> Result<Page, AuditError> {
    let size = log.size();
    let mut lo = if page_token.is_empty() {
        0
    } else {
        decode_token(page_token, filter)?
    };
    if let Some(since) = filter.since_micros {
        lo = lo.max(log.first_seq_at_or_after(since, size)?);
    }
    let hi = match filter.until_micros {
        Some(until) => log.first_seq_at_or_after(until, size)?,
        None => size,
    };
    if lo >= hi {
        return Ok(Page {
            entries: Vec::new(),
            next_page_token: None,
        });
    }
    let seqs: Box<dyn Iterator<Item = Result<u64, AuditError>>> = if let Some(s) = &filter.subject {
        Box::new(log.index_seqs(log::subject_index_prefix(s.as_str()), lo, hi)?)
    } else if let Some(t) = &filter.target_agency_id {
        Box::new(log.index_seqs(log::text_index_prefix(log::BY_TARGET, t), lo, hi)?)
    } else if let Some(a) = &filter.actor_id {
        Box::new(log.index_seqs(log::text_index_prefix(log::BY_ACTOR, a), lo, hi)?)
    } else if let Some(a) = filter.action {
        Box::new(log.index_seqs(log::action_index_prefix(a), lo, hi)?)
    } else {
        Box::new((lo..hi).map(Ok))
    };
    let mut reader = log.entries()?;
    let mut entries = Vec::with_capacity(page_size.min(1024));
    for (scanned, seq) in seqs.enumerate() {
        let seq = seq?;
        let entry = reader.read(seq)?;
        if filter.matches(&entry) {
            entries.push(entry);
        }
        if entries.len() >= page_size || scanned + 1 >= max_scan {
            let next = seq + 1;
            return Ok(Page {
                entries,
                next_page_token: (next < hi).then(|| encode_token(next, filter)),
            });
        }
    }
    Ok(Page {
        entries,
        next_page_token: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::AuditAction;

    #[test]
    fn a_query_is_described_by_action_name_with_no_trailing_space() {
        let filter = Filter {
            subject: None,
            actor_id: Some("dpo".into()),
            target_agency_id: None,
            action: Some(AuditAction::RecordDisclosed as i32),
            since_micros: None,
            until_micros: None,
        };
        assert_eq!(filter.describe(), "actor=dpo action=RECORD_DISCLOSED");
        let none = Filter {
            actor_id: None,
            action: None,
            ..filter
        };
        assert_eq!(none.describe(), "");
    }
}
