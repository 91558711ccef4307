//! Access for live delivery: a viewer's access data loaded (and checked
//! against the SQL rule) before it registers, access changes applied as
//! they arrive, and timeouts that end.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use super::state::Inner;
use super::HashMap;
use chrono::{DateTime, Utc};
use observer_db::access::{visible_channels, GuildAccessData, MemberData};
use observer_db::events::{self, AccessEventRow, Cursor};
use observer_db::{access_data, Db};

/// What a viewer's subscription needs, loaded before registering.
pub(super) struct LoadedViewer {
    pub(super) guilds: BTreeMap<i64, GuildAccessData>,
    pub(super) members: HashMap<i64, MemberData>,
    /// Access events at or below this cursor are reflected in the data.
    pub(super) loaded_at: Cursor,
}

pub(super) async fn load_viewer(db: &Db, viewer: i64) -> observer_db::Result<LoadedViewer> {
    let mut tx = db.fanout().await?;
    // Read the watermark first: every access change below it committed before
    // the loads below start, so they see it.
    let loaded_at = events::head(&mut tx).await?;
    let guild_ids = events::member_guild_ids(&mut tx, viewer).await?;
    let guilds = access_data::load_guilds(&mut tx, &guild_ids).await?;
    let members = access_data::load_members(&mut tx, &guild_ids, &[viewer]).await?;
    tx.commit().await?;
    Ok(LoadedViewer {
        guilds,
        members: members.into_iter().map(|((g, _), m)| (g, m)).collect(),
        loaded_at,
    })
}

/// The visible set the Rust rule computes from `l`, as (guild, channel, read, history).
pub(super) fn rust_visible(
    l: &LoadedViewer,
    now: DateTime<Utc>,
) -> BTreeSet<(i64, i64, bool, bool)> {
    let mut out = BTreeSet::new();
    for (gid, m) in &l.members {
        if let Some(g) = l.guilds.get(gid) {
            for (cid, a) in visible_channels(g, Some(m), now) {
                out.insert((*gid, cid, a.read, a.history));
            }
        }
    }
    out
}

/// Holds the in-memory set to what RLS says for the viewer. A difference is
/// either a concurrent access change (reload and compare again) or a
/// divergence between the two implementations of the rule (a bug: refuse).
pub(super) async fn cross_check(db: &Db, viewer: i64, l: &LoadedViewer) -> anyhow::Result<()> {
    let rls = |db: Db| async move {
        let mut tx = db.viewer(viewer).await?;
        let rows = events::viewer_channels(&mut tx).await?;
        tx.commit().await?;
        Ok::<_, observer_db::Error>(
            rows.into_iter()
                .map(|c| (c.guild_id, c.channel_id, c.read, c.history))
                .collect::<BTreeSet<_>>(),
        )
    };
    let ours = rust_visible(l, Utc::now());
    let theirs = rls(db.clone()).await?;
    if ours == theirs {
        return Ok(());
    }
    // Access may have changed between the two reads: compare fresh data once
    // more before calling it a divergence.
    let again = load_viewer(db, viewer).await?;
    let ours = rust_visible(&again, Utc::now());
    let theirs = rls(db.clone()).await?;
    if ours == theirs {
        return Ok(());
    }
    anyhow::bail!(
        "in-memory access set differs from RLS ({} vs {} channels)",
        ours.len(),
        theirs.len()
    )
}

/// Reloads what the access changes (and dirty viewers) touch, with a fixed
/// number of queries whatever the number of viewers, then recomputes affected
/// viewers and ends subscriptions whose whole scope became invisible.
pub(super) async fn refresh_access(
    inner: &Inner,
    tx: &mut observer_db::FanoutTx,
    changes: &[AccessEventRow],
    dirty: &BTreeSet<i64>,
) -> observer_db::Result<()> {
    let active: Vec<i64> = inner.state().viewers.keys().copied().collect();
    let active_set: BTreeSet<i64> = active.iter().copied().collect();
    let mut guild_wide: BTreeSet<i64> = BTreeSet::new();
    let mut pairs: BTreeSet<(i64, i64)> = BTreeSet::new();
    for c in changes {
        match c.user_id {
            None => {
                guild_wide.insert(c.guild_id);
            }
            Some(u) if active_set.contains(&u) => {
                pairs.insert((c.guild_id, u));
            }
            Some(_) => {}
        }
    }
    for v in dirty.iter().filter(|v| active_set.contains(v)) {
        for g in events::member_guild_ids(tx, *v).await? {
            pairs.insert((g, *v));
        }
        let st = inner.state();
        if let Some(vs) = st.viewers.get(v) {
            pairs.extend(vs.members.keys().map(|g| (*g, *v)));
        }
    }
    if guild_wide.is_empty() && pairs.is_empty() {
        return Ok(());
    }
    let guild_ids: Vec<i64> = guild_wide
        .iter()
        .copied()
        .chain(pairs.iter().map(|p| p.0))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let users: Vec<i64> = if guild_wide.is_empty() {
        pairs
            .iter()
            .map(|p| p.1)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    } else {
        active.clone()
    };
    let guilds = access_data::load_guilds(tx, &guild_ids).await?;
    let members = access_data::load_members(tx, &guild_ids, &users).await?;
    inner.metrics.access_refreshes.inc();

    let now = Utc::now();
    let mut st = inner.state();
    let st = &mut *st;
    let mut changed: BTreeSet<i64> = BTreeSet::new();
    // Viewers that registered while this refresh was reading: their members
    // were not loaded here, so "no row" would wrongly mean "not a member".
    // Their own load may predate the changes read here: reload them next.
    let mut newcomers: Vec<i64> = Vec::new();
    for (vid, v) in st.viewers.iter_mut() {
        if !active_set.contains(vid) {
            newcomers.push(*vid);
            continue;
        }
        for gid in &guild_ids {
            let concerned = guild_wide.contains(gid) || pairs.contains(&(*gid, *vid));
            if !concerned {
                continue;
            }
            let was = v.members.contains_key(gid);
            match members.get(&(*gid, *vid)) {
                Some(m) => {
                    v.members.insert(*gid, m.clone());
                    changed.insert(*vid);
                }
                None if was => {
                    v.members.remove(gid);
                    changed.insert(*vid);
                }
                None => {}
            }
            if guild_wide.contains(gid) && was {
                changed.insert(*vid);
            }
        }
    }
    for gid in &guild_ids {
        let watched = st.viewers.values().any(|v| v.members.contains_key(gid));
        match guilds.get(gid) {
            Some(g) if watched => {
                st.guilds.insert(*gid, g.clone());
            }
            _ => {
                st.guilds.remove(gid);
            }
        }
    }
    for vid in &changed {
        let guilds = &st.guilds;
        if let Some(v) = st.viewers.get_mut(vid) {
            v.recompute(guilds, now);
        }
    }
    if !changed.is_empty() {
        st.reindex();
    }
    for vid in changed {
        st.enforce_scopes(vid, &inner.metrics);
    }
    if !newcomers.is_empty() {
        st.dirty.extend(newcomers);
        inner.pending.access.store(true, Ordering::SeqCst);
        inner.kick.notify_one();
    }
    Ok(())
}

/// A timeout that ends is a change of time, not of data (no access event):
/// recompute, in memory, the viewers whose earliest timeout end has passed.
pub(super) fn expire_timeouts(inner: &Inner) {
    let now = Utc::now();
    let mut st = inner.state();
    let st = &mut *st;
    let due: Vec<i64> = st
        .viewers
        .iter()
        .filter(|(_, v)| v.next_expiry.is_some_and(|t| t <= now))
        .map(|(id, _)| *id)
        .collect();
    for vid in due {
        let guilds = &st.guilds;
        if let Some(v) = st.viewers.get_mut(&vid) {
            v.recompute(guilds, now);
        }
        st.reindex();
        st.enforce_scopes(vid, &inner.metrics);
    }
}
