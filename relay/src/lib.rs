//! # statecast-relay
//!
//! A relay subscribes once upstream (to an origin or another relay) per
//! world, keeps a ring of recent ticks split into spatial cells, and fans the
//! world out to many clients, each update delta-coded against what that
//! client acknowledged and filtered to its area of interest.
//!
//! [`fanout`] is the protocol core without I/O; [`server`] moves its bytes
//! over QUIC, forwards inputs upstream, serves metrics and drains.
//! [`probe`] answers the UDP latency probes clients choose relays with.
#![warn(missing_docs)]

pub mod config;
pub mod coords;
pub mod fanout;
pub mod metrics;
pub mod priority;
pub mod probe;
pub mod server;

pub use config::Config;
pub use server::{RelayError, RelayHandle, run, start};
