//! The plain data the worker hands over: one [`IngestOp`] per observation,
//! no serenity types, and what a batch did ([`BatchStats`]).

use chrono::{DateTime, Utc};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuildInfo {
    pub guild_id: i64,
    pub name: String,
    pub icon: Option<String>,
    pub owner_id: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overwrite {
    /// Role id (kind 0) or user id (kind 1).
    pub target_id: i64,
    pub kind: i16,
    pub allow: i64,
    pub deny: i64,
}

/// A channel or thread (Discord models threads as channels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    pub guild_id: i64,
    pub channel_id: i64,
    pub kind: i16,
    pub name: String,
    pub parent_id: Option<i64>,
    pub position: i32,
    pub topic: Option<String>,
    pub archived: bool,
    pub owner_id: Option<i64>,
    /// The complete set: stored overwrites not listed here are removed.
    pub overwrites: Vec<Overwrite>,
    /// Forum and media channels: the tags their posts may carry (the complete list).
    pub available_tags: Vec<ForumTag>,
    /// Forum and media posts: ids of the parent's tags applied to this thread.
    pub applied_tags: Vec<i64>,
    /// Threads: locked (only MANAGE_THREADS may unarchive it or post).
    pub locked: bool,
    /// Threads: `thread_metadata.create_timestamp` (absent before 2022-01-09).
    pub thread_created_at: Option<DateTime<Utc>>,
}

/// A tag a forum or media channel offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForumTag {
    pub id: i64,
    pub name: String,
    /// Only members with MANAGE_THREADS may apply or remove it.
    pub moderated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleInfo {
    pub guild_id: i64,
    pub role_id: i64,
    pub name: String,
    pub permissions: i64,
    pub position: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub guild_id: i64,
    pub user_id: i64,
    /// Never includes @everyone.
    pub role_ids: Vec<i64>,
    pub nick: Option<String>,
    pub joined_at: Option<DateTime<Utc>>,
    pub communication_disabled_until: Option<DateTime<Utc>>,
    /// When this was observed (gateway event received, REST fetch started).
    /// Applied only if newer than the stored row and than any recorded removal.
    pub observed_at: DateTime<Utc>,
}

/// Everything a GUILD_CREATE carries that we keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuildSnapshot {
    pub guild: GuildInfo,
    /// The complete role set: stored roles not listed are deleted.
    pub roles: Vec<RoleInfo>,
    /// The complete set of non-thread channels: stored ones not listed are deleted.
    pub channels: Vec<ChannelInfo>,
    /// Active threads (upserted; archived threads are not listed and are kept).
    pub threads: Vec<ChannelInfo>,
    /// Usually only some members (Discord sends a subset); upserted, never synced.
    pub members: Vec<MemberInfo>,
    /// When the GUILD_CREATE was received: orders it against GUILD_DELETE.
    pub observed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Author {
    pub id: i64,
    pub username: String,
    pub display_name: Option<String>,
    pub avatar: Option<String>,
    pub bot: bool,
}

/// A complete message (MESSAGE_CREATE or a history fetch).
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub guild_id: i64,
    pub channel_id: i64,
    pub message_id: i64,
    pub author: Author,
    pub content: String,
    pub created_at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    /// `[{id, filename, url, size, content_type}]`.
    pub attachments: Value,
    pub reply_to_id: Option<i64>,
}

/// A MESSAGE_UPDATE: every field may be missing and is merged on its own.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagePatch {
    pub guild_id: i64,
    pub channel_id: i64,
    pub message_id: i64,
    pub author: Option<Author>,
    pub content: Option<String>,
    pub edited_at: Option<DateTime<Utc>>,
    pub attachments: Option<Value>,
}

/// One thing the worker observed.
#[derive(Debug, Clone, PartialEq)]
pub enum IngestOp {
    /// GUILD_CREATE: the bot is (again) in the guild; full access snapshot.
    GuildCreate(Box<GuildSnapshot>),
    /// GUILD_UPDATE.
    GuildUpdate(GuildInfo),
    /// GUILD_DELETE without `unavailable`: the bot left or was removed.
    GuildRemoved {
        guild_id: i64,
        /// A GUILD_CREATE observed later wins, whichever is written first.
        observed_at: DateTime<Utc>,
    },
    /// GUILD_DELETE with `unavailable: true`: outage.
    GuildUnavailable {
        guild_id: i64,
    },
    /// CHANNEL_CREATE/UPDATE, THREAD_CREATE/UPDATE.
    ChannelUpsert(ChannelInfo),
    /// CHANNEL_DELETE, THREAD_DELETE (also drops the channel's threads).
    ChannelDelete {
        guild_id: i64,
        channel_id: i64,
    },
    /// THREAD_LIST_SYNC: active threads and the bot's thread memberships.
    ThreadListSync {
        guild_id: i64,
        threads: Vec<ChannelInfo>,
        members: Vec<(i64, i64)>,
        observed_at: DateTime<Utc>,
    },
    /// THREAD_MEMBERS_UPDATE.
    ThreadMembers {
        guild_id: i64,
        thread_id: i64,
        added: Vec<i64>,
        removed: Vec<i64>,
        observed_at: DateTime<Utc>,
    },
    /// A complete listing of a thread's members (REST), taken at `observed_at`:
    /// stored members not listed and observed earlier are removed.
    ThreadMembersSync {
        guild_id: i64,
        thread_id: i64,
        user_ids: Vec<i64>,
        observed_at: DateTime<Utc>,
    },
    /// A complete listing of a guild's members (REST), taken at `observed_at`:
    /// stored members not listed and observed earlier are removed.
    MembersSync {
        guild_id: i64,
        members: Vec<MemberInfo>,
        observed_at: DateTime<Utc>,
    },
    RoleUpsert(RoleInfo),
    RoleDelete {
        guild_id: i64,
        role_id: i64,
    },
    /// The complete role set of a guild (a REST re-read): missing roles are deleted.
    RolesSync {
        guild_id: i64,
        roles: Vec<RoleInfo>,
    },
    /// GUILD_MEMBER_ADD/UPDATE.
    MemberUpsert(MemberInfo),
    /// GUILD_MEMBER_REMOVE (or a re-read that found no member).
    MemberRemove {
        guild_id: i64,
        user_id: i64,
        /// When the removal was observed; a member write observed later wins.
        observed_at: DateTime<Utc>,
    },
    MessageCreate(Box<NewMessage>),
    MessageUpdate(Box<MessagePatch>),
    MessageDelete {
        guild_id: i64,
        channel_id: i64,
        message_id: i64,
    },
    MessageBulkDelete {
        guild_id: i64,
        channel_id: i64,
        message_ids: Vec<i64>,
    },
    /// What Discord answered when the bot tried to read a channel (see [`crate::bot_access`]).
    ChannelBotAccess(crate::bot_access::BotAccessObservation),
    /// Reconciliation after a gap found these stored messages missing from a
    /// contiguous range of Discord's history: deleted while nobody listened.
    MessagesGone {
        guild_id: i64,
        channel_id: i64,
        message_ids: Vec<i64>,
        /// When the absence was noticed (not when the deletion happened).
        detected_at: DateTime<Utc>,
    },
}

impl IngestOp {
    /// True for ops that change who may see what (the API refreshes on these).
    pub fn is_access(&self) -> bool {
        !matches!(
            self,
            IngestOp::MessageCreate(_)
                | IngestOp::MessageUpdate(_)
                | IngestOp::MessageDelete { .. }
                | IngestOp::MessageBulkDelete { .. }
                | IngestOp::MessagesGone { .. }
        )
    }
}

/// What a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub ops: usize,
    /// Distinct messages touched by the batch (after merging).
    pub messages: usize,
    /// Message rows inserted or changed.
    pub messages_changed: usize,
    pub events_created: usize,
    pub events_updated: usize,
    pub events_deleted: usize,
    pub revisions_offered: usize,
    pub access_ops: usize,
}

impl BatchStats {
    /// Nothing done yet for a batch of `ops`.
    pub(super) fn of(ops: &[IngestOp]) -> Self {
        Self {
            ops: ops.len(),
            ..Self::default()
        }
    }

    pub(super) fn count_event(&mut self, kind: i16) {
        match kind {
            1 => self.events_created += 1,
            2 => self.events_updated += 1,
            _ => self.events_deleted += 1,
        }
    }
}
