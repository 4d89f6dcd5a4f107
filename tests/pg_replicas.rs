//! Several real gateway processes (`sgw serve --config`) over one real PostgreSQL
//! database, with real mutual TLS and a PKI generated in the test: what one process
//! promises (tests/records.rs, tests/concerns.rs, tests/rotation.rs, tests/audit.rs)
//! must hold across replicas. One dense audit log however many replicas append to it,
//! with signed checkpoints and proofs that verify whichever replica serves them; no
//! acknowledged disclosure lost when a replica is killed; an inbox stream on one
//! replica sees what another delivered; a consent withdrawal or a revocation through
//! one replica is in force on the others for the very next call; a missed deadline
//! escalates once, however many replicas sweep; and a replica answers more
//! concurrent disclosures than it has pooled database connections.
//!
//! Every replica of a test shares one folder and one config file (key files are
//! created by the first replica, so replicas start one after another), with
//! `listen = "127.0.0.1:0"` giving each its own port; each test has its own database,
//! dropped when it passes. Skipped, with a printed reason, when
//! `SGW_TEST_POSTGRES_URL` is unset.

mod common;
mod pg_common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Env, Process};
use pg_common::{server_url, TestDb};
use sgw::audit::merkle;
use sgw::domain::Role;
use sgw::proto::v1::audit_service_client::AuditServiceClient;
use sgw::proto::v1::concern_service_client::ConcernServiceClient;
use sgw::proto::v1::consent_service_client::ConsentServiceClient;
use sgw::proto::v1::operations_service_client::OperationsServiceClient;
use sgw::proto::v1::record_service_client::RecordServiceClient;
use sgw::proto::v1::subscribe_inbox_response::Event;
use sgw::proto::v1::*;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const NHS: &str = "943 476 5919";
const NARRATIVE: &str =
    "Police attended a domestic incident at the home overnight; the child was present.";
/// Concurrent callers per replica under load.
const CALLERS: usize = 8;
/// Connections per replica: several tests run at once against one server.
const POOL_SIZE: usize = 8;

// === the cluster ===

/// A fresh database and a dev environment whose config points at it.
async fn prepare(test: &str) -> Option<(Env, TestDb)> {
    let url = server_url(test)?;
    let db = TestDb::create(&url, test).await;
    let env = Env::new();
    env.append_config(&format!(
        "[storage]\n\
         backend = \"postgres\"\n\
         url = \"{}\"\n\
         pool_size = {POOL_SIZE}\n\
         statement_timeout = \"10s\"\n\
         \n\
         [audit]\n\
         checkpoint_interval = \"1s\"\n",
        db.url()
    ));
    Some((env, db))
}

/// Starts `n` replicas on the env's config, one after another, labelled A, B, C...
async fn start_replicas(env: &Env, n: usize) -> Vec<Process> {
    let mut replicas = Vec::new();
    for i in 0..n {
        replicas.push(spawn_replica(env, label(i)).await);
    }
    replicas
}

fn label(i: usize) -> char {
    (b'A' + i as u8) as char
}

/// `sgw serve --config` with its stderr relayed line by line, prefixed by `label`.
async fn spawn_replica(env: &Env, label: char) -> Process {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sgw"))
        .args(["serve", "--config"])
        .arg(env.config_path())
        .current_dir(env.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sgw");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            eprintln!("[sgw {label}] {line}");
            if let Some(rest) = line.split("listening on ").nth(1) {
                if let Ok(addr) = rest.split_whitespace().next().unwrap_or_default().parse() {
                    return addr;
                }
            }
        }
        panic!("replica {label} exited before listening");
    })
    .await
    .unwrap_or_else(|_| panic!("replica {label} listens within 60 s"));
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[sgw {label}] {line}");
        }
    });
    Process { addr, child }
}

/// Stops every replica still running (each must exit cleanly) and drops the database.
async fn finish(replicas: Vec<Process>, db: TestDb) {
    for r in replicas {
        r.stop().await;
    }
    db.drop_database().await;
}

async fn channel(env: &Env, addr: SocketAddr, role: Role, id: &str) -> Channel {
    let (cert, key) = env.identity(role, id);
    common::connect(addr, &env.ca_pem(), Some((&cert, &key)))
        .await
        .unwrap_or_else(|e| panic!("{id} connects to {addr}: {e}"))
}

async fn records_at(env: &Env, addr: SocketAddr, agency: &str) -> RecordServiceClient<Channel> {
    RecordServiceClient::new(channel(env, addr, Role::Agency, agency).await)
}

async fn consents_at(env: &Env, addr: SocketAddr, agency: &str) -> ConsentServiceClient<Channel> {
    ConsentServiceClient::new(channel(env, addr, Role::Agency, agency).await)
}

async fn concerns_at(env: &Env, addr: SocketAddr, agency: &str) -> ConcernServiceClient<Channel> {
    ConcernServiceClient::new(channel(env, addr, Role::Agency, agency).await)
}

async fn auditor_at(env: &Env, addr: SocketAddr) -> AuditServiceClient<Channel> {
    AuditServiceClient::new(channel(env, addr, Role::Auditor, "dpo").await)
}

fn with_request_id<T>(message: T, id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut()
        .insert("x-request-id", id.parse().expect("ascii request id"));
    req
}

fn subject() -> Option<Subject> {
    Some(Subject {
        nhs_number: NHS.into(),
    })
}

async fn share(
    client: &mut RecordServiceClient<Channel>,
    category: RecordCategory,
    content: &[u8],
) -> RecordRef {
    client
        .share_record(ShareRecordRequest {
            subject: subject(),
            category: category as i32,
            summary: format!("{category:?} summary"),
            content: content.to_vec(),
            media_type: "text/plain; charset=utf-8".into(),
            retain_until: None,
        })
        .await
        .expect("share")
        .into_inner()
        .record
        .expect("record")
}

fn get(record_id: &str, purpose: Purpose) -> GetRecordRequest {
    GetRecordRequest {
        record_id: record_id.into(),
        purpose: purpose as i32,
        r#override: None,
    }
}

// === the audit log, checked from outside ===

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    ctx.finish().as_ref().try_into().expect("32 bytes")
}

/// RFC 6962 §2.1 leaf hash, computed here rather than by the crate.
fn leaf_hash(canonical: &[u8]) -> [u8; 32] {
    sha256(&[&[0x00], canonical])
}

/// RFC 6962 §2.1 Merkle tree hash of `leaves`, computed here rather than by the crate.
fn tree_hash(leaves: &[[u8; 32]]) -> [u8; 32] {
    match leaves.len() {
        0 => sha256(&[]),
        1 => leaves[0],
        n => {
            // The largest power of two strictly below n.
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            sha256(&[&[0x01], &tree_hash(&leaves[..k]), &tree_hash(&leaves[k..])])
        }
    }
}

fn hash(v: &[u8]) -> [u8; 32] {
    v.try_into().expect("32-byte hash")
}

/// Checks a served checkpoint: its signed note verifies against `verifier_key` (the
/// crate's C2SP parser) and, independently, its Ed25519 signature verifies with ring
/// over the note text rebuilt from the message's fields, by the key that
/// `verifier_key` names.
fn verify_checkpoint(cp: &Checkpoint, verifier_key: &str) {
    let note = sgw::audit::checkpoint::parse_signed_note(&cp.signed_note, verifier_key)
        .unwrap_or_else(|e| panic!("signed note of size {} does not verify: {e}", cp.tree_size));
    assert_eq!(note.tree_size, cp.tree_size);
    assert_eq!(note.root_hash.to_vec(), cp.root_hash);
    assert_eq!(
        cp.verifier_key, verifier_key,
        "one signing key for every replica"
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut tagged = vec![0x01];
    tagged.extend_from_slice(&cp.public_key);
    assert!(
        verifier_key.ends_with(&format!("+{}", b64.encode(&tagged))),
        "{verifier_key} does not name the checkpoint's public key"
    );
    let body = format!(
        "{}\n{}\n{}\n{}\n",
        cp.log_id,
        cp.tree_size,
        b64.encode(&cp.root_hash),
        cp.timestamp.as_ref().expect("timestamp").seconds
    );
    assert!(
        cp.signed_note.starts_with(&format!("{body}\n")),
        "{:?}",
        cp.signed_note
    );
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &cp.public_key)
        .verify(body.as_bytes(), &cp.signature)
        .unwrap_or_else(|_| panic!("Ed25519 signature of size {} fails", cp.tree_size));
}

async fn get_checkpoint(
    client: &mut AuditServiceClient<Channel>,
) -> Result<Checkpoint, tonic::Status> {
    Ok(client
        .get_checkpoint(GetCheckpointRequest {})
        .await?
        .into_inner()
        .checkpoint
        .expect("checkpoint present"))
}

/// Waits until every replica serves a checkpoint (a replica not holding the signing
/// lease serves the latest one signed, and there is none before the first); checks
/// they all name one verifier key and returns it.
async fn verifier_key(env: &Env, addrs: &[SocketAddr]) -> String {
    let mut keys = BTreeSet::new();
    for (i, addr) in addrs.iter().enumerate() {
        let mut client = auditor_at(env, *addr).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        let cp = loop {
            match get_checkpoint(&mut client).await {
                Ok(cp) => break cp,
                Err(s) if Instant::now() < deadline => {
                    eprintln!("replica {}: no checkpoint yet: {s:?}", label(i));
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(s) => panic!("replica {} serves no checkpoint: {s:?}", label(i)),
            }
        };
        keys.insert(cp.verifier_key);
    }
    assert_eq!(keys.len(), 1, "replicas sign with different keys: {keys:?}");
    keys.into_iter().next().expect("one key")
}

/// Every entry from seq 0 to the end of the log (to `to` when non-zero), checking
/// that the seqs are dense from 0 and that each entry's `canonical` is its own
/// encoding.
async fn export(client: &mut AuditServiceClient<Channel>, to: u64) -> Vec<AuditEntry> {
    let mut stream = client
        .export_entries(ExportEntriesRequest {
            from_seq: 0,
            to_seq: to,
        })
        .await
        .expect("export")
        .into_inner();
    let mut out: Vec<AuditEntry> = Vec::new();
    while let Some(m) = stream.message().await.expect("export stream") {
        let e = m.entry.expect("entry");
        assert_eq!(
            e.seq,
            out.len() as u64,
            "seqs are not dense: seq {} follows {:?}",
            e.seq,
            out.last().map(|l| l.seq)
        );
        let mut fields = e.clone();
        fields.canonical.clear();
        assert_eq!(
            prost::Message::encode_to_vec(&fields),
            e.canonical,
            "seq {}",
            e.seq
        );
        out.push(e);
    }
    if to != 0 {
        assert_eq!(out.len() as u64, to);
    }
    out
}

/// Every audit entry with `action`, through the auditor's query.
async fn audited(client: &mut AuditServiceClient<Channel>, action: AuditAction) -> Vec<AuditEntry> {
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

// === load: concurrent audited calls through every replica ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// GetRecord of a police incident by the school (no consent needed).
    Disclose,
    /// FindRecords by the school (RECORDS_FOUND).
    Find,
    /// GetCheckpoint by the auditor (AUDIT_QUERIED).
    Checkpoint,
}

#[derive(Debug)]
enum Answer {
    Disclosed(u64),
    Found,
    Checkpoint(Box<Checkpoint>),
}

/// One call made under load, as its caller saw it.
#[derive(Debug)]
struct Call {
    replica: usize,
    kind: Kind,
    request_id: String,
    started: Instant,
    outcome: Result<Answer, tonic::Status>,
}

/// [`CALLERS`] callers on each replica, each on its own connection, calling until
/// told to stop or until a call fails (a failure is kept and ends that caller).
struct Load {
    stop: Arc<AtomicBool>,
    /// Disclosures answered so far, per replica.
    disclosed: Arc<Vec<AtomicUsize>>,
    callers: Vec<JoinHandle<Vec<Call>>>,
}

impl Load {
    async fn start(env: &Env, addrs: &[SocketAddr], record_id: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let disclosed: Arc<Vec<AtomicUsize>> =
            Arc::new(addrs.iter().map(|_| AtomicUsize::new(0)).collect());
        let mut ready = Vec::new();
        for (r, addr) in addrs.iter().enumerate() {
            for c in 0..CALLERS {
                let kind = match c {
                    6 => Kind::Find,
                    7 => Kind::Checkpoint,
                    _ => Kind::Disclose,
                };
                let channel = match kind {
                    Kind::Checkpoint => channel(env, *addr, Role::Auditor, "dpo").await,
                    _ => channel(env, *addr, Role::Agency, "school-oakfield").await,
                };
                ready.push((r, c, kind, channel));
            }
        }
        let callers = ready
            .into_iter()
            .map(|(r, c, kind, channel)| {
                let stop = stop.clone();
                let disclosed = disclosed.clone();
                let record_id = record_id.to_owned();
                tokio::spawn(async move {
                    let mut records = RecordServiceClient::new(channel.clone());
                    let mut auditor = AuditServiceClient::new(channel);
                    let mut calls = Vec::new();
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let request_id = format!("load-{}-{c}-{i}", label(r));
                        let started = Instant::now();
                        let outcome = match kind {
                            Kind::Disclose => records
                                .get_record(with_request_id(
                                    get(&record_id, Purpose::Safeguarding),
                                    &request_id,
                                ))
                                .await
                                .map(|resp| Answer::Disclosed(resp.into_inner().audit_seq)),
                            Kind::Find => records
                                .find_records(with_request_id(
                                    FindRecordsRequest {
                                        subject: subject(),
                                        purpose: Purpose::Safeguarding as i32,
                                        ..Default::default()
                                    },
                                    &request_id,
                                ))
                                .await
                                .map(|_| Answer::Found),
                            Kind::Checkpoint => auditor
                                .get_checkpoint(with_request_id(
                                    GetCheckpointRequest {},
                                    &request_id,
                                ))
                                .await
                                .map(|resp| {
                                    Answer::Checkpoint(Box::new(
                                        resp.into_inner().checkpoint.expect("checkpoint"),
                                    ))
                                }),
                        };
                        if let Ok(Answer::Disclosed(_)) = outcome {
                            disclosed[r].fetch_add(1, Ordering::Relaxed);
                        }
                        let failed = outcome.is_err();
                        calls.push(Call {
                            replica: r,
                            kind,
                            request_id,
                            started,
                            outcome,
                        });
                        if failed {
                            break;
                        }
                    }
                    calls
                })
            })
            .collect();
        Load {
            stop,
            disclosed,
            callers,
        }
    }

    /// Waits until each of `replicas` has answered at least `n` disclosures.
    async fn until_disclosed(&self, replicas: &[usize], n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let counts: Vec<usize> = replicas
                .iter()
                .map(|r| self.disclosed[*r].load(Ordering::Relaxed))
                .collect();
            if counts.iter().all(|c| *c >= n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replicas {replicas:?} answered {counts:?} disclosures in {within:?}, not {n} each"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(self) -> Vec<Call> {
        self.stop.store(true, Ordering::Relaxed);
        let mut calls = Vec::new();
        for c in self.callers {
            calls.extend(c.await.expect("caller task"));
        }
        calls
    }
}

/// Shares the record the load discloses (through the first replica) and returns its id.
async fn incident(env: &Env, addr: SocketAddr) -> String {
    let mut police = records_at(env, addr, "police-met").await;
    share(&mut police, RecordCategory::PoliceIncident, b"DA call-out")
        .await
        .record_id
}

/// What the calls under load were answered, by kind and replica.
fn summarise(calls: &[Call], replicas: usize) -> String {
    let mut out = String::new();
    for r in 0..replicas {
        let of = |k: Kind| {
            calls
                .iter()
                .filter(|c| c.replica == r && c.kind == k && c.outcome.is_ok())
                .count()
        };
        let failed = calls
            .iter()
            .filter(|c| c.replica == r && c.outcome.is_err())
            .count();
        out.push_str(&format!(
            "replica {}: {} disclosures, {} finds, {} checkpoints answered, {failed} failed; ",
            label(r),
            of(Kind::Disclose),
            of(Kind::Find),
            of(Kind::Checkpoint)
        ));
    }
    out
}

/// The checks every acknowledged call must pass against the whole exported log:
/// each acknowledged call's entry is in it exactly once (a disclosure at the seq it
/// was answered with), no two callers were given one seq, and every disclosure entry
/// in it comes from a call made here, acknowledged, or failed (`unacknowledged_ok`
/// says which failed calls may have left one: those cut by a crash).
fn check_acknowledged_calls_in_log(
    calls: &[Call],
    log: &[AuditEntry],
    record_id: &str,
    unacknowledged_ok: impl Fn(&Call) -> bool,
) {
    let mut by_request: HashMap<&str, Vec<&AuditEntry>> = HashMap::new();
    for e in log {
        by_request.entry(e.request_id.as_str()).or_default().push(e);
    }
    let mut given_seqs: BTreeMap<u64, &str> = BTreeMap::new();
    for call in calls.iter().filter(|c| c.outcome.is_ok()) {
        let entries = by_request
            .get(call.request_id.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert_eq!(
            entries.len(),
            1,
            "acknowledged {:?} call {} has {} entries in the log: {entries:?}",
            call.kind,
            call.request_id,
            entries.len()
        );
        let e = entries[0];
        let want = match call.kind {
            Kind::Disclose => AuditAction::RecordDisclosed,
            Kind::Find => AuditAction::RecordsFound,
            Kind::Checkpoint => AuditAction::AuditQueried,
        };
        assert_eq!(e.action, want as i32, "{e:?}");
        if let Ok(Answer::Disclosed(seq)) = &call.outcome {
            assert_eq!(
                e.seq, *seq,
                "{} was answered audit_seq {seq}, but its entry is at seq {}",
                call.request_id, e.seq
            );
            assert_eq!(e.object_id, record_id);
            assert_eq!(e.actor_id, "school-oakfield");
            assert_eq!(e.basis, DisclosureBasis::AgreementNoConsentNeeded as i32);
            if let Some(other) = given_seqs.insert(*seq, &call.request_id) {
                panic!(
                    "audit_seq {seq} was given to both {other} and {}",
                    call.request_id
                );
            }
        }
    }
    let made: HashMap<&str, &Call> = calls.iter().map(|c| (c.request_id.as_str(), c)).collect();
    for e in log.iter().filter(|e| {
        e.action == AuditAction::RecordDisclosed as i32 && e.request_id.starts_with("load-")
    }) {
        let call = made
            .get(e.request_id.as_str())
            .unwrap_or_else(|| panic!("a disclosure entry for no call made here: {e:?}"));
        if call.outcome.is_err() {
            assert!(
                unacknowledged_ok(call),
                "seq {} records a disclosure for {}, which failed: {:?}",
                e.seq,
                call.request_id,
                call.outcome
            );
        }
    }
}

/// Asks every replica for a checkpoint until one covers more than `min_size`
/// entries (the replica holding the signing lease signs a fresh one on request;
/// the others serve the latest signed); returns it and the replica that served it.
async fn checkpoint_covering(
    env: &Env,
    addrs: &[SocketAddr],
    min_size: u64,
    within: Duration,
) -> (Checkpoint, usize) {
    let mut clients = Vec::new();
    for addr in addrs {
        clients.push(auditor_at(env, *addr).await);
    }
    let deadline = Instant::now() + within;
    loop {
        for (i, client) in clients.iter_mut().enumerate() {
            let cp = get_checkpoint(client).await.expect("checkpoint");
            if cp.tree_size > min_size {
                return (cp, i);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no replica served a checkpoint covering seq {min_size} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

// === 1. one log, however many replicas append ===

async fn replicas_disclosing_concurrently_write_one_dense_verifiable_log(test: &str, n: usize) {
    let Some((env, db)) = prepare(test).await else {
        return;
    };
    let replicas = start_replicas(&env, n).await;
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let record_id = incident(&env, addrs[0]).await;
    let verifier_key = verifier_key(&env, &addrs).await;

    // A few seconds of load, and until every replica has answered 20 disclosures.
    let load = Load::start(&env, &addrs, &record_id).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all: Vec<usize> = (0..n).collect();
    load.until_disclosed(&all, 20, Duration::from_secs(30))
        .await;
    let calls = load.finish().await;
    println!("{test}: {}", summarise(&calls, n));
    let failed: Vec<&Call> = calls.iter().filter(|c| c.outcome.is_err()).collect();
    assert!(failed.is_empty(), "calls failed under load: {failed:?}");
    let acked_seqs: Vec<u64> = calls
        .iter()
        .filter_map(|c| match c.outcome {
            Ok(Answer::Disclosed(seq)) => Some(seq),
            _ => None,
        })
        .collect();
    let max_seq = *acked_seqs.iter().max().expect("some disclosure");

    // A checkpoint covering every acknowledged disclosure, from whichever replica
    // signs; then the log exported through another replica.
    let (cp, signer) = checkpoint_covering(&env, &addrs, max_seq, Duration::from_secs(15)).await;
    verify_checkpoint(&cp, &verifier_key);
    let other = (signer + 1) % n;
    let exporter = (signer + n - 1) % n;
    let mut export_client = auditor_at(&env, addrs[exporter]).await;
    let log = export(&mut export_client, 0).await;
    assert!(
        log.len() as u64 >= cp.tree_size,
        "the log is shorter than a checkpoint"
    );
    check_acknowledged_calls_in_log(&calls, &log, &record_id, |_| false);
    let disclosures = log
        .iter()
        .filter(|e| e.action == AuditAction::RecordDisclosed as i32)
        .count();
    assert_eq!(
        disclosures,
        acked_seqs.len(),
        "one disclosure entry per answered call"
    );

    // The root, recomputed here from the exported entries, is the signed one.
    let leaves: Vec<[u8; 32]> = log.iter().map(|e| leaf_hash(&e.canonical)).collect();
    assert_eq!(
        tree_hash(&leaves[..cp.tree_size as usize]).to_vec(),
        cp.root_hash,
        "the signed root of size {} is not the root of the exported entries",
        cp.tree_size
    );
    // So are the roots of the checkpoints served under load, by every replica.
    let mut seen: BTreeMap<u64, Checkpoint> = BTreeMap::new();
    for c in &calls {
        if let Ok(Answer::Checkpoint(served)) = &c.outcome {
            verify_checkpoint(served, &verifier_key);
            if let Some(earlier) = seen.insert(served.tree_size, (**served).clone()) {
                assert_eq!(
                    earlier.root_hash, served.root_hash,
                    "two roots for size {}",
                    served.tree_size
                );
            }
        }
    }
    assert!(!seen.is_empty(), "no checkpoint served under load");
    let sizes: Vec<u64> = seen.keys().copied().collect();
    let step = sizes.len().div_ceil(20);
    for size in sizes.iter().step_by(step).chain(sizes.last()) {
        let served = &seen[size];
        assert!(served.tree_size <= cp.tree_size);
        assert_eq!(
            tree_hash(&leaves[..served.tree_size as usize]).to_vec(),
            served.root_hash,
            "checkpoint of size {} served under load",
            served.tree_size
        );
    }

    // Inclusion proofs from a replica other than the signer's.
    let mut proofs = auditor_at(&env, addrs[other]).await;
    let mut sample: BTreeSet<u64> = [0, cp.tree_size - 1].into();
    let mut sorted = acked_seqs.clone();
    sorted.sort_unstable();
    sample.extend(sorted.iter().step_by(sorted.len().div_ceil(24)));
    sample.insert(max_seq);
    for seq in sample {
        let proof = proofs
            .get_inclusion_proof(GetInclusionProofRequest {
                seq,
                tree_size: cp.tree_size,
            })
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "inclusion proof of {seq} from replica {}: {s:?}",
                    label(other)
                )
            })
            .into_inner();
        assert_eq!(hash(&proof.leaf_hash), leaves[seq as usize], "seq {seq}");
        let hashes: Vec<[u8; 32]> = proof.hashes.iter().map(|h| hash(h)).collect();
        merkle::verify_inclusion(
            seq,
            cp.tree_size,
            &leaves[seq as usize],
            &hashes,
            &hash(&cp.root_hash),
        )
        .unwrap_or_else(|e| panic!("seq {seq} in {}: {e}", cp.tree_size));
    }
    // And the earliest checkpoint served under load is consistent with the final one.
    let first = &seen[&sizes[0]];
    let proof = proofs
        .get_consistency_proof(GetConsistencyProofRequest {
            from_size: first.tree_size,
            to_size: cp.tree_size,
        })
        .await
        .expect("consistency proof")
        .into_inner();
    let hashes: Vec<[u8; 32]> = proof.hashes.iter().map(|h| hash(h)).collect();
    merkle::verify_consistency(
        first.tree_size,
        cp.tree_size,
        &hash(&first.root_hash),
        &hash(&cp.root_hash),
        &hashes,
    )
    .expect("the log under load and after it is one log");
    println!(
        "{test}: log of {} entries, {} disclosures, {} checkpoints seen under load",
        log.len(),
        acked_seqs.len(),
        seen.len()
    );
    finish(replicas, db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_disclosing_concurrently_write_one_dense_verifiable_log() {
    replicas_disclosing_concurrently_write_one_dense_verifiable_log("rep_log2", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_disclosing_concurrently_write_one_dense_verifiable_log() {
    replicas_disclosing_concurrently_write_one_dense_verifiable_log("rep_log3", 3).await;
}

// === 2. a replica killed mid-load ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_loses_no_acknowledged_disclosure_and_the_others_serve_on() {
    let Some((env, db)) = prepare("rep_kill").await else {
        return;
    };
    let mut replicas = start_replicas(&env, 3).await;
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let record_id = incident(&env, addrs[0]).await;
    let verifier_key = verifier_key(&env, &addrs).await;

    // The first replica started, most likely the one signing checkpoints, is killed.
    const KILLED: usize = 0;
    // Killed once it has answered 20 disclosures, with its callers mid-call.
    let load = Load::start(&env, &addrs, &record_id).await;
    load.until_disclosed(&[KILLED], 20, Duration::from_secs(30))
        .await;
    let mut killed = replicas.remove(KILLED);
    killed.kill9().await;
    // Taken once the process is reaped: any call started after this cannot have
    // reached it.
    let killed_at = Instant::now();
    // The survivors go on for two seconds, and until each has answered 10 more.
    let before: Vec<usize> = load
        .disclosed
        .iter()
        .map(|d| d.load(Ordering::Relaxed))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let surviving: Vec<usize> = (0..3).filter(|r| *r != KILLED).collect();
    let most = surviving.iter().map(|r| before[*r]).max().unwrap_or(0);
    load.until_disclosed(&surviving, most + 10, Duration::from_secs(30))
        .await;
    let calls = load.finish().await;
    println!("rep_kill: {}", summarise(&calls, 3));

    // The survivors served every call, before and after the kill.
    let survivors_failed: Vec<&Call> = calls
        .iter()
        .filter(|c| c.replica != KILLED && c.outcome.is_err())
        .collect();
    assert!(
        survivors_failed.is_empty(),
        "surviving replicas failed calls: {survivors_failed:?}"
    );
    for &r in &surviving {
        let after = calls
            .iter()
            .filter(|c| c.replica == r && c.started > killed_at && c.outcome.is_ok())
            .count();
        assert!(
            after >= 10,
            "replica {} answered {after} calls after the kill",
            label(r)
        );
    }
    let killed_acked = calls
        .iter()
        .filter(|c| c.replica == KILLED && c.kind == Kind::Disclose && c.outcome.is_ok())
        .count();
    assert!(
        killed_acked >= 20,
        "the killed replica disclosed only {killed_acked} before it died"
    );
    assert!(
        !calls
            .iter()
            .any(|c| c.replica == KILLED && c.started > killed_at && c.outcome.is_ok()),
        "a call to the killed replica was answered after it died"
    );

    // Every acknowledged call is in the log, once; a disclosure that failed may be
    // there only if it was cut by the kill.
    let survivors: Vec<(usize, SocketAddr)> = addrs
        .iter()
        .copied()
        .enumerate()
        .filter(|(r, _)| *r != KILLED)
        .collect();
    // Each survivor's signed checkpoint, then the log exported after them.
    let mut served = Vec::new();
    for (r, addr) in &survivors {
        let mut client = auditor_at(&env, *addr).await;
        let cp = get_checkpoint(&mut client)
            .await
            .expect("checkpoint after the kill");
        verify_checkpoint(&cp, &verifier_key);
        served.push((*r, cp));
    }
    let mut auditor = auditor_at(&env, survivors[0].1).await;
    let log = export(&mut auditor, 0).await;
    check_acknowledged_calls_in_log(&calls, &log, &record_id, |c| {
        c.replica == KILLED && c.started < killed_at
    });
    // The survivors' signed checkpoints agree with the entries as exported.
    let leaves: Vec<[u8; 32]> = log.iter().map(|e| leaf_hash(&e.canonical)).collect();
    for (r, cp) in &served {
        assert!(cp.tree_size as usize <= log.len());
        assert_eq!(
            tree_hash(&leaves[..cp.tree_size as usize]).to_vec(),
            cp.root_hash,
            "replica {}'s checkpoint of size {}",
            label(*r),
            cp.tree_size
        );
    }
    // Signing goes on without the killed replica (it may have held the signing
    // lease, which then lapses): a checkpoint comes to cover its last acknowledged
    // disclosure, and that disclosure's inclusion proof, from the other survivor,
    // verifies against it.
    let last_killed = calls
        .iter()
        .filter(|c| c.replica == KILLED)
        .filter_map(|c| match c.outcome {
            Ok(Answer::Disclosed(seq)) => Some(seq),
            _ => None,
        })
        .max()
        .expect("the killed replica disclosed");
    let survivor_addrs: Vec<SocketAddr> = survivors.iter().map(|(_, a)| *a).collect();
    let waited = Instant::now();
    let (cp, signer) =
        checkpoint_covering(&env, &survivor_addrs, last_killed, Duration::from_secs(30)).await;
    println!(
        "rep_kill: a checkpoint covering seq {last_killed} came {:?} after the load",
        waited.elapsed()
    );
    verify_checkpoint(&cp, &verifier_key);
    let log = export(&mut auditor, cp.tree_size).await;
    let leaves: Vec<[u8; 32]> = log.iter().map(|e| leaf_hash(&e.canonical)).collect();
    assert_eq!(tree_hash(&leaves).to_vec(), cp.root_hash);
    let mut proofs = auditor_at(&env, survivor_addrs[(signer + 1) % 2]).await;
    let proof = proofs
        .get_inclusion_proof(GetInclusionProofRequest {
            seq: last_killed,
            tree_size: cp.tree_size,
        })
        .await
        .expect("inclusion proof")
        .into_inner();
    let hashes: Vec<[u8; 32]> = proof.hashes.iter().map(|h| hash(h)).collect();
    merkle::verify_inclusion(
        last_killed,
        cp.tree_size,
        &leaves[last_killed as usize],
        &hashes,
        &hash(&cp.root_hash),
    )
    .expect("the killed replica's last disclosure is in the signed tree");
    // The survivors keep serving after it all.
    let mut school = records_at(&env, survivors[1].1, "school-oakfield").await;
    let after = school
        .get_record(get(&record_id, Purpose::Safeguarding))
        .await
        .expect("disclosure after the kill")
        .into_inner();
    assert!(after.audit_seq as usize >= log.len());
    println!("rep_kill: log of {} entries", log.len());
    finish(replicas, db).await;
}

// === 3. inbox streams across replicas ===

type Inbox = Streaming<SubscribeInboxResponse>;

async fn subscribe(client: &mut ConcernServiceClient<Channel>, after_cursor: u64) -> Inbox {
    client
        .subscribe_inbox(SubscribeInboxRequest { after_cursor })
        .await
        .expect("subscribe")
        .into_inner()
}

/// The next event, within `within`.
async fn next_within(stream: &mut Inbox, within: Duration, what: &str) -> SubscribeInboxResponse {
    tokio::time::timeout(within, stream.message())
        .await
        .unwrap_or_else(|_| panic!("{what}: no event within {within:?}"))
        .unwrap_or_else(|s| panic!("{what}: stream failed: {s:?}"))
        .unwrap_or_else(|| panic!("{what}: stream ended"))
}

fn concern_of(event: &SubscribeInboxResponse) -> &Concern {
    match &event.event {
        Some(Event::Concern(c)) => c,
        other => panic!("not a concern event: {other:?}"),
    }
}

fn raise(recipients: &[&str], request_id: &str, urgency: Urgency) -> RaiseConcernRequest {
    RaiseConcernRequest {
        subject: subject(),
        category: ConcernCategory::DomesticAbuse as i32,
        urgency: urgency as i32,
        narrative: NARRATIVE.into(),
        recipient_agency_ids: recipients.iter().map(|s| s.to_string()).collect(),
        request_id: request_id.into(),
    }
}

async fn raise_ok(client: &mut ConcernServiceClient<Channel>, req: RaiseConcernRequest) -> Concern {
    client
        .raise_concern(req)
        .await
        .expect("raise")
        .into_inner()
        .concern
        .expect("concern")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_stream_on_one_replica_receives_a_concern_raised_through_another() {
    let Some((env, db)) = prepare("rep_inbox").await else {
        return;
    };
    let replicas = start_replicas(&env, 2).await;
    let (a, b) = (replicas[0].addr, replicas[1].addr);
    let mut school_a = concerns_at(&env, a, "school-oakfield").await;
    let mut school_events_a = subscribe(&mut school_a, 0).await;
    let mut front_door_b = concerns_at(&env, b, "csc-southwark").await;
    let mut front_door_events_b = subscribe(&mut front_door_b, 0).await;

    // Raised through B: the school's stream on A has it within a second or two.
    let mut police_b = concerns_at(&env, b, "police-met").await;
    let raised_at = Instant::now();
    let raised = raise_ok(
        &mut police_b,
        raise(&["school-oakfield"], "cross-1", Urgency::Urgent),
    )
    .await;
    let on_a = next_within(&mut school_events_a, Duration::from_secs(3), "school on A").await;
    println!(
        "a concern raised through B reached A's stream after {:?}",
        raised_at.elapsed()
    );
    assert_eq!(concern_of(&on_a).concern_id, raised.concern_id);
    assert_eq!(concern_of(&on_a).narrative, NARRATIVE);
    assert_eq!(on_a.cursor, 1);
    let fd = next_within(
        &mut front_door_events_b,
        Duration::from_secs(3),
        "front door on B",
    )
    .await;
    assert_eq!(concern_of(&fd).concern_id, raised.concern_id);

    // B's view of the school's inbox has the same event at the same cursor.
    let mut school_b = concerns_at(&env, b, "school-oakfield").await;
    let mut school_events_b = subscribe(&mut school_b, 0).await;
    let replayed = next_within(&mut school_events_b, Duration::from_secs(3), "school on B").await;
    assert_eq!(replayed.cursor, on_a.cursor);
    assert_eq!(concern_of(&replayed).concern_id, raised.concern_id);
    let listed = school_b
        .list_inbox(ListInboxRequest::default())
        .await
        .expect("list inbox on B")
        .into_inner()
        .concerns;
    assert_eq!(
        listed
            .iter()
            .map(|c| c.concern_id.as_str())
            .collect::<Vec<_>>(),
        [raised.concern_id.as_str()]
    );

    // The other way round, with both of the school's streams open: raised through A,
    // both see it at cursor 2.
    let mut police_a = concerns_at(&env, a, "police-met").await;
    let second = raise_ok(
        &mut police_a,
        raise(&["school-oakfield"], "cross-2", Urgency::Urgent),
    )
    .await;
    for (what, stream) in [
        ("school on A", &mut school_events_a),
        ("school on B", &mut school_events_b),
    ] {
        let event = next_within(stream, Duration::from_secs(3), what).await;
        assert_eq!(event.cursor, 2, "{what}");
        assert_eq!(concern_of(&event).concern_id, second.concern_id, "{what}");
    }
    let fd = next_within(
        &mut front_door_events_b,
        Duration::from_secs(3),
        "front door on B",
    )
    .await;
    assert_eq!(concern_of(&fd).concern_id, second.concern_id);
    // The sender sees both delivered to both, through either replica.
    for police in [&mut police_a, &mut police_b] {
        for id in [&raised.concern_id, &second.concern_id] {
            let seen = police
                .get_concern(GetConcernRequest {
                    concern_id: id.clone(),
                })
                .await
                .expect("get concern")
                .into_inner()
                .concern
                .expect("concern");
            assert!(
                seen.recipients.iter().all(|d| d.delivered_at.is_some()),
                "{seen:?}"
            );
        }
    }
    drop((school_events_a, school_events_b, front_door_events_b));
    finish(replicas, db).await;
}

// === 4. consent across replicas ===

/// Consent given by a parent for the school sector to receive A&E attendances for
/// education support.
fn school_consent(state: ConsentState) -> RecordConsentRequest {
    RecordConsentRequest {
        subject: subject(),
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

async fn withdraw(client: &mut ConsentServiceClient<Channel>, consent_id: &str) {
    client
        .withdraw_consent(WithdrawConsentRequest {
            consent_id: consent_id.into(),
            note: "mother withdrew consent by phone".into(),
        })
        .await
        .expect("withdraw");
}

fn assert_refused(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_withdrawn_through_one_replica_is_enforced_by_another_on_the_next_call() {
    let Some((env, db)) = prepare("rep_consent").await else {
        return;
    };
    let replicas = start_replicas(&env, 2).await;
    let (a, b) = (replicas[0].addr, replicas[1].addr);
    let mut nhs_a = records_at(&env, a, "nhs-guys").await;
    let mut nhs_consents_a = consents_at(&env, a, "nhs-guys").await;
    let mut school_b = records_at(&env, b, "school-oakfield").await;
    let record = share(
        &mut nhs_a,
        RecordCategory::UnscheduledCareAttendance,
        b"A&E",
    )
    .await;
    let request = || get(&record.record_id, Purpose::EducationSupport);

    // No consent yet: refused on B.
    assert_refused(
        school_b.get_record(request()).await,
        Code::FailedPrecondition,
        "allows a safeguarding override",
    );
    // Given through A: B discloses on consent on the next call.
    let consent = record_consent(&mut nhs_consents_a, school_consent(ConsentState::Given)).await;
    let first = school_b
        .get_record(request())
        .await
        .expect("consent recorded through A is in force on B")
        .into_inner();
    assert_eq!(first.basis, DisclosureBasis::Consent as i32);

    // Clients disclosing through B while the consent is withdrawn through A (fewer
    // than B has pooled connections: see
    // a_replica_serves_more_concurrent_disclosures_than_it_has_pooled_connections).
    let stopping = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..POOL_SIZE / 2 {
        let mut school = records_at(&env, b, "school-oakfield").await;
        let request = request();
        let stopping = stopping.clone();
        clients.push(tokio::spawn(async move {
            let mut attempts = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                let started = Instant::now();
                let outcome = school
                    .get_record(request.clone())
                    .await
                    .map(|r| r.into_inner().audit_seq)
                    .map_err(|s| (s.code(), s.message().to_owned()));
                attempts.push((started, outcome));
            }
            attempts
        }));
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    withdraw(&mut nhs_consents_a, &consent.consent_id).await;
    let withdrawn_at = Instant::now();
    // The very next call on B is refused, saying why.
    assert_refused(
        school_b.get_record(request()).await,
        Code::FailedPrecondition,
        "was withdrawn",
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    stopping.store(true, Ordering::Relaxed);
    let mut attempts = Vec::new();
    for c in clients {
        attempts.extend(c.await.expect("client task"));
    }

    let mut auditor = auditor_at(&env, b).await;
    let withdrawal = audited(&mut auditor, AuditAction::ConsentWithdrawn).await;
    assert_eq!(withdrawal.len(), 1, "{withdrawal:?}");
    let w = withdrawal[0].seq;
    let disclosed: Vec<AuditEntry> = audited(&mut auditor, AuditAction::RecordDisclosed)
        .await
        .into_iter()
        .filter(|e| e.object_id == record.record_id)
        .collect();
    for e in &disclosed {
        assert_eq!(e.basis, DisclosureBasis::Consent as i32);
        assert!(
            e.seq < w,
            "RECORD_DISCLOSED at seq {} on consent {} after its withdrawal at seq {w}",
            e.seq,
            e.consent_id
        );
    }
    let (mut before, mut refused_after) = (0, 0);
    for (started, outcome) in &attempts {
        match outcome {
            Ok(seq) => {
                assert!(*seq < w, "a client on B was answered seq {seq} >= {w}");
                assert!(
                    *started < withdrawn_at,
                    "B disclosed after the withdrawal through A"
                );
                before += 1;
            }
            Err((code, message)) => {
                assert_eq!(*code, Code::FailedPrecondition, "{message}");
                refused_after += 1;
            }
        }
    }
    println!(
        "rep_consent: {before} disclosures before the withdrawal, {refused_after} refusals after"
    );
    assert!(before > 0, "no disclosure before the withdrawal");
    assert!(refused_after > 0, "no request refused after the withdrawal");
    // Each answered disclosure is in the log; plus the first one above.
    assert_eq!(disclosed.len(), before + 1);

    // The newest statement wins, whichever replica recorded it and whichever asks.
    let mut nhs_consents_b = consents_at(&env, b, "nhs-guys").await;
    let mut school_a = records_at(&env, a, "school-oakfield").await;
    record_consent(&mut nhs_consents_b, school_consent(ConsentState::Given)).await;
    school_a
        .get_record(request())
        .await
        .expect("consent given again through B is in force on A");
    let refused = record_consent(&mut nhs_consents_a, school_consent(ConsentState::Refused)).await;
    assert_refused(
        school_b.get_record(request()).await,
        Code::FailedPrecondition,
        &refused.consent_id,
    );
    assert_refused(
        school_a.get_record(request()).await,
        Code::FailedPrecondition,
        "refuses consent",
    );
    finish(replicas, db).await;
}

// === 5. revocation across replicas ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_replica_cuts_the_agencys_stream_and_calls_on_another() {
    let Some((env, db)) = prepare("rep_revoke").await else {
        return;
    };
    let mut replicas = start_replicas(&env, 2).await;
    let (a, b) = (replicas[0].addr, replicas[1].addr);
    let ca = env.ca_pem();
    let (police_cert, police_key) = env.identity(Role::Agency, "police-met");

    // The police's case system is connected to B, its inbox stream open.
    let police_b = channel(&env, b, Role::Agency, "police-met").await;
    let mut police_inbox_b = ConcernServiceClient::new(police_b.clone());
    let mut stream = subscribe(&mut police_inbox_b, 0).await;
    police_inbox_b
        .list_inbox(ListInboxRequest::default())
        .await
        .expect("the police are served on B before the revocation");
    let school_b = concerns_at(&env, b, "school-oakfield").await;

    // Revoked through A.
    let mut ops_a = OperationsServiceClient::new(channel(&env, a, Role::Operator, "ops").await);
    let serial = sgw::pki::serial_hex_of_pem(&police_cert).expect("serial");
    let revoked_at = Instant::now();
    let status = ops_a
        .revoke_certificate(RevokeCertificateRequest {
            serial_hex: serial.to_uppercase(),
            reason: "laptop stolen".into(),
        })
        .await
        .expect("revoke")
        .into_inner()
        .status
        .expect("status");
    println!(
        "rep_revoke: RevokeCertificate through A answered after {:?}",
        revoked_at.elapsed()
    );
    assert!(status.revoked_serials.contains(&serial), "{status:?}");

    // B ends the open stream with UNAUTHENTICATED...
    let ended = common::stream_end_status(
        &mut stream,
        Duration::from_secs(3),
        "the police's inbox stream on B",
    )
    .await;
    println!(
        "rep_revoke: B ended the stream {:?} after the revocation began",
        revoked_at.elapsed()
    );
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("revoked"), "{ended:?}");
    // ...refuses the next call on the open connection...
    let err = police_inbox_b
        .list_inbox(ListInboxRequest::default())
        .await
        .expect_err("B refuses the revoked agency's next call");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // ...and a new connection; other agencies carry on.
    if let Ok(fresh) = common::connect(b, &ca, Some((&police_cert, &police_key))).await {
        let err = ConcernServiceClient::new(fresh)
            .list_inbox(ListInboxRequest::default())
            .await
            .expect_err("a new connection to B is refused");
        assert_ne!(err.code(), Code::Ok);
    }
    let mut school_b = school_b;
    school_b
        .list_inbox(ListInboxRequest::default())
        .await
        .expect("the school is unaffected on B");

    // A replica started after the revocation refuses it too; it is audited once.
    replicas.push(spawn_replica(&env, 'C').await);
    let c = replicas[2].addr;
    if let Ok(fresh) = common::connect(c, &ca, Some((&police_cert, &police_key))).await {
        let err = ConcernServiceClient::new(fresh)
            .list_inbox(ListInboxRequest::default())
            .await
            .expect_err("a replica started later refuses the revoked certificate");
        assert_ne!(err.code(), Code::Ok);
    }
    let mut auditor = auditor_at(&env, c).await;
    let entries = audited(&mut auditor, AuditAction::CertificateRevoked).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].object_id, serial);
    assert_eq!(entries[0].actor_id, "ops");
    finish(replicas, db).await;
}

// === 6. escalation once ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sweeping_escalate_each_missed_deadline_once() {
    let Some((env, db)) = prepare("rep_escalate").await else {
        return;
    };
    let text = std::fs::read_to_string(env.config_path()).expect("config");
    assert!(text.contains("immediate_risk = \"1h\""));
    std::fs::write(
        env.config_path(),
        text.replace("immediate_risk = \"1h\"", "immediate_risk = \"1s\""),
    )
    .expect("config");
    let replicas = start_replicas(&env, 3).await;
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();

    // The sender listens on A and on C, the front door on B; nobody acknowledges.
    let mut police_a = concerns_at(&env, addrs[0], "police-met").await;
    let mut police_c = concerns_at(&env, addrs[2], "police-met").await;
    let mut front_door_b = concerns_at(&env, addrs[1], "csc-southwark").await;
    let mut streams = [
        ("police on A", subscribe(&mut police_a, 0).await, Vec::new()),
        ("police on C", subscribe(&mut police_c, 0).await, Vec::new()),
        (
            "front door on B",
            subscribe(&mut front_door_b, 0).await,
            Vec::new(),
        ),
    ];

    // One immediate-risk concern raised through each replica, due in 1 s.
    let mut raised = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let mut police = concerns_at(&env, *addr, "police-met").await;
        let mut req = raise(
            &["school-oakfield"],
            &format!("late-{}", label(i)),
            Urgency::ImmediateRisk,
        );
        req.category = ConcernCategory::PhysicalAbuse as i32;
        raised.push(raise_ok(&mut police, req).await);
    }
    let ids: BTreeSet<String> = raised.iter().map(|c| c.concern_id.clone()).collect();

    // Every stream sees each concern's escalation, then nothing more for 3 s (six
    // sweep intervals).
    for (what, stream, events) in streams.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let escalated: BTreeSet<String> = escalations(events).into_keys().collect();
            if escalated == ids {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            events.push(next_within(stream, left, what).await);
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (what, stream, events) in streams.iter_mut() {
        while let Ok(got) = tokio::time::timeout(Duration::from_millis(100), stream.message()).await
        {
            events.push(
                got.unwrap_or_else(|s| panic!("{what}: {s:?}"))
                    .unwrap_or_else(|| panic!("{what}: stream ended")),
            );
        }
        for (id, n) in escalations(events) {
            assert_eq!(n, 1, "{what}: {n} escalation events for {id}: {events:?}");
        }
        let cursors: Vec<u64> = events.iter().map(|e| e.cursor).collect();
        assert!(
            cursors.windows(2).all(|w| w[0] < w[1]),
            "{what}: {cursors:?}"
        );
    }
    // The sender's inbox is one inbox, whichever replica streams it.
    assert_eq!(
        streams[0].2, streams[1].2,
        "police on A and on C saw different inboxes"
    );
    // A replay through B agrees.
    let mut police_b = concerns_at(&env, addrs[1], "police-met").await;
    let mut replay = subscribe(&mut police_b, 0).await;
    for want in &streams[0].2 {
        let got = next_within(&mut replay, Duration::from_secs(3), "police replay on B").await;
        assert_eq!(&got, want);
    }
    if let Ok(got) = tokio::time::timeout(Duration::from_millis(300), replay.message()).await {
        panic!("police replay on B: an event beyond what the streams saw: {got:?}");
    }

    // One CONCERN_ESCALATED entry per late recipient of each concern.
    let mut auditor = auditor_at(&env, addrs[2]).await;
    let mut targets: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in audited(&mut auditor, AuditAction::ConcernEscalated).await {
        assert_eq!(e.actor_id, "system");
        targets
            .entry(e.object_id)
            .or_default()
            .push(e.target_agency_id);
    }
    assert_eq!(targets.keys().cloned().collect::<BTreeSet<_>>(), ids);
    for (id, mut late) in targets {
        late.sort();
        assert_eq!(late, ["csc-southwark", "school-oakfield"], "{id}");
    }
    // And each concern is OVERDUE, seen through any replica.
    let mut school = concerns_at(&env, addrs[0], "school-oakfield").await;
    let overdue = school
        .list_inbox(ListInboxRequest {
            status: ConcernStatus::Overdue as i32,
            ..Default::default()
        })
        .await
        .expect("list overdue")
        .into_inner()
        .concerns;
    assert_eq!(
        overdue
            .iter()
            .map(|c| c.concern_id.clone())
            .collect::<BTreeSet<_>>(),
        ids
    );
    drop(streams);
    finish(replicas, db).await;
}

/// How many escalation events each concern has among `events`.
fn escalations(events: &[SubscribeInboxResponse]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in events {
        if let Some(Event::Escalation(x)) = &e.event {
            *out.entry(x.concern_id.clone()).or_default() += 1;
        }
    }
    out
}

// === 7. more callers than connections ===

/// What tests/records.rs asks of one process (sixteen clients disclosing at once)
/// asked of a replica with fewer pooled database connections than callers: every
/// call is answered, none waits out the pool's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serves_more_concurrent_disclosures_than_it_has_pooled_connections() {
    let Some((env, db)) = prepare("rep_pool").await else {
        return;
    };
    let replicas = start_replicas(&env, 1).await;
    let addr = replicas[0].addr;
    let record_id = incident(&env, addr).await;
    let callers = POOL_SIZE + POOL_SIZE / 2;
    let mut clients = Vec::new();
    for _ in 0..callers {
        clients.push(records_at(&env, addr, "school-oakfield").await);
    }
    let started = Instant::now();
    let tasks: Vec<JoinHandle<Vec<Result<u64, tonic::Status>>>> = clients
        .into_iter()
        .map(|mut school| {
            let record_id = record_id.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                // Ten calls each, or as many as fit in 8 s when calls stall.
                while outcomes.len() < 10 && started.elapsed() < Duration::from_secs(8) {
                    outcomes.push(
                        school
                            .get_record(get(&record_id, Purpose::Safeguarding))
                            .await
                            .map(|r| r.into_inner().audit_seq),
                    );
                }
                outcomes
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.extend(t.await.expect("client task"));
    }
    println!(
        "rep_pool: {} disclosures by {callers} callers over {POOL_SIZE} connections in {:?}",
        outcomes.len(),
        started.elapsed()
    );
    let failed: Vec<&tonic::Status> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert_eq!(
        outcomes.len(),
        callers * 10,
        "{callers} callers made only {} calls in 8 s; {} failed, e.g. {:?}",
        outcomes.len(),
        failed.len(),
        failed.first()
    );
    assert!(
        failed.is_empty(),
        "{} of {} disclosures failed with {callers} callers and pool_size = {POOL_SIZE}: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    finish(replicas, db).await;
}
