//! The API's trusted login path, run as `observer_auth` ([`AuthTx`]).
//!
//! Used before a viewer exists (OAuth callback, bearer-token lookup) and by the
//! background membership refresh. Membership rows written here come from
//! Discord itself (fetched with the viewer's own OAuth token), so the access
//! rule can rely on them exactly like on the worker's member events.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::ingest::{self, MemberInfo};
use crate::viewer::UserRow;
use crate::{AuthTx, Result};

/// A Discord user as `/users/@me` describes them.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub user_id: i64,
    pub username: String,
    pub global_name: Option<String>,
    pub avatar: Option<String>,
}

/// OAuth tokens of a user (kept only on the auth path).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OAuthTokenRow {
    pub user_id: i64,
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub scope: String,
}

/// A guild membership as `/users/@me/guilds/{id}/member` describes it.
#[derive(Debug, Clone)]
pub struct Membership {
    pub guild_id: i64,
    pub role_ids: Vec<i64>,
    pub nick: Option<String>,
    pub joined_at: Option<DateTime<Utc>>,
    pub communication_disabled_until: Option<DateTime<Utc>>,
}

/// What a bearer token resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenOwner {
    pub token_id: Uuid,
    pub user_id: i64,
}

/// Inserts or refreshes a user at login.
pub async fn upsert_user(tx: &mut AuthTx, user: &NewUser) -> Result<()> {
    sqlx::query!(
        "insert into users (user_id, username, global_name, avatar, last_login) \
         values ($1, $2, $3, $4, now()) \
         on conflict (user_id) do update set username = excluded.username, \
           global_name = excluded.global_name, avatar = excluded.avatar, last_login = now()",
        user.user_id,
        user.username,
        user.global_name,
        user.avatar,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn user(tx: &mut AuthTx, user_id: i64) -> Result<Option<UserRow>> {
    let row = sqlx::query_as!(
        UserRow,
        "select user_id, username, global_name, avatar from users where user_id = $1",
        user_id,
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row)
}

pub async fn store_oauth_token(tx: &mut AuthTx, token: &OAuthTokenRow) -> Result<()> {
    sqlx::query!(
        "insert into oauth_tokens (user_id, access_token, refresh_token, expires_at, scope, updated_at) \
         values ($1, $2, $3, $4, $5, now()) \
         on conflict (user_id) do update set access_token = excluded.access_token, \
           refresh_token = coalesce(excluded.refresh_token, oauth_tokens.refresh_token), \
           expires_at = excluded.expires_at, scope = excluded.scope, updated_at = now()",
        token.user_id,
        token.access_token,
        token.refresh_token,
        token.expires_at as DateTime<Utc>,
        token.scope,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn oauth_token(tx: &mut AuthTx, user_id: i64) -> Result<Option<OAuthTokenRow>> {
    let row = sqlx::query_as!(
        OAuthTokenRow,
        r#"select user_id, access_token, refresh_token,
             expires_at as "expires_at: DateTime<Utc>", scope
         from oauth_tokens where user_id = $1"#,
        user_id,
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row)
}

/// Drops a user's OAuth tokens (Discord rejected them for good).
pub async fn delete_oauth_token(tx: &mut AuthTx, user_id: i64) -> Result<()> {
    sqlx::query!("delete from oauth_tokens where user_id = $1", user_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Guilds the bot is currently in.
pub async fn bot_guild_ids(tx: &mut AuthTx) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar!(
        "select guild_id from guilds where removed_at is null order by guild_id"
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids)
}

/// Makes the stored memberships of `user_id` in the `checked` guilds equal to
/// `memberships`: upserts each one and deletes rows of checked guilds the user
/// is no longer in. Guilds outside `checked` are left alone (the worker owns
/// what we did not ask Discord about).
///
/// `observed_at` is when the fetch from Discord *started* (take it before the
/// first request). The snapshot goes through the worker's member write
/// ([`crate::ingest`]): anything the worker observed later (a role removed, the
/// member leaving) wins over it, in either commit order.
pub async fn replace_memberships(
    tx: &mut AuthTx,
    user_id: i64,
    checked: &[i64],
    memberships: &[Membership],
    observed_at: DateTime<Utc>,
) -> Result<()> {
    let rows: Vec<MemberInfo> = memberships
        .iter()
        .map(|m| MemberInfo {
            guild_id: m.guild_id,
            user_id,
            role_ids: m.role_ids.clone(),
            nick: m.nick.clone(),
            joined_at: m.joined_at,
            communication_disabled_until: m.communication_disabled_until,
            observed_at,
        })
        .collect();
    ingest::upsert_members(tx, &rows).await?;
    let member_of: Vec<i64> = memberships.iter().map(|m| m.guild_id).collect();
    // Only guilds with a stored row get a removal recorded: a tombstone for
    // every bot guild the user never joined would grow without bound.
    let gone: Vec<i64> = sqlx::query_scalar!(
        "select guild_id from members \
         where user_id = $1 and guild_id = any($2) and not (guild_id = any($3))",
        user_id,
        checked,
        &member_of,
    )
    .fetch_all(&mut **tx)
    .await?;
    for guild_id in gone {
        ingest::remove_members(tx, guild_id, &[user_id], observed_at, false).await?;
    }
    sqlx::query!(
        "update users set memberships_refreshed_at = now() where user_id = $1",
        user_id,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Users with stored OAuth tokens whose memberships were last refreshed before
/// `older_than` (or never), oldest first.
pub async fn users_due_for_refresh(
    tx: &mut AuthTx,
    older_than: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar!(
        "select u.user_id from users u join oauth_tokens t on t.user_id = u.user_id \
         where u.memberships_refreshed_at is null or u.memberships_refreshed_at < $1 \
         order by u.memberships_refreshed_at nulls first, u.user_id limit $2",
        older_than as DateTime<Utc>,
        limit,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids)
}

/// Resolves a bearer secret's SHA-256 to its owner, if the token is live, and
/// records its use.
/// Of the token hashes given, those of live (unrevoked) tokens, with the
/// user each acts as: one query for every connection a recheck covers.
pub async fn live_api_tokens(tx: &mut AuthTx, hashes: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, i64)>> {
    let rows = sqlx::query!(
        "select secret_hash, user_id from api_tokens \
         where secret_hash = any($1) and revoked_at is null",
        hashes,
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.secret_hash, r.user_id))
        .collect())
}

/// Of the login session ids given, those that still exist and have not
/// expired, in tower-sessions' table (the store reads it through the pool's
/// own role, and so does this).
pub async fn live_sessions(pool: &sqlx::PgPool, ids: &[String]) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar!(
        "select id from tower_sessions.session where id = any($1) and expiry_date > now()",
        ids,
    )
    .fetch_all(pool)
    .await?)
}

pub async fn api_token_owner(tx: &mut AuthTx, secret_hash: &[u8]) -> Result<Option<TokenOwner>> {
    let row = sqlx::query!(
        "select token_id, user_id from api_tokens where secret_hash = $1 and revoked_at is null",
        secret_hash,
    )
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let (token_id, user_id) = (row.token_id, row.user_id);
    // Coarse on purpose: one write a minute per token, not one per request.
    sqlx::query!(
        "update api_tokens set last_used_at = now() where token_id = $1 \
         and (last_used_at is null or last_used_at < now() - interval '1 minute')",
        token_id,
    )
    .execute(&mut **tx)
    .await?;
    Ok(Some(TokenOwner { token_id, user_id }))
}
