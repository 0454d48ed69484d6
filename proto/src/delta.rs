//! The delta codec: the change from a baseline snapshot to a target snapshot.
//!
//! A delta names, in this order:
//!
//! 1. the entities of the baseline that are gone (gaps between their
//!    positions in the baseline);
//! 2. the ids of the entities that are new (gaps between ids);
//! 3. for every entity kept from the baseline, whether it changed, and if so a
//!    mask of changed fields (one adaptive bit per field) and each changed
//!    value as a residual against a prediction;
//! 4. the values of the new entities in full, each lane coded against the
//!    same lane of the previous new entity.
//!
//! A keyframe is a delta from the empty snapshot. Everything is coded with
//! an adaptive binary range coder (the private `rc` module) whose models are fresh for
//! every delta: no state carries from one update to the next, so any relay
//! can continue any client.
//!
//! ## Prediction and contexts
//!
//! With one baseline, the prediction of a value is its baseline value. When
//! the receiver also holds an older snapshot ([`Prediction::prev`]), the
//! number lanes of a moving entity are extrapolated linearly:
//! `base + (base - prev) * ahead / span`, in integers, clamped to the lane's
//! range. Quaternion components are not extrapolated (on the cubes trace it
//! cost more than it saved). Residuals wrap modulo the lane's range, so
//! coding stays exact whatever the prediction.
//!
//! The adaptive models are chosen by context:
//!
//! - the entity-changed flag by the last two flags, the entity's motion
//!   between `prev` and `base`, and the baseline's first two bool lanes;
//! - the field mask by a bit tree over the first eight fields (so fields that
//!   change together cost little) and the entity's motion;
//! - a residual's magnitude by the lane's own motion, the magnitude of the
//!   previous lane of the entity and of the same lane in the previous changed
//!   entity; its sign by the lane's direction of motion.
//!
//! Moving things keep moving, resting things keep resting, neighbours in id
//! order tend to move together, and big motions give big residuals: the
//! contexts turn each of these into fewer bits.
//!
//! ## Safety
//!
//! [`decode`] takes untrusted bytes. Counts are checked against the schema's
//! `max_entities` and the baseline before anything is allocated, every value
//! against its lane's range, and the range decoder fails once it reads past
//! the end of the input, so decoding never panics and never runs on.

use crate::rc::{Bit, CLASSES, Decoder, Encoder, Overrun, UintModel, class_of};
use crate::schema::{FieldSlot, LaneKind, Layout};
use crate::snapshot::{EntityId, Snapshot};

/// An older baseline, held by both ends, that the codec extrapolates from.
#[derive(Clone, Copy, Debug)]
pub struct Prediction<'a> {
    /// The snapshot `span` ticks before the baseline.
    pub prev: &'a Snapshot,
    /// Ticks from `prev` to the baseline. Zero turns prediction off.
    pub span: u32,
    /// Ticks from the baseline to the target.
    pub ahead: u32,
}

/// Why a delta could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaError {
    /// The bytes ended before the delta did (or are not a delta).
    #[error("delta truncated or corrupt: input ended early")]
    Truncated,
    /// More entities than the world's `max_entities`.
    #[error("delta holds {count} entities, the world allows {max}")]
    TooManyEntities {
        /// Entities the delta would make.
        count: u64,
        /// Allowed.
        max: usize,
    },
    /// Removes entities the baseline does not hold.
    #[error("delta removes entities the baseline does not hold")]
    BadRemoval,
    /// Adds an entity whose id already exists or overflows.
    #[error("delta adds entity id {0} twice or past the id space")]
    BadId(u64),
    /// A value lies outside its lane's range.
    #[error("value {value} of lane {lane} is out of range")]
    OutOfRange {
        /// Lane index.
        lane: usize,
        /// Value decoded.
        value: u64,
    },
    /// A byte field is longer than the schema allows.
    #[error("byte field of {len} bytes, at most {max} allowed")]
    BlobTooLong {
        /// Length decoded.
        len: u64,
        /// Allowed.
        max: u32,
    },
    /// Baseline or prediction snapshot does not fit the layout.
    #[error("baseline snapshot does not fit the schema")]
    BaseMismatch,
}

impl From<Overrun> for DeltaError {
    fn from(_: Overrun) -> Self {
        DeltaError::Truncated
    }
}

/// Context buckets of a magnitude class.
const BUCKETS: usize = 3;
#[inline]
fn bucket(class: u32) -> usize {
    match class {
        0 => 0,
        1..=3 => 1,
        _ => 2,
    }
}

/// Contexts per lane: motion bucket x previous-lane bucket x the same
/// lane's bucket in the previous changed entity.
const VALUE_CTX: usize = BUCKETS * BUCKETS * BUCKETS;
/// Contexts of the entity-changed flag: the last two flags (4) x motion
/// bucket (3) x the baseline's first two bool lanes (4).
const CHANGED_CTX: usize = 4 * BUCKETS * 4;
/// Fields whose change mask is coded jointly (a bit tree over them).
const JOINT_FIELDS: usize = 8;
/// Mask-tree nodes per motion bucket: the joint tree, then two per
/// further field (previous field changed or not).
const MASK_NODES: usize = (1 << JOINT_FIELDS) + 2 * crate::schema::MAX_FIELDS;

#[inline]
fn value_ctx(motion: usize, prev_lane: u32, prev_entity: u32) -> usize {
    let _ = prev_entity;
    (motion * BUCKETS + bucket(prev_lane)) * BUCKETS
}

/// Index of the mask bit of field `f` given the mask bits coded before it.
#[inline]
fn mask_node(motion: usize, f: usize, prefix: u32, prev: bool) -> usize {
    let node = if f < JOINT_FIELDS {
        (1usize << f) | prefix as usize
    } else {
        (1 << JOINT_FIELDS) + 2 * (f - JOINT_FIELDS) + prev as usize
    };
    motion * MASK_NODES + node
}

/// The adaptive models of one delta. Kept in a [`Codec`] to reuse memory.
#[derive(Clone)]
struct Models {
    removed_count: UintModel,
    removed_gap: UintModel,
    added_count: UintModel,
    added_gap: UintModel,
    /// Entity changed? See [`CHANGED_CTX`].
    changed: [Bit; CHANGED_CTX],
    /// Field change masks: a bit tree per motion bucket ([`mask_node`]).
    field: Vec<Bit>,
    /// Lanes whose baseline values are context for the changed flag.
    flag_lanes: Vec<usize>,
    /// Per lane, the magnitude class in the previous changed entity.
    lane_history: Vec<u32>,
    /// The lane kinds these models were made for.
    kinds: Vec<LaneKind>,
    /// Per lane and context: residual magnitude.
    value: Vec<[UintModel; VALUE_CTX]>,
    /// Per lane and context: residual sign.
    sign: Vec<[Bit; 3 * BUCKETS]>,
    /// Quaternion largest index, per baseline largest index: 2-bit tree.
    largest: [[Bit; 4]; 5],
    /// New entities: per lane residual against the previous new entity.
    added_value: Vec<UintModel>,
    /// Number of this codec run, for the lazy reset of the value models.
    epoch: u32,
    added_sign: Vec<Bit>,
    blob_len: UintModel,
}

impl Models {
    /// Context of an entity's changed flag.
    #[inline]
    fn changed_ctx(&self, history: usize, motion: usize, base: &[u32]) -> usize {
        let mut flags = 0;
        for (i, &lane) in self.flag_lanes.iter().enumerate() {
            flags |= (base[lane] as usize & 1) << i;
        }
        ((history & 3) * BUCKETS + motion) * 4 + flags
    }

    fn new(layout: &Layout) -> Models {
        let lanes = layout.lane_count();
        Models {
            removed_count: UintModel::default(),
            removed_gap: UintModel::default(),
            added_count: UintModel::default(),
            added_gap: UintModel::default(),
            changed: [Bit::default(); CHANGED_CTX],
            field: vec![Bit::default(); BUCKETS * MASK_NODES],
            flag_lanes: layout
                .lanes()
                .iter()
                .enumerate()
                .filter(|(_, k)| **k == LaneKind::Bool)
                .map(|(i, _)| i)
                .take(2)
                .collect(),
            lane_history: vec![0; lanes],
            kinds: layout.lanes().to_vec(),
            value: vec![std::array::from_fn(|_| UintModel::default()); lanes],
            sign: vec![[Bit::default(); 3 * BUCKETS]; lanes],
            largest: [[Bit::default(); 4]; 5],
            added_value: vec![UintModel::default(); lanes],
            epoch: 0,
            added_sign: vec![Bit::default(); lanes],
            blob_len: UintModel::default(),
        }
    }

    fn reset(&mut self, layout: &Layout) {
        if self.kinds != layout.lanes() {
            *self = Models::new(layout);
            return;
        }
        self.removed_count = UintModel::default();
        self.removed_gap = UintModel::default();
        self.added_count = UintModel::default();
        self.added_gap = UintModel::default();
        self.changed = [Bit::default(); CHANGED_CTX];
        self.field.fill(Bit::default());
        self.lane_history.fill(0);
        // The per-lane value models are reset lazily, on first use in this
        // run (`UintModel::fresh`); on the rare wrap of the epoch counter
        // every model is reset for real.
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.epoch = 1;
            for v in &mut self.value {
                v.fill(UintModel::default());
            }
            self.added_value.fill(UintModel::default());
        }
        self.sign.fill([Bit::default(); 3 * BUCKETS]);
        self.largest = [[Bit::default(); 4]; 5];
        self.added_sign.fill(Bit::default());
        self.blob_len = UintModel::default();
    }
}

/// Modulus and signed wrap of a lane's residuals.
#[inline]
fn modulus(kind: LaneKind) -> u64 {
    1u64 << kind.bits()
}

/// `target - predicted` wrapped into `[-m/2, m/2)` for modulus `m`.
#[inline]
fn wrap(target: u32, predicted: u32, m: u64) -> i64 {
    let d = (target as u64).wrapping_sub(predicted as u64) & (m - 1);
    if d >= m / 2 {
        d as i64 - m as i64
    } else {
        d as i64
    }
}

#[inline]
fn unwrap_residual(predicted: u32, r: i64, m: u64) -> u64 {
    (predicted as i64 + r).rem_euclid(m as i64) as u64
}

/// Walks one entity's field mask for encoder and decoder alike (so the two
/// cannot drift apart): the model of each field's bit, and what a field's
/// bit means for the contexts that follow.
struct MaskWalk {
    prefix: u32,
    prev: bool,
}

impl MaskWalk {
    fn new() -> MaskWalk {
        MaskWalk {
            prefix: 0,
            prev: true,
        }
    }

    /// Model index of field `f`'s changed bit.
    #[inline]
    fn node(&self, motion: usize, f: usize) -> usize {
        mask_node(motion, f, self.prefix, self.prev)
    }

    /// Records field `f`'s bit; an unchanged field clears its lanes'
    /// history. Returns the bit.
    #[inline]
    fn push(&mut self, f: usize, changed: bool, slot: &FieldSlot, history: &mut [u32]) -> bool {
        self.prev = changed;
        if f < JOINT_FIELDS {
            self.prefix = (self.prefix << 1) | changed as u32;
        }
        if !changed {
            history[slot.lane..slot.lane + slot.lanes].fill(0);
        }
        changed
    }
}

/// Contexts of one residual: (magnitude model, sign model). The lane's own
/// motion between `prev` and `base` (size and direction), the magnitude of
/// the entity's previous lane and of this lane in the previous changed
/// entity.
#[inline]
fn residual_ctx(
    motion: &Motion<'_>,
    base: &[u32],
    lane: usize,
    prev_class: u32,
    history: u32,
) -> (usize, usize) {
    let (lane_motion, direction) = motion.prev.map_or((0, 0), |p| {
        let size = bucket(class_of(p[lane].abs_diff(base[lane]) as u64));
        let direction = match base[lane].cmp(&p[lane]) {
            std::cmp::Ordering::Equal => 0,
            std::cmp::Ordering::Greater => 1,
            std::cmp::Ordering::Less => 2,
        };
        (size, direction)
    });
    (
        value_ctx(lane_motion, prev_class, history),
        direction * BUCKETS + lane_motion,
    )
}

/// What the codec knows of an entity's motion between `prev` and `base`.
struct Motion<'a> {
    prev: Option<&'a [u32]>,
    bucket: usize,
}

/// Walks the prediction snapshot alongside baseline ids (both ascending).
struct PrevCursor<'a> {
    snapshot: Option<&'a Snapshot>,
    pos: usize,
}

impl<'a> PrevCursor<'a> {
    #[inline]
    fn motion(&mut self, id: EntityId, base: &[u32]) -> Motion<'a> {
        let Some(s) = self.snapshot else {
            return Motion {
                prev: None,
                bucket: 0,
            };
        };
        let ids = s.ids();
        while self.pos < ids.len() && ids[self.pos] < id {
            self.pos += 1;
        }
        if self.pos < ids.len() && ids[self.pos] == id {
            let prev = s.lanes(self.pos);
            let moved = prev
                .iter()
                .zip(base)
                .map(|(&p, &b)| p.abs_diff(b))
                .max()
                .unwrap_or(0);
            Motion {
                prev: Some(prev),
                bucket: bucket(class_of(moved as u64)),
            }
        } else {
            Motion {
                prev: None,
                bucket: 0,
            }
        }
    }
}

/// Prediction of one lane.
#[inline]
fn predict(base: u32, prev: Option<u32>, kind: LaneKind, ratio: (u32, u32)) -> u32 {
    match (prev, kind) {
        (Some(p), LaneKind::Number { max, .. }) if p != base && ratio.1 > 0 => {
            let v = base as i128 + (base as i128 - p as i128) * ratio.0 as i128 / ratio.1 as i128;
            v.clamp(0, max as i128) as u32
        }
        _ => base,
    }
}

fn lanes_differ(a: &[u32], b: &[u32]) -> bool {
    a != b
}

fn field_changed(
    slot: &FieldSlot,
    base: &[u32],
    target: &[u32],
    base_blobs: &[Vec<u8>],
    target_blobs: &[Vec<u8>],
) -> bool {
    match slot.blob {
        Some(b) => base_blobs[b] != target_blobs[b],
        None => {
            base[slot.lane..slot.lane + slot.lanes] != target[slot.lane..slot.lane + slot.lanes]
        }
    }
}

/// A reusable encoder/decoder: holds the model memory between deltas.
pub struct Codec {
    models: Models,
    scratch: Vec<u32>,
}

impl Codec {
    /// A codec for snapshots of `layout`.
    pub fn new(layout: &Layout) -> Codec {
        Codec {
            models: Models::new(layout),
            scratch: Vec::new(),
        }
    }

    /// Encodes the change from `base` to `target`, appending to `out`.
    ///
    /// # Panics
    /// If `base`, `target` or the prediction snapshot do not fit `layout`
    /// (a caller bug: snapshots are built against their world's layout).
    pub fn encode(
        &mut self,
        layout: &Layout,
        base: &Snapshot,
        prediction: Option<Prediction<'_>>,
        target: &Snapshot,
        out: &mut Vec<u8>,
    ) {
        assert!(
            base.fits(layout) && target.fits(layout),
            "snapshot/layout mismatch"
        );
        if let Some(p) = &prediction {
            assert!(p.prev.fits(layout), "prediction snapshot/layout mismatch");
        }
        self.models.reset(layout);
        let m = &mut self.models;
        let mut enc = Encoder::new(out);

        // Merge the two id lists.
        let (bids, tids) = (base.ids(), target.ids());
        let mut removed = Vec::new();
        let mut kept = Vec::with_capacity(bids.len().min(tids.len()));
        let mut added = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < bids.len() || j < tids.len() {
            if j == tids.len() || (i < bids.len() && bids[i] < tids[j]) {
                removed.push(i);
                i += 1;
            } else if i == bids.len() || tids[j] < bids[i] {
                added.push(j);
                j += 1;
            } else {
                kept.push((i, j));
                i += 1;
                j += 1;
            }
        }

        m.removed_count.encode(&mut enc, removed.len() as u64);
        let mut next = 0usize;
        for &r in &removed {
            m.removed_gap.encode(&mut enc, (r - next) as u64);
            next = r + 1;
        }
        m.added_count.encode(&mut enc, added.len() as u64);
        let mut next = 0u64;
        for &a in &added {
            let id = tids[a] as u64;
            m.added_gap.encode(&mut enc, id - next);
            next = id + 1;
        }

        let ratio = prediction.map_or((0, 0), |p| (p.ahead, p.span));
        let mut cursor = PrevCursor {
            snapshot: prediction.filter(|p| p.span > 0).map(|p| p.prev),
            pos: 0,
        };
        let kinds = layout.lanes();
        let mut history = 0usize;
        for &(bi, ti) in &kept {
            let (bl, tl) = (base.lanes(bi), target.lanes(ti));
            let (bb, tb) = (base.blobs(bi), target.blobs(ti));
            let motion = cursor.motion(bids[bi], bl);
            let changed = lanes_differ(bl, tl) || bb != tb;
            let ctx = m.changed_ctx(history, motion.bucket, bl);
            enc.bit(&mut m.changed[ctx], changed);
            history = (history << 1) | changed as usize;
            if !changed {
                continue;
            }
            let mut mask = MaskWalk::new();
            let mut prev_class = 0u32;
            for (f, slot) in layout.fields().iter().enumerate() {
                let fc = field_changed(slot, bl, tl, bb, tb);
                enc.bit(&mut m.field[mask.node(motion.bucket, f)], fc);
                if !mask.push(f, fc, slot, &mut m.lane_history) {
                    prev_class = 0;
                    continue;
                }
                if let Some(b) = slot.blob {
                    m.blob_len.encode(&mut enc, tb[b].len() as u64);
                    for &byte in &tb[b] {
                        enc.direct(byte as u32, 8);
                    }
                    continue;
                }
                let mut quat_stable = true;
                for lane in slot.lane..slot.lane + slot.lanes {
                    let kind = kinds[lane];
                    match kind {
                        LaneKind::Bool => {} // changed means flipped
                        LaneKind::QuatLargest => {
                            code_largest(&mut enc, &mut m.largest[bl[lane] as usize], tl[lane]);
                            let prev_largest = motion.prev.map(|p| p[lane]);
                            quat_stable =
                                tl[lane] == bl[lane] && prev_largest.is_none_or(|p| p == bl[lane]);
                        }
                        _ => {
                            let prev = if quat_stable {
                                motion.prev.map(|p| p[lane])
                            } else {
                                None
                            };
                            let p = predict(bl[lane], prev, kind, ratio);
                            let r = wrap(tl[lane], p, modulus(kind));
                            let (ctx, sign_ctx) =
                                residual_ctx(&motion, bl, lane, prev_class, m.lane_history[lane]);
                            prev_class = m.value[lane][ctx]
                                .fresh(m.epoch)
                                .encode(&mut enc, r.unsigned_abs());
                            m.lane_history[lane] = prev_class;
                            if r != 0 {
                                enc.bit(&mut m.sign[lane][sign_ctx], r < 0);
                            }
                        }
                    }
                }
            }
        }

        // New entities in full, against the previous new entity.
        let mut last: Option<usize> = None;
        for &ti in &added {
            let tl = target.lanes(ti);
            for (lane, &kind) in kinds.iter().enumerate() {
                let reference = last.map_or(0, |l| target.lanes(l)[lane]);
                match kind {
                    LaneKind::Bool => enc.bit(&mut m.added_sign[lane], tl[lane] == 1),
                    LaneKind::QuatLargest => {
                        code_largest(&mut enc, &mut m.largest[4], tl[lane]);
                    }
                    _ => {
                        let r = wrap(tl[lane], reference, modulus(kind));
                        m.added_value[lane]
                            .fresh(m.epoch)
                            .encode(&mut enc, r.unsigned_abs());
                        if r != 0 {
                            enc.bit(&mut m.added_sign[lane], r < 0);
                        }
                    }
                }
            }
            for blob in target.blobs(ti) {
                m.blob_len.encode(&mut enc, blob.len() as u64);
                for &byte in blob {
                    enc.direct(byte as u32, 8);
                }
            }
            last = Some(ti);
        }
        enc.finish();
    }

    /// Decodes a delta made by [`Codec::encode`] with the same baseline and
    /// prediction.
    pub fn decode(
        &mut self,
        layout: &Layout,
        base: &Snapshot,
        prediction: Option<Prediction<'_>>,
        bytes: &[u8],
    ) -> Result<Snapshot, DeltaError> {
        if !base.fits(layout) || prediction.is_some_and(|p| !p.prev.fits(layout)) {
            return Err(DeltaError::BaseMismatch);
        }
        self.models.reset(layout);
        let m = &mut self.models;
        let mut dec = Decoder::new(bytes);
        let max = layout.max_entities();
        let bids = base.ids();

        let removed_count = uint(&mut m.removed_count, &mut dec)?;
        if removed_count > bids.len() as u64 {
            return Err(DeltaError::BadRemoval);
        }
        // Mark removed baseline entities.
        let mut is_removed = vec![false; bids.len()];
        let mut next = 0u64;
        for _ in 0..removed_count {
            let gap = uint(&mut m.removed_gap, &mut dec)?;
            let index = next + gap;
            if index >= bids.len() as u64 {
                return Err(DeltaError::BadRemoval);
            }
            is_removed[index as usize] = true;
            next = index + 1;
            dec.check()?;
        }
        let kept_count = bids.len() - removed_count as usize;
        let added_count = uint(&mut m.added_count, &mut dec)?;
        let total = kept_count as u64 + added_count;
        if total > max as u64 {
            return Err(DeltaError::TooManyEntities { count: total, max });
        }
        let mut added_ids = Vec::with_capacity(added_count as usize);
        let mut next = 0u64;
        for _ in 0..added_count {
            let id = next + uint(&mut m.added_gap, &mut dec)?;
            if id > EntityId::MAX as u64
                || base.find(id as EntityId).is_some_and(|i| !is_removed[i])
            {
                return Err(DeltaError::BadId(id));
            }
            added_ids.push(id as EntityId);
            next = id + 1;
            dec.check()?;
        }

        let ratio = prediction.map_or((0, 0), |p| (p.ahead, p.span));
        let mut cursor = PrevCursor {
            snapshot: prediction.filter(|p| p.span > 0).map(|p| p.prev),
            pos: 0,
        };
        let kinds = layout.lanes();
        let lanes_per = layout.lane_count();
        let mut kept_lanes = std::mem::take(&mut self.scratch);
        kept_lanes.clear();
        kept_lanes.reserve(kept_count * lanes_per);
        let mut kept_blobs: Vec<Vec<u8>> = Vec::new();
        let mut history = 0usize;
        for bi in 0..bids.len() {
            if is_removed[bi] {
                continue;
            }
            let bl = base.lanes(bi);
            let bb = base.blobs(bi);
            let motion = cursor.motion(bids[bi], bl);
            let start = kept_lanes.len();
            kept_lanes.extend_from_slice(bl);
            let blob_start = kept_blobs.len();
            kept_blobs.extend_from_slice(bb);
            let ctx = m.changed_ctx(history, motion.bucket, bl);
            let changed = dec.bit(&mut m.changed[ctx]);
            history = (history << 1) | changed as usize;
            if !changed {
                continue;
            }
            let tl = &mut kept_lanes[start..start + lanes_per];
            let mut mask = MaskWalk::new();
            let mut prev_class = 0u32;
            for (f, slot) in layout.fields().iter().enumerate() {
                let fc = dec.bit(&mut m.field[mask.node(motion.bucket, f)]);
                if !mask.push(f, fc, slot, &mut m.lane_history) {
                    prev_class = 0;
                    continue;
                }
                if let Some(b) = slot.blob {
                    kept_blobs[blob_start + b] =
                        read_blob(&mut dec, &mut m.blob_len, slot.max_len)?;
                    continue;
                }
                let mut quat_stable = true;
                for lane in slot.lane..slot.lane + slot.lanes {
                    let kind = kinds[lane];
                    match kind {
                        LaneKind::Bool => tl[lane] = 1 - bl[lane],
                        LaneKind::QuatLargest => {
                            tl[lane] = read_largest(&mut dec, &mut m.largest[bl[lane] as usize]);
                            let prev_largest = motion.prev.map(|p| p[lane]);
                            quat_stable =
                                tl[lane] == bl[lane] && prev_largest.is_none_or(|p| p == bl[lane]);
                        }
                        _ => {
                            let prev = if quat_stable {
                                motion.prev.map(|p| p[lane])
                            } else {
                                None
                            };
                            let p = predict(bl[lane], prev, kind, ratio);
                            let (ctx, sign_ctx) =
                                residual_ctx(&motion, bl, lane, prev_class, m.lane_history[lane]);
                            let (mag, class) = m.value[lane][ctx]
                                .fresh(m.epoch)
                                .decode(&mut dec)
                                .ok_or(DeltaError::Truncated)?;
                            prev_class = class;
                            m.lane_history[lane] = class;
                            let modulus = modulus(kind);
                            if mag > modulus / 2 {
                                return Err(DeltaError::OutOfRange { lane, value: mag });
                            }
                            let r = if mag != 0 && dec.bit(&mut m.sign[lane][sign_ctx]) {
                                -(mag as i64)
                            } else {
                                mag as i64
                            };
                            let v = unwrap_residual(p, r, modulus);
                            if v > kind.max() as u64 {
                                return Err(DeltaError::OutOfRange { lane, value: v });
                            }
                            tl[lane] = v as u32;
                        }
                    }
                }
            }
            if tl == bl && kept_blobs[blob_start..] == *bb {
                // The encoder only flags entities that changed: a "change"
                // to identical values is not something it makes.
                return Err(DeltaError::Truncated);
            }
            dec.check()?;
        }

        let mut added_lanes = vec![0u32; added_ids.len() * lanes_per];
        let mut added_blobs: Vec<Vec<u8>> = Vec::new();
        for a in 0..added_ids.len() {
            for (lane, &kind) in kinds.iter().enumerate() {
                let reference = if a == 0 {
                    0
                } else {
                    added_lanes[(a - 1) * lanes_per + lane]
                };
                let v = match kind {
                    LaneKind::Bool => dec.bit(&mut m.added_sign[lane]) as u32,
                    LaneKind::QuatLargest => read_largest(&mut dec, &mut m.largest[4]),
                    _ => {
                        let (mag, _) = m.added_value[lane]
                            .fresh(m.epoch)
                            .decode(&mut dec)
                            .ok_or(DeltaError::Truncated)?;
                        let modulus = modulus(kind);
                        if mag > modulus / 2 {
                            return Err(DeltaError::OutOfRange { lane, value: mag });
                        }
                        let r = if mag != 0 && dec.bit(&mut m.added_sign[lane]) {
                            -(mag as i64)
                        } else {
                            mag as i64
                        };
                        let v = unwrap_residual(reference, r, modulus);
                        if v > kind.max() as u64 {
                            return Err(DeltaError::OutOfRange { lane, value: v });
                        }
                        v as u32
                    }
                };
                added_lanes[a * lanes_per + lane] = v;
            }
            for slot in layout.fields() {
                if slot.blob.is_some() {
                    added_blobs.push(read_blob(&mut dec, &mut m.blob_len, slot.max_len)?);
                }
            }
            dec.check()?;
        }
        dec.check()?;

        // Merge kept (baseline order) and added (id order) by id.
        let blobs_per = layout.blob_count();
        let mut out = Snapshot::with_capacity(layout, total as usize);
        let kept_ids = bids
            .iter()
            .enumerate()
            .filter(|(i, _)| !is_removed[*i])
            .map(|(_, &id)| id);
        let mut k = 0usize;
        let mut a = 0usize;
        let mut kept_ids = kept_ids.peekable();
        loop {
            let take_kept = match (kept_ids.peek(), added_ids.get(a)) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(&kid), Some(&aid)) => kid < aid,
            };
            if take_kept {
                let id = kept_ids.next().unwrap_or_default();
                out.push_checked(
                    id,
                    &kept_lanes[k * lanes_per..(k + 1) * lanes_per],
                    &kept_blobs[k * blobs_per..(k + 1) * blobs_per],
                );
                k += 1;
            } else {
                out.push_checked(
                    added_ids[a],
                    &added_lanes[a * lanes_per..(a + 1) * lanes_per],
                    &added_blobs[a * blobs_per..(a + 1) * blobs_per],
                );
                a += 1;
            }
        }
        self.scratch = kept_lanes;
        Ok(out)
    }
}

fn uint(model: &mut UintModel, dec: &mut Decoder<'_>) -> Result<u64, DeltaError> {
    let (v, _) = model.decode(dec).ok_or(DeltaError::Truncated)?;
    dec.check()?;
    Ok(v)
}

#[inline]
fn code_largest(enc: &mut Encoder<'_>, tree: &mut [Bit; 4], value: u32) {
    let hi = (value >> 1) & 1 == 1;
    enc.bit(&mut tree[1], hi);
    enc.bit(&mut tree[2 + hi as usize], value & 1 == 1);
}

#[inline]
fn read_largest(dec: &mut Decoder<'_>, tree: &mut [Bit; 4]) -> u32 {
    let hi = dec.bit(&mut tree[1]);
    let lo = dec.bit(&mut tree[2 + hi as usize]);
    ((hi as u32) << 1) | lo as u32
}

fn read_blob(
    dec: &mut Decoder<'_>,
    model: &mut UintModel,
    max: u32,
) -> Result<Vec<u8>, DeltaError> {
    let len = uint(model, dec)?;
    if len > max as u64 {
        return Err(DeltaError::BlobTooLong { len, max });
    }
    let mut blob = Vec::with_capacity(len as usize);
    for _ in 0..len {
        blob.push(dec.direct(8) as u8);
    }
    dec.check()?;
    Ok(blob)
}

/// Encodes the change from `base` to `target`, appending to `out`.
/// See [`Codec::encode`]; a [`Codec`] reuses memory across calls.
pub fn encode(
    layout: &Layout,
    base: &Snapshot,
    prediction: Option<Prediction<'_>>,
    target: &Snapshot,
    out: &mut Vec<u8>,
) {
    Codec::new(layout).encode(layout, base, prediction, target, out)
}

/// Decodes a delta made by [`encode`] with the same baseline and prediction.
pub fn decode(
    layout: &Layout,
    base: &Snapshot,
    prediction: Option<Prediction<'_>>,
    bytes: &[u8],
) -> Result<Snapshot, DeltaError> {
    Codec::new(layout).decode(layout, base, prediction, bytes)
}

/// Encodes `target` as a keyframe: a delta from the empty snapshot.
pub fn keyframe(layout: &Layout, target: &Snapshot, out: &mut Vec<u8>) {
    encode(layout, &Snapshot::empty(layout), None, target, out)
}

/// Decodes a keyframe made by [`keyframe`].
pub fn decode_keyframe(layout: &Layout, bytes: &[u8]) -> Result<Snapshot, DeltaError> {
    decode(layout, &Snapshot::empty(layout), None, bytes)
}

const _: () = assert!(CLASSES >= 34);
