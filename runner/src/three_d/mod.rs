//! Seed 002's 3D pipeline's outside world: the text-to-3D vendor (Tripo3D's task model,
//! `vendor.rs`), GLB validation (`glb.rs`) and WordPress media uploads (`wordpress.rs`), with their
//! settings (the config file's `[three_d]` table; keys are read from the runner's environment and
//! never leave it).

pub mod glb;
pub mod vendor;
pub mod wordpress;

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

/// Tripo3D's API.
pub const DEFAULT_VENDOR_URL: &str = "https://api.tripo3d.ai";
pub const DEFAULT_VENDOR_KEY_ENV: &str = "TRIPO_API_KEY";
pub const DEFAULT_WORDPRESS_PASSWORD_ENV: &str = "WORDPRESS_APP_PASSWORD";

/// `[three_d]` as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThreeDFile {
    /// The vendor's base URL [default: Tripo3D's].
    pub vendor_url: Option<String>,
    /// The variable holding the vendor's API key [default: `TRIPO_API_KEY`].
    pub vendor_key_env: Option<String>,
    /// First wait between status polls, in milliseconds (doubling to `poll_max_ms`) [default: 1000].
    pub poll_ms: Option<u64>,
    /// [default: 10000]
    pub poll_max_ms: Option<u64>,
    /// How long generation may take before the job fails [default: 600].
    pub generate_timeout_secs: Option<u64>,
    /// A WordPress site to upload models to (its media library); none: no upload.
    pub wordpress_url: Option<String>,
    pub wordpress_user: Option<String>,
    /// The variable holding the user's application password [default: `WORDPRESS_APP_PASSWORD`].
    pub wordpress_password_env: Option<String>,
}

/// A WordPress site and the application password the runner uploads with.
#[derive(Clone)]
pub struct WordPress {
    pub url: url::Url,
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for WordPress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WordPress")
            .field("url", &self.url.as_str())
            .field("user", &self.user)
            .finish()
    }
}

/// The resolved `[three_d]` settings.
#[derive(Clone)]
pub struct ThreeDConfig {
    pub vendor_url: url::Url,
    /// `None`: the variable is not set, and 3D jobs fail saying so.
    pub vendor_key: Option<String>,
    pub vendor_key_env: String,
    pub poll: Duration,
    pub poll_max: Duration,
    pub generate_timeout: Duration,
    pub wordpress: Option<WordPress>,
}

impl std::fmt::Debug for ThreeDConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreeDConfig")
            .field("vendor_url", &self.vendor_url.as_str())
            .field("vendor_key_set", &self.vendor_key.is_some())
            .field("vendor_key_env", &self.vendor_key_env)
            .field("poll", &self.poll)
            .field("poll_max", &self.poll_max)
            .field("generate_timeout", &self.generate_timeout)
            .field("wordpress", &self.wordpress)
            .finish()
    }
}

impl Default for ThreeDConfig {
    fn default() -> Self {
        ThreeDConfig::resolve(None, &HashMap::new()).expect("the defaults resolve")
    }
}

impl ThreeDConfig {
    /// Resolves the file's table against the runner's environment.
    pub fn resolve(
        file: Option<ThreeDFile>,
        vars: &HashMap<String, String>,
    ) -> Result<Self, String> {
        let f = file.unwrap_or_default();
        let parse_url = |what: &str, s: &str| -> Result<url::Url, String> {
            let u: url::Url = s.parse().map_err(|e| format!("[three_d] {what}: {e}"))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(format!("[three_d] {what}: must be an http(s) URL"));
            }
            Ok(u)
        };
        let vendor_url = parse_url(
            "vendor_url",
            f.vendor_url.as_deref().unwrap_or(DEFAULT_VENDOR_URL),
        )?;
        let vendor_key_env = f
            .vendor_key_env
            .unwrap_or_else(|| DEFAULT_VENDOR_KEY_ENV.into());
        let vendor_key = vars.get(&vendor_key_env).filter(|v| !v.is_empty()).cloned();
        let poll = Duration::from_millis(f.poll_ms.unwrap_or(1000).max(10));
        let poll_max = Duration::from_millis(f.poll_max_ms.unwrap_or(10_000)).max(poll);
        let generate_timeout = Duration::from_secs(f.generate_timeout_secs.unwrap_or(600).max(1));
        let wordpress = match f.wordpress_url {
            None => None,
            Some(u) => {
                let url = parse_url("wordpress_url", &u)?;
                let user = f
                    .wordpress_user
                    .filter(|u| !u.is_empty())
                    .ok_or("[three_d] wordpress_url is set without wordpress_user")?;
                let env = f
                    .wordpress_password_env
                    .unwrap_or_else(|| DEFAULT_WORDPRESS_PASSWORD_ENV.into());
                let password = vars
                    .get(&env)
                    .filter(|v| !v.is_empty())
                    .cloned()
                    .ok_or_else(|| format!("[three_d] wordpress_password_env: {env} is not set in the runner's environment"))?;
                Some(WordPress {
                    url,
                    user,
                    password,
                })
            }
        };
        Ok(ThreeDConfig {
            vendor_url,
            vendor_key,
            vendor_key_env,
            poll,
            poll_max,
            generate_timeout,
            wordpress,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_resolve_with_keys_from_the_environment() {
        let d = ThreeDConfig::default();
        assert_eq!(d.vendor_url.as_str(), "https://api.tripo3d.ai/");
        assert!(d.vendor_key.is_none() && d.wordpress.is_none());
        let vars: HashMap<String, String> = [
            ("K".to_string(), "k1".to_string()),
            ("WP".to_string(), "pw".to_string()),
        ]
        .into();
        let f = ThreeDFile {
            vendor_url: Some("http://127.0.0.1:9/".into()),
            vendor_key_env: Some("K".into()),
            wordpress_url: Some("http://wp.test".into()),
            wordpress_user: Some("admin".into()),
            wordpress_password_env: Some("WP".into()),
            ..Default::default()
        };
        let c = ThreeDConfig::resolve(Some(f.clone()), &vars).unwrap();
        assert_eq!(c.vendor_key.as_deref(), Some("k1"));
        assert_eq!(c.wordpress.as_ref().unwrap().password, "pw");
        assert!(
            !format!("{c:?}").contains("k1") && !format!("{c:?}").contains("pw"),
            "no key in Debug"
        );
        let missing = ThreeDFile {
            wordpress_password_env: Some("NOPE".into()),
            ..f.clone()
        };
        assert!(ThreeDConfig::resolve(Some(missing), &vars)
            .unwrap_err()
            .contains("NOPE is not set"));
        let bad = ThreeDFile {
            vendor_url: Some("ftp://x".into()),
            ..f
        };
        assert!(ThreeDConfig::resolve(Some(bad), &vars).is_err());
    }
}
