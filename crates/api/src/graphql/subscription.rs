//! `type Subscription`. Authentication comes from the WebSocket connection
//! ([`Connection`], which also re-checks it while a subscription runs and
//! caps how many run); events come from the process's fan-out hub
//! ([`crate::live::hub::Hub`], put in the connection data by the upgrade).

use std::sync::Arc;

use async_graphql::{Context, Subscription as GqlSubscription, ID};
use futures::{Stream, StreamExt};
use observer_db::events::Scope;

use super::request::parse_id;
use crate::error::{bad_request, internal, unauthenticated};
use crate::live::conn::Connection;
use crate::live::gql::{parse_cursor, to_error, Lane, LiveMessageEvent, SelectionKey};
use crate::live::hub::Hub;

pub struct Subscription;

/// Most channels one subscription may name.
const MAX_CHANNELS: usize = 500;

#[GqlSubscription]
impl Subscription {
    /// Message events of the channels the viewer may see (no scope = all of
    /// them), in log order; live events need VIEW_CHANNEL. `after` (an
    /// event's `cursor`) first replays every later event the viewer may read
    /// (history: READ_MESSAGE_HISTORY too), then continues live, with no gap
    /// and no duplicate. Ends with `FORBIDDEN` when nothing in the scope is
    /// visible (any more), with `SLOW_CONSUMER` (+ `lastCursor`) when the
    /// client does not keep up, with `UNAVAILABLE` (+ `lastCursor`) when the
    /// server cannot serve it.
    async fn message_events(
        &self,
        ctx: &Context<'_>,
        guild_id: Option<ID>,
        channel_ids: Option<Vec<ID>>,
        after: Option<String>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<LiveMessageEvent>>> {
        let conn = ctx
            .data_opt::<Arc<Connection>>()
            .cloned()
            .ok_or_else(unauthenticated)?;
        let viewer = conn.viewer.ok_or_else(unauthenticated)?;
        let hub = ctx
            .data_opt::<Hub>()
            .cloned()
            .ok_or_else(|| internal(&std::io::Error::other("Hub missing from connection data")))?;
        if channel_ids.as_ref().is_some_and(|c| c.len() > MAX_CHANNELS) {
            return Err(bad_request("too many channelIds"));
        }
        let after = match after.as_deref() {
            Some(a) => Some(parse_cursor(a).ok_or_else(|| bad_request("invalid cursor"))?),
            None => None,
        };
        // Impossible ids match nothing, like channels the viewer cannot see.
        let scope = Scope {
            guild_id: guild_id.as_ref().map(|g| parse_id(g).unwrap_or(0)),
            channel_ids: channel_ids.map(|c| c.iter().map(|i| parse_id(i).unwrap_or(0)).collect()),
        };
        // Counted from here: the hub's load and replay are the costly part.
        let permit = conn.admit(viewer.user_id).await?;
        let sub = hub
            .subscribe(viewer.user_id, scope, after)
            .await
            .map_err(|e| to_error(&e))?;
        let key = SelectionKey::of(ctx);
        let events = sub.into_stream().map(move |item| match item {
            Ok(event) => Ok(LiveMessageEvent { event, key }),
            Err(e) => Err(to_error(&e)),
        });
        // Behind the credential guard, so nothing reaches the lane after a
        // revocation either.
        Ok(Lane::attach(
            ctx.data_opt::<Arc<Lane>>(),
            conn.guard(events, permit),
            ctx.item.node.response_key().node.as_str(),
        ))
    }
}
