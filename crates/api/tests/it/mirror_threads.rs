//! Issue 12 §1 end to end: a simulator that already holds private threads with members (active
//! and archived) before the worker first starts; the worker mirrors it (members and thread
//! members listed over REST, since Discord's GUILD_CREATE names neither) and every user sees,
//! through GraphQL, exactly what the simulator says Discord would show them. Then membership
//! changes while the worker is stopped converge after a restart that cannot resume.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use crate::common::{create_user, gql_raw, start, token_for};
use observer_db::Db;
use observer_sim::{Channel, ChannelKind, PostOptions, Scenario, SimConfig, Simulator};
use observer_testkit::wait::eventually_every;
use observer_testkit::worker::{self, Running};
use serde_json::{json, Value};
use sqlx::PgPool;

fn start_worker(sim: &Simulator, db: Db) -> Running {
    worker::start(worker::config(sim), db)
}

/// Each check reads every channel as every user: polled every 250 ms, not
/// as fast as the shared default.
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    eventually_every(timeout, Duration::from_millis(250), what, || {
        let pending = check();
        async move { Ok(pending.await) }
    })
    .await
    .unwrap();
}

fn find(s: &Scenario, g: usize, name: &str) -> u64 {
    s.guilds[g]
        .channels
        .iter()
        .find(|c| c.name == name)
        .unwrap()
        .id
}

fn thread(sim: &Simulator, id: u64) -> Channel {
    sim.access_truth()
        .guilds
        .into_iter()
        .flat_map(|g| g.channels)
        .find(|c| c.id == id)
        .unwrap()
}

fn archive(sim: &Simulator, id: u64) {
    let mut t = thread(sim, id);
    t.thread.as_mut().unwrap().archived = true;
    sim.update_thread(t).unwrap();
}

/// Private threads before the worker ever ran, in guild 0: an active one, two archived ones
/// (one the bot is in), each with messages; guild 1 gets an archived one too.
fn seed(sim: &Simulator, s: &Scenario) -> Vec<u64> {
    let mut threads = Vec::new();
    for (g, parent) in [(0, "general-help"), (1, "general-help")] {
        let members: Vec<u64> = s.guilds[g].members.iter().map(|m| m.user_id).collect();
        let parent = find(s, g, parent);
        let plan: &[(&str, &[usize], bool)] = if g == 0 {
            &[
                ("active secret", &[0, 3, 5], false),
                ("archived secret", &[1, 4], true),
                ("archived with bot", &[2, 6], true),
            ]
        } else {
            &[("old escalation", &[1, 2], true)]
        };
        for (name, who, archived) in plan {
            let owner = members[who[0]];
            let t = sim.create_thread(parent, *name, owner, true).unwrap();
            for i in &who[1..] {
                sim.add_thread_member(t.id, members[*i]).unwrap();
            }
            if *name == "archived with bot" {
                sim.add_thread_member(t.id, sim.config().bot_user_id)
                    .unwrap();
            }
            for i in *who {
                sim.post_message(
                    t.id,
                    members[*i],
                    format!("{name}: hello from {}", members[*i]),
                    PostOptions::default(),
                )
                .unwrap();
            }
            if *archived {
                archive(sim, t.id);
            }
            threads.push(t.id);
        }
    }
    threads
}

/// Every private thread of the simulator, with its members.
fn private_threads(sim: &Simulator) -> BTreeMap<u64, BTreeSet<u64>> {
    sim.access_truth()
        .guilds
        .into_iter()
        .flat_map(|g| g.channels)
        .filter(|c| c.kind == ChannelKind::PrivateThread)
        .map(|c| {
            let members = c.thread.map(|t| t.members).unwrap_or_default();
            (c.id, members.into_iter().collect())
        })
        .collect()
}

/// Users with their API tokens (the login path would create both).
async fn viewers(db: &Db, s: &Scenario) -> Vec<(u64, String)> {
    let users: BTreeSet<u64> = s
        .guilds
        .iter()
        .flat_map(|g| g.members.iter().map(|m| m.user_id))
        .collect();
    let mut out = Vec::new();
    for u in users {
        create_user(db, u as i64, &format!("user{u}")).await;
        out.push((u, token_for(db, u as i64).await));
    }
    out
}

/// What one user sees through the API: guild → visible channels, and the messages of
/// `threads` (any message channels) they may read, tombstones left out.
async fn seen(
    base: &str,
    token: &str,
    threads: &[u64],
) -> (BTreeMap<u64, BTreeSet<u64>>, BTreeMap<u64, BTreeSet<u64>>) {
    let (status, body) = gql_raw(
        base,
        Some(token),
        "{ guilds { id channels { id } } }",
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = |v: &Value| v.as_str().unwrap().parse::<u64>().unwrap();
    let guilds = body["data"]["guilds"]
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|g| {
            let channels = g["channels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| id(&c["id"]))
                .collect();
            (id(&g["id"]), channels)
        })
        .collect();
    let mut messages = BTreeMap::new();
    for t in threads {
        let (_, body) = gql_raw(
            base,
            Some(token),
            "query($c: ID!) { messages(channelId: $c, first: 100) {
               edges { node { id deletedAt deletionDetectedAt } } } }",
            json!({"c": t.to_string()}),
        )
        .await;
        // A channel the user may not read answers NOT_FOUND, like one that does not exist.
        assert!(
            body["errors"].is_null() || body["errors"][0]["extensions"]["code"] == "NOT_FOUND",
            "messages of {t}: {body}"
        );
        let ids: BTreeSet<u64> = body["data"]["messages"]["edges"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter(|n| {
                        n["node"]["deletedAt"].is_null()
                            && n["node"]["deletionDetectedAt"].is_null()
                    })
                    .map(|n| id(&n["node"]["id"]))
                    .collect()
            })
            .unwrap_or_default();
        if !ids.is_empty() {
            messages.insert(*t, ids);
        }
    }
    (guilds, messages)
}

/// The same, from the simulator's ground truth (Discord's permission computation).
fn truth(
    sim: &Simulator,
    user: u64,
    threads: &[u64],
) -> (BTreeMap<u64, BTreeSet<u64>>, BTreeMap<u64, BTreeSet<u64>>) {
    let mut guilds = BTreeMap::new();
    let mut history = BTreeSet::new();
    for g in sim.access_truth().guilds {
        let views = sim.user_channel_access(g.id, user);
        let visible: BTreeSet<u64> = views
            .iter()
            .filter(|(_, v)| v.view)
            .map(|(c, _)| *c)
            .collect();
        history.extend(views.iter().filter(|(_, v)| v.history).map(|(c, _)| *c));
        if !visible.is_empty() {
            guilds.insert(g.id, visible);
        }
    }
    let mut messages: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for m in sim.ground_truth() {
        if threads.contains(&m.channel_id) && history.contains(&m.channel_id) && !m.deleted {
            messages.entry(m.channel_id).or_default().insert(m.id);
        }
    }
    (guilds, messages)
}

async fn setup(pool: PgPool) -> (Simulator, Scenario, crate::common::TestApi, Vec<u64>) {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let s = Scenario::generate(
        7,
        observer_sim::GenOptions {
            guilds: 2,
            ..Default::default()
        },
    );
    sim.load(s.clone());
    let threads = seed(&sim, &s);
    // Each check reads every channel as every user, again and again until it
    // converges: far beyond a browser's request rate, which is not under test here.
    let api = start(pool, crate::common::unthrottled_config()).await;
    (sim, s, api, threads)
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn every_user_sees_what_discord_shows_them_from_the_first_start(pool: PgPool) {
    let (sim, s, api, _) = setup(pool).await;
    let users = viewers(&api.db, &s).await;
    let threads: Vec<u64> = private_threads(&sim).into_keys().collect();
    let worker = start_worker(&sim, api.db.clone());
    let base = api.base.clone();
    // Some user must see a private thread only through membership, or this proves little.
    assert!(users.iter().any(|(u, _)| threads.iter().any(|t| sim
        .user_channel_access(s.guilds[0].id, *u)
        .get(t)
        .is_some_and(|v| v.view))));
    eventually(
        Duration::from_secs(60),
        "every user sees Discord's view",
        || {
            let (sim, users, threads, base) = (&sim, &users, &threads, &base);
            async move {
                for (u, token) in users {
                    let want = truth(sim, *u, threads);
                    let got = seen(base, token, threads).await;
                    if got != want {
                        return Err(format!("user {u}: want {want:?}, got {got:?}"));
                    }
                }
                Ok(())
            }
        },
    )
    .await;
    worker.stop().await.unwrap();
    sim.shutdown().await;
}

async fn stored_thread_members(pool: &PgPool) -> BTreeMap<u64, BTreeSet<u64>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "select t.thread_id, t.user_id from thread_members t
         join channels c on c.guild_id = t.guild_id and c.channel_id = t.thread_id
         where c.kind = 12",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (t, u) in rows {
        out.entry(t as u64).or_default().insert(u as u64);
    }
    out
}

fn non_empty(m: BTreeMap<u64, BTreeSet<u64>>) -> BTreeMap<u64, BTreeSet<u64>> {
    m.into_iter().filter(|(_, v)| !v.is_empty()).collect()
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn membership_changed_while_stopped_converges_after_a_fresh_start(pool: PgPool) {
    let (sim, s, api, seeded) = setup(pool.clone()).await;
    let worker = start_worker(&sim, api.db.clone());
    eventually(Duration::from_secs(60), "first mirror", || {
        let (sim, pool) = (&sim, &pool);
        async move {
            let want = non_empty(private_threads(sim));
            let got = stored_thread_members(pool).await;
            (got == want)
                .then_some(())
                .ok_or(format!("want {want:?}, got {got:?}"))
        }
    })
    .await;
    // Chat in the voice room and in a text channel, mirrored before the stop.
    let voice = find(&s, 0, "Support call");
    let text = find(&s, 0, "general-help");
    let author = s.guilds[0].members[0].user_id;
    let mut posted = Vec::new();
    for (ch, what) in [
        (voice, "in the call"),
        (text, "one"),
        (text, "two"),
        (text, "three"),
    ] {
        posted.push(
            sim.post_message(ch, author, what, PostOptions::default())
                .unwrap()
                .id,
        );
    }
    eventually(Duration::from_secs(60), "chat mirrored", || {
        let (pool, ids) = (&pool, &posted);
        async move {
            let ids: Vec<i64> = ids.iter().map(|i| *i as i64).collect();
            let n: i64 =
                sqlx::query_scalar("select count(*) from messages where message_id = any($1)")
                    .bind(&ids)
                    .fetch_one(pool)
                    .await
                    .unwrap();
            (n == ids.len() as i64)
                .then_some(())
                .ok_or(format!("{n} of {} stored", ids.len()))
        }
    })
    .await;
    worker.stop().await.unwrap();

    // While nobody listens: removals and additions in an active and an archived thread, a
    // member who leaves the guild, the voice room locked (@everyone loses CONNECT, so its
    // chat, stored already, is no longer theirs to read), one message edited, one deleted.
    let members: Vec<u64> = s.guilds[0].members.iter().map(|m| m.user_id).collect();
    let (active, archived) = (seeded[0], seeded[1]);
    sim.remove_thread_member(active, members[3]).unwrap();
    sim.add_thread_member(active, members[7]).unwrap();
    sim.remove_thread_member(archived, members[4]).unwrap();
    sim.add_thread_member(archived, members[8]).unwrap();
    sim.remove_member(s.guilds[0].id, members[5]).unwrap();
    sim.set_overwrite(
        voice,
        observer_sim::Overwrite {
            id: s.guilds[0].id,
            kind: observer_sim::OverwriteKind::Role,
            allow: 0,
            deny: observer_sim::perms::CONNECT,
        },
    )
    .unwrap();
    sim.edit_message(posted[2], "two, edited while away")
        .unwrap();
    sim.delete_message(posted[3]).unwrap();
    // Discord would not let the old session resume either.
    sim.invalidate_sessions(false);

    let worker = start_worker(&sim, api.db.clone());
    eventually(Duration::from_secs(60), "thread members converge", || {
        let (sim, pool) = (&sim, &pool);
        async move {
            let want = non_empty(private_threads(sim));
            let got = stored_thread_members(pool).await;
            (got == want)
                .then_some(())
                .ok_or(format!("want {want:?}, got {got:?}"))
        }
    })
    .await;
    let stored: BTreeSet<i64> =
        sqlx::query_scalar("select user_id from members where guild_id = $1")
            .bind(s.guilds[0].id as i64)
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert!(
        !stored.contains(&(members[5] as i64)),
        "the leaver's member row is gone"
    );
    // Every user's view through the API is Discord's again: channels, the private threads,
    // the locked voice room and the text channel with its edit and deletion.
    let users = viewers(&api.db, &s).await;
    let mut channels: Vec<u64> = private_threads(&sim).into_keys().collect();
    channels.extend([voice, text]);
    let base = api.base.clone();
    eventually(
        Duration::from_secs(60),
        "every user sees Discord's view again",
        || {
            let (sim, users, channels, base) = (&sim, &users, &channels, &base);
            async move {
                for (u, token) in users {
                    let want = truth(sim, *u, channels);
                    let got = seen(base, token, channels).await;
                    if got != want {
                        return Err(format!("user {u}: want {want:?}, got {got:?}"));
                    }
                }
                Ok(())
            }
        },
    )
    .await;
    // The voice room still shows for a plain member, its chat does not.
    let plain = users.iter().map(|(u, _)| *u).find(|u| {
        let v = sim.user_channel_access(s.guilds[0].id, *u);
        v.get(&voice).is_some_and(|v| v.view && !v.read)
    });
    assert!(
        plain.is_some(),
        "some user sees the locked room without its chat"
    );
    let (edited, detected): (String, bool) = sqlx::query_as(
        "select (select content from messages where message_id = $1),
                (select deletion_detected_at is not null from messages where message_id = $2)",
    )
    .bind(posted[2] as i64)
    .bind(posted[3] as i64)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(edited, "two, edited while away");
    assert!(
        detected,
        "the deletion made while away is a detected tombstone"
    );
    worker.stop().await.unwrap();
    sim.shutdown().await;
}
