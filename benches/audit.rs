//! Audit store benchmark: durable appends per second through the group-committing
//! writer at 1, 16 and 256 concurrent writers, against a per-entry durable write
//! (sled insert + flush + fdatasync for every entry) measured in the same run, and
//! proof generation time at 10^4, 10^5 and 10^6 entries.
//!
//! Each group-commit figure also gives the process's CPU time per append (writer,
//! sled's threads and the callers together), which is steadier than throughput
//! on a shared machine. Proofs are timed three times over the same random seqs:
//! on first asking, right after the load (so mostly cold tier-0 tiles, read from
//! disk when the OS has dropped them), asked again (tiles cached), and on first
//! asking after the log is closed and opened again.
//!
//! Run: `cargo bench --bench audit` (add `-- --quick` for a short run;
//! `-- --proofs-only --sizes=1000000` to profile one size, with
//! `SGW_BENCH_PROOF_ROUNDS` proofs per pass). Figures are printed as ratios to the
//! baseline, since shared machines are noisy.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sgw::audit::writer::AuditSettings;
use sgw::audit::{Actor, Auditor, NewEntry};
use sgw::domain::SystemClock;
use sgw::proto::v1::{AuditAction, AuditOutcome};
use sgw::store::Keys;

fn entry(i: u64) -> NewEntry {
    let mut e = NewEntry::new(
        Actor::system(),
        AuditAction::RecordDisclosed,
        AuditOutcome::Allowed,
        &format!("bench-{i}"),
    );
    e.target_agency_id = "school-oakfield".into();
    e.object_id = format!("rec-{i:016x}");
    e.lawful_basis = "UK GDPR Art 6(1)(e) public task; DPA 2018 Sch 1 para 18".into();
    e
}

fn open(dir: &std::path::Path, max_batch: usize) -> Auditor {
    try_open(dir, max_batch).expect("auditor")
}

fn try_open(dir: &std::path::Path, max_batch: usize) -> Result<Auditor, sgw::audit::AuditError> {
    let keys = Arc::new(Keys::load_or_create(dir, None).expect("keys"));
    let settings = AuditSettings {
        dir: dir.join("audit"),
        log_id: "bench.example/sgw/audit".into(),
        max_batch,
        cache_bytes: 64 << 20,
        wal_bytes: sgw::audit::writer::DEFAULT_WAL_BYTES,
    };
    Auditor::open(settings, keys, Arc::new(SystemClock))
}

/// Durable appends per second with `writers` concurrent callers for `secs`, the
/// mean group size, and the process's CPU time per append (µs).
async fn appends_per_sec(writers: usize, secs: f64) -> (f64, f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let auditor = open(dir.path(), 1024);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let cpu_start = cpu_micros();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (a, stop, done) = (auditor.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w as u64 * 1_000_000_000;
            while !stop.load(Ordering::Relaxed) {
                a.append(entry(i)).await.expect("append");
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_micros() - cpu_start;
    let stats = auditor.stats();
    let commits = stats.commits.load(Ordering::Relaxed).max(1) as f64;
    let mean_group = stats.entries.load(Ordering::Relaxed) as f64 / commits;
    let done = done.load(Ordering::Relaxed) as f64;
    (done / elapsed, mean_group, cpu / done)
}

/// CPU time (user + system) of this whole process so far, in µs: the writer
/// thread, sled's threads and the callers. From /proc/self/stat, in clock ticks
/// (assumed 100 per second, as on Linux by default).
fn cpu_micros() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) * 1e4
}

/// The per-entry path: each entry inserted, flushed and fdatasync'd on its own.
fn per_entry_per_sec(secs: f64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(None)
        .open()
        .unwrap();
    let file = std::fs::File::open(dir.path().join("db")).unwrap();
    let payload = vec![0x5au8; 320];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        db.insert(n.to_be_bytes(), payload.as_slice()).unwrap();
        db.flush().unwrap();
        file.sync_data().unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Mean time of an inclusion and a consistency proof at `size` entries, in µs:
/// on first asking, asked again, and first asking after the log is closed and
/// opened again (the operating system's page cache still warm).
async fn proof_micros(size: u64) -> [(f64, f64); 3] {
    let dir = tempfile::tempdir().unwrap();
    let auditor = open(dir.path(), 4096);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..256 {
        let (a, next) = (auditor.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= size {
                    return;
                }
                a.append(entry(i)).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(auditor.log().size(), size);
    eprintln!("proof phase at {size} entries");
    // The same random proofs twice: first as they come (tiles mostly not in
    // any cache after the load), then again with their tiles cached.
    let log = auditor.log().clone();
    let (first, again) = tokio::task::spawn_blocking(move || {
        let first = proof_pass(&log, size);
        (first, proof_pass(&log, size))
    })
    .await
    .unwrap();
    eprintln!("rss after proofs at {size}: {}", rss());
    auditor.close().await;
    drop(auditor);
    let mut tries = 0;
    let reopened = loop {
        // sled lets go of its file lock a little after the last handle.
        match try_open(dir.path(), 4096) {
            Ok(a) => break a,
            Err(e) if tries < 250 => {
                tries += 1;
                eprintln!("reopening: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("the log does not reopen: {e}"),
        }
    };
    let log = reopened.log().clone();
    let restarted = tokio::task::spawn_blocking(move || proof_pass(&log, size))
        .await
        .unwrap();
    reopened.close().await;
    [first, again, restarted]
}

/// Mean µs of `SGW_BENCH_PROOF_ROUNDS` (20,000) inclusion proofs, then as many
/// consistency proofs, of leaves from a fixed pseudo-random sequence.
fn proof_pass(log: &sgw::audit::log::AuditLog, size: u64) -> (f64, f64) {
    let rounds: u64 = std::env::var("SGW_BENCH_PROOF_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let t = Instant::now();
    for _ in 0..rounds {
        let seq = rand(size);
        log.inclusion_proof(seq, size).unwrap();
    }
    let incl = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    let t = Instant::now();
    for _ in 0..rounds {
        let from = 1 + rand(size - 1);
        log.consistency_proof(from, size).unwrap();
    }
    let cons = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    (incl, cons)
}

/// This process's resident and peak resident memory, from /proc (Linux).
fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = if quick { 1.0 } else { 3.0 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "sgw audit store benchmark ({} s per figure, {} cores)",
        secs,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    // `--proofs-only` and `--sizes=10000,1000000` narrow a run (for profiling).
    let proofs_only = std::env::args().any(|a| a == "--proofs-only");
    let chosen: Option<Vec<u64>> = std::env::args()
        .find_map(|a| a.strip_prefix("--sizes=").map(str::to_owned))
        .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect());
    let baseline = if proofs_only {
        1.0
    } else {
        per_entry_per_sec(secs)
    };
    if !proofs_only {
        println!("baseline: per-entry sled insert + flush + fdatasync: {baseline:>10.0} entries/s");
    }
    let writer_counts: &[usize] = if proofs_only { &[] } else { &[1, 16, 256] };
    for &writers in writer_counts {
        let (rate, group, cpu) = rt.block_on(appends_per_sec(writers, secs));
        println!(
            "group commit, {writers:>3} writers: {rate:>10.0} durable appends/s  = {:>6.2}x baseline  (mean group {group:.1}, {cpu:.1} µs CPU per append)",
            rate / baseline
        );
    }
    let sizes: Vec<u64> = chosen.unwrap_or_else(|| {
        if quick {
            vec![10_000, 100_000]
        } else {
            vec![10_000, 100_000, 1_000_000]
        }
    });
    let mut first = None;
    for &size in &sizes {
        let passes = rt.block_on(proof_micros(size));
        let base = *first.get_or_insert(passes);
        let figure = |i: usize| {
            let ((incl, cons), (i0, c0)) = (passes[i], base[i]);
            format!(
                "{incl:>6.1} / {cons:>6.1} µs ({:.2}x / {:.2}x)",
                incl / i0,
                cons / c0
            )
        };
        println!(
            "proofs at {size:>8} entries (inclusion / consistency, x the first size's time): first asking {}; asked again {}; first asking after reopening {}",
            figure(0),
            figure(1),
            figure(2),
        );
    }
}
