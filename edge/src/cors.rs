//! CORS for every face: which browser origins may call the edge (`CORS_ORIGINS`) and the headers
//! they get. Pure code, tested natively; `api::handle` applies it to every answer.
//!
//! `CORS_ORIGINS` is a comma-separated list of exact origins (`http://localhost:5173`) and wildcard
//! subdomains (`https://*.example.com`: any subdomain at any depth, not `example.com` itself).
//! Scheme, host and port must all match; hosts compare case-insensitively. Empty: no CORS headers
//! at all. An allowed origin is echoed back (never `*`), so credentials may be sent.

/// Methods a preflight allows.
pub const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
/// Request headers a preflight allows.
pub const ALLOW_HEADERS: &str = "Authorization, Content-Type, Accept, X-Requested-With, X-Session-Id, Last-Event-ID";
/// How long a browser may cache a preflight answer, in seconds.
pub const MAX_AGE_SECS: u32 = 600;

/// One entry of `CORS_ORIGINS`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// `scheme://host[:port]`, normalised.
    Exact(Origin),
    /// `scheme://*.suffix[:port]`: hosts ending in `.suffix`.
    Subdomains { scheme: String, suffix: String, port: Option<u16> },
}

/// A parsed origin: scheme, lower-case host, explicit port (none when the default was meant).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// Parses `scheme://host[:port]` (no path, query, userinfo or trailing dot tricks). The port is
/// dropped when it is the scheme's default, so `https://a.io:443` and `https://a.io` are one origin.
fn parse_origin(text: &str, allow_wildcard: bool) -> Option<Origin> {
    let (scheme, rest) = text.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) {
        return None;
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', '\\', ' ']) {
        return None;
    }
    let (host, port) = match rest.rsplit_once(':') {
        // IPv6 literals are bracketed: `[::1]:5173`.
        Some((h, p)) if !p.contains(']') => (h, Some(p.parse::<u16>().ok()?)),
        _ => (rest, None),
    };
    let host = host.to_ascii_lowercase();
    let valid_host = if host.starts_with('[') {
        host.ends_with(']') && host.len() > 2
    } else {
        let labels = host.strip_prefix("*.").filter(|_| allow_wildcard).unwrap_or(&host);
        !labels.is_empty()
            && labels
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    };
    if !valid_host {
        return None;
    }
    let port = port.filter(|p| Some(*p) != default_port(&scheme));
    Some(Origin { scheme, host, port })
}

impl Pattern {
    fn parse(entry: &str) -> Option<Pattern> {
        let origin = parse_origin(entry, true)?;
        match origin.host.strip_prefix("*.") {
            Some(suffix) => Some(Pattern::Subdomains {
                scheme: origin.scheme,
                suffix: format!(".{suffix}"),
                port: origin.port,
            }),
            None => Some(Pattern::Exact(origin)),
        }
    }

    fn matches(&self, origin: &Origin) -> bool {
        match self {
            Pattern::Exact(want) => want == origin,
            Pattern::Subdomains { scheme, suffix, port } => {
                *scheme == origin.scheme
                    && *port == origin.port
                    && origin.host.len() > suffix.len()
                    && origin.host.ends_with(suffix.as_str())
            }
        }
    }
}

/// The allowed origins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorsOrigins {
    patterns: Vec<Pattern>,
    /// Entries that are not origins (reported once by whoever loads the setting).
    pub invalid: Vec<String>,
}

impl CorsOrigins {
    /// Parses `CORS_ORIGINS`. Entries that are not origins are kept in `invalid` and match nothing.
    pub fn parse(setting: &str) -> CorsOrigins {
        let mut out = CorsOrigins::default();
        for entry in setting.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match Pattern::parse(entry) {
                Some(p) => out.patterns.push(p),
                None => out.invalid.push(entry.to_string()),
            }
        }
        out
    }

    /// Whether no origin is allowed (then no CORS header is ever sent).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether a request's `Origin` header value is allowed. `null` and anything that is not a
    /// `scheme://host[:port]` never is.
    pub fn allows(&self, origin: &str) -> bool {
        match parse_origin(origin.trim(), false) {
            Some(o) => self.patterns.iter().any(|p| p.matches(&o)),
            None => false,
        }
    }

    /// The CORS headers of an answer to a request from `origin` (the request's `Origin` header):
    /// none when there is no origin or it is not allowed (but `Vary: Origin` whenever CORS is on,
    /// so caches never serve one origin's answer to another). `preflight` adds what an `OPTIONS`
    /// preflight needs.
    pub fn headers(&self, origin: Option<&str>, preflight: bool) -> Vec<(&'static str, String)> {
        if self.is_empty() {
            return vec![];
        }
        let mut out = vec![("Vary", "Origin".to_string())];
        let Some(origin) = origin.filter(|o| self.allows(o)) else {
            return out;
        };
        out.push(("Access-Control-Allow-Origin", origin.trim().to_string()));
        out.push(("Access-Control-Allow-Credentials", "true".to_string()));
        if preflight {
            out.push(("Access-Control-Allow-Methods", ALLOW_METHODS.to_string()));
            out.push(("Access-Control-Allow-Headers", ALLOW_HEADERS.to_string()));
            out.push(("Access-Control-Max-Age", MAX_AGE_SECS.to_string()));
        } else {
            out.push(("Access-Control-Expose-Headers", "Retry-After".to_string()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(s: &str) -> CorsOrigins {
        CorsOrigins::parse(s)
    }

    #[test]
    fn exact_origins_match_scheme_host_and_port() {
        let o = origins("http://localhost:5173, http://127.0.0.1:5173,https://app.example.com");
        assert!(o.invalid.is_empty(), "{:?}", o.invalid);
        assert!(o.allows("http://localhost:5173"));
        assert!(o.allows("http://LOCALHOST:5173"), "hosts compare case-insensitively");
        assert!(o.allows("http://127.0.0.1:5173"));
        assert!(o.allows("https://app.example.com"));
        assert!(o.allows("https://app.example.com:443"), "the default port is the same origin");
        assert!(!o.allows("http://localhost:5174"), "another port");
        assert!(!o.allows("http://localhost"), "no port is port 80");
        assert!(!o.allows("https://localhost:5173"), "another scheme");
        assert!(!o.allows("http://app.example.com"), "http is not https");
        assert!(!o.allows("https://app.example.com:8443"));
        assert!(!o.allows("https://x.app.example.com"), "exact means exact: no subdomains");
        assert!(!o.allows("https://app.example.com.evil.io"));
        assert!(!o.allows("null"));
        assert!(!o.allows(""));
        assert!(!o.allows("https://app.example.com/path"));
        assert!(!o.allows("https://user@app.example.com"));
    }

    #[test]
    fn wildcards_match_subdomains_only_without_suffix_tricks() {
        let o = origins("https://*.example.com");
        assert!(o.allows("https://app.example.com"));
        assert!(o.allows("https://a.b.example.com"), "any depth");
        assert!(o.allows("https://APP.Example.COM"));
        assert!(!o.allows("https://example.com"), "the apex is not a subdomain");
        assert!(!o.allows("https://evil-example.com"), "a suffix of the name is not a subdomain");
        assert!(!o.allows("https://evilexample.com"));
        assert!(!o.allows("https://.example.com"));
        assert!(!o.allows("https://app.example.com.evil.io"));
        assert!(!o.allows("https://example.com.app.io"));
        assert!(!o.allows("http://app.example.com"), "scheme must match");
        assert!(!o.allows("https://app.example.com:8443"), "port must match");
        assert!(!o.allows("https://*.example.com"), "a request's origin is never a pattern");
        let ported = origins("http://*.dev.test:5173");
        assert!(ported.allows("http://a.dev.test:5173"));
        assert!(!ported.allows("http://a.dev.test"));
        assert!(!ported.allows("http://a.dev.test:5174"));
    }

    #[test]
    fn empty_and_invalid_settings_allow_nothing() {
        let empty = origins("");
        assert!(empty.is_empty());
        assert!(!empty.allows("http://localhost:5173"));
        assert!(empty.headers(Some("http://localhost:5173"), true).is_empty(), "no CORS headers at all");
        let bad = origins("*, localhost:5173, https://*, https://a.*.com, ftp//x, https://ok.io");
        assert_eq!(bad.invalid, vec!["*", "localhost:5173", "https://*", "https://a.*.com", "ftp//x"]);
        assert!(bad.allows("https://ok.io"));
        assert!(!bad.allows("http://localhost:5173"));
        assert!(!bad.allows("https://anything.io"), "`*` is not a way to allow every origin");
    }

    #[test]
    fn headers_echo_an_allowed_origin_and_nothing_for_others() {
        let o = origins("http://localhost:5173");
        let get = |h: &[(&str, String)], k: &str| h.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        let pre = o.headers(Some("http://localhost:5173"), true);
        assert_eq!(get(&pre, "Access-Control-Allow-Origin").as_deref(), Some("http://localhost:5173"));
        assert_eq!(get(&pre, "Vary").as_deref(), Some("Origin"));
        assert!(get(&pre, "Access-Control-Allow-Methods").unwrap().contains("POST"));
        let allowed = get(&pre, "Access-Control-Allow-Headers").unwrap().to_ascii_lowercase();
        assert!(allowed.contains("authorization") && allowed.contains("content-type"));
        assert_eq!(get(&pre, "Access-Control-Max-Age").as_deref(), Some("600"));

        let actual = o.headers(Some("http://localhost:5173"), false);
        assert_eq!(get(&actual, "Access-Control-Allow-Origin").as_deref(), Some("http://localhost:5173"));
        assert!(get(&actual, "Access-Control-Allow-Methods").is_none(), "only preflights list methods");

        for refused in [Some("http://evil.io"), Some("null"), None] {
            let h = o.headers(refused, true);
            assert_eq!(h, vec![("Vary", "Origin".to_string())], "{refused:?}");
        }
    }

    #[test]
    fn ipv6_and_default_ports() {
        let o = origins("http://[::1]:5173, https://a.io:443");
        assert!(o.invalid.is_empty(), "{:?}", o.invalid);
        assert!(o.allows("http://[::1]:5173"));
        assert!(!o.allows("http://[::1]:5174"));
        assert!(o.allows("https://a.io"));
    }
}
