//! The client process: N graphql-transport-ws connections, driven by lines on
//! stdin, answering on stdout.

use super::*;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(serde::Deserialize)]
struct Config {
    url: String,
    parallel: usize,
    drain_secs: u64,
    viewers: Vec<ViewerConf>,
}

#[derive(serde::Deserialize)]
struct ViewerConf {
    token: String,
    visible: Vec<String>,
}

#[derive(Default)]
struct Tally {
    count: u64,
    violations: u64,
    latencies_us: Vec<u32>,
    errors: Vec<String>,
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn connect(url: &str, token: &str) -> anyhow::Result<Ws> {
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("sec-websocket-protocol", "graphql-transport-ws".parse()?);
    // A small read buffer (tungstenite zero-fills it before every read)
    // and TCP_NODELAY, so the client measures the server, not itself.
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true).await?;
    let init =
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}});
    ws.send(WsMessage::Text(init.to_string().into())).await?;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .context("no connection_ack within 30 s")?
            .context("closed before connection_ack")??;
        if let WsMessage::Text(t) = frame {
            let v: Value = serde_json::from_str(&t)?;
            match v["type"].as_str() {
                Some("connection_ack") => return Ok(ws),
                Some("ping") => {
                    ws.send(WsMessage::Text(json!({"type": "pong"}).to_string().into()))
                        .await?
                }
                _ => bail!("unexpected frame before ack: {v}"),
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    payload: Option<Payload<'a>>,
}

#[derive(serde::Deserialize, Default)]
struct Payload<'a> {
    #[serde(borrow, default)]
    data: Option<Data<'a>>,
    #[serde(default)]
    errors: Option<Vec<Value>>,
}

#[derive(serde::Deserialize)]
struct Data<'a> {
    #[serde(rename = "messageEvents", borrow)]
    message_events: Event<'a>,
}

#[derive(serde::Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    message: Msg<'a>,
}

#[derive(serde::Deserialize)]
struct Msg<'a> {
    #[serde(rename = "channelId", borrow)]
    channel_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    content: std::borrow::Cow<'a, str>,
}

/// `(channelId, send time)` of a `next` frame carrying one bench
/// message event and nothing else, found without parsing the whole frame.
fn scan_next(text: &str) -> Option<(&str, u64)> {
    const HEAD: &str = r#"{"type":"next","id":"1","payload":{"data":{"messageEvents":{"#;
    let rest = text.strip_prefix(HEAD)?;
    // Exactly one object after the head: `{"data":{"messageEvents":{…}}}}`
    // with no `errors` beside `data`.
    let body = rest.strip_suffix("}}}}")?;
    let value = |key: &str| -> Option<&str> {
        let start = body.find(key)? + key.len();
        let len = body[start..].find('"')?;
        let v = &body[start..start + len];
        // An escape would need the full parse.
        (!v.contains('\\')).then_some(v)
    };
    let channel = value(r#""channelId":""#)?;
    let content = value(r#""content":""#)?;
    let sent = content
        .strip_prefix(CONTENT_PREFIX)?
        .rsplit(' ')
        .next()?
        .parse::<u64>()
        .ok()?;
    Some((channel, sent))
}

/// What a text frame was.
enum Seen {
    /// A data frame, checked and counted.
    Data,
    /// Anything else (reported in the tally if unexpected).
    Other,
    /// A protocol ping, to be answered with this text.
    Reply(&'static str),
}

/// Checks one text frame: a data frame's channel against what the
/// viewer may see, its latency from the send time in its content.
fn on_text(text: &str, now: u64, visible: &HashSet<String>, t: &mut Tally) -> Seen {
    let data = |channel: &str, sent: Option<u64>, t: &mut Tally| {
        if !visible.contains(channel) {
            t.violations += 1;
        }
        if let Some(sent) = sent {
            let us = now.saturating_sub(sent) / 1000;
            t.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
        t.count += 1;
        Seen::Data
    };
    // A data frame of the expected shape is checked by scanning for its
    // two fields; anything else takes the full parse below.
    if let Some((channel, sent)) = scan_next(text) {
        return data(channel, Some(sent), t);
    }
    // Typed and borrowed: the client's parsing must cost far less than
    // the server's work or the bench measures the client.
    let Ok(f) = serde_json::from_str::<Frame<'_>>(text) else {
        t.errors.push("unparsable frame".into());
        return Seen::Other;
    };
    match f.kind.as_ref() {
        "next" => {
            let payload = f.payload.unwrap_or_default();
            if let Some(errors) = payload.errors {
                // Grouped by code in the report (SLOW_CONSUMER, FORBIDDEN, ...).
                let code = errors
                    .first()
                    .and_then(|e| e["extensions"]["code"].as_str())
                    .unwrap_or("error without code")
                    .to_owned();
                t.errors.push(format!("next with error {code}"));
                return Seen::Other;
            }
            let Some(msg) = payload.data.map(|d| d.message_events.message) else {
                t.errors.push("next without data".into());
                return Seen::Other;
            };
            let sent = Some(msg.content.as_ref())
                .filter(|c| c.starts_with(CONTENT_PREFIX))
                .and_then(|c| c.rsplit(' ').next())
                .and_then(|n| n.parse::<u64>().ok());
            data(msg.channel_id.as_ref(), sent, t)
        }
        "ping" => Seen::Reply(r#"{"type":"pong"}"#),
        "pong" | "ka" => Seen::Other,
        other => {
            t.errors.push(format!("{other}: {text}"));
            Seen::Other
        }
    }
}

/// One complete server frame at the start of `buf`: its opcode, where
/// its payload is and its whole length (RFC 6455 §5.2; a server's frames
/// are unmasked, and ours are never fragmented).
fn server_frame(buf: &[u8]) -> Option<(u8, std::ops::Range<usize>, usize)> {
    let b1 = *buf.get(1)?;
    let (len, header) = match b1 & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (usize::from(n), 2),
    };
    let header: usize = if b1 & 0x80 != 0 { header + 4 } else { header };
    let end = header.checked_add(len)?;
    (buf.len() >= end).then_some((buf[0] & 0x0f, header..end, end))
}

/// A client frame, masked as RFC 6455 requires of clients (payloads
/// here are a pong or a ping's echo: under 64 KiB).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    const KEY: [u8; 4] = [0x5a, 0x17, 0xc3, 0x08];
    let mut f = vec![0x80 | opcode];
    match u8::try_from(payload.len()) {
        Ok(n) if n < 126 => f.push(0x80 | n),
        _ => {
            f.push(0x80 | 126);
            let n = u16::try_from(payload.len()).unwrap_or(u16::MAX);
            f.extend_from_slice(&n.to_be_bytes());
        }
    }
    f.extend_from_slice(&KEY);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    f
}

/// Reads one connection's frames until told to stop. The handshake,
/// `connection_init` and `subscribe` went through tungstenite; from then
/// on the client mostly reads, and takes frames straight from the
/// socket's bytes. The client shares the server's two cores, so its own
/// work per frame is queueing delay for the server it measures. Every
/// frame is still checked, and anything unexpected is reported.
async fn read(
    mut sock: tokio::net::TcpStream,
    visible: HashSet<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    received: Arc<AtomicU64>,
    last_frame: Arc<AtomicU64>,
) -> Tally {
    use tokio::io::AsyncReadExt;
    let mut t = Tally::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut filled = 0;
    let mut replies: Vec<Vec<u8>> = Vec::new();
    'read: loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = tokio::select! {
            r = sock.read(&mut buf[filled..]) => r,
            _ = stop.changed() => break,
        };
        match n {
            Ok(0) => {
                t.errors.push("socket closed".into());
                break;
            }
            Ok(n) => filled += n,
            Err(e) => {
                t.errors.push(format!("socket: {e}"));
                break;
            }
        }
        let now = unix_nanos();
        let mut at = 0;
        let mut data = 0;
        while let Some((opcode, payload, len)) = server_frame(&buf[at..filled]) {
            let p = &buf[at + payload.start..at + payload.end];
            match opcode {
                1 => match std::str::from_utf8(p) {
                    Ok(text) => match on_text(text, now, &visible, &mut t) {
                        Seen::Data => data += 1,
                        Seen::Other => {}
                        Seen::Reply(r) => replies.push(client_frame(1, r.as_bytes())),
                    },
                    Err(_) => t.errors.push("text frame is not UTF-8".into()),
                },
                // A WebSocket ping, answered with its payload.
                9 => replies.push(client_frame(0xa, p)),
                0xa => {}
                8 => {
                    t.errors.push("socket closed".into());
                    break 'read;
                }
                other => t.errors.push(format!("unexpected opcode {other}")),
            }
            at += len;
        }
        buf.copy_within(at..filled, 0);
        filled -= at;
        if data > 0 {
            received.fetch_add(data, Ordering::Relaxed);
            last_frame.fetch_max(now, Ordering::Relaxed);
        }
        for r in replies.drain(..) {
            if sock.write_all(&r).await.is_err() {
                t.errors.push("reply failed".into());
                break 'read;
            }
        }
    }
    t
}

async fn next_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>,
) -> anyhow::Result<String> {
    lines.next_line().await?.context("server process went away")
}

pub async fn run() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let conf: Config = serde_json::from_str(&next_line(&mut lines).await?)?;
    let cmd = next_line(&mut lines).await?;
    if cmd != "connect" {
        bail!("expected connect, got {cmd:?}");
    }
    let url = conf.url.clone();
    let conns: Vec<anyhow::Result<Ws>> = futures::stream::iter(conf.viewers.iter())
        .map(|v| connect(&url, &v.token))
        .buffered(conf.parallel.max(1))
        .collect()
        .await;
    let mut sockets = Vec::with_capacity(conns.len());
    for c in conns {
        sockets.push(c?);
    }
    say("connected");

    let cmd = next_line(&mut lines).await?;
    if cmd != "subscribe" {
        bail!("expected subscribe, got {cmd:?}");
    }
    let sub = json!({"id": "1", "type": "subscribe", "payload": {"query": SUB}}).to_string();
    // Subscribed, the connections go raw (see `read`): nothing has
    // arrived since each one's `connection_ack`, as no message is posted
    // before the server hears "subscribed", so tungstenite holds no
    // unread bytes.
    let mut raw = Vec::with_capacity(sockets.len());
    for mut ws in sockets {
        ws.send(WsMessage::Text(sub.clone().into())).await?;
        match ws.into_inner() {
            tokio_tungstenite::MaybeTlsStream::Plain(sock) => raw.push(sock),
            _ => bail!("the bench speaks plain ws:// only"),
        }
    }
    let sockets = raw;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let received = Arc::new(AtomicU64::new(0));
    let last_frame = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = sockets
        .into_iter()
        .zip(&conf.viewers)
        .map(|(sock, v)| {
            tokio::spawn(read(
                sock,
                v.visible.iter().cloned().collect(),
                stop_rx.clone(),
                received.clone(),
                last_frame.clone(),
            ))
        })
        .collect();
    say("subscribed");

    let cmd = next_line(&mut lines).await?;
    let expected: u64 = cmd
        .strip_prefix("expect ")
        .context("expected `expect <n>`")?
        .parse()?;
    let deadline = Instant::now() + Duration::from_secs(conf.drain_secs);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Late extras (more than expected) would show as wrong counts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_tx.send(true);
    let result = summarize(tasks, &last_frame).await?;
    say(&format!("result {result}"));
    Ok(())
}

/// The readers' tallies as the result line: frames per viewer, violations,
/// latency percentiles and errors.
async fn summarize(
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
    last_frame: &AtomicU64,
) -> anyhow::Result<Value> {
    let mut per_viewer = Vec::with_capacity(tasks.len());
    let mut violations = 0;
    let mut lat: Vec<u32> = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        let t = t.await?;
        per_viewer.push(t.count);
        violations += t.violations;
        lat.extend(t.latencies_us);
        for e in t.errors {
            *errors.entry(e.chars().take(200).collect()).or_default() += 1;
        }
    }
    lat.sort_unstable();
    let pct = |q: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
        (f64::from(lat[i]) / 1000.0 * 100.0).round() / 100.0
    };
    Ok(json!({
        "per_viewer": per_viewer,
        "violations": violations,
        "samples": lat.len(),
        "p50_ms": pct(0.5),
        "p90_ms": pct(0.9),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
        "last_frame_unix_nanos": last_frame.load(Ordering::Relaxed),
        "errors": errors,
    }))
}
