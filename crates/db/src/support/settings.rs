//! A guild's support settings: what makes a tag a solved marker, and the
//! managers' reads and writes (audited; a change queues a recomputation).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result, ViewerTx, WorkerTx};

/// Tag names that mean solved when a guild set none (whole words,
/// case-insensitive).
pub const DEFAULT_SOLVED_WORDS: [&str; 4] = ["solved", "resolved", "answered", "closed"];

/// What the derivation needs from the settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub solved_tag_names: Option<Vec<String>>,
    pub locked_means_solved: bool,
    pub archived_means_solved: bool,
}

/// A forum tag as stored in `channels.available_tags`.
#[derive(Debug, Clone)]
pub struct Tag {
    pub id: i64,
    pub name: String,
    pub moderated: bool,
}

/// The tags of a stored `available_tags` value; malformed entries are
/// skipped (the worker wrote them, but a hand-edited row must not stop
/// ingestion).
pub fn tags_of(v: &Value) -> Vec<Tag> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    Some(Tag {
                        id: t.get("id")?.as_str()?.parse().ok()?,
                        name: t.get("name")?.as_str()?.to_owned(),
                        moderated: t.get("moderated").and_then(Value::as_bool).unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `tag` is a solved marker under `settings`: one of the names the
/// guild chose, else a name containing one of [`DEFAULT_SOLVED_WORDS`] as a
/// whole word ("✅ Solved", "resolved!", not "unsolved").
pub fn is_solved_tag(settings: &Settings, tag: &Tag) -> bool {
    match &settings.solved_tag_names {
        Some(names) => names
            .iter()
            .any(|n| n.trim().to_lowercase() == tag.name.trim().to_lowercase()),
        None => tag
            .name
            .to_lowercase()
            .split(|c: char| !c.is_alphanumeric())
            .any(|w| DEFAULT_SOLVED_WORDS.contains(&w)),
    }
}

/// Business hours: a time zone and a weekly schedule. Stored as given;
/// business-time durations are not computed yet (docs/support-queue.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BusinessHours {
    pub time_zone: String,
    pub weekly: Vec<WeeklySlot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeeklySlot {
    /// ISO weekday: 1 = Monday … 7 = Sunday.
    pub day: u8,
    /// "HH:MM", local time.
    pub start: String,
    pub end: String,
}

/// A guild's settings as managers see and set them (None = the default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupportSettings {
    pub support_channel_ids: Option<Vec<i64>>,
    pub staff_role_ids: Vec<i64>,
    pub solved_tag_names: Option<Vec<String>>,
    pub locked_means_solved: bool,
    pub archived_means_solved: bool,
    pub first_response_target_secs: Option<i32>,
    pub business_hours: Option<BusinessHours>,
}

impl Default for SupportSettings {
    fn default() -> Self {
        SupportSettings {
            support_channel_ids: None,
            staff_role_ids: Vec::new(),
            solved_tag_names: None,
            locked_means_solved: true,
            archived_means_solved: false,
            first_response_target_secs: None,
            business_hours: None,
        }
    }
}

/// The settings with the state of the recomputation the last change started.
#[derive(Debug, Clone)]
pub struct SettingsView {
    pub guild_id: i64,
    pub settings: SupportSettings,
    pub updated_at: Option<DateTime<Utc>>,
    pub updated_by: Option<i64>,
    pub recompute_pending: bool,
    pub recompute_total: i32,
    pub recompute_done: i32,
}

/// One audited change.
#[derive(Debug, Clone)]
pub struct AuditRow {
    pub changed_by: i64,
    pub changed_at: DateTime<Utc>,
    pub old: Value,
    pub new: Value,
}

/// The guild's settings for a manager; `NotFound` for anyone else (and for
/// guilds the viewer cannot see), the same answer either way.
pub async fn get(tx: &mut ViewerTx, guild_id: i64) -> Result<SettingsView> {
    let can = sqlx::query_scalar!(
        "select $1 = any ((select access.manageable_guild_ids())::bigint[]) as \"ok!\"",
        guild_id
    )
    .fetch_one(&mut **tx)
    .await?;
    if !can {
        return Err(Error::NotFound);
    }
    let row = sqlx::query!(
        "select support_channel_ids as \"support_channel_ids?: Vec<i64>\", staff_role_ids, \
           solved_tag_names as \"solved_tag_names?: Vec<String>\", locked_means_solved, \
           archived_means_solved, first_response_target_secs, business_hours, \
           updated_at as \"updated_at: DateTime<Utc>\", updated_by, recompute_requested, \
           recompute_total, recompute_done \
         from support_settings where guild_id = $1",
        guild_id
    )
    .fetch_optional(&mut **tx)
    .await?;
    let Some(r) = row else {
        return Ok(SettingsView {
            guild_id,
            settings: SupportSettings::default(),
            updated_at: None,
            updated_by: None,
            recompute_pending: false,
            recompute_total: 0,
            recompute_done: 0,
        });
    };
    Ok(SettingsView {
        guild_id,
        settings: SupportSettings {
            support_channel_ids: r.support_channel_ids,
            staff_role_ids: r.staff_role_ids,
            solved_tag_names: r.solved_tag_names,
            locked_means_solved: r.locked_means_solved,
            archived_means_solved: r.archived_means_solved,
            first_response_target_secs: r.first_response_target_secs,
            business_hours: r
                .business_hours
                .and_then(|v| serde_json::from_value(v).ok()),
        },
        updated_at: Some(r.updated_at),
        updated_by: r.updated_by,
        recompute_pending: r.recompute_requested,
        recompute_total: r.recompute_total,
        recompute_done: r.recompute_done,
    })
}

/// Replaces the guild's settings (managers only, else `NotFound`), writes
/// the audit row (old → new) and queues the recomputation. A change to
/// nothing is not audited and queues nothing.
pub async fn set(
    tx: &mut ViewerTx,
    guild_id: i64,
    viewer_id: i64,
    new: &SupportSettings,
) -> Result<SettingsView> {
    let old = get(tx, guild_id).await?;
    if &old.settings == new {
        return Ok(old);
    }
    let hours = new
        .business_hours
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| Error::Invalid(format!("business hours: {e}")))?;
    sqlx::query!(
        "insert into support_settings as s (guild_id, support_channel_ids, staff_role_ids, \
           solved_tag_names, locked_means_solved, archived_means_solved, \
           first_response_target_secs, business_hours, updated_at, updated_by, \
           recompute_requested, recompute_total, recompute_done) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, now(), $9, true, 0, 0) \
         on conflict (guild_id) do update set \
           support_channel_ids = excluded.support_channel_ids, \
           staff_role_ids = excluded.staff_role_ids, \
           solved_tag_names = excluded.solved_tag_names, \
           locked_means_solved = excluded.locked_means_solved, \
           archived_means_solved = excluded.archived_means_solved, \
           first_response_target_secs = excluded.first_response_target_secs, \
           business_hours = excluded.business_hours, updated_at = now(), \
           updated_by = excluded.updated_by, recompute_requested = true, \
           recompute_total = 0, recompute_done = 0",
        guild_id,
        new.support_channel_ids.as_deref() as Option<&[i64]>,
        &new.staff_role_ids,
        new.solved_tag_names.as_deref() as Option<&[String]>,
        new.locked_means_solved,
        new.archived_means_solved,
        new.first_response_target_secs,
        hours,
        viewer_id,
    )
    .execute(&mut **tx)
    .await?;
    let to_json = |s: &SupportSettings| {
        serde_json::to_value(s).map_err(|e| Error::Invalid(format!("settings: {e}")))
    };
    sqlx::query!(
        "insert into support_settings_audit (guild_id, changed_by, old, new) values ($1, $2, $3, $4)",
        guild_id,
        viewer_id,
        to_json(&old.settings)?,
        to_json(new)?,
    )
    .execute(&mut **tx)
    .await?;
    get(tx, guild_id).await
}

/// The guild's audit trail, newest first (managers only, else `NotFound`).
pub async fn audit(tx: &mut ViewerTx, guild_id: i64, limit: i64) -> Result<Vec<AuditRow>> {
    get(tx, guild_id).await?;
    let rows = sqlx::query_as!(
        AuditRow,
        "select changed_by, changed_at as \"changed_at: DateTime<Utc>\", old, new \
         from support_settings_audit where guild_id = $1 order by audit_id desc limit $2",
        guild_id,
        limit.clamp(1, crate::viewer::MAX_PAGE),
    )
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows)
}

/// A guild whose settings changed and whose conversations are to be
/// recomputed (the worker's job).
pub async fn next_recompute(tx: &mut WorkerTx) -> Result<Option<(i64, DateTime<Utc>)>> {
    let row = sqlx::query!(
        "select guild_id, updated_at as \"updated_at: DateTime<Utc>\" from support_settings \
         where recompute_requested order by updated_at limit 1 for update skip locked"
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|r| (r.guild_id, r.updated_at)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(name: &str) -> Tag {
        Tag {
            id: 1,
            name: name.into(),
            moderated: false,
        }
    }

    #[test]
    fn default_solved_words_are_whole_words() {
        let s = Settings {
            solved_tag_names: None,
            locked_means_solved: true,
            archived_means_solved: false,
        };
        assert!(is_solved_tag(&s, &tag("Solved")));
        assert!(is_solved_tag(&s, &tag("✅ resolved!")));
        assert!(is_solved_tag(&s, &tag("Answered")));
        assert!(!is_solved_tag(&s, &tag("unsolved")));
        assert!(!is_solved_tag(&s, &tag("question")));
    }

    #[test]
    fn chosen_names_replace_the_default() {
        let s = Settings {
            solved_tag_names: Some(vec!["Done".into()]),
            locked_means_solved: true,
            archived_means_solved: false,
        };
        assert!(is_solved_tag(&s, &tag("done")));
        assert!(!is_solved_tag(&s, &tag("solved")));
    }

    #[test]
    fn malformed_tags_are_skipped() {
        let v = serde_json::json!([{"id": "5", "name": "ok"}, {"id": 7, "name": "bad"}, "x"]);
        let t = tags_of(&v);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].id, 5);
    }
}
