//! End-to-end live fan-out benchmark (docs/targets.md): simulator
//! dispatch → worker → PostgreSQL → API hub → WebSocket frame at the client.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo run --release -p observer-api --example fanout_bench -- \
//!   [--viewers 1000] [--rate 1000] [--seconds 10] [--guilds 4] [--roles 8] \
//!   [--role-prob 0.125] [--public-channels 0] [--api-pool 16] \
//!   [--connect-parallel 64] [--drain-secs 20] [--seed 7] [--client-threads 2]
//! ```
//!
//! Setup: a scratch database `observer_fanout_<pid>` next to DATABASE_URL's
//! (dropped at the end), migrations, the simulator loaded with
//! `Scenario::generate` plus, per guild, `--roles` team roles with one private
//! channel each (@everyone denied VIEW_CHANNEL, the role allowed) and
//! `--public-channels` open channels, and `--viewers` users who are members of
//! every guild, each holding a different set of team roles (each role with
//! probability `--role-prob`, duplicates redrawn). All of that is put into the
//! simulator's world (its Rust API), so the real worker mirrors it from
//! GUILD_CREATE. Each viewer gets an API token (`observer_db::viewer::create_api_token`).
//!
//! The WebSocket clients run in a child process (this binary with `--client`),
//! so the server process's VmRSS before/after opening the idle subscriptions
//! is the server's own cost; it runs `--client-threads` runtime threads (2). Each client speaks `graphql-transport-ws`, sends
//! its token in `connection_init` and subscribes to
//! `messageEvents { kind cursor message { id channelId content } }` (all of
//! that through tungstenite), then reads that socket's frames straight from
//! its bytes: the client shares the server's cores, so its own cost is
//! queueing delay in what it measures.
//!
//! Then messages are posted into the simulator at `--rate` for `--seconds`,
//! round-robin over the bench channels, with the wall-clock send time (unix
//! nanoseconds, the same clock in both processes) in the content. The client
//! measures dispatch → frame received for every frame, counts frames per
//! viewer and flags any frame from a channel its viewer may not see. The
//! expected count per viewer comes from `observer_db::access::visible_channels`
//! over the mirrored data (cross-checked against the construction).
//!
//! Database work per message: the hub's own read counter
//! (`observer_api_live_db_reads_total` from /metrics) and, for the whole
//! scratch database, `pg_stat_database` transactions and `pg_stat_user_tables`
//! scans of `message_events` (pg_stat_statements needs
//! `shared_preload_libraries`, which the shared server does not have).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use observer_sim::{
    perms, Channel, ChannelKind, GenOptions, Member, Overwrite, OverwriteKind, PostOptions, Role,
    Scenario, SimConfig, Simulator, User,
};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::Connection;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const SUB: &str = "subscription { messageEvents { kind cursor message { id channelId content } } }";
const CONTENT_PREFIX: &str = "fanout-bench";

#[derive(Debug, Clone)]
struct Args {
    viewers: usize,
    rate: f64,
    seconds: f64,
    guilds: usize,
    roles: usize,
    role_prob: f64,
    public_channels: usize,
    api_pool: u32,
    connect_parallel: usize,
    drain_secs: u64,
    seed: u64,
    client_threads: usize,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            viewers: 1000,
            rate: 1000.0,
            seconds: 10.0,
            guilds: 4,
            roles: 8,
            role_prob: 0.125,
            public_channels: 0,
            api_pool: 16,
            connect_parallel: 64,
            drain_secs: 20,
            seed: 7,
            client_threads: 2,
        }
    }
}

fn parse_args(raw: &[String]) -> anyhow::Result<Args> {
    let mut a = Args::default();
    let mut it = raw.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let bad = || format!("bad value {value:?} for {flag}");
        match flag.as_str() {
            "--viewers" => a.viewers = value.parse().with_context(bad)?,
            "--rate" => a.rate = value.parse().with_context(bad)?,
            "--seconds" => a.seconds = value.parse().with_context(bad)?,
            "--guilds" => a.guilds = value.parse().with_context(bad)?,
            "--roles" => a.roles = value.parse().with_context(bad)?,
            "--role-prob" => a.role_prob = value.parse().with_context(bad)?,
            "--public-channels" => a.public_channels = value.parse().with_context(bad)?,
            "--api-pool" => a.api_pool = value.parse().with_context(bad)?,
            "--connect-parallel" => a.connect_parallel = value.parse().with_context(bad)?,
            "--drain-secs" => a.drain_secs = value.parse().with_context(bad)?,
            "--seed" => a.seed = value.parse().with_context(bad)?,
            "--client-threads" => a.client_threads = value.parse().with_context(bad)?,
            other => bail!("unknown flag {other} (see the header of fanout_bench.rs)"),
        }
    }
    if a.viewers == 0 || a.guilds == 0 || a.rate <= 0.0 || a.seconds <= 0.0 || a.client_threads == 0
    {
        bail!("--viewers, --guilds, --rate, --seconds and --client-threads must be positive");
    }
    if a.roles + a.public_channels == 0 {
        bail!("need at least one bench channel (--roles or --public-channels)");
    }
    if !(0.0..=1.0).contains(&a.role_prob) {
        bail!("--role-prob must be within 0..=1");
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.first().map(String::as_str) == Some("--client") {
        // The clients stand for 1,000 independent browsers: with one thread
        // for all of them, a frame waited for the ones read before it (at
        // 1,000 × 1,000 that queue was ~2 ms of the measured p50). Threads:
        // the argument after `--client`.
        let threads = raw.get(1).and_then(|t| t.parse().ok()).unwrap_or(2);
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
            .block_on(client::run());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(server_main(raw))
}

async fn server_main(raw: Vec<String>) -> anyhow::Result<()> {
    let args = parse_args(&raw)?;
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL")?;
    let name = format!("observer_fanout_{}", std::process::id());
    let mut admin = sqlx::PgConnection::connect(&url).await?;
    sqlx::query(&format!("create database {name}"))
        .execute(&mut admin)
        .await?;
    // Options after the database name (`?sslmode=disable`) carry over.
    let (base, options) = match url.split_once('?') {
        Some((b, o)) => (b, format!("?{o}")),
        None => (url.as_str(), String::new()),
    };
    let bench_url = match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}{options}"),
        None => bail!("DATABASE_URL needs a database path"),
    };
    let result = bench(&bench_url, &args).await;
    sqlx::query(&format!("drop database if exists {name} with (force)"))
        .execute(&mut admin)
        .await?;
    result
}

mod bench;
mod client;
mod stats;
mod sysinfo;
mod world;

use bench::*;
use stats::*;
use sysinfo::*;
use world::*;
