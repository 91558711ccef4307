//! Test support shared by the integration tests of every crate.
//!
//! Layout of the tests: each crate has exactly one integration-test binary,
//! `crates/<crate>/tests/it/main.rs`, declaring one module per topic
//! (`tests/it/<topic>.rs`) and `tests/it/common.rs` for helpers only that
//! crate needs. Everything more than one crate needs lives here:
//!
//! - [`wait`]: polling until a condition holds (`eventually` and friends);
//! - [`api`]: the real API server on `127.0.0.1:0`, users, tokens, GraphQL calls;
//! - [`seed`]: fixture rows written as the superuser test connection;
//! - [`worker`]: the real worker in-process against the simulator;
//! - [`child`]: re-running one test of the current binary as a child process;
//! - [`db`] and [`init_tracing`].
//!
//! All tests of a crate share one process and run concurrently on threads, so
//! nothing here touches process-global state except [`init_tracing`]
//! (idempotent). A test that needs the process to itself (a global tracing
//! subscriber, signals) runs its body in a child via [`child`].
//!
//! This crate depends on the others; they take it only as a dev-dependency.
// Test support: a failed setup step is a failed test, with its panic message.
#![allow(clippy::unwrap_used)]

pub mod api;
pub mod child;
pub mod seed;
pub mod wait;
pub mod worker;

pub use wait::eventually;

use observer_db::Db;
use sqlx::PgPool;

/// A log subscriber for the whole test process (`RUST_LOG` filters it,
/// output goes through the test harness's capture). Safe to call from every test.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The `Db` over a `#[sqlx::test]` pool, with the RLS policies applied
/// (the migrator alone does not apply them).
pub async fn db(pool: &PgPool) -> anyhow::Result<Db> {
    observer_db::migrate::apply_policies(pool).await?;
    Ok(Db::new(pool.clone()))
}
