//! The configuration file: TOML in, a validated, typed [`Config`] out.
//!
//! Loading happens in two steps. serde first reads the text into private `Raw*` structs
//! that mirror the file key for key, with `deny_unknown_fields` everywhere, so a
//! misspelt key is an error that names it and its line. A private `Loader` then turns the raw
//! structs into the public types: it parses ids, sectors, purposes, categories,
//! durations and dates, checks what spans several entries (duplicate ids, the front
//! door, overlapping agreements, limits that depend on each other) and resolves
//! relative paths against the file's folder. A [`Config`] that exists is valid
//! ("parse, don't validate"); only the first problem found is reported.
//!
//! The shape of the file is the operators' contract in API.md ("Configuration and
//! command line"); every optional key and its default is documented on the public
//! struct that holds it, and the README repeats them.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::domain::{
    AgencyId, IdError, PrincipalId, Purpose, RecordCategory, Role, Sector, UnknownName,
};

/// Headroom that `limits.max_message_bytes` must leave above the largest content or
/// narrative, for the other fields of a message and protobuf framing.
pub const MESSAGE_HEADROOM_BYTES: usize = 64 * 1024;

/// The longest default retention a config may set: a century, in days. (A record's
/// deadline must stay within the calendar's range.)
pub const MAX_RETENTION_DAYS: u32 = 36_525;

/// The whole, validated configuration of one gateway.
///
/// Built only by [`Config::load`] or [`Config::from_toml_str`]. The registry lists
/// (`agencies`, `auditors`, `operators`, `agreements`) are public for reading; the
/// lookups of [`Config::registry`] use an index built at load, so editing those lists
/// afterwards makes lookups of the edited entries fail (closed) rather than answer
/// wrongly. Other fields, such as `limits`, may be adjusted freely, e.g. in tests.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the gRPC server listens on, e.g. `127.0.0.1:50051`.
    pub listen: SocketAddr,
    /// Folder of the sled database and key files; absolute once loaded.
    pub data_dir: PathBuf,
    /// The SPIFFE trust domain of every caller's certificate, e.g.
    /// `safeguarding.example` in `spiffe://safeguarding.example/agency/police-met`.
    pub trust_domain: String,
    /// The children's social care agency (the MASH) that receives every concern.
    pub front_door: AgencyId,
    /// The server's certificate, key, trusted client CAs and revocation lists.
    pub tls: TlsConfig,
    /// Registered agencies (`[[agency]]`), in file order.
    pub agencies: Vec<Agency>,
    /// Registered auditors (`[[auditor]]`), in file order.
    pub auditors: Vec<Principal>,
    /// Registered operators (`[[operator]]`), in file order.
    pub operators: Vec<Principal>,
    /// Sharing agreements (`[[agreement]]`), in file order.
    pub agreements: Vec<Agreement>,
    /// Acknowledgement deadlines for concerns (`[deadlines]`).
    pub deadlines: Deadlines,
    /// Sizes, counts and timeouts (`[limits]`).
    pub limits: Limits,
    /// Log output (`[logging]`).
    pub logging: Logging,
    /// The audit log's checkpoints and batching (`[audit]`).
    pub audit: Audit,
    /// The optional metrics endpoint (`[metrics]`).
    pub metrics: Metrics,
    /// Graceful shutdown (`[shutdown]`).
    pub shutdown: Shutdown,
    /// Where the gateway keeps its state (`[storage]`).
    pub storage: Storage,
    index: RegistryIndex,
}

/// `[tls]`: the files the server's TLS configuration is built from. Paths are absolute
/// once loaded. All of them are re-read on SIGHUP and on `OperationsService.ReloadTls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// `cert`: PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// `key`: PKCS#8 PEM private key of `cert`.
    pub key: PathBuf,
    /// `client_ca`: PEM bundle of one or more CAs trusted to issue client certificates.
    pub client_ca: PathBuf,
    /// `crl`: certificate revocation lists (PEM). Optional; default `[]`.
    pub crl: Vec<PathBuf>,
    /// `watch`: also reload when one of these files changes on disk. Default `true`.
    pub watch: bool,
}

/// `[[agency]]`: an organisation whose case system calls the gateway as
/// `spiffe://<trust_domain>/agency/<id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agency {
    /// `id`: `[a-z0-9-]{1,64}`, as in the certificate's URI SAN.
    pub id: AgencyId,
    /// `sector`: e.g. `POLICE`, `CHILDRENS_SOCIAL_CARE`.
    pub sector: Sector,
    /// `name`: display name, e.g. `Metropolitan Police`. Required, not blank.
    pub name: String,
}

/// `[[auditor]]` or `[[operator]]`: a principal that is not an agency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `id`: `[a-z0-9-]{1,64}`, as in the certificate's URI SAN.
    pub id: PrincipalId,
    /// `name`: optional display name, not blank when given.
    pub name: Option<String>,
}

/// `[[agreement]]`: what an agency of sector `from` may disclose to an agency of sector
/// `to`, for which purposes, and on what lawful basis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// `from`: the sector of the record's owner.
    pub from: Sector,
    /// `to`: the sector of the recipient.
    pub to: Sector,
    /// `categories`: record categories covered; not empty.
    pub categories: BTreeSet<RecordCategory>,
    /// `purposes`: purposes covered; not empty.
    pub purposes: BTreeSet<Purpose>,
    /// `lawful_basis`: recorded in every disclosure's audit entry; not blank.
    pub lawful_basis: String,
    /// `consent_required`: whether a disclosure needs consent in scope. Required.
    pub consent_required: bool,
    /// `override_allowed`: whether a justified safeguarding override may share
    /// without consent. Required.
    pub override_allowed: bool,
}

/// `[deadlines]`: when a concern must be acknowledged, by urgency. The whole section
/// is optional; [`Deadlines::default`] gives the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadlines {
    /// `immediate_risk`: default `"1h"`. Not longer than `urgent`.
    pub immediate_risk: Duration,
    /// `urgent`: default `"4h"`.
    pub urgent: Duration,
    /// `routine_working_days`: default `1`, at least 1 (the guidance's limit for a
    /// referral decision).
    pub routine_working_days: u32,
    /// `bank_holidays`: dates that are not working days, as `"YYYY-MM-DD"`. Default
    /// `[]`.
    pub bank_holidays: BTreeSet<time::Date>,
}

/// `[limits]`: sizes, counts and timeouts. Every key is optional;
/// [`Limits::default`] gives the defaults. Sizes are bytes unless the name says
/// chars (Unicode scalar values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `max_message_bytes`: largest gRPC message accepted or sent. Default 4 MiB
    /// (4194304). Must exceed `max_content_bytes`, 4 × `max_narrative_chars` and
    /// 8 × `max_note_chars` (a consent statement's two notes) by at least 64 KiB.
    pub max_message_bytes: usize,
    /// `max_content_bytes`: largest record content. Default 1 MiB (1048576).
    pub max_content_bytes: usize,
    /// `max_narrative_chars`: longest concern narrative. Default 20000.
    pub max_narrative_chars: usize,
    /// `max_summary_chars`: longest record summary. Default 500.
    pub max_summary_chars: usize,
    /// `max_note_chars`: longest note or justification. Default 4000.
    pub max_note_chars: usize,
    /// `default_page_size`: page size when a list request gives none. Default 100;
    /// at most `max_page_size`.
    pub default_page_size: u32,
    /// `max_page_size`: largest page a list request may ask for. Default 1000.
    pub max_page_size: u32,
    /// `max_concurrent_streams`: concurrent HTTP/2 streams per connection. Default 64.
    pub max_concurrent_streams: u32,
    /// `max_connections`: open client connections; further ones wait. Default 1024.
    pub max_connections: usize,
    /// `max_connections_per_identity`: open connections of one identity (its URI
    /// SAN), from its handshake to its close; one more is closed right after its
    /// handshake, so one caller cannot take every slot of `max_connections`.
    /// Default 64, or `max_connections` when that is lower; at most
    /// `max_connections`.
    pub max_connections_per_identity: usize,
    /// `handshake_timeout`: time allowed for a TLS handshake. Default `"10s"`.
    pub handshake_timeout: Duration,
    /// `preface_timeout`: time a client has, once its handshake is done, to send
    /// the HTTP/2 connection preface. HTTP/2 keepalive pings start only after the
    /// preface, so without this a client that sends nothing would hold its slot
    /// forever. Default `"10s"`.
    pub preface_timeout: Duration,
    /// `max_handshakes`: TLS handshakes in progress at once, from all addresses;
    /// further connections are closed at once, so clients that connect from many
    /// addresses and send nothing cannot hold every slot. Default half of
    /// `max_connections` (at least 1); at most `max_connections`.
    pub max_handshakes: usize,
    /// `max_handshakes_per_ip`: TLS handshakes in progress at once from one
    /// address (an IPv6 address by its /64 prefix); further connections from it are
    /// closed at once. Default 64.
    pub max_handshakes_per_ip: usize,
    /// `keepalive_interval`: HTTP/2 ping interval on idle connections. Default
    /// `"30s"`.
    pub keepalive_interval: Duration,
    /// `keepalive_timeout`: time to wait for a ping's answer before closing the
    /// connection. Default `"10s"`.
    pub keepalive_timeout: Duration,
    /// `request_timeout`: longest a unary call may take. Default `"30s"`.
    pub request_timeout: Duration,
    /// `max_subscribers_per_agency`: concurrent event subscriptions per agency.
    /// Default 16.
    pub max_subscribers_per_agency: usize,
    /// `default_retention_days`: retention of a record that gives no retention date.
    /// Default 2555 (about 7 years).
    pub default_retention_days: u32,
}

/// `[logging]`: where log lines go (always standard error) and in what form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logging {
    /// `format`: `"text"` (default) or `"json"`.
    pub format: LogFormat,
    /// `level`: a tracing filter, e.g. `"info"` (default) or `"sgw=debug,info"`. The
    /// `RUST_LOG` environment variable, when set, takes precedence.
    pub level: String,
}

/// The form of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[audit]`: the audit log's signed checkpoints and group commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// `checkpoint_interval`: how often a signed checkpoint is made while entries are
    /// being appended. Default `"60s"`.
    pub checkpoint_interval: Duration,
    /// `signing_key`: Ed25519 checkpoint signing key (PKCS#8 PEM); absolute once
    /// loaded. Optional; when absent the gateway uses a key kept under `data_dir`.
    pub signing_key: Option<PathBuf>,
    /// `log_id`: the log's name inside signed checkpoints. Default
    /// `"<trust_domain>/sgw/audit"`.
    pub log_id: String,
    /// `max_batch`: most entries written in one group commit. Default 1024.
    pub max_batch: usize,
    /// `wal_bytes`: bytes of commits the write-ahead file holds before the audit
    /// database is synced and the file starts over. Default 32 MiB; at least 64 KiB.
    pub wal_bytes: u64,
}

/// `[metrics]`: an optional plain-HTTP metrics endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// `listen`: address of the endpoint, e.g. `"127.0.0.1:9090"`. Default: none (off).
    /// Must differ from the top-level `listen`.
    pub listen: Option<SocketAddr>,
}

/// `[storage]`: where the audit log, records, consents, concerns and inboxes live.
#[derive(Debug, Clone, Default)]
pub enum Storage {
    /// `backend = "sled"` (the default): embedded sled databases under `data_dir`,
    /// for one gateway process on one machine.
    #[default]
    Sled,
    /// `backend = "postgres"`: one PostgreSQL database shared by any number of
    /// gateway replicas. The key files stay under `data_dir` (or where
    /// `audit.signing_key` says) and must be the same on every replica.
    Postgres(PostgresStorage),
}

/// `[storage]` with `backend = "postgres"`.
#[derive(Debug, Clone)]
pub struct PostgresStorage {
    /// `url`, `pool_size`, `statement_timeout`, `connect_timeout`,
    /// `allow_plaintext_network`: how to reach the database.
    pub connection: crate::pg::PgConfig,
    /// `replica`: this replica's name in leases and logs, unique among live replicas.
    /// Default: `<host name>:<listen port>/<process id>`.
    pub replica: String,
}

/// `[shutdown]`: graceful shutdown on SIGTERM or Ctrl-C.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shutdown {
    /// `grace`: how long open calls and streams may run on before they are cut.
    /// Default `"10s"`; `"0s"` cuts them at once.
    pub grace: Duration,
}

/// A replica's default name: the host name, the listen port and the process id, so
/// that replicas on one machine differ (even on port 0) and a restarted replica does
/// not take over a lease its dead predecessor held before it expires.
pub(crate) fn default_replica_name(listen: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "sgw".to_owned());
    format!("{host}:{}/{}", listen.port(), std::process::id())
}

impl Config {
    /// Listens on `listen` instead (`sgw serve --listen`). A replica name left to
    /// its default follows, since the default names the listen port.
    pub fn set_listen(&mut self, listen: SocketAddr) {
        if let Storage::Postgres(pg) = &mut self.storage {
            if pg.replica == default_replica_name(self.listen) {
                pg.replica = default_replica_name(listen);
            }
        }
        self.listen = listen;
    }
}

/// Read-only lookups over the registry of a [`Config`]: who is registered, in which
/// role, and which agreements apply. Every lookup is O(1) (plus the matches returned).
#[derive(Debug, Clone, Copy)]
pub struct Registry<'a> {
    config: &'a Config,
}

/// Why a configuration was refused. Its `Display` starts with the file and, where
/// known, the line and column (`sgw.toml:12:7: ...`), then names the key or entry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {error}")]
    Read {
        /// The file's label (its path as given).
        file: String,
        /// The I/O error (in the message, not a separate cause, so it is printed
        /// once).
        error: std::io::Error,
    },
    /// Not valid TOML, or not the expected shape: an unknown or missing key, a value
    /// of the wrong type, an unknown `logging.format`, a malformed address.
    #[error("{}: {message}", Located(file, *position))]
    Syntax {
        /// The file's label.
        file: String,
        /// Where, when known.
        position: Option<Position>,
        /// The parser's message, on one line; it names the key.
        message: String,
    },
    /// Well-formed, but refused by validation.
    #[error("{}: {problem}", Located(file, *position))]
    Invalid {
        /// The file's label.
        file: String,
        /// Where, when known.
        position: Option<Position>,
        /// What is wrong.
        problem: Box<Problem>,
    },
}

/// A place in the configuration file, both 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line number.
    pub line: usize,
    /// Column, in characters.
    pub column: usize,
}

/// What validation found wrong; each message names the key or entry concerned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    /// `trust_domain` is not a lowercase DNS name.
    #[error("trust_domain {value:?} is not a valid DNS name: {reason}")]
    TrustDomain {
        /// What was given.
        value: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An id does not match `[a-z0-9-]{1,64}`.
    #[error("{field}: {source}")]
    Id {
        /// The key or entry, e.g. `[[agency]] id` or `front_door`.
        field: String,
        /// The id's own error, which quotes it.
        source: IdError,
    },
    /// An id is registered twice, in the same list or in two of agency, auditor and
    /// operator.
    #[error("{}", DuplicateMessage(self))]
    DuplicateId {
        /// The id.
        id: String,
        /// The list of the second occurrence.
        role: Role,
        /// The list of the first occurrence.
        first_role: Role,
        /// The line of the first occurrence.
        first_line: usize,
    },
    /// A sector, purpose or category that does not exist; lists the allowed values.
    #[error("{field}: {source}")]
    UnknownName {
        /// The key or entry, e.g. `agency "police-met" sector`.
        field: String,
        /// The enum's own error.
        source: UnknownName,
    },
    /// `front_door` names no `[[agency]]`.
    #[error("front_door {id:?} is not a registered [[agency]]")]
    FrontDoorUnregistered {
        /// What was given.
        id: String,
    },
    /// `front_door` names an agency of another sector than CHILDRENS_SOCIAL_CARE.
    #[error(
        "front_door {id:?} is a {sector} agency; the front door must be a \
         CHILDRENS_SOCIAL_CARE agency"
    )]
    FrontDoorNotChildrensSocialCare {
        /// The agency.
        id: String,
        /// Its sector.
        sector: Sector,
    },
    /// A required text, list or path is empty or blank.
    #[error("{field} must not be empty")]
    Empty {
        /// The key or entry.
        field: String,
    },
    /// Two agreements for the same `from` and `to` cover the same category for the same
    /// purpose, so which lawful basis applies would be ambiguous.
    #[error(
        "[[agreement]] {from} -> {to} overlaps the one at line {first_line} on \
         {category} for {purpose}, so the lawful basis would be ambiguous; merge them \
         or make their categories or purposes disjoint"
    )]
    OverlappingAgreements {
        /// Owner sector.
        from: Sector,
        /// Recipient sector.
        to: Sector,
        /// A category both cover.
        category: RecordCategory,
        /// A purpose both cover.
        purpose: Purpose,
        /// Line of the earlier agreement.
        first_line: usize,
    },
    /// Not a duration.
    #[error(
        "{field}: {value:?} is not a duration: {reason}; write e.g. \"90s\", \"15m\", \
         \"1h\" or \"2h30m\" (units d, h, m, s, ms)"
    )]
    Duration {
        /// The key.
        field: String,
        /// What was given.
        value: String,
        /// Why it was refused.
        reason: DurationError,
    },
    /// Not an `IP:port` socket address.
    #[error(
        "{field}: {value:?} is not an address; write IP:PORT, e.g. \"127.0.0.1:50051\" \
         or \"[::]:50051\""
    )]
    Address {
        /// The key.
        field: String,
        /// What was given.
        value: String,
    },
    /// Not a `YYYY-MM-DD` date.
    #[error("{field}: {value:?} is not a date; write YYYY-MM-DD, e.g. \"2026-12-25\"")]
    Date {
        /// The key.
        field: String,
        /// What was given.
        value: String,
    },
    /// A number or duration outside its allowed range, alone or relative to another.
    #[error("{field} {requirement}")]
    OutOfRange {
        /// The key.
        field: String,
        /// What it must be, with the value found.
        requirement: String,
    },
}

/// Why a duration string such as `"2h30m"` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// The string is empty.
    #[error("it is empty")]
    Empty,
    /// A character where a number or unit should be.
    #[error("unexpected {0:?}")]
    Unexpected(char),
    /// A number with no unit after it.
    #[error("a number has no unit")]
    MissingUnit,
    /// A unit other than d, h, m, s, ms.
    #[error("unknown unit {0:?}")]
    UnknownUnit(String),
    /// Units repeated or not from largest to smallest.
    #[error("units must go from largest to smallest, each at most once")]
    Order,
    /// More than `u64::MAX` milliseconds.
    #[error("it is too large")]
    TooLarge,
}

// === impl Config ===

impl Config {
    /// Reads and validates the file at `path`. Relative paths inside it are resolved
    /// against the file's folder; errors are labelled with `path` as given.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            file: file.clone(),
            error,
        })?;
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // Absolute, so that later reloads do not depend on the working directory.
        let base_dir = std::path::absolute(folder).unwrap_or_else(|_| folder.to_path_buf());
        Config::from_toml_str(&text, &base_dir, &file)
    }

    /// Parses and validates `text`, resolving relative paths against `base_dir` and
    /// labelling errors with `file_label` (e.g. `sgw.toml`).
    pub fn from_toml_str(
        text: &str,
        base_dir: &Path,
        file_label: &str,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file_label.to_owned(),
            position: e.span().map(|s| position_in(text, s.start)),
            message: one_line(e.message()),
        })?;
        Loader {
            text,
            file: file_label,
            base_dir,
        }
        .config(raw)
    }

    /// Lookups over the registered agencies, auditors, operators and agreements.
    pub fn registry(&self) -> Registry<'_> {
        Registry { config: self }
    }
}

// === impl Registry ===

impl<'a> Registry<'a> {
    /// The agency registered as `id`, if any.
    pub fn agency(&self, id: &str) -> Option<&'a Agency> {
        match self.config.index.ids.get(id) {
            Some(&(Role::Agency, i)) => self.config.agencies.get(i).filter(|a| a.id.as_str() == id),
            _ => None,
        }
    }

    /// The front door agency (the MASH).
    pub fn front_door(&self) -> Option<&'a Agency> {
        self.agency(self.config.front_door.as_str())
    }

    /// The role `id` is registered in, if any. Ids are unique across roles.
    pub fn role(&self, id: &str) -> Option<Role> {
        let &(role, i) = self.config.index.ids.get(id)?;
        let listed = match role {
            Role::Agency => self.config.agencies.get(i).map(|a| a.id.as_str()),
            Role::Auditor => self.config.auditors.get(i).map(|p| p.id.as_str()),
            Role::Operator => self.config.operators.get(i).map(|p| p.id.as_str()),
        };
        (listed == Some(id)).then_some(role)
    }

    /// Whether `id` is registered in `role`.
    pub fn role_of(&self, role: Role, id: &str) -> bool {
        self.role(id) == Some(role)
    }

    /// The agreements under which sector `from` may disclose to sector `to`, in file
    /// order. For any one category and purpose at most one of them applies.
    pub fn agreements_for(&self, from: Sector, to: Sector) -> impl Iterator<Item = &'a Agreement> {
        let agreements = &self.config.agreements;
        self.config
            .index
            .agreements
            .get(&(from, to))
            .into_iter()
            .flatten()
            .filter_map(move |&i| agreements.get(i))
            .filter(move |a| a.from == from && a.to == to)
    }
}

// === impl Default for the optional sections ===

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            immediate_risk: Duration::from_secs(3600),
            urgent: Duration::from_secs(4 * 3600),
            routine_working_days: 1,
            bank_holidays: BTreeSet::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 4 * 1024 * 1024,
            max_content_bytes: 1024 * 1024,
            max_narrative_chars: 20_000,
            max_summary_chars: 500,
            max_note_chars: 4000,
            default_page_size: 100,
            max_page_size: 1000,
            max_concurrent_streams: 64,
            max_connections: 1024,
            max_connections_per_identity: 64,
            handshake_timeout: Duration::from_secs(10),
            preface_timeout: Duration::from_secs(10),
            max_handshakes: 512,
            max_handshakes_per_ip: 64,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_subscribers_per_agency: 16,
            default_retention_days: 2555,
        }
    }
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            grace: Duration::from_secs(10),
        }
    }
}

// === durations ===

/// Parses a duration written as numbers with units from largest to smallest: `"90s"`,
/// `"15m"`, `"1h"`, `"2h30m"`, `"1d"`, `"250ms"`. Units: `d`, `h`, `m`, `s`, `ms`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    const UNITS: [(&str, u64); 5] = [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ];
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut rest = text;
    let mut total_ms: u64 = 0;
    let mut previous_rank: Option<usize> = None;
    while let Some(first) = rest.chars().next() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::Unexpected(first));
        }
        // Both splits fall on ASCII characters, hence on char boundaries.
        let (number, after) = rest.split_at(digits);
        let letters = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(letters);
        if unit.is_empty() {
            return Err(match after.chars().next() {
                Some(c) => DurationError::Unexpected(c),
                None => DurationError::MissingUnit,
            });
        }
        let (rank, ms_per_unit) = UNITS
            .iter()
            .enumerate()
            .find(|(_, (name, _))| *name == unit)
            .map(|(rank, &(_, ms))| (rank, ms))
            .ok_or_else(|| DurationError::UnknownUnit(unit.to_owned()))?;
        if previous_rank.is_some_and(|p| rank <= p) {
            return Err(DurationError::Order);
        }
        let n: u64 = number.parse().map_err(|_| DurationError::TooLarge)?;
        total_ms = n
            .checked_mul(ms_per_unit)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or(DurationError::TooLarge)?;
        previous_rank = Some(rank);
        rest = after;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Writes a duration the way [`parse_duration`] reads it, e.g. `"2h30m"`; sub-millisecond
/// parts are dropped and zero is `"0s"`.
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (name, per) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ] {
        let n = ms / per;
        if n > 0 {
            out.push_str(&format!("{n}{name}"));
            ms %= per;
        }
    }
    out
}

// === loading: raw file → typed Config ===

/// The registry's O(1) lookups, built once at load.
#[derive(Debug, Clone, Default)]
struct RegistryIndex {
    /// Every registered id, with its role and index in that role's list.
    ids: HashMap<String, (Role, usize)>,
    /// Indexes into `agreements`, by (from, to).
    agreements: HashMap<(Sector, Sector), Vec<usize>>,
}

/// Turns the raw file into a [`Config`], turning spans into positions for errors.
struct Loader<'a> {
    text: &'a str,
    file: &'a str,
    base_dir: &'a Path,
}

impl Loader<'_> {
    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let trust_domain = self.trust_domain(raw.trust_domain)?;
        let data_dir = self.path("data_dir", raw.data_dir)?;
        let tls = self.tls(raw.tls)?;

        let mut ids: HashMap<String, (Role, usize, usize)> = HashMap::new();
        let mut agencies = Vec::with_capacity(raw.agencies.len());
        for (i, a) in raw.agencies.into_iter().enumerate() {
            let id_span = a.id.span();
            let id = AgencyId::parse(a.id.get_ref()).map_err(|source| {
                self.invalid(id_span.clone(), Problem::id("[[agency]] id", source))
            })?;
            self.register(&mut ids, Role::Agency, id.as_str(), i, id_span)?;
            let sector = self.name(&format!("agency {:?} sector", id.as_str()), &a.sector)?;
            let name = self.non_blank(&format!("agency {:?} name", id.as_str()), a.name)?;
            agencies.push(Agency { id, sector, name });
        }
        let auditors = self.principals(Role::Auditor, raw.auditors, &mut ids)?;
        let operators = self.principals(Role::Operator, raw.operators, &mut ids)?;

        let front_door_span = raw.front_door.span();
        let front_door = AgencyId::parse(raw.front_door.get_ref()).map_err(|source| {
            self.invalid(front_door_span.clone(), Problem::id("front_door", source))
        })?;
        match agencies.iter().find(|a| a.id == front_door) {
            None => {
                return Err(self.invalid(
                    front_door_span,
                    Problem::FrontDoorUnregistered {
                        id: front_door.to_string(),
                    },
                ))
            }
            Some(a) if a.sector != Sector::ChildrensSocialCare => {
                return Err(self.invalid(
                    front_door_span,
                    Problem::FrontDoorNotChildrensSocialCare {
                        id: front_door.to_string(),
                        sector: a.sector,
                    },
                ))
            }
            Some(_) => {}
        }

        let (agreements, by_pair) = self.agreements(raw.agreements)?;
        let deadlines = self.deadlines(raw.deadlines)?;
        let limits = self.limits(raw.limits)?;
        let logging = self.logging(raw.logging)?;
        let audit = self.audit(raw.audit, &trust_domain)?;
        let listen = self.address("listen", &raw.listen)?;
        let metrics = Metrics {
            listen: raw
                .metrics
                .listen
                .as_ref()
                .map(|a| self.address("metrics.listen", a))
                .transpose()?,
        };
        if metrics.listen == Some(listen) && listen.port() != 0 {
            return Err(self.invalid(
                raw.metrics.listen.map(|a| a.span()),
                Problem::out_of_range(
                    "metrics.listen",
                    format!("must differ from listen ({listen})"),
                ),
            ));
        }
        let shutdown = Shutdown {
            grace: self.duration(
                "shutdown.grace",
                raw.shutdown.grace,
                Shutdown::default().grace,
            )?,
        };

        let storage = self.storage(raw.storage, listen)?;

        Ok(Config {
            listen,
            data_dir,
            trust_domain,
            front_door,
            tls,
            agencies,
            auditors,
            operators,
            agreements,
            deadlines,
            limits,
            logging,
            audit,
            metrics,
            shutdown,
            storage,
            index: RegistryIndex {
                ids: ids
                    .into_iter()
                    .map(|(id, (role, i, _))| (id, (role, i)))
                    .collect(),
                agreements: by_pair,
            },
        })
    }

    fn trust_domain(&self, raw: Spanned<String>) -> Result<String, ConfigError> {
        let span = raw.span();
        let value = raw.into_inner();
        match dns_name_problem(&value) {
            None => Ok(value),
            Some(reason) => Err(self.invalid(span, Problem::TrustDomain { value, reason })),
        }
    }

    fn tls(&self, raw: RawTls) -> Result<TlsConfig, ConfigError> {
        Ok(TlsConfig {
            cert: self.path("tls.cert", raw.cert)?,
            key: self.path("tls.key", raw.key)?,
            client_ca: self.path("tls.client_ca", raw.client_ca)?,
            crl: raw
                .crl
                .into_iter()
                .enumerate()
                .map(|(i, p)| self.path(&format!("tls.crl[{i}]"), p))
                .collect::<Result<_, _>>()?,
            watch: raw.watch,
        })
    }

    /// Records `id` as registered in `role`, refusing an id seen before in any role.
    fn register(
        &self,
        ids: &mut HashMap<String, (Role, usize, usize)>,
        role: Role,
        id: &str,
        index: usize,
        span: Range<usize>,
    ) -> Result<(), ConfigError> {
        let line = position_in(self.text, span.start).line;
        if let Some(&(first_role, _, first_line)) = ids.get(id) {
            return Err(self.invalid(
                span,
                Problem::DuplicateId {
                    id: id.to_owned(),
                    role,
                    first_role,
                    first_line,
                },
            ));
        }
        ids.insert(id.to_owned(), (role, index, line));
        Ok(())
    }

    fn principals(
        &self,
        role: Role,
        raw: Vec<RawPrincipal>,
        ids: &mut HashMap<String, (Role, usize, usize)>,
    ) -> Result<Vec<Principal>, ConfigError> {
        let mut out = Vec::with_capacity(raw.len());
        for (i, p) in raw.into_iter().enumerate() {
            let span = p.id.span();
            let id = PrincipalId::parse(p.id.get_ref()).map_err(|source| {
                self.invalid(span.clone(), Problem::id(&format!("[[{role}]] id"), source))
            })?;
            self.register(ids, role, id.as_str(), i, span)?;
            let name = p
                .name
                .map(|n| self.non_blank(&format!("{role} {:?} name", id.as_str()), n))
                .transpose()?;
            out.push(Principal { id, name });
        }
        Ok(out)
    }

    #[allow(clippy::type_complexity)]
    fn agreements(
        &self,
        raw: Vec<RawAgreement>,
    ) -> Result<(Vec<Agreement>, HashMap<(Sector, Sector), Vec<usize>>), ConfigError> {
        let mut out: Vec<Agreement> = Vec::with_capacity(raw.len());
        let mut lines: Vec<usize> = Vec::with_capacity(raw.len());
        let mut by_pair: HashMap<(Sector, Sector), Vec<usize>> = HashMap::new();
        for r in raw {
            let from: Sector = self.name("[[agreement]] from", &r.from)?;
            let to: Sector = self.name("[[agreement]] to", &r.to)?;
            let label = format!("agreement {from} -> {to}");
            let categories: BTreeSet<RecordCategory> =
                self.names(&format!("{label} categories"), r.categories)?;
            let purposes: BTreeSet<Purpose> =
                self.names(&format!("{label} purposes"), r.purposes)?;
            let lawful_basis = self.non_blank(&format!("{label} lawful_basis"), r.lawful_basis)?;
            let line = position_in(self.text, r.from.span().start).line;

            let same_pair = by_pair.entry((from, to)).or_default();
            for &j in same_pair.iter() {
                let (Some(earlier), Some(&first_line)) = (out.get(j), lines.get(j)) else {
                    continue;
                };
                let category = categories.intersection(&earlier.categories).next();
                let purpose = purposes.intersection(&earlier.purposes).next();
                if let (Some(&category), Some(&purpose)) = (category, purpose) {
                    return Err(self.invalid(
                        r.from.span(),
                        Problem::OverlappingAgreements {
                            from,
                            to,
                            category,
                            purpose,
                            first_line,
                        },
                    ));
                }
            }
            same_pair.push(out.len());
            lines.push(line);
            out.push(Agreement {
                from,
                to,
                categories,
                purposes,
                lawful_basis,
                consent_required: r.consent_required,
                override_allowed: r.override_allowed,
            });
        }
        Ok((out, by_pair))
    }

    fn deadlines(&self, raw: RawDeadlines) -> Result<Deadlines, ConfigError> {
        let d = Deadlines::default();
        let immediate_risk = self.positive_duration(
            "deadlines.immediate_risk",
            raw.immediate_risk,
            d.immediate_risk,
        )?;
        let urgent = self.positive_duration("deadlines.urgent", raw.urgent, d.urgent)?;
        if immediate_risk > urgent {
            return Err(self.invalid(
                None,
                Problem::out_of_range(
                    "deadlines.immediate_risk",
                    format!(
                        "({}) must not be longer than deadlines.urgent ({})",
                        format_duration(immediate_risk),
                        format_duration(urgent)
                    ),
                ),
            ));
        }
        let routine_working_days = raw.routine_working_days.unwrap_or(d.routine_working_days);
        if routine_working_days == 0 {
            return Err(self.invalid(
                None,
                Problem::out_of_range(
                    "deadlines.routine_working_days",
                    "must be at least 1".into(),
                ),
            ));
        }
        let format = time::macros::format_description!("[year]-[month]-[day]");
        let mut bank_holidays = BTreeSet::new();
        for raw_date in raw.bank_holidays.unwrap_or_default() {
            let date = time::Date::parse(raw_date.get_ref(), &format).map_err(|_| {
                self.invalid(
                    raw_date.span(),
                    Problem::Date {
                        field: "deadlines.bank_holidays".into(),
                        value: raw_date.get_ref().clone(),
                    },
                )
            })?;
            bank_holidays.insert(date);
        }
        Ok(Deadlines {
            immediate_risk,
            urgent,
            routine_working_days,
            bank_holidays,
        })
    }

    fn limits(&self, raw: RawLimits) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let max_connections = raw.max_connections.unwrap_or(d.max_connections);
        let l = Limits {
            max_message_bytes: raw.max_message_bytes.unwrap_or(d.max_message_bytes),
            max_content_bytes: raw.max_content_bytes.unwrap_or(d.max_content_bytes),
            max_narrative_chars: raw.max_narrative_chars.unwrap_or(d.max_narrative_chars),
            max_summary_chars: raw.max_summary_chars.unwrap_or(d.max_summary_chars),
            max_note_chars: raw.max_note_chars.unwrap_or(d.max_note_chars),
            default_page_size: raw.default_page_size.unwrap_or(d.default_page_size),
            max_page_size: raw.max_page_size.unwrap_or(d.max_page_size),
            max_concurrent_streams: raw
                .max_concurrent_streams
                .unwrap_or(d.max_concurrent_streams),
            max_connections,
            // Both default from max_connections, so that a lower max_connections
            // alone still makes a valid configuration.
            max_connections_per_identity: raw
                .max_connections_per_identity
                .unwrap_or(d.max_connections_per_identity.min(max_connections)),
            handshake_timeout: self.positive_duration(
                "limits.handshake_timeout",
                raw.handshake_timeout,
                d.handshake_timeout,
            )?,
            preface_timeout: self.positive_duration(
                "limits.preface_timeout",
                raw.preface_timeout,
                d.preface_timeout,
            )?,
            max_handshakes: raw.max_handshakes.unwrap_or((max_connections / 2).max(1)),
            max_handshakes_per_ip: raw.max_handshakes_per_ip.unwrap_or(d.max_handshakes_per_ip),
            keepalive_interval: self.positive_duration(
                "limits.keepalive_interval",
                raw.keepalive_interval,
                d.keepalive_interval,
            )?,
            keepalive_timeout: self.positive_duration(
                "limits.keepalive_timeout",
                raw.keepalive_timeout,
                d.keepalive_timeout,
            )?,
            request_timeout: self.positive_duration(
                "limits.request_timeout",
                raw.request_timeout,
                d.request_timeout,
            )?,
            max_subscribers_per_agency: raw
                .max_subscribers_per_agency
                .unwrap_or(d.max_subscribers_per_agency),
            default_retention_days: raw
                .default_retention_days
                .unwrap_or(d.default_retention_days),
        };
        let positive: [(&str, u64); 14] = [
            ("limits.max_content_bytes", l.max_content_bytes as u64),
            ("limits.max_narrative_chars", l.max_narrative_chars as u64),
            ("limits.max_summary_chars", l.max_summary_chars as u64),
            ("limits.max_note_chars", l.max_note_chars as u64),
            ("limits.default_page_size", u64::from(l.default_page_size)),
            ("limits.max_page_size", u64::from(l.max_page_size)),
            (
                "limits.max_concurrent_streams",
                u64::from(l.max_concurrent_streams),
            ),
            ("limits.max_connections", l.max_connections as u64),
            (
                "limits.max_connections_per_identity",
                l.max_connections_per_identity as u64,
            ),
            ("limits.max_handshakes", l.max_handshakes as u64),
            (
                "limits.max_handshakes_per_ip",
                l.max_handshakes_per_ip as u64,
            ),
            (
                "limits.max_subscribers_per_agency",
                l.max_subscribers_per_agency as u64,
            ),
            (
                "limits.default_retention_days",
                u64::from(l.default_retention_days),
            ),
            ("limits.max_message_bytes", l.max_message_bytes as u64),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(self.invalid(
                    None,
                    Problem::out_of_range(field, "must be at least 1".into()),
                ));
            }
        }
        if l.default_retention_days > MAX_RETENTION_DAYS {
            return Err(self.invalid(
                None,
                Problem::out_of_range(
                    "limits.default_retention_days",
                    format!(
                        "({}) must be at most {MAX_RETENTION_DAYS} (a century)",
                        l.default_retention_days
                    ),
                ),
            ));
        }
        let within_max_connections = [
            (
                "limits.max_connections_per_identity",
                l.max_connections_per_identity,
            ),
            ("limits.max_handshakes", l.max_handshakes),
        ];
        for (field, value) in within_max_connections {
            if value > l.max_connections {
                return Err(self.invalid(
                    None,
                    Problem::out_of_range(
                        field,
                        format!(
                            "({value}) must not exceed limits.max_connections ({})",
                            l.max_connections
                        ),
                    ),
                ));
            }
        }
        if l.default_page_size > l.max_page_size {
            return Err(self.invalid(
                None,
                Problem::out_of_range(
                    "limits.default_page_size",
                    format!(
                        "({}) must not exceed limits.max_page_size ({})",
                        l.default_page_size, l.max_page_size
                    ),
                ),
            ));
        }
        // A message carries one content or narrative plus other fields; a narrative of
        // n chars may take 4n bytes of UTF-8. A consent statement in ListConsents
        // carries two notes (given and withdrawn), so a page of one always fits.
        let needs = [
            ("limits.max_content_bytes", Some(l.max_content_bytes)),
            (
                "4 × limits.max_narrative_chars",
                l.max_narrative_chars.checked_mul(4),
            ),
            ("8 × limits.max_note_chars", l.max_note_chars.checked_mul(8)),
        ];
        for (what, size) in needs {
            let fits = size
                .and_then(|s| s.checked_add(MESSAGE_HEADROOM_BYTES))
                .is_some_and(|needed| l.max_message_bytes > needed);
            if !fits {
                return Err(self.invalid(
                    None,
                    Problem::out_of_range(
                        "limits.max_message_bytes",
                        format!(
                            "({}) must exceed {what} ({}) by more than 64 KiB",
                            l.max_message_bytes,
                            size.map_or_else(|| "too large".to_owned(), |s| s.to_string())
                        ),
                    ),
                ));
            }
        }
        Ok(l)
    }

    fn logging(&self, raw: RawLogging) -> Result<Logging, ConfigError> {
        let d = Logging::default();
        Ok(Logging {
            format: raw.format.unwrap_or(d.format),
            level: match raw.level {
                Some(level) => {
                    let span = level.span();
                    let level = self.non_blank("logging.level", level)?;
                    if let Err(why) = log_filter_problem(&level) {
                        return Err(
                            self.invalid(Some(span), Problem::out_of_range("logging.level", why))
                        );
                    }
                    level
                }
                None => d.level,
            },
        })
    }

    fn audit(&self, raw: RawAudit, trust_domain: &str) -> Result<Audit, ConfigError> {
        let max_batch = raw.max_batch.unwrap_or(1024);
        if max_batch == 0 {
            return Err(self.invalid(
                None,
                Problem::out_of_range("audit.max_batch", "must be at least 1".into()),
            ));
        }
        let wal_bytes = raw
            .wal_bytes
            .unwrap_or(crate::audit::writer::DEFAULT_WAL_BYTES);
        if wal_bytes < 64 * 1024 {
            return Err(self.invalid(
                None,
                Problem::out_of_range("audit.wal_bytes", "must be at least 65536".into()),
            ));
        }
        Ok(Audit {
            checkpoint_interval: self.positive_duration(
                "audit.checkpoint_interval",
                raw.checkpoint_interval,
                Duration::from_secs(60),
            )?,
            signing_key: raw
                .signing_key
                .map(|p| self.path("audit.signing_key", p))
                .transpose()?,
            log_id: match raw.log_id {
                Some(id) => {
                    let span = id.span();
                    let id = self.non_blank("audit.log_id", id)?;
                    // It names every checkpoint the log signs, for good: a name no
                    // checkpoint can carry would leave the log unverifiable.
                    crate::audit::checkpoint::check_key_name(&id).map_err(|_| {
                        self.invalid(
                            Some(span),
                            Problem::out_of_range(
                                "audit.log_id",
                                format!("{id:?} must have no spaces, '+' or control characters: it names every checkpoint the log signs"),
                            ),
                        )
                    })?;
                    id
                }
                None => format!("{trust_domain}/sgw/audit"),
            },
            max_batch,
            wal_bytes,
        })
    }

    fn storage(&self, raw: RawStorage, listen: SocketAddr) -> Result<Storage, ConfigError> {
        let backend = raw.backend.as_ref().map(|b| b.get_ref().as_str());
        match backend {
            None | Some("sled") => {
                // Each PostgreSQL key, if given: whether it is, and where.
                let stray = [
                    ("storage.url", raw.url.as_ref().map(Spanned::span)),
                    ("storage.pool_size", raw.pool_size.map(|_| 0..0)),
                    (
                        "storage.statement_timeout",
                        raw.statement_timeout.as_ref().map(Spanned::span),
                    ),
                    (
                        "storage.connect_timeout",
                        raw.connect_timeout.as_ref().map(Spanned::span),
                    ),
                    (
                        "storage.allow_plaintext_network",
                        raw.allow_plaintext_network.map(|_| 0..0),
                    ),
                    ("storage.replica", raw.replica.as_ref().map(Spanned::span)),
                ];
                if let Some((field, span)) = stray.into_iter().find(|(_, s)| s.is_some()) {
                    return Err(self.invalid(
                        span.filter(|s| !s.is_empty()),
                        Problem::out_of_range(
                            field,
                            "applies only with backend = \"postgres\"".into(),
                        ),
                    ));
                }
                Ok(Storage::Sled)
            }
            Some("postgres") => {
                let Some(url) = raw.url else {
                    return Err(self.invalid(
                        raw.backend.map(|b| b.span()),
                        Problem::out_of_range(
                            "storage.url",
                            "is required with backend = \"postgres\" (e.g. \"postgres://sgw@127.0.0.1:5432/sgw\")".into(),
                        ),
                    ));
                };
                let url_span = url.span();
                let mut connection = crate::pg::PgConfig::new(url.into_inner());
                if let Some(n) = raw.pool_size {
                    if n == 0 {
                        return Err(self.invalid(
                            None,
                            Problem::out_of_range("storage.pool_size", "must be at least 1".into()),
                        ));
                    }
                    connection.pool_size = n;
                }
                connection.statement_timeout = self.positive_duration(
                    "storage.statement_timeout",
                    raw.statement_timeout,
                    connection.statement_timeout,
                )?;
                connection.connect_timeout = self.positive_duration(
                    "storage.connect_timeout",
                    raw.connect_timeout,
                    connection.connect_timeout,
                )?;
                connection.allow_plaintext_network = raw.allow_plaintext_network.unwrap_or(false);
                // The URL may hold a password: the message names the problem, never
                // the URL.
                connection.driver_config().map_err(|e| {
                    self.invalid(
                        Some(url_span),
                        Problem::out_of_range("storage.url", e.to_string()),
                    )
                })?;
                let replica = match raw.replica {
                    Some(r) => self.non_blank("storage.replica", r)?,
                    None => default_replica_name(listen),
                };
                Ok(Storage::Postgres(PostgresStorage {
                    connection,
                    replica,
                }))
            }
            Some(other) => Err(self.invalid(
                raw.backend.as_ref().map(Spanned::span),
                Problem::out_of_range(
                    "storage.backend",
                    format!("{other:?} is not a backend; use \"sled\" or \"postgres\""),
                ),
            )),
        }
    }

    // --- leaf parsers ---

    /// A path, made absolute against the config file's folder.
    fn path(&self, field: &str, raw: Spanned<PathBuf>) -> Result<PathBuf, ConfigError> {
        let span = raw.span();
        let path = raw.into_inner();
        if path.as_os_str().is_empty() {
            return Err(self.invalid(span, Problem::empty(field)));
        }
        Ok(if path.is_absolute() {
            path
        } else {
            self.base_dir.join(path)
        })
    }

    fn address(&self, field: &str, raw: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
        raw.get_ref().parse().map_err(|_| {
            self.invalid(
                raw.span(),
                Problem::Address {
                    field: field.to_owned(),
                    value: raw.get_ref().clone(),
                },
            )
        })
    }

    fn non_blank(&self, field: &str, raw: Spanned<String>) -> Result<String, ConfigError> {
        if raw.get_ref().trim().is_empty() {
            return Err(self.invalid(raw.span(), Problem::empty(field)));
        }
        Ok(raw.into_inner())
    }

    /// One domain enum value by its canonical name.
    fn name<T>(&self, field: &str, raw: &Spanned<String>) -> Result<T, ConfigError>
    where
        T: std::str::FromStr<Err = UnknownName>,
    {
        raw.get_ref().parse().map_err(|source| {
            self.invalid(
                raw.span(),
                Problem::UnknownName {
                    field: field.to_owned(),
                    source,
                },
            )
        })
    }

    /// A non-empty list of domain enum values; repeats are harmless.
    fn names<T>(
        &self,
        field: &str,
        raw: Spanned<Vec<Spanned<String>>>,
    ) -> Result<BTreeSet<T>, ConfigError>
    where
        T: std::str::FromStr<Err = UnknownName> + Ord,
    {
        if raw.get_ref().is_empty() {
            return Err(self.invalid(raw.span(), Problem::empty(field)));
        }
        raw.get_ref().iter().map(|n| self.name(field, n)).collect()
    }

    fn duration(
        &self,
        field: &str,
        raw: Option<Spanned<String>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(raw) = raw else {
            return Ok(default);
        };
        parse_duration(raw.get_ref()).map_err(|reason| {
            self.invalid(
                raw.span(),
                Problem::Duration {
                    field: field.to_owned(),
                    value: raw.get_ref().clone(),
                    reason,
                },
            )
        })
    }

    fn positive_duration(
        &self,
        field: &str,
        raw: Option<Spanned<String>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let span = raw.as_ref().map(Spanned::span);
        let d = self.duration(field, raw, default)?;
        if d.is_zero() {
            return Err(self.invalid(
                span,
                Problem::out_of_range(field, "must be longer than zero".into()),
            ));
        }
        Ok(d)
    }

    fn invalid(&self, span: impl Into<Option<Range<usize>>>, problem: Problem) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            position: span.into().map(|s| position_in(self.text, s.start)),
            problem: Box::new(problem),
        }
    }
}

// === impl Problem ===

impl Problem {
    fn id(field: &str, source: IdError) -> Problem {
        Problem::Id {
            field: field.to_owned(),
            source,
        }
    }

    fn empty(field: &str) -> Problem {
        Problem::Empty {
            field: field.to_owned(),
        }
    }

    fn out_of_range(field: &str, requirement: String) -> Problem {
        Problem::OutOfRange {
            field: field.to_owned(),
            requirement,
        }
    }
}

/// Why a `[logging] level` is not a filter to log by: each comma-separated part
/// is a level (`error`, `warn`, `info`, `debug`, `trace`, `off`) or `target=level`.
/// A bare word that is not a level (`warning`, `verbose`) would parse as a target
/// and leave every other line, the gateway's errors included, unlogged.
fn log_filter_problem(filter: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let is_level = |s: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()));
    for part in filter.split(',') {
        let level = match part.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level,
            Some(_) => return Err(format!("{part:?} names no target before '='")),
            None => part,
        };
        if !is_level(level) {
            return Err(format!(
                "{part:?}: a level must be one of {}, alone or as target=level (e.g. \"sgw=debug,info\")",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Formats [`Problem::DuplicateId`]'s message.
struct DuplicateMessage<'a>(&'a Problem);

impl fmt::Display for DuplicateMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Problem::DuplicateId {
            id,
            role,
            first_role,
            first_line,
        } = self.0
        else {
            return Ok(());
        };
        if role == first_role {
            write!(f, "duplicate {role} id {id:?} (first at line {first_line})")
        } else {
            write!(
                f,
                "duplicate id {id:?}: this {role} has the id of the {first_role} at line \
                 {first_line}; ids must be unique across agencies, auditors and operators"
            )
        }
    }
}

/// `file`, or `file:line:column` when the position is known.
struct Located<'a>(&'a str, Option<Position>);

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(p) => write!(f, "{}:{}:{}", self.0, p.line, p.column),
            None => f.write_str(self.0),
        }
    }
}

/// The 1-based line and column of byte `offset` in `text`.
fn position_in(text: &str, offset: usize) -> Position {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Position {
        line: before.matches('\n').count() + 1,
        column: before.get(line_start..).map_or(0, |s| s.chars().count()) + 1,
    }
}

/// A parser message on one line, for log lines and `file:line: message` output.
fn one_line(message: &str) -> String {
    message
        .trim()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why `name` is not a lowercase DNS name, or `None` if it is one.
pub(crate) fn dns_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > 253 {
        return Some("it is longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Some("it has an empty label (a leading, trailing or doubled dot)");
        }
        if label.len() > 63 {
            return Some("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Some("use only a-z, 0-9, '-' and '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("a label starts or ends with '-'");
        }
    }
    None
}

// === the file as written: private mirrors of each section ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Spanned<String>,
    data_dir: Spanned<PathBuf>,
    trust_domain: Spanned<String>,
    front_door: Spanned<String>,
    tls: RawTls,
    #[serde(default, rename = "agency")]
    agencies: Vec<RawAgency>,
    #[serde(default, rename = "auditor")]
    auditors: Vec<RawPrincipal>,
    #[serde(default, rename = "operator")]
    operators: Vec<RawPrincipal>,
    #[serde(default, rename = "agreement")]
    agreements: Vec<RawAgreement>,
    #[serde(default)]
    deadlines: RawDeadlines,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    logging: RawLogging,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    storage: RawStorage,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
    client_ca: Spanned<PathBuf>,
    #[serde(default)]
    crl: Vec<Spanned<PathBuf>>,
    #[serde(default = "yes")]
    watch: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgency {
    id: Spanned<String>,
    sector: Spanned<String>,
    name: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    id: Spanned<String>,
    name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgreement {
    from: Spanned<String>,
    to: Spanned<String>,
    categories: Spanned<Vec<Spanned<String>>>,
    purposes: Spanned<Vec<Spanned<String>>>,
    lawful_basis: Spanned<String>,
    consent_required: bool,
    override_allowed: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDeadlines {
    immediate_risk: Option<Spanned<String>>,
    urgent: Option<Spanned<String>>,
    routine_working_days: Option<u32>,
    bank_holidays: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_bytes: Option<usize>,
    max_content_bytes: Option<usize>,
    max_narrative_chars: Option<usize>,
    max_summary_chars: Option<usize>,
    max_note_chars: Option<usize>,
    default_page_size: Option<u32>,
    max_page_size: Option<u32>,
    max_concurrent_streams: Option<u32>,
    max_connections: Option<usize>,
    max_connections_per_identity: Option<usize>,
    handshake_timeout: Option<Spanned<String>>,
    preface_timeout: Option<Spanned<String>>,
    max_handshakes: Option<usize>,
    max_handshakes_per_ip: Option<usize>,
    keepalive_interval: Option<Spanned<String>>,
    keepalive_timeout: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    max_subscribers_per_agency: Option<usize>,
    default_retention_days: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    format: Option<LogFormat>,
    level: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    checkpoint_interval: Option<Spanned<String>>,
    signing_key: Option<Spanned<PathBuf>>,
    log_id: Option<Spanned<String>>,
    max_batch: Option<usize>,
    wal_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    backend: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    pool_size: Option<usize>,
    statement_timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    allow_plaintext_network: Option<bool>,
    replica: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    grace: Option<Spanned<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// API.md's example, plus the `[[agency]]` its `front_door` names (the example
    /// alone registers only `police-met`, so its front door would be unregistered).
    const EXAMPLE: &str = r#"
listen = "127.0.0.1:50051"
data_dir = "data"                     # sled database, key files
trust_domain = "safeguarding.example"
front_door = "csc-southwark"          # the children's social care agency that receives every concern

[tls]
cert = "certs/dev/server.pem"         # PEM chain, leaf first
key = "certs/dev/server.key"          # PKCS#8 PEM
client_ca = "certs/dev/ca.pem"        # PEM bundle: one or more trusted client CAs
crl = []                              # CRL files (PEM), optional

[[agency]]
id = "police-met"                     # [a-z0-9-]{1,64}, as in the certificate's URI SAN
sector = "POLICE"
name = "Metropolitan Police"

[[agency]]
id = "csc-southwark"
sector = "CHILDRENS_SOCIAL_CARE"
name = "Southwark Children's Services"

[[auditor]]
id = "dpo"

[[operator]]
id = "ops"

[[agreement]]                         # who may receive what, for which purpose
from = "POLICE"
to = "EDUCATION"
categories = ["POLICE_INCIDENT"]
purposes = ["SAFEGUARDING"]
lawful_basis = "UK GDPR Art 6(1)(e) public task; DPA 2018 Sch 1 para 18 safeguarding of children"
consent_required = false
override_allowed = false

[deadlines]                           # optional; these are the defaults; durations as "90s", "15m", "1h"
immediate_risk = "1h"
urgent = "4h"
routine_working_days = 1
bank_holidays = []                    # ["2026-12-25", ...]
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("/etc/sgw"), "sgw.toml")
    }

    /// The example with `from` replaced by `to` (once), which must be present.
    fn edited(from: &str, to: &str) -> String {
        assert!(EXAMPLE.contains(from), "{from:?} not in the example");
        EXAMPLE.replacen(from, to, 1)
    }

    fn problem(result: Result<Config, ConfigError>) -> (Problem, String) {
        match result {
            Err(e @ ConfigError::Invalid { .. }) => {
                let text = e.to_string();
                let ConfigError::Invalid { problem, .. } = e else {
                    unreachable!()
                };
                (*problem, text)
            }
            other => panic!("expected ConfigError::Invalid, got {other:?}"),
        }
    }

    fn syntax(result: Result<Config, ConfigError>) -> String {
        match result {
            Err(e @ ConfigError::Syntax { .. }) => e.to_string(),
            other => panic!("expected ConfigError::Syntax, got {other:?}"),
        }
    }

    #[test]
    fn api_example_parses_into_typed_config() {
        let c = load(EXAMPLE).expect("example loads");
        assert_eq!(c.listen, "127.0.0.1:50051".parse().expect("address"));
        assert_eq!(c.trust_domain, "safeguarding.example");
        assert_eq!(c.front_door.as_str(), "csc-southwark");
        assert_eq!(c.agencies.len(), 2);
        assert_eq!(c.agencies[0].sector, Sector::Police);
        assert_eq!(c.agencies[0].name, "Metropolitan Police");
        assert_eq!(c.auditors[0].id.as_str(), "dpo");
        assert_eq!(c.auditors[0].name, None);
        assert_eq!(c.operators[0].id.as_str(), "ops");
        let a = &c.agreements[0];
        assert_eq!((a.from, a.to), (Sector::Police, Sector::Education));
        assert_eq!(
            a.categories,
            BTreeSet::from([RecordCategory::PoliceIncident])
        );
        assert_eq!(a.purposes, BTreeSet::from([Purpose::Safeguarding]));
        assert!(a.lawful_basis.starts_with("UK GDPR"));
        assert!(!a.consent_required && !a.override_allowed);
        assert!(c.tls.crl.is_empty());
        assert!(c.tls.watch);
        assert_eq!(c.deadlines, Deadlines::default());
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.logging, Logging::default());
        assert_eq!(c.audit.log_id, "safeguarding.example/sgw/audit");
        assert_eq!(c.audit.checkpoint_interval, Duration::from_secs(60));
        assert_eq!(c.audit.max_batch, 1024);
        assert_eq!(c.audit.wal_bytes, 32 << 20);
        assert_eq!(c.audit.signing_key, None);
        assert_eq!(c.metrics.listen, None);
        assert_eq!(c.shutdown.grace, Duration::from_secs(10));
    }

    #[test]
    fn registry_looks_up_ids_roles_and_agreements() {
        let c = load(EXAMPLE).expect("example loads");
        let r = c.registry();
        assert_eq!(
            r.agency("police-met").map(|a| a.sector),
            Some(Sector::Police)
        );
        assert_eq!(r.agency("dpo"), None);
        assert_eq!(r.agency("nobody"), None);
        assert_eq!(r.front_door().map(|a| a.id.as_str()), Some("csc-southwark"));
        assert!(r.role_of(Role::Agency, "police-met"));
        assert!(r.role_of(Role::Auditor, "dpo"));
        assert!(r.role_of(Role::Operator, "ops"));
        assert!(!r.role_of(Role::Agency, "dpo"));
        assert!(!r.role_of(Role::Operator, "police-met"));
        assert_eq!(r.role("nobody"), None);
        assert_eq!(
            r.agreements_for(Sector::Police, Sector::Education).count(),
            1
        );
        assert_eq!(
            r.agreements_for(Sector::Education, Sector::Police).count(),
            0
        );
    }

    #[test]
    fn registry_fails_closed_when_lists_are_edited_after_load() {
        let mut c = load(EXAMPLE).expect("example loads");
        c.agencies.swap(0, 1);
        assert_eq!(c.registry().agency("police-met"), None);
        assert!(!c.registry().role_of(Role::Agency, "police-met"));
    }

    #[test]
    fn unknown_top_level_key_is_named_with_its_line() {
        let msg = syntax(load(&edited("listen =", "lissen =")));
        assert!(msg.starts_with("sgw.toml:2:1: "), "{msg}");
        assert!(msg.contains("unknown field `lissen`"), "{msg}");
        assert!(msg.contains("expected one of"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn unknown_nested_key_is_named_with_its_line() {
        let msg = syntax(load(&edited("cert =", "crt =")));
        assert!(msg.starts_with("sgw.toml:8:1: "), "{msg}");
        assert!(msg.contains("unknown field `crt`"), "{msg}");
        let msg = syntax(load(&edited(
            "name = \"Metropolitan Police\"",
            "nmae = \"x\"",
        )));
        assert!(msg.contains("unknown field `nmae`"), "{msg}");
        let msg = syntax(load(&format!("{EXAMPLE}\n[limits]\nmax_page = 5\n")));
        assert!(msg.contains("unknown field `max_page`"), "{msg}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let msg = syntax(load(&edited("consent_required = false\n", "")));
        assert!(msg.contains("consent_required"), "{msg}");
    }

    #[test]
    fn duplicate_agency_id_is_refused() {
        let text = format!(
            "{EXAMPLE}\n[[agency]]\nid = \"police-met\"\nsector = \"POLICE\"\nname = \"Again\"\n"
        );
        let (p, msg) = problem(load(&text));
        assert!(
            matches!(&p, Problem::DuplicateId { id, role: Role::Agency, first_role: Role::Agency, first_line: 14 } if id == "police-met"),
            "{p:?}"
        );
        assert!(msg.contains("duplicate agency id \"police-met\""), "{msg}");
        assert!(msg.starts_with("sgw.toml:"), "{msg}");
    }

    #[test]
    fn id_shared_by_agency_and_auditor_is_refused() {
        let (p, msg) = problem(load(&edited("id = \"dpo\"", "id = \"police-met\"")));
        assert!(
            matches!(
                &p,
                Problem::DuplicateId {
                    role: Role::Auditor,
                    first_role: Role::Agency,
                    ..
                }
            ),
            "{p:?}"
        );
        assert!(msg.contains("\"police-met\""), "{msg}");
        assert!(msg.contains("unique across"), "{msg}");
    }

    #[test]
    fn malformed_id_is_refused() {
        let (p, msg) = problem(load(&edited("id = \"ops\"", "id = \"Ops_1\"")));
        assert!(matches!(&p, Problem::Id { .. }), "{p:?}");
        assert!(
            msg.contains("[[operator]] id") && msg.contains("\"Ops_1\""),
            "{msg}"
        );
    }

    #[test]
    fn unknown_sector_lists_allowed_values() {
        let (p, msg) = problem(load(&edited("sector = \"POLICE\"", "sector = \"POLIS\"")));
        assert!(matches!(&p, Problem::UnknownName { .. }), "{p:?}");
        assert!(msg.contains("agency \"police-met\" sector"), "{msg}");
        assert!(msg.contains("\"POLIS\""), "{msg}");
        assert!(
            msg.contains("HEALTH, POLICE, EDUCATION, CHILDRENS_SOCIAL_CARE"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_purpose_and_category_are_refused() {
        let (_, msg) = problem(load(&edited("[\"SAFEGUARDING\"]", "[\"GOSSIP\"]")));
        assert!(
            msg.contains("purposes") && msg.contains("EARLY_HELP"),
            "{msg}"
        );
        let (_, msg) = problem(load(&edited("[\"POLICE_INCIDENT\"]", "[\"SHOE_SIZE\"]")));
        assert!(
            msg.contains("categories") && msg.contains("SCHOOL_ATTENDANCE"),
            "{msg}"
        );
    }

    #[test]
    fn front_door_must_be_childrens_social_care() {
        let (p, msg) = problem(load(&edited(
            "front_door = \"csc-southwark\"",
            "front_door = \"police-met\"",
        )));
        assert_eq!(
            p,
            Problem::FrontDoorNotChildrensSocialCare {
                id: "police-met".into(),
                sector: Sector::Police
            }
        );
        assert!(msg.starts_with("sgw.toml:5:14: front_door"), "{msg}");
    }

    #[test]
    fn front_door_must_be_registered() {
        let (p, _) = problem(load(&edited(
            "front_door = \"csc-southwark\"",
            "front_door = \"csc-lambeth\"",
        )));
        assert_eq!(
            p,
            Problem::FrontDoorUnregistered {
                id: "csc-lambeth".into()
            }
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let text = edited("crl = []", "crl = [\"crl/a.pem\", \"/abs/b.pem\"]")
            + "\n[audit]\nsigning_key = \"keys/audit.pem\"\n";
        let c = load(&text).expect("loads");
        assert_eq!(c.data_dir, Path::new("/etc/sgw/data"));
        assert_eq!(c.tls.cert, Path::new("/etc/sgw/certs/dev/server.pem"));
        assert_eq!(c.tls.key, Path::new("/etc/sgw/certs/dev/server.key"));
        assert_eq!(c.tls.client_ca, Path::new("/etc/sgw/certs/dev/ca.pem"));
        assert_eq!(
            c.tls.crl,
            vec![
                PathBuf::from("/etc/sgw/crl/a.pem"),
                PathBuf::from("/abs/b.pem")
            ]
        );
        assert_eq!(
            c.audit.signing_key.as_deref(),
            Some(Path::new("/etc/sgw/keys/audit.pem"))
        );
    }

    #[test]
    fn load_reads_a_file_and_resolves_against_its_folder() {
        let dir = std::env::temp_dir().join(format!("sgw-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("sgw.toml");
        std::fs::write(&file, EXAMPLE).expect("write");
        let c = Config::load(&file);
        let missing = Config::load(&dir.join("absent.toml"));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(c.expect("loads").data_dir, dir.join("data"));
        let msg = missing.expect_err("absent file").to_string();
        assert!(msg.contains("absent.toml: cannot read"), "{msg}");
    }

    #[test]
    fn bad_duration_is_refused_naming_the_key() {
        let (p, msg) = problem(load(&edited("urgent = \"4h\"", "urgent = \"4 hours\"")));
        assert!(
            matches!(&p, Problem::Duration { field, .. } if field == "deadlines.urgent"),
            "{p:?}"
        );
        assert!(
            msg.contains("deadlines.urgent: \"4 hours\" is not a duration"),
            "{msg}"
        );
        let (_, msg) = problem(load(&edited("urgent = \"4h\"", "urgent = \"0s\"")));
        assert!(
            msg.contains("deadlines.urgent must be longer than zero"),
            "{msg}"
        );
        let (_, msg) = problem(load(&format!(
            "{EXAMPLE}\n[limits]\nrequest_timeout = \"30x\"\n"
        )));
        assert!(
            msg.contains("limits.request_timeout") && msg.contains("unknown unit \"x\""),
            "{msg}"
        );
    }

    #[test]
    fn durations_parse_and_format() {
        let cases = [
            ("90s", 90_000),
            ("15m", 900_000),
            ("1h", 3_600_000),
            ("2h30m", 9_000_000),
            ("1d2h3m4s5ms", 93_784_005),
            ("250ms", 250),
            ("0s", 0),
        ];
        for (text, ms) in cases {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(ms)),
                "{text}"
            );
        }
        assert_eq!(format_duration(Duration::from_millis(9_000_000)), "2h30m");
        assert_eq!(
            format_duration(Duration::from_millis(93_784_005)),
            "1d2h3m4s5ms"
        );
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert_eq!(parse_duration("10"), Err(DurationError::MissingUnit));
        assert_eq!(parse_duration("1.5h"), Err(DurationError::Unexpected('.')));
        assert_eq!(parse_duration("h"), Err(DurationError::Unexpected('h')));
        assert_eq!(parse_duration("-1h"), Err(DurationError::Unexpected('-')));
        assert_eq!(
            parse_duration("5y"),
            Err(DurationError::UnknownUnit("y".into()))
        );
        assert_eq!(parse_duration("30m1h"), Err(DurationError::Order));
        assert_eq!(parse_duration("1h1h"), Err(DurationError::Order));
        assert_eq!(
            parse_duration("99999999999999999999s"),
            Err(DurationError::TooLarge)
        );
        assert_eq!(
            parse_duration("18446744073709551615d"),
            Err(DurationError::TooLarge)
        );
    }

    #[test]
    fn deadlines_default_when_absent() {
        let text = EXAMPLE
            .split("[deadlines]")
            .next()
            .expect("example has a deadlines section");
        let c = load(text).expect("loads");
        assert_eq!(c.deadlines.immediate_risk, Duration::from_secs(3600));
        assert_eq!(c.deadlines.urgent, Duration::from_secs(4 * 3600));
        assert_eq!(c.deadlines.routine_working_days, 1);
        assert!(c.deadlines.bank_holidays.is_empty());
    }

    #[test]
    fn bank_holidays_parse_as_dates() {
        let c = load(&edited(
            "bank_holidays = []",
            "bank_holidays = [\"2026-12-25\", \"2026-12-28\"]",
        ))
        .expect("loads");
        let dates: Vec<String> = c
            .deadlines
            .bank_holidays
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(dates, ["2026-12-25", "2026-12-28"]);
        let (p, msg) = problem(load(&edited(
            "bank_holidays = []",
            "bank_holidays = [\"25/12/2026\"]",
        )));
        assert!(matches!(p, Problem::Date { .. }), "{p:?}");
        assert!(
            msg.contains("deadlines.bank_holidays: \"25/12/2026\" is not a date"),
            "{msg}"
        );
        let (_, msg) = problem(load(&edited(
            "bank_holidays = []",
            "bank_holidays = [\"2026-02-30\"]",
        )));
        assert!(msg.contains("is not a date"), "{msg}");
    }

    #[test]
    fn immediate_risk_may_not_exceed_urgent() {
        let (_, msg) = problem(load(&edited(
            "immediate_risk = \"1h\"",
            "immediate_risk = \"5h\"",
        )));
        assert!(
            msg.contains(
                "deadlines.immediate_risk (5h) must not be longer than deadlines.urgent (4h)"
            ),
            "{msg}"
        );
    }

    #[test]
    fn agreement_with_empty_categories_is_refused() {
        let (p, msg) = problem(load(&edited("[\"POLICE_INCIDENT\"]", "[]")));
        assert!(
            matches!(&p, Problem::Empty { field } if field == "agreement POLICE -> EDUCATION categories"),
            "{p:?}"
        );
        assert!(msg.contains("must not be empty"), "{msg}");
        let basis = EXAMPLE
            .lines()
            .find(|l| l.starts_with("lawful_basis"))
            .expect("example has a lawful basis");
        let (p, _) = problem(load(&edited(basis, "lawful_basis = \"  \"")));
        assert!(
            matches!(&p, Problem::Empty { field } if field.ends_with("lawful_basis")),
            "{p:?}"
        );
    }

    #[test]
    fn overlapping_duplicate_agreement_is_refused() {
        let text = format!(
            "{EXAMPLE}\n[[agreement]]\nfrom = \"POLICE\"\nto = \"EDUCATION\"\n\
             categories = [\"SCHOOL_ATTENDANCE\", \"POLICE_INCIDENT\"]\n\
             purposes = [\"SAFEGUARDING\"]\nlawful_basis = \"consent\"\n\
             consent_required = true\noverride_allowed = false\n"
        );
        let (p, msg) = problem(load(&text));
        assert_eq!(
            p,
            Problem::OverlappingAgreements {
                from: Sector::Police,
                to: Sector::Education,
                category: RecordCategory::PoliceIncident,
                purpose: Purpose::Safeguarding,
                first_line: 30,
            }
        );
        assert!(msg.contains("ambiguous"), "{msg}");
    }

    #[test]
    fn disjoint_agreements_for_the_same_sectors_are_allowed() {
        let text = format!(
            "{EXAMPLE}\n[[agreement]]\nfrom = \"POLICE\"\nto = \"EDUCATION\"\n\
             categories = [\"POLICE_INCIDENT\"]\npurposes = [\"EDUCATION_SUPPORT\"]\n\
             lawful_basis = \"consent\"\nconsent_required = true\noverride_allowed = false\n"
        );
        let c = load(&text).expect("loads");
        assert_eq!(
            c.registry()
                .agreements_for(Sector::Police, Sector::Education)
                .count(),
            2
        );
    }

    #[test]
    fn storage_is_sled_unless_postgres_is_chosen() {
        let c = load(EXAMPLE).expect("loads");
        assert!(matches!(c.storage, Storage::Sled));
        let c = load(&format!("{EXAMPLE}\n[storage]\nbackend = \"sled\"\n")).expect("loads");
        assert!(matches!(c.storage, Storage::Sled));

        let c = load(&format!(
            "{EXAMPLE}\n[storage]\nbackend = \"postgres\"\n\
             url = \"postgres://sgw:secret@127.0.0.1:5432/sgw\"\npool_size = 40\n\
             statement_timeout = \"3s\"\nreplica = \"a\"\n"
        ))
        .expect("loads");
        let Storage::Postgres(pg) = &c.storage else {
            panic!("{:?}", c.storage)
        };
        assert_eq!(pg.connection.pool_size, 40);
        assert_eq!(pg.connection.statement_timeout, Duration::from_secs(3));
        assert_eq!(pg.replica, "a");
        // The password never reaches a debug print (and so never a log line).
        assert!(!format!("{c:?}").contains("secret"));

        let c = load(&format!(
            "{EXAMPLE}\n[storage]\nbackend = \"postgres\"\nurl = \"postgres://sgw@localhost/sgw\"\n"
        ))
        .expect("loads");
        let Storage::Postgres(pg) = &c.storage else {
            panic!()
        };
        assert!(
            pg.replica.contains(&format!("/{}", std::process::id())),
            "{}",
            pg.replica
        );
        // `sgw serve --listen` moves a default name to the port it listens on; a
        // name given in the file stays.
        let mut moved = c.clone();
        moved.set_listen("127.0.0.1:50071".parse().expect("address"));
        let Storage::Postgres(pg) = &moved.storage else {
            panic!()
        };
        assert!(pg.replica.contains(":50071/"), "{}", pg.replica);
        let mut named = load(&format!(
            "{EXAMPLE}\n[storage]\nbackend = \"postgres\"\nurl = \"postgres://sgw@localhost/sgw\"\nreplica = \"a\"\n"
        ))
        .expect("loads");
        named.set_listen("127.0.0.1:50071".parse().expect("address"));
        let Storage::Postgres(pg) = &named.storage else {
            panic!()
        };
        assert_eq!(pg.replica, "a");
    }

    #[test]
    fn storage_problems_are_named() {
        for (extra, needle) in [
            ("backend = \"mysql\"", "\"mysql\" is not a backend"),
            ("backend = \"postgres\"", "storage.url"),
            ("url = \"postgres://sgw@127.0.0.1/sgw\"", "applies only with backend = \"postgres\""),
            ("pool_size = 8", "storage.pool_size applies only with backend = \"postgres\""),
            (
                "allow_plaintext_network = true",
                "storage.allow_plaintext_network applies only",
            ),
            (
                "backend = \"postgres\"\nurl = \"postgres://sgw@127.0.0.1/sgw\"\npool_size = 0",
                "storage.pool_size",
            ),
            (
                "backend = \"postgres\"\nurl = \"postgres://sgw:hunter2@db.example.org/sgw\"",
                "storage.url",
            ),
            ("backend = \"postgres\"\nurl = \"postgres://sgw@127.0.0.1/sgw\"\nstatement_timeout = \"0s\"", "storage.statement_timeout"),
        ] {
            let (_, msg) = problem(load(&format!("{EXAMPLE}\n[storage]\n{extra}\n")));
            assert!(msg.contains(needle), "{extra}: {msg}");
            assert!(!msg.contains("hunter2"), "{msg}");
        }
    }

    #[test]
    fn trust_domain_must_be_a_dns_name() {
        for bad in [
            "",
            "Safeguarding.example",
            "a..b",
            "-a.example",
            "a b",
            "a/b",
        ] {
            let text = edited(
                "trust_domain = \"safeguarding.example\"",
                &format!("trust_domain = \"{bad}\""),
            );
            let (p, _) = problem(load(&text));
            assert!(matches!(p, Problem::TrustDomain { .. }), "{bad:?}: {p:?}");
        }
    }

    #[test]
    fn limits_default_and_are_checked() {
        let with = |limits: &str| load(&format!("{EXAMPLE}\n[limits]\n{limits}\n"));
        let c = with("max_page_size = 50\ndefault_page_size = 50\nrequest_timeout = \"2m\"")
            .expect("loads");
        assert_eq!(c.limits.max_page_size, 50);
        assert_eq!(c.limits.request_timeout, Duration::from_secs(120));
        assert_eq!(c.limits.max_content_bytes, 1024 * 1024);

        let (_, msg) = problem(with("default_page_size = 0"));
        assert!(
            msg.contains("limits.default_page_size must be at least 1"),
            "{msg}"
        );
        let (_, msg) = problem(with("max_page_size = 10"));
        assert!(
            msg.contains(
                "limits.default_page_size (100) must not exceed limits.max_page_size (10)"
            ),
            "{msg}"
        );
        let (_, msg) = problem(with("max_message_bytes = 1114112"));
        assert!(
            msg.contains("limits.max_message_bytes (1114112) must exceed limits.max_content_bytes"),
            "{msg}"
        );
        assert!(with("max_message_bytes = 1114113").is_ok());
        let (_, msg) = problem(with("max_narrative_chars = 1040000"));
        assert!(msg.contains("4 × limits.max_narrative_chars"), "{msg}");
        // A consent statement's two notes must fit in one ListConsents answer.
        let (_, msg) = problem(with("max_note_chars = 520000"));
        assert!(msg.contains("8 × limits.max_note_chars (4160000)"), "{msg}");
        assert!(with("max_note_chars = 500000").is_ok());
        let msg = syntax(with("max_connections = -1"));
        assert!(msg.contains("-1"), "{msg}");
        // A default retention past the calendar's end would fail every ShareRecord.
        let (_, msg) = problem(with("default_retention_days = 3000000"));
        assert!(
            msg.contains("limits.default_retention_days (3000000) must be at most 36525"),
            "{msg}"
        );
        assert!(with("default_retention_days = 36525").is_ok());
    }

    #[test]
    fn connection_limits_default_from_max_connections_and_may_not_exceed_it() {
        let with = |limits: &str| load(&format!("{EXAMPLE}\n[limits]\n{limits}\n"));
        let c = load(EXAMPLE).expect("loads");
        assert_eq!(c.limits.max_connections_per_identity, 64);
        assert_eq!(c.limits.max_handshakes, 512);
        assert_eq!(c.limits.preface_timeout, Duration::from_secs(10));

        // A lower max_connections alone is a valid configuration: the limits that
        // depend on it follow it down.
        let c = with("max_connections = 3").expect("loads");
        assert_eq!(c.limits.max_connections_per_identity, 3);
        assert_eq!(c.limits.max_handshakes, 1);
        let c = with("max_connections = 1").expect("loads");
        assert_eq!(c.limits.max_handshakes, 1);

        let c = with(
            "max_connections = 100\nmax_connections_per_identity = 100\n\
             max_handshakes = 7\npreface_timeout = \"2s\"",
        )
        .expect("loads");
        assert_eq!(c.limits.max_connections_per_identity, 100);
        assert_eq!(c.limits.max_handshakes, 7);
        assert_eq!(c.limits.preface_timeout, Duration::from_secs(2));

        let (p, msg) = problem(with(
            "max_connections = 50\nmax_connections_per_identity = 51",
        ));
        assert_eq!(
            p,
            Problem::OutOfRange {
                field: "limits.max_connections_per_identity".into(),
                requirement: "(51) must not exceed limits.max_connections (50)".into(),
            }
        );
        assert!(
            msg.contains(
                "limits.max_connections_per_identity (51) must not exceed limits.max_connections (50)"
            ),
            "{msg}"
        );
        let (_, msg) = problem(with("max_handshakes = 1025"));
        assert!(
            msg.contains(
                "limits.max_handshakes (1025) must not exceed limits.max_connections (1024)"
            ),
            "{msg}"
        );
        for zero in ["max_connections_per_identity = 0", "max_handshakes = 0"] {
            let (_, msg) = problem(with(zero));
            assert!(msg.contains("must be at least 1"), "{zero}: {msg}");
        }
        let (_, msg) = problem(with("preface_timeout = \"0s\""));
        assert!(
            msg.contains("limits.preface_timeout must be longer than zero"),
            "{msg}"
        );
    }

    #[test]
    fn optional_sections_are_read() {
        let text = format!(
            "{EXAMPLE}\n[logging]\nformat = \"json\"\nlevel = \"sgw=debug,info\"\n\
             [audit]\ncheckpoint_interval = \"5s\"\nlog_id = \"x/y\"\nmax_batch = 8\nwal_bytes = 1048576\n\
             [metrics]\nlisten = \"127.0.0.1:9090\"\n[shutdown]\ngrace = \"0s\"\n\
             [[auditor]]\nid = \"ofsted\"\nname = \"Ofsted\"\n"
        );
        let c = load(&text).expect("loads");
        assert_eq!(c.logging.format, LogFormat::Json);
        assert_eq!(c.logging.level, "sgw=debug,info");
        assert_eq!(c.audit.checkpoint_interval, Duration::from_secs(5));
        assert_eq!(c.audit.log_id, "x/y");
        assert_eq!(c.audit.max_batch, 8);
        assert_eq!(c.audit.wal_bytes, 1 << 20);
        let (_, msg) = problem(load(&format!("{EXAMPLE}\n[audit]\nwal_bytes = 4096\n")));
        assert!(
            msg.contains("audit.wal_bytes") && msg.contains("65536"),
            "{msg}"
        );
        assert_eq!(
            c.metrics.listen,
            Some("127.0.0.1:9090".parse().expect("address"))
        );
        assert_eq!(c.shutdown.grace, Duration::ZERO);
        assert_eq!(c.auditors[1].name.as_deref(), Some("Ofsted"));

        for bad in ["warning", "sgw=verbose,info", "=debug"] {
            let (_, msg) = problem(load(&format!("{EXAMPLE}\n[logging]\nlevel = \"{bad}\"\n")));
            assert!(msg.contains("logging.level"), "{bad}: {msg}");
        }
        for good in ["WARN", "sgw=debug,info", "sgw::call=off,h2=warn,info"] {
            assert!(
                load(&format!("{EXAMPLE}\n[logging]\nlevel = \"{good}\"\n")).is_ok(),
                "{good}"
            );
        }
        let (_, msg) = problem(load(&format!(
            "{EXAMPLE}\n[audit]\nlog_id = \"Southwark audit\"\n"
        )));
        assert!(
            msg.contains("audit.log_id") && msg.contains("no spaces"),
            "{msg}"
        );
        let msg = syntax(load(&format!("{EXAMPLE}\n[logging]\nformat = \"xml\"\n")));
        assert!(msg.contains("xml") && msg.contains("json"), "{msg}");
        let (_, msg) = problem(load(&format!(
            "{EXAMPLE}\n[metrics]\nlisten = \"127.0.0.1:50051\"\n"
        )));
        assert!(
            msg.contains("metrics.listen must differ from listen"),
            "{msg}"
        );
    }

    #[test]
    fn listen_address_must_be_ip_and_port() {
        let (p, msg) = problem(load(&edited(
            "listen = \"127.0.0.1:50051\"",
            "listen = \"localhost:50051\"",
        )));
        assert!(matches!(p, Problem::Address { .. }), "{p:?}");
        assert!(
            msg.starts_with("sgw.toml:2:10: listen: \"localhost:50051\" is not an address"),
            "{msg}"
        );
        let (_, msg) = problem(load(&format!("{EXAMPLE}\n[metrics]\nlisten = \"9090\"\n")));
        assert!(msg.contains("metrics.listen: \"9090\""), "{msg}");
    }

    #[test]
    fn tls_watch_can_be_turned_off() {
        let c = load(&edited("crl = []", "crl = []\nwatch = false")).expect("loads");
        assert!(!c.tls.watch);
    }

    #[test]
    fn invalid_toml_reports_a_position() {
        let msg = syntax(load("listen = \"127.0.0.1:1\"\ndata_dir = [\n"));
        assert!(msg.starts_with("sgw.toml:"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}
