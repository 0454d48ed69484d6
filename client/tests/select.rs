//! The selector against simulated networks: relays with a base RTT, jitter,
//! loss, and changes over time, driven in the documented polling order with
//! simulated time (no sockets, no sleeping). Every run is seeded.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proto::msg::Pong;
use statecast_client::select::{Candidate, Config, Selector};

const MS: Duration = Duration::from_millis(1);

/// A deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One simulated relay. Times are since the start of the run.
#[derive(Clone, Debug)]
struct Relay {
    base: Duration,
    /// Extra delay, uniform in [0, jitter), and one ping in twenty gets a
    /// spike of up to five times that.
    jitter: Duration,
    loss: f64,
    origin_rtt_us: u32,
    load: u16,
    /// From this time on, the base RTT is the second value.
    change: Option<(Duration, Duration)>,
    /// From this time on, the relay answers nothing.
    dies_at: Option<Duration>,
    /// Never answers.
    silent: bool,
}

impl Relay {
    fn new(base_ms: u64) -> Relay {
        Relay {
            base: MS * base_ms as u32,
            jitter: Duration::ZERO,
            loss: 0.0,
            origin_rtt_us: 10_000,
            load: 100,
            change: None,
            dies_at: None,
            silent: false,
        }
    }

    fn jitter(mut self, ms: u64) -> Relay {
        self.jitter = MS * ms as u32;
        self
    }

    fn loss(mut self, loss: f64) -> Relay {
        self.loss = loss;
        self
    }

    /// The RTT of a ping sent at `t`, or `None` if it is lost.
    fn rtt(&self, t: Duration, rng: &mut Rng) -> Option<Duration> {
        if self.silent || self.dies_at.is_some_and(|d| t >= d) || rng.unit() < self.loss {
            return None;
        }
        let base = match self.change {
            Some((at, base)) if t >= at => base,
            _ => self.base,
        };
        let mut extra = self.jitter.mul_f64(rng.unit());
        if rng.unit() < 0.05 {
            extra += self.jitter.mul_f64(5.0 * rng.unit());
        }
        Some(base + extra)
    }
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, (i / 250) as u8, (i % 250 + 1) as u8], 4435))
}

/// A check run after each step: the selector, the time since the start, the
/// relays whose pongs it took.
type Check = Box<dyn FnMut(&Selector, Duration, &HashSet<SocketAddr>)>;

/// Pong arrivals, earliest first.
type Arrivals = BinaryHeap<Reverse<(Instant, u64, usize, u64, u64)>>;

/// Drives a selector against simulated relays.
struct Sim {
    sel: Selector,
    relays: Vec<Relay>,
    rng: Rng,
    t0: Instant,
    now: Instant,
    arrivals: Arrivals,
    seq: u64,
    /// Relays whose pongs the selector took.
    answered: HashSet<SocketAddr>,
    /// (time since start, new relay) for each switch.
    switches: Vec<(Duration, SocketAddr)>,
    /// Connect to the best relay once the first round is over, and follow
    /// switches.
    connect: bool,
    /// (round, destination) of every ping sent.
    pings: Vec<(u64, SocketAddr)>,
    /// Called after each step with the selector and the time since start.
    check: Option<Check>,
}

impl Sim {
    fn new(config: Config, relays: Vec<Relay>, seed: u64) -> Sim {
        let hints = vec![None; relays.len()];
        Sim::with_hints(config, relays, hints, seed)
    }

    fn with_hints(
        config: Config,
        relays: Vec<Relay>,
        hints: Vec<Option<Duration>>,
        seed: u64,
    ) -> Sim {
        let t0 = Instant::now();
        let candidates = (0..relays.len())
            .map(|i| Candidate {
                region: Some(format!("r{i}")),
                hint: hints[i],
                ..Candidate::new(addr(i), addr(i))
            })
            .collect();
        let config = Config {
            nonce_seed: seed,
            ..config
        };
        Sim {
            sel: Selector::new(config, candidates, t0),
            relays,
            rng: Rng(seed ^ 0xdead_beef),
            t0,
            now: t0,
            arrivals: BinaryHeap::new(),
            seq: 0,
            answered: HashSet::new(),
            switches: Vec::new(),
            connect: false,
            pings: Vec::new(),
            check: None,
        }
    }

    fn index(&self, a: SocketAddr) -> usize {
        (0..self.relays.len()).find(|&i| addr(i) == a).unwrap()
    }

    /// Runs until `end` (time since start), in the documented order.
    fn run_until(&mut self, end: Duration) {
        let end = self.t0 + end;
        // Bounded: each step handles a pong or a timer of the selector, and
        // both are finite per simulated second.
        for _ in 0..100_000_000u64 {
            let next_pong = self.arrivals.peek().map(|Reverse(a)| a.0);
            let next = [next_pong, self.sel.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let t = match next {
                Some(t) if t <= end => t,
                _ => {
                    self.now = end;
                    return;
                }
            };
            assert!(t >= self.now, "time goes forward");
            self.now = t;
            while self.arrivals.peek().is_some_and(|Reverse(a)| a.0 <= t) {
                let Reverse((_, _, relay, nonce, sent_us)) = self.arrivals.pop().unwrap();
                let r = &self.relays[relay];
                let pong = Pong {
                    nonce,
                    sent_us,
                    relay_id: format!("relay-{relay}"),
                    region: format!("r{relay}"),
                    load: r.load,
                    origin_rtt_us: r.origin_rtt_us,
                    coords: None,
                };
                if self.sel.handle_pong(addr(relay), &pong, t) {
                    self.answered.insert(addr(relay));
                }
            }
            self.sel.handle_timeout(t);
            while let Some((to, ping)) = self.sel.poll_transmit(t) {
                let i = self.index(to);
                self.pings.push((self.sel.rounds_completed(), to));
                if let Some(rtt) = self.relays[i].rtt(t - self.t0, &mut self.rng) {
                    self.seq += 1;
                    self.arrivals
                        .push(Reverse((t + rtt, self.seq, i, ping.nonce, ping.sent_us)));
                }
            }
            if self.connect {
                if self.sel.current().is_none() && self.sel.rounds_completed() >= 1 {
                    let best = self.sel.best();
                    self.sel.set_current(best);
                }
                if let Some(to) = self.sel.poll_switch(t) {
                    self.switches.push((t - self.t0, to));
                }
            }
            if let Some(check) = &mut self.check {
                check(&self.sel, t - self.t0, &self.answered);
            }
        }
        panic!("simulation did not reach its end");
    }
}

#[test]
fn picks_the_lowest_score_from_rtt_origin_and_load() {
    // r0: near but its origin is far; r1: the best sum; r2: near, close to
    // its origin, but loaded; r3: never answers.
    let mut relays = vec![
        Relay::new(10),
        Relay::new(25),
        Relay::new(12),
        Relay::new(1),
    ];
    relays[0].origin_rtt_us = 60_000;
    relays[1].origin_rtt_us = 20_000;
    relays[2].origin_rtt_us = 20_000;
    relays[2].load = 2000; // full: 40 ms + the full penalty
    relays[3].silent = true;
    let mut sim = Sim::new(Config::default(), relays, 1);
    sim.run_until(Duration::from_secs(2));
    assert_eq!(sim.sel.best(), Some(addr(1)));
    assert_eq!(
        sim.sel.failover_order(),
        vec![addr(1), addr(0), addr(2)],
        "answered only, by score"
    );
    let est = sim.sel.estimates();
    assert_eq!(est.len(), 4);
    let e1 = &est[1];
    assert_eq!(e1.relay_id.as_deref(), Some("relay-1"));
    assert_eq!(e1.region.as_deref(), Some("r1"));
    assert_eq!(e1.rtt_min, Some(MS * 25));
    assert_eq!(e1.loss, 0.0);
    assert_eq!(e1.origin_rtt, Some(MS * 20));
    let s = e1.score.unwrap();
    assert_eq!(s.total, s.rtt + s.origin + s.load + s.loss);
    assert_eq!(s.load, Duration::from_micros(20 * 100));
    assert!(est[2].score.unwrap().load > Duration::from_secs(1));
    // The silent one: probed, no estimate, never chosen.
    let e3 = &est[3];
    assert!(e3.probed && !e3.answered && !e3.alive);
    assert_eq!(e3.score, None);
    assert_eq!(e3.rtt_min, None);
    assert_eq!(e3.loss, 1.0);
    assert_eq!(e3.region.as_deref(), Some("r3"), "from the candidate");
}

#[test]
fn unknown_origin_rtt_counts_as_the_median_of_the_known_ones() {
    let mut relays = vec![
        Relay::new(20),
        Relay::new(20),
        Relay::new(20),
        Relay::new(20),
    ];
    relays[0].origin_rtt_us = 10_000;
    relays[1].origin_rtt_us = 30_000;
    relays[2].origin_rtt_us = 50_000;
    relays[3].origin_rtt_us = u32::MAX;
    let mut sim = Sim::new(Config::default(), relays, 2);
    sim.run_until(Duration::from_secs(2));
    let est = sim.sel.estimates();
    assert_eq!(est[3].origin_rtt, None);
    assert_eq!(est[3].score.unwrap().origin, MS * 30);
    assert_eq!(sim.sel.failover_order()[..2], [addr(0), addr(1)]);
}

#[test]
fn stray_late_and_forged_pongs_are_ignored() {
    let t0 = Instant::now();
    let a = addr(0);
    let config = Config {
        probes_per_round: 1,
        reprobe_every: None,
        ..Config::default()
    };
    let mut sel = Selector::new(config, vec![Candidate::new(a, a)], t0);
    let (to, ping) = sel.poll_transmit(t0).unwrap();
    assert_eq!(to, a);
    assert!(sel.poll_transmit(t0).is_none());
    let pong = |nonce, sent_us| Pong {
        nonce,
        sent_us,
        relay_id: "x".into(),
        region: "y".into(),
        load: 0,
        origin_rtt_us: 0,
        coords: None,
    };
    let t = t0 + MS * 5;
    // Wrong nonce, wrong echo, wrong source: ignored.
    assert!(!sel.handle_pong(a, &pong(ping.nonce ^ 1, ping.sent_us), t));
    assert!(!sel.handle_pong(a, &pong(ping.nonce, ping.sent_us + 1), t));
    assert!(!sel.handle_pong(addr(1), &pong(ping.nonce, ping.sent_us), t));
    assert_eq!(sel.best(), None);
    // The real one still counts, from the IPv4-mapped form of the address.
    let mapped = SocketAddr::new(
        match a.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().into(),
            v6 => v6,
        },
        a.port(),
    );
    assert!(sel.handle_pong(mapped, &pong(ping.nonce, ping.sent_us), t));
    assert_eq!(sel.best(), Some(a));
    assert_eq!(sel.estimates()[0].rtt_min, Some(MS * 5));
    // A duplicate is stray; the round is over and nothing else is planned.
    assert!(!sel.handle_pong(a, &pong(ping.nonce, ping.sent_us), t));
    assert_eq!(sel.stats().pongs_stray, 4);
    assert_eq!(sel.rounds_completed(), 1);
    assert_eq!(sel.poll_timeout(), None);
    assert!(!sel.set_current(Some(addr(9))), "not a candidate");
}

#[test]
fn a_late_pong_is_a_loss() {
    let t0 = Instant::now();
    let a = addr(0);
    let config = Config {
        probes_per_round: 1,
        reprobe_every: None,
        ..Config::default()
    };
    let mut sel = Selector::new(config, vec![Candidate::new(a, a)], t0);
    let (_, ping) = sel.poll_transmit(t0).unwrap();
    let deadline = sel.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + Duration::from_secs(1));
    sel.handle_timeout(deadline);
    let pong = Pong {
        nonce: ping.nonce,
        sent_us: ping.sent_us,
        relay_id: "x".into(),
        region: "y".into(),
        load: 0,
        origin_rtt_us: 0,
        coords: None,
    };
    assert!(!sel.handle_pong(a, &pong, deadline + MS));
    assert_eq!(sel.best(), None);
    assert_eq!(sel.estimates()[0].loss, 1.0);
    assert_eq!(sel.stats().pings_lost, 1);
}

/// Equal relays, heavy jitter with spikes, 2% loss: a naive "switch to the
/// lowest" flaps constantly; the selector must stay put.
fn flaps(config: Config, seed: u64, rounds: u64) -> usize {
    let relays = vec![
        Relay::new(40).jitter(20).loss(0.02),
        Relay::new(40).jitter(20).loss(0.02),
        Relay::new(40).jitter(20).loss(0.02),
    ];
    let every = config.reprobe_every.unwrap();
    let mut sim = Sim::new(config, relays, seed);
    sim.connect = true;
    sim.run_until(every * rounds as u32);
    assert!(sim.sel.rounds_completed() >= rounds - 1);
    sim.switches.len()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 6,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn equal_relays_under_jitter_do_not_flap(seed in any::<u64>()) {
        // 2000 rounds: close to three hours of simulated time.
        let switches = flaps(Config::default(), seed, 2000);
        prop_assert!(switches <= 2, "{switches} switches");
    }
}

#[test]
fn without_hysteresis_the_same_network_flaps() {
    // The control for the test above: it would catch a selector that
    // followed every fluctuation.
    let naive = Config {
        switch_margin: Duration::ZERO,
        switch_margin_ratio: 0.0,
        switch_hold: Duration::ZERO,
        ..Config::default()
    };
    let switches = flaps(naive, 7, 500);
    assert!(switches > 50, "only {switches} switches");
}

fn hold_config() -> Config {
    Config {
        reprobe_every: Some(Duration::from_secs(1)),
        ..Config::default()
    }
}

#[test]
fn a_clearly_better_relay_wins_after_the_hold_and_not_before() {
    // r1 drops from 60 to 30 ms at t = 60 s.
    let mut r1 = Relay::new(60).jitter(4);
    r1.change = Some((Duration::from_secs(60), MS * 30));
    let relays = vec![Relay::new(60).jitter(4), r1];
    let mut sim = Sim::new(hold_config(), relays, 3);
    sim.connect = true;
    sim.run_until(Duration::from_secs(1));
    // Pin the current relay to r0 whatever the first round said.
    sim.sel.set_current(Some(addr(0)));
    sim.run_until(Duration::from_secs(59));
    assert!(sim.switches.is_empty(), "{:?}", sim.switches);
    assert_eq!(sim.sel.pending_switch(), None);
    // Step until the challenger starts winning, recording when.
    let mut pending = None;
    let mut t = Duration::from_secs(59);
    while pending.is_none() && t < Duration::from_secs(70) {
        t += MS;
        sim.run_until(t);
        pending = sim.sel.pending_switch();
    }
    let (to, at) = pending.expect("r1 starts winning after its RTT drops");
    assert_eq!(to, addr(1));
    let hold = Config::default().switch_hold;
    // Not before the hold ends ...
    sim.run_until(at - sim.t0 - MS);
    assert!(sim.switches.is_empty(), "{:?}", sim.switches);
    // ... and right when it does.
    sim.run_until(at - sim.t0 + MS);
    assert_eq!(sim.switches, vec![(at - sim.t0, addr(1))]);
    assert!(at - sim.t0 >= Duration::from_secs(60) + hold);
    assert_eq!(sim.sel.current(), Some(addr(1)));
    sim.run_until(Duration::from_secs(200));
    assert_eq!(sim.switches.len(), 1);
}

#[test]
fn a_challenger_that_stops_winning_before_the_hold_is_not_taken() {
    // r1 drops to 30 ms at t = 60 s; r0 follows 1.5 s later (to 28 ms),
    // within the hold time.
    let mut r0 = Relay::new(60).jitter(4);
    r0.change = Some((Duration::from_millis(61_500), MS * 28));
    let mut r1 = Relay::new(60).jitter(4);
    r1.change = Some((Duration::from_secs(60), MS * 30));
    let mut sim = Sim::new(hold_config(), vec![r0, r1], 4);
    sim.connect = true;
    sim.run_until(Duration::from_secs(1));
    sim.sel.set_current(Some(addr(0)));
    let mut ever_pending = false;
    let mut t = Duration::from_secs(1);
    while t < Duration::from_secs(120) {
        t += MS * 10;
        sim.run_until(t);
        ever_pending |= sim.sel.pending_switch().is_some();
    }
    assert!(ever_pending, "r1 did win for a while");
    assert!(sim.switches.is_empty(), "{:?}", sim.switches);
}

#[test]
fn a_relay_better_by_less_than_the_margin_is_not_taken() {
    // 3 ms better: under max(5 ms, 10% of 60 ms) = 6 ms.
    let relays = vec![Relay::new(57), Relay::new(54)];
    let mut sim = Sim::new(hold_config(), relays, 5);
    sim.connect = true;
    sim.run_until(Duration::from_secs(1));
    sim.sel.set_current(Some(addr(0)));
    sim.run_until(Duration::from_secs(300));
    assert!(sim.switches.is_empty());
    assert_eq!(
        sim.sel.best(),
        Some(addr(1)),
        "it is better, just not enough"
    );
}

#[test]
fn loss_counts() {
    // Same RTT: the lossy one loses; 5 ms faster but 30% loss: loses too.
    let relays = vec![
        Relay::new(40).loss(0.3),
        Relay::new(40),
        Relay::new(35).loss(0.3),
    ];
    let mut sim = Sim::new(Config::default(), relays, 6);
    sim.connect = true;
    sim.run_until(Duration::from_secs(120));
    let est = sim.sel.estimates();
    assert!((0.15..0.45).contains(&est[0].loss), "{}", est[0].loss);
    assert_eq!(est[1].loss, 0.0);
    assert_eq!(sim.sel.best(), Some(addr(1)));
    assert_eq!(sim.sel.failover_order()[0], addr(1));
    assert!(est[2].score.unwrap().loss >= MS * 7);

    // A client that started on the lossy relay moves off it.
    let relays = vec![Relay::new(40).loss(0.3), Relay::new(40)];
    let mut sim = Sim::new(Config::default(), relays, 7);
    sim.run_until(Duration::from_secs(1));
    sim.sel.set_current(Some(addr(0)));
    sim.connect = true;
    sim.run_until(Duration::from_secs(300));
    assert_eq!(sim.sel.current(), Some(addr(1)));
    assert_eq!(sim.switches.len(), 1);
}

#[test]
fn a_relay_whose_pongs_stop_is_never_chosen_and_fails_over_last() {
    let mut r0 = Relay::new(20);
    r0.dies_at = Some(Duration::from_secs(30));
    let mut r1 = Relay::new(30);
    r1.dies_at = Some(Duration::from_secs(60));
    let relays = vec![r0, r1, Relay::new(40)];
    let mut sim = Sim::new(Config::default(), relays, 8);
    sim.connect = true;
    sim.run_until(Duration::from_secs(29));
    assert_eq!(sim.sel.current(), Some(addr(0)));
    assert_eq!(sim.sel.failover_order(), vec![addr(0), addr(1), addr(2)]);
    // The round after r0 dies (rounds start every 5 s; three lost pings
    // make it dead) is over by 37 s.
    sim.run_until(Duration::from_secs(37));
    assert_eq!(sim.sel.best(), Some(addr(1)));
    assert_eq!(sim.sel.failover_order(), vec![addr(1), addr(2), addr(0)]);
    let est = sim.sel.estimates();
    assert!(est[0].answered && !est[0].alive);
    // The client moved to r1 after the hold.
    assert_eq!(sim.sel.current(), Some(addr(1)));
    assert_eq!(sim.switches.len(), 1);
    let (at, _) = sim.switches[0];
    assert!(
        at >= Duration::from_secs(33) && at < Duration::from_secs(37),
        "{at:?}"
    );
    // Then r1 dies too: r2, the only live one, is chosen, and the dead
    // ones come last, the more recently dead one first.
    sim.run_until(Duration::from_secs(75));
    assert_eq!(sim.sel.best(), Some(addr(2)));
    assert_eq!(sim.sel.current(), Some(addr(2)));
    assert_eq!(sim.sel.failover_order()[0], addr(2));
    assert_eq!(
        sim.sel.failover_order()[1..]
            .iter()
            .collect::<BTreeSet<_>>(),
        [addr(0), addr(1)].iter().collect()
    );
}

#[test]
fn probing_is_bounded_to_max_probed_among_many_candidates() {
    // 150 relays; hints are the true base RTT, off by up to 20%.
    let mut rng = Rng(99);
    let bases: Vec<u64> = (0..150).map(|_| 10 + rng.next() % 190).collect();
    let relays: Vec<Relay> = bases.iter().map(|&b| Relay::new(b).jitter(3)).collect();
    let hints = bases
        .iter()
        .map(|&b| Some((MS * b as u32).mul_f64(0.8 + 0.4 * rng.unit())))
        .collect();
    let mut sim = Sim::with_hints(Config::default(), relays, hints, 10);
    sim.connect = true;
    sim.run_until(Duration::from_secs(100));
    let rounds = sim.sel.rounds_completed();
    assert!(rounds >= 19, "{rounds}");
    for round in 0..rounds {
        let to: BTreeSet<_> = sim
            .pings
            .iter()
            .filter(|(r, _)| *r == round)
            .map(|(_, a)| *a)
            .collect();
        assert!(
            !to.is_empty() && to.len() <= 8,
            "round {round}: {}",
            to.len()
        );
    }
    let ever: BTreeSet<_> = sim.pings.iter().map(|(_, a)| *a).collect();
    assert!(ever.len() <= 12, "{} relays probed", ever.len());
    // The choice is the best relay, or within the margin of it.
    let best = *bases.iter().min().unwrap();
    let chosen = bases[sim.index(sim.sel.best().unwrap())];
    assert!(
        chosen <= best + 5.max(best / 10),
        "chose {chosen} ms, best {best} ms"
    );
}

#[test]
fn a_published_origin_rtt_ranks_candidates_before_any_probe() {
    // a looks nearer (10 ms) but publishes 100 ms to the origin; b (30 ms)
    // publishes 0. One probed a round: a without origin hints, b with.
    let first = |origin_hints: bool| {
        let t0 = Instant::now();
        let mut a = Candidate::new(addr(0), addr(0));
        a.hint = Some(MS * 10);
        let mut b = Candidate::new(addr(1), addr(1));
        b.hint = Some(MS * 30);
        let config = Config {
            max_probed: 1,
            ..Config::default()
        };
        let mut sel = Selector::new(config, vec![a, b], t0);
        if origin_hints {
            assert!(sel.set_origin_hint(addr(0), Some(MS * 100)));
            assert!(sel.set_origin_hint(addr(1), Some(Duration::ZERO)));
        }
        assert!(!sel.set_origin_hint(addr(9), Some(MS)), "not a candidate");
        sel.poll_transmit(t0).map(|(to, _)| to)
    };
    assert_eq!(first(false), Some(addr(0)));
    assert_eq!(first(true), Some(addr(1)));
}

#[test]
fn dead_hinted_candidates_are_replaced_by_the_next_ones_at_once() {
    // 100 relays; the ten with the best hints never answer.
    let mut relays: Vec<Relay> = (0..100).map(|i| Relay::new(20 + i)).collect();
    for r in relays.iter_mut().take(10) {
        r.silent = true;
    }
    let hints = (0..100).map(|i| Some(MS * (20 + i))).collect();
    let mut sim = Sim::with_hints(Config::default(), relays, hints, 11);
    sim.run_until(Duration::from_secs(4));
    // Round 1: hints 0..8, all silent. Round 2 (at once): 8, 9 silent,
    // 10..16 answer. Well under the 5 s period.
    assert_eq!(sim.sel.best(), Some(addr(10)));
    assert!(sim.sel.rounds_completed() >= 2);
    for round in 0..sim.sel.rounds_completed() {
        let to: BTreeSet<_> = sim
            .pings
            .iter()
            .filter(|(r, _)| *r == round)
            .map(|(_, a)| *a)
            .collect();
        assert!(to.len() <= 8, "round {round}: {}", to.len());
    }
    let est = sim.sel.estimates();
    assert!(est[..10].iter().all(|e| !e.answered));
    assert!(est[30..].iter().all(|e| !e.probed), "probing stays local");
}

#[derive(Clone, Debug)]
struct Spec {
    base_ms: u64,
    jitter_ms: u64,
    loss: f64,
    silent: bool,
    dies_at_s: Option<u64>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        1u64..300,
        0u64..50,
        prop_oneof![Just(0.0), 0.0..0.5f64, Just(1.0)],
        any::<bool>(),
        proptest::option::of(0u64..60),
    )
        .prop_map(|(base_ms, jitter_ms, loss, silent, dies_at_s)| Spec {
            base_ms,
            jitter_ms,
            loss,
            silent,
            dies_at_s,
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Whatever the network does: best(), failover_order() and every switch
    /// name only relays that answered; best() never names a dead one; and
    /// failover_order() lists dead ones after live ones.
    #[test]
    fn never_picks_a_relay_that_has_not_answered(
        specs in proptest::collection::vec(spec(), 1..10),
        seed in any::<u64>(),
        max_probed in 1usize..6,
    ) {
        let relays: Vec<Relay> = specs
            .iter()
            .map(|s| {
                let mut r = Relay::new(s.base_ms).jitter(s.jitter_ms).loss(s.loss);
                r.silent = s.silent;
                r.dies_at = s.dies_at_s.map(Duration::from_secs);
                r
            })
            .collect();
        let config = Config { max_probed, ..Config::default() };
        let mut sim = Sim::new(config, relays, seed);
        sim.connect = true;
        let violations = std::rc::Rc::new(std::cell::RefCell::new(Vec::<String>::new()));
        let v = violations.clone();
        sim.check = Some(Box::new(move |sel: &Selector, t, answered| {
            let est = sel.estimates();
            let alive = |a: SocketAddr| est.iter().any(|e| e.addr == a && e.alive);
            if let Some(b) = sel.best() {
                if !answered.contains(&b) || !alive(b) {
                    v.borrow_mut().push(format!("{t:?}: best {b} not answered or dead"));
                }
            }
            let order = sel.failover_order();
            for a in &order {
                if !answered.contains(a) {
                    v.borrow_mut().push(format!("{t:?}: failover {a} never answered"));
                }
            }
            let live: Vec<bool> = order.iter().map(|a| alive(*a)).collect();
            if live.windows(2).any(|w| !w[0] && w[1]) {
                v.borrow_mut().push(format!("{t:?}: a dead relay before a live one"));
            }
            if let Some(c) = sel.current() {
                if !answered.contains(&c) {
                    v.borrow_mut().push(format!("{t:?}: current {c} never answered"));
                }
            }
        }));
        sim.run_until(Duration::from_secs(90));
        for (_, to) in &sim.switches {
            prop_assert!(sim.answered.contains(to));
        }
        let all_silent = specs.iter().all(|s| s.silent || s.loss >= 1.0 || s.dies_at_s == Some(0));
        if all_silent {
            prop_assert_eq!(sim.sel.best(), None);
        }
        prop_assert!(violations.borrow().is_empty(), "{:?}", &violations.borrow()[..violations.borrow().len().min(5)]);
    }
}
