//! The client against the real simulator over HTTP: per-route buckets and the
//! global limit are obeyed before Discord has to refuse, 429 bursts are
//! waited out, the invalid-request guard stops short of the ban, 5xx are
//! retried, and payloads decode typed.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use observer_discord::{Client, Error, Fetched, GuardSettings, Limits, Options, SecretString};
use observer_sim::{GenOptions, Scenario, SimConfig, Simulator};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

struct Fixture {
    sim: Simulator,
    scenario: Scenario,
    channels: Vec<u64>,
}

async fn fixture(config: SimConfig) -> Fixture {
    let sim = Simulator::start(config).await.unwrap();
    let scenario = Scenario::generate(3, GenOptions::default());
    sim.load(scenario.clone());
    let channels = scenario.guilds[0]
        .channels
        .iter()
        .filter(|c| c.name == "general-help" || c.name == "billing")
        .map(|c| c.id)
        .collect();
    Fixture {
        sim,
        scenario,
        channels,
    }
}

impl Fixture {
    fn client(&self, options: Options) -> Client {
        Client::builder(self.sim.base_url())
            .bot_token(SecretString::from(self.sim.config().bot_token.clone()))
            .options(options)
            .build()
            .unwrap()
    }

    async fn stats(&self) -> Value {
        reqwest::get(format!("{}/_sim/rate-stats", self.sim.base_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn unpaced() -> Options {
    Options {
        limits: Limits {
            global_per_sec: 0,
            ..Limits::default()
        },
        ..Options::default()
    }
}

#[tokio::test]
async fn concurrent_calls_on_one_route_learn_its_bucket_instead_of_hitting_429s() {
    let f = fixture(SimConfig {
        rate_limit_per_route: 5,
        rate_limit_window_ms: 400,
        rate_limit_global_per_sec: Some(0),
        ..SimConfig::default()
    })
    .await;
    let client = f.client(unpaced());
    let ch = f.channels[0];
    let started = Instant::now();
    let calls = (0..30).map(|_| {
        let c = client.clone();
        async move {
            c.fetch::<Vec<Value>>(&format!("/channels/{ch}/messages?limit=1"))
                .await
        }
    });
    for res in futures::future::join_all(calls).await {
        assert!(matches!(res, Ok(Fetched::Ok(_))), "{res:?}");
    }
    // 30 requests at 5 per 400 ms need at least five window resets.
    assert!(started.elapsed() >= Duration::from_millis(5 * 400));
    let stats = f.stats().await;
    assert!(
        stats["route_429s"].as_u64().unwrap() <= 1,
        "the bucket was found by hitting it: {stats}"
    );
    assert_eq!(stats["global_429s"], 0);
    assert_eq!(
        client.invalid_requests(),
        stats["route_429s"].as_u64().unwrap() as usize
    );
    f.sim.shutdown().await;
}

#[tokio::test]
async fn requests_across_routes_are_paced_to_the_global_limit() {
    let f = fixture(SimConfig {
        rate_limit_per_route: 1000,
        rate_limit_global_per_sec: Some(10),
        ..SimConfig::default()
    })
    .await;
    let client = f.client(Options {
        limits: Limits {
            global_per_sec: 10,
            ..Limits::default()
        },
        ..Options::default()
    });
    let started = Instant::now();
    let calls = (0..30).map(|i| {
        let c = client.clone();
        let ch = f.channels[i % f.channels.len()];
        async move {
            c.fetch::<Vec<Value>>(&format!("/channels/{ch}/messages?limit=1"))
                .await
        }
    });
    for res in futures::future::join_all(calls).await {
        assert!(matches!(res, Ok(Fetched::Ok(_))), "{res:?}");
    }
    assert!(started.elapsed() >= Duration::from_millis(2_800), "paced");
    let stats = f.stats().await;
    assert!(
        stats["global_429s"].as_u64().unwrap() <= 2,
        "pacing should keep global 429s to the odd window edge: {stats}"
    );
    f.sim.shutdown().await;
}

#[tokio::test]
async fn a_global_429_pauses_every_route() {
    let f = fixture(SimConfig {
        rate_limit_per_route: 1000,
        rate_limit_global_per_sec: Some(3),
        ..SimConfig::default()
    })
    .await;
    // No pacing: the client only learns the limit from the first global 429.
    let client = f.client(unpaced());
    for i in 0..12 {
        let ch = f.channels[i % f.channels.len()];
        let got = client
            .fetch::<Vec<Value>>(&format!("/channels/{ch}/messages?limit=1"))
            .await
            .unwrap();
        assert!(matches!(got, Fetched::Ok(_)));
    }
    let stats = f.stats().await;
    let global = stats["global_429s"].as_u64().unwrap();
    // Each 429 paused the whole token until the window turned, so at most
    // one per window (12 requests at 3 per second: four windows).
    assert!((1..=4).contains(&global), "{stats}");
    f.sim.shutdown().await;
}

#[tokio::test]
async fn a_429_burst_is_waited_out_and_an_endless_one_gives_up() {
    let f = fixture(SimConfig {
        burst_retry_after_ms: 200,
        ..SimConfig::default()
    })
    .await;
    let client = f.client(Options::default());
    let ch = f.channels[0];
    let path = format!("/channels/{ch}/messages?limit=1");
    f.sim.rate_limit_burst(3);
    let started = Instant::now();
    assert!(matches!(
        client.fetch::<Vec<Value>>(&path).await.unwrap(),
        Fetched::Ok(_)
    ));
    assert!(
        started.elapsed() >= Duration::from_millis(3 * 200),
        "retry_after honoured"
    );
    assert_eq!(f.stats().await["injected_429s"], 3);

    let impatient = f.client(Options {
        max_rate_limit_retries: 2,
        ..Options::default()
    });
    f.sim.rate_limit_burst(10);
    let err = impatient.fetch::<Vec<Value>>(&path).await.unwrap_err();
    assert!(
        matches!(err, Error::RateLimited { retries: 2, .. }),
        "{err}"
    );
    assert!(err.is_transient());
    assert_eq!(f.stats().await["injected_429s"], 3 + 3);
    f.sim.shutdown().await;
}

#[tokio::test]
async fn the_invalid_request_guard_stops_before_discords_ban() {
    let f = fixture(SimConfig {
        invalid_request_budget: 10,
        ..SimConfig::default()
    })
    .await;
    let client = Client::builder(f.sim.base_url())
        .bot_token(SecretString::from("Bot not-the-token".to_owned()))
        .options(Options {
            guard: GuardSettings {
                threshold: 8,
                window: Duration::from_secs(600),
            },
            ..Options::default()
        })
        .build()
        .unwrap();
    let ch = f.channels[0];
    let path = format!("/channels/{ch}/messages?limit=1");
    for _ in 0..8 {
        let err = client.fetch::<Vec<Value>>(&path).await.unwrap_err();
        assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
        assert!(!err.is_transient());
    }
    let err = client.fetch::<Vec<Value>>(&path).await.unwrap_err();
    assert!(
        matches!(err, Error::BudgetExhausted { count: 8, .. }),
        "{err}"
    );
    let stats = f.stats().await;
    assert_eq!(
        stats["invalid_requests"], 8,
        "the refused call was never sent"
    );
    assert!(stats["banned_until"].is_null(), "{stats}");
    f.sim.shutdown().await;
}

#[tokio::test]
async fn members_decode_typed_with_their_guild_and_403_404_are_answers() {
    let f = fixture(SimConfig::default()).await;
    let client = f.client(Options::default());
    let g = &f.scenario.guilds[0];
    let member = &g.members[0];
    let got = client
        .member(g.id as i64, member.user_id as i64)
        .await
        .unwrap();
    let Fetched::Ok(m) = got else {
        panic!("{got:?}")
    };
    assert_eq!(m.guild_id.map(|s| s.get()), Some(g.id as i64));
    assert_eq!(m.user_id(), Some(member.user_id as i64));
    let mut want: Vec<i64> = member.roles.iter().map(|r| *r as i64).collect();
    let mut have = m.role_ids();
    want.sort_unstable();
    have.sort_unstable();
    assert_eq!(have, want);
    let roles = client.roles(g.id as i64).await.unwrap().ok().unwrap();
    assert!(!roles.is_empty());

    assert_eq!(
        client.fetch::<Value>("/channels/12345").await.unwrap(),
        Fetched::NotFound
    );
    assert_eq!(client.gateway().await.unwrap().url, f.sim.gateway_url());
    f.sim.shutdown().await;
}

/// Serves `responses[i]` to the i-th connection (the last one from then on).
async fn serve(responses: Vec<&'static str>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let i = counter.fetch_add(1, Ordering::SeqCst);
            let resp = responses[i.min(responses.len() - 1)];
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), hits)
}

fn plain(base: String, options: Options) -> Client {
    Client::builder(base)
        .bot_token(SecretString::from("t".to_owned()))
        .options(options)
        .build()
        .unwrap()
}

fn quick() -> Options {
    Options {
        min_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        max_retries: 3,
        ..Options::default()
    }
}

const BAD_GATEWAY: &str =
    "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
const EMPTY: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
    content-length: 2\r\nconnection: close\r\n\r\n[]";
const FORBIDDEN: &str = "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\n\
    content-length: 44\r\nconnection: close\r\n\r\n{\"code\": 50001, \"message\": \"Missing Access\"}";
const MEMBER_WITHOUT_ROLES: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
    content-length: 22\r\nconnection: close\r\n\r\n{\"user\": {\"id\": \"42\"}}";

#[tokio::test]
async fn server_errors_are_retried_with_backoff_then_reported() {
    let (base, hits) = serve(vec![BAD_GATEWAY, BAD_GATEWAY, EMPTY]).await;
    let got = plain(base, quick())
        .fetch::<Vec<Value>>("/x")
        .await
        .unwrap();
    assert_eq!(got, Fetched::Ok(vec![]));
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    let (base, hits) = serve(vec![BAD_GATEWAY]).await;
    let err = plain(base, quick()).fetch::<Value>("/x").await.unwrap_err();
    assert!(matches!(err, Error::Status { status: 502, .. }), "{err}");
    assert!(err.is_transient());
    assert_eq!(hits.load(Ordering::SeqCst), 1 + 3);
}

#[tokio::test]
async fn a_403_is_one_request_and_a_member_without_roles_is_an_error() {
    let (base, hits) = serve(vec![FORBIDDEN]).await;
    let client = plain(base, quick());
    assert_eq!(
        client.fetch::<Value>("/channels/1/messages").await.unwrap(),
        Fetched::Forbidden { code: Some(50001) }
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1, "never retried");
    assert_eq!(client.invalid_requests(), 1);

    let (base, _) = serve(vec![MEMBER_WITHOUT_ROLES]).await;
    let err = plain(base, quick()).member(1, 42).await.unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    assert!(err.to_string().contains("roles"), "{err}");
}

#[test]
fn the_token_never_shows_in_debug_output() {
    let client = Client::builder("http://127.0.0.1:9")
        .bot_token(SecretString::from("Bot very-secret-token".to_owned()))
        .build()
        .unwrap();
    let shown = format!("{client:?}");
    assert!(!shown.contains("very-secret-token"), "{shown}");
    assert!(shown.contains("bot_token: true"), "{shown}");
}

const INVALID_GRANT: &str = "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
    content-length: 26\r\nconnection: close\r\n\r\n{\"error\": \"invalid_grant\"}";

/// Raw requests (the OAuth2 token grant) hand every answer back as is, are
/// never retried on a 5xx (an authorization code works once), and are never
/// sent outside the configured base URL.
#[tokio::test]
async fn raw_requests_are_answered_as_is_and_never_replayed() {
    let post = |client: Client, url: String| async move {
        client
            .send_raw(
                reqwest::Method::POST,
                &url,
                reqwest::header::HeaderMap::new(),
                b"grant_type=authorization_code&code=c".to_vec(),
            )
            .await
    };
    let (base, hits) = serve(vec![INVALID_GRANT]).await;
    let got = post(
        plain(base.clone(), quick()),
        format!("{base}/api/oauth2/token"),
    )
    .await
    .unwrap();
    assert_eq!(got.status.as_u16(), 400);
    assert_eq!(got.body, b"{\"error\": \"invalid_grant\"}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let (base, hits) = serve(vec![BAD_GATEWAY, EMPTY]).await;
    let got = post(
        plain(base.clone(), quick()),
        format!("{base}/api/oauth2/token"),
    )
    .await
    .unwrap();
    assert_eq!(got.status.as_u16(), 502, "handed back, not retried");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let (base, hits) = serve(vec![EMPTY]).await;
    let err = post(
        plain(base, quick()),
        "http://127.0.0.1:9/api/oauth2/token".into(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Setup(_)), "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}
