//! Secrets that must be read back (webhook HMAC secrets verify signatures, so they cannot be
//! stored as one-way hashes) are stored sealed: AES-256-GCM under a key derived from the Worker
//! secret `WEBHOOK_SECRET_KEY`, with a random 96-bit nonce each time and the owning row's id as
//! associated data (a sealed value copied onto another row does not open). Stored form:
//! `v1:<base64url(nonce || ciphertext || tag)>`. Pure, natively tested; randomness passed in.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The shortest `WEBHOOK_SECRET_KEY` accepted (characters).
pub const MIN_KEY_LEN: usize = 32;

const PREFIX: &str = "v1:";

/// The sealing key: HMAC-SHA256 of a fixed label under the configured secret (so the secret
/// itself never is the AES key, and another use of it would derive another key).
#[derive(Clone)]
pub struct SealKey([u8; 32]);

impl SealKey {
    /// From `WEBHOOK_SECRET_KEY`; `None` when it is unset or shorter than [`MIN_KEY_LEN`].
    pub fn from_secret(secret: &str) -> Option<SealKey> {
        let secret = secret.trim();
        if secret.chars().count() < MIN_KEY_LEN {
            return None;
        }
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
        m.update(b"kiln sealed secrets v1");
        Some(SealKey(m.finalize().into_bytes().into()))
    }

    /// Seals `plain` for the row `row_id` with `nonce` (12 random bytes, never reused).
    pub fn seal(&self, plain: &str, row_id: &str, nonce: [u8; 12]) -> String {
        let cipher = Aes256Gcm::new_from_slice(&self.0).expect("a 32-byte key");
        let ct = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain.as_bytes(), aad: row_id.as_bytes() })
            .expect("AES-GCM encrypts any message this size");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(out))
    }

    /// Opens a value [`SealKey::seal`] made for `row_id`; `None` when it was sealed under another
    /// key or for another row, or was altered.
    pub fn open(&self, sealed: &str, row_id: &str) -> Option<String> {
        let raw = URL_SAFE_NO_PAD.decode(sealed.strip_prefix(PREFIX)?).ok()?;
        if raw.len() < 12 + 16 {
            return None;
        }
        let (nonce, ct) = raw.split_at(12);
        let cipher = Aes256Gcm::new_from_slice(&self.0).ok()?;
        let plain = cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: row_id.as_bytes() }).ok()?;
        String::from_utf8(plain).ok()
    }
}

/// A new webhook secret from 32 random bytes: `whsec_<base64url>` (256 bits).
pub fn new_secret(random: [u8; 32]) -> String {
    format!("whsec_{}", URL_SAFE_NO_PAD.encode(random))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "a-development-key-of-at-least-32-characters";

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_row() {
        let k = SealKey::from_secret(KEY).unwrap();
        let s = k.seal("whsec_abc", "hook-1", [7; 12]);
        assert!(s.starts_with("v1:"));
        assert!(!s.contains("whsec_abc"));
        assert_eq!(k.open(&s, "hook-1").as_deref(), Some("whsec_abc"));
        assert_eq!(k.open(&s, "hook-2"), None, "another row's id");
        let other = SealKey::from_secret("another-key-that-is-also-32-characters-long").unwrap();
        assert_eq!(other.open(&s, "hook-1"), None, "another key");
        // Any altered byte fails the tag.
        let mut raw = URL_SAFE_NO_PAD.decode(&s[3..]).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert_eq!(k.open(&format!("v1:{}", URL_SAFE_NO_PAD.encode(&raw)), "hook-1"), None);
        assert_eq!(k.open("v1:short", "hook-1"), None);
        assert_eq!(k.open("whsec_abc", "hook-1"), None);
        // A fresh nonce gives a different sealed value for the same secret.
        assert_ne!(k.seal("whsec_abc", "hook-1", [8; 12]), s);
    }

    #[test]
    fn keys_must_be_long_enough() {
        assert!(SealKey::from_secret("").is_none());
        assert!(SealKey::from_secret(&"x".repeat(31)).is_none());
        assert!(SealKey::from_secret(&"x".repeat(32)).is_some());
    }

    #[test]
    fn new_secrets_carry_256_bits() {
        let s = new_secret([255; 32]);
        assert!(s.starts_with("whsec_"));
        assert_eq!(s.len(), 6 + 43);
        assert_ne!(new_secret([1; 32]), new_secret([2; 32]));
    }
}
