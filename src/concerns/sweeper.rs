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
//!
//! The write escalates only what is still escalatable as stored: a concern decided
//! meanwhile only has its deadlines cleared, and a recipient that acknowledged
//! meanwhile is neither marked nor named in the event. A recipient audited but not
//! escalated gets a compensating CONCERN_ESCALATED entry with outcome DENIED.
//! Within one process acknowledgements and decisions wait for the sweeper's work on
//! a concern (they share its lock), so that happens only when another replica
//! changes the concern in between.
//!
//! Each due concern is handled on its own, so one that keeps failing (earliest
//! deadlines come first) does not hold back the others; it is retried at the next
//! sweep. An audit failure stops the sweep (fail closed).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::model::{overdue, ConcernId, Escalation, InboxEvent, Overdue};
use super::store::Edit;
use super::{ConcernError, Concerns};
use crate::audit::{Actor, NewEntry};
use crate::config::Deadlines;
use crate::proto::v1::{AuditAction, AuditOutcome};

/// The request id of the sweeper's audit entries.
const SWEEPER_REQUEST_ID: &str = "deadline-sweeper";

/// The reason of the compensating entry (outcome DENIED) for a recipient whose
/// CONCERN_ESCALATED entry was written but whose escalation was not made.
const NOT_ESCALATED: &str = "NOT_ESCALATED: acknowledged, decided or escalated before the escalation was stored; no escalation sent";

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
    ///
    /// Each due concern is handled on its own: one that fails (it does not load,
    /// the store refuses its update) is logged by id, counted and left for the next
    /// sweep, and the others still go ahead. An audit failure ends the sweep with
    /// its error: no escalation may go out without its entry, and every later
    /// concern would fail alike.
    pub async fn sweep(&self) -> Result<usize, ConcernError> {
        let now = self.clock.now();
        let due = self.store.due_by(now).await?;
        let (mut escalated, mut failed) = (0usize, 0usize);
        for id in due {
            match self.escalate(&id, now).await {
                Ok(true) => {
                    escalated += 1;
                    tracing::info!(concern = %id, "acknowledgement deadline missed: escalated");
                }
                Ok(false) => {}
                Err(e @ ConcernError::Audit(_)) => {
                    if failed > 0 {
                        tracing::warn!(failed, escalated, "deadline sweep: concerns failed");
                    }
                    return Err(e);
                }
                Err(e) => {
                    failed += 1;
                    // The id and the error only: errors never hold a narrative,
                    // a note or an NHS number.
                    tracing::warn!(
                        concern = %id,
                        error = %e,
                        "escalating a concern failed; retrying at the next sweep"
                    );
                }
            }
        }
        if failed > 0 {
            tracing::warn!(failed, escalated, "deadline sweep: concerns failed");
        }
        Ok(escalated)
    }

    /// Escalates concern `id`'s recipients that are late at `now`, if any; true
    /// when something was escalated.
    ///
    /// Under the concern's lock (so acknowledgements and decisions in this process
    /// wait), it appends CONCERN_ESCALATED for each late recipient, then, in the
    /// store's update, escalates only what is still escalatable as stored: nothing
    /// once the concern is decided, and no recipient that has acknowledged. Another
    /// replica may change the concern between the two steps; a recipient audited
    /// but then not escalated gets a compensating CONCERN_ESCALATED entry with
    /// outcome DENIED, so the log never claims an escalation that was not made.
    async fn escalate(&self, id: &ConcernId, now: OffsetDateTime) -> Result<bool, ConcernError> {
        let _one_at_a_time = self.lock_changes(id).await;
        let Some(concern) = self.load(id).await? else {
            self.store.settle(id, now).await?;
            return Ok(false);
        };
        let Some(late) = overdue(now, [&concern]).into_iter().next() else {
            // Acknowledged (or decided) in time: nothing to escalate.
            self.store.settle(id, now).await?;
            return Ok(false);
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
        let configured = self.config.front_door.clone();
        let marked = Arc::new(Mutex::new(Vec::new()));
        let marked_in_edit = marked.clone();
        let late_recipients = late.recipients.clone();
        let stored = self
            .store
            .update(
                id,
                Box::new(move |c| {
                    let settle_only = Edit {
                        settle_until: Some(now),
                        ..Edit::default()
                    };
                    if c.decision.is_some() {
                        // Decided meanwhile: the front door has dealt with it.
                        return settle_only;
                    }
                    let escalated = c.mark_escalated(&late_recipients);
                    let Some(due_at) = c
                        .recipients
                        .iter()
                        .filter(|d| escalated.contains(&d.agency))
                        .map(|d| d.due_at)
                        .min()
                    else {
                        return settle_only;
                    };
                    let done = Overdue {
                        concern_id: c.id.clone(),
                        recipients: escalated.clone(),
                        due_at,
                    };
                    let escalation = InboxEvent::Escalation(Escalation {
                        concern_id: c.id.clone(),
                        reason: done.reason(c.urgency),
                        due_at,
                    });
                    // The front door the concern was routed to: a front door
                    // named since cannot open it.
                    let front_door = c.front_door(&configured).clone();
                    let mut to = vec![c.raised_by.clone()];
                    if front_door != c.raised_by {
                        to.push(front_door);
                    }
                    *marked_in_edit.lock().unwrap_or_else(|p| p.into_inner()) = escalated;
                    Edit {
                        record: true,
                        events: to.into_iter().map(|a| (a, escalation.clone())).collect(),
                        settle_until: Some(now),
                    }
                }),
            )
            .await;
        // A failed store write escalated no one: every entry above is answered
        // below before the error is, so the log never claims it.
        let marked = match &stored {
            Ok(_) => std::mem::take(&mut *marked.lock().unwrap_or_else(|p| p.into_inner())),
            Err(_) => Vec::new(),
        };
        for recipient in late.recipients.iter().filter(|r| !marked.contains(r)) {
            let mut entry = NewEntry::new(
                Actor::system(),
                AuditAction::ConcernEscalated,
                AuditOutcome::Denied,
                SWEEPER_REQUEST_ID,
            );
            entry.subject = Some(concern.subject_ref.clone());
            entry.target_agency_id = recipient.to_string();
            entry.object_id = id.to_string();
            entry.reason = NOT_ESCALATED.to_owned();
            self.auditor.append(entry).await?;
        }
        stored?;
        Ok(!marked.is_empty())
    }
}
