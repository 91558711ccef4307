//! Prometheus metrics and the `/metrics` endpoint (a one-route axum router
//! served connection by connection with hyper, see [`serve`]).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    /// Gateway dispatches received, by event name.
    pub events: Family<Labels, Counter>,
    /// Events serenity could not parse (`Event::Unknown`), by event name.
    pub unknown_events: Family<Labels, Counter>,
    /// The sum of `unknown_events` (a `Family` cannot be summed), not exported.
    unknown_events_sum: Counter,
    pub ops_queued: Counter,
    pub batches: Counter,
    pub batch_ops: Histogram,
    pub batch_seconds: Histogram,
    /// Time from an op being queued to its transaction committing.
    pub lag_seconds: Histogram,
    pub messages_changed: Counter,
    pub message_events: Counter,
    pub db_errors: Counter,
    pub queue_depth: Gauge,
    pub shards_connected: Gauge,
    pub shards_total: Gauge,
    pub ready_total: Counter,
    pub backfill_channels_pending: Gauge,
    pub backfill_channels_done: Counter,
    pub backfill_messages: Counter,
    pub backfill_pages: Counter,
    pub backfill_rate_limited: Counter,
    pub backfill_errors: Counter,
    /// Channels whose recent window was reconciled after a gap.
    pub reconcile_channels: Counter,
    pub reconcile_pages: Counter,
    /// Single messages asked for by reconciliation (newer than its pages).
    pub reconcile_probes: Counter,
    /// Messages Discord returned inside reconciled windows.
    pub reconcile_checked: Counter,
    /// Stored messages found deleted (tombstones marked as detected).
    pub reconcile_gone: Counter,
    pub reconcile_errors: Counter,
    /// REST requests abandoned after too many 429 answers.
    pub rest_rate_limit_give_ups: Counter,
    /// REST answers 403 (the bot lacks access; never retried).
    pub rest_forbidden: Counter,
    /// 401/403/429 answers in the invalid-request guard's 10-minute window
    /// when the last one came (Discord bans the IP at 10,000).
    pub rest_invalid_requests: Gauge,
    /// REST requests refused by the invalid-request guard (Discord's ban
    /// threshold was being approached).
    pub rest_budget_refusals: Counter,
    /// REST requests retried after a connection error or 5xx.
    pub rest_retries: Counter,
    /// Channels this process found the bot cannot read (403 on their routes).
    pub bot_unreadable_channels: Gauge,
    /// Background tasks (backfill, re-read) that panicked or ended early, by task.
    pub task_failures: Family<Labels, Counter>,
    /// Access re-reads not scheduled because too many were pending.
    pub reread_dropped: Counter,
    pub last_lag_ms: Gauge<f64, AtomicU64>,
    /// Guild snapshots (member and private-thread listings) queued or running.
    pub snapshot_pending: Gauge,
    pub snapshot_done: Counter,
    /// Members received from complete guild member listings.
    pub snapshot_members: Counter,
    /// Private threads whose member list was listed completely.
    pub snapshot_threads: Counter,
    /// Archived threads found by the archived-thread listings.
    pub snapshot_archived_threads: Counter,
    /// Listings that failed (the next snapshot retries them).
    pub snapshot_errors: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut r = Registry::with_prefix("observer_worker");
        let m = Metrics {
            events: Family::default(),
            unknown_events: Family::default(),
            unknown_events_sum: Counter::default(),
            ops_queued: Counter::default(),
            batches: Counter::default(),
            batch_ops: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            batch_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            lag_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            messages_changed: Counter::default(),
            message_events: Counter::default(),
            db_errors: Counter::default(),
            queue_depth: Gauge::default(),
            shards_connected: Gauge::default(),
            shards_total: Gauge::default(),
            ready_total: Counter::default(),
            backfill_channels_pending: Gauge::default(),
            backfill_channels_done: Counter::default(),
            backfill_messages: Counter::default(),
            backfill_pages: Counter::default(),
            backfill_rate_limited: Counter::default(),
            backfill_errors: Counter::default(),
            reconcile_channels: Counter::default(),
            reconcile_pages: Counter::default(),
            reconcile_probes: Counter::default(),
            reconcile_checked: Counter::default(),
            reconcile_gone: Counter::default(),
            reconcile_errors: Counter::default(),
            rest_rate_limit_give_ups: Counter::default(),
            rest_forbidden: Counter::default(),
            rest_budget_refusals: Counter::default(),
            rest_invalid_requests: Gauge::default(),
            rest_retries: Counter::default(),
            bot_unreadable_channels: Gauge::default(),
            task_failures: Family::default(),
            reread_dropped: Counter::default(),
            last_lag_ms: Gauge::default(),
            snapshot_pending: Gauge::default(),
            snapshot_done: Counter::default(),
            snapshot_members: Counter::default(),
            snapshot_threads: Counter::default(),
            snapshot_archived_threads: Counter::default(),
            snapshot_errors: Counter::default(),
            registry: Registry::default(),
        };
        r.register(
            "snapshot_pending",
            "Guild snapshots (member and thread-member listings) queued or running",
            m.snapshot_pending.clone(),
        );
        r.register(
            "snapshot_done",
            "Guild snapshots finished",
            m.snapshot_done.clone(),
        );
        r.register(
            "snapshot_members",
            "Members received from complete guild member listings",
            m.snapshot_members.clone(),
        );
        r.register(
            "snapshot_threads",
            "Private threads whose members were listed completely",
            m.snapshot_threads.clone(),
        );
        r.register(
            "snapshot_archived_threads",
            "Archived threads found by archived-thread listings",
            m.snapshot_archived_threads.clone(),
        );
        r.register(
            "snapshot_errors",
            "Snapshot listings that failed (retried at the next snapshot)",
            m.snapshot_errors.clone(),
        );
        r.register(
            "gateway_events",
            "Gateway dispatches received",
            m.events.clone(),
        );
        r.register(
            "unknown_events",
            "Dispatches serenity could not parse (Event::Unknown)",
            m.unknown_events.clone(),
        );
        r.register(
            "ops_queued",
            "Ingest ops queued for the batcher",
            m.ops_queued.clone(),
        );
        r.register(
            "batches",
            "Transactions committed by the batcher",
            m.batches.clone(),
        );
        r.register("batch_ops", "Ops per committed batch", m.batch_ops.clone());
        r.register(
            "batch_seconds",
            "Time to write and commit a batch",
            m.batch_seconds.clone(),
        );
        r.register(
            "lag_seconds",
            "Time from queueing an op to its commit",
            m.lag_seconds.clone(),
        );
        r.register(
            "messages_changed",
            "Message rows inserted or changed",
            m.messages_changed.clone(),
        );
        r.register(
            "message_events",
            "message_events rows appended",
            m.message_events.clone(),
        );
        r.register(
            "db_errors",
            "Failed batch attempts (retried)",
            m.db_errors.clone(),
        );
        r.register(
            "queue_depth",
            "Ops waiting for the batcher",
            m.queue_depth.clone(),
        );
        r.register(
            "shards_connected",
            "Shards in the Connected stage",
            m.shards_connected.clone(),
        );
        r.register(
            "shards",
            "Shards run by this process",
            m.shards_total.clone(),
        );
        r.register(
            "ready",
            "READY dispatches (identifies)",
            m.ready_total.clone(),
        );
        r.register(
            "backfill_channels_pending",
            "Channels waiting for or in backfill",
            m.backfill_channels_pending.clone(),
        );
        r.register(
            "backfill_channels_done",
            "Channels backfilled",
            m.backfill_channels_done.clone(),
        );
        r.register(
            "backfill_messages",
            "Messages fetched by backfill",
            m.backfill_messages.clone(),
        );
        r.register(
            "backfill_pages",
            "History pages fetched",
            m.backfill_pages.clone(),
        );
        r.register(
            "backfill_rate_limited",
            "429 answers during backfill",
            m.backfill_rate_limited.clone(),
        );
        r.register(
            "backfill_errors",
            "Backfill requests that failed",
            m.backfill_errors.clone(),
        );
        r.register(
            "reconcile_channels",
            "Channels whose recent window was reconciled after a gap",
            m.reconcile_channels.clone(),
        );
        r.register(
            "reconcile_pages",
            "History pages read by reconciliation",
            m.reconcile_pages.clone(),
        );
        r.register(
            "reconcile_probes",
            "Single messages asked for by reconciliation",
            m.reconcile_probes.clone(),
        );
        r.register(
            "reconcile_checked",
            "Messages compared by reconciliation",
            m.reconcile_checked.clone(),
        );
        r.register(
            "reconcile_detected_deletions",
            "Stored messages found deleted by reconciliation",
            m.reconcile_gone.clone(),
        );
        r.register(
            "reconcile_errors",
            "Channel reconciliations that failed (retried at the next snapshot)",
            m.reconcile_errors.clone(),
        );
        r.register(
            "rest_rate_limit_give_ups",
            "REST requests abandoned after too many 429 answers",
            m.rest_rate_limit_give_ups.clone(),
        );
        r.register(
            "rest_forbidden",
            "REST answers 403 (the bot lacks access to a channel; not retried)",
            m.rest_forbidden.clone(),
        );
        r.register(
            "rest_invalid_requests",
            "401/403/429 answers in the last 10 minutes as of the latest one (Discord bans the IP at 10,000)",
            m.rest_invalid_requests.clone(),
        );
        r.register(
            "rest_budget_refusals",
            "REST requests not sent: too many 401/403/429 answers in the last 10 minutes",
            m.rest_budget_refusals.clone(),
        );
        r.register(
            "rest_retries",
            "REST requests retried after a connection error or 5xx",
            m.rest_retries.clone(),
        );
        r.register(
            "bot_unreadable_channels",
            "Channels the bot was refused (403), as known to this process",
            m.bot_unreadable_channels.clone(),
        );
        r.register(
            "task_failures",
            "Background tasks that panicked or ended early, by task",
            m.task_failures.clone(),
        );
        r.register(
            "reread_dropped",
            "Access re-reads skipped because too many were pending",
            m.reread_dropped.clone(),
        );
        r.register(
            "last_lag_milliseconds",
            "Queue-to-commit lag of the last batch's oldest op",
            m.last_lag_ms.clone(),
        );
        Arc::new(Metrics { registry: r, ..m })
    }

    pub fn event(&self, name: &str) {
        self.events
            .get_or_create(&vec![("event".to_owned(), name.to_owned())])
            .inc();
    }

    pub fn task_failed(&self, task: &str) {
        self.task_failures
            .get_or_create(&vec![("task".to_owned(), task.to_owned())])
            .inc();
    }

    pub fn unknown(&self, name: &str) {
        self.unknown_events
            .get_or_create(&vec![("event".to_owned(), name.to_owned())])
            .inc();
        self.unknown_events_sum.inc();
    }

    /// Events serenity could not parse, over all event names.
    pub fn unknown_total(&self) -> u64 {
        self.unknown_events_sum.get()
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(err) = encode(&mut text, &self.registry) {
            tracing::warn!(%err, "encoding metrics failed");
        }
        text
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn scrape(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(CONTENT_TYPE, OPENMETRICS)], metrics.render())
}

/// Serves `GET /metrics` until the runtime stops. axum routes; hyper serves
/// each connection directly (not `axum::serve`) because the endpoint needs
/// what `axum::serve` does not offer: a bound on the whole exchange
/// ([`SCRAPE_TIMEOUT`], so a client that connects and says nothing is
/// dropped) and at most [`MAX_SCRAPES`] connections at once, so a slow or
/// hostile client cannot pile up tasks.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    tokio::spawn(async move {
        loop {
            let (sock, _) = match listener.accept().await {
                Ok(s) => s,
                Err(err) => {
                    // E.g. out of file descriptors: do not spin.
                    tracing::warn!(%err, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                // Too many scrapes in flight: drop this one.
                continue;
            };
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(sock), service);
                let _ = tokio::time::timeout(SCRAPE_TIMEOUT, conn).await;
            });
        }
    });
    Ok(local)
}

/// Longest a scrape may take, request and response together.
const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Scrapes served at once.
const MAX_SCRAPES: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// A client that connects and says nothing neither blocks scrapes nor
    /// keeps its connection: it is closed after the scrape timeout.
    #[tokio::test]
    async fn silent_clients_are_dropped_and_do_not_block_scrapes() {
        let addr = serve("127.0.0.1:0".parse().unwrap(), Metrics::new())
            .await
            .unwrap();
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let resp = get(addr, "/metrics").await;
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(resp.contains("observer_worker_batches_total"));
        assert!(resp.contains("application/openmetrics-text"), "{resp}");
        let missing = get(addr, "/nope").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(SCRAPE_TIMEOUT * 2, silent.read(&mut buf))
            .await
            .expect("silent connection still open after the scrape timeout")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
    }
}

#[cfg(test)]
mod counter_tests {
    use super::*;

    #[test]
    fn unknown_total_sums_every_event_name() {
        let m = Metrics::new();
        assert_eq!(m.unknown_total(), 0);
        m.unknown("A");
        m.unknown("B");
        m.unknown("A");
        assert_eq!(m.unknown_total(), 3);
        assert!(m
            .render()
            .contains("observer_worker_unknown_events_total{event=\"A\"} 2"));
    }
}
