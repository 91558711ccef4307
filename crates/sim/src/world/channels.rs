//! Channel, thread, overwrite and thread-member mutations.

use serde_json::{json, Value};

use crate::model::{Channel, ChannelKind, Overwrite, ThreadInfo};
use crate::payload;
use crate::SimError;

use super::World;

impl World {
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
                    applied_tags: vec![],
                });
            }
        }
        self.check_tags(guild_id, &c)?;
        if c.id == 0 || self.channel_guild.contains_key(&c.id) {
            c.id = self.next_id();
        }
        self.channel_guild.insert(c.id, guild_id);
        self.guild_mut(guild_id)?.channels.insert(c.id, c.clone());
        self.journal_thread(guild_id, c.id);
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

    pub(super) fn update_channel_inner(&mut self, c: Channel) -> Result<Channel, SimError> {
        let (g, old) = self.channel(c.id)?;
        let guild_id = g.id;
        if old.kind.is_thread() != c.kind.is_thread() {
            return Err(SimError::Invalid(
                "cannot turn a channel into a thread or back".into(),
            ));
        }
        let was_archived = old.thread.as_ref().map(|t| t.archived);
        self.check_tags(guild_id, &c)?;
        let mut c = c;
        if let Some(t) = c.thread.as_mut() {
            // Discord's archive_timestamp moves whenever the archived flag changes; the
            // archived-thread listings page by it.
            if was_archived != Some(t.archived) {
                t.archive_timestamp = Some(self.now());
            }
        }
        self.guild_mut(guild_id)?.channels.insert(c.id, c.clone());
        self.journal_thread(guild_id, c.id);
        let json = self.channel_json(guild_id, &c);
        if c.kind.is_thread() {
            self.dispatch_in(guild_id, c.id, "THREAD_UPDATE", &json);
        } else {
            self.dispatch(guild_id, "CHANNEL_UPDATE", &json);
        }
        Ok(c)
    }

    /// Discord's rules for forum tags: only forum and media channels offer them (at most 20,
    /// distinct ids, names of 1 to 20 characters); only their posts carry them (at most 5,
    /// each one the parent offers).
    fn check_tags(&self, guild_id: u64, c: &Channel) -> Result<(), SimError> {
        let invalid = |m: &str| Err(SimError::Invalid(m.into()));
        if !c.available_tags.is_empty() && !c.kind.has_posts() {
            return invalid("only forum and media channels have available_tags");
        }
        if c.available_tags.len() > 20 {
            return invalid("a channel offers at most 20 tags");
        }
        let mut ids = std::collections::BTreeSet::new();
        for t in &c.available_tags {
            if !ids.insert(t.id) || t.name.is_empty() || t.name.chars().count() > 20 {
                return invalid("tag ids must be distinct and names 1 to 20 characters");
            }
        }
        let applied = c.thread.as_ref().map_or(&[][..], |t| &t.applied_tags[..]);
        if applied.is_empty() {
            return Ok(());
        }
        if applied.len() > 5 {
            return invalid("a post carries at most 5 tags");
        }
        let parent = c
            .parent_id
            .and_then(|p| self.guild(guild_id).ok()?.channels.get(&p));
        let Some(parent) = parent.filter(|p| p.kind.has_posts()) else {
            return invalid("only posts in forum and media channels carry tags");
        };
        if applied
            .iter()
            .any(|id| !parent.available_tags.iter().any(|t| t.id == *id))
        {
            return invalid("applied_tags must be tags the parent channel offers");
        }
        Ok(())
    }

    pub fn delete_channel(&mut self, id: u64) -> Result<(), SimError> {
        let (g, c) = self.channel(id)?;
        let guild_id = g.id;
        let c = c.clone();
        let bot_saw_it = self.bot_access(g, id).view;
        self.guild_mut(guild_id)?.channels.remove(&id);
        self.channel_guild.remove(&id);
        self.journal_thread_deleted(id);
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
                applied_tags: vec![],
            }),
            available_tags: vec![],
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

    pub(super) fn thread_members_event(
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
}
