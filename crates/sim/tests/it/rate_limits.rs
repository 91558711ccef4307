//! Discord's rate limits over HTTP: per-route buckets, the global limit per token, shared-scope
//! 429s, invalid-request accounting with a Cloudflare ban, and the counters of the control API.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use observer_sim::{GenOptions, Scenario, SimConfig, Simulator};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};

const BOT: &str = "Bot sim-bot-token";

struct Fixture {
    sim: Simulator,
    client: reqwest::Client,
    channels: Vec<u64>,
}

async fn fixture(config: SimConfig) -> Fixture {
    let sim = Simulator::start(config).await.unwrap();
    let s = Scenario::generate(3, GenOptions::default());
    sim.load(s.clone());
    let channels = s.guilds[0]
        .channels
        .iter()
        .filter(|c| c.name == "general-help" || c.name == "billing")
        .map(|c| c.id)
        .collect();
    Fixture {
        sim,
        client: reqwest::Client::new(),
        channels,
    }
}

impl Fixture {
    async fn get(&self, path: &str, auth: &str) -> (u16, HeaderMap, String) {
        let res = self
            .client
            .get(format!("{}{path}", self.sim.base_url()))
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        (status, headers, res.text().await.unwrap())
    }

    async fn history(&self, i: usize) -> (u16, HeaderMap, String) {
        let ch = self.channels[i];
        self.get(&format!("/api/v10/channels/{ch}/messages?limit=1"), BOT)
            .await
    }

    async fn stats(&self) -> Value {
        self.client
            .get(format!("{}/_sim/rate-stats", self.sim.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn secs(h: &HeaderMap, name: &str) -> f64 {
    h[name].to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn an_exhausted_route_bucket_answers_429_with_user_scope_and_bucket_headers() {
    let f = fixture(SimConfig {
        rate_limit_per_route: 2,
        rate_limit_window_ms: 60_000,
        ..SimConfig::default()
    })
    .await;
    for left in ["1", "0"] {
        let (status, h, _) = f.history(0).await;
        assert_eq!(
            (status, h["x-ratelimit-remaining"].to_str().unwrap()),
            (200, left)
        );
        assert!(
            !h.contains_key("x-ratelimit-scope"),
            "only 429s carry a scope"
        );
    }
    let (status, h, body) = f.history(0).await;
    assert_eq!(status, 429);
    assert_eq!(h["x-ratelimit-scope"], "user");
    assert_eq!(h["x-ratelimit-limit"], "2");
    assert_eq!(h["x-ratelimit-remaining"], "0");
    assert!(h.contains_key("x-ratelimit-bucket"));
    assert!(secs(&h, "x-ratelimit-reset-after") > 50.0);
    assert!(secs(&h, "x-ratelimit-reset") > 1.7e9);
    assert_eq!(h["retry-after"], "60");
    assert!(!h.contains_key("x-ratelimit-global"));
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["global"], json!(false));
    assert_eq!(body["message"], "You are being rate limited.");
    assert!(body["retry_after"].as_f64().unwrap() > 50.0);

    // Another channel is another bucket; the same route with another token too.
    assert_eq!(f.history(1).await.0, 200);
    let ch = f.channels[0];
    let path = format!("/api/v10/channels/{ch}/messages?limit=1");
    assert_eq!(f.get(&path, "Bot someone-else").await.0, 401);

    let stats = f.stats().await;
    assert_eq!(stats["route_429s"], 1);
    assert_eq!(stats["global_429s"], 0);
    // The 429 and the 401 are invalid requests.
    assert_eq!(stats["invalid_requests"], 2);
    assert_eq!(stats["banned_until"], Value::Null);
    f.sim.shutdown().await;
}

#[tokio::test]
async fn the_global_limit_answers_429_with_global_headers_and_body() {
    let f = fixture(SimConfig {
        rate_limit_per_route: 100,
        rate_limit_global_per_sec: Some(4),
        ..SimConfig::default()
    })
    .await;
    // Across routes: four requests pass whatever their buckets, the fifth is refused.
    let mut refused = None;
    for i in 0..5 {
        let (status, h, body) = f.history(i % 2).await;
        if status == 429 {
            refused = Some((i, h, body));
            break;
        }
        assert_eq!(status, 200);
    }
    let (i, h, body) = refused.expect("the global limit refused a request");
    assert_eq!(i, 4, "refused after exactly four requests in the second");
    assert_eq!(h["x-ratelimit-global"], "true");
    assert_eq!(h["x-ratelimit-scope"], "global");
    assert_eq!(h["retry-after"], "1");
    for absent in [
        "x-ratelimit-bucket",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "x-ratelimit-reset-after",
    ] {
        assert!(!h.contains_key(absent), "{absent} on a global 429");
    }
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["message"], "You are being rate limited.");
    assert_eq!(body["global"], json!(true));
    let retry_after = body["retry_after"].as_f64().unwrap();
    assert!(retry_after > 0.0 && retry_after <= 1.0, "{retry_after}");

    // The limit is per token: a bearer token has its own (this one is unknown: 401).
    assert_eq!(f.get("/api/v10/users/@me", "Bearer unknown").await.0, 401);
    // Gateway discovery is exempt.
    assert_eq!(f.get("/api/v10/gateway/bot", BOT).await.0, 200);

    tokio::time::sleep(Duration::from_secs_f64(retry_after + 0.05)).await;
    assert_eq!(f.history(0).await.0, 200);
    let stats = f.stats().await;
    assert_eq!(stats["global_429s"], 1);
    assert_eq!(stats["route_429s"], 0);
    f.sim.shutdown().await;
}

#[tokio::test]
async fn the_global_limit_defaults_to_fifty_and_follows_per_route_limiting_off() {
    // Off with per-route limiting off: a burst far above 50/s passes.
    let f = fixture(SimConfig {
        rate_limit_per_route: 0,
        ..SimConfig::default()
    })
    .await;
    let all = futures::future::join_all((0..120).map(|i| f.history(i % 2))).await;
    assert!(all.iter().all(|(s, _, _)| *s == 200));
    assert_eq!(f.stats().await["global_429s"], 0);
    f.sim.shutdown().await;

    // Default: 50 per second per token, over many buckets.
    let f = fixture(SimConfig::default()).await;
    let all = futures::future::join_all((0..120).map(|i| f.history(i % 2))).await;
    let global = all
        .iter()
        .filter(|(s, h, _)| *s == 429 && h.contains_key("x-ratelimit-global"))
        .count();
    let ok = all.iter().filter(|(s, _, _)| *s == 200).count();
    assert!(global > 0, "120 requests at once exceed 50/s");
    assert!(ok <= 100, "{ok} passed: at most 50 per second");
    f.sim.shutdown().await;
}

#[tokio::test]
async fn too_many_invalid_requests_bring_a_ban_that_lifts() {
    let f = fixture(SimConfig {
        invalid_request_budget: 3,
        invalid_request_window_ms: 60_000,
        invalid_request_ban_ms: 1_500,
        ..SimConfig::default()
    })
    .await;
    // Four invalid requests: a wrong bot token, an unknown bearer token, bad OAuth client
    // credentials (the token endpoint counts too) and an injected 429.
    let ch = f.channels[0];
    assert_eq!(
        f.get(&format!("/api/v10/channels/{ch}"), "Bot wrong")
            .await
            .0,
        401
    );
    assert_eq!(f.get("/api/v10/users/@me", "Bearer nope").await.0, 401);
    let res = f
        .client
        .post(format!("{}/api/oauth2/token", f.sim.base_url()))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", "x"),
            ("client_id", "nope"),
            ("client_secret", "nope"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(f.stats().await["invalid_requests"], 3);
    assert_eq!(f.stats().await["banned_until"], Value::Null);
    f.sim.rate_limit_burst(1);
    assert_eq!(f.history(0).await.0, 429);

    // Banned: every API request, valid or not, gets Cloudflare's plain-text 429.
    let stats = f.stats().await;
    assert_eq!(stats["invalid_requests"], 4);
    assert_eq!(stats["injected_429s"], 1);
    let until = stats["banned_until"].as_i64().expect("banned");
    let now_ms = chrono::Utc::now().timestamp_millis();
    assert!(
        until > now_ms && until <= now_ms + 1_600,
        "{until} vs {now_ms}"
    );
    let (status, h, body) = f.history(0).await;
    assert_eq!(status, 429);
    assert_eq!(body, "error code: 1015");
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(h["retry-after"], "2");
    assert!(!h.contains_key("x-ratelimit-scope"));
    assert!(!h.contains_key("x-ratelimit-bucket"));
    assert_eq!(f.get("/api/v10/users/@me", BOT).await.0, 429);
    // Gateway discovery still answers.
    assert_eq!(f.get("/api/v10/gateway/bot", BOT).await.0, 200);
    let stats = f.stats().await;
    assert_eq!(stats["banned_429s"], 2);
    // Answers to a banned client do not extend the ban.
    assert_eq!(stats["banned_until"].as_i64(), Some(until));

    // After the ban the client starts over with a clean record.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let (status, h, _) = f.history(0).await;
    assert_eq!(status, 200);
    assert!(h.contains_key("x-ratelimit-bucket"));
    let stats = f.stats().await;
    assert_eq!(stats["invalid_requests"], 0);
    assert_eq!(stats["banned_until"], Value::Null);
    f.sim.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_leave_the_rolling_window() {
    let f = fixture(SimConfig {
        invalid_request_budget: 2,
        invalid_request_window_ms: 400,
        ..SimConfig::default()
    })
    .await;
    let ch = f.channels[0];
    let path = format!("/api/v10/channels/{ch}");
    for _ in 0..2 {
        assert_eq!(f.get(&path, "Bot wrong").await.0, 401);
    }
    assert_eq!(f.sim.rate_stats().invalid_requests, 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.sim.rate_stats().invalid_requests, 0);
    // Two more fit the budget again: no ban.
    for _ in 0..2 {
        assert_eq!(f.get(&path, "Bot wrong").await.0, 401);
    }
    assert_eq!(f.get(&path, BOT).await.0, 200);
    assert_eq!(f.sim.rate_stats().banned_until, None);
    f.sim.shutdown().await;
}

#[tokio::test]
async fn shared_scope_429s_do_not_count_as_invalid_requests() {
    let f = fixture(SimConfig {
        invalid_request_budget: 1,
        burst_retry_after_ms: 300,
        ..SimConfig::default()
    })
    .await;
    let res = f
        .client
        .post(format!(
            "{}/_sim/faults/rate-limit-shared",
            f.sim.base_url()
        ))
        .json(&json!({"n": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    for _ in 0..3 {
        let (status, h, body) = f.history(0).await;
        assert_eq!(status, 429);
        assert_eq!(h["x-ratelimit-scope"], "shared");
        assert!(h.contains_key("x-ratelimit-bucket"));
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["global"], json!(false));
        assert_eq!(body["retry_after"], json!(0.3));
    }
    assert_eq!(f.history(0).await.0, 200);
    let stats = f.stats().await;
    assert_eq!(stats["shared_429s"], 3);
    assert_eq!(stats["invalid_requests"], 0);
    assert_eq!(stats["banned_until"], Value::Null);

    // The control API resets every counter.
    let res = f
        .client
        .post(format!("{}/_sim/rate-stats/reset", f.sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(f.sim.rate_stats().total_429s(), 0);
    f.sim.shutdown().await;
}
