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
//!
//! The server ([`server`]) runs a world at its tick rate on a thread of its
//! own ([`tick`]), publishes every tick to the relays subscribed over QUIC
//! (the upstream feed, [`transport::feed`]), applies the inputs they forward,
//! and serves metrics and health on an admin listener. [`start`] returns a
//! handle (tests, tools); [`run`] serves until a shutdown future resolves
//! (`statecast origin`). [`Config`] is what both take.
#![warn(missing_docs)]

pub mod config;
pub mod server;
pub mod sim;
pub mod tick;
pub mod worlds;

pub use config::Config;
pub use server::{OriginError, OriginHandle, build_world, run, start, start_with};
pub use sim::{InputError, SessionId, Simulation};
