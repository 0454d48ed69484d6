//! The fan-out core, without I/O: what a relay holds of a world and what it
//! sends each client.
//!
//! ## The model
//!
//! A [`WorldState`] keeps a ring of recent ticks ([`TickState`]), each split
//! into spatial cells once, as it arrives from upstream. A cell whose content
//! did not change since the previous tick shares the previous tick's
//! snapshot (`Arc`), so "unchanged" is a pointer comparison.
//!
//! A client's [`ClientView`] remembers, for every update sent to it, the tick
//! and the set of cells it covered (its interest at that tick). The state a
//! client holds at tick `A` is therefore known exactly: the relay's cells at
//! `A` restricted to that set. When the client acknowledges `A`, the next
//! update is coded against it:
//!
//! - a cell in the client's interest that changed since `A` gets a chunk: the
//!   cell's delta from its content at `A` (or from empty, if the client did
//!   not hold it at `A`);
//! - a cell it held at `A` and no longer has in interest is listed as dropped;
//! - every other cell is carried forward unchanged by the client.
//!
//! Chunks are cached per (cell, baseline, tick) in a [`ChunkCache`] shared
//! by every client of the world: encoding work grows with cells and distinct
//! baselines, not with clients. The update's hash is the sum of the hashes of
//! the cells the client holds after applying it (see [`proto::StateHash`]).
//!
//! Lost updates are never resent: the client acknowledges what it applied,
//! and the relay always codes against the newest acknowledged tick it still
//! holds, or sends a keyframe.

use bytes::Bytes;
use dashmap::DashMap;
use proto::interest::Grid;
use proto::msg::{CellId, Chunk, Update};
use proto::{Layout, Snapshot, StateHash, delta};
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One cell of one tick.
#[derive(Clone, Debug)]
pub struct CellState {
    /// The cell's entities.
    pub snapshot: Arc<Snapshot>,
    /// Their hash.
    pub hash: StateHash,
}

/// A tick as a relay holds it: the whole snapshot and its cells.
#[derive(Debug)]
pub struct TickState {
    /// Global tick number.
    pub tick: u64,
    /// Origin wall clock of the tick, microseconds since the UNIX epoch.
    pub origin_time_us: u64,
    /// The world's state hash (checked against the origin's).
    pub hash: StateHash,
    /// The whole world.
    pub snapshot: Arc<Snapshot>,
    /// Non-empty cells.
    pub cells: BTreeMap<CellId, CellState>,
}

/// Which cells a client wants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Interest {
    /// Everything.
    All,
    /// The cells within `radius` of `(x, y)`.
    Around {
        /// Centre x, in world units.
        x: f64,
        /// Centre y.
        y: f64,
        /// Radius.
        radius: f64,
    },
}

/// What a relay holds of one world: its layout, grid and recent ticks.
pub struct WorldState {
    layout: Arc<Layout>,
    grid: Option<Grid>,
    ring: VecDeque<Arc<TickState>>,
    capacity: usize,
}

impl WorldState {
    /// A world holding the last `capacity` ticks (at least 2). `grid` is
    /// `None` for worlds without cells; worlds without a position field
    /// always use the single [`CellId::WORLD`].
    pub fn new(layout: Arc<Layout>, grid: Option<Grid>, capacity: usize) -> WorldState {
        let grid = grid.filter(|_| layout.position_fields().len() >= 2);
        WorldState {
            layout,
            grid,
            ring: VecDeque::new(),
            capacity: capacity.max(2),
        }
    }

    /// The world's layout.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// The cell grid, if the world is split into cells.
    pub fn grid(&self) -> Option<Grid> {
        self.grid
    }

    /// Adds the newest tick, splitting it into cells, and drops ticks past
    /// the ring's capacity. Returns the new tick and the tick that fell out,
    /// if any. Ticks must arrive in increasing order; an older tick is
    /// refused (returns `None`).
    pub fn push(
        &mut self,
        tick: u64,
        origin_time_us: u64,
        hash: StateHash,
        snapshot: Arc<Snapshot>,
    ) -> Option<(Arc<TickState>, Option<u64>)> {
        if self.ring.back().is_some_and(|last| last.tick >= tick) {
            return None;
        }
        let previous = self.ring.back().cloned();
        let mut cells = BTreeMap::new();
        match self.grid {
            Some(grid) => {
                for (cell, part) in grid.split(&self.layout, &snapshot) {
                    cells.insert(cell, share(previous.as_deref(), cell, part));
                }
            }
            None if !snapshot.is_empty() => {
                let part = (*snapshot).clone();
                cells.insert(
                    CellId::WORLD,
                    share(previous.as_deref(), CellId::WORLD, part),
                );
            }
            None => {}
        }
        let state = Arc::new(TickState {
            tick,
            origin_time_us,
            hash,
            snapshot,
            cells,
        });
        self.ring.push_back(state.clone());
        let evicted = if self.ring.len() > self.capacity {
            self.ring.pop_front().map(|t| t.tick)
        } else {
            None
        };
        Some((state, evicted))
    }

    /// The tick `tick`, if still held.
    pub fn get(&self, tick: u64) -> Option<&Arc<TickState>> {
        let first = self.ring.front()?.tick;
        if tick < first {
            return None;
        }
        // Ticks are increasing but may skip: search from the expected slot.
        let guess = (tick - first) as usize;
        if let Some(t) = self.ring.get(guess).filter(|t| t.tick == tick) {
            return Some(t);
        }
        self.ring
            .binary_search_by_key(&tick, |t| t.tick)
            .ok()
            .map(|i| &self.ring[i])
    }

    /// The newest tick.
    pub fn latest(&self) -> Option<&Arc<TickState>> {
        self.ring.back()
    }

    /// The oldest tick held.
    pub fn oldest(&self) -> Option<u64> {
        self.ring.front().map(|t| t.tick)
    }

    /// Number of ticks held.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether no tick is held yet.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// The cells a client with `interest` holds at a tick.
    pub fn interest_cells(&self, interest: Interest, tick: &TickState) -> Vec<CellId> {
        match (interest, self.grid) {
            (Interest::Around { x, y, radius }, Some(grid)) => {
                let mut cells = grid.cells_within(x, y, radius);
                cells.sort_unstable();
                cells
            }
            _ => match self.grid {
                Some(_) => tick.cells.keys().copied().collect(),
                None => vec![CellId::WORLD],
            },
        }
    }
}

/// Reuses the previous tick's snapshot of a cell when nothing changed.
fn share(previous: Option<&TickState>, cell: CellId, part: Snapshot) -> CellState {
    if let Some(old) = previous.and_then(|p| p.cells.get(&cell))
        && *old.snapshot == part
    {
        return old.clone();
    }
    let hash = part.hash();
    CellState {
        snapshot: Arc::new(part),
        hash,
    }
}

/// Key of a cached chunk: the cell, the baseline it is coded against (`None`
/// for a cell keyframe) and the target tick.
pub type ChunkKey = (CellId, Option<u64>, u64);

/// Ticks of chunks kept behind the newest target: a sender always builds
/// for the newest tick it has seen, so chunks of older targets are asked
/// for again only by a sender that read its tick just before a newer one
/// arrived.
const KEEP_TARGETS: u64 = 2;

/// Encoded chunks shared by every client of a world.
///
/// Only the chunks of the newest few target ticks are kept
/// ([`ChunkCache::evict_before`]): holding the whole ring's worth (tens of
/// thousands of chunks for a large world) made every lookup a cache miss
/// and every eviction a scan of all of them, for chunks never asked for
/// again.
#[derive(Default)]
pub struct ChunkCache {
    map: DashMap<ChunkKey, Bytes>,
    /// Newest target tick cached.
    newest: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    encode_ns: AtomicU64,
    enabled: bool,
}

impl ChunkCache {
    /// A cache; `enabled = false` encodes every chunk for every client (the
    /// per-client baseline the benches compare against).
    pub fn new(enabled: bool) -> ChunkCache {
        ChunkCache {
            enabled,
            ..ChunkCache::default()
        }
    }

    /// The chunk for `key`, encoding it with `encode` on a miss.
    pub fn get_or_encode(&self, key: ChunkKey, encode: impl FnOnce() -> Bytes) -> Bytes {
        if self.enabled
            && let Some(hit) = self.map.get(&key)
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return hit.clone();
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let bytes = encode();
        self.encode_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if self.enabled {
            self.newest.fetch_max(key.2, Ordering::Relaxed);
            self.map.entry(key).or_insert_with(|| bytes.clone());
        }
        bytes
    }

    /// Forgets every chunk whose target or baseline is before `tick`, and
    /// every chunk whose target is more than [`KEEP_TARGETS`] ticks older
    /// than the newest target cached. Call it once per tick (the relay does
    /// when its ring drops a tick).
    pub fn evict_before(&self, tick: u64) {
        let targets = tick.max(
            self.newest
                .load(Ordering::Relaxed)
                .saturating_sub(KEEP_TARGETS),
        );
        self.map
            .retain(|&(_, base, target), _| target >= targets && base.is_none_or(|b| b >= tick));
    }

    /// Chunks held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// (hits, misses) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Nanoseconds spent encoding so far.
    pub fn encode_ns(&self) -> u64 {
        self.encode_ns.load(Ordering::Relaxed)
    }
}

thread_local! {
    /// One delta codec per thread, reused for every chunk. A codec's
    /// adaptive models are large (about 135 KB for plaza's six lanes):
    /// `delta::encode` allocates and initialises a fresh set and then resets
    /// it once more, which cost more than coding a cell's few entities.
    static CODEC: RefCell<Option<delta::Codec>> = const { RefCell::new(None) };
}

/// Codes one cell's delta from `from` to `to` (the same bytes as
/// [`delta::encode`] without prediction), with this thread's codec.
fn encode_chunk(layout: &Layout, from: &Snapshot, to: &Snapshot) -> Bytes {
    CODEC.with(|codec| {
        let mut codec = codec.borrow_mut();
        let codec = codec.get_or_insert_with(|| delta::Codec::new(layout));
        let mut out = Vec::new();
        // `encode` resets the models first (and rebuilds them for another
        // layout), so every chunk is coded from the same initial state.
        codec.encode(layout, from, None, to, &mut out);
        Bytes::from(out)
    })
}

/// A relay's record of one client: what it was sent and what it acknowledged.
#[derive(Debug)]
pub struct ClientView {
    interest: Interest,
    /// The cells of an `Around` interest, computed once per interest (they
    /// depend only on the area and the grid) and shared with `sent`.
    area_cells: Option<(Interest, Arc<[CellId]>)>,
    /// (tick, cells the client holds at that tick), oldest first.
    sent: VecDeque<(u64, Arc<[CellId]>)>,
    acked: Option<u64>,
    max_sent: usize,
}

/// What [`ClientView::build_update`] made.
#[derive(Debug)]
pub struct Built {
    /// The update to send.
    pub update: Update,
    /// Whether it is a keyframe (no baseline).
    pub keyframe: bool,
}

impl ClientView {
    /// A new client that holds nothing. `max_sent` bounds the history kept
    /// (use the world's ring capacity: older baselines are gone anyway).
    pub fn new(interest: Interest, max_sent: usize) -> ClientView {
        ClientView {
            interest,
            area_cells: None,
            sent: VecDeque::new(),
            acked: None,
            max_sent: max_sent.max(2),
        }
    }

    /// A client resuming a session: it holds `cells` at tick `last_ack`
    /// (sent by another relay; ticks are global, so the content is the same).
    pub fn resume(interest: Interest, max_sent: usize, last_ack: u64, cells: Vec<CellId>) -> Self {
        let mut view = ClientView::new(interest, max_sent);
        view.sent.push_back((last_ack, cells.into()));
        view.acked = Some(last_ack);
        view
    }

    /// Changes what the client wants from the next update on.
    pub fn set_interest(&mut self, interest: Interest) {
        self.interest = interest;
    }

    /// The client's interest.
    pub fn interest(&self) -> Interest {
        self.interest
    }

    /// The client applied `tick`. Acks of ticks never sent, or older than
    /// the newest ack, are ignored (returns false).
    pub fn on_ack(&mut self, tick: u64) -> bool {
        if self.acked.is_some_and(|a| a >= tick) || !self.sent.iter().any(|(t, _)| *t == tick) {
            return false;
        }
        self.acked = Some(tick);
        // Nothing older than the ack will serve as a baseline again.
        while self.sent.front().is_some_and(|(t, _)| *t < tick) {
            self.sent.pop_front();
        }
        true
    }

    /// Newest acknowledged tick.
    pub fn acked(&self) -> Option<u64> {
        self.acked
    }

    /// Newest tick sent.
    pub fn last_sent(&self) -> Option<u64> {
        self.sent.back().map(|(t, _)| *t)
    }

    /// Number of sent ticks remembered (bounded by `max_sent`).
    pub fn remembered(&self) -> usize {
        self.sent.len()
    }

    /// The cells the client wants at `target`.
    fn cells(&mut self, world: &WorldState, target: &TickState) -> Arc<[CellId]> {
        if !matches!(self.interest, Interest::Around { .. }) || world.grid().is_none() {
            return world.interest_cells(self.interest, target).into();
        }
        if let Some((interest, cells)) = &self.area_cells
            && *interest == self.interest
        {
            return cells.clone();
        }
        let cells: Arc<[CellId]> = world.interest_cells(self.interest, target).into();
        self.area_cells = Some((self.interest, cells.clone()));
        cells
    }

    /// Builds the update that brings the client to `target`, coded against
    /// its newest acknowledged tick if `world` still holds it, otherwise a
    /// keyframe. Returns `None` if `target` was already sent.
    pub fn build_update(
        &mut self,
        world: &WorldState,
        target: &TickState,
        cache: &ChunkCache,
    ) -> Option<Built> {
        if self.last_sent().is_some_and(|t| t >= target.tick) {
            return None;
        }
        let base = self
            .acked
            .filter(|&a| a < target.tick)
            .and_then(|a| world.get(a))
            .and_then(|state| {
                self.sent
                    .iter()
                    .find(|(t, _)| *t == state.tick)
                    .map(|(_, cells)| (state.clone(), cells.clone()))
            });
        let cells = self.cells(world, target);
        let layout = world.layout();
        let mut chunks = Vec::with_capacity(cells.len());
        let mut dropped = Vec::new();
        let mut hash = StateHash(0);
        for &cell in cells.iter() {
            let now = target.cells.get(&cell);
            if let Some(now) = now {
                hash = hash.combine(now.hash);
            }
            let held = base.as_ref().and_then(|(state, held)| {
                held.binary_search(&cell)
                    .ok()
                    .map(|_| state.cells.get(&cell))
            });
            // `held`: None = not held at the baseline (code from empty);
            // Some(None) = held, and empty; Some(Some(c)) = held with content.
            let before = held.flatten();
            let unchanged = match (before, now) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(&a.snapshot, &b.snapshot),
                _ => false,
            };
            if unchanged {
                continue;
            }
            // A cell coded from empty is the same bytes whatever the baseline.
            let key_base = before.and(base.as_ref().map(|(s, _)| s.tick));
            let data = cache.get_or_encode((cell, key_base, target.tick), || {
                let empty = Snapshot::empty(layout);
                let from = before.map_or(&empty, |c| &c.snapshot);
                let to = now.map_or(&empty, |c| &c.snapshot);
                encode_chunk(layout, from, to)
            });
            chunks.push(Chunk { cell, data });
        }
        if let Some((state, held)) = &base {
            for cell in held.iter() {
                if state.cells.contains_key(cell) && cells.binary_search(cell).is_err() {
                    dropped.push(*cell);
                }
            }
        }
        let keyframe = base.is_none();
        let update = Update {
            tick: target.tick,
            base: base.as_ref().map(|(s, _)| s.tick),
            predict_from: None,
            origin_time_us: target.origin_time_us,
            hash: hash.0,
            chunks,
            dropped,
        };
        self.sent.push_back((target.tick, cells));
        while self.sent.len() > self.max_sent {
            self.sent.pop_front();
        }
        Some(Built { update, keyframe })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use origin::Simulation;

    /// The thread's reused codec gives the bytes a fresh codec gives, also
    /// when chunks of two worlds (two layouts) alternate on one thread.
    #[test]
    fn reused_codec_codes_as_a_fresh_one() {
        let mut plaza = origin::worlds::plaza::Plaza::new(origin::worlds::plaza::PlazaConfig {
            avatars: 300,
            size_m: 400.0,
            seed: 3,
        });
        let mut cubes = origin::worlds::by_name("cubes", 1).unwrap();
        let worlds: [&mut dyn Simulation; 2] = [&mut plaza, cubes.as_mut()];
        let mut frames = Vec::new();
        for sim in worlds {
            let layout = sim.schema().layout().unwrap();
            let a = sim.snapshot(&layout);
            sim.step();
            sim.step();
            let b = sim.snapshot(&layout);
            frames.push((layout, a, b));
        }
        for _ in 0..2 {
            for (layout, a, b) in &frames {
                let empty = Snapshot::empty(layout);
                for (from, to) in [(a, b), (&empty, b), (b, &empty)] {
                    let mut fresh = Vec::new();
                    delta::encode(layout, from, None, to, &mut fresh);
                    assert_eq!(encode_chunk(layout, from, to), Bytes::from(fresh));
                }
            }
        }
    }
}
