//! observer-discord: the one Discord REST client of the worker and the API.
//!
//! Layout:
//! - [`client`]: [`Client`] (bot-token calls, and OAuth users' bearer-token
//!   calls through the same limits and budget; [`Client::send_raw`] for the
//!   OAuth2 token grant), [`Fetched`] (403/404 as answers), [`Options`],
//!   the [`Observer`] hooks for metrics.
//! - [`ratelimit`]: per-route buckets learned from `X-RateLimit-Bucket`,
//!   the global limit (pacing, and a pause on a global 429), `retry_after`.
//! - [`guard`]: the invalid-request guard (401/403/429 in a rolling
//!   10-minute window; refuses to send before Discord would ban the IP).
//! - [`models`]: typed payloads, no hand-indexed JSON.
//! - [`error`]: [`Error`], with [`Error::is_transient`].
//!
//! Retries of connection errors and 5xx use jittered exponential backoff
//! (`backon`); 429s wait what Discord asks, then retry, a bounded number of
//! times. See README.md for why this is in-house rather than twilight-http.

pub mod client;
pub mod error;
pub mod guard;
pub mod models;
pub mod ratelimit;

pub use client::{Client, ClientBuilder, Fetched, Observer, Options, RawResponse};
pub use error::Error;
pub use guard::{GuardSettings, DISCORD_INVALID_REQUEST_LIMIT};
pub use models::{Gateway, Member, PartialGuild, Role, Snowflake, ThreadList, ThreadMember, User};
pub use ratelimit::Limits;
pub use secrecy::SecretString;
