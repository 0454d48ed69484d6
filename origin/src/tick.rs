//! The fixed-rate tick loop.
//!
//! A [`Simulation`] is CPU-bound, so it runs on a thread of its own, never
//! on the async runtime. Tick `n` is due at `start + n * period`, computed
//! exactly from the start ([`Schedule`]), never by sleeping a period after
//! the work: the work's duration and the sleep's slack do not add up, so the
//! loop does not drift over hours. If it ever falls more than
//! [`MAX_LAG`] behind (a stalled machine, a debugger), it logs a warning and
//! skips the missed slots instead of racing to catch up; ticks stay numbered
//! 1, 2, 3... (a tick is one step of the world), only the schedule moves.
//!
//! Each tick:
//!
//! 1. applies the input batches that relays forwarded: a session joins
//!    ([`Simulation::join`]) with its first input, and inputs older than the
//!    last one applied (by sequence number) are refused;
//! 2. releases sessions idle for [`IDLE_TIMEOUT`], and those whose relay's
//!    subscription ended ([`Simulation::leave`]);
//! 3. steps, quantizes the snapshot, hashes it, stamps it with the wall
//!    clock, and publishes it to the feed's `watch` (latest wins).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use proto::Layout;
use proto::msg::InputBatch;
use tokio::sync::{mpsc, watch};
use transport::Readiness;
use transport::feed::FeedTick;

use crate::sim::{SessionId, Simulation};

/// How far behind schedule the loop may fall before it skips ahead.
pub const MAX_LAG: Duration = Duration::from_secs(1);

/// A session that sent no input for this long leaves the world.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most input batches applied in one tick; more wait for the next tick, so a
/// flood of inputs cannot stall the world.
pub const MAX_BATCHES_PER_TICK: usize = 4096;

/// When ticks are due: `start + n * period`, with the period exactly
/// `1 / rate` seconds (computed in integer nanoseconds from `n`, so no
/// rounding accumulates).
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    rate: u32,
    slot: u64,
}

impl Schedule {
    /// A schedule of `rate` ticks per second from `start` (slot 0).
    ///
    /// # Panics
    /// If `rate` is zero.
    pub fn new(start: Instant, rate: u32) -> Schedule {
        assert!(rate > 0, "tick rate must be positive");
        Schedule {
            start,
            rate,
            slot: 0,
        }
    }

    /// The schedule's start.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Time from the start to slot `slot`.
    pub fn offset(&self, slot: u64) -> Duration {
        let nanos = u128::from(slot) * 1_000_000_000 / u128::from(self.rate);
        Duration::new(
            (nanos / 1_000_000_000) as u64,
            (nanos % 1_000_000_000) as u32,
        )
    }

    /// When slot `slot` is due.
    pub fn deadline(&self, slot: u64) -> Instant {
        self.start + self.offset(slot)
    }

    /// The current slot (0 before the first tick).
    pub fn slot(&self) -> u64 {
        self.slot
    }

    /// Moves to the next slot and returns when it is due.
    pub fn advance(&mut self) -> Instant {
        self.slot += 1;
        self.deadline(self.slot)
    }

    /// Moves to the last slot due at `now` if that is later than the current
    /// one, and returns how many slots were skipped.
    pub fn skip_to(&mut self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        let due = (elapsed * u128::from(self.rate) / 1_000_000_000) as u64;
        let skipped = due.saturating_sub(self.slot);
        self.slot = self.slot.max(due);
        skipped
    }
}

/// What the network side hands the tick loop.
#[derive(Debug)]
pub(crate) enum Event {
    /// A batch of inputs from subscription `from`.
    Inputs { from: u64, batch: InputBatch },
    /// Subscription `from` ended: its sessions leave.
    Gone { from: u64 },
}

/// The tick loop's metrics.
#[derive(Clone, Debug)]
pub struct TickMetrics {
    ticks: IntCounter,
    tick_seconds: Histogram,
    lag_seconds: Gauge,
    skipped: IntCounter,
    inputs: IntCounterVec,
    entities: IntGauge,
    sessions: IntGauge,
}

impl TickMetrics {
    /// Creates the metrics (`statecast_origin_ticks_total`, ...) in
    /// `registry`.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<TickMetrics> {
        let metrics = TickMetrics {
            ticks: IntCounter::new("statecast_origin_ticks_total", "Ticks published.")?,
            tick_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "statecast_origin_tick_seconds",
                    "Time to apply inputs, step, quantize and hash one tick.",
                )
                .buckets(vec![
                    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25,
                ]),
            )?,
            lag_seconds: Gauge::new(
                "statecast_origin_tick_lag_seconds",
                "How late the last tick started after its deadline.",
            )?,
            skipped: IntCounter::new(
                "statecast_origin_ticks_skipped_total",
                "Schedule slots skipped after the loop fell more than a second behind.",
            )?,
            inputs: IntCounterVec::new(
                Opts::new(
                    "statecast_origin_inputs_total",
                    "Client inputs handed to the world, by result.",
                ),
                &["result"],
            )?,
            entities: IntGauge::new(
                "statecast_origin_entities",
                "Entities in the last snapshot.",
            )?,
            sessions: IntGauge::new(
                "statecast_origin_sessions",
                "Client sessions driving an entity.",
            )?,
        };
        registry.register(Box::new(metrics.ticks.clone()))?;
        registry.register(Box::new(metrics.tick_seconds.clone()))?;
        registry.register(Box::new(metrics.lag_seconds.clone()))?;
        registry.register(Box::new(metrics.skipped.clone()))?;
        registry.register(Box::new(metrics.inputs.clone()))?;
        registry.register(Box::new(metrics.entities.clone()))?;
        registry.register(Box::new(metrics.sessions.clone()))?;
        // Both results exist from the start, so dashboards see zeros.
        metrics.inputs.with_label_values(&["applied"]);
        metrics.inputs.with_label_values(&["rejected"]);
        Ok(metrics)
    }
}

/// A client session that drives an entity.
#[derive(Debug)]
struct Session {
    /// The subscription (relay) its inputs came through last.
    from: u64,
    /// The tick of its last applied input.
    active: u64,
    /// The sequence number of its last applied input.
    seq: u32,
}

/// The state of the tick loop, moved onto its thread.
pub(crate) struct TickLoop {
    pub sim: Box<dyn Simulation>,
    pub layout: Arc<Layout>,
    pub events: mpsc::Receiver<Event>,
    pub publish: watch::Sender<Option<Arc<FeedTick>>>,
    pub metrics: TickMetrics,
    pub readiness: Readiness,
}

/// Wall clock, microseconds since the UNIX epoch.
fn wall_clock_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl TickLoop {
    /// Runs until `stop` receives a message or its sender is dropped.
    pub fn run(mut self, stop: std_mpsc::Receiver<()>) {
        let rate = self.sim.tick_rate();
        let idle_ticks = IDLE_TIMEOUT.as_secs() * u64::from(rate);
        let mut schedule = Schedule::new(Instant::now(), rate);
        let mut sessions: HashMap<SessionId, Session> = HashMap::new();
        let mut tick: u64 = 0;
        loop {
            let deadline = schedule.advance();
            let wait = deadline.saturating_duration_since(Instant::now());
            match stop.recv_timeout(wait) {
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let started = Instant::now();
            let lag = started.saturating_duration_since(deadline);
            if lag > MAX_LAG {
                let skipped = schedule.skip_to(started);
                tracing::warn!(
                    lag_ms = lag.as_millis() as u64,
                    skipped,
                    "tick loop fell behind by more than {MAX_LAG:?}; skipping ahead"
                );
                self.metrics.skipped.inc_by(skipped);
            }
            self.metrics.lag_seconds.set(lag.as_secs_f64());
            tick += 1;

            self.apply_events(tick, &mut sessions);
            if tick % u64::from(rate) == 0 {
                self.release_idle(tick, idle_ticks, &mut sessions);
            }
            self.sim.step();
            let snapshot = self.sim.snapshot(&self.layout);
            let hash = snapshot.hash();
            let entities = snapshot.len();
            let feed_tick = Arc::new(FeedTick {
                tick,
                origin_time_us: wall_clock_us(),
                hash,
                snapshot: Arc::new(snapshot),
            });
            self.metrics
                .tick_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics.ticks.inc();
            self.metrics.entities.set(entities as i64);
            self.metrics.sessions.set(sessions.len() as i64);
            if tick == 1 {
                // Ready as the first tick goes out: whoever sees the tick
                // also sees the origin ready.
                self.readiness.set_ready(true);
                tracing::info!(entities, %hash, "first tick published; ready");
            }
            self.publish.send_replace(Some(feed_tick));
        }
        self.readiness.set_ready(false);
        tracing::debug!(tick, "tick loop stopped");
    }

    fn apply_events(&mut self, tick: u64, sessions: &mut HashMap<SessionId, Session>) {
        let applied = self.metrics.inputs.with_label_values(&["applied"]);
        let rejected = self.metrics.inputs.with_label_values(&["rejected"]);
        for _ in 0..MAX_BATCHES_PER_TICK {
            let Ok(event) = self.events.try_recv() else {
                break;
            };
            let (from, batch) = match event {
                Event::Inputs { from, batch } => (from, batch),
                Event::Gone { from } => {
                    let sim = &mut self.sim;
                    sessions.retain(|&id, s| {
                        let keep = s.from != from;
                        if !keep {
                            tracing::debug!(session = id, "session leaves: its relay is gone");
                            sim.leave(id);
                        }
                        keep
                    });
                    continue;
                }
            };
            for input in batch.inputs {
                let session = match sessions.get_mut(&input.session) {
                    Some(session) => {
                        // Sequence numbers wrap: newer means ahead by less
                        // than half the space.
                        let ahead = input.seq.wrapping_sub(session.seq);
                        if ahead == 0 || ahead >= 1 << 31 {
                            rejected.inc();
                            continue;
                        }
                        session
                    }
                    None => {
                        let Some(entity) = self.sim.join(input.session) else {
                            rejected.inc();
                            continue;
                        };
                        tracing::debug!(session = input.session, entity, "session joins");
                        sessions.entry(input.session).or_insert(Session {
                            from,
                            active: tick,
                            seq: input.seq.wrapping_sub(1),
                        })
                    }
                };
                match self.sim.input(input.session, &input.data) {
                    Ok(()) => {
                        // After a failover the session's inputs come
                        // through another relay.
                        session.from = from;
                        session.active = tick;
                        session.seq = input.seq;
                        applied.inc();
                    }
                    Err(e) => {
                        tracing::trace!(session = input.session, error = %e, "input refused");
                        rejected.inc();
                    }
                }
            }
        }
    }

    fn release_idle(
        &mut self,
        tick: u64,
        idle_ticks: u64,
        sessions: &mut HashMap<SessionId, Session>,
    ) {
        let sim = &mut self.sim;
        sessions.retain(|&id, s| {
            let keep = tick - s.active <= idle_ticks;
            if !keep {
                tracing::debug!(session = id, "session leaves: idle");
                sim.leave(id);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_exact_over_hours() {
        let start = Instant::now();
        for rate in [1, 20, 60, 144, 1000] {
            let s = Schedule::new(start, rate);
            // Six hours of ticks end exactly six hours after the start.
            let hours = 6 * 3600 * u64::from(rate);
            assert_eq!(
                s.offset(hours),
                Duration::from_secs(6 * 3600),
                "rate {rate}"
            );
            // No period is off by more than a nanosecond from 1/rate.
            let period = 1e9 / f64::from(rate);
            for n in [1, 2, 3, 1000, 1001] {
                let step = (s.offset(n + 1) - s.offset(n)).as_nanos() as f64;
                assert!((step - period).abs() <= 1.0, "rate {rate} slot {n}: {step}");
            }
        }
    }

    /// A world that records what the loop asks of it.
    struct Recorder {
        schema: proto::Schema,
        log: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Recorder {
        fn note(&self, what: String) {
            self.log.lock().unwrap().push(what);
        }
    }

    impl Simulation for Recorder {
        fn schema(&self) -> &proto::Schema {
            &self.schema
        }
        fn tick_rate(&self) -> u32 {
            10
        }
        fn step(&mut self) {}
        fn snapshot(&self, layout: &Layout) -> proto::Snapshot {
            proto::Snapshot::empty(layout)
        }
        fn join(&mut self, session: SessionId) -> Option<proto::EntityId> {
            // Session 13 finds no free entity.
            (session != 13).then(|| {
                self.note(format!("join {session}"));
                session as proto::EntityId
            })
        }
        fn leave(&mut self, session: SessionId) {
            self.note(format!("leave {session}"));
        }
        fn input(&mut self, session: SessionId, input: &[u8]) -> Result<(), crate::InputError> {
            if input.is_empty() {
                return Err(crate::InputError::Malformed {
                    len: 0,
                    reason: "empty",
                });
            }
            self.note(format!(
                "input {session} {}",
                String::from_utf8_lossy(input)
            ));
            Ok(())
        }
    }

    fn batch(inputs: &[(SessionId, u32, &str)]) -> InputBatch {
        InputBatch {
            tick: 0,
            inputs: inputs
                .iter()
                .map(|&(session, seq, data)| proto::msg::SessionInput {
                    session,
                    seq,
                    data: bytes::Bytes::copy_from_slice(data.as_bytes()),
                })
                .collect(),
        }
    }

    #[test]
    fn sessions_join_on_input_and_leave_with_their_relay_or_when_idle() {
        let schema = crate::worlds::plaza::schema(10, 100.0);
        let layout = Arc::new(schema.layout().unwrap());
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (events_tx, events) = mpsc::channel(16);
        let (publish, _ticks) = watch::channel(None);
        let registry = prometheus::Registry::new();
        let metrics = TickMetrics::register(&registry).unwrap();
        let mut tl = TickLoop {
            sim: Box::new(Recorder {
                schema,
                log: log.clone(),
            }),
            layout,
            events,
            publish,
            metrics: metrics.clone(),
            readiness: Readiness::new(),
        };
        let mut sessions = HashMap::new();
        let take = || std::mem::take(&mut *log.lock().unwrap());
        let send = |from, b| {
            events_tx
                .try_send(Event::Inputs { from, batch: b })
                .unwrap()
        };
        // Relay 1: session 5 joins with its first input; a repeat and an
        // older sequence number are refused; the next one applies. 13 gets
        // no entity; 6 joins but its empty input is malformed.
        send(
            1,
            batch(&[(5, 10, "a"), (5, 10, "b"), (5, 9, "c"), (5, 11, "d")]),
        );
        send(1, batch(&[(13, 1, "x"), (6, 1, "")]));
        // Relay 2: session 7, whose sequence numbers wrap.
        send(2, batch(&[(7, u32::MAX, "e"), (7, 0, "f")]));
        tl.apply_events(1, &mut sessions);
        assert_eq!(
            take(),
            [
                "join 5",
                "input 5 a",
                "input 5 d",
                "join 6",
                "join 7",
                "input 7 e",
                "input 7 f"
            ]
        );
        let applied = metrics.inputs.with_label_values(&["applied"]).get();
        let rejected = metrics.inputs.with_label_values(&["rejected"]).get();
        assert_eq!((applied, rejected), (4, 4));

        // Relay 1 goes away: its sessions leave, 7 stays.
        events_tx.try_send(Event::Gone { from: 1 }).unwrap();
        tl.apply_events(2, &mut sessions);
        let mut left = take();
        left.sort();
        assert_eq!(left, ["leave 5", "leave 6"]);
        assert_eq!(sessions.keys().copied().collect::<Vec<_>>(), [7]);

        // 7 moves to relay 3 (a failover) and keeps its entity.
        send(3, batch(&[(7, 1, "g")]));
        tl.apply_events(3, &mut sessions);
        assert_eq!(take(), ["input 7 g"]);
        events_tx.try_send(Event::Gone { from: 2 }).unwrap();
        tl.apply_events(4, &mut sessions);
        assert!(take().is_empty(), "relay 2 no longer holds session 7");

        // Idle for longer than the limit: 7 leaves too.
        tl.release_idle(3 + 100, 100, &mut sessions);
        assert!(take().is_empty(), "exactly the limit is not idle yet");
        tl.release_idle(4 + 100, 100, &mut sessions);
        assert_eq!(take(), ["leave 7"]);
        assert!(sessions.is_empty());
    }

    #[test]
    fn skipping_jumps_to_the_slot_due_now() {
        let start = Instant::now();
        let mut s = Schedule::new(start, 20);
        assert_eq!(s.advance(), start + Duration::from_millis(50));
        // Two and a half seconds later, slot 50 is due: 49 were skipped.
        assert_eq!(s.skip_to(start + Duration::from_millis(2525)), 49);
        assert_eq!(s.slot(), 50);
        assert_eq!(s.advance(), start + Duration::from_millis(2550));
        // Never backwards.
        assert_eq!(s.skip_to(start), 0);
        assert_eq!(s.slot(), 51);
    }
}
