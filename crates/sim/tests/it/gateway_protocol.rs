//! The gateway protocol at the frame level, with a raw WebSocket client: sequence numbers,
//! deterministic RESUME replay, and the close codes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use observer_sim::{GenOptions, PostOptions, Scenario, SimConfig, Simulator};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(sim: &Simulator) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}?v=10", sim.gateway_url()))
        .await
        .unwrap();
    let hello = recv(&mut ws).await;
    assert_eq!(hello["op"], 10);
    assert!(hello["d"]["heartbeat_interval"].as_u64().unwrap() > 0);
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

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

/// The close code the server ends the connection with.
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(Some(f)))) => return f.code.into(),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

fn identify(token: &str, intents: u64) -> Value {
    json!({"op": 2, "d": {"token": token, "intents": intents, "properties": {"os": "linux", "browser": "test", "device": "test"}}})
}

async fn setup() -> (Simulator, u64, u64) {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let s = Scenario::generate(2, GenOptions::default());
    sim.load(s.clone());
    let g = &s.guilds[0];
    (
        sim,
        g.channels
            .iter()
            .find(|c| c.name == "general-help")
            .unwrap()
            .id,
        g.members[0].user_id,
    )
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_dispatches_then_resumed() {
    let (sim, ch, author) = setup().await;
    let mut ws = open(&sim).await;
    send(&mut ws, identify("Bot sim-bot-token", 33283)).await;
    let ready = recv(&mut ws).await;
    assert_eq!(
        (ready["t"].as_str(), ready["s"].as_u64()),
        (Some("READY"), Some(1))
    );
    let session = ready["d"]["session_id"].as_str().unwrap().to_string();
    let mut seq = 1;
    for _ in 0..3 {
        let g = recv(&mut ws).await;
        assert_eq!(g["t"], "GUILD_CREATE");
        seq += 1;
        assert_eq!(g["s"], seq);
    }
    send(&mut ws, json!({"op": 1, "d": seq})).await;
    assert_eq!(recv(&mut ws).await["op"], 11);
    let m = sim
        .post_message(ch, author, "live", PostOptions::default())
        .unwrap();
    let live = recv(&mut ws).await;
    seq += 1;
    assert_eq!(
        (live["t"].as_str(), live["s"].as_u64()),
        (Some("MESSAGE_CREATE"), Some(seq))
    );
    assert_eq!(live["d"]["id"], m.id.to_string());
    assert_eq!(live["d"]["guild_id"], m.guild_id.to_string());
    assert!(live["d"]["member"]["roles"].is_array() && live["d"]["member"].get("user").is_none());

    // Lose the socket without a close frame; the session stays resumable.
    drop(ws);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.session_counts() != (1, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "socket loss noticed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut missed = vec![];
    for i in 0..5 {
        missed.push(
            sim.post_message(ch, author, format!("missed {i}"), PostOptions::default())
                .unwrap()
                .id
                .to_string(),
        );
    }
    sim.edit_message(m.id, "edited while away").unwrap();

    let mut ws = open(&sim).await;
    send(
        &mut ws,
        json!({"op": 6, "d": {"token": "Bot sim-bot-token", "session_id": session, "seq": seq}}),
    )
    .await;
    for id in &missed {
        let d = recv(&mut ws).await;
        seq += 1;
        assert_eq!(
            (d["t"].as_str(), d["s"].as_u64()),
            (Some("MESSAGE_CREATE"), Some(seq))
        );
        assert_eq!(&d["d"]["id"], id);
    }
    let d = recv(&mut ws).await;
    seq += 1;
    assert_eq!(
        (d["t"].as_str(), d["s"].as_u64()),
        (Some("MESSAGE_UPDATE"), Some(seq))
    );
    let resumed = recv(&mut ws).await;
    seq += 1;
    assert_eq!(resumed, json!({"op": 0, "s": seq, "t": "RESUMED", "d": {}}));
    assert_eq!(sim.replayed_dispatches(), 6);
    let next = sim
        .post_message(ch, author, "after", PostOptions::default())
        .unwrap();
    let d = recv(&mut ws).await;
    assert_eq!(
        (d["s"].as_u64(), d["d"]["id"].as_str()),
        (Some(seq + 1), Some(next.id.to_string().as_str()))
    );

    // Resuming from an older sequence replays from there again (the client decides).
    drop(ws);
    let mut ws = open(&sim).await;
    send(
        &mut ws,
        json!({"op": 6, "d": {"token": "sim-bot-token", "session_id": session, "seq": seq}}),
    )
    .await;
    let d = recv(&mut ws).await;
    assert_eq!(d["s"].as_u64(), Some(seq + 1));
    assert_eq!(recv(&mut ws).await["t"], "RESUMED");

    // A sequence from the future is invalid (4007); an unknown session gets op 9 false.
    let mut bad = open(&sim).await;
    send(
        &mut bad,
        json!({"op": 6, "d": {"token": "sim-bot-token", "session_id": session, "seq": 10_000}}),
    )
    .await;
    assert_eq!(close_code(&mut bad).await, 4007);
    let mut bad = open(&sim).await;
    send(
        &mut bad,
        json!({"op": 6, "d": {"token": "sim-bot-token", "session_id": "nope", "seq": 1}}),
    )
    .await;
    assert_eq!(
        recv(&mut bad).await,
        json!({"op": 9, "d": false, "s": null, "t": null})
    );

    // op 9 false via the fault forgets the session; a later resume is refused the same way.
    sim.invalidate_sessions(false);
    assert_eq!(recv(&mut ws).await["op"], 9);
    drop(ws);
    let mut ws = open(&sim).await;
    send(
        &mut ws,
        json!({"op": 6, "d": {"token": "sim-bot-token", "session_id": session, "seq": seq}}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["d"], false);
    sim.shutdown().await;
}

#[tokio::test]
async fn close_codes_for_bad_clients() {
    let (sim, _, _) = setup().await;
    let cases: Vec<(Value, u16)> = vec![
        (identify("Bot wrong", 513), 4004),
        (identify("sim-bot-token", 1 << 30), 4013),
        (json!({"op": 8, "d": {"guild_id": "1", "limit": 0}}), 4003),
        (json!({"op": 99, "d": null}), 4001),
        (
            json!({"op": 2, "d": {"token": "sim-bot-token", "intents": 513, "shard": [2, 2]}}),
            4010,
        ),
    ];
    for (payload, code) in cases {
        let mut ws = open(&sim).await;
        send(&mut ws, payload.clone()).await;
        assert_eq!(close_code(&mut ws).await, code, "{payload}");
    }
    let mut ws = open(&sim).await;
    ws.send(Message::Text("not json".into())).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 4002);

    let mut ws = open(&sim).await;
    send(&mut ws, identify("sim-bot-token", 513)).await;
    assert_eq!(recv(&mut ws).await["t"], "READY");
    send(&mut ws, identify("sim-bot-token", 513)).await;
    assert_eq!(close_code(&mut ws).await, 4005);

    let strict = Simulator::start(SimConfig {
        privileged_intents: 0,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let mut ws = open(&strict).await;
    send(&mut ws, identify("sim-bot-token", 33283)).await;
    assert_eq!(close_code(&mut ws).await, 4014);
    strict.shutdown().await;

    // The close fault sends the chosen code to connected sessions.
    let mut ws = open(&sim).await;
    send(&mut ws, identify("sim-bot-token", 513)).await;
    assert_eq!(recv(&mut ws).await["t"], "READY");
    sim.close_with(4009);
    assert_eq!(close_code(&mut ws).await, 4009);
    sim.shutdown().await;
}

#[tokio::test]
async fn intents_filter_events_and_shards_filter_guilds() {
    let (sim, ch, author) = setup().await;
    let guild_of_ch = sim.access_truth().guilds[0].id;
    // GUILDS only: no MESSAGE_CREATE; GUILD_MEMBERS-less: no member events.
    let mut ws = open(&sim).await;
    send(&mut ws, identify("sim-bot-token", 1)).await;
    let ready = recv(&mut ws).await;
    assert_eq!(ready["t"], "READY");
    for _ in 0..3 {
        assert_eq!(recv(&mut ws).await["t"], "GUILD_CREATE");
    }
    sim.post_message(ch, author, "not for you", PostOptions::default())
        .unwrap();
    sim.set_role_permissions(guild_of_ch, guild_of_ch, 0)
        .unwrap();
    let d = recv(&mut ws).await;
    assert_eq!(d["t"], "GUILD_ROLE_UPDATE", "the message was filtered out");
    assert_eq!(d["s"], 5);

    // GUILD_MESSAGES without MESSAGE_CONTENT: message events arrive with empty content.
    let mut no_content = open(&sim).await;
    send(&mut no_content, identify("sim-bot-token", 513)).await;
    for _ in 0..4 {
        recv(&mut no_content).await;
    }
    sim.post_message(ch, author, "secret text", PostOptions::default())
        .unwrap();
    let d = recv(&mut no_content).await;
    assert_eq!(
        (d["t"].as_str(), d["d"]["content"].as_str()),
        (Some("MESSAGE_CREATE"), Some(""))
    );
    sim.set_role_permissions(guild_of_ch, guild_of_ch, 1024)
        .unwrap();
    assert_eq!(
        recv(&mut ws).await["t"],
        "GUILD_ROLE_UPDATE",
        "GUILDS-only session still sees no messages"
    );

    let mut sharded = open(&sim).await;
    send(
        &mut sharded,
        json!({"op": 2, "d": {"token": "sim-bot-token", "intents": 513, "shard": [1, 3]}}),
    )
    .await;
    let ready = recv(&mut sharded).await;
    let expect: Vec<String> = sim
        .access_truth()
        .guilds
        .iter()
        .filter(|g| (g.id >> 22) % 3 == 1)
        .map(|g| g.id.to_string())
        .collect();
    let got: Vec<String> = ready["d"]["guilds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, expect);
    assert_eq!(ready["d"]["shard"], json!([1, 3]));
    sim.shutdown().await;
}
