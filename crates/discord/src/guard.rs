//! The invalid-request guard. Discord bans an IP for a while once it has
//! answered 10,000 requests with 401, 403 or 429 (except 429s of a shared
//! resource) within 10 minutes; the ban hits the whole deployment. The guard
//! counts those answers in a rolling window and, past a threshold well below
//! Discord's, refuses to send: a failed call that is retried later is far
//! cheaper than a ban.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Discord's own budget: 10,000 invalid requests per 10 minutes.
pub const DISCORD_INVALID_REQUEST_LIMIT: usize = 10_000;

#[derive(Debug, Clone)]
pub struct GuardSettings {
    /// Invalid answers within `window` after which requests are refused.
    pub threshold: usize,
    pub window: Duration,
}

impl Default for GuardSettings {
    fn default() -> Self {
        GuardSettings {
            threshold: DISCORD_INVALID_REQUEST_LIMIT * 8 / 10,
            window: Duration::from_secs(600),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Guard {
    settings: GuardSettings,
    seen: Mutex<VecDeque<Instant>>,
}

impl Guard {
    pub(crate) fn new(settings: GuardSettings) -> Self {
        Guard {
            settings,
            seen: Mutex::new(VecDeque::new()),
        }
    }

    fn prune(&self, seen: &mut VecDeque<Instant>) {
        let now = Instant::now();
        while seen
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.settings.window)
        {
            seen.pop_front();
        }
    }

    /// `Err(count)` when the budget is spent.
    pub(crate) fn check(&self) -> Result<(), usize> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        self.prune(&mut seen);
        if seen.len() >= self.settings.threshold {
            Err(seen.len())
        } else {
            Ok(())
        }
    }

    /// Counts one invalid answer; returns the count in the window.
    pub(crate) fn record(&self) -> usize {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        self.prune(&mut seen);
        seen.push_back(Instant::now());
        let n = seen.len();
        if n == self.settings.threshold {
            tracing::error!(
                invalid_requests = n,
                window_s = self.settings.window.as_secs(),
                "invalid-request budget reached: Discord requests are refused until the window moves on"
            );
        } else if n == self.settings.threshold / 2 {
            tracing::warn!(
                invalid_requests = n,
                "half the invalid-request budget spent (401/403/429 answers)"
            );
        }
        n
    }

    pub(crate) fn count(&self) -> usize {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        self.prune(&mut seen);
        seen.len()
    }
}
