//! `sgw bench`: the load tool. See `benches/README.md` for the method.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::bench::inbox::{InboxFigures, Subscribers};
use crate::bench::mix::{self, MixChannels, Narrative};
use crate::bench::seed::{self, SeedChannels, Seeded};
use crate::bench::{self, Caller, Figures, LoadSpec, Op};
use crate::proto::bench::echo_service_client::EchoServiceClient;
use crate::proto::bench::EchoRequest;

/// Arguments of `sgw bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A running gateway to drive; repeat it to drive several replicas of one
    /// gateway (callers and connections go round robin over the addresses; seeding
    /// goes through the first). Without it, `sgw bench` starts one on a temporary
    /// data dir and development PKI, and drives that. Either way it seeds records
    /// and consents first (the gateway needs the dev config's agreements).
    #[arg(long = "addr")]
    pub addrs: Vec<String>,
    /// Folder with ca.pem and the dev identities (<role>-<id>.pem/.key) to call as,
    /// when --addr is given.
    #[arg(long, default_value = "certs/dev")]
    pub pki_dir: PathBuf,
    /// Callers running at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections per identity (and per --addr) the callers share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Measured time, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up before it.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Payload size in bytes: seeded record content, concern narrative, echo payload.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// The calls to mix, round robin (repeat to weight).
    #[arg(long = "op", value_enum, default_values_t = vec![Op::GetRecord])]
    pub ops: Vec<Op>,
    /// Records to seed (half shared by nhs-guys, read on consent; half by
    /// police-met, read on the agreement alone).
    #[arg(long, default_value_t = 64)]
    pub records: usize,
    /// Children (valid NHS numbers) the records, consents and concerns are about.
    #[arg(long, default_value_t = 4)]
    pub subjects: usize,
    /// With --op raise-concern: hold this many SubscribeInbox streams open, split
    /// between school-oakfield and the front door, and measure raise-to-receive.
    #[arg(long, default_value_t = 0)]
    pub subscribers: usize,
    /// Also drive a bare echo service on the same TLS configuration and print each
    /// figure as a ratio to it.
    #[arg(long)]
    pub baseline: bool,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Print `sgw bench: <server> window start` and `... window end` on stderr as
    /// each server's measured window starts and ends, for a script that samples the
    /// servers alongside (benches/replicas.sh).
    #[arg(long)]
    pub mark_window: bool,
}

/// The longest narrative the gateway accepts by default.
const MAX_NARRATIVE: usize = 20_000;

/// Inbox streams per connection, well under `limits.max_concurrent_streams`.
const STREAMS_PER_CONNECTION: usize = 32;

/// The agencies whose inboxes a bench concern reaches.
const INBOXES: [&str; 2] = [mix::CONCERN_RECIPIENT, "csc-southwark"];

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s).map_err(|e| e.to_string())
}

/// A process started by the bench; killed when dropped.
struct Child {
    child: tokio::process::Child,
    addr: String,
    metrics: Arc<std::sync::Mutex<Option<String>>>,
}

impl Child {
    async fn spawn(args: &[&str], cwd: &Path) -> anyhow::Result<Child> {
        let exe = std::env::current_exe().context("cannot find the sgw executable")?;
        let mut child = tokio::process::Command::new(exe)
            .args(args)
            .current_dir(cwd)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a gateway")?;
        let mut lines = BufReader::new(child.stderr.take().context("no stderr")?).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    return rest.split_whitespace().next().map(str::to_owned);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .context("the started process did not report its address")?;
        let metrics = Arc::new(std::sync::Mutex::new(None));
        let seen = metrics.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("metrics on http://").nth(1) {
                    if let Ok(mut m) = seen.lock() {
                        *m = rest.split('/').next().map(str::to_owned);
                    }
                }
            }
        });
        Ok(Child {
            child,
            addr,
            metrics,
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn peak_rss(&self) -> Option<u64> {
        self.pid().and_then(bench::peak_rss)
    }

    /// The started gateway's audit group-commit figures, from its metrics.
    async fn audit_stats(&self) -> Option<AuditStats> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics.lock().ok()?.clone()?;
        let mut sock = tokio::net::TcpStream::connect(&addr).await.ok()?;
        sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        sock.read_to_string(&mut body).await.ok()?;
        let value = |name: &str| -> Option<f64> {
            body.lines()
                .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b' '))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        let commits = value("sgw_audit_commits_total")?;
        (commits > 0.0).then(|| AuditStats {
            mean_group: value("sgw_audit_entries_total").unwrap_or(0.0) / commits,
            mean_sync_ms: value("sgw_audit_sync_seconds_total").unwrap_or(0.0) * 1e3 / commits,
            slow_syncs: (commits
                - value("sgw_audit_sync_duration_seconds_bucket{le=\"0.01\"}").unwrap_or(commits))
            .max(0.0) as u64,
            round_ends: value("sgw_audit_round_ends_total").unwrap_or(0.0) as u64,
            round_end_total_ms: value("sgw_audit_round_end_seconds_total").unwrap_or(0.0) * 1e3,
            round_end_max_ms: value("sgw_audit_round_end_max_seconds").unwrap_or(0.0) * 1e3,
        })
    }
}

/// Audit group commit over the gateway's life (seeding and warm-up included).
#[derive(Debug, Clone, Copy)]
struct AuditStats {
    /// Entries per commit.
    mean_group: f64,
    /// Time in the durability point (the write-ahead record's write + fdatasync; for PostgreSQL, the commit) per commit.
    mean_sync_ms: f64,
    /// Commits whose durability point took over 10 ms: its slow tail.
    slow_syncs: u64,
    /// Write-ahead round ends, which every commit waits for (none on PostgreSQL).
    round_ends: u64,
    /// Their total time.
    round_end_total_ms: f64,
    /// The longest.
    round_end_max_ms: f64,
}

impl AuditStats {
    fn mean_round_end_ms(&self) -> Option<f64> {
        (self.round_ends > 0).then(|| self.round_end_total_ms / self.round_ends as f64)
    }
}

/// `n` connections (at least one) to each of `addrs` as the identity `stem` of
/// `pki`, interleaved (`a0, a1, .., a0, a1, ..`) so that [`bench::pick`] spreads
/// workers round robin over the addresses.
async fn channels(
    addrs: &[String],
    pki: &Path,
    stem: &str,
    n: usize,
) -> anyhow::Result<Vec<Channel>> {
    let read = |f: String| {
        std::fs::read(pki.join(&f))
            .with_context(|| format!("cannot read {}", pki.join(f).display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())?))
        .identity(Identity::from_pem(
            read(format!("{stem}.pem"))?,
            read(format!("{stem}.key"))?,
        ))
        .domain_name("localhost");
    let mut out = Vec::with_capacity(n.max(1) * addrs.len());
    for _ in 0..n.max(1) {
        for addr in addrs {
            let ch = Endpoint::from_shared(format!("https://{addr}"))?
                .tls_config(tls.clone())?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("cannot connect to {addr}"))?;
            out.push(ch);
        }
    }
    Ok(out)
}

/// The gateway's side of a run, ready to drive.
struct GatewayRun {
    caller: Caller,
    narrative: Arc<Narrative>,
    subscribers: Option<Subscribers>,
}

/// Seeds what the ops read (through the first of `addrs`), opens the connections
/// each op's identity needs to every one of `addrs`, and the inbox subscriptions.
async fn prepare_gateway(
    args: &BenchArgs,
    addrs: &[String],
    pki: &Path,
) -> anyhow::Result<GatewayRun> {
    let first = addrs.get(..1).context("no gateway address")?;
    let wants = |op: Op| args.ops.contains(&op);
    if wants(Op::Echo) {
        anyhow::bail!("echo is the baseline's op: use --baseline");
    }
    if wants(Op::RaiseConcern) && args.payload > MAX_NARRATIVE {
        anyhow::bail!(
            "--payload {} is longer than a concern narrative may be ({MAX_NARRATIVE} characters)",
            args.payload
        );
    }
    if args.subscribers > 0 && !wants(Op::RaiseConcern) {
        anyhow::bail!("--subscribers measures raise-to-receive: add --op raise-concern");
    }
    let conns = args.connections;
    let subjects = seed::nhs_numbers(args.subjects.max(1));
    let reads = wants(Op::GetRecord) || wants(Op::FindRecords);
    let mut ch = MixChannels::default();
    if reads {
        ch.school = channels(addrs, pki, "agency-school-oakfield", conns).await?;
    }
    if wants(Op::RaiseConcern) {
        ch.police = channels(addrs, pki, "agency-police-met", conns).await?;
    }
    if wants(Op::QueryDisclosures) {
        ch.auditor = channels(addrs, pki, "auditor-dpo", conns).await?;
    }
    let seeded = if reads {
        let sc = SeedChannels {
            health: channels(first, pki, "agency-nhs-guys", 1).await?.remove(0),
            police: channels(first, pki, "agency-police-met", 1)
                .await?
                .remove(0),
            // The first connection goes to the first address (see `channels`).
            school: ch.school[0].clone(),
        };
        seed::seed(&sc, args.records, args.subjects, args.payload).await?
    } else {
        Seeded {
            subjects: subjects.clone(),
            records: Vec::new(),
            content_bytes: args.payload,
        }
    };
    let narrative = Arc::new(Narrative {
        run: random_hex()?,
        epoch: Instant::now(),
        bytes: args.payload,
        subjects,
    });
    let subscribers = if args.subscribers > 0 {
        let per_agency = args.subscribers.div_ceil(INBOXES.len());
        let mut agencies = Vec::with_capacity(INBOXES.len());
        for agency in INBOXES {
            let n = per_agency.div_ceil(STREAMS_PER_CONNECTION);
            agencies.push(channels(addrs, pki, &format!("agency-{agency}"), n).await?);
        }
        Some(Subscribers::open(&agencies, args.subscribers).await?)
    } else {
        None
    };
    Ok(GatewayRun {
        caller: mix::caller(args.ops.clone(), ch, Arc::new(seeded), narrative.clone()),
        narrative,
        subscribers,
    })
}

fn echo_caller(channels: Vec<Channel>, payload: usize) -> Caller {
    let payload = vec![0x5au8; payload];
    Arc::new(move |w, _| {
        let mut client = EchoServiceClient::new(bench::pick(&channels, w));
        let payload = payload.clone();
        Box::pin(async move {
            let result = client.echo(EchoRequest { payload }).await;
            (Op::Echo, result.map(|_| ()).map_err(bench::Failure::from))
        })
    })
}

fn progress_bar(args: &BenchArgs, label: &str) -> indicatif::ProgressBar {
    if args.json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let total = (args.warmup + args.duration).as_millis() as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:40}] {elapsed}/{duration}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_owned());
    bar
}

/// Runs `sgw bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run_async(args))
}

/// What a run measured, for the report.
struct Outcome {
    gateway: Figures,
    gateway_cpu: Cpu,
    inbox: Option<InboxFigures>,
    rss: Option<u64>,
    audit: Option<AuditStats>,
    baseline: Option<Figures>,
    baseline_cpu: Cpu,
}

/// CPU time spent during the measured window by the server (when the bench started
/// it) and by the bench itself: on a machine the two share, their sum per call
/// bounds throughput.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    server: Option<Duration>,
    client: Option<Duration>,
}

impl Cpu {
    /// Starts measuring the server `pid` and this process over `window`.
    fn measure(window: bench::Window, pid: Option<u32>) -> tokio::task::JoinHandle<Cpu> {
        let mut pids = vec![std::process::id()];
        pids.extend(pid);
        tokio::spawn(async move {
            let used = bench::cpu_in_window(window, pids).await;
            Cpu {
                client: used.first().copied().flatten(),
                server: used.get(1).copied().flatten(),
            }
        })
    }

    /// Microseconds of CPU per successful call: (server, client).
    fn per_call(&self, calls: u64) -> (Option<f64>, Option<f64>) {
        let per = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e6 / calls.max(1) as f64);
        (per(self.server), per(self.client))
    }
}

async fn run_async(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let scratch = std::env::temp_dir().join(format!("sgw-bench-{}", random_hex()?));
    std::fs::create_dir_all(&scratch)?;
    let outcome = measure(&args, &scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);
    let outcome = outcome?;
    report(&args, &outcome);
    let clean = outcome.gateway.clean()
        && outcome.baseline.as_ref().is_none_or(Figures::clean)
        && outcome
            .inbox
            .as_ref()
            .is_none_or(|i| i.missed() == 0 && i.stream_errors.is_empty());
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Drives the gateway, then (with --baseline) the echo, one after the other: the
/// gateway is stopped before the echo starts, so each has the machine to itself.
async fn measure(args: &BenchArgs, scratch: &Path) -> anyhow::Result<Outcome> {
    let spec = LoadSpec {
        concurrency: args.concurrency,
        duration: args.duration,
        warmup: args.warmup,
    };
    let (gateway, pki, addrs) = match args.addrs.as_slice() {
        [_, ..] => (None, args.pki_dir.clone(), args.addrs.clone()),
        [] => {
            let config = crate::cli::serve::prepare_dev(scratch)?;
            let mut text = std::fs::read_to_string(&config)?;
            text.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
            let per_agency = args.subscribers.div_ceil(INBOXES.len());
            if per_agency > 16 {
                text.push_str(&format!(
                    "\n[limits]\nmax_subscribers_per_agency = {per_agency}\n"
                ));
            }
            std::fs::write(&config, text)?;
            let child = Child::spawn(
                &[
                    "serve",
                    "--config",
                    config.to_str().context("path")?,
                    "--listen",
                    "127.0.0.1:0",
                ],
                scratch,
            )
            .await?;
            let addr = child.addr.clone();
            (
                Some(child),
                scratch.join(crate::cli::serve::DEV_PKI_DIR),
                vec![addr],
            )
        }
    };
    let run = prepare_gateway(args, &addrs, &pki).await?;
    let window = spec.window(Instant::now());
    mark_window(args, "gateway", window);
    let probe = run
        .subscribers
        .map(|s| s.start(window, run.narrative.clone()));
    let cpu = Cpu::measure(window, gateway.as_ref().and_then(Child::pid));
    let gw = bench::drive(&spec, window, run.caller, &progress_bar(args, "gateway")).await;
    let gateway_cpu = cpu.await.unwrap_or_default();
    let inbox = match probe {
        Some(p) => {
            let raised = gw.by_op.get(&Op::RaiseConcern).map_or(0, |f| f.ok);
            Some(p.finish(raised, Duration::from_secs(5)).await)
        }
        None => None,
    };
    let rss = gateway.as_ref().and_then(Child::peak_rss);
    let audit = match &gateway {
        Some(g) => g.audit_stats().await,
        None => None,
    };
    drop(gateway);

    let (baseline, baseline_cpu) = if args.baseline {
        let config = crate::cli::serve::prepare_dev(scratch)?;
        let echo = Child::spawn(
            &[
                "bench-echo",
                "--config",
                config.to_str().context("path")?,
                "--listen",
                "127.0.0.1:0",
            ],
            scratch,
        )
        .await?;
        let pki = scratch.join(crate::cli::serve::DEV_PKI_DIR);
        // As many connections as the gateways had, so the client's share is alike.
        let conns = channels(
            std::slice::from_ref(&echo.addr),
            &pki,
            "agency-school-oakfield",
            args.connections * addrs.len(),
        )
        .await?;
        let window = spec.window(Instant::now());
        mark_window(args, "echo", window);
        let cpu = Cpu::measure(window, echo.pid());
        let caller = echo_caller(conns, args.payload);
        let figures = bench::drive(&spec, window, caller, &progress_bar(args, "baseline")).await;
        (Some(figures), cpu.await.unwrap_or_default())
    } else {
        (None, Cpu::default())
    };
    Ok(Outcome {
        gateway: gw,
        gateway_cpu,
        inbox,
        rss,
        audit,
        baseline,
        baseline_cpu,
    })
}

/// With --mark-window, says on stderr when `server`'s measured window starts and
/// ends.
fn mark_window(args: &BenchArgs, server: &'static str, window: bench::Window) {
    if !args.mark_window {
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep_until(window.measure_from.into()).await;
        eprintln!("sgw bench: {server} window start");
        tokio::time::sleep_until(window.end.into()).await;
        eprintln!("sgw bench: {server} window end");
    });
}

fn random_hex() -> anyhow::Result<String> {
    let mut bytes = [0u8; 6];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("system RNG failed"))?;
    Ok(crate::tls::hex(&bytes))
}

fn latency_json(h: &hdrhistogram::Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "p50_ms": bench::ms(h, 0.5), "p90_ms": bench::ms(h, 0.9),
        "p99_ms": bench::ms(h, 0.99), "p999_ms": bench::ms(h, 0.999),
    })
}

fn figures_json(f: &Figures, cpu: &Cpu) -> serde_json::Value {
    let (server_us, client_us) = cpu.per_call(f.ok);
    let mut v = serde_json::json!({
        "server_cpu_us_per_call": server_us, "client_cpu_us_per_call": client_us,
        "requests_per_second": f.rate(),
        "ok": f.ok,
        "errors": f.errors, "warmup_errors": f.warmup_errors,
        "p50_ms": f.ms(0.5), "p90_ms": f.ms(0.9), "p99_ms": f.ms(0.99), "p999_ms": f.ms(0.999),
    });
    let by_op: serde_json::Map<String, serde_json::Value> = f
        .by_op
        .iter()
        .map(|(op, o)| {
            let mut v = latency_json(&o.latency);
            v["requests_per_second"] = (o.ok as f64 / f.elapsed.as_secs_f64().max(1e-9)).into();
            v["ok"] = o.ok.into();
            v["errors"] = serde_json::json!(o.errors);
            (op.name().to_owned(), v)
        })
        .collect();
    v["by_op"] = by_op.into();
    v
}

fn inbox_json(i: &InboxFigures) -> serde_json::Value {
    let mut v = latency_json(&i.latency);
    v["subscribers"] = i.subscribers.into();
    v["received"] = i.received.into();
    v["expected"] = i.expected.into();
    v["missed"] = i.missed().into();
    v["stream_errors"] = serde_json::json!(i.stream_errors);
    v
}

fn ratio(a: f64, b: f64) -> f64 {
    a / b.max(1e-9)
}

fn errors_text(errors: &std::collections::BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        "0".to_owned()
    } else {
        format!("{errors:?}")
    }
}

/// The measured errors, and those of calls started in the warm-up when there were
/// any.
fn run_errors_text(f: &Figures) -> String {
    let measured = errors_text(&f.errors);
    if f.warmup_errors.is_empty() {
        measured
    } else {
        format!("{measured} (in the warm-up: {:?})", f.warmup_errors)
    }
}

fn report(args: &BenchArgs, o: &Outcome) {
    let gw = &o.gateway;
    if args.json {
        let mut v = serde_json::json!({
            "ops": args.ops.iter().map(|o| o.name()).collect::<Vec<_>>(),
            "concurrency": args.concurrency, "connections": args.connections,
            "gateways": args.addrs.len().max(1),
            "duration_s": args.duration.as_secs_f64(), "warmup_s": args.warmup.as_secs_f64(),
            "payload_bytes": args.payload, "records": args.records, "subjects": args.subjects,
            "gateway": figures_json(gw, &o.gateway_cpu), "gateway_peak_rss_bytes": o.rss,
            "audit_mean_group": o.audit.map(|a| a.mean_group),
            "audit_mean_sync_ms": o.audit.map(|a| a.mean_sync_ms),
            "audit_syncs_over_10ms": o.audit.map(|a| a.slow_syncs),
            "audit_round_ends": o.audit.map(|a| a.round_ends),
            "audit_mean_round_end_ms": o.audit.and_then(|a| a.mean_round_end_ms()),
            "audit_max_round_end_ms": o.audit.map(|a| a.round_end_max_ms),
        });
        if let Some(i) = &o.inbox {
            v["raise_to_receive"] = inbox_json(i);
        }
        if let Some(b) = &o.baseline {
            v["baseline"] = figures_json(b, &o.baseline_cpu);
            v["ratio"] = serde_json::json!({
                "throughput": ratio(gw.rate(), b.rate()),
                "p50": ratio(gw.ms(0.5), b.ms(0.5)),
                "p90": ratio(gw.ms(0.9), b.ms(0.9)),
                "p99": ratio(gw.ms(0.99), b.ms(0.99)),
                "p999": ratio(gw.ms(0.999), b.ms(0.999)),
            });
        }
        println!("{v}");
        return;
    }
    let ops: Vec<_> = args.ops.iter().map(|o| o.name()).collect();
    let spread = match args.addrs.len() {
        0 | 1 => String::new(),
        n => format!(" to each of {n} gateways"),
    };
    println!(
        "sgw bench: {}, {} callers over {} connections per identity{spread}, {:?} measured after {:?} warm-up, {} B payload",
        ops.join(" + "), args.concurrency, args.connections, args.duration, args.warmup, args.payload
    );
    let row = |name: &str, rate: f64, h: &hdrhistogram::Histogram<u64>, errors: &str| {
        println!(
            "{name:<18} {rate:>9.0} req/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  errors {errors}",
            bench::ms(h, 0.5),
            bench::ms(h, 0.9),
            bench::ms(h, 0.99),
            bench::ms(h, 0.999),
        );
    };
    row("gateway", gw.rate(), &gw.latency, &run_errors_text(gw));
    if gw.by_op.len() > 1 {
        for (op, f) in &gw.by_op {
            let rate = f.ok as f64 / gw.elapsed.as_secs_f64().max(1e-9);
            row(
                &format!("  {}", op.name()),
                rate,
                &f.latency,
                &errors_text(&f.errors),
            );
        }
    }
    if let Some(i) = &o.inbox {
        println!(
            "raise→receive      {:>4} streams  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  received {}/{} events, stream errors {}",
            i.subscribers,
            bench::ms(&i.latency, 0.5),
            bench::ms(&i.latency, 0.9),
            bench::ms(&i.latency, 0.99),
            bench::ms(&i.latency, 0.999),
            i.received,
            i.expected,
            errors_text(&i.stream_errors),
        );
    }
    if let Some(b) = &o.baseline {
        row("baseline (echo)", b.rate(), &b.latency, &run_errors_text(b));
        println!(
            "ratio gateway/echo {:>8.2}x        p50 {:>7.2}x     p90 {:>7.2}x     p99 {:>7.2}x     p99.9 {:>7.2}x",
            ratio(gw.rate(), b.rate()),
            ratio(gw.ms(0.5), b.ms(0.5)),
            ratio(gw.ms(0.9), b.ms(0.9)),
            ratio(gw.ms(0.99), b.ms(0.99)),
            ratio(gw.ms(0.999), b.ms(0.999)),
        );
    }
    let cpu_row = |name: &str, cpu: &Cpu, calls: u64| {
        let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} µs"));
        let (server, client) = cpu.per_call(calls);
        println!(
            "CPU per call, {name:<8} server {:>8}  bench client {:>8}",
            show(server),
            show(client)
        );
    };
    cpu_row("gateway", &o.gateway_cpu, gw.ok);
    if let Some(b) = &o.baseline {
        cpu_row("echo", &o.baseline_cpu, b.ok);
    }
    if let Some(rss) = o.rss {
        println!("gateway peak RSS {:.1} MiB", rss as f64 / (1024.0 * 1024.0));
    }
    if let Some(a) = o.audit {
        println!(
            "audit mean group commit {:.1} entries per fsync, {:.2} ms in its durability point per commit ({} over 10 ms)",
            a.mean_group, a.mean_sync_ms, a.slow_syncs
        );
        if let Some(mean) = a.mean_round_end_ms() {
            println!(
                "audit write-ahead round ends {}, {mean:.1} ms each on average, longest {:.1} ms (commits wait for them)",
                a.round_ends, a.round_end_max_ms
            );
        }
    }
}

/// Arguments of the hidden `sgw bench-echo` (the baseline server).
#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// The config whose TLS section to use.
    #[arg(long)]
    pub config: PathBuf,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
}

/// Runs the echo baseline until SIGTERM or Ctrl-C.
pub fn run_echo(args: EchoArgs) -> anyhow::Result<ExitCode> {
    let config = crate::config::Config::load(&args.config)?;
    let rt = crate::server::runtime().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let stop = tokio_util::sync::CancellationToken::new();
        let trigger = stop.clone();
        tokio::spawn(async move {
            crate::server::shutdown_signal().await;
            trigger.cancel();
        });
        bench::echo::serve(&config, args.listen, stop).await
    })?;
    Ok(ExitCode::SUCCESS)
}
