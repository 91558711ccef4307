//! Role-scoped transactions.
//!
//! The process connects with whatever `DATABASE_URL` gives it (often a superuser
//! on hosted platforms). Every transaction therefore switches, transaction-locally,
//! to a role that RLS applies to, before running a single query:
//!
//! - [`ViewerTx`]: `observer_api` plus `observer.viewer_id`; the database decides
//!   what the viewer may read.
//! - [`WorkerTx`]: `observer_worker`; writes ingest data.
//! - [`AuthTx`]: `observer_auth`; the API's trusted login path (users, OAuth
//!   tokens, memberships fetched with the viewer's own OAuth token, API-token lookup).
//! - [`FanoutTx`]: `observer_fanout`; read-only and viewer-less, for live fan-out,
//!   which reads each new event once and filters per subscriber in memory with
//!   [`crate::access`].
//!
//! Two exceptions, each a connection of its own that is never pooled and runs
//! as one role for its whole session, so the hot path is one statement and
//! one round trip: [`FanoutConn`] (`observer_fanout`, read only), the
//! fan-out reader's, and [`WorkerConn`] (`observer_worker`), the ingest
//! writer's.
//!
//! `set_config(.., true)` is transaction-local, so a pooled connection never
//! carries a role or viewer into the next transaction. After commit the setting
//! reads as `''`, which the policies treat as "no viewer".

use std::ops::{Deref, DerefMut};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::Result;

/// Role names, fixed here and in policies/.
pub const ROLE_API: &str = "observer_api";
pub const ROLE_WORKER: &str = "observer_worker";
pub const ROLE_AUTH: &str = "observer_auth";
pub const ROLE_FANOUT: &str = "observer_fanout";

/// The GUC that carries the viewer's Discord user id.
pub const VIEWER_SETTING: &str = "observer.viewer_id";

/// A handle on the connection pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Db {
    pool: PgPool,
}

impl Db {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Connects a pool to `url`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let opts: PgConnectOptions = url.parse()?;
        let pool = pool_options(max_connections).connect_with(opts).await?;
        Ok(Self { pool })
    }

    /// A second pool to the same database, opening its connections lazily
    /// where it is first used: a connection's socket is driven by the
    /// runtime that opened it, so a task on its own runtime (the API's
    /// fan-out reader) gets connections of its own rather than ones whose
    /// readiness waits for a busy runtime to look.
    pub fn sibling(&self, max_connections: u32) -> Self {
        let pool =
            pool_options(max_connections).connect_lazy_with((*self.pool.connect_options()).clone());
        Self { pool }
    }

    /// The raw pool, for the few things that manage their own connections
    /// (LISTEN, the session store, migrations). Never for tenant data.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Begins a transaction as `observer_api` acting for `viewer_id`.
    pub async fn viewer(&self, viewer_id: i64) -> Result<ViewerTx> {
        // An i64 rendered by us: nothing from outside reaches this text.
        Ok(ViewerTx(
            self.begin_with(format!(
                "begin; select set_config('role', '{ROLE_API}', true), \
                 set_config('{VIEWER_SETTING}', '{viewer_id}', true)"
            ))
            .await?,
        ))
    }

    /// Begins a transaction as `observer_worker`.
    pub async fn worker(&self) -> Result<WorkerTx> {
        Ok(WorkerTx(self.begin_as("begin", ROLE_WORKER).await?))
    }

    /// Begins a transaction as `observer_auth`.
    pub async fn auth(&self) -> Result<AuthTx> {
        Ok(AuthTx(self.begin_as("begin", ROLE_AUTH).await?))
    }

    /// Begins a read-only transaction as `observer_fanout` (no viewer: the caller
    /// filters with [`crate::access`] before anything reaches a subscriber).
    /// Grants already make the role read-only; `read only` makes a slip fail
    /// loudly even on a database where an operator granted it more.
    pub async fn fanout(&self) -> Result<FanoutTx> {
        Ok(FanoutTx(
            self.begin_as("begin read only", ROLE_FANOUT).await?,
        ))
    }

    /// Opens a connection of its own (not from the pool) that runs as
    /// `observer_fanout`, read only, for its whole session: each read on it is
    /// a single autocommit statement, with no `begin`, role switch or
    /// `commit` around it. The session role cannot leak to anyone: the
    /// connection is never pooled and closes when dropped.
    pub async fn fanout_conn(&self) -> Result<FanoutConn> {
        Ok(FanoutConn(self.session_as(ROLE_FANOUT, true).await?))
    }

    /// Opens the ingest writer's own connection (not from the pool), running
    /// as `observer_worker` for its whole session, so a batch of new
    /// messages can be one autocommit statement
    /// ([`crate::ingest::write_batch_on`]).
    pub async fn worker_conn(&self) -> Result<WorkerConn> {
        Ok(WorkerConn(self.session_as(ROLE_WORKER, false).await?))
    }

    async fn session_as(&self, role: &'static str, read_only: bool) -> Result<PgConnection> {
        let options = self.pool.connect_options();
        // Bounded like the pool's acquire: an unreachable server must fail
        // the caller's attempt (which retries) rather than hang it.
        let connecting = sqlx::Connection::connect_with(options.as_ref());
        let mut conn: PgConnection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting to PostgreSQL timed out",
                ))
            })??;
        // Once per connection: plain statements (a multi-statement `raw_sql`
        // future is not `Send` enough for the tasks that hold these).
        if read_only {
            sqlx::query!("set session characteristics as transaction read only")
                .execute(&mut conn)
                .await?;
        }
        sqlx::query!("select set_config('role', $1, false)", role)
            .fetch_one(&mut conn)
            .await?;
        Ok(conn)
    }

    async fn begin_as(
        &self,
        begin: &str,
        role: &'static str,
    ) -> Result<Transaction<'static, Postgres>> {
        self.begin_with(format!(
            "{begin}; select set_config('role', '{role}', true)"
        ))
        .await
    }

    /// Begins with `statements` (a `begin` and the role switch, constants and
    /// numbers only) sent as one simple query: one round trip instead of one
    /// per statement. Under load every round trip waits for a CPU on both
    /// sides, so this is latency on every live event and every request.
    async fn begin_with(&self, statements: String) -> Result<Transaction<'static, Postgres>> {
        // dynamic: several statements in one simple query, which the macros cannot describe.
        Ok(self.pool.begin_with(statements).await?)
    }
}

/// How long getting a connection may take, pooled or not.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
}

macro_rules! role_tx {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name(Transaction<'static, Postgres>);

        impl $name {
            pub async fn commit(self) -> Result<()> {
                self.0.commit().await?;
                Ok(())
            }
            pub async fn rollback(self) -> Result<()> {
                self.0.rollback().await?;
                Ok(())
            }
        }

        impl Deref for $name {
            type Target = PgConnection;
            fn deref(&self) -> &PgConnection {
                &self.0
            }
        }

        impl DerefMut for $name {
            fn deref_mut(&mut self) -> &mut PgConnection {
                &mut self.0
            }
        }
    };
}

role_tx!(
    /// A transaction running as `observer_api` with a viewer set: RLS decides every read.
    ViewerTx
);
role_tx!(
    /// A transaction running as `observer_worker` (ingest writes).
    WorkerTx
);
role_tx!(
    /// A transaction running as `observer_auth` (login path, token lookup).
    AuthTx
);
role_tx!(
    /// A read-only transaction running as `observer_fanout` (live fan-out).
    FanoutTx
);

/// The ingest writer's own session as `observer_worker` (see
/// [`Db::worker_conn`]).
pub struct WorkerConn(PgConnection);

impl WorkerConn {
    /// The session itself, for single autocommit statements.
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        &mut self.0
    }

    /// A transaction on the session (still as `observer_worker`).
    pub(crate) async fn begin(&mut self) -> Result<Transaction<'_, Postgres>> {
        Ok(sqlx::Connection::begin(&mut self.0).await?)
    }

    /// Closes the connection cleanly.
    pub async fn close(self) -> Result<()> {
        sqlx::Connection::close(self.0).await?;
        Ok(())
    }
}

/// The fan-out reader's own session as `observer_fanout`, read only (see
/// [`Db::fanout_conn`]).
pub struct FanoutConn(PgConnection);

impl FanoutConn {
    /// Closes the connection cleanly.
    pub async fn close(self) -> Result<()> {
        sqlx::Connection::close(self.0).await?;
        Ok(())
    }
}

/// Where fan-out reads may run: a [`FanoutTx`] or a [`FanoutConn`], both as
/// `observer_fanout` and read only.
pub trait FanoutRead: DerefMut<Target = PgConnection> + Send {}

impl FanoutRead for FanoutTx {}
impl FanoutRead for FanoutConn {}

impl Deref for FanoutConn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.0
    }
}

impl DerefMut for FanoutConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.0
    }
}
