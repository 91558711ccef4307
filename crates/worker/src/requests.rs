//! Work one task of the worker asks of another: the gateway handler (through
//! `map`) asks for backfills and guild snapshots, and a snapshot asks for the
//! backfill of the archived threads it found. The types live below all of
//! those tasks so that none of them imports another's module for a message.

use chrono::{DateTime, Utc};

/// Channels of one guild whose history to fetch after the newest stored message.
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    pub guild_id: i64,
    pub channels: Vec<i64>,
    /// When the guild (re)appeared on the gateway: everything newer arrives live.
    pub seen_at: DateTime<Utc>,
    /// Only those of `channels` the bot was refused before (a CHANNEL_UPDATE may
    /// have granted access; readable channels are current already).
    pub only_unreadable: bool,
}

/// Channel types whose archived private threads are listed: text,
/// announcement, forum, media.
const THREAD_PARENT_KINDS: [i16; 4] = [0, 5, 15, 16];
pub(crate) const PRIVATE_THREAD: i16 = 12;

/// What to list for one guild.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub guild_id: i64,
    /// List all guild members (GUILD_CREATE, not THREAD_LIST_SYNC).
    pub members: bool,
    /// Channels whose archived private threads are listed.
    pub parents: Vec<i64>,
    /// Private threads known to be active; their members are listed.
    pub private_threads: Vec<i64>,
}

impl SnapshotRequest {
    /// The snapshot work of a GUILD_CREATE with these channels and active threads.
    pub fn guild_create(
        guild_id: i64,
        channels: &[observer_db::ingest::ChannelInfo],
        threads: &[observer_db::ingest::ChannelInfo],
    ) -> Self {
        SnapshotRequest {
            guild_id,
            members: true,
            parents: channels
                .iter()
                .filter(|c| THREAD_PARENT_KINDS.contains(&c.kind))
                .map(|c| c.channel_id)
                .collect(),
            private_threads: private_threads(threads),
        }
    }

    /// The snapshot work of a THREAD_LIST_SYNC listing these threads.
    pub fn thread_list_sync(guild_id: i64, threads: &[observer_db::ingest::ChannelInfo]) -> Self {
        SnapshotRequest {
            guild_id,
            members: false,
            parents: Vec::new(),
            private_threads: private_threads(threads),
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.members && self.parents.is_empty() && self.private_threads.is_empty()
    }
}

fn private_threads(threads: &[observer_db::ingest::ChannelInfo]) -> Vec<i64> {
    threads
        .iter()
        .filter(|t| t.kind == PRIVATE_THREAD)
        .map(|t| t.channel_id)
        .collect()
}
