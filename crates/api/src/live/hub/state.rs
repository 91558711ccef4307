//! The hub's shared state: subscribers, per-viewer access sets, the
//! per-guild access cache and the index deliveries look channels up in, all
//! under one lock ([`Inner::state`]); plus the wake-up flags the listener
//! sets and the reader clears.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::{HashMap, HashSet, HubConfig, LiveEvent};
use crate::live::metrics::LiveMetrics;
use chrono::{DateTime, Utc};
use observer_db::access::{visible_channels, ChannelAccess, GuildAccessData, MemberData};
use observer_db::events::{Cursor, Scope};
use observer_db::Db;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EndReason {
    SlowConsumer,
    Forbidden,
}

/// The live access state of one viewer, shared by their subscriptions.
pub(super) struct ViewerState {
    pub(super) subs: usize,
    /// guild id → membership (absent: not a member).
    pub(super) members: HashMap<i64, MemberData>,
    /// channel id → (guild id, access), visible channels only (`read` decides
    /// delivery: a voice channel without CONNECT is visible, its chat is not).
    pub(super) visible: HashMap<i64, (i64, ChannelAccess)>,
    /// Earliest future timeout end among the memberships: access may widen then.
    pub(super) next_expiry: Option<DateTime<Utc>>,
}

impl ViewerState {
    pub(super) fn recompute(&mut self, guilds: &HashMap<i64, GuildAccessData>, now: DateTime<Utc>) {
        self.visible.clear();
        for (gid, m) in &self.members {
            if let Some(g) = guilds.get(gid) {
                for (cid, a) in visible_channels(g, Some(m), now) {
                    self.visible.insert(cid, (*gid, a));
                }
            }
        }
        self.next_expiry = self
            .members
            .values()
            .filter_map(|m| m.communication_disabled_until)
            .filter(|t| *t > now)
            .min();
    }

    pub(super) fn sees(&self, guild_id: i64, channel_id: i64) -> bool {
        self.access(guild_id, channel_id).is_some()
    }

    /// The viewer's live access to a channel, when it may see it at all.
    pub(super) fn access(&self, guild_id: i64, channel_id: i64) -> Option<ChannelAccess> {
        self.visible
            .get(&channel_id)
            .filter(|(g, a)| *g == guild_id && a.read)
            .map(|(_, a)| *a)
    }

    /// Whether anything in `scope` is readable; the unscoped subscription
    /// ("everything I may see") is never forbidden, it may simply be quiet.
    /// A channel listed in the scope counts only if its messages are readable
    /// (a voice channel without CONNECT is visible, its chat is not); a guild
    /// scope counts if the guild is visible at all, like its other queries.
    pub(super) fn scope_visible(&self, scope: &Scope) -> bool {
        match (&scope.channel_ids, scope.guild_id) {
            (None, None) => true,
            (Some(ids), g) => ids.iter().any(|c| {
                self.visible
                    .get(c)
                    .is_some_and(|(vg, a)| a.read && g.is_none_or(|g| g == *vg))
            }),
            (None, Some(g)) => self.visible.values().any(|(vg, _)| *vg == g),
        }
    }
}

pub(super) struct Sub {
    pub(super) viewer: i64,
    pub(super) scope: Scope,
    /// `scope.channel_ids` as a set: checked for every event (up to 500 ids).
    pub(super) channels: Option<HashSet<i64>>,
    pub(super) tx: mpsc::Sender<Arc<LiveEvent>>,
    pub(super) end: Arc<OnceLock<EndReason>>,
}

impl Sub {
    pub(super) fn wants(&self, guild_id: i64, channel_id: i64) -> bool {
        self.scope.guild_id.is_none_or(|g| g == guild_id)
            && self
                .channels
                .as_ref()
                .is_none_or(|c| c.contains(&channel_id))
    }
}

#[derive(Default)]
pub(super) struct State {
    /// Message events read (and delivered) up to here; None before the first read.
    pub(super) cursor: Option<Cursor>,
    pub(super) access_cursor: Option<Cursor>,
    pub(super) subs: HashMap<u64, Sub>,
    pub(super) viewers: HashMap<i64, ViewerState>,
    /// Access data of every guild some active viewer belongs to.
    pub(super) guilds: HashMap<i64, GuildAccessData>,
    /// channel id → subscriptions that may want its events: narrows the
    /// subscribers [`deliver`] looks at to those of viewers who see the
    /// channel. Candidates only — each is checked against `subs` and
    /// `viewers` as before — so a stale entry can cost time, never leak.
    /// Dropped (None) by every change to `subs` or to a viewer's access;
    /// rebuilt on the next delivery. A change that did not drop it would
    /// leave a subscriber out: every such site calls [`State::reindex`].
    pub(super) index: Option<HashMap<i64, Vec<u64>>>,
    /// Viewers whose data may predate access changes the hub already applied.
    pub(super) dirty: BTreeSet<i64>,
}

impl State {
    /// Marks the delivery index stale (see `index`).
    pub(super) fn reindex(&mut self) {
        self.index = None;
    }

    /// The delivery index, rebuilt if stale.
    pub(super) fn take_index(&mut self) -> HashMap<i64, Vec<u64>> {
        if let Some(idx) = self.index.take() {
            return idx;
        }
        let mut idx: HashMap<i64, Vec<u64>> = HashMap::default();
        for (id, sub) in &self.subs {
            let Some(v) = self.viewers.get(&sub.viewer) else {
                continue;
            };
            for (c, (g, a)) in &v.visible {
                if a.read && sub.wants(*g, *c) {
                    idx.entry(*c).or_default().push(*id);
                }
            }
        }
        idx
    }

    /// Ends every subscription of `viewer` whose whole scope became invisible.
    pub(super) fn enforce_scopes(&mut self, viewer: i64, metrics: &LiveMetrics) {
        let Some(v) = self.viewers.get(&viewer) else {
            return;
        };
        let ended: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, s)| s.viewer == viewer && !v.scope_visible(&s.scope))
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            if let Some(s) = self.subs.remove(&id) {
                self.reindex();
                let _ = s.end.set(EndReason::Forbidden);
                metrics.forbidden.inc();
                self.release_viewer(s.viewer);
            }
        }
        metrics.subscribers.set(self.subs.len() as i64);
    }

    pub(super) fn release_viewer(&mut self, viewer: i64) {
        let gone = match self.viewers.get_mut(&viewer) {
            Some(v) => {
                v.subs = v.subs.saturating_sub(1);
                v.subs == 0
            }
            None => false,
        };
        if gone {
            self.reindex();
            if let Some(v) = self.viewers.remove(&viewer) {
                // Drop cached guilds nobody watches any more.
                for gid in v.members.keys() {
                    if !self.viewers.values().any(|o| o.members.contains_key(gid)) {
                        self.guilds.remove(gid);
                    }
                }
            }
            self.dirty.remove(&viewer);
        }
    }
}

#[derive(Default)]
pub(super) struct Pending {
    pub(super) events: AtomicBool,
    pub(super) access: AtomicBool,
}

pub(super) struct Inner {
    pub(super) db: Db,
    pub(super) cfg: HubConfig,
    pub(super) metrics: LiveMetrics,
    pub(super) state: Mutex<State>,
    pub(super) pending: Pending,
    pub(super) kick: Arc<Notify>,
    pub(super) ready: watch::Sender<bool>,
    pub(super) next_id: AtomicU64,
    pub(super) listener_pid: AtomicI32,
    pub(super) started: AtomicBool,
    /// Cancelled when the hub is shut down or dropped: its tasks hold it weakly and may
    /// be waiting on the database, on a thread of their own.
    pub(super) stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Inner {
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; the data stays
        // consistent enough (every mutation is a few map operations) to go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
