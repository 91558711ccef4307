//! `type Query`. Every field reads through the request's `observer_api`
//! transaction, so RLS decides; a row the viewer may not see is answered
//! exactly like a row that does not exist.

use async_graphql::{Context, Object, ID};
use observer_db::events;
use observer_db::viewer as db;

use super::request::{parse_id, request_db, RequestDb};
use super::types::{
    attach_revisions, cursor, ApiToken, Channel, Guild, Message, MessageConnection, MessageEdge,
    PageInfo, Viewer,
};
use crate::error::{bad_request, from_db, not_found, unauthenticated, GqlResult};

#[derive(Default)]
pub struct Query;

/// Validates `first` (docs/interfaces.md: at most 100).
fn page_size(first: i32) -> GqlResult<i64> {
    if !(1..=100).contains(&first) {
        return Err(bad_request("`first` must be between 1 and 100"));
    }
    Ok(i64::from(first))
}

/// Builds a connection from `limit + 1` fetched rows, preloading revisions
/// when the selection asks for them (one query for the page, not one per row).
async fn connection<T>(
    ctx: &Context<'_>,
    rdb: &RequestDb,
    mut rows: Vec<T>,
    limit: i64,
    event_cursor: Option<String>,
    into: impl Fn(T) -> (Message, String),
) -> GqlResult<MessageConnection> {
    let has_next_page = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    let (mut nodes, cursors): (Vec<Message>, Vec<String>) = rows.into_iter().map(into).unzip();
    let wants_revisions = ctx
        .look_ahead()
        .field("edges")
        .field("node")
        .field("revisions")
        .exists();
    if wants_revisions && !nodes.is_empty() {
        let keys: Vec<(i64, i64)> = nodes.iter().map(|m| m.key).collect();
        let mut tx = rdb.tx().await?;
        let revs = db::revisions(&mut tx, &keys).await.map_err(from_db)?;
        attach_revisions(&mut nodes, revs);
    }
    let end_cursor = cursors.last().cloned();
    Ok(MessageConnection {
        edges: nodes
            .into_iter()
            .zip(cursors)
            .map(|(node, cursor)| MessageEdge { cursor, node })
            .collect(),
        page_info: PageInfo {
            has_next_page,
            end_cursor,
        },
        event_cursor,
    })
}

#[Object(name = "MirrorQuery")]
impl Query {
    /// The logged-in user (or the user an API token acts for).
    async fn viewer(&self, ctx: &Context<'_>) -> GqlResult<Viewer> {
        let rdb = request_db(ctx)?;
        let me = rdb.viewer()?;
        let mut tx = rdb.tx().await?;
        let user = db::viewer_user(&mut tx, me.user_id)
            .await
            .map_err(from_db)?
            // A session or token whose user row is gone acts for nobody.
            .ok_or_else(unauthenticated)?;
        Ok(user.into())
    }

    /// Guilds where the viewer sees at least one channel.
    async fn guilds(&self, ctx: &Context<'_>) -> GqlResult<Vec<Guild>> {
        let rdb = request_db(ctx)?;
        let mut tx = rdb.tx().await?;
        let mut guilds: Vec<Guild> = db::guilds(&mut tx)
            .await
            .map_err(from_db)?
            .into_iter()
            .map(Guild::from)
            .collect();
        if ctx.look_ahead().field("channels").exists() && !guilds.is_empty() {
            let ids: Vec<i64> = guilds.iter().map(|g| g.guild_id).collect();
            let channels = db::channels_of_guilds(&mut tx, &ids)
                .await
                .map_err(from_db)?;
            let mut by_guild: std::collections::HashMap<i64, Vec<Channel>> = Default::default();
            for c in channels {
                by_guild.entry(c.guild_id).or_default().push(c.into());
            }
            for g in &mut guilds {
                g.preloaded_channels = Some(by_guild.remove(&g.guild_id).unwrap_or_default());
            }
        }
        Ok(guilds)
    }

    async fn guild(&self, ctx: &Context<'_>, id: ID) -> GqlResult<Option<Guild>> {
        let rdb = request_db(ctx)?;
        rdb.viewer()?;
        let Some(guild_id) = parse_id(&id) else {
            return Ok(None);
        };
        let mut tx = rdb.tx().await?;
        Ok(db::guild(&mut tx, guild_id)
            .await
            .map_err(from_db)?
            .map(Guild::from))
    }

    async fn channel(&self, ctx: &Context<'_>, id: ID) -> GqlResult<Option<Channel>> {
        let rdb = request_db(ctx)?;
        rdb.viewer()?;
        let Some(channel_id) = parse_id(&id) else {
            return Ok(None);
        };
        let mut tx = rdb.tx().await?;
        Ok(db::channel(&mut tx, channel_id)
            .await
            .map_err(from_db)?
            .map(Channel::from))
    }

    async fn message(&self, ctx: &Context<'_>, id: ID) -> GqlResult<Option<Message>> {
        let rdb = request_db(ctx)?;
        rdb.viewer()?;
        let Some(message_id) = parse_id(&id) else {
            return Ok(None);
        };
        let mut tx = rdb.tx().await?;
        Ok(db::message(&mut tx, message_id)
            .await
            .map_err(from_db)?
            .map(Message::from))
    }

    /// A channel's history, newest first; `after` (an `endCursor`) continues
    /// with older messages. Deleted messages appear as tombstones.
    #[graphql(
        complexity = "(first.unwrap_or(50).max(1) as usize).saturating_mul(child_complexity)"
    )]
    async fn messages(
        &self,
        ctx: &Context<'_>,
        channel_id: ID,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> GqlResult<MessageConnection> {
        let rdb = request_db(ctx)?;
        rdb.viewer()?;
        let limit = page_size(first.unwrap_or(50))?;
        let before = match after.as_deref() {
            None => None,
            Some(c) => Some(cursor::parse_history(c).ok_or_else(|| bad_request("invalid cursor"))?),
        };
        let Some(channel_id) = parse_id(&channel_id) else {
            return Err(not_found());
        };
        let (rows, head) = {
            let mut tx = rdb.tx().await?;
            if db::channel(&mut tx, channel_id)
                .await
                .map_err(from_db)?
                .is_none()
            {
                return Err(not_found());
            }
            // Before the page, in the same transaction: see head_for_viewer.
            let head = events::head_for_viewer(&mut tx).await.map_err(from_db)?;
            let rows = db::messages(&mut tx, channel_id, before, limit + 1)
                .await
                .map_err(from_db)?;
            (rows, head)
        };
        connection(ctx, rdb, rows, limit, Some(cursor::event(head)), |m| {
            let c = cursor::history(m.message_id);
            (Message::from(m), c)
        })
        .await
    }

    /// Full-text search (PostgreSQL `websearch_to_tsquery`, English) over the
    /// messages the viewer may read, best match first.
    #[graphql(
        complexity = "(first.unwrap_or(25).max(1) as usize).saturating_mul(child_complexity)"
    )]
    async fn search_messages(
        &self,
        ctx: &Context<'_>,
        query: String,
        guild_id: Option<ID>,
        #[graphql(default = 25)] first: Option<i32>,
        after: Option<String>,
    ) -> GqlResult<MessageConnection> {
        let rdb = request_db(ctx)?;
        rdb.viewer()?;
        let limit = page_size(first.unwrap_or(25))?;
        if query.len() > db::MAX_SEARCH_QUERY_BYTES {
            return Err(bad_request("search query too long"));
        }
        // PostgreSQL text cannot hold NUL; refuse it here rather than fail in the database.
        if query.contains('\0') {
            return Err(bad_request("search query contains a NUL character"));
        }
        let after = match after.as_deref() {
            None => None,
            Some(c) => Some(cursor::parse_search(c).ok_or_else(|| bad_request("invalid cursor"))?),
        };
        // An impossible id matches nothing, like a guild the viewer cannot see.
        let guild_id = guild_id.as_ref().map(|g| parse_id(g).unwrap_or(0));
        let rows = {
            let mut tx = rdb.tx().await?;
            db::search_messages(&mut tx, &query, guild_id, after, limit + 1)
                .await
                .map_err(from_db)?
        };
        connection(ctx, rdb, rows, limit, None, |h| {
            let c = cursor::search(h.rank, h.message.message_id);
            (Message::from(h.message), c)
        })
        .await
    }

    /// The viewer's API tokens (never their secrets), newest first.
    async fn api_tokens(&self, ctx: &Context<'_>) -> GqlResult<Vec<ApiToken>> {
        let rdb = request_db(ctx)?;
        let mut tx = rdb.tx().await?;
        Ok(db::api_tokens(&mut tx)
            .await
            .map_err(from_db)?
            .into_iter()
            .map(ApiToken::from)
            .collect())
    }
}
