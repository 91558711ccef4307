//! Discord REST GETs for backfill and re-reads, honouring rate limits in every
//! mode: 429 `retry_after` (body, else `Retry-After`) and an exhausted
//! `X-RateLimit-Remaining` (wait `X-RateLimit-Reset-After`).

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum RestError {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("unexpected status {0} from {1}")]
    Status(StatusCode, String),
}

#[derive(Clone)]
pub struct Rest {
    pub http: reqwest::Client,
    /// `{DISCORD_API_BASE_URL}/api/v10`
    pub api: String,
    pub token: String,
    pub metrics: Arc<Metrics>,
}

impl Rest {
    /// GETs `{api}{path}`. `Ok(None)` for 403/404 (no access, or gone).
    pub async fn get(&self, path: &str) -> Result<Option<Value>, RestError> {
        let url = format!("{}{path}", self.api);
        let mut transient = 0u32;
        loop {
            let resp = match self
                .http
                .get(&url)
                .header("authorization", format!("Bot {}", self.token))
                .send()
                .await
            {
                Ok(r) => r,
                Err(err) if transient < 5 => {
                    transient += 1;
                    tracing::warn!(%url, error = %err, "REST request failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(transient))).await;
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            let status = resp.status();
            let headers = resp.headers().clone();
            let header_f64 = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<f64>().ok())
            };
            if status == StatusCode::TOO_MANY_REQUESTS {
                self.metrics.backfill_rate_limited.inc();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                let secs = body
                    .get("retry_after")
                    .and_then(Value::as_f64)
                    .or_else(|| header_f64("retry-after"))
                    .unwrap_or(1.0)
                    .clamp(0.0, 60.0);
                tracing::info!(%url, retry_after = secs, "rate limited");
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                continue;
            }
            if status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if status.is_server_error() && transient < 5 {
                transient += 1;
                tokio::time::sleep(Duration::from_millis(200 * u64::from(transient))).await;
                continue;
            }
            if !status.is_success() {
                return Err(RestError::Status(status, url));
            }
            let body: Value = resp.json().await?;
            if header_f64("x-ratelimit-remaining") == Some(0.0) {
                let wait = header_f64("x-ratelimit-reset-after")
                    .unwrap_or(1.0)
                    .clamp(0.0, 60.0);
                tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            }
            return Ok(Some(body));
        }
    }
}
