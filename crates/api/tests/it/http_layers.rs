//! The tower-http layers around every route: request ids (kept, generated,
//! echoed, and in every log line of the request), security headers, and the
//! body cap with its GraphQL-shaped answer on `/graphql`.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use crate::common::{config, first_code, start};
use sqlx::PgPool;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test process (the server runs on other threads,
/// so the subscriber is global; the test using it runs in a process of its
/// own, where no other test logs or installs a subscriber).
fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        captured
    })
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn request_ids_are_echoed_and_in_every_log_line(pool: PgPool) {
    let Some(pool) = observer_testkit::child::alone(
        module_path!(),
        "request_ids_are_echoed_and_in_every_log_line",
        pool,
    )
    .await
    .unwrap() else {
        return;
    };
    let logs = logs();
    let api = start(pool, config()).await;
    let client = reqwest::Client::new();

    let r = client
        .get(format!("{}/healthz", api.base))
        .header("x-request-id", "req-from-proxy-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-from-proxy-42");

    // None sent: one is made (a UUID) and echoed.
    let r = client
        .post(format!("{}/graphql", api.base))
        .header("content-type", "application/json")
        .body(r#"{"query":"{ viewer { id } }"}"#)
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 36, "{id}");
    assert!(uuid_like(&id), "{id}");

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let finished: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("finished processing request"))
        .collect();
    assert!(
        finished.iter().any(|l| l.contains("req-from-proxy-42")),
        "{text}"
    );
    assert!(finished.iter().any(|l| l.contains(&id)), "{text}");
    // Every line logged inside a request span names its id.
    for line in text.lines().filter(|l| l.contains("request{")) {
        assert!(line.contains("request_id="), "{line}");
    }
}

fn uuid_like(s: &str) -> bool {
    s.split('-').map(str::len).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn security_headers_on_every_answer(pool: PgPool) {
    let api = start(pool, config()).await;
    let client = reqwest::Client::new();
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/healthz"),
        ("GET", "/assets/app.js"),
        ("GET", "/assets/missing.js"),
        ("POST", "/graphql"),
    ] {
        let r = client
            .request(method.parse().unwrap(), format!("{}{path}", api.base))
            .header("content-type", "application/json")
            .body(r#"{"query":"{ viewer { id } }"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(r.headers()["referrer-policy"], "same-origin", "{path}");
    }
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn oversized_bodies_are_refused_before_the_handler(pool: PgPool) {
    let api = start(pool, config()).await;
    let client = reqwest::Client::new();
    let big = "x".repeat(70 * 1024);

    // GraphQL answers in its own shape…
    let r = client
        .post(format!("{}/graphql", api.base))
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(first_code(&body), "BAD_REQUEST", "{body}");
    assert_eq!(body["errors"][0]["message"], "request body too large");

    // …other routes with a plain 413.
    let r = client
        .post(format!("{}/auth/logout", api.base))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
}
