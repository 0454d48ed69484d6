//! Adaptive binary range coder (LZMA style) and the integer codes built on it.
//!
//! Every decision is a binary event coded with an adaptive probability
//! ([`Bit`]); integers are coded as a magnitude class (a small bit tree) and
//! the bits below the leading one, the top ones adaptive and the rest at
//! probability one half. Models start fresh for every delta, so any relay can
//! code any update independently.
//!
//! The decoder reads zeros past the end of its input, as the encoder's
//! shortened flush expects, but stops with an error once it has read more
//! than a few bytes past the end: garbage can never make it run on.

/// Bits of probability precision.
const PROB_BITS: u32 = 12;
const PROB_ONE: u16 = 1 << PROB_BITS;
const TOP: u32 = 1 << 24;
/// Bytes the decoder may read past the end of its input before it fails.
/// The decoder reads exactly as many bytes as the encoder wrote before it
/// trimmed the trailing zeros of its flush, and it trims at most this many.
const MAX_OVERRUN: usize = 5;

/// An adaptive probability that the next bit is 0, in 1/4096 units.
///
/// Models start fresh for every delta and see few symbols, so the estimate
/// follows the counts first (the n-th observation moves it by 1/(n+1.5), as
/// a Krichevsky-Trofimov estimator does) and settles to a fixed rate of
/// 1/LIMIT, which keeps it adaptive to local statistics.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bit {
    p: u16,
    n: u16,
}

/// The rate the estimate settles to is 1/(LIMIT + 1.5).
const LIMIT: u16 = 20;

impl Default for Bit {
    fn default() -> Self {
        Bit {
            p: PROB_ONE / 2,
            n: 0,
        }
    }
}

impl Bit {
    #[inline]
    fn p0(self) -> u32 {
        (self.p as u32).clamp(31, PROB_ONE as u32 - 31)
    }

    #[inline]
    fn update(&mut self, bit: bool) {
        let target: i32 = if bit { 0 } else { PROB_ONE as i32 };
        let p = self.p as i32;
        let step = (target - p) * 2 / (2 * self.n as i32 + 3);
        self.p = (p + step) as u16;
        if self.n < LIMIT {
            self.n += 1;
        }
    }
}

/// Range encoder writing to a byte vector.
pub(crate) struct Encoder<'a> {
    low: u64,
    range: u32,
    cache: u8,
    pending: u64,
    first: bool,
    out: &'a mut Vec<u8>,
}

impl<'a> Encoder<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Encoder {
            low: 0,
            range: u32::MAX,
            cache: 0,
            pending: 1,
            first: true,
            out,
        }
    }

    #[inline]
    fn shift_low(&mut self) {
        if self.low < 0xFF00_0000 || self.low > 0xFFFF_FFFF {
            let carry = (self.low >> 32) as u8;
            let mut byte = self.cache;
            loop {
                // The first byte of an LZMA-style stream is always zero: skip it.
                if self.first {
                    self.first = false;
                } else {
                    self.out.push(byte.wrapping_add(carry));
                }
                byte = 0xFF;
                self.pending -= 1;
                if self.pending == 0 {
                    break;
                }
            }
            self.cache = (self.low >> 24) as u8;
        }
        self.pending += 1;
        self.low = (self.low & 0x00FF_FFFF) << 8;
    }

    #[inline]
    pub(crate) fn bit(&mut self, model: &mut Bit, bit: bool) {
        let bound = (self.range >> PROB_BITS) * model.p0();
        if bit {
            self.low += bound as u64;
            self.range -= bound;
        } else {
            self.range = bound;
        }
        model.update(bit);
        while self.range < TOP {
            self.range <<= 8;
            self.shift_low();
        }
    }

    /// Codes `count` (at most 32) low bits of `value` at probability one half.
    #[inline]
    pub(crate) fn direct(&mut self, value: u32, count: u32) {
        for i in (0..count).rev() {
            self.range >>= 1;
            if (value >> i) & 1 == 1 {
                self.low += self.range as u64;
            }
            while self.range < TOP {
                self.range <<= 8;
                self.shift_low();
            }
        }
    }

    /// Ends the stream with as few bytes as decode needs: picks the value in
    /// `[low, low + range)` with the most trailing zero bytes, which the
    /// decoder's zero padding then supplies.
    pub(crate) fn finish(mut self) {
        let start = self.out.len();
        let high = self.low + self.range as u64 - 1;
        for shift in (0..32).step_by(8).rev() {
            let mask = (1u64 << shift) - 1;
            let candidate = (self.low + mask) & !mask;
            if shift > 0 && candidate <= high {
                self.low = candidate;
                break;
            }
        }
        for _ in 0..5 {
            self.shift_low();
        }
        // Drop the trailing zero bytes of the flush: the decoder reads zeros
        // past the end. (Only flush bytes: earlier zeros stay, which bounds
        // how far a valid stream makes the decoder read past the end.)
        let mut trimmed = 0;
        while trimmed < MAX_OVERRUN && self.out.len() > start && self.out.last() == Some(&0) {
            self.out.pop();
            trimmed += 1;
        }
    }
}

/// Range decoder over a byte slice.
pub(crate) struct Decoder<'a> {
    code: u32,
    range: u32,
    input: &'a [u8],
    pos: usize,
}

/// The input ended long before the decoder did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overrun;

impl<'a> Decoder<'a> {
    pub(crate) fn new(input: &'a [u8]) -> Self {
        let mut d = Decoder {
            code: 0,
            range: u32::MAX,
            input,
            pos: 0,
        };
        for _ in 0..4 {
            d.code = (d.code << 8) | d.next_byte() as u32;
        }
        d
    }

    #[inline]
    fn next_byte(&mut self) -> u8 {
        let b = self.input.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    /// Fails once the decoder has read well past the end of its input.
    #[inline]
    pub(crate) fn check(&self) -> Result<(), Overrun> {
        if self.pos > self.input.len() + MAX_OVERRUN {
            Err(Overrun)
        } else {
            Ok(())
        }
    }

    #[inline]
    pub(crate) fn bit(&mut self, model: &mut Bit) -> bool {
        let bound = (self.range >> PROB_BITS) * model.p0();
        let bit = if self.code < bound {
            self.range = bound;
            false
        } else {
            self.code -= bound;
            self.range -= bound;
            true
        };
        model.update(bit);
        while self.range < TOP {
            self.range <<= 8;
            self.code = (self.code << 8) | self.next_byte() as u32;
        }
        bit
    }

    #[inline]
    pub(crate) fn direct(&mut self, count: u32) -> u32 {
        let mut value = 0u32;
        for _ in 0..count {
            self.range >>= 1;
            let bit = if self.code >= self.range {
                self.code -= self.range;
                1
            } else {
                0
            };
            value = (value << 1) | bit;
            while self.range < TOP {
                self.range <<= 8;
                self.code = (self.code << 8) | self.next_byte() as u32;
            }
        }
        value
    }
}

/// Number of magnitude classes: 0 for zero, k for values in `[2^(k-1), 2^k)`.
pub(crate) const CLASSES: usize = 34;
const CLASS_TREE: usize = 64;
/// How many bits below the leading one are coded adaptively.
const ADAPTIVE_TOP: u32 = 2;

/// Adaptive model for unsigned integers up to 2^33: a bit tree over the
/// magnitude class, then the mantissa, its top bits adaptive per class.
#[derive(Clone, Debug)]
pub(crate) struct UintModel {
    class: [Bit; CLASS_TREE],
    mantissa: [[Bit; 4]; CLASSES],
    /// The codec run this model was last reset for (see [`UintModel::fresh`]).
    epoch: u32,
}

impl Default for UintModel {
    fn default() -> Self {
        UintModel {
            class: [Bit::default(); CLASS_TREE],
            mantissa: [[Bit::default(); 4]; CLASSES],
            epoch: 0,
        }
    }
}

/// Magnitude class of `v`: its bit length.
#[inline]
pub(crate) fn class_of(v: u64) -> u32 {
    64 - v.leading_zeros()
}

impl UintModel {
    /// This model, reset first if it was last used by another codec run.
    /// A codec holds hundreds of these (800 bytes each) and one delta uses
    /// few of them: resetting lazily keeps small deltas cheap.
    #[inline]
    pub(crate) fn fresh(&mut self, epoch: u32) -> &mut UintModel {
        if self.epoch != epoch {
            *self = UintModel {
                epoch,
                ..UintModel::default()
            };
        }
        self
    }

    /// Codes `v` (below 2^33), returning its class.
    #[inline]
    pub(crate) fn encode(&mut self, enc: &mut Encoder<'_>, v: u64) -> u32 {
        let class = class_of(v);
        debug_assert!((class as usize) < CLASSES);
        let mut node = 1usize;
        for i in (0..6).rev() {
            let bit = (class >> i) & 1 == 1;
            enc.bit(&mut self.class[node], bit);
            node = (node << 1) | bit as usize;
        }
        if class > 1 {
            let bits = class - 1;
            let mantissa = v - (1u64 << bits);
            let adaptive = bits.min(ADAPTIVE_TOP);
            let mut node = 1usize;
            for i in 0..adaptive {
                let bit = (mantissa >> (bits - 1 - i)) & 1 == 1;
                enc.bit(&mut self.mantissa[class as usize][node], bit);
                node = (node << 1) | bit as usize;
            }
            let rest = bits - adaptive;
            if rest > 0 {
                let low = mantissa & ((1u64 << rest) - 1);
                if rest > 32 {
                    enc.direct((low >> 32) as u32, rest - 32);
                    enc.direct(low as u32, 32);
                } else {
                    enc.direct(low as u32, rest);
                }
            }
        }
        class
    }

    /// Decodes a value; `None` if the class is out of range (corrupt input).
    #[inline]
    pub(crate) fn decode(&mut self, dec: &mut Decoder<'_>) -> Option<(u64, u32)> {
        let mut node = 1usize;
        for _ in 0..6 {
            let bit = dec.bit(&mut self.class[node]);
            node = (node << 1) | bit as usize;
        }
        let class = (node - CLASS_TREE) as u32;
        if class as usize >= CLASSES {
            return None;
        }
        if class <= 1 {
            return Some((class as u64, class));
        }
        let bits = class - 1;
        let adaptive = bits.min(ADAPTIVE_TOP);
        let mut node = 1usize;
        let mut mantissa = 0u64;
        for _ in 0..adaptive {
            let bit = dec.bit(&mut self.mantissa[class as usize][node]);
            node = (node << 1) | bit as usize;
            mantissa = (mantissa << 1) | bit as u64;
        }
        let rest = bits - adaptive;
        if rest > 32 {
            mantissa = (mantissa << (rest - 32)) | dec.direct(rest - 32) as u64;
            mantissa = (mantissa << 32) | dec.direct(32) as u64;
        } else if rest > 0 {
            mantissa = (mantissa << rest) | dec.direct(rest) as u64;
        }
        Some(((1u64 << bits) + mantissa, class))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_integers_round_trip() {
        let values: Vec<u64> = (0..2000u64)
            .map(|i| (i * 2654435761) % (1 << (i % 34)))
            .chain([0, 1, 2, 3, u32::MAX as u64, (1 << 33) - 1])
            .collect();
        let mut out = Vec::new();
        let mut enc = Encoder::new(&mut out);
        let mut flag = Bit::default();
        let mut model = UintModel::default();
        for (i, &v) in values.iter().enumerate() {
            enc.bit(&mut flag, i % 3 == 0);
            model.encode(&mut enc, v);
            enc.direct(i as u32 & 0x1F, 5);
        }
        enc.finish();
        let mut dec = Decoder::new(&out);
        let mut flag = Bit::default();
        let mut model = UintModel::default();
        for (i, &v) in values.iter().enumerate() {
            assert_eq!(dec.bit(&mut flag), i % 3 == 0);
            assert_eq!(model.decode(&mut dec).unwrap().0, v, "value {i}");
            assert_eq!(dec.direct(5), i as u32 & 0x1F);
        }
        assert!(dec.check().is_ok());
    }

    #[test]
    fn skewed_bits_compress() {
        let mut out = Vec::new();
        let mut enc = Encoder::new(&mut out);
        let mut m = Bit::default();
        for i in 0..10_000 {
            enc.bit(&mut m, i % 100 == 0);
        }
        enc.finish();
        // 10,000 bits at p = 0.01 carry about 808 bits of information.
        assert!(out.len() < 160, "{} bytes", out.len());
    }

    #[test]
    fn empty_stream_is_empty_and_decoding_garbage_overruns() {
        let mut out = Vec::new();
        Encoder::new(&mut out).finish();
        assert!(out.is_empty());
        // 64 even bits need 8 bytes: far past a 1-byte input.
        let mut dec = Decoder::new(&[0xFF]);
        for _ in 0..8 {
            dec.direct(8);
        }
        assert!(dec.check().is_err());
        let mut dec = Decoder::new(&[0xFF; 16]);
        for _ in 0..8 {
            dec.direct(8);
        }
        assert!(dec.check().is_ok());
    }
}
