//! One subscriber's side: the bounded receiver, the replay of `(after, H]`
//! through RLS on resume, and the stream GraphQL consumes.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock, Weak};

use super::state::{EndReason, Inner};
use super::{HashMap, LiveError, LiveEvent};
use observer_db::events::{self, Cursor, EventRow, Scope};
use observer_db::viewer::RevisionRow;
use observer_db::Db;
use tokio::sync::mpsc;

/// Unregisters its subscription when the stream is dropped.
pub(super) struct SubGuard {
    pub(super) inner: Weak<Inner>,
    pub(super) id: u64,
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
    pub(super) guard: SubGuard,
    pub(super) db: Db,
    pub(super) viewer: i64,
    pub(super) scope: Scope,
    pub(super) replay_from: Option<Cursor>,
    pub(super) replay_upto: Cursor,
    pub(super) replay_page: i64,
    pub(super) replay_buf: VecDeque<Arc<LiveEvent>>,
    pub(super) rx: mpsc::Receiver<Arc<LiveEvent>>,
    pub(super) end: Arc<OnceLock<EndReason>>,
    /// Live events at or below this were replayed (or predate the subscription).
    pub(super) floor: Cursor,
    /// Where a client resumes after an error: the last event handed out, else
    /// where the subscription started.
    pub(super) resume_from: Cursor,
    pub(super) done: bool,
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
    pub(super) fn live_only(&self) -> bool {
        self.replay_from.is_none() && self.replay_buf.is_empty()
    }

    /// The next live event (or the error that ends the subscription),
    /// without a future: the per-delivery path.
    pub(super) fn poll_live(
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

    pub(super) async fn replay(&self, from: Cursor) -> observer_db::Result<Vec<Arc<LiveEvent>>> {
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

pub(super) type Item = Result<Arc<LiveEvent>, LiveError>;

/// [`Subscription::into_stream`]: live events are polled straight from the
/// subscriber's buffer (no future per event); while a replay is in progress,
/// [`Subscription::next`] runs as a future that owns the subscription.
pub(super) struct SubscriptionStream {
    pub(super) sub: Option<Box<Subscription>>,
    pub(super) replaying:
        Option<futures::future::BoxFuture<'static, (Box<Subscription>, Option<Item>)>>,
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

pub(super) fn attach(rows: Vec<EventRow>, revisions: Vec<RevisionRow>) -> Vec<Arc<LiveEvent>> {
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
