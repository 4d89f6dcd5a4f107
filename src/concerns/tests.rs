//! The capability with a real audit log and store in a temporary folder and a
//! manual clock: what is slow or impractical to reach over the wire (deadlines
//! hours away, a client that stops reading).

use std::sync::Arc;
use std::time::Duration;

use time::macros::datetime;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::audit::writer::AuditSettings;
use crate::audit::Auditor;
use crate::domain::{ConcernCategory, ManualClock, NhsNumber, PrincipalId, Role, Urgency};
use crate::proto::v1::{AuditAction, AuditOutcome};
use crate::testing::{drop_at_the_gate, Gate};

struct Fixture {
    _dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    auditor: Auditor,
    concerns: Arc<Concerns>,
    /// The flows running to their end, as the gateway tracks them.
    sections: crate::domain::Sections,
}

async fn fixture(stall_after: Duration) -> Fixture {
    fixture_over(stall_after, |store| store).await
}

/// A fixture whose concerns use `wrap(the sled store)`.
async fn fixture_over(
    stall_after: Duration,
    wrap: impl FnOnce(Arc<dyn ConcernRepo>) -> Arc<dyn ConcernRepo>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(dev_config(dir.path(), "csc-southwark"));
    std::fs::create_dir_all(&config.data_dir).unwrap();
    let keys = Arc::new(Keys::load_or_create(&config.data_dir, None).unwrap());
    // Tuesday 24 November 2026, 10:00 in London (GMT).
    let clock = Arc::new(ManualClock::new(datetime!(2026-11-24 10:00 UTC)));
    let settings = AuditSettings {
        dir: config.data_dir.join("audit"),
        log_id: "test/sgw/audit".into(),
        max_batch: 64,
        cache_bytes: 1 << 20,
        wal_bytes: crate::audit::writer::DEFAULT_WAL_BYTES,
    };
    let auditor = Auditor::open(settings, keys.clone(), clock.clone()).unwrap();
    let store = ConcernStore::open(
        &config.data_dir.join("store"),
        keys.clone(),
        config.agencies.iter().map(|a| a.id.clone()),
    )
    .unwrap();
    let sections = crate::domain::Sections::default();
    let concerns = Concerns::new(
        config,
        keys,
        Arc::new(auditor.clone()),
        clock.clone(),
        wrap(Arc::new(store)),
    )
    .with_stall_after(stall_after)
    .with_sections(sections.clone());
    Fixture {
        _dir: dir,
        clock,
        auditor,
        concerns: Arc::new(concerns),
        sections,
    }
}

/// The development config with its data under `dir`, one more children's social
/// care agency (`csc-lambeth`), and `front_door` as the front door.
fn dev_config(dir: &std::path::Path, front_door: &str) -> Config {
    let text = crate::cli::serve::DEV_CONFIG_TOML
        .replace(
            "data_dir = \"data/dev\"",
            &format!("data_dir = {:?}", dir.join("data").display().to_string()),
        )
        .replace(
            "front_door = \"csc-southwark\"",
            &format!("front_door = {front_door:?}"),
        )
        + "\n[[agency]]\nid = \"csc-lambeth\"\nsector = \"CHILDRENS_SOCIAL_CARE\"\nname = \"Lambeth MASH\"\n";
    Config::from_toml_str(&text, dir, "test.toml").unwrap()
}

fn agency(id: &str, sector: Sector) -> Caller {
    Caller {
        id: PrincipalId::parse(id).unwrap(),
        role: Role::Agency,
        sector: Some(sector),
        cert_sha256: [1; 32],
        serial_hex: "01".into(),
    }
}

fn police() -> Caller {
    agency("police-met", Sector::Police)
}

fn school() -> Caller {
    agency("school-oakfield", Sector::Education)
}

fn raise_request(category: ConcernCategory, urgency: Urgency) -> RaiseRequest {
    RaiseRequest {
        subject: NhsNumber::parse("9434765919").unwrap(),
        category,
        urgency,
        narrative: "Incident at the family home overnight.".into(),
        recipients: vec!["school-oakfield".into()],
        request_id: String::new(),
    }
}

/// A concern raised by the police to the school (and the front door), request id `r1`.
async fn raised_by_police(f: &Fixture, category: ConcernCategory, urgency: Urgency) -> Concern {
    f.concerns
        .raise(&police(), raise_request(category, urgency), "r1")
        .await
        .unwrap()
}

fn actions(auditor: &Auditor, action: AuditAction) -> Vec<crate::proto::v1::AuditEntry> {
    let log = auditor.log();
    (0..log.size())
        .map(|seq| log.entry(seq).unwrap())
        .filter(|e| e.action == action as i32)
        .collect()
}

#[tokio::test]
async fn encompass_tightens_only_the_schools_deadline() {
    let f = fixture(DEFAULT_STALL_AFTER).await;
    let c = raised_by_police(&f, ConcernCategory::DomesticAbuse, Urgency::Routine).await;
    let school = AgencyId::parse("school-oakfield").unwrap();
    let front_door = AgencyId::parse("csc-southwark").unwrap();
    // Routine: Wednesday 10:00; Operation Encompass: Wednesday 08:30 for the school.
    assert_eq!(
        c.delivery(&school).unwrap().due_at,
        datetime!(2026-11-25 08:30 UTC)
    );
    assert_eq!(
        c.delivery(&front_door).unwrap().due_at,
        datetime!(2026-11-25 10:00 UTC)
    );
    assert_eq!(c.ack_due_at(), datetime!(2026-11-25 08:30 UTC));
    assert_eq!(c.status(), ConcernStatus::Raised);
}

#[tokio::test]
async fn the_sweeper_escalates_each_late_recipient_once_to_sender_and_front_door() {
    let f = fixture(DEFAULT_STALL_AFTER).await;
    let c = raised_by_police(&f, ConcernCategory::Neglect, Urgency::ImmediateRisk).await;
    let police_id = AgencyId::parse("police-met").unwrap();
    let front_door = AgencyId::parse("csc-southwark").unwrap();
    let school_id = AgencyId::parse("school-oakfield").unwrap();
    // The school acknowledges in time; the front door does not.
    f.concerns
        .acknowledge(&school(), c.id.as_str(), "seen", "r2")
        .await
        .unwrap();

    f.clock.advance(time::Duration::minutes(59));
    assert_eq!(f.concerns.sweep().await.unwrap(), 0);
    f.clock.advance(time::Duration::minutes(2));
    assert_eq!(f.concerns.sweep().await.unwrap(), 1);
    assert_eq!(f.concerns.sweep().await.unwrap(), 0, "escalated once");
    f.clock.advance(time::Duration::hours(5));
    assert_eq!(f.concerns.sweep().await.unwrap(), 0, "still once");

    let after = f.concerns.store().get(&c.id).await.unwrap().unwrap();
    assert_eq!(after.status(), ConcernStatus::Overdue);
    assert!(after.delivery(&front_door).unwrap().escalated);
    assert!(!after.delivery(&school_id).unwrap().escalated);

    let escalated = actions(&f.auditor, AuditAction::ConcernEscalated);
    assert_eq!(escalated.len(), 1, "one entry per late recipient");
    assert_eq!(escalated[0].target_agency_id, "csc-southwark");
    assert_eq!(escalated[0].actor_id, "system");
    assert_eq!(escalated[0].object_id, c.id.as_str());

    let store = f.concerns.store();
    let sender_events = store.events(&police_id, 0, u64::MAX, 10).await.unwrap();
    assert_eq!(sender_events.len(), 1);
    let InboxEvent::Escalation(e) = &sender_events[0].1 else {
        panic!("not an escalation: {sender_events:?}");
    };
    assert_eq!(e.concern_id, c.id);
    assert_eq!(e.due_at, datetime!(2026-11-24 11:00 UTC));
    assert!(e.reason.contains("csc-southwark"), "{}", e.reason);
    let front_door_events = store.events(&front_door, 0, u64::MAX, 10).await.unwrap();
    assert_eq!(
        front_door_events.len(),
        2,
        "the concern, then its escalation"
    );
    assert!(matches!(front_door_events[1].1, InboxEvent::Escalation(_)));

    // A late acknowledgement moves it on.
    let front_door_caller = agency("csc-southwark", Sector::ChildrensSocialCare);
    let acked = f
        .concerns
        .acknowledge(&front_door_caller, c.id.as_str(), "", "r3")
        .await
        .unwrap();
    assert_eq!(acked.status(), ConcernStatus::Acknowledged);
}

#[tokio::test]
async fn a_stalled_subscriber_is_ended_with_the_cursor_to_resume_from() {
    let f = fixture(Duration::from_millis(200)).await;
    let stop = CancellationToken::new();
    let mut stalled = subscribe_school(&f, 0, "sub-1", &stop).await;
    let mut reading = subscribe_school(&f, 0, "sub-2", &stop).await;
    let total = 40;
    raise_n(&f, total, "k").await;
    // The reading subscriber gets everything while the other takes nothing.
    read_cursors(&mut reading, 1..=total).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut got = Vec::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), stalled.next())
            .await
            .unwrap()
        {
            Some(Ok((cursor, _))) => got.push(cursor),
            Some(Err(e)) => break e,
            None => panic!("ended without a status"),
        }
    };
    let last = *got.last().unwrap();
    assert_eq!(got, (1..=last).collect::<Vec<_>>());
    assert!(last < total);
    let ConcernError::Exhausted(message) = end else {
        panic!("{end:?}");
    };
    assert!(
        message.contains(&format!("resume with after_cursor={last}")),
        "{message}"
    );
    assert!(stalled.next().await.is_none());

    // Its slot is free again, and a shutdown ends the others cleanly.
    let mut third = f
        .concerns
        .subscribe(&school(), last, "sub-3", stop.clone())
        .await
        .unwrap();
    let (cursor, _) = third.next().await.unwrap().unwrap();
    assert_eq!(cursor, last + 1);
    stop.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(item) = third.next().await {
            item.expect("a shutdown ends the stream without an error");
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ends at shutdown");
}

/// Waits up to 5 s for the subscriptions' lag to satisfy `done`; returns the last
/// report either way.
async fn lag_until(concerns: &Concerns, done: impl Fn(&InboxLagReport) -> bool) -> InboxLagReport {
    let lag = concerns.inbox_lag();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let report = lag.report();
        if done(&report) || tokio::time::Instant::now() > deadline {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Raises `n` routine concerns from the police to the school, request ids
/// `<prefix>0`, `<prefix>1`, ...
async fn raise_n(f: &Fixture, n: u64, prefix: &str) {
    for i in 0..n {
        let mut req = raise_request(ConcernCategory::Neglect, Urgency::Routine);
        req.request_id = format!("{prefix}{i}");
        f.concerns.raise(&police(), req, "r").await.unwrap();
    }
}

/// The school's inbox after `after_cursor`, until `stop`.
async fn subscribe_school(
    f: &Fixture,
    after_cursor: u64,
    request_id: &str,
    stop: &CancellationToken,
) -> InboxStream {
    f.concerns
        .subscribe(&school(), after_cursor, request_id, stop.clone())
        .await
        .unwrap()
}

/// Reads the events at `cursors` from `stream`, in order.
async fn read_cursors(stream: &mut InboxStream, cursors: std::ops::RangeInclusive<u64>) {
    for want in cursors {
        let (cursor, _) = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(cursor, want);
    }
}

#[tokio::test]
async fn the_inbox_lag_counts_what_a_subscription_has_not_yet_queued_and_for_how_long() {
    let f = fixture(Duration::from_secs(60)).await;
    let stop = CancellationToken::new();
    assert_eq!(f.concerns.inbox_lag().report(), InboxLagReport::default());
    let mut stalled = subscribe_school(&f, 0, "sub-1", &stop).await;
    let mut reading = subscribe_school(&f, 0, "sub-2", &stop).await;
    raise_n(&f, 40, "k").await;
    read_cursors(&mut reading, 1..=40).await;

    // The stalled one has queued as many as its stream holds and waits to queue
    // the rest; the reading one is not behind, so the total is the stalled one's.
    let buffer = inbox::STREAM_BUFFER as u64;
    let report = lag_until(&f.concerns, |r| {
        r.events_behind_max == 40 - buffer && r.oldest_wait >= Duration::from_millis(50)
    })
    .await;
    assert_eq!(report.subscriptions, 2, "{report:?}");
    assert_eq!(report.events_behind_max, 40 - buffer, "{report:?}");
    assert_eq!(report.events_behind_total, 40 - buffer, "{report:?}");
    assert!(
        report.oldest_wait >= Duration::from_millis(50),
        "{report:?}"
    );

    // Events committed while it is stuck are timed from their commit, not from
    // when it gets to them: 300 ms on, once it has queued the first forty, the
    // oldest left (the 41st) has waited those 300 ms.
    let committed = std::time::Instant::now();
    raise_n(&f, 40, "m").await;
    read_cursors(&mut reading, 41..=80).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    read_cursors(&mut stalled, 1..=8).await;
    let report = lag_until(&f.concerns, |r| r.events_behind_max == 40).await;
    assert_eq!(report.events_behind_max, 40, "{report:?}");
    assert!(
        report.oldest_wait >= Duration::from_millis(300)
            && report.oldest_wait <= committed.elapsed(),
        "{report:?}"
    );

    // Once its client reads, it catches up and waits for nothing.
    read_cursors(&mut stalled, 9..=80).await;
    let report = lag_until(&f.concerns, |r| r.events_behind_max == 0).await;
    assert_eq!(
        report,
        InboxLagReport {
            subscriptions: 2,
            ..InboxLagReport::default()
        }
    );

    // A subscription resumed at the newest cursor is not behind, from the start.
    let resumed = f
        .concerns
        .subscribe(&school(), 80, "sub-3", stop.clone())
        .await
        .unwrap();
    assert_eq!(
        f.concerns.inbox_lag().report(),
        InboxLagReport {
            subscriptions: 3,
            ..InboxLagReport::default()
        }
    );

    // A subscription whose client has gone is no longer counted.
    drop((stalled, resumed));
    raise_n(&f, 1, "last").await;
    let report = lag_until(&f.concerns, |r| r.subscriptions == 1).await;
    assert_eq!(report.subscriptions, 1, "{report:?}");
    drop(reading);
    let report = lag_until(&f.concerns, |r| r.subscriptions == 0).await;
    assert_eq!(report, InboxLagReport::default());
}

#[tokio::test]
async fn a_subscription_resumed_behind_what_the_others_have_sent_still_reports_its_wait() {
    let f = fixture(Duration::from_secs(60)).await;
    let stop = CancellationToken::new();
    let mut reading = subscribe_school(&f, 0, "sub-1", &stop).await;
    raise_n(&f, 40, "k").await;
    read_cursors(&mut reading, 1..=40).await;
    // A scrape forgets the times of what every open subscription has sent.
    let report = lag_until(&f.concerns, |r| r.events_behind_max == 0).await;
    assert_eq!(report.events_behind_max, 0, "{report:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A client resuming from the start takes as many as its stream holds, and is
    // behind by the rest, which have waited at least those 300 ms.
    let _resumed = subscribe_school(&f, 0, "sub-2", &stop).await;
    let behind = 40 - inbox::STREAM_BUFFER as u64;
    let report = lag_until(&f.concerns, |r| {
        r.events_behind_max == behind && r.oldest_wait >= Duration::from_millis(300)
    })
    .await;
    assert_eq!(report.events_behind_max, behind, "{report:?}");
    assert!(
        report.oldest_wait >= Duration::from_millis(300),
        "{report:?}"
    );
}

#[tokio::test]
async fn subscriptions_per_agency_are_limited_and_cursors_checked() {
    let f = fixture(DEFAULT_STALL_AFTER).await;
    let stop = CancellationToken::new();
    let max = f.concerns.config.limits.max_subscribers_per_agency;
    let mut open = Vec::new();
    for i in 0..max {
        open.push(
            f.concerns
                .subscribe(&school(), 0, &format!("s{i}"), stop.clone())
                .await
                .unwrap(),
        );
    }
    let Err(ConcernError::Exhausted(m)) =
        f.concerns.subscribe(&school(), 0, "x", stop.clone()).await
    else {
        panic!("limit not enforced");
    };
    assert!(m.contains("school-oakfield already has"), "{m}");
    // Another agency is not affected.
    assert!(f
        .concerns
        .subscribe(&police(), 0, "p", stop.clone())
        .await
        .is_ok());
    let Err(ConcernError::OutOfRange(m)) =
        f.concerns.subscribe(&police(), 5, "p", stop.clone()).await
    else {
        panic!("cursor beyond the inbox accepted");
    };
    assert!(m.contains("after_cursor 5 is beyond"), "{m}");
    // Closing one (the client going away) frees a slot.
    drop(open.pop());
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if f.concerns
                .subscribe(&school(), 0, "y", stop.clone())
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("slot freed");
}

/// A change another gateway replica makes to a stored concern.
type ForeignChange = Box<dyn FnOnce(&mut Concern) + Send>;

/// A store that lets a test step in: another replica's change stored just before
/// the next `update` (after the caller read the concern), concerns whose reads
/// fail, and a gate that holds `raise` and `update` before they write.
struct Interposed {
    inner: Arc<dyn ConcernRepo>,
    write_gate: Gate,
    before_update: std::sync::Mutex<Option<ForeignChange>>,
    unreadable: std::sync::Mutex<Vec<ConcernId>>,
    unwritable: std::sync::Mutex<Vec<ConcernId>>,
    /// While set, `raised_by_key` finds nothing: as if another replica raised with
    /// the key after this one looked it up.
    keys_unseen: std::sync::atomic::AtomicBool,
}

impl Interposed {
    fn over(inner: Arc<dyn ConcernRepo>) -> Arc<Interposed> {
        Arc::new(Interposed {
            inner,
            write_gate: Gate::default(),
            before_update: std::sync::Mutex::new(None),
            unreadable: std::sync::Mutex::new(Vec::new()),
            unwritable: std::sync::Mutex::new(Vec::new()),
            keys_unseen: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn make_unreadable(&self, id: &ConcernId) {
        self.unreadable.lock().unwrap().push(id.clone());
    }

    fn before_next_update(&self, change: impl FnOnce(&mut Concern) + Send + 'static) {
        *self.before_update.lock().unwrap() = Some(Box::new(change));
    }
}

#[async_trait::async_trait]
impl ConcernRepo for Interposed {
    async fn get(&self, id: &ConcernId) -> Result<Option<Concern>, StoreError> {
        if self.unreadable.lock().unwrap().contains(id) {
            return Err(StoreError::Corrupt("concern does not open (test)".into()));
        }
        self.inner.get(id).await
    }
    async fn raised_by_key(
        &self,
        key: &store::IdempotencyKey,
    ) -> Result<Option<ConcernId>, StoreError> {
        if self.keys_unseen.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(None);
        }
        self.inner.raised_by_key(key).await
    }
    async fn raise(
        &self,
        concern: &Concern,
        key: Option<&store::IdempotencyKey>,
    ) -> Result<store::Raised, StoreError> {
        self.write_gate.pass().await;
        self.inner.raise(concern, key).await
    }
    async fn update(&self, id: &ConcernId, edit: EditFn) -> Result<Option<Concern>, StoreError> {
        if self.unwritable.lock().unwrap().contains(id) {
            return Err(StoreError::Corrupt(
                "concern cannot be written (test)".into(),
            ));
        }
        self.write_gate.pass().await;
        let foreign = self.before_update.lock().unwrap().take();
        if let Some(change) = foreign {
            self.inner
                .update(
                    id,
                    Box::new(move |c| {
                        change(c);
                        store::Edit {
                            record: true,
                            ..store::Edit::default()
                        }
                    }),
                )
                .await?;
        }
        self.inner.update(id, edit).await
    }
    async fn settle(&self, id: &ConcernId, until: time::OffsetDateTime) -> Result<(), StoreError> {
        self.inner.settle(id, until).await
    }
    async fn due_by(&self, now: time::OffsetDateTime) -> Result<Vec<ConcernId>, StoreError> {
        self.inner.due_by(now).await
    }
    async fn events(
        &self,
        agency: &AgencyId,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, InboxEvent)>, StoreError> {
        self.inner.events(agency, after, upto, limit).await
    }
    async fn append_event(&self, agency: &AgencyId, event: InboxEvent) -> Result<u64, StoreError> {
        self.inner.append_event(agency, event).await
    }
    fn durable_cursor(&self, agency: &AgencyId) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.durable_cursor(agency)
    }
    async fn catch_up(&self, agency: &AgencyId) -> Result<(), StoreError> {
        self.inner.catch_up(agency).await
    }
    async fn close(&self) -> Result<(), StoreError> {
        self.inner.close().await
    }
}

async fn interposed_fixture() -> (Fixture, Arc<Interposed>) {
    let mut slot = None;
    let f = fixture_over(DEFAULT_STALL_AFTER, |store| {
        let interposed = Interposed::over(store);
        slot = Some(interposed.clone());
        interposed
    })
    .await;
    (f, slot.unwrap())
}

fn id_of(s: &str) -> AgencyId {
    AgencyId::parse(s).unwrap()
}

async fn escalations_to(f: &Fixture, agency: &str) -> Vec<Escalation> {
    f.concerns
        .store()
        .events(&id_of(agency), 0, u64::MAX, 100)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(_, e)| match e {
            InboxEvent::Escalation(e) => Some(e),
            _ => None,
        })
        .collect()
}

/// An immediate-risk concern raised by the police, with the clock moved past every
/// recipient's deadline.
async fn late_concern(f: &Fixture) -> Concern {
    let c = raised_by_police(f, ConcernCategory::Neglect, Urgency::ImmediateRisk).await;
    f.clock.advance(time::Duration::minutes(61));
    c
}

/// The CONCERN_ESCALATED entries as (target, outcome).
fn escalation_entries(auditor: &Auditor) -> Vec<(String, i32)> {
    actions(auditor, AuditAction::ConcernEscalated)
        .into_iter()
        .map(|e| (e.target_agency_id, e.outcome))
        .collect()
}

#[tokio::test]
async fn an_escalation_whose_store_write_fails_is_withdrawn_in_the_log() {
    let (f, interposed) = interposed_fixture().await;
    let c = late_concern(&f).await;
    interposed.unwritable.lock().unwrap().push(c.id.clone());
    assert_eq!(f.concerns.sweep().await.unwrap(), 0);
    assert!(escalations_to(&f, "police-met").await.is_empty());
    // Each ALLOWED entry is answered by a DENIED one: no escalation was stored.
    let (allowed, denied) = (AuditOutcome::Allowed as i32, AuditOutcome::Denied as i32);
    let mut entries = escalation_entries(&f.auditor);
    entries.sort();
    assert_eq!(
        entries,
        vec![
            ("csc-southwark".to_owned(), allowed),
            ("csc-southwark".to_owned(), denied),
            ("school-oakfield".to_owned(), allowed),
            ("school-oakfield".to_owned(), denied),
        ]
    );
}

#[tokio::test]
async fn a_concern_decided_while_the_sweeper_audits_is_not_escalated() {
    let (f, interposed) = interposed_fixture().await;
    let c = late_concern(&f).await;
    // Another replica records the decision after the sweeper read the concern.
    let decided_at = f.clock.now();
    interposed.before_next_update(move |c| {
        c.decision = Some(DecisionRecord {
            decision: Decision::EarlyHelp,
            lead_practitioner: "A. Worker".into(),
            note: String::new(),
            decided_at,
            decided_by: id_of("csc-southwark"),
        });
    });
    assert_eq!(f.concerns.sweep().await.unwrap(), 0);

    let after = f.concerns.store().get(&c.id).await.unwrap().unwrap();
    assert_eq!(after.status(), ConcernStatus::Decided);
    assert!(after.recipients.iter().all(|d| !d.escalated), "{after:?}");
    assert!(escalations_to(&f, "police-met").await.is_empty());
    assert!(escalations_to(&f, "csc-southwark").await.is_empty());
    assert!(
        f.concerns
            .store()
            .due_by(f.clock.now())
            .await
            .unwrap()
            .is_empty(),
        "its deadlines are cleared"
    );
    // Each ALLOWED entry written before the decision was seen is withdrawn.
    let (allowed, denied) = (AuditOutcome::Allowed as i32, AuditOutcome::Denied as i32);
    let mut entries = escalation_entries(&f.auditor);
    entries.sort();
    assert_eq!(
        entries,
        vec![
            ("csc-southwark".to_owned(), allowed),
            ("csc-southwark".to_owned(), denied),
            ("school-oakfield".to_owned(), allowed),
            ("school-oakfield".to_owned(), denied),
        ]
    );
    assert_eq!(f.concerns.sweep().await.unwrap(), 0);
}

#[tokio::test]
async fn a_recipient_that_acknowledges_while_the_sweeper_audits_is_not_named_late() {
    let (f, interposed) = interposed_fixture().await;
    let c = late_concern(&f).await;
    let acked_at = f.clock.now();
    interposed.before_next_update(move |c| {
        c.acknowledge(&id_of("school-oakfield"), acked_at, "seen");
    });
    assert_eq!(f.concerns.sweep().await.unwrap(), 1);

    let after = f.concerns.store().get(&c.id).await.unwrap().unwrap();
    assert!(!after.delivery(&id_of("school-oakfield")).unwrap().escalated);
    assert!(after.delivery(&id_of("csc-southwark")).unwrap().escalated);
    for agency in ["police-met", "csc-southwark"] {
        let events = escalations_to(&f, agency).await;
        assert_eq!(events.len(), 1, "{agency}");
        assert!(events[0].reason.contains("csc-southwark"), "{events:?}");
        assert!(!events[0].reason.contains("school-oakfield"), "{events:?}");
    }
    let (allowed, denied) = (AuditOutcome::Allowed as i32, AuditOutcome::Denied as i32);
    let mut entries = escalation_entries(&f.auditor);
    entries.sort();
    assert_eq!(
        entries,
        vec![
            ("csc-southwark".to_owned(), allowed),
            ("school-oakfield".to_owned(), allowed),
            ("school-oakfield".to_owned(), denied),
        ]
    );
}

/// Raises two immediate-risk concerns a minute apart, the first unreadable, and
/// moves the clock past both deadlines.
async fn two_late_concerns_the_first_unreadable(
    f: &Fixture,
    interposed: &Interposed,
) -> (Concern, Concern) {
    let mut req = raise_request(ConcernCategory::Neglect, Urgency::ImmediateRisk);
    req.request_id = "k1".into();
    let broken = f
        .concerns
        .raise(&police(), req.clone(), "r1")
        .await
        .unwrap();
    f.clock.advance(time::Duration::minutes(1));
    req.request_id = "k2".into();
    let fine = f.concerns.raise(&police(), req, "r2").await.unwrap();
    f.clock.advance(time::Duration::minutes(61));
    interposed.make_unreadable(&broken.id);
    assert_eq!(
        f.concerns.store().due_by(f.clock.now()).await.unwrap(),
        vec![broken.id.clone(), fine.id.clone()],
        "the failing concern comes first"
    );
    (broken, fine)
}

#[tokio::test]
async fn a_concern_that_fails_does_not_hold_back_later_escalations() {
    let (f, interposed) = interposed_fixture().await;
    let (broken, fine) = two_late_concerns_the_first_unreadable(&f, &interposed).await;

    assert_eq!(f.concerns.sweep().await.unwrap(), 1);
    let after = f.concerns.store().get(&fine.id).await.unwrap().unwrap();
    assert_eq!(after.status(), ConcernStatus::Overdue);
    let events = escalations_to(&f, "police-met").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].concern_id, fine.id);
    // The failed one is left due, for the next sweep.
    assert_eq!(
        f.concerns.store().due_by(f.clock.now()).await.unwrap(),
        vec![broken.id.clone()]
    );
    assert_eq!(f.concerns.sweep().await.unwrap(), 0);
}

#[tokio::test]
async fn an_unwritable_audit_log_stops_the_sweep_and_sends_no_escalation() {
    let (f, interposed) = interposed_fixture().await;
    let (_broken, fine) = two_late_concerns_the_first_unreadable(&f, &interposed).await;
    f.auditor.close().await;

    let Err(ConcernError::Audit(_)) = f.concerns.sweep().await else {
        panic!("a sweep without an audit log did not fail");
    };
    let after = f.concerns.store().get(&fine.id).await.unwrap().unwrap();
    assert!(after.recipients.iter().all(|d| !d.escalated));
    assert!(escalations_to(&f, "police-met").await.is_empty());
    assert!(escalations_to(&f, "csc-southwark").await.is_empty());
    assert_eq!(
        f.concerns
            .store()
            .due_by(f.clock.now())
            .await
            .unwrap()
            .len(),
        2
    );
}

fn front_door() -> Caller {
    agency("csc-southwark", Sector::ChildrensSocialCare)
}

/// A concern raised by the police and already delivered to the front door (so the
/// front door's next call writes nothing before its own change).
async fn concern_seen_by_the_front_door(f: &Fixture) -> Concern {
    let c = raised_by_police(f, ConcernCategory::Neglect, Urgency::Urgent).await;
    f.concerns
        .get(&front_door(), c.id.as_str(), "r2")
        .await
        .unwrap()
}

/// The entries of `action` about `concern` as (outcome, reason).
fn entries_about(
    auditor: &Auditor,
    action: AuditAction,
    concern: &ConcernId,
) -> Vec<(i32, String)> {
    actions(auditor, action)
        .into_iter()
        .filter(|e| e.object_id == concern.as_str())
        .map(|e| (e.outcome, e.reason))
        .collect()
}

#[tokio::test]
async fn a_different_decision_stored_first_by_another_replica_is_failed_precondition() {
    let (f, interposed) = interposed_fixture().await;
    let c = concern_seen_by_the_front_door(&f).await;
    let decided_at = f.clock.now();
    interposed.before_next_update(move |c| {
        c.decision = Some(DecisionRecord {
            decision: Decision::PoliceAction,
            lead_practitioner: "B. Officer".into(),
            note: String::new(),
            decided_at,
            decided_by: id_of("csc-southwark"),
        });
    });
    let got = f
        .concerns
        .decide(
            &front_door(),
            c.id.as_str(),
            Decision::EarlyHelp,
            "A. Worker",
            "",
            "r3",
        )
        .await;
    let Err(ConcernError::Precondition(message)) = got else {
        panic!("a conflicting decision was answered {got:?}");
    };
    assert!(message.contains("POLICE_ACTION"), "{message}");
    let stored = f.concerns.store().get(&c.id).await.unwrap().unwrap();
    assert_eq!(stored.decision.unwrap().decision, Decision::PoliceAction);
    let entries = entries_about(&f.auditor, AuditAction::ConcernDecided, &c.id);
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0].0, AuditOutcome::Allowed as i32);
    assert!(entries[0].1.contains("EARLY_HELP"), "{entries:?}");
    assert_eq!(entries[1].0, AuditOutcome::Denied as i32);
    assert!(entries[1].1.starts_with("NOT_STORED"), "{entries:?}");

    // The same decision as stored is still answered with the concern.
    let again = f
        .concerns
        .decide(
            &front_door(),
            c.id.as_str(),
            Decision::PoliceAction,
            "B. Officer",
            "",
            "r4",
        )
        .await
        .unwrap();
    assert_eq!(again.status(), ConcernStatus::Decided);
}

#[tokio::test]
async fn an_acknowledgement_stored_first_by_another_replica_keeps_the_first_note() {
    let (f, interposed) = interposed_fixture().await;
    let c = concern_seen_by_the_front_door(&f).await;
    let acked_at = f.clock.now();
    interposed.before_next_update(move |c| {
        c.acknowledge(&id_of("csc-southwark"), acked_at, "first");
    });
    let got = f
        .concerns
        .acknowledge(&front_door(), c.id.as_str(), "second", "r3")
        .await
        .unwrap();
    assert_eq!(got.delivery(&id_of("csc-southwark")).unwrap().note, "first");
    let entries = entries_about(&f.auditor, AuditAction::ConcernAcknowledged, &c.id);
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0].0, AuditOutcome::Allowed as i32);
    assert_eq!(entries[1].0, AuditOutcome::Denied as i32);
    assert!(entries[1].1.starts_with("NOT_STORED"), "{entries:?}");
}

#[tokio::test]
async fn a_concern_stays_with_the_front_door_it_was_routed_to_when_config_names_another() {
    let f = fixture(DEFAULT_STALL_AFTER).await;
    let c = raised_by_police(&f, ConcernCategory::Neglect, Urgency::ImmediateRisk).await;
    assert_eq!(c.front_door, Some(id_of("csc-southwark")));
    // The gateway restarts with another front door, over the same store and log.
    let restarted = Arc::new(Concerns::new(
        Arc::new(dev_config(f._dir.path(), "csc-lambeth")),
        f.concerns.keys.clone(),
        f.concerns.auditor.clone(),
        f.clock.clone(),
        f.concerns.store().clone(),
    ));
    let lambeth = agency("csc-lambeth", Sector::ChildrensSocialCare);

    // Late: the escalation goes to the front door that holds the concern, which
    // the one named since could not even open.
    f.clock.advance(time::Duration::minutes(61));
    assert_eq!(restarted.sweep().await.unwrap(), 1);
    assert_eq!(escalations_to(&f, "csc-southwark").await.len(), 1);
    assert!(escalations_to(&f, "csc-lambeth").await.is_empty());
    assert!(matches!(
        restarted.get(&lambeth, c.id.as_str(), "r2").await,
        Err(ConcernError::NotFound(_))
    ));
    // It decides, as it would have before the change.
    let decided = restarted
        .decide(
            &front_door(),
            c.id.as_str(),
            Decision::ChildProtectionEnquiry,
            "A. Worker",
            "",
            "r3",
        )
        .await
        .unwrap();
    assert_eq!(decided.status(), ConcernStatus::Decided);
    assert_eq!(decided.decision.unwrap().decided_by, id_of("csc-southwark"));

    // A concern raised now is the new front door's alone.
    let newer = restarted
        .raise(
            &police(),
            raise_request(ConcernCategory::Neglect, Urgency::Urgent),
            "r4",
        )
        .await
        .unwrap();
    assert_eq!(newer.front_door, Some(id_of("csc-lambeth")));
    assert!(newer.delivery(&id_of("csc-southwark")).is_none());
    assert!(matches!(
        restarted
            .decide(
                &front_door(),
                newer.id.as_str(),
                Decision::EarlyHelp,
                "A. Worker",
                "",
                "r5",
            )
            .await,
        Err(ConcernError::NotFound(_))
    ));
    restarted
        .decide(
            &lambeth,
            newer.id.as_str(),
            Decision::EarlyHelp,
            "B. Worker",
            "",
            "r6",
        )
        .await
        .unwrap();
}

/// Waits (at most 5 s) until the stored concern `id` satisfies `done`: a call
/// dropped at the store's gate finishes in a task of its own.
async fn stored_when(
    f: &Fixture,
    id: &ConcernId,
    done: impl Fn(&Concern) -> bool,
) -> Option<Concern> {
    for _ in 0..500 {
        if let Some(c) = f.concerns.store().get(id).await.unwrap() {
            if done(&c) {
                return Some(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// A raise whose call is dropped (client gone, request timeout) once its
/// CONCERN_RAISED entry is queued, while the store writes the concern, is stored
/// all the same: the log never names a concern that was never raised.
#[tokio::test]
async fn a_raise_dropped_while_it_is_stored_is_stored_all_the_same() {
    let (f, interposed) = interposed_fixture().await;
    interposed.write_gate.arm();
    let police = police();
    let raise = f.concerns.raise(
        &police,
        raise_request(ConcernCategory::Neglect, Urgency::Urgent),
        "r1",
    );
    drop_at_the_gate(&interposed.write_gate, raise).await;
    let raised = actions(&f.auditor, AuditAction::ConcernRaised);
    assert_eq!(
        raised.len(),
        1,
        "the entry is durable before the store write"
    );
    // The gateway's shutdown waits for the flow, whose caller has gone.
    let finished = tokio::spawn({
        let sections = f.sections.clone();
        async move { sections.finish(Duration::from_secs(60)).await }
    });
    tokio::task::yield_now().await;
    assert!(
        !finished.is_finished(),
        "the flow is still held at the gate"
    );
    interposed.write_gate.open();
    assert_eq!(finished.await.unwrap(), 0, "every section ended");
    let id = ConcernId::parse(&raised[0].object_id).unwrap();
    let stored = f.concerns.store().get(&id).await.unwrap();
    assert!(
        stored.is_some(),
        "CONCERN_RAISED names {id}, which was never stored"
    );
    let inbox = f
        .concerns
        .store()
        .events(&id_of("school-oakfield"), 0, u64::MAX, 10)
        .await
        .unwrap();
    assert_eq!(inbox.len(), 1, "the recipient's inbox has the concern");
}

/// The same for an acknowledgement and a decision: each dropped between its
/// durable entry and the store's write is stored all the same.
#[tokio::test]
async fn an_acknowledgement_or_decision_dropped_while_it_is_stored_is_stored_all_the_same() {
    let (f, interposed) = interposed_fixture().await;
    let c = raised_by_police(&f, ConcernCategory::Neglect, Urgency::Urgent).await;
    // Delivered first, so that the gate holds the acknowledgement's own write.
    f.concerns
        .get(&school(), c.id.as_str(), "g1")
        .await
        .unwrap();

    interposed.write_gate.arm();
    let school = school();
    let acknowledge = f.concerns.acknowledge(&school, c.id.as_str(), "seen", "a1");
    drop_at_the_gate(&interposed.write_gate, acknowledge).await;
    assert_eq!(
        actions(&f.auditor, AuditAction::ConcernAcknowledged).len(),
        1
    );
    interposed.write_gate.open();
    let school_id = id_of("school-oakfield");
    let acknowledged = stored_when(&f, &c.id, |c| {
        c.delivery(&school_id)
            .is_some_and(|d| d.acknowledged_at.is_some())
    })
    .await;
    assert!(
        acknowledged.is_some(),
        "CONCERN_ACKNOWLEDGED is in the log, but the acknowledgement was never stored"
    );

    let front_door = agency("csc-southwark", Sector::ChildrensSocialCare);
    f.concerns
        .get(&front_door, c.id.as_str(), "g2")
        .await
        .unwrap();
    interposed.write_gate.arm();
    let decide = f.concerns.decide(
        &front_door,
        c.id.as_str(),
        Decision::EarlyHelp,
        "J. Smith",
        "",
        "d1",
    );
    drop_at_the_gate(&interposed.write_gate, decide).await;
    assert_eq!(actions(&f.auditor, AuditAction::ConcernDecided).len(), 1);
    interposed.write_gate.open();
    let decided = stored_when(&f, &c.id, |c| c.decision.is_some()).await;
    assert!(
        decided.is_some(),
        "CONCERN_DECIDED is in the log, but the decision was never stored"
    );
}

/// A raise under the idempotency key `k-1`.
fn keyed(category: ConcernCategory, urgency: Urgency) -> RaiseRequest {
    RaiseRequest {
        request_id: "k-1".into(),
        ..raise_request(category, urgency)
    }
}

/// The police raise [`keyed`] (neglect, urgent) as request `request_id`.
async fn raise_keyed(concerns: &Arc<Concerns>, request_id: &str) -> Concern {
    concerns
        .raise(
            &police(),
            keyed(ConcernCategory::Neglect, Urgency::Urgent),
            request_id,
        )
        .await
        .unwrap()
}

/// The CONCERN_RAISED entries as (outcome, object id, subject ref, reason).
fn raise_entries(auditor: &Auditor) -> Vec<(i32, String, String, String)> {
    actions(auditor, AuditAction::ConcernRaised)
        .into_iter()
        .map(|e| (e.outcome, e.object_id, e.subject_ref, e.reason))
        .collect()
}

#[tokio::test]
async fn a_reused_request_id_is_a_retry_only_with_the_same_content() {
    let f = fixture(DEFAULT_STALL_AFTER).await;
    let first = raise_keyed(&f.concerns, "r1").await;
    let other_child = NhsNumber::parse("4010232137").unwrap();

    // Each field that differs is refused by name; nothing is raised.
    let variations = [
        (
            "subject",
            RaiseRequest {
                subject: other_child.clone(),
                ..keyed(ConcernCategory::Neglect, Urgency::Urgent)
            },
        ),
        (
            "category",
            keyed(ConcernCategory::PhysicalAbuse, Urgency::Urgent),
        ),
        (
            "urgency",
            keyed(ConcernCategory::Neglect, Urgency::ImmediateRisk),
        ),
        (
            "narrative",
            RaiseRequest {
                narrative: "Another account altogether.".into(),
                ..keyed(ConcernCategory::Neglect, Urgency::Urgent)
            },
        ),
        (
            "recipient_agency_ids",
            RaiseRequest {
                recipients: vec!["nhs-guys".into()],
                ..keyed(ConcernCategory::Neglect, Urgency::Urgent)
            },
        ),
        (
            "category, narrative",
            RaiseRequest {
                narrative: "Another account altogether.".into(),
                ..keyed(ConcernCategory::Exploitation, Urgency::Urgent)
            },
        ),
    ];
    for (fields, req) in variations.clone() {
        let got = f.concerns.raise(&police(), req, "r2").await;
        let Err(ConcernError::Precondition(message)) = got else {
            panic!("a different {fields} under a used request_id was answered {got:?}");
        };
        assert_eq!(
            message,
            format!(
                "request_id was already used for concern {}, raised with different content \
                 (different {fields}); nothing was raised, and a new concern needs a new request_id",
                first.id
            )
        );
    }
    let entries = raise_entries(&f.auditor);
    assert_eq!(entries.len(), 1 + variations.len(), "{entries:?}");
    assert_eq!(entries[0].0, AuditOutcome::Allowed as i32);
    for ((outcome, object, subject, reason), (fields, req)) in entries[1..].iter().zip(&variations)
    {
        assert_eq!(*outcome, AuditOutcome::Denied as i32, "{reason}");
        assert_eq!(object, first.id.as_str(), "the concern the key raised");
        assert_eq!(
            subject,
            f.concerns.keys.subject_ref(&req.subject).as_str(),
            "the child of the refused referral"
        );
        assert_eq!(
            reason,
            &format!("REQUEST_ID_REUSED: different {fields} (answered FAILED_PRECONDITION)")
        );
    }
    for agency in ["school-oakfield", "csc-southwark", "nhs-guys"] {
        let inbox = f
            .concerns
            .store()
            .events(&id_of(agency), 0, u64::MAX, 10)
            .await
            .unwrap();
        let want = usize::from(agency != "nhs-guys");
        assert_eq!(inbox.len(), want, "{agency}: nothing new was sent");
    }

    // The same content is the retry, however its recipients and NHS number are
    // written: the front door named, an agency repeated, spaces in the number.
    let same = RaiseRequest {
        subject: NhsNumber::parse("943 476 5919").unwrap(),
        recipients: vec![
            "csc-southwark".into(),
            "school-oakfield".into(),
            "school-oakfield".into(),
        ],
        ..keyed(ConcernCategory::Neglect, Urgency::Urgent)
    };
    let retry = f.concerns.raise(&police(), same, "r3").await.unwrap();
    assert_eq!(retry.id, first.id);
    // And after a restart that names another front door: the concern keeps its own.
    let restarted = Arc::new(Concerns::new(
        Arc::new(dev_config(f._dir.path(), "csc-lambeth")),
        f.concerns.keys.clone(),
        f.concerns.auditor.clone(),
        f.clock.clone(),
        f.concerns.store().clone(),
    ));
    let retry = raise_keyed(&restarted, "r4").await;
    assert_eq!(retry.id, first.id);
    assert_eq!(
        raise_entries(&f.auditor).len(),
        1 + variations.len(),
        "a retry audits nothing"
    );
}

/// Two replicas raising under one key at once: the one whose store write finds the
/// other's concern already there answers a retry with it, and different content
/// with FAILED_PRECONDITION, after a DENIED entry (NOT_STORED) for the concern its
/// ALLOWED entry named but that was never stored.
#[tokio::test]
async fn a_reused_request_id_raised_first_by_another_replica_with_different_content_is_refused() {
    let (f, interposed) = interposed_fixture().await;
    let first = raise_keyed(&f.concerns, "r1").await;
    interposed
        .keys_unseen
        .store(true, std::sync::atomic::Ordering::SeqCst);

    let got = f
        .concerns
        .raise(
            &police(),
            keyed(ConcernCategory::Neglect, Urgency::ImmediateRisk),
            "r2",
        )
        .await;
    let Err(ConcernError::Precondition(message)) = got else {
        panic!("a different urgency under a used request_id was answered {got:?}");
    };
    assert!(
        message.contains(&format!("already used for concern {}", first.id)),
        "{message}"
    );
    let entries = raise_entries(&f.auditor);
    assert_eq!(entries.len(), 3, "{entries:?}");
    let unstored = &entries[1].1;
    assert_eq!(entries[1].0, AuditOutcome::Allowed as i32);
    assert_ne!(unstored, first.id.as_str());
    assert_eq!(entries[2].0, AuditOutcome::Denied as i32);
    assert_eq!(&entries[2].1, unstored, "answers the ALLOWED entry");
    assert_eq!(
        entries[2].3,
        format!(
            "NOT_STORED: request_id raised {} first (REQUEST_ID_REUSED: different urgency; answered FAILED_PRECONDITION)",
            first.id
        )
    );
    let unstored = ConcernId::parse(unstored).unwrap();
    assert!(f.concerns.store().get(&unstored).await.unwrap().is_none());

    // The same content through the same race is the retry; its ALLOWED entry,
    // for a concern never stored, is answered too.
    let retry = raise_keyed(&f.concerns, "r3").await;
    assert_eq!(retry.id, first.id);
    let entries = raise_entries(&f.auditor);
    assert_eq!(entries.len(), 5, "{entries:?}");
    assert_eq!(entries[3].0, AuditOutcome::Allowed as i32);
    assert_eq!(entries[4].0, AuditOutcome::Denied as i32);
    assert_eq!(entries[4].1, entries[3].1, "answers the ALLOWED entry");
    assert_eq!(
        entries[4].3,
        format!(
            "NOT_STORED: request_id raised {} first (a retry, answered with it)",
            first.id
        )
    );
}

/// A ListInbox page whose delivery of one concern fails still finishes the
/// others' deliveries, each audited CONCERN_DELIVERED: none is cut short between
/// its entry and its store write (a JoinSet dropped on the first error aborted
/// them).
#[tokio::test]
async fn a_failed_delivery_in_a_list_does_not_cut_the_others_short() {
    let (f, interposed) = interposed_fixture().await;
    let mut raised = Vec::new();
    for _ in 0..3 {
        raised.push(raised_by_police(&f, ConcernCategory::Neglect, Urgency::Urgent).await);
    }
    interposed
        .unwritable
        .lock()
        .unwrap()
        .push(raised[0].id.clone());
    interposed.write_gate.arm();
    let listing = tokio::spawn({
        let concerns = f.concerns.clone();
        async move { concerns.list_inbox(&school(), 10, "", None, "l1").await }
    });
    interposed.write_gate.entered.notified().await;
    // Let the failed delivery be seen before the others may write.
    for _ in 0..100 {
        if actions(&f.auditor, AuditAction::ConcernDelivered).len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    interposed.write_gate.open();
    assert!(listing.await.unwrap().is_err(), "one delivery failed");
    assert_eq!(f.sections.finish(Duration::from_secs(60)).await, 0);
    let school_id = id_of("school-oakfield");
    for c in &raised[1..] {
        let stored = f.concerns.store().get(&c.id).await.unwrap().unwrap();
        assert!(
            stored
                .delivery(&school_id)
                .is_some_and(|d| d.delivered_at.is_some()),
            "{} was audited CONCERN_DELIVERED but not stored as delivered",
            c.id
        );
    }
}
