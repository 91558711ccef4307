//! observer-sim: a Discord simulator (gateway, REST, OAuth2, control API, synthetic traffic) that
//! unmodified serenity 0.12.5 accepts. One port serves everything.
//!
//! Layout:
//! - `model`    — scenario and ground-truth types (serde, snowflakes as strings), permission bits.
//! - `payload`  — Discord JSON shapes built to pass serenity's strict deserializers.
//! - `world`    — the state behind one mutex; every mutation dispatches its gateway event.
//!   `world/sessions` (gateway sessions, dispatch, chaos), `views` (lookups, JSON views),
//!   `messages`, `channels` (and threads, overwrites), `members` (and roles, the bot's guilds).
//! - `permissions`, `botview` — Discord's permission algorithm and what the bot may see.
//! - `gateway`  — WebSocket: HELLO/IDENTIFY/READY/GUILD_CREATE, heartbeats, RESUME replay, faults.
//! - `http`     — what every `/api` route shares: Discord JSON errors, bot auth, query parameters.
//! - `rest`     — `/api/v10` bot REST: `rest/messages`, `threads`, `guilds`, `access` (what the
//!   bot may see), and `limits`: Discord's rate limits (global, per-route, invalid-request bans).
//! - `oauth`    — `/oauth2/authorize`, `/api/oauth2/token` (PKCE S256, refresh), revoke, and the
//!   bearer routes (`/users/@me...`, `/oauth2/@me`) with scope checks.
//! - `control`  — the `/_sim/` JSON control API, thin over [`Simulator`]'s methods.
//! - `scenario` — [`Scenario::generate`]: a realistic support organisation from a seed.
//! - `traffic`  — synthetic support conversations, by wall-clock rate or by step count.
//! - `support`  — the support queue's truth: a journal of every forum post (written by the world's
//!   mutation paths) and the metrics of docs/support-queue.md computed from it alone;
//!   `support/live` (forum support traffic with time-of-day delays, solved tags, reopens) and
//!   `support/history` (back-dated posts, archived when idle).
//!
//! Quick use (in-process):
//! ```no_run
//! # async fn demo() -> Result<(), observer_sim::SimError> {
//! use observer_sim::{GenOptions, Scenario, SimConfig, Simulator};
//! let sim = Simulator::start(SimConfig::default()).await?;
//! sim.load(Scenario::generate(7, GenOptions::default()));
//! // serenity: HttpBuilder::new(token).proxy(sim.base_url()).ratelimiter_disabled(true)
//! sim.run_traffic_steps(7, 100);
//! let truth = sim.ground_truth();
//! # let _ = truth; sim.shutdown().await; Ok(()) }
//! ```

mod botview;
mod control;
mod gateway;
mod http;
pub mod model;
mod oauth;
mod payload;
mod permissions;
mod rest;
mod scenario;
mod support;
mod traffic;
mod world;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::serve::ListenerExt as _;
use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use gateway::PRIVILEGED_INTENTS;
pub use model::{
    perms, Attachment, AttachmentSpec, Channel, ChannelKind, ForumTag, Guild, Member, MessageState,
    Overwrite, OverwriteKind, PostOptions, Revision, Role, Scenario, ThreadInfo, User,
};
pub use permissions::ChannelView;
pub use rest::{RateStats, DEFAULT_GLOBAL_PER_SEC};
pub use scenario::GenOptions;
pub use support::{
    is_solved_tag_name, ConversationState, ConversationTruth, MarkerChange, ResponseGap, Side,
    SupportHistory, SupportMessage, SupportTruth,
};
pub use traffic::{TrafficHandle, TrafficOptions};

/// Errors of the simulator's Rust API (also mapped to HTTP statuses by the control API).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("unknown guild {0}")]
    UnknownGuild(u64),
    #[error("unknown channel {0}")]
    UnknownChannel(u64),
    #[error("unknown message {0}")]
    UnknownMessage(u64),
    #[error("unknown user {0}")]
    UnknownUser(u64),
    #[error("unknown role {0}")]
    UnknownRole(u64),
    #[error("user {user_id} is not a member of guild {guild_id}")]
    NotAMember { guild_id: u64, user_id: u64 },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("could not bind or serve: {0}")]
    Io(#[from] std::io::Error),
}

/// Simulator settings. `Default` gives a permissive simulator with realistic rate limits.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Port on 127.0.0.1 for [`Simulator::start`]; 0 picks a free one.
    pub port: u16,
    /// Accepted bot token (with or without the `Bot ` prefix).
    pub bot_token: String,
    pub bot_user_id: u64,
    pub bot_username: String,
    /// OAuth application id (also the READY `application.id`) and secret.
    pub client_id: String,
    pub client_secret: String,
    /// Allowed OAuth redirect URIs; empty accepts any.
    pub redirect_uris: Vec<String>,
    /// Privileged intents the application may use (others close the gateway with 4014).
    pub privileged_intents: u64,
    pub heartbeat_interval_ms: u64,
    /// Seeds the simulator's own randomness (dispatch chaos).
    pub seed: u64,
    /// Requests per route bucket (route template, top-level resource, token) per window; 0
    /// disables per-route limiting.
    pub rate_limit_per_route: u32,
    pub rate_limit_window_ms: u64,
    /// Requests per second per token across all routes (Discord: 50 for bots). `None` follows
    /// per-route limiting: 50 while it is on, off when `rate_limit_per_route` is 0. `Some(0)`
    /// turns it off.
    pub rate_limit_global_per_sec: Option<u32>,
    /// 401, 403 and 429 answers (shared-scope 429s excepted) one client IP may get within
    /// `invalid_request_window_ms` before it is banned (Discord: 10,000 per 10 minutes); 0
    /// counts but never bans.
    pub invalid_request_budget: u32,
    pub invalid_request_window_ms: u64,
    /// How long a ban lasts: every rate-limited request answers 429 `error code: 1015`.
    pub invalid_request_ban_ms: u64,
    /// `retry_after` of the 429s produced by [`Simulator::rate_limit_burst`].
    pub burst_retry_after_ms: u64,
    /// Dispatches kept per gateway session for RESUME.
    pub resume_buffer_len: usize,
    /// When set, time is virtual: it starts here (Unix ms) and advances one second per reading,
    /// so ids and timestamps depend only on the sequence of operations.
    pub virtual_clock_start_ms: Option<i64>,
    pub oauth_token_ttl_secs: u64,
    /// Prefix of attachment URLs; `None` uses the simulator's own base URL (which serves a
    /// placeholder there). Set it for reproducible ground truth across simulators.
    pub cdn_base_url: Option<String>,
    /// How long a gateway session without a socket stays resumable.
    pub session_resume_ttl_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            port: 0,
            bot_token: "sim-bot-token".into(),
            bot_user_id: 1_000_000_000_000_000_001,
            bot_username: "Observer".into(),
            client_id: "1000000000000000001".into(),
            client_secret: "sim-client-secret".into(),
            redirect_uris: vec![],
            privileged_intents: PRIVILEGED_INTENTS,
            heartbeat_interval_ms: 41_250,
            seed: 0,
            rate_limit_per_route: 50,
            rate_limit_window_ms: 1_000,
            rate_limit_global_per_sec: None,
            invalid_request_budget: 10_000,
            invalid_request_window_ms: 600_000,
            invalid_request_ban_ms: 3_600_000,
            burst_retry_after_ms: 250,
            resume_buffer_len: 100_000,
            virtual_clock_start_ms: None,
            oauth_token_ttl_secs: 604_800,
            cdn_base_url: None,
            session_resume_ttl_ms: 180_000,
        }
    }
}

pub(crate) struct Shared {
    pub config: SimConfig,
    pub base_url: String,
    pub gateway_url: String,
    pub world: Mutex<world::World>,
    pub stop_acks: AtomicBool,
    pub burst: AtomicU64,
    pub replayed: AtomicU64,
    pub next_conn: AtomicU64,
    pub rate: Mutex<rest::RateState>,
    pub oauth: Mutex<oauth::OAuthState>,
    pub traffic: Mutex<Option<TrafficHandle>>,
    /// Planned support actions. Locked before the world, never while holding it.
    pub support_plan: Mutex<support::live::Plan>,
    pub shutdown: CancellationToken,
}

impl Shared {
    pub fn world(&self) -> MutexGuard<'_, world::World> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // more than stopping the whole simulator would.
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn support_plan(&self) -> MutexGuard<'_, support::live::Plan> {
        self.support_plan.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running simulator. Cheap to clone; every clone controls the same instance.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Simulator {
    /// Binds 127.0.0.1:`config.port` and serves REST, OAuth, `/_sim/` and the gateway.
    pub async fn start(config: SimConfig) -> Result<Simulator, SimError> {
        let listener =
            tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], config.port))).await?;
        Self::serve(listener, config)
    }

    fn serve(listener: tokio::net::TcpListener, config: SimConfig) -> Result<Simulator, SimError> {
        let addr = listener.local_addr()?;
        let base_url = format!("http://{addr}");
        let bot = User {
            id: config.bot_user_id,
            username: config.bot_username.clone(),
            global_name: None,
            avatar: None,
            bot: true,
        };
        let world = world::World::new(
            bot,
            config.seed,
            config.virtual_clock_start_ms,
            config.resume_buffer_len.max(1),
            config
                .cdn_base_url
                .clone()
                .unwrap_or_else(|| base_url.clone()),
        );
        let shared = Arc::new(Shared {
            gateway_url: format!("ws://{addr}/gateway"),
            base_url,
            config,
            world: Mutex::new(world),
            stop_acks: AtomicBool::new(false),
            burst: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            next_conn: AtomicU64::new(1),
            rate: Mutex::new(rest::RateState::default()),
            oauth: Mutex::new(oauth::OAuthState::default()),
            traffic: Mutex::new(None),
            support_plan: Mutex::new(Default::default()),
            shutdown: CancellationToken::new(),
        });
        let app = router(Arc::clone(&shared));
        let token = shared.shutdown.clone();
        let server = tokio::spawn(async move {
            // Gateway dispatches are small writes: without TCP_NODELAY, Nagle
            // holds each until the client ACKs the previous (up to 40 ms).
            let listener = listener.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY not set");
                }
            });
            // The peer address keys the invalid-request accounting, as Discord bans by IP.
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let res = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "simulator server stopped with an error");
            }
        });
        // Chaos reordering holds dispatches back; flush them regularly so none are stuck.
        let ticker = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(Duration::from_millis(20));
            let ttl = Duration::from_millis(ticker.config.session_resume_ttl_ms);
            let mut ticks = 0u64;
            loop {
                tokio::select! {
                    _ = ticker.shutdown.cancelled() => break,
                    _ = iv.tick() => {}
                }
                let mut w = ticker.world();
                w.flush_chaos();
                ticks += 1;
                if ticks == 50 {
                    ticks = 0;
                    w.expire_sessions(ttl);
                }
            }
        });
        tracing::info!(%addr, "discord simulator listening");
        Ok(Simulator {
            shared,
            addr,
            server: Arc::new(Mutex::new(Some(server))),
        })
    }

    /// `http://127.0.0.1:PORT` — use as serenity's proxy and as `DISCORD_API_BASE_URL`.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// `ws://127.0.0.1:PORT/gateway` (also the answer of `GET /api/v10/gateway`).
    pub fn gateway_url(&self) -> String {
        self.shared.gateway_url.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// Stops traffic, closes every socket and waits for the server to finish.
    pub async fn shutdown(&self) {
        self.stop_traffic();
        self.shared.shutdown.cancel();
        let handle = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
    }

    fn world(&self) -> MutexGuard<'_, world::World> {
        self.shared.world()
    }

    // ----- scenario -------------------------------------------------------------------------

    /// Adds or replaces users and guilds. Connected sessions get GUILD_CREATE for new guilds.
    pub fn load(&self, scenario: Scenario) {
        self.world().load(scenario);
    }

    /// The current users, guilds, roles, channels, overwrites, members and threads: the access
    /// truth to compare a database mirror with.
    pub fn access_truth(&self) -> Scenario {
        self.world().snapshot()
    }

    /// Ground truth of access: every channel (threads included) of `guild_id` that `user_id`
    /// may see in Discord, with whether they may read its messages live and its history.
    /// Empty for non-members, unknown guilds and guilds without the bot. The bot's own id
    /// answers for the bot.
    pub fn user_channel_access(
        &self,
        guild_id: u64,
        user_id: u64,
    ) -> std::collections::BTreeMap<u64, ChannelView> {
        let w = self.world();
        match w.guilds.get(&guild_id) {
            Some(g) => w.user_channel_views(g, user_id),
            None => Default::default(),
        }
    }

    pub fn add_user(&self, user: User) {
        self.world().add_user(user);
    }

    /// Every message ever posted, in id order, with final content, revisions and deletion.
    pub fn ground_truth(&self) -> Vec<MessageState> {
        self.world().ground_truth()
    }

    /// Channels and threads whose history the bot can read now (VIEW_CHANNEL and
    /// READ_MESSAGE_HISTORY, plus CONNECT in voice and stage channels): the only ones whose
    /// messages a mirror can hold.
    pub fn bot_readable_channels(&self) -> BTreeSet<u64> {
        self.world().bot_readable_channels()
    }

    /// Channels and threads the bot can view now (it receives their events).
    pub fn bot_viewable_channels(&self) -> BTreeSet<u64> {
        self.world().bot_viewable_channels()
    }

    /// [`Simulator::ground_truth`] restricted to the channels the bot can read now.
    pub fn bot_readable_truth(&self) -> Vec<MessageState> {
        let w = self.world();
        let readable = w.bot_readable_channels();
        w.ground_truth()
            .into_iter()
            .filter(|m| readable.contains(&m.channel_id))
            .collect()
    }

    pub fn message(&self, id: u64) -> Option<MessageState> {
        self.world().message(id).cloned()
    }

    /// A fresh snowflake (current time plus an increment).
    pub fn next_id(&self) -> u64 {
        self.world().next_id()
    }

    // ----- messages -------------------------------------------------------------------------

    pub fn post_message(
        &self,
        channel_id: u64,
        author_id: u64,
        content: impl Into<String>,
        opts: PostOptions,
    ) -> Result<MessageState, SimError> {
        self.world()
            .post_message(channel_id, author_id, content.into(), opts)
    }

    pub fn edit_message(
        &self,
        message_id: u64,
        content: impl Into<String>,
    ) -> Result<MessageState, SimError> {
        self.world().edit_message(message_id, content.into())
    }

    pub fn delete_message(&self, message_id: u64) -> Result<(), SimError> {
        self.world().delete_message(message_id)
    }

    pub fn bulk_delete(&self, channel_id: u64, message_ids: &[u64]) -> Result<(), SimError> {
        self.world().bulk_delete(channel_id, message_ids)
    }

    // ----- channels and threads -------------------------------------------------------------

    /// Creates a channel or thread (`id` 0 allocates one). CHANNEL_CREATE / THREAD_CREATE.
    pub fn create_channel(&self, guild_id: u64, channel: Channel) -> Result<Channel, SimError> {
        self.world().create_channel(guild_id, channel)
    }

    /// Replaces a channel or thread by id. CHANNEL_UPDATE / THREAD_UPDATE.
    pub fn update_channel(&self, channel: Channel) -> Result<Channel, SimError> {
        self.world().update_channel(channel)
    }

    /// CHANNEL_DELETE / THREAD_DELETE.
    pub fn delete_channel(&self, channel_id: u64) -> Result<(), SimError> {
        self.world().delete_channel(channel_id)
    }

    /// A public (or private) thread under a text/forum channel, owned by (and joined by) `owner_id`.
    pub fn create_thread(
        &self,
        parent_id: u64,
        name: impl Into<String>,
        owner_id: u64,
        private: bool,
    ) -> Result<Channel, SimError> {
        self.world()
            .create_thread(parent_id, name.into(), owner_id, private)
    }

    pub fn update_thread(&self, thread: Channel) -> Result<Channel, SimError> {
        self.update_channel(thread)
    }

    pub fn delete_thread(&self, thread_id: u64) -> Result<(), SimError> {
        self.delete_channel(thread_id)
    }

    /// THREAD_MEMBERS_UPDATE with `added_members`.
    pub fn add_thread_member(&self, thread_id: u64, user_id: u64) -> Result<(), SimError> {
        self.world().add_thread_member(thread_id, user_id)
    }

    /// THREAD_MEMBERS_UPDATE with `removed_member_ids`.
    pub fn remove_thread_member(&self, thread_id: u64, user_id: u64) -> Result<(), SimError> {
        self.world().remove_thread_member(thread_id, user_id)
    }

    /// Adds or replaces the overwrite with `overwrite.id`. CHANNEL_UPDATE.
    pub fn set_overwrite(
        &self,
        channel_id: u64,
        overwrite: Overwrite,
    ) -> Result<Channel, SimError> {
        self.world().set_overwrite(channel_id, overwrite)
    }

    pub fn remove_overwrite(&self, channel_id: u64, target_id: u64) -> Result<Channel, SimError> {
        self.world().remove_overwrite(channel_id, target_id)
    }

    // ----- roles and members ----------------------------------------------------------------

    /// GUILD_ROLE_CREATE (`id` 0 allocates one).
    pub fn create_role(&self, guild_id: u64, role: Role) -> Result<Role, SimError> {
        self.world().create_role(guild_id, role)
    }

    /// GUILD_ROLE_UPDATE.
    pub fn update_role(&self, guild_id: u64, role: Role) -> Result<Role, SimError> {
        self.world().update_role(guild_id, role)
    }

    /// GUILD_ROLE_UPDATE with new permissions.
    pub fn set_role_permissions(
        &self,
        guild_id: u64,
        role_id: u64,
        permissions: u64,
    ) -> Result<Role, SimError> {
        self.world()
            .set_role_permissions(guild_id, role_id, permissions)
    }

    /// GUILD_ROLE_DELETE (members lose the role silently, as on Discord).
    pub fn delete_role(&self, guild_id: u64, role_id: u64) -> Result<(), SimError> {
        self.world().delete_role(guild_id, role_id)
    }

    /// GUILD_MEMBER_UPDATE.
    pub fn set_member_roles(
        &self,
        guild_id: u64,
        user_id: u64,
        roles: Vec<u64>,
    ) -> Result<Member, SimError> {
        self.world().set_member_roles(guild_id, user_id, roles)
    }

    /// GUILD_MEMBER_UPDATE with `communication_disabled_until` (None lifts the timeout).
    pub fn timeout_member(
        &self,
        guild_id: u64,
        user_id: u64,
        until: Option<DateTime<Utc>>,
    ) -> Result<Member, SimError> {
        self.world().timeout_member(guild_id, user_id, until)
    }

    /// GUILD_MEMBER_ADD (the user must exist: see [`Simulator::add_user`]).
    pub fn add_member(
        &self,
        guild_id: u64,
        user_id: u64,
        roles: Vec<u64>,
    ) -> Result<Member, SimError> {
        self.world().add_member(guild_id, user_id, roles)
    }

    /// GUILD_MEMBER_REMOVE.
    pub fn remove_member(&self, guild_id: u64, user_id: u64) -> Result<(), SimError> {
        self.world().remove_member(guild_id, user_id)
    }

    /// GUILD_DELETE without `unavailable`; the guild stays (users keep it in `/users/@me/guilds`).
    pub fn remove_bot_from_guild(&self, guild_id: u64) -> Result<(), SimError> {
        self.world().remove_bot_from_guild(guild_id)
    }

    /// GUILD_CREATE for a guild the bot had left.
    pub fn add_bot_to_guild(&self, guild_id: u64) -> Result<(), SimError> {
        self.world().add_bot_to_guild(guild_id)
    }

    // ----- support --------------------------------------------------------------------------

    /// The simulator's own record of every support conversation (every post of a forum or media
    /// channel) with the metrics of docs/support-queue.md, as of the simulator's current time.
    /// Computed from the journal kept as things happened, never from the stored messages.
    pub fn support_truth(&self) -> SupportTruth {
        let w = self.world();
        w.support.truth(w.peek_now())
    }

    /// [`Simulator::support_truth`] as of `as_of`: later events are left out, and wait times
    /// run to `as_of`.
    pub fn support_truth_at(&self, as_of: DateTime<Utc>) -> SupportTruth {
        self.world().support.truth(as_of)
    }

    /// Inserts `days` of back-dated support history into each forum of `guild_id`, ending at the
    /// simulator's current time: posts whose ids (shared with their starter messages) and
    /// messages are in the past and increase with time, idle ones archived (they are then only
    /// listed by `/threads/archived/public`), solved ones tagged. No gateway event is sent (as for
    /// a scenario's past): call it before the product connects, or let it backfill. The same
    /// seed on the same world gives the same history. Solved tags here are dated at the
    /// conversation's last message (see [`MarkerChange`]); history has no reopens.
    pub fn generate_support_history(
        &self,
        guild_id: u64,
        days: u32,
        seed: u64,
    ) -> Result<SupportHistory, SimError> {
        support::history::generate(&mut self.world(), guild_id, days, seed)
    }

    /// A forum post as Discord creates one: THREAD_CREATE then MESSAGE_CREATE of its starter
    /// message, which shares the thread's id.
    pub fn create_forum_post(
        &self,
        forum_id: u64,
        owner_id: u64,
        name: impl Into<String>,
        content: impl Into<String>,
        applied_tags: Vec<u64>,
    ) -> Result<(Channel, MessageState), SimError> {
        self.world().create_forum_post(
            forum_id,
            owner_id,
            name.into(),
            content.into(),
            applied_tags,
        )
    }

    /// Applies (`true`) or removes the forum's first tag named like solved (see
    /// [`is_solved_tag_name`]) on a post, through the ordinary THREAD_UPDATE path. Applying it
    /// when it is already there removes it first (two THREAD_UPDATEs), so the marker is set anew.
    pub fn set_solved(&self, thread_id: u64, solved: bool) -> Result<Channel, SimError> {
        self.world().set_solved(thread_id, solved)
    }

    /// The simulator's current time, without advancing a virtual clock.
    pub fn clock_now(&self) -> DateTime<Utc> {
        self.world().peek_now()
    }

    /// With a virtual clock, makes the next operation happen at `at` (never moves backwards);
    /// false with a wall clock, which cannot be moved.
    pub fn advance_clock_to(&self, at: DateTime<Utc>) -> bool {
        let mut w = self.world();
        w.advance_clock_to(at);
        w.has_virtual_clock()
    }

    // ----- faults ---------------------------------------------------------------------------

    /// Drops every gateway socket without a close frame (sessions stay resumable).
    pub fn drop_connections(&self) {
        self.world().broadcast(|| world::Outgoing::Drop);
    }

    /// Sends op 7 Reconnect to every connected session.
    pub fn send_reconnect(&self) {
        self.world()
            .broadcast(|| world::Outgoing::Raw(gateway::RECONNECT.into()));
    }

    /// Sends op 9 to every connected session; `false` also forgets the sessions.
    pub fn invalidate_sessions(&self, resumable: bool) {
        let mut w = self.world();
        w.broadcast(|| world::Outgoing::Raw(gateway::invalid_session(resumable)));
        if !resumable {
            w.sessions.clear();
        }
    }

    /// Closes every gateway socket with `code` (e.g. 4000 resumable, 4009 session timed out).
    pub fn close_with(&self, code: u16) {
        self.world()
            .broadcast(|| world::Outgoing::Close(code, format!("simulated close {code}")));
    }

    /// While true, heartbeats get no op 11 ACK (clients should detect a zombie connection).
    pub fn stop_heartbeat_acks(&self, stop: bool) {
        self.shared.stop_acks.store(stop, Ordering::Relaxed);
    }

    /// Sends every connected session a MESSAGE_CREATE dispatch (with a sequence number) whose
    /// payload serenity cannot parse: it arrives as `Event::Unknown`.
    pub fn send_malformed(&self) {
        let mut w = self.world();
        let ids: Vec<String> = w
            .sessions
            .iter()
            .filter(|(_, s)| s.conn.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            w.dispatch_to(
                &id,
                "MESSAGE_CREATE",
                r#"{"id":"not-a-snowflake","channel_id":null,"content":7}"#.into(),
            );
        }
    }

    /// Sends a text frame that is not JSON at all.
    pub fn send_garbage_frame(&self) {
        self.world()
            .broadcast(|| world::Outgoing::Raw("\u{1}this is not json{".into()));
    }

    /// Sends each dispatch 1..=1+`dup_max` times and shuffles within windows of `reorder_window`
    /// dispatches; every copy gets its own sequence number. `(0, 0)` turns chaos off.
    pub fn set_dispatch_chaos(&self, dup_max: u32, reorder_window: usize) {
        self.world().set_chaos(dup_max, reorder_window);
    }

    /// The next `n` REST calls (except gateway discovery) answer 429.
    pub fn rate_limit_burst(&self, n: u64) {
        self.shared.burst.store(n, Ordering::SeqCst);
    }

    /// MESSAGE_UPDATE carries only id, channel_id, guild_id, content and edited_timestamp.
    pub fn partial_message_updates(&self, partial: bool) {
        self.world().partial_updates = partial;
    }

    /// Dispatches replayed by RESUMEs so far (to check a test really exercised a replay).
    pub fn replayed_dispatches(&self) -> u64 {
        self.shared.replayed.load(Ordering::Relaxed)
    }

    /// Number of gateway sessions and how many have a live socket.
    pub fn session_counts(&self) -> (usize, usize) {
        let w = self.world();
        (
            w.sessions.len(),
            w.sessions.values().filter(|s| s.conn.is_some()).count(),
        )
    }

    // ----- traffic --------------------------------------------------------------------------

    /// Starts synthetic support traffic at `rate_per_sec` until the handle is stopped or dropped.
    pub fn start_traffic(&self, opts: TrafficOptions) -> TrafficHandle {
        traffic::start(self.clone(), opts)
    }

    /// Runs `steps` traffic operations synchronously; the same seed on the same scenario (with a
    /// virtual clock) gives the same ground truth.
    pub fn run_traffic_steps(&self, seed: u64, steps: u64) {
        let mut g = traffic::Generator::new(TrafficOptions {
            seed,
            ..TrafficOptions::default()
        });
        for _ in 0..steps {
            g.step(self);
        }
    }

    /// Runs `steps` support steps only (forum posts, answers, solved tags, reopens; see
    /// [`TrafficOptions`]): with a virtual clock, each step jumps to the next planned action, so
    /// a few thousand steps cover days. Reproducible like [`Simulator::run_traffic_steps`].
    pub fn run_support_steps(&self, seed: u64, steps: u64) {
        let mut g = traffic::Generator::new(TrafficOptions {
            seed,
            support_only: true,
            ..TrafficOptions::default()
        });
        for _ in 0..steps {
            g.step(self);
        }
    }

    pub(crate) fn stop_traffic(&self) {
        let h = self
            .shared
            .traffic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = h {
            h.stop();
        }
    }
}

fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/gateway", axum::routing::get(gateway::ws_handler))
        .merge(rest::router(Arc::clone(&shared)))
        .merge(oauth::router(Arc::clone(&shared)))
        .merge(control::router())
        .with_state(shared)
}

/// Runs a simulator on `addr` until `shutdown` resolves (for `observer sim`).
pub async fn run_standalone(
    addr: SocketAddr,
    config: SimConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SimError> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let sim = Simulator::serve(listener, config)?;
    tracing::info!(base_url = %sim.base_url(), "simulator ready");
    shutdown.await;
    sim.shutdown().await;
    Ok(())
}

/// Binds like [`run_standalone`] but returns the running simulator (to print its URL first).
pub async fn start_on(addr: SocketAddr, config: SimConfig) -> Result<Simulator, SimError> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Simulator::serve(listener, config)
}
