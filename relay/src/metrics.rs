//! The relay's Prometheus metrics (`statecast_relay_*`).

use prometheus::{
    Counter, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
    core::{AtomicF64, GenericGauge},
};
use std::cell::RefCell;
use std::time::Instant;

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
    /// From a tick's arrival at the relay to the end of each step of its
    /// fan-out (`split`: split into cells and in the ring; `picked`: the
    /// fan-out loop took it; `coded`: a fan-out loop finished coding chunks
    /// in advance; `first` / `last`: a loop handed its first / last update
    /// of the tick to quinn), once per tick and loop (one loop per core).
    pub fanout_stage: HistogramVec,
    /// CPU seconds the fan-out spent building updates: coding chunks in
    /// advance and assembling datagrams (coding the chunks not coded in
    /// advance included; not sending them), as [`CpuTimer`] measures them.
    pub build_seconds: Counter,
    /// Chunks coded in advance, before a tick's updates were built.
    pub chunks_precoded: IntCounter,
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

/// Registers `metric` in `registry` and hands it back.
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            register(&registry, IntGauge::new(name, help).expect("valid metric"))
        };
        let fgauge = |name: &str, help: &str| {
            register(
                &registry,
                GenericGauge::<AtomicF64>::new(name, help).expect("valid metric"),
            )
        };
        let counter = |name: &str, help: &str| {
            register(
                &registry,
                IntCounter::new(name, help).expect("valid metric"),
            )
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
            )
        };
        let fanout_latency = Histogram::with_opts(
            HistogramOpts::new(
                "statecast_relay_fanout_latency_seconds",
                "Time from a tick's arrival at the relay to its update leaving for a client.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015,
                0.025, 0.05, 0.1, 0.25,
            ]),
        )
        .expect("valid metric");
        let fanout_latency = register(&registry, fanout_latency);
        let fanout_stage = HistogramVec::new(
            HistogramOpts::new(
                "statecast_relay_fanout_stage_seconds",
                "Time from a tick's arrival at the relay to the end of each step of its fan-out, per fan-out loop.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025,
                0.05, 0.1, 0.25, 0.5, 1.0,
            ]),
            &["stage"],
        )
        .expect("valid metric");
        let fanout_stage = register(&registry, fanout_stage);
        let float_counter = |name: &str, help: &str| {
            register(&registry, Counter::new(name, help).expect("valid metric"))
        };
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
            encode_seconds: float_counter(
                "statecast_relay_encode_seconds_total",
                "Seconds spent encoding delta chunks.",
            ),
            split_seconds: float_counter(
                "statecast_relay_split_seconds_total",
                "Seconds spent splitting upstream ticks into cells.",
            ),
            fanout_latency,
            fanout_stage,
            build_seconds: float_counter(
                "statecast_relay_build_cpu_seconds_total",
                "CPU seconds the fan-out spent building updates (coding chunks, assembling datagrams; not sending).",
            ),
            chunks_precoded: counter(
                "statecast_relay_chunks_precoded_total",
                "Chunks coded in advance, before a tick's updates were built.",
            ),
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
        for stage in FANOUT_STAGES {
            metrics.fanout_stage.with_label_values(&[stage]);
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

/// The stages of `statecast_relay_fanout_stage_seconds`, in order.
pub const FANOUT_STAGES: [&str; 5] = ["split", "picked", "coded", "first", "last"];

thread_local! {
    /// This thread's `/proc/thread-self/schedstat`, opened on first use
    /// (`None` where it cannot be read).
    static SCHEDSTAT: RefCell<Option<Option<std::fs::File>>> = const { RefCell::new(None) };
}

/// Nanoseconds the calling thread has waited on a run queue (ready, but
/// another thread had the core), from the second field of
/// `/proc/thread-self/schedstat`; `None` where the kernel does not say.
fn run_delay_ns() -> Option<u64> {
    use std::os::unix::fs::FileExt;
    SCHEDSTAT.with(|file| {
        let mut file = file.borrow_mut();
        let file = file
            .get_or_insert_with(|| std::fs::File::open("/proc/thread-self/schedstat").ok())
            .as_ref()?;
        let mut buf = [0u8; 96];
        let n = file.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        text.split_whitespace().nth(1)?.parse().ok()
    })
}

/// The CPU time of a stretch of work on the calling thread: its wall time
/// less the time the thread waited for a core meanwhile (the kernel's
/// run-queue delay, read twice, about 0.3 us each). A timer of wall time
/// alone reads the preemptions of a shared machine as work: two to three
/// times the work, measured, for chunk coding under load. Time the thread
/// spent blocked (a contended lock) still counts as work; the stretches
/// timed do not block. Wall time alone where the kernel keeps no
/// scheduler statistics.
pub struct CpuTimer {
    wall: Instant,
    waited_ns: Option<u64>,
}

impl CpuTimer {
    /// Starts timing.
    pub fn start() -> CpuTimer {
        let waited_ns = run_delay_ns();
        CpuTimer {
            wall: Instant::now(),
            waited_ns,
        }
    }

    /// Nanoseconds of work since [`CpuTimer::start`].
    pub fn elapsed_ns(&self) -> u64 {
        let wall = self.wall.elapsed().as_nanos() as u64;
        let waited = match (self.waited_ns, run_delay_ns()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => 0,
        };
        wall.saturating_sub(waited)
    }
}
