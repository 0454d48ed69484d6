//! Measurement tools for statecast: the bit-packed baseline codec, trace
//! files, and the codec run over a trace that `statecast trace bench` and the
//! criterion benches report; the fan-out load tool ([`fanout`], binary
//! `fanout`).
//!
//! Figures and the commands that produce them are in `benches/README.md`.

pub mod bitpack;
pub mod fanout;
pub mod measure;
pub mod trace;

use origin::Simulation;
use proto::{Layout, Snapshot};

/// Steps `sim` `ticks` times and returns the snapshot after each step.
pub fn record(sim: &mut dyn Simulation, layout: &Layout, ticks: usize) -> Vec<Snapshot> {
    (0..ticks)
        .map(|_| {
            sim.step();
            sim.snapshot(layout)
        })
        .collect()
}
