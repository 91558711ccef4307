//! The single writer: takes whatever is queued (up to a cap) and writes it
//! atomically, on a database session of its own (`Db::worker_conn`, reopened
//! after any failure), where a batch of new messages is one round trip. No
//! timer: when idle, one op is written as soon as it arrives; under load, ops
//! pile up while a batch commits and the next batch is large — latency and
//! throughput both adapt without tuning.

use std::sync::Arc;
use std::time::{Duration, Instant};

use observer_db::ingest::{self, IngestOp};
use observer_db::{Db, WorkerConn};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// An op with the moment it was queued (for the lag metric).
#[derive(Debug)]
pub struct Queued {
    pub op: IngestOp,
    pub at: Instant,
}

impl Queued {
    pub fn new(op: IngestOp) -> Self {
        Self {
            op,
            at: Instant::now(),
        }
    }
}

pub async fn run(
    db: Db,
    mut rx: mpsc::Receiver<Queued>,
    max_batch: usize,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let max_batch = max_batch.max(1);
    let mut batch: Vec<Queued> = Vec::with_capacity(max_batch);
    let mut session = Session::new(db);
    loop {
        let first = tokio::select! {
            biased;
            q = rx.recv() => q,
            () = stop.cancelled() => None,
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        metrics.queue_depth.set(rx.len() as i64);
        write(&mut session, &mut batch, &metrics, &stop).await;
    }
    // Flush whatever was queued before the stop.
    rx.close();
    loop {
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        write(&mut session, &mut batch, &metrics, &stop).await;
    }
    metrics.queue_depth.set(0);
    tracing::info!("batcher flushed and stopped");
}

/// Writes `batch` (and empties it). Connection trouble is retried until it
/// works (nothing is dropped while PostgreSQL restarts); a batch the database
/// *refuses* is split in halves to isolate the offending op, which is then
/// logged and dropped so one bad event cannot stall ingestion.
async fn write(
    session: &mut Session,
    batch: &mut Vec<Queued>,
    metrics: &Metrics,
    stop: &CancellationToken,
) {
    let (ops, ats): (Vec<IngestOp>, Vec<Instant>) = std::mem::take(batch)
        .into_iter()
        .map(|q| (q.op, q.at))
        .unzip();
    let mut work: Vec<(Vec<IngestOp>, Vec<Instant>)> = vec![(ops, ats)];
    while let Some((ops, ats)) = work.pop() {
        let mut backoff = Duration::from_millis(50);
        let mut refused = 0u32;
        loop {
            let started = Instant::now();
            match session.attempt(&ops).await {
                Ok(stats) => {
                    let now = Instant::now();
                    metrics.batches.inc();
                    metrics.batch_ops.observe(ops.len() as f64);
                    metrics
                        .batch_seconds
                        .observe(now.duration_since(started).as_secs_f64());
                    let mut oldest = Duration::ZERO;
                    for at in &ats {
                        let lag = now.duration_since(*at);
                        oldest = oldest.max(lag);
                        metrics.lag_seconds.observe(lag.as_secs_f64());
                    }
                    metrics.last_lag_ms.set(oldest.as_secs_f64() * 1000.0);
                    metrics
                        .messages_changed
                        .inc_by(stats.messages_changed as u64);
                    metrics.message_events.inc_by(
                        (stats.events_created + stats.events_updated + stats.events_deleted) as u64,
                    );
                    tracing::trace!(ops = ops.len(), ?stats, "batch committed");
                    break;
                }
                Err(err) => {
                    metrics.db_errors.inc();
                    if !ingest::is_transient(&err) {
                        refused += 1;
                        if refused >= 3 {
                            if ops.len() == 1 {
                                tracing::error!(error = %err, op = ?ops[0], "database refused an op; dropped");
                                break;
                            }
                            let (mut ops, mut ats) = (ops, ats);
                            let half = ops.len() / 2;
                            let (ops2, ats2) = (ops.split_off(half), ats.split_off(half));
                            work.push((ops2, ats2));
                            work.push((ops, ats));
                            break;
                        }
                    }
                    tracing::warn!(error = %err, ops = ops.len(), "batch failed; retrying");
                    // Keep retrying through a database restart, but do not spin
                    // forever once asked to stop.
                    if stop.is_cancelled() && backoff >= Duration::from_secs(5) {
                        tracing::error!(ops = ops.len(), "giving up on a batch during shutdown");
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// The writer's database session, opened when first needed.
struct Session {
    db: Db,
    conn: Option<WorkerConn>,
}

impl Session {
    fn new(db: Db) -> Self {
        Self { db, conn: None }
    }

    async fn attempt(&mut self, ops: &[IngestOp]) -> observer_db::Result<ingest::BatchStats> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => self.db.worker_conn().await?,
        };
        // Kept only after a good write: after a failure the connection may
        // be broken (or mid-transaction), so the retry opens a fresh one.
        let stats = ingest::write_batch_on(&mut conn, ops).await?;
        self.conn = Some(conn);
        Ok(stats)
    }
}
