//! The support queue as the simulator knows it: a journal of every forum post (a support
//! conversation in the sense of `docs/support-queue.md`, with the default settings: every forum
//! and media channel is a support channel, staff = MANAGE_MESSAGES in the forum, solved = a tag
//! named like solved/resolved/answered/closed, or a lock), and the metrics computed from that
//! journal alone, so tests compare the product's derivation with figures obtained independently.
//!
//! The journal is written by the world's mutation paths (`world/support.rs`) as things happen —
//! posts, deletions, THREAD_UPDATEs that set or clear the solved marker — whoever caused them
//! (support traffic, other traffic, tests, the control API). It never re-reads stored messages.
//!
//! - `live`    — live support traffic (posts, staff answers after time-of-day dependent delays,
//!   follow-ups, solved tags, reopens), step-driven and reproducible from a seed.
//! - `history` — back-dated support history inserted at load time.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::sf;

pub(crate) mod history;
pub(crate) mod live;

/// Who wrote a message, relative to the conversation, as classified when it was posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The thread's owner (even when they are staff themselves: the requester never answers
    /// their own question).
    Requester,
    /// A human other than the requester with MANAGE_MESSAGES in the forum (the server owner
    /// and ADMINISTRATOR included).
    Staff,
    /// A human who is neither: counts on the requester's side ("the requester (or another
    /// non-staff human) spoke last").
    OtherHuman,
    /// A bot (the simulator's own bot, or a user with `bot: true`): never staff, never requester;
    /// ignored by every metric.
    Bot,
}

impl Side {
    /// The requester's side of the conversation: the requester or another non-staff human.
    pub fn is_requester_side(self) -> bool {
        matches!(self, Side::Requester | Side::OtherHuman)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupportMessage {
    #[serde(with = "sf")]
    pub id: u64,
    #[serde(with = "sf")]
    pub author_id: u64,
    pub at: DateTime<Utc>,
    pub side: Side,
    pub deleted: bool,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// The solved marker (a solved tag, or the lock) appearing (`present`) or going.
///
/// Dating: for live changes, the simulated time at which the simulator applied it. For
/// back-dated history and for tags a thread already carried when the simulator first saw it
/// (a loaded scenario), the time of the conversation's last message before it (its opening
/// when it has none): what a product that first sees the tag at backfill can know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkerChange {
    pub at: DateTime<Utc>,
    pub present: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConversationState {
    New,
    WaitingOnStaff,
    WaitingOnRequester,
    Solved,
}

/// One next-response data point: a requester-side message that followed a staff message, and
/// the next staff message (none yet: `to_*` and `ms` are `None`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseGap {
    #[serde(with = "sf")]
    pub from_message_id: u64,
    pub from_at: DateTime<Utc>,
    #[serde(with = "sf::opt")]
    pub to_message_id: Option<u64>,
    pub to_at: Option<DateTime<Utc>>,
    pub ms: Option<i64>,
}

/// One conversation (forum post) as the simulator's journal has it, with its metrics as of
/// [`SupportTruth::as_of`]. Durations are milliseconds of calendar time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationTruth {
    /// The conversation's id: the forum post (thread) id.
    #[serde(with = "sf")]
    pub thread_id: u64,
    #[serde(with = "sf")]
    pub guild_id: u64,
    #[serde(with = "sf")]
    pub forum_id: u64,
    /// The thread's owner.
    #[serde(with = "sf")]
    pub requester_id: u64,
    /// The thread's creation time. Posts the simulator creates share their id (and time) with
    /// their starter message, as on Discord, so this is also the opening message's time.
    pub opened_at: DateTime<Utc>,
    /// Every message posted in the thread up to `as_of`, in id order (bots' included, marked).
    pub messages: Vec<SupportMessage>,
    /// Every change of the solved marker up to `as_of`, in order.
    pub markers: Vec<MarkerChange>,
    pub thread_deleted_at: Option<DateTime<Utc>>,

    pub state: ConversationState,
    /// First message by human staff other than the requester (deleted or not).
    pub first_response_at: Option<DateTime<Utc>>,
    #[serde(with = "sf::opt")]
    pub first_responder_id: Option<u64>,
    #[serde(with = "sf::opt")]
    pub first_response_message_id: Option<u64>,
    /// `opened_at` → `first_response_at`.
    pub first_response_ms: Option<i64>,
    /// The first response was deleted later (it still counts).
    pub first_response_deleted: bool,
    /// Next-response data points, in order (the rule is on `compute` below).
    pub next_responses: Vec<ResponseGap>,
    /// When the conversation first became SOLVED.
    pub first_solved_at: Option<DateTime<Utc>>,
    /// When it last became SOLVED (whether or not it still is).
    pub last_solved_at: Option<DateTime<Utc>>,
    /// `opened_at` → `first_solved_at`.
    pub first_resolution_ms: Option<i64>,
    /// `opened_at` → `last_solved_at`, only while the conversation is SOLVED.
    pub full_resolution_ms: Option<i64>,
    pub reopen_count: u32,
    /// Messages by humans (requester side and staff; deleted ones included).
    pub human_message_count: u32,
    /// Last message on the requester's side (the requester or another non-staff human).
    pub last_requester_message_at: Option<DateTime<Utc>>,
    pub last_staff_message_at: Option<DateTime<Utc>>,
    /// Total time in NEW or WAITING_ON_STAFF from `opened_at` to `as_of`.
    pub requester_wait_ms: i64,
}

/// Every support conversation the simulator has seen, in thread id order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupportTruth {
    /// The time the metrics are computed at (events after it are left out).
    pub as_of: DateTime<Utc>,
    pub conversations: Vec<ConversationTruth>,
}

impl SupportTruth {
    pub fn get(&self, thread_id: u64) -> Option<&ConversationTruth> {
        self.conversations.iter().find(|c| c.thread_id == thread_id)
    }

    /// Conversations per state.
    pub fn count_by_state(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for c in &self.conversations {
            let key = serde_json::to_value(c.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            *out.entry(key).or_insert(0) += 1;
        }
        out
    }
}

/// What [`crate::Simulator::generate_support_history`] produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupportHistory {
    /// The posts created, oldest first.
    #[serde(with = "sf::vec")]
    pub threads: Vec<u64>,
    pub messages: usize,
    /// Posts auto-archived (idle for longer than their `auto_archive_duration`).
    pub archived: usize,
    /// Posts carrying the solved tag.
    pub solved: usize,
}

/// Discord's default notion of a solved tag (docs/support-queue.md): a whole word `solved`,
/// `resolved`, `answered` or `closed`, case-insensitive ("Solved ✅" is one, "unsolved" not).
pub fn is_solved_tag_name(name: &str) -> bool {
    name.split(|c: char| !c.is_alphanumeric())
        .any(|w| ["solved", "resolved", "answered", "closed"].contains(&&*w.to_lowercase()))
}

#[derive(Clone, Debug)]
pub(crate) enum Entry {
    Message(SupportMessage),
    Marker(MarkerChange),
}

impl Entry {
    fn at(&self) -> DateTime<Utc> {
        match self {
            Entry::Message(m) => m.at,
            Entry::Marker(m) => m.at,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub guild_id: u64,
    pub forum_id: u64,
    pub requester_id: u64,
    pub opened_at: DateTime<Utc>,
    /// In the order they happened.
    pub entries: Vec<Entry>,
    /// Whether the solved marker is present, as last recorded.
    pub marker: bool,
    pub thread_deleted_at: Option<DateTime<Utc>>,
}

impl Record {
    /// The latest message time (the opening when there is none): when a marker first seen
    /// without having been watched being set is dated.
    pub fn last_message_at(&self) -> DateTime<Utc> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                Entry::Message(m) => Some(m.at),
                Entry::Marker(_) => None,
            })
            .max()
            .unwrap_or(self.opened_at)
    }
}

/// The simulator's own record of every support conversation. Lives in the world, behind its lock.
#[derive(Debug, Default)]
pub(crate) struct Journal {
    pub records: BTreeMap<u64, Record>,
    /// Message id → thread id, for deletions.
    pub message_thread: HashMap<u64, u64>,
}

impl Journal {
    pub fn truth(&self, as_of: DateTime<Utc>) -> SupportTruth {
        SupportTruth {
            as_of,
            conversations: self
                .records
                .iter()
                .filter(|(_, r)| r.opened_at <= as_of)
                .map(|(id, r)| compute(*id, r, as_of))
                .collect(),
        }
    }
}

fn ms(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    (to - from).num_milliseconds()
}

/// The metrics of docs/support-queue.md over the journal, replayed in time order. Choices where
/// the document leaves room (all written down so the product can be compared knowingly):
/// - Deleted messages count everywhere (the document: "a staff reply deleted later still
///   counts"); `first_response_deleted` flags the first response.
/// - Bots count nowhere: they neither answer, nor reopen, nor start a next-response gap.
/// - A message by a non-staff human other than the requester acts as the requester's would
///   (state, reopen, next-response gaps, `last_requester_message_at`).
/// - A next-response gap opens at a requester-side message whose previous human message was
///   staff's (literally "follows a staff message"; so a reopen after the requester's own
///   "thanks" opens none) and closes at the next staff message; one gap at a time.
/// - A marker set while no staff has answered makes the conversation SOLVED all the same; a
///   reopen goes back to NEW if staff never answered (WAITING_ON_STAFF otherwise).
/// - SOLVED needs a new marker after a reopen: the tag left in place does not solve again.
/// - Events at the same millisecond keep the order they happened in.
fn compute(thread_id: u64, r: &Record, as_of: DateTime<Utc>) -> ConversationTruth {
    let mut entries: Vec<(usize, &Entry)> = r
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.at() <= as_of)
        .collect();
    entries.sort_by_key(|(i, e)| (e.at(), *i));

    let mut t = ConversationTruth {
        thread_id,
        guild_id: r.guild_id,
        forum_id: r.forum_id,
        requester_id: r.requester_id,
        opened_at: r.opened_at,
        messages: vec![],
        markers: vec![],
        thread_deleted_at: r.thread_deleted_at.filter(|d| *d <= as_of),
        state: ConversationState::New,
        first_response_at: None,
        first_responder_id: None,
        first_response_message_id: None,
        first_response_ms: None,
        first_response_deleted: false,
        next_responses: vec![],
        first_solved_at: None,
        last_solved_at: None,
        first_resolution_ms: None,
        full_resolution_ms: None,
        reopen_count: 0,
        human_message_count: 0,
        last_requester_message_at: None,
        last_staff_message_at: None,
        requester_wait_ms: 0,
    };
    let mut staff_answered = false;
    let mut staff_spoke_last = false;
    let mut solved = false;
    let mut open_gap: Option<usize> = None;
    let mut since = r.opened_at;
    let waiting = |s: ConversationState| {
        matches!(
            s,
            ConversationState::New | ConversationState::WaitingOnStaff
        )
    };
    for (_, e) in entries {
        let at = e.at();
        if waiting(t.state) {
            t.requester_wait_ms += ms(since, at).max(0);
        }
        since = since.max(at);
        match e {
            Entry::Message(m) => {
                let mut m = m.clone();
                // Deletions after `as_of` have not happened yet.
                if m.deleted_at.is_some_and(|d| d > as_of) {
                    m.deleted = false;
                    m.deleted_at = None;
                }
                match m.side {
                    Side::Bot => {}
                    Side::Staff => {
                        t.human_message_count += 1;
                        if t.first_response_at.is_none() {
                            t.first_response_at = Some(at);
                            t.first_responder_id = Some(m.author_id);
                            t.first_response_message_id = Some(m.id);
                            t.first_response_ms = Some(ms(r.opened_at, at));
                            t.first_response_deleted = m.deleted;
                        }
                        if let Some(g) = open_gap.take().and_then(|i| t.next_responses.get_mut(i)) {
                            g.to_message_id = Some(m.id);
                            g.to_at = Some(at);
                            g.ms = Some(ms(g.from_at, at));
                        }
                        staff_answered = true;
                        staff_spoke_last = true;
                        t.last_staff_message_at = Some(at);
                    }
                    Side::Requester | Side::OtherHuman => {
                        t.human_message_count += 1;
                        if staff_spoke_last && open_gap.is_none() {
                            open_gap = Some(t.next_responses.len());
                            t.next_responses.push(ResponseGap {
                                from_message_id: m.id,
                                from_at: at,
                                to_message_id: None,
                                to_at: None,
                                ms: None,
                            });
                        }
                        if solved {
                            solved = false;
                            t.reopen_count += 1;
                        }
                        staff_spoke_last = false;
                        t.last_requester_message_at = Some(at);
                    }
                }
                t.messages.push(m);
            }
            Entry::Marker(c) => {
                t.markers.push(*c);
                if c.present && !solved {
                    solved = true;
                    t.first_solved_at.get_or_insert(at);
                    t.last_solved_at = Some(at);
                } else if !c.present {
                    solved = false;
                }
            }
        }
        t.state = if solved {
            ConversationState::Solved
        } else if !staff_answered {
            ConversationState::New
        } else if staff_spoke_last {
            ConversationState::WaitingOnRequester
        } else {
            ConversationState::WaitingOnStaff
        };
    }
    if waiting(t.state) {
        t.requester_wait_ms += ms(since, as_of).max(0);
    }
    t.first_resolution_ms = t.first_solved_at.map(|s| ms(r.opened_at, s));
    t.full_resolution_ms = match (t.state, t.last_solved_at) {
        (ConversationState::Solved, Some(s)) => Some(ms(r.opened_at, s)),
        _ => None,
    };
    t.messages.sort_by_key(|m| m.id);
    t
}

#[cfg(test)]
mod tests {
    use super::is_solved_tag_name;

    #[test]
    fn solved_tag_names_are_whole_words() {
        for yes in [
            "solved",
            "Solved ✅",
            "RESOLVED",
            "answered!",
            "closed-by-staff",
        ] {
            assert!(is_solved_tag_name(yes), "{yes}");
        }
        for no in ["unsolved", "question", "bug", "enclosed", ""] {
            assert!(!is_solved_tag_name(no), "{no}");
        }
    }
}
