//! Discord's permission computation for one member in one channel (discord-protocol.md §4, §9).
//! Temporary local copy of main's `perms.rs` (same signature); replaced at the merge.

use chrono::{DateTime, Utc};

use crate::model::{perms, ChannelKind, OverwriteKind};
use crate::world::GuildState;

impl GuildState {
    /// The permissions `user_id` has in `channel_id` at `now`; 0 when the channel is invisible,
    /// unknown, or the user is not a member.
    pub(crate) fn channel_permissions(
        &self,
        user_id: u64,
        channel_id: u64,
        now: DateTime<Utc>,
    ) -> u64 {
        let Some(c) = self.channels.get(&channel_id) else {
            return 0;
        };
        if c.kind.is_thread() {
            let Some(parent) = c.parent_id else {
                return 0;
            };
            let p = self.channel_permissions(user_id, parent, now);
            if c.kind == ChannelKind::PrivateThread
                && p & perms::MANAGE_THREADS == 0
                && !c
                    .thread
                    .as_ref()
                    .is_some_and(|t| t.members.contains(&user_id))
            {
                return 0;
            }
            return p;
        }
        let Some(m) = self.members.get(&user_id) else {
            return 0;
        };
        let base = self.base_permissions(user_id);
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
            .filter(|o| o.kind == OverwriteKind::Role && m.roles.contains(&o.id))
        {
            allow |= o.allow;
            deny |= o.deny;
        }
        p = (p & !deny) | allow;
        if let Some(o) = c
            .overwrites
            .iter()
            .find(|o| o.kind == OverwriteKind::Member && o.id == user_id)
        {
            p = (p & !o.deny) | o.allow;
        }
        if m.communication_disabled_until.is_some_and(|t| t > now) {
            p &= perms::VIEW_CHANNEL | perms::READ_MESSAGE_HISTORY;
        }
        if matches!(c.kind, ChannelKind::Voice | ChannelKind::Stage) && p & perms::CONNECT == 0 {
            p &= perms::VIEW_CHANNEL;
        }
        if p & perms::VIEW_CHANNEL == 0 {
            return 0;
        }
        p
    }
}
