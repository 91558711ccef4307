//! The one `observer_api` transaction a request runs in, and the helpers
//! every resolver uses to reach it.

use std::sync::atomic::{AtomicBool, Ordering};

use async_graphql::Context;
use observer_db::{Db, ViewerTx};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use crate::error::{internal, unauthenticated, GqlResult};
use crate::viewer::Viewer;

/// Per-request database access: a single `observer_api` transaction with the
/// viewer set, opened lazily by the first field that needs it and finished by
/// the HTTP handler. Sibling fields resolve concurrently, so the transaction is
/// behind a mutex.
pub struct RequestDb {
    db: Db,
    viewer: Option<Viewer>,
    tx: Mutex<Option<ViewerTx>>,
    rollback: AtomicBool,
}

impl RequestDb {
    pub fn new(db: Db, viewer: Option<Viewer>) -> Self {
        Self {
            db,
            viewer,
            tx: Mutex::new(None),
            rollback: AtomicBool::new(false),
        }
    }

    pub fn viewer(&self) -> GqlResult<Viewer> {
        self.viewer.ok_or_else(unauthenticated)
    }

    /// The request's transaction, begun on first use.
    pub async fn tx(&self) -> GqlResult<MappedMutexGuard<'_, ViewerTx>> {
        let viewer = self.viewer()?;
        let mut guard = self.tx.lock().await;
        if guard.is_none() {
            let tx = self
                .db
                .viewer(viewer.user_id)
                .await
                .map_err(|e| internal(&e))?;
            *guard = Some(tx);
        }
        MutexGuard::try_map(guard, |slot| slot.as_mut())
            .map_err(|_| internal(&std::io::Error::other("request transaction vanished")))
    }

    /// Makes [`finish`](Self::finish) roll back instead of committing (a
    /// mutation found its own result unacceptable).
    pub fn mark_rollback(&self) {
        self.rollback.store(true, Ordering::SeqCst);
    }

    /// Commits (or rolls back) the transaction, if one was opened.
    pub async fn finish(&self) -> Result<(), observer_db::Error> {
        let tx = self.tx.lock().await.take();
        match tx {
            Some(tx) if self.rollback.load(Ordering::SeqCst) => tx.rollback().await,
            Some(tx) => tx.commit().await,
            None => Ok(()),
        }
    }
}

/// Shorthand used by resolvers.
pub(crate) fn request_db<'a>(ctx: &Context<'a>) -> GqlResult<&'a RequestDb> {
    ctx.data::<std::sync::Arc<RequestDb>>()
        .map(|a| a.as_ref())
        .map_err(|_| internal(&std::io::Error::other("RequestDb missing from context")))
}

/// Parses a snowflake `ID`. `None` for anything that cannot be a Discord id:
/// callers answer it exactly like an id that does not exist.
pub(crate) fn parse_id(id: &async_graphql::ID) -> Option<i64> {
    id.as_str().parse::<i64>().ok().filter(|v| *v > 0)
}
