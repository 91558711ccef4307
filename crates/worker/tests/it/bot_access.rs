//! The bot's own permissions: a channel Discord refuses the bot
//! is mirrored and marked, never retried in a loop, and backfilled once access
//! is granted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use observer_sim::{perms, GenOptions, Overwrite, OverwriteKind, PostOptions, Scenario, SimConfig};
use sqlx::PgPool;

/// Counts error-level events of our own crates (serenity's are its business),
/// and all of our events (to know the counter is really installed).
struct CountErrors(Arc<AtomicUsize>, Arc<AtomicUsize>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountErrors {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if meta.target().starts_with("observer") {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
        if *meta.level() == tracing::Level::ERROR && meta.target().starts_with("observer") {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Installs the global subscriber: every thread's logs are counted. Only in a
/// process of the test's own (the other tests of this binary log errors on
/// purpose, and one may have installed its subscriber first).
fn count_errors() -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let (errors, all) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let fmt = tracing_subscriber::fmt::layer()
        .with_test_writer()
        .with_filter(tracing_subscriber::EnvFilter::from_default_env());
    let _ = tracing_subscriber::registry()
        .with(CountErrors(Arc::clone(&errors), Arc::clone(&all)))
        .with(fmt)
        .try_init();
    (errors, all)
}

async fn bot_can_read(pool: &PgPool, channel: u64) -> anyhow::Result<Option<Option<bool>>> {
    Ok(
        sqlx::query_scalar("select bot_can_read from channels where channel_id = $1")
            .bind(channel as i64)
            .fetch_optional(pool)
            .await?,
    )
}

async fn stored_in(pool: &PgPool, channel: u64) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("select count(*) from messages where channel_id = $1")
            .bind(channel as i64)
            .fetch_one(pool)
            .await?,
    )
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn unreadable_channels_are_marked_not_retried_and_backfilled_once_granted(
    pool: PgPool,
) -> anyhow::Result<()> {
    let Some(pool) = observer_testkit::child::alone(
        module_path!(),
        "unreadable_channels_are_marked_not_retried_and_backfilled_once_granted",
        pool,
    )
    .await?
    else {
        return Ok(());
    };
    let (errors, all) = count_errors();
    let db = db(&pool).await?;
    let sim = sim(SimConfig::default()).await?;
    let sc = Scenario::generate(21, GenOptions::default());
    let guilds = sc.guilds.len() as i64;
    let g = &sc.guilds[0];
    let find = |n: &str| g.channels.iter().find(|c| c.name == n).map(|c| c.id);
    let hidden = find("leadership").ok_or_else(|| anyhow::anyhow!("no leadership"))?;
    let voice = find("Support call").ok_or_else(|| anyhow::anyhow!("no voice"))?;
    let observer = g
        .roles
        .iter()
        .find(|r| r.name == "Observer")
        .map(|r| r.id)
        .ok_or_else(|| anyhow::anyhow!("no Observer role"))?;
    let staff_role = g.roles.iter().find(|r| r.name == "Staff").map(|r| r.id);
    let staff = g
        .members
        .iter()
        .find(|m| staff_role.is_some_and(|r| m.roles.contains(&r)))
        .map(|m| m.user_id)
        .ok_or_else(|| anyhow::anyhow!("no staff"))?;
    sim.load(sc.clone());
    for i in 0..5 {
        sim.post_message(hidden, staff, format!("plan {i}"), PostOptions::default())?;
        // Text chat in a voice channel is backfilled like any other.
        sim.post_message(
            voice,
            staff,
            format!("call note {i}"),
            PostOptions::default(),
        )?;
    }
    assert!(!sim.bot_readable_channels().contains(&hidden));
    assert!(sim.bot_readable_channels().contains(&voice));

    let worker = start(config(&sim), db.clone());
    wait_guilds(&pool, guilds).await?;
    sim.run_traffic_steps(3, 200);
    wait_truth(&pool, &sim, Duration::from_secs(60)).await?;
    wait_access(&pool, &sim, Duration::from_secs(20)).await?;
    eventually(Duration::from_secs(20), "hidden channel marked", || async {
        Ok(match bot_can_read(&pool, hidden).await? {
            Some(Some(false)) => Ok(()),
            other => Err(format!("bot_can_read {other:?}")),
        })
    })
    .await?;
    assert_eq!(stored_in(&pool, hidden).await?, 0, "nothing invented");
    assert!(stored_in(&pool, voice).await? >= 5, "voice chat backfilled");
    assert_eq!(bot_can_read(&pool, voice).await?, Some(Some(true)));

    // Per unreadable channel and snapshot, each of its routes is refused once
    // (history, and the guild snapshot's archived public and private thread
    // listings; each generated guild has one such channel), plus at most one
    // channel re-read per CHANNEL_UPDATE (none happened): not a retry loop.
    const ROUTES: u64 = 3;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused = worker.metrics.rest_forbidden.get();
    assert!(
        (1..=ROUTES * guilds as u64).contains(&refused),
        "{refused} refusals for {guilds} unreadable channels"
    );
    assert_eq!(worker.metrics.backfill_errors.get(), 0, "a 403 is no error");
    assert_eq!(worker.metrics.db_errors.get(), 0);

    // A restart without resume snapshots again: one more request each, and
    // the marks survive it.
    worker.stop().await?;
    sim.invalidate_sessions(false);
    let worker = start(config(&sim), db.clone());
    wait_guilds(&pool, guilds).await?;
    eventually(
        Duration::from_secs(30),
        "second snapshot refused",
        || async {
            let n = worker.metrics.rest_forbidden.get();
            Ok(if n >= 1 {
                Ok(())
            } else {
                Err(format!("{n} refusals"))
            })
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused = worker.metrics.rest_forbidden.get();
    assert!(
        refused <= ROUTES * guilds as u64,
        "{refused} refusals after restart"
    );
    assert_eq!(bot_can_read(&pool, hidden).await?, Some(Some(false)));

    // The guild lets the bot's role in: Discord sends CHANNEL_UPDATE and
    // THREAD_LIST_SYNC; the history is fetched and the mark clears.
    sim.set_overwrite(
        hidden,
        Overwrite {
            id: observer,
            kind: OverwriteKind::Role,
            allow: perms::VIEW_CHANNEL,
            deny: 0,
        },
    )?;
    assert!(sim.bot_readable_channels().contains(&hidden));
    wait_truth(&pool, &sim, Duration::from_secs(30)).await?;
    assert!(stored_in(&pool, hidden).await? >= 5);
    eventually(Duration::from_secs(20), "mark cleared", || async {
        Ok(match bot_can_read(&pool, hidden).await? {
            Some(Some(true)) => Ok(()),
            other => Err(format!("bot_can_read {other:?}")),
        })
    })
    .await?;
    assert_eq!(worker.metrics.backfill_errors.get(), 0);
    worker.stop().await?;
    assert!(
        all.load(Ordering::SeqCst) > 0,
        "the log counter saw nothing"
    );
    assert_eq!(errors.load(Ordering::SeqCst), 0, "error-level logs");
    sim.shutdown().await;
    Ok(())
}
