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

/// Reads a secret file, or creates it (0600, written in full and synced before it
/// gets its name) from `make`.
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
    let tmp = path.with_extension("tmp");
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    Ok(bytes)
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
}
