//! The API's reads of the support queue. Every query runs as `observer_api`
//! with the viewer set: row-level security keeps only the conversations
//! whose channel the viewer may read, so every list and every aggregate is
//! over those alone and no number counts a hidden channel.

use chrono::{DateTime, Utc};

use crate::{Result, ViewerTx};

/// A conversation as the API shows it. `sla_status` is computed at read
/// time (it changes with the clock): None without a target.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConversationRow {
    pub guild_id: i64,
    pub conversation_id: i64,
    pub channel_id: i64,
    pub parent_id: i64,
    pub requester_id: Option<i64>,
    pub opened_at: DateTime<Utc>,
    pub state: String,
    pub first_response_at: Option<DateTime<Utc>>,
    pub first_responder_id: Option<i64>,
    pub first_response_deleted: bool,
    pub last_requester_at: Option<DateTime<Utc>>,
    pub last_staff_at: Option<DateTime<Utc>>,
    pub last_message_at: Option<DateTime<Utc>>,
    pub first_solved_at: Option<DateTime<Utc>>,
    pub last_solved_at: Option<DateTime<Utc>>,
    pub reopen_count: i32,
    pub message_count: i32,
    pub participant_ids: Vec<i64>,
    pub tag_ids: Vec<i64>,
    pub waiting_since: Option<DateTime<Utc>>,
    /// Total requester wait so far, the current wait included.
    pub wait_secs: f64,
    pub next_response_secs: Vec<f64>,
    pub sla_target_secs: Option<i32>,
    pub sla_status: Option<String>,
    pub name: Option<String>,
}

/// Queue orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Oldest wait first; conversations not waiting last (the default).
    WaitingLongest,
    /// Newest opened first.
    Newest,
    /// Most recent message first.
    RecentActivity,
}

/// A position in one of the orders: the sort key (None = "not waiting",
/// after every wait) and the conversation id.
pub type Cursor = (Option<DateTime<Utc>>, i64);

#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Empty: every state.
    pub states: Vec<String>,
    /// Support channels (forums) or conversation threads; empty: all.
    pub channel_ids: Vec<i64>,
    /// Forum tags: conversations carrying any of them; empty: all.
    pub tag_ids: Vec<i64>,
}

// The columns of ConversationRow, one definition for every read below.
macro_rules! conversation_query {
    ($tail:literal, $($arg:expr),* $(,)?) => {
        sqlx::query_as!(
            ConversationRow,
            "select c.guild_id, c.conversation_id, c.channel_id, c.parent_id, c.requester_id, \
               c.opened_at as \"opened_at: DateTime<Utc>\", c.state, \
               c.first_response_at as \"first_response_at: DateTime<Utc>\", c.first_responder_id, \
               c.first_response_deleted, \
               c.last_requester_at as \"last_requester_at: DateTime<Utc>\", \
               c.last_staff_at as \"last_staff_at: DateTime<Utc>\", \
               c.last_message_at as \"last_message_at: DateTime<Utc>\", \
               c.first_solved_at as \"first_solved_at: DateTime<Utc>\", \
               c.last_solved_at as \"last_solved_at: DateTime<Utc>\", \
               c.reopen_count, c.message_count, c.participant_ids, c.tag_ids, \
               c.waiting_since as \"waiting_since: DateTime<Utc>\", \
               c.wait_secs_closed + coalesce(extract(epoch from now() - c.waiting_since)::float8, 0) \
                 as \"wait_secs!\", \
               c.next_response_secs, c.sla_target_secs, \
               case when c.sla_target_secs is null then null \
                    when least(c.first_response_at, c.first_solved_at) is not null then \
                      case when least(c.first_response_at, c.first_solved_at) - c.opened_at \
                                <= make_interval(secs => c.sla_target_secs) \
                           then 'OK' else 'BREACHED' end \
                    when now() - c.opened_at > make_interval(secs => c.sla_target_secs) then 'BREACHED' \
                    when now() - c.opened_at > make_interval(secs => c.sla_target_secs * 0.8) \
                      then 'AT_RISK' \
                    else 'OK' end as sla_status, \
               ch.name as \"name?\" \
             from conversations c \
             left join channels ch on ch.guild_id = c.guild_id and ch.channel_id = c.channel_id "
                + $tail,
            $($arg),*
        )
    };
}

/// One page of the guild's queue, `first` rows after `after`.
pub async fn page(
    tx: &mut ViewerTx,
    guild_id: i64,
    filter: &Filter,
    order: Order,
    after: Option<Cursor>,
    first: i64,
) -> Result<Vec<ConversationRow>> {
    // One more than a page: callers ask for it to learn whether a next page exists.
    let first = first.clamp(1, crate::viewer::MAX_PAGE + 1);
    let (after_at, after_id) = (after.and_then(|c| c.0), after.map(|c| c.1));
    let rows = match order {
        Order::WaitingLongest => {
            conversation_query!(
                "where c.guild_id = $1 \
                   and (cardinality($2::text[]) = 0 or c.state = any ($2)) \
                   and (cardinality($3::bigint[]) = 0 or c.parent_id = any ($3) \
                        or c.channel_id = any ($3)) \
                   and (cardinality($7::bigint[]) = 0 or c.tag_ids && $7) \
                   and ($5::bigint is null \
                        or (coalesce(c.waiting_since, 'infinity'::timestamptz), c.conversation_id) \
                           > (coalesce($4, 'infinity'::timestamptz), $5)) \
                 order by coalesce(c.waiting_since, 'infinity'::timestamptz), c.conversation_id \
                 limit $6",
                guild_id,
                &filter.states,
                &filter.channel_ids,
                after_at as Option<DateTime<Utc>>,
                after_id,
                first,
                &filter.tag_ids,
            )
            .fetch_all(&mut **tx)
            .await?
        }
        Order::Newest => {
            conversation_query!(
                "where c.guild_id = $1 \
                   and (cardinality($2::text[]) = 0 or c.state = any ($2)) \
                   and (cardinality($3::bigint[]) = 0 or c.parent_id = any ($3) \
                        or c.channel_id = any ($3)) \
                   and (cardinality($7::bigint[]) = 0 or c.tag_ids && $7) \
                   and ($5::bigint is null or (c.opened_at, c.conversation_id) < ($4, $5)) \
                 order by c.opened_at desc, c.conversation_id desc \
                 limit $6",
                guild_id,
                &filter.states,
                &filter.channel_ids,
                after_at as Option<DateTime<Utc>>,
                after_id,
                first,
                &filter.tag_ids,
            )
            .fetch_all(&mut **tx)
            .await?
        }
        Order::RecentActivity => {
            conversation_query!(
                "where c.guild_id = $1 \
                   and (cardinality($2::text[]) = 0 or c.state = any ($2)) \
                   and (cardinality($3::bigint[]) = 0 or c.parent_id = any ($3) \
                        or c.channel_id = any ($3)) \
                   and (cardinality($7::bigint[]) = 0 or c.tag_ids && $7) \
                   and ($5::bigint is null \
                        or (coalesce(c.last_message_at, c.opened_at), c.conversation_id) < ($4, $5)) \
                 order by coalesce(c.last_message_at, c.opened_at) desc, c.conversation_id desc \
                 limit $6",
                guild_id,
                &filter.states,
                &filter.channel_ids,
                after_at as Option<DateTime<Utc>>,
                after_id,
                first,
                &filter.tag_ids,
            )
            .fetch_all(&mut **tx)
            .await?
        }
    };
    Ok(rows)
}

/// The cursor of `row` in `order`.
pub fn cursor_of(row: &ConversationRow, order: Order) -> Cursor {
    let key = match order {
        Order::WaitingLongest => row.waiting_since,
        Order::Newest => Some(row.opened_at),
        Order::RecentActivity => Some(row.last_message_at.unwrap_or(row.opened_at)),
    };
    (key, row.conversation_id)
}

/// One conversation by id (None: absent or not visible, the same answer).
pub async fn one(tx: &mut ViewerTx, conversation_id: i64) -> Result<Option<ConversationRow>> {
    let row = conversation_query!("where c.conversation_id = $1", conversation_id)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(row)
}

/// Percentiles of a set of durations, in seconds, with how many there were.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Durations {
    pub count: i64,
    pub median: Option<f64>,
    pub p90: Option<f64>,
}

/// The window's summary (docs/support-queue.md, "Metrics").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Conversations opened in the window.
    pub opened: i64,
    pub messages: i64,
    pub first_response: Durations,
    /// Opened in the window, no first response yet.
    pub unanswered: i64,
    pub next_response: Durations,
    pub first_resolution: Durations,
    pub full_resolution: Durations,
    /// Opened in the window and not solved now.
    pub unresolved: i64,
    pub requester_wait: Durations,
    /// Solved at least once, and of those reopened at least once.
    pub solved: i64,
    pub reopened: i64,
    /// With a target: first response (or solve) within it, and past it.
    pub sla_met: i64,
    pub sla_breached: i64,
    /// Now, whatever the window: waiting (NEW or WAITING_ON_STAFF) and the
    /// oldest wait's start.
    pub backlog: i64,
    pub oldest_waiting_since: Option<DateTime<Utc>>,
}

/// One bucket of the series.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub start: DateTime<Utc>,
    pub opened: i64,
    pub messages: i64,
    pub first_response_median: Option<f64>,
    pub unanswered: i64,
}

/// First responses and messages per staff member in the window.
#[derive(Debug, Clone, PartialEq)]
pub struct Responder {
    pub user_id: i64,
    pub first_responses: i64,
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub summary: Summary,
    pub series: Vec<Bucket>,
    pub top_responders: Vec<Responder>,
    /// New conversations by ISO weekday (1–7) and hour (0–23), UTC.
    pub heatmap: Vec<(i32, i32, i64)>,
}

/// Telemetry over `[from, to)` for the conversations the viewer can see,
/// bucketed by `bucket` ("hour", "day" or "week"), optionally only in some
/// channels and only those carrying some tags.
pub async fn stats(
    tx: &mut ViewerTx,
    guild_id: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: &str,
    channel_ids: &[i64],
    tag_ids: &[i64],
) -> Result<Stats> {
    if !["hour", "day", "week"].contains(&bucket) {
        return Err(crate::Error::Invalid(format!("bucket {bucket:?}")));
    }
    let s = sqlx::query!(
        "with w as (select * from conversations c \
                    where c.guild_id = $1 and c.opened_at >= $2 and c.opened_at < $3 \
                      and (cardinality($5::bigint[]) = 0 or c.tag_ids && $5) \
                      and (cardinality($4::bigint[]) = 0 or c.parent_id = any ($4) \
                           or c.channel_id = any ($4))) \
         select count(*) as \"opened!\", coalesce(sum(message_count), 0)::int8 as \"messages!\", \
           count(first_response_at) as \"fr_n!\", \
           percentile_cont(0.5) within group (order by extract(epoch from first_response_at - opened_at)::float8) \
             as fr_p50, \
           percentile_cont(0.9) within group (order by extract(epoch from first_response_at - opened_at)::float8) \
             as fr_p90, \
           count(*) filter (where first_response_at is null) as \"unanswered!\", \
           count(first_solved_at) as \"rs_n!\", \
           percentile_cont(0.5) within group (order by extract(epoch from first_solved_at - opened_at)::float8) \
             as rs1_p50, \
           percentile_cont(0.9) within group (order by extract(epoch from first_solved_at - opened_at)::float8) \
             as rs1_p90, \
           percentile_cont(0.5) within group (order by extract(epoch from last_solved_at - opened_at)::float8) \
             as rs2_p50, \
           percentile_cont(0.9) within group (order by extract(epoch from last_solved_at - opened_at)::float8) \
             as rs2_p90, \
           count(*) filter (where state <> 'SOLVED') as \"unresolved!\", \
           percentile_cont(0.5) within group (order by wait_secs_closed \
             + coalesce(extract(epoch from now() - waiting_since)::float8, 0)) as wait_p50, \
           percentile_cont(0.9) within group (order by wait_secs_closed \
             + coalesce(extract(epoch from now() - waiting_since)::float8, 0)) as wait_p90, \
           count(*) filter (where reopen_count > 0) as \"reopened!\", \
           count(*) filter (where sla_target_secs is not null \
             and coalesce(least(first_response_at, first_solved_at), now()) - opened_at \
                 <= make_interval(secs => sla_target_secs) \
             and least(first_response_at, first_solved_at) is not null) as \"sla_met!\", \
           count(*) filter (where sla_target_secs is not null \
             and coalesce(least(first_response_at, first_solved_at), now()) - opened_at \
                 > make_interval(secs => sla_target_secs)) as \"sla_breached!\", \
           (select count(*) from w, unnest(w.next_response_secs) x) as \"nr_n!\", \
           (select percentile_cont(0.5) within group (order by x) from w, unnest(w.next_response_secs) x) \
             as nr_p50, \
           (select percentile_cont(0.9) within group (order by x) from w, unnest(w.next_response_secs) x) \
             as nr_p90 \
         from w",
        guild_id,
        from as DateTime<Utc>,
        to as DateTime<Utc>,
        channel_ids,
        tag_ids,
    )
    .fetch_one(&mut **tx)
    .await?;
    let backlog = sqlx::query!(
        "select count(*) as \"n!\", min(waiting_since) as \"oldest: DateTime<Utc>\" \
         from conversations c \
         where c.guild_id = $1 and c.state in ('NEW', 'WAITING_ON_STAFF') \
           and (cardinality($2::bigint[]) = 0 or c.parent_id = any ($2) or c.channel_id = any ($2)) \
           and (cardinality($3::bigint[]) = 0 or c.tag_ids && $3)",
        guild_id,
        channel_ids,
        tag_ids,
    )
    .fetch_one(&mut **tx)
    .await?;
    let summary = Summary {
        opened: s.opened,
        messages: s.messages,
        first_response: Durations {
            count: s.fr_n,
            median: s.fr_p50,
            p90: s.fr_p90,
        },
        unanswered: s.unanswered,
        next_response: Durations {
            count: s.nr_n,
            median: s.nr_p50,
            p90: s.nr_p90,
        },
        first_resolution: Durations {
            count: s.rs_n,
            median: s.rs1_p50,
            p90: s.rs1_p90,
        },
        full_resolution: Durations {
            count: s.rs_n,
            median: s.rs2_p50,
            p90: s.rs2_p90,
        },
        unresolved: s.unresolved,
        requester_wait: Durations {
            count: s.opened,
            median: s.wait_p50,
            p90: s.wait_p90,
        },
        solved: s.rs_n,
        reopened: s.reopened,
        sla_met: s.sla_met,
        sla_breached: s.sla_breached,
        backlog: backlog.n,
        oldest_waiting_since: backlog.oldest,
    };
    let series = sqlx::query!(
        "select date_trunc($5, c.opened_at, 'UTC') as \"start!: DateTime<Utc>\", \
           count(*) as \"opened!\", coalesce(sum(c.message_count), 0)::int8 as \"messages!\", \
           percentile_cont(0.5) within group \
             (order by extract(epoch from c.first_response_at - c.opened_at)::float8) as fr_p50, \
           count(*) filter (where c.first_response_at is null) as \"unanswered!\" \
         from conversations c \
         where c.guild_id = $1 and c.opened_at >= $2 and c.opened_at < $3 \
           and (cardinality($4::bigint[]) = 0 or c.parent_id = any ($4) or c.channel_id = any ($4)) \
           and (cardinality($6::bigint[]) = 0 or c.tag_ids && $6) \
         group by 1 order by 1",
        guild_id,
        from as DateTime<Utc>,
        to as DateTime<Utc>,
        channel_ids,
        bucket,
        tag_ids,
    )
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .map(|r| Bucket {
        start: r.start,
        opened: r.opened,
        messages: r.messages,
        first_response_median: r.fr_p50,
        unanswered: r.unanswered,
    })
    .collect();
    let top_responders = sqlx::query!(
        "select c.first_responder_id as \"user_id!\", count(*) as \"n!\" \
         from conversations c \
         where c.guild_id = $1 and c.opened_at >= $2 and c.opened_at < $3 \
           and c.first_responder_id is not null \
           and (cardinality($4::bigint[]) = 0 or c.parent_id = any ($4) or c.channel_id = any ($4)) \
           and (cardinality($5::bigint[]) = 0 or c.tag_ids && $5) \
         group by 1 order by 2 desc, 1 limit 10",
        guild_id,
        from as DateTime<Utc>,
        to as DateTime<Utc>,
        channel_ids,
        tag_ids,
    )
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .map(|r| Responder {
        user_id: r.user_id,
        first_responses: r.n,
    })
    .collect();
    let heatmap = sqlx::query!(
        "select extract(isodow from c.opened_at at time zone 'UTC')::int4 as \"dow!\", \
           extract(hour from c.opened_at at time zone 'UTC')::int4 as \"hour!\", count(*) as \"n!\" \
         from conversations c \
         where c.guild_id = $1 and c.opened_at >= $2 and c.opened_at < $3 \
           and (cardinality($4::bigint[]) = 0 or c.parent_id = any ($4) or c.channel_id = any ($4)) \
           and (cardinality($5::bigint[]) = 0 or c.tag_ids && $5) \
         group by 1, 2 order by 1, 2",
        guild_id,
        from as DateTime<Utc>,
        to as DateTime<Utc>,
        channel_ids,
        tag_ids,
    )
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .map(|r| (r.dow, r.hour, r.n))
    .collect();
    Ok(Stats {
        summary,
        series,
        top_responders,
        heatmap,
    })
}
