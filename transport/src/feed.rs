//! The upstream feed: a world's ticks from a publisher (the origin, or a relay
//! serving relays below it) to a subscriber (a relay), and the inputs of its
//! clients back up. ALPN [`crate::ALPN_UPSTREAM`].
//!
//! One protocol serves every upstream hop (origin → relay, relay → relay), so
//! relays form a tree whose leaves see the origin's ticks and hashes.
//!
//! ## Protocol
//!
//! A subscriber opens one bidirectional stream per world; one connection may
//! carry several worlds.
//!
//! 1. Subscriber → [`Subscribe`] `{version, world, auth, relay_id}`.
//! 2. Publisher → [`Welcome`] `{session: 0, world, schema, tick_rate, tick,
//!    relay_id: publisher id, region}`, or [`Error`] `{code, message}` and
//!    the end of its half of the stream ([`ErrorCode::UnknownWorld`],
//!    [`ErrorCode::BadToken`], ...).
//! 3. Publisher → one [`Update`] per tick it sends: `base` is the tick it
//!    sent before on this stream (`None`, a keyframe, for the first update
//!    and after a long stall), one [`Chunk`] for [`CellId::WORLD`] holding
//!    the [`proto::delta`] from the base snapshot (or the empty one), `hash`
//!    the world's [`StateHash`], `predict_from: None`, `dropped: []`. The
//!    stream is reliable and ordered, so the base is always the snapshot the
//!    subscriber decoded last.
//! 4. Subscriber → [`Ack`] `{tick}` once it has applied an update, and
//!    [`InputBatch`] frames whenever it has client inputs to forward.
//! 5. Publisher → [`Goaway`] before it shuts down. Either side may send an
//!    [`Error`] before it gives up on the stream. A subscriber that finishes
//!    its half of the stream ends the subscription.
//!
//! Bytes that do not decode, or a message out of place, get an [`Error`]
//! with the matching code and the connection is closed with that code; other
//! connections are not affected.
//!
//! ## Latest wins
//!
//! The publisher never queues ticks for a subscriber. Each subscription
//! watches a `tokio::sync::watch` that holds only the newest tick, and sends
//! the newest tick whenever it may send: when the previous write has been
//! taken by QUIC (flow control) and fewer than a few round trips' worth of
//! updates are unacknowledged ([`in_flight_limit`]). Ticks published
//! meanwhile simply replace each other in the watch, and the next update is
//! coded from the last snapshot sent straight to the newest one; when that
//! gap exceeds `keyframe_after` ticks (default one second of ticks) a fresh
//! keyframe goes instead. So a subscriber that stalls, or a congested link,
//! holds at most a few round trips of stale updates, and resumes at the
//! newest state rather than replaying a backlog at 1x.
//!
//! ## Encoding once
//!
//! Subscribers at the same point code the same delta; the publisher keeps
//! the last few encoded deltas, keyed by the identity of their base and
//! target snapshots, so each is encoded once however many subscribers take
//! it.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::delta::{self, Codec};
use proto::msg::{
    Ack, CellId, Chunk, Error, Goaway, InputBatch, MessageType, Subscribe, Update, Welcome,
};
use proto::{DeltaError, ErrorCode, Layout, Message, Schema, Snapshot, StateHash};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::framed::{FrameError, FramedRecv, FramedSend};

/// Time a subscriber has to send its [`Subscribe`] after opening a stream.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a subscriber waits for the [`Welcome`] (the publisher may have to
/// subscribe upstream first).
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

/// A subscription whose unacknowledged updates have been stuck at the limit
/// for this long is ended with [`ErrorCode::IdleTimeout`]: the subscriber is
/// alive on the QUIC level but no longer reads.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Time given to a last [`Error`] or [`Goaway`] to reach the peer before the
/// stream or connection is closed.
pub const GOODBYE_GRACE: Duration = Duration::from_secs(1);

/// Time connections get, after shutdown, to deliver their [`Goaway`]s.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Fewest unacknowledged updates a publisher allows (see
/// [`in_flight_limit`]).
pub const MIN_IN_FLIGHT: usize = 4;

/// Input batches a [`Subscription`] queues before it drops new ones.
pub const INPUT_QUEUE: usize = 256;

/// Encoded deltas the publisher keeps for other subscribers to reuse.
const ENCODE_CACHE: usize = 32;

/// Longest frame a publisher reads before the [`Subscribe`].
const SUBSCRIBE_FRAME_MAX: usize = MessageType::Subscribe.max_len() + 8;

/// Longest frame a publisher reads after it: input batches, acks, errors.
const UPSTREAM_FRAME_MAX: usize = MessageType::InputBatch.max_len() + 8;

/// Most updates a publisher leaves unacknowledged on one subscription: two
/// round trips' worth of ticks plus two, at least [`MIN_IN_FLIGHT`], at most
/// two seconds of ticks. Enough that a healthy link never waits for acks;
/// little enough that a stalled subscriber or a congested link holds a few
/// round trips of stale updates, not seconds of them.
pub fn in_flight_limit(rtt: Duration, tick_rate: u32) -> usize {
    let per_rtt = (2.0 * rtt.as_secs_f64() * f64::from(tick_rate)).ceil() as usize;
    (per_rtt + 2).clamp(MIN_IN_FLIGHT, (2 * tick_rate as usize).max(MIN_IN_FLIGHT))
}

/// One tick of a world as the feed carries it.
#[derive(Debug, Clone)]
pub struct FeedTick {
    /// Global tick number (from 1).
    pub tick: u64,
    /// Origin wall clock when the tick was made, microseconds since the UNIX
    /// epoch.
    pub origin_time_us: u64,
    /// The world's state hash at this tick.
    pub hash: StateHash,
    /// The whole world at this tick.
    pub snapshot: Arc<Snapshot>,
}

/// What a subscriber learns about a world at subscription.
#[derive(Debug, Clone)]
pub struct WorldInfo {
    /// World name.
    pub world: String,
    /// The world's schema.
    pub schema: Schema,
    /// The layout compiled from `schema`.
    pub layout: Arc<Layout>,
    /// Ticks per second.
    pub tick_rate: u32,
}

impl WorldInfo {
    /// The info of a world named `world` with `schema`, checking that the
    /// schema compiles and the tick rate is one the protocol carries.
    pub fn new(
        world: impl Into<String>,
        schema: Schema,
        tick_rate: u32,
    ) -> Result<Self, FeedError> {
        let layout = schema
            .layout()
            .map_err(|e| FeedError::Protocol(format!("schema does not compile: {e}")))?;
        if tick_rate == 0 || tick_rate > proto::msg::MAX_TICK_RATE {
            return Err(FeedError::Protocol(format!(
                "tick rate {tick_rate} is outside 1 to {}",
                proto::msg::MAX_TICK_RATE
            )));
        }
        Ok(WorldInfo {
            world: world.into(),
            schema,
            layout: Arc::new(layout),
            tick_rate,
        })
    }
}

/// A world as a publisher serves it: its description, the newest tick, and
/// where its inputs go. Dropping it tells the world's host that this
/// subscription ended (the input channel loses a sender).
#[derive(Debug, Clone)]
pub struct Source {
    /// The world.
    pub info: WorldInfo,
    /// The newest tick (`None` before the first).
    pub ticks: watch::Receiver<Option<Arc<FeedTick>>>,
    /// Where the subscriber's input batches go.
    pub inputs: mpsc::Sender<InputBatch>,
}

/// The boxed future [`Worlds::open`] returns.
pub type OpenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Source, (ErrorCode, String)>> + Send + 'a>>;

/// What a publisher serves: a relay opens worlds on demand (it may subscribe
/// upstream first), so this is async.
pub trait Worlds: Send + Sync + 'static {
    /// The world called `world` for one new subscription, or why not
    /// (`(ErrorCode::UnknownWorld, "...")`, ...). Called once per
    /// subscription; the returned [`Source`] is dropped when it ends.
    fn open(&self, world: &str) -> OpenFuture<'_>;
}

/// How a publisher runs.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// This node's id, sent in every [`Welcome`] (at most
    /// [`proto::msg::MAX_RELAY_ID_LEN`] bytes).
    pub id: String,
    /// This node's region (at most [`proto::msg::MAX_REGION_LEN`] bytes).
    pub region: String,
    /// The shared secret that [`Subscribe::auth`] must equal; `None` serves
    /// anyone who reaches the port (and passes TLS).
    pub auth: Option<Vec<u8>>,
    /// A subscriber this many ticks behind gets a keyframe instead of a
    /// delta; `None`: one second of ticks.
    pub keyframe_after: Option<u32>,
    /// Most connections served at once; more are refused at once.
    pub max_connections: usize,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            id: "statecast".to_owned(),
            region: "local".to_owned(),
            auth: None,
            keyframe_after: None,
            max_connections: 256,
        }
    }
}

/// A publisher's counters, for the host to export as metrics
/// ([`FeedStats::collector`]). Gauges go up and down; the rest only count.
#[derive(Debug, Default)]
pub struct FeedStats {
    /// Gauge: connections open.
    pub connections: AtomicU64,
    /// Gauge: subscriptions being served (welcomed and not yet ended).
    pub subscribers: AtomicU64,
    /// Subscriptions welcomed.
    pub subscriptions: AtomicU64,
    /// Subscriptions refused with an [`Error`] (unknown world, bad auth, ...).
    pub refused: AtomicU64,
    /// Connections refused because [`PublisherConfig::max_connections`]
    /// were open.
    pub connections_refused: AtomicU64,
    /// Streams that broke the protocol (their connection was closed).
    pub protocol_errors: AtomicU64,
    /// Updates sent.
    pub updates_sent: AtomicU64,
    /// Of which keyframes.
    pub keyframes_sent: AtomicU64,
    /// Bytes of updates sent (framed).
    pub bytes_sent: AtomicU64,
    /// Ticks never sent to some subscriber because a newer one replaced
    /// them while it could not take more (summed over subscribers).
    pub ticks_superseded: AtomicU64,
    /// Deltas taken from the encode cache instead of encoded again.
    pub encode_reused: AtomicU64,
    /// Input batches received.
    pub input_batches: AtomicU64,
    /// Inputs received (in those batches).
    pub inputs: AtomicU64,
    /// Input batches dropped because the world's input channel was full.
    pub input_batches_dropped: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Decrements a gauge when dropped.
struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    fn up(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FeedStats {
    /// A prometheus collector that reads these counters at every scrape,
    /// naming them `{prefix}_subscribers`, `{prefix}_updates_sent_total`,
    /// ... Register it with `registry.register(Box::new(...))`. Fails if
    /// `prefix` does not make valid metric names.
    pub fn collector(self: &Arc<Self>, prefix: &str) -> prometheus::Result<FeedCollector> {
        let metric = |name: &str, help: &str, kind| {
            let desc = prometheus::core::Desc::new(
                format!("{prefix}_{name}"),
                help.to_owned(),
                Vec::new(),
                Default::default(),
            );
            desc.map(|desc| (desc, kind))
        };
        use prometheus::proto::MetricType::{COUNTER, GAUGE};
        let descs = vec![
            metric("connections", "Upstream feed connections open.", GAUGE),
            metric("subscribers", "Feed subscriptions being served.", GAUGE),
            metric(
                "subscriptions_total",
                "Feed subscriptions welcomed.",
                COUNTER,
            ),
            metric(
                "subscriptions_refused_total",
                "Feed subscriptions refused (unknown world, bad auth, ...).",
                COUNTER,
            ),
            metric(
                "connections_refused_total",
                "Feed connections refused at the connection limit.",
                COUNTER,
            ),
            metric(
                "protocol_errors_total",
                "Feed streams closed for breaking the protocol.",
                COUNTER,
            ),
            metric("updates_sent_total", "Feed updates sent.", COUNTER),
            metric(
                "keyframes_sent_total",
                "Feed updates sent as keyframes.",
                COUNTER,
            ),
            metric("bytes_sent_total", "Bytes of feed updates sent.", COUNTER),
            metric(
                "ticks_superseded_total",
                "Ticks skipped for a subscriber because a newer tick replaced them.",
                COUNTER,
            ),
            metric(
                "encode_reused_total",
                "Feed deltas reused from the encode cache.",
                COUNTER,
            ),
            metric(
                "input_batches_total",
                "Input batches received from subscribers.",
                COUNTER,
            ),
            metric(
                "inputs_received_total",
                "Inputs received from subscribers.",
                COUNTER,
            ),
            metric(
                "input_batches_dropped_total",
                "Input batches dropped because the world's input queue was full.",
                COUNTER,
            ),
        ];
        Ok(FeedCollector {
            stats: self.clone(),
            descs: descs.into_iter().collect::<prometheus::Result<_>>()?,
        })
    }

    fn values(&self) -> [u64; 14] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            get(&self.connections),
            get(&self.subscribers),
            get(&self.subscriptions),
            get(&self.refused),
            get(&self.connections_refused),
            get(&self.protocol_errors),
            get(&self.updates_sent),
            get(&self.keyframes_sent),
            get(&self.bytes_sent),
            get(&self.ticks_superseded),
            get(&self.encode_reused),
            get(&self.input_batches),
            get(&self.inputs),
            get(&self.input_batches_dropped),
        ]
    }
}

/// Exposes [`FeedStats`] to a prometheus registry ([`FeedStats::collector`]).
pub struct FeedCollector {
    stats: Arc<FeedStats>,
    descs: Vec<(prometheus::core::Desc, prometheus::proto::MetricType)>,
}

impl fmt::Debug for FeedCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeedCollector")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl prometheus::core::Collector for FeedCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().map(|(d, _)| d).collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto::{Counter, Gauge, Metric, MetricFamily, MetricType};
        self.descs
            .iter()
            .zip(self.stats.values())
            .map(|((desc, kind), value)| {
                let mut metric = Metric::default();
                if *kind == MetricType::GAUGE {
                    let mut g = Gauge::default();
                    g.set_value(value as f64);
                    metric.set_gauge(g);
                } else {
                    let mut c = Counter::default();
                    c.set_value(value as f64);
                    metric.set_counter(c);
                }
                let mut family = MetricFamily::default();
                family.set_name(desc.fq_name.clone());
                family.set_help(desc.help.clone());
                family.set_field_type(*kind);
                family.set_metric(vec![metric]);
                family
            })
            .collect()
    }
}

/// Why a feed subscription failed or ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FeedError {
    /// The publisher answered the subscription (or ended it) with an error.
    #[error("the publisher refused: {code}: {message}")]
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its text.
        message: String,
    },
    /// The state rebuilt from an update does not match the hash it carries.
    /// Resubscribe: the next subscription starts from a keyframe.
    #[error("tick {tick}: state hash {got} does not match the publisher's {expected}")]
    HashMismatch {
        /// The tick.
        tick: u64,
        /// The publisher's hash.
        expected: StateHash,
        /// The hash of the state decoded here.
        got: StateHash,
    },
    /// An update's delta does not decode against the state held here.
    #[error("tick {tick}: cannot decode the delta: {source}")]
    Delta {
        /// The tick.
        tick: u64,
        /// Why.
        #[source]
        source: DeltaError,
    },
    /// Reading or writing the stream failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The connection could not be started (bad address or configuration;
    /// the endpoint needs a default client configuration offering
    /// [`crate::ALPN_UPSTREAM`]).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The publisher is shutting down.
    #[error("the publisher is going away: {reason}")]
    Goaway {
        /// Its text.
        reason: String,
        /// Where to go instead, if it said.
        redirect: Option<String>,
    },
    /// The publisher closed the connection with an application code.
    #[error("the publisher closed the connection: {code}: {reason}")]
    Closed {
        /// Its code.
        code: ErrorCode,
        /// Its text.
        reason: String,
    },
    /// The publisher ended the stream without a word.
    #[error("the publisher ended the feed")]
    Ended,
    /// No answer in time.
    #[error("no answer from the publisher within {0:?}")]
    Timeout(Duration),
    /// The publisher broke the protocol.
    #[error("the publisher broke the protocol: {0}")]
    Protocol(String),
}

impl FeedError {
    /// Whether subscribing again (after a backoff) may succeed: true for
    /// network failures, timeouts, drains, hash mismatches and refusals that
    /// say so; false for configuration errors (unknown world, bad token,
    /// version) and publishers that break the protocol.
    pub fn retry_safe(&self) -> bool {
        use proto::msg::Retry;
        match self {
            FeedError::Refused { code, .. } | FeedError::Closed { code, .. } => {
                matches!(code.retry(), Retry::Later | Retry::Elsewhere)
                    || *code == ErrorCode::Normal
            }
            FeedError::HashMismatch { .. }
            | FeedError::Delta { .. }
            | FeedError::Goaway { .. }
            | FeedError::Ended
            | FeedError::Timeout(_) => true,
            FeedError::Frame(e) => !e.is_peer_fault(),
            FeedError::Connect(e) => matches!(e, quinn::ConnectError::CidsExhausted),
            FeedError::Connection(e) => !matches!(
                e,
                quinn::ConnectionError::VersionMismatch
                    | quinn::ConnectionError::TransportError(_)
                    | quinn::ConnectionError::LocallyClosed
            ),
            FeedError::Protocol(_) => false,
        }
    }
}

/// The close code and reason of a connection the peer closed on purpose.
fn app_close(e: &quinn::ConnectionError) -> Option<(ErrorCode, String)> {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => Some((
            ErrorCode::from_code(u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX)),
            String::from_utf8_lossy(&close.reason).into_owned(),
        )),
        _ => None,
    }
}

impl FeedError {
    fn from_frame(e: FrameError) -> FeedError {
        let closed = match &e {
            FrameError::Read(quinn::ReadError::ConnectionLost(c))
            | FrameError::Write(quinn::WriteError::ConnectionLost(c))
            | FrameError::Connection(c) => app_close(c),
            _ => None,
        };
        match closed {
            Some((code, reason)) => FeedError::Closed { code, reason },
            None => FeedError::Frame(e),
        }
    }
}

fn quinn_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code.to_code().into())
}

/// Equal in constant time for equal lengths (the secret's length is not
/// hidden).
fn secret_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A delta encoded once and kept for other subscribers at the same point.
struct Cached {
    base: Option<Arc<Snapshot>>,
    target: Arc<Snapshot>,
    data: Bytes,
}

/// What every task of one publisher shares.
struct Publisher {
    worlds: Arc<dyn Worlds>,
    config: PublisherConfig,
    stats: Arc<FeedStats>,
    cache: Mutex<VecDeque<Cached>>,
}

impl Publisher {
    /// The delta from `base` (`None`: the empty snapshot) to `target`, from
    /// the cache or freshly encoded. Entries are matched by snapshot
    /// identity, which the cache keeps alive, so a hit is always the same
    /// bytes.
    fn encode(
        &self,
        layout: &Layout,
        base: Option<&Arc<Snapshot>>,
        target: &Arc<Snapshot>,
    ) -> Bytes {
        let same = |c: &Cached| {
            Arc::ptr_eq(&c.target, target)
                && match (&c.base, base) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                }
        };
        if let Some(hit) = self.lock_cache().iter().find(|c| same(c)) {
            bump(&self.stats.encode_reused, 1);
            return hit.data.clone();
        }
        let mut out = Vec::new();
        match base {
            Some(base) => delta::encode(layout, base, None, target, &mut out),
            None => delta::keyframe(layout, target, &mut out),
        }
        let data = Bytes::from(out);
        let mut cache = self.lock_cache();
        if !cache.iter().any(same) {
            if cache.len() >= ENCODE_CACHE {
                cache.pop_front();
            }
            cache.push_back(Cached {
                base: base.cloned(),
                target: target.clone(),
                data: data.clone(),
            });
        }
        data
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, VecDeque<Cached>> {
        // A panic while holding the lock leaves a consistent deque.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves subscribers on `endpoint` until `shutdown` resolves, at most
/// `config.max_connections` connections at once (more are refused). The
/// endpoint should accept [`crate::ALPN_UPSTREAM`] only: connections that
/// negotiated another protocol are closed.
///
/// On shutdown it stops accepting, sends every subscription a [`Goaway`],
/// closes its connections with [`ErrorCode::Draining`], and returns once
/// they are closed (after at most [`SHUTDOWN_GRACE`]). It leaves the endpoint
/// open: close it, or drop it, once done.
pub async fn serve(
    endpoint: quinn::Endpoint,
    worlds: Arc<dyn Worlds>,
    config: PublisherConfig,
    stats: Arc<FeedStats>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let publisher = Arc::new(Publisher {
        worlds,
        config,
        stats,
        cache: Mutex::new(VecDeque::new()),
    });
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                remote = %incoming.remote_address(),
                max = publisher.config.max_connections,
                "feed connection refused: at the connection limit"
            );
            bump(&publisher.stats.connections_refused, 1);
            incoming.refuse();
            continue;
        };
        let publisher = publisher.clone();
        let stop = stop_rx.clone();
        connections.spawn(async move {
            serve_connection(incoming, publisher, stop).await;
            drop(slot);
        });
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE + GOODBYE_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!("feed connections still open after the grace period; aborting them");
        connections.shutdown().await;
    }
}

/// A stream's failure that ends its whole connection.
#[derive(Debug)]
struct Violation {
    code: ErrorCode,
    message: String,
}

async fn serve_connection(
    incoming: quinn::Incoming,
    publisher: Arc<Publisher>,
    mut stop: watch::Receiver<bool>,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "feed handshake failed");
            return;
        }
    };
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() != Some(crate::ALPN_UPSTREAM) {
        tracing::debug!(%remote, "feed connection without the upstream ALPN; closing");
        conn.close(
            quinn_code(ErrorCode::ProtocolViolation),
            b"expected ALPN statecast-up/1",
        );
        return;
    }
    let _open = GaugeGuard::up(&publisher.stats.connections);
    tracing::debug!(%remote, "feed connection open");
    let mut streams = JoinSet::new();
    let close: Option<Violation> = loop {
        tokio::select! {
            () = stopped(&mut stop) => break Some(Violation {
                code: ErrorCode::Draining,
                message: "shutting down".to_owned(),
            }),
            Some(done) = streams.join_next(), if !streams.is_empty() => {
                if let Ok(Err(violation)) = done {
                    break Some(violation);
                }
            }
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(
                        conn.clone(),
                        send,
                        recv,
                        publisher.clone(),
                        stop.clone(),
                    ));
                }
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "feed connection ended");
                    break None;
                }
            },
        }
    };
    match close {
        Some(v) if v.code == ErrorCode::Draining => {
            // Streams see the stop too: they send their goaways. Give them
            // the time to, then close whatever is left.
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
                while streams.join_next().await.is_some() {}
            })
            .await;
            conn.close(quinn_code(v.code), v.message.as_bytes());
        }
        Some(v) => {
            tracing::info!(%remote, code = %v.code, message = %v.message, "feed connection closed: protocol error");
            bump(&publisher.stats.protocol_errors, 1);
            conn.close(quinn_code(v.code), v.message.as_bytes());
        }
        None => {}
    }
    streams.shutdown().await;
}

/// Sends `Error{code, message}` and finishes the stream, giving the peer
/// [`GOODBYE_GRACE`] to receive it.
async fn send_error(tx: &mut FramedSend, code: ErrorCode, message: &str) {
    let mut end = message.len().min(proto::msg::MAX_TEXT_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = message[..end].to_owned();
    goodbye(tx, Message::Error(Error { code, message })).await;
}

/// Sends `msg`, finishes the stream and waits (at most [`GOODBYE_GRACE`])
/// until the peer has it.
async fn goodbye(tx: &mut FramedSend, msg: Message) {
    let _ = tokio::time::timeout(GOODBYE_GRACE, async {
        if tx.send(&msg).await.is_ok() && tx.finish().is_ok() {
            let _ = tx.stream_mut().stopped().await;
        }
    })
    .await;
}

/// Serves one subscription stream. `Err` closes the whole connection.
async fn serve_stream(
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    publisher: Arc<Publisher>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Violation> {
    let mut tx = FramedSend::new(send);
    let mut rx = FramedRecv::new(recv).with_max_frame(SUBSCRIBE_FRAME_MAX);
    let first = tokio::select! {
        () = stopped(&mut stop) => return Ok(()),
        first = tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx.recv()) => first,
    };
    let violation = |code, message: String| Violation { code, message };
    let subscribe = match first {
        Ok(Ok(Some(Message::Subscribe(s)))) => s,
        Ok(Ok(None)) => return Ok(()),
        Err(_) => {
            let v = violation(
                ErrorCode::IdleTimeout,
                format!("no subscribe within {SUBSCRIBE_TIMEOUT:?}"),
            );
            send_error(&mut tx, v.code, &v.message).await;
            return Err(v);
        }
        Ok(Ok(Some(other))) => {
            let v = violation(
                ErrorCode::ProtocolViolation,
                format!("expected subscribe, got {}", other.message_type().name()),
            );
            send_error(&mut tx, v.code, &v.message).await;
            return Err(v);
        }
        Ok(Err(e)) => match e.code().filter(|_| e.is_peer_fault()) {
            Some(code) => {
                let v = violation(code, e.to_string());
                send_error(&mut tx, code, &v.message).await;
                return Err(v);
            }
            None => return Ok(()),
        },
    };
    let stats = &publisher.stats;
    let remote = conn.remote_address();
    if let Some(secret) = &publisher.config.auth
        && !secret_eq(secret, &subscribe.auth)
    {
        tracing::info!(%remote, relay = %subscribe.relay_id, world = %subscribe.world, "feed subscription refused: bad credential");
        bump(&stats.refused, 1);
        send_error(&mut tx, ErrorCode::BadToken, "bad upstream credential").await;
        return Ok(());
    }
    let opened = tokio::select! {
        () = stopped(&mut stop) => {
            send_error(&mut tx, ErrorCode::Draining, "shutting down").await;
            return Ok(());
        }
        opened = publisher.worlds.open(&subscribe.world) => opened,
    };
    let source = match opened {
        Ok(source) => source,
        Err((code, message)) => {
            tracing::info!(%remote, relay = %subscribe.relay_id, world = %subscribe.world, %code, %message, "feed subscription refused");
            bump(&stats.refused, 1);
            send_error(&mut tx, code, &message).await;
            return Ok(());
        }
    };
    let info = source.info.clone();
    let current = source.ticks.borrow().as_ref().map_or(0, |t| t.tick);
    let welcome = Message::Welcome(Welcome {
        version: proto::VERSION,
        session: 0,
        world: info.world.clone(),
        schema: info.schema.clone(),
        tick_rate: info.tick_rate,
        tick: current,
        relay_id: publisher.config.id.clone(),
        region: publisher.config.region.clone(),
    });
    if let Err(e) = tx.send(&welcome).await {
        tracing::warn!(%remote, world = %info.world, error = %e, "cannot send the feed welcome");
        if e.code() == Some(ErrorCode::Internal) {
            send_error(&mut tx, ErrorCode::Internal, "cannot encode the welcome").await;
        }
        return Ok(());
    }
    bump(&stats.subscriptions, 1);
    let _serving = GaugeGuard::up(&stats.subscribers);
    tracing::info!(%remote, relay = %subscribe.relay_id, world = %info.world, tick = current, "feed subscriber welcomed");

    let rx = rx.with_max_frame(UPSTREAM_FRAME_MAX);
    let (ack_tx, ack_rx) = watch::channel(0u64);
    let ended = {
        let mut reader = pin!(read_upstream(rx, source.inputs.clone(), ack_tx, stats));
        let mut writer = pin!(write_updates(&conn, &mut tx, &source, ack_rx, &publisher));
        tokio::select! {
            () = stopped(&mut stop) => End::Stop,
            end = &mut reader => end,
            end = &mut writer => end,
        }
    };
    match ended {
        End::Stop => {
            goodbye(
                &mut tx,
                Message::Goaway(Goaway {
                    reason: "the publisher is shutting down".to_owned(),
                    redirect: None,
                    deadline_ms: GOODBYE_GRACE.as_millis() as u32,
                }),
            )
            .await;
            Ok(())
        }
        End::Left => {
            let _ = tx.finish();
            Ok(())
        }
        End::Gone => Ok(()),
        End::Refuse(code, message) => {
            send_error(&mut tx, code, &message).await;
            Ok(())
        }
        End::Violation(v) => {
            send_error(&mut tx, v.code, &v.message).await;
            Err(v)
        }
    }
}

/// How a served subscription ended.
enum End {
    /// The publisher shuts down.
    Stop,
    /// The subscriber finished its half or said goodbye.
    Left,
    /// The stream or connection is gone.
    Gone,
    /// The publisher ends the subscription with an error (world gone, stall).
    Refuse(ErrorCode, String),
    /// The subscriber broke the protocol.
    Violation(Violation),
}

/// Reads the subscriber's half: acks and input batches.
async fn read_upstream(
    mut rx: FramedRecv,
    inputs: mpsc::Sender<InputBatch>,
    acks: watch::Sender<u64>,
    stats: &FeedStats,
) -> End {
    loop {
        let msg = match rx.recv().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return End::Left,
            Err(e) => {
                return match e.code().filter(|_| e.is_peer_fault()) {
                    Some(code) => End::Violation(Violation {
                        code,
                        message: e.to_string(),
                    }),
                    None => End::Gone,
                };
            }
        };
        match msg {
            Message::Ack(Ack { tick }) => {
                if tick < *acks.borrow() {
                    return End::Violation(Violation {
                        code: ErrorCode::ProtocolViolation,
                        message: format!("ack of tick {tick} after a newer one"),
                    });
                }
                acks.send_replace(tick);
            }
            Message::InputBatch(batch) => {
                bump(&stats.input_batches, 1);
                bump(&stats.inputs, batch.inputs.len() as u64);
                match inputs.try_send(batch) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        bump(&stats.input_batches_dropped, 1);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        return End::Refuse(
                            ErrorCode::UpstreamLost,
                            "the world no longer takes inputs".to_owned(),
                        );
                    }
                }
            }
            Message::Error(e) => {
                tracing::debug!(code = %e.code, message = %e.message, "feed subscriber said goodbye");
                return End::Left;
            }
            other => {
                return End::Violation(Violation {
                    code: ErrorCode::ProtocolViolation,
                    message: format!(
                        "{} is not allowed from a feed subscriber",
                        other.message_type().name()
                    ),
                });
            }
        }
    }
}

/// Sends the newest tick whenever the subscriber can take one.
async fn write_updates(
    conn: &quinn::Connection,
    tx: &mut FramedSend,
    source: &Source,
    mut acks: watch::Receiver<u64>,
    publisher: &Publisher,
) -> End {
    let stats = &publisher.stats;
    let info = &source.info;
    let keyframe_after = u64::from(
        publisher
            .config
            .keyframe_after
            .unwrap_or(info.tick_rate)
            .max(1),
    );
    let mut ticks = source.ticks.clone();
    let mut last: Option<(u64, Arc<Snapshot>)> = None;
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let mut last_progress = Instant::now();
    loop {
        let acked = *acks.borrow_and_update();
        if let Some((sent, _)) = &last
            && acked > *sent
        {
            return End::Violation(Violation {
                code: ErrorCode::ProtocolViolation,
                message: format!("ack of tick {acked}, never sent"),
            });
        }
        while in_flight.front().is_some_and(|&t| t <= acked) {
            in_flight.pop_front();
            last_progress = Instant::now();
        }
        let limit = in_flight_limit(conn.rtt(), info.tick_rate);
        let newest = ticks.borrow_and_update().clone();
        let newer = newest.filter(|t| last.as_ref().is_none_or(|(sent, _)| t.tick > *sent));
        match newer {
            Some(tick) if in_flight.len() < limit => {
                let behind = last.as_ref().map(|(sent, _)| tick.tick - sent);
                let base = last
                    .as_ref()
                    .filter(|_| behind.is_some_and(|b| b <= keyframe_after));
                let data = publisher.encode(&info.layout, base.map(|(_, s)| s), &tick.snapshot);
                let update = Message::Update(Update {
                    tick: tick.tick,
                    base: base.map(|(t, _)| *t),
                    predict_from: None,
                    origin_time_us: tick.origin_time_us,
                    hash: tick.hash.0,
                    chunks: vec![Chunk {
                        cell: CellId::WORLD,
                        data,
                    }],
                    dropped: Vec::new(),
                });
                if let Err(e) = tx.send(&update).await {
                    return match e {
                        FrameError::Encode(_) | FrameError::MessageTooLarge { .. } => {
                            tracing::error!(world = %info.world, tick = tick.tick, error = %e, "cannot send a feed update");
                            End::Refuse(
                                ErrorCode::Internal,
                                format!("cannot send tick {}: {e}", tick.tick),
                            )
                        }
                        _ => End::Gone,
                    };
                }
                bump(&stats.updates_sent, 1);
                bump(&stats.bytes_sent, update.encoded_len() as u64);
                if base.is_none() {
                    bump(&stats.keyframes_sent, 1);
                }
                if let Some(b) = behind {
                    bump(&stats.ticks_superseded, b.saturating_sub(1));
                }
                if in_flight.is_empty() {
                    last_progress = Instant::now();
                }
                in_flight.push_back(tick.tick);
                last = Some((tick.tick, tick.snapshot.clone()));
            }
            _ => {
                let stalled = in_flight.len() >= limit;
                let stall_deadline = tokio::time::Instant::from_std(last_progress + STALL_TIMEOUT);
                tokio::select! {
                    changed = ticks.changed() => if changed.is_err() {
                        return End::Refuse(ErrorCode::UpstreamLost, format!("world {} closed", info.world));
                    },
                    changed = acks.changed() => if changed.is_err() {
                        // The reader is gone; its own result ends the task.
                        std::future::pending::<()>().await;
                    },
                    () = tokio::time::sleep_until(stall_deadline), if stalled => {
                        return End::Refuse(
                            ErrorCode::IdleTimeout,
                            format!("no ack for {STALL_TIMEOUT:?}"),
                        );
                    }
                }
            }
        }
    }
}

/// One world subscribed from a publisher: the client side of the feed.
///
/// [`Subscription::next`] decodes each update against the state held, checks
/// it against the publisher's hash, and acknowledges it (which lets the
/// publisher send more). [`Subscription::send_inputs`] queues input batches
/// upstream. Dropping the subscription ends it (its half of the stream is
/// finished; the publisher stops sending).
pub struct Subscription {
    /// The world.
    pub info: WorldInfo,
    /// The publisher's id (from its welcome).
    pub publisher_id: String,
    /// The publisher's region.
    pub region: String,
    /// The publisher's newest tick when it welcomed this subscription.
    pub welcome_tick: u64,
    conn: quinn::Connection,
    rx: FramedRecv,
    outbound: mpsc::Sender<Message>,
    acks: watch::Sender<u64>,
    held: Option<(u64, Arc<Snapshot>)>,
    /// The entity hashes of the held snapshot, by index.
    entity_hashes: Option<Arc<[StateHash]>>,
    codec: Codec,
    counters: SubscriptionCounters,
    failed: bool,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("world", &self.info.world)
            .field("publisher_id", &self.publisher_id)
            .field("region", &self.region)
            .field("held", &self.held.as_ref().map(|(t, _)| *t))
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// What a [`Subscription`] received and dropped.
#[derive(Debug, Default)]
pub struct SubscriptionCounters {
    /// Updates applied.
    pub updates: AtomicU64,
    /// Of which keyframes.
    pub keyframes: AtomicU64,
    /// Bytes of updates received (framed).
    pub bytes: AtomicU64,
    /// Input batches dropped because the upstream link was saturated.
    pub inputs_dropped: AtomicU64,
}

impl Subscription {
    /// Connects to the publisher at `addr` (as `server_name`, the name its
    /// certificate carries) and subscribes to `world`.
    ///
    /// Uses the endpoint's default client configuration, which must offer
    /// [`crate::ALPN_UPSTREAM`]:
    /// `endpoint.set_default_client_config(tls.client_config(&[ALPN_UPSTREAM])?)`.
    /// The connection belongs to this subscription; to subscribe to more
    /// worlds over it, use [`Subscription::open`] with
    /// [`Subscription::connection`].
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        world: &str,
        auth: &[u8],
        relay_id: &str,
    ) -> Result<Subscription, FeedError> {
        let conn = endpoint.connect(addr, server_name)?.await?;
        Subscription::open(conn, world, auth, relay_id).await
    }

    /// Subscribes to `world` on an open connection (one stream per world).
    pub async fn open(
        conn: quinn::Connection,
        world: &str,
        auth: &[u8],
        relay_id: &str,
    ) -> Result<Subscription, FeedError> {
        let (send, recv) = conn.open_bi().await?;
        let mut tx = FramedSend::new(send);
        let subscribe = Message::Subscribe(Subscribe {
            version: proto::VERSION,
            world: world.to_owned(),
            auth: Bytes::copy_from_slice(auth),
            relay_id: relay_id.to_owned(),
        });
        tx.send(&subscribe).await.map_err(FeedError::from_frame)?;
        let mut rx = FramedRecv::new(recv);
        let answer = tokio::time::timeout(WELCOME_TIMEOUT, rx.recv())
            .await
            .map_err(|_| FeedError::Timeout(WELCOME_TIMEOUT))?
            .map_err(FeedError::from_frame)?;
        let welcome = match answer {
            Some(Message::Welcome(w)) => w,
            Some(Message::Error(e)) => {
                return Err(FeedError::Refused {
                    code: e.code,
                    message: e.message,
                });
            }
            Some(Message::Goaway(g)) => {
                return Err(FeedError::Goaway {
                    reason: g.reason,
                    redirect: g.redirect,
                });
            }
            Some(other) => {
                return Err(FeedError::Protocol(format!(
                    "expected welcome, got {}",
                    other.message_type().name()
                )));
            }
            None => return Err(FeedError::Ended),
        };
        if welcome.world != world {
            return Err(FeedError::Protocol(format!(
                "asked for world {world:?}, welcomed to {:?}",
                welcome.world
            )));
        }
        let info = WorldInfo::new(welcome.world, welcome.schema, welcome.tick_rate)?;
        let (outbound, queue) = mpsc::channel(INPUT_QUEUE);
        let (acks, ack_rx) = watch::channel(0u64);
        tokio::spawn(write_upstream(tx, queue, ack_rx));
        Ok(Subscription {
            codec: Codec::new(&info.layout),
            info,
            publisher_id: welcome.relay_id,
            region: welcome.region,
            welcome_tick: welcome.tick,
            conn,
            rx,
            outbound,
            acks,
            held: None,
            entity_hashes: None,
            counters: SubscriptionCounters::default(),
            failed: false,
        })
    }

    /// The next tick, decoded and checked against the publisher's hash. A
    /// mismatch is [`FeedError::HashMismatch`]; after any error the
    /// subscription is over (the caller resubscribes).
    pub async fn next(&mut self) -> Result<Arc<FeedTick>, FeedError> {
        if self.failed {
            return Err(FeedError::Ended);
        }
        let result = self.receive().await;
        if let Err(e) = &result {
            self.failed = true;
            let code = match e {
                FeedError::HashMismatch { .. } => Some(ErrorCode::HashMismatch),
                FeedError::Delta { .. } => Some(ErrorCode::Malformed),
                FeedError::Protocol(_) => Some(ErrorCode::ProtocolViolation),
                FeedError::Frame(f) => f.code(),
                _ => None,
            };
            if let Some(code) = code {
                // Tell the publisher why; it stops sending.
                let _ = self.outbound.try_send(Message::Error(Error {
                    code,
                    message: e.to_string().chars().take(200).collect(),
                }));
                let _ = self.rx.stream_mut().stop(quinn_code(code));
            }
        }
        result
    }

    async fn receive(&mut self) -> Result<Arc<FeedTick>, FeedError> {
        let msg = self.rx.recv().await.map_err(FeedError::from_frame)?;
        let update = match msg {
            Some(Message::Update(u)) => u,
            Some(Message::Goaway(g)) => {
                return Err(FeedError::Goaway {
                    reason: g.reason,
                    redirect: g.redirect,
                });
            }
            Some(Message::Error(e)) => {
                return Err(FeedError::Refused {
                    code: e.code,
                    message: e.message,
                });
            }
            Some(other) => {
                return Err(FeedError::Protocol(format!(
                    "{} is not allowed on a feed",
                    other.message_type().name()
                )));
            }
            None => return Err(FeedError::Ended),
        };
        let bytes = Message::Update(update.clone()).encoded_len();
        let tick = self.apply(update)?;
        bump(&self.counters.updates, 1);
        bump(&self.counters.bytes, bytes as u64);
        self.acks.send_replace(tick.tick);
        Ok(tick)
    }

    fn apply(&mut self, update: Update) -> Result<Arc<FeedTick>, FeedError> {
        let tick = update.tick;
        let [chunk] = &update.chunks[..] else {
            return Err(FeedError::Protocol(format!(
                "tick {tick}: {} chunks, a feed update has one",
                update.chunks.len()
            )));
        };
        if chunk.cell != CellId::WORLD
            || !update.dropped.is_empty()
            || update.predict_from.is_some()
        {
            return Err(FeedError::Protocol(format!(
                "tick {tick}: a feed update holds the whole world, without cells or prediction"
            )));
        }
        if let Some((held, _)) = &self.held
            && tick <= *held
        {
            return Err(FeedError::Protocol(format!(
                "tick {tick} after tick {held}"
            )));
        }
        let layout = &self.info.layout;
        let empty;
        let base = match (update.base, &self.held) {
            (None, _) => {
                empty = Snapshot::empty(layout);
                &empty
            }
            (Some(base), Some((held, snapshot))) if base == *held => snapshot.as_ref(),
            (Some(base), held) => {
                return Err(FeedError::Protocol(format!(
                    "tick {tick} is coded against tick {base}, but this subscriber holds {}",
                    held.as_ref()
                        .map_or("nothing".to_owned(), |(t, _)| format!("tick {t}"))
                )));
            }
        };
        let snapshot = self
            .codec
            .decode(layout, base, None, &chunk.data)
            .map_err(|source| FeedError::Delta { tick, source })?;
        // The world's hash is the sum of its entities' hashes: kept, so that
        // a relay splitting the tick into cells does not hash every entity
        // again ([`Subscription::entity_hashes`]).
        let hashes: Arc<[StateHash]> = (0..snapshot.len())
            .map(|i| snapshot.entity_hash(i))
            .collect();
        let got = hashes.iter().fold(StateHash(0), |sum, &h| sum.combine(h));
        let expected = StateHash(update.hash);
        if got != expected {
            return Err(FeedError::HashMismatch {
                tick,
                expected,
                got,
            });
        }
        if update.base.is_none() {
            bump(&self.counters.keyframes, 1);
        }
        let snapshot = Arc::new(snapshot);
        self.held = Some((tick, snapshot.clone()));
        self.entity_hashes = Some(hashes);
        Ok(Arc::new(FeedTick {
            tick,
            origin_time_us: update.origin_time_us,
            hash: got,
            snapshot,
        }))
    }

    /// Queues an input batch upstream without waiting. When the link is
    /// saturated (the queue of [`INPUT_QUEUE`] batches is full) the batch is
    /// dropped and counted ([`SubscriptionCounters::inputs_dropped`]), and
    /// this still returns `Ok`: inputs are latest-wins too. Fails for a
    /// batch above the protocol's limits, or once the subscription is over.
    pub fn send_inputs(&self, batch: InputBatch) -> Result<(), FeedError> {
        let msg = Message::InputBatch(batch);
        msg.check()
            .map_err(|e| FeedError::Frame(FrameError::Encode(e)))?;
        match self.outbound.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                bump(&self.counters.inputs_dropped, 1);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(FeedError::Ended),
        }
    }

    /// Smoothed RTT of the upstream connection.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// The upstream connection (to subscribe more worlds over it with
    /// [`Subscription::open`], or to close it).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The hash of every entity of the newest tick applied, in the order
    /// of its snapshot ([`proto::Snapshot::entity_hash`] of each index; the
    /// tick's hash is their sum), if any tick was applied.
    pub fn entity_hashes(&self) -> Option<&Arc<[StateHash]>> {
        self.entity_hashes.as_ref()
    }

    /// The newest tick applied, if any.
    pub fn tick(&self) -> Option<u64> {
        self.held.as_ref().map(|(t, _)| *t)
    }

    /// What this subscription received and dropped so far.
    pub fn counters(&self) -> &SubscriptionCounters {
        &self.counters
    }
}

/// The subscriber's half: acks (newest only) and input batches, in order.
/// Ends, finishing the stream, when the [`Subscription`] is dropped.
async fn write_upstream(
    mut tx: FramedSend,
    mut queue: mpsc::Receiver<Message>,
    mut acks: watch::Receiver<u64>,
) {
    loop {
        let msg = tokio::select! {
            biased;
            changed = acks.changed() => match changed {
                Ok(()) => Message::Ack(Ack { tick: *acks.borrow_and_update() }),
                Err(_) => break,
            },
            msg = queue.recv() => match msg {
                Some(msg) => msg,
                None => break,
            },
        };
        let last = matches!(msg, Message::Error(_));
        if tx.send(&msg).await.is_err() || last {
            break;
        }
    }
    let _ = tx.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_limit_follows_the_round_trip() {
        assert_eq!(
            in_flight_limit(Duration::from_micros(300), 60),
            MIN_IN_FLIGHT
        );
        // 150 ms at 60 Hz: 18 ticks per two round trips, plus two.
        assert_eq!(in_flight_limit(Duration::from_millis(150), 60), 20);
        // Capped at two seconds of ticks.
        assert_eq!(in_flight_limit(Duration::from_secs(5), 20), 40);
        assert_eq!(in_flight_limit(Duration::from_secs(5), 1), MIN_IN_FLIGHT);
    }

    #[test]
    fn secret_comparison() {
        assert!(secret_eq(b"abc", b"abc"));
        assert!(!secret_eq(b"abc", b"abd"));
        assert!(!secret_eq(b"abc", b"ab"));
        assert!(secret_eq(b"", b""));
    }

    #[test]
    fn retry_safety_follows_whose_fault() {
        let refused = |code| FeedError::Refused {
            code,
            message: String::new(),
        };
        assert!(!refused(ErrorCode::UnknownWorld).retry_safe());
        assert!(!refused(ErrorCode::BadToken).retry_safe());
        assert!(refused(ErrorCode::Overloaded).retry_safe());
        assert!(refused(ErrorCode::UpstreamLost).retry_safe());
        assert!(
            FeedError::HashMismatch {
                tick: 1,
                expected: StateHash(1),
                got: StateHash(2)
            }
            .retry_safe()
        );
        assert!(!FeedError::Protocol("x".into()).retry_safe());
        assert!(FeedError::Timeout(WELCOME_TIMEOUT).retry_safe());
    }

    #[test]
    fn collector_exports_every_counter() {
        use prometheus::core::Collector;
        let stats = Arc::new(FeedStats::default());
        stats.updates_sent.store(7, Ordering::Relaxed);
        stats.subscribers.store(2, Ordering::Relaxed);
        let collector = stats.collector("statecast_test").unwrap();
        assert!(stats.collector("bad name").is_err());
        let families = collector.collect();
        assert_eq!(families.len(), collector.desc().len());
        let find = |name: &str| {
            families
                .iter()
                .find(|f| f.name() == name)
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        assert_eq!(
            find("statecast_test_updates_sent_total").get_metric()[0]
                .get_counter()
                .get_value(),
            7.0
        );
        assert_eq!(
            find("statecast_test_subscribers").get_metric()[0]
                .get_gauge()
                .get_value(),
            2.0
        );
        let registry = prometheus::Registry::new();
        registry.register(Box::new(collector)).unwrap();
        assert_eq!(registry.gather().len(), 14);
    }
}
