//! The relay process: upstream subscriptions, the client QUIC server, the
//! per-world fan-out, input forwarding, admin HTTP, drain.
//!
//! ## Tasks
//!
//! - one *upstream* task per world: reads verified ticks from the
//!   subscription, splits them into cells and pushes them into the world's
//!   ring ([`WorldState`]), publishes the newest tick on a `watch` (latest
//!   wins) and forwards the inputs collected since the previous tick as one
//!   batch;
//! - one *fan-out* task per world ([`fanout_loop`]): on each new tick it
//!   codes the chunks the clients' updates will need
//!   ([`ChunkCache::precode`]) on every core at once, then builds every
//!   client's update ([`ClientView::build_datagram`]) and hands it to quinn,
//!   the clients split in one shard per core; a datagram when
//!   it fits, otherwise a short unidirectional stream with its own task (a
//!   few such streams may be on their way at once, and when that many are,
//!   ticks are skipped for that client and the newest goes once one has
//!   arrived; a stream is reset once the client acknowledged a newer tick);
//! - one task per client, running three loops at once: the *datagram* loop
//!   takes acks and inputs; the *control* loop takes interest changes; the
//!   *control sender* sends directory changes and the goaway;
//! - an accept loop, a reaper that releases worlds nobody uses, the admin
//!   HTTP server, and, on a tier relay, the publisher for child relays.
//!
//! A slow client never slows anyone else: the fan-out never waits on a
//! client (sending a datagram does not block, streams have their own
//! tasks), datagrams that do not fit quinn's buffer are dropped oldest
//! first, and while a client's stream updates are
//! on their way (until the client acknowledged all of their bytes) newer
//! ticks are skipped rather than queued, so the client gets the newest state
//! next.

use crate::config::{self, Config, Peer};
use crate::fanout::{
    BuiltDatagram, ChunkCache, ClientView, Interest, Precode, TickState, WorldState, part_range,
};
use crate::metrics::{CpuTimer, Metrics};
use crate::probe;
use bytes::Bytes;
use proto::interest::Grid;
use proto::msg::{
    self, Directory, Error as ErrorMsg, Goaway, Hello, InputBatch, Message, RelayInfo,
    SessionInput, VERSION, Welcome,
};
use proto::{ErrorCode, Layout, StateHash};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use transport::feed::{self, FeedTick, Source, Subscription, WorldInfo};
use transport::{ALPN_CLIENT, ALPN_UPSTREAM, FramedRecv, FramedSend, Readiness, Trust};

/// How long a client has to open its control stream and say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Inputs queued per world between two ticks before new ones are dropped.
const INPUT_QUEUE: usize = 16_384;
/// Bad datagrams a client may send before it is disconnected.
const MAX_BAD_DATAGRAMS: u32 = 64;
/// Most stream updates on their way to one client at once.
pub const MAX_STREAM_DEPTH: usize = 8;

/// Stream updates a client may have on their way at once (a stream counts
/// until the client has acknowledged all of its bytes): enough to cover one
/// round trip of ticks, and never fewer than two, so that sending does not
/// wait for acknowledgements. When that many are on their way, ticks are
/// skipped for the client (never queued) until one arrives; the newest goes
/// then. A stream is never reset for its age: on a path that needs more
/// than a tick per update, resetting it for the next (as large) update
/// would throw its progress away each time, and the client would never get
/// one. It is reset once the client acknowledged a newer tick.
fn stream_depth(rtt: Duration, tick_rate: u32) -> usize {
    let round_trip_ticks = (rtt.as_secs_f64() * f64::from(tick_rate)).ceil() as usize;
    (1 + round_trip_ticks).clamp(2, MAX_STREAM_DEPTH)
}

/// A stream update on its way to a client.
struct InFlight {
    /// Its tick.
    tick: u64,
    /// Resets it; closed once the stream's task has ended.
    cancel: oneshot::Sender<()>,
}

/// Why the relay could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// TLS material could not be loaded or made.
    #[error("TLS: {0}")]
    Tls(#[from] transport::TlsError),
    /// A socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The fan-out's helper threads could not be started.
    #[error("cannot start the fan-out's threads: {0}")]
    Threads(std::io::Error),
}

/// A world as the relay serves it.
struct World {
    info: WorldInfo,
    state: RwLock<WorldState>,
    cache: ChunkCache,
    /// Newest tick and when it arrived here.
    latest: watch::Sender<Option<(Arc<TickState>, Instant)>>,
    /// Newest tick for child relays (tiers).
    feed: watch::Sender<Option<Arc<FeedTick>>>,
    /// Client inputs waiting for the next tick's batch.
    inputs: mpsc::Sender<SessionInput>,
    /// Input batches from child relays.
    child_inputs: mpsc::Sender<InputBatch>,
    clients: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
    upstream: Mutex<Option<JoinHandle<()>>>,
    /// The fan-out task ([`fanout_loop`]).
    fanout: Mutex<Option<JoinHandle<()>>>,
    /// The clients, for the fan-out (copied on change, read every tick).
    sinks: Mutex<Arc<Vec<Arc<Sink>>>>,
    /// Ticks evicted from the ring, freed by the fan-out after its next
    /// tick's updates are out.
    evicted: Mutex<Vec<Arc<TickState>>>,
    origin_rtt_us: AtomicU64,
}

impl World {
    fn add_sink(&self, sink: &Arc<Sink>) {
        let mut sinks = self.sinks.lock().expect("not poisoned");
        let mut next = Vec::with_capacity(sinks.len() + 1);
        next.extend(sinks.iter().cloned());
        next.push(sink.clone());
        *sinks = Arc::new(next);
    }

    fn remove_sink(&self, sink: &Arc<Sink>) {
        let mut sinks = self.sinks.lock().expect("not poisoned");
        let next: Vec<_> = sinks
            .iter()
            .filter(|s| !Arc::ptr_eq(s, sink))
            .cloned()
            .collect();
        *sinks = Arc::new(next);
    }

    /// Stops the world's tasks.
    fn stop_tasks(&self) {
        for task in [&self.upstream, &self.fanout] {
            if let Some(task) = task.lock().expect("not poisoned").take() {
                task.abort();
            }
        }
    }

    fn ring_capacity(config: &Config, tick_rate: u32) -> usize {
        config.ring_ticks.max(tick_rate as usize).max(2)
    }
}

/// State shared by every task of a relay.
struct Shared {
    config: Config,
    metrics: Metrics,
    fanout: FanoutCounters,
    upstream: quinn::Endpoint,
    worlds: tokio::sync::Mutex<HashMap<String, Arc<World>>>,
    draining: watch::Sender<bool>,
    readiness: Readiness,
    sessions: AtomicU64,
    /// The peers told to clients ([`Config::directory`], then
    /// [`RelayHandle::set_directory`]); sessions resend on a change.
    directory: watch::Sender<Vec<Peer>>,
    /// This relay's own directory entry addresses (client, probe), when
    /// clients can use them: `None` when `listen` is a wildcard address.
    own_addrs: Option<(String, String)>,
    /// Its own coordinates, when it computes them ([`Config::auto_coords`]).
    own_coords: Option<Arc<crate::coords::OwnCoords>>,
    /// The fan-out's threads, one per core.
    helpers: crate::priority::Helpers,
}

/// A running relay.
pub struct RelayHandle {
    /// Where clients connect.
    pub client_addr: SocketAddr,
    /// Admin HTTP address.
    pub admin_addr: SocketAddr,
    /// Where child relays subscribe, if publishing.
    pub publish_addr: Option<SocketAddr>,
    /// Where the relay answers latency probes, if it does.
    pub probe_addr: Option<SocketAddr>,
    /// The relay's metrics.
    pub metrics: Metrics,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RelayHandle {
    /// Drains: stops accepting clients, tells every client to go, and waits
    /// until they have left or the configured deadline has passed; then
    /// stops.
    pub async fn drain(mut self) {
        self.shared.draining.send_replace(true);
        self.shared.readiness.set_ready(false);
        let deadline = Instant::now() + Duration::from_secs(self.shared.config.drain_secs);
        info!(
            clients = self.shared.metrics.clients.get(),
            "draining: goaway sent, waiting for clients to leave"
        );
        while self.shared.metrics.clients.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        info!(
            left_behind = self.shared.metrics.clients.get(),
            "drain finished"
        );
        self.stop_now().await;
    }

    /// Stops at once, closing every connection.
    pub async fn shutdown(mut self) {
        self.stop_now().await;
    }

    async fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Clients connected now.
    pub fn clients(&self) -> i64 {
        self.shared.metrics.clients.get()
    }

    /// Its own coordinates and the samples behind them, when it computes
    /// them ([`Config::auto_coords`]).
    pub fn own_coords(&self) -> Option<(msg::Coords, u64)> {
        let own = self.shared.own_coords.as_ref()?;
        Some((own.current(), own.samples()))
    }

    /// Replaces the peers told to clients; every connected client gets the
    /// new directory on its control stream. Refused (nothing changes) when
    /// [`config::check_directory`] fails.
    pub fn set_directory(&self, peers: Vec<Peer>) -> Result<(), String> {
        config::check_directory(&self.shared.config.id, &peers)?;
        self.shared.directory.send_replace(peers);
        Ok(())
    }

    /// The directory a client connecting now would get (`None`: no peers
    /// configured, none is sent).
    pub fn directory(&self) -> Option<Directory> {
        directory(&self.shared)
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Starts a relay: binds its sockets and spawns its tasks.
pub async fn start(config: Config) -> Result<RelayHandle, RelayError> {
    let trust = Trust::from_flags(
        config.cert.clone(),
        config.key.clone(),
        config.ca.clone(),
        config.data_dir.clone(),
    );
    let describe = trust.describe();
    let tls = tokio::task::spawn_blocking(move || trust.load())
        .await
        .expect("TLS loading does not panic")?;
    info!(trust = %describe, "relay TLS");
    let client_server =
        transport::server_endpoint(config.listen, tls.server_config(&[ALPN_CLIENT])?).map_err(
            |source| RelayError::Bind {
                addr: config.listen,
                source,
            },
        )?;
    let client_addr = client_server
        .local_addr()
        .map_err(|source| RelayError::Bind {
            addr: config.listen,
            source,
        })?;
    let bind_any = SocketAddr::new(
        if config.upstream.is_ipv6() {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        },
        0,
    );
    let mut upstream = transport::client_endpoint(bind_any).map_err(|source| RelayError::Bind {
        addr: bind_any,
        source,
    })?;
    upstream.set_default_client_config(tls.client_config(&[ALPN_UPSTREAM])?);
    let probe_socket = match config.probe {
        Some(addr) => Some(
            tokio::net::UdpSocket::bind(addr)
                .await
                .map_err(|source| RelayError::Bind { addr, source })?,
        ),
        None => None,
    };
    let probe_addr = probe_socket.as_ref().and_then(|s| s.local_addr().ok());
    // A bad directory is refused by the command line; here, a bad entry is
    // dropped rather than stopping the relay.
    let peers: Vec<Peer> = config
        .directory
        .iter()
        .filter(|peer| match peer.check() {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "directory entry left out");
                false
            }
        })
        .take(msg::MAX_RELAYS - 1)
        .cloned()
        .collect();
    let own_addrs = if client_addr.ip().is_unspecified() {
        if !peers.is_empty() && !peers.iter().any(|p| p.id == config.id) {
            warn!(
                listen = %client_addr,
                "the directory leaves this relay out: listen is a wildcard address; \
                 list this relay's id in the directory with the address clients should use"
            );
        }
        None
    } else {
        Some((
            client_addr.to_string(),
            probe_addr.map(|a| a.to_string()).unwrap_or_default(),
        ))
    };
    let (directory, _) = watch::channel(peers);

    let metrics = Metrics::new();
    let readiness = Readiness::new();
    let (draining, _) = watch::channel(false);
    let priority = config.fanout_priority();
    let helpers = crate::priority::Helpers::start(priority, tokio::runtime::Handle::current())
        .map_err(RelayError::Threads)?;
    info!(
        threads = helpers.len(),
        pinned = helpers.pinned(),
        "fan-out threads at {}{}",
        helpers.scheduling(),
        match (priority.realtime, helpers.scheduling()) {
            (true, crate::priority::Scheduling::Realtime) => "",
            (true, _) => " (real-time scheduling was refused: it needs CAP_SYS_NICE)",
            _ => "",
        }
    );
    let shared = Arc::new(Shared {
        config: config.clone(),
        metrics: metrics.clone(),
        fanout: FanoutCounters::new(&metrics),
        upstream,
        worlds: tokio::sync::Mutex::new(HashMap::new()),
        draining,
        readiness: readiness.clone(),
        sessions: AtomicU64::new(0),
        directory,
        own_addrs,
        own_coords: config
            .auto_coords
            .then(|| Arc::new(crate::coords::OwnCoords::new(&config.id))),
        helpers,
    });

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (stopped_tx, stopped_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stopped_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let (admin_addr, admin_task) = transport::admin::serve(
        config.admin,
        metrics.registry.clone(),
        readiness.clone(),
        stopped(),
    )
    .await
    .map_err(|source| RelayError::Bind {
        addr: config.admin,
        source,
    })?;

    let mut publish_addr = None;
    let mut publisher = None;
    if let Some(addr) = config.publish {
        let endpoint = transport::server_endpoint(addr, tls.server_config(&[ALPN_UPSTREAM])?)
            .map_err(|source| RelayError::Bind { addr, source })?;
        publish_addr = endpoint.local_addr().ok();
        let worlds: Arc<dyn feed::Worlds> = Arc::new(TierWorlds(shared.clone()));
        let config = feed::PublisherConfig {
            id: shared.config.id.clone(),
            region: shared.config.region.clone(),
            auth: shared.config.publish_auth.clone().map(String::into_bytes),
            keyframe_after: None,
            max_connections: 256,
        };
        let stats = Arc::new(feed::FeedStats::default());
        publisher = Some(tokio::spawn(feed::serve(
            endpoint,
            worlds,
            config,
            stats,
            stopped(),
        )));
    }

    let probes = probe_socket.map(|socket| {
        tokio::spawn(probe::serve(
            socket,
            probe_info(shared.clone()),
            probe::Limits::default(),
            metrics.probes.clone(),
            stopped(),
        ))
    });
    // Its own coordinates: pings to the peers go from a socket of their
    // own on the probe address's IP, so that they never meet the probe
    // responder's rate limit on this relay.
    let coords_task = match &shared.own_coords {
        Some(own) => {
            let ip = probe_addr.map_or(client_addr.ip(), |a| a.ip());
            let bind = SocketAddr::new(ip, 0);
            let socket = tokio::net::UdpSocket::bind(bind)
                .await
                .map_err(|source| RelayError::Bind { addr: bind, source })?;
            Some(tokio::spawn(crate::coords::run(
                socket,
                config.id.clone(),
                shared.directory.subscribe(),
                own.clone(),
                Duration::from_millis(config.coords_interval_ms),
                stopped(),
            )))
        }
        None => None,
    };
    let accept = tokio::spawn(accept_loop(shared.clone(), client_server.clone()));
    let reaper = tokio::spawn(reaper(shared.clone()));
    readiness.set_ready(true);
    info!(
        id = %config.id,
        region = %config.region,
        clients = %client_addr,
        admin = %admin_addr,
        upstream = %config.upstream,
        publish = ?publish_addr,
        probe = ?probe_addr,
        "relay running"
    );

    let task_shared = shared.clone();
    let task = tokio::spawn(async move {
        let _ = stop_rx.await;
        task_shared.readiness.set_ready(false);
        accept.abort();
        reaper.abort();
        client_server.close(
            quinn::VarInt::from_u32(ErrorCode::Draining.to_code().into()),
            b"relay stopping",
        );
        let worlds: Vec<_> = task_shared.worlds.lock().await.drain().collect();
        for (_, world) in worlds {
            world.stop_tasks();
        }
        task_shared
            .upstream
            .close(quinn::VarInt::from_u32(0), b"relay stopping");
        let _ = stopped_tx.send(true);
        if let Some(p) = publisher {
            let _ = p.await;
        }
        if let Some(p) = probes {
            let _ = p.await;
        }
        if let Some(c) = coords_task {
            let _ = c.await;
        }
        let _ = admin_task.await;
        let _ = tokio::time::timeout(Duration::from_secs(1), client_server.wait_idle()).await;
    });

    Ok(RelayHandle {
        client_addr,
        admin_addr,
        publish_addr,
        probe_addr,
        metrics,
        shared,
        stop: Some(stop_tx),
        task,
    })
}

/// What the probe responder says about this relay: load as clients over
/// `max_clients` (`u16::MAX` while draining, so that clients look elsewhere),
/// and the RTT to the origin of the closest subscribed world (unknown while
/// none is subscribed). Never waits for the world table: when it is busy,
/// the last RTT read stands.
fn probe_info(shared: Arc<Shared>) -> impl Fn() -> probe::Info + Send + 'static {
    let origin_rtt_us = AtomicU64::new(u64::MAX);
    move || {
        if let Some(rtt) = nearest_origin_rtt(&shared) {
            origin_rtt_us.store(
                rtt.map_or(u64::MAX, |d| d.as_micros() as u64),
                Ordering::Relaxed,
            );
        }
        let rtt = origin_rtt_us.load(Ordering::Relaxed);
        probe::Info {
            relay_id: shared.config.id.clone(),
            region: shared.config.region.clone(),
            load: current_load(&shared),
            origin_rtt: (rtt != u64::MAX).then(|| Duration::from_micros(rtt)),
            coords: shared.own_coords.as_ref().map(|c| c.current()),
        }
    }
}

/// This relay's load as probes report it: clients over `max_clients`, in
/// permille (`u16::MAX` while draining, so that clients look elsewhere).
fn current_load(shared: &Shared) -> u16 {
    if *shared.draining.borrow() {
        u16::MAX
    } else {
        let clients = shared.metrics.clients.get().max(0) as u64;
        (clients * 1000 / shared.config.max_clients.max(1) as u64).min(u16::MAX.into()) as u16
    }
}

/// The directory clients get: this relay first (its current load, and the
/// addresses of its own entry in the directory if it has one, else the
/// bound ones), then its peers (load 0: unknown, clients probe them).
/// `None` when no peers are configured.
/// Sends the directory on a client's control stream, if the relay has
/// peers.
async fn send_directory(shared: &Shared, control: &mut FramedSend) -> Result<(), End> {
    if let Some(directory) = directory(shared) {
        control
            .send(&Message::Directory(directory))
            .await
            .map_err(|e| End::new(ErrorCode::Normal, "closed", e.to_string()))?;
    }
    Ok(())
}

/// The RTT to the origin of the closest subscribed world: `Some(None)`
/// while none is subscribed, `None` while the world table is busy (this
/// never waits for it).
fn nearest_origin_rtt(shared: &Shared) -> Option<Option<Duration>> {
    let worlds = shared.worlds.try_lock().ok()?;
    Some(
        worlds
            .values()
            .map(|w| w.origin_rtt_us.load(Ordering::Relaxed))
            .min()
            .filter(|&rtt| rtt != u64::MAX)
            .map(Duration::from_micros),
    )
}

fn directory(shared: &Shared) -> Option<Directory> {
    let peers = shared.directory.borrow();
    if peers.is_empty() {
        return None;
    }
    let config = &shared.config;
    let info = |p: &Peer, load: u16| RelayInfo {
        id: p.id.clone(),
        addr: p.addr.clone(),
        probe_addr: p.probe_addr.clone(),
        region: p.region.clone(),
        load,
        origin_rtt_us: p.origin_rtt_us(),
        coords: p.coords,
    };
    // This relay's own entry: the origin RTT it measures, as its pongs say.
    let own_origin_rtt_us = probe::origin_rtt_us(nearest_origin_rtt(shared).flatten());
    // Its computed coordinates, once settled ([`crate::coords`]).
    let own_coords = shared.own_coords.as_ref().and_then(|c| c.settled());
    let mut relays = Vec::with_capacity(peers.len() + 1);
    match peers.iter().find(|p| p.id == config.id) {
        Some(own) => relays.push(RelayInfo {
            region: if own.region.is_empty() {
                config.region.clone()
            } else {
                own.region.clone()
            },
            origin_rtt_us: own_origin_rtt_us,
            coords: own_coords.or(own.coords),
            ..info(own, current_load(shared))
        }),
        None => {
            if let Some((addr, probe_addr)) = &shared.own_addrs {
                relays.push(RelayInfo {
                    id: config.id.clone(),
                    addr: addr.clone(),
                    probe_addr: probe_addr.clone(),
                    region: config.region.clone(),
                    load: current_load(shared),
                    origin_rtt_us: own_origin_rtt_us,
                    coords: own_coords,
                });
            }
        }
    }
    relays.extend(
        peers
            .iter()
            .filter(|p| p.id != config.id)
            .map(|p| info(p, 0)),
    );
    relays.truncate(msg::MAX_RELAYS);
    Some(Directory { relays })
}

/// Runs a relay until `shutdown` resolves, then drains it.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
    let handle = start(config).await?;
    shutdown.await;
    handle.drain().await;
    Ok(())
}

async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    let limit = Arc::new(tokio::sync::Semaphore::new(
        shared.config.max_clients.max(1),
    ));
    while let Some(incoming) = endpoint.accept().await {
        if *shared.draining.borrow() {
            incoming.refuse();
            shared
                .metrics
                .sessions_refused
                .with_label_values(&["draining"])
                .inc();
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            incoming.refuse();
            shared
                .metrics
                .sessions_refused
                .with_label_values(&["full"])
                .inc();
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    debug!(%remote, error = %e, "handshake failed");
                    shared
                        .metrics
                        .sessions_refused
                        .with_label_values(&["handshake"])
                        .inc();
                    return;
                }
            };
            if let Err(end) = serve_client(&shared, &conn).await {
                debug!(%remote, reason = %end.message, "session ended");
                shared
                    .metrics
                    .sessions_refused
                    .with_label_values(&[end.label])
                    .inc();
                conn.close(
                    quinn::VarInt::from_u32(end.code.to_code().into()),
                    end.message.as_bytes(),
                );
            }
        });
    }
}

/// Why a client session ended early.
struct End {
    code: ErrorCode,
    label: &'static str,
    message: String,
}

impl End {
    fn new(code: ErrorCode, label: &'static str, message: impl Into<String>) -> End {
        End {
            code,
            label,
            message: message.into(),
        }
    }
}

/// Tells the client why, on its control stream, before closing.
async fn refuse(control: &mut FramedSend, end: End) -> End {
    let msg = Message::Error(ErrorMsg {
        code: end.code,
        message: end.message.chars().take(msg::MAX_TEXT_LEN / 4).collect(),
    });
    let _ = tokio::time::timeout(Duration::from_secs(1), control.send(&msg)).await;
    let _ = control.finish();
    end
}

async fn serve_client(shared: &Arc<Shared>, conn: &quinn::Connection) -> Result<(), End> {
    let (send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| End::new(ErrorCode::Malformed, "timeout", "no control stream"))?
        .map_err(|e| End::new(ErrorCode::Normal, "closed", e.to_string()))?;
    let mut control = FramedSend::new(send);
    let mut inbox = FramedRecv::new(recv);
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, inbox.recv()).await {
        Err(_) => {
            return Err(refuse(
                &mut control,
                End::new(ErrorCode::Malformed, "timeout", "no hello within 5 s"),
            )
            .await);
        }
        Ok(Ok(Some(Message::Hello(hello)))) => hello,
        Ok(Ok(Some(other))) => {
            let message = format!("expected hello, got {:?}", other.message_type());
            return Err(refuse(
                &mut control,
                End::new(ErrorCode::Malformed, "malformed", message),
            )
            .await);
        }
        Ok(Ok(None)) => return Err(End::new(ErrorCode::Normal, "closed", "no hello")),
        Ok(Err(e)) => {
            let code = e.code().unwrap_or(ErrorCode::Malformed);
            return Err(refuse(&mut control, End::new(code, "malformed", e.to_string())).await);
        }
    };
    if *shared.draining.borrow() {
        return Err(refuse(
            &mut control,
            End::new(ErrorCode::Draining, "draining", "relay is draining"),
        )
        .await);
    }
    let world = match open_world(shared, &hello.world).await {
        Ok(world) => world,
        Err((code, message)) => {
            return Err(refuse(&mut control, End::new(code, "world", message)).await);
        }
    };
    session(shared, conn, world, hello, control, inbox).await
}

/// Opens (subscribing upstream if needed) the world `name`.
async fn open_world(shared: &Arc<Shared>, name: &str) -> Result<Arc<World>, (ErrorCode, String)> {
    let mut worlds = shared.worlds.lock().await;
    if let Some(world) = worlds.get(name) {
        return Ok(world.clone());
    }
    let auth = shared.config.upstream_auth.clone().unwrap_or_default();
    let sub = Subscription::connect(
        &shared.upstream,
        shared.config.upstream,
        &shared.config.upstream_name,
        name,
        auth.as_bytes(),
        &shared.config.id,
    )
    .await;
    let sub = match sub {
        Ok(sub) => {
            shared
                .metrics
                .upstream_connects
                .with_label_values(&["ok"])
                .inc();
            sub
        }
        Err(e) => {
            shared
                .metrics
                .upstream_connects
                .with_label_values(&["error"])
                .inc();
            warn!(world = name, error = %e, "upstream subscription failed");
            return Err(match e {
                feed::FeedError::Refused { code, message } => (code, message),
                other => (ErrorCode::UpstreamLost, format!("upstream: {other}")),
            });
        }
    };
    let info = sub.info.clone();
    let layout: Arc<Layout> = info.layout.clone();
    let grid = Some(Grid::new(shared.config.cell_size));
    let capacity = World::ring_capacity(&shared.config, info.tick_rate);
    let (inputs, inputs_rx) = mpsc::channel(INPUT_QUEUE);
    let (child_inputs, child_rx) = mpsc::channel(256);
    let world = Arc::new(World {
        state: RwLock::new(WorldState::new(layout, grid, capacity)),
        cache: ChunkCache::new(shared.config.chunk_cache),
        latest: watch::channel(None).0,
        feed: watch::channel(None).0,
        inputs,
        child_inputs,
        clients: AtomicUsize::new(0),
        idle_since: Mutex::new(Some(Instant::now())),
        upstream: Mutex::new(None),
        fanout: Mutex::new(None),
        sinks: Mutex::new(Arc::new(Vec::new())),
        evicted: Mutex::new(Vec::new()),
        origin_rtt_us: AtomicU64::new(sub.rtt().as_micros() as u64),
        info,
    });
    let task = tokio::spawn(upstream_loop(
        shared.clone(),
        world.clone(),
        sub,
        inputs_rx,
        child_rx,
    ));
    *world.upstream.lock().expect("not poisoned") = Some(task);
    *world.fanout.lock().expect("not poisoned") =
        Some(tokio::spawn(fanout_loop(shared.clone(), world.clone())));
    worlds.insert(name.to_string(), world.clone());
    shared.metrics.worlds.set(worlds.len() as i64);
    info!(world = name, "subscribed upstream");
    Ok(world)
}

async fn upstream_loop(
    shared: Arc<Shared>,
    world: Arc<World>,
    mut sub: Subscription,
    mut inputs: mpsc::Receiver<SessionInput>,
    mut child_inputs: mpsc::Receiver<InputBatch>,
) {
    let name = world.info.world.clone();
    let mut backoff = Duration::from_millis(100);
    let mut cache_reported = CacheReported::default();
    loop {
        match sub.next().await {
            Ok(tick) => {
                backoff = Duration::from_millis(100);
                let arrived = Instant::now();
                shared.metrics.upstream_ticks.inc();
                shared
                    .metrics
                    .upstream_lag
                    .set(now_us().saturating_sub(tick.origin_time_us) as f64 / 1e6);
                world
                    .origin_rtt_us
                    .store(sub.rtt().as_micros() as u64, Ordering::Relaxed);
                // On the first fan-out thread, at its priority: the split is
                // the first step of the fan-out every client waits for.
                let job = {
                    let (shared, world, tick) = (shared.clone(), world.clone(), tick.clone());
                    let hashes = sub.entity_hashes().cloned();
                    move || split_tick(&shared, &world, &tick, hashes, arrived)
                };
                if shared.helpers.run(0, job).await.is_err() {
                    warn!(world = %name, tick = tick.tick, "splitting a tick failed (panicked)");
                }
                world.feed.send_replace(Some(tick.clone()));
                update_cache_metrics(&shared.metrics, &world.cache, &mut cache_reported);
                // Inputs gathered since the previous tick go up as one batch.
                let mut batch = Vec::new();
                while let Ok(input) = inputs.try_recv() {
                    batch.push(input);
                }
                while let Ok(child) = child_inputs.try_recv() {
                    batch.extend(child.inputs);
                }
                if !batch.is_empty() {
                    let count = batch.len() as u64;
                    for chunk in batch.chunks(msg::MAX_BATCH_INPUTS) {
                        let sent = sub.send_inputs(InputBatch {
                            tick: tick.tick,
                            inputs: chunk.to_vec(),
                        });
                        if sent.is_err() {
                            shared
                                .metrics
                                .drops
                                .with_label_values(&["input_upstream"])
                                .inc_by(chunk.len() as u64);
                        }
                    }
                    shared.metrics.inputs_forwarded.inc_by(count);
                }
            }
            Err(e) => {
                warn!(world = %name, error = %e, "upstream lost; resubscribing");
                loop {
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    let auth = shared.config.upstream_auth.clone().unwrap_or_default();
                    match Subscription::connect(
                        &shared.upstream,
                        shared.config.upstream,
                        &shared.config.upstream_name,
                        &name,
                        auth.as_bytes(),
                        &shared.config.id,
                    )
                    .await
                    {
                        Ok(new) => {
                            shared
                                .metrics
                                .upstream_connects
                                .with_label_values(&["ok"])
                                .inc();
                            info!(world = %name, "resubscribed upstream");
                            sub = new;
                            break;
                        }
                        Err(e) => {
                            shared
                                .metrics
                                .upstream_connects
                                .with_label_values(&["error"])
                                .inc();
                            debug!(world = %name, error = %e, "resubscribe failed");
                        }
                    }
                }
            }
        }
    }
}

/// Cells below which one thread splits a tick alone.
const MIN_SPLIT: usize = 128;

/// Splits `tick` into cells and adds it to the ring (the feed has hashed
/// every entity already: `hashes`), then hands it to the fan-out loop. On
/// the first fan-out thread; the others build their share of the cells.
fn split_tick(
    shared: &Shared,
    world: &Arc<World>,
    tick: &FeedTick,
    hashes: Option<Arc<[StateHash]>>,
    arrived: Instant,
) {
    // Split under a shared lock (the fan-out keeps reading the ring
    // meanwhile), added under the exclusive one. The upstream loop is the
    // ring's only writer (and waits for this), so nothing comes in between.
    let timer = CpuTimer::start();
    let split = world.state.read().expect("not poisoned").split(
        tick.tick,
        tick.origin_time_us,
        tick.hash,
        tick.snapshot.clone(),
        hashes,
    );
    let Some(split) = split.map(Arc::new) else {
        return;
    };
    let parts = if split.len() >= MIN_SPLIT {
        shared.helpers.len()
    } else {
        1
    };
    let mut ns = timer.elapsed_ns();
    let job = {
        let split = split.clone();
        move |i| {
            let timer = CpuTimer::start();
            (split.part(i, parts), timer.elapsed_ns())
        }
    };
    let Some(parts) = shared.helpers.spread(parts, job) else {
        // A part's thread panicked: this tick cannot be held whole.
        warn!(tick = tick.tick, "splitting a tick failed; skipped");
        return;
    };
    let cells = parts
        .into_iter()
        .map(|(cells, part_ns)| {
            ns += part_ns;
            cells
        })
        .collect();
    let timer = CpuTimer::start();
    let state = split.finish(cells);
    let pushed = world
        .state
        .write()
        .expect("not poisoned")
        .commit_keeping(state);
    ns += timer.elapsed_ns();
    shared.metrics.split_seconds.inc_by(ns as f64 / 1e9);
    if let Some((state, evicted)) = pushed {
        shared.fanout.split.observe(arrived.elapsed().as_secs_f64());
        world.latest.send_replace(Some((state, arrived)));
        // Freeing the evicted tick's cells and chunks (thousands of
        // allocations, a few tenths of a millisecond) waits until the next
        // fan-out is done, and stays on the fan-out's threads. Freed on the
        // blocking pool, at normal priority, a fan-out thread was seen
        // blocked 2 to 3 ms while coding in a few ticks a minute, likely on
        // the allocator's lock of its own arena held by the preempted
        // freeing thread; those blocks were not seen with this.
        if let Some(old) = evicted {
            world.evicted.lock().expect("not poisoned").push(old);
        }
    }
}

/// Backoff with ±25% jitter, so relays do not reconnect in lockstep.
fn jitter(d: Duration) -> Duration {
    let f = 0.75 + rand::random::<f64>() * 0.5;
    d.mul_f64(f)
}

/// What a world's chunk cache has already added to the relay's counters.
#[derive(Default)]
struct CacheReported {
    hits: u64,
    misses: u64,
    encode_ns: u64,
    precoded: u64,
}

/// Adds what `cache` did since the last call to the relay-wide counters.
/// Each world's upstream task is the only caller for its cache.
fn update_cache_metrics(metrics: &Metrics, cache: &ChunkCache, reported: &mut CacheReported) {
    let (hits, misses) = cache.counts();
    let encode_ns = cache.encode_ns();
    let precoded = cache.precoded();
    metrics
        .chunks_precoded
        .inc_by(precoded.saturating_sub(reported.precoded));
    metrics
        .cache_hits
        .inc_by(hits.saturating_sub(reported.hits));
    metrics
        .cache_misses
        .inc_by(misses.saturating_sub(reported.misses));
    metrics
        .encode_seconds
        .inc_by(encode_ns.saturating_sub(reported.encode_ns) as f64 / 1e9);
    *reported = CacheReported {
        hits,
        misses,
        encode_ns,
        precoded,
    };
    let (h, m) = (metrics.cache_hits.get(), metrics.cache_misses.get());
    if h + m > 0 {
        metrics.cache_hit_ratio.set(h as f64 / (h + m) as f64);
    }
}

/// Releases worlds that nobody has used for a while.
async fn reaper(shared: Arc<Shared>) {
    let after = Duration::from_secs(shared.config.release_after_secs);
    let mut every = tokio::time::interval(Duration::from_millis(500));
    loop {
        every.tick().await;
        let mut worlds = shared.worlds.lock().await;
        worlds.retain(|name, world| {
            let busy = world.clients.load(Ordering::Relaxed) > 0 || world.feed.receiver_count() > 0;
            let mut idle = world.idle_since.lock().expect("not poisoned");
            if busy {
                *idle = None;
                return true;
            }
            let since = *idle.get_or_insert_with(Instant::now);
            if since.elapsed() < after {
                return true;
            }
            info!(world = %name, "released: no client for {after:?}");
            world.stop_tasks();
            false
        });
        shared.metrics.worlds.set(worlds.len() as i64);
    }
}

/// Per-client input policing: a token bucket and sequence dedup.
struct InputGate {
    tokens: f64,
    rate: f64,
    last: Instant,
    newest: Option<u32>,
}

impl InputGate {
    fn new(rate: u32) -> InputGate {
        InputGate {
            tokens: rate as f64,
            rate: rate as f64,
            last: Instant::now(),
            newest: None,
        }
    }

    /// The inputs of `input` not seen before, oldest first, and how many
    /// were refused by the rate limit.
    fn admit(&mut self, input: msg::Input) -> (Vec<(u32, Bytes)>, u64) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate.max(1.0));
        self.last = now;
        let mut fresh = Vec::new();
        let mut refused = 0;
        for (i, data) in input.inputs.into_iter().enumerate().rev() {
            let seq = input.seq.wrapping_sub(i as u32);
            let newer = self.newest.is_none_or(|n| (seq.wrapping_sub(n) as i32) > 0);
            if !newer {
                continue;
            }
            if self.tokens < 1.0 {
                refused += 1;
                continue;
            }
            self.tokens -= 1.0;
            self.newest = Some(seq);
            fresh.push((seq, data));
        }
        (fresh, refused)
    }
}

async fn session(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    world: Arc<World>,
    hello: Hello,
    mut control: FramedSend,
    mut inbox: FramedRecv,
) -> Result<(), End> {
    let interest = match hello.interest {
        Some(area) => Interest::Around {
            x: area.x as f64,
            y: area.y as f64,
            radius: area.radius as f64,
        },
        None => Interest::All,
    };
    let capacity = world
        .state
        .read()
        .expect("not poisoned")
        .len()
        .max(World::ring_capacity(&shared.config, world.info.tick_rate));
    let (session_id, view) = match &hello.resume {
        Some(resume) => {
            let mut cells = resume.cells.clone();
            cells.sort_unstable();
            cells.dedup();
            (
                resume.session,
                ClientView::resume(interest, capacity, resume.last_ack, cells),
            )
        }
        None => (
            rand::random::<u64>() ^ shared.sessions.fetch_add(1, Ordering::Relaxed),
            ClientView::new(interest, capacity),
        ),
    };
    let view = Arc::new(Mutex::new(view));
    let tick = world
        .state
        .read()
        .expect("not poisoned")
        .latest()
        .map_or(0, |t| t.tick);
    let welcome = Message::Welcome(Welcome {
        version: VERSION,
        session: session_id,
        world: world.info.world.clone(),
        schema: world.info.schema.clone(),
        tick_rate: world.info.tick_rate,
        tick,
        relay_id: shared.config.id.clone(),
        region: shared.config.region.clone(),
    });
    control
        .send(&welcome)
        .await
        .map_err(|e| End::new(ErrorCode::Normal, "closed", e.to_string()))?;
    // Subscribed before the first directory goes, so that no change is
    // missed between the two.
    let mut peers = shared.directory.subscribe();
    peers.mark_unchanged();
    send_directory(shared, &mut control).await?;

    world.clients.fetch_add(1, Ordering::Relaxed);
    shared.metrics.clients.inc();
    debug!(session = session_id, remote = %conn.remote_address(), "session open");
    let rate = if shared.config.input_rate == 0 {
        world.info.tick_rate.saturating_mul(2).max(1)
    } else {
        shared.config.input_rate
    };
    // The world's fan-out sends the updates from the next tick on; the
    // newest tick goes now.
    let sink = Arc::new(Sink {
        conn: conn.clone(),
        view: view.clone(),
        state: Mutex::new(SinkState::default()),
    });
    world.add_sink(&sink);
    let latest = world.latest.borrow().clone();
    if let Some((tick, arrived)) = latest {
        deliver_one(shared, &world, &sink, &tick, arrived);
    }
    let result = tokio::select! {
        r = datagrams(shared, conn, &world, &view, session_id, rate) => r,
        r = control_loop(&mut inbox, &view) => r,
        r = control_sender(shared, &mut control, peers) => r,
    };
    world.remove_sink(&sink);
    {
        // Resets the streams still on their way (their senders drop).
        let mut st = sink.state.lock().expect("not poisoned");
        st.closed = true;
        st.in_flight.clear();
    }
    world.clients.fetch_sub(1, Ordering::Relaxed);
    shared.metrics.clients.dec();
    debug!(session = session_id, "session closed");
    result
}

/// What the relay sends on a client's control stream after the welcome and
/// the first directory: a new directory when the peers change, and a goaway
/// when the relay drains (then nothing more).
async fn control_sender(
    shared: &Arc<Shared>,
    control: &mut FramedSend,
    mut peers: watch::Receiver<Vec<Peer>>,
) -> Result<(), End> {
    let mut draining = shared.draining.subscribe();
    let mut watching = true;
    loop {
        tokio::select! {
            // The Ref the wait returns is not Send: drop it inside.
            () = async { let _ = draining.wait_for(|d| *d).await; } => break,
            changed = peers.changed(), if watching => {
                if changed.is_err() {
                    // The relay is stopping: only a drain is left to report.
                    watching = false;
                    continue;
                }
                peers.mark_unchanged();
                send_directory(shared, control).await?;
            }
        }
    }
    let goaway = Message::Goaway(Goaway {
        reason: "relay draining".into(),
        redirect: None,
        deadline_ms: (shared.config.drain_secs * 1000).min(u32::MAX as u64) as u32,
    });
    let _ = control.send(&goaway).await;
    // Keep serving until the client leaves or the relay stops.
    std::future::pending::<()>().await;
    Ok(())
}

async fn control_loop(inbox: &mut FramedRecv, view: &Mutex<ClientView>) -> Result<(), End> {
    loop {
        match inbox.recv().await {
            Ok(Some(Message::Interest(i))) => {
                let interest = match i.area {
                    Some(a) => Interest::Around {
                        x: a.x as f64,
                        y: a.y as f64,
                        radius: a.radius as f64,
                    },
                    None => Interest::All,
                };
                view.lock().expect("not poisoned").set_interest(interest);
            }
            Ok(Some(other)) => {
                return Err(End::new(
                    ErrorCode::Malformed,
                    "malformed",
                    format!(
                        "unexpected {:?} on the control stream",
                        other.message_type()
                    ),
                ));
            }
            // The client finished its control stream: it is leaving.
            Ok(None) => return Ok(()),
            Err(e) if e.is_peer_fault() => {
                return Err(End::new(
                    e.code().unwrap_or(ErrorCode::Malformed),
                    "malformed",
                    e.to_string(),
                ));
            }
            Err(e) => return Err(End::new(ErrorCode::Normal, "closed", e.to_string())),
        }
    }
}

async fn datagrams(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    world: &World,
    view: &Mutex<ClientView>,
    session: u64,
    rate: u32,
) -> Result<(), End> {
    let mut gate = InputGate::new(rate);
    let mut bad = 0u32;
    loop {
        let datagram = conn
            .read_datagram()
            .await
            .map_err(|e| End::new(ErrorCode::Normal, "closed", e.to_string()))?;
        match Message::decode_datagram(datagram, VERSION) {
            Ok(Message::Ack(ack)) => {
                view.lock().expect("not poisoned").on_ack(ack.tick);
            }
            Ok(Message::Input(input)) => {
                let (fresh, refused) = gate.admit(input);
                if refused > 0 {
                    shared
                        .metrics
                        .drops
                        .with_label_values(&["input_rate"])
                        .inc_by(refused);
                }
                for (seq, data) in fresh {
                    let input = SessionInput { session, seq, data };
                    if world.inputs.try_send(input).is_err() {
                        shared
                            .metrics
                            .drops
                            .with_label_values(&["input_queue"])
                            .inc();
                    }
                }
            }
            Ok(_) | Err(_) => {
                bad += 1;
                shared
                    .metrics
                    .drops
                    .with_label_values(&["bad_datagram"])
                    .inc();
                if bad > MAX_BAD_DATAGRAMS {
                    return Err(End::new(
                        ErrorCode::Malformed,
                        "malformed",
                        "too many malformed datagrams",
                    ));
                }
            }
        }
    }
}

/// Counters the fan-out touches for every update, resolved once (a
/// labelled counter's lookup hashes its labels on every call).
struct FanoutCounters {
    datagrams: prometheus::IntCounter,
    streams: prometheus::IntCounter,
    datagram_send: prometheus::IntCounter,
    stream_busy: prometheus::IntCounter,
    stream_superseded: prometheus::IntCounter,
    /// `statecast_relay_fanout_stage_seconds`, one per stage.
    picked: prometheus::Histogram,
    split: prometheus::Histogram,
    coded: prometheus::Histogram,
    first: prometheus::Histogram,
    last: prometheus::Histogram,
}

impl FanoutCounters {
    fn new(metrics: &Metrics) -> FanoutCounters {
        let stage = |name: &str| metrics.fanout_stage.with_label_values(&[name]);
        FanoutCounters {
            datagrams: metrics.updates_sent.with_label_values(&["datagram"]),
            streams: metrics.updates_sent.with_label_values(&["stream"]),
            datagram_send: metrics.drops.with_label_values(&["datagram_send"]),
            stream_busy: metrics.drops.with_label_values(&["stream_busy"]),
            stream_superseded: metrics.drops.with_label_values(&["stream_superseded"]),
            picked: stage("picked"),
            split: stage("split"),
            coded: stage("coded"),
            first: stage("first"),
            last: stage("last"),
        }
    }
}

/// One client as the world's fan-out sees it.
struct Sink {
    conn: quinn::Connection,
    view: Arc<Mutex<ClientView>>,
    /// Locked for the whole of one delivery, so that two deliveries to the
    /// same client (the fan-out's and a catch-up after a stream arrived)
    /// never interleave.
    state: Mutex<SinkState>,
}

#[derive(Default)]
struct SinkState {
    /// Stream updates on their way, oldest first.
    in_flight: VecDeque<InFlight>,
    /// A tick was skipped because the pipeline was full: the newest goes as
    /// soon as a stream has arrived.
    waiting: bool,
    /// The session has ended: send nothing more.
    closed: bool,
}

/// Sinks per fan-out shard, at least: below that one thread does them all.
const MIN_SHARD: usize = 64;

/// The world's fan-out: on each new tick, the fan-out's threads (one per
/// core, [`crate::priority::Helpers`]) list and code the chunks the
/// clients' updates will need ([`ChunkCache::precode`]), then build and
/// hand to quinn every client's update, each thread for its shard of the
/// clients, rather than one task per client ([`fan_out_tick`]). Sending a
/// datagram never waits; a slow client's streams have their own tasks, and
/// while its pipeline is full its ticks are skipped. If the threads fall
/// behind, the loop skips to the newest tick.
async fn fanout_loop(shared: Arc<Shared>, world: Arc<World>) {
    let mut ticks = world.latest.subscribe();
    loop {
        if ticks.changed().await.is_err() {
            return;
        }
        let Some((tick, arrived)) = ticks.borrow_and_update().clone() else {
            continue;
        };
        // The whole tick on the fan-out's threads: the first lists the
        // chunks to code and hands the others their parts.
        let job = {
            let (shared, world) = (shared.clone(), world.clone());
            move || fan_out_tick(&shared, &world, tick, arrived)
        };
        if shared.helpers.run(0, job).await.is_err() {
            warn!("the fan-out failed (panicked) on a tick");
        }
    }
}

/// A tick's fan-out, on the first of the fan-out's threads: the chunks to
/// code in advance listed and then coded by every thread, then each
/// thread's shard of the clients served; then whatever the ring evicted is
/// freed.
fn fan_out_tick(shared: &Arc<Shared>, world: &Arc<World>, tick: Arc<TickState>, arrived: Instant) {
    shared
        .fanout
        .picked
        .observe(arrived.elapsed().as_secs_f64());
    let threads = shared.helpers.len();
    let sinks = world.sinks.lock().expect("not poisoned").clone();
    let shards = (sinks.len() / MIN_SHARD).clamp(1, threads);
    // The chunks to code, listed by every shard's thread for its clients
    // (each chunk listed once).
    let job = {
        let (world, sinks, tick) = (world.clone(), sinks.clone(), tick.clone());
        move |i| list_precode(&world, &sinks[part_range(sinks.len(), i, shards)], &tick)
    };
    let lists = shared.helpers.spread(shards, job).unwrap_or_else(|| {
        warn!(
            tick = tick.tick,
            "a fan-out thread failed (panicked) listing chunks; they are coded on first use"
        );
        Vec::new()
    });
    let precode = Arc::new(Precode::new(
        world.state.read().expect("not poisoned").layout(),
        lists,
    ));
    // Parts: one per shard, or one per thread when there is enough to code.
    let parts = if precode.len() >= 2 * MIN_PRECODE {
        threads.max(shards)
    } else {
        shards
    };
    let job = {
        let (shared, world, tick) = (shared.clone(), world.clone(), tick.clone());
        move |i| {
            let clients = if i < shards {
                &sinks[part_range(sinks.len(), i, shards)]
            } else {
                &[]
            };
            fan_out_part(&shared, &world, &precode, clients, &tick, arrived);
        }
    };
    if shared.helpers.spread(parts, job).is_none() {
        warn!(
            tick = tick.tick,
            "a fan-out thread failed (panicked) on a tick"
        );
    }
    let evicted = std::mem::take(&mut *world.evicted.lock().expect("not poisoned"));
    if let Some(newest) = evicted.iter().map(|t| t.tick).max() {
        world.cache.evict_before(newest + 1);
    }
}

/// The chunks the next updates of `sinks` need that no other thread
/// listed ([`ChunkCache::precode_part`]).
fn list_precode(
    world: &World,
    sinks: &[Arc<Sink>],
    tick: &Arc<TickState>,
) -> crate::fanout::PrecodeList {
    let state = world.state.read().expect("not poisoned");
    let needs = sinks.iter().filter_map(|sink| {
        sink.view
            .lock()
            .expect("not poisoned")
            .next_update(&state, tick)
    });
    world.cache.precode_part(tick, needs)
}

/// Chunks to code in advance below which one loop codes them alone.
const MIN_PRECODE: usize = 16;

/// One thread's part of a tick's fan-out: the chunks not yet claimed, then
/// its shard of the clients, `sinks` (empty for a thread that only codes).
fn fan_out_part(
    shared: &Arc<Shared>,
    world: &Arc<World>,
    precode: &Precode,
    sinks: &[Arc<Sink>],
    tick: &Arc<TickState>,
    arrived: Instant,
) {
    if !precode.is_empty() {
        let timer = CpuTimer::start();
        if precode.work(&world.cache) > 0 {
            let ns = timer.elapsed_ns();
            world.cache.add_encode_ns(ns);
            shared.metrics.build_seconds.inc_by(ns as f64 / 1e9);
            shared.fanout.coded.observe(arrived.elapsed().as_secs_f64());
        }
    }
    if !sinks.is_empty() {
        deliver_all(shared, world, sinks, tick, arrived);
    }
}

/// Sinks served under one read lock of the ring: their updates are built,
/// then handed to quinn.
const LOCK_BATCH: usize = 32;

/// [`deliver`] to each of `sinks`, counting in shard-local metrics (the
/// shared ones are written once per shard, not by both cores per update).
/// Updates are built a batch at a time, then sent, so that the building is
/// timed as a whole ([`CpuTimer`]).
fn deliver_all(
    shared: &Arc<Shared>,
    world: &Arc<World>,
    sinks: &[Arc<Sink>],
    tick: &Arc<TickState>,
    arrived: Instant,
) {
    let mut stats = ShardStats::new(shared);
    let mut built = Vec::with_capacity(LOCK_BATCH);
    let mut sent_any = false;
    for batch in sinks.chunks(LOCK_BATCH) {
        let state = world.state.read().expect("not poisoned");
        let timer = CpuTimer::start();
        for sink in batch {
            let mut st = sink.state.lock().expect("not poisoned");
            if let Some(update) = build(shared, world, &state, sink, &mut st, tick) {
                built.push((sink, st, update));
            }
        }
        stats.build_ns += timer.elapsed_ns();
        drop(state);
        for (sink, mut st, update) in built.drain(..) {
            send(shared, world, sink, &mut st, update, arrived, &mut stats);
            if !sent_any {
                sent_any = true;
                shared.fanout.first.observe(arrived.elapsed().as_secs_f64());
            }
        }
    }
    if sent_any {
        shared.fanout.last.observe(arrived.elapsed().as_secs_f64());
    }
    stats.flush(shared);
}

/// What [`deliver`] counts for every update, local to one loop.
struct ShardStats {
    datagrams: prometheus::local::LocalIntCounter,
    bytes: prometheus::local::LocalIntCounter,
    latency: prometheus::local::LocalHistogram,
    /// CPU spent building updates.
    build_ns: u64,
}

impl ShardStats {
    fn new(shared: &Shared) -> ShardStats {
        ShardStats {
            datagrams: shared.fanout.datagrams.local(),
            bytes: shared.metrics.bytes_sent.local(),
            latency: shared.metrics.fanout_latency.local(),
            build_ns: 0,
        }
    }

    fn flush(&mut self, shared: &Shared) {
        self.datagrams.flush();
        self.bytes.flush();
        self.latency.flush();
        if self.build_ns > 0 {
            shared
                .metrics
                .build_seconds
                .inc_by(std::mem::take(&mut self.build_ns) as f64 / 1e9);
        }
    }
}

/// [`deliver`] to one sink now (a new client, or one whose stream arrived),
/// taking the locks in the fan-out's order (ring, then sink).
fn deliver_one(
    shared: &Arc<Shared>,
    world: &Arc<World>,
    sink: &Arc<Sink>,
    tick: &Arc<TickState>,
    arrived: Instant,
) {
    let mut stats = ShardStats::new(shared);
    let state = world.state.read().expect("not poisoned");
    deliver(shared, world, &state, sink, tick, arrived, &mut stats);
    drop(state);
    stats.flush(shared);
}

/// Sends `sink` its update for `tick` (a datagram when it fits, otherwise a
/// stream), unless it already has it or its stream pipeline is full. Lock
/// order: the ring (`state`, held by the caller), the sink, its view.
fn deliver(
    shared: &Arc<Shared>,
    world: &Arc<World>,
    state: &WorldState,
    sink: &Arc<Sink>,
    tick: &Arc<TickState>,
    arrived: Instant,
    stats: &mut ShardStats,
) {
    let mut st = sink.state.lock().expect("not poisoned");
    let timer = CpuTimer::start();
    let update = build(shared, world, state, sink, &mut st, tick);
    stats.build_ns += timer.elapsed_ns();
    if let Some(update) = update {
        send(shared, world, sink, &mut st, update, arrived, stats);
    }
}

/// The first half of [`deliver`]: `sink`'s update for `tick`, unless it
/// already has it or its stream pipeline is full (`st` is the sink's
/// state, locked by the caller until the update is sent).
fn build(
    shared: &Shared,
    world: &World,
    state: &WorldState,
    sink: &Sink,
    st: &mut MutexGuard<'_, SinkState>,
    tick: &Arc<TickState>,
) -> Option<BuiltDatagram> {
    if st.closed {
        return None;
    }
    // Stream updates on their way: forget the delivered ones and reset those
    // older than a tick the client has acknowledged since (they are
    // superseded). When the pipeline is full, skip this tick; the newest
    // goes as soon as a stream has arrived.
    let counters = &shared.fanout;
    if !st.in_flight.is_empty() {
        let acked = sink.view.lock().expect("not poisoned").acked();
        st.in_flight.retain_mut(|stream| {
            if stream.cancel.is_closed() {
                return false;
            }
            if acked.is_some_and(|a| stream.tick < a) {
                if std::mem::replace(&mut stream.cancel, oneshot::channel().0)
                    .send(())
                    .is_ok()
                {
                    counters.stream_superseded.inc();
                }
                return false;
            }
            true
        });
        if st.in_flight.len() >= stream_depth(sink.conn.rtt(), world.info.tick_rate) {
            st.waiting = true;
            counters.stream_busy.inc();
            return None;
        }
    }
    st.waiting = false;
    let built = sink
        .view
        .lock()
        .expect("not poisoned")
        .build_datagram(state, tick, &world.cache);
    match built {
        None => None,
        Some(Err(e)) => {
            warn!(error = %e, "update does not encode");
            None
        }
        Some(Ok(built)) => Some(built),
    }
}

/// The second half of [`deliver`]: hands `built` to quinn, as a datagram
/// when it fits, otherwise on a stream of its own.
fn send(
    shared: &Arc<Shared>,
    world: &Arc<World>,
    sink: &Arc<Sink>,
    st: &mut MutexGuard<'_, SinkState>,
    built: BuiltDatagram,
    arrived: Instant,
    stats: &mut ShardStats,
) {
    let counters = &shared.fanout;
    let len = built.datagram.len();
    let fits = sink.conn.max_datagram_size().is_some_and(|max| len <= max);
    if fits {
        if sink.conn.send_datagram(built.datagram).is_ok() {
            stats.datagrams.inc();
            stats.bytes.inc_by(len as u64);
        } else {
            counters.datagram_send.inc();
        }
    } else {
        // The stream frame: varint(len) | the datagram's bytes.
        let mut frame = Vec::with_capacity(len + 8);
        crate::fanout::put_varint(&mut frame, len as u64);
        frame.extend_from_slice(&built.datagram);
        let (cancel, cancelled) = oneshot::channel();
        st.in_flight.push_back(InFlight {
            tick: built.tick,
            cancel,
        });
        counters.streams.inc();
        shared.metrics.bytes_sent.inc_by(frame.len() as u64);
        tokio::spawn(send_stream(
            sink.conn.clone(),
            Bytes::from(frame),
            cancelled,
            Some((shared.clone(), world.clone(), Arc::downgrade(sink))),
        ));
    }
    if built.keyframe {
        shared.metrics.keyframes.inc();
    }
    stats.latency.observe(arrived.elapsed().as_secs_f64());
}

/// After a stream update ended: if the client skipped ticks meanwhile, it
/// gets the newest now.
fn stream_ended(shared: &Arc<Shared>, world: &Arc<World>, sink: &std::sync::Weak<Sink>) {
    let Some(sink) = sink.upgrade() else {
        return;
    };
    if !sink.state.lock().expect("not poisoned").waiting {
        return;
    }
    let latest = world.latest.borrow().clone();
    if let Some((tick, arrived)) = latest {
        deliver_one(shared, world, &sink, &tick, arrived);
    }
}

/// Writes one update on its own stream, unless cancelled first: then the
/// stream is reset (dropping a quinn stream would finish it, and the client
/// would see a cut-off frame), and the client takes the newer update.
async fn send_stream(
    conn: quinn::Connection,
    bytes: Bytes,
    cancelled: oneshot::Receiver<()>,
    ended: Option<(Arc<Shared>, Arc<World>, std::sync::Weak<Sink>)>,
) {
    write_stream(conn, bytes, cancelled).await;
    if let Some((shared, world, sink)) = ended {
        stream_ended(&shared, &world, &sink);
    }
}

async fn write_stream(conn: quinn::Connection, bytes: Bytes, mut cancelled: oneshot::Receiver<()>) {
    let mut stream = tokio::select! {
        _ = &mut cancelled => return,
        opened = conn.open_uni() => match opened {
            Ok(stream) => stream,
            Err(e) => {
                debug!(error = %e, "cannot open an update stream");
                return;
            }
        },
    };
    let written = tokio::select! {
        _ = &mut cancelled => None,
        r = async {
            stream.write_all(&bytes).await?;
            stream.finish()?;
            // `write_all` returns once quinn has buffered the bytes, long
            // before they reach a client on a congested or lossy path: wait
            // until the client has acknowledged all of them, so that a newer
            // update can still reset this one instead of queueing behind it.
            stream.stopped().await?;
            Ok::<_, StreamError>(())
        } => Some(r),
    };
    match written {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            debug!(error = %e, "stream update not delivered");
            let _ = stream.reset(quinn::VarInt::from_u32(0));
        }
        None => {
            let _ = stream.reset(quinn::VarInt::from_u32(0));
        }
    }
}

/// Any failure of a stream write (quinn has a type for each step).
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Closed(#[from] quinn::ClosedStream),
    #[error(transparent)]
    Stopped(#[from] quinn::StoppedError),
}

/// Serves this relay's worlds to child relays (tiers).
struct TierWorlds(Arc<Shared>);

impl feed::Worlds for TierWorlds {
    fn open(
        &self,
        world: &str,
    ) -> Pin<Box<dyn Future<Output = Result<Source, (ErrorCode, String)>> + Send + '_>> {
        let world = world.to_string();
        Box::pin(async move {
            let handle = open_world(&self.0, &world).await?;
            Ok(Source {
                info: handle.info.clone(),
                ticks: handle.feed.subscribe(),
                // Child batches join this relay's own batch upstream.
                inputs: handle.child_inputs.clone(),
            })
        })
    }
}

/// The origin RTT of a world this relay serves, if subscribed (for probes).
pub async fn origin_rtt(handle: &RelayHandle, world: &str) -> Option<Duration> {
    let worlds = handle.shared.worlds.lock().await;
    worlds
        .get(world)
        .map(|w| Duration::from_micros(w.origin_rtt_us.load(Ordering::Relaxed)))
}

/// Whether the relay is draining.
pub fn is_draining(handle: &RelayHandle) -> bool {
    *handle.shared.draining.borrow()
}
