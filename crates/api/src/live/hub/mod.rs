//! The live fan-out hub: one per API process (docs/fan-out.md).
//!
//! - One LISTEN connection (`observer_events`, `observer_access`) in its own
//!   task, turning notifications into coalesced wake-ups; reconnects with
//!   jittered exponential backoff (replicas must not all reconnect at once after
//!   a PostgreSQL restart) and, after every (re)connect, wakes the reader so
//!   it catches up.
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
//!
//! Layout:
//! - this file: [`Hub`] (start, stop, subscribe, registration under the
//!   state lock), its configuration and what subscribers receive
//!   ([`LiveEvent`], [`LiveError`]).
//! - `state`: the shared state and the one lock over it.
//! - `listener`: the LISTEN task. `reader`: the read task. `delivery`: the
//!   hand-off to subscribers. `access`: loading, refreshing and expiring
//!   per-viewer access. `subscription`: [`Subscription`] and its stream.
//!
//! The listener and reader run on a thread of their own ([`Hub::run`]);
//! [`Hub::shutdown`] and dropping the hub stop them through one cancellation
//! token, so no caller ever waits on that thread.

mod access;
mod delivery;
mod listener;
mod reader;
mod state;
mod subscription;

pub use subscription::Subscription;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::Utc;
use observer_db::events::{self, Cursor, EventRow, Scope};
use observer_db::viewer::RevisionRow;
use observer_db::Db;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use self::access::{cross_check, load_viewer, LoadedViewer};
use self::listener::{run_on, spawn_loops};
use self::state::{EndReason, Inner, Pending, State, Sub, ViewerState};
use self::subscription::SubGuard;
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
        let db = self.inner.db.clone();
        let own_db = self.inner.db.sibling(READER_CONNECTIONS);
        // Without a thread or its runtime, the loops run on the caller's
        // runtime instead. Nothing here waits for the thread: `run` is called
        // from async code, and the tasks are stopped through `stop`.
        let caller = tokio::runtime::Handle::try_current().ok();
        let (weak_t, stop_t, db_t, caller_t) =
            (weak.clone(), stop.clone(), db.clone(), caller.clone());
        let spawned = std::thread::Builder::new()
            .name("observer-hub".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(async move {
                        let [listener, reader] = spawn_loops(weak_t, own_db.clone(), stop_t);
                        let _ = tokio::join!(listener, reader);
                        own_db.pool().close().await;
                    }),
                    Err(e) => {
                        tracing::error!(error = %e, "building the fan-out hub's runtime failed");
                        run_on(caller_t.as_ref(), weak_t, db_t, stop_t);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no thread for the fan-out hub");
            run_on(caller.as_ref(), weak, db, stop);
        }
    }

    /// Stops the hub's tasks; open subscriptions then end as unavailable.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
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
