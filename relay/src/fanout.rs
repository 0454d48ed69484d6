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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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
    /// The same cells in a dense grid over their bounding box, when it is
    /// not much larger than the cells themselves: an update looks up each of
    /// its ~20 cells at its target and at its baseline, and a `BTreeMap`
    /// lookup in a fresh tick's 1,600 cells was a chain of cache misses.
    dense: Option<DenseCells>,
}

/// Cells indexed by position in their bounding box.
#[derive(Debug)]
struct DenseCells {
    x0: i64,
    y0: i64,
    width: i64,
    height: i64,
    slots: Vec<Option<CellState>>,
}

impl DenseCells {
    /// `None` when the bounding box would be more than 4 times the cells
    /// (plus some slack), e.g. for a few far-apart entities.
    fn new(cells: &BTreeMap<CellId, CellState>) -> Option<DenseCells> {
        let (mut x0, mut y0, mut x1, mut y1) = (i64::MAX, i64::MAX, i64::MIN, i64::MIN);
        for id in cells.keys() {
            if *id == CellId::WORLD {
                return None;
            }
            let (x, y) = (i64::from(id.x), i64::from(id.y));
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if cells.is_empty() {
            return None;
        }
        let (width, height) = (x1 - x0 + 1, y1 - y0 + 1);
        let area = width.checked_mul(height)?;
        if area > 4 * cells.len() as i64 + 256 {
            return None;
        }
        let mut slots = vec![None; area as usize];
        for (id, cell) in cells {
            let i = (i64::from(id.y) - y0) * width + (i64::from(id.x) - x0);
            slots[i as usize] = Some(cell.clone());
        }
        Some(DenseCells {
            x0,
            y0,
            width,
            height,
            slots,
        })
    }

    /// The cell `id`; every cell outside the box is empty.
    fn get(&self, id: CellId) -> Option<&CellState> {
        self.slot(id).and_then(|i| self.slots[i].as_ref())
    }

    /// The slot of `id`, if inside the box.
    fn slot(&self, id: CellId) -> Option<usize> {
        let x = i64::from(id.x) - self.x0;
        let y = i64::from(id.y) - self.y0;
        if x < 0 || y < 0 || x >= self.width || y >= self.height {
            return None;
        }
        Some((y * self.width + x) as usize)
    }
}

impl TickState {
    /// The cell `id` at this tick, if it is not empty.
    pub fn cell(&self, id: CellId) -> Option<&CellState> {
        match &self.dense {
            Some(dense) => dense.get(id),
            None => self.cells.get(&id),
        }
    }
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
        let state = self.prepare(tick, origin_time_us, hash, snapshot)?;
        self.commit(state)
    }

    /// The first half of [`WorldState::push`], which needs only a shared
    /// reference (the relay splits a tick without holding its clients
    /// back): the tick split into cells. `None` if `tick` is not newer than
    /// the newest tick held.
    pub fn prepare(
        &self,
        tick: u64,
        origin_time_us: u64,
        hash: StateHash,
        snapshot: Arc<Snapshot>,
    ) -> Option<Arc<TickState>> {
        self.prepare_hashed(tick, origin_time_us, hash, snapshot, None)
    }

    /// [`WorldState::prepare`], given the hash of every entity of
    /// `snapshot` by index (as the upstream feed keeps them:
    /// `transport::feed::Subscription::entity_hashes`), so that no entity
    /// is hashed again. Ignored unless there is one per entity.
    pub fn prepare_hashed(
        &self,
        tick: u64,
        origin_time_us: u64,
        hash: StateHash,
        snapshot: Arc<Snapshot>,
        entity_hashes: Option<&[StateHash]>,
    ) -> Option<Arc<TickState>> {
        let split = self.split(
            tick,
            origin_time_us,
            hash,
            snapshot,
            entity_hashes.map(Arc::from),
        )?;
        let cells = split.part(0, 1);
        Some(split.finish(vec![cells]))
    }

    /// [`WorldState::prepare_hashed`] in steps, so that several threads can
    /// share the work: the tick's entities grouped by cell (this call, the
    /// cheap part), then each thread builds the cells of its part
    /// ([`Split::part`]), then [`Split::finish`]. `None` if `tick` is not
    /// newer than the newest tick held.
    pub fn split(
        &self,
        tick: u64,
        origin_time_us: u64,
        hash: StateHash,
        snapshot: Arc<Snapshot>,
        entity_hashes: Option<Arc<[StateHash]>>,
    ) -> Option<Split> {
        if self.ring.back().is_some_and(|last| last.tick >= tick) {
            return None;
        }
        let hashes = entity_hashes.filter(|h| h.len() == snapshot.len());
        let groups = match self.grid {
            Some(grid) => Groups::Cells(group_by_cell(&grid, &self.layout, &snapshot)),
            None if !snapshot.is_empty() => Groups::World,
            None => Groups::Cells(Grouped::default()),
        };
        Some(Split {
            tick,
            origin_time_us,
            hash,
            snapshot,
            hashes,
            previous: self.ring.back().cloned(),
            groups,
        })
    }
}

/// Part `i` of `parts` of `0..len`: contiguous, about as long as the
/// others, together all of it (how work is shared between the fan-out's
/// threads).
pub fn part_range(len: usize, i: usize, parts: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1);
    len * i / parts..len * (i + 1) / parts
}

/// A tick on its way into cells ([`WorldState::split`]).
pub struct Split {
    tick: u64,
    origin_time_us: u64,
    hash: StateHash,
    snapshot: Arc<Snapshot>,
    hashes: Option<Arc<[StateHash]>>,
    previous: Option<Arc<TickState>>,
    groups: Groups,
}

/// The entities of a tick by cell.
enum Groups {
    /// `order` holds entity indices cell by cell; `cells[k]` is the `k`th
    /// cell and the end of its run in `order`.
    Cells(Grouped),
    /// A world without cells: the tick's snapshot is its one cell.
    World,
}

/// Entity indices grouped by cell ([`group_by_cell`]).
#[derive(Default)]
struct Grouped {
    order: Vec<u32>,
    cells: Vec<(CellId, u32)>,
}

impl Grouped {
    /// Cell `k` and its members.
    fn get(&self, k: usize) -> (CellId, &[u32]) {
        let start = if k == 0 { 0 } else { self.cells[k - 1].1 };
        let (cell, end) = self.cells[k];
        (cell, &self.order[start as usize..end as usize])
    }
}

impl Split {
    /// Cells of the tick (every thread's parts together).
    pub fn len(&self) -> usize {
        match &self.groups {
            Groups::Cells(g) => g.cells.len(),
            Groups::World => 1,
        }
    }

    /// Whether the tick has no cell.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entity_hash(&self, i: usize) -> StateHash {
        self.hashes
            .as_ref()
            .map_or_else(|| self.snapshot.entity_hash(i), |h| h[i])
    }

    /// Part `i` of `parts` (a contiguous run of cells, about as many in
    /// each): each cell's hash and content, shared with the previous tick's
    /// cell when both are unchanged.
    pub fn part(&self, i: usize, parts: usize) -> Vec<(CellId, CellState)> {
        let range = part_range(self.len(), i, parts);
        let previous = self.previous.as_deref();
        match &self.groups {
            Groups::Cells(groups) => range
                .map(|k| {
                    let (cell, members) = groups.get(k);
                    let hash = members.iter().fold(StateHash(0), |h, &e| {
                        h.combine(self.entity_hash(e as usize))
                    });
                    (cell, share(previous, cell, &self.snapshot, members, hash))
                })
                .collect(),
            Groups::World if !range.is_empty() => {
                let hash = (0..self.snapshot.len())
                    .fold(StateHash(0), |h, e| h.combine(self.entity_hash(e)));
                let state = match previous.and_then(|p| p.cell(CellId::WORLD)) {
                    Some(old) if old.hash == hash && *old.snapshot == *self.snapshot => old.clone(),
                    // The tick's own snapshot: the world is its one cell.
                    _ => CellState {
                        snapshot: self.snapshot.clone(),
                        hash,
                    },
                };
                vec![(CellId::WORLD, state)]
            }
            Groups::World => Vec::new(),
        }
    }

    /// The tick, from all of its parts in order.
    pub fn finish(&self, parts: Vec<Vec<(CellId, CellState)>>) -> Arc<TickState> {
        // Parts are runs of cells in order: the map is built from sorted
        // input.
        let cells: BTreeMap<CellId, CellState> = parts.into_iter().flatten().collect();
        let dense = DenseCells::new(&cells);
        Arc::new(TickState {
            tick: self.tick,
            origin_time_us: self.origin_time_us,
            hash: self.hash,
            snapshot: self.snapshot.clone(),
            cells,
            dense,
        })
    }
}

impl WorldState {
    /// The second half of [`WorldState::push`]: adds a tick made by
    /// [`WorldState::prepare`]. Refused (`None`) if a tick as new has been
    /// added meanwhile.
    pub fn commit(&mut self, state: Arc<TickState>) -> Option<(Arc<TickState>, Option<u64>)> {
        self.commit_keeping(state)
            .map(|(state, evicted)| (state, evicted.map(|t| t.tick)))
    }

    /// [`WorldState::commit`], handing back the evicted tick itself, so that
    /// the caller can free its cells (thousands of allocations) outside the
    /// ring's lock and off the fan-out's path.
    pub fn commit_keeping(
        &mut self,
        state: Arc<TickState>,
    ) -> Option<(Arc<TickState>, Option<Arc<TickState>>)> {
        if self.ring.back().is_some_and(|last| last.tick >= state.tick) {
            return None;
        }
        self.ring.push_back(state.clone());
        let evicted = if self.ring.len() > self.capacity {
            self.ring.pop_front()
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

/// The entities of `snapshot` grouped by cell, each group's indexes
/// ascending (what [`Grid::split`] selects, without its `BTreeMap` of index
/// lists: a counting sort over the cells' bounding box, or a sort when the
/// box is sparse). Groups come in no particular order.
fn group_by_cell(grid: &Grid, layout: &Layout, snapshot: &Snapshot) -> Grouped {
    let n = snapshot.len();
    let of: Vec<CellId> = (0..n).map(|i| grid.cell_of(layout, snapshot, i)).collect();
    let (mut x0, mut y0, mut x1, mut y1) = (i64::MAX, i64::MAX, i64::MIN, i64::MIN);
    for c in &of {
        x0 = x0.min(c.x.into());
        y0 = y0.min(c.y.into());
        x1 = x1.max(c.x.into());
        y1 = y1.max(c.y.into());
    }
    let area = (x1 - x0 + 1).saturating_mul(y1 - y0 + 1);
    let dense = n > 0 && !of.contains(&CellId::WORLD) && area <= 4 * n as i64 + 256;
    if !dense {
        let mut keyed: Vec<(CellId, u32)> = of.into_iter().zip(0..n as u32).collect();
        keyed.sort_unstable();
        let mut cells: Vec<(CellId, u32)> = Vec::new();
        for (k, &(cell, _)) in keyed.iter().enumerate() {
            match cells.last_mut() {
                Some(last) if last.0 == cell => last.1 = k as u32 + 1,
                _ => cells.push((cell, k as u32 + 1)),
            }
        }
        let order = keyed.into_iter().map(|(_, i)| i).collect();
        return Grouped { order, cells };
    }
    let width = x1 - x0 + 1;
    let slot = |c: &CellId| ((i64::from(c.y) - y0) * width + (i64::from(c.x) - x0)) as usize;
    let mut start = vec![0u32; area as usize + 1];
    for c in &of {
        start[slot(c) + 1] += 1;
    }
    for i in 1..start.len() {
        start[i] += start[i - 1];
    }
    let mut fill = start.clone();
    let mut order = vec![0u32; n];
    for (i, c) in of.iter().enumerate() {
        let s = slot(c);
        order[fill[s] as usize] = i as u32;
        fill[s] += 1;
    }
    let mut cells = Vec::new();
    for s in 0..area as usize {
        let (a, b) = (start[s] as usize, start[s + 1] as usize);
        if a < b {
            cells.push((of[order[a] as usize], b as u32));
        }
    }
    Grouped { order, cells }
}

/// Reuses the previous tick's snapshot of a cell when nothing changed: the
/// cell's entities are `members` of `snapshot`.
///
/// The hash is needed for a changed cell anyway, and nearly every cell of a
/// busy world changes every tick: compare hashes first, and the contents
/// (in place: a cell that did not change costs no copy) only when they are
/// equal (a hash alone is not proof enough to share).
fn share(
    previous: Option<&TickState>,
    cell: CellId,
    snapshot: &Snapshot,
    members: &[u32],
    hash: StateHash,
) -> CellState {
    if let Some(old) = previous.and_then(|p| p.cell(cell))
        && old.hash == hash
        && same_entities(&old.snapshot, snapshot, members)
    {
        return old.clone();
    }
    CellState {
        snapshot: Arc::new(snapshot.select(members.iter().map(|&i| i as usize))),
        hash,
    }
}

/// Whether `part` holds exactly the entities `members` of `whole`.
fn same_entities(part: &Snapshot, whole: &Snapshot, members: &[u32]) -> bool {
    part.len() == members.len()
        && part.lanes_per_entity() == whole.lanes_per_entity()
        && part.blobs_per_entity() == whole.blobs_per_entity()
        && members.iter().enumerate().all(|(k, &i)| {
            let i = i as usize;
            part.ids()[k] == whole.ids()[i]
                && part.lanes(k) == whole.lanes(i)
                && part.blobs(k) == whole.blobs(i)
        })
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
pub struct ChunkCache {
    /// Chunks of cells outside their target tick's dense index.
    map: DashMap<ChunkKey, Bytes, FxBuild>,
    /// Chunks of cells inside it, one [`Plan`] per (target, baseline).
    plans: std::sync::Mutex<Vec<Arc<Plan>>>,
    /// Newest target tick cached.
    newest: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    encode_ns: AtomicU64,
    /// Chunks coded in advance ([`ChunkCache::precode`]).
    precoded: AtomicU64,
    enabled: bool,
}

impl Default for ChunkCache {
    fn default() -> Self {
        ChunkCache::new(true)
    }
}

/// A multiply-rotate hasher (as rustc's FxHash) for chunk keys: the
/// default SipHash cost more per lookup than the rest of the lookup, and
/// the keys come from the relay itself, not from clients.
#[derive(Clone, Copy, Default)]
pub struct FxBuild;

impl std::hash::BuildHasher for FxBuild {
    type Hasher = FxHasher;
    fn build_hasher(&self) -> FxHasher {
        FxHasher(0)
    }
}

/// See [`FxBuild`].
#[derive(Clone, Copy, Default)]
pub struct FxHasher(u64);

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for FxHasher {
    #[inline]
    fn finish(&self) -> u64 {
        // Mix the high bits down: dashmap picks its shard from the top bits
        // and hashbrown its group from the low ones.
        let h = self.0;
        h ^ (h >> 29) ^ (h >> 47)
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i.into());
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i.into());
    }
    #[inline]
    fn write_i32(&mut self, i: i32) {
        self.add(i as u32 as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn write_isize(&mut self, i: isize) {
        self.add(i as u64);
    }
}

/// The chunks coded to one target tick against one baseline (`None`: from
/// empty), in the slots of the target's dense cell index. An update looks
/// its plan up once, then each chunk is a read of a `OnceLock`: no lock and
/// no write to a shared cache line per chunk, where a `DashMap` lookup took
/// a shard lock that both cores' fan-out loops kept taking.
struct Plan {
    target: u64,
    base: Option<u64>,
    slots: Box<[Slot]>,
}

/// One chunk of a [`Plan`].
#[derive(Default)]
struct Slot {
    chunk: std::sync::OnceLock<Bytes>,
    /// Whether an update has used the chunk yet: the first use of a chunk
    /// coded in advance ([`Precode`]) counts as the miss it saved, so the
    /// hit ratio means what it meant before (lookups that needed no coding
    /// of their own). Read on every hit, written once: no cache line
    /// bounces between the cores.
    used: std::sync::atomic::AtomicBool,
    /// Whether a fan-out thread has listed the chunk to code in advance
    /// ([`ChunkCache::precode_part`]): several threads list their clients'
    /// needs at once, and each chunk is listed once.
    listed: std::sync::atomic::AtomicBool,
}

impl ChunkCache {
    /// The plan for chunks to `target` from `base`, made on first use;
    /// `None` when the cache is off or `target` has no dense index.
    fn plan(&self, target: &TickState, base: Option<u64>) -> Option<Arc<Plan>> {
        let dense = target.dense.as_ref()?;
        if !self.enabled {
            return None;
        }
        let mut plans = self.plans.lock().expect("not poisoned");
        if let Some(plan) = plans
            .iter()
            .find(|p| p.target == target.tick && p.base == base)
        {
            return Some(plan.clone());
        }
        self.newest.fetch_max(target.tick, Ordering::Relaxed);
        let plan = Arc::new(Plan {
            target: target.tick,
            base,
            slots: (0..dense.slots.len()).map(|_| Slot::default()).collect(),
        });
        plans.push(plan.clone());
        Some(plan)
    }

    /// [`ChunkCache::lookup`] for a cell of `plan`'s target.
    fn lookup_in<R>(
        plan: &Plan,
        slot: usize,
        encode: impl FnOnce() -> Bytes,
        use_chunk: impl FnOnce(&Bytes) -> R,
        tally: &mut Tally,
    ) -> R {
        let cell = &plan.slots[slot];
        if let Some(hit) = cell.chunk.get() {
            if !cell.used.load(Ordering::Relaxed) && !cell.used.swap(true, Ordering::Relaxed) {
                // Coded in advance for this lookup.
                tally.misses += 1;
            } else {
                tally.hits += 1;
            }
            return use_chunk(hit);
        }
        let mut coded = false;
        let bytes = cell.chunk.get_or_init(|| {
            coded = true;
            let started = std::time::Instant::now();
            let bytes = encode();
            tally.encode_ns += started.elapsed().as_nanos() as u64;
            // Before the chunk is published: whoever sees it sees this.
            cell.used.store(true, Ordering::Relaxed);
            bytes
        });
        if coded {
            tally.misses += 1;
        } else {
            tally.hits += 1;
        }
        use_chunk(bytes)
    }
}

impl ChunkCache {
    /// A cache; `enabled = false` encodes every chunk for every client (the
    /// per-client baseline the benches compare against).
    pub fn new(enabled: bool) -> ChunkCache {
        ChunkCache {
            map: DashMap::with_hasher(FxBuild),
            plans: std::sync::Mutex::new(Vec::new()),
            newest: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            encode_ns: AtomicU64::new(0),
            precoded: AtomicU64::new(0),
            enabled,
        }
    }

    /// The chunk for `key`, encoding it with `encode` on a miss.
    pub fn get_or_encode(&self, key: ChunkKey, encode: impl FnOnce() -> Bytes) -> Bytes {
        self.with_chunk(key, encode, Bytes::clone)
    }

    /// Calls `use_chunk` with the chunk for `key` (encoding it with `encode`
    /// on a miss), without taking a reference to a cached chunk: copying a
    /// chunk's few bytes out costs less than the shared reference count
    /// going up and down on two cores.
    pub fn with_chunk<R>(
        &self,
        key: ChunkKey,
        encode: impl FnOnce() -> Bytes,
        use_chunk: impl FnOnce(&Bytes) -> R,
    ) -> R {
        let mut tally = Tally::default();
        let out = self.lookup(key, encode, use_chunk, &mut tally);
        self.add(&tally);
        out
    }

    /// [`ChunkCache::with_chunk`], counting in `tally` (added to the shared
    /// counters once per update: two cores incrementing the same counters
    /// for every chunk kept a cache line bouncing between them).
    fn lookup<R>(
        &self,
        key: ChunkKey,
        encode: impl FnOnce() -> Bytes,
        use_chunk: impl FnOnce(&Bytes) -> R,
        tally: &mut Tally,
    ) -> R {
        if self.enabled
            && let Some(hit) = self.map.get(&key)
        {
            tally.hits += 1;
            return use_chunk(&hit);
        }
        tally.misses += 1;
        let started = std::time::Instant::now();
        let bytes = encode();
        tally.encode_ns += started.elapsed().as_nanos() as u64;
        let out = use_chunk(&bytes);
        if self.enabled {
            self.newest.fetch_max(key.2, Ordering::Relaxed);
            self.map.entry(key).or_insert(bytes);
        }
        out
    }

    fn add(&self, tally: &Tally) {
        if tally.hits > 0 {
            self.hits.fetch_add(tally.hits, Ordering::Relaxed);
        }
        if tally.misses > 0 {
            self.misses.fetch_add(tally.misses, Ordering::Relaxed);
            self.encode_ns.fetch_add(tally.encode_ns, Ordering::Relaxed);
        }
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
        let keep = |p: &Arc<Plan>| p.target >= targets && p.base.is_none_or(|b| b >= tick);
        // The plans (and their chunks) are freed after the lock is given
        // back: the fan-out looks plans up under it.
        let evicted: Vec<Arc<Plan>> = {
            let mut plans = self.plans.lock().expect("not poisoned");
            let (kept, evicted) = std::mem::take(&mut *plans).into_iter().partition(keep);
            *plans = kept;
            evicted
        };
        drop(evicted);
    }

    /// Chunks held.
    pub fn len(&self) -> usize {
        let planned: usize = self
            .plans
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|p| p.slots.iter().filter(|s| s.chunk.get().is_some()).count())
            .sum();
        self.map.len() + planned
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// Adds time spent coding chunks outside a lookup (a [`Precode`], timed
    /// by its caller).
    pub fn add_encode_ns(&self, ns: u64) {
        self.encode_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Chunks coded in advance so far.
    pub fn precoded(&self) -> u64 {
        self.precoded.load(Ordering::Relaxed)
    }

    /// Whether chunks are shared (the cache is on).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The chunks that `updates` (what [`ClientView::next_update`] says of
    /// each client) will look up for `target` and that are not coded yet,
    /// each once, to be coded by every fan-out thread at once
    /// ([`Precode::work`]) before any update is built: the updates then only
    /// copy chunks, and no update waits for a chunk another thread is
    /// coding. Empty when the cache is off or `target` has no dense cell
    /// index (those chunks are coded on first use).
    pub fn precode(
        &self,
        layout: &Arc<Layout>,
        target: &Arc<TickState>,
        updates: impl IntoIterator<Item = NextUpdate>,
    ) -> Precode {
        let part = self.precode_part(target, updates);
        Precode::new(layout, vec![part])
    }

    /// [`ChunkCache::precode`] for some of the clients: several threads
    /// list theirs at once ([`PrecodeList`]s, joined by [`Precode::new`]);
    /// each chunk is listed by the first thread to need it, once.
    pub fn precode_part(
        &self,
        target: &Arc<TickState>,
        updates: impl IntoIterator<Item = NextUpdate>,
    ) -> PrecodeList {
        let mut items = Vec::new();
        if let (true, Some(dense)) = (self.enabled, target.dense.as_ref()) {
            // (key baseline, its plan), a few per tick.
            let mut plans: Vec<(Option<u64>, Arc<Plan>)> = Vec::new();
            for update in updates {
                for &cell in update.cells.iter() {
                    let Some((before, now, key_base)) =
                        chunk_for(update.base.as_ref(), target, cell)
                    else {
                        continue;
                    };
                    let Some(slot) = dense.slot(cell) else {
                        continue;
                    };
                    let i = match plans.iter().position(|(b, _)| *b == key_base) {
                        Some(i) => i,
                        None => {
                            let Some(plan) = self.plan(target, key_base) else {
                                continue;
                            };
                            plans.push((key_base, plan));
                            plans.len() - 1
                        }
                    };
                    let plan = &plans[i].1;
                    let entry = &plan.slots[slot];
                    // Checked before claimed: most chunks are listed by the
                    // time most clients are looked at, and a load does not
                    // take the cache line from the other core.
                    if entry.listed.load(Ordering::Relaxed)
                        || entry.chunk.get().is_some()
                        || entry.listed.swap(true, Ordering::Relaxed)
                    {
                        continue;
                    }
                    items.push(PrecodeItem {
                        plan: plan.clone(),
                        slot,
                        before: before.map(|c| c.snapshot.clone()),
                        now: now.map(|c| c.snapshot.clone()),
                    });
                }
            }
        }
        PrecodeList { items }
    }
}

/// Chunks one fan-out thread listed ([`ChunkCache::precode_part`]).
pub struct PrecodeList {
    items: Vec<PrecodeItem>,
}

/// Chunks of one tick to code before its updates are built (see
/// [`ChunkCache::precode`]).
pub struct Precode {
    layout: Arc<Layout>,
    items: Vec<PrecodeItem>,
    /// The next item not claimed yet.
    next: AtomicUsize,
}

struct PrecodeItem {
    plan: Arc<Plan>,
    slot: usize,
    before: Option<Arc<Snapshot>>,
    now: Option<Arc<Snapshot>>,
}

/// Items a thread claims at once: few enough that the threads finish
/// together, enough that they do not fight over the counter.
const PRECODE_CLAIM: usize = 4;

impl Precode {
    /// The chunks of every list, to be coded by every thread at once.
    pub fn new(layout: &Arc<Layout>, lists: Vec<PrecodeList>) -> Precode {
        let mut items = Vec::with_capacity(lists.iter().map(|l| l.items.len()).sum());
        for list in lists {
            items.extend(list.items);
        }
        Precode {
            layout: layout.clone(),
            items,
            next: AtomicUsize::new(0),
        }
    }

    /// Chunks to code.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there is nothing to code.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Codes chunks not claimed by another thread until none is left;
    /// returns how many this call coded. Every thread of the fan-out calls
    /// it at once; the caller times it (and adds the time with
    /// [`ChunkCache::add_encode_ns`]).
    pub fn work(&self, cache: &ChunkCache) -> u64 {
        let mut coded = 0;
        loop {
            let start = self.next.fetch_add(PRECODE_CLAIM, Ordering::Relaxed);
            if start >= self.items.len() {
                break;
            }
            let end = (start + PRECODE_CLAIM).min(self.items.len());
            for item in &self.items[start..end] {
                item.plan.slots[item.slot].chunk.get_or_init(|| {
                    coded += 1;
                    let empty = Snapshot::empty(&self.layout);
                    let from = item.before.as_deref().unwrap_or(&empty);
                    let to = item.now.as_deref().unwrap_or(&empty);
                    encode_chunk(&self.layout, from, to)
                });
            }
        }
        if coded > 0 {
            cache.precoded.fetch_add(coded, Ordering::Relaxed);
        }
        coded
    }
}

thread_local! {
    /// One delta codec per thread, reused for every chunk. A codec's
    /// adaptive models are large (about 135 KB for plaza's six lanes):
    /// `delta::encode` allocates and initialises a fresh set and then resets
    /// it once more, which cost more than coding a cell's few entities.
    static CODEC: RefCell<Option<delta::Codec>> = const { RefCell::new(None) };
    /// The chunk being coded.
    static CHUNK_OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Codes one cell's delta from `from` to `to` (the same bytes as
/// [`delta::encode`] without prediction), with this thread's codec.
fn encode_chunk(layout: &Layout, from: &Snapshot, to: &Snapshot) -> Bytes {
    CODEC.with(|codec| {
        let mut codec = codec.borrow_mut();
        let codec = codec.get_or_insert_with(|| delta::Codec::new(layout));
        // Coded into this thread's reused buffer, then copied out at its
        // exact size: one allocation per chunk (a `Vec` whose capacity is
        // not its length costs `Bytes` a second one).
        CHUNK_OUT.with(|out| {
            let mut out = out.borrow_mut();
            out.clear();
            // `encode` resets the models first (and rebuilds them for
            // another layout), so every chunk is coded from the same initial
            // state.
            codec.encode(layout, from, None, to, &mut out);
            Bytes::copy_from_slice(&out)
        })
    })
}

/// A baseline tick and the cells the client held at it.
type Base = (Arc<TickState>, Arc<[CellId]>);

/// What the chunk of `cell` in an update to `target` coded against `base`
/// is: `(before, now, key_base)`, the cell's content the client holds
/// (`None`: nothing, code from empty), its content at `target`, and the
/// baseline of the chunk's cache key (`None` for a chunk coded from empty,
/// the same bytes whatever the update's baseline). `None` when the client
/// keeps the cell as it holds it (no chunk).
fn chunk_for<'a>(
    base: Option<&'a Base>,
    target: &'a TickState,
    cell: CellId,
) -> Option<(Option<&'a CellState>, Option<&'a CellState>, Option<u64>)> {
    let now = target.cell(cell);
    let held =
        base.and_then(|(state, held)| held.binary_search(&cell).ok().map(|_| state.cell(cell)));
    // `held`: None = not held at the baseline (code from empty);
    // Some(None) = held, and empty; Some(Some(c)) = held with content.
    let before = held.flatten();
    let unchanged = match (before, now) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(&a.snapshot, &b.snapshot),
        _ => false,
    };
    if unchanged {
        return None;
    }
    Some((before, now, before.and(base.map(|(s, _)| s.tick))))
}

/// What [`ClientView::next_update`] says the next update will be made of.
#[derive(Clone, Debug)]
pub struct NextUpdate {
    base: Option<Base>,
    cells: Arc<[CellId]>,
}

/// Cache counts of one update.
#[derive(Default)]
struct Tally {
    hits: u64,
    misses: u64,
    encode_ns: u64,
}

/// An update's fields other than its chunks, as [`ClientView::build_with`]
/// makes them.
struct Header {
    tick: u64,
    base: Option<u64>,
    origin_time_us: u64,
    hash: u64,
    chunks: usize,
    dropped: Vec<CellId>,
}

/// What [`ClientView::build_datagram`] made.
#[derive(Debug)]
pub struct BuiltDatagram {
    /// The update as a datagram (`type | body`, the same bytes as
    /// [`proto::Message::encode_datagram`]); prefixed with
    /// `varint(len)` it is the update's stream frame.
    pub datagram: Bytes,
    /// Whether it is a keyframe (no baseline).
    pub keyframe: bool,
    /// Its tick.
    pub tick: u64,
}

/// QUIC-style varint, as `proto::wire` writes it (there it is crate-private).
pub(crate) fn put_varint(out: &mut Vec<u8>, x: u64) {
    match proto::wire::varint_len(x) {
        1 => out.push(x as u8),
        2 => out.extend_from_slice(&(0x4000 | x as u16).to_be_bytes()),
        4 => out.extend_from_slice(&(0x8000_0000 | x as u32).to_be_bytes()),
        _ => out.extend_from_slice(&(0xc000_0000_0000_0000 | (x & ((1 << 62) - 1))).to_be_bytes()),
    }
}

fn zigzag(v: i32) -> u64 {
    u64::from(((v << 1) ^ (v >> 31)) as u32)
}

/// Bytes of a cell id's wire form.
fn cell_len(cell: CellId) -> usize {
    if cell == CellId::WORLD {
        1
    } else {
        proto::wire::varint_len(zigzag(cell.x) + 1) + proto::wire::varint_len(zigzag(cell.y))
    }
}

/// A cell id's wire form (see `CellId::encode` in proto).
fn put_cell(out: &mut Vec<u8>, cell: CellId) {
    if cell == CellId::WORLD {
        out.push(0);
    } else {
        put_varint(out, zigzag(cell.x) + 1);
        put_varint(out, zigzag(cell.y));
    }
}

thread_local! {
    /// The chunk part of the update being built, reused.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A relay's record of one client: what it was sent and what it acknowledged.
#[derive(Clone, Debug)]
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
        let mut chunks = Vec::new();
        let header = self.build_with(world, target, cache, |cell, data| {
            chunks.push(Chunk {
                cell,
                data: data.clone(),
            });
        })?;
        let update = Update {
            tick: header.tick,
            base: header.base,
            predict_from: None,
            origin_time_us: header.origin_time_us,
            hash: header.hash,
            chunks,
            dropped: header.dropped,
        };
        Some(Built {
            keyframe: update.base.is_none(),
            update,
        })
    }

    /// [`ClientView::build_update`], written straight into its datagram
    /// bytes: the chunks are copied out of the cache as they are looked up,
    /// so an update costs one allocation and no shared reference counts.
    /// `Some(Err)` when the update breaks a message limit (it is recorded as
    /// sent all the same, as [`ClientView::build_update`] does).
    pub fn build_datagram(
        &mut self,
        world: &WorldState,
        target: &TickState,
        cache: &ChunkCache,
    ) -> Option<Result<BuiltDatagram, proto::EncodeError>> {
        SCRATCH.with(|scratch| {
            let mut body = scratch.borrow_mut();
            body.clear();
            let mut too_long = 0;
            let header = self.build_with(world, target, cache, |cell, data| {
                too_long = too_long.max(data.len());
                put_cell(&mut body, cell);
                put_varint(&mut body, data.len() as u64);
                body.extend_from_slice(data);
            })?;
            let checks = [
                ("update chunks", header.chunks, proto::msg::MAX_CHUNKS),
                ("chunk", too_long, proto::msg::MAX_CHUNK_LEN),
                (
                    "update dropped cells",
                    header.dropped.len(),
                    proto::msg::MAX_CHUNKS,
                ),
            ];
            for (what, len, max) in checks {
                if len > max {
                    return Some(Err(proto::EncodeError::TooLarge {
                        what,
                        len: len as u64,
                        max: max as u64,
                    }));
                }
            }
            let base_gap = header.base.map_or(0, |b| header.tick - b);
            let varint = |x: u64| proto::wire::varint_len(x);
            let exact = 1
                + varint(header.tick)
                + varint(base_gap)
                + 1
                + 16
                + varint(header.chunks as u64)
                + body.len()
                + varint(header.dropped.len() as u64)
                + header.dropped.iter().map(|&c| cell_len(c)).sum::<usize>();
            // Exactly its length: `Bytes` takes the allocation as it is.
            let mut out = Vec::with_capacity(exact);
            out.push(proto::MessageType::Update.to_u8());
            put_varint(&mut out, header.tick);
            put_varint(&mut out, base_gap);
            put_varint(&mut out, 0);
            out.extend_from_slice(&header.origin_time_us.to_be_bytes());
            out.extend_from_slice(&header.hash.to_be_bytes());
            put_varint(&mut out, header.chunks as u64);
            out.extend_from_slice(&body);
            put_varint(&mut out, header.dropped.len() as u64);
            for &cell in &header.dropped {
                put_cell(&mut out, cell);
            }
            debug_assert_eq!(out.len(), exact);
            if out.len() > proto::msg::MAX_FRAME {
                return Some(Err(proto::EncodeError::TooLarge {
                    what: "update",
                    len: out.len() as u64,
                    max: proto::msg::MAX_FRAME as u64,
                }));
            }
            Some(Ok(BuiltDatagram {
                datagram: Bytes::from(out),
                keyframe: header.base.is_none(),
                tick: header.tick,
            }))
        })
    }

    /// The baseline the next update would be coded against (the newest
    /// acknowledged tick, if `world` still holds it) and the cells the
    /// client held then.
    fn base(&self, world: &WorldState, target: &TickState) -> Option<Base> {
        self.acked
            .filter(|&a| a < target.tick)
            .and_then(|a| world.get(a))
            .and_then(|state| {
                self.sent
                    .iter()
                    .find(|(t, _)| *t == state.tick)
                    .map(|(_, cells)| (state.clone(), cells.clone()))
            })
    }

    /// What the update to `target` will be made of, for coding its chunks
    /// in advance ([`ChunkCache::precode`]); `None` if `target` was already
    /// sent. Changes nothing the client is told.
    pub fn next_update(&mut self, world: &WorldState, target: &TickState) -> Option<NextUpdate> {
        if self.last_sent().is_some_and(|t| t >= target.tick) {
            return None;
        }
        Some(NextUpdate {
            base: self.base(world, target),
            cells: self.cells(world, target),
        })
    }

    /// The update's logic: `on_chunk` gets each chunk in cell order.
    fn build_with(
        &mut self,
        world: &WorldState,
        target: &TickState,
        cache: &ChunkCache,
        mut on_chunk: impl FnMut(CellId, &Bytes),
    ) -> Option<Header> {
        if self.last_sent().is_some_and(|t| t >= target.tick) {
            return None;
        }
        let base = self.base(world, target);
        let cells = self.cells(world, target);
        let layout = world.layout();
        let mut chunks = 0;
        let mut dropped = Vec::new();
        let mut hash = StateHash(0);
        let mut tally = Tally::default();
        // The plans of this update: against its baseline, and from empty.
        let mut plans: [Option<Option<Arc<Plan>>>; 2] = [None, None];
        for &cell in cells.iter() {
            let now = target.cell(cell);
            if let Some(now) = now {
                hash = hash.combine(now.hash);
            }
            let Some((before, now, key_base)) = chunk_for(base.as_ref(), target, cell) else {
                continue;
            };
            let encode = || {
                let empty = Snapshot::empty(layout);
                let from = before.map_or(&empty, |c| &c.snapshot);
                let to = now.map_or(&empty, |c| &c.snapshot);
                encode_chunk(layout, from, to)
            };
            let slot = target.dense.as_ref().and_then(|d| d.slot(cell));
            let plan = match (slot, key_base) {
                (None, _) => None,
                (Some(_), Some(_)) => plans[0]
                    .get_or_insert_with(|| cache.plan(target, key_base))
                    .as_ref(),
                (Some(_), None) => plans[1]
                    .get_or_insert_with(|| cache.plan(target, None))
                    .as_ref(),
            };
            match (plan, slot) {
                (Some(plan), Some(slot)) => ChunkCache::lookup_in(
                    plan,
                    slot,
                    encode,
                    |data| on_chunk(cell, data),
                    &mut tally,
                ),
                _ => cache.lookup(
                    (cell, key_base, target.tick),
                    encode,
                    |data| on_chunk(cell, data),
                    &mut tally,
                ),
            }
            chunks += 1;
        }
        cache.add(&tally);
        if let Some((state, held)) = &base {
            for &cell in held.iter() {
                if state.cell(cell).is_some() && cells.binary_search(&cell).is_err() {
                    dropped.push(cell);
                }
            }
        }
        let header = Header {
            tick: target.tick,
            base: base.as_ref().map(|(s, _)| s.tick),
            origin_time_us: target.origin_time_us,
            hash: hash.0,
            chunks,
            dropped,
        };
        self.sent.push_back((target.tick, cells));
        while self.sent.len() > self.max_sent {
            self.sent.pop_front();
        }
        Some(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use origin::Simulation;
    use proto::interest::Grid;

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

    /// The relay's split gives [`Grid::split`]'s cells and hashes, in a
    /// dense world, a sparse one and one without cells.
    #[test]
    fn split_matches_the_grid() {
        for (avatars, size_m) in [(2000, 1000.0), (30, 100_000.0)] {
            let mut plaza = origin::worlds::plaza::Plaza::new(origin::worlds::plaza::PlazaConfig {
                avatars,
                size_m,
                seed: 2,
            });
            let layout = Arc::new(plaza.schema().layout().unwrap());
            let grid = Grid::new(50.0);
            let mut world = WorldState::new(layout.clone(), Some(grid), 4);
            let mut twin = WorldState::new(layout.clone(), Some(grid), 4);
            let mut parted = WorldState::new(layout.clone(), Some(grid), 4);
            for tick in 1..6 {
                // Ticks 4 and 5 repeat tick 3: every cell is shared.
                if tick < 4 {
                    plaza.step();
                }
                let snapshot = Arc::new(plaza.snapshot(&layout));
                let (state, _) = world
                    .push(tick, 0, snapshot.hash(), snapshot.clone())
                    .unwrap();
                // The feed's entity hashes give the same cells.
                let hashes: Vec<StateHash> = (0..snapshot.len())
                    .map(|i| snapshot.entity_hash(i))
                    .collect();
                let hashed = twin
                    .prepare_hashed(tick, 0, snapshot.hash(), snapshot.clone(), Some(&hashes))
                    .unwrap();
                let (hashed, _) = twin.commit(hashed).unwrap();
                // In three parts built by three threads at once, as the
                // relay's fan-out threads do.
                let split = parted
                    .split(
                        tick,
                        0,
                        snapshot.hash(),
                        snapshot.clone(),
                        Some(hashes.into()),
                    )
                    .unwrap();
                let parts: Vec<_> = std::thread::scope(|s| {
                    let threads: Vec<_> = (0..3)
                        .map(|i| {
                            let split = &split;
                            s.spawn(move || split.part(i, 3))
                        })
                        .collect();
                    threads.into_iter().map(|t| t.join().unwrap()).collect()
                });
                assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), split.len());
                let (parted_state, _) = parted.commit_keeping(split.finish(parts)).unwrap();
                assert_eq!(parted_state.tick, tick);
                let expected = grid.split(&layout, &snapshot);
                assert_eq!(state.cells.len(), expected.len());
                assert_eq!(hashed.cells.len(), expected.len());
                assert_eq!(parted_state.cells.len(), expected.len());
                for (cell, part) in &expected {
                    for got in [
                        &state.cells[cell],
                        &hashed.cells[cell],
                        &parted_state.cells[cell],
                    ] {
                        assert_eq!(*got.snapshot, *part);
                        assert_eq!(got.hash, part.hash());
                    }
                }
                if tick >= 4 {
                    for (ring, now) in [(&world, &state), (&parted, &parted_state)] {
                        let before = ring.get(tick - 1).unwrap();
                        for (cell, got) in &now.cells {
                            let old = before.cell(*cell).unwrap();
                            assert!(Arc::ptr_eq(&old.snapshot, &got.snapshot), "{cell:?}");
                        }
                    }
                }
            }
        }
    }

    /// Chunks coded in advance, by two threads at once, are exactly the
    /// ones the updates then use, also when two threads list them at once
    /// (every other tick; each chunk listed once): building the updates
    /// codes nothing more,
    /// each precoded chunk counts as one miss (its first use), and the
    /// datagrams are the bytes a relay without the cache sends (clients
    /// acking at different paces, one never acking, one moving its
    /// interest).
    #[test]
    fn precoded_chunks_are_the_ones_updates_use() {
        let mut plaza = origin::worlds::plaza::Plaza::new(origin::worlds::plaza::PlazaConfig {
            avatars: 600,
            size_m: 500.0,
            seed: 9,
        });
        let layout = Arc::new(plaza.schema().layout().unwrap());
        let mut world = WorldState::new(layout.clone(), Some(Grid::new(50.0)), 8);
        let cache = ChunkCache::new(true);
        let plain = ChunkCache::new(false);
        let around = |x: f64, y: f64| Interest::Around {
            x,
            y,
            radius: 110.0,
        };
        let mut views: Vec<ClientView> = [(100.0, 100.0), (120.0, 90.0), (400.0, 300.0)]
            .iter()
            .map(|&(x, y)| ClientView::new(around(x, y), 8))
            .chain([ClientView::new(Interest::All, 8)])
            .collect();
        let mut twins = views.clone();
        let mut precoded_total = 0;
        for tick in 1..25u64 {
            plaza.step();
            let snapshot = Arc::new(plaza.snapshot(&layout));
            let (state, _) = world.push(tick, tick, snapshot.hash(), snapshot).unwrap();
            if tick == 9 {
                views[0].set_interest(around(300.0, 350.0));
                twins[0].set_interest(around(300.0, 350.0));
            }
            let needs: Vec<_> = views
                .iter_mut()
                .filter_map(|v| v.next_update(&world, &state))
                .collect();
            let precode = if tick % 2 == 0 {
                cache.precode(&layout, &state, needs)
            } else {
                let (a, b) = needs.split_at(needs.len() / 2);
                let lists = std::thread::scope(|s| {
                    let other = s.spawn(|| cache.precode_part(&state, b.to_vec()));
                    vec![
                        cache.precode_part(&state, a.to_vec()),
                        other.join().unwrap(),
                    ]
                });
                Precode::new(&layout, lists)
            };
            let coded: u64 = std::thread::scope(|s| {
                let other = s.spawn(|| precode.work(&cache));
                precode.work(&cache) + other.join().unwrap()
            });
            assert_eq!(coded, precode.len() as u64);
            precoded_total += coded;
            let (held, (_, misses)) = (cache.len(), cache.counts());
            for (i, (view, twin)) in views.iter_mut().zip(&mut twins).enumerate() {
                let fast = view
                    .build_datagram(&world, &state, &cache)
                    .unwrap()
                    .unwrap();
                let slow = twin
                    .build_datagram(&world, &state, &plain)
                    .unwrap()
                    .unwrap();
                assert_eq!(fast.datagram, slow.datagram, "tick {tick}, view {i}");
                // View 0 acks every tick, 1 every other, 2 every third, 3 never.
                if i < 3 && tick % (i as u64 + 1) == 0 {
                    view.on_ack(tick);
                    twin.on_ack(tick);
                }
            }
            assert_eq!(cache.len(), held, "tick {tick}: a chunk was coded late");
            assert_eq!(cache.counts().1 - misses, coded, "tick {tick}");
            // The next tick's chunks would be coded against views' acks.
        }
        assert_eq!(cache.precoded(), precoded_total);
        assert!(precoded_total > 100, "{precoded_total}");
    }

    /// `build_datagram` writes the bytes proto's encoder writes for the
    /// update `build_update` makes, over keyframes, deltas, moves of the
    /// interest (dropped cells) and a world without cells; the dense cell
    /// index finds what the `BTreeMap` holds.
    #[test]
    fn datagram_matches_the_encoded_update() {
        let mut plaza = origin::worlds::plaza::Plaza::new(origin::worlds::plaza::PlazaConfig {
            avatars: 400,
            size_m: 400.0,
            seed: 5,
        });
        let layout = Arc::new(plaza.schema().layout().unwrap());
        for grid in [Some(Grid::new(50.0)), None] {
            let mut world = WorldState::new(layout.clone(), grid, 8);
            let cache = ChunkCache::new(true);
            let mut views = [
                ClientView::new(
                    Interest::Around {
                        x: 120.0,
                        y: 80.0,
                        radius: 110.0,
                    },
                    8,
                ),
                ClientView::new(Interest::All, 8),
            ];
            for tick in 1..30u64 {
                plaza.step();
                let snapshot = Arc::new(plaza.snapshot(&layout));
                let hash = snapshot.hash();
                let (state, _) = world.push(tick, 1000 + tick, hash, snapshot).unwrap();
                for (id, cell) in &state.cells {
                    assert_eq!(state.cell(*id).map(|c| c.hash), Some(cell.hash));
                }
                assert!(state.cell(CellId { x: 1000, y: 1000 }).is_none());
                for (i, view) in views.iter_mut().enumerate() {
                    if tick == 12 && i == 0 {
                        view.set_interest(Interest::Around {
                            x: 300.0,
                            y: 250.0,
                            radius: 90.0,
                        });
                    }
                    let mut twin = view.clone();
                    let built = view.build_update(&world, &state, &cache).unwrap();
                    let fast = twin
                        .build_datagram(&world, &state, &cache)
                        .unwrap()
                        .unwrap();
                    let mut expected = bytes::BytesMut::new();
                    proto::Message::Update(built.update.clone())
                        .encode_datagram(&mut expected)
                        .unwrap();
                    assert_eq!(fast.datagram, expected.freeze(), "tick {tick}, view {i}");
                    assert_eq!(fast.keyframe, built.keyframe);
                    // Acks lag by one tick for one of them, and skip some.
                    if tick % 5 != 0 {
                        view.on_ack(tick - (i as u64 % 2).min(tick - 1));
                    }
                }
            }
        }
    }
}
