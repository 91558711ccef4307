//! The bot's own access to channels (migration 0031): what Discord answered the last time the
//! worker tried to read a channel. Written through the batcher as
//! [`crate::ingest::IngestOp::ChannelBotAccess`]; read by the API for guild managers.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::Result;

/// One observation of whether the bot can read a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotAccessObservation {
    pub guild_id: i64,
    pub channel_id: i64,
    pub readable: bool,
    pub observed_at: DateTime<Utc>,
}

/// Applies observations, newest per channel wins (an older one never overwrites a newer one).
/// A channel not mirrored yet is skipped: its GUILD_CREATE / CHANNEL_CREATE carries no answer,
/// and the next read attempt records one.
pub(crate) async fn apply(conn: &mut PgConnection, obs: &[&BotAccessObservation]) -> Result<()> {
    if obs.is_empty() {
        return Ok(());
    }
    let mut newest: std::collections::HashMap<(i64, i64), &BotAccessObservation> =
        std::collections::HashMap::new();
    for o in obs {
        let e = newest.entry((o.guild_id, o.channel_id)).or_insert(o);
        if o.observed_at >= e.observed_at {
            *e = o;
        }
    }
    let g: Vec<i64> = newest.values().map(|o| o.guild_id).collect();
    let c: Vec<i64> = newest.values().map(|o| o.channel_id).collect();
    let r: Vec<bool> = newest.values().map(|o| o.readable).collect();
    let t: Vec<DateTime<Utc>> = newest.values().map(|o| o.observed_at).collect();
    sqlx::query!(
        "update channels ch set bot_can_read = o.readable, bot_access_checked_at = o.at
         from unnest($1::int8[], $2::int8[], $3::bool[], $4::timestamptz[]) as o(g, c, readable, at)
         where ch.guild_id = o.g and ch.channel_id = o.c
           and (ch.bot_access_checked_at is null or ch.bot_access_checked_at <= o.at)
           and (ch.bot_can_read is distinct from o.readable
                or ch.bot_access_checked_at is distinct from o.at)",
        &g,
        &c,
        &r,
        &t as &[DateTime<Utc>],
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Channels of `guild_id` the bot was last refused (worker session).
pub async fn unreadable_channels(tx: &mut crate::WorkerTx, guild_id: i64) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar!(
        "select channel_id from channels where guild_id = $1 and bot_can_read = false",
        guild_id,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids)
}
