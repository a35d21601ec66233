//! Repository grants: which repositories a user's jobs may touch (`POST /grants`, managed by the
//! service principal), and the protected branches no job ever pushes to. Pure matching rules shared
//! by the edge (which refuses at create) and the runner (which checks again before it acts).
//!
//! A grant names an owner (a user id, an email, or `*` for every user) and a repository pattern:
//! `org/repo` exactly, or `org/*` for every repository of an org. Matching is case-insensitive, as
//! GitHub's names are.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::auth::normalize_email;
use crate::validate::{is_repo_component, is_uuid};

/// The owner of a grant to every user.
pub const EVERYONE: &str = "*";

/// The default of the edge's `PROTECTED_BRANCHES` setting.
pub const DEFAULT_PROTECTED_BRANCHES: &str = "main,master,develop,release/*";

/// `org/repo` or `org/*`, lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoPattern {
    org: String,
    /// `None` for `org/*`.
    repo: Option<String>,
}

impl RepoPattern {
    /// Parses `org/repo` or `org/*`. Errors are fit for a 400.
    pub fn parse(s: &str) -> Result<RepoPattern, String> {
        let bad = || format!("repository must be \"org/repo\" or \"org/*\" (got {s:?})");
        let (org, repo) = s.trim().split_once('/').ok_or_else(bad)?;
        if !is_repo_component(org) {
            return Err(bad());
        }
        let repo = match repo {
            "*" => None,
            r if is_repo_component(r) => Some(r.to_ascii_lowercase()),
            _ => return Err(bad()),
        };
        Ok(RepoPattern { org: org.to_ascii_lowercase(), repo })
    }

    /// Whether `org/repo` is covered (case-insensitively).
    pub fn matches(&self, org: &str, repo: &str) -> bool {
        self.org.eq_ignore_ascii_case(org) && self.repo.as_deref().is_none_or(|r| r.eq_ignore_ascii_case(repo))
    }
}

impl std::fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.org, self.repo.as_deref().unwrap_or("*"))
    }
}

/// Whether any of `patterns` (stored grant repositories; unreadable ones are ignored) covers
/// `org/repo`.
pub fn is_granted<'a>(patterns: impl IntoIterator<Item = &'a str>, org: &str, repo: &str) -> bool {
    patterns.into_iter().filter_map(|p| RepoPattern::parse(p).ok()).any(|p| p.matches(org, repo))
}

/// The 403 message for a repository that is not granted.
pub fn not_granted_message(org: &str, repo: &str) -> String {
    format!("repository {org}/{repo} is not granted to this account; an operator grants it with POST /grants")
}

/// Who a grant is for: every user, one user by id, or one user by email (which may register later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantOwner {
    Everyone,
    UserId(String),
    Email(String),
}

impl GrantOwner {
    /// Parses `*`, a user id (UUID) or an email. Errors are fit for a 400.
    pub fn parse(s: &str) -> Result<GrantOwner, String> {
        let s = s.trim();
        if s == EVERYONE {
            Ok(GrantOwner::Everyone)
        } else if is_uuid(s) {
            Ok(GrantOwner::UserId(s.to_ascii_lowercase()))
        } else if s.contains('@') {
            normalize_email(s).map(GrantOwner::Email).map_err(|e| format!("owner: {e}"))
        } else {
            Err("owner must be a user id, an email, or \"*\" for every user".into())
        }
    }

    /// The stored form: `*`, the lowercase id, or the normalized email.
    pub fn as_str(&self) -> &str {
        match self {
            GrantOwner::Everyone => EVERYONE,
            GrantOwner::UserId(s) | GrantOwner::Email(s) => s,
        }
    }
}

/// `POST /grants`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GrantRequest {
    /// A user id, an email, or `*` for every user.
    pub owner: String,
    /// `org/repo` or `org/*`.
    pub repository: String,
}

/// A validated [`GrantRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGrant {
    pub owner: GrantOwner,
    pub repository: RepoPattern,
}

impl NewGrant {
    /// Validates a `POST /grants` body. Errors are fit for a 400.
    pub fn parse(body: &Value) -> Result<NewGrant, String> {
        let obj = body.as_object().ok_or("request body must be a JSON object")?;
        let field = |k: &str| match obj.get(k) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.as_str()),
            None | Some(Value::Null) | Some(Value::String(_)) => Err(format!("{k} is required")),
            Some(_) => Err(format!("{k} must be a string")),
        };
        let owner = GrantOwner::parse(field("owner")?)?;
        let repository = RepoPattern::parse(field("repository")?)?;
        Ok(NewGrant { owner, repository })
    }
}

/// A grant as the API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Grant {
    pub id: String,
    /// `*`, a user id, or an email.
    pub owner: String,
    /// `org/repo` or `org/*`, lowercase.
    pub repository: String,
    pub created_at: String,
}

/// `GET /grants`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GrantList {
    pub grants: Vec<Grant>,
}

/// The branches no job may push to: exact names, or prefixes ending in `*` (`release/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedBranches {
    patterns: Vec<String>,
}

impl Default for ProtectedBranches {
    fn default() -> Self {
        ProtectedBranches::parse(DEFAULT_PROTECTED_BRANCHES)
    }
}

impl ProtectedBranches {
    /// A comma-separated list (`main,master,develop,release/*`); blanks are skipped.
    pub fn parse(list: &str) -> ProtectedBranches {
        ProtectedBranches {
            patterns: list.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_string).collect(),
        }
    }

    /// The patterns, in order.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether `branch` is protected: it matches a pattern, or it is the repository's default
    /// branch (when known). Git branch names are case-sensitive; so is this.
    pub fn protects(&self, branch: &str, default_branch: Option<&str>) -> bool {
        default_branch == Some(branch)
            || self.patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => branch.starts_with(prefix),
                None => p == branch,
            })
    }

    /// `Err` with the 400 message when `branch` is protected.
    pub fn check(&self, branch: &str, default_branch: Option<&str>) -> Result<(), String> {
        if !self.protects(branch, default_branch) {
            return Ok(());
        }
        let mut list = self.patterns.join(", ");
        if let Some(d) = default_branch.filter(|d| !self.patterns.iter().any(|p| p == d)) {
            list = format!("{list}, {d} (the repository's default branch)");
        }
        Err(format!(
            "branchName {branch} is protected: Kiln never pushes to {list}; name a feature branch instead"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exact_patterns_match_one_repository_case_insensitively() {
        let p = RepoPattern::parse("Acme/Shop").unwrap();
        assert_eq!(p.to_string(), "acme/shop");
        assert!(p.matches("acme", "shop"));
        assert!(p.matches("ACME", "sHoP"));
        assert!(!p.matches("acme", "shop2"));
        assert!(!p.matches("acme", "sho"));
        assert!(!p.matches("acme-evil", "shop"));
        assert!(!p.matches("evil", "shop"));
    }

    #[test]
    fn org_patterns_match_every_repository_of_the_org_only() {
        let p = RepoPattern::parse("acme/*").unwrap();
        assert!(p.matches("acme", "shop"));
        assert!(p.matches("Acme", "anything.else"));
        assert!(!p.matches("acmecorp", "shop"), "a prefix of the org is not the org");
        assert!(!p.matches("acm", "shop"));
        assert!(!p.matches("other", "shop"));
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in ["", "acme", "acme/", "/shop", "*/*", "*/shop", "acme/sh*", "acme/shop/x", "../x", "acme/..", "a b/c", "acme/**"] {
            assert!(RepoPattern::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn is_granted_looks_at_every_pattern_and_ignores_unreadable_ones() {
        let stored = ["garbage", "other/x", "acme/*"];
        assert!(is_granted(stored, "acme", "shop"));
        assert!(!is_granted(stored, "other", "y"));
        assert!(is_granted(stored, "other", "X"));
        assert!(!is_granted([], "acme", "shop"), "nothing is granted by default");
        assert_eq!(
            not_granted_message("acme", "shop"),
            "repository acme/shop is not granted to this account; an operator grants it with POST /grants"
        );
    }

    #[test]
    fn owners_are_everyone_an_id_or_an_email() {
        assert_eq!(GrantOwner::parse("*"), Ok(GrantOwner::Everyone));
        let id = "0A6F1E2B-1C3D-4E5F-8A9B-0C1D2E3F4A5B";
        assert_eq!(GrantOwner::parse(id), Ok(GrantOwner::UserId(id.to_ascii_lowercase())));
        assert_eq!(GrantOwner::parse(" Ann@Example.com "), Ok(GrantOwner::Email("ann@example.com".into())));
        for bad in ["", "ann", "**", "service", "ann@", "@x.io"] {
            assert!(GrantOwner::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn grant_requests_are_validated() {
        let ok = NewGrant::parse(&json!({"owner": "*", "repository": "Acme/Shop"})).unwrap();
        assert_eq!((ok.owner.as_str(), ok.repository.to_string()), ("*", "acme/shop".to_string()));
        for body in [
            json!({}),
            json!({"owner": "*"}),
            json!({"repository": "acme/shop"}),
            json!({"owner": 1, "repository": "acme/shop"}),
            json!({"owner": "*", "repository": "acme"}),
            json!({"owner": "nobody", "repository": "acme/shop"}),
            json!(["*", "acme/shop"]),
        ] {
            assert!(NewGrant::parse(&body).is_err(), "{body} was accepted");
        }
    }

    #[test]
    fn protected_branches_are_exact_names_prefixes_and_the_default_branch() {
        let p = ProtectedBranches::default();
        assert_eq!(p.patterns(), ["main", "master", "develop", "release/*"]);
        for protected in ["main", "master", "develop", "release/1.0", "release/a/b"] {
            assert!(p.protects(protected, None), "{protected}");
        }
        for free in ["feature/main", "main2", "mainline", "Main", "releases/1", "release", "dev", "kiln/code-1234"] {
            assert!(!p.protects(free, None), "{free}");
        }
        assert!(p.protects("trunk", Some("trunk")), "the repository's default branch");
        assert!(!p.protects("trunk", Some("main")));
        let custom = ProtectedBranches::parse(" prod , hotfix-* ,, ");
        assert_eq!(custom.patterns(), ["prod", "hotfix-*"]);
        assert!(custom.protects("hotfix-1", None) && custom.protects("prod", None) && !custom.protects("main", None));
        assert!(ProtectedBranches::parse("").patterns().is_empty());
    }

    #[test]
    fn the_refusal_names_the_branch_and_the_rule() {
        let p = ProtectedBranches::default();
        assert_eq!(p.check("feature/x", Some("main")), Ok(()));
        let e = p.check("main", None).unwrap_err();
        assert!(e.starts_with("branchName main is protected: "), "{e}");
        let e = p.check("trunk", Some("trunk")).unwrap_err();
        assert!(e.starts_with("branchName trunk is protected: ") && e.contains("trunk (the repository's default branch)"), "{e}");
    }
}
