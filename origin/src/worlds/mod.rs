//! Built-in worlds, by name.
//!
//! - [`cubes`]: the 901-cube physics scene of the snapshot compression
//!   challenge (rapier, 60 Hz); small, dense, many changes per tick.
//! - [`plaza`]: a large open world of walking avatars (20 Hz); many
//!   entities spread far apart, for interest management and fan-out.

use crate::sim::Simulation;

pub mod cubes;
pub mod plaza;

/// Names of the built-in worlds, as [`by_name`] takes them.
pub const WORLDS: &[&str] = &["cubes", "plaza"];

/// A world name that [`by_name`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown world {name:?}; known worlds: {}", WORLDS.join(", "))]
pub struct UnknownWorld {
    /// The name asked for.
    pub name: String,
}

/// The built-in world called `name`, in its default configuration, with its
/// random choices drawn from `seed`.
pub fn by_name(name: &str, seed: u64) -> Result<Box<dyn Simulation>, UnknownWorld> {
    match name {
        "cubes" => Ok(Box::new(cubes::Cubes::new(seed))),
        "plaza" => Ok(Box::new(plaza::Plaza::new(plaza::PlazaConfig {
            seed,
            ..plaza::PlazaConfig::default()
        }))),
        _ => Err(UnknownWorld { name: name.into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_world_builds_and_unknown_names_are_refused() {
        for name in WORLDS {
            let world = by_name(name, 1).unwrap();
            assert_eq!(world.schema().name, *name);
            world.schema().layout().unwrap();
        }
        let err = by_name("cube", 1).err().unwrap();
        assert_eq!(err.name, "cube");
        let msg = err.to_string();
        assert!(msg.contains("cubes") && msg.contains("plaza"), "{msg}");
    }
}
