//! `sgw bench` as an operator runs it: the real binary starts its own gateway and the
//! bare echo on a temporary data dir and development PKI, seeds records and consents,
//! drives every op of the mix over mutual TLS, and reports figures and ratios. Speed
//! is not asserted here (the benchmarks measure it); that the tool works end to end,
//! with every call answered as expected, is. Linux only: the tool reads RSS and CPU
//! from `/proc`.
#![cfg(target_os = "linux")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[test]
fn sgw_bench_drives_the_whole_mix_against_the_echo_and_reports_it_as_json() {
    let work = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sgw"))
        .current_dir(work.path())
        .args([
            "bench",
            "--op",
            "get-record",
            "--op",
            "raise-concern",
            "--op",
            "find-records",
            "--op",
            "query-disclosures",
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--duration",
            "2s",
            "--warmup",
            "1s",
            "--payload",
            "512",
            "--baseline",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sgw bench");
    // A hung bench must fail the test, not hang the suite. (Killed, it cannot stop
    // the gateway and echo it started; the deadline is far beyond a normal run.)
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for sgw bench") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sgw bench did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::process::Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sgw bench failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));

    let gateway = &report["gateway"];
    for op in [
        "GetRecord",
        "RaiseConcern",
        "FindRecords",
        "QueryDisclosures",
    ] {
        let figures = &gateway["by_op"][op];
        assert!(
            figures["ok"].as_u64().unwrap_or(0) > 0,
            "{op} made no successful call: {report:#}"
        );
        assert_eq!(figures["errors"], serde_json::json!({}), "{op}: {report:#}");
        let (p50, p99) = (figures["p50_ms"].as_f64(), figures["p99_ms"].as_f64());
        assert!(
            matches!((p50, p99), (Some(a), Some(b)) if a > 0.0 && a <= b),
            "{op} percentiles: {report:#}"
        );
    }
    assert_eq!(gateway["errors"], serde_json::json!({}), "{report:#}");

    let echo = &report["baseline"];
    assert!(echo["ok"].as_u64().unwrap_or(0) > 0, "{report:#}");
    assert_eq!(echo["errors"], serde_json::json!({}), "{report:#}");

    // The headline: the gateway's figures as ratios to the echo's, from the same run.
    let ratio = &report["ratio"];
    let throughput = ratio["throughput"].as_f64().expect("throughput ratio");
    let expected = gateway["requests_per_second"]
        .as_f64()
        .expect("gateway req/s")
        / echo["requests_per_second"].as_f64().expect("echo req/s");
    assert!(
        (throughput - expected).abs() < 1e-9 * expected.max(1.0),
        "{report:#}"
    );
    // The gateway reported its audit group commits (read from its metrics endpoint).
    assert!(
        report["audit_mean_group"].as_f64().unwrap_or(0.0) >= 1.0,
        "{report:#}"
    );
    assert!(
        report["gateway_peak_rss_bytes"].as_u64().unwrap_or(0) > 1 << 20,
        "{report:#}"
    );
    assert!(
        gateway["server_cpu_us_per_call"].as_f64().unwrap_or(0.0) > 0.0,
        "{report:#}"
    );
}
