//! The support queue's background work (crates/db/src/support): at start,
//! the sweep that catches conversations up with messages a crash left
//! unfolded; then, every tick, the recomputations settings changes queued
//! and the telemetry rollups of the days writes touched.
//! Ingest batches derive conversations themselves; this is only the rest.

use std::time::Duration;

use observer_db::{support, Db};

/// Conversations per sweep transaction.
const SWEEP_CHUNK: i64 = 500;
/// Rollup days rebuilt per transaction.
const ROLLUP_CHUNK: i64 = 50;

pub(crate) async fn run(db: Db, every: Duration) {
    loop {
        match sweep_once(&db).await {
            Ok(0) => break,
            Ok(n) => tracing::info!(conversations = n, "support sweep caught up conversations"),
            Err(err) => {
                tracing::warn!(error = %err, "support sweep failed; retrying");
                tokio::time::sleep(every).await;
            }
        }
    }
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        loop {
            match recompute_once(&db).await {
                Ok(None) => break,
                Ok(Some((guild_id, finished))) => {
                    if finished {
                        tracing::info!(guild_id, "support settings applied to every conversation");
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "support recomputation failed; retrying at the next tick");
                    break;
                }
            }
        }
        loop {
            match rollups_once(&db).await {
                Ok(0) => break,
                Ok(n) => tracing::debug!(days = n, "support rollups rebuilt"),
                Err(err) => {
                    tracing::warn!(error = %err, "support rollup rebuild failed; retrying at the next tick");
                    break;
                }
            }
        }
    }
}

async fn rollups_once(db: &Db) -> Result<usize, observer_db::Error> {
    let mut tx = db.worker().await?;
    let n = support::rollup::rebuild_dirty(&mut tx, ROLLUP_CHUNK).await?;
    tx.commit().await?;
    Ok(n)
}

async fn sweep_once(db: &Db) -> Result<usize, observer_db::Error> {
    let mut tx = db.worker().await?;
    let n = support::sweep_stale(&mut tx, SWEEP_CHUNK).await?;
    tx.commit().await?;
    Ok(n)
}

async fn recompute_once(db: &Db) -> Result<Option<(i64, bool)>, observer_db::Error> {
    let mut tx = db.worker().await?;
    let r = support::recompute_next_guild(&mut tx).await?;
    tx.commit().await?;
    Ok(r)
}
