-- Row-level security. ENABLE and FORCE on every table that has a guild_id column
-- (found from the catalog, so a table added by a later migration is locked down
-- the moment it exists: with no policy for a role, that role reads nothing),
-- and on users, api_tokens, oauth_tokens.
do $$
declare
    t regclass;
begin
    for t in
        select c.oid::regclass
        from pg_catalog.pg_class c
        join pg_catalog.pg_namespace n on n.oid = c.relnamespace
        where c.relkind in ('r', 'p')
          and n.nspname not in ('pg_catalog', 'information_schema')
          and n.nspname not like 'pg_toast%'
          and (exists (select 1 from pg_catalog.pg_attribute a
                       where a.attrelid = c.oid and a.attname = 'guild_id' and not a.attisdropped)
               or (n.nspname = 'public' and c.relname in ('users', 'api_tokens', 'oauth_tokens')))
    loop
        execute format('alter table %s enable row level security', t);
        execute format('alter table %s force row level security', t);
    end loop;
end
$$;

-- Policies are dropped and recreated on every run (idempotent; a renamed or
-- removed policy disappears). Only this file's tables and prefix ("observer_").
do $$
declare
    p record;
begin
    for p in
        select schemaname, tablename, policyname
        from pg_catalog.pg_policies
        where schemaname = 'public'
          and policyname like 'observer\_%'
          and tablename in ('guilds', 'channels', 'permission_overwrites', 'roles', 'members', 'member_removals',
                            'thread_members', 'thread_member_removals', 'messages', 'message_revisions', 'message_events',
                            'access_events', 'users', 'oauth_tokens', 'api_tokens',
                            'support_settings', 'support_settings_audit', 'conversation_solved_marks',
                            'conversations', 'conversation_rollups', 'conversation_rollup_dirty')
    loop
        execute format('drop policy %I on %I.%I', p.policyname, p.schemaname, p.tablename);
    end loop;
end
$$;

-- Replaced by access.visible_scope_ids (threads are judged through their
-- parent); dropped once no policy refers to it.
drop function if exists access.visible_channel_ids(boolean);

-- worker: all rows of every ingest table.
create policy observer_worker_all on guilds for all to observer_worker using (true) with check (true);
create policy observer_worker_all on channels for all to observer_worker using (true) with check (true);
create policy observer_worker_all on permission_overwrites for all to observer_worker using (true) with check (true);
create policy observer_worker_all on roles for all to observer_worker using (true) with check (true);
create policy observer_worker_all on members for all to observer_worker using (true) with check (true);
create policy observer_worker_all on member_removals for all to observer_worker using (true) with check (true);
create policy observer_worker_all on thread_members for all to observer_worker using (true) with check (true);
create policy observer_worker_all on thread_member_removals for all to observer_worker using (true) with check (true);
create policy observer_worker_all on messages for all to observer_worker using (true) with check (true);
create policy observer_worker_all on message_revisions for all to observer_worker using (true) with check (true);
create policy observer_worker_all on message_events for all to observer_worker using (true) with check (true);
create policy observer_worker_all on access_events for all to observer_worker using (true) with check (true);

-- fanout: reads every row of what it may read (grants keep it read-only).
create policy observer_fanout_read on guilds for select to observer_fanout using (true);
create policy observer_fanout_read on channels for select to observer_fanout using (true);
create policy observer_fanout_read on permission_overwrites for select to observer_fanout using (true);
create policy observer_fanout_read on roles for select to observer_fanout using (true);
create policy observer_fanout_read on members for select to observer_fanout using (true);
create policy observer_fanout_read on thread_members for select to observer_fanout using (true);
create policy observer_fanout_read on messages for select to observer_fanout using (true);
create policy observer_fanout_read on message_revisions for select to observer_fanout using (true);
create policy observer_fanout_read on message_events for select to observer_fanout using (true);
create policy observer_fanout_read on access_events for select to observer_fanout using (true);

-- access-rule owner: reads the tables that decide access; appends access events.
create policy observer_access_read on guilds for select to observer_access using (true);
create policy observer_access_read on channels for select to observer_access using (true);
create policy observer_access_read on permission_overwrites for select to observer_access using (true);
create policy observer_access_read on roles for select to observer_access using (true);
create policy observer_access_read on members for select to observer_access using (true);
create policy observer_access_read on thread_members for select to observer_access using (true);
create policy observer_access_append on access_events for insert to observer_access with check (true);

-- api: the access rule. Every array helper sits in a scalar subquery so that it
-- is an InitPlan, evaluated once per query. The `::bigint[]` cast matters:
-- without it `x = any ((select ..))` parses as the row-wise subquery form.
--
-- Threads are judged through their parent (10_access.sql, viewer_scopes):
-- the helpers list scopes (non-thread channels), never threads, so a guild
-- with 100,000 forum posts costs the rule what one with ten does. A row that
-- carries its thread's parent (channels, conversations) tests it directly; a
-- message carries only its channel, so a message outside every scope looks
-- its channel up in `channels` — one primary-key probe, itself filtered by
-- the channels policy below (visibility, private threads), plus the history
-- test on the parent. Each textual helper call is one evaluation of the rule
-- per statement, made lazily: a query over non-thread messages pays two
-- (scopes, then guilds), one over thread messages up to five (scopes; in the
-- lookup scopes again, and the channels policy's guilds, scopes and, for
-- private threads, MANAGE_THREADS scopes) — never more with more rows
-- (rls.rs, the_rule_runs_once_per_query_not_once_per_row).
create policy observer_api_read on messages for select to observer_api
    using ((channel_id = any ((select access.visible_scope_ids(true))::bigint[])
            and guild_id = any ((select access.visible_guild_ids())::bigint[]))
           or coalesce((select true from channels c
                       where c.guild_id = messages.guild_id
                         and c.channel_id = messages.channel_id
                         and c.kind in (10, 11, 12)
                         and c.parent_id = any ((select access.visible_scope_ids(true))::bigint[])),
                      false));
create policy observer_api_read on message_events for select to observer_api
    using ((channel_id = any ((select access.visible_scope_ids(true))::bigint[])
            and guild_id = any ((select access.visible_guild_ids())::bigint[]))
           or coalesce((select true from channels c
                       where c.guild_id = message_events.guild_id
                         and c.channel_id = message_events.channel_id
                         and c.kind in (10, 11, 12)
                         and c.parent_id = any ((select access.visible_scope_ids(true))::bigint[])),
                      false));
-- A revision is visible exactly when its message is (the subquery is itself
-- filtered by the messages policy above). A scalar subquery, not EXISTS: the
-- planner may turn EXISTS into a hashed subplan that reads every visible
-- message; this stays one primary-key lookup per revision row.
create policy observer_api_read on message_revisions for select to observer_api
    using (coalesce((select true from messages m
                     where m.guild_id = message_revisions.guild_id
                       and m.message_id = message_revisions.message_id), false));
-- A thread is visible under a visible parent; a private one also needs
-- MANAGE_THREADS there or the viewer's own membership (rule step 5). Each
-- helper appears once: every textual `(select ..)` is an InitPlan of its own
-- (evaluated lazily, on first use), and the messages policy nests this one.
create policy observer_api_read on channels for select to observer_api
    using (guild_id = any ((select access.visible_guild_ids())::bigint[])
           and (case when kind in (10, 11, 12) then parent_id else channel_id end)
               = any ((select access.visible_scope_ids(false))::bigint[])
           and (kind <> 12
                or parent_id = any ((select access.manage_thread_scope_ids())::bigint[])
                or channel_id = any ((select access.member_thread_ids())::bigint[])));
create policy observer_api_read on guilds for select to observer_api
    using (guild_id = any ((select access.visible_guild_ids())::bigint[]));
create policy observer_api_manage on guilds for update to observer_api
    using (guild_id = any ((select access.manageable_guild_ids())::bigint[]))
    with check (guild_id = any ((select access.manageable_guild_ids())::bigint[]));
create policy observer_api_read on roles for select to observer_api
    using (guild_id = any ((select access.visible_guild_ids())::bigint[]));
create policy observer_api_own on members for select to observer_api
    using (user_id = (select access.viewer_id()));
create policy observer_api_own on thread_members for select to observer_api
    using (user_id = (select access.viewer_id()));
create policy observer_api_own on users for select to observer_api
    using (user_id = (select access.viewer_id()));
create policy observer_api_own on api_tokens for all to observer_api
    using (user_id = (select access.viewer_id()))
    with check (user_id = (select access.viewer_id()));

-- support queue: conversations follow their governing channel exactly as
-- messages do; settings and their audit are for the guild's managers only.
create policy observer_worker_all on conversations for all to observer_worker using (true) with check (true);
create policy observer_worker_all on conversation_solved_marks for all to observer_worker using (true) with check (true);
create policy observer_worker_all on support_settings for all to observer_worker using (true) with check (true);
-- `parent_id` is the conversation's scope (its thread's parent, or the channel
-- itself for a question asked outside a thread), so the common case needs no
-- lookup at all; a private thread also needs MANAGE_THREADS there or the
-- viewer's membership, exactly as in the channels policy.
create policy observer_api_read on conversations for select to observer_api
    using (guild_id = any ((select access.visible_guild_ids())::bigint[])
           and parent_id = any ((select access.visible_scope_ids(true))::bigint[])
           and (not private
                or parent_id = any ((select access.manage_thread_scope_ids())::bigint[])
                or channel_id = any ((select access.member_thread_ids())::bigint[])));
-- A rollup summarises only conversations outside private threads, whose
-- visibility is exactly their scope's.
create policy observer_worker_all on conversation_rollups for all to observer_worker using (true) with check (true);
create policy observer_worker_all on conversation_rollup_dirty for all to observer_worker using (true) with check (true);
create policy observer_api_read on conversation_rollups for select to observer_api
    using (guild_id = any ((select access.visible_guild_ids())::bigint[])
           and parent_id = any ((select access.visible_scope_ids(true))::bigint[]));
create policy observer_api_manage on support_settings for all to observer_api
    using (guild_id = any ((select access.manageable_guild_ids())::bigint[]))
    with check (guild_id = any ((select access.manageable_guild_ids())::bigint[]));
create policy observer_api_read on support_settings_audit for select to observer_api
    using (guild_id = any ((select access.manageable_guild_ids())::bigint[]));
create policy observer_api_append on support_settings_audit for insert to observer_api
    with check (guild_id = any ((select access.manageable_guild_ids())::bigint[])
                and changed_by = (select access.viewer_id()));

-- auth: the login path works before a viewer exists; grants (20_grants.sql)
-- limit it to these tables and commands.
create policy observer_auth_all on users for all to observer_auth using (true) with check (true);
create policy observer_auth_all on oauth_tokens for all to observer_auth using (true) with check (true);
create policy observer_auth_all on api_tokens for all to observer_auth using (true) with check (true);
create policy observer_auth_read on guilds for select to observer_auth using (true);
create policy observer_auth_all on members for all to observer_auth using (true) with check (true);
create policy observer_auth_all on member_removals for all to observer_auth using (true) with check (true);
create policy observer_auth_append on access_events for insert to observer_auth with check (true);
