//! Benchmark: a 50-message history page under RLS with many stored messages.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo run --release -p observer-api --example history_bench -- 1000000
//! ```
//!
//! Creates (drops and recreates) the database `observer_bench` next to
//! `DATABASE_URL`'s (dropped again at the end), applies migrations and policies, seeds N messages across 4
//! guilds × 10 channels with roles and overwrites, then times
//! (a) the database read as the API role (`Db::viewer` + `viewer::messages`)
//! and (b) the whole `POST /graphql` round trip over a real socket, for
//! random channels and random page positions. Prints p50/p90/p99.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use observer_db::Db;
use rand::{Rng, SeedableRng};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};

const GUILDS: i64 = 4;
const CHANNELS_PER_GUILD: i64 = 10;
const VIEWER: i64 = 42;
const SAMPLES: usize = 2_000;

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let p = |q: f64| {
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v[i].as_secs_f64() * 1000.0
    };
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms (n={})",
        p(0.5),
        p(0.9),
        p(0.99),
        v.len()
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: i64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("N must be a number")?
        .unwrap_or(1_000_000);
    let base = std::env::var("DATABASE_URL").context("DATABASE_URL")?;
    let mut admin = PgConnection::connect(&base).await?;
    sqlx::query("drop database if exists observer_bench with (force)")
        .execute(&mut admin)
        .await?;
    sqlx::query("create database observer_bench")
        .execute(&mut admin)
        .await?;
    let url = match base.rsplit_once('/') {
        Some((prefix, _)) => format!("{prefix}/observer_bench"),
        None => anyhow::bail!("DATABASE_URL has no database name"),
    };
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    observer_db::migrate::run(&pool).await?;

    let t = Instant::now();
    let per_channel = n / (GUILDS * CHANNELS_PER_GUILD);
    for g in 1..=GUILDS {
        let gid = g * 1_000_000;
        sqlx::query("insert into guilds (guild_id, name, owner_id) values ($1, 'bench', 1)")
            .bind(gid)
            .execute(&pool)
            .await?;
        // @everyone sees everything but channel 0, which only staff see.
        sqlx::query("insert into roles (guild_id, role_id, permissions) values ($1, $1, $2), ($1, $1 + 1, 0), ($1, $1 + 2, 0)")
            .bind(gid)
            .bind((1_i64 << 10) | (1 << 16))
            .execute(&pool)
            .await?;
        sqlx::query(
            "insert into members (guild_id, user_id, role_ids) values ($1, $2, array[$1 + 1])",
        )
        .bind(gid)
        .bind(VIEWER)
        .execute(&pool)
        .await?;
        for c in 0..CHANNELS_PER_GUILD {
            let cid = gid + 100 + c;
            sqlx::query(
                "insert into channels (guild_id, channel_id, kind, name) values ($1, $2, 0, 'c')",
            )
            .bind(gid)
            .bind(cid)
            .execute(&pool)
            .await?;
            if c == 0 {
                sqlx::query("insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny) values ($1, $2, $1, 0, 0, 1024), ($1, $2, $1 + 1, 0, 1024, 0)")
                    .bind(gid)
                    .bind(cid)
                    .execute(&pool)
                    .await?;
            }
            sqlx::query(
                "insert into messages (guild_id, message_id, channel_id, author_id, author_username, content, created_at, seen_create) \
                 select $1, $2 * 10000000 + i, $2, 7, 'bench', 'support question number ' || i || ' about refunds and shipping', \
                        now() - make_interval(secs => ($3 - i)), true \
                 from generate_series(1, $3) as i",
            )
            .bind(gid)
            .bind(cid)
            .bind(per_channel)
            .execute(&pool)
            .await?;
        }
    }
    sqlx::query("analyze").execute(&pool).await?;
    eprintln!(
        "seeded {} messages in {:.1}s",
        per_channel * GUILDS * CHANNELS_PER_GUILD,
        t.elapsed().as_secs_f64()
    );

    let db = Db::new(pool.clone());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let pick = |rng: &mut rand::rngs::StdRng| {
        let gid = rng.gen_range(1..=GUILDS) * 1_000_000;
        let cid = gid + 100 + rng.gen_range(0..CHANNELS_PER_GUILD);
        // Half the pages are the newest, half somewhere deep in history.
        let before = rng
            .gen_bool(0.5)
            .then(|| cid * 10_000_000 + rng.gen_range(51..=per_channel.max(52)));
        (cid, before)
    };

    let mut db_times = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let (cid, before) = pick(&mut rng);
        let t = Instant::now();
        let mut tx = db.viewer(VIEWER).await?;
        let rows = observer_db::viewer::messages(&mut tx, cid, before, 51).await?;
        tx.commit().await?;
        db_times.push(t.elapsed());
        std::hint::black_box(rows);
    }
    println!("db page (50 under RLS):      {}", percentiles(db_times));

    let state = observer_api::AppState::new(
        observer_api::Config {
            limits: observer_api::Limits {
                rate_burst: u32::MAX,
                rate_per_sec: 1e9,
                ..Default::default()
            },
            ..Default::default()
        },
        db.clone(),
    )?;
    let secret = observer_api::tokens::new_secret();
    {
        let mut tx = db.auth().await?;
        observer_db::auth::upsert_user(
            &mut tx,
            &observer_db::auth::NewUser {
                user_id: VIEWER,
                username: "bench".into(),
                global_name: None,
                avatar: None,
            },
        )
        .await?;
        tx.commit().await?;
        let mut tx = db.viewer(VIEWER).await?;
        observer_db::viewer::create_api_token(
            &mut tx,
            VIEWER,
            uuid::Uuid::new_v4(),
            "bench",
            &observer_api::tokens::hash_secret(&secret),
        )
        .await?;
        tx.commit().await?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = observer_api::app(state);
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    let client = reqwest::Client::new();
    let q = "query($c: ID!) { messages(channelId: $c, first: 50) { edges { cursor node { id content createdAt author { id username } } } pageInfo { hasNextPage endCursor } } }";
    let mut http_times = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let (cid, _) = pick(&mut rng);
        let t = Instant::now();
        let body: serde_json::Value = client
            .post(format!("http://{addr}/graphql"))
            .bearer_auth(&secret)
            .json(&serde_json::json!({"query": q, "variables": {"c": cid.to_string()}}))
            .send()
            .await?
            .json()
            .await?;
        http_times.push(t.elapsed());
        anyhow::ensure!(body.get("errors").is_none(), "graphql errors: {body}");
    }
    println!("graphql messages(first: 50): {}", percentiles(http_times));
    pool.close().await;
    sqlx::query("drop database if exists observer_bench with (force)")
        .execute(&mut admin)
        .await?;
    Ok(())
}
