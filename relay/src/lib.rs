//! # statecast-relay
//!
//! A relay subscribes once upstream (to an origin or another relay) per
//! world, keeps a ring of recent ticks split into spatial cells, and fans the
//! world out to many clients, each update delta-coded against what that
//! client acknowledged and filtered to its area of interest.
//!
//! [`fanout`] is the protocol core without I/O; the network layers only move
//! its bytes.
#![warn(missing_docs)]

pub mod fanout;
