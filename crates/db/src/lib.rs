//! observer-db: the only crate that speaks SQL.
//!
//! Layout:
//! - [`tx`]: transactions that run as one of the database roles of
//!   policies/README.md (`observer_api` with a viewer set, `observer_worker`,
//!   `observer_auth`, `observer_fanout`). Every query function takes one of
//!   these, so reading tenant data without choosing a role (and a viewer) is a
//!   type error.
//! - [`migrate`]: schema migrations (migrations/) plus the idempotent RLS policies
//!   and roles (policies/), safe to run concurrently.
//! - [`access`]: the access rule of docs/access-rule.md in Rust (the SQL twin lives in
//!   policies/); used by live fan-out.
//! - [`access_data`]: loads that rule's inputs (guilds, roles, channels,
//!   overwrites, memberships) as `observer_fanout`.
//! - [`events`]: the event logs for live fan-out and resume (cursors, watermark reads, RLS replay).
//! - [`bot_access`]: whether the bot itself can read each channel (worker writes, API reads).
//! - [`ingest`]: writes from the worker (idempotent upserts, event log, NOTIFY),
//!   a module tree: op types, the message merge, access and member upserts
//!   (observed-at ordered, thread members and complete listings included),
//!   message write rounds, backfill bounds and retention.
//! - [`reconcile`]: a channel's recent window after a gap; deletions detected
//!   rather than reported.
//! - [`support`]: the support queue: conversations derived from forum posts
//!   in the ingest transaction, their settings, and the API's queue and
//!   telemetry reads (docs/support-queue.md).
//! - [`viewer`]: reads for the API, always under RLS.
//! - [`auth`]: users, OAuth tokens, API tokens and memberships for the login path.
//! - [`server`]: a private PostgreSQL cluster from the installed server binaries
//!   (the demo without `DATABASE_URL`; tests that restart PostgreSQL). No SQL.
//!
//! SQL: static queries are `sqlx::query!`/`query_as!`/`query_scalar!`, checked
//! at compile time against the committed `.sqlx/` (crates/db/README.md); the
//! few dynamic ones say why in a `// dynamic:` comment. Timestamps are written
//! `DateTime<Utc>` explicitly in them (`"col: DateTime<Utc>"`, `arg as
//! DateTime<Utc>`): a workspace build also enables sqlx's `time` feature
//! (tower-sessions' store), and the macros would otherwise pick `time` types.
//!
//! Errors: functions return [`Error`]; callers branch on the few variants that
//! matter (not found, conflict) and log the rest with their cause chain;
//! [`Error::is_transient`] says whether a failed write is worth retrying as is.

pub mod access;
pub mod access_data;
pub mod auth;
pub mod bot_access;
pub mod error;
pub mod events;
pub mod ingest;
pub mod migrate;
pub mod reconcile;
pub mod server;
pub mod support;
pub mod tx;
pub mod viewer;

pub use error::{Error, Result};
pub use tx::{AuthTx, Db, FanoutConn, FanoutRead, FanoutTx, ViewerTx, WorkerConn, WorkerTx};

/// Schema migrations, embedded at compile time. `#[sqlx::test(migrator = "observer_db::MIGRATOR")]`
/// uses it; production goes through [`migrate::run`], which also applies policies/.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");
