//! REST through serenity's own HTTP client (proxy mode) and raw reqwest: history paging, guild
//! objects, rate limits, and the `/_sim/` control API.
#![allow(clippy::unwrap_used)]

use crate::common::http_for;
use observer_sim::{GenOptions, PostOptions, Scenario, SimConfig, Simulator};
use serde_json::{json, Value};
use serenity::all::{ChannelId, GetMessages, GuildId, MessageId};

async fn sim_with(config: SimConfig) -> (Simulator, Scenario) {
    let sim = Simulator::start(config).await.unwrap();
    let s = Scenario::generate(3, GenOptions::default());
    sim.load(s.clone());
    (sim, s)
}

fn general(s: &Scenario) -> (u64, u64) {
    let g = &s.guilds[0];
    let ch = g
        .channels
        .iter()
        .find(|c| c.name == "general-help")
        .unwrap()
        .id;
    (ch, g.members[0].user_id)
}

#[tokio::test]
async fn history_pages_like_discord_through_serenity() {
    let (sim, s) = sim_with(SimConfig {
        rate_limit_per_route: 0,
        ..SimConfig::default()
    })
    .await;
    let (ch, author) = general(&s);
    let mut ids = vec![];
    for i in 0..250 {
        ids.push(
            sim.post_message(ch, author, format!("m{i}"), PostOptions::default())
                .unwrap()
                .id,
        );
    }
    sim.delete_message(ids[10]).unwrap();
    let live: Vec<u64> = ids.iter().copied().filter(|i| *i != ids[10]).collect();
    let http = http_for(&sim);
    let channel = ChannelId::new(ch);

    // Forward backfill: `after` pages come newest first; the next cursor is the first element.
    let mut cursor = 1u64;
    let mut got = vec![];
    loop {
        let page = channel
            .messages(
                &http,
                GetMessages::new().after(MessageId::new(cursor)).limit(100),
            )
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.windows(2).all(|w| w[0].id > w[1].id), "newest first");
        cursor = page[0].id.get();
        got.extend(page.iter().rev().map(|m| m.id.get()));
    }
    assert_eq!(got, live);

    // Backward paging with `before`.
    let page = channel
        .messages(
            &http,
            GetMessages::new().before(MessageId::new(ids[100])).limit(5),
        )
        .await
        .unwrap();
    let want: Vec<u64> = ids[95..100].iter().rev().copied().collect();
    assert_eq!(page.iter().map(|m| m.id.get()).collect::<Vec<_>>(), want);

    // Default: the latest 50.
    let page = channel.messages(&http, GetMessages::new()).await.unwrap();
    assert_eq!(page.len(), 50);
    assert_eq!(page[0].id.get(), ids[249]);
    assert_eq!(page[0].content, "m249");

    // around: the cursor is included, neighbours on both sides.
    let page = channel
        .messages(
            &http,
            GetMessages::new().around(MessageId::new(ids[50])).limit(5),
        )
        .await
        .unwrap();
    let got: Vec<u64> = page.iter().map(|m| m.id.get()).collect();
    assert!(
        got.contains(&ids[50]) && got.contains(&ids[49]) && got.contains(&ids[51]),
        "{got:?}"
    );

    // Guild objects parse into serenity's types.
    let g = GuildId::new(s.guilds[0].id);
    assert_eq!(
        g.channels(&http).await.unwrap().len(),
        s.guilds[0]
            .channels
            .iter()
            .filter(|c| !c.kind.is_thread())
            .count()
    );
    assert_eq!(g.roles(&http).await.unwrap().len(), s.guilds[0].roles.len());
    let members = g.members(&http, Some(1000), None).await.unwrap();
    // The bot is a member of its guilds too (the scenario does not list it).
    assert_eq!(members.len(), s.guilds[0].members.len() + 1);
    let first_two = g.members(&http, Some(2), None).await.unwrap();
    let next = g
        .members(&http, Some(2), Some(first_two[1].user.id))
        .await
        .unwrap();
    assert!(
        next[0].user.id > first_two[1].user.id,
        "members page by ascending user id"
    );
    let active = g.get_active_threads(&http).await.unwrap();
    assert!(!active.threads.is_empty());
    let me = http.get_current_user().await.unwrap();
    assert_eq!(me.id.get(), sim.config().bot_user_id);
    let posted = channel.say(&http, "from the bot").await.unwrap();
    assert_eq!(
        sim.message(posted.id.get()).unwrap().author_id,
        sim.config().bot_user_id
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn rest_requires_the_bot_token() {
    let (sim, s) = sim_with(SimConfig::default()).await;
    let (ch, _) = general(&s);
    let client = reqwest::Client::new();
    let url = format!(
        "{}/api/v10/channels/{ch}/messages?&limit=10",
        sim.base_url()
    );
    let res = client.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let res = client
        .get(&url)
        .header("authorization", "Bot wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = client
        .get(&url)
        .header("authorization", "Bot sim-bot-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = client
        .get(format!(
            "{}/api/v10/channels/{ch}/messages?limit=101",
            sim.base_url()
        ))
        .header("authorization", "Bot sim-bot-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = client
        .get(format!("{}/api/v10/channels/1/messages", sim.base_url()))
        .header("authorization", "Bot sim-bot-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.json::<Value>().await.unwrap()["code"], 10003);
    sim.shutdown().await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_discord_headers_and_body() {
    let (sim, s) = sim_with(SimConfig {
        rate_limit_per_route: 3,
        rate_limit_window_ms: 60_000,
        burst_retry_after_ms: 1500,
        ..SimConfig::default()
    })
    .await;
    let (ch, _) = general(&s);
    let other = s.guilds[0]
        .channels
        .iter()
        .find(|c| c.name == "billing")
        .unwrap()
        .id;
    let client = reqwest::Client::new();
    let get = |c: u64| {
        client
            .get(format!(
                "{}/api/v10/channels/{c}/messages?&limit=1",
                sim.base_url()
            ))
            .header("authorization", "Bot sim-bot-token")
            .send()
    };

    // The burst fault comes first, whatever the bucket state.
    sim.rate_limit_burst(2);
    for _ in 0..2 {
        let res = get(ch).await.unwrap();
        assert_eq!(res.status(), 429);
        let h = res.headers().clone();
        assert_eq!(h["retry-after"], "2");
        assert!(h.contains_key("x-ratelimit-bucket"));
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-scope"], "user");
        assert!(!h.contains_key("x-ratelimit-global"));
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["retry_after"], json!(1.5));
        assert_eq!(body["global"], json!(false));
        assert!(body["message"].as_str().unwrap().contains("rate limited"));
    }

    // Per-route buckets: 3 per window for this channel; another channel has its own bucket.
    let mut remaining = vec![];
    for _ in 0..3 {
        let res = get(ch).await.unwrap();
        assert_eq!(res.status(), 200);
        let h = res.headers();
        assert_eq!(h["x-ratelimit-limit"], "3");
        assert!(
            h["x-ratelimit-reset"]
                .to_str()
                .unwrap()
                .parse::<f64>()
                .unwrap()
                > 1.7e9
        );
        assert!(
            h["x-ratelimit-reset-after"]
                .to_str()
                .unwrap()
                .parse::<f64>()
                .unwrap()
                > 0.0
        );
        remaining.push(h["x-ratelimit-remaining"].to_str().unwrap().to_string());
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let res = get(ch).await.unwrap();
    assert_eq!(res.status(), 429);
    let body: Value = res.json().await.unwrap();
    assert!(body["retry_after"].as_f64().unwrap() > 0.0);
    assert_eq!(get(other).await.unwrap().status(), 200);

    // serenity in proxy mode surfaces the 429 to the caller.
    sim.rate_limit_burst(1);
    let err = ChannelId::new(other)
        .messages(&http_for(&sim), GetMessages::new())
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("429"), "{err:?}");

    // Gateway discovery is never rate limited (serenity would fall back to the real Discord).
    sim.rate_limit_burst(5);
    let res = client
        .get(format!("{}/api/v10/gateway", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["url"], sim.gateway_url());
    sim.shutdown().await;
}

#[tokio::test]
async fn control_api_drives_the_simulator_over_http() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let c = reqwest::Client::new();
    let base = sim.base_url();
    let s: Value = c.post(format!("{base}/_sim/scenario/generate")).json(&json!({"seed": 9, "guilds": 2, "users": 12, "staff_per_guild": 2, "tickets_per_guild": 2}))
        .send().await.unwrap().json().await.unwrap();
    assert_eq!(s["guilds"].as_array().unwrap().len(), 2);
    let g = &s["guilds"][0];
    let ch = g["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "general-help")
        .unwrap()["id"]
        .clone();
    let author = g["members"][0]["user_id"].clone();
    let m: Value = c
        .post(format!("{base}/_sim/messages"))
        .json(&json!({"channel_id": ch, "author_id": author, "content": "hi"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = m["id"].as_str().unwrap().to_string();
    let res = c
        .patch(format!("{base}/_sim/messages/{id}"))
        .json(&json!({"content": "hi!"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = c
        .delete(format!("{base}/_sim/messages/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let truth: Value = c
        .get(format!("{base}/_sim/ground-truth"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(truth[0]["content"], "hi!");
    assert_eq!(truth[0]["deleted"], true);
    assert_eq!(truth[0]["revisions"].as_array().unwrap().len(), 2);
    let res = c
        .post(format!("{base}/_sim/messages"))
        .json(&json!({"channel_id": "1", "author_id": author, "content": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);

    let gid = g["id"].as_str().unwrap();
    let uid = author.as_str().unwrap();
    let res = c
        .put(format!("{base}/_sim/guilds/{gid}/members/{uid}/roles"))
        .json(&json!({"roles": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = c
        .put(format!(
            "{base}/_sim/channels/{}/overwrites",
            ch.as_str().unwrap()
        ))
        .json(&json!({"id": gid, "kind": "role", "allow": "0", "deny": "1024"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    for (path, body) in [
        ("faults/rate-limit-burst", json!({"n": 0})),
        ("faults/chaos", json!({"dup_max": 0, "reorder_window": 0})),
        ("faults/heartbeat-acks", json!({"enabled": true})),
        ("faults/reconnect", json!({})),
        ("traffic/steps", json!({"seed": 1, "steps": 50})),
    ] {
        let res = c
            .post(format!("{base}/_sim/{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }
    let truth: Value = c
        .get(format!("{base}/_sim/ground-truth"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(truth.as_array().unwrap().len() > 20);

    // Channels, threads, users and members through the control API.
    let created: Value = c
        .post(format!("{base}/_sim/guilds/{gid}/channels"))
        .json(&json!({"kind": "text", "name": "new-room"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let room = created["id"].as_str().unwrap().to_string();
    let thread: Value = c
        .post(format!("{base}/_sim/channels/{room}/threads"))
        .json(&json!({"name": "secret", "owner_id": uid, "private": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(thread["kind"], "private_thread");
    let tid = thread["id"].as_str().unwrap();
    for (method, path, body) in [
        (
            "PUT",
            format!("channels/{tid}/thread-members/{uid}"),
            json!(null),
        ),
        (
            "DELETE",
            format!("channels/{tid}/thread-members/{uid}"),
            json!(null),
        ),
        (
            "POST",
            "users".to_string(),
            json!({"id": "42", "username": "newbie"}),
        ),
        (
            "PUT",
            format!("guilds/{gid}/members/42"),
            json!({"roles": []}),
        ),
        (
            "PUT",
            format!("guilds/{gid}/members/42/timeout"),
            json!({"until": "2030-01-01T00:00:00Z"}),
        ),
        ("DELETE", format!("guilds/{gid}/members/42"), json!(null)),
        ("DELETE", format!("guilds/{gid}/bot"), json!(null)),
        ("PUT", format!("guilds/{gid}/bot"), json!(null)),
        ("DELETE", format!("channels/{room}"), json!(null)),
    ] {
        let req = c.request(method.parse().unwrap(), format!("{base}/_sim/{path}"));
        let req = if body.is_null() { req } else { req.json(&body) };
        let res = req.send().await.unwrap();
        assert_eq!(
            res.status(),
            200,
            "{method} {path}: {}",
            res.text().await.unwrap()
        );
    }

    let res = c
        .post(format!("{base}/_sim/traffic/start"))
        .json(&json!({"rate_per_sec": 200.0, "seed": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let before = truth.as_array().unwrap().len();
    assert!(
        observer_testkit::wait::holds_within(std::time::Duration::from_secs(10), || sim
            .ground_truth()
            .len()
            > before + 20)
        .await,
        "traffic flows"
    );
    let stop: Value = c
        .post(format!("{base}/_sim/traffic/stop"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(stop["steps"].as_u64().unwrap() > 0);
    let info: Value = c
        .get(format!("{base}/_sim/info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["gateway_url"], sim.gateway_url());
    sim.shutdown().await;
}
