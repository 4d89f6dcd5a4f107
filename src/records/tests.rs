//! The capability in process, with a real audit log and store in a temporary folder
//! and a clock the tests move: override notices, retention and purging. The API is
//! tested end to end in `tests/records.rs`.

use std::sync::{Arc, Mutex};

use time::macros::datetime;
use time::Duration;

use super::*;
use crate::audit::writer::AuditSettings;
use crate::audit::Auditor;
use crate::domain::consent::{ConsentGiver, ConsentState};
use crate::domain::policy::{OverrideRequest, RecordAccess};
use crate::domain::{ManualClock, NhsNumber, PrincipalId, RecordCategory, Role};
use crate::testing::{drop_at_the_gate, Gate};

const JUSTIFICATION: &str = "  Child disclosed injuries at school; the DSL needs the A&E history  ";

/// Keeps every notice, or fails every one.
#[derive(Default)]
struct Recorder {
    notices: Mutex<Vec<OverrideNotice>>,
    fail: bool,
}

impl OverrideNotifier for Recorder {
    fn notify(&self, notice: OverrideNotice) -> NoticeFuture<'_> {
        Box::pin(async move {
            if self.fail {
                return Err(NoticeError("inbox unavailable".into()));
            }
            self.notices
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(notice);
            Ok(())
        })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    records: Records,
    clock: Arc<ManualClock>,
    auditor: Auditor,
}

fn fixture(notifier: Arc<dyn OverrideNotifier>) -> Fixture {
    fixture_over(notifier, |store| Arc::new(SledRecords::new(store)))
}

/// A fixture whose record store is `wrap` of the sled store.
fn fixture_over(
    notifier: Arc<dyn OverrideNotifier>,
    wrap: impl FnOnce(RecordStore) -> Arc<dyn RecordRepo>,
) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Arc::new(
        Config::from_toml_str(crate::cli::serve::DEV_CONFIG_TOML, dir.path(), "test.toml")
            .expect("dev config"),
    );
    let keys = Arc::new(Keys::load_or_create(&config.data_dir, None).expect("keys"));
    let clock = Arc::new(ManualClock::new(datetime!(2026-03-06 16:00 UTC)));
    let auditor = Auditor::open(
        AuditSettings {
            dir: config.data_dir.join("audit"),
            log_id: config.audit.log_id.clone(),
            max_batch: 64,
            cache_bytes: 8 * 1024 * 1024,
            wal_bytes: crate::audit::writer::DEFAULT_WAL_BYTES,
        },
        keys.clone(),
        clock.clone(),
    )
    .expect("audit log");
    let store = RecordStore::open(
        &config.data_dir.join("records"),
        &config.data_dir.join("record-content"),
        keys.clone(),
    )
    .expect("record store");
    let records = Records::new(
        config,
        keys,
        Arc::new(auditor.clone()),
        clock.clone(),
        wrap(store),
    )
    .with_notifier(notifier);
    Fixture {
        _dir: dir,
        records,
        clock,
        auditor,
    }
}

fn agency(id: &str, sector: Sector) -> Caller {
    Caller {
        id: PrincipalId::parse(id).expect("id"),
        role: Role::Agency,
        sector: Some(sector),
        cert_sha256: [7; 32],
        serial_hex: "01".into(),
    }
}

fn nhs_number() -> NhsNumber {
    NhsNumber::parse("9434765919").expect("valid")
}

/// The hospital and the school, and one record the hospital has shared.
async fn hospital_record(f: &Fixture) -> (Caller, Caller, Record) {
    let nhs = agency("nhs-guys", Sector::Health);
    let school = agency("school-oakfield", Sector::Education);
    let record = f
        .records
        .share(&nhs, new_record(None), "r1")
        .await
        .expect("share");
    (nhs, school, record)
}

fn new_record(retain_until: Option<time::OffsetDateTime>) -> NewRecord {
    NewRecord {
        subject: nhs_number(),
        category: RecordCategory::UnscheduledCareAttendance,
        summary: "A&E attendance".into(),
        content: b"fracture".to_vec(),
        media_type: "text/plain".into(),
        retain_until,
    }
}

fn read(record: &Record, purpose: Purpose, justification: Option<&str>) -> DiscloseRequest {
    DiscloseRequest {
        record_id: record.id.clone(),
        purpose,
        r#override: justification.map(|j| OverrideRequest {
            lawful_basis: "UK GDPR Art 6(1)(e)".into(),
            justification: j.into(),
        }),
    }
}

/// Entry `seq`. The writer answers an append before it publishes the log's new
/// size, which `AuditLog::entry` checks, so wait briefly for it.
async fn entry_at(auditor: &Auditor, seq: u64) -> crate::proto::v1::AuditEntry {
    for _ in 0..100 {
        if let Ok(entry) = auditor.log().entry(seq) {
            return entry;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no audit entry at seq {seq}")
}

#[tokio::test]
async fn an_override_notice_names_the_recipient_and_the_durable_audit_seq() {
    let recorder = Arc::new(Recorder::default());
    let f = fixture(recorder.clone());
    let (nhs, school, record) = hospital_record(&f).await;

    let d = f
        .records
        .disclose(
            &school,
            read(&record, Purpose::Safeguarding, Some(JUSTIFICATION)),
            "r2",
        )
        .await
        .expect("override");
    assert_eq!(d.basis, Basis::SafeguardingOverride);
    assert_eq!(d.content, b"fracture");

    let notices = recorder.notices.lock().expect("lock").clone();
    assert_eq!(notices.len(), 1);
    let n = &notices[0];
    assert_eq!(n.record_id, record.id);
    assert_eq!(n.owner.as_str(), "nhs-guys");
    assert_eq!(n.recipient.as_str(), "school-oakfield");
    assert_eq!(n.audit_seq, d.audit_seq);
    assert_eq!(n.justification, JUSTIFICATION.trim());
    assert!(!format!("{n:?}").contains("injuries"), "Debug redacts it");

    let entry = entry_at(&f.auditor, d.audit_seq).await;
    assert_eq!(entry.justification, JUSTIFICATION.trim());
    assert_eq!(entry.basis, DisclosureBasis::SafeguardingOverride as i32);

    // Reading with consent, or as owner, tells no one.
    f.records
        .disclose(
            &nhs,
            read(&record, Purpose::HealthCare, Some(JUSTIFICATION)),
            "r3",
        )
        .await
        .expect("owner");
    assert_eq!(recorder.notices.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn content_is_withheld_when_the_owner_cannot_be_told_of_an_override() {
    let f = fixture(Arc::new(Recorder {
        fail: true,
        ..Recorder::default()
    }));
    let (_, school, record) = hospital_record(&f).await;
    let err = f
        .records
        .disclose(
            &school,
            read(&record, Purpose::Safeguarding, Some(JUSTIFICATION)),
            "r2",
        )
        .await
        .expect_err("withheld");
    assert!(matches!(err, RecordError::Notice(_)), "{err:?}");

    // The log must not be left claiming a disclosure that did not happen: the
    // RECORD_DISCLOSED entry (seq 1, after RECORD_SHARED) is followed by a refusal
    // that names it.
    let disclosed = entry_at(&f.auditor, 1).await;
    assert_eq!(disclosed.action, AuditAction::RecordDisclosed as i32);
    let withheld = entry_at(&f.auditor, 2).await;
    assert_eq!(withheld.action, AuditAction::DisclosureDenied as i32);
    assert_eq!(withheld.outcome, AuditOutcome::Denied as i32);
    assert_eq!(withheld.object_id, record.id.as_str());
    assert_eq!(withheld.actor_id, "school-oakfield");
    assert_eq!(
        withheld.reason,
        "OVERRIDE_NOTICE_FAILED: withheld; see seq 1"
    );
}

/// A parent's statement about the test child, for the school, for EDUCATION_SUPPORT,
/// covering A&E attendances.
fn school_consent(state: ConsentState, valid_until: Option<time::OffsetDateTime>) -> NewConsent {
    NewConsent {
        subject: nhs_number(),
        state,
        given_by: ConsentGiver::Parent,
        purposes: vec![Purpose::EducationSupport],
        recipient_sectors: vec![],
        recipient_agency_ids: vec!["school-oakfield".into()],
        categories: vec![RecordCategory::UnscheduledCareAttendance],
        valid_until,
        note: String::new(),
    }
}

#[tokio::test]
async fn consent_is_read_at_each_disclosure() {
    let f = fixture(Arc::new(NoNotifier));
    let (nhs, school, record) = hospital_record(&f).await;
    let consent = f
        .records
        .record_consent(
            &nhs,
            school_consent(ConsentState::Given, Some(datetime!(2026-03-06 17:00 UTC))),
            "c1",
        )
        .await
        .expect("consent");
    let d = f
        .records
        .disclose(
            &school,
            read(&record, Purpose::EducationSupport, None),
            "r2",
        )
        .await
        .expect("with consent");
    assert_eq!(d.basis, Basis::Consent);
    assert_eq!(
        entry_at(&f.auditor, d.audit_seq).await.consent_id,
        consent.id()
    );

    // The statement lapses at valid_until: the next request is refused.
    f.clock.set(datetime!(2026-03-06 17:00 UTC));
    let err = f
        .records
        .disclose(
            &school,
            read(&record, Purpose::EducationSupport, None),
            "r3",
        )
        .await
        .expect_err("lapsed");
    assert!(
        matches!(&err, RecordError::Refused(d) if d.reason == crate::domain::policy::DenyReason::ConsentNeeded { override_possible: true }),
        "{err:?}"
    );
    let found = f
        .records
        .find(
            &school,
            &nhs_number(),
            Purpose::EducationSupport,
            Page::default(),
            "r4",
        )
        .await
        .expect("find");
    assert_eq!(found.found.len(), 1);
    assert_eq!(found.found[0].access, RecordAccess::OverrideOnly);
}

#[tokio::test]
async fn expired_records_are_refused_to_their_owner_and_purged_by_the_system() {
    let f = fixture(Arc::new(NoNotifier));
    let nhs = agency("nhs-guys", Sector::Health);
    let short = f
        .records
        .share(
            &nhs,
            new_record(Some(datetime!(2026-03-07 16:00 UTC))),
            "r1",
        )
        .await
        .expect("share");
    let long = f
        .records
        .share(&nhs, new_record(None), "r2")
        .await
        .expect("share");
    assert_eq!(
        long.retain_until,
        datetime!(2026-03-06 16:00 UTC) + Duration::days(2555)
    );
    assert_eq!(f.records.purge_expired().await.expect("sweep"), 0);

    f.clock.set(datetime!(2026-03-07 16:00 UTC));
    let err = f
        .records
        .disclose(&nhs, read(&short, Purpose::HealthCare, None), "r3")
        .await
        .expect_err("past retention");
    assert!(
        matches!(&err, RecordError::Refused(d) if d.reason == crate::domain::policy::DenyReason::Expired),
        "{err:?}"
    );
    assert_eq!(f.records.purge_expired().await.expect("sweep"), 1);
    assert_eq!(f.records.purge_expired().await.expect("sweep again"), 0);
    // After two RECORD_SHARED and one DISCLOSURE_DENIED: seq 3.
    let entry = entry_at(&f.auditor, 3).await;
    assert_eq!(entry.action, AuditAction::RecordPurged as i32);
    assert_eq!(entry.actor_id, "system");
    assert_eq!(entry.object_id, short.id.as_str());
    assert_eq!(
        f.records.store().record(&short.id).await.expect("read"),
        None
    );
    assert!(f
        .records
        .store()
        .record(&long.id)
        .await
        .expect("read")
        .is_some());
}

/// Consents are cached between disclosures; a withdrawal, or a newer refusal, must
/// still bind the very next one.
#[tokio::test]
async fn a_consent_change_binds_the_next_disclosure_after_cached_reads() {
    let f = fixture(Arc::new(NoNotifier));
    let (nhs, school, record) = hospital_record(&f).await;
    let statement = |state| school_consent(state, None);
    let disclose = |request_id: &'static str| {
        f.records.disclose(
            &school,
            read(&record, Purpose::EducationSupport, None),
            request_id,
        )
    };

    // Given, read twice (the second from the cache), then withdrawn.
    let given = f
        .records
        .record_consent(&nhs, statement(ConsentState::Given), "c1")
        .await
        .expect("consent");
    for id in ["d0", "d1"] {
        assert_eq!(disclose(id).await.expect("given").basis, Basis::Consent);
    }
    f.records
        .withdraw_consent(&nhs, &ConsentId::parse(given.id()).unwrap(), "", "w1")
        .await
        .expect("withdraw");
    let err = disclose("d2").await.expect_err("withdrawn");
    assert!(
        matches!(&err, RecordError::Refused(d) if matches!(d.reason, crate::domain::policy::DenyReason::ConsentWithdrawn { .. })),
        "{err:?}"
    );

    // Given again and cached; then a newer refusal wins at once.
    f.clock.set(datetime!(2026-03-06 17:00 UTC));
    f.records
        .record_consent(&nhs, statement(ConsentState::Given), "c2")
        .await
        .expect("consent");
    for id in ["d3", "d4"] {
        assert_eq!(disclose(id).await.expect("given").basis, Basis::Consent);
    }
    f.clock.set(datetime!(2026-03-06 18:00 UTC));
    f.records
        .record_consent(&nhs, statement(ConsentState::Refused), "c3")
        .await
        .expect("refusal");
    let err = disclose("d5").await.expect_err("refused");
    assert!(
        matches!(&err, RecordError::Refused(_)),
        "a newer refusal must bind the next disclosure: {err:?}"
    );
}

/// A fixture over the [`Hooked`] store, and the gate its writes wait at.
fn gated_fixture() -> (Fixture, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    let f = fixture_over(Arc::new(NoNotifier), {
        let gate = gate.clone();
        move |store| Arc::new(Hooked::new(store, gate))
    });
    (f, gate)
}

/// The sled store with seams for tests: `put_record` and `put_consent` wait at `write_gate`
/// before it writes (as a slow fdatasync would), and `content` can be preceded by a
/// purge of the record (as by the sweeper between a disclosure's metadata read and
/// its content read).
struct Hooked {
    inner: SledRecords,
    write_gate: Arc<Gate>,
    purge_before_content: std::sync::atomic::AtomicBool,
}

impl Hooked {
    fn new(store: RecordStore, write_gate: Arc<Gate>) -> Self {
        Hooked {
            inner: SledRecords::new(store),
            write_gate,
            purge_before_content: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl RecordRepo for Hooked {
    async fn put_record(&self, record: &Record, content: &[u8]) -> Result<(), StoreError> {
        self.write_gate.pass().await;
        self.inner.put_record(record, content).await
    }
    async fn record(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        self.inner.record(id).await
    }
    async fn records_about(&self, subject: &SubjectRef) -> Result<Vec<Record>, StoreError> {
        self.inner.records_about(subject).await
    }
    async fn content(&self, id: &RecordId) -> Result<Vec<u8>, StoreError> {
        if self
            .purge_before_content
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            if let Some(record) = self.inner.record(id).await? {
                self.inner.purge(&record).await?;
            }
        }
        self.inner.content(id).await
    }
    async fn expired_by(
        &self,
        now: time::OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<Due>, StoreError> {
        self.inner.expired_by(now, limit).await
    }
    async fn forget(&self, due: &Due) -> Result<(), StoreError> {
        self.inner.forget(due).await
    }
    async fn purge(&self, record: &Record) -> Result<(), StoreError> {
        self.inner.purge(record).await
    }
    async fn put_consent(&self, consent: &Consent) -> Result<(), StoreError> {
        self.write_gate.pass().await;
        self.inner.put_consent(consent).await
    }
    async fn consent(&self, id: &ConsentId) -> Result<Option<Consent>, StoreError> {
        self.inner.consent(id).await
    }
    async fn consents_about(&self, subject: &SubjectRef) -> Result<Vec<Consent>, StoreError> {
        self.inner.consents_about(subject).await
    }
    async fn disclosing(&self, subject: &SubjectRef) -> Result<SubjectHold, StoreError> {
        self.inner.disclosing(subject).await
    }
    async fn changing_consent(&self, subject: &SubjectRef) -> Result<SubjectHold, StoreError> {
        self.inner.changing_consent(subject).await
    }
    async fn close(&self) -> Result<(), StoreError> {
        self.inner.close().await
    }
}

/// A withdrawal whose call is dropped (client gone, request timeout) after its
/// CONSENT_WITHDRAWN entry is durable but while the store is still writing must
/// still bind the next disclosure: the child stays held until the store and the
/// consent cache have the change.
#[tokio::test]
async fn a_withdrawal_cancelled_mid_write_still_binds_the_next_disclosure() {
    let (f, gate) = gated_fixture();
    let (nhs, school, record) = hospital_record(&f).await;
    let given = f
        .records
        .record_consent(&nhs, school_consent(ConsentState::Given, None), "c1")
        .await
        .expect("consent");
    let disclose = |request_id: &'static str| {
        f.records.disclose(
            &school,
            read(&record, Purpose::EducationSupport, None),
            request_id,
        )
    };
    // Read under consent: the cache now holds the GIVEN statement.
    assert_eq!(disclose("d0").await.expect("given").basis, Basis::Consent);

    // The withdrawal reaches the store's write, then its call is dropped.
    gate.arm();
    let id = ConsentId::parse(given.id()).expect("id");
    drop_at_the_gate(&gate, f.records.withdraw_consent(&nhs, &id, "", "w1")).await;
    // RECORD_SHARED, CONSENT_RECORDED, RECORD_DISCLOSED, then CONSENT_WITHDRAWN.
    assert_eq!(
        entry_at(&f.auditor, 3).await.action,
        AuditAction::ConsentWithdrawn as i32
    );

    // The next disclosure, with the write let go a little later.
    let (next, ()) = tokio::join!(disclose("d1"), async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        gate.open();
    });
    let err = next.expect_err("a withdrawal whose entry is durable must bind");
    assert!(
        matches!(&err, RecordError::Refused(d) if matches!(d.reason, crate::domain::policy::DenyReason::ConsentWithdrawn { .. })),
        "{err:?}"
    );
    let stored = f.records.store().consent(&id).await.expect("read");
    assert_eq!(
        stored.map(|c| c.statement.state),
        Some(ConsentState::Withdrawn)
    );
}

/// The same for a newer refusal whose call is dropped while the store writes it.
#[tokio::test]
async fn a_refusal_cancelled_mid_write_still_binds_the_next_disclosure() {
    let (f, gate) = gated_fixture();
    let (nhs, school, record) = hospital_record(&f).await;
    f.records
        .record_consent(&nhs, school_consent(ConsentState::Given, None), "c1")
        .await
        .expect("consent");
    let disclose = |request_id: &'static str| {
        f.records.disclose(
            &school,
            read(&record, Purpose::EducationSupport, None),
            request_id,
        )
    };
    assert_eq!(disclose("d0").await.expect("given").basis, Basis::Consent);

    f.clock.set(datetime!(2026-03-06 16:01 UTC));
    gate.arm();
    drop_at_the_gate(
        &gate,
        f.records
            .record_consent(&nhs, school_consent(ConsentState::Refused, None), "c2"),
    )
    .await;
    let (next, ()) = tokio::join!(disclose("d1"), async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        gate.open();
    });
    let err = next.expect_err("a refusal whose entry is durable must bind");
    assert!(
        matches!(&err, RecordError::Refused(d) if matches!(d.reason, crate::domain::policy::DenyReason::ConsentRefused { .. })),
        "{err:?}"
    );
}

/// A share whose call is dropped (client gone, request timeout) after its
/// RECORD_SHARED entry is queued but before the store has the record still
/// stores it: the log never names a record that was not stored.
#[tokio::test]
async fn a_share_dropped_mid_write_is_still_stored() {
    let (f, gate) = gated_fixture();
    let nhs = agency("nhs-guys", Sector::Health);
    gate.arm();
    drop_at_the_gate(&gate, f.records.share(&nhs, new_record(None), "s1")).await;
    let shared = entry_at(&f.auditor, 0).await;
    assert_eq!(shared.action, AuditAction::RecordShared as i32);
    gate.open();
    let id = RecordId::parse(&shared.object_id).expect("the entry names the record");
    let mut stored = None;
    for _ in 0..500 {
        stored = f.records.store().record(&id).await.expect("read");
        if stored.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        stored.is_some(),
        "RECORD_SHARED names {id}, which was never stored"
    );
    assert_eq!(
        f.records.store().content(&id).await.expect("content"),
        b"fracture"
    );
}

/// "The newest statement wins" must follow the order statements were recorded in,
/// not the clocks of the replicas that recorded them: a refusal recorded after a
/// consent, by a clock that reads earlier, still binds.
#[tokio::test]
async fn a_refusal_recorded_by_a_clock_stepped_back_still_wins() {
    let f = fixture(Arc::new(NoNotifier));
    let (nhs, school, record) = hospital_record(&f).await;
    let given = f
        .records
        .record_consent(&nhs, school_consent(ConsentState::Given, None), "c1")
        .await
        .expect("consent");
    f.clock.set(datetime!(2026-03-06 15:00 UTC));
    let refused = f
        .records
        .record_consent(&nhs, school_consent(ConsentState::Refused, None), "c2")
        .await
        .expect("refusal");
    let err = f
        .records
        .disclose(
            &school,
            read(&record, Purpose::EducationSupport, None),
            "d1",
        )
        .await
        .expect_err("the refusal was recorded last");
    assert!(
        matches!(&err, RecordError::Refused(d) if matches!(&d.reason, crate::domain::policy::DenyReason::ConsentRefused { consent_id, .. } if consent_id == refused.id())),
        "{err:?}"
    );
    assert!(
        refused.statement.recorded_at > given.statement.recorded_at,
        "{} is not after {}",
        refused.statement.recorded_at,
        given.statement.recorded_at
    );
}

/// A record purged between a disclosure's metadata read and its content read is
/// answered as expired (NOT_FOUND), and the refusal is audited.
#[tokio::test]
async fn a_record_purged_while_being_read_is_refused_as_expired_and_audited() {
    let hooked = Arc::new(std::sync::OnceLock::<Arc<Hooked>>::new());
    let f = fixture_over(Arc::new(NoNotifier), {
        let hooked = hooked.clone();
        move |store| {
            let repo = Arc::new(Hooked::new(store, Arc::default()));
            let _ = hooked.set(repo.clone());
            repo
        }
    });
    let (nhs, _, record) = hospital_record(&f).await;
    hooked
        .get()
        .expect("set")
        .purge_before_content
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = f
        .records
        .disclose(&nhs, read(&record, Purpose::HealthCare, None), "d1")
        .await
        .expect_err("purged");
    assert!(
        matches!(&err, RecordError::Refused(d) if d.reason == crate::domain::policy::DenyReason::Expired),
        "{err:?}"
    );
    // After RECORD_SHARED: seq 1.
    let entry = entry_at(&f.auditor, 1).await;
    assert_eq!(entry.action, AuditAction::DisclosureDenied as i32);
    assert_eq!(entry.outcome, AuditOutcome::Denied as i32);
    assert_eq!(entry.object_id, record.id.as_str());
    assert!(entry.reason.starts_with("EXPIRED"), "{}", entry.reason);
}
