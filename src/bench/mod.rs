//! `sgw bench`: drives a gateway over mutual TLS with a mix of calls and reports
//! throughput, latency percentiles and errors, optionally side by side with a bare
//! echo service on the same TLS configuration (the baseline), as ratios.
//!
//! - [`drive`] runs the workers and measures; it knows nothing of the calls.
//! - [`seed`] shares the records and consents the mix reads, and checks them once.
//! - [`mix`] makes each call of the gateway mix as the right dev identity.
//! - [`inbox`] holds SubscribeInbox streams open and measures raise-to-receive.
//! - [`echo`] is the baseline server.
//!
//! The method and the latest figures are in `benches/README.md`.

pub mod echo;
pub mod inbox;
pub mod mix;
pub mod seed;

use std::collections::BTreeMap;
use std::fmt;
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
    /// RecordService.GetRecord of a seeded record as school-oakfield, durably audited.
    GetRecord,
    /// ConcernService.RaiseConcern as police-met to school-oakfield (and the front
    /// door), durably audited and stored.
    RaiseConcern,
    /// RecordService.FindRecords for a seeded child as school-oakfield, durably
    /// audited.
    FindRecords,
    /// AuditService.QueryDisclosures (one page of 10) as the auditor dpo, itself
    /// audited.
    QueryDisclosures,
    /// The baseline's bare echo.
    Echo,
}

impl Op {
    /// The RPC's name, as printed.
    pub fn name(self) -> &'static str {
        match self {
            Op::GetRecord => "GetRecord",
            Op::RaiseConcern => "RaiseConcern",
            Op::FindRecords => "FindRecords",
            Op::QueryDisclosures => "QueryDisclosures",
            Op::Echo => "Echo",
        }
    }
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

impl LoadSpec {
    /// The run's window if it starts at `start`.
    pub fn window(&self, start: Instant) -> Window {
        Window {
            start,
            measure_from: start + self.warmup,
            end: start + self.warmup + self.duration,
        }
    }
}

/// When a run starts, when its measurement starts, and when it ends. Calls that
/// start in `measure_from..end` are measured.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Workers start.
    pub start: Instant,
    /// Warm-up over.
    pub measure_from: Instant,
    /// No call starts from here on.
    pub end: Instant,
}

impl Window {
    /// Whether a call started at `t` is measured.
    pub fn measures(&self, t: Instant) -> bool {
        t >= self.measure_from && t < self.end
    }
}

/// Why a call did not count as a success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The gateway answered with a gRPC status other than OK.
    Status(tonic::Code),
    /// OK, but not the answer the seeded data implies (e.g. the wrong disclosure
    /// basis or a truncated content).
    Unexpected(&'static str),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status(code) => write!(f, "{code:?}"),
            Failure::Unexpected(what) => write!(f, "unexpected: {what}"),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        Failure::Status(status.code())
    }
}

/// A boxed call: which op it made, and whether it succeeded.
pub type CallFuture = Pin<Box<dyn Future<Output = (Op, Result<(), Failure>)> + Send>>;

/// Makes the `n`th call of worker `w`.
pub type Caller = Arc<dyn Fn(usize, u64) -> CallFuture + Send + Sync>;

/// What one op measured.
#[derive(Debug, Clone)]
pub struct OpFigures {
    /// Successful calls in the measured window.
    pub ok: u64,
    /// Failed calls by gRPC code (or `unexpected: ...`).
    pub errors: BTreeMap<String, u64>,
    /// Latency of successful calls, microseconds.
    pub latency: Histogram<u64>,
}

impl OpFigures {
    fn new() -> Self {
        OpFigures {
            ok: 0,
            errors: BTreeMap::new(),
            latency: new_histogram(),
        }
    }

    fn add(&mut self, other: &OpFigures) {
        self.ok += other.ok;
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Successful calls in the measured window.
    pub ok: u64,
    /// Failed calls by gRPC code, all ops together.
    pub errors: BTreeMap<String, u64>,
    /// The measured window.
    pub elapsed: Duration,
    /// Latency of successful calls, microseconds, all ops together.
    pub latency: Histogram<u64>,
    /// The same, op by op.
    pub by_op: BTreeMap<Op, OpFigures>,
    /// Failed calls that started in the warm-up, by gRPC code: not measured, but a
    /// gateway that fails or stalls from the start must not pass as a clean run.
    pub warmup_errors: BTreeMap<String, u64>,
}

impl Figures {
    /// Successful calls per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency percentile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        ms(&self.latency, q)
    }

    /// Total failed calls in the measured window.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Whether the run was clean: at least one successful call, and no failed call,
    /// measured or in the warm-up.
    pub fn clean(&self) -> bool {
        self.ok > 0 && self.error_count() == 0 && self.warmup_errors.is_empty()
    }
}

/// A percentile of a microsecond histogram, in milliseconds.
pub fn ms(latency: &Histogram<u64>, q: f64) -> f64 {
    latency.value_at_quantile(q) as f64 / 1000.0
}

/// A histogram of microseconds from 1 µs to 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant, valid histogram bounds")
}

/// Runs `spec.concurrency` workers calling `call` from `window.start` to
/// `window.end`; only calls that start after the warm-up are measured.
pub async fn drive(
    spec: &LoadSpec,
    window: Window,
    call: Caller,
    progress: &indicatif::ProgressBar,
) -> Figures {
    let shared: Arc<Mutex<BTreeMap<Op, OpFigures>>> = Arc::default();
    let warmup_errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut workers = Vec::with_capacity(spec.concurrency);
    for w in 0..spec.concurrency {
        let (call, shared, warmup_errors) = (call.clone(), shared.clone(), warmup_errors.clone());
        workers.push(tokio::spawn(async move {
            let mut local: BTreeMap<Op, OpFigures> = BTreeMap::new();
            let mut local_warmup: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= window.end {
                    break;
                }
                let (op, result) = call(w, n).await;
                n += 1;
                if !window.measures(t0) {
                    if let Err(failure) = result {
                        *local_warmup.entry(failure.to_string()).or_default() += 1;
                    }
                    continue;
                }
                let f = local.entry(op).or_insert_with(OpFigures::new);
                match result {
                    Ok(()) => {
                        f.ok += 1;
                        let _ = f.latency.record(t0.elapsed().as_micros().max(1) as u64);
                    }
                    Err(failure) => *f.errors.entry(failure.to_string()).or_default() += 1,
                }
            }
            let mut all = shared.lock().await;
            for (op, f) in local {
                all.entry(op).or_insert_with(OpFigures::new).add(&f);
            }
            drop(all);
            let mut all = warmup_errors.lock().await;
            for (code, n) in local_warmup {
                *all.entry(code).or_default() += n;
            }
        }));
    }
    let total = window.end - window.start;
    while Instant::now() < window.end {
        progress.set_position(window.start.elapsed().min(total).as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in workers {
        let _ = w.await;
    }
    progress.finish_and_clear();
    let by_op = std::mem::take(&mut *shared.lock().await);
    let warmup_errors = std::mem::take(&mut *warmup_errors.lock().await);
    let mut all = OpFigures::new();
    for f in by_op.values() {
        all.add(f);
    }
    Figures {
        ok: all.ok,
        errors: all.errors,
        elapsed: spec.duration,
        latency: all.latency,
        by_op,
        warmup_errors,
    }
}

/// Picks channel `w % len` so workers spread over several HTTP/2 connections.
pub fn pick(channels: &[Channel], w: usize) -> Channel {
    channels[w % channels.len()].clone()
}

/// CPU time (user + system, all threads, exited ones included) a process has used,
/// from /proc (Linux), which counts in USER_HZ ticks of 10 ms on every mainstream
/// Linux build.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may contain spaces: count fields after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    // Fields 14 (utime) and 15 (stime) of proc(5); the first after ')' is field 3.
    Some(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// CPU time used by each of `pids` during the measured part of `window`.
pub async fn cpu_in_window(window: Window, pids: Vec<u32>) -> Vec<Option<Duration>> {
    let read = |pids: &[u32]| pids.iter().map(|p| cpu_time(*p)).collect::<Vec<_>>();
    tokio::time::sleep_until(window.measure_from.into()).await;
    let before = read(&pids);
    tokio::time::sleep_until(window.end.into()).await;
    let after = read(&pids);
    before
        .into_iter()
        .zip(after)
        .map(|(b, a)| Some(a?.saturating_sub(b?)))
        .collect()
}

/// Peak resident set size of a process, from /proc (Linux), in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LoadSpec {
        LoadSpec {
            concurrency: 2,
            duration: Duration::from_millis(200),
            warmup: Duration::from_millis(200),
        }
    }

    /// A caller that fails while `fail(started)` holds, else succeeds.
    fn caller(start: Instant, fail: impl Fn(Duration) -> bool + Send + Sync + 'static) -> Caller {
        Arc::new(move |_, _| -> CallFuture {
            let failing = fail(start.elapsed());
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let result = if failing {
                    Err(Failure::Status(tonic::Code::Unavailable))
                } else {
                    Ok(())
                };
                (Op::GetRecord, result)
            })
        })
    }

    #[tokio::test]
    async fn a_call_failing_in_the_warm_up_makes_a_run_unclean_but_is_not_measured() {
        let spec = spec();
        let start = Instant::now();
        let window = spec.window(start);
        let warmup = spec.warmup;
        let bar = indicatif::ProgressBar::hidden();
        let f = drive(&spec, window, caller(start, move |t| t < warmup / 2), &bar).await;
        assert!(f.ok > 0);
        assert_eq!(f.error_count(), 0);
        assert!(f.warmup_errors.get("Unavailable").copied().unwrap_or(0) > 0);
        assert!(!f.clean());
    }

    #[tokio::test]
    async fn a_run_with_no_successful_call_is_unclean_even_without_errors() {
        let spec = spec();
        let window = spec.window(Instant::now());
        // Every call blocks past the window's end: none starts inside it.
        let stalled: Caller = Arc::new(|_, _| -> CallFuture {
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                (Op::GetRecord, Ok(()))
            })
        });
        let f = drive(&spec, window, stalled, &indicatif::ProgressBar::hidden()).await;
        assert_eq!((f.ok, f.error_count()), (0, 0));
        assert!(!f.clean());
    }

    #[tokio::test]
    async fn a_run_without_failures_is_clean() {
        let spec = spec();
        let start = Instant::now();
        let f = drive(
            &spec,
            spec.window(start),
            caller(start, |_| false),
            &indicatif::ProgressBar::hidden(),
        )
        .await;
        assert!(f.clean(), "{:?} {:?}", f.errors, f.warmup_errors);
    }
}
