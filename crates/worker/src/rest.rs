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
    #[error("still rate limited after {0} retries: {1}")]
    RateLimited(u32, String),
}

/// 429 answers tolerated for one request; then it fails (logged and counted;
/// the next backfill run or re-read tries again).
pub const MAX_RATE_LIMIT_RETRIES: u32 = 10;
/// Longest wait a rate-limit answer can impose.
const MAX_WAIT_SECS: f64 = 60.0;
/// Wait when a rate-limit answer names no usable time.
const DEFAULT_WAIT_SECS: f64 = 1.0;

/// The wait a rate-limit answer asks for: the first candidate that is a
/// finite, non-negative number of seconds, capped. `NaN`, `inf` and negative
/// values parse as `f64` but would make `Duration::from_secs_f64` panic or
/// misbehave, so they count as absent.
fn wait(candidates: &[Option<f64>]) -> Duration {
    let secs = candidates
        .iter()
        .flatten()
        .copied()
        .find(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(DEFAULT_WAIT_SECS)
        .min(MAX_WAIT_SECS);
    Duration::from_secs_f64(secs)
}

/// What a GET found. A 403 is not an error: the bot lacks a permission Discord
/// will not give it by retrying, so callers record it and move on.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    Ok(Value),
    /// 403: Missing Access (50001, no VIEW_CHANNEL; voice without CONNECT) or
    /// Missing Permissions (50013). `code` is Discord's JSON error code.
    Forbidden {
        code: Option<u64>,
    },
    /// 404: gone (or never existed).
    NotFound,
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
    /// GETs `{api}{path}`. `Ok(None)` for 403/404 (no access, or gone); see
    /// [`Rest::fetch`] to tell them apart.
    pub async fn get(&self, path: &str) -> Result<Option<Value>, RestError> {
        Ok(match self.fetch(path).await? {
            Fetched::Ok(v) => Some(v),
            Fetched::Forbidden { .. } | Fetched::NotFound => None,
        })
    }

    /// GETs `{api}{path}`: retries transient failures and rate limits, never a 403.
    pub async fn fetch(&self, path: &str) -> Result<Fetched, RestError> {
        let url = format!("{}{path}", self.api);
        let mut transient = 0u32;
        let mut limited = 0u32;
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
                if limited >= MAX_RATE_LIMIT_RETRIES {
                    self.metrics.rest_rate_limit_give_ups.inc();
                    tracing::warn!(%url, retries = limited, "still rate limited; giving up on this request");
                    return Err(RestError::RateLimited(limited, url));
                }
                limited += 1;
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                let pause = wait(&[
                    body.get("retry_after").and_then(Value::as_f64),
                    header_f64("retry-after"),
                ]);
                tracing::info!(%url, retry_after = pause.as_secs_f64(), "rate limited");
                tokio::time::sleep(pause).await;
                continue;
            }
            if status == StatusCode::FORBIDDEN {
                self.metrics.rest_forbidden.inc();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                return Ok(Fetched::Forbidden {
                    code: body.get("code").and_then(Value::as_u64),
                });
            }
            if status == StatusCode::NOT_FOUND {
                return Ok(Fetched::NotFound);
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
                tokio::time::sleep(wait(&[header_f64("x-ratelimit-reset-after")])).await;
            }
            return Ok(Fetched::Ok(body));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[test]
    fn unusable_waits_fall_back_and_large_ones_are_capped() {
        let nan = "NaN".parse::<f64>().ok();
        let inf = "inf".parse::<f64>().ok();
        let d = Duration::from_secs_f64(DEFAULT_WAIT_SECS);
        assert_eq!(wait(&[nan]), d);
        assert_eq!(wait(&[inf, Some(-3.0)]), d);
        assert_eq!(wait(&[None, nan, Some(0.25)]), Duration::from_millis(250));
        assert_eq!(wait(&[Some(1e300)]), Duration::from_secs(60));
        assert_eq!(wait(&[]), d);
    }

    /// Serves `responses[i]` to the i-th request (the last one from then on).
    async fn serve(responses: Vec<&'static str>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let i = counter.fetch_add(1, Ordering::SeqCst);
                let resp = responses[i.min(responses.len() - 1)];
                tokio::spawn(async move {
                    let _head = crate::metrics::read_head(&mut sock).await;
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        (format!("http://{addr}"), hits)
    }

    fn rest(api: String) -> Rest {
        Rest {
            http: reqwest::Client::new(),
            api,
            token: "t".into(),
            metrics: Metrics::new(),
        }
    }

    const LIMITED_NAN: &str = "HTTP/1.1 429 Too Many Requests\r\nretry-after: NaN\r\n\
        content-length: 0\r\nconnection: close\r\n\r\n";
    const LIMITED_ZERO: &str =
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
        content-length: 18\r\nconnection: close\r\n\r\n{\"retry_after\": 0}";
    const OK_EXHAUSTED_INF: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
        x-ratelimit-remaining: 0\r\nx-ratelimit-reset-after: -inf\r\n\
        content-length: 2\r\nconnection: close\r\n\r\n[]";

    #[tokio::test]
    async fn nan_and_infinite_rate_limit_headers_do_not_panic() {
        let (api, hits) = serve(vec![LIMITED_NAN, OK_EXHAUSTED_INF]).await;
        let started = Instant::now();
        let got = rest(api).get("/x").await.unwrap();
        assert_eq!(got, Some(Value::Array(vec![])));
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        // Both unusable waits fell back to the default, not to zero or forever.
        assert!(started.elapsed() >= Duration::from_secs_f64(2.0 * DEFAULT_WAIT_SECS));
    }

    const FORBIDDEN: &str = "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\n\
        content-length: 44\r\nconnection: close\r\n\r\n{\"code\": 50001, \"message\": \"Missing Access\"}";
    const NOT_FOUND: &str = "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n\
        content-length: 45\r\nconnection: close\r\n\r\n{\"code\": 10003, \"message\": \"Unknown Channel\"}";

    #[tokio::test]
    async fn a_403_is_one_request_counted_and_told_apart_from_a_404() {
        let (api, hits) = serve(vec![FORBIDDEN]).await;
        let r = rest(api);
        let got = r.fetch("/channels/1/messages").await.unwrap();
        assert_eq!(got, Fetched::Forbidden { code: Some(50001) });
        assert_eq!(hits.load(Ordering::SeqCst), 1, "never retried");
        assert_eq!(r.metrics.rest_forbidden.get(), 1);

        let (api, _) = serve(vec![NOT_FOUND]).await;
        let r = rest(api);
        assert_eq!(r.fetch("/channels/1").await.unwrap(), Fetched::NotFound);
        assert_eq!(r.metrics.rest_forbidden.get(), 0);
    }

    #[tokio::test]
    async fn endless_429s_give_up_with_an_error() {
        let (api, hits) = serve(vec![LIMITED_ZERO]).await;
        let r = rest(api);
        let err = r.get("/x").await.unwrap_err();
        assert!(
            matches!(err, RestError::RateLimited(MAX_RATE_LIMIT_RETRIES, _)),
            "{err}"
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            MAX_RATE_LIMIT_RETRIES as usize + 1
        );
        assert_eq!(r.metrics.rest_rate_limit_give_ups.get(), 1);
    }
}
