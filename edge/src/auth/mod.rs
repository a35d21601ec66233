//! Credentials: password hashing, access JWTs, opaque tokens (refresh and runner tokens) and the
//! principal a request acts as. Pure code, tested natively; the clock is always passed in.

pub mod jwt;
pub mod password;
pub mod tokens;


/// Who a request acts as. Every job, client and repository is owned by an `owner` string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A registered user (from an access JWT).
    User { id: String, email: String },
    /// The service credential `AGENT_API_SECRET` (seed 003): its own owner, `service`.
    Service,
}

impl Principal {
    /// The owner key stored on every resource this principal creates.
    pub fn owner(&self) -> &str {
        match self {
            Principal::User { id, .. } => id,
            Principal::Service => "service",
        }
    }

    /// A display name for chat messages.
    pub fn display_name(&self) -> &str {
        match self {
            Principal::User { email, .. } => email,
            Principal::Service => "service",
        }
    }
}

/// Pulls the token out of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }
}
