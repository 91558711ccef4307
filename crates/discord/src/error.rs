//! The one error type of the client.

use std::time::Duration;

/// Why a Discord request did not produce the payload asked for.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 403: Missing Access (50001) or Missing Permissions (50013). Retrying
    /// does not help; Discord counts every one against the invalid-request
    /// budget.
    #[error("{route}: forbidden (code {code:?})")]
    Forbidden { route: String, code: Option<u64> },
    /// 404: gone, or never existed.
    #[error("{route}: not found")]
    NotFound { route: String },
    /// 401: the token no longer works.
    #[error("{route}: unauthorized")]
    Unauthorized { route: String },
    /// Still rate limited after the allowed retries, or the wait asked for is
    /// longer than the configured cap.
    #[error("{route}: rate limited ({retries} retries, next wait {wait:?})")]
    RateLimited {
        route: String,
        retries: u32,
        wait: Duration,
    },
    /// The invalid-request guard refused to send: too many 401/403/429
    /// answers in the rolling window, and more would risk Discord's ban of
    /// the whole deployment's IP.
    #[error("invalid-request budget exhausted ({count} in the window); not sending {route}")]
    BudgetExhausted { route: String, count: usize },
    /// Any other unexpected status; `code` is Discord's JSON error code.
    #[error("{route}: status {status} (code {code:?})")]
    Status {
        route: String,
        status: u16,
        code: Option<u64>,
    },
    /// The request could not be sent or its answer not read.
    #[error("{route}: request failed: {source}")]
    Http {
        route: String,
        #[source]
        source: reqwest::Error,
    },
    /// The answer is not the payload expected.
    #[error("{route}: unexpected payload: {source}")]
    Decode {
        route: String,
        #[source]
        source: serde_json::Error,
    },
    /// The client could not be built (bad base URL, TLS setup).
    #[error("client setup: {0}")]
    Setup(String),
}

impl Error {
    /// Whether trying again later may succeed (the next backfill run, the
    /// next re-read): network trouble, 5xx, rate limits, the budget guard.
    /// 401/403/404, other 4xx and undecodable payloads are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Http { .. } | Error::RateLimited { .. } | Error::BudgetExhausted { .. } => true,
            Error::Status { status, .. } => *status >= 500,
            Error::Forbidden { .. }
            | Error::NotFound { .. }
            | Error::Unauthorized { .. }
            | Error::Decode { .. }
            | Error::Setup(_) => false,
        }
    }

    /// The HTTP status Discord answered with, when the error is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Forbidden { .. } => Some(403),
            Error::NotFound { .. } => Some(404),
            Error::Unauthorized { .. } => Some(401),
            Error::RateLimited { .. } => Some(429),
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth an immediate retry inside one call (backoff with jitter):
    /// connection failures and 5xx only.
    pub(crate) fn is_retryable_now(&self) -> bool {
        match self {
            Error::Http { .. } => true,
            Error::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}
