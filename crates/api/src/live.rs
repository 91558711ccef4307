//! Live fan-out of message events (docs/fan-out.md).
//!
//! - [`hub`]: the per-process hub (a module tree) — one LISTEN connection, one read of the
//!   event log per notification for all subscribers, in-memory access sets,
//!   bounded per-subscriber buffers, gapless resume through RLS.
//! - [`metrics`]: its Prometheus metrics (registered into [`crate::metrics::Metrics`]).
//! - [`gql`]: the GraphQL face: event → `MessageEvent`, cursors, error codes.
//! - [`render`]: selection keys and each event's cache of renderings, held
//!   by the hub's events and filled by [`gql`] (no GraphQL types).
//! - [`conn`]: a WebSocket connection's credential (re-checked while its
//!   subscriptions run) and the caps on how many it may open.
//! - [`ws`]: the GraphQL WebSocket protocols, pre-rendered frames through each
//!   subscription's lane, bursts written with one flush, keepalive.
//!
//! Dependencies: live uses `crate::graphql::types` (the object types events
//! render to) and `crate::viewer`, never the schema roots;
//! `crate::graphql::subscription` is the one GraphQL module that uses live.

pub mod conn;
pub mod gql;
pub mod hub;
pub mod metrics;
pub mod render;
pub mod ws;
