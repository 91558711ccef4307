//! Prometheus metrics of live fan-out: subscribers, deliveries,
//! fan-out latency, slow consumers dropped, listener reconnects, and the
//! database reads fan-out makes (which must not grow with subscribers).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Cheap to clone: every metric is a shared handle.
#[derive(Clone, Debug)]
pub struct LiveMetrics {
    pub subscribers: Gauge,
    pub deliveries: Counter,
    pub events: Counter,
    pub fanout_latency: Histogram,
    pub slow_consumers: Counter,
    pub forbidden: Counter,
    pub listener_reconnects: Counter,
    pub reads: Counter,
    pub tick_reads: Counter,
    /// Reads of the message event log made for a notification (the tick's
    /// excluded): at most one per notification, whatever the subscribers.
    pub notified_event_reads: Counter,
    pub read_errors: Counter,
    pub access_refreshes: Counter,
}

impl Default for LiveMetrics {
    fn default() -> Self {
        Self {
            subscribers: Gauge::default(),
            deliveries: Counter::default(),
            events: Counter::default(),
            // 0.5 ms .. ~16 s
            fanout_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            slow_consumers: Counter::default(),
            forbidden: Counter::default(),
            listener_reconnects: Counter::default(),
            reads: Counter::default(),
            tick_reads: Counter::default(),
            notified_event_reads: Counter::default(),
            read_errors: Counter::default(),
            access_refreshes: Counter::default(),
        }
    }
}

impl LiveMetrics {
    /// Registers every metric under `live_*` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("live");
        r.register(
            "subscribers",
            "Open messageEvents subscriptions",
            self.subscribers.clone(),
        );
        r.register(
            "deliveries",
            "Events handed to subscribers",
            self.deliveries.clone(),
        );
        r.register(
            "events",
            "Message events read from the log (once each, for all subscribers)",
            self.events.clone(),
        );
        r.register(
            "fanout_latency_seconds",
            "From the writing transaction's start to hand-off to subscribers",
            self.fanout_latency.clone(),
        );
        r.register(
            "slow_consumers_dropped",
            "Subscriptions ended because their buffer overflowed",
            self.slow_consumers.clone(),
        );
        r.register(
            "forbidden_ends",
            "Subscriptions ended because their whole scope became invisible",
            self.forbidden.clone(),
        );
        r.register(
            "listener_reconnects",
            "Reconnections of the LISTEN connection",
            self.listener_reconnects.clone(),
        );
        r.register(
            "db_reads",
            "Fan-out read transactions (independent of the number of subscribers)",
            self.reads.clone(),
        );
        r.register(
            "db_tick_reads",
            "Fan-out read transactions made by the safety-net tick",
            self.tick_reads.clone(),
        );
        r.register(
            "db_notified_event_reads",
            "Event-log read transactions made for a notification (not the tick)",
            self.notified_event_reads.clone(),
        );
        r.register(
            "db_read_errors",
            "Fan-out reads that failed (retried)",
            self.read_errors.clone(),
        );
        r.register(
            "access_refreshes",
            "Reloads of access data after access changes",
            self.access_refreshes.clone(),
        );
    }
}
