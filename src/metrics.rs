//! Prometheus metrics on a separate plain-HTTP listener (`[metrics] listen`, off by
//! default): calls by method and code, call latency histograms, audit group-commit
//! sizes and fsync time, open streams, and how far inbox subscriptions are behind.
//! Text exposition format 0.0.4, hand-written: a handful of counters does not need
//! a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::audit::writer::{CommitStats, GROUP_BUCKETS, SYNC_BUCKETS_MICROS};
use crate::concerns::{InboxLag, InboxLagReport};

/// Latency bucket upper bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// One method's calls by code, and their latency.
#[derive(Debug, Default)]
struct MethodStats {
    /// Indexed by the gRPC code's number (0..=16).
    codes: [u64; 17],
    latency: Histogram,
}

/// Calls to a path the gateway does not serve (a client may send any path, and
/// the path may hold characters a label cannot) are counted under this label.
const OTHER_METHOD: &str = "other";

/// The paths the gateway serves, each of which is counted apart: every rpc of the
/// contract, health and reflection.
static KNOWN_METHODS: std::sync::LazyLock<std::collections::HashSet<String>> =
    std::sync::LazyLock::new(|| {
        use prost::Message as _;
        let mut known: std::collections::HashSet<String> = [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .unwrap_or_default();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    known.insert(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        known
    });

/// The label a call's path is counted under.
fn method_label(path: &str) -> &str {
    if KNOWN_METHODS.contains(path) {
        path
    } else {
        OTHER_METHOD
    }
}

/// The gateway's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// By method path. One lock per call, and no allocation once a method is known.
    calls: Mutex<BTreeMap<String, MethodStats>>,
    open_streams: AtomicI64,
    audit: Mutex<Option<Arc<CommitStats>>>,
    inbox: Mutex<Option<InboxLag>>,
}

impl Metrics {
    /// Counts one finished call.
    pub fn call(&self, method: &str, code: tonic::Code, latency: Duration) {
        let secs = latency.as_secs_f64();
        let method = method_label(method);
        let Ok(mut calls) = self.calls.lock() else {
            return;
        };
        let stats = match calls.get_mut(method) {
            Some(stats) => stats,
            None => calls.entry(method.to_owned()).or_default(),
        };
        if let Some(n) = stats.codes.get_mut(code as usize) {
            *n += 1;
        }
        let h = &mut stats.latency;
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// A response stream opened (+1) or ended (-1).
    pub fn stream(&self, delta: i64) {
        self.open_streams.fetch_add(delta, Ordering::Relaxed);
    }

    /// Attaches the audit writer's statistics.
    pub fn watch_audit(&self, stats: Arc<CommitStats>) {
        if let Ok(mut a) = self.audit.lock() {
            *a = Some(stats);
        }
    }

    /// Attaches the inbox subscriptions' lag.
    pub fn watch_inbox(&self, lag: InboxLag) {
        if let Ok(mut i) = self.inbox.lock() {
            *i = Some(lag);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP sgw_calls_total gRPC calls by method and status code.\n# TYPE sgw_calls_total counter\n");
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        for (method, stats) in calls.iter() {
            for (code, n) in stats.codes.iter().enumerate() {
                if *n > 0 {
                    let code = tonic::Code::from(code as i32);
                    let _ = writeln!(
                        out,
                        "sgw_calls_total{{method=\"{method}\",code=\"{code:?}\"}} {n}"
                    );
                }
            }
        }
        out.push_str("# HELP sgw_call_duration_seconds gRPC call latency (to trailers for streams).\n# TYPE sgw_call_duration_seconds histogram\n");
        for (method, stats) in calls.iter() {
            let h = &stats.latency;
            for (i, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "sgw_call_duration_seconds_bucket{{method=\"{method}\",le=\"{bound}\"}} {}",
                    h.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "sgw_call_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "sgw_call_duration_seconds_sum{{method=\"{method}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "sgw_call_duration_seconds_count{{method=\"{method}\"}} {}",
                h.count
            );
        }
        drop(calls);
        let _ = writeln!(
            out,
            "# HELP sgw_open_streams Response streams open now.\n# TYPE sgw_open_streams gauge\nsgw_open_streams {}",
            self.open_streams.load(Ordering::Relaxed)
        );
        if let Some(lag) = self.inbox.lock().ok().and_then(|i| i.clone()) {
            render_inbox(&mut out, lag.report());
        }
        if let Ok(audit) = self.audit.lock() {
            if let Some(s) = audit.as_ref() {
                let commits = s.commits.load(Ordering::Relaxed);
                let entries = s.entries.load(Ordering::Relaxed);
                let sync = s.sync_micros.load(Ordering::Relaxed) as f64 / 1e6;
                let _ = writeln!(out, "# HELP sgw_audit_commits_total Audit group commits (one durability point each).\n# TYPE sgw_audit_commits_total counter\nsgw_audit_commits_total {commits}");
                let _ = writeln!(out, "# HELP sgw_audit_entries_total Audit entries committed.\n# TYPE sgw_audit_entries_total counter\nsgw_audit_entries_total {entries}");
                let _ = writeln!(out, "# HELP sgw_audit_sync_seconds_total Time in the durability point (the write-ahead record's write + fdatasync).\n# TYPE sgw_audit_sync_seconds_total counter\nsgw_audit_sync_seconds_total {sync}");
                out.push_str("# HELP sgw_audit_sync_duration_seconds Time each commit spent in the durability point (sled: the write-ahead record's write and fdatasync; PostgreSQL: from taking a connection to COMMIT).\n# TYPE sgw_audit_sync_duration_seconds histogram\n");
                let bounds = SYNC_BUCKETS_MICROS.map(|b| b as f64 / 1e6);
                render_buckets(
                    &mut out,
                    "sgw_audit_sync_duration_seconds",
                    &bounds,
                    &s.sync_buckets,
                    &s.commits,
                    sync,
                );
                out.push_str("# HELP sgw_audit_group_entries Entries in each audit group commit (one durability point shared by them all).\n# TYPE sgw_audit_group_entries histogram\n");
                let bounds = GROUP_BUCKETS.map(|b| b as f64);
                render_buckets(
                    &mut out,
                    "sgw_audit_group_entries",
                    &bounds,
                    &s.group_buckets,
                    &s.commits,
                    entries as f64,
                );
                let rounds = s.round_ends.load(Ordering::Relaxed);
                let round_secs = s.round_end_micros.load(Ordering::Relaxed) as f64 / 1e6;
                let round_max = s.round_end_max_micros.load(Ordering::Relaxed) as f64 / 1e6;
                let _ = writeln!(out, "# HELP sgw_audit_round_ends_total Ends of a write-ahead round after a commit (index lists into sled, files and sled synced; not those at open or close); commits wait for each.\n# TYPE sgw_audit_round_ends_total counter\nsgw_audit_round_ends_total {rounds}");
                let _ = writeln!(out, "# HELP sgw_audit_round_end_seconds_total Time in write-ahead round ends.\n# TYPE sgw_audit_round_end_seconds_total counter\nsgw_audit_round_end_seconds_total {round_secs}");
                let _ = writeln!(out, "# HELP sgw_audit_round_end_max_seconds The longest write-ahead round end since the gateway started.\n# TYPE sgw_audit_round_end_max_seconds gauge\nsgw_audit_round_end_max_seconds {round_max}");
            }
        }
        out
    }
}

/// A histogram of the audit writer's commits: `counts[i]` are the commits within
/// `bounds[i]` and above the bound before it, `commits` all of them.
fn render_buckets(
    out: &mut String,
    name: &str,
    bounds: &[f64],
    counts: &[AtomicU64],
    commits: &AtomicU64,
    sum: f64,
) {
    let mut within = 0;
    for (bound, n) in bounds.iter().zip(counts) {
        within += n.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {within}");
    }
    // Read after the buckets (a commit is counted before its bucket), so that
    // +Inf is never below the last of them.
    let count = commits.load(Ordering::Relaxed).max(within);
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
    );
}

/// The inbox subscriptions' gauges.
fn render_inbox(out: &mut String, lag: InboxLagReport) {
    let _ = writeln!(out, "# HELP sgw_inbox_subscriptions SubscribeInbox streams open on this gateway.\n# TYPE sgw_inbox_subscriptions gauge\nsgw_inbox_subscriptions {}", lag.subscriptions);
    let _ = writeln!(out, "# HELP sgw_inbox_lag_events Events committed to its inbox that the most-behind open subscription has not yet queued to its stream.\n# TYPE sgw_inbox_lag_events gauge\nsgw_inbox_lag_events {}", lag.events_behind_max);
    let _ = writeln!(out, "# HELP sgw_inbox_backlog_events Events all open subscriptions together have not yet queued to their streams.\n# TYPE sgw_inbox_backlog_events gauge\nsgw_inbox_backlog_events {}", lag.events_behind_total);
    let _ = writeln!(out, "# HELP sgw_inbox_lag_seconds How long the oldest event not yet queued to an open subscription has been known to this gateway.\n# TYPE sgw_inbox_lag_seconds gauge\nsgw_inbox_lag_seconds {}", lag.oldest_wait.as_secs_f64());
}

/// Serves `GET /metrics` on `listener` until `stop`. Prints `sgw: metrics on ADDR`.
pub async fn serve(metrics: Arc<Metrics>, listener: TcpListener, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        eprintln!("sgw: metrics on http://{addr}/metrics");
    }
    // A scraper needs one connection; a few more is plenty.
    let slots = Arc::new(tokio::sync::Semaphore::new(8));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut sock, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; 2048];
            let mut read = 0;
            let head = tokio::time::timeout(Duration::from_secs(5), async {
                while read < buf.len() {
                    match sock.read(&mut buf[read..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => read += n,
                    }
                    if buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                        return true;
                    }
                }
                false
            })
            .await
            .unwrap_or(false);
            if !head {
                return;
            }
            let ok = buf.starts_with(b"GET /metrics ") || buf.starts_with(b"GET /metrics?");
            let (status, body) = if ok {
                ("200 OK", metrics.render())
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_owned(),
                )
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(response.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Binds the metrics listener, if configured.
pub async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    match addr {
        Some(a) => TcpListener::bind(a).await.map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_method_and_code_and_unknown_paths_as_other() {
        let m = Metrics::default();
        let ms = Duration::from_millis(1);
        m.call("/safeguard.v1.RecordService/GetRecord", tonic::Code::Ok, ms);
        m.call("/safeguard.v1.RecordService/GetRecord", tonic::Code::Ok, ms);
        m.call(
            "/safeguard.v1.RecordService/GetRecord",
            tonic::Code::PermissionDenied,
            ms,
        );
        m.call("/grpc.health.v1.Health/Check", tonic::Code::Ok, ms);
        for i in 0..1000 {
            m.call(&format!("/made.up/M{i}"), tonic::Code::Unimplemented, ms);
        }
        // A path is any bytes a client sends: none may reach the text as a label.
        m.call("/x\"}\n{", tonic::Code::Unimplemented, ms);
        m.call(
            "/safeguard.v1.RecordService/Nope",
            tonic::Code::Unimplemented,
            ms,
        );
        let text = m.render();
        assert!(text.contains(
            "sgw_calls_total{method=\"/safeguard.v1.RecordService/GetRecord\",code=\"Ok\"} 2"
        ));
        assert!(text.contains(
            "sgw_calls_total{method=\"/safeguard.v1.RecordService/GetRecord\",code=\"PermissionDenied\"} 1"
        ));
        assert!(text.contains(
            "sgw_call_duration_seconds_count{method=\"/safeguard.v1.RecordService/GetRecord\"} 3"
        ));
        assert!(
            text.contains("sgw_calls_total{method=\"/grpc.health.v1.Health/Check\",code=\"Ok\"} 1")
        );
        let methods = m.calls.lock().unwrap().len();
        assert_eq!(methods, 3, "GetRecord, Check and \"other\"");
        assert!(text.contains("sgw_calls_total{method=\"other\",code=\"Unimplemented\"} 1002"));
        assert!(!text.contains("made.up") && !text.contains("/x"));
        // Every rpc of the contract is known.
        for rpc in [
            "/safeguard.v1.ConcernService/RaiseConcern",
            "/safeguard.v1.AuditService/QueryDisclosures",
            "/safeguard.v1.OperationsService/ReloadTls",
        ] {
            assert_eq!(method_label(rpc), rpc);
        }
    }

    #[test]
    fn the_durability_point_is_a_cumulative_histogram_with_the_slow_tail_above_every_bound() {
        let m = Metrics::default();
        let stats = Arc::new(CommitStats::default());
        m.watch_audit(stats.clone());
        stats.synced(16, Duration::from_micros(80));
        stats.synced(16, Duration::from_micros(250));
        stats.synced(1, Duration::from_millis(30));
        stats.synced(2, Duration::from_secs(2));
        let text = m.render();
        for (le, n) in [
            ("0.0001", 1),
            ("0.00025", 2),
            ("0.01", 2),
            ("0.1", 3),
            ("1", 3),
            ("+Inf", 4),
        ] {
            let line = format!("sgw_audit_sync_duration_seconds_bucket{{le=\"{le}\"}} {n}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains("sgw_audit_sync_duration_seconds_count 4\n"));
        assert!(text.contains("sgw_audit_entries_total 35\n"));
        // The same commits by their size: 1, 2, 16 and 16 entries.
        for (le, n) in [
            ("1", 1),
            ("2", 2),
            ("8", 2),
            ("16", 4),
            ("512", 4),
            ("+Inf", 4),
        ] {
            let line = format!("sgw_audit_group_entries_bucket{{le=\"{le}\"}} {n}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains("sgw_audit_group_entries_sum 35\n"), "{text}");
        assert!(text.contains("sgw_audit_group_entries_count 4\n"), "{text}");
    }
}
