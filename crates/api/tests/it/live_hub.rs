//! The live fan-out hub against a real PostgreSQL: access filtering, commit
//! order, gapless resume, live revocation, slow consumers, listener loss, and
//! database reads that do not grow with subscribers.
//!
//! Access data is seeded on the superuser test connection (its triggers write
//! `access_events` and notify as in production); messages and their events are
//! written as `observer_worker`, as the worker does.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use observer_api::live::gql::{format_cursor, parse_cursor};
use observer_api::live::hub::{Hub, HubConfig, LiveError, LiveEvent, Subscription};
use observer_api::live::metrics::LiveMetrics;
use observer_db::events::{Cursor, Scope};
use observer_db::{migrate, Db};
use sqlx::PgPool;

const VIEW: i64 = 1 << 10;
const HISTORY: i64 = 1 << 16;

/// Guild 1: @everyone VIEW+HISTORY; channel 101 open, 102 staff-only (role
/// 500), 103 visible without history. Guild 2: channel 201 open.
/// Users: 11 plain member of 1, 12 staff in 1, 13 member of 2 only, 14 member
/// of both, 15 a member of nothing.
async fn seed(pool: &PgPool) {
    sqlx::raw_sql(&format!(
        "insert into guilds (guild_id, name, owner_id) values (1, 'one', 900), (2, 'two', 900);
         insert into roles (guild_id, role_id, permissions) values
             (1, 1, {everyone}), (1, 500, 0), (2, 2, {everyone});
         insert into channels (guild_id, channel_id, kind, name) values
             (1, 101, 0, 'open'), (1, 102, 0, 'staff'), (1, 103, 0, 'no-history'), (2, 201, 0, 'two-open');
         insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny) values
             (1, 102, 1, 0, 0, {VIEW}), (1, 102, 500, 0, {VIEW}, 0),
             (1, 103, 1, 0, 0, {HISTORY});
         insert into members (guild_id, user_id, role_ids) values
             (1, 11, '{{}}'), (1, 12, '{{500}}'), (2, 13, '{{}}'), (1, 14, '{{}}'), (2, 14, '{{}}');",
        everyone = VIEW | HISTORY
    ))
    .execute(pool)
    .await
    .unwrap();
}

async fn setup(pool: &PgPool, cfg: HubConfig) -> (Db, Hub) {
    migrate::apply_policies(pool).await.unwrap();
    seed(pool).await;
    let db = Db::new(pool.clone());
    let hub = Hub::start(db.clone(), cfg, LiveMetrics::default());
    (db, hub)
}

/// How long an access change may take to apply in tests (the hub's usual
/// latency is a notification round trip; this is slack for a loaded CI).
const REVOKE_DEADLINE: Duration = Duration::from_secs(10);

fn quick() -> HubConfig {
    HubConfig {
        ready_timeout: Duration::from_secs(20),
        ..HubConfig::default()
    }
}

/// Channel → guild in the seed.
fn guild_of(channel: i64) -> i64 {
    channel / 100
}

/// Writes messages (and their `created` events) in one worker transaction.
async fn post(db: &Db, msgs: &[(i64, i64)]) {
    let mut tx = db.worker().await.unwrap();
    for (channel, id) in msgs {
        insert_message(&mut tx, *channel, *id).await;
    }
    tx.commit().await.unwrap();
}

async fn insert_message(tx: &mut observer_db::WorkerTx, channel: i64, id: i64) {
    sqlx::query(
        "insert into messages (guild_id, message_id, channel_id, author_id, author_username, \
           content, created_at, seen_create) values ($1, $2, $3, 7, 'author', $4, now(), true)",
    )
    .bind(guild_of(channel))
    .bind(id)
    .bind(channel)
    .bind(format!("message {id}"))
    .execute(&mut **tx)
    .await
    .unwrap();
    sqlx::query(
        "insert into message_events (guild_id, kind, channel_id, message_id) values ($1, 1, $2, $3)",
    )
    .bind(guild_of(channel))
    .bind(channel)
    .bind(id)
    .execute(&mut **tx)
    .await
    .unwrap();
}

/// The newest event in the log.
async fn last_cursor(pool: &PgPool) -> Cursor {
    let (xid, seq): (i64, i64) = sqlx::query_as(
        "select xid::text::bigint, seq from message_events order by xid desc, seq desc limit 1",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    Cursor::new(xid, seq)
}

/// Waits until the hub has read (and so handed out) every event in the log.
async fn settle(pool: &PgPool, hub: &Hub) {
    let last = last_cursor(pool).await;
    observer_testkit::wait::until("the hub to read the log", Duration::from_secs(30), || {
        hub.cursor().is_some_and(|c| c >= last)
    })
    .await;
}

/// Everything already buffered for `sub`, without waiting for more.
async fn drain(sub: &mut Subscription) -> Vec<Arc<LiveEvent>> {
    let mut out = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(30), sub.next()).await {
        out.push(item.unwrap());
    }
    out
}

fn ids(evs: &[Arc<LiveEvent>]) -> Vec<i64> {
    evs.iter().map(|e| e.row.message.message_id).collect()
}

fn assert_ordered(evs: &[Arc<LiveEvent>]) {
    for w in evs.windows(2) {
        assert!(w[0].cursor() < w[1].cursor(), "events out of order");
    }
}

async fn next_event(sub: &mut Subscription) -> Arc<LiveEvent> {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("no event within 10 s")
        .expect("subscription ended")
        .expect("subscription failed")
}

fn all() -> Scope {
    Scope::default()
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn viewers_receive_exactly_what_they_may_see(pool: PgPool) {
    let (db, hub) = setup(&pool, quick()).await;
    let mut plain = hub.subscribe(11, all(), None).await.unwrap();
    let mut staff = hub.subscribe(12, all(), None).await.unwrap();
    let mut other_guild = hub.subscribe(13, all(), None).await.unwrap();
    let mut both = hub.subscribe(14, all(), None).await.unwrap();
    let mut nobody = hub.subscribe(15, all(), None).await.unwrap();
    let mut staff_one_channel = hub
        .subscribe(
            12,
            Scope {
                guild_id: None,
                channel_ids: Some(vec![102]),
            },
            None,
        )
        .await
        .unwrap();
    let mut both_guild_two = hub
        .subscribe(
            14,
            Scope {
                guild_id: Some(2),
                channel_ids: None,
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(hub.subscriber_count(), 7);

    post(&db, &[(101, 1), (102, 2), (103, 3)]).await;
    post(&db, &[(201, 4)]).await;
    post(&db, &[(102, 5), (101, 6)]).await;
    settle(&pool, &hub).await;

    let got = drain(&mut plain).await;
    assert_ordered(&got);
    assert_eq!(
        ids(&got),
        [1, 3, 6],
        "live needs VIEW only (103 has no history)"
    );
    assert_eq!(ids(&drain(&mut staff).await), [1, 2, 3, 5, 6]);
    assert_eq!(ids(&drain(&mut other_guild).await), [4]);
    assert_eq!(ids(&drain(&mut both).await), [1, 3, 4, 6]);
    assert!(drain(&mut nobody).await.is_empty());
    assert_eq!(ids(&drain(&mut staff_one_channel).await), [2, 5]);
    assert_eq!(ids(&drain(&mut both_guild_two).await), [4]);

    // A scope with nothing visible is refused outright.
    let refused = hub
        .subscribe(
            11,
            Scope {
                guild_id: None,
                channel_ids: Some(vec![102]),
            },
            None,
        )
        .await;
    assert_eq!(refused.err(), Some(LiveError::Forbidden));
    let refused = hub
        .subscribe(
            13,
            Scope {
                guild_id: Some(1),
                channel_ids: None,
            },
            None,
        )
        .await;
    assert_eq!(refused.err(), Some(LiveError::Forbidden));

    let m = hub.metrics();
    assert_eq!(m.deliveries.get(), 3 + 5 + 1 + 4 + 2 + 1);
    drop((plain, staff));
    assert_eq!(hub.subscriber_count(), 5);
    hub.shutdown();
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn out_of_order_commits_arrive_in_log_order_without_gap(pool: PgPool) {
    let (db, hub) = setup(&pool, quick()).await;
    let mut sub = hub.subscribe(11, all(), None).await.unwrap();

    // A takes its xid and seq first but commits last.
    let mut a = db.worker().await.unwrap();
    insert_message(&mut a, 101, 1).await;
    post(&db, &[(101, 2)]).await;
    // B is committed but not readable while A (an older xid) is running:
    // handing it out now would let a resuming client skip A forever.
    let early = tokio::time::timeout(Duration::from_millis(400), sub.next()).await;
    assert!(early.is_err(), "an event passed an older open transaction");
    a.commit().await.unwrap();

    let first = next_event(&mut sub).await;
    let second = next_event(&mut sub).await;
    assert_eq!(
        (first.row.message.message_id, second.row.message.message_id),
        (1, 2)
    );
    assert!(first.cursor() < second.cursor());
    assert!(first.row.cursor.seq < second.row.cursor.seq);
    hub.shutdown();
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn resume_replays_missed_visible_events_then_live_without_duplicates(pool: PgPool) {
    let (db, hub) = setup(&pool, quick()).await;
    let mut sub = hub.subscribe(11, all(), None).await.unwrap();
    post(&db, &[(101, 1)]).await;
    let seen = next_event(&mut sub).await;
    assert_eq!(seen.row.message.message_id, 1);
    // Through the client form, as a client resumes.
    let resume_at = parse_cursor(&format_cursor(seen.cursor())).unwrap();
    drop(sub);

    // Missed while disconnected: 2 and 5 are readable history; 3 is in a
    // channel without READ_MESSAGE_HISTORY (live only), 4 is hidden.
    post(&db, &[(101, 2), (103, 3)]).await;
    post(&db, &[(102, 4), (101, 5)]).await;
    settle(&pool, &hub).await;

    // Events keep arriving while the subscription switches from replay to live.
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            for id in 100..140 {
                post(&db, &[(101, id)]).await;
            }
        })
    };
    let mut sub = hub.subscribe(11, all(), Some(resume_at)).await.unwrap();
    let mut got = Vec::new();
    while got
        .last()
        .map(|e: &Arc<LiveEvent>| e.row.message.message_id)
        != Some(139)
    {
        got.push(next_event(&mut sub).await);
    }
    writer.await.unwrap();
    assert_ordered(&got);
    let mut expected = vec![2, 5];
    expected.extend(100..140);
    assert_eq!(ids(&got), expected);

    // Resuming from the head of the log replays nothing and stays live.
    let head = got.last().unwrap().cursor();
    let mut tail = hub.subscribe(11, all(), Some(head)).await.unwrap();
    post(&db, &[(101, 200)]).await;
    assert_eq!(next_event(&mut tail).await.row.message.message_id, 200);
    assert_eq!(next_event(&mut sub).await.row.message.message_id, 200);
    hub.shutdown();
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn revocation_stops_delivery_promptly_and_regrant_resumes(pool: PgPool) {
    let (db, hub) = setup(&pool, quick()).await;
    let mut staff = hub.subscribe(12, all(), None).await.unwrap();
    let mut staff_channel = hub
        .subscribe(
            12,
            Scope {
                guild_id: None,
                channel_ids: Some(vec![102]),
            },
            None,
        )
        .await
        .unwrap();
    let mut plain = hub.subscribe(11, all(), None).await.unwrap();
    post(&db, &[(102, 1)]).await;
    assert_eq!(next_event(&mut staff).await.row.message.message_id, 1);
    assert_eq!(
        next_event(&mut staff_channel).await.row.message.message_id,
        1
    );

    // Remove the staff role: 102 disappears, and the subscription scoped to
    // it ends with FORBIDDEN.
    sqlx::query("update members set role_ids = '{}' where guild_id = 1 and user_id = 12")
        .execute(&pool)
        .await
        .unwrap();
    // Generous deadlines: a loaded 2-core CI must not flake; the latency is
    // printed (typically well under a second).
    let took = observer_testkit::wait::until("role removal to apply", REVOKE_DEADLINE, || {
        hub.viewer_sees(12, 1, 102) == Some(false)
    })
    .await;
    println!("role removal applied in {took:?}");
    let ended = tokio::time::timeout(REVOKE_DEADLINE, staff_channel.next())
        .await
        .unwrap();
    assert!(
        matches!(ended, Some(Err(LiveError::Forbidden))),
        "{ended:?}"
    );
    post(&db, &[(102, 2), (101, 3)]).await;
    settle(&pool, &hub).await;
    assert_eq!(ids(&drain(&mut staff).await), [3]);

    // Re-grant: events from 102 resume.
    sqlx::query("update members set role_ids = '{500}' where guild_id = 1 and user_id = 12")
        .execute(&pool)
        .await
        .unwrap();
    observer_testkit::wait::until("re-grant to apply", REVOKE_DEADLINE, || {
        hub.viewer_sees(12, 1, 102) == Some(true)
    })
    .await;
    post(&db, &[(102, 4)]).await;
    assert_eq!(next_event(&mut staff).await.row.message.message_id, 4);

    // A member overwrite denying VIEW in 101 (user-specific change).
    sqlx::query(&format!(
        "insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny) \
         values (1, 101, 11, 1, 0, {VIEW})"
    ))
    .execute(&pool)
    .await
    .unwrap();
    observer_testkit::wait::until("deny overwrite to apply", REVOKE_DEADLINE, || {
        hub.viewer_sees(11, 1, 101) == Some(false)
    })
    .await;
    post(&db, &[(101, 5), (103, 6)]).await;
    settle(&pool, &hub).await;
    assert_eq!(ids(&drain(&mut plain).await), [3, 6]);
    assert_eq!(ids(&drain(&mut staff).await), [5, 6]);

    // A role permission edit (guild-wide change): @everyone loses VIEW.
    let mut guild_one = hub
        .subscribe(
            14,
            Scope {
                guild_id: Some(1),
                channel_ids: None,
            },
            None,
        )
        .await
        .unwrap();
    sqlx::query("update roles set permissions = 0 where guild_id = 1 and role_id = 1")
        .execute(&pool)
        .await
        .unwrap();
    let ended = tokio::time::timeout(REVOKE_DEADLINE, guild_one.next())
        .await
        .unwrap();
    assert!(
        matches!(ended, Some(Err(LiveError::Forbidden))),
        "{ended:?}"
    );

    // Removing the member: nothing of guild 1 for the staff member any more.
    sqlx::query("delete from members where guild_id = 1 and user_id = 12")
        .execute(&pool)
        .await
        .unwrap();
    observer_testkit::wait::until("member removal to apply", REVOKE_DEADLINE, || {
        hub.viewer_sees(12, 1, 102) == Some(false)
    })
    .await;
    post(&db, &[(102, 7)]).await;
    settle(&pool, &hub).await;
    assert!(drain(&mut staff).await.is_empty());
    assert!(hub.metrics().forbidden.get() >= 2);
    hub.shutdown();
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn a_slow_subscriber_is_ended_with_a_resume_cursor_and_never_slows_others(pool: PgPool) {
    let cfg = HubConfig {
        buffer: 8,
        ..quick()
    };
    let (db, hub) = setup(&pool, cfg).await;
    let mut slow = hub.subscribe(11, all(), None).await.unwrap();
    let mut fast = hub.subscribe(12, all(), None).await.unwrap();
    for id in 1..=20 {
        post(&db, &[(101, id)]).await;
        assert_eq!(next_event(&mut fast).await.row.message.message_id, id);
    }
    // The slow one gets what fitted in its buffer, then the resume error.
    let mut got = Vec::new();
    let resume_from = loop {
        match tokio::time::timeout(Duration::from_secs(5), slow.next())
            .await
            .unwrap()
        {
            Some(Ok(ev)) => got.push(ev),
            Some(Err(LiveError::SlowConsumer { resume_from })) => break resume_from,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(ids(&got), (1..=8).collect::<Vec<_>>());
    assert_eq!(resume_from, got.last().unwrap().cursor());
    assert!(slow.next().await.is_none());
    assert_eq!(hub.metrics().slow_consumers.get(), 1);

    // Resuming from the cursor it was given loses nothing.
    let mut resumed = hub.subscribe(11, all(), Some(resume_from)).await.unwrap();
    let mut rest = Vec::new();
    while rest.len() < 12 {
        rest.push(next_event(&mut resumed).await);
    }
    assert_eq!(ids(&rest), (9..=20).collect::<Vec<_>>());
    hub.shutdown();
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn a_killed_listener_reconnects_and_nothing_is_lost(pool: PgPool) {
    // A slow safety-net tick: the reconnect's catch-up is what finds what was
    // written while nobody listened. (The tick stays, because another test's
    // open transaction anywhere in the cluster can hold the watermark back
    // past a notification.)
    let cfg = HubConfig {
        tick: Duration::from_secs(1),
        ..quick()
    };
    let (db, hub) = setup(&pool, cfg).await;
    let mut sub = hub.subscribe(11, all(), None).await.unwrap();
    post(&db, &[(101, 1)]).await;
    assert_eq!(next_event(&mut sub).await.row.message.message_id, 1);

    for round in 0..2 {
        let pid = hub.listener_pid();
        assert_ne!(pid, 0);
        let killed: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(killed);
        let base = 10 * (round + 1);
        for id in base..base + 5 {
            post(&db, &[(101, id)]).await;
        }
        let mut got = Vec::new();
        while got.len() < 5 {
            got.push(next_event(&mut sub).await.row.message.message_id);
        }
        assert_eq!(got, (base..base + 5).collect::<Vec<_>>());
        observer_testkit::wait::until("the listener to reconnect", Duration::from_secs(10), || {
            hub.listener_pid() != 0 && hub.listener_pid() != pid
        })
        .await;
    }
    assert!(hub.metrics().listener_reconnects.get() >= 2);

    // Every other connection of this database dropped at once (what a
    // server restart does to the API's pool and listener alike).
    let pid = hub.listener_pid();
    sqlx::query(
        "select pg_terminate_backend(pid) from pg_stat_activity \
         where datname = current_database() and pid <> pg_backend_pid()",
    )
    .execute(&pool)
    .await
    .unwrap();
    for id in 100..105 {
        post(&db, &[(101, id)]).await;
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        got.push(next_event(&mut sub).await.row.message.message_id);
    }
    assert_eq!(got, (100..105).collect::<Vec<_>>());
    observer_testkit::wait::until("the listener to reconnect", Duration::from_secs(10), || {
        hub.listener_pid() != 0 && hub.listener_pid() != pid
    })
    .await;
    hub.shutdown();
}

/// Event-log reads made for notifications (the safety-net tick's excluded)
/// while `subs` subscriptions spread over `viewers` viewers of different
/// roles receive 20 messages, one notification each; and the deliveries.
async fn reads_for(pool: &PgPool, db: &Db, subs: usize, viewers: i64, base: i64) -> (u64, u64) {
    let cfg = HubConfig {
        tick: Duration::from_secs(1),
        buffer: 64,
        ..quick()
    };
    let hub = Hub::start(db.clone(), cfg, LiveMetrics::default());
    let mut held = Vec::with_capacity(subs);
    for i in 0..subs {
        let viewer = 1000 + (i as i64 % viewers);
        held.push(hub.subscribe(viewer, all(), None).await.unwrap());
    }
    // Only event-log reads a notification caused are counted: access
    // refreshes of newly registered viewers and tick rounds (time-driven) are
    // not, so the count cannot depend on when the hub goes idle.
    let reads_before = hub.metrics().notified_event_reads.get();
    let messages: i64 = 20;
    for id in base..base + messages {
        post(db, &[(101 + (id % 2), id)]).await;
        // One notification at a time, so every message costs its own round.
        let last = last_cursor(pool).await;
        observer_testkit::wait::until("delivery", Duration::from_secs(30), || {
            hub.cursor().is_some_and(|c| c >= last)
        })
        .await;
    }
    let reads = hub.metrics().notified_event_reads.get() - reads_before;
    let deliveries = hub.metrics().deliveries.get();
    hub.shutdown();
    drop(held);
    (reads, deliveries)
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn database_reads_do_not_grow_with_subscribers(pool: PgPool) {
    migrate::apply_policies(&pool).await.unwrap();
    seed(&pool).await;
    // 100 viewers in guild 1 with different roles: half staff (see 101 and
    // 102), half plain (101 only).
    let mut sql = String::new();
    for v in 1000..1100 {
        let roles = if v % 2 == 0 { "{500}" } else { "{}" };
        sql.push_str(&format!(
            "insert into members (guild_id, user_id, role_ids) values (1, {v}, '{roles}');"
        ));
    }
    sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
    let db = Db::new(pool.clone());

    let (reads_10, deliveries_10) = reads_for(&pool, &db, 10, 10, 1).await;
    let (reads_1000, deliveries_1000) = reads_for(&pool, &db, 1000, 100, 1001).await;
    println!(
        "event-log reads for 20 notifications: {reads_10} at 10 subscribers, {reads_1000} at 1000"
    );
    // Every subscriber saw 101's messages; staff also 102's.
    assert_eq!(deliveries_10, 5 * 20 + 5 * 10);
    assert_eq!(deliveries_1000, 500 * 20 + 500 * 10);
    // At most one read per notification (a tick may take some over, and a
    // listener reconnect adds one), whatever the subscriber count: 100x the
    // subscribers, not 100x the reads.
    assert!(reads_10 <= 20 + 2, "{reads_10} reads for 20 messages");
    assert!(
        reads_1000 <= 20 + 2,
        "reads grew with subscribers: {reads_10} at 10, {reads_1000} at 1000"
    );
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn invisible_history_is_not_replayed_and_cursors_are_validated(pool: PgPool) {
    let (db, hub) = setup(&pool, quick()).await;
    let mut live = hub.subscribe(11, all(), None).await.unwrap();
    let start = hub.cursor().unwrap();
    post(&db, &[(103, 1), (102, 2), (101, 3)]).await;
    settle(&pool, &hub).await;
    assert_eq!(ids(&drain(&mut live).await), [1, 3]);
    // Replay is history: READ_MESSAGE_HISTORY is needed, so 103 is skipped.
    let mut resumed = hub.subscribe(11, all(), Some(start)).await.unwrap();
    assert_eq!(next_event(&mut resumed).await.row.message.message_id, 3);
    let set: BTreeSet<i64> = ids(&drain(&mut resumed).await).into_iter().collect();
    assert!(set.is_empty());
    assert!(parse_cursor("12.x").is_none());
    hub.shutdown();
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn an_expiring_timeout_widens_access_without_an_access_event(pool: PgPool) {
    let (db, hub) = setup(&pool, quick()).await;
    // 104: a private thread of 101. User 16 manages threads (so sees it
    // without membership) but is timed out, which suspends MANAGE_THREADS.
    const MANAGE_THREADS: i64 = 1 << 34;
    sqlx::raw_sql(&format!(
        "insert into roles (guild_id, role_id, permissions) values (1, 600, {MANAGE_THREADS});
         insert into channels (guild_id, channel_id, kind, name, parent_id) values (1, 104, 12, 'private', 101);
         insert into members (guild_id, user_id, role_ids, communication_disabled_until)
             values (1, 16, '{{600}}', now() + interval '1500 milliseconds');"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let mut sub = hub.subscribe(16, all(), None).await.unwrap();
    assert_eq!(hub.viewer_sees(16, 1, 104), Some(false));
    assert_eq!(hub.viewer_sees(16, 1, 101), Some(true));
    // The end of a timeout writes nothing; the hub recomputes at the time it knows.
    let start = Instant::now();
    while hub.viewer_sees(16, 1, 104) != Some(true) {
        let m = hub.metrics();
        assert!(
            start.elapsed() < REVOKE_DEADLINE,
            "timed out waiting for the timeout to expire: sees 104 {:?}, 101 {:?}; reads {}, tick reads {}, read errors {}, refreshes {}",
            hub.viewer_sees(16, 1, 104),
            hub.viewer_sees(16, 1, 101),
            m.reads.get(),
            m.tick_reads.get(),
            m.read_errors.get(),
            m.access_refreshes.get(),
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    post(&db, &[(104, 1)]).await;
    assert_eq!(next_event(&mut sub).await.row.message.message_id, 1);
    hub.shutdown();
}

/// Records an edit of message `id`: its first version kept as a revision, the
/// new content, and an `updated` event (as the worker does).
async fn edit(db: &Db, channel: i64, id: i64) {
    let mut tx = db.worker().await.unwrap();
    sqlx::query(
        "insert into message_revisions (guild_id, message_id, version_at, content) \
         select guild_id, message_id, created_at, content from messages \
         where guild_id = $1 and message_id = $2",
    )
    .bind(guild_of(channel))
    .bind(id)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "update messages set content = 'edited', edited_at = now() + interval '1 second' \
         where guild_id = $1 and message_id = $2",
    )
    .bind(guild_of(channel))
    .bind(id)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "insert into message_events (guild_id, kind, channel_id, message_id) values ($1, 2, $2, $3)",
    )
    .bind(guild_of(channel))
    .bind(channel)
    .bind(id)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn prior_versions_go_live_only_to_viewers_with_history(pool: PgPool) {
    let (db, hub) = setup(&pool, quick()).await;
    post(&db, &[(101, 1), (103, 2)]).await;
    settle(&pool, &hub).await;
    // User 11 sees 101 with history and 103 without (VIEW but not
    // READ_MESSAGE_HISTORY); two subscriptions share one viewer state.
    let mut sub = hub.subscribe(11, all(), None).await.unwrap();
    let mut other = hub.subscribe(11, all(), None).await.unwrap();
    edit(&db, 101, 1).await;
    edit(&db, 103, 2).await;
    for s in [&mut sub, &mut other] {
        let with = next_event(s).await;
        assert_eq!(with.row.message.message_id, 1);
        assert_eq!(with.row.message.content, "edited");
        assert_eq!(with.revisions.len(), 1, "history: prior version included");
        assert_eq!(with.revisions[0].content, "message 1");
        let without = next_event(s).await;
        assert_eq!(without.row.message.message_id, 2);
        assert_eq!(
            without.row.message.content, "edited",
            "the live event itself is delivered"
        );
        assert!(
            without.revisions.is_empty(),
            "prior versions are history: none without READ_MESSAGE_HISTORY"
        );
    }
    hub.shutdown();
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn a_failed_access_refresh_is_retried_until_the_revocation_applies(pool: PgPool) {
    let (db, hub) = setup(&pool, quick()).await;
    let mut staff = hub.subscribe(12, all(), None).await.unwrap();
    assert_eq!(hub.viewer_sees(12, 1, 102), Some(true));
    // The refresh's member read fails (privilege withdrawn in this test
    // database only), while the access log itself stays readable.
    sqlx::query("revoke select on members from observer_fanout")
        .execute(&pool)
        .await
        .unwrap();
    let errors_before = hub.metrics().read_errors.get();
    sqlx::query("update members set role_ids = '{}' where guild_id = 1 and user_id = 12")
        .execute(&pool)
        .await
        .unwrap();
    observer_testkit::wait::until("a failed refresh", REVOKE_DEADLINE, || {
        hub.metrics().read_errors.get() > errors_before
    })
    .await;
    assert_eq!(
        hub.viewer_sees(12, 1, 102),
        Some(true),
        "nothing applied yet"
    );
    sqlx::query("grant select on members to observer_fanout")
        .execute(&pool)
        .await
        .unwrap();
    let took =
        observer_testkit::wait::until("the revocation after recovery", REVOKE_DEADLINE, || {
            hub.viewer_sees(12, 1, 102) == Some(false)
        })
        .await;
    println!("revocation applied {took:?} after the database recovered");
    post(&db, &[(102, 1), (101, 2)]).await;
    settle(&pool, &hub).await;
    assert_eq!(ids(&drain(&mut staff).await), [2]);
    hub.shutdown();
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn voice_chat_goes_live_only_to_viewers_who_may_connect(pool: PgPool) {
    const CONNECT: i64 = 1 << 20;
    let (db, hub) = setup(&pool, quick()).await;
    let mut plain = hub.subscribe(11, all(), None).await.unwrap();
    let mut staff = hub.subscribe(12, all(), None).await.unwrap();
    // Voice channel 104: everyone in guild 1 sees it (VIEW from @everyone), but
    // its text chat needs CONNECT, which only role 500 is allowed there.
    sqlx::raw_sql(&format!(
        "insert into channels (guild_id, channel_id, kind, name) values (1, 104, 2, 'voice');
         insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny)
         values (1, 104, 500, 0, {CONNECT}, 0);"
    ))
    .execute(&pool)
    .await
    .unwrap();
    observer_testkit::wait::until("the voice channel to be known", REVOKE_DEADLINE, || {
        hub.viewer_sees(12, 1, 104) == Some(true)
    })
    .await;
    assert_eq!(hub.viewer_sees(11, 1, 104), Some(false));
    // A subscription scoped to a chat one may not read is refused like a hidden channel.
    let refused = hub
        .subscribe(
            11,
            Scope {
                guild_id: None,
                channel_ids: Some(vec![104]),
            },
            None,
        )
        .await;
    assert_eq!(refused.err(), Some(LiveError::Forbidden));

    post(&db, &[(104, 1), (101, 2)]).await;
    settle(&pool, &hub).await;
    assert_eq!(ids(&drain(&mut plain).await), [2]);
    assert_eq!(ids(&drain(&mut staff).await), [1, 2]);

    // A timeout takes CONNECT away: the staff member's voice chat stops too.
    sqlx::query(
        "update members set communication_disabled_until = now() + interval '1 hour'
         where guild_id = 1 and user_id = 12",
    )
    .execute(&pool)
    .await
    .unwrap();
    observer_testkit::wait::until("the timeout to apply", REVOKE_DEADLINE, || {
        hub.viewer_sees(12, 1, 104) == Some(false)
    })
    .await;
    post(&db, &[(104, 3), (101, 4)]).await;
    settle(&pool, &hub).await;
    assert_eq!(ids(&drain(&mut staff).await), [4]);
    assert_eq!(ids(&drain(&mut plain).await), [4]);
    hub.shutdown();
}
