//! The foundation, end to end: mutual TLS, identities, roles, health, the dev set-up
//! and config validation, against a real gateway on loopback.
// Certificates for the tests are made at wall-clock time, like a real CA's.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{client_spec, connect, health, Env, TD};
use sgw::domain::Role;
use sgw::pki::{self, CertSpec, Eku};
use time::OffsetDateTime;
use tonic::Code;

const SERVING: i32 = 1;

#[tokio::test]
async fn health_answers_serving_to_an_agency_certificate() {
    let env = Env::new();
    let gw = env.start().await;
    let channel = gw.connect_as(&env, Role::Agency, "school-oakfield").await;
    assert_eq!(health(channel).await.expect("health"), SERVING);
    gw.stop().await;
}

/// How a bad client certificate must be refused.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Refusal {
    /// The TLS handshake fails: no call is served at all.
    Handshake,
    /// The handshake passes (the certificate is genuine) but it names no registered
    /// identity: UNAUTHENTICATED with a message containing the text.
    Unauthenticated(&'static str),
}

#[tokio::test]
async fn bad_client_certificates_are_refused() {
    let env = Env::new();
    let gw = env.start().await;
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let agency = || client_spec(Role::Agency, "police-met");

    let other_ca = pki::Ca::generate("someone else's CA", 30).expect("other CA");
    let expired = CertSpec {
        not_before: now - 10 * day,
        not_after: now - day,
        ..agency()
    };
    let not_yet_valid = CertSpec {
        not_before: now + day,
        not_after: now + 10 * day,
        ..agency()
    };
    let server_auth_only = CertSpec {
        eku: vec![Eku::ServerAuth],
        ..agency()
    };
    let no_eku = CertSpec {
        eku: vec![],
        ..agency()
    };
    let no_uri = CertSpec {
        uri_sans: vec![],
        ..agency()
    };
    let two_uris = CertSpec {
        uri_sans: vec![
            format!("spiffe://{TD}/agency/police-met"),
            format!("spiffe://{TD}/agency/school-oakfield"),
        ],
        ..agency()
    };
    let other_domain = CertSpec::client("elsewhere.example", Role::Agency, "police-met", 30);
    let unregistered = client_spec(Role::Agency, "police-nowhere");
    let unregistered_auditor = client_spec(Role::Auditor, "mallory");
    let unknown_role = CertSpec {
        uri_sans: vec![format!("spiffe://{TD}/admin/root")],
        ..agency()
    };

    let cases: Vec<(&str, pki::Issued, Refusal)> = vec![
        (
            "untrusted CA",
            other_ca.issue(&agency()).unwrap(),
            Refusal::Handshake,
        ),
        ("expired", env.issue(&expired), Refusal::Handshake),
        (
            "not yet valid",
            env.issue(&not_yet_valid),
            Refusal::Handshake,
        ),
        (
            "self-signed",
            pki::self_signed(&agency()).unwrap(),
            Refusal::Handshake,
        ),
        (
            "serverAuth only",
            env.issue(&server_auth_only),
            Refusal::Handshake,
        ),
        ("no EKU", env.issue(&no_eku), Refusal::Handshake),
        (
            "no URI SAN",
            env.issue(&no_uri),
            Refusal::Unauthenticated("no URI SAN"),
        ),
        (
            "two URI SANs",
            env.issue(&two_uris),
            Refusal::Unauthenticated("2 URI SANs"),
        ),
        (
            "another trust domain",
            env.issue(&other_domain),
            Refusal::Unauthenticated("elsewhere.example"),
        ),
        (
            "unregistered agency",
            env.issue(&unregistered),
            Refusal::Unauthenticated("not registered"),
        ),
        (
            "unregistered auditor",
            env.issue(&unregistered_auditor),
            Refusal::Unauthenticated("not registered"),
        ),
        (
            "unknown role",
            env.issue(&unknown_role),
            Refusal::Unauthenticated("admin"),
        ),
    ];

    for (name, issued, want) in cases {
        let outcome = match gw.connect(&issued.cert_pem, &issued.key_pem).await {
            Err(_) => Err(None),
            Ok(channel) => health(channel).await.map_err(Some),
        };
        match (want, outcome) {
            (_, Ok(status)) => panic!("{name}: served (health status {status})"),
            (Refusal::Handshake, Err(None)) => {}
            (Refusal::Handshake, Err(Some(status))) => assert_ne!(
                status.code(),
                Code::Unauthenticated,
                "{name}: the handshake should have failed, but a call was answered: {status:?}"
            ),
            (Refusal::Unauthenticated(text), Err(Some(status))) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
                assert!(
                    status.message().contains(text),
                    "{name}: message {:?} lacks {text:?}",
                    status.message()
                );
            }
            (Refusal::Unauthenticated(_), Err(None)) => {
                panic!("{name}: handshake failed; expected UNAUTHENTICATED")
            }
        }
    }

    // No client certificate at all.
    let outcome = match connect(gw.addr, &env.ca_pem(), None).await {
        Err(_) => None,
        Ok(channel) => Some(health(channel).await),
    };
    if let Some(result) = outcome {
        let status = result.expect_err("no client certificate must not be served");
        assert_ne!(status.code(), Code::Ok);
    }
    gw.stop().await;
}

#[tokio::test]
async fn roles_are_confined_to_their_services() {
    use sgw::proto::v1::audit_service_client::AuditServiceClient;
    use sgw::proto::v1::operations_service_client::OperationsServiceClient;
    use sgw::proto::v1::record_service_client::RecordServiceClient;
    use sgw::proto::v1::{GetCheckpointRequest, GetRecordRequest, GetTlsStatusRequest};

    let env = Env::new();
    let gw = env.start().await;

    let auditor = gw.connect_as(&env, Role::Auditor, "dpo").await;
    let err = RecordServiceClient::new(auditor)
        .get_record(GetRecordRequest::default())
        .await
        .expect_err("auditor must not read records");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("RecordService"), "{err:?}");

    let operator = gw.connect_as(&env, Role::Operator, "ops").await;
    let err = AuditServiceClient::new(operator)
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .expect_err("operator must not read the audit log");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let agency = gw.connect_as(&env, Role::Agency, "police-met").await;
    let err = OperationsServiceClient::new(agency)
        .get_tls_status(GetTlsStatusRequest::default())
        .await
        .expect_err("agency must not operate the gateway");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // And each role may reach its own service (whatever the method then answers).
    let auditor = gw.connect_as(&env, Role::Auditor, "dpo").await;
    let res = AuditServiceClient::new(auditor)
        .get_checkpoint(GetCheckpointRequest::default())
        .await;
    if let Err(e) = res {
        assert_ne!(e.code(), Code::PermissionDenied, "{e:?}");
        assert_ne!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    gw.stop().await;
}

/// Runs the real binary and returns its output.
fn sgw(args: &[&str], cwd: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sgw"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run sgw")
}

#[test]
fn cli_usage_errors_exit_2_and_errors_say_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (
            &["audit", "query", "--action", "NOPE"][..],
            "CONSENTS_LISTED",
        ),
        (&["audit", "query", "--since", "yesterday"][..], "RFC 3339"),
        (&["audit", "query", "--limit", "0"][..], "--limit"),
    ] {
        let out = sgw(args, dir.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let made = sgw(
        &["certs", "init", "--dir", "pki", "--trust-domain", TD],
        dir.path(),
    );
    assert!(made.status.success(), "{made:?}");
    // Nothing listens on port 1.
    let out = sgw(
        &[
            "audit",
            "query",
            "--addr",
            "127.0.0.1:1",
            "--ca",
            "pki/ca.pem",
            "--cert",
            "pki/auditor-dpo.pem",
            "--key",
            "pki/auditor-dpo.key",
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("sgw: cannot connect to 127.0.0.1:1"),
        "{err}"
    );
    assert_eq!(err.matches("tcp connect error").count(), 1, "{err}");
}

#[test]
fn config_with_unknown_key_fails_naming_it() {
    let env = Env::new();
    env.append_config("[limits]\nmax_mesage_bytes = 10\n");
    let out = sgw(
        &["serve", "--config", env.config_path().to_str().unwrap()],
        env.path(),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_mesage_bytes"), "stderr: {stderr}");
}

#[test]
fn config_with_duplicate_agency_fails_naming_it() {
    let env = Env::new();
    env.append_config("[[agency]]\nid = \"police-met\"\nsector = \"POLICE\"\nname = \"again\"\n");
    let out = sgw(
        &["serve", "--config", env.config_path().to_str().unwrap()],
        env.path(),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("police-met") && stderr.contains("duplicate"),
        "stderr: {stderr}"
    );
}

#[tokio::test]
async fn serve_dev_in_an_empty_folder_answers_its_own_dev_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sgw"))
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sgw serve --dev");
    let addr =
        common::wait_for_listen_line(child.stderr.take().unwrap(), Duration::from_secs(60)).await;

    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "agency-police-met.pem",
        "auditor-dpo.key",
        "operator-ops.pem",
    ] {
        assert!(dir.path().join("certs/dev").join(f).exists(), "{f} missing");
    }
    assert!(dir.path().join("sgw.dev.toml").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("certs/dev/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let pki_dir = dir.path().join("certs/dev");
    let read = |f: &str| std::fs::read_to_string(pki_dir.join(f)).unwrap();
    let channel = connect(
        addr,
        &read("ca.pem"),
        Some((&read("agency-nhs-guys.pem"), &read("agency-nhs-guys.key"))),
    )
    .await
    .expect("connect with the dev certificate");
    assert_eq!(health(channel).await.expect("health"), SERVING);

    common::terminate(&mut child).await;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_with_unavailable_and_exits_promptly() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let env = Env::new();
    let mut gw = common::spawn_gateway(&env).await;
    let (cert, key) = env.identity(Role::Agency, "school-oakfield");
    let channel = connect(gw.addr, &env.ca_pem(), Some((&cert, &key)))
        .await
        .unwrap();
    let mut stream = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    let started = std::time::Instant::now();
    common::terminate(&mut gw.child).await;
    let end = common::stream_end_status(
        &mut stream,
        Duration::from_secs(5),
        "the stream ends during the drain",
    )
    .await;
    let status = end;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    let exit = tokio::time::timeout(Duration::from_secs(5), gw.child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(exit.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "well inside the 10 s grace"
    );
}

/// GET a plain-HTTP path and return the whole response.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    sock.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn metrics_count_calls_and_audit_commits_on_their_own_listener() {
    let env = Env::new();
    env.append_config("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let gw = env.start().await;
    let metrics = gw.metrics.expect("metrics listener");
    let channel = gw.connect_as(&env, Role::Agency, "school-oakfield").await;
    assert_eq!(health(channel).await.unwrap(), SERVING);
    let mut auditor = sgw::proto::v1::audit_service_client::AuditServiceClient::new(
        gw.connect_as(&env, Role::Auditor, "dpo").await,
    );
    auditor
        .get_checkpoint(sgw::proto::v1::GetCheckpointRequest {})
        .await
        .unwrap();
    // One inbox subscription, caught up with its empty inbox.
    let _inbox = sgw::proto::v1::concern_service_client::ConcernServiceClient::new(
        gw.connect_as(&env, Role::Agency, "school-oakfield").await,
    )
    .subscribe_inbox(sgw::proto::v1::SubscribeInboxRequest { after_cursor: 0 })
    .await
    .unwrap();
    let body = http_get(metrics, "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    for gauge in [
        "sgw_inbox_subscriptions 1\n",
        "sgw_inbox_lag_events 0\n",
        "sgw_inbox_backlog_events 0\n",
        "sgw_inbox_lag_seconds 0\n",
    ] {
        assert!(body.contains(gauge), "{gauge} in {body}");
    }
    assert!(
        body.contains("sgw_calls_total{method=\"/grpc.health.v1.Health/Check\",code=\"Ok\"} 1"),
        "{body}"
    );
    assert!(body.contains("sgw_call_duration_seconds_count{method=\"/safeguard.v1.AuditService/GetCheckpoint\"} 1"), "{body}");
    assert!(body.contains("sgw_audit_entries_total 1"), "{body}");
    assert!(body.contains("sgw_audit_group_entries_sum 1\n"), "{body}");
    assert!(body.contains("sgw_audit_commits_total"), "{body}");
    // No round of the write-ahead file has ended yet.
    assert!(body.contains("sgw_audit_round_ends_total 0\n"), "{body}");
    assert!(
        body.contains("sgw_audit_round_end_max_seconds 0\n"),
        "{body}"
    );
    // Nothing else is served there, and the gRPC port does not serve metrics.
    assert!(http_get(metrics, "/").await.starts_with("HTTP/1.1 404"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_more_than_its_share_of_handshakes() {
    use tokio::io::AsyncReadExt;
    let env = Env::new();
    env.append_config("[limits]\nmax_handshakes_per_ip = 2\nhandshake_timeout = \"60s\"\n");
    let gw = env.start().await;
    // Two connections that never say hello hold this address's two turns.
    let silent: Vec<tokio::net::TcpStream> = vec![
        tokio::net::TcpStream::connect(gw.addr).await.unwrap(),
        tokio::net::TcpStream::connect(gw.addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third is closed at once, not after the 60 s handshake timeout.
    let mut third = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut byte))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // Once they go, the address may connect again.
    drop(silent);
    let (cert, key) = env.identity(Role::Agency, "police-met");
    let mut served = false;
    for _ in 0..50 {
        if let Ok(channel) = gw.connect(&cert, &key).await {
            served = health(channel).await.is_ok();
            if served {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served,
        "a genuine client is served once the silent ones are gone"
    );
    gw.stop().await;
}

/// The counts of `method`'s calls by code, from the gateway's `/metrics`.
async fn calls_by_code(metrics: std::net::SocketAddr, method: &str) -> Vec<(String, u64)> {
    let body = http_get(metrics, "/metrics").await;
    let prefix = format!("sgw_calls_total{{method=\"{method}\",code=\"");
    body.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (code, count) = rest.split_once("\"} ")?;
            Some((code.to_owned(), count.trim().parse().ok()?))
        })
        .collect()
}

fn raise_request(request_id: String) -> sgw::proto::v1::RaiseConcernRequest {
    sgw::proto::v1::RaiseConcernRequest {
        subject: Some(sgw::proto::v1::Subject {
            nhs_number: "943 476 5919".into(),
        }),
        category: sgw::proto::v1::ConcernCategory::Neglect as i32,
        urgency: sgw::proto::v1::Urgency::Urgent as i32,
        narrative: "Seen at school with an untreated injury.".into(),
        recipient_agency_ids: vec!["school-oakfield".into()],
        request_id,
    }
}

#[tokio::test]
async fn a_request_over_the_message_limit_is_resource_exhausted_naming_it_and_changes_nothing() {
    let env = Env::new();
    env.append_config(
        "[limits]\nmax_message_bytes = 200000\nmax_content_bytes = 100000\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let gw = env.start().await;
    let metrics = gw.metrics.expect("metrics listener");
    let mut hospital = sgw::proto::v1::record_service_client::RecordServiceClient::new(
        gw.connect_as(&env, Role::Agency, "nhs-guys").await,
    )
    .max_encoding_message_size(usize::MAX);
    let err = hospital
        .share_record(sgw::proto::v1::ShareRecordRequest {
            subject: Some(sgw::proto::v1::Subject {
                nhs_number: "943 476 5919".into(),
            }),
            category: sgw::proto::v1::RecordCategory::UnscheduledCareAttendance as i32,
            summary: "A&E attendance".into(),
            content: vec![b'x'; 250_000],
            media_type: "text/plain".into(),
            retain_until: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        err.message(),
        "the request is larger than limits.max_message_bytes (200000 bytes)"
    );
    let body = http_get(metrics, "/metrics").await;
    assert!(
        body.contains("sgw_audit_entries_total 0\n"),
        "nothing was audited or stored: {body}"
    );
    assert_eq!(
        calls_by_code(metrics, "/safeguard.v1.RecordService/ShareRecord").await,
        vec![("ResourceExhausted".to_owned(), 1)]
    );
    // Health (and reflection) keep the same limit, not tonic's default of 4 MiB.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        gw.connect_as(&env, Role::Agency, "nhs-guys").await,
    )
    .max_encoding_message_size(usize::MAX);
    let err = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "s".repeat(250_000),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    gw.stop().await;
}

/// Sends RaiseConcerns 16 at once, each made by `request`, until some fail or 50
/// rounds have passed. Returns the calls sent and the failures.
async fn raise_until_some_fail(
    police: &sgw::proto::v1::concern_service_client::ConcernServiceClient<
        tonic::transport::Channel,
    >,
    request: impl Fn(String) -> tonic::Request<sgw::proto::v1::RaiseConcernRequest>,
) -> (u64, Vec<tonic::Status>) {
    let (mut sent, mut failed) = (0, Vec::new());
    for round in 0..50 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..16 {
            let mut client = police.clone();
            let req = request(format!("t-{round}-{i}"));
            calls.spawn(async move { client.raise_concern(req).await });
        }
        for answer in calls.join_all().await {
            sent += 1;
            failed.extend(answer.err());
        }
        if !failed.is_empty() {
            break;
        }
    }
    (sent, failed)
}

/// Waits until `/metrics` counts `sent` calls of `method` (the last ones may still
/// be finishing), and returns the counts by code.
async fn counted_calls(
    metrics: std::net::SocketAddr,
    method: &str,
    sent: u64,
) -> Vec<(String, u64)> {
    let mut counted = calls_by_code(metrics, method).await;
    for _ in 0..100 {
        if counted.iter().map(|(_, n)| n).sum::<u64>() >= sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        counted = calls_by_code(metrics, method).await;
    }
    counted
}

const RAISE_CONCERN: &str = "/safeguard.v1.ConcernService/RaiseConcern";

/// Calls past `limits.request_timeout` answer DEADLINE_EXCEEDED naming it (tonic's
/// own timeout said CANCELLED), and each is logged and counted.
#[tokio::test]
async fn calls_past_the_request_timeout_are_deadline_exceeded_naming_it_and_counted() {
    let env = Env::new();
    env.append_config(
        "[limits]\nrequest_timeout = \"1ms\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let gw = env.start().await;
    let metrics = gw.metrics.expect("metrics listener");
    let police = sgw::proto::v1::concern_service_client::ConcernServiceClient::new(
        gw.connect_as(&env, Role::Agency, "police-met").await,
    );
    // A raise waits for two durable writes (the audit entry, then the concern):
    // nearly always longer than a millisecond, and always with 16 at once.
    let (sent, failed) =
        raise_until_some_fail(&police, |id| tonic::Request::new(raise_request(id))).await;
    assert!(!failed.is_empty(), "none of {sent} raises took over 1 ms");
    for status in &failed {
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert_eq!(
            status.message(),
            "the call did not finish within limits.request_timeout (1ms); what it started may still complete"
        );
    }
    let counted = counted_calls(metrics, RAISE_CONCERN, sent).await;
    let ok = (sent - failed.len() as u64) as usize;
    let mut want = vec![("DeadlineExceeded".to_owned(), failed.len() as u64)];
    if ok > 0 {
        want.insert(0, ("Ok".to_owned(), ok as u64));
    }
    let mut counted_sorted = counted.clone();
    counted_sorted.sort();
    want.sort();
    assert_eq!(counted_sorted, want, "every call counted once, by its code");
    gw.stop().await;
}

/// A call whose client gives up first (its own deadline) is dropped by the server
/// before it answers: it is still logged and counted, as CANCELLED.
#[tokio::test]
async fn a_call_whose_client_gives_up_is_still_counted() {
    let env = Env::new();
    env.append_config("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let gw = env.start().await;
    let metrics = gw.metrics.expect("metrics listener");
    let police = sgw::proto::v1::concern_service_client::ConcernServiceClient::new(
        gw.connect_as(&env, Role::Agency, "police-met").await,
    );
    // Clients that give up after a microsecond, 16 at a time, until the server has
    // seen one of them go while its call ran. A stream reset before the server
    // accepted it never reaches the service, so rounds may pass without one.
    let mut sent = 0;
    let mut counted = Vec::new();
    for _ in 0..50 {
        let (n, _) = raise_until_some_fail(&police, |id| {
            let mut request = tonic::Request::new(raise_request(id));
            request.set_timeout(Duration::from_micros(1));
            request
        })
        .await;
        sent += n;
        for _ in 0..25 {
            counted = calls_by_code(metrics, RAISE_CONCERN).await;
            if counted.iter().any(|(code, _)| code == "Cancelled") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if counted.iter().any(|(code, _)| code == "Cancelled") {
            break;
        }
    }
    assert!(
        counted.iter().map(|(_, n)| n).sum::<u64>() <= sent,
        "no call is counted twice: {counted:?}"
    );
    assert!(
        counted
            .iter()
            .any(|(code, n)| code == "Cancelled" && *n > 0),
        "{counted:?}"
    );
    gw.stop().await;
}

const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn loopback(last: u8) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, last))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_no_http2_preface_is_closed_and_frees_its_slot() {
    let env = Env::new();
    env.append_config(
        "[limits]\nmax_connections = 2\nmax_handshakes = 2\npreface_timeout = \"1s\"\n",
    );
    let gw = env.start().await;
    let (cert, key) = env.identity(Role::Agency, "police-met");
    // Two connections that complete mutual TLS, then send nothing at all, hold
    // both slots (as `openssl s_client -alpn h2` does).
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(
            common::silent_tls(LOOPBACK, gw.addr, &env.ca_pem(), &cert, &key)
                .await
                .expect("handshake"),
        );
    }
    // The gateway closes each once its preface is overdue...
    for conn in &mut silent {
        assert!(
            common::closed_by_server(conn, Duration::from_secs(30)).await,
            "a connection that sent no preface is closed"
        );
    }
    // ...and so another agency is served, while the silent clients still hold
    // their (closed) sockets.
    let channel = gw.connect_as(&env, Role::Agency, "school-oakfield").await;
    assert_eq!(health(channel).await.expect("health"), SERVING);
    drop(silent);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_cannot_hold_more_than_its_share_of_connections() {
    let env = Env::new();
    env.append_config("[limits]\nmax_connections = 8\nmax_connections_per_identity = 2\n");
    let gw = env.start().await;
    let (cert, key) = env.identity(Role::Agency, "police-met");
    let first = gw.connect(&cert, &key).await.expect("first connection");
    let second = gw.connect(&cert, &key).await.expect("second connection");
    assert_eq!(health(first.clone()).await.expect("health"), SERVING);
    assert_eq!(health(second.clone()).await.expect("health"), SERVING);

    // A third of the same identity is closed right after its handshake, without
    // waiting for a preface (this one would never send one).
    match common::silent_tls(LOOPBACK, gw.addr, &env.ca_pem(), &cert, &key).await {
        Ok(mut third) => assert!(
            common::closed_by_server(&mut third, Duration::from_secs(10)).await,
            "a connection beyond max_connections_per_identity is closed at once"
        ),
        // The close may overtake the end of the client's side of the handshake.
        Err(e) => eprintln!("third connection failed in its handshake: {e}"),
    }
    let third = gw.connect(&cert, &key).await;
    let refused = match third {
        Ok(channel) => health(channel).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a third connection of police-met is not served");

    // Other identities are not affected.
    let other = gw.connect_as(&env, Role::Agency, "school-oakfield").await;
    assert_eq!(health(other).await.expect("health"), SERVING);
    // The two still work, and once one goes the identity may connect again.
    assert_eq!(health(second).await.expect("health"), SERVING);
    drop(first);
    assert!(
        common::served_soon(&gw, &cert, &key).await,
        "police-met connects again once one of its connections closes"
    );
    gw.stop().await;
}

/// Revokes `cert` as the operator, "laptop stolen"; returns the operator's client,
/// whose connection stays open while it is kept.
async fn revoke_as_operator(
    gw: &common::Gateway,
    env: &Env,
    cert: &pki::Issued,
) -> sgw::proto::v1::operations_service_client::OperationsServiceClient<tonic::transport::Channel> {
    let mut ops = sgw::proto::v1::operations_service_client::OperationsServiceClient::new(
        gw.connect_as(env, Role::Operator, "ops").await,
    );
    ops.revoke_certificate(sgw::proto::v1::RevokeCertificateRequest {
        serial_hex: cert.serial_hex.clone(),
        reason: "laptop stolen".into(),
    })
    .await
    .expect("revoke");
    ops
}

/// `n` connections of `cert`, each served a health check.
async fn served_connections(
    gw: &common::Gateway,
    cert: &pki::Issued,
    n: usize,
) -> Vec<tonic::transport::Channel> {
    let mut held = Vec::new();
    for _ in 0..n {
        let channel = gw
            .connect(&cert.cert_pem, &cert.key_pem)
            .await
            .expect("connect");
        assert_eq!(health(channel.clone()).await.expect("health"), SERVING);
        held.push(channel);
    }
    held
}

/// After a theft: the stolen certificate's connections stay open (the thief
/// keeps them), the operator revokes it, and the agency's new certificate is
/// served. Revoked connections do not count against the identity.
#[tokio::test]
async fn a_revoked_certificates_open_connections_do_not_keep_its_agency_out() {
    let env = Env::new();
    env.append_config("[limits]\nmax_connections = 8\nmax_connections_per_identity = 2\n");
    let gw = env.start().await;
    let stolen = env.issue(&client_spec(Role::Agency, "police-met"));
    let held = served_connections(&gw, &stolen, 2).await;
    let _ops = revoke_as_operator(&gw, &env, &stolen).await;
    let fresh = env.issue(&client_spec(Role::Agency, "police-met"));
    assert!(
        common::served_soon(&gw, &fresh.cert_pem, &fresh.key_pem).await,
        "the new certificate is served while the revoked one's connections are open"
    );
    drop(held);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificates_connections_are_closed_after_its_streams_are_told() {
    let env = Env::new();
    // The stolen certificate's two connections and the operator's fill the gateway.
    // (max_handshakes would default to 1, half of max_connections.)
    env.append_config("[limits]\nmax_connections = 3\nmax_handshakes = 3\n");
    let gw = env.start().await;
    let stolen = env.issue(&client_spec(Role::Agency, "police-met"));
    let held = served_connections(&gw, &stolen, 2).await;
    let mut inbox =
        sgw::proto::v1::concern_service_client::ConcernServiceClient::new(held[0].clone())
            .subscribe_inbox(sgw::proto::v1::SubscribeInboxRequest { after_cursor: 0 })
            .await
            .expect("subscribe")
            .into_inner();
    let revoked_at = std::time::Instant::now();
    let _ops = revoke_as_operator(&gw, &env, &stolen).await;

    // Its stream is told why before the connection goes.
    let ended = common::stream_end_status(
        &mut inbox,
        Duration::from_secs(1),
        "the inbox stream ends within a second",
    )
    .await;
    assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("revoked"), "{ended:?}");

    // Then both its connections are closed, idle or not, which frees both slots
    // for others at once.
    let mut others = Vec::new();
    for agency in ["school-oakfield", "nhs-guys"] {
        let fresh = env.issue(&client_spec(Role::Agency, agency));
        others.push(
            common::served_channel(&gw, &fresh.cert_pem, &fresh.key_pem)
                .await
                .unwrap_or_else(|| panic!("{agency} is served once the slots are free")),
        );
    }
    assert!(
        revoked_at.elapsed() >= sgw::tls::REVOKED_GRACE,
        "not before the grace"
    );
    drop((held, others));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificates_connections_are_closed_too() {
    let env = Env::new();
    env.append_config("[limits]\nmax_connections = 2\nmax_handshakes = 2\n");
    let gw = env.start().await;
    let mut spec = client_spec(Role::Agency, "school-oakfield");
    spec.not_after =
        sgw::domain::Clock::now(&sgw::domain::SystemClock) + time::Duration::seconds(2);
    let short = env.issue(&spec);
    let held = served_connections(&gw, &short, 2).await;
    // Both slots are the short-lived certificate's until it expires and its
    // connections are closed, a grace later.
    let fresh = env.issue(&client_spec(Role::Agency, "police-met"));
    assert!(
        common::served_soon(&gw, &fresh.cert_pem, &fresh.key_pem).await,
        "a new client is served once the expired certificate's connections are closed"
    );
    drop(held);
    gw.stop().await;
}

/// A client that kept the TLS session of a certificate since revoked resumes it
/// without presenting the certificate again; the gateway refuses the connection
/// all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_cannot_come_back_by_resuming_its_tls_session() {
    let env = Env::new();
    let gw = env.start().await;
    let stolen = env.issue(&client_spec(Role::Agency, "police-met"));
    let config = resuming_client(&env, &stolen);
    let (_, answer) = h2_hello(gw.addr, &config).await;
    assert!(matches!(answer, Ok(n) if n > 0), "served: {answer:?}");
    let _ops = revoke_as_operator(&gw, &env, &stolen).await;
    let (kind, answer) = h2_hello(gw.addr, &config).await;
    assert_eq!(
        kind,
        Some(rustls::HandshakeKind::Resumed),
        "the client resumed its session"
    );
    assert!(
        !matches!(answer, Ok(n) if n > 0),
        "no HTTP/2 answer on a resumed session of a revoked certificate: {answer:?}"
    );
    gw.stop().await;
}

/// A rustls client of `cert` that keeps its TLS sessions to resume them, as
/// rustls and tonic do by default.
fn resuming_client(env: &Env, cert: &pki::Issued) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(env.ca_pem().as_bytes()) {
        roots.add(ca.expect("CA")).expect("root");
    }
    let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("chain");
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key");
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    std::sync::Arc::new(config)
}

/// Connects with `config`, sends the HTTP/2 preface and an empty SETTINGS frame,
/// and reads the server's first bytes. Returns how the handshake went (`None` if
/// it failed) and what the read gave: `Ok(n > 0)` when the server answered.
async fn h2_hello(
    addr: std::net::SocketAddr,
    config: &std::sync::Arc<rustls::ClientConfig>,
) -> (Option<rustls::HandshakeKind>, std::io::Result<usize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = match connector.connect(name, tcp).await {
        Ok(tls) => tls,
        Err(e) => return (None, Err(e)),
    };
    let kind = tls.get_ref().1.handshake_kind();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    if let Err(e) = tls.write_all(&hello).await {
        return (kind, Err(e));
    }
    let _ = tls.flush().await;
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("no answer in 5 s")));
    (kind, read)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_are_capped_across_all_addresses() {
    let env = Env::new();
    env.append_config("[limits]\nmax_handshakes = 2\nhandshake_timeout = \"60s\"\n");
    let gw = env.start().await;
    // Two hosts, one silent TCP connection each, hold both handshake turns; no one
    // address is near max_handshakes_per_ip (64).
    let silent = vec![
        common::tcp_from(loopback(2), gw.addr).await,
        common::tcp_from(loopback(3), gw.addr).await,
    ];
    // A third host's connection is closed at once, not after the 60 s timeout.
    // The gateway accepts connections in the order they arrive, so the first two
    // hold their turns by the time it sees this one.
    let mut third = common::tcp_from(loopback(4), gw.addr).await;
    assert!(
        common::closed_by_server(&mut third, Duration::from_secs(10)).await,
        "a connection beyond max_handshakes is closed at once"
    );
    drop(silent);
    let (cert, key) = env.identity(Role::Agency, "police-met");
    assert!(
        common::served_soon(&gw, &cert, &key).await,
        "a genuine client is served once the silent ones are gone"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_clients_of_a_dual_stack_listener_are_counted_by_their_own_address() {
    // Hosts without IPv6, or where [::] takes IPv6 only (bindv6only), cannot run it.
    let dual_stack = std::net::TcpListener::bind("[::]:0").and_then(|l| {
        let port = l.local_addr()?.port();
        std::net::TcpStream::connect((LOOPBACK, port))
    });
    if let Err(e) = dual_stack {
        eprintln!("skipped: no dual-stack listener on this host ({e})");
        return;
    }
    let env = Env::new();
    let text = std::fs::read_to_string(env.config_path()).expect("config");
    std::fs::write(
        env.config_path(),
        text.replace("listen = \"127.0.0.1:0\"", "listen = \"[::]:0\""),
    )
    .expect("config");
    env.append_config("[limits]\nmax_handshakes_per_ip = 2\nhandshake_timeout = \"60s\"\n");
    let gw = env.start().await;
    let to = std::net::SocketAddr::new(LOOPBACK, gw.addr.port());
    // 127.0.0.2 arrives as ::ffff:127.0.0.2 and uses up its own two turns...
    let _silent = [
        common::tcp_from(loopback(2), to).await,
        common::tcp_from(loopback(2), to).await,
    ];
    let mut third = common::tcp_from(loopback(2), to).await;
    assert!(
        common::closed_by_server(&mut third, Duration::from_secs(10)).await,
        "a third connection from 127.0.0.2 is closed at once"
    );
    // ...but not those of 127.0.0.3, although every IPv4-mapped address shares one
    // IPv6 /64.
    let (cert, key) = env.identity(Role::Agency, "police-met");
    let conn = common::silent_tls(loopback(3), to, &env.ca_pem(), &cert, &key).await;
    assert!(conn.is_ok(), "127.0.0.3 completes its handshake: {conn:?}");
    gw.stop().await;
}
