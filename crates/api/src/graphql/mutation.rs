//! `type Mutation`. Writes run in the request's `observer_api` transaction;
//! the policies decide whether they touch anything.

use async_graphql::{Context, Object, ID};
use observer_db::viewer as db;

use super::request::{parse_id, request_db};
use super::types::{Guild, NewApiToken};
use crate::error::{bad_request, from_db, not_found, GqlResult};
use crate::tokens;

#[derive(Default)]
pub struct Mutation;

/// Longest API token name accepted.
const MAX_TOKEN_NAME: usize = 100;
/// Most observer roles a guild may configure (Discord allows 250 roles).
const MAX_OBSERVER_ROLES: usize = 250;
/// Longest retention period accepted (100 years).
const MAX_RETENTION_DAYS: i32 = 36_500;

#[Object(name = "MirrorMutation")]
impl Mutation {
    /// Sets the roles that gate observing a guild (empty: no gate). Allowed
    /// for the owner, ADMINISTRATOR or MANAGE_GUILD; anyone else gets
    /// NOT_FOUND, like for a guild that does not exist.
    async fn set_observer_roles(
        &self,
        ctx: &Context<'_>,
        guild_id: ID,
        role_ids: Vec<ID>,
    ) -> GqlResult<Guild> {
        let rdb = request_db(ctx)?;
        rdb.viewer()?;
        let guild_id = parse_id(&guild_id).ok_or_else(not_found)?;
        if role_ids.len() > MAX_OBSERVER_ROLES {
            return Err(bad_request("too many roles"));
        }
        let mut roles = Vec::with_capacity(role_ids.len());
        for r in &role_ids {
            roles.push(parse_id(r).ok_or_else(|| bad_request("invalid role id"))?);
        }
        roles.sort_unstable();
        roles.dedup();
        let mut tx = rdb.tx().await?;
        if db::guild(&mut tx, guild_id)
            .await
            .map_err(from_db)?
            .is_none()
        {
            return Err(not_found());
        }
        let existing = db::existing_role_ids(&mut tx, guild_id, &roles)
            .await
            .map_err(from_db)?;
        if existing.len() != roles.len() {
            return Err(bad_request("unknown role id for this guild"));
        }
        db::set_observer_roles(&mut tx, guild_id, &roles)
            .await
            .map_err(from_db)?;
        match db::guild(&mut tx, guild_id).await.map_err(from_db)? {
            Some(g) => Ok(g.into()),
            None => {
                // The new gate would hide the guild from the very person
                // setting it: refuse rather than lock them out.
                rdb.mark_rollback();
                Err(bad_request(
                    "these observer roles would remove your own access to the guild",
                ))
            }
        }
    }

    /// Sets how many days messages are kept in a guild (null: forever); the
    /// worker purges older ones and stops backfilling past the horizon.
    /// Allowed for the owner, ADMINISTRATOR or MANAGE_GUILD; anyone else
    /// gets NOT_FOUND, like for a guild that does not exist.
    async fn set_retention_days(
        &self,
        ctx: &Context<'_>,
        guild_id: ID,
        days: Option<i32>,
    ) -> GqlResult<Guild> {
        let rdb = request_db(ctx)?;
        rdb.viewer()?;
        let guild_id = parse_id(&guild_id).ok_or_else(not_found)?;
        if days.is_some_and(|d| !(1..=MAX_RETENTION_DAYS).contains(&d)) {
            return Err(bad_request("days must be between 1 and 36500, or null"));
        }
        let mut tx = rdb.tx().await?;
        db::set_retention_days(&mut tx, guild_id, days)
            .await
            .map_err(from_db)?;
        db::guild(&mut tx, guild_id)
            .await
            .map_err(from_db)?
            .map(Guild::from)
            .ok_or_else(not_found)
    }

    /// Creates an API token acting as the viewer. The secret is returned once.
    async fn create_api_token(&self, ctx: &Context<'_>, name: String) -> GqlResult<NewApiToken> {
        let rdb = request_db(ctx)?;
        let me = rdb.viewer()?;
        let name = name.trim().to_owned();
        if name.is_empty()
            || name.chars().count() > MAX_TOKEN_NAME
            || name.chars().any(char::is_control)
        {
            return Err(bad_request("token name must be 1-100 printable characters"));
        }
        let secret = tokens::new_secret();
        let token_id = uuid::Uuid::new_v4();
        let mut tx = rdb.tx().await?;
        let row = db::create_api_token(
            &mut tx,
            me.user_id,
            token_id,
            &name,
            &tokens::hash_secret(&secret),
        )
        .await
        .map_err(from_db)?;
        Ok(NewApiToken {
            id: ID(row.token_id.to_string()),
            name: row.name,
            secret,
        })
    }

    /// Revokes one of the viewer's tokens; false if there was no such live token.
    async fn revoke_api_token(&self, ctx: &Context<'_>, id: ID) -> GqlResult<bool> {
        let rdb = request_db(ctx)?;
        rdb.viewer()?;
        let Ok(token_id) = uuid::Uuid::parse_str(id.as_str()) else {
            return Ok(false);
        };
        let mut tx = rdb.tx().await?;
        db::revoke_api_token(&mut tx, token_id)
            .await
            .map_err(from_db)
    }
}
