//! Telemetry from daily rollups agrees with the exact reads: the same counts,
//! percentiles within the histograms' 1 %, for viewers with different rights
//! (rollups are read under row-level security), across private threads,
//! partial days at both ends, clock-dependent waits, and after writes that
//! the worker's rebuild has to catch up with.

use chrono::{DateTime, Duration, Utc};
use observer_db::support::{
    queue::{Durations, Stats},
    rollup, stats,
};
use observer_db::{migrate, Db};
use sqlx::PgPool;

const G: i64 = 1;
const STAFF_ROLE: i64 = 100;
const PUBLIC_FORUM: i64 = 500;
const STAFF_FORUM: i64 = 600;
const STAFF: i64 = 11;
const CUSTOMER: i64 = 12;
const VIEW: i64 = 1 << 10;
const HISTORY: i64 = 1 << 16;

/// 4,000 conversations over 40 days: 60 % in a public forum, 30 % in a forum
/// only staff see, 10 % in private threads of the public forum (the
/// customer is a member of a quarter of them); every state, answered and
/// not, solved and reopened, with and without an SLA target, waiting now.
async fn seed(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(&format!(
        "select setseed(0.7);
         insert into guilds (guild_id, name, owner_id) values ({G}, 'g', 1);
         insert into roles (guild_id, role_id, name, permissions) values
           ({G}, {G}, '@everyone', {everyone}), ({G}, {STAFF_ROLE}, 'Staff', 0);
         insert into channels (guild_id, channel_id, kind, name) values
           ({G}, {PUBLIC_FORUM}, 15, 'help'), ({G}, {STAFF_FORUM}, 15, 'escalations');
         insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny) values
           ({G}, {STAFF_FORUM}, {G}, 0, 0, {VIEW}),
           ({G}, {STAFF_FORUM}, {STAFF_ROLE}, 0, {everyone}, 0);
         insert into members (guild_id, user_id, role_ids) values
           ({G}, {STAFF}, array[{STAFF_ROLE}]::bigint[]), ({G}, {CUSTOMER}, '{{}}');
         create temp table t as
           select j, now() - interval '40 days' + j * (interval '40 days' / 4000) as opened,
                  case when j % 10 = 9 then 12 else 11 end as kind,
                  case when j % 10 between 6 and 8 then {STAFF_FORUM} else {PUBLIC_FORUM} end as parent,
                  random() as r, random() as r2
           from generate_series(0, 3999) j;
         insert into channels (guild_id, channel_id, kind, name, parent_id)
           select {G}, 10000 + j, kind, 'post', parent from t;
         insert into thread_members (guild_id, thread_id, user_id)
           select {G}, 10000 + j, {CUSTOMER} from t where kind = 12 and j % 40 = 9;
         insert into conversations (guild_id, conversation_id, channel_id, parent_id, private,
             requester_id, opened_at, state, first_response_at, first_responder_id,
             first_solved_at, last_solved_at, reopen_count, message_count, waiting_since,
             wait_secs_closed, next_response_secs, sla_target_secs)
         select {G}, 10000 + j, 10000 + j, parent, kind = 12, 5000 + j % 50, opened, st,
                fr, case when fr is not null then 20 + j % 7 end,
                fs, case when fs is not null then fs + (j % 3) * interval '1 hour' end,
                case when fs is not null then j % 3 else 0 end, 1 + j % 17,
                case when st = 'NEW' then opened
                     when st = 'WAITING_ON_STAFF' then least(fr + interval '1 hour', now()) end,
                case when st = 'NEW' then 0 else r2 * 7200 end,
                array(select r2 * 600 * g from generate_series(1, j % 4) g),
                case when j % 2 = 0 then 3600 end
         from (select t.*,
                      case when r < 0.15 then 'NEW' when r < 0.35 then 'WAITING_ON_STAFF'
                           when r < 0.6 then 'WAITING_ON_REQUESTER' else 'SOLVED' end as st,
                      case when r >= 0.15 then opened + r2 * interval '10 hours' end as fr,
                      case when r >= 0.6 then opened + r2 * interval '30 hours' end as fs
               from t) x;
         analyze;",
        everyone = VIEW | HISTORY,
    ))
    .execute(pool)
    .await?;
    Ok(())
}

async fn rebuild_all(db: &Db) -> anyhow::Result<usize> {
    let mut total = 0;
    loop {
        let mut tx = db.worker().await?;
        let n = rollup::rebuild_dirty(&mut tx, 7).await?;
        tx.commit().await?;
        if n == 0 {
            return Ok(total);
        }
        total += n;
    }
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() <= 1.0 + 0.011 * b.abs(),
        _ => false,
    }
}

fn same_durations(what: &str, rolled: &Durations, exact: &Durations) {
    assert_eq!(rolled.count, exact.count, "{what} count");
    assert!(
        close(rolled.median, exact.median),
        "{what} median {rolled:?} vs {exact:?}"
    );
    assert!(
        close(rolled.p90, exact.p90),
        "{what} p90 {rolled:?} vs {exact:?}"
    );
}

fn same_stats(what: &str, r: &Stats, e: &Stats) {
    let (rs, es) = (&r.summary, &e.summary);
    assert!(es.opened > 0, "{what}: the window holds conversations");
    for (name, a, b) in [
        ("opened", rs.opened, es.opened),
        ("messages", rs.messages, es.messages),
        ("unanswered", rs.unanswered, es.unanswered),
        ("unresolved", rs.unresolved, es.unresolved),
        ("solved", rs.solved, es.solved),
        ("reopened", rs.reopened, es.reopened),
        ("sla_met", rs.sla_met, es.sla_met),
        ("sla_breached", rs.sla_breached, es.sla_breached),
        ("backlog", rs.backlog, es.backlog),
    ] {
        assert_eq!(a, b, "{what}: {name}");
    }
    assert_eq!(rs.oldest_waiting_since, es.oldest_waiting_since, "{what}");
    same_durations(
        &format!("{what} first response"),
        &rs.first_response,
        &es.first_response,
    );
    same_durations(
        &format!("{what} next response"),
        &rs.next_response,
        &es.next_response,
    );
    same_durations(
        &format!("{what} first resolution"),
        &rs.first_resolution,
        &es.first_resolution,
    );
    same_durations(
        &format!("{what} full resolution"),
        &rs.full_resolution,
        &es.full_resolution,
    );
    same_durations(
        &format!("{what} requester wait"),
        &rs.requester_wait,
        &es.requester_wait,
    );
    assert_eq!(r.series.len(), e.series.len(), "{what}: buckets");
    for (a, b) in r.series.iter().zip(&e.series) {
        assert_eq!(
            (a.start, a.opened, a.messages, a.unanswered),
            (b.start, b.opened, b.messages, b.unanswered),
            "{what}: bucket"
        );
        assert!(
            close(a.first_response_median, b.first_response_median),
            "{what}: bucket median {a:?} vs {b:?}"
        );
    }
    assert_eq!(r.top_responders, e.top_responders, "{what}: top responders");
    assert_eq!(r.heatmap, e.heatmap, "{what}: heatmap");
}

/// Both ways inside one viewer transaction (one `now()`).
async fn both(
    db: &Db,
    viewer: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: &str,
    channels: &[i64],
) -> anyhow::Result<(Stats, Stats)> {
    let mut tx = db.viewer(viewer).await?;
    let rolled = stats::stats_with(&mut tx, G, from, to, bucket, channels, &[], 0).await?;
    let exact = stats::stats_with(&mut tx, G, from, to, bucket, channels, &[], i64::MAX).await?;
    tx.commit().await?;
    Ok((rolled, exact))
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn rollups_agree_with_the_exact_reads_under_each_viewers_rights(
    pool: PgPool,
) -> anyhow::Result<()> {
    migrate::apply_policies(&pool).await?;
    seed(&pool).await?;
    let db = Db::new(pool.clone());
    let rebuilt = rebuild_all(&db).await?;
    assert!(rebuilt >= 80, "two forums × 41 days rebuilt ({rebuilt})");

    let now = Utc::now();
    let mut opened = Vec::new();
    for viewer in [STAFF, CUSTOMER] {
        for (days, bucket, channels) in [
            (30, "day", vec![]),
            (38, "week", vec![]),
            (20, "day", vec![PUBLIC_FORUM]),
        ] {
            let from = now - Duration::days(days) - Duration::minutes(97);
            let (r, e) = both(&db, viewer, from, now, bucket, &channels).await?;
            same_stats(
                &format!("viewer {viewer}, {days} days by {bucket}, channels {channels:?}"),
                &r,
                &e,
            );
            opened.push(e.summary.opened);
        }
    }
    assert!(
        opened[0] > opened[3],
        "staff see more conversations than the customer: {opened:?}"
    );

    // A write marks its day; until the rebuild the rollup is stale, after
    // it the two ways agree again.
    let mut tx = db.worker().await?;
    sqlx::query(
        "update conversations set message_count = message_count + 1000
         where guild_id = $1 and conversation_id = 12000",
    )
    .bind(G)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let dirty: i64 = sqlx::query_scalar("select count(*) from conversation_rollup_dirty")
        .fetch_one(&pool)
        .await?;
    assert!(dirty >= 1, "the update marked its day");
    let from = now - Duration::days(39);
    let (r, e) = both(&db, STAFF, from, now, "day", &[]).await?;
    assert_eq!(
        r.summary.messages + 1000,
        e.summary.messages,
        "stale until rebuilt"
    );
    assert_eq!(rebuild_all(&db).await?, 1);
    let (r, e) = both(&db, STAFF, from, now, "day", &[]).await?;
    same_stats("after the rebuild", &r, &e);

    // A deleted conversation leaves its day's rollup, and an emptied day's
    // rollup row goes.
    sqlx::query(
        "delete from conversations where guild_id = $1 and opened_at < now() - interval '35 days'",
    )
    .bind(G)
    .execute(&pool)
    .await?;
    rebuild_all(&db).await?;
    let left: i64 = sqlx::query_scalar(
        "select count(*) from conversation_rollups where day < (now() - interval '36 days')::date",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(left, 0, "emptied days have no rollup");
    let (r, e) = both(&db, CUSTOMER, now - Duration::days(39), now, "day", &[]).await?;
    same_stats("after deletes", &r, &e);
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn small_windows_hourly_series_and_tag_filters_read_exactly(
    pool: PgPool,
) -> anyhow::Result<()> {
    migrate::apply_policies(&pool).await?;
    seed(&pool).await?;
    let db = Db::new(pool.clone());
    // No rebuild: rollups are empty, so any answer that used them would be
    // short of the exact one.
    let now = Utc::now();
    let from = now - Duration::days(30);
    let mut tx = db.viewer(STAFF).await?;
    let exact = stats::stats_with(&mut tx, G, from, now, "day", &[], &[], i64::MAX).await?;
    let default = stats::stats(&mut tx, G, from, now, "day", &[], &[]).await?;
    assert_eq!(default.summary, exact.summary, "under the threshold: exact");
    let hourly = stats::stats_with(&mut tx, G, from, now, "hour", &[], &[], 0).await?;
    assert_eq!(hourly.summary, exact.summary, "hourly series: exact");
    let thread = stats::stats_with(&mut tx, G, from, now, "day", &[13_900], &[], 0).await?;
    assert_eq!(thread.summary.opened, 1, "a thread filter: exact");
    tx.commit().await?;
    Ok(())
}
