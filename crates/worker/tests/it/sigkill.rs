//! A real worker *process* killed with SIGKILL at random points while the
//! simulator keeps posting; each restart must backfill the gap, with nothing
//! lost and nothing duplicated.
//!
//! The child process is this test binary re-executed with `OBSERVER_CHILD_*`
//! variables set, running [`child_worker_entry`] — no extra binary needed.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use observer_sim::{GenOptions, PostOptions, Scenario, SimConfig};
use rand::{Rng, SeedableRng};
use sqlx::PgPool;

/// Runs the worker when started as a child by `killed_process_loses_nothing`;
/// a no-op in a normal test run.
#[test]
fn child_worker_entry() -> anyhow::Result<()> {
    let (Ok(db_url), Ok(base), Ok(token)) = (
        std::env::var("OBSERVER_CHILD_DATABASE_URL"),
        std::env::var("OBSERVER_CHILD_API_BASE_URL"),
        std::env::var("OBSERVER_CHILD_TOKEN"),
    ) else {
        return Ok(());
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let db = observer_db::Db::connect(&db_url, 4).await?;
        let mut config = observer_worker::Config::new(token);
        config.api_base_url = base;
        config.log_interval = Duration::from_secs(5);
        observer_worker::run(config, db, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}

/// Kills the child if the test fails half-way, so no worker outlives it.
struct Child(std::process::Child);

impl Child {
    fn kill(&mut self) -> anyhow::Result<()> {
        self.0.kill()?; // SIGKILL on Unix
        self.0.wait()?;
        Ok(())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(db_url: &str, base: &str, token: &str) -> anyhow::Result<Child> {
    let test = observer_testkit::child::test_name(module_path!(), "child_worker_entry");
    Ok(Child(
        observer_testkit::child::command(&test)?
            .env("OBSERVER_CHILD_DATABASE_URL", db_url)
            .env("OBSERVER_CHILD_API_BASE_URL", base)
            .env("OBSERVER_CHILD_TOKEN", token)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn killed_process_loses_nothing(pool: PgPool) -> anyhow::Result<()> {
    let _db = db(&pool).await?;
    let base_url = std::env::var("DATABASE_URL")?;
    let db_name = pool
        .connect_options()
        .get_database()
        .map(str::to_owned)
        .unwrap_or_default();
    let db_url = match base_url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{db_name}"),
        None => anyhow::bail!("DATABASE_URL without a database path"),
    };

    let sim = Arc::new(sim(SimConfig::default()).await?);
    let sc = Scenario::generate(21, GenOptions::default());
    let guilds = sc.guilds.len() as i64;
    let targets: Vec<(u64, u64)> = sc
        .guilds
        .iter()
        .flat_map(|g| {
            let author = g.members.first().map(|m| m.user_id).unwrap_or_default();
            g.channels
                .iter()
                .filter(|c| c.kind == observer_sim::ChannelKind::Text)
                .map(move |c| (c.id, author))
        })
        .collect();
    sim.load(sc);
    let token = sim.config().bot_token.clone();
    let base = sim.base_url();

    // Posts continuously (every ~2 ms, across channels) until told to stop.
    let posting = Arc::new(AtomicBool::new(true));
    let poster = {
        let sim = Arc::clone(&sim);
        let posting = Arc::clone(&posting);
        tokio::spawn(async move {
            let mut i = 0u64;
            while posting.load(Ordering::Relaxed) {
                let (ch, author) = targets[(i as usize) % targets.len()];
                let _ = sim.post_message(ch, author, format!("msg {i}"), PostOptions::default());
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            i
        })
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut child = spawn_child(&db_url, &base, &token)?;
    wait_guilds(&pool, guilds).await?;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1200))).await;
        child.kill()?;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..600))).await;
        child = spawn_child(&db_url, &base, &token)?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    posting.store(false, Ordering::Relaxed);
    let posted = poster.await?;
    assert!(posted > 100, "only {posted} posts");
    let result = wait_truth(&pool, &sim, Duration::from_secs(60)).await;
    child.kill()?;
    result?;
    one_create_event_each(&pool).await?;
    sim.shutdown().await;
    Ok(())
}
