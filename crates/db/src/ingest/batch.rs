//! A batch: access ops in order (runs of one kind in one statement), then the
//! message ops merged per message and written in rounds.

use std::collections::BTreeMap;

use chrono::Utc;
use sqlx::PgConnection;

use super::access::apply_access_run;
use super::merge::{merge_messages, MsgState};
use super::rounds::{write_rounds, Revisions};
use super::{BatchStats, IngestOp};
use crate::{Result, WorkerConn, WorkerTx};

/// Applies `ops` in one transaction with few statements. Access ops are applied
/// in the order given (runs of the same kind in one statement); message ops are
/// merged per message and applied in bulk.
pub async fn write_batch(tx: &mut WorkerTx, ops: &[IngestOp]) -> Result<BatchStats> {
    write_batch_in(tx, ops).await
}

/// [`write_batch`] on the writer's own session ([`crate::Db::worker_conn`]),
/// committed. A batch of message creates only (live traffic) is first written
/// as one autocommit statement: one round trip instead of three (`begin`,
/// the statement, `commit`), and round trips are most of an event's latency
/// on a busy machine. Creates that met a stored row (a replay or backfill
/// overlap) are then merged in a transaction; that split is safe because the
/// first statement only adds new rows, their events and their first
/// versions, each of which is true history on its own, and a retry of the
/// whole batch finds them stored and changes nothing. Any other batch runs
/// in one transaction, as [`write_batch`].
pub async fn write_batch_on(session: &mut WorkerConn, ops: &[IngestOp]) -> Result<BatchStats> {
    if !ops
        .iter()
        .all(|op| matches!(op, IngestOp::MessageCreate(_)))
    {
        let mut tx = session.begin().await?;
        let stats = write_batch_in(&mut tx, ops).await?;
        tx.commit().await?;
        return Ok(stats);
    }
    let mut stats = BatchStats::of(ops);
    let (merged, mut revisions) = prepare_messages(ops, &mut stats);
    let left = write_rounds(session.conn(), merged, &mut revisions, &mut stats, 0..1).await?;
    let touched = crate::support::touched(ops);
    let support = crate::support::any_support_thread(session.conn(), &touched).await?;
    if !left.is_empty() || support {
        let mut tx = session.begin().await?;
        let left = write_rounds(&mut tx, left, &mut revisions, &mut stats, 1..ROUNDS).await?;
        settled(&left)?;
        // Not in the first statement's transaction: a crash before this
        // commit leaves the conversation behind its messages until the
        // worker's startup sweep (crate::support).
        if support {
            crate::support::refresh_checked(&mut tx, &touched).await?;
        }
        tx.commit().await?;
    }
    Ok(stats)
}

/// The message ops of `ops` merged and counted, ready for [`write_rounds`].
fn prepare_messages(
    ops: &[IngestOp],
    stats: &mut BatchStats,
) -> (BTreeMap<(i64, i64), MsgState>, Option<Revisions>) {
    let (merged, revisions) = merge_messages(ops, Utc::now());
    stats.messages = merged.len();
    stats.revisions_offered = revisions.len();
    (merged, Some(Revisions::from(revisions)))
}

async fn write_batch_in(conn: &mut PgConnection, ops: &[IngestOp]) -> Result<BatchStats> {
    let mut stats = BatchStats::of(ops);
    // Access ops apply in order, in runs of one kind; message ops are
    // merged (one state and a set of versions per message) and written last.
    let mut run: Vec<&IngestOp> = Vec::new();
    for access in ops.iter().filter(|op| op.is_access()) {
        stats.access_ops += 1;
        if let Some(prev) = run.last() {
            if std::mem::discriminant(*prev) != std::mem::discriminant(access) || !batchable(access)
            {
                apply_access_run(conn, &run).await?;
                run.clear();
            }
        }
        run.push(access);
    }
    if !run.is_empty() {
        apply_access_run(conn, &run).await?;
    }

    let (merged, mut revisions) = prepare_messages(ops, &mut stats);
    let left = write_rounds(conn, merged, &mut revisions, &mut stats, 0..ROUNDS).await?;
    settled(&left)?;
    // After the merge: a deletion reported live in this same batch keeps its
    // own time (`mark_gone` skips tombstones).
    for op in ops {
        if let IngestOp::MessagesGone {
            guild_id,
            channel_id,
            message_ids,
            detected_at,
        } = op
        {
            let n = crate::reconcile::mark_gone(
                conn,
                *guild_id,
                *channel_id,
                message_ids,
                *detected_at,
            )
            .await?;
            stats.messages_changed += usize::try_from(n).unwrap_or(0);
            stats.events_deleted += usize::try_from(n).unwrap_or(0);
        }
    }
    // Last, from what is now stored: the conversations this batch touched.
    crate::support::refresh(conn, &crate::support::touched(ops)).await?;
    Ok(stats)
}

/// Rounds of [`write_rounds`] before giving up on concurrent writers.
const ROUNDS: u32 = 8;

fn settled(left: &BTreeMap<(i64, i64), MsgState>) -> Result<()> {
    if left.is_empty() {
        return Ok(());
    }
    Err(crate::Error::Conflict(format!(
        "{} messages kept conflicting with concurrent writers",
        left.len()
    )))
}

fn batchable(op: &IngestOp) -> bool {
    matches!(
        op,
        IngestOp::ChannelUpsert(_)
            | IngestOp::RoleUpsert(_)
            | IngestOp::MemberUpsert(_)
            | IngestOp::ChannelBotAccess(_)
    )
}
