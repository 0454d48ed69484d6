//! Lightweight load clients: raw quinn connections that say hello, read
//! every update (datagram or stream), decode it with proto and acknowledge
//! its tick, **without applying the delta**.
//!
//! The load client measures the relay, not client decoding: applying deltas
//! to a replica and checking hashes costs the client, not the relay, and the
//! relay's correctness is covered by the relay's and client's tests. What
//! the relay sees is what a real client does: a hello with an interest
//! area, one ack per update, promptly.
//!
//! Many connections share a few client endpoints (`endpoints`), each driven
//! by its own task.

use super::hist::LatencyHist;
use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use proto::msg::{Ack, Area, Hello, Message, Update, VERSION};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use transport::{FramedRecv, FramedSend, TlsConfig};

/// Connections being set up at once.
const CONNECT_CONCURRENCY: usize = 48;
/// Time one connection attempt (QUIC handshake, hello, welcome) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts per connection.
const CONNECT_ATTEMPTS: usize = 2;
/// Largest update accepted on a stream.
const MAX_STREAM_UPDATE: usize = 4 << 20;
/// Agent string of the hello.
const AGENT: &str = "statecast-fanout-bench";

/// Microseconds since the UNIX epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What the load clients counted. Window counters only count updates whose
/// tick lies in the window `(lo, hi]`, so an update counts for the tick it
/// carries, whenever it arrives.
#[derive(Debug)]
pub struct LoadStats {
    /// Updates received (all time).
    pub updates: AtomicU64,
    /// Update bytes received (all time): datagram or frame length.
    pub bytes: AtomicU64,
    /// Clients that received at least one update.
    pub receiving: AtomicU64,
    /// Connections that ended before the bench stopped them.
    pub ended: AtomicU64,
    /// Datagrams or streams that did not decode as an update.
    pub bad: AtomicU64,
    lo: AtomicU64,
    hi: AtomicU64,
    /// Updates for window ticks.
    pub window_updates: AtomicU64,
    /// Of those, updates that came on a stream.
    pub window_streams: AtomicU64,
    /// Bytes of updates for window ticks.
    pub window_bytes: AtomicU64,
    /// Origin tick time (or floor send time) to receipt, for window ticks.
    pub latency: LatencyHist,
}

impl Default for LoadStats {
    fn default() -> Self {
        LoadStats {
            updates: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            receiving: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            lo: AtomicU64::new(u64::MAX),
            hi: AtomicU64::new(u64::MAX),
            window_updates: AtomicU64::new(0),
            window_streams: AtomicU64::new(0),
            window_bytes: AtomicU64::new(0),
            latency: LatencyHist::default(),
        }
    }
}

impl LoadStats {
    /// Opens the window after tick `lo` (no upper end yet).
    pub fn open_window(&self, lo: u64) {
        self.window_updates.store(0, Ordering::Relaxed);
        self.window_streams.store(0, Ordering::Relaxed);
        self.window_bytes.store(0, Ordering::Relaxed);
        self.latency.clear();
        self.hi.store(u64::MAX, Ordering::Relaxed);
        self.lo.store(lo, Ordering::Relaxed);
    }

    /// Closes the window at tick `hi` (updates for ticks up to `hi` still
    /// count when they arrive later).
    pub fn close_window(&self, hi: u64) {
        self.hi.store(hi, Ordering::Relaxed);
    }

    fn record(&self, update: &Update, len: usize, stream: bool) {
        self.updates.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        let lo = self.lo.load(Ordering::Relaxed);
        let hi = self.hi.load(Ordering::Relaxed);
        if update.tick > lo && update.tick <= hi {
            self.window_updates.fetch_add(1, Ordering::Relaxed);
            self.window_bytes.fetch_add(len as u64, Ordering::Relaxed);
            if stream {
                self.window_streams.fetch_add(1, Ordering::Relaxed);
            }
            self.latency
                .record(now_us().saturating_sub(update.origin_time_us));
        }
    }
}

/// How a load client opens its session.
#[derive(Clone, Debug)]
pub enum Handshake {
    /// Control stream, hello for `world` with an interest area, welcome.
    Relay {
        /// World to join.
        world: String,
    },
    /// Nothing: the floor server just sends datagrams to every connection.
    None,
}

/// N load clients and the endpoints they share.
pub struct Load {
    endpoints: Vec<quinn::Endpoint>,
    conns: Vec<quinn::Connection>,
    tasks: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    stats: Arc<LoadStats>,
}

impl Load {
    /// Binds `endpoints` client endpoints on 127.0.0.1 with the transport's
    /// client configuration (ALPN statecast/1). Needs a Tokio runtime.
    pub fn new(tls: &TlsConfig, endpoints: usize) -> anyhow::Result<Load> {
        let config = tls.client_config(&[transport::ALPN_CLIENT])?;
        let endpoints = (0..endpoints.max(1))
            .map(|_| {
                let mut e = transport::client_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)))
                    .context("cannot bind a client endpoint")?;
                e.set_default_client_config(config.clone());
                Ok(e)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Load {
            endpoints,
            conns: Vec::new(),
            tasks: Vec::new(),
            stop: watch::channel(false).0,
            stats: Arc::new(LoadStats::default()),
        })
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<LoadStats> {
        &self.stats
    }

    /// Clients connected so far.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no client is connected.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Connects `count` more clients to `server`; client `i` (counting all
    /// clients of this load) asks for `area(i)`. `progress` is told how many
    /// of the `count` are done. A client that cannot connect after a few
    /// attempts is given up (an overloaded server may starve its handshakes),
    /// and once a fifth of the clients failed the rest are not tried:
    /// returns how many were given up, and why the first one was.
    pub async fn connect(
        &mut self,
        server: SocketAddr,
        handshake: &Handshake,
        count: usize,
        area: &(dyn Fn(usize) -> Area + Sync),
        progress: &(dyn Fn(usize) + Sync),
    ) -> (usize, Option<anyhow::Error>) {
        let first = self.conns.len();
        let mut pending = first..first + count;
        let mut set = JoinSet::new();
        let mut done = 0;
        let mut failed = 0;
        let mut first_error = None;
        loop {
            // A server refusing a fifth of the clients is overloaded: give
            // up the rest rather than wait out every timeout.
            if done >= 100 && failed * 5 > done {
                let left = pending.len();
                if left > 0 {
                    failed += left;
                    first_error.get_or_insert(anyhow!("gave up"));
                    pending = 0..0;
                }
            }
            while set.len() < CONNECT_CONCURRENCY {
                let Some(i) = pending.next() else { break };
                let endpoint = self.endpoints[i % self.endpoints.len()].clone();
                let handshake = handshake.clone();
                let area = area(i);
                set.spawn(async move {
                    let mut last = anyhow!("no attempt");
                    for attempt in 0..CONNECT_ATTEMPTS {
                        if attempt > 0 {
                            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                        }
                        let work = open(&endpoint, server, &handshake, area);
                        match tokio::time::timeout(CONNECT_TIMEOUT, work).await {
                            Ok(Ok(session)) => return Ok(session),
                            Ok(Err(e)) => last = e,
                            Err(_) => last = anyhow!("no session within {CONNECT_TIMEOUT:?}"),
                        }
                    }
                    Err(last.context(format!("client {i} could not connect to {server}")))
                });
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            done += 1;
            progress(done);
            let (conn, control) = match joined {
                Ok(Ok(session)) => session,
                Ok(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                    continue;
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(anyhow!("connect task failed: {e}"));
                    continue;
                }
            };
            let stats = self.stats.clone();
            let stop = self.stop.subscribe();
            self.conns.push(conn.clone());
            self.tasks
                .push(tokio::spawn(run_client(conn, control, stats, stop)));
        }
        (failed, first_error)
    }

    /// Bytes of UDP payload received by every client so far (QUIC packets,
    /// headers and encryption included).
    pub fn wire_rx_bytes(&self) -> u64 {
        self.conns.iter().map(|c| c.stats().udp_rx.bytes).sum()
    }

    /// Closes every connection and waits (briefly) for the endpoints to
    /// tell the server.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        for e in &self.endpoints {
            e.close(0u32.into(), b"bench done");
        }
        for e in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(1), e.wait_idle()).await;
        }
    }
}

type Control = Option<(FramedSend, FramedRecv)>;

async fn open(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    handshake: &Handshake,
    area: Area,
) -> anyhow::Result<(quinn::Connection, Control)> {
    let conn = endpoint.connect(server, "localhost")?.await?;
    let world = match handshake {
        Handshake::None => return Ok((conn, None)),
        Handshake::Relay { world } => world.clone(),
    };
    let (send, recv) = conn.open_bi().await?;
    let mut send = FramedSend::new(send);
    let mut recv = FramedRecv::new(recv);
    send.send(&Message::Hello(Hello {
        version: VERSION,
        token: Bytes::new(),
        world,
        resume: None,
        agent: AGENT.to_owned(),
        interest: Some(area),
    }))
    .await?;
    match recv.recv().await? {
        Some(Message::Welcome(_)) => Ok((conn, Some((send, recv)))),
        Some(Message::Error(e)) => bail!("refused: {:?}: {}", e.code, e.message),
        Some(other) => bail!("answered hello with {:?}", other.message_type()),
        None => bail!("control stream finished before the welcome"),
    }
}

/// One client: reads update datagrams and streams, acks each new tick.
/// The control stream stays open (closing it would end the session).
async fn run_client(
    conn: quinn::Connection,
    control: Control,
    stats: Arc<LoadStats>,
    mut stop: watch::Receiver<bool>,
) {
    let (_send, mut recv) = match control {
        Some((send, recv)) => (Some(send), Some(recv)),
        None => (None, None),
    };
    let client = Arc::new(ClientState::default());
    loop {
        let control_msg = async {
            match recv.as_mut() {
                Some(r) => r.recv().await.ok().flatten(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.changed() => break,
            datagram = conn.read_datagram() => match datagram {
                Ok(d) => {
                    let len = d.len();
                    match Message::decode_datagram(d, VERSION) {
                        Ok(Message::Update(u)) => client.on_update(&conn, &stats, &u, len, false),
                        _ => {
                            stats.bad.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(_) => {
                    stats.ended.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            stream = conn.accept_uni() => match stream {
                Ok(s) => {
                    tokio::spawn(read_stream(conn.clone(), s, stats.clone(), client.clone()));
                }
                Err(_) => {
                    stats.ended.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            msg = control_msg => {
                // Goaway or the end of the control stream: nothing to do
                // but keep reading updates; stop watching the stream.
                if msg.is_none() {
                    recv = None;
                }
            }
        }
    }
    conn.close(0u32.into(), b"bench done");
}

#[derive(Default)]
struct ClientState {
    acked: AtomicU64,
    receiving: AtomicBool,
}

impl ClientState {
    fn on_update(
        &self,
        conn: &quinn::Connection,
        stats: &LoadStats,
        update: &Update,
        len: usize,
        stream: bool,
    ) {
        stats.record(update, len, stream);
        if !self.receiving.swap(true, Ordering::Relaxed) {
            stats.receiving.fetch_add(1, Ordering::Relaxed);
        }
        // Acknowledge as a client that applied it would (newest only).
        if self.acked.fetch_max(update.tick, Ordering::Relaxed) < update.tick
            && let Ok(ack) =
                transport::framed::encode_datagram(&Message::Ack(Ack { tick: update.tick }))
        {
            let _ = conn.send_datagram(ack);
        }
    }
}

async fn read_stream(
    conn: quinn::Connection,
    mut stream: quinn::RecvStream,
    stats: Arc<LoadStats>,
    client: Arc<ClientState>,
) {
    // A superseded update's stream is reset by the relay: nothing to count.
    let Ok(bytes) = stream.read_to_end(MAX_STREAM_UPDATE).await else {
        return;
    };
    match proto::msg::decode_frame(&bytes, VERSION) {
        Ok(Some((Message::Update(u), _))) => client.on_update(&conn, &stats, &u, bytes.len(), true),
        _ => {
            stats.bad.fetch_add(1, Ordering::Relaxed);
        }
    }
}
