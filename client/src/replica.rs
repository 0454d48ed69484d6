//! The client's replica, without I/O: applies updates, checks every applied
//! tick against the origin's hash, and keeps recent ticks as baselines.
//!
//! The state at a tick is a map from cell to the cell's entities (see
//! `relay::fanout` for what the relay sends). Applying an update to tick `T`
//! coded against baseline `A`:
//!
//! 1. start from the state held at `A` (empty for a keyframe);
//! 2. remove the dropped cells;
//! 3. for each chunk, decode the cell's delta against the cell at `A` (empty
//!    if not held) and store the result (removing cells that become empty);
//! 4. check that the sum of the cells' hashes equals the update's hash.
//!
//! Only a state that passes the check is kept and acknowledged. A state that
//! fails it is a divergence: it is counted and dropped, and the replica stays
//! at its previous tick, so the next update (coded against what the client
//! acknowledged) repairs it.

use proto::msg::{CellId, Update};
use proto::{EntityId, Layout, Snapshot, StateHash, delta};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// The entities of one cell, with their hash.
#[derive(Clone, Debug)]
struct Cell {
    snapshot: Arc<Snapshot>,
    hash: StateHash,
}

/// A world's state at one tick, as the client holds it.
#[derive(Clone, Debug, Default)]
pub struct State {
    tick: u64,
    cells: BTreeMap<CellId, Cell>,
    hash: StateHash,
}

impl State {
    /// The tick.
    pub fn tick(&self) -> u64 {
        self.tick
    }

    /// The hash of everything held.
    pub fn hash(&self) -> StateHash {
        self.hash
    }

    /// Cells held (non-empty ones).
    pub fn cells(&self) -> impl Iterator<Item = CellId> + '_ {
        self.cells.keys().copied()
    }

    /// Number of entities held.
    pub fn entity_count(&self) -> usize {
        self.cells.values().map(|c| c.snapshot.len()).sum()
    }

    /// Every entity held, with its lanes, in cell order.
    pub fn entities(&self) -> impl Iterator<Item = (EntityId, &[u32])> + '_ {
        self.cells
            .values()
            .flat_map(|c| (0..c.snapshot.len()).map(|i| (c.snapshot.ids()[i], c.snapshot.lanes(i))))
    }

    /// The lanes of entity `id`, if held.
    pub fn entity(&self, id: EntityId) -> Option<&[u32]> {
        self.cells
            .values()
            .find_map(|c| c.snapshot.find(id).map(|i| c.snapshot.lanes(i)))
    }
}

/// Why an update was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The update is not newer than the newest applied tick (reordered or
    /// duplicate): ignore it.
    #[error("update for tick {tick} is not newer than tick {newest}")]
    Stale {
        /// The update's tick.
        tick: u64,
        /// Newest applied.
        newest: u64,
    },
    /// The baseline is no longer (or never was) held.
    #[error("baseline tick {0} is not held")]
    MissingBase(u64),
    /// A chunk did not decode.
    #[error("cell {cell:?}: {source}")]
    Delta {
        /// The cell.
        cell: CellId,
        /// The decode error.
        source: delta::DeltaError,
    },
    /// The applied state does not match the origin's hash: a divergence.
    #[error("tick {tick}: state hash {got} differs from the origin's {expected}")]
    HashMismatch {
        /// Tick.
        tick: u64,
        /// Hash in the update.
        expected: StateHash,
        /// Hash of the applied state.
        got: StateHash,
    },
}

/// What changed for application code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An entity came into view (or into being).
    Added(EntityId),
    /// An entity's values changed.
    Changed(EntityId),
    /// An entity left view (or the world).
    Removed(EntityId),
}

/// Result of a successful [`Replica::apply`].
#[derive(Clone, Debug)]
pub struct Applied {
    /// Tick now held.
    pub tick: u64,
    /// Whether the update was a keyframe.
    pub keyframe: bool,
    /// Its hash, as checked.
    pub hash: StateHash,
}

/// A verified replica of a world (or of the cells a client is interested in).
/// Cloning is cheap: states are shared (the clone gets its own codec).
pub struct Replica {
    layout: Arc<Layout>,
    history: VecDeque<Arc<State>>,
    capacity: usize,
    empty: Arc<Snapshot>,
    /// Reused for every chunk: a codec's adaptive models are large (about
    /// 130 KB for plaza), and building them afresh per chunk cost more
    /// than decoding a cell's few entities.
    codec: Box<delta::Codec>,
}

impl Clone for Replica {
    fn clone(&self) -> Replica {
        Replica {
            layout: self.layout.clone(),
            history: self.history.clone(),
            capacity: self.capacity,
            empty: self.empty.clone(),
            codec: Box::new(delta::Codec::new(&self.layout)),
        }
    }
}

impl Replica {
    /// A replica that keeps the last `capacity` applied ticks as baselines
    /// (at least 2; keep more than the relay's ring holds of ticks).
    pub fn new(layout: Arc<Layout>, capacity: usize) -> Replica {
        let empty = Arc::new(Snapshot::empty(&layout));
        let codec = Box::new(delta::Codec::new(&layout));
        Replica {
            layout,
            history: VecDeque::new(),
            capacity: capacity.max(2),
            empty,
            codec,
        }
    }

    /// The world's layout.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// The newest applied state.
    pub fn current(&self) -> Option<&Arc<State>> {
        self.history.back()
    }

    /// The state at `tick`, if still held.
    pub fn state(&self, tick: u64) -> Option<&Arc<State>> {
        self.history.iter().rev().find(|s| s.tick == tick)
    }

    /// Applies an update; on success the new state is the current one.
    pub fn apply(&mut self, update: &Update) -> Result<Applied, ApplyError> {
        if let Some(newest) = self.current().map(|s| s.tick)
            && update.tick <= newest
        {
            return Err(ApplyError::Stale {
                tick: update.tick,
                newest,
            });
        }
        let base = match update.base {
            Some(b) => self.state(b).cloned().ok_or(ApplyError::MissingBase(b))?,
            None => Arc::new(State::default()),
        };
        let mut cells = base.cells.clone();
        for cell in &update.dropped {
            cells.remove(cell);
        }
        for chunk in &update.chunks {
            let from = base
                .cells
                .get(&chunk.cell)
                .map_or(&self.empty, |c| &c.snapshot);
            let decoded = self
                .codec
                .decode(&self.layout, from, None, &chunk.data)
                .map_err(|source| ApplyError::Delta {
                    cell: chunk.cell,
                    source,
                })?;
            if decoded.is_empty() {
                cells.remove(&chunk.cell);
            } else {
                let hash = decoded.hash();
                cells.insert(
                    chunk.cell,
                    Cell {
                        snapshot: Arc::new(decoded),
                        hash,
                    },
                );
            }
        }
        let hash = cells
            .values()
            .fold(StateHash(0), |acc, c| acc.combine(c.hash));
        if hash.0 != update.hash {
            return Err(ApplyError::HashMismatch {
                tick: update.tick,
                expected: StateHash(update.hash),
                got: hash,
            });
        }
        self.history.push_back(Arc::new(State {
            tick: update.tick,
            cells,
            hash,
        }));
        while self.history.len() > self.capacity {
            self.history.pop_front();
        }
        Ok(Applied {
            tick: update.tick,
            keyframe: update.base.is_none(),
            hash,
        })
    }

    /// Entity events between two states (e.g. the previous and the current).
    pub fn diff(before: &State, after: &State) -> Vec<Event> {
        let mut old: BTreeMap<EntityId, &[u32]> = BTreeMap::new();
        let mut events = Vec::new();
        for (cell, c) in &before.cells {
            // Cells shared by pointer are unchanged: skip them entirely.
            if after
                .cells
                .get(cell)
                .is_some_and(|n| Arc::ptr_eq(&n.snapshot, &c.snapshot))
            {
                continue;
            }
            for i in 0..c.snapshot.len() {
                old.insert(c.snapshot.ids()[i], c.snapshot.lanes(i));
            }
        }
        for (cell, c) in &after.cells {
            if before
                .cells
                .get(cell)
                .is_some_and(|o| Arc::ptr_eq(&o.snapshot, &c.snapshot))
            {
                continue;
            }
            for i in 0..c.snapshot.len() {
                let id = c.snapshot.ids()[i];
                match old.remove(&id) {
                    None => events.push(Event::Added(id)),
                    Some(lanes) if lanes != c.snapshot.lanes(i) => events.push(Event::Changed(id)),
                    Some(_) => {}
                }
            }
        }
        events.extend(old.into_keys().map(Event::Removed));
        events
    }
}
