//! Messages in bulk: merged states written in rounds (an optimistic insert,
//! then locking reads and merges for the rows that already existed), with
//! their events and revisions.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, Row};

use super::merge::{MsgState, Version};
use super::{Author, BatchStats};
use crate::Result;

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
pub(super) async fn write_rounds(
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
            // dynamic: format! of shared column lists; 17 arrays bound by MsgColumns::bind.
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
        // dynamic: format! of the shared column lists, arrays bound by MsgColumns::bind (as above).
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
    // dynamic: format! of MESSAGE_COLUMNS shared with the writes; rows decoded by `row_to_state`.
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
pub(super) struct Revisions {
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
