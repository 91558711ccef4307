-- API lookups (brief D).
--
-- `message(id)` arrives with the message id only; the primary key leads with
-- guild_id, so without this index the lookup would scan every visible message.
create index if not exists messages_message_id_idx on messages (message_id);
