//! Reads (and the few writes) the API performs for a viewer.
//!
//! Every function takes a [`ViewerTx`]: the transaction runs as `observer_api`
//! with the viewer set, so row-level security decides what comes back. None of
//! these queries filters by access itself; a row the viewer may not see simply
//! does not exist here, which is what makes "not found" and "forbidden" the
//! same answer.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Error, Result, ViewerTx};

/// Longest search query accepted, in bytes: websearch parsing is linear, but
/// there is no reason to let a client make PostgreSQL chew on megabytes.
pub const MAX_SEARCH_QUERY_BYTES: usize = 512;

/// Most rows one page may return (docs/interfaces.md: `first` ≤ 100).
pub const MAX_PAGE: i64 = 100;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    pub user_id: i64,
    pub username: String,
    pub global_name: Option<String>,
    pub avatar: Option<String>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct GuildRow {
    pub guild_id: i64,
    pub name: String,
    pub icon: Option<String>,
    pub observer_role_ids: Vec<i64>,
    /// Messages older than this many days are purged (None: kept forever).
    pub retention_days: Option<i32>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChannelRow {
    pub guild_id: i64,
    pub channel_id: i64,
    pub kind: i16,
    pub name: String,
    pub parent_id: Option<i64>,
    pub position: i32,
    /// Whether the bot can read the channel (see [`crate::bot_access`]); only
    /// for viewers who may manage its guild, None for everyone else.
    pub bot_can_read: Option<bool>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRow {
    pub guild_id: i64,
    pub message_id: i64,
    pub channel_id: i64,
    pub author_id: Option<i64>,
    pub author_username: Option<String>,
    pub author_display_name: Option<String>,
    pub author_avatar: Option<String>,
    pub author_bot: bool,
    pub content: String,
    pub created_at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    /// Deleted while Discord reported it (live): when that was observed.
    pub deleted_at: Option<DateTime<Utc>>,
    /// Deleted while nobody listened: when reconciliation noticed it gone.
    pub deletion_detected_at: Option<DateTime<Utc>>,
    pub attachments: serde_json::Value,
    pub reply_to_id: Option<i64>,
}

/// A search hit: the message and its rank (part of the stable cursor).
#[derive(Debug, Clone)]
pub struct SearchHit {
    pub message: MessageRow,
    pub rank: f32,
}

/// One prior version of a message's content.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RevisionRow {
    pub guild_id: i64,
    pub message_id: i64,
    pub version_at: DateTime<Utc>,
    pub content: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiTokenRow {
    pub token_id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The viewer's own user row (RLS shows no other).
pub async fn viewer_user(tx: &mut ViewerTx, viewer_id: i64) -> Result<Option<UserRow>> {
    let row = sqlx::query_as!(
        UserRow,
        "select user_id, username, global_name, avatar from users where user_id = $1",
        viewer_id,
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row)
}

/// Guilds in which the viewer sees at least one channel (the policy's definition).
pub async fn guilds(tx: &mut ViewerTx) -> Result<Vec<GuildRow>> {
    let rows = sqlx::query_as!(
        GuildRow,
        "select guild_id, name, icon, observer_role_ids, \
           (extract(epoch from retention) / 86400)::int as retention_days from guilds \
         order by lower(name), guild_id",
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows)
}

pub async fn guild(tx: &mut ViewerTx, guild_id: i64) -> Result<Option<GuildRow>> {
    let row = sqlx::query_as!(
        GuildRow,
        "select guild_id, name, icon, observer_role_ids, \
           (extract(epoch from retention) / 86400)::int as retention_days from guilds \
         where guild_id = $1",
        guild_id,
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row)
}

/// Visible channels of the given guilds, ordered for display (position, then id).
pub async fn channels_of_guilds(tx: &mut ViewerTx, guild_ids: &[i64]) -> Result<Vec<ChannelRow>> {
    // `bot_can_read` only where the viewer may manage the guild (an InitPlan:
    // the manager set is computed once per statement); same list in `channel`.
    let rows = sqlx::query_as!(
        ChannelRow,
        "select guild_id, channel_id, kind, name, parent_id, position, \
           case when guild_id = any ((select access.manageable_guild_ids())::bigint[]) \
                then bot_can_read end as bot_can_read \
         from channels \
         where guild_id = any($1) order by guild_id, position, channel_id",
        guild_ids,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows)
}

pub async fn channel(tx: &mut ViewerTx, channel_id: i64) -> Result<Option<ChannelRow>> {
    let row = sqlx::query_as!(
        ChannelRow,
        "select guild_id, channel_id, kind, name, parent_id, position, \
           case when guild_id = any ((select access.manageable_guild_ids())::bigint[]) \
                then bot_can_read end as bot_can_read \
         from channels where channel_id = $1",
        channel_id,
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row)
}

pub async fn message(tx: &mut ViewerTx, message_id: i64) -> Result<Option<MessageRow>> {
    let row = sqlx::query_as!(
        MessageRow,
        r#"select m.guild_id, m.message_id, m.channel_id, m.author_id,
           m.author_username, m.author_display_name, m.author_avatar, m.author_bot, m.content,
           m.created_at as "created_at: DateTime<Utc>", m.edited_at as "edited_at: DateTime<Utc>",
           m.deleted_at as "deleted_at: DateTime<Utc>",
           m.deletion_detected_at as "deletion_detected_at: DateTime<Utc>", m.attachments,
           m.reply_to_id
         from messages m where m.message_id = $1"#,
        message_id,
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row)
}

/// One page of a channel's history, newest first, strictly older than `before`
/// (a message id) when given. Fetch `limit + 1` to learn whether more exist.
pub async fn messages(
    tx: &mut ViewerTx,
    channel_id: i64,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<MessageRow>> {
    if !(1..=MAX_PAGE + 1).contains(&limit) {
        return Err(Error::Invalid(format!("page size {limit} out of range")));
    }
    let rows = sqlx::query_as!(
        MessageRow,
        r#"select m.guild_id, m.message_id, m.channel_id, m.author_id,
           m.author_username, m.author_display_name, m.author_avatar, m.author_bot, m.content,
           m.created_at as "created_at: DateTime<Utc>", m.edited_at as "edited_at: DateTime<Utc>",
           m.deleted_at as "deleted_at: DateTime<Utc>",
           m.deletion_detected_at as "deletion_detected_at: DateTime<Utc>", m.attachments,
           m.reply_to_id
         from messages m
         where m.channel_id = $1 and ($2::bigint is null or m.message_id < $2)
         order by m.message_id desc limit $3"#,
        channel_id,
        before,
        limit,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows)
}

/// Full-text search over visible messages, best rank first; ties broken by
/// newest id so that `(rank, message_id)` is a stable cursor.
pub async fn search_messages(
    tx: &mut ViewerTx,
    query: &str,
    guild_id: Option<i64>,
    after: Option<(f32, i64)>,
    limit: i64,
) -> Result<Vec<SearchHit>> {
    if query.len() > MAX_SEARCH_QUERY_BYTES {
        return Err(Error::Invalid("search query too long".into()));
    }
    if !(1..=MAX_PAGE + 1).contains(&limit) {
        return Err(Error::Invalid(format!("page size {limit} out of range")));
    }
    // "rank!": ts_rank of a document and a query that are both present (the
    // generated `search` of a not-null `content`, the parsed `$1`) is a number.
    let rows = sqlx::query!(
        r#"select m.guild_id, m.message_id, m.channel_id, m.author_id,
             m.author_username, m.author_display_name, m.author_avatar, m.author_bot, m.content,
             m.created_at as "created_at: DateTime<Utc>", m.edited_at as "edited_at: DateTime<Utc>",
             m.deleted_at as "deleted_at: DateTime<Utc>",
             m.deletion_detected_at as "deletion_detected_at: DateTime<Utc>", m.attachments,
             m.reply_to_id, ts_rank(m.search, q) as "rank!"
         from messages m, websearch_to_tsquery('english', $1) q
         where m.search @@ q
           and ($2::bigint is null or m.guild_id = $2)
           and ($3::real is null or (ts_rank(m.search, q), m.message_id) < ($3::real, $4::bigint))
         order by "rank!" desc, m.message_id desc limit $5"#,
        query,
        guild_id,
        after.map(|(rank, _)| rank),
        after.map(|(_, id)| id),
        limit,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|h| SearchHit {
            message: MessageRow {
                guild_id: h.guild_id,
                message_id: h.message_id,
                channel_id: h.channel_id,
                author_id: h.author_id,
                author_username: h.author_username,
                author_display_name: h.author_display_name,
                author_avatar: h.author_avatar,
                author_bot: h.author_bot,
                content: h.content,
                created_at: h.created_at,
                edited_at: h.edited_at,
                deleted_at: h.deleted_at,
                deletion_detected_at: h.deletion_detected_at,
                attachments: h.attachments,
                reply_to_id: h.reply_to_id,
            },
            rank: h.rank,
        })
        .collect())
}

/// Prior versions of the given messages (`(guild_id, message_id)` pairs), oldest
/// first. The current version is excluded: a version is current when its time
/// equals the message's `coalesce(edited_at, created_at)`.
pub async fn revisions(tx: &mut ViewerTx, keys: &[(i64, i64)]) -> Result<Vec<RevisionRow>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let guild_ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
    let message_ids: Vec<i64> = keys.iter().map(|k| k.1).collect();
    let rows = sqlx::query_as!(
        RevisionRow,
        r#"select r.guild_id, r.message_id, r.version_at as "version_at: DateTime<Utc>", r.content
         from message_revisions r
         join messages m on m.guild_id = r.guild_id and m.message_id = r.message_id
         where (r.guild_id, r.message_id) in (select * from unnest($1::bigint[], $2::bigint[]))
           and r.version_at <> coalesce(m.edited_at, m.created_at)
         order by r.guild_id, r.message_id, r.version_at"#,
        &guild_ids,
        &message_ids,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows)
}

/// Role ids of `guild_id` among `role_ids` that exist (roles are readable for
/// visible guilds).
pub async fn existing_role_ids(
    tx: &mut ViewerTx,
    guild_id: i64,
    role_ids: &[i64],
) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar!(
        "select role_id from roles where guild_id = $1 and role_id = any($2)",
        guild_id,
        role_ids,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids)
}

/// Sets a guild's retention period in days (None: keep forever); the
/// worker's purge applies it. Same permission rule and answers as
/// [`set_observer_roles`].
pub async fn set_retention_days(tx: &mut ViewerTx, guild_id: i64, days: Option<i32>) -> Result<()> {
    let done = sqlx::query!(
        "update guilds set retention = make_interval(days => $2) where guild_id = $1",
        guild_id,
        days,
    )
    .execute(&mut **tx)
    .await;
    one_guild_setting(done)
}

/// Sets a guild's observer roles. The policy lets the update through only for
/// the owner, ADMINISTRATOR or MANAGE_GUILD; anything else (including a guild
/// the viewer cannot see) updates nothing and is reported as [`Error::NotFound`].
pub async fn set_observer_roles(tx: &mut ViewerTx, guild_id: i64, role_ids: &[i64]) -> Result<()> {
    let done = sqlx::query!(
        "update guilds set observer_role_ids = $2 where guild_id = $1",
        guild_id,
        role_ids,
    )
    .execute(&mut **tx)
    .await;
    one_guild_setting(done)
}

/// The outcome of a guild-settings update under the policy: one row, or
/// [`Error::NotFound`] for anything the viewer may not change — a permission
/// error must look exactly like "not found" so nothing leaks.
fn one_guild_setting(
    done: std::result::Result<sqlx::postgres::PgQueryResult, sqlx::Error>,
) -> Result<()> {
    match done {
        Ok(r) if r.rows_affected() == 1 => Ok(()),
        Ok(_) => Err(Error::NotFound),
        Err(sqlx::Error::Database(e))
            if e.code().as_deref() == Some("42501") || e.code().as_deref() == Some("42P17") =>
        {
            Err(Error::NotFound)
        }
        Err(e) => Err(e.into()),
    }
}

/// Creates an API token row for the viewer; the caller generated the secret and
/// passes only its SHA-256.
pub async fn create_api_token(
    tx: &mut ViewerTx,
    viewer_id: i64,
    token_id: Uuid,
    name: &str,
    secret_hash: &[u8],
) -> Result<ApiTokenRow> {
    let row = sqlx::query_as!(
        ApiTokenRow,
        "insert into api_tokens (token_id, user_id, name, secret_hash) values ($1, $2, $3, $4) \
         returning token_id, name, created_at as \"created_at: DateTime<Utc>\", \
           last_used_at as \"last_used_at: DateTime<Utc>\", \
           revoked_at as \"revoked_at: DateTime<Utc>\"",
        token_id,
        viewer_id,
        name,
        secret_hash,
    )
    .fetch_one(&mut **tx)
    .await?;
    Ok(row)
}

/// The viewer's tokens, newest first (never the hashes).
pub async fn api_tokens(tx: &mut ViewerTx) -> Result<Vec<ApiTokenRow>> {
    let rows = sqlx::query_as!(
        ApiTokenRow,
        r#"select token_id, name, created_at as "created_at: DateTime<Utc>",
             last_used_at as "last_used_at: DateTime<Utc>", revoked_at as "revoked_at: DateTime<Utc>"
         from api_tokens
         order by created_at desc, token_id"#,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows)
}

/// Revokes one of the viewer's tokens. `false` when there is no such live token.
pub async fn revoke_api_token(tx: &mut ViewerTx, token_id: Uuid) -> Result<bool> {
    let r = sqlx::query!(
        "update api_tokens set revoked_at = now() where token_id = $1 and revoked_at is null",
        token_id,
    )
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected() > 0)
}

/// Cheap liveness probe of the connection and role switch (for `/readyz`).
pub async fn ping(tx: &mut ViewerTx) -> Result<()> {
    sqlx::query_scalar!("select 1").fetch_one(&mut **tx).await?;
    Ok(())
}
