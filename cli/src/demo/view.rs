//! What the demo shows: the [`Observer`] samples the relays' metrics and
//! the bots' counters a few times a second, keeps the figures of the run
//! (local shares, failovers, bandwidth against full snapshots), draws the
//! live screen, and makes the [`Summary`].
//!
//! **Rates** (bytes/s, updates/s, kbit/s per client) are over the last
//! second of samples. **Full snapshots**: once a second the observer splits
//! the origin's newest snapshot into the relays' interest cells and, for
//! each bot, adds up the packed size ([`benches::measure::full_bits`]) of
//! the cells its area touches, i.e. what sending that bot its whole area
//! every tick would cost; each tick a bot applies adds that much to its
//! full-snapshot bill. **Local share**: at each sample, for each region
//! that has a live relay of its own, the share of its playing bots that are
//! on one; averaged over the run (samples when a region has no live relay
//! of its own are left out: there is nothing local to pick).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client::roam::{Move, MoveReason};
use proto::interest::Grid;
use proto::msg::CellId;
use serde::Serialize;
use tokio::time::Instant;

use super::bots::{BotEvent, BotNow, Phase, Spec};
use super::net::{Network, RelayState};
use super::scenario::{FaultKind, Scenario};

/// The window rates are measured over.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Moves between the same relays for the same reason within this long of
/// the first are shown as one event.
const GROUP_WINDOW: Duration = Duration::from_secs(3);
/// Events shown on the screen.
const EVENTS_SHOWN: usize = 8;
/// Events kept at most (the oldest go).
const EVENTS_KEPT: usize = 256;
/// Failovers listed in the summary at most (all are counted).
const FAILOVERS_KEPT: usize = 10_000;

/// Relay counters at one sample.
#[derive(Clone, Copy, Debug, Default)]
struct RelayCounters {
    bytes: u64,
    updates: u64,
    hits: u64,
    misses: u64,
}

/// Region counters at one sample.
#[derive(Clone, Copy, Debug, Default)]
struct RegionCounters {
    bytes: u64,
    full: f64,
    wire: u64,
}

#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    relays: Vec<RelayCounters>,
    regions: Vec<RegionCounters>,
    cpu_s: Option<f64>,
}

/// One failover (a move for loss or goaway).
#[derive(Clone, Debug, Serialize)]
pub struct Failover {
    /// Seconds from the start of the demo to the decision.
    pub at_s: f64,
    /// The bot's region.
    pub region: String,
    /// The relay left.
    pub from: String,
    /// The relay joined.
    pub to: String,
    /// Why (`lost: ...`, `goaway`).
    pub reason: String,
    /// From the last update on the old relay to the first on the new, ms.
    pub gap_ms: f64,
    /// Whether the new relay had to send a keyframe.
    pub keyframe: bool,
}

/// A group of similar moves, as the view shows them.
#[derive(Clone, Debug)]
struct MoveGroup {
    first: f64,
    last: f64,
    from: String,
    to: String,
    reason: String,
    count: usize,
    max_gap_ms: f64,
    gaps: Vec<f64>,
    printed: bool,
}

#[derive(Clone, Debug)]
enum Line {
    Text { at: f64, text: String },
    Moves(MoveGroup),
}

impl Line {
    fn render(&self) -> String {
        match self {
            Line::Text { at, text } => format!("{:>11}  {text}", format!("{at:.1}s")),
            Line::Moves(g) => {
                let p50 = quantile(&g.gaps, 0.5).unwrap_or(0.0);
                let span = if g.last - g.first >= 0.05 {
                    format!("{:.1}-{:.1}s", g.first, g.last)
                } else {
                    format!("{:.1}s", g.first)
                };
                format!(
                    "{span:>11}  {} client{} {} -> {} ({}), gap p50 {p50:.0} ms, max {:.0} ms",
                    g.count,
                    if g.count == 1 { "" } else { "s" },
                    g.from,
                    g.to,
                    g.reason,
                    g.max_gap_ms
                )
            }
        }
    }
}

/// A fault as it happened.
#[derive(Clone, Debug, Serialize)]
pub struct FaultRecord {
    /// Seconds from the start.
    pub at_s: f64,
    /// Kill or drain.
    pub kind: FaultKind,
    /// The relay.
    pub relay: String,
    /// Its clients at that moment.
    pub clients: i64,
}

/// Per relay, in the summary.
#[derive(Clone, Debug, Serialize)]
pub struct RelaySummary {
    /// Its name.
    pub name: String,
    /// Its region.
    pub region: String,
    /// What it was doing at the end.
    pub state: RelayState,
    /// Clients at the end.
    pub clients: i64,
    /// Most clients at one sample.
    pub peak_clients: i64,
    /// Update bytes sent over the run.
    pub bytes_sent: u64,
    /// Updates sent over the run.
    pub updates_sent: u64,
    /// Mean update bytes per second while it was up.
    pub bytes_per_s: f64,
    /// Keyframes sent.
    pub keyframes: u64,
    /// Chunk cache hits over lookups, over the run.
    pub cache_hit_ratio: Option<f64>,
}

/// Per client region, in the summary.
#[derive(Clone, Debug, Serialize)]
pub struct RegionSummary {
    /// Its name.
    pub name: String,
    /// Its bots.
    pub clients: usize,
    /// Of those, connected at the end.
    pub playing: usize,
    /// Where they were at the end: relay name to bots.
    pub relays: BTreeMap<String, usize>,
    /// See the module documentation.
    pub local_share: Option<f64>,
    /// Median QUIC RTT to the relay in use at the end, ms.
    pub rtt_p50_ms: Option<f64>,
    /// Median (over bots) of their median tick latency (origin tick to
    /// application), ms.
    pub latency_p50_ms: Option<f64>,
    /// Update bytes per bot per second.
    pub bytes_per_client_per_s: f64,
    /// Bytes on the wire per bot per second (QUIC and probes, from the
    /// links).
    pub wire_bytes_per_client_per_s: f64,
    /// Full snapshots of the bots' areas per bot per second.
    pub full_snapshot_bytes_per_client_per_s: f64,
    /// Update bytes over full-snapshot bytes.
    pub full_snapshot_ratio: Option<f64>,
    /// Entities in a bot's area, mean.
    pub entities_per_client: f64,
    /// Ticks that did not match the origin's hash.
    pub divergences: u64,
    /// Failovers of its bots.
    pub failovers: usize,
    /// Longest failover gap of its bots, ms.
    pub max_failover_ms: Option<f64>,
}

/// The end-of-run summary (`--json` prints it).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Where the scenario came from.
    pub scenario: String,
    /// Seconds run.
    pub duration_s: f64,
    /// World.
    pub world: String,
    /// Its avatars.
    pub avatars: u32,
    /// Its tick rate.
    pub tick_rate: u32,
    /// Bots.
    pub clients: usize,
    /// Bots connected at the end.
    pub clients_playing: usize,
    /// Bots on a relay that was up at the end.
    pub clients_on_live_relay: usize,
    /// Bots that gave up.
    pub clients_failed: usize,
    /// Why, for the first few.
    pub failures: Vec<String>,
    /// Ticks that did not match the origin's hash, all bots.
    pub divergences: u64,
    /// Ticks applied and verified, all bots.
    pub ticks_verified: u64,
    /// Region to the share of its bots on a relay of its own region (see
    /// the module documentation).
    pub local_share: BTreeMap<String, Option<f64>>,
    /// Every failover (move for loss or goaway), oldest first.
    pub failovers: Vec<Failover>,
    /// Longest failover gap, ms (0 without failovers).
    pub max_failover_ms: f64,
    /// Moves to a clearly better relay (not failovers).
    pub better_moves: usize,
    /// Moves that resumed with a delta rather than a keyframe.
    pub resumed_without_keyframe: u64,
    /// Update bytes per bot per second.
    pub bytes_per_client_per_s: f64,
    /// Bytes on the wire per bot per second.
    pub wire_bytes_per_client_per_s: f64,
    /// Full snapshots of the bots' areas per bot per second.
    pub full_snapshot_bytes_per_client_per_s: f64,
    /// Update bytes over what full snapshots would have cost.
    pub full_snapshot_ratio: f64,
    /// Entities in a bot's area, mean.
    pub entities_per_client: f64,
    /// This process's CPU time over wall time, in cores (everything: origin,
    /// relays, links, bots).
    pub cpu_cores: Option<f64>,
    /// The faults, as they happened.
    pub faults: Vec<FaultRecord>,
    /// Per relay.
    pub relays: Vec<RelaySummary>,
    /// Per client region.
    pub regions: Vec<RegionSummary>,
}

/// This process's user + system CPU seconds (Linux `/proc`).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces, in parentheses).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13
    // here (the state is field 3, index 0).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture statecast builds for.
    Some((utime + stime) / 100.0)
}

fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

fn relay_counters(n: &super::net::RelayNode) -> RelayCounters {
    let m = &n.metrics;
    RelayCounters {
        bytes: m.bytes_sent.get(),
        updates: m.updates_sent.with_label_values(&["datagram"]).get()
            + m.updates_sent.with_label_values(&["stream"]).get(),
        hits: m.cache_hits.get(),
        misses: m.cache_misses.get(),
    }
}

/// Watches the run.
pub struct Observer {
    scenario: Scenario,
    source: String,
    started: Instant,
    started_unix_ms: u64,
    bots: Vec<Spec>,
    now: Vec<Arc<Mutex<BotNow>>>,
    /// Copies of every bot's state at the last sample.
    seen: Vec<BotNow>,
    grid: Grid,
    cells: Vec<Vec<CellId>>,
    /// Full-snapshot bytes per tick of each bot's area (newest estimate).
    full_per_tick: Vec<f64>,
    entities: Vec<usize>,
    /// Full-snapshot bytes each bot's applied ticks would have cost.
    full_cost: Vec<f64>,
    last_ticks: Vec<u64>,
    next_full: Instant,
    samples: VecDeque<Sample>,
    first_sample: Option<Sample>,
    local_sum: Vec<f64>,
    local_n: Vec<f64>,
    peak_clients: Vec<i64>,
    up_for: Vec<Duration>,
    lines: VecDeque<Line>,
    failovers: Vec<Failover>,
    failover_count: usize,
    better_moves: usize,
    divergence_events: u64,
    failures: Vec<String>,
    faults: Vec<FaultRecord>,
    cpu_start: Option<f64>,
    tick_rate: u32,
}

impl Observer {
    /// Starts watching.
    pub fn new(
        scenario: &Scenario,
        source: String,
        net: &Network,
        bots: Vec<Spec>,
        now: Vec<Arc<Mutex<BotNow>>>,
        started: Instant,
        started_unix_ms: u64,
    ) -> Observer {
        let grid = Grid::new(scenario.world.cell_m);
        let cells = bots
            .iter()
            .map(|b| {
                grid.cells_within(
                    f64::from(b.area.x),
                    f64::from(b.area.y),
                    f64::from(b.area.radius),
                )
            })
            .collect();
        let n = bots.len();
        let regions = scenario.regions.len();
        let relays = net.relays.len();
        Observer {
            scenario: scenario.clone(),
            source,
            started,
            started_unix_ms,
            seen: now
                .iter()
                .map(|b| b.lock().unwrap_or_else(|p| p.into_inner()).clone())
                .collect(),
            bots,
            now,
            grid,
            cells,
            full_per_tick: vec![0.0; n],
            entities: vec![0; n],
            full_cost: vec![0.0; n],
            last_ticks: vec![0; n],
            next_full: started,
            samples: VecDeque::new(),
            first_sample: None,
            local_sum: vec![0.0; regions],
            local_n: vec![0.0; regions],
            peak_clients: vec![0; relays],
            up_for: vec![Duration::ZERO; relays],
            lines: VecDeque::new(),
            failovers: Vec::new(),
            failover_count: 0,
            better_moves: 0,
            divergence_events: 0,
            failures: Vec::new(),
            faults: Vec::new(),
            cpu_start: cpu_seconds(),
            tick_rate: net.origin.world.tick_rate,
        }
    }

    /// Every bot's state as of the last sample.
    pub fn states(&self) -> Vec<BotNow> {
        self.seen.clone()
    }

    fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn push_line(&mut self, line: Line) {
        if self.lines.len() == EVENTS_KEPT {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// Notes a fault.
    pub fn fault(&mut self, kind: FaultKind, relay: &str, clients: i64) {
        let at = self.secs();
        let text = match kind {
            FaultKind::Kill => {
                format!(
                    "relay {relay} KILLED with {clients} clients (links cut: no goodbye, clients must notice the silence)"
                )
            }
            FaultKind::Drain => format!("relay {relay} draining: goaway to its {clients} clients"),
        };
        self.push_line(Line::Text { at, text });
        self.faults.push(FaultRecord {
            at_s: at,
            kind,
            relay: relay.to_owned(),
            clients,
        });
    }

    /// Notes a line of text.
    pub fn note(&mut self, text: String) {
        let at = self.secs();
        self.push_line(Line::Text { at, text });
    }

    fn relay_name(&self, net: &Network, addr: std::net::SocketAddr) -> String {
        net.by_addr
            .get(&addr)
            .map_or_else(|| addr.to_string(), |&i| net.relays[i].name.clone())
    }

    /// Takes a bot's event.
    pub fn on_event(&mut self, net: &Network, event: BotEvent) {
        match event {
            BotEvent::Moved { bot, info } => self.on_move(net, bot, &info),
            BotEvent::Divergence { .. } => self.divergence_events += 1,
            BotEvent::Failed { bot, error } => {
                let region = self.scenario.regions[self.bots[bot].region].name.clone();
                if self.failures.len() < 10 {
                    self.failures.push(format!("bot {bot} ({region}): {error}"));
                }
                self.note(format!("bot {bot} ({region}) gave up: {error}"));
            }
        }
    }

    fn on_move(&mut self, net: &Network, bot: usize, info: &Move) {
        let at = info.at_unix_ms.saturating_sub(self.started_unix_ms) as f64 / 1000.0;
        let from = self.relay_name(net, info.from);
        let to = self.relay_name(net, info.to);
        let reason = match &info.reason {
            MoveReason::Lost(why) => format!("lost: {why}"),
            MoveReason::Goaway => "goaway".to_owned(),
            MoveReason::Better => "better relay".to_owned(),
        };
        if info.reason == MoveReason::Better {
            self.better_moves += 1;
        } else {
            self.failover_count += 1;
            if self.failovers.len() < FAILOVERS_KEPT {
                self.failovers.push(Failover {
                    at_s: at,
                    region: self.scenario.regions[self.bots[bot].region].name.clone(),
                    from: from.clone(),
                    to: to.clone(),
                    reason: reason.clone(),
                    gap_ms: info.gap_ms,
                    keyframe: info.keyframe,
                });
            }
        }
        let group = self.lines.iter_mut().rev().find_map(|l| match l {
            Line::Moves(g)
                if g.from == from
                    && g.to == to
                    && g.reason == reason
                    && at - g.first <= GROUP_WINDOW.as_secs_f64() =>
            {
                Some(g)
            }
            _ => None,
        });
        match group {
            Some(g) => {
                g.count += 1;
                g.last = g.last.max(at);
                g.max_gap_ms = g.max_gap_ms.max(info.gap_ms);
                g.gaps.push(info.gap_ms);
                g.printed = false;
            }
            None => self.push_line(Line::Moves(MoveGroup {
                first: at,
                last: at,
                from,
                to,
                reason,
                count: 1,
                max_gap_ms: info.gap_ms,
                gaps: vec![info.gap_ms],
                printed: false,
            })),
        }
    }

    /// Recomputes the full-snapshot cost of every bot's area from the
    /// origin's newest snapshot.
    fn update_full(&mut self, net: &Network) {
        let Some(tick) = net.origin.ticks().borrow().clone() else {
            return;
        };
        let layout = &net.origin.world.layout;
        let cells: HashMap<CellId, (usize, usize)> = self
            .grid
            .split(layout, &tick.snapshot)
            .into_iter()
            .map(|(id, s)| (id, (benches::measure::full_bits(layout, &s), s.len())))
            .collect();
        for (i, wanted) in self.cells.iter().enumerate() {
            let (bits, entities) = wanted
                .iter()
                .filter_map(|c| cells.get(c))
                .fold((0, 0), |(b, e), (cb, ce)| (b + cb, e + ce));
            self.full_per_tick[i] = bits.div_ceil(8) as f64;
            self.entities[i] = entities;
        }
    }

    /// Samples everything; call a few times a second.
    pub fn sample(&mut self, net: &Network) {
        let now = Instant::now();
        if now >= self.next_full {
            self.update_full(net);
            self.next_full = now + Duration::from_secs(1);
        }
        for (i, b) in self.now.iter().enumerate() {
            self.seen[i] = b.lock().unwrap_or_else(|p| p.into_inner()).clone();
        }
        for i in 0..self.bots.len() {
            let ticks = self.seen[i].ticks;
            let new = ticks.saturating_sub(self.last_ticks[i]);
            self.full_cost[i] += new as f64 * self.full_per_tick[i];
            self.last_ticks[i] = ticks;
        }
        let regions = self.scenario.regions.len();
        let mut region_counters = vec![RegionCounters::default(); regions];
        for (i, spec) in self.bots.iter().enumerate() {
            let c = &mut region_counters[spec.region];
            c.bytes += self.seen[i].bytes;
            c.full += self.full_cost[i];
        }
        for (r, c) in region_counters.iter_mut().enumerate() {
            c.wire = net.wire_bytes_down(r);
        }
        // Local share: regions with a live relay of their own.
        for r in 0..regions {
            if !net.relays.iter().any(|n| n.region == r && n.state.live()) {
                continue;
            }
            let (mut playing, mut local) = (0usize, 0usize);
            for (i, spec) in self.bots.iter().enumerate() {
                if spec.region != r || self.seen[i].phase != Phase::Playing {
                    continue;
                }
                let Some(relay) = self.seen[i].relay.and_then(|a| net.by_addr.get(&a)) else {
                    continue;
                };
                playing += 1;
                if net.relays[*relay].region == r {
                    local += 1;
                }
            }
            if playing > 0 {
                self.local_sum[r] += local as f64 / playing as f64;
                self.local_n[r] += 1.0;
            }
        }
        let previous = self.samples.back().map(|s| s.at);
        for (i, n) in net.relays.iter().enumerate() {
            self.peak_clients[i] = self.peak_clients[i].max(n.metrics.clients.get());
            if n.state.live()
                && let Some(prev) = previous
            {
                self.up_for[i] += now - prev;
            }
        }
        let sample = Sample {
            at: now,
            relays: net.relays.iter().map(relay_counters).collect(),
            regions: region_counters,
            cpu_s: cpu_seconds(),
        };
        if self.first_sample.is_none() {
            self.first_sample = Some(sample.clone());
        }
        self.samples.push_back(sample);
        while self.samples.len() > 2 && now - self.samples[1].at >= RATE_WINDOW {
            self.samples.pop_front();
        }
    }

    /// The oldest and newest samples of the rate window.
    fn window(&self) -> Option<(&Sample, &Sample, f64)> {
        let first = self.samples.front()?;
        let last = self.samples.back()?;
        let secs = (last.at - first.at).as_secs_f64();
        (secs > 0.0).then_some((first, last, secs))
    }

    fn playing(&self, region: usize) -> Vec<usize> {
        (0..self.bots.len())
            .filter(|&i| self.bots[i].region == region && self.seen[i].phase == Phase::Playing)
            .collect()
    }

    /// Lines of events not printed yet, for the plain (non-terminal) view:
    /// texts at once, move groups once they have been quiet for a second.
    pub fn unprinted(&mut self, all: bool) -> Vec<String> {
        let now = self.secs();
        let mut out = Vec::new();
        for line in &mut self.lines {
            match line {
                Line::Moves(g) if !g.printed && (all || now - g.last >= 1.0) => {
                    g.printed = true;
                    out.push(Line::Moves(g.clone()).render());
                }
                Line::Text { .. } => {}
                _ => {}
            }
        }
        out
    }

    /// One status line, for the plain view.
    pub fn status_line(&self, net: &Network) -> String {
        let mut o = format!("t={:.1}s", self.secs());
        for (r, region) in self.scenario.regions.iter().enumerate() {
            let playing = self.playing(r);
            let mut shares: BTreeMap<&str, usize> = BTreeMap::new();
            for &i in &playing {
                if let Some(&relay) = self.seen[i].relay.and_then(|a| net.by_addr.get(&a)) {
                    *shares.entry(net.relays[relay].name.as_str()).or_default() += 1;
                }
            }
            let shares: Vec<String> = shares.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            let _ = write!(
                o,
                " | {} {}/{} [{}]",
                region.name,
                playing.len(),
                region.bots,
                shares.join(" ")
            );
        }
        let div: u64 = self.seen.iter().map(|b| b.divergences).sum();
        let _ = write!(o, " | divergences {div}");
        if let Some(cpu) = self.cpu_now() {
            let _ = write!(o, " | cpu {cpu:.2} cores");
        }
        o
    }

    fn cpu_now(&self) -> Option<f64> {
        let (first, last, secs) = self.window()?;
        Some((last.cpu_s? - first.cpu_s?) / secs)
    }

    /// The whole live screen.
    pub fn screen(&self, net: &Network, duration: Option<f64>) -> String {
        let s = &self.scenario;
        let mut o = String::new();
        let until = duration.map_or("Ctrl-C to stop".to_owned(), |d| {
            format!("stops at {d:.0} s")
        });
        let cpu = self
            .cpu_now()
            .map_or(String::new(), |c| format!(", CPU {c:.2} cores"));
        let _ = writeln!(
            o,
            "statecast demo  {:.1} s  world {} ({} avatars, {} Hz), origin in {}, {} bots{cpu}; {until}",
            self.secs(),
            s.world.name,
            s.world.avatars,
            self.tick_rate,
            s.origin.region,
            self.bots.len(),
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "  {:<16} {:<14} {:<9} {:>7} {:>12} {:>10} {:>10}",
            "relay", "region", "state", "clients", "out kbit/s", "updates/s", "cache hit"
        );
        let window = self.window();
        for (i, n) in net.relays.iter().enumerate() {
            let (kbps, ups, hit) = match window {
                Some((a, b, secs)) => {
                    let (a, b) = (a.relays[i], b.relays[i]);
                    let lookups = (b.hits + b.misses).saturating_sub(a.hits + a.misses);
                    (
                        (b.bytes - a.bytes) as f64 * 8.0 / 1000.0 / secs,
                        (b.updates - a.updates) as f64 / secs,
                        (lookups > 0).then(|| (b.hits - a.hits) as f64 / lookups as f64),
                    )
                }
                None => (0.0, 0.0, None),
            };
            let _ = writeln!(
                o,
                "  {:<16} {:<14} {:<9} {:>7} {:>12.1} {:>10.0} {:>10}",
                n.name,
                s.regions[n.region].name,
                n.state.label(),
                n.metrics.clients.get(),
                kbps,
                ups,
                hit.map_or("-".to_owned(), |h| format!("{:.1}%", 100.0 * h)),
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "  {:<14} {:>8}  {:<46} {:>8} {:>14} {:>12} {:>7} {:>5}",
            "clients in",
            "playing",
            "relays (share)",
            "RTT p50",
            "kbit/s/client",
            "full kbit/s",
            "ratio",
            "div"
        );
        for (r, region) in s.regions.iter().enumerate() {
            let playing = self.playing(r);
            let mut shares: BTreeMap<&str, usize> = BTreeMap::new();
            let mut rtts = Vec::new();
            for &i in &playing {
                if let Some(&relay) = self.seen[i].relay.and_then(|a| net.by_addr.get(&a)) {
                    *shares.entry(net.relays[relay].name.as_str()).or_default() += 1;
                }
                if let Some(us) = self.seen[i].rtt_us {
                    rtts.push(us as f64 / 1000.0);
                }
            }
            let total = playing.len().max(1) as f64;
            let mut shares: Vec<(&str, usize)> = shares.into_iter().collect();
            shares.sort_by_key(|s| std::cmp::Reverse(s.1));
            let shares: Vec<String> = shares
                .iter()
                .map(|(k, v)| format!("{k} {:.0}%", 100.0 * *v as f64 / total))
                .collect();
            let (kbps, full) = match window {
                Some((a, b, secs)) if !playing.is_empty() => {
                    let (a, b) = (a.regions[r], b.regions[r]);
                    let n = playing.len() as f64;
                    (
                        (b.bytes - a.bytes) as f64 * 8.0 / 1000.0 / secs / n,
                        (b.full - a.full) * 8.0 / 1000.0 / secs / n,
                    )
                }
                _ => (0.0, 0.0),
            };
            let div: u64 = (0..self.bots.len())
                .filter(|&i| self.bots[i].region == r)
                .map(|i| self.seen[i].divergences)
                .sum();
            let _ = writeln!(
                o,
                "  {:<14} {:>8}  {:<46} {:>8} {:>14.1} {:>12.1} {:>7} {:>5}",
                region.name,
                format!("{}/{}", playing.len(), region.bots),
                shares.join(", "),
                quantile(&rtts, 0.5).map_or("-".to_owned(), |v| format!("{v:.0} ms")),
                kbps,
                full,
                if full > 0.0 {
                    format!("{:.1}%", 100.0 * kbps / full)
                } else {
                    "-".to_owned()
                },
                div
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "  events");
        let shown: Vec<&Line> = self.lines.iter().rev().take(EVENTS_SHOWN).collect();
        if shown.is_empty() {
            let _ = writeln!(o, "    (none yet)");
        }
        for line in shown.into_iter().rev() {
            let _ = writeln!(o, "  {}", line.render());
        }
        o
    }

    /// The summary, once the bots have stopped (`end` is each bot's last
    /// state, taken while the relays were still running).
    pub fn summary(&self, net: &Network, end: &[BotNow]) -> Summary {
        let s = &self.scenario;
        let duration = self.secs();
        let first = self.first_sample.as_ref();
        let last = self.samples.back();
        let live = |addr: Option<std::net::SocketAddr>| {
            addr.and_then(|a| net.by_addr.get(&a))
                .is_some_and(|&i| net.relays[i].state.live())
        };
        let playing: Vec<bool> = end
            .iter()
            .map(|b| b.relay.is_some() && matches!(b.phase, Phase::Playing | Phase::Stopped))
            .collect();
        let bytes: u64 = end.iter().map(|b| b.bytes).sum();
        let full: f64 = self.full_cost.iter().sum();
        let wire: u64 = (0..s.regions.len()).map(|r| net.wire_bytes_down(r)).sum();
        let client_secs = (self.bots.len() as f64 * duration).max(1e-9);
        let mut regions = Vec::new();
        for (r, region) in s.regions.iter().enumerate() {
            let ids: Vec<usize> = (0..self.bots.len())
                .filter(|&i| self.bots[i].region == r)
                .collect();
            let mut relays = BTreeMap::new();
            let mut rtts = Vec::new();
            let mut lat = Vec::new();
            for &i in &ids {
                if let Some(&relay) = end[i].relay.and_then(|a| net.by_addr.get(&a)) {
                    *relays.entry(net.relays[relay].name.clone()).or_insert(0) += 1;
                }
                if let Some(us) = end[i].rtt_us {
                    rtts.push(us as f64 / 1000.0);
                }
                if let Some(ms) = end[i].latency_p50_ms {
                    lat.push(ms);
                }
            }
            let rb: u64 = ids.iter().map(|&i| end[i].bytes).sum();
            let rf: f64 = ids.iter().map(|&i| self.full_cost[i]).sum();
            let rw = net.wire_bytes_down(r);
            let n_secs = (ids.len() as f64 * duration).max(1e-9);
            let fails: Vec<&Failover> = self
                .failovers
                .iter()
                .filter(|f| f.region == region.name)
                .collect();
            regions.push(RegionSummary {
                name: region.name.clone(),
                clients: ids.len(),
                playing: ids.iter().filter(|&&i| playing[i]).count(),
                relays,
                local_share: (self.local_n[r] > 0.0).then(|| self.local_sum[r] / self.local_n[r]),
                rtt_p50_ms: quantile(&rtts, 0.5),
                latency_p50_ms: quantile(&lat, 0.5),
                bytes_per_client_per_s: rb as f64 / n_secs,
                wire_bytes_per_client_per_s: rw as f64 / n_secs,
                full_snapshot_bytes_per_client_per_s: rf / n_secs,
                full_snapshot_ratio: (rf > 0.0).then(|| rb as f64 / rf),
                entities_per_client: ids.iter().map(|&i| self.entities[i] as f64).sum::<f64>()
                    / ids.len().max(1) as f64,
                divergences: ids.iter().map(|&i| end[i].divergences).sum(),
                failovers: fails.len(),
                max_failover_ms: fails.iter().map(|f| f.gap_ms).reduce(f64::max),
            });
        }
        let relays = net
            .relays
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let c = relay_counters(n);
                let lookups = c.hits + c.misses;
                RelaySummary {
                    name: n.name.clone(),
                    region: s.regions[n.region].name.clone(),
                    state: n.state,
                    clients: n.metrics.clients.get(),
                    peak_clients: self.peak_clients[i],
                    bytes_sent: c.bytes,
                    updates_sent: c.updates,
                    bytes_per_s: c.bytes as f64 / self.up_for[i].as_secs_f64().max(1e-3),
                    keyframes: n.metrics.keyframes.get(),
                    cache_hit_ratio: (lookups > 0).then(|| c.hits as f64 / lookups as f64),
                }
            })
            .collect();
        let cpu = match (
            first.and_then(|f| f.cpu_s).or(self.cpu_start),
            last.and_then(|l| l.cpu_s),
        ) {
            (Some(a), Some(b)) => {
                let secs = match (first, last) {
                    (Some(f), Some(l)) => (l.at - f.at).as_secs_f64(),
                    _ => 0.0,
                };
                (secs > 0.0).then(|| (b - a) / secs)
            }
            _ => None,
        };
        Summary {
            scenario: self.source.clone(),
            duration_s: duration,
            world: s.world.name.clone(),
            avatars: s.world.avatars,
            tick_rate: self.tick_rate,
            clients: self.bots.len(),
            clients_playing: playing.iter().filter(|p| **p).count(),
            clients_on_live_relay: end.iter().filter(|b| live(b.relay)).count(),
            clients_failed: end
                .iter()
                .filter(|b| matches!(b.phase, Phase::Failed(_)))
                .count(),
            failures: self.failures.clone(),
            divergences: end.iter().map(|b| b.divergences).sum(),
            ticks_verified: end.iter().map(|b| b.ticks).sum(),
            local_share: regions
                .iter()
                .map(|r| (r.name.clone(), r.local_share))
                .collect(),
            max_failover_ms: self.failovers.iter().map(|f| f.gap_ms).fold(0.0, f64::max),
            failovers: self.failovers.clone(),
            better_moves: self.better_moves,
            resumed_without_keyframe: end.iter().map(|b| b.resumed_without_keyframe).sum(),
            bytes_per_client_per_s: bytes as f64 / client_secs,
            wire_bytes_per_client_per_s: wire as f64 / client_secs,
            full_snapshot_bytes_per_client_per_s: full / client_secs,
            full_snapshot_ratio: if full > 0.0 { bytes as f64 / full } else { 0.0 },
            entities_per_client: self.entities.iter().sum::<usize>() as f64
                / self.bots.len().max(1) as f64,
            cpu_cores: cpu,
            faults: self.faults.clone(),
            relays,
            regions,
        }
    }
}

/// The summary for people.
pub fn summary_text(s: &Summary) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "statecast demo: {} clients, {} relays, {:.1} s; world {} ({} avatars, {} Hz); scenario {}",
        s.clients,
        s.relays.len(),
        s.duration_s,
        s.world,
        s.avatars,
        s.tick_rate,
        s.scenario
    );
    let _ = writeln!(
        o,
        "  clients      {} playing at the end, {} on a live relay, {} gave up",
        s.clients_playing, s.clients_on_live_relay, s.clients_failed
    );
    let _ = writeln!(
        o,
        "  divergences  {} in {} verified ticks",
        s.divergences, s.ticks_verified
    );
    let shares: Vec<String> = s
        .local_share
        .iter()
        .map(|(r, v)| {
            format!(
                "{r} {}",
                v.map_or("-".to_owned(), |v| format!("{:.1}%", 100.0 * v))
            )
        })
        .collect();
    let _ = writeln!(o, "  local relay  {}", shares.join(", "));
    let _ = writeln!(
        o,
        "  bandwidth    {:.1} kbit/s per client ({:.1} on the wire); full snapshots of their areas ({:.0} entities) would be {:.1} kbit/s: {:.1}%",
        s.bytes_per_client_per_s * 8.0 / 1000.0,
        s.wire_bytes_per_client_per_s * 8.0 / 1000.0,
        s.entities_per_client,
        s.full_snapshot_bytes_per_client_per_s * 8.0 / 1000.0,
        100.0 * s.full_snapshot_ratio
    );
    let _ = writeln!(
        o,
        "  failovers    {} (longest gap {:.0} ms); {} moves to a better relay; {} moves resumed without a keyframe",
        s.failovers.len(),
        s.max_failover_ms,
        s.better_moves,
        s.resumed_without_keyframe
    );
    for f in &s.faults {
        let moved: Vec<&Failover> = s
            .failovers
            .iter()
            .filter(|m| m.from == f.relay && m.at_s >= f.at_s)
            .collect();
        let gaps: Vec<f64> = moved.iter().map(|m| m.gap_ms).collect();
        let last = moved.iter().map(|m| m.at_s).fold(f.at_s, f64::max);
        let _ = writeln!(
            o,
            "    {:>6.1} s  {:?} {} ({} clients): {} moved within {:.1} s, gap p50 {:.0} ms, max {:.0} ms",
            f.at_s,
            f.kind,
            f.relay,
            f.clients,
            moved.len(),
            last - f.at_s,
            quantile(&gaps, 0.5).unwrap_or(0.0),
            gaps.iter().copied().fold(0.0, f64::max)
        );
    }
    if let Some(cpu) = s.cpu_cores {
        let _ = writeln!(
            o,
            "  cpu          {cpu:.2} cores (the whole demo: origin, relays, links, bots)"
        );
    }
    let _ = writeln!(o, "  relays");
    for r in &s.relays {
        let _ = writeln!(
            o,
            "    {:<16} {:<14} {:<9} clients {:>4} (peak {:>4})  {:>8.1} kbit/s out  cache hit {}",
            r.name,
            r.region,
            r.state.label(),
            r.clients,
            r.peak_clients,
            r.bytes_per_s * 8.0 / 1000.0,
            r.cache_hit_ratio
                .map_or("-".to_owned(), |h| format!("{:.1}%", 100.0 * h))
        );
    }
    let _ = writeln!(o, "  client regions");
    for r in &s.regions {
        let relays: Vec<String> = r.relays.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            o,
            "    {:<14} {:>4} clients on [{}], RTT p50 {}, tick latency p50 {}, {:.1} kbit/s per client, {} failovers, {} divergences",
            r.name,
            r.clients,
            relays.join(", "),
            r.rtt_p50_ms
                .map_or("-".to_owned(), |v| format!("{v:.0} ms")),
            r.latency_p50_ms
                .map_or("-".to_owned(), |v| format!("{v:.0} ms")),
            r.bytes_per_client_per_s * 8.0 / 1000.0,
            r.failovers,
            r.divergences
        );
    }
    if !s.failures.is_empty() {
        let _ = writeln!(o, "  failures");
        for f in &s.failures {
            let _ = writeln!(o, "    {f}");
        }
    }
    o
}
