//! The [`Simulation`] trait: what an origin needs from a world.
//!
//! A simulation owns the authoritative state of one world shard. The origin's
//! tick loop calls [`Simulation::step`] at [`Simulation::tick_rate`], then
//! [`Simulation::snapshot`] to quantize the state into the canonical
//! [`proto::Snapshot`] that relays and clients reconstruct bit for bit. Client
//! sessions reach the world through [`Simulation::join`],
//! [`Simulation::input`] and [`Simulation::leave`]; inputs are opaque
//! application bytes that the world checks and applies to the entity the
//! session owns.
//!
//! A simulation must be deterministic for its own sake (the same seed and the
//! same calls give the same snapshots); the network never depends on it, since
//! only quantized snapshots travel, but tests, traces and replays do.

/// Identifier of a client session, chosen by the origin (unique per world).
pub type SessionId = u64;

/// Longest input, in bytes, that a world accepts ([`Simulation::input`]).
pub const MAX_INPUT_LEN: usize = 64;

/// Why an input was refused. A refused input changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// The session drives no entity of this world: it never joined, it left,
    /// or the world had no free entity for it.
    #[error("session {0} drives no entity in this world")]
    UnknownSession(SessionId),
    /// The bytes do not form a valid input of this world.
    #[error("malformed input of {len} bytes: {reason}")]
    Malformed {
        /// Length of the refused input.
        len: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// An authoritative world, stepped at a fixed rate by the origin.
///
/// Call order per tick: apply the inputs that arrived ([`input`](Self::input),
/// [`join`](Self::join), [`leave`](Self::leave)), then [`step`](Self::step),
/// then [`snapshot`](Self::snapshot) for the new tick.
pub trait Simulation: Send + 'static {
    /// The world's schema (constant for the life of the simulation).
    fn schema(&self) -> &proto::Schema;

    /// Ticks per second this world is meant to run at (cubes 60, plaza 20).
    fn tick_rate(&self) -> u32;

    /// Advances the world by one tick (1/tick_rate seconds).
    fn step(&mut self);

    /// The quantized state now, as a canonical snapshot of `layout` (the
    /// layout compiled from [`schema`](Self::schema)).
    fn snapshot(&self, layout: &proto::Layout) -> proto::Snapshot;

    /// A client session joined: give it an entity to drive, if the world has
    /// one free. Returns its entity id. Joining again while holding an entity
    /// returns the same entity.
    fn join(&mut self, session: SessionId) -> Option<proto::EntityId>;

    /// The session left: release its entity (the world takes it back, e.g.
    /// the avatar walks on by itself). Unknown sessions are ignored.
    fn leave(&mut self, session: SessionId);

    /// Applies one input of a session (application-defined bytes, at most
    /// [`MAX_INPUT_LEN`]). Bad input returns `Err` and changes nothing.
    fn input(&mut self, session: SessionId, input: &[u8]) -> Result<(), InputError>;
}

/// Reads a move direction from two signed bytes, each scaled to `[-1, 1]`
/// (-128 counts as -1), and shortens it to length 1 at most.
pub(crate) fn direction(x: u8, y: u8) -> [f64; 2] {
    let axis = |b: u8| (f64::from(b as i8) / 127.0).clamp(-1.0, 1.0);
    let (x, y) = (axis(x), axis(y));
    let len = (x * x + y * y).sqrt();
    if len > 1.0 {
        [x / len, y / len]
    } else {
        [x, y]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_scales_and_clamps() {
        assert_eq!(direction(0, 0), [0.0, 0.0]);
        assert_eq!(direction(127, 0), [1.0, 0.0]);
        assert_eq!(direction(0, 0x80), [0.0, -1.0]);
        let [x, y] = direction(127, 127);
        assert!(((x * x + y * y).sqrt() - 1.0).abs() < 1e-12);
        assert!((x - y).abs() < 1e-12);
        let [x, _] = direction(64, 0);
        assert!((x - 64.0 / 127.0).abs() < 1e-12);
    }
}
