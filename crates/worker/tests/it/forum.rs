//! Forum tags, applied tags, locks and creation times (what the support queue
//! reads, docs/support-queue.md) mirrored from the gateway and the archived
//! thread listings, and kept current by CHANNEL_UPDATE and THREAD_UPDATE.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use observer_sim::{Channel, ChannelKind, ForumTag, GenOptions, Scenario, SimConfig};
use serde_json::Value;
use sqlx::PgPool;

/// What the database holds for one channel: its tags as (id, name, moderated),
/// the tags applied to it, locked, and whether a creation time is known.
type Stored = (Vec<(i64, String, bool)>, Vec<i64>, bool, bool);

async fn stored(pool: &PgPool) -> anyhow::Result<BTreeMap<i64, Stored>> {
    let rows: Vec<(i64, Value, Vec<i64>, bool, bool)> = sqlx::query_as(
        "select channel_id, available_tags, applied_tags, locked, thread_created_at is not null \
         from channels",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, tags, applied, locked, created)| {
            let tags = tags
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    (
                        t["id"].as_str().and_then(|s| s.parse().ok()).unwrap_or(-1),
                        t["name"].as_str().unwrap_or_default().to_owned(),
                        t["moderated"].as_bool().unwrap_or_default(),
                    )
                })
                .collect();
            (id, (tags, applied, locked, created))
        })
        .collect())
}

fn expected(c: &Channel) -> Stored {
    let tags = c
        .available_tags
        .iter()
        .map(|t| (t.id as i64, t.name.clone(), t.moderated))
        .collect();
    let (applied, locked) = c.thread.as_ref().map_or((vec![], false), |t| {
        (t.applied_tags.iter().map(|i| *i as i64).collect(), t.locked)
    });
    (tags, applied, locked, c.kind.is_thread())
}

/// Every forum and forum post of the simulator's world, as the database holds it.
async fn matches_world(
    pool: &PgPool,
    sim: &observer_sim::Simulator,
) -> anyhow::Result<Result<(), String>> {
    let got = stored(pool).await?;
    for g in &sim.access_truth().guilds {
        let forums: Vec<u64> = g
            .channels
            .iter()
            .filter(|c| c.kind.has_posts())
            .map(|c| c.id)
            .collect();
        for c in g
            .channels
            .iter()
            .filter(|c| forums.contains(&c.id) || c.parent_id.is_some_and(|p| forums.contains(&p)))
        {
            let want = expected(c);
            match got.get(&(c.id as i64)) {
                Some(have) if *have == want => {}
                have => {
                    return Ok(Err(format!(
                        "channel {}: want {want:?}, have {have:?}",
                        c.id
                    )))
                }
            }
        }
    }
    Ok(Ok(()))
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn forum_tags_locks_and_creation_times_are_mirrored(pool: PgPool) -> anyhow::Result<()> {
    init_tracing();
    let db = db(&pool).await?;
    let sim = sim(SimConfig::default()).await?;
    let sc = Scenario::generate(5, GenOptions::default());
    sim.load(sc.clone());
    let worker = start(config(&sim), db);
    wait_guilds(&pool, sc.guilds.len() as i64).await?;
    // The generated forum offers four tags; its posts carry some, and the
    // archived one (listed over REST, never announced) is marked solved.
    let wait = Duration::from_secs(20);
    eventually(wait, "forum tags mirrored", || matches_world(&pool, &sim)).await?;
    let forum = sc.guilds[0]
        .channels
        .iter()
        .find(|c| c.kind == ChannelKind::Forum)
        .cloned()
        .expect("the generated guild has a forum");
    assert_eq!(forum.available_tags.len(), 4);
    let post = sc.guilds[0]
        .channels
        .iter()
        .find(|c| c.parent_id == Some(forum.id) && c.thread.as_ref().is_some_and(|t| !t.archived))
        .cloned()
        .expect("an open forum post");

    // A moderator marks the post solved and locks it (THREAD_UPDATE), and the
    // forum's tags change (CHANNEL_UPDATE: the full list again).
    let solved = forum
        .available_tags
        .iter()
        .find(|t| t.name == "solved")
        .map(|t| t.id);
    let mut edited = post.clone();
    if let Some(t) = edited.thread.as_mut() {
        t.applied_tags = solved.into_iter().collect();
        t.locked = true;
    }
    sim.update_thread(edited)?;
    let mut renamed = forum.clone();
    renamed
        .available_tags
        .retain(|t| t.name != "feature request");
    renamed.available_tags.push(ForumTag {
        id: sim.next_id(),
        name: "needs info".into(),
        moderated: false,
        emoji_name: None,
    });
    sim.update_channel(renamed)?;
    eventually(wait, "tag and lock changes mirrored", || {
        matches_world(&pool, &sim)
    })
    .await?;
    let now = stored(&pool).await?;
    assert_eq!(
        now[&(post.id as i64)].1,
        solved.map(|s| s as i64).into_iter().collect::<Vec<_>>()
    );
    assert!(now[&(post.id as i64)].2, "locked");

    // Discord's rules: a post carries only tags its forum offers, at most five;
    // only forums and media channels offer tags.
    let mut bad = post.clone();
    if let Some(t) = bad.thread.as_mut() {
        t.applied_tags = vec![424_242];
    }
    assert!(sim.update_thread(bad).is_err());
    let mut text = sc.guilds[0]
        .channels
        .iter()
        .find(|c| c.kind == ChannelKind::Text)
        .cloned()
        .expect("a text channel");
    text.available_tags = forum.available_tags.clone();
    assert!(sim.update_channel(text).is_err());

    worker.stop().await?;
    sim.shutdown().await;
    Ok(())
}
