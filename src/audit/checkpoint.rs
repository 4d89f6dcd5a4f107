//! Signed checkpoints of the audit log: tree size, root and time, signed with
//! Ed25519 (via `ring`) and served as a C2SP signed note.
//!
//! Pure: no I/O, no clock (the caller supplies the timestamp), no key files
//! (the caller reads and writes the PKCS#8 bytes).
//!
//! # Formats
//! - The note text (what is signed) is a C2SP `tlog-checkpoint` body with one
//!   extension line: `<log_id>\n<tree_size>\n<base64 root>\n<unix seconds>\n`.
//!   The origin line is the log id, and the log id is also the key name.
//! - The signed note (C2SP `signed-note`) is the text, a blank line, then
//!   `— <log_id> <base64(key hash ‖ signature)>\n` (an em dash, U+2014, and a space).
//! - The key hash (C2SP calls it the key ID) is the first four bytes of
//!   SHA-256(`log_id` ‖ 0x0A ‖ 0x01 ‖ 32-byte public key).
//! - The verifier key is `<log_id>+<key hash as 8 hex digits>+<base64(0x01 ‖ public key)>`.
//!
//! These match golang.org/x/mod/sumdb/note byte for byte (tested against its
//! published example), so transparency-log tooling and witnesses can read them.
//! Base64 is the standard alphabet with padding; decoding is canonical.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ring::digest;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};

use super::merkle::Hash;

/// The C2SP signed-note signature type byte for Ed25519.
const ED25519_TYPE: u8 = 0x01;
/// Starts every signature line: an em dash (U+2014) and a space.
const SIGNATURE_LINE_PREFIX: &str = "\u{2014} ";
/// At most this many signature lines are read, as in golang.org/x/mod/sumdb/note;
/// C2SP requires accepting at least 16.
const MAX_SIGNATURES: usize = 100;

/// The length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// The length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Why a checkpoint, note or key was refused.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// A key name (the log id) is empty or holds a space, `+` or a control character.
    #[error(
        "invalid key name {0:?}: it must be non-empty, without spaces, '+' or control characters"
    )]
    InvalidKeyName(String),
    /// A note text that cannot be signed: empty, not ending in one newline, or
    /// holding a control character other than newline.
    #[error("note text cannot be signed: {0}")]
    InvalidNoteText(&'static str),
    /// The verifier key is not `<name>+<8 hex digits>+<base64 key>`.
    #[error("malformed verifier key: {0}")]
    MalformedVerifierKey(&'static str),
    /// The verifier key is of a signature type other than Ed25519.
    #[error("unsupported verifier key type {0:#04x}; only Ed25519 (0x01) is supported")]
    UnsupportedKeyType(u8),
    /// The verifier key's key hash does not match its name and public key.
    #[error("verifier key hash does not match its name and public key")]
    VerifierKeyHashMismatch,
    /// The signed note does not follow the C2SP signed-note syntax.
    #[error("malformed signed note: {0}")]
    MalformedNote(&'static str),
    /// The note text is not a checkpoint of this log's format.
    #[error("malformed checkpoint: {0}")]
    MalformedCheckpoint(&'static str),
    /// The note is signed under the verifier key's name, but only with other keys.
    #[error("the note is signed by {0:?} only with other keys")]
    KeyHashMismatch(String),
    /// No signature line is from the verifier key.
    #[error("the note has no signature from {0:?}")]
    NoSignatureFromKey(String),
    /// A signature from the verifier key (or the given key) does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// The checkpoint's origin line is not the verifier key's name.
    #[error("checkpoint origin {origin:?} is not the key name {key_name:?}")]
    OriginMismatch {
        /// The checkpoint's first line.
        origin: String,
        /// The verifier key's name.
        key_name: String,
    },
    /// The checkpoint carries a different public key than the trusted one.
    #[error("the checkpoint was signed by a different public key")]
    PublicKeyMismatch,
    /// The PKCS#8 document is not an Ed25519 private key ring accepts.
    #[error("invalid Ed25519 PKCS#8 private key: {0}")]
    InvalidPrivateKey(String),
    /// The system random number generator failed.
    #[error("could not generate a key: the system random number generator failed")]
    KeyGeneration,
}

/// The state of the log at one moment: what a checkpoint signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's name: the checkpoint's origin line and the signing key's name.
    pub log_id: String,
    /// The number of entries in the log.
    pub tree_size: u64,
    /// The Merkle root of the first `tree_size` entries.
    pub root_hash: Hash,
    /// When the checkpoint was made, in seconds since the Unix epoch.
    pub timestamp: u64,
}

/// A checkpoint with its Ed25519 signature over [`Checkpoint::note_text`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    /// What was signed.
    pub checkpoint: Checkpoint,
    /// The Ed25519 signature over the checkpoint's note text.
    pub signature: [u8; SIGNATURE_LEN],
    /// The raw Ed25519 public key of the signer.
    pub public_key: [u8; PUBLIC_KEY_LEN],
}

/// A parsed C2SP verifier key for Ed25519: the key name, its key hash and the
/// public key, with the key hash checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    key_hash: [u8; 4],
    public_key: [u8; PUBLIC_KEY_LEN],
}

// === impl Checkpoint ===

impl Checkpoint {
    /// The text that is signed: `<log_id>\n<tree_size>\n<base64 root>\n<timestamp>\n`.
    pub fn note_text(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}\n",
            self.log_id,
            self.tree_size,
            BASE64.encode(self.root_hash),
            self.timestamp
        )
    }

    /// Parses exactly the format of [`Checkpoint::note_text`]: four lines,
    /// decimal numbers without sign or leading zeros, a canonical base64
    /// 32-byte root. Does not check any signature.
    pub fn from_note_text(text: &str) -> Result<Self, CheckpointError> {
        let body = text
            .strip_suffix('\n')
            .ok_or(CheckpointError::MalformedCheckpoint(
                "does not end in a newline",
            ))?;
        let lines: Vec<&str> = body.split('\n').collect();
        let [origin, size, root, timestamp] = lines[..] else {
            return Err(CheckpointError::MalformedCheckpoint(
                "expected four lines: origin, tree size, root hash, timestamp",
            ));
        };
        check_key_name(origin)
            .map_err(|_| CheckpointError::MalformedCheckpoint("invalid origin line"))?;
        let tree_size =
            parse_decimal(size).ok_or(CheckpointError::MalformedCheckpoint("invalid tree size"))?;
        let root_hash = BASE64
            .decode(root)
            .ok()
            .and_then(|bytes| Hash::try_from(bytes).ok())
            .ok_or(CheckpointError::MalformedCheckpoint(
                "root hash is not base64 of 32 bytes",
            ))?;
        let timestamp = parse_decimal(timestamp)
            .ok_or(CheckpointError::MalformedCheckpoint("invalid timestamp"))?;
        Ok(Self {
            log_id: origin.to_owned(),
            tree_size,
            root_hash,
            timestamp,
        })
    }

    /// Signs the note text. Fails only if `log_id` cannot be a key name.
    pub fn sign(&self, key: &Ed25519KeyPair) -> Result<SignedCheckpoint, CheckpointError> {
        check_key_name(&self.log_id)?;
        let signature = key
            .sign(self.note_text().as_bytes())
            .as_ref()
            .try_into()
            .expect("Ed25519 signatures are 64 bytes");
        Ok(SignedCheckpoint {
            checkpoint: self.clone(),
            signature,
            public_key: public_key_of(key),
        })
    }
}

// === impl SignedCheckpoint ===

impl SignedCheckpoint {
    /// The key hash of the signer under the log id.
    pub fn key_hash(&self) -> [u8; 4] {
        key_hash(&self.checkpoint.log_id, &self.public_key)
    }

    /// The C2SP signed note: note text, blank line, one signature line.
    pub fn signed_note(&self) -> String {
        format_signed_note(
            &self.checkpoint.note_text(),
            &self.checkpoint.log_id,
            self.key_hash(),
            &self.signature,
        )
    }

    /// The C2SP verifier key `<log_id>+<key hash hex>+<base64(0x01 ‖ public key)>`
    /// that clients pin to check [`SignedCheckpoint::signed_note`].
    pub fn verifier_key(&self) -> String {
        format_verifier_key(&self.checkpoint.log_id, self.key_hash(), &self.public_key)
    }
}

/// Checks that `signed` carries `public_key` and that its signature over the
/// note text verifies under that key.
pub fn verify(
    public_key: &[u8; PUBLIC_KEY_LEN],
    signed: &SignedCheckpoint,
) -> Result<(), CheckpointError> {
    if signed.public_key != *public_key {
        return Err(CheckpointError::PublicKeyMismatch);
    }
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(signed.checkpoint.note_text().as_bytes(), &signed.signature)
        .map_err(|_| CheckpointError::BadSignature)
}

/// What a client runs on a served `signed_note`: checks the signature from
/// `verifier_key` (other signers' lines, such as witnesses', are ignored, as
/// C2SP requires), then parses the checkpoint and checks its origin is the key
/// name.
pub fn parse_signed_note(text: &str, verifier_key: &str) -> Result<Checkpoint, CheckpointError> {
    let verifier: VerifierKey = verifier_key.parse()?;
    let body = open_note(text, &verifier)?;
    let checkpoint = Checkpoint::from_note_text(body)?;
    if checkpoint.log_id != verifier.name {
        return Err(CheckpointError::OriginMismatch {
            origin: checkpoint.log_id,
            key_name: verifier.name,
        });
    }
    Ok(checkpoint)
}

// === impl VerifierKey ===

impl VerifierKey {
    /// The verifier key for `public_key` under `name`.
    pub fn new(name: &str, public_key: [u8; PUBLIC_KEY_LEN]) -> Result<Self, CheckpointError> {
        check_key_name(name)?;
        Ok(Self {
            name: name.to_owned(),
            key_hash: key_hash(name, &public_key),
            public_key,
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key hash (C2SP key ID): first four bytes of SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key).
    pub fn key_hash(&self) -> [u8; 4] {
        self.key_hash
    }

    /// The raw Ed25519 public key.
    pub fn public_key(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.public_key
    }
}

impl FromStr for VerifierKey {
    type Err = CheckpointError;

    /// Parses `<name>+<8 hex digits>+<base64(0x01 ‖ 32-byte key)>` and checks
    /// the key hash against the name and key.
    fn from_str(s: &str) -> Result<Self, CheckpointError> {
        let malformed = CheckpointError::MalformedVerifierKey;
        let (name, rest) = s.split_once('+').ok_or(malformed("expected name+id+key"))?;
        let (id_hex, key_b64) = rest
            .split_once('+')
            .ok_or(malformed("expected name+id+key"))?;
        check_key_name(name).map_err(|_| malformed("invalid key name"))?;
        let key_hash = parse_key_hash(id_hex).ok_or(malformed("key hash is not 8 hex digits"))?;
        let key = BASE64
            .decode(key_b64)
            .map_err(|_| malformed("key is not base64"))?;
        let (&key_type, public_key) = key.split_first().ok_or(malformed("empty key"))?;
        if key_type != ED25519_TYPE {
            return Err(CheckpointError::UnsupportedKeyType(key_type));
        }
        let public_key: [u8; PUBLIC_KEY_LEN] = public_key
            .try_into()
            .map_err(|_| malformed("Ed25519 key is not 32 bytes"))?;
        let verifier = Self::new(name, public_key)?;
        if verifier.key_hash != key_hash {
            return Err(CheckpointError::VerifierKeyHashMismatch);
        }
        Ok(verifier)
    }
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_verifier_key(
            &self.name,
            self.key_hash,
            &self.public_key,
        ))
    }
}

// === signed notes ===

/// The key hash (C2SP key ID) of an Ed25519 key: the first four bytes of
/// SHA-256(`name` ‖ 0x0A ‖ 0x01 ‖ `public_key`).
pub fn key_hash(name: &str, public_key: &[u8; PUBLIC_KEY_LEN]) -> [u8; 4] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(b"\n");
    ctx.update(&[ED25519_TYPE]);
    ctx.update(public_key);
    let mut id = [0u8; 4];
    id.copy_from_slice(&ctx.finish().as_ref()[..4]);
    id
}

/// Signs any note `text` as a C2SP signed note under key `name`.
pub fn sign_note(text: &str, name: &str, key: &Ed25519KeyPair) -> Result<String, CheckpointError> {
    check_key_name(name)?;
    check_note_text(text)?;
    let signature = key.sign(text.as_bytes());
    let id = key_hash(name, &public_key_of(key));
    Ok(format_signed_note(text, name, id, signature.as_ref()))
}

/// Checks a C2SP signed note against `verifier` and returns its text
/// (including the final newline). Signature lines from other keys are
/// ignored; one from `verifier` must verify, and any from `verifier` that does
/// not verify rejects the whole note.
pub fn open_note<'a>(note: &'a str, verifier: &VerifierKey) -> Result<&'a str, CheckpointError> {
    let malformed = CheckpointError::MalformedNote;
    if note.chars().any(|c| c < ' ' && c != '\n') {
        return Err(malformed("control character"));
    }
    let split = note
        .rfind("\n\n")
        .ok_or(malformed("no blank line before the signatures"))?;
    let (text, signatures) = (&note[..split + 1], &note[split + 2..]);
    let signatures = signatures
        .strip_suffix('\n')
        .ok_or(malformed("signatures do not end in a newline"))?;
    let mut verified = false;
    let mut other_key_same_name = false;
    for (n, line) in signatures.split('\n').enumerate() {
        if n == MAX_SIGNATURES {
            return Err(malformed("too many signatures"));
        }
        let (name, blob) = line
            .strip_prefix(SIGNATURE_LINE_PREFIX)
            .and_then(|rest| rest.split_once(' '))
            .ok_or(malformed("signature line is not '— <name> <base64>'"))?;
        // Other signers' names get exactly the C2SP rule, nothing stricter.
        if !is_c2sp_key_name(name) {
            return Err(malformed("invalid key name in a signature line"));
        }
        let blob = BASE64
            .decode(blob)
            .map_err(|_| malformed("signature is not base64"))?;
        if blob.len() < 5 {
            return Err(malformed("signature is too short"));
        }
        let (id, signature) = blob.split_at(4);
        if name != verifier.name {
            continue;
        }
        if id != verifier.key_hash {
            other_key_same_name = true;
            continue;
        }
        UnparsedPublicKey::new(&ED25519, &verifier.public_key)
            .verify(text.as_bytes(), signature)
            .map_err(|_| CheckpointError::BadSignature)?;
        verified = true;
    }
    match (verified, other_key_same_name) {
        (true, _) => Ok(text),
        (false, true) => Err(CheckpointError::KeyHashMismatch(verifier.name.clone())),
        (false, false) => Err(CheckpointError::NoSignatureFromKey(verifier.name.clone())),
    }
}

// === keys ===

/// A new Ed25519 private key as a PKCS#8 v2 document (for the caller to write
/// to a 0600 file).
pub fn generate_pkcs8() -> Result<Vec<u8>, CheckpointError> {
    Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map(|document| document.as_ref().to_vec())
        .map_err(|_| CheckpointError::KeyGeneration)
}

/// Loads an Ed25519 key pair from PKCS#8: v2 (as [`generate_pkcs8`] writes,
/// public key checked against the private key) or v1 (as `openssl genpkey
/// -algorithm ed25519` writes).
pub fn load_keypair(pkcs8: &[u8]) -> Result<Ed25519KeyPair, CheckpointError> {
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
        .map_err(|e| CheckpointError::InvalidPrivateKey(e.to_string()))
}

/// The raw public key of a key pair.
pub fn public_key_of(key: &Ed25519KeyPair) -> [u8; PUBLIC_KEY_LEN] {
    key.public_key()
        .as_ref()
        .try_into()
        .expect("Ed25519 public keys are 32 bytes")
}

// === private helpers ===

fn format_signed_note(text: &str, name: &str, key_hash: [u8; 4], signature: &[u8]) -> String {
    let mut blob = Vec::with_capacity(4 + signature.len());
    blob.extend_from_slice(&key_hash);
    blob.extend_from_slice(signature);
    format!(
        "{text}\n{SIGNATURE_LINE_PREFIX}{name} {}\n",
        BASE64.encode(blob)
    )
}

fn format_verifier_key(name: &str, key_hash: [u8; 4], public_key: &[u8; PUBLIC_KEY_LEN]) -> String {
    let mut key = Vec::with_capacity(1 + PUBLIC_KEY_LEN);
    key.push(ED25519_TYPE);
    key.extend_from_slice(public_key);
    format!(
        "{name}+{:08x}+{}",
        u32::from_be_bytes(key_hash),
        BASE64.encode(key)
    )
}

/// C2SP: key names are non-empty, without Unicode spaces or `+`.
fn is_c2sp_key_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c == '+')
}

/// Our own key names (log ids) follow C2SP and also have no control
/// characters, since the name is also the checkpoint's first line.
pub fn check_key_name(name: &str) -> Result<(), CheckpointError> {
    if !is_c2sp_key_name(name) || name.chars().any(char::is_control) {
        return Err(CheckpointError::InvalidKeyName(name.to_owned()));
    }
    Ok(())
}

/// A note text is non-empty, ends in exactly one newline (so the blank line
/// that follows is unambiguous), and has no control character but newline.
fn check_note_text(text: &str) -> Result<(), CheckpointError> {
    if !text.ends_with('\n') {
        return Err(CheckpointError::InvalidNoteText(
            "does not end in a newline",
        ));
    }
    if text == "\n" || text.ends_with("\n\n") {
        return Err(CheckpointError::InvalidNoteText("ends in a blank line"));
    }
    if text.chars().any(|c| c < ' ' && c != '\n') {
        return Err(CheckpointError::InvalidNoteText("control character"));
    }
    Ok(())
}

/// ASCII decimal without sign or leading zeros ("0" itself is fine).
fn parse_decimal(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

fn parse_key_hash(hex: &str) -> Option<[u8; 4]> {
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok().map(u32::to_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::empty_root;

    // The example key pair and note of golang.org/x/mod/sumdb/note, from
    // golang/mod sumdb/note/note_test.go @ 02c991387e35f9e4c0a9b7ce137717055f8d716d
    // (TestNewVerifier, TestSign, TestOpen). Ed25519 is deterministic, so signing
    // the same text with the same seed must give the published note byte for byte.
    const PETER_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const PETER_SKEY: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const PETER_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                              then you don't know what your problem is.\n";
    const PETER_SIG: &str = "\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
    const ENOCH_VKEY: &str = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop";
    const ENOCH_SIG: &str = "\u{2014} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n";

    const LOG_ID: &str = "safeguarding.example/sgw/audit";

    fn peter_seed() -> Vec<u8> {
        // PRIVATE+KEY+<name>+<hash>+<base64(0x01 ‖ seed)>; the base64 may hold '+'.
        let encoded = PETER_SKEY.splitn(5, '+').nth(4).unwrap();
        let key = BASE64.decode(encoded).unwrap();
        assert_eq!(key[0], ED25519_TYPE);
        key[1..].to_vec()
    }

    fn peter_keypair() -> Ed25519KeyPair {
        let verifier: VerifierKey = PETER_VKEY.parse().unwrap();
        Ed25519KeyPair::from_seed_and_public_key(&peter_seed(), verifier.public_key()).unwrap()
    }

    fn peter_note() -> String {
        format!("{PETER_TEXT}\n{PETER_SIG}")
    }

    fn new_keypair() -> Ed25519KeyPair {
        load_keypair(&generate_pkcs8().unwrap()).unwrap()
    }

    fn sample() -> Checkpoint {
        Checkpoint {
            log_id: LOG_ID.to_owned(),
            tree_size: 42,
            root_hash: empty_root(),
            timestamp: 1_767_225_600,
        }
    }

    // === published examples ===

    #[test]
    fn note_text_is_the_tlog_checkpoint_body_with_a_timestamp_line() {
        assert_eq!(
            sample().note_text(),
            "safeguarding.example/sgw/audit\n42\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n1767225600\n"
        );
    }

    #[test]
    fn signing_reproduces_the_golang_sumdb_note_example() {
        let key = peter_keypair();
        assert_eq!(
            sign_note(PETER_TEXT, "PeterNeumann", &key).unwrap(),
            peter_note()
        );
        assert_eq!(
            key_hash("PeterNeumann", &public_key_of(&key)),
            [0xc7, 0x4f, 0x20, 0xa3]
        );
        let verifier = VerifierKey::new("PeterNeumann", public_key_of(&key)).unwrap();
        assert_eq!(verifier.to_string(), PETER_VKEY);
    }

    #[test]
    fn published_verifier_keys_parse() {
        let peter: VerifierKey = PETER_VKEY.parse().unwrap();
        assert_eq!(peter.name(), "PeterNeumann");
        assert_eq!(peter.key_hash(), [0xc7, 0x4f, 0x20, 0xa3]);
        assert_eq!(peter.to_string(), PETER_VKEY);
        let enoch: VerifierKey = ENOCH_VKEY.parse().unwrap();
        assert_eq!(enoch.key_hash(), [0xaf, 0x0c, 0xfe, 0x78]);
        assert_eq!(enoch.to_string(), ENOCH_VKEY);
    }

    #[test]
    fn pkcs8_v1_of_the_published_seed_gives_the_published_public_key() {
        // RFC 8410 §7 PKCS#8 v1 framing, as `openssl genpkey -algorithm ed25519` writes.
        let mut v1 = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        v1.extend_from_slice(&peter_seed());
        let key = load_keypair(&v1).unwrap();
        let peter: VerifierKey = PETER_VKEY.parse().unwrap();
        assert_eq!(&public_key_of(&key), peter.public_key());
    }

    #[test]
    fn published_note_opens_and_unknown_signers_are_ignored() {
        let peter: VerifierKey = PETER_VKEY.parse().unwrap();
        let enoch: VerifierKey = ENOCH_VKEY.parse().unwrap();
        assert_eq!(open_note(&peter_note(), &peter), Ok(PETER_TEXT));
        let both = format!("{PETER_TEXT}\n{PETER_SIG}{ENOCH_SIG}");
        assert_eq!(open_note(&both, &peter), Ok(PETER_TEXT));
        assert_eq!(open_note(&both, &enoch), Ok(PETER_TEXT));
        let enoch_only = format!("{PETER_TEXT}\n{ENOCH_SIG}");
        assert_eq!(
            open_note(&enoch_only, &peter),
            Err(CheckpointError::NoSignatureFromKey("PeterNeumann".into()))
        );
    }

    #[test]
    fn golang_malformed_notes_are_rejected() {
        let peter: VerifierKey = PETER_VKEY.parse().unwrap();
        let t = PETER_TEXT;
        let s = PETER_SIG;
        // Go's list also has a note starting with byte 0xff; that is not UTF-8,
        // so it cannot reach this &str API at all.
        let bad = [
            t.to_owned(),
            format!("{t}\n"),
            format!("{t}\n{}", &s[..s.len() - 1]),
            format!("\x01{t}\n{s}"),
            format!("{t}\n\u{2014} Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="),
            format!("{t}\n{s}Unexpected line.\n"),
            format!("{t}\n{}", s.repeat(MAX_SIGNATURES + 1)),
        ];
        for note in bad {
            assert!(
                matches!(
                    open_note(&note, &peter),
                    Err(CheckpointError::MalformedNote(_))
                ),
                "accepted {note:?}"
            );
        }
        let corrupt = format!("{t}\n{}ABCD{}", &s[..60], &s[60..]);
        assert_eq!(
            open_note(&corrupt, &peter),
            Err(CheckpointError::BadSignature)
        );
        // A bad signature from the trusted key rejects the note even beside a good one.
        let good_and_bad = format!("{t}\n{s}{}ABCD{}", &s[..60], &s[60..]);
        assert_eq!(
            open_note(&good_and_bad, &peter),
            Err(CheckpointError::BadSignature)
        );
    }

    #[test]
    fn mangled_verifier_keys_are_rejected() {
        let bytes = PETER_VKEY.as_bytes();
        for i in 0..=bytes.len() {
            for j in i + 1..=bytes.len() {
                if i != 0 || j != bytes.len() {
                    let part = &PETER_VKEY[i..j];
                    assert!(part.parse::<VerifierKey>().is_err(), "accepted {part:?}");
                }
            }
        }
        for i in 0..bytes.len() {
            let mut mangled = bytes.to_vec();
            mangled[i] += 1;
            let mangled = String::from_utf8(mangled).unwrap();
            assert!(
                mangled.parse::<VerifierKey>().is_err(),
                "accepted {mangled:?}"
            );
        }
        // From Go's TestNewVerifier: wrong key length and unknown algorithm,
        // each with a key hash adjusted to match.
        assert!(matches!(
            "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY=="
                .parse::<VerifierKey>(),
            Err(CheckpointError::MalformedVerifierKey(_))
        ));
        assert!(matches!(
            "PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
                .parse::<VerifierKey>(),
            Err(CheckpointError::UnsupportedKeyType(_))
        ));
        assert_eq!(
            "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
                .parse::<VerifierKey>(),
            Err(CheckpointError::VerifierKeyHashMismatch)
        );
    }

    // === our checkpoints ===

    #[test]
    fn signed_checkpoint_round_trips_through_the_signed_note() {
        let key = new_keypair();
        for checkpoint in [
            sample(),
            Checkpoint {
                tree_size: 0,
                timestamp: 0,
                ..sample()
            },
            Checkpoint {
                tree_size: u64::MAX,
                timestamp: u64::MAX,
                root_hash: [0xff; 32],
                ..sample()
            },
        ] {
            let signed = checkpoint.sign(&key).unwrap();
            assert_eq!(verify(&public_key_of(&key), &signed), Ok(()));
            assert_eq!(
                parse_signed_note(&signed.signed_note(), &signed.verifier_key()),
                Ok(checkpoint.clone())
            );
            assert_eq!(
                Checkpoint::from_note_text(&checkpoint.note_text()),
                Ok(checkpoint)
            );
        }
    }

    #[test]
    fn signature_is_over_the_exact_note_text() {
        let key = new_keypair();
        let signed = sample().sign(&key).unwrap();
        let text = sample().note_text();
        UnparsedPublicKey::new(&ED25519, signed.public_key)
            .verify(text.as_bytes(), &signed.signature)
            .unwrap();
        let note = signed.signed_note();
        let line = note.strip_prefix(&format!("{text}\n")).unwrap();
        let blob = line
            .strip_prefix(&format!("\u{2014} {LOG_ID} "))
            .and_then(|b| b.strip_suffix('\n'))
            .unwrap();
        let blob = BASE64.decode(blob).unwrap();
        assert_eq!(blob[..4], signed.key_hash());
        assert_eq!(blob[4..], signed.signature);
    }

    #[test]
    fn verifier_key_has_the_c2sp_structure() {
        let key = new_keypair();
        let signed = sample().sign(&key).unwrap();
        let verifier_key = signed.verifier_key();
        let (name, rest) = verifier_key.split_once('+').unwrap();
        let (hash_hex, key_b64) = rest.split_once('+').unwrap();
        assert_eq!(name, LOG_ID);
        assert_eq!(hash_hex.len(), 8);
        assert!(hash_hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        let mut preimage = format!("{LOG_ID}\n").into_bytes();
        preimage.push(0x01);
        preimage.extend_from_slice(&signed.public_key);
        let digest = digest::digest(&digest::SHA256, &preimage);
        let want: String = digest.as_ref()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hash_hex, want);
        let raw = BASE64.decode(key_b64).unwrap();
        assert_eq!(raw.len(), 33);
        assert_eq!(raw[0], 0x01);
        assert_eq!(raw[1..], signed.public_key);
        let parsed: VerifierKey = verifier_key.parse().unwrap();
        assert_eq!(parsed.to_string(), verifier_key);
    }

    #[test]
    fn flipped_bit_in_any_field_fails_verification() {
        let key = new_keypair();
        let pk = public_key_of(&key);
        let signed = sample().sign(&key).unwrap();
        let rejected = |m: &SignedCheckpoint, what: String| {
            assert_eq!(verify(&pk, m), Err(CheckpointError::BadSignature), "{what}");
        };
        for bit in 0..64 {
            let mut m = signed.clone();
            m.checkpoint.tree_size ^= 1 << bit;
            rejected(&m, format!("tree_size bit {bit}"));
            let mut m = signed.clone();
            m.checkpoint.timestamp ^= 1 << bit;
            rejected(&m, format!("timestamp bit {bit}"));
        }
        for bit in 0..256 {
            let mut m = signed.clone();
            m.checkpoint.root_hash[bit / 8] ^= 1 << (bit % 8);
            rejected(&m, format!("root bit {bit}"));
        }
        for bit in 0..SIGNATURE_LEN * 8 {
            let mut m = signed.clone();
            m.signature[bit / 8] ^= 1 << (bit % 8);
            rejected(&m, format!("signature bit {bit}"));
        }
        for bit in 0..LOG_ID.len() * 8 {
            let mut id = LOG_ID.as_bytes().to_vec();
            id[bit / 8] ^= 1 << (bit % 8);
            if let Ok(log_id) = String::from_utf8(id) {
                let mut m = signed.clone();
                m.checkpoint.log_id = log_id;
                rejected(&m, format!("log_id bit {bit}"));
            }
        }
        for bit in 0..PUBLIC_KEY_LEN * 8 {
            let mut m = signed.clone();
            m.public_key[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(verify(&pk, &m), Err(CheckpointError::PublicKeyMismatch));
            assert_eq!(
                verify(&m.public_key, &m),
                Err(CheckpointError::BadSignature),
                "public key bit {bit}"
            );
        }
    }

    #[test]
    fn flipped_bit_anywhere_in_the_signed_note_is_rejected() {
        let key = new_keypair();
        let signed = sample().sign(&key).unwrap();
        let (note, verifier_key) = (signed.signed_note(), signed.verifier_key());
        let mut tried = 0;
        for bit in 0..note.len() * 8 {
            let mut bytes = note.clone().into_bytes();
            bytes[bit / 8] ^= 1 << (bit % 8);
            // A flip that breaks UTF-8 is refused before it reaches the parser.
            if let Ok(mutated) = String::from_utf8(bytes) {
                tried += 1;
                assert!(
                    parse_signed_note(&mutated, &verifier_key).is_err(),
                    "accepted bit {bit}: {mutated:?}"
                );
            }
        }
        assert!(tried > note.len() * 6);
    }

    #[test]
    fn signature_under_another_key_hash_is_rejected() {
        let key = new_keypair();
        let signed = sample().sign(&key).unwrap();
        // The same name, a different key: its key hash differs from the line's.
        let other = VerifierKey::new(LOG_ID, public_key_of(&new_keypair())).unwrap();
        assert_eq!(
            parse_signed_note(&signed.signed_note(), &other.to_string()),
            Err(CheckpointError::KeyHashMismatch(LOG_ID.into()))
        );
        // The right key, but the line's key hash altered.
        let mut blob = signed.key_hash().to_vec();
        blob[0] ^= 1;
        blob.extend_from_slice(&signed.signature);
        let note = format!(
            "{}\n\u{2014} {LOG_ID} {}\n",
            sample().note_text(),
            BASE64.encode(blob)
        );
        assert_eq!(
            parse_signed_note(&note, &signed.verifier_key()),
            Err(CheckpointError::KeyHashMismatch(LOG_ID.into()))
        );
        // Another name altogether.
        let stranger = VerifierKey::new("other.example/log", signed.public_key).unwrap();
        assert_eq!(
            parse_signed_note(&signed.signed_note(), &stranger.to_string()),
            Err(CheckpointError::NoSignatureFromKey(
                "other.example/log".into()
            ))
        );
    }

    #[test]
    fn wrong_trusted_key_is_refused() {
        let signed = sample().sign(&new_keypair()).unwrap();
        let other = public_key_of(&new_keypair());
        assert_eq!(
            verify(&other, &signed),
            Err(CheckpointError::PublicKeyMismatch)
        );
    }

    #[test]
    fn checkpoint_origin_must_be_the_key_name() {
        let key = new_keypair();
        let note = sign_note(&sample().note_text(), "other.example/log", &key).unwrap();
        let verifier = VerifierKey::new("other.example/log", public_key_of(&key)).unwrap();
        assert_eq!(
            parse_signed_note(&note, &verifier.to_string()),
            Err(CheckpointError::OriginMismatch {
                origin: LOG_ID.into(),
                key_name: "other.example/log".into()
            })
        );
    }

    #[test]
    fn malformed_checkpoint_bodies_are_rejected() {
        let key = new_keypair();
        let verifier = VerifierKey::new(LOG_ID, public_key_of(&key))
            .unwrap()
            .to_string();
        let root = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
        let bodies = [
            format!("{LOG_ID}\n042\n{root}\n1\n"),
            format!("{LOG_ID}\n+42\n{root}\n1\n"),
            format!("{LOG_ID}\n-1\n{root}\n1\n"),
            format!("{LOG_ID}\n 42\n{root}\n1\n"),
            format!("{LOG_ID}\n18446744073709551616\n{root}\n1\n"),
            format!("{LOG_ID}\n42\n{root}\n"),
            format!("{LOG_ID}\n42\n{root}\n1\nextension\n"),
            format!("{LOG_ID}\n42\n{root}\n01\n"),
            format!("{LOG_ID}\n42\nAAAA\n1\n"),
            // Non-canonical: the last character's unused bits are set.
            format!("{LOG_ID}\n42\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFV=\n1\n"),
            format!("{LOG_ID}\n42\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU\n1\n"),
        ];
        for body in bodies {
            let note = sign_note(&body, LOG_ID, &key).unwrap();
            assert!(
                matches!(
                    parse_signed_note(&note, &verifier),
                    Err(CheckpointError::MalformedCheckpoint(_))
                ),
                "accepted {body:?}"
            );
        }
    }

    #[test]
    fn unusable_log_ids_cannot_be_signed() {
        let key = new_keypair();
        for log_id in ["", "a b", "a+b", "a\tb", "a\nb", "a\u{a0}b", "a\u{7f}b"] {
            let checkpoint = Checkpoint {
                log_id: log_id.into(),
                ..sample()
            };
            assert_eq!(
                checkpoint.sign(&key),
                Err(CheckpointError::InvalidKeyName(log_id.into()))
            );
        }
    }

    #[test]
    fn unsignable_note_texts_are_refused() {
        let key = new_keypair();
        for text in ["", "abc", "\n", "a\n\n", "a\x01\n"] {
            assert!(
                matches!(
                    sign_note(text, LOG_ID, &key),
                    Err(CheckpointError::InvalidNoteText(_))
                ),
                "signed {text:?}"
            );
        }
    }

    #[test]
    fn load_keypair_refuses_what_is_not_an_ed25519_pkcs8_key() {
        assert!(matches!(
            load_keypair(b"not a key"),
            Err(CheckpointError::InvalidPrivateKey(_))
        ));
        let mut pkcs8 = generate_pkcs8().unwrap();
        let last = pkcs8.len() - 1;
        pkcs8[last] ^= 1; // the embedded public key no longer matches
        assert!(matches!(
            load_keypair(&pkcs8),
            Err(CheckpointError::InvalidPrivateKey(_))
        ));
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(generate_pkcs8().unwrap(), generate_pkcs8().unwrap());
    }
}
