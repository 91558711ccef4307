//! GraphQL object types (names and shapes fixed by docs/interfaces.md) and their
//! construction from database rows. Ids are strings; times are RFC 3339.

use async_graphql::{ComplexObject, Context, Enum, SimpleObject, ID};
use base64::Engine;
use chrono::{DateTime, Utc};
use observer_db::viewer::{ChannelRow, GuildRow, MessageRow, RevisionRow, UserRow};

use super::request::request_db;
use crate::error::{from_db, GqlResult};

const CDN: &str = "https://cdn.discordapp.com";

/// Whether an avatar/icon hash (data from Discord, stored as is) may go into
/// a CDN URL: `^[A-Za-z0-9_]+$` only (Discord's hashes, `a_` for animated),
/// so a crafted value cannot change the URL's path, query or host.
pub(crate) fn cdn_hash_ok(hash: &str) -> bool {
    !hash.is_empty()
        && hash.len() <= 128
        && hash.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn id(v: i64) -> ID {
    ID(v.to_string())
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Viewer {
    pub id: ID,
    pub username: String,
    pub avatar_url: Option<String>,
}

impl From<UserRow> for Viewer {
    fn from(u: UserRow) -> Self {
        Self {
            id: id(u.user_id),
            avatar_url: u
                .avatar
                .filter(|a| cdn_hash_ok(a))
                .map(|a| format!("{CDN}/avatars/{}/{a}.png", u.user_id)),
            username: u.username,
        }
    }
}

#[derive(SimpleObject, Debug, Clone)]
#[graphql(complex)]
pub struct Guild {
    pub id: ID,
    pub name: String,
    pub icon_url: Option<String>,
    pub observer_role_ids: Vec<ID>,
    /// Messages older than this many days are purged (null: kept forever).
    pub retention_days: Option<i32>,
    #[graphql(skip)]
    pub guild_id: i64,
    /// Filled when the parent resolver loaded channels for many guilds at once.
    #[graphql(skip)]
    pub preloaded_channels: Option<Vec<Channel>>,
}

impl From<GuildRow> for Guild {
    fn from(g: GuildRow) -> Self {
        Self {
            id: id(g.guild_id),
            icon_url: g
                .icon
                .filter(|i| cdn_hash_ok(i))
                .map(|i| format!("{CDN}/icons/{}/{i}.png", g.guild_id)),
            name: g.name,
            observer_role_ids: g.observer_role_ids.into_iter().map(id).collect(),
            retention_days: g.retention_days,
            guild_id: g.guild_id,
            preloaded_channels: None,
        }
    }
}

#[ComplexObject]
impl Guild {
    /// Visible channels, flat, in display order; `parentId` and `kind` give the
    /// tree (categories → channels, forum/text channels → threads).
    async fn channels(&self, ctx: &Context<'_>) -> GqlResult<Vec<Channel>> {
        if let Some(ch) = &self.preloaded_channels {
            return Ok(ch.clone());
        }
        let rdb = request_db(ctx)?;
        let mut tx = rdb.tx().await?;
        let rows = observer_db::viewer::channels_of_guilds(&mut tx, &[self.guild_id])
            .await
            .map_err(from_db)?;
        Ok(rows.into_iter().map(Channel::from).collect())
    }
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    Text,
    Announcement,
    Forum,
    Media,
    Category,
    Voice,
    Stage,
    PublicThread,
    PrivateThread,
    AnnouncementThread,
    Other,
}

impl ChannelKind {
    /// From Discord's channel type number.
    pub fn from_discord(kind: i16) -> Self {
        match kind {
            0 => Self::Text,
            2 => Self::Voice,
            4 => Self::Category,
            5 => Self::Announcement,
            10 => Self::AnnouncementThread,
            11 => Self::PublicThread,
            12 => Self::PrivateThread,
            13 => Self::Stage,
            15 => Self::Forum,
            16 => Self::Media,
            _ => Self::Other,
        }
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Channel {
    pub id: ID,
    pub guild_id: ID,
    pub parent_id: Option<ID>,
    pub name: String,
    pub kind: ChannelKind,
    pub position: i32,
    /// Whether the bot can read this channel's messages: false when Discord
    /// refused it (the bot lacks VIEW_CHANNEL, or CONNECT in a voice or stage
    /// channel), so the mirror holds none of them; true once it read the
    /// channel; null when not known yet, and always null for viewers who
    /// cannot manage the guild (owner, ADMINISTRATOR or MANAGE_GUILD).
    pub bot_can_read: Option<bool>,
}

impl From<ChannelRow> for Channel {
    fn from(c: ChannelRow) -> Self {
        Self {
            id: id(c.channel_id),
            guild_id: id(c.guild_id),
            parent_id: c.parent_id.map(id),
            name: c.name,
            kind: ChannelKind::from_discord(c.kind),
            position: c.position,
            bot_can_read: c.bot_can_read,
        }
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Author {
    pub id: ID,
    pub username: String,
    pub display_name: Option<String>,
    pub avatar_url: Option<String>,
    pub bot: bool,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Revision {
    pub content: String,
    pub edited_at: DateTime<Utc>,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Attachment {
    pub id: ID,
    pub filename: String,
    pub url: String,
    pub size: i32,
    pub content_type: Option<String>,
}

impl Attachment {
    /// Reads the worker's sanitised attachment list leniently: ids may be
    /// strings or numbers; entries without a url are dropped rather than
    /// failing the whole message.
    fn parse_list(v: &serde_json::Value) -> Vec<Attachment> {
        let Some(items) = v.as_array() else {
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|a| {
                let id = match a.get("id")? {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                let url = a.get("url")?.as_str()?.to_owned();
                Some(Attachment {
                    id: ID(id),
                    filename: a
                        .get("filename")
                        .and_then(|f| f.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                    url,
                    size: a
                        .get("size")
                        .and_then(|s| s.as_i64())
                        .map(|s| i32::try_from(s).unwrap_or(i32::MAX))
                        .unwrap_or(0),
                    content_type: a
                        .get("content_type")
                        .and_then(|c| c.as_str())
                        .map(str::to_owned),
                })
            })
            .collect()
    }
}

#[derive(SimpleObject, Debug, Clone)]
#[graphql(complex)]
pub struct Message {
    pub id: ID,
    pub guild_id: ID,
    pub channel_id: ID,
    pub author: Author,
    pub content: String,
    pub created_at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    /// When Discord reported the deletion (observed live; null if not deleted,
    /// or if the deletion was only detected later).
    pub deleted_at: Option<DateTime<Utc>>,
    /// When the observer noticed that Discord no longer has this message: it was
    /// deleted at an unknown earlier time, while the worker was not connected.
    /// Null unless the deletion was detected that way (then `deletedAt` is null).
    pub deletion_detected_at: Option<DateTime<Utc>>,
    pub attachments: Vec<Attachment>,
    pub reply_to_id: Option<ID>,
    #[graphql(skip)]
    pub key: (i64, i64),
    #[graphql(skip)]
    pub preloaded_revisions: Option<Vec<Revision>>,
}

impl From<MessageRow> for Message {
    fn from(m: MessageRow) -> Self {
        let author = Author {
            // A tombstone whose create was never seen has no author snapshot.
            id: id(m.author_id.unwrap_or(0)),
            username: m.author_username.unwrap_or_default(),
            display_name: m.author_display_name,
            avatar_url: match (m.author_id, m.author_avatar) {
                (Some(uid), Some(a)) if cdn_hash_ok(&a) => {
                    Some(format!("{CDN}/avatars/{uid}/{a}.png"))
                }
                _ => None,
            },
            bot: m.author_bot,
        };
        Self {
            id: id(m.message_id),
            guild_id: id(m.guild_id),
            channel_id: id(m.channel_id),
            author,
            content: m.content,
            created_at: m.created_at,
            edited_at: m.edited_at,
            deleted_at: m.deleted_at,
            deletion_detected_at: m.deletion_detected_at,
            attachments: Attachment::parse_list(&m.attachments),
            reply_to_id: m.reply_to_id.map(id),
            key: (m.guild_id, m.message_id),
            preloaded_revisions: None,
        }
    }
}

#[ComplexObject]
impl Message {
    /// Prior versions of the content, oldest first (the current one excluded).
    async fn revisions(&self, ctx: &Context<'_>) -> GqlResult<Vec<Revision>> {
        if let Some(r) = &self.preloaded_revisions {
            return Ok(r.clone());
        }
        let rdb = request_db(ctx)?;
        let mut tx = rdb.tx().await?;
        let rows = observer_db::viewer::revisions(&mut tx, &[self.key])
            .await
            .map_err(from_db)?;
        Ok(rows.into_iter().map(Revision::from).collect())
    }
}

impl From<RevisionRow> for Revision {
    fn from(r: RevisionRow) -> Self {
        Self {
            content: r.content,
            edited_at: r.version_at,
        }
    }
}

/// Attaches revisions loaded in one query to their messages.
pub fn attach_revisions(messages: &mut [Message], rows: Vec<RevisionRow>) {
    let mut by_key: std::collections::HashMap<(i64, i64), Vec<Revision>> = Default::default();
    for r in rows {
        by_key
            .entry((r.guild_id, r.message_id))
            .or_default()
            .push(Revision::from(r));
    }
    for m in messages {
        m.preloaded_revisions = Some(by_key.remove(&m.key).unwrap_or_default());
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct MessageConnection {
    pub edges: Vec<MessageEdge>,
    pub page_info: PageInfo,
    /// For a channel's history (`messages`): where the message event log stood
    /// when this page was read. `messageEvents(after:)` from it continues the
    /// page live with no gap; events the page already shows may come again,
    /// so apply them by message id. Null for search results.
    pub event_cursor: Option<String>,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct MessageEdge {
    pub cursor: String,
    pub node: Message,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct PageInfo {
    pub has_next_page: bool,
    pub end_cursor: Option<String>,
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum MessageEventKind {
    Created,
    Updated,
    Deleted,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct MessageEvent {
    pub kind: MessageEventKind,
    pub cursor: String,
    pub message: Message,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct NewApiToken {
    pub id: ID,
    pub name: String,
    /// Shown once; only its SHA-256 is stored.
    pub secret: String,
}

/// An API token as listed (never with its secret).
#[derive(SimpleObject, Debug, Clone)]
pub struct ApiToken {
    pub id: ID,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<observer_db::viewer::ApiTokenRow> for ApiToken {
    fn from(t: observer_db::viewer::ApiTokenRow) -> Self {
        Self {
            id: ID(t.token_id.to_string()),
            name: t.name,
            created_at: t.created_at,
            last_used_at: t.last_used_at,
            revoked_at: t.revoked_at,
        }
    }
}

/// Opaque cursors: base64url of a small versioned text form, so clients treat
/// them as tokens and the format can change without breaking the schema.
pub mod cursor {
    use super::*;
    use observer_db::events::Cursor;

    /// Wraps a cursor's text form.
    pub fn opaque(s: &str) -> String {
        enc(s)
    }

    /// Unwraps [`opaque`].
    pub fn unopaque(s: &str) -> Option<String> {
        dec(s)
    }

    fn enc(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    fn dec(s: &str) -> Option<String> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        String::from_utf8(bytes).ok()
    }

    /// The client form of an event cursor (versioned, base64url: clients treat
    /// it as a token).
    pub fn event(c: Cursor) -> String {
        enc(&format!("e1:{}:{}", c.xid, c.seq))
    }

    /// Parses [`event`]'s output; None for anything else.
    pub fn parse_event(s: &str) -> Option<Cursor> {
        if s.len() > 128 {
            return None;
        }
        let text = dec(s)?;
        let (xid, seq) = text.strip_prefix("e1:")?.split_once(':')?;
        let xid: i64 = xid.parse().ok().filter(|x| *x >= 0)?;
        // -1 is "before everything" (the start-of-log cursor).
        let seq: i64 = seq.parse().ok().filter(|s| *s >= -1)?;
        Some(Cursor::new(xid, seq))
    }

    pub fn history(message_id: i64) -> String {
        enc(&format!("h1:{message_id}"))
    }

    pub fn parse_history(s: &str) -> Option<i64> {
        dec(s)?.strip_prefix("h1:")?.parse().ok()
    }

    /// The rank travels as its exact bit pattern, so the next page compares
    /// against the very same `real` PostgreSQL computed.
    pub fn search(rank: f32, message_id: i64) -> String {
        enc(&format!("s1:{:08x}:{message_id}", rank.to_bits()))
    }

    pub fn parse_search(s: &str) -> Option<(f32, i64)> {
        let text = dec(s)?;
        let rest = text.strip_prefix("s1:")?;
        let (bits, id) = rest.split_once(':')?;
        let rank = f32::from_bits(u32::from_str_radix(bits, 16).ok()?);
        if !rank.is_finite() {
            return None;
        }
        Some((rank, id.parse().ok()?))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips() {
            assert_eq!(parse_history(&history(42)), Some(42));
            assert_eq!(parse_search(&search(0.0607927, 7)), Some((0.0607927, 7)));
            assert_eq!(parse_history("garbage!"), None);
            assert_eq!(parse_search(&history(1)), None);
        }
    }
}

#[cfg(test)]
mod cdn_tests {
    use super::cdn_hash_ok;

    #[test]
    fn only_plain_hashes_become_cdn_urls() {
        for ok in [
            "a_1269e74af4df7417b13759eae50c83dc",
            "8342729096ea3675442027381ff50dfe",
            "x",
        ] {
            assert!(cdn_hash_ok(ok), "{ok}");
        }
        for bad in [
            "",
            "../../evil",
            "a/b",
            "abc?x=1",
            "abc#f",
            "a.b",
            "a b",
            "é",
            "a%2F",
        ] {
            assert!(!cdn_hash_ok(bad), "{bad}");
        }
    }
}
