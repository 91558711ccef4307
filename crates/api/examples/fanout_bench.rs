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

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn vm_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds (user + system) a process has used so far, from /proc/<pid>/stat
/// (assumes the usual 100 clock ticks per second).
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may itself hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The bench part of the world: which channels exist and who holds which role.
struct World {
    /// (guild id, channel id, author id) of every bench channel.
    channels: Vec<(u64, u64, u64)>,
    /// channel id → the team role that opens it (None: public).
    channel_role: HashMap<u64, Option<u64>>,
    viewers: Vec<u64>,
    /// viewer → team roles held (across guilds).
    held: HashMap<u64, BTreeSet<u64>>,
    guild_ids: Vec<u64>,
}

fn build_world(sc: &mut Scenario, a: &Args) -> anyhow::Result<World> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    // 2025-01-01: after the generated ids (2024), before anything live.
    let mut next = observer_sim::model::snowflake_at(1_735_689_600_000);
    let mut id = || {
        next += 1;
        next
    };
    let viewers: Vec<u64> = (0..a.viewers).map(|_| id()).collect();
    for (i, v) in viewers.iter().enumerate() {
        sc.users.push(User {
            id: *v,
            username: format!("viewer{i}"),
            global_name: None,
            avatar: None,
            bot: false,
        });
    }
    let mut w = World {
        channels: Vec::new(),
        channel_role: HashMap::new(),
        viewers: viewers.clone(),
        held: HashMap::new(),
        guild_ids: Vec::new(),
    };
    // guild id → its team roles
    let mut team: Vec<(u64, Vec<u64>)> = Vec::new();
    for g in &mut sc.guilds {
        w.guild_ids.push(g.id);
        let author = g
            .members
            .first()
            .map(|m| m.user_id)
            .context("generated guild without members")?;
        let mut roles = Vec::new();
        for r in 0..a.roles {
            let rid = id();
            g.roles.push(Role {
                id: rid,
                name: format!("team-{r}"),
                permissions: 0,
                position: 1,
                color: 0,
                hoist: false,
                mentionable: false,
            });
            let cid = id();
            g.channels.push(Channel {
                id: cid,
                kind: ChannelKind::Text,
                name: format!("team-{r}-private"),
                parent_id: None,
                position: 100 + r as i32,
                topic: None,
                overwrites: vec![
                    Overwrite {
                        id: g.id,
                        kind: OverwriteKind::Role,
                        allow: 0,
                        deny: perms::VIEW_CHANNEL,
                    },
                    Overwrite {
                        id: rid,
                        kind: OverwriteKind::Role,
                        allow: perms::VIEW_CHANNEL,
                        deny: 0,
                    },
                ],
                thread: None,
            });
            w.channels.push((g.id, cid, author));
            w.channel_role.insert(cid, Some(rid));
            roles.push(rid);
        }
        for p in 0..a.public_channels {
            let cid = id();
            g.channels.push(Channel {
                id: cid,
                kind: ChannelKind::Text,
                name: format!("bench-public-{p}"),
                parent_id: None,
                position: 200 + p as i32,
                topic: None,
                overwrites: Vec::new(),
                thread: None,
            });
            w.channels.push((g.id, cid, author));
            w.channel_role.insert(cid, None);
        }
        team.push((g.id, roles));
    }
    // Distinct role sets: redraw duplicates (a few tries each).
    let mut seen: HashSet<BTreeSet<u64>> = HashSet::new();
    let mut per_guild: HashMap<u64, Vec<(u64, Vec<u64>)>> = HashMap::new();
    for v in &viewers {
        let mut tries = 0;
        let set = loop {
            let set: BTreeSet<u64> = team
                .iter()
                .flat_map(|(_, rs)| rs.iter().copied())
                .filter(|_| rng.gen_bool(a.role_prob))
                .collect();
            if seen.insert(set.clone()) {
                break set;
            }
            tries += 1;
            if tries > 10_000 {
                bail!(
                    "cannot draw {} distinct role sets: raise --roles or --role-prob",
                    a.viewers
                );
            }
        };
        for (gid, rs) in &team {
            let mine: Vec<u64> = rs.iter().copied().filter(|r| set.contains(r)).collect();
            per_guild.entry(*gid).or_default().push((*v, mine));
        }
        w.held.insert(*v, set);
    }
    let joined = chrono::Utc::now() - chrono::Duration::days(30);
    for g in &mut sc.guilds {
        for (user_id, roles) in per_guild.remove(&g.id).unwrap_or_default() {
            g.members.push(Member {
                user_id,
                roles,
                nick: None,
                joined_at: joined,
                communication_disabled_until: None,
            });
        }
    }
    Ok(w)
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scrape(http: &reqwest::Client, base: &str) -> anyhow::Result<HashMap<String, f64>> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(parse_metrics(&text))
}

/// Prometheus text → series name (with labels) → value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?;
            let value: f64 = parts.next()?.parse().ok()?;
            Some((name.to_owned(), value))
        })
        .collect()
}

fn metric(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

#[derive(Debug, Clone, Copy, Default)]
struct DbStats {
    xacts: i64,
    tup_returned: i64,
    tup_fetched: i64,
    event_scans: i64,
}

async fn db_stats(pool: &sqlx::PgPool) -> anyhow::Result<DbStats> {
    // Backends flush their counters at most once a second while busy; a
    // backend that goes idle within that second flushes after
    // PGSTAT_IDLE_INTERVAL (10 s). Waiting less let the setup's 1,000
    // RLS-checked subscription loads land in the measured window.
    tokio::time::sleep(Duration::from_millis(11_000)).await;
    let mut conn = pool.acquire().await?;
    sqlx::query("select pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await?;
    let (xacts, tup_returned, tup_fetched): (i64, i64, i64) = sqlx::query_as(
        "select xact_commit + xact_rollback, tup_returned, tup_fetched \
         from pg_stat_database where datname = current_database()",
    )
    .fetch_one(&mut *conn)
    .await?;
    let event_scans: i64 = sqlx::query_scalar(
        "select coalesce(seq_scan, 0) + coalesce(idx_scan, 0) from pg_stat_user_tables \
         where relname = 'message_events'",
    )
    .fetch_optional(&mut *conn)
    .await?
    .unwrap_or(0);
    Ok(DbStats {
        xacts,
        tup_returned,
        tup_fetched,
        event_scans,
    })
}

/// Lines from the client process, one at a time.
struct Child {
    proc: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Child {
    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn expect(&mut self, word: &str, limit: Duration) -> anyhow::Result<String> {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .with_context(|| format!("client did not say {word:?} within {limit:?}"))??
            .with_context(|| format!("client exited before {word:?}"))?;
        match line.strip_prefix(word) {
            Some(rest) => Ok(rest.trim().to_owned()),
            None => bail!("client said {line:?}, expected {word:?}"),
        }
    }
}

async fn bench(url: &str, a: &Args) -> anyhow::Result<()> {
    let setup = Instant::now();
    println!(
        "fanout_bench: {} viewers, {} msg/s for {} s, {} guilds × ({} team roles/channels + {} public), role probability {}, {} client threads; load average at start {}",
        a.viewers, a.rate, a.seconds, a.guilds, a.roles, a.public_channels, a.role_prob, a.client_threads, load_average()
    );
    let worker_db = observer_db::Db::connect(url, 8).await?;
    observer_db::migrate::run(worker_db.pool()).await?;

    // The simulator and the worker each get their own runtime thread, as
    // they would be their own processes in production: sharing the API's
    // runtime would queue Discord's side behind a thousand WebSocket tasks,
    // and sharing one thread would hold the worker's database round trips
    // behind the simulator's posting.
    let side = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sim")
        .enable_all()
        .build()?;
    let worker_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("worker")
        .enable_all()
        .build()?;
    let sim = side
        .spawn(Simulator::start(SimConfig {
            rate_limit_per_route: 0,
            ..SimConfig::default()
        }))
        .await??;
    let mut sc = Scenario::generate(
        a.seed,
        GenOptions {
            guilds: a.guilds,
            ..GenOptions::default()
        },
    );
    let world = build_world(&mut sc, a)?;
    sim.load(sc);

    let mut wconf = observer_worker::Config::new(sim.config().bot_token.clone());
    wconf.api_base_url = sim.base_url();
    wconf.backfill = false;
    wconf.log_interval = Duration::from_secs(3600);
    let (wstop_tx, wstop_rx) = tokio::sync::oneshot::channel::<()>();
    let wmetrics = observer_worker::Metrics::new();
    // Its own pool, opened on its own runtime: a connection's socket is
    // driven by the reactor of the runtime that opened it, and the API's is
    // busy.
    let own_url = url.to_owned();
    let ingest_db = worker_rt
        .spawn(async move { observer_db::Db::connect(&own_url, 8).await })
        .await??;
    let worker = worker_rt.spawn(observer_worker::run_with_metrics(
        wconf,
        ingest_db,
        Arc::clone(&wmetrics),
        async move {
            let _ = wstop_rx.await;
        },
    ));

    let viewer_ids: Vec<i64> = world.viewers.iter().map(|v| *v as i64).collect();
    let guild_ids: Vec<i64> = world.guild_ids.iter().map(|g| *g as i64).collect();
    let want_members = (viewer_ids.len() * guild_ids.len()) as i64;
    let want_channels = world.channels.len() as i64;
    let bench_channels: Vec<i64> = world.channels.iter().map(|c| c.1 as i64).collect();
    let pool = worker_db.pool().clone();
    wait_for(
        "the worker to mirror the world",
        Duration::from_secs(60),
        || {
            let (pool, viewer_ids, bench_channels) = (&pool, &viewer_ids, &bench_channels);
            async move {
                let members: i64 =
                    sqlx::query_scalar("select count(*) from members where user_id = any($1)")
                        .bind(viewer_ids)
                        .fetch_one(pool)
                        .await?;
                let channels: i64 =
                    sqlx::query_scalar("select count(*) from channels where channel_id = any($1)")
                        .bind(bench_channels)
                        .fetch_one(pool)
                        .await?;
                Ok(members >= want_members && channels >= want_channels)
            }
        },
    )
    .await?;

    // Users and one API token per viewer.
    let mut secrets = Vec::with_capacity(world.viewers.len());
    {
        let mut tx = worker_db.auth().await?;
        for (i, v) in viewer_ids.iter().enumerate() {
            observer_db::auth::upsert_user(
                &mut tx,
                &observer_db::auth::NewUser {
                    user_id: *v,
                    username: format!("viewer{i}"),
                    global_name: None,
                    avatar: None,
                },
            )
            .await?;
        }
        tx.commit().await?;
        for v in &viewer_ids {
            let secret = observer_api::tokens::new_secret();
            let mut tx = worker_db.viewer(*v).await?;
            observer_db::viewer::create_api_token(
                &mut tx,
                *v,
                uuid::Uuid::new_v4(),
                "fanout bench",
                &observer_api::tokens::hash_secret(&secret),
            )
            .await?;
            tx.commit().await?;
            secrets.push(secret);
        }
    }

    // Expected visibility through the Rust access rule over the mirrored data.
    let visible: Vec<BTreeSet<i64>> = {
        let mut tx = worker_db.fanout().await?;
        let guilds = observer_db::access_data::load_guilds(&mut tx, &guild_ids).await?;
        let members =
            observer_db::access_data::load_members(&mut tx, &guild_ids, &viewer_ids).await?;
        tx.commit().await?;
        let now = chrono::Utc::now();
        let bench: HashSet<i64> = bench_channels.iter().copied().collect();
        viewer_ids
            .iter()
            .map(|v| {
                guilds
                    .values()
                    .flat_map(|g| {
                        observer_db::access::visible_channels(
                            g,
                            members.get(&(g.guild_id, *v)),
                            now,
                        )
                        .into_iter()
                        .filter(|(_, a)| a.read)
                        .map(|(c, _)| c)
                    })
                    .filter(|c| bench.contains(c))
                    .collect()
            })
            .collect()
    };
    // The construction says the same: public channels plus those of held roles.
    for (i, v) in world.viewers.iter().enumerate() {
        let held = world.held.get(v).cloned().unwrap_or_default();
        let constructed: BTreeSet<i64> = world
            .channel_role
            .iter()
            .filter(|(_, r)| r.is_none_or(|r| held.contains(&r)))
            .map(|(c, _)| *c as i64)
            .collect();
        if constructed != visible[i] {
            bail!("viewer {v}: observer_db::access disagrees with the construction");
        }
    }
    let distinct_sets = world.held.values().collect::<HashSet<_>>().len();
    let avg_visible =
        visible.iter().map(BTreeSet::len).sum::<usize>() as f64 / visible.len() as f64;

    // The API.
    let api_db = observer_db::Db::connect(url, a.api_pool).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let config = observer_api::Config {
        public_url: base.clone(),
        discord_api_base_url: sim.base_url(),
        limits: observer_api::Limits {
            rate_burst: u32::MAX,
            rate_per_sec: 1e9,
            ..Default::default()
        },
        ..Default::default()
    };
    let (astop_tx, astop_rx) = tokio::sync::oneshot::channel::<()>();
    let api = tokio::spawn(observer_api::run(config, api_db, listener, async move {
        let _ = astop_rx.await;
    }));
    let http = reqwest::Client::new();
    wait_for("the API", Duration::from_secs(30), || {
        let (http, base) = (&http, &base);
        async move {
            Ok(http
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()))
        }
    })
    .await?;
    println!(
        "setup: world mirrored, {} tokens, API up in {:.1} s; {} distinct role sets; a viewer sees {:.2} of {} bench channels on average",
        secrets.len(),
        setup.elapsed().as_secs_f64(),
        distinct_sets,
        avg_visible,
        bench_channels.len()
    );

    // The clients, in their own process.
    let exe = std::env::current_exe()?;
    let mut proc = tokio::process::Command::new(exe)
        .arg("--client")
        .arg(a.client_threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the client process")?;
    let stdin = proc.stdin.take().context("client stdin")?;
    let stdout = proc.stdout.take().context("client stdout")?;
    let mut child = Child {
        proc,
        stdin,
        lines: BufReader::new(stdout).lines(),
    };
    let viewers_json: Vec<Value> = viewer_ids
        .iter()
        .zip(&secrets)
        .zip(&visible)
        .map(|((v, s), vis)| {
            json!({"id": v, "token": s, "visible": vis.iter().map(i64::to_string).collect::<Vec<_>>()})
        })
        .collect();
    child
        .send(
            &json!({
                "url": base.replace("http://", "ws://") + "/graphql",
                "parallel": a.connect_parallel,
                "drain_secs": a.drain_secs,
                "viewers": viewers_json,
            })
            .to_string(),
        )
        .await?;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = vm_rss_kib();
    let t = Instant::now();
    child.send("connect").await?;
    child.expect("connected", Duration::from_secs(120)).await?;
    let connect_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = vm_rss_kib();
    let t = Instant::now();
    child.send("subscribe").await?;
    child.expect("subscribed", Duration::from_secs(60)).await?;
    let n = a.viewers as f64;
    wait_for("every subscription to register", Duration::from_secs(60), || {
        let (http, base) = (&http, &base);
        async move {
            Ok(metric(&scrape(http, base).await?, "observer_api_live_subscribers") >= n)
        }
    })
    .await?;
    let subscribe_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss2 = vm_rss_kib();
    println!(
        "connections: {} opened and acked in {:.2} s; subscriptions registered in {:.2} s",
        a.viewers, connect_secs, subscribe_secs
    );
    match (rss0, rss1, rss2) {
        (Some(r0), Some(r1), Some(r2)) => println!(
            "server RSS: {r0} KiB before, {r1} KiB with {} idle connections, {r2} KiB with {} idle subscriptions: \
             {:.1} KiB per idle connection+subscription, {:.1} KiB per subscription alone",
            a.viewers,
            a.viewers,
            (r2 as f64 - r0 as f64) / n,
            (r2 as f64 - r1 as f64) / n
        ),
        _ => println!("server RSS: /proc/self/status unavailable"),
    }

    let m0 = scrape(&http, &base).await?;
    let w0 = parse_metrics(&wmetrics.render());
    let s0 = db_stats(worker_db.pool()).await?;
    let child_pid = child.proc.id().map(|p| p.to_string()).unwrap_or_default();
    let cpu0 = (cpu_secs("self"), cpu_secs(&child_pid));
    let total = (a.rate * a.seconds).round() as usize;
    let first_post = unix_nanos();
    let poster = tokio::task::spawn_blocking({
        let sim = sim.clone();
        let channels = world.channels.clone();
        let rate = a.rate;
        move || {
            let mut per_channel: BTreeMap<u64, u64> = BTreeMap::new();
            let mut failed = 0usize;
            let mut behind = Duration::ZERO;
            let t0 = Instant::now();
            for i in 0..total {
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                let now = Instant::now();
                match due.checked_duration_since(now) {
                    Some(wait) => std::thread::sleep(wait),
                    None => behind = behind.max(now - due),
                }
                let (_, ch, author) = channels[i % channels.len()];
                let content = format!("{CONTENT_PREFIX} {i} {}", unix_nanos());
                match sim.post_message(ch, author, content, PostOptions::default()) {
                    Ok(_) => *per_channel.entry(ch).or_default() += 1,
                    Err(_) => failed += 1,
                }
            }
            (per_channel, failed, t0.elapsed(), behind)
        }
    });
    let (per_channel, failed, post_time, behind) = poster.await?;
    if failed > 0 {
        bail!("{failed} posts failed in the simulator");
    }
    let expected: Vec<u64> = visible
        .iter()
        .map(|vis| {
            vis.iter()
                .map(|c| per_channel.get(&(*c as u64)).copied().unwrap_or(0))
                .sum()
        })
        .collect();
    let expected_total: u64 = expected.iter().sum();
    child.send(&format!("expect {expected_total}")).await?;
    let report = child
        .expect("result", Duration::from_secs(a.drain_secs + 60))
        .await?;
    let report: Value = serde_json::from_str(&report).context("client result")?;
    // The child has exited but is not yet reaped: its counters are still there.
    let cpu1 = (cpu_secs("self"), cpu_secs(&child_pid));
    let m1 = scrape(&http, &base).await?;
    let w1 = parse_metrics(&wmetrics.render());
    let s1 = db_stats(worker_db.pool()).await?;

    let received: Vec<u64> = report["per_viewer"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    let got_total: u64 = received.iter().sum();
    let short: Vec<usize> = (0..expected.len())
        .filter(|i| received.get(*i).copied().unwrap_or(0) != expected[*i])
        .collect();
    let violations = report["violations"].as_u64().unwrap_or(0);
    let last_frame = report["last_frame_unix_nanos"]
        .as_u64()
        .unwrap_or(first_post);
    let span = (last_frame.saturating_sub(first_post)) as f64 / 1e9;
    let msgs = total as f64;
    let d = |name: &str| metric(&m1, name) - metric(&m0, name);

    println!(
        "posted: {total} messages in {:.2} s ({:.0}/s; poster at most {:.1} ms behind schedule)",
        post_time.as_secs_f64(),
        msgs / post_time.as_secs_f64(),
        behind.as_secs_f64() * 1000.0
    );
    println!(
        "delivered: {got_total} of {expected_total} expected frames; {} viewers with a wrong count; {violations} frames from a channel the viewer may not see; errors: {}",
        short.len(),
        report["errors"]
    );
    println!(
        "deliveries/s: {:.0} (frames / (last frame − first dispatch) = {got_total} / {span:.2} s); offered {:.0}/s",
        got_total as f64 / span.max(1e-9),
        expected_total as f64 / post_time.as_secs_f64()
    );
    println!(
        "latency dispatch → frame: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms (n={})",
        report["p50_ms"], report["p90_ms"], report["p99_ms"], report["max_ms"], report["samples"]
    );
    let w = |name: &str| metric(&w1, name) - metric(&w0, name);
    let batches = w("observer_worker_batches_total").max(1.0);
    println!(
        "worker: {:.0} batches, {:.1} ops each, write+commit {:.2} ms, queued → committed {:.2} ms (means)",
        batches,
        w("observer_worker_batch_ops_sum") / batches,
        w("observer_worker_batch_seconds_sum") / batches * 1000.0,
        w("observer_worker_lag_seconds_sum") / w("observer_worker_lag_seconds_count").max(1.0)
            * 1000.0
    );
    let hand_off = d("observer_api_live_fanout_latency_seconds_sum")
        / d("observer_api_live_fanout_latency_seconds_count").max(1.0);
    println!(
        "hub: events {:.0}, deliveries {:.0}, slow consumers dropped {:.0}, mean hand-off (writing tx start → subscriber buffer) {:.2} ms",
        d("observer_api_live_events_total"),
        d("observer_api_live_deliveries_total"),
        d("observer_api_live_slow_consumers_dropped_total"),
        hand_off * 1000.0
    );
    println!(
        "db per message: hub reads {:.3} (of which tick {:.3}), access refreshes {:.0}; whole database (worker+api): {:.3} transactions, {:.3} message_events scans, {:.1} tuples returned, {:.1} fetched",
        d("observer_api_live_db_reads_total") / msgs,
        d("observer_api_live_db_tick_reads_total") / msgs,
        d("observer_api_live_access_refreshes_total"),
        (s1.xacts - s0.xacts) as f64 / msgs,
        (s1.event_scans - s0.event_scans) as f64 / msgs,
        (s1.tup_returned - s0.tup_returned) as f64 / msgs,
        (s1.tup_fetched - s0.tup_fetched) as f64 / msgs,
    );
    if let ((Some(s0), Some(c0)), (Some(s1), Some(c1))) = (cpu0, cpu1) {
        println!(
            "cpu during posting+drain: server process (sim+worker+api) {:.1} s, client process {:.1} s, over {span:.1} s wall",
            s1 - s0,
            c1 - c0
        );
    }
    println!("load average at end: {}", load_average());

    let _ = child.proc.wait().await;
    let _ = astop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), api).await;
    let _ = wstop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), worker).await;
    side.spawn(async move { sim.shutdown().await }).await?;
    side.shutdown_background();
    worker_rt.shutdown_background();
    if violations > 0 {
        bail!("{violations} frames reached a viewer who may not see their channel");
    }
    Ok(())
}

/// The client process: N graphql-transport-ws connections, driven by lines on
/// stdin, answering on stdout.
mod client {
    use super::*;

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    #[derive(serde::Deserialize)]
    struct Config {
        url: String,
        parallel: usize,
        drain_secs: u64,
        viewers: Vec<ViewerConf>,
    }

    #[derive(serde::Deserialize)]
    struct ViewerConf {
        token: String,
        visible: Vec<String>,
    }

    #[derive(Default)]
    struct Tally {
        count: u64,
        violations: u64,
        latencies_us: Vec<u32>,
        errors: Vec<String>,
    }

    fn say(line: &str) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    async fn connect(url: &str, token: &str) -> anyhow::Result<Ws> {
        let mut req = url.into_client_request()?;
        req.headers_mut()
            .insert("sec-websocket-protocol", "graphql-transport-ws".parse()?);
        // A small read buffer (tungstenite zero-fills it before every read)
        // and TCP_NODELAY, so the client measures the server, not itself.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(4096);
        let (mut ws, _) =
            tokio_tungstenite::connect_async_with_config(req, Some(config), true).await?;
        let init = json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}});
        ws.send(WsMessage::Text(init.to_string().into())).await?;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .context("no connection_ack within 30 s")?
                .context("closed before connection_ack")??;
            if let WsMessage::Text(t) = frame {
                let v: Value = serde_json::from_str(&t)?;
                match v["type"].as_str() {
                    Some("connection_ack") => return Ok(ws),
                    Some("ping") => {
                        ws.send(WsMessage::Text(json!({"type": "pong"}).to_string().into()))
                            .await?
                    }
                    _ => bail!("unexpected frame before ack: {v}"),
                }
            }
        }
    }

    #[derive(serde::Deserialize)]
    struct Frame<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(borrow, default)]
        payload: Option<Payload<'a>>,
    }

    #[derive(serde::Deserialize, Default)]
    struct Payload<'a> {
        #[serde(borrow, default)]
        data: Option<Data<'a>>,
        #[serde(default)]
        errors: Option<Vec<Value>>,
    }

    #[derive(serde::Deserialize)]
    struct Data<'a> {
        #[serde(rename = "messageEvents", borrow)]
        message_events: Event<'a>,
    }

    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(borrow)]
        message: Msg<'a>,
    }

    #[derive(serde::Deserialize)]
    struct Msg<'a> {
        #[serde(rename = "channelId", borrow)]
        channel_id: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        content: std::borrow::Cow<'a, str>,
    }

    /// `(channelId, send time)` of a `next` frame carrying one bench
    /// message event and nothing else, found without parsing the whole frame.
    fn scan_next(text: &str) -> Option<(&str, u64)> {
        const HEAD: &str = r#"{"type":"next","id":"1","payload":{"data":{"messageEvents":{"#;
        let rest = text.strip_prefix(HEAD)?;
        // Exactly one object after the head: `{"data":{"messageEvents":{…}}}}`
        // with no `errors` beside `data`.
        let body = rest.strip_suffix("}}}}")?;
        let value = |key: &str| -> Option<&str> {
            let start = body.find(key)? + key.len();
            let len = body[start..].find('"')?;
            let v = &body[start..start + len];
            // An escape would need the full parse.
            (!v.contains('\\')).then_some(v)
        };
        let channel = value(r#""channelId":""#)?;
        let content = value(r#""content":""#)?;
        let sent = content
            .strip_prefix(CONTENT_PREFIX)?
            .rsplit(' ')
            .next()?
            .parse::<u64>()
            .ok()?;
        Some((channel, sent))
    }

    /// What a text frame was.
    enum Seen {
        /// A data frame, checked and counted.
        Data,
        /// Anything else (reported in the tally if unexpected).
        Other,
        /// A protocol ping, to be answered with this text.
        Reply(&'static str),
    }

    /// Checks one text frame: a data frame's channel against what the
    /// viewer may see, its latency from the send time in its content.
    fn on_text(text: &str, now: u64, visible: &HashSet<String>, t: &mut Tally) -> Seen {
        let data = |channel: &str, sent: Option<u64>, t: &mut Tally| {
            if !visible.contains(channel) {
                t.violations += 1;
            }
            if let Some(sent) = sent {
                let us = now.saturating_sub(sent) / 1000;
                t.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
            }
            t.count += 1;
            Seen::Data
        };
        // A data frame of the expected shape is checked by scanning for its
        // two fields; anything else takes the full parse below.
        if let Some((channel, sent)) = scan_next(text) {
            return data(channel, Some(sent), t);
        }
        // Typed and borrowed: the client's parsing must cost far less than
        // the server's work or the bench measures the client.
        let Ok(f) = serde_json::from_str::<Frame<'_>>(text) else {
            t.errors.push("unparsable frame".into());
            return Seen::Other;
        };
        match f.kind.as_ref() {
            "next" => {
                let payload = f.payload.unwrap_or_default();
                if let Some(errors) = payload.errors {
                    // Grouped by code in the report (SLOW_CONSUMER, FORBIDDEN, ...).
                    let code = errors
                        .first()
                        .and_then(|e| e["extensions"]["code"].as_str())
                        .unwrap_or("error without code")
                        .to_owned();
                    t.errors.push(format!("next with error {code}"));
                    return Seen::Other;
                }
                let Some(msg) = payload.data.map(|d| d.message_events.message) else {
                    t.errors.push("next without data".into());
                    return Seen::Other;
                };
                let sent = Some(msg.content.as_ref())
                    .filter(|c| c.starts_with(CONTENT_PREFIX))
                    .and_then(|c| c.rsplit(' ').next())
                    .and_then(|n| n.parse::<u64>().ok());
                data(msg.channel_id.as_ref(), sent, t)
            }
            "ping" => Seen::Reply(r#"{"type":"pong"}"#),
            "pong" | "ka" => Seen::Other,
            other => {
                t.errors.push(format!("{other}: {text}"));
                Seen::Other
            }
        }
    }

    /// One complete server frame at the start of `buf`: its opcode, where
    /// its payload is and its whole length (RFC 6455 §5.2; a server's frames
    /// are unmasked, and ours are never fragmented).
    fn server_frame(buf: &[u8]) -> Option<(u8, std::ops::Range<usize>, usize)> {
        let b1 = *buf.get(1)?;
        let (len, header) = match b1 & 0x7f {
            126 => (
                usize::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
                4,
            ),
            127 => (
                usize::try_from(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)).ok()?,
                10,
            ),
            n => (usize::from(n), 2),
        };
        let header: usize = if b1 & 0x80 != 0 { header + 4 } else { header };
        let end = header.checked_add(len)?;
        (buf.len() >= end).then_some((buf[0] & 0x0f, header..end, end))
    }

    /// A client frame, masked as RFC 6455 requires of clients (payloads
    /// here are a pong or a ping's echo: under 64 KiB).
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        const KEY: [u8; 4] = [0x5a, 0x17, 0xc3, 0x08];
        let mut f = vec![0x80 | opcode];
        match u8::try_from(payload.len()) {
            Ok(n) if n < 126 => f.push(0x80 | n),
            _ => {
                f.push(0x80 | 126);
                let n = u16::try_from(payload.len()).unwrap_or(u16::MAX);
                f.extend_from_slice(&n.to_be_bytes());
            }
        }
        f.extend_from_slice(&KEY);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
        f
    }

    /// Reads one connection's frames until told to stop. The handshake,
    /// `connection_init` and `subscribe` went through tungstenite; from then
    /// on the client mostly reads, and takes frames straight from the
    /// socket's bytes. The client shares the server's two cores, so its own
    /// work per frame is queueing delay for the server it measures. Every
    /// frame is still checked, and anything unexpected is reported.
    async fn read(
        mut sock: tokio::net::TcpStream,
        visible: HashSet<String>,
        mut stop: tokio::sync::watch::Receiver<bool>,
        received: Arc<AtomicU64>,
        last_frame: Arc<AtomicU64>,
    ) -> Tally {
        use tokio::io::AsyncReadExt;
        let mut t = Tally::default();
        let mut buf = vec![0u8; 16 * 1024];
        let mut filled = 0;
        let mut replies: Vec<Vec<u8>> = Vec::new();
        'read: loop {
            if filled == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            let n = tokio::select! {
                r = sock.read(&mut buf[filled..]) => r,
                _ = stop.changed() => break,
            };
            match n {
                Ok(0) => {
                    t.errors.push("socket closed".into());
                    break;
                }
                Ok(n) => filled += n,
                Err(e) => {
                    t.errors.push(format!("socket: {e}"));
                    break;
                }
            }
            let now = unix_nanos();
            let mut at = 0;
            let mut data = 0;
            while let Some((opcode, payload, len)) = server_frame(&buf[at..filled]) {
                let p = &buf[at + payload.start..at + payload.end];
                match opcode {
                    1 => match std::str::from_utf8(p) {
                        Ok(text) => match on_text(text, now, &visible, &mut t) {
                            Seen::Data => data += 1,
                            Seen::Other => {}
                            Seen::Reply(r) => replies.push(client_frame(1, r.as_bytes())),
                        },
                        Err(_) => t.errors.push("text frame is not UTF-8".into()),
                    },
                    // A WebSocket ping, answered with its payload.
                    9 => replies.push(client_frame(0xa, p)),
                    0xa => {}
                    8 => {
                        t.errors.push("socket closed".into());
                        break 'read;
                    }
                    other => t.errors.push(format!("unexpected opcode {other}")),
                }
                at += len;
            }
            buf.copy_within(at..filled, 0);
            filled -= at;
            if data > 0 {
                received.fetch_add(data, Ordering::Relaxed);
                last_frame.fetch_max(now, Ordering::Relaxed);
            }
            for r in replies.drain(..) {
                if sock.write_all(&r).await.is_err() {
                    t.errors.push("reply failed".into());
                    break 'read;
                }
            }
        }
        t
    }

    async fn next_line(
        lines: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>,
    ) -> anyhow::Result<String> {
        lines.next_line().await?.context("server process went away")
    }

    pub async fn run() -> anyhow::Result<()> {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        let conf: Config = serde_json::from_str(&next_line(&mut lines).await?)?;
        let cmd = next_line(&mut lines).await?;
        if cmd != "connect" {
            bail!("expected connect, got {cmd:?}");
        }
        let url = conf.url.clone();
        let conns: Vec<anyhow::Result<Ws>> = futures::stream::iter(conf.viewers.iter())
            .map(|v| connect(&url, &v.token))
            .buffered(conf.parallel.max(1))
            .collect()
            .await;
        let mut sockets = Vec::with_capacity(conns.len());
        for c in conns {
            sockets.push(c?);
        }
        say("connected");

        let cmd = next_line(&mut lines).await?;
        if cmd != "subscribe" {
            bail!("expected subscribe, got {cmd:?}");
        }
        let sub = json!({"id": "1", "type": "subscribe", "payload": {"query": SUB}}).to_string();
        // Subscribed, the connections go raw (see `read`): nothing has
        // arrived since each one's `connection_ack`, as no message is posted
        // before the server hears "subscribed", so tungstenite holds no
        // unread bytes.
        let mut raw = Vec::with_capacity(sockets.len());
        for mut ws in sockets {
            ws.send(WsMessage::Text(sub.clone().into())).await?;
            match ws.into_inner() {
                tokio_tungstenite::MaybeTlsStream::Plain(sock) => raw.push(sock),
                _ => bail!("the bench speaks plain ws:// only"),
            }
        }
        let sockets = raw;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let received = Arc::new(AtomicU64::new(0));
        let last_frame = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = sockets
            .into_iter()
            .zip(&conf.viewers)
            .map(|(sock, v)| {
                tokio::spawn(read(
                    sock,
                    v.visible.iter().cloned().collect(),
                    stop_rx.clone(),
                    received.clone(),
                    last_frame.clone(),
                ))
            })
            .collect();
        say("subscribed");

        let cmd = next_line(&mut lines).await?;
        let expected: u64 = cmd
            .strip_prefix("expect ")
            .context("expected `expect <n>`")?
            .parse()?;
        let deadline = Instant::now() + Duration::from_secs(conf.drain_secs);
        while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Late extras (more than expected) would show as wrong counts.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = stop_tx.send(true);
        let mut per_viewer = Vec::with_capacity(tasks.len());
        let mut violations = 0;
        let mut lat: Vec<u32> = Vec::new();
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        for t in tasks {
            let t = t.await?;
            per_viewer.push(t.count);
            violations += t.violations;
            lat.extend(t.latencies_us);
            for e in t.errors {
                *errors.entry(e.chars().take(200).collect()).or_default() += 1;
            }
        }
        lat.sort_unstable();
        let pct = |q: f64| -> f64 {
            if lat.is_empty() {
                return f64::NAN;
            }
            let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
            (f64::from(lat[i]) / 1000.0 * 100.0).round() / 100.0
        };
        let result = json!({
            "per_viewer": per_viewer,
            "violations": violations,
            "samples": lat.len(),
            "p50_ms": pct(0.5),
            "p90_ms": pct(0.9),
            "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
            "last_frame_unix_nanos": last_frame.load(Ordering::Relaxed),
            "errors": errors,
        });
        say(&format!("result {result}"));
        Ok(())
    }
}
