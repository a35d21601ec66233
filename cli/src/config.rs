//! Where `kiln` finds its server and credential: flags, environment and the config file (TOML,
//! mode 0600, one `[hosts."<url>"]` table of saved tokens per server, like `gh`'s hosts file).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The server when nothing else names one: what `scripts/dev` serves.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8787";

/// The config file's contents.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigFile {
    /// The server of the last `kiln login` (used when neither `--url` nor `KILN_URL` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Saved tokens, keyed by server URL.
    #[serde(default)]
    pub hosts: BTreeMap<String, HostEntry>,
}

/// The tokens `kiln login` saved for one server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub access: String,
    pub refresh: String,
}

/// The config file's path: `$KILN_CONFIG`, else `$XDG_CONFIG_HOME/kiln/config.toml`, else
/// `$HOME/.config/kiln/config.toml`. `env` answers a variable's value (empty counts as unset).
pub fn config_path(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(p) = var("KILN_CONFIG") {
        return Some(PathBuf::from(p));
    }
    if let Some(x) = var("XDG_CONFIG_HOME") {
        return Some(Path::new(&x).join("kiln/config.toml"));
    }
    var("HOME").map(|h| Path::new(&h).join(".config/kiln/config.toml"))
}

/// Checks a server URL (http or https, no query) and normalises it: no trailing slash.
pub fn normalize_url(raw: &str) -> anyhow::Result<String> {
    let trimmed = raw.trim();
    let parsed = url::Url::parse(trimmed).with_context(|| format!("{trimmed:?} is not a URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        bail!("the server URL must start with http:// or https:// (got {trimmed:?})");
    }
    if parsed.host_str().is_none() || parsed.query().is_some() || parsed.fragment().is_some() {
        bail!("{trimmed:?} is not a server URL (scheme://host[:port][/path])");
    }
    Ok(parsed.as_str().trim_end_matches('/').to_string())
}

/// Which server to use: `--url`, else `KILN_URL`, else the config file's `url`, else [`DEFAULT_URL`].
pub fn resolve_url(flag: Option<&str>, env_url: Option<&str>, file: &ConfigFile) -> anyhow::Result<String> {
    let chosen = flag
        .filter(|s| !s.is_empty())
        .or(env_url.filter(|s| !s.is_empty()))
        .or(file.url.as_deref())
        .unwrap_or(DEFAULT_URL);
    normalize_url(chosen)
}

impl ConfigFile {
    /// Reads the file; a missing file is an empty config.
    pub fn load(path: &Path) -> anyhow::Result<ConfigFile> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the file atomically with mode 0600 (its directory 0700 when created).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let text = toml::to_string(self).context("encoding the config")?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "config".into());
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            // An existing file of that name keeps its mode on open: set it.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write()
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// The `exp` claim (seconds since the epoch) of a JWT, if the token is one and has it.
pub fn jwt_expiry(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64()
}

/// Whether a saved access token should be refreshed before use: it is a JWT that expires within
/// `margin_secs` of `now_secs`. Tokens that are not JWTs are used as they are.
pub fn needs_refresh(token: &str, now_secs: u64, margin_secs: u64) -> bool {
    jwt_expiry(token).is_some_and(|exp| exp <= now_secs + margin_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn the_config_path_follows_kiln_config_then_xdg_then_home() {
        let all = [("KILN_CONFIG", "/a/k.toml"), ("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(config_path(env(&all)), Some(PathBuf::from("/a/k.toml")));
        assert_eq!(config_path(env(&all[1..])), Some(PathBuf::from("/x/kiln/config.toml")));
        assert_eq!(config_path(env(&all[2..])), Some(PathBuf::from("/h/.config/kiln/config.toml")));
        assert_eq!(config_path(env(&[("KILN_CONFIG", ""), ("HOME", "/h")])), Some(PathBuf::from("/h/.config/kiln/config.toml")));
        assert_eq!(config_path(env(&[])), None);
    }

    #[test]
    fn the_url_is_the_flag_then_the_environment_then_the_file_then_the_default() {
        let file = ConfigFile { url: Some("https://kiln.example.com/".into()), ..Default::default() };
        assert_eq!(resolve_url(Some("http://a:1"), Some("http://b:2"), &file).unwrap(), "http://a:1");
        assert_eq!(resolve_url(None, Some("http://b:2/"), &file).unwrap(), "http://b:2");
        assert_eq!(resolve_url(None, Some(""), &file).unwrap(), "https://kiln.example.com");
        assert_eq!(resolve_url(None, None, &ConfigFile::default()).unwrap(), DEFAULT_URL);
        assert_eq!(normalize_url("http://h:8787/base/").unwrap(), "http://h:8787/base");
        for bad in ["ftp://h", "localhost:8787", "", "http://h/?x=1"] {
            assert!(normalize_url(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_file_round_trips_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/kiln/config.toml");
        assert_eq!(ConfigFile::load(&path).unwrap(), ConfigFile::default(), "a missing file is empty");
        let mut cfg = ConfigFile { url: Some("http://127.0.0.1:8787".into()), ..Default::default() };
        cfg.hosts.insert(
            "http://127.0.0.1:8787".into(),
            HostEntry { email: Some("ann@example.com".into()), access: "a.b.c".into(), refresh: "krt_x".into() },
        );
        cfg.save(&path).unwrap();
        assert_eq!(ConfigFile::load(&path).unwrap(), cfg);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("[hosts.\"http://127.0.0.1:8787\"]"), "{text}");

        std::fs::write(&path, "hosts = 3").unwrap();
        let err = format!("{:#}", ConfigFile::load(&path).unwrap_err());
        assert!(err.contains("config.toml"), "{err}");
    }

    #[test]
    fn expired_jwts_are_refreshed_and_other_tokens_used_as_they_are() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!("{}.{}.sig", b64(r#"{"alg":"HS256"}"#), b64(r#"{"sub":"u","exp":1000}"#));
        assert_eq!(jwt_expiry(&jwt), Some(1000));
        assert!(needs_refresh(&jwt, 1000, 0));
        assert!(needs_refresh(&jwt, 980, 30), "within the margin");
        assert!(!needs_refresh(&jwt, 900, 30));
        assert!(!needs_refresh("the-service-secret", u64::MAX / 2, 30));
        assert!(!needs_refresh(&format!("{}.{}.s", b64("{}"), b64(r#"{"sub":"u"}"#)), 5, 0), "no exp");
        assert_eq!(jwt_expiry("a.!!!.c"), None);
    }
}
