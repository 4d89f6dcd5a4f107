//! Sealing at rest: AES-256-GCM (ring) with a fresh random 96-bit nonce per value and
//! the value's identity (a concern id, a record id, an audit seq) as associated data,
//! so a sealed value moved to another key does not open.
//!
//! Layout: `0x01 ‖ nonce (12) ‖ ciphertext ‖ tag (16)`.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const VERSION: u8 = 1;

/// Why a value could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The key is not 32 bytes.
    #[error("a sealing key must be 32 bytes")]
    BadKey,
    /// The random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// The sealed bytes were altered, truncated, moved, or sealed under another key.
    #[error("sealed value does not open: altered, moved or wrong key")]
    Corrupt,
}

/// Random nonces made by [`Sealer::nonces`], each handed out once.
pub struct Nonces {
    bytes: Vec<u8>,
    next: usize,
}

impl Nonces {
    fn take(&mut self) -> Option<[u8; NONCE_LEN]> {
        let nonce = self.bytes.get(self.next..self.next + NONCE_LEN)?;
        self.next += NONCE_LEN;
        nonce.try_into().ok()
    }
}

/// Seals and opens values under one key.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl Sealer {
    /// A sealer for a 32-byte key.
    pub fn new(key: &[u8]) -> Result<Self, SealError> {
        let key = UnboundKey::new(&AES_256_GCM, key).map_err(|_| SealError::BadKey)?;
        Ok(Sealer {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        })
    }

    /// Seals `plain`, bound to `context`.
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        self.seal_with_nonce(nonce, context, plain)
    }

    /// Fresh random nonces for `n` values, from one call to the system generator
    /// (one system call for a whole group commit instead of one per entry).
    pub fn nonces(&self, n: usize) -> Result<Nonces, SealError> {
        let mut bytes = vec![0u8; n * NONCE_LEN];
        self.rng.fill(&mut bytes).map_err(|_| SealError::Random)?;
        Ok(Nonces { bytes, next: 0 })
    }

    /// Seals `plain`, bound to `context`, with the next of `nonces`; each is used
    /// once. Fails with [`SealError::Random`] when they have run out.
    pub fn seal_next(
        &self,
        nonces: &mut Nonces,
        context: &[u8],
        plain: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let nonce = nonces.take().ok_or(SealError::Random)?;
        self.seal_with_nonce(nonce, context, plain)
    }

    fn seal_with_nonce(
        &self,
        nonce: [u8; NONCE_LEN],
        context: &[u8],
        plain: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plain.len() + 16);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut out[1 + NONCE_LEN..],
            )
            .map_err(|_| SealError::Corrupt)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens a value sealed with `context`.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != VERSION {
            return Err(SealError::Corrupt);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[1..1 + NONCE_LEN]);
        let mut body = sealed[1 + NONCE_LEN..].to_vec();
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut body,
            )
            .map_err(|_| SealError::Corrupt)?;
        let n = plain.len();
        body.truncate(n);
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper_detection() {
        let s = Sealer::new(&[7u8; 32]).unwrap();
        let sealed = s.seal(b"ctx-1", b"the narrative").unwrap();
        assert!(!sealed.windows(9).any(|w| w == b"narrative"));
        assert_eq!(s.open(b"ctx-1", &sealed).unwrap(), b"the narrative");
        assert_eq!(s.open(b"ctx-2", &sealed), Err(SealError::Corrupt));
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(
                s.open(b"ctx-1", &bad),
                Err(SealError::Corrupt),
                "flip at {i}"
            );
        }
        assert_eq!(
            s.open(b"ctx-1", &sealed[..sealed.len() - 1]),
            Err(SealError::Corrupt)
        );
        let other = Sealer::new(&[8u8; 32]).unwrap();
        assert_eq!(other.open(b"ctx-1", &sealed), Err(SealError::Corrupt));
    }

    #[test]
    fn batched_nonces_are_distinct_used_once_and_open_like_any_seal() {
        let s = Sealer::new(&[7u8; 32]).unwrap();
        let mut nonces = s.nonces(3).unwrap();
        let sealed: Vec<Vec<u8>> = (0..3)
            .map(|i| s.seal_next(&mut nonces, b"ctx", &[i; 5]).unwrap())
            .collect();
        for (i, v) in sealed.iter().enumerate() {
            assert_eq!(s.open(b"ctx", v).unwrap(), vec![i as u8; 5]);
        }
        let mut used: Vec<&[u8]> = sealed.iter().map(|v| &v[1..1 + NONCE_LEN]).collect();
        used.sort();
        used.dedup();
        assert_eq!(used.len(), 3, "each nonce once");
        assert_eq!(
            s.seal_next(&mut nonces, b"ctx", b"x"),
            Err(SealError::Random),
            "no fourth"
        );
    }
}
