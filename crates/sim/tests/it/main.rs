//! The simulator's integration tests, one binary: raw WebSocket/HTTP clients
//! and the real serenity client against a simulator on 127.0.0.1:0.

mod common;

mod bot_access;
mod determinism;
mod gateway_protocol;
mod oauth;
mod rate_limits;
mod rest;
mod serenity_faults;
mod serenity_gateway;
mod support;
mod threads;
