//! WordPress media uploads: `POST /wp-json/wp/v2/media` with Basic auth (a user's application
//! password), the file as the body; answers the media's id and URL.

use std::time::Duration;

use serde_json::Value;

use super::WordPress;

/// An uploaded media item.
#[derive(Debug, Clone, PartialEq)]
pub struct Media {
    pub id: u64,
    pub url: Option<String>,
}

pub async fn upload(
    http: &reqwest::Client,
    wp: &WordPress,
    name: &str,
    content_type: &str,
    bytes: Vec<u8>,
) -> Result<Media, String> {
    let url = format!(
        "{}/wp-json/wp/v2/media",
        wp.url.as_str().trim_end_matches('/')
    );
    let res = http
        .post(url)
        .basic_auth(&wp.user, Some(&wp.password))
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .header(
            reqwest::header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .timeout(Duration::from_secs(300))
        .body(bytes)
        .send()
        .await
        .map_err(|e| format!("WordPress could not be reached: {}", e.without_url()))?;
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if !status.is_success() {
        let m = v
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("no message");
        return Err(format!("WordPress answered {}: {m}", status.as_u16()));
    }
    let id = v
        .get("id")
        .and_then(Value::as_u64)
        .ok_or("WordPress's answer has no media id")?;
    let url = v
        .get("source_url")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(Media { id, url })
}
