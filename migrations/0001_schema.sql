-- Support Observer schema.
--
-- Conventions (see ARCHITECTURE.md and policies/README.md):
-- * Discord snowflakes are `bigint`; the API exposes them as strings.
-- * Every table holding tenant data has a `guild_id` column that is part of its
--   primary key (and of every unique index), so the schema can be distributed by
--   guild_id on Citus without redesign.
-- * Permission bitsets are `bigint` (Discord uses bits 0..52; bit 63 is never set).
-- * Row-level security, database roles and grants live in policies/ and are
--   (re)applied idempotently by `observer migrate` after these migrations.

create schema if not exists access;

-- ---------------------------------------------------------------------------
-- Tenants and what decides access
-- ---------------------------------------------------------------------------

create table guilds (
    guild_id          bigint      not null primary key,
    name              text        not null default '',
    icon              text,
    owner_id          bigint      not null default 0,
    -- Tenant setting: if non-empty, a viewer must hold one of these roles (or be
    -- owner / ADMINISTRATOR) to observe anything in this guild.
    observer_role_ids bigint[]    not null default '{}',
    -- Tenant setting: keep messages this long; NULL keeps forever.
    retention         interval,
    -- Set when the bot leaves or is removed (GUILD_DELETE without `unavailable`).
    -- Data is kept for forensics but nobody may read it while this is set.
    removed_at        timestamptz,
    -- Outage (GUILD_DELETE with unavailable=true): access data may be stale.
    unavailable       boolean     not null default false,
    updated_at        timestamptz not null default now()
);

-- Channels of every type, threads included (Discord models threads as channels).
create table channels (
    guild_id    bigint      not null,
    channel_id  bigint      not null,
    -- Discord channel type: 0 text, 2 voice, 4 category, 5 announcement,
    -- 10 announcement thread, 11 public thread, 12 private thread, 13 stage,
    -- 15 forum, 16 media.
    kind        smallint    not null,
    name        text        not null default '',
    -- Category for channels; the parent text/forum/announcement channel for threads.
    parent_id   bigint,
    position    integer     not null default 0,
    topic       text,
    -- Threads only.
    archived    boolean     not null default false,
    owner_id    bigint,
    updated_at  timestamptz not null default now(),
    primary key (guild_id, channel_id)
);
create index channels_parent_idx on channels (guild_id, parent_id);
-- Channel ids are globally unique snowflakes; many lookups come with the channel id only.
create index channels_channel_id_idx on channels (channel_id);

-- Permission overwrites of a channel (threads have none of their own that matter:
-- Discord computes thread access on the parent).
create table permission_overwrites (
    guild_id    bigint   not null,
    channel_id  bigint   not null,
    -- role id (kind 0) or user id (kind 1); the @everyone overwrite has target_id = guild_id.
    target_id   bigint   not null,
    kind        smallint not null check (kind in (0, 1)),
    allow       bigint   not null default 0,
    deny        bigint   not null default 0,
    primary key (guild_id, channel_id, target_id, kind)
);

create table roles (
    guild_id    bigint   not null,
    role_id     bigint   not null,  -- the @everyone role has role_id = guild_id
    name        text     not null default '',
    permissions bigint   not null default 0,
    position    integer  not null default 0,
    primary key (guild_id, role_id)
);

-- Current members. A member who leaves is deleted (their messages keep an author snapshot).
create table members (
    guild_id                     bigint      not null,
    user_id                      bigint      not null,
    role_ids                     bigint[]    not null default '{}',  -- never includes @everyone
    nick                         text,
    joined_at                    timestamptz,
    communication_disabled_until timestamptz,                          -- timeout
    updated_at                   timestamptz not null default now(),
    -- When the stored data was observed (gateway event received, REST fetch
    -- started). Two writers (worker, login refresh) race; a write applies only
    -- if it was observed later than what is stored, so a stale snapshot can
    -- never restore a role the gateway already removed.
    observed_at                  timestamptz not null default '-infinity',
    primary key (guild_id, user_id)
);
create index members_user_idx on members (user_id);

-- The latest observed removal of a member (GUILD_MEMBER_REMOVE, a 404 re-read,
-- a login refresh that no longer finds the guild). A member write observed at
-- or before it is stale and is not applied, so a late add cannot re-create a
-- member whose removal was observed later.
create table member_removals (
    guild_id     bigint      not null,
    user_id      bigint      not null,
    observed_at  timestamptz not null,
    primary key (guild_id, user_id)
);

-- Members of threads (private threads need membership or MANAGE_THREADS).
create table thread_members (
    guild_id   bigint not null,
    thread_id  bigint not null,
    user_id    bigint not null,
    primary key (guild_id, thread_id, user_id)
);
create index thread_members_user_idx on thread_members (user_id);

-- ---------------------------------------------------------------------------
-- Messages
-- ---------------------------------------------------------------------------

create table messages (
    guild_id             bigint      not null,
    message_id           bigint      not null,
    channel_id           bigint      not null,
    -- Author snapshot. NULL only for a tombstone whose create was never seen
    -- (a delete that arrived before, or instead of, the create).
    author_id            bigint,
    author_username      text,
    author_display_name  text,
    author_avatar        text,
    author_bot           boolean     not null default false,
    content              text        not null default '',
    -- Discord's `timestamp` (creation time; also derivable from the snowflake).
    created_at           timestamptz not null,
    edited_at            timestamptz,
    deleted_at           timestamptz,
    -- [{id, filename, url, size, content_type}] as sanitised by the worker.
    attachments          jsonb       not null default '[]',
    reply_to_id          bigint,
    -- true once a MESSAGE_CREATE (or a history fetch) has filled the row; a
    -- tombstone created by an early delete has false.
    seen_create          boolean     not null default false,
    -- Ingestion's bookkeeping (never shown): when the stored content version
    -- became current (edited_at, else created_at), NULL while no content was
    -- ever observed (a tombstone from an early delete, content-less updates);
    -- and whether `attachments` was observed at all ('[]' may mean "unknown").
    version_at           timestamptz,
    attachments_known    boolean     not null default false,
    search               tsvector generated always as (to_tsvector('english'::regconfig, content)) stored,
    primary key (guild_id, message_id)
);
-- History pages: newest first within a channel.
create index messages_channel_idx on messages (channel_id, message_id desc);
create index messages_search_idx on messages using gin (search);
-- Retention purge scans by guild and age.
create index messages_guild_created_idx on messages (guild_id, created_at);

-- Every version of a message's content that was ever observed, keyed by the
-- time it became current (created_at for the original, edited_at for edits).
-- Insert-only and idempotent, so any arrival order yields the same set.
-- A message's revisions are all versions except its current one.
create table message_revisions (
    guild_id    bigint      not null,
    message_id  bigint      not null,
    version_at  timestamptz not null,
    content     text        not null,
    primary key (guild_id, message_id, version_at)
);

-- ---------------------------------------------------------------------------
-- Ordered, durable event log (cursor source for subscriptions)
-- ---------------------------------------------------------------------------
--
-- Commit order vs sequence order: two worker transactions may take sequence
-- values 10 and 11 and commit as 11 then 10. A reader that remembers "seen up
-- to 11" would skip 10 forever. Each event therefore records the id of the
-- transaction that wrote it (`xid`), and readers only consume events whose
-- xid is below the snapshot's xmin (`pg_snapshot_xmin(pg_current_snapshot())`):
-- every transaction with a smaller xid has finished, and every future one
-- gets a larger xid. Events are ordered by (xid, seq) and that pair is the
-- cursor: a prefix of this order, once readable, never changes.
create table message_events (
    guild_id    bigint      not null,
    seq         bigint      generated always as identity,
    xid         xid8        not null default pg_current_xact_id(),
    -- 1 created, 2 updated, 3 deleted
    kind        smallint    not null check (kind in (1, 2, 3)),
    channel_id  bigint      not null,
    message_id  bigint      not null,
    at          timestamptz not null default now(),
    primary key (guild_id, seq)
);
create index message_events_order_idx on message_events (xid, seq);

-- Access-relevant changes (roles, overwrites, members, channels, guild settings),
-- so API processes can refresh in-memory access sets. Same cursor scheme.
create table access_events (
    guild_id    bigint      not null,
    seq         bigint      generated always as identity,
    xid         xid8        not null default pg_current_xact_id(),
    -- the user whose access changed, or NULL when the change may affect everyone in the guild
    user_id     bigint,
    at          timestamptz not null default now(),
    primary key (guild_id, seq)
);
create index access_events_order_idx on access_events (xid, seq);

-- ---------------------------------------------------------------------------
-- Viewers, API tokens, sessions (not tenant data: no guild_id)
-- ---------------------------------------------------------------------------

-- Discord users who logged in through OAuth.
create table users (
    user_id     bigint      not null primary key,
    username    text        not null,
    global_name text,
    avatar      text,
    created_at  timestamptz not null default now(),
    last_login  timestamptz not null default now(),
    -- when their guild memberships were last fetched with their OAuth token
    memberships_refreshed_at timestamptz
);

-- OAuth tokens are kept apart from `users` so that only the auth path can read them.
create table oauth_tokens (
    user_id       bigint      not null primary key references users (user_id) on delete cascade,
    access_token  text        not null,
    refresh_token text,
    expires_at    timestamptz not null,
    scope         text        not null default '',
    updated_at    timestamptz not null default now()
);

-- API tokens for scripts and dashboards. Only a SHA-256 hash of the secret is stored.
create table api_tokens (
    token_id     uuid        not null primary key,
    user_id      bigint      not null references users (user_id) on delete cascade,
    name         text        not null,
    secret_hash  bytea       not null unique,
    created_at   timestamptz not null default now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
create index api_tokens_user_idx on api_tokens (user_id);

-- tower-sessions' PostgresStore table (schema and shape as the store expects;
-- created here because the runtime role may not create schemas).
create schema if not exists tower_sessions;
create table tower_sessions.session (
    id          text        primary key not null,
    data        bytea       not null,
    expiry_date timestamptz not null
);
create index session_expiry_idx on tower_sessions.session (expiry_date);
