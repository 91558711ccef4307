-- The support queue (docs/support-queue.md): per-guild settings with their
-- audit trail, the solved markers the worker observed, and the conversations
-- derived from threads at ingest.

-- One row per guild that changed a default; no row means every default.
create table support_settings (
    guild_id                    bigint      primary key,
    -- Forum/media channels whose posts are conversations; NULL = every forum
    -- and media channel.
    support_channel_ids         bigint[],
    -- Empty: staff are members with MANAGE_MESSAGES in the support channel.
    staff_role_ids              bigint[]    not null default '{}',
    -- Tag names that mean solved (case-insensitive); NULL = the default pattern.
    solved_tag_names            text[],
    locked_means_solved         boolean     not null default true,
    archived_means_solved       boolean     not null default false,
    first_response_target_secs  integer     check (first_response_target_secs > 0),
    -- {"timeZone": "Europe/Paris", "weekly": [{"day": 1, "start": "09:00", "end": "17:00"}, ...]}
    business_hours              jsonb,
    updated_at                  timestamptz not null default now(),
    updated_by                  bigint,
    -- The background recomputation a change starts: requested at `updated_at`
    -- (`recompute_requested`), done when `recomputed_at` >= it; progress in
    -- conversations.
    recompute_requested         boolean     not null default false,
    recompute_total             integer     not null default 0,
    recompute_done              integer     not null default 0,
    recomputed_at               timestamptz
);

-- Append-only: who changed what, when.
create table support_settings_audit (
    guild_id    bigint      not null,
    audit_id    bigserial,
    changed_by  bigint      not null,
    changed_at  timestamptz not null default now(),
    old         jsonb       not null,
    new         jsonb       not null,
    primary key (guild_id, audit_id)
);

-- A solved marker (tag, lock, archive as the settings say) as the worker saw
-- it come and go. Discord does not say when a tag was applied, so the
-- observation time stands in; `first_sight` marks one already present when
-- the conversation was first seen, which is dated at its latest message
-- before `observed_at` instead (docs/support-queue.md, "Solved markers").
create table conversation_solved_marks (
    guild_id            bigint      not null,
    conversation_id     bigint      not null,
    observed_at         timestamptz not null,
    first_sight         boolean     not null,
    cleared_at          timestamptz,
    primary key (guild_id, conversation_id, observed_at)
);

create table conversations (
    guild_id                bigint      not null,
    -- The thread's id (or, later, the opening message's id in a text channel).
    conversation_id         bigint      not null,
    -- The channel whose visibility governs the conversation: the thread
    -- itself, so private threads follow the rule messages follow.
    channel_id              bigint      not null,
    -- The support channel (the forum) it belongs to.
    parent_id               bigint      not null,
    requester_id            bigint,
    opened_at               timestamptz not null,
    state                   text        not null
        check (state in ('NEW', 'WAITING_ON_STAFF', 'WAITING_ON_REQUESTER', 'SOLVED')),
    first_response_at       timestamptz,
    first_responder_id      bigint,
    first_response_deleted  boolean     not null default false,
    last_requester_at       timestamptz,
    last_staff_at           timestamptz,
    last_message_at         timestamptz,
    first_solved_at         timestamptz,
    last_solved_at          timestamptz,
    reopen_count            integer     not null default 0,
    message_count           integer     not null default 0,
    participant_ids         bigint[]    not null default '{}',
    tag_ids                 bigint[]    not null default '{}',
    -- Start of the current wait (NEW or WAITING_ON_STAFF); NULL otherwise.
    waiting_since           timestamptz,
    -- Requester wait over finished waits, in seconds (the current one is
    -- now() - waiting_since).
    wait_secs_closed        double precision not null default 0,
    -- Every next-response gap, in seconds.
    next_response_secs      double precision[] not null default '{}',
    -- The guild's first-response target when last recomputed (copied here:
    -- settings are for managers, the SLA status is for every viewer).
    sla_target_secs         integer,
    -- The newest message folded in: the worker's startup sweep recomputes
    -- conversations with newer stored messages (a crash between a message
    -- write and its recomputation, crates/db/src/support/mod.rs).
    last_message_id         bigint,
    recomputed_at           timestamptz not null default now(),
    primary key (guild_id, conversation_id)
);
-- The queue: oldest wait first, per guild and state.
create index conversations_queue_idx
    on conversations (guild_id, (coalesce(waiting_since, 'infinity'::timestamptz)), conversation_id);
-- Windows for the telemetry.
create index conversations_opened_idx on conversations (guild_id, opened_at);
create index conversations_channel_idx on conversations (channel_id);
