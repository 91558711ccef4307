-- The access rule of docs/access-rule.md in SQL (its Rust twin: crates/db/src/access.rs).
--
-- The api role cannot read the tables that decide access (overwrites, other
-- members, roles of guilds it cannot see). These functions therefore run as
-- SECURITY DEFINER, owned by `observer_access`, a NOLOGIN role whose only rights
-- are `using (true)` SELECT policies on those tables. Policies on the api role's
-- tables call the functions, never the tables, so policies never recurse.
--
-- Policies wrap the array helpers in scalar subqueries, e.g.
--   channel_id = any ((select access.visible_channel_ids(true)))
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

-- Every channel the current viewer may see, with whether its messages are
-- readable live and as stored history. Channels the viewer may not see are absent.
-- `can_read` differs from `can_view` only in voice and stage channels, whose
-- text chat needs CONNECT (the channel shows in the list, its messages do not).
--
-- PL/pgSQL rather than SQL: a SQL function's body is planned again on every
-- call, while PL/pgSQL keeps the plan for the session (pooled connections).
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
           c.parent_id,
           gm.uid,
           gm.is_admin,
           gm.timed_out,
           case
               when gm.is_admin then -1::bigint
               else ((((((gm.perms & ~coalesce(ow.ev_deny, 0)) | coalesce(ow.ev_allow, 0))
                        & ~coalesce(ow.r_deny, 0)) | coalesce(ow.r_allow, 0))
                      & ~coalesce(ow.m_deny, 0)) | coalesce(ow.m_allow, 0))
           end as perms
    from gated gm
    join public.channels c on c.guild_id = gm.guild_id
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
),
-- Threads (10, 11, 12) take their parent's permissions; a private thread (12)
-- also needs thread membership or MANAGE_THREADS.
effective as (
    select c.guild_id,
           c.channel_id,
           c.kind,
           case
               when c.kind in (10, 11, 12) then p.eff
               else c.eff
           end as eff,
           c.kind = 12
               and coalesce(p.eff & 17179869184, 0) = 0
               and not exists (select 1
                               from public.thread_members tm
                               where tm.guild_id = c.guild_id
                                 and tm.thread_id = c.channel_id
                                 and tm.user_id = c.uid) as private_denied
    from masked c
    left join masked p
           on c.kind in (10, 11, 12)
          and p.guild_id = c.guild_id
          and p.channel_id = c.parent_id
)
select e.guild_id,
       e.channel_id,
       true as can_view,
       e.readable as can_read,
       e.readable and (e.eff & 65536) <> 0 as can_read_history
from (select ef.*,
             -- The CONNECT mask above leaves a locked voice channel nothing but VIEW_CHANNEL.
             (ef.kind not in (2, 13) or (ef.eff & 1048576) <> 0) as readable
      from effective ef) e
where coalesce(e.eff & 1024, 0) <> 0
  and not e.private_denied;
end
$$;

-- Channel ids the viewer may see: live (history = false) or with stored
-- history (history = true). Policies call this inside a scalar subquery.
create or replace function access.visible_channel_ids(history boolean)
returns bigint[]
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(array_agg(v.channel_id order by v.channel_id), '{}')
    from access.viewer_channels() v
    where v.can_view and (not history or v.can_read_history)
$$;

-- Guilds where the viewer sees at least one channel.
create or replace function access.visible_guild_ids()
returns bigint[]
language sql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(array_agg(distinct v.guild_id), '{}')
    from access.viewer_channels() v
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

alter function access.viewer_channels() owner to observer_access;
alter function access.visible_channel_ids(boolean) owner to observer_access;
alter function access.visible_guild_ids() owner to observer_access;
alter function access.manageable_guild_ids() owner to observer_access;
alter function access.can_manage_guild(bigint) owner to observer_access;

-- Functions are executable by PUBLIC by default; keep the rule to the roles that need it.
revoke all on all functions in schema access from public;
grant usage on schema access to observer_api, observer_access, observer_worker, observer_auth;
grant execute on function access.viewer_id() to observer_api, observer_access;
grant execute on function access.viewer_channels() to observer_api, observer_access;
grant execute on function access.visible_channel_ids(boolean) to observer_api, observer_access;
grant execute on function access.visible_guild_ids() to observer_api, observer_access;
grant execute on function access.manageable_guild_ids() to observer_api, observer_access;
grant execute on function access.can_manage_guild(bigint) to observer_api, observer_access;
