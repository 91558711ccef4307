-- The access rule of docs/access-rule.md in SQL (its Rust twin: crates/db/src/access.rs).
--
-- The api role cannot read the tables that decide access (overwrites, other
-- members, roles of guilds it cannot see). These functions therefore run as
-- SECURITY DEFINER, owned by `observer_access`, a NOLOGIN role whose only rights
-- are `using (true)` SELECT policies on those tables. Policies on the api role's
-- tables call the functions, never the tables, so policies never recurse.
--
-- Policies wrap the array helpers in scalar subqueries, e.g.
--   channel_id = any ((select access.visible_scope_ids(true)))
-- An uncorrelated scalar subquery becomes an InitPlan: the rule runs once per
-- query, not once per row, and `= any(array)` can drive an index scan.
--
-- Permission bits (discord-protocol.md §4.3):
--   ADMINISTRATOR 1<<3 = 8, MANAGE_GUILD 1<<5 = 32, VIEW_CHANNEL 1<<10 = 1024,
--   READ_MESSAGE_HISTORY 1<<16 = 65536, CONNECT 1<<20 = 1048576,
--   MANAGE_THREADS 1<<34 = 17179869184.

-- The current viewer, or NULL when none is set. After a transaction that used
-- set_config(.., true) commits, the pooled connection reads '' (not NULL): both
-- mean "no viewer", and so does anything that is not a plain integer.
create or replace function access.viewer_id()
returns bigint
language sql
stable
parallel safe
as $$
    select case
        -- (A bounded quantifier like {1,19} compiles slowly in PostgreSQL's regex engine.)
        when s ~ '^[0-9]+$'
             and (length(s) < 19 or (length(s) = 19 and s collate "C" <= '9223372036854775807'))
            then s::bigint
    end
    from (select pg_catalog.current_setting('observer.viewer_id', true) as s) as v
$$;

-- Every channel the current viewer may see that is not a thread (a "scope":
-- text, voice, category, announcement, stage, forum, media), with whether its
-- messages are readable live and as stored history, and whether the viewer
-- holds MANAGE_THREADS there. Channels the viewer may not see are absent.
-- `can_read` differs from `can_view` only in voice and stage channels, whose
-- text chat needs CONNECT (the channel shows in the list, its messages do not).
--
-- Threads are left out on purpose: a thread has no permissions of its own
-- (rule step 5 computes them on the parent), and a support forum holds
-- hundreds of thousands of them. Policies therefore test a thread row through
-- its parent (`parent_id = any (scopes)`), so the cost of the rule grows with
-- the guild's channels, never with its threads (docs/support-queue.md,
-- "Rights at scale"). The partial index channels_scope_idx serves the scan.
--
-- PL/pgSQL rather than SQL: a SQL function's body is planned again on every
-- call, while PL/pgSQL keeps the plan for the session (pooled connections).
create or replace function access.viewer_scopes()
returns table (guild_id bigint, channel_id bigint, can_read boolean,
               can_read_history boolean, manage_threads boolean)
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
begin
return query
-- The small per-guild steps are MATERIALIZED: inlined, PostgreSQL would
-- recompute the role aggregate once per channel instead of once per guild.
with me as materialized (
    select access.viewer_id() as uid
),
-- Rule steps 1-2: the guild is present (not removed) and the viewer is a member.
membership as materialized (
    select g.guild_id,
           me.uid,
           g.owner_id = me.uid as is_owner,
           -- Discord never lists @everyone among member roles; drop it if present
           -- so it is not counted twice in the role-overwrite step.
           array_remove(m.role_ids, g.guild_id) as role_ids,
           g.observer_role_ids,
           coalesce(m.communication_disabled_until > now(), false) as timed_out
    from me
    join public.members m on m.user_id = me.uid
    join public.guilds g on g.guild_id = m.guild_id and g.removed_at is null
),
-- Guild-level permissions: @everyone role (id = guild id) OR the member's roles.
base as materialized (
    select ms.*,
           coalesce((select bit_or(r.permissions)
                     from public.roles r
                     where r.guild_id = ms.guild_id
                       and (r.role_id = ms.guild_id or r.role_id = any (ms.role_ids))), 0) as perms
    from membership ms
),
-- Owner or ADMINISTRATOR: everything, and exempt from gate and timeout.
base2 as (
    select b.*, (b.is_owner or (b.perms & 8) <> 0) as is_admin
    from base b
),
-- Rule step 3: the tenant's observer gate (@everyone in the list admits everyone).
gated as materialized (
    select b.*
    from base2 b
    where b.is_admin
       or cardinality(b.observer_role_ids) = 0
       or b.observer_role_ids && (b.role_ids || b.guild_id)
),
-- Rule step 4 for every channel on its own overwrites: @everyone overwrite,
-- then all role overwrites aggregated (allow beats deny), then the member's.
-- One grouped pass over the guilds' overwrites (not one lookup per channel).
ow as (
    select o.guild_id,
           o.channel_id,
           coalesce(bit_or(o.allow) filter (where o.kind = 0 and o.target_id = o.guild_id), 0) as ev_allow,
           coalesce(bit_or(o.deny) filter (where o.kind = 0 and o.target_id = o.guild_id), 0) as ev_deny,
           coalesce(bit_or(o.allow) filter (where o.kind = 0 and o.target_id <> o.guild_id
                                              and o.target_id = any (gm.role_ids)), 0) as r_allow,
           coalesce(bit_or(o.deny) filter (where o.kind = 0 and o.target_id <> o.guild_id
                                             and o.target_id = any (gm.role_ids)), 0) as r_deny,
           coalesce(bit_or(o.allow) filter (where o.kind = 1 and o.target_id = gm.uid), 0) as m_allow,
           coalesce(bit_or(o.deny) filter (where o.kind = 1 and o.target_id = gm.uid), 0) as m_deny
    from gated gm
    join public.permission_overwrites o on o.guild_id = gm.guild_id
    where not gm.is_admin
    group by o.guild_id, o.channel_id
),
own as (
    select c.guild_id,
           c.channel_id,
           c.kind,
           gm.is_admin,
           gm.timed_out,
           case
               when gm.is_admin then -1::bigint
               else ((((((gm.perms & ~coalesce(ow.ev_deny, 0)) | coalesce(ow.ev_allow, 0))
                        & ~coalesce(ow.r_deny, 0)) | coalesce(ow.r_allow, 0))
                      & ~coalesce(ow.m_deny, 0)) | coalesce(ow.m_allow, 0))
           end as perms
    from gated gm
    -- Exactly the predicate of the partial index channels_scope_idx.
    join public.channels c on c.guild_id = gm.guild_id and c.kind not in (10, 11, 12)
    left join ow on ow.guild_id = c.guild_id and ow.channel_id = c.channel_id
),
-- Timed-out members keep only VIEW_CHANNEL | READ_MESSAGE_HISTORY (owner/admin
-- exempt). Then the implicit denies: in voice (2) and stage (13) channels,
-- lacking CONNECT leaves only VIEW_CHANNEL (a timeout therefore locks their chat).
timed as (
    select o.*,
           case when o.timed_out and not o.is_admin then o.perms & 66560 else o.perms end as tperms
    from own o
),
masked as (
    select t.*,
           case when t.kind in (2, 13) and (t.tperms & 1048576) = 0 then t.tperms & 1024
                else t.tperms end as eff
    from timed t
)
select m.guild_id,
       m.channel_id,
       m.readable as can_read,
       m.readable and (m.eff & 65536) <> 0 as can_read_history,
       (m.eff & 17179869184) <> 0 as manage_threads
from (select ma.*,
             -- The CONNECT mask above leaves a locked voice channel nothing but VIEW_CHANNEL.
             (ma.kind not in (2, 13) or (ma.eff & 1048576) <> 0) as readable
      from masked ma) m
where (m.eff & 1024) <> 0;
end
$$;

-- Every channel the current viewer may see, threads included, with whether its
-- messages are readable live and as stored history: the scopes above, plus
-- each thread whose parent is one of them (rule step 5). A private thread (12)
-- also needs thread membership or MANAGE_THREADS on the parent. A thread's
-- rights are its parent's: visible with it, and readable as history exactly
-- when the parent is (the CONNECT mask leaves a locked voice parent no
-- READ_MESSAGE_HISTORY, and threads are never voice). Policies do not call
-- this (it grows with threads); the live fan-out's access refresh does.
--
-- The result gained `can_read`; PostgreSQL cannot change a function's result
-- type in place, so an older shape is dropped first (nothing depends on the
-- function by catalog: the helpers below are SQL functions that call it by name).
do $$
begin
    if exists (select 1
               from pg_proc p join pg_namespace n on n.oid = p.pronamespace
               where n.nspname = 'access' and p.proname = 'viewer_channels'
                 and pg_get_function_result(p.oid) not like '%can_read boolean%') then
        drop function access.viewer_channels();
    end if;
end
$$;

create or replace function access.viewer_channels()
returns table (guild_id bigint, channel_id bigint, can_view boolean, can_read boolean,
               can_read_history boolean)
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
#variable_conflict use_column
begin
return query
with s as materialized (
    select * from access.viewer_scopes()
)
select s.guild_id, s.channel_id, true, s.can_read, s.can_read_history
from s
union all
select t.guild_id, t.channel_id, true, true, s.can_read_history
from s
join public.channels t
  on t.guild_id = s.guild_id and t.parent_id = s.channel_id and t.kind in (10, 11, 12)
where t.kind <> 12
   or s.manage_threads
   or exists (select 1
              from public.thread_members tm
              where tm.guild_id = t.guild_id
                and tm.thread_id = t.channel_id
                and tm.user_id = access.viewer_id());
end
$$;

-- The array helpers policies call, each inside a scalar subquery (an InitPlan:
-- once per statement). All of them grow with the guild's channels and the
-- viewer's own thread memberships, never with the number of threads.

-- Scope ids (non-thread channels) the viewer may see: live (history = false)
-- or with stored history (history = true). A thread row is visible when its
-- parent is in this set (and, if private, passes access.private_thread_ok).
create or replace function access.visible_scope_ids(history boolean)
returns bigint[]
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(array_agg(s.channel_id order by s.channel_id), '{}')
    from access.viewer_scopes() s
    where not history or s.can_read_history
$$;

-- Scopes where the viewer holds MANAGE_THREADS: every private thread under
-- them is visible to the viewer (if the scope itself is).
create or replace function access.manage_thread_scope_ids()
returns bigint[]
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(array_agg(s.channel_id order by s.channel_id), '{}')
    from access.viewer_scopes() s
    where s.manage_threads
$$;

-- Threads the viewer is a member of (any guild; the parent test still applies).
create or replace function access.member_thread_ids()
returns bigint[]
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(array_agg(tm.thread_id order by tm.thread_id), '{}')
    from public.thread_members tm
    where tm.user_id = access.viewer_id()
$$;

-- Guilds where the viewer sees at least one channel (a thread is only visible
-- under a visible parent, so the scopes decide).
create or replace function access.visible_guild_ids()
returns bigint[]
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(array_agg(distinct s.guild_id), '{}')
    from access.viewer_scopes() s
$$;

-- Guilds whose settings the viewer may change: a current member of a present
-- guild who is the owner or holds ADMINISTRATOR or MANAGE_GUILD at guild level
-- (a timeout removes MANAGE_GUILD unless owner/admin).
create or replace function access.manageable_guild_ids()
returns bigint[]
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    with ms as (
        select g.guild_id,
               g.owner_id = m.user_id as is_owner,
               coalesce(m.communication_disabled_until > now(), false) as timed_out,
               coalesce((select bit_or(r.permissions)
                         from public.roles r
                         where r.guild_id = g.guild_id
                           and (r.role_id = g.guild_id or r.role_id = any (m.role_ids))), 0) as perms
        from public.members m
        join public.guilds g on g.guild_id = m.guild_id and g.removed_at is null
        where m.user_id = access.viewer_id()
    )
    select coalesce(array_agg(ms.guild_id), '{}')
    from ms
    where ms.is_owner
       or (ms.perms & 8) <> 0
       or ((ms.perms & 32) <> 0 and not ms.timed_out)
$$;

create or replace function access.can_manage_guild(p_guild_id bigint)
returns boolean
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select p_guild_id = any (access.manageable_guild_ids())
$$;

-- A new owner needs CREATE on the function's schema.
grant usage, create on schema access to observer_access;
grant usage on schema public to observer_access;

alter function access.viewer_scopes() owner to observer_access;
alter function access.viewer_channels() owner to observer_access;
alter function access.visible_scope_ids(boolean) owner to observer_access;
alter function access.manage_thread_scope_ids() owner to observer_access;
alter function access.member_thread_ids() owner to observer_access;
alter function access.visible_guild_ids() owner to observer_access;
alter function access.manageable_guild_ids() owner to observer_access;
alter function access.can_manage_guild(bigint) owner to observer_access;

-- Functions are executable by PUBLIC by default; keep the rule to the roles that need it.
revoke all on all functions in schema access from public;
grant usage on schema access to observer_api, observer_access, observer_worker, observer_auth;
grant execute on function access.viewer_id() to observer_api, observer_access;
grant execute on function access.viewer_scopes() to observer_api, observer_access;
grant execute on function access.viewer_channels() to observer_api, observer_access;
grant execute on function access.visible_scope_ids(boolean) to observer_api, observer_access;
grant execute on function access.manage_thread_scope_ids() to observer_api, observer_access;
grant execute on function access.member_thread_ids() to observer_api, observer_access;
grant execute on function access.visible_guild_ids() to observer_api, observer_access;
grant execute on function access.manageable_guild_ids() to observer_api, observer_access;
grant execute on function access.can_manage_guild(bigint) to observer_api, observer_access;
