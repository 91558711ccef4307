//! `type Subscription`. Authentication comes from the WebSocket connection
//! ([`ConnectionViewer`]); events come from [`crate::replay`].

use async_graphql::{Context, Subscription as GqlSubscription, ID};
use futures::Stream;
use observer_db::Db;
use tokio::sync::watch;

use super::types::MessageEvent;
use super::{parse_id, Viewer};
use crate::error::{bad_request, internal, unauthenticated};
use crate::replay;

pub struct Subscription;

/// The viewer a WebSocket connection authenticated as (cookie at upgrade, or
/// the bearer token of `connection_init`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionViewer(pub Option<Viewer>);

/// Most channels one subscription may name.
const MAX_CHANNELS: usize = 500;

#[GqlSubscription]
impl Subscription {
    /// Message events of the channels the viewer may read (no scope = all of
    /// them), in log order. `after` (an event's `cursor`) first replays every
    /// later event, then continues live, with no gap and no duplicate.
    async fn message_events(
        &self,
        ctx: &Context<'_>,
        guild_id: Option<ID>,
        channel_ids: Option<Vec<ID>>,
        after: Option<String>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<MessageEvent>>> {
        let viewer = ctx
            .data_opt::<ConnectionViewer>()
            .and_then(|c| c.0)
            .ok_or_else(unauthenticated)?;
        let db = ctx
            .data_opt::<Db>()
            .cloned()
            .ok_or_else(|| internal(&std::io::Error::other("Db missing from connection data")))?;
        let wake = ctx.data_opt::<watch::Receiver<u64>>().cloned();
        if channel_ids.as_ref().is_some_and(|c| c.len() > MAX_CHANNELS) {
            return Err(bad_request("too many channelIds"));
        }
        // Impossible ids match nothing, like channels the viewer cannot see.
        let scope = replay::Scope {
            viewer_id: viewer.user_id,
            guild_id: guild_id.as_ref().map(|g| parse_id(g).unwrap_or(0)),
            channel_ids: channel_ids.map(|c| c.iter().map(|i| parse_id(i).unwrap_or(0)).collect()),
        };
        let start = replay::start_cursor(&db, viewer.user_id, after.as_deref()).await?;
        Ok(replay::events(db, scope, start, wake))
    }
}
