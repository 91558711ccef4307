-- Notifications. PostgreSQL delivers NOTIFYs at commit and collapses identical
-- (channel, payload) pairs within a transaction, so an empty payload gives at most
-- one notification per channel per transaction, however many statements ran.
--
--   observer_events  payload ''  new rows in message_events were committed
--   observer_access  payload ''  new rows in access_events were committed
--
-- Listeners read the event tables after their cursor; the payload carries nothing.

-- Ingest code only inserts message_events rows; this statement-level trigger
-- announces them.
create or replace function access.notify_message_events()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    if exists (select 1 from new_rows) then
        perform pg_notify('observer_events', '');
    end if;
    return null;
end
$$;

drop trigger if exists observer_notify on public.message_events;
create trigger observer_notify
    after insert on public.message_events
    referencing new table as new_rows
    for each statement execute function access.notify_message_events();

-- Changes to what decides access append access_events rows: one per
-- (guild_id, user_id) affected, user_id NULL when the change may affect anyone in
-- the guild. Runs as observer_access (SECURITY DEFINER) so that every writer
-- (worker, the auth path's membership refresh, the api's guild settings update)
-- records the change without needing rights on access_events.
create or replace function access.record_access_change()
returns trigger
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    n bigint;
begin
    -- Branches reference only the transition table their operation provides;
    -- PL/pgSQL plans a statement on first execution, so the others never resolve.
    if TG_TABLE_NAME = 'guilds' then
        if TG_OP = 'INSERT' then
            insert into public.access_events (guild_id, user_id)
            select distinct r.guild_id, null::bigint from new_rows r;
        elsif TG_OP = 'DELETE' then
            insert into public.access_events (guild_id, user_id)
            select distinct r.guild_id, null::bigint from old_rows r;
        else
            insert into public.access_events (guild_id, user_id)
            select distinct nr.guild_id, null::bigint
            from new_rows nr
            left join old_rows o on o.guild_id = nr.guild_id
            where o.guild_id is null
               or o.owner_id is distinct from nr.owner_id
               or o.observer_role_ids is distinct from nr.observer_role_ids
               or o.removed_at is distinct from nr.removed_at;
        end if;
    elsif TG_TABLE_NAME = 'channels' then
        if TG_OP = 'INSERT' then
            insert into public.access_events (guild_id, user_id)
            select distinct r.guild_id, null::bigint from new_rows r;
        elsif TG_OP = 'DELETE' then
            insert into public.access_events (guild_id, user_id)
            select distinct r.guild_id, null::bigint from old_rows r;
        else
            insert into public.access_events (guild_id, user_id)
            select distinct nr.guild_id, null::bigint
            from new_rows nr
            left join old_rows o on o.guild_id = nr.guild_id and o.channel_id = nr.channel_id
            where o.guild_id is null
               or o.kind is distinct from nr.kind
               or o.parent_id is distinct from nr.parent_id;
        end if;
    elsif TG_TABLE_NAME = 'roles' then
        if TG_OP = 'INSERT' then
            insert into public.access_events (guild_id, user_id)
            select distinct r.guild_id, null::bigint from new_rows r;
        elsif TG_OP = 'DELETE' then
            insert into public.access_events (guild_id, user_id)
            select distinct r.guild_id, null::bigint from old_rows r;
        else
            insert into public.access_events (guild_id, user_id)
            select distinct nr.guild_id, null::bigint
            from new_rows nr
            left join old_rows o on o.guild_id = nr.guild_id and o.role_id = nr.role_id
            where o.guild_id is null or o.permissions is distinct from nr.permissions;
        end if;
    elsif TG_TABLE_NAME = 'permission_overwrites' then
        -- A member overwrite concerns one user; a role overwrite, anyone.
        if TG_OP = 'INSERT' then
            insert into public.access_events (guild_id, user_id)
            select distinct r.guild_id, case when r.kind = 1 then r.target_id end from new_rows r;
        elsif TG_OP = 'DELETE' then
            insert into public.access_events (guild_id, user_id)
            select distinct r.guild_id, case when r.kind = 1 then r.target_id end from old_rows r;
        else
            insert into public.access_events (guild_id, user_id)
            select distinct nr.guild_id, case when nr.kind = 1 then nr.target_id end
            from new_rows nr
            left join old_rows o
                   on o.guild_id = nr.guild_id and o.channel_id = nr.channel_id
                  and o.target_id = nr.target_id and o.kind = nr.kind
            where o.guild_id is null or o.allow is distinct from nr.allow or o.deny is distinct from nr.deny;
        end if;
    elsif TG_TABLE_NAME = 'members' then
        if TG_OP = 'INSERT' then
            insert into public.access_events (guild_id, user_id)
            select distinct r.guild_id, r.user_id from new_rows r;
        elsif TG_OP = 'DELETE' then
            insert into public.access_events (guild_id, user_id)
            select distinct r.guild_id, r.user_id from old_rows r;
        else
            insert into public.access_events (guild_id, user_id)
            select distinct nr.guild_id, nr.user_id
            from new_rows nr
            left join old_rows o on o.guild_id = nr.guild_id and o.user_id = nr.user_id
            where o.guild_id is null
               or o.role_ids is distinct from nr.role_ids
               or o.communication_disabled_until is distinct from nr.communication_disabled_until;
        end if;
    elsif TG_TABLE_NAME = 'thread_members' then
        if TG_OP = 'INSERT' then
            insert into public.access_events (guild_id, user_id)
            select distinct r.guild_id, r.user_id from new_rows r;
        elsif TG_OP = 'DELETE' then
            insert into public.access_events (guild_id, user_id)
            select distinct r.guild_id, r.user_id from old_rows r;
        else
            -- Only the key decides access: an update that only advances
            -- observed_at (a listing confirming a membership) writes nothing.
            insert into public.access_events (guild_id, user_id)
            select distinct nr.guild_id, nr.user_id
            from new_rows nr
            left join old_rows o on o.guild_id = nr.guild_id and o.thread_id = nr.thread_id
                                and o.user_id = nr.user_id
            where o.guild_id is null
            union
            select distinct o.guild_id, o.user_id
            from old_rows o
            left join new_rows nr on nr.guild_id = o.guild_id and nr.thread_id = o.thread_id
                                 and nr.user_id = o.user_id
            where nr.guild_id is null;
        end if;
    else
        raise exception 'record_access_change: unexpected table %', TG_TABLE_NAME;
    end if;

    get diagnostics n = row_count;
    if n > 0 then
        perform pg_notify('observer_access', '');
    end if;
    return null;
end
$$;

alter function access.record_access_change() owner to observer_access;

do $$
declare
    t text;
begin
    foreach t in array array['guilds', 'channels', 'roles', 'permission_overwrites', 'members', 'thread_members'] loop
        execute format('drop trigger if exists observer_access_ins on public.%I', t);
        execute format('drop trigger if exists observer_access_upd on public.%I', t);
        execute format('drop trigger if exists observer_access_del on public.%I', t);
        execute format('create trigger observer_access_ins after insert on public.%I '
                       'referencing new table as new_rows for each statement '
                       'execute function access.record_access_change()', t);
        execute format('create trigger observer_access_upd after update on public.%I '
                       'referencing old table as old_rows new table as new_rows for each statement '
                       'execute function access.record_access_change()', t);
        execute format('create trigger observer_access_del after delete on public.%I '
                       'referencing old table as old_rows for each statement '
                       'execute function access.record_access_change()', t);
    end loop;
end
$$;

revoke all on function access.notify_message_events() from public;
revoke all on function access.record_access_change() from public;
