use super::*;

pub(super) async fn wait_for<F, Fut>(
    what: &str,
    limit: Duration,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn scrape(
    http: &reqwest::Client,
    base: &str,
) -> anyhow::Result<HashMap<String, f64>> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(parse_metrics(&text))
}

/// Prometheus text → series name (with labels) → value.
pub(super) fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?;
            let value: f64 = parts.next()?.parse().ok()?;
            Some((name.to_owned(), value))
        })
        .collect()
}

pub(super) fn metric(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct DbStats {
    pub(super) xacts: i64,
    pub(super) tup_returned: i64,
    pub(super) tup_fetched: i64,
    pub(super) event_scans: i64,
}

pub(super) async fn db_stats(pool: &sqlx::PgPool) -> anyhow::Result<DbStats> {
    // Backends flush their counters at most once a second while busy; a
    // backend that goes idle within that second flushes after
    // PGSTAT_IDLE_INTERVAL (10 s). Waiting less let the setup's 1,000
    // RLS-checked subscription loads land in the measured window.
    tokio::time::sleep(Duration::from_millis(11_000)).await;
    let mut conn = pool.acquire().await?;
    sqlx::query("select pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await?;
    let (xacts, tup_returned, tup_fetched): (i64, i64, i64) = sqlx::query_as(
        "select xact_commit + xact_rollback, tup_returned, tup_fetched \
         from pg_stat_database where datname = current_database()",
    )
    .fetch_one(&mut *conn)
    .await?;
    let event_scans: i64 = sqlx::query_scalar(
        "select coalesce(seq_scan, 0) + coalesce(idx_scan, 0) from pg_stat_user_tables \
         where relname = 'message_events'",
    )
    .fetch_optional(&mut *conn)
    .await?
    .unwrap_or(0);
    Ok(DbStats {
        xacts,
        tup_returned,
        tup_fetched,
        event_scans,
    })
}
