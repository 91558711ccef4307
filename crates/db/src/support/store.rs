//! Conversations recomputed from the stored rows, inside the ingest
//! transaction that touched them (or the settings recomputation).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::derive::{derive, Mark, Msg, Opening};
use super::settings::{is_solved_tag, Settings};
use crate::ingest::snowflake_time;
use crate::Result;

/// Namespace of the per-conversation advisory locks (any constant that no
/// other lock in this database uses; migrate.rs has the only other one).
const LOCK_CLASS: i32 = 0x5351;

/// MANAGE_MESSAGES: the default staff test (docs/support-queue.md).
const MANAGE_MESSAGES: i64 = 1 << 13;

/// A thread under a support channel, with what decides its conversation.
struct Candidate {
    guild_id: i64,
    thread_id: i64,
    parent_id: i64,
    /// A private thread (kind 12): the policy asks for more than the scope's rights.
    private: bool,
    owner_id: Option<i64>,
    opened_at: DateTime<Utc>,
    applied_tags: Vec<i64>,
    marker: bool,
    known: bool,
    sla_target_secs: Option<i32>,
}

/// Whether any of the pairs is a thread under a support channel or has a
/// conversation: one cheap read that lets a batch of ordinary messages skip
/// the recomputation's transaction.
pub async fn any_support_thread(conn: &mut PgConnection, keys: &[(i64, i64)]) -> Result<bool> {
    if keys.is_empty() {
        return Ok(false);
    }
    let (guilds, channels): (Vec<i64>, Vec<i64>) = keys.iter().copied().unzip();
    let found = sqlx::query_scalar!(
        "select exists (select 1 from unnest($1::bigint[], $2::bigint[]) k(g, id) \
           where exists (select 1 from conversations c \
                         where c.guild_id = k.g and c.conversation_id = k.id) \
              or exists (select 1 from channels t \
                         join channels p on p.guild_id = t.guild_id and p.channel_id = t.parent_id \
                         where t.guild_id = k.g and t.channel_id = k.id \
                           and t.kind in (10, 11, 12) and p.kind in (15, 16))) as \"found!\"",
        &guilds,
        &channels,
    )
    .fetch_one(conn)
    .await?;
    Ok(found)
}

/// Recomputes the conversations of the given (guild, channel) pairs: threads
/// under a support channel get their row (re)written; any other pair loses
/// the row it may have had (the thread was deleted, moved, or its channel is
/// no longer a support channel). Returns the number of conversations written.
///
/// Must run in a transaction: it first takes a transaction-level lock per
/// pair, so two writers touching one conversation (live traffic and a
/// backfill, say) recompute one after the other, the second from a snapshot
/// that includes the first's messages and markers.
pub async fn refresh(conn: &mut PgConnection, keys: &[(i64, i64)]) -> Result<usize> {
    // Most batches are ordinary chat: one read says so.
    if !any_support_thread(&mut *conn, keys).await? {
        return Ok(0);
    }
    refresh_checked(conn, keys).await
}

/// [`refresh`] for a caller that has just asked [`any_support_thread`]
/// about the same pairs and got `true` (the ingest fast path), so the
/// question is not asked twice.
pub async fn refresh_checked(conn: &mut PgConnection, keys: &[(i64, i64)]) -> Result<usize> {
    if keys.is_empty() {
        return Ok(0);
    }
    let now = Utc::now();
    let (guilds, channels): (Vec<i64>, Vec<i64>) = keys.iter().copied().unzip();
    let mut lock_ids: Vec<i64> = channels.clone();
    lock_ids.sort_unstable();
    lock_ids.dedup();
    // Sorted, so two transactions never wait on each other in a cycle.
    sqlx::query!(
        "select count(pg_advisory_xact_lock($1::int, hashint8(id))) as \"n!\" \
         from (select id from unnest($2::bigint[]) id order by id) k",
        LOCK_CLASS,
        &lock_ids,
    )
    .fetch_one(&mut *conn)
    .await?;
    let candidates = candidates(conn, &guilds, &channels).await?;
    let supported: HashSet<(i64, i64)> = candidates
        .iter()
        .map(|c| (c.guild_id, c.thread_id))
        .collect();
    let (gone_g, gone_c): (Vec<i64>, Vec<i64>) = keys
        .iter()
        .filter(|k| !supported.contains(k))
        .copied()
        .unzip();
    if !gone_g.is_empty() {
        sqlx::query!(
            "delete from conversations c using unnest($1::bigint[], $2::bigint[]) k(g, id) \
             where c.guild_id = k.g and c.conversation_id = k.id",
            &gone_g,
            &gone_c,
        )
        .execute(&mut *conn)
        .await?;
    }
    if candidates.is_empty() {
        return Ok(0);
    }
    observe_marks(conn, &candidates, now).await?;

    let (cg, ct): (Vec<i64>, Vec<i64>) =
        candidates.iter().map(|c| (c.guild_id, c.thread_id)).unzip();
    let mut msgs = load_messages(conn, &cg, &ct).await?;
    let mut marks = load_marks(conn, &cg, &ct).await?;
    let staff = staff_of(conn, &candidates, &msgs).await?;

    let mut out = Rows::default();
    for c in &candidates {
        let key = (c.guild_id, c.thread_id);
        let m = msgs.remove(&key).unwrap_or_default();
        let k = marks.remove(&key).unwrap_or_default();
        let opening = Opening {
            owner_id: c.owner_id,
            opened_at: c.opened_at,
        };
        let d = derive(&opening, &m, &k, |u| {
            staff.contains(&(c.guild_id, c.parent_id, u))
        });
        out.push(c, d, m.last().map(|m| m.message_id));
    }
    out.write(conn, now).await?;
    Ok(candidates.len())
}

async fn candidates(
    conn: &mut PgConnection,
    guilds: &[i64],
    channels: &[i64],
) -> Result<Vec<Candidate>> {
    // Threads only, under a forum or media channel that the guild's settings
    // (or the default: every forum and media channel) make a support channel.
    let rows = sqlx::query!(
        "select t.guild_id, t.channel_id, p.channel_id as \"parent_id!\", t.kind = 12 as \"private!\", t.owner_id, \
           t.thread_created_at as \"thread_created_at: DateTime<Utc>\", \
           t.applied_tags, t.locked, t.archived, p.available_tags, \
           s.solved_tag_names as \"solved_tag_names?: Vec<String>\", \
           coalesce(s.locked_means_solved, true) as \"locked_means_solved!\", \
           coalesce(s.archived_means_solved, false) as \"archived_means_solved!\", \
           s.first_response_target_secs as \"target?: i32\", \
           exists (select 1 from conversations c \
                   where c.guild_id = t.guild_id and c.conversation_id = t.channel_id) as \"known!\" \
         from unnest($1::bigint[], $2::bigint[]) k(g, id) \
         join channels t on t.guild_id = k.g and t.channel_id = k.id and t.kind in (10, 11, 12) \
         join channels p on p.guild_id = t.guild_id and p.channel_id = t.parent_id \
              and p.kind in (15, 16) \
         left join support_settings s on s.guild_id = t.guild_id \
         where s.support_channel_ids is null or p.channel_id = any (s.support_channel_ids)",
        guilds,
        channels,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let settings = Settings {
                solved_tag_names: r.solved_tag_names,
                locked_means_solved: r.locked_means_solved,
                archived_means_solved: r.archived_means_solved,
            };
            let solved_tags = super::settings::tags_of(&r.available_tags)
                .into_iter()
                .filter(|t| is_solved_tag(&settings, t))
                .map(|t| t.id)
                .collect::<HashSet<i64>>();
            let marker = r.applied_tags.iter().any(|t| solved_tags.contains(t))
                || (r.locked && settings.locked_means_solved)
                || (r.archived && settings.archived_means_solved);
            Candidate {
                guild_id: r.guild_id,
                thread_id: r.channel_id,
                parent_id: r.parent_id,
                private: r.private,
                owner_id: r.owner_id,
                opened_at: r
                    .thread_created_at
                    .unwrap_or_else(|| snowflake_time(r.channel_id)),
                applied_tags: r.applied_tags,
                marker,
                known: r.known,
                sla_target_secs: r.target,
            }
        })
        .collect())
}

/// Opens a mark where a marker appeared and closes the open one where it
/// went, at `now` (Discord does not say when a tag was applied).
async fn observe_marks(
    conn: &mut PgConnection,
    candidates: &[Candidate],
    now: DateTime<Utc>,
) -> Result<()> {
    let mut set = (Vec::new(), Vec::new(), Vec::new());
    let mut unset = (Vec::new(), Vec::new());
    for c in candidates {
        if c.marker {
            set.0.push(c.guild_id);
            set.1.push(c.thread_id);
            set.2.push(!c.known);
        } else {
            unset.0.push(c.guild_id);
            unset.1.push(c.thread_id);
        }
    }
    if !set.0.is_empty() {
        sqlx::query!(
            "insert into conversation_solved_marks (guild_id, conversation_id, observed_at, first_sight) \
             select k.g, k.id, $4, k.first \
             from unnest($1::bigint[], $2::bigint[], $3::bool[]) k(g, id, first) \
             where not exists (select 1 from conversation_solved_marks m \
                               where m.guild_id = k.g and m.conversation_id = k.id \
                                 and m.cleared_at is null) \
             on conflict do nothing",
            &set.0,
            &set.1,
            &set.2,
            now as DateTime<Utc>,
        )
        .execute(&mut *conn)
        .await?;
    }
    if !unset.0.is_empty() {
        sqlx::query!(
            "update conversation_solved_marks m set cleared_at = $3 \
             from unnest($1::bigint[], $2::bigint[]) k(g, id) \
             where m.guild_id = k.g and m.conversation_id = k.id and m.cleared_at is null",
            &unset.0,
            &unset.1,
            now as DateTime<Utc>,
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

type ByConversation<T> = HashMap<(i64, i64), Vec<T>>;

async fn load_messages(
    conn: &mut PgConnection,
    guilds: &[i64],
    threads: &[i64],
) -> Result<ByConversation<Msg>> {
    let rows = sqlx::query!(
        "select m.guild_id, m.channel_id, m.message_id, m.author_id, m.author_bot, \
           m.created_at as \"created_at: DateTime<Utc>\", m.deleted_at is not null as \"deleted!\" \
         from unnest($1::bigint[], $2::bigint[]) k(g, id) \
         join messages m on m.channel_id = k.id and m.guild_id = k.g \
         order by m.channel_id, m.message_id",
        guilds,
        threads,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out: ByConversation<Msg> = HashMap::new();
    for r in rows {
        out.entry((r.guild_id, r.channel_id))
            .or_default()
            .push(Msg {
                message_id: r.message_id,
                author_id: r.author_id,
                bot: r.author_bot,
                created_at: r.created_at,
                deleted: r.deleted,
            });
    }
    Ok(out)
}

async fn load_marks(
    conn: &mut PgConnection,
    guilds: &[i64],
    threads: &[i64],
) -> Result<ByConversation<Mark>> {
    let rows = sqlx::query!(
        "select m.guild_id, m.conversation_id, m.observed_at as \"observed_at: DateTime<Utc>\", \
           m.first_sight, m.cleared_at as \"cleared_at: DateTime<Utc>\" \
         from unnest($1::bigint[], $2::bigint[]) k(g, id) \
         join conversation_solved_marks m on m.guild_id = k.g and m.conversation_id = k.id \
         order by m.observed_at",
        guilds,
        threads,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out: ByConversation<Mark> = HashMap::new();
    for r in rows {
        out.entry((r.guild_id, r.conversation_id))
            .or_default()
            .push(Mark {
                observed_at: r.observed_at,
                first_sight: r.first_sight,
                cleared_at: r.cleared_at,
            });
    }
    Ok(out)
}

/// (guild, support channel, user) for every human author who is staff there:
/// a staff role when the guild set some, else MANAGE_MESSAGES in the support
/// channel (Discord's permission algorithm: base roles, then the channel's
/// overwrites; owner and ADMINISTRATOR have everything). Members who left
/// are not staff: nothing stored says what they were.
async fn staff_of(
    conn: &mut PgConnection,
    candidates: &[Candidate],
    msgs: &ByConversation<Msg>,
) -> Result<HashSet<(i64, i64, i64)>> {
    let mut per_channel: BTreeMap<(i64, i64), Vec<i64>> = BTreeMap::new();
    for c in candidates {
        let authors = per_channel.entry((c.guild_id, c.parent_id)).or_default();
        if let Some(m) = msgs.get(&(c.guild_id, c.thread_id)) {
            authors.extend(m.iter().filter(|m| !m.bot).filter_map(|m| m.author_id));
        }
    }
    let (mut g, mut ch, mut u) = (Vec::new(), Vec::new(), Vec::new());
    for ((guild, channel), mut authors) in per_channel {
        authors.sort_unstable();
        authors.dedup();
        for a in authors {
            g.push(guild);
            ch.push(channel);
            u.push(a);
        }
    }
    if g.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = sqlx::query!(
        "with k as (select * from unnest($1::bigint[], $2::bigint[], $3::bigint[]) k(g, ch, u)), \
         b as ( \
           select k.g, k.ch, k.u, gu.owner_id = k.u as is_owner, \
                  coalesce(s.staff_role_ids, '{}') as staff_roles, \
                  array_remove(m.role_ids, k.g) as role_ids, \
                  coalesce((select bit_or(r.permissions) from roles r \
                            where r.guild_id = k.g \
                              and (r.role_id = k.g or r.role_id = any (m.role_ids))), 0) as perms \
           from k \
           join members m on m.guild_id = k.g and m.user_id = k.u \
           join guilds gu on gu.guild_id = k.g \
           left join support_settings s on s.guild_id = k.g), \
         o as ( \
           select b.g, b.ch, b.u, \
             coalesce(bit_or(o.allow) filter (where o.kind = 0 and o.target_id = b.g), 0) as ev_allow, \
             coalesce(bit_or(o.deny) filter (where o.kind = 0 and o.target_id = b.g), 0) as ev_deny, \
             coalesce(bit_or(o.allow) filter (where o.kind = 0 and o.target_id <> b.g \
                                              and o.target_id = any (b.role_ids)), 0) as r_allow, \
             coalesce(bit_or(o.deny) filter (where o.kind = 0 and o.target_id <> b.g \
                                             and o.target_id = any (b.role_ids)), 0) as r_deny, \
             coalesce(bit_or(o.allow) filter (where o.kind = 1 and o.target_id = b.u), 0) as m_allow, \
             coalesce(bit_or(o.deny) filter (where o.kind = 1 and o.target_id = b.u), 0) as m_deny \
           from b left join permission_overwrites o on o.guild_id = b.g and o.channel_id = b.ch \
           group by b.g, b.ch, b.u) \
         select b.g as \"g!\", b.ch as \"ch!\", b.u as \"u!\" \
         from b join o on o.g = b.g and o.ch = b.ch and o.u = b.u \
         where case when cardinality(b.staff_roles) > 0 then b.role_ids && b.staff_roles \
                    else b.is_owner or (b.perms & 8) <> 0 \
                         or (((((((b.perms & ~o.ev_deny) | o.ev_allow) & ~o.r_deny) | o.r_allow) \
                               & ~o.m_deny) | o.m_allow) & $4) <> 0 end",
        &g,
        &ch,
        &u,
        MANAGE_MESSAGES,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.g, r.ch, r.u)).collect())
}

/// Column arrays for one bulk upsert.
#[derive(Default)]
struct Rows {
    guild: Vec<i64>,
    id: Vec<i64>,
    parent: Vec<i64>,
    private: Vec<bool>,
    requester: Vec<Option<i64>>,
    opened: Vec<DateTime<Utc>>,
    state: Vec<String>,
    first_response: Vec<Option<DateTime<Utc>>>,
    responder: Vec<Option<i64>>,
    response_deleted: Vec<bool>,
    last_requester: Vec<Option<DateTime<Utc>>>,
    last_staff: Vec<Option<DateTime<Utc>>>,
    last_message: Vec<Option<DateTime<Utc>>>,
    first_solved: Vec<Option<DateTime<Utc>>>,
    last_solved: Vec<Option<DateTime<Utc>>>,
    reopens: Vec<i32>,
    messages: Vec<i32>,
    // Arrays of arrays travel as JSON: PostgreSQL has no ragged arrays.
    participants: Vec<serde_json::Value>,
    tags: Vec<serde_json::Value>,
    waiting_since: Vec<Option<DateTime<Utc>>>,
    wait_closed: Vec<f64>,
    next_response: Vec<serde_json::Value>,
    last_id: Vec<Option<i64>>,
    target: Vec<Option<i32>>,
}

impl Rows {
    fn push(&mut self, c: &Candidate, d: super::derive::Derived, last_id: Option<i64>) {
        self.last_id.push(last_id);
        self.target.push(c.sla_target_secs);
        self.guild.push(c.guild_id);
        self.id.push(c.thread_id);
        self.parent.push(c.parent_id);
        self.private.push(c.private);
        self.requester.push(d.requester_id);
        self.opened.push(c.opened_at);
        self.state.push(d.state.as_str().to_owned());
        self.first_response.push(d.first_response_at);
        self.responder.push(d.first_responder_id);
        self.response_deleted.push(d.first_response_deleted);
        self.last_requester.push(d.last_requester_at);
        self.last_staff.push(d.last_staff_at);
        self.last_message.push(d.last_message_at);
        self.first_solved.push(d.first_solved_at);
        self.last_solved.push(d.last_solved_at);
        self.reopens.push(d.reopen_count);
        self.messages.push(d.message_count);
        self.participants.push(serde_json::json!(d.participant_ids));
        self.tags.push(serde_json::json!(c.applied_tags));
        self.waiting_since.push(d.waiting_since);
        self.wait_closed.push(d.wait_secs_closed);
        self.next_response
            .push(serde_json::json!(d.next_response_secs));
    }

    async fn write(self, conn: &mut PgConnection, now: DateTime<Utc>) -> Result<()> {
        sqlx::query!(
            "insert into conversations as c (guild_id, conversation_id, channel_id, parent_id, \
               requester_id, opened_at, state, first_response_at, first_responder_id, \
               first_response_deleted, last_requester_at, last_staff_at, last_message_at, \
               first_solved_at, last_solved_at, reopen_count, message_count, participant_ids, \
               tag_ids, waiting_since, wait_secs_closed, next_response_secs, last_message_id, \
               sla_target_secs, recomputed_at, private) \
             select r.g, r.id, r.id, r.parent, r.requester, r.opened, r.state, r.fr, r.responder, \
               r.frd, r.lr, r.ls, r.lm, r.fs, r.lsv, r.reopens, r.msgs, \
               array(select jsonb_array_elements_text(r.parts)::bigint), \
               array(select jsonb_array_elements_text(r.tags)::bigint), \
               r.ws, r.wc, \
               array(select jsonb_array_elements_text(r.nr)::double precision), r.lmid, r.target, $24, r.private \
             from unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], \
               $5::timestamptz[], $6::text[], $7::timestamptz[], $8::bigint[], $9::bool[], \
               $10::timestamptz[], $11::timestamptz[], $12::timestamptz[], $13::timestamptz[], \
               $14::timestamptz[], $15::int[], $16::int[], $17::jsonb[], $18::jsonb[], \
               $19::timestamptz[], $20::double precision[], $21::jsonb[], $22::bigint[], $23::int[], \
               $25::bool[]) \
               r(g, id, parent, requester, opened, state, fr, responder, frd, lr, ls, lm, fs, lsv, \
                 reopens, msgs, parts, tags, ws, wc, nr, lmid, target, private) \
             on conflict (guild_id, conversation_id) do update set \
               channel_id = excluded.channel_id, parent_id = excluded.parent_id, \
               requester_id = excluded.requester_id, opened_at = excluded.opened_at, \
               state = excluded.state, first_response_at = excluded.first_response_at, \
               first_responder_id = excluded.first_responder_id, \
               first_response_deleted = excluded.first_response_deleted, \
               last_requester_at = excluded.last_requester_at, \
               last_staff_at = excluded.last_staff_at, last_message_at = excluded.last_message_at, \
               first_solved_at = excluded.first_solved_at, last_solved_at = excluded.last_solved_at, \
               reopen_count = excluded.reopen_count, message_count = excluded.message_count, \
               participant_ids = excluded.participant_ids, tag_ids = excluded.tag_ids, \
               waiting_since = excluded.waiting_since, wait_secs_closed = excluded.wait_secs_closed, \
               next_response_secs = excluded.next_response_secs, \
               last_message_id = excluded.last_message_id, \
               sla_target_secs = excluded.sla_target_secs, \
               recomputed_at = excluded.recomputed_at, private = excluded.private",
            &self.guild,
            &self.id,
            &self.parent,
            &self.requester as &[Option<i64>],
            &self.opened as &[DateTime<Utc>],
            &self.state,
            &self.first_response as &[Option<DateTime<Utc>>],
            &self.responder as &[Option<i64>],
            &self.response_deleted,
            &self.last_requester as &[Option<DateTime<Utc>>],
            &self.last_staff as &[Option<DateTime<Utc>>],
            &self.last_message as &[Option<DateTime<Utc>>],
            &self.first_solved as &[Option<DateTime<Utc>>],
            &self.last_solved as &[Option<DateTime<Utc>>],
            &self.reopens,
            &self.messages,
            &self.participants,
            &self.tags,
            &self.waiting_since as &[Option<DateTime<Utc>>],
            &self.wait_closed,
            &self.next_response,
            &self.last_id as &[Option<i64>],
            &self.target as &[Option<i32>],
            now as DateTime<Utc>,
            &self.private,
        )
        .execute(conn)
        .await?;
        Ok(())
    }
}
