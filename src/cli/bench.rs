//! `sgw bench`: the load tool. See `benches/README.md` for the method.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::bench::{self, Caller, Figures, LoadSpec, Op};
use crate::proto::bench::echo_service_client::EchoServiceClient;
use crate::proto::bench::EchoRequest;
use crate::proto::v1::audit_service_client::AuditServiceClient;
use crate::proto::v1::QueryDisclosuresRequest;

/// Arguments of `sgw bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A running gateway to drive; without it, `sgw bench` starts one on a temporary
    /// data dir and development PKI, and drives that.
    #[arg(long)]
    pub addr: Option<String>,
    /// Folder with ca.pem and the dev identities (<role>-<id>.pem/.key) to call as,
    /// when --addr is given.
    #[arg(long, default_value = "certs/dev")]
    pub pki_dir: PathBuf,
    /// Callers running at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections per identity the callers share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Measured time, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured warm-up before it.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Payload size in bytes (record content, concern narrative, echo payload).
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// The calls to mix, round robin (repeat to weight).
    #[arg(long = "op", value_enum, default_values_t = vec![Op::QueryDisclosures])]
    pub ops: Vec<Op>,
    /// Also drive a bare echo service on the same TLS configuration and print each
    /// figure as a ratio to it.
    #[arg(long)]
    pub baseline: bool,
    /// One JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

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

    fn peak_rss(&self) -> Option<u64> {
        self.child.id().and_then(bench::peak_rss)
    }

    /// Mean audit group-commit size, from the started gateway's metrics.
    async fn mean_group(&self) -> Option<f64> {
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
        let (entries, commits) = (
            value("sgw_audit_entries_total")?,
            value("sgw_audit_commits_total")?,
        );
        (commits > 0.0).then(|| entries / commits)
    }
}

async fn channels(addr: &str, pki: &Path, stem: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
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
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let ch = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls.clone())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        out.push(ch);
    }
    Ok(out)
}

fn code(status: tonic::Status) -> tonic::Code {
    status.code()
}

/// The gateway caller for the mix.
async fn gateway_caller(args: &BenchArgs, addr: &str, pki: &Path) -> anyhow::Result<Caller> {
    let auditors = channels(addr, pki, "auditor-dpo", args.connections).await?;
    let ops = args.ops.clone();
    let unsupported: Vec<Op> = ops
        .iter()
        .copied()
        .filter(|op| !matches!(op, Op::QueryDisclosures))
        .collect();
    if !unsupported.is_empty() {
        anyhow::bail!("this build drives only query-disclosures; {unsupported:?} arrive with the concerns and records capabilities");
    }
    Ok(Arc::new(move |w, n| {
        let op = ops[(w + n as usize) % ops.len()];
        let auditors = auditors.clone();
        Box::pin(async move {
            match op {
                Op::QueryDisclosures => {
                    let mut client = AuditServiceClient::new(bench::pick(&auditors, w));
                    client
                        .query_disclosures(QueryDisclosuresRequest {
                            page_size: 10,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                        .map_err(code)
                }
                _ => Err(tonic::Code::Unimplemented),
            }
        })
    }))
}

async fn echo_caller(args: &BenchArgs, addr: &str, pki: &Path) -> anyhow::Result<Caller> {
    let agencies = channels(addr, pki, "agency-school-oakfield", args.connections).await?;
    let payload = vec![0x5au8; args.payload];
    Ok(Arc::new(move |w, _| {
        let mut client = EchoServiceClient::new(bench::pick(&agencies, w));
        let payload = payload.clone();
        Box::pin(async move {
            client
                .echo(EchoRequest { payload })
                .await
                .map(|_| ())
                .map_err(code)
        })
    }))
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

async fn run_async(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let spec = LoadSpec {
        concurrency: args.concurrency,
        duration: args.duration,
        warmup: args.warmup,
    };
    let scratch = tempfile_dir()?;
    let (gateway, pki, addr) = match &args.addr {
        Some(addr) => (None, args.pki_dir.clone(), addr.clone()),
        None => {
            let config = crate::cli::serve::prepare_dev(&scratch)?;
            let mut text = std::fs::read_to_string(&config)?;
            text.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
            std::fs::write(&config, text)?;
            let child = Child::spawn(
                &[
                    "serve",
                    "--config",
                    config.to_str().context("path")?,
                    "--listen",
                    "127.0.0.1:0",
                ],
                &scratch,
            )
            .await?;
            let addr = child.addr.clone();
            (
                Some(child),
                scratch.join(crate::cli::serve::DEV_PKI_DIR),
                addr,
            )
        }
    };
    let caller = gateway_caller(&args, &addr, &pki).await?;
    let gw = bench::drive(&spec, caller, &progress_bar(&args, "gateway")).await;
    let gw_rss = gateway.as_ref().and_then(Child::peak_rss);
    let mean_group = match &gateway {
        Some(g) => g.mean_group().await,
        None => None,
    };

    let base = if args.baseline {
        let config = crate::cli::serve::prepare_dev(&scratch)?;
        let echo = Child::spawn(
            &[
                "bench-echo",
                "--config",
                config.to_str().context("path")?,
                "--listen",
                "127.0.0.1:0",
            ],
            &scratch,
        )
        .await?;
        let caller = echo_caller(
            &args,
            &echo.addr,
            &scratch.join(crate::cli::serve::DEV_PKI_DIR),
        )
        .await?;
        Some(bench::drive(&spec, caller, &progress_bar(&args, "baseline")).await)
    } else {
        None
    };
    report(&args, &gw, gw_rss, mean_group, base.as_ref());
    drop(gateway);
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(ExitCode::SUCCESS)
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let mut bytes = [0u8; 6];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("system RNG failed"))?;
    let dir = std::env::temp_dir().join(format!("sgw-bench-{}", crate::tls::hex(&bytes)));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn figures_json(f: &Figures) -> serde_json::Value {
    serde_json::json!({
        "requests_per_second": f.rate(),
        "ok": f.ok,
        "errors": f.errors,
        "p50_ms": f.ms(0.5), "p90_ms": f.ms(0.9), "p99_ms": f.ms(0.99), "p999_ms": f.ms(0.999),
    })
}

fn report(
    args: &BenchArgs,
    gw: &Figures,
    rss: Option<u64>,
    mean_group: Option<f64>,
    base: Option<&Figures>,
) {
    if args.json {
        let mut v = serde_json::json!({
            "ops": args.ops.iter().map(|o| format!("{o:?}")).collect::<Vec<_>>(), "concurrency": args.concurrency, "connections": args.connections,
            "duration_s": args.duration.as_secs_f64(), "payload_bytes": args.payload,
            "gateway": figures_json(gw), "gateway_peak_rss_bytes": rss,
            "audit_mean_group": mean_group,
        });
        if let Some(b) = base {
            v["baseline"] = figures_json(b);
            v["ratio"] = serde_json::json!({
                "throughput": gw.rate() / b.rate().max(1e-9),
                "p50": gw.ms(0.5) / b.ms(0.5).max(1e-9),
                "p99": gw.ms(0.99) / b.ms(0.99).max(1e-9),
            });
        }
        println!("{v}");
        return;
    }
    println!(
        "sgw bench: {:?}, {} callers over {} connections, {:?} measured after {:?} warm-up, {} B payload",
        args.ops, args.concurrency, args.connections, args.duration, args.warmup, args.payload
    );
    let row = |name: &str, f: &Figures| {
        println!(
            "{name:<9} {:>10.0} req/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  errors {}",
            f.rate(),
            f.ms(0.5),
            f.ms(0.9),
            f.ms(0.99),
            f.ms(0.999),
            if f.errors.is_empty() { "0".to_owned() } else { format!("{:?}", f.errors) }
        );
    };
    row("gateway", gw);
    if let Some(b) = base {
        row("baseline", b);
        println!(
            "ratio     {:>10.2}x      p50 {:>7.2}x     p90 {:>7.2}x     p99 {:>7.2}x     p99.9 {:>7.2}x",
            gw.rate() / b.rate().max(1e-9),
            gw.ms(0.5) / b.ms(0.5).max(1e-9),
            gw.ms(0.9) / b.ms(0.9).max(1e-9),
            gw.ms(0.99) / b.ms(0.99).max(1e-9),
            gw.ms(0.999) / b.ms(0.999).max(1e-9),
        );
    }
    if let Some(rss) = rss {
        println!("gateway peak RSS {:.1} MiB", rss as f64 / (1024.0 * 1024.0));
    }
    if let Some(g) = mean_group {
        println!("audit mean group commit {g:.1} entries per fsync");
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
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
