//! Live fan-out (issue 6, brief E): the shared hub that replaces the
//! per-subscriber reads of [`crate::replay`]. Module root kept here because
//! `live.rs` already existed when `live/` was created.

pub mod hub;
pub mod metrics;
