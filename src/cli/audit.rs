//! `sgw audit`: verify the log (offline from a stopped gateway's sled data, from the
//! PostgreSQL database named in a gateway's config while replicas serve, or online as
//! an auditor over mTLS) and query it.
//!
//! `verify` exits 0 when the log verified, 1 when it was examined and found bad (or
//! an online check failed), 2 when it could not be examined (sled locked by a running
//! gateway, keys missing, database unreachable).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use prost::Message;

use super::client::ClientArgs;
use crate::audit::checkpoint::{self, VerifierKey};
use crate::audit::merkle::{self, MemoryTree};
use crate::audit::verify::{self, cannot_check, fail, Failure, Summary};
use crate::audit::AuditError;
use crate::config::{Config, PostgresStorage, Storage};
use crate::pg::{PgAuditLog, PgAuditSettings};
use crate::proto::v1::audit_service_client::AuditServiceClient;
use crate::proto::v1::*;
use crate::store::Keys;

/// The `sgw audit` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Verify the whole log: every entry, the Merkle tree, every checkpoint.
    Verify(VerifyArgs),
    /// Query the log as an auditor (over mTLS).
    Query(QueryArgs),
}

/// Arguments of `sgw audit verify`. At most one of `--data-dir`, `--config` and
/// `--addr` says which log; with none, the gateway at the default `--addr`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("log").args(["data_dir", "config", "addr"]).multiple(false)))]
pub struct VerifyArgs {
    /// Offline: the data_dir of a stopped gateway (sled storage).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Offline, from a gateway's config file: with sled storage, its data_dir (as
    /// --data-dir, with its signing_key); with `backend = "postgres"`, the database,
    /// checked in one snapshot while replicas keep serving. Reads the key files the
    /// config names and never creates any.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The gateway's checkpoint signing key, when its config sets `[audit] signing_key`.
    #[arg(long, requires = "data_dir", conflicts_with = "config")]
    pub signing_key: Option<PathBuf>,
    /// A signed checkpoint note saved earlier (from GetCheckpoint's signed_note):
    /// the log must still be consistent with it. Catches a log rolled back or truncated.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Online: pin the log's C2SP verifier key instead of trusting the one served.
    #[arg(long, conflicts_with_all = ["config", "data_dir"])]
    pub verifier_key: Option<String>,
    /// Online (when neither --data-dir nor --config is given): the running gateway to
    /// check.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Arguments of `sgw audit query`.
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// Only entries about this child.
    #[arg(long)]
    pub nhs_number: Option<String>,
    /// Only entries by this actor id.
    #[arg(long)]
    pub actor: Option<String>,
    /// Only entries whose target agency is this.
    #[arg(long)]
    pub target: Option<String>,
    /// Only entries with this action, e.g. RECORD_DISCLOSED.
    #[arg(long, value_parser = parse_action)]
    pub action: Option<AuditAction>,
    /// Only entries at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<prost_types::Timestamp>,
    /// Only entries before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<prost_types::Timestamp>,
    /// Stop after this many entries (at least 1).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientArgs,
}

/// Runs an `sgw audit` subcommand.
pub fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify(args) => {
            let checked = if let Some(dir) = &args.data_dir {
                verify_offline(dir, args.signing_key.as_deref(), &args)
            } else if let Some(file) = &args.config {
                verify_from_config(file, &args)
            } else {
                runtime().and_then(|rt| rt.block_on(verify_online(&args)))
            };
            // A failed verification has said so and answers 1; anything else that
            // stopped the check (a file that cannot be read, a gateway that cannot
            // be reached) is 2, so that a monitor never takes it for tampering.
            Ok(checked.unwrap_or_else(|e| {
                eprintln!(
                    "sgw: audit log could not be checked: {}",
                    super::error_text(&e)
                );
                ExitCode::from(2)
            }))
        }
        AuditCommand::Query(args) => runtime()?.block_on(query(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn read_kept(args: &VerifyArgs) -> anyhow::Result<Option<String>> {
    args.checkpoint
        .as_ref()
        .map(|p| {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            // A signed note ends in exactly one newline; files saved by shells or
            // `jq -r` often carry one more.
            Ok(format!("{}\n", text.trim_end()))
        })
        .transpose()
}

fn verify_offline(
    dir: &Path,
    signing_key: Option<&Path>,
    args: &VerifyArgs,
) -> anyhow::Result<ExitCode> {
    let kept = read_kept(args)?;
    let result = verify::verify_data_dir(dir, signing_key, kept.as_deref());
    Ok(report(result, kept.is_some()))
}

/// Prints the outcome of an offline verification; its exit code.
fn report(result: Result<Summary, Failure>, kept: bool) -> ExitCode {
    match result {
        Ok(s) => {
            out!(
                "audit log verified: {} entries, root {}, {} stored checkpoints verified{}{}",
                s.entries,
                crate::tls::hex(&s.root),
                s.checkpoints,
                s.latest_checkpoint_size
                    .map(|n| format!(" (newest at size {n})"))
                    .unwrap_or_default(),
                if kept {
                    ", consistent with the kept checkpoint"
                } else {
                    ""
                },
            );
            ExitCode::SUCCESS
        }
        Err(f) if f.cannot_check => {
            eprintln!("sgw: audit log could not be checked: {f}");
            ExitCode::from(2)
        }
        Err(f) => {
            eprintln!("audit log FAILED verification: {f}");
            ExitCode::from(1)
        }
    }
}

/// `--config`: the log the gateway's `[storage]` names.
fn verify_from_config(file: &Path, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let config = match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sgw: audit log could not be checked: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    match &config.storage {
        Storage::Sled => {
            verify_offline(&config.data_dir, config.audit.signing_key.as_deref(), args)
        }
        Storage::Postgres(storage) => {
            let kept = read_kept(args)?;
            let result = runtime()?.block_on(verify_postgres(&config, storage, kept.as_deref()));
            Ok(report(result, kept.is_some()))
        }
    }
}

/// Verifies the PostgreSQL log with [`PgAuditLog::verify`] (one REPEATABLE READ
/// snapshot, so replicas may append meanwhile), then `kept` against it. Never writes:
/// a database without a log, or with an older schema, is refused rather than
/// created or migrated.
async fn verify_postgres(
    config: &Config,
    storage: &PostgresStorage,
    kept: Option<&str>,
) -> Result<Summary, Failure> {
    let keys_dir = config.data_dir.join("keys");
    let keys = Keys::load_existing(&config.data_dir, config.audit.signing_key.as_deref())
        .map(Arc::new)
        .map_err(|e| {
            cannot_check(format!(
                "the gateway's key files must be present under {} (every replica uses the same ones; this tool never creates keys): {e}",
                keys_dir.display()
            ))
        })?;
    let pool = storage
        .connection
        .pool()
        .map_err(|e| cannot_check(e.to_string()))?;
    check_schema(&pool).await?;
    let log = PgAuditLog::open_pool(
        pool,
        PgAuditSettings {
            log_id: config.audit.log_id.clone(),
            max_batch: 1,
        },
        keys.clone(),
        Arc::new(crate::domain::SystemClock),
    )
    .await
    .map_err(|e| cannot_check(e.to_string()))?;
    let summary = log.verify().await.map_err(audit_failure)?;

    if let Some(note) = kept {
        let public_key = checkpoint::public_key_of(&keys.checkpoint);
        let verifier = VerifierKey::new(&summary.log_id, public_key)
            .map_err(|e| fail(None, format!("log id: {e}")))?
            .to_string();
        let cp = checkpoint::parse_signed_note(note, &verifier).map_err(|e| {
            fail(
                None,
                format!("the kept checkpoint does not verify with this log's key: {e}"),
            )
        })?;
        let size = cp.tree_size;
        if size > summary.entries {
            return Err(fail(
                Some(summary.entries),
                format!(
                    "the log has {} entries but the kept checkpoint covers {size}: entries were removed (truncated or rolled back)",
                    summary.entries
                ),
            ));
        }
        // Read after the snapshot, but from tiles the snapshot checked node by node
        // against the entries: below the verified size a tile may only grow.
        let root = log.root(size).await.map_err(audit_failure)?;
        if !merkle::hashes_equal(&root, &cp.root_hash) {
            return Err(fail(
                None,
                format!("the kept checkpoint at size {size} does not match the log: an entry before seq {size} was changed"),
            ));
        }
    }
    Ok(Summary {
        entries: summary.entries,
        root: summary.root,
        checkpoints: summary.checkpoints,
        latest_checkpoint_size: None,
        log_id: summary.log_id,
    })
}

/// Refuses a database that holds no audit log, or whose schema is older than this
/// build's: opening the log would create or migrate it.
async fn check_schema(pool: &deadpool_postgres::Pool) -> Result<(), Failure> {
    let client = pool.get().await.map_err(|e| {
        cannot_check(format!(
            "cannot connect to the database (storage.url): {}",
            with_causes(&e)
        ))
    })?;
    let pg = |e: tokio_postgres::Error| {
        if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
            cannot_check("this database holds no audit log (no sgw schema): is storage.url the gateways' database?")
        } else {
            cannot_check(format!("postgres: {}", crate::pg::describe(&e)))
        }
    };
    let version: Option<i32> = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await
        .map_err(pg)?
        .get(0);
    let version = version.unwrap_or(0);
    let known = crate::pg::migrate::latest_version();
    if version < known {
        return Err(cannot_check(format!(
            "the database's schema is at version {version}, older than this sgw's ({known}): verifying would migrate it; use the gateways' own sgw, or upgrade them first"
        )));
    }
    let origin: Option<String> = client
        .query_one("SELECT origin FROM audit_head WHERE id = 1", &[])
        .await
        .map_err(pg)?
        .get(0);
    if origin.is_none() {
        return Err(cannot_check(
            "this database holds no audit log yet (no gateway has opened it)",
        ));
    }
    Ok(())
}

/// An error's message followed by those of its causes that it does not already
/// include (the pool's and the driver's own messages leave out why a connection
/// failed).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

/// A PostgreSQL log's error as a verification outcome: damage found, or the log could
/// not be read.
fn audit_failure(e: AuditError) -> Failure {
    match e {
        // The message names the seq where there is one: "seq 7: ...".
        AuditError::Corrupt(problem) => {
            let seq = problem
                .strip_prefix("seq ")
                .and_then(|rest| rest.split_once(": "))
                .and_then(|(n, rest)| Some((n.parse().ok()?, rest)));
            match seq {
                Some((seq, rest)) => fail(Some(seq), rest),
                None => fail(None, problem),
            }
        }
        AuditError::Unavailable(problem) => cannot_check(problem),
        e @ (AuditError::OutOfRange(_) | AuditError::BadPageToken | AuditError::TooMany(_)) => {
            cannot_check(e.to_string())
        }
    }
}

async fn verify_online(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let channel = args.client.connect("auditor-dpo").await?;
    let mut client = AuditServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let cp = client
        .get_checkpoint(GetCheckpointRequest {})
        .await?
        .into_inner()
        .checkpoint
        .context("the gateway sent no checkpoint")?;
    let verifier = args
        .verifier_key
        .clone()
        .unwrap_or_else(|| cp.verifier_key.clone());
    let verifier_key: VerifierKey = verifier
        .parse()
        .map_err(|e| anyhow::anyhow!("verifier key: {e}"))?;
    let note = match checkpoint::parse_signed_note(&cp.signed_note, &verifier) {
        Ok(note) => note,
        Err(e) => {
            eprintln!("audit log FAILED verification: the served checkpoint does not verify with {verifier}: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let mut tree = MemoryTree::new();
    let mut stream = client
        .export_entries(ExportEntriesRequest {
            from_seq: 0,
            to_seq: note.tree_size,
        })
        .await?
        .into_inner();
    while let Some(msg) = stream.message().await? {
        let entry = msg.entry.context("empty export message")?;
        let seq = tree.size();
        let fail = |problem: &str| -> anyhow::Result<ExitCode> {
            eprintln!("audit log FAILED verification: seq {seq}: {problem}");
            Ok(ExitCode::from(1))
        };
        if entry.seq != seq {
            return fail(&format!("exported out of order (got seq {})", entry.seq));
        }
        let mut fields = entry.clone();
        fields.canonical = Vec::new();
        if fields.encode_to_vec() != entry.canonical {
            return fail("canonical bytes do not match the entry's fields");
        }
        tree.append(merkle::leaf_hash(&entry.canonical));
    }
    if tree.size() != note.tree_size {
        eprintln!(
            "audit log FAILED verification: seq {}: export ended early ({} of {} entries)",
            tree.size(),
            tree.size(),
            note.tree_size
        );
        return Ok(ExitCode::from(1));
    }
    if !merkle::hashes_equal(&tree.root(), &note.root_hash) {
        eprintln!(
            "audit log FAILED verification: the exported entries do not hash to the signed root"
        );
        return Ok(ExitCode::from(1));
    }
    if let Some(kept) = read_kept(args)? {
        let old = match checkpoint::parse_signed_note(&kept, &verifier_key.to_string()) {
            Ok(old) => old,
            Err(e) => {
                eprintln!("audit log FAILED verification: the kept checkpoint does not verify with this log's key: {e}");
                return Ok(ExitCode::from(1));
            }
        };
        if old.tree_size > note.tree_size {
            eprintln!(
                "audit log FAILED verification: seq {}: the log has {} entries but the kept checkpoint covers {}: rolled back or truncated",
                note.tree_size, note.tree_size, old.tree_size
            );
            return Ok(ExitCode::from(1));
        }
        // Every log extends the empty log; there is no proof of it to ask for.
        let consistent = if old.tree_size == 0 {
            true
        } else {
            let proof = client
                .get_consistency_proof(GetConsistencyProofRequest {
                    from_size: old.tree_size,
                    to_size: note.tree_size,
                })
                .await?
                .into_inner();
            let hashes = proof
                .hashes
                .iter()
                .map(|h| <[u8; 32]>::try_from(h.as_slice()).context("malformed proof hash"))
                .collect::<anyhow::Result<Vec<_>>>()?;
            merkle::verify_consistency(
                old.tree_size,
                note.tree_size,
                &old.root_hash,
                &note.root_hash,
                &hashes,
            )
            .is_ok()
        };
        if !consistent {
            eprintln!(
                "audit log FAILED verification: not consistent with the kept checkpoint at size {}",
                old.tree_size
            );
            return Ok(ExitCode::from(1));
        }
    }
    out!(
        "audit log verified online: {} entries, root {}, signed by {}{}",
        note.tree_size,
        crate::tls::hex(&note.root_hash),
        verifier,
        if args.checkpoint.is_some() {
            ", consistent with the kept checkpoint"
        } else {
            ""
        },
    );
    Ok(ExitCode::SUCCESS)
}

/// `--since` and `--until`: a usage error (exit 2) when not RFC 3339.
fn parse_time(s: &str) -> Result<prost_types::Timestamp, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time ({e}); for example 2026-11-24T09:00:00Z"))?;
    Ok(prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    })
}

/// `--action`: a name such as RECORD_DISCLOSED (any case, `AUDIT_ACTION_` optional);
/// a usage error (exit 2) listing the names otherwise.
fn parse_action(a: &str) -> Result<AuditAction, String> {
    let name = format!(
        "AUDIT_ACTION_{}",
        a.trim_start_matches("AUDIT_ACTION_").to_ascii_uppercase()
    );
    match AuditAction::from_str_name(&name) {
        Some(action) if action != AuditAction::Unspecified => Ok(action),
        _ => {
            let names: Vec<&str> = (1..)
                .map_while(|n| AuditAction::try_from(n).ok())
                .map(|a| a.as_str_name().trim_start_matches("AUDIT_ACTION_"))
                .collect();
            Err(format!("unknown action; one of {}", names.join(", ")))
        }
    }
}

async fn query(args: QueryArgs) -> anyhow::Result<ExitCode> {
    let action = args.action.map_or(0, |a| a as i32);
    let mut request = QueryDisclosuresRequest {
        subject: args
            .nhs_number
            .clone()
            .map(|nhs_number| Subject { nhs_number }),
        actor_id: args.actor.clone().unwrap_or_default(),
        target_agency_id: args.target.clone().unwrap_or_default(),
        action,
        since: args.since,
        until: args.until,
        page_size: args.limit.min(1000),
        page_token: String::new(),
    };
    let channel = args.client.connect("auditor-dpo").await?;
    let mut client = AuditServiceClient::new(channel);
    let mut shown = 0;
    let mut header = !args.json;
    loop {
        let page = client
            .query_disclosures(request.clone())
            .await
            .map_err(|s| anyhow::anyhow!("query refused ({:?}): {}", s.code(), s.message()))?
            .into_inner();
        // After the first answer, so that a refusal prints no table.
        if std::mem::take(&mut header) {
            out!(
                "{:>8}  {:<27}  {:<22}  {:<20}  {:<8}  {:<18}  {:<34}  reason",
                "seq",
                "time",
                "actor",
                "action",
                "outcome",
                "target",
                "object"
            );
        }
        for e in &page.entries {
            if shown >= args.limit {
                return Ok(ExitCode::SUCCESS);
            }
            print_entry(e, args.json);
            shown += 1;
        }
        if page.next_page_token.is_empty() || shown >= args.limit {
            return Ok(ExitCode::SUCCESS);
        }
        request.page_token = page.next_page_token;
    }
}

fn print_entry(e: &AuditEntry, json: bool) {
    let time = e
        .time
        .as_ref()
        .and_then(|t| {
            time::OffsetDateTime::from_unix_timestamp(t.seconds)
                .ok()
                .map(|d| (d, t.nanos))
        })
        .and_then(|(d, n)| d.replace_nanosecond(n as u32).ok())
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let name = |full: &str, prefix: &str| full.trim_start_matches(prefix).to_owned();
    let action = name(
        AuditAction::try_from(e.action)
            .map(|a| a.as_str_name())
            .unwrap_or("?"),
        "AUDIT_ACTION_",
    );
    let outcome = name(
        AuditOutcome::try_from(e.outcome)
            .map(|a| a.as_str_name())
            .unwrap_or("?"),
        "AUDIT_OUTCOME_",
    );
    let role = name(
        ActorRole::try_from(e.actor_role)
            .map(|a| a.as_str_name())
            .unwrap_or("?"),
        "ACTOR_ROLE_",
    );
    let basis = name(
        DisclosureBasis::try_from(e.basis)
            .map(|a| a.as_str_name())
            .unwrap_or("?"),
        "DISCLOSURE_BASIS_",
    );
    let purpose = name(
        Purpose::try_from(e.purpose)
            .map(|a| a.as_str_name())
            .unwrap_or("?"),
        "PURPOSE_",
    );
    if json {
        let v = serde_json::json!({
            "seq": e.seq, "time": time, "actor_id": e.actor_id, "actor_role": role,
            "action": action, "subject_ref": e.subject_ref, "target_agency_id": e.target_agency_id,
            "object_id": e.object_id, "purpose": purpose, "basis": basis, "lawful_basis": e.lawful_basis,
            "consent_id": e.consent_id, "justification": e.justification, "outcome": outcome,
            "reason": e.reason, "request_id": e.request_id, "actor_cert_sha256": e.actor_cert_sha256,
        });
        out!("{v}");
    } else {
        out!(
            "{:>8}  {:<27}  {:<22}  {:<20}  {:<8}  {:<18}  {:<34}  {}",
            e.seq,
            time,
            e.actor_id,
            action,
            outcome,
            e.target_agency_id,
            e.object_id,
            e.reason
        );
    }
}
