//! The bot only gets what Discord gives it: its own member's permissions decide which channel
//! events it receives, which channel routes answer, which threads GUILD_CREATE lists, and
//! when THREAD_LIST_SYNC announces a channel it gained.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use observer_sim::{
    perms, Channel, ChannelKind, GenOptions, Overwrite, OverwriteKind, PostOptions, Scenario,
    SimConfig, Simulator,
};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn recv(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

/// The next dispatch (heartbeat ACKs and other opcodes skipped).
async fn dispatch(ws: &mut Ws) -> Value {
    loop {
        let v = recv(ws).await;
        if v["op"] == 0 {
            return v;
        }
    }
}

struct Setup {
    sim: Simulator,
    guild: u64,
    observer_role: u64,
    /// A staff channel the bot may not view.
    hidden: u64,
    /// A staff channel the bot may view.
    seen: u64,
    staff: u64,
}

async fn setup() -> Setup {
    let sim = Simulator::start(SimConfig {
        rate_limit_per_route: 0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let s = Scenario::generate(5, GenOptions::default());
    sim.load(s.clone());
    let g = &s.guilds[0];
    let by_name = |n: &str| g.channels.iter().find(|c| c.name == n).unwrap().id;
    let staff_role = g.roles.iter().find(|r| r.name == "Staff").unwrap().id;
    Setup {
        guild: g.id,
        observer_role: g.roles.iter().find(|r| r.name == "Observer").unwrap().id,
        hidden: by_name("leadership"),
        seen: by_name("staff-chat"),
        staff: g
            .members
            .iter()
            .find(|m| m.roles.contains(&staff_role))
            .unwrap()
            .user_id,
        sim,
    }
}

async fn get(sim: &Simulator, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{}/api/v10{path}", sim.base_url()))
        .header("authorization", "Bot sim-bot-token")
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn missing_access() -> (u16, Value) {
    (403, json!({"code": 50001, "message": "Missing Access"}))
}

#[tokio::test]
async fn channel_routes_answer_403_where_the_bot_cannot_view() {
    let s = setup().await;
    let sim = &s.sim;
    let m = sim
        .post_message(s.hidden, s.staff, "plans", PostOptions::default())
        .unwrap();
    let h = s.hidden;
    for path in [
        format!("/channels/{h}"),
        format!("/channels/{h}/messages"),
        format!("/channels/{h}/messages?after=0&limit=100"),
        format!("/channels/{h}/messages/{}", m.id),
        format!("/channels/{h}/threads/archived/public"),
    ] {
        assert_eq!(get(sim, &path).await, missing_access(), "{path}");
    }
    let post = reqwest::Client::new()
        .post(format!("{}/api/v10/channels/{h}/messages", sim.base_url()))
        .header("authorization", "Bot sim-bot-token")
        .json(&json!({"content": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status().as_u16(), 403);

    // A channel the bot's role is let into answers normally.
    sim.post_message(s.seen, s.staff, "standup", PostOptions::default())
        .unwrap();
    let (status, page) = get(sim, &format!("/channels/{}/messages", s.seen)).await;
    assert_eq!((status, page.as_array().unwrap().len()), (200, 1));

    // VIEW_CHANNEL without READ_MESSAGE_HISTORY: Discord answers an empty page, not an error.
    sim.set_overwrite(
        s.seen,
        Overwrite {
            id: s.observer_role,
            kind: OverwriteKind::Role,
            allow: perms::VIEW_CHANNEL,
            deny: perms::READ_MESSAGE_HISTORY,
        },
    )
    .unwrap();
    sim.set_overwrite(
        s.seen,
        Overwrite {
            id: s.guild,
            kind: OverwriteKind::Role,
            allow: 0,
            deny: perms::VIEW_CHANNEL | perms::READ_MESSAGE_HISTORY,
        },
    )
    .unwrap();
    assert_eq!(
        get(sim, &format!("/channels/{}/messages", s.seen)).await,
        (200, json!([]))
    );
    assert!(!sim.bot_readable_channels().contains(&s.seen));
    assert!(sim.bot_viewable_channels().contains(&s.seen));

    // Voice: VIEW_CHANNEL without CONNECT leaves the chat unreadable: history is refused.
    let voice = sim
        .create_channel(
            s.guild,
            Channel {
                id: 0,
                kind: ChannelKind::Voice,
                name: "locked room".into(),
                parent_id: None,
                position: 9,
                topic: None,
                overwrites: vec![Overwrite {
                    id: s.observer_role,
                    kind: OverwriteKind::Role,
                    allow: 0,
                    deny: perms::CONNECT,
                }],
                thread: None,
                available_tags: vec![],
            },
        )
        .unwrap();
    let (status, _) = get(sim, &format!("/channels/{}", voice.id)).await;
    assert_eq!(status, 200, "the channel itself is viewable");
    assert_eq!(
        get(sim, &format!("/channels/{}/messages", voice.id)).await,
        missing_access()
    );
    assert!(!sim.bot_readable_channels().contains(&voice.id));
    sim.shutdown().await;
}

#[tokio::test]
async fn gateway_sends_only_viewable_channels_events_and_syncs_threads_on_gain() {
    let s = setup().await;
    let sim = &s.sim;
    // A thread under the hidden channel, created before the bot connects.
    let hidden_thread = sim
        .create_thread(s.hidden, "quarterly plan", s.staff, false)
        .unwrap();

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}?v=10", sim.gateway_url()))
        .await
        .unwrap();
    assert_eq!(recv(&mut ws).await["op"], 10);
    ws.send(Message::Text(
        json!({"op": 2, "d": {"token": "Bot sim-bot-token", "intents": 33283,
               "properties": {"os": "linux", "browser": "t", "device": "t"}}})
        .to_string()
        .into(),
    ))
    .await
    .unwrap();
    assert_eq!(dispatch(&mut ws).await["t"], "READY");
    let (guild_id, thread_id) = (s.guild.to_string(), hidden_thread.id.to_string());
    for _ in 0..3 {
        let g = dispatch(&mut ws).await;
        assert_eq!(g["t"], "GUILD_CREATE");
        if g["d"]["id"].as_str() == Some(guild_id.as_str()) {
            let channels: Vec<&str> = g["d"]["channels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap())
                .collect();
            assert!(
                channels.contains(&s.hidden.to_string().as_str()),
                "every channel is listed"
            );
            let threads = g["d"]["threads"].as_array().unwrap();
            assert!(!threads.is_empty());
            assert!(
                threads
                    .iter()
                    .all(|t| t["id"].as_str() != Some(thread_id.as_str())),
                "threads the bot cannot view are not"
            );
        }
    }

    // Messages (and their edits and deletions) in the hidden channel are not sent.
    let m = sim
        .post_message(s.hidden, s.staff, "secret", PostOptions::default())
        .unwrap();
    sim.edit_message(m.id, "secret v2").unwrap();
    sim.delete_message(m.id).unwrap();
    sim.post_message(
        hidden_thread.id,
        s.staff,
        "in thread",
        PostOptions::default(),
    )
    .unwrap();
    sim.add_thread_member(hidden_thread.id, s.staff).unwrap();
    // A voice channel the bot may view but not join: its chat is not sent either.
    let locked = sim
        .create_channel(
            s.guild,
            Channel {
                id: 0,
                kind: ChannelKind::Voice,
                name: "locked room".into(),
                parent_id: None,
                position: 9,
                topic: None,
                overwrites: vec![Overwrite {
                    id: s.observer_role,
                    kind: OverwriteKind::Role,
                    allow: 0,
                    deny: perms::CONNECT,
                }],
                thread: None,
                available_tags: vec![],
            },
        )
        .unwrap();
    assert_eq!(dispatch(&mut ws).await["t"], "CHANNEL_CREATE");
    assert!(sim.bot_viewable_channels().contains(&locked.id));
    sim.post_message(locked.id, s.staff, "voice chat", PostOptions::default())
        .unwrap();
    let seen = sim
        .post_message(s.seen, s.staff, "visible", PostOptions::default())
        .unwrap();
    let d = dispatch(&mut ws).await;
    assert_eq!(
        (d["t"].as_str(), d["d"]["id"].as_str()),
        (Some("MESSAGE_CREATE"), Some(seen.id.to_string().as_str()))
    );

    // Letting the bot's role in: CHANNEL_UPDATE, then THREAD_LIST_SYNC for that channel.
    sim.set_overwrite(
        s.hidden,
        Overwrite {
            id: s.observer_role,
            kind: OverwriteKind::Role,
            allow: perms::VIEW_CHANNEL,
            deny: 0,
        },
    )
    .unwrap();
    assert_eq!(dispatch(&mut ws).await["t"], "CHANNEL_UPDATE");
    let sync = dispatch(&mut ws).await;
    assert_eq!(sync["t"], "THREAD_LIST_SYNC");
    assert_eq!(sync["d"]["guild_id"], s.guild.to_string());
    assert_eq!(sync["d"]["channel_ids"], json!([s.hidden.to_string()]));
    let threads: Vec<&str> = sync["d"]["threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(threads, vec![hidden_thread.id.to_string().as_str()]);
    assert_eq!(
        sync["d"]["members"],
        json!([]),
        "only the bot's own memberships"
    );

    let now_seen = sim
        .post_message(s.hidden, s.staff, "now visible", PostOptions::default())
        .unwrap();
    let d = dispatch(&mut ws).await;
    assert_eq!(d["d"]["id"], now_seen.id.to_string());

    // Losing access sends nothing but the CHANNEL_UPDATE.
    sim.remove_overwrite(s.hidden, s.observer_role).unwrap();
    assert_eq!(dispatch(&mut ws).await["t"], "CHANNEL_UPDATE");
    sim.post_message(s.hidden, s.staff, "hidden again", PostOptions::default())
        .unwrap();
    let marker = sim
        .post_message(s.seen, s.staff, "marker", PostOptions::default())
        .unwrap();
    let d = dispatch(&mut ws).await;
    assert_eq!(d["d"]["id"], marker.id.to_string());

    // A role change can grant access too: the bot's role gets ADMINISTRATOR.
    let observer = sim
        .access_truth()
        .guilds
        .iter()
        .find(|g| g.id == s.guild)
        .unwrap()
        .roles
        .iter()
        .find(|r| r.id == s.observer_role)
        .unwrap()
        .clone();
    sim.set_role_permissions(
        s.guild,
        observer.id,
        observer.permissions | perms::ADMINISTRATOR,
    )
    .unwrap();
    assert_eq!(dispatch(&mut ws).await["t"], "GUILD_ROLE_UPDATE");
    let sync = dispatch(&mut ws).await;
    assert_eq!(sync["t"], "THREAD_LIST_SYNC");
    let ids = sync["d"]["channel_ids"].as_array().unwrap();
    assert!(ids.contains(&json!(s.hidden.to_string())), "{ids:?}");
    assert!(
        !ids.contains(&json!(s.seen.to_string())),
        "already visible: {ids:?}"
    );
    sim.shutdown().await;
}
