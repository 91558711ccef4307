//! Whether the bot may see a guild or channel, read history, or list members.

use crate::http::ApiError;
use crate::model::{perms, ChannelKind};
use crate::world::{GuildState, World};
use crate::Shared;

pub(super) fn visible_guild(w: &World, id: u64) -> Result<&GuildState, ApiError> {
    let g = w.guild(id)?;
    if !g.bot_present {
        return Err(ApiError::missing_access());
    }
    Ok(g)
}

/// A channel the bot can view (VIEW_CHANNEL from its own member's permissions): Discord answers
/// 403 Missing Access on every route of any other channel of a guild it is in.
pub(super) fn visible_channel(
    w: &World,
    id: u64,
) -> Result<(&GuildState, &crate::Channel), ApiError> {
    let (g, c) = w.channel(id)?;
    if !w.bot_access(g, id).view {
        return Err(ApiError::missing_access());
    }
    Ok((g, c))
}

/// History needs more than a view: CONNECT in voice and stage channels (403 without, as their
/// chat is unreadable), and READ_MESSAGE_HISTORY (without it Discord answers an empty page).
/// Ok(false) means "answer `[]`".
pub(super) fn history_readable(
    w: &World,
    g: &GuildState,
    c: &crate::Channel,
) -> Result<bool, ApiError> {
    let p = w.user_channel_permissions(g, w.bot.id, c.id);
    if matches!(c.kind, ChannelKind::Voice | ChannelKind::Stage) && p & perms::CONNECT == 0 {
        return Err(ApiError::missing_access());
    }
    Ok(p & perms::READ_MESSAGE_HISTORY != 0)
}

/// 403 50001 unless the application may use the GUILD_MEMBERS privileged intent (Discord
/// checks the application's setting, not whether the current session asked for it).
pub(super) fn require_members_intent(sh: &Shared) -> Result<(), ApiError> {
    if sh.config.privileged_intents & crate::world::INTENT_GUILD_MEMBERS == 0 {
        return Err(ApiError::missing_access());
    }
    Ok(())
}
