//! The gateway WebSocket: HELLO, IDENTIFY (token, intents, shard), READY + GUILD_CREATE,
//! heartbeats, RESUME with replay, and the connection-level faults.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::world::{Conn, Outgoing, Session};
use crate::Shared;

/// Intent bits Discord defines; anything else closes with 4013.
const VALID_INTENTS: u64 = 0x1FFFF | (1 << 20) | (1 << 21) | (1 << 24) | (1 << 25);
/// GUILD_MEMBERS, GUILD_PRESENCES, MESSAGE_CONTENT.
pub const PRIVILEGED_INTENTS: u64 = (1 << 1) | (1 << 8) | (1 << 15);

const HEARTBEAT_ACK: &str = r#"{"op":11,"d":null,"s":null,"t":null}"#;
pub(crate) const RECONNECT: &str = r#"{"op":7,"d":null,"s":null,"t":null}"#;

pub(crate) fn invalid_session(resumable: bool) -> String {
    format!(r#"{{"op":9,"d":{resumable},"s":null,"t":null}}"#)
}

pub(crate) async fn ws_handler(State(sh): State<Arc<Shared>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| connection(sh, socket))
}

async fn connection(sh: Arc<Shared>, socket: WebSocket) {
    let conn_id = sh.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    let (mut sink, mut stream) = socket.split();
    let done = CancellationToken::new();
    let writer_done = done.clone();
    // A client that stops reading is dropped (as Discord would) instead of growing this queue
    // without bound; a resume from its last sequence still recovers everything buffered.
    let max_backlog = sh.config.resume_buffer_len.saturating_add(1000);
    let writer = tokio::spawn(async move {
        while let Some(o) = rx.recv().await {
            if rx.len() > max_backlog {
                tracing::warn!(conn_id, "gateway client too slow; dropping its socket");
                break;
            }
            let msg = match o {
                Outgoing::Dispatch(seq, d) => Message::Text(d.frame(seq).into()),
                Outgoing::Raw(s) => Message::Text(s.into()),
                Outgoing::Close(code, reason) => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })))
                        .await;
                    break;
                }
                Outgoing::Drop => break,
            };
            if sink.send(msg).await.is_err() {
                break;
            }
        }
        writer_done.cancel();
    });

    let hello = json!({"op": 10, "d": {"heartbeat_interval": sh.config.heartbeat_interval_ms}, "s": null, "t": null});
    let _ = tx.send(Outgoing::Raw(hello.to_string()));

    let mut session_id: Option<String> = None;
    loop {
        let msg = tokio::select! {
            _ = done.cancelled() => break,
            _ = sh.shutdown.cancelled() => break,
            msg = stream.next() => msg,
        };
        match msg {
            None | Some(Err(_)) => break,
            Some(Ok(Message::Text(t))) => {
                handle_frame(&sh, &tx, conn_id, &mut session_id, t.as_str())
            }
            Some(Ok(Message::Binary(_))) => {
                let _ = tx.send(Outgoing::Close(
                    4002,
                    "binary frames are not supported".into(),
                ));
            }
            Some(Ok(Message::Close(frame))) => {
                // Discord invalidates the session when the client closes with 1000/1001.
                if let (Some(f), Some(id)) = (&frame, &session_id) {
                    if f.code == 1000 || f.code == 1001 {
                        sh.world().sessions.remove(id);
                    }
                }
                break;
            }
            Some(Ok(_)) => {}
        }
    }

    if let Some(id) = &session_id {
        let mut w = sh.world();
        if let Some(s) = w.sessions.get_mut(id) {
            if s.conn.as_ref().is_some_and(|c| c.id == conn_id) {
                s.conn = None;
                s.disconnected_at = Some(std::time::Instant::now());
            }
        }
    }
    drop(tx);
    // Give a pending close frame a moment to go out, then make sure the socket is gone.
    let mut writer = writer;
    if tokio::time::timeout(std::time::Duration::from_millis(200), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

fn close(tx: &mpsc::UnboundedSender<Outgoing>, code: u16, reason: &str) {
    let _ = tx.send(Outgoing::Close(code, reason.to_string()));
}

fn token_ok(sh: &Shared, d: &Value) -> bool {
    let token = d.get("token").and_then(Value::as_str).unwrap_or("");
    let token = token.strip_prefix("Bot ").unwrap_or(token);
    token == sh.config.bot_token
}

fn handle_frame(
    sh: &Arc<Shared>,
    tx: &mpsc::UnboundedSender<Outgoing>,
    conn_id: u64,
    session_id: &mut Option<String>,
    text: &str,
) {
    if text.len() > 4096 {
        return close(tx, 4002, "payload too large");
    }
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return close(tx, 4002, "decode error");
    };
    let Some(op) = v.get("op").and_then(Value::as_u64) else {
        return close(tx, 4002, "decode error");
    };
    let d = v.get("d").cloned().unwrap_or(Value::Null);
    match op {
        1 => {
            if !sh.stop_acks.load(Ordering::Relaxed) {
                let _ = tx.send(Outgoing::Raw(HEARTBEAT_ACK.into()));
            }
        }
        2 => identify(sh, tx, conn_id, session_id, &d),
        6 => resume(sh, tx, conn_id, session_id, &d),
        3 | 4 | 8 | 31 | 43 => {
            if session_id.is_none() {
                close(tx, 4003, "not authenticated");
            }
        }
        _ => close(tx, 4001, "unknown opcode"),
    }
}

fn identify(
    sh: &Arc<Shared>,
    tx: &mpsc::UnboundedSender<Outgoing>,
    conn_id: u64,
    session_id: &mut Option<String>,
    d: &Value,
) {
    if session_id.is_some() {
        return close(tx, 4005, "already authenticated");
    }
    if !token_ok(sh, d) {
        return close(tx, 4004, "authentication failed");
    }
    let Some(intents) = d.get("intents").and_then(Value::as_u64) else {
        return close(tx, 4013, "invalid intents");
    };
    if intents & !VALID_INTENTS != 0 {
        return close(tx, 4013, "invalid intents");
    }
    if intents & PRIVILEGED_INTENTS & !sh.config.privileged_intents != 0 {
        return close(tx, 4014, "disallowed intents");
    }
    let shard = match d.get("shard").and_then(Value::as_array) {
        Some(a) => match (
            a.first().and_then(Value::as_u64),
            a.get(1).and_then(Value::as_u64),
        ) {
            (Some(id), Some(count)) if count > 0 && id < count => (id, count),
            _ => return close(tx, 4010, "invalid shard"),
        },
        None => (0, 1),
    };
    let sid: String = {
        let mut rng = rand::thread_rng();
        (0..32)
            .map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap_or('0'))
            .collect()
    };
    let mut w = sh.world();
    w.sessions.insert(
        sid.clone(),
        Session {
            shard,
            intents,
            seq: 0,
            buffer: Default::default(),
            conn: Some(Conn {
                id: conn_id,
                tx: tx.clone(),
            }),
            disconnected_at: None,
        },
    );
    let guild_ids: Vec<u64> = w
        .guilds
        .values()
        .filter(|g| g.bot_present && (g.id >> 22) % shard.1 == shard.0)
        .map(|g| g.id)
        .collect();
    let ready = json!({
        "v": 10,
        "user": {"id": w.bot.id.to_string(), "username": w.bot.username, "discriminator": "0",
                 "global_name": null, "avatar": null, "bot": true, "verified": true,
                 "mfa_enabled": false, "flags": 0, "public_flags": 0},
        "guilds": guild_ids.iter().map(|id| json!({"id": id.to_string(), "unavailable": true})).collect::<Vec<_>>(),
        "session_id": sid,
        "resume_gateway_url": sh.gateway_url,
        "shard": [shard.0, shard.1],
        "application": {"id": sh.config.client_id, "flags": 0},
        "private_channels": [],
        "presences": [],
        "relationships": [],
        "guild_join_requests": [],
        "user_settings": {},
    });
    w.dispatch_to(&sid, "READY", ready.to_string());
    if intents & crate::world::INTENT_GUILDS != 0 {
        for id in guild_ids {
            let json = match w.guilds.get(&id) {
                Some(g) => w.guild_create_json(g).to_string(),
                None => continue,
            };
            w.dispatch_to(&sid, "GUILD_CREATE", json);
        }
    }
    tracing::debug!(session = %sid, ?shard, intents, "gateway session identified");
    *session_id = Some(sid);
}

fn resume(
    sh: &Arc<Shared>,
    tx: &mpsc::UnboundedSender<Outgoing>,
    conn_id: u64,
    session_id: &mut Option<String>,
    d: &Value,
) {
    if session_id.is_some() {
        return close(tx, 4005, "already authenticated");
    }
    if !token_ok(sh, d) {
        return close(tx, 4004, "authentication failed");
    }
    let sid = d
        .get("session_id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let seq = d.get("seq").and_then(Value::as_u64).unwrap_or(0);
    let mut w = sh.world();
    let Some(s) = w.sessions.get_mut(&sid) else {
        let _ = tx.send(Outgoing::Raw(invalid_session(false)));
        return;
    };
    if seq > s.seq {
        drop(w);
        return close(tx, 4007, "invalid seq");
    }
    let oldest = s.buffer.front().map(|(n, _)| *n).unwrap_or(s.seq + 1);
    if oldest > seq + 1 {
        // Part of what the client missed has left the buffer: it cannot resume.
        w.sessions.remove(&sid);
        let _ = tx.send(Outgoing::Raw(invalid_session(false)));
        return;
    }
    if let Some(old) = s.conn.take() {
        if old.id != conn_id {
            let _ = old.tx.send(Outgoing::Drop);
        }
    }
    let mut replayed = 0usize;
    for (n, d) in s.buffer.iter().filter(|(n, _)| *n > seq) {
        let _ = tx.send(Outgoing::Dispatch(*n, Arc::clone(d)));
        replayed += 1;
    }
    s.conn = Some(Conn {
        id: conn_id,
        tx: tx.clone(),
    });
    s.disconnected_at = None;
    sh.replayed.fetch_add(replayed as u64, Ordering::Relaxed);
    w.dispatch_to(&sid, "RESUMED", "{}".into());
    tracing::debug!(session = %sid, seq, replayed, "gateway session resumed");
    *session_id = Some(sid);
}
