//! Writes from the ingestion worker: idempotent, order-independent upserts of
//! access data and messages, plus the message event log.
//!
//! The worker hands over plain data ([`IngestOp`], no serenity types) and
//! [`write_batch`] applies a whole batch inside one [`WorkerTx`] with a handful
//! of bulk statements.
//!
//! Messages converge under any arrival order and any number of repeats because
//! every message op is turned into a [`MsgState`] and states are combined with
//! [`MsgState::join`], which is commutative, associative and idempotent:
//! - content (with `edited_at` and attachments) is a *version* keyed by its time
//!   (`edited_at`, else `created_at`); the newest version wins;
//! - a delete is sticky (`deleted_at` is set once, never cleared);
//! - author / creation data fill in whenever they are first seen;
//! - every observed version goes into `message_revisions` (insert-only).
//!
//! The same join runs for ops on one message inside a batch (one statement
//! cannot touch a row twice) and against the stored row (read `for update`),
//! so the database never depends on which event came first.
//!
//! A `message_events` row is appended only when a message's stored state
//! actually changed; repeats produce none. NOTIFY is a trigger's job (policies/).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use sqlx::{PgConnection, Row};

use crate::{ingest_threads, Result, WorkerConn, WorkerTx};

pub use crate::ingest_threads::{purge_thread_member_removals, THREAD_MEMBER_REMOVAL_TTL};

/// Discord's epoch (2015-01-01T00:00:00Z) in Unix milliseconds.
pub const DISCORD_EPOCH_MS: i64 = 1_420_070_400_000;

/// Channel types that are threads (announcement, public, private).
pub const THREAD_KINDS: [i16; 3] = [10, 11, 12];

/// Caps on stored text, in bytes. Discord's own limits are lower; these only
/// stop a misbehaving source from bloating rows.
pub const MAX_CONTENT_BYTES: usize = 16 * 1024;
pub const MAX_NAME_BYTES: usize = 512;
pub const MAX_TOPIC_BYTES: usize = 4 * 1024;

/// Creation time encoded in a snowflake.
pub fn snowflake_time(id: i64) -> DateTime<Utc> {
    let ms = (id >> 22).saturating_add(DISCORD_EPOCH_MS);
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// The smallest snowflake created at `t` (for "messages older than t" bounds).
pub fn snowflake_at(t: DateTime<Utc>) -> i64 {
    (t.timestamp_millis() - DISCORD_EPOCH_MS).max(0) << 22
}

/// Strips control characters (keeping newline and tab) and caps the size at a
/// char boundary. Rust strings are valid UTF-8 already; NUL would be refused by
/// PostgreSQL, the rest could mislead terminals and log viewers.
pub fn sanitize(s: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_bytes));
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            continue;
        }
        if out.len() + c.len_utf8() > max_bytes {
            break;
        }
        out.push(c);
    }
    out
}

fn sanitize_opt(s: Option<&str>, max: usize) -> Option<String> {
    s.map(|s| sanitize(s, max))
}

// ---------------------------------------------------------------------------
// Plain input types
// ---------------------------------------------------------------------------

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
    fn of(ops: &[IngestOp]) -> Self {
        Self {
            ops: ops.len(),
            ..Self::default()
        }
    }

    fn count_event(&mut self, kind: i16) {
        match kind {
            1 => self.events_created += 1,
            2 => self.events_updated += 1,
            _ => self.events_deleted += 1,
        }
    }
}

// ---------------------------------------------------------------------------
// Message state lattice
// ---------------------------------------------------------------------------

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
    fn visible_eq(&self, other: &MsgState) -> bool {
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
    fn stored_eq(&self, other: &MsgState) -> bool {
        self.visible_eq(other)
            && self.version_at() == other.version_at()
            && self.attachments_known() == other.attachments_known()
    }

    fn version_at(&self) -> Option<DateTime<Utc>> {
        self.version.as_ref().map(|v| v.at)
    }

    fn attachments_known(&self) -> bool {
        self.version
            .as_ref()
            .is_some_and(|v| v.attachments.is_some())
    }

    fn content(&self) -> &str {
        self.version.as_ref().map_or("", |v| v.content.as_str())
    }

    fn edited_at(&self) -> Option<DateTime<Utc>> {
        self.version.as_ref().and_then(|v| v.edited_at)
    }

    fn attachments(&self) -> Value {
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

// ---------------------------------------------------------------------------
// Batch
// ---------------------------------------------------------------------------

/// Applies `ops` in one transaction with few statements. Access ops are applied
/// in the order given (runs of the same kind in one statement); message ops are
/// merged per message and applied in bulk.
pub async fn write_batch(tx: &mut WorkerTx, ops: &[IngestOp]) -> Result<BatchStats> {
    write_batch_in(tx, ops).await
}

/// [`write_batch`] on the writer's own session ([`crate::Db::worker_conn`]),
/// committed. A batch of message creates only (live traffic) is first written
/// as one autocommit statement: one round trip instead of three (`begin`,
/// the statement, `commit`), and round trips are most of an event's latency
/// on a busy machine. Creates that met a stored row (a replay or backfill
/// overlap) are then merged in a transaction; that split is safe because the
/// first statement only adds new rows, their events and their first
/// versions, each of which is true history on its own, and a retry of the
/// whole batch finds them stored and changes nothing. Any other batch runs
/// in one transaction, as [`write_batch`].
pub async fn write_batch_on(session: &mut WorkerConn, ops: &[IngestOp]) -> Result<BatchStats> {
    if !ops
        .iter()
        .all(|op| matches!(op, IngestOp::MessageCreate(_)))
    {
        let mut tx = session.begin().await?;
        let stats = write_batch_in(&mut tx, ops).await?;
        tx.commit().await?;
        return Ok(stats);
    }
    let mut stats = BatchStats::of(ops);
    let (merged, mut revisions) = prepare_messages(ops, &mut stats);
    let left = write_rounds(session.conn(), merged, &mut revisions, &mut stats, 0..1).await?;
    if !left.is_empty() {
        let mut tx = session.begin().await?;
        let left = write_rounds(&mut tx, left, &mut revisions, &mut stats, 1..ROUNDS).await?;
        settled(&left)?;
        tx.commit().await?;
    }
    Ok(stats)
}

/// Message ops merged per message (one state each) and their versions.
type Merged = (
    BTreeMap<(i64, i64), MsgState>,
    HashSet<(i64, i64, DateTime<Utc>, String)>,
);

/// The message ops of `ops` merged and counted, ready for [`write_rounds`].
fn prepare_messages(
    ops: &[IngestOp],
    stats: &mut BatchStats,
) -> (BTreeMap<(i64, i64), MsgState>, Option<Revisions>) {
    let (merged, revisions) = merge_messages(ops, Utc::now());
    stats.messages = merged.len();
    stats.revisions_offered = revisions.len();
    (merged, Some(Revisions::from(revisions)))
}

/// Merges the message ops of `ops` (others are skipped), `now` standing for
/// the time of deletes.
fn merge_messages(ops: &[IngestOp], now: DateTime<Utc>) -> Merged {
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

async fn write_batch_in(conn: &mut PgConnection, ops: &[IngestOp]) -> Result<BatchStats> {
    let mut stats = BatchStats::of(ops);
    // Access ops apply in order, in runs of one kind; message ops are
    // merged (one state and a set of versions per message) and written last.
    let mut run: Vec<&IngestOp> = Vec::new();
    for access in ops.iter().filter(|op| op.is_access()) {
        stats.access_ops += 1;
        if let Some(prev) = run.last() {
            if std::mem::discriminant(*prev) != std::mem::discriminant(access) || !batchable(access)
            {
                apply_access_run(conn, &run).await?;
                run.clear();
            }
        }
        run.push(access);
    }
    if !run.is_empty() {
        apply_access_run(conn, &run).await?;
    }

    let (merged, mut revisions) = prepare_messages(ops, &mut stats);
    let left = write_rounds(conn, merged, &mut revisions, &mut stats, 0..ROUNDS).await?;
    settled(&left)?;
    // After the merge: a deletion reported live in this same batch keeps its
    // own time (`mark_gone` skips tombstones).
    for op in ops {
        if let IngestOp::MessagesGone {
            guild_id,
            channel_id,
            message_ids,
            detected_at,
        } = op
        {
            let n = crate::reconcile::mark_gone(
                conn,
                *guild_id,
                *channel_id,
                message_ids,
                *detected_at,
            )
            .await?;
            stats.messages_changed += usize::try_from(n).unwrap_or(0);
            stats.events_deleted += usize::try_from(n).unwrap_or(0);
        }
    }
    Ok(stats)
}

/// Rounds of [`write_rounds`] before giving up on concurrent writers.
const ROUNDS: u32 = 8;

fn settled(left: &BTreeMap<(i64, i64), MsgState>) -> Result<()> {
    if left.is_empty() {
        return Ok(());
    }
    Err(crate::Error::Conflict(format!(
        "{} messages kept conflicting with concurrent writers",
        left.len()
    )))
}

fn batchable(op: &IngestOp) -> bool {
    matches!(
        op,
        IngestOp::ChannelUpsert(_)
            | IngestOp::RoleUpsert(_)
            | IngestOp::MemberUpsert(_)
            | IngestOp::ChannelBotAccess(_)
    )
}

async fn apply_access_run(conn: &mut PgConnection, run: &[&IngestOp]) -> Result<()> {
    let Some(first) = run.first() else {
        return Ok(());
    };
    match first {
        IngestOp::ChannelUpsert(_) => {
            let chans: Vec<ChannelInfo> = run
                .iter()
                .filter_map(|op| match op {
                    IngestOp::ChannelUpsert(c) => Some(c.clone()),
                    _ => None,
                })
                .collect();
            upsert_channels(conn, &last_by_key(chans, |c| (c.guild_id, c.channel_id))).await
        }
        IngestOp::RoleUpsert(_) => {
            let roles: Vec<RoleInfo> = run
                .iter()
                .filter_map(|op| match op {
                    IngestOp::RoleUpsert(r) => Some(r.clone()),
                    _ => None,
                })
                .collect();
            upsert_roles(conn, &last_by_key(roles, |r| (r.guild_id, r.role_id))).await
        }
        IngestOp::ChannelBotAccess(_) => {
            let obs: Vec<&crate::bot_access::BotAccessObservation> = run
                .iter()
                .filter_map(|op| match op {
                    IngestOp::ChannelBotAccess(o) => Some(o),
                    _ => None,
                })
                .collect();
            crate::bot_access::apply(conn, &obs).await
        }
        IngestOp::MemberUpsert(_) => {
            let members: Vec<MemberInfo> = run
                .iter()
                .filter_map(|op| match op {
                    IngestOp::MemberUpsert(m) => Some(m.clone()),
                    _ => None,
                })
                .collect();
            upsert_members(conn, &newest_members(members)).await
        }
        _ => {
            for op in run {
                apply_access(conn, op).await?;
            }
            Ok(())
        }
    }
}

/// Keeps the newest observation per member (the later one on a tie): one
/// statement may not touch a row twice.
pub(crate) fn newest_members(mut members: Vec<MemberInfo>) -> Vec<MemberInfo> {
    // Stable: equal times keep their order, so the later op stays last.
    members.sort_by_key(|m| m.observed_at);
    last_by_key(members, |m| (m.guild_id, m.user_id))
}

/// Keeps the last item per key (one statement may not touch a row twice).
fn last_by_key<T, K: std::hash::Hash + Eq>(items: Vec<T>, key: impl Fn(&T) -> K) -> Vec<T> {
    let mut idx: HashMap<K, usize> = HashMap::new();
    let mut out: Vec<Option<T>> = Vec::with_capacity(items.len());
    for it in items {
        let k = key(&it);
        if let Some(&i) = idx.get(&k) {
            out[i] = None;
        }
        idx.insert(k, out.len());
        out.push(Some(it));
    }
    out.into_iter().flatten().collect()
}

async fn apply_access(conn: &mut PgConnection, op: &IngestOp) -> Result<()> {
    match op {
        IngestOp::GuildCreate(snap) => guild_snapshot(conn, snap).await,
        IngestOp::GuildUpdate(g) => upsert_guild(conn, g, None).await,
        IngestOp::GuildRemoved {
            guild_id,
            observed_at,
        } => ingest_threads::guild_removed(conn, *guild_id, *observed_at).await,
        IngestOp::GuildUnavailable { guild_id } => {
            sqlx::query(
                "update guilds set unavailable = true, updated_at = now()
                 where guild_id = $1 and not unavailable",
            )
            .bind(guild_id)
            .execute(&mut *conn)
            .await?;
            Ok(())
        }
        IngestOp::ChannelUpsert(c) => upsert_channels(conn, std::slice::from_ref(c)).await,
        IngestOp::ChannelDelete {
            guild_id,
            channel_id,
        } => delete_channel(conn, *guild_id, *channel_id).await,
        IngestOp::ThreadListSync {
            guild_id,
            threads,
            members,
            observed_at,
        } => {
            upsert_channels(conn, threads).await?;
            let (t, u): (Vec<i64>, Vec<i64>) = members.iter().copied().unzip();
            ingest_threads::add_thread_members(conn, *guild_id, &t, &u, *observed_at).await
        }
        IngestOp::ThreadMembers {
            guild_id,
            thread_id,
            added,
            removed,
            observed_at,
        } => {
            ingest_threads::remove_thread_members(
                conn,
                *guild_id,
                *thread_id,
                removed,
                *observed_at,
            )
            .await?;
            let t = vec![*thread_id; added.len()];
            ingest_threads::add_thread_members(conn, *guild_id, &t, added, *observed_at).await
        }
        IngestOp::ThreadMembersSync {
            guild_id,
            thread_id,
            user_ids,
            observed_at,
        } => {
            ingest_threads::sync_thread_members(conn, *guild_id, *thread_id, user_ids, *observed_at)
                .await
        }
        IngestOp::MembersSync {
            guild_id,
            members,
            observed_at,
        } => ingest_threads::sync_members(conn, *guild_id, members, *observed_at).await,
        IngestOp::RoleUpsert(r) => upsert_roles(conn, std::slice::from_ref(r)).await,
        IngestOp::RolesSync { guild_id, roles } => sync_roles(conn, *guild_id, roles).await,
        IngestOp::RoleDelete { guild_id, role_id } => {
            sqlx::query("delete from roles where guild_id = $1 and role_id = $2")
                .bind(guild_id)
                .bind(role_id)
                .execute(&mut *conn)
                .await?;
            // Discord strips the role from its members without sending member
            // updates. (Its overwrites stay until a CHANNEL_UPDATE says
            // otherwise; a role nobody holds grants nothing anyway.)
            sqlx::query(
                "update members set role_ids = array_remove(role_ids, $2), updated_at = now()
                 where guild_id = $1 and $2 = any(role_ids)",
            )
            .bind(guild_id)
            .bind(role_id)
            .execute(&mut *conn)
            .await?;
            Ok(())
        }
        IngestOp::MemberUpsert(m) => upsert_members(conn, std::slice::from_ref(m)).await,
        IngestOp::ChannelBotAccess(o) => crate::bot_access::apply(conn, &[o]).await,
        IngestOp::MemberRemove {
            guild_id,
            user_id,
            observed_at,
        } => remove_members(conn, *guild_id, &[*user_id], *observed_at, true)
            .await
            .map(|_| ()),
        IngestOp::MessageCreate(_)
        | IngestOp::MessageUpdate(_)
        | IngestOp::MessageDelete { .. }
        | IngestOp::MessageBulkDelete { .. }
        | IngestOp::MessagesGone { .. } => Ok(()),
    }
}

/// Writes a guild's own fields. Only `rejoined` (GUILD_CREATE: the bot is in
/// the guild and it is available, observed at that time) clears `removed_at`
/// and `unavailable`, and only if no later presence observation (a
/// GUILD_DELETE received after it) is stored: handlers run concurrently, so a
/// GUILD_UPDATE or an older GUILD_CREATE may be written after a GUILD_DELETE
/// that Discord sent later, and must not resurrect the guild.
async fn upsert_guild(
    conn: &mut PgConnection,
    g: &GuildInfo,
    rejoined: Option<DateTime<Utc>>,
) -> Result<()> {
    // observer_role_ids and retention are tenant settings: never touched here.
    sqlx::query(
        "insert into guilds (guild_id, name, icon, owner_id, presence_observed_at)
         values ($1, $2, $3, $4, coalesce($5::timestamptz, '-infinity'))
         on conflict (guild_id) do update
           set name = excluded.name, icon = excluded.icon, owner_id = excluded.owner_id,
               removed_at = case when $5 > guilds.presence_observed_at then null
                                 else guilds.removed_at end,
               unavailable = case when $5 > guilds.presence_observed_at then false
                                  else guilds.unavailable end,
               presence_observed_at = greatest(guilds.presence_observed_at,
                                               coalesce($5, '-infinity')),
               updated_at = now()
           where (guilds.name, guilds.icon, guilds.owner_id) is distinct from
                 (excluded.name, excluded.icon, excluded.owner_id)
              or $5 > guilds.presence_observed_at",
    )
    .bind(g.guild_id)
    .bind(sanitize(&g.name, MAX_NAME_BYTES))
    .bind(sanitize_opt(g.icon.as_deref(), MAX_NAME_BYTES))
    .bind(g.owner_id)
    .bind(rejoined)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn guild_snapshot(conn: &mut PgConnection, s: &GuildSnapshot) -> Result<()> {
    let gid = s.guild.guild_id;
    upsert_guild(conn, &s.guild, Some(s.observed_at)).await?;

    sync_roles(conn, gid, &s.roles).await?;

    let channel_ids: Vec<i64> = s.channels.iter().map(|c| c.channel_id).collect();
    let gone: Vec<i64> = sqlx::query_scalar(
        "delete from channels where guild_id = $1 and channel_id <> all($2)
           and not (kind = any($3))
         returning channel_id",
    )
    .bind(gid)
    .bind(&channel_ids)
    .bind(&THREAD_KINDS[..])
    .fetch_all(&mut *conn)
    .await?;
    if !gone.is_empty() {
        delete_channel_children(conn, gid, &gone).await?;
    }
    let mut all = s.channels.clone();
    all.extend(s.threads.iter().cloned());
    upsert_channels(conn, &last_by_key(all, |c| c.channel_id)).await?;
    upsert_members(conn, &newest_members(s.members.clone())).await?;
    Ok(())
}

async fn sync_roles(conn: &mut PgConnection, guild_id: i64, roles: &[RoleInfo]) -> Result<()> {
    let roles = last_by_key(roles.to_vec(), |r| r.role_id);
    let role_ids: Vec<i64> = roles.iter().map(|r| r.role_id).collect();
    sqlx::query("delete from roles where guild_id = $1 and role_id <> all($2)")
        .bind(guild_id)
        .bind(&role_ids)
        .execute(&mut *conn)
        .await?;
    upsert_roles(conn, &roles).await
}

async fn upsert_roles(conn: &mut PgConnection, roles: &[RoleInfo]) -> Result<()> {
    if roles.is_empty() {
        return Ok(());
    }
    let g: Vec<i64> = roles.iter().map(|r| r.guild_id).collect();
    let id: Vec<i64> = roles.iter().map(|r| r.role_id).collect();
    let name: Vec<String> = roles
        .iter()
        .map(|r| sanitize(&r.name, MAX_NAME_BYTES))
        .collect();
    let perm: Vec<i64> = roles.iter().map(|r| r.permissions).collect();
    let pos: Vec<i32> = roles.iter().map(|r| r.position).collect();
    sqlx::query(
        "insert into roles (guild_id, role_id, name, permissions, position)
         select * from unnest($1::int8[], $2::int8[], $3::text[], $4::int8[], $5::int4[])
         on conflict (guild_id, role_id) do update
           set name = excluded.name, permissions = excluded.permissions, position = excluded.position
           where (roles.name, roles.permissions, roles.position)
                 is distinct from (excluded.name, excluded.permissions, excluded.position)",
    )
    .bind(&g)
    .bind(&id)
    .bind(&name)
    .bind(&perm)
    .bind(&pos)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The one member write, shared by the worker and the login path
/// ([`crate::auth::replace_memberships`]). A row is written only if it was
/// observed later than the stored row and than the member's last recorded
/// removal (or the last complete listing of the guild's members, a tombstone
/// for user 0: see `ingest_threads`); `observed_at` advances even when nothing else changed, so an older
/// observation arriving afterwards cannot undo a newer one.
///
/// Left open: a removal and an older add committed by two transactions at
/// the very same moment can still re-add the member (the add read no
/// tombstone yet). The worker's re-read of the member (scheduled on every
/// member event) corrects that within its delay.
pub(crate) async fn upsert_members(conn: &mut PgConnection, members: &[MemberInfo]) -> Result<()> {
    if members.is_empty() {
        return Ok(());
    }
    let g: Vec<i64> = members.iter().map(|m| m.guild_id).collect();
    let u: Vec<i64> = members.iter().map(|m| m.user_id).collect();
    // A 2-D array must be rectangular; ship role lists as text and split in SQL.
    let roles: Vec<String> = members
        .iter()
        .map(|m| {
            let mut ids = m.role_ids.clone();
            ids.sort_unstable();
            ids.dedup();
            ids.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let nick: Vec<Option<String>> = members
        .iter()
        .map(|m| sanitize_opt(m.nick.as_deref(), MAX_NAME_BYTES))
        .collect();
    let joined: Vec<Option<DateTime<Utc>>> = members.iter().map(|m| m.joined_at).collect();
    let timeout: Vec<Option<DateTime<Utc>>> = members
        .iter()
        .map(|m| m.communication_disabled_until)
        .collect();
    let observed: Vec<DateTime<Utc>> = members.iter().map(|m| m.observed_at).collect();
    sqlx::query(
        "insert into members (guild_id, user_id, role_ids, nick, joined_at,
                              communication_disabled_until, observed_at)
         select g, u, coalesce(string_to_array(nullif(r, ''), ',')::int8[], '{}'), n, j, t, o
         from unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::timestamptz[],
                     $6::timestamptz[], $7::timestamptz[])
              as x(g, u, r, n, j, t, o)
         where not exists (select 1 from member_removals d
                           where d.guild_id = x.g
                             and ((d.user_id = x.u and d.observed_at >= x.o)
                                  or (d.user_id = 0 and d.observed_at > x.o)))
         on conflict (guild_id, user_id) do update
           set role_ids = excluded.role_ids, nick = excluded.nick,
               joined_at = coalesce(excluded.joined_at, members.joined_at),
               communication_disabled_until = excluded.communication_disabled_until,
               observed_at = excluded.observed_at,
               updated_at = case
                 when (members.role_ids, members.nick, members.joined_at,
                       members.communication_disabled_until)
                      is distinct from (excluded.role_ids, excluded.nick,
                                        coalesce(excluded.joined_at, members.joined_at),
                                        excluded.communication_disabled_until)
                 then now() else members.updated_at end
           where members.observed_at < excluded.observed_at",
    )
    .bind(&g)
    .bind(&u)
    .bind(&roles)
    .bind(&nick)
    .bind(&joined)
    .bind(&timeout)
    .bind(&observed)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records the removal of `user_ids` from a guild observed at `observed_at`
/// and deletes their member rows unless those were observed later (a re-join
/// handled first). With `threads`, their thread memberships go too (the login
/// path has no access to `thread_members` and leaves them to the worker).
/// Returns the users whose rows were deleted.
pub(crate) async fn remove_members(
    conn: &mut PgConnection,
    guild_id: i64,
    user_ids: &[i64],
    observed_at: DateTime<Utc>,
    threads: bool,
) -> Result<Vec<i64>> {
    if user_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query(
        "insert into member_removals (guild_id, user_id, observed_at)
         select $1, u, $3 from unnest($2::int8[]) as u
         on conflict (guild_id, user_id) do update
           set observed_at = excluded.observed_at
           where member_removals.observed_at < excluded.observed_at",
    )
    .bind(guild_id)
    .bind(user_ids)
    .bind(observed_at)
    .execute(&mut *conn)
    .await?;
    let gone: Vec<i64> = sqlx::query_scalar(
        "delete from members
         where guild_id = $1 and user_id = any($2) and observed_at < $3
         returning user_id",
    )
    .bind(guild_id)
    .bind(user_ids)
    .bind(observed_at)
    .fetch_all(&mut *conn)
    .await?;
    if !threads {
        return Ok(gone);
    }
    // Thread memberships go with the guild membership, unless the member row
    // is newer than this removal (re-joined; those threads are current).
    sqlx::query(
        "delete from thread_members t
         where t.guild_id = $1 and t.user_id = any($2)
           and not exists (select 1 from members m
                           where m.guild_id = t.guild_id and m.user_id = t.user_id)",
    )
    .bind(guild_id)
    .bind(user_ids)
    .execute(&mut *conn)
    .await?;
    Ok(gone)
}

async fn upsert_channels(conn: &mut PgConnection, chans: &[ChannelInfo]) -> Result<()> {
    if chans.is_empty() {
        return Ok(());
    }
    let g: Vec<i64> = chans.iter().map(|c| c.guild_id).collect();
    let id: Vec<i64> = chans.iter().map(|c| c.channel_id).collect();
    let kind: Vec<i16> = chans.iter().map(|c| c.kind).collect();
    let name: Vec<String> = chans
        .iter()
        .map(|c| sanitize(&c.name, MAX_NAME_BYTES))
        .collect();
    let parent: Vec<Option<i64>> = chans.iter().map(|c| c.parent_id).collect();
    let pos: Vec<i32> = chans.iter().map(|c| c.position).collect();
    let topic: Vec<Option<String>> = chans
        .iter()
        .map(|c| sanitize_opt(c.topic.as_deref(), MAX_TOPIC_BYTES))
        .collect();
    let archived: Vec<bool> = chans.iter().map(|c| c.archived).collect();
    let owner: Vec<Option<i64>> = chans.iter().map(|c| c.owner_id).collect();
    sqlx::query(
        "insert into channels (guild_id, channel_id, kind, name, parent_id, position, topic, archived, owner_id)
         select * from unnest($1::int8[], $2::int8[], $3::int2[], $4::text[], $5::int8[],
                              $6::int4[], $7::text[], $8::bool[], $9::int8[])
         on conflict (guild_id, channel_id) do update
           set kind = excluded.kind, name = excluded.name, parent_id = excluded.parent_id,
               position = excluded.position, topic = excluded.topic, archived = excluded.archived,
               owner_id = excluded.owner_id, updated_at = now()
           where (channels.kind, channels.name, channels.parent_id, channels.position,
                  channels.topic, channels.archived, channels.owner_id)
                 is distinct from (excluded.kind, excluded.name, excluded.parent_id, excluded.position,
                                   excluded.topic, excluded.archived, excluded.owner_id)",
    )
    .bind(&g)
    .bind(&id)
    .bind(&kind)
    .bind(&name)
    .bind(&parent)
    .bind(&pos)
    .bind(&topic)
    .bind(&archived)
    .bind(&owner)
    .execute(&mut *conn)
    .await?;

    // Overwrites are replaced as a set per channel. Threads have none of their
    // own that matter, but whatever Discord sends is mirrored the same way.
    let mut og = Vec::new();
    let mut oc = Vec::new();
    let mut ot = Vec::new();
    let mut ok = Vec::new();
    let mut oa = Vec::new();
    let mut od = Vec::new();
    for c in chans {
        let ows = last_by_key(c.overwrites.clone(), |o| (o.target_id, o.kind));
        for o in ows.iter().filter(|o| o.kind == 0 || o.kind == 1) {
            og.push(c.guild_id);
            oc.push(c.channel_id);
            ot.push(o.target_id);
            ok.push(o.kind);
            oa.push(o.allow);
            od.push(o.deny);
        }
    }
    sqlx::query(
        "delete from permission_overwrites p
         using unnest($1::int8[], $2::int8[]) as c(g, id)
         where p.guild_id = c.g and p.channel_id = c.id
           and (p.target_id, p.kind) not in (
               select n.t, n.k from unnest($3::int8[], $4::int8[], $5::int8[], $6::int2[]) as n(g, c, t, k)
               where n.g = p.guild_id and n.c = p.channel_id)",
    )
    .bind(&g)
    .bind(&id)
    .bind(&og)
    .bind(&oc)
    .bind(&ot)
    .bind(&ok)
    .execute(&mut *conn)
    .await?;
    if !og.is_empty() {
        sqlx::query(
            "insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny)
             select * from unnest($1::int8[], $2::int8[], $3::int8[], $4::int2[], $5::int8[], $6::int8[])
             on conflict (guild_id, channel_id, target_id, kind) do update
               set allow = excluded.allow, deny = excluded.deny
               where (permission_overwrites.allow, permission_overwrites.deny)
                     is distinct from (excluded.allow, excluded.deny)",
        )
        .bind(&og)
        .bind(&oc)
        .bind(&ot)
        .bind(&ok)
        .bind(&oa)
        .bind(&od)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn delete_channel(conn: &mut PgConnection, guild_id: i64, channel_id: i64) -> Result<()> {
    // Deleting a channel deletes its threads too (Discord does not always send
    // THREAD_DELETE for them).
    let gone: Vec<i64> = sqlx::query_scalar(
        "delete from channels
         where guild_id = $1
           and (channel_id = $2 or (parent_id = $2 and kind = any($3)))
         returning channel_id",
    )
    .bind(guild_id)
    .bind(channel_id)
    .bind(&THREAD_KINDS[..])
    .fetch_all(&mut *conn)
    .await?;
    let mut ids = gone;
    if !ids.contains(&channel_id) {
        ids.push(channel_id);
    }
    delete_channel_children(conn, guild_id, &ids).await
}

async fn delete_channel_children(
    conn: &mut PgConnection,
    guild_id: i64,
    ids: &[i64],
) -> Result<()> {
    sqlx::query("delete from permission_overwrites where guild_id = $1 and channel_id = any($2)")
        .bind(guild_id)
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    sqlx::query("delete from thread_members where guild_id = $1 and thread_id = any($2)")
        .bind(guild_id)
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Messages in bulk
// ---------------------------------------------------------------------------

const MESSAGE_COLUMNS: &str = "guild_id, message_id, channel_id, author_id, author_username, \
     author_display_name, author_avatar, author_bot, content, created_at, edited_at, deleted_at, \
     attachments, reply_to_id, seen_create, version_at, attachments_known";

fn row_to_state(row: &sqlx::postgres::PgRow) -> Result<MsgState> {
    let author_id: Option<i64> = row.try_get("author_id")?;
    let author = match author_id {
        Some(id) => Some(Author {
            id,
            username: row
                .try_get::<Option<String>, _>("author_username")?
                .unwrap_or_default(),
            display_name: row.try_get("author_display_name")?,
            avatar: row.try_get("author_avatar")?,
            bot: row.try_get("author_bot")?,
        }),
        None => None,
    };
    let seen_create: bool = row.try_get("seen_create")?;
    let created_at: DateTime<Utc> = row.try_get("created_at")?;
    let edited_at: Option<DateTime<Utc>> = row.try_get("edited_at")?;
    let content: String = row.try_get("content")?;
    let attachments: Value = row.try_get("attachments")?;
    // Recorded explicitly by every write from here. A row with its create
    // seen but no version_at was written by something else (a fixture, a
    // manual fix): its create is its version.
    let version_at: Option<DateTime<Utc>> = row.try_get("version_at")?;
    let version_at = version_at.or_else(|| seen_create.then(|| edited_at.unwrap_or(created_at)));
    let attachments_known = row.try_get::<bool, _>("attachments_known")? || seen_create;
    Ok(MsgState {
        guild_id: row.try_get("guild_id")?,
        message_id: row.try_get("message_id")?,
        channel_id: row.try_get("channel_id")?,
        author,
        created_at,
        seen_create,
        reply_to_id: row.try_get("reply_to_id")?,
        version: version_at.map(|at| Version {
            at,
            edited_at,
            content,
            attachments: attachments_known.then_some(attachments),
        }),
        deleted_at: row.try_get("deleted_at")?,
    })
}

/// Column arrays for a set of message states.
#[derive(Default)]
struct MsgColumns {
    g: Vec<i64>,
    id: Vec<i64>,
    ch: Vec<i64>,
    aid: Vec<Option<i64>>,
    aname: Vec<Option<String>>,
    adisp: Vec<Option<String>>,
    aav: Vec<Option<String>>,
    abot: Vec<bool>,
    content: Vec<String>,
    created: Vec<DateTime<Utc>>,
    edited: Vec<Option<DateTime<Utc>>>,
    deleted: Vec<Option<DateTime<Utc>>>,
    att: Vec<Value>,
    reply: Vec<Option<i64>>,
    seen: Vec<bool>,
    vat: Vec<Option<DateTime<Utc>>>,
    aknown: Vec<bool>,
}

impl MsgColumns {
    fn push(&mut self, s: &MsgState) {
        self.g.push(s.guild_id);
        self.id.push(s.message_id);
        self.ch.push(s.channel_id);
        self.aid.push(s.author.as_ref().map(|a| a.id));
        self.aname
            .push(s.author.as_ref().map(|a| a.username.clone()));
        self.adisp
            .push(s.author.as_ref().and_then(|a| a.display_name.clone()));
        self.aav
            .push(s.author.as_ref().and_then(|a| a.avatar.clone()));
        self.abot.push(s.author.as_ref().is_some_and(|a| a.bot));
        self.content.push(s.content().to_owned());
        self.created.push(s.created_at);
        self.edited.push(s.edited_at());
        self.deleted.push(s.deleted_at);
        self.att.push(s.attachments());
        self.reply.push(s.reply_to_id);
        self.seen.push(s.seen_create);
        self.vat.push(s.version_at());
        self.aknown.push(s.attachments_known());
    }

    fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(&self.g)
            .bind(&self.id)
            .bind(&self.ch)
            .bind(&self.aid)
            .bind(&self.aname)
            .bind(&self.adisp)
            .bind(&self.aav)
            .bind(&self.abot)
            .bind(&self.content)
            .bind(&self.created)
            .bind(&self.edited)
            .bind(&self.deleted)
            .bind(&self.att)
            .bind(&self.reply)
            .bind(&self.seen)
            .bind(&self.vat)
            .bind(&self.aknown)
    }
}

const UNNEST_MESSAGES: &str = "unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::text[], \
     $6::text[], $7::text[], $8::bool[], $9::text[], $10::timestamptz[], $11::timestamptz[], \
     $12::timestamptz[], $13::jsonb[], $14::int8[], $15::bool[], $16::timestamptz[], $17::bool[])";

/// Writes the merged message states, their events and the offered revisions.
/// Per round: a locking read of the stored rows (not in the first,
/// optimistic round), an update of the changed ones (only when there are
/// any), and one statement that inserts the new rows, the round's events and
/// the revisions. A batch of new messages is one round trip; round trips are
/// what an event's latency is made of when the machine is busy.
///
/// Runs `rounds` (round 0 being the optimistic one) and returns what is still
/// pending after them; `revisions` are written with the first round that
/// writes anything.
async fn write_rounds(
    conn: &mut PgConnection,
    mut pending: BTreeMap<(i64, i64), MsgState>,
    revisions: &mut Option<Revisions>,
    stats: &mut BatchStats,
    rounds: std::ops::Range<u32>,
) -> Result<BTreeMap<(i64, i64), MsgState>> {
    // The first round is optimistic: every message is inserted as new (most
    // live traffic is new messages, and this saves the locking read's round
    // trip); the ones that already exist come back from the insert's
    // conflict and take the second round, which reads and merges them.
    // Later rounds only happen when a concurrent writer inserted a row
    // between our read and our insert.
    for round in rounds {
        if pending.is_empty() {
            break;
        }
        let existing = if round > 0 {
            lock_stored(conn, &pending).await?
        } else {
            HashMap::new()
        };

        let mut inserts = MsgColumns::default();
        let mut insert_states: Vec<MsgState> = Vec::new();
        let mut updates = MsgColumns::default();
        let mut events = EventColumns::default();
        for (key, incoming) in &pending {
            match existing.get(key) {
                None => {
                    inserts.push(incoming);
                    insert_states.push(incoming.clone());
                }
                Some(old) => {
                    let new = old.join(incoming);
                    if !old.stored_eq(&new) {
                        updates.push(&new);
                    }
                    if !old.visible_eq(&new) {
                        let kind = if new.deleted_at.is_some() && old.deleted_at.is_none() {
                            3
                        } else {
                            2
                        };
                        events.push(new.guild_id, kind, new.channel_id, new.message_id);
                    }
                }
            }
        }

        if !updates.g.is_empty() {
            // Planned for each execution (an unnamed statement: one more
            // round trip, on edits and deletes only): a cached generic plan
            // of this join, made while the table was small, scanned all of
            // `messages` on every later batch (see the lookup above).
            let n = updates
                .bind(sqlx::query(&format!(
                    "update messages m set
                       channel_id = u.channel_id, author_id = u.author_id,
                       author_username = u.author_username,
                       author_display_name = u.author_display_name,
                       author_avatar = u.author_avatar, author_bot = u.author_bot,
                       content = u.content, created_at = u.created_at, edited_at = u.edited_at,
                       deleted_at = u.deleted_at, attachments = u.attachments,
                       reply_to_id = u.reply_to_id, seen_create = u.seen_create,
                       version_at = u.version_at, attachments_known = u.attachments_known
                     from {UNNEST_MESSAGES} as u({MESSAGE_COLUMNS})
                     where m.guild_id = u.guild_id and m.message_id = u.message_id"
                )))
                .persistent(false)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            stats.messages_changed += n as usize;
        }

        let revs = revisions.take().unwrap_or_default();
        if inserts.g.is_empty() && events.g.is_empty() && revs.g.is_empty() {
            // Nothing new (a replay): done.
            pending.clear();
            continue;
        }
        // The new rows, then one event per new row and per visible change, in
        // message-id order (a subscriber sees a channel's messages in
        // creation order when they arrive together), and the revisions. The
        // CTEs all run; RETURNING says which inserts took (a concurrent
        // writer may have won the others).
        let sql = format!(
            "with ins as (
               insert into messages ({MESSAGE_COLUMNS})
               select * from {UNNEST_MESSAGES}
               on conflict (guild_id, message_id) do nothing
               returning guild_id, message_id, channel_id, deleted_at
             ), ev as (
               insert into message_events (guild_id, kind, channel_id, message_id)
               select g, k, c, m from (
                 select guild_id, (case when deleted_at is null then 1 else 3 end)::int2,
                        channel_id, message_id
                 from ins
                 union all
                 select * from unnest($18::int8[], $19::int2[], $20::int8[], $21::int8[])
               ) as e(g, k, c, m)
               order by m, k
             ), rev as (
               insert into message_revisions (guild_id, message_id, version_at, content)
               select * from unnest($22::int8[], $23::int8[], $24::timestamptz[], $25::text[])
               on conflict do nothing
             )
             select guild_id, message_id from ins"
        );
        let q = sqlx::query(&sql);
        let done = inserts
            .bind(q)
            .bind(&events.g)
            .bind(&events.k)
            .bind(&events.c)
            .bind(&events.m)
            .bind(&revs.g)
            .bind(&revs.m)
            .bind(&revs.at)
            .bind(&revs.content)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?)))
            .collect::<Result<HashSet<(i64, i64)>>>()?;
        stats.messages_changed += done.len();
        for k in &events.k {
            stats.count_event(*k);
        }
        let mut retry = BTreeMap::new();
        for s in insert_states {
            let key = (s.guild_id, s.message_id);
            if done.contains(&key) {
                stats.count_event(if s.deleted_at.is_some() { 3 } else { 1 });
            } else {
                retry.insert(key, s);
            }
        }
        pending = retry;
    }
    Ok(pending)
}

/// The stored rows of `pending`'s messages, locked for this transaction.
async fn lock_stored(
    conn: &mut PgConnection,
    pending: &BTreeMap<(i64, i64), MsgState>,
) -> Result<HashMap<(i64, i64), MsgState>> {
    let (kg, kid): (Vec<i64>, Vec<i64>) = pending.keys().copied().unzip();
    // One primary-key probe per key, whatever the planner thinks of the
    // table: as a plain join, a generic plan cached while `messages` was
    // small (a fresh install, before autovacuum's first analyze) hashed the
    // keys and scanned the whole table on every batch — linear in its size.
    // The locking subquery cannot be flattened, so it stays a parameterised
    // index lookup. Keys arrive sorted (`pending` is a BTreeMap), so rows
    // are locked in key order.
    let rows = sqlx::query(&format!(
        "select m.* from unnest($1::int8[], $2::int8[]) as k(g, id)
         cross join lateral (
           select {MESSAGE_COLUMNS} from messages m
           where m.guild_id = k.g and m.message_id = k.id
           for update
         ) m"
    ))
    .bind(&kg)
    .bind(&kid)
    .fetch_all(&mut *conn)
    .await?;
    let mut existing = HashMap::with_capacity(rows.len());
    for row in &rows {
        let s = row_to_state(row)?;
        existing.insert((s.guild_id, s.message_id), s);
    }
    Ok(existing)
}

/// Message events to insert, as the columns of one `unnest`.
#[derive(Default)]
struct EventColumns {
    g: Vec<i64>,
    k: Vec<i16>,
    c: Vec<i64>,
    m: Vec<i64>,
}

impl EventColumns {
    fn push(&mut self, guild_id: i64, kind: i16, channel_id: i64, message_id: i64) {
        self.g.push(guild_id);
        self.k.push(kind);
        self.c.push(channel_id);
        self.m.push(message_id);
    }
}

/// Revisions to insert, as the columns of one `unnest`.
#[derive(Default)]
struct Revisions {
    g: Vec<i64>,
    m: Vec<i64>,
    at: Vec<DateTime<Utc>>,
    content: Vec<String>,
}

impl From<HashSet<(i64, i64, DateTime<Utc>, String)>> for Revisions {
    fn from(set: HashSet<(i64, i64, DateTime<Utc>, String)>) -> Self {
        let mut r = Revisions::default();
        for (g, m, at, content) in set {
            r.g.push(g);
            r.m.push(m);
            r.at.push(at);
            r.content.push(content);
        }
        r
    }
}

/// Whether a failed batch is worth retrying as is: connection trouble, a
/// restarting server, resource exhaustion, serialization failures, deadlocks,
/// lock timeouts and the lost races [`write_batch`] reports as
/// [`crate::Error::Conflict`] (concurrent writers; nothing wrong with the data).
/// Only the database refusing the data itself (bad values, a violated
/// constraint, a statement it cannot run) is not: the batcher then isolates
/// and drops the offending op, so misclassifying a race here would lose data.
pub fn is_transient(err: &crate::Error) -> bool {
    match err {
        crate::Error::Sqlx(sqlx::Error::Database(db)) => db.code().is_some_and(|c| {
            c.starts_with("08") // connection exception
                || c.starts_with("57") // operator intervention (shutdown, cancel)
                || c.starts_with("53") // insufficient resources
                || c.starts_with("40") // serialization failure, deadlock
                || c == "55P03" // lock not available
        }),
        // A row that failed to decode or a type the server does not know is a
        // bug or bad data: retrying the same batch cannot help.
        crate::Error::Sqlx(
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::Encode(_)
            | sqlx::Error::TypeNotFound { .. }
            | sqlx::Error::RowNotFound,
        ) => false,
        // I/O, TLS, protocol, pool timeouts and the like.
        crate::Error::Sqlx(_) => true,
        crate::Error::Conflict(_) => true,
        crate::Error::NotFound | crate::Error::Invalid(_) | crate::Error::Migrate(_) => false,
    }
}

// ---------------------------------------------------------------------------
// Backfill support
// ---------------------------------------------------------------------------

/// For each of `channel_ids`, the newest message id (with its create seen)
/// older than `before` (a snowflake; `i64::MAX` for no bound), raised to the
/// guild's retention horizon when it has one. Channels with neither are
/// absent. One index probe per channel.
pub async fn newest_message_ids(
    tx: &mut WorkerTx,
    guild_id: i64,
    channel_ids: &[i64],
    before: i64,
) -> Result<HashMap<i64, i64>> {
    // With a retention period, history older than it is never fetched again
    // (the purge would only delete it): the retention horizon, as a snowflake,
    // is a floor under the newest stored id. `greatest` ignores NULLs.
    let rows: Vec<(i64, Option<i64>)> = sqlx::query_as(
        "select c, greatest(
                   (select m.message_id from messages m
                    where m.channel_id = c and m.guild_id = $1 and m.message_id < $3
                      and m.seen_create
                    order by m.message_id desc limit 1),
                   (select ((extract(epoch from now() - g.retention) * 1000)::bigint
                            - 1420070400000) << 22
                    from guilds g where g.guild_id = $1 and g.retention is not null))
         from unnest($2::int8[]) as c",
    )
    .bind(guild_id)
    .bind(channel_ids)
    .bind(before)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(c, m)| m.map(|m| (c, m)))
        .collect())
}

/// How long a member-removal tombstone is kept. It only has to outlive any
/// member observation that was taken before the removal and is still in
/// flight (a REST snapshot, a delayed dispatch): minutes in practice.
pub const MEMBER_REMOVAL_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Forgets member-removal tombstones older than `keep`; returns how many.
/// Without this the table grows with every member who ever left.
pub async fn purge_member_removals(tx: &mut WorkerTx, keep: std::time::Duration) -> Result<u64> {
    let done = sqlx::query(
        "delete from member_removals where observed_at < now() - make_interval(secs => $1)",
    )
    .bind(keep.as_secs_f64())
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}

/// Deletes up to `limit` messages that are older than their guild's retention
/// period (`guilds.retention`; NULL keeps forever), with their revisions and
/// events, and returns how many messages went. Callers repeat until it
/// returns less than `limit`, so no transaction holds many locks for long.
/// Subscribers resuming from an older cursor simply find those events gone.
pub async fn purge_expired(tx: &mut WorkerTx, limit: i64) -> Result<u64> {
    let purged: i64 = sqlx::query_scalar(
        "with expired as (
             select m.guild_id, m.message_id
             from guilds g
             join messages m on m.guild_id = g.guild_id
                            and m.created_at < now() - g.retention
             where g.retention is not null
             limit $1),
         revisions as (
             delete from message_revisions r using expired e
             where r.guild_id = e.guild_id and r.message_id = e.message_id),
         events as (
             delete from message_events v using expired e
             where v.guild_id = e.guild_id and v.message_id = e.message_id),
         gone as (
             delete from messages m using expired e
             where m.guild_id = e.guild_id and m.message_id = e.message_id
             returning 1)
         select count(*) from gone",
    )
    .bind(limit)
    .fetch_one(&mut **tx)
    .await?;
    Ok(u64::try_from(purged).unwrap_or(0))
}

/// Channels of a guild that hold messages the worker should backfill: text and
/// announcement channels, and threads that are not archived.
pub async fn backfill_channels(tx: &mut WorkerTx, guild_id: i64) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar(
        "select channel_id from channels
         where guild_id = $1 and (kind in (0, 5) or (kind = any($2) and not archived))
         order by channel_id",
    )
    .bind(guild_id)
    .bind(&THREAD_KINDS[..])
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
    }

    #[test]
    fn sanitize_strips_controls_and_caps() {
        assert_eq!(sanitize("a\u{0}b\nc\td\u{7}", 100), "ab\nc\td");
        assert_eq!(sanitize("héllo", 2), "h");
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
    fn lost_races_are_retried_and_refusals_are_not() {
        // write_messages reports concurrent-writer races as Conflict: the
        // batcher must retry those, not split the batch and drop ops.
        assert!(is_transient(&crate::Error::Conflict("race".into())));
        assert!(is_transient(&crate::Error::Sqlx(sqlx::Error::PoolTimedOut)));
        assert!(!is_transient(&crate::Error::Invalid("bad".into())));
        assert!(!is_transient(&crate::Error::Sqlx(sqlx::Error::RowNotFound)));
    }

    #[test]
    fn snowflake_roundtrip() {
        let at = t(1_700_000_000_000);
        assert_eq!(snowflake_time(snowflake_at(at)), at);
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
