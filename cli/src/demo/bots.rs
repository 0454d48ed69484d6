//! The demo's bot clients.
//!
//! A bot is what a player's client would be, minus the rendering: it
//! discovers the relays of its region in DNS, hands them to a
//! [`Roamer`] (which probes them, connects to the best and moves on its own
//! when its relay dies, drains or is clearly beaten), verifies every tick
//! against the origin's hash, and steers its avatar with a small input a
//! few times a second. Its area of interest is a fixed circle somewhere on
//! the plaza.
//!
//! All bots of a region share one quinn endpoint (one UDP socket carries
//! all their connections), so a few hundred bots cost a few sockets, not a
//! few hundred; each roamer has its own small probe socket. Each bot
//! publishes what it is doing in a [`BotNow`] (under a mutex nobody else
//! holds for long) that the view reads a few times a second, and reports
//! moves on a bounded channel.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client::discover::Discoverer;
use client::roam::{self, Move, RoamEvent, Roamer};
use proto::msg::Area;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How a bot is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for its turn to join (the ramp).
    Waiting,
    /// Looking relays up, probing, connecting.
    Joining,
    /// Connected and applying ticks.
    Playing,
    /// Gave up; why.
    Failed(String),
    /// Stopped at the end of the demo.
    Stopped,
}

/// What a bot publishes for the view.
#[derive(Clone, Debug)]
pub struct BotNow {
    /// What it is doing.
    pub phase: Phase,
    /// The relay's QUIC address (a link of this bot's region), if connected.
    pub relay: Option<SocketAddr>,
    /// QUIC's RTT to it, in microseconds.
    pub rtt_us: Option<u64>,
    /// Update bytes received, all relays together.
    pub bytes: u64,
    /// Ticks applied.
    pub ticks: u64,
    /// Ticks whose state did not match the origin's hash.
    pub divergences: u64,
    /// Inputs sent.
    pub inputs: u64,
    /// Moves so far.
    pub moves: u64,
    /// Moves that resumed with a delta (no keyframe).
    pub resumed_without_keyframe: u64,
    /// Latency from the origin's tick to its application: p50, ms.
    pub latency_p50_ms: Option<f64>,
    /// Milliseconds from the roamer's start to its first applied tick.
    pub first_update_ms: Option<f64>,
}

impl Default for BotNow {
    fn default() -> BotNow {
        BotNow::new()
    }
}

impl BotNow {
    /// A bot that has not started.
    pub fn new() -> BotNow {
        BotNow {
            phase: Phase::Waiting,
            relay: None,
            rtt_us: None,
            bytes: 0,
            ticks: 0,
            divergences: 0,
            inputs: 0,
            moves: 0,
            resumed_without_keyframe: 0,
            latency_p50_ms: None,
            first_update_ms: None,
        }
    }
}

/// Something a bot tells the view at once.
#[derive(Debug)]
pub enum BotEvent {
    /// It moved to another relay.
    Moved {
        /// The bot.
        bot: usize,
        /// The move.
        info: Move,
    },
    /// A tick did not match the origin's hash.
    Divergence {
        /// The bot.
        bot: usize,
        /// The tick.
        tick: u64,
    },
    /// It gave up.
    Failed {
        /// The bot.
        bot: usize,
        /// Why.
        error: String,
    },
}

/// One bot's fixed parameters.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Its number (all regions together).
    pub index: usize,
    /// Its region (index).
    pub region: usize,
    /// The domain it discovers relays under.
    pub domain: String,
    /// Its area of interest.
    pub area: Area,
    /// When it joins, from the start.
    pub join_at: Duration,
}

/// What every bot shares.
#[derive(Clone)]
pub struct Common {
    /// The world.
    pub world: String,
    /// The DNS server of the demo.
    pub dns: SocketAddr,
    /// Inputs per second.
    pub input_hz: f64,
    /// The roamer's stall timeout.
    pub stall_timeout: Duration,
    /// Where moves and failures go.
    pub events: mpsc::Sender<BotEvent>,
    /// Becomes true when the demo ends.
    pub stop: watch::Receiver<bool>,
    /// The demo's start.
    pub started: Instant,
}

/// How often a bot copies its counters for the view.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// Longest a discovery may take.
const DISCOVER_DEADLINE: Duration = Duration::from_secs(5);
/// Discovery attempts before a bot gives up.
const DISCOVER_ATTEMPTS: u32 = 3;
/// Longest wait for a bot's close to be sent.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// A point of the plaza for bot `i`: a deterministic scatter (splitmix64)
/// over the square `[margin, size - margin]`.
pub fn area_for(i: usize, seed: u64, size: f64, radius: f64) -> Area {
    let mut z = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut next = || {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = z;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((x ^ (x >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let margin = radius.min(size / 2.0);
    let span = (size - 2.0 * margin).max(0.0);
    Area {
        x: (margin + next() * span) as f32,
        y: (margin + next() * span) as f32,
        radius: radius as f32,
    }
}

/// The input of bot `i` at `t` seconds: walk (no run) in a direction that
/// turns slowly, as a player's stick would.
fn input(i: usize, t: f64) -> [u8; 3] {
    let angle = i as f64 * 2.399 + t * 0.25;
    let x = (angle.cos() * 100.0).round() as i8;
    let y = (angle.sin() * 100.0).round() as i8;
    [x as u8, y as u8, 0]
}

/// Runs one bot until the demo stops; returns what it ended with.
pub async fn run(
    spec: Spec,
    common: Common,
    endpoint: quinn::Endpoint,
    now: Arc<Mutex<BotNow>>,
) -> BotNow {
    let mut stop = common.stop.clone();
    let publish = |f: &dyn Fn(&mut BotNow)| {
        let mut n = now.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut n);
    };
    let stopped = |now: &Arc<Mutex<BotNow>>| {
        let mut n = now.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(n.phase, Phase::Failed(_)) {
            n.phase = Phase::Stopped;
        }
        n.clone()
    };
    tokio::select! {
        _ = tokio::time::sleep_until(common.started + spec.join_at) => {}
        _ = stop.wait_for(|s| *s) => return stopped(&now),
    }
    publish(&|n| n.phase = Phase::Joining);
    let roamer = tokio::select! {
        r = join(&spec, &common, &endpoint) => r,
        _ = stop.wait_for(|s| *s) => return stopped(&now),
    };
    let mut roamer = match roamer {
        Ok(r) => r,
        Err(error) => {
            publish(&|n| n.phase = Phase::Failed(error.clone()));
            let _ = common.events.try_send(BotEvent::Failed {
                bot: spec.index,
                error,
            });
            return stopped(&now);
        }
    };
    let refresh = |roamer: &Roamer, n: &mut BotNow| {
        let stats = roamer.stats();
        n.relay = roamer.relay().map(|r| r.addr);
        n.rtt_us = roamer.rtt().map(|d| d.as_micros() as u64);
        n.bytes = stats.session.bytes_received;
        n.ticks = stats.session.ticks_applied;
        n.divergences = stats.session.divergences;
        n.inputs = stats.session.inputs_sent;
        n.moves = stats.relay_switches;
        n.resumed_without_keyframe = stats.resumed_without_keyframe;
        n.latency_p50_ms = stats.session.latency_ms.p50_ms();
        n.first_update_ms = stats.first_update_ms;
    };
    {
        let mut n = now.lock().unwrap_or_else(|p| p.into_inner());
        n.phase = Phase::Playing;
        refresh(&roamer, &mut n);
    }
    // Inputs and publishing ride on the roamer's events rather than on
    // timers of their own: one wake-up per tick serves both, and between
    // relays there are no events and no session to send inputs on.
    // (`next_event` is cancel safe, so a timer in the `select!` would be
    // correct too, only more wake-ups.)
    let input_period =
        (common.input_hz > 0.0).then(|| Duration::from_secs_f64(1.0 / common.input_hz));
    let mut next_input = Instant::now()
        + input_period.map_or(Duration::ZERO, |p| {
            p.mul_f64((spec.index % 97) as f64 / 97.0)
        });
    let mut next_publish = Instant::now() + PUBLISH_EVERY;
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            event = roamer.next_event() => event,
        };
        match event {
            Ok(RoamEvent::Applied { .. }) => {}
            Ok(RoamEvent::Divergence {
                tick,
                expected,
                got,
            }) => {
                tracing::warn!(bot = spec.index, tick, %expected, %got, "a bot's state diverged from the origin's hash");
                let _ = common.events.try_send(BotEvent::Divergence {
                    bot: spec.index,
                    tick,
                });
            }
            Ok(RoamEvent::Moved(info)) => {
                {
                    let mut n = now.lock().unwrap_or_else(|p| p.into_inner());
                    refresh(&roamer, &mut n);
                }
                next_publish = Instant::now() + PUBLISH_EVERY;
                let _ = common.events.try_send(BotEvent::Moved {
                    bot: spec.index,
                    info,
                });
            }
            Err(e) => {
                let error = e.to_string();
                let mut n = now.lock().unwrap_or_else(|p| p.into_inner());
                refresh(&roamer, &mut n);
                n.relay = None;
                n.phase = Phase::Failed(error.clone());
                drop(n);
                let _ = common.events.try_send(BotEvent::Failed {
                    bot: spec.index,
                    error,
                });
                return stopped(&now);
            }
        }
        let t = Instant::now();
        if let Some(period) = input_period
            && t >= next_input
        {
            let secs = common.started.elapsed().as_secs_f64();
            if let Err(e) = roamer.send_input(&input(spec.index, secs)) {
                tracing::debug!(bot = spec.index, error = %e, "input not sent");
            }
            next_input = (next_input + period).max(t);
        }
        if t >= next_publish {
            let mut n = now.lock().unwrap_or_else(|p| p.into_inner());
            refresh(&roamer, &mut n);
            next_publish = t + PUBLISH_EVERY;
        }
    }
    {
        let mut n = now.lock().unwrap_or_else(|p| p.into_inner());
        refresh(&roamer, &mut n);
    }
    let _ = tokio::time::timeout(CLOSE_WAIT, roamer.close()).await;
    stopped(&now)
}

/// Discovers the region's relays and connects to the best.
async fn join(spec: &Spec, common: &Common, endpoint: &quinn::Endpoint) -> Result<Roamer, String> {
    let discoverer = Discoverer::with_server(common.dns, DISCOVER_DEADLINE);
    let mut last = String::new();
    let mut found = None;
    for attempt in 0..DISCOVER_ATTEMPTS {
        match discoverer.discover(&spec.domain).await {
            Ok(d) => {
                found = Some(d);
                break;
            }
            Err(e) => {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    }
    let discovery = found.ok_or_else(|| format!("discovery of {} failed: {last}", spec.domain))?;
    let candidates = discovery.relays.iter().map(|r| r.candidate(None)).collect();
    let mut config = roam::Config::new(common.world.clone());
    config.interest = Some(spec.area);
    // A few dozen ticks of baselines: enough for relays to code against
    // recent acks, little memory per bot.
    config.history = 32;
    config.stall_timeout = Some(common.stall_timeout);
    // Each bot its own nonces.
    config.select.nonce_seed ^= (spec.index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    Roamer::connect(endpoint, candidates, config)
        .await
        .map_err(|e| format!("no relay: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_stay_inside_the_world_and_differ() {
        let a: Vec<Area> = (0..100).map(|i| area_for(i, 1, 2000.0, 200.0)).collect();
        for area in &a {
            assert!((200.0..=1800.0).contains(&area.x), "{area:?}");
            assert!((200.0..=1800.0).contains(&area.y), "{area:?}");
            assert_eq!(area.radius, 200.0);
        }
        assert_ne!(a[0], a[1]);
        assert_eq!(area_for(7, 1, 2000.0, 200.0), a[7]);
    }

    #[test]
    fn inputs_are_plaza_inputs() {
        for i in 0..10 {
            let [x, y, flags] = input(i, i as f64);
            assert_eq!(flags, 0);
            let (x, y) = (x as i8 as f64, y as i8 as f64);
            assert!((x * x + y * y).sqrt() > 90.0);
        }
    }
}
