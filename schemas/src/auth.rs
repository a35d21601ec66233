//! Auth bodies (seed 000 §1), in the shapes of Django REST framework + simplejwt that seed 000's
//! frontend was written against: register, login, refresh (rotating), me, logout.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `POST /api/auth/register/`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RegisterRequest {
    pub email: String,
    pub password: String,
    #[serde(default)]
    pub username: Option<String>,
    /// Display name (the frontend's `name`); at most 150 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `POST /api/auth/login/`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

/// `POST /api/auth/refresh/` (also `/api/auth/token/refresh/`) and `POST /api/auth/logout/`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RefreshRequest {
    pub refresh: String,
}

/// Answer of refresh: a short-lived access JWT (with `exp`) and a new single-use refresh token
/// (the one sent is spent: rotation).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TokenPair {
    pub access: String,
    pub refresh: String,
}

/// A user as the frontend shows it: `GET /api/auth/me/` and the `user` of login and register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserView {
    pub id: String,
    pub email: String,
    /// The display name given at registration; empty when none was given (never null).
    pub name: String,
}

/// Answer of login: the token pair and the user.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct LoginResponse {
    pub access: String,
    pub refresh: String,
    pub user: UserView,
}

/// Answer of register (201): the user's fields at the top level (as before tokens were issued at
/// registration), and the same tokens and user as a login answers.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RegisteredUser {
    pub id: String,
    pub email: String,
    pub username: Option<String>,
    pub name: String,
    pub access: String,
    pub refresh: String,
    pub user: UserView,
}

/// Answer of logout and other actions without a resource: DRF's `{"detail": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Detail {
    pub detail: String,
}

/// The largest display name or username accepted, in bytes.
pub const MAX_NAME_LEN: usize = 150;

/// Checks an optional display name or username: absent or null is `None`; otherwise a non-empty
/// string (trimmed) of at most [`MAX_NAME_LEN`] bytes.
pub fn optional_name(field: &str, value: Option<&serde_json::Value>) -> Result<Option<String>, String> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(v)) if !v.trim().is_empty() && v.trim().len() <= MAX_NAME_LEN => {
            Ok(Some(v.trim().to_string()))
        }
        Some(_) => Err(format!("{field} must be a non-empty string of at most {MAX_NAME_LEN} bytes")),
    }
}

/// The smallest password length accepted at registration.
pub const MIN_PASSWORD_LEN: usize = 8;
/// The largest password accepted (bounds hashing cost).
pub const MAX_PASSWORD_LEN: usize = 256;

/// Checks an email address for the shape `local@domain.tld` and normalises it to lower case.
pub fn normalize_email(email: &str) -> Result<String, &'static str> {
    let email = email.trim();
    if email.is_empty() {
        return Err("email is required");
    }
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("email is not a valid address");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err("email is not a valid address");
    };
    if local.is_empty() || domain.contains('@') || !domain.contains('.') || domain.starts_with('.')
        || domain.ends_with('.')
    {
        return Err("email is not a valid address");
    }
    Ok(email.to_ascii_lowercase())
}

/// Refuses empty, short, overlong and single-character-class passwords.
pub fn check_password_strength(password: &str) -> Result<(), String> {
    if password.is_empty() {
        return Err("password is required".into());
    }
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_LEN {
        return Err(format!("password must be at least {MIN_PASSWORD_LEN} characters"));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(format!("password must be at most {MAX_PASSWORD_LEN} bytes"));
    }
    let classes = [
        password.chars().any(|c| c.is_ascii_lowercase()),
        password.chars().any(|c| c.is_ascii_uppercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_ascii_alphanumeric()),
    ];
    if classes.iter().filter(|c| **c).count() < 2 {
        return Err("password is too weak: mix letters with digits, capitals or symbols".into());
    }
    let first = password.chars().next();
    if password.chars().all(|c| Some(c) == first) {
        return Err("password is too weak".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_checked_and_lowercased() {
        assert_eq!(normalize_email(" Ann@Example.COM ").unwrap(), "ann@example.com");
        for bad in ["", "ann", "ann@", "@x.io", "ann@localhost", "a b@x.io", "a@b@x.io", "a@.x"] {
            assert!(normalize_email(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn names_are_optional_trimmed_and_bounded() {
        use serde_json::json;
        assert_eq!(optional_name("name", None), Ok(None));
        assert_eq!(optional_name("name", Some(&json!(null))), Ok(None));
        assert_eq!(optional_name("name", Some(&json!(" Ann Lee "))), Ok(Some("Ann Lee".into())));
        assert!(optional_name("name", Some(&json!("  "))).is_err());
        assert!(optional_name("name", Some(&json!(7))).is_err());
        assert!(optional_name("name", Some(&json!("x".repeat(151)))).unwrap_err().contains("name must be"));
        assert_eq!(optional_name("name", Some(&json!("x".repeat(150)))), Ok(Some("x".repeat(150))));
    }

    #[test]
    fn weak_passwords_are_refused() {
        for bad in ["", "short1", "alllowercase", "12345678", "AAAAAAAAAA"] {
            assert!(check_password_strength(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(check_password_strength(&"a1".repeat(200)).is_err(), "overlong");
        assert!(check_password_strength("correct horse 1").is_ok());
        assert!(check_password_strength("Tr0ub4dor&3").is_ok());
    }
}
