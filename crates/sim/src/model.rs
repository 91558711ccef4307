//! Scenario and ground-truth types, serialised the way Discord does (snowflakes and permission
//! bitsets as strings, accepted as strings or numbers).

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// Discord's epoch (2015-01-01T00:00:00Z) in Unix milliseconds.
pub const DISCORD_EPOCH_MS: i64 = 1_420_070_400_000;

/// Permission bits used by the simulator and its generated scenarios.
pub mod perms {
    pub const CREATE_INSTANT_INVITE: u64 = 1 << 0;
    pub const KICK_MEMBERS: u64 = 1 << 1;
    pub const BAN_MEMBERS: u64 = 1 << 2;
    pub const ADMINISTRATOR: u64 = 1 << 3;
    pub const MANAGE_CHANNELS: u64 = 1 << 4;
    pub const MANAGE_GUILD: u64 = 1 << 5;
    pub const ADD_REACTIONS: u64 = 1 << 6;
    pub const VIEW_CHANNEL: u64 = 1 << 10;
    pub const SEND_MESSAGES: u64 = 1 << 11;
    pub const MANAGE_MESSAGES: u64 = 1 << 13;
    pub const EMBED_LINKS: u64 = 1 << 14;
    pub const ATTACH_FILES: u64 = 1 << 15;
    pub const READ_MESSAGE_HISTORY: u64 = 1 << 16;
    /// Voice and stage channels: joining, and (implicitly) reading their text chat.
    pub const CONNECT: u64 = 1 << 20;
    pub const MANAGE_ROLES: u64 = 1 << 28;
    pub const MANAGE_THREADS: u64 = 1 << 34;
    pub const CREATE_PUBLIC_THREADS: u64 = 1 << 35;
    pub const CREATE_PRIVATE_THREADS: u64 = 1 << 36;
    pub const SEND_MESSAGES_IN_THREADS: u64 = 1 << 38;
    pub const MODERATE_MEMBERS: u64 = 1 << 40;
    /// Every bit Discord defines today (through bit 52).
    pub const ALL: u64 = (1 << 53) - 1;
    /// What a fresh guild's @everyone role gets.
    pub const EVERYONE_DEFAULT: u64 = CREATE_INSTANT_INVITE
        | ADD_REACTIONS
        | VIEW_CHANNEL
        | SEND_MESSAGES
        | EMBED_LINKS
        | ATTACH_FILES
        | READ_MESSAGE_HISTORY
        | CONNECT
        | CREATE_PUBLIC_THREADS
        | SEND_MESSAGES_IN_THREADS;
}

/// serde helpers: Discord sends snowflakes and bitsets as strings; accept numbers too.
pub(crate) mod sf {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StrOrNum {
        S(String),
        N(u64),
    }

    fn parse<E: serde::de::Error>(v: StrOrNum) -> Result<u64, E> {
        match v {
            StrOrNum::N(n) => Ok(n),
            StrOrNum::S(s) => s
                .parse()
                .map_err(|_| E::custom(format!("invalid snowflake {s:?}"))),
        }
    }

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        parse(StrOrNum::deserialize(d)?)
    }

    pub mod opt {
        use super::*;
        pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.collect_str(v),
                None => s.serialize_none(),
            }
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            Option::<StrOrNum>::deserialize(d)?.map(parse).transpose()
        }
    }

    pub mod vec {
        use super::*;
        use serde::ser::SerializeSeq;
        pub fn serialize<S: Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(v.len()))?;
            for id in v {
                seq.serialize_element(&id.to_string())?;
            }
            seq.end()
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
            Vec::<StrOrNum>::deserialize(d)?
                .into_iter()
                .map(parse)
                .collect()
        }
    }
}

/// Turns a snowflake into its creation time.
pub fn snowflake_time(id: u64) -> DateTime<Utc> {
    let ms = (id >> 22) as i64 + DISCORD_EPOCH_MS;
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// The smallest snowflake created at `ms` (Unix milliseconds).
pub fn snowflake_at(ms: i64) -> u64 {
    ((ms - DISCORD_EPOCH_MS).max(0) as u64) << 22
}

fn default_true() -> bool {
    true
}

fn default_archive() -> u32 {
    1440
}

fn default_joined() -> DateTime<Utc> {
    snowflake_time(snowflake_at(1_704_067_200_000))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    #[serde(with = "sf")]
    pub id: u64,
    pub username: String,
    #[serde(default)]
    pub global_name: Option<String>,
    #[serde(default)]
    pub avatar: Option<String>,
    #[serde(default)]
    pub bot: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    #[serde(with = "sf")]
    pub id: u64,
    pub name: String,
    #[serde(with = "sf", default)]
    pub permissions: u64,
    #[serde(default)]
    pub position: i32,
    #[serde(default)]
    pub color: u32,
    #[serde(default)]
    pub hoist: bool,
    #[serde(default)]
    pub mentionable: bool,
}

/// Discord channel types the simulator models (numbers per the API docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    Text,
    Voice,
    Category,
    Announcement,
    AnnouncementThread,
    PublicThread,
    PrivateThread,
    Stage,
    Forum,
    Media,
}

impl ChannelKind {
    pub fn code(self) -> u8 {
        match self {
            ChannelKind::Text => 0,
            ChannelKind::Voice => 2,
            ChannelKind::Category => 4,
            ChannelKind::Announcement => 5,
            ChannelKind::AnnouncementThread => 10,
            ChannelKind::PublicThread => 11,
            ChannelKind::PrivateThread => 12,
            ChannelKind::Stage => 13,
            ChannelKind::Forum => 15,
            ChannelKind::Media => 16,
        }
    }

    pub fn is_thread(self) -> bool {
        matches!(
            self,
            ChannelKind::PublicThread
                | ChannelKind::PrivateThread
                | ChannelKind::AnnouncementThread
        )
    }

    /// Channels that hold messages directly (threads included).
    /// Forum and media channels: their posts are threads, and they offer tags.
    pub fn has_posts(self) -> bool {
        matches!(self, ChannelKind::Forum | ChannelKind::Media)
    }

    pub fn is_textual(self) -> bool {
        matches!(
            self,
            ChannelKind::Text | ChannelKind::Announcement | ChannelKind::Voice | ChannelKind::Stage
        ) || self.is_thread()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverwriteKind {
    Role,
    Member,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overwrite {
    /// A role id (the guild id for @everyone) or a user id.
    #[serde(with = "sf")]
    pub id: u64,
    pub kind: OverwriteKind,
    #[serde(with = "sf", default)]
    pub allow: u64,
    #[serde(with = "sf", default)]
    pub deny: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadInfo {
    #[serde(with = "sf")]
    pub owner_id: u64,
    #[serde(default)]
    pub archived: bool,
    #[serde(default)]
    pub locked: bool,
    #[serde(default = "default_archive")]
    pub auto_archive_duration: u32,
    #[serde(default)]
    pub invitable: bool,
    /// Thread members (user ids). What decides access to a private thread.
    #[serde(with = "sf::vec", default)]
    pub members: Vec<u64>,
    /// When `archived` last changed (Discord's `archive_timestamp`); `None` means at creation.
    /// Archived-thread listings page by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_timestamp: Option<DateTime<Utc>>,
    /// Forum and media posts: ids of the parent's `available_tags` applied to this thread
    /// (Discord allows 5).
    #[serde(with = "sf::vec", default, skip_serializing_if = "Vec::is_empty")]
    pub applied_tags: Vec<u64>,
}

/// A tag a forum or media channel offers its posts (Discord allows 20 per channel).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForumTag {
    #[serde(with = "sf")]
    pub id: u64,
    pub name: String,
    /// Only members with MANAGE_THREADS may apply or remove it.
    #[serde(default)]
    pub moderated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emoji_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    /// 0 asks the simulator to allocate an id.
    #[serde(with = "sf", default)]
    pub id: u64,
    pub kind: ChannelKind,
    pub name: String,
    /// Category for channels, parent channel for threads.
    #[serde(with = "sf::opt", default)]
    pub parent_id: Option<u64>,
    #[serde(default)]
    pub position: i32,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub overwrites: Vec<Overwrite>,
    /// Present exactly for threads.
    #[serde(default)]
    pub thread: Option<ThreadInfo>,
    /// Forum and media channels only: the tags their posts may carry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub available_tags: Vec<ForumTag>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    #[serde(with = "sf")]
    pub user_id: u64,
    /// Role ids, never including @everyone.
    #[serde(with = "sf::vec", default)]
    pub roles: Vec<u64>,
    #[serde(default)]
    pub nick: Option<String>,
    #[serde(default = "default_joined")]
    pub joined_at: DateTime<Utc>,
    #[serde(default)]
    pub communication_disabled_until: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guild {
    #[serde(with = "sf")]
    pub id: u64,
    pub name: String,
    #[serde(with = "sf")]
    pub owner_id: u64,
    /// Includes @everyone (id = guild id); added with default permissions if missing.
    #[serde(default)]
    pub roles: Vec<Role>,
    #[serde(default)]
    pub channels: Vec<Channel>,
    #[serde(default)]
    pub members: Vec<Member>,
    /// Whether the bot is installed (false after `remove_bot_from_guild`).
    #[serde(default = "default_true")]
    pub bot_present: bool,
    /// Roles of the bot's own member when `members` does not list the bot (its managed
    /// integration role, on Discord). Empty: the bot has only @everyone.
    #[serde(with = "sf::vec", default)]
    pub bot_roles: Vec<u64>,
}

/// Everything the simulated Discord knows about: users and guilds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scenario {
    #[serde(default)]
    pub users: Vec<User>,
    #[serde(default)]
    pub guilds: Vec<Guild>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub content: String,
    pub at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(with = "sf")]
    pub id: u64,
    pub filename: String,
    pub size: u32,
    pub url: String,
    #[serde(default)]
    pub content_type: Option<String>,
}

/// An attachment to add to a posted message; the simulator gives it an id and URL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentSpec {
    pub filename: String,
    #[serde(default)]
    pub size: u32,
    #[serde(default)]
    pub content_type: Option<String>,
}

/// Options for `post_message`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostOptions {
    #[serde(default)]
    pub attachments: Vec<AttachmentSpec>,
    /// Makes the message a reply (type 19 with `message_reference`).
    #[serde(with = "sf::opt", default)]
    pub reply_to: Option<u64>,
}

/// Ground truth for one message: its final state plus history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageState {
    #[serde(with = "sf")]
    pub id: u64,
    #[serde(with = "sf")]
    pub guild_id: u64,
    #[serde(with = "sf")]
    pub channel_id: u64,
    #[serde(with = "sf")]
    pub author_id: u64,
    /// Final content (kept after deletion).
    pub content: String,
    pub created_at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    pub deleted: bool,
    pub deleted_at: Option<DateTime<Utc>>,
    /// Every version in order: the original (at `created_at`) then each edit (at its time).
    pub revisions: Vec<Revision>,
    pub attachments: Vec<Attachment>,
    #[serde(with = "sf::opt", default)]
    pub reply_to: Option<u64>,
}
