//! `statecast demo`: an origin running a built-in world at its tick rate, with
//! a live one-screen view of what it would send.
//!
//! Every tick the world steps, is quantized into a snapshot, and the snapshot
//! is delta-coded twice, as a relay would code it for two clients: one that
//! acknowledged the previous tick, and one that acknowledged the tick `lag`
//! ticks back (100 ms at 60 Hz by default). Both deltas are decoded again and
//! checked against the snapshot, bit for bit.
//!
//! This grows into the multi-region demo (origin, relays, clients in the lab)
//! once those crates exist.

use anyhow::{Context, ensure};
use benches::measure::full_bits;
use origin::Simulation;
use proto::{Layout, Prediction, Snapshot, StateHash};
use serde::Serialize;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};
use tokio::time::MissedTickBehavior;

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// World to run (cubes, plaza).
    #[arg(long, default_value = "cubes", env = "STATECAST_WORLD")]
    pub world: String,
    /// Seed of the world's random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Seconds to run; without it, runs until Ctrl-C.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Ticks back of the older baseline [default: 100 ms of ticks, 6 for
    /// cubes at 60 Hz, 2 for plaza at 20 Hz].
    #[arg(long)]
    pub lag: Option<usize>,
    /// For plaza: number of avatars (default: the world's default).
    #[arg(long)]
    pub avatars: Option<u32>,
    /// No live view; print a JSON summary at the end.
    #[arg(long)]
    pub json: bool,
}

/// How often the live view is redrawn.
const VIEW_PERIOD: Duration = Duration::from_millis(250);
/// How often a status line is printed when stdout is not a terminal.
const LINE_PERIOD: Duration = Duration::from_secs(1);

/// Sums over a run of ticks.
#[derive(Clone, Debug, Default)]
struct Totals {
    ticks: u64,
    changed: u64,
    prev_bytes: u64,
    prev_count: u64,
    lag_bytes: u64,
    lag_count: u64,
    full_bytes: u64,
    step_ns: u128,
    step_ns_max: u128,
    snapshot_ns: u128,
    encode_ns: u128,
    decode_ns: u128,
    coded: u64,
    mismatches: u64,
}

impl Totals {
    fn add(&mut self, t: &TickStats) {
        self.ticks += 1;
        self.changed += t.changed as u64;
        if let Some(b) = t.prev_bytes {
            self.prev_bytes += b as u64;
            self.prev_count += 1;
        }
        if let Some(b) = t.lag_bytes {
            self.lag_bytes += b as u64;
            self.lag_count += 1;
        }
        self.full_bytes += t.full_bytes as u64;
        self.step_ns += t.step.as_nanos();
        self.step_ns_max = self.step_ns_max.max(t.step.as_nanos());
        self.snapshot_ns += t.snapshot.as_nanos();
        self.encode_ns += t.encode.as_nanos();
        self.decode_ns += t.decode.as_nanos();
        self.coded += t.coded as u64;
        self.mismatches += t.mismatches as u64;
    }

    fn mean(sum: u64, count: u64) -> f64 {
        if count == 0 {
            0.0
        } else {
            sum as f64 / count as f64
        }
    }

    fn changed_per_tick(&self) -> f64 {
        Self::mean(self.changed, self.ticks)
    }
    fn prev_bytes(&self) -> f64 {
        Self::mean(self.prev_bytes, self.prev_count)
    }
    fn lag_bytes(&self) -> f64 {
        Self::mean(self.lag_bytes, self.lag_count)
    }
    fn full_bytes(&self) -> f64 {
        Self::mean(self.full_bytes, self.ticks)
    }
    fn ms(ns: u128, count: u64) -> f64 {
        if count == 0 {
            0.0
        } else {
            ns as f64 / 1e6 / count as f64
        }
    }
}

/// What one tick did.
#[derive(Clone, Debug)]
struct TickStats {
    tick: u64,
    entities: usize,
    changed: usize,
    prev_bytes: Option<usize>,
    lag_bytes: Option<usize>,
    full_bytes: usize,
    hash: StateHash,
    step: Duration,
    snapshot: Duration,
    encode: Duration,
    decode: Duration,
    coded: usize,
    mismatches: usize,
}

/// Number of entities added, removed or changed from `a` to `b`.
pub fn changed_entities(a: &Snapshot, b: &Snapshot) -> usize {
    let (mut i, mut j, mut changed) = (0, 0, 0);
    let (ia, ib) = (a.ids(), b.ids());
    while i < ia.len() && j < ib.len() {
        match ia[i].cmp(&ib[j]) {
            std::cmp::Ordering::Less => {
                changed += 1;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                changed += 1;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                if a.lanes(i) != b.lanes(j) || a.blobs(i) != b.blobs(j) {
                    changed += 1;
                }
                i += 1;
                j += 1;
            }
        }
    }
    changed + (ia.len() - i) + (ib.len() - j)
}

/// The snapshot `k` ticks before the newest one held in `history` (k >= 1).
fn back(history: &VecDeque<Snapshot>, k: usize) -> Option<&Snapshot> {
    history.len().checked_sub(k).and_then(|i| history.get(i))
}

/// The world, its recent snapshots, and the coding of each tick.
struct Origin {
    sim: Box<dyn Simulation>,
    layout: Layout,
    lag: usize,
    /// Previous snapshots, oldest first, at most `2 * lag`.
    history: VecDeque<Snapshot>,
    tick: u64,
    scratch: Vec<u8>,
}

impl Origin {
    fn new(sim: Box<dyn Simulation>, lag: usize) -> anyhow::Result<Origin> {
        let layout = sim
            .schema()
            .layout()
            .context("the world declares an invalid schema")?;
        Ok(Origin {
            sim,
            layout,
            lag,
            history: VecDeque::with_capacity(2 * lag + 1),
            tick: 0,
            scratch: Vec::new(),
        })
    }

    /// Codes `target` against the snapshot `k` ticks back (predicting from
    /// `2k` back when held), decodes, and checks. Returns the size.
    fn code(&mut self, target: &Snapshot, k: usize, stats: &mut TickStats) -> Option<usize> {
        let base = back(&self.history, k)?;
        let span = u32::try_from(k).unwrap_or(u32::MAX);
        let prediction = back(&self.history, 2 * k).map(|prev| Prediction {
            prev,
            span,
            ahead: span,
        });
        let out = &mut self.scratch;
        out.clear();
        let t0 = Instant::now();
        proto::delta::encode(&self.layout, base, prediction, target, out);
        let t1 = Instant::now();
        let decoded = proto::delta::decode(&self.layout, base, prediction, out);
        stats.encode += t1 - t0;
        stats.decode += t1.elapsed();
        stats.coded += 1;
        if !matches!(&decoded, Ok(d) if d == target && d.hash() == stats.hash) {
            stats.mismatches += 1;
            tracing::error!(tick = self.tick, back = k, result = ?decoded.err(), "a delta did not decode exactly");
        }
        Some(out.len())
    }

    fn tick(&mut self) -> TickStats {
        let t0 = Instant::now();
        self.sim.step();
        let t1 = Instant::now();
        let snapshot = self.sim.snapshot(&self.layout);
        let t2 = Instant::now();
        self.tick += 1;
        let mut stats = TickStats {
            tick: self.tick,
            entities: snapshot.len(),
            changed: back(&self.history, 1)
                .map_or(snapshot.len(), |prev| changed_entities(prev, &snapshot)),
            prev_bytes: None,
            lag_bytes: None,
            full_bytes: full_bits(&self.layout, &snapshot).div_ceil(8),
            hash: snapshot.hash(),
            step: t1 - t0,
            snapshot: t2 - t1,
            encode: Duration::ZERO,
            decode: Duration::ZERO,
            coded: 0,
            mismatches: 0,
        };
        stats.prev_bytes = self.code(&snapshot, 1, &mut stats);
        stats.lag_bytes = self.code(&snapshot, self.lag, &mut stats);
        if self.history.len() == 2 * self.lag {
            self.history.pop_front();
        }
        self.history.push_back(snapshot);
        stats
    }
}

/// The end-of-run summary (`--json` prints it as one object).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// World name.
    pub world: String,
    /// Seed of the world.
    pub seed: u64,
    /// Entities in the last snapshot.
    pub entities: usize,
    /// The world's tick rate, in Hz.
    pub tick_rate: u32,
    /// Wall-clock seconds run.
    pub seconds: f64,
    /// Ticks run.
    pub ticks: u64,
    /// Ticks per second achieved.
    pub ticks_per_second: f64,
    /// Scheduled ticks that were skipped because a tick ran late.
    pub skipped_ticks: u64,
    /// Ticks back of the older baseline.
    pub lag: usize,
    /// Mean entities added, removed or changed per tick.
    pub changed_per_tick: f64,
    /// Mean delta size against the previous tick, in bytes.
    pub delta_prev_bytes_per_tick: f64,
    /// Mean delta size against the tick `lag` back, in bytes.
    pub delta_lag_bytes_per_tick: f64,
    /// Mean size of the full quantized snapshot, in bytes.
    pub full_bytes_per_tick: f64,
    /// Bandwidth of the deltas against the previous tick at the tick rate.
    pub kbps_prev: f64,
    /// Bandwidth of the deltas against the tick `lag` back at the tick rate.
    pub kbps_lag: f64,
    /// Bandwidth of full snapshots at the tick rate.
    pub full_kbps: f64,
    /// Mean simulation step time, in milliseconds.
    pub step_ms: f64,
    /// Longest step, in milliseconds.
    pub step_ms_max: f64,
    /// Mean quantization (snapshot) time, in milliseconds.
    pub snapshot_ms: f64,
    /// Mean encode time per delta, in microseconds.
    pub encode_us: f64,
    /// Mean decode time per delta, in microseconds.
    pub decode_us: f64,
    /// Whether every delta decoded exactly.
    pub exact: bool,
    /// Deltas that did not decode exactly.
    pub mismatches: u64,
    /// Last tick run.
    pub final_tick: u64,
    /// State hash of the last snapshot.
    pub final_hash: String,
}

fn summary(
    args: &Args,
    rate: u32,
    lag: usize,
    all: &Totals,
    last: Option<&TickStats>,
    elapsed: Duration,
    skipped: u64,
) -> Summary {
    let kbps = |bytes: f64| bytes * 8.0 * rate as f64 / 1000.0;
    let seconds = elapsed.as_secs_f64();
    Summary {
        world: args.world.clone(),
        seed: args.seed,
        entities: last.map_or(0, |t| t.entities),
        tick_rate: rate,
        seconds,
        ticks: all.ticks,
        ticks_per_second: all.ticks as f64 / seconds.max(1e-9),
        skipped_ticks: skipped,
        lag,
        changed_per_tick: all.changed_per_tick(),
        delta_prev_bytes_per_tick: all.prev_bytes(),
        delta_lag_bytes_per_tick: all.lag_bytes(),
        full_bytes_per_tick: all.full_bytes(),
        kbps_prev: kbps(all.prev_bytes()),
        kbps_lag: kbps(all.lag_bytes()),
        full_kbps: kbps(all.full_bytes()),
        step_ms: Totals::ms(all.step_ns, all.ticks),
        step_ms_max: all.step_ns_max as f64 / 1e6,
        snapshot_ms: Totals::ms(all.snapshot_ns, all.ticks),
        encode_us: Totals::ms(all.encode_ns, all.coded) * 1000.0,
        decode_us: Totals::ms(all.decode_ns, all.coded) * 1000.0,
        exact: all.mismatches == 0,
        mismatches: all.mismatches,
        final_tick: last.map_or(0, |t| t.tick),
        final_hash: last.map_or_else(String::new, |t| t.hash.to_string()),
    }
}

/// The live screen: the newest tick and means over the last refresh period.
fn screen(s: &Summary, window: &Totals, last: &TickStats) -> String {
    let rate = s.tick_rate as f64;
    let kbps = |bytes: f64| bytes * 8.0 * rate / 1000.0;
    let full = window.full_bytes();
    let pct = |b: f64| if full > 0.0 { 100.0 * b / full } else { 0.0 };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "statecast demo: world {} (seed {}), {} Hz; Ctrl-C to stop\n",
        s.world, s.seed, s.tick_rate
    );
    let _ = writeln!(
        o,
        "  tick               {:>10}   {:.1} s, {:.1} ticks/s, {} skipped",
        last.tick, s.seconds, s.ticks_per_second, s.skipped_ticks
    );
    let _ = writeln!(o, "  entities           {:>10}", last.entities);
    let _ = writeln!(
        o,
        "  changed per tick   {:>10.1}   {:.1}% of entities",
        window.changed_per_tick(),
        100.0 * window.changed_per_tick() / last.entities.max(1) as f64
    );
    let _ = writeln!(
        o,
        "  delta vs tick-1    {:>10.1} B   {:>9.1} kbps   {:>5.2}% of full",
        window.prev_bytes(),
        kbps(window.prev_bytes()),
        pct(window.prev_bytes())
    );
    let _ = writeln!(
        o,
        "  delta vs tick-{:<4} {:>10.1} B   {:>9.1} kbps   {:>5.2}% of full",
        s.lag,
        window.lag_bytes(),
        kbps(window.lag_bytes()),
        pct(window.lag_bytes())
    );
    let _ = writeln!(
        o,
        "  full snapshot      {:>10.1} B   {:>9.1} kbps",
        full,
        kbps(full)
    );
    let _ = writeln!(o, "  state hash         {:>16}", last.hash);
    let _ = writeln!(
        o,
        "  step               {:>10.3} ms  (max {:.3} ms); quantize {:.3} ms",
        Totals::ms(window.step_ns, window.ticks),
        window.step_ns_max as f64 / 1e6,
        Totals::ms(window.snapshot_ns, window.ticks)
    );
    let _ = writeln!(
        o,
        "  codec per delta    {:>10.1} us encode, {:.1} us decode; {}",
        Totals::ms(window.encode_ns, window.coded) * 1000.0,
        Totals::ms(window.decode_ns, window.coded) * 1000.0,
        if s.mismatches == 0 {
            "every delta exact".to_string()
        } else {
            format!("{} deltas NOT exact", s.mismatches)
        }
    );
    o
}

fn summary_text(s: &Summary) -> String {
    let mut o = String::new();
    let pct = |b: f64| 100.0 * b / s.full_bytes_per_tick.max(1e-9);
    let _ = writeln!(
        o,
        "demo summary: world {} (seed {}), {} entities, {} ticks in {:.1} s ({:.1} ticks/s of {} Hz, {} skipped)",
        s.world,
        s.seed,
        s.entities,
        s.ticks,
        s.seconds,
        s.ticks_per_second,
        s.tick_rate,
        s.skipped_ticks
    );
    let _ = writeln!(
        o,
        "  changed per tick {:.1}; delta vs tick-1 {:.1} B ({:.1} kbps, {:.2}% of full); vs tick-{} {:.1} B ({:.1} kbps, {:.2}% of full); full {:.0} B ({:.0} kbps)",
        s.changed_per_tick,
        s.delta_prev_bytes_per_tick,
        s.kbps_prev,
        pct(s.delta_prev_bytes_per_tick),
        s.lag,
        s.delta_lag_bytes_per_tick,
        s.kbps_lag,
        pct(s.delta_lag_bytes_per_tick),
        s.full_bytes_per_tick,
        s.full_kbps
    );
    let _ = writeln!(
        o,
        "  step {:.3} ms (max {:.3}); quantize {:.3} ms; encode {:.1} us, decode {:.1} us per delta; {}; final tick {} hash {}",
        s.step_ms,
        s.step_ms_max,
        s.snapshot_ms,
        s.encode_us,
        s.decode_us,
        if s.exact { "all exact" } else { "NOT EXACT" },
        s.final_tick,
        s.final_hash
    );
    o
}

/// Where the live view goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum View {
    /// Redraw one screen on a terminal.
    Screen,
    /// One status line per second (stdout is a pipe or a file).
    Lines,
    /// Nothing until the summary (`--json`).
    Quiet,
}

/// Runs the demo until the duration ends or Ctrl-C.
pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(d) = args.duration {
        ensure!(
            d.is_finite() && d > 0.0,
            "--duration must be a positive number of seconds"
        );
    }
    let sim = crate::trace::world(&args.world, args.seed, args.avatars)?;
    let rate = sim.tick_rate();
    ensure!(rate > 0, "world {} declares a tick rate of 0", args.world);
    // By default the older baseline is 100 ms back, the challenge's rule.
    let lag = args
        .lag
        .unwrap_or_else(|| (f64::from(rate) / 10.0).round().max(1.0) as usize);
    ensure!(lag >= 1, "--lag must be at least 1");
    let mut origin = Origin::new(sim, lag)?;
    let view = if args.json {
        View::Quiet
    } else if std::io::stdout().is_terminal() {
        View::Screen
    } else {
        View::Lines
    };
    tracing::info!(world = %args.world, seed = args.seed, tick_rate = rate, duration = ?args.duration, "demo starting");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let run = runtime.block_on(drive(&args, rate, &mut origin, view))?;
    let s = summary(
        &args,
        rate,
        lag,
        &run.all,
        run.last.as_ref(),
        run.elapsed,
        run.skipped,
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", summary_text(&s));
    }
    ensure!(s.exact, "{} deltas did not decode exactly", s.mismatches);
    Ok(())
}

/// What a run did, for the summary.
struct Run {
    all: Totals,
    last: Option<TickStats>,
    elapsed: Duration,
    skipped: u64,
}

async fn drive(args: &Args, rate: u32, origin: &mut Origin, view: View) -> anyhow::Result<Run> {
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let duration = args.duration.map(Duration::from_secs_f64);
    let stop = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    let started = Instant::now();
    let mut all = Totals::default();
    let mut window = Totals::default();
    let mut last: Option<TickStats> = None;
    let mut next_view = started;
    let mut first_tick: Option<tokio::time::Instant> = None;
    let mut skipped = 0u64;
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            biased;
            signal = &mut ctrl_c => {
                signal.context("cannot listen for Ctrl-C")?;
                tracing::info!("Ctrl-C: stopping");
                break;
            }
            () = &mut stop => break,
            at = interval.tick() => {
                // Ticks the interval skipped because the previous ones ran late.
                let start = *first_tick.get_or_insert(at);
                let index = ((at - start).as_secs_f64() / period.as_secs_f64()).round() as u64;
                skipped = index.saturating_sub(all.ticks);
                let stats = origin.tick();
                all.add(&stats);
                window.add(&stats);
                let now = Instant::now();
                if view != View::Quiet && now >= next_view {
                    let s = summary(args, rate, origin.lag, &all, Some(&stats), now - started, skipped);
                    match view {
                        View::Screen => {
                            // Home, draw, clear what is left of the old screen.
                            let _ = write!(stdout, "\x1b[H{}\x1b[J", screen(&s, &window, &stats).replace('\n', "\x1b[K\n"));
                            next_view = now + VIEW_PERIOD;
                        }
                        _ => {
                            let _ = writeln!(
                                stdout,
                                "tick {} entities {} changed {:.1} delta-1 {:.1} B delta-{} {:.1} B full {:.0} B hash {} step {:.3} ms",
                                stats.tick, stats.entities, window.changed_per_tick(), window.prev_bytes(),
                                origin.lag, window.lag_bytes(), window.full_bytes(), stats.hash,
                                Totals::ms(window.step_ns, window.ticks),
                            );
                            next_view = now + LINE_PERIOD;
                        }
                    }
                    let _ = stdout.flush();
                    window = Totals::default();
                }
                last = Some(stats);
            }
        }
    }
    if view == View::Screen {
        let _ = write!(stdout, "\x1b[H\x1b[J");
    }
    Ok(Run {
        all,
        last,
        elapsed: started.elapsed(),
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Component, Encoding, Field, Schema};

    fn layout() -> Layout {
        Schema {
            name: "t".into(),
            components: vec![Component {
                name: "c".into(),
                fields: vec![Field {
                    name: "v".into(),
                    encoding: Encoding::Int { min: 0, max: 100 },
                }],
            }],
            position: None,
            max_entities: 10,
        }
        .layout()
        .unwrap()
    }

    fn snap(layout: &Layout, entities: &[(u32, u32)]) -> Snapshot {
        let lanes: Vec<[u32; 1]> = entities.iter().map(|&(_, v)| [v]).collect();
        Snapshot::from_entities(
            layout,
            entities
                .iter()
                .zip(&lanes)
                .map(|(&(id, _), l)| (id, &l[..], &[][..])),
        )
        .unwrap()
    }

    #[test]
    fn changed_entities_counts_added_removed_and_changed() {
        let l = layout();
        let a = snap(&l, &[(1, 5), (2, 6), (4, 7)]);
        let b = snap(&l, &[(2, 6), (3, 1), (4, 8), (9, 9)]);
        // 1 removed, 3 and 9 added, 4 changed; 2 the same.
        assert_eq!(changed_entities(&a, &b), 4);
        assert_eq!(changed_entities(&b, &a), 4);
        assert_eq!(changed_entities(&a, &a), 0);
        assert_eq!(changed_entities(&Snapshot::empty(&l), &a), 3);
    }

    #[test]
    fn origin_codes_against_both_baselines_once_it_has_history() {
        let sim = origin::worlds::by_name("cubes", 3).unwrap();
        let mut origin = Origin::new(sim, 2).unwrap();
        let first = origin.tick();
        assert_eq!((first.prev_bytes, first.lag_bytes), (None, None));
        assert_eq!(first.changed, first.entities);
        let second = origin.tick();
        assert!(second.prev_bytes.is_some() && second.lag_bytes.is_none());
        let mut all = Totals::default();
        for _ in 0..10 {
            let t = origin.tick();
            assert!(t.prev_bytes.is_some() && t.lag_bytes.is_some());
            assert_eq!(t.mismatches, 0);
            assert_eq!(t.coded, 2);
            all.add(&t);
        }
        assert_eq!(origin.history.len(), 4);
        assert_eq!(origin.tick, 12);
        assert!(all.full_bytes() > all.lag_bytes());
    }
}
