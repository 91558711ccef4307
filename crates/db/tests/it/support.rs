//! The support queue in the database: conversations derived at ingest,
//! converging under shuffled and replayed ops, read under row-level
//! security (two viewers, two answers), settings for managers only.

use chrono::{DateTime, Duration, Utc};
use observer_db::ingest::{
    self, Author, ChannelInfo, ForumTag, GuildInfo, GuildSnapshot, IngestOp, MemberInfo,
    NewMessage, Overwrite, RoleInfo,
};
use observer_db::support::{self, queue, settings::SupportSettings};
use observer_db::{Db, Error};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sqlx::PgPool;

const G: i64 = 1;
const OWNER: i64 = 10;
const ALICE: i64 = 11;
const BOB: i64 = 12;
const STAFF: i64 = 13;
const PLAIN: i64 = 14;
const BOT: i64 = 15;
const STAFF_ROLE: i64 = 100;
const FORUM: i64 = 500;
const HIDDEN_FORUM: i64 = 600;
const SOLVED_TAG: i64 = 900;

const VIEW: i64 = 1 << 10;
const HISTORY: i64 = 1 << 16;
const MANAGE_MESSAGES: i64 = 1 << 13;

/// Two days ago, in whole seconds (PostgreSQL keeps microseconds).
fn base() -> DateTime<Utc> {
    let now = Utc::now().timestamp();
    DateTime::from_timestamp(now - now % 60 - 2 * 86_400, 0).unwrap_or_default()
}

fn at(min: i64) -> DateTime<Utc> {
    base() + Duration::minutes(min)
}

fn channel(id: i64, kind: i16, parent: Option<i64>, owner: Option<i64>) -> ChannelInfo {
    ChannelInfo {
        guild_id: G,
        channel_id: id,
        kind,
        name: format!("c{id}"),
        parent_id: parent,
        position: 0,
        topic: None,
        archived: false,
        owner_id: owner,
        overwrites: vec![],
        available_tags: vec![],
        applied_tags: vec![],
        locked: false,
        thread_created_at: None,
    }
}

fn member(u: i64, roles: Vec<i64>) -> MemberInfo {
    MemberInfo {
        guild_id: G,
        user_id: u,
        role_ids: roles,
        nick: None,
        joined_at: None,
        communication_disabled_until: None,
        observed_at: base(),
    }
}

/// A guild with a public forum and one only staff can see.
fn guild() -> IngestOp {
    let tags = vec![
        ForumTag {
            id: SOLVED_TAG,
            name: "Solved".into(),
            moderated: true,
        },
        ForumTag {
            id: 901,
            name: "question".into(),
            moderated: false,
        },
    ];
    let mut forum = channel(FORUM, 15, None, None);
    forum.available_tags = tags.clone();
    let mut hidden = channel(HIDDEN_FORUM, 15, None, None);
    hidden.available_tags = tags;
    hidden.overwrites = vec![
        Overwrite {
            target_id: G,
            kind: 0,
            allow: 0,
            deny: VIEW,
        },
        Overwrite {
            target_id: STAFF_ROLE,
            kind: 0,
            allow: VIEW,
            deny: 0,
        },
    ];
    IngestOp::GuildCreate(Box::new(GuildSnapshot {
        guild: GuildInfo {
            guild_id: G,
            name: "g".into(),
            icon: None,
            owner_id: OWNER,
        },
        roles: vec![
            RoleInfo {
                guild_id: G,
                role_id: G,
                name: "@everyone".into(),
                permissions: VIEW | HISTORY,
                position: 0,
            },
            RoleInfo {
                guild_id: G,
                role_id: STAFF_ROLE,
                name: "Staff".into(),
                permissions: VIEW | HISTORY | MANAGE_MESSAGES,
                position: 1,
            },
        ],
        channels: vec![forum, hidden],
        threads: vec![],
        members: vec![
            member(OWNER, vec![]),
            member(ALICE, vec![]),
            member(BOB, vec![]),
            member(STAFF, vec![STAFF_ROLE]),
            member(PLAIN, vec![]),
        ],
        observed_at: base(),
    }))
}

fn post(thread: i64, forum: i64, owner: i64, tags: Vec<i64>) -> IngestOp {
    let mut c = channel(thread, 11, Some(forum), Some(owner));
    c.applied_tags = tags;
    c.thread_created_at = Some(at(0));
    IngestOp::ChannelUpsert(c)
}

fn msg(thread: i64, id: i64, author: i64, min: i64) -> IngestOp {
    IngestOp::MessageCreate(Box::new(NewMessage {
        guild_id: G,
        channel_id: thread,
        message_id: id,
        author: Author {
            id: author,
            username: format!("u{author}"),
            display_name: None,
            avatar: None,
            bot: author == BOT,
        },
        content: "hi".into(),
        created_at: at(min),
        edited_at: None,
        attachments: serde_json::json!([]),
        reply_to_id: None,
    }))
}

async fn write(db: &Db, ops: &[IngestOp]) -> anyhow::Result<()> {
    let mut tx = db.worker().await?;
    ingest::write_batch(&mut tx, ops).await?;
    tx.commit().await?;
    Ok(())
}

async fn queue_of(db: &Db, viewer: i64) -> anyhow::Result<Vec<queue::ConversationRow>> {
    let mut tx = db.viewer(viewer).await?;
    let rows = queue::page(
        &mut tx,
        G,
        &queue::Filter::default(),
        queue::Order::WaitingLongest,
        None,
        100,
    )
    .await?;
    tx.commit().await?;
    Ok(rows)
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn forum_posts_become_conversations_seen_under_each_viewers_rights(
    pool: PgPool,
) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    write(&db, &[guild()]).await?;
    // T1 (public forum): answered, followed up, answered again, tagged solved.
    // T2 (staff-only forum): unanswered, a bot's auto-reply does not count.
    write(
        &db,
        &[
            post(1000, FORUM, ALICE, vec![]),
            msg(1000, 1000, ALICE, 0),
            msg(1000, 1001, STAFF, 10),
            msg(1000, 1002, ALICE, 12),
            msg(1000, 1003, STAFF, 20),
            post(2000, HIDDEN_FORUM, BOB, vec![]),
            msg(2000, 2000, BOB, 5),
            msg(2000, 2001, BOT, 6),
        ],
    )
    .await?;

    let staff_view = queue_of(&db, STAFF).await?;
    assert_eq!(
        staff_view
            .iter()
            .map(|c| (c.conversation_id, c.state.as_str()))
            .collect::<Vec<_>>(),
        // Oldest wait first; not waiting last.
        vec![(2000, "NEW"), (1000, "WAITING_ON_REQUESTER")]
    );
    let t1 = &staff_view[1];
    assert_eq!(t1.requester_id, Some(ALICE));
    assert_eq!(t1.first_responder_id, Some(STAFF));
    assert_eq!(t1.first_response_at, Some(at(10)));
    assert_eq!(t1.next_response_secs, vec![480.0]);
    assert_eq!(t1.message_count, 4);
    assert_eq!(t1.participant_ids, vec![ALICE, STAFF]);
    let t2 = &staff_view[0];
    assert_eq!(t2.waiting_since, Some(at(0)));
    assert_eq!(t2.first_response_at, None);

    // A member who cannot see the staff forum sees one conversation, and
    // every number is over that one alone.
    let plain_view = queue_of(&db, PLAIN).await?;
    assert_eq!(
        plain_view
            .iter()
            .map(|c| c.conversation_id)
            .collect::<Vec<_>>(),
        vec![1000]
    );
    let stats = |viewer| {
        let db = db.clone();
        async move {
            let mut tx = db.viewer(viewer).await?;
            let s = queue::stats(&mut tx, G, at(-60), Utc::now(), "day", &[], &[]).await?;
            tx.commit().await?;
            anyhow::Ok(s)
        }
    };
    let (s_staff, s_plain) = (stats(STAFF).await?, stats(PLAIN).await?);
    assert_eq!((s_staff.summary.opened, s_plain.summary.opened), (2, 1));
    assert_eq!(
        (s_staff.summary.unanswered, s_plain.summary.unanswered),
        (1, 0)
    );
    assert_eq!((s_staff.summary.backlog, s_plain.summary.backlog), (1, 0));
    assert_eq!(s_plain.summary.first_response.median, Some(600.0));
    assert_eq!(s_plain.top_responders.len(), 1);
    let mut tx = db.viewer(PLAIN).await?;
    assert!(queue::one(&mut tx, 2000).await?.is_none());
    drop(tx);

    // The solved tag: SOLVED; the requester writing again reopens it.
    write(&db, &[post(1000, FORUM, ALICE, vec![SOLVED_TAG])]).await?;
    let t1 = queue_of(&db, PLAIN).await?.remove(0);
    assert_eq!(t1.state, "SOLVED");
    assert!(t1.first_solved_at.is_some());
    // Per tag: only the tagged post, in the queue and in the numbers.
    let mut tx = db.viewer(STAFF).await?;
    let tagged = queue::Filter {
        tag_ids: vec![SOLVED_TAG],
        ..queue::Filter::default()
    };
    let rows = queue::page(&mut tx, G, &tagged, queue::Order::Newest, None, 10).await?;
    assert_eq!(
        rows.iter().map(|c| c.conversation_id).collect::<Vec<_>>(),
        vec![1000]
    );
    let s = queue::stats(&mut tx, G, at(-60), Utc::now(), "day", &[], &[SOLVED_TAG]).await?;
    assert_eq!((s.summary.opened, s.summary.solved), (1, 1));
    let s = queue::stats(&mut tx, G, at(-60), Utc::now(), "day", &[], &[901]).await?;
    assert_eq!(s.summary.opened, 0);
    tx.commit().await?;
    // The marker was observed now: the follow-up comes after it.
    write(&db, &[msg(1000, 1004, ALICE, 48 * 60 + 5)]).await?;
    let t1 = queue_of(&db, PLAIN).await?.remove(0);
    assert_eq!(
        (t1.state.as_str(), t1.reopen_count),
        ("WAITING_ON_STAFF", 1)
    );

    // Deleting the thread removes its conversation.
    write(
        &db,
        &[IngestOp::ChannelDelete {
            guild_id: G,
            channel_id: 2000,
        }],
    )
    .await?;
    assert_eq!(queue_of(&db, STAFF).await?.len(), 1);
    Ok(())
}

/// A random conversation's ops: a post (tagged solved or not, constant),
/// human and bot messages, some deleted.
fn history(rng: &mut ChaCha8Rng, thread: i64) -> Vec<IngestOp> {
    let solved = rng.gen_bool(0.3);
    let mut ops = vec![post(
        thread,
        FORUM,
        ALICE,
        if solved { vec![SOLVED_TAG] } else { vec![] },
    )];
    let mut min = 0;
    for i in 0..rng.gen_range(1..12) {
        let id = thread * 100 + i;
        let author = *[ALICE, ALICE, STAFF, BOB, BOT, OWNER]
            .choose(rng)
            .unwrap_or(&ALICE);
        ops.push(msg(thread, id, author, min));
        if rng.gen_bool(0.15) {
            ops.push(IngestOp::MessageDelete {
                guild_id: G,
                channel_id: thread,
                message_id: id,
            });
        }
        min += rng.gen_range(1..90);
    }
    ops
}

async fn snapshot(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    // Everything derived, as text; `recomputed_at` is bookkeeping.
    let rows: Vec<String> = sqlx::query_scalar(
        "select (to_jsonb(c) - 'recomputed_at')::text from conversations c order by conversation_id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn shuffled_duplicated_and_split_ops_end_in_the_in_order_state(
    pool: PgPool,
) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for round in 0..25 {
        sqlx::raw_sql(
            "delete from conversations; delete from conversation_solved_marks; \
             delete from messages; delete from message_events; delete from message_revisions; \
             delete from channels where kind = 11",
        )
        .execute(&pool)
        .await?;
        write(&db, &[guild()]).await?;
        let ops: Vec<IngestOp> = (0..3).flat_map(|k| history(&mut rng, 3000 + k)).collect();
        for op in &ops {
            write(&db, std::slice::from_ref(op)).await?;
        }
        let in_order = snapshot(&pool).await?;
        assert_eq!(in_order.len(), 3);

        sqlx::raw_sql(
            "delete from conversations; delete from conversation_solved_marks; \
             delete from messages; delete from message_events; delete from message_revisions; \
             delete from channels where kind = 11",
        )
        .execute(&pool)
        .await?;
        let mut shuffled = ops.clone();
        // Replays: some ops twice.
        for op in &ops {
            if rng.gen_bool(0.3) {
                shuffled.push(op.clone());
            }
        }
        shuffled.shuffle(&mut rng);
        let mut rest = &shuffled[..];
        while !rest.is_empty() {
            let n = rng.gen_range(1..=rest.len().min(4));
            write(&db, &rest[..n]).await?;
            rest = &rest[n..];
        }
        assert_eq!(snapshot(&pool).await?, in_order, "round {round}");
    }
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn settings_are_for_managers_audited_and_recompute_the_guild(
    pool: PgPool,
) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    write(&db, &[guild()]).await?;
    // Answered by PLAIN, who is no staff by default.
    write(
        &db,
        &[
            post(1000, FORUM, ALICE, vec![]),
            msg(1000, 1000, ALICE, 0),
            msg(1000, 1001, PLAIN, 3),
        ],
    )
    .await?;
    assert_eq!(queue_of(&db, PLAIN).await?[0].state, "NEW");

    // Not a manager: the same answer as a guild that does not exist.
    let mut tx = db.viewer(PLAIN).await?;
    assert!(matches!(
        support::settings::get(&mut tx, G).await,
        Err(Error::NotFound)
    ));
    drop(tx);
    let mut tx = db.viewer(PLAIN).await?;
    assert!(matches!(
        support::settings::set(&mut tx, G, PLAIN, &SupportSettings::default()).await,
        Err(Error::NotFound)
    ));
    drop(tx);

    // PLAIN gets a role (777) that the owner then names as the staff role.
    write(
        &db,
        &[IngestOp::MemberUpsert(MemberInfo {
            observed_at: Utc::now(),
            ..member(PLAIN, vec![777])
        })],
    )
    .await?;
    let new = SupportSettings {
        staff_role_ids: vec![777],
        first_response_target_secs: Some(3600),
        ..SupportSettings::default()
    };
    let mut tx = db.viewer(OWNER).await?;
    let view = support::settings::set(&mut tx, G, OWNER, &new).await?;
    assert!(view.recompute_pending);
    let audit = support::settings::audit(&mut tx, G, 10).await?;
    tx.commit().await?;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].changed_by, OWNER);
    assert_eq!(audit[0].new["staffRoleIds"], serde_json::json!([777]));

    // Until the worker recomputes, the derived rows are the old ones.
    assert_eq!(queue_of(&db, PLAIN).await?[0].state, "NEW");
    let mut tx = db.worker().await?;
    let done = support::recompute_next_guild(&mut tx).await?;
    tx.commit().await?;
    assert_eq!(done, Some((G, true)));
    let c = queue_of(&db, PLAIN).await?.remove(0);
    assert_eq!(c.state, "WAITING_ON_REQUESTER");
    assert_eq!(c.first_responder_id, Some(PLAIN));
    // Answered after 3 of 60 minutes.
    assert_eq!(c.sla_status.as_deref(), Some("OK"));
    let mut tx = db.viewer(OWNER).await?;
    let view = support::settings::get(&mut tx, G).await?;
    assert!(!view.recompute_pending);
    assert_eq!((view.recompute_done, view.recompute_total), (1, 1));
    let mut tx2 = db.worker().await?;
    assert_eq!(support::recompute_next_guild(&mut tx2).await?, None);
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn the_startup_sweep_catches_up_with_messages_written_without_recomputation(
    pool: PgPool,
) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    write(&db, &[guild()]).await?;
    write(
        &db,
        &[post(1000, FORUM, ALICE, vec![]), msg(1000, 1000, ALICE, 0)],
    )
    .await?;
    // As if the worker died between a live write and its recomputation.
    sqlx::query(
        "insert into messages (guild_id, message_id, channel_id, author_id, created_at, seen_create) \
         values ($1, 1001, 1000, $2, $3, true)",
    )
    .bind(G)
    .bind(STAFF)
    .bind(at(4))
    .execute(&pool)
    .await?;
    assert_eq!(queue_of(&db, STAFF).await?[0].state, "NEW");
    let mut tx = db.worker().await?;
    assert_eq!(support::sweep_stale(&mut tx, 100).await?, 1);
    tx.commit().await?;
    assert_eq!(queue_of(&db, STAFF).await?[0].state, "WAITING_ON_REQUESTER");
    let mut tx = db.worker().await?;
    assert_eq!(support::sweep_stale(&mut tx, 100).await?, 0);
    Ok(())
}
