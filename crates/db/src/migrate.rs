//! Schema migrations plus the RLS layer of policies/.
//!
//! `MIGRATOR` (migrations/) changes the schema once per database; the policy
//! files are re-applied on every run because they are written to be idempotent
//! (create-or-replace, drop-and-recreate, revoke-then-grant). Re-applying means a
//! policy fix ships with a deploy and needs no new migration.

use sqlx::PgPool;

use crate::{Result, MIGRATOR};

/// The policy files, embedded at compile time and applied in this (name) order.
pub const POLICY_FILES: &[(&str, &str)] = &[
    (
        "00_roles.sql",
        include_str!("../../../policies/00_roles.sql"),
    ),
    (
        "10_access.sql",
        include_str!("../../../policies/10_access.sql"),
    ),
    (
        "20_grants.sql",
        include_str!("../../../policies/20_grants.sql"),
    ),
    ("30_rls.sql", include_str!("../../../policies/30_rls.sql")),
    (
        "40_notify.sql",
        include_str!("../../../policies/40_notify.sql"),
    ),
];

/// Key of the transaction-level advisory lock that serialises policy application
/// within one database ("observer" in ASCII, no meaning beyond being fixed).
const POLICY_LOCK_KEY: i64 = 0x6f62_7365_7276_6572;

/// How many times a policy run is retried after losing a race on cluster-wide
/// catalogs (roles are shared by every database of the cluster, and the advisory
/// lock only serialises runs against the same database).
const ATTEMPTS: u32 = 5;

/// Migrates the schema, then applies the policies. Safe to run concurrently from
/// several processes and to re-run at any time.
pub async fn run(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    apply_policies(pool).await
}

/// Applies policies/ (roles, access functions, grants, RLS, notify triggers) in
/// one transaction. Requires the migrations to have run.
pub async fn apply_policies(pool: &PgPool) -> Result<()> {
    let mut attempt = 1;
    loop {
        match apply_policies_once(pool).await {
            Ok(()) => return Ok(()),
            Err(err) if attempt < ATTEMPTS && is_race(&err) => {
                tracing::debug!(%err, attempt, "policy run lost a race; retrying");
                attempt += 1;
                // Back off a little so that the concurrent winner can commit.
                tokio::time::sleep(std::time::Duration::from_millis(50 * u64::from(attempt))).await;
            }
            Err(err) => return Err(err),
        }
    }
}

async fn apply_policies_once(pool: &PgPool) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query!("select pg_advisory_xact_lock($1)", POLICY_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    // The files drop-and-recreate idempotently; "does not exist, skipping"
    // notices on a fresh database are expected, not news.
    sqlx::query!("set local client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    for (name, sql) in POLICY_FILES {
        tracing::debug!(file = name, "applying policy file");
        // dynamic: a whole file of DDL, several statements sent as one simple query.
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(|err| {
            tracing::error!(file = name, %err, "policy file failed");
            err
        })?;
    }
    tx.commit().await?;
    Ok(())
}

/// Errors a concurrent policy run in another database can cause on the shared
/// role catalogs: duplicate role or membership, "tuple concurrently updated",
/// deadlock, serialization failure.
fn is_race(err: &crate::Error) -> bool {
    let crate::Error::Sqlx(sqlx::Error::Database(db)) = err else {
        return false;
    };
    matches!(
        db.code().as_deref(),
        Some("23505" | "42710" | "XX000" | "40P01" | "40001")
    )
}
