//! Observed-at ordering of thread membership, complete listings and guild
//! presence: whatever order the ops reach the database in, the
//! store ends at the newest observation.

use std::collections::BTreeSet;

use chrono::{DateTime, TimeZone, Utc};
use observer_db::ingest::{self, GuildInfo, GuildSnapshot, IngestOp, MemberInfo};
use observer_db::Db;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sqlx::PgPool;

const G: i64 = 10;
const THREAD: i64 = 32;

fn t(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_750_000_000 + s, 0)
        .single()
        .unwrap_or_default()
}

async fn write(db: &Db, ops: &[IngestOp]) -> anyhow::Result<()> {
    let mut tx = db.worker().await?;
    ingest::write_batch(&mut tx, ops).await?;
    tx.commit().await?;
    Ok(())
}

async fn thread_members(pool: &PgPool) -> anyhow::Result<BTreeSet<i64>> {
    let v: Vec<i64> = sqlx::query_scalar(
        "select user_id from thread_members where guild_id = $1 and thread_id = $2",
    )
    .bind(G)
    .bind(THREAD)
    .fetch_all(pool)
    .await?;
    Ok(v.into_iter().collect())
}

async fn members(pool: &PgPool) -> anyhow::Result<BTreeSet<i64>> {
    let v: Vec<i64> = sqlx::query_scalar("select user_id from members where guild_id = $1")
        .bind(G)
        .fetch_all(pool)
        .await?;
    Ok(v.into_iter().collect())
}

fn member(u: i64, at: DateTime<Utc>) -> MemberInfo {
    MemberInfo {
        guild_id: G,
        user_id: u,
        role_ids: vec![],
        nick: None,
        joined_at: None,
        communication_disabled_until: None,
        observed_at: at,
    }
}

/// A causal history of one thread's membership: adds, removes and complete
/// listings at increasing times, with the true set after the last one.
fn thread_history(rng: &mut ChaCha8Rng) -> (Vec<IngestOp>, BTreeSet<i64>) {
    let mut truth = BTreeSet::new();
    let mut ops = Vec::new();
    for step in 0..rng.gen_range(4..14) {
        let at = t(step);
        let u = rng.gen_range(1..6);
        match rng.gen_range(0..3) {
            0 => {
                truth.insert(u);
                ops.push(IngestOp::ThreadMembers {
                    guild_id: G,
                    thread_id: THREAD,
                    added: vec![u],
                    removed: vec![],
                    observed_at: at,
                });
            }
            1 => {
                truth.remove(&u);
                ops.push(IngestOp::ThreadMembers {
                    guild_id: G,
                    thread_id: THREAD,
                    added: vec![],
                    removed: vec![u],
                    observed_at: at,
                });
            }
            _ => ops.push(IngestOp::ThreadMembersSync {
                guild_id: G,
                thread_id: THREAD,
                user_ids: truth.iter().copied().collect(),
                observed_at: at,
            }),
        }
    }
    (ops, truth)
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn thread_membership_converges_to_the_newest_observation_in_any_order(
    pool: PgPool,
) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for round in 0..40 {
        sqlx::query("delete from thread_members")
            .execute(&pool)
            .await?;
        sqlx::query("delete from thread_member_removals")
            .execute(&pool)
            .await?;
        let (mut ops, truth) = thread_history(&mut rng);
        ops.shuffle(&mut rng);
        // Random batch splits: some ops share a transaction.
        let mut rest = &ops[..];
        while !rest.is_empty() {
            let n = rng.gen_range(1..=rest.len().min(3));
            write(&db, &rest[..n]).await?;
            rest = &rest[n..];
        }
        assert_eq!(
            thread_members(&pool).await?,
            truth,
            "round {round}: {ops:#?}"
        );
    }
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn stale_listings_and_stale_adds_lose(pool: PgPool) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    let add = |u: i64, at: i64| IngestOp::ThreadMembers {
        guild_id: G,
        thread_id: THREAD,
        added: vec![u],
        removed: vec![],
        observed_at: t(at),
    };
    let remove = |u: i64, at: i64| IngestOp::ThreadMembers {
        guild_id: G,
        thread_id: THREAD,
        added: vec![],
        removed: vec![u],
        observed_at: t(at),
    };
    let sync = |users: Vec<i64>, at: i64| IngestOp::ThreadMembersSync {
        guild_id: G,
        thread_id: THREAD,
        user_ids: users,
        observed_at: t(at),
    };
    // A listing taken at 5 (without user 2) arrives after 2's add at 6.
    write(&db, &[add(2, 6)]).await?;
    write(&db, &[sync(vec![1], 5)]).await?;
    assert_eq!(thread_members(&pool).await?, BTreeSet::from([1, 2]));
    // An add observed at 3 arrives after the removal observed at 7.
    write(&db, &[remove(3, 7)]).await?;
    write(&db, &[add(3, 3)]).await?;
    assert!(!thread_members(&pool).await?.contains(&3));
    // An add observed at 4, before the listing at 5 that did not hold user 4.
    write(&db, &[add(4, 4)]).await?;
    assert!(!thread_members(&pool).await?.contains(&4));
    // A listing newer than everything wins; an older one changes nothing.
    write(&db, &[sync(vec![4], 9)]).await?;
    write(&db, &[sync(vec![1, 2, 3], 8)]).await?;
    assert_eq!(thread_members(&pool).await?, BTreeSet::from([4]));
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn member_listings_follow_the_same_rule(pool: PgPool) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    let sync = |users: &[i64], at: i64| IngestOp::MembersSync {
        guild_id: G,
        members: users.iter().map(|u| member(*u, t(at))).collect(),
        observed_at: t(at),
    };
    write(&db, &[sync(&[1, 2, 3], 1)]).await?;
    write(
        &db,
        &[IngestOp::ThreadMembers {
            guild_id: G,
            thread_id: THREAD,
            added: vec![3],
            removed: vec![],
            observed_at: t(1),
        }],
    )
    .await?;
    // User 4 joined at 6; a listing taken at 5 arrives later and keeps them.
    write(&db, &[IngestOp::MemberUpsert(member(4, t(6)))]).await?;
    write(&db, &[sync(&[1, 2], 5)]).await?;
    assert_eq!(members(&pool).await?, BTreeSet::from([1, 2, 4]));
    // User 3's removal took their thread membership with it.
    assert!(thread_members(&pool).await?.is_empty());
    // A join observed at 4 (before the listing that did not hold user 5).
    write(&db, &[IngestOp::MemberUpsert(member(5, t(4)))]).await?;
    assert!(!members(&pool).await?.contains(&5));
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn guild_presence_follows_the_newest_observation(pool: PgPool) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for round in 0..30 {
        sqlx::query("delete from guilds").execute(&pool).await?;
        // Alternating create/remove at increasing times; the last one is the truth.
        let n = rng.gen_range(1..8);
        let mut ops = Vec::new();
        let mut present = false;
        for step in 0..n {
            present = rng.gen_bool(0.5);
            ops.push(if present {
                IngestOp::GuildCreate(Box::new(GuildSnapshot {
                    guild: GuildInfo {
                        guild_id: G,
                        name: format!("g{step}"),
                        icon: None,
                        owner_id: 1,
                    },
                    roles: vec![],
                    channels: vec![],
                    threads: vec![],
                    members: vec![],
                    observed_at: t(step),
                }))
            } else {
                IngestOp::GuildRemoved {
                    guild_id: G,
                    observed_at: t(step),
                }
            });
        }
        ops.shuffle(&mut rng);
        for op in &ops {
            write(&db, std::slice::from_ref(op)).await?;
        }
        let removed: bool =
            sqlx::query_scalar("select removed_at is not null from guilds where guild_id = $1")
                .bind(G)
                .fetch_one(&pool)
                .await?;
        assert_eq!(removed, !present, "round {round}: {ops:#?}");
    }
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn confirming_a_thread_membership_writes_no_access_event(pool: PgPool) -> anyhow::Result<()> {
    let db = observer_testkit::db(&pool).await?;
    let events = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from access_events where user_id = 2")
            .fetch_one(&pool)
            .await
    };
    let sync = |users: Vec<i64>, at: i64| IngestOp::ThreadMembersSync {
        guild_id: G,
        thread_id: THREAD,
        user_ids: users,
        observed_at: t(at),
    };
    write(&db, &[sync(vec![2], 1)]).await?;
    let after_add = events().await?;
    assert!(after_add >= 1, "an added membership is an access change");
    // The same listing again, later: only observed_at moves.
    write(&db, &[sync(vec![2], 2)]).await?;
    let stamp: DateTime<Utc> =
        sqlx::query_scalar("select observed_at from thread_members where user_id = 2")
            .fetch_one(&pool)
            .await?;
    assert_eq!(stamp, t(2));
    assert_eq!(events().await?, after_add);
    write(&db, &[sync(vec![], 3)]).await?;
    assert!(events().await? > after_add, "a removal is an access change");
    // Tombstones are purged like member tombstones.
    let mut tx = db.worker().await?;
    let purged =
        ingest::purge_thread_member_removals(&mut tx, std::time::Duration::from_secs(0)).await?;
    tx.commit().await?;
    assert!(purged >= 1);
    Ok(())
}
