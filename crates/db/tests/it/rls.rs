//! Tenancy enforced by the database: RLS enabled and forced, what each role may
//! do, isolation between viewers and guilds, and the notifications.
//!
//! Every read under test runs as one of the application roles (`Db::viewer`,
//! `Db::worker`, `Db::auth` or `set_config('role', ..)`); the test's own
//! connection is a superuser and only seeds data.

use std::time::Duration;

use observer_db::{migrate, Db};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

const VIEW: i64 = 1 << 10;
const HISTORY: i64 = 1 << 16;
const ADMIN: i64 = 1 << 3;
const MANAGE_GUILD: i64 = 1 << 5;

/// Guild A (1) and guild B (2), each with an open channel and a message, a hidden
/// channel with a message, a revision and events. Users: 10 owner of A, 11 plain
/// member of A, 12 admin of A, 13 MANAGE_GUILD in A, 14 MANAGE_GUILD but timed
/// out, 20 plain member of B, 30 member of both.
async fn seed(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql(&format!(
        "
        insert into guilds (guild_id, name, owner_id) values (1, 'A', 10), (2, 'B', 20);
        insert into roles (guild_id, role_id, permissions) values
            (1, 1, {everyone}), (1, 100, {ADMIN}), (1, 101, {MANAGE_GUILD}),
            (2, 2, {everyone});
        insert into channels (guild_id, channel_id, kind, name) values
            (1, 1001, 0, 'a-open'), (1, 1002, 0, 'a-hidden'),
            (2, 2001, 0, 'b-open'), (2, 2002, 0, 'b-hidden');
        insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny) values
            (1, 1002, 1, 0, 0, {VIEW}), (2, 2002, 2, 0, 0, {VIEW});
        insert into members (guild_id, user_id, role_ids, communication_disabled_until) values
            (1, 10, '{{}}', null), (1, 11, '{{}}', null), (1, 12, '{{100}}', null),
            (1, 13, '{{101}}', null), (1, 14, '{{101}}', now() + interval '1 day'),
            (2, 20, '{{}}', null), (1, 30, '{{}}', null), (2, 30, '{{}}', null);
        insert into thread_members (guild_id, thread_id, user_id) values (1, 1001, 11), (2, 2001, 20);
        insert into messages (guild_id, message_id, channel_id, content, created_at, seen_create) values
            (1, 5001, 1001, 'a open', now(), true), (1, 5002, 1002, 'a hidden', now(), true),
            (2, 6001, 2001, 'b open', now(), true), (2, 6002, 2002, 'b hidden', now(), true);
        insert into message_revisions (guild_id, message_id, version_at, content) values
            (1, 5001, now() - interval '1 hour', 'a open v0'), (1, 5002, now() - interval '1 hour', 'a hidden v0'),
            (2, 6001, now() - interval '1 hour', 'b open v0');
        insert into message_events (guild_id, kind, channel_id, message_id) values
            (1, 1, 1001, 5001), (1, 1, 1002, 5002), (2, 1, 2001, 6001), (2, 1, 2002, 6002);
        insert into users (user_id, username) values (10, 'owner'), (11, 'member'), (20, 'b-member');
        insert into oauth_tokens (user_id, access_token, expires_at) values (11, 'secret', now() + interval '1 day');
        insert into api_tokens (token_id, user_id, name, secret_hash) values
            ('00000000-0000-0000-0000-000000000011', 11, 't11', '\\x11'),
            ('00000000-0000-0000-0000-000000000020', 20, 't20', '\\x20');
        insert into tower_sessions.session (id, data, expiry_date) values ('s', '\\x00', now() + interval '1 day');
        ",
        everyone = VIEW | HISTORY,
    ))
    .execute(pool)
    .await?;
    Ok(())
}

async fn setup(pool: &PgPool) -> anyhow::Result<Db> {
    migrate::apply_policies(pool).await?;
    seed(pool).await?;
    Ok(Db::new(pool.clone()))
}

/// Every table (any schema but the catalogs) with a `guild_id` column.
async fn tenant_tables(pool: &PgPool) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "select format('%I.%I', n.nspname, c.relname)
         from pg_class c join pg_namespace n on n.oid = c.relnamespace
         join pg_attribute a on a.attrelid = c.oid and a.attname = 'guild_id' and not a.attisdropped
         where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema')
         order by 1",
    )
    .fetch_all(pool)
    .await?)
}

fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Runs `sql` in a savepoint so a failure leaves the transaction usable; returns
/// the SQLSTATE on failure, rows affected on success.
async fn try_exec(conn: &mut PgConnection, sql: &str) -> Result<u64, String> {
    sqlx::query("savepoint t")
        .execute(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    match sqlx::query(sql).execute(&mut *conn).await {
        Ok(r) => {
            sqlx::query("release savepoint t")
                .execute(&mut *conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok(r.rows_affected())
        }
        Err(e) => {
            sqlx::query("rollback to savepoint t")
                .execute(&mut *conn)
                .await
                .map_err(|e| e.to_string())?;
            Err(sqlstate(&e).unwrap_or_else(|| e.to_string()))
        }
    }
}

/// Rows `sql` returns, or the SQLSTATE of its failure.
async fn try_count(conn: &mut PgConnection, sql: &str) -> Result<i64, String> {
    sqlx::query("savepoint t")
        .execute(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    match sqlx::query_scalar::<_, i64>(&format!("select count(*) from ({sql}) q"))
        .fetch_one(&mut *conn)
        .await
    {
        Ok(n) => {
            sqlx::query("release savepoint t")
                .execute(&mut *conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok(n)
        }
        Err(e) => {
            sqlx::query("rollback to savepoint t")
                .execute(&mut *conn)
                .await
                .map_err(|e| e.to_string())?;
            Err(sqlstate(&e).unwrap_or_else(|| e.to_string()))
        }
    }
}

const DENIED: &str = "42501";

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn every_tenant_table_has_rls_enabled_and_forced(pool: PgPool) -> anyhow::Result<()> {
    migrate::apply_policies(&pool).await?;
    let tables = tenant_tables(&pool).await?;
    assert!(tables.len() >= 10, "found {tables:?}");
    let unprotected: Vec<String> = sqlx::query_scalar(
        "select format('%I.%I', n.nspname, c.relname)
         from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema')
           and (exists (select 1 from pg_attribute a where a.attrelid = c.oid and a.attname = 'guild_id' and not a.attisdropped)
                or (n.nspname = 'public' and c.relname in ('users', 'api_tokens', 'oauth_tokens')))
           and not (c.relrowsecurity and c.relforcerowsecurity)",
    )
    .fetch_all(&pool)
    .await?;
    assert!(
        unprotected.is_empty(),
        "RLS not enabled+forced on {unprotected:?}"
    );

    // The application roles cannot bypass RLS in any other way.
    let risky: Vec<String> = sqlx::query_scalar(
        "select rolname from pg_roles
         where rolname in ('observer_api', 'observer_worker', 'observer_auth', 'observer_access', 'observer_fanout')
           and (rolsuper or rolbypassrls or rolcanlogin or rolcreaterole or rolcreatedb)",
    )
    .fetch_all(&pool)
    .await?;
    assert!(risky.is_empty(), "{risky:?}");
    let owned: Vec<String> = sqlx::query_scalar(
        "select c.relname::text from pg_class c join pg_roles r on r.oid = c.relowner
         where r.rolname like 'observer\\_%' and c.relkind in ('r', 'p', 'v', 'm')",
    )
    .fetch_all(&pool)
    .await?;
    assert!(owned.is_empty(), "application roles own tables: {owned:?}");
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn without_a_viewer_the_api_role_reads_nothing(pool: PgPool) -> anyhow::Result<()> {
    let _db = setup(&pool).await?;
    let tables = tenant_tables(&pool).await?;
    // Unset, empty, and garbage all mean "no viewer".
    for setting in [
        None,
        Some(""),
        Some("not-a-number"),
        Some("99999999999999999999"),
    ] {
        let mut tx = pool.begin().await?;
        sqlx::query("select set_config('role', 'observer_api', true)")
            .execute(&mut *tx)
            .await?;
        if let Some(s) = setting {
            sqlx::query("select set_config('observer.viewer_id', $1, true)")
                .bind(s)
                .execute(&mut *tx)
                .await?;
        }
        for t in tables
            .iter()
            .map(String::as_str)
            .chain(["public.users", "public.api_tokens"])
        {
            match try_count(&mut tx, &format!("select * from {t}")).await {
                Ok(n) => assert_eq!(n, 0, "{t} readable without a viewer ({setting:?})"),
                Err(code) => assert_eq!(code, DENIED, "{t}: unexpected error"),
            }
        }
        let ids: Vec<i64> = sqlx::query_scalar("select access.visible_scope_ids(false)")
            .fetch_one(&mut *tx)
            .await?;
        assert!(ids.is_empty());
        tx.rollback().await?;
    }
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn a_viewer_of_guild_a_reads_nothing_of_guild_b(pool: PgPool) -> anyhow::Result<()> {
    let db = setup(&pool).await?;
    let tables = tenant_tables(&pool).await?;
    let mut tx = db.viewer(11).await?;
    for t in &tables {
        if let Ok(n) = try_count(&mut tx, &format!("select * from {t} where guild_id <> 1")).await {
            assert_eq!(n, 0, "viewer of A reads {t} of another guild");
        }
    }
    // What A's plain member does see: the open channel, its message, revision, event.
    let msgs: Vec<i64> = sqlx::query_scalar("select message_id from messages order by 1")
        .fetch_all(&mut *tx)
        .await?;
    assert_eq!(msgs, vec![5001]);
    let chans: Vec<i64> = sqlx::query_scalar("select channel_id from channels order by 1")
        .fetch_all(&mut *tx)
        .await?;
    assert_eq!(chans, vec![1001]);
    let revs: Vec<String> = sqlx::query_scalar("select content from message_revisions")
        .fetch_all(&mut *tx)
        .await?;
    assert_eq!(revs, vec!["a open v0".to_owned()]);
    let evs: Vec<i64> = sqlx::query_scalar("select message_id from message_events")
        .fetch_all(&mut *tx)
        .await?;
    assert_eq!(evs, vec![5001]);
    let guilds: Vec<i64> = sqlx::query_scalar("select guild_id from guilds")
        .fetch_all(&mut *tx)
        .await?;
    assert_eq!(guilds, vec![1]);
    let roles: i64 = sqlx::query_scalar("select count(*) from roles")
        .fetch_one(&mut *tx)
        .await?;
    assert_eq!(roles, 3);
    let users: Vec<i64> = sqlx::query_scalar("select user_id from users")
        .fetch_all(&mut *tx)
        .await?;
    assert_eq!(users, vec![11]);
    let members: Vec<i64> = sqlx::query_scalar("select user_id from members")
        .fetch_all(&mut *tx)
        .await?;
    assert_eq!(members, vec![11]);
    let tokens: Vec<String> = sqlx::query_scalar("select name from api_tokens")
        .fetch_all(&mut *tx)
        .await?;
    assert_eq!(tokens, vec!["t11".to_owned()]);
    // Asking for B's rows by id is the same as asking for rows that do not exist.
    let b: Option<String> =
        sqlx::query_scalar("select content from messages where message_id = 6001")
            .fetch_optional(&mut *tx)
            .await?;
    assert_eq!(b, None);
    tx.commit().await?;

    // A member of both guilds sees both open channels, neither hidden one.
    let mut tx = db.viewer(30).await?;
    let msgs: Vec<i64> = sqlx::query_scalar("select message_id from messages order by 1")
        .fetch_all(&mut *tx)
        .await?;
    assert_eq!(msgs, vec![5001, 6001]);
    tx.commit().await?;

    // The bot leaving guild A hides it entirely.
    sqlx::query("update guilds set removed_at = now() where guild_id = 1")
        .execute(&pool)
        .await?;
    let mut tx = db.viewer(30).await?;
    let msgs: Vec<i64> = sqlx::query_scalar("select message_id from messages order by 1")
        .fetch_all(&mut *tx)
        .await?;
    assert_eq!(msgs, vec![6001]);
    tx.commit().await?;
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn the_api_role_cannot_write_ingest_data_or_read_secrets(pool: PgPool) -> anyhow::Result<()> {
    let db = setup(&pool).await?;
    let mut tx = db.viewer(10).await?; // the owner: the strongest viewer
    let writes = [
        "insert into guilds (guild_id, name) values (3, 'x')",
        "update guilds set name = 'x' where guild_id = 1",
        "update guilds set removed_at = now() where guild_id = 1",
        "delete from guilds where guild_id = 1",
        "insert into channels (guild_id, channel_id, kind) values (1, 9, 0)",
        "update channels set name = 'x'",
        "delete from channels",
        "insert into permission_overwrites (guild_id, channel_id, target_id, kind) values (1, 1002, 10, 1)",
        "update permission_overwrites set allow = -1",
        "delete from permission_overwrites",
        "insert into roles (guild_id, role_id) values (1, 9)",
        "update roles set permissions = -1",
        "delete from roles",
        "insert into members (guild_id, user_id) values (2, 10)",
        "update members set role_ids = '{100}'",
        "delete from members",
        "insert into thread_members (guild_id, thread_id, user_id) values (1, 1002, 10)",
        "delete from thread_members",
        "insert into messages (guild_id, message_id, channel_id, created_at) values (1, 9, 1001, now())",
        "update messages set content = 'x'",
        "delete from messages",
        "insert into message_revisions (guild_id, message_id, version_at, content) values (1, 5001, now(), 'x')",
        "delete from message_revisions",
        "insert into message_events (guild_id, kind, channel_id, message_id) values (1, 1, 1001, 5001)",
        "delete from message_events",
        "insert into access_events (guild_id) values (1)",
        "insert into users (user_id, username) values (99, 'x')",
        "update users set username = 'x'",
        "delete from users",
        "delete from api_tokens",
        "update api_tokens set name = 'x'",
        "update api_tokens set user_id = 10",
    ];
    for sql in writes {
        assert_eq!(
            try_exec(&mut tx, sql).await,
            Err(DENIED.to_owned()),
            "{sql}"
        );
    }
    for sql in [
        "select * from oauth_tokens",
        "select * from permission_overwrites",
        "select * from access_events",
        "select * from tower_sessions.session",
    ] {
        assert_eq!(
            try_count(&mut tx, sql).await,
            Err(DENIED.to_owned()),
            "{sql}"
        );
    }
    tx.rollback().await?;
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn observer_roles_may_be_set_only_by_owner_admin_or_manage_guild(
    pool: PgPool,
) -> anyhow::Result<()> {
    let db = setup(&pool).await?;
    let set = "update guilds set observer_role_ids = '{101}' where guild_id = 1";
    for (viewer, allowed) in [
        (10, true),
        (12, true),
        (13, true),
        (11, false),
        (14, false),
        (20, false),
        (30, false),
    ] {
        let mut tx = db.viewer(viewer).await?;
        let n = try_exec(&mut tx, set).await;
        assert_eq!(n, Ok(u64::from(allowed)), "viewer {viewer}");
        // Another guild's settings are out of reach even for A's owner; B's owner is 20.
        assert_eq!(
            try_exec(
                &mut tx,
                "update guilds set retention = interval '1 day' where guild_id = 2"
            )
            .await,
            Ok(u64::from(viewer == 20)),
            "viewer {viewer} on guild B"
        );
        tx.rollback().await?;
    }
    // The setting takes effect: 11 holds no observer role any more and sees nothing.
    let mut tx = db.viewer(10).await?;
    assert_eq!(try_exec(&mut tx, set).await, Ok(1));
    tx.commit().await?;
    let mut tx = db.viewer(11).await?;
    let n: i64 = sqlx::query_scalar("select count(*) from messages")
        .fetch_one(&mut *tx)
        .await?;
    assert_eq!(n, 0);
    tx.commit().await?;
    let mut tx = db.viewer(13).await?;
    let n: i64 = sqlx::query_scalar("select count(*) from messages")
        .fetch_one(&mut *tx)
        .await?;
    assert_eq!(n, 1);
    let manageable: bool = sqlx::query_scalar("select access.can_manage_guild(1)")
        .fetch_one(&mut *tx)
        .await?;
    assert!(manageable);
    tx.commit().await?;
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn api_tokens_are_the_viewers_own(pool: PgPool) -> anyhow::Result<()> {
    let db = setup(&pool).await?;
    let mut tx = db.viewer(11).await?;
    assert_eq!(
        try_exec(
            &mut tx,
            "insert into api_tokens (token_id, user_id, name, secret_hash) values (gen_random_uuid(), 11, 'mine', '\\x01')"
        )
        .await,
        Ok(1)
    );
    assert_eq!(
        try_exec(
            &mut tx,
            "insert into api_tokens (token_id, user_id, name, secret_hash) values (gen_random_uuid(), 20, 'theirs', '\\x02')"
        )
        .await,
        Err(DENIED.to_owned())
    );
    assert_eq!(
        try_exec(&mut tx, "update api_tokens set revoked_at = now()").await,
        Ok(2)
    );
    tx.commit().await?;
    let revoked: i64 =
        sqlx::query_scalar("select count(*) from api_tokens where revoked_at is not null")
            .fetch_one(&pool)
            .await?;
    assert_eq!(revoked, 2, "only 11's two tokens");
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn a_pooled_connection_forgets_the_viewer_and_role_after_commit(
    pool: PgPool,
) -> anyhow::Result<()> {
    migrate::apply_policies(&pool).await?;
    seed(&pool).await?;
    // One connection, so the second transaction surely reuses the first's.
    let one = PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await?;
    let db = Db::new(one.clone());
    let mut tx = db.viewer(11).await?;
    let n: i64 = sqlx::query_scalar("select count(*) from messages")
        .fetch_one(&mut *tx)
        .await?;
    assert_eq!(n, 1);
    tx.commit().await?;

    let mut conn = one.acquire().await?;
    let (role, viewer): (String, String) =
        sqlx::query_as("select current_user::text, current_setting('observer.viewer_id', true)")
            .fetch_one(&mut *conn)
            .await?;
    assert_eq!(viewer, "");
    assert_ne!(role, "observer_api");
    drop(conn);

    let mut tx = one.begin().await?;
    sqlx::query("select set_config('role', 'observer_api', true)")
        .execute(&mut *tx)
        .await?;
    let n: i64 = sqlx::query_scalar("select count(*) from messages")
        .fetch_one(&mut *tx)
        .await?;
    assert_eq!(n, 0, "the next transaction without a viewer sees nothing");
    tx.commit().await?;
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn worker_and_auth_roles_stay_in_their_lanes(pool: PgPool) -> anyhow::Result<()> {
    let db = setup(&pool).await?;
    let mut w = db.worker().await?;
    assert_eq!(try_count(&mut w, "select * from messages").await, Ok(4));
    assert_eq!(
        try_exec(&mut w, "insert into messages (guild_id, message_id, channel_id, created_at) values (2, 7, 2001, now())")
            .await,
        Ok(1)
    );
    for sql in [
        "select * from users",
        "select * from oauth_tokens",
        "select * from api_tokens",
        "select * from tower_sessions.session",
    ] {
        assert_eq!(
            try_count(&mut w, sql).await,
            Err(DENIED.to_owned()),
            "worker: {sql}"
        );
    }
    w.rollback().await?;

    let mut a = db.auth().await?;
    assert_eq!(try_count(&mut a, "select * from oauth_tokens").await, Ok(1));
    assert_eq!(
        try_count(
            &mut a,
            "select * from api_tokens where secret_hash = '\\x20'"
        )
        .await,
        Ok(1)
    );
    assert_eq!(
        try_count(&mut a, "select * from guilds where removed_at is null").await,
        Ok(2)
    );
    assert_eq!(
        try_exec(&mut a, "insert into members (guild_id, user_id, role_ids) values (2, 11, '{}') on conflict (guild_id, user_id) do update set role_ids = excluded.role_ids").await,
        Ok(1)
    );
    assert_eq!(
        try_exec(
            &mut a,
            "delete from members where user_id = 11 and guild_id = 2"
        )
        .await,
        Ok(1)
    );
    assert_eq!(
        try_exec(
            &mut a,
            "update api_tokens set last_used_at = now() where secret_hash = '\\x20'"
        )
        .await,
        Ok(1)
    );
    for sql in [
        "select * from messages",
        "select * from channels",
        "select * from permission_overwrites",
        "select * from tower_sessions.session",
    ] {
        assert_eq!(
            try_count(&mut a, sql).await,
            Err(DENIED.to_owned()),
            "auth: {sql}"
        );
    }
    for sql in [
        "update api_tokens set revoked_at = now()",
        "update guilds set observer_role_ids = '{}'",
        "delete from users",
    ] {
        assert_eq!(
            try_exec(&mut a, sql).await,
            Err(DENIED.to_owned()),
            "auth: {sql}"
        );
    }
    a.commit().await?;
    Ok(())
}

async fn recv_within(
    listener: &mut PgListener,
    wait: Duration,
) -> anyhow::Result<Option<(String, String)>> {
    match tokio::time::timeout(wait, listener.recv()).await {
        Ok(n) => {
            let n = n?;
            Ok(Some((n.channel().to_owned(), n.payload().to_owned())))
        }
        Err(_) => Ok(None),
    }
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn one_notification_per_transaction_and_access_events(pool: PgPool) -> anyhow::Result<()> {
    let db = setup(&pool).await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener
        .listen_all(["observer_events", "observer_access"])
        .await?;
    let before: i64 = sqlx::query_scalar("select coalesce(max(seq), 0) from access_events")
        .fetch_one(&pool)
        .await?;

    // Two statements inserting events, one no-op access update, one real access change.
    let mut w = db.worker().await?;
    for _ in 0..2 {
        sqlx::query("insert into message_events (guild_id, kind, channel_id, message_id) values (1, 2, 1001, 5001), (1, 2, 1001, 5001)")
            .execute(&mut *w)
            .await?;
    }
    sqlx::query("update roles set name = 'renamed' where guild_id = 1")
        .execute(&mut *w)
        .await?;
    sqlx::query("update members set role_ids = '{100}' where guild_id = 1 and user_id = 11")
        .execute(&mut *w)
        .await?;
    sqlx::query("insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow) values (1, 1002, 30, 1, $1), (1, 1001, 100, 0, $1)")
        .bind(VIEW)
        .execute(&mut *w)
        .await?;
    w.commit().await?;

    let mut got = vec![];
    while let Some(n) = recv_within(&mut listener, Duration::from_millis(500)).await? {
        got.push(n);
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("observer_access".to_owned(), String::new()),
            ("observer_events".to_owned(), String::new())
        ],
        "exactly one notification per channel for the transaction"
    );
    let rows: Vec<(i64, Option<i64>)> = sqlx::query_as(
        "select guild_id, user_id from access_events where seq > $1 order by user_id nulls first",
    )
    .bind(before)
    .fetch_all(&pool)
    .await?;
    assert_eq!(rows, vec![(1, None), (1, Some(11)), (1, Some(30))]);

    // A statement that changes nothing access-related notifies nothing.
    let mut w = db.worker().await?;
    sqlx::query("update channels set name = 'renamed'")
        .execute(&mut *w)
        .await?;
    w.commit().await?;
    assert_eq!(
        recv_within(&mut listener, Duration::from_millis(300)).await?,
        None
    );

    // The api's settings update records an access change too, as does the auth path.
    let mut v = db.viewer(10).await?;
    sqlx::query("update guilds set observer_role_ids = '{100}' where guild_id = 1")
        .execute(&mut *v)
        .await?;
    v.commit().await?;
    assert_eq!(
        recv_within(&mut listener, Duration::from_secs(5)).await?,
        Some(("observer_access".to_owned(), String::new()))
    );
    let mut a = db.auth().await?;
    sqlx::query("delete from members where guild_id = 2 and user_id = 30")
        .execute(&mut *a)
        .await?;
    a.commit().await?;
    assert_eq!(
        recv_within(&mut listener, Duration::from_secs(5)).await?,
        Some(("observer_access".to_owned(), String::new()))
    );
    let last: (i64, Option<i64>) =
        sqlx::query_as("select guild_id, user_id from access_events order by seq desc limit 1")
            .fetch_one(&pool)
            .await?;
    assert_eq!(last, (2, Some(30)));
    Ok(())
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn the_fanout_role_reads_events_and_access_data_only(pool: PgPool) -> anyhow::Result<()> {
    let db = setup(&pool).await?;
    let mut f = db.fanout().await?;
    assert_eq!(
        try_count(&mut f, "select * from message_events").await,
        Ok(4)
    );
    assert_eq!(try_count(&mut f, "select * from messages").await, Ok(4));
    assert_eq!(
        try_count(&mut f, "select * from permission_overwrites").await,
        Ok(2)
    );
    assert!(matches!(try_count(&mut f, "select * from access_events").await, Ok(n) if n > 0));
    for sql in [
        "select * from users",
        "select * from oauth_tokens",
        "select * from api_tokens",
        "select * from tower_sessions.session",
    ] {
        assert_eq!(
            try_count(&mut f, sql).await,
            Err(DENIED.to_owned()),
            "fanout: {sql}"
        );
    }
    for sql in [
        "update messages set content = 'x'",
        "delete from message_events",
        "insert into access_events (guild_id) values (1)",
        "update guilds set observer_role_ids = '{}'",
    ] {
        // Refused twice over: a read-only transaction, and no privilege.
        assert_eq!(
            try_exec(&mut f, sql).await,
            Err("25006".to_owned()),
            "fanout: {sql}"
        );
    }
    f.rollback().await?;
    let mut f = db.fanout().await?;
    sqlx::query("select set_config('transaction_read_only', 'off', true)")
        .execute(&mut *f)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a fan-out transaction cannot become read-write"))?;
    f.rollback().await?;
    let mut conn = pool.begin().await?;
    sqlx::query("select set_config('role', 'observer_fanout', true)")
        .execute(&mut *conn)
        .await?;
    for sql in [
        "update messages set content = 'x'",
        "delete from message_events",
        "insert into access_events (guild_id) values (1)",
    ] {
        assert_eq!(
            try_exec(&mut conn, sql).await,
            Err(DENIED.to_owned()),
            "fanout role: {sql}"
        );
    }
    conn.rollback().await?;
    Ok(())
}

/// Calls of `access.viewer_scopes()` (the rule) made by `sql` inside the viewer's transaction.
async fn rule_calls(db: &Db, viewer: i64, sql: &str) -> anyhow::Result<i64> {
    let mut tx = db.viewer(viewer).await?;
    let before: i64 = sqlx::query_scalar(
        "select coalesce(pg_stat_get_xact_function_calls('access.viewer_scopes'::regproc), 0)",
    )
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(sql).execute(&mut *tx).await?;
    let after: i64 = sqlx::query_scalar(
        "select coalesce(pg_stat_get_xact_function_calls('access.viewer_scopes'::regproc), 0)",
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.rollback().await?;
    Ok(after - before)
}

#[sqlx::test(migrator = "observer_db::MIGRATOR")]
async fn the_rule_runs_once_per_query_not_once_per_row(pool: PgPool) -> anyhow::Result<()> {
    migrate::apply_policies(&pool).await?;
    seed(&pool).await?;
    // Function-call counting is a superuser setting: turn it on for every
    // connection of a one-connection pool, then switch roles inside it.
    let opts = (*pool.connect_options())
        .clone()
        .options([("track_functions", "all")]);
    let one = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await?;
    let db = Db::new(one.clone());
    // Each query with the most evaluations of the rule it may make: the
    // messages policy at most 6 (scopes and guilds; for a thread's rows the
    // lookup's scopes and the channels policy's guilds, scopes and
    // MANAGE_THREADS scopes), a revision pays for its message, a join for both.
    let bounds = [
        ("select * from messages", 6),
        ("select * from message_events", 6),
        ("select * from channels", 3),
        ("select * from message_revisions", 6),
        ("select m.message_id, r.content from messages m join message_revisions r using (guild_id, message_id)", 12),
        ("select * from conversations", 3),
    ];
    let queries = bounds.map(|(q, _)| q);
    // A public and a private thread (the viewer a member of it) with a
    // message each, so the small case already takes every arm of the policies.
    sqlx::raw_sql(
        "insert into channels (guild_id, channel_id, kind, name, parent_id) values
           (1, 1091, 11, 'public thread', 1001), (1, 1092, 12, 'private thread', 1001);
         insert into thread_members (guild_id, thread_id, user_id) values (1, 1092, 11);
         insert into messages (guild_id, message_id, channel_id, created_at) values
           (1, 9001, 1091, now()), (1, 9002, 1092, now());
         insert into message_events (guild_id, kind, channel_id, message_id) values
           (1, 1, 1091, 9001), (1, 1, 1092, 9002);
         insert into message_revisions (guild_id, message_id, version_at, content) values
           (1, 9001, now() - interval '1 day', 'old'), (1, 9002, now() - interval '1 day', 'old');
         insert into conversations (guild_id, conversation_id, channel_id, parent_id, opened_at,
                                    state, private) values
           (1, 1091, 1091, 1001, now(), 'NEW', false), (1, 1092, 1092, 1001, now(), 'NEW', true);",
    )
    .execute(&pool)
    .await?;
    let mut small = vec![];
    for q in queries {
        small.push(rule_calls(&db, 11, q).await?);
    }
    // Many more rows in the visible channel, and as many in threads under it
    // (a thread's rows take the policies' lookup arm).
    sqlx::raw_sql(
        "insert into channels (guild_id, channel_id, kind, name, parent_id)
           select 1, 1100 + t, case when t % 2 = 0 then 11 else 12 end, 'thread', 1001
           from generate_series(1, 200) t;
         insert into thread_members (guild_id, thread_id, user_id)
           select 1, 1100 + t, 11 from generate_series(1, 200, 4) t;
         insert into messages (guild_id, message_id, channel_id, created_at)
           select 1, 10000 + g, case when g % 2 = 0 then 1001 else 1100 + g % 200 + 1 end, now()
           from generate_series(1, 4000) g;
         insert into message_revisions (guild_id, message_id, version_at, content)
           select 1, 10000 + g, now() - interval '1 day', 'old' from generate_series(1, 4000) g;
         insert into message_events (guild_id, kind, channel_id, message_id)
           select 1, 1, m.channel_id, m.message_id from messages m where m.message_id > 10000;
         insert into conversations (guild_id, conversation_id, channel_id, parent_id, opened_at,
                                    state, private)
           select 1, 1100 + t, 1100 + t, 1001, now(), 'NEW', t % 2 = 1
           from generate_series(1, 200) t;
         analyze;",
    )
    .execute(&pool)
    .await?;
    for ((q, bound), before) in bounds.iter().zip(small) {
        let calls = rule_calls(&db, 11, q).await?;
        println!("{q}: {calls}");
        assert!(calls >= 1, "{q}: the rule ran ({calls})");
        assert_eq!(calls, before, "{q}: calls must not grow with rows");
        assert!(calls <= *bound, "{q}: {calls} evaluations");
    }
    Ok(())
}
