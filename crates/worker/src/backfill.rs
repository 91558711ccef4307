//! History backfill: after every identify (each GUILD_CREATE), fetch what was
//! posted while the worker was not listening.
//!
//! REST goes through `observer_discord` (not serenity's Http): serenity's
//! proxy mode disables its rate limiter, and backfill must tell a 403 from a
//! 404 and share one rate limiter with every other REST call.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use observer_db::ingest::{self, IngestOp};
use observer_db::Db;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::batcher::Queued;
use crate::map;
use crate::metrics::Metrics;
use crate::requests::BackfillRequest;
use crate::rest::{Fetched, HistoryError, RestError, PAGE};

#[derive(Clone)]
pub struct Backfiller {
    pub rest: crate::rest::Rest,
    pub db: Db,
    pub ops: mpsc::Sender<Queued>,
    pub metrics: Arc<Metrics>,
    pub concurrency: usize,
    pub max_pages: u32,
    pub overlap: Duration,
    pub access: Arc<crate::botaccess::BotAccess>,
    /// Re-read each channel's recent window after its backfill (edits and
    /// deletions made while the worker was away); None skips it.
    pub reconcile: Option<crate::reconcile::Reconciler>,
}

impl Backfiller {
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<BackfillRequest>) {
        while let Some(req) = rx.recv().await {
            self.guild(req).await;
        }
    }

    async fn guild(&self, mut req: BackfillRequest) {
        let started = std::time::Instant::now();
        // Before any database work: most CHANNEL_UPDATEs concern channels the
        // bot reads already. (The set holds the database's marks from the
        // session's first snapshot on, which precedes any CHANNEL_UPDATE.)
        if req.only_unreadable {
            req.channels.retain(|c| self.access.is_unreadable(*c));
            if req.channels.is_empty() {
                return;
            }
        }
        let cursors = match self.cursors(&req).await {
            Ok(c) => c,
            Err(err) => {
                self.metrics.backfill_errors.inc();
                tracing::error!(guild = req.guild_id, error = %err, "backfill: reading cursors failed");
                return;
            }
        };
        let n = req.channels.len();
        self.metrics.backfill_channels_pending.inc_by(n as i64);
        tracing::info!(guild = req.guild_id, channels = n, "backfill started");
        let results: Vec<(i64, Result<u64, HistoryError>)> =
            futures::stream::iter(req.channels.iter().copied())
                .map(|ch| {
                    let after = cursors.get(&ch).copied().unwrap_or(0);
                    async move {
                        let fetched = self.channel(req.guild_id, ch, after).await;
                        // After the forward pass, so the window's newest end
                        // is already stored and only older changes remain.
                        // A channel Discord just refused is not asked again.
                        if let (Ok(_), Some(rc)) = (&fetched, &self.reconcile) {
                            if !self.access.is_unreadable(ch) {
                                self.reconcile_channel(rc, req.guild_id, ch).await;
                            }
                        }
                        (ch, fetched)
                    }
                })
                .buffer_unordered(self.concurrency.max(1))
                .collect()
                .await;
        let mut total = 0;
        for (ch, res) in results {
            self.metrics.backfill_channels_pending.dec();
            match res {
                Ok(k) => {
                    total += k;
                    self.metrics.backfill_channels_done.inc();
                }
                Err(err) => {
                    self.metrics.backfill_errors.inc();
                    tracing::warn!(guild = req.guild_id, channel = ch, error = %err, "backfill of a channel failed");
                }
            }
        }
        tracing::info!(
            guild = req.guild_id,
            channels = n,
            messages = total,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "backfill finished"
        );
    }

    /// One channel's reconciliation pass; failures are logged and counted (the
    /// next snapshot runs it again).
    async fn reconcile_channel(
        &self,
        rc: &crate::reconcile::Reconciler,
        guild_id: i64,
        channel_id: i64,
    ) {
        match rc.channel(guild_id, channel_id).await {
            Ok(_) => {
                self.metrics.reconcile_channels.inc();
            }
            Err(err) => {
                self.metrics.reconcile_errors.inc();
                tracing::warn!(guild = guild_id, channel = channel_id, error = %err, "reconciliation of a channel failed");
            }
        };
    }

    /// Per channel, the id to fetch after: the newest stored message older than
    /// the guild's arrival, minus the overlap window.
    async fn cursors(
        &self,
        req: &BackfillRequest,
    ) -> Result<std::collections::HashMap<i64, i64>, HistoryError> {
        let before = ingest::snowflake_at(req.seen_at);
        let mut tx = self.db.worker().await?;
        let newest =
            ingest::newest_message_ids(&mut tx, req.guild_id, &req.channels, before).await?;
        let refused = observer_db::bot_access::unreadable_channels(&mut tx, req.guild_id).await?;
        tx.commit().await?;
        self.access.remember(refused);
        let overlap = chrono::Duration::from_std(self.overlap).unwrap_or_default();
        Ok(newest
            .into_iter()
            .map(|(ch, id)| {
                (
                    ch,
                    ingest::snowflake_at(ingest::snowflake_time(id) - overlap),
                )
            })
            .collect())
    }

    async fn channel(
        &self,
        guild_id: i64,
        channel_id: i64,
        mut after: i64,
    ) -> Result<u64, HistoryError> {
        let mut fetched = 0u64;
        let mut pages = 0u32;
        loop {
            let path = format!("/channels/{channel_id}/messages?after={after}&limit={PAGE}");
            // Each message decoded on its own: one serenity cannot read is
            // skipped, not the whole page.
            let fetched_page = match self.rest.fetch::<Vec<Value>>(&path).await {
                // THREAD_LIST_SYNC names parent channels of every kind; a forum
                // or category has no history of its own (400, code 50024).
                Err(RestError::Status { status: 400, .. }) => {
                    tracing::debug!(
                        channel = channel_id,
                        "not a message channel; nothing to backfill"
                    );
                    return Ok(fetched);
                }
                other => other?,
            };
            let page = match fetched_page {
                Fetched::Ok(page) => page,
                Fetched::Forbidden { code } => {
                    // Not an error and not worth a retry: recorded, and tried
                    // again at the next snapshot or access change.
                    self.send(self.access.refused(guild_id, channel_id, code))
                        .await?;
                    return Ok(fetched);
                }
                // Deleted meanwhile: its CHANNEL_DELETE removes it.
                Fetched::NotFound => return Ok(fetched),
            };
            if pages == 0 {
                self.send(self.access.readable(guild_id, channel_id))
                    .await?;
            }
            pages += 1;
            self.metrics.backfill_pages.inc();
            let len = page.len();
            let mut newest = after;
            // Oldest first, so a subscriber sees history in order.
            for raw in page.into_iter().rev() {
                let msg: serenity::all::Message = match serde_json::from_value(raw) {
                    Ok(m) => m,
                    Err(err) => {
                        self.metrics.backfill_errors.inc();
                        tracing::warn!(channel = channel_id, error = %err, "backfill: unparseable message skipped");
                        continue;
                    }
                };
                newest = newest.max(i64::try_from(msg.id.get()).unwrap_or(i64::MAX));
                if let Some(m) = map::message(&msg, Some(guild_id)) {
                    fetched += 1;
                    self.metrics.backfill_messages.inc();
                    self.send(IngestOp::MessageCreate(Box::new(m))).await?;
                }
            }
            if len < PAGE || newest == after || (self.max_pages > 0 && pages >= self.max_pages) {
                return Ok(fetched);
            }
            after = newest;
        }
    }

    async fn send(&self, op: IngestOp) -> Result<(), HistoryError> {
        self.ops
            .send(Queued::new(op))
            .await
            .map_err(|_| HistoryError::Closed)
    }
}
