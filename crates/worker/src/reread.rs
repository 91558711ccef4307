//! Access re-reads. serenity hands events to handlers in any order and Discord
//! access events carry no version, so two quick updates of one member, role
//! set or channel could land stale. Each such event therefore also schedules a
//! REST re-read of that entity a little later (debounced per entity); the
//! re-read's state is written like any event. Once Discord is quiet, the
//! database holds Discord's current state whatever order the events came in.

use std::collections::HashMap;
use std::time::Duration;

use observer_db::ingest::{IngestOp, MemberInfo, RoleInfo};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::batcher::Queued;
use crate::map;
use crate::rest::Rest;

/// Most entities waiting for a re-read; beyond this, new keys are skipped
/// (the live events were written already; this is only a correction).
const MAX_PENDING: usize = 50_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    Member { guild_id: i64, user_id: i64 },
    Roles { guild_id: i64 },
    Channel { guild_id: i64, channel_id: i64 },
}

pub struct Rereader {
    pub rest: Rest,
    pub ops: mpsc::Sender<Queued>,
    pub delay: Duration,
}

impl Rereader {
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Key>) {
        let mut pending: HashMap<Key, Instant> = HashMap::new();
        loop {
            let next = pending.values().min().copied();
            tokio::select! {
                key = rx.recv() => match key {
                    Some(k) => {
                        if pending.len() < MAX_PENDING {
                            pending.entry(k).or_insert_with(|| Instant::now() + self.delay);
                        }
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    let now = Instant::now();
                    let due: Vec<Key> = pending
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(k, _)| *k)
                        .collect();
                    for k in due {
                        pending.remove(&k);
                        match self.reread(k).await {
                            Ok(ops) => {
                                for op in ops {
                                    if self.ops.send(Queued::new(op)).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            Err(err) => tracing::warn!(?k, error = %err, "access re-read failed"),
                        }
                    }
                }
            }
        }
    }

    async fn reread(&self, key: Key) -> Result<Vec<IngestOp>, crate::rest::RestError> {
        Ok(match key {
            Key::Member { guild_id, user_id } => {
                match self
                    .rest
                    .get(&format!("/guilds/{guild_id}/members/{user_id}"))
                    .await?
                {
                    Some(v) => member(guild_id, &v)
                        .map(IngestOp::MemberUpsert)
                        .into_iter()
                        .collect(),
                    None => vec![IngestOp::MemberRemove { guild_id, user_id }],
                }
            }
            Key::Roles { guild_id } => {
                match self.rest.get(&format!("/guilds/{guild_id}/roles")).await? {
                    Some(Value::Array(list)) => vec![IngestOp::RolesSync {
                        guild_id,
                        roles: list.iter().filter_map(|r| role(guild_id, r)).collect(),
                    }],
                    _ => vec![],
                }
            }
            Key::Channel {
                guild_id,
                channel_id,
            } => match self.rest.get(&format!("/channels/{channel_id}")).await? {
                Some(v) => match serde_json::from_value::<serenity::all::GuildChannel>(v) {
                    Ok(c) => vec![IngestOp::ChannelUpsert(map::channel(&c))],
                    Err(err) => {
                        tracing::warn!(channel_id, error = %err, "re-read channel unparseable");
                        vec![]
                    }
                },
                None => vec![IngestOp::ChannelDelete {
                    guild_id,
                    channel_id,
                }],
            },
        })
    }
}

fn snowflake(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn time(v: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    v.as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|d| d.with_timezone(&chrono::Utc))
}

fn member(guild_id: i64, v: &Value) -> Option<MemberInfo> {
    Some(MemberInfo {
        guild_id,
        user_id: snowflake(&v["user"]["id"])?,
        role_ids: v["roles"]
            .as_array()?
            .iter()
            .filter_map(snowflake)
            .collect(),
        nick: v["nick"].as_str().map(str::to_owned),
        joined_at: time(&v["joined_at"]),
        communication_disabled_until: time(&v["communication_disabled_until"]),
    })
}

fn role(guild_id: i64, v: &Value) -> Option<RoleInfo> {
    Some(RoleInfo {
        guild_id,
        role_id: snowflake(&v["id"])?,
        name: v["name"].as_str().unwrap_or_default().to_owned(),
        permissions: snowflake(&v["permissions"]).unwrap_or(0),
        position: v["position"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or(0),
    })
}

/// The re-read an event calls for, if any.
pub fn key_for(op: &IngestOp) -> Option<Key> {
    match op {
        IngestOp::MemberUpsert(m) => Some(Key::Member {
            guild_id: m.guild_id,
            user_id: m.user_id,
        }),
        IngestOp::MemberRemove { guild_id, user_id } => Some(Key::Member {
            guild_id: *guild_id,
            user_id: *user_id,
        }),
        IngestOp::RoleUpsert(r) => Some(Key::Roles {
            guild_id: r.guild_id,
        }),
        IngestOp::RoleDelete { guild_id, .. } => Some(Key::Roles {
            guild_id: *guild_id,
        }),
        IngestOp::ChannelUpsert(c) => Some(Key::Channel {
            guild_id: c.guild_id,
            channel_id: c.channel_id,
        }),
        IngestOp::ChannelDelete {
            guild_id,
            channel_id,
        } => Some(Key::Channel {
            guild_id: *guild_id,
            channel_id: *channel_id,
        }),
        _ => None,
    }
}
