//! A relay's own network coordinates (opt-in, [`Config::auto_coords`]):
//! the relay pings the probe address of every peer in its directory once a
//! [`Config::coords_interval_ms`] and runs Vivaldi
//! ([`client::coords::Vivaldi`]) on the RTTs and on the coordinates the
//! peers' pongs carry (or, for a peer that computes none, the coordinates
//! its directory entry names).
//!
//! Its pongs carry the coordinates from the start, as Vivaldi needs: peers
//! that all waited for a first estimate would never get one. Its directory
//! entry carries them once [`MIN_SAMPLES`] samples are in, so clients that
//! learn relays from a directory do not rank them by a fresh relay's guess.
//!
//! [`Config::auto_coords`]: crate::Config::auto_coords
//! [`Config::coords_interval_ms`]: crate::Config::coords_interval_ms

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client::coords::{Vivaldi, VivaldiConfig};
use proto::msg::{Coords, Message, Ping, VERSION};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::debug;

use crate::config::Peer;

/// Samples before the directory entry carries the coordinates.
pub const MIN_SAMPLES: u64 = 16;

/// A ping unanswered for this long is forgotten.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The error a peer is assumed to have (pongs do not carry it): the
/// largest, so the relay moves by its own confidence alone.
const PEER_ERROR: f64 = f64::INFINITY;

/// A relay's coordinate estimate, shared by the pinging task, the probe
/// responder and the directory.
#[derive(Debug)]
pub struct OwnCoords {
    node: Mutex<Vivaldi>,
}

impl OwnCoords {
    /// A fresh estimate; `id` seeds the direction it first moves in, so
    /// that relays starting together do not move alike.
    pub fn new(id: &str) -> OwnCoords {
        let seed = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        OwnCoords {
            node: Mutex::new(Vivaldi::new(VivaldiConfig {
                seed,
                ..VivaldiConfig::default()
            })),
        }
    }

    fn node(&self) -> std::sync::MutexGuard<'_, Vivaldi> {
        self.node.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current coordinates (what pongs carry).
    pub fn current(&self) -> Coords {
        self.node().coords()
    }

    /// The coordinates once [`MIN_SAMPLES`] samples are in.
    pub fn settled(&self) -> Option<Coords> {
        let node = self.node();
        (node.samples() >= MIN_SAMPLES).then(|| node.coords())
    }

    /// Samples taken so far.
    pub fn samples(&self) -> u64 {
        self.node().samples()
    }

    /// Takes one RTT sample to a peer at `peer`.
    fn observe(&self, rtt: Duration, peer: &Coords) -> bool {
        self.node()
            .observe(rtt.as_secs_f64() * 1000.0, peer, PEER_ERROR)
    }
}

struct InFlight {
    to: SocketAddr,
    sent: Instant,
    sent_us: u64,
    /// The coordinates the directory names for the peer, if any.
    listed: Option<Coords>,
}

/// Pings every peer of `peers` except `own_id` once an `every`, over
/// `socket`, feeding `own`, until `stop` resolves.
pub async fn run(
    socket: UdpSocket,
    own_id: String,
    mut peers: watch::Receiver<Vec<Peer>>,
    own: Arc<OwnCoords>,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let epoch = Instant::now();
    let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 2048];
    let mut out = Vec::new();
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => {
                let now = Instant::now();
                in_flight.retain(|_, f| now.duration_since(f.sent) < PING_TIMEOUT);
                let list: Vec<Peer> = peers.borrow_and_update().clone();
                for peer in list.iter().filter(|p| p.id != own_id) {
                    let Some(to) = resolve(&peer.probe_addr).await else {
                        continue;
                    };
                    let nonce = loop {
                        let n = rand::random::<u64>();
                        if !in_flight.contains_key(&n) {
                            break n;
                        }
                    };
                    let sent = Instant::now();
                    let sent_us = sent.duration_since(epoch).as_micros() as u64;
                    out.clear();
                    let ping = Message::Ping(Ping { version: VERSION, nonce, sent_us });
                    if ping.encode_datagram(&mut out).is_err() {
                        continue;
                    }
                    if let Err(e) = socket.send_to(&out, to).await {
                        debug!(peer = %peer.id, error = %e, "coordinates: ping not sent");
                        continue;
                    }
                    in_flight.insert(nonce, InFlight { to, sent, sent_us, listed: peer.coords });
                }
            }
            received = socket.recv_from(&mut buf) => {
                let Ok((len, from)) = received else {
                    // An ICMP error on some systems: do not spin.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let Ok(Message::Pong(pong)) = Message::decode_datagram(&buf[..len], VERSION) else {
                    continue;
                };
                let matches = in_flight
                    .get(&pong.nonce)
                    .is_some_and(|f| f.to == from && f.sent_us == pong.sent_us);
                if !matches {
                    continue;
                }
                let Some(flight) = in_flight.remove(&pong.nonce) else {
                    continue;
                };
                if let Some(at) = pong.coords.or(flight.listed) {
                    own.observe(flight.sent.elapsed(), &at);
                }
            }
        }
    }
}

/// A probe address: a literal one, or the first address a name resolves to.
async fn resolve(addr: &str) -> Option<SocketAddr> {
    if let Ok(a) = addr.parse() {
        return Some(a);
    }
    match tokio::net::lookup_host(addr).await {
        Ok(mut found) => found.next(),
        Err(e) => {
            debug!(addr, error = %e, "coordinates: peer not resolved");
            None
        }
    }
}
