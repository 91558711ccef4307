//! Fixture rows written as the superuser test connection (reads under test
//! go through the API or a role-switched transaction).
//!
//! dynamic: test-only seeding that runs against a migrated test database; not
//! part of the product's query surface, so it is not checked at compile time
//! (crates/db/README.md, "Compile-time checked SQL").

use sqlx::PgPool;

pub async fn guild(pool: &PgPool, guild_id: i64, name: &str, owner_id: i64) {
    sqlx::query("insert into guilds (guild_id, name, owner_id) values ($1, $2, $3)")
        .bind(guild_id)
        .bind(name)
        .bind(owner_id)
        .execute(pool)
        .await
        .unwrap();
    // The @everyone role (id = guild id) with no permissions unless set.
    role(pool, guild_id, guild_id, 0).await;
}

pub async fn role(pool: &PgPool, guild_id: i64, role_id: i64, permissions: u64) {
    sqlx::query(
        "insert into roles (guild_id, role_id, name, permissions) values ($1, $2, $3, $4) \
         on conflict (guild_id, role_id) do update set permissions = excluded.permissions",
    )
    .bind(guild_id)
    .bind(role_id)
    .bind(format!("role-{role_id}"))
    .bind(permissions as i64)
    .execute(pool)
    .await
    .unwrap();
}

pub async fn channel(
    pool: &PgPool,
    guild_id: i64,
    channel_id: i64,
    kind: i16,
    parent_id: Option<i64>,
    name: &str,
) {
    sqlx::query(
        "insert into channels (guild_id, channel_id, kind, name, parent_id, position) \
         values ($1, $2, $3, $4, $5, 0)",
    )
    .bind(guild_id)
    .bind(channel_id)
    .bind(kind)
    .bind(name)
    .bind(parent_id)
    .execute(pool)
    .await
    .unwrap();
}

pub async fn overwrite(
    pool: &PgPool,
    guild_id: i64,
    channel_id: i64,
    target_id: i64,
    kind: i16,
    allow: u64,
    deny: u64,
) {
    sqlx::query(
        "insert into permission_overwrites (guild_id, channel_id, target_id, kind, allow, deny) \
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(guild_id)
    .bind(channel_id)
    .bind(target_id)
    .bind(kind)
    .bind(allow as i64)
    .bind(deny as i64)
    .execute(pool)
    .await
    .unwrap();
}

pub async fn member(pool: &PgPool, guild_id: i64, user_id: i64, roles: &[i64]) {
    sqlx::query("insert into members (guild_id, user_id, role_ids) values ($1, $2, $3)")
        .bind(guild_id)
        .bind(user_id)
        .bind(roles)
        .execute(pool)
        .await
        .unwrap();
}

pub async fn thread_member(pool: &PgPool, guild_id: i64, thread_id: i64, user_id: i64) {
    sqlx::query("insert into thread_members (guild_id, thread_id, user_id) values ($1, $2, $3)")
        .bind(guild_id)
        .bind(thread_id)
        .bind(user_id)
        .execute(pool)
        .await
        .unwrap();
}

/// Inserts a message created at `message_id` seconds after 2026-01-01.
pub async fn message(
    pool: &PgPool,
    guild_id: i64,
    channel_id: i64,
    message_id: i64,
    author_id: i64,
    content: &str,
) {
    sqlx::query(
        "insert into messages (guild_id, message_id, channel_id, author_id, author_username, \
           content, created_at, seen_create) \
         values ($1, $2, $3, $4, $5, $6, timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => $7), true)",
    )
    .bind(guild_id)
    .bind(message_id)
    .bind(channel_id)
    .bind(author_id)
    .bind(format!("user{author_id}"))
    .bind(content)
    .bind((message_id % 1_000_000) as f64)
    .execute(pool)
    .await
    .unwrap();
}
