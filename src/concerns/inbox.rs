//! SubscribeInbox: replay from a cursor, then live events, at least once.
//!
//! Each subscription is one task that reads its agency's inbox from the store, from
//! its own cursor up to the agency's *durable* cursor, and waits on a watch of that
//! cursor when it has caught up. Nothing is pushed to subscribers, so the sender of
//! an event never waits for one, and a slow subscriber costs no memory: it simply
//! reads later. Between the task and the client sits a small bounded channel; when
//! the client takes nothing for `stall_after`, the stream ends with
//! RESOURCE_EXHAUSTED naming the cursor to resume from (the last event already
//! queued to it, which it still receives before the status).
//!
//! Concern events are delivered (audited, see `Concerns::deliver`) before they are
//! queued. The task stops when the client goes away and when the gateway drains
//! (`stop`); the client then sees UNAVAILABLE, which the auth layer puts on every
//! open response stream at drain time, as it puts UNAUTHENTICATED on the streams
//! of a revoked certificate. Cursors are per agency, start at 1 and never repeat,
//! so a client that resumes with the last cursor it received sees no gap and no
//! repeat. A cursor beyond the newest this replica knows of is checked against the
//! store before it is refused with OUT_OF_RANGE: the client may have read it from
//! another replica that shares the store (PostgreSQL).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

use super::model::{Concern, Escalation, InboxEvent};
use super::{agency_of, ConcernError, Concerns};
use crate::domain::AgencyId;
use crate::identity::Caller;

/// Events queued between a subscription's task and its client.
pub(super) const STREAM_BUFFER: usize = 32;

/// Events read, and delivered together, in one go.
const READ_BATCH: usize = 32;

/// One event of a subscription, as sent.
#[derive(Debug, Clone)]
pub enum InboxItem {
    /// A concern delivered to the subscriber, as it stands when sent.
    Concern(Concern),
    /// An escalation of an overdue concern.
    Escalation(Escalation),
    /// One of the subscriber's records was read under a safeguarding override.
    OverrideNotice(super::model::OverrideNoticeEvent),
}

/// A subscription's events with their cursors; it ends with an error when the
/// gateway gives up on it (stalled client, audit failure).
pub type InboxStream = Pin<Box<dyn Stream<Item = Result<(u64, InboxItem), ConcernError>> + Send>>;

impl Concerns {
    /// SubscribeInbox: replays the caller's events after `after_cursor`, then pushes
    /// new ones until `stop`, the client leaving, or a stall.
    pub async fn subscribe(
        self: &Arc<Self>,
        caller: &Caller,
        after_cursor: u64,
        request_id: &str,
        stop: CancellationToken,
    ) -> Result<InboxStream, ConcernError> {
        let (agency, _) = agency_of(caller)?;
        let durable = self
            .store
            .durable_cursor(&agency)
            .ok_or_else(|| ConcernError::Internal(format!("no inbox for {agency}")))?;
        if after_cursor > *durable.borrow() {
            // This replica may not have heard yet of events committed through
            // another (the listener's delay, or polling only): read the head from
            // the store before refusing a cursor the client may have read there.
            self.store
                .catch_up(&agency)
                .await
                .map_err(|detail| ConcernError::Unavailable {
                    message: format!(
                        "the head of this inbox could not be read to check after_cursor {after_cursor}"
                    ),
                    detail,
                })?;
            let newest = *durable.borrow();
            if after_cursor > newest {
                return Err(ConcernError::OutOfRange(format!(
                    "after_cursor {after_cursor} is beyond the newest event of this inbox ({newest})"
                )));
            }
        }
        let slot = self
            .subscribers
            .claim(&agency, after_cursor, durable.clone())?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (end_tx, end_rx) = oneshot::channel();
        let (this, caller, request_id) = (self.clone(), caller.clone(), request_id.to_owned());
        tokio::spawn(async move {
            let ended = this
                .pump(
                    &caller,
                    &agency,
                    after_cursor,
                    &request_id,
                    &tx,
                    durable,
                    &slot.lag,
                    &stop,
                )
                .await;
            drop(slot);
            drop(tx);
            if let Some(e) = ended {
                let _ = end_tx.send(e);
            }
        });
        Ok(Box::pin(Ending {
            events: rx,
            end: Some(end_rx),
        }))
    }

    /// The subscription's loop. Returns the error to end the stream with, or `None`
    /// to end it cleanly (shutdown, client gone).
    #[allow(clippy::too_many_arguments)]
    async fn pump(
        self: &Arc<Self>,
        caller: &Caller,
        agency: &AgencyId,
        mut last: u64,
        request_id: &str,
        tx: &mpsc::Sender<Result<(u64, InboxItem), ConcernError>>,
        mut durable: watch::Receiver<u64>,
        lag: &Lag,
        stop: &CancellationToken,
    ) -> Option<ConcernError> {
        loop {
            let newest = *durable.borrow_and_update();
            if last < newest {
                let batch = match self.store.events(agency, last, newest, READ_BATCH).await {
                    Ok(batch) => batch,
                    Err(e) => return Some(e.into()),
                };
                let items = match self.render(caller, agency, batch, request_id).await {
                    Ok(items) => items,
                    Err(e) => return Some(e),
                };
                for (cursor, item) in items {
                    let Some(item) = item else {
                        last = cursor;
                        lag.sent(last);
                        continue;
                    };
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return None,
                        sent = tokio::time::timeout(self.stall_after, tx.send(Ok((cursor, item)))) => match sent {
                            Ok(Ok(())) => {
                                last = cursor;
                                lag.sent(last);
                            }
                            Ok(Err(_)) => return None,
                            Err(_) => return Some(ConcernError::Exhausted(format!(
                                "this inbox stream took no event for {} s; resume with after_cursor={last}",
                                self.stall_after.as_secs_f32()
                            ))),
                        }
                    }
                }
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tx.closed() => return None,
                changed = durable.changed() => if changed.is_err() { return None },
            }
        }
    }

    /// Turns stored events into items, delivering each concern first. An event
    /// whose concern is missing yields `None` (it is skipped, its cursor passed).
    async fn render(
        self: &Arc<Self>,
        caller: &Caller,
        agency: &AgencyId,
        batch: Vec<(u64, InboxEvent)>,
        request_id: &str,
    ) -> Result<Vec<(u64, Option<InboxItem>)>, ConcernError> {
        let ids: Vec<_> = batch
            .iter()
            .filter_map(|(_, e)| match e {
                InboxEvent::Concern(id) => Some(id.clone()),
                InboxEvent::Escalation(_) | InboxEvent::OverrideNotice(_) => None,
            })
            .collect();
        let loaded = self.store.get_many(&ids).await?;
        let delivered: HashMap<_, _> = self
            .deliver_all(caller, agency, loaded, request_id)
            .await?
            .into_iter()
            .map(|c| (c.id.clone(), c))
            .collect();
        Ok(batch
            .into_iter()
            .map(|(cursor, event)| {
                let item = match event {
                    InboxEvent::Concern(id) => delivered.get(&id).cloned().map(InboxItem::Concern),
                    InboxEvent::Escalation(e) => Some(InboxItem::Escalation(e)),
                    InboxEvent::OverrideNotice(n) => Some(InboxItem::OverrideNotice(n)),
                };
                (cursor, item)
            })
            .collect())
    }
}

/// Open subscriptions per agency, against `limits.max_subscribers_per_agency`,
/// and how far behind their inboxes each one is.
pub(super) struct Subscribers {
    max: usize,
    open: Mutex<HashMap<AgencyId, usize>>,
    /// Every open subscription's lag; dead ones are pruned at each claim.
    lags: Mutex<Vec<Weak<Lag>>>,
    /// Per agency whose inbox has had a subscriber: when this gateway learned of
    /// each rise of its durable cursor.
    arrivals: Mutex<HashMap<AgencyId, Arc<Arrivals>>>,
}

impl Subscribers {
    pub(super) fn new(max: usize) -> Self {
        Subscribers {
            max,
            open: Mutex::new(HashMap::new()),
            lags: Mutex::new(Vec::new()),
            arrivals: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more subscription of `agency`, starting after `after_cursor`,
    /// whose inbox's newest durable cursor `durable` tells; or RESOURCE_EXHAUSTED.
    fn claim(
        self: &Arc<Self>,
        agency: &AgencyId,
        after_cursor: u64,
        durable: watch::Receiver<u64>,
    ) -> Result<Slot, ConcernError> {
        {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let n = open.entry(agency.clone()).or_default();
            if *n >= self.max {
                return Err(ConcernError::Exhausted(format!(
                    "{agency} already has {} open inbox subscriptions, the most allowed; close one first",
                    self.max
                )));
            }
            *n += 1;
        }
        // Both locks, in the order `report` takes them, so that it never forgets
        // marks this subscription still needs.
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        let inbox = arrivals
            .entry(agency.clone())
            .or_insert_with(|| Arrivals::watch(durable.clone()))
            .clone();
        let lag = Arc::new(Lag {
            durable,
            sent: AtomicU64::new(after_cursor),
            arrivals: inbox,
        });
        let mut lags = self.lags.lock().unwrap_or_else(|p| p.into_inner());
        lags.retain(|l| l.strong_count() > 0);
        lags.push(Arc::downgrade(&lag));
        drop((lags, arrivals));
        Ok(Slot {
            subscribers: self.clone(),
            agency: agency.clone(),
            lag,
        })
    }

    fn report(&self, now: Instant) -> InboxLagReport {
        let arrivals = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        let lags: Vec<Arc<Lag>> = self
            .lags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut report = InboxLagReport::default();
        for lag in &lags {
            let (behind, waited) = lag.read(now);
            report.subscriptions += 1;
            report.events_behind_max = report.events_behind_max.max(behind);
            report.events_behind_total += behind;
            report.oldest_wait = report.oldest_wait.max(waited);
        }
        // What every subscription of an inbox has sent, no one needs the time of.
        for arrivals in arrivals.values() {
            let sent = lags
                .iter()
                .filter(|l| Arc::ptr_eq(&l.arrivals, arrivals))
                .map(|l| l.sent.load(Ordering::Relaxed))
                .min();
            arrivals.forget_through(sent.unwrap_or(u64::MAX));
        }
        report
    }
}

/// One subscription's place; given back when dropped.
struct Slot {
    subscribers: Arc<Subscribers>,
    agency: AgencyId,
    lag: Arc<Lag>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .subscribers
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.agency) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The most arrival marks kept for one inbox; past it every other mark is
/// dropped, which can only make the wait of some events look shorter.
const MAX_ARRIVALS: usize = 4096;

/// When this gateway learned of each rise of one inbox's durable cursor: marks
/// `(cursor, when)`, oldest first, each saying every event up to `cursor` was
/// known by `when`. One task per inbox keeps them, from its first subscription
/// on, so that they are taken when events commit, not when a subscription gets to
/// them.
struct Arrivals {
    marks: Mutex<Marks>,
}

#[derive(Default)]
struct Marks {
    kept: VecDeque<(u64, Instant)>,
    /// The newest mark forgotten: events up to its cursor were known by its time
    /// at the latest, which is what a subscription resumed that far back is told.
    floor: Option<(u64, Instant)>,
}

impl Arrivals {
    /// Marks each rise of `durable` from now on, in a task that ends with the store.
    fn watch(mut durable: watch::Receiver<u64>) -> Arc<Self> {
        let arrivals = Arc::new(Arrivals {
            marks: Mutex::new(Marks::default()),
        });
        let marking = arrivals.clone();
        tokio::spawn(async move {
            loop {
                let newest = *durable.borrow_and_update();
                marking.mark(newest, Instant::now());
                if durable.changed().await.is_err() {
                    return;
                }
            }
        });
        arrivals
    }

    fn mark(&self, cursor: u64, when: Instant) {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let newest = marks.kept.back().or(marks.floor.as_ref()).map(|(c, _)| *c);
        if newest.is_some_and(|c| c >= cursor) {
            return;
        }
        marks.kept.push_back((cursor, when));
        if marks.kept.len() > MAX_ARRIVALS {
            // Every other mark goes, the oldest staying: an event then counts from
            // a later mark, so its wait can only look shorter.
            let mut i = 0;
            marks.kept.retain(|_| {
                i += 1;
                i % 2 == 1
            });
        }
    }

    /// When the event at `cursor` was known by, as far as the marks tell.
    fn known_by(&self, cursor: u64) -> Option<Instant> {
        let marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((floor, when)) = marks.floor {
            if cursor <= floor {
                return Some(when);
            }
        }
        let i = marks.kept.partition_point(|(c, _)| *c < cursor);
        marks.kept.get(i).map(|(_, when)| *when)
    }

    /// Forgets the marks of events up to `cursor`, all sent, keeping the newest of
    /// them as the floor.
    fn forget_through(&self, cursor: u64) {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        while marks.kept.front().is_some_and(|(c, _)| *c <= cursor) {
            marks.floor = marks.kept.pop_front();
        }
    }
}

/// How far one subscription is behind its inbox: the events committed to the
/// inbox and not yet queued to its stream, and since when this gateway has known
/// of the oldest of them.
struct Lag {
    /// The inbox's newest durable cursor.
    durable: watch::Receiver<u64>,
    /// The last cursor queued to the stream.
    sent: AtomicU64,
    arrivals: Arc<Arrivals>,
}

impl Lag {
    /// The subscription has queued every event up to `cursor` to its stream.
    fn sent(&self, cursor: u64) {
        self.sent.fetch_max(cursor, Ordering::Relaxed);
    }

    /// The events behind, and how long the oldest of them has been known.
    fn read(&self, now: Instant) -> (u64, Duration) {
        let newest = *self.durable.borrow();
        let sent = self.sent.load(Ordering::Relaxed);
        if newest <= sent {
            return (0, Duration::ZERO);
        }
        let waited = self
            .arrivals
            .known_by(sent + 1)
            .map_or(Duration::ZERO, |when| now.saturating_duration_since(when));
        (newest - sent, waited)
    }
}

/// The inbox subscriptions open on this gateway and how far behind they are, for
/// `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxLagReport {
    /// Open subscriptions.
    pub subscriptions: u64,
    /// The events the most-behind subscription has yet to queue to its stream.
    pub events_behind_max: u64,
    /// The events all of them together have yet to queue.
    pub events_behind_total: u64,
    /// How long the oldest event not yet queued to an open subscription has been
    /// known to this gateway (zero when none is waiting).
    pub oldest_wait: Duration,
}

/// A handle on the subscriptions' lag, for `/metrics`.
#[derive(Clone)]
pub struct InboxLag(Arc<Subscribers>);

impl InboxLag {
    /// The subscriptions' lag now.
    pub fn report(&self) -> InboxLagReport {
        self.0.report(Instant::now())
    }
}

impl std::fmt::Debug for InboxLag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("InboxLag").field(&self.report()).finish()
    }
}

impl Concerns {
    /// How far behind their inboxes the open subscriptions are.
    pub fn inbox_lag(&self) -> InboxLag {
        InboxLag(self.subscribers.clone())
    }
}

/// The queued events, then the error the subscription ended with, if any.
struct Ending<T, E> {
    events: mpsc::Receiver<Result<T, E>>,
    end: Option<oneshot::Receiver<E>>,
}

impl<T, E> Stream for Ending<T, E> {
    type Item = Result<T, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.events.poll_recv(cx) {
            Poll::Ready(Some(item)) => return Poll::Ready(Some(item)),
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {}
        }
        let Some(end) = this.end.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(end).poll(cx) {
            Poll::Ready(Ok(e)) => {
                this.end = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Err(_)) => {
                this.end = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrivals() -> Arrivals {
        Arrivals {
            marks: Mutex::new(Marks::default()),
        }
    }

    #[test]
    fn an_event_is_known_by_the_first_mark_that_covers_it() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let a = arrivals();
        a.mark(3, at(0));
        a.mark(3, at(5)); // not a rise: ignored
        a.mark(7, at(10));
        assert_eq!(a.known_by(1), Some(at(0)));
        assert_eq!(a.known_by(3), Some(at(0)));
        assert_eq!(a.known_by(4), Some(at(10)));
        assert_eq!(a.known_by(8), None);
    }

    #[test]
    fn forgotten_marks_leave_the_newest_of_them_as_a_floor() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let a = arrivals();
        a.mark(3, at(0));
        a.mark(7, at(10));
        a.mark(9, at(20));
        a.forget_through(7);
        // A subscription resumed at 2 is behind events known by 10 ms at the latest.
        assert_eq!(a.known_by(2), Some(at(10)));
        assert_eq!(a.known_by(8), Some(at(20)));
        // A mark below the floor is not a rise.
        a.mark(5, at(30));
        assert_eq!(a.known_by(8), Some(at(20)));
    }

    #[test]
    fn past_the_most_marks_every_other_one_goes_and_the_oldest_stays() {
        let t0 = Instant::now();
        let a = arrivals();
        for i in 1..=(MAX_ARRIVALS as u64 + 1) {
            a.mark(i, t0 + Duration::from_millis(i));
        }
        let marks = a.marks.lock().unwrap();
        assert!(
            marks.kept.len() <= MAX_ARRIVALS / 2 + 1,
            "{}",
            marks.kept.len()
        );
        assert_eq!(
            marks.kept.front(),
            Some(&(1, t0 + Duration::from_millis(1)))
        );
        drop(marks);
        // An event whose own mark went counts from a later one: younger, never older.
        assert!(a.known_by(2).unwrap() >= t0 + Duration::from_millis(2));
    }
}
