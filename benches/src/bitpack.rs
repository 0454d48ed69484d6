//! A plain bit-packed delta codec for the cubes trace: the baseline that the
//! statecast codec is measured against.
//!
//! It follows what public snapshot-compression articles describe (Glenn
//! Fiedler's "Snapshot Compression", 2015) before any prediction or entropy
//! coding: only changed cubes are sent, named by a list of relative index gaps
//! (or a bitmask when that is smaller), and each changed field is sent as a
//! delta from the baseline in one of a few fixed-width buckets, or in full.
//! Every value has a fixed bit width; nothing adapts to the data.
//!
//! Packet layout (bits, least significant first within each byte):
//!
//! ```text
//! mode            1   0: index list, 1: bitmask
//! index list:     count (bits for n), first index (bits for n-1),
//!                 then per further index the gap to the previous one:
//!                 "0" gap 1 | "10"+2 bits 2..=5 | "110"+3 bits 6..=13 |
//!                 "1110"+4 bits 14..=29 | "11110"+5 bits 30..=61 |
//!                 "111110"+6 bits 62..=125 | "111111"+index bits (absolute)
//! bitmask:        n bits, one per cube
//! per changed cube, in index order:
//!   orientation   "0" unchanged, else "1" and then
//!                 "0"    + 3 x 2 bits  same largest, each delta in [-2, 1]
//!                 "10"   + 3 x 3 bits  same largest, each delta in [-4, 3]
//!                 "110"  + 3 x 5 bits  same largest, each delta in [-16, 15]
//!                 "111"  + 2 + 3 x 9   the full smallest-three value
//!   position      "0" unchanged, else "1" and then for x, y and z each:
//!                 "0"    + 1 bit       delta in [-1, 0]
//!                 "10"   + 5 bits      delta in [-16, 15]
//!                 "110"  + 7 bits      delta in [-64, 63]
//!                 "1110" + 8 bits      delta in [-128, 127]
//!                 "1111" + 15 bits (x, y) or 13 bits (z), absolute
//!   interacting   1 bit
//! ```
//!
//! A packet is rounded up to whole bytes. The bucket widths were chosen on a
//! 2,400-frame cubes trace (seed 1, lag 6) by trying every combination of
//! two and three widths and keeping the smallest: an honest baseline is the
//! best that fixed buckets can do, not a strawman. The index gap buckets are
//! the article's.

use std::fmt;

use origin::worlds::cubes::RECORD_RANGES;
pub use origin::worlds::cubes::Record;

/// Bits of one smallest-three component.
pub const ORIENTATION_BITS: u32 = 9;
/// Smallest quantized x or y position (512 units per metre, ±32 m).
pub const POSITION_MIN_XY: i32 = RECORD_RANGES[4].0;
/// Bits of an absolute x or y position.
pub const POSITION_BITS_XY: u32 = 15;
/// Bits of an absolute z position (0 to 16 m).
pub const POSITION_BITS_Z: u32 = 13;
/// Bits of one cube sent in full, without an id: the challenge's
/// "uncompressed quantized" cube (2 + 3 x 9 orientation, 15 + 15 + 13
/// position, 1 interacting).
pub const FULL_BITS_PER_CUBE: usize = 2 + 3 * 9 + 15 + 15 + 13 + 1;

/// Size in bytes of a full quantized snapshot of `cubes` cubes, as the
/// challenge counts it (no ids, no header).
pub fn full_snapshot_bytes(cubes: usize) -> usize {
    (cubes * FULL_BITS_PER_CUBE).div_ceil(8)
}

/// Why a frame could not be coded or a packet decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitpackError {
    /// Baseline and target hold different numbers of cubes.
    CountMismatch {
        /// Cubes in the baseline.
        base: usize,
        /// Cubes in the target.
        target: usize,
    },
    /// A record holds a value outside the challenge's ranges.
    OutOfRange {
        /// Index of the cube.
        cube: usize,
        /// Index of the field in the record.
        field: usize,
        /// The value found.
        value: i32,
    },
    /// The packet ended early.
    Truncated,
    /// The packet names a cube index past the end, or too many cubes.
    BadIndex,
}

impl fmt::Display for BitpackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BitpackError::CountMismatch { base, target } => {
                write!(f, "baseline has {base} cubes, target {target}")
            }
            BitpackError::OutOfRange { cube, field, value } => {
                write!(f, "cube {cube}: field {field} holds {value}, out of range")
            }
            BitpackError::Truncated => write!(f, "packet truncated"),
            BitpackError::BadIndex => write!(f, "packet names a cube past the end"),
        }
    }
}

impl std::error::Error for BitpackError {}

/// Checks that every field of `r` is within the challenge's ranges.
pub fn check_record(cube: usize, r: &Record) -> Result<(), BitpackError> {
    for (field, (&value, (lo, hi))) in r.iter().zip(RECORD_RANGES).enumerate() {
        if value < lo || value > hi {
            return Err(BitpackError::OutOfRange { cube, field, value });
        }
    }
    Ok(())
}

/// Bits needed for values `0..=max`.
fn bits_for(max: usize) -> u32 {
    (usize::BITS - max.leading_zeros()).max(1)
}

struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u64,
    filled: u32,
    bits: usize,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        BitWriter {
            out,
            acc: 0,
            filled: 0,
            bits: 0,
        }
    }

    fn write(&mut self, value: u32, bits: u32) {
        debug_assert!(bits <= 32);
        debug_assert!(bits == 32 || value >> bits == 0);
        self.acc |= (value as u64) << self.filled;
        self.filled += bits;
        self.bits += bits as usize;
        while self.filled >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.filled -= 8;
        }
    }

    fn bit(&mut self, b: bool) {
        self.write(b as u32, 1);
    }

    fn finish(self) -> usize {
        if self.filled > 0 {
            self.out.push(self.acc as u8);
        }
        self.bits
    }
}

struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        BitReader { bytes, pos: 0 }
    }

    fn read(&mut self, bits: u32) -> Result<u32, BitpackError> {
        if self.pos + bits as usize > self.bytes.len() * 8 {
            return Err(BitpackError::Truncated);
        }
        let mut value = 0u32;
        let mut got = 0;
        while got < bits {
            let byte = self.bytes[self.pos / 8];
            let offset = (self.pos % 8) as u32;
            let take = (8 - offset).min(bits - got);
            let chunk = (byte >> offset) as u32 & ((1u32 << take) - 1);
            value |= chunk << got;
            got += take;
            self.pos += take as usize;
        }
        Ok(value)
    }

    fn bit(&mut self) -> Result<bool, BitpackError> {
        Ok(self.read(1)? == 1)
    }
}

/// Gap buckets after the first index: (bits, first gap of the bucket).
const GAP_BUCKETS: [(u32, usize); 6] = [(0, 1), (2, 2), (3, 6), (4, 14), (5, 30), (6, 62)];

fn gap_bits(gap: usize, index_bits: u32) -> usize {
    let mut prefix = 0;
    for (bits, first) in GAP_BUCKETS {
        prefix += 1;
        if gap < first + (1 << bits) {
            return prefix + bits as usize;
        }
    }
    prefix + index_bits as usize
}

fn write_gap(w: &mut BitWriter<'_>, gap: usize, index: usize, index_bits: u32) {
    for (bits, first) in GAP_BUCKETS {
        if gap < first + (1 << bits) {
            w.bit(false);
            w.write((gap - first) as u32, bits);
            return;
        }
        w.bit(true);
    }
    w.write(index as u32, index_bits);
}

fn read_index(
    r: &mut BitReader<'_>,
    previous: usize,
    index_bits: u32,
) -> Result<usize, BitpackError> {
    for (bits, first) in GAP_BUCKETS {
        if !r.bit()? {
            return Ok(previous + first + r.read(bits)? as usize);
        }
    }
    Ok(r.read(index_bits)? as usize)
}

/// A signed delta bucket: `bits` bits per value, values in
/// `[-2^(bits-1), 2^(bits-1) - 1]`.
fn fits(delta: i32, bits: u32) -> bool {
    let half = 1i32 << (bits - 1);
    (-half..half).contains(&delta)
}

fn write_signed(w: &mut BitWriter<'_>, delta: i32, bits: u32) {
    let half = 1i32 << (bits - 1);
    w.write((delta + half) as u32, bits);
}

fn read_signed(r: &mut BitReader<'_>, bits: u32) -> Result<i32, BitpackError> {
    let half = 1i32 << (bits - 1);
    Ok(r.read(bits)? as i32 - half)
}

/// Orientation buckets: bits per component delta, all three components in
/// the same bucket (the largest bucket first that holds all three).
const ORIENTATION_BUCKETS: [u32; 3] = [2, 3, 5];
/// Position buckets: bits of one axis's delta, chosen per axis.
const POSITION_BUCKETS: [u32; 4] = [1, 5, 7, 8];
/// Bits of an absolute position, per axis.
const POSITION_BITS: [u32; 3] = [POSITION_BITS_XY, POSITION_BITS_XY, POSITION_BITS_Z];
/// Offset of an absolute position, per axis (value - min is sent).
const POSITION_MIN: [i32; 3] = [POSITION_MIN_XY, POSITION_MIN_XY, 0];

fn write_cube(w: &mut BitWriter<'_>, base: &Record, cube: &Record) {
    // Orientation: unchanged, a delta bucket, or in full.
    if base[..4] == cube[..4] {
        w.bit(false);
    } else {
        w.bit(true);
        let d = [cube[1] - base[1], cube[2] - base[2], cube[3] - base[3]];
        let bucket = ORIENTATION_BUCKETS
            .iter()
            .position(|&bits| cube[0] == base[0] && d.iter().all(|&d| fits(d, bits)));
        for (k, &bits) in ORIENTATION_BUCKETS.iter().enumerate() {
            if bucket == Some(k) {
                w.bit(false);
                d.iter().for_each(|&d| write_signed(w, d, bits));
                break;
            }
            w.bit(true);
        }
        if bucket.is_none() {
            w.write(cube[0] as u32, 2);
            for &c in &cube[1..4] {
                w.write(c as u32, ORIENTATION_BITS);
            }
        }
    }
    // Position: unchanged, or per axis a delta bucket or the absolute value.
    if base[4..7] == cube[4..7] {
        w.bit(false);
    } else {
        w.bit(true);
        for axis in 0..3 {
            let d = cube[4 + axis] - base[4 + axis];
            let mut sent = false;
            for &bits in &POSITION_BUCKETS {
                if fits(d, bits) {
                    w.bit(false);
                    write_signed(w, d, bits);
                    sent = true;
                    break;
                }
                w.bit(true);
            }
            if !sent {
                let value = cube[4 + axis] - POSITION_MIN[axis];
                w.write(value as u32, POSITION_BITS[axis]);
            }
        }
    }
    w.bit(cube[7] != 0);
}

fn read_cube(r: &mut BitReader<'_>, base: &Record) -> Result<Record, BitpackError> {
    let mut cube = *base;
    if r.bit()? {
        let mut bucket = None;
        for &bits in &ORIENTATION_BUCKETS {
            if !r.bit()? {
                bucket = Some(bits);
                break;
            }
        }
        match bucket {
            Some(bits) => {
                for k in 1..4 {
                    cube[k] = base[k] + read_signed(r, bits)?;
                }
            }
            None => {
                cube[0] = r.read(2)? as i32;
                for c in &mut cube[1..4] {
                    *c = r.read(ORIENTATION_BITS)? as i32;
                }
            }
        }
    }
    if r.bit()? {
        for axis in 0..3 {
            let mut bucket = None;
            for &bits in &POSITION_BUCKETS {
                if !r.bit()? {
                    bucket = Some(bits);
                    break;
                }
            }
            cube[4 + axis] = match bucket {
                Some(bits) => base[4 + axis] + read_signed(r, bits)?,
                None => r.read(POSITION_BITS[axis])? as i32 + POSITION_MIN[axis],
            };
        }
    }
    cube[7] = r.bit()? as i32;
    Ok(cube)
}

/// Encodes `target` against `base` (same number of cubes), appending the
/// packet to `out`. Returns the packet's size in bits before rounding up to
/// bytes.
pub fn encode(
    base: &[Record],
    target: &[Record],
    out: &mut Vec<u8>,
) -> Result<usize, BitpackError> {
    if base.len() != target.len() {
        return Err(BitpackError::CountMismatch {
            base: base.len(),
            target: target.len(),
        });
    }
    for (i, (b, t)) in base.iter().zip(target).enumerate() {
        check_record(i, b)?;
        check_record(i, t)?;
    }
    let n = target.len();
    let index_bits = bits_for(n.saturating_sub(1));
    let count_bits = bits_for(n);
    let changed: Vec<usize> = (0..n).filter(|&i| base[i] != target[i]).collect();

    // Size of the index list, to pick it or the bitmask.
    let mut list_bits = count_bits as usize;
    let mut previous = None;
    for &i in &changed {
        list_bits += match previous {
            None => index_bits as usize,
            Some(p) => gap_bits(i - p, index_bits),
        };
        previous = Some(i);
    }

    let mut w = BitWriter::new(out);
    if list_bits <= n {
        w.bit(false);
        w.write(changed.len() as u32, count_bits);
        let mut previous = None;
        for &i in &changed {
            match previous {
                None => w.write(i as u32, index_bits),
                Some(p) => write_gap(&mut w, i - p, i, index_bits),
            }
            previous = Some(i);
        }
    } else {
        w.bit(true);
        let mut next = changed.iter().peekable();
        for i in 0..n {
            let hit = next.peek() == Some(&&i);
            if hit {
                next.next();
            }
            w.bit(hit);
        }
    }
    for &i in &changed {
        write_cube(&mut w, &base[i], &target[i]);
    }
    Ok(w.finish())
}

/// Decodes a packet made by [`encode`] against the same `base`.
pub fn decode(base: &[Record], bytes: &[u8]) -> Result<Vec<Record>, BitpackError> {
    let n = base.len();
    let index_bits = bits_for(n.saturating_sub(1));
    let count_bits = bits_for(n);
    let mut r = BitReader::new(bytes);
    let mut changed = Vec::new();
    if !r.bit()? {
        let count = r.read(count_bits)? as usize;
        if count > n {
            return Err(BitpackError::BadIndex);
        }
        changed.reserve(count);
        let mut previous = None;
        for _ in 0..count {
            let i = match previous {
                None => r.read(index_bits)? as usize,
                Some(p) => read_index(&mut r, p, index_bits)?,
            };
            if i >= n || previous.is_some_and(|p| i <= p) {
                return Err(BitpackError::BadIndex);
            }
            changed.push(i);
            previous = Some(i);
        }
    } else {
        for i in 0..n {
            if r.bit()? {
                changed.push(i);
            }
        }
    }
    let mut out = base.to_vec();
    for i in changed {
        out[i] = read_cube(&mut r, &base[i])?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so tests need no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn range(&mut self, lo: i32, hi: i32) -> i32 {
            lo + (self.next() % (hi - lo + 1) as u64) as i32
        }
    }

    fn random_cube(rng: &mut Rng) -> Record {
        [
            rng.range(0, 3),
            rng.range(0, 511),
            rng.range(0, 511),
            rng.range(0, 511),
            rng.range(-16384, 16383),
            rng.range(-16384, 16383),
            rng.range(0, 8191),
            rng.range(0, 1),
        ]
    }

    /// Moves a cube by a delta drawn from one of the buckets (or beyond).
    fn nudge(rng: &mut Rng, c: &Record) -> Record {
        let mut out = *c;
        let scale = [1, 8, 64, 300, 5000][rng.range(0, 4) as usize];
        match rng.range(0, 5) {
            0 => out[7] ^= 1,
            1 => {
                for k in 1..4 {
                    out[k] = (c[k] + rng.range(-scale, scale)).clamp(0, 511);
                }
            }
            2 => out[..4].copy_from_slice(&random_cube(rng)[..4]),
            3 => {
                for k in 4..6 {
                    out[k] = (c[k] + rng.range(-scale, scale)).clamp(-16384, 16383);
                }
                out[6] = (c[6] + rng.range(-scale, scale)).clamp(0, 8191);
            }
            _ => out = random_cube(rng),
        }
        out
    }

    fn round_trip(base: &[Record], target: &[Record]) -> usize {
        let mut bytes = Vec::new();
        let bits = encode(base, target, &mut bytes).unwrap();
        assert_eq!(bytes.len(), bits.div_ceil(8));
        assert_eq!(decode(base, &bytes).unwrap(), target);
        bytes.len()
    }

    #[test]
    fn round_trips_synthetic_frames() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for n in [1usize, 2, 17, 901] {
            let base: Vec<Record> = (0..n).map(|_| random_cube(&mut rng)).collect();
            for density in [0u64, 1, 5, 30, 100] {
                for _ in 0..20 {
                    let target: Vec<Record> = base
                        .iter()
                        .map(|c| {
                            if rng.next() % 100 < density {
                                nudge(&mut rng, c)
                            } else {
                                *c
                            }
                        })
                        .collect();
                    round_trip(&base, &target);
                }
            }
        }
    }

    #[test]
    fn extreme_values_and_gaps_round_trip() {
        let lo = [0, 0, 0, 0, -16384, -16384, 0, 0];
        let hi = [3, 511, 511, 511, 16383, 16383, 8191, 1];
        let base = vec![lo; 901];
        // Changed cubes at every gap size, including the first and last cube.
        let mut target = base.clone();
        let mut i = 0;
        let mut gap = 1;
        while i < 901 {
            target[i] = hi;
            i += gap;
            gap += 1;
        }
        target[900] = hi;
        round_trip(&base, &target);
        round_trip(&target, &base);
        // Index list of a single far cube, and a full bitmask.
        let mut one = base.clone();
        one[900][4] += 1;
        assert!(round_trip(&base, &one) <= 5);
        round_trip(&base, &vec![hi; 901]);
    }

    #[test]
    fn sizes_follow_the_buckets() {
        let base = vec![[0, 100, 100, 100, 0, 0, 1000, 0]; 901];
        assert_eq!(round_trip(&base, &base), 2); // mode + 10-bit count
        let mut small = base.clone();
        small[0] = [0, 101, 99, 100, 3, -2, 1000, 0];
        // Mode, count and index: 1 + 10 + 10. Orientation "10" + 3 x 2.
        // Position "1", x "10" + 5, y "10" + 5, z "0" + 1. Interacting 1.
        let mut bytes = Vec::new();
        assert_eq!(encode(&base, &small, &mut bytes).unwrap(), 21 + 8 + 17 + 1);
        let mut full = base.clone();
        full[0] = [1, 0, 0, 0, 0, 0, 1000, 1];
        bytes.clear();
        // Orientation "1111" + 29, position unchanged, interacting.
        assert_eq!(encode(&base, &full, &mut bytes).unwrap(), 21 + 33 + 1 + 1);
        let mut far = base.clone();
        far[5] = [0, 100, 100, 100, 300, -70, 8191, 0];
        bytes.clear();
        // Position "1", x absolute "1111" + 15, y "1110" + 8, z "1111" + 13.
        assert_eq!(
            encode(&base, &far, &mut bytes).unwrap(),
            21 + 1 + 1 + 19 + 12 + 17 + 1
        );
        assert_eq!(decode(&base, &bytes).unwrap(), far);
    }

    #[test]
    fn out_of_range_and_bad_packets_are_refused() {
        let base = vec![[0, 0, 0, 0, 0, 0, 0, 0]; 4];
        let mut bad = base.clone();
        bad[2][6] = -1;
        assert_eq!(
            encode(&base, &bad, &mut Vec::new()),
            Err(BitpackError::OutOfRange {
                cube: 2,
                field: 6,
                value: -1
            })
        );
        assert!(matches!(
            encode(&base, &base[..3], &mut Vec::new()),
            Err(BitpackError::CountMismatch { .. })
        ));
        let mut target = base.clone();
        target[3][7] = 1;
        let mut bytes = Vec::new();
        encode(&base, &target, &mut bytes).unwrap();
        assert_eq!(decode(&base, &bytes[..0]), Err(BitpackError::Truncated));
        // A count above the number of cubes.
        assert_eq!(decode(&base, &[0b1110]), Err(BitpackError::BadIndex));
        // Every short garbage packet either decodes or fails cleanly.
        for a in 0..=255u8 {
            for b in [0u8, 0x55, 0xff] {
                let _ = decode(&base, &[a, b]);
            }
        }
    }
}
