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
    let records = Records::open(config, keys, Arc::new(auditor.clone()), clock.clone())
        .expect("record store")
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
        .find(&school, &nhs_number(), Purpose::EducationSupport, "r4")
        .await
        .expect("find");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].access, RecordAccess::OverrideOnly);
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
