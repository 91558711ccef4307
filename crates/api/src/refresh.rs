//! Background refresh of logged-in viewers' guild memberships, using their
//! stored OAuth token (refreshed first when it has expired). Complements the
//! worker's member events: it also catches changes the gateway never sent
//! while the worker was down.

use std::time::Duration;

use chrono::Utc;
use observer_db::auth as dbauth;

use crate::discord::DiscordError;
use crate::login::{error_chain, sync_memberships, token_row, BackendError};
use crate::state::AppState;

/// Users refreshed per tick; the rest wait for the next tick.
const BATCH: i64 = 50;

/// Runs forever; the caller aborts the task at shutdown.
pub async fn run(state: AppState) {
    let interval = state.config.membership_refresh_interval;
    let tick = (interval / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(e) = refresh_due(&state, interval).await {
            tracing::warn!(error = %error_chain(&e), "membership refresh pass failed");
        }
    }
}

/// One pass: refreshes every user whose memberships are older than `interval`.
pub async fn refresh_due(state: &AppState, interval: Duration) -> Result<usize, BackendError> {
    let cutoff =
        Utc::now() - chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::minutes(10));
    let due = {
        let mut tx = state.db.auth().await?;
        let due = dbauth::users_due_for_refresh(&mut tx, cutoff, BATCH).await?;
        tx.commit().await?;
        due
    };
    let mut done = 0;
    for user_id in due {
        match refresh_user(state, user_id).await {
            Ok(()) => done += 1,
            Err(e) => {
                tracing::warn!(user_id, error = %error_chain(&e), "membership refresh failed")
            }
        }
    }
    Ok(done)
}

/// Refreshes one user's memberships now.
pub async fn refresh_user(state: &AppState, user_id: i64) -> Result<(), BackendError> {
    let token = {
        let mut tx = state.db.auth().await?;
        let t = dbauth::oauth_token(&mut tx, user_id).await?;
        tx.commit().await?;
        t
    };
    let Some(mut token) = token else {
        return Ok(());
    };
    if token.expires_at <= Utc::now() + chrono::Duration::seconds(60) {
        let Some(refresh) = token.refresh_token.clone() else {
            return forget_tokens(state, user_id).await;
        };
        match state.discord.refresh(refresh).await {
            Ok(t) => {
                token = token_row(user_id, &t);
                let mut tx = state.db.auth().await?;
                dbauth::store_oauth_token(&mut tx, &token).await?;
                tx.commit().await?;
            }
            Err(DiscordError::GrantRejected(_)) => return forget_tokens(state, user_id).await,
            Err(e) => return Err(e.into()),
        }
    }
    match sync_memberships(&state.db, &state.discord, user_id, &token.access_token).await {
        Err(BackendError::Discord(DiscordError::Unauthorized)) => {
            forget_tokens(state, user_id).await
        }
        other => other,
    }
}

/// The user revoked our access (or it lapsed): stop trying until they log in
/// again. Memberships stay as the worker keeps them.
async fn forget_tokens(state: &AppState, user_id: i64) -> Result<(), BackendError> {
    tracing::info!(user_id, "oauth token no longer usable; dropping it");
    let mut tx = state.db.auth().await?;
    dbauth::delete_oauth_token(&mut tx, user_id).await?;
    tx.commit().await?;
    Ok(())
}
