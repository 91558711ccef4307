//! Ingest benchmark: simulator → serenity worker → PostgreSQL.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo run --release -p observer-worker --example ingest_bench -- 100000 [RATE]
//! ```
//!
//! Without RATE messages are offered as fast as the simulator takes them
//! (throughput); with RATE (messages/s) they are paced (latency at that rate).
//!
//! `BENCH_SUPPORT_SHARE` (default 0.5) is the share of messages that go to
//! support conversations: forum posts opened by a customer, answered in turn
//! by staff, a new post every `POST_LEN` messages, so conversation tracking
//! (recomputed in every batch that touches a post) is on the measured path.
//!
//! Creates a scratch database `observer_bench_<pid>` next to DATABASE_URL's,
//! posts N messages into the simulator as fast as it accepts them (spread over
//! every text channel), and reports sustained messages/s (first post → last
//! row committed) and p50/p99 of dispatch → row written (message_events.at,
//! the writing transaction's start, minus the message's creation time).

use std::time::{Duration, Instant};

use anyhow::Context;
use observer_sim::{ChannelKind, GenOptions, PostOptions, Scenario, SimConfig, Simulator};
use sqlx::Connection;

/// Messages per support conversation (the opening included).
const POST_LEN: usize = 8;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(50_000);
    let rate: Option<f64> = std::env::args().nth(2).map(|s| s.parse()).transpose()?;
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL")?;
    let name = format!("observer_bench_{}", std::process::id());
    let mut admin = sqlx::PgConnection::connect(&url).await?;
    sqlx::query(&format!("create database {name}"))
        .execute(&mut admin)
        .await?;
    let bench_url = match url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => anyhow::bail!("DATABASE_URL needs a database path"),
    };
    let result = bench(&bench_url, n, rate).await;
    sqlx::query(&format!("drop database if exists {name} with (force)"))
        .execute(&mut admin)
        .await?;
    result
}

async fn bench(url: &str, n: usize, rate: Option<f64>) -> anyhow::Result<()> {
    let db = observer_db::Db::connect(url, 8).await?;
    observer_db::migrate::run(db.pool()).await?;

    let sim = Simulator::start(SimConfig {
        rate_limit_per_route: 0,
        ..SimConfig::default()
    })
    .await?;
    let sc = Scenario::generate(1, GenOptions::default());
    let guild_ids: Vec<u64> = sc.guilds.iter().map(|g| g.id).collect();
    let authors: Vec<u64> = sc
        .guilds
        .iter()
        .map(|g| g.members.first().map(|m| m.user_id).unwrap_or_default())
        .collect();
    let text: std::collections::HashSet<u64> = sc
        .guilds
        .iter()
        .flat_map(|g| g.channels.iter())
        .filter(|c| c.kind == ChannelKind::Text)
        .map(|c| c.id)
        .collect();
    // Per guild: its forum, a customer and a staff member.
    let support: Vec<(u64, u64, u64)> = sc
        .guilds
        .iter()
        .filter_map(|g| {
            let role = |name: &str| g.roles.iter().find(|r| r.name == name).map(|r| r.id);
            let (staff_role, customer_role) = (role("Staff")?, role("Customer")?);
            let with = |r: u64| g.members.iter().find(|m| m.roles == [r]).map(|m| m.user_id);
            let forum = g.channels.iter().find(|c| c.kind == ChannelKind::Forum)?;
            Some((forum.id, with(customer_role)?, with(staff_role)?))
        })
        .collect();
    let share: f64 = std::env::var("BENCH_SUPPORT_SHARE")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(0.5);
    let guilds = sc.guilds.len() as i64;
    sim.load(sc);
    // Only channels the bot may read: Discord sends nothing from the others
    // (the scenario has one), so messages posted there would never arrive.
    let bot = sim.config().bot_user_id;
    let targets: Vec<(u64, u64)> = guild_ids
        .iter()
        .zip(&authors)
        .flat_map(|(g, author)| {
            sim.user_channel_access(*g, bot)
                .into_iter()
                .filter(|(id, v)| v.read && text.contains(id))
                .map(|(id, _)| (id, *author))
                .collect::<Vec<_>>()
        })
        .collect();

    let mut config = observer_worker::Config::new(sim.config().bot_token.clone());
    config.api_base_url = sim.base_url();
    config.log_interval = Duration::from_secs(5);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics = observer_worker::metrics::Metrics::new();
    let worker = tokio::spawn(observer_worker::run_with_metrics(
        config,
        db.clone(),
        std::sync::Arc::clone(&metrics),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let startup = Instant::now();

    loop {
        let got: i64 = sqlx::query_scalar("select count(*) from guilds")
            .fetch_one(db.pool())
            .await?;
        if got >= guilds {
            break;
        }
        if worker.is_finished() {
            // A worker that failed to start must end the benchmark, not hang it.
            return match worker.await {
                Ok(Ok(())) => Err(anyhow::anyhow!(
                    "the worker stopped before mirroring the guilds"
                )),
                Ok(Err(e)) => Err(e.context("the worker failed")),
                Err(e) => Err(anyhow::anyhow!("the worker panicked: {e}")),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Steady-state ingest: the startup backfill and guild snapshots read
    // history over REST and write it through the same batcher, so posting
    // while they run measures both at once (and, since the worker paces its
    // REST calls, a different mix from run to run).
    while metrics.backfill_channels_pending.get() > 0
        || metrics.backfill_channels_done.get() == 0
        || metrics.snapshot_pending.get() > 0
    {
        if worker.is_finished() {
            anyhow::bail!("the worker stopped during its startup backfill");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "startup (guilds, backfill, snapshots): {:.2}s",
        startup.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let poster = tokio::task::spawn_blocking({
        let sim = sim.clone();
        move || {
            let t0 = Instant::now();
            let mut support_sent = 0usize;
            let mut posts: Vec<Option<(u64, usize)>> = vec![None; support.len()];
            for i in 0..n {
                if let Some(r) = rate {
                    let due = t0 + Duration::from_secs_f64(i as f64 / r);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                // Bresenham: exactly `share` of the messages, evenly spread.
                let to_support = !support.is_empty()
                    && ((i + 1) as f64 * share).floor() > (i as f64 * share).floor();
                if to_support {
                    let k = support_sent;
                    support_sent += 1;
                    let (forum, customer, staff) = support[k % support.len()];
                    let slot = k / support.len();
                    let post = &mut posts[k % support.len()];
                    match post {
                        Some((thread, len)) if *len < POST_LEN => {
                            let author = if *len % 2 == 1 { staff } else { customer };
                            *len += 1;
                            let _ = sim.post_message(
                                *thread,
                                author,
                                format!("support message {i}"),
                                PostOptions::default(),
                            );
                        }
                        _ => {
                            if let Ok((t, _)) = sim.create_forum_post(
                                forum,
                                customer,
                                format!("question {slot}"),
                                format!("my order {i} has not arrived yet"),
                                vec![],
                            ) {
                                *post = Some((t.id, 1));
                            }
                        }
                    }
                    continue;
                }
                let (ch, author) = targets[i % targets.len()];
                let _ = sim.post_message(
                    ch,
                    author,
                    format!("benchmark message {i}: my order has not arrived yet"),
                    PostOptions::default(),
                );
            }
        }
    });
    poster.await?;
    let posted_in = started.elapsed();
    loop {
        let got: i64 = sqlx::query_scalar("select count(*) from messages")
            .fetch_one(db.pool())
            .await?;
        if got as usize >= n {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            anyhow::bail!("only {got} of {n} messages after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = started.elapsed();
    let (p50, p99): (f64, f64) = sqlx::query_as(
        "select percentile_cont(0.5) within group (order by ms), percentile_cont(0.99) within group (order by ms)
         from (select extract(epoch from (e.at - m.created_at)) * 1000 as ms
               from message_events e join messages m using (guild_id, message_id)
               where e.kind = 1) x",
    )
    .fetch_one(db.pool())
    .await?;
    let conversations: i64 = sqlx::query_scalar("select count(*) from conversations")
        .fetch_one(db.pool())
        .await?;
    println!("conversations tracked: {conversations} (support share {share})");
    println!(
        "messages: {n}\nposted in: {:.2}s ({:.0}/s offered)\nall committed after: {:.2}s\nsustained: {:.0} messages/s\ndispatch->row p50: {p50:.1} ms, p99: {p99:.1} ms",
        posted_in.as_secs_f64(),
        n as f64 / posted_in.as_secs_f64(),
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
    );
    let _ = stop_tx.send(());
    worker.await??;
    sim.shutdown().await;
    Ok(())
}
