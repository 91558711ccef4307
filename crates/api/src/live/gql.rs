//! The GraphQL face of live fan-out: hub events become `MessageEvent`s,
//! cursors travel opaque, and the ways a subscription ends become
//! `extensions.code`s a client can act on.
//!
//! Rendering is shared: an event's `MessageEvent` value depends only on the
//! event (the hub gives viewers without READ_MESSAGE_HISTORY their own copy
//! without revisions) and on the subscription's query document and
//! variables — no field under `MessageEvent` reads the viewer or the
//! database. So the first subscriber with a given [`SelectionKey`] resolves
//! and serialises it and every other one reuses that JSON ([`Renders`],
//! [`Lane`]): per delivery, what is left is splicing it into a frame.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll};

use async_graphql::parser::types::Field;
use async_graphql::registry::Registry;
use async_graphql::{ContextSelectionSet, ErrorExtensions, OutputType, Positioned, ServerResult};
use futures::stream::BoxStream;
use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};
use observer_db::events::EventKind;

use super::hub::{LiveError, LiveEvent};
pub use super::render::{Renders, SelectionKey, MAX_RENDERS};
use crate::error::{gql_error, Code};
use crate::graphql::types::{Message, MessageEvent, MessageEventKind, Revision};

/// `extensions.code` of a subscription ended because its buffer overflowed;
/// `extensions.lastCursor` is where to resume (`after`).
pub const SLOW_CONSUMER: &str = Code::SlowConsumer.as_str();
/// `extensions.code` of a subscription the server could not (keep) serving;
/// resume from `extensions.lastCursor` when present.
pub const UNAVAILABLE: &str = Code::Unavailable.as_str();

pub use crate::graphql::types::cursor::{event as format_cursor, parse_event as parse_cursor};

pub fn to_message_event(ev: &LiveEvent) -> MessageEvent {
    let mut message = Message::from(ev.row.message.clone());
    message.preloaded_revisions = Some(ev.revisions.iter().cloned().map(Revision::from).collect());
    MessageEvent {
        kind: match ev.row.kind {
            EventKind::Created => MessageEventKind::Created,
            EventKind::Updated => MessageEventKind::Updated,
            EventKind::Deleted => MessageEventKind::Deleted,
        },
        cursor: format_cursor(ev.row.cursor),
        message,
    }
}

/// A hub event on its way to one subscriber: a `MessageEvent` to GraphQL,
/// resolved once per [`SelectionKey`].
pub struct LiveMessageEvent {
    pub event: Arc<LiveEvent>,
    pub key: SelectionKey,
}

impl OutputType for LiveMessageEvent {
    fn type_name() -> Cow<'static, str> {
        <MessageEvent as OutputType>::type_name()
    }

    fn create_type_info(registry: &mut Registry) -> String {
        <MessageEvent as OutputType>::create_type_info(registry)
    }

    async fn resolve(
        &self,
        ctx: &ContextSelectionSet<'_>,
        field: &Positioned<Field>,
    ) -> ServerResult<async_graphql::Value> {
        if let Some(v) = self.event.renders.value(&self.key) {
            return Ok(v);
        }
        let v = OutputType::resolve(&to_message_event(&self.event), ctx, field).await?;
        self.event.renders.put(self.key, &v);
        Ok(v)
    }
}

type EventStream = BoxStream<'static, async_graphql::Result<LiveMessageEvent>>;

/// One subscription's bypass around GraphQL execution, shared by the
/// WebSocket loop (which puts it in the request's data) and the
/// `messageEvents` resolver (which hands it the subscription's event
/// stream, see [`Lane::attach`]).
///
/// The loop then polls that stream itself: an event already rendered for
/// the subscription's selection becomes a frame at once (its JSON spliced
/// in); any other item — the first rendering of an event for this
/// selection, or an error that ends the subscription — goes through the
/// [`Lane::slot`] to the execution stream, which async-graphql resolves as
/// usual, and the loop waits for that response before it takes the next
/// event. One item at a time either way, so frames keep the events' order.
#[derive(Default)]
pub struct Lane {
    key: OnceLock<String>,
    source: Mutex<Source>,
    slot: Mutex<Option<async_graphql::Result<LiveMessageEvent>>>,
    /// Execution polls the [`SlotStream`] from inside its own combinators,
    /// which poll a stream again only once it woke them.
    slot_waker: AtomicWaker,
}

/// Where a lane's event stream is.
#[derive(Default)]
enum Source {
    /// The resolver has not handed it over (yet, or ever: not a subscription).
    #[default]
    Waiting,
    Attached(EventStream),
    /// It ended: so does the execution stream.
    Ended,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("key", &self.key.get())
            .finish()
    }
}

/// What the loop got from a lane's event stream.
pub enum LaneItem {
    /// A pre-rendered event: its JSON, to go under [`Lane::key`].
    Rendered(Arc<str>),
    /// Handed to execution (through the slot): poll the execution stream.
    Executing,
    /// The event stream ended: the execution stream ends too.
    Ended,
}

impl Lane {
    /// The response key (alias) pre-rendered events go under.
    pub fn key(&self) -> Option<&str> {
        self.key.get().map(String::as_str)
    }

    /// Whether the resolver handed over the event stream.
    pub fn attached(&self) -> bool {
        !matches!(*lock(&self.source), Source::Waiting)
    }

    /// Called by the resolver: takes `events` for the loop to poll and
    /// returns the stream GraphQL execution polls instead. Only the
    /// operation's first subscription field gets the lane (it carries one
    /// response key); for `lane` None or any other field, `events` itself.
    pub fn attach<S>(lane: Option<&Arc<Lane>>, events: S, response_key: &str) -> EventStream
    where
        S: Stream<Item = async_graphql::Result<LiveMessageEvent>> + Send + 'static,
    {
        match lane {
            Some(l) if l.key.set(response_key.to_owned()).is_ok() => {
                *lock(&l.source) = Source::Attached(events.boxed());
                SlotStream(Arc::clone(l)).boxed()
            }
            _ => events.boxed(),
        }
    }

    /// Polls the event stream for the next item. Registers the caller's
    /// waker with it when there is none.
    pub fn poll_next(&self, cx: &mut TaskContext<'_>) -> Poll<LaneItem> {
        let mut source = lock(&self.source);
        let Source::Attached(events) = &mut *source else {
            return Poll::Ready(LaneItem::Ended);
        };
        match events.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(ev))) => match ev.event.renders.json(&ev.key) {
                Some(json) => Poll::Ready(LaneItem::Rendered(json)),
                None => {
                    *lock(&self.slot) = Some(Ok(ev));
                    self.slot_waker.wake();
                    Poll::Ready(LaneItem::Executing)
                }
            },
            Poll::Ready(Some(Err(e))) => {
                *lock(&self.slot) = Some(Err(e));
                self.slot_waker.wake();
                Poll::Ready(LaneItem::Executing)
            }
            Poll::Ready(None) => {
                *source = Source::Ended;
                drop(source);
                self.slot_waker.wake();
                Poll::Ready(LaneItem::Ended)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data: usable after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What GraphQL execution polls for a laned subscription: the items the
/// loop hands over.
struct SlotStream(Arc<Lane>);

impl SlotStream {
    fn ready(&self) -> Option<Option<async_graphql::Result<LiveMessageEvent>>> {
        if let Some(item) = lock(&self.0.slot).take() {
            return Some(Some(item));
        }
        matches!(*lock(&self.0.source), Source::Ended).then_some(None)
    }
}

impl Stream for SlotStream {
    type Item = async_graphql::Result<LiveMessageEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        if let Some(r) = self.ready() {
            return Poll::Ready(r);
        }
        self.0.slot_waker.register(cx.waker());
        // Filled between the look and the registration: no wake came.
        match self.ready() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}

/// The error a client sees when its subscription ends or cannot start.
pub fn to_error(e: &LiveError) -> async_graphql::Error {
    match e {
        LiveError::Forbidden => gql_error(
            Code::Forbidden,
            "nothing in this subscription's scope is visible",
        ),
        LiveError::SlowConsumer { resume_from } => {
            let last = format_cursor(*resume_from);
            async_graphql::Error::new(
                "subscriber too slow: events were dropped; resubscribe with after = lastCursor",
            )
            .extend_with(|_, x| {
                x.set("code", SLOW_CONSUMER);
                x.set("lastCursor", last.clone());
            })
        }
        LiveError::Unavailable { resume_from } => {
            let last = resume_from.map(format_cursor);
            async_graphql::Error::new("live events are unavailable; resubscribe shortly")
                .extend_with(|_, x| {
                    x.set("code", UNAVAILABLE);
                    if let Some(l) = &last {
                        x.set("lastCursor", l.clone());
                    }
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graphql::types::cursor;
    use observer_db::events::Cursor;

    #[test]
    fn selection_keys_depend_on_exactly_the_request_text_name_and_variables() {
        let q = "subscription($c: [ID!]) { messageEvents(channelIds: $c) { cursor } }";
        let vars =
            |json: &str| -> serde_json::Value { serde_json::from_str(json).unwrap_or_default() };
        let key =
            |q: &str, name: Option<&str>, v: &str| SelectionKey::of_request(q, name, &vars(v));
        let base = key(q, None, r#"{"c": ["1"], "x": {"b": 1, "a": 2}}"#);
        // Key order is not a difference.
        assert_eq!(base, key(q, None, r#"{"x": {"a": 2, "b": 1}, "c": ["1"]}"#));
        // Anything that can change the rendering is.
        assert_ne!(base, key(q, None, r#"{"c": ["2"], "x": {"b": 1, "a": 2}}"#));
        assert_ne!(
            base,
            key(q, None, r#"{"c": ["1"], "x": {"b": 1, "a": "2"}}"#)
        );
        assert_ne!(
            base,
            key(q, Some(""), r#"{"c": ["1"], "x": {"b": 1, "a": 2}}"#)
        );
        assert_ne!(
            base,
            key(
                &q.replace("cursor", "kind"),
                None,
                r#"{"c": ["1"], "x": {"b": 1, "a": 2}}"#
            )
        );
        // Text and name are not confused with one another.
        assert_ne!(key("a", Some("b"), "{}"), key("ab", None, "{}"));
    }

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let c = Cursor::new(812, 33);
        assert_eq!(parse_cursor(&format_cursor(c)), Some(c));
        assert_eq!(
            parse_cursor(&format_cursor(Cursor::new(0, -1))),
            Some(Cursor::new(0, -1))
        );
        for bad in [
            "",
            "e1:1:2",
            "!!",
            &cursor::opaque("e1:-1:2"),
            &cursor::opaque("h1:5"),
        ] {
            assert_eq!(parse_cursor(bad), None, "{bad}");
        }
    }

    #[test]
    fn errors_tell_the_client_what_to_do() {
        let ext = |e: &LiveError| {
            let err = to_error(e).into_server_error(async_graphql::Pos::default());
            serde_json::to_value(err.extensions).unwrap_or_default()
        };
        let c = Cursor::new(9, 4);
        let slow = ext(&LiveError::SlowConsumer { resume_from: c });
        assert_eq!(slow["code"], SLOW_CONSUMER);
        assert_eq!(slow["lastCursor"], format_cursor(c));
        assert_eq!(ext(&LiveError::Forbidden)["code"], "FORBIDDEN");
        let down = ext(&LiveError::Unavailable { resume_from: None });
        assert_eq!(down["code"], UNAVAILABLE);
        assert!(down.get("lastCursor").is_none());
    }

    /// The lock-free first slot and the locked rest hold one rendering per
    /// selection, the first one put wins, and at most MAX_RENDERS are kept.
    #[test]
    fn renders_keep_one_per_selection_up_to_the_bound() {
        let r = Renders::default();
        let v = |n: u64| async_graphql::Value::from(n);
        assert!(r.json(&SelectionKey::fixed(0)).is_none());
        for b in 0..(MAX_RENDERS as u8 + 3) {
            r.put(SelectionKey::fixed(b), &v(u64::from(b)));
            // A second rendering of the same selection does not replace it.
            r.put(SelectionKey::fixed(b), &v(999));
        }
        for b in 0..(MAX_RENDERS as u8 + 3) {
            let got = r.json(&SelectionKey::fixed(b));
            if usize::from(b) < MAX_RENDERS {
                assert_eq!(got.as_deref(), Some(b.to_string().as_str()), "key {b}");
                assert_eq!(r.value(&SelectionKey::fixed(b)), Some(v(u64::from(b))));
            } else {
                assert!(got.is_none(), "key {b} is past the bound");
            }
        }
    }
}
