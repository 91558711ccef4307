//! The bot's own access to channels.
//!
//! Discord answers 403 (Missing Access, 50001) on every route of a channel the bot cannot view
//! (voice and stage: also without CONNECT) and sends none of its messages. That is a fact about
//! the guild's configuration, not a failure: the channel stays mirrored (its row came with
//! GUILD_CREATE / CHANNEL_*, so viewers' access is still computed) and is marked as unreadable by
//! the bot, through the batcher like any other write. Retrying cannot help, so a refused channel
//! costs one request per guild snapshot (and one per CHANNEL_UPDATE re-read), and is logged once
//! per channel per process, not per request. The mark clears when a later read succeeds (the
//! next snapshot, or a THREAD_LIST_SYNC / CHANNEL_UPDATE after access was granted) or a message
//! arrives from the channel.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::Utc;
use observer_db::bot_access::BotAccessObservation;
use observer_db::ingest::IngestOp;

use crate::metrics::Metrics;

pub struct BotAccess {
    /// Channels known refused: from this process's own 403s and the database's marks.
    unreadable: Mutex<HashSet<i64>>,
    metrics: Arc<Metrics>,
}

fn op(guild_id: i64, channel_id: i64, readable: bool) -> IngestOp {
    IngestOp::ChannelBotAccess(BotAccessObservation {
        guild_id,
        channel_id,
        readable,
        observed_at: Utc::now(),
    })
}

impl BotAccess {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(BotAccess {
            unreadable: Mutex::new(HashSet::new()),
            metrics,
        })
    }

    fn set(&self) -> MutexGuard<'_, HashSet<i64>> {
        // The set is a cache of marks that are also in the database: a panic
        // elsewhere while holding it leaves nothing half-done that matters.
        self.unreadable.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds channels the database has marked unreadable (after a restart the
    /// process would not know them otherwise, and a message from one of them
    /// must clear its mark).
    pub fn remember(&self, channel_ids: impl IntoIterator<Item = i64>) {
        let mut set = self.set();
        set.extend(channel_ids);
        self.metrics.bot_unreadable_channels.set(set.len() as i64);
    }

    pub fn is_unreadable(&self, channel_id: i64) -> bool {
        self.set().contains(&channel_id)
    }

    /// A route of the channel answered 403: the op that records it.
    pub fn refused(&self, guild_id: i64, channel_id: i64, code: Option<u64>) -> IngestOp {
        let newly = {
            let mut set = self.set();
            let newly = set.insert(channel_id);
            self.metrics.bot_unreadable_channels.set(set.len() as i64);
            newly
        };
        if newly {
            tracing::info!(
                guild = guild_id,
                channel = channel_id,
                code,
                "the bot cannot read this channel (Discord answered 403); it stays mirrored, without messages"
            );
        }
        op(guild_id, channel_id, false)
    }

    /// A read of the channel succeeded: the op that records it.
    pub fn readable(&self, guild_id: i64, channel_id: i64) -> IngestOp {
        let was = {
            let mut set = self.set();
            let was = set.remove(&channel_id);
            self.metrics.bot_unreadable_channels.set(set.len() as i64);
            was
        };
        if was {
            tracing::info!(
                guild = guild_id,
                channel = channel_id,
                "the bot can read this channel again"
            );
        }
        op(guild_id, channel_id, true)
    }

    /// A message arrived from the channel: if it was marked unreadable, the op
    /// that clears the mark (Discord only sends messages the bot can see).
    pub fn message_seen(&self, guild_id: i64, channel_id: i64) -> Option<IngestOp> {
        if !self.is_unreadable(channel_id) {
            return None;
        }
        Some(self.readable(guild_id, channel_id))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn readable_of(op: &IngestOp) -> bool {
        match op {
            IngestOp::ChannelBotAccess(o) => o.readable,
            other => panic!("unexpected op {other:?}"),
        }
    }

    #[test]
    fn refusals_are_marked_and_a_message_or_a_read_clears_them() {
        let m = Metrics::new();
        let a = BotAccess::new(Arc::clone(&m));
        assert!(
            a.message_seen(1, 10).is_none(),
            "readable channels cost nothing"
        );
        assert!(!readable_of(&a.refused(1, 10, Some(50001))));
        assert!(!readable_of(&a.refused(1, 10, Some(50001))));
        assert_eq!(m.bot_unreadable_channels.get(), 1, "counted once");
        assert!(a.is_unreadable(10));
        assert!(readable_of(&a.message_seen(1, 10).unwrap()));
        assert!(!a.is_unreadable(10));
        assert!(a.message_seen(1, 10).is_none());
        a.remember([11, 12]);
        assert_eq!(m.bot_unreadable_channels.get(), 2);
        assert!(readable_of(&a.readable(1, 11)));
        assert_eq!(m.bot_unreadable_channels.get(), 1);
    }
}
