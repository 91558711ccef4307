//! The API's integration tests, one binary: the real server on 127.0.0.1:0
//! over a fresh database per test, the simulator and worker in-process where
//! a test needs Discord. Shared support is in observer-testkit.

mod common;

mod bot_access;
mod error_codes;
mod graphql;
mod http_layers;
mod isolation;
mod live_hub;
mod live_load;
mod live_pg_restart;
mod live_ws;
mod login;
mod mirror_threads;
mod module_cycles;
mod schema;
mod support;
mod support_truth;
