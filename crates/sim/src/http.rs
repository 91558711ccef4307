//! What every `/api` route shares: Discord-shaped JSON errors, bot-token auth and query
//! parameters (REST and the OAuth2 bearer routes both use these).

use std::collections::HashMap;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::{Shared, SimError};

/// A Discord-shaped JSON error.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: u32,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, 0, "401: Unauthorized")
    }
    pub fn missing_access() -> Self {
        Self::new(StatusCode::FORBIDDEN, 50001, "Missing Access")
    }
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, 50035, msg)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"code": self.code, "message": self.message})),
        )
            .into_response()
    }
}

impl From<SimError> for ApiError {
    fn from(e: SimError) -> Self {
        let msg = e.to_string();
        match e {
            SimError::UnknownGuild(_) => Self::new(StatusCode::NOT_FOUND, 10004, "Unknown Guild"),
            SimError::UnknownChannel(_) => {
                Self::new(StatusCode::NOT_FOUND, 10003, "Unknown Channel")
            }
            SimError::UnknownMessage(_) => {
                Self::new(StatusCode::NOT_FOUND, 10008, "Unknown Message")
            }
            SimError::UnknownUser(_) => Self::new(StatusCode::NOT_FOUND, 10013, "Unknown User"),
            SimError::UnknownRole(_) => Self::new(StatusCode::NOT_FOUND, 10011, "Unknown Role"),
            SimError::NotAMember { .. } => {
                Self::new(StatusCode::NOT_FOUND, 10007, "Unknown Member")
            }
            SimError::Invalid(_) | SimError::Io(_) => Self::bad_request(msg),
        }
    }
}

pub(crate) type ApiResult = Result<Json<Value>, ApiError>;

pub(crate) fn auth_header(headers: &HeaderMap) -> &str {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

pub(crate) fn require_bot(sh: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    match auth_header(headers).strip_prefix("Bot ") {
        Some(t) if t == sh.config.bot_token => Ok(()),
        _ => Err(ApiError::unauthorized()),
    }
}

/// Query pairs; tolerates serenity's `?&limit=..` (empty pairs are skipped).
pub(crate) fn query_map(raw: &Option<String>) -> HashMap<String, String> {
    raw.as_deref()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .filter(|(k, _)| !k.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn id_param(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    q.get(name)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("{name} is not a snowflake")))
        })
        .transpose()
}

pub(crate) fn limit_param(
    q: &HashMap<String, String>,
    default: u64,
    max: u64,
) -> Result<usize, ApiError> {
    let limit = match q.get("limit") {
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request("limit is not an integer"))?,
        None => default,
    };
    if limit == 0 || limit > max {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {max}"
        )));
    }
    Ok(limit as usize)
}

pub(crate) fn bool_param(q: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match q.get(name).map(String::as_str) {
        None | Some("false") | Some("False") | Some("0") => Ok(false),
        Some("true") | Some("True") | Some("1") => Ok(true),
        Some(_) => Err(ApiError::bad_request(format!("{name} is not a boolean"))),
    }
}
