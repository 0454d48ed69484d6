//! Canonical quantized snapshots and their state hash.
//!
//! A snapshot is the set of a world's entities at one tick, sorted by id, each
//! with its quantized lanes (see [`crate::schema::Layout`]) and byte fields.
//! It is stored column-wise (ids, then all lanes row by row) so that the codec
//! and the hash walk memory in order.
//!
//! The [`StateHash`] of a snapshot is the wrapping sum of a 64-bit hash of
//! each entity (id, lanes, bytes). A sum is order-free and composable: the hash
//! of a set of spatial cells is the sum of the cells' hashes, so a client that
//! holds only some cells verifies exactly what it holds, and a relay can
//! update hashes entity by entity.

use crate::schema::Layout;
use std::fmt;
use xxhash_rust::xxh3::Xxh3;

/// Identifier of an entity, unique within a world.
pub type EntityId = u32;

/// The 64-bit hash of a snapshot or of part of one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateHash(pub u64);

impl StateHash {
    /// Adds the hash of disjoint content (another cell, another entity).
    #[must_use]
    pub fn combine(self, other: StateHash) -> StateHash {
        StateHash(self.0.wrapping_add(other.0))
    }
}

impl fmt::Display for StateHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Why entity data was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The entity has the wrong number of lanes or blobs for the layout.
    #[error("entity {id}: expected {expected} lanes and {blobs} blobs")]
    Shape {
        /// Entity id.
        id: EntityId,
        /// Lanes the layout asks for.
        expected: usize,
        /// Blobs the layout asks for.
        blobs: usize,
    },
    /// A lane holds a value beyond its range.
    #[error("entity {id}: lane {lane} holds {value}, above its maximum {max}")]
    OutOfRange {
        /// Entity id.
        id: EntityId,
        /// Lane index.
        lane: usize,
        /// Value found.
        value: u32,
        /// Largest allowed.
        max: u32,
    },
    /// A byte field is longer than its `max_len`.
    #[error("entity {id}: bytes field {blob} is {len} bytes, longer than {max}")]
    BlobTooLong {
        /// Entity id.
        id: EntityId,
        /// Blob index.
        blob: usize,
        /// Its length.
        len: usize,
        /// Allowed length.
        max: u32,
    },
    /// Two entities share an id.
    #[error("entity {0} appears twice")]
    Duplicate(EntityId),
    /// More entities than the schema's `max_entities`.
    #[error("{count} entities, the world allows {max}")]
    TooMany {
        /// Entities given.
        count: usize,
        /// Allowed.
        max: usize,
    },
}

/// The quantized state of a world (or of part of it) at one tick.
#[derive(Clone, PartialEq, Eq)]
pub struct Snapshot {
    lanes_per: usize,
    blobs_per: usize,
    ids: Vec<EntityId>,
    lanes: Vec<u32>,
    blobs: Vec<Vec<u8>>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("entities", &self.ids.len())
            .field("hash", &self.hash())
            .finish()
    }
}

impl Snapshot {
    /// The empty snapshot of a world: the baseline of a keyframe.
    pub fn empty(layout: &Layout) -> Snapshot {
        Snapshot {
            lanes_per: layout.lane_count(),
            blobs_per: layout.blob_count(),
            ids: Vec::new(),
            lanes: Vec::new(),
            blobs: Vec::new(),
        }
    }

    /// Builds a snapshot from entities in any order, checking every value
    /// against the layout.
    pub fn from_entities<'a, I>(layout: &Layout, entities: I) -> Result<Snapshot, SnapshotError>
    where
        I: IntoIterator<Item = (EntityId, &'a [u32], &'a [Vec<u8>])>,
    {
        let mut builder = SnapshotBuilder::new(layout);
        for (id, lanes, blobs) in entities {
            builder.push(id, lanes, blobs)?;
        }
        builder.finish()
    }

    /// Number of entities.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the snapshot holds no entity.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Lanes per entity.
    pub fn lanes_per_entity(&self) -> usize {
        self.lanes_per
    }

    /// Blobs per entity.
    pub fn blobs_per_entity(&self) -> usize {
        self.blobs_per
    }

    /// Entity ids, ascending.
    pub fn ids(&self) -> &[EntityId] {
        &self.ids
    }

    /// The lanes of the entity at `index` (not id).
    pub fn lanes(&self, index: usize) -> &[u32] {
        &self.lanes[index * self.lanes_per..(index + 1) * self.lanes_per]
    }

    /// All lanes, entity after entity.
    pub fn all_lanes(&self) -> &[u32] {
        &self.lanes
    }

    /// The blobs of the entity at `index`.
    pub fn blobs(&self, index: usize) -> &[Vec<u8>] {
        &self.blobs[index * self.blobs_per..(index + 1) * self.blobs_per]
    }

    /// Index of entity `id`, if present.
    pub fn find(&self, id: EntityId) -> Option<usize> {
        self.ids.binary_search(&id).ok()
    }

    /// Hash of the entity at `index`.
    pub fn entity_hash(&self, index: usize) -> StateHash {
        let mut h = Xxh3::with_seed(0x5354_4154_4543_4153); // "STATECAS"
        h.update(&self.ids[index].to_le_bytes());
        for lane in self.lanes(index) {
            h.update(&lane.to_le_bytes());
        }
        for blob in self.blobs(index) {
            h.update(&(blob.len() as u32).to_le_bytes());
            h.update(blob);
        }
        StateHash(h.digest())
    }

    /// The state hash: the wrapping sum of every entity's hash.
    pub fn hash(&self) -> StateHash {
        (0..self.len()).fold(StateHash(0), |acc, i| acc.combine(self.entity_hash(i)))
    }

    /// A snapshot of the entities at the given indexes (ascending).
    pub fn select(&self, indexes: impl IntoIterator<Item = usize>) -> Snapshot {
        let mut out = Snapshot {
            lanes_per: self.lanes_per,
            blobs_per: self.blobs_per,
            ids: Vec::new(),
            lanes: Vec::new(),
            blobs: Vec::new(),
        };
        for i in indexes {
            debug_assert!(out.ids.last().is_none_or(|&last| last < self.ids[i]));
            out.ids.push(self.ids[i]);
            out.lanes.extend_from_slice(self.lanes(i));
            out.blobs.extend_from_slice(self.blobs(i));
        }
        out
    }

    /// Appends an entity whose id is above every id held so far, and whose
    /// values the caller (the decoder) has already checked.
    pub(crate) fn push_checked(&mut self, id: EntityId, lanes: &[u32], blobs: &[Vec<u8>]) {
        debug_assert!(self.ids.last().is_none_or(|&last| last < id));
        debug_assert_eq!(lanes.len(), self.lanes_per);
        self.ids.push(id);
        self.lanes.extend_from_slice(lanes);
        self.blobs.extend_from_slice(blobs);
    }

    pub(crate) fn with_capacity(layout: &Layout, entities: usize) -> Snapshot {
        Snapshot {
            lanes_per: layout.lane_count(),
            blobs_per: layout.blob_count(),
            ids: Vec::with_capacity(entities),
            lanes: Vec::with_capacity(entities * layout.lane_count()),
            blobs: Vec::with_capacity(entities * layout.blob_count()),
        }
    }

    /// Whether this snapshot's shape fits `layout`.
    pub fn fits(&self, layout: &Layout) -> bool {
        self.lanes_per == layout.lane_count() && self.blobs_per == layout.blob_count()
    }

    /// Raw size of the snapshot sent without compression: per entity a 32-bit
    /// id, every lane packed to its declared bits, and each blob with a
    /// 16-bit length. The yardstick that delta sizes are compared with.
    pub fn packed_bits(&self, layout: &Layout) -> usize {
        let lane_bits: usize = layout.lanes().iter().map(|l| l.bits() as usize).sum();
        let blob_bits: usize = self.blobs.iter().map(|b| 16 + 8 * b.len()).sum();
        self.len() * (32 + lane_bits) + blob_bits
    }
}

/// Collects entities in any order and checks them into a [`Snapshot`].
pub struct SnapshotBuilder<'l> {
    layout: &'l Layout,
    rows: Vec<(EntityId, usize)>,
    lanes: Vec<u32>,
    blobs: Vec<Vec<u8>>,
}

impl<'l> SnapshotBuilder<'l> {
    /// A builder for snapshots of `layout`'s world.
    pub fn new(layout: &'l Layout) -> Self {
        SnapshotBuilder {
            layout,
            rows: Vec::new(),
            lanes: Vec::new(),
            blobs: Vec::new(),
        }
    }

    /// Adds one entity, checking its lanes and blobs.
    pub fn push(
        &mut self,
        id: EntityId,
        lanes: &[u32],
        blobs: &[Vec<u8>],
    ) -> Result<(), SnapshotError> {
        let layout = self.layout;
        if lanes.len() != layout.lane_count() || blobs.len() != layout.blob_count() {
            return Err(SnapshotError::Shape {
                id,
                expected: layout.lane_count(),
                blobs: layout.blob_count(),
            });
        }
        for (lane, (&value, kind)) in lanes.iter().zip(layout.lanes()).enumerate() {
            if value > kind.max() {
                return Err(SnapshotError::OutOfRange {
                    id,
                    lane,
                    value,
                    max: kind.max(),
                });
            }
        }
        let mut blob_index = 0;
        for slot in layout.fields() {
            if slot.blob.is_some() {
                let len = blobs[blob_index].len();
                if len > slot.max_len as usize {
                    return Err(SnapshotError::BlobTooLong {
                        id,
                        blob: blob_index,
                        len,
                        max: slot.max_len,
                    });
                }
                blob_index += 1;
            }
        }
        if self.rows.len() >= layout.max_entities() {
            return Err(SnapshotError::TooMany {
                count: self.rows.len() + 1,
                max: layout.max_entities(),
            });
        }
        self.rows.push((id, self.rows.len()));
        self.lanes.extend_from_slice(lanes);
        self.blobs.extend_from_slice(blobs);
        Ok(())
    }

    /// Sorts by id and checks that ids are unique.
    pub fn finish(mut self) -> Result<Snapshot, SnapshotError> {
        self.rows.sort_unstable();
        let mut out = Snapshot::with_capacity(self.layout, self.rows.len());
        let (lp, bp) = (out.lanes_per, out.blobs_per);
        for (id, row) in self.rows {
            if out.ids.last() == Some(&id) {
                return Err(SnapshotError::Duplicate(id));
            }
            out.ids.push(id);
            out.lanes
                .extend_from_slice(&self.lanes[row * lp..(row + 1) * lp]);
            for b in &mut self.blobs[row * bp..(row + 1) * bp] {
                out.blobs.push(std::mem::take(b));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Component, Encoding, Field, Schema};

    fn layout() -> Layout {
        Schema {
            name: "t".into(),
            components: vec![Component {
                name: "c".into(),
                fields: vec![
                    Field {
                        name: "v".into(),
                        encoding: Encoding::Int { min: 0, max: 100 },
                    },
                    Field {
                        name: "b".into(),
                        encoding: Encoding::Bytes { max_len: 4 },
                    },
                ],
            }],
            position: None,
            max_entities: 3,
        }
        .layout()
        .unwrap()
    }

    #[test]
    fn builder_sorts_and_checks() {
        let l = layout();
        let blob = [b"ab".to_vec()];
        let s = Snapshot::from_entities(&l, [(7, &[5][..], &blob[..]), (2, &[6][..], &blob[..])])
            .unwrap();
        assert_eq!(s.ids(), &[2, 7]);
        assert_eq!(s.lanes(0), &[6]);
        let dup = Snapshot::from_entities(&l, [(1, &[5][..], &blob[..]), (1, &[6][..], &blob[..])]);
        assert_eq!(dup.unwrap_err(), SnapshotError::Duplicate(1));
        let big = Snapshot::from_entities(&l, [(1, &[101][..], &blob[..])]);
        assert!(matches!(big, Err(SnapshotError::OutOfRange { .. })));
        let long = [b"abcde".to_vec()];
        let long = Snapshot::from_entities(&l, [(1, &[1][..], &long[..])]);
        assert!(matches!(long, Err(SnapshotError::BlobTooLong { .. })));
        let many: Vec<_> = (0..4).map(|i| (i, &[1][..], &blob[..])).collect();
        assert!(matches!(
            Snapshot::from_entities(&l, many),
            Err(SnapshotError::TooMany { .. })
        ));
    }

    #[test]
    fn hash_is_order_free_composable_and_sensitive() {
        let l = layout();
        let blob = [b"ab".to_vec()];
        let a = Snapshot::from_entities(&l, [(1, &[5][..], &blob[..]), (2, &[6][..], &blob[..])])
            .unwrap();
        let b = Snapshot::from_entities(&l, [(2, &[6][..], &blob[..]), (1, &[5][..], &blob[..])])
            .unwrap();
        assert_eq!(a.hash(), b.hash());
        assert_eq!(a.select([0]).hash().combine(a.select([1]).hash()), a.hash());
        let c = Snapshot::from_entities(&l, [(1, &[5][..], &blob[..]), (2, &[7][..], &blob[..])])
            .unwrap();
        assert_ne!(a.hash(), c.hash());
        let other = [b"ac".to_vec()];
        let d = Snapshot::from_entities(&l, [(1, &[5][..], &blob[..]), (2, &[6][..], &other[..])])
            .unwrap();
        assert_ne!(a.hash(), d.hash());
        assert_eq!(Snapshot::empty(&l).hash(), StateHash(0));
    }
}
