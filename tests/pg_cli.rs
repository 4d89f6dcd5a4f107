//! `sgw audit verify --config`: the log a gateway's config names, checked offline.
//! With `backend = "postgres"` it reads the database while the gateway serves, and
//! names the first bad seq; with sled it is `--data-dir` on the config's data_dir.
//!
//! The PostgreSQL test reads the server's URL from `SGW_TEST_POSTGRES_URL` and is
//! skipped, saying why, when it is unset (`.ci/run` sets it).

mod common;
mod pg_common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::Env;
use pg_common::{server_url, TestDb};
use sgw::audit::checkpoint::Checkpoint as SignedState;
use sgw::domain::Role;
use sgw::proto::v1::audit_service_client::AuditServiceClient;
use sgw::proto::v1::record_service_client::RecordServiceClient;
use sgw::proto::v1::*;
use sgw::store::Keys;
use tonic::transport::Channel;

/// Runs `sgw audit verify` with `args`.
async fn verify(args: &[&std::ffi::OsStr]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sgw"))
        .args(["audit", "verify"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run sgw audit verify")
}

/// `sgw audit verify <flag> <path> [--checkpoint <kept>]`.
async fn verify_by(flag: &str, path: &Path, kept: Option<&Path>) -> Output {
    let mut args = vec![flag.as_ref(), path.as_os_str()];
    if let Some(k) = kept {
        args.extend(["--checkpoint".as_ref(), k.as_os_str()]);
    }
    verify(&args).await
}

async fn verify_config(config: &Path, kept: Option<&Path>) -> Output {
    verify_by("--config", config, kept).await
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The entry count of a successful verification's summary line.
fn entries_verified(out: &Output) -> u64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .strip_prefix("audit log verified: ")
        .and_then(|rest| rest.split(" entries").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary line in: {}", text(out)))
}

async fn channel(env: &Env, addr: std::net::SocketAddr, role: Role, id: &str) -> Channel {
    let (cert, key) = env.identity(role, id);
    common::connect(addr, &env.ca_pem(), Some((&cert, &key)))
        .await
        .expect("connect")
}

/// A checkpoint from the gateway, waiting for the first one to be signed (on
/// PostgreSQL the lease holder signs them, a little after start).
async fn checkpoint(client: &mut AuditServiceClient<Channel>) -> sgw::proto::v1::Checkpoint {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.get_checkpoint(GetCheckpointRequest {}).await {
            Ok(r) => return r.into_inner().checkpoint.expect("checkpoint present"),
            Err(s) if Instant::now() < deadline => {
                eprintln!("no checkpoint yet: {s:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("no checkpoint served: {s:?}"),
        }
    }
}

async fn head_size(sql: &tokio_postgres::Client) -> u64 {
    let size: i64 = sql
        .query_one("SELECT size FROM audit_head WHERE id = 1", &[])
        .await
        .expect("read the head")
        .get(0);
    size as u64
}

/// A note signed with the gateway's own checkpoint key, as if kept from an earlier
/// GetCheckpoint: lets a test state a history the database must agree with.
fn signed_note(data_dir: &Path, log_id: &str, tree_size: u64, root_hash: [u8; 32]) -> String {
    let keys = Keys::load_existing(data_dir, None).expect("the gateway's keys");
    SignedState {
        log_id: log_id.to_owned(),
        tree_size,
        root_hash,
        timestamp: 1,
    }
    .sign(&keys.checkpoint)
    .expect("sign")
    .signed_note()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_config_checks_the_postgres_log_while_the_gateway_serves_and_names_seq_1() {
    let test = "cli_verify";
    let Some(url) = server_url(test) else { return };
    let db = TestDb::create(&url, test).await;
    let env = Env::new();
    env.append_config(&format!(
        "[storage]\nbackend = \"postgres\"\nurl = \"{}\"\n\n[audit]\ncheckpoint_interval = \"1s\"\n",
        db.url()
    ));
    let config = env.config_path();
    let data_dir = env.path().join("data/dev");
    let gw = common::spawn_gateway(&env).await;

    let mut auditor = AuditServiceClient::new(channel(&env, gw.addr, Role::Auditor, "dpo").await);
    let mut police =
        RecordServiceClient::new(channel(&env, gw.addr, Role::Agency, "police-met").await);
    police
        .share_record(ShareRecordRequest {
            subject: Some(Subject {
                nhs_number: "943 476 5919".into(),
            }),
            category: RecordCategory::PoliceIncident as i32,
            summary: "Domestic abuse incident at the child's home".into(),
            content: b"attended 02:10".to_vec(),
            media_type: "text/plain; charset=utf-8".into(),
            retain_until: None,
        })
        .await
        .expect("share a record");
    for _ in 0..3 {
        checkpoint(&mut auditor).await;
    }
    let kept = checkpoint(&mut auditor).await;
    assert!(kept.tree_size >= 1, "{kept:?}");
    let kept_note = env.path().join("kept.note");
    std::fs::write(&kept_note, &kept.signed_note).unwrap();
    // Something after the kept checkpoint, so the log has moved on from it.
    checkpoint(&mut auditor).await;

    // While the gateway serves: the whole log, consistent with the kept note.
    let sql = db.sql().await;
    let before = head_size(&sql).await;
    let out = verify_config(&config, Some(&kept_note)).await;
    let after = head_size(&sql).await;
    assert!(out.status.success(), "{}", text(&out));
    let n = entries_verified(&out);
    assert!(
        before <= n && n <= after && n > kept.tree_size,
        "{n} entries verified, head {before}..{after}: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("consistent with the kept checkpoint"),
        "{}",
        text(&out)
    );

    // Kept notes the database contradicts, signed with the log's own key: one past
    // the log (rolled back or truncated), one with another history at size 2.
    let log_id = format!("{}/sgw/audit", common::TD);
    let cases = [
        (
            "beyond",
            signed_note(&data_dir, &log_id, after + 1000, [7; 32]),
            "rolled back",
        ),
        (
            "other-root",
            signed_note(&data_dir, &log_id, 2, [7; 32]),
            "at size 2 does not match the log",
        ),
    ];
    for (name, note, want) in cases {
        let path = env.path().join(format!("{name}.note"));
        std::fs::write(&path, note).unwrap();
        let out = verify_config(&config, Some(&path)).await;
        assert_eq!(out.status.code(), Some(1), "{name}: {}", text(&out));
        assert!(
            text(&out).contains(want),
            "{name}: want {want:?}: {}",
            text(&out)
        );
    }

    // Key files missing: cannot check (2), naming the folder; none are created.
    let keys_dir = data_dir.join("keys");
    let moved = env.path().join("keys.moved");
    std::fs::rename(&keys_dir, &moved).unwrap();
    let out = verify_config(&config, None).await;
    let keys_missing = text(&out);
    let keys_created = keys_dir.exists();
    std::fs::rename(&moved, &keys_dir).unwrap();
    assert_eq!(out.status.code(), Some(2), "{keys_missing}");
    assert!(
        keys_missing.contains(&keys_dir.display().to_string()),
        "{keys_missing}"
    );
    assert!(!keys_created, "verify created a key folder");

    // One bit of entry 1 flipped in the database: found and named, gateway running.
    sql.execute(
        "UPDATE audit_entries SET sealed = set_byte(sealed, 20, get_byte(sealed, 20) # 1) WHERE seq = 1",
        &[],
    )
    .await
    .unwrap();
    let out = verify_config(&config, None).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("audit log FAILED verification: seq 1:"),
        "{}",
        text(&out)
    );

    gw.stop().await;
    db.drop_database().await;
}

#[tokio::test]
async fn verify_config_with_sled_storage_is_verify_data_dir() {
    let env = Env::new();
    let config = env.config_path();
    let data_dir = env.path().join("data/dev");
    let gw = env.start().await;
    let mut auditor = AuditServiceClient::new(gw.connect_as(&env, Role::Auditor, "dpo").await);
    for _ in 0..4 {
        checkpoint(&mut auditor).await;
    }
    let kept = checkpoint(&mut auditor).await;
    let kept_note = env.path().join("kept.note");
    std::fs::write(&kept_note, &kept.signed_note).unwrap();

    // The gateway holds sled's lock: both cannot check, alike.
    let (a, b) = (
        verify_config(&config, None).await,
        verify_by("--data-dir", &data_dir, None).await,
    );
    assert_eq!(a.status.code(), Some(2), "{}", text(&a));
    assert_eq!((a.status.code(), text(&a)), (b.status.code(), text(&b)));

    gw.stop().await;
    // sled lets go of its file lock a little after the last handle.
    let deadline = Instant::now() + Duration::from_secs(10);
    let a = loop {
        let a = verify_config(&config, Some(&kept_note)).await;
        if a.status.code() != Some(2) || Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let b = verify_by("--data-dir", &data_dir, Some(&kept_note)).await;
    assert!(a.status.success(), "{}", text(&a));
    assert_eq!(entries_verified(&a), kept.tree_size);
    assert!(
        text(&a).contains("consistent with the kept checkpoint"),
        "{}",
        text(&a)
    );
    assert_eq!((a.status.code(), text(&a)), (b.status.code(), text(&b)));
}

#[test]
fn verify_takes_one_of_data_dir_config_and_addr() {
    for args in [
        ["--data-dir", "d", "--config", "c.toml"],
        ["--config", "c.toml", "--addr", "127.0.0.1:1"],
        ["--data-dir", "d", "--addr", "127.0.0.1:1"],
        ["--config", "c.toml", "--signing-key", "k.pem"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sgw"))
            .args(["audit", "verify"])
            .args(args)
            .output()
            .expect("run sgw");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("cannot be used with"), "{args:?}: {err}");
    }
}
