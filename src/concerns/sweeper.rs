//! The deadline sweeper: finds recipients past their acknowledgement deadline and
//! escalates each of them once.
//!
//! Every [`sweep_interval`] it reads the deadlines due by now (an index in the
//! store, so a sweep costs nothing when nothing is due), asks [`overdue`] which
//! recipients are late, appends CONCERN_ESCALATED for each (actor `system`) and, once
//! those are durable, marks them escalated and puts one Escalation event in the
//! sender's inbox and one in the front door's, in one durable write. A crash between
//! the two leaves audit entries without the escalation; the next sweep (after the
//! restart) makes it, so the events still go out exactly once.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::model::{overdue, Escalation, InboxEvent};
use super::store::Edit;
use super::{ConcernError, Concerns};
use crate::audit::{Actor, NewEntry};
use crate::config::Deadlines;
use crate::proto::v1::{AuditAction, AuditOutcome};

/// The request id of the sweeper's audit entries.
const SWEEPER_REQUEST_ID: &str = "deadline-sweeper";

/// How often the sweeper runs: half the shortest deadline, between 100 ms and 5 s,
/// so a deadline is escalated at most that late.
pub fn sweep_interval(deadlines: &Deadlines) -> Duration {
    (deadlines.immediate_risk.min(deadlines.urgent) / 2)
        .clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Sweeps every `every` until `stop`.
pub async fn sweep_periodically(
    concerns: Arc<Concerns>,
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
        if !turns.mine("deadline-sweeper", every).await {
            continue;
        }
        if let Err(e) = concerns.sweep().await {
            tracing::warn!(error = %e, "deadline sweep failed; retrying at the next tick");
        }
    }
}

impl Concerns {
    /// One sweep at the clock's now. Returns how many concerns were escalated.
    pub async fn sweep(&self) -> Result<usize, ConcernError> {
        let now = self.clock.now();
        let due = self.store.due_by(now).await?;
        let mut escalated = 0;
        for id in due {
            let Some(concern) = self.load(&id).await? else {
                self.store.settle(&id, now).await?;
                continue;
            };
            let Some(late) = overdue(now, [&concern]).into_iter().next() else {
                // Acknowledged (or decided) in time: nothing to escalate.
                self.store.settle(&id, now).await?;
                continue;
            };
            let reason = late.reason(concern.urgency);
            for recipient in &late.recipients {
                let mut entry = NewEntry::new(
                    Actor::system(),
                    AuditAction::ConcernEscalated,
                    AuditOutcome::Allowed,
                    SWEEPER_REQUEST_ID,
                );
                entry.subject = Some(concern.subject_ref.clone());
                entry.target_agency_id = recipient.to_string();
                entry.object_id = id.to_string();
                entry.reason = reason.clone();
                self.auditor.append(entry).await?;
            }
            let front_door = self.config.front_door.clone();
            let escalation = InboxEvent::Escalation(Escalation {
                concern_id: id.clone(),
                reason,
                due_at: late.due_at,
            });
            let late_recipients = late.recipients.clone();
            let after = self
                .store
                .update(
                    &id,
                    Box::new(move |c| {
                        if c.mark_escalated(&late.recipients).is_empty() {
                            return Edit {
                                settle_until: Some(now),
                                ..Edit::default()
                            };
                        }
                        let mut to = vec![c.raised_by.clone()];
                        if front_door != c.raised_by {
                            to.push(front_door);
                        }
                        Edit {
                            record: true,
                            events: to.into_iter().map(|a| (a, escalation.clone())).collect(),
                            settle_until: Some(now),
                        }
                    }),
                )
                .await?;
            let escalated_now = after.is_some_and(|c| {
                late_recipients
                    .iter()
                    .all(|r| c.delivery(r).is_some_and(|d| d.escalated))
            });
            if escalated_now {
                escalated += 1;
                tracing::info!(concern = %id, "acknowledgement deadline missed: escalated");
            }
        }
        Ok(escalated)
    }
}
