//! The audit store end to end: auditors' calls are themselves audited, proofs verify,
//! tampering is caught by `sgw audit verify`, acknowledged entries survive SIGKILL,
//! and the log holds no NHS number.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Env;
use sgw::audit::merkle;
use sgw::domain::Role;
use sgw::proto::v1::audit_service_client::AuditServiceClient;
use sgw::proto::v1::*;
use tonic::transport::Channel;
use tonic::Code;

const NHS: &str = "943 476 5919";

async fn auditor(gw: &common::Gateway, env: &Env) -> AuditServiceClient<Channel> {
    AuditServiceClient::new(gw.connect_as(env, Role::Auditor, "dpo").await)
}

async fn checkpoint(client: &mut AuditServiceClient<Channel>) -> Checkpoint {
    client
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .expect("checkpoint")
        .into_inner()
        .checkpoint
        .expect("checkpoint present")
}

fn hash(v: &[u8]) -> [u8; 32] {
    v.try_into().expect("32-byte hash")
}

/// Runs `sgw audit verify` offline and returns (success, stdout + stderr).
fn verify(data_dir: &Path, kept: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sgw"));
    cmd.args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .stdin(Stdio::null());
    if let Some(k) = kept {
        cmd.arg("--checkpoint").arg(k);
    }
    let out = cmd.output().expect("run sgw audit verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn auditor_queries_are_themselves_audited_and_proofs_verify() {
    let env = Env::new();
    let gw = env.start().await;
    let mut client = auditor(&gw, &env).await;

    let first = client
        .query_disclosures(QueryDisclosuresRequest {
            subject: Some(Subject {
                nhs_number: NHS.into(),
            }),
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    // The query's own AUDIT_QUERIED entry is already durable, so it is in its result.
    assert_eq!(first.entries.len(), 1, "{:?}", first.entries);
    let own = &first.entries[0];
    assert_eq!(own.action, AuditAction::AuditQueried as i32);
    assert_eq!(own.actor_id, "dpo");
    assert_eq!(own.actor_role, ActorRole::Auditor as i32);
    assert_eq!(own.subject_ref.len(), 64, "subject is a keyed hash");
    assert!(!own.subject_ref.contains("9434765919"));

    for _ in 0..9 {
        checkpoint(&mut client).await;
    }
    let cp = checkpoint(&mut client).await;
    assert_eq!(cp.tree_size, 11);
    // The checkpoint is a signed C2SP note that verifies with its verifier key.
    let note = sgw::audit::checkpoint::parse_signed_note(&cp.signed_note, &cp.verifier_key)
        .expect("note verifies");
    assert_eq!(note.tree_size, cp.tree_size);
    assert_eq!(note.root_hash.to_vec(), cp.root_hash);

    // Every entry's inclusion proof verifies against the checkpoint's root, and its
    // leaf hash is SHA-256(0x00 || canonical) of the exported entry.
    let exported: Vec<AuditEntry> = {
        let mut s = client
            .export_entries(ExportEntriesRequest {
                from_seq: 0,
                to_seq: cp.tree_size,
            })
            .await
            .expect("export")
            .into_inner();
        let mut v = Vec::new();
        while let Some(m) = s.message().await.expect("stream") {
            v.push(m.entry.expect("entry"));
        }
        v
    };
    assert_eq!(exported.len() as u64, cp.tree_size);
    for e in &exported {
        let proof = client
            .get_inclusion_proof(GetInclusionProofRequest {
                seq: e.seq,
                tree_size: cp.tree_size,
            })
            .await
            .expect("proof")
            .into_inner();
        assert_eq!(hash(&proof.leaf_hash), merkle::leaf_hash(&e.canonical));
        let hashes: Vec<[u8; 32]> = proof.hashes.iter().map(|h| hash(h)).collect();
        merkle::verify_inclusion(
            e.seq,
            cp.tree_size,
            &hash(&proof.leaf_hash),
            &hashes,
            &hash(&cp.root_hash),
        )
        .unwrap_or_else(|err| panic!("seq {}: {err}", e.seq));
        // canonical decodes to the same fields.
        let mut fields = e.clone();
        fields.canonical.clear();
        assert_eq!(prost::Message::encode_to_vec(&fields), e.canonical);
    }

    // A later checkpoint is consistent with the earlier one.
    let later = checkpoint(&mut client).await;
    let proof = client
        .get_consistency_proof(GetConsistencyProofRequest {
            from_size: cp.tree_size,
            to_size: later.tree_size,
        })
        .await
        .expect("consistency")
        .into_inner();
    let hashes: Vec<[u8; 32]> = proof.hashes.iter().map(|h| hash(h)).collect();
    merkle::verify_consistency(
        cp.tree_size,
        later.tree_size,
        &hash(&cp.root_hash),
        &hash(&later.root_hash),
        &hashes,
    )
    .expect("consistent");

    // Out-of-range requests: OUT_OF_RANGE, and nothing is appended.
    let before = checkpoint(&mut client).await.tree_size;
    for (seq, size) in [(0, before + 5), (before, before), (3, 2)] {
        let err = client
            .get_inclusion_proof(GetInclusionProofRequest {
                seq,
                tree_size: size,
            })
            .await
            .expect_err("out of range");
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    }
    let err = client
        .get_consistency_proof(GetConsistencyProofRequest {
            from_size: 5,
            to_size: before + 100,
        })
        .await
        .expect_err("out of range");
    assert_eq!(err.code(), Code::OutOfRange);
    // RFC 9162 has no proof from the empty log: an empty answer would check nothing.
    let err = client
        .get_consistency_proof(GetConsistencyProofRequest {
            from_size: 0,
            to_size: 1,
        })
        .await
        .expect_err("no proof from the empty log");
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        err.message().contains("from_size must be at least 1"),
        "{err:?}"
    );
    let err = client
        .query_disclosures(QueryDisclosuresRequest {
            subject: Some(Subject {
                nhs_number: "9434765918".into(),
            }),
            ..Default::default()
        })
        .await
        .expect_err("bad check digit");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("check digit"), "{err:?}");
    let err = client
        .query_disclosures(QueryDisclosuresRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .expect_err("page too big");
    assert_eq!(err.code(), Code::InvalidArgument);
    for (actor_id, target_agency_id) in [("NOT VALID!!", ""), ("", "Police Met")] {
        let err = client
            .query_disclosures(QueryDisclosuresRequest {
                actor_id: actor_id.into(),
                target_agency_id: target_agency_id.into(),
                ..Default::default()
            })
            .await
            .expect_err("not an id");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("is not a valid id"), "{err:?}");
    }
    let after = checkpoint(&mut client).await.tree_size;
    assert_eq!(
        after,
        before + 1,
        "refused requests appended nothing (only the checkpoint call itself)"
    );
    gw.stop().await;
}

#[tokio::test]
async fn queries_page_and_filter_by_actor_action_and_time() {
    let env = Env::new();
    let gw = env.start().await;
    let mut client = auditor(&gw, &env).await;
    for _ in 0..25 {
        checkpoint(&mut client).await;
    }
    let mut seen = Vec::new();
    let mut req = QueryDisclosuresRequest {
        actor_id: "dpo".into(),
        action: AuditAction::AuditQueried as i32,
        page_size: 7,
        ..Default::default()
    };
    loop {
        let page = client
            .query_disclosures(req.clone())
            .await
            .expect("page")
            .into_inner();
        assert!(page.entries.len() <= 7);
        seen.extend(page.entries.iter().map(|e| e.seq));
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    // 25 checkpoints + the pages' own entries, each seen once, in order.
    assert!(seen.len() >= 26, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    // A token from one query is refused for another.
    let page = client
        .query_disclosures(QueryDisclosuresRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err = client
        .query_disclosures(QueryDisclosuresRequest {
            page_size: 2,
            actor_id: "x".into(),
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .expect_err("foreign token");
    assert_eq!(err.code(), Code::InvalidArgument);
    // Nothing by another actor; an empty time window is empty.
    let none = client
        .query_disclosures(QueryDisclosuresRequest {
            actor_id: "police-met".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty());
    let far = prost_types::Timestamp {
        seconds: 4_000_000_000,
        nanos: 0,
    };
    let none = client
        .query_disclosures(QueryDisclosuresRequest {
            since: Some(far),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty());
    gw.stop().await;
}

/// Copies a folder tree.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Opens the audit tree of a stopped gateway's data dir for tampering.
/// A stopped gateway's audit log, opened to be tampered with: its sled trees (the
/// log, and the tree size on its own) and its folder.
struct Tampered<'a> {
    tree: sled::Tree,
    sizes: sled::Tree,
    dir: &'a Path,
}

fn tamper(data_dir: &Path, f: impl FnOnce(&Tampered)) {
    let audit = data_dir.join("audit");
    let db = sled::open(&audit).expect("open audit db");
    f(&Tampered {
        tree: db.open_tree("audit").unwrap(),
        sizes: db.open_tree("audit-size").unwrap(),
        dir: &audit,
    });
    db.flush().unwrap();
}

fn entry_key(seq: u64) -> Vec<u8> {
    let mut k = vec![b'e'];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

#[tokio::test]
async fn tampering_is_caught_by_verify_naming_the_first_bad_seq() {
    let env = Env::new();
    let data = env.path().join("data/dev");
    let gw = env.start().await;
    let mut client = auditor(&gw, &env).await;
    for _ in 0..12 {
        checkpoint(&mut client).await;
    }
    let kept_early = checkpoint(&mut client).await; // size 13
    gw.stop().await;
    let snapshot = env.path().join("snapshot");
    copy_dir(&data, &snapshot);

    let gw = env.start().await;
    let mut client = auditor(&gw, &env).await;
    for _ in 0..6 {
        checkpoint(&mut client).await;
    }
    let kept = checkpoint(&mut client).await; // size 20
    assert_eq!(kept.tree_size, 20);
    gw.stop().await;
    let kept_note = env.path().join("kept.note");
    std::fs::write(&kept_note, &kept.signed_note).unwrap();
    let early_note = env.path().join("early.note");
    std::fs::write(&early_note, &kept_early.signed_note).unwrap();

    let (ok, out) = verify(&data, Some(&kept_note));
    assert!(ok, "untouched log verifies: {out}");
    assert!(out.contains("20 entries"), "{out}");

    let case = |name: &str, f: &dyn Fn(&Tampered), want: &str| {
        let dir = env.path().join(format!("case-{name}"));
        copy_dir(&data, &dir);
        tamper(&dir, f);
        let (ok, out) = verify(&dir, None);
        assert!(!ok, "{name}: tampering not detected: {out}");
        assert!(out.contains(want), "{name}: expected {want:?} in: {out}");
    };
    case(
        "flip",
        &|t| {
            // sled holds where the chunk is in the entry file: 0xff, offset, length.
            use std::os::unix::fs::FileExt;
            let v = t.tree.get(entry_key(7)).unwrap().unwrap();
            assert_eq!((v.len(), v[0]), (13, 0xff), "a pointer into the entry file");
            let offset = u64::from_be_bytes(v[1..9].try_into().unwrap());
            let len = u64::from(u32::from_be_bytes(v[9..13].try_into().unwrap()));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(t.dir.join("entries"))
                .unwrap();
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, offset + len - 20).unwrap();
            file.write_all_at(&[byte[0] ^ 0x01], offset + len - 20)
                .unwrap();
        },
        "seq 7:",
    );
    case(
        "drop",
        &|t| {
            t.tree.remove(entry_key(4)).unwrap();
        },
        "seq 4:",
    );
    case(
        "swap",
        &|t| {
            let a = t.tree.get(entry_key(10)).unwrap().unwrap();
            let b = t.tree.get(entry_key(11)).unwrap().unwrap();
            t.tree.insert(entry_key(10), b).unwrap();
            t.tree.insert(entry_key(11), a).unwrap();
        },
        "seq 10:",
    );
    case(
        "truncate",
        &|t| {
            for seq in 17..20 {
                t.tree.remove(entry_key(seq)).unwrap();
            }
            t.sizes.insert(b"m", &17u64.to_be_bytes()).unwrap();
        },
        "seq 17:",
    );
    case(
        "checkpoint-signature",
        &|t| {
            let (k, v) = t.tree.scan_prefix(b"c").next_back().unwrap().unwrap();
            let mut v = v.to_vec();
            v[60] ^= 0x80;
            t.tree.insert(k, v).unwrap();
        },
        "signature does not verify",
    );
    // An index posting list removed (they are not sealed): queries by that action
    // would omit its entries. Here the last list of AUDIT_QUERIED, stored at the
    // seq of the first entry it holds.
    let queried = {
        let mut k = vec![b'k'];
        k.extend_from_slice(&(AuditAction::AuditQueried as i32 as u32).to_be_bytes());
        k
    };
    let first_dropped = std::sync::Mutex::new(0u64);
    case(
        "index-list",
        &|t| {
            let (k, _) = t.tree.scan_prefix(&queried).next_back().unwrap().unwrap();
            *first_dropped.lock().unwrap() =
                u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap());
            t.tree.remove(k).unwrap();
        },
        "action index of AUDIT_ACTION_AUDIT_QUERIED: a query by it omits this entry",
    );
    let dropped = *first_dropped.lock().unwrap();
    assert!(dropped > 0, "the second run's list");
    let dir = env.path().join("case-index-list");
    let (ok, out) = verify(&dir, None);
    assert!(
        !ok && out.contains(&format!("seq {dropped}: missing from the action index")),
        "{out}"
    );

    // Rolled back to an older copy: the old copy verifies on its own, but not against
    // the checkpoint the auditor kept.
    let (ok, out) = verify(&snapshot, Some(&early_note));
    assert!(ok, "{out}");
    let (ok, out) = verify(&snapshot, Some(&kept_note));
    assert!(!ok, "rollback not detected: {out}");
    assert!(
        out.contains("seq 13:") && out.contains("rolled back"),
        "{out}"
    );
}

#[tokio::test]
async fn nhs_numbers_never_reach_the_data_files() {
    let env = Env::new();
    let gw = env.start().await;
    let mut client = auditor(&gw, &env).await;
    for nhs in [NHS, "4010232137"] {
        client
            .subject_access_report(SubjectAccessReportRequest {
                subject: Some(Subject {
                    nhs_number: nhs.into(),
                }),
            })
            .await
            .expect("report");
    }
    gw.stop().await;
    let needles: Vec<Vec<u8>> = ["9434765919", "943 476 5919", "4010232137"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    for file in common::files_under(&env.path().join("data")) {
        let bytes = std::fs::read(&file).unwrap();
        for n in &needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == n.as_slice()),
                "{} holds an NHS number",
                file.display()
            );
        }
    }
}

#[tokio::test]
async fn acknowledged_entries_survive_sigkill() {
    let env = Env::new();
    let mut child = common::spawn_gateway(&env).await;
    let addr = child.addr;
    let ca = env.ca_pem();
    let (cert, key) = env.identity(Role::Auditor, "dpo");

    // Eight concurrent auditors; each call carries its own request id and is
    // acknowledged only once its AUDIT_QUERIED entry is durable.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let last_cp = std::sync::Arc::new(std::sync::Mutex::new(None::<Checkpoint>));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (ca, cert, key, acked, last_cp) = (
            ca.clone(),
            cert.clone(),
            key.clone(),
            acked.clone(),
            last_cp.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let channel = common::connect(addr, &ca, Some((&cert, &key)))
                .await
                .expect("connect");
            let mut client = AuditServiceClient::new(channel);
            for i in 0.. {
                let id = format!("crash-{w}-{i}");
                let mut req = tonic::Request::new(GetCheckpointRequest {});
                req.metadata_mut()
                    .insert("x-request-id", id.parse().unwrap());
                match client.get_checkpoint(req).await {
                    Ok(resp) => {
                        acked.lock().unwrap().push(id);
                        let cp = resp.into_inner().checkpoint.unwrap();
                        let mut last = last_cp.lock().unwrap();
                        if last.as_ref().is_none_or(|l| l.tree_size < cp.tree_size) {
                            *last = Some(cp);
                        }
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill9().await;
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    let last_cp = last_cp
        .lock()
        .unwrap()
        .clone()
        .expect("some checkpoint before the crash");
    assert!(acked.len() > 20, "only {} calls acknowledged", acked.len());

    // Restart: every acknowledged request id is in the log, and the log is
    // consistent with the last checkpoint seen before the crash.
    let child = common::spawn_gateway(&env).await;
    let channel = common::connect(child.addr, &ca, Some((&cert, &key)))
        .await
        .unwrap();
    let mut client = AuditServiceClient::new(channel);
    let mut ids = std::collections::HashSet::new();
    let mut req = QueryDisclosuresRequest {
        page_size: 1000,
        action: AuditAction::AuditQueried as i32,
        ..Default::default()
    };
    loop {
        let page = client
            .query_disclosures(req.clone())
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.entries.into_iter().map(|e| e.request_id));
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    for id in &acked {
        assert!(ids.contains(id), "acknowledged call {id} lost in the crash");
    }
    let now = checkpoint(&mut client).await;
    let proof = client
        .get_consistency_proof(GetConsistencyProofRequest {
            from_size: last_cp.tree_size,
            to_size: now.tree_size,
        })
        .await
        .unwrap()
        .into_inner();
    let hashes: Vec<[u8; 32]> = proof.hashes.iter().map(|h| hash(h)).collect();
    merkle::verify_consistency(
        last_cp.tree_size,
        now.tree_size,
        &hash(&last_cp.root_hash),
        &hash(&now.root_hash),
        &hashes,
    )
    .expect("the log after the crash extends the last checkpoint seen before it");
    child.stop().await;
    let (ok, out) = verify(&env.path().join("data/dev"), None);
    assert!(ok, "log verifies after the crash: {out}");
}

/// The last commit before a crash, with nothing after it: sled 0.34 writes a log
/// buffer out only once later writes seal it, so this entry is on disk only in the
/// audit write-ahead file, and must come back from it.
#[tokio::test]
async fn the_last_acknowledged_entry_survives_sigkill_with_nothing_after_it() {
    let env = Env::new();
    let ca = env.ca_pem();
    let (cert, key) = env.identity(Role::Auditor, "dpo");
    let mut child = common::spawn_gateway(&env).await;
    let channel = common::connect(child.addr, &ca, Some((&cert, &key)))
        .await
        .unwrap();
    let mut client = AuditServiceClient::new(channel);
    // One commit each: a GetCheckpoint would commit its checkpoint after its entry.
    for id in ["first", "last"] {
        let mut req = tonic::Request::new(QueryDisclosuresRequest {
            page_size: 1,
            ..Default::default()
        });
        req.metadata_mut()
            .insert("x-request-id", id.parse().unwrap());
        client.query_disclosures(req).await.unwrap();
    }
    child.kill9().await;

    let child = common::spawn_gateway(&env).await;
    let channel = common::connect(child.addr, &ca, Some((&cert, &key)))
        .await
        .unwrap();
    let mut client = AuditServiceClient::new(channel);
    let page = client
        .query_disclosures(QueryDisclosuresRequest {
            page_size: 100,
            action: AuditAction::AuditQueried as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = page.entries.iter().map(|e| e.request_id.as_str()).collect();
    assert!(
        ids.contains(&"first") && ids.contains(&"last"),
        "acknowledged entries lost in the crash; found {ids:?}"
    );
    child.stop().await;
    let (ok, out) = verify(&env.path().join("data/dev"), None);
    assert!(ok, "log verifies after the crash: {out}");
}

/// Sets the gateway process's file-size limit (RLIMIT_FSIZE, `soft:hard`) with util-linux
/// prlimit. Only the soft limit moves, so no capability is needed to raise it again.
fn set_fsize_limit(pid: u32, limit: &str) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--fsize={limit}")])
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit failed");
}

async fn health_status(client: &mut tonic_health::pb::health_client::HealthClient<Channel>) -> i32 {
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status
}

#[tokio::test]
async fn a_failing_audit_disk_fails_closed_and_recovers() {
    const SERVING: i32 = 1;
    const NOT_SERVING: i32 = 2;
    let env = Env::new();
    let gw = common::spawn_gateway(&env).await;
    let pid = gw.child.id().expect("pid");
    let (cert, key) = env.identity(Role::Auditor, "dpo");
    let channel = common::connect(gw.addr, &env.ca_pem(), Some((&cert, &key)))
        .await
        .unwrap();
    let mut client = AuditServiceClient::new(channel.clone());
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let before = checkpoint(&mut client).await;
    assert_eq!(health_status(&mut health).await, SERVING);

    // A real I/O failure: from now on every write past byte 1 of any file fails
    // with EFBIG, as on a full disk.
    set_fsize_limit(pid, "1:unlimited");
    let err = client
        .get_checkpoint(GetCheckpointRequest {})
        .await
        .expect_err("nothing without a durable audit entry");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("audit log cannot be written"),
        "{err:?}"
    );
    // The server stays up, reports NOT_SERVING (health follows the writer
    // asynchronously) and keeps refusing.
    let mut not_serving = false;
    for _ in 0..50 {
        if health_status(&mut health).await == NOT_SERVING {
            not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        not_serving,
        "health reports NOT_SERVING while the audit log cannot be written"
    );
    let err = client
        .query_disclosures(QueryDisclosuresRequest::default())
        .await
        .expect_err("still refused");
    assert_eq!(err.code(), Code::Unavailable);

    // The disk recovers: the gateway reopens its store and serves again.
    set_fsize_limit(pid, "unlimited:unlimited");
    let mut serving = false;
    for _ in 0..50 {
        if health_status(&mut health).await == SERVING {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serving, "health returns to SERVING once writes succeed");
    let after = checkpoint(&mut client).await;
    assert!(after.tree_size > before.tree_size);
    let proof = client
        .get_consistency_proof(GetConsistencyProofRequest {
            from_size: before.tree_size,
            to_size: after.tree_size,
        })
        .await
        .unwrap()
        .into_inner();
    let hashes: Vec<[u8; 32]> = proof.hashes.iter().map(|h| hash(h)).collect();
    merkle::verify_consistency(
        before.tree_size,
        after.tree_size,
        &hash(&before.root_hash),
        &hash(&after.root_hash),
        &hashes,
    )
    .expect("the log after recovery extends the one before");
    gw.stop().await;
    let (ok, out) = verify(&env.path().join("data/dev"), None);
    assert!(ok, "{out}");
}

// Multi-threaded: the CLI runs as a blocking child process while this process's
// runtime keeps serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditor_cli_verifies_online_and_queries_as_json() {
    let env = Env::new();
    let gw = env.start().await;
    let mut client = auditor(&gw, &env).await;
    let kept = checkpoint(&mut client).await;
    for _ in 0..5 {
        checkpoint(&mut client).await;
    }
    let kept_note = env.path().join("kept.note");
    std::fs::write(&kept_note, &kept.signed_note).unwrap();
    let pki = env.pki_dir();
    let addr = gw.addr.to_string();
    let client_args = |cmd: &mut Command| {
        cmd.args(["--addr", &addr])
            .arg("--ca")
            .arg(pki.join("ca.pem"))
            .arg("--cert")
            .arg(pki.join("auditor-dpo.pem"))
            .arg("--key")
            .arg(pki.join("auditor-dpo.key"));
    };
    let run = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sgw"));
        cmd.args(args);
        client_args(&mut cmd);
        cmd.arg("--checkpoint").arg(&kept_note);
        cmd.output().expect("run")
    };
    let out = run(&["audit", "verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("verified online"), "{text}");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sgw"));
    cmd.args([
        "audit",
        "query",
        "--json",
        "--action",
        "AUDIT_QUERIED",
        "--limit",
        "3",
    ]);
    client_args(&mut cmd);
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .all(|v| v["action"] == "AUDIT_QUERIED" && v["actor_id"] == "dpo"));
    gw.stop().await;
}

/// `sgw audit verify`'s exit code and output for these arguments.
fn verify_with(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sgw"))
        .args(["audit", "verify"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run sgw audit verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

// Multi-threaded: the CLI runs as a blocking child process while this process's
// runtime keeps serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_answers_2_when_it_cannot_check_never_1() {
    let env = Env::new();
    let data = env.path().join("data/dev");
    let gw = env.start().await;
    checkpoint(&mut auditor(&gw, &env).await).await;
    let addr = gw.addr.to_string();
    // While the gateway holds the database: cannot check, and nothing about writing.
    let (code, out) = verify_with(&["--data-dir".as_ref(), data.as_os_str()]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("is the gateway stopped?") && !out.contains("cannot be written"),
        "{out}"
    );
    // A query the gateway refuses prints its status, and no table.
    let pki = env.pki_dir();
    let mut query = Command::new(env!("CARGO_BIN_EXE_sgw"));
    query
        .args([
            "audit",
            "query",
            "--nhs-number",
            "123",
            "--addr",
            &addr,
            "--ca",
        ])
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join("auditor-dpo.pem"))
        .arg("--key")
        .arg(pki.join("auditor-dpo.key"));
    let refused = tokio::task::spawn_blocking(move || query.output())
        .await
        .unwrap()
        .expect("run sgw audit query");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("query refused (InvalidArgument): subject.nhs_number"),
        "{err}"
    );
    assert!(refused.stdout.is_empty(), "no table for a refusal");
    gw.stop().await;

    // A kept checkpoint that cannot be read: nothing was checked.
    let missing = env.path().join("no-such.note");
    let (code, out) = verify_with(&[
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--checkpoint".as_ref(),
        missing.as_os_str(),
    ]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("could not be checked"), "{out}");

    // A gateway that cannot be reached (it has stopped).
    let (code, out) = verify_with(&[
        "--addr".as_ref(),
        addr.as_ref(),
        "--ca".as_ref(),
        pki.join("ca.pem").as_os_str(),
        "--cert".as_ref(),
        pki.join("auditor-dpo.pem").as_os_str(),
        "--key".as_ref(),
        pki.join("auditor-dpo.key").as_os_str(),
    ]);
    assert_eq!(code, Some(2), "{out}");

    // A pinned key is for the online form: offline it would be ignored.
    let (code, out) = verify_with(&[
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--verifier-key".as_ref(),
        "x+00000000+AAAA".as_ref(),
    ]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("cannot be used with"), "{out}");
}

// Multi-threaded: the CLI runs as a blocking child process while this process's
// runtime keeps serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_query_into_a_closed_pipe_ends_quietly() {
    let env = Env::new();
    let gw = env.start().await;
    let mut client = auditor(&gw, &env).await;
    for _ in 0..50 {
        checkpoint(&mut client).await;
    }
    let pki = env.pki_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sgw"))
        .args(["audit", "query", "--addr", &gw.addr.to_string(), "--ca"])
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join("auditor-dpo.pem"))
        .arg("--key")
        .arg(pki.join("auditor-dpo.key"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sgw audit query");
    // `| head -0`: the reader goes before the first line.
    drop(child.stdout.take());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    gw.stop().await;
}
