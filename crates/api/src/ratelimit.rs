//! Per-viewer token buckets, in memory (one API process; replicas each limit
//! on their own, which bounds the total to replicas × the configured rate).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Who a bucket belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateKey {
    Viewer(i64),
    Address(std::net::IpAddr),
    Anonymous,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    per_sec: f64,
    buckets: Mutex<HashMap<RateKey, Bucket>>,
}

/// Buckets above this count trigger a sweep of full (idle) ones, bounding memory.
const SWEEP_AT: usize = 10_000;

impl RateLimiter {
    pub fn new(burst: u32, per_sec: f64) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            per_sec: if per_sec.is_finite() && per_sec > 0.0 {
                per_sec
            } else {
                1.0
            },
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token; `false` means "429".
    pub fn check(&self, key: RateKey) -> bool {
        let now = Instant::now();
        // A poisoned lock only means another request panicked mid-update; the
        // counters are still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > SWEEP_AT {
            let (burst, per_sec) = (self.burst, self.per_sec);
            buckets
                .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * per_sec < burst);
        }
        let b = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens =
            (b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_sec).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse_per_key() {
        let rl = RateLimiter::new(3, 0.001);
        for _ in 0..3 {
            assert!(rl.check(RateKey::Viewer(1)));
        }
        assert!(!rl.check(RateKey::Viewer(1)));
        assert!(rl.check(RateKey::Viewer(2)));
    }
}
