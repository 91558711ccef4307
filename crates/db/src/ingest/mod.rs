//! Writes from the ingestion worker: idempotent, order-independent upserts of
//! access data and messages, plus the message event log.
//!
//! The worker hands over plain data ([`IngestOp`], no serenity types) and
//! [`write_batch`] applies a whole batch inside one [`WorkerTx`] with a handful
//! of bulk statements.
//!
//! Messages converge under any arrival order and any number of repeats because
//! every message op is turned into a [`MsgState`] and states are combined with
//! [`MsgState::join`], which is commutative, associative and idempotent:
//! - content (with `edited_at` and attachments) is a *version* keyed by its time
//!   (`edited_at`, else `created_at`); the newest version wins;
//! - a delete is sticky (`deleted_at` is set once, never cleared);
//! - author / creation data fill in whenever they are first seen;
//! - every observed version goes into `message_revisions` (insert-only).
//!
//! The same join runs for ops on one message inside a batch (one statement
//! cannot touch a row twice) and against the stored row (read `for update`),
//! so the database never depends on which event came first.
//!
//! A `message_events` row is appended only when a message's stored state
//! actually changed; repeats produce none. NOTIFY is a trigger's job (policies/).
//!
//! Layout (everything callers use is re-exported here):
//! - `ops`: the plain input types ([`IngestOp`] and its payloads) and [`BatchStats`].
//! - `merge`: the message state lattice ([`MsgState`], [`Version`]) and the
//!   per-batch merge of message ops into one state per message.
//! - `batch`: [`write_batch`] / [`write_batch_on`]: access ops in order, then
//!   the merged messages; the only entry points that write a batch.
//! - `access`: guilds, roles, channels, overwrites, bot access; runs of one
//!   kind in one statement.
//! - `members`: the observed-at ordered member upsert and removal (shared with
//!   the login path through `crate::auth`).
//! - `threads`: the same ordering for thread members, complete listings and
//!   the bot's presence in a guild.
//! - `rounds`: messages in bulk: optimistic insert, then locked reads and
//!   merges, with events and revisions.
//! - `retention`: backfill bounds, retention purges, tombstone expiry.
//!
//! Which failures are worth a retry is the error type's call
//! ([`crate::Error::is_transient`]).

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};

mod access;
mod batch;
mod members;
mod merge;
mod ops;
mod retention;
mod rounds;
mod threads;

pub use batch::{write_batch, write_batch_on};
pub use merge::{MsgState, Version};
pub use ops::{
    Author, BatchStats, ChannelInfo, ForumTag, GuildInfo, GuildSnapshot, IngestOp, MemberInfo,
    MessagePatch, NewMessage, Overwrite, RoleInfo,
};
pub use retention::{
    backfill_channels, newest_message_ids, purge_expired, purge_member_removals, MEMBER_REMOVAL_TTL,
};
pub use threads::{purge_thread_member_removals, THREAD_MEMBER_REMOVAL_TTL};

pub(crate) use members::{remove_members, upsert_members};

/// Discord's epoch (2015-01-01T00:00:00Z) in Unix milliseconds.
pub const DISCORD_EPOCH_MS: i64 = 1_420_070_400_000;

/// Channel types that are threads (announcement, public, private).
pub const THREAD_KINDS: [i16; 3] = [10, 11, 12];

/// Caps on stored text, in bytes. Discord's own limits are lower; these only
/// stop a misbehaving source from bloating rows.
pub const MAX_CONTENT_BYTES: usize = 16 * 1024;
pub const MAX_NAME_BYTES: usize = 512;
pub const MAX_TOPIC_BYTES: usize = 4 * 1024;

/// Creation time encoded in a snowflake.
pub fn snowflake_time(id: i64) -> DateTime<Utc> {
    let ms = (id >> 22).saturating_add(DISCORD_EPOCH_MS);
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// The smallest snowflake created at `t` (for "messages older than t" bounds).
pub fn snowflake_at(t: DateTime<Utc>) -> i64 {
    (t.timestamp_millis() - DISCORD_EPOCH_MS).max(0) << 22
}

/// Strips control characters (keeping newline and tab) and caps the size at a
/// char boundary. Rust strings are valid UTF-8 already; NUL would be refused by
/// PostgreSQL, the rest could mislead terminals and log viewers.
pub fn sanitize(s: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_bytes));
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            continue;
        }
        if out.len() + c.len_utf8() > max_bytes {
            break;
        }
        out.push(c);
    }
    out
}

pub(super) fn sanitize_opt(s: Option<&str>, max: usize) -> Option<String> {
    s.map(|s| sanitize(s, max))
}

/// Keeps the last item per key (one statement may not touch a row twice).
pub(super) fn last_by_key<T, K: std::hash::Hash + Eq>(
    items: Vec<T>,
    key: impl Fn(&T) -> K,
) -> Vec<T> {
    let mut idx: HashMap<K, usize> = HashMap::new();
    let mut out: Vec<Option<T>> = Vec::with_capacity(items.len());
    for it in items {
        let k = key(&it);
        if let Some(&i) = idx.get(&k) {
            out[i] = None;
        }
        idx.insert(k, out.len());
        out.push(Some(it));
    }
    out.into_iter().flatten().collect()
}

/// [`crate::Error::is_transient`], for callers that classify through this
/// module (the worker's batcher).
pub fn is_transient(err: &crate::Error) -> bool {
    err.is_transient()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
    }

    #[test]
    fn sanitize_strips_controls_and_caps() {
        assert_eq!(sanitize("a\u{0}b\nc\td\u{7}", 100), "ab\nc\td");
        assert_eq!(sanitize("héllo", 2), "h");
    }

    #[test]
    fn snowflake_roundtrip() {
        let at = t(1_700_000_000_000);
        assert_eq!(snowflake_time(snowflake_at(at)), at);
    }
}
