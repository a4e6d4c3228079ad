//! Encryption at rest: vendor secrets and signing keys are sealed with AES-256-GCM under
//! the 32-byte master key. The associated data binds each ciphertext to its row (tenant
//! and vendor, or kid), so a sealed value copied to another row does not open.

use crate::ids::random_bytes;
use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use std::path::Path;

pub struct MasterKey(LessSafeKey);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey([redacted])")
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != 32 {
            bail!("the master key must be 32 bytes, got {}", bytes.len());
        }
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| anyhow!("bad master key"))?;
        Ok(MasterKey(LessSafeKey::new(key)))
    }

    /// Base64 (standard or URL-safe) of 32 bytes, as in `KEYBRAKE_MASTER_KEY` or a key file.
    pub fn from_base64(text: &str) -> Result<Self> {
        let text = text.trim();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .or_else(|_| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text.trim_end_matches('='))
            })
            .map_err(|_| anyhow!("the master key is not valid base64"))?;
        Self::from_bytes(&bytes)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read master key file {}", path.display()))?;
        Self::from_base64(&text).with_context(|| format!("master key file {}", path.display()))
    }

    pub fn generate_base64() -> String {
        base64::engine::general_purpose::STANDARD.encode(random_bytes::<32>())
    }

    pub fn seal(&self, plaintext: &[u8], aad: &str) -> Vec<u8> {
        let nonce_bytes: [u8; NONCE_LEN] = random_bytes();
        let mut out = plaintext.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad.as_bytes()),
                &mut out,
            )
            .expect("AES-GCM sealing cannot fail for in-range lengths");
        let mut sealed = nonce_bytes.to_vec();
        sealed.extend_from_slice(&out);
        sealed
    }

    pub fn open(&self, sealed: &[u8], aad: &str) -> Result<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            bail!("sealed value too short");
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| anyhow!("bad nonce"))?;
        let mut buf = ciphertext.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| anyhow!("cannot decrypt: wrong master key or corrupted data"))?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_only_with_the_same_key_and_row() {
        let key = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        let sealed = key.seal(b"sk_test_secret", "tn_1/stripe");
        assert!(!sealed.windows(14).any(|w| w == b"sk_test_secret"));
        assert_eq!(key.open(&sealed, "tn_1/stripe").unwrap(), b"sk_test_secret");
        assert!(key.open(&sealed, "tn_2/stripe").is_err());
        let other = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        assert!(other.open(&sealed, "tn_1/stripe").is_err());
        assert!(MasterKey::from_base64("c2hvcnQ=").is_err());
    }
}
