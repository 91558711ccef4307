//! The message state lattice: every message op becomes a [`MsgState`], and
//! [`MsgState::join`] combines them (commutative, associative, idempotent),
//! so the stored message never depends on which event arrived first.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{
    sanitize, sanitize_opt, snowflake_time, Author, IngestOp, MessagePatch, NewMessage,
    MAX_CONTENT_BYTES, MAX_NAME_BYTES,
};

/// One version of a message's content.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    /// When this version became current: `edited_at`, else `created_at`.
    pub at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    pub content: String,
    /// None: this observation did not carry attachments (keep what is known).
    pub attachments: Option<Value>,
}

impl Version {
    #[allow(clippy::type_complexity)]
    fn order_key(&self) -> (DateTime<Utc>, &str, Option<DateTime<Utc>>, Option<String>) {
        (
            self.at,
            &self.content,
            self.edited_at,
            self.attachments.as_ref().map(Value::to_string),
        )
    }
}

/// The stored state of a message, as far as ingestion knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct MsgState {
    pub guild_id: i64,
    pub message_id: i64,
    pub channel_id: i64,
    pub author: Option<Author>,
    pub created_at: DateTime<Utc>,
    pub seen_create: bool,
    pub reply_to_id: Option<i64>,
    pub version: Option<Version>,
    pub deleted_at: Option<DateTime<Utc>>,
}

impl MsgState {
    fn empty(guild_id: i64, channel_id: i64, message_id: i64) -> Self {
        Self {
            guild_id,
            message_id,
            channel_id,
            author: None,
            created_at: snowflake_time(message_id),
            seen_create: false,
            reply_to_id: None,
            version: None,
            deleted_at: None,
        }
    }

    fn from_create(m: &NewMessage) -> Self {
        Self {
            guild_id: m.guild_id,
            message_id: m.message_id,
            channel_id: m.channel_id,
            author: Some(sanitize_author(&m.author)),
            created_at: m.created_at,
            seen_create: true,
            reply_to_id: m.reply_to_id,
            version: Some(Version {
                at: m.edited_at.unwrap_or(m.created_at),
                edited_at: m.edited_at,
                content: sanitize(&m.content, MAX_CONTENT_BYTES),
                attachments: Some(m.attachments.clone()),
            }),
            deleted_at: None,
        }
    }

    fn from_patch(p: &MessagePatch) -> Self {
        let mut s = Self::empty(p.guild_id, p.channel_id, p.message_id);
        s.author = p.author.as_ref().map(sanitize_author);
        // An update without content (embed unfurl, pin) carries no version.
        // Without edited_at its version time is the creation time: it can
        // only fill a row whose content was never seen.
        s.version = p.content.as_ref().map(|c| Version {
            at: p.edited_at.unwrap_or(s.created_at),
            edited_at: p.edited_at,
            content: sanitize(c, MAX_CONTENT_BYTES),
            attachments: p.attachments.clone(),
        });
        s
    }

    fn from_delete(guild_id: i64, channel_id: i64, message_id: i64, at: DateTime<Utc>) -> Self {
        let mut s = Self::empty(guild_id, channel_id, message_id);
        s.deleted_at = Some(at);
        s
    }

    /// Least upper bound of two observations of the same message.
    /// Commutative, associative and idempotent, up to ties that only differ
    /// in data Discord never changes (author, creation time).
    pub fn join(&self, other: &MsgState) -> MsgState {
        let (first, second) = if !self.seen_create && other.seen_create {
            (other, self)
        } else {
            (self, other)
        };
        let version = match (&self.version, &other.version) {
            (None, v) | (v, None) => v.clone(),
            (Some(a), Some(b)) => {
                // A total order on versions, so the winner never depends on
                // which side is `self`: time, then content, edit time and
                // attachments (unknown < known, then by serialized form).
                let (win, lose) = if b.order_key() > a.order_key() {
                    (b, a)
                } else {
                    (a, b)
                };
                let mut v = win.clone();
                if v.attachments.is_none() && win.at == lose.at {
                    v.attachments = lose.attachments.clone();
                }
                if v.attachments.is_none() && lose.attachments.is_some() {
                    // Attachments seen only with an older version still describe
                    // the message better than nothing.
                    v.attachments = lose.attachments.clone();
                }
                Some(v)
            }
        };
        MsgState {
            guild_id: self.guild_id,
            message_id: self.message_id,
            channel_id: first.channel_id,
            author: first.author.clone().or_else(|| second.author.clone()),
            created_at: first.created_at,
            seen_create: self.seen_create || other.seen_create,
            reply_to_id: first.reply_to_id.or(second.reply_to_id),
            version,
            deleted_at: match (self.deleted_at, other.deleted_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }

    /// Whether two states differ in anything a reader can see. The exact
    /// deletion time of a message that was already deleted does not count.
    pub(super) fn visible_eq(&self, other: &MsgState) -> bool {
        self.channel_id == other.channel_id
            && self.author == other.author
            && self.created_at == other.created_at
            && self.seen_create == other.seen_create
            && self.reply_to_id == other.reply_to_id
            && self.deleted_at.is_some() == other.deleted_at.is_some()
            && self.content() == other.content()
            && self.edited_at() == other.edited_at()
            && self.attachments() == other.attachments()
    }

    /// [`Self::visible_eq`] plus the bookkeeping columns: whether the row
    /// must be written even though readers would see no difference.
    pub(super) fn stored_eq(&self, other: &MsgState) -> bool {
        self.visible_eq(other)
            && self.version_at() == other.version_at()
            && self.attachments_known() == other.attachments_known()
    }

    pub(super) fn version_at(&self) -> Option<DateTime<Utc>> {
        self.version.as_ref().map(|v| v.at)
    }

    pub(super) fn attachments_known(&self) -> bool {
        self.version
            .as_ref()
            .is_some_and(|v| v.attachments.is_some())
    }

    pub(super) fn content(&self) -> &str {
        self.version.as_ref().map_or("", |v| v.content.as_str())
    }

    pub(super) fn edited_at(&self) -> Option<DateTime<Utc>> {
        self.version.as_ref().and_then(|v| v.edited_at)
    }

    pub(super) fn attachments(&self) -> Value {
        self.version
            .as_ref()
            .and_then(|v| v.attachments.clone())
            .unwrap_or_else(|| Value::Array(Vec::new()))
    }
}

fn sanitize_author(a: &Author) -> Author {
    Author {
        id: a.id,
        username: sanitize(&a.username, MAX_NAME_BYTES),
        display_name: sanitize_opt(a.display_name.as_deref(), MAX_NAME_BYTES),
        avatar: sanitize_opt(a.avatar.as_deref(), MAX_NAME_BYTES),
        bot: a.bot,
    }
}

/// Message ops merged per message (one state each) and their versions.
pub(super) type Merged = (
    BTreeMap<(i64, i64), MsgState>,
    HashSet<(i64, i64, DateTime<Utc>, String)>,
);

/// Merges the message ops of `ops` (others are skipped), `now` standing for
/// the time of deletes.
pub(super) fn merge_messages(ops: &[IngestOp], now: DateTime<Utc>) -> Merged {
    let mut merged: BTreeMap<(i64, i64), MsgState> = BTreeMap::new();
    let mut revisions: HashSet<(i64, i64, DateTime<Utc>, String)> = HashSet::new();
    for op in ops {
        for s in message_states(op, now) {
            if let Some(v) = &s.version {
                revisions.insert((s.guild_id, s.message_id, v.at, v.content.clone()));
            }
            let key = (s.guild_id, s.message_id);
            let next = match merged.get(&key) {
                Some(prev) => prev.join(&s),
                None => s,
            };
            merged.insert(key, next);
        }
    }
    (merged, revisions)
}

/// The message states an op contributes (none for access ops).
fn message_states(op: &IngestOp, now: DateTime<Utc>) -> Vec<MsgState> {
    match op {
        IngestOp::MessageCreate(m) => vec![MsgState::from_create(m)],
        IngestOp::MessageUpdate(p) => vec![MsgState::from_patch(p)],
        IngestOp::MessageDelete {
            guild_id,
            channel_id,
            message_id,
        } => vec![MsgState::from_delete(
            *guild_id,
            *channel_id,
            *message_id,
            now,
        )],
        IngestOp::MessageBulkDelete {
            guild_id,
            channel_id,
            message_ids,
        } => message_ids
            .iter()
            .map(|id| MsgState::from_delete(*guild_id, *channel_id, *id, now))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::ingest::{snowflake_at, snowflake_time};

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
    }

    #[test]
    fn join_breaks_ties_on_attachments_deterministically() {
        let id = snowflake_at(t(1_700_000_000_000)) | 7;
        let patch = |att: Value| {
            MsgState::from_patch(&MessagePatch {
                guild_id: 1,
                channel_id: 2,
                message_id: id,
                author: None,
                content: Some("same".into()),
                edited_at: Some(t(1_700_000_001_000)),
                attachments: Some(att),
            })
        };
        let a = patch(serde_json::json!([{"id": "1", "filename": "a.png"}]));
        let b = patch(serde_json::json!([{"id": "2", "filename": "b.png"}]));
        let ab = a.join(&b);
        let ba = b.join(&a);
        assert_eq!(ab, ba);
        assert!(ab.visible_eq(&ba) && ab.stored_eq(&ba));
        // Known attachments beat unknown ones at an equal version.
        let unknown = MsgState::from_patch(&MessagePatch {
            guild_id: 1,
            channel_id: 2,
            message_id: id,
            author: None,
            content: Some("same".into()),
            edited_at: Some(t(1_700_000_001_000)),
            attachments: None,
        });
        assert_eq!(unknown.join(&a), a.join(&unknown));
        assert_eq!(unknown.join(&a).attachments(), a.attachments());
    }

    #[test]
    fn join_is_order_independent() {
        let id = snowflake_at(t(1_700_000_000_000)) | 5;
        let create = MsgState::from_create(&NewMessage {
            guild_id: 1,
            channel_id: 2,
            message_id: id,
            author: Author {
                id: 9,
                username: "u".into(),
                display_name: None,
                avatar: None,
                bot: false,
            },
            content: "v0".into(),
            created_at: snowflake_time(id),
            edited_at: None,
            attachments: Value::Array(vec![]),
            reply_to_id: None,
        });
        let edit = MsgState::from_patch(&MessagePatch {
            guild_id: 1,
            channel_id: 2,
            message_id: id,
            author: None,
            content: Some("v1".into()),
            edited_at: Some(t(1_700_000_001_000)),
            attachments: None,
        });
        let del = MsgState::from_delete(1, 2, id, t(1_700_000_002_000));
        let a = create.join(&edit).join(&del);
        let b = del.join(&edit).join(&create);
        let c = edit.join(&del).join(&create).join(&edit);
        assert!(a.visible_eq(&b) && b.visible_eq(&c));
        assert_eq!(a.content(), "v1");
        assert!(a.deleted_at.is_some() && a.seen_create);
    }
}
