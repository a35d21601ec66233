//! The LLM settings: the `[llm]` table of the runner's TOML file and the environment shortcuts,
//! resolved (purely) into [`LlmConfig`]. Operators keep vendor keys on their own hosts: the file
//! names the variable that holds a key (`api_key_env`), never the key.
//!
//! ```toml
//! [llm]
//! max_attempts = 4            # per call, the first included
//! request_timeout_secs = 600  # one attempt, request to the stream's end
//! stall_timeout_secs = 60     # no byte for this long: the attempt is abandoned and retried
//! max_retry_wait_secs = 60    # the longest Retry-After the runner waits
//! budget_tokens = 2000000     # per job (input + output); unset: no limit
//! budget_usd = 5.0            # per job, priced from [llm.prices]; unset: no limit
//!
//! [llm.providers.groq]
//! api = "openai"                               # or "anthropic"
//! base_url = "https://api.groq.com/openai/v1"
//! api_key_env = "GROQ_API_KEY"                 # unset: no key is sent (Ollama, vLLM)
//! headers = { "x-title" = "kiln" }
//!
//! [llm.roles]
//! default = "anthropic/claude-sonnet-4-5"
//! gatherer = "groq/llama-3.3-70b-versatile"    # provider/model; the model may hold more slashes
//!
//! [llm.prices."claude-sonnet-4-5"]
//! input_per_mtok = 3.0
//! output_per_mtok = 15.0
//!
//! [llm.round_table]                            # seed 002's round tables
//! providers = ["anthropic/claude-sonnet-4-5", "groq/llama-3.3-70b-versatile"]
//! timeout_secs = 60                            # each provider's answer; over it: `timeout`
//! ```
//!
//! Environment shortcuts, so a runner works with no `[llm]` table: `ANTHROPIC_API_KEY` (and
//! `ANTHROPIC_BASE_URL`) define the provider `anthropic`, `OPENAI_API_KEY` (and `OPENAI_BASE_URL`)
//! the provider `openai`, each only when the file does not define a provider of that name (a
//! provider the file defines is taken whole); `RUNNER_LLM_MODEL` (`provider/model`) is the
//! `default` role, over the file's.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Deserialize;

use super::meter::{Budget, Price, Prices};
use super::retry::RetryPolicy;

pub const DEFAULT_ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";
pub const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";
/// The role a step falls back to when its own is not assigned.
pub const DEFAULT_ROLE: &str = "default";

/// The two wire formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// Anthropic Messages: `POST {base}/v1/messages`, `x-api-key`.
    Anthropic,
    /// OpenAI-compatible chat completions: `POST {base}/chat/completions` (base ends in `/v1`),
    /// `Authorization: Bearer`.
    Openai,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Anthropic => "anthropic",
            Api::Openai => "openai",
        }
    }
}

/// `[llm]` as written in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmFile {
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderFile>,
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    pub max_attempts: Option<u32>,
    pub request_timeout_secs: Option<u64>,
    pub stall_timeout_secs: Option<u64>,
    pub max_retry_wait_secs: Option<u64>,
    pub budget_tokens: Option<u64>,
    pub budget_usd: Option<f64>,
    pub round_table: Option<RoundTableFile>,
}

/// `[llm.round_table]` as written in the file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundTableFile {
    #[serde(default)]
    pub providers: Vec<String>,
    pub timeout_secs: Option<u64>,
}

/// The round table's providers (`provider/model`, each of a defined provider) and the time each
/// answer may take.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundTable {
    pub providers: Vec<ModelRef>,
    pub timeout: Duration,
}

/// Each round-table answer's limit when `timeout_secs` is unset.
pub const DEFAULT_ROUND_TABLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for RoundTable {
    fn default() -> Self {
        RoundTable {
            providers: vec![],
            timeout: DEFAULT_ROUND_TABLE_TIMEOUT,
        }
    }
}

/// `[llm.providers.<name>]` as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderFile {
    pub api: Api,
    pub base_url: Option<String>,
    /// The variable of the runner's environment that holds the key.
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// A vendor key. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(key.into())
    }

    /// The key itself, for the request header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(redacted)")
    }
}

/// A resolved provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    pub name: String,
    pub api: Api,
    /// Without a trailing `/`.
    pub base_url: String,
    pub api_key: Option<ApiKey>,
    /// Where the key comes from (the variable's name), for messages.
    pub api_key_env: Option<String>,
    /// Sent with every request, after the vendor's own headers.
    pub headers: Vec<(String, String)>,
}

impl Provider {
    /// A provider with its vendor's defaults (tests and the environment shortcuts).
    pub fn new(name: &str, api: Api, base_url: &str, api_key: Option<ApiKey>) -> Provider {
        Provider {
            name: name.to_string(),
            api,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
            api_key_env: None,
            headers: vec![],
        }
    }

    /// The URL a chat request goes to.
    pub fn endpoint(&self) -> String {
        match self.api {
            // `https://api.anthropic.com` or, as some write it, `https://api.anthropic.com/v1`.
            Api::Anthropic if self.base_url.ends_with("/v1") => {
                format!("{}/messages", self.base_url)
            }
            Api::Anthropic => format!("{}/v1/messages", self.base_url),
            Api::Openai => format!("{}/chat/completions", self.base_url),
        }
    }
}

/// `provider/model`: which provider serves a role, with which model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub provider: String,
    pub model: String,
}

impl ModelRef {
    /// Splits at the first `/` (OpenRouter's models hold slashes of their own).
    pub fn parse(s: &str) -> Result<ModelRef, String> {
        let s = s.trim();
        match s.split_once('/') {
            Some((p, m)) if !p.trim().is_empty() && !m.trim().is_empty() => Ok(ModelRef {
                provider: p.trim().to_string(),
                model: m.trim().to_string(),
            }),
            _ => Err(format!(
                "{s:?} is not provider/model (e.g. anthropic/claude-sonnet-4-5)"
            )),
        }
    }
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

/// A setting that could not be resolved: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct LlmConfigError {
    pub key: String,
    pub message: String,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> LlmConfigError {
    LlmConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// The resolved LLM settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LlmConfig {
    pub providers: BTreeMap<String, Provider>,
    pub roles: BTreeMap<String, ModelRef>,
    pub prices: Prices,
    pub policy: RetryPolicy,
    /// Every job's budget.
    pub budget: Budget,
    /// `[llm.round_table]`.
    pub round_table: RoundTable,
}

fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn set(vars: &HashMap<String, String>, name: &str) -> Option<String> {
    vars.get(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn base_url(key: &str, url: &str) -> Result<String, LlmConfigError> {
    let parsed = url::Url::parse(url.trim()).map_err(|e| err(key, format!("{url:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(err(
            key,
            format!("{url:?} must be an http:// or https:// URL"),
        ));
    }
    Ok(url.trim().trim_end_matches('/').to_string())
}

fn seconds(key: &str, secs: Option<u64>, default: Duration) -> Result<Duration, LlmConfigError> {
    match secs {
        Some(0) => Err(err(key, "must be at least 1 second")),
        Some(s) => Ok(Duration::from_secs(s)),
        None => Ok(default),
    }
}

impl LlmConfig {
    /// Resolves the file's `[llm]` table (if any), `RUNNER_LLM_MODEL` (`model_override`) and the
    /// vendor variables of the runner's environment (`vars`).
    pub fn resolve(
        file: Option<LlmFile>,
        model_override: Option<&str>,
        vars: &HashMap<String, String>,
    ) -> Result<LlmConfig, LlmConfigError> {
        let file = file.unwrap_or_default();
        let mut providers = BTreeMap::new();
        for (name, p) in &file.providers {
            let key = format!("[llm.providers.{name}]");
            if name.is_empty() || name.contains('/') {
                return Err(err(key, "a provider's name may not be empty or hold a /"));
            }
            let default_base = match p.api {
                Api::Anthropic => DEFAULT_ANTHROPIC_BASE_URL,
                Api::Openai => DEFAULT_OPENAI_BASE_URL,
            };
            let base = base_url(
                &format!("{key} base_url"),
                p.base_url.as_deref().unwrap_or(default_base),
            )?;
            let api_key = match &p.api_key_env {
                None => None,
                Some(var) if !is_var_name(var.trim()) => {
                    // Never echo it: it may be the key itself, written where its name belongs.
                    return Err(err(
                        format!("{key} api_key_env"),
                        "must name the environment variable that holds the key (e.g. GROQ_API_KEY), not hold the key",
                    ));
                }
                Some(var) => Some(ApiKey::new(set(vars, var.trim()).ok_or_else(|| {
                    err(
                        format!("{key} api_key_env"),
                        format!("{} is not set in the runner's environment", var.trim()),
                    )
                })?)),
            };
            let mut headers = vec![];
            for (h, v) in &p.headers {
                reqwest::header::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    err(
                        format!("{key} headers"),
                        format!("{h:?} is not a header name"),
                    )
                })?;
                reqwest::header::HeaderValue::from_str(v).map_err(|_| {
                    err(
                        format!("{key} headers"),
                        format!("the value of {h} is not a header value"),
                    )
                })?;
                headers.push((h.clone(), v.clone()));
            }
            providers.insert(
                name.clone(),
                Provider {
                    name: name.clone(),
                    api: p.api,
                    base_url: base,
                    api_key,
                    api_key_env: p.api_key_env.as_ref().map(|v| v.trim().to_string()),
                    headers,
                },
            );
        }
        for (name, api, key_var, url_var, default_base) in [
            (
                "anthropic",
                Api::Anthropic,
                "ANTHROPIC_API_KEY",
                "ANTHROPIC_BASE_URL",
                DEFAULT_ANTHROPIC_BASE_URL,
            ),
            (
                "openai",
                Api::Openai,
                "OPENAI_API_KEY",
                "OPENAI_BASE_URL",
                DEFAULT_OPENAI_BASE_URL,
            ),
        ] {
            if providers.contains_key(name) {
                continue;
            }
            let Some(api_key) = set(vars, key_var) else {
                continue;
            };
            let base = base_url(
                url_var,
                &set(vars, url_var).unwrap_or_else(|| default_base.into()),
            )?;
            let mut p = Provider::new(name, api, &base, Some(ApiKey::new(api_key)));
            p.api_key_env = Some(key_var.to_string());
            providers.insert(name.to_string(), p);
        }

        let mut roles = BTreeMap::new();
        let mut assigned: Vec<(String, String, String)> = file
            .roles
            .iter()
            .map(|(role, spec)| (format!("[llm.roles] {role}"), role.clone(), spec.clone()))
            .collect();
        if let Some(spec) = model_override.map(str::trim).filter(|s| !s.is_empty()) {
            assigned.retain(|(_, role, _)| role != DEFAULT_ROLE);
            assigned.push((
                "RUNNER_LLM_MODEL".into(),
                DEFAULT_ROLE.into(),
                spec.to_string(),
            ));
        }
        for (key, role, spec) in assigned {
            let m = ModelRef::parse(&spec).map_err(|e| err(&key, e))?;
            if !providers.contains_key(&m.provider) {
                let known: Vec<&str> = providers.keys().map(String::as_str).collect();
                let known = if known.is_empty() {
                    "none is defined".to_string()
                } else {
                    format!("defined: {}", known.join(", "))
                };
                let hint = match m.provider.as_str() {
                    "anthropic" => " (set ANTHROPIC_API_KEY, or define [llm.providers.anthropic])",
                    "openai" => " (set OPENAI_API_KEY, or define [llm.providers.openai])",
                    _ => "",
                };
                return Err(err(
                    key,
                    format!("no provider named {:?} ({known}){hint}", m.provider),
                ));
            }
            roles.insert(role, m);
        }

        let mut round_table = RoundTable::default();
        if let Some(rt) = &file.round_table {
            for spec in &rt.providers {
                let key = "[llm.round_table] providers";
                let m = ModelRef::parse(spec).map_err(|e| err(key, e))?;
                if !providers.contains_key(&m.provider) {
                    return Err(err(key, format!("no provider named {:?}", m.provider)));
                }
                if round_table.providers.contains(&m) {
                    return Err(err(key, format!("{m} is listed twice")));
                }
                round_table.providers.push(m);
            }
            round_table.timeout = seconds(
                "[llm.round_table] timeout_secs",
                rt.timeout_secs,
                DEFAULT_ROUND_TABLE_TIMEOUT,
            )?;
        }

        let mut prices = BTreeMap::new();
        for (model, price) in file.prices {
            if !(price.input_per_mtok >= 0.0
                && price.output_per_mtok >= 0.0
                && price.input_per_mtok.is_finite()
                && price.output_per_mtok.is_finite())
            {
                return Err(err(
                    format!("[llm.prices.{model:?}]"),
                    "prices must be finite numbers of USD per million tokens, at least 0",
                ));
            }
            prices.insert(model, price);
        }

        let d = RetryPolicy::default();
        let policy = RetryPolicy {
            max_attempts: match file.max_attempts {
                Some(0) => return Err(err("[llm] max_attempts", "must be at least 1")),
                Some(n) => n,
                None => d.max_attempts,
            },
            request_timeout: seconds(
                "[llm] request_timeout_secs",
                file.request_timeout_secs,
                d.request_timeout,
            )?,
            stall_timeout: seconds(
                "[llm] stall_timeout_secs",
                file.stall_timeout_secs,
                d.stall_timeout,
            )?,
            max_retry_wait: seconds(
                "[llm] max_retry_wait_secs",
                file.max_retry_wait_secs,
                d.max_retry_wait,
            )?,
            ..d
        };
        if let Some(usd) = file.budget_usd {
            if !(usd > 0.0 && usd.is_finite()) {
                return Err(err("[llm] budget_usd", "must be a positive number of USD"));
            }
        }
        if file.budget_tokens == Some(0) {
            return Err(err("[llm] budget_tokens", "must be at least 1"));
        }
        Ok(LlmConfig {
            providers,
            roles,
            prices: Prices::new(prices),
            policy,
            budget: Budget {
                max_tokens: file.budget_tokens,
                max_usd: file.budget_usd,
            },
            round_table,
        })
    }

    /// The provider and model of a step's role: its own assignment, else `default`.
    pub fn route(&self, role: &str) -> Option<(&Provider, &ModelRef)> {
        let m = self
            .roles
            .get(role)
            .or_else(|| self.roles.get(DEFAULT_ROLE))?;
        Some((self.providers.get(&m.provider)?, m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(toml_text: &str) -> LlmFile {
        #[derive(Deserialize)]
        struct Wrap {
            llm: LlmFile,
        }
        toml::from_str::<Wrap>(toml_text).unwrap().llm
    }

    #[test]
    fn zero_config_comes_from_the_vendor_variables() {
        let v = vars(&[
            ("ANTHROPIC_API_KEY", "sk-ant-1"),
            ("OPENAI_API_KEY", "sk-oai-1"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
        ]);
        let c = LlmConfig::resolve(None, Some("openai/gpt-4o-mini"), &v).unwrap();
        let a = &c.providers["anthropic"];
        assert_eq!(a.api, Api::Anthropic);
        assert_eq!(a.endpoint(), "https://api.anthropic.com/v1/messages");
        assert_eq!(a.api_key, Some(ApiKey::new("sk-ant-1")));
        let o = &c.providers["openai"];
        assert_eq!(o.endpoint(), "http://127.0.0.1:9/v1/chat/completions");
        let (p, m) = c.route("gatherer").unwrap();
        assert_eq!(
            (p.name.as_str(), m.model.as_str()),
            ("openai", "gpt-4o-mini")
        );
        assert_eq!(c.budget, Budget::default());
        assert_eq!(c.policy, RetryPolicy::default());

        let none = LlmConfig::resolve(None, None, &vars(&[("ANTHROPIC_API_KEY", " ")])).unwrap();
        assert!(none.providers.is_empty(), "an empty key defines nothing");
        assert!(none.route("default").is_none());
    }

    #[test]
    fn the_file_defines_providers_roles_prices_and_limits() {
        let f = file(
            r#"
            [llm]
            max_attempts = 2
            stall_timeout_secs = 15
            request_timeout_secs = 300
            max_retry_wait_secs = 30
            budget_tokens = 1000
            budget_usd = 0.5
            [llm.providers.groq]
            api = "openai"
            base_url = "https://api.groq.com/openai/v1"
            api_key_env = "GROQ_API_KEY"
            headers = { "x-title" = "kiln" }
            [llm.providers.local]
            api = "openai"
            base_url = "http://127.0.0.1:11434/v1"
            [llm.roles]
            default = "groq/llama-3.3-70b"
            gatherer = "local/qwen/qwen3:8b"
            [llm.prices."llama-3.3-70b"]
            input_per_mtok = 0.59
            output_per_mtok = 0.79
            "#,
        );
        let c = LlmConfig::resolve(Some(f), None, &vars(&[("GROQ_API_KEY", "gsk-1")])).unwrap();
        let (p, m) = c.route("gatherer").unwrap();
        assert_eq!(
            (p.name.as_str(), m.model.as_str()),
            ("local", "qwen/qwen3:8b")
        );
        assert_eq!(p.api_key, None, "no api_key_env: no key");
        let (p, m) = c.route("ceo").unwrap();
        assert_eq!(
            (p.name.as_str(), m.to_string().as_str()),
            ("groq", "groq/llama-3.3-70b")
        );
        assert_eq!(p.headers, vec![("x-title".to_string(), "kiln".to_string())]);
        assert_eq!(p.api_key_env.as_deref(), Some("GROQ_API_KEY"));
        assert_eq!(
            c.prices.cost("llama-3.3-70b", 1_000_000, 2_000_000),
            Some(0.59 + 2.0 * 0.79)
        );
        assert_eq!(c.prices.cost("other", 1, 1), None);
        assert_eq!(c.policy.max_attempts, 2);
        assert_eq!(c.policy.stall_timeout, Duration::from_secs(15));
        assert_eq!(c.policy.request_timeout, Duration::from_secs(300));
        assert_eq!(c.policy.max_retry_wait, Duration::from_secs(30));
        assert_eq!(
            c.budget,
            Budget {
                max_tokens: Some(1000),
                max_usd: Some(0.5)
            }
        );
    }

    #[test]
    fn the_model_variable_beats_the_files_default_and_the_file_beats_the_shortcuts() {
        let f = file(
            r#"
            [llm.providers.anthropic]
            api = "anthropic"
            base_url = "http://127.0.0.1:7"
            api_key_env = "MY_CLAUDE_KEY"
            [llm.roles]
            default = "anthropic/from-file"
            ceo = "anthropic/ceo-model"
            "#,
        );
        let v = vars(&[
            ("MY_CLAUDE_KEY", "k-file"),
            ("ANTHROPIC_API_KEY", "k-env"),
            ("ANTHROPIC_BASE_URL", "http://127.0.0.1:8"),
        ]);
        let c = LlmConfig::resolve(Some(f.clone()), Some("anthropic/from-env"), &v).unwrap();
        let a = &c.providers["anthropic"];
        assert_eq!(
            a.base_url, "http://127.0.0.1:7",
            "the file's provider is taken whole"
        );
        assert_eq!(a.api_key, Some(ApiKey::new("k-file")));
        assert_eq!(c.route("anything").unwrap().1.model, "from-env");
        assert_eq!(c.route("ceo").unwrap().1.model, "ceo-model");
        let c = LlmConfig::resolve(Some(f), None, &v).unwrap();
        assert_eq!(c.route("anything").unwrap().1.model, "from-file");
    }

    #[test]
    fn errors_name_the_setting_and_never_a_key() {
        let cases: Vec<(LlmFile, Option<&str>, &str, &str)> = vec![
            (
                file("[llm.roles]\ngatherer = \"nope/m\""),
                None,
                "[llm.roles] gatherer",
                "no provider named \"nope\" (defined: anthropic)",
            ),
            (
                LlmFile::default(),
                Some("openai/gpt-4o"),
                "RUNNER_LLM_MODEL",
                "set OPENAI_API_KEY",
            ),
            (
                LlmFile::default(),
                Some("gpt-4o"),
                "RUNNER_LLM_MODEL",
                "is not provider/model",
            ),
            (
                file("[llm.providers.groq]\napi = \"openai\"\napi_key_env = \"GROQ_API_KEY\""),
                None,
                "[llm.providers.groq] api_key_env",
                "GROQ_API_KEY is not set in the runner's environment",
            ),
            (
                file("[llm.providers.groq]\napi = \"openai\"\napi_key_env = \"gsk-secret-123\""),
                None,
                "[llm.providers.groq] api_key_env",
                "must name the environment variable",
            ),
            (
                file("[llm.providers.x]\napi = \"openai\"\nbase_url = \"ftp://h\""),
                None,
                "[llm.providers.x] base_url",
                "http",
            ),
            (
                file("[llm.prices.m]\ninput_per_mtok = -1\noutput_per_mtok = 1"),
                None,
                "[llm.prices.\"m\"]",
                "at least 0",
            ),
            (
                file("[llm]\nmax_attempts = 0"),
                None,
                "[llm] max_attempts",
                "at least 1",
            ),
            (
                file("[llm]\nstall_timeout_secs = 0"),
                None,
                "[llm] stall_timeout_secs",
                "at least 1 second",
            ),
            (
                file("[llm]\nbudget_usd = 0"),
                None,
                "[llm] budget_usd",
                "positive",
            ),
        ];
        let v = vars(&[("ANTHROPIC_API_KEY", "sk-ant-hidden")]);
        for (f, model, key, message) in cases {
            let e = LlmConfig::resolve(Some(f), model, &v).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.message.contains(message), "{e}");
            let shown = e.to_string();
            assert!(
                !shown.contains("sk-ant-hidden") && !shown.contains("gsk-secret"),
                "{shown}"
            );
        }
    }

    #[test]
    fn round_table_providers_resolve_against_the_providers() {
        let v = vars(&[("ANTHROPIC_API_KEY", "k")]);
        let c = LlmConfig::resolve(
            Some(file(
                "[llm.round_table]\nproviders = [\"anthropic/a\", \"anthropic/b/c\"]\ntimeout_secs = 5",
            )),
            None,
            &v,
        )
        .unwrap();
        let names: Vec<String> = c
            .round_table
            .providers
            .iter()
            .map(|m| m.to_string())
            .collect();
        assert_eq!(names, ["anthropic/a", "anthropic/b/c"]);
        assert_eq!(c.round_table.timeout, Duration::from_secs(5));
        let none = LlmConfig::resolve(None, None, &v).unwrap();
        assert!(none.round_table.providers.is_empty());
        assert_eq!(none.round_table.timeout, DEFAULT_ROUND_TABLE_TIMEOUT);
        for (text, message) in [
            (
                "[llm.round_table]\nproviders = [\"groq/x\"]",
                "no provider named \"groq\"",
            ),
            (
                "[llm.round_table]\nproviders = [\"nomodel\"]",
                "not provider/model",
            ),
            (
                "[llm.round_table]\nproviders = [\"anthropic/a\", \"anthropic/a\"]",
                "listed twice",
            ),
            ("[llm.round_table]\ntimeout_secs = 0", "at least 1 second"),
        ] {
            let e = LlmConfig::resolve(Some(file(text)), None, &v).unwrap_err();
            assert!(e.key.starts_with("[llm.round_table]"), "{e}");
            assert!(e.message.contains(message), "{e}");
        }
    }

    #[test]
    fn unknown_keys_in_the_table_are_refused() {
        #[derive(Deserialize)]
        struct Wrap {
            #[allow(dead_code)]
            llm: LlmFile,
        }
        assert!(toml::from_str::<Wrap>("[llm]\nbudget = 3").is_err());
        assert!(toml::from_str::<Wrap>("[llm.providers.a]\napi = \"gemini\"").is_err());
        assert!(
            toml::from_str::<Wrap>("[llm.providers.a]\napi = \"openai\"\napi_key = \"k\"").is_err()
        );
    }

    #[test]
    fn debug_never_shows_a_key() {
        let c =
            LlmConfig::resolve(None, None, &vars(&[("OPENAI_API_KEY", "sk-visible?")])).unwrap();
        let shown = format!("{c:?}");
        assert!(
            shown.contains("OPENAI_API_KEY") && !shown.contains("sk-visible?"),
            "{shown}"
        );
    }

    #[test]
    fn anthropic_endpoints_accept_a_base_with_or_without_v1() {
        let p = Provider::new("a", Api::Anthropic, "http://h:1/v1/", None);
        assert_eq!(p.endpoint(), "http://h:1/v1/messages");
        let p = Provider::new("a", Api::Anthropic, "http://h:1/proxy", None);
        assert_eq!(p.endpoint(), "http://h:1/proxy/v1/messages");
    }
}
