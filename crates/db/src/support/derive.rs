//! A conversation's state and metrics as a pure function of what is stored:
//! its messages (ordered by id), who among their authors is staff, and the
//! solved markers observed. No clock but the one passed in, no I/O, so the
//! same inputs give the same row whatever order the events arrived in.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

/// One stored message of the conversation, in id order.
#[derive(Debug, Clone)]
pub struct Msg {
    pub message_id: i64,
    /// None for a tombstone whose create was never seen: it cannot be
    /// attributed, so it is left out.
    pub author_id: Option<i64>,
    /// Bots and webhooks (Discord marks both `bot`).
    pub bot: bool,
    pub created_at: DateTime<Utc>,
    pub deleted: bool,
}

/// A solved marker as observed (see migrations/0034).
#[derive(Debug, Clone)]
pub struct Mark {
    pub observed_at: DateTime<Utc>,
    pub first_sight: bool,
    pub cleared_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    New,
    WaitingOnStaff,
    WaitingOnRequester,
    Solved,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::New => "NEW",
            State::WaitingOnStaff => "WAITING_ON_STAFF",
            State::WaitingOnRequester => "WAITING_ON_REQUESTER",
            State::Solved => "SOLVED",
        }
    }
}

/// What a thread tells us before its messages.
#[derive(Debug, Clone)]
pub struct Opening {
    /// The thread's creator, when Discord said.
    pub owner_id: Option<i64>,
    pub opened_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    pub requester_id: Option<i64>,
    pub state: State,
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
    pub waiting_since: Option<DateTime<Utc>>,
    pub wait_secs_closed: f64,
    pub next_response_secs: Vec<f64>,
}

/// The time a mark counts from: its observation, or for a marker already
/// there when the conversation was first seen, the latest message created
/// before that (the best lower bound Discord gives; the opening if none).
pub fn mark_set_at(mark: &Mark, opening: &Opening, msgs: &[Msg]) -> DateTime<Utc> {
    if !mark.first_sight {
        return mark.observed_at;
    }
    msgs.iter()
        .map(|m| m.created_at)
        .filter(|t| *t <= mark.observed_at)
        .max()
        .unwrap_or(opening.opened_at)
        .max(opening.opened_at)
}

enum Step {
    Message(usize),
    Set,
    Clear,
}

/// The requester: the thread's creator unless unknown or a bot (a ticket
/// bot opening threads for people), then the first human author.
fn requester(opening: &Opening, msgs: &[Msg]) -> Option<i64> {
    let bot_ids: BTreeSet<i64> = msgs
        .iter()
        .filter(|m| m.bot)
        .filter_map(|m| m.author_id)
        .collect();
    opening
        .owner_id
        .filter(|o| !bot_ids.contains(o))
        .or_else(|| msgs.iter().find(|m| !m.bot).and_then(|m| m.author_id))
}

/// Folds the timeline. `is_staff` answers for human authors other than the
/// requester (the requester never answers their own question).
pub fn derive(
    opening: &Opening,
    msgs: &[Msg],
    marks: &[Mark],
    is_staff: impl Fn(i64) -> bool,
) -> Derived {
    let requester_id = requester(opening, msgs);
    // The timeline: messages by id (Discord's order), marks by their time;
    // a mark dated at a message's time comes after it.
    let mut steps: Vec<(DateTime<Utc>, u8, i64, Step)> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (m.created_at, 0, m.message_id, Step::Message(i)))
        .collect();
    for mark in marks {
        steps.push((mark_set_at(mark, opening, msgs), 1, 0, Step::Set));
        if let Some(c) = mark.cleared_at {
            steps.push((c, 2, 0, Step::Clear));
        }
    }
    steps.sort_by_key(|(t, rank, id, _)| (*t, *rank, *id));

    let mut d = Derived {
        requester_id,
        state: State::New,
        first_response_at: None,
        first_responder_id: None,
        first_response_deleted: false,
        last_requester_at: None,
        last_staff_at: None,
        last_message_at: None,
        first_solved_at: None,
        last_solved_at: None,
        reopen_count: 0,
        message_count: 0,
        participant_ids: Vec::new(),
        waiting_since: Some(opening.opened_at),
        wait_secs_closed: 0.0,
        next_response_secs: Vec::new(),
    };
    let mut participants = BTreeSet::new();
    // Who spoke last among humans: staff (true) or the requester side.
    let mut staff_last: Option<bool> = None;
    // A requester message after staff that awaits the next staff message.
    let mut next_pending: Option<DateTime<Utc>> = None;
    let mut marks_open = 0u32;
    let mut solved = false;

    for (t, _, _, step) in steps {
        match step {
            Step::Set => {
                marks_open += 1;
                if !solved {
                    solved = true;
                    d.first_solved_at.get_or_insert(t);
                    d.last_solved_at = Some(t);
                    close_wait(&mut d, t);
                }
            }
            Step::Clear => {
                marks_open = marks_open.saturating_sub(1);
                if solved && marks_open == 0 {
                    solved = false;
                    if staff_last != Some(true) {
                        d.waiting_since = Some(t);
                    }
                }
            }
            Step::Message(i) => {
                let m = &msgs[i];
                let Some(author) = m.author_id else { continue };
                if !m.deleted {
                    d.message_count += 1;
                }
                d.last_message_at = Some(t);
                if m.bot {
                    continue;
                }
                participants.insert(author);
                let staff = Some(author) != requester_id && is_staff(author);
                if staff {
                    d.last_staff_at = Some(t);
                    if d.first_response_at.is_none() {
                        d.first_response_at = Some(t);
                        d.first_responder_id = Some(author);
                        d.first_response_deleted = m.deleted;
                    }
                    if let Some(since) = next_pending.take() {
                        d.next_response_secs.push(secs(t - since));
                    }
                    close_wait(&mut d, t);
                    staff_last = Some(true);
                } else {
                    d.last_requester_at = Some(t);
                    if solved {
                        // "One more thing" after the marker: reopened until
                        // a marker is set again. A next-response gap opens
                        // only if staff had spoken last (docs: "a requester
                        // message that follows a staff message").
                        solved = false;
                        d.reopen_count += 1;
                        if staff_last == Some(true) {
                            next_pending = Some(t);
                        }
                        d.waiting_since = Some(t);
                    } else if staff_last == Some(true) {
                        next_pending = Some(t);
                        d.waiting_since = Some(t);
                    } else if d.waiting_since.is_none() {
                        d.waiting_since = Some(t);
                    }
                    staff_last = Some(false);
                }
            }
        }
    }
    d.state = if solved {
        State::Solved
    } else if d.first_response_at.is_none() {
        State::New
    } else if staff_last == Some(true) {
        State::WaitingOnRequester
    } else {
        State::WaitingOnStaff
    };
    if matches!(d.state, State::Solved | State::WaitingOnRequester) {
        d.waiting_since = None;
    }
    d.participant_ids = participants.into_iter().collect();
    d
}

fn close_wait(d: &mut Derived, t: DateTime<Utc>) {
    if let Some(since) = d.waiting_since.take() {
        d.wait_secs_closed += secs(t - since).max(0.0);
    }
}

fn secs(d: chrono::TimeDelta) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(min: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + min * 60, 0)
            .single()
            .unwrap_or_default()
    }

    const REQ: i64 = 1;
    const STAFF: i64 = 2;
    const OTHER_STAFF: i64 = 3;
    const BOT: i64 = 9;

    fn msg(id: i64, author: i64, min: i64) -> Msg {
        Msg {
            message_id: id,
            author_id: Some(author),
            bot: author == BOT,
            created_at: at(min),
            deleted: false,
        }
    }

    fn opening() -> Opening {
        Opening {
            owner_id: Some(REQ),
            opened_at: at(0),
        }
    }

    fn staff(id: i64) -> bool {
        id == STAFF || id == OTHER_STAFF || id == REQ_WHO_IS_STAFF
    }
    const REQ_WHO_IS_STAFF: i64 = 4;

    #[test]
    fn unanswered_is_new_and_waits_from_the_opening() {
        let d = derive(&opening(), &[msg(1, REQ, 0), msg(2, BOT, 1)], &[], staff);
        assert_eq!(d.state, State::New);
        assert_eq!(d.waiting_since, Some(at(0)));
        assert_eq!(d.first_response_at, None);
        assert_eq!(d.message_count, 2);
        assert_eq!(d.participant_ids, vec![REQ]);
    }

    #[test]
    fn the_conversation_of_the_docs() {
        // post → staff after 10 min → requester → staff → solved → requester again.
        let msgs = [
            msg(1, REQ, 0),
            msg(2, STAFF, 10),
            msg(3, REQ, 12),
            msg(4, OTHER_STAFF, 20),
            msg(5, REQ, 40),
        ];
        let marks = [Mark {
            observed_at: at(30),
            first_sight: false,
            cleared_at: None,
        }];
        let d = derive(&opening(), &msgs, &marks, staff);
        assert_eq!(d.state, State::WaitingOnStaff);
        assert_eq!(d.first_response_at, Some(at(10)));
        assert_eq!(d.first_responder_id, Some(STAFF));
        assert_eq!(d.next_response_secs, vec![8.0 * 60.0]);
        assert_eq!(d.first_solved_at, Some(at(30)));
        assert_eq!(d.last_solved_at, Some(at(30)));
        assert_eq!(d.reopen_count, 1);
        assert_eq!(d.waiting_since, Some(at(40)));
        // Waits: 0→10 and 12→20.
        assert_eq!(d.wait_secs_closed, 18.0 * 60.0);
        assert_eq!(d.last_requester_at, Some(at(40)));
        assert_eq!(d.last_staff_at, Some(at(20)));
        assert_eq!(d.participant_ids, vec![REQ, STAFF, OTHER_STAFF]);
    }

    #[test]
    fn bots_and_the_requester_never_stop_the_clock() {
        let open = Opening {
            owner_id: Some(REQ_WHO_IS_STAFF),
            opened_at: at(0),
        };
        let d = derive(
            &open,
            &[
                msg(1, REQ_WHO_IS_STAFF, 0),
                msg(2, BOT, 1),
                msg(3, REQ_WHO_IS_STAFF, 2),
            ],
            &[],
            staff,
        );
        assert_eq!(d.state, State::New);
        assert_eq!(d.first_response_at, None);
    }

    #[test]
    fn a_deleted_first_response_counts_and_is_flagged() {
        let mut reply = msg(2, STAFF, 5);
        reply.deleted = true;
        let d = derive(&opening(), &[msg(1, REQ, 0), reply], &[], staff);
        assert_eq!(d.first_response_at, Some(at(5)));
        assert!(d.first_response_deleted);
        assert_eq!(d.message_count, 1);
        assert_eq!(d.state, State::WaitingOnRequester);
    }

    #[test]
    fn a_marker_seen_at_first_sight_dates_at_the_last_message_before_it() {
        let msgs = [msg(1, REQ, 0), msg(2, STAFF, 10), msg(3, REQ, 500)];
        let marks = [Mark {
            observed_at: at(100),
            first_sight: true,
            cleared_at: None,
        }];
        let d = derive(&opening(), &msgs, &marks, staff);
        assert_eq!(d.first_solved_at, Some(at(10)));
        // The requester wrote after it: reopened.
        assert_eq!(d.reopen_count, 1);
        assert_eq!(d.state, State::WaitingOnStaff);
    }

    #[test]
    fn a_reopen_after_the_requesters_own_thanks_opens_no_gap() {
        let msgs = [
            msg(1, REQ, 0),
            msg(2, STAFF, 10),
            msg(3, REQ, 12),
            msg(4, REQ, 40),
        ];
        let marks = [Mark {
            observed_at: at(20),
            first_sight: false,
            cleared_at: None,
        }];
        let d = derive(&opening(), &msgs, &marks, staff);
        assert_eq!(d.reopen_count, 1);
        // The only gap is 12 → (none yet): still pending, so no data point.
        assert!(d.next_response_secs.is_empty());
        assert_eq!(d.state, State::WaitingOnStaff);
        assert_eq!(d.waiting_since, Some(at(40)));
    }

    #[test]
    fn clearing_the_marker_reopens_without_counting_a_reopen() {
        let msgs = [msg(1, REQ, 0), msg(2, STAFF, 10)];
        let marks = [Mark {
            observed_at: at(20),
            first_sight: false,
            cleared_at: Some(at(30)),
        }];
        let d = derive(&opening(), &msgs, &marks, staff);
        assert_eq!(d.state, State::WaitingOnRequester);
        assert_eq!(d.reopen_count, 0);
        assert_eq!(d.first_solved_at, Some(at(20)));
    }

    #[test]
    fn solved_before_any_answer_stops_the_wait() {
        let marks = [Mark {
            observed_at: at(15),
            first_sight: false,
            cleared_at: None,
        }];
        let d = derive(&opening(), &[msg(1, REQ, 0)], &marks, staff);
        assert_eq!(d.state, State::Solved);
        assert_eq!(d.waiting_since, None);
        assert_eq!(d.wait_secs_closed, 15.0 * 60.0);
    }

    #[test]
    fn a_bot_owner_hands_the_requester_to_the_first_human() {
        let open = Opening {
            owner_id: Some(BOT),
            opened_at: at(0),
        };
        let d = derive(
            &open,
            &[msg(1, BOT, 0), msg(2, REQ, 1), msg(3, STAFF, 3)],
            &[],
            staff,
        );
        assert_eq!(d.requester_id, Some(REQ));
        assert_eq!(d.first_response_at, Some(at(3)));
    }
}
