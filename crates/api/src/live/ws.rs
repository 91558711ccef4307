//! The GraphQL WebSocket's send loop. async-graphql speaks both protocols
//! (`graphql-transport-ws`, legacy `graphql-ws`); this loop moves its frames
//! to the socket and differs from `async_graphql_axum`'s in two ways:
//!
//! - frames that are ready together are written together: one flush (one
//!   `send` syscall) per burst instead of per frame, so under load the cost
//!   per frame falls as the hub's read batches grow (the same adaptive
//!   batching as the worker's writer, with no timer and no added latency);
//! - a keepalive: a WebSocket ping every `keepalive` (and, on the legacy
//!   protocol, its `ka` message), so proxies do not cut quiet subscriptions.

use std::future::Future;
use std::time::Duration;

use async_graphql::http::{WebSocket as GqlWebSocket, WebSocketProtocols, WsMessage};
use async_graphql::{Data, Executor};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::{FutureExt, SinkExt, StreamExt};

/// Most frames written per flush (bounds the time between flushes).
const MAX_BURST: usize = 256;

/// Serves one upgraded GraphQL WebSocket until either side ends it.
pub async fn serve<E, OnInit, Fut>(
    socket: WebSocket,
    executor: E,
    protocol: WebSocketProtocols,
    on_connection_init: OnInit,
    keepalive: Duration,
) where
    E: Executor,
    OnInit: FnOnce(serde_json::Value) -> Fut + Send + 'static,
    Fut: Future<Output = async_graphql::Result<Data>> + Send + 'static,
{
    let (mut sink, input) = socket.split();
    // Text and binary frames carry the protocol; pings are answered by the
    // WebSocket layer; a read error or a close ends the input.
    let input = input
        .take_while(|m| {
            std::future::ready(m.as_ref().is_ok_and(|m| !matches!(m, Message::Close(_))))
        })
        .filter_map(|m| {
            std::future::ready(match m {
                Ok(Message::Text(t)) => Some(t.as_bytes().to_vec()),
                Ok(Message::Binary(b)) => Some(b.to_vec()),
                _ => None,
            })
        });
    let frames =
        GqlWebSocket::new(executor, input, protocol).on_connection_init(on_connection_init);
    futures::pin_mut!(frames);

    let mut ka = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    ka.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            frame = frames.next() => {
                let Some(frame) = frame else { break };
                let mut ended = false;
                let mut ok = sink.feed(to_axum(frame)).await.is_ok();
                let mut burst = 1;
                // Whatever else is ready now goes out with this one. A
                // Pending here registers no waker we rely on: the next
                // `frames.next()` polls again with the task's own.
                while ok && burst < MAX_BURST {
                    match frames.next().now_or_never() {
                        Some(Some(f)) => {
                            ok = sink.feed(to_axum(f)).await.is_ok();
                            burst += 1;
                        }
                        Some(None) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                if !ok || sink.flush().await.is_err() || ended {
                    break;
                }
            }
            _ = ka.tick() => {
                if sink.feed(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
                if protocol == WebSocketProtocols::SubscriptionsTransportWS
                    && sink.feed(Message::Text(r#"{"type":"ka"}"#.into())).await.is_err()
                {
                    break;
                }
                if sink.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = sink.close().await;
}

fn to_axum(frame: WsMessage) -> Message {
    match frame {
        WsMessage::Text(text) => Message::Text(text.into()),
        WsMessage::Close(code, reason) => Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })),
    }
}
