//! The support queue's part of the schema (docs/support-queue.md):
//! `conversations`, `conversation`, `supportStats`, `supportSettings` and
//! `setSupportSettings`. Reads run in the request's `observer_api`
//! transaction like every other field, so row-level security decides which
//! conversations exist for the viewer, and every number is over those.

use async_graphql::{Context, Enum, InputObject, Object, SimpleObject, ID};
use chrono::{DateTime, Utc};
use observer_db::support::{
    queue::{self, ConversationRow, Order},
    settings::{self as db_settings, BusinessHours, SupportSettings as DbSettings, WeeklySlot},
};

use super::request::{parse_id, request_db};
use super::types::cursor;
use crate::error::{bad_request, from_db, not_found, GqlResult};

/// Longest telemetry window accepted (a year).
const MAX_WINDOW_DAYS: i64 = 366;
/// Most ids in a settings list.
const MAX_LIST: usize = 250;

fn id(v: i64) -> ID {
    ID(v.to_string())
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum ConversationState {
    New,
    WaitingOnStaff,
    WaitingOnRequester,
    Solved,
}

impl ConversationState {
    fn as_db(self) -> &'static str {
        match self {
            ConversationState::New => "NEW",
            ConversationState::WaitingOnStaff => "WAITING_ON_STAFF",
            ConversationState::WaitingOnRequester => "WAITING_ON_REQUESTER",
            ConversationState::Solved => "SOLVED",
        }
    }

    fn from_db(s: &str) -> Self {
        match s {
            "NEW" => ConversationState::New,
            "WAITING_ON_STAFF" => ConversationState::WaitingOnStaff,
            "WAITING_ON_REQUESTER" => ConversationState::WaitingOnRequester,
            _ => ConversationState::Solved,
        }
    }
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum SlaStatus {
    Ok,
    AtRisk,
    Breached,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug, Default)]
pub enum ConversationOrder {
    /// Oldest wait first; conversations not waiting last.
    #[default]
    WaitingLongest,
    /// Newest opened first.
    Newest,
    /// Most recent message first.
    RecentActivity,
}

impl From<ConversationOrder> for Order {
    fn from(o: ConversationOrder) -> Self {
        match o {
            ConversationOrder::WaitingLongest => Order::WaitingLongest,
            ConversationOrder::Newest => Order::Newest,
            ConversationOrder::RecentActivity => Order::RecentActivity,
        }
    }
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum StatsBucket {
    Hour,
    Day,
    Week,
}

/// A support conversation: a forum post and what happened in it.
#[derive(SimpleObject, Debug, Clone)]
pub struct Conversation {
    /// The thread's id.
    pub id: ID,
    pub guild_id: ID,
    /// The thread (whose visibility governs the conversation).
    pub channel_id: ID,
    /// The support channel (forum) it was opened in.
    pub support_channel_id: ID,
    pub title: Option<String>,
    pub requester_id: Option<ID>,
    pub state: ConversationState,
    pub opened_at: DateTime<Utc>,
    pub first_response_at: Option<DateTime<Utc>>,
    pub first_responder_id: Option<ID>,
    /// The first staff reply was deleted later (it still counts).
    pub first_response_deleted: bool,
    /// Seconds from opening to the first staff reply (None: unanswered).
    pub first_response_secs: Option<f64>,
    pub last_requester_message_at: Option<DateTime<Utc>>,
    pub last_staff_message_at: Option<DateTime<Utc>>,
    pub last_message_at: Option<DateTime<Utc>>,
    pub first_solved_at: Option<DateTime<Utc>>,
    pub last_solved_at: Option<DateTime<Utc>>,
    pub reopen_count: i32,
    pub message_count: i32,
    pub participant_ids: Vec<ID>,
    pub tag_ids: Vec<ID>,
    /// Start of the current wait (NEW or WAITING_ON_STAFF).
    pub waiting_since: Option<DateTime<Utc>>,
    /// Total time the requester has waited, the current wait included.
    pub requester_wait_secs: f64,
    /// Every next-response gap, in seconds.
    pub next_response_secs: Vec<f64>,
    /// None when the guild set no first-response target.
    pub sla_status: Option<SlaStatus>,
    pub sla_target_secs: Option<i32>,
}

impl From<ConversationRow> for Conversation {
    fn from(r: ConversationRow) -> Self {
        Conversation {
            id: id(r.conversation_id),
            guild_id: id(r.guild_id),
            channel_id: id(r.channel_id),
            support_channel_id: id(r.parent_id),
            title: r.name,
            requester_id: r.requester_id.map(id),
            state: ConversationState::from_db(&r.state),
            opened_at: r.opened_at,
            first_response_at: r.first_response_at,
            first_responder_id: r.first_responder_id.map(id),
            first_response_deleted: r.first_response_deleted,
            first_response_secs: r
                .first_response_at
                .map(|t| (t - r.opened_at).num_milliseconds() as f64 / 1000.0),
            last_requester_message_at: r.last_requester_at,
            last_staff_message_at: r.last_staff_at,
            last_message_at: r.last_message_at,
            first_solved_at: r.first_solved_at,
            last_solved_at: r.last_solved_at,
            reopen_count: r.reopen_count,
            message_count: r.message_count,
            participant_ids: r.participant_ids.into_iter().map(id).collect(),
            tag_ids: r.tag_ids.into_iter().map(id).collect(),
            waiting_since: r.waiting_since,
            requester_wait_secs: r.wait_secs,
            next_response_secs: r.next_response_secs,
            sla_status: r.sla_status.as_deref().map(|s| match s {
                "AT_RISK" => SlaStatus::AtRisk,
                "BREACHED" => SlaStatus::Breached,
                _ => SlaStatus::Ok,
            }),
            sla_target_secs: r.sla_target_secs,
        }
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct ConversationEdge {
    pub cursor: String,
    pub node: Conversation,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct ConversationConnection {
    pub edges: Vec<ConversationEdge>,
    pub has_next_page: bool,
    pub end_cursor: Option<String>,
}

/// Median and 90th percentile of a set of durations (seconds), with their count.
/// Exact for windows of up to 20,000 conversations; over larger ones they come
/// from daily rollups and are within 1 % (counts stay exact; see
/// docs/support-queue.md, "Telemetry at scale").
#[derive(SimpleObject, Debug, Clone)]
pub struct DurationStats {
    pub count: i64,
    pub median_secs: Option<f64>,
    pub p90_secs: Option<f64>,
}

impl From<queue::Durations> for DurationStats {
    fn from(d: queue::Durations) -> Self {
        DurationStats {
            count: d.count,
            median_secs: d.median,
            p90_secs: d.p90,
        }
    }
}

#[derive(SimpleObject, Debug, Clone)]
pub struct SupportSummary {
    /// Conversations opened in the window.
    pub opened: i64,
    /// Messages in those conversations.
    pub messages: i64,
    pub first_response: DurationStats,
    /// Opened in the window and still without a staff reply: always shown
    /// beside the response times, which cannot include them.
    pub unanswered: i64,
    pub next_response: DurationStats,
    pub first_resolution: DurationStats,
    pub full_resolution: DurationStats,
    pub unresolved: i64,
    pub requester_wait: DurationStats,
    /// Reopened / solved at least once (None: nothing solved).
    pub reopen_rate: Option<f64>,
    /// Met / (met + breached) of the first-response target (None: no target
    /// or nothing decided yet).
    pub sla_attainment: Option<f64>,
    pub sla_met: i64,
    pub sla_breached: i64,
    /// Now, whatever the window: conversations waiting on staff or new.
    pub backlog: i64,
    /// Now: how long the oldest of them has waited.
    pub oldest_waiting_secs: Option<f64>,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct SupportBucket {
    pub start: DateTime<Utc>,
    /// Conversations opened in this bucket.
    pub opened: i64,
    /// Messages (not deleted) of the conversations opened in this bucket,
    /// whenever they were written (not messages written in the bucket).
    pub messages: i64,
    pub unanswered: i64,
    pub first_response_median_secs: Option<f64>,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct Responder {
    pub user_id: ID,
    pub first_responses: i64,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct HeatmapCell {
    /// ISO weekday, 1 = Monday (UTC).
    pub weekday: i32,
    pub hour: i32,
    pub opened: i64,
}

#[derive(SimpleObject, Debug, Clone)]
pub struct SupportStats {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub summary: SupportSummary,
    pub series: Vec<SupportBucket>,
    pub top_responders: Vec<Responder>,
    pub heatmap: Vec<HeatmapCell>,
}

#[derive(SimpleObject, InputObject, Debug, Clone)]
#[graphql(input_name = "WeeklySlotInput")]
pub struct Slot {
    /// ISO weekday, 1 = Monday.
    pub day: i32,
    /// "HH:MM", local time.
    pub start: String,
    pub end: String,
}

#[derive(SimpleObject, InputObject, Debug, Clone)]
#[graphql(input_name = "BusinessHoursInput")]
pub struct Hours {
    /// An IANA time zone, e.g. "Europe/Paris".
    pub time_zone: String,
    pub weekly: Vec<Slot>,
}

/// A guild's support settings (managers only).
#[derive(SimpleObject, Debug, Clone)]
pub struct SupportSettings {
    pub guild_id: ID,
    /// None: every forum and media channel.
    pub support_channel_ids: Option<Vec<ID>>,
    /// Empty: members with MANAGE_MESSAGES in the support channel are staff.
    pub staff_role_ids: Vec<ID>,
    /// None: tags named like solved / resolved / answered / closed.
    pub solved_tag_names: Option<Vec<String>>,
    pub locked_means_solved: bool,
    pub archived_means_solved: bool,
    pub first_response_target_secs: Option<i32>,
    /// Stored; business-time durations are not computed yet.
    pub business_hours: Option<Hours>,
    pub updated_at: Option<DateTime<Utc>>,
    pub updated_by: Option<ID>,
    /// The recomputation the last change started: pending, and how far.
    pub recompute_pending: bool,
    pub recompute_done: i32,
    pub recompute_total: i32,
}

impl From<db_settings::SettingsView> for SupportSettings {
    fn from(v: db_settings::SettingsView) -> Self {
        let s = v.settings;
        SupportSettings {
            guild_id: id(v.guild_id),
            support_channel_ids: s
                .support_channel_ids
                .map(|c| c.into_iter().map(id).collect()),
            staff_role_ids: s.staff_role_ids.into_iter().map(id).collect(),
            solved_tag_names: s.solved_tag_names,
            locked_means_solved: s.locked_means_solved,
            archived_means_solved: s.archived_means_solved,
            first_response_target_secs: s.first_response_target_secs,
            business_hours: s.business_hours.map(|h| Hours {
                time_zone: h.time_zone,
                weekly: h
                    .weekly
                    .into_iter()
                    .map(|w| Slot {
                        day: i32::from(w.day),
                        start: w.start,
                        end: w.end,
                    })
                    .collect(),
            }),
            updated_at: v.updated_at,
            updated_by: v.updated_by.map(id),
            recompute_pending: v.recompute_pending,
            recompute_done: v.recompute_done,
            recompute_total: v.recompute_total,
        }
    }
}

/// The whole settings, replaced at once (omitted lists: the default).
#[derive(InputObject, Debug, Clone)]
pub struct SupportSettingsInput {
    pub support_channel_ids: Option<Vec<ID>>,
    #[graphql(default)]
    pub staff_role_ids: Vec<ID>,
    pub solved_tag_names: Option<Vec<String>>,
    #[graphql(default = true)]
    pub locked_means_solved: bool,
    #[graphql(default = false)]
    pub archived_means_solved: bool,
    pub first_response_target_secs: Option<i32>,
    pub business_hours: Option<Hours>,
}

fn ids(list: &[ID], what: &str) -> GqlResult<Vec<i64>> {
    if list.len() > MAX_LIST {
        return Err(bad_request(format!("too many {what}")));
    }
    let mut out = list
        .iter()
        .map(|i| parse_id(i).ok_or_else(|| bad_request(format!("invalid id in {what}"))))
        .collect::<GqlResult<Vec<i64>>>()?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn hhmm_ok(s: &str) -> bool {
    chrono::NaiveTime::parse_from_str(s, "%H:%M").is_ok()
}

impl SupportSettingsInput {
    fn validate(self) -> GqlResult<DbSettings> {
        let support_channel_ids = self
            .support_channel_ids
            .as_deref()
            .map(|c| ids(c, "supportChannelIds"))
            .transpose()?;
        let staff_role_ids = ids(&self.staff_role_ids, "staffRoleIds")?;
        let solved_tag_names = match self.solved_tag_names {
            Some(names) => {
                if names.len() > MAX_LIST
                    || names
                        .iter()
                        .any(|n| n.trim().is_empty() || n.chars().count() > 100)
                {
                    return Err(bad_request(
                        "solvedTagNames: 1-100 characters each, at most 250",
                    ));
                }
                Some(names.into_iter().map(|n| n.trim().to_owned()).collect())
            }
            None => None,
        };
        if self
            .first_response_target_secs
            .is_some_and(|t| !(60..=30 * 86_400).contains(&t))
        {
            return Err(bad_request(
                "firstResponseTargetSecs must be between 60 and 2592000, or null",
            ));
        }
        let business_hours = match self.business_hours {
            Some(h) => {
                // Shape only: the zone database arrives with business-time
                // durations (docs/support-queue.md, "What is not computed yet").
                if h.time_zone.is_empty()
                    || h.time_zone.len() > 64
                    || !h
                        .time_zone
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c))
                {
                    return Err(bad_request(
                        "businessHours.timeZone: not an IANA time zone name",
                    ));
                }
                let mut weekly = Vec::new();
                for s in h.weekly.into_iter().take(64) {
                    if !(1..=7).contains(&s.day) || !hhmm_ok(&s.start) || !hhmm_ok(&s.end) {
                        return Err(bad_request(
                            "businessHours.weekly: day 1-7, start and end as HH:MM",
                        ));
                    }
                    weekly.push(WeeklySlot {
                        day: u8::try_from(s.day).unwrap_or(1),
                        start: s.start,
                        end: s.end,
                    });
                }
                Some(BusinessHours {
                    time_zone: h.time_zone,
                    weekly,
                })
            }
            None => None,
        };
        Ok(DbSettings {
            support_channel_ids,
            staff_role_ids,
            solved_tag_names,
            locked_means_solved: self.locked_means_solved,
            archived_means_solved: self.archived_means_solved,
            first_response_target_secs: self.first_response_target_secs,
            business_hours,
        })
    }
}

fn encode_cursor(c: queue::Cursor) -> String {
    let key =
        c.0.map_or_else(|| "n".to_owned(), |t| t.timestamp_micros().to_string());
    cursor::opaque(&format!("q1:{key}:{}", c.1))
}

fn parse_cursor(s: &str) -> Option<queue::Cursor> {
    if s.len() > 128 {
        return None;
    }
    let text = cursor::unopaque(s)?;
    let (key, id) = text.strip_prefix("q1:")?.split_once(':')?;
    let id: i64 = id.parse().ok()?;
    let key = if key == "n" {
        None
    } else {
        Some(DateTime::<Utc>::from_timestamp_micros(key.parse().ok()?)?)
    };
    Some((key, id))
}

#[derive(Default)]
pub struct SupportQuery;

#[Object]
impl SupportQuery {
    /// The guild's support queue, oldest wait first by default. Only
    /// conversations in channels the viewer may read exist here. `channelIds`:
    /// support channels (forums) or posts; `tagIds`: posts carrying any of them.
    // A GraphQL field's arguments are its parameters.
    #[allow(clippy::too_many_arguments)]
    async fn conversations(
        &self,
        ctx: &Context<'_>,
        guild_id: ID,
        states: Option<Vec<ConversationState>>,
        channel_ids: Option<Vec<ID>>,
        tag_ids: Option<Vec<ID>>,
        #[graphql(default = 50)] first: i32,
        after: Option<String>,
        #[graphql(default)] order_by: ConversationOrder,
    ) -> GqlResult<ConversationConnection> {
        let rdb = request_db(ctx)?;
        rdb.viewer()?;
        if !(1..=100).contains(&first) {
            return Err(bad_request("`first` must be between 1 and 100"));
        }
        let after = match after {
            Some(a) => Some(parse_cursor(&a).ok_or_else(|| bad_request("invalid cursor"))?),
            None => None,
        };
        let empty = || ConversationConnection {
            edges: vec![],
            has_next_page: false,
            end_cursor: None,
        };
        let Some(guild_id) = parse_id(&guild_id) else {
            return Ok(empty());
        };
        let filter = queue::Filter {
            states: states
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.as_db().to_owned())
                .collect(),
            channel_ids: ids(channel_ids.as_deref().unwrap_or_default(), "channelIds")?,
            tag_ids: ids(tag_ids.as_deref().unwrap_or_default(), "tagIds")?,
        };
        let order = Order::from(order_by);
        let limit = i64::from(first);
        let mut tx = rdb.tx().await?;
        let mut rows = queue::page(&mut tx, guild_id, &filter, order, after, limit + 1)
            .await
            .map_err(from_db)?;
        let has_next_page = rows.len() as i64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(0));
        let edges: Vec<ConversationEdge> = rows
            .into_iter()
            .map(|r| ConversationEdge {
                cursor: encode_cursor(queue::cursor_of(&r, order)),
                node: r.into(),
            })
            .collect();
        Ok(ConversationConnection {
            end_cursor: edges.last().map(|e| e.cursor.clone()),
            edges,
            has_next_page,
        })
    }

    async fn conversation(&self, ctx: &Context<'_>, id: ID) -> GqlResult<Option<Conversation>> {
        let rdb = request_db(ctx)?;
        rdb.viewer()?;
        let Some(cid) = parse_id(&id) else {
            return Ok(None);
        };
        let mut tx = rdb.tx().await?;
        Ok(queue::one(&mut tx, cid)
            .await
            .map_err(from_db)?
            .map(Conversation::from))
    }

    /// Telemetry over `[from, to)` (default: the last 30 days), computed over
    /// the conversations the viewer can see.
    // A GraphQL field's arguments are its parameters.
    #[allow(clippy::too_many_arguments)]
    async fn support_stats(
        &self,
        ctx: &Context<'_>,
        guild_id: ID,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        #[graphql(default_with = "StatsBucket::Day")] bucket: StatsBucket,
        channel_ids: Option<Vec<ID>>,
        tag_ids: Option<Vec<ID>>,
    ) -> GqlResult<SupportStats> {
        let rdb = request_db(ctx)?;
        rdb.viewer()?;
        let to = to.unwrap_or_else(Utc::now);
        let from = from.unwrap_or(to - chrono::Duration::days(30));
        if from >= to || to - from > chrono::Duration::days(MAX_WINDOW_DAYS) {
            return Err(bad_request(
                "`from` must be before `to`, at most 366 days apart",
            ));
        }
        if bucket == StatsBucket::Hour && to - from > chrono::Duration::days(31) {
            return Err(bad_request("hourly buckets: at most 31 days"));
        }
        let channel_ids = ids(channel_ids.as_deref().unwrap_or_default(), "channelIds")?;
        let tag_ids = ids(tag_ids.as_deref().unwrap_or_default(), "tagIds")?;
        // An id that cannot exist answers like a guild with nothing visible.
        let guild_id = parse_id(&guild_id).unwrap_or(0);
        let bucket = match bucket {
            StatsBucket::Hour => "hour",
            StatsBucket::Day => "day",
            StatsBucket::Week => "week",
        };
        let mut tx = rdb.tx().await?;
        let s = queue::stats(&mut tx, guild_id, from, to, bucket, &channel_ids, &tag_ids)
            .await
            .map_err(from_db)?;
        let m = s.summary;
        let ratio = |a: i64, b: i64| (b > 0).then(|| a as f64 / b as f64);
        Ok(SupportStats {
            from,
            to,
            summary: SupportSummary {
                opened: m.opened,
                messages: m.messages,
                first_response: m.first_response.into(),
                unanswered: m.unanswered,
                next_response: m.next_response.into(),
                first_resolution: m.first_resolution.into(),
                full_resolution: m.full_resolution.into(),
                unresolved: m.unresolved,
                requester_wait: m.requester_wait.into(),
                reopen_rate: ratio(m.reopened, m.solved),
                sla_attainment: ratio(m.sla_met, m.sla_met + m.sla_breached),
                sla_met: m.sla_met,
                sla_breached: m.sla_breached,
                backlog: m.backlog,
                oldest_waiting_secs: m
                    .oldest_waiting_since
                    .map(|t| (Utc::now() - t).num_milliseconds() as f64 / 1000.0),
            },
            series: s
                .series
                .into_iter()
                .map(|b| SupportBucket {
                    start: b.start,
                    opened: b.opened,
                    messages: b.messages,
                    unanswered: b.unanswered,
                    first_response_median_secs: b.first_response_median,
                })
                .collect(),
            top_responders: s
                .top_responders
                .into_iter()
                .map(|r| Responder {
                    user_id: id(r.user_id),
                    first_responses: r.first_responses,
                })
                .collect(),
            heatmap: s
                .heatmap
                .into_iter()
                .map(|(weekday, hour, opened)| HeatmapCell {
                    weekday,
                    hour,
                    opened,
                })
                .collect(),
        })
    }

    /// The guild's support settings: for its managers (owner, ADMINISTRATOR,
    /// MANAGE_GUILD); NOT_FOUND for anyone else.
    async fn support_settings(
        &self,
        ctx: &Context<'_>,
        guild_id: ID,
    ) -> GqlResult<SupportSettings> {
        let rdb = request_db(ctx)?;
        rdb.viewer()?;
        let guild_id = parse_id(&guild_id).ok_or_else(not_found)?;
        let mut tx = rdb.tx().await?;
        Ok(db_settings::get(&mut tx, guild_id)
            .await
            .map_err(from_db)?
            .into())
    }
}

#[derive(Default)]
pub struct SupportMutation;

#[Object]
impl SupportMutation {
    /// Replaces the guild's support settings (managers only; NOT_FOUND for
    /// anyone else). The change is audited and the worker recomputes the
    /// guild's conversations in the background (`recomputePending`).
    async fn set_support_settings(
        &self,
        ctx: &Context<'_>,
        guild_id: ID,
        settings: SupportSettingsInput,
    ) -> GqlResult<SupportSettings> {
        let rdb = request_db(ctx)?;
        let me = rdb.viewer()?;
        let guild_id = parse_id(&guild_id).ok_or_else(not_found)?;
        let new = settings.validate()?;
        let mut tx = rdb.tx().await?;
        Ok(db_settings::set(&mut tx, guild_id, me.user_id, &new)
            .await
            .map_err(from_db)?
            .into())
    }
}
