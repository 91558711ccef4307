//! Gateway sessions and dispatch: intents, chaos (duplicates, reordering), delivery and replay
//! buffers.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{
    World, INTENT_GUILDS, INTENT_GUILD_MEMBERS, INTENT_GUILD_MESSAGES, INTENT_MESSAGE_CONTENT,
};

/// One dispatch, serialised once and shared by every session that receives it.
#[derive(Debug)]
pub(crate) struct Dispatch {
    pub t: &'static str,
    pub d: String,
    /// The same message event with content, attachments and embeds emptied, for sessions
    /// without the MESSAGE_CONTENT intent (built only when such a session exists).
    pub without_content: Option<Arc<Dispatch>>,
}

impl Dispatch {
    pub fn frame(&self, seq: u64) -> String {
        format!(
            "{{\"op\":0,\"s\":{seq},\"t\":\"{}\",\"d\":{}}}",
            self.t, self.d
        )
    }
}

/// What a connection's writer task is asked to do.
#[derive(Debug)]
pub(crate) enum Outgoing {
    Dispatch(u64, Arc<Dispatch>),
    Raw(String),
    Close(u16, String),
    Drop,
}

#[derive(Debug)]
pub(crate) struct Conn {
    pub id: u64,
    pub tx: mpsc::UnboundedSender<Outgoing>,
}

#[derive(Debug)]
pub(crate) struct Session {
    pub shard: (u64, u64),
    pub intents: u64,
    pub seq: u64,
    pub buffer: VecDeque<(u64, Arc<Dispatch>)>,
    pub conn: Option<Conn>,
    /// When the last socket went away; sessions disconnected too long expire like Discord's.
    pub disconnected_at: Option<std::time::Instant>,
}

impl Session {
    pub fn owns(&self, guild_id: u64) -> bool {
        let (id, count) = self.shard;
        count == 0 || (guild_id >> 22) % count == id
    }

    pub fn push(&mut self, d: &Arc<Dispatch>, cap: usize) {
        self.seq += 1;
        self.buffer.push_back((self.seq, Arc::clone(d)));
        while self.buffer.len() > cap {
            self.buffer.pop_front();
        }
        if let Some(conn) = &self.conn {
            // A closed receiver means the socket is gone; the buffer still covers a resume.
            let _ = conn.tx.send(Outgoing::Dispatch(self.seq, Arc::clone(d)));
        }
    }

    pub fn send(&self, o: Outgoing) {
        if let Some(conn) = &self.conn {
            let _ = conn.tx.send(o);
        }
    }
}

pub(super) fn event_intent(t: &str) -> u64 {
    if t.starts_with("MESSAGE_") {
        INTENT_GUILD_MESSAGES
    } else if t.starts_with("GUILD_MEMBER") || t == "THREAD_MEMBERS_UPDATE" {
        INTENT_GUILD_MEMBERS
    } else {
        INTENT_GUILDS
    }
}

impl World {
    pub fn dispatch(&mut self, guild_id: u64, t: &'static str, d: &Value) {
        // A guild without the bot produces no gateway traffic (except the GUILD_DELETE itself).
        if t != "GUILD_DELETE" && self.guilds.get(&guild_id).is_some_and(|g| !g.bot_present) {
            return;
        }
        let without_content = self.content_stripped(t, d).map(|v| {
            Arc::new(Dispatch {
                t,
                d: v.to_string(),
                without_content: None,
            })
        });
        let d = Arc::new(Dispatch {
            t,
            d: d.to_string(),
            without_content,
        });
        if self.chaos.dup_max == 0 && self.chaos.window <= 1 {
            self.deliver(guild_id, event_intent(t), &d);
            return;
        }
        let copies = 1 + self.rng.gen_range(0..=self.chaos.dup_max);
        for _ in 0..copies {
            self.chaos
                .pending
                .push((guild_id, event_intent(t), Arc::clone(&d)));
        }
        if self.chaos.pending.len() >= self.chaos.window.max(1) {
            self.flush_chaos();
        }
    }

    pub fn flush_chaos(&mut self) {
        let mut pending = std::mem::take(&mut self.chaos.pending);
        pending.shuffle(&mut self.rng);
        for (g, i, d) in pending {
            self.deliver(g, i, &d);
        }
    }

    /// Forgets sessions that have had no socket for longer than `ttl` (they could no longer
    /// resume on Discord either), so long runs with many client restarts stay bounded.
    pub fn expire_sessions(&mut self, ttl: std::time::Duration) {
        self.sessions
            .retain(|_, s| s.conn.is_some() || s.disconnected_at.is_none_or(|t| t.elapsed() < ttl));
    }

    pub fn set_chaos(&mut self, dup_max: u32, window: usize) {
        self.flush_chaos();
        self.chaos.dup_max = dup_max;
        self.chaos.window = window;
    }

    pub(super) fn deliver(&mut self, guild_id: u64, intent: u64, d: &Arc<Dispatch>) {
        let cap = self.resume_cap;
        for s in self.sessions.values_mut() {
            if s.owns(guild_id) && s.intents & intent != 0 {
                match &d.without_content {
                    Some(stripped) if s.intents & INTENT_MESSAGE_CONTENT == 0 => {
                        s.push(stripped, cap)
                    }
                    _ => s.push(d, cap),
                }
            }
        }
    }

    /// Discord empties message content for bots without MESSAGE_CONTENT, except in the bot's
    /// own messages. Only computed when some session lacks the intent, to keep dispatch cheap.
    pub(super) fn content_stripped(&self, t: &str, d: &Value) -> Option<Value> {
        if t != "MESSAGE_CREATE" && t != "MESSAGE_UPDATE" {
            return None;
        }
        if !self
            .sessions
            .values()
            .any(|s| s.intents & INTENT_MESSAGE_CONTENT == 0)
        {
            return None;
        }
        let bot = self.bot.id.to_string();
        if d.pointer("/author/id").and_then(Value::as_str) == Some(bot.as_str()) {
            return None;
        }
        let mut v = d.clone();
        let obj = v.as_object_mut()?;
        for (k, empty) in [
            ("content", json!("")),
            ("attachments", json!([])),
            ("embeds", json!([])),
        ] {
            if obj.contains_key(k) {
                obj.insert(k.into(), empty);
            }
        }
        Some(v)
    }

    /// Sends `o` to every connected session (faults).
    pub fn broadcast(&self, mut make: impl FnMut() -> Outgoing) {
        for s in self.sessions.values() {
            s.send(make());
        }
    }

    /// Dispatches straight to one session (READY, GUILD_CREATE, RESUMED, malformed payloads).
    pub fn dispatch_to(&mut self, session_id: &str, t: &'static str, d: String) {
        let cap = self.resume_cap;
        if let Some(s) = self.sessions.get_mut(session_id) {
            s.push(
                &Arc::new(Dispatch {
                    t,
                    d,
                    without_content: None,
                }),
                cap,
            );
        }
    }
}
