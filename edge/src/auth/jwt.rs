//! Access tokens: HS256 JWTs (jwt-compact) carrying the user's id and email.

use chrono::{DateTime, Duration, Utc};
use jwt_compact::alg::{Hs256, Hs256Key};
use jwt_compact::{AlgorithmExt, Claims, Header, TimeOptions, Token, UntrustedToken};
use serde::{Deserialize, Serialize};

use super::Principal;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct AccessClaims {
    sub: String,
    email: String,
    /// Token type, so a token minted for another use never passes as an access token.
    typ: String,
}

/// Why an access token was refused. The message is safe to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("invalid token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
}

/// Mints an access token for `user_id` valid `ttl_secs` from `now`.
pub fn issue(secret: &[u8], user_id: &str, email: &str, now: DateTime<Utc>, ttl_secs: i64) -> String {
    let options = TimeOptions::new(Duration::seconds(0), move || now);
    let claims = Claims::new(AccessClaims { sub: user_id.into(), email: email.into(), typ: "access".into() })
        .set_duration_and_issuance(&options, Duration::seconds(ttl_secs));
    Hs256
        .token(&Header::empty().with_token_type("JWT"), &claims, &Hs256Key::new(secret))
        .expect("HS256 signing cannot fail")
}

/// Checks signature, type and expiry (no leeway) and returns the user.
pub fn verify(secret: &[u8], token: &str, now: DateTime<Utc>) -> Result<Principal, JwtError> {
    verify_with_expiry(secret, token, now).map(|(principal, _)| principal)
}

/// [`verify`], also answering when the token expires (what a socket opened with it must not
/// outlive).
pub fn verify_with_expiry(secret: &[u8], token: &str, now: DateTime<Utc>) -> Result<(Principal, DateTime<Utc>), JwtError> {
    let untrusted = UntrustedToken::new(token).map_err(|_| JwtError::Malformed)?;
    if untrusted.algorithm() != "HS256" {
        return Err(JwtError::BadSignature);
    }
    let token: Token<AccessClaims> =
        Hs256.validator(&Hs256Key::new(secret)).validate(&untrusted).map_err(|e| match e {
            jwt_compact::ValidationError::InvalidSignature => JwtError::BadSignature,
            _ => JwtError::Malformed,
        })?;
    let options = TimeOptions::new(Duration::seconds(0), move || now);
    let claims = token.claims();
    let Some(expires) = claims.expiration else {
        return Err(JwtError::Malformed);
    };
    claims.validate_expiration(&options).map_err(|_| JwtError::Expired)?;
    if claims.custom.typ != "access" {
        return Err(JwtError::Malformed);
    }
    Ok((Principal::User { id: claims.custom.sub.clone(), email: claims.custom.email.clone() }, expires))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const SECRET: &[u8] = b"test-secret-0123456789";

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
    }

    #[test]
    fn a_fresh_token_verifies() {
        let t = issue(SECRET, "u1", "a@b.io", now(), 900);
        assert_eq!(
            verify(SECRET, &t, now() + Duration::seconds(899)),
            Ok(Principal::User { id: "u1".into(), email: "a@b.io".into() })
        );
    }

    #[test]
    fn verification_answers_the_expiry() {
        let t = issue(SECRET, "u1", "a@b.io", now(), 3);
        let (who, expires) = verify_with_expiry(SECRET, &t, now()).unwrap();
        assert_eq!(who, Principal::User { id: "u1".into(), email: "a@b.io".into() });
        assert_eq!(expires, now() + Duration::seconds(3));
        assert!(verify_with_expiry(SECRET, &t, now() + Duration::seconds(3)).is_ok(), "valid up to its exp");
        assert_eq!(verify_with_expiry(SECRET, &t, now() + Duration::seconds(4)), Err(JwtError::Expired));
    }

    #[test]
    fn expired_forged_and_malformed_tokens_are_refused() {
        let t = issue(SECRET, "u1", "a@b.io", now(), 900);
        assert_eq!(verify(SECRET, &t, now() + Duration::seconds(901)), Err(JwtError::Expired));
        assert_eq!(verify(b"another-secret", &t, now()), Err(JwtError::BadSignature));
        assert_eq!(verify(SECRET, "not.a.jwt", now()), Err(JwtError::Malformed));
        assert_eq!(verify(SECRET, "", now()), Err(JwtError::Malformed));
        // Payload swapped under a valid signature.
        let other = issue(SECRET, "u2", "c@d.io", now(), 900);
        let mut parts: Vec<&str> = t.split('.').collect();
        let other_parts: Vec<&str> = other.split('.').collect();
        parts[1] = other_parts[1];
        assert_eq!(verify(SECRET, &parts.join("."), now()), Err(JwtError::BadSignature));
    }

    #[test]
    fn unsigned_tokens_are_refused() {
        use base64::{engine::general_purpose::URL_SAFE_NO_PAD as B64, Engine};
        let header = B64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = B64.encode(br#"{"sub":"u1","email":"a@b.io","typ":"access","exp":4102444800}"#);
        assert!(verify(SECRET, &format!("{header}.{body}."), now()).is_err());
    }
}
