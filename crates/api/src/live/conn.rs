//! A WebSocket connection's side of live subscriptions: who it authenticated
//! as and with what (so logout and API-token revocation end its
//! subscriptions), the rate limit and caps on starting subscriptions, and the
//! stream wrapper that re-checks the credential while a subscription runs.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use observer_db::Db;
use tower_sessions::session::Id;
use tower_sessions::SessionStore;
use tower_sessions_sqlx_store::PostgresStore;

use crate::error::{gql_error, Code};
use crate::graphql::Viewer;
use crate::ratelimit::{RateKey, RateLimiter};

/// `extensions.code` of a subscription refused because the connection or the
/// viewer already has as many open as allowed.
pub const TOO_MANY_SUBSCRIPTIONS: &str = "TOO_MANY_SUBSCRIPTIONS";

/// What authenticated a connection, kept so it can be checked again.
#[derive(Clone, Debug)]
pub enum Credential {
    /// The login session whose cookie came with the upgrade (logout deletes it).
    Session(Id),
    /// The hash of the API token (upgrade header or `connection_init`).
    Token(Vec<u8>),
}

impl Credential {
    /// Whether it still authenticates `user_id`: one query.
    pub async fn still_valid(&self, db: &Db, user_id: i64) -> anyhow::Result<bool> {
        match self {
            Credential::Session(id) => {
                // Logout deletes the record; login rotates the id; an idle
                // session expires — each makes `load` find nothing.
                let store = PostgresStore::new(db.pool().clone());
                Ok(store.load(id).await?.is_some())
            }
            Credential::Token(hash) => {
                let mut tx = db.auth().await?;
                let owner = observer_db::auth::api_token_owner(&mut tx, hash).await?;
                tx.commit().await?;
                Ok(owner.is_some_and(|o| o.user_id == user_id))
            }
        }
    }
}

/// Open subscriptions per viewer, across the process's connections.
#[derive(Debug)]
pub struct Slots {
    max: usize,
    open: Mutex<HashMap<i64, usize>>,
}

impl Slots {
    pub fn new(max_per_viewer: usize) -> Self {
        Self {
            max: max_per_viewer,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Subscriptions `viewer` has open.
    pub fn open(&self, viewer: i64) -> usize {
        self.lock().get(&viewer).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, usize>> {
        // Counters stay usable after a panic elsewhere.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn acquire(&self, viewer: i64) -> bool {
        let mut open = self.lock();
        let n = open.entry(viewer).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self, viewer: i64) {
        let mut open = self.lock();
        if let Some(n) = open.get_mut(&viewer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&viewer);
            }
        }
    }
}

/// Per-connection data of a GraphQL WebSocket (inserted at `connection_init`).
pub struct Connection {
    pub viewer: Option<Viewer>,
    credential: Option<Credential>,
    db: Db,
    recheck: Duration,
    open: AtomicUsize,
    max_open: usize,
    slots: Arc<Slots>,
    limiter: Arc<RateLimiter>,
    /// When the credential last checked out: the subscriptions of one
    /// connection share one check per interval.
    checked_at: Mutex<Option<tokio::time::Instant>>,
    /// The credential failed once: it never comes back.
    revoked: AtomicBool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("viewer", &self.viewer)
            .finish_non_exhaustive()
    }
}

/// Settings a connection takes from the application state.
pub struct ConnectionLimits {
    pub recheck: Duration,
    pub max_per_connection: usize,
    pub slots: Arc<Slots>,
    pub limiter: Arc<RateLimiter>,
}

/// Holds a subscription's place in both caps; released on drop.
pub struct Permit {
    conn: Arc<Connection>,
    viewer: i64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.conn.open.fetch_sub(1, Ordering::SeqCst);
        self.conn.slots.release(self.viewer);
    }
}

impl Connection {
    pub fn new(
        viewer: Option<Viewer>,
        credential: Option<Credential>,
        db: Db,
        limits: ConnectionLimits,
    ) -> Self {
        Self {
            viewer,
            credential,
            db,
            recheck: limits.recheck.max(Duration::from_millis(100)),
            open: AtomicUsize::new(0),
            max_open: limits.max_per_connection,
            slots: limits.slots,
            limiter: limits.limiter,
            checked_at: Mutex::new(None),
            revoked: AtomicBool::new(false),
        }
    }

    /// Admits one more subscription for `viewer`: rate limit, the
    /// per-connection and per-viewer caps, then the credential (a connection
    /// whose token was revoked starts nothing new).
    pub async fn admit(self: &Arc<Self>, viewer: i64) -> async_graphql::Result<Permit> {
        if !self.limiter.check(RateKey::Viewer(viewer)) {
            return Err(gql_error(
                Code::RateLimited,
                "rate limit exceeded; slow down",
            ));
        }
        let too_many = |what: &str| {
            use async_graphql::ErrorExtensions;
            async_graphql::Error::new(format!("too many open subscriptions {what}; end one first"))
                .extend_with(|_, x| x.set("code", TOO_MANY_SUBSCRIPTIONS))
        };
        let prev = self.open.fetch_add(1, Ordering::SeqCst);
        if prev >= self.max_open {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Err(too_many("on this connection"));
        }
        if !self.slots.acquire(viewer) {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Err(too_many("for this viewer"));
        }
        let permit = Permit {
            conn: self.clone(),
            viewer,
        };
        if !self.still_authenticated().await {
            return Err(gql_error(
                Code::Unauthenticated,
                "the session ended or the API token was revoked",
            ));
        }
        Ok(permit)
    }

    /// `stream`, ended with `UNAUTHENTICATED` once the connection's
    /// credential no longer authenticates its viewer (checked every
    /// `recheck`). A failed check (database trouble) is logged and retried:
    /// the hub ends subscriptions itself when the database is unavailable.
    pub fn guard<T, S>(
        self: &Arc<Self>,
        stream: S,
        permit: Permit,
    ) -> impl Stream<Item = async_graphql::Result<T>> + Send + use<T, S>
    where
        T: Send + 'static,
        S: Stream<Item = async_graphql::Result<T>> + Send + 'static,
    {
        struct St<S> {
            inner: Pin<Box<S>>,
            every: tokio::time::Interval,
            conn: Arc<Connection>,
            _permit: Permit,
            done: bool,
        }
        let start = tokio::time::Instant::now() + self.recheck;
        let mut every = tokio::time::interval_at(start, self.recheck);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let st = St {
            inner: Box::pin(stream),
            every,
            conn: self.clone(),
            _permit: permit,
            done: false,
        };
        futures::stream::unfold(st, |mut st| async move {
            if st.done {
                return None;
            }
            loop {
                tokio::select! {
                    item = st.inner.next() => {
                        let item = item?;
                        if item.is_err() {
                            st.done = true;
                        }
                        return Some((item, st));
                    }
                    _ = st.every.tick() => {
                        if !st.conn.still_authenticated().await {
                            st.done = true;
                            let err = gql_error(
                                Code::Unauthenticated,
                                "the session ended or the API token was revoked",
                            );
                            return Some((Err(err), st));
                        }
                    }
                }
            }
        })
    }

    async fn still_authenticated(&self) -> bool {
        let (Some(viewer), Some(credential)) = (self.viewer, &self.credential) else {
            return false;
        };
        if self.revoked.load(Ordering::SeqCst) {
            return false;
        }
        let fresh = self
            .checked_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < self.recheck / 2);
        if fresh {
            return true;
        }
        match credential.still_valid(&self.db, viewer.user_id).await {
            Ok(true) => {
                *self.checked_at.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(tokio::time::Instant::now());
                true
            }
            Ok(false) => {
                self.revoked.store(true, Ordering::SeqCst);
                false
            }
            Err(e) => {
                tracing::warn!(
                    viewer = viewer.user_id,
                    error = %crate::error::error_chain(e.as_ref()),
                    "re-checking a subscription's credential failed; retrying"
                );
                true
            }
        }
    }
}
