//! Discord's permission computation, as the simulated Discord applies it: to decide what the bot
//! may read (what it is told over the gateway and what REST answers it) and as ground truth of
//! what each user would see in Discord's own client.
//!
//! Written from Discord's documentation (permissions.mdx "Permission Overwrites", "Implicit
//! Permissions", threads.mdx), independently of the observer's own rule, so tests that compare
//! the two catch a slip in either:
//! - owner → everything; ADMINISTRATOR (after @everyone + roles) → everything;
//! - channel overwrites: @everyone, then all of the member's role overwrites (deny then allow,
//!   aggregated), then the member's own overwrite;
//! - a timed-out member (not owner, not administrator) keeps only VIEW_CHANNEL and
//!   READ_MESSAGE_HISTORY;
//! - implicit denies: without VIEW_CHANNEL nothing else of the channel applies; in voice and
//!   stage channels, without CONNECT nothing but VIEW_CHANNEL applies (the channel shows, its
//!   text chat does not);
//! - threads are computed on their parent; a private thread also needs thread membership or
//!   MANAGE_THREADS.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{perms, Channel, ChannelKind, Member, OverwriteKind};
use crate::world::GuildState;

/// What a user may do with one channel, as Discord's client would show it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelView {
    /// The channel appears in the user's channel list (VIEW_CHANNEL).
    pub view: bool,
    /// The user may read messages as they are posted (voice and stage also need CONNECT).
    pub read: bool,
    /// The user may read stored history (`read` and READ_MESSAGE_HISTORY).
    pub history: bool,
}

impl ChannelView {
    pub fn of(kind: ChannelKind, permissions: u64) -> ChannelView {
        let view = permissions & perms::VIEW_CHANNEL != 0;
        let read = view && (!is_voice(kind) || permissions & perms::CONNECT != 0);
        ChannelView {
            view,
            read,
            history: read && permissions & perms::READ_MESSAGE_HISTORY != 0,
        }
    }
}

/// Voice and stage channels: their text chat needs CONNECT.
pub fn is_voice(kind: ChannelKind) -> bool {
    matches!(kind, ChannelKind::Voice | ChannelKind::Stage)
}

impl GuildState {
    /// Guild-level permissions of a member: owner → all; @everyone OR the member's roles;
    /// ADMINISTRATOR → all.
    fn member_base(&self, m: &Member) -> u64 {
        if m.user_id == self.owner_id {
            return perms::ALL;
        }
        let everyone = self.roles.get(&self.id).map_or(0, |r| r.permissions);
        let p = m
            .roles
            .iter()
            .filter(|r| **r != self.id)
            .filter_map(|r| self.roles.get(r))
            .fold(everyone, |acc, r| acc | r.permissions);
        if p & perms::ADMINISTRATOR != 0 {
            perms::ALL
        } else {
            p
        }
    }

    /// A non-thread channel's permissions for `m`, timeout and implicit denies applied.
    fn own_permissions(&self, m: &Member, c: &Channel, now: DateTime<Utc>) -> u64 {
        let base = self.member_base(m);
        if base == perms::ALL {
            return perms::ALL;
        }
        let mut p = base;
        if let Some(o) = c
            .overwrites
            .iter()
            .find(|o| o.kind == OverwriteKind::Role && o.id == self.id)
        {
            p = (p & !o.deny) | o.allow;
        }
        let (mut allow, mut deny) = (0, 0);
        for o in c
            .overwrites
            .iter()
            .filter(|o| o.kind == OverwriteKind::Role && o.id != self.id && m.roles.contains(&o.id))
        {
            allow |= o.allow;
            deny |= o.deny;
        }
        p = (p & !deny) | allow;
        if let Some(o) = c
            .overwrites
            .iter()
            .find(|o| o.kind == OverwriteKind::Member && o.id == m.user_id)
        {
            p = (p & !o.deny) | o.allow;
        }
        if m.communication_disabled_until.is_some_and(|t| t > now) {
            p &= perms::VIEW_CHANNEL | perms::READ_MESSAGE_HISTORY;
        }
        if p & perms::VIEW_CHANNEL == 0 {
            return 0;
        }
        if is_voice(c.kind) && p & perms::CONNECT == 0 {
            return perms::VIEW_CHANNEL;
        }
        p
    }

    /// Discord's permissions of member `m` in `channel_id` at `now`; 0 for an unknown channel
    /// or a thread whose parent is unknown.
    pub fn member_channel_permissions(
        &self,
        m: &Member,
        channel_id: u64,
        now: DateTime<Utc>,
    ) -> u64 {
        let Some(c) = self.channels.get(&channel_id) else {
            return 0;
        };
        if !c.kind.is_thread() {
            return self.own_permissions(m, c, now);
        }
        let Some(parent) = c.parent_id.and_then(|p| self.channels.get(&p)) else {
            return 0;
        };
        let p = self.own_permissions(m, parent, now);
        let member_of_thread = c
            .thread
            .as_ref()
            .is_some_and(|t| t.members.contains(&m.user_id));
        if c.kind == ChannelKind::PrivateThread
            && p & perms::MANAGE_THREADS == 0
            && !member_of_thread
        {
            return 0;
        }
        p
    }

    /// Discord's permissions of `user_id` in `channel_id` at `now`: 0 for a non-member (the
    /// bot is a member only if listed; see `World::user_channel_permissions`).
    pub fn channel_permissions(&self, user_id: u64, channel_id: u64, now: DateTime<Utc>) -> u64 {
        self.members
            .get(&user_id)
            .map_or(0, |m| self.member_channel_permissions(m, channel_id, now))
    }

    /// Every channel (threads included) `m` may see, with what they may read.
    pub fn member_channel_views(
        &self,
        m: &Member,
        now: DateTime<Utc>,
    ) -> BTreeMap<u64, ChannelView> {
        self.channels
            .values()
            .filter_map(|c| {
                let v = ChannelView::of(c.kind, self.member_channel_permissions(m, c.id, now));
                v.view.then_some((c.id, v))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::model::{Overwrite, Role, ThreadInfo};

    fn guild() -> GuildState {
        let mut g = GuildState {
            id: 1,
            name: "g".into(),
            owner_id: 99,
            roles: BTreeMap::new(),
            channels: BTreeMap::new(),
            members: BTreeMap::new(),
            bot_present: true,
            bot_roles: vec![],
        };
        g.roles.insert(
            1,
            Role {
                id: 1,
                name: "@everyone".into(),
                permissions: perms::VIEW_CHANNEL | perms::READ_MESSAGE_HISTORY | perms::CONNECT,
                position: 0,
                color: 0,
                hoist: false,
                mentionable: false,
            },
        );
        g.roles.insert(
            2,
            Role {
                id: 2,
                name: "staff".into(),
                permissions: perms::MANAGE_THREADS,
                position: 1,
                color: 0,
                hoist: false,
                mentionable: false,
            },
        );
        let chan = |id, kind, parent: Option<u64>, overwrites: Vec<Overwrite>| Channel {
            id,
            kind,
            name: format!("c{id}"),
            parent_id: parent,
            position: 0,
            topic: None,
            overwrites,
            thread: None,
            available_tags: vec![],
        };
        g.channels
            .insert(10, chan(10, ChannelKind::Text, None, vec![]));
        let deny_connect = Overwrite {
            id: 1,
            kind: OverwriteKind::Role,
            allow: 0,
            deny: perms::CONNECT,
        };
        g.channels.insert(
            20,
            chan(20, ChannelKind::Voice, None, vec![deny_connect.clone()]),
        );
        g.channels
            .insert(21, chan(21, ChannelKind::Stage, None, vec![]));
        let mut t = chan(30, ChannelKind::PrivateThread, Some(10), vec![]);
        t.thread = Some(ThreadInfo {
            owner_id: 5,
            archived: false,
            locked: false,
            auto_archive_duration: 60,
            invitable: false,
            members: vec![5],
            archive_timestamp: None,
            applied_tags: vec![],
        });
        g.channels.insert(30, t);
        for (user, roles) in [(5u64, vec![]), (6, vec![]), (7, vec![2u64]), (99, vec![])] {
            g.members.insert(
                user,
                Member {
                    user_id: user,
                    roles,
                    nick: None,
                    joined_at: Utc::now(),
                    communication_disabled_until: None,
                },
            );
        }
        g
    }

    #[test]
    fn voice_without_connect_shows_the_channel_but_not_its_chat() {
        let g = guild();
        let now = Utc::now();
        let m = &g.members[&6];
        let locked = ChannelView::of(ChannelKind::Voice, g.member_channel_permissions(m, 20, now));
        assert_eq!(
            locked,
            ChannelView {
                view: true,
                read: false,
                history: false
            }
        );
        let open = ChannelView::of(ChannelKind::Stage, g.member_channel_permissions(m, 21, now));
        assert!(open.history);
        // A timeout takes CONNECT away too.
        let mut timed_out = m.clone();
        timed_out.communication_disabled_until = Some(now + chrono::Duration::hours(1));
        let v = ChannelView::of(
            ChannelKind::Stage,
            g.member_channel_permissions(&timed_out, 21, now),
        );
        assert!(v.view && !v.read);
        // In a text channel a timeout keeps reading.
        assert!(
            ChannelView::of(
                ChannelKind::Text,
                g.member_channel_permissions(&timed_out, 10, now)
            )
            .history
        );
    }

    #[test]
    fn private_threads_need_membership_or_manage_threads() {
        let g = guild();
        let now = Utc::now();
        assert_ne!(g.channel_permissions(5, 30, now), 0, "member of the thread");
        assert_eq!(g.channel_permissions(6, 30, now), 0, "not a member");
        assert_ne!(g.channel_permissions(7, 30, now), 0, "MANAGE_THREADS");
        assert_eq!(g.channel_permissions(99, 30, now), perms::ALL, "owner");
        assert_eq!(g.channel_permissions(1234, 10, now), 0, "not in the guild");
        let views = g.member_channel_views(&g.members[&6], now);
        assert_eq!(views.keys().copied().collect::<Vec<_>>(), vec![10, 20, 21]);
    }
}
