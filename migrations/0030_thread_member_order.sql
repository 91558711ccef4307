-- Thread membership and the bot's presence in a guild get the same
-- observed-at ordering as member rows (issue 12): handlers run concurrently
-- and REST listings are taken while events keep arriving, so the order in
-- which writes reach the database says nothing about the order in which
-- Discord's state changed. A write applies only if it was observed later
-- than what is stored (and than any recorded removal).

-- When this membership was last observed (THREAD_MEMBERS_UPDATE received,
-- THREAD_LIST_SYNC received, a thread-member listing started).
alter table thread_members
    add column observed_at timestamptz not null default '-infinity';

-- The latest observed removal of a thread member (THREAD_MEMBERS_UPDATE's
-- removed ids, or a complete listing that no longer holds the user). A
-- membership observed at or before it is stale and is not re-added. Purged
-- after a day, like member_removals.
create table thread_member_removals (
    guild_id     bigint      not null,
    thread_id    bigint      not null,
    user_id      bigint      not null,
    observed_at  timestamptz not null,
    primary key (guild_id, thread_id, user_id)
);

-- When the bot's presence in the guild was last observed (GUILD_CREATE or a
-- GUILD_DELETE without `unavailable`): the newer observation decides
-- `removed_at`, whichever reached the database first.
alter table guilds
    add column presence_observed_at timestamptz not null default '-infinity';
