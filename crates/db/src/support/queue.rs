//! The API's reads of the support queue. Every query runs as `observer_api`
//! with the viewer set: row-level security keeps only the conversations
//! whose channel the viewer may read, so every list and every aggregate is
//! over those alone and no number counts a hidden channel.

use chrono::{DateTime, Utc};

use crate::{Result, ViewerTx};

/// A conversation as the API shows it. `sla_status` is computed at read
/// time (it changes with the clock): None without a target.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConversationRow {
    pub guild_id: i64,
    pub conversation_id: i64,
    pub channel_id: i64,
    pub parent_id: i64,
    pub requester_id: Option<i64>,
    pub opened_at: DateTime<Utc>,
    pub state: String,
    pub first_response_at: Option<DateTime<Utc>>,
    pub first_responder_id: Option<i64>,
    pub first_response_deleted: bool,
    pub last_requester_at: Option<DateTime<Utc>>,
    pub last_staff_at: Option<DateTime<Utc>>,
    pub last_message_at: Option<DateTime<Utc>>,
    pub first_solved_at: Option<DateTime<Utc>>,
    pub last_solved_at: Option<DateTime<Utc>>,
    pub reopen_count: i32,
    pub message_count: i32,
    pub participant_ids: Vec<i64>,
    pub tag_ids: Vec<i64>,
    pub waiting_since: Option<DateTime<Utc>>,
    /// Total requester wait so far, the current wait included.
    pub wait_secs: f64,
    pub next_response_secs: Vec<f64>,
    pub sla_target_secs: Option<i32>,
    pub sla_status: Option<String>,
    pub name: Option<String>,
}

/// Queue orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Oldest wait first; conversations not waiting last (the default).
    WaitingLongest,
    /// Newest opened first.
    Newest,
    /// Most recent message first.
    RecentActivity,
}

/// A position in one of the orders: the sort key (None = "not waiting",
/// after every wait) and the conversation id.
pub type Cursor = (Option<DateTime<Utc>>, i64);

#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Empty: every state.
    pub states: Vec<String>,
    /// Support channels (forums) or conversation threads; empty: all.
    pub channel_ids: Vec<i64>,
    /// Forum tags: conversations carrying any of them; empty: all.
    pub tag_ids: Vec<i64>,
}

// The columns of ConversationRow, one definition for every read below.
macro_rules! conversation_query {
    ($tail:literal, $($arg:expr),* $(,)?) => {
        sqlx::query_as!(
            ConversationRow,
            "select c.guild_id, c.conversation_id, c.channel_id, c.parent_id, c.requester_id, \
               c.opened_at as \"opened_at: DateTime<Utc>\", c.state, \
               c.first_response_at as \"first_response_at: DateTime<Utc>\", c.first_responder_id, \
               c.first_response_deleted, \
               c.last_requester_at as \"last_requester_at: DateTime<Utc>\", \
               c.last_staff_at as \"last_staff_at: DateTime<Utc>\", \
               c.last_message_at as \"last_message_at: DateTime<Utc>\", \
               c.first_solved_at as \"first_solved_at: DateTime<Utc>\", \
               c.last_solved_at as \"last_solved_at: DateTime<Utc>\", \
               c.reopen_count, c.message_count, c.participant_ids, c.tag_ids, \
               c.waiting_since as \"waiting_since: DateTime<Utc>\", \
               c.wait_secs_closed + coalesce(extract(epoch from now() - c.waiting_since)::float8, 0) \
                 as \"wait_secs!\", \
               c.next_response_secs, c.sla_target_secs, \
               case when c.sla_target_secs is null then null \
                    when least(c.first_response_at, c.first_solved_at) is not null then \
                      case when least(c.first_response_at, c.first_solved_at) - c.opened_at \
                                <= make_interval(secs => c.sla_target_secs) \
                           then 'OK' else 'BREACHED' end \
                    when now() - c.opened_at > make_interval(secs => c.sla_target_secs) then 'BREACHED' \
                    when now() - c.opened_at > make_interval(secs => c.sla_target_secs * 0.8) \
                      then 'AT_RISK' \
                    else 'OK' end as sla_status, \
               ch.name as \"name?\" \
             from conversations c \
             left join channels ch on ch.guild_id = c.guild_id and ch.channel_id = c.channel_id "
                + $tail,
            $($arg),*
        )
    };
}

/// One page of the guild's queue, `first` rows after `after`.
pub async fn page(
    tx: &mut ViewerTx,
    guild_id: i64,
    filter: &Filter,
    order: Order,
    after: Option<Cursor>,
    first: i64,
) -> Result<Vec<ConversationRow>> {
    // One more than a page: callers ask for it to learn whether a next page exists.
    let first = first.clamp(1, crate::viewer::MAX_PAGE + 1);
    let (after_at, after_id) = (after.and_then(|c| c.0), after.map(|c| c.1));
    let rows = match order {
        Order::WaitingLongest => {
            conversation_query!(
                "where c.guild_id = $1 \
                   and (cardinality($2::text[]) = 0 or c.state = any ($2)) \
                   and (cardinality($3::bigint[]) = 0 or c.parent_id = any ($3) \
                        or c.channel_id = any ($3)) \
                   and (cardinality($7::bigint[]) = 0 or c.tag_ids && $7) \
                   and ($5::bigint is null \
                        or (coalesce(c.waiting_since, 'infinity'::timestamptz), c.conversation_id) \
                           > (coalesce($4, 'infinity'::timestamptz), $5)) \
                 order by coalesce(c.waiting_since, 'infinity'::timestamptz), c.conversation_id \
                 limit $6",
                guild_id,
                &filter.states,
                &filter.channel_ids,
                after_at as Option<DateTime<Utc>>,
                after_id,
                first,
                &filter.tag_ids,
            )
            .fetch_all(&mut **tx)
            .await?
        }
        Order::Newest => {
            conversation_query!(
                "where c.guild_id = $1 \
                   and (cardinality($2::text[]) = 0 or c.state = any ($2)) \
                   and (cardinality($3::bigint[]) = 0 or c.parent_id = any ($3) \
                        or c.channel_id = any ($3)) \
                   and (cardinality($7::bigint[]) = 0 or c.tag_ids && $7) \
                   and ($5::bigint is null or (c.opened_at, c.conversation_id) < ($4, $5)) \
                 order by c.opened_at desc, c.conversation_id desc \
                 limit $6",
                guild_id,
                &filter.states,
                &filter.channel_ids,
                after_at as Option<DateTime<Utc>>,
                after_id,
                first,
                &filter.tag_ids,
            )
            .fetch_all(&mut **tx)
            .await?
        }
        Order::RecentActivity => {
            conversation_query!(
                "where c.guild_id = $1 \
                   and (cardinality($2::text[]) = 0 or c.state = any ($2)) \
                   and (cardinality($3::bigint[]) = 0 or c.parent_id = any ($3) \
                        or c.channel_id = any ($3)) \
                   and (cardinality($7::bigint[]) = 0 or c.tag_ids && $7) \
                   and ($5::bigint is null \
                        or (coalesce(c.last_message_at, c.opened_at), c.conversation_id) < ($4, $5)) \
                 order by coalesce(c.last_message_at, c.opened_at) desc, c.conversation_id desc \
                 limit $6",
                guild_id,
                &filter.states,
                &filter.channel_ids,
                after_at as Option<DateTime<Utc>>,
                after_id,
                first,
                &filter.tag_ids,
            )
            .fetch_all(&mut **tx)
            .await?
        }
    };
    Ok(rows)
}

/// The cursor of `row` in `order`.
pub fn cursor_of(row: &ConversationRow, order: Order) -> Cursor {
    let key = match order {
        Order::WaitingLongest => row.waiting_since,
        Order::Newest => Some(row.opened_at),
        Order::RecentActivity => Some(row.last_message_at.unwrap_or(row.opened_at)),
    };
    (key, row.conversation_id)
}

/// One conversation by id (None: absent or not visible, the same answer).
pub async fn one(tx: &mut ViewerTx, conversation_id: i64) -> Result<Option<ConversationRow>> {
    let row = conversation_query!("where c.conversation_id = $1", conversation_id)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(row)
}

pub use super::stats::{stats, Bucket, Durations, Responder, Stats, Summary};
