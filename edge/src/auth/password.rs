//! Salted, slow password hashes: PBKDF2-HMAC-SHA256, stored as
//! `pbkdf2-sha256$<iterations>$<salt b64>$<hash b64>` so the cost can be raised later.

use base64::{engine::general_purpose::STANDARD_NO_PAD as B64, Engine};
use sha2::Sha256;

/// Iterations for new hashes (OWASP's 2023 figure for PBKDF2-SHA256 is 600k; Workers CPU limits
/// make 100k the practical ceiling for an interactive login, about 60 ms of wasm).
pub const ITERATIONS: u32 = 100_000;

/// Hashes `password` with a fresh 16-byte salt.
pub fn hash(password: &str, salt: [u8; 16]) -> String {
    hash_with(password, &salt, ITERATIONS)
}

fn hash_with(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut out);
    format!("pbkdf2-sha256${iterations}${}${}", B64.encode(salt), B64.encode(out))
}

/// Checks `password` against a stored hash in constant time. Malformed hashes never verify.
pub fn verify(password: &str, stored: &str) -> bool {
    let mut parts = stored.split('$');
    let (Some("pbkdf2-sha256"), Some(iters), Some(salt), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Ok(iterations), Ok(salt)) = (iters.parse::<u32>(), B64.decode(salt)) else {
        return false;
    };
    if !(1_000..=10_000_000).contains(&iterations) {
        return false;
    }
    let fresh = hash_with(password, &salt, iterations);
    super::tokens::constant_time_eq(fresh.as_bytes(), stored.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_are_salted() {
        let a = hash("correct horse 1", [1; 16]);
        let b = hash("correct horse 1", [2; 16]);
        assert_ne!(a, b, "different salts give different hashes");
        assert!(verify("correct horse 1", &a));
        assert!(!verify("correct horse 2", &a));
        assert!(a.starts_with("pbkdf2-sha256$100000$"));
    }

    #[test]
    fn malformed_hashes_never_verify() {
        for bad in ["", "x", "pbkdf2-sha256$1$AAAA$AAAA", "md5$100000$AAAA$AAAA", "pbkdf2-sha256$100000$!!$x$y"] {
            assert!(!verify("anything", bad), "{bad}");
        }
    }
}
