//! Records and consents on PostgreSQL (issue 9), against a real server.
//!
//! Each test reads the server's URL from `SGW_TEST_POSTGRES_URL` (a role that may
//! create databases, e.g. `postgres://sgw@127.0.0.1:5432/postgres`), makes its own
//! database, and drops it when it passes. When the variable is unset each test says
//! why it is skipped and returns. `.ci/run` starts a throwaway cluster and sets it.
//!
//! Replicas are independent `PgRecordStore`s with their own pools, sharing only the
//! database and the key folder, as gateway processes would.

mod pg_common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use pg_common::{dump_public_tables, server_url, TestDb};
use sgw::domain::consent::{ConsentGiver, ConsentScope, ConsentState, ConsentStatement};
use sgw::domain::{AgencyId, NhsNumber, Purpose, RecordCategory, Sector};
use sgw::pg::{PgConfig, PgRecordStore};
use sgw::records::store::StoreError;
use sgw::records::{Consent, ConsentId, Record, RecordId};
use sgw::store::Keys;
use time::macros::datetime;
use time::OffsetDateTime;

/// Two replicas starting at the same moment on one empty key folder and one new
/// database: both create the keys (the same ones must win for both) and apply the
/// migrations (once).
async fn two_replicas(db: &TestDb, keys_dir: &Path) -> (PgRecordStore, PgRecordStore, Arc<Keys>) {
    let open = |dir: std::path::PathBuf, config: PgConfig| async move {
        let keys = tokio::task::spawn_blocking(move || Keys::load_or_create(&dir, None))
            .await
            .unwrap()
            .expect("keys");
        let keys = Arc::new(keys);
        let store = PgRecordStore::open(&config, keys.clone())
            .await
            .expect("open the postgres record store");
        (store, keys)
    };
    let a = tokio::spawn(open(keys_dir.to_owned(), db.config(4)));
    let b = tokio::spawn(open(keys_dir.to_owned(), db.config(4)));
    let ((a, keys_a), (b, keys_b)) = (a.await.unwrap(), b.await.unwrap());
    let nhs = child();
    assert_eq!(
        keys_a.subject_ref(&nhs),
        keys_b.subject_ref(&nhs),
        "replicas created the same keys"
    );
    (a, b, keys_a)
}

fn child() -> NhsNumber {
    NhsNumber::parse("9434765919").unwrap()
}

fn other_child() -> NhsNumber {
    NhsNumber::parse("4010232137").unwrap()
}

fn record(keys: &Keys, subject: NhsNumber, n: u8, retain_until: OffsetDateTime) -> Record {
    Record {
        id: RecordId::from_random([n; 16]),
        subject_ref: keys.subject_ref(&subject),
        subject,
        owner: AgencyId::parse("nhs-guys").unwrap(),
        owner_sector: Sector::Health,
        category: RecordCategory::UnscheduledCareAttendance,
        summary: format!("A&E attendance number {n}"),
        media_type: "text/plain".into(),
        content_len: 12,
        shared_at: datetime!(2026-03-02 09:00 UTC),
        retain_until,
    }
}

fn consent(keys: &Keys, subject: NhsNumber, n: u8, note: &str) -> Consent {
    let scope = ConsentScope::parse(
        BTreeSet::from([Purpose::Safeguarding, Purpose::EarlyHelp]),
        BTreeSet::from([Sector::Education]),
        BTreeSet::from([AgencyId::parse("school-1").unwrap()]),
        BTreeSet::from([RecordCategory::UnscheduledCareAttendance]),
        Some(datetime!(2027-01-01 00:00 UTC)),
    )
    .unwrap();
    let statement = ConsentStatement::record(
        ConsentId::from_random([n; 16]).to_string(),
        keys.subject_ref(&subject).as_str().to_owned(),
        ConsentState::Given,
        ConsentGiver::Parent,
        scope,
        AgencyId::parse("nhs-guys").unwrap(),
        datetime!(2026-03-02 10:00 UTC),
    )
    .unwrap();
    Consent {
        statement,
        subject,
        note: note.to_owned(),
        withdrawal_note: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_and_consents_round_trip_between_two_replicas() {
    let Some(url) = server_url("records_round_trip") else {
        return;
    };
    let db = TestDb::create(&url, "records_round_trip").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let (a, b, keys) = two_replicas(&db, keys_dir.path()).await;

    // Records written through A are read through B, in full.
    let mine = record(&keys, child(), 1, datetime!(2030-01-01 00:00 UTC));
    let also_mine = record(&keys, child(), 2, datetime!(2031-01-01 00:00 UTC));
    let theirs = record(&keys, other_child(), 3, datetime!(2030-01-01 00:00 UTC));
    a.put_record(&mine, b"content of 1").await.unwrap();
    a.put_record(&also_mine, b"content of 2").await.unwrap();
    b.put_record(&theirs, b"content of 3").await.unwrap();
    assert_eq!(b.record(&mine.id).await.unwrap(), Some(mine.clone()));
    assert_eq!(b.content(&mine.id).await.unwrap(), b"content of 1");
    assert_eq!(a.content(&theirs.id).await.unwrap(), b"content of 3");
    let mut about = b.records_about(&mine.subject_ref).await.unwrap();
    about.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(about, vec![mine.clone(), also_mine.clone()]);
    assert_eq!(
        a.records_about(&theirs.subject_ref).await.unwrap(),
        vec![theirs.clone()]
    );
    let unknown = RecordId::from_random([99; 16]);
    assert_eq!(b.record(&unknown).await.unwrap(), None);
    assert!(matches!(
        b.content(&unknown).await,
        Err(StoreError::Corrupt(_))
    ));

    // Consents: recorded through A, seen by B; withdrawn through A (put_consent
    // with the withdrawn statement), and B's very next call returns the withdrawal.
    let given = consent(&keys, child(), 7, "parent agreed by phone");
    let elsewhere = consent(&keys, other_child(), 8, "carer agreed in person");
    a.put_consent(&given).await.unwrap();
    a.put_consent(&elsewhere).await.unwrap();
    assert_eq!(
        b.consents_about(&given.subject_ref()).await.unwrap(),
        vec![given.clone()]
    );
    let given_id = ConsentId::parse(given.id()).unwrap();
    assert_eq!(b.consent(&given_id).await.unwrap(), Some(given.clone()));
    assert_eq!(
        b.consent(&ConsentId::from_random([98; 16])).await.unwrap(),
        None
    );
    let mut withdrawn = given.clone();
    withdrawn
        .statement
        .withdraw(datetime!(2026-03-03 10:00 UTC))
        .unwrap();
    withdrawn.withdrawal_note = "parent changed their mind".into();
    a.put_consent(&withdrawn).await.unwrap();
    let next = b.consents_about(&given.subject_ref()).await.unwrap();
    assert_eq!(
        next,
        vec![withdrawn.clone()],
        "B's next call sees the withdrawal"
    );
    assert_eq!(next[0].statement.state, ConsentState::Withdrawn);
    assert_eq!(b.consent(&given_id).await.unwrap(), Some(withdrawn.clone()));
    // And back and forth: each change through one replica is what the other's next
    // call returns (statements replaced in place, one row per id).
    for round in 0..20u8 {
        let (writer, reader) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let mut c = consent(&keys, child(), 7, &format!("note {round}"));
        if round % 3 == 0 {
            c.statement
                .withdraw(datetime!(2026-03-03 10:00 UTC))
                .unwrap();
        }
        writer.put_consent(&c).await.unwrap();
        assert_eq!(
            reader.consents_about(&c.subject_ref()).await.unwrap(),
            vec![c],
            "round {round}"
        );
    }
    assert_eq!(
        a.consents_about(&elsewhere.subject_ref()).await.unwrap(),
        vec![elsewhere]
    );

    drop((a, b));
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_come_soonest_first_and_purge_completely() {
    let Some(url) = server_url("records_purge") else {
        return;
    };
    let db = TestDb::create(&url, "records_purge").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let (a, b, keys) = two_replicas(&db, keys_dir.path()).await;

    // Ten records due at five moments (two at each, of both children), stored out
    // of order, and two not due.
    let moments = [
        datetime!(2026-03-03 09:00 UTC),
        datetime!(2026-03-04 09:00 UTC),
        datetime!(2026-03-05 09:00 UTC),
        datetime!(2026-03-06 09:00 UTC),
        datetime!(2026-03-07 09:00 UTC),
    ];
    let mut due = Vec::new();
    for (n, at) in (1u8..).zip(moments.iter().cycle().take(10)) {
        let subject = if n % 2 == 0 { child() } else { other_child() };
        due.push(record(&keys, subject, n, *at));
    }
    let later = [
        record(&keys, child(), 50, datetime!(2026-03-08 09:00 UTC)),
        record(&keys, child(), 51, datetime!(2040-01-01 00:00 UTC)),
    ];
    for r in due.iter().rev().chain(&later) {
        a.put_record(r, format!("content of {}", r.id).as_bytes())
            .await
            .unwrap();
    }
    let mut expected = due.clone();
    expected.sort_by(|x, y| (x.retain_until, &x.id).cmp(&(y.retain_until, &y.id)));
    let ids = |v: Vec<sgw::pg::PgDue>| v.into_iter().map(|d| d.id).collect::<Vec<_>>();

    assert!(b
        .expired_by(datetime!(2026-03-03 08:59:59.999999 UTC), 100)
        .await
        .unwrap()
        .is_empty());
    // Due exactly at `now` is included.
    assert_eq!(
        ids(b.expired_by(moments[0], 100).await.unwrap()),
        expected[..2]
            .iter()
            .map(|r| r.id.clone())
            .collect::<Vec<_>>()
    );
    let now = datetime!(2026-03-07 12:00 UTC);
    let all_due = b.expired_by(now, 100).await.unwrap();
    assert_eq!(
        ids(all_due.clone()),
        expected.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        "soonest first, then by id; the records not due are not listed"
    );
    assert_eq!(
        ids(b.expired_by(now, 3).await.unwrap()),
        expected[..3]
            .iter()
            .map(|r| r.id.clone())
            .collect::<Vec<_>>(),
        "at most `limit`, the soonest"
    );

    // The sweeper's loop, 3 at a time, alternating replicas: every due record goes,
    // in order, and nothing else.
    let mut purged = Vec::new();
    let mut turn = 0;
    loop {
        let store = if turn % 2 == 0 { &a } else { &b };
        turn += 1;
        let batch = store.expired_by(now, 3).await.unwrap();
        let n = batch.len();
        for d in batch {
            let Some(r) = store.record(&d.id).await.unwrap() else {
                store.forget(&d).await.unwrap();
                continue;
            };
            store.purge(&r).await.unwrap();
            purged.push(r.id);
        }
        if n < 3 {
            break;
        }
    }
    assert_eq!(
        purged,
        expected.iter().map(|r| r.id.clone()).collect::<Vec<_>>()
    );
    let sql = db.sql().await;
    for r in &due {
        // Gone through either replica: metadata, content and retention date.
        assert_eq!(a.record(&r.id).await.unwrap(), None);
        assert_eq!(b.record(&r.id).await.unwrap(), None);
        assert!(matches!(
            b.content(&r.id).await,
            Err(StoreError::Corrupt(_))
        ));
        let rows: i64 = sql
            .query_one(
                "SELECT count(*) FROM records WHERE id = $1",
                &[&r.id.as_str()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 0, "no row left of {}", r.id);
        // Purging again is not an error.
        a.purge(r).await.unwrap();
        b.purge(r).await.unwrap();
    }
    for d in &all_due {
        b.forget(d).await.unwrap();
    }
    assert!(b.expired_by(now, 100).await.unwrap().is_empty());
    assert_eq!(
        b.records_about(&keys.subject_ref(&other_child()))
            .await
            .unwrap(),
        vec![]
    );
    let mut left = a.records_about(&keys.subject_ref(&child())).await.unwrap();
    left.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(left, later.to_vec(), "records not due stay");
    for r in &later {
        assert_eq!(
            b.content(&r.id).await.unwrap(),
            format!("content of {}", r.id).as_bytes()
        );
    }
    assert_eq!(
        ids(b
            .expired_by(datetime!(2030-01-01 00:00 UTC), 100)
            .await
            .unwrap()),
        vec![later[0].id.clone()]
    );

    drop(sql);
    drop((a, b));
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_in_clear_in_the_database() {
    let Some(url) = server_url("records_clear") else {
        return;
    };
    let db = TestDb::create(&url, "records_clear").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let (a, _b, keys) = two_replicas(&db, keys_dir.path()).await;

    let mut r = record(&keys, child(), 1, datetime!(2030-01-01 00:00 UTC));
    r.summary = "SUMMARY-broken-arm-after-fall".into();
    let content = b"CONTENT-the-child-said-her-stepfather-did-it".to_vec();
    r.content_len = content.len() as u64;
    a.put_record(&r, &content).await.unwrap();
    let mut c = consent(&keys, child(), 7, "NOTE-mother-agreed-at-clinic");
    c.statement
        .withdraw(datetime!(2026-03-03 10:00 UTC))
        .unwrap();
    c.withdrawal_note = "WITHDRAWAL-NOTE-father-objected".into();
    a.put_consent(&c).await.unwrap();

    let sql = db.sql().await;
    let (tables, dump) = dump_public_tables(&sql).await;
    assert!(tables.contains(&"records".to_string()) && tables.contains(&"consents".to_string()));
    let holds = |needle: &[u8]| dump.windows(needle.len()).any(|w| w == needle);
    // The dump does see what is meant to be in clear.
    assert!(
        holds(r.subject_ref.as_str().as_bytes()),
        "the dump reads the rows"
    );
    assert!(holds(r.id.as_str().as_bytes()));
    assert!(holds(c.id().as_bytes()));
    for secret in [
        content.as_slice(),
        b"CONTENT",
        r.summary.as_bytes(),
        b"SUMMARY",
        child().digits().as_bytes(),
        b"NOTE-mother",
        b"WITHDRAWAL-NOTE",
        b"nhs-guys",
        b"UNSCHEDULED_CARE_ATTENDANCE",
    ] {
        assert!(
            !holds(secret),
            "{:?} is in clear in the database",
            String::from_utf8_lossy(secret)
        );
    }
    // And it all reads back.
    assert_eq!(a.content(&r.id).await.unwrap(), content);
    assert_eq!(a.record(&r.id).await.unwrap(), Some(r.clone()));
    assert_eq!(
        a.consents_about(&c.subject_ref()).await.unwrap(),
        vec![c.clone()]
    );

    drop(sql);
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_moved_or_swapped_do_not_open() {
    let Some(url) = server_url("records_tamper") else {
        return;
    };
    let db = TestDb::create(&url, "records_tamper").await;
    let keys_dir = tempfile::tempdir().unwrap();
    let (a, b, keys) = two_replicas(&db, keys_dir.path()).await;
    let one = record(&keys, child(), 1, datetime!(2030-01-01 00:00 UTC));
    let two = record(&keys, child(), 2, datetime!(2030-01-01 00:00 UTC));
    a.put_record(&one, b"one").await.unwrap();
    a.put_record(&two, b"two").await.unwrap();
    let c = consent(&keys, child(), 7, "note");
    a.put_consent(&c).await.unwrap();
    let sql = db.sql().await;

    // Content swapped between two records: the associated data (the id) refuses it.
    sql.batch_execute(&format!(
        "UPDATE records SET sealed_content = (SELECT sealed_content FROM records WHERE id = '{}') \
         WHERE id = '{}'",
        two.id, one.id
    ))
    .await
    .unwrap();
    assert!(
        matches!(b.content(&one.id).await, Err(StoreError::Corrupt(m)) if m.contains("does not open"))
    );
    assert_eq!(b.content(&two.id).await.unwrap(), b"two");

    // A record and a consent moved under another child are refused, not listed
    // there.
    let other = keys.subject_ref(&other_child());
    sql.execute(
        "UPDATE records SET subject_ref = $1 WHERE id = $2",
        &[&other.as_str(), &two.id.as_str()],
    )
    .await
    .unwrap();
    sql.execute(
        "UPDATE consents SET subject_ref = $1 WHERE id = $2",
        &[&other.as_str(), &c.id()],
    )
    .await
    .unwrap();
    assert!(
        matches!(b.record(&two.id).await, Err(StoreError::Corrupt(m)) if m.contains("another child"))
    );
    assert!(matches!(
        b.records_about(&other).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        b.consents_about(&other).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        b.consent(&ConsentId::parse(c.id()).unwrap()).await,
        Err(StoreError::Corrupt(_))
    ));

    // Metadata swapped between records: does not open under the other id.
    sql.batch_execute(&format!(
        "UPDATE records SET sealed_meta = (SELECT sealed_meta FROM records WHERE id = '{}') \
         WHERE id = '{}'",
        one.id, two.id
    ))
    .await
    .unwrap();
    assert!(
        matches!(b.record(&two.id).await, Err(StoreError::Corrupt(m)) if m.contains("does not open"))
    );

    drop(sql);
    drop((a, b));
    db.drop_database().await;
}

/// A replica whose key files differ from those the database was written with
/// refuses to start, naming which keys differ, instead of writing rows the other
/// replicas cannot open.
#[tokio::test]
async fn a_replica_with_other_keys_refuses_to_start() {
    let Some(url) = server_url("a_replica_with_other_keys_refuses_to_start") else {
        return;
    };
    let db = TestDb::create(&url, "key_check").await;
    let open = |dir: &Path| {
        let config =
            sgw::config::Config::from_toml_str(sgw::cli::serve::DEV_CONFIG_TOML, dir, "t.toml")
                .expect("dev config");
        let keys = Arc::new(Keys::load_or_create(&config.data_dir, None).expect("keys"));
        let storage = sgw::config::PostgresStorage {
            connection: db.config(4),
            replica: "r".into(),
        };
        async move {
            sgw::pg::backend::open(&storage, &config, keys, Arc::new(sgw::domain::SystemClock))
                .await
                .map(|_| ())
        }
    };
    let first = tempfile::tempdir().unwrap();
    open(first.path()).await.expect("the first replica starts");
    open(first.path())
        .await
        .expect("a replica with the same keys starts");
    let other = tempfile::tempdir().unwrap();
    let err = open(other.path())
        .await
        .expect_err("other keys are refused");
    let msg = err.to_string();
    for key in [
        "audit sealing",
        "data sealing",
        "subject",
        "checkpoint signing",
    ] {
        assert!(msg.contains(key), "{msg}");
    }
    db.drop_database().await;
}
