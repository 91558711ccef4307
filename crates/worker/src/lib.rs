//! observer-worker: the ingestion worker (docs/ingestion.md). Discord Gateway
//! (serenity) and REST backfill into PostgreSQL through observer-db.
//!
//! Layout:
//! - [`config`]: [`Config`] and [`ShardRange`], plain data the CLI fills in.
//! - `map`: serenity events and messages → plain `observer_db::ingest::IngestOp`s.
//! - `batcher`: the single writer on its own database session; greedy batches,
//!   each written atomically.
//! - [`backfill`]: history after the newest stored message, per channel.
//! - `botaccess`: channels Discord refuses the bot (403): marked, not retried.
//! - [`reconcile`]: after a gap, each channel's recent window read again;
//!   edits become revisions, vanished messages tombstones marked as detected.
//! - `rest`: the `observer_discord` client wired to the worker's metrics
//!   (every REST call: discovery, backfill, snapshots, re-reads), the history
//!   page size and the error of a history pass.
//! - `requests`: work one task asks of another (backfills, guild snapshots),
//!   below all of them so no task imports another's module.
//! - `reread`: debounced REST re-reads of access entities touched by events,
//!   so out-of-order handling converges to Discord's current state.
//! - `snapshot`: on every guild snapshot (GUILD_CREATE, THREAD_LIST_SYNC),
//!   REST listings of what the gateway never sends: guild members, archived
//!   private threads and private threads' members.
//! - `support`: the support queue's background work: the startup sweep and
//!   the recomputations settings changes queue (batches derive the rest).
//! - [`metrics`]: Prometheus registry, `/metrics` endpoint, health log line.
//! - this file: the raw event handler, client setup, [`run`] and shutdown.
//!
//! Correctness never depends on event order: serenity handles every event in
//! its own task, so ops reach the batcher in any order, and observer-db's
//! ingest merges them order-independently.

pub mod backfill;
mod batcher;
mod botaccess;
pub mod config;
mod map;
pub mod metrics;
pub mod reconcile;
mod requests;
mod reread;
mod rest;
mod snapshot;
mod support;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use observer_db::ingest::IngestOp;
use observer_db::Db;
use secrecy::ExposeSecret as _;
use serenity::all::{
    ClientBuilder, ConnectionStage, Context, Event, GatewayError, GatewayIntents, HttpBuilder,
    RawEventHandler,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use config::{Config, ShardRange, DISCORD_BASE_URL};
pub use metrics::Metrics;

use batcher::Queued;

/// The intents the worker needs. GUILD_MEMBERS and MESSAGE_CONTENT are privileged.
pub fn intents() -> GatewayIntents {
    GatewayIntents::GUILDS
        | GatewayIntents::GUILD_MEMBERS
        | GatewayIntents::GUILD_MESSAGES
        | GatewayIntents::MESSAGE_CONTENT
}

struct Handler {
    ops: mpsc::Sender<Queued>,
    backfill: Option<mpsc::UnboundedSender<requests::BackfillRequest>>,
    reread: Option<mpsc::UnboundedSender<reread::Key>>,
    snapshot: mpsc::UnboundedSender<requests::SnapshotRequest>,
    access: Arc<botaccess::BotAccess>,
    metrics: Arc<Metrics>,
    stopping: Arc<AtomicBool>,
}

#[serenity::async_trait]
impl RawEventHandler for Handler {
    async fn raw_event(&self, _ctx: Context, ev: Event) {
        // As early as possible: member writes are ordered by this time.
        let received = Utc::now();
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        match &ev {
            Event::Unknown(u) => {
                // serenity turns known events it cannot parse into Unknown: never
                // silently drop them.
                self.metrics.unknown(&u.kind);
                let payload = u.value.to_string();
                let cut = payload
                    .char_indices()
                    .nth(512)
                    .map_or(payload.len(), |(i, _)| i);
                tracing::warn!(event = %u.kind, payload = &payload[..cut], "unparseable or unknown gateway event");
                return;
            }
            Event::Ready(r) => {
                self.metrics.ready_total.inc();
                tracing::info!(
                    guilds = r.ready.guilds.len(),
                    shard = ?r.ready.shard,
                    "gateway READY (identified); guilds will be backfilled as they arrive"
                );
            }
            Event::Resumed(_) => tracing::info!("gateway session resumed"),
            _ => {}
        }
        if let Some(name) = ev.name() {
            self.metrics.event(&name);
        }
        let mapped = map::event(&ev, received);
        let mut ops = mapped.ops;
        if let Some(IngestOp::MessageCreate(m)) = ops.first() {
            // Discord only sends messages the bot can see.
            if let Some(op) = self.access.message_seen(m.guild_id, m.channel_id) {
                ops.push(op);
            }
        }
        for op in ops {
            if let (Some(tx), Some(key)) = (&self.reread, reread::key_for(&op)) {
                let _ = tx.send(key);
            }
            self.metrics.ops_queued.inc();
            if self.ops.send(Queued::new(op)).await.is_err() {
                return;
            }
        }
        if let (Some(ask), Some(tx)) = (mapped.backfill, &self.backfill) {
            let req = requests::BackfillRequest {
                guild_id: ask.guild_id,
                channels: ask.channels.into_iter().map(|c| c.channel_id).collect(),
                seen_at: Utc::now(),
                only_unreadable: ask.only_unreadable,
            };
            let _ = tx.send(req);
        }
        if let Some(req) = mapped.snapshot.filter(|r| !r.is_empty()) {
            if self.snapshot.send(req).is_ok() {
                self.metrics.snapshot_pending.inc();
            }
        }
    }
}

/// Runs the worker until `shutdown` resolves (or the gateway fails for good),
/// serving metrics on `config.metrics_addr` if set.
pub async fn run(
    config: Config,
    db: Db,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    if let Some(addr) = config.metrics_addr {
        let local = metrics::serve(addr, Arc::clone(&metrics))
            .await
            .with_context(|| format!("binding the metrics listener on {addr}"))?;
        tracing::info!(addr = %local, "metrics at http://{local}/metrics");
    }
    run_with_metrics(config, db, metrics, shutdown).await
}

/// [`run`] with a caller-owned [`Metrics`] (tests read counters from it).
pub async fn run_with_metrics(
    config: Config,
    db: Db,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let rest = rest::client(&config, &metrics)?;
    // Discover the gateway ourselves: serenity silently falls back to the real
    // Discord gateway if this fails, which must never happen against a simulator.
    let gateway_url = rest
        .gateway()
        .await
        .context("discovering the gateway URL")?
        .url;
    tracing::info!(api = %config.base(), gateway = %gateway_url, "connecting");

    let (ops_tx, ops_rx) = mpsc::channel::<Queued>(config.queue_capacity.max(1));
    let stop = CancellationToken::new();
    let batcher = tokio::spawn(batcher::run(
        db.clone(),
        ops_rx,
        config.max_batch_ops,
        Arc::clone(&metrics),
        stop.clone(),
    ));
    // A run that is cancelled (its task aborted) takes the writer, and the
    // writer's own database session, with it; on the normal path the batcher
    // has finished by then and this does nothing.
    let _batcher_guard = AbortOnDrop(batcher.abort_handle());

    let access = botaccess::BotAccess::new(Arc::clone(&metrics));
    let mut tasks = Background::spawn(&config, &db, &rest, &ops_tx, &metrics, &access);
    let stopping = Arc::new(AtomicBool::new(false));
    let handler = Handler {
        ops: ops_tx.clone(),
        backfill: tasks.backfill_tx.take(),
        reread: tasks.reread_tx.take(),
        snapshot: tasks.snapshot_tx.clone(),
        access,
        metrics: Arc::clone(&metrics),
        stopping: Arc::clone(&stopping),
    };
    drop(ops_tx);

    let (mut gateway, manager) = start_gateway(&config, handler, gateway_url, &metrics).await?;
    let health = tokio::spawn(health_loop(
        Arc::clone(&manager),
        Arc::clone(&metrics),
        config.log_interval,
    ));

    // Backfill and re-reads run for the worker's whole life: if either ends
    // (a panic, most likely), the worker stops with an error instead of
    // running on without them; its supervisor restarts it, and a restart
    // backfills again.
    let outcome = tokio::select! {
        res = &mut gateway => Outcome::Gateway(res),
        () = shutdown => Outcome::Shutdown(None),
        err = task_ended("backfill", &mut tasks.backfill, &metrics) => Outcome::Shutdown(Some(err)),
        err = task_ended("reread", &mut tasks.reread, &metrics) => Outcome::Shutdown(Some(err)),
        err = task_ended("snapshot", &mut tasks.snapshot, &metrics) => Outcome::Shutdown(Some(err)),
        err = task_ended("purge", &mut tasks.purge, &metrics) => Outcome::Shutdown(Some(err)),
    };
    health.abort();
    stopping.store(true, Ordering::Relaxed);

    let result = close_gateway(outcome, &manager, gateway).await;
    tasks.abort();
    stop.cancel();
    if let Err(err) = batcher.await {
        tracing::error!(error = %err, "batcher task failed");
    }
    result
}

/// The worker's background tasks and the senders the event handler feeds them through.
struct Background {
    backfill: Option<tokio::task::JoinHandle<()>>,
    reread: Option<tokio::task::JoinHandle<()>>,
    snapshot: Option<tokio::task::JoinHandle<()>>,
    purge: Option<tokio::task::JoinHandle<()>>,
    support: Option<tokio::task::JoinHandle<()>>,
    backfill_tx: Option<mpsc::UnboundedSender<requests::BackfillRequest>>,
    reread_tx: Option<mpsc::UnboundedSender<reread::Key>>,
    snapshot_tx: mpsc::UnboundedSender<requests::SnapshotRequest>,
}

impl Background {
    fn spawn(
        config: &Config,
        db: &Db,
        rest: &rest::Rest,
        ops_tx: &mpsc::Sender<Queued>,
        metrics: &Arc<Metrics>,
        access: &Arc<botaccess::BotAccess>,
    ) -> Self {
        let (bf_tx, bf_rx) = mpsc::unbounded_channel();
        let backfill = config.backfill.then(|| {
            let bf = backfill::Backfiller {
                rest: rest.clone(),
                db: db.clone(),
                ops: ops_tx.clone(),
                metrics: Arc::clone(metrics),
                concurrency: config.backfill_concurrency,
                max_pages: config.backfill_max_pages,
                overlap: config.backfill_overlap,
                access: Arc::clone(access),
                reconcile: config.reconcile.map(|window| reconcile::Reconciler {
                    rest: rest.clone(),
                    db: db.clone(),
                    ops: ops_tx.clone(),
                    metrics: Arc::clone(metrics),
                    window,
                }),
            };
            tokio::spawn(bf.run(bf_rx))
        });

        let (rr_tx, rr_rx) = mpsc::unbounded_channel();
        let reread = config.access_reread.map(|delay| {
            let rr = reread::Rereader {
                rest: rest.clone(),
                ops: ops_tx.clone(),
                delay,
                metrics: Arc::clone(metrics),
                access: Arc::clone(access),
            };
            tokio::spawn(rr.run(rr_rx))
        });

        // Snapshots always run: without them no member (and no private-thread
        // member) is ever known, since GUILD_CREATE carries neither.
        let (snap_tx, snap_rx) = mpsc::unbounded_channel();
        let snapshot = Some(tokio::spawn(
            snapshot::Snapshotter {
                rest: rest.clone(),
                ops: ops_tx.clone(),
                metrics: Arc::clone(metrics),
                concurrency: config.backfill_concurrency,
                backfill: config.backfill.then(|| bf_tx.clone()),
            }
            .run(snap_rx),
        ));

        let purge = config
            .purge_interval
            .map(|every| tokio::spawn(purge_loop(db.clone(), every)));
        let support = config
            .support_interval
            .map(|every| tokio::spawn(support::run(db.clone(), every)));
        Background {
            backfill,
            reread,
            snapshot,
            purge,
            support,
            backfill_tx: config.backfill.then_some(bf_tx),
            reread_tx: config.access_reread.is_some().then_some(rr_tx),
            snapshot_tx: snap_tx,
        }
    }

    fn abort(self) {
        for t in [
            self.backfill,
            self.reread,
            self.snapshot,
            self.purge,
            self.support,
        ]
        .into_iter()
        .flatten()
        {
            t.abort();
        }
    }
}

type GatewayTask = tokio::task::JoinHandle<Result<(), serenity::Error>>;

/// Builds the serenity client and starts its shards.
async fn start_gateway(
    config: &Config,
    handler: Handler,
    gateway_url: String,
    metrics: &Metrics,
) -> anyhow::Result<(GatewayTask, Arc<serenity::gateway::ShardManager>)> {
    let token = config.discord_token.expose_secret().trim();
    let token = token.strip_prefix("Bot ").unwrap_or(token);
    let mut http = HttpBuilder::new(token);
    if !config.is_real_discord() {
        // Proxy mode only works with serenity's rate limiter off (serenity
        // #1739); the worker's own REST calls go through observer_discord.
        http = http.proxy(config.base()).ratelimiter_disabled(true);
    }
    let mut client = ClientBuilder::new_with_http(http.build(), intents())
        .raw_event_handler(handler)
        .await
        .context("building the gateway client")?;
    *client.ws_url.lock().await = gateway_url;
    let manager = Arc::clone(&client.shard_manager);
    let shards = config.shards;
    metrics
        .shards_total
        .set(shards.map_or(1, |s| i64::from(s.last - s.first + 1)));
    let gateway = tokio::spawn(async move {
        match shards {
            // serenity's range end is inclusive here (it boots end - start + 1 shards).
            Some(s) => client.start_shard_range(s.first..s.last, s.count).await,
            None => client.start().await,
        }
    });
    Ok((gateway, manager))
}

/// Closes the gateway resumably when asked to stop; the run's result.
async fn close_gateway(
    outcome: Outcome,
    manager: &serenity::gateway::ShardManager,
    gateway: GatewayTask,
) -> anyhow::Result<()> {
    match outcome {
        Outcome::Shutdown(failure) => {
            tracing::info!("shutting down: closing the gateway resumably and flushing");
            let ids: Vec<_> = manager.runners.lock().await.keys().copied().collect();
            for id in ids {
                // Any close code but 1000/1001 keeps the session resumable.
                manager.shutdown(id, 4000).await;
            }
            gateway.abort();
            failure.map_or(Ok(()), Err)
        }
        Outcome::Gateway(Ok(Ok(()))) => Ok(()),
        Outcome::Gateway(Ok(Err(err))) => Err(gateway_error(err)),
        Outcome::Gateway(Err(join)) => Err(anyhow::anyhow!("gateway task failed: {join}")),
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Rows deleted per purge transaction.
const PURGE_BATCH: i64 = 5_000;

/// Enforces per-guild retention (docs/data-model.md) every `every`, in small
/// transactions. Database errors are logged and retried at the next interval:
/// retention is a bound on how long data stays, not a deadline to the second.
async fn purge_loop(db: Db, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let mut total = 0u64;
        loop {
            let purged = async {
                let mut tx = db.worker().await?;
                let n = observer_db::ingest::purge_expired(&mut tx, PURGE_BATCH).await?;
                tx.commit().await?;
                Ok::<_, observer_db::Error>(n)
            }
            .await;
            match purged {
                Ok(n) => {
                    total += n;
                    if n < PURGE_BATCH.unsigned_abs() {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "retention purge failed; retrying at the next interval");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::info!(messages = total, "retention purge removed expired messages");
        }
        let tombstones = async {
            let mut tx = db.worker().await?;
            let n = observer_db::ingest::purge_member_removals(
                &mut tx,
                observer_db::ingest::MEMBER_REMOVAL_TTL,
            )
            .await?;
            tx.commit().await?;
            Ok::<_, observer_db::Error>(n)
        }
        .await;
        let thread_tombstones = async {
            let mut tx = db.worker().await?;
            let n = observer_db::ingest::purge_thread_member_removals(
                &mut tx,
                observer_db::ingest::THREAD_MEMBER_REMOVAL_TTL,
            )
            .await?;
            tx.commit().await?;
            Ok::<_, observer_db::Error>(n)
        }
        .await;
        let tombstones = match (tombstones, thread_tombstones) {
            (Ok(a), Ok(b)) => Ok(a + b),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        match tombstones {
            Ok(0) => {}
            Ok(n) => tracing::debug!(n, "old member-removal tombstones forgotten"),
            Err(err) => {
                tracing::warn!(error = %err, "tombstone purge failed; retrying at the next interval")
            }
        }
    }
}

enum Outcome {
    Gateway(Result<Result<(), serenity::Error>, tokio::task::JoinError>),
    /// Asked to stop (`None`) or a background task failed.
    Shutdown(Option<anyhow::Error>),
}

/// Resolves (logged and counted) when the background task `name` ends; never
/// if there is none. These tasks only end on their own by failing.
async fn task_ended(
    name: &'static str,
    task: &mut Option<tokio::task::JoinHandle<()>>,
    metrics: &Metrics,
) -> anyhow::Error {
    let Some(handle) = task.as_mut() else {
        return std::future::pending().await;
    };
    let res = handle.await;
    *task = None;
    metrics.task_failed(name);
    let err = match res {
        Err(join) if join.is_panic() => {
            let payload = join.into_panic();
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".to_owned());
            anyhow::anyhow!("the {name} task panicked: {msg}")
        }
        Err(join) => anyhow::anyhow!("the {name} task was cancelled: {join}"),
        Ok(()) => anyhow::anyhow!("the {name} task stopped unexpectedly"),
    };
    tracing::error!(task = name, error = %err, "background task failed; stopping the worker");
    err
}

fn gateway_error(err: serenity::Error) -> anyhow::Error {
    match err {
        serenity::Error::Gateway(GatewayError::DisallowedGatewayIntents) => anyhow::anyhow!(
            "Discord closed the gateway with 4014 (disallowed intents): the bot needs the \
             privileged intents GUILD_MEMBERS (\"Server Members Intent\") and MESSAGE_CONTENT \
             (\"Message Content Intent\"); enable both for the application in the Discord \
             developer portal"
        ),
        serenity::Error::Gateway(GatewayError::InvalidAuthentication) => {
            anyhow::anyhow!("Discord rejected DISCORD_TOKEN (close 4004)")
        }
        other => anyhow::Error::new(other).context("gateway failed"),
    }
}

async fn health_loop(
    manager: Arc<serenity::gateway::ShardManager>,
    metrics: Arc<Metrics>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.tick().await;
    let mut last_ops = metrics.ops_queued.get();
    let mut last_batches = metrics.batches.get();
    loop {
        tick.tick().await;
        let (connected, stages) = {
            let runners = manager.runners.lock().await;
            let connected = runners
                .values()
                .filter(|r| r.stage == ConnectionStage::Connected)
                .count();
            let stages: Vec<String> = runners
                .iter()
                .map(|(id, r)| format!("{id}:{}", r.stage))
                .collect();
            (connected, stages)
        };
        metrics.shards_connected.set(connected as i64);
        let ops = metrics.ops_queued.get();
        let batches = metrics.batches.get();
        let secs = every.as_secs_f64().max(0.001);
        let d_ops = ops - last_ops;
        let d_batches = batches - last_batches;
        tracing::info!(
            shards = %stages.join(","),
            connected,
            events_per_s = format!("{:.1}", d_ops as f64 / secs),
            batches = d_batches,
            avg_batch = format!("{:.1}", if d_batches > 0 { d_ops as f64 / d_batches as f64 } else { 0.0 }),
            lag_ms = format!("{:.1}", metrics.last_lag_ms.get()),
            queue = metrics.queue_depth.get(),
            unknown_events = metrics.unknown_total(),
            backfill_pending = metrics.backfill_channels_pending.get(),
            backfill_done = metrics.backfill_channels_done.get(),
            backfill_messages = metrics.backfill_messages.get(),
            snapshots_pending = metrics.snapshot_pending.get(),
            db_errors = metrics.db_errors.get(),
            "worker health"
        );
        last_ops = ops;
        last_batches = batches;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_panicking_background_task_is_reported_and_counted() {
        let metrics = Metrics::new();
        let mut task = Some(tokio::spawn(async { panic!("boom") }));
        let err = task_ended("backfill", &mut task, &metrics).await;
        assert!(
            err.to_string().contains("backfill task panicked: boom"),
            "{err}"
        );
        assert!(task.is_none());
        assert!(metrics
            .render()
            .contains("observer_worker_task_failures_total{task=\"backfill\"} 1"));

        let mut none = None;
        let pending = tokio::time::timeout(
            Duration::from_millis(20),
            task_ended("reread", &mut none, &metrics),
        )
        .await;
        assert!(pending.is_err(), "no task: never resolves");
    }
}
