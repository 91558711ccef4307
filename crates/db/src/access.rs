//! The access rule of docs/access-rule.md in Rust: pure functions over plain data, no
//! SQL and no I/O. Its SQL twin is `access.viewer_channels()` in
//! policies/10_access.sql; a property test (tests/it/access_property.rs) holds the two
//! equal to an independent reference. Live fan-out uses this one to decide, in
//! memory, which subscriber may receive which event.
//!
//! Ids are `i64` as stored in PostgreSQL; permission sets are `u64` bitsets
//! (Discord's bits 0..52; convert a stored `bigint` with [`perms_from_db`]).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

/// Discord permission bits used by the rule (discord-protocol.md §4.3).
pub mod perms {
    pub const ADMINISTRATOR: u64 = 1 << 3;
    pub const MANAGE_GUILD: u64 = 1 << 5;
    pub const VIEW_CHANNEL: u64 = 1 << 10;
    pub const SEND_MESSAGES: u64 = 1 << 11;
    pub const READ_MESSAGE_HISTORY: u64 = 1 << 16;
    /// Voice and stage channels: joining, and implicitly reading their text chat.
    pub const CONNECT: u64 = 1 << 20;
    pub const MANAGE_THREADS: u64 = 1 << 34;
    /// Every permission (what owners and administrators get).
    pub const ALL: u64 = u64::MAX;
    /// What a timed-out member keeps (owner and administrators are exempt).
    pub const TIMEOUT_ALLOWLIST: u64 = VIEW_CHANNEL | READ_MESSAGE_HISTORY;
}

/// Discord channel types that matter to the rule.
pub mod kinds {
    pub const TEXT: i16 = 0;
    pub const VOICE: i16 = 2;
    pub const CATEGORY: i16 = 4;
    pub const ANNOUNCEMENT: i16 = 5;
    pub const ANNOUNCEMENT_THREAD: i16 = 10;
    pub const PUBLIC_THREAD: i16 = 11;
    pub const PRIVATE_THREAD: i16 = 12;
    pub const STAGE: i16 = 13;
    pub const FORUM: i16 = 15;
    pub const MEDIA: i16 = 16;

    /// Threads are computed on their parent channel.
    pub fn is_thread(kind: i16) -> bool {
        matches!(kind, ANNOUNCEMENT_THREAD | PUBLIC_THREAD | PRIVATE_THREAD)
    }

    /// Channels whose text chat needs CONNECT besides VIEW_CHANNEL.
    pub fn is_voice(kind: i16) -> bool {
        matches!(kind, VOICE | STAGE)
    }
}

/// A stored `bigint` permission set as bits (the sign bit is never used by Discord;
/// the cast keeps every bit as it is).
pub fn perms_from_db(value: i64) -> u64 {
    value as u64
}

/// Whom a permission overwrite targets (`permission_overwrites.kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OverwriteKind {
    /// kind 0; the @everyone overwrite is a role overwrite whose target is the guild id.
    Role,
    /// kind 1.
    Member,
}

impl OverwriteKind {
    /// From the stored `smallint`; anything else is not an overwrite the rule knows
    /// (the schema's check constraint allows only 0 and 1).
    pub fn from_db(kind: i16) -> Option<Self> {
        match kind {
            0 => Some(Self::Role),
            1 => Some(Self::Member),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overwrite {
    pub target_id: i64,
    pub kind: OverwriteKind,
    pub allow: u64,
    pub deny: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelData {
    pub channel_id: i64,
    /// Discord channel type ([`kinds`]).
    pub kind: i16,
    /// The category of a channel; the parent channel of a thread.
    pub parent_id: Option<i64>,
    /// The channel's own overwrites (a thread's are ignored: Discord computes on the parent).
    pub overwrites: Vec<Overwrite>,
}

/// Everything about one guild that decides access, independent of the viewer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuildAccessData {
    pub guild_id: i64,
    pub owner_id: i64,
    /// Tenant setting; empty = no observer gate.
    pub observer_role_ids: Vec<i64>,
    /// The bot left or was removed (`guilds.removed_at is not null`).
    pub removed: bool,
    /// role id → permissions; the @everyone role has id = guild id.
    pub roles: BTreeMap<i64, u64>,
    /// channel id → channel, threads included.
    pub channels: BTreeMap<i64, ChannelData>,
}

/// The viewer's membership in one guild (`members` row plus `thread_members` rows).
/// A viewer who is not a member has no `MemberData` at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberData {
    pub user_id: i64,
    /// Never includes @everyone (it is ignored if present).
    pub role_ids: Vec<i64>,
    pub communication_disabled_until: Option<DateTime<Utc>>,
    /// Threads the member belongs to.
    pub thread_ids: BTreeSet<i64>,
}

/// What a viewer may do with one channel: `view` to see the channel itself,
/// `read` for its messages live, `history` for its stored messages. Each implies
/// the one before; `read` differs from `view` only in voice and stage channels,
/// whose chat needs CONNECT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChannelAccess {
    pub view: bool,
    pub read: bool,
    pub history: bool,
}

impl ChannelAccess {
    pub const NONE: Self = Self {
        view: false,
        read: false,
        history: false,
    };
}

/// The viewer's standing in a guild once the guild-level steps passed.
struct Standing<'a> {
    member: &'a MemberData,
    /// Owner or ADMINISTRATOR: everything, exempt from gate and timeout.
    admin: bool,
    timed_out: bool,
    base: u64,
}

fn member_roles<'a>(
    guild: &GuildAccessData,
    member: &'a MemberData,
) -> impl Iterator<Item = i64> + 'a {
    let guild_id = guild.guild_id;
    member
        .role_ids
        .iter()
        .copied()
        .filter(move |r| *r != guild_id)
}

/// Guild-level permissions: owner → all; @everyone OR member roles; ADMINISTRATOR → all.
pub fn guild_permissions(guild: &GuildAccessData, member: &MemberData) -> u64 {
    if member.user_id == guild.owner_id {
        return perms::ALL;
    }
    let everyone = guild.roles.get(&guild.guild_id).copied().unwrap_or(0);
    let p = member_roles(guild, member)
        .filter_map(|r| guild.roles.get(&r).copied())
        .fold(everyone, |acc, p| acc | p);
    if p & perms::ADMINISTRATOR != 0 {
        perms::ALL
    } else {
        p
    }
}

fn timed_out(member: &MemberData, now: DateTime<Utc>) -> bool {
    member.communication_disabled_until.is_some_and(|t| t > now)
}

/// Rule steps 1–3: guild present, viewer a member, observer gate.
fn standing<'a>(
    guild: &GuildAccessData,
    member: Option<&'a MemberData>,
    now: DateTime<Utc>,
) -> Option<Standing<'a>> {
    let member = member?;
    if guild.removed {
        return None;
    }
    let base = guild_permissions(guild, member);
    let admin = base & perms::ADMINISTRATOR != 0;
    let gate = admin
        || guild.observer_role_ids.is_empty()
        || guild
            .observer_role_ids
            .iter()
            .any(|o| *o == guild.guild_id || member_roles(guild, member).any(|r| r == *o));
    gate.then(|| Standing {
        member,
        admin,
        timed_out: timed_out(member, now),
        base,
    })
}

/// Rule step 4 on a channel's own overwrites, with the timeout mask applied.
fn own_permissions(guild: &GuildAccessData, s: &Standing<'_>, channel: &ChannelData) -> u64 {
    if s.admin {
        return perms::ALL;
    }
    let mut p = s.base;
    let (mut role_allow, mut role_deny) = (0u64, 0u64);
    let (mut member_allow, mut member_deny) = (0u64, 0u64);
    for ow in &channel.overwrites {
        match ow.kind {
            OverwriteKind::Role if ow.target_id == guild.guild_id => {
                // @everyone first; several (impossible in Discord) would all apply.
                p = (p & !ow.deny) | ow.allow;
            }
            OverwriteKind::Role => {
                if member_roles(guild, s.member).any(|r| r == ow.target_id) {
                    role_allow |= ow.allow;
                    role_deny |= ow.deny;
                }
            }
            OverwriteKind::Member => {
                if ow.target_id == s.member.user_id {
                    member_allow |= ow.allow;
                    member_deny |= ow.deny;
                }
            }
        }
    }
    p = (p & !role_deny) | role_allow;
    p = (p & !member_deny) | member_allow;
    if s.timed_out {
        p &= perms::TIMEOUT_ALLOWLIST;
    }
    // Implicit deny: in voice and stage channels, lacking CONNECT leaves nothing
    // but VIEW_CHANNEL (so a timeout, which removes CONNECT, locks their chat).
    if kinds::is_voice(channel.kind) && p & perms::CONNECT == 0 {
        p &= perms::VIEW_CHANNEL;
    }
    p
}

fn access_in(guild: &GuildAccessData, s: &Standing<'_>, channel: &ChannelData) -> ChannelAccess {
    let p = if kinds::is_thread(channel.kind) {
        let Some(parent) = channel.parent_id.and_then(|id| guild.channels.get(&id)) else {
            return ChannelAccess::NONE;
        };
        let p = own_permissions(guild, s, parent);
        if channel.kind == kinds::PRIVATE_THREAD
            && p & perms::MANAGE_THREADS == 0
            && !s.member.thread_ids.contains(&channel.channel_id)
        {
            return ChannelAccess::NONE;
        }
        p
    } else {
        own_permissions(guild, s, channel)
    };
    let view = p & perms::VIEW_CHANNEL != 0;
    let read = view && (!kinds::is_voice(channel.kind) || p & perms::CONNECT != 0);
    ChannelAccess {
        view,
        read,
        history: read && p & perms::READ_MESSAGE_HISTORY != 0,
    }
}

/// What `member` (None: not a member of this guild) may do in `channel_id` at `now`.
/// An unknown channel answers [`ChannelAccess::NONE`].
pub fn channel_access(
    guild: &GuildAccessData,
    member: Option<&MemberData>,
    channel_id: i64,
    now: DateTime<Utc>,
) -> ChannelAccess {
    let Some(s) = standing(guild, member, now) else {
        return ChannelAccess::NONE;
    };
    match guild.channels.get(&channel_id) {
        Some(channel) => access_in(guild, &s, channel),
        None => ChannelAccess::NONE,
    }
}

/// Every channel of the guild that `member` may see, with whether its messages
/// are readable live and as history — the same set `access.viewer_channels()`
/// returns for this guild.
pub fn visible_channels(
    guild: &GuildAccessData,
    member: Option<&MemberData>,
    now: DateTime<Utc>,
) -> BTreeMap<i64, ChannelAccess> {
    let Some(s) = standing(guild, member, now) else {
        return BTreeMap::new();
    };
    guild
        .channels
        .values()
        .filter_map(|c| {
            let a = access_in(guild, &s, c);
            a.view.then_some((c.channel_id, a))
        })
        .collect()
}

/// Whether `member` may change the guild's settings (observer roles, retention):
/// owner, ADMINISTRATOR, or MANAGE_GUILD not suspended by a timeout — the rule of
/// `access.manageable_guild_ids()`. (The database also requires the guild to be
/// visible to the viewer, since an UPDATE must first select the row.)
pub fn can_manage_guild(
    guild: &GuildAccessData,
    member: Option<&MemberData>,
    now: DateTime<Utc>,
) -> bool {
    let Some(member) = member else {
        return false;
    };
    if guild.removed {
        return false;
    }
    let p = guild_permissions(guild, member);
    p & perms::ADMINISTRATOR != 0 || (p & perms::MANAGE_GUILD != 0 && !timed_out(member, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guild() -> GuildAccessData {
        let mut g = GuildAccessData {
            guild_id: 1,
            owner_id: 100,
            ..Default::default()
        };
        g.roles
            .insert(1, perms::VIEW_CHANNEL | perms::READ_MESSAGE_HISTORY);
        g.roles.insert(2, perms::MANAGE_THREADS);
        g.channels.insert(
            10,
            ChannelData {
                channel_id: 10,
                kind: kinds::TEXT,
                parent_id: None,
                overwrites: vec![],
            },
        );
        g.channels.insert(
            11,
            ChannelData {
                channel_id: 11,
                kind: kinds::PRIVATE_THREAD,
                parent_id: Some(10),
                overwrites: vec![],
            },
        );
        g
    }

    fn member(roles: &[i64]) -> MemberData {
        MemberData {
            user_id: 200,
            role_ids: roles.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn private_thread_needs_membership_or_manage_threads() {
        let g = guild();
        let now = Utc::now();
        let plain = member(&[]);
        assert!(channel_access(&g, Some(&plain), 10, now).history);
        assert!(!channel_access(&g, Some(&plain), 11, now).view);
        let manager = member(&[2]);
        assert!(channel_access(&g, Some(&manager), 11, now).view);
        let mut timed_out_manager = member(&[2]);
        timed_out_manager.communication_disabled_until = Some(now + chrono::Duration::hours(1));
        assert!(!channel_access(&g, Some(&timed_out_manager), 11, now).view);
        let mut in_thread = member(&[]);
        in_thread.thread_ids.insert(11);
        assert!(channel_access(&g, Some(&in_thread), 11, now).view);
    }

    #[test]
    fn voice_chat_needs_connect_and_a_timeout_locks_it() {
        let mut g = guild();
        let now = Utc::now();
        g.roles.insert(
            1,
            perms::VIEW_CHANNEL | perms::READ_MESSAGE_HISTORY | perms::CONNECT,
        );
        for (id, kind) in [(20, kinds::VOICE), (21, kinds::STAGE)] {
            g.channels.insert(
                id,
                ChannelData {
                    channel_id: id,
                    kind,
                    parent_id: None,
                    overwrites: vec![Overwrite {
                        target_id: 1,
                        kind: OverwriteKind::Role,
                        allow: 0,
                        deny: if id == 20 { perms::CONNECT } else { 0 },
                    }],
                },
            );
        }
        let plain = member(&[]);
        let locked = channel_access(&g, Some(&plain), 20, now);
        assert_eq!(
            locked,
            ChannelAccess {
                view: true,
                read: false,
                history: false
            }
        );
        let open = channel_access(&g, Some(&plain), 21, now);
        assert!(open.read && open.history);
        let mut timed_out = member(&[]);
        timed_out.communication_disabled_until = Some(now + chrono::Duration::hours(1));
        let stage = channel_access(&g, Some(&timed_out), 21, now);
        assert!(stage.view && !stage.read && !stage.history);
        // Text channels keep their history under a timeout.
        assert!(channel_access(&g, Some(&timed_out), 10, now).history);
        // The owner is exempt.
        let owner = MemberData {
            user_id: 100,
            ..Default::default()
        };
        assert!(channel_access(&g, Some(&owner), 20, now).history);
    }

    #[test]
    fn gate_and_membership() {
        let mut g = guild();
        let now = Utc::now();
        assert_eq!(channel_access(&g, None, 10, now), ChannelAccess::NONE);
        g.observer_role_ids = vec![2];
        assert!(visible_channels(&g, Some(&member(&[])), now).is_empty());
        assert_eq!(visible_channels(&g, Some(&member(&[2])), now).len(), 2);
        g.removed = true;
        assert!(visible_channels(&g, Some(&member(&[2])), now).is_empty());
    }
}
