//! # statecast-client
//!
//! The client library: connects to a relay, keeps a verified [`replica`] of
//! the world (or of the cells it is interested in), acknowledges what it
//! applied, and sends inputs.
//!
//! [`replica`] is the protocol core without I/O; [`session`] runs it over
//! QUIC against one relay. [`discover`] finds relays in DNS; [`select`]
//! chooses one from UDP probes, also without I/O, steered among many relays
//! by [`coords`] (network coordinates). [`roam`] puts them
//! together: a client that probes, connects to the best relay, and moves
//! (resuming its session) when that relay fails, drains or is beaten.
#![warn(missing_docs)]

pub mod coords;
pub mod discover;
pub mod replica;
pub mod roam;
pub mod select;
pub mod session;

pub use replica::{Event, Replica};
pub use select::{Candidate, Estimate, Selector};
pub use session::{Blame, Config, Session, SessionError, SessionEvent, Stats};
