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
use crate::proto::v1::AuditAction;

struct Fixture {
    _dir: tempfile::TempDir,
    clock: Arc<ManualClock>,
    auditor: Auditor,
    concerns: Arc<Concerns>,
}

async fn fixture(stall_after: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let text = crate::cli::serve::DEV_CONFIG_TOML.replace(
        "data_dir = \"data/dev\"",
        &format!(
            "data_dir = {:?}",
            dir.path().join("data").display().to_string()
        ),
    );
    let config = Arc::new(Config::from_toml_str(&text, dir.path(), "test.toml").unwrap());
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
    let concerns = Concerns::open(config, keys, Arc::new(auditor.clone()), clock.clone())
        .unwrap()
        .with_stall_after(stall_after);
    Fixture {
        _dir: dir,
        clock,
        auditor,
        concerns: Arc::new(concerns),
    }
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
    let c = f
        .concerns
        .raise(
            &police(),
            raise_request(ConcernCategory::DomesticAbuse, Urgency::Routine),
            "r1",
        )
        .await
        .unwrap();
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
    let c = f
        .concerns
        .raise(
            &police(),
            raise_request(ConcernCategory::Neglect, Urgency::ImmediateRisk),
            "r1",
        )
        .await
        .unwrap();
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
    let mut stalled = f
        .concerns
        .subscribe(&school(), 0, "sub-1", stop.clone())
        .await
        .unwrap();
    let mut reading = f
        .concerns
        .subscribe(&school(), 0, "sub-2", stop.clone())
        .await
        .unwrap();
    let total = 40;
    for i in 0..total {
        let mut req = raise_request(ConcernCategory::Neglect, Urgency::Routine);
        req.request_id = format!("k{i}");
        f.concerns.raise(&police(), req, "r").await.unwrap();
    }
    // The reading subscriber gets everything while the other takes nothing.
    for want in 1..=total {
        let (cursor, _) = tokio::time::timeout(Duration::from_secs(5), reading.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(cursor, want as u64);
    }
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
    assert!(last < total as u64);
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
