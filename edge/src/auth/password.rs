//! Salted, slow password hashes: PBKDF2-HMAC-SHA256, stored as
//! `pbkdf2-sha256$<iterations>$<salt b64>$<hash b64>`. The stored string carries its parameters, so
//! the cost can change: a hash made with other parameters still verifies, and [`needs_rehash`]
//! tells login to store a fresh one. The count for new hashes is the setting `PASSWORD_ITERATIONS`
//! (ARCHITECTURE.md, "Password hashing", has its measured cost and why production uses OWASP's
//! figure).

use base64::{engine::general_purpose::STANDARD_NO_PAD as B64, Engine};
use sha2::Sha256;

/// Iterations for new hashes when `PASSWORD_ITERATIONS` is not set: OWASP's current figure for
/// PBKDF2-HMAC-SHA256.
pub const ITERATIONS: u32 = 600_000;
/// The least `PASSWORD_ITERATIONS` may ask for (a smaller setting is raised to it).
pub const MIN_ITERATIONS: u32 = 100_000;

const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;
/// Iteration counts a stored hash may carry; anything outside never verifies (a tampered row
/// cannot make a login free or make it burn minutes of CPU).
const ACCEPTED: std::ops::RangeInclusive<u32> = 1_000..=10_000_000;

/// The iteration count for new hashes from the setting: [`ITERATIONS`] when unset, never below
/// [`MIN_ITERATIONS`] nor above what a stored hash may carry.
pub fn iterations(setting: Option<u32>) -> u32 {
    setting.unwrap_or(ITERATIONS).clamp(MIN_ITERATIONS, *ACCEPTED.end())
}

/// Hashes `password` with a fresh 16-byte salt.
pub fn hash(password: &str, salt: [u8; SALT_LEN], iterations: u32) -> String {
    hash_with(password, &salt, iterations)
}

/// Hashes `password` at an explicit iteration count (for tests and for hashes of older
/// parameters).
pub fn hash_with(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut out = [0u8; HASH_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut out);
    format!("pbkdf2-sha256${iterations}${}${}", B64.encode(salt), B64.encode(out))
}

/// The parameters a stored hash was made with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parsed {
    iterations: u32,
    salt: Vec<u8>,
    hash_len: usize,
}

fn parse(stored: &str) -> Option<Parsed> {
    let mut parts = stored.split('$');
    let (Some("pbkdf2-sha256"), Some(iters), Some(salt), Some(hash), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let iterations = iters.parse::<u32>().ok().filter(|i| ACCEPTED.contains(i))?;
    let salt = B64.decode(salt).ok().filter(|s| !s.is_empty())?;
    let hash_len = B64.decode(hash).ok()?.len();
    Some(Parsed { iterations, salt, hash_len })
}

/// Checks `password` against a stored hash in constant time. Malformed hashes never verify.
pub fn verify(password: &str, stored: &str) -> bool {
    let Some(parsed) = parse(stored) else {
        return false;
    };
    let fresh = hash_with(password, &parsed.salt, parsed.iterations);
    super::tokens::constant_time_eq(fresh.as_bytes(), stored.as_bytes())
}

/// A well-formed hash at today's parameters (`iterations`) that no password matches (its derived
/// key is all zeros). Login verifies against it when the email is unknown, so an unknown email
/// costs exactly what a wrong password costs and answers the same.
pub fn dummy_hash(iterations: u32) -> String {
    format!("pbkdf2-sha256${iterations}${}${}", B64.encode([0x5a; SALT_LEN]), B64.encode([0u8; HASH_LEN]))
}

/// Whether a stored hash (that just verified) was made with other parameters than new hashes
/// are (`iterations`): then login stores a fresh hash of the password it was given.
pub fn needs_rehash(stored: &str, iterations: u32) -> bool {
    match parse(stored) {
        Some(p) => p.iterations != iterations || p.salt.len() != SALT_LEN || p.hash_len != HASH_LEN,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Hashes at production's count cost seconds unoptimised: the tests use the least count a
    // setting can ask for, which exercises the same code.
    const N: u32 = MIN_ITERATIONS;

    #[test]
    fn hashes_verify_are_salted_and_carry_their_parameters() {
        let a = hash("correct horse 1", [1; 16], N);
        assert!(a.starts_with("pbkdf2-sha256$100000$"), "{a}");
        assert!(verify("correct horse 1", &a));
        assert!(!verify("correct horse 2", &a));
        assert!(!needs_rehash(&a, N), "a fresh hash has the current parameters");
        let b = hash_with("correct horse 1", &[2; 16], 1_000);
        let c = hash_with("correct horse 1", &[3; 16], 1_000);
        assert_ne!(b, c, "different salts give different hashes");
        assert!(verify("correct horse 1", &b), "a hash of another count still verifies");
    }

    #[test]
    fn the_setting_defaults_to_owasps_figure_and_has_a_floor() {
        assert_eq!(iterations(None), 600_000);
        assert_eq!(iterations(Some(1_000_000)), 1_000_000);
        assert_eq!(iterations(Some(10)), MIN_ITERATIONS, "never below the floor");
        assert_eq!(iterations(Some(u32::MAX)), 10_000_000, "never more than a stored hash may carry");
    }

    #[test]
    fn hashes_of_other_parameters_ask_for_a_rehash() {
        let old = hash_with("Tr0ub4dor&3", &[9; 16], 1_000);
        assert!(verify("Tr0ub4dor&3", &old), "old parameters still verify");
        assert!(!verify("Tr0ub4dor&4", &old));
        assert!(needs_rehash(&old, N), "fewer iterations than today's");
        assert!(!needs_rehash(&old, 1_000));
        let made = |iterations: u32, salt: &[u8], key: &[u8]| {
            format!("pbkdf2-sha256${iterations}${}${}", B64.encode(salt), B64.encode(key))
        };
        assert!(needs_rehash(&made(N + 1, &[9; 16], &[1; 32]), N), "more iterations is also a change");
        assert!(needs_rehash(&made(N, &[9; 8], &[1; 32]), N), "a shorter salt");
        assert!(needs_rehash(&made(N, &[9; 16], &[1; 20]), N), "a shorter key");
        assert!(needs_rehash("md5$1$x$y", N), "another scheme");
        assert!(!needs_rehash(&made(N, &[1; 16], &[2; 32]), N));
    }

    #[test]
    fn the_dummy_hash_costs_the_same_and_matches_nothing() {
        let dummy = dummy_hash(N);
        assert!(!needs_rehash(&dummy, N), "the dummy has today's parameters, so it costs what a real hash costs");
        assert_eq!(parse(&dummy).map(|p| p.iterations), Some(N));
        assert!(!verify("Correct-Horse-9", &dummy));
        assert!(!verify("", &dummy));
    }

    #[test]
    fn malformed_hashes_never_verify() {
        for bad in [
            "",
            "x",
            "pbkdf2-sha256$1$AAAA$AAAA",
            "pbkdf2-sha256$999999999$AAAA$AAAA",
            "md5$100000$AAAA$AAAA",
            "pbkdf2-sha256$100000$!!$x$y",
            "pbkdf2-sha256$100000$$AAAA",
        ] {
            assert!(!verify("anything", bad), "{bad}");
        }
    }
}
