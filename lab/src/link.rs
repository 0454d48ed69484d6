//! A user-space UDP link emulator.
//!
//! A [`Link`] listens on one UDP address and forwards every datagram to
//! another, through two emulated directions: *up* (client to server) and
//! *down* (server to client). Each direction has its own [`Direction`]
//! conditions:
//!
//! - **loss**: each packet is dropped with probability `loss`;
//! - **rate**: a token bucket of `rate_kbps` (burst 10 ms of the rate, at
//!   least 1500 bytes) in front of a FIFO queue of at most
//!   [`RATE_QUEUE_BYTES`]; a packet that does not fit is dropped, as a
//!   router's tail drop would;
//! - **delay and jitter**: a packet leaving the rate limiter is due after
//!   `delay` plus a jitter drawn uniformly from `[0, jitter]`, but never
//!   before the packet ahead of it in the same direction: jitter is
//!   queueing, and queues are first in, first out. The delay is a floor:
//!   nothing arrives earlier, and scheduling can only add (about a
//!   millisecond, the timer's resolution);
//! - **reordering**: only a share `reorder` of packets, each held back an
//!   extra `max(delay, 10 ms)`, so the packets behind it overtake it.
//!   Jitter alone keeps order. (An emulator whose jitter reorders, as
//!   netem's does, swaps packets sent microseconds apart half the time; on
//!   real paths that is rare, and it costs QUIC a retransmission timeout
//!   whenever a client's first 1-RTT packet overtakes its handshake
//!   Finished, which servers drop.)
//!
//! Packets wait in a heap ordered by due time (ties in arrival order), and
//! one task per direction sends each when it is due. Without `reorder`,
//! order is kept.
//!
//! Each distinct client address gets its own upstream socket, as a NAT
//! would, so replies go back to the client that caused them, and many
//! clients can share one link (at most [`MAX_FLOWS`]; the least recently
//! active flow makes room for a new one).
//!
//! Randomness comes from a ChaCha8 generator per direction, seeded from
//! [`LinkConfig::seed`]: the same packets in the same order meet the same
//! fate. Every packet draws the same three numbers (loss, jitter, reorder)
//! whatever the conditions, so changing one condition does not reshuffle
//! the others.
//!
//! Every queue is bounded, and no input (any datagram up to 64 KiB, any
//! configuration value, NaN included) makes the emulator panic.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use statecast_lab::link::{Direction, Link, LinkConfig};
//!
//! let relay: std::net::SocketAddr = "127.0.0.1:4434".parse().unwrap();
//! let config = LinkConfig::symmetric(Direction::delayed(Duration::from_millis(40)));
//! let link = Link::start("127.0.0.1:0".parse().unwrap(), relay, config).await?;
//! // Clients connect to `link.local_addr()` and see a 80 ms RTT to the relay.
//! link.set(LinkConfig::symmetric(Direction { loss: 1.0, ..Direction::default() })); // cut
//! # link.stop().await;
//! # Ok(())
//! # }
//! ```

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bytes the rate limiter's FIFO queue holds at most, per direction; a
/// packet that would overflow it is dropped.
pub const RATE_QUEUE_BYTES: usize = 256 * 1024;

/// Bytes (payload plus [`PACKET_OVERHEAD`] each) the delay queue holds at
/// most, per direction; a packet that would overflow it is dropped. 32 MiB
/// is a quarter of a second at 1 Gbit/s.
pub const DELAY_QUEUE_BYTES: usize = 32 << 20;

/// Bytes each queued packet counts for besides its payload, so that a flood
/// of empty datagrams is bounded too.
pub const PACKET_OVERHEAD: usize = 64;

/// Client addresses (flows) a link serves at once. A new client beyond this
/// takes the place of the least recently active one.
pub const MAX_FLOWS: usize = 1024;

/// A flow with no packet in either direction for this long is closed when
/// room is needed.
pub const FLOW_IDLE: Duration = Duration::from_secs(120);

/// Longest delay or jitter honoured; larger values are clamped to it.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// Least extra hold of a packet chosen by [`Direction::reorder`].
pub const MIN_REORDER_HOLD: Duration = Duration::from_millis(10);

/// Largest datagram a link receives (larger ones cannot exist over IPv4 or
/// IPv6 without jumbograms).
const MAX_DATAGRAM: usize = 64 * 1024;

/// Kernel socket buffers the link asks for (best effort): bursts through a
/// link must not be dropped by the kernel before the emulator sees them.
const SOCKET_BUFFER: usize = 4 << 20;

/// Conditions of one direction of a link.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Direction {
    /// Fixed one-way delay: no packet arrives earlier than this after it was
    /// received (and after the rate limiter let it through).
    pub delay: Duration,
    /// Extra delay drawn uniformly from `[0, jitter]` per packet.
    pub jitter: Duration,
    /// Probability that a packet is dropped, `0.0..=1.0` (clamped; NaN is
    /// 0). `1.0` cuts the link.
    pub loss: f64,
    /// Share of packets held back an extra `max(delay, 10 ms)`, so that
    /// later packets overtake them, `0.0..=1.0` (clamped; NaN is 0).
    pub reorder: f64,
    /// Rate limit in kilobits (1000 bits) per second of UDP payload; `None`
    /// for no limit. `Some(0)` drops everything.
    pub rate_kbps: Option<u64>,
}

impl Direction {
    /// A direction with only a fixed delay.
    pub fn delayed(delay: Duration) -> Direction {
        Direction {
            delay,
            ..Direction::default()
        }
    }
}

/// Conditions of a whole link.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkConfig {
    /// Client to server (packets received on the listening address).
    pub up: Direction,
    /// Server to client (replies).
    pub down: Direction,
    /// Seed of the random draws. Read by [`Link::start`]; [`Link::set`]
    /// keeps the running generators.
    pub seed: u64,
}

impl LinkConfig {
    /// The same conditions in both directions, seed 0.
    pub fn symmetric(direction: Direction) -> LinkConfig {
        LinkConfig {
            up: direction.clone(),
            down: direction,
            seed: 0,
        }
    }
}

/// Counters of one direction since the link started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionStats {
    /// Packets that entered this direction.
    pub packets_in: u64,
    /// Payload bytes that entered this direction.
    pub bytes_in: u64,
    /// Packets sent on to their destination.
    pub forwarded: u64,
    /// Payload bytes sent on to their destination.
    pub bytes_forwarded: u64,
    /// Packets dropped by the `loss` draw.
    pub dropped_loss: u64,
    /// Packets dropped because a queue was full (the rate limiter's, the
    /// delay queue, or no upstream socket could be opened).
    pub dropped_queue: u64,
    /// Packets sent after a later packet of the same flow and direction.
    pub reordered: u64,
    /// Packets the operating system refused to send.
    pub send_errors: u64,
    /// Packets waiting in the delay queue right now.
    pub queued: u64,
}

/// Counters of a link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Client to server.
    pub up: DirectionStats,
    /// Server to client.
    pub down: DirectionStats,
    /// Client addresses with an open upstream socket.
    pub flows: u64,
}

/// A running link emulator. Dropping it stops it too; [`Link::stop`] also
/// waits until its sockets are closed.
pub struct Link {
    local: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Link {
    /// Listens on `listen` (for instance `127.0.0.1:0`) and forwards to
    /// `forward`. Each distinct source address gets its own upstream socket
    /// (NAT-like), so replies go back to the right client; many clients can
    /// share one link.
    ///
    /// Must be called inside a Tokio runtime.
    pub async fn start(
        listen: SocketAddr,
        forward: SocketAddr,
        config: LinkConfig,
    ) -> io::Result<Link> {
        let socket = Arc::new(bind_udp(listen)?);
        let local = socket.local_addr()?;
        let up_rng = {
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            rng.set_stream(0);
            rng
        };
        let down_rng = {
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            rng.set_stream(1);
            rng
        };
        let shared = Arc::new(Shared {
            up: Pipe::new(Dir::Up, config.up.clone(), up_rng),
            down: Pipe::new(Dir::Down, config.down.clone(), down_rng),
            flows: Mutex::new(HashMap::new()),
            forward,
            epoch: Instant::now(),
            seed: config.seed,
        });
        let tasks = vec![
            tokio::spawn(receive_clients(shared.clone(), socket.clone())),
            tokio::spawn(schedule(shared.clone(), Dir::Up, socket.clone())),
            tokio::spawn(schedule(shared.clone(), Dir::Down, socket)),
        ];
        tracing::debug!(%local, %forward, ?config, "link started");
        Ok(Link {
            local,
            shared,
            tasks,
        })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Changes the conditions live, for packets received from now on
    /// (packets already in flight keep their schedule). The seed is not
    /// read: the running generators go on.
    pub fn set(&self, config: LinkConfig) {
        self.shared.up.set(config.up);
        self.shared.down.set(config.down);
    }

    /// The conditions in force.
    pub fn config(&self) -> LinkConfig {
        LinkConfig {
            up: lock(&self.shared.up.state).config.clone(),
            down: lock(&self.shared.down.state).config.clone(),
            seed: self.shared.seed,
        }
    }

    /// Counters since the start.
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            up: self.shared.up.stats(),
            down: self.shared.down.stats(),
            flows: lock(&self.shared.flows).len() as u64,
        }
    }

    /// Stops forwarding, drops what is in flight, and returns once every
    /// task has ended and every socket is closed.
    pub async fn stop(mut self) {
        let mut handles = std::mem::take(&mut self.tasks);
        handles.extend(self.shared.close_flows());
        for handle in &handles {
            handle.abort();
        }
        for handle in handles {
            let _ = handle.await;
        }
        // Queued packets hold upstream sockets: free them now.
        self.shared.up.clear();
        self.shared.down.clear();
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("local", &self.local)
            .field("forward", &self.shared.forward)
            .field("config", &self.config())
            .finish_non_exhaustive()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for handle in self.tasks.drain(..) {
            handle.abort();
        }
        for handle in self.shared.close_flows() {
            handle.abort();
        }
        self.shared.up.clear();
        self.shared.down.clear();
    }
}

/// Locks a mutex, ignoring poisoning (the state stays consistent: every
/// critical section only does arithmetic and collection operations).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Binds a UDP socket with large kernel buffers (best effort).
fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up = 0,
    Down = 1,
}

#[derive(Debug)]
struct Shared {
    up: Pipe,
    down: Pipe,
    flows: Mutex<HashMap<SocketAddr, FlowEntry>>,
    forward: SocketAddr,
    epoch: Instant,
    seed: u64,
}

impl Shared {
    fn pipe(&self, dir: Dir) -> &Pipe {
        match dir {
            Dir::Up => &self.up,
            Dir::Down => &self.down,
        }
    }

    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Removes every flow and returns their tasks, to abort.
    fn close_flows(&self) -> Vec<JoinHandle<()>> {
        lock(&self.flows)
            .drain()
            .map(|(_, entry)| entry.task)
            .collect()
    }

    /// The flow of client `client`, opened if new. `None` when no upstream
    /// socket can be opened.
    fn flow(self: &Arc<Shared>, client: SocketAddr, now: Instant) -> Option<Arc<Flow>> {
        let now_ms = self.millis(now);
        let mut flows = lock(&self.flows);
        if let Some(entry) = flows.get(&client) {
            entry.flow.last_seen.store(now_ms, Ordering::Relaxed);
            return Some(entry.flow.clone());
        }
        if flows.len() >= MAX_FLOWS {
            let idle_ms = u64::try_from(FLOW_IDLE.as_millis()).unwrap_or(u64::MAX);
            flows.retain(|_, entry| {
                let idle =
                    now_ms.saturating_sub(entry.flow.last_seen.load(Ordering::Relaxed)) > idle_ms;
                if idle {
                    entry.task.abort();
                }
                !idle
            });
            if flows.len() >= MAX_FLOWS
                && let Some(oldest) = flows
                    .iter()
                    .min_by_key(|(_, entry)| entry.flow.last_seen.load(Ordering::Relaxed))
                    .map(|(addr, _)| *addr)
                && let Some(entry) = flows.remove(&oldest)
            {
                entry.task.abort();
                tracing::debug!(client = %oldest, "link: closed the least recently active flow to make room");
            }
        }
        let socket = match self.open_upstream() {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                tracing::warn!(%client, %error, "link: cannot open an upstream socket");
                return None;
            }
        };
        let flow = Arc::new(Flow {
            client,
            socket,
            seq: [AtomicU64::new(1), AtomicU64::new(1)],
            max_sent: [AtomicU64::new(0), AtomicU64::new(0)],
            last_seen: AtomicU64::new(now_ms),
        });
        let task = tokio::spawn(receive_server(self.clone(), flow.clone()));
        flows.insert(
            client,
            FlowEntry {
                flow: flow.clone(),
                task,
            },
        );
        Some(flow)
    }

    /// A socket connected to the forward address, bound to an ephemeral
    /// port of the same address family.
    fn open_upstream(&self) -> io::Result<UdpSocket> {
        let any = match self.forward.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let socket = Socket::new(
            Domain::for_address(self.forward),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        socket.set_nonblocking(true)?;
        socket.bind(&SocketAddr::new(any, 0).into())?;
        socket.connect(&self.forward.into())?;
        UdpSocket::from_std(socket.into())
    }
}

/// One client address and its upstream socket.
#[derive(Debug)]
struct Flow {
    client: SocketAddr,
    socket: Arc<UdpSocket>,
    /// Next sequence number per direction (arrival order).
    seq: [AtomicU64; 2],
    /// Highest sequence number sent per direction.
    max_sent: [AtomicU64; 2],
    /// Milliseconds since the link's epoch of the last packet either way.
    last_seen: AtomicU64,
}

#[derive(Debug)]
struct FlowEntry {
    flow: Arc<Flow>,
    task: JoinHandle<()>,
}

/// Conditions ready for use: clamped and converted.
#[derive(Debug, Clone, Copy)]
struct Params {
    delay: Duration,
    jitter: Duration,
    loss: f64,
    reorder: f64,
    /// Bytes per second; `None` for no limit.
    rate: Option<f64>,
}

impl Params {
    fn new(direction: &Direction) -> Params {
        let share = |p: f64| if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        Params {
            delay: direction.delay.min(MAX_DELAY),
            jitter: direction.jitter.min(MAX_DELAY),
            loss: share(direction.loss),
            reorder: share(direction.reorder),
            rate: direction.rate_kbps.map(|kbps| kbps as f64 * 125.0),
        }
    }
}

/// Token bucket with a FIFO queue behind it, computed analytically: tokens
/// go negative by the bytes queued, and a packet leaves when the tokens
/// have climbed back to zero.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn burst(rate: f64) -> f64 {
        (rate * 0.010).max(1500.0)
    }

    fn full(rate: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: Bucket::burst(rate),
            at: now,
        }
    }

    /// When a packet of `len` bytes arriving at `now` leaves the limiter,
    /// or `None` when the queue has no room for it.
    fn admit(&mut self, rate: f64, now: Instant, len: usize) -> Option<Instant> {
        if rate.is_nan() || rate <= 0.0 {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(Bucket::burst(rate));
        self.at = now;
        let after = self.tokens - len as f64;
        if -after > RATE_QUEUE_BYTES as f64 {
            return None;
        }
        self.tokens = after;
        if after >= 0.0 {
            return Some(now);
        }
        let wait = Duration::try_from_secs_f64(-after / rate).unwrap_or(MAX_DELAY);
        Some(later(now, wait))
    }
}

fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(MAX_DELAY))
        .unwrap_or(t)
}

/// A packet waiting in the delay queue.
#[derive(Debug)]
struct Queued {
    due: Instant,
    /// Arrival order in this direction, to keep ties in order.
    order: u64,
    /// Arrival order within the flow and direction.
    flow_seq: u64,
    flow: Arc<Flow>,
    data: Box<[u8]>,
}

impl Queued {
    fn cost(&self) -> usize {
        self.data.len() + PACKET_OVERHEAD
    }
}

impl PartialEq for Queued {
    fn eq(&self, other: &Queued) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Queued) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Queued) -> CmpOrdering {
        (self.due, self.order).cmp(&(other.due, other.order))
    }
}

#[derive(Debug)]
struct PipeState {
    config: Direction,
    params: Params,
    rng: ChaCha8Rng,
    bucket: Option<Bucket>,
    heap: BinaryHeap<Reverse<Queued>>,
    heap_bytes: usize,
    next_order: u64,
    /// When the last packet not held back for reordering is due: the next
    /// one is due no earlier (jitter keeps order).
    last_due: Option<Instant>,
}

#[derive(Debug, Default)]
struct Counters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    forwarded: AtomicU64,
    bytes_forwarded: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    reordered: AtomicU64,
    send_errors: AtomicU64,
}

/// One direction: conditions, random generator, queues, counters.
#[derive(Debug)]
struct Pipe {
    dir: Dir,
    state: Mutex<PipeState>,
    wake: Notify,
    counters: Counters,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Pipe {
    fn new(dir: Dir, config: Direction, rng: ChaCha8Rng) -> Pipe {
        let params = Params::new(&config);
        Pipe {
            dir,
            state: Mutex::new(PipeState {
                config,
                params,
                rng,
                bucket: None,
                heap: BinaryHeap::new(),
                heap_bytes: 0,
                next_order: 0,
                last_due: None,
            }),
            wake: Notify::new(),
            counters: Counters::default(),
        }
    }

    fn set(&self, config: Direction) {
        let mut state = lock(&self.state);
        state.params = Params::new(&config);
        state.config = config;
        // New conditions apply from the next packet on, even if it then
        // overtakes packets queued under the old ones.
        state.last_due = None;
        if state.params.rate.is_none() {
            state.bucket = None;
        }
    }

    fn clear(&self) {
        let mut state = lock(&self.state);
        state.heap.clear();
        state.heap_bytes = 0;
    }

    fn stats(&self) -> DirectionStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DirectionStats {
            packets_in: get(&c.packets_in),
            bytes_in: get(&c.bytes_in),
            forwarded: get(&c.forwarded),
            bytes_forwarded: get(&c.bytes_forwarded),
            dropped_loss: get(&c.dropped_loss),
            dropped_queue: get(&c.dropped_queue),
            reordered: get(&c.reordered),
            send_errors: get(&c.send_errors),
            queued: lock(&self.state).heap.len() as u64,
        }
    }

    /// Counts a packet that could not even be given a flow.
    fn refuse(&self, len: usize) {
        bump(&self.counters.packets_in, 1);
        bump(&self.counters.bytes_in, len as u64);
        bump(&self.counters.dropped_queue, 1);
    }

    /// Takes a packet received at `now` for `flow`: drops it, or schedules
    /// it.
    fn push(&self, flow: &Arc<Flow>, data: &[u8], now: Instant) {
        let c = &self.counters;
        bump(&c.packets_in, 1);
        bump(&c.bytes_in, data.len() as u64);
        let flow_seq = flow.seq[self.dir as usize].fetch_add(1, Ordering::Relaxed);
        let mut state = lock(&self.state);
        let params = state.params;
        // Always three draws per packet, whatever the conditions.
        let loss_draw: f64 = state.rng.random();
        let jitter_draw: f64 = state.rng.random();
        let reorder_draw: f64 = state.rng.random();
        if loss_draw < params.loss {
            bump(&c.dropped_loss, 1);
            return;
        }
        let cost = data.len() + PACKET_OVERHEAD;
        if state.heap_bytes.saturating_add(cost) > DELAY_QUEUE_BYTES {
            bump(&c.dropped_queue, 1);
            return;
        }
        let depart = match params.rate {
            None => now,
            Some(rate) => {
                let bucket = state.bucket.get_or_insert_with(|| Bucket::full(rate, now));
                match bucket.admit(rate, now, data.len()) {
                    Some(depart) => depart,
                    None => {
                        bump(&c.dropped_queue, 1);
                        return;
                    }
                }
            }
        };
        let extra = params.delay + params.jitter.mul_f64(jitter_draw);
        let due = if reorder_draw < params.reorder {
            later(depart, extra + params.delay.max(MIN_REORDER_HOLD))
        } else {
            let due = later(depart, extra).max(state.last_due.unwrap_or(depart));
            state.last_due = Some(due);
            due
        };
        let order = state.next_order;
        state.next_order += 1;
        state.heap_bytes += cost;
        state.heap.push(Reverse(Queued {
            due,
            order,
            flow_seq,
            flow: flow.clone(),
            data: data.into(),
        }));
        let first = state.heap.peek().is_some_and(|top| top.0.order == order);
        drop(state);
        if first {
            self.wake.notify_one();
        }
    }

    /// Moves the packets due at `now` into `batch`; returns when the next
    /// one is due.
    fn take_due(&self, now: Instant, batch: &mut Vec<Queued>) -> Option<Instant> {
        let mut state = lock(&self.state);
        while state.heap.peek().is_some_and(|top| top.0.due <= now) {
            if let Some(Reverse(packet)) = state.heap.pop() {
                state.heap_bytes = state.heap_bytes.saturating_sub(packet.cost());
                batch.push(packet);
            }
        }
        state.heap.peek().map(|top| top.0.due)
    }
}

/// Sends the packets of one direction when they are due.
async fn schedule(shared: Arc<Shared>, dir: Dir, listen: Arc<UdpSocket>) {
    let pipe = shared.pipe(dir);
    let mut batch = Vec::new();
    loop {
        let next = pipe.take_due(Instant::now(), &mut batch);
        for packet in batch.drain(..) {
            let flow = &packet.flow;
            let sent = match dir {
                Dir::Up => flow.socket.send(&packet.data).await,
                Dir::Down => listen.send_to(&packet.data, flow.client).await,
            };
            let c = &pipe.counters;
            match sent {
                Ok(_) => {
                    bump(&c.forwarded, 1);
                    bump(&c.bytes_forwarded, packet.data.len() as u64);
                    let max = &flow.max_sent[dir as usize];
                    if packet.flow_seq < max.load(Ordering::Relaxed) {
                        bump(&c.reordered, 1);
                    } else {
                        max.store(packet.flow_seq, Ordering::Relaxed);
                    }
                }
                Err(error) => {
                    bump(&c.send_errors, 1);
                    tracing::trace!(?dir, %error, "link: send failed");
                }
            }
        }
        match next {
            Some(due) => {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = pipe.wake.notified() => {}
                }
            }
            None => pipe.wake.notified().await,
        }
    }
}

/// Whether a receive error is one to shrug off at once (such as an ICMP
/// error about an earlier send) rather than one that calls for a pause
/// before trying again.
fn transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

async fn pause_after(error: &io::Error, what: &str) {
    if !transient(error) {
        tracing::debug!(%error, "link: {what} failed; retrying shortly");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Receives from clients on the listening socket.
async fn receive_clients(shared: Arc<Shared>, listen: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match listen.recv_from(&mut buf).await {
            Ok((len, client)) => {
                let now = Instant::now();
                let data = &buf[..len.min(buf.len())];
                match shared.flow(client, now) {
                    Some(flow) => shared.up.push(&flow, data, now),
                    None => shared.up.refuse(data.len()),
                }
            }
            Err(error) => pause_after(&error, "receiving from clients").await,
        }
    }
}

/// Receives replies for one flow from the forward address.
async fn receive_server(shared: Arc<Shared>, flow: Arc<Flow>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match flow.socket.recv(&mut buf).await {
            Ok(len) => {
                let now = Instant::now();
                flow.last_seen.store(shared.millis(now), Ordering::Relaxed);
                shared.down.push(&flow, &buf[..len.min(buf.len())], now);
            }
            Err(error) => pause_after(&error, "receiving from the server").await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_clamp_every_input() {
        let p = Params::new(&Direction {
            delay: Duration::MAX,
            jitter: Duration::MAX,
            loss: f64::NAN,
            reorder: 7.0,
            rate_kbps: Some(u64::MAX),
        });
        assert_eq!(p.delay, MAX_DELAY);
        assert_eq!(p.jitter, MAX_DELAY);
        assert_eq!(p.loss, 0.0);
        assert_eq!(p.reorder, 1.0);
        assert!(p.rate.is_some_and(|r| r.is_finite() && r > 0.0));
        let p = Params::new(&Direction {
            loss: -3.0,
            reorder: f64::NEG_INFINITY,
            ..Direction::default()
        });
        assert_eq!((p.loss, p.reorder), (0.0, 0.0));
    }

    #[test]
    fn bucket_paces_and_bounds_its_queue() {
        let now = Instant::now();
        let rate = 125_000.0; // 1 Mbit/s
        let mut bucket = Bucket::full(rate, now);
        // The burst (1500 bytes) passes at once.
        assert_eq!(bucket.admit(rate, now, 1250), Some(now));
        // Then each 1250 bytes takes 10 ms.
        let mut last = now;
        for _ in 0..10 {
            let depart = bucket.admit(rate, now, 1250).unwrap();
            assert!(depart > last);
            last = depart;
        }
        let expected = (10.0 * 1250.0 - 250.0) / rate;
        let got = last.duration_since(now).as_secs_f64();
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
        // Fill the queue: what does not fit is refused, and nothing
        // refused counts against it.
        let mut admitted = 0;
        let mut refused = 0;
        for _ in 0..1000 {
            match bucket.admit(rate, now, 1250) {
                Some(_) => admitted += 1,
                None => refused += 1,
            }
        }
        assert!(refused > 0);
        let queued = 10 * 1250 - 250 + admitted * 1250;
        assert!(queued <= RATE_QUEUE_BYTES && queued + 1250 > RATE_QUEUE_BYTES);
        // A second later the queue has drained by the rate.
        let later = now + Duration::from_secs(1);
        assert!(bucket.admit(rate, later, 1250).is_some());
        // Rate zero admits nothing.
        assert_eq!(Bucket::full(0.0, now).admit(0.0, now, 1), None);
    }

    #[test]
    fn queued_packets_order_by_due_then_arrival() {
        let now = Instant::now();
        let flow = Arc::new(Flow {
            client: "127.0.0.1:1".parse().unwrap(),
            socket: Arc::new({
                let std = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                std.set_nonblocking(true).unwrap();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let _guard = rt.enter();
                UdpSocket::from_std(std).unwrap()
            }),
            seq: [AtomicU64::new(1), AtomicU64::new(1)],
            max_sent: [AtomicU64::new(0), AtomicU64::new(0)],
            last_seen: AtomicU64::new(0),
        });
        let q = |due: Instant, order| Queued {
            due,
            order,
            flow_seq: order,
            flow: flow.clone(),
            data: Box::new([]),
        };
        let mut heap = BinaryHeap::new();
        heap.push(Reverse(q(now + Duration::from_millis(5), 0)));
        heap.push(Reverse(q(now, 2)));
        heap.push(Reverse(q(now, 1)));
        let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|r| r.0.order)).collect();
        assert_eq!(order, [1, 2, 0]);
    }
}
