//! The GraphQL WebSocket: both protocols (`graphql-transport-ws`, legacy
//! `graphql-ws`), spoken here rather than by async-graphql's `WebSocket`, for
//! three reasons:
//!
//! - **Pre-rendered events** ([`Lane`]): a live event is resolved and
//!   serialised once per selection ([`super::render::Renders`]); every other
//!   subscriber with that selection gets the same JSON text spliced into its
//!   own frame, without going through GraphQL execution, a `Response` and
//!   serde for each delivery (about a quarter of the API's CPU at 1,000
//!   subscribers before).
//! - **Bursts**: frames that are ready together are written with one flush
//!   (one `send`), so the cost per frame falls as the hub's batches grow.
//! - **Protocol edges** as the `graphql-transport-ws` spec has them: 4400 for
//!   a malformed message, 4401 for a subscribe before the ack, 4403 when
//!   `connection_init` is refused (1013 when rate limited and 1011 on our own
//!   failure: retry later), 4408 when it does not come in time, 4409 for a
//!   reused id, 4429 for a second init; plus a keepalive (WebSocket ping, and
//!   `ka` on the legacy protocol) so proxies do not cut quiet subscriptions.
//!
//! Ordering: the loop takes a subscription's events from its lane one at a
//! time; an event with no rendering yet (or an error) is handed to GraphQL
//! execution and the loop waits for that response before it takes the next
//! event (`poll_sub`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_graphql::http::{ClientMessage, WebSocketProtocols};
use async_graphql::{Data, Executor, Response};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};

use super::gql::{Lane, LaneItem, SelectionKey};
use crate::error::Code;

/// Most frames written per flush (bounds the time between flushes).
const MAX_BURST: usize = 256;

struct Sub {
    id: String,
    /// async-graphql's execution of the operation.
    stream: BoxStream<'static, Response>,
    lane: Arc<Lane>,
    /// An item was handed to execution; its response is not out yet.
    executing: bool,
    /// The lane has (or had) its event stream; once true it stays true, so
    /// the lane's lock is not taken to ask again on every poll.
    attached: bool,
    /// `{"type":"next","id":…,"payload":{"data":{"<key>":` once needed.
    prefix: Option<String>,
}

impl Sub {
    /// The frame of a pre-rendered event.
    fn rendered_frame(&mut self, protocol: WebSocketProtocols, json: &str) -> Message {
        let prefix = self.prefix.get_or_insert_with(|| {
            format!(
                r#"{{"type":{},"id":{},"payload":{{"data":{{{}:"#,
                json_str(next_type(protocol)),
                json_str(&self.id),
                json_str(self.lane.key().unwrap_or("messageEvents"))
            )
        });
        let mut frame = String::with_capacity(prefix.len() + json.len() + 3);
        frame.push_str(prefix);
        frame.push_str(json);
        frame.push_str("}}}");
        Message::Text(frame.into())
    }
}

/// What the connection does after reading a client message.
enum Step {
    Continue,
    Send(Message),
    Close(u16, String),
}

struct Conn<E, OnInit> {
    executor: E,
    protocol: WebSocketProtocols,
    on_init: Option<OnInit>,
    data: Option<Arc<Data>>,
    subs: Vec<Sub>,
}

impl<E, OnInit, Fut> Conn<E, OnInit>
where
    E: Executor,
    OnInit: FnOnce(serde_json::Value) -> Fut + Send + 'static,
    Fut: Future<Output = async_graphql::Result<Data>> + Send + 'static,
{
    fn legacy(&self) -> bool {
        self.protocol == WebSocketProtocols::SubscriptionsTransportWS
    }

    /// A refusal: a close code on `graphql-transport-ws`; a
    /// `connection_error` message, then a close, on the legacy protocol.
    fn refuse(&self, code: u16, reason: &str) -> Vec<Message> {
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: close_reason(reason).into(),
        }));
        // A normal close (the client's connection_terminate) is no error.
        if self.legacy() && code != 1000 {
            let err =
                serde_json::json!({"type": "connection_error", "payload": {"message": reason}});
            vec![Message::Text(err.to_string().into()), close]
        } else {
            vec![close]
        }
    }

    async fn on_message(&mut self, bytes: &[u8]) -> Step {
        let msg: ClientMessage = match serde_json::from_slice(bytes) {
            Ok(m) => m,
            Err(e) => return Step::Close(4400, format!("invalid message: {e}")),
        };
        match msg {
            ClientMessage::ConnectionInit { payload } => {
                let Some(init) = self.on_init.take() else {
                    return Step::Close(4429, "Too many initialisation requests".into());
                };
                match init(payload.unwrap_or_default()).await {
                    Ok(data) => {
                        self.data = Some(Arc::new(data));
                        Step::Send(Message::Text(r#"{"type":"connection_ack"}"#.into()))
                    }
                    Err(e) => Step::Close(init_refusal_code(&e), e.message),
                }
            }
            ClientMessage::Start { id, payload } => {
                let Some(data) = self.data.clone() else {
                    return Step::Close(4401, "Unauthorized".into());
                };
                if self.subs.iter().any(|s| s.id == id) {
                    return Step::Close(4409, format!("Subscriber for {id} already exists"));
                }
                let lane = Arc::new(Lane::default());
                let variables = serde_json::to_value(&payload.variables).unwrap_or_default();
                let key = SelectionKey::of_request(
                    &payload.query,
                    payload.operation_name.as_deref(),
                    &variables,
                );
                let request = payload.data(Arc::clone(&lane)).data(key);
                let stream = self.executor.execute_stream(request, Some(data));
                self.subs.push(Sub {
                    id,
                    stream,
                    lane,
                    executing: false,
                    attached: false,
                    prefix: None,
                });
                Step::Continue
            }
            ClientMessage::Stop { id } => {
                let before = self.subs.len();
                self.subs.retain(|s| s.id != id);
                // The legacy protocol confirms a stop; the modern one does not.
                if self.legacy() && self.subs.len() < before {
                    Step::Send(Message::Text(complete(&id).into()))
                } else {
                    Step::Continue
                }
            }
            ClientMessage::ConnectionTerminate => Step::Close(1000, String::new()),
            ClientMessage::Ping { .. } => Step::Send(Message::Text(r#"{"type":"pong"}"#.into())),
            ClientMessage::Pong { .. } => Step::Continue,
        }
    }

    /// Polls every subscription once, collecting the frames that are ready.
    fn poll_subs(&mut self, cx: &mut Context<'_>, out: &mut Vec<Message>) {
        let mut i = 0;
        while i < self.subs.len() {
            if poll_sub(&mut self.subs[i], self.protocol, cx, out) {
                self.subs.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }
}

/// Polls one subscription, appending its ready frames to `out` in order;
/// true when it ended. Until the resolver has attached the event stream to
/// the lane (and for operations without one), execution is polled; then the
/// lane, and execution only for what the lane hands it. Bounded, so one busy
/// subscription cannot starve the others or the socket's reads.
fn poll_sub(
    sub: &mut Sub,
    protocol: WebSocketProtocols,
    cx: &mut Context<'_>,
    out: &mut Vec<Message>,
) -> bool {
    for _ in 0..MAX_BURST {
        if !sub.attached {
            sub.attached = sub.lane.attached();
        }
        if sub.executing || !sub.attached {
            match sub.stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(resp)) => {
                    sub.executing = false;
                    out.push(Message::Text(next_frame(protocol, &sub.id, &resp).into()));
                    continue;
                }
                Poll::Ready(None) => {
                    out.push(Message::Text(complete(&sub.id).into()));
                    return true;
                }
                Poll::Pending if sub.executing => return false,
                Poll::Pending if !sub.lane.attached() => return false,
                // The resolver attached the lane during this poll.
                Poll::Pending => sub.attached = true,
            }
        }
        match sub.lane.poll_next(cx) {
            Poll::Ready(LaneItem::Rendered(json)) => {
                let frame = sub.rendered_frame(protocol, &json);
                out.push(frame);
            }
            Poll::Ready(LaneItem::Executing | LaneItem::Ended) => sub.executing = true,
            Poll::Pending => return false,
        }
    }
    // More may be ready: come back after these are written.
    cx.waker().wake_by_ref();
    false
}

/// Resolves with the frames of every subscription that has some, or stays
/// pending (registering the task's waker with each stream).
struct Ready<'a, E, OnInit>(&'a mut Conn<E, OnInit>);

impl<E, OnInit, Fut> Future for Ready<'_, E, OnInit>
where
    E: Executor,
    OnInit: FnOnce(serde_json::Value) -> Fut + Send + 'static,
    Fut: Future<Output = async_graphql::Result<Data>> + Send + 'static,
{
    type Output = Vec<Message>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<Message>> {
        let mut out = Vec::new();
        self.0.poll_subs(cx, &mut out);
        if out.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(out)
        }
    }
}

/// Serves one upgraded GraphQL WebSocket until either side ends it.
pub async fn serve<E, OnInit, Fut>(
    mut socket: WebSocket,
    executor: E,
    protocol: WebSocketProtocols,
    on_connection_init: OnInit,
    keepalive: Duration,
    init_timeout: Duration,
) where
    E: Executor,
    OnInit: FnOnce(serde_json::Value) -> Fut + Send + 'static,
    Fut: Future<Output = async_graphql::Result<Data>> + Send + 'static,
{
    // Not split: reads happen only inside the select below and writes only
    // after it, so the halves' shared lock would be pure overhead.
    let mut conn = Conn {
        executor,
        protocol,
        on_init: Some(on_connection_init),
        data: None,
        subs: Vec::new(),
    };
    let init_deadline = tokio::time::sleep(init_timeout);
    tokio::pin!(init_deadline);
    let mut ka = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    ka.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut closing: Option<Vec<Message>> = None;
    while closing.is_none() {
        let waiting_for_init = conn.data.is_none();
        // Biased, in this order: the socket first (a client's own flood of
        // messages can only delay its own frames), then frames; the timers
        // are only polled when neither is ready, which saves re-polling them
        // on every one of a busy connection's wake-ups.
        let frames: Vec<Message> = tokio::select! {
            biased;
            msg = socket.next() => {
                // Text and binary frames carry the protocol; pings are
                // answered by the WebSocket layer; a read error or a close
                // ends the connection.
                let bytes = match msg {
                    Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
                    Some(Ok(Message::Binary(b))) => b.to_vec(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                };
                match conn.on_message(&bytes).await {
                    Step::Continue => continue,
                    Step::Send(m) => vec![m],
                    Step::Close(code, reason) => {
                        closing = Some(conn.refuse(code, &reason));
                        continue;
                    }
                }
            }
            frames = Ready(&mut conn) => frames,
            () = &mut init_deadline, if waiting_for_init => {
                closing = Some(conn.refuse(4408, "Connection initialisation timeout"));
                continue;
            }
            _ = ka.tick() => {
                let mut v = vec![Message::Ping(Default::default())];
                if conn.legacy() {
                    v.push(Message::Text(r#"{"type":"ka"}"#.into()));
                }
                v
            }
        };
        if send_all(&mut socket, frames).await.is_err() {
            return;
        }
    }
    if let Some(frames) = closing {
        let _ = send_all(&mut socket, frames).await;
    }
    let _ = socket.close().await;
}

/// Writes `frames` with one flush.
async fn send_all<S>(sink: &mut S, frames: Vec<Message>) -> Result<(), S::Error>
where
    S: futures::Sink<Message> + Unpin,
{
    for f in frames {
        sink.feed(f).await?;
    }
    sink.flush().await
}

fn next_type(protocol: WebSocketProtocols) -> &'static str {
    match protocol {
        WebSocketProtocols::SubscriptionsTransportWS => "data",
        WebSocketProtocols::GraphQLWS => "next",
    }
}

fn next_frame(protocol: WebSocketProtocols, id: &str, resp: &Response) -> String {
    let payload = serde_json::to_string(resp).unwrap_or_else(|e| {
        tracing::error!(error = %e, "serialising a GraphQL response failed");
        r#"{"data":null,"errors":[{"message":"internal error"}]}"#.to_owned()
    });
    format!(
        r#"{{"type":{},"id":{},"payload":{payload}}}"#,
        json_str(next_type(protocol)),
        json_str(id)
    )
}

fn complete(id: &str) -> String {
    format!(r#"{{"type":"complete","id":{}}}"#, json_str(id))
}

/// The close code for a refused `connection_init`: 4403 (Forbidden; the
/// dashboard's client then stops) when the credential is the problem, but
/// 1013 (Try Again Later) for a rate limit and 1011 for our own failure, so
/// clients reconnect with backoff instead of giving up.
fn init_refusal_code(e: &async_graphql::Error) -> u16 {
    let code = e
        .extensions
        .as_ref()
        .and_then(|x| x.get("code"))
        .and_then(|v| match v {
            async_graphql::Value::String(s) => Some(s.as_str()),
            _ => None,
        });
    match code {
        Some(c) if c == Code::RateLimited.as_str() => 1013,
        Some(c) if c == Code::Internal.as_str() => 1011,
        _ => 4403,
    }
}

/// A close frame's reason: at most 123 bytes (RFC 6455 §5.5; longer ones
/// make the WebSocket layer drop the connection without a close frame).
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// `s` as a JSON string literal.
fn json_str(s: &str) -> String {
    // Serialising a str cannot fail.
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::gql_error;
    use crate::live::gql::{LiveMessageEvent, SelectionKey};
    use crate::live::hub::LiveEvent;
    use observer_db::events::{Cursor, EventKind, EventRow};
    use observer_db::viewer::MessageRow;

    fn event(n: i64) -> Arc<LiveEvent> {
        let at = chrono::Utc::now();
        let message = MessageRow {
            guild_id: 1,
            message_id: n,
            channel_id: 1,
            author_id: None,
            author_username: None,
            author_display_name: None,
            author_avatar: None,
            author_bot: false,
            content: String::new(),
            created_at: at,
            edited_at: None,
            deleted_at: None,
            deletion_detected_at: None,
            attachments: serde_json::Value::Null,
            reply_to_id: None,
        };
        let row = EventRow {
            cursor: Cursor::new(1, n),
            kind: EventKind::Created,
            guild_id: 1,
            channel_id: 1,
            at,
            message,
        };
        Arc::new(LiveEvent::new(row, Vec::new()))
    }

    /// Some events already rendered (they take the lane), some not (they
    /// take execution, simulated here): the frames still come out in the
    /// events' order, under the subscription's id and alias.
    #[test]
    fn lane_and_executed_frames_keep_the_events_order() {
        let key = SelectionKey::fixed(7);
        let events: Vec<Arc<LiveEvent>> = (0..40).map(event).collect();
        for (n, ev) in events.iter().enumerate() {
            if n % 3 != 0 {
                ev.renders.put(
                    key,
                    &async_graphql::Value::from_json(serde_json::json!({"n": n}))
                        .unwrap_or_default(),
                );
            }
        }
        let lane = Arc::new(Lane::default());
        let items = futures::stream::iter(
            events
                .into_iter()
                .map(move |event| Ok(LiveMessageEvent { event, key })),
        );
        // Behind `select_all`, as async-graphql's execution has it: a stream
        // that returned Pending is polled again only after it woke.
        let stream = futures::stream::select_all([Lane::attach(Some(&lane), items, "ev")])
            .map(|item| {
                let n = item.map(|i| i.event.cursor().seq).unwrap_or(-1);
                let data = serde_json::json!({"ev": {"n": n, "executed": true}});
                Response::new(async_graphql::Value::from_json(data).unwrap_or_default())
            })
            .boxed();
        let mut sub = Sub {
            id: "s".into(),
            stream,
            lane,
            executing: false,
            attached: false,
            prefix: None,
        };
        let mut out = Vec::new();
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        // Execution polls the slot once as soon as the resolver returns.
        assert!(sub.stream.as_mut().poll_next(&mut cx).is_pending());
        let mut polls = 0;
        while !poll_sub(&mut sub, WebSocketProtocols::GraphQLWS, &mut cx, &mut out) {
            polls += 1;
            assert!(polls < 100, "stuck after {} frames", out.len());
        }
        let frames: Vec<serde_json::Value> = out
            .iter()
            .filter_map(|m| match m {
                Message::Text(t) => serde_json::from_str(t.as_str()).ok(),
                _ => None,
            })
            .collect();
        assert_eq!(frames.len(), 41, "40 events and complete");
        assert_eq!(
            frames[40],
            serde_json::json!({"type": "complete", "id": "s"})
        );
        let mut executed = 0;
        for (n, f) in frames[..40].iter().enumerate() {
            assert_eq!(f["type"], "next");
            assert_eq!(f["id"], "s");
            assert_eq!(f["payload"]["data"]["ev"]["n"], n, "{f}");
            executed += usize::from(f["payload"]["data"]["ev"]["executed"] == true);
        }
        assert_eq!(executed, 14, "every third event is executed");
    }

    #[test]
    fn refused_inits_say_whether_to_retry() {
        assert_eq!(
            init_refusal_code(&gql_error(Code::RateLimited, "slow down")),
            1013
        );
        assert_eq!(
            init_refusal_code(&gql_error(Code::Internal, "internal error")),
            1011
        );
        assert_eq!(
            init_refusal_code(&async_graphql::Error::new("invalid or revoked API token")),
            4403
        );
        assert_eq!(
            init_refusal_code(&gql_error(Code::Unauthenticated, "no")),
            4403
        );
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100);
        let r = close_reason(&long);
        assert!(r.len() <= 123 && long.starts_with(&r) && !r.is_empty());
    }

    #[test]
    fn frames_are_json_whatever_the_id() {
        let id = "a \"quoted\" \\ id";
        let done: serde_json::Value = serde_json::from_str(&complete(id)).unwrap_or_default();
        assert_eq!(done["id"], id);
        let resp = Response::new(async_graphql::Value::Null);
        let next: serde_json::Value =
            serde_json::from_str(&next_frame(WebSocketProtocols::GraphQLWS, id, &resp))
                .unwrap_or_default();
        assert_eq!(next["type"], "next");
        assert_eq!(next["id"], id);
    }
}
