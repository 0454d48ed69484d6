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

#![warn(missing_docs)]

pub mod link;

pub use link::{Direction, DirectionStats, Link, LinkConfig, LinkStats};
