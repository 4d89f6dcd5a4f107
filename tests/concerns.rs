//! ConcernService end to end over mutual TLS: routing to the school and the front
//! door, live and resumed inbox streams, audited delivery, idempotent retries,
//! visibility and role checks, escalation of a missed deadline, restarts (SIGKILL
//! and SIGTERM) with nothing lost, refusals that change nothing, and no clear text
//! on disk.

mod common;

use std::time::Duration;

use common::Env;
use sgw::domain::Role;
use sgw::proto::v1::audit_service_client::AuditServiceClient;
use sgw::proto::v1::concern_service_client::ConcernServiceClient;
use sgw::proto::v1::subscribe_inbox_response::Event;
use sgw::proto::v1::*;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const NHS: &str = "943 476 5919";
const NHS_DIGITS: &str = "9434765919";
const NARRATIVE: &str =
    "Police attended a domestic incident at the home overnight; the child was present.";

type Client = ConcernServiceClient<Channel>;

async fn agency(gw: &common::Gateway, env: &Env, id: &str) -> Client {
    ConcernServiceClient::new(gw.connect_as(env, Role::Agency, id).await)
}

async fn agency_at(env: &Env, addr: std::net::SocketAddr, id: &str) -> Client {
    let (cert, key) = env.identity(Role::Agency, id);
    let channel = common::connect(addr, &env.ca_pem(), Some((&cert, &key)))
        .await
        .expect("connect");
    ConcernServiceClient::new(channel)
}

fn raise(recipients: &[&str], request_id: &str) -> RaiseConcernRequest {
    RaiseConcernRequest {
        subject: Some(Subject {
            nhs_number: NHS.into(),
        }),
        category: ConcernCategory::DomesticAbuse as i32,
        urgency: Urgency::Urgent as i32,
        narrative: NARRATIVE.into(),
        recipient_agency_ids: recipients.iter().map(|s| s.to_string()).collect(),
        request_id: request_id.into(),
    }
}

async fn raise_ok(client: &mut Client, req: RaiseConcernRequest) -> Concern {
    client
        .raise_concern(req)
        .await
        .expect("raise")
        .into_inner()
        .concern
        .expect("concern")
}

async fn subscribe(client: &mut Client, after_cursor: u64) -> Streaming<SubscribeInboxResponse> {
    client
        .subscribe_inbox(SubscribeInboxRequest { after_cursor })
        .await
        .expect("subscribe")
        .into_inner()
}

/// The next event, within 10 s.
async fn next(stream: &mut Streaming<SubscribeInboxResponse>) -> SubscribeInboxResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .expect("stream healthy")
        .expect("stream open")
}

/// Asserts that nothing arrives for `wait`.
async fn quiet(stream: &mut Streaming<SubscribeInboxResponse>, wait: Duration) {
    if let Ok(got) = tokio::time::timeout(wait, stream.message()).await {
        panic!("unexpected event: {got:?}");
    }
}

fn concern_of(event: &SubscribeInboxResponse) -> &Concern {
    match &event.event {
        Some(Event::Concern(c)) => c,
        other => panic!("not a concern event: {other:?}"),
    }
}

fn escalation_of(event: &SubscribeInboxResponse) -> &Escalation {
    match &event.event {
        Some(Event::Escalation(e)) => e,
        other => panic!("not an escalation event: {other:?}"),
    }
}

fn delivery<'a>(c: &'a Concern, agency: &str) -> &'a Delivery {
    c.recipients
        .iter()
        .find(|d| d.agency_id == agency)
        .unwrap_or_else(|| panic!("{agency} is not a recipient"))
}

/// The entries of `action` whose target agency is `target`, oldest first.
async fn audit_entries(
    gw: &common::Gateway,
    env: &Env,
    action: AuditAction,
    target: &str,
) -> Vec<AuditEntry> {
    audited(
        gw,
        env,
        QueryDisclosuresRequest {
            action: action as i32,
            target_agency_id: target.into(),
            ..Default::default()
        },
    )
    .await
}

/// The entries of `action` whose actor is `actor`, oldest first.
async fn entries_by(
    gw: &common::Gateway,
    env: &Env,
    action: AuditAction,
    actor: &str,
) -> Vec<AuditEntry> {
    audited(
        gw,
        env,
        QueryDisclosuresRequest {
            action: action as i32,
            actor_id: actor.into(),
            ..Default::default()
        },
    )
    .await
}

/// The first 1000 entries that `query` selects, asked as the auditor `dpo`.
async fn audited(
    gw: &common::Gateway,
    env: &Env,
    query: QueryDisclosuresRequest,
) -> Vec<AuditEntry> {
    let mut client = AuditServiceClient::new(gw.connect_as(env, Role::Auditor, "dpo").await);
    client
        .query_disclosures(QueryDisclosuresRequest {
            page_size: 1000,
            ..query
        })
        .await
        .expect("audit query")
        .into_inner()
        .entries
}

/// Asserts that `entry` is a DENIED entry of `actor` about `concern_id` whose
/// reason starts with `reason` and holds no narrative, note or NHS number.
fn assert_denied(entry: &AuditEntry, actor: &str, concern_id: &str, reason: &str) {
    assert_eq!(entry.outcome, AuditOutcome::Denied as i32, "{entry:?}");
    assert_eq!(entry.actor_id, actor, "{entry:?}");
    assert_eq!(entry.object_id, concern_id, "{entry:?}");
    assert!(entry.reason.starts_with(reason), "{entry:?}");
    for secret in [NARRATIVE, NHS, NHS_DIGITS] {
        assert!(!entry.reason.contains(secret), "{entry:?}");
        assert!(!entry.justification.contains(secret), "{entry:?}");
    }
}

async fn inbox(client: &mut Client) -> Vec<Concern> {
    client
        .list_inbox(ListInboxRequest::default())
        .await
        .expect("list inbox")
        .into_inner()
        .concerns
}

#[tokio::test]
async fn police_concern_reaches_school_and_front_door_streams_after_an_audited_delivery() {
    let env = Env::new();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut school = agency(&gw, &env, "school-oakfield").await;
    let mut front_door = agency(&gw, &env, "csc-southwark").await;
    let mut school_events = subscribe(&mut school, 0).await;
    let mut front_door_events = subscribe(&mut front_door, 0).await;

    let raised = raise_ok(&mut police, raise(&["school-oakfield"], "incident-42")).await;
    assert!(raised.concern_id.starts_with("c-"), "{}", raised.concern_id);
    assert_eq!(raised.raised_by, "police-met");
    assert_eq!(
        raised.front_door, "csc-southwark",
        "the front door it is routed to"
    );
    assert_eq!(raised.status, ConcernStatus::Raised as i32);
    assert_eq!(raised.subject.as_ref().unwrap().nhs_number, NHS_DIGITS);
    let recipients: Vec<&str> = raised
        .recipients
        .iter()
        .map(|d| d.agency_id.as_str())
        .collect();
    assert_eq!(
        recipients,
        ["school-oakfield", "csc-southwark"],
        "the front door is added"
    );
    assert!(raised.recipients.iter().all(|d| d.delivered_at.is_none()));
    assert!(raised.ack_due_at.is_some() && raised.raised_at.is_some());

    for (who, stream) in [
        ("school-oakfield", &mut school_events),
        ("csc-southwark", &mut front_door_events),
    ] {
        let event = next(stream).await;
        assert_eq!(event.cursor, 1);
        let c = concern_of(&event);
        assert_eq!(c.concern_id, raised.concern_id);
        assert_eq!(c.narrative, NARRATIVE);
        assert_eq!(c.category, ConcernCategory::DomesticAbuse as i32);
        assert!(
            delivery(c, who).delivered_at.is_some(),
            "{who}: delivered_at set before sending"
        );

        // The delivery was audited (and durable) before the event was sent.
        let delivered = audit_entries(&gw, &env, AuditAction::ConcernDelivered, who).await;
        assert_eq!(delivered.len(), 1, "{who}: {delivered:?}");
        let entry = &delivered[0];
        assert_eq!(entry.object_id, raised.concern_id);
        assert_eq!(entry.actor_id, who);
        assert_eq!(entry.subject_ref.len(), 64);
        assert!(!entry.reason.contains(NARRATIVE));
        assert_eq!(
            entry.time.as_ref().map(|t| (t.seconds, t.nanos / 1000)),
            delivery(c, who)
                .delivered_at
                .as_ref()
                .map(|t| (t.seconds, t.nanos / 1000)),
            "delivered_at is the audit entry's time"
        );
    }
    let raised_entries = audit_entries(&gw, &env, AuditAction::ConcernRaised, "").await;
    assert_eq!(raised_entries.len(), 1);
    assert_eq!(raised_entries[0].actor_id, "police-met");

    // A retry with the same request_id returns the first concern and sends nothing.
    let retry = raise_ok(&mut police, raise(&["school-oakfield"], "incident-42")).await;
    assert_eq!(retry.concern_id, raised.concern_id);
    assert_eq!(
        retry.status,
        ConcernStatus::Delivered as i32,
        "as it stands now"
    );
    quiet(&mut school_events, Duration::from_millis(300)).await;
    assert_eq!(
        audit_entries(&gw, &env, AuditAction::ConcernRaised, "")
            .await
            .len(),
        1,
        "a retry raises nothing new"
    );
    // Another request id is another concern, the school's cursor 2.
    let second = raise_ok(&mut police, raise(&["school-oakfield"], "incident-43")).await;
    assert_ne!(second.concern_id, raised.concern_id);
    let event = next(&mut school_events).await;
    assert_eq!(event.cursor, 2);
    assert_eq!(concern_of(&event).concern_id, second.concern_id);

    // The sender sees both deliveries; its own inbox does not list what it sent.
    let seen = police
        .get_concern(GetConcernRequest {
            concern_id: raised.concern_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .concern
        .unwrap();
    assert!(seen.recipients.iter().all(|d| d.delivered_at.is_some()));
    assert_eq!(seen.status, ConcernStatus::Delivered as i32);
    assert!(inbox(&mut police).await.is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn only_parties_see_a_concern_only_recipients_acknowledge_only_the_front_door_decides() {
    let env = Env::new();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut school = agency(&gw, &env, "school-oakfield").await;
    let mut front_door = agency(&gw, &env, "csc-southwark").await;
    let mut hospital = agency(&gw, &env, "nhs-guys").await;
    let c = raise_ok(&mut police, raise(&["school-oakfield"], "")).await;
    let id = c.concern_id.clone();

    // A non-party gets exactly what an unknown id gets.
    let unknown = "c-00000000000000000000000000000000";
    let err = hospital
        .get_concern(GetConcernRequest {
            concern_id: id.clone(),
        })
        .await
        .unwrap_err();
    let missing = hospital
        .get_concern(GetConcernRequest {
            concern_id: unknown.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        err.message().replace(&id, "ID"),
        missing.message().replace(unknown, "ID")
    );
    for (code, message) in [
        (
            hospital
                .acknowledge_concern(AcknowledgeConcernRequest {
                    concern_id: id.clone(),
                    note: String::new(),
                })
                .await
                .unwrap_err(),
            Code::NotFound,
        ),
        (
            hospital
                .record_decision(RecordDecisionRequest {
                    concern_id: id.clone(),
                    decision: Decision::EarlyHelp as i32,
                    lead_practitioner: "A. Worker".into(),
                    note: String::new(),
                })
                .await
                .unwrap_err(),
            Code::NotFound,
        ),
    ]
    .map(|(s, want)| (s.code() == want, s.message().to_owned()))
    {
        assert!(code, "{message}");
        assert!(!message.contains("police"), "leaks the sender: {message}");
    }

    // The sender is not a recipient: PERMISSION_DENIED.
    let err = police
        .acknowledge_concern(AcknowledgeConcernRequest {
            concern_id: id.clone(),
            note: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("only recipients acknowledge"),
        "{}",
        err.message()
    );

    // The school acknowledges; again changes nothing.
    let acked = school
        .acknowledge_concern(AcknowledgeConcernRequest {
            concern_id: id.clone(),
            note: "Designated safeguarding lead informed.".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .concern
        .unwrap();
    let school_delivery = delivery(&acked, "school-oakfield").clone();
    assert!(school_delivery.acknowledged_at.is_some());
    assert!(
        school_delivery.delivered_at.is_some(),
        "acknowledging delivers first"
    );
    assert_eq!(acked.narrative, NARRATIVE);
    let again = school
        .acknowledge_concern(AcknowledgeConcernRequest {
            concern_id: id.clone(),
            note: "second".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .concern
        .unwrap();
    assert_eq!(delivery(&again, "school-oakfield"), &school_delivery);
    // The refusals above are audited DENIED under the same action: count the one
    // acknowledgement that happened.
    let acks: Vec<AuditEntry> =
        audit_entries(&gw, &env, AuditAction::ConcernAcknowledged, "police-met")
            .await
            .into_iter()
            .filter(|e| e.outcome == AuditOutcome::Allowed as i32)
            .collect();
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert_eq!(acks[0].actor_id, "school-oakfield");

    // Decisions: the school (a recipient) may not; bad fields are INVALID_ARGUMENT;
    // the front door may.
    let decide = |decision: Decision, lead: &str| RecordDecisionRequest {
        concern_id: id.clone(),
        decision: decision as i32,
        lead_practitioner: lead.into(),
        note: "Known family; threshold met for early help.".into(),
    };
    let err = school
        .record_decision(decide(Decision::EarlyHelp, "A. Worker"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err
        .message()
        .contains("only the front door (csc-southwark)"));
    let err = police
        .record_decision(decide(Decision::EarlyHelp, "A. Worker"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    for (req, want) in [
        (
            decide(Decision::Unspecified, "A. Worker"),
            "decision is required",
        ),
        (
            decide(Decision::EarlyHelp, ""),
            "lead_practitioner is required",
        ),
        (
            decide(Decision::EarlyHelp, &"x".repeat(201)),
            "lead_practitioner has 201",
        ),
    ] {
        let err = front_door.record_decision(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(want), "{}", err.message());
    }
    let decided = front_door
        .record_decision(decide(Decision::EarlyHelp, "A. Worker"))
        .await
        .unwrap()
        .into_inner()
        .concern
        .unwrap();
    assert_eq!(decided.status, ConcernStatus::Decided as i32);
    assert_eq!(decided.decision, Decision::EarlyHelp as i32);
    assert_eq!(decided.lead_practitioner, "A. Worker");
    // The same decision again is a no-op; a different one is refused.
    front_door
        .record_decision(decide(Decision::EarlyHelp, "A. Worker"))
        .await
        .expect("same decision again");
    let err = front_door
        .record_decision(decide(Decision::ChildInNeed, "A. Worker"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let decisions: Vec<AuditEntry> =
        audit_entries(&gw, &env, AuditAction::ConcernDecided, "police-met")
            .await
            .into_iter()
            .filter(|e| e.outcome == AuditOutcome::Allowed as i32)
            .collect();
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_eq!(decisions[0].actor_id, "csc-southwark");
    assert!(decisions[0].reason.contains("EARLY_HELP"));

    // The sender sees the outcome.
    let seen = police
        .get_concern(GetConcernRequest { concern_id: id })
        .await
        .unwrap()
        .into_inner()
        .concern
        .unwrap();
    assert_eq!(seen.status, ConcernStatus::Decided as i32);
    gw.stop().await;
}

#[tokio::test]
async fn resuming_from_a_cursor_replays_only_later_events() {
    let env = Env::new();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut school = agency(&gw, &env, "school-oakfield").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            raise_ok(&mut police, raise(&["school-oakfield"], &format!("r{i}")))
                .await
                .concern_id,
        );
    }
    let mut all = subscribe(&mut school, 0).await;
    for (i, id) in ids.iter().enumerate() {
        let event = next(&mut all).await;
        assert_eq!(event.cursor, i as u64 + 1);
        assert_eq!(&concern_of(&event).concern_id, id);
    }
    drop(all);

    let mut resumed = subscribe(&mut school, 2).await;
    let event = next(&mut resumed).await;
    assert_eq!(
        (event.cursor, concern_of(&event).concern_id.as_str()),
        (3, ids[2].as_str())
    );
    quiet(&mut resumed, Duration::from_millis(300)).await;
    // Then live events follow.
    let live = raise_ok(&mut police, raise(&["school-oakfield"], "r3")).await;
    let event = next(&mut resumed).await;
    assert_eq!(
        (event.cursor, concern_of(&event).concern_id.as_str()),
        (4, live.concern_id.as_str())
    );

    let err = school
        .subscribe_inbox(SubscribeInboxRequest { after_cursor: 99 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_subscriber_resumes_after_sigkill_and_sigterm_with_nothing_lost() {
    let env = Env::new();
    let mut gateway = common::spawn_gateway(&env).await;
    let mut police = agency_at(&env, gateway.addr, "police-met").await;
    let mut school = agency_at(&env, gateway.addr, "school-oakfield").await;

    let first = raise_ok(&mut police, raise(&["school-oakfield"], "k0")).await;
    let mut stream = subscribe(&mut school, 0).await;
    let event = next(&mut stream).await;
    assert_eq!(
        (event.cursor, concern_of(&event).concern_id.as_str()),
        (1, first.concern_id.as_str())
    );
    drop(stream);
    // Raised (and answered) while the school is away, then the process is killed.
    let mut acknowledged = Vec::new();
    for i in 1..=4 {
        acknowledged.push(
            raise_ok(&mut police, raise(&["school-oakfield"], &format!("k{i}")))
                .await
                .concern_id,
        );
    }
    gateway.kill9().await;

    let gateway = common::spawn_gateway(&env).await;
    let mut police = agency_at(&env, gateway.addr, "police-met").await;
    let mut school = agency_at(&env, gateway.addr, "school-oakfield").await;
    // Idempotency survives the crash.
    let retry = raise_ok(&mut police, raise(&["school-oakfield"], "k2")).await;
    assert_eq!(retry.concern_id, acknowledged[1]);
    let mut stream = subscribe(&mut school, 1).await;
    for (i, id) in acknowledged.iter().enumerate() {
        let event = next(&mut stream).await;
        assert_eq!(event.cursor, i as u64 + 2);
        let c = concern_of(&event);
        assert_eq!(&c.concern_id, id);
        assert_eq!(c.narrative, NARRATIVE);
    }
    // A clean stop (SIGTERM) with the stream open ends it and exits 0.
    let live = raise_ok(&mut police, raise(&["school-oakfield"], "k5")).await;
    assert_eq!(next(&mut stream).await.cursor, 6);
    gateway.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream ends at shutdown");
    match ended {
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(
                status.message().contains("resume from your last cursor"),
                "{status:?}"
            );
        }
        other => panic!("expected UNAVAILABLE at shutdown, got {other:?}"),
    }

    let gateway = common::spawn_gateway(&env).await;
    let mut police = agency_at(&env, gateway.addr, "police-met").await;
    let mut school = agency_at(&env, gateway.addr, "school-oakfield").await;
    let mut stream = subscribe(&mut school, 5).await;
    let event = next(&mut stream).await;
    assert_eq!(
        (event.cursor, concern_of(&event).concern_id.as_str()),
        (6, live.concern_id.as_str())
    );
    let after = raise_ok(&mut police, raise(&["school-oakfield"], "k6")).await;
    let event = next(&mut stream).await;
    assert_eq!(
        (event.cursor, concern_of(&event).concern_id.as_str()),
        (7, after.concern_id.as_str())
    );
    gateway.stop().await;
}

#[tokio::test]
async fn an_unacknowledged_immediate_risk_concern_escalates_once_to_sender_and_front_door() {
    let env = Env::new();
    let text = std::fs::read_to_string(env.config_path()).unwrap();
    assert!(text.contains("immediate_risk = \"1h\""));
    std::fs::write(
        env.config_path(),
        text.replace("immediate_risk = \"1h\"", "immediate_risk = \"1s\""),
    )
    .unwrap();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut front_door = agency(&gw, &env, "csc-southwark").await;
    let mut school = agency(&gw, &env, "school-oakfield").await;
    let mut police_events = subscribe(&mut police, 0).await;
    let mut front_door_events = subscribe(&mut front_door, 0).await;

    let mut req = raise(&["school-oakfield"], "");
    req.category = ConcernCategory::PhysicalAbuse as i32;
    req.urgency = Urgency::ImmediateRisk as i32;
    let c = raise_ok(&mut police, req).await;
    let due = c.ack_due_at.unwrap();
    let raised_at = c.raised_at.unwrap();
    assert_eq!(
        (due.seconds - raised_at.seconds, due.nanos),
        (1, raised_at.nanos)
    );
    assert_eq!(
        concern_of(&next(&mut front_door_events).await).concern_id,
        c.concern_id
    );

    let at_sender = next(&mut police_events).await;
    assert_eq!(at_sender.cursor, 1);
    let e = escalation_of(&at_sender);
    assert_eq!(e.concern_id, c.concern_id);
    assert_eq!(e.due_at.as_ref(), Some(&due));
    assert!(
        e.reason.contains("school-oakfield") && e.reason.contains("csc-southwark"),
        "{}",
        e.reason
    );
    let at_front_door = next(&mut front_door_events).await;
    assert_eq!(at_front_door.cursor, 2);
    assert_eq!(escalation_of(&at_front_door), e);

    // Once only.
    quiet(&mut police_events, Duration::from_millis(1500)).await;
    quiet(&mut front_door_events, Duration::from_millis(100)).await;
    let escalated = audit_entries(&gw, &env, AuditAction::ConcernEscalated, "").await;
    let mut targets: Vec<&str> = escalated
        .iter()
        .map(|e| e.target_agency_id.as_str())
        .collect();
    targets.sort();
    assert_eq!(targets, ["csc-southwark", "school-oakfield"]);
    assert!(escalated
        .iter()
        .all(|e| e.actor_id == "system" && e.object_id == c.concern_id));

    let seen = school
        .get_concern(GetConcernRequest {
            concern_id: c.concern_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .concern
        .unwrap();
    assert_eq!(seen.status, ConcernStatus::Overdue as i32);
    let overdue = school
        .list_inbox(ListInboxRequest {
            status: ConcernStatus::Overdue as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(overdue.concerns.len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn bad_input_is_invalid_argument_and_changes_nothing() {
    let env = Env::new();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut school = agency(&gw, &env, "school-oakfield").await;
    let mut front_door = agency(&gw, &env, "csc-southwark").await;
    let good = || raise(&["school-oakfield"], "");
    let cases: Vec<(&str, RaiseConcernRequest, &str)> = vec![
        (
            "check digit",
            RaiseConcernRequest {
                subject: Some(Subject {
                    nhs_number: "943 476 5918".into(),
                }),
                ..good()
            },
            "check digit",
        ),
        (
            "format",
            RaiseConcernRequest {
                subject: Some(Subject {
                    nhs_number: "94347659".into(),
                }),
                ..good()
            },
            "10 digits",
        ),
        (
            "no subject",
            RaiseConcernRequest {
                subject: None,
                ..good()
            },
            "subject is required",
        ),
        (
            "category",
            RaiseConcernRequest {
                category: 0,
                ..good()
            },
            "category is required",
        ),
        (
            "category value",
            RaiseConcernRequest {
                category: 42,
                ..good()
            },
            "category 42",
        ),
        (
            "urgency",
            RaiseConcernRequest {
                urgency: 0,
                ..good()
            },
            "urgency is required",
        ),
        (
            "empty narrative",
            RaiseConcernRequest {
                narrative: String::new(),
                ..good()
            },
            "narrative is required",
        ),
        (
            "blank narrative",
            RaiseConcernRequest {
                narrative: " \n ".into(),
                ..good()
            },
            "narrative is blank (white space only)",
        ),
        (
            "long narrative",
            RaiseConcernRequest {
                narrative: "é".repeat(20_001),
                ..good()
            },
            "narrative has 20001 characters, more than the limit of 20000",
        ),
        (
            "unknown recipient",
            raise(&["school-oakfield", "school-nowhere"], ""),
            "recipient_agency_ids[1] \"school-nowhere\" is not a registered agency",
        ),
        ("sender", raise(&["police-met"], ""), "is the sender"),
        (
            "request id",
            raise(&["school-oakfield"], &"r".repeat(129)),
            "request_id is longer than 128",
        ),
    ];
    for (name, req, want) in cases {
        let err = police.raise_concern(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains(want), "{name}: {}", err.message());
        assert!(
            !err.message().contains(NHS_DIGITS),
            "{name}: echoes the NHS number"
        );
    }
    // Exactly the maximum is accepted (in characters, not bytes), then refused again
    // for another reason only.
    let max = raise_ok(
        &mut police,
        RaiseConcernRequest {
            narrative: "é".repeat(20_000),
            ..good()
        },
    )
    .await;
    assert_eq!(max.narrative.chars().count(), 20_000);

    for (name, err) in [
        (
            "malformed id",
            school
                .get_concern(GetConcernRequest {
                    concern_id: "42".into(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "empty id",
            school
                .get_concern(GetConcernRequest {
                    concern_id: String::new(),
                })
                .await
                .unwrap_err(),
        ),
        (
            "page size",
            school
                .list_inbox(ListInboxRequest {
                    page_size: 5000,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
        (
            "page token",
            school
                .list_inbox(ListInboxRequest {
                    page_token: "nope".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
        (
            "status",
            school
                .list_inbox(ListInboxRequest {
                    status: 77,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
        (
            "long note",
            school
                .acknowledge_concern(AcknowledgeConcernRequest {
                    concern_id: max.concern_id.clone(),
                    note: "n".repeat(4001),
                })
                .await
                .unwrap_err(),
        ),
    ] {
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
    }

    // Nothing but the one good concern was stored, sent or audited.
    for client in [&mut school, &mut front_door] {
        let listed = inbox(client).await;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].concern_id, max.concern_id);
        let mut stream = subscribe(client, 0).await;
        assert_eq!(next(&mut stream).await.cursor, 1);
        quiet(&mut stream, Duration::from_millis(200)).await;
    }
    assert_eq!(
        audit_entries(&gw, &env, AuditAction::ConcernRaised, "")
            .await
            .len(),
        1
    );
    assert!(
        audit_entries(&gw, &env, AuditAction::ConcernAcknowledged, "")
            .await
            .is_empty()
    );
    gw.stop().await;
}

#[tokio::test]
async fn list_inbox_pages_filters_and_delivers_what_it_returns() {
    let env = Env::new();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut school = agency(&gw, &env, "school-oakfield").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            raise_ok(&mut police, raise(&["school-oakfield"], &format!("p{i}")))
                .await
                .concern_id,
        );
    }
    let first = school
        .list_inbox(ListInboxRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first
            .concerns
            .iter()
            .map(|c| c.concern_id.as_str())
            .collect::<Vec<_>>(),
        [ids[0].as_str(), ids[1].as_str()],
        "oldest first"
    );
    assert!(
        first
            .concerns
            .iter()
            .all(|c| c.narrative == NARRATIVE
                && delivery(c, "school-oakfield").delivered_at.is_some())
    );
    assert!(!first.next_page_token.is_empty());
    let second = school
        .list_inbox(ListInboxRequest {
            page_size: 2,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.concerns.len(), 1);
    assert_eq!(second.concerns[0].concern_id, ids[2]);
    assert!(second.next_page_token.is_empty(), "last page");
    // A token is bound to its filter.
    let err = school
        .list_inbox(ListInboxRequest {
            page_size: 2,
            page_token: first.next_page_token,
            status: ConcernStatus::Raised as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        audit_entries(&gw, &env, AuditAction::ConcernDelivered, "school-oakfield")
            .await
            .len(),
        3,
        "listing delivered each concern once"
    );
    // Listing again discloses nothing new.
    inbox(&mut school).await;
    assert_eq!(
        audit_entries(&gw, &env, AuditAction::ConcernDelivered, "school-oakfield")
            .await
            .len(),
        3
    );

    school
        .acknowledge_concern(AcknowledgeConcernRequest {
            concern_id: ids[1].clone(),
            note: String::new(),
        })
        .await
        .unwrap();
    // The front door has not received them yet, so they are still RAISED.
    let raised = school
        .list_inbox(ListInboxRequest {
            status: ConcernStatus::Raised as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(raised.concerns.len(), 3);
    let mut front_door = agency(&gw, &env, "csc-southwark").await;
    let delivered = front_door
        .list_inbox(ListInboxRequest {
            status: ConcernStatus::Delivered as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        delivered.concerns.len(),
        3,
        "delivered to every recipient by this very call"
    );
    assert!(delivered
        .concerns
        .iter()
        .all(|c| c.status == ConcernStatus::Delivered as i32));
    gw.stop().await;
}

#[tokio::test]
async fn a_stalled_subscriber_blocks_neither_the_sender_nor_other_subscribers() {
    let env = Env::new();
    env.append_config("[limits]\nmax_subscribers_per_agency = 2\n");
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut school = agency(&gw, &env, "school-oakfield").await;
    let mut other_school = agency(&gw, &env, "school-oakfield").await;
    let _stalled = subscribe(&mut school, 0).await; // never read
    let mut reading = subscribe(&mut other_school, 0).await;
    let err = school
        .subscribe_inbox(SubscribeInboxRequest { after_cursor: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    let big = "x".repeat(20_000);
    let started = std::time::Instant::now();
    for i in 0..60 {
        let mut req = raise(&["school-oakfield"], &format!("s{i}"));
        req.narrative = big.clone();
        raise_ok(&mut police, req).await;
    }
    for want in 1..=60 {
        assert_eq!(next(&mut reading).await.cursor, want);
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    gw.stop().await;
}

#[tokio::test]
async fn narratives_notes_and_nhs_numbers_are_not_in_the_data_files_in_clear() {
    let env = Env::new();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut school = agency(&gw, &env, "school-oakfield").await;
    let mut front_door = agency(&gw, &env, "csc-southwark").await;
    let narrative = "NARRATIVE-MARKER: bruising to the upper arm, seen in PE.";
    let note = "NOTE-MARKER: spoke to the designated safeguarding lead.";
    let decision_note = "DECISION-MARKER: strategy discussion held.";
    let mut req = raise(&["school-oakfield"], "REQUEST-MARKER");
    req.narrative = narrative.into();
    let c = raise_ok(&mut police, req).await;
    let mut stream = subscribe(&mut school, 0).await;
    assert_eq!(concern_of(&next(&mut stream).await).narrative, narrative);
    school
        .acknowledge_concern(AcknowledgeConcernRequest {
            concern_id: c.concern_id.clone(),
            note: note.into(),
        })
        .await
        .unwrap();
    front_door
        .record_decision(RecordDecisionRequest {
            concern_id: c.concern_id.clone(),
            decision: Decision::ChildProtectionEnquiry as i32,
            lead_practitioner: "A. Worker".into(),
            note: decision_note.into(),
        })
        .await
        .unwrap();
    drop(stream);
    gw.stop().await;

    let needles = [
        "NARRATIVE-MARKER",
        "bruising",
        "NOTE-MARKER",
        "DECISION-MARKER",
        "REQUEST-MARKER",
        NHS_DIGITS,
        NHS,
    ];
    let files = common::files_under(&env.path().join("data"));
    assert!(
        files.iter().any(|f| f.to_string_lossy().contains("store")),
        "the concern store is under the data dir: {files:?}"
    );
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        for needle in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} holds {needle:?} in clear",
                file.display()
            );
        }
    }
}

#[tokio::test]
async fn an_in_process_restart_reopens_the_concern_store() {
    let env = Env::new();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut school = agency(&gw, &env, "school-oakfield").await;
    let _open_stream = subscribe(&mut school, 0).await;
    let c = raise_ok(&mut police, raise(&["school-oakfield"], "again")).await;
    gw.stop().await;

    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let retry = raise_ok(&mut police, raise(&["school-oakfield"], "again")).await;
    assert_eq!(retry.concern_id, c.concern_id);
    gw.stop().await;
}

#[tokio::test]
async fn list_inbox_pages_stay_within_the_message_size_limit() {
    let env = Env::new();
    // The smallest message limit the config accepts for 20000-character narratives.
    env.append_config("[limits]\nmax_message_bytes = 200000\nmax_content_bytes = 100000\n");
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut school = agency(&gw, &env, "school-oakfield").await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let mut req = raise(&["school-oakfield"], &format!("big{i}"));
        req.narrative = format!("{i}").repeat(20_000);
        ids.push(raise_ok(&mut police, req).await.concern_id);
    }
    let mut listed = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = school
            .list_inbox(ListInboxRequest {
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("every page fits in a message")
            .into_inner();
        pages += 1;
        assert!(!page.concerns.is_empty());
        listed.extend(page.concerns.into_iter().map(|c| c.concern_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(listed, ids, "every concern once, in order");
    assert!(
        pages > 1,
        "10 narratives of 20000 characters need more than one page"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_non_party_get_concern_is_not_found_and_audited_denied_like_an_unknown_id() {
    let env = Env::new();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut hospital = agency(&gw, &env, "nhs-guys").await;
    let c = raise_ok(&mut police, raise(&["school-oakfield"], "")).await;
    let id = c.concern_id.clone();
    let unknown = "c-0123456789abcdef0123456789abcdef";

    let not_party = hospital
        .get_concern(GetConcernRequest {
            concern_id: id.clone(),
        })
        .await
        .unwrap_err();
    let missing = hospital
        .get_concern(GetConcernRequest {
            concern_id: unknown.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(not_party.code(), Code::NotFound, "{not_party:?}");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    assert_eq!(
        not_party.message().replace(&id, "ID"),
        missing.message().replace(unknown, "ID"),
        "the caller cannot tell a concern it may not see from an unknown id"
    );

    // Both probes are in the log, DENIED, naming the id as given.
    let denied = entries_by(&gw, &env, AuditAction::DisclosureDenied, "nhs-guys").await;
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert_denied(&denied[0], "nhs-guys", &id, "NOT_PARTY");
    assert_eq!(denied[0].target_agency_id, "police-met");
    assert_eq!(denied[0].subject_ref.len(), 64, "the child, by keyed hash");
    assert_denied(&denied[1], "nhs-guys", unknown, "NOT_FOUND");
    assert!(denied[1].subject_ref.is_empty() && denied[1].target_agency_id.is_empty());
    // Nothing was delivered to the hospital.
    assert!(
        entries_by(&gw, &env, AuditAction::ConcernDelivered, "nhs-guys")
            .await
            .is_empty()
    );
    gw.stop().await;
}

#[tokio::test]
async fn refused_acknowledgements_and_decisions_are_audited_denied() {
    let env = Env::new();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut school = agency(&gw, &env, "school-oakfield").await;
    let mut hospital = agency(&gw, &env, "nhs-guys").await;
    let c = raise_ok(&mut police, raise(&["school-oakfield"], "")).await;
    let id = c.concern_id.clone();
    let unknown = "c-0123456789abcdef0123456789abcdef";
    let ack = |concern_id: &str| AcknowledgeConcernRequest {
        concern_id: concern_id.into(),
        note: "A note that must not reach the log's reason.".into(),
    };
    let decide = |concern_id: &str| RecordDecisionRequest {
        concern_id: concern_id.into(),
        decision: Decision::EarlyHelp as i32,
        lead_practitioner: "A. Worker".into(),
        note: String::new(),
    };

    // The sender acknowledging its own concern.
    let err = police.acknowledge_concern(ack(&id)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let acks = entries_by(&gw, &env, AuditAction::ConcernAcknowledged, "police-met").await;
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert_denied(&acks[0], "police-met", &id, "NOT_RECIPIENT");
    assert_eq!(acks[0].subject_ref.len(), 64);

    // A recipient other than the front door deciding.
    let err = school.record_decision(decide(&id)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let decisions = entries_by(&gw, &env, AuditAction::ConcernDecided, "school-oakfield").await;
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_denied(&decisions[0], "school-oakfield", &id, "NOT_FRONT_DOOR");
    assert_eq!(decisions[0].target_agency_id, "police-met");

    // A non-party, and an unknown id: the same NOT_FOUND, both audited.
    for (attempt, not_party, missing) in [
        (
            AuditAction::ConcernAcknowledged,
            hospital.acknowledge_concern(ack(&id)).await.unwrap_err(),
            hospital
                .acknowledge_concern(ack(unknown))
                .await
                .unwrap_err(),
        ),
        (
            AuditAction::ConcernDecided,
            hospital.record_decision(decide(&id)).await.unwrap_err(),
            hospital.record_decision(decide(unknown)).await.unwrap_err(),
        ),
    ] {
        assert_eq!(not_party.code(), Code::NotFound, "{not_party:?}");
        assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
        assert_eq!(
            not_party.message().replace(&id, "ID"),
            missing.message().replace(unknown, "ID")
        );
        let denied = entries_by(&gw, &env, attempt, "nhs-guys").await;
        assert_eq!(denied.len(), 2, "{attempt:?}: {denied:?}");
        assert_denied(&denied[0], "nhs-guys", &id, "NOT_PARTY");
        assert_denied(&denied[1], "nhs-guys", unknown, "NOT_FOUND");
    }

    // Nothing was acknowledged or decided.
    let seen = police
        .get_concern(GetConcernRequest { concern_id: id })
        .await
        .unwrap()
        .into_inner()
        .concern
        .unwrap();
    assert!(seen.recipients.iter().all(|d| d.acknowledged_at.is_none()));
    assert_eq!(seen.decision, Decision::Unspecified as i32);
    gw.stop().await;
}

#[tokio::test]
async fn a_refusal_fails_closed_when_the_audit_log_cannot_be_written() {
    let env = Env::new();
    let gw = common::spawn_gateway(&env).await;
    let pid = gw.child.id().expect("pid");
    let mut police = agency_at(&env, gw.addr, "police-met").await;
    let mut school = agency_at(&env, gw.addr, "school-oakfield").await;
    let mut hospital = agency_at(&env, gw.addr, "nhs-guys").await;
    let c = raise_ok(&mut police, raise(&["school-oakfield"], "")).await;
    let id = c.concern_id.clone();

    // Every write past byte 1 of any file now fails with EFBIG, as on a full disk.
    common::set_fsize_limit(pid, "1:unlimited");
    let refusals = [
        hospital
            .get_concern(GetConcernRequest {
                concern_id: id.clone(),
            })
            .await
            .unwrap_err(),
        hospital
            .get_concern(GetConcernRequest {
                concern_id: "c-0123456789abcdef0123456789abcdef".into(),
            })
            .await
            .unwrap_err(),
        police
            .acknowledge_concern(AcknowledgeConcernRequest {
                concern_id: id.clone(),
                note: String::new(),
            })
            .await
            .unwrap_err(),
        school
            .record_decision(RecordDecisionRequest {
                concern_id: id.clone(),
                decision: Decision::EarlyHelp as i32,
                lead_practitioner: "A. Worker".into(),
                note: String::new(),
            })
            .await
            .unwrap_err(),
    ];
    for err in refusals {
        assert_eq!(
            err.code(),
            Code::Unavailable,
            "no refusal unaudited: {err:?}"
        );
    }

    // The disk recovers: the refusal is answered (and audited) again.
    common::set_fsize_limit(pid, "unlimited:unlimited");
    let mut last = None;
    for _ in 0..50 {
        let err = hospital
            .get_concern(GetConcernRequest {
                concern_id: id.clone(),
            })
            .await
            .unwrap_err();
        if err.code() == Code::NotFound {
            last = None;
            break;
        }
        last = Some(err);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last.is_none(), "still refused after recovery: {last:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_request_id_reused_with_different_content_is_refused_audited_and_raises_nothing() {
    let env = Env::new();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut school = agency(&gw, &env, "school-oakfield").await;
    let mut school_events = subscribe(&mut school, 0).await;
    let first = raise_ok(&mut police, raise(&["school-oakfield"], "incident-7")).await;
    assert_eq!(
        concern_of(&next(&mut school_events).await).concern_id,
        first.concern_id
    );

    let other_narrative = "A second incident, at school, a week later.";
    let reused = |change: &dyn Fn(&mut RaiseConcernRequest)| {
        let mut req = raise(&["school-oakfield"], "incident-7");
        change(&mut req);
        req
    };
    let variations = [
        (
            "subject",
            reused(&|r| r.subject.as_mut().unwrap().nhs_number = "4010232137".into()),
        ),
        (
            "category",
            reused(&|r| r.category = ConcernCategory::Neglect as i32),
        ),
        (
            "urgency",
            reused(&|r| r.urgency = Urgency::ImmediateRisk as i32),
        ),
        (
            "narrative",
            reused(&|r| r.narrative = other_narrative.into()),
        ),
        (
            "recipient_agency_ids",
            reused(&|r| r.recipient_agency_ids = vec!["nhs-guys".into()]),
        ),
    ];
    for (field, req) in variations {
        let err = police.raise_concern(req).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{field}: {err:?}");
        let message = err.message();
        for want in [
            format!(
                "request_id was already used for concern {}",
                first.concern_id
            ),
            format!("different content (different {field})"),
            "a new concern needs a new request_id".into(),
        ] {
            assert!(message.contains(&want), "{field}: {message}");
        }
        assert!(!message.contains(other_narrative), "{message}");
    }

    // Each refusal was audited DENIED before it was answered; only the first raise
    // is ALLOWED.
    let raised = entries_by(&gw, &env, AuditAction::ConcernRaised, "police-met").await;
    assert_eq!(raised.len(), 6, "{raised:?}");
    assert_eq!(raised[0].outcome, AuditOutcome::Allowed as i32);
    for entry in &raised[1..] {
        assert_denied(entry, "police-met", &first.concern_id, "REQUEST_ID_REUSED");
        assert!(!entry.reason.contains(other_narrative), "{entry:?}");
    }
    assert_eq!(raised[2].subject_ref, raised[0].subject_ref);
    assert_ne!(
        raised[1].subject_ref, raised[0].subject_ref,
        "the refused referral's child"
    );
    assert_eq!(raised[1].subject_ref.len(), 64);

    // Nothing reached anyone; the same request again is still the retry.
    quiet(&mut school_events, Duration::from_millis(300)).await;
    let mut hospital = agency(&gw, &env, "nhs-guys").await;
    assert!(inbox(&mut hospital).await.is_empty());
    let retry = raise_ok(&mut police, raise(&["school-oakfield"], "incident-7")).await;
    assert_eq!(retry.concern_id, first.concern_id);
    assert_eq!(
        entries_by(&gw, &env, AuditAction::ConcernRaised, "police-met")
            .await
            .len(),
        6,
        "a retry audits nothing"
    );
    gw.stop().await;
}

const DECISION_NOTE: &str = "Known family; threshold met for early help.";

/// A concern raised by the police and decided EARLY_HELP by the front door, lead
/// practitioner "A. Worker", note [`DECISION_NOTE`]; its id.
async fn decided_concern(police: &mut Client, front_door: &mut Client) -> String {
    let c = raise_ok(police, raise(&["school-oakfield"], "")).await;
    front_door
        .record_decision(decision_request(
            &c.concern_id,
            Decision::EarlyHelp,
            "A. Worker",
            DECISION_NOTE,
        ))
        .await
        .expect("the first decision");
    c.concern_id
}

fn decision_request(
    concern_id: &str,
    decision: Decision,
    lead: &str,
    note: &str,
) -> RecordDecisionRequest {
    RecordDecisionRequest {
        concern_id: concern_id.into(),
        decision: decision as i32,
        lead_practitioner: lead.into(),
        note: note.into(),
    }
}

#[tokio::test]
async fn a_different_decision_on_a_decided_concern_is_audited_denied_before_it_is_refused() {
    let env = Env::new();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut front_door = agency(&gw, &env, "csc-southwark").await;
    let id = decided_concern(&mut police, &mut front_door).await;

    // The same decision again changes nothing and audits nothing.
    front_door
        .record_decision(decision_request(
            &id,
            Decision::EarlyHelp,
            "A. Worker",
            DECISION_NOTE,
        ))
        .await
        .expect("the same decision again");
    let err = front_door
        .record_decision(decision_request(
            &id,
            Decision::ChildInNeed,
            "A. Worker",
            DECISION_NOTE,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let decided = entries_by(&gw, &env, AuditAction::ConcernDecided, "csc-southwark").await;
    assert_eq!(decided.len(), 2, "{decided:?}");
    assert_eq!(decided[0].outcome, AuditOutcome::Allowed as i32);
    assert_denied(&decided[1], "csc-southwark", &id, "ALREADY_DECIDED");
    assert_eq!(
        decided[1].reason,
        "ALREADY_DECIDED: different decision (answered FAILED_PRECONDITION)"
    );
    assert_eq!(decided[1].target_agency_id, "police-met");
    assert_eq!(decided[1].subject_ref, decided[0].subject_ref);

    let seen = police
        .get_concern(GetConcernRequest { concern_id: id })
        .await
        .unwrap()
        .into_inner()
        .concern
        .unwrap();
    assert_eq!(
        seen.decision,
        Decision::EarlyHelp as i32,
        "the first stands"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_repeated_decision_with_another_note_or_lead_practitioner_is_refused_saying_which() {
    let env = Env::new();
    let gw = env.start().await;
    let mut police = agency(&gw, &env, "police-met").await;
    let mut front_door = agency(&gw, &env, "csc-southwark").await;
    let id = decided_concern(&mut police, &mut front_door).await;
    let other_note = "Reconsidered after the strategy meeting.";

    for (lead, note, says, not_says) in [
        (
            "B. Worker",
            DECISION_NOTE,
            "this request's lead_practitioner differs from the recorded one",
            "note",
        ),
        (
            "A. Worker",
            "",
            "this request has no note and the recorded decision has one",
            "lead_practitioner",
        ),
        (
            "A. Worker",
            other_note,
            "this request's note differs from the recorded one",
            "lead_practitioner",
        ),
    ] {
        let err = front_door
            .record_decision(decision_request(&id, Decision::EarlyHelp, lead, note))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let message = err.message();
        assert!(
            message.starts_with(&format!(
                "concern {id} already has a decision (EARLY_HELP, recorded "
            )),
            "{message}"
        );
        assert!(message.contains(says), "{message}");
        assert!(
            message.ends_with("; a recorded decision is not changed"),
            "{message}"
        );
        assert!(!message.contains(not_says), "{message}");
        for text in [DECISION_NOTE, other_note, "A. Worker", "B. Worker"] {
            assert!(!message.contains(text), "quotes {text:?}: {message}");
        }
    }
    let denied: Vec<String> = entries_by(&gw, &env, AuditAction::ConcernDecided, "csc-southwark")
        .await
        .into_iter()
        .filter(|e| e.outcome == AuditOutcome::Denied as i32)
        .map(|e| e.reason)
        .collect();
    assert_eq!(
        denied,
        [
            "ALREADY_DECIDED: different lead_practitioner (answered FAILED_PRECONDITION)",
            "ALREADY_DECIDED: different note (answered FAILED_PRECONDITION)",
            "ALREADY_DECIDED: different note (answered FAILED_PRECONDITION)",
        ]
    );
    gw.stop().await;
}
