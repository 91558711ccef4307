-- Whether the bot itself can read a channel (issue 12 §4).
--
-- Discord answers 403 Missing Access on every route of a channel the bot cannot view, and sends
-- none of its messages. Such channels are still mirrored (they come with GUILD_CREATE and
-- CHANNEL_*, so access can be computed), and this records what the bot's last attempt found, so
-- managers can be told why a channel has no messages.
--
-- bot_can_read: null = not tried yet (or not a message channel), false = Discord refused the
-- bot (403), true = the bot read it (a history page, or a message arrived from it).
-- bot_access_checked_at: when that was observed; a later observation always wins, so writes
-- that arrive out of order cannot leave an old answer behind.
alter table channels add column if not exists bot_can_read boolean;
alter table channels add column if not exists bot_access_checked_at timestamptz;
