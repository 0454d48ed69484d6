//! The relay's Prometheus metrics (`statecast_relay_*`).

use prometheus::{
    Counter, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    core::{AtomicF64, GenericGauge},
};

/// Every metric a relay exports, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` serves.
    pub registry: Registry,
    /// Clients connected now.
    pub clients: IntGauge,
    /// Worlds subscribed upstream now.
    pub worlds: IntGauge,
    /// Bytes of updates sent to clients.
    pub bytes_sent: IntCounter,
    /// Updates sent, by how (`datagram`, `stream`).
    pub updates_sent: IntCounterVec,
    /// Keyframes sent to clients.
    pub keyframes: IntCounter,
    /// Seconds spent encoding chunks (cache misses). A counter: its name
    /// ends in `_total`, which Prometheus reserves for counters.
    pub encode_seconds: Counter,
    /// Seconds spent splitting upstream ticks into cells (and hashing the
    /// changed cells), a fixed cost per tick whatever the clients.
    pub split_seconds: Counter,
    /// From a tick's arrival at the relay to its update leaving for a client.
    pub fanout_latency: Histogram,
    /// Age of the newest upstream tick when it arrived (origin clock).
    pub upstream_lag: GenericGauge<AtomicF64>,
    /// Ticks received from upstream.
    pub upstream_ticks: IntCounter,
    /// Upstream (re)subscriptions, by result.
    pub upstream_connects: IntCounterVec,
    /// Chunk cache hits.
    pub cache_hits: IntCounter,
    /// Chunk cache misses.
    pub cache_misses: IntCounter,
    /// Hit ratio of the chunk cache over the process's life.
    pub cache_hit_ratio: GenericGauge<AtomicF64>,
    /// Things dropped, by reason.
    pub drops: IntCounterVec,
    /// Client inputs forwarded upstream.
    pub inputs_forwarded: IntCounter,
    /// Client connections refused or closed on error, by reason.
    pub sessions_refused: IntCounterVec,
    /// Datagrams on the probe port, by result (`answered`, `rate_limited`,
    /// `malformed`).
    pub probes: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let fgauge = |name: &str, help: &str| {
            let g = GenericGauge::<AtomicF64>::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let fanout_latency = Histogram::with_opts(
            HistogramOpts::new(
                "statecast_relay_fanout_latency_seconds",
                "Time from a tick's arrival at the relay to its update leaving for a client.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(fanout_latency.clone()))
            .expect("unique metric");
        let metrics = Metrics {
            clients: gauge("statecast_relay_clients", "Clients connected."),
            worlds: gauge("statecast_relay_worlds", "Worlds subscribed upstream."),
            bytes_sent: counter(
                "statecast_relay_bytes_sent_total",
                "Bytes of updates sent to clients.",
            ),
            updates_sent: counter_vec(
                "statecast_relay_updates_sent_total",
                "Updates sent to clients, by transport (datagram or stream).",
                "via",
            ),
            keyframes: counter(
                "statecast_relay_keyframes_sent_total",
                "Keyframe updates sent to clients.",
            ),
            encode_seconds: {
                let c = Counter::new(
                    "statecast_relay_encode_seconds_total",
                    "Seconds spent encoding delta chunks.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            split_seconds: {
                let c = Counter::new(
                    "statecast_relay_split_seconds_total",
                    "Seconds spent splitting upstream ticks into cells.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            fanout_latency,
            upstream_lag: fgauge(
                "statecast_relay_upstream_lag_seconds",
                "Age of the newest upstream tick on arrival (origin clock to relay clock).",
            ),
            upstream_ticks: counter(
                "statecast_relay_upstream_ticks_total",
                "Ticks received and verified from upstream.",
            ),
            upstream_connects: counter_vec(
                "statecast_relay_upstream_connects_total",
                "Upstream subscriptions, by result.",
                "result",
            ),
            cache_hits: counter(
                "statecast_relay_chunk_cache_hits_total",
                "Chunks served from the shared cache.",
            ),
            cache_misses: counter(
                "statecast_relay_chunk_cache_misses_total",
                "Chunks encoded.",
            ),
            cache_hit_ratio: fgauge(
                "statecast_relay_chunk_cache_hit_ratio",
                "Share of chunk lookups served from the cache.",
            ),
            drops: counter_vec(
                "statecast_relay_drops_total",
                "Things dropped, by reason.",
                "reason",
            ),
            inputs_forwarded: counter(
                "statecast_relay_inputs_forwarded_total",
                "Client inputs forwarded upstream.",
            ),
            sessions_refused: counter_vec(
                "statecast_relay_sessions_refused_total",
                "Client sessions refused or ended on error, by reason.",
                "reason",
            ),
            probes: counter_vec(
                "statecast_relay_probes_total",
                "Datagrams on the probe port, by result (answered, rate_limited, malformed).",
                "result",
            ),
            registry,
        };
        // Labelled series appear only once used: start the known ones at
        // zero, so `/metrics` always lists them and `rate()` sees the first
        // increment.
        for via in ["datagram", "stream"] {
            metrics.updates_sent.with_label_values(&[via]);
        }
        for reason in DROP_REASONS {
            metrics.drops.with_label_values(&[reason]);
        }
        metrics
    }
}

/// The reasons of `statecast_relay_drops_total`: a datagram quinn refused,
/// a tick skipped for a client whose stream updates are still on their way,
/// a stream update reset because the client acknowledged a newer tick,
/// client inputs over the rate limit or the queue, inputs the upstream
/// refused, malformed datagrams.
pub const DROP_REASONS: [&str; 7] = [
    "datagram_send",
    "stream_busy",
    "stream_superseded",
    "input_rate",
    "input_queue",
    "input_upstream",
    "bad_datagram",
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
