//! Worker-only checks: the database compared with the simulator's ground
//! truth (messages, access data). Starting things lives in observer-testkit.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use observer_sim::{MessageState, SimConfig, Simulator};
use sqlx::PgPool;

pub use observer_testkit::worker::{config, start, Running};
pub use observer_testkit::{db, eventually, init_tracing};

pub async fn sim(config: SimConfig) -> anyhow::Result<Simulator> {
    Ok(Simulator::start(config).await?)
}

/// Storage keeps microseconds (like Discord's own timestamps).
fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

type Row = (
    i64,
    i64,
    i64,
    Option<i64>,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    bool,
    serde_json::Value,
    Option<i64>,
);

/// Compares the database with the simulator's ground truth, exactly: every
/// message, content, edit time, deletion, all revisions, attachments, reply.
pub async fn compare_truth(
    pool: &PgPool,
    truth: &[MessageState],
) -> anyhow::Result<Result<(), String>> {
    let rows: Vec<Row> = sqlx::query_as(
        "select message_id, guild_id, channel_id, author_id, content, created_at, edited_at,
                (deleted_at is not null or deletion_detected_at is not null), attachments, reply_to_id
         from messages",
    )
    .fetch_all(pool)
    .await?;
    let rows: BTreeMap<i64, Row> = rows.into_iter().map(|r| (r.0, r)).collect();
    let revs: Vec<(i64, DateTime<Utc>, String)> =
        sqlx::query_as("select message_id, version_at, content from message_revisions")
            .fetch_all(pool)
            .await?;
    let mut rev_map: BTreeMap<i64, BTreeSet<(DateTime<Utc>, String)>> = BTreeMap::new();
    for (m, at, c) in revs {
        rev_map.entry(m).or_default().insert((at, c));
    }
    if rows.len() != truth.len() {
        let missing: Vec<String> = truth
            .iter()
            .filter(|t| !rows.contains_key(&(t.id as i64)))
            .take(10)
            .map(|t| {
                format!(
                    "{}@{} ch {} {:?} del={}",
                    t.id, t.created_at, t.channel_id, t.content, t.deleted
                )
            })
            .collect();
        return Ok(Err(format!(
            "{} rows, {} in truth; missing {missing:?}",
            rows.len(),
            truth.len()
        )));
    }
    for t in truth {
        let id = t.id as i64;
        let Some(r) = rows.get(&id) else {
            return Ok(Err(format!("message {id} missing")));
        };
        let want_att: Vec<(String, String)> = t
            .attachments
            .iter()
            .map(|a| (a.id.to_string(), a.filename.clone()))
            .collect();
        let got_att: Vec<(String, String)> =
            r.8.as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| {
                            (
                                x["id"].as_str().unwrap_or_default().to_owned(),
                                x["filename"].as_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
        let want = (
            t.guild_id as i64,
            t.channel_id as i64,
            Some(t.author_id as i64),
            t.content.as_str(),
            micros(t.created_at),
            t.edited_at.map(micros),
            t.deleted,
            want_att,
            t.reply_to.map(|r| r as i64),
        );
        let got = (r.1, r.2, r.3, r.4.as_str(), r.5, r.6, r.7, got_att, r.9);
        if want != got {
            return Ok(Err(format!("message {id}: want {want:?}, got {got:?}")));
        }
        let want_revs: BTreeSet<(DateTime<Utc>, String)> = t
            .revisions
            .iter()
            .map(|v| (micros(v.at), v.content.clone()))
            .collect();
        let got_revs = rev_map.get(&id).cloned().unwrap_or_default();
        if want_revs != got_revs {
            return Ok(Err(format!(
                "message {id}: revisions want {want_revs:?}, got {got_revs:?}"
            )));
        }
    }
    Ok(Ok(()))
}

/// Waits until the database equals the ground truth of every channel the bot
/// can read: Discord sends nothing from the others, so no mirror could hold them.
pub async fn wait_truth(pool: &PgPool, sim: &Simulator, timeout: Duration) -> anyhow::Result<()> {
    let truth = sim.bot_readable_truth();
    eventually(timeout, "database equals ground truth", || {
        compare_truth(pool, &truth)
    })
    .await
}

pub async fn wait_guilds(pool: &PgPool, n: i64) -> anyhow::Result<()> {
    eventually(Duration::from_secs(30), "guilds mirrored", || async {
        let got: i64 = sqlx::query_scalar("select count(*) from guilds where removed_at is null")
            .fetch_one(pool)
            .await?;
        Ok(if got >= n {
            Ok(())
        } else {
            Err(format!("{got} guilds"))
        })
    })
    .await
}

/// No message has two "created" events, and every message has an event.
pub async fn one_create_event_each(pool: &PgPool) -> anyhow::Result<()> {
    let dup: Vec<(i64, i64)> = sqlx::query_as(
        "select message_id, count(*) from message_events where kind = 1
         group by message_id having count(*) > 1",
    )
    .fetch_all(pool)
    .await?;
    anyhow::ensure!(dup.is_empty(), "duplicate created events: {dup:?}");
    let missing: i64 = sqlx::query_scalar(
        "select count(*) from messages m where not exists
           (select 1 from message_events e where e.message_id = m.message_id)",
    )
    .fetch_one(pool)
    .await?;
    // (A delete handled before its create yields "deleted" then "updated",
    // no "created": serenity reorders handlers.)
    anyhow::ensure!(missing == 0, "{missing} messages without any event");
    Ok(())
}

type Ows = BTreeSet<(i64, i64, i16, i64, i64)>;
type Members = BTreeSet<(i64, Vec<i64>, Option<DateTime<Utc>>)>;

/// Compares mirrored access data with the simulator's: roles, active channels
/// and threads, overwrites, members (roles, timeout), bot presence.
/// `bot_viewable`: the channels the bot can view; threads it cannot are not
/// announced by Discord (every other channel is).
pub async fn compare_access(
    pool: &PgPool,
    truth: &observer_sim::Scenario,
    bot_id: i64,
    bot_viewable: &BTreeSet<u64>,
) -> anyhow::Result<Result<(), String>> {
    for g in &truth.guilds {
        let gid = g.id as i64;
        let removed: Option<bool> =
            sqlx::query_scalar("select removed_at is not null from guilds where guild_id = $1")
                .bind(gid)
                .fetch_optional(pool)
                .await?;
        if removed != Some(!g.bot_present) {
            return Ok(Err(format!(
                "guild {gid}: removed {removed:?}, bot_present {}",
                g.bot_present
            )));
        }
        if !g.bot_present {
            continue;
        }
        let want_roles: BTreeSet<(i64, i64)> = g
            .roles
            .iter()
            .map(|r| (r.id as i64, r.permissions as i64))
            .collect();
        let got_roles: BTreeSet<(i64, i64)> = sqlx::query_as::<_, (i64, i64)>(
            "select role_id, permissions from roles where guild_id = $1",
        )
        .bind(gid)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        if want_roles != got_roles {
            return Ok(Err(format!(
                "guild {gid} roles: want {want_roles:?} got {got_roles:?}"
            )));
        }
        let active = |c: &&observer_sim::Channel| {
            !c.thread.as_ref().is_some_and(|t| t.archived)
                && (!c.kind.is_thread() || bot_viewable.contains(&c.id))
        };
        let want_ch: BTreeSet<(i64, i16, Option<i64>)> = g
            .channels
            .iter()
            .filter(active)
            .map(|c| {
                (
                    c.id as i64,
                    i16::from(c.kind.code()),
                    c.parent_id.map(|p| p as i64),
                )
            })
            .collect();
        let got_ch: BTreeSet<(i64, i16, Option<i64>)> = sqlx::query_as::<_, (i64, i16, Option<i64>)>(
            "select channel_id, kind, parent_id from channels where guild_id = $1 and not archived",
        )
        .bind(gid)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        if want_ch != got_ch {
            return Ok(Err(format!(
                "guild {gid} channels: want {want_ch:?} got {got_ch:?}"
            )));
        }
        let want_ow: Ows = g
            .channels
            .iter()
            .filter(active)
            .flat_map(|c| {
                c.overwrites.iter().map(move |o| {
                    (
                        c.id as i64,
                        o.id as i64,
                        match o.kind {
                            observer_sim::OverwriteKind::Role => 0,
                            observer_sim::OverwriteKind::Member => 1,
                        },
                        o.allow as i64,
                        o.deny as i64,
                    )
                })
            })
            .collect();
        let got_ow: Ows = sqlx::query_as::<_, (i64, i64, i16, i64, i64)>(
            "select channel_id, target_id, kind, allow, deny from permission_overwrites where guild_id = $1",
        )
        .bind(gid)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        if want_ow != got_ow {
            return Ok(Err(format!(
                "guild {gid} overwrites: want {want_ow:?} got {got_ow:?}"
            )));
        }
        let want_m: Members = g
            .members
            .iter()
            .filter(|m| m.user_id as i64 != bot_id)
            .map(|m| {
                let mut r: Vec<i64> = m.roles.iter().map(|r| *r as i64).collect();
                r.sort_unstable();
                (
                    m.user_id as i64,
                    r,
                    m.communication_disabled_until.map(micros),
                )
            })
            .collect();
        let got_m: Members = sqlx::query_as::<_, (i64, Vec<i64>, Option<DateTime<Utc>>)>(
            "select user_id, array(select unnest(role_ids) order by 1), communication_disabled_until
             from members where guild_id = $1 and user_id <> $2",
        )
        .bind(gid)
        .bind(bot_id)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        if want_m != got_m {
            let diff: Vec<_> = want_m.symmetric_difference(&got_m).take(6).collect();
            return Ok(Err(format!("guild {gid} members differ: {diff:?}")));
        }
    }
    Ok(Ok(()))
}

pub async fn wait_access(pool: &PgPool, sim: &Simulator, timeout: Duration) -> anyhow::Result<()> {
    let truth = sim.access_truth();
    // The bot is a member of its guilds too; the scenario does not list it.
    let bot = sim.config().bot_user_id as i64;
    let viewable = sim.bot_viewable_channels();
    eventually(timeout, "access data equals the simulator's", || {
        compare_access(pool, &truth, bot, &viewable)
    })
    .await
}
