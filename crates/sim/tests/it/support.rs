//! The support queue's simulator side: forum support traffic, back-dated history, and the truth
//! computed from the simulator's own journal.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use observer_sim::{
    model::snowflake_time, ChannelKind, ConversationState, GenOptions, Guild, PostOptions,
    Scenario, Side, SimConfig, Simulator, SupportTruth,
};
use serde_json::Value;

/// 2025-10-09 (a Thursday) 08:53:20 UTC.
const START_MS: i64 = 1_760_000_000_000;

async fn sim_with(guilds: usize) -> (Simulator, Scenario) {
    let sim = Simulator::start(SimConfig {
        virtual_clock_start_ms: Some(START_MS),
        cdn_base_url: Some("https://cdn.example.test".into()),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let s = Scenario::generate(
        9,
        GenOptions {
            guilds,
            ..GenOptions::default()
        },
    );
    sim.load(s.clone());
    (sim, s)
}

fn forum(g: &Guild) -> u64 {
    g.channels
        .iter()
        .find(|c| c.kind == ChannelKind::Forum)
        .unwrap()
        .id
}

fn role_id(g: &Guild, name: &str) -> u64 {
    g.roles.iter().find(|r| r.name == name).unwrap().id
}

/// Members holding exactly the role `name`.
fn with_role(g: &Guild, name: &str) -> Vec<u64> {
    let r = role_id(g, name);
    g.members
        .iter()
        .filter(|m| m.roles == vec![r])
        .map(|m| m.user_id)
        .collect()
}

async fn get(sim: &Simulator, path: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .get(format!("{}{path}", sim.base_url()))
        .header("authorization", format!("Bot {}", sim.config().bot_token))
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

fn ts(base: DateTime<Utc>, minutes: i64) -> DateTime<Utc> {
    base + Duration::minutes(minutes)
}

#[tokio::test]
async fn a_hand_written_conversation_gives_exact_numbers() {
    let (sim, s) = sim_with(1).await;
    let g = &s.guilds[0];
    let forum = forum(g);
    let requester = with_role(g, "Customer")[0];
    let other_customer = with_role(g, "Customer")[1];
    let staff = with_role(g, "Staff")[0];

    let (thread, opening) = sim
        .create_forum_post(forum, requester, "Login loop", "I cannot log in", vec![])
        .unwrap();
    // As on Discord, the starter message shares the post's id.
    assert_eq!(opening.id, thread.id);
    let t0 = snowflake_time(thread.id);
    let post = |minutes: i64, author: u64| {
        assert!(sim.advance_clock_to(ts(t0, minutes)));
        sim.post_message(thread.id, author, "…", PostOptions::default())
            .unwrap()
    };
    let first = post(10, staff); // first response after 10 minutes
    post(30, requester); // next-response gap opens
    post(40, sim.config().bot_user_id); // bots count nowhere
    post(45, staff); // gap closes: 15 minutes
    sim.advance_clock_to(ts(t0, 50));
    let tagged = sim.set_solved(thread.id, true).unwrap();
    let solved_tag = g
        .channels
        .iter()
        .find(|c| c.id == forum)
        .unwrap()
        .available_tags
        .iter()
        .find(|t| t.name == "solved")
        .unwrap()
        .id;
    assert_eq!(tagged.thread.unwrap().applied_tags, vec![solved_tag]);
    post(70, requester); // after the tag, which stays: a reopen, and a new gap

    let truth = sim.support_truth_at(ts(t0, 100));
    assert_eq!(truth.conversations.len(), 4, "3 generated tickets + ours");
    let c = truth.get(thread.id).unwrap();
    assert_eq!(
        (c.guild_id, c.forum_id, c.requester_id, c.opened_at),
        (g.id, forum, requester, t0)
    );
    assert_eq!(c.state, ConversationState::WaitingOnStaff);
    assert_eq!(c.first_response_at, Some(ts(t0, 10)));
    assert_eq!(c.first_responder_id, Some(staff));
    assert_eq!(c.first_response_message_id, Some(first.id));
    assert_eq!(c.first_response_ms, Some(10 * 60_000));
    assert!(!c.first_response_deleted);
    let gaps: Vec<(DateTime<Utc>, Option<i64>)> =
        c.next_responses.iter().map(|g| (g.from_at, g.ms)).collect();
    assert_eq!(
        gaps,
        vec![(ts(t0, 30), Some(15 * 60_000)), (ts(t0, 70), None)]
    );
    assert_eq!(c.first_solved_at, Some(ts(t0, 50)));
    assert_eq!(c.last_solved_at, Some(ts(t0, 50)));
    assert_eq!(c.first_resolution_ms, Some(50 * 60_000));
    assert_eq!(c.full_resolution_ms, None, "not solved any more");
    assert_eq!(c.reopen_count, 1);
    assert_eq!(c.human_message_count, 5);
    assert_eq!(c.messages.len(), 6);
    assert_eq!(c.messages[3].side, Side::Bot);
    assert_eq!(c.last_requester_message_at, Some(ts(t0, 70)));
    assert_eq!(c.last_staff_message_at, Some(ts(t0, 45)));
    // NEW 0→10, WAITING_ON_STAFF 30→45 and 70→100.
    assert_eq!(c.requester_wait_ms, (10 + 15 + 30) * 60_000);

    // Later: another customer chimes in (requester side), staff answers, deletes its first
    // answer, and solves again: the tag is removed and re-applied (two THREAD_UPDATEs).
    post(80, other_customer);
    post(90, staff);
    sim.advance_clock_to(ts(t0, 95));
    sim.delete_message(first.id).unwrap();
    sim.advance_clock_to(ts(t0, 96));
    sim.set_solved(thread.id, true).unwrap();
    let resolved = ts(t0, 96) + Duration::seconds(1);

    let c = sim
        .support_truth_at(ts(t0, 120))
        .get(thread.id)
        .cloned()
        .unwrap();
    assert_eq!(c.state, ConversationState::Solved);
    assert_eq!(c.reopen_count, 1);
    assert!(
        c.first_response_deleted,
        "a deleted first response still counts"
    );
    assert_eq!(c.first_response_ms, Some(10 * 60_000));
    let gaps: Vec<Option<i64>> = c.next_responses.iter().map(|g| g.ms).collect();
    assert_eq!(gaps, vec![Some(15 * 60_000), Some(20 * 60_000)]);
    assert_eq!(c.first_solved_at, Some(ts(t0, 50)));
    assert_eq!(c.last_solved_at, Some(resolved));
    assert_eq!(
        c.full_resolution_ms,
        Some((resolved - t0).num_milliseconds())
    );
    let markers: Vec<(DateTime<Utc>, bool)> = c.markers.iter().map(|m| (m.at, m.present)).collect();
    assert_eq!(
        markers,
        vec![(ts(t0, 50), true), (ts(t0, 96), false), (resolved, true)]
    );
    assert_eq!(c.human_message_count, 7);
    assert_eq!(c.messages[6].side, Side::OtherHuman);
    assert_eq!(c.last_requester_message_at, Some(ts(t0, 80)));
    // NEW 0→10, WAITING_ON_STAFF 30→45 and 70→90 (then WAITING_ON_REQUESTER, SOLVED).
    assert_eq!(c.requester_wait_ms, (10 + 15 + 20) * 60_000);
    // An earlier view is unchanged by what happened after it (the deletion at 95).
    let before = sim.support_truth_at(ts(t0, 92));
    let c = before.get(thread.id).unwrap();
    assert!(!c.first_response_deleted);
    assert_eq!(c.state, ConversationState::WaitingOnRequester);
    assert_eq!(c.requester_wait_ms, (10 + 15 + 20) * 60_000);

    // The same truth over the control API.
    let (status, body) = get(&sim, "/_sim/support-truth").await;
    assert_eq!(status, 200);
    let json = body["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["thread_id"].as_str().and_then(|s| s.parse().ok()) == Some(thread.id))
        .unwrap()
        .clone();
    assert_eq!(json["state"], "SOLVED");
    assert_eq!(json["reopen_count"], 1);
    let as_of = ts(t0, 92).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (status, body) = get(&sim, &format!("/_sim/support-truth?as_of={as_of}")).await;
    assert_eq!(status, 200, "{body}");
    let json = body["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["thread_id"].as_str().and_then(|s| s.parse().ok()) == Some(thread.id))
        .unwrap()
        .clone();
    assert_eq!(json["state"], "WAITING_ON_REQUESTER");
    assert_eq!(json["requester_wait_ms"], (10 + 15 + 20) * 60_000);
    sim.shutdown().await;
}

#[tokio::test]
async fn locks_and_tags_already_on_a_post_are_solved_markers() {
    let (sim, s) = sim_with(1).await;
    let g = &s.guilds[0];
    // The generated forum's archived ticket was loaded with the solved tag: dated at its
    // opening, as it has no message.
    let truth = sim.support_truth();
    let loaded = g
        .channels
        .iter()
        .find(|c| {
            c.thread
                .as_ref()
                .is_some_and(|t| t.archived && c.parent_id == Some(forum(g)))
        })
        .unwrap();
    let c = truth.get(loaded.id).unwrap();
    assert_eq!(c.state, ConversationState::Solved);
    assert_eq!(c.first_solved_at, Some(snowflake_time(loaded.id)));

    // A lock solves ("locked means solved" is on by default); unlocking undoes it.
    let requester = with_role(g, "Customer")[0];
    let staff = with_role(g, "Staff")[0];
    let (thread, _) = sim
        .create_forum_post(forum(g), requester, "Refund", "Duplicate charge", vec![])
        .unwrap();
    sim.post_message(thread.id, staff, "Refunded.", PostOptions::default())
        .unwrap();
    let mut locked = thread.clone();
    locked.thread.as_mut().unwrap().locked = true;
    sim.update_thread(locked.clone()).unwrap();
    let lock_time = sim.clock_now();
    let c = sim.support_truth().get(thread.id).cloned().unwrap();
    assert_eq!(c.state, ConversationState::Solved);
    assert_eq!(c.first_solved_at, Some(lock_time));
    // The solved tag on top of the lock sets no new marker.
    sim.set_solved(thread.id, true).unwrap();
    assert_eq!(sim.support_truth().get(thread.id).unwrap().markers.len(), 1);
    let mut open = sim
        .access_truth()
        .guilds
        .iter()
        .flat_map(|g| g.channels.clone())
        .find(|c| c.id == thread.id)
        .unwrap();
    open.thread.as_mut().unwrap().locked = false;
    open.thread.as_mut().unwrap().applied_tags.clear();
    sim.update_thread(open).unwrap();
    let c = sim.support_truth().get(thread.id).cloned().unwrap();
    assert_eq!(c.state, ConversationState::WaitingOnRequester);
    assert_eq!(c.reopen_count, 0, "a marker going is not a reopen");
    assert_eq!(
        c.markers.iter().map(|m| m.present).collect::<Vec<_>>(),
        vec![true, false]
    );
    sim.shutdown().await;
}

async fn support_run(seed: u64, steps: u64) -> (SupportTruth, Vec<observer_sim::MessageState>) {
    let (sim, _) = sim_with(2).await;
    sim.run_support_steps(seed, steps);
    let out = (sim.support_truth(), sim.ground_truth());
    sim.shutdown().await;
    out
}

#[tokio::test]
async fn support_traffic_is_reproducible_from_a_seed() {
    let a = support_run(11, 800).await;
    let b = support_run(11, 800).await;
    assert_eq!(a, b);
    assert!(a.0.conversations.len() > 20, "{}", a.0.conversations.len());
    let c = support_run(12, 800).await;
    assert_ne!(a.0, c.0);
}

fn median(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[tokio::test]
async fn days_of_support_traffic_cover_every_state() {
    let (sim, s) = sim_with(2).await;
    sim.run_support_steps(5, 3_000);
    // Mixed traffic keeps working alongside (and leaves the journal consistent).
    sim.run_traffic_steps(5, 300);
    let truth = sim.support_truth();
    let first_open = truth
        .conversations
        .iter()
        .map(|c| c.opened_at)
        .filter(|t| t.timestamp_millis() >= START_MS)
        .min()
        .unwrap();
    assert!(
        truth.as_of - first_open > Duration::days(3),
        "{} to {}",
        first_open,
        truth.as_of
    );
    let states = truth.count_by_state();
    for st in ["NEW", "WAITING_ON_STAFF", "WAITING_ON_REQUESTER", "SOLVED"] {
        assert!(states.get(st).copied().unwrap_or(0) > 0, "{st}: {states:?}");
    }
    assert!(truth.conversations.iter().any(|c| c.reopen_count > 0));
    assert!(truth
        .conversations
        .iter()
        .any(|c| c.next_responses.iter().any(|g| g.ms.is_some())));
    // Some answers come from a second staff member.
    assert!(truth.conversations.iter().any(|c| {
        let staff: BTreeSet<u64> = c
            .messages
            .iter()
            .filter(|m| m.side == Side::Staff)
            .map(|m| m.author_id)
            .collect();
        staff.len() > 1
    }));

    // Requesters are customers, responders staff; bots are neither.
    let bot = sim.config().bot_user_id;
    let staff_roles: BTreeMap<u64, BTreeSet<u64>> = s
        .guilds
        .iter()
        .map(|g| {
            let roles = ["Staff", "Moderator", "Admin"].map(|r| role_id(g, r));
            let staff = g
                .members
                .iter()
                .filter(|m| m.user_id == g.owner_id || m.roles.iter().any(|r| roles.contains(r)))
                .map(|m| m.user_id)
                .collect();
            (g.id, staff)
        })
        .collect();
    for c in &truth.conversations {
        let staff = &staff_roles[&c.guild_id];
        if c.opened_at.timestamp_millis() >= START_MS {
            assert!(!staff.contains(&c.requester_id) && c.requester_id != bot);
        }
        if let Some(r) = c.first_responder_id {
            assert!(staff.contains(&r), "{r} is not staff");
        }
    }

    // Staff are slower at night and at weekends than in business hours.
    let (mut office, mut off) = (vec![], vec![]);
    for c in &truth.conversations {
        let Some(ms) = c.first_response_ms else {
            continue;
        };
        use chrono::{Datelike, Timelike};
        let t = c.opened_at;
        let weekend = t.weekday().number_from_monday() > 5;
        match (weekend, t.hour()) {
            (false, 9..=16) => office.push(ms),
            (true, _) | (_, 0..=6) | (_, 22..=23) => off.push(ms),
            _ => {}
        }
    }
    assert!(office.len() > 10 && off.len() > 5, "{office:?} {off:?}");
    assert!(
        median(off.clone()) > 3 * median(office.clone()),
        "off-hours {} vs office {}",
        median(off),
        median(office)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn back_dated_history_is_in_the_past_archived_and_listed() {
    let (sim, s) = sim_with(1).await;
    let g = &s.guilds[0];
    let forum = forum(g);
    let now = sim.clock_now();
    let h = sim.generate_support_history(g.id, 14, 3).unwrap();
    assert!(h.threads.len() > 50, "{h:?}");
    assert!(h.archived > 0 && h.archived < h.threads.len(), "{h:?}");
    assert!(h.solved > 0, "{h:?}");
    assert_eq!(sim.clock_now(), now, "history does not move the clock");

    // Ids increase with time and sit in the past.
    let truth = sim.ground_truth();
    let history: BTreeSet<u64> = h.threads.iter().copied().collect();
    let msgs: Vec<_> = truth
        .iter()
        .filter(|m| history.contains(&m.channel_id))
        .collect();
    assert_eq!(msgs.len(), h.messages);
    for m in &msgs {
        assert_eq!(snowflake_time(m.id), m.created_at);
        assert!(m.created_at < now && m.created_at >= now - Duration::days(14));
    }
    assert!(msgs
        .windows(2)
        .all(|w| w[0].id < w[1].id && w[0].created_at <= w[1].created_at));
    for t in &h.threads {
        assert!(
            truth.iter().any(|m| m.id == *t),
            "starter message shares the post id"
        );
    }

    // Archived posts are listed only by the archived-thread route, newest archive first.
    let mut listed = BTreeSet::new();
    let mut before: Option<String> = None;
    loop {
        let mut path = format!("/api/v10/channels/{forum}/threads/archived/public?limit=100");
        if let Some(b) = &before {
            path.push_str(&format!("&before={}", b.replace('+', "%2B")));
        }
        let (status, page) = get(&sim, &path).await;
        assert_eq!(status, 200, "{page}");
        let threads = page["threads"].as_array().unwrap();
        for t in threads {
            listed.insert(t["id"].as_str().unwrap().parse::<u64>().unwrap());
        }
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        before = threads.last().map(|t| {
            t["thread_metadata"]["archive_timestamp"]
                .as_str()
                .unwrap()
                .to_owned()
        });
    }
    let archived_history: BTreeSet<u64> = listed.intersection(&history).copied().collect();
    assert_eq!(archived_history.len(), h.archived);
    let (_, active) = get(&sim, &format!("/api/v10/guilds/{}/threads/active", g.id)).await;
    let active: BTreeSet<u64> = active["threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(archived_history.is_disjoint(&active));
    assert_eq!(
        active.intersection(&history).count(),
        h.threads.len() - h.archived
    );
    // Their messages come back over REST.
    let old = *archived_history.iter().next().unwrap();
    let (status, page) = get(&sim, &format!("/api/v10/channels/{old}/messages")).await;
    assert_eq!(status, 200);
    assert!(!page.as_array().unwrap().is_empty());

    // The truth: solved tags dated at the last message, every state present.
    let st = sim.support_truth();
    let scenario_threads = st.conversations.len() - h.threads.len();
    assert_eq!(scenario_threads, 3);
    let mut states = BTreeSet::new();
    for id in &h.threads {
        let c = st.get(*id).unwrap();
        states.insert(format!("{:?}", c.state));
        assert_eq!(c.reopen_count, 0, "history has no reopens");
        if c.state == ConversationState::Solved {
            let last = c.messages.last().unwrap().at;
            assert_eq!(c.first_solved_at, Some(last));
            assert_eq!(c.markers.len(), 1);
        }
    }
    assert_eq!(states.len(), 4, "{states:?}");

    // Live traffic afterwards gets later ids.
    let max_history = msgs.last().unwrap().id;
    sim.run_support_steps(1, 50);
    assert!(sim
        .ground_truth()
        .iter()
        .filter(|m| !history.contains(&m.channel_id) && m.created_at >= now)
        .all(|m| m.id > max_history));

    // Same seed, same world: same history (here through the control API).
    let (sim2, _) = sim_with(1).await;
    let h2: Value = reqwest::Client::new()
        .post(format!(
            "{}/_sim/guilds/{}/support-history",
            sim2.base_url(),
            g.id
        ))
        .json(&serde_json::json!({"days": 14, "seed": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h2, serde_json::to_value(&h).unwrap());
    assert_eq!(sim2.support_truth(), sim.support_truth_at(now));
    sim.shutdown().await;
    sim2.shutdown().await;
}

#[tokio::test]
async fn support_traffic_runs_on_a_wall_clock() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    sim.load(Scenario::generate(2, GenOptions::default()));
    let started = sim.clock_now();
    // Delays of minutes to days become milliseconds to seconds.
    let h = sim.start_traffic(observer_sim::TrafficOptions {
        rate_per_sec: 200.0,
        seed: 4,
        support_only: true,
        support_speedup: 100_000.0,
        ..Default::default()
    });
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    h.stop();
    let truth = sim.support_truth();
    let live: Vec<_> = truth
        .conversations
        .iter()
        .filter(|c| c.opened_at >= started)
        .collect();
    assert!(live.len() > 5, "{} posts", live.len());
    assert!(live.iter().any(|c| c.first_response_ms.is_some()));
    for c in &live {
        assert!(c.first_response_ms.unwrap_or(0) >= 0);
        assert_eq!(
            c.messages[0].id, c.thread_id,
            "starter message shares the id"
        );
        assert_eq!(c.messages[0].side, Side::Requester);
    }
    sim.shutdown().await;
}
