//! A WebSocket connection's side of live subscriptions: who it authenticated
//! as and with what (so logout and API-token revocation end its
//! subscriptions), the rate limit and caps on starting subscriptions, and the
//! stream wrapper that ends a subscription once its credential is gone.
//!
//! Credentials are re-checked by one [`Rechecker`] per process: every
//! `auth_recheck` it checks the credentials of all connections with open
//! subscriptions in two queries (sessions, API tokens), whatever their number,
//! and wakes the subscriptions of those that failed. A subscription itself
//! only reads a flag per event.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use futures::Stream;
use observer_db::Db;
use tower_sessions::session::Id;

use crate::error::{gql_error, Code};
use crate::ratelimit::{RateKey, RateLimiter};
use crate::viewer::Viewer;

/// `extensions.code` of a subscription refused because the connection or the
/// viewer already has as many open as allowed.
pub const TOO_MANY_SUBSCRIPTIONS: &str = Code::TooManySubscriptions.as_str();

/// What authenticated a connection, kept so it can be checked again.
#[derive(Clone, Debug)]
pub enum Credential {
    /// The login session whose cookie came with the upgrade (logout deletes it).
    Session(Id),
    /// The hash of the API token (upgrade header or `connection_init`).
    Token(Vec<u8>),
}

impl Credential {
    /// Which of `creds` (each with the user it authenticated) still
    /// authenticate that user: at most two queries, whatever their number.
    /// Logout deletes a session, login rotates its id and an idle one
    /// expires — each makes it missing here; a revoked token is missing too.
    async fn still_valid(db: &Db, creds: &[(&Credential, i64)]) -> anyhow::Result<Vec<bool>> {
        let mut sessions: Vec<String> = Vec::new();
        let mut hashes: Vec<Vec<u8>> = Vec::new();
        for (c, _) in creds {
            match c {
                Credential::Session(id) => sessions.push(id.to_string()),
                Credential::Token(h) => hashes.push(h.clone()),
            }
        }
        let live_sessions: HashSet<String> = if sessions.is_empty() {
            HashSet::new()
        } else {
            observer_db::auth::live_sessions(db.pool(), &sessions)
                .await?
                .into_iter()
                .collect()
        };
        let live_tokens: HashMap<Vec<u8>, i64> = if hashes.is_empty() {
            HashMap::new()
        } else {
            let mut tx = db.auth().await?;
            let rows = observer_db::auth::live_api_tokens(&mut tx, &hashes).await?;
            tx.commit().await?;
            rows.into_iter().collect()
        };
        Ok(creds
            .iter()
            .map(|(c, user_id)| match c {
                Credential::Session(id) => live_sessions.contains(&id.to_string()),
                Credential::Token(h) => live_tokens.get(h) == Some(user_id),
            })
            .collect())
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
    /// When the credential last checked out (a new subscription within half
    /// an interval of it needs no query of its own).
    checked_at: Mutex<Option<tokio::time::Instant>>,
    /// The credential failed once: it never comes back.
    revoked: AtomicBool,
    /// The running subscriptions' wakers, woken when the credential fails.
    wakers: Mutex<Vec<Weak<AtomicWaker>>>,
    rechecker: Rechecker,
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
    pub rechecker: Rechecker,
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
            wakers: Mutex::new(Vec::new()),
            rechecker: limits.rechecker,
        }
    }

    /// Marks the credential failed and wakes every running subscription so
    /// each ends with `UNAUTHENTICATED`.
    fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in wakers.iter().filter_map(Weak::upgrade) {
            w.wake();
        }
    }

    fn revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    fn has_subscriptions(&self) -> bool {
        self.open.load(Ordering::SeqCst) > 0
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
        self.rechecker.track(self);
        if !self.still_authenticated().await {
            return Err(gql_error(
                Code::Unauthenticated,
                "the session ended or the API token was revoked",
            ));
        }
        Ok(permit)
    }

    /// `stream`, ended with `UNAUTHENTICATED` as soon as the connection's
    /// credential is found to no longer authenticate its viewer (by the
    /// process's [`Rechecker`]): no event is handed out after that.
    pub fn guard<T, S>(
        self: &Arc<Self>,
        stream: S,
        permit: Permit,
    ) -> impl Stream<Item = async_graphql::Result<T>> + Send + use<T, S>
    where
        T: Send + 'static,
        S: Stream<Item = async_graphql::Result<T>> + Send + 'static,
    {
        let waker = Arc::new(AtomicWaker::new());
        {
            let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
            wakers.retain(|w| w.strong_count() > 0);
            wakers.push(Arc::downgrade(&waker));
        }
        Guarded {
            inner: Box::pin(stream),
            conn: self.clone(),
            waker,
            registered: None,
            _permit: permit,
            done: false,
        }
    }

    async fn still_authenticated(&self) -> bool {
        let (Some(viewer), Some(credential)) = (self.viewer, &self.credential) else {
            return false;
        };
        if self.revoked() {
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
        let valid = Credential::still_valid(&self.db, &[(credential, viewer.user_id)]).await;
        match valid.map(|v| v.first().copied().unwrap_or(false)) {
            Ok(true) => {
                *self.checked_at.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(tokio::time::Instant::now());
                true
            }
            Ok(false) => {
                self.revoke();
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

fn credential_gone() -> async_graphql::Error {
    gql_error(
        Code::Unauthenticated,
        "the session ended or the API token was revoked",
    )
}

/// A subscription's stream behind its connection's credential.
struct Guarded<S> {
    inner: Pin<Box<S>>,
    conn: Arc<Connection>,
    waker: Arc<AtomicWaker>,
    /// The waker last given to `waker`.
    registered: Option<std::task::Waker>,
    _permit: Permit,
    done: bool,
}

impl<T, S> Stream for Guarded<S>
where
    S: Stream<Item = async_graphql::Result<T>>,
{
    type Item = async_graphql::Result<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.conn.revoked() {
            this.done = true;
            return Poll::Ready(Some(Err(credential_gone())));
        }
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(item)) => {
                this.done = item.is_err();
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                // Registering is an atomic swap and a waker clone: skip it
                // while the task's waker stays the same (it does, per event).
                if !this
                    .registered
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    this.waker.register(cx.waker());
                    this.registered = Some(cx.waker().clone());
                }
                // A revocation between the check above and the registration
                // woke nobody: look again.
                if this.conn.revoked() {
                    this.done = true;
                    return Poll::Ready(Some(Err(credential_gone())));
                }
                Poll::Pending
            }
        }
    }
}

/// Re-checks the credentials of every connection with open subscriptions,
/// in two queries per interval. Cheap to clone; its task starts with the
/// first subscription and stops when the application state is dropped.
#[derive(Clone)]
pub struct Rechecker {
    inner: Arc<RecheckInner>,
}

struct RecheckInner {
    db: Db,
    every: Duration,
    conns: Mutex<Vec<Weak<Connection>>>,
    started: AtomicBool,
}

impl std::fmt::Debug for Rechecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rechecker")
    }
}

impl Rechecker {
    pub fn new(db: Db, every: Duration) -> Self {
        Self {
            inner: Arc::new(RecheckInner {
                db,
                every: every.max(Duration::from_millis(100)),
                conns: Mutex::new(Vec::new()),
                started: AtomicBool::new(false),
            }),
        }
    }

    /// Includes `conn` in the checks (once; it leaves when dropped).
    fn track(&self, conn: &Arc<Connection>) {
        {
            let mut conns = self.inner.conns.lock().unwrap_or_else(|p| p.into_inner());
            if !conns
                .iter()
                .any(|c| std::ptr::eq(c.as_ptr(), Arc::as_ptr(conn)))
            {
                conns.retain(|c| c.strong_count() > 0);
                conns.push(Arc::downgrade(conn));
            }
        }
        if !self.inner.started.swap(true, Ordering::SeqCst) {
            tokio::spawn(recheck_loop(Arc::downgrade(&self.inner)));
        }
    }
}

async fn recheck_loop(weak: Weak<RecheckInner>) {
    let every = match weak.upgrade() {
        Some(inner) => inner.every,
        None => return,
    };
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        if let Err(e) = inner.check_all().await {
            // Database trouble is not a revoked credential: keep serving and
            // try again next interval (the hub ends subscriptions itself when
            // the database is gone for good).
            tracing::warn!(
                error = %crate::error::error_chain(e.as_ref()),
                "re-checking subscription credentials failed; retrying"
            );
        }
    }
}

impl RecheckInner {
    async fn check_all(&self) -> anyhow::Result<()> {
        let conns: Vec<Arc<Connection>> = {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.retain(|c| c.strong_count() > 0);
            conns.iter().filter_map(Weak::upgrade).collect()
        };
        let conns: Vec<Arc<Connection>> = conns
            .into_iter()
            .filter(|c| c.has_subscriptions() && !c.revoked())
            .collect();
        if conns.is_empty() {
            return Ok(());
        }
        // Connections without a viewer or credential never pass.
        let creds: Vec<(&Credential, i64)> = conns
            .iter()
            .filter_map(|c| Some((c.credential.as_ref()?, c.viewer?.user_id)))
            .collect();
        let mut valid = Credential::still_valid(&self.db, &creds).await?.into_iter();
        let now = tokio::time::Instant::now();
        for c in &conns {
            let has = c.credential.is_some() && c.viewer.is_some();
            if has && valid.next().unwrap_or(false) {
                *c.checked_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
            } else {
                c.revoke();
            }
        }
        Ok(())
    }
}
