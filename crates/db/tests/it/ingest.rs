//! Ingest convergence: random message streams, duplicated and shuffled, written
//! in random batch splits as `observer_worker`, must converge to the state of
//! the stream applied once in order, with no events for repeats.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, TimeZone, Utc};
use observer_db::ingest::{
    self, snowflake_at, snowflake_time, Author, ChannelInfo, GuildInfo, GuildSnapshot, IngestOp,
    MemberInfo, MessagePatch, NewMessage, Overwrite, RoleInfo,
};
use observer_db::Db;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use sqlx::PgPool;

fn t(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// What the stream says the final state of one message is (independent oracle).
#[derive(Debug, Default, Clone)]
struct Expect {
    created: bool,
    content: String,
    edited_at: Option<DateTime<Utc>>,
    deleted: bool,
    revisions: BTreeSet<(DateTime<Utc>, String)>,
}

struct Stream {
    ops: Vec<IngestOp>,
    expect: BTreeMap<i64, Expect>,
    /// Distinct ops per message (upper bound on events).
    ops_per_message: BTreeMap<i64, usize>,
}

fn author(id: i64) -> Author {
    Author {
        id,
        username: format!("user{id}"),
        display_name: Some(format!("User {id}")),
        avatar: None,
        bot: false,
    }
}

/// A causal stream for `n` messages in guild `g`: create, edits with increasing
/// times (full or partial), maybe a delete; some messages only ever deleted.
fn gen_stream(rng: &mut ChaCha8Rng, g: i64, n: usize) -> Stream {
    let base = 1_750_000_000_000i64 + rng.gen_range(0..1_000_000);
    let mut ops = Vec::new();
    let mut expect = BTreeMap::new();
    let mut per = BTreeMap::new();
    for i in 0..n {
        let created = t(base + (i as i64) * 1000);
        let id = snowflake_at(created) | (i as i64 & 0xfff);
        let channel = 100 + (i as i64 % 3);
        let mut e = Expect::default();
        let mut count = 0;
        if rng.gen_bool(0.1) {
            // Deleted before we could ever see it: only the delete arrives.
            ops.push(IngestOp::MessageDelete {
                guild_id: g,
                channel_id: channel,
                message_id: id,
            });
            e.deleted = true;
            expect.insert(id, e);
            per.insert(id, 1);
            continue;
        }
        let content = format!("m{i} v0 \u{7}");
        ops.push(IngestOp::MessageCreate(Box::new(NewMessage {
            guild_id: g,
            channel_id: channel,
            message_id: id,
            author: author(7 + i as i64 % 4),
            content: content.clone(),
            created_at: snowflake_time(id),
            edited_at: None,
            attachments: json!([{"id": "1", "filename": "a.png", "url": "https://x/a.png", "size": 3}]),
            reply_to_id: None,
        })));
        count += 1;
        e.created = true;
        e.content = format!("m{i} v0 ");
        e.revisions.insert((snowflake_time(id), e.content.clone()));
        for k in 1..=rng.gen_range(0..4) {
            let at = created + Duration::milliseconds(k * 100 + rng.gen_range(0..50));
            let c = format!("m{i} v{k}");
            let partial = rng.gen_bool(0.5);
            ops.push(IngestOp::MessageUpdate(Box::new(MessagePatch {
                guild_id: g,
                channel_id: channel,
                message_id: id,
                author: (!partial).then(|| author(7 + i as i64 % 4)),
                content: Some(c.clone()),
                edited_at: Some(at),
                attachments: None,
            })));
            count += 1;
            e.content = c.clone();
            e.edited_at = Some(at);
            e.revisions.insert((at, c));
        }
        if rng.gen_bool(0.3) {
            if rng.gen_bool(0.5) {
                ops.push(IngestOp::MessageDelete {
                    guild_id: g,
                    channel_id: channel,
                    message_id: id,
                });
            } else {
                ops.push(IngestOp::MessageBulkDelete {
                    guild_id: g,
                    channel_id: channel,
                    message_ids: vec![id],
                });
            }
            count += 1;
            e.deleted = true;
        }
        expect.insert(id, e);
        per.insert(id, count);
    }
    Stream {
        ops,
        expect,
        ops_per_message: per,
    }
}

fn retarget(op: &IngestOp, g: i64) -> IngestOp {
    let mut op = op.clone();
    match &mut op {
        IngestOp::MessageCreate(m) => m.guild_id = g,
        IngestOp::MessageUpdate(p) => p.guild_id = g,
        IngestOp::MessageDelete { guild_id, .. } | IngestOp::MessageBulkDelete { guild_id, .. } => {
            *guild_id = g
        }
        _ => {}
    }
    op
}

/// The worker's own path: its session, where a batch of creates only is one
/// autocommit statement and replayed creates are merged afterwards.
async fn write_on(
    session: &mut observer_db::WorkerConn,
    ops: &[IngestOp],
) -> anyhow::Result<ingest::BatchStats> {
    Ok(ingest::write_batch_on(session, ops).await?)
}

async fn write(db: &Db, ops: &[IngestOp]) -> anyhow::Result<ingest::BatchStats> {
    let mut tx = db.worker().await?;
    let stats = ingest::write_batch(&mut tx, ops).await?;
    tx.commit().await?;
    Ok(stats)
}

type Row = (
    i64,
    i64,
    Option<i64>,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    bool,
    bool,
    serde_json::Value,
);

async fn rows(pool: &PgPool, g: i64) -> anyhow::Result<BTreeMap<i64, Row>> {
    let rows: Vec<Row> = sqlx::query_as(
        "select message_id, channel_id, author_id, content, created_at, edited_at,
                deleted_at is not null, seen_create, attachments
         from messages where guild_id = $1 order by message_id",
    )
    .bind(g)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.0, r)).collect())
}

async fn revisions(
    pool: &PgPool,
    g: i64,
) -> anyhow::Result<BTreeMap<i64, BTreeSet<(DateTime<Utc>, String)>>> {
    let rows: Vec<(i64, DateTime<Utc>, String)> = sqlx::query_as(
        "select message_id, version_at, content from message_revisions where guild_id = $1",
    )
    .bind(g)
    .fetch_all(pool)
    .await?;
    let mut out: BTreeMap<i64, BTreeSet<_>> = BTreeMap::new();
    for (m, at, c) in rows {
        out.entry(m).or_default().insert((at, c));
    }
    Ok(out)
}

async fn events(pool: &PgPool, g: i64) -> anyhow::Result<BTreeMap<i64, Vec<i16>>> {
    let rows: Vec<(i64, i16)> = sqlx::query_as(
        "select message_id, kind from message_events where guild_id = $1 order by xid::text::bigint, seq",
    )
    .bind(g)
    .fetch_all(pool)
    .await?;
    let mut out: BTreeMap<i64, Vec<i16>> = BTreeMap::new();
    for (m, k) in rows {
        out.entry(m).or_default().push(k);
    }
    Ok(out)
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn random_streams_converge(pool: PgPool) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    for seed in 0..12u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let chaos_g = 1000 + seed as i64 * 2;
        let order_g = chaos_g + 1;
        let stream = gen_stream(&mut rng, chaos_g, 40);

        // Reference: the stream once, in order, one op per transaction.
        for op in &stream.ops {
            write(&db, &[retarget(op, order_g)]).await?;
        }

        // Chaos: every op 1-3 times, shuffled, split into random batches,
        // written in turn by a transaction and by the worker's session.
        let mut session = db.worker_conn().await?;
        let mut chaos: Vec<IngestOp> = Vec::new();
        for op in &stream.ops {
            for _ in 0..rng.gen_range(1..=3) {
                chaos.push(op.clone());
            }
        }
        chaos.shuffle(&mut rng);
        let mut rest = &chaos[..];
        let mut turn = 0;
        while !rest.is_empty() {
            // Creates-only batches (the session's one-statement path) are
            // rare in a shuffled stream: make some.
            let n = match rest
                .iter()
                .position(|op| !matches!(op, IngestOp::MessageCreate(_)))
            {
                Some(k) if k > 0 && turn % 3 == 0 => k.min(25),
                _ => rng.gen_range(1..=rest.len().min(25)),
            };
            if turn % 2 == 0 {
                write_on(&mut session, &rest[..n]).await?;
            } else {
                write(&db, &rest[..n]).await?;
            }
            turn += 1;
            rest = &rest[n..];
        }

        let got = rows(&pool, chaos_g).await?;
        let reference = rows(&pool, order_g).await?;
        assert_eq!(got, reference, "seed {seed}: chaos != in-order");
        assert_eq!(got.len(), stream.expect.len(), "seed {seed}: row count");
        let revs = revisions(&pool, chaos_g).await?;
        assert_eq!(
            revs,
            revisions(&pool, order_g).await?,
            "seed {seed}: revisions"
        );
        for (id, e) in &stream.expect {
            let r = &got[id];
            assert_eq!(r.7, e.created, "seed {seed} {id}: seen_create");
            assert_eq!(r.3, e.content, "seed {seed} {id}: content");
            assert_eq!(r.5, e.edited_at, "seed {seed} {id}: edited_at");
            assert_eq!(r.6, e.deleted, "seed {seed} {id}: deleted");
            assert_eq!(r.4, snowflake_time(*id), "seed {seed} {id}: created_at");
            if e.created {
                assert!(r.2.is_some(), "seed {seed} {id}: author");
                assert_eq!(r.8.as_array().map(|a| a.len()), Some(1), "attachments kept");
            } else {
                // Tombstone of a message never seen.
                assert_eq!(r.2, None);
                assert_eq!(r.3, "");
            }
            let want: BTreeSet<_> = e.revisions.clone();
            assert_eq!(
                revs.get(id).cloned().unwrap_or_default(),
                want,
                "seed {seed} {id}: revisions"
            );
        }

        // Events: at least one per message, never more than its distinct ops,
        // and exactly one "deleted" iff the message is deleted (a late create may
        // still fill a tombstone afterwards: that is an update).
        let ev = events(&pool, chaos_g).await?;
        for (id, e) in &stream.expect {
            let kinds = ev.get(id).cloned().unwrap_or_default();
            assert!(!kinds.is_empty(), "seed {seed} {id}: no event");
            assert!(
                kinds.len() <= stream.ops_per_message[id],
                "seed {seed} {id}: {} events for {} ops",
                kinds.len(),
                stream.ops_per_message[id]
            );
            assert_eq!(
                kinds.iter().filter(|k| **k == 3).count(),
                usize::from(e.deleted),
                "seed {seed} {id}: {kinds:?}"
            );
        }

        // Replaying everything again changes nothing and logs nothing.
        let before: i64 = sqlx::query_scalar("select count(*) from message_events")
            .fetch_one(&pool)
            .await?;
        let stats = write(&db, &chaos).await?;
        assert_eq!(
            stats.messages_changed, 0,
            "seed {seed}: replay changed rows"
        );
        // And so does replaying every create on the session (the
        // one-statement path meeting stored rows).
        let creates: Vec<IngestOp> = chaos
            .iter()
            .filter(|op| matches!(op, IngestOp::MessageCreate(_)))
            .cloned()
            .collect();
        let stats = write_on(&mut session, &creates).await?;
        assert_eq!(
            stats.messages_changed, 0,
            "seed {seed}: replayed creates changed rows"
        );
        session.close().await?;
        let after: i64 = sqlx::query_scalar("select count(*) from message_events")
            .fetch_one(&pool)
            .await?;
        assert_eq!(before, after, "seed {seed}: replay logged events");
        assert_eq!(rows(&pool, chaos_g).await?, got);
    }
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn older_edit_never_wins_and_delete_is_sticky(pool: PgPool) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    let id = snowflake_at(t(1_760_000_000_000)) | 1;
    let patch = |c: &str, ms: i64| {
        IngestOp::MessageUpdate(Box::new(MessagePatch {
            guild_id: 1,
            channel_id: 2,
            message_id: id,
            author: None,
            content: Some(c.into()),
            edited_at: Some(t(1_760_000_000_000 + ms)),
            attachments: None,
        }))
    };
    let del = IngestOp::MessageDelete {
        guild_id: 1,
        channel_id: 2,
        message_id: id,
    };
    let create = IngestOp::MessageCreate(Box::new(NewMessage {
        guild_id: 1,
        channel_id: 2,
        message_id: id,
        author: author(5),
        content: "first".into(),
        created_at: snowflake_time(id),
        edited_at: None,
        attachments: json!([]),
        reply_to_id: Some(42),
    }));
    // Delete first: a tombstone row.
    write(&db, std::slice::from_ref(&del)).await?;
    let r = rows(&pool, 1).await?;
    assert!(r[&id].6 && !r[&id].7 && r[&id].2.is_none());
    // The newer edit, then the older one, then the create: newest content stays,
    // author filled, still deleted.
    write(&db, &[patch("newer", 200)]).await?;
    write(&db, &[patch("older", 100)]).await?;
    write(&db, &[create]).await?;
    let r = rows(&pool, 1).await?;
    assert_eq!(r[&id].3, "newer");
    assert_eq!(r[&id].5, Some(t(1_760_000_000_200)));
    assert!(r[&id].6, "delete is sticky");
    assert_eq!(r[&id].2, Some(5));
    let deleted_at: Option<DateTime<Utc>> =
        sqlx::query_scalar("select deleted_at from messages where message_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    write(&db, &[del]).await?;
    let again: Option<DateTime<Utc>> =
        sqlx::query_scalar("select deleted_at from messages where message_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    assert_eq!(deleted_at, again, "deleted_at is set once");
    let revs = revisions(&pool, 1).await?;
    assert_eq!(revs[&id].len(), 3);
    let kinds = events(&pool, 1).await?;
    assert_eq!(kinds[&id], vec![3, 2, 2]);
    Ok(())
}

fn chan(g: i64, id: i64, kind: i16, parent: Option<i64>, ows: Vec<Overwrite>) -> ChannelInfo {
    ChannelInfo {
        guild_id: g,
        channel_id: id,
        kind,
        name: format!("c{id}"),
        parent_id: parent,
        position: 0,
        topic: None,
        archived: false,
        owner_id: None,
        overwrites: ows,
        applied_tags: vec![],
        available_tags: vec![],
        locked: false,
        thread_created_at: None,
    }
}

fn role(g: i64, id: i64, perms: i64) -> RoleInfo {
    RoleInfo {
        guild_id: g,
        role_id: id,
        name: format!("r{id}"),
        permissions: perms,
        position: 1,
    }
}

fn member(g: i64, u: i64, roles: Vec<i64>) -> MemberInfo {
    MemberInfo {
        guild_id: g,
        user_id: u,
        role_ids: roles,
        nick: None,
        joined_at: None,
        communication_disabled_until: None,
        observed_at: Utc::now(),
    }
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn access_data_is_mirrored(pool: PgPool) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    let g = 10;
    let ow = |t: i64, k: i16, a: i64, d: i64| Overwrite {
        target_id: t,
        kind: k,
        allow: a,
        deny: d,
    };
    let snap = GuildSnapshot {
        guild: GuildInfo {
            guild_id: g,
            name: "G".into(),
            icon: None,
            owner_id: 1,
        },
        roles: vec![role(g, g, 1024), role(g, 20, 8), role(g, 21, 0)],
        channels: vec![
            chan(g, 30, 0, None, vec![ow(g, 0, 0, 1024), ow(21, 0, 1024, 0)]),
            chan(g, 31, 15, None, vec![]),
        ],
        threads: vec![chan(g, 32, 12, Some(30), vec![])],
        members: vec![member(g, 2, vec![20]), member(g, 3, vec![21])],
        observed_at: Utc::now(),
    };
    write(&db, &[IngestOp::GuildCreate(Box::new(snap.clone()))]).await?;
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await }
    };
    assert_eq!(count("select count(*) from roles").await?, 3);
    assert_eq!(count("select count(*) from channels").await?, 3);
    assert_eq!(
        count("select count(*) from permission_overwrites").await?,
        2
    );
    assert_eq!(count("select count(*) from members").await?, 2);

    // Overwrites replaced as a set; role delete drops its overwrites; member
    // updates/removes; thread members; a second snapshot drops stale roles and
    // channels but keeps threads.
    write(
        &db,
        &[
            IngestOp::ChannelUpsert(chan(
                g,
                30,
                0,
                None,
                vec![ow(20, 0, 0, 1024), ow(21, 0, 1024, 0)],
            )),
            IngestOp::ThreadMembers {
                guild_id: g,
                thread_id: 32,
                added: vec![2, 3],
                removed: vec![],
                observed_at: Utc::now(),
            },
            IngestOp::MemberUpsert(member(g, 3, vec![])),
            IngestOp::MemberUpsert(member(g, 3, vec![20, 21])),
            IngestOp::RoleUpsert(role(g, 22, 1024)),
        ],
    )
    .await?;
    let ows: Vec<(i64, i64)> =
        sqlx::query_as("select target_id, deny from permission_overwrites order by target_id")
            .fetch_all(&pool)
            .await?;
    assert_eq!(ows, vec![(20, 1024), (21, 0)]);
    let roles3: Vec<i64> =
        sqlx::query_scalar("select unnest(role_ids) from members where user_id = 3")
            .fetch_all(&pool)
            .await?;
    assert_eq!(roles3, vec![20, 21]);

    write(
        &db,
        &[
            IngestOp::RoleDelete {
                guild_id: g,
                role_id: 21,
            },
            IngestOp::ThreadMembers {
                guild_id: g,
                thread_id: 32,
                added: vec![],
                removed: vec![3],
                observed_at: Utc::now(),
            },
            IngestOp::MemberRemove {
                guild_id: g,
                user_id: 2,
                observed_at: Utc::now(),
            },
        ],
    )
    .await?;
    // The role is gone from its members; its overwrite stays until Discord
    // sends a CHANNEL_UPDATE.
    assert_eq!(
        count("select count(*) from permission_overwrites").await?,
        2
    );
    assert_eq!(
        count("select count(*) from members where 21 = any(role_ids)").await?,
        0
    );
    assert_eq!(count("select count(*) from thread_members").await?, 0);
    assert_eq!(count("select count(*) from members").await?, 1);

    let mut snap2 = snap.clone();
    snap2.roles = vec![role(g, g, 1024)];
    snap2.channels = vec![chan(g, 31, 15, None, vec![])];
    snap2.threads = vec![];
    snap2.members = vec![];
    write(&db, &[IngestOp::GuildCreate(Box::new(snap2))]).await?;
    assert_eq!(count("select count(*) from roles").await?, 1);
    // Channel 30 is gone and its thread with it? The thread survives a
    // snapshot (archived threads are not listed) but channel 30 is deleted.
    let chans: Vec<i64> = sqlx::query_scalar("select channel_id from channels order by 1")
        .fetch_all(&pool)
        .await?;
    assert_eq!(chans, vec![31, 32]);
    assert_eq!(
        count("select count(*) from permission_overwrites").await?,
        0
    );

    write(
        &db,
        &[IngestOp::ChannelDelete {
            guild_id: g,
            channel_id: 32,
        }],
    )
    .await?;
    write(
        &db,
        &[IngestOp::GuildRemoved {
            guild_id: g,
            observed_at: Utc::now(),
        }],
    )
    .await?;
    assert_eq!(count("select count(*) from channels").await?, 1);
    assert_eq!(
        count("select count(*) from guilds where removed_at is not null").await?,
        1
    );
    // The guild coming back (observed after the removal) clears removed_at.
    let mut snap = snap;
    snap.observed_at = Utc::now();
    write(&db, &[IngestOp::GuildCreate(Box::new(snap))]).await?;
    assert_eq!(
        count("select count(*) from guilds where removed_at is null").await?,
        1
    );

    // Backfill helpers.
    let mut tx = db.worker().await?;
    let chans = ingest::backfill_channels(&mut tx, g).await?;
    assert_eq!(chans, vec![30, 32]);
    let newest = ingest::newest_message_ids(&mut tx, g, &chans, i64::MAX).await?;
    assert!(newest.is_empty());
    tx.commit().await?;
    Ok(())
}

async fn member_roles(pool: &PgPool, g: i64, u: i64) -> anyhow::Result<Option<Vec<i64>>> {
    Ok(
        sqlx::query_scalar("select role_ids from members where guild_id = $1 and user_id = $2")
            .bind(g)
            .bind(u)
            .fetch_optional(pool)
            .await?,
    )
}

async fn login_snapshot(
    db: &Db,
    u: i64,
    checked: &[i64],
    memberships: &[(i64, Vec<i64>)],
    observed_at: DateTime<Utc>,
) -> anyhow::Result<()> {
    let ms: Vec<observer_db::auth::Membership> = memberships
        .iter()
        .map(|(g, roles)| observer_db::auth::Membership {
            guild_id: *g,
            role_ids: roles.clone(),
            nick: None,
            joined_at: None,
            communication_disabled_until: None,
        })
        .collect();
    let mut tx = db.auth().await?;
    observer_db::auth::replace_memberships(&mut tx, u, checked, &ms, observed_at).await?;
    tx.commit().await?;
    Ok(())
}

/// §3: the login path's REST snapshot and the worker's gateway events both
/// write `members`; whichever was observed later wins, whatever the commit
/// order. A stale snapshot must not restore a removed role or a removed member.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn member_writes_apply_only_newer_observations(pool: PgPool) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    let (g, u) = (10, 7);
    let at = |s: i64| t(1_750_000_000_000 + s * 1000);
    let obs = |roles: Vec<i64>, s: i64| {
        let mut m = member(g, u, roles);
        m.observed_at = at(s);
        IngestOp::MemberUpsert(m)
    };

    // Gateway at t=2: role 21 removed. A snapshot fetched at t=1 commits later.
    write(&db, &[obs(vec![20], 2)]).await?;
    login_snapshot(&db, u, &[g], &[(g, vec![20, 21])], at(1)).await?;
    assert_eq!(member_roles(&pool, g, u).await?, Some(vec![20]));
    // A newer snapshot applies; an older gateway event after it does not.
    login_snapshot(&db, u, &[g], &[(g, vec![20, 22])], at(3)).await?;
    write(&db, &[obs(vec![20, 21], 2)]).await?;
    assert_eq!(member_roles(&pool, g, u).await?, Some(vec![20, 22]));
    // An identical observation still advances the row's time: a stale write
    // that differs cannot slip in behind it.
    write(&db, &[obs(vec![20, 22], 5)]).await?;
    login_snapshot(&db, u, &[g], &[(g, vec![20, 21, 22])], at(4)).await?;
    assert_eq!(member_roles(&pool, g, u).await?, Some(vec![20, 22]));
    // Within one batch the newest observation wins, not the last op.
    write(&db, &[obs(vec![23], 7), obs(vec![24], 6)]).await?;
    assert_eq!(member_roles(&pool, g, u).await?, Some(vec![23]));

    // The member leaves at t=10; a snapshot fetched at t=9 must not re-add
    // them, nor may a gateway add observed before the removal.
    write(
        &db,
        &[IngestOp::MemberRemove {
            guild_id: g,
            user_id: u,
            observed_at: at(10),
        }],
    )
    .await?;
    login_snapshot(&db, u, &[g], &[(g, vec![20])], at(9)).await?;
    write(&db, &[obs(vec![20], 8)]).await?;
    assert_eq!(member_roles(&pool, g, u).await?, None);
    // A removal observed before a re-join does not delete the re-joined row.
    write(&db, &[obs(vec![25], 12)]).await?;
    write(
        &db,
        &[IngestOp::MemberRemove {
            guild_id: g,
            user_id: u,
            observed_at: at(11),
        }],
    )
    .await?;
    assert_eq!(member_roles(&pool, g, u).await?, Some(vec![25]));

    // The login path removes a member it no longer finds, and records it: a
    // gateway add observed before that fetch cannot re-create the row.
    login_snapshot(&db, u, &[g], &[], at(14)).await?;
    assert_eq!(member_roles(&pool, g, u).await?, None);
    write(&db, &[obs(vec![25], 13)]).await?;
    assert_eq!(member_roles(&pool, g, u).await?, None);
    // ...while a later join is applied.
    write(&db, &[obs(vec![26], 15)]).await?;
    assert_eq!(member_roles(&pool, g, u).await?, Some(vec![26]));
    // A snapshot taken before a gateway join does not remove the member.
    login_snapshot(&db, u, &[g], &[], at(14)).await?;
    assert_eq!(member_roles(&pool, g, u).await?, Some(vec![26]));
    Ok(())
}

/// A row first written by an update without `edited_at` and with empty
/// content (an attachment-only message) still holds a content version: a
/// later delete must not mistake it for a bare tombstone and drop its
/// attachments.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn versions_are_stored_not_guessed(pool: PgPool) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    let (g, c) = (10, 30);
    let id = snowflake_at(t(1_750_000_000_000)) | 3;
    let att = json!([{"id": "99", "filename": "shot.png", "url": "https://cdn/x", "size": 5,
                      "content_type": "image/png"}]);
    write(
        &db,
        &[IngestOp::MessageUpdate(Box::new(MessagePatch {
            guild_id: g,
            channel_id: c,
            message_id: id,
            author: None,
            content: Some(String::new()),
            edited_at: None,
            attachments: Some(att.clone()),
        }))],
    )
    .await?;
    write(
        &db,
        &[IngestOp::MessageDelete {
            guild_id: g,
            channel_id: c,
            message_id: id,
        }],
    )
    .await?;
    let (stored, deleted): (serde_json::Value, bool) = sqlx::query_as(
        "select attachments, deleted_at is not null from messages where message_id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await?;
    assert!(deleted);
    assert_eq!(stored, att);

    // The create arriving last fills in the author but keeps the same version
    // (same time, same content): the attachments stay.
    write(
        &db,
        &[IngestOp::MessageCreate(Box::new(NewMessage {
            guild_id: g,
            channel_id: c,
            message_id: id,
            author: author(5),
            content: String::new(),
            created_at: snowflake_time(id),
            edited_at: None,
            attachments: att.clone(),
            reply_to_id: None,
        }))],
    )
    .await?;
    let (stored, author_id): (serde_json::Value, Option<i64>) =
        sqlx::query_as("select attachments, author_id from messages where message_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
    assert_eq!((stored, author_id), (att, Some(5)));
    Ok(())
}

/// Only GUILD_CREATE (the bot is back) clears a removal or an outage; a
/// GUILD_UPDATE written after a GUILD_DELETE (concurrent handlers) must not
/// resurrect the guild.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn guild_update_does_not_resurrect_a_removed_guild(pool: PgPool) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    let info = |name: &str| GuildInfo {
        guild_id: 10,
        name: name.into(),
        icon: None,
        owner_id: 1,
    };
    let state = || async {
        sqlx::query_as::<_, (String, bool, bool)>(
            "select name, removed_at is not null, unavailable from guilds where guild_id = 10",
        )
        .fetch_one(&pool)
        .await
    };
    write(&db, &[IngestOp::GuildUpdate(info("a"))]).await?;
    write(
        &db,
        &[IngestOp::GuildRemoved {
            guild_id: 10,
            observed_at: Utc::now(),
        }],
    )
    .await?;
    write(&db, &[IngestOp::GuildUpdate(info("b"))]).await?;
    assert_eq!(state().await?, ("b".to_owned(), true, false));

    write(&db, &[IngestOp::GuildUnavailable { guild_id: 10 }]).await?;
    write(&db, &[IngestOp::GuildUpdate(info("c"))]).await?;
    assert_eq!(state().await?, ("c".to_owned(), true, true));

    let snap = GuildSnapshot {
        guild: info("d"),
        roles: vec![],
        channels: vec![],
        threads: vec![],
        members: vec![],
        observed_at: Utc::now(),
    };
    write(&db, &[IngestOp::GuildCreate(Box::new(snap))]).await?;
    assert_eq!(state().await?, ("d".to_owned(), false, false));
    Ok(())
}

/// The stored-row lookup of every batch is an index probe per message, even
/// on a connection whose cached plan dates from when the table was empty
/// (a fresh install grows faster than autovacuum analyzes it). It was a hash
/// join over a full scan of `messages`: on the fan-out benchmark, 0.8 ms per
/// batch after 5,000 messages and linear in the table's size.
#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn message_lookups_stay_index_probes_as_the_table_grows(pool: PgPool) -> anyhow::Result<()> {
    observer_db::migrate::apply_policies(&pool).await?;
    // One connection, so every batch reuses the same prepared statements.
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await?;
    let db = Db::new(one);
    let g = 4242;
    let base = snowflake_at(t(1_760_000_000_000));
    let create = |i: i64| {
        IngestOp::MessageCreate(Box::new(NewMessage {
            guild_id: g,
            channel_id: 100 + i % 4,
            message_id: base + i,
            author: author(7),
            content: format!("m{i}"),
            created_at: snowflake_time(base + i),
            edited_at: None,
            attachments: json!([]),
            reply_to_id: None,
        }))
    };
    let edit = |i: i64| {
        IngestOp::MessageUpdate(Box::new(MessagePatch {
            guild_id: g,
            channel_id: 100 + i % 4,
            message_id: base + i,
            author: None,
            content: Some(format!("m{i} edited")),
            edited_at: Some(snowflake_time(base + i) + Duration::seconds(1)),
            attachments: None,
        }))
    };
    // Small batches while the table is tiny: the server settles on a
    // generic plan for the lookup here.
    let mut next = 0i64;
    for _ in 0..12 {
        write(&db, &[create(next), create(next + 1), edit(next / 2)]).await?;
        next += 2;
    }
    // Then the table grows, with no analyze in between.
    while next < 20_000 {
        let ops: Vec<IngestOp> = (next..next + 2_000).map(create).collect();
        write(&db, &ops).await?;
        next += 2_000;
    }
    // Steady state: every batch (new messages and edits of old ones) reads
    // `messages` through its primary key only.
    for round in 0..8i64 {
        let ops = vec![
            create(next),
            create(next + 1),
            edit(100 + round * 97),
            edit(next - 5),
        ];
        next += 2;
        let mut tx = db.worker().await?;
        let stats = ingest::write_batch(&mut tx, &ops).await?;
        let (seq_scans,): (i64,) = sqlx::query_as(
            "select coalesce(seq_scan, 0) from pg_stat_xact_user_tables where relname = 'messages'",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        assert_eq!(stats.messages_changed, 4, "round {round}");
        assert_eq!(
            seq_scans, 0,
            "round {round}: a batch scanned all of messages"
        );
    }
    Ok(())
}
