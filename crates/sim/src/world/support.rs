//! The support journal's side of the world: every mutation path that touches a forum post
//! (creation, loading, THREAD_UPDATE, messages, deletions) records it here, whoever called it.
//! Also the few world operations support traffic and back-dated history need (a forum post whose
//! starter message shares its id, jumping the virtual clock, messages inserted in the past).

use chrono::{DateTime, TimeZone, Utc};

use crate::model::{perms, snowflake_at, snowflake_time, Channel, MessageState, Revision};
use crate::support::{is_solved_tag_name, Entry, MarkerChange, Record, Side, SupportMessage};
use crate::SimError;

use super::{GuildState, World};

/// Journal times have the millisecond precision of snowflakes, so messages and marker changes
/// compare the same way whether they came from an id or from the clock.
pub(crate) fn to_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(t.timestamp_millis())
        .single()
        .unwrap_or(t)
}

impl World {
    /// The forum (or media channel) a post lives in, if `c` is such a post.
    fn post_forum(g: &GuildState, c: &Channel) -> Option<u64> {
        let parent = g.channels.get(&c.parent_id?)?;
        (c.kind.is_thread() && parent.kind.has_posts()).then_some(parent.id)
    }

    /// Whether a solved marker is on the post: a tag named like solved (see
    /// [`is_solved_tag_name`]) among its applied tags, or the lock ("locked means solved" is on
    /// by default).
    fn solved_marker(g: &GuildState, c: &Channel) -> bool {
        let Some(t) = &c.thread else { return false };
        let parent = c.parent_id.and_then(|p| g.channels.get(&p));
        t.locked
            || t.applied_tags.iter().any(|id| {
                parent.is_some_and(|p| {
                    p.available_tags
                        .iter()
                        .any(|tag| tag.id == *id && is_solved_tag_name(&tag.name))
                })
            })
    }

    /// Staff by the default rule: MANAGE_MESSAGES in the forum (owner and ADMINISTRATOR have
    /// every permission). Permissions as they are now, i.e. when the message is posted.
    pub(crate) fn is_support_staff(&self, g: &GuildState, forum_id: u64, user_id: u64) -> bool {
        let bot = user_id == self.bot.id || self.users.get(&user_id).is_some_and(|u| u.bot);
        !bot && self.user_channel_permissions(g, user_id, forum_id) & perms::MANAGE_MESSAGES != 0
    }

    fn side_of(&self, g: &GuildState, forum_id: u64, requester: u64, author: u64) -> Side {
        if author == self.bot.id || self.users.get(&author).is_some_and(|u| u.bot) {
            Side::Bot
        } else if author == requester {
            Side::Requester
        } else if self.is_support_staff(g, forum_id, author) {
            Side::Staff
        } else {
            Side::OtherHuman
        }
    }

    /// Registers a forum post the journal does not know yet, or records a change of its solved
    /// marker. A marker already on a post when the journal first sees it is dated at the post's
    /// last message (the backfill convention, see [`MarkerChange`]); a change seen live, now.
    pub(crate) fn journal_thread(&mut self, guild_id: u64, thread_id: u64) {
        let Some(g) = self.guilds.get(&guild_id) else {
            return;
        };
        let Some(c) = g.channels.get(&thread_id) else {
            return;
        };
        let Some(forum_id) = Self::post_forum(g, c) else {
            return;
        };
        let marker = Self::solved_marker(g, c);
        let owner = c.thread.as_ref().map_or(0, |t| t.owner_id);
        let changed = match self.support.records.get(&thread_id) {
            None => {
                let mut r = Record {
                    guild_id,
                    forum_id,
                    requester_id: owner,
                    opened_at: snowflake_time(thread_id),
                    entries: vec![],
                    marker,
                    thread_deleted_at: None,
                };
                if marker {
                    r.entries.push(Entry::Marker(MarkerChange {
                        at: r.last_message_at(),
                        present: true,
                    }));
                }
                self.support.records.insert(thread_id, r);
                false
            }
            Some(r) => r.marker != marker,
        };
        if changed {
            let at = to_ms(self.now());
            if let Some(r) = self.support.records.get_mut(&thread_id) {
                r.marker = marker;
                r.entries.push(Entry::Marker(MarkerChange {
                    at,
                    present: marker,
                }));
            }
        }
    }

    pub(crate) fn journal_message(&mut self, m: &MessageState) {
        let Some(r) = self.support.records.get(&m.channel_id) else {
            return;
        };
        let Some(g) = self.guilds.get(&r.guild_id) else {
            return;
        };
        let side = self.side_of(g, r.forum_id, r.requester_id, m.author_id);
        let entry = Entry::Message(SupportMessage {
            id: m.id,
            author_id: m.author_id,
            at: to_ms(m.created_at),
            side,
            deleted: false,
            deleted_at: None,
        });
        if let Some(r) = self.support.records.get_mut(&m.channel_id) {
            r.entries.push(entry);
            self.support.message_thread.insert(m.id, m.channel_id);
        }
    }

    pub(crate) fn journal_deleted(&mut self, message_id: u64, at: DateTime<Utc>) {
        let Some(thread) = self.support.message_thread.get(&message_id) else {
            return;
        };
        let Some(r) = self.support.records.get_mut(thread) else {
            return;
        };
        for e in &mut r.entries {
            if let Entry::Message(m) = e {
                if m.id == message_id && !m.deleted {
                    m.deleted = true;
                    m.deleted_at = Some(to_ms(at));
                }
            }
        }
    }

    pub(crate) fn journal_thread_deleted(&mut self, thread_id: u64) {
        let at = to_ms(self.peek_now());
        if let Some(r) = self.support.records.get_mut(&thread_id) {
            r.thread_deleted_at.get_or_insert(at);
        }
    }

    pub(crate) fn has_virtual_clock(&self) -> bool {
        self.virtual_ms.is_some()
    }

    /// Moves a virtual clock forward so that its next reading is `at` (never backwards); a wall
    /// clock cannot be moved.
    pub(crate) fn advance_clock_to(&mut self, at: DateTime<Utc>) {
        if let Some(ms) = &mut self.virtual_ms {
            // `now()` adds a second before reading.
            *ms = (*ms).max(at.timestamp_millis() - 1000);
        }
    }

    /// Staff (MANAGE_MESSAGES in the forum) and possible requesters (humans who may post there
    /// and are not staff or timed out) of one forum, in user id order.
    pub(crate) fn support_people(&self, forum_id: u64) -> (Vec<u64>, Vec<u64>) {
        let Ok((g, _)) = self.channel(forum_id) else {
            return (vec![], vec![]);
        };
        let now = self.peek_now();
        let (mut staff, mut requesters) = (vec![], vec![]);
        for m in g.members.values() {
            let u = m.user_id;
            if u == self.bot.id || self.users.get(&u).is_none_or(|u| u.bot) {
                continue;
            }
            let p = self.user_channel_permissions(g, u, forum_id);
            if self.is_support_staff(g, forum_id, u) {
                staff.push(u);
            } else if p & (perms::VIEW_CHANNEL | perms::SEND_MESSAGES)
                == perms::VIEW_CHANNEL | perms::SEND_MESSAGES
                && m.communication_disabled_until.is_none_or(|t| t <= now)
            {
                requesters.push(u);
            }
        }
        (staff, requesters)
    }

    /// A forum post the way Discord creates one: the thread and its starter message share an
    /// id. THREAD_CREATE, then MESSAGE_CREATE.
    pub(crate) fn create_forum_post(
        &mut self,
        forum_id: u64,
        owner_id: u64,
        name: String,
        content: String,
        applied_tags: Vec<u64>,
    ) -> Result<(Channel, MessageState), SimError> {
        let (g, forum) = self.channel(forum_id)?;
        if !forum.kind.has_posts() {
            return Err(SimError::Invalid(format!(
                "{forum_id} is not a forum or media channel"
            )));
        }
        let guild_id = g.id;
        let id = self.next_id();
        let c = Channel {
            id,
            kind: crate::model::ChannelKind::PublicThread,
            name,
            parent_id: Some(forum_id),
            position: 0,
            topic: None,
            overwrites: vec![],
            thread: Some(crate::model::ThreadInfo {
                owner_id,
                archived: false,
                locked: false,
                auto_archive_duration: 1440,
                invitable: true,
                members: vec![owner_id],
                archive_timestamp: None,
                applied_tags,
            }),
            available_tags: vec![],
        };
        let c = self.create_channel(guild_id, c)?;
        let m =
            self.post_message_with_id(c.id, owner_id, content, Default::default(), Some(c.id))?;
        Ok((c, m))
    }

    /// Adds (or removes) the forum's first solved tag on a post through the ordinary update path
    /// (THREAD_UPDATE). Adding when one is already applied removes it first, so the marker is
    /// set anew (a product only notices a solved tag being set when it appears).
    pub(crate) fn set_solved(&mut self, thread_id: u64, solved: bool) -> Result<Channel, SimError> {
        let (g, c) = self.channel(thread_id)?;
        let forum = c
            .parent_id
            .and_then(|p| g.channels.get(&p))
            .filter(|p| p.kind.has_posts())
            .ok_or_else(|| SimError::Invalid(format!("{thread_id} is not a forum post")))?;
        let solved_ids: Vec<u64> = forum
            .available_tags
            .iter()
            .filter(|t| is_solved_tag_name(&t.name))
            .map(|t| t.id)
            .collect();
        let Some(tag) = solved_ids.first().copied() else {
            return Err(SimError::Invalid(format!(
                "forum {} has no solved tag",
                forum.id
            )));
        };
        let mut c = c.clone();
        let has = |c: &Channel| {
            c.thread
                .as_ref()
                .is_some_and(|t| t.applied_tags.iter().any(|a| solved_ids.contains(a)))
        };
        if has(&c) {
            if let Some(t) = c.thread.as_mut() {
                t.applied_tags.retain(|a| !solved_ids.contains(a));
            }
            c = self.update_channel(c)?;
        }
        if solved {
            if let Some(t) = c.thread.as_mut() {
                if t.applied_tags.len() >= 5 {
                    t.applied_tags.remove(0);
                }
                t.applied_tags.push(tag);
            }
            c = self.update_channel(c)?;
        }
        Ok(c)
    }

    /// Inserts a back-dated forum post and its messages without any gateway event (history a
    /// product only finds over REST). `messages`: (id, author, content), the first being the
    /// starter message with the thread's id. A solved marker on `thread` is dated at the last
    /// message, as a product that first sees it at backfill would date it.
    pub(crate) fn insert_history_post(
        &mut self,
        guild_id: u64,
        thread: Channel,
        messages: Vec<(u64, u64, String)>,
    ) -> Result<(), SimError> {
        if self.channel_guild.contains_key(&thread.id) {
            return Err(SimError::Invalid(format!("id {} is taken", thread.id)));
        }
        let tid = thread.id;
        let marker_on = Self::solved_marker(self.guild(guild_id)?, &thread);
        let mut bare = thread.clone();
        if let Some(t) = bare.thread.as_mut() {
            t.applied_tags.clear();
            t.locked = false;
        }
        // Registered bare, so the marker is added below at the last message, not the opening.
        self.channel_guild.insert(tid, guild_id);
        self.guild_mut(guild_id)?.channels.insert(tid, bare);
        self.journal_thread(guild_id, tid);
        for (id, author, content) in messages {
            let created_at = snowflake_time(id);
            let m = MessageState {
                id,
                guild_id,
                channel_id: tid,
                author_id: author,
                revisions: vec![Revision {
                    content: content.clone(),
                    at: created_at,
                }],
                content,
                created_at,
                edited_at: None,
                deleted: false,
                deleted_at: None,
                attachments: vec![],
                reply_to: None,
            };
            self.journal_message(&m);
            self.messages.entry(tid).or_default().insert(id, m);
            self.message_channel.insert(id, tid);
        }
        self.guild_mut(guild_id)?.channels.insert(tid, thread);
        if let (true, Some(r)) = (marker_on, self.support.records.get_mut(&tid)) {
            r.marker = true;
            let at = r.last_message_at();
            r.entries
                .push(Entry::Marker(MarkerChange { at, present: true }));
        }
        Ok(())
    }

    /// A snowflake at `at` that no channel or message uses yet, above `after` (so ids of
    /// back-dated events increase with their time and among themselves).
    pub(crate) fn free_id_at(&self, at: DateTime<Utc>, after: u64) -> u64 {
        // Low bits (worker, process, increment) that the clock-based allocator never starts at.
        let mut id = (snowflake_at(at.timestamp_millis()) | 0x2A_0000).max(after + 1);
        while self.channel_guild.contains_key(&id) || self.message_channel.contains_key(&id) {
            id += 1;
        }
        id
    }
}
