//! Guild snapshots over REST: what GUILD_CREATE does not carry.
//!
//! Without the GUILD_PRESENCES intent Discord's GUILD_CREATE holds only the
//! bot's own member, and it never says who is in a thread (a thread's
//! `member` there is the bot's own membership). Access to a private thread
//! depends on exactly that, so on every guild snapshot (each GUILD_CREATE:
//! first start, a re-identify that could not resume, the end of an outage)
//! the worker lists:
//! - every guild member (`GET /guilds/{id}/members`, 1,000 per page), written
//!   as one complete listing ([`IngestOp::MembersSync`]);
//! - the archived threads of every text, announcement, forum and media
//!   channel (`GET /channels/{id}/threads/archived/private` and `/public`,
//!   paged by archive time with `before`), upserted as channels and handed
//!   to backfill, since GUILD_CREATE only lists active threads (an archived
//!   public thread is as visible in Discord as an active one); a 403 means
//!   the bot may not list them there and is skipped quietly;
//! - the members of every private thread, active or archived
//!   (`GET /channels/{id}/thread-members?with_member=true`, 100 per page),
//!   each written as a complete listing ([`IngestOp::ThreadMembersSync`]).
//!
//! THREAD_LIST_SYNC (the bot gained access to channels) lists the members of
//! the private threads it names.
//!
//! Public and announcement threads are not listed: their membership does not
//! decide who may see them (the parent channel's permissions do), so listing
//! them would cost a request per thread for nothing.
//!
//! A listing is written only when it is complete. Each carries the time it
//! started as its observation time, so the database's ordering rule (see
//! `observer_db::ingest`, its `threads` module) keeps any newer event that arrived
//! meanwhile: a stale listing never removes a newer add. Any failure is
//! logged and counted; the next snapshot of the guild tries again.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use observer_db::ingest::{IngestOp, MemberInfo};
use serenity::all::GuildChannel;
use tokio::sync::mpsc;

use crate::batcher::Queued;
use crate::map;
use crate::metrics::Metrics;
use crate::requests::{SnapshotRequest, PRIVATE_THREAD};
use crate::rest::{Rest, RestError};
use observer_discord::Member;

/// Members per page of the guild member listing (Discord's maximum).
pub const MEMBER_PAGE: usize = 1000;
/// Thread members per page (Discord's maximum).
pub const THREAD_MEMBER_PAGE: usize = 100;
/// Archived threads per page (Discord's maximum).
pub const ARCHIVED_PAGE: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Rest(#[from] RestError),
    #[error("the ingest queue is closed")]
    Closed,
}

/// An archived thread found by a listing: its id and channel type.
type Found = (i64, i16);

#[derive(Debug, Clone, Copy)]
enum Archived {
    Private,
    Public,
}

#[derive(Clone)]
pub struct Snapshotter {
    pub rest: Rest,
    pub ops: mpsc::Sender<Queued>,
    pub metrics: Arc<Metrics>,
    /// Listings in flight at once (per guild; guilds run one after another).
    pub concurrency: usize,
    /// Archived threads are not in GUILD_CREATE, so backfill never heard of
    /// them: the ones found here are handed to it (None: backfill is off).
    pub backfill: Option<mpsc::UnboundedSender<crate::requests::BackfillRequest>>,
}

impl Snapshotter {
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<SnapshotRequest>) {
        while let Some(req) = rx.recv().await {
            self.guild(req).await;
            self.metrics.snapshot_pending.dec();
        }
    }

    async fn guild(&self, req: SnapshotRequest) {
        let started = std::time::Instant::now();
        let g = req.guild_id;
        tracing::info!(
            guild = g,
            members = req.members,
            parents = req.parents.len(),
            active_private_threads = req.private_threads.len(),
            "snapshot started"
        );
        let mut members = None;
        if req.members {
            match self.members(g).await {
                Ok(n) => members = n,
                Err(err) => self.failed(g, "member listing", &err),
            }
        }

        let mut threads = req.private_threads.clone();
        // Collected first: a borrowing iterator adapter inside the stream
        // makes the spawned future's lifetimes too general for the compiler.
        let mut listings: Vec<(i64, Archived)> = Vec::with_capacity(req.parents.len() * 2);
        for p in &req.parents {
            listings.push((*p, Archived::Private));
            listings.push((*p, Archived::Public));
        }
        let archived: Vec<(i64, Result<Vec<Found>, SnapshotError>)> = futures::stream::iter(
            listings,
        )
        .map(|(parent, which)| async move { (parent, self.archived(g, parent, which).await) })
        .buffer_unordered(self.concurrency.max(1))
        .collect()
        .await;
        let mut archived_ids = Vec::new();
        for (parent, res) in archived {
            match res {
                Ok(found) => {
                    for (id, kind) in found {
                        archived_ids.push(id);
                        if kind == PRIVATE_THREAD {
                            threads.push(id);
                        }
                    }
                }
                Err(err) => self.failed(g, &format!("archived threads of {parent}"), &err),
            }
        }
        archived_ids.sort_unstable();
        archived_ids.dedup();
        if let (Some(tx), false) = (&self.backfill, archived_ids.is_empty()) {
            let _ = tx.send(crate::requests::BackfillRequest {
                guild_id: g,
                channels: archived_ids,
                seen_at: Utc::now(),
                only_unreadable: false,
            });
        }
        threads.sort_unstable();
        threads.dedup();

        let listed: Vec<Result<bool, SnapshotError>> =
            futures::stream::iter(threads.iter().copied())
                .map(|t| self.thread_members(g, t))
                .buffer_unordered(self.concurrency.max(1))
                .collect()
                .await;
        let mut done = 0usize;
        for res in listed {
            match res {
                Ok(true) => done += 1,
                Ok(false) => {}
                Err(err) => self.failed(g, "thread member listing", &err),
            }
        }
        self.metrics.snapshot_done.inc();
        tracing::info!(
            guild = g,
            members = members.unwrap_or(0),
            members_complete = members.is_some(),
            private_threads = threads.len(),
            private_threads_listed = done,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot finished"
        );
    }

    fn failed(&self, guild_id: i64, what: &str, err: &SnapshotError) {
        self.metrics.snapshot_errors.inc();
        tracing::warn!(guild = guild_id, what, error = %err, "snapshot listing failed; the next snapshot retries");
    }

    async fn send(&self, op: IngestOp) -> Result<(), SnapshotError> {
        self.metrics.ops_queued.inc();
        self.ops
            .send(Queued::new(op))
            .await
            .map_err(|_| SnapshotError::Closed)
    }

    /// Lists every member of the guild; returns how many (None when the
    /// listing was refused). Written only when the listing completed.
    async fn members(&self, guild_id: i64) -> Result<Option<usize>, SnapshotError> {
        // Before the first request: the listing is at least this new.
        let observed_at = Utc::now();
        let mut after = 0i64;
        let mut all: Vec<MemberInfo> = Vec::new();
        loop {
            let Some(page) = self
                .rest
                .members_page(guild_id, after, MEMBER_PAGE)
                .await?
                .ok()
            else {
                // 403 (no GUILD_MEMBERS intent, or no longer in the guild) or
                // 404: nothing complete to write.
                tracing::warn!(
                    guild = guild_id,
                    "member listing refused (GUILD_MEMBERS intent off, or the guild is gone)"
                );
                return Ok(None);
            };
            let len = page.len();
            let last = page.iter().filter_map(Member::user_id).max();
            all.extend(page.iter().filter_map(|m| info(guild_id, m, observed_at)));
            match last {
                Some(last) if len >= MEMBER_PAGE && last > after => after = last,
                _ => break,
            }
        }
        let n = all.len();
        self.metrics.snapshot_members.inc_by(n as u64);
        self.send(IngestOp::MembersSync {
            guild_id,
            members: all,
            observed_at,
        })
        .await?;
        Ok(Some(n))
    }

    /// The archived threads under `parent`, upserted as channels; returns
    /// their ids and types.
    async fn archived(
        &self,
        guild_id: i64,
        parent: i64,
        which: Archived,
    ) -> Result<Vec<Found>, SnapshotError> {
        let mut ids = Vec::new();
        let mut before: Option<String> = None;
        let private = matches!(which, Archived::Private);
        loop {
            let Some(page) = self
                .rest
                .archived_threads::<GuildChannel>(parent, private, before.as_deref(), ARCHIVED_PAGE)
                .await?
                .ok()
            else {
                // 403: the bot may not list these threads here (private
                // ones need MANAGE_THREADS, all need READ_MESSAGE_HISTORY);
                // 404: the channel is gone. Not an error.
                return Ok(ids);
            };
            let mut oldest: Option<DateTime<Utc>> = None;
            for t in &page.threads {
                let mut info = map::channel(t);
                // The channel route's threads carry no guild id on every
                // Discord version; they belong to the parent's guild.
                info.guild_id = guild_id;
                let archived_at = t
                    .thread_metadata
                    .as_ref()
                    .and_then(|m| m.archive_timestamp.as_ref())
                    .and_then(map::ts);
                if let Some(at) = archived_at {
                    oldest = Some(oldest.map_or(at, |o| o.min(at)));
                }
                ids.push((info.channel_id, info.kind));
                self.metrics.snapshot_archived_threads.inc();
                self.send(IngestOp::ChannelUpsert(info)).await?;
            }
            match oldest {
                Some(at) if page.has_more => {
                    // `Z`, not `+00:00`: no escaping needed in a query string.
                    before = Some(at.to_rfc3339_opts(SecondsFormat::Micros, true));
                }
                _ => return Ok(ids),
            }
        }
    }

    /// Lists the members of one thread and writes them as a complete
    /// listing; `false` when the listing was refused (no intent, thread gone).
    async fn thread_members(&self, guild_id: i64, thread_id: i64) -> Result<bool, SnapshotError> {
        let observed_at = Utc::now();
        let mut after = 0i64;
        let mut users = Vec::new();
        loop {
            let Some(page) = self
                .rest
                .thread_members_page(thread_id, after, THREAD_MEMBER_PAGE)
                .await?
                .ok()
            else {
                tracing::debug!(
                    guild = guild_id,
                    thread = thread_id,
                    "thread member listing refused (GUILD_MEMBERS intent off, or the thread is gone)"
                );
                return Ok(false);
            };
            let len = page.len();
            let last = page.iter().map(|m| m.user_id.get()).max();
            users.extend(page.iter().map(|m| m.user_id.get()));
            match last {
                Some(last) if len >= THREAD_MEMBER_PAGE && last > after => after = last,
                _ => break,
            }
        }
        users.sort_unstable();
        users.dedup();
        self.metrics.snapshot_threads.inc();
        self.send(IngestOp::ThreadMembersSync {
            guild_id,
            thread_id,
            user_ids: users,
            observed_at,
        })
        .await?;
        Ok(true)
    }
}

/// A listed member as stored; one without a user object (never the case
/// in a listing) is skipped.
fn info(guild_id: i64, m: &Member, observed_at: DateTime<Utc>) -> Option<MemberInfo> {
    Some(MemberInfo {
        guild_id,
        user_id: m.user_id()?,
        role_ids: m.role_ids(),
        nick: m.nick.clone(),
        joined_at: m.joined_at,
        communication_disabled_until: m.communication_disabled_until,
        observed_at,
    })
}
