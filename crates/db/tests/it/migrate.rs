//! `observer migrate` is idempotent and safe to run concurrently.

use observer_db::migrate;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

async fn count_policies(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("select count(*) from pg_policies where policyname like 'observer\\_%'")
            .fetch_one(pool)
            .await?,
    )
}

#[sqlx::test(migrations = false)]
async fn migrate_twice_is_a_no_op(pool: PgPool) -> anyhow::Result<()> {
    migrate::run(&pool).await?;
    let first = count_policies(&pool).await?;
    assert!(first > 20, "policies applied: {first}");
    migrate::run(&pool).await?;
    assert_eq!(count_policies(&pool).await?, first);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn concurrent_migrations_on_a_fresh_database(
    _opts: sqlx::postgres::PgPoolOptions,
    conn: sqlx::postgres::PgConnectOptions,
) -> anyhow::Result<()> {
    // Two independent pools, as two processes would have.
    let a = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(conn.clone())
        .await?;
    let b = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(conn)
        .await?;
    let (ra, rb) = tokio::join!(migrate::run(&a), migrate::run(&b));
    ra?;
    rb?;
    let applied: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations")
        .fetch_one(&a)
        .await?;
    assert_eq!(applied, observer_db::MIGRATOR.iter().count() as i64);
    assert!(count_policies(&a).await? > 20);
    Ok(())
}

/// The single-`DATABASE_URL` deployment where that user is not a superuser: it
/// owns the schema, grants itself the roles, and its role-switched transactions
/// are filtered although it owns the tables (RLS is forced).
#[sqlx::test(migrations = false)]
async fn a_non_superuser_owner_migrates_and_is_filtered_too(pool: PgPool) -> anyhow::Result<()> {
    // Cluster-wide, so created idempotently and tolerant of a concurrent creator.
    sqlx::raw_sql(
        "do $$ begin
           if not exists (select 1 from pg_roles where rolname = 'observer_test_owner') then
             begin
               create role observer_test_owner login createrole;
             exception when duplicate_object or unique_violation then null;
             end;
           end if;
         end $$",
    )
    .execute(&pool)
    .await?;
    let db_name: String = sqlx::query_scalar("select current_database()::text")
        .fetch_one(&pool)
        .await?;
    sqlx::query(&format!(
        "alter database \"{db_name}\" owner to observer_test_owner"
    ))
    .execute(&pool)
    .await?;

    let opts = (*pool.connect_options())
        .clone()
        .username("observer_test_owner");
    let owner = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(opts)
        .await?;
    let superuser: bool =
        sqlx::query_scalar("select rolsuper from pg_roles where rolname = current_user")
            .fetch_one(&owner)
            .await?;
    assert!(!superuser);
    migrate::run(&owner).await?;
    migrate::run(&owner).await?;

    let db = observer_db::Db::new(owner.clone());
    let mut w = db.worker().await?;
    sqlx::raw_sql(
        "insert into guilds (guild_id, owner_id) values (1, 10);
         insert into roles (guild_id, role_id, permissions) values (1, 1, 66560);
         insert into channels (guild_id, channel_id, kind) values (1, 100, 0);
         insert into members (guild_id, user_id) values (1, 11);
         insert into messages (guild_id, message_id, channel_id, created_at) values (1, 1000, 100, now());",
    )
    .execute(&mut *w)
    .await?;
    w.commit().await?;

    // PostgreSQL 15 role grants always inherit, so the connecting user itself
    // holds the worker's privileges (policies/README.md); what matters is that
    // every application transaction switches role and is filtered.
    let mut none = owner.begin().await?;
    sqlx::query("select set_config('role', 'observer_api', true)")
        .execute(&mut *none)
        .await?;
    let unseen: i64 = sqlx::query_scalar("select count(*) from messages")
        .fetch_one(&mut *none)
        .await?;
    assert_eq!(unseen, 0, "no viewer, nothing");
    none.rollback().await?;
    let mut stranger = db.viewer(12).await?;
    let unseen: i64 = sqlx::query_scalar("select count(*) from messages")
        .fetch_one(&mut *stranger)
        .await?;
    assert_eq!(unseen, 0, "not a member, nothing");
    stranger.rollback().await?;
    let mut v = db.viewer(11).await?;
    let seen: i64 = sqlx::query_scalar("select count(*) from messages")
        .fetch_one(&mut *v)
        .await?;
    assert_eq!(seen, 1);
    v.commit().await?;
    owner.close().await;
    // Hand the database back so the harness can drop it as usual.
    sqlx::query(&format!(
        "alter database \"{db_name}\" owner to current_user"
    ))
    .execute(&pool)
    .await?;
    Ok(())
}
