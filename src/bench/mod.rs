//! `sgw bench`: drives a gateway over mutual TLS with a mix of calls and reports
//! throughput, latency percentiles and errors, optionally side by side with a bare
//! echo service on the same TLS configuration (the baseline), as ratios.

pub mod echo;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// One kind of call the load mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Op {
    /// RecordService.GetRecord of a seeded record, durably audited.
    GetRecord,
    /// ConcernService.RaiseConcern, durably audited and stored.
    RaiseConcern,
    /// RecordService.FindRecords for a seeded child, durably audited.
    FindRecords,
    /// AuditService.QueryDisclosures (one page), itself audited.
    QueryDisclosures,
    /// The baseline's bare echo.
    Echo,
}

/// How hard and how long to drive.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Callers running at once.
    pub concurrency: usize,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
}

/// A boxed call: returns Ok or the gRPC code name.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<(), tonic::Code>> + Send>>;

/// Makes the `n`th call of worker `w`.
pub type Caller = Arc<dyn Fn(usize, u64) -> CallFuture + Send + Sync>;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Successful calls in the measured window.
    pub ok: u64,
    /// Failed calls by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// The measured window.
    pub elapsed: Duration,
    /// Latency of successful calls, microseconds.
    pub latency: Histogram<u64>,
}

impl Figures {
    /// Successful calls per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency percentile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// Total failed calls.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Runs `spec.concurrency` workers calling `call` until warm-up plus duration have
/// passed; only calls that start after the warm-up are measured.
pub async fn drive(spec: &LoadSpec, call: Caller, progress: &indicatif::ProgressBar) -> Figures {
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let shared = Arc::new(Mutex::new(Figures {
        ok: 0,
        errors: BTreeMap::new(),
        elapsed: spec.duration,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
    }));
    let mut workers = Vec::with_capacity(spec.concurrency);
    for w in 0..spec.concurrency {
        let (call, shared) = (call.clone(), shared.clone());
        workers.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .expect("valid histogram bounds");
            let mut ok = 0u64;
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let result = call(w, n).await;
                n += 1;
                if t0 < measure_from {
                    continue;
                }
                match result {
                    Ok(()) => {
                        ok += 1;
                        let _ = local.record(t0.elapsed().as_micros().max(1) as u64);
                    }
                    Err(code) => *errors.entry(format!("{code:?}")).or_default() += 1,
                }
            }
            let mut f = shared.lock().await;
            f.ok += ok;
            let _ = f.latency.add(&local);
            for (k, v) in errors {
                *f.errors.entry(k).or_default() += v;
            }
        }));
    }
    let total = spec.warmup + spec.duration;
    while Instant::now() < end {
        progress.set_position((start.elapsed().as_millis() as u64).min(total.as_millis() as u64));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in workers {
        let _ = w.await;
    }
    progress.finish_and_clear();
    let figures = shared.lock().await.clone();
    figures
}

/// Picks channel `w % len` so workers spread over several HTTP/2 connections.
pub fn pick(channels: &[Channel], w: usize) -> Channel {
    channels[w % channels.len()].clone()
}

/// Peak resident set size of a process, from /proc (Linux), in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
