//! The audit log on PostgreSQL (issue 9), against a real server.
//!
//! Each test reads the server's URL from `SGW_TEST_POSTGRES_URL` (a role that may
//! create databases, e.g. `postgres://sgw@127.0.0.1:5432/postgres`), makes its own
//! database, and drops it when it passes. When the variable is unset each test says
//! why it is skipped and returns. `.ci/run` starts a throwaway cluster and sets it.
//!
//! Replicas are independent `PgAuditLog`s with their own pools and writer tasks,
//! sharing only the database and the key files, as gateway processes would.

mod pg_common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pg_common::{server_url, with_database, TestDb};
use sgw::audit::merkle::{self, Hash, MemoryTree};
use sgw::audit::query::{self, Filter, Page};
use sgw::audit::writer::AuditSettings;
use sgw::audit::{Actor, AuditError, Auditor, NewEntry};
use sgw::domain::{Clock, ManualClock, SystemClock};
use sgw::pg::{Lease, PgAuditLog, PgAuditSettings, PgConfig};
use sgw::proto::v1::{ActorRole, AuditAction, AuditOutcome};
use sgw::store::keys::SubjectRef;
use sgw::store::Keys;

/// Keys in a folder every replica of a test loads them from (as replicas share key
/// files or a secrets mount).
fn keys_in(dir: &Path) -> Arc<Keys> {
    Arc::new(Keys::load_or_create(dir, None).expect("keys"))
}

async fn replica(db: &TestDb, keys_dir: &Path, clock: Arc<dyn Clock>) -> PgAuditLog {
    open_replica(&db.config(4), keys_dir, clock).await
}

async fn open_replica(config: &PgConfig, keys_dir: &Path, clock: Arc<dyn Clock>) -> PgAuditLog {
    PgAuditLog::open(
        config,
        PgAuditSettings {
            log_id: "sgw.test/audit".into(),
            max_batch: 256,
        },
        keys_in(keys_dir),
        clock,
    )
    .await
    .expect("open the postgres audit log")
}

fn entry(request_id: &str) -> NewEntry {
    let actor = Actor {
        id: "school-1".into(),
        role: ActorRole::Agency,
        cert_sha256: "ab".repeat(32),
    };
    let mut e = NewEntry::new(
        actor,
        AuditAction::ConcernRaised,
        AuditOutcome::Allowed,
        request_id,
    );
    e.target_agency_id = "mash".into();
    e.justification = "sealed free text".into();
    e
}

/// `replicas` replicas, each with `tasks` tasks appending `per_task` entries one
/// after another; returns request id -> acknowledged seq.
async fn append_concurrently(
    logs: &[PgAuditLog],
    tasks: usize,
    per_task: usize,
) -> BTreeMap<String, u64> {
    let mut handles = Vec::new();
    for (r, log) in logs.iter().enumerate() {
        for t in 0..tasks {
            let log = log.clone();
            handles.push(tokio::spawn(async move {
                let mut acked = Vec::with_capacity(per_task);
                for i in 0..per_task {
                    let id = format!("r{r}-t{t}-{i}");
                    let a = log.append(entry(&id)).await.expect("append");
                    acked.push((id, a.seq));
                }
                acked
            }));
        }
    }
    let mut all = BTreeMap::new();
    for h in handles {
        for (id, seq) in h.await.expect("task") {
            assert!(all.insert(id, seq).is_none());
        }
    }
    all
}

/// Everything a verifier checks, computed here independently from the opened
/// entries: dense seqs, each acknowledged seq holding its own request, times never
/// decreasing, the stored root and proofs against a tree rebuilt from the entries.
async fn check_log(log: &PgAuditLog, acked: &BTreeMap<String, u64>) {
    let n = acked.len() as u64;
    let mut seqs: Vec<u64> = acked.values().copied().collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..n).collect::<Vec<_>>(),
        "seqs are 0..n, no gap or duplicate"
    );
    assert_eq!(log.size().await.unwrap(), n);

    let mut leaves: Vec<Hash> = Vec::with_capacity(n as usize);
    let mut by_seq = vec![String::new(); n as usize];
    for (id, seq) in acked {
        by_seq[*seq as usize] = id.clone();
    }
    let mut last_time = i64::MIN;
    for seq in 0..n {
        let e = log.entry(seq).await.unwrap();
        assert_eq!(e.seq, seq);
        assert_eq!(
            e.request_id, by_seq[seq as usize],
            "seq {seq} holds its own request"
        );
        assert_eq!(e.justification, "sealed free text");
        let t = e
            .time
            .as_ref()
            .map(sgw::audit::entry::micros_from_timestamp)
            .unwrap();
        assert!(t >= last_time, "time never decreases with seq (seq {seq})");
        last_time = t;
        leaves.push(merkle::leaf_hash(&e.canonical));
    }
    let mem: MemoryTree = leaves.iter().copied().collect();
    assert_eq!(
        log.root(n).await.unwrap(),
        mem.root(),
        "stored-tile root = rebuilt root"
    );

    let sizes = [1, 2, 3, 63, 64, 65, 127, 128, 129, 1000, n / 2, n - 1, n];
    let sizes: Vec<u64> = sizes.into_iter().filter(|s| *s >= 1 && *s <= n).collect();
    for &size in &sizes {
        let root = log.root(size).await.unwrap();
        assert_eq!(root, merkle::root(size, &mem).unwrap(), "root at {size}");
        for seq in [0, size / 3, size / 2, size - 1] {
            let (leaf, proof) = log.inclusion_proof(seq, size).await.unwrap();
            assert_eq!(leaf, leaves[seq as usize]);
            merkle::verify_inclusion(seq, size, &leaf, &proof, &root)
                .unwrap_or_else(|e| panic!("inclusion of {seq} in {size}: {e}"));
        }
        for &from in &sizes {
            if from <= size {
                let proof = log.consistency_proof(from, size).await.unwrap();
                let from_root = log.root(from).await.unwrap();
                merkle::verify_consistency(from, size, &from_root, &root, &proof)
                    .unwrap_or_else(|e| panic!("consistency {from} -> {size}: {e}"));
            }
        }
    }
    assert!(matches!(
        log.root(n + 1).await,
        Err(AuditError::OutOfRange(_))
    ));
    assert!(matches!(log.entry(n).await, Err(AuditError::OutOfRange(_))));
    let summary = log.verify().await.expect("verify");
    assert_eq!(summary.entries, n);
    assert_eq!(summary.root, mem.root());
}

async fn replicas_append_concurrently(test: &str, replicas: usize) {
    let Some(url) = server_url(test) else { return };
    let db = TestDb::create(&url, test).await;
    let keys = tempfile::tempdir().unwrap();
    // The operator provisions the key files before the replicas start (their first
    // creation is not safe against concurrent creators: see Keys::load_or_create).
    keys_in(keys.path());
    // Replicas start together: migrations must be applied once, by whoever is first.
    let (config, keys_dir) = (db.config(4), keys.path().to_owned());
    let logs: Vec<PgAuditLog> = futures_join_all((0..replicas).map(|_| {
        let (config, keys_dir) = (config.clone(), keys_dir.clone());
        async move { open_replica(&config, &keys_dir, Arc::new(SystemClock)).await }
    }))
    .await;
    // An auditor verifies while the replicas append: each run sees one snapshot.
    let verifier = {
        let log = logs[0].clone();
        tokio::spawn(async move {
            let mut runs = Vec::new();
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                runs.push(log.verify().await.expect("verify during appends").entries);
            }
            runs
        })
    };
    let started = Instant::now();
    let acked = append_concurrently(&logs, 8, 200).await;
    let took = started.elapsed();
    let runs = verifier.await.unwrap();
    println!("{test}: verified during appends at sizes {runs:?}");
    let commits: u64 = logs
        .iter()
        .map(|l| l.stats().commits.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    println!(
        "{test}: {} appends by {replicas} replicas x 8 tasks in {took:.2?} ({:.0}/s, {commits} commits)",
        acked.len(),
        acked.len() as f64 / took.as_secs_f64()
    );
    check_log(&logs[0], &acked).await;
    drop(logs);
    db.drop_database().await;
}

/// Awaits every future (the test crate has no `futures` dependency).
async fn futures_join_all<
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_append_concurrently_into_one_dense_verifiable_log() {
    replicas_append_concurrently("two_replicas", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_append_concurrently_into_one_dense_verifiable_log() {
    replicas_append_concurrently("three_replicas", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_apply_each_migration_once() {
    let Some(url) = server_url("migrations") else {
        return;
    };
    let db = TestDb::create(&url, "migrations").await;
    let pools: Vec<_> = (0..6).map(|_| db.config(1).pool().unwrap()).collect();
    let applied = futures_join_all(
        pools
            .into_iter()
            .map(|p| async move { sgw::pg::migrate::migrate(&p).await.expect("migrate") }),
    )
    .await;
    let mut all: Vec<i32> = applied.into_iter().flatten().collect();
    all.sort_unstable();
    let expected: Vec<i32> = sgw::pg::migrate::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(
        all, expected,
        "each migration applied by exactly one starter"
    );
    let sql = db.sql().await;
    let rows = sql
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let mut with_lock = vec![0];
    with_lock.extend(&expected);
    assert_eq!(versions, with_lock);
    // A schema newer than this build is refused.
    sql.execute(
        "INSERT INTO schema_migrations (version, name) VALUES (9999, 'from the future')",
        &[],
    )
    .await
    .unwrap();
    let err = sgw::pg::migrate::migrate(&db.config(1).pool().unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("newer than this sgw"), "{err}");
    drop(sql);
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_append_is_readable_through_a_fresh_pool() {
    let Some(url) = server_url("fresh_pool") else {
        return;
    };
    let db = TestDb::create(&url, "fresh_pool").await;
    let keys = tempfile::tempdir().unwrap();
    let first = replica(&db, keys.path(), Arc::new(SystemClock)).await;
    let sessions = first.pool().get().await.unwrap();
    let row = sessions
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, &str>(0),
        "on",
        "every session commits synchronously"
    );
    drop(sessions);
    let batch = first
        .append_batch((0..70).map(|i| entry(&format!("batch-{i}"))).collect())
        .await
        .unwrap();
    assert_eq!(
        batch.iter().map(|a| a.seq).collect::<Vec<_>>(),
        (0..70).collect::<Vec<_>>()
    );
    let one = first.append(entry("the-one")).await.unwrap();
    assert_eq!(one.seq, 70);
    drop(first); // its pool and writer go away

    let second = replica(&db, keys.path(), Arc::new(SystemClock)).await;
    assert_eq!(second.size().await.unwrap(), 71);
    let e = second.entry(one.seq).await.unwrap();
    assert_eq!(e.request_id, "the-one");
    assert_eq!(
        sgw::audit::entry::micros_from_timestamp(e.time.as_ref().unwrap()),
        one.time_micros
    );
    second.verify().await.unwrap();
    drop(second);
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_time_never_decreases_across_replicas_with_skewed_clocks() {
    let Some(url) = server_url("skewed_clocks") else {
        return;
    };
    let db = TestDb::create(&url, "skewed_clocks").await;
    let keys = tempfile::tempdir().unwrap();
    let t0 = time::macros::datetime!(2025-03-01 09:00 UTC);
    let ahead = Arc::new(ManualClock::new(t0 + time::Duration::hours(1)));
    let behind = Arc::new(ManualClock::new(t0));
    let a = replica(&db, keys.path(), ahead.clone()).await;
    let b = replica(&db, keys.path(), behind.clone()).await;
    let first = a.append(entry("a")).await.unwrap();
    let second = b.append(entry("b")).await.unwrap();
    assert_eq!(second.seq, first.seq + 1);
    assert_eq!(
        second.time_micros, first.time_micros,
        "the replica whose clock is behind takes the head's time"
    );
    behind.advance(time::Duration::hours(2));
    let third = b.append(entry("c")).await.unwrap();
    assert!(third.time_micros > first.time_micros);
    a.verify().await.unwrap();
    drop((a, b));
    db.drop_database().await;
}

/// The sealing context of entry `seq` as an insider who holds the key would build
/// it, to forge an entry that opens.
fn seal_context(seq: u64) -> Vec<u8> {
    let mut c = b"audit:".to_vec();
    c.extend_from_slice(&seq.to_be_bytes());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_rows_are_detected_by_verification() {
    let Some(url) = server_url("tampering") else {
        return;
    };
    let db = TestDb::create(&url, "tampering").await;
    let keys = tempfile::tempdir().unwrap();
    let log = replica(&db, keys.path(), Arc::new(SystemClock)).await;
    log.append_batch((0..150).map(|i| entry(&format!("e{i}"))).collect())
        .await
        .unwrap();
    let lease = Lease::new(
        log.pool().clone(),
        "checkpoint",
        "replica-a",
        Duration::from_secs(30),
    );
    assert!(lease.try_acquire().await.unwrap());
    let cp = log.checkpoint_if_holder(&lease).await.unwrap().unwrap();
    assert_eq!(cp.checkpoint.tree_size, 150);
    let good = log.verify().await.unwrap();
    assert_eq!((good.entries, good.checkpoints), (150, 1));
    let sql = db.sql().await;
    let sealed_of = |seq: i64| {
        let sql = &sql;
        async move {
            sql.query_one("SELECT sealed FROM audit_entries WHERE seq = $1", &[&seq])
                .await
                .unwrap()
                .get::<_, Vec<u8>>(0)
        }
    };
    let set_sealed = |seq: i64, v: Vec<u8>| {
        let sql = &sql;
        async move {
            sql.execute(
                "UPDATE audit_entries SET sealed = $2 WHERE seq = $1",
                &[&seq, &v],
            )
            .await
            .unwrap();
        }
    };
    let expect_corrupt = |r: Result<sgw::pg::VerifySummary, AuditError>, needle: &str| match r {
        Err(AuditError::Corrupt(m)) => assert!(m.contains(needle), "{m:?} should name {needle:?}"),
        other => panic!("tampering not detected: {other:?}"),
    };

    // One flipped bit in a leaf row.
    let original = sealed_of(37).await;
    let mut flipped = original.clone();
    flipped[20] ^= 1;
    set_sealed(37, flipped).await;
    expect_corrupt(log.verify().await, "seq 37");
    assert!(matches!(log.entry(37).await, Err(AuditError::Corrupt(_))));
    set_sealed(37, original).await;
    log.verify().await.unwrap();

    // Two leaf rows swapped (each still opens under its own seq? no: the seq is the
    // associated data, so neither does).
    let (s10, s11) = (sealed_of(10).await, sealed_of(11).await);
    set_sealed(10, s11.clone()).await;
    set_sealed(11, s10.clone()).await;
    expect_corrupt(log.verify().await, "seq 10");
    set_sealed(10, s10).await;
    set_sealed(11, s11).await;

    // An insider with the sealing key rewrites entry 90 so that it opens and decodes:
    // its leaf no longer matches the stored tree (and the signed checkpoint).
    let original = sealed_of(90).await;
    let mut forged = log.entry(90).await.unwrap();
    forged.canonical.clear();
    forged.reason = "nothing to see".into();
    let bytes = prost::Message::encode_to_vec(&forged);
    let ks = keys_in(keys.path());
    set_sealed(90, ks.audit_seal.seal(&seal_context(90), &bytes).unwrap()).await;
    expect_corrupt(log.verify().await, "Merkle node 0/90");
    // ... even if they also rewrite the tiles from the forged leaves: the signed
    // checkpoint's root then no longer matches.
    sql.execute("DELETE FROM audit_tiles", &[]).await.unwrap();
    sql.execute("UPDATE audit_head SET size = 0", &[])
        .await
        .unwrap();
    let rows = sql
        .query("SELECT seq, sealed FROM audit_entries ORDER BY seq", &[])
        .await
        .unwrap();
    let leaves: Vec<Hash> = rows
        .iter()
        .map(|r| {
            let seq: i64 = r.get(0);
            let plain = ks
                .audit_seal
                .open(&seal_context(seq as u64), r.get::<_, &[u8]>(1))
                .unwrap();
            merkle::leaf_hash(&plain)
        })
        .collect();
    let mem: MemoryTree = leaves.iter().copied().collect();
    for level in 0..8u8 {
        let nodes: Vec<Hash> = (0..(150u64 >> level))
            .map(|i| merkle::NodeSource::node(&mem, level, i).unwrap())
            .collect();
        for (t, chunk) in nodes.chunks(64).enumerate() {
            let hashes: Vec<u8> = chunk.concat();
            sql.execute(
                "INSERT INTO audit_tiles (level, tile_index, hashes) VALUES ($1, $2, $3)",
                &[&i16::from(level), &(t as i64), &hashes],
            )
            .await
            .unwrap();
        }
    }
    sql.execute("UPDATE audit_head SET size = 150", &[])
        .await
        .unwrap();
    expect_corrupt(log.verify().await, "checkpoint at size 150");
    set_sealed(90, original).await;

    // A deleted row is a gap.
    sql.execute("DELETE FROM audit_entries WHERE seq = 120", &[])
        .await
        .unwrap();
    expect_corrupt(log.verify().await, "seq 120");
    assert!(matches!(log.entry(120).await, Err(AuditError::Corrupt(_))));
    drop((sql, log));
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_signs_checkpoints_and_every_replica_serves_them() {
    let Some(url) = server_url("leases") else {
        return;
    };
    let db = TestDb::create(&url, "leases").await;
    let keys = tempfile::tempdir().unwrap();
    let a = replica(&db, keys.path(), Arc::new(SystemClock)).await;
    let b = replica(&db, keys.path(), Arc::new(SystemClock)).await;
    let ttl = Duration::from_secs(30);
    let lease_a = Lease::new(a.pool().clone(), "checkpoint", "replica-a", ttl);
    let lease_b = Lease::new(b.pool().clone(), "checkpoint", "replica-b", ttl);
    let (got_a, got_b) = tokio::join!(lease_a.try_acquire(), lease_b.try_acquire());
    assert!(
        got_a.unwrap() ^ got_b.unwrap(),
        "exactly one replica holds the lease"
    );
    let (holder, holder_lease, other, other_lease) = if lease_a.try_acquire().await.unwrap() {
        (&a, &lease_a, &b, &lease_b)
    } else {
        (&b, &lease_b, &a, &lease_a)
    };
    assert!(!other_lease.try_acquire().await.unwrap());
    other.append(entry("x")).await.unwrap();
    holder.append(entry("y")).await.unwrap();
    assert!(other
        .checkpoint_if_holder(other_lease)
        .await
        .unwrap()
        .is_none());
    let cp = holder
        .checkpoint_if_holder(holder_lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cp.checkpoint.tree_size, 2);
    assert_eq!(cp.checkpoint.log_id, "sgw.test/audit");
    assert_eq!(other.latest_checkpoint().await.unwrap(), Some(cp.clone()));
    sgw::audit::checkpoint::verify(&cp.public_key, &cp).unwrap();
    // Released, the other replica takes it at once and signs from then on.
    holder_lease.release().await.unwrap();
    assert!(other_lease.try_acquire().await.unwrap());
    other.append(entry("z")).await.unwrap();
    assert!(holder
        .checkpoint_if_holder(holder_lease)
        .await
        .unwrap()
        .is_none());
    let cp2 = other
        .checkpoint_if_holder(other_lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cp2.checkpoint.tree_size, 3);
    let proof = a.consistency_proof(2, 3).await.unwrap();
    merkle::verify_consistency(
        2,
        3,
        &cp.checkpoint.root_hash,
        &cp2.checkpoint.root_hash,
        &proof,
    )
    .unwrap();
    assert_eq!(a.verify().await.unwrap().checkpoints, 2);
    drop((a, b));
    db.drop_database().await;
}

// --- queries: the same pages and tokens as the sled log ------------------------------

/// What the test knows of each appended entry, to work out a filter's answer alone.
#[derive(Debug, Clone)]
struct Written {
    seq: u64,
    time_micros: i64,
    subject: Option<String>,
    actor: String,
    target: String,
    action: i32,
}

/// A PostgreSQL log and a sled log holding the same entries: appended in the same
/// order, one at a time, on one manual clock, so seqs, times and canonical bytes
/// agree.
struct TwinLogs {
    pg: PgAuditLog,
    sled: Auditor,
    appended: Vec<Written>,
    _dir: tempfile::TempDir,
}

/// Subject `k`'s keyed hash: distinct in its first 12 characters (the filter's
/// fingerprint, and so a token's binding, sees only those: `SubjectRef`'s Debug).
fn subject(k: u64) -> SubjectRef {
    SubjectRef::from_hex(format!("{k:02x}").repeat(32))
}

/// A deterministic mix of `i`, for spreading field values without a pattern.
fn mix(i: u64, salt: u64) -> u64 {
    let mut z = i.wrapping_add(salt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

const ACTORS: [&str; 4] = ["school-1", "gp-2", "police-3", "system"];
const RARE_ACTOR: &str = "auditor-9";
const TARGETS: [&str; 4] = ["mash", "school-1", "hospital-4", ""];
const ACTIONS: [AuditAction; 5] = [
    AuditAction::ConcernRaised,
    AuditAction::RecordDisclosed,
    AuditAction::DisclosureDenied,
    AuditAction::RecordShared,
    AuditAction::ConsentRecorded,
];
const RARE_ACTION: AuditAction = AuditAction::RecordPurged;
const QUERY_T0_MICROS: i64 = 1_740_819_600_000_000; // 2025-03-01 09:00 UTC

/// Entry `i` of the query tests: six subjects and none, four actors and a rare one,
/// four targets (one empty), five actions and a rare one.
fn varied_entry(i: u64) -> NewEntry {
    let actor = if mix(i, 1).is_multiple_of(40) {
        RARE_ACTOR
    } else {
        ACTORS[(mix(i, 2) % 4) as usize]
    };
    let action = if mix(i, 3).is_multiple_of(30) {
        RARE_ACTION
    } else {
        ACTIONS[(mix(i, 4) % 5) as usize]
    };
    let mut e = NewEntry::new(
        Actor {
            id: actor.into(),
            role: ActorRole::Agency,
            cert_sha256: "cd".repeat(32),
        },
        action,
        AuditOutcome::Allowed,
        &format!("q-{i}"),
    );
    let s = mix(i, 5) % 9;
    e.subject = (s < 6).then(|| subject(s));
    e.target_agency_id = TARGETS[(mix(i, 6) % 4) as usize].into();
    e.object_id = format!("obj-{i}");
    e
}

/// `n` varied entries in both logs; the clock moves one second every ten entries,
/// so runs of entries share a time.
async fn twin_logs(db: &TestDb, n: u64) -> TwinLogs {
    let dir = tempfile::tempdir().unwrap();
    let t0 = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(QUERY_T0_MICROS) * 1000)
        .unwrap();
    let clock = Arc::new(ManualClock::new(t0));
    let pg = replica(db, dir.path(), clock.clone()).await;
    let sled = Auditor::open(
        AuditSettings {
            dir: dir.path().join("audit"),
            log_id: "sgw.test/audit".into(),
            max_batch: 64,
            cache_bytes: 8 << 20,
            wal_bytes: sgw::audit::writer::DEFAULT_WAL_BYTES,
        },
        keys_in(dir.path()),
        clock.clone(),
    )
    .expect("open the sled audit log");
    let mut appended = Vec::with_capacity(n as usize);
    for i in 0..n {
        if i > 0 && i.is_multiple_of(10) {
            clock.advance(time::Duration::seconds(1));
        }
        let e = varied_entry(i);
        let row = Written {
            seq: i,
            time_micros: 0,
            subject: e.subject.as_ref().map(|s| s.as_str().to_owned()),
            actor: e.actor.id.clone(),
            target: e.target_agency_id.clone(),
            action: e.action as i32,
        };
        let in_pg = pg.append(e.clone()).await.expect("pg append");
        let in_sled = sled.append(e).await.expect("sled append");
        assert_eq!((in_pg.seq, in_sled.seq()), (i, i));
        assert_eq!(in_pg.time_micros, in_sled.time_micros());
        appended.push(Written {
            time_micros: in_pg.time_micros,
            ..row
        });
    }
    TwinLogs {
        pg,
        sled,
        appended,
        _dir: dir,
    }
}

/// The seqs `filter` selects, worked out from what was appended. An empty subject or
/// target selects nothing: neither log indexes empty ones (the API never asks, it
/// reads an empty field as no filter).
fn expected_seqs(appended: &[Written], f: &Filter) -> Vec<u64> {
    let empty = |v: Option<&str>| v == Some("");
    if empty(f.subject.as_ref().map(|s| s.as_str())) || empty(f.target_agency_id.as_deref()) {
        return Vec::new();
    }
    appended
        .iter()
        .filter(|a| {
            f.subject
                .as_ref()
                .is_none_or(|s| a.subject.as_deref() == Some(s.as_str()))
                && f.actor_id.as_ref().is_none_or(|x| *x == a.actor)
                && f.target_agency_id.as_ref().is_none_or(|x| *x == a.target)
                && f.action.is_none_or(|x| x == a.action)
                && f.since_micros.is_none_or(|t| a.time_micros >= t)
                && f.until_micros.is_none_or(|t| a.time_micros < t)
        })
        .map(|a| a.seq)
        .collect()
}

/// What paging through one query to its end saw.
#[derive(Debug, Default)]
struct Paged {
    seqs: Vec<u64>,
    pages: usize,
    /// Pages shorter than `page_size` that still carried a token (the scan bound).
    short_with_token: usize,
}

/// Pages through `filter` on both logs, asserting that every page (entries and
/// token) is identical; returns what the PostgreSQL pages held.
async fn page_through_both(
    logs: &TwinLogs,
    filter: &Filter,
    page_size: usize,
    max_scan: usize,
) -> Paged {
    let mut token = String::new();
    let mut paged = Paged::default();
    loop {
        let what = format!(
            "{filter:?}, page_size {page_size}, max_scan {max_scan}, page {}",
            paged.pages
        );
        let sled = query::run(logs.sled.log(), filter, &token, page_size, max_scan)
            .unwrap_or_else(|e| panic!("sled {what}: {e}"));
        let pg = logs
            .pg
            .query(filter, &token, page_size, max_scan)
            .await
            .unwrap_or_else(|e| panic!("pg {what}: {e}"));
        let seqs = |p: &Page| p.entries.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&pg), seqs(&sled), "{what}: seqs");
        assert_eq!(pg.next_page_token, sled.next_page_token, "{what}: token");
        assert_eq!(pg, sled, "{what}: entries");
        assert!(
            pg.entries.len() <= page_size.max(1),
            "{what}: page too long"
        );
        paged.pages += 1;
        paged.seqs.extend(seqs(&pg));
        match pg.next_page_token {
            Some(next) => {
                if pg.entries.len() < page_size {
                    paged.short_with_token += 1;
                }
                token = next;
            }
            None => return paged,
        }
        assert!(paged.pages <= 2_000, "{what}: paging does not end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_give_the_sled_logs_pages_and_tokens() {
    let Some(url) = server_url("pg_query") else {
        return;
    };
    let db = TestDb::create(&url, "pg_query").await;
    let logs = twin_logs(&db, 300).await;
    let at = |seq: usize| logs.appended[seq].time_micros;
    let last = logs.appended.last().unwrap().time_micros;
    let some = |s: &str| Some(s.to_owned());
    let rare_action = Some(RARE_ACTION as i32);
    let filters = [
        Filter::default(),
        Filter {
            subject: Some(subject(0)),
            ..Default::default()
        },
        Filter {
            subject: Some(subject(4)),
            ..Default::default()
        },
        Filter {
            subject: Some(subject(99)),
            ..Default::default()
        },
        Filter {
            actor_id: some("gp-2"),
            ..Default::default()
        },
        Filter {
            actor_id: some(RARE_ACTOR),
            ..Default::default()
        },
        Filter {
            target_agency_id: some("mash"),
            ..Default::default()
        },
        Filter {
            target_agency_id: some(""),
            ..Default::default()
        },
        Filter {
            action: Some(AuditAction::RecordDisclosed as i32),
            ..Default::default()
        },
        Filter {
            action: rare_action,
            ..Default::default()
        },
        Filter {
            subject: Some(subject(1)),
            actor_id: some("police-3"),
            ..Default::default()
        },
        Filter {
            subject: Some(subject(2)),
            target_agency_id: some("hospital-4"),
            action: Some(AuditAction::ConcernRaised as i32),
            ..Default::default()
        },
        Filter {
            actor_id: some("school-1"),
            action: rare_action,
            ..Default::default()
        },
        Filter {
            target_agency_id: some("school-1"),
            actor_id: some("system"),
            ..Default::default()
        },
        // Time bounds: on a run's first entry, inside a run, past the end, before
        // the start, empty and inverted ranges, with and without column filters.
        Filter {
            since_micros: Some(at(120)),
            ..Default::default()
        },
        Filter {
            since_micros: Some(at(125) + 1),
            ..Default::default()
        },
        Filter {
            until_micros: Some(at(70)),
            ..Default::default()
        },
        Filter {
            since_micros: Some(at(40)),
            until_micros: Some(at(230)),
            ..Default::default()
        },
        Filter {
            since_micros: Some(last + 1),
            ..Default::default()
        },
        Filter {
            until_micros: Some(QUERY_T0_MICROS),
            ..Default::default()
        },
        Filter {
            since_micros: Some(at(200)),
            until_micros: Some(at(100)),
            ..Default::default()
        },
        Filter {
            since_micros: Some(at(100)),
            until_micros: Some(at(100)),
            ..Default::default()
        },
        Filter {
            subject: Some(subject(3)),
            since_micros: Some(at(50)),
            until_micros: Some(at(250) + 500_000),
            ..Default::default()
        },
        Filter {
            actor_id: some("gp-2"),
            action: Some(AuditAction::RecordShared as i32),
            until_micros: Some(at(150)),
            ..Default::default()
        },
    ];
    let mut runs = 0;
    for filter in &filters {
        let expected = expected_seqs(&logs.appended, filter);
        for page_size in [1, 4, 25, 1000] {
            for max_scan in [usize::MAX, 10_000, 9, 1] {
                if max_scan == 1 && page_size > 4 {
                    continue; // one row a page: the smaller page sizes cover it
                }
                let paged = page_through_both(&logs, filter, page_size, max_scan).await;
                assert_eq!(
                    paged.seqs, expected,
                    "{filter:?}, page_size {page_size}, max_scan {max_scan}: paging to the end collects exactly the matches"
                );
                runs += 1;
            }
        }
    }
    assert!(
        expected_seqs(&logs.appended, &filters[5]).len() >= 3,
        "the rare actor appears a few times"
    );

    // A sparse filter: the subject's index drives the scan, and only a few of its
    // rows are by this actor. A small scan bound gives short (even empty) pages with
    // tokens, and paging to the end still collects exactly the matches.
    let sparse = Filter {
        subject: Some(subject(0)),
        actor_id: some("police-3"),
        ..Default::default()
    };
    let expected = expected_seqs(&logs.appended, &sparse);
    let driving = expected_seqs(
        &logs.appended,
        &Filter {
            subject: Some(subject(0)),
            ..Default::default()
        },
    );
    assert!(
        !expected.is_empty() && expected.len() * 2 < driving.len(),
        "sparse: {} of {} rows match",
        expected.len(),
        driving.len()
    );
    let paged = page_through_both(&logs, &sparse, 10, 5).await;
    assert_eq!(paged.seqs, expected);
    assert_eq!(paged.pages, driving.len().div_ceil(5), "{paged:?}");
    assert!(paged.short_with_token >= 3, "{paged:?}");

    // Tokens are bound to their query: another filter's token, a changed bound's,
    // and garbage are refused by both logs alike.
    let by_gp = Filter {
        actor_id: some("gp-2"),
        ..Default::default()
    };
    let token = logs
        .pg
        .query(&by_gp, "", 5, usize::MAX)
        .await
        .unwrap()
        .next_page_token
        .unwrap();
    let others = [
        Filter {
            actor_id: some("police-3"),
            ..Default::default()
        },
        Filter {
            actor_id: some("gp-2"),
            since_micros: Some(at(1)),
            ..Default::default()
        },
        Filter::default(),
    ];
    for other in &others {
        assert_eq!(
            logs.pg.query(other, &token, 5, usize::MAX).await,
            Err(AuditError::BadPageToken),
            "{other:?}"
        );
        assert_eq!(
            query::run(logs.sled.log(), other, &token, 5, usize::MAX),
            Err(AuditError::BadPageToken)
        );
    }
    for garbage in ["!!", "AAAA", &token[1..]] {
        assert_eq!(
            logs.pg.query(&by_gp, garbage, 5, usize::MAX).await,
            Err(AuditError::BadPageToken)
        );
    }
    // The sled log's token goes on in PostgreSQL and the other way round.
    let sled_first = query::run(logs.sled.log(), &by_gp, "", 5, usize::MAX).unwrap();
    assert_eq!(sled_first.next_page_token.as_deref(), Some(token.as_str()));
    assert_eq!(
        logs.pg.query(&by_gp, &token, 5, usize::MAX).await.unwrap(),
        query::run(logs.sled.log(), &by_gp, &token, 5, usize::MAX).unwrap()
    );

    // An altered index column cannot bring in an entry that does not match: one
    // row's columns claim subject 5 and the rare actor, but its opened entry says
    // otherwise.
    let claimed = subject(5);
    let altered = logs
        .appended
        .iter()
        .find(|a| a.subject.as_deref() != Some(claimed.as_str()) && a.actor != RARE_ACTOR)
        .unwrap()
        .seq;
    let sql = db.sql().await;
    sql.execute(
        "UPDATE audit_entries SET subject_ref = $2, actor_id = $3 WHERE seq = $1",
        &[&(altered as i64), &claimed.as_str(), &RARE_ACTOR],
    )
    .await
    .unwrap();
    for filter in [
        Filter {
            subject: Some(claimed),
            ..Default::default()
        },
        Filter {
            actor_id: some(RARE_ACTOR),
            ..Default::default()
        },
    ] {
        let page = logs.pg.query(&filter, "", 1000, usize::MAX).await.unwrap();
        let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
        assert!(
            !seqs.contains(&altered),
            "{filter:?}: the altered row is not let in"
        );
        assert_eq!(seqs, expected_seqs(&logs.appended, &filter));
    }
    println!("pg_query: {runs} filter/page-size/scan-bound combinations paged identically");
    logs.sled.close().await;
    drop((sql, logs));
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_reads_a_range_opened_and_checked() {
    let Some(url) = server_url("pg_entries") else {
        return;
    };
    let db = TestDb::create(&url, "pg_entries").await;
    let logs = twin_logs(&db, 300).await;
    let n = 300u64;
    // In chunks of up to 256, as ExportEntries reads: the sled log's entries.
    let mut all = Vec::new();
    let mut from = 0;
    while from < n {
        let to = (from + 256).min(n);
        let chunk = logs.pg.entries(from, to).await.unwrap();
        assert_eq!(chunk.len() as u64, to - from);
        all.extend(chunk);
        from = to;
    }
    for (seq, e) in all.iter().enumerate() {
        assert_eq!(*e, logs.sled.log().entry(seq as u64).unwrap(), "seq {seq}");
        assert!(!e.canonical.is_empty());
    }
    assert_eq!(logs.pg.entries(0, n).await.unwrap(), all);
    assert_eq!(logs.pg.entries(n - 3, n).await.unwrap(), all[297..]);
    assert_eq!(logs.pg.entries(n, n).await.unwrap(), vec![]);
    assert_eq!(logs.pg.entries(17, 17).await.unwrap(), vec![]);
    for (from, to) in [(0, n + 1), (n, n + 1), (n + 5, n + 9), (10, 9)] {
        assert!(
            matches!(
                logs.pg.entries(from, to).await,
                Err(AuditError::OutOfRange(_))
            ),
            "[{from}, {to})"
        );
    }

    // Damage is named: a flipped bit, then a deleted row (a gap, for a range
    // and for an unfiltered query scanning across it).
    let sql = db.sql().await;
    sql.execute(
        "UPDATE audit_entries SET sealed = set_byte(sealed, 20, get_byte(sealed, 20) # 1) WHERE seq = 150",
        &[],
    )
    .await
    .unwrap();
    match logs.pg.entries(140, 160).await {
        Err(AuditError::Corrupt(m)) => assert!(m.contains("seq 150"), "{m}"),
        other => panic!("a flipped bit not detected: {other:?}"),
    }
    assert_eq!(logs.pg.entries(140, 150).await.unwrap(), all[140..150]);
    sql.execute("DELETE FROM audit_entries WHERE seq = 150", &[])
        .await
        .unwrap();
    for range in [(100, 200), (150, 151), (149, 300)] {
        match logs.pg.entries(range.0, range.1).await {
            Err(AuditError::Corrupt(m)) => assert!(m.contains("seq 150"), "{range:?}: {m}"),
            other => panic!("{range:?}: a gap not detected: {other:?}"),
        }
    }
    match logs
        .pg
        .query(&Filter::default(), "", 1000, usize::MAX)
        .await
    {
        Err(AuditError::Corrupt(m)) => assert!(m.contains("seq 150"), "{m}"),
        other => panic!("a gap in a query's scan not detected: {other:?}"),
    }
    logs.sled.close().await;
    drop((sql, logs));
    db.drop_database().await;
}

// --- kill -9 of a writer process -------------------------------------------------

const CHILD_URL: &str = "SGW_PG_KILL9_CHILD_URL";
const CHILD_KEYS: &str = "SGW_PG_KILL9_CHILD_KEYS";

/// Not a test on its own: the writer process that `kill_nine_...` starts (this test
/// binary again, with this test selected) and kills. Prints `ack <seq> <request>`
/// for each append once it is acknowledged, and stops by itself after 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_child_writer() {
    let (Ok(url), Ok(keys)) = (std::env::var(CHILD_URL), std::env::var(CHILD_KEYS)) else {
        println!("kill9_child_writer: helper process of kill_nine_one_writer_process_mid_load; nothing to do on its own");
        return;
    };
    let mut config = PgConfig::new(url);
    config.pool_size = 4;
    let log = PgAuditLog::open(
        &config,
        PgAuditSettings {
            log_id: "sgw.test/audit".into(),
            max_batch: 256,
        },
        keys_in(Path::new(&keys)),
        Arc::new(SystemClock),
    )
    .await
    .expect("child: open");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut handles = Vec::new();
    for t in 0..16 {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let id = format!("child-t{t}-{i}");
                if let Ok(a) = log.append(entry(&id)).await {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {} {id}", a.seq).unwrap();
                    out.flush().unwrap();
                }
                i += 1;
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_nine_one_writer_process_mid_load_loses_no_acknowledged_entry() {
    use tokio::io::AsyncBufReadExt;

    let Some(url) = server_url("kill_nine") else {
        return;
    };
    let db = TestDb::create(&url, "kill_nine").await;
    let keys = tempfile::tempdir().unwrap();
    // This replica migrates the database and keeps appending throughout.
    let survivor = replica(&db, keys.path(), Arc::new(SystemClock)).await;

    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "kill9_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_URL, db.url())
        .env(CHILD_KEYS, keys.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the child writer");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut survivors = Vec::new();
    for t in 0..4 {
        let (log, stop) = (survivor.clone(), stop.clone());
        survivors.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("survivor-t{t}-{i}");
                let a = log
                    .append(entry(&id))
                    .await
                    .expect("the survivor keeps serving");
                acked.push((id, a.seq));
                i += 1;
            }
            acked
        }));
    }

    // Let the child get well into its load, then kill -9 it.
    let mut child_acked: Vec<(String, u64)> = Vec::new();
    let parse = |line: &str| -> Option<(String, u64)> {
        let mut parts = line.strip_prefix("ack ")?.split(' ');
        let seq = parts.next()?.parse().ok()?;
        Some((parts.next()?.to_owned(), seq))
    };
    let started = Instant::now();
    while child_acked.len() < 500 {
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "the child writer is too slow"
        );
        match lines.next_line().await.unwrap() {
            Some(line) => child_acked.extend(parse(&line)),
            None => panic!("the child writer ended early"),
        }
    }
    child.start_kill().unwrap(); // SIGKILL
    let status = child.wait().await.unwrap();
    assert!(!status.success());
    // Acknowledgements it printed before it died are still in the pipe.
    while let Some(line) = lines.next_line().await.unwrap() {
        child_acked.extend(parse(&line));
    }
    let after_kill = survivor.size().await.unwrap();
    // The survivor keeps appending: the head's lock was not left held.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut survivor_acked = Vec::new();
    for h in survivors {
        survivor_acked.extend(h.await.unwrap());
    }
    assert!(
        survivor.size().await.unwrap() > after_kill,
        "appends go on after the kill"
    );
    drop(survivor);

    let fresh = replica(&db, keys.path(), Arc::new(SystemClock)).await;
    let size = fresh.size().await.unwrap();
    let mut seen = HashSet::new();
    for (id, seq) in child_acked.iter().chain(&survivor_acked) {
        assert!(*seq < size, "acknowledged seq {seq} is in the log");
        assert!(seen.insert(*seq), "seq {seq} acknowledged twice");
        assert_eq!(&fresh.entry(*seq).await.unwrap().request_id, id);
    }
    let summary = fresh
        .verify()
        .await
        .expect("the log verifies after the kill");
    println!(
        "kill_nine: child acknowledged {} (killed after 500), survivor {}, log holds {} (the rest were committed but unacknowledged, or the survivor's)",
        child_acked.len(),
        survivor_acked.len(),
        summary.entries
    );
    drop(fresh);
    db.drop_database().await;
}

// --- throughput (run by hand) ---------------------------------------------------------

/// Appends/s with 1, 2 and 3 replicas, 64 concurrent appenders each, for
/// `SGW_PG_BENCH_SECS` (default 5) seconds per step:
/// `cargo test --release --test pg_audit -- --ignored --nocapture throughput`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, run by hand"]
async fn throughput_with_one_two_and_three_replicas() {
    let Some(url) = server_url("throughput") else {
        return;
    };
    let secs: u64 = std::env::var("SGW_PG_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    for replicas in 1..=3 {
        let db = TestDb::create(&url, &format!("throughput{replicas}")).await;
        let keys = tempfile::tempdir().unwrap();
        let mut logs = Vec::new();
        for _ in 0..replicas {
            logs.push(replica(&db, keys.path(), Arc::new(SystemClock)).await);
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut handles = Vec::new();
        for log in &logs {
            for _ in 0..64 {
                let log = log.clone();
                handles.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        log.append(entry("bench")).await.unwrap();
                        lat.push(t.elapsed());
                    }
                    lat
                }));
            }
        }
        let mut lat = Vec::new();
        for h in handles {
            lat.extend(h.await.unwrap());
        }
        lat.sort_unstable();
        let (commits, entries) = logs.iter().fold((0, 0), |(c, e), l| {
            (
                c + l.stats().commits.load(std::sync::atomic::Ordering::Relaxed),
                e + l.stats().entries.load(std::sync::atomic::Ordering::Relaxed),
            )
        });
        println!(
            "throughput: {replicas} replica(s) x 64 appenders: {:.0} appends/s, p50 {:.1?}, p99 {:.1?}, mean batch {:.1}",
            lat.len() as f64 / secs as f64,
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100],
            entries as f64 / commits.max(1) as f64
        );
        logs[0].verify().await.unwrap();
        drop(logs);
        db.drop_database().await;
    }
}

#[test]
fn database_names_are_replaced_in_urls() {
    assert_eq!(
        with_database("postgres://sgw@127.0.0.1:5432/postgres", "t1"),
        "postgres://sgw@127.0.0.1:5432/t1"
    );
    assert_eq!(
        with_database("postgres://sgw@127.0.0.1:5432", "t1"),
        "postgres://sgw@127.0.0.1:5432/t1"
    );
    assert_eq!(
        with_database("postgresql://a:b@h/db?sslmode=disable", "t1"),
        "postgresql://a:b@h/t1?sslmode=disable"
    );
}
