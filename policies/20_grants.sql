-- Table privileges. Start from nothing on every run so that a privilege removed
-- from this file is also removed from existing databases; then grant exactly
-- what policies/README.md lists. Row-level policies (30_rls.sql) narrow these.

-- Only the tables of migrations/0001..0009: tables added by later migrations keep
-- whatever their own policies file grants.
revoke all on
    guilds, channels, permission_overwrites, roles, members, member_removals, thread_members,
    messages, message_revisions, message_events, access_events,
    users, oauth_tokens, api_tokens
    from public, observer_api, observer_worker, observer_auth, observer_access, observer_fanout;
revoke all on sequence message_events_seq_seq, access_events_seq_seq
    from public, observer_api, observer_worker, observer_auth, observer_access, observer_fanout;

grant usage on schema public to observer_api, observer_worker, observer_auth, observer_access, observer_fanout;

-- worker: reads and writes everything it ingests.
grant select, insert, update, delete on
    guilds, channels, permission_overwrites, roles, members, thread_members,
    messages, message_revisions, message_events, access_events
    to observer_worker;
grant usage, select on sequence message_events_seq_seq, access_events_seq_seq to observer_worker;
-- member removal tombstones: both member writers read and record them.
grant select, insert, update, delete on member_removals to observer_worker, observer_auth;
-- thread-member removal tombstones (migrations/0030): only the worker writes
-- thread memberships.
revoke all on thread_member_removals
    from public, observer_api, observer_worker, observer_auth, observer_access, observer_fanout;
grant select, insert, update, delete on thread_member_removals to observer_worker;

-- access-rule functions' owner: reads what decides access; appends access_events
-- from the change triggers (40_notify.sql), which run as this role.
grant select on guilds, channels, permission_overwrites, roles, members, thread_members
    to observer_access;
grant insert on access_events to observer_access;
grant usage on sequence access_events_seq_seq to observer_access;

-- api: reads only, rows filtered by the access rule; two guild settings; own tokens.
grant select on
    guilds, channels, roles, members, thread_members,
    messages, message_revisions, message_events,
    users, api_tokens
    to observer_api;
grant update (observer_role_ids, retention) on guilds to observer_api;
grant insert on api_tokens to observer_api;
grant update (revoked_at, last_used_at) on api_tokens to observer_api;

-- fanout: the API's live fan-out reads each new event once for all subscribers
-- and filters in memory with the Rust twin of the rule, so it reads without a
-- viewer: events, messages and the data that decides access. Read-only.
grant select on
    guilds, channels, permission_overwrites, roles, members, thread_members,
    messages, message_revisions, message_events, access_events
    to observer_fanout;

-- auth: the trusted login path, before a viewer exists.
grant select, insert, update on users to observer_auth;
grant select, insert, update, delete on oauth_tokens to observer_auth;
grant select on api_tokens to observer_auth;
grant update (last_used_at) on api_tokens to observer_auth;
grant select on guilds to observer_auth;
grant select, insert, update, delete on members to observer_auth;
grant insert on access_events to observer_auth;
grant usage on sequence access_events_seq_seq to observer_auth;

-- The support queue (migrations/0034). The worker derives conversations and
-- runs recomputations; the API reads conversations under the access rule, and
-- managers read and change the settings (with an audit row per change).
revoke all on support_settings, support_settings_audit, conversation_solved_marks, conversations
    from public, observer_api, observer_worker, observer_auth, observer_access, observer_fanout;
revoke all on sequence support_settings_audit_audit_id_seq
    from public, observer_api, observer_worker, observer_auth, observer_access, observer_fanout;
grant select, insert, update, delete on conversations, conversation_solved_marks to observer_worker;
grant select on support_settings to observer_worker;
grant update (recompute_requested, recompute_total, recompute_done, recomputed_at)
    on support_settings to observer_worker;
grant select on conversations to observer_api;
grant select, insert, update on support_settings to observer_api;
grant select, insert on support_settings_audit to observer_api;
grant usage on sequence support_settings_audit_audit_id_seq to observer_api;
-- Telemetry rollups (migrations/0036): the trigger on conversations appends
-- to the dirty log as the writing role; the worker rebuilds; the API reads.
revoke all on conversation_rollups, conversation_rollup_dirty
    from public, observer_api, observer_worker, observer_auth, observer_access, observer_fanout;
grant select, insert, update, delete on conversation_rollups, conversation_rollup_dirty to observer_worker;
grant select on conversation_rollups to observer_api;

-- Sessions are not tenant data: only the connecting user (the session store uses
-- the raw pool) touches them.
revoke all on schema tower_sessions from public, observer_api, observer_worker, observer_auth, observer_access, observer_fanout;
revoke all on all tables in schema tower_sessions from public, observer_api, observer_worker, observer_auth, observer_access, observer_fanout;
