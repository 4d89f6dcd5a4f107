//! Consent withdrawn on one replica while callers disclose through two: the row
//! lock on the child (`subject_locks`) orders them across replicas, so no
//! disclosure that relied on the consent has an audit seq after the withdrawal's,
//! and every call that starts after the withdrawal returned is refused.
//!
//! The replicas are two complete PostgreSQL backends (their own pools and audit
//! writers) over one database and one key folder, as two gateway processes would be.
//! Skipped, with the reason printed, when `SGW_TEST_POSTGRES_URL` is unset.

mod pg_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pg_common::{server_url, TestDb};
use sgw::audit::query::Filter;
use sgw::audit::AuditStore;
use sgw::config::{Config, PostgresStorage, Storage};
use sgw::domain::consent::{ConsentGiver, ConsentState};
use sgw::domain::{NhsNumber, PrincipalId, Purpose, RecordCategory, Role, Sector, SystemClock};
use sgw::identity::Caller;
use sgw::proto::v1::AuditAction;
use sgw::records::{ConsentId, DiscloseRequest, NewConsent, NewRecord, RecordError, Records};
use sgw::store::Keys;

fn agency(id: &str, sector: Sector) -> Caller {
    Caller {
        id: PrincipalId::parse(id).expect("id"),
        role: Role::Agency,
        sector: Some(sector),
        cert_sha256: [7; 32],
        serial_hex: "01".into(),
    }
}

struct Replica {
    records: Arc<Records>,
    audit: Arc<sgw::pg::PgAudit>,
}

async fn replica(config: &Config, keys: &Arc<Keys>, db: &TestDb, name: &str) -> Replica {
    let storage = PostgresStorage {
        connection: db.config(8),
        replica: name.to_owned(),
    };
    let mut config = config.clone();
    config.storage = Storage::Postgres(storage.clone());
    let config = Arc::new(config);
    let backend = sgw::pg::backend::open(&storage, &config, keys.clone(), Arc::new(SystemClock))
        .await
        .expect("open the postgres backend");
    let records = Records::new(
        config,
        keys.clone(),
        backend.audit.clone(),
        Arc::new(SystemClock),
        backend.records.clone(),
    );
    Replica {
        records: Arc::new(records),
        audit: backend.audit,
    }
}

/// Seqs of the entries with `action`, oldest first.
async fn entries(audit: &sgw::pg::PgAudit, action: AuditAction) -> Vec<sgw::proto::v1::AuditEntry> {
    let filter = Filter {
        action: Some(action as i32),
        ..Default::default()
    };
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = audit
            .query(&filter, &token, 1000, usize::MAX)
            .await
            .expect("query");
        out.extend(page.entries);
        match page.next_page_token {
            Some(t) => token = t,
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_withdrawal_on_one_replica_orders_every_disclosure_on_both() {
    let Some(url) = server_url("a_withdrawal_on_one_replica_orders_every_disclosure_on_both")
    else {
        return;
    };
    let db = TestDb::create(&url, "consent_order").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::from_toml_str(sgw::cli::serve::DEV_CONFIG_TOML, dir.path(), "t.toml")
        .expect("dev config");
    let keys = Arc::new(Keys::load_or_create(&config.data_dir, None).expect("keys"));
    let a = replica(&config, &keys, &db, "a").await;
    let b = replica(&config, &keys, &db, "b").await;

    let nhs = agency("nhs-guys", Sector::Health);
    let school = agency("school-oakfield", Sector::Education);
    let child = NhsNumber::parse("9434765919").unwrap();
    let record = a
        .records
        .share(
            &nhs,
            NewRecord {
                subject: child.clone(),
                category: RecordCategory::UnscheduledCareAttendance,
                summary: "A&E attendance".into(),
                content: b"wrist fracture".to_vec(),
                media_type: "text/plain".into(),
                retain_until: None,
            },
            "share-1",
        )
        .await
        .expect("share");
    let consent = a
        .records
        .record_consent(
            &nhs,
            NewConsent {
                subject: child,
                state: ConsentState::Given,
                given_by: ConsentGiver::Parent,
                purposes: vec![Purpose::Safeguarding],
                recipient_sectors: vec![],
                recipient_agency_ids: vec!["school-oakfield".into()],
                categories: vec![RecordCategory::UnscheduledCareAttendance],
                valid_until: None,
                note: String::new(),
            },
            "consent-1",
        )
        .await
        .expect("consent");

    // 16 callers, 8 through each replica, disclose until refused.
    let withdrawn = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for i in 0..16 {
        let records = if i % 2 == 0 {
            a.records.clone()
        } else {
            b.records.clone()
        };
        let (school, withdrawn) = (school.clone(), withdrawn.clone());
        let request = DiscloseRequest {
            record_id: record.id.clone(),
            purpose: Purpose::Safeguarding,
            r#override: None,
        };
        callers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            let mut n = 0u32;
            loop {
                // Read before the call starts: a call that starts after the
                // withdrawal returned must be refused.
                let after_withdrawal = withdrawn.load(Ordering::Acquire);
                n += 1;
                match records
                    .disclose(&school, request.clone(), &format!("get-{i}-{n}"))
                    .await
                {
                    Ok(d) => {
                        assert!(
                            !after_withdrawal,
                            "caller {i}: disclosed (seq {}) in a call that started after the withdrawal returned",
                            d.audit_seq
                        );
                        seqs.push(d.audit_seq);
                    }
                    Err(RecordError::Refused(_)) => return seqs,
                    Err(e) => panic!("caller {i}: {e}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    b.records
        .withdraw_consent(
            &nhs,
            &ConsentId::parse(consent.id()).expect("consent id"),
            "withdrawn by phone",
            "withdraw-1",
        )
        .await
        .expect("withdraw");
    withdrawn.store(true, Ordering::Release);

    let mut disclosed = Vec::new();
    for c in callers {
        disclosed.extend(c.await.expect("caller"));
    }
    let withdrawal = entries(&a.audit, AuditAction::ConsentWithdrawn).await;
    assert_eq!(withdrawal.len(), 1, "one CONSENT_WITHDRAWN entry");
    let w = withdrawal[0].seq;
    assert!(
        disclosed.len() >= 16,
        "callers disclosed before the withdrawal ({} disclosures)",
        disclosed.len()
    );
    // What callers were told, and what the log says.
    let late: Vec<u64> = disclosed.iter().copied().filter(|&s| s > w).collect();
    assert!(
        late.is_empty(),
        "disclosures after withdrawal seq {w}: {late:?}"
    );
    let logged = entries(&b.audit, AuditAction::RecordDisclosed).await;
    assert_eq!(
        logged.len(),
        disclosed.len(),
        "every disclosure is in the log once"
    );
    for e in &logged {
        assert_eq!(e.consent_id, consent.id());
        assert!(
            e.seq < w,
            "RECORD_DISCLOSED at seq {} after the withdrawal at {w}",
            e.seq
        );
    }
    let refused = entries(&a.audit, AuditAction::DisclosureDenied).await;
    assert!(
        refused.len() >= 16 && refused.iter().all(|e| e.seq > w),
        "each caller was refused after the withdrawal: {} refusals",
        refused.len()
    );
    // The child's lock row was made once and kept: a row made inside a hold's
    // transaction would vanish with its ROLLBACK and make every later hold queue
    // behind an uncommitted insert.
    let rows: i64 = db
        .sql()
        .await
        .query_one("SELECT count(*) FROM subject_locks", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 1, "one committed lock row for the one child");
    db.drop_database().await;
}
