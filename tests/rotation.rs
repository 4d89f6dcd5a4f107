//! Certificate rotation: SIGHUP re-reads the TLS files without a restart, new
//! handshakes see the new server certificate, open connections carry on, and every
//! reload is audited.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Env;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sgw::domain::Role;
use sgw::proto::v1::audit_service_client::AuditServiceClient;
use sgw::proto::v1::*;

/// The serial of the certificate the gateway presents to a new handshake.
async fn served_serial(env: &Env, addr: std::net::SocketAddr) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(env.ca_pem().as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let (cert, key) = env.identity(Role::Agency, "police-met");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    sgw::tls::summarise(&leaf).unwrap().serial_hex
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_server_certificate_and_is_audited() {
    let env = Env::new();
    // Only the signal may reload here.
    env.set_tls_watch(false);
    let gw = common::spawn_gateway(&env).await;
    let before = served_serial(&env, gw.addr).await;

    // An auditor connection opened before the rotation keeps working after it.
    let (cert, key) = env.identity(Role::Auditor, "dpo");
    let channel = common::connect(gw.addr, &env.ca_pem(), Some((&cert, &key)))
        .await
        .unwrap();
    let mut auditor = AuditServiceClient::new(channel);
    auditor
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .expect("before");

    let renewed = sgw::pki::renew_server(&env.pki_dir(), 30, &[], &[]).expect("renew");
    assert_ne!(renewed.serial_hex, before);
    let pid = gw.child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();

    let mut after = before.clone();
    for _ in 0..50 {
        after = served_serial(&env, gw.addr).await;
        if after != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        after, renewed.serial_hex,
        "new handshakes see the renewed certificate"
    );

    auditor
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .expect("open connection carries on");
    let reloads = auditor
        .query_disclosures(QueryDisclosuresRequest {
            action: AuditAction::TlsReloaded as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(reloads.len(), 1, "{reloads:?}");
    assert_eq!(reloads[0].actor_id, "system");
    assert_eq!(reloads[0].object_id, renewed.serial_hex);

    // A broken file changes nothing: the renewed certificate stays in force.
    std::fs::write(env.pki_dir().join("server.pem"), "not a certificate").unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served_serial(&env, gw.addr).await, renewed.serial_hex);
    auditor
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .expect("still serving");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_is_picked_up_without_a_signal() {
    let env = Env::new();
    let gw = env.start().await;
    let before = served_serial(&env, gw.addr).await;
    let renewed = sgw::pki::renew_server(&env.pki_dir(), 30, &[], &[]).expect("renew");
    let mut after = before.clone();
    for _ in 0..100 {
        after = served_serial(&env, gw.addr).await;
        if after != before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        after, renewed.serial_hex,
        "the watcher reloads the renewed certificate"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_reload_and_read_tls_status_and_a_broken_file_changes_nothing() {
    use sgw::proto::v1::operations_service_client::OperationsServiceClient;
    let env = Env::new();
    env.set_tls_watch(false);
    let gw = env.start().await;
    let mut ops = OperationsServiceClient::new(gw.connect_as(&env, Role::Operator, "ops").await);
    let status = ops
        .get_tls_status(GetTlsStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(
        status.server_cert_serial,
        served_serial(&env, gw.addr).await
    );
    assert!(status.server_days_until_expiry > 300, "{status:?}");
    assert_eq!(status.client_cas.len(), 1);

    // A key that does not match its certificate: FAILED_PRECONDITION naming the file.
    let renewed = sgw::pki::renew_server(&env.pki_dir(), 30, &[], &[]).expect("renew");
    let stray = sgw::pki::Ca::generate("stray", 30).unwrap();
    std::fs::write(env.pki_dir().join("server.key"), stray.key_pem()).unwrap();
    let err = ops
        .reload_tls(ReloadTlsRequest {})
        .await
        .expect_err("mismatched key");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("server.key"), "{err:?}");
    assert_eq!(
        served_serial(&env, gw.addr).await,
        status.server_cert_serial,
        "unchanged"
    );

    // A certificate that does not parse.
    std::fs::write(
        env.pki_dir().join("server.pem"),
        "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = ops
        .reload_tls(ReloadTlsRequest {})
        .await
        .expect_err("broken certificate");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("server.pem"), "{err:?}");

    // Fixed: the reload goes through and the status shows the new certificate.
    let good = sgw::pki::renew_server(&env.pki_dir(), 30, &[], &[]).expect("renew");
    assert_ne!(good.serial_hex, renewed.serial_hex);
    let status = ops
        .reload_tls(ReloadTlsRequest {})
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.server_cert_serial, good.serial_hex);
    assert!(status.server_days_until_expiry <= 30);
    assert_eq!(served_serial(&env, gw.addr).await, good.serial_hex);

    // Both refusals and the reload are in the audit log.
    let mut auditor = AuditServiceClient::new(gw.connect_as(&env, Role::Auditor, "dpo").await);
    let reloads = auditor
        .query_disclosures(QueryDisclosuresRequest {
            action: AuditAction::TlsReloaded as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let outcomes: Vec<i32> = reloads.iter().map(|e| e.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            AuditOutcome::Denied as i32,
            AuditOutcome::Denied as i32,
            AuditOutcome::Allowed as i32
        ]
    );
    assert!(reloads.iter().all(|e| e.actor_id == "ops"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agency_is_cut_off_at_once_and_after_a_restart() {
    use sgw::proto::v1::operations_service_client::OperationsServiceClient;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let env = Env::new();
    let gw = common::spawn_gateway(&env).await;
    let ca = env.ca_pem();
    let (police_cert, police_key) = env.identity(Role::Agency, "police-met");
    let (school_cert, school_key) = env.identity(Role::Agency, "school-oakfield");
    let police = common::connect(gw.addr, &ca, Some((&police_cert, &police_key)))
        .await
        .unwrap();
    let school = common::connect(gw.addr, &ca, Some((&school_cert, &school_key)))
        .await
        .unwrap();
    let mut police_health = HealthClient::new(police.clone());
    let mut stream = police_health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    assert!(stream.message().await.expect("first status").is_some());
    let mut police_inbox =
        sgw::proto::v1::concern_service_client::ConcernServiceClient::new(police.clone())
            .subscribe_inbox(SubscribeInboxRequest { after_cursor: 0 })
            .await
            .expect("subscribe")
            .into_inner();

    let (ops_cert, ops_key) = env.identity(Role::Operator, "ops");
    let ops_channel = common::connect(gw.addr, &ca, Some((&ops_cert, &ops_key)))
        .await
        .unwrap();
    let mut ops = OperationsServiceClient::new(ops_channel);
    let err = ops
        .revoke_certificate(RevokeCertificateRequest {
            serial_hex: "not hex".into(),
            reason: "x".into(),
        })
        .await
        .expect_err("bad serial");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let serial = sgw::pki::serial_hex_of_pem(&police_cert).unwrap();
    let status = ops
        .revoke_certificate(RevokeCertificateRequest {
            serial_hex: serial.to_uppercase(),
            reason: "laptop stolen".into(),
        })
        .await
        .expect("revoke")
        .into_inner()
        .status
        .unwrap();
    assert!(status.revoked_serials.contains(&serial), "{status:?}");

    // The open stream ends with UNAUTHENTICATED within a second.
    let ended = common::stream_end_status(
        &mut stream,
        Duration::from_secs(1),
        "the stream ends within a second",
    )
    .await;
    let err = ended;
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("revoked"), "{err:?}");

    // Its inbox stream ends the same way.
    let inbox_end = common::stream_end_status(
        &mut police_inbox,
        Duration::from_secs(1),
        "the inbox stream ends within a second",
    )
    .await;
    assert_eq!(inbox_end.code(), tonic::Code::Unauthenticated);

    // The next call on the open connection is refused; others carry on.
    let err = police_health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("revoked");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    HealthClient::new(school.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("the school is unaffected");

    // A new connection is refused at the handshake.
    let fresh = match common::connect(gw.addr, &ca, Some((&police_cert, &police_key))).await {
        Err(_) => None,
        Ok(ch) => Some(common::health(ch).await),
    };
    if let Some(result) = fresh {
        let err = result.expect_err("new connection refused");
        assert_ne!(err.code(), tonic::Code::Ok);
    }

    // After a restart it is still refused, and the revocation is in the audit log.
    gw.stop().await;
    let gw = common::spawn_gateway(&env).await;
    let again = match common::connect(gw.addr, &ca, Some((&police_cert, &police_key))).await {
        Err(_) => None,
        Ok(ch) => Some(common::health(ch).await),
    };
    if let Some(result) = again {
        assert!(result.is_err(), "still refused after a restart");
    }
    let school = common::connect(gw.addr, &ca, Some((&school_cert, &school_key)))
        .await
        .unwrap();
    assert_eq!(common::health(school).await.unwrap(), 1);
    let (cert, key) = env.identity(Role::Auditor, "dpo");
    let mut auditor = AuditServiceClient::new(
        common::connect(gw.addr, &ca, Some((&cert, &key)))
            .await
            .unwrap(),
    );
    let entries = auditor
        .query_disclosures(QueryDisclosuresRequest {
            action: AuditAction::CertificateRevoked as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].object_id, serial);
    assert_eq!(entries[0].actor_id, "ops");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ca_rollover_admits_the_new_ca_then_drops_the_old_one() {
    use sgw::pki::{Ca, CertSpec};
    use sgw::proto::v1::operations_service_client::OperationsServiceClient;

    let env = Env::new();
    env.set_tls_watch(false);
    let gw = env.start().await;
    let old_ca_pem = env.ca_pem();
    let new_ca = Ca::generate("agency CA 2027", 365).unwrap();
    let from_new = new_ca
        .issue(&CertSpec::client(common::TD, Role::Agency, "nhs-guys", 30))
        .unwrap();
    let refused = |r: Result<i32, tonic::Status>| r.is_err();

    // Before the rollover, the new CA's client is refused.
    let before = match gw.connect(&from_new.cert_pem, &from_new.key_pem).await {
        Err(_) => true,
        Ok(ch) => refused(common::health(ch).await),
    };
    assert!(before, "a client of an untrusted CA must be refused");

    // Add the new CA to the bundle and reload: both CAs' clients are admitted.
    let bundle = env.pki_dir().join("ca.pem");
    std::fs::write(&bundle, format!("{old_ca_pem}{}", new_ca.cert_pem())).unwrap();
    let mut ops = OperationsServiceClient::new(gw.connect_as(&env, Role::Operator, "ops").await);
    let status = ops
        .reload_tls(ReloadTlsRequest {})
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.client_cas.len(), 2);
    let ch = gw
        .connect(&from_new.cert_pem, &from_new.key_pem)
        .await
        .expect("new CA admitted");
    assert_eq!(common::health(ch).await.unwrap(), 1);
    let (old_cert, old_key) = env.identity(Role::Agency, "police-met");
    let old_open = gw.connect(&old_cert, &old_key).await.unwrap();
    assert_eq!(common::health(old_open.clone()).await.unwrap(), 1);

    // Remove the old CA: its clients are refused on new connections.
    std::fs::write(&bundle, new_ca.cert_pem()).unwrap();
    // The operator's own certificate comes from the old CA, so reload over the
    // connection it already has: open connections carry on.
    let status = ops
        .reload_tls(ReloadTlsRequest {})
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.client_cas.len(), 1);
    let old_new_conn = match gw.connect(&old_cert, &old_key).await {
        Err(_) => true,
        Ok(ch) => refused(common::health(ch).await),
    };
    assert!(
        old_new_conn,
        "the old CA's client is refused on a new connection"
    );
    let ch = gw
        .connect(&from_new.cert_pem, &from_new.key_pem)
        .await
        .expect("new CA still admitted");
    assert_eq!(common::health(ch).await.unwrap(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_crl_ends_open_streams_of_the_certificates_it_lists() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let env = Env::new();
    let gw = env.start().await; // [tls] watch = true: the new CRL file is picked up by itself
    let (cert, key) = env.identity(Role::Agency, "school-oakfield");
    let channel = gw.connect(&cert, &key).await.unwrap();
    let mut stream = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());

    let serial = sgw::pki::serial_hex_of_pem(&cert).unwrap();
    sgw::pki::revoke_in_dir(&env.pki_dir(), &serial).expect("CRL updated");

    let ended = common::stream_end_status(
        &mut stream,
        Duration::from_secs(10),
        "the stream ends once the CRL is loaded",
    )
    .await;
    assert_eq!(ended.code(), tonic::Code::Unauthenticated);
    let err = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("refused on the open connection");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_under_load_fails_no_call_and_keeps_streams_open() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let env = Env::new();
    env.set_tls_watch(false);
    let gw = env.start().await;
    let before = served_serial(&env, gw.addr).await;

    // A stream that stays open across the rotation.
    let (cert, key) = env.identity(Role::Agency, "school-oakfield");
    let mut stream = HealthClient::new(gw.connect(&cert, &key).await.unwrap())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    let mut inbox = sgw::proto::v1::concern_service_client::ConcernServiceClient::new(
        gw.connect(&cert, &key).await.unwrap(),
    )
    .subscribe_inbox(SubscribeInboxRequest { after_cursor: 0 })
    .await
    .expect("subscribe")
    .into_inner();

    // Unary callers on their own connections, and callers that reconnect each time.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for (i, id) in [
        "police-met",
        "nhs-guys",
        "csc-southwark",
        "housing-southwark",
    ]
    .iter()
    .enumerate()
    {
        let (cert, key) = env.identity(Role::Agency, id);
        let (stop, ok, failed, addr, ca) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            gw.addr,
            env.ca_pem(),
        );
        tasks.push(tokio::spawn(async move {
            let mut channel = common::connect(addr, &ca, Some((&cert, &key)))
                .await
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                if i % 2 == 1 {
                    channel = common::connect(addr, &ca, Some((&cert, &key)))
                        .await
                        .unwrap();
                }
                match common::health(channel.clone()).await {
                    Ok(1) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let renewed = sgw::pki::renew_server(&env.pki_dir(), 30, &[], &[]).unwrap();
    let mut ops = sgw::proto::v1::operations_service_client::OperationsServiceClient::new(
        gw.connect_as(&env, Role::Operator, "ops").await,
    );
    ops.reload_tls(ReloadTlsRequest {}).await.expect("reload");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        ok.load(Ordering::Relaxed) > 20,
        "calls ran: {}",
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no call failed during the rotation"
    );
    assert_ne!(before, renewed.serial_hex);
    assert_eq!(served_serial(&env, gw.addr).await, renewed.serial_hex);
    // The stream opened before the rotation is still open.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), stream.message())
            .await
            .is_err(),
        "the stream is still open and waiting for the next status"
    );
    // An inbox stream opened before the rotation keeps delivering after it.
    let concern = sgw::proto::v1::concern_service_client::ConcernServiceClient::new(
        gw.connect_as(&env, Role::Agency, "police-met").await,
    )
    .raise_concern(RaiseConcernRequest {
        subject: Some(Subject {
            nhs_number: "943 476 5919".into(),
        }),
        category: ConcernCategory::DomesticAbuse as i32,
        urgency: Urgency::Urgent as i32,
        narrative: "Police attended a domestic incident at the child's home overnight.".into(),
        recipient_agency_ids: vec!["school-oakfield".into()],
        request_id: "after-rotation".into(),
    })
    .await
    .expect("raise after rotation")
    .into_inner()
    .concern
    .unwrap();
    let delivered = tokio::time::timeout(Duration::from_secs(5), inbox.message())
        .await
        .expect("delivered after the rotation")
        .expect("stream")
        .expect("event");
    match delivered.event {
        Some(subscribe_inbox_response::Event::Concern(c)) => {
            assert_eq!(c.concern_id, concern.concern_id)
        }
        other => panic!("expected the concern, got {other:?}"),
    }
    gw.stop().await;
}

/// Whether a new connection with this certificate is refused (at the handshake,
/// or at its first call).
async fn new_connection_refused(gw: &common::Gateway, cert: &str, key: &str) -> bool {
    match gw.connect(cert, key).await {
        Err(_) => true,
        Ok(channel) => common::health(channel).await.is_err(),
    }
}

async fn ops_client(
    env: &Env,
    gw: &common::Gateway,
) -> sgw::proto::v1::operations_service_client::OperationsServiceClient<tonic::transport::Channel> {
    sgw::proto::v1::operations_service_client::OperationsServiceClient::new(
        gw.connect_as(env, Role::Operator, "ops").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_file_that_holds_no_crl_is_refused_and_what_it_revoked_stays_revoked() {
    let env = Env::new();
    env.set_tls_watch(false);
    let gw = env.start().await;
    let mut ops = ops_client(&env, &gw).await;
    let (cert, key) = env.identity(Role::Agency, "school-oakfield");
    let serial = sgw::pki::serial_hex_of_pem(&cert).unwrap();
    let crl = sgw::pki::revoke_in_dir(&env.pki_dir(), &serial).expect("CRL updated");
    ops.reload_tls(ReloadTlsRequest {}).await.expect("reload");
    assert!(new_connection_refused(&gw, &cert, &key).await);

    // Emptied in place (a copy half done), or replaced by the DER form: each would
    // read as "nothing revoked".
    let pem = std::fs::read_to_string(&crl).unwrap();
    let der: Vec<u8> =
        rustls::pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
    for broken in [Vec::new(), der] {
        std::fs::write(&crl, &broken).unwrap();
        let err = ops
            .reload_tls(ReloadTlsRequest {})
            .await
            .expect_err("a CRL file without a CRL");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(
            err.message().contains("crl.pem") && err.message().contains("no PEM CRL"),
            "{err:?}"
        );
        assert!(
            new_connection_refused(&gw, &cert, &key).await,
            "still revoked"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_serial_a_crl_lists_is_audited_and_outlives_the_crl() {
    let env = Env::new();
    env.set_tls_watch(false);
    let gw = env.start().await;
    let mut ops = ops_client(&env, &gw).await;
    let (cert, key) = env.identity(Role::Agency, "police-met");
    let serial = sgw::pki::serial_hex_of_pem(&cert).unwrap();
    sgw::pki::revoke_in_dir(&env.pki_dir(), &serial).expect("CRL updated");
    ops.reload_tls(ReloadTlsRequest {}).await.expect("reload");

    ops.revoke_certificate(RevokeCertificateRequest {
        serial_hex: serial.clone(),
        reason: "laptop stolen".into(),
    })
    .await
    .expect("revoke");
    let mut auditor = AuditServiceClient::new(gw.connect_as(&env, Role::Auditor, "dpo").await);
    let revoked = auditor
        .query_disclosures(QueryDisclosuresRequest {
            action: AuditAction::CertificateRevoked as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0].object_id, serial);

    // The CA issues a CRL that no longer lists it: the operator's revocation holds.
    let empty = env.ca().crl(&[], 1000, 30).unwrap();
    std::fs::write(env.pki_dir().join("crl.pem"), empty).unwrap();
    ops.reload_tls(ReloadTlsRequest {}).await.expect("reload");
    assert!(new_connection_refused(&gw, &cert, &key).await);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_certificate_is_refused_on_its_open_connection_and_its_streams_end() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let env = Env::new();
    let gw = env.start().await;
    let mut spec = common::client_spec(Role::Agency, "school-oakfield");
    spec.not_after =
        sgw::domain::Clock::now(&sgw::domain::SystemClock) + time::Duration::seconds(4);
    let short = env.issue(&spec);
    let channel = gw.connect(&short.cert_pem, &short.key_pem).await.unwrap();
    let mut health = HealthClient::new(channel);
    let check = HealthCheckRequest {
        service: String::new(),
    };
    health.check(check.clone()).await.expect("valid for now");
    let mut stream = health.watch(check.clone()).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());

    let ended =
        common::stream_end_status(&mut stream, Duration::from_secs(15), "ends at expiry").await;
    assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("expired"), "{ended:?}");
    let err = health
        .check(check)
        .await
        .expect_err("expired on the open connection");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{err:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_intermediate_refuses_every_certificate_it_issued() {
    let env = Env::new();
    env.set_tls_watch(false);
    let gw = env.start().await;
    let mut ops = ops_client(&env, &gw).await;
    let now = sgw::domain::Clock::now(&sgw::domain::SystemClock);
    let intermediate = env.issue(&sgw::pki::CertSpec {
        common_name: "sgw test issuing CA".into(),
        uri_sans: vec![],
        dns_sans: vec![],
        ip_sans: vec![],
        eku: vec![],
        not_before: now - time::Duration::minutes(1),
        not_after: now + time::Duration::days(30),
        // The CA numbers its intermediates and leaves from one counter (below).
        serial: Some(4096),
        is_ca: true,
    });
    let issuing =
        sgw::pki::Ca::load(&intermediate.cert_pem, &intermediate.key_pem).expect("issuing CA");
    let leaf = issuing
        .issue(&common::client_spec(Role::Agency, "school-oakfield"))
        .unwrap();
    let chain = format!("{}{}", leaf.cert_pem, intermediate.cert_pem);
    let open = gw
        .connect(&chain, &leaf.key_pem)
        .await
        .expect("chain accepted");
    common::health(open.clone()).await.expect("serves");

    let listed = |serial: &str| sgw::pki::Revocation {
        serial_hex: serial.to_owned(),
        revoked_at: now,
    };
    // The intermediate's own CRL revokes another leaf that happens to share the
    // intermediate's serial: only that leaf is meant, not the intermediate.
    let crls = format!(
        "{}{}",
        env.ca().crl(&[], 999, 30).unwrap(),
        issuing
            .crl(&[listed(&intermediate.serial_hex)], 1, 30)
            .unwrap()
    );
    std::fs::write(env.pki_dir().join("crl.pem"), crls).unwrap();
    ops.reload_tls(ReloadTlsRequest {}).await.expect("reload");
    assert!(!new_connection_refused(&gw, &chain, &leaf.key_pem).await);
    common::health(open.clone())
        .await
        .expect("the open connection is served too");

    // The root's CRL lists the intermediate: new handshakes are refused.
    let crl = env
        .ca()
        .crl(&[listed(&intermediate.serial_hex)], 1000, 30)
        .unwrap();
    std::fs::write(env.pki_dir().join("crl.pem"), crl).unwrap();
    ops.reload_tls(ReloadTlsRequest {}).await.expect("reload");
    assert!(new_connection_refused(&gw, &chain, &leaf.key_pem).await);

    // Off the CRL it is accepted again, until an operator revokes it.
    std::fs::write(
        env.pki_dir().join("crl.pem"),
        env.ca().crl(&[], 1001, 30).unwrap(),
    )
    .unwrap();
    ops.reload_tls(ReloadTlsRequest {}).await.expect("reload");
    assert!(!new_connection_refused(&gw, &chain, &leaf.key_pem).await);
    ops.revoke_certificate(RevokeCertificateRequest {
        serial_hex: intermediate.serial_hex.clone(),
        reason: "issuing CA key exposed".into(),
    })
    .await
    .expect("revoke");
    assert!(new_connection_refused(&gw, &chain, &leaf.key_pem).await);
    // An operator's revocation also ends what is open.
    let err = common::health(open)
        .await
        .expect_err("open connection refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("intermediate"), "{err:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_be_audited_is_not_put_in_force() {
    let env = Env::new();
    env.set_tls_watch(false);
    let gw = common::spawn_gateway(&env).await;
    let pid = gw.child.id().unwrap();
    let (cert, key) = env.identity(Role::Operator, "ops");
    let mut ops = sgw::proto::v1::operations_service_client::OperationsServiceClient::new(
        common::connect(gw.addr, &env.ca_pem(), Some((&cert, &key)))
            .await
            .unwrap(),
    );
    let before = served_serial(&env, gw.addr).await;
    let renewed = sgw::pki::renew_server(&env.pki_dir(), 30, &[], &[]).expect("renew");

    // The audit disk fails: the reload is refused and the old certificate stays.
    common::set_fsize_limit(pid, "1:unlimited");
    let err = ops
        .reload_tls(ReloadTlsRequest {})
        .await
        .expect_err("no reload without its audit entry");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(served_serial(&env, gw.addr).await, before, "not in force");

    // The disk recovers: the same reload goes through, audited.
    common::set_fsize_limit(pid, "unlimited:unlimited");
    let mut reloaded = false;
    for _ in 0..50 {
        if ops.reload_tls(ReloadTlsRequest {}).await.is_ok() {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "reloads once the log can be written");
    assert_eq!(served_serial(&env, gw.addr).await, renewed.serial_hex);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watch_retries_a_reload_that_could_not_be_audited() {
    let env = Env::new(); // [tls] watch = true
    let gw = common::spawn_gateway(&env).await;
    let pid = gw.child.id().unwrap();
    let before = served_serial(&env, gw.addr).await;

    common::set_fsize_limit(pid, "1:unlimited");
    let renewed = sgw::pki::renew_server(&env.pki_dir(), 30, &[], &[]).expect("renew");
    // At least one watch tick (every 2 s) finds the new files and cannot audit them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(served_serial(&env, gw.addr).await, before, "not in force");

    // The audit disk recovers: the same, unchanged files are loaded after all.
    common::set_fsize_limit(pid, "unlimited:unlimited");
    let mut served = before.clone();
    for _ in 0..100 {
        served = served_serial(&env, gw.addr).await;
        if served == renewed.serial_hex {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served, renewed.serial_hex, "the watch tried again");
    gw.stop().await;
}
