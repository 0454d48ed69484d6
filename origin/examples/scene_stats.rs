//! Run with: cargo run --release -p statecast-origin --example scene_stats [TICKS]
//!
//! Steps the built-in worlds and prints what a codec will face: time per
//! step and per snapshot, and how many entities change between frames (one
//! tick apart and six ticks apart, the challenge's usual gap).

use origin::Simulation;
use origin::worlds::cubes::{CUBES, Cubes};
use origin::worlds::plaza::{Plaza, PlazaConfig};
use proto::Snapshot;
use statecast_origin as origin;
use std::time::{Duration, Instant};

fn changed(a: &Snapshot, b: &Snapshot) -> usize {
    (0..a.len()).filter(|&i| a.lanes(i) != b.lanes(i)).count()
}

fn report(name: &str, world: &mut dyn Simulation, ticks: usize) {
    let layout = world.schema().layout().expect("built-in schemas are valid");
    let mut frames = vec![world.snapshot(&layout)];
    let mut steps = Vec::with_capacity(ticks);
    let mut snap_total = Duration::ZERO;
    for _ in 0..ticks {
        let t = Instant::now();
        world.step();
        steps.push(t.elapsed());
        let t = Instant::now();
        frames.push(world.snapshot(&layout));
        snap_total += t.elapsed();
    }
    let step_total: Duration = steps.iter().sum();
    steps.sort();
    let pct = |p: f64| steps[((steps.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
    let one: Vec<usize> = frames.windows(2).map(|w| changed(&w[0], &w[1])).collect();
    let six: Vec<usize> = frames.windows(7).map(|w| changed(&w[0], &w[6])).collect();
    println!(
        "{name}: {} entities, {ticks} ticks: step mean {:.3} ms, p50 {:.3}, p99 {:.3}, max {:.3}; snapshot mean {:.3} ms",
        frames[0].len(),
        step_total.as_secs_f64() * 1e3 / ticks as f64,
        pct(0.5),
        pct(0.99),
        pct(1.0),
        snap_total.as_secs_f64() * 1e3 / ticks as f64,
    );
    println!(
        "  changed per frame: mean {:.1}, max {}; over 6 ticks: mean {:.1}, max {}",
        mean(&one),
        one.iter().max().unwrap_or(&0),
        mean(&six),
        six.iter().max().unwrap_or(&0),
    );
    // The scene over time, in windows of 500 ticks.
    for (k, chunk) in six.chunks(500).enumerate() {
        println!(
            "  ticks {:>5}..{:<5} changed over 6 ticks: mean {:>6.1}, max {:>5}",
            k * 500,
            k * 500 + chunk.len(),
            mean(chunk),
            chunk.iter().max().unwrap_or(&0),
        );
    }
    println!(
        "  state hash at tick {ticks}: {}",
        frames.last().expect("at least one frame").hash()
    );
    if frames[0].lanes_per_entity() == 8 {
        let last = frames.last().expect("at least one frame");
        let awake = (0..last.len()).filter(|&i| last.lanes(i)[7] == 1).count();
        let start = &frames[0];
        let moved = (0..CUBES - 1)
            .filter(|&i| start.lanes(i)[4..7] != last.lanes(i)[4..7])
            .count();
        println!("  at the end: {awake} awake, {moved} of 900 cubes off their start spot");
    }
}

fn main() {
    let ticks = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("TICKS is a number"))
        .unwrap_or(2000);
    report("cubes", &mut Cubes::new(1), ticks);
    report(
        "plaza",
        &mut Plaza::new(PlazaConfig::default()),
        ticks.min(1200),
    );
}
