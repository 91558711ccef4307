//! Live support traffic in forums, as a discrete-event simulation: customers open posts, staff
//! answer after a delay that depends on the hour and the weekday, requesters follow up, staff
//! mark posts solved with the forum's solved tag, requesters sometimes write again afterwards.
//!
//! Pending actions live in [`Plan`] (shared by every generator of a simulator, so answers planned
//! by one `run_traffic_steps` call happen in the next). Each support step performs one: with a
//! virtual clock the clock jumps to the action's time (hours of support in a few hundred steps);
//! with a wall clock only due actions run, delays are divided by `support_speedup`, and a step
//! with nothing due opens a new post instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Datelike, Duration, Timelike, Utc, Weekday};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::model::MessageState;
use crate::{PostOptions, Simulator};

/// What happens next in a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Act {
    StaffAnswer,
    FollowUp,
    Solve,
    Reopen,
}

#[derive(Clone, Copy, Debug)]
enum Pending {
    Arrival { forum: u64 },
    Act { thread: u64, act: Act },
}

#[derive(Clone, Debug)]
struct LiveConv {
    requester: u64,
    /// The staff member who took the post; colleagues answer sometimes.
    staff: u64,
    staff_answers: u32,
}

/// Planned support actions and the conversations they belong to.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// (due in Unix ms, sequence) → action.
    queue: BTreeMap<(i64, u64), Pending>,
    seq: u64,
    convs: HashMap<u64, LiveConv>,
    /// Forums whose next arrival is in the queue (virtual clock only).
    arrivals: BTreeSet<u64>,
}

impl Plan {
    fn push(&mut self, at: DateTime<Utc>, p: Pending) {
        self.seq += 1;
        self.queue.insert((at.timestamp_millis(), self.seq), p);
    }
}

/// Who may take part in one forum: (staff, possible requesters).
pub(crate) type People = BTreeMap<u64, (Vec<u64>, Vec<u64>)>;

pub(crate) const QUESTIONS: &[&str] = &[
    "My invoice for last month shows the wrong amount.",
    "I can't log in after resetting my password.",
    "The API keeps returning 429 when I page through orders.",
    "How do I add a teammate to our workspace?",
    "Exports are empty since yesterday's update.",
    "Is there a way to rotate webhook secrets?",
    "SSO redirects me back to the login page.",
    "Uploads over 50 MB fail with a timeout.",
];
pub(crate) const ANSWERS: &[&str] = &[
    "Thanks for the report! Could you share your account id?",
    "We're looking into this now.",
    "This is a known issue; a fix ships tomorrow.",
    "Can you try clearing the cache and logging in again?",
    "That should be fixed now, can you confirm?",
    "Please send a screenshot of the error.",
];
pub(crate) const FOLLOW_UPS: &[&str] = &[
    "Here is my account id: 48213.",
    "Still happening for me.",
    "Screenshot attached, same error.",
    "Thanks, that worked!",
];
const REOPENS: &[&str] = &[
    "Sorry, one more thing: it happens again on mobile.",
    "It broke again this morning.",
    "Follow-up: what about the other workspace?",
];

fn text(rng: &mut ChaCha8Rng, v: &[&str]) -> String {
    v.choose(rng).copied().unwrap_or("ok").to_string()
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box–Muller; rand's normal distribution lives in another crate.
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn minutes(m: f64) -> Duration {
    Duration::milliseconds((m * 60_000.0) as i64)
}

fn weekend(t: DateTime<Utc>) -> bool {
    matches!(t.weekday(), Weekday::Sat | Weekday::Sun)
}

/// How much slower than in business hours staff answer at `t` (UTC; the generated organisations
/// work Monday to Friday, 09:00–18:00): ×3 in the shoulder hours, ×10 at night, ×5 at weekends.
pub(crate) fn staff_slowness(t: DateTime<Utc>) -> f64 {
    let by_hour = match t.hour() {
        9..=17 => 1.0,
        7..=8 | 18..=21 => 3.0,
        _ => 10.0,
    };
    by_hour * if weekend(t) { 5.0 } else { 1.0 }
}

/// A staff answer's delay for a message at `t`: log-normal around 12 minutes in business hours,
/// times [`staff_slowness`], between 1 minute and 3 days.
pub(crate) fn staff_delay(rng: &mut ChaCha8Rng, t: DateTime<Utc>) -> Duration {
    let m = 12.0 * (0.8 * normal(rng)).exp() * staff_slowness(t);
    minutes(m.clamp(1.0, 3.0 * 24.0 * 60.0))
}

/// A requester's delay: log-normal around 20 minutes, ×3 at night (customers sleep too).
pub(crate) fn requester_delay(rng: &mut ChaCha8Rng, t: DateTime<Utc>) -> Duration {
    let night = !(7..=22).contains(&t.hour());
    let m = 20.0 * normal(rng).exp() * if night { 3.0 } else { 1.0 };
    minutes(m.clamp(0.5, 2.0 * 24.0 * 60.0))
}

/// Time until the next new post in one forum: Poisson, 3 an hour in business hours, 1.5 in the
/// shoulder hours, 0.4 at night, half as many at weekends.
pub(crate) fn arrival_gap(rng: &mut ChaCha8Rng, t: DateTime<Utc>) -> Duration {
    let per_hour = match t.hour() {
        9..=17 => 3.0,
        7..=8 | 18..=21 => 1.5,
        _ => 0.4,
    } * if weekend(t) { 0.5 } else { 1.0 };
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    minutes((-u.ln() / per_hour * 60.0).max(0.5))
}

/// Delay before `act`, drawn at `t`.
pub(crate) fn delay(rng: &mut ChaCha8Rng, act: Act, t: DateTime<Utc>) -> Duration {
    match act {
        Act::StaffAnswer => staff_delay(rng, t),
        Act::FollowUp => requester_delay(rng, t),
        Act::Solve => minutes(rng.gen_range(1.0..30.0)),
        // They come back later than they answer.
        Act::Reopen => requester_delay(rng, t) * 3,
    }
}

/// The first step after a post is opened: 12 % are never answered.
pub(crate) fn after_open(rng: &mut ChaCha8Rng) -> Option<Act> {
    (rng.gen_range(0..100u32) >= 12).then_some(Act::StaffAnswer)
}

/// What follows `act`. `staff_answers` so far bounds the back-and-forth; `reopens` is false for
/// back-dated history, where a solved tag ends the conversation (see `history`).
pub(crate) fn after(
    rng: &mut ChaCha8Rng,
    act: Act,
    staff_answers: u32,
    reopens: bool,
) -> Option<Act> {
    let r = rng.gen_range(0..100u32);
    match act {
        Act::StaffAnswer if staff_answers >= 4 => (r < 50).then_some(Act::Solve),
        Act::StaffAnswer => match r {
            0..=49 => Some(Act::FollowUp),
            50..=71 => Some(Act::Solve),
            // A colleague adds something before the requester answers.
            72..=81 => Some(Act::StaffAnswer),
            _ => None,
        },
        Act::FollowUp => match r {
            0..=79 => Some(Act::StaffAnswer),
            80..=87 => Some(Act::Solve),
            _ => None,
        },
        Act::Solve => (reopens && r < 25).then_some(Act::Reopen),
        Act::Reopen => (r < 75).then_some(Act::StaffAnswer),
    }
}

/// The generator's view for one support step.
pub(crate) struct Ctx<'a> {
    pub rng: &'a mut ChaCha8Rng,
    pub sim: &'a Simulator,
    pub people: &'a People,
    /// Forums this generator opens posts in.
    pub forums: &'a [u64],
    pub speedup: f64,
}

/// One support step; returns the messages it posted.
pub(crate) fn step(cx: &mut Ctx<'_>) -> Vec<MessageState> {
    let (virtual_clock, now) = {
        let w = cx.sim.shared.world();
        (w.has_virtual_clock(), w.peek_now())
    };
    let job = {
        let mut plan = cx.sim.shared.support_plan();
        if virtual_clock {
            for f in cx.forums {
                if plan.arrivals.insert(*f) {
                    let at = now + arrival_gap(cx.rng, now);
                    plan.push(at, Pending::Arrival { forum: *f });
                }
            }
        }
        match plan.queue.first_key_value().map(|(k, _)| *k) {
            Some(key) if virtual_clock || key.0 <= now.timestamp_millis() => {
                plan.queue.remove(&key).map(|p| (key.0, p))
            }
            _ if !virtual_clock => cx
                .forums
                .choose(cx.rng)
                .map(|f| (0, Pending::Arrival { forum: *f })),
            _ => None,
        }
    };
    let Some((due, job)) = job else {
        return vec![];
    };
    if virtual_clock {
        if let Some(at) = DateTime::from_timestamp_millis(due) {
            cx.sim.shared.world().advance_clock_to(at);
        }
    }
    match job {
        Pending::Arrival { forum } => open(cx, forum, virtual_clock),
        Pending::Act { thread, act } => perform(cx, thread, act),
    }
}

fn schedule(cx: &mut Ctx<'_>, thread: u64, act: Option<Act>) {
    let Some(act) = act else { return };
    let (virtual_clock, now) = {
        let w = cx.sim.shared.world();
        (w.has_virtual_clock(), w.peek_now())
    };
    let mut d = delay(cx.rng, act, now);
    if !virtual_clock && cx.speedup > 0.0 {
        d = Duration::milliseconds((d.num_milliseconds() as f64 / cx.speedup) as i64);
    }
    cx.sim
        .shared
        .support_plan()
        .push(now + d, Pending::Act { thread, act });
}

fn open(cx: &mut Ctx<'_>, forum: u64, virtual_clock: bool) -> Vec<MessageState> {
    if virtual_clock {
        let now = cx.sim.shared.world().peek_now();
        let at = now + arrival_gap(cx.rng, now);
        let mut plan = cx.sim.shared.support_plan();
        // A forum gone from this generator's view (deleted, or another guild filter) stops
        // receiving posts until a generator that sees it schedules them again.
        if cx.forums.contains(&forum) {
            plan.push(at, Pending::Arrival { forum });
        } else {
            plan.arrivals.remove(&forum);
        }
    }
    let Some((staff, requesters)) = cx.people.get(&forum) else {
        return vec![];
    };
    let (Some(requester), Some(taker)) = (
        requesters.choose(cx.rng).copied(),
        staff.choose(cx.rng).copied(),
    ) else {
        return vec![];
    };
    let question = text(cx.rng, QUESTIONS);
    let kind = if cx.rng.gen_bool(0.7) {
        "question"
    } else {
        "bug"
    };
    let posted = {
        let mut w = cx.sim.shared.world();
        let tags: Vec<u64> = w
            .channel(forum)
            .map(|(_, f)| {
                f.available_tags
                    .iter()
                    .filter(|t| t.name == kind)
                    .map(|t| t.id)
                    .collect()
            })
            .unwrap_or_default();
        let title: String = question.chars().take(60).collect();
        w.create_forum_post(forum, requester, title, question, tags)
    };
    match posted {
        Ok((thread, m)) => {
            cx.sim.shared.support_plan().convs.insert(
                thread.id,
                LiveConv {
                    requester,
                    staff: taker,
                    staff_answers: 0,
                },
            );
            let next = after_open(cx.rng);
            schedule(cx, thread.id, next);
            vec![m]
        }
        Err(e) => {
            tracing::debug!(error = %e, "support post skipped");
            vec![]
        }
    }
}

fn perform(cx: &mut Ctx<'_>, thread: u64, act: Act) -> Vec<MessageState> {
    let Some(conv) = cx.sim.shared.support_plan().convs.get(&thread).cloned() else {
        return vec![];
    };
    let forum = cx
        .sim
        .shared
        .world()
        .channel(thread)
        .ok()
        .and_then(|(_, c)| c.parent_id);
    let mut posted = vec![];
    let mut staff_answers = conv.staff_answers;
    let result = match act {
        Act::StaffAnswer => {
            // Now and then a colleague answers instead of the one who took the post.
            let colleagues = forum
                .and_then(|f| cx.people.get(&f))
                .map(|(s, _)| s.as_slice())
                .unwrap_or(&[]);
            let author = match colleagues.choose(cx.rng) {
                Some(c) if cx.rng.gen_bool(0.3) => *c,
                _ => conv.staff,
            };
            let content = text(cx.rng, ANSWERS);
            staff_answers += 1;
            let mut w = cx.sim.shared.world();
            let joined = w
                .channel(thread)
                .ok()
                .and_then(|(_, c)| c.thread.as_ref().map(|t| t.members.contains(&author)))
                .unwrap_or(false);
            // Discord adds a poster to the thread's members.
            if !joined {
                if let Err(e) = w.add_thread_member(thread, author) {
                    tracing::debug!(error = %e, "support answerer not added to the thread");
                }
            }
            w.post_message(thread, author, content, PostOptions::default())
                .map(|m| posted.push(m))
        }
        Act::FollowUp | Act::Reopen => {
            let content = text(
                cx.rng,
                if act == Act::Reopen {
                    REOPENS
                } else {
                    FOLLOW_UPS
                },
            );
            cx.sim
                .shared
                .world()
                .post_message(thread, conv.requester, content, PostOptions::default())
                .map(|m| posted.push(m))
        }
        Act::Solve => cx.sim.shared.world().set_solved(thread, true).map(|_| ()),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, ?act, "support action skipped");
        cx.sim.shared.support_plan().convs.remove(&thread);
        return posted;
    }
    if let Some(c) = cx.sim.shared.support_plan().convs.get_mut(&thread) {
        c.staff_answers = staff_answers;
    }
    let next = after(cx.rng, act, staff_answers, true);
    schedule(cx, thread, next);
    posted
}
