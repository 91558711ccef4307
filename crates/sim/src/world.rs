//! The simulated Discord state (guilds, messages, gateway sessions) and every mutation, each of
//! which dispatches the matching gateway event. Held behind one `std::sync::Mutex`; nothing here
//! awaits, so the lock is never held across an await point.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::model::{
    perms, snowflake_at, snowflake_time, Attachment, Channel, ChannelKind, Guild, Member,
    MessageState, Overwrite, PostOptions, Revision, Role, Scenario, ThreadInfo, User,
};
use crate::payload;
use crate::SimError;

pub(crate) const INTENT_GUILDS: u64 = 1 << 0;
pub(crate) const INTENT_GUILD_MEMBERS: u64 = 1 << 1;
pub(crate) const INTENT_GUILD_MESSAGES: u64 = 1 << 9;
pub(crate) const INTENT_MESSAGE_CONTENT: u64 = 1 << 15;

/// One dispatch, serialised once and shared by every session that receives it.
#[derive(Debug)]
pub(crate) struct Dispatch {
    pub t: &'static str,
    pub d: String,
    /// The same message event with content, attachments and embeds emptied, for sessions
    /// without the MESSAGE_CONTENT intent (built only when such a session exists).
    pub without_content: Option<Arc<Dispatch>>,
}

impl Dispatch {
    pub fn frame(&self, seq: u64) -> String {
        format!(
            "{{\"op\":0,\"s\":{seq},\"t\":\"{}\",\"d\":{}}}",
            self.t, self.d
        )
    }
}

/// What a connection's writer task is asked to do.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Dispatch(u64, Arc<Dispatch>),
    Raw(String),
    Close(u16, String),
    Drop,
}

#[derive(Debug)]
pub(crate) struct Conn {
    pub id: u64,
    pub tx: mpsc::UnboundedSender<Outgoing>,
}

#[derive(Debug)]
pub(crate) struct Session {
    pub shard: (u64, u64),
    pub intents: u64,
    pub seq: u64,
    pub buffer: VecDeque<(u64, Arc<Dispatch>)>,
    pub conn: Option<Conn>,
    /// When the last socket went away; sessions disconnected too long expire like Discord's.
    pub disconnected_at: Option<std::time::Instant>,
}

impl Session {
    pub fn owns(&self, guild_id: u64) -> bool {
        let (id, count) = self.shard;
        count == 0 || (guild_id >> 22) % count == id
    }

    pub fn push(&mut self, d: &Arc<Dispatch>, cap: usize) {
        self.seq += 1;
        self.buffer.push_back((self.seq, Arc::clone(d)));
        while self.buffer.len() > cap {
            self.buffer.pop_front();
        }
        if let Some(conn) = &self.conn {
            // A closed receiver means the socket is gone; the buffer still covers a resume.
            let _ = conn.tx.send(Outgoing::Dispatch(self.seq, Arc::clone(d)));
        }
    }

    pub fn send(&self, o: Outgoing) {
        if let Some(conn) = &self.conn {
            let _ = conn.tx.send(o);
        }
    }
}

#[derive(Debug)]
pub(crate) struct GuildState {
    pub id: u64,
    pub name: String,
    pub owner_id: u64,
    pub roles: BTreeMap<u64, Role>,
    pub channels: BTreeMap<u64, Channel>,
    pub members: BTreeMap<u64, Member>,
    pub bot_present: bool,
    /// Roles the bot's member gets when it joins (see `Guild::bot_roles`).
    pub bot_roles: Vec<u64>,
}

impl GuildState {
    fn to_model(&self) -> Guild {
        Guild {
            id: self.id,
            name: self.name.clone(),
            owner_id: self.owner_id,
            roles: self.roles.values().cloned().collect(),
            channels: self.channels.values().cloned().collect(),
            members: self.members.values().cloned().collect(),
            bot_present: self.bot_present,
            bot_roles: self.bot_roles.clone(),
        }
    }

    /// Guild-level permissions (owner, @everyone + roles, ADMINISTRATOR).
    pub fn base_permissions(&self, user_id: u64) -> u64 {
        if user_id == self.owner_id {
            return perms::ALL;
        }
        let mut p = self.roles.get(&self.id).map(|r| r.permissions).unwrap_or(0);
        if let Some(m) = self.members.get(&user_id) {
            for r in &m.roles {
                p |= self.roles.get(r).map(|r| r.permissions).unwrap_or(0);
            }
        }
        if p & perms::ADMINISTRATOR != 0 {
            perms::ALL
        } else {
            p
        }
    }
}

#[derive(Debug, Default)]
struct Chaos {
    dup_max: u32,
    window: usize,
    pending: Vec<(u64, u64, Arc<Dispatch>)>,
}

pub(crate) struct World {
    pub bot: User,
    pub users: BTreeMap<u64, User>,
    pub guilds: BTreeMap<u64, GuildState>,
    pub channel_guild: HashMap<u64, u64>,
    pub messages: HashMap<u64, BTreeMap<u64, MessageState>>,
    pub message_channel: HashMap<u64, u64>,
    pub sessions: BTreeMap<String, Session>,
    pub partial_updates: bool,
    pub resume_cap: usize,
    last_id: u64,
    virtual_ms: Option<i64>,
    chaos: Chaos,
    rng: ChaCha8Rng,
    cdn_base: String,
}

fn event_intent(t: &str) -> u64 {
    if t.starts_with("MESSAGE_") {
        INTENT_GUILD_MESSAGES
    } else if t.starts_with("GUILD_MEMBER") || t == "THREAD_MEMBERS_UPDATE" {
        INTENT_GUILD_MEMBERS
    } else {
        INTENT_GUILDS
    }
}

impl World {
    pub fn new(
        bot: User,
        seed: u64,
        virtual_ms: Option<i64>,
        resume_cap: usize,
        cdn_base: String,
    ) -> Self {
        let mut users = BTreeMap::new();
        users.insert(bot.id, bot.clone());
        World {
            bot,
            users,
            guilds: BTreeMap::new(),
            channel_guild: HashMap::new(),
            messages: HashMap::new(),
            message_channel: HashMap::new(),
            sessions: BTreeMap::new(),
            partial_updates: false,
            resume_cap,
            last_id: 0,
            virtual_ms,
            chaos: Chaos::default(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            cdn_base,
        }
    }

    /// Current time: the wall clock, or a virtual clock that advances one second per reading so
    /// runs driven by step count are reproducible.
    pub fn now(&mut self) -> DateTime<Utc> {
        match &mut self.virtual_ms {
            Some(ms) => {
                *ms += 1000;
                snowflake_time(snowflake_at(*ms))
            }
            None => Utc::now(),
        }
    }

    /// The current time without advancing the virtual clock (permission checks read it; they
    /// must not change the ids and timestamps a scenario produces).
    pub fn peek_now(&self) -> DateTime<Utc> {
        match self.virtual_ms {
            Some(ms) => snowflake_time(snowflake_at(ms)),
            None => Utc::now(),
        }
    }

    /// A fresh snowflake from the current time plus an increment (unique and ordered).
    pub fn next_id(&mut self) -> u64 {
        let now = self.now();
        let id = snowflake_at(now.timestamp_millis()).max(self.last_id + 1);
        self.last_id = id;
        id
    }

    // ----- dispatch -------------------------------------------------------------------------

    pub fn dispatch(&mut self, guild_id: u64, t: &'static str, d: &Value) {
        // A guild without the bot produces no gateway traffic (except the GUILD_DELETE itself).
        if t != "GUILD_DELETE" && self.guilds.get(&guild_id).is_some_and(|g| !g.bot_present) {
            return;
        }
        let without_content = self.content_stripped(t, d).map(|v| {
            Arc::new(Dispatch {
                t,
                d: v.to_string(),
                without_content: None,
            })
        });
        let d = Arc::new(Dispatch {
            t,
            d: d.to_string(),
            without_content,
        });
        if self.chaos.dup_max == 0 && self.chaos.window <= 1 {
            self.deliver(guild_id, event_intent(t), &d);
            return;
        }
        let copies = 1 + self.rng.gen_range(0..=self.chaos.dup_max);
        for _ in 0..copies {
            self.chaos
                .pending
                .push((guild_id, event_intent(t), Arc::clone(&d)));
        }
        if self.chaos.pending.len() >= self.chaos.window.max(1) {
            self.flush_chaos();
        }
    }

    pub fn flush_chaos(&mut self) {
        let mut pending = std::mem::take(&mut self.chaos.pending);
        pending.shuffle(&mut self.rng);
        for (g, i, d) in pending {
            self.deliver(g, i, &d);
        }
    }

    /// Forgets sessions that have had no socket for longer than `ttl` (they could no longer
    /// resume on Discord either), so long runs with many client restarts stay bounded.
    pub fn expire_sessions(&mut self, ttl: std::time::Duration) {
        self.sessions
            .retain(|_, s| s.conn.is_some() || s.disconnected_at.is_none_or(|t| t.elapsed() < ttl));
    }

    pub fn set_chaos(&mut self, dup_max: u32, window: usize) {
        self.flush_chaos();
        self.chaos.dup_max = dup_max;
        self.chaos.window = window;
    }

    fn deliver(&mut self, guild_id: u64, intent: u64, d: &Arc<Dispatch>) {
        let cap = self.resume_cap;
        for s in self.sessions.values_mut() {
            if s.owns(guild_id) && s.intents & intent != 0 {
                match &d.without_content {
                    Some(stripped) if s.intents & INTENT_MESSAGE_CONTENT == 0 => {
                        s.push(stripped, cap)
                    }
                    _ => s.push(d, cap),
                }
            }
        }
    }

    /// Discord empties message content for bots without MESSAGE_CONTENT, except in the bot's
    /// own messages. Only computed when some session lacks the intent, to keep dispatch cheap.
    fn content_stripped(&self, t: &str, d: &Value) -> Option<Value> {
        if t != "MESSAGE_CREATE" && t != "MESSAGE_UPDATE" {
            return None;
        }
        if !self
            .sessions
            .values()
            .any(|s| s.intents & INTENT_MESSAGE_CONTENT == 0)
        {
            return None;
        }
        let bot = self.bot.id.to_string();
        if d.pointer("/author/id").and_then(Value::as_str) == Some(bot.as_str()) {
            return None;
        }
        let mut v = d.clone();
        let obj = v.as_object_mut()?;
        for (k, empty) in [
            ("content", json!("")),
            ("attachments", json!([])),
            ("embeds", json!([])),
        ] {
            if obj.contains_key(k) {
                obj.insert(k.into(), empty);
            }
        }
        Some(v)
    }

    /// Sends `o` to every connected session (faults).
    pub fn broadcast(&self, mut make: impl FnMut() -> Outgoing) {
        for s in self.sessions.values() {
            s.send(make());
        }
    }

    /// Dispatches straight to one session (READY, GUILD_CREATE, RESUMED, malformed payloads).
    pub fn dispatch_to(&mut self, session_id: &str, t: &'static str, d: String) {
        let cap = self.resume_cap;
        if let Some(s) = self.sessions.get_mut(session_id) {
            s.push(
                &Arc::new(Dispatch {
                    t,
                    d,
                    without_content: None,
                }),
                cap,
            );
        }
    }

    // ----- lookups --------------------------------------------------------------------------

    pub fn guild(&self, id: u64) -> Result<&GuildState, SimError> {
        self.guilds.get(&id).ok_or(SimError::UnknownGuild(id))
    }

    fn guild_mut(&mut self, id: u64) -> Result<&mut GuildState, SimError> {
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

    fn bot_member(&self, g: &GuildState) -> Member {
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

    // ----- scenario -------------------------------------------------------------------------

    pub fn load(&mut self, s: Scenario) {
        for u in s.users {
            if u.id != self.bot.id {
                self.users.insert(u.id, u);
            }
        }
        for g in s.guilds {
            let mut roles: BTreeMap<u64, Role> = g.roles.into_iter().map(|r| (r.id, r)).collect();
            roles.entry(g.id).or_insert_with(|| Role {
                id: g.id,
                name: "@everyone".into(),
                permissions: perms::EVERYONE_DEFAULT,
                position: 0,
                color: 0,
                hoist: false,
                mentionable: false,
            });
            let mut channels = BTreeMap::new();
            for mut c in g.channels {
                if c.id == 0 {
                    c.id = self.next_id();
                }
                self.channel_guild.insert(c.id, g.id);
                channels.insert(c.id, c);
            }
            let was_present = self.guilds.get(&g.id).is_some_and(|old| old.bot_present);
            let mut state = GuildState {
                id: g.id,
                name: g.name,
                owner_id: g.owner_id,
                roles,
                channels,
                members: g.members.into_iter().map(|m| (m.user_id, m)).collect(),
                bot_present: g.bot_present,
                bot_roles: g.bot_roles,
            };
            // The bot is a real member of the guilds it is in: its permissions decide what it sees.
            if state.bot_present && !state.members.contains_key(&self.bot.id) {
                let m = self.bot_member(&state);
                state.members.insert(m.user_id, m);
            }
            self.last_id = self.last_id.max(g.id);
            let json = state.bot_present.then(|| self.guild_create_json(&state));
            self.guilds.insert(g.id, state);
            // Connected sessions learn about new guilds the way Discord tells them: GUILD_CREATE.
            if let Some(json) = json {
                self.dispatch(
                    g.id,
                    if was_present {
                        "GUILD_UPDATE"
                    } else {
                        "GUILD_CREATE"
                    },
                    &json,
                );
            }
        }
    }

    pub fn snapshot(&self) -> Scenario {
        Scenario {
            users: self
                .users
                .values()
                .filter(|u| u.id != self.bot.id)
                .cloned()
                .collect(),
            guilds: self.guilds.values().map(GuildState::to_model).collect(),
        }
    }

    // ----- messages -------------------------------------------------------------------------

    pub fn post_message(
        &mut self,
        channel_id: u64,
        author_id: u64,
        content: String,
        opts: PostOptions,
    ) -> Result<MessageState, SimError> {
        let (g, c) = self.channel(channel_id)?;
        if !c.kind.is_textual() {
            return Err(SimError::Invalid(format!(
                "channel {channel_id} cannot hold messages"
            )));
        }
        let guild_id = g.id;
        if author_id != self.bot.id && !g.members.contains_key(&author_id) {
            return Err(SimError::NotAMember {
                guild_id,
                user_id: author_id,
            });
        }
        let id = self.next_id();
        let created_at = snowflake_time(id);
        let mut attachments = Vec::new();
        for a in opts.attachments {
            let aid = self.next_id();
            attachments.push(Attachment {
                id: aid,
                url: format!(
                    "{}/attachments/{channel_id}/{aid}/{}",
                    self.cdn_base, a.filename
                ),
                filename: a.filename,
                size: a.size,
                content_type: a.content_type,
            });
        }
        let m = MessageState {
            id,
            guild_id,
            channel_id,
            author_id,
            revisions: vec![Revision {
                content: content.clone(),
                at: created_at,
            }],
            content,
            created_at,
            edited_at: None,
            deleted: false,
            deleted_at: None,
            attachments,
            reply_to: opts.reply_to,
        };
        let json = self.message_json(&m);
        self.messages
            .entry(channel_id)
            .or_default()
            .insert(id, m.clone());
        self.message_channel.insert(id, channel_id);
        self.dispatch_message(guild_id, channel_id, "MESSAGE_CREATE", &json);
        Ok(m)
    }

    fn message_mut(&mut self, id: u64) -> Result<&mut MessageState, SimError> {
        let ch = self
            .message_channel
            .get(&id)
            .ok_or(SimError::UnknownMessage(id))?;
        self.messages
            .get_mut(ch)
            .and_then(|m| m.get_mut(&id))
            .filter(|m| !m.deleted)
            .ok_or(SimError::UnknownMessage(id))
    }

    pub fn message(&self, id: u64) -> Option<&MessageState> {
        let ch = self.message_channel.get(&id)?;
        self.messages.get(ch)?.get(&id)
    }

    pub fn edit_message(&mut self, id: u64, content: String) -> Result<MessageState, SimError> {
        let now = self.now();
        let m = self.message_mut(id)?;
        m.content = content.clone();
        m.edited_at = Some(now);
        m.revisions.push(Revision { content, at: now });
        let m = m.clone();
        let json = if self.partial_updates {
            json!({"id": m.id.to_string(), "channel_id": m.channel_id.to_string(),
                   "guild_id": m.guild_id.to_string(), "content": m.content,
                   "edited_timestamp": payload::ts(&now)})
        } else {
            self.message_json(&m)
        };
        self.dispatch_message(m.guild_id, m.channel_id, "MESSAGE_UPDATE", &json);
        Ok(m)
    }

    pub fn delete_message(&mut self, id: u64) -> Result<(), SimError> {
        let now = self.now();
        let m = self.message_mut(id)?;
        m.deleted = true;
        m.deleted_at = Some(now);
        let (g, c) = (m.guild_id, m.channel_id);
        self.dispatch_message(
            g,
            c,
            "MESSAGE_DELETE",
            &json!({"id": id.to_string(), "channel_id": c.to_string(), "guild_id": g.to_string()}),
        );
        Ok(())
    }

    pub fn bulk_delete(&mut self, channel_id: u64, ids: &[u64]) -> Result<(), SimError> {
        let (g, _) = self.channel(channel_id)?;
        let guild_id = g.id;
        let now = self.now();
        let mut deleted = Vec::new();
        for id in ids {
            if self.message_channel.get(id) != Some(&channel_id) {
                continue;
            }
            if let Ok(m) = self.message_mut(*id) {
                m.deleted = true;
                m.deleted_at = Some(now);
                deleted.push(id.to_string());
            }
        }
        if deleted.is_empty() {
            return Err(SimError::Invalid(
                "no live messages of this channel among the ids".into(),
            ));
        }
        self.dispatch_message(
            guild_id,
            channel_id,
            "MESSAGE_DELETE_BULK",
            &json!({"ids": deleted, "channel_id": channel_id.to_string(), "guild_id": guild_id.to_string()}),
        );
        Ok(())
    }

    pub fn ground_truth(&self) -> Vec<MessageState> {
        let mut all: Vec<MessageState> = self
            .messages
            .values()
            .flat_map(|m| m.values().cloned())
            .collect();
        all.sort_by_key(|m| m.id);
        all
    }

    // ----- channels and threads -------------------------------------------------------------

    pub fn create_channel(&mut self, guild_id: u64, mut c: Channel) -> Result<Channel, SimError> {
        self.guild(guild_id)?;
        if c.kind.is_thread() {
            let parent = c
                .parent_id
                .ok_or_else(|| SimError::Invalid("a thread needs parent_id".into()))?;
            let (pg, _) = self.channel(parent)?;
            if pg.id != guild_id {
                return Err(SimError::UnknownChannel(parent));
            }
            if c.thread.is_none() {
                c.thread = Some(ThreadInfo {
                    owner_id: self.bot.id,
                    archived: false,
                    locked: false,
                    auto_archive_duration: 1440,
                    invitable: false,
                    members: vec![],
                    archive_timestamp: None,
                });
            }
        }
        if c.id == 0 || self.channel_guild.contains_key(&c.id) {
            c.id = self.next_id();
        }
        self.channel_guild.insert(c.id, guild_id);
        self.guild_mut(guild_id)?.channels.insert(c.id, c.clone());
        let mut json = self.channel_json(guild_id, &c);
        if c.kind.is_thread() {
            if let Some(obj) = json.as_object_mut() {
                obj.insert("newly_created".into(), Value::Bool(true));
            }
            self.dispatch_in(guild_id, c.id, "THREAD_CREATE", &json);
        } else {
            self.dispatch(guild_id, "CHANNEL_CREATE", &json);
        }
        Ok(c)
    }

    pub fn update_channel(&mut self, c: Channel) -> Result<Channel, SimError> {
        let (g, _) = self.channel(c.id)?;
        let guild_id = g.id;
        self.syncing_access(guild_id, |w| w.update_channel_inner(c))
    }

    fn update_channel_inner(&mut self, c: Channel) -> Result<Channel, SimError> {
        let (g, old) = self.channel(c.id)?;
        let guild_id = g.id;
        if old.kind.is_thread() != c.kind.is_thread() {
            return Err(SimError::Invalid(
                "cannot turn a channel into a thread or back".into(),
            ));
        }
        let was_archived = old.thread.as_ref().map(|t| t.archived);
        let mut c = c;
        if let Some(t) = c.thread.as_mut() {
            // Discord's archive_timestamp moves whenever the archived flag changes; the
            // archived-thread listings page by it.
            if was_archived != Some(t.archived) {
                t.archive_timestamp = Some(self.now());
            }
        }
        self.guild_mut(guild_id)?.channels.insert(c.id, c.clone());
        let json = self.channel_json(guild_id, &c);
        if c.kind.is_thread() {
            self.dispatch_in(guild_id, c.id, "THREAD_UPDATE", &json);
        } else {
            self.dispatch(guild_id, "CHANNEL_UPDATE", &json);
        }
        Ok(c)
    }

    pub fn delete_channel(&mut self, id: u64) -> Result<(), SimError> {
        let (g, c) = self.channel(id)?;
        let guild_id = g.id;
        let c = c.clone();
        let bot_saw_it = self.bot_access(g, id).view;
        self.guild_mut(guild_id)?.channels.remove(&id);
        self.channel_guild.remove(&id);
        if c.kind.is_thread() && !bot_saw_it {
            // Discord tells the bot nothing about threads it could not see.
        } else if c.kind.is_thread() {
            self.dispatch(
                guild_id,
                "THREAD_DELETE",
                &json!({"id": id.to_string(), "guild_id": guild_id.to_string(),
                        "parent_id": c.parent_id.unwrap_or(0).to_string(), "type": c.kind.code()}),
            );
        } else {
            let json = self.channel_json(guild_id, &c);
            self.dispatch(guild_id, "CHANNEL_DELETE", &json);
        }
        Ok(())
    }

    pub fn create_thread(
        &mut self,
        parent_id: u64,
        name: String,
        owner_id: u64,
        private: bool,
    ) -> Result<Channel, SimError> {
        let (g, parent) = self.channel(parent_id)?;
        let guild_id = g.id;
        if parent.kind.is_thread() || parent.kind == ChannelKind::Category {
            return Err(SimError::Invalid(
                "threads live under text, announcement or forum channels".into(),
            ));
        }
        let kind = match (parent.kind, private) {
            (ChannelKind::Announcement, _) => ChannelKind::AnnouncementThread,
            (_, true) => ChannelKind::PrivateThread,
            _ => ChannelKind::PublicThread,
        };
        let c = Channel {
            id: 0,
            kind,
            name,
            parent_id: Some(parent_id),
            position: 0,
            topic: None,
            overwrites: vec![],
            thread: Some(ThreadInfo {
                owner_id,
                archived: false,
                locked: false,
                auto_archive_duration: 1440,
                invitable: !private,
                members: vec![owner_id],
                archive_timestamp: None,
            }),
        };
        self.create_channel(guild_id, c)
    }

    pub fn set_overwrite(&mut self, channel_id: u64, o: Overwrite) -> Result<Channel, SimError> {
        let (_, c) = self.channel(channel_id)?;
        let mut c = c.clone();
        c.overwrites.retain(|x| x.id != o.id);
        c.overwrites.push(o);
        self.update_channel(c)
    }

    pub fn remove_overwrite(&mut self, channel_id: u64, id: u64) -> Result<Channel, SimError> {
        let (_, c) = self.channel(channel_id)?;
        let mut c = c.clone();
        c.overwrites.retain(|x| x.id != id);
        self.update_channel(c)
    }

    fn thread_members_event(
        &mut self,
        thread_id: u64,
        add: bool,
        user_id: u64,
    ) -> Result<(), SimError> {
        let (g, c) = self.channel(thread_id)?;
        let guild_id = g.id;
        let mut c = c.clone();
        let t = c
            .thread
            .as_mut()
            .ok_or_else(|| SimError::Invalid(format!("{thread_id} is not a thread")))?;
        if add {
            if !t.members.contains(&user_id) {
                t.members.push(user_id);
            }
        } else {
            t.members.retain(|u| *u != user_id);
        }
        let count = t.members.len();
        self.guild_mut(guild_id)?.channels.insert(thread_id, c);
        let now = self.now();
        let d = if add {
            json!({"id": thread_id.to_string(), "guild_id": guild_id.to_string(), "member_count": count.min(50),
                   "added_members": [payload::thread_member(thread_id, user_id, &now)]})
        } else {
            json!({"id": thread_id.to_string(), "guild_id": guild_id.to_string(), "member_count": count.min(50),
                   "removed_member_ids": [user_id.to_string()]})
        };
        self.dispatch_in(guild_id, thread_id, "THREAD_MEMBERS_UPDATE", &d);
        Ok(())
    }

    pub fn add_thread_member(&mut self, thread_id: u64, user_id: u64) -> Result<(), SimError> {
        self.thread_members_event(thread_id, true, user_id)
    }

    pub fn remove_thread_member(&mut self, thread_id: u64, user_id: u64) -> Result<(), SimError> {
        self.thread_members_event(thread_id, false, user_id)
    }

    // ----- roles and members ----------------------------------------------------------------

    pub fn create_role(&mut self, guild_id: u64, mut r: Role) -> Result<Role, SimError> {
        self.guild(guild_id)?;
        if r.id == 0 {
            r.id = self.next_id();
        }
        self.guild_mut(guild_id)?.roles.insert(r.id, r.clone());
        self.dispatch(
            guild_id,
            "GUILD_ROLE_CREATE",
            &json!({"guild_id": guild_id.to_string(), "role": payload::role(&r)}),
        );
        Ok(r)
    }

    pub fn update_role(&mut self, guild_id: u64, r: Role) -> Result<Role, SimError> {
        self.syncing_access(guild_id, |w| w.update_role_inner(guild_id, r))
    }

    fn update_role_inner(&mut self, guild_id: u64, r: Role) -> Result<Role, SimError> {
        let g = self.guild_mut(guild_id)?;
        if !g.roles.contains_key(&r.id) {
            return Err(SimError::UnknownRole(r.id));
        }
        g.roles.insert(r.id, r.clone());
        self.dispatch(
            guild_id,
            "GUILD_ROLE_UPDATE",
            &json!({"guild_id": guild_id.to_string(), "role": payload::role(&r)}),
        );
        Ok(r)
    }

    pub fn set_role_permissions(
        &mut self,
        guild_id: u64,
        role_id: u64,
        permissions: u64,
    ) -> Result<Role, SimError> {
        let mut r = self
            .guild(guild_id)?
            .roles
            .get(&role_id)
            .cloned()
            .ok_or(SimError::UnknownRole(role_id))?;
        r.permissions = permissions;
        self.update_role(guild_id, r)
    }

    pub fn delete_role(&mut self, guild_id: u64, role_id: u64) -> Result<(), SimError> {
        self.syncing_access(guild_id, |w| w.delete_role_inner(guild_id, role_id))
    }

    fn delete_role_inner(&mut self, guild_id: u64, role_id: u64) -> Result<(), SimError> {
        if role_id == guild_id {
            return Err(SimError::Invalid("@everyone cannot be deleted".into()));
        }
        let g = self.guild_mut(guild_id)?;
        g.roles
            .remove(&role_id)
            .ok_or(SimError::UnknownRole(role_id))?;
        // Discord strips the role from members without sending member updates.
        for m in g.members.values_mut() {
            m.roles.retain(|r| *r != role_id);
        }
        self.dispatch(
            guild_id,
            "GUILD_ROLE_DELETE",
            &json!({"guild_id": guild_id.to_string(), "role_id": role_id.to_string()}),
        );
        Ok(())
    }

    fn member_updated(&mut self, guild_id: u64, m: Member) -> Result<Member, SimError> {
        if m.user_id == self.bot.id {
            return self.syncing_access(guild_id, |w| w.member_updated_inner(guild_id, m));
        }
        self.member_updated_inner(guild_id, m)
    }

    fn member_updated_inner(&mut self, guild_id: u64, m: Member) -> Result<Member, SimError> {
        self.guild_mut(guild_id)?
            .members
            .insert(m.user_id, m.clone());
        let d = payload::member_update(&m, &self.user_json(m.user_id), guild_id);
        self.dispatch(guild_id, "GUILD_MEMBER_UPDATE", &d);
        Ok(m)
    }

    fn member(&self, guild_id: u64, user_id: u64) -> Result<Member, SimError> {
        self.guild(guild_id)?
            .members
            .get(&user_id)
            .cloned()
            .ok_or(SimError::NotAMember { guild_id, user_id })
    }

    pub fn set_member_roles(
        &mut self,
        guild_id: u64,
        user_id: u64,
        roles: Vec<u64>,
    ) -> Result<Member, SimError> {
        let g = self.guild(guild_id)?;
        if let Some(bad) = roles
            .iter()
            .find(|r| !g.roles.contains_key(r) || **r == guild_id)
        {
            return Err(SimError::UnknownRole(*bad));
        }
        let mut m = self.member(guild_id, user_id)?;
        m.roles = roles;
        self.member_updated(guild_id, m)
    }

    pub fn timeout_member(
        &mut self,
        guild_id: u64,
        user_id: u64,
        until: Option<DateTime<Utc>>,
    ) -> Result<Member, SimError> {
        let mut m = self.member(guild_id, user_id)?;
        m.communication_disabled_until = until;
        self.member_updated(guild_id, m)
    }

    pub fn add_member(
        &mut self,
        guild_id: u64,
        user_id: u64,
        roles: Vec<u64>,
    ) -> Result<Member, SimError> {
        if !self.users.contains_key(&user_id) {
            return Err(SimError::UnknownUser(user_id));
        }
        let joined_at = self.now();
        let g = self.guild_mut(guild_id)?;
        let m = Member {
            user_id,
            roles,
            nick: None,
            joined_at,
            communication_disabled_until: None,
        };
        g.members.insert(user_id, m.clone());
        let g = self.guild(guild_id)?;
        let d = self.member_json(g, &m);
        self.dispatch(guild_id, "GUILD_MEMBER_ADD", &d);
        Ok(m)
    }

    pub fn remove_member(&mut self, guild_id: u64, user_id: u64) -> Result<(), SimError> {
        let g = self.guild_mut(guild_id)?;
        g.members
            .remove(&user_id)
            .ok_or(SimError::NotAMember { guild_id, user_id })?;
        // Leaving a guild leaves its threads too (Discord sends no THREAD_MEMBERS_UPDATE for it).
        for c in g.channels.values_mut() {
            if let Some(t) = c.thread.as_mut() {
                t.members.retain(|u| *u != user_id);
            }
        }
        let user = self.user_json(user_id);
        self.dispatch(
            guild_id,
            "GUILD_MEMBER_REMOVE",
            &json!({"guild_id": guild_id.to_string(), "user": user}),
        );
        Ok(())
    }

    pub fn add_user(&mut self, u: User) {
        self.users.insert(u.id, u);
    }

    pub fn remove_bot_from_guild(&mut self, guild_id: u64) -> Result<(), SimError> {
        let g = self.guild_mut(guild_id)?;
        if !g.bot_present {
            return Ok(());
        }
        g.bot_present = false;
        // Absent `unavailable` is what tells a client it was removed, not an outage.
        self.dispatch(
            guild_id,
            "GUILD_DELETE",
            &json!({"id": guild_id.to_string()}),
        );
        Ok(())
    }

    pub fn add_bot_to_guild(&mut self, guild_id: u64) -> Result<(), SimError> {
        let bot = self.guilds.get(&guild_id).map(|g| self.bot_member(g));
        let g = self.guild_mut(guild_id)?;
        if g.bot_present {
            return Ok(());
        }
        g.bot_present = true;
        if let Some(m) = bot {
            g.members.entry(m.user_id).or_insert(m);
        }
        let json = self.guild_create_json(self.guild(guild_id)?);
        self.dispatch(guild_id, "GUILD_CREATE", &json);
        Ok(())
    }
}
