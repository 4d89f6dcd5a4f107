//! The gateway's secret keys, one file each under `<data_dir>/keys/` (0600, in a 0700
//! folder), created on first start. They live outside the sled files so a copy of the
//! database alone reveals nothing.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::Ed25519KeyPair;

use super::seal::Sealer;
use crate::domain::NhsNumber;

/// Why a key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing a key file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file exists but does not hold a usable key.
    #[error("{}: {problem}", path.display())]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// The keyed hash that stands for a child in the audit log: HMAC-SHA256 of the
/// normalised NHS number, lower-case hex. Auditors who know a child's NHS number can
/// search by it; the log alone does not reveal it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubjectRef(String);

impl SubjectRef {
    /// The hex text stored in entries and indexes.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Wraps a hex reference read back from storage.
    pub fn from_hex(hex: String) -> Self {
        SubjectRef(hex)
    }
}

impl std::fmt::Debug for SubjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SubjectRef({})", &self.0[..self.0.len().min(12)])
    }
}

/// Every secret the gateway holds.
pub struct Keys {
    subject: ring::hmac::Key,
    /// Seals audit entries (free text such as justifications and notes).
    pub audit_seal: Sealer,
    /// Seals concern narratives, record contents and consent notes.
    pub data_seal: Sealer,
    /// Signs audit checkpoints.
    pub checkpoint: Ed25519KeyPair,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(<secret>)")
    }
}

impl Keys {
    /// Loads the keys under `data_dir/keys`, creating any that are missing.
    /// `signing_key`, when given, is a PKCS#8 (DER or PEM) Ed25519 key file managed by
    /// the operator, used instead of the generated one.
    pub fn load_or_create(data_dir: &Path, signing_key: Option<&Path>) -> Result<Keys, KeyError> {
        Keys::load_in(data_dir, signing_key, true)
    }

    /// Loads the keys of an existing data dir and creates none: offline tools must
    /// not mint new keys for a log they are checking, so a missing key is an error.
    pub fn load_existing(data_dir: &Path, signing_key: Option<&Path>) -> Result<Keys, KeyError> {
        Keys::load_in(data_dir, signing_key, false)
    }

    fn load_in(
        data_dir: &Path,
        signing_key: Option<&Path>,
        create: bool,
    ) -> Result<Keys, KeyError> {
        let dir = data_dir.join("keys");
        let secret_file = |path: &Path, make: &dyn Fn() -> std::io::Result<Vec<u8>>| {
            if create {
                secret_file(path, make)
            } else {
                read(path)
            }
        };
        if create {
            fs::create_dir_all(&dir).map_err(|source| KeyError::Io {
                path: dir.clone(),
                source,
            })?;
            restrict_dir(&dir)?;
        }
        let rng = SystemRandom::new();
        let random32 = || {
            let mut k = vec![0u8; 32];
            rng.fill(&mut k)
                .map(|_| k)
                .map_err(|_| std::io::Error::other("system RNG failed"))
        };
        let subject = secret_file(&dir.join("subject-hmac.key"), &random32)?;
        let audit_seal = secret_file(&dir.join("audit-seal.key"), &random32)?;
        let data_seal = secret_file(&dir.join("data-seal.key"), &random32)?;
        let (signing_path, pkcs8) = match signing_key {
            Some(path) => (path.to_owned(), read(path)?),
            None => {
                let path = dir.join("checkpoint-ed25519.pk8");
                let bytes = secret_file(&path, &|| {
                    Ed25519KeyPair::generate_pkcs8(&rng)
                        .map(|d| d.as_ref().to_vec())
                        .map_err(|_| std::io::Error::other("system RNG failed"))
                })?;
                (path, bytes)
            }
        };
        let der = pem_or_der(&pkcs8);
        let checkpoint =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| KeyError::Invalid {
                path: signing_path,
                problem: format!("not an Ed25519 PKCS#8 key: {e}"),
            })?;
        let sealer = |path: &str, bytes: Vec<u8>| {
            Sealer::new(&bytes).map_err(|e| KeyError::Invalid {
                path: dir.join(path),
                problem: e.to_string(),
            })
        };
        Ok(Keys {
            subject: ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                &exact32(&dir.join("subject-hmac.key"), subject)?,
            ),
            audit_seal: sealer("audit-seal.key", audit_seal)?,
            data_seal: sealer("data-seal.key", data_seal)?,
            checkpoint,
        })
    }

    /// The audit log's reference for a child.
    pub fn subject_ref(&self, nhs: &NhsNumber) -> SubjectRef {
        let tag = ring::hmac::sign(&self.subject, nhs.digits().as_bytes());
        SubjectRef(crate::tls::hex(tag.as_ref()))
    }
}

fn exact32(path: &Path, bytes: Vec<u8>) -> Result<Vec<u8>, KeyError> {
    if bytes.len() == 32 {
        Ok(bytes)
    } else {
        Err(KeyError::Invalid {
            path: path.to_owned(),
            problem: format!("expected 32 bytes, found {}", bytes.len()),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    fs::read(path).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Accepts a PEM `PRIVATE KEY` block or raw DER.
fn pem_or_der(bytes: &[u8]) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    match rustls::pki_types::PrivatePkcs8KeyDer::from_pem_slice(bytes) {
        Ok(der) => der.secret_pkcs8_der().to_vec(),
        Err(_) => bytes.to_vec(),
    }
}

/// Reads a secret file, or creates it (0600) from `make`, safely against other
/// processes or threads creating it at the same moment (replicas starting together
/// on one key folder): each creator writes and syncs a temporary file of its own
/// name, then gives it the real name with a hard link, which fails rather than
/// replace a file already there. Exactly one creator's key gets the name; everyone
/// else (and the loser of the race) reads and uses that one. A reader never sees a
/// partial key: the name appears only once the content is complete and synced.
fn secret_file(
    path: &Path,
    make: &dyn Fn() -> std::io::Result<Vec<u8>>,
) -> Result<Vec<u8>, KeyError> {
    match fs::read(path) {
        Ok(bytes) => return Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(KeyError::Io {
                path: path.to_owned(),
                source,
            })
        }
    }
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let bytes = make().map_err(io)?;
    let tmp = unique_tmp(path).map_err(io)?;
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(&tmp).and_then(|mut file| {
        file.write_all(&bytes)?;
        file.sync_all()
    });
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                // The new name durable too (best effort: not every platform can
                // open a folder).
                let _ = fs::File::open(dir).and_then(|d| d.sync_all());
            }
            Ok(bytes)
        }
        // Another creator won: use its key.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(path),
        Err(source) => Err(io(source)),
    }
}

/// A temporary name next to `path` that no other creator uses: process id, a
/// per-process counter and random bits.
fn unique_tmp(path: &Path) -> std::io::Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut random = [0u8; 8];
    SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| std::io::Error::other("system RNG failed"))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(path.with_file_name(format!(
        ".{name}.{}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        crate::tls::hex(&random)
    )))
}

fn restrict_dir(dir: &Path) -> Result<(), KeyError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            KeyError::Io {
                path: dir.to_owned(),
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    #[test]
    fn keys_are_created_once_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = Keys::load_or_create(dir.path(), None).unwrap();
        let b = Keys::load_or_create(dir.path(), None).unwrap();
        let nhs = NhsNumber::parse("9434765919").unwrap();
        assert_eq!(a.subject_ref(&nhs), b.subject_ref(&nhs));
        assert_eq!(a.subject_ref(&nhs).as_str().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [
                "subject-hmac.key",
                "audit-seal.key",
                "data-seal.key",
                "checkpoint-ed25519.pk8",
            ] {
                let mode = fs::metadata(dir.path().join("keys").join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
    }

    #[test]
    fn concurrent_creators_end_with_identical_keys() {
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let start = std::sync::Arc::new(std::sync::Barrier::new(8));
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let (dir, start) = (dir.path().to_owned(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        Keys::load_or_create(&dir, None)
                    })
                })
                .collect();
            let keys: Vec<Keys> = threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap()
                        .unwrap_or_else(|e| panic!("round {round}: {e}"))
                })
                .collect();
            let nhs = NhsNumber::parse("9434765919").unwrap();
            let first = &keys[0];
            let sealed = first.data_seal.seal(b"ctx", b"plain").unwrap();
            let audit_sealed = first.audit_seal.seal(b"ctx", b"plain").unwrap();
            for k in &keys {
                assert_eq!(
                    k.subject_ref(&nhs),
                    first.subject_ref(&nhs),
                    "round {round}"
                );
                assert_eq!(k.data_seal.open(b"ctx", &sealed).unwrap(), b"plain");
                assert_eq!(k.audit_seal.open(b"ctx", &audit_sealed).unwrap(), b"plain");
                assert_eq!(
                    k.checkpoint.public_key().as_ref(),
                    first.checkpoint.public_key().as_ref(),
                    "round {round}"
                );
            }
            // Identical to what a later start loads, and no temporary file left.
            let later = Keys::load_or_create(dir.path(), None).unwrap();
            assert_eq!(later.subject_ref(&nhs), first.subject_ref(&nhs));
            let mut names: Vec<String> = fs::read_dir(dir.path().join("keys"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            assert_eq!(
                names,
                [
                    "audit-seal.key",
                    "checkpoint-ed25519.pk8",
                    "data-seal.key",
                    "subject-hmac.key"
                ],
                "round {round}"
            );
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                for f in &names {
                    let mode = fs::metadata(dir.path().join("keys").join(f))
                        .unwrap()
                        .permissions()
                        .mode();
                    assert_eq!(mode & 0o777, 0o600, "{f}");
                }
            }
        }
    }
}
