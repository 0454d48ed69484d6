//! # statecast lab
//!
//! Tools that let one machine stand in for a network of regions.
//!
//! The machines statecast is developed and tested on have no kernel delay
//! emulation (no netem), so [`link`] emulates links in user space: a UDP
//! relay between two addresses that delays, jitters, drops, reorders and
//! rate-limits each direction, deterministically from a seed. Tests, benches
//! and the demo put one in front of a relay to give it a region's RTT; the
//! command line has it as `statecast lab link`.
//!
//! [`route`] runs the real relay selector (and network coordinates) for
//! every client of a latency [`matrix`], in simulated time: how well a
//! client among hundreds of relays chooses, and at what probing cost. The
//! command line has it as `statecast lab route`.

#![warn(missing_docs)]

pub mod link;
pub mod matrix;
pub mod route;

pub use link::{Direction, DirectionStats, Link, LinkConfig, LinkStats};
pub use matrix::{Matrix, MatrixError};
pub use route::{Network, Report, RouteConfig, Strategy};
