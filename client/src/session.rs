//! A session with one relay over QUIC: the handshake, updates applied to a
//! verified [`Replica`], acknowledgements, inputs and interest changes.
//!
//! ## The model
//!
//! A [`Session`] owns one QUIC connection (ALPN `statecast/1`) and speaks
//! the client protocol:
//!
//! 1. **Handshake** ([`Session::connect`]). The client opens one
//!    bidirectional stream, the *control stream*, and sends a
//!    [`Hello`] (world, token, interest, and a [`Resume`] when it continues a
//!    session). The relay answers with a [`Welcome`] (session id, schema,
//!    tick rate) or an [`proto::msg::Error`], which becomes
//!    [`SessionError::Refused`].
//! 2. **Updates.** The relay sends each update as a datagram when it fits,
//!    otherwise on its own unidirectional stream carrying exactly one framed
//!    update; it resets such a stream when a newer update supersedes it,
//!    which is normal and only counted ([`Stats::stream_resets`]; a stream
//!    finished in the middle of its update is counted too, as
//!    [`Stats::streams_truncated`]).
//! 3. **Acknowledgements.** After every update that applies and passes the
//!    hash check, the client sends an [`Ack`] datagram; the relay codes the
//!    next updates against the newest acknowledged tick. A divergent state is
//!    dropped and not acknowledged, so the next update repairs it.
//! 4. **Control.** Later on the control stream the relay may send a
//!    [`Goaway`] (move elsewhere before a deadline), a [`Directory`] (the
//!    relays of the network, reported as [`SessionEvent::Directory`]) or an
//!    error (the session ends); the client may send an [`Interest`] to
//!    change its area.
//! 5. **Inputs** ([`Session::send_input`]) go as [`Input`] datagrams, newest
//!    first with the three previous inputs repeated, paced below twice the
//!    tick rate (the relay's limit).
//!
//! ## Tasks and back-pressure
//!
//! Background tasks read datagrams, unidirectional streams and the control
//! stream, decode what arrives and put it in a small bounded inbox; they
//! never wait for the application. When the inbox is full the oldest update
//! is dropped ([`Stats::overflowed`]): state is latest-wins, and the relay
//! codes every update against a tick the client acknowledged, so any later
//! update still applies. [`Session::next_event`] applies updates as the
//! application asks for events; when several are waiting it jumps to the
//! newest one it can apply ([`Stats::superseded`]), so a client that fell
//! behind catches up at once instead of replaying a backlog.
//!
//! Bad bytes or messages from the relay end the session with
//! [`SessionError::Protocol`] and close the connection with the matching
//! [`ErrorCode`]; they never panic.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use statecast_client::session::{self, Config, Session, SessionEvent};
//! use transport::Trust;
//!
//! let tls = Trust::from_flags(None, None, None, None).load()?;
//! let endpoint = session::endpoint(&tls, "0.0.0.0:0".parse()?)?;
//! let mut session = Session::connect(&endpoint, Config::new("127.0.0.1:4434".parse()?, "plaza")).await?;
//! loop {
//!     match session.next_event().await? {
//!         SessionEvent::Applied { tick, .. } => println!("tick {tick}"),
//!         SessionEvent::Closed { reason, .. } => break println!("closed: {reason}"),
//!         _ => {}
//!     }
//! }
//! session.close().await;
//! endpoint.wait_idle().await;
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use proto::msg::{
    Ack, Area, CellId, Directory, Goaway, Hello, Input, Interest, MAX_INPUT_LEN,
    MAX_INPUT_REDUNDANCY, MAX_RESUME_CELLS, Message, MessageType, Resume, Retry, Update, VERSION,
    Welcome,
};
use proto::{ErrorCode, Layout, StateHash};
use quinn::{ConnectionError, ReadError, VarInt, WriteError};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use transport::{ALPN_CLIENT, FrameError, FramedRecv, FramedSend, TlsConfig};

use crate::replica::{ApplyError, Event, Replica, State};

/// The agent string sent in every [`Hello`].
pub const AGENT: &str = concat!("statecast-client/", env!("CARGO_PKG_VERSION"));

/// Largest frame accepted on the control stream after the welcome: goaway
/// and error messages are well below 2 KiB; a directory is bounded by its
/// own limit (at most [`proto::msg::MAX_RELAYS`] entries of bounded
/// strings, about 150 KiB).
const CONTROL_MAX_FRAME: usize = {
    let directory = MessageType::Directory.max_len();
    if directory > 4 << 10 {
        directory
    } else {
        4 << 10
    }
};

/// Update streams read at once. A relay resets superseded streams, so more
/// than a few open at once means the client is behind: the oldest is
/// abandoned (its update would be superseded anyway). Bounds what a relay
/// can make the client buffer to this many frames.
const MAX_UPDATE_STREAMS: usize = 8;

/// Longest reason put in a CONNECTION_CLOSE frame.
const MAX_CLOSE_REASON: usize = 128;

/// How to open a session.
#[derive(Clone, Debug)]
pub struct Config {
    /// The relay's client address (its `listen`).
    pub relay: SocketAddr,
    /// The name the relay's certificate is checked against. Default
    /// `localhost`, which the development CA's certificates carry.
    pub server_name: String,
    /// The world to join.
    pub world: String,
    /// The signed token (empty when the relay does not check tokens).
    pub token: Bytes,
    /// The area of interest (`None`: the whole world).
    pub interest: Option<Area>,
    /// Set to continue a session ([`Session::resume_token`] of the old one);
    /// use [`Session::resume`] with the old replica so that the new relay's
    /// first update, coded against `last_ack`, applies.
    pub resume: Option<Resume>,
    /// Applied ticks the replica keeps as baselines. Default 128: more than a
    /// relay's ring, so any baseline a relay codes against is still held.
    pub history: usize,
    /// Compute entity events ([`SessionEvent::Applied::events`]) for every
    /// applied tick. Default off: bots and load tools skip the work.
    pub events: bool,
    /// Longest wait for the welcome, connection set-up included. Default
    /// 10 s: a QUIC handshake fails on its own within the idle timeout
    /// (5 s); this catches a relay that accepts and never answers.
    pub handshake_timeout: Duration,
    /// Updates buffered between the network tasks and
    /// [`Session::next_event`]. Default 32: over a second at 20 Hz; when
    /// full, the oldest is dropped.
    pub queue: usize,
}

impl Config {
    /// A configuration with the defaults for joining `world` on `relay`.
    pub fn new(relay: SocketAddr, world: impl Into<String>) -> Config {
        Config {
            relay,
            server_name: "localhost".to_owned(),
            world: world.into(),
            token: Bytes::new(),
            interest: None,
            resume: None,
            history: 128,
            events: false,
            handshake_timeout: Duration::from_secs(10),
            queue: 32,
        }
    }
}

/// A QUIC client endpoint on `bind` whose default client configuration
/// trusts `tls` and offers ALPN `statecast/1`, ready for
/// [`Session::connect`]. Must be called inside a Tokio runtime.
pub fn endpoint(tls: &TlsConfig, bind: SocketAddr) -> Result<quinn::Endpoint, SessionError> {
    let mut endpoint = transport::client_endpoint(bind)?;
    endpoint.set_default_client_config(tls.client_config(&[ALPN_CLIENT])?);
    Ok(endpoint)
}

/// What [`Session::next_event`] reports.
#[derive(Clone, Debug)]
pub enum SessionEvent {
    /// An update was applied and its hash checked.
    Applied {
        /// The tick now held.
        tick: u64,
        /// Whether it was a keyframe.
        keyframe: bool,
        /// Microseconds from the origin making the tick to its application
        /// here (clocks on one machine; `None` when the origin time is
        /// missing or ahead of this clock).
        latency_us: Option<u64>,
        /// Entity events since the previous tick held; empty unless
        /// [`Config::events`] asks for them.
        events: Vec<Event>,
    },
    /// An update did not reproduce the origin's hash: the state was dropped
    /// (not acknowledged), and the next update repairs it.
    Divergence {
        /// The update's tick.
        tick: u64,
        /// The hash the update carried.
        expected: StateHash,
        /// The hash of the state it produced.
        got: StateHash,
    },
    /// The relay is draining: move to another relay before the deadline.
    Goaway(Goaway),
    /// The relay told the client about the relays of the network (itself
    /// included), as route candidates. Latest-wins: when several arrive
    /// before the application asks, only the newest is reported.
    Directory(Directory),
    /// The session ended; later calls fail with [`SessionError::Closed`].
    Closed {
        /// The code the relay gave, if any (`None`: the connection was lost).
        code: Option<ErrorCode>,
        /// Why, for humans.
        reason: String,
    },
}

/// Who is to blame for a [`SessionError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Blame {
    /// Nobody: a normal close.
    Nobody,
    /// This client: its configuration, credentials, or what it sent.
    Client,
    /// The relay: it broke the protocol, failed, or cannot serve.
    Relay,
    /// The network between them (timeouts, unreachable).
    Network,
    /// Cannot tell (an unknown code, a TLS failure).
    Unknown,
}

/// Why a session could not start or went on no longer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The client endpoint could not be bound.
    #[error("cannot bind the client endpoint: {0}")]
    Io(#[from] std::io::Error),
    /// The certificates could not be used.
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] transport::TlsError),
    /// The connection could not be started (bad server name, no client
    /// configuration on the endpoint).
    #[error("cannot start a connection to the relay: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was lost before the welcome.
    #[error("connection to the relay failed: {0}")]
    Connection(#[from] ConnectionError),
    /// The relay did not answer the hello in time.
    #[error("no welcome from the relay within {0:?}")]
    HandshakeTimeout(Duration),
    /// The relay refused the session.
    #[error("the relay refused the session: {code}: {message}")]
    Refused {
        /// The relay's code.
        code: ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// The relay sent something the protocol does not allow.
    #[error("the relay broke the protocol: {0}")]
    Protocol(String),
    /// A stream of the session failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The session has ended (after [`SessionEvent::Closed`], or a protocol
    /// error).
    #[error("the session is closed: {reason}")]
    Closed {
        /// The code it ended with, if any.
        code: Option<ErrorCode>,
        /// Why.
        reason: String,
    },
    /// An input above [`MAX_INPUT_LEN`] bytes.
    #[error("an input of {len} bytes is above the limit of {max}")]
    InputTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl SessionError {
    /// Whether and where trying again makes sense: [`Retry::Elsewhere`]
    /// means the next relay of the failover list (resuming the session),
    /// [`Retry::Never`] a problem that moving cannot fix.
    pub fn retry(&self) -> Retry {
        match self {
            SessionError::Io(_)
            | SessionError::Tls(_)
            | SessionError::Connect(_)
            | SessionError::InputTooLarge { .. } => Retry::Never,
            SessionError::Connection(ConnectionError::ApplicationClosed(close)) => {
                code_of(close.error_code).retry()
            }
            SessionError::Connection(ConnectionError::LocallyClosed) => Retry::Never,
            SessionError::Connection(_)
            | SessionError::HandshakeTimeout(_)
            | SessionError::Protocol(_)
            | SessionError::Frame(_) => Retry::Elsewhere,
            SessionError::Refused { code, .. } => code.retry(),
            SessionError::Closed { code, .. } => code.map_or(Retry::Elsewhere, ErrorCode::retry),
        }
    }

    /// Whether trying again (somewhere, perhaps with a new token) can help.
    pub fn is_retry_safe(&self) -> bool {
        self.retry() != Retry::Never
    }

    /// Whose doing the error is.
    pub fn blame(&self) -> Blame {
        match self {
            SessionError::Io(_)
            | SessionError::Tls(_)
            | SessionError::Connect(_)
            | SessionError::InputTooLarge { .. } => Blame::Client,
            SessionError::Connection(e) => match e {
                ConnectionError::ApplicationClosed(close) => blame_of(code_of(close.error_code)),
                ConnectionError::TimedOut => Blame::Network,
                ConnectionError::Reset => Blame::Relay,
                ConnectionError::LocallyClosed | ConnectionError::CidsExhausted => Blame::Client,
                _ => Blame::Unknown,
            },
            SessionError::HandshakeTimeout(_) | SessionError::Protocol(_) => Blame::Relay,
            SessionError::Frame(e) if e.is_peer_fault() => Blame::Relay,
            SessionError::Frame(_) => Blame::Network,
            SessionError::Refused { code, .. } => blame_of(*code),
            SessionError::Closed { code, .. } => code.map_or(Blame::Network, blame_of),
        }
    }
}

/// A code sent by the relay, seen from the client.
fn blame_of(code: ErrorCode) -> Blame {
    match code.fault() {
        proto::msg::Fault::Nobody => Blame::Nobody,
        proto::msg::Fault::Recipient => Blame::Client,
        proto::msg::Fault::Sender => Blame::Relay,
        proto::msg::Fault::Unknown => Blame::Unknown,
    }
}

fn code_of(code: VarInt) -> ErrorCode {
    u16::try_from(code.into_inner()).map_or(ErrorCode::Unknown(u16::MAX), ErrorCode::from_code)
}

/// Latencies in a log-bucket histogram: exact below 16 µs, then 8 buckets
/// per power of two (at most 6.25% off), up to about 19 hours. Cheap to
/// record (no allocation after the first sample), cheap to clone and merge.
///
/// Serializes as `{count, p50, p99, max, mean}` in milliseconds (`null`
/// with no samples).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Latency {
    buckets: Vec<u64>,
    count: u64,
    sum_us: u64,
    max_us: u64,
    min_us: u64,
}

const LINEAR: u64 = 16;
const SUB_BITS: u32 = 3;
const BUCKETS: usize = LINEAR as usize + (36 - 4) * (1 << SUB_BITS);

impl Latency {
    fn index(us: u64) -> usize {
        if us < LINEAR {
            return us as usize;
        }
        let exp = 63 - us.leading_zeros(); // >= 4
        let sub = (us >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
        let index = LINEAR as usize + ((exp - 4) as usize) * (1 << SUB_BITS) + sub as usize;
        index.min(BUCKETS - 1)
    }

    /// The middle of bucket `index`, in microseconds.
    fn value(index: usize) -> f64 {
        if index < LINEAR as usize {
            return index as f64;
        }
        let i = index - LINEAR as usize;
        let exp = (i >> SUB_BITS) as u32 + 4;
        let sub = (i & ((1 << SUB_BITS) - 1)) as u64;
        let width = 1u64 << (exp - SUB_BITS);
        let low = ((1u64 << SUB_BITS) + sub) * width;
        low as f64 + width as f64 / 2.0
    }

    /// Adds one sample, in microseconds.
    pub fn record_us(&mut self, us: u64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; BUCKETS];
            self.min_us = us;
        }
        self.buckets[Self::index(us)] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
        self.min_us = self.min_us.min(us);
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latency) {
        if other.count == 0 {
            return;
        }
        if self.buckets.is_empty() {
            *self = other.clone();
            return;
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self.max_us = self.max_us.max(other.max_us);
        self.min_us = self.min_us.min(other.min_us);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q` quantile (0 to 1) in milliseconds, `None` without samples.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                // The last bucket also holds everything above its range.
                let us = if i == BUCKETS - 1 {
                    self.max_us as f64
                } else {
                    Self::value(i).clamp(self.min_us as f64, self.max_us as f64)
                };
                return Some(us / 1000.0);
            }
        }
        Some(self.max_us as f64 / 1000.0)
    }

    /// Median, in milliseconds.
    pub fn p50_ms(&self) -> Option<f64> {
        self.quantile_ms(0.50)
    }

    /// 99th percentile, in milliseconds.
    pub fn p99_ms(&self) -> Option<f64> {
        self.quantile_ms(0.99)
    }

    /// Largest sample, in milliseconds.
    pub fn max_ms(&self) -> Option<f64> {
        (self.count > 0).then(|| self.max_us as f64 / 1000.0)
    }

    /// Mean, in milliseconds.
    pub fn mean_ms(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_us as f64 / self.count as f64 / 1000.0)
    }
}

impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Latency", 5)?;
        s.serialize_field("count", &self.count)?;
        s.serialize_field("p50", &self.p50_ms())?;
        s.serialize_field("p99", &self.p99_ms())?;
        s.serialize_field("max", &self.max_ms())?;
        s.serialize_field("mean", &self.mean_ms())?;
        s.end()
    }
}

/// Counters of a session. Updated by [`Session::next_event`]; what the
/// network tasks counted since the last call shows up at the next one.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// Updates applied (hash checked and matching).
    pub ticks_applied: u64,
    /// Hash checks made: applied ticks plus divergences.
    pub hash_checked: u64,
    /// Updates whose state did not match the origin's hash.
    pub divergences: u64,
    /// Keyframes applied.
    pub keyframes: u64,
    /// Bytes of updates received (datagrams, or frames on streams).
    pub bytes_received: u64,
    /// Updates received.
    pub updates_received: u64,
    /// Of those, received on a stream (too large for a datagram).
    pub updates_on_streams: u64,
    /// Updates not newer than the tick held (reordered or duplicated).
    pub stale: u64,
    /// Updates coded against a baseline no longer (or never) held.
    pub missing_base: u64,
    /// Updates whose chunks did not decode.
    pub decode_errors: u64,
    /// Updates skipped because a newer one that applies was waiting.
    pub superseded: u64,
    /// Updates dropped because the inbox was full, or their stream abandoned
    /// for a newer one.
    pub overflowed: u64,
    /// Update streams the relay reset (superseded while in flight).
    pub stream_resets: u64,
    /// Update streams the relay finished in the middle of the update (a
    /// relay that drops a superseded stream instead of resetting it): the
    /// update is lost, nothing else.
    pub streams_truncated: u64,
    /// Acknowledgements sent.
    pub acks_sent: u64,
    /// Input datagrams sent.
    pub inputs_sent: u64,
    /// Inputs held back by the rate limit (sent with a later datagram).
    pub inputs_deferred: u64,
    /// The tick held, if any.
    pub tick: Option<u64>,
    /// Origin tick time to application, in milliseconds.
    pub latency_ms: Latency,
}

/// How a session ended, as the network tasks saw it.
#[derive(Clone, Debug)]
enum End {
    Closed {
        code: Option<ErrorCode>,
        reason: String,
    },
    Protocol(String),
}

impl End {
    fn from_connection(error: &ConnectionError) -> End {
        match error {
            ConnectionError::ApplicationClosed(close) => {
                let reason = String::from_utf8_lossy(&close.reason).into_owned();
                let code = code_of(close.error_code);
                End::Closed {
                    code: Some(code),
                    reason: if reason.is_empty() {
                        format!("the relay closed the connection ({code})")
                    } else {
                        reason
                    },
                }
            }
            ConnectionError::TimedOut => End::Closed {
                code: None,
                reason: "the relay stopped answering (idle timeout)".to_owned(),
            },
            ConnectionError::Reset => End::Closed {
                code: None,
                reason: "the relay reset the connection (did it restart?)".to_owned(),
            },
            ConnectionError::LocallyClosed => End::Closed {
                code: Some(ErrorCode::Normal),
                reason: "closed by this client".to_owned(),
            },
            other => End::Closed {
                code: None,
                reason: format!("connection lost: {other}"),
            },
        }
    }

    fn to_error(&self) -> SessionError {
        match self {
            End::Closed { code, reason } => SessionError::Closed {
                code: *code,
                reason: reason.clone(),
            },
            End::Protocol(message) => SessionError::Closed {
                code: Some(ErrorCode::ProtocolViolation),
                reason: message.clone(),
            },
        }
    }
}

/// An update as it arrived.
#[derive(Debug)]
struct Received {
    update: Update,
    bytes: usize,
}

/// What the network tasks counted.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    updates: u64,
    bytes: u64,
    on_streams: u64,
    overflowed: u64,
    stream_resets: u64,
    streams_truncated: u64,
}

#[derive(Debug, Default)]
struct InboxState {
    updates: VecDeque<Received>,
    goaways: VecDeque<Goaway>,
    /// The newest directory not yet reported (one at most: bounded).
    directory: Option<Directory>,
    end: Option<End>,
    counters: Counters,
}

/// What the network tasks hand to [`Session::next_event`]: latest-wins for
/// updates, never blocking the tasks.
#[derive(Debug)]
struct Inbox {
    state: Mutex<InboxState>,
    notify: Notify,
    capacity: usize,
}

enum Item {
    Update(Received),
    Goaway(Goaway),
    Directory(Directory),
    End(End),
}

impl Inbox {
    fn new(capacity: usize) -> Inbox {
        Inbox {
            state: Mutex::new(InboxState::default()),
            notify: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, InboxState> {
        // A panic while holding the lock leaves plain data behind: use it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push_update(&self, update: Update, bytes: usize, on_stream: bool) {
        let mut state = self.lock();
        if state.end.is_some() {
            return;
        }
        state.counters.updates += 1;
        state.counters.bytes += bytes as u64;
        state.counters.on_streams += u64::from(on_stream);
        if state.updates.len() >= self.capacity {
            state.updates.pop_front();
            state.counters.overflowed += 1;
        }
        state.updates.push_back(Received { update, bytes });
        drop(state);
        self.notify.notify_one();
    }

    fn push_goaway(&self, goaway: Goaway) {
        let mut state = self.lock();
        if state.end.is_none() {
            state.goaways.push_back(goaway);
        }
        drop(state);
        self.notify.notify_one();
    }

    /// Keeps the newest directory only: a relay sending many cannot make
    /// the client hold more than one.
    fn push_directory(&self, directory: Directory) {
        let mut state = self.lock();
        if state.end.is_none() {
            state.directory = Some(directory);
        }
        drop(state);
        self.notify.notify_one();
    }

    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.lock().counters);
    }

    /// Records how the session ended; the first report wins.
    fn finish(&self, end: End) {
        let mut state = self.lock();
        if state.end.is_none() {
            state.end = Some(end);
        }
        drop(state);
        self.notify.notify_one();
    }

    fn ended(&self) -> bool {
        self.lock().end.is_some()
    }

    /// The next thing to handle: a goaway first; then the newest waiting
    /// update that applies to what the replica holds (dropping the older
    /// ones it supersedes), or else the oldest update (which will be counted
    /// as stale or missing its base); then the end.
    fn take(&self, replica: &Replica, superseded: &mut u64) -> (Option<Item>, Counters) {
        let mut state = self.lock();
        let counters = state.counters;
        if let Some(goaway) = state.goaways.pop_front() {
            return (Some(Item::Goaway(goaway)), counters);
        }
        if let Some(directory) = state.directory.take() {
            return (Some(Item::Directory(directory)), counters);
        }
        if !state.updates.is_empty() {
            let newest = replica.current().map(|s| s.tick());
            let best = state
                .updates
                .iter()
                .enumerate()
                .filter(|(_, r)| newest.is_none_or(|n| r.update.tick > n))
                .filter(|(_, r)| r.update.base.is_none_or(|b| replica.state(b).is_some()))
                .max_by_key(|(_, r)| r.update.tick)
                .map(|(i, _)| i);
            let received = match best {
                Some(i) => {
                    let chosen = state.updates.remove(i).expect("index in range");
                    let before = state.updates.len();
                    state.updates.retain(|r| r.update.tick > chosen.update.tick);
                    *superseded += (before - state.updates.len()) as u64;
                    chosen
                }
                None => state.updates.pop_front().expect("not empty"),
            };
            return (Some(Item::Update(received)), counters);
        }
        (state.end.clone().map(Item::End), counters)
    }
}

/// Paces inputs below the relay's limit: `rate` per second, bursts of two.
#[derive(Debug)]
struct Pacer {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl Pacer {
    fn new(rate: f64, now: Instant) -> Pacer {
        Pacer {
            tokens: 2.0,
            rate: rate.max(1.0),
            burst: 2.0,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        // A token due at `ready_at` must be there at `ready_at`, rounding
        // notwithstanding.
        if self.tokens >= 1.0 - 1e-9 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next token is there.
    fn ready_at(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.last + Duration::from_secs_f64(missing / self.rate)
    }
}

/// Inputs waiting to go, newest first.
#[derive(Debug)]
struct Inputs {
    next_seq: u32,
    recent: VecDeque<Bytes>,
    pending: bool,
    pacer: Pacer,
}

/// A client session with one relay. See the [module documentation](self).
pub struct Session {
    conn: quinn::Connection,
    control: FramedSend,
    welcome: Welcome,
    layout: Arc<Layout>,
    replica: Replica,
    stats: Stats,
    inbox: Arc<Inbox>,
    tasks: JoinSet<()>,
    events: bool,
    interest: Option<Area>,
    inputs: Inputs,
    ended: Option<End>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("relay", &self.conn.remote_address())
            .field("session", &self.welcome.session)
            .field("world", &self.welcome.world)
            .field("tick", &self.stats.tick)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Connects to `config.relay` with the endpoint's default client
    /// configuration (see [`endpoint`]), sends the hello and waits for the
    /// welcome. The replica starts empty: the first update is a keyframe
    /// (with `config.resume` set, use [`Session::resume`] instead).
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        config: Config,
    ) -> Result<Session, SessionError> {
        let (conn, control, recv, welcome, layout) = handshake(endpoint, &config).await?;
        let replica = Replica::new(layout.clone(), config.history);
        Ok(Session::start(
            conn, control, recv, welcome, layout, replica, &config,
        ))
    }

    /// Continues a session on another relay, keeping the state that
    /// `replica` holds (from [`Session::into_replica`] of the old session),
    /// so the new relay's first update is coded against the last tick
    /// applied rather than being a keyframe. `config.resume` is normally the
    /// old session's [`Session::resume_token`].
    ///
    /// On success the session takes the replica's state and leaves `replica`
    /// empty; on failure `replica` is untouched, ready for the next relay.
    /// A relay whose schema differs from the replica's is refused with
    /// [`SessionError::Protocol`].
    pub async fn resume(
        endpoint: &quinn::Endpoint,
        config: Config,
        replica: &mut Replica,
    ) -> Result<Session, SessionError> {
        let (conn, control, recv, welcome, layout) = handshake(endpoint, &config).await?;
        if **replica.layout() != *layout {
            let message = format!(
                "the schema of world {:?} differs from the one the resumed replica holds",
                welcome.world
            );
            close(&conn, ErrorCode::ProtocolViolation, &message);
            return Err(SessionError::Protocol(message));
        }
        let fresh = Replica::new(layout.clone(), config.history);
        let replica = std::mem::replace(replica, fresh);
        Ok(Session::start(
            conn, control, recv, welcome, layout, replica, &config,
        ))
    }

    fn start(
        conn: quinn::Connection,
        control: FramedSend,
        recv: FramedRecv,
        welcome: Welcome,
        layout: Arc<Layout>,
        replica: Replica,
        config: &Config,
    ) -> Session {
        let inbox = Arc::new(Inbox::new(config.queue));
        let mut tasks = JoinSet::new();
        tasks.spawn(read_datagrams(conn.clone(), inbox.clone()));
        tasks.spawn(accept_update_streams(conn.clone(), inbox.clone()));
        tasks.spawn(read_control(
            recv.with_max_frame(CONTROL_MAX_FRAME),
            conn.clone(),
            inbox.clone(),
        ));
        let rate = 2.0 * f64::from(welcome.tick_rate);
        tracing::debug!(
            relay = %conn.remote_address(),
            session = welcome.session,
            world = %welcome.world,
            relay_id = %welcome.relay_id,
            region = %welcome.region,
            tick = welcome.tick,
            "session open"
        );
        let stats = Stats {
            tick: replica.current().map(|s| s.tick()),
            ..Stats::default()
        };
        Session {
            conn,
            control,
            welcome,
            layout,
            replica,
            stats,
            inbox,
            tasks,
            events: config.events,
            interest: config.interest,
            inputs: Inputs {
                next_seq: 0,
                recent: VecDeque::with_capacity(MAX_INPUT_REDUNDANCY),
                pending: false,
                pacer: Pacer::new(rate, Instant::now()),
            },
            ended: None,
        }
    }

    /// The relay's welcome.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The session id (to resume with).
    pub fn session_id(&self) -> u64 {
        self.welcome.session
    }

    /// The world's layout (compiled from the welcome's schema).
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// The verified replica.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// Counters, as of the last [`Session::next_event`].
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The area of interest asked for last.
    pub fn interest(&self) -> Option<Area> {
        self.interest
    }

    /// The relay's address.
    pub fn relay(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// QUIC's current round-trip estimate to the relay.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Waits for the next thing that happens, applying updates as they
    /// arrive (and acknowledging each one applied). Updates that do not
    /// apply (stale, missing their baseline, undecodable) are only counted.
    ///
    /// Cancel safe: nothing is lost if the future is dropped before it
    /// completes. After [`SessionEvent::Closed`] or an error, every call
    /// fails with [`SessionError::Closed`].
    pub async fn next_event(&mut self) -> Result<SessionEvent, SessionError> {
        loop {
            if let Some(end) = &self.ended {
                return Err(end.to_error());
            }
            self.flush_inputs();
            let inbox = self.inbox.clone();
            let notified = inbox.notify.notified();
            tokio::pin!(notified);
            let (item, counters) = self.inbox.take(&self.replica, &mut self.stats.superseded);
            self.take_counters(counters);
            match item {
                Some(Item::Update(received)) => {
                    if let Some(event) = self.apply(received) {
                        return Ok(event);
                    }
                }
                Some(Item::Goaway(goaway)) => return Ok(SessionEvent::Goaway(goaway)),
                Some(Item::Directory(directory)) => {
                    return Ok(SessionEvent::Directory(directory));
                }
                Some(Item::End(end)) => {
                    self.ended = Some(end.clone());
                    return match end {
                        End::Closed { code, reason } => Ok(SessionEvent::Closed { code, reason }),
                        End::Protocol(message) => Err(SessionError::Protocol(message)),
                    };
                }
                None => {
                    let pending = self.inputs.pending;
                    let ready_at = self.inputs.pacer.ready_at();
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(ready_at), if pending => {}
                    }
                }
            }
        }
    }

    fn take_counters(&mut self, c: Counters) {
        self.stats.updates_received = c.updates;
        self.stats.bytes_received = c.bytes;
        self.stats.updates_on_streams = c.on_streams;
        self.stats.overflowed = c.overflowed;
        self.stats.stream_resets = c.stream_resets;
        self.stats.streams_truncated = c.streams_truncated;
    }

    fn apply(&mut self, received: Received) -> Option<SessionEvent> {
        let update = &received.update;
        let before = self
            .events
            .then(|| self.replica.current().cloned())
            .flatten();
        match self.replica.apply(update) {
            Ok(applied) => {
                let stats = &mut self.stats;
                stats.ticks_applied += 1;
                stats.hash_checked += 1;
                stats.keyframes += u64::from(applied.keyframe);
                stats.tick = Some(applied.tick);
                let latency_us = (update.origin_time_us != 0)
                    .then(|| now_us().checked_sub(update.origin_time_us))
                    .flatten();
                if let Some(us) = latency_us {
                    stats.latency_ms.record_us(us);
                }
                let ack = Message::Ack(Ack { tick: applied.tick });
                match transport::send_datagram(&self.conn, &ack) {
                    Ok(()) => stats.acks_sent += 1,
                    // A lost connection shows up as the end of the session.
                    Err(e) => tracing::debug!(tick = applied.tick, "cannot send the ack: {e}"),
                }
                let events = match (self.events, self.replica.current()) {
                    (true, Some(after)) => {
                        Replica::diff(before.as_deref().unwrap_or(&State::default()), after)
                    }
                    _ => Vec::new(),
                };
                tracing::trace!(
                    tick = applied.tick,
                    keyframe = applied.keyframe,
                    bytes = received.bytes,
                    "applied"
                );
                Some(SessionEvent::Applied {
                    tick: applied.tick,
                    keyframe: applied.keyframe,
                    latency_us,
                    events,
                })
            }
            Err(ApplyError::Stale { .. }) => {
                self.stats.stale += 1;
                None
            }
            Err(ApplyError::MissingBase(base)) => {
                tracing::debug!(
                    tick = update.tick,
                    base,
                    "update against a baseline not held"
                );
                self.stats.missing_base += 1;
                None
            }
            Err(ApplyError::HashMismatch {
                tick,
                expected,
                got,
            }) => {
                self.stats.divergences += 1;
                self.stats.hash_checked += 1;
                tracing::debug!(tick, %expected, %got, "divergence");
                Some(SessionEvent::Divergence {
                    tick,
                    expected,
                    got,
                })
            }
            Err(e) => {
                tracing::debug!(tick = update.tick, "update does not decode: {e}");
                self.stats.decode_errors += 1;
                None
            }
        }
    }

    /// Sends an input (at most [`MAX_INPUT_LEN`] bytes of application data)
    /// as a datagram, with the three previous inputs repeated. Inputs above
    /// twice the tick rate are held back and go with the next datagram, sent
    /// by a later call or by [`Session::next_event`] once the pace allows;
    /// only the newest four waiting inputs are kept.
    pub fn send_input(&mut self, input: &[u8]) -> Result<(), SessionError> {
        if let Some(end) = &self.ended {
            return Err(end.to_error());
        }
        if input.len() > MAX_INPUT_LEN {
            return Err(SessionError::InputTooLarge {
                len: input.len(),
                max: MAX_INPUT_LEN,
            });
        }
        let inputs = &mut self.inputs;
        if inputs.pending {
            self.stats.inputs_deferred += 1;
        }
        inputs.next_seq = inputs.next_seq.wrapping_add(1);
        inputs.recent.push_front(Bytes::copy_from_slice(input));
        inputs.recent.truncate(MAX_INPUT_REDUNDANCY);
        inputs.pending = true;
        self.flush_inputs();
        Ok(())
    }

    /// Sends the waiting inputs if the pace allows.
    fn flush_inputs(&mut self) {
        let inputs = &mut self.inputs;
        if !inputs.pending || !inputs.pacer.try_take(Instant::now()) {
            return;
        }
        inputs.pending = false;
        let msg = Message::Input(Input {
            // The newest input's sequence number: inputs count from 0.
            seq: inputs.next_seq.wrapping_sub(1),
            inputs: inputs.recent.iter().cloned().collect(),
        });
        match transport::send_datagram(&self.conn, &msg) {
            Ok(()) => self.stats.inputs_sent += 1,
            Err(e) => tracing::debug!("cannot send an input: {e}"),
        }
    }

    /// Asks the relay for the cells of `area` (`None`: the whole world) from
    /// its next update on.
    pub async fn set_interest(&mut self, area: Option<Area>) -> Result<(), SessionError> {
        if let Some(end) = &self.ended {
            return Err(end.to_error());
        }
        self.control
            .send(&Message::Interest(Interest { area }))
            .await
            .map_err(|e| match e {
                FrameError::Write(WriteError::ConnectionLost(lost)) => {
                    End::from_connection(&lost).to_error()
                }
                other => SessionError::Frame(other),
            })?;
        self.interest = area;
        Ok(())
    }

    /// What continuing this session on another relay needs: the session id,
    /// the tick held and its non-empty cells. `None` before the first
    /// applied tick, or when the replica holds more than
    /// [`MAX_RESUME_CELLS`] cells (the relay could not know what it holds).
    pub fn resume_token(&self) -> Option<Resume> {
        let state = self.replica.current()?;
        let cells: Vec<CellId> = state.cells().collect();
        if cells.len() > MAX_RESUME_CELLS {
            return None;
        }
        Some(Resume {
            session: self.welcome.session,
            last_ack: state.tick(),
            cells,
        })
    }

    /// Ends the session and hands back the replica, to continue on another
    /// relay with [`Session::resume`].
    pub fn into_replica(mut self) -> Replica {
        self.shutdown("moving to another relay");
        let empty = Replica::new(self.layout.clone(), 2);
        std::mem::replace(&mut self.replica, empty)
    }

    /// Closes the session (code `normal`). Keep the endpoint alive until
    /// `endpoint.wait_idle()` so that the relay hears of it.
    pub async fn close(mut self) {
        self.shutdown("client closed");
        self.tasks.shutdown().await;
    }

    fn shutdown(&mut self, reason: &str) {
        let _ = self.control.finish();
        close(&self.conn, ErrorCode::Normal, reason);
        if self.ended.is_none() {
            self.ended = Some(End::Closed {
                code: Some(ErrorCode::Normal),
                reason: reason.to_owned(),
            });
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.conn.close_reason().is_none() {
            close(&self.conn, ErrorCode::Normal, "session dropped");
        }
    }
}

/// Microseconds since the UNIX epoch, on this machine's clock.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Closes the connection with `code`, and the reason cut to a sane length.
fn close(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    conn.close(VarInt::from(code.to_code()), &reason.as_bytes()[..end]);
}

/// The relay broke the protocol: record it, then close with `code`.
fn violation(conn: &quinn::Connection, inbox: &Inbox, code: ErrorCode, message: String) {
    tracing::warn!(relay = %conn.remote_address(), "{message}");
    close(conn, code, &message);
    inbox.finish(End::Protocol(message));
}

/// A connection lost during the handshake: a relay that closed it with a
/// code refused the session.
fn lost_in_handshake(error: ConnectionError) -> SessionError {
    match &error {
        ConnectionError::ApplicationClosed(close) if close.error_code.into_inner() != 0 => {
            SessionError::Refused {
                code: code_of(close.error_code),
                message: String::from_utf8_lossy(&close.reason).into_owned(),
            }
        }
        _ => SessionError::Connection(error),
    }
}

type Handshake = (
    quinn::Connection,
    FramedSend,
    FramedRecv,
    Welcome,
    Arc<Layout>,
);

async fn handshake(endpoint: &quinn::Endpoint, config: &Config) -> Result<Handshake, SessionError> {
    let connecting = endpoint.connect(config.relay, &config.server_name)?;
    let hello = Hello {
        version: VERSION,
        token: config.token.clone(),
        world: config.world.clone(),
        resume: config.resume.clone(),
        agent: AGENT.to_owned(),
        interest: config.interest,
    };
    // Check before connecting: a hello that does not encode is this side's
    // mistake, not the relay's.
    Message::Hello(hello.clone())
        .check()
        .map_err(|e| SessionError::Frame(FrameError::Encode(e)))?;
    let work = async {
        let conn = connecting.await?;
        let (send, recv) = conn.open_bi().await.map_err(lost_in_handshake)?;
        let mut send = FramedSend::new(send);
        // A welcome, or an error, and nothing larger.
        let mut recv = FramedRecv::new(recv).with_max_frame(MessageType::Welcome.max_len() + 8);
        send.send(&Message::Hello(hello))
            .await
            .map_err(|e| match e {
                FrameError::Write(WriteError::ConnectionLost(lost)) => lost_in_handshake(lost),
                other => SessionError::Frame(other),
            })?;
        let refuse = |code: ErrorCode, message: String| {
            close(&conn, code, &message);
            Err(SessionError::Protocol(message))
        };
        let welcome = match recv.recv().await {
            Ok(Some(Message::Welcome(welcome))) => welcome,
            Ok(Some(Message::Error(error))) => {
                close(&conn, ErrorCode::Normal, "refused");
                return Err(SessionError::Refused {
                    code: error.code,
                    message: error.message,
                });
            }
            Ok(Some(other)) => {
                return refuse(
                    ErrorCode::ProtocolViolation,
                    format!(
                        "it answered the hello with a {} message, not a welcome",
                        other.message_type().name()
                    ),
                );
            }
            Ok(None) => {
                return refuse(
                    ErrorCode::ProtocolViolation,
                    "it finished the control stream without a welcome".to_owned(),
                );
            }
            Err(FrameError::Read(ReadError::ConnectionLost(lost))) => {
                return Err(lost_in_handshake(lost));
            }
            Err(e) if e.is_peer_fault() => {
                let code = e.code().unwrap_or(ErrorCode::Malformed);
                return refuse(code, format!("its answer to the hello is not valid: {e}"));
            }
            Err(e) => return Err(SessionError::Frame(e)),
        };
        if welcome.world != config.world {
            return refuse(
                ErrorCode::ProtocolViolation,
                format!(
                    "it welcomed the client to world {:?}, not {:?}",
                    welcome.world, config.world
                ),
            );
        }
        // The decoder checked that the schema compiles.
        let layout = match welcome.schema.layout() {
            Ok(layout) => Arc::new(layout),
            Err(e) => {
                return refuse(
                    ErrorCode::Malformed,
                    format!("its schema does not compile: {e}"),
                );
            }
        };
        Ok((conn, send, recv, welcome, layout))
    };
    match tokio::time::timeout(config.handshake_timeout, work).await {
        Ok(result) => result,
        // Dropping the connection closes it.
        Err(_) => Err(SessionError::HandshakeTimeout(config.handshake_timeout)),
    }
}

/// Reads update datagrams until the connection ends.
async fn read_datagrams(conn: quinn::Connection, inbox: Arc<Inbox>) {
    loop {
        let datagram = match conn.read_datagram().await {
            Ok(datagram) => datagram,
            Err(e) => return inbox.finish(End::from_connection(&e)),
        };
        let len = datagram.len();
        match Message::decode_datagram(datagram, VERSION) {
            Ok(Message::Update(update)) => inbox.push_update(update, len, false),
            Ok(other) => {
                return violation(
                    &conn,
                    &inbox,
                    ErrorCode::ProtocolViolation,
                    format!(
                        "it sent a {} datagram; only updates go from relay to client",
                        other.message_type().name()
                    ),
                );
            }
            Err(e) => {
                return violation(
                    &conn,
                    &inbox,
                    e.code(),
                    format!("it sent a datagram that does not decode: {e}"),
                );
            }
        }
    }
}

/// Accepts update streams and reads each on its own task; abandons the
/// oldest when too many are open.
async fn accept_update_streams(conn: quinn::Connection, inbox: Arc<Inbox>) {
    let mut readers = JoinSet::new();
    let mut open: VecDeque<AbortHandle> = VecDeque::new();
    loop {
        tokio::select! {
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
            accepted = conn.accept_uni() => {
                let stream = match accepted {
                    Ok(stream) => stream,
                    Err(e) => return inbox.finish(End::from_connection(&e)),
                };
                open.retain(|h| !h.is_finished());
                if open.len() >= MAX_UPDATE_STREAMS
                    && let Some(oldest) = open.pop_front()
                {
                    // Dropping its stream tells the relay to stop sending it.
                    oldest.abort();
                    inbox.count(|c| c.overflowed += 1);
                }
                open.push_back(readers.spawn(read_update_stream(
                    stream,
                    conn.clone(),
                    inbox.clone(),
                )));
            }
        }
    }
}

/// Reads the one update of a unidirectional stream.
async fn read_update_stream(stream: quinn::RecvStream, conn: quinn::Connection, inbox: Arc<Inbox>) {
    let mut recv = FramedRecv::new(stream);
    let stream_error = |e: FrameError| match e {
        FrameError::Read(ReadError::Reset(_)) => inbox.count(|c| c.stream_resets += 1),
        // Harmless (the update is simply lost), so not worth a session.
        FrameError::Truncated { buffered } => {
            tracing::debug!(buffered, "the relay finished an update stream mid-frame");
            inbox.count(|c| c.streams_truncated += 1);
        }
        // The connection's end is reported by the datagram reader.
        FrameError::Read(ReadError::ConnectionLost(_)) | FrameError::Connection(_) => {}
        e if e.is_peer_fault() => violation(
            &conn,
            &inbox,
            e.code().unwrap_or(ErrorCode::Malformed),
            format!("it sent a bad update stream: {e}"),
        ),
        e => tracing::debug!("update stream failed: {e}"),
    };
    match recv.recv().await {
        Ok(Some(Message::Update(update))) => {
            let bytes = Message::Update(update.clone()).encoded_len();
            inbox.push_update(update, bytes, true);
        }
        Ok(Some(other)) => {
            return violation(
                &conn,
                &inbox,
                ErrorCode::ProtocolViolation,
                format!(
                    "it sent a {} message on a unidirectional stream; only updates go there",
                    other.message_type().name()
                ),
            );
        }
        Ok(None) => {
            return violation(
                &conn,
                &inbox,
                ErrorCode::ProtocolViolation,
                "it sent an empty update stream".to_owned(),
            );
        }
        Err(e) => return stream_error(e),
    }
    // The update is delivered; the stream must end there.
    match recv.recv().await {
        Ok(None) => {}
        Ok(Some(other)) => violation(
            &conn,
            &inbox,
            ErrorCode::ProtocolViolation,
            format!(
                "it sent a {} message after the update on an update stream",
                other.message_type().name()
            ),
        ),
        // Reset after the whole update arrived: nothing lost.
        Err(FrameError::Read(ReadError::Reset(_))) => {}
        Err(e) => stream_error(e),
    }
}

/// Reads the control stream after the welcome: goaways, directories, or an error that
/// ends the session.
async fn read_control(mut recv: FramedRecv, conn: quinn::Connection, inbox: Arc<Inbox>) {
    loop {
        match recv.recv().await {
            Ok(Some(Message::Goaway(goaway))) => {
                tracing::info!(
                    reason = %goaway.reason,
                    redirect = ?goaway.redirect,
                    deadline_ms = goaway.deadline_ms,
                    "the relay asks the client to move"
                );
                inbox.push_goaway(goaway);
            }
            Ok(Some(Message::Directory(directory))) => {
                tracing::debug!(
                    relays = directory.relays.len(),
                    "the relay sent a directory"
                );
                inbox.push_directory(directory);
            }
            Ok(Some(Message::Error(error))) => {
                inbox.finish(End::Closed {
                    code: Some(error.code),
                    reason: error.message,
                });
                close(&conn, ErrorCode::Normal, "the relay ended the session");
                return;
            }
            Ok(Some(other)) => {
                return violation(
                    &conn,
                    &inbox,
                    ErrorCode::ProtocolViolation,
                    format!(
                        "it sent a {} message on the control stream",
                        other.message_type().name()
                    ),
                );
            }
            Ok(None) => {
                inbox.finish(End::Closed {
                    code: None,
                    reason: "the relay finished the control stream".to_owned(),
                });
                close(&conn, ErrorCode::Normal, "control stream finished");
                return;
            }
            Err(FrameError::Read(ReadError::ConnectionLost(e))) => {
                return inbox.finish(End::from_connection(&e));
            }
            Err(e) if e.is_peer_fault() => {
                return violation(
                    &conn,
                    &inbox,
                    e.code().unwrap_or(ErrorCode::Malformed),
                    format!("it sent a bad message on the control stream: {e}"),
                );
            }
            Err(e) => {
                if !inbox.ended() {
                    inbox.finish(End::Closed {
                        code: None,
                        reason: format!("the control stream failed: {e}"),
                    });
                    close(&conn, ErrorCode::Normal, "control stream failed");
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_are_within_the_bucket_error() {
        let mut latency = Latency::default();
        assert_eq!(latency.p50_ms(), None);
        for us in 1..=10_000u64 {
            latency.record_us(us * 10);
        }
        let p50 = latency.p50_ms().unwrap();
        let p99 = latency.p99_ms().unwrap();
        assert!((p50 - 50.0).abs() / 50.0 < 0.07, "p50 {p50}");
        assert!((p99 - 99.0).abs() / 99.0 < 0.07, "p99 {p99}");
        assert_eq!(latency.max_ms(), Some(100.0));
        assert!((latency.mean_ms().unwrap() - 50.005).abs() < 1e-9);
        let mut merged = Latency::default();
        merged.merge(&latency);
        merged.merge(&latency);
        assert_eq!(merged.count(), 20_000);
        assert_eq!(merged.p50_ms(), latency.p50_ms());
        // Small values are exact; huge ones land in the last bucket.
        let mut small = Latency::default();
        small.record_us(3);
        assert_eq!(small.p99_ms(), Some(0.003));
        small.record_us(u64::MAX / 2);
        assert_eq!(small.quantile_ms(1.0), small.max_ms());
    }

    #[test]
    fn bucket_values_lie_inside_their_buckets() {
        for us in [16u64, 17, 31, 32, 100, 1000, 65_535, 1 << 30] {
            let value = Latency::value(Latency::index(us));
            assert!(
                (value - us as f64).abs() / us as f64 <= 1.0 / 16.0 + 1e-9,
                "{us}: {value}"
            );
        }
        for i in 0..BUCKETS - 1 {
            assert!(Latency::value(i) < Latency::value(i + 1));
        }
    }

    #[test]
    fn stats_serialize_with_latency_as_a_summary() {
        let mut stats = Stats::default();
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["latency_ms"]["p50"], serde_json::Value::Null);
        stats.latency_ms.record_us(2000);
        stats.ticks_applied = 7;
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["ticks_applied"], 7);
        assert_eq!(json["latency_ms"]["count"], 1);
        assert_eq!(json["latency_ms"]["p50"], 2.0);
        assert_eq!(json["latency_ms"]["p99"], 2.0);
    }

    fn update(tick: u64, base: Option<u64>) -> Update {
        Update {
            tick,
            base,
            predict_from: None,
            origin_time_us: 0,
            hash: 0,
            chunks: Vec::new(),
            dropped: Vec::new(),
        }
    }

    /// A replica holding tick 1 (an empty keyframe).
    fn replica_at_tick_1() -> Replica {
        use proto::{Component, Encoding, Field, Schema};
        let schema = Schema {
            name: "dots".into(),
            components: vec![Component {
                name: "c".into(),
                fields: vec![Field {
                    name: "v".into(),
                    encoding: Encoding::Int { min: 0, max: 9 },
                }],
            }],
            position: None,
            max_entities: 10,
        };
        let mut replica = Replica::new(Arc::new(schema.layout().unwrap()), 8);
        replica.apply(&update(1, None)).unwrap();
        replica
    }

    fn take_tick(inbox: &Inbox, replica: &Replica, superseded: &mut u64) -> Option<u64> {
        match inbox.take(replica, superseded).0 {
            Some(Item::Update(r)) => Some(r.update.tick),
            Some(_) => panic!("expected an update"),
            None => None,
        }
    }

    #[test]
    fn a_client_behind_jumps_to_the_newest_update_it_can_apply() {
        let replica = replica_at_tick_1();
        let inbox = Inbox::new(16);
        for (tick, base) in [
            (2, Some(1)),
            (4, Some(1)),
            (3, Some(1)),
            (6, Some(5)),
            (1, None),
        ] {
            inbox.push_update(update(tick, base), 100, false);
        }
        let mut superseded = 0;
        // Tick 4 is the newest whose baseline is held: the older 2 and 3,
        // and stale tick 1, go with it.
        assert_eq!(take_tick(&inbox, &replica, &mut superseded), Some(4));
        assert_eq!(superseded, 3);
        // Nothing else applies: the oldest comes next, to be counted.
        assert_eq!(take_tick(&inbox, &replica, &mut superseded), Some(6));
        assert_eq!(take_tick(&inbox, &replica, &mut superseded), None);
        let (_, counters) = inbox.take(&replica, &mut superseded);
        assert_eq!(counters.updates, 5);
        assert_eq!(counters.bytes, 500);
    }

    #[test]
    fn a_full_inbox_drops_the_oldest_update_and_goaways_come_first() {
        let replica = replica_at_tick_1();
        let inbox = Inbox::new(2);
        for tick in [5, 6, 7] {
            // Bases that are not held: taken in arrival order.
            inbox.push_update(update(tick, Some(3)), 10, true);
        }
        inbox.push_goaway(Goaway {
            reason: "drain".into(),
            redirect: None,
            deadline_ms: 10,
        });
        let mut superseded = 0;
        assert!(matches!(
            inbox.take(&replica, &mut superseded).0,
            Some(Item::Goaway(_))
        ));
        assert_eq!(take_tick(&inbox, &replica, &mut superseded), Some(6));
        inbox.finish(End::Protocol("bad".into()));
        // Nothing is accepted after the end; what was queued still comes.
        inbox.push_update(update(8, None), 10, false);
        assert_eq!(take_tick(&inbox, &replica, &mut superseded), Some(7));
        let (item, counters) = inbox.take(&replica, &mut superseded);
        assert!(matches!(item, Some(Item::End(End::Protocol(_)))));
        assert_eq!(counters.overflowed, 1);
        assert_eq!(counters.updates, 3);
        assert_eq!(counters.on_streams, 3);
        assert_eq!(superseded, 0);
    }

    #[test]
    fn only_the_newest_directory_is_kept() {
        let replica = replica_at_tick_1();
        let inbox = Inbox::new(2);
        let directory = |id: &str| Directory {
            relays: vec![proto::msg::RelayInfo {
                id: id.into(),
                addr: "127.0.0.1:4434".into(),
                probe_addr: "127.0.0.1:4435".into(),
                region: "local".into(),
                load: 0,
                origin_rtt_us: u32::MAX,
                coords: None,
            }],
        };
        for id in ["a", "b", "c"] {
            inbox.push_directory(directory(id));
        }
        let mut superseded = 0;
        match inbox.take(&replica, &mut superseded).0 {
            Some(Item::Directory(d)) => assert_eq!(d.relays[0].id, "c"),
            _ => panic!("expected the newest directory"),
        }
        assert!(inbox.take(&replica, &mut superseded).0.is_none());
    }

    #[test]
    fn pacer_allows_bursts_of_two_then_the_rate() {
        let start = Instant::now();
        let mut pacer = Pacer::new(40.0, start);
        assert!(pacer.try_take(start));
        assert!(pacer.try_take(start));
        assert!(!pacer.try_take(start));
        let ready = pacer.ready_at();
        assert_eq!(ready, start + Duration::from_millis(25));
        assert!(pacer.try_take(ready));
        assert!(!pacer.try_take(ready));
    }

    #[test]
    fn errors_say_whose_fault_and_whether_to_retry() {
        let refused = SessionError::Refused {
            code: ErrorCode::UnknownWorld,
            message: "no".into(),
        };
        assert_eq!(refused.retry(), Retry::Never);
        assert_eq!(refused.blame(), Blame::Client);
        let draining = SessionError::Closed {
            code: Some(ErrorCode::Draining),
            reason: "bye".into(),
        };
        assert_eq!(draining.retry(), Retry::Elsewhere);
        assert_eq!(draining.blame(), Blame::Relay);
        let lost = SessionError::Closed {
            code: None,
            reason: "timeout".into(),
        };
        assert!(lost.is_retry_safe());
        assert_eq!(lost.blame(), Blame::Network);
        let protocol = SessionError::Protocol("garbage".into());
        assert_eq!(protocol.blame(), Blame::Relay);
        assert_eq!(protocol.retry(), Retry::Elsewhere);
        let input = SessionError::InputTooLarge { len: 65, max: 64 };
        assert!(!input.is_retry_safe());
    }
}
