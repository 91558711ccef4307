//! Per-viewer token buckets, in memory (one API process; replicas each limit
//! on their own, which bounds the total to replicas × the configured rate).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
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
    max_keys: usize,
    buckets: Mutex<HashMap<RateKey, Bucket>>,
}

/// Most buckets kept at once (memory stays bounded whatever the number of
/// client addresses); see [`RateLimiter::check`] for what happens at the cap.
pub const MAX_KEYS: usize = 10_000;

impl RateKey {
    /// The key a bucket is kept under: an IPv6 client is limited per /64
    /// (one host usually holds a whole /64, so per-address buckets would be
    /// free to multiply); an IPv4-mapped IPv6 address counts as the IPv4 one.
    fn normalised(self) -> Self {
        match self {
            RateKey::Address(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => RateKey::Address(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    RateKey::Address(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
            other => other,
        }
    }
}

impl RateLimiter {
    pub fn new(burst: u32, per_sec: f64) -> Self {
        Self::with_max_keys(burst, per_sec, MAX_KEYS)
    }

    /// Like [`RateLimiter::new`] with another bucket cap.
    pub fn with_max_keys(burst: u32, per_sec: f64, max_keys: usize) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            per_sec: if per_sec.is_finite() && per_sec > 0.0 {
                per_sec
            } else {
                1.0
            },
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token; `false` means "429".
    ///
    /// At the bucket cap, a new key first makes room by dropping buckets that
    /// have refilled (forgetting them changes nothing), then, if that is not
    /// enough, the least recently used tenth.
    pub fn check(&self, key: RateKey) -> bool {
        let key = key.normalised();
        let now = Instant::now();
        // A poisoned lock only means another request panicked mid-update; the
        // counters are still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= self.max_keys && !buckets.contains_key(&key) {
            let (burst, per_sec) = (self.burst, self.per_sec);
            buckets
                .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * per_sec < burst);
            if buckets.len() >= self.max_keys {
                let mut ages: Vec<Instant> = buckets.values().map(|b| b.at).collect();
                let nth = (ages.len() / 10).min(ages.len() - 1);
                let (_, cutoff, _) = ages.select_nth_unstable(nth);
                let cutoff = *cutoff;
                buckets.retain(|_, b| b.at > cutoff);
            }
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

    /// Buckets currently kept.
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    fn addr(s: &str) -> RateKey {
        RateKey::Address(
            s.parse()
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        )
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        let rl = RateLimiter::new(2, 0.001);
        assert!(rl.check(addr("2001:db8:1:2::1")));
        assert!(rl.check(addr("2001:db8:1:2:ffff::9")));
        assert!(!rl.check(addr("2001:db8:1:2:abcd:1:2:3")), "same /64");
        assert!(rl.check(addr("2001:db8:1:3::1")), "another /64");
        // IPv4-mapped counts as the IPv4 address.
        assert!(rl.check(addr("192.0.2.7")));
        assert!(rl.check(addr("::ffff:192.0.2.7")));
        assert!(!rl.check(addr("192.0.2.7")));
    }

    #[test]
    fn the_map_stays_bounded_and_keeps_recent_buckets() {
        let rl = RateLimiter::with_max_keys(2, 0.001, 100);
        // A hot key, spent.
        assert!(rl.check(RateKey::Viewer(-1)));
        assert!(rl.check(RateKey::Viewer(-1)));
        for i in 0..10_000 {
            rl.check(RateKey::Viewer(i));
            if i % 50 == 0 {
                // Keep the hot key recently used: it must not be evicted.
                assert!(!rl.check(RateKey::Viewer(-1)), "evicted at {i}");
            }
            assert!(rl.len() <= 100, "{} buckets", rl.len());
        }
    }
}
