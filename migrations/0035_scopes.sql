-- Rights at scale (docs/support-queue.md, "Rights at scale"): the access rule
-- now lists only non-thread channels (scopes) and judges a thread through its
-- parent, so its cost no longer grows with the number of threads.

-- viewer_scopes() reads a guild's non-thread channels; a support forum with
-- 100,000 posts would otherwise make that a scan of 100,000 thread rows.
-- The predicate must stay exactly `kind not in (10, 11, 12)` (the function's).
create index if not exists channels_scope_idx
    on channels (guild_id, channel_id) where kind not in (10, 11, 12);

-- A conversation in a private thread needs more than its scope's rights
-- (MANAGE_THREADS there, or membership): the policy needs to know which.
alter table conversations add column if not exists private boolean not null default false;
