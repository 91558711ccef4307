-- Database roles (cluster-wide, NOLOGIN). See policies/README.md.
--
-- Roles are shared by every database of the cluster, so several databases (tests,
-- two deployments) may run this at the same moment: creation is skipped when the
-- role exists and a concurrent creator's duplicate is swallowed. When an operator
-- pre-created the roles (separate credentials per role), nothing here needs
-- CREATEROLE.
do $$
declare
    r text;
begin
    foreach r in array array['observer_api', 'observer_worker', 'observer_auth', 'observer_access', 'observer_fanout'] loop
        if not exists (select 1 from pg_catalog.pg_roles where rolname = r) then
            begin
                execute format('create role %I nologin', r);
            exception when duplicate_object or unique_violation then
                null;
            end;
        end if;
    end loop;
end
$$;

-- The connecting user (DATABASE_URL) switches to these roles per transaction with
-- set_config('role', ..) and must own the access functions' role to (re)create
-- them, so it needs membership. A superuser needs none. An operator who cannot
-- grant (no CREATEROLE) grants these once by hand; see README.
do $$
declare
    r text;
begin
    if (select rolsuper from pg_catalog.pg_roles where rolname = current_user) then
        return;
    end if;
    foreach r in array array['observer_api', 'observer_worker', 'observer_auth', 'observer_access', 'observer_fanout'] loop
        if not pg_catalog.pg_has_role(current_user, r, 'MEMBER') then
            begin
                execute format('grant %I to %I', r, current_user);
            exception
                when duplicate_object or unique_violation then
                    null;
                when insufficient_privilege then
                    raise warning 'cannot grant role % to %: grant it by hand (policies/README.md)', r, current_user;
            end;
        end if;
    end loop;
end
$$;
