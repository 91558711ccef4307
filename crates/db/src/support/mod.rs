//! The support queue (docs/support-queue.md): conversations derived from
//! forum posts at ingest, their settings, and the reads the API serves.
//!
//! Layout:
//! - `derive`: a conversation's state and metrics as a pure function of its
//!   stored messages, the staff set and the solved markers observed.
//! - `store`: [`refresh`]: recomputes the conversations a batch touched from
//!   what is stored, in the batch's transaction. Recomputation rather than
//!   increments is what makes replayed, duplicated and shuffled events end
//!   in the same state as in-order processing.
//! - `settings`: solved-tag rules, managers' reads and audited writes.
//! - `queue`: the API's reads of the queue and of one conversation, under
//!   row-level security; `stats`: telemetry (`supportStats`), exact over
//!   short windows, from `rollup`'s daily summaries over long ones.
//!
//! Two jobs run outside ingest batches, both in the worker:
//! [`recompute_next_guild`] after a settings change (with progress), and
//! [`sweep_stale`] at startup: live message creates are written by one
//! autocommit statement and recomputed right after it, so a crash between
//! the two leaves a conversation behind its messages until the sweep.

pub mod derive;
pub mod queue;
pub mod rollup;
pub mod settings;
pub mod stats;
mod store;

use std::collections::BTreeSet;

use crate::ingest::{IngestOp, THREAD_KINDS};
use crate::{Result, WorkerTx};

pub use store::{any_support_thread, refresh, refresh_checked};

/// Conversations recomputed per transaction by the background jobs.
const CHUNK: i64 = 500;

/// The (guild, channel) pairs whose conversation `ops` may change: channels
/// with message ops, and threads that were created, updated or deleted.
/// Role and member changes are not here: staff is decided at recomputation
/// (docs/support-queue.md, "Staff, per message").
pub fn touched(ops: &[IngestOp]) -> Vec<(i64, i64)> {
    let mut keys = BTreeSet::new();
    let thread = |c: &crate::ingest::ChannelInfo| THREAD_KINDS.contains(&c.kind);
    for op in ops {
        match op {
            IngestOp::MessageCreate(m) => {
                keys.insert((m.guild_id, m.channel_id));
            }
            IngestOp::MessageUpdate(m) => {
                keys.insert((m.guild_id, m.channel_id));
            }
            IngestOp::MessageDelete {
                guild_id,
                channel_id,
                ..
            }
            | IngestOp::MessageBulkDelete {
                guild_id,
                channel_id,
                ..
            }
            | IngestOp::MessagesGone {
                guild_id,
                channel_id,
                ..
            }
            | IngestOp::ChannelDelete {
                guild_id,
                channel_id,
            } => {
                keys.insert((*guild_id, *channel_id));
            }
            IngestOp::ChannelUpsert(c) if thread(c) => {
                keys.insert((c.guild_id, c.channel_id));
            }
            IngestOp::ThreadListSync { threads, .. } => {
                keys.extend(threads.iter().map(|c| (c.guild_id, c.channel_id)));
            }
            IngestOp::GuildCreate(s) => {
                keys.extend(s.threads.iter().map(|c| (c.guild_id, c.channel_id)));
            }
            _ => {}
        }
    }
    keys.into_iter().collect()
}

/// One chunk of the recomputation a settings change queued, for the guild
/// that has waited longest. Returns the guild and whether it is finished
/// (`None`: nothing queued). Each chunk is its own transaction; progress is
/// stored with it, and a change made meanwhile restarts the count.
pub async fn recompute_next_guild(tx: &mut WorkerTx) -> Result<Option<(i64, bool)>> {
    let Some((guild_id, requested_at)) = settings::next_recompute(tx).await? else {
        return Ok(None);
    };
    let done = sqlx::query_scalar!(
        "select recompute_done from support_settings where guild_id = $1",
        guild_id
    )
    .fetch_one(&mut **tx)
    .await?;
    // Every thread of the guild, plus every stored conversation (those whose
    // channel stopped being a support channel are removed), in a stable order
    // so that `done` is an offset into the same list each chunk.
    let keys = sqlx::query!(
        "select id as \"id!\" from ( \
           select channel_id as id from channels where guild_id = $1 and kind in (10, 11, 12) \
           union select conversation_id from conversations where guild_id = $1) k \
         order by id offset $2 limit $3",
        guild_id,
        i64::from(done),
        CHUNK,
    )
    .fetch_all(&mut **tx)
    .await?;
    let total = sqlx::query_scalar!(
        "select count(*) as \"n!\" from ( \
           select channel_id from channels where guild_id = $1 and kind in (10, 11, 12) \
           union select conversation_id from conversations where guild_id = $1) k",
        guild_id
    )
    .fetch_one(&mut **tx)
    .await?;
    let pairs: Vec<(i64, i64)> = keys.iter().map(|r| (guild_id, r.id)).collect();
    refresh(tx, &pairs).await?;
    let finished = (keys.len() as i64) < CHUNK;
    let done = i32::try_from(i64::from(done) + keys.len() as i64).unwrap_or(i32::MAX);
    sqlx::query!(
        "update support_settings set recompute_done = $2::int, \
           recompute_total = greatest($3::int, $2::int), \
           recompute_requested = not $4, \
           recomputed_at = case when $4 then now() else recomputed_at end \
         where guild_id = $1 and updated_at = $5",
        guild_id,
        done,
        i32::try_from(total).unwrap_or(i32::MAX),
        finished,
        requested_at as chrono::DateTime<chrono::Utc>,
    )
    .execute(&mut **tx)
    .await?;
    Ok(Some((guild_id, finished)))
}

/// Recomputes conversations whose thread has messages newer than the last
/// one folded in (see the module note), up to `limit` of them. Returns how
/// many it recomputed.
pub async fn sweep_stale(tx: &mut WorkerTx, limit: i64) -> Result<usize> {
    let rows = sqlx::query!(
        "select c.guild_id, c.conversation_id from conversations c \
         where exists (select 1 from messages m \
                       where m.channel_id = c.channel_id \
                         and m.message_id > coalesce(c.last_message_id, 0)) \
         limit $1",
        limit
    )
    .fetch_all(&mut **tx)
    .await?;
    let pairs: Vec<(i64, i64)> = rows
        .iter()
        .map(|r| (r.guild_id, r.conversation_id))
        .collect();
    refresh(tx, &pairs).await
}
