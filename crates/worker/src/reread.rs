//! Access re-reads. serenity hands events to handlers in any order and Discord
//! access events carry no version, so two quick updates of one member, role
//! set or channel could land stale. Each such event therefore also schedules a
//! REST re-read of that entity a little later (debounced per entity); the
//! re-read's state is written like any event. Once Discord is quiet, the
//! database holds Discord's current state whatever order the events came in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use observer_db::ingest::{IngestOp, MemberInfo, RoleInfo};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::batcher::Queued;
use crate::map;
use crate::metrics::Metrics;
use crate::rest::{Fetched, Rest, RestError};

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
    pub metrics: Arc<Metrics>,
    pub access: Arc<crate::botaccess::BotAccess>,
}

impl Rereader {
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<Key>) {
        let mut pending: HashMap<Key, Instant> = HashMap::new();
        loop {
            let next = pending.values().min().copied();
            tokio::select! {
                key = rx.recv() => match key {
                    Some(k) => self.schedule(&mut pending, k, MAX_PENDING),
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

    /// Schedules a re-read of `k` unless one is pending; beyond `max` pending
    /// keys the new one is skipped, counted and logged (the live event was
    /// written already; only its correction is lost).
    fn schedule(&self, pending: &mut HashMap<Key, Instant>, k: Key, max: usize) {
        if pending.contains_key(&k) {
            return;
        }
        if pending.len() >= max {
            self.metrics.reread_dropped.inc();
            let dropped = self.metrics.reread_dropped.get();
            // First drop, then one line per thousand: a flood must not flood the log too.
            if dropped % 1000 == 1 {
                tracing::warn!(
                    ?k,
                    pending = pending.len(),
                    dropped,
                    "too many access re-reads pending; skipping"
                );
            }
            return;
        }
        pending.insert(k, Instant::now() + self.delay);
    }

    async fn reread(&self, key: Key) -> Result<Vec<IngestOp>, RestError> {
        Ok(match key {
            Key::Member { guild_id, user_id } => {
                // Before the request: the answer is at least this new.
                let observed_at = chrono::Utc::now();
                match self.rest.member(guild_id, user_id).await? {
                    Fetched::Ok(m) => vec![IngestOp::MemberUpsert(member(
                        guild_id,
                        user_id,
                        &m,
                        observed_at,
                    ))],
                    Fetched::Forbidden { .. } | Fetched::NotFound => {
                        vec![IngestOp::MemberRemove {
                            guild_id,
                            user_id,
                            observed_at,
                        }]
                    }
                }
            }
            Key::Roles { guild_id } => match self.rest.roles(guild_id).await? {
                Fetched::Ok(list) => vec![IngestOp::RolesSync {
                    guild_id,
                    roles: list.iter().map(|r| role(guild_id, r)).collect(),
                }],
                Fetched::Forbidden { .. } | Fetched::NotFound => vec![],
            },
            Key::Channel {
                guild_id,
                channel_id,
            } => match self
                .rest
                .fetch::<serenity::all::GuildChannel>(&format!("/channels/{channel_id}"))
                .await?
            {
                Fetched::Ok(c) => vec![IngestOp::ChannelUpsert(map::channel(&c))],
                // The channel exists but the bot may not view it: keep the
                // event's state (viewers' access is computed from it) and mark it.
                Fetched::Forbidden { code } => {
                    vec![self.access.refused(guild_id, channel_id, code)]
                }
                Fetched::NotFound => vec![IngestOp::ChannelDelete {
                    guild_id,
                    channel_id,
                }],
            },
        })
    }
}

/// The member as stored; the id asked for is the one written (Discord
/// answers for that user, with or without echoing it).
fn member(
    guild_id: i64,
    user_id: i64,
    m: &observer_discord::Member,
    observed_at: chrono::DateTime<chrono::Utc>,
) -> MemberInfo {
    MemberInfo {
        guild_id,
        user_id,
        role_ids: m.role_ids(),
        nick: m.nick.clone(),
        joined_at: m.joined_at,
        communication_disabled_until: m.communication_disabled_until,
        observed_at,
    }
}

fn role(guild_id: i64, r: &observer_discord::Role) -> RoleInfo {
    RoleInfo {
        guild_id,
        role_id: r.id.get(),
        name: r.name.clone(),
        // A bitset, not an id: all 64 bits kept (see `map::perms`);
        // unparseable means no permissions (fail closed).
        permissions: map::perms(r.permission_bits()),
        position: i32::try_from(r.position).unwrap_or(0),
    }
}

/// The re-read an event calls for, if any.
pub fn key_for(op: &IngestOp) -> Option<Key> {
    match op {
        IngestOp::MemberUpsert(m) => Some(Key::Member {
            guild_id: m.guild_id,
            user_id: m.user_id,
        }),
        IngestOp::MemberRemove {
            guild_id, user_id, ..
        } => Some(Key::Member {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_beyond_the_cap_are_counted_not_silently_dropped() {
        let metrics = Metrics::new();
        let (ops, _rx) = mpsc::channel(1);
        let rr = Rereader {
            rest: Rest::builder("http://127.0.0.1:9")
                .bot_token("t".to_owned().into())
                .build()
                .unwrap(),
            ops,
            delay: Duration::from_secs(1),
            metrics: Arc::clone(&metrics),
            access: crate::botaccess::BotAccess::new(Arc::clone(&metrics)),
        };
        let mut pending = HashMap::new();
        let key = |u| Key::Member {
            guild_id: 1,
            user_id: u,
        };
        rr.schedule(&mut pending, key(1), 2);
        rr.schedule(&mut pending, key(2), 2);
        rr.schedule(&mut pending, key(1), 2);
        assert_eq!(
            metrics.reread_dropped.get(),
            0,
            "a pending key is not a drop"
        );
        rr.schedule(&mut pending, key(3), 2);
        rr.schedule(&mut pending, key(4), 2);
        assert_eq!(pending.len(), 2);
        assert_eq!(metrics.reread_dropped.get(), 2);
        assert!(metrics
            .render()
            .contains("observer_worker_reread_dropped_total 2"));
    }
}
