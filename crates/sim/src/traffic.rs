//! Synthetic support traffic: customer questions, staff replies, forum support posts (see
//! `support::live`), escalations, edits, deletions and the odd attachment. A [`Generator`]
//! decides everything from its seed and the world it sees, so step-driven runs are reproducible.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::model::{perms, AttachmentSpec, ChannelKind, OverwriteKind, PostOptions};
use crate::{support, Simulator};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct TrafficOptions {
    /// Operations per second (messages, edits, deletes, new tickets).
    pub rate_per_sec: f64,
    pub seed: u64,
    /// Guilds to talk in; empty means every guild.
    #[serde(with = "crate::model::sf::vec", default)]
    pub guilds: Vec<u64>,
    /// Only forum support traffic (posts, answers, follow-ups, solved tags, reopens), none of
    /// the other kinds.
    pub support_only: bool,
    /// With a wall clock, support delays (minutes to days) are divided by this, so a demo sees
    /// answers within seconds; with a virtual clock time jumps instead and this is ignored.
    pub support_speedup: f64,
}

impl Default for TrafficOptions {
    fn default() -> Self {
        TrafficOptions {
            rate_per_sec: 5.0,
            seed: 0,
            guilds: vec![],
            support_only: false,
            support_speedup: 60.0,
        }
    }
}

/// Stops the traffic when `stop` is called or the handle is dropped.
pub struct TrafficHandle {
    cancel: CancellationToken,
    steps: Arc<AtomicU64>,
}

impl TrafficHandle {
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Operations performed so far.
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }
}

impl Drop for TrafficHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub(crate) fn start(sim: Simulator, opts: TrafficOptions) -> TrafficHandle {
    let cancel = CancellationToken::new();
    let steps = Arc::new(AtomicU64::new(0));
    let (c, s) = (cancel.clone(), Arc::clone(&steps));
    let rate = opts.rate_per_sec.max(0.0);
    tokio::spawn(async move {
        let mut g = Generator::new(opts);
        let started = Instant::now();
        let mut iv = tokio::time::interval(Duration::from_millis(5));
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = c.cancelled() => break,
                _ = iv.tick() => {}
            }
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            // Cap a tick's work so a stalled runtime does not cause one huge burst.
            let mut budget = (rate / 20.0) as u64 + 100;
            while s.load(Ordering::Relaxed) < due && budget > 0 {
                g.step(&sim);
                s.fetch_add(1, Ordering::Relaxed);
                budget -= 1;
            }
        }
    });
    TrafficHandle { cancel, steps }
}

#[derive(Default, Clone)]
struct GuildView {
    support: Vec<u64>,
    staff_channels: Vec<u64>,
    tickets: Vec<u64>,
    staff: Vec<u64>,
    customers: Vec<u64>,
}

pub(crate) struct Generator {
    rng: ChaCha8Rng,
    opts: TrafficOptions,
    views: Vec<GuildView>,
    steps: u64,
    next_refresh: u64,
    recent: VecDeque<(u64, u64, u64)>,
    /// Staff and possible requesters of each forum of `views`.
    people: support::live::People,
    forums: Vec<u64>,
}

const OPENERS: &[&str] = &[
    "Hi all,",
    "Hello!",
    "Hey team,",
    "Quick question:",
    "Good morning,",
    "Help please -",
    "",
];
const QUESTIONS: &[&str] = &[
    "my invoice for last month shows the wrong amount",
    "I can't log in after resetting my password",
    "the API keeps returning 429 when I page through orders",
    "how do I add a teammate to our workspace?",
    "exports are empty since yesterday's update",
    "is there a way to rotate webhook secrets?",
    "the dashboard is very slow for our EU account",
    "SSO redirects me back to the login page",
    "can I get a refund for a duplicate charge?",
    "uploads over 50 MB fail with a timeout",
];
const REPLIES: &[&str] = &[
    "Thanks for reaching out! Could you share your account id?",
    "We're looking into this now.",
    "This is a known issue; a fix ships tomorrow.",
    "Can you try clearing the cache and logging in again?",
    "I've escalated this to the billing team.",
    "Could you open a ticket in the forum so we can track it?",
    "That should be fixed now, can you confirm?",
    "Please send a screenshot of the error.",
];
const STAFF_CHAT: &[&str] = &[
    "Heads up: deploy at 15:00 UTC.",
    "Who can take the billing queue this afternoon?",
    "Customer in #general-help is asking about SSO again.",
    "Incident resolved, writing the postmortem.",
];
const FOLLOWUPS: &[&str] = &[
    "Here are the logs.",
    "Screenshot attached.",
    "Still happening for me.",
    "Thanks, that worked!",
];

fn pick<'a, T>(rng: &mut ChaCha8Rng, v: &'a [T]) -> Option<&'a T> {
    v.choose(rng)
}

impl Generator {
    pub fn new(opts: TrafficOptions) -> Self {
        Generator {
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
            opts,
            views: vec![],
            steps: 0,
            next_refresh: 0,
            recent: VecDeque::new(),
            people: Default::default(),
            forums: vec![],
        }
    }

    fn refresh(&mut self, sim: &Simulator) {
        let truth = sim.access_truth();
        // The bot is a member too, but people write the traffic.
        let bot = sim.config().bot_user_id;
        self.views = truth
            .guilds
            .iter()
            .filter(|g| self.opts.guilds.is_empty() || self.opts.guilds.contains(&g.id))
            .map(|g| {
                let mut v = GuildView::default();
                let forums: Vec<u64> = g
                    .channels
                    .iter()
                    .filter(|c| c.kind.has_posts())
                    .map(|c| c.id)
                    .collect();
                for c in &g.channels {
                    let everyone_deny = c
                        .overwrites
                        .iter()
                        .find(|o| o.kind == OverwriteKind::Role && o.id == g.id)
                        .map(|o| o.deny)
                        .unwrap_or(0);
                    match c.kind {
                        // Forum posts get support traffic; other threads the generic kind.
                        k if k.is_thread()
                            && !c.thread.as_ref().is_some_and(|t| t.archived)
                            && !c.parent_id.is_some_and(|p| forums.contains(&p)) =>
                        {
                            v.tickets.push(c.id)
                        }
                        ChannelKind::Text => {
                            if everyone_deny & perms::VIEW_CHANNEL != 0 {
                                v.staff_channels.push(c.id)
                            } else if everyone_deny & perms::SEND_MESSAGES == 0 {
                                v.support.push(c.id)
                            }
                        }
                        _ => {}
                    }
                }
                let staff_roles: Vec<u64> = g
                    .roles
                    .iter()
                    .filter(|r| {
                        r.permissions & (perms::MANAGE_MESSAGES | perms::ADMINISTRATOR) != 0
                    })
                    .map(|r| r.id)
                    .collect();
                for m in g.members.iter().filter(|m| m.user_id != bot) {
                    if m.user_id == g.owner_id || m.roles.iter().any(|r| staff_roles.contains(r)) {
                        v.staff.push(m.user_id);
                    } else if m.communication_disabled_until.is_none() {
                        v.customers.push(m.user_id);
                    }
                }
                v
            })
            .filter(|v| !v.support.is_empty() && !v.staff.is_empty() && !v.customers.is_empty())
            .collect();
        // Every forum of the selected guilds, even of guilds too bare for the other kinds.
        self.forums = truth
            .guilds
            .iter()
            .filter(|g| self.opts.guilds.is_empty() || self.opts.guilds.contains(&g.id))
            .flat_map(|g| g.channels.iter().filter(|c| c.kind.has_posts()))
            .map(|c| c.id)
            .collect();
        let w = sim.shared.world();
        self.people = self
            .forums
            .iter()
            .map(|f| (*f, w.support_people(*f)))
            .collect();
    }

    fn support_step(&mut self, sim: &Simulator) {
        let posted = support::live::step(&mut support::live::Ctx {
            rng: &mut self.rng,
            sim,
            people: &self.people,
            forums: &self.forums,
            speedup: self.opts.support_speedup,
        });
        for m in &posted {
            self.remember(m);
        }
    }

    fn remember(&mut self, m: &crate::MessageState) {
        self.recent.push_back((m.id, m.channel_id, m.author_id));
        if self.recent.len() > 200 {
            self.recent.pop_front();
        }
    }

    fn post(
        &mut self,
        sim: &Simulator,
        channel: u64,
        author: u64,
        content: String,
        opts: PostOptions,
    ) {
        match sim.post_message(channel, author, content, opts) {
            Ok(m) => self.remember(&m),
            Err(e) => tracing::debug!(error = %e, "traffic post skipped"),
        }
    }

    /// One operation. Views are refreshed every 500 steps (a step count, so runs stay reproducible).
    pub fn step(&mut self, sim: &Simulator) {
        let starved = if self.opts.support_only {
            self.forums.is_empty()
        } else {
            self.views.is_empty()
        };
        if self.steps >= self.next_refresh || starved {
            self.next_refresh = self.steps + 500;
            self.refresh(sim);
        }
        self.steps += 1;
        if self.opts.support_only {
            self.support_step(sim);
            return;
        }
        let Some(v) = pick(&mut self.rng, &self.views).cloned() else {
            return;
        };
        let roll = self.rng.gen_range(0..100u32);
        let rng = &mut self.rng;
        let customer = pick(rng, &v.customers).copied().unwrap_or(0);
        let staff = pick(rng, &v.staff).copied().unwrap_or(0);
        let support = pick(rng, &v.support).copied().unwrap_or(0);
        let question = format!(
            "{} {}",
            pick(rng, OPENERS).copied().unwrap_or(""),
            pick(rng, QUESTIONS).copied().unwrap_or("help")
        )
        .trim()
        .to_string();
        let reply = pick(rng, REPLIES).copied().unwrap_or("ok").to_string();
        match roll {
            0..=39 => self.post(sim, support, customer, question, PostOptions::default()),
            40..=61 => {
                let target = self
                    .recent
                    .iter()
                    .rev()
                    .take(20)
                    .find(|(_, c, _)| v.support.contains(c))
                    .copied();
                match target {
                    Some((mid, ch, _)) => self.post(
                        sim,
                        ch,
                        staff,
                        reply,
                        PostOptions {
                            reply_to: Some(mid),
                            ..Default::default()
                        },
                    ),
                    None => self.post(sim, support, customer, question, PostOptions::default()),
                }
            }
            62..=73 => self.support_step(sim),
            74..=79 => {
                let Some(t) = pick(&mut self.rng, &v.tickets).copied() else {
                    return;
                };
                let author = if self.rng.gen_bool(0.5) {
                    staff
                } else {
                    customer
                };
                let text = if author == staff {
                    reply
                } else {
                    pick(&mut self.rng, FOLLOWUPS)
                        .copied()
                        .unwrap_or("ok")
                        .into()
                };
                self.post(sim, t, author, text, PostOptions::default());
            }
            80..=86 => {
                if self.recent.is_empty() {
                    return;
                }
                let i = self.rng.gen_range(0..self.recent.len());
                let (mid, _, _) = self.recent[i];
                if let Some(m) = sim.message(mid) {
                    let _ = sim.edit_message(
                        mid,
                        format!(
                            "{} (edit: {})",
                            m.content,
                            pick(&mut self.rng, FOLLOWUPS).copied().unwrap_or("")
                        ),
                    );
                }
            }
            87..=90 => {
                if self.recent.is_empty() {
                    return;
                }
                let i = self.rng.gen_range(0..self.recent.len());
                if let Some((mid, _, _)) = self.recent.remove(i) {
                    let _ = sim.delete_message(mid);
                }
            }
            91..=95 => {
                let Some(ch) = pick(&mut self.rng, &v.staff_channels).copied() else {
                    return;
                };
                let text = pick(&mut self.rng, STAFF_CHAT)
                    .copied()
                    .unwrap_or("ok")
                    .to_string();
                self.post(sim, ch, staff, text, PostOptions::default());
            }
            _ => {
                let n = self.rng.gen_range(1..1000u32);
                let (filename, ct) = if self.rng.gen_bool(0.5) {
                    (format!("screenshot-{n}.png"), "image/png")
                } else {
                    (format!("logs-{n}.txt"), "text/plain")
                };
                let size = self.rng.gen_range(1_000..5_000_000u32);
                let opts = PostOptions {
                    attachments: vec![AttachmentSpec {
                        filename,
                        size,
                        content_type: Some(ct.into()),
                    }],
                    reply_to: None,
                };
                let text = pick(&mut self.rng, FOLLOWUPS)
                    .copied()
                    .unwrap_or("ok")
                    .to_string();
                self.post(sim, support, customer, text, opts);
            }
        }
    }
}
