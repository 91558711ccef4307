//! Support queue reads at scale, under row-level security.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo run --release -p observer-db --example support_bench -- [MESSAGES] [CONVERSATIONS] [RUNS]
//! ```
//!
//! Defaults: 10,000,000 messages, 500,000 conversations, 200 runs per query.
//!
//! Creates a scratch database `observer_supbench_<pid>` next to DATABASE_URL's
//! (dropped at the end, also on error), and loads, with set-based SQL as the
//! superuser, one guild: @everyone (VIEW_CHANNEL | READ_MESSAGE_HISTORY), a
//! Staff role (MANAGE_MESSAGES), a public forum and a forum hidden from
//! @everyone but open to Staff, a staff viewer and a customer viewer, the
//! conversations' threads (80 % public forum, 20 % staff forum, opened over the
//! last 90 days), the messages (≈ MESSAGES / CONVERSATIONS per thread, ids
//! increasing with time) and the `conversations` rows themselves with a mix of
//! states (posts of the last 3 days: 15 % NEW, 20 % WAITING_ON_STAFF,
//! 25 % WAITING_ON_REQUESTER, 40 % SOLVED; older ones, as on a working desk:
//! 1 %, 1 %, 6 %, 92 %)
//!
//! Then, for each viewer through `Db::viewer` (role `observer_api`, RLS on),
//! RUNS timings of: the queue's first page (waiting longest first, 51 rows),
//! a deep page (the cursor after page 20), the first page filtered to
//! NEW + WAITING_ON_STAFF, and `supportStats` over 30 and 90 days by day.
//! A timing is the whole transaction the API pays: begin (role + viewer),
//! the read, commit. A query stops early after `BENCH_BUDGET_SECS` (default
//! 20) of runs, and says how many it did. `BENCH_KEEP_DB=1` keeps the
//! scratch database (its name is printed) for `EXPLAIN ANALYZE` by hand.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use observer_db::support::queue::{self, Filter, Order};
use observer_db::Db;
use sqlx::Connection;

const GUILD: i64 = 900_000_000_000_000_001;
const STAFF_ROLE: i64 = 900_000_000_000_000_002;
const PUBLIC_FORUM: i64 = 900_000_000_000_000_010;
const STAFF_FORUM: i64 = 900_000_000_000_000_011;
const STAFF_VIEWER: i64 = 900_000_000_000_000_101;
const CUSTOMER_VIEWER: i64 = 900_000_000_000_000_102;
const OWNER: i64 = 900_000_000_000_000_100;
/// Requesters are 20,000 customers from this id on; first responders 10 staff.
const REQUESTER_BASE: i64 = 800_000_000_000_000_000;
const RESPONDER_BASE: i64 = 700_000_000_000_000_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: i64| -> anyhow::Result<i64> {
        Ok(std::env::args()
            .nth(i)
            .map(|s| s.replace('_', "").parse())
            .transpose()?
            .unwrap_or(default))
    };
    let messages = arg(1, 10_000_000)?;
    let conversations = arg(2, 500_000)?;
    let runs = arg(3, 200)?;
    anyhow::ensure!(
        conversations > 0 && messages >= conversations && runs > 0,
        "need MESSAGES >= CONVERSATIONS > 0 and RUNS > 0"
    );
    let budget = Duration::from_secs(
        std::env::var("BENCH_BUDGET_SECS")
            .ok()
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(20),
    );
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL")?;
    let name = format!("observer_supbench_{}", std::process::id());
    let mut admin = sqlx::PgConnection::connect(&url).await?;
    sqlx::query(&format!("create database {name}"))
        .execute(&mut admin)
        .await?;
    let bench_url = match url.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => anyhow::bail!("DATABASE_URL needs a database path"),
    };
    let result = bench(&bench_url, messages, conversations, runs, budget).await;
    // BENCH_KEEP_DB=1 leaves the loaded database for EXPLAIN ANALYZE by hand.
    if std::env::var("BENCH_KEEP_DB").is_ok_and(|v| v == "1") {
        println!("kept database {name}");
    } else {
        sqlx::query(&format!("drop database if exists {name} with (force)"))
            .execute(&mut admin)
            .await?;
    }
    result
}

async fn bench(
    url: &str,
    messages: i64,
    conversations: i64,
    runs: i64,
    budget: Duration,
) -> anyhow::Result<()> {
    let db = Db::connect(url, 4).await?;
    observer_db::migrate::run(db.pool()).await?;

    println!("loading {messages} messages in {conversations} conversations…");
    let t0 = Instant::now();
    load(url, messages, conversations).await?;
    let load_time = t0.elapsed();
    println!("loaded in {:.1} s", load_time.as_secs_f64());
    // The worker's rollup rebuild, as its loop runs it (50 days a transaction).
    let t1 = Instant::now();
    let mut days = 0;
    loop {
        let mut tx = db.worker().await?;
        let n = observer_db::support::rollup::rebuild_dirty(&mut tx, 50).await?;
        tx.commit().await?;
        if n == 0 {
            break;
        }
        days += n;
    }
    println!(
        "rebuilt {days} rollup days in {:.1} s",
        t1.elapsed().as_secs_f64()
    );

    let mut results: Vec<(&str, &str, Stat)> = Vec::new();
    for (who, viewer) in [("staff", STAFF_VIEWER), ("customer", CUSTOMER_VIEWER)] {
        // What the viewer sees, through RLS.
        let mut tx = db.viewer(viewer).await?;
        let visible: i64 = sqlx::query_scalar("select count(*) from conversations")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        // The cursor after page 20 (rows 1..=1000 in the viewer's order),
        // found as the superuser from the forums the viewer may see (walking
        // 20 pages under RLS would cost 20 timed reads).
        let forums: Vec<i64> = if viewer == STAFF_VIEWER {
            vec![PUBLIC_FORUM, STAFF_FORUM]
        } else {
            vec![PUBLIC_FORUM]
        };
        let after: Option<queue::Cursor> = sqlx::query_as(
            "select waiting_since, conversation_id from conversations
             where guild_id = $1 and parent_id = any ($2)
             order by coalesce(waiting_since, 'infinity'::timestamptz), conversation_id
             offset 999 limit 1",
        )
        .bind(GUILD)
        .bind(&forums)
        .fetch_optional(db.pool())
        .await?;
        println!("{who}: sees {visible} conversations");

        let all = Filter::default();
        let waiting = Filter {
            states: vec!["NEW".into(), "WAITING_ON_STAFF".into()],
            ..Filter::default()
        };
        let s = time(&db, viewer, runs, budget, |mut tx| {
            let all = all.clone();
            async move {
                let rows =
                    queue::page(&mut tx, GUILD, &all, Order::WaitingLongest, None, 51).await?;
                tx.commit().await?;
                Ok(rows.len())
            }
        })
        .await?;
        results.push((who, "queue first page", s));
        let s = time(&db, viewer, runs, budget, |mut tx| {
            let all = all.clone();
            async move {
                let rows =
                    queue::page(&mut tx, GUILD, &all, Order::WaitingLongest, after, 51).await?;
                tx.commit().await?;
                Ok(rows.len())
            }
        })
        .await?;
        results.push((who, "queue page 21", s));
        let s = time(&db, viewer, runs, budget, |mut tx| {
            let waiting = waiting.clone();
            async move {
                let rows =
                    queue::page(&mut tx, GUILD, &waiting, Order::WaitingLongest, None, 51).await?;
                tx.commit().await?;
                Ok(rows.len())
            }
        })
        .await?;
        results.push((who, "queue NEW+WAITING_ON_STAFF", s));
        for days in [30, 90] {
            let s = time(&db, viewer, runs, budget, |mut tx| async move {
                let to = Utc::now();
                let from = to - chrono::Duration::days(days);
                let st = queue::stats(&mut tx, GUILD, from, to, "day", &[], &[]).await?;
                tx.commit().await?;
                Ok(st.series.len())
            })
            .await?;
            results.push((
                who,
                if days == 30 {
                    "supportStats 30 days"
                } else {
                    "supportStats 90 days"
                },
                s,
            ));
        }
    }

    println!();
    println!(
        "{messages} messages, {conversations} conversations; load {:.1} s",
        load_time.as_secs_f64()
    );
    println!(
        "{:<9} {:<28} {:>5} {:>6} {:>10} {:>10} {:>10}",
        "viewer", "query", "runs", "rows", "p50 ms", "p99 ms", "max ms"
    );
    for (who, what, s) in &results {
        println!(
            "{:<9} {:<28} {:>5} {:>6} {:>10.2} {:>10.2} {:>10.2}",
            who, what, s.runs, s.rows, s.p50, s.p99, s.max
        );
    }
    Ok(())
}

/// Timings of one query, in milliseconds.
struct Stat {
    runs: usize,
    rows: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

/// Runs `f` in a fresh viewer transaction `runs` times (after one untimed
/// warm-up run), or until `budget` is spent (at least one timed run).
async fn time<F, Fut>(
    db: &Db,
    viewer: i64,
    runs: i64,
    budget: Duration,
    f: F,
) -> anyhow::Result<Stat>
where
    F: Fn(observer_db::ViewerTx) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    f(db.viewer(viewer).await?).await?;
    let mut ms = Vec::new();
    let mut rows = 0;
    let start = Instant::now();
    for _ in 0..runs {
        let t = Instant::now();
        rows = f(db.viewer(viewer).await?).await?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        if start.elapsed() > budget {
            break;
        }
    }
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
    Ok(Stat {
        runs: ms.len(),
        rows,
        p50: pct(0.5),
        p99: pct(0.99),
        max: pct(1.0),
    })
}

/// Loads the guild, its threads, messages and conversations (superuser,
/// set-based). Secondary indexes of `messages` are dropped for the load and
/// rebuilt after it (the same definitions), which is faster than
/// maintaining them row by row.
async fn load(url: &str, messages: i64, conversations: i64) -> anyhow::Result<()> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    for s in [
        "set synchronous_commit = off",
        "set maintenance_work_mem = '1GB'",
        "set work_mem = '256MB'",
        // Statement triggers (access-change notifications) are not what is measured.
        "set session_replication_role = replica",
        "select setseed(0.42)",
    ] {
        sqlx::query(s).execute(&mut c).await?;
    }
    sqlx::query("insert into guilds (guild_id, name, owner_id) values ($1, 'supbench', $2)")
        .bind(GUILD)
        .bind(OWNER)
        .execute(&mut c)
        .await?;
    sqlx::query(
        "insert into roles (guild_id, role_id, name, permissions, position) values
           ($1, $1, '@everyone', 1024 | 65536, 0), ($1, $2, 'Staff', 8192, 1)",
    )
    .bind(GUILD)
    .bind(STAFF_ROLE)
    .execute(&mut c)
    .await?;
    sqlx::query(
        "insert into channels (guild_id, channel_id, kind, name) values
           ($1, $2, 15, 'help'), ($1, $3, 15, 'staff-escalations')",
    )
    .bind(GUILD)
    .bind(PUBLIC_FORUM)
    .bind(STAFF_FORUM)
    .execute(&mut c)
    .await?;
    sqlx::query(
        "insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny) values
           ($1, $2, $1, 0, 0, 1024), ($1, $2, $3, 0, 1024 | 65536, 0)",
    )
    .bind(GUILD)
    .bind(STAFF_FORUM)
    .bind(STAFF_ROLE)
    .execute(&mut c)
    .await?;
    sqlx::query(
        "insert into members (guild_id, user_id, role_ids) values ($1, $2, array[$3]::bigint[]),
           ($1, $4, '{}')",
    )
    .bind(GUILD)
    .bind(STAFF_VIEWER)
    .bind(STAFF_ROLE)
    .bind(CUSTOMER_VIEWER)
    .execute(&mut c)
    .await?;

    // Thread j (0-based): opened at a random time in [now - 90 d, now - 1 d),
    // ordered by j; id = its millisecond snowflake with j in the low 22 bits
    // (unique, and increasing with time like Discord's).
    sqlx::query(
        "create unlogged table bench_threads (j int8, opened_at timestamptz, thread_id int8,
                                             parent_id int8, requester_id int8, r float8)",
    )
    .execute(&mut c)
    .await?;
    sqlx::query(
        "insert into bench_threads
         select j, opened_at,
                ((((extract(epoch from opened_at) * 1000)::bigint - 1420070400000) << 22) | j)
                  as thread_id,
                case when j % 5 = 4 then $3::bigint else $2::bigint end as parent_id,
                $4::bigint + j % 20000 as requester_id,
                random() as r
         from (select j, now() - interval '90 days'
                         + (j + random()) * (interval '89 days' / $1::int8) as opened_at
               from generate_series(0::int8, $1::int8 - 1) j) t",
    )
    .bind(conversations)
    .bind(PUBLIC_FORUM)
    .bind(STAFF_FORUM)
    .bind(REQUESTER_BASE)
    .execute(&mut c)
    .await?;
    sqlx::query(
        "insert into channels (guild_id, channel_id, kind, name, parent_id, owner_id,
                               thread_created_at)
         select $1, thread_id, 11, 'question ' || j, parent_id, requester_id, opened_at
         from bench_threads",
    )
    .bind(GUILD)
    .execute(&mut c)
    .await?;

    // Messages: thread j gets `per` of them (the first `extra` threads one
    // more), spaced evenly over the day after its opening; the opening
    // message's id is the thread's (as for a forum post); requester and staff
    // take turns.
    let per = messages / conversations;
    let extra = messages % conversations;
    let defs: Vec<String> = sqlx::query_scalar(
        "select indexdef from pg_indexes
         where schemaname = 'public' and tablename = 'messages'
           and indexname <> 'messages_pkey'",
    )
    .fetch_all(&mut c)
    .await?;
    let names: Vec<String> = sqlx::query_scalar(
        "select indexname::text from pg_indexes
         where schemaname = 'public' and tablename = 'messages'
           and indexname <> 'messages_pkey'",
    )
    .fetch_all(&mut c)
    .await?;
    for n in &names {
        sqlx::query(&format!("drop index {n}"))
            .execute(&mut c)
            .await?;
    }
    sqlx::query(
        "insert into messages (guild_id, message_id, channel_id, author_id, author_username,
                               content, created_at, seen_create, version_at, attachments_known)
         select $1,
                ((((extract(epoch from m.at) * 1000)::bigint - 1420070400000) << 22) | t.j),
                t.thread_id,
                case when s % 2 = 0 then t.requester_id else $4::bigint + (t.j % 10) end,
                case when s % 2 = 0 then 'customer' else 'staff' end,
                '', m.at, true, m.at, true
         from bench_threads t
         cross join lateral generate_series(0, $2::int8 - 1 + (t.j < $3::int8)::int) s
         cross join lateral (select t.opened_at + s * (interval '1 day' / ($2::int8 + 1)) as at) m",
    )
    .bind(GUILD)
    .bind(per)
    .bind(extra)
    .bind(RESPONDER_BASE)
    .execute(&mut c)
    .await?;
    for d in &defs {
        sqlx::query(d).execute(&mut c).await?;
    }

    // The conversations: states by `r`; first response after an exponential
    // delay (mean 30 min); waits start at the requester's last message.
    sqlx::query(
        "insert into conversations (guild_id, conversation_id, channel_id, parent_id, requester_id,
            opened_at, state, first_response_at, first_responder_id, last_requester_at,
            last_staff_at, last_message_at, first_solved_at, last_solved_at, reopen_count,
            message_count, participant_ids, waiting_since, wait_secs_closed,
            next_response_secs, sla_target_secs, last_message_id)
         select $1, b.thread_id, b.thread_id, b.parent_id, b.requester_id, b.opened_at, b.state,
                b.fr_at, case when b.fr_at is not null then $3::bigint + b.j % 10 end,
                b.last_at, case when b.fr_at is not null then b.last_at - interval '5 minutes' end,
                b.last_at,
                case when b.state = 'SOLVED' then b.last_at + interval '1 hour' end,
                case when b.state = 'SOLVED' then b.last_at + interval '1 hour'
                                                  + b.reopens * interval '1 day' end,
                b.reopens, b.n,
                case when b.fr_at is not null then array[b.requester_id, $3::bigint + b.j % 10]
                     else array[b.requester_id] end,
                case when b.state = 'NEW' then b.opened_at
                     when b.state = 'WAITING_ON_STAFF' then b.last_at end,
                extract(epoch from coalesce(b.fr_at, b.opened_at) - b.opened_at),
                array(select -ln(1 - random()) * 900 from generate_series(1, b.nr)),
                3600,
                ((((extract(epoch from b.last_at) * 1000)::bigint - 1420070400000) << 22) | b.j)
         from (select t.*,
                      case when t.state <> 'NEW'
                           then t.opened_at + least(-ln(1 - random()) * interval '30 minutes',
                                                    interval '20 hours') end as fr_at,
                      case when t.state = 'NEW' then 0 else floor(random() * 4)::int end as nr,
                      case when t.state = 'SOLVED' and random() < 0.1 then 1 else 0 end as reopens,
                      ($2::int8 + (t.j < $4::int8)::int)::int as n,
                      t.opened_at + ($2::int8 - 1 + (t.j < $4::int8)::int)
                                    * (interval '1 day' / ($2::int8 + 1)) as last_at
               from (select bt.*,
                            -- A working desk: the last 3 days hold the open work,
                            -- older posts are mostly settled.
                            case when bt.opened_at > now() - interval '3 days' then
                                   case when bt.r < 0.15 then 'NEW'
                                        when bt.r < 0.35 then 'WAITING_ON_STAFF'
                                        when bt.r < 0.60 then 'WAITING_ON_REQUESTER'
                                        else 'SOLVED' end
                                 else
                                   case when bt.r < 0.01 then 'NEW'
                                        when bt.r < 0.02 then 'WAITING_ON_STAFF'
                                        when bt.r < 0.08 then 'WAITING_ON_REQUESTER'
                                        else 'SOLVED' end
                            end as state
                     from bench_threads bt) t) b",
    )
    .bind(GUILD)
    .bind(per)
    .bind(RESPONDER_BASE)
    .bind(extra)
    .execute(&mut c)
    .await?;
    // The trigger that marks rollup days is off during the load
    // (session_replication_role): mark every day, as the migration does.
    sqlx::query(
        "insert into conversation_rollup_dirty (guild_id, parent_id, day)
         select distinct guild_id, parent_id, (opened_at at time zone 'UTC')::date
         from conversations",
    )
    .execute(&mut c)
    .await?;
    sqlx::query("drop table bench_threads")
        .execute(&mut c)
        .await?;
    sqlx::query("analyze").execute(&mut c).await?;
    Ok(())
}
