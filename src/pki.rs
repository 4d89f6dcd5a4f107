//! Certificates for sgw: a small CA, client and server leaves, CRLs, and the
//! development PKI on disk.
//!
//! Two audiences use this module:
//! - the CLI (`sgw certs init/issue/renew-server/revoke`, `sgw serve --dev`), through the
//!   directory functions at the bottom ([`init_dev_pki`], [`issue_to_dir`],
//!   [`renew_server`], [`revoke_in_dir`]);
//! - the end-to-end tests, which need every kind of bad certificate: a [`CertSpec`] has
//!   public fields, so a test can take [`CertSpec::client`] and then drop the EKU, add a
//!   second URI SAN, backdate `not_after` or mark it a CA before [`Ca::issue`] or
//!   [`self_signed`].
//!
//! All keys are ECDSA P-256 (the safest choice for TLS clients such as grpcurl and Go),
//! written as PKCS#8 PEM. Certificates are X.509 v3 with a random serial: 62 random bits
//! under a fixed top bit, so always positive and always 16 hex digits.
//!
//! # A PKI directory
//! | file | what | written |
//! | --- | --- | --- |
//! | `ca.pem`, `ca.key` | the CA (keyCertSign, cRLSign) | by `init` |
//! | `pki.toml` | `trust_domain = "..."`, so `issue` can omit it | by `init` |
//! | `server.pem`, `server.key` | serverAuth leaf for localhost, 127.0.0.1, ::1 | by `init`, `renew-server` |
//! | `<role>-<id>.pem`, `<role>-<id>.key` | clientAuth leaf, URI SAN `spiffe://<td>/<role>/<id>` | by `init`, `issue` |
//! | `revoked.toml` | revoked serials and the last CRL number | by `init`, `revoke` |
//! | `crl.pem` | CRL signed by the CA, listing `revoked.toml` | by `init`, `revoke` |
//!
//! The trust domain lives in `pki.toml` rather than in the CA certificate: a URI name
//! constraint would say the same thing, but not every verifier handles URI name
//! constraints, and a refused CA is a worse failure than a missing file (which
//! [`read_trust_domain`] reports by path).
//!
//! # Guarantees on disk
//! Every file is written to a temporary file in the same folder, synced, and renamed
//! over its target, so a reader (e.g. the gateway's certificate watcher) sees the old
//! file or the new one, never a partial one. Keys are created with mode 0600 from the
//! first byte; certificates, CRLs and state files 0644 (both less the umask). A key and
//! its certificate are two renames, key first: a reloader must check that the pair
//! matches and retry if it catches the moment between them.
// Certificate issuance is a command-line act at wall-clock time, not domain logic.
#![allow(clippy::disallowed_methods)]

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData, RevokedCertParams, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::domain::{IdError, PrincipalId, Role};

/// The CA certificate's file name in a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file name in a PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// The server certificate's file name in a PKI directory.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// The server key's file name in a PKI directory.
pub const SERVER_KEY_FILE: &str = "server.key";
/// The CRL's file name in a PKI directory.
pub const CRL_FILE: &str = "crl.pem";
/// The file that records the trust domain beside the CA.
pub const PKI_STATE_FILE: &str = "pki.toml";
/// The file that records revoked serials and the last CRL number.
pub const REVOKED_FILE: &str = "revoked.toml";

/// Validity of a development CA: ten years.
pub const DEV_CA_DAYS: u32 = 3650;
/// Default validity of a leaf certificate.
pub const DEFAULT_LEAF_DAYS: u32 = 365;
/// How long a CRL written by the directory functions stays current. rustls ignores a
/// CRL's nextUpdate unless told otherwise; a long period keeps a dev PKI usable either
/// way, and every revocation writes a fresh CRL.
pub const DEV_CRL_DAYS: u32 = 365;

/// Certificates start this long before they are made, so that a verifier whose clock
/// is slightly behind the issuer's does not see them as not yet valid.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::minutes(5);

/// The common name of a development CA, before its random suffix.
const DEV_CA_NAME: &str = "sgw development CA";

/// A development CA's name: [`DEV_CA_NAME`] and 8 random hex digits. Two CAs
/// trusted at once during a CA rollover must not share a name while a CRL is
/// configured: a CRL is matched to certificates by its issuer's name, and one
/// signed by the other key fails them (`BadSignature`).
fn dev_ca_name() -> Result<String, PkiError> {
    let mut bytes = [0u8; 4];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Generate(rcgen::Error::RingUnspecified))?;
    Ok(format!("{DEV_CA_NAME} {}", crate::tls::hex(&bytes)))
}

// === CertSpec ===

/// An extended key usage that sgw cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Eku {
    /// id-kp-clientAuth: the certificate may authenticate a TLS client.
    ClientAuth,
    /// id-kp-serverAuth: the certificate may authenticate a TLS server.
    ServerAuth,
}

/// What a certificate should say. The constructors give the certificates sgw uses;
/// every field is public so tests can bend one into any bad certificate they need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    /// Subject common name; empty means an empty subject.
    pub common_name: String,
    /// URI SANs, e.g. `spiffe://safeguarding.example/agency/police-met`.
    pub uri_sans: Vec<String>,
    /// DNS SANs.
    pub dns_sans: Vec<String>,
    /// IP address SANs.
    pub ip_sans: Vec<IpAddr>,
    /// Extended key usages; empty means no EKU extension at all.
    pub eku: Vec<Eku>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Serial number; `None` means a fresh random one (see the module documentation).
    pub serial: Option<u64>,
    /// Whether the certificate is a CA (basicConstraints CA:TRUE, keyCertSign, cRLSign).
    /// Otherwise it is marked CA:FALSE with digitalSignature only.
    pub is_ca: bool,
}

impl CertSpec {
    /// A client certificate for `spiffe://<trust_domain>/<role>/<id>`: that one URI SAN,
    /// EKU clientAuth only, common name `"<role> <id>"`, valid from now for `days`.
    ///
    /// Nothing is checked here, so tests can build identities the gateway must refuse;
    /// [`issue_to_dir`] and [`init_dev_pki`] check the trust domain and id.
    pub fn client(trust_domain: &str, role: Role, id: &str, days: u32) -> Self {
        let role = role.as_str();
        Self {
            common_name: format!("{role} {id}"),
            uri_sans: vec![spiffe_id(trust_domain, role, id)],
            eku: vec![Eku::ClientAuth],
            ..Self::valid_for(days)
        }
    }

    /// A server certificate with EKU serverAuth only, for `localhost`, `127.0.0.1` and
    /// `::1` plus the given names and addresses, valid from now for `days`. The common
    /// name is the first DNS name.
    pub fn server(dns_names: &[String], ips: &[IpAddr], days: u32) -> Self {
        let mut dns_sans = vec!["localhost".to_owned()];
        for name in dns_names {
            if !dns_sans.contains(name) {
                dns_sans.push(name.clone());
            }
        }
        let mut ip_sans = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        for ip in ips {
            if !ip_sans.contains(ip) {
                ip_sans.push(*ip);
            }
        }
        Self {
            common_name: dns_sans[0].clone(),
            dns_sans,
            ip_sans,
            eku: vec![Eku::ServerAuth],
            ..Self::valid_for(days)
        }
    }

    /// No names, no EKU, valid from now (less the clock-skew allowance) for `days`.
    fn valid_for(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: String::new(),
            uri_sans: Vec::new(),
            dns_sans: Vec::new(),
            ip_sans: Vec::new(),
            eku: Vec::new(),
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: now + Duration::days(i64::from(days)),
            serial: None,
            is_ca: false,
        }
    }

    /// The rcgen parameters and the serial they carry.
    fn to_params(&self) -> Result<(CertificateParams, u64), PkiError> {
        let serial = match self.serial {
            Some(serial) => serial,
            None => random_serial()?,
        };
        let mut params = CertificateParams::default();
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        params.distinguished_name = DistinguishedName::new();
        if !self.common_name.is_empty() {
            params
                .distinguished_name
                .push(DnType::CommonName, self.common_name.as_str());
        }
        for uri in &self.uri_sans {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        for name in &self.dns_sans {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        params
            .subject_alt_names
            .extend(self.ip_sans.iter().copied().map(SanType::IpAddress));
        params.extended_key_usages = self
            .eku
            .iter()
            .map(|eku| match eku {
                Eku::ClientAuth => ExtendedKeyUsagePurpose::ClientAuth,
                Eku::ServerAuth => ExtendedKeyUsagePurpose::ServerAuth,
            })
            .collect();
        if self.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
            ];
        } else {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        params.use_authority_key_identifier_extension = true;
        Ok((params, serial))
    }
}

/// `spiffe://<trust_domain>/<role>/<id>`.
fn spiffe_id(trust_domain: &str, role: &str, id: &str) -> String {
    format!("spiffe://{trust_domain}/{role}/{id}")
}

/// A random serial in `[2^62, 2^63)`: positive, never zero, always 16 hex digits.
fn random_serial() -> Result<u64, PkiError> {
    let mut bytes = [0u8; 8];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Generate(rcgen::Error::RingUnspecified))?;
    Ok((u64::from_be_bytes(bytes) >> 2) | (1 << 62))
}

// === Issued ===

/// A freshly made certificate and its private key.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The serial in canonical form (see [`canonical_serial_hex`]).
    pub serial_hex: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
}

impl fmt::Debug for Issued {
    /// Leaves the private key out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("serial_hex", &self.serial_hex)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

/// A certificate for `spec`, signed by its own fresh key: trusted by nobody.
pub fn self_signed(spec: &CertSpec) -> Result<Issued, PkiError> {
    let (params, serial) = spec.to_params()?;
    let key = new_key()?;
    let cert = params.self_signed(&key)?;
    Ok(issued(cert, &key, serial))
}

fn new_key() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

fn issued(cert: rcgen::Certificate, key: &KeyPair, serial: u64) -> Issued {
    Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        serial_hex: format!("{serial:x}"),
        cert_der: cert.der().clone(),
    }
}

// === Ca ===

/// A certificate authority that can issue certificates and sign CRLs.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// One entry of a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The revoked certificate's serial, hex (any form [`canonical_serial_hex`] takes).
    pub serial_hex: String,
    /// When it was revoked.
    pub revoked_at: OffsetDateTime,
}

impl Ca {
    /// A new self-signed CA named `common_name`, valid from now for `days`, with no
    /// path length limit (tests may build intermediates from it with
    /// [`CertSpec::is_ca`] and [`Ca::load`]).
    pub fn generate(common_name: &str, days: u32) -> Result<Self, PkiError> {
        let spec = CertSpec {
            common_name: common_name.to_owned(),
            is_ca: true,
            ..CertSpec::valid_for(days)
        };
        let (mut params, _serial) = spec.to_params()?;
        // A root has no authority key identifier of its own to point at.
        params.use_authority_key_identifier_extension = false;
        let key = new_key()?;
        let cert = params.self_signed(&key)?;
        Self::load(&cert.pem(), &key.serialize_pem())
    }

    /// Loads an existing CA from PEM to keep issuing. Refuses a certificate that is not a
    /// CA, that may not sign certificates, or whose public key is not `key_pem`'s.
    /// Errors are [`PkiError::BadCa`].
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let bad = |reason: &str| PkiError::BadCa(reason.to_owned());
        let cert_der =
            pem_to_der(cert_pem, "CERTIFICATE").ok_or_else(|| bad("no PEM CERTIFICATE block"))?;
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadCa(format!("private key: {e}")))?;
        {
            let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
                .map_err(|e| PkiError::BadCa(format!("certificate: {e}")))?;
            if !cert.is_ca() {
                return Err(bad("certificate is not a CA (basicConstraints CA:TRUE)"));
            }
            let usage = cert
                .key_usage()
                .map_err(|e| PkiError::BadCa(format!("key usage: {e}")))?;
            if usage.is_some_and(|u| !u.value.key_cert_sign()) {
                return Err(bad("certificate's key usage lacks keyCertSign"));
            }
            if cert.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(bad("private key does not match the certificate"));
            }
        }
        let cert_der = CertificateDer::from(cert_der);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`; errors name the file.
    pub fn load_from_dir(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let cert_pem = read_to_string(&cert_path)?;
        let key_pem = read_to_string(&dir.join(CA_KEY_FILE))?;
        Self::load(&cert_pem, &key_pem).map_err(|e| match e {
            PkiError::BadCa(problem) => PkiError::BadFile {
                path: cert_path,
                problem,
            },
            other => other,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A certificate for `spec` with a fresh key, signed by this CA.
    pub fn issue(&self, spec: &CertSpec) -> Result<Issued, PkiError> {
        let (params, serial) = spec.to_params()?;
        let key = new_key()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(issued(cert, &key, serial))
    }

    /// A PEM CRL listing `revoked`, numbered `crl_number`, issued now and current for
    /// `next_update_days`.
    pub fn crl(
        &self,
        revoked: &[Revocation],
        crl_number: u64,
        next_update_days: u32,
    ) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        self.crl_at(
            revoked,
            crl_number,
            now,
            now + Duration::days(i64::from(next_update_days)),
        )
    }

    /// A PEM CRL with explicit dates, e.g. a stale one for a test.
    pub fn crl_at(
        &self,
        revoked: &[Revocation],
        crl_number: u64,
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, PkiError> {
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial_bytes(&r.serial_hex)?),
                    revocation_time: r.revoked_at,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

impl fmt::Debug for Ca {
    /// Leaves the private key out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

// === serial numbers ===

/// The canonical text of a serial number, as sgw shows and compares it: lowercase hex,
/// no separators, no leading zeros (`"0"` for zero). Accepts upper case, `:` separators
/// (as openssl prints them) and leading zeros; refuses anything else, and serials over
/// 20 bytes (RFC 5280's limit).
pub fn canonical_serial_hex(serial: &str) -> Result<String, PkiError> {
    let bad = || PkiError::BadSerial(serial.to_owned());
    let digits: String = serial
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let trimmed = digits.trim_start_matches('0');
    if trimmed.len() > 40 {
        return Err(bad());
    }
    Ok(if trimmed.is_empty() { "0" } else { trimmed }.to_owned())
}

/// The canonical serial text (see [`canonical_serial_hex`]) of a serial's big-endian
/// bytes, e.g. x509-parser's `raw_serial()`, which may carry a leading zero byte.
pub fn serial_hex_from_bytes(raw: &[u8]) -> String {
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() { "0" } else { trimmed }.to_owned()
}

/// The canonical serial of the first certificate in `cert_pem`.
pub fn serial_hex_of_pem(cert_pem: &str) -> Result<String, PkiError> {
    let der = pem_to_der(cert_pem, "CERTIFICATE")
        .ok_or_else(|| PkiError::BadCertificate("no PEM CERTIFICATE block".to_owned()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    Ok(serial_hex_from_bytes(cert.raw_serial()))
}

/// A serial's minimal big-endian bytes.
fn serial_bytes(serial: &str) -> Result<Vec<u8>, PkiError> {
    let canonical = canonical_serial_hex(serial)?;
    let padded = if canonical.len() % 2 == 1 {
        format!("0{canonical}")
    } else {
        canonical
    };
    (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| PkiError::BadSerial(serial.to_owned()))
}

/// The contents of the first PEM block labelled `label`.
fn pem_to_der(pem: &str, label: &str) -> Option<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .find(|block| block.label == label)
        .map(|block| block.contents)
}

// === PKI directories ===

/// Where a leaf certificate and its key are, and the certificate's serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFiles {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// The private key, PKCS#8 PEM, mode 0600.
    pub key: PathBuf,
    /// The certificate's canonical serial (see [`canonical_serial_hex`]).
    pub serial_hex: String,
}

/// A client identity's files in a PKI directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    /// The caller's role.
    pub role: Role,
    /// The caller's id, as in its SPIFFE id.
    pub id: PrincipalId,
    /// `spiffe://<trust-domain>/<role>/<id>`.
    pub spiffe_id: String,
    /// The certificate and key.
    pub files: LeafFiles,
}

/// What [`init_dev_pki`] left in its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// The PKI directory.
    pub dir: PathBuf,
    /// The trust domain of every client identity.
    pub trust_domain: String,
    /// `ca.pem`.
    pub ca_cert: PathBuf,
    /// `ca.key`.
    pub ca_key: PathBuf,
    /// `crl.pem`.
    pub crl: PathBuf,
    /// `server.pem` and `server.key`.
    pub server: LeafFiles,
    /// One entry per requested identity, in the order given.
    pub identities: Vec<IdentityFiles>,
    /// The files this call wrote; the others already existed and were kept.
    pub written: Vec<PathBuf>,
}

/// The file stem of a client identity: `<role>-<id>`, e.g. `agency-police-met`.
pub fn identity_file_stem(role: Role, id: &PrincipalId) -> String {
    format!("{}-{}", role.as_str(), id.as_str())
}

/// Creates a development PKI in `dir` where absent: CA, server certificate (localhost),
/// one client certificate per identity, `pki.toml`, `revoked.toml` and an empty CRL.
///
/// Files that exist are kept unless `force`, so calling this again is harmless; a new
/// CA (first run, or `force`) reissues every leaf and starts an empty revocation list.
/// Refuses a `dir` whose `pki.toml` names another trust domain, or that holds only one
/// of `ca.pem` and `ca.key`, unless `force`.
pub fn init_dev_pki(
    dir: &Path,
    trust_domain: &str,
    identities: &[(Role, &str)],
    force: bool,
) -> Result<DevPki, PkiError> {
    check_trust_domain(trust_domain)?;
    let identities = identities
        .iter()
        .map(|(role, id)| Ok((*role, PrincipalId::parse(id)?)))
        .collect::<Result<Vec<_>, PkiError>>()?;
    fs::create_dir_all(dir).map_err(io_error(dir))?;

    let state_path = dir.join(PKI_STATE_FILE);
    let recorded = read_state(&state_path)?;
    if let Some(recorded) = &recorded {
        if recorded.trust_domain != trust_domain && !force {
            return Err(PkiError::TrustDomainMismatch {
                path: state_path,
                recorded: recorded.trust_domain.clone(),
                requested: trust_domain.to_owned(),
            });
        }
    }

    let mut written = Vec::new();
    let ca_cert = dir.join(CA_CERT_FILE);
    let ca_key = dir.join(CA_KEY_FILE);
    let (ca, fresh_ca) = match (exists(&ca_cert)?, exists(&ca_key)?, force) {
        (true, true, false) => (Ca::load_from_dir(dir)?, false),
        (true, false, false) => {
            return Err(PkiError::IncompleteCa {
                present: ca_cert,
                missing: ca_key,
            })
        }
        (false, true, false) => {
            return Err(PkiError::IncompleteCa {
                present: ca_key,
                missing: ca_cert,
            })
        }
        _ => {
            let ca = Ca::generate(&dev_ca_name()?, DEV_CA_DAYS)?;
            write_key(&ca_key, ca.key_pem())?;
            write_public(&ca_cert, ca.cert_pem())?;
            written.extend([ca_key.clone(), ca_cert.clone()]);
            (ca, true)
        }
    };
    let rewrite = force || fresh_ca;

    if rewrite || recorded.as_ref().map(|r| r.trust_domain.as_str()) != Some(trust_domain) {
        let state = PkiState {
            trust_domain: trust_domain.to_owned(),
        };
        write_public(&state_path, &to_toml(&state, PKI_STATE_HEADER))?;
        written.push(state_path);
    }

    let server_cert = dir.join(SERVER_CERT_FILE);
    let server_key = dir.join(SERVER_KEY_FILE);
    let server = leaf_where_absent(&server_cert, &server_key, rewrite, &mut written, || {
        ca.issue(&CertSpec::server(&[], &[], DEFAULT_LEAF_DAYS))
    })?;

    let mut identity_files = Vec::with_capacity(identities.len());
    for (role, id) in identities {
        let stem = identity_file_stem(role, &id);
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        let files = leaf_where_absent(&cert, &key, rewrite, &mut written, || {
            ca.issue(&CertSpec::client(
                trust_domain,
                role,
                id.as_str(),
                DEFAULT_LEAF_DAYS,
            ))
        })?;
        identity_files.push(IdentityFiles {
            role,
            spiffe_id: spiffe_id(trust_domain, role.as_str(), id.as_str()),
            id,
            files,
        });
    }

    let crl = dir.join(CRL_FILE);
    let revoked_path = dir.join(REVOKED_FILE);
    if rewrite || !exists(&crl)? || !exists(&revoked_path)? {
        let list = if rewrite {
            RevokedList::default()
        } else {
            read_revoked(&revoked_path, &crl)?
        };
        write_crl(&ca, dir, list, &mut written)?;
    }

    Ok(DevPki {
        dir: dir.to_owned(),
        trust_domain: trust_domain.to_owned(),
        ca_cert,
        ca_key,
        crl,
        server,
        identities: identity_files,
        written,
    })
}

/// Issues a client certificate for `spiffe://<trust_domain>/<role>/<id>` from the CA
/// in `ca_dir`, written there as `<role>-<id>.pem` and `.key`. Without `trust_domain`,
/// uses the one in `ca_dir/pki.toml`. Refuses to replace an existing certificate or key
/// unless `force`.
pub fn issue_to_dir(
    ca_dir: &Path,
    trust_domain: Option<&str>,
    role: Role,
    id: &str,
    days: u32,
    force: bool,
) -> Result<LeafFiles, PkiError> {
    let trust_domain = match trust_domain {
        Some(td) => td.to_owned(),
        None => read_trust_domain(ca_dir)?,
    };
    check_trust_domain(&trust_domain)?;
    let id = PrincipalId::parse(id)?;
    let stem = identity_file_stem(role, &id);
    let cert = ca_dir.join(format!("{stem}.pem"));
    let key = ca_dir.join(format!("{stem}.key"));
    if !force {
        for path in [&cert, &key] {
            if exists(path)? {
                return Err(PkiError::Exists(path.clone()));
            }
        }
    }
    let ca = Ca::load_from_dir(ca_dir)?;
    let issued = ca.issue(&CertSpec::client(&trust_domain, role, id.as_str(), days))?;
    write_leaf(&cert, &key, &issued)
}

/// Replaces `server.pem` and `server.key` in `ca_dir` with a new pair from its CA,
/// for localhost plus `dns` and `ips`, valid for `days`. Each file is replaced
/// atomically, key first (see the module documentation).
pub fn renew_server(
    ca_dir: &Path,
    days: u32,
    dns: &[String],
    ips: &[IpAddr],
) -> Result<LeafFiles, PkiError> {
    let ca = Ca::load_from_dir(ca_dir)?;
    let issued = ca.issue(&CertSpec::server(dns, ips, days))?;
    write_leaf(
        &ca_dir.join(SERVER_CERT_FILE),
        &ca_dir.join(SERVER_KEY_FILE),
        &issued,
    )
}

/// Adds `serial_hex` to `ca_dir/revoked.toml` (once: revoking again keeps the first
/// time) and rewrites `ca_dir/crl.pem` with the next CRL number. Returns the CRL's path.
pub fn revoke_in_dir(ca_dir: &Path, serial_hex: &str) -> Result<PathBuf, PkiError> {
    let serial = canonical_serial_hex(serial_hex)?;
    let ca = Ca::load_from_dir(ca_dir)?;
    let crl = ca_dir.join(CRL_FILE);
    let mut list = read_revoked(&ca_dir.join(REVOKED_FILE), &crl)?;
    if !list.revoked.iter().any(|r| r.serial == serial) {
        list.revoked.push(RevokedEntry {
            serial,
            revoked_at: format_time(whole_seconds(OffsetDateTime::now_utc())),
        });
    }
    write_crl(&ca, ca_dir, list, &mut Vec::new())?;
    Ok(crl)
}

/// The trust domain recorded in `ca_dir/pki.toml` by [`init_dev_pki`].
pub fn read_trust_domain(ca_dir: &Path) -> Result<String, PkiError> {
    let path = ca_dir.join(PKI_STATE_FILE);
    match read_state(&path)? {
        Some(state) => Ok(state.trust_domain),
        None => Err(PkiError::TrustDomainUnknown(path)),
    }
}

// === errors ===

/// Why a certificate could not be made, loaded or written.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// A file exists but its contents are unusable.
    #[error("{}: {problem}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A CA certificate and key given in memory are unusable.
    #[error("not a usable CA: {0}")]
    BadCa(String),
    /// A certificate given in memory is unusable.
    #[error("not a usable certificate: {0}")]
    BadCertificate(String),
    /// rcgen refused the request (e.g. a name that is not IA5) or key generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A serial number that is not hex.
    #[error("{0:?} is not a serial number: use up to 40 hex digits, ':' separators allowed")]
    BadSerial(String),
    /// A trust domain that SPIFFE does not allow.
    #[error(
        "{0:?} is not a trust domain: use a lowercase DNS name (labels of a-z, 0-9 and '-', joined by '.')"
    )]
    BadTrustDomain(String),
    /// An identity id outside `[a-z0-9-]{1,64}`.
    #[error(transparent)]
    BadId(#[from] IdError),
    /// The directory was made for another trust domain.
    #[error("{} records trust domain {recorded:?}, not {requested:?}; use --force to start over", path.display())]
    TrustDomainMismatch {
        /// `pki.toml`.
        path: PathBuf,
        /// The trust domain in it.
        recorded: String,
        /// The trust domain asked for.
        requested: String,
    },
    /// No `pki.toml` to say which trust domain the CA serves.
    #[error("{} not found: give the trust domain explicitly", .0.display())]
    TrustDomainUnknown(PathBuf),
    /// Only half of the CA is on disk.
    #[error("{} exists but {} does not; restore it or use --force to make a new CA", present.display(), missing.display())]
    IncompleteCa {
        /// The CA file that exists.
        present: PathBuf,
        /// The CA file that is missing.
        missing: PathBuf,
    },
    /// Refused to replace an existing file.
    #[error("{} exists; use --force to replace it", .0.display())]
    Exists(PathBuf),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

// === files ===

const PKI_STATE_HEADER: &str =
    "# Written by `sgw certs init`; `sgw certs issue` reads the trust domain from here.\n";
const REVOKED_HEADER: &str =
    "# Written by `sgw certs revoke`; crl.pem is generated from this list.\n";

/// `pki.toml`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PkiState {
    trust_domain: String,
}

/// `revoked.toml`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokedList {
    /// The number of the last CRL written.
    crl_number: u64,
    #[serde(default)]
    revoked: Vec<RevokedEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokedEntry {
    /// Canonical serial hex.
    serial: String,
    /// RFC 3339.
    revoked_at: String,
}

fn read_state(path: &Path) -> Result<Option<PkiState>, PkiError> {
    let Some(text) = read_if_exists(path)? else {
        return Ok(None);
    };
    let state: PkiState = from_toml(path, &text)?;
    check_trust_domain(&state.trust_domain).map_err(|e| PkiError::BadFile {
        path: path.to_owned(),
        problem: e.to_string(),
    })?;
    Ok(Some(state))
}

/// The revocation list; if `revoked.toml` is missing, an empty one that continues the
/// numbering of an existing `crl.pem`.
fn read_revoked(path: &Path, crl: &Path) -> Result<RevokedList, PkiError> {
    if let Some(text) = read_if_exists(path)? {
        return from_toml(path, &text);
    }
    let crl_number = match read_if_exists(crl)? {
        Some(pem) => crl_number_of(&pem).ok_or_else(|| PkiError::BadFile {
            path: crl.to_owned(),
            problem: "not a CRL with a CRL number".to_owned(),
        })?,
        None => 0,
    };
    Ok(RevokedList {
        crl_number,
        revoked: Vec::new(),
    })
}

fn crl_number_of(pem: &str) -> Option<u64> {
    let der = pem_to_der(pem, "X509 CRL")?;
    let (_, crl) = x509_parser::parse_x509_crl(&der).ok()?;
    u64::try_from(crl.crl_number()?).ok()
}

/// Bumps the CRL number, then writes `revoked.toml` and `crl.pem` in `dir`.
fn write_crl(
    ca: &Ca,
    dir: &Path,
    mut list: RevokedList,
    written: &mut Vec<PathBuf>,
) -> Result<(), PkiError> {
    let revoked_path = dir.join(REVOKED_FILE);
    list.crl_number += 1;
    let revocations = list
        .revoked
        .iter()
        .map(|entry| {
            let bad = |problem: String| PkiError::BadFile {
                path: revoked_path.clone(),
                problem,
            };
            Ok(Revocation {
                serial_hex: canonical_serial_hex(&entry.serial).map_err(|e| bad(e.to_string()))?,
                revoked_at: OffsetDateTime::parse(
                    &entry.revoked_at,
                    &time::format_description::well_known::Rfc3339,
                )
                .map_err(|e| bad(format!("revoked_at {:?}: {e}", entry.revoked_at)))?,
            })
        })
        .collect::<Result<Vec<_>, PkiError>>()?;
    let crl_pem = ca.crl(&revocations, list.crl_number, DEV_CRL_DAYS)?;
    // The list first: if the CRL write fails, the next revoke still knows every serial.
    write_public(&revoked_path, &to_toml(&list, REVOKED_HEADER))?;
    let crl_path = dir.join(CRL_FILE);
    write_public(&crl_path, &crl_pem)?;
    written.extend([revoked_path, crl_path]);
    Ok(())
}

/// Keeps an existing leaf pair unless `rewrite`; otherwise issues and writes one.
fn leaf_where_absent(
    cert: &Path,
    key: &Path,
    rewrite: bool,
    written: &mut Vec<PathBuf>,
    issue: impl FnOnce() -> Result<Issued, PkiError>,
) -> Result<LeafFiles, PkiError> {
    if !rewrite && exists(cert)? && exists(key)? {
        let pem = read_to_string(cert)?;
        let serial_hex = serial_hex_of_pem(&pem).map_err(|e| PkiError::BadFile {
            path: cert.to_owned(),
            problem: e.to_string(),
        })?;
        return Ok(LeafFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            serial_hex,
        });
    }
    let files = write_leaf(cert, key, &issue()?)?;
    written.extend([files.key.clone(), files.cert.clone()]);
    Ok(files)
}

/// Writes the key, then the certificate.
fn write_leaf(cert: &Path, key: &Path, issued: &Issued) -> Result<LeafFiles, PkiError> {
    write_key(key, &issued.key_pem)?;
    write_public(cert, &issued.cert_pem)?;
    Ok(LeafFiles {
        cert: cert.to_owned(),
        key: key.to_owned(),
        serial_hex: issued.serial_hex.clone(),
    })
}

fn write_key(path: &Path, pem: &str) -> Result<(), PkiError> {
    write_atomically(path, pem.as_bytes(), 0o600)
}

fn write_public(path: &Path, text: &str) -> Result<(), PkiError> {
    write_atomically(path, text.as_bytes(), 0o644)
}

/// Writes `contents` to a new temporary file in `path`'s folder, created with `mode`,
/// syncs it, renames it over `path` and syncs the folder.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |name| name.to_string_lossy().into_owned());
    let mut nonce = [0u8; 8];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| PkiError::Generate(rcgen::Error::RingUnspecified))?;
    let tmp = dir.join(format!(
        ".{name}.{}.{:016x}.tmp",
        std::process::id(),
        u64::from_be_bytes(nonce)
    ));

    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        #[cfg(not(unix))]
        let _ = mode;
        let mut file = options.open(&tmp).map_err(io_error(&tmp))?;
        file.write_all(contents).map_err(io_error(&tmp))?;
        file.sync_all().map_err(io_error(&tmp))?;
        fs::rename(&tmp, path).map_err(io_error(path))
    })();
    if result.is_err() {
        // Best effort: the error being returned is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    result?;
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))?;
    Ok(())
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(io_error(path))
}

fn read_if_exists(path: &Path) -> Result<Option<String>, PkiError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(io_error(path))
}

fn from_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, PkiError> {
    toml::from_str(text).map_err(|e| PkiError::BadFile {
        path: path.to_owned(),
        problem: e.message().to_owned(),
    })
}

fn to_toml<T: Serialize>(value: &T, header: &str) -> String {
    let body = toml::to_string(value)
        .expect("the state files hold only strings, integers and arrays of tables");
    format!("{header}{body}")
}

/// `t` without its fraction of a second: certificates and CRLs carry whole seconds.
fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t - Duration::nanoseconds(i64::from(t.nanosecond()))
}

fn format_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("the clock's year has four digits, which RFC 3339 can express")
}

/// SPIFFE trust domain names: 1 to 255 characters from `[a-z0-9._-]`.
/// The trust domain must be one the gateway's config accepts (a lowercase DNS
/// name), or every identity issued under it would be refused.
fn check_trust_domain(td: &str) -> Result<(), PkiError> {
    if crate::config::dns_name_problem(td).is_none() {
        Ok(())
    } else {
        Err(PkiError::BadTrustDomain(td.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use rustls::server::WebPkiClientVerifier;
    use rustls::{CertificateError, RootCertStore};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateRevocationListDer, UnixTime};
    use x509_parser::certificate::X509Certificate;
    use x509_parser::extensions::GeneralName;

    const TD: &str = "safeguarding.example";

    #[test]
    fn trust_domains_are_what_the_config_accepts() {
        for good in [TD, "la-07.gov.uk", "x"] {
            assert!(check_trust_domain(good).is_ok(), "{good}");
        }
        // Each would issue identities that no config could register.
        for bad in [
            "my_org",
            ".example",
            "a..b",
            "example.",
            "Upper.example",
            "",
        ] {
            assert!(
                matches!(check_trust_domain(bad), Err(PkiError::BadTrustDomain(_))),
                "{bad}"
            );
        }
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        x509_parser::parse_x509_certificate(der).expect("parses").1
    }

    /// What the gateway's TLS layer will do: rustls's WebPKI client verifier with the
    /// CA as the only root and the given CRLs.
    fn verify_client(ca: &Ca, leaf: &Issued, crls: &[&str]) -> Result<(), rustls::Error> {
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.cert_der().clone())
            .expect("CA is a valid root");
        let crls = crls
            .iter()
            .map(|pem| {
                CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).expect("CRL PEM")
            })
            .collect::<Vec<_>>();
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .with_crls(crls)
        .build()
        .expect("verifier builds");
        verifier
            .verify_client_cert(&leaf.cert_der, &[], UnixTime::now())
            .map(|_| ())
    }

    fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
        cert.subject_alternative_name()
            .expect("SAN parses")
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .map(|name| match name {
                        GeneralName::URI(uri) => format!("URI:{uri}"),
                        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
                        GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
                        other => format!("other:{other:?}"),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn client_certificate_carries_exactly_its_spiffe_id_and_client_auth() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let leaf = ca
            .issue(&CertSpec::client(TD, Role::Agency, "police-met", 30))
            .unwrap();
        let cert = parse(&leaf.cert_der);

        assert_eq!(
            sans(&cert),
            ["URI:spiffe://safeguarding.example/agency/police-met"]
        );
        let eku = cert
            .extended_key_usage()
            .unwrap()
            .expect("EKU present")
            .value;
        assert!(eku.client_auth);
        assert!(!eku.server_auth && !eku.any && eku.other.is_empty());
        assert!(!cert.is_ca());
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "agency police-met");
        assert_eq!(serial_hex_from_bytes(cert.raw_serial()), leaf.serial_hex);
        assert_eq!(serial_hex_of_pem(&leaf.cert_pem).unwrap(), leaf.serial_hex);

        let ca_cert = parse(ca.cert_der());
        cert.verify_signature(Some(ca_cert.public_key()))
            .expect("signed by the CA");
        verify_client(&ca, &leaf, &[]).expect("rustls accepts it");
    }

    #[test]
    fn ca_can_sign_certificates_and_crls() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let cert = parse(ca.cert_der());
        assert!(cert.is_ca());
        let usage = cert.key_usage().unwrap().expect("key usage present").value;
        assert!(usage.key_cert_sign() && usage.crl_sign());
        cert.verify_signature(None).expect("self-signed");
    }

    #[test]
    fn leaf_signed_by_another_ca_is_refused() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let other = Ca::generate("other CA", 30).unwrap();
        let leaf = other
            .issue(&CertSpec::client(TD, Role::Agency, "police-met", 30))
            .unwrap();
        assert_eq!(
            verify_client(&ca, &leaf, &[]),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        );
    }

    #[test]
    fn self_signed_client_is_refused() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let leaf = self_signed(&CertSpec::client(TD, Role::Agency, "police-met", 30)).unwrap();
        let cert = parse(&leaf.cert_der);
        cert.verify_signature(None).expect("signed by its own key");
        assert_eq!(
            verify_client(&ca, &leaf, &[]),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        );
    }

    #[test]
    fn empty_eku_list_means_no_eku_extension() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let spec = CertSpec {
            eku: Vec::new(),
            ..CertSpec::client(TD, Role::Agency, "police-met", 30)
        };
        let leaf = ca.issue(&spec).unwrap();
        assert!(parse(&leaf.cert_der)
            .extended_key_usage()
            .unwrap()
            .is_none());
    }

    #[test]
    fn server_auth_only_certificate_is_refused_as_a_client() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let spec = CertSpec {
            eku: vec![Eku::ServerAuth],
            ..CertSpec::client(TD, Role::Agency, "police-met", 30)
        };
        let leaf = ca.issue(&spec).unwrap();
        assert!(verify_client(&ca, &leaf, &[]).is_err());
    }

    #[test]
    fn expired_spec_gives_an_expired_certificate() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let now = OffsetDateTime::now_utc();
        let spec = CertSpec {
            not_before: now - Duration::days(10),
            not_after: now - Duration::days(1),
            ..CertSpec::client(TD, Role::Agency, "police-met", 30)
        };
        let leaf = ca.issue(&spec).unwrap();
        assert!(!parse(&leaf.cert_der).validity().is_valid());
        let err = verify_client(&ca, &leaf, &[]).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn explicit_serial_is_used() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let spec = CertSpec {
            serial: Some(0xdead_beef),
            ..CertSpec::client(TD, Role::Auditor, "dpo", 30)
        };
        let leaf = ca.issue(&spec).unwrap();
        assert_eq!(leaf.serial_hex, "deadbeef");
        assert_eq!(
            serial_hex_from_bytes(parse(&leaf.cert_der).raw_serial()),
            "deadbeef"
        );
    }

    #[test]
    fn random_serials_are_positive_and_sixteen_digits() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let spec = CertSpec::client(TD, Role::Operator, "ops", 30);
        let a = ca.issue(&spec).unwrap();
        let b = ca.issue(&spec).unwrap();
        assert_ne!(a.serial_hex, b.serial_hex);
        for leaf in [a, b] {
            assert_eq!(leaf.serial_hex.len(), 16, "{}", leaf.serial_hex);
            assert_eq!(
                serial_hex_from_bytes(parse(&leaf.cert_der).raw_serial()),
                leaf.serial_hex
            );
        }
    }

    #[test]
    fn server_certificate_names_localhost_and_extra_names() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let spec = CertSpec::server(
            &["sgw.internal".to_owned()],
            &["10.0.0.7".parse().unwrap()],
            30,
        );
        let leaf = ca.issue(&spec).unwrap();
        let cert = parse(&leaf.cert_der);
        let names = sans(&cert);
        for expected in [
            "DNS:localhost",
            "DNS:sgw.internal",
            "IP:[127, 0, 0, 1]",
            "IP:[10, 0, 0, 7]",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
        assert_eq!(names.len(), 5, "{names:?}");
        let eku = cert
            .extended_key_usage()
            .unwrap()
            .expect("EKU present")
            .value;
        assert!(eku.server_auth && !eku.client_auth);
    }

    #[test]
    fn crl_lists_the_revoked_serial_and_rustls_refuses_it() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let revoked = ca
            .issue(&CertSpec::client(TD, Role::Agency, "police-met", 30))
            .unwrap();
        let kept = ca
            .issue(&CertSpec::client(TD, Role::Agency, "health-guys", 30))
            .unwrap();
        let crl_pem = ca
            .crl(
                &[Revocation {
                    serial_hex: revoked.serial_hex.clone(),
                    revoked_at: OffsetDateTime::now_utc(),
                }],
                7,
                30,
            )
            .unwrap();

        let der = pem_to_der(&crl_pem, "X509 CRL").expect("CRL PEM");
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        let serials: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| serial_hex_from_bytes(r.raw_serial()))
            .collect();
        assert_eq!(serials, [revoked.serial_hex.as_str()]);
        assert_eq!(crl_number_of(&crl_pem), Some(7));
        crl.verify_signature(parse(ca.cert_der()).public_key())
            .expect("CRL signed by the CA");

        assert_eq!(
            verify_client(&ca, &revoked, &[&crl_pem]),
            Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
        );
        verify_client(&ca, &kept, &[&crl_pem]).expect("unrevoked still accepted");
    }

    #[test]
    fn loaded_ca_keeps_issuing_under_the_same_name_and_key() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let again = Ca::load(ca.cert_pem(), ca.key_pem()).unwrap();
        let leaf = again
            .issue(&CertSpec::client(TD, Role::Agency, "police-met", 30))
            .unwrap();
        verify_client(&ca, &leaf, &[]).expect("chains to the original CA");
    }

    #[test]
    fn load_refuses_a_mismatched_key_or_a_leaf() {
        let ca = Ca::generate("test CA", 30).unwrap();
        let other = Ca::generate("other CA", 30).unwrap();
        assert!(matches!(
            Ca::load(ca.cert_pem(), other.key_pem()),
            Err(PkiError::BadCa(_))
        ));
        let leaf = ca
            .issue(&CertSpec::client(TD, Role::Agency, "police-met", 30))
            .unwrap();
        assert!(matches!(
            Ca::load(&leaf.cert_pem, &leaf.key_pem),
            Err(PkiError::BadCa(_))
        ));
        assert!(matches!(
            Ca::load("not pem", ca.key_pem()),
            Err(PkiError::BadCa(_))
        ));
    }

    #[test]
    fn intermediate_made_from_a_ca_spec_can_issue() {
        let root = Ca::generate("root", 30).unwrap();
        let spec = CertSpec {
            common_name: "intermediate".to_owned(),
            uri_sans: Vec::new(),
            eku: Vec::new(),
            is_ca: true,
            ..CertSpec::client(TD, Role::Agency, "unused", 30)
        };
        let mid = root.issue(&spec).unwrap();
        let mid = Ca::load(&mid.cert_pem, &mid.key_pem).unwrap();
        let leaf = mid
            .issue(&CertSpec::client(TD, Role::Agency, "police-met", 30))
            .unwrap();

        let mut roots = RootCertStore::empty();
        roots.add(root.cert_der().clone()).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&leaf.cert_der, &[mid.cert_der().clone()], UnixTime::now())
            .expect("chain through the intermediate");
    }

    #[test]
    fn serial_text_is_canonicalised() {
        assert_eq!(canonical_serial_hex("00:DE:AD:be:ef").unwrap(), "deadbeef");
        assert_eq!(canonical_serial_hex("0abc").unwrap(), "abc");
        assert_eq!(canonical_serial_hex("000").unwrap(), "0");
        for bad in ["", ":", "xyz", "12 34", &"1".repeat(41)] {
            assert!(
                matches!(canonical_serial_hex(bad), Err(PkiError::BadSerial(_))),
                "{bad:?}"
            );
        }
        assert_eq!(serial_hex_from_bytes(&[0x00, 0x8a, 0x01]), "8a01");
        assert_eq!(serial_hex_from_bytes(&[0x00]), "0");
        assert_eq!(serial_bytes("abc").unwrap(), [0x0a, 0xbc]);
    }

    const IDENTITIES: &[(Role, &str)] = &[
        (Role::Agency, "police-met"),
        (Role::Auditor, "dpo"),
        (Role::Operator, "ops"),
    ];

    /// The CA rollover of the runbook, with development CAs: the old CA's CRL in
    /// force, both CAs trusted, a certificate of the new one accepted. A CRL is
    /// matched by its issuer's name, so two dev CAs of one name failed this with
    /// `BadSignature`.
    #[test]
    fn a_second_dev_ca_is_trusted_beside_the_first_and_its_crl() {
        let (old_dir, new_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init_dev_pki(old_dir.path(), TD, IDENTITIES, false).unwrap();
        init_dev_pki(new_dir.path(), TD, IDENTITIES, false).unwrap();
        let read = |dir: &tempfile::TempDir, name: &str| {
            fs::read_to_string(dir.path().join(name)).unwrap()
        };
        let old = Ca::load(&read(&old_dir, "ca.pem"), &read(&old_dir, "ca.key")).unwrap();
        let new = Ca::load(&read(&new_dir, "ca.pem"), &read(&new_dir, "ca.key")).unwrap();
        let name = |ca: &Ca| parse(ca.cert_der()).subject().to_string();
        assert_ne!(name(&old), name(&new));
        assert!(
            name(&new).starts_with("CN=sgw development CA "),
            "{}",
            name(&new)
        );

        let mut roots = RootCertStore::empty();
        roots.add(old.cert_der().clone()).unwrap();
        roots.add(new.cert_der().clone()).unwrap();
        let old_crl = read(&old_dir, "crl.pem");
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .with_crls([CertificateRevocationListDer::from_pem_slice(old_crl.as_bytes()).unwrap()])
        // As the gateway's: a certificate whose issuer has no CRL is accepted.
        .allow_unknown_revocation_status()
        .build()
        .unwrap();
        let leaf = new
            .issue(&CertSpec::client(TD, Role::Agency, "police-met", 30))
            .unwrap();
        verifier
            .verify_client_cert(&leaf.cert_der, &[], UnixTime::now())
            .expect("a certificate of the new CA is accepted");
    }

    #[test]
    fn dev_pki_writes_every_file_with_keys_private() {
        let dir = tempfile::tempdir().unwrap();
        let pki = init_dev_pki(dir.path(), TD, IDENTITIES, false).unwrap();

        for name in [
            "ca.pem",
            "ca.key",
            "server.pem",
            "server.key",
            "agency-police-met.pem",
            "agency-police-met.key",
            "auditor-dpo.pem",
            "auditor-dpo.key",
            "operator-ops.pem",
            "operator-ops.key",
            "crl.pem",
            "pki.toml",
            "revoked.toml",
        ] {
            let path = dir.path().join(name);
            assert!(path.is_file(), "{name} missing");
            if name.ends_with(".key") {
                assert_eq!(mode(&path), 0o600, "{name}");
            } else {
                assert_eq!(mode(&path) & 0o600, 0o600, "{name}");
            }
        }
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        assert_eq!(pki.written.len(), 13);
        assert_eq!(
            pki.identities[1].spiffe_id,
            "spiffe://safeguarding.example/auditor/dpo"
        );
        let ca = Ca::load_from_dir(dir.path()).unwrap();
        let pem = fs::read_to_string(&pki.identities[0].files.cert).unwrap();
        let leaf = Issued {
            cert_der: CertificateDer::from_pem_slice(pem.as_bytes()).unwrap(),
            cert_pem: pem,
            key_pem: String::new(),
            serial_hex: pki.identities[0].files.serial_hex.clone(),
        };
        let crl = fs::read_to_string(&pki.crl).unwrap();
        verify_client(&ca, &leaf, &[&crl]).expect("dev client chains, CRL is valid");
        assert_eq!(read_trust_domain(dir.path()).unwrap(), TD);
    }

    #[test]
    fn dev_pki_twice_keeps_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let first = init_dev_pki(dir.path(), TD, IDENTITIES, false).unwrap();
        let before: Vec<String> = [
            "ca.pem",
            "ca.key",
            "server.key",
            "agency-police-met.key",
            "crl.pem",
        ]
        .iter()
        .map(|n| fs::read_to_string(dir.path().join(n)).unwrap())
        .collect();

        let second = init_dev_pki(dir.path(), TD, IDENTITIES, false).unwrap();
        assert!(second.written.is_empty(), "{:?}", second.written);
        assert_eq!(first.server, second.server);
        assert_eq!(first.identities, second.identities);
        let after: Vec<String> = [
            "ca.pem",
            "ca.key",
            "server.key",
            "agency-police-met.key",
            "crl.pem",
        ]
        .iter()
        .map(|n| fs::read_to_string(dir.path().join(n)).unwrap())
        .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn dev_pki_fills_in_a_missing_identity_from_the_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(dir.path(), TD, IDENTITIES, false).unwrap();
        fs::remove_file(dir.path().join("auditor-dpo.key")).unwrap();
        let ca_before = fs::read_to_string(dir.path().join("ca.pem")).unwrap();

        let again = init_dev_pki(dir.path(), TD, IDENTITIES, false).unwrap();
        assert_eq!(
            again.written,
            [
                dir.path().join("auditor-dpo.key"),
                dir.path().join("auditor-dpo.pem")
            ]
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
            ca_before
        );
    }

    #[test]
    fn dev_pki_force_makes_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = init_dev_pki(dir.path(), TD, IDENTITIES, false).unwrap();
        let ca_before = fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        let forced = init_dev_pki(dir.path(), "other.example", IDENTITIES, true).unwrap();
        assert_ne!(
            fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
            ca_before
        );
        assert_ne!(first.server.serial_hex, forced.server.serial_hex);
        assert_eq!(read_trust_domain(dir.path()).unwrap(), "other.example");
    }

    #[test]
    fn dev_pki_refuses_another_trust_domain_or_half_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(dir.path(), TD, IDENTITIES, false).unwrap();
        assert!(matches!(
            init_dev_pki(dir.path(), "other.example", IDENTITIES, false),
            Err(PkiError::TrustDomainMismatch { .. })
        ));
        fs::remove_file(dir.path().join("ca.key")).unwrap();
        let err = init_dev_pki(dir.path(), TD, IDENTITIES, false).unwrap_err();
        assert!(
            matches!(&err, PkiError::IncompleteCa { missing, .. } if missing.ends_with("ca.key")),
            "{err:?}"
        );
    }

    #[test]
    fn dev_pki_refuses_ids_that_are_not_file_names() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../escape", "Police", ""] {
            assert!(matches!(
                init_dev_pki(dir.path(), TD, &[(Role::Agency, bad)], false),
                Err(PkiError::BadId(_))
            ));
        }
        assert!(matches!(
            init_dev_pki(dir.path(), "Bad/Domain", IDENTITIES, false),
            Err(PkiError::BadTrustDomain(_))
        ));
        assert!(
            fs::read_dir(dir.path()).unwrap().next().is_none(),
            "nothing written"
        );
    }

    #[test]
    fn issue_to_dir_reads_the_trust_domain_and_will_not_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(dir.path(), TD, &[], false).unwrap();
        let files = issue_to_dir(dir.path(), None, Role::Agency, "school-42", 10, false).unwrap();
        assert_eq!(files.cert, dir.path().join("agency-school-42.pem"));
        assert_eq!(mode(&files.key), 0o600);
        let pem = fs::read_to_string(&files.cert).unwrap();
        let der = pem_to_der(&pem, "CERTIFICATE").unwrap();
        assert_eq!(
            sans(&parse(&der)),
            ["URI:spiffe://safeguarding.example/agency/school-42"]
        );

        let err = issue_to_dir(dir.path(), None, Role::Agency, "school-42", 10, false).unwrap_err();
        assert!(matches!(err, PkiError::Exists(_)), "{err:?}");
        let again = issue_to_dir(dir.path(), None, Role::Agency, "school-42", 10, true).unwrap();
        assert_ne!(again.serial_hex, files.serial_hex);
    }

    #[test]
    fn issue_to_dir_without_pki_toml_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(dir.path(), TD, &[], false).unwrap();
        fs::remove_file(dir.path().join(PKI_STATE_FILE)).unwrap();
        let err = issue_to_dir(dir.path(), None, Role::Agency, "x", 10, false).unwrap_err();
        assert!(matches!(&err, PkiError::TrustDomainUnknown(p) if p.ends_with("pki.toml")));
        issue_to_dir(dir.path(), Some(TD), Role::Agency, "x", 10, false).unwrap();
    }

    #[test]
    fn missing_ca_error_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = renew_server(dir.path(), 10, &[], &[]).unwrap_err();
        assert!(matches!(&err, PkiError::Io { path, .. } if path.ends_with("ca.pem")));
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }

    #[test]
    fn renew_server_replaces_the_pair() {
        let dir = tempfile::tempdir().unwrap();
        let pki = init_dev_pki(dir.path(), TD, &[], false).unwrap();
        let renewed = renew_server(dir.path(), 10, &["gw.example".to_owned()], &[]).unwrap();
        assert_ne!(renewed.serial_hex, pki.server.serial_hex);
        assert_eq!(mode(&renewed.key), 0o600);
        let pem = fs::read_to_string(&renewed.cert).unwrap();
        assert_eq!(serial_hex_of_pem(&pem).unwrap(), renewed.serial_hex);
        let key = KeyPair::from_pem(&fs::read_to_string(&renewed.key).unwrap()).unwrap();
        let der = pem_to_der(&pem, "CERTIFICATE").unwrap();
        assert_eq!(parse(&der).public_key().raw, key.subject_public_key_info());
    }

    #[test]
    fn revoke_in_dir_lists_the_serial_once_and_numbers_each_crl() {
        let dir = tempfile::tempdir().unwrap();
        let pki = init_dev_pki(dir.path(), TD, IDENTITIES, false).unwrap();
        let crl_path = pki.crl.clone();
        assert_eq!(
            crl_number_of(&fs::read_to_string(&crl_path).unwrap()),
            Some(1)
        );

        let serial = pki.identities[0].files.serial_hex.to_uppercase();
        assert_eq!(revoke_in_dir(dir.path(), &serial).unwrap(), crl_path);
        revoke_in_dir(dir.path(), &serial).unwrap();
        let other = &pki.identities[1].files.serial_hex;
        revoke_in_dir(dir.path(), other).unwrap();

        let pem = fs::read_to_string(&crl_path).unwrap();
        assert_eq!(crl_number_of(&pem), Some(4));
        let der = pem_to_der(&pem, "X509 CRL").unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        let serials: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| serial_hex_from_bytes(r.raw_serial()))
            .collect();
        assert_eq!(
            serials,
            [pki.identities[0].files.serial_hex.clone(), other.clone()]
        );
        assert!(matches!(
            revoke_in_dir(dir.path(), "not-hex"),
            Err(PkiError::BadSerial(_))
        ));
    }

    #[test]
    fn revoke_without_revoked_toml_continues_the_crl_numbering() {
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(dir.path(), TD, &[], false).unwrap();
        revoke_in_dir(dir.path(), "abc").unwrap();
        fs::remove_file(dir.path().join(REVOKED_FILE)).unwrap();
        revoke_in_dir(dir.path(), "def").unwrap();
        let pem = fs::read_to_string(dir.path().join(CRL_FILE)).unwrap();
        assert_eq!(crl_number_of(&pem), Some(3));
    }
}
