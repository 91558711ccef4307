//! Back-dated support history: the forum posts a guild would have had over the last `days`,
//! inserted silently (no gateway event, like a scenario's past), so a product finds them the way
//! it finds history on Discord — active posts in GUILD_CREATE and the active-thread listing,
//! older idle ones only in the archived-thread listings, their messages in channel history.
//!
//! The conversations follow the live model (`live`: arrivals, delays by hour and weekday, the
//! same branching) with one difference: a solved tag ends a conversation. A product that first
//! sees a tag at backfill dates it at the conversation's last message, so a tag followed by
//! more messages (a reopen) could not be dated by anyone; reopens happen in live traffic.
//! Conversations still running at the present are cut there (their pending answers never come).

use chrono::{DateTime, Duration, Utc};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::live::{self, Act};
use super::{is_solved_tag_name, SupportHistory};
use crate::model::{Channel, ChannelKind, ThreadInfo};
use crate::world::{to_ms, World};
use crate::SimError;

struct Draft {
    forum: u64,
    requester: u64,
    name: String,
    tags: Vec<u64>,
    /// (time, author, content), in time order; the first is the opening.
    messages: Vec<(DateTime<Utc>, u64, String)>,
    solved: bool,
}

/// Discord archives a post idle for its `auto_archive_duration` (minutes).
const AUTO_ARCHIVE_MIN: u32 = 1440;

pub(crate) fn generate(
    w: &mut World,
    guild_id: u64,
    days: u32,
    seed: u64,
) -> Result<SupportHistory, SimError> {
    let end = to_ms(w.peek_now());
    let start = end - Duration::days(i64::from(days.min(3650)));
    let forums: Vec<Channel> = w
        .guild(guild_id)?
        .channels
        .values()
        .filter(|c| c.kind.has_posts())
        .cloned()
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut drafts = Vec::new();
    for f in &forums {
        let (staff, requesters) = w.support_people(f.id);
        if staff.is_empty() || requesters.is_empty() {
            continue;
        }
        let tag = |name: &str| {
            f.available_tags
                .iter()
                .find(|t| t.name == name)
                .map(|t| t.id)
        };
        let solved_tag = f
            .available_tags
            .iter()
            .find(|t| is_solved_tag_name(&t.name))
            .map(|t| t.id);
        let mut t = start + live::arrival_gap(&mut rng, start);
        while t < end {
            let mut d = play(&mut rng, f.id, t, end, &staff, &requesters);
            let kind = if rng.gen_bool(0.7) { "question" } else { "bug" };
            d.tags.extend(tag(kind));
            if d.solved {
                match solved_tag {
                    Some(s) => d.tags.push(s),
                    None => d.solved = false,
                }
            }
            drafts.push(d);
            t = t + live::arrival_gap(&mut rng, t);
        }
    }
    // Ids in global time order, as Discord's snowflakes are.
    let mut order: Vec<(DateTime<Utc>, usize, usize)> = drafts
        .iter()
        .enumerate()
        .flat_map(|(di, d)| {
            d.messages
                .iter()
                .enumerate()
                .map(move |(mi, m)| (m.0, di, mi))
        })
        .collect();
    order.sort();
    let mut ids: Vec<Vec<u64>> = drafts.iter().map(|d| vec![0; d.messages.len()]).collect();
    let mut last = 0;
    for (at, di, mi) in order {
        last = w.free_id_at(at, last);
        ids[di][mi] = last;
    }
    let mut out = SupportHistory::default();
    let mut posts: Vec<(u64, Draft, Vec<u64>)> = drafts
        .into_iter()
        .zip(ids)
        .filter_map(|(d, ids)| Some((*ids.first()?, d, ids)))
        .collect();
    posts.sort_by_key(|p| p.0);
    for (tid, d, ids) in posts {
        let last_at = d.messages.last().map_or(end, |m| m.0);
        let archive_at = last_at + Duration::minutes(i64::from(AUTO_ARCHIVE_MIN));
        let archived = archive_at <= end;
        let mut members = vec![d.requester];
        for (_, a, _) in &d.messages {
            if !members.contains(a) {
                members.push(*a);
            }
        }
        let thread = Channel {
            id: tid,
            kind: ChannelKind::PublicThread,
            name: d.name.clone(),
            parent_id: Some(d.forum),
            position: 0,
            topic: None,
            overwrites: vec![],
            thread: Some(ThreadInfo {
                owner_id: d.requester,
                archived,
                locked: false,
                auto_archive_duration: AUTO_ARCHIVE_MIN,
                invitable: true,
                members,
                archive_timestamp: archived.then_some(archive_at),
                applied_tags: d.tags.clone(),
            }),
            available_tags: vec![],
        };
        let messages: Vec<(u64, u64, String)> = ids
            .iter()
            .zip(d.messages)
            .map(|(id, (_, a, c))| (*id, a, c))
            .collect();
        out.messages += messages.len();
        out.archived += usize::from(archived);
        out.solved += usize::from(d.solved);
        out.threads.push(tid);
        w.insert_history_post(guild_id, thread, messages)?;
    }
    Ok(out)
}

/// One conversation opened at `t`, played until it ends or reaches `end`.
fn play(
    rng: &mut ChaCha8Rng,
    forum: u64,
    t: DateTime<Utc>,
    end: DateTime<Utc>,
    staff: &[u64],
    requesters: &[u64],
) -> Draft {
    let pick = |rng: &mut ChaCha8Rng, v: &[u64]| v.choose(rng).copied().unwrap_or(0);
    let text =
        |rng: &mut ChaCha8Rng, v: &[&str]| v.choose(rng).copied().unwrap_or("ok").to_string();
    let requester = pick(rng, requesters);
    let taker = pick(rng, staff);
    let question = text(rng, live::QUESTIONS);
    let mut d = Draft {
        forum,
        requester,
        name: question.chars().take(60).collect(),
        tags: vec![],
        messages: vec![(t, requester, question)],
        solved: false,
    };
    let mut at = t;
    let mut staff_answers = 0;
    let mut next = live::after_open(rng);
    while let Some(act) = next {
        // At least a second apart, so each message has its own millisecond.
        let due = at + live::delay(rng, act, at).max(Duration::seconds(1));
        if due >= end {
            break;
        }
        at = due;
        match act {
            Act::StaffAnswer => {
                staff_answers += 1;
                let author = if rng.gen_bool(0.3) {
                    pick(rng, staff)
                } else {
                    taker
                };
                let content = text(rng, live::ANSWERS);
                d.messages.push((at, author, content));
            }
            Act::FollowUp | Act::Reopen => {
                let content = text(rng, live::FOLLOW_UPS);
                d.messages.push((at, requester, content));
            }
            Act::Solve => {
                d.solved = true;
                break;
            }
        }
        next = live::after(rng, act, staff_answers, false);
    }
    d
}
