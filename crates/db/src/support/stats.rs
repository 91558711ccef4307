//! `supportStats`: telemetry over a window, under row-level security.
//!
//! Two ways to the same numbers. [`exact`] reads every conversation of the
//! window (five statements; percentiles by `percentile_cont`). Over a long
//! window of a busy guild that is too many rows (~170,000 for a month at
//! 500k conversations), so [`stats`] reads the window's whole UTC days from
//! the daily rollups (crates/db/src/support/rollup.rs) and only the rest
//! from rows: the partial days at both ends, conversations in private
//! threads, and the clock-dependent part of those still waiting. Counts
//! agree exactly; percentiles from rollups are within 1 %. Windows of up to
//! [`EXACT_UP_TO`] conversations, hourly series and tag filters (rollups
//! keep no tags) take the exact reads.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Utc};

use super::rollup::{day_start, week_of, Agg, Facts, Part, RollupRow};
use crate::{Result, ViewerTx};

/// Windows with at most this many conversations are read exactly.
pub const EXACT_UP_TO: i64 = 20_000;

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

/// The exact reads: every conversation of the window, in five statements.
async fn exact(
    tx: &mut ViewerTx,
    guild_id: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: &str,
    channel_ids: &[i64],
    tag_ids: &[i64],
) -> Result<Stats> {
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
    let backlog = backlog(tx, guild_id, channel_ids, tag_ids).await?;
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
        backlog: backlog.0,
        oldest_waiting_since: backlog.1,
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
    stats_with(
        tx,
        guild_id,
        from,
        to,
        bucket,
        channel_ids,
        tag_ids,
        EXACT_UP_TO,
    )
    .await
}

/// [`stats`] with the exact-read threshold as a parameter (tests compare
/// both ways on one window).
#[allow(clippy::too_many_arguments)]
pub async fn stats_with(
    tx: &mut ViewerTx,
    guild_id: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: &str,
    channel_ids: &[i64],
    tag_ids: &[i64],
    exact_up_to: i64,
) -> Result<Stats> {
    if !["hour", "day", "week"].contains(&bucket) {
        return Err(crate::Error::Invalid(format!("bucket {bucket:?}")));
    }
    // Whole UTC days inside the window.
    let first_day = (from - TimeDelta::nanoseconds(1)).date_naive() + TimeDelta::days(1);
    let end_day = to.date_naive();
    let rollups_apply = bucket != "hour"
        && tag_ids.is_empty()
        && first_day < end_day
        && !names_a_thread(tx, channel_ids).await?;
    if !rollups_apply {
        return exact(tx, guild_id, from, to, bucket, channel_ids, tag_ids).await;
    }
    let now = sqlx::query_scalar!("select now() as \"now!: DateTime<Utc>\"")
        .fetch_one(&mut **tx)
        .await?;
    let (mid_from, mid_to) = (day_start(first_day), day_start(end_day));
    let mut days: BTreeMap<NaiveDate, Agg> = BTreeMap::new();
    let rows = sqlx::query_as!(
        RollupRow,
        "select guild_id, parent_id, day as \"day: NaiveDate\", opened, messages, unanswered, unresolved, solved, \
           reopened, sla_met, sla_breached, opened_by_hour, responder_ids, responder_counts, \
           first_response, next_response, first_resolution, full_resolution, requester_wait \
         from conversation_rollups \
         where guild_id = $1 and day >= $2 and day < $3 \
           and (cardinality($4::bigint[]) = 0 or parent_id = any ($4))",
        guild_id,
        first_day as NaiveDate,
        end_day as NaiveDate,
        channel_ids,
    )
    .fetch_all(&mut **tx)
    .await?;
    for r in &rows {
        days.entry(r.day).or_default().merge(&r.agg());
    }
    // Everything about the partial days at both ends and about private
    // threads; only the clock's part of the whole days' waiting conversations.
    let whole = facts(tx, guild_id, from, mid_from, channel_ids, Scope::All).await?;
    let mut tail = facts(tx, guild_id, mid_to, to, channel_ids, Scope::All).await?;
    let private = facts(tx, guild_id, mid_from, mid_to, channel_ids, Scope::Private).await?;
    let waiting = facts(tx, guild_id, mid_from, mid_to, channel_ids, Scope::Waiting).await?;
    let mut all = whole;
    all.append(&mut tail);
    for f in all.iter().chain(&private) {
        days.entry(f.opened_at.date_naive())
            .or_default()
            .add(f, Part::All(now));
    }
    for f in &waiting {
        days.entry(f.opened_at.date_naive())
            .or_default()
            .add(f, Part::Clock(now));
    }
    let mut total = Agg::default();
    for a in days.values() {
        total.merge(a);
    }
    if total.opened <= exact_up_to {
        return exact(tx, guild_id, from, to, bucket, channel_ids, tag_ids).await;
    }
    let backlog = backlog(tx, guild_id, channel_ids, tag_ids).await?;
    let durations = |h: &super::rollup::Hist| Durations {
        count: h.count(),
        median: h.percentile(0.5),
        p90: h.percentile(0.9),
    };
    let summary = Summary {
        opened: total.opened,
        messages: total.messages,
        first_response: durations(&total.first_response),
        unanswered: total.unanswered,
        next_response: durations(&total.next_response),
        first_resolution: durations(&total.first_resolution),
        full_resolution: durations(&total.full_resolution),
        unresolved: total.unresolved,
        requester_wait: Durations {
            count: total.opened,
            ..durations(&total.requester_wait)
        },
        solved: total.solved,
        reopened: total.reopened,
        sla_met: total.sla_met,
        sla_breached: total.sla_breached,
        backlog: backlog.0,
        oldest_waiting_since: backlog.1,
    };
    let mut buckets: BTreeMap<NaiveDate, Agg> = BTreeMap::new();
    for (day, a) in &days {
        let key = if bucket == "week" {
            week_of(*day)
        } else {
            *day
        };
        buckets.entry(key).or_default().merge(a);
    }
    let series = buckets
        .into_iter()
        .filter(|(_, a)| a.opened > 0)
        .map(|(day, a)| Bucket {
            start: day_start(day),
            opened: a.opened,
            messages: a.messages,
            first_response_median: a.first_response.percentile(0.5),
            unanswered: a.unanswered,
        })
        .collect();
    let mut responders: Vec<(i64, i64)> = total.responders.iter().map(|(u, n)| (*u, *n)).collect();
    responders.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let top_responders = responders
        .into_iter()
        .take(10)
        .map(|(user_id, first_responses)| Responder {
            user_id,
            first_responses,
        })
        .collect();
    let mut heat: BTreeMap<(i32, i32), i64> = BTreeMap::new();
    for (day, a) in &days {
        let dow = i32::try_from(day.weekday().number_from_monday()).unwrap_or(1);
        for (hour, n) in (0i32..).zip(a.opened_by_hour) {
            if n > 0 {
                *heat.entry((dow, hour)).or_default() += n;
            }
        }
    }
    Ok(Stats {
        summary,
        series,
        top_responders,
        heatmap: heat.into_iter().map(|((d, h), n)| (d, h, n)).collect(),
    })
}

/// Whether any of `channel_ids` is a thread the viewer can see: rollups are
/// per scope, so a filter on a conversation's own thread takes the exact
/// reads. (A thread the viewer cannot see filters to nothing either way.)
async fn names_a_thread(tx: &mut ViewerTx, channel_ids: &[i64]) -> Result<bool> {
    if channel_ids.is_empty() {
        return Ok(false);
    }
    Ok(sqlx::query_scalar!(
        "select exists (select 1 from channels where channel_id = any ($1) \
                        and kind in (10, 11, 12)) as \"found!\"",
        channel_ids,
    )
    .fetch_one(&mut **tx)
    .await?)
}

/// Which rows of a range [`facts`] reads.
#[derive(Clone, Copy)]
enum Scope {
    /// Every conversation opened in the range.
    All,
    /// Those in private threads (not in rollups).
    Private,
    /// Those outside private threads that are waiting now.
    Waiting,
}

/// Conversations opened in `[from, to)` the viewer can see, as rollups count them.
async fn facts(
    tx: &mut ViewerTx,
    guild_id: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    channel_ids: &[i64],
    scope: Scope,
) -> Result<Vec<Facts>> {
    if from >= to {
        return Ok(Vec::new());
    }
    macro_rules! facts_query {
        ($where:literal) => {
            sqlx::query_as!(
                Facts,
                "select c.guild_id, c.parent_id, c.opened_at as \"opened_at: DateTime<Utc>\", \
                   c.state, c.message_count, \
                   c.first_response_at as \"first_response_at: DateTime<Utc>\", \
                   c.first_responder_id, c.first_solved_at as \"first_solved_at: DateTime<Utc>\", \
                   c.last_solved_at as \"last_solved_at: DateTime<Utc>\", c.reopen_count, \
                   c.waiting_since as \"waiting_since: DateTime<Utc>\", c.wait_secs_closed, \
                   c.next_response_secs, c.sla_target_secs \
                 from conversations c \
                 where c.guild_id = $1 \
                   and (cardinality($4::bigint[]) = 0 or c.parent_id = any ($4) \
                        or c.channel_id = any ($4)) and "
                    + $where,
                guild_id,
                from as DateTime<Utc>,
                to as DateTime<Utc>,
                channel_ids,
            )
            .fetch_all(&mut **tx)
            .await?
        };
    }
    Ok(match scope {
        Scope::All => facts_query!("c.opened_at >= $2 and c.opened_at < $3"),
        Scope::Private => {
            facts_query!("c.private and c.opened_at >= $2 and c.opened_at < $3")
        }
        // The queue index's range of waiting conversations (the backlog),
        // not the window's rows.
        Scope::Waiting => facts_query!(
            "coalesce(c.waiting_since, 'infinity'::timestamptz) < 'infinity'::timestamptz \
             and not c.private and c.opened_at >= $2 and c.opened_at < $3"
        ),
    })
}

/// Waiting now (NEW or WAITING_ON_STAFF), and the oldest wait's start.
async fn backlog(
    tx: &mut ViewerTx,
    guild_id: i64,
    channel_ids: &[i64],
    tag_ids: &[i64],
) -> Result<(i64, Option<DateTime<Utc>>)> {
    let b = sqlx::query!(
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
    Ok((b.n, b.oldest))
}
