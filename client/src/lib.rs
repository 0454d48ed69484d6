//! # statecast-client
//!
//! The client library: connects to a relay, keeps a verified [`replica`] of
//! the world (or of the cells it is interested in), acknowledges what it
//! applied, and sends inputs.
#![warn(missing_docs)]

pub mod replica;
