//! Lookups and the JSON views of the state (channels, members, messages, GUILD_CREATE).

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::model::{snowflake_time, Channel, Member, MessageState};
use crate::payload;
use crate::SimError;

use super::{GuildState, World};

impl World {
    pub fn guild(&self, id: u64) -> Result<&GuildState, SimError> {
        self.guilds.get(&id).ok_or(SimError::UnknownGuild(id))
    }

    pub(super) fn guild_mut(&mut self, id: u64) -> Result<&mut GuildState, SimError> {
        self.guilds.get_mut(&id).ok_or(SimError::UnknownGuild(id))
    }

    pub fn channel(&self, id: u64) -> Result<(&GuildState, &Channel), SimError> {
        let g = self
            .channel_guild
            .get(&id)
            .and_then(|g| self.guilds.get(g))
            .ok_or(SimError::UnknownChannel(id))?;
        let c = g.channels.get(&id).ok_or(SimError::UnknownChannel(id))?;
        Ok((g, c))
    }

    pub fn user_json(&self, id: u64) -> Value {
        match self.users.get(&id) {
            Some(u) => payload::user(u),
            None => payload::unknown_user(id),
        }
    }

    pub fn channel_json(&self, guild_id: u64, c: &Channel) -> Value {
        payload::channel(c, guild_id, &snowflake_time(c.id))
    }

    /// Discord's permissions of `user_id` (the bot included) in a channel of guild `g`, now.
    pub fn user_channel_permissions(&self, g: &GuildState, user_id: u64, channel_id: u64) -> u64 {
        let now = self.peek_now();
        if user_id == self.bot.id {
            return g.member_channel_permissions(&self.bot_member(g), channel_id, now);
        }
        g.channel_permissions(user_id, channel_id, now)
    }

    /// Every channel of guild `g` that `user_id` (the bot included) may see, with what they
    /// may read: the ground truth of what Discord's client would show them.
    pub fn user_channel_views(
        &self,
        g: &GuildState,
        user_id: u64,
    ) -> std::collections::BTreeMap<u64, crate::permissions::ChannelView> {
        let now = self.peek_now();
        let member = if user_id == self.bot.id {
            Some(self.bot_member(g))
        } else {
            g.members.get(&user_id).cloned()
        };
        match member {
            Some(m) if g.bot_present => g.member_channel_views(&m, now),
            _ => Default::default(),
        }
    }

    pub fn bot_member_of(&self, g: &GuildState) -> Member {
        self.bot_member(g)
    }

    pub(super) fn bot_member(&self, g: &GuildState) -> Member {
        g.members.get(&self.bot.id).cloned().unwrap_or(Member {
            user_id: self.bot.id,
            roles: g.bot_roles.clone(),
            nick: None,
            joined_at: snowflake_time(g.id),
            communication_disabled_until: None,
        })
    }

    pub fn member_json(&self, g: &GuildState, m: &Member) -> Value {
        payload::member(m, self.users.get(&m.user_id), g.id)
    }

    pub fn message_json(&self, m: &MessageState) -> Value {
        let member = self.guilds.get(&m.guild_id).and_then(|g| {
            g.members
                .get(&m.author_id)
                .cloned()
                .or_else(|| (m.author_id == self.bot.id).then(|| self.bot_member(g)))
                .map(|mem| payload::member(&mem, None, g.id))
        });
        payload::message(m, self.user_json(m.author_id), member)
    }

    /// When a thread member joined. The simulator keeps no join times; the thread's creation
    /// time is a real, stable stand-in.
    pub fn thread_join_time(c: &Channel) -> DateTime<Utc> {
        snowflake_time(c.id)
    }

    /// GUILD_CREATE as Discord sends it to a bot without GUILD_PRESENCES: `members` holds only
    /// the bot (the simulator has no voice states), `member_count` the real count, and each
    /// active thread carries `member` only for the bot's own membership. Who else is in a
    /// thread, or in the guild, has to be listed over REST.
    pub fn guild_create_json(&self, g: &GuildState) -> Value {
        let members = vec![self.member_json(g, &self.bot_member(g))];
        let member_count = g.members.len() + usize::from(!g.members.contains_key(&self.bot.id));
        let channels: Vec<Value> = g
            .channels
            .values()
            .filter(|c| !c.kind.is_thread())
            .map(|c| self.channel_json(g.id, c))
            .collect();
        // Every channel, but only the active threads the bot can view (as Discord does).
        let threads: Vec<Value> = g
            .channels
            .values()
            .filter(|c| c.kind.is_thread() && !c.thread.as_ref().is_some_and(|t| t.archived))
            .filter(|c| self.bot_access(g, c.id).view)
            .map(|c| {
                let mut v = self.channel_json(g.id, c);
                let joined = c
                    .thread
                    .as_ref()
                    .is_some_and(|t| t.members.contains(&self.bot.id));
                if let (true, Some(obj)) = (joined, v.as_object_mut()) {
                    obj.insert(
                        "member".into(),
                        payload::own_thread_member(&Self::thread_join_time(c)),
                    );
                }
                v
            })
            .collect();
        json!({
            "id": g.id.to_string(),
            "name": g.name,
            "icon": null,
            "splash": null,
            "discovery_splash": null,
            "owner_id": g.owner_id.to_string(),
            "afk_channel_id": null,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": g.roles.values().map(payload::role).collect::<Vec<_>>(),
            "emojis": [],
            "features": [],
            "mfa_level": 0,
            "application_id": null,
            "system_channel_id": null,
            "system_channel_flags": 0,
            "rules_channel_id": null,
            "vanity_url_code": null,
            "description": null,
            "banner": null,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "public_updates_channel_id": null,
            "nsfw_level": 0,
            "stickers": [],
            "premium_progress_bar_enabled": false,
            "joined_at": payload::ts(&snowflake_time(g.id)),
            "large": member_count > 250,
            "unavailable": false,
            "member_count": member_count,
            "voice_states": [],
            "members": members,
            "channels": channels,
            "threads": threads,
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        })
    }
}
