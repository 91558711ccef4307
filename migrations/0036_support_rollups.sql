-- Daily telemetry rollups (docs/support-queue.md, "Telemetry at scale").
--
-- `supportStats` over a month at 500k conversations reads ~170,000 rows; these
-- per-(guild, scope, UTC day) summaries let it read ~30 rows plus the edges.
-- Only conversations outside private threads are summarised: a private
-- conversation's visibility is per viewer (membership), a scope's is not, so
-- RLS on a rollup row tests its scope exactly as on a conversation.
--
-- A histogram is a flat int4[] of (bucket, count) pairs, bucket 0 for values
-- under a second and k >= 1 for [1.02^(k-1), 1.02^k) seconds
-- (crates/db/src/support/rollup.rs: the only code that writes or reads them).
create table conversation_rollups (
    guild_id        bigint      not null,
    parent_id       bigint      not null,
    day             date        not null,
    opened          integer     not null,
    messages        bigint      not null,
    unanswered      integer     not null,
    unresolved      integer     not null,
    solved          integer     not null,
    reopened        integer     not null,
    -- SLA outcomes decided by a reply or solve (the rest are decided by the
    -- clock at read time: those conversations are still waiting).
    sla_met         integer     not null,
    sla_breached    integer     not null,
    -- Opened per UTC hour of the day (24 entries).
    opened_by_hour  integer[]   not null,
    responder_ids   bigint[]    not null,
    responder_counts integer[]  not null,
    first_response  integer[]   not null,
    next_response   integer[]   not null,
    first_resolution integer[]  not null,
    full_resolution integer[]   not null,
    -- Requester wait of conversations not waiting at rebuild time (a waiting
    -- one's wait grows with the clock and is read from its row).
    requester_wait  integer[]   not null,
    rebuilt_at      timestamptz not null default now(),
    primary key (guild_id, parent_id, day)
);

-- Days whose rollup is out of date. Append-only with no key, so concurrent
-- ingest transactions never wait on each other here; the worker drains it.
create table conversation_rollup_dirty (
    guild_id    bigint  not null,
    parent_id   bigint  not null,
    day         date    not null
);

-- Every write to conversations marks the days it touched (old and new),
-- whatever code path wrote it: one statement-level insert per statement.
create or replace function conversation_rollup_mark() returns trigger
language plpgsql as $$
begin
    if tg_op in ('INSERT', 'UPDATE') then
        insert into conversation_rollup_dirty (guild_id, parent_id, day)
        select distinct n.guild_id, n.parent_id, (n.opened_at at time zone 'UTC')::date
        from new_rows n;
    end if;
    if tg_op in ('UPDATE', 'DELETE') then
        insert into conversation_rollup_dirty (guild_id, parent_id, day)
        select distinct o.guild_id, o.parent_id, (o.opened_at at time zone 'UTC')::date
        from old_rows o;
    end if;
    return null;
end
$$;

create trigger conversation_rollup_ins after insert on conversations
    referencing new table as new_rows
    for each statement execute function conversation_rollup_mark();
create trigger conversation_rollup_upd after update on conversations
    referencing old table as old_rows new table as new_rows
    for each statement execute function conversation_rollup_mark();
create trigger conversation_rollup_del after delete on conversations
    referencing old table as old_rows
    for each statement execute function conversation_rollup_mark();

-- The rollup read path takes private conversations from their rows.
create index conversations_private_idx on conversations (guild_id, opened_at) where private;

-- Conversations that exist already get their rollups at the worker's next tick.
insert into conversation_rollup_dirty (guild_id, parent_id, day)
select distinct guild_id, parent_id, (opened_at at time zone 'UTC')::date from conversations;
