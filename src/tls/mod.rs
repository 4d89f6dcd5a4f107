//! Mutual TLS: the server's certificate, the trusted client CAs and the revocation
//! lists, loaded from files into a [`TlsMaterial`] that can be replaced while the
//! gateway runs (new handshakes use the new material; open connections carry on).
//!
//! Identity is not decided here: this module proves that the peer holds a
//! certificate, issued by a trusted CA, valid now, for client authentication, not
//! revoked. What the certificate *names* is [`crate::identity`]'s business.

mod acceptor;
mod coalesce;
mod peer;
mod verifier;

pub use acceptor::{Acceptor, AcceptorLimits, TlsConn, REVOKED_GRACE};
pub use peer::{serial_hex, PeerCert, PeerInfo};
pub use verifier::ClientVerifier;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ring::digest::{digest, SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

/// Where the TLS material comes from (the `[tls]` section of the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PKCS#8 (or SEC1/PKCS#1) PEM private key of the leaf.
    pub key: PathBuf,
    /// PEM bundle of one or more trusted client CAs.
    pub client_ca: PathBuf,
    /// PEM CRL files.
    pub crl: Vec<PathBuf>,
}

/// Why TLS material could not be loaded. Each variant names the file, so an operator
/// knows which one to fix; the running configuration is untouched when this happens.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file was read but its contents are not what they should be.
    #[error("{}: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        problem: String,
    },
}

impl TlsError {
    fn invalid(path: &Path, problem: impl Into<String>) -> Self {
        TlsError::Invalid {
            path: path.to_owned(),
            problem: problem.into(),
        }
    }

    /// The file this error is about.
    pub fn path(&self) -> &Path {
        match self {
            TlsError::Read { path, .. } | TlsError::Invalid { path, .. } => path,
        }
    }
}

/// A certificate's public facts, for status reports and audit entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// Lower-case hex of the serial number, without leading zero bytes.
    pub serial_hex: String,
    /// Lower-case hex SHA-256 of the DER certificate.
    pub sha256_hex: String,
    /// The subject, as text.
    pub subject: String,
    /// End of validity, unix seconds.
    pub not_after: i64,
}

/// One complete, validated set of TLS material, ready to serve handshakes.
#[derive(Debug)]
pub struct TlsMaterial {
    /// The rustls configuration new handshakes use.
    pub server_config: Arc<ServerConfig>,
    /// The server's leaf certificate.
    pub server_cert: CertSummary,
    /// Every trusted client CA.
    pub client_cas: Vec<CertSummary>,
    /// Serials revoked by the configured CRL files.
    pub crl_serials: HashSet<String>,
    /// SHA-256 of every input file's bytes, to notice a file replaced on disk.
    pub file_digests: Vec<(PathBuf, [u8; 32])>,
    /// When this material was loaded, unix seconds.
    pub loaded_at: i64,
}

/// The live TLS state shared by the acceptor, the authentication layer and the
/// operations service.
#[derive(Debug)]
pub struct TlsState {
    paths: TlsPaths,
    material: ArcSwap<TlsMaterial>,
    revocations: Arc<Revocations>,
}

impl TlsState {
    /// Loads the material for the first time.
    pub fn load(paths: TlsPaths, revocations: Arc<Revocations>) -> Result<Self, TlsError> {
        let material = TlsMaterial::load(&paths, &revocations, now())?;
        revocations.set_crl(material.crl_serials.clone());
        Ok(TlsState {
            paths,
            material: ArcSwap::from_pointee(material),
            revocations,
        })
    }

    /// The material in force now.
    pub fn current(&self) -> Arc<TlsMaterial> {
        self.material.load_full()
    }

    /// Re-reads and validates every file, changing nothing: [`TlsState::install`]
    /// puts the result in force. The caller serialises the two (one reload at a
    /// time), so that no older reload can install its material, or its CRLs, over a
    /// newer one.
    pub fn load_fresh(&self) -> Result<Arc<TlsMaterial>, TlsError> {
        Ok(Arc::new(TlsMaterial::load(
            &self.paths,
            &self.revocations,
            now(),
        )?))
    }

    /// Puts `fresh` in force: its CRLs apply to every later call and end the open
    /// streams of the certificates they revoke, and its configuration serves every
    /// later handshake. Returns the material it replaces.
    pub fn install(&self, fresh: Arc<TlsMaterial>) -> Arc<TlsMaterial> {
        self.revocations.set_crl(fresh.crl_serials.clone());
        self.material.swap(fresh)
    }

    /// The shared revocation set.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// The configured file paths.
    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// Whether any configured file's content differs from what the material in
    /// force was loaded from (a file replaced in place, a symlink swapped, a file
    /// removed).
    pub fn files_changed(&self) -> bool {
        let current = self.current();
        current
            .file_digests
            .iter()
            .any(|(path, digest)| match std::fs::read(path) {
                Ok(bytes) => ring::digest::digest(&SHA256, &bytes).as_ref() != digest,
                Err(_) => true,
            })
    }

    /// A fingerprint of the files as they are on disk now, to avoid retrying a
    /// reload of the same broken content over and over.
    pub fn disk_fingerprint(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for path in std::iter::once(&self.paths.cert)
            .chain([&self.paths.key, &self.paths.client_ca])
            .chain(self.paths.crl.iter())
        {
            let bytes = std::fs::read(path).unwrap_or_default();
            all.extend_from_slice(digest(&SHA256, &bytes).as_ref());
        }
        all
    }
}

/// Serials that must be refused: those revoked by an operator (persisted in the
/// audit log) and those listed in the configured CRLs. Checked at every handshake and
/// on every call, and every change is announced so open streams can end at once.
#[derive(Debug)]
pub struct Revocations {
    operator: ArcSwap<HashSet<String>>,
    crl: ArcSwap<HashSet<String>>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations::new(HashSet::new())
    }
}

impl Revocations {
    /// Starts with the operator revocations persisted so far.
    pub fn new(operator: HashSet<String>) -> Self {
        Revocations {
            operator: ArcSwap::from_pointee(operator),
            crl: ArcSwap::default(),
            changes: tokio::sync::watch::channel(0).0,
        }
    }

    /// Whether a serial (canonical lower-case hex) is revoked.
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        self.operator.load().contains(serial_hex) || self.crl.load().contains(serial_hex)
    }

    /// Whether an operator has revoked a serial: a revocation recorded in the
    /// audit log, which outlives any CRL file.
    pub fn is_revoked_by_operator(&self, serial_hex: &str) -> bool {
        self.operator.load().contains(serial_hex)
    }

    /// The first of a peer's serials that is revoked: its leaf's (by an operator or
    /// a CRL), then its intermediates' (by an operator). An intermediate's serial is
    /// not looked up among the CRLs' serials: they are pooled across issuers, and a
    /// CA numbering its intermediates and leaves from one counter would see a
    /// revoked leaf's serial refuse an intermediate. webpki checks intermediates
    /// against their own issuer's CRL at each handshake.
    pub fn revoked_in<'a>(&self, peer: &'a PeerCert) -> Option<&'a str> {
        if self.is_revoked(&peer.serial_hex) {
            return Some(&peer.serial_hex);
        }
        let operator = self.operator.load();
        peer.chain_serials
            .iter()
            .find(|s| operator.contains(s.as_str()))
            .map(String::as_str)
    }

    /// Adds an operator revocation; it applies from the next handshake and call on,
    /// and ends that certificate's open streams.
    pub fn revoke(&self, serial_hex: &str) {
        self.operator.rcu(|set| {
            let mut set = HashSet::clone(set);
            set.insert(serial_hex.to_owned());
            set
        });
        self.changes.send_modify(|n| *n += 1);
    }

    /// Announces each change of the revoked set.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Every revoked serial, sorted.
    pub fn all(&self) -> Vec<String> {
        let mut all: Vec<String> = self.operator.load().iter().cloned().collect();
        all.extend(self.crl.load().iter().cloned());
        all.sort();
        all.dedup();
        all
    }

    fn set_crl(&self, serials: HashSet<String>) {
        self.crl.store(Arc::new(serials));
        self.changes.send_modify(|n| *n += 1);
    }
}

/// Normalises an operator-supplied serial to the canonical form (hex digits with
/// optional `:` separators, any case, leading zeros ignored). `None` when it is not
/// a serial.
pub fn normalise_serial(input: &str) -> Option<String> {
    crate::pki::canonical_serial_hex(input).ok()
}

fn now() -> UnixTime {
    UnixTime::now()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

impl TlsMaterial {
    /// Reads and validates every file: the chain parses, the key matches the leaf,
    /// the leaf is valid now, every CA and CRL parses.
    pub fn load(
        paths: &TlsPaths,
        revocations: &Arc<Revocations>,
        now: UnixTime,
    ) -> Result<Self, TlsError> {
        let mut file_digests = Vec::new();
        let mut remember = |path: &Path, bytes: &[u8]| {
            let mut d = [0u8; 32];
            d.copy_from_slice(digest(&SHA256, bytes).as_ref());
            file_digests.push((path.to_owned(), d));
        };

        let cert_bytes = read(&paths.cert)?;
        remember(&paths.cert, &cert_bytes);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                TlsError::invalid(&paths.cert, format!("not a PEM certificate chain: {e}"))
            })?;
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::invalid(&paths.cert, "contains no certificate"))?;
        let server_cert = summarise(leaf).map_err(|p| TlsError::invalid(&paths.cert, p))?;
        if server_cert.not_after <= now.as_secs() as i64 {
            return Err(TlsError::invalid(
                &paths.cert,
                "the server certificate has expired",
            ));
        }

        let key_bytes = read(&paths.key)?;
        remember(&paths.key, &key_bytes);
        let key = PrivateKeyDer::from_pem_slice(&key_bytes)
            .map_err(|e| TlsError::invalid(&paths.key, format!("not a PEM private key: {e}")))?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| TlsError::invalid(&paths.key, format!("unusable private key: {e}")))?;
        let certified = CertifiedKey::new(chain.clone(), signing_key);
        // Checked here, before rustls sees them, so the error can name the key file.
        certified.keys_match().map_err(|_| {
            TlsError::invalid(
                &paths.key,
                format!("does not match the certificate in {}", paths.cert.display()),
            )
        })?;

        let ca_bytes = read(&paths.client_ca)?;
        remember(&paths.client_ca, &ca_bytes);
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&ca_bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                TlsError::invalid(&paths.client_ca, format!("not a PEM CA bundle: {e}"))
            })?;
        if cas.is_empty() {
            return Err(TlsError::invalid(
                &paths.client_ca,
                "contains no CA certificate",
            ));
        }
        let mut roots = RootCertStore::empty();
        let mut client_cas = Vec::with_capacity(cas.len());
        for ca in &cas {
            roots.add(ca.clone()).map_err(|e| {
                TlsError::invalid(&paths.client_ca, format!("unusable CA certificate: {e}"))
            })?;
            client_cas.push(summarise(ca).map_err(|p| TlsError::invalid(&paths.client_ca, p))?);
        }

        let mut crls = Vec::new();
        let mut crl_serials = HashSet::new();
        for path in &paths.crl {
            let bytes = read(path)?;
            remember(path, &bytes);
            let before = crls.len();
            for crl in CertificateRevocationListDer::pem_slice_iter(&bytes) {
                let crl =
                    crl.map_err(|e| TlsError::invalid(path, format!("not a PEM CRL: {e}")))?;
                let (_, parsed) = <x509_parser::revocation_list::CertificateRevocationList as x509_parser::prelude::FromDer<_>>::from_der(&crl)
                    .map_err(|e| TlsError::invalid(path, format!("not a valid CRL: {e}")))?;
                for revoked in parsed.iter_revoked_certificates() {
                    crl_serials.insert(serial_hex(revoked.raw_serial()));
                }
                crls.push(crl);
            }
            // An empty, cut-short or DER file would otherwise read as "nothing
            // revoked" and let every revoked certificate back in.
            if crls.len() == before {
                return Err(TlsError::invalid(
                    path,
                    "contains no PEM CRL (-----BEGIN X509 CRL-----)",
                ));
            }
        }

        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .with_crls(crls)
            // The whole chain: a revoked intermediate revokes what it issued.
            // A certificate whose issuer has no CRL here is accepted.
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| {
                TlsError::invalid(
                    &paths.client_ca,
                    format!("cannot build a client verifier: {e}"),
                )
            })?;
        let verifier = Arc::new(ClientVerifier::new(webpki, revocations.clone()));

        // TLS 1.3 first; TLS 1.2 only with the provider's suites, all of which are
        // ECDHE (forward secret): ring's provider has no static-RSA key exchange.
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::invalid(&paths.cert, format!("TLS versions: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| {
                TlsError::invalid(&paths.key, format!("unusable certificate and key: {e}"))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];

        Ok(TlsMaterial {
            server_config: Arc::new(config),
            server_cert,
            client_cas,
            crl_serials,
            file_digests,
            loaded_at: now.as_secs() as i64,
        })
    }
}

/// Reads the facts of a DER certificate, or says why it cannot.
pub fn summarise(der: &CertificateDer<'_>) -> Result<CertSummary, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    Ok(CertSummary {
        serial_hex: serial_hex(cert.raw_serial()),
        sha256_hex: hex(digest(&SHA256, der).as_ref()),
        subject: cert.subject().to_string(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Lower-case hex of bytes. (By table: every audit entry carries two of these,
/// and `write!` per byte showed in the profile.)
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_normalised() {
        assert_eq!(normalise_serial("00:AB:cd").as_deref(), Some("abcd"));
        assert_eq!(normalise_serial("abc").as_deref(), Some("abc"));
        assert_eq!(normalise_serial("0000").as_deref(), Some("0"));
        assert_eq!(normalise_serial("xyz"), None);
        assert_eq!(normalise_serial(""), None);
    }

    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff, 0x5c]), "000fa0ff5c");
        let all: Vec<u8> = (0..=255).collect();
        let expected: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&all), expected);
    }
}
