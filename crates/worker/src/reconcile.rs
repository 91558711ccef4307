//! Reconciliation after a gap: edits and deletions made while the worker was
//! not listening.
//!
//! Discord replays nothing to a session that could not resume, and backfill
//! only fetches messages newer than the newest stored one. So after every
//! guild snapshot (each GUILD_CREATE: first start, a re-identify, the end of an
//! outage) each backfilled channel's recent *window* is read again, newest
//! first with `before` paging:
//! - every message Discord returns is written as a full message; the ingest
//!   merge turns a newer `edited_timestamp` into a new revision and changes
//!   nothing otherwise;
//! - the pages form one contiguous range of the channel's history (ids from the
//!   oldest message fetched to the newest one; from the channel's very start
//!   when the last page came back short). A stored message inside that range
//!   that Discord did not return was deleted meanwhile: it becomes a tombstone
//!   marked as *detected* (`deletion_detected_at`, the time it was noticed, not
//!   when it happened);
//! - a stored message newer than the newest one Discord returned was either
//!   deleted (the channel's latest messages) or posted after the first page was
//!   read (live traffic during the pass). No clock can tell the two apart, so
//!   each is asked for by id (`GET /channels/{id}/messages/{message.id}`, at
//!   most [`MAX_PROBES`] per pass): 404 means deleted, an answer means it
//!   exists, a 403 ends the probing (the bot may not read single messages).
//!
//! The window is the last `max_age` of the channel or its last `min_messages`
//! messages, whichever reaches further back, in whole pages of 100. Outside it
//! nothing changes: an older message edited or deleted during the gap keeps
//! its stored state, and so do stored messages beyond the probe limit.
//! An interrupted pass (a crash, a restart) is simply run again at the next
//! snapshot; every step is idempotent.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use observer_db::ingest::IngestOp;
use observer_db::Db;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::batcher::Queued;
use crate::map;
use crate::metrics::Metrics;
use crate::rest::{Fetched, HistoryError, Rest, PAGE};

/// How much of each channel's recent history is re-read after a gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Everything posted within this long before the pass.
    pub max_age: Duration,
    /// At least this many of the newest messages.
    pub min_messages: usize,
}

impl Default for Window {
    /// The last 24 hours or 500 messages, whichever reaches further back.
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(24 * 3600),
            min_messages: 500,
        }
    }
}

/// What one channel's pass found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Messages Discord returned inside the window.
    pub checked: u64,
    /// Stored messages Discord no longer has.
    pub gone: u64,
}

#[derive(Clone)]
pub struct Reconciler {
    pub rest: Rest,
    pub db: Db,
    pub ops: mpsc::Sender<Queued>,
    pub metrics: Arc<Metrics>,
    pub window: Window,
}

/// Stored messages newer than everything Discord returned that are asked for
/// one by one in a pass; more are left as they are until the next pass.
pub const MAX_PROBES: usize = 50;

/// The one field a message must have for the range check: a message serenity
/// cannot parse still proves that its id exists.
#[derive(Deserialize)]
struct MessageId {
    #[serde(deserialize_with = "snowflake")]
    id: i64,
}

fn snowflake<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

impl Reconciler {
    /// Re-reads the window of one channel; `Ok` with nothing checked when the
    /// bot cannot read it (403) or it is gone (404).
    pub async fn channel(&self, guild_id: i64, channel_id: i64) -> Result<Outcome, HistoryError> {
        let horizon =
            Utc::now() - chrono::Duration::from_std(self.window.max_age).unwrap_or_default();
        let mut seen: BTreeSet<i64> = BTreeSet::new();
        let mut before: Option<i64> = None;
        let mut reached_start = false;
        loop {
            let path = match before {
                Some(b) => format!("/channels/{channel_id}/messages?before={b}&limit={PAGE}"),
                None => format!("/channels/{channel_id}/messages?limit={PAGE}"),
            };
            let Some(page) = self.rest.fetch::<Vec<Value>>(&path).await?.ok() else {
                return Ok(Outcome::default());
            };
            self.metrics.reconcile_pages.inc();
            let len = page.len();
            let mut oldest_at = None;
            for raw in page {
                // Without the id the range is unknown: stop before deciding anything.
                let id = MessageId::deserialize(&raw)
                    .map_err(|e| HistoryError::Unparseable(format!("{path}: {e}")))?
                    .id;
                seen.insert(id);
                match serde_json::from_value::<serenity::all::Message>(raw) {
                    Ok(msg) => {
                        oldest_at = map::ts(&msg.timestamp);
                        if let Some(m) = map::message(&msg, Some(guild_id)) {
                            self.ops
                                .send(Queued::new(IngestOp::MessageCreate(Box::new(m))))
                                .await
                                .map_err(|_| HistoryError::Closed)?;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(channel = channel_id, message = id, error = %err, "reconcile: unparseable message kept as it is");
                    }
                }
            }
            if len < PAGE {
                reached_start = true;
                break;
            }
            let enough = seen.len() >= self.window.min_messages;
            let old_enough = oldest_at.is_none_or(|t| t < horizon);
            if enough && old_enough {
                break;
            }
            before = seen.first().copied();
        }
        // From the channel's start when the last page was short (an empty
        // first page included): whatever is stored below the oldest message
        // Discord has is gone too.
        let low = match (reached_start, seen.first()) {
            (false, Some(&oldest)) => oldest,
            _ => 0,
        };
        let newest = seen.last().copied().unwrap_or(0);
        let mut tx = self.db.worker().await?;
        let stored =
            observer_db::reconcile::live_message_ids(&mut tx, guild_id, channel_id, low, i64::MAX)
                .await?;
        tx.commit().await?;
        let (mut gone, above): (Vec<i64>, Vec<i64>) = stored
            .into_iter()
            .filter(|id| !seen.contains(id))
            .partition(|id| *id <= newest);
        gone.extend(self.probe(guild_id, channel_id, &above).await?);
        let outcome = Outcome {
            checked: seen.len() as u64,
            gone: gone.len() as u64,
        };
        self.metrics.reconcile_checked.inc_by(outcome.checked);
        if !gone.is_empty() {
            self.metrics.reconcile_gone.inc_by(outcome.gone);
            tracing::info!(
                guild = guild_id,
                channel = channel_id,
                gone = gone.len(),
                "reconcile: messages deleted while the worker was away"
            );
            self.ops
                .send(Queued::new(IngestOp::MessagesGone {
                    guild_id,
                    channel_id,
                    message_ids: gone,
                    detected_at: Utc::now(),
                }))
                .await
                .map_err(|_| HistoryError::Closed)?;
        }
        Ok(outcome)
    }

    /// Asks for each of `ids` (stored, newer than anything the history pages
    /// returned) and returns those Discord no longer has.
    async fn probe(
        &self,
        guild_id: i64,
        channel_id: i64,
        ids: &[i64],
    ) -> Result<Vec<i64>, HistoryError> {
        let mut gone = Vec::new();
        for id in ids.iter().take(MAX_PROBES) {
            self.metrics.reconcile_probes.inc();
            match self
                .rest
                .fetch::<Value>(&format!("/channels/{channel_id}/messages/{id}"))
                .await?
            {
                Fetched::NotFound => gone.push(*id),
                Fetched::Forbidden { .. } => break,
                Fetched::Ok(raw) => {
                    // Still there (posted during the pass, or edited): store what it is now.
                    if let Ok(msg) = serde_json::from_value::<serenity::all::Message>(raw) {
                        if let Some(m) = map::message(&msg, Some(guild_id)) {
                            self.ops
                                .send(Queued::new(IngestOp::MessageCreate(Box::new(m))))
                                .await
                                .map_err(|_| HistoryError::Closed)?;
                        }
                    }
                }
            }
        }
        Ok(gone)
    }
}
