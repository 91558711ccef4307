//! Message mutations (post, edit, delete, bulk delete) and the ground truth.

use serde_json::json;

use crate::model::{snowflake_time, Attachment, MessageState, PostOptions, Revision};
use crate::payload;
use crate::SimError;

use super::World;

impl World {
    pub fn post_message(
        &mut self,
        channel_id: u64,
        author_id: u64,
        content: String,
        opts: PostOptions,
    ) -> Result<MessageState, SimError> {
        self.post_message_with_id(channel_id, author_id, content, opts, None)
    }

    /// `post_message` with a chosen id (a forum post's starter message shares the thread's).
    pub(crate) fn post_message_with_id(
        &mut self,
        channel_id: u64,
        author_id: u64,
        content: String,
        opts: PostOptions,
        id: Option<u64>,
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
        let id = match id {
            Some(id) => id,
            None => self.next_id(),
        };
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
        self.journal_message(&m);
        self.dispatch_message(guild_id, channel_id, "MESSAGE_CREATE", &json);
        Ok(m)
    }

    pub(super) fn message_mut(&mut self, id: u64) -> Result<&mut MessageState, SimError> {
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
        self.journal_deleted(id, now);
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
                self.journal_deleted(*id, now);
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
}
