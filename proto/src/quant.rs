//! Quantization of floats and rotations to the integer lanes of a snapshot.
//!
//! Quantization happens once, at the origin; everything downstream works on
//! integers, so every node holds the same bits for the same tick.

/// Largest absolute value of a smallest-three component.
pub const QUAT_RANGE: f64 = std::f64::consts::FRAC_1_SQRT_2;

fn levels(bits: u8) -> f64 {
    if bits >= 32 {
        u32::MAX as f64
    } else {
        ((1u64 << bits) - 1) as f64
    }
}

/// Quantizes `value` uniformly over `[min, max]` to `bits` bits, rounding to
/// the nearest step and clamping out-of-range values (NaN maps to `min`).
pub fn quantize(value: f64, min: f64, max: f64, bits: u8) -> u32 {
    let top = levels(bits);
    let t = (value - min) / (max - min) * top;
    if t.is_nan() || t <= 0.0 {
        0
    } else if t >= top {
        top as u32
    } else {
        t.round() as u32
    }
}

/// The float a quantized value stands for.
pub fn dequantize(q: u32, min: f64, max: f64, bits: u8) -> f64 {
    min + (q as f64) / levels(bits) * (max - min)
}

/// Quantizes a rotation `[x, y, z, w]` (any length, not all zero) to the
/// smallest-three form: `[largest, a, b, c]`, where `largest` is the index of
/// the component with the largest magnitude (dropped, made positive) and
/// `a, b, c` are the other three in index order, each on `bits` bits over
/// `[-1/sqrt(2), 1/sqrt(2)]`.
pub fn quantize_quat(q: [f64; 4], bits: u8) -> [u32; 4] {
    let norm = q.iter().map(|c| c * c).sum::<f64>().sqrt();
    let q = if norm > 0.0 && norm.is_finite() {
        q.map(|c| c / norm)
    } else {
        [0.0, 0.0, 0.0, 1.0]
    };
    let mut largest = 0;
    for i in 1..4 {
        if q[i].abs() > q[largest].abs() {
            largest = i;
        }
    }
    let sign = if q[largest] < 0.0 { -1.0 } else { 1.0 };
    let mut out = [largest as u32, 0, 0, 0];
    let mut k = 1;
    for (i, c) in q.iter().enumerate() {
        if i != largest {
            out[k] = quantize(c * sign, -QUAT_RANGE, QUAT_RANGE, bits);
            k += 1;
        }
    }
    out
}

/// The unit rotation `[x, y, z, w]` a smallest-three value stands for.
pub fn dequantize_quat(q: [u32; 4], bits: u8) -> [f64; 4] {
    let largest = (q[0] & 3) as usize;
    let small: [f64; 3] = [1, 2, 3].map(|i| dequantize(q[i], -QUAT_RANGE, QUAT_RANGE, bits));
    let rest = 1.0 - small.iter().map(|c| c * c).sum::<f64>();
    let mut out = [0.0; 4];
    let mut k = 0;
    for (i, slot) in out.iter_mut().enumerate() {
        if i == largest {
            *slot = rest.max(0.0).sqrt();
        } else {
            *slot = small[k];
            k += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_round_trip_within_half_a_step() {
        for bits in [1u8, 8, 12, 20, 32] {
            let step = 200.0 / levels(bits);
            for i in 0..=1000 {
                let v = -100.0 + i as f64 * 0.2;
                let back = dequantize(quantize(v, -100.0, 100.0, bits), -100.0, 100.0, bits);
                assert!((back - v).abs() <= step / 2.0 + 1e-9, "{bits} {v} {back}");
            }
        }
        assert_eq!(quantize(f64::NAN, 0.0, 1.0, 8), 0);
        assert_eq!(quantize(5.0, 0.0, 1.0, 8), 255);
        assert_eq!(quantize(-5.0, 0.0, 1.0, 8), 0);
    }

    #[test]
    fn quaternions_round_trip_up_to_sign() {
        let samples = [
            [0.0, 0.0, 0.0, 1.0],
            [0.5, 0.5, 0.5, 0.5],
            [0.1, -0.7, 0.2, -0.3],
            [-0.9, 0.1, 0.3, 0.05],
        ];
        for q in samples {
            let n = q.iter().map(|c: &f64| c * c).sum::<f64>().sqrt();
            let q = q.map(|c| c / n);
            let back = dequantize_quat(quantize_quat(q, 12), 12);
            let dot: f64 = q.iter().zip(back).map(|(a, b)| a * b).sum();
            assert!(dot.abs() > 0.9999, "{q:?} -> {back:?}");
        }
    }
}
