//! A real serenity 0.12.5 client (proxy mode) wired to channels the tests can await on.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use observer_sim::Simulator;
use serenity::all::{
    Client, Context, Event, EventHandler, GatewayIntents, Guild, GuildId, HttpBuilder, Message,
    MessageId, MessageUpdateEvent, RawEventHandler, Ready, ResumedEvent, ShardManager,
    UnavailableGuild,
};
use serenity::async_trait;
use serenity::http::Http;
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Ready {
        session_id: String,
        guilds: usize,
        shard: Option<u32>,
    },
    GuildCreate {
        id: u64,
        channels: usize,
        threads: usize,
        members: usize,
        roles: usize,
        shard: u32,
    },
    Message {
        id: u64,
        channel_id: u64,
        content: String,
        member_roles: Option<Vec<u64>>,
        attachments: usize,
    },
    Update {
        id: u64,
        content: Option<String>,
    },
    Delete {
        id: u64,
    },
    DeleteBulk {
        ids: Vec<u64>,
    },
    Resumed,
    GuildDelete {
        id: u64,
        unavailable: bool,
    },
}

struct Handler(mpsc::UnboundedSender<Seen>);

#[async_trait]
impl EventHandler for Handler {
    async fn ready(&self, _ctx: Context, r: Ready) {
        let _ = self.0.send(Seen::Ready {
            session_id: r.session_id.clone(),
            guilds: r.guilds.len(),
            shard: r.shard.map(|s| s.id.0),
        });
    }
    async fn guild_create(&self, ctx: Context, g: Guild, _is_new: Option<bool>) {
        let _ = self.0.send(Seen::GuildCreate {
            id: g.id.get(),
            channels: g.channels.len(),
            threads: g.threads.len(),
            members: g.members.len(),
            roles: g.roles.len(),
            shard: ctx.shard_id.0,
        });
    }
    async fn message(&self, _ctx: Context, m: Message) {
        let _ = self.0.send(Seen::Message {
            id: m.id.get(),
            channel_id: m.channel_id.get(),
            content: m.content.clone(),
            member_roles: m
                .member
                .as_ref()
                .map(|pm| pm.roles.iter().map(|r| r.get()).collect()),
            attachments: m.attachments.len(),
        });
    }
    async fn message_update(
        &self,
        _ctx: Context,
        _old: Option<Message>,
        _new: Option<Message>,
        e: MessageUpdateEvent,
    ) {
        let _ = self.0.send(Seen::Update {
            id: e.id.get(),
            content: e.content.clone(),
        });
    }
    async fn message_delete(
        &self,
        _ctx: Context,
        _c: serenity::all::ChannelId,
        id: MessageId,
        _g: Option<GuildId>,
    ) {
        let _ = self.0.send(Seen::Delete { id: id.get() });
    }
    async fn message_delete_bulk(
        &self,
        _ctx: Context,
        _c: serenity::all::ChannelId,
        ids: Vec<MessageId>,
        _g: Option<GuildId>,
    ) {
        let _ = self.0.send(Seen::DeleteBulk {
            ids: ids.iter().map(|i| i.get()).collect(),
        });
    }
    async fn resume(&self, _ctx: Context, _e: ResumedEvent) {
        let _ = self.0.send(Seen::Resumed);
    }
    async fn guild_delete(&self, _ctx: Context, g: UnavailableGuild, _full: Option<Guild>) {
        let _ = self.0.send(Seen::GuildDelete {
            id: g.id.get(),
            unavailable: g.unavailable,
        });
    }
}

/// Records every raw event name, and the kinds of those that degraded to `Event::Unknown`.
#[derive(Default, Clone)]
pub struct RawLog {
    pub names: Arc<Mutex<Vec<String>>>,
    pub unknown: Arc<Mutex<Vec<String>>>,
}

struct Raw(RawLog);

#[async_trait]
impl RawEventHandler for Raw {
    async fn raw_event(&self, _ctx: Context, ev: Event) {
        match &ev {
            Event::Unknown(u) => self.0.unknown.lock().unwrap().push(u.kind.clone()),
            other => {
                if let Some(n) = other.name() {
                    self.0.names.lock().unwrap().push(n)
                }
            }
        }
    }
}

pub struct Bot {
    pub rx: mpsc::UnboundedReceiver<Seen>,
    pub raw: RawLog,
    pub shard_manager: Arc<ShardManager>,
    pub run: tokio::task::JoinHandle<Result<(), serenity::Error>>,
}

pub fn intents() -> GatewayIntents {
    GatewayIntents::GUILDS
        | GatewayIntents::GUILD_MEMBERS
        | GatewayIntents::GUILD_MESSAGES
        | GatewayIntents::MESSAGE_CONTENT
}

pub fn http_for(sim: &Simulator) -> Http {
    HttpBuilder::new(&sim.config().bot_token)
        .proxy(sim.base_url())
        .ratelimiter_disabled(true)
        .build()
}

/// Starts a serenity client against the simulator with `shards` shards (0 = `start()`).
pub async fn connect(sim: &Simulator, intents: GatewayIntents, shards: u32) -> Bot {
    let (tx, rx) = mpsc::unbounded_channel();
    let raw = RawLog::default();
    let mut client: Client = serenity::client::ClientBuilder::new_with_http(http_for(sim), intents)
        .event_handler(Handler(tx))
        .raw_event_handler(Raw(raw.clone()))
        .await
        .expect("client builds");
    assert_eq!(
        *client.ws_url.lock().await,
        sim.gateway_url(),
        "gateway URL discovered from the simulator"
    );
    let shard_manager = client.shard_manager.clone();
    let run = tokio::spawn(async move {
        if shards == 0 {
            client.start().await
        } else {
            client.start_shards(shards).await
        }
    });
    Bot {
        rx,
        raw,
        shard_manager,
        run,
    }
}

impl Bot {
    /// Waits (up to `secs`) for an event matching `pred`, discarding others.
    pub async fn wait_for(&mut self, secs: u64, mut pred: impl FnMut(&Seen) -> bool) -> Seen {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(s)) if pred(&s) => return s,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("event channel closed"),
                Err(_) => panic!("timed out after {secs}s waiting for an event"),
            }
        }
    }

    /// Collects every event until `pred` matches one (inclusive).
    pub async fn collect_until(
        &mut self,
        secs: u64,
        mut pred: impl FnMut(&Seen) -> bool,
    ) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut out = vec![];
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(s)) => {
                    let done = pred(&s);
                    out.push(s);
                    if done {
                        return out;
                    }
                }
                Ok(None) => panic!("event channel closed"),
                Err(_) => panic!("timed out after {secs}s; collected {out:?}"),
            }
        }
    }

    /// Collects events until `done(all so far)` holds, then keeps collecting until none has
    /// arrived for `quiet_ms` — serenity runs handlers concurrently, so late duplicates can only
    /// be ruled out by a quiet period.
    pub async fn collect_settled(
        &mut self,
        secs: u64,
        quiet_ms: u64,
        mut done: impl FnMut(&[Seen]) -> bool,
    ) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut out = vec![];
        while !done(&out) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(s)) => out.push(s),
                Ok(None) => panic!("event channel closed"),
                Err(_) => panic!("timed out after {secs}s; collected {out:?}"),
            }
        }
        while let Ok(Some(s)) =
            tokio::time::timeout(Duration::from_millis(quiet_ms), self.rx.recv()).await
        {
            out.push(s);
        }
        out
    }

    pub fn unknown(&self) -> Vec<String> {
        self.raw.unknown.lock().unwrap().clone()
    }

    pub fn raw_names(&self) -> Vec<String> {
        self.raw.names.lock().unwrap().clone()
    }

    pub async fn stop(self) {
        self.shard_manager.shutdown_all().await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.run).await;
    }
}
