//! Consent-bound records end to end, over real mTLS through the real server: every
//! branch of the disclosure decision, consent taking and losing effect at once,
//! invalid input, the content limit, retention purging, the audit trail of each
//! disclosure, nothing sensitive in clear at rest, and consent withdrawn while 16
//! clients are disclosing.
//!
//! The sharing agreements are those of the development config (`sgw serve --dev`):
//! HEALTH → EDUCATION, UNSCHEDULED_CARE_ATTENDANCE for SAFEGUARDING and
//! EDUCATION_SUPPORT, consent required, override allowed; POLICE → EDUCATION,
//! POLICE_INCIDENT for SAFEGUARDING, no consent needed; EDUCATION → HEALTH,
//! SCHOOL_ATTENDANCE and EARLY_HELP_ASSESSMENT for EARLY_HELP and HEALTH_CARE,
//! consent required, no override; CHILDRENS_SOCIAL_CARE → EDUCATION, plans and
//! looked-after status, no consent needed.
// Retention dates are set relative to wall-clock time, as callers would.
#![allow(clippy::disallowed_methods)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Env, Gateway};
use sgw::domain::Role;
use sgw::proto::v1::audit_service_client::AuditServiceClient;
use sgw::proto::v1::consent_service_client::ConsentServiceClient;
use sgw::proto::v1::record_service_client::RecordServiceClient;
use sgw::proto::v1::*;
use tonic::transport::Channel;
use tonic::Code;

/// A valid NHS number, given with spaces as printed on letters.
const NHS: &str = "943 476 5919";
const NHS_DIGITS: &str = "9434765919";
/// Another child.
const OTHER_NHS: &str = "4010232137";

const JUSTIFICATION: &str =
    "Child presented with unexplained bruising; the DSL needs the A&E history today";
const OVERRIDE_BASIS: &str = "UK GDPR Art 6(1)(e); DPA 2018 Sch 1 para 18";
const HEALTH_TO_EDUCATION_BASIS: &str =
    "UK GDPR Art 6(1)(a) consent, or Art 6(1)(e) with DPA 2018 Sch 1 para 18 when overridden";
const POLICE_TO_EDUCATION_BASIS: &str =
    "UK GDPR Art 6(1)(e) public task; DPA 2018 Sch 1 para 18 safeguarding of children";

// === clients and helpers ===

async fn records(gw: &Gateway, env: &Env, agency: &str) -> RecordServiceClient<Channel> {
    RecordServiceClient::new(gw.connect_as(env, Role::Agency, agency).await)
}

async fn consents(gw: &Gateway, env: &Env, agency: &str) -> ConsentServiceClient<Channel> {
    ConsentServiceClient::new(gw.connect_as(env, Role::Agency, agency).await)
}

fn subject(nhs: &str) -> Option<Subject> {
    Some(Subject {
        nhs_number: nhs.into(),
    })
}

fn share_request(category: RecordCategory, content: &[u8]) -> ShareRecordRequest {
    ShareRecordRequest {
        subject: subject(NHS),
        category: category as i32,
        summary: format!("{category:?} summary"),
        content: content.to_vec(),
        media_type: "text/plain; charset=utf-8".into(),
        retain_until: None,
    }
}

async fn share(
    client: &mut RecordServiceClient<Channel>,
    category: RecordCategory,
    content: &[u8],
) -> RecordRef {
    client
        .share_record(share_request(category, content))
        .await
        .expect("share")
        .into_inner()
        .record
        .expect("record")
}

fn get(record_id: &str, purpose: Purpose, r#override: Option<Override>) -> GetRecordRequest {
    GetRecordRequest {
        record_id: record_id.into(),
        purpose: purpose as i32,
        r#override,
    }
}

fn override_with(justification: &str) -> Option<Override> {
    Some(Override {
        lawful_basis: OVERRIDE_BASIS.into(),
        justification: justification.into(),
    })
}

/// Consent given by a parent for the school sector to receive A&E attendances for
/// education support.
fn school_consent(state: ConsentState) -> RecordConsentRequest {
    RecordConsentRequest {
        subject: subject(NHS),
        state: state as i32,
        given_by: ConsentGiver::Parent as i32,
        purposes: vec![Purpose::EducationSupport as i32],
        recipient_sectors: vec![Sector::Education as i32],
        recipient_agency_ids: vec![],
        categories: vec![RecordCategory::UnscheduledCareAttendance as i32],
        valid_until: None,
        note: String::new(),
    }
}

async fn record_consent(
    client: &mut ConsentServiceClient<Channel>,
    req: RecordConsentRequest,
) -> Consent {
    client
        .record_consent(req)
        .await
        .expect("record consent")
        .into_inner()
        .consent
        .expect("consent")
}

async fn withdraw(client: &mut ConsentServiceClient<Channel>, consent_id: &str) -> Consent {
    client
        .withdraw_consent(WithdrawConsentRequest {
            consent_id: consent_id.into(),
            note: "mother withdrew consent by phone".into(),
        })
        .await
        .expect("withdraw")
        .into_inner()
        .consent
        .expect("consent")
}

async fn list_consents(client: &mut ConsentServiceClient<Channel>) -> Vec<Consent> {
    client
        .list_consents(ListConsentsRequest {
            subject: subject(NHS),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .consents
}

/// A ListConsents request for one page about `nhs`.
fn consents_page(nhs: &str, size: u32, token: &str) -> ListConsentsRequest {
    ListConsentsRequest {
        subject: subject(nhs),
        page_size: size,
        page_token: token.into(),
    }
}

/// Every page of ListConsents about `nhs` in pages of `size`, from the first to
/// the one whose `next_page_token` is empty: each page's consent ids, in order.
async fn consent_pages(
    client: &mut ConsentServiceClient<Channel>,
    nhs: &str,
    size: u32,
) -> Vec<Vec<String>> {
    let (mut pages, mut token) = (Vec::new(), String::new());
    loop {
        let page = client
            .list_consents(consents_page(nhs, size, &token))
            .await
            .expect("a page of consents")
            .into_inner();
        pages.push(page.consents.into_iter().map(|c| c.consent_id).collect());
        if page.next_page_token.is_empty() {
            return pages;
        }
        token = page.next_page_token;
    }
}

/// Records `n` statements about `nhs`, each with `note`; returns their ids,
/// newest first (the order ListConsents lists them in).
async fn record_consents(
    client: &mut ConsentServiceClient<Channel>,
    nhs: &str,
    n: usize,
    note: &str,
) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let req = RecordConsentRequest {
            subject: subject(nhs),
            note: note.into(),
            ..school_consent(ConsentState::Given)
        };
        ids.push(record_consent(client, req).await.consent_id);
    }
    ids.reverse();
    ids
}

/// The reasons of the CONSENTS_LISTED entries, oldest first, with their outcome.
async fn consents_listed(gw: &Gateway, env: &Env) -> Vec<(bool, String)> {
    audited(gw, env, AuditAction::ConsentsListed)
        .await
        .into_iter()
        .map(|e| (e.outcome == AuditOutcome::Allowed as i32, e.reason))
        .collect()
}

/// Every audit entry with this action, oldest first, as the auditor sees them.
async fn audited(gw: &Gateway, env: &Env, action: AuditAction) -> Vec<AuditEntry> {
    let mut client = AuditServiceClient::new(gw.connect_as(env, Role::Auditor, "dpo").await);
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .query_disclosures(QueryDisclosuresRequest {
                action: action as i32,
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .expect("audit query")
            .into_inner();
        out.extend(page.entries);
        if page.next_page_token.is_empty() {
            return out;
        }
        page_token = page.next_page_token;
    }
}

/// The audit entry at `seq`, which must have `action`.
async fn audit_entry(gw: &Gateway, env: &Env, action: AuditAction, seq: u64) -> AuditEntry {
    audited(gw, env, action)
        .await
        .into_iter()
        .find(|e| e.seq == seq)
        .unwrap_or_else(|| panic!("no {action:?} entry at seq {seq}"))
}

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    match result {
        Ok(v) => panic!("expected {code:?} containing {needle:?}, got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(
                s.message().contains(needle),
                "message {:?} lacks {needle:?}",
                s.message()
            );
        }
    }
}

// === the decision, branch by branch ===

#[tokio::test]
async fn every_branch_of_the_decision_answers_as_the_policy_says() {
    let env = Env::new();
    let gw = env.start().await;
    let mut nhs = records(&gw, &env, "nhs-guys").await;
    let mut nhs_consents = consents(&gw, &env, "nhs-guys").await;
    let mut school = records(&gw, &env, "school-oakfield").await;
    let mut police = records(&gw, &env, "police-met").await;

    let ae = share(
        &mut nhs,
        RecordCategory::UnscheduledCareAttendance,
        b"A&E: fall",
    )
    .await;
    assert_eq!(ae.owner_agency_id, "nhs-guys");
    assert_eq!(ae.access, RecordAccess::Owner as i32);
    assert!(ae.record_id.starts_with("r-") && ae.record_id.len() == 34);

    // Owner: always, basis OWNER.
    let own = nhs
        .get_record(get(&ae.record_id, Purpose::HealthCare, None))
        .await
        .expect("owner reads")
        .into_inner();
    assert_eq!(own.basis, DisclosureBasis::Owner as i32);
    assert_eq!(own.content, b"A&E: fall");
    assert_eq!(own.media_type, "text/plain; charset=utf-8");
    let e = audit_entry(&gw, &env, AuditAction::RecordDisclosed, own.audit_seq).await;
    assert_eq!(e.basis, DisclosureBasis::Owner as i32);
    assert_eq!(e.lawful_basis, "owner");

    // No agreement for this purpose: PERMISSION_DENIED, audited with the reason.
    assert_status(
        school
            .get_record(get(&ae.record_id, Purpose::EarlyHelp, None))
            .await,
        Code::PermissionDenied,
        "no sharing agreement",
    );

    // The agreement needs consent and there is none: FAILED_PRECONDITION, saying an
    // override is possible.
    assert_status(
        school
            .get_record(get(&ae.record_id, Purpose::EducationSupport, None))
            .await,
        Code::FailedPrecondition,
        "allows a safeguarding override",
    );
    let denied = audited(&gw, &env, AuditAction::DisclosureDenied).await;
    let reasons: Vec<&str> = denied.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, ["NO_AGREEMENT", "CONSENT_NEEDED"], "{denied:?}");
    assert!(denied.iter().all(|e| e.actor_id == "school-oakfield"
        && e.object_id == ae.record_id
        && e.target_agency_id == "nhs-guys"
        && e.outcome == AuditOutcome::Denied as i32));

    // An override whose justification is too short: INVALID_ARGUMENT.
    assert_status(
        school
            .get_record(get(
                &ae.record_id,
                Purpose::EducationSupport,
                override_with("child at risk"),
            ))
            .await,
        Code::InvalidArgument,
        "at least 40 characters",
    );

    // A justified override where the agreement allows one: SAFEGUARDING_OVERRIDE,
    // with the justification in the (sealed) audit entry.
    let overridden = school
        .get_record(get(
            &ae.record_id,
            Purpose::EducationSupport,
            override_with(JUSTIFICATION),
        ))
        .await
        .expect("override")
        .into_inner();
    assert_eq!(
        overridden.basis,
        DisclosureBasis::SafeguardingOverride as i32
    );
    assert_eq!(overridden.content, b"A&E: fall");
    let e = audit_entry(
        &gw,
        &env,
        AuditAction::RecordDisclosed,
        overridden.audit_seq,
    )
    .await;
    assert_eq!(e.basis, DisclosureBasis::SafeguardingOverride as i32);
    assert_eq!(e.justification, JUSTIFICATION);
    assert_eq!(e.lawful_basis, OVERRIDE_BASIS);
    assert!(e.reason.contains(HEALTH_TO_EDUCATION_BASIS), "{}", e.reason);
    assert_eq!(e.actor_id, "school-oakfield");
    assert_eq!(e.target_agency_id, "nhs-guys");
    assert_eq!(e.purpose, Purpose::EducationSupport as i32);

    // Consent in scope: CONSENT, with its id and the agreement's lawful basis.
    let given = record_consent(&mut nhs_consents, school_consent(ConsentState::Given)).await;
    let with_consent = school
        .get_record(get(&ae.record_id, Purpose::EducationSupport, None))
        .await
        .expect("consent in force")
        .into_inner();
    assert_eq!(with_consent.basis, DisclosureBasis::Consent as i32);
    let e = audit_entry(
        &gw,
        &env,
        AuditAction::RecordDisclosed,
        with_consent.audit_seq,
    )
    .await;
    assert_eq!(e.consent_id, given.consent_id);
    assert_eq!(e.lawful_basis, HEALTH_TO_EDUCATION_BASIS);
    assert!(e.justification.is_empty());

    // Withdrawn: the very next request is refused, and says an override is possible.
    withdraw(&mut nhs_consents, &given.consent_id).await;
    assert_status(
        school
            .get_record(get(&ae.record_id, Purpose::EducationSupport, None))
            .await,
        Code::FailedPrecondition,
        "was withdrawn",
    );
    // The newest statement wins: consent given again, then refused.
    record_consent(&mut nhs_consents, school_consent(ConsentState::Given)).await;
    school
        .get_record(get(&ae.record_id, Purpose::EducationSupport, None))
        .await
        .expect("consent given again");
    let refused = record_consent(&mut nhs_consents, school_consent(ConsentState::Refused)).await;
    let err = school
        .get_record(get(&ae.record_id, Purpose::EducationSupport, None))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("refuses consent"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&refused.consent_id),
        "{}",
        err.message()
    );
    assert!(err.message().contains("allows a safeguarding override"));

    // No consent needed: police incidents to schools for safeguarding.
    let incident = share(&mut police, RecordCategory::PoliceIncident, b"DA call-out").await;
    let by_agreement = school
        .get_record(get(&incident.record_id, Purpose::Safeguarding, None))
        .await
        .expect("agreement")
        .into_inner();
    assert_eq!(
        by_agreement.basis,
        DisclosureBasis::AgreementNoConsentNeeded as i32
    );
    let e = audit_entry(
        &gw,
        &env,
        AuditAction::RecordDisclosed,
        by_agreement.audit_seq,
    )
    .await;
    assert_eq!(e.lawful_basis, POLICE_TO_EDUCATION_BASIS);
    assert!(e.consent_id.is_empty());

    // Consent needed, no override allowed (EDUCATION → HEALTH): the refusal says so,
    // and an override is PERMISSION_DENIED.
    let attendance = share(
        &mut school,
        RecordCategory::SchoolAttendance,
        b"62% attendance",
    )
    .await;
    assert_status(
        nhs.get_record(get(&attendance.record_id, Purpose::EarlyHelp, None))
            .await,
        Code::FailedPrecondition,
        "does not allow a safeguarding override",
    );
    assert_status(
        nhs.get_record(get(
            &attendance.record_id,
            Purpose::EarlyHelp,
            override_with(JUSTIFICATION),
        ))
        .await,
        Code::PermissionDenied,
        "does not allow a safeguarding override",
    );

    // A record the caller's sector could never receive is answered like an unknown
    // id; both refusals are audited.
    let unknown = "r-00000000000000000000000000000000";
    let hidden = nhs
        .get_record(get(&incident.record_id, Purpose::Safeguarding, None))
        .await
        .expect_err("never receivable");
    let missing = nhs
        .get_record(get(unknown, Purpose::Safeguarding, None))
        .await
        .expect_err("unknown");
    assert_eq!(hidden.code(), Code::NotFound);
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        hidden.message().replace(&incident.record_id, "<id>"),
        missing.message().replace(unknown, "<id>")
    );
    let denied = audited(&gw, &env, AuditAction::DisclosureDenied).await;
    assert!(denied
        .iter()
        .any(|e| e.object_id == incident.record_id && e.actor_id == "nhs-guys"));
    assert!(denied.iter().any(|e| e.object_id == unknown));

    // Every disclosure entry carries a lawful basis; none discloses content.
    for e in audited(&gw, &env, AuditAction::RecordDisclosed).await {
        assert!(!e.lawful_basis.is_empty(), "{e:?}");
        assert_eq!(e.subject_ref.len(), 64);
    }
    gw.stop().await;
}

/// A malformed override is refused whatever the basis would have been (consent in
/// force, an agreement that needs none, the owner, one that allows no override):
/// a case system learns its overrides are malformed at once, not on the night
/// consent has lapsed. Nothing is disclosed; each attempt is audited DENIED by the
/// record id as given, before the record is read.
#[tokio::test]
async fn a_malformed_override_is_invalid_argument_even_where_none_is_needed() {
    let env = Env::new();
    let gw = env.start().await;
    let mut nhs = records(&gw, &env, "nhs-guys").await;
    let mut school = records(&gw, &env, "school-oakfield").await;
    let mut police = records(&gw, &env, "police-met").await;
    let ae = share(&mut nhs, RecordCategory::UnscheduledCareAttendance, b"A&E").await;
    let incident = share(&mut police, RecordCategory::PoliceIncident, b"call-out").await;
    record_consent(
        &mut consents(&gw, &env, "nhs-guys").await,
        school_consent(ConsentState::Given),
    )
    .await;
    let malformed = [
        (
            Override {
                lawful_basis: "x".into(),
                justification: "too short".into(),
            },
            "at least 40 characters",
        ),
        (
            Override {
                lawful_basis: "  ".into(),
                justification: JUSTIFICATION.into(),
            },
            "lawful_basis must not be empty",
        ),
        (Override::default(), "at least 40 characters"),
    ];
    for (o, needle) in malformed {
        // Consent in force; an agreement that needs no consent; the owner.
        for (agency, record, purpose) in [
            ("school", &ae, Purpose::EducationSupport),
            ("school", &incident, Purpose::Safeguarding),
            ("owner", &ae, Purpose::HealthCare),
        ] {
            let client = if agency == "owner" {
                &mut nhs
            } else {
                &mut school
            };
            assert_status(
                client
                    .get_record(get(&record.record_id, purpose, Some(o.clone())))
                    .await,
                Code::InvalidArgument,
                needle,
            );
        }
        // An agreement that allows no override (health to the school's early help
        // has none at all): INVALID_ARGUMENT too, before any lookup.
        assert_status(
            school
                .get_record(get(&ae.record_id, Purpose::EarlyHelp, Some(o.clone())))
                .await,
            Code::InvalidArgument,
            needle,
        );
    }
    assert!(audited(&gw, &env, AuditAction::RecordDisclosed)
        .await
        .is_empty());
    // Each attempt is audited, by the record id as given, naming no child.
    let denied = audited(&gw, &env, AuditAction::DisclosureDenied).await;
    assert_eq!(denied.len(), 12, "{denied:?}");
    assert!(denied.iter().all(|e| e.subject_ref.is_empty()
        && e.outcome == AuditOutcome::Denied as i32
        && e.reason
            .ends_with(": malformed override (answered INVALID_ARGUMENT)")
        && (e.reason.starts_with("JUSTIFICATION_TOO_SHORT")
            || e.reason.starts_with("LAWFUL_BASIS_MISSING"))));
    // A well-formed one where none is needed is still not relied on.
    let read = school
        .get_record(get(
            &ae.record_id,
            Purpose::EducationSupport,
            override_with(JUSTIFICATION),
        ))
        .await
        .expect("consent in force")
        .into_inner();
    assert_eq!(read.basis, DisclosureBasis::Consent as i32);
    gw.stop().await;
}

/// FindRecords whose answer would exceed `limits.max_message_bytes` is refused
/// with RESOURCE_EXHAUSTED naming the limit, audited DENIED first (the refusal
/// tells of records about the child), instead of tonic failing to send an answer
/// the log already counted as found.
#[tokio::test]
async fn find_records_or_list_consents_too_large_for_one_answer_is_resource_exhausted_and_audited_denied(
) {
    let env = Env::new();
    env.append_config(
        "[limits]\nmax_message_bytes = 90000\nmax_content_bytes = 1000\nmax_narrative_chars = 5000\n\
         max_note_chars = 1000\n",
    );
    let gw = env.start().await;
    let mut nhs = records(&gw, &env, "nhs-guys").await;
    // 50 summaries of 500 four-byte characters: about 100 KB of answer.
    for _ in 0..50 {
        let mut req = share_request(RecordCategory::UnscheduledCareAttendance, b"A&E");
        req.summary = "𝔸".repeat(500);
        nhs.share_record(req).await.expect("share");
    }
    let err = nhs
        .find_records(FindRecordsRequest {
            subject: subject(NHS),
            purpose: Purpose::HealthCare as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with(
            "the 50 records found about this child do not fit in one answer of limits.max_message_bytes (90000 bytes)"
        ),
        "{err:?}"
    );
    let found = audited(&gw, &env, AuditAction::RecordsFound).await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].outcome, AuditOutcome::Denied as i32);
    assert!(
        found[0].reason.starts_with("TOO_LARGE: 50 records found"),
        "{}",
        found[0].reason
    );

    // Paged, they all come, newest first, each once; a page of 1000 stops early
    // to fit, and a token is good only for its own query.
    let page = |size: u32, token: &str, purpose: Purpose| FindRecordsRequest {
        subject: subject(NHS),
        purpose: purpose as i32,
        page_size: size,
        page_token: token.into(),
    };
    let first = nhs
        .find_records(page(1000, "", Purpose::HealthCare))
        .await
        .expect("a page that fits")
        .into_inner();
    assert!(first.records.len() < 50 && !first.next_page_token.is_empty());
    for bad in [
        page(20, &first.next_page_token, Purpose::Safeguarding),
        page(20, "not-a-token", Purpose::HealthCare),
        page(5000, "", Purpose::HealthCare),
    ] {
        let err = nhs.find_records(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    let (mut listed, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let got = nhs
            .find_records(page(20, &token, Purpose::HealthCare))
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        listed.extend(
            got.records
                .into_iter()
                .map(|r| (r.shared_at.unwrap(), r.record_id)),
        );
        if got.next_page_token.is_empty() {
            break;
        }
        token = got.next_page_token;
    }
    assert_eq!(pages, 3, "50 records in pages of 20");
    assert_eq!(listed.len(), 50);
    let mut ids: Vec<&String> = listed.iter().map(|(_, id)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50, "each record once");
    assert!(
        listed
            .windows(2)
            .all(|w| (w[0].0.seconds, w[0].0.nanos) >= (w[1].0.seconds, w[1].0.nanos)),
        "newest first"
    );

    // The same for ListConsents: 25 notes of 1000 four-byte characters.
    let mut nhs_consents = consents(&gw, &env, "nhs-guys").await;
    for _ in 0..25 {
        let mut req = school_consent(ConsentState::Given);
        req.note = "𝔸".repeat(1000);
        record_consent(&mut nhs_consents, req).await;
    }
    let err = nhs_consents
        .list_consents(ListConsentsRequest {
            subject: subject(NHS),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with(
            "the 25 consent statements about this child do not fit in one answer of limits.max_message_bytes (90000 bytes)"
        ),
        "{err:?}"
    );
    let listed = audited(&gw, &env, AuditAction::ConsentsListed).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].outcome, AuditOutcome::Denied as i32);
    gw.stop().await;
}

#[tokio::test]
async fn find_records_reveals_only_what_the_sector_may_receive_with_its_access() {
    let env = Env::new();
    let gw = env.start().await;
    let mut nhs = records(&gw, &env, "nhs-guys").await;
    let mut police = records(&gw, &env, "police-met").await;
    let mut csc = records(&gw, &env, "csc-southwark").await;
    let mut school = records(&gw, &env, "school-oakfield").await;
    let mut school_consents = consents(&gw, &env, "school-oakfield").await;

    let ae = share(&mut nhs, RecordCategory::UnscheduledCareAttendance, b"A&E").await;
    let incident = share(&mut police, RecordCategory::PoliceIncident, b"incident").await;
    let plan = share(&mut csc, RecordCategory::ChildProtectionPlan, b"CP plan").await;
    let attendance = share(&mut school, RecordCategory::SchoolAttendance, b"attendance").await;
    // About another child: never listed for this one.
    let mut elsewhere = share_request(RecordCategory::PoliceIncident, b"other child");
    elsewhere.subject = subject(OTHER_NHS);
    police.share_record(elsewhere).await.expect("share");

    let find = |purpose: Purpose| FindRecordsRequest {
        subject: subject(NHS_DIGITS),
        purpose: purpose as i32,
        ..Default::default()
    };
    let listed = |resp: FindRecordsResponse| -> Vec<(String, i32)> {
        let mut v: Vec<(String, i32)> = resp
            .records
            .into_iter()
            .map(|r| (r.record_id, r.access))
            .collect();
        v.sort();
        v
    };
    let sorted = |mut v: Vec<(String, i32)>| {
        v.sort();
        v
    };

    let safeguarding = school
        .find_records(find(Purpose::Safeguarding))
        .await
        .expect("find")
        .into_inner();
    assert!(safeguarding.records.iter().all(|r| !r.summary.is_empty()));
    assert_eq!(
        listed(safeguarding),
        sorted(vec![
            (ae.record_id.clone(), RecordAccess::OverrideOnly as i32),
            (incident.record_id.clone(), RecordAccess::Readable as i32),
            (plan.record_id.clone(), RecordAccess::Readable as i32),
            (attendance.record_id.clone(), RecordAccess::Owner as i32),
        ])
    );
    // For early help no agreement brings the school anything: only its own record.
    assert_eq!(
        listed(
            school
                .find_records(find(Purpose::EarlyHelp))
                .await
                .expect("find")
                .into_inner()
        ),
        vec![(attendance.record_id.clone(), RecordAccess::Owner as i32)]
    );
    // Health may receive school attendance for early help only with consent, and
    // never by override.
    assert_eq!(
        listed(
            nhs.find_records(find(Purpose::EarlyHelp))
                .await
                .expect("find")
                .into_inner()
        ),
        sorted(vec![
            (ae.record_id.clone(), RecordAccess::Owner as i32),
            (
                attendance.record_id.clone(),
                RecordAccess::NeedsConsent as i32
            ),
        ])
    );
    record_consent(
        &mut school_consents,
        RecordConsentRequest {
            purposes: vec![Purpose::EarlyHelp as i32],
            recipient_sectors: vec![],
            recipient_agency_ids: vec!["nhs-guys".into()],
            categories: vec![RecordCategory::SchoolAttendance as i32],
            ..school_consent(ConsentState::Given)
        },
    )
    .await;
    assert!(nhs
        .find_records(find(Purpose::EarlyHelp))
        .await
        .expect("find")
        .into_inner()
        .records
        .iter()
        .any(|r| r.record_id == attendance.record_id && r.access == RecordAccess::Readable as i32));

    // Each search is audited, with its purpose, before it answers.
    let found = audited(&gw, &env, AuditAction::RecordsFound).await;
    assert_eq!(found.len(), 4);
    assert_eq!(found[0].actor_id, "school-oakfield");
    assert_eq!(found[0].purpose, Purpose::Safeguarding as i32);
    assert!(
        found[0].reason.starts_with("4 found"),
        "{}",
        found[0].reason
    );
    assert!(found[0].reason.contains(&incident.record_id));
    gw.stop().await;
}

// === consent ===

#[tokio::test]
async fn consent_statements_are_listed_newest_first_and_withdrawn_only_by_their_recorder() {
    let env = Env::new();
    let gw = env.start().await;
    let mut nhs = consents(&gw, &env, "nhs-guys").await;
    let mut school = consents(&gw, &env, "school-oakfield").await;

    let first = record_consent(
        &mut nhs,
        RecordConsentRequest {
            note: "verbal consent from mother at triage".into(),
            ..school_consent(ConsentState::Given)
        },
    )
    .await;
    assert!(first.consent_id.starts_with("k-"));
    assert_eq!(first.recorded_by, "nhs-guys");
    assert_eq!(first.state, ConsentState::Given as i32);
    assert_eq!(
        first.subject.as_ref().map(|s| s.nhs_number.as_str()),
        Some(NHS_DIGITS)
    );
    let second = record_consent(&mut school, school_consent(ConsentState::Refused)).await;

    // Another agency may not withdraw it; a refusal cannot be withdrawn.
    assert_status(
        school
            .withdraw_consent(WithdrawConsentRequest {
                consent_id: first.consent_id.clone(),
                note: String::new(),
            })
            .await,
        Code::PermissionDenied,
        "recorded by another agency",
    );
    assert_status(
        school
            .withdraw_consent(WithdrawConsentRequest {
                consent_id: second.consent_id.clone(),
                note: String::new(),
            })
            .await,
        Code::FailedPrecondition,
        "cannot be withdrawn",
    );
    assert_status(
        nhs.withdraw_consent(WithdrawConsentRequest {
            consent_id: "k-0123456789abcdef0123456789abcdef".into(),
            note: String::new(),
        })
        .await,
        Code::NotFound,
        "not found",
    );

    let withdrawn = withdraw(&mut nhs, &first.consent_id).await;
    assert_eq!(withdrawn.state, ConsentState::Withdrawn as i32);
    // Withdrawing again changes nothing and is not audited again.
    assert_eq!(withdraw(&mut nhs, &first.consent_id).await, withdrawn);
    assert_eq!(
        audited(&gw, &env, AuditAction::ConsentWithdrawn)
            .await
            .len(),
        1
    );

    let seen_by_nhs = list_consents(&mut nhs).await;
    assert_eq!(
        seen_by_nhs
            .iter()
            .map(|c| c.consent_id.as_str())
            .collect::<Vec<_>>(),
        [second.consent_id.as_str(), first.consent_id.as_str()]
    );
    assert_eq!(seen_by_nhs[1].state, ConsentState::Withdrawn as i32);
    assert_eq!(seen_by_nhs[1].note, "verbal consent from mother at triage");
    // A note is the recorder's: other agencies see the statement without it.
    let seen_by_school = list_consents(&mut school).await;
    assert_eq!(seen_by_school.len(), 2);
    assert!(seen_by_school[1].note.is_empty());
    // Each listing is a disclosure about the child, audited before it was answered.
    let listed = audited(&gw, &env, AuditAction::ConsentsListed).await;
    assert_eq!(
        listed
            .iter()
            .map(|e| (e.actor_id.as_str(), e.reason.as_str()))
            .collect::<Vec<_>>(),
        {
            let both = format!(
                "2 consent statements listed: {} {}",
                second.consent_id, first.consent_id
            );
            [("nhs-guys", both.clone()), ("school-oakfield", both)]
        }
        .iter()
        .map(|(actor, reason)| (*actor, reason.as_str()))
        .collect::<Vec<_>>()
    );

    let recorded = audited(&gw, &env, AuditAction::ConsentRecorded).await;
    assert_eq!(recorded.len(), 2);
    assert!(listed
        .iter()
        .all(|e| e.subject_ref == recorded[0].subject_ref));
    assert_eq!(recorded[0].consent_id, first.consent_id);
    assert_eq!(
        recorded[0].justification,
        "verbal consent from mother at triage"
    );
    gw.stop().await;
}

// === consent statements in pages ===

#[tokio::test]
async fn list_consents_in_pages_lists_each_statement_once_newest_first_and_audits_each_page() {
    let env = Env::new();
    let gw = env.start().await;
    let mut nhs = consents(&gw, &env, "nhs-guys").await;
    let recorded = record_consents(&mut nhs, NHS, 7, "").await;
    // A withdrawn statement keeps its place.
    withdraw(&mut nhs, &recorded[4]).await;

    let pages = consent_pages(&mut nhs, NHS, 3).await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [3, 3, 1],
        "7 statements in pages of 3"
    );
    assert_eq!(pages.concat(), recorded, "each once, newest first");
    // A page that holds the rest ends the listing: no empty page follows.
    assert_eq!(
        consent_pages(&mut nhs, NHS, 7).await,
        std::slice::from_ref(&recorded)
    );
    // Without page_size, all of them in one answer, as before paging.
    let all = nhs
        .list_consents(consents_page(NHS, 0, ""))
        .await
        .expect("list")
        .into_inner();
    assert!(all.next_page_token.is_empty());
    let times: Vec<_> = all
        .consents
        .iter()
        .map(|c| c.recorded_at.expect("recorded_at"))
        .collect();
    assert!(times
        .windows(2)
        .all(|w| (w[0].seconds, w[0].nanos) > (w[1].seconds, w[1].nanos)));
    assert_eq!(
        all.consents
            .into_iter()
            .map(|c| c.consent_id)
            .collect::<Vec<_>>(),
        recorded
    );

    // Each page is a disclosure about the child, audited with what it lists.
    let all = recorded.join(" ");
    assert_eq!(
        consents_listed(&gw, &env).await,
        [
            (
                true,
                format!(
                    "3 consent statements listed: {}; more on the next page",
                    recorded[..3].join(" ")
                )
            ),
            (
                true,
                format!(
                    "3 consent statements listed: {}; more on the next page",
                    recorded[3..6].join(" ")
                )
            ),
            (true, format!("1 consent statement listed: {}", recorded[6])),
            (true, format!("7 consent statements listed: {all}")),
            (true, format!("7 consent statements listed: {all}")),
        ]
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_consent_recorded_between_pages_neither_repeats_nor_shifts_the_next_page() {
    let env = Env::new();
    let gw = env.start().await;
    let mut nhs = consents(&gw, &env, "nhs-guys").await;
    let recorded = record_consents(&mut nhs, NHS, 5, "").await;

    let first = nhs
        .list_consents(consents_page(NHS, 2, ""))
        .await
        .expect("first page")
        .into_inner();
    let ids = |page: &ListConsentsResponse| -> Vec<String> {
        page.consents.iter().map(|c| c.consent_id.clone()).collect()
    };
    assert_eq!(ids(&first), recorded[..2]);
    // Recorded now, it is the newest: before the first page, not on the next.
    let newest = record_consents(&mut nhs, NHS, 1, "").await;
    let second = nhs
        .list_consents(consents_page(NHS, 2, &first.next_page_token))
        .await
        .expect("second page")
        .into_inner();
    assert_eq!(ids(&second), recorded[2..4], "no repeat, no shift");
    let last = nhs
        .list_consents(consents_page(NHS, 2, &second.next_page_token))
        .await
        .expect("last page")
        .into_inner();
    assert_eq!(ids(&last), recorded[4..]);
    assert!(last.next_page_token.is_empty());
    // A new listing starts with it.
    assert_eq!(consent_pages(&mut nhs, NHS, 2).await[0][0], newest[0]);
    gw.stop().await;
}

#[tokio::test]
async fn list_consents_refuses_another_listings_token_a_garbage_token_and_a_page_over_the_maximum_and_audits_none(
) {
    let env = Env::new();
    let gw = env.start().await;
    let mut nhs = consents(&gw, &env, "nhs-guys").await;
    let mut nhs_records = records(&gw, &env, "nhs-guys").await;
    let recorded = record_consents(&mut nhs, NHS, 3, "").await;
    record_consents(&mut nhs, OTHER_NHS, 3, "").await;
    let other_child = nhs
        .list_consents(consents_page(OTHER_NHS, 2, ""))
        .await
        .expect("another child's first page")
        .into_inner()
        .next_page_token;
    // FindRecords' token for the same child names a position in another listing.
    for _ in 0..2 {
        share(
            &mut nhs_records,
            RecordCategory::UnscheduledCareAttendance,
            b"A&E",
        )
        .await;
    }
    let found = nhs_records
        .find_records(FindRecordsRequest {
            subject: subject(NHS),
            purpose: Purpose::HealthCare as i32,
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .expect("a page of records")
        .into_inner()
        .next_page_token;
    assert!(!other_child.is_empty() && !found.is_empty());
    let listed_before = consents_listed(&gw, &env).await;

    for token in [other_child.as_str(), found.as_str(), "not-a-token"] {
        assert_status(
            nhs.list_consents(consents_page(NHS, 2, token)).await,
            Code::InvalidArgument,
            "page_token is not valid for this query",
        );
    }
    // The cap is limits.max_page_size (1000 by default), as for FindRecords.
    assert_status(
        nhs.list_consents(consents_page(NHS, 1001, "")).await,
        Code::InvalidArgument,
        "page_size 1001 is above the maximum of 1000",
    );
    assert_eq!(
        consents_listed(&gw, &env).await,
        listed_before,
        "a refused page is not audited"
    );
    // The maximum itself is a page.
    assert_eq!(consent_pages(&mut nhs, NHS, 1000).await, [recorded]);
    gw.stop().await;
}

#[tokio::test]
async fn list_consents_too_large_for_one_answer_is_refused_without_page_size_but_pages_to_fit() {
    let env = Env::new();
    env.append_config(
        "[limits]\nmax_message_bytes = 100000\nmax_content_bytes = 1000\n\
         max_narrative_chars = 5000\nmax_note_chars = 4000\n",
    );
    let gw = env.start().await;
    let mut nhs = consents(&gw, &env, "nhs-guys").await;
    // 10 notes of 4000 four-byte characters: about 160 KB of answer.
    let recorded = record_consents(&mut nhs, NHS, 10, &"𝔸".repeat(4000)).await;

    assert_status(
        nhs.list_consents(consents_page(NHS, 0, "")).await,
        Code::ResourceExhausted,
        "the 10 consent statements about this child do not fit in one answer of \
         limits.max_message_bytes (100000 bytes); ask for them in pages (page_size)",
    );
    // A page of 1000 stops early to fit.
    let first = nhs
        .list_consents(consents_page(NHS, 1000, ""))
        .await
        .expect("a page that fits")
        .into_inner();
    assert!(first.consents.len() < 10 && !first.next_page_token.is_empty());
    let pages = consent_pages(&mut nhs, NHS, 3).await;
    assert_eq!(pages.len(), 4, "10 statements in pages of 3");
    assert_eq!(pages.concat(), recorded, "each once, newest first");

    let listed = consents_listed(&gw, &env).await;
    assert_eq!(listed.len(), 6, "{listed:?}");
    assert!(!listed[0].0 && listed[0].1.starts_with("TOO_LARGE: 10 consent statements"));
    assert!(
        listed[1..].iter().all(|(allowed, _)| *allowed),
        "{listed:?}"
    );

    // The notes go only to the agency that wrote them, so another agency's answer
    // is small: it gets all ten at once, each named in its entry.
    let withdrawn = nhs
        .withdraw_consent(WithdrawConsentRequest {
            consent_id: recorded[4].clone(),
            note: "the family withdrew it by phone".into(),
        })
        .await
        .expect("withdraw")
        .into_inner()
        .consent
        .expect("consent");
    assert_eq!(withdrawn.withdrawal_note, "the family withdrew it by phone");
    assert!(withdrawn.withdrawn_at.is_some());
    let mut school = consents(&gw, &env, "school-oakfield").await;
    let all = school
        .list_consents(consents_page(NHS, 0, ""))
        .await
        .expect("another agency's answer fits")
        .into_inner();
    let ids: Vec<&str> = all.consents.iter().map(|c| c.consent_id.as_str()).collect();
    assert_eq!(ids, recorded.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(all
        .consents
        .iter()
        .all(|c| c.note.is_empty() && c.withdrawal_note.is_empty()));
    assert!(all.consents[4].withdrawn_at.is_some());
    let listed = consents_listed(&gw, &env).await;
    assert_eq!(listed.len(), 7, "{listed:?}");
    assert_eq!(
        listed[6],
        (
            true,
            format!("10 consent statements listed: {}", recorded.join(" "))
        )
    );
    // Its writer gets the withdrawal's note back.
    let after_four = pages_token_after(&mut nhs, 4).await;
    let page = nhs
        .list_consents(consents_page(NHS, 1, &after_four))
        .await
        .expect("page")
        .into_inner();
    assert_eq!(page.consents[0].consent_id, recorded[4]);
    assert_eq!(
        page.consents[0].withdrawal_note,
        "the family withdrew it by phone"
    );
    gw.stop().await;
}

/// The token of the page after the first `n` of NHS's statements, as nhs-guys.
async fn pages_token_after(nhs: &mut ConsentServiceClient<Channel>, n: u32) -> String {
    nhs.list_consents(consents_page(NHS, n, ""))
        .await
        .expect("page")
        .into_inner()
        .next_page_token
}

// === invalid input ===

#[tokio::test]
async fn invalid_input_gets_a_clear_status_and_changes_nothing() {
    let env = Env::new();
    let gw = env.start().await;
    let mut nhs = records(&gw, &env, "nhs-guys").await;
    let mut nhs_consents = consents(&gw, &env, "nhs-guys").await;
    let base = || share_request(RecordCategory::UnscheduledCareAttendance, b"content");

    let cases: Vec<(ShareRecordRequest, Code, &str)> = vec![
        (
            ShareRecordRequest {
                subject: subject("943 476 5918"),
                ..base()
            },
            Code::InvalidArgument,
            "check digit",
        ),
        (
            ShareRecordRequest {
                subject: subject("94347659"),
                ..base()
            },
            Code::InvalidArgument,
            "10 digits",
        ),
        (
            ShareRecordRequest {
                subject: None,
                ..base()
            },
            Code::InvalidArgument,
            "subject is required",
        ),
        (
            ShareRecordRequest {
                category: RecordCategory::Unspecified as i32,
                ..base()
            },
            Code::InvalidArgument,
            "RECORD_CATEGORY_UNSPECIFIED",
        ),
        (
            ShareRecordRequest {
                category: 42,
                ..base()
            },
            Code::InvalidArgument,
            "not a RecordCategory",
        ),
        (
            ShareRecordRequest {
                summary: "  ".into(),
                ..base()
            },
            Code::InvalidArgument,
            "summary is blank (white space only)",
        ),
        (
            ShareRecordRequest {
                summary: "s".repeat(501),
                ..base()
            },
            Code::InvalidArgument,
            "limit of 500",
        ),
        (
            ShareRecordRequest {
                content: vec![],
                ..base()
            },
            Code::InvalidArgument,
            "content is required",
        ),
        (
            ShareRecordRequest {
                content: vec![b'x'; 1024 * 1024 + 1],
                ..base()
            },
            Code::ResourceExhausted,
            "limit of 1048576 bytes (limits.max_content_bytes)",
        ),
        (
            ShareRecordRequest {
                media_type: String::new(),
                ..base()
            },
            Code::InvalidArgument,
            "media_type is required",
        ),
        (
            ShareRecordRequest {
                media_type: "pdf".into(),
                ..base()
            },
            Code::InvalidArgument,
            "media_type must be a media type",
        ),
        (
            ShareRecordRequest {
                retain_until: Some(prost_types::Timestamp {
                    seconds: 1_000_000_000,
                    nanos: 0,
                }),
                ..base()
            },
            Code::InvalidArgument,
            "retain_until must be in the future",
        ),
        (
            ShareRecordRequest {
                // 9999-01-01.
                retain_until: Some(prost_types::Timestamp {
                    seconds: 253_370_764_800,
                    nanos: 0,
                }),
                ..base()
            },
            Code::InvalidArgument,
            "retain_until must be within 36525 days",
        ),
    ];
    for (req, code, needle) in cases {
        assert_status(nhs.share_record(req).await, code, needle);
    }
    // Exactly at the limit is accepted.
    nhs.share_record(ShareRecordRequest {
        content: vec![b'x'; 1024 * 1024],
        ..base()
    })
    .await
    .expect("1 MiB is within the limit");

    assert_status(
        nhs.find_records(FindRecordsRequest {
            subject: subject(NHS),
            purpose: Purpose::Unspecified as i32,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "PURPOSE_UNSPECIFIED",
    );
    assert_status(
        nhs.find_records(FindRecordsRequest {
            subject: subject("1234567890"),
            purpose: Purpose::Safeguarding as i32,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "check digit",
    );
    assert_status(
        nhs.get_record(get("r-123", Purpose::Safeguarding, None))
            .await,
        Code::InvalidArgument,
        "record_id must be",
    );
    assert_status(
        nhs.get_record(get(
            "r-00000000000000000000000000000000",
            Purpose::Unspecified,
            None,
        ))
        .await,
        Code::InvalidArgument,
        "PURPOSE_UNSPECIFIED",
    );

    let consent_cases: Vec<(RecordConsentRequest, &str)> = vec![
        (
            RecordConsentRequest {
                subject: subject("0000000001"),
                ..school_consent(ConsentState::Given)
            },
            "check digit",
        ),
        (
            school_consent(ConsentState::Unspecified),
            "CONSENT_STATE_UNSPECIFIED",
        ),
        (
            school_consent(ConsentState::Withdrawn),
            "call WithdrawConsent",
        ),
        (
            RecordConsentRequest {
                given_by: ConsentGiver::Unspecified as i32,
                ..school_consent(ConsentState::Given)
            },
            "CONSENT_GIVER_UNSPECIFIED",
        ),
        (
            RecordConsentRequest {
                purposes: vec![],
                ..school_consent(ConsentState::Given)
            },
            "purposes must name at least one purpose",
        ),
        (
            RecordConsentRequest {
                purposes: vec![Purpose::Safeguarding as i32, Purpose::Unspecified as i32],
                ..school_consent(ConsentState::Given)
            },
            "purposes[1]",
        ),
        (
            RecordConsentRequest {
                recipient_sectors: vec![],
                ..school_consent(ConsentState::Given)
            },
            "must not both be empty",
        ),
        (
            RecordConsentRequest {
                recipient_sectors: vec![Sector::Unspecified as i32],
                ..school_consent(ConsentState::Given)
            },
            "SECTOR_UNSPECIFIED",
        ),
        (
            RecordConsentRequest {
                recipient_agency_ids: vec!["school-nowhere".into()],
                ..school_consent(ConsentState::Given)
            },
            "not a registered agency",
        ),
        (
            RecordConsentRequest {
                categories: vec![],
                ..school_consent(ConsentState::Given)
            },
            "categories must name at least one",
        ),
        (
            RecordConsentRequest {
                valid_until: Some(prost_types::Timestamp {
                    seconds: 1_000_000_000,
                    nanos: 0,
                }),
                ..school_consent(ConsentState::Given)
            },
            "must be later than the time of recording",
        ),
    ];
    for (req, needle) in consent_cases {
        assert_status(
            nhs_consents.record_consent(req).await,
            Code::InvalidArgument,
            needle,
        );
    }
    assert_status(
        nhs_consents
            .withdraw_consent(WithdrawConsentRequest {
                consent_id: "consent-1".into(),
                note: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "consent_id must be",
    );

    // Nothing was stored or audited by any of them but the one valid share.
    assert_eq!(audited(&gw, &env, AuditAction::RecordShared).await.len(), 1);
    assert!(audited(&gw, &env, AuditAction::ConsentRecorded)
        .await
        .is_empty());
    assert!(nhs_consents
        .list_consents(ListConsentsRequest {
            subject: subject(NHS),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .consents
        .is_empty());
    gw.stop().await;
}

// === retention ===

#[tokio::test]
async fn records_past_retention_are_refused_then_purged_with_an_audit_entry() {
    let env = Env::new();
    let gw = env.start().await;
    let mut nhs = records(&gw, &env, "nhs-guys").await;
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        + Duration::from_millis(1500);
    let record = nhs
        .share_record(ShareRecordRequest {
            retain_until: Some(prost_types::Timestamp {
                seconds: soon.as_secs() as i64,
                nanos: soon.subsec_nanos() as i32,
            }),
            ..share_request(RecordCategory::UnscheduledCareAttendance, b"short-lived")
        })
        .await
        .expect("share")
        .into_inner()
        .record
        .expect("record");
    let kept = nhs
        .share_record(share_request(
            RecordCategory::UnscheduledCareAttendance,
            b"kept",
        ))
        .await
        .expect("share")
        .into_inner()
        .record
        .expect("record");
    nhs.get_record(get(&record.record_id, Purpose::HealthCare, None))
        .await
        .expect("readable before its retention ends");

    tokio::time::sleep(Duration::from_millis(1700)).await;
    // Past retention: refused to everyone, its owner included, and no longer found.
    assert_status(
        nhs.get_record(get(&record.record_id, Purpose::HealthCare, None))
            .await,
        Code::NotFound,
        "past its retention date",
    );
    let found = nhs
        .find_records(FindRecordsRequest {
            subject: subject(NHS),
            purpose: Purpose::HealthCare as i32,
            ..Default::default()
        })
        .await
        .expect("find")
        .into_inner()
        .records;
    assert_eq!(
        found
            .iter()
            .map(|r| r.record_id.as_str())
            .collect::<Vec<_>>(),
        [kept.record_id.as_str()]
    );
    gw.stop().await;

    // The sweeper runs at start: the next gateway purges it.
    let content_dir = env.path().join("data/dev/record-content");
    assert_eq!(std::fs::read_dir(&content_dir).expect("dir").count(), 2);
    let gw = env.start().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let purged = loop {
        let purged = audited(&gw, &env, AuditAction::RecordPurged).await;
        if !purged.is_empty() || Instant::now() > deadline {
            break purged;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(purged.len(), 1, "{purged:?}");
    assert_eq!(purged[0].object_id, record.record_id);
    assert_eq!(purged[0].actor_id, "system");
    assert_eq!(purged[0].actor_role, ActorRole::System as i32);
    assert_eq!(purged[0].target_agency_id, "nhs-guys");
    // The record is gone; the audit entries about it stay. The purge audits, then
    // deletes the content, then the metadata: until the last step is done (its fsyncs
    // can take a while on a busy disk) the record is still refused as expired.
    let mut nhs = records(&gw, &env, "nhs-guys").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = nhs
            .get_record(get(&record.record_id, Purpose::HealthCare, None))
            .await;
        let status = answer.expect_err("a purged record is never disclosed");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        if status.message().contains("not found") {
            break;
        }
        assert!(
            status.message().contains("past its retention date") && Instant::now() < deadline,
            "{status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The metadata goes last, so by now the content file has gone too.
    let left: Vec<String> = std::fs::read_dir(&content_dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, [kept.record_id.as_str()]);
    assert!(audited(&gw, &env, AuditAction::RecordShared)
        .await
        .iter()
        .any(|e| e.object_id == record.record_id));
    gw.stop().await;
}

// === at rest ===

#[tokio::test]
async fn no_content_summary_note_justification_or_nhs_number_is_in_clear_at_rest() {
    let env = Env::new();
    let gw = env.start().await;
    let mut nhs = records(&gw, &env, "nhs-guys").await;
    let mut nhs_consents = consents(&gw, &env, "nhs-guys").await;
    let mut school = records(&gw, &env, "school-oakfield").await;

    let content = b"Triage note: spiral fracture of the left humerus, explanation inconsistent";
    let summary = "Emergency department attendance, Saturday night, fracture";
    let note = "Consent taken from the mother at the bedside, witnessed by staff nurse";
    let record = nhs
        .share_record(ShareRecordRequest {
            summary: summary.into(),
            ..share_request(RecordCategory::UnscheduledCareAttendance, content)
        })
        .await
        .expect("share")
        .into_inner()
        .record
        .expect("record");
    let consent = record_consent(
        &mut nhs_consents,
        RecordConsentRequest {
            note: note.into(),
            ..school_consent(ConsentState::Given)
        },
    )
    .await;
    withdraw(&mut nhs_consents, &consent.consent_id).await;
    let disclosed = school
        .get_record(get(
            &record.record_id,
            Purpose::EducationSupport,
            override_with(JUSTIFICATION),
        ))
        .await
        .expect("override")
        .into_inner();
    assert_eq!(disclosed.content, content);
    gw.stop().await;

    let data_dir = env.path().join("data/dev");
    let files = common::files_under(&data_dir);
    assert!(files.len() > 5, "{files:?}");
    let needles: [&[u8]; 7] = [
        content,
        b"spiral fracture",
        summary.as_bytes(),
        note.as_bytes(),
        JUSTIFICATION.as_bytes(),
        NHS_DIGITS.as_bytes(),
        NHS.as_bytes(),
    ];
    for file in files {
        let bytes = std::fs::read(&file).expect("read");
        for needle in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds {:?} in clear",
                file.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }
}

// === concurrency ===

/// What one client saw for one GetRecord.
struct Attempt {
    started: Instant,
    outcome: Result<(u64, i32), Code>,
}

#[tokio::test]
async fn sixteen_clients_disclosing_while_consent_is_withdrawn_see_no_disclosure_after_it() {
    let env = Env::new();
    let gw = env.start().await;
    let mut nhs = records(&gw, &env, "nhs-guys").await;
    let mut nhs_consents = consents(&gw, &env, "nhs-guys").await;
    let record = share(&mut nhs, RecordCategory::UnscheduledCareAttendance, b"A&E").await;
    let consent = record_consent(&mut nhs_consents, school_consent(ConsentState::Given)).await;

    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let mut school = records(&gw, &env, "school-oakfield").await;
        let record_id = record.record_id.clone();
        let stopping = stopping.clone();
        clients.push(tokio::spawn(async move {
            let mut attempts = Vec::new();
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let outcome = school
                    .get_record(get(&record_id, Purpose::EducationSupport, None))
                    .await
                    .map(|r| {
                        let r = r.into_inner();
                        (r.audit_seq, r.basis)
                    })
                    .map_err(|s| s.code());
                attempts.push(Attempt { started, outcome });
            }
            attempts
        }));
    }

    tokio::time::sleep(Duration::from_millis(400)).await;
    withdraw(&mut nhs_consents, &consent.consent_id).await;
    let withdrawn_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(400)).await;
    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut attempts = Vec::new();
    for c in clients {
        attempts.extend(c.await.expect("client task"));
    }

    let withdrawal = audited(&gw, &env, AuditAction::ConsentWithdrawn).await;
    assert_eq!(withdrawal.len(), 1);
    let w = withdrawal[0].seq;
    let disclosed: Vec<AuditEntry> = audited(&gw, &env, AuditAction::RecordDisclosed)
        .await
        .into_iter()
        .filter(|e| e.object_id == record.record_id)
        .collect();
    let before = disclosed.iter().filter(|e| e.seq < w).count();
    assert!(before > 0, "no disclosure before the withdrawal");
    for e in &disclosed {
        assert_eq!(e.basis, DisclosureBasis::Consent as i32);
        assert!(
            e.seq < w,
            "RECORD_DISCLOSED at seq {} on consent {} after its withdrawal at seq {w}",
            e.seq,
            e.consent_id
        );
    }
    // What the clients saw agrees: each disclosure's seq precedes the withdrawal;
    // every request started after the withdrawal returned was refused.
    let mut refused_after = 0;
    for a in &attempts {
        match a.outcome {
            Ok((seq, basis)) => {
                assert_eq!(basis, DisclosureBasis::Consent as i32);
                assert!(seq < w, "a client was answered with seq {seq} >= {w}");
                assert!(a.started < withdrawn_at, "disclosed after the withdrawal");
            }
            Err(code) => {
                assert_eq!(code, Code::FailedPrecondition);
                refused_after += 1;
            }
        }
    }
    assert!(
        refused_after > 0,
        "no request was refused after the withdrawal"
    );
    assert_eq!(
        attempts.iter().filter(|a| a.outcome.is_ok()).count(),
        before
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_override_disclosure_reaches_the_owners_open_inbox_stream() {
    use sgw::proto::v1::concern_service_client::ConcernServiceClient;
    let env = Env::new();
    let gw = env.start().await;

    // The owner's case system is listening to its inbox.
    let mut owner_inbox =
        ConcernServiceClient::new(gw.connect_as(&env, Role::Agency, "nhs-guys").await);
    let mut stream = owner_inbox
        .subscribe_inbox(SubscribeInboxRequest { after_cursor: 0 })
        .await
        .expect("subscribe")
        .into_inner();

    let mut owner = records(&gw, &env, "nhs-guys").await;
    let record = share(
        &mut owner,
        RecordCategory::UnscheduledCareAttendance,
        b"A&E attendance: fracture",
    )
    .await;
    let mut school = records(&gw, &env, "school-oakfield").await;
    let disclosed = school
        .get_record(get(
            &record.record_id,
            Purpose::Safeguarding,
            override_with(JUSTIFICATION),
        ))
        .await
        .expect("override disclosure")
        .into_inner();
    assert_eq!(
        disclosed.basis,
        DisclosureBasis::SafeguardingOverride as i32
    );

    let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the notice arrives")
        .expect("stream")
        .expect("an event");
    match msg.event {
        Some(subscribe_inbox_response::Event::OverrideNotice(n)) => {
            assert_eq!(n.record_id, record.record_id);
            assert_eq!(n.recipient_agency_id, "school-oakfield");
            assert_eq!(n.justification, JUSTIFICATION.trim());
            assert_eq!(n.audit_seq, disclosed.audit_seq);
        }
        other => panic!("expected an OverrideNotice, got {other:?}"),
    }
    // A subscriber that comes later replays it from the durable inbox.
    let mut replay = owner_inbox
        .subscribe_inbox(SubscribeInboxRequest { after_cursor: 0 })
        .await
        .unwrap()
        .into_inner();
    let again = tokio::time::timeout(Duration::from_secs(5), replay.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        again.event,
        Some(subscribe_inbox_response::Event::OverrideNotice(_))
    ));
    gw.stop().await;

    // The justification is sealed in the inbox too.
    for file in common::files_under(&env.path().join("data")) {
        let bytes = std::fs::read(&file).unwrap();
        let needle = JUSTIFICATION.as_bytes();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{} holds the justification",
            file.display()
        );
    }
}
