-- What the support queue reads from threads and forums (docs/support-queue.md):
-- a forum or media channel's tags, the tags applied to a post, whether a thread
-- is locked, and when Discord says it was created.
--
-- available_tags: the channel's tags as Discord sends them, trimmed to
--   [{"id": "<snowflake>", "name": "...", "moderated": bool}], replaced as a
--   whole with every CHANNEL_CREATE/UPDATE (Discord always sends the full list).
-- applied_tags: ids of the parent's tags on a forum or media post.
-- locked: only members with MANAGE_THREADS may unarchive or post (a solved
--   marker when a guild says so).
-- thread_created_at: thread_metadata.create_timestamp; Discord omits it for
--   threads created before 2022-01-09, whose creation is their id's time.
alter table channels
    add column available_tags    jsonb       not null default '[]',
    add column applied_tags      bigint[]    not null default '{}',
    add column locked            boolean     not null default false,
    add column thread_created_at timestamptz;
