//! What the bot itself may see, and the gateway traffic that follows from it.
//!
//! Discord gives a bot exactly what its member's permissions give it: no MESSAGE_* or thread
//! events from channels it cannot view (voice and stage: also CONNECT, without which the chat is
//! unreadable), 403 Missing Access from their REST routes, only viewable threads in GUILD_CREATE,
//! and a THREAD_LIST_SYNC for each channel that becomes viewable. Losing access sends nothing.
//!
//! Not modelled: per-channel CHANNEL_CREATE/UPDATE/DELETE filtering (Discord sends those for every
//! guild channel, as GUILD_CREATE lists every channel), THREAD_LIST_SYNC for access gained by
//! the passage of time (a timeout of the bot expiring), and SEND_MESSAGES checks on posting.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::model::ChannelKind;
use crate::payload;
use crate::permissions::ChannelView;
use crate::world::{GuildState, World};
use crate::SimError;

impl World {
    /// What the bot may do in one channel of `g` now (nothing in a guild it is not in).
    pub(crate) fn bot_access(&self, g: &GuildState, channel_id: u64) -> ChannelView {
        match g.channels.get(&channel_id) {
            Some(c) if g.bot_present => ChannelView::of(
                c.kind,
                self.user_channel_permissions(g, self.bot.id, channel_id),
            ),
            _ => ChannelView::default(),
        }
    }

    fn bot_may(&self, guild_id: u64, channel_id: u64, f: impl Fn(ChannelView) -> bool) -> bool {
        self.guilds
            .get(&guild_id)
            .is_some_and(|g| f(self.bot_access(g, channel_id)))
    }

    /// Every channel and thread whose history the bot can read (VIEW_CHANNEL and
    /// READ_MESSAGE_HISTORY, and CONNECT in voice and stage channels), over all its guilds.
    pub(crate) fn bot_readable_channels(&self) -> BTreeSet<u64> {
        self.guilds
            .values()
            .flat_map(|g| {
                self.user_channel_views(g, self.bot.id)
                    .into_iter()
                    .filter(|(_, v)| v.history)
                    .map(|(c, _)| c)
            })
            .collect()
    }

    /// Every channel and thread the bot can view (receives their channel events).
    pub(crate) fn bot_viewable_channels(&self) -> BTreeSet<u64> {
        self.guilds
            .keys()
            .flat_map(|g| self.bot_view_set(*g))
            .collect()
    }

    /// Dispatches a message event of `channel_id` only if the bot can read it live there
    /// (VIEW_CHANNEL; in voice and stage channels also CONNECT).
    pub(crate) fn dispatch_message(
        &mut self,
        guild_id: u64,
        channel_id: u64,
        t: &'static str,
        d: &Value,
    ) {
        if self.bot_may(guild_id, channel_id, |v| v.read) {
            self.dispatch(guild_id, t, d);
        }
    }

    /// Dispatches a thread event only if the bot can view the thread.
    pub(crate) fn dispatch_in(
        &mut self,
        guild_id: u64,
        channel_id: u64,
        t: &'static str,
        d: &Value,
    ) {
        if self.bot_may(guild_id, channel_id, |v| v.view) {
            self.dispatch(guild_id, t, d);
        }
    }

    fn bot_view_set(&self, guild_id: u64) -> BTreeSet<u64> {
        match self.guilds.get(&guild_id) {
            Some(g) => self
                .user_channel_views(g, self.bot.id)
                .into_keys()
                .collect(),
            None => BTreeSet::new(),
        }
    }

    /// Runs a mutation that may change what the bot can view, then sends THREAD_LIST_SYNC for
    /// the channels it gained (as Discord does), after the mutation's own event.
    pub(crate) fn syncing_access<R>(
        &mut self,
        guild_id: u64,
        f: impl FnOnce(&mut World) -> Result<R, SimError>,
    ) -> Result<R, SimError> {
        let before = self.bot_view_set(guild_id);
        let out = f(self)?;
        let after = self.bot_view_set(guild_id);
        let gained: Vec<u64> = after.difference(&before).copied().collect();
        if let Some(d) = self.thread_list_sync(guild_id, &gained) {
            self.dispatch(guild_id, "THREAD_LIST_SYNC", &d);
        }
        Ok(out)
    }

    /// THREAD_LIST_SYNC for the newly viewable non-thread channels among `gained`: their active
    /// threads the bot can view and the bot's own memberships in them. None if no such channel.
    fn thread_list_sync(&self, guild_id: u64, gained: &[u64]) -> Option<Value> {
        let g = self.guilds.get(&guild_id)?;
        let parents: Vec<u64> = gained
            .iter()
            .copied()
            .filter(|id| {
                g.channels
                    .get(id)
                    .is_some_and(|c| !c.kind.is_thread() && c.kind != ChannelKind::Category)
            })
            .collect();
        if parents.is_empty() {
            return None;
        }
        let now = self.peek_now();
        let threads: Vec<&crate::Channel> = g
            .channels
            .values()
            .filter(|c| {
                c.kind.is_thread()
                    && c.parent_id.is_some_and(|p| parents.contains(&p))
                    && !c.thread.as_ref().is_some_and(|t| t.archived)
                    && self.bot_access(g, c.id).view
            })
            .collect();
        let members: Vec<Value> = threads
            .iter()
            .filter(|c| {
                c.thread
                    .as_ref()
                    .is_some_and(|t| t.members.contains(&self.bot.id))
            })
            .map(|c| payload::thread_member(c.id, self.bot.id, &now))
            .collect();
        Some(json!({
            "guild_id": guild_id.to_string(),
            "channel_ids": parents.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "threads": threads.iter().map(|c| self.channel_json(guild_id, c)).collect::<Vec<_>>(),
            "members": members,
        }))
    }
}
