//! The live fan-out hub: one per API process (DESIGN.md §6).
//!
//! - One LISTEN connection (`observer_events`, `observer_access`) in its own
//!   task, turning notifications into coalesced wake-ups; reconnects with
//!   backoff and, after every (re)connect, wakes the reader so it catches up.
//! - One reader task: on a wake-up (or a short tick, the safety net for a lost
//!   notification or an xmin that advanced silently) it reads new access
//!   changes and new message events **once**, as `observer_fanout`, whatever
//!   the number of subscribers, and hands each subscriber what its viewer may
//!   see, decided in memory by `observer_db::access`.
//! - Per-viewer access sets, shared by all subscriptions of that viewer, built
//!   from a per-guild cache of access data and refreshed when `access_events`
//!   arrive (a guild-wide change recomputes every viewer of the guild, a
//!   user-specific one that viewer).
//! - Per subscriber a bounded buffer filled with `try_send`: a full buffer ends
//!   that subscription (`SLOW_CONSUMER`, resume from its last cursor) and never
//!   delays anyone else.
//!
//! Resume is gapless: a subscription registers with the hub *before* replaying,
//! at the hub's cursor `H` (atomically with delivery, under the state lock), so
//! live delivery starts strictly after `H`; the replay covers `(after, H]`
//! through RLS as the viewer; live events at or below `after` are dropped.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use observer_db::access::{visible_channels, ChannelAccess, GuildAccessData, MemberData};
use observer_db::events::{self, AccessEventRow, Cursor, EventRow, Scope};
use observer_db::viewer::RevisionRow;
use observer_db::{access_data, Db, FanoutConn};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use super::metrics::LiveMetrics;

// Every delivery looks up its subscriber, viewer and channel in these maps;
// the keys are Discord ids and our own counters, not attacker-chosen, so the
// faster non-keyed hash is safe.
type HashMap<K, V> = rustc_hash::FxHashMap<K, V>;
type HashSet<K> = rustc_hash::FxHashSet<K>;

/// Connections of the hub's own pool: the LISTEN one and the reader's
/// transactions (access changes, the first cursor). Message events are read
/// on one more, the reader's own session (`Db::fanout_conn`).
const READER_CONNECTIONS: u32 = 2;

/// Tuning of one hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Events buffered per subscriber before it is ended as a slow consumer.
    pub buffer: usize,
    /// Safety-net read interval (lost notification, xmin advanced silently,
    /// timeouts that expire).
    pub tick: Duration,
    /// Rows per read of the event log.
    pub read_batch: i64,
    /// Rows per replay page on resume.
    pub replay_page: i64,
    /// Longest wait between listener reconnect attempts.
    pub max_backoff: Duration,
    /// How long a new subscription waits for the hub's first read.
    pub ready_timeout: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            buffer: 1024,
            tick: Duration::from_millis(250),
            read_batch: 2000,
            replay_page: 500,
            max_backoff: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(10),
        }
    }
}

/// One message event as fan-out read it, shared (not copied) by every
/// subscriber it goes to.
#[derive(Debug)]
pub struct LiveEvent {
    pub row: EventRow,
    /// Prior versions of the message's content, oldest first.
    pub revisions: Vec<RevisionRow>,
    /// Its GraphQL renderings, shared by the subscribers that asked for the
    /// same selection (see [`super::render::Renders`]).
    pub renders: super::render::Renders,
}

impl LiveEvent {
    pub fn new(row: EventRow, revisions: Vec<RevisionRow>) -> Self {
        Self {
            row,
            revisions,
            renders: Default::default(),
        }
    }

    pub fn cursor(&self) -> Cursor {
        self.row.cursor
    }
}

/// Why a subscription ended or could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    /// Its buffer overflowed: resume with `after = resume_from`.
    #[error("subscriber too slow; resume from the last cursor")]
    SlowConsumer { resume_from: Cursor },
    /// Nothing in the requested scope is (any longer) visible to the viewer.
    #[error("forbidden")]
    Forbidden,
    /// The hub could not serve it (database unavailable, hub stopped): resume
    /// with `after = resume_from` when given.
    #[error("live events unavailable")]
    Unavailable { resume_from: Option<Cursor> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndReason {
    SlowConsumer,
    Forbidden,
}

/// The live access state of one viewer, shared by their subscriptions.
struct ViewerState {
    subs: usize,
    /// guild id → membership (absent: not a member).
    members: HashMap<i64, MemberData>,
    /// channel id → (guild id, access), visible channels only (`read` decides
    /// delivery: a voice channel without CONNECT is visible, its chat is not).
    visible: HashMap<i64, (i64, ChannelAccess)>,
    /// Earliest future timeout end among the memberships: access may widen then.
    next_expiry: Option<DateTime<Utc>>,
}

impl ViewerState {
    fn recompute(&mut self, guilds: &HashMap<i64, GuildAccessData>, now: DateTime<Utc>) {
        self.visible.clear();
        for (gid, m) in &self.members {
            if let Some(g) = guilds.get(gid) {
                for (cid, a) in visible_channels(g, Some(m), now) {
                    self.visible.insert(cid, (*gid, a));
                }
            }
        }
        self.next_expiry = self
            .members
            .values()
            .filter_map(|m| m.communication_disabled_until)
            .filter(|t| *t > now)
            .min();
    }

    fn sees(&self, guild_id: i64, channel_id: i64) -> bool {
        self.access(guild_id, channel_id).is_some()
    }

    /// The viewer's live access to a channel, when it may see it at all.
    fn access(&self, guild_id: i64, channel_id: i64) -> Option<ChannelAccess> {
        self.visible
            .get(&channel_id)
            .filter(|(g, a)| *g == guild_id && a.read)
            .map(|(_, a)| *a)
    }

    /// Whether anything in `scope` is readable; the unscoped subscription
    /// ("everything I may see") is never forbidden, it may simply be quiet.
    /// A channel listed in the scope counts only if its messages are readable
    /// (a voice channel without CONNECT is visible, its chat is not); a guild
    /// scope counts if the guild is visible at all, like its other queries.
    fn scope_visible(&self, scope: &Scope) -> bool {
        match (&scope.channel_ids, scope.guild_id) {
            (None, None) => true,
            (Some(ids), g) => ids.iter().any(|c| {
                self.visible
                    .get(c)
                    .is_some_and(|(vg, a)| a.read && g.is_none_or(|g| g == *vg))
            }),
            (None, Some(g)) => self.visible.values().any(|(vg, _)| *vg == g),
        }
    }
}

struct Sub {
    viewer: i64,
    scope: Scope,
    /// `scope.channel_ids` as a set: checked for every event (up to 500 ids).
    channels: Option<HashSet<i64>>,
    tx: mpsc::Sender<Arc<LiveEvent>>,
    end: Arc<OnceLock<EndReason>>,
}

impl Sub {
    fn wants(&self, guild_id: i64, channel_id: i64) -> bool {
        self.scope.guild_id.is_none_or(|g| g == guild_id)
            && self
                .channels
                .as_ref()
                .is_none_or(|c| c.contains(&channel_id))
    }
}

#[derive(Default)]
struct State {
    /// Message events read (and delivered) up to here; None before the first read.
    cursor: Option<Cursor>,
    access_cursor: Option<Cursor>,
    subs: HashMap<u64, Sub>,
    viewers: HashMap<i64, ViewerState>,
    /// Access data of every guild some active viewer belongs to.
    guilds: HashMap<i64, GuildAccessData>,
    /// channel id → subscriptions that may want its events: narrows the
    /// subscribers [`deliver`] looks at to those of viewers who see the
    /// channel. Candidates only — each is checked against `subs` and
    /// `viewers` as before — so a stale entry can cost time, never leak.
    /// Dropped (None) by every change to `subs` or to a viewer's access;
    /// rebuilt on the next delivery. A change that did not drop it would
    /// leave a subscriber out: every such site calls [`State::reindex`].
    index: Option<HashMap<i64, Vec<u64>>>,
    /// Viewers whose data may predate access changes the hub already applied.
    dirty: BTreeSet<i64>,
}

impl State {
    /// Marks the delivery index stale (see `index`).
    fn reindex(&mut self) {
        self.index = None;
    }

    /// The delivery index, rebuilt if stale.
    fn take_index(&mut self) -> HashMap<i64, Vec<u64>> {
        if let Some(idx) = self.index.take() {
            return idx;
        }
        let mut idx: HashMap<i64, Vec<u64>> = HashMap::default();
        for (id, sub) in &self.subs {
            let Some(v) = self.viewers.get(&sub.viewer) else {
                continue;
            };
            for (c, (g, a)) in &v.visible {
                if a.read && sub.wants(*g, *c) {
                    idx.entry(*c).or_default().push(*id);
                }
            }
        }
        idx
    }

    /// Ends every subscription of `viewer` whose whole scope became invisible.
    fn enforce_scopes(&mut self, viewer: i64, metrics: &LiveMetrics) {
        let Some(v) = self.viewers.get(&viewer) else {
            return;
        };
        let ended: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, s)| s.viewer == viewer && !v.scope_visible(&s.scope))
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            if let Some(s) = self.subs.remove(&id) {
                self.reindex();
                let _ = s.end.set(EndReason::Forbidden);
                metrics.forbidden.inc();
                self.release_viewer(s.viewer);
            }
        }
        metrics.subscribers.set(self.subs.len() as i64);
    }

    fn release_viewer(&mut self, viewer: i64) {
        let gone = match self.viewers.get_mut(&viewer) {
            Some(v) => {
                v.subs = v.subs.saturating_sub(1);
                v.subs == 0
            }
            None => false,
        };
        if gone {
            self.reindex();
            if let Some(v) = self.viewers.remove(&viewer) {
                // Drop cached guilds nobody watches any more.
                for gid in v.members.keys() {
                    if !self.viewers.values().any(|o| o.members.contains_key(gid)) {
                        self.guilds.remove(gid);
                    }
                }
            }
            self.dirty.remove(&viewer);
        }
    }
}

#[derive(Default)]
struct Pending {
    events: AtomicBool,
    access: AtomicBool,
}

struct Inner {
    db: Db,
    cfg: HubConfig,
    metrics: LiveMetrics,
    state: Mutex<State>,
    pending: Pending,
    kick: Arc<Notify>,
    ready: watch::Sender<bool>,
    next_id: AtomicU64,
    listener_pid: AtomicI32,
    started: AtomicBool,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Cancelled when the hub is dropped: its tasks hold it weakly and may
    /// be waiting on the database, on a thread of their own.
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; the data stays
        // consistent enough (every mutation is a few map operations) to go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The process's fan-out hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hub")
    }
}

/// What a viewer's subscription needs, loaded before registering.
struct LoadedViewer {
    guilds: BTreeMap<i64, GuildAccessData>,
    members: HashMap<i64, MemberData>,
    /// Access events at or below this cursor are reflected in the data.
    loaded_at: Cursor,
}

impl Hub {
    /// A hub whose tasks start with the first subscription (or [`Hub::run`]),
    /// so building application state needs no runtime.
    pub fn new(db: Db, cfg: HubConfig, metrics: LiveMetrics) -> Self {
        let (ready, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            db,
            cfg,
            metrics,
            state: Mutex::new(State::default()),
            pending: Pending::default(),
            kick: Arc::new(Notify::new()),
            ready,
            next_id: AtomicU64::new(1),
            listener_pid: AtomicI32::new(0),
            started: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
        });
        Self { inner }
    }

    /// A hub with its tasks already running on the current runtime.
    pub fn start(db: Db, cfg: HubConfig, metrics: LiveMetrics) -> Self {
        let hub = Self::new(db, cfg, metrics);
        hub.run();
        hub
    }

    /// Starts the listener and reader tasks, once, on a thread and runtime
    /// of their own: on the API's runtime every wake-up and database round
    /// trip of a read queued behind the connection tasks the previous read
    /// had just woken (up to one per subscriber), which was most of the
    /// hand-off latency under load. The tasks hold the hub weakly and end
    /// when it is dropped or shut down; the thread ends with them.
    pub fn run(&self) {
        if self.inner.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let stop = self.inner.stop.clone();
        let own_db = self.inner.db.sibling(READER_CONNECTIONS);
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("observer-hub".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "building the fan-out hub's runtime failed");
                        return;
                    }
                };
                rt.block_on(async move {
                    let [listener, reader] = spawn_loops(weak, own_db.clone(), stop);
                    let _ = tx.send([listener.abort_handle(), reader.abort_handle()]);
                    let _ = tokio::join!(listener, reader);
                    own_db.pool().close().await;
                });
            });
        // The handles come right after the thread starts; without a thread
        // or its runtime, the loops run on the caller's runtime instead.
        let handles = match spawned.ok().and_then(|_| rx.recv().ok()) {
            Some(handles) => handles,
            None => {
                tracing::error!(
                    "no thread for the fan-out hub; running it on the caller's runtime"
                );
                let loops = spawn_loops(
                    Arc::downgrade(&self.inner),
                    self.inner.db.clone(),
                    self.inner.stop.clone(),
                );
                loops.map(|l| l.abort_handle())
            }
        };
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(handles);
    }

    /// Stops the hub's tasks; open subscriptions then end as unavailable.
    pub fn shutdown(&self) {
        for t in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
        let mut st = self.inner.state();
        st.subs.clear();
        st.viewers.clear();
        st.reindex();
        self.inner.metrics.subscribers.set(0);
    }

    pub fn metrics(&self) -> &LiveMetrics {
        &self.inner.metrics
    }

    /// The hub's current position in the message event log (None before its first read).
    pub fn cursor(&self) -> Option<Cursor> {
        self.inner.state().cursor
    }

    /// Backend pid of the LISTEN connection (0 while disconnected).
    pub fn listener_pid(&self) -> i32 {
        self.inner.listener_pid.load(Ordering::SeqCst)
    }

    /// Open subscriptions.
    pub fn subscriber_count(&self) -> usize {
        self.inner.state().subs.len()
    }

    /// Whether `viewer` currently sees `channel_id` live, per the hub's
    /// in-memory access set (None when the hub holds no state for the viewer).
    pub fn viewer_sees(&self, viewer: i64, guild_id: i64, channel_id: i64) -> Option<bool> {
        self.inner
            .state()
            .viewers
            .get(&viewer)
            .map(|v| v.sees(guild_id, channel_id))
    }

    /// Subscribes `viewer` to events in `scope`: live only from now on, or
    /// first a replay (through RLS) of everything after `after`.
    pub async fn subscribe(
        &self,
        viewer: i64,
        scope: Scope,
        after: Option<Cursor>,
    ) -> Result<Subscription, LiveError> {
        self.run();
        let inner = &self.inner;
        let mut ready = inner.ready.subscribe();
        let unavailable = LiveError::Unavailable { resume_from: after };
        match tokio::time::timeout(inner.cfg.ready_timeout, ready.wait_for(|r| *r)).await {
            Ok(Ok(_)) => {}
            _ => return Err(unavailable),
        }

        let (tx, rx) = mpsc::channel(inner.cfg.buffer.max(1));
        let end = Arc::new(OnceLock::new());
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut attempts = 0;
        let registered_at = loop {
            attempts += 1;
            let known = inner.state().viewers.contains_key(&viewer);
            let loaded = if known {
                None
            } else {
                match load_viewer(&inner.db, viewer).await {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::warn!(viewer, error = %e, "loading viewer access failed");
                        return Err(unavailable);
                    }
                }
            };
            if let Some(l) = &loaded {
                if let Err(e) = cross_check(&inner.db, viewer, l).await {
                    tracing::warn!(viewer, error = %e, "RLS cross-check of viewer access failed");
                    return Err(unavailable);
                }
            }
            match self.register(viewer, &scope, loaded, &tx, &end, id)? {
                Some(cursor) => break cursor,
                // The viewer's shared state went away between the check and
                // the registration (its last other subscription ended): load.
                None if attempts < 3 => continue,
                None => return Err(unavailable),
            }
        };

        let floor = after.map_or(registered_at, |a| a.max(registered_at));
        Ok(Subscription {
            guard: SubGuard {
                inner: Arc::downgrade(&self.inner),
                id,
            },
            db: inner.db.clone(),
            viewer,
            scope,
            replay_from: after.filter(|a| *a < registered_at),
            replay_upto: registered_at,
            replay_page: inner.cfg.replay_page.clamp(1, events::MAX_READ),
            replay_buf: VecDeque::new(),
            rx,
            end,
            floor,
            resume_from: after.unwrap_or(registered_at),
            done: false,
        })
    }
}

impl Hub {
    /// Registers a subscription at the hub's cursor, atomically with
    /// delivery. `Ok(None)`: the viewer's state must be loaded first.
    fn register(
        &self,
        viewer: i64,
        scope: &Scope,
        loaded: Option<LoadedViewer>,
        tx: &mpsc::Sender<Arc<LiveEvent>>,
        end: &Arc<OnceLock<EndReason>>,
        id: u64,
    ) -> Result<Option<Cursor>, LiveError> {
        let inner = &self.inner;
        let mut st = inner.state();
        let Some(cursor) = st.cursor else {
            return Err(LiveError::Unavailable { resume_from: None });
        };
        let access_cursor = st.access_cursor;
        let st = &mut *st;
        if !st.viewers.contains_key(&viewer) {
            let Some(l) = loaded else {
                return Ok(None);
            };
            for (gid, g) in l.guilds {
                st.guilds.entry(gid).or_insert(g);
            }
            let mut v = ViewerState {
                subs: 0,
                members: l.members,
                visible: HashMap::default(),
                next_expiry: None,
            };
            v.recompute(&st.guilds, Utc::now());
            st.viewers.insert(viewer, v);
            st.reindex();
            if access_cursor.is_some_and(|a| a > l.loaded_at) {
                // The hub applied access changes our load may not reflect.
                st.dirty.insert(viewer);
                inner.pending.access.store(true, Ordering::SeqCst);
                inner.kick.notify_one();
            }
        }
        let Some(v) = st.viewers.get_mut(&viewer) else {
            return Ok(None);
        };
        v.subs += 1;
        if !v.scope_visible(scope) {
            st.release_viewer(viewer);
            return Err(LiveError::Forbidden);
        }
        st.reindex();
        st.subs.insert(
            id,
            Sub {
                viewer,
                scope: scope.clone(),
                channels: scope
                    .channel_ids
                    .as_ref()
                    .map(|c| c.iter().copied().collect()),
                tx: tx.clone(),
                end: end.clone(),
            },
        );
        inner.metrics.subscribers.set(st.subs.len() as i64);
        Ok(Some(cursor))
    }
}

async fn load_viewer(db: &Db, viewer: i64) -> observer_db::Result<LoadedViewer> {
    let mut tx = db.fanout().await?;
    // Read the watermark first: every access change below it committed before
    // the loads below start, so they see it.
    let loaded_at = events::head(&mut tx).await?;
    let guild_ids = events::member_guild_ids(&mut tx, viewer).await?;
    let guilds = access_data::load_guilds(&mut tx, &guild_ids).await?;
    let members = access_data::load_members(&mut tx, &guild_ids, &[viewer]).await?;
    tx.commit().await?;
    Ok(LoadedViewer {
        guilds,
        members: members.into_iter().map(|((g, _), m)| (g, m)).collect(),
        loaded_at,
    })
}

/// The visible set the Rust rule computes from `l`, as (guild, channel, read, history).
fn rust_visible(l: &LoadedViewer, now: DateTime<Utc>) -> BTreeSet<(i64, i64, bool, bool)> {
    let mut out = BTreeSet::new();
    for (gid, m) in &l.members {
        if let Some(g) = l.guilds.get(gid) {
            for (cid, a) in visible_channels(g, Some(m), now) {
                out.insert((*gid, cid, a.read, a.history));
            }
        }
    }
    out
}

/// Holds the in-memory set to what RLS says for the viewer. A difference is
/// either a concurrent access change (reload and compare again) or a
/// divergence between the two implementations of the rule (a bug: refuse).
async fn cross_check(db: &Db, viewer: i64, l: &LoadedViewer) -> anyhow::Result<()> {
    let rls = |db: Db| async move {
        let mut tx = db.viewer(viewer).await?;
        let rows = events::viewer_channels(&mut tx).await?;
        tx.commit().await?;
        Ok::<_, observer_db::Error>(
            rows.into_iter()
                .map(|c| (c.guild_id, c.channel_id, c.read, c.history))
                .collect::<BTreeSet<_>>(),
        )
    };
    let ours = rust_visible(l, Utc::now());
    let theirs = rls(db.clone()).await?;
    if ours == theirs {
        return Ok(());
    }
    // Access may have changed between the two reads: compare fresh data once
    // more before calling it a divergence.
    let again = load_viewer(db, viewer).await?;
    let ours = rust_visible(&again, Utc::now());
    let theirs = rls(db.clone()).await?;
    if ours == theirs {
        return Ok(());
    }
    anyhow::bail!(
        "in-memory access set differs from RLS ({} vs {} channels)",
        ours.len(),
        theirs.len()
    )
}

/// Unregisters its subscription when the stream is dropped.
struct SubGuard {
    inner: Weak<Inner>,
    id: u64,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            let mut st = inner.state();
            if let Some(s) = st.subs.remove(&self.id) {
                st.reindex();
                st.release_viewer(s.viewer);
            }
            inner.metrics.subscribers.set(st.subs.len() as i64);
        }
    }
}

/// One subscription: replayed events first (if resuming), then live ones.
pub struct Subscription {
    guard: SubGuard,
    db: Db,
    viewer: i64,
    scope: Scope,
    replay_from: Option<Cursor>,
    replay_upto: Cursor,
    replay_page: i64,
    replay_buf: VecDeque<Arc<LiveEvent>>,
    rx: mpsc::Receiver<Arc<LiveEvent>>,
    end: Arc<OnceLock<EndReason>>,
    /// Live events at or below this were replayed (or predate the subscription).
    floor: Cursor,
    /// Where a client resumes after an error: the last event handed out, else
    /// where the subscription started.
    resume_from: Cursor,
    done: bool,
}

impl Subscription {
    /// Where this subscription's live part starts (the hub's cursor at registration).
    pub fn registered_at(&self) -> Cursor {
        self.replay_upto
    }

    /// The subscription's id within its hub.
    pub fn id(&self) -> u64 {
        self.guard.id
    }

    /// The next event, an error that ends the subscription, or None once ended.
    pub async fn next(&mut self) -> Option<Result<Arc<LiveEvent>, LiveError>> {
        if self.done {
            return None;
        }
        loop {
            if let Some(ev) = self.replay_buf.pop_front() {
                self.resume_from = ev.cursor();
                return Some(Ok(ev));
            }
            if let Some(from) = self.replay_from {
                match self.replay(from).await {
                    Ok(page) => {
                        let full = page.len() as i64 >= self.replay_page;
                        self.replay_from = match page.last() {
                            Some(last) if full => Some(last.cursor()),
                            _ => None,
                        };
                        self.replay_buf.extend(page);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(viewer = self.viewer, error = %e, "replay failed");
                        self.done = true;
                        return Some(Err(LiveError::Unavailable {
                            resume_from: Some(self.resume_from),
                        }));
                    }
                }
            }
            return std::future::poll_fn(|cx| self.poll_live(cx)).await;
        }
    }

    /// True once only live events are left (replay done or none asked for).
    fn live_only(&self) -> bool {
        self.replay_from.is_none() && self.replay_buf.is_empty()
    }

    /// The next live event (or the error that ends the subscription),
    /// without a future: the per-delivery path.
    fn poll_live(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Arc<LiveEvent>, LiveError>>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            let Poll::Ready(item) = self.rx.poll_recv(cx) else {
                return Poll::Pending;
            };
            match item {
                Some(ev) if ev.cursor() <= self.floor => continue,
                Some(ev) => {
                    self.resume_from = ev.cursor();
                    return Poll::Ready(Some(Ok(ev)));
                }
                None => {
                    self.done = true;
                    let resume_from = self.resume_from;
                    return Poll::Ready(Some(Err(match self.end.get() {
                        Some(EndReason::SlowConsumer) => LiveError::SlowConsumer { resume_from },
                        Some(EndReason::Forbidden) => LiveError::Forbidden,
                        None => LiveError::Unavailable {
                            resume_from: Some(resume_from),
                        },
                    })));
                }
            }
        }
    }

    async fn replay(&self, from: Cursor) -> observer_db::Result<Vec<Arc<LiveEvent>>> {
        let mut tx = self.db.viewer(self.viewer).await?;
        let rows = events::replay_for_viewer(
            &mut tx,
            from,
            self.replay_upto,
            &self.scope,
            self.replay_page,
        )
        .await?;
        let keys: Vec<(i64, i64)> = rows
            .iter()
            .map(|r| (r.guild_id, r.message.message_id))
            .collect();
        let revisions = observer_db::viewer::revisions(&mut tx, &keys).await?;
        tx.commit().await?;
        Ok(attach(rows, revisions))
    }

    /// The subscription as a stream (ends after its first error).
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Arc<LiveEvent>, LiveError>> {
        SubscriptionStream {
            sub: Some(Box::new(self)),
            replaying: None,
        }
    }
}

type Item = Result<Arc<LiveEvent>, LiveError>;

/// [`Subscription::into_stream`]: live events are polled straight from the
/// subscriber's buffer (no future per event); while a replay is in progress,
/// [`Subscription::next`] runs as a future that owns the subscription.
struct SubscriptionStream {
    sub: Option<Box<Subscription>>,
    replaying: Option<futures::future::BoxFuture<'static, (Box<Subscription>, Option<Item>)>>,
}

impl futures::Stream for SubscriptionStream {
    type Item = Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Item>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Some(fut) = this.replaying.as_mut() {
            let Poll::Ready((sub, item)) = fut.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            this.replaying = None;
            this.sub = Some(sub);
            return Poll::Ready(item);
        }
        let Some(mut sub) = this.sub.take() else {
            return Poll::Ready(None);
        };
        if sub.live_only() {
            let polled = sub.poll_live(cx);
            this.sub = Some(sub);
            return polled;
        }
        let mut fut: futures::future::BoxFuture<'static, _> = Box::pin(async move {
            let item = sub.next().await;
            (sub, item)
        });
        match fut.as_mut().poll(cx) {
            Poll::Ready((sub, item)) => {
                this.sub = Some(sub);
                Poll::Ready(item)
            }
            Poll::Pending => {
                this.replaying = Some(fut);
                Poll::Pending
            }
        }
    }
}

fn attach(rows: Vec<EventRow>, revisions: Vec<RevisionRow>) -> Vec<Arc<LiveEvent>> {
    let mut by_key: HashMap<(i64, i64), Vec<RevisionRow>> = HashMap::default();
    for r in revisions {
        by_key
            .entry((r.guild_id, r.message_id))
            .or_default()
            .push(r);
    }
    rows.into_iter()
        .map(|row| {
            let revisions = by_key
                .get(&(row.guild_id, row.message.message_id))
                .cloned()
                .unwrap_or_default();
            Arc::new(LiveEvent::new(row, revisions))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------

/// The hub's two tasks, on the current runtime.
fn spawn_loops(
    weak: Weak<Inner>,
    db: Db,
    stop: CancellationToken,
) -> [tokio::task::JoinHandle<()>; 2] {
    [
        tokio::spawn(listen_loop(weak.clone(), db.clone(), stop.clone())),
        tokio::spawn(read_loop(weak, db, stop)),
    ]
}

/// Keeps one LISTEN connection. Notifications only set flags and kick the
/// reader, so a burst of them costs one read.
async fn listen_loop(weak: Weak<Inner>, db: Db, stop: CancellationToken) {
    tokio::select! {
        () = listen(weak, db) => {}
        () = stop.cancelled() => {}
    }
}

async fn listen(weak: Weak<Inner>, db: Db) {
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let max_backoff = inner.cfg.max_backoff;
        drop(inner);
        match events::listen(&db).await {
            Ok((mut listener, pid)) => {
                backoff = Duration::from_millis(50);
                {
                    let Some(inner) = weak.upgrade() else { return };
                    inner.listener_pid.store(pid, Ordering::SeqCst);
                    if !first {
                        inner.metrics.listener_reconnects.inc();
                    }
                    first = false;
                    // Notifications sent while we were not listening are lost:
                    // catch up from the log.
                    inner.pending.events.store(true, Ordering::SeqCst);
                    inner.pending.access.store(true, Ordering::SeqCst);
                    inner.kick.notify_one();
                }
                loop {
                    let n = listener.try_recv().await;
                    let Some(inner) = weak.upgrade() else { return };
                    match n {
                        Ok(Some(n)) => {
                            mark(&inner, n.channel());
                            while let Some(n) = listener.next_buffered() {
                                mark(&inner, n.channel());
                            }
                            inner.kick.notify_one();
                        }
                        Ok(None) => {
                            tracing::warn!("LISTEN connection lost; reconnecting");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                            break;
                        }
                    }
                }
                if let Some(inner) = weak.upgrade() {
                    inner.listener_pid.store(0, Ordering::SeqCst);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "could not LISTEN; retrying");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max_backoff);
    }
}

fn mark(inner: &Inner, channel: &str) {
    match channel {
        observer_db::events::CHANNEL_ACCESS => inner.pending.access.store(true, Ordering::SeqCst),
        _ => inner.pending.events.store(true, Ordering::SeqCst),
    }
}

async fn read_loop(weak: Weak<Inner>, db: Db, stop: CancellationToken) {
    tokio::select! {
        () = read(weak, db) => {}
        () = stop.cancelled() => {}
    }
}

async fn read(weak: Weak<Inner>, db: Db) {
    let (tick_every, kick) = match weak.upgrade() {
        Some(inner) => (inner.cfg.tick, inner.kick.clone()),
        None => return,
    };
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures: u32 = 0;
    // The reader's own session (see `Db::fanout_conn`), opened on first use
    // and after any failed read.
    let mut conn: Option<FanoutConn> = None;
    loop {
        let ticked = tokio::select! {
            _ = kick.notified() => false,
            _ = tick.tick() => true,
        };
        let Some(inner) = weak.upgrade() else { return };
        if ticked {
            inner.pending.events.store(true, Ordering::SeqCst);
            inner.pending.access.store(true, Ordering::SeqCst);
        }
        let reads_before = inner.metrics.reads.get();
        let result = poll(&inner, &db, &mut conn, ticked).await;
        if ticked {
            inner
                .metrics
                .tick_reads
                .inc_by(inner.metrics.reads.get() - reads_before);
        }
        match result {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                inner.metrics.read_errors.inc();
                // Nothing was consumed: read again at the next tick.
                inner.pending.events.store(true, Ordering::SeqCst);
                inner.pending.access.store(true, Ordering::SeqCst);
                if failures % 20 == 1 {
                    tracing::warn!(error = %e, failures, "fan-out read failed");
                }
            }
        }
    }
}

/// One round: initialise cursors, apply access changes, expire timeouts,
/// deliver new message events.
/// `db`: the reader's own pool (see [`Hub::run`]); `conn`: its session for
/// message events, dropped (and reopened next round) when a read fails.
async fn poll(
    inner: &Arc<Inner>,
    db: &Db,
    conn: &mut Option<FanoutConn>,
    ticked: bool,
) -> observer_db::Result<()> {
    let (cursor, access_cursor) = {
        let st = inner.state();
        (st.cursor, st.access_cursor)
    };
    let (Some(cursor), Some(mut access_cursor)) = (cursor, access_cursor) else {
        let mut tx = db.fanout().await?;
        let head = events::head(&mut tx).await?;
        tx.commit().await?;
        inner.metrics.reads.inc();
        {
            let mut st = inner.state();
            st.cursor.get_or_insert(head);
            st.access_cursor.get_or_insert(head);
        }
        inner.ready.send_replace(true);
        return Ok(());
    };

    let want_access = inner.pending.access.swap(false, Ordering::SeqCst);
    let want_events = inner.pending.events.swap(false, Ordering::SeqCst);

    if want_access {
        // Access first, so a revocation read in this round applies to the
        // message events read after it.
        let mut changes: Vec<AccessEventRow> = Vec::new();
        let mut tx = db.fanout().await?;
        loop {
            let (rows, next) =
                events::access_after(&mut tx, access_cursor, inner.cfg.read_batch).await?;
            let full = rows.len() as i64 >= inner.cfg.read_batch;
            changes.extend(rows);
            access_cursor = next;
            if !full {
                break;
            }
        }
        // The dirty set leaves the shared state only for the refresh: on any
        // failure it goes back, or a revocation for those viewers would
        // never apply (the cursor does not move, so the changes are re-read).
        let dirty: BTreeSet<i64> = std::mem::take(&mut inner.state().dirty);
        let applied = async {
            if !changes.is_empty() || !dirty.is_empty() {
                refresh_access(inner, &mut tx, &changes, &dirty).await?;
            }
            tx.commit().await
        }
        .await;
        if let Err(e) = applied {
            restore_dirty(inner, dirty);
            return Err(e);
        }
        inner.metrics.reads.inc();
        inner.state().access_cursor = Some(access_cursor);
    }
    expire_timeouts(inner);

    if want_events {
        let mut session = match conn.take() {
            Some(c) => c,
            None => db.fanout_conn().await?,
        };
        // Kept only after a good read: a failure may mean a broken
        // connection, so the next round opens a fresh one.
        read_events(inner, &mut session, cursor).await?;
        *conn = Some(session);
        inner.metrics.reads.inc();
        if !ticked {
            inner.metrics.notified_event_reads.inc();
        }
    }
    Ok(())
}

/// Reads the message events after `cursor` (a statement per batch of
/// `read_batch`, each its own snapshot, which the cursor's xmin rule makes
/// safe) and delivers them.
async fn read_events(
    inner: &Inner,
    conn: &mut FanoutConn,
    mut cursor: Cursor,
) -> observer_db::Result<()> {
    loop {
        let (rows, next) = events::read_after(conn, cursor, inner.cfg.read_batch).await?;
        let full = rows.len() as i64 >= inner.cfg.read_batch;
        let keys: Vec<(i64, i64)> = rows
            .iter()
            .filter(|r| r.message.edited_at.is_some())
            .map(|r| (r.guild_id, r.message.message_id))
            .collect();
        let revisions = events::revisions(conn, &keys).await?;
        deliver(inner, attach(rows, revisions), next);
        cursor = next;
        if !full {
            return Ok(());
        }
    }
}

/// Puts back viewers taken out of `dirty` for a refresh that failed (those
/// still subscribed; a viewer that left since has nothing to refresh).
fn restore_dirty(inner: &Inner, dirty: BTreeSet<i64>) {
    let mut st = inner.state();
    let st = &mut *st;
    st.dirty
        .extend(dirty.into_iter().filter(|v| st.viewers.contains_key(v)));
}

/// Hands each event to every subscriber whose scope and viewer allow it, and
/// moves the hub's cursor — both under the lock, so a registration sees
/// either none or all of a batch.
fn deliver(inner: &Inner, batch: Vec<Arc<LiveEvent>>, next: Cursor) {
    let now = Utc::now();
    let mut st = inner.state();
    let st = &mut *st;
    let mut ended: Vec<u64> = Vec::new();
    let mut deliveries: u64 = 0;
    let index = st.take_index();
    let mut ended_any = false;
    for ev in &batch {
        let (g, c) = (ev.row.guild_id, ev.row.channel_id);
        // Prior versions are history: a viewer with VIEW_CHANNEL but not
        // READ_MESSAGE_HISTORY gets the event without them (built once per
        // event, shared by all such subscribers).
        let mut without_history: Option<Arc<LiveEvent>> = None;
        for id in index.get(&c).into_iter().flatten() {
            let Some(sub) = st.subs.get(id) else {
                continue;
            };
            if !sub.wants(g, c) {
                continue;
            }
            let Some(access) = st.viewers.get(&sub.viewer).and_then(|v| v.access(g, c)) else {
                continue;
            };
            let item = if access.history || ev.revisions.is_empty() {
                ev.clone()
            } else {
                without_history
                    .get_or_insert_with(|| Arc::new(LiveEvent::new(ev.row.clone(), Vec::new())))
                    .clone()
            };
            match sub.tx.try_send(item) {
                Ok(()) => deliveries += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let _ = sub.end.set(EndReason::SlowConsumer);
                    ended.push(*id);
                }
                // The stream is gone; its guard unregisters it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        // The end of those subscriptions must not see later events: remove
        // them before the next event of the batch.
        for id in ended.drain(..) {
            ended_any = true;
            if let Some(s) = st.subs.remove(&id) {
                inner.metrics.slow_consumers.inc();
                st.release_viewer(s.viewer);
            }
        }
        let lag = (now - ev.row.at).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
        inner.metrics.fanout_latency.observe(lag);
    }
    // Still exact unless subscriptions ended above; then rebuilt next time.
    if !ended_any {
        st.index = Some(index);
    }
    inner.metrics.deliveries.inc_by(deliveries);
    inner.metrics.events.inc_by(batch.len() as u64);
    inner.metrics.subscribers.set(st.subs.len() as i64);
    st.cursor = Some(next);
}

/// Reloads what the access changes (and dirty viewers) touch, with a fixed
/// number of queries whatever the number of viewers, then recomputes affected
/// viewers and ends subscriptions whose whole scope became invisible.
async fn refresh_access(
    inner: &Inner,
    tx: &mut observer_db::FanoutTx,
    changes: &[AccessEventRow],
    dirty: &BTreeSet<i64>,
) -> observer_db::Result<()> {
    let active: Vec<i64> = inner.state().viewers.keys().copied().collect();
    let active_set: BTreeSet<i64> = active.iter().copied().collect();
    let mut guild_wide: BTreeSet<i64> = BTreeSet::new();
    let mut pairs: BTreeSet<(i64, i64)> = BTreeSet::new();
    for c in changes {
        match c.user_id {
            None => {
                guild_wide.insert(c.guild_id);
            }
            Some(u) if active_set.contains(&u) => {
                pairs.insert((c.guild_id, u));
            }
            Some(_) => {}
        }
    }
    for v in dirty.iter().filter(|v| active_set.contains(v)) {
        for g in events::member_guild_ids(tx, *v).await? {
            pairs.insert((g, *v));
        }
        let st = inner.state();
        if let Some(vs) = st.viewers.get(v) {
            pairs.extend(vs.members.keys().map(|g| (*g, *v)));
        }
    }
    if guild_wide.is_empty() && pairs.is_empty() {
        return Ok(());
    }
    let guild_ids: Vec<i64> = guild_wide
        .iter()
        .copied()
        .chain(pairs.iter().map(|p| p.0))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let users: Vec<i64> = if guild_wide.is_empty() {
        pairs
            .iter()
            .map(|p| p.1)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    } else {
        active.clone()
    };
    let guilds = access_data::load_guilds(tx, &guild_ids).await?;
    let members = access_data::load_members(tx, &guild_ids, &users).await?;
    inner.metrics.access_refreshes.inc();

    let now = Utc::now();
    let mut st = inner.state();
    let st = &mut *st;
    let mut changed: BTreeSet<i64> = BTreeSet::new();
    // Viewers that registered while this refresh was reading: their members
    // were not loaded here, so "no row" would wrongly mean "not a member".
    // Their own load may predate the changes read here: reload them next.
    let mut newcomers: Vec<i64> = Vec::new();
    for (vid, v) in st.viewers.iter_mut() {
        if !active_set.contains(vid) {
            newcomers.push(*vid);
            continue;
        }
        for gid in &guild_ids {
            let concerned = guild_wide.contains(gid) || pairs.contains(&(*gid, *vid));
            if !concerned {
                continue;
            }
            let was = v.members.contains_key(gid);
            match members.get(&(*gid, *vid)) {
                Some(m) => {
                    v.members.insert(*gid, m.clone());
                    changed.insert(*vid);
                }
                None if was => {
                    v.members.remove(gid);
                    changed.insert(*vid);
                }
                None => {}
            }
            if guild_wide.contains(gid) && was {
                changed.insert(*vid);
            }
        }
    }
    for gid in &guild_ids {
        let watched = st.viewers.values().any(|v| v.members.contains_key(gid));
        match guilds.get(gid) {
            Some(g) if watched => {
                st.guilds.insert(*gid, g.clone());
            }
            _ => {
                st.guilds.remove(gid);
            }
        }
    }
    for vid in &changed {
        let guilds = &st.guilds;
        if let Some(v) = st.viewers.get_mut(vid) {
            v.recompute(guilds, now);
        }
    }
    if !changed.is_empty() {
        st.reindex();
    }
    for vid in changed {
        st.enforce_scopes(vid, &inner.metrics);
    }
    if !newcomers.is_empty() {
        st.dirty.extend(newcomers);
        inner.pending.access.store(true, Ordering::SeqCst);
        inner.kick.notify_one();
    }
    Ok(())
}

/// A timeout that ends is a change of time, not of data (no access event):
/// recompute, in memory, the viewers whose earliest timeout end has passed.
fn expire_timeouts(inner: &Inner) {
    let now = Utc::now();
    let mut st = inner.state();
    let st = &mut *st;
    let due: Vec<i64> = st
        .viewers
        .iter()
        .filter(|(_, v)| v.next_expiry.is_some_and(|t| t <= now))
        .map(|(id, _)| *id)
        .collect();
    for vid in due {
        let guilds = &st.guilds;
        if let Some(v) = st.viewers.get_mut(&vid) {
            v.recompute(guilds, now);
        }
        st.reindex();
        st.enforce_scopes(vid, &inner.metrics);
    }
}
