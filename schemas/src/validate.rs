//! Small checks for names that end up in paths, URLs and git commands: they must never be able to
//! escape their sandbox (`..`, absolute paths, option-looking arguments).

/// A GitHub owner or repository name: ASCII letters, digits, `-`, `_`, `.`; not `.`/`..`;
/// at most 100 characters.
pub fn is_repo_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s != "."
        && s != ".."
        && !s.starts_with('-')
        && !s.ends_with(".git")
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A git branch name Kiln accepts: a conservative subset of `git check-ref-format --branch`.
pub fn is_branch_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with(['-', '/', '.'])
        && !s.ends_with(['/', '.'])
        && !s.ends_with(".lock")
        && !s.contains("..")
        && !s.contains("//")
        && !s.contains("/.")
        && !s.contains("@{")
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

/// A canonical hyphenated UUID (any version), as the seeds use for ids.
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_components() {
        for ok in ["kiln", "my-org", "repo_1", "a.b"] {
            assert!(is_repo_component(ok), "{ok}");
        }
        for bad in ["", ".", "..", "-x", "a/b", "a b", "x.git", "ü", &"a".repeat(101)] {
            assert!(!is_repo_component(bad), "{bad:?}");
        }
    }

    #[test]
    fn branch_names() {
        for ok in ["main", "feature/logout-button", "kiln/ralph-1a2b", "v1.2"] {
            assert!(is_branch_name(ok), "{ok}");
        }
        for bad in ["", "-f", "/x", "x/", "a..b", "a//b", "x.lock", "a/.b", "a b", "a@{1}", "x~1", "a:b"] {
            assert!(!is_branch_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn uuids() {
        assert!(is_uuid("14cddf8f-ce78-4b49-9eb4-9d17a7d1f568"));
        assert!(!is_uuid("14cddf8f-ce78-4b49-9eb4-9d17a7d1f56"));
        assert!(!is_uuid("14cddf8fxce78-4b49-9eb4-9d17a7d1f568"));
        assert!(!is_uuid("not-a-uuid"));
    }
}
