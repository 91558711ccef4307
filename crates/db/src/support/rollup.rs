//! Daily telemetry rollups (migrations/0036, docs/support-queue.md
//! "Telemetry at scale"): what `supportStats` reads instead of every
//! conversation of a long window.
//!
//! One row per (guild, scope, UTC day) summarises the conversations opened
//! that day outside private threads: counts, the opened-per-hour profile,
//! first responders, and log-bucketed histograms of the durations. A
//! histogram bucket spans a factor of [`GAMMA`], so a percentile read from one
//! is within 1 % of the exact value (plus under a second near zero).
//!
//! Only the *fixed* part of a conversation is summarised: a waiting
//! conversation's requester wait grows with the clock, and so does the SLA
//! verdict of one nobody has answered yet; both are read from the rows at
//! read time ([`Part`]). Writes to `conversations` append the days they
//! touch to `conversation_rollup_dirty` (a statement trigger, so no write
//! path can forget); [`rebuild_dirty`] drains that log from the worker.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Timelike, Utc};

use crate::{Result, WorkerTx};

/// Ratio between consecutive histogram bucket bounds.
pub const GAMMA: f64 = 1.02;

/// Advisory lock class of the rebuild ("SR"): one rebuilder at a time.
const REBUILD_LOCK: i32 = 0x5352;

/// The histogram bucket of a duration in seconds: 0 below one second
/// (negative durations from clock skew included), else k ≥ 1 for
/// [GAMMA^(k-1), GAMMA^k).
pub fn bucket(secs: f64) -> i32 {
    if secs.is_nan() || secs < 1.0 {
        0
    } else {
        // At most ~1,300 for a century: the cast cannot truncate.
        1 + (secs.ln() / GAMMA.ln()).floor() as i32
    }
}

/// The value a bucket reports: within 1 % of every value in it (the point
/// whose ratio to both bounds is the same), 0 for bucket 0.
pub fn bucket_value(k: i32) -> f64 {
    if k <= 0 {
        0.0
    } else {
        2.0 * GAMMA.powi(k) / (GAMMA + 1.0)
    }
}

/// Counts per bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hist(BTreeMap<i32, i64>);

impl Hist {
    pub fn add(&mut self, secs: f64) {
        *self.0.entry(bucket(secs)).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Hist) {
        for (k, n) in &other.0 {
            *self.0.entry(*k).or_default() += n;
        }
    }

    pub fn count(&self) -> i64 {
        self.0.values().sum()
    }

    /// PostgreSQL's `percentile_cont` over the bucket values: linear
    /// interpolation between the values at the two closest ranks.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let pos = p.clamp(0.0, 1.0) * (n - 1) as f64;
        let (lo, hi) = (pos.floor() as i64, pos.ceil() as i64);
        let (a, b) = (self.at_rank(lo), self.at_rank(hi));
        Some(a + (b - a) * (pos - lo as f64))
    }

    fn at_rank(&self, rank: i64) -> f64 {
        let mut seen = 0;
        for (k, n) in &self.0 {
            seen += n;
            if rank < seen {
                return bucket_value(*k);
            }
        }
        self.0.keys().next_back().map_or(0.0, |k| bucket_value(*k))
    }

    /// The stored form: (bucket, count) pairs, flat.
    fn encode(&self) -> Vec<i32> {
        self.0
            .iter()
            .flat_map(|(k, n)| [*k, i32::try_from(*n).unwrap_or(i32::MAX)])
            .collect()
    }

    fn decode(flat: &[i32]) -> Hist {
        Hist(
            flat.chunks_exact(2)
                .map(|p| (p[0], i64::from(p[1])))
                .collect(),
        )
    }
}

/// What one conversation contributes, from its row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Facts {
    pub guild_id: i64,
    pub parent_id: i64,
    pub opened_at: DateTime<Utc>,
    pub state: String,
    pub message_count: i32,
    pub first_response_at: Option<DateTime<Utc>>,
    pub first_responder_id: Option<i64>,
    pub first_solved_at: Option<DateTime<Utc>>,
    pub last_solved_at: Option<DateTime<Utc>>,
    pub reopen_count: i32,
    pub waiting_since: Option<DateTime<Utc>>,
    pub wait_secs_closed: f64,
    pub next_response_secs: Vec<f64>,
    pub sla_target_secs: Option<i32>,
}

/// Which part of a conversation to count.
#[derive(Debug, Clone, Copy)]
pub enum Part {
    /// What does not change with the clock (what rollups hold).
    Fixed,
    /// Only what changes with the clock: a waiting conversation's requester
    /// wait, and the SLA verdict of one neither answered nor solved.
    Clock(DateTime<Utc>),
    /// Both.
    All(DateTime<Utc>),
}

/// The summary of a set of conversations (one day's, or a window's).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Agg {
    pub opened: i64,
    pub messages: i64,
    pub unanswered: i64,
    pub unresolved: i64,
    pub solved: i64,
    pub reopened: i64,
    pub sla_met: i64,
    pub sla_breached: i64,
    pub opened_by_hour: [i64; 24],
    pub responders: BTreeMap<i64, i64>,
    pub first_response: Hist,
    pub next_response: Hist,
    pub first_resolution: Hist,
    pub full_resolution: Hist,
    pub requester_wait: Hist,
}

fn secs(d: TimeDelta) -> f64 {
    d.num_microseconds()
        .map_or(d.num_milliseconds() as f64 / 1e3, |us| us as f64 / 1e6)
}

impl Agg {
    /// Counts `f` as the exact reads do (crates/db/src/support/stats.rs).
    pub fn add(&mut self, f: &Facts, part: Part) {
        let (fixed, now) = match part {
            Part::Fixed => (true, None),
            Part::Clock(now) => (false, Some(now)),
            Part::All(now) => (true, Some(now)),
        };
        let decided = match (f.first_response_at, f.first_solved_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if fixed {
            self.opened += 1;
            self.messages += i64::from(f.message_count);
            self.opened_by_hour[f.opened_at.hour() as usize] += 1;
            match f.first_response_at {
                Some(at) => self.first_response.add(secs(at - f.opened_at)),
                None => self.unanswered += 1,
            }
            if let Some(id) = f.first_responder_id {
                *self.responders.entry(id).or_default() += 1;
            }
            if let Some(at) = f.first_solved_at {
                self.solved += 1;
                self.first_resolution.add(secs(at - f.opened_at));
            }
            if let Some(at) = f.last_solved_at {
                self.full_resolution.add(secs(at - f.opened_at));
            }
            if f.state != "SOLVED" {
                self.unresolved += 1;
            }
            if f.reopen_count > 0 {
                self.reopened += 1;
            }
            for s in &f.next_response_secs {
                self.next_response.add(*s);
            }
            if f.waiting_since.is_none() {
                self.requester_wait.add(f.wait_secs_closed);
            }
            if let (Some(target), Some(at)) = (f.sla_target_secs, decided) {
                if at - f.opened_at <= TimeDelta::seconds(target.into()) {
                    self.sla_met += 1;
                } else {
                    self.sla_breached += 1;
                }
            }
        }
        if let Some(now) = now {
            if let Some(since) = f.waiting_since {
                self.requester_wait
                    .add(f.wait_secs_closed + secs(now - since));
            }
            if let (Some(target), None) = (f.sla_target_secs, decided) {
                if now - f.opened_at > TimeDelta::seconds(target.into()) {
                    self.sla_breached += 1;
                }
            }
        }
    }

    pub fn merge(&mut self, o: &Agg) {
        self.opened += o.opened;
        self.messages += o.messages;
        self.unanswered += o.unanswered;
        self.unresolved += o.unresolved;
        self.solved += o.solved;
        self.reopened += o.reopened;
        self.sla_met += o.sla_met;
        self.sla_breached += o.sla_breached;
        for (a, b) in self.opened_by_hour.iter_mut().zip(o.opened_by_hour) {
            *a += b;
        }
        for (id, n) in &o.responders {
            *self.responders.entry(*id).or_default() += n;
        }
        self.first_response.merge(&o.first_response);
        self.next_response.merge(&o.next_response);
        self.first_resolution.merge(&o.first_resolution);
        self.full_resolution.merge(&o.full_resolution);
        self.requester_wait.merge(&o.requester_wait);
    }
}

/// One stored rollup row, as read back.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RollupRow {
    pub guild_id: i64,
    pub parent_id: i64,
    pub day: NaiveDate,
    pub opened: i32,
    pub messages: i64,
    pub unanswered: i32,
    pub unresolved: i32,
    pub solved: i32,
    pub reopened: i32,
    pub sla_met: i32,
    pub sla_breached: i32,
    pub opened_by_hour: Vec<i32>,
    pub responder_ids: Vec<i64>,
    pub responder_counts: Vec<i32>,
    pub first_response: Vec<i32>,
    pub next_response: Vec<i32>,
    pub first_resolution: Vec<i32>,
    pub full_resolution: Vec<i32>,
    pub requester_wait: Vec<i32>,
}

impl RollupRow {
    pub fn agg(&self) -> Agg {
        let mut hours = [0i64; 24];
        for (h, n) in hours.iter_mut().zip(&self.opened_by_hour) {
            *h = i64::from(*n);
        }
        Agg {
            opened: self.opened.into(),
            messages: self.messages,
            unanswered: self.unanswered.into(),
            unresolved: self.unresolved.into(),
            solved: self.solved.into(),
            reopened: self.reopened.into(),
            sla_met: self.sla_met.into(),
            sla_breached: self.sla_breached.into(),
            opened_by_hour: hours,
            responders: self
                .responder_ids
                .iter()
                .zip(&self.responder_counts)
                .map(|(id, n)| (*id, i64::from(*n)))
                .collect(),
            first_response: Hist::decode(&self.first_response),
            next_response: Hist::decode(&self.next_response),
            first_resolution: Hist::decode(&self.first_resolution),
            full_resolution: Hist::decode(&self.full_resolution),
            requester_wait: Hist::decode(&self.requester_wait),
        }
    }
}

/// The start of `day` (UTC).
pub fn day_start(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()
}

/// The ISO week (Monday, UTC) `day` falls in: `date_trunc('week', ..)`.
pub fn week_of(day: NaiveDate) -> NaiveDate {
    day - TimeDelta::days(day.weekday().num_days_from_monday().into())
}

/// Rebuilds the rollups of up to `max_days` dirty (guild, scope, day) keys
/// from the conversations, and returns how many it rebuilt (0: none dirty,
/// or another worker is rebuilding). A write committed after this
/// transaction drained its keys leaves a dirty row of its own behind, so the
/// next call catches it.
pub async fn rebuild_dirty(tx: &mut WorkerTx, max_days: i64) -> Result<usize> {
    let locked = sqlx::query_scalar!(
        "select pg_try_advisory_xact_lock($1, 0) as \"locked!\"",
        REBUILD_LOCK
    )
    .fetch_one(&mut **tx)
    .await?;
    if !locked {
        return Ok(0);
    }
    let keys = sqlx::query!(
        "with k as (select distinct guild_id, parent_id, day from conversation_rollup_dirty \
                    order by guild_id, parent_id, day limit $1) \
         delete from conversation_rollup_dirty d using k \
         where d.guild_id = k.guild_id and d.parent_id = k.parent_id and d.day = k.day \
         returning d.guild_id, d.parent_id, d.day as \"day: NaiveDate\"",
        max_days,
    )
    .fetch_all(&mut **tx)
    .await?;
    let mut days: BTreeMap<(i64, i64, NaiveDate), Agg> = keys
        .into_iter()
        .map(|k| ((k.guild_id, k.parent_id, k.day), Agg::default()))
        .collect();
    if days.is_empty() {
        return Ok(0);
    }
    let (g, p, d): (Vec<i64>, Vec<i64>, Vec<NaiveDate>) = {
        let mut g = Vec::new();
        let mut p = Vec::new();
        let mut d = Vec::new();
        for (gg, pp, dd) in days.keys() {
            g.push(*gg);
            p.push(*pp);
            d.push(*dd);
        }
        (g, p, d)
    };
    let facts = sqlx::query_as!(
        Facts,
        "select c.guild_id, c.parent_id, c.opened_at as \"opened_at: DateTime<Utc>\", c.state, \
           c.message_count, c.first_response_at as \"first_response_at: DateTime<Utc>\", \
           c.first_responder_id, c.first_solved_at as \"first_solved_at: DateTime<Utc>\", \
           c.last_solved_at as \"last_solved_at: DateTime<Utc>\", c.reopen_count, \
           c.waiting_since as \"waiting_since: DateTime<Utc>\", c.wait_secs_closed, \
           c.next_response_secs, c.sla_target_secs \
         from unnest($1::bigint[], $2::bigint[], $3::date[]) k(g, p, d) \
         join conversations c on c.guild_id = k.g \
           and c.opened_at >= k.d::timestamp at time zone 'UTC' \
           and c.opened_at < (k.d + 1)::timestamp at time zone 'UTC' \
           and c.parent_id = k.p and not c.private",
        &g,
        &p,
        &d as &[NaiveDate],
    )
    .fetch_all(&mut **tx)
    .await?;
    for f in &facts {
        let key = (f.guild_id, f.parent_id, f.opened_at.date_naive());
        if let Some(a) = days.get_mut(&key) {
            a.add(f, Part::Fixed);
        }
    }
    let n = days.len();
    let mut up = Upsert::default();
    let (mut gone_g, mut gone_p, mut gone_d) = (Vec::new(), Vec::new(), Vec::new());
    for ((g, p, d), a) in days {
        if a.opened == 0 {
            gone_g.push(g);
            gone_p.push(p);
            gone_d.push(d);
        } else {
            up.push(g, p, d, &a);
        }
    }
    if !gone_g.is_empty() {
        sqlx::query!(
            "delete from conversation_rollups r \
             using unnest($1::bigint[], $2::bigint[], $3::date[]) k(g, p, d) \
             where r.guild_id = k.g and r.parent_id = k.p and r.day = k.d",
            &gone_g,
            &gone_p,
            &gone_d as &[NaiveDate],
        )
        .execute(&mut **tx)
        .await?;
    }
    up.write(tx).await?;
    Ok(n)
}

/// Column arrays of one bulk upsert; arrays of arrays travel as JSON
/// (PostgreSQL has no ragged arrays).
#[derive(Default)]
struct Upsert {
    g: Vec<i64>,
    p: Vec<i64>,
    d: Vec<NaiveDate>,
    counts: Vec<serde_json::Value>,
    messages: Vec<i64>,
    hours: Vec<serde_json::Value>,
    responder_ids: Vec<serde_json::Value>,
    responder_counts: Vec<serde_json::Value>,
    hists: Vec<serde_json::Value>,
}

impl Upsert {
    fn push(&mut self, g: i64, p: i64, d: NaiveDate, a: &Agg) {
        self.g.push(g);
        self.p.push(p);
        self.d.push(d);
        self.counts.push(serde_json::json!([
            a.opened,
            a.unanswered,
            a.unresolved,
            a.solved,
            a.reopened,
            a.sla_met,
            a.sla_breached
        ]));
        self.messages.push(a.messages);
        self.hours.push(serde_json::json!(a.opened_by_hour));
        self.responder_ids
            .push(serde_json::json!(a.responders.keys().collect::<Vec<_>>()));
        self.responder_counts
            .push(serde_json::json!(a.responders.values().collect::<Vec<_>>()));
        self.hists.push(serde_json::json!([
            a.first_response.encode(),
            a.next_response.encode(),
            a.first_resolution.encode(),
            a.full_resolution.encode(),
            a.requester_wait.encode()
        ]));
    }

    async fn write(self, tx: &mut WorkerTx) -> Result<()> {
        if self.g.is_empty() {
            return Ok(());
        }
        sqlx::query!(
            "insert into conversation_rollups as r (guild_id, parent_id, day, opened, messages, \
               unanswered, unresolved, solved, reopened, sla_met, sla_breached, opened_by_hour, \
               responder_ids, responder_counts, first_response, next_response, first_resolution, \
               full_resolution, requester_wait, rebuilt_at) \
             select k.g, k.p, k.d, (k.c->>0)::int, k.m, (k.c->>1)::int, (k.c->>2)::int, \
               (k.c->>3)::int, (k.c->>4)::int, (k.c->>5)::int, (k.c->>6)::int, \
               array(select jsonb_array_elements_text(k.h)::int), \
               array(select jsonb_array_elements_text(k.ri)::bigint), \
               array(select jsonb_array_elements_text(k.rc)::int), \
               array(select jsonb_array_elements_text(k.x->0)::int), \
               array(select jsonb_array_elements_text(k.x->1)::int), \
               array(select jsonb_array_elements_text(k.x->2)::int), \
               array(select jsonb_array_elements_text(k.x->3)::int), \
               array(select jsonb_array_elements_text(k.x->4)::int), now() \
             from unnest($1::bigint[], $2::bigint[], $3::date[], $4::jsonb[], $5::bigint[], \
                         $6::jsonb[], $7::jsonb[], $8::jsonb[], $9::jsonb[]) \
               k(g, p, d, c, m, h, ri, rc, x) \
             on conflict (guild_id, parent_id, day) do update set \
               opened = excluded.opened, messages = excluded.messages, \
               unanswered = excluded.unanswered, unresolved = excluded.unresolved, \
               solved = excluded.solved, reopened = excluded.reopened, \
               sla_met = excluded.sla_met, sla_breached = excluded.sla_breached, \
               opened_by_hour = excluded.opened_by_hour, responder_ids = excluded.responder_ids, \
               responder_counts = excluded.responder_counts, \
               first_response = excluded.first_response, next_response = excluded.next_response, \
               first_resolution = excluded.first_resolution, \
               full_resolution = excluded.full_resolution, \
               requester_wait = excluded.requester_wait, rebuilt_at = excluded.rebuilt_at",
            &self.g,
            &self.p,
            &self.d as &[NaiveDate],
            &self.counts,
            &self.messages,
            &self.hours,
            &self.responder_ids,
            &self.responder_counts,
            &self.hists,
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_value_is_within_one_percent_of_every_value_in_it() {
        for s in [1.0, 1.5, 59.9, 60.0, 3_600.0, 86_400.0 * 30.0, 1e8] {
            let v = bucket_value(bucket(s));
            assert!((v - s).abs() / s <= 0.01, "{s} -> {v}");
        }
        assert_eq!(bucket(0.4), 0);
        assert_eq!(bucket(-5.0), 0);
        assert_eq!(bucket(f64::NAN), 0);
        assert_eq!(bucket_value(0), 0.0);
    }

    #[test]
    fn percentiles_interpolate_like_percentile_cont() {
        let mut h = Hist::default();
        for s in [10.0, 20.0, 30.0, 40.0] {
            h.add(s);
        }
        // percentile_cont(0.5) of 10, 20, 30, 40 is 25.
        let m = h.percentile(0.5).unwrap_or_default();
        assert!((m - 25.0).abs() / 25.0 <= 0.01, "{m}");
        assert_eq!(Hist::default().percentile(0.5), None);
        assert_eq!(Hist::decode(&h.encode()), h);
    }

    #[test]
    fn fixed_and_clock_parts_add_up_to_the_whole() {
        let t = |s: i64| DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap_or_default();
        let f = Facts {
            guild_id: 1,
            parent_id: 2,
            opened_at: t(0),
            state: "NEW".into(),
            message_count: 3,
            first_response_at: None,
            first_responder_id: None,
            first_solved_at: None,
            last_solved_at: None,
            reopen_count: 0,
            waiting_since: Some(t(0)),
            wait_secs_closed: 0.0,
            next_response_secs: vec![],
            sla_target_secs: Some(60),
        };
        let now = t(3_600);
        let mut whole = Agg::default();
        whole.add(&f, Part::All(now));
        let mut parts = Agg::default();
        parts.add(&f, Part::Fixed);
        parts.add(&f, Part::Clock(now));
        assert_eq!(whole, parts);
        assert_eq!(whole.sla_breached, 1);
        assert_eq!(whole.requester_wait.count(), 1);
        let mut fixed = Agg::default();
        fixed.add(&f, Part::Fixed);
        assert_eq!((fixed.sla_breached, fixed.requester_wait.count()), (0, 0));
    }
}
