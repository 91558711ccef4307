//! The simulated Discord state (guilds, messages, gateway sessions) and every mutation, each of
//! which dispatches the matching gateway event. Held behind one `std::sync::Mutex`; nothing here
//! awaits, so the lock is never held across an await point.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::model::{
    perms, snowflake_at, snowflake_time, Channel, Guild, Member, MessageState, Role, Scenario, User,
};

pub(crate) const INTENT_GUILDS: u64 = 1 << 0;
pub(crate) const INTENT_GUILD_MEMBERS: u64 = 1 << 1;
pub(crate) const INTENT_GUILD_MESSAGES: u64 = 1 << 9;
pub(crate) const INTENT_MESSAGE_CONTENT: u64 = 1 << 15;

mod channels;
mod members;
mod messages;
mod sessions;
mod support;
mod views;

pub(crate) use sessions::{Conn, Dispatch, Outgoing, Session};
pub(crate) use support::to_ms;

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
    /// Every support conversation (forum post), recorded as it happens.
    pub support: crate::support::Journal,
    last_id: u64,
    virtual_ms: Option<i64>,
    chaos: Chaos,
    rng: ChaCha8Rng,
    cdn_base: String,
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
            support: Default::default(),
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
            let threads: Vec<u64> = state
                .channels
                .values()
                .filter(|c| c.kind.is_thread())
                .map(|c| c.id)
                .collect();
            self.guilds.insert(g.id, state);
            for t in threads {
                self.journal_thread(g.id, t);
            }
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
}
