//! Delta codec encode and decode times on the built-in worlds.
//!
//! Run with `cargo bench -p statecast-benches --bench codec` (add a filter,
//! e.g. `-- cubes`, to run some). Figures are in benches/README.md.
//!
//! - `cubes`: 400 ticks of the cubes world (seed 1), each packet coding tick
//!   `i` against tick `i - 6` with a prediction from `i - 12` (100 ms at
//!   60 Hz, the challenge's rule); one iteration codes one packet, cycling
//!   through the trace.
//! - `plaza_1k`, `plaza_10k`: plaza with 1,000 and 10,000 avatars, coding
//!   tick `i` against `i - 2` with a prediction from `i - 4` (100 ms at
//!   20 Hz), and the keyframe of the last tick (a delta from empty).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use origin::worlds::{cubes::Cubes, plaza};
use proto::{Layout, Prediction, Snapshot};
use std::hint::black_box;
use std::time::Duration;

/// A recorded world and the packets to code: (target, lag) pairs.
struct Case {
    name: String,
    layout: Layout,
    frames: Vec<Snapshot>,
    lag: usize,
}

impl Case {
    fn record(name: &str, mut sim: Box<dyn origin::Simulation>, ticks: usize, lag: usize) -> Case {
        let layout = sim.schema().layout().expect("built-in schemas are valid");
        let frames = statecast_benches::record(sim.as_mut(), &layout, ticks);
        Case {
            name: name.to_string(),
            layout,
            frames,
            lag,
        }
    }

    /// Target indexes that have both a baseline and a prediction.
    fn targets(&self) -> std::ops::Range<usize> {
        2 * self.lag..self.frames.len()
    }

    fn prediction(&self, i: usize) -> Prediction<'_> {
        Prediction {
            prev: &self.frames[i - 2 * self.lag],
            span: self.lag as u32,
            ahead: self.lag as u32,
        }
    }

    fn encode(&self, i: usize, out: &mut Vec<u8>) {
        out.clear();
        proto::delta::encode(
            &self.layout,
            &self.frames[i - self.lag],
            Some(self.prediction(i)),
            &self.frames[i],
            out,
        );
    }

    fn mean_packet(&self) -> f64 {
        let mut out = Vec::new();
        let total: usize = self
            .targets()
            .map(|i| {
                self.encode(i, &mut out);
                out.len()
            })
            .sum();
        total as f64 / self.targets().len() as f64
    }
}

fn delta_benches(c: &mut Criterion, case: &Case) {
    let mut group = c.benchmark_group(&case.name);
    let entities = case.frames.last().map_or(0, Snapshot::len);
    // Reported as entities per second.
    group.throughput(Throughput::Elements(entities as u64));
    eprintln!(
        "{}: {} entities, {} packets, mean {:.1} bytes per packet (lag {})",
        case.name,
        entities,
        case.targets().len(),
        case.mean_packet(),
        case.lag
    );
    let targets: Vec<usize> = case.targets().collect();
    let mut out = Vec::new();
    let mut k = 0;
    group.bench_function(
        BenchmarkId::new("encode", format!("lag{}", case.lag)),
        |b| {
            b.iter(|| {
                let i = targets[k % targets.len()];
                k += 1;
                case.encode(black_box(i), &mut out);
                out.len()
            })
        },
    );
    let packets: Vec<Vec<u8>> = targets
        .iter()
        .map(|&i| {
            let mut out = Vec::new();
            case.encode(i, &mut out);
            out
        })
        .collect();
    let mut k = 0;
    group.bench_function(
        BenchmarkId::new("decode", format!("lag{}", case.lag)),
        |b| {
            b.iter(|| {
                let j = k % targets.len();
                k += 1;
                let i = targets[j];
                proto::delta::decode(
                    &case.layout,
                    &case.frames[i - case.lag],
                    Some(case.prediction(i)),
                    black_box(&packets[j]),
                )
                .expect("packets decode")
            })
        },
    );
    group.finish();
}

fn keyframe_benches(c: &mut Criterion, case: &Case) {
    let mut group = c.benchmark_group(&case.name);
    let empty = Snapshot::empty(&case.layout);
    let target = case.frames.last().expect("frames were recorded");
    group.throughput(Throughput::Elements(target.len() as u64));
    let mut keyframe = Vec::new();
    proto::delta::encode(&case.layout, &empty, None, target, &mut keyframe);
    eprintln!(
        "{}: keyframe of {} entities is {} bytes ({} bytes packed)",
        case.name,
        target.len(),
        keyframe.len(),
        target.packed_bits(&case.layout).div_ceil(8)
    );
    let mut out = Vec::new();
    group.bench_function("keyframe/encode", |b| {
        b.iter(|| {
            out.clear();
            proto::delta::encode(&case.layout, &empty, None, black_box(target), &mut out);
            out.len()
        })
    });
    group.bench_function("keyframe/decode", |b| {
        b.iter(|| {
            proto::delta::decode(&case.layout, &empty, None, black_box(&keyframe))
                .expect("keyframe decodes")
        })
    });
    group.finish();
}

fn plaza(avatars: u32) -> Box<dyn origin::Simulation> {
    Box::new(plaza::Plaza::new(plaza::PlazaConfig {
        avatars,
        seed: 1,
        ..plaza::PlazaConfig::default()
    }))
}

fn cubes(c: &mut Criterion) {
    let case = Case::record("cubes", Box::new(Cubes::new(1)), 400, 6);
    delta_benches(c, &case);
}

fn plaza_1k(c: &mut Criterion) {
    let case = Case::record("plaza_1k", plaza(1_000), 40, 2);
    delta_benches(c, &case);
    keyframe_benches(c, &case);
}

fn plaza_10k(c: &mut Criterion) {
    let case = Case::record("plaza_10k", plaza(10_000), 24, 2);
    delta_benches(c, &case);
    keyframe_benches(c, &case);
}

fn config() -> Criterion {
    // Two shared cores: short, steady runs rather than long ones.
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = codec;
    config = config();
    targets = cubes, plaza_1k, plaza_10k
}
criterion_main!(codec);
