//! The AuditService's limits end to end: a page of QueryDisclosures fits one
//! response message, a SubjectAccessReport that would not says so, and a malformed
//! query is refused before it is audited (it changes nothing).

mod common;

use common::Env;
use sgw::domain::Role;
use sgw::proto::v1::audit_service_client::AuditServiceClient;
use sgw::proto::v1::*;
use tonic::transport::Channel;
use tonic::Code;

const NHS: &str = "943 476 5919";

/// A gateway whose messages are small: 80,000 bytes, so a response has 14,464
/// bytes for entries (the rest is headroom).
async fn small_messages() -> (Env, common::Gateway, AuditServiceClient<Channel>) {
    let env = Env::new();
    env.append_config(
        "[limits]\nmax_message_bytes = 80000\nmax_content_bytes = 1024\nmax_narrative_chars = 1000\nmax_note_chars = 1000\n",
    );
    let gw = env.start().await;
    let auditor = AuditServiceClient::new(gw.connect_as(&env, Role::Auditor, "dpo").await);
    (env, gw, auditor)
}

async fn log_size(auditor: &mut AuditServiceClient<Channel>) -> u64 {
    auditor
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap()
        .tree_size
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_ends_where_a_message_would_overflow_and_the_next_resumes_there() {
    let (_env, gw, mut auditor) = small_messages().await;
    // 500 GetCheckpoint calls: 500 AUDIT_QUERIED entries, far more bytes than
    // one message holds.
    for _ in 0..500 {
        log_size(&mut auditor).await;
    }
    let filter = QueryDisclosuresRequest {
        action: AuditAction::AuditQueried as i32,
        page_size: 1000,
        ..Default::default()
    };
    let mut seqs = Vec::new();
    let mut checkpoints = 0;
    let mut pages = 0;
    let mut token = String::new();
    loop {
        let page = auditor
            .query_disclosures(QueryDisclosuresRequest {
                page_token: token.clone(),
                ..filter.clone()
            })
            .await
            .expect("every page fits a message")
            .into_inner();
        pages += 1;
        assert!(!page.entries.is_empty() || page.next_page_token.is_empty());
        for e in &page.entries {
            seqs.push(e.seq);
            checkpoints += usize::from(e.reason == "GetCheckpoint");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 100, "paging ends");
    }
    assert!(pages > 3, "cut into pages by size: {pages}");
    assert_eq!(checkpoints, 500, "each entry once, none skipped");
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "ascending, no repeats"
    );

    // A report on a child with that many entries says it will not fit.
    for _ in 0..300 {
        auditor
            .query_disclosures(QueryDisclosuresRequest {
                subject: Some(Subject {
                    nhs_number: NHS.into(),
                }),
                page_size: 1,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let err = auditor
        .subject_access_report(SubjectAccessReportRequest {
            subject: Some(Subject {
                nhs_number: NHS.into(),
            }),
        })
        .await
        .expect_err("too large for one message");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("QueryDisclosures"), "{err:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_query_is_refused_before_it_is_audited() {
    let (_env, gw, mut auditor) = small_messages().await;
    for _ in 0..3 {
        log_size(&mut auditor).await;
    }
    let page = auditor
        .query_disclosures(QueryDisclosuresRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let token = page.next_page_token;
    assert!(!token.is_empty());

    let bad = [
        QueryDisclosuresRequest {
            page_token: "garbage".into(),
            ..Default::default()
        },
        // A token of another filter's pages.
        QueryDisclosuresRequest {
            page_token: token,
            action: AuditAction::RecordDisclosed as i32,
            ..Default::default()
        },
        QueryDisclosuresRequest {
            since: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: -5,
            }),
            ..Default::default()
        },
        QueryDisclosuresRequest {
            until: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 2_000_000_000,
            }),
            ..Default::default()
        },
    ];
    for req in bad {
        let before = log_size(&mut auditor).await;
        let err = auditor
            .query_disclosures(req.clone())
            .await
            .expect_err("malformed");
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err:?}");
        let after = log_size(&mut auditor).await;
        assert_eq!(
            after,
            before + 1,
            "only the second GetCheckpoint's own entry: {req:?}"
        );
    }
    gw.stop().await;
}
