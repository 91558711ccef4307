//! The worker's integration tests, one binary: a real simulator, a real
//! serenity worker, real PostgreSQL. Shared support is in observer-testkit.

mod common;

mod bot_access;
mod e2e;
mod forum;
mod sigkill;
