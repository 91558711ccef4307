//! Worker configuration: a plain struct; the binary maps flags/env onto it.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;

/// The real Discord. Any other base URL is treated as a Discord-compatible
/// server reached through serenity's proxy mode.
pub const DISCORD_BASE_URL: &str = "https://discord.com";

/// Which shards this process runs: `first..=last` of `count` (Discord sharding
/// is `shard_id = (guild_id >> 22) % count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardRange {
    pub first: u32,
    pub last: u32,
    pub count: u32,
}

impl ShardRange {
    /// Parses `"0-3"` (or `"2"`) with a shard count, as `--shards 0-3 --shard-count 8`.
    pub fn parse(range: &str, count: u32) -> Result<Self, String> {
        let (a, b) = match range.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (range.trim(), range.trim()),
        };
        let first: u32 = a
            .parse()
            .map_err(|_| format!("bad shard range {range:?}"))?;
        let last: u32 = b
            .parse()
            .map_err(|_| format!("bad shard range {range:?}"))?;
        if first > last || last >= count {
            return Err(format!(
                "shard range {first}-{last} must be ascending and below the shard count {count}"
            ));
        }
        Ok(Self { first, last, count })
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Bot token (`DISCORD_TOKEN`), with or without the `Bot ` prefix.
    /// Redacted in `Debug`; exposed only where the Discord clients are built.
    pub discord_token: SecretString,
    /// `DISCORD_API_BASE_URL`, default [`DISCORD_BASE_URL`].
    pub api_base_url: String,
    /// `--shards` / `--shard-count`; None runs the single shard 0 of 1.
    pub shards: Option<ShardRange>,
    /// Most ops written in one transaction.
    pub max_batch_ops: usize,
    /// Capacity of the queue between gateway handlers and the batcher.
    pub queue_capacity: usize,
    /// Where to serve `/metrics` (Prometheus text); None disables it.
    pub metrics_addr: Option<SocketAddr>,
    /// Interval of the health log line.
    pub log_interval: Duration,
    /// Backfill on every GUILD_CREATE (start, re-identify, new guild).
    pub backfill: bool,
    /// Channels fetched at once per guild.
    pub backfill_concurrency: usize,
    /// Pages (of 100) at most per channel and backfill run; 0 = no limit.
    pub backfill_max_pages: u32,
    /// Backfill re-reads this much history before the newest stored message,
    /// to close gaps left by ops that were queued but never committed (a killed
    /// worker, out-of-order handlers). Rewrites are idempotent.
    pub backfill_overlap: Duration,
    /// After each channel's backfill, re-read this recent window of it to find
    /// edits and deletions made while the worker was away (see `reconcile`).
    /// None disables it.
    pub reconcile: Option<crate::reconcile::Window>,
    /// Re-read a member / role set / channel over REST this long after an
    /// event touched it, so out-of-order handling cannot leave access data
    /// stale. None disables it.
    pub access_reread: Option<Duration>,
    /// How often messages older than their guild's retention period are
    /// purged. None disables purging (retention is then not enforced).
    pub purge_interval: Option<Duration>,
    /// How often queued support recomputations (after a settings change)
    /// are picked up; the startup sweep runs first. None disables both.
    pub support_interval: Option<Duration>,
    /// Discord REST client settings: global pacing, wait caps, the
    /// invalid-request guard's threshold, retries.
    pub rest: observer_discord::Options,
}

impl Config {
    pub fn new(discord_token: impl Into<SecretString>) -> Self {
        Self {
            discord_token: discord_token.into(),
            api_base_url: DISCORD_BASE_URL.to_owned(),
            shards: None,
            max_batch_ops: 4096,
            queue_capacity: 65_536,
            metrics_addr: None,
            log_interval: Duration::from_secs(30),
            backfill: true,
            backfill_concurrency: 4,
            backfill_max_pages: 0,
            backfill_overlap: Duration::from_secs(30),
            reconcile: Some(crate::reconcile::Window::default()),
            access_reread: Some(Duration::from_secs(2)),
            purge_interval: Some(Duration::from_secs(600)),
            support_interval: Some(Duration::from_secs(2)),
            rest: observer_discord::Options::default(),
        }
    }

    pub(crate) fn base(&self) -> &str {
        self.api_base_url.trim_end_matches('/')
    }

    pub(crate) fn is_real_discord(&self) -> bool {
        self.base() == DISCORD_BASE_URL
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ranges() {
        assert_eq!(
            ShardRange::parse("0-3", 8),
            Ok(ShardRange {
                first: 0,
                last: 3,
                count: 8
            })
        );
        assert_eq!(
            ShardRange::parse("5", 8),
            Ok(ShardRange {
                first: 5,
                last: 5,
                count: 8
            })
        );
        assert!(ShardRange::parse("3-1", 8).is_err());
        assert!(ShardRange::parse("0-8", 8).is_err());
        assert!(ShardRange::parse("a-b", 8).is_err());
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let c = Config::new("Bot very-secret-token");
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("very-secret-token"), "{shown}");
        assert!(shown.contains("discord_token"), "{shown}");
    }

    #[test]
    fn proxy_mode_only_off_discord() {
        let mut c = Config::new("t");
        assert!(c.is_real_discord());
        c.api_base_url = "https://discord.com/".into();
        assert!(c.is_real_discord());
        c.api_base_url = "http://127.0.0.1:9".into();
        assert!(!c.is_real_discord());
    }
}
