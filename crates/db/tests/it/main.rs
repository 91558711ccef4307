//! observer-db's integration tests, one binary: real PostgreSQL, a fresh
//! database per test (`#[sqlx::test]`). Shared support is in observer-testkit.

mod access_property;
mod auth;
mod events;
mod ingest;
mod ingest_order;
mod ingest_throughput;
mod migrate;
mod retention;
mod rls;
mod support;
mod support_rollup;
