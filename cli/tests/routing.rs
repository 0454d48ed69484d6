//! Latency-aware routing end to end: three emulated regions on loopback,
//! a real origin and three real relay processes, and clients
//! ([`client::roam::Roamer`]) that probe, pick, and fail over.
//!
//! Geography: regions eu-west, us-east and ap-southeast, one relay in each.
//! A client of region R reaches the relay of region S only through two
//! [`lab::link::Link`]s (one for QUIC, one for probes) with the RTT between
//! R and S (10 ms within a region, 80 eu-us, 160 eu-ap, 140 us-ap), 1 ms of
//! jitter and 1% loss each way. The relays reach the origin directly (they
//! sit next to it), so a client's best relay is the one of its region.
//!
//! - `kill -9` of a relay: its clients resume on the next best relay within
//!   1 s plus one RTT of the last update, from their last acknowledged tick
//!   (no keyframe), with every tick verified and no divergence; the other
//!   clients do not move.
//! - SIGTERM (drain) of a relay: its clients hear a goaway and move before
//!   it exits (make before break), with no gap in updates longer than two
//!   ticks and no keyframe.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use client::roam::{self, Move, MoveReason, RoamEvent, RoamStats, Roamer};
use client::select::Candidate;
use common::{Proc, Relay, origin, relay};
use lab::link::{Direction, Link, LinkConfig};
use proto::msg::Area;
use tokio::sync::watch;
use transport::Trust;

const REGIONS: [&str; 3] = ["eu-west", "us-east", "ap-southeast"];
/// Clients per region.
const PER_REGION: usize = 3;
/// Longest wait for any condition.
const DEADLINE: Duration = Duration::from_secs(30);
/// The plaza's tick period (20 Hz).
const TICK: Duration = Duration::from_millis(50);

/// RTT between two regions, in milliseconds.
fn rtt_ms(a: usize, b: usize) -> u64 {
    match (a.min(b), a.max(b)) {
        (x, y) if x == y => 10,
        (0, 1) => 80,
        (0, 2) => 160,
        _ => 140,
    }
}

fn link_config(rtt_ms: u64, seed: u64) -> LinkConfig {
    let direction = Direction {
        delay: Duration::from_millis(rtt_ms) / 2,
        jitter: Duration::from_millis(1),
        loss: 0.01,
        ..Direction::default()
    };
    LinkConfig {
        seed,
        ..LinkConfig::symmetric(direction)
    }
}

/// What each client's task counts while it runs.
#[derive(Default)]
struct Progress {
    applied: AtomicU64,
    moves: AtomicU64,
}

/// The whole network of one test.
struct Net {
    _origin: Proc,
    relays: Vec<Relay>,
    /// Per client region, per relay: the QUIC link and the probe link.
    _links: Vec<Link>,
    /// Per client region: the candidates as that region sees them.
    candidates: Vec<Vec<Candidate>>,
    /// QUIC link address -> relay index, per client region.
    relay_of: HashMap<SocketAddr, usize>,
}

async fn network(data: &Path) -> Net {
    let (origin, upstream, _admin) = origin(data);
    let relays: Vec<Relay> = REGIONS
        .iter()
        .map(|region| {
            relay(
                data,
                upstream,
                "127.0.0.1:0",
                &["--region", region, "--id", &format!("relay-{region}")],
            )
        })
        .collect();
    let mut links = Vec::new();
    let mut candidates = Vec::new();
    let mut relay_of = HashMap::new();
    for client_region in 0..REGIONS.len() {
        let mut list = Vec::new();
        for (r, relay) in relays.iter().enumerate() {
            let config = link_config(rtt_ms(client_region, r), (client_region * 10 + r) as u64);
            let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let quic = Link::start(any, relay.clients, config.clone())
                .await
                .unwrap();
            let probe = Link::start(any, relay.probe, config).await.unwrap();
            relay_of.insert(quic.local_addr(), r);
            list.push(Candidate::new(probe.local_addr(), quic.local_addr()));
            links.push(quic);
            links.push(probe);
        }
        candidates.push(list);
    }
    Net {
        _origin: origin,
        relays,
        _links: links,
        candidates,
        relay_of,
    }
}

/// A running client: its task gives back the roamer's counters and every
/// move it reported.
struct Bot {
    region: usize,
    progress: Arc<Progress>,
    task: tokio::task::JoinHandle<(RoamStats, Vec<Move>, u64)>,
}

/// Connects `PER_REGION` clients in each region and runs them until `stop`.
async fn start_bots(data: &Path, net: &Net, stop: &watch::Receiver<bool>) -> Vec<Bot> {
    let tls = Trust::from_flags(None, None, None, Some(data.to_path_buf()))
        .load()
        .unwrap();
    let mut bots = Vec::new();
    for (region, candidates) in net.candidates.iter().enumerate() {
        let endpoint = client::session::endpoint(&tls, "127.0.0.1:0".parse().unwrap()).unwrap();
        for i in 0..PER_REGION {
            let mut config = roam::Config::new("plaza");
            config.interest = Some(Area {
                x: 300.0 * i as f32 - 300.0,
                y: 200.0 * region as f32 - 200.0,
                radius: 200.0,
            });
            // Quick re-probing so failover lists are fresh; switching to a
            // better relay needs a 3 s hold, longer than these runs'
            // phases, and there is no better relay than the local one.
            config.select.reprobe_every = Some(Duration::from_secs(1));
            config.select.nonce_seed = (region * 100 + i) as u64 + 1;
            let roamer = Roamer::connect(&endpoint, candidates.clone(), config)
                .await
                .unwrap_or_else(|e| panic!("client {i} of {} cannot join: {e}", REGIONS[region]));
            let progress = Arc::new(Progress::default());
            // The first client of each region is impatient: it drops its
            // `next_event` call every 7 ms, in the middle of whatever the
            // roamer was doing (handshakes and moves included), which a
            // cancel-safe roamer survives.
            let impatient = i == 0;
            let task = tokio::spawn(run_bot(roamer, progress.clone(), stop.clone(), impatient));
            bots.push(Bot {
                region,
                progress,
                task,
            });
        }
    }
    bots
}

async fn run_bot(
    mut roamer: Roamer,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
    impatient: bool,
) -> (RoamStats, Vec<Move>, u64) {
    let mut moves = Vec::new();
    let mut divergences = 0;
    let patience = if impatient {
        Duration::from_millis(7)
    } else {
        DEADLINE
    };
    loop {
        tokio::select! {
            event = tokio::time::timeout(patience, roamer.next_event()) => match event {
                Err(_elapsed) => {}
                Ok(event) => match event {
                Ok(RoamEvent::Applied { .. }) => {
                    progress.applied.fetch_add(1, Ordering::Relaxed);
                    // Play: a small input now and then.
                    let _ = roamer.send_input(&[1, 2, 3]);
                }
                Ok(RoamEvent::Divergence { .. }) => divergences += 1,
                Ok(RoamEvent::Moved(m)) => {
                    progress.moves.fetch_add(1, Ordering::Relaxed);
                    moves.push(m);
                }
                Err(e) => panic!("a client failed: {e}"),
                },
            },
            _ = stop.changed() => break,
        }
    }
    let stats = roamer.stats();
    roamer.close().await;
    (stats, moves, divergences)
}

/// Waits until `done` holds, polling every 20 ms, at most [`DEADLINE`].
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every client applies `more` ticks beyond what it had applied.
async fn wait_ticks(bots: &[Bot], more: u64) {
    let base: Vec<u64> = bots
        .iter()
        .map(|b| b.progress.applied.load(Ordering::Relaxed))
        .collect();
    wait_until(&format!("every client to apply {more} more ticks"), || {
        bots.iter()
            .zip(&base)
            .all(|(b, base)| b.progress.applied.load(Ordering::Relaxed) >= base + more)
    })
    .await;
}

/// Every client of `region` moves at least once.
async fn wait_moved(bots: &[Bot], region: usize) {
    wait_until(&format!("the {} clients to move", REGIONS[region]), || {
        bots.iter()
            .filter(|b| b.region == region)
            .all(|b| b.progress.moves.load(Ordering::Relaxed) >= 1)
    })
    .await;
}

/// Stops the clients and collects their results, in order.
async fn finish(
    stop: watch::Sender<bool>,
    bots: Vec<Bot>,
) -> Vec<(usize, RoamStats, Vec<Move>, u64)> {
    stop.send_replace(true);
    let mut out = Vec::new();
    for bot in bots {
        let (stats, moves, divergences) = bot.task.await.expect("a client task panicked");
        out.push((bot.region, stats, moves, divergences));
    }
    out
}

/// Every client starts on the relay of its own region.
fn check_local_pick(net: &Net, bots: &[(usize, RoamStats, Vec<Move>, u64)]) {
    for (region, stats, moves, _) in bots {
        let first = moves
            .first()
            .map(|m| m.from_region.clone())
            .or_else(|| stats.region.clone());
        assert_eq!(
            first.as_deref(),
            Some(REGIONS[*region]),
            "a client of {} started elsewhere: {stats:#?}",
            REGIONS[*region]
        );
    }
    assert_eq!(net.relay_of.len(), REGIONS.len() * REGIONS.len());
}

/// No divergence, every applied tick hash checked.
fn check_verified(stats: &RoamStats, divergences: u64) {
    assert_eq!(divergences, 0, "{stats:#?}");
    assert_eq!(stats.session.divergences, 0, "{stats:#?}");
    assert_eq!(
        stats.session.hash_checked, stats.session.ticks_applied,
        "{stats:#?}"
    );
    assert!(stats.session.ticks_applied >= 40, "{stats:#?}");
}

/// Checks every client's results: all verified; the clients of `faulted`
/// moved exactly once, to the relay of `next_best` and without a keyframe,
/// the others not at all. Returns the moves of the faulted region.
fn check_moves(
    results: &[(usize, RoamStats, Vec<Move>, u64)],
    faulted: usize,
    next_best: usize,
) -> Vec<Move> {
    let mut faulted_moves = Vec::new();
    for (region, stats, moves, divergences) in results {
        check_verified(stats, *divergences);
        if *region != faulted {
            assert!(
                moves.is_empty(),
                "a client of {} moved: {moves:#?}",
                REGIONS[*region]
            );
            continue;
        }
        assert_eq!(moves.len(), 1, "{moves:#?}");
        let m = &moves[0];
        eprintln!(
            "{} -> {}: {}, gap {:.0} ms, keyframe {}, {} attempt(s)",
            m.from_region, m.to_region, m.reason, m.gap_ms, m.keyframe, m.attempts
        );
        assert_eq!(m.from_region, REGIONS[faulted], "{m:#?}");
        assert_eq!(m.to_region, REGIONS[next_best], "{m:#?}");
        assert!(!m.keyframe, "the move needed a keyframe: {m:#?}");
        assert_eq!(stats.resumed_without_keyframe, 1, "{stats:#?}");
        faulted_moves.push(m.clone());
    }
    faulted_moves
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_s_clients_resume_on_the_next_best_within_a_second() {
    let data = common::scratch("routing-kill");
    let net = network(&data).await;
    let (stop_tx, stop) = watch::channel(false);
    let bots = start_bots(&data, &net, &stop).await;
    wait_ticks(&bots, 20).await;

    // kill -9 the eu-west relay: no goodbye, its clients hear silence.
    let killed = 0;
    net.relays[killed].proc.signal("KILL");
    let killed_at = Instant::now();
    wait_moved(&bots, killed).await;
    let moved_after = killed_at.elapsed();
    wait_ticks(&bots, 20).await;
    let results = finish(stop_tx, bots).await;

    check_local_pick(&net, &results);
    let next_best = 1; // us-east: 80 ms from eu-west, ap-southeast is 160.
    let rtt = Duration::from_millis(rtt_ms(killed, next_best));
    for m in check_moves(&results, killed, next_best) {
        assert!(matches!(m.reason, MoveReason::Lost(_)), "{m:#?}");
        // The bound: 1 s plus one RTT from the last update on the
        // dead relay to the first on the next.
        let bound = Duration::from_secs(1) + rtt;
        assert!(
            m.gap_ms <= bound.as_secs_f64() * 1e3,
            "failover took {:.0} ms (bound {bound:?}): {m:#?}",
            m.gap_ms
        );
    }
    eprintln!("eu-west clients all moved {moved_after:?} after the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_relay_s_clients_move_before_it_exits_without_a_gap() {
    let data = common::scratch("routing-drain");
    let mut net = network(&data).await;
    let (stop_tx, stop) = watch::channel(false);
    let bots = start_bots(&data, &net, &stop).await;
    wait_ticks(&bots, 20).await;

    // SIGTERM the us-east relay: it sends goaway and waits for its clients.
    let drained = 1;
    net.relays[drained].proc.signal("TERM");
    wait_moved(&bots, drained).await;
    let (status, _) = net.relays[drained].proc.wait_exit(DEADLINE);
    let exited_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(status.success(), "the drained relay exited with {status}");
    wait_ticks(&bots, 20).await;
    let results = finish(stop_tx, bots).await;

    check_local_pick(&net, &results);
    let next_best = 0; // eu-west: 80 ms from us-east, ap-southeast is 140.
    for m in check_moves(&results, drained, next_best) {
        assert_eq!(m.reason, MoveReason::Goaway, "{m:#?}");
        assert!(
            m.at_unix_ms <= exited_unix_ms,
            "the client moved after the relay exited: {m:#?}"
        );
        // Make before break: the old relay delivers until the new one has
        // welcomed the client, so the gap is about one tick.
        assert!(
            m.gap_ms <= 2.0 * TICK.as_secs_f64() * 1e3,
            "a gap of {:.0} ms (more than two ticks) while moving: {m:#?}",
            m.gap_ms
        );
    }
}
