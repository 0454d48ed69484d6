//! # statecast-origin: the authoritative side
//!
//! An origin runs a world's authoritative simulation at a fixed tick rate and
//! quantizes its state, every tick, into the canonical [`proto::Snapshot`]
//! that relays fan out. A world is anything that implements [`Simulation`]:
//! it declares its [`proto::Schema`], steps, produces snapshots, and hands
//! entities to client sessions that drive them with small opaque inputs.
//!
//! Two worlds are built in ([`worlds`]): `cubes`, the physics scene of the
//! snapshot compression challenge, and `plaza`, a large open world of walking
//! avatars. Both are deterministic: the same seed and the same calls give the
//! same snapshots, tick after tick.
#![warn(missing_docs)]

pub mod sim;
pub mod worlds;

pub use sim::{InputError, SessionId, Simulation};
