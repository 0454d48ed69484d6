//! `lab route`: the real relay selector against a latency matrix.
//!
//! ## The model
//!
//! A [`Matrix`] gives the RTT of each pair of nodes. Some nodes are relays,
//! one may be the origin; every other node is a client. For each client the
//! simulation runs the real [`Selector`] (client/src/select.rs) over every
//! relay as a candidate, in simulated time (no sockets, no sleeping: a
//! priority queue of pong arrivals and the selector's own timers), in the
//! selector's documented polling order. A probe to relay `r` takes
//!
//! ```text
//! rtt(client, r) + uniform [0, jitter)    lost with probability `loss`
//! ```
//!
//! (queueing only ever adds delay). The pong carries what a relay would
//! report: its RTT to the origin as it measured it (the lowest of five
//! pings over the matrix pair `(r, origin)` with the same jitter and loss;
//! 0 without an origin) and its network coordinates.
//!
//! Relays' coordinates come from simulating [`Vivaldi`] among the relays
//! first: each relay takes [`RouteConfig::vivaldi_samples`] samples,
//! alternately from its eight nearest relays and from a random one, each
//! sample the lowest of three pings with the same jitter and loss. Then
//! each relay in turn refines its point ([`coords::refine`]) against the
//! lowest RTT it measured to each peer, [`RouteConfig::refine_passes`]
//! times. The client knows every relay's coordinates and measured origin
//! RTT, as it would from the relays' directory or DNS TXT records
//! (`coords=`, `origin=`); the [`Guide`] gets both.
//!
//! ## What counts
//!
//! The best relay for a client minimises `rtt(client, r) + rtt(r, origin)`,
//! the selector's score without load and loss. After the selector's
//! initial probing (the guided rounds with [`Hints::Coords`], else the
//! first round, and the one that replaces silent candidates at once, if
//! any) its [`best`](Selector::best) is the client's choice; its *regret*
//! is the choice's true score minus the best's. A choice is *near best*
//! within `max(5 ms, 10%)` of the best score (the selector's own switch
//! margin).
//!
//! ## Unknown pairs
//!
//! A pair missing from the matrix is unreachable: every probe between
//! those two nodes is lost, and two relays without a pair never sample each
//! other. A relay with no pair to the origin reports an unknown origin RTT
//! and cannot serve; a client may use a relay only when both its pair to
//! the relay and the relay's pair to the origin are known. A client with no
//! usable relay has no best: it is left out of every share and counted in
//! [`Report::unserved`]. A client whose selector chose nothing, or an
//! unusable relay, counts as neither best nor near best, and has no regret.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use client::coords::{self, Guide, GuideConfig, Vivaldi, VivaldiConfig};
use client::select::{Candidate, Config, Selector};
use proto::msg::{Coords, Pong};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::matrix::Matrix;

/// How the simulated clients hint their selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hints {
    /// Network coordinates: a [`Guide`] probes far-apart relays, fits the
    /// client's position, then probes the most promising ones.
    Coords,
    /// Region hints ([`coords::region_hint`]): relays of the client's region
    /// first, then of its area. Regions come from node names: see
    /// [`region_of`].
    Region,
    /// No hints: the selector probes candidates in the order given.
    None,
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct RouteConfig {
    /// The relays (matrix node indices).
    pub relays: Vec<usize>,
    /// The origin, if any (a matrix node that is not a relay).
    pub origin: Option<usize>,
    /// Extra delay per probe, uniform in [0, jitter) ms.
    pub jitter_ms: f64,
    /// Probability that a probe (or its pong) is lost, 0 to 1.
    pub loss: f64,
    /// Seeds every draw: the same seed and configuration give the same
    /// report.
    pub seed: u64,
    /// Vivaldi samples each relay takes before the clients start.
    pub vivaldi_samples: usize,
    /// Passes of [`coords::refine`] over all relays after Vivaldi.
    pub refine_passes: usize,
}

impl RouteConfig {
    /// The issue's conditions over these relays: 5 ms of jitter, 2% loss.
    pub fn new(relays: Vec<usize>, origin: Option<usize>) -> RouteConfig {
        RouteConfig {
            relays,
            origin,
            jitter_ms: 5.0,
            loss: 0.02,
            seed: 1,
            vivaldi_samples: 1024,
            // Measured with `lab route` on the shipped matrix (seed 1),
            // near best on average over the three origin choices: 0 passes
            // 94.9%, 1 pass 97.0%, 3 passes 97.5%, 5 passes 97.0%.
            refine_passes: 3,
        }
    }
}

/// One way of choosing: hints and probing limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Strategy {
    /// A short name for reports.
    pub name: String,
    /// How candidates are hinted.
    pub hints: Hints,
    /// The selector's [`Config::max_probed`] (`usize::MAX`: all).
    pub max_probed: usize,
    /// The guide's plan, with [`Hints::Coords`].
    pub guide: GuideConfig,
}

impl Strategy {
    /// Coordinates with the default guide: what statecast does.
    pub fn coords() -> Strategy {
        Strategy {
            name: "coords".into(),
            hints: Hints::Coords,
            max_probed: Config::default().max_probed,
            guide: GuideConfig::default(),
        }
    }

    /// Region hints, eight probed.
    pub fn region() -> Strategy {
        Strategy {
            name: "region".into(),
            hints: Hints::Region,
            ..Strategy::coords()
        }
    }

    /// No hints, eight probed.
    pub fn unhinted() -> Strategy {
        Strategy {
            name: "unhinted".into(),
            hints: Hints::None,
            ..Strategy::coords()
        }
    }

    /// No hints, every relay probed: the accuracy ceiling, at the most
    /// packets.
    pub fn all() -> Strategy {
        Strategy {
            name: "all".into(),
            hints: Hints::None,
            max_probed: usize::MAX,
            ..Strategy::coords()
        }
    }
}

/// A client that did not get the best relay.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Miss {
    /// The client node.
    pub client: String,
    /// The relay chosen (`None`: nothing usable).
    pub chosen: Option<String>,
    /// The best relay.
    pub best: String,
    /// The best score, ms.
    pub best_ms: f64,
    /// The choice's regret, ms.
    pub regret_ms: Option<f64>,
}

/// What a run found. Shares are of [`clients`](Report::clients).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// The strategy's name.
    pub strategy: String,
    /// Relays.
    pub relays: usize,
    /// Clients evaluated (those with a best relay).
    pub clients: usize,
    /// Clients left out: no relay was usable (see the module docs).
    pub unserved: usize,
    /// Clients whose selector chose nothing usable.
    pub no_choice: usize,
    /// Share that chose the best relay.
    pub best_share: f64,
    /// Share within max(5 ms, 10%) of the best score.
    pub near_best_share: f64,
    /// Median regret, ms (over clients that chose a usable relay).
    pub regret_p50_ms: f64,
    /// 95th percentile of regret, ms.
    pub regret_p95_ms: f64,
    /// Largest regret, ms.
    pub regret_max_ms: f64,
    /// Distinct relays pinged, mean per client.
    pub relays_probed_per_client: f64,
    /// Distinct relays pinged, most for one client.
    pub relays_probed_max: usize,
    /// Pings sent, mean per client.
    pub probe_packets_per_client: f64,
    /// Median simulated time from the first ping to the choice, ms.
    pub decision_p50_ms: f64,
    /// 95th percentile of that time, ms.
    pub decision_p95_ms: f64,
    /// The clients furthest from the best, worst first (at most five).
    pub worst: Vec<Miss>,
}

/// Median relative error of the relays' coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct CoordsQuality {
    /// Over relay pairs: |predicted - real| / real, median.
    pub relay_pairs_p50: f64,
    /// The same, 90th percentile.
    pub relay_pairs_p90: f64,
}

/// Why a simulation cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RouteError {
    /// No relay given.
    #[error("no relays")]
    NoRelays,
    /// A relay or origin index outside the matrix.
    #[error("node {0} is not in the matrix")]
    UnknownNode(usize),
    /// The origin is also a relay.
    #[error("the origin {0:?} is also a relay")]
    OriginIsRelay(String),
    /// The same relay twice.
    #[error("relay {0:?} is listed twice")]
    DuplicateRelay(String),
    /// Jitter or loss out of range.
    #[error("jitter must be 0 to 10000 ms and loss 0 to 1")]
    Conditions,
    /// More relays than the simulation can address.
    #[error("at most 65536 relays")]
    TooManyRelays,
}

/// The region of a node by the lab's naming convention: the name without
/// its first and last `-`-separated parts (`r-euw-03` and `c-euw-017` are
/// in `euw`, `relay-eu-west-7` in `eu-west`); `None` for names of fewer
/// than three parts.
pub fn region_of(name: &str) -> Option<&str> {
    let first = name.find('-')?;
    let last = name.rfind('-')?;
    (last > first + 1).then(|| &name[first + 1..last])
}

/// The nodes whose names start with `prefix`, in matrix order.
pub fn nodes_with_prefix(matrix: &Matrix, prefix: &str) -> Vec<usize> {
    (0..matrix.len())
        .filter(|&i| matrix.names()[i].starts_with(prefix))
        .collect()
}

/// The simulated probe address of the `i`-th relay.
fn relay_addr(i: usize) -> SocketAddr {
    let i = i as u32;
    SocketAddr::from((
        Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8),
        4435,
    ))
}

/// Nearest-rank percentile of sorted values (0 for none).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A matrix with relays placed in coordinates, ready to run strategies.
#[derive(Debug)]
pub struct Network<'m> {
    matrix: &'m Matrix,
    config: RouteConfig,
    /// Per relay (by position in `config.relays`).
    coords: Vec<Option<Coords>>,
    /// RTT from each relay to the origin, ms (0 without origin).
    origin_rtt: Vec<Option<f64>>,
    /// What each relay measured of it, and publishes (pongs, directory,
    /// TXT `origin=MS`): the lowest of five noisy pings.
    published_origin: Vec<Option<f64>>,
    clients: Vec<usize>,
}

/// A pong on its way: (arrival, sequence, relay, nonce, sent_us).
type Arrival = (Instant, u64, usize, u64, u64);

/// One client's outcome.
struct Outcome {
    client: usize,
    chosen: Option<usize>,
    probed: usize,
    pings: u64,
    decision: Duration,
}

impl<'m> Network<'m> {
    /// Checks the configuration and places the relays in coordinates
    /// (simulated Vivaldi).
    pub fn new(matrix: &'m Matrix, config: RouteConfig) -> Result<Network<'m>, RouteError> {
        if config.relays.is_empty() {
            return Err(RouteError::NoRelays);
        }
        if config.relays.len() > 1 << 16 {
            return Err(RouteError::TooManyRelays);
        }
        let jitter_ok =
            config.jitter_ms.is_finite() && (0.0..=10_000.0).contains(&config.jitter_ms);
        if !jitter_ok || !(0.0..=1.0).contains(&config.loss) {
            return Err(RouteError::Conditions);
        }
        let mut is_relay = vec![false; matrix.len()];
        for &r in &config.relays {
            if r >= matrix.len() {
                return Err(RouteError::UnknownNode(r));
            }
            if std::mem::replace(&mut is_relay[r], true) {
                return Err(RouteError::DuplicateRelay(matrix.names()[r].clone()));
            }
        }
        if let Some(o) = config.origin {
            if o >= matrix.len() {
                return Err(RouteError::UnknownNode(o));
            }
            if is_relay[o] {
                return Err(RouteError::OriginIsRelay(matrix.names()[o].clone()));
            }
        }
        let clients = (0..matrix.len())
            .filter(|&i| !is_relay[i] && Some(i) != config.origin)
            .collect();
        let origin_rtt = config
            .relays
            .iter()
            .map(|&r| match config.origin {
                Some(o) => matrix.rtt(r, o),
                None => Some(0.0),
            })
            .collect();
        let mut net = Network {
            matrix,
            config,
            coords: Vec::new(),
            published_origin: Vec::new(),
            origin_rtt,
            clients,
        };
        net.coords = net.place_relays();
        net.published_origin = net.measure_origin();
        Ok(net)
    }

    /// The clients (matrix indices): every node neither relay nor origin.
    pub fn clients(&self) -> &[usize] {
        &self.clients
    }

    /// The relays' coordinates, in the order of [`RouteConfig::relays`]
    /// (`None`: the relay took no sample).
    pub fn relay_coords(&self) -> &[Option<Coords>] {
        &self.coords
    }

    /// One noisy probe from node `a` to node `b`: the RTT in ms, or `None`
    /// when lost (or the pair is unknown).
    fn probe(&self, a: usize, b: usize, rng: &mut ChaCha8Rng) -> Option<f64> {
        let base = self.matrix.rtt(a, b)?;
        let jitter: f64 = rng.random::<f64>() * self.config.jitter_ms;
        let lost = rng.random::<f64>() < self.config.loss;
        (!lost).then_some(base + jitter)
    }

    /// Each relay's published origin RTT: the lowest of five pings with the
    /// clients' jitter and loss (`None` when all are lost or the pair is
    /// unknown); 0 without an origin.
    fn measure_origin(&self) -> Vec<Option<f64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ 0x6f72_6967_696e);
        self.config
            .relays
            .iter()
            .map(|&r| match self.config.origin {
                None => Some(0.0),
                Some(o) => {
                    let v = (0..5)
                        .filter_map(|_| self.probe(r, o, &mut rng))
                        .fold(f64::INFINITY, f64::min);
                    v.is_finite().then_some(v)
                }
            })
            .collect()
    }

    fn place_relays(&self) -> Vec<Option<Coords>> {
        let relays = &self.config.relays;
        let n = relays.len();
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ 0x7669_7661_6c64_6921);
        // Each relay's eight nearest (by the matrix, as it would find them
        // by probing), for local accuracy.
        let near: Vec<Vec<usize>> = (0..n)
            .map(|i| {
                let mut others: Vec<(f64, usize)> = (0..n)
                    .filter(|&j| j != i)
                    .filter_map(|j| Some((self.matrix.rtt(relays[i], relays[j])?, j)))
                    .collect();
                others.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                others.into_iter().take(8).map(|(_, j)| j).collect()
            })
            .collect();
        let mut nodes: Vec<Vivaldi> = (0..n)
            .map(|i| {
                Vivaldi::new(VivaldiConfig {
                    seed: self.config.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    ..VivaldiConfig::default()
                })
            })
            .collect();
        if n < 2 {
            return vec![None; n];
        }
        // The lowest RTT each relay measured to each peer.
        let mut lowest: Vec<HashMap<usize, f64>> = vec![HashMap::new(); n];
        for round in 0..self.config.vivaldi_samples {
            for i in 0..n {
                let j = if round % 2 == 0 && !near[i].is_empty() {
                    near[i][rng.random_range(0..near[i].len())]
                } else {
                    let j = rng.random_range(0..n - 1);
                    if j >= i { j + 1 } else { j }
                };
                let rtt = (0..3)
                    .filter_map(|_| self.probe(relays[i], relays[j], &mut rng))
                    .fold(f64::INFINITY, f64::min);
                if rtt.is_finite() {
                    let (c, e) = (nodes[j].coords(), nodes[j].error());
                    nodes[i].observe(rtt, &c, e);
                    let m = lowest[i].entry(j).or_insert(rtt);
                    *m = m.min(rtt);
                }
            }
        }
        let mut placed: Vec<Option<Coords>> = nodes
            .iter()
            .map(|v| (v.samples() > 0).then(|| v.coords()))
            .collect();
        // Then each relay refines its point against its table of peers
        // (coords::refine), in turn, a few passes.
        for _ in 0..self.config.refine_passes {
            for i in 0..n {
                let Some(current) = placed[i] else {
                    continue;
                };
                let mut peers: Vec<(usize, f64)> =
                    lowest[i].iter().map(|(&j, &r)| (j, r)).collect();
                peers.sort_by_key(|p| p.0);
                let samples: Vec<(Coords, f64)> = peers
                    .iter()
                    .filter_map(|&(j, r)| Some((placed[j]?, r)))
                    .collect();
                if let Some(c) = coords::refine(&current, &samples) {
                    placed[i] = Some(c);
                }
            }
        }
        placed
    }

    /// How well the relays' coordinates predict the RTTs between relays.
    pub fn coords_quality(&self) -> CoordsQuality {
        let relays = &self.config.relays;
        let mut errors = Vec::new();
        for i in 0..relays.len() {
            for j in i + 1..relays.len() {
                let (Some(a), Some(b)) = (self.coords[i], self.coords[j]) else {
                    continue;
                };
                if let Some(real) = self.matrix.rtt(relays[i], relays[j])
                    && real > 0.0
                {
                    errors.push((coords::distance(&a, &b) - real).abs() / real);
                }
            }
        }
        errors.sort_by(f64::total_cmp);
        CoordsQuality {
            relay_pairs_p50: percentile(&errors, 0.5),
            relay_pairs_p90: percentile(&errors, 0.9),
        }
    }

    /// The true score of relay `r` (position) for `client`, if usable.
    fn score(&self, client: usize, r: usize) -> Option<f64> {
        Some(self.matrix.rtt(client, self.config.relays[r])? + self.origin_rtt[r]?)
    }

    /// The best relay (position) for `client` and its score.
    fn best(&self, client: usize) -> Option<(usize, f64)> {
        (0..self.config.relays.len())
            .filter_map(|r| Some((r, self.score(client, r)?)))
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
    }

    /// Runs `strategy` for every client; `progress(done, total)` is called
    /// after each client.
    pub fn run(&self, strategy: &Strategy, progress: &mut dyn FnMut(usize, usize)) -> Report {
        let served: Vec<(usize, (usize, f64))> = self
            .clients
            .iter()
            .filter_map(|&c| Some((c, self.best(c)?)))
            .collect();
        let total = served.len();
        let mut outcomes = Vec::with_capacity(total);
        for (k, &(client, _)) in served.iter().enumerate() {
            outcomes.push(self.simulate(client, strategy));
            progress(k + 1, total);
        }
        self.report(strategy, &served, &outcomes)
    }

    fn report(
        &self,
        strategy: &Strategy,
        served: &[(usize, (usize, f64))],
        outcomes: &[Outcome],
    ) -> Report {
        let names = self.matrix.names();
        let relay_name = |r: usize| names[self.config.relays[r]].clone();
        let (mut best, mut near, mut no_choice) = (0usize, 0usize, 0usize);
        let mut regrets = Vec::new();
        let mut misses = Vec::new();
        for (&(client, (best_r, best_ms)), o) in served.iter().zip(outcomes) {
            debug_assert_eq!(client, o.client);
            let regret = o
                .chosen
                .and_then(|r| self.score(client, r))
                .map(|s| s - best_ms);
            match regret {
                Some(regret) => {
                    regrets.push(regret);
                    if regret <= 1e-9 {
                        best += 1;
                    }
                    if regret <= 5.0f64.max(0.1 * best_ms) {
                        near += 1;
                    }
                }
                None => no_choice += 1,
            }
            if regret.is_none_or(|r| r > 1e-9) {
                misses.push(Miss {
                    client: names[client].clone(),
                    chosen: o.chosen.map(relay_name),
                    best: relay_name(best_r),
                    best_ms,
                    regret_ms: regret,
                });
            }
        }
        misses.sort_by(|a, b| {
            let key = |m: &Miss| m.regret_ms.unwrap_or(f64::INFINITY);
            key(b).total_cmp(&key(a))
        });
        misses.truncate(5);
        regrets.sort_by(f64::total_cmp);
        let mut decisions: Vec<f64> = outcomes
            .iter()
            .map(|o| o.decision.as_secs_f64() * 1000.0)
            .collect();
        decisions.sort_by(f64::total_cmp);
        let n = outcomes.len();
        let share = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
        let mean = |f: &dyn Fn(&Outcome) -> f64| {
            if n == 0 {
                0.0
            } else {
                outcomes.iter().map(f).sum::<f64>() / n as f64
            }
        };
        Report {
            strategy: strategy.name.clone(),
            relays: self.config.relays.len(),
            clients: n,
            unserved: self.clients.len() - served.len(),
            no_choice,
            best_share: share(best),
            near_best_share: share(near),
            regret_p50_ms: percentile(&regrets, 0.5),
            regret_p95_ms: percentile(&regrets, 0.95),
            regret_max_ms: regrets.last().copied().unwrap_or(0.0),
            relays_probed_per_client: mean(&|o| o.probed as f64),
            relays_probed_max: outcomes.iter().map(|o| o.probed).max().unwrap_or(0),
            probe_packets_per_client: mean(&|o| o.pings as f64),
            decision_p50_ms: percentile(&decisions, 0.5),
            decision_p95_ms: percentile(&decisions, 0.95),
            worst: misses,
        }
    }

    /// One client's selector, from its first ping to its choice.
    fn simulate(&self, client: usize, strategy: &Strategy) -> Outcome {
        let names = self.matrix.names();
        let relays = &self.config.relays;
        let seed = self.config.seed ^ (client as u64 + 1).wrapping_mul(0xd134_2543_de82_ef95);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let by_addr: HashMap<SocketAddr, usize> =
            (0..relays.len()).map(|r| (relay_addr(r), r)).collect();
        let own_region = region_of(&names[client]);
        let candidates = (0..relays.len())
            .map(|r| {
                let mut c = Candidate::new(relay_addr(r), relay_addr(r));
                c.region = region_of(&names[relays[r]]).map(str::to_string);
                if strategy.hints == Hints::Region
                    && let (Some(own), Some(region)) = (own_region, &c.region)
                {
                    c.hint = coords::region_hint(own, region);
                }
                c
            })
            .collect();
        let config = Config {
            max_probed: strategy.max_probed,
            nonce_seed: seed,
            ..Config::default()
        };
        let t0 = Instant::now();
        let mut sel = Selector::new(config, candidates, t0);
        let mut guide = (strategy.hints == Hints::Coords).then(|| {
            let known = (0..relays.len()).filter_map(|r| Some((relay_addr(r), self.coords[r]?)));
            let published = (0..relays.len()).filter_map(|r| {
                let ms = self.published_origin[r]?;
                Some((relay_addr(r), Duration::from_secs_f64(ms / 1000.0)))
            });
            let mut g = Guide::new(strategy.guide.clone(), known).with_origin_rtts(published);
            g.start(&mut sel, t0);
            g
        });
        let mut arrivals: BinaryHeap<Reverse<Arrival>> = BinaryHeap::new();
        let mut seq = 0u64;
        let mut now = t0;
        let horizon = t0 + Duration::from_secs(600);
        // Bounded: every step handles a pong or one of the selector's
        // timers, and both are finite per simulated second.
        for _ in 0..1_000_000 {
            let guided = guide.as_ref().is_some_and(|g| !g.is_done());
            if !guided && !sel.probing() && sel.rounds_completed() >= 1 {
                break;
            }
            let next = arrivals
                .peek()
                .map(|Reverse(a)| a.0)
                .into_iter()
                .chain(sel.poll_timeout())
                .min();
            match next {
                Some(t) if t <= horizon => now = now.max(t),
                _ => break,
            }
            while arrivals.peek().is_some_and(|Reverse(a)| a.0 <= now) {
                let Some(Reverse((_, _, r, nonce, sent_us))) = arrivals.pop() else {
                    break;
                };
                let pong = Pong {
                    nonce,
                    sent_us,
                    relay_id: names[relays[r]].clone(),
                    region: region_of(&names[relays[r]]).unwrap_or("").to_string(),
                    load: 0,
                    origin_rtt_us: match self.published_origin[r] {
                        Some(ms) => (ms * 1000.0).round().min(f64::from(u32::MAX - 1)) as u32,
                        None => u32::MAX,
                    },
                    coords: self.coords[r],
                };
                sel.handle_pong(relay_addr(r), &pong, now);
            }
            sel.handle_timeout(now);
            if let Some(g) = guide.as_mut() {
                g.poll(&mut sel, now);
            }
            while let Some((to, ping)) = sel.poll_transmit(now) {
                let Some(&r) = by_addr.get(&to) else {
                    continue;
                };
                if let Some(rtt) = self.probe(client, relays[r], &mut rng) {
                    seq += 1;
                    let at = now + Duration::from_secs_f64(rtt / 1000.0);
                    arrivals.push(Reverse((at, seq, r, ping.nonce, ping.sent_us)));
                }
            }
        }
        let chosen = sel.best().and_then(|a| by_addr.get(&a).copied());
        Outcome {
            client,
            chosen,
            probed: sel.estimates().iter().filter(|e| e.probed).count(),
            pings: sel.stats().pings_sent,
            decision: now - t0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_come_from_the_middle_of_names() {
        assert_eq!(region_of("r-euw-03"), Some("euw"));
        assert_eq!(region_of("relay-eu-west-7"), Some("eu-west"));
        assert_eq!(region_of("o-euc"), None);
        assert_eq!(region_of("a--b"), None);
        assert_eq!(region_of("plain"), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 10.0);
        assert_eq!(percentile(&v, 0.95), 19.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
