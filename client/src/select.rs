//! Route selection without I/O: which relay to use, from UDP probes.
//!
//! A [`Selector`] is the state machine behind "connect to the best relay":
//! it decides when to ping which candidate, turns the pongs (and the pongs
//! that never came) into estimates, scores the candidates, and tells a
//! connected client when another relay has become clearly better. It reads no
//! clock and touches no socket: time is always a `now` argument and datagrams
//! go in and out through methods, so the same code runs against real sockets
//! (`statecast probe`, the client) and against a simulated latency matrix in
//! the lab.
//!
//! ## Probing
//!
//! Probing goes in *rounds*. A round sends [`Config::probes_per_round`]
//! pings to each candidate of the *active set*, [`Config::probe_interval`]
//! apart, the candidates staggered evenly within each interval, so all are
//! measured in parallel without bursts (except the very first pings, which
//! go together: a client waits for them before it can pick). A ping unanswered after
//! [`Config::probe_timeout`] is lost. When every ping of a round is answered
//! or lost the round is complete; the next one starts
//! [`Config::reprobe_every`] after it began (or never, when that is `None`),
//! or at once when some candidate of the round answered nothing and
//! candidates never probed are left to take its place.
//!
//! The active set is at most [`Config::max_probed`] candidates (plus the
//! current relay, always): the most promising by expected score. For a
//! candidate that answered, that is its score; for one never probed, its
//! hint ([`Candidate::hint`], from DNS region hints or network coordinates)
//! plus its published origin RTT ([`Selector::set_origin_hint`]), else the
//! typical origin RTT of the relays measured so far; candidates
//! without a hint come next, in the order given; candidates whose pongs
//! stopped come last.
//!
//! A driver may steer this: [`Selector::set_hint`] changes a hint between
//! rounds, and [`Selector::probe_now`] runs one round on candidates it
//! chose instead of the active set. [`crate::coords::Guide`] uses both to
//! place the client in network coordinates with a few probes, then probe
//! the most promising relays among hundreds.
//!
//! ## Estimates and score
//!
//! Per candidate the selector keeps the last [`Config::rtt_window`] RTT
//! samples and the last [`Config::loss_window`] ping outcomes. The score is
//!
//! ```text
//! score = rtt (low percentile of recent samples, Config::rtt_percentile)
//!       + origin RTT (as the relay reports it; when unknown, the median of
//!         the known ones)
//!       + load (permille) x Config::load_penalty, + Config::full_penalty
//!         when the relay is full (load >= 1000)
//!       + loss (fraction of recent pings lost) x Config::loss_penalty
//! ```
//!
//! A low percentile rather than the mean, because queueing only ever adds
//! delay: the low end of the samples is the path, the rest is noise. A
//! candidate that has never answered has no score and is never chosen;
//! one whose last [`Config::dead_after`] pings were all lost is *dead*: not
//! chosen either, and last in the failover order.
//!
//! ## Hysteresis
//!
//! For a connected client ([`Selector::set_current`]), another relay
//! replaces the current one only when its score beats the current score by
//! at least `max(Config::switch_margin, Config::switch_margin_ratio x
//! current score)` continuously for [`Config::switch_hold`] and across
//! [`Config::switch_rounds`] probe rounds (so switching needs re-probing:
//! [`Config::reprobe_every`]). A dead current relay is beaten by any live
//! one, after the same hold: probes can be lost while the QUIC connection
//! still works, and the session, which sees the connection, is what fails
//! over at once.
//!
//! ## Polling order
//!
//! Like quinn-proto's `Connection`, the driver feeds inputs and drains
//! outputs, in this order:
//!
//! 1. for each datagram received, decode the pong and call
//!    [`handle_pong`](Selector::handle_pong);
//! 2. when the instant from [`poll_timeout`](Selector::poll_timeout) has
//!    passed, call [`handle_timeout`](Selector::handle_timeout);
//! 3. call [`poll_transmit`](Selector::poll_transmit) until it returns
//!    `None`, sending each ping as it comes (its RTT is measured from the
//!    `now` given here);
//! 4. for a connected client, call [`poll_switch`](Selector::poll_switch);
//! 5. wait for a datagram or until [`poll_timeout`](Selector::poll_timeout),
//!    whichever comes first, and start again.
//!
//! Candidates are named by their probe address ([`Candidate::addr`]);
//! [`Selector::candidate`] gives the address to connect to.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proto::msg::{Coords, Ping, Pong, VERSION};

/// A relay that might be chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Its UDP probe address; the candidate's name in the selector.
    pub addr: SocketAddr,
    /// Its QUIC address, to connect to.
    pub connect: SocketAddr,
    /// Its region, if discovery said.
    pub region: Option<String>,
    /// An estimate of the RTT to it before any probe (DNS region hints,
    /// network coordinates); decides which candidates are probed first.
    pub hint: Option<Duration>,
    /// Its network coordinates as published (DNS TXT `coords=`, a relay's
    /// directory), for [`crate::coords::Guide`]; its pongs' coordinates
    /// take precedence once they come.
    pub coords: Option<Coords>,
    /// Its RTT to the origin as published (DNS TXT `origin=`, a relay's
    /// directory): until it is probed, its expected score is its hint
    /// plus this (as [`Selector::set_origin_hint`] sets it).
    pub origin_rtt: Option<Duration>,
}

impl Candidate {
    /// A candidate with nothing known but its addresses.
    pub fn new(addr: SocketAddr, connect: SocketAddr) -> Candidate {
        Candidate {
            addr,
            connect,
            region: None,
            hint: None,
            coords: None,
            origin_rtt: None,
        }
    }
}

/// How a [`Selector`] probes and scores.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Pings per candidate per round.
    pub probes_per_round: u32,
    /// Time between two pings to the same candidate in a round.
    pub probe_interval: Duration,
    /// A ping unanswered for this long is lost.
    pub probe_timeout: Duration,
    /// Time from the start of a round to the start of the next (`None`:
    /// one round only, as `statecast probe` does).
    pub reprobe_every: Option<Duration>,
    /// Candidates probed per round at most (the current relay comes on top).
    pub max_probed: usize,
    /// RTT samples kept per candidate.
    pub rtt_window: usize,
    /// Ping outcomes kept per candidate for the loss rate.
    pub loss_window: usize,
    /// The percentile of recent RTT samples the score uses (0: minimum).
    pub rtt_percentile: f64,
    /// Score added per permille of load.
    pub load_penalty: Duration,
    /// Score added when a relay reports itself full (load >= 1000).
    pub full_penalty: Duration,
    /// Score added for a loss rate of 1 (scaled by the rate).
    pub loss_penalty: Duration,
    /// Consecutive lost pings after which a candidate counts as dead.
    pub dead_after: u32,
    /// The least a challenger must beat the current relay's score by.
    pub switch_margin: Duration,
    /// ... or this share of the current relay's score, if more.
    pub switch_margin_ratio: f64,
    /// How long a challenger must keep winning before a switch.
    pub switch_hold: Duration,
    /// Rounds that must complete while a challenger keeps winning before a
    /// switch (besides the hold time): one round's worth of lost or lucky
    /// samples is not enough evidence.
    pub switch_rounds: u32,
    /// Seeds the ping nonces. Nonces tie pongs to pings and let the selector
    /// drop stray or spoofed pongs; a driver facing a network should seed
    /// this randomly (it is not a cryptographic generator).
    pub nonce_seed: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            // Five pings give a usable low percentile in one round.
            probes_per_round: 5,
            // 25 ms: a round's pings span 100 ms, short enough to pick a
            // relay quickly, long enough that one queueing burst does not
            // hit all five.
            probe_interval: Duration::from_millis(25),
            // Beyond a second a relay is useless for real-time state.
            probe_timeout: Duration::from_secs(1),
            // A few packets every 5 s per candidate: negligible traffic, and
            // failover lists stay fresh.
            reprobe_every: Some(Duration::from_secs(5)),
            // Eight: what the routing target allows per client.
            max_probed: 8,
            // Eight rounds of samples. With 20, equal relays under 20 ms of
            // jitter drifted apart by the switch margin often enough to
            // cause a switch every few hundred rounds (tests/select.rs);
            // with 40, none in thousands. The price: a relay whose path got
            // slower shows it only once its fast samples age out (about 40 s
            // at the default period); a path that got faster shows at once.
            rtt_window: 40,
            // Forty rounds: telling 2% from 4% loss takes hundreds of
            // samples, and a noisier estimate flaps between equal relays.
            // Dead relays are noticed at once all the same (`dead_after`).
            loss_window: 200,
            // The 4th lowest of 40 samples (the lowest of the first round's
            // five): the path's RTT without trusting a few lucky samples.
            rtt_percentile: 0.1,
            // 20 us per permille: a relay at full load pays 20 ms, enough to
            // prefer an idle one nearby, not one across an ocean.
            load_penalty: Duration::from_micros(20),
            // A full relay refuses new clients: last resort only.
            full_penalty: Duration::from_secs(1),
            // 50 ms per unit of loss, about one tick at 20 Hz: each lost
            // update leaves the state a tick older until the next arrives.
            loss_penalty: Duration::from_millis(50),
            // Three lost pings in a row: a relay that stopped answering,
            // not one that lost a packet.
            dead_after: 3,
            // The issue's margin: max(5 ms, 10%), held for 3 s.
            switch_margin: Duration::from_millis(5),
            switch_margin_ratio: 0.10,
            switch_hold: Duration::from_secs(3),
            // The round that showed the challenger winning and the next.
            switch_rounds: 2,
            nonce_seed: 0x5eed_5eed_5eed_5eed,
        }
    }
}

/// The parts a score is the sum of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScoreParts {
    /// Client-relay RTT (the low percentile of recent samples).
    pub rtt: Duration,
    /// Relay-origin RTT (reported, or the median of the known ones).
    pub origin: Duration,
    /// Load penalty.
    pub load: Duration,
    /// Loss penalty.
    pub loss: Duration,
    /// The sum: the score.
    pub total: Duration,
}

/// What the selector knows about one candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    /// Probe address (the candidate's name).
    pub addr: SocketAddr,
    /// QUIC address.
    pub connect: SocketAddr,
    /// Region: as the relay reports it, else as discovery said.
    pub region: Option<String>,
    /// Relay id, once it answered.
    pub relay_id: Option<String>,
    /// Lowest recent RTT.
    pub rtt_min: Option<Duration>,
    /// Median recent RTT.
    pub rtt_median: Option<Duration>,
    /// 95th percentile of recent RTTs.
    pub rtt_p95: Option<Duration>,
    /// Mean difference between consecutive RTT samples (RFC 3550's idea).
    pub jitter: Option<Duration>,
    /// Share of recent pings lost (0 when none resolved yet).
    pub loss: f64,
    /// Pings resolved (answered or lost) in the loss window.
    pub resolved: u32,
    /// Pongs in the loss window.
    pub received: u32,
    /// The relay's RTT to its origin, as it reports it (`None`: unknown).
    pub origin_rtt: Option<Duration>,
    /// The relay's load in permille, as it reports it.
    pub load: Option<u16>,
    /// The relay's network coordinates, as it reports them.
    pub coords: Option<Coords>,
    /// Score and its parts (`None` until it answers).
    pub score: Option<ScoreParts>,
    /// Whether it ever answered.
    pub answered: bool,
    /// Answered, and its last [`Config::dead_after`] pings were not all
    /// lost: it may be chosen.
    pub alive: bool,
    /// Whether it was ever pinged.
    pub probed: bool,
}

/// Counters over a selector's life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Pings handed out by [`Selector::poll_transmit`].
    pub pings_sent: u64,
    /// Pongs that matched a ping in flight.
    pub pongs_matched: u64,
    /// Pongs that matched nothing (late, duplicated, wrong source, forged).
    pub pongs_stray: u64,
    /// Pings that timed out.
    pub pings_lost: u64,
    /// Rounds completed.
    pub rounds: u64,
    /// Switches [`Selector::poll_switch`] returned.
    pub switches: u64,
}

/// What the last pong of a candidate said.
#[derive(Clone, Debug)]
struct Reported {
    relay_id: String,
    region: String,
    load: u16,
    origin_rtt: Option<Duration>,
    coords: Option<Coords>,
}

#[derive(Debug)]
struct Slot {
    candidate: Candidate,
    /// Recent RTT samples, oldest first.
    rtts: VecDeque<Duration>,
    /// Recent outcomes (answered or lost), oldest first.
    outcomes: VecDeque<bool>,
    consecutive_lost: u32,
    answered: bool,
    probed: bool,
    reported: Option<Reported>,
    /// Pongs from this candidate in the current round.
    round_answers: u32,
    /// Its RTT to the origin as published before any probe
    /// ([`Selector::set_origin_hint`]).
    origin_hint: Option<Duration>,
}

impl Slot {
    fn dead(&self, dead_after: u32) -> bool {
        self.consecutive_lost >= dead_after.max(1)
    }

    fn alive(&self, dead_after: u32) -> bool {
        self.answered && !self.rtts.is_empty() && !self.dead(dead_after)
    }

    fn loss(&self) -> f64 {
        if self.outcomes.is_empty() {
            return 0.0;
        }
        let lost = self.outcomes.iter().filter(|ok| !**ok).count();
        lost as f64 / self.outcomes.len() as f64
    }
}

#[derive(Debug)]
struct InFlight {
    slot: usize,
    sent: Instant,
    sent_us: u64,
}

#[derive(Debug)]
struct Round {
    start: Instant,
    /// Pings still to send: when, to which slot. Sorted by time.
    schedule: VecDeque<(Instant, usize)>,
    /// Slots of this round.
    active: Vec<usize>,
    /// Started by [`Selector::probe_now`]: the caller chose its candidates,
    /// so candidates that answer nothing are not replaced at once.
    manual: bool,
}

/// Chooses relays from probe results; see the [module](self) documentation
/// for the model and the order in which to call it.
#[derive(Debug)]
pub struct Selector {
    config: Config,
    slots: Vec<Slot>,
    by_addr: HashMap<SocketAddr, usize>,
    /// `sent_us` in pings counts from here.
    epoch: Instant,
    round: Option<Round>,
    next_round: Option<Instant>,
    in_flight: HashMap<u64, InFlight>,
    rng: u64,
    current: Option<usize>,
    /// Since when some candidate has beaten the current one by the margin,
    /// and the rounds completed then.
    better_since: Option<(Instant, u64)>,
    /// Every slot's score, kept up to date after each change.
    scores: Vec<Option<ScoreParts>>,
    stats: Stats,
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    debug_assert!(!sorted.is_empty());
    let rank = (p.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The same address whether it arrived as IPv4 or IPv4-mapped IPv6: how
/// the selector names candidates and matches pongs.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The address to send to from a dual-stack IPv6 socket: IPv4 addresses
/// as IPv4-mapped IPv6.
pub fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), addr.port()),
        std::net::IpAddr::V6(_) => addr,
    }
}

impl Selector {
    /// A selector for `candidates` (duplicates by probe address are
    /// dropped), whose first round starts at `now`.
    pub fn new(config: Config, candidates: Vec<Candidate>, now: Instant) -> Selector {
        let rng = config.nonce_seed;
        let mut selector = Selector {
            config,
            slots: Vec::with_capacity(candidates.len()),
            by_addr: HashMap::with_capacity(candidates.len()),
            epoch: now,
            round: None,
            next_round: Some(now),
            in_flight: HashMap::new(),
            rng,
            current: None,
            better_since: None,
            scores: Vec::with_capacity(candidates.len()),
            stats: Stats::default(),
        };
        for candidate in candidates {
            selector.add_candidate(candidate);
        }
        selector
    }

    /// Adds a candidate (one a relay's directory named, say); it takes part
    /// from the next probe round on. Returns `false`, and changes nothing,
    /// when a candidate with that probe address is known already.
    pub fn add_candidate(&mut self, mut candidate: Candidate) -> bool {
        candidate.addr = canonical(candidate.addr);
        if self.by_addr.contains_key(&candidate.addr) {
            return false;
        }
        self.by_addr.insert(candidate.addr, self.slots.len());
        let origin_hint = candidate.origin_rtt;
        self.slots.push(Slot {
            candidate,
            rtts: VecDeque::new(),
            outcomes: VecDeque::new(),
            consecutive_lost: 0,
            answered: false,
            probed: false,
            reported: None,
            round_answers: 0,
            origin_hint,
        });
        self.scores.push(None);
        true
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The candidate probed at `addr`.
    pub fn candidate(&self, addr: SocketAddr) -> Option<&Candidate> {
        self.by_addr
            .get(&canonical(addr))
            .map(|&i| &self.slots[i].candidate)
    }

    /// Every candidate, in the order given.
    pub fn candidates(&self) -> impl Iterator<Item = &Candidate> {
        self.slots.iter().map(|s| &s.candidate)
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Rounds completed so far.
    pub fn rounds_completed(&self) -> u64 {
        self.stats.rounds
    }

    /// Whether a round is in progress: pings still to send or in flight.
    pub fn probing(&self) -> bool {
        self.round.is_some()
    }

    /// Replaces the hint of the candidate probed at `addr` (see
    /// [`Candidate::hint`]); it counts from the next round on. Returns
    /// `false`, and changes nothing, for an address that is not a
    /// candidate. A driver that learns more about the network between
    /// rounds (network coordinates: [`crate::coords`]) re-hints with this.
    pub fn set_hint(&mut self, addr: SocketAddr, hint: Option<Duration>) -> bool {
        match self.by_addr.get(&canonical(addr)) {
            Some(&i) => {
                self.slots[i].candidate.hint = hint;
                true
            }
            None => false,
        }
    }

    /// Sets the RTT to the origin that the candidate probed at `addr`
    /// publishes (DNS TXT `origin=MS`, a directory): until it answers, its
    /// expected score in the active set is its hint plus this instead of
    /// the typical origin RTT of the relays measured so far. Once it
    /// answers, what its pongs report counts. Returns `false`, and changes
    /// nothing, for an address that is not a candidate.
    pub fn set_origin_hint(&mut self, addr: SocketAddr, origin_rtt: Option<Duration>) -> bool {
        match self.by_addr.get(&canonical(addr)) {
            Some(&i) => {
                self.slots[i].origin_hint = origin_rtt;
                true
            }
            None => false,
        }
    }

    /// Starts a round at `now` on exactly the candidates at `addrs`
    /// (unknown addresses and duplicates skipped; the current relay is not
    /// added), instead of the active set, and returns how many it probes.
    /// Does nothing, and returns 0, while a round is in progress or when no
    /// address is a candidate.
    ///
    /// The round runs like any other ([`Config::probes_per_round`] staggered
    /// pings each) and counts in [`rounds_completed`](Self::rounds_completed);
    /// when it completes, the next regular round is due
    /// [`Config::reprobe_every`] after it began. Candidates of the round
    /// that answer nothing are not replaced at once: the caller chose them,
    /// and decides what to probe next. This is how a driver with its own
    /// plan (probe far-apart relays to place itself in network
    /// coordinates, then the most promising few; see [`crate::coords`])
    /// keeps the number of relays probed within its budget.
    pub fn probe_now(&mut self, addrs: &[SocketAddr], now: Instant) -> usize {
        if self.round.is_some() {
            return 0;
        }
        let mut active: Vec<usize> = Vec::with_capacity(addrs.len());
        for addr in addrs {
            if let Some(&i) = self.by_addr.get(&canonical(*addr))
                && !active.contains(&i)
            {
                active.push(i);
            }
        }
        let n = active.len();
        if n > 0 {
            self.next_round = None;
            self.begin_round(now, active, true);
        }
        n
    }

    /// The next ping to send at `now`, if one is due: where to, and what.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Ping)> {
        self.advance(now);
        let round = self.round.as_mut()?;
        let &(at, slot) = round.schedule.front()?;
        if at > now {
            return None;
        }
        round.schedule.pop_front();
        let nonce = loop {
            let n = splitmix64(&mut self.rng);
            if !self.in_flight.contains_key(&n) {
                break n;
            }
        };
        let sent_us = now.saturating_duration_since(self.epoch).as_micros() as u64;
        self.in_flight.insert(
            nonce,
            InFlight {
                slot,
                sent: now,
                sent_us,
            },
        );
        self.slots[slot].probed = true;
        self.stats.pings_sent += 1;
        let ping = Ping {
            version: VERSION,
            nonce,
            sent_us,
        };
        Some((self.slots[slot].candidate.addr, ping))
    }

    /// Takes a pong that arrived from `from` at `now`. Returns whether it
    /// answered a ping in flight; anything else (late, duplicated, from
    /// another address than the ping went to, forged) is ignored.
    pub fn handle_pong(&mut self, from: SocketAddr, pong: &Pong, now: Instant) -> bool {
        let from = canonical(from);
        let matches = self.in_flight.get(&pong.nonce).is_some_and(|f| {
            self.slots[f.slot].candidate.addr == from && f.sent_us == pong.sent_us
        });
        if !matches {
            self.stats.pongs_stray += 1;
            return false;
        }
        let flight = self.in_flight.remove(&pong.nonce).expect("checked above");
        self.stats.pongs_matched += 1;
        let rtt = now.saturating_duration_since(flight.sent);
        let (rtt_window, loss_window) = (self.config.rtt_window, self.config.loss_window);
        let slot = &mut self.slots[flight.slot];
        slot.rtts.push_back(rtt);
        while slot.rtts.len() > rtt_window.max(1) {
            slot.rtts.pop_front();
        }
        push_outcome(&mut slot.outcomes, true, loss_window);
        slot.consecutive_lost = 0;
        slot.answered = true;
        slot.round_answers += 1;
        slot.reported = Some(Reported {
            relay_id: pong.relay_id.clone(),
            region: pong.region.clone(),
            load: pong.load,
            origin_rtt: (pong.origin_rtt_us != u32::MAX)
                .then(|| Duration::from_micros(pong.origin_rtt_us.into())),
            coords: pong.coords,
        });
        self.refresh_scores();
        self.advance(now);
        true
    }

    /// Expires pings unanswered for [`Config::probe_timeout`], completes
    /// rounds and starts due ones.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
    }

    /// When [`handle_timeout`](Selector::handle_timeout) (or
    /// [`poll_transmit`](Selector::poll_transmit), or
    /// [`poll_switch`](Selector::poll_switch)) next has something to do;
    /// `None` when nothing is planned.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timeout = self.config.probe_timeout;
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(round) = &self.round {
            if let Some(&(at, _)) = round.schedule.front() {
                consider(at);
            }
        } else if let Some(at) = self.next_round {
            consider(at);
        }
        if let Some(sent) = self.in_flight.values().map(|f| f.sent).min() {
            consider(sent + timeout);
        }
        if let Some((since, _)) = self.better_since
            && self.enough_rounds()
        {
            consider(since + self.config.switch_hold);
        }
        next
    }

    /// Expires pings, completes the round, starts the next, and re-checks
    /// the switch condition.
    fn advance(&mut self, now: Instant) {
        let timeout = self.config.probe_timeout;
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.sent) >= timeout)
            .map(|(&n, _)| n)
            .collect();
        let changed = !expired.is_empty();
        for nonce in expired {
            let flight = self.in_flight.remove(&nonce).expect("listed above");
            let slot = &mut self.slots[flight.slot];
            push_outcome(&mut slot.outcomes, false, self.config.loss_window);
            slot.consecutive_lost = slot.consecutive_lost.saturating_add(1);
            self.stats.pings_lost += 1;
        }
        if changed {
            self.refresh_scores();
        }
        let done = self
            .round
            .as_ref()
            .is_some_and(|r| r.schedule.is_empty() && self.in_flight.is_empty());
        if done {
            let round = self.round.take().expect("checked above");
            self.stats.rounds += 1;
            // Someone answered nothing, and fresh candidates could take its
            // place: probe again now rather than in a full period.
            let silent = !round.manual
                && round
                    .active
                    .iter()
                    .any(|&i| self.slots[i].round_answers == 0);
            let fresh = self.slots.iter().any(|s| !s.probed);
            self.next_round = if silent && fresh {
                Some(now)
            } else {
                self.config
                    .reprobe_every
                    .map(|every| (round.start + every).max(now))
            };
        }
        if self.round.is_none() && self.next_round.is_some_and(|t| t <= now) {
            self.next_round = None;
            self.start_round(now);
        }
        self.evaluate(now);
    }

    fn start_round(&mut self, now: Instant) {
        let active = self.active_set();
        self.begin_round(now, active, false);
    }

    /// Schedules a round's pings to `active`, starting at `now`.
    fn begin_round(&mut self, now: Instant, active: Vec<usize>, manual: bool) {
        if active.is_empty() {
            return;
        }
        for &i in &active {
            self.slots[i].round_answers = 0;
        }
        let n = active.len() as u32;
        let interval = self.config.probe_interval;
        // The very first pings all go at once: a client that has not picked
        // a relay yet waits for them, and a stagger would delay the best
        // relay's first answer by up to one interval for nothing (a burst
        // of a few pings, one per relay). Every later ping is staggered.
        let first_round = self.stats.rounds == 0 && self.stats.pings_sent == 0;
        let mut schedule = VecDeque::new();
        for k in 0..self.config.probes_per_round.max(1) {
            for (j, &slot) in active.iter().enumerate() {
                let at = if first_round && k == 0 {
                    now
                } else {
                    now + interval * k + interval * j as u32 / n
                };
                schedule.push_back((at, slot));
            }
        }
        self.round = Some(Round {
            start: now,
            schedule,
            active,
            manual,
        });
    }

    /// The candidates to probe in a new round (see the module docs).
    fn active_set(&self) -> Vec<usize> {
        let dead_after = self.config.dead_after;
        let scores = &self.scores;
        let typical = self.typical_origin_rtt();
        // (class, expected score, position): lower is more promising.
        let mut ranked: Vec<(u8, Duration, usize)> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                if slot.dead(dead_after) {
                    (3, Duration::ZERO, i)
                } else if let (true, Some(score)) = (slot.alive(dead_after), scores[i]) {
                    (0, score.total, i)
                } else if let Some(hint) = slot.candidate.hint {
                    (0, hint + slot.origin_hint.unwrap_or(typical), i)
                } else {
                    (1, Duration::ZERO, i)
                }
            })
            .collect();
        ranked.sort_unstable();
        let mut active: Vec<usize> = ranked
            .iter()
            .take(self.config.max_probed.max(1))
            .map(|&(_, _, i)| i)
            .collect();
        if let Some(current) = self.current
            && !active.contains(&current)
        {
            active.push(current);
        }
        active
    }

    /// The median of the origin RTTs relays reported (zero if none did):
    /// what a relay that does not know its own is assumed to have.
    fn typical_origin_rtt(&self) -> Duration {
        let mut known: Vec<Duration> = self
            .slots
            .iter()
            .filter_map(|s| s.reported.as_ref()?.origin_rtt)
            .collect();
        if known.is_empty() {
            return Duration::ZERO;
        }
        known.sort_unstable();
        percentile(&known, 0.5)
    }

    /// Recomputes every candidate's score (after a sample came or a ping
    /// was lost: the typical origin RTT may move with any of them).
    fn refresh_scores(&mut self) {
        let typical = self.typical_origin_rtt();
        let scores = self.slots.iter().map(|s| self.score(s, typical)).collect();
        self.scores = scores;
    }

    fn score(&self, slot: &Slot, typical_origin: Duration) -> Option<ScoreParts> {
        let reported = slot.reported.as_ref()?;
        if slot.rtts.is_empty() {
            return None;
        }
        let mut sorted: Vec<Duration> = slot.rtts.iter().copied().collect();
        sorted.sort_unstable();
        let rtt = percentile(&sorted, self.config.rtt_percentile);
        let origin = reported.origin_rtt.unwrap_or(typical_origin);
        let mut load = self.config.load_penalty * u32::from(reported.load);
        if reported.load >= 1000 {
            load += self.config.full_penalty;
        }
        let loss = self.config.loss_penalty.mul_f64(slot.loss());
        Some(ScoreParts {
            rtt,
            origin,
            load,
            loss,
            total: rtt + origin + load + loss,
        })
    }

    /// The live candidate with the lowest score, as slot and score.
    fn best_slot(&self, scores: &[Option<ScoreParts>]) -> Option<(usize, Duration)> {
        let dead_after = self.config.dead_after;
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.alive(dead_after))
            .filter_map(|(i, _)| Some((i, scores[i]?.total)))
            .min_by_key(|&(i, total)| (total, i))
    }

    /// The relay to use now: the live candidate with the lowest score.
    /// Never one that has not answered, nor one whose pongs stopped.
    pub fn best(&self) -> Option<SocketAddr> {
        self.best_slot(&self.scores)
            .map(|(i, _)| self.slots[i].candidate.addr)
    }

    /// Candidates that answered, best first: live ones by score, then those
    /// whose pongs stopped (by score). The current relay is in the list, in
    /// its place; a client failing over skips it.
    pub fn failover_order(&self) -> Vec<SocketAddr> {
        let dead_after = self.config.dead_after;
        let scores = &self.scores;
        let mut order: Vec<(bool, Duration, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((s.dead(dead_after), scores[i]?.total, i)))
            .collect();
        order.sort_unstable();
        order
            .into_iter()
            .map(|(_, _, i)| self.slots[i].candidate.addr)
            .collect()
    }

    /// What is known about every candidate, in the order given.
    pub fn estimates(&self) -> Vec<Estimate> {
        let dead_after = self.config.dead_after;
        self.slots
            .iter()
            .zip(self.scores.iter().copied())
            .map(|(slot, score)| {
                let mut sorted: Vec<Duration> = slot.rtts.iter().copied().collect();
                sorted.sort_unstable();
                let stat = |p: f64| (!sorted.is_empty()).then(|| percentile(&sorted, p));
                let jitter = (slot.rtts.len() >= 2).then(|| {
                    let diffs: Duration = slot
                        .rtts
                        .iter()
                        .zip(slot.rtts.iter().skip(1))
                        .map(|(a, b)| a.abs_diff(*b))
                        .sum();
                    diffs / (slot.rtts.len() as u32 - 1)
                });
                let reported = slot.reported.as_ref();
                Estimate {
                    addr: slot.candidate.addr,
                    connect: slot.candidate.connect,
                    region: reported
                        .map(|r| r.region.clone())
                        .or_else(|| slot.candidate.region.clone()),
                    relay_id: reported.map(|r| r.relay_id.clone()),
                    rtt_min: stat(0.0),
                    rtt_median: stat(0.5),
                    rtt_p95: stat(0.95),
                    jitter,
                    loss: slot.loss(),
                    resolved: slot.outcomes.len() as u32,
                    received: slot.outcomes.iter().filter(|ok| **ok).count() as u32,
                    origin_rtt: reported.and_then(|r| r.origin_rtt),
                    load: reported.map(|r| r.load),
                    coords: reported.and_then(|r| r.coords),
                    score,
                    answered: slot.answered,
                    alive: slot.alive(dead_after),
                    probed: slot.probed,
                }
            })
            .collect()
    }

    /// The relay the client is connected to.
    pub fn current(&self) -> Option<SocketAddr> {
        self.current.map(|i| self.slots[i].candidate.addr)
    }

    /// Tells the selector which relay the client is connected to (`None`:
    /// not connected). Returns `false`, and changes nothing, for an address
    /// that is not a candidate.
    pub fn set_current(&mut self, addr: Option<SocketAddr>) -> bool {
        let slot = match addr {
            None => None,
            Some(addr) => match self.by_addr.get(&canonical(addr)) {
                Some(&i) => Some(i),
                None => return false,
            },
        };
        self.current = slot;
        self.better_since = None;
        true
    }

    /// When a switch would happen if the challenger keeps winning: the
    /// relay that wins now, and the instant its hold time ends.
    pub fn pending_switch(&self) -> Option<(SocketAddr, Instant)> {
        let (since, _) = self.better_since?;
        let (best, _) = self.best_slot(&self.scores)?;
        Some((
            self.slots[best].candidate.addr,
            since + self.config.switch_hold,
        ))
    }

    /// For a connected client: the relay to move to, once another one has
    /// beaten the current one by the margin for the hold time. The selector
    /// then takes it as the current relay.
    #[must_use]
    pub fn poll_switch(&mut self, now: Instant) -> Option<SocketAddr> {
        self.evaluate(now);
        let (since, _) = self.better_since?;
        if now.saturating_duration_since(since) < self.config.switch_hold || !self.enough_rounds() {
            return None;
        }
        let (best, _) = self.best_slot(&self.scores)?;
        self.current = Some(best);
        self.better_since = None;
        self.stats.switches += 1;
        Some(self.slots[best].candidate.addr)
    }

    /// Whether [`Config::switch_rounds`] rounds have completed since the
    /// challenger started winning. The round in progress then counts when
    /// it completes (a challenger mostly starts winning as its pongs come
    /// in); a round that had not started does not.
    fn enough_rounds(&self) -> bool {
        let Some((_, at)) = self.better_since else {
            return false;
        };
        self.stats.rounds.saturating_sub(at) >= u64::from(self.config.switch_rounds)
    }

    /// Starts or stops the hold timer: whether some live candidate beats the
    /// current relay by the margin now.
    fn evaluate(&mut self, now: Instant) {
        let Some(current) = self.current else {
            self.better_since = None;
            return;
        };
        let scores = &self.scores;
        let winning = match self.best_slot(scores) {
            Some((best, _)) if best == current => false,
            None => false,
            Some((_, best)) => {
                let cur = &self.slots[current];
                match scores[current] {
                    Some(score) if cur.alive(self.config.dead_after) => {
                        let c = score.total;
                        let margin = self
                            .config
                            .switch_margin
                            .max(c.mul_f64(self.config.switch_margin_ratio.max(0.0)));
                        best + margin < c
                    }
                    // The current relay never answered, or stopped.
                    _ => true,
                }
            }
        };
        if winning {
            let rounds = self.stats.rounds;
            self.better_since.get_or_insert((now, rounds));
        } else {
            self.better_since = None;
        }
    }
}

fn push_outcome(outcomes: &mut VecDeque<bool>, ok: bool, window: usize) {
    outcomes.push_back(ok);
    while outcomes.len() > window.max(1) {
        outcomes.pop_front();
    }
}

/// SplitMix64: a fast, well-mixed sequence from a seed.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&s, 0.1), Duration::from_millis(2));
        assert_eq!(percentile(&s, 0.5), Duration::from_millis(10));
        assert_eq!(percentile(&s, 0.95), Duration::from_millis(19));
        assert_eq!(percentile(&s, 1.0), Duration::from_millis(20));
        assert_eq!(percentile(&s[..1], 0.95), Duration::from_millis(1));
    }

    #[test]
    fn pings_are_staggered_across_candidates_and_spaced_per_candidate() {
        let t0 = Instant::now();
        let addrs: Vec<SocketAddr> = (1..=4)
            .map(|i| SocketAddr::from(([127, 0, 0, i], 4435)))
            .collect();
        let config = Config {
            probes_per_round: 3,
            probe_interval: Duration::from_millis(40),
            ..Config::default()
        };
        let candidates = addrs.iter().map(|&a| Candidate::new(a, a)).collect();
        let mut s = Selector::new(config, candidates, t0);
        let mut sent = Vec::new();
        let mut t = t0;
        while t < t0 + Duration::from_millis(200) {
            while let Some((to, _)) = s.poll_transmit(t) {
                sent.push((t - t0, to));
            }
            t = s.poll_timeout().unwrap();
        }
        assert_eq!(sent.len(), 12);
        let ms = Duration::from_millis;
        // The very first pings go together; then four candidates, 10 ms
        // apart, each pinged every 40 ms.
        for (k, (at, to)) in sent.iter().enumerate() {
            let want = if k < 4 { ms(0) } else { ms(10 * k as u64) };
            assert_eq!(*at, want, "{sent:?}");
            assert_eq!(*to, addrs[k % 4]);
        }
        // Later rounds are staggered from their first ping on.
        let mut t = s.poll_timeout().unwrap();
        let mut later = Vec::new();
        let deadline = t + Duration::from_secs(30);
        while later.len() < 4 && t < deadline {
            while let Some((to, _)) = s.poll_transmit(t) {
                later.push((t, to));
            }
            let before = t;
            // Pongs never come: the round ends by timeouts, the next one
            // starts at `reprobe_every`.
            s.handle_timeout(t);
            t = s
                .poll_timeout()
                .unwrap()
                .max(before + Duration::from_millis(1));
        }
        assert_eq!(later.len(), 4, "{later:?}");
        for (j, (at, _)) in later.iter().enumerate() {
            assert_eq!(*at - later[0].0, ms(10 * j as u64), "{later:?}");
        }
    }
}
