//! # statecast-proto: everything on the wire
//!
//! This crate holds what statecast nodes say to each other, with no sockets,
//! no clocks and no async: world [`schema`]s, [`quant`]ization, canonical
//! [`snapshot`]s with their state hash, the [`delta`] codec, and message
//! framing. Every other crate moves these bytes; none reinterprets them.
//!
//! ## The model
//!
//! The origin quantizes its world once per tick into a [`Snapshot`]: the
//! sorted set of entities with integer lanes. Every node that reconstructs the
//! same tick holds the same bits, and the 64-bit [`StateHash`] proves it.
//! Updates are deltas from a baseline snapshot the receiver already holds
//! (a keyframe is a delta from the empty snapshot); decoding is exact.
//!
//! Decoders take untrusted bytes: they never panic, never loop without end,
//! and never allocate beyond the limits that the schema and the framing
//! declare.
#![warn(missing_docs)]

pub mod delta;
pub mod interest;
pub mod msg;
pub mod quant;
mod rc;
pub mod schema;
pub mod snapshot;
pub mod wire;

pub use delta::{DeltaError, Prediction};
pub use msg::{ErrorCode, FrameReader, Message, MessageType, VERSION, decode_frame};
pub use schema::{Component, Encoding, Field, LaneKind, Layout, Position, Schema, SchemaError};
pub use snapshot::{EntityId, Snapshot, SnapshotBuilder, SnapshotError, StateHash};
pub use wire::{DecodeError, EncodeError};
