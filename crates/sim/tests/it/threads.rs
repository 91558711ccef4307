//! Thread membership and archived threads, as stingy as Discord: GUILD_CREATE names no member
//! but the bot, `thread-members` lists the rest (GUILD_MEMBERS intent, v10 paging), archived
//! threads page by archive time.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use observer_sim::{GenOptions, Scenario, SimConfig, Simulator, PRIVILEGED_INTENTS};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

struct Fixture {
    sim: Simulator,
    guild: u64,
    parent: u64,
    users: Vec<u64>,
}

/// One guild; a private thread with five members (not the bot) and one the bot joined.
async fn fixture(config: SimConfig) -> (Fixture, u64, u64) {
    let sim = Simulator::start(config).await.unwrap();
    let s = Scenario::generate(
        1,
        GenOptions {
            guilds: 1,
            ..GenOptions::default()
        },
    );
    sim.load(s.clone());
    let g = &s.guilds[0];
    let parent = g
        .channels
        .iter()
        .find(|c| c.name == "general-help")
        .unwrap()
        .id;
    let mut users: Vec<u64> = g.members.iter().map(|m| m.user_id).collect();
    users.sort_unstable();
    let t = sim.create_thread(parent, "secret", users[0], true).unwrap();
    for u in &users[1..5] {
        sim.add_thread_member(t.id, *u).unwrap();
    }
    let joined = sim
        .create_thread(parent, "with bot", users[0], true)
        .unwrap();
    sim.add_thread_member(joined.id, sim.config().bot_user_id)
        .unwrap();
    let f = Fixture {
        sim,
        guild: g.id,
        parent,
        users,
    };
    (f, t.id, joined.id)
}

async fn get(sim: &Simulator, path: &str) -> (u16, Value) {
    let res = reqwest::Client::new()
        .get(format!("{}/api/v10{path}", sim.base_url()))
        .header("authorization", format!("Bot {}", sim.config().bot_token))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

fn user_ids(list: &Value) -> Vec<u64> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|m| m["user_id"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn guild_create_names_only_the_bot() {
    let (f, secret, joined) = fixture(SimConfig::default()).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}?v=10", f.sim.gateway_url()))
        .await
        .unwrap();
    let identify = json!({"op": 2, "d": {"token": "Bot sim-bot-token", "intents": 33283,
        "properties": {"os": "linux", "browser": "test", "device": "test"}}});
    ws.send(Message::Text(identify.to_string().into()))
        .await
        .unwrap();
    let guild = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["t"] == "GUILD_CREATE" {
                break v["d"].clone();
            }
        }
    };
    assert_eq!(guild["id"], f.guild.to_string());
    let members = guild["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "only the bot without GUILD_PRESENCES");
    assert_eq!(
        members[0]["user"]["id"],
        f.sim.config().bot_user_id.to_string()
    );
    // The real count is standard (and says nothing about who).
    assert_eq!(guild["member_count"], json!(f.users.len() + 1));
    let threads = guild["threads"].as_array().unwrap();
    let by_id = |id: u64| {
        let id = id.to_string();
        threads
            .iter()
            .find(|t| t["id"].as_str() == Some(id.as_str()))
            .unwrap()
            .clone()
    };
    let secret = by_id(secret);
    assert!(secret.get("member").is_none(), "the bot is not a member");
    assert!(secret["member_count"].as_u64().unwrap() == 5);
    let joined = by_id(joined);
    let own = &joined["member"];
    assert!(own["join_timestamp"].is_string());
    assert!(
        own.get("user_id").is_none() && own.get("id").is_none(),
        "GUILD_CREATE omits id and user_id of the bot's own thread member"
    );
    // No thread object carries anything naming members.
    for t in threads {
        let text = t.to_string();
        for u in &f.users {
            let u = u.to_string();
            if t["owner_id"].as_str() != Some(u.as_str()) {
                assert!(!text.contains(&u), "{t}");
            }
        }
    }
    f.sim.shutdown().await;
}

#[tokio::test]
async fn thread_members_list_like_discord_v10() {
    let (f, secret, _) = fixture(SimConfig::default()).await;
    let sim = &f.sim;
    let expect: Vec<u64> = f.users[..5].to_vec();

    // Without with_member: everyone, ascending, whatever `limit` says (v10 pages only with it).
    let (status, all) = get(sim, &format!("/channels/{secret}/thread-members?limit=2")).await;
    assert_eq!(status, 200);
    assert_eq!(user_ids(&all), expect);
    assert!(all[0].get("member").is_none());
    assert_eq!(all[0]["id"], secret.to_string());
    assert!(all[0]["join_timestamp"].is_string() && all[0]["flags"] == 0);

    // With with_member: pages of `limit` after `after`, each with its guild member.
    let mut seen: Vec<u64> = Vec::new();
    let mut after = 0u64;
    loop {
        let (status, page) = get(
            sim,
            &format!("/channels/{secret}/thread-members?with_member=true&limit=2&after={after}"),
        )
        .await;
        assert_eq!(status, 200);
        let ids = user_ids(&page);
        for m in page.as_array().unwrap() {
            assert_eq!(m["member"]["user"]["id"], m["user_id"]);
        }
        seen.extend(&ids);
        if ids.len() < 2 {
            break;
        }
        after = *ids.last().unwrap();
    }
    assert_eq!(seen, expect);
    let (_, default_limit) = get(
        sim,
        &format!("/channels/{secret}/thread-members?with_member=true"),
    )
    .await;
    assert_eq!(user_ids(&default_limit), expect);

    // One member; not a member; bad requests.
    let (status, one) = get(
        sim,
        &format!(
            "/channels/{secret}/thread-members/{}?with_member=true",
            expect[1]
        ),
    )
    .await;
    assert_eq!(
        (status, one["user_id"].clone()),
        (200, json!(expect[1].to_string()))
    );
    assert!(one["member"]["roles"].is_array());
    let outsider = f.users[6];
    let (status, err) = get(
        sim,
        &format!("/channels/{secret}/thread-members/{outsider}"),
    )
    .await;
    assert_eq!((status, err["code"].clone()), (404, json!(10007)));
    let (status, err) = get(sim, "/channels/12345/thread-members").await;
    assert_eq!((status, err["code"].clone()), (404, json!(10003)));
    let (status, err) = get(sim, &format!("/channels/{}/thread-members", f.parent)).await;
    assert_eq!((status, err["code"].clone()), (400, json!(50024)));
    for bad in ["limit=0", "limit=101", "with_member=maybe", "after=x"] {
        let (status, _) = get(sim, &format!("/channels/{secret}/thread-members?{bad}")).await;
        assert_eq!(status, 400, "{bad}");
    }

    // Leaving the guild leaves its threads.
    sim.remove_member(f.guild, expect[2]).unwrap();
    let (_, all) = get(sim, &format!("/channels/{secret}/thread-members")).await;
    assert!(!user_ids(&all).contains(&expect[2]));
    f.sim.shutdown().await;
}

#[tokio::test]
async fn member_listings_need_the_guild_members_intent() {
    let config = SimConfig {
        privileged_intents: PRIVILEGED_INTENTS & !(1 << 1),
        ..SimConfig::default()
    };
    let (f, secret, _) = fixture(config).await;
    for path in [
        format!("/channels/{secret}/thread-members"),
        format!("/channels/{secret}/thread-members/{}", f.users[0]),
        format!("/guilds/{}/members?limit=1000", f.guild),
    ] {
        let (status, err) = get(&f.sim, &path).await;
        assert_eq!((status, err["code"].clone()), (403, json!(50001)), "{path}");
    }
    f.sim.shutdown().await;
}

#[tokio::test]
async fn archived_threads_page_by_archive_time() {
    let config = SimConfig {
        // Virtual time: one second per reading, so archive times are distinct and ordered.
        virtual_clock_start_ms: Some(1_780_000_000_000),
        ..SimConfig::default()
    };
    let (f, _, joined) = fixture(config).await;
    let sim = &f.sim;
    let mut archived = Vec::new();
    for i in 0..5 {
        let t = sim
            .create_thread(f.parent, format!("old {i}"), f.users[1], true)
            .unwrap();
        archived.push(t.id);
    }
    // Archive them newest-id first, so archive order is not id order.
    archived.reverse();
    let mut ids_by_archive = Vec::new();
    for id in archived.iter().copied().chain([joined]) {
        let mut t = sim
            .access_truth()
            .guilds
            .iter()
            .flat_map(|g| g.channels.clone())
            .find(|c| c.id == id)
            .unwrap();
        t.thread.as_mut().unwrap().archived = true;
        let t = sim.update_thread(t).unwrap();
        assert!(t.thread.unwrap().archive_timestamp.is_some());
        ids_by_archive.push(id);
    }
    let public = sim
        .create_thread(f.parent, "public", f.users[1], false)
        .unwrap();
    let mut p = public.clone();
    p.thread.as_mut().unwrap().archived = true;
    sim.update_thread(p).unwrap();

    // Newest archive first, two at a time, `before` = the last one's archive_timestamp.
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = format!("/channels/{}/threads/archived/private?limit=2", f.parent);
        if let Some(b) = &before {
            path.push_str(&format!("&before={}", b.replace('+', "%2B")));
        }
        let (status, page) = get(sim, &path).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        let threads = page["threads"].as_array().unwrap();
        for t in threads {
            assert_eq!(t["type"], 12);
            assert_eq!(t["thread_metadata"]["archived"], true);
            seen.push(t["id"].as_str().unwrap().parse::<u64>().unwrap());
        }
        // `members` holds only the bot's own memberships among these threads.
        for m in page["members"].as_array().unwrap() {
            assert_eq!(m["user_id"], sim.config().bot_user_id.to_string());
            assert_eq!(m["id"], joined.to_string());
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
    ids_by_archive.reverse();
    assert_eq!(seen, ids_by_archive, "newest archive first, each once");
    assert_eq!(pages, 3);
    let (_, public_page) = get(
        sim,
        &format!("/channels/{}/threads/archived/public", f.parent),
    )
    .await;
    assert_eq!(public_page["threads"][0]["id"], public.id.to_string());
    assert_eq!(public_page["has_more"], false);
    for bad in ["limit=1", "limit=101", "before=yesterday"] {
        let (status, _) = get(
            sim,
            &format!("/channels/{}/threads/archived/private?{bad}", f.parent),
        )
        .await;
        assert_eq!(status, 400, "{bad}");
    }

    // Listing needs READ_MESSAGE_HISTORY, and MANAGE_THREADS for private threads.
    let bot = sim.config().bot_user_id;
    let deny = |perms: u64| observer_sim::Overwrite {
        id: bot,
        kind: observer_sim::OverwriteKind::Member,
        allow: 0,
        deny: perms,
    };
    sim.set_overwrite(f.parent, deny(observer_sim::perms::MANAGE_THREADS))
        .unwrap();
    let private = format!("/channels/{}/threads/archived/private", f.parent);
    let public = format!("/channels/{}/threads/archived/public", f.parent);
    let (status, body) = get(sim, &private).await;
    assert_eq!(
        (status, body["code"].clone()),
        (403, 50013.into()),
        "{body}"
    );
    assert_eq!(get(sim, &public).await.0, 200);
    sim.set_overwrite(f.parent, deny(observer_sim::perms::READ_MESSAGE_HISTORY))
        .unwrap();
    let (status, body) = get(sim, &public).await;
    assert_eq!(
        (status, body["code"].clone()),
        (403, 50013.into()),
        "{body}"
    );
    f.sim.shutdown().await;
}
