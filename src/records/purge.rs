//! The retention sweeper: purges records whose `retain_until` has passed.
//!
//! Such records are already refused to everyone (the policy treats them as gone);
//! purging deletes their content and metadata. Each purge is audited first
//! (RECORD_PURGED, actor `system`), then the content file is removed, then the
//! metadata and indexes, durably. The audit entries about the record stay. A crash
//! part-way leaves a RECORD_PURGED entry for a record still (partly) stored; the
//! next sweep purges it and audits again.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{RecordError, Records};
use crate::audit::{Actor, NewEntry};
use crate::proto::v1::{AuditAction, AuditOutcome};

/// How often the sweeper runs. Expired records are refused at once anyway; this only
/// bounds how long their sealed content stays on disk.
pub const PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// The request id of the sweeper's audit entries.
const PURGE_REQUEST_ID: &str = "retention-sweeper";

/// Most records purged in one pass; a longer backlog continues at once.
const PURGE_BATCH: usize = 256;

/// Purges at once, then every `every` until `stop`.
pub async fn purge_periodically(
    records: Arc<Records>,
    every: Duration,
    turns: Arc<dyn crate::store::Turns>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if !turns.mine("retention-sweeper", every).await {
            continue;
        }
        match records.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "records past retention purged"),
            Err(e) => {
                tracing::warn!(error = %e, "retention sweep failed; retrying at the next tick")
            }
        }
    }
}

impl Records {
    /// Purges every record whose retention ended at or before the clock's now.
    /// Returns how many were purged.
    pub async fn purge_expired(&self) -> Result<usize, RecordError> {
        let mut purged = 0;
        loop {
            let now = self.clock.now();
            let due = self.store.expired_by(now, PURGE_BATCH).await?;
            let batch = due.len();
            for due in due {
                let Some(record) = self.store.record(&due.id).await? else {
                    self.store.forget(&due).await?;
                    continue;
                };
                let mut entry = NewEntry::new(
                    Actor::system(),
                    AuditAction::RecordPurged,
                    AuditOutcome::Allowed,
                    PURGE_REQUEST_ID,
                );
                entry.subject = Some(record.subject_ref.clone());
                entry.target_agency_id = record.owner.to_string();
                entry.object_id = record.id.to_string();
                entry.reason = format!("retention ended {}", super::rfc3339(record.retain_until));
                self.auditor.append(entry).await?;
                self.store.purge(&record).await?;
                purged += 1;
            }
            if batch < PURGE_BATCH {
                return Ok(purged);
            }
        }
    }
}
