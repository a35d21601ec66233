//! Opaque bearer tokens (refresh tokens, runner tokens): random, shown once, stored as SHA-256.
//! A high-entropy random token needs no slow hash: its hash is the lookup key.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A new token: a prefix naming its use plus 32 random bytes, hex encoded.
pub fn generate(prefix: &str, random: [u8; 32]) -> String {
    format!("{prefix}_{}", hex(&random))
}

/// The value stored in place of a token.
pub fn digest(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_digests() {
        let t = generate("kr", [7; 32]);
        assert!(t.starts_with("kr_") && t.len() == 3 + 64);
        assert_eq!(digest(&t), digest(&t));
        assert_ne!(digest(&t), digest("kr_other"));
        assert_eq!(digest("").len(), 64);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
