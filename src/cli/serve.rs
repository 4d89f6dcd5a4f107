//! `sgw serve`: run the gateway from a config file, or from the development set-up.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use crate::config::Config;
use crate::domain::Role;
use crate::logging::{self, LogFormat};
use crate::server;

/// Arguments of `sgw serve`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "dev"])))]
pub struct ServeArgs {
    /// The config file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Create, where absent, a development PKI in certs/dev/ and sgw.dev.toml in the
    /// current folder, then serve that on 127.0.0.1:50051.
    #[arg(long)]
    pub dev: bool,
    /// Listen on this address instead of the config's `listen` (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
}

/// The trust domain of the development set-up.
pub const DEV_TRUST_DOMAIN: &str = "safeguarding.example";
/// Where `--dev` keeps its PKI, relative to the current folder.
pub const DEV_PKI_DIR: &str = "certs/dev";
/// The development config file, in the current folder.
pub const DEV_CONFIG: &str = "sgw.dev.toml";

/// The sample identities of the development PKI: one agency per sector, an auditor
/// and an operator.
pub const DEV_IDENTITIES: &[(Role, &str)] = &[
    (Role::Agency, "nhs-guys"),
    (Role::Agency, "police-met"),
    (Role::Agency, "school-oakfield"),
    (Role::Agency, "csc-southwark"),
    (Role::Agency, "probation-london"),
    (Role::Agency, "housing-southwark"),
    (Role::Agency, "charity-nspcc"),
    (Role::Auditor, "dpo"),
    (Role::Operator, "ops"),
];

/// The development config, written once and then left for the developer to edit.
pub const DEV_CONFIG_TOML: &str = r#"# Development configuration written by `sgw serve --dev`. Edit freely: it is only
# written when absent. Relative paths are resolved against this file's folder.
listen = "127.0.0.1:50051"
data_dir = "data/dev"
trust_domain = "safeguarding.example"
front_door = "csc-southwark"

[tls]
cert = "certs/dev/server.pem"
key = "certs/dev/server.key"
client_ca = "certs/dev/ca.pem"
crl = ["certs/dev/crl.pem"]

[[agency]]
id = "nhs-guys"
sector = "HEALTH"
name = "Guy's and St Thomas' NHS Foundation Trust"

[[agency]]
id = "police-met"
sector = "POLICE"
name = "Metropolitan Police"

[[agency]]
id = "school-oakfield"
sector = "EDUCATION"
name = "Oakfield Primary School"

[[agency]]
id = "csc-southwark"
sector = "CHILDRENS_SOCIAL_CARE"
name = "Southwark Children's Social Care (MASH)"

[[agency]]
id = "probation-london"
sector = "PROBATION"
name = "Probation Service, London"

[[agency]]
id = "housing-southwark"
sector = "HOUSING"
name = "Southwark Housing"

[[agency]]
id = "charity-nspcc"
sector = "OTHER"
name = "NSPCC"

[[auditor]]
id = "dpo"

[[operator]]
id = "ops"

# Operation Encompass: police tell the school about domestic abuse before the next
# school day. No consent needed: a public task for the safeguarding of children.
[[agreement]]
from = "POLICE"
to = "EDUCATION"
categories = ["POLICE_INCIDENT"]
purposes = ["SAFEGUARDING"]
lawful_basis = "UK GDPR Art 6(1)(e) public task; DPA 2018 Sch 1 para 18 safeguarding of children"
consent_required = false
override_allowed = false

# Everything reaches the front door for safeguarding.
[[agreement]]
from = "HEALTH"
to = "CHILDRENS_SOCIAL_CARE"
categories = ["UNSCHEDULED_CARE_ATTENDANCE", "EARLY_HELP_ASSESSMENT", "OTHER"]
purposes = ["SAFEGUARDING", "EARLY_HELP"]
lawful_basis = "UK GDPR Art 6(1)(e) public task; Art 9(2)(g) substantial public interest; DPA 2018 Sch 1 para 18"
consent_required = false
override_allowed = false

[[agreement]]
from = "POLICE"
to = "CHILDRENS_SOCIAL_CARE"
categories = ["POLICE_INCIDENT"]
purposes = ["SAFEGUARDING"]
lawful_basis = "UK GDPR Art 6(1)(e) public task; DPA 2018 Sch 1 para 18 safeguarding of children"
consent_required = false
override_allowed = false

[[agreement]]
from = "EDUCATION"
to = "CHILDRENS_SOCIAL_CARE"
categories = ["SCHOOL_ATTENDANCE", "EARLY_HELP_ASSESSMENT"]
purposes = ["SAFEGUARDING", "EARLY_HELP"]
lawful_basis = "UK GDPR Art 6(1)(e) public task; DPA 2018 Sch 1 para 18 safeguarding of children"
consent_required = false
override_allowed = false

# A school may see A&E attendances with the family's consent, or without it when a
# child is at risk of significant harm (a recorded safeguarding override).
[[agreement]]
from = "HEALTH"
to = "EDUCATION"
categories = ["UNSCHEDULED_CARE_ATTENDANCE"]
purposes = ["SAFEGUARDING", "EDUCATION_SUPPORT"]
lawful_basis = "UK GDPR Art 6(1)(a) consent, or Art 6(1)(e) with DPA 2018 Sch 1 para 18 when overridden"
consent_required = true
override_allowed = true

# Early help runs on consent, without override.
[[agreement]]
from = "EDUCATION"
to = "HEALTH"
categories = ["SCHOOL_ATTENDANCE", "EARLY_HELP_ASSESSMENT"]
purposes = ["EARLY_HELP", "HEALTH_CARE"]
lawful_basis = "UK GDPR Art 6(1)(a) consent"
consent_required = true
override_allowed = false

# The front door shares plans and status with the agencies around the child.
[[agreement]]
from = "CHILDRENS_SOCIAL_CARE"
to = "HEALTH"
categories = ["CHILD_PROTECTION_PLAN", "LOOKED_AFTER_STATUS"]
purposes = ["SAFEGUARDING", "HEALTH_CARE"]
lawful_basis = "UK GDPR Art 6(1)(e) public task; Children Act 1989 s.47; DPA 2018 Sch 1 para 18"
consent_required = false
override_allowed = false

[[agreement]]
from = "CHILDRENS_SOCIAL_CARE"
to = "EDUCATION"
categories = ["CHILD_PROTECTION_PLAN", "LOOKED_AFTER_STATUS"]
purposes = ["SAFEGUARDING", "EDUCATION_SUPPORT"]
lawful_basis = "UK GDPR Art 6(1)(e) public task; Children Act 1989 s.47; DPA 2018 Sch 1 para 18"
consent_required = false
override_allowed = false

[[agreement]]
from = "CHILDRENS_SOCIAL_CARE"
to = "POLICE"
categories = ["CHILD_PROTECTION_PLAN"]
purposes = ["SAFEGUARDING", "CRIME_PREVENTION"]
lawful_basis = "UK GDPR Art 6(1)(e) public task; DPA 2018 s.35 law enforcement and Sch 1 para 18"
consent_required = false
override_allowed = false

[deadlines]
immediate_risk = "1h"
urgent = "4h"
routine_working_days = 1
bank_holidays = ["2026-12-25", "2026-12-28", "2027-01-01", "2027-03-26", "2027-03-29", "2027-05-03", "2027-05-31", "2027-08-30", "2027-12-27", "2027-12-28"]
"#;

/// Runs `sgw serve`.
pub fn run(args: ServeArgs, log_format: Option<LogFormat>) -> anyhow::Result<ExitCode> {
    let config_path = if args.dev {
        prepare_dev(Path::new("."))?
    } else {
        args.config.context("--config FILE or --dev is required")?
    };
    let mut config = Config::load(&config_path)?;
    if let Some(listen) = args.listen {
        config.set_listen(listen);
    }
    let log_format = log_format.unwrap_or(config.logging.format);
    logging::init(log_format, &config.logging.level);
    let dev_help = if args.dev {
        dev_help(&config, log_format)
    } else {
        None
    };
    if !server::lifo_slot_disabled() {
        tracing::warn!("built without --cfg tokio_unstable (.cargo/config.toml): responses finished together are written one by one, which costs throughput under load");
    }
    let runtime = server::runtime().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // A write past the file-size limit (RLIMIT_FSIZE) must fail with EFBIG, which
        // the audit writer handles by failing closed, rather than kill the process
        // with SIGXFSZ: listening for the signal replaces its default action.
        #[cfg(target_os = "linux")]
        let _xfsz = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(25));
        // A SIGHUP (a reload) during start-up must not end the process, as its
        // default action would: listening for it replaces that action for the
        // process's lifetime. The gateway reloads on SIGHUP once it serves.
        #[cfg(unix)]
        let _hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        // Before anyone can learn the address: a SIGTERM from then on drains.
        let shutdown = server::shutdown_signal();
        let bound = server::bind(config).await?;
        let addr = bound.local_addr();
        // A plain line on stderr whatever the log format: scripts and tests wait for it.
        eprintln!("sgw: listening on {addr} (mutual TLS)");
        if let Some(help) = dev_help {
            eprintln!("{}", help.replace("{addr}", &addr.to_string()));
        }
        bound.serve(shutdown).await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Creates the development PKI and config under `root` where absent; returns the
/// config's path.
pub fn prepare_dev(root: &Path) -> anyhow::Result<PathBuf> {
    let pki_dir = root.join(DEV_PKI_DIR);
    crate::pki::init_dev_pki(&pki_dir, DEV_TRUST_DOMAIN, DEV_IDENTITIES, false)
        .with_context(|| format!("cannot create the development PKI in {}", pki_dir.display()))?;
    let config_path = root.join(DEV_CONFIG);
    if !config_path.exists() {
        std::fs::write(&config_path, DEV_CONFIG_TOML)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
    }
    Ok(config_path)
}

/// The development banner for the principals `config` registers (the dev config
/// may have been edited since it was written), with `{addr}` where the address goes.
/// None with JSON logs: it is help for a person at a terminal, not a log line.
fn dev_help(config: &Config, format: LogFormat) -> Option<String> {
    if format == LogFormat::Json {
        return None;
    }
    let d = DEV_PKI_DIR;
    let ids = |ps: &[crate::config::Principal]| {
        ps.iter()
            .map(|p| p.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let agencies = config
        .agencies
        .iter()
        .map(|a| {
            if a.id == config.front_door {
                format!("{} (front door)", a.id)
            } else {
                a.id.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let example = config
        .agencies
        .first()
        .map(|a| a.id.to_string())
        .unwrap_or_else(|| "<id>".into());
    Some(format!(
        "\nsgw development gateway on {{addr}} (mutual TLS)\n\
         client certificates: {d}/<role>-<id>.pem and .key, CA {d}/ca.pem\n\
         agencies: {agencies}; auditors: {auditors}; operators: {operators}\n\
         try:\n  grpcurl -cacert {d}/ca.pem -cert {d}/agency-{example}.pem \
         -key {d}/agency-{example}.key {{addr}} grpc.health.v1.Health/Check\n",
        auditors = ids(&config.auditors),
        operators = ids(&config.operators),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dev_banner_lists_the_config_as_it_is_now_and_stays_out_of_json_logs() {
        let dir = tempfile::tempdir().unwrap();
        let edited = DEV_CONFIG_TOML.replace(
            "front_door = \"csc-southwark\"",
            "front_door = \"csc-lambeth\"",
        ) + "\n[[agency]]\nid = \"csc-lambeth\"\nsector = \"CHILDRENS_SOCIAL_CARE\"\nname = \"Lambeth MASH\"\n";
        let config = Config::from_toml_str(&edited, dir.path(), "sgw.dev.toml").unwrap();
        let help = dev_help(&config, LogFormat::Text).unwrap();
        assert!(
            help.contains("csc-southwark, probation-london"),
            "no longer the front door: {help}"
        );
        assert!(help.contains("csc-lambeth (front door);"), "{help}");
        assert!(help.contains("auditors: dpo; operators: ops"), "{help}");
        assert!(
            help.contains("-cert certs/dev/agency-nhs-guys.pem"),
            "{help}"
        );
        assert_eq!(dev_help(&config, LogFormat::Json), None);
    }
}
