//! The codec measured on a trace, as `statecast trace bench` reports it.
//!
//! For every frame `i >= lag`, frame `i` is coded against frame `i - lag`
//! (the baseline a client acknowledged `lag` ticks ago), with a prediction
//! from frame `i - 2 lag` when there is one, then decoded and compared with
//! the original, bit for bit and by state hash. Beside it, from the same run:
//! the same codec without prediction, the full quantized snapshot, and for
//! cubes traces the plain bit-packed baseline of [`crate::bitpack`].

use crate::bitpack;
use crate::trace::Trace;
use proto::{Layout, Prediction, Snapshot};
use serde::Serialize;
use std::time::Instant;

/// Size in bits of `snapshot` sent whole: for the cubes world the challenge's
/// "uncompressed quantized" count (73 bits per cube, no ids, see
/// [`bitpack::FULL_BITS_PER_CUBE`]), for other worlds
/// [`Snapshot::packed_bits`] (ids, lanes at their declared widths, blobs).
pub fn full_bits(layout: &Layout, snapshot: &Snapshot) -> usize {
    if layout.schema().name == "cubes" && *layout.schema() == origin::worlds::cubes::schema() {
        snapshot.len() * bitpack::FULL_BITS_PER_CUBE
    } else {
        snapshot.packed_bits(layout)
    }
}

/// Result of one run over a trace.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// World name (from the schema).
    pub world: String,
    /// Trace format (`cubes` or `sctrace1`).
    pub format: String,
    /// Frames in the trace.
    pub frames: usize,
    /// Entities in the last frame.
    pub entities: usize,
    /// Ticks between baseline and target.
    pub lag: usize,
    /// Packets per second assumed for kbps.
    pub hz: f64,
    /// Packets coded (frames - lag).
    pub packets: usize,
    /// Mean packet size with prediction, in bytes.
    pub bytes_per_packet: f64,
    /// Largest packet with prediction, in bytes.
    pub max_bytes_per_packet: usize,
    /// Bandwidth at `hz` packets per second, in kilobits per second.
    pub kbps: f64,
    /// Mean encode time per packet, in microseconds.
    pub encode_us: f64,
    /// Mean decode time per packet, in microseconds.
    pub decode_us: f64,
    /// 99th percentile of encode plus decode time per packet, in microseconds.
    pub encode_decode_us_p99: f64,
    /// Whether every packet (with and without prediction) decoded exactly.
    pub exact: bool,
    /// Packets that did not decode exactly (both variants counted).
    pub mismatches: usize,
    /// The first decode failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_mismatch: Option<String>,
    /// Mean packet size without prediction, in bytes.
    pub bytes_per_packet_no_prediction: f64,
    /// Bandwidth without prediction, in kilobits per second.
    pub kbps_no_prediction: f64,
    /// Mean encode time without prediction, in microseconds.
    pub encode_us_no_prediction: f64,
    /// Mean decode time without prediction, in microseconds.
    pub decode_us_no_prediction: f64,
    /// Mean size of a full quantized target snapshot, in bytes. For cubes,
    /// the challenge's "uncompressed quantized" size (73 bits per cube, no
    /// ids); otherwise `Snapshot::packed_bits`.
    pub full_bytes_per_packet: f64,
    /// Bandwidth of full snapshots, in kilobits per second.
    pub full_kbps: f64,
    /// Mean size of the bit-packed baseline, in bytes (cubes traces only).
    pub bitpack_bytes_per_packet: Option<f64>,
    /// Bandwidth of the bit-packed baseline, in kilobits per second.
    pub bitpack_kbps: Option<f64>,
    /// Mean encode time of the bit-packed baseline, in microseconds.
    pub bitpack_encode_us: Option<f64>,
    /// Mean decode time of the bit-packed baseline, in microseconds.
    pub bitpack_decode_us: Option<f64>,
    /// Whether every bit-packed packet decoded exactly.
    pub bitpack_exact: Option<bool>,
    /// `bytes_per_packet / bitpack_bytes_per_packet`.
    pub ratio_vs_bitpack: Option<f64>,
    /// `bytes_per_packet_no_prediction / bitpack_bytes_per_packet`.
    pub ratio_no_prediction_vs_bitpack: Option<f64>,
    /// `bytes_per_packet / full_bytes_per_packet`.
    pub ratio_vs_full: f64,
}

/// Why a trace cannot be measured.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The lag is zero.
    #[error("the lag must be at least 1 tick")]
    ZeroLag,
    /// Too few frames for even one packet.
    #[error("the trace holds {frames} frames; a lag of {lag} needs at least {}", lag + 1)]
    TooShort {
        /// Frames in the trace.
        frames: usize,
        /// Lag asked for.
        lag: usize,
    },
    /// The bit-packed baseline refused a frame (values out of range).
    #[error("bit-packed baseline, packet {packet}: {source}")]
    Bitpack {
        /// Index of the target frame.
        packet: usize,
        /// What went wrong.
        source: bitpack::BitpackError,
    },
}

#[derive(Default)]
struct Tally {
    bytes: usize,
    max_bytes: usize,
    encode_ns: u128,
    decode_ns: u128,
    bad: usize,
    first_bad: Option<String>,
}

/// Codes one packet, decodes it, and checks the result.
fn code_one(
    trace: &Trace,
    base: &Snapshot,
    prediction: Option<Prediction<'_>>,
    target: &Snapshot,
    packet: usize,
    scratch: &mut Vec<u8>,
    tally: &mut Tally,
) -> u128 {
    let layout = &trace.layout;
    scratch.clear();
    let t0 = Instant::now();
    proto::delta::encode(layout, base, prediction, target, scratch);
    let t1 = Instant::now();
    let decoded = proto::delta::decode(layout, base, prediction, scratch);
    let t2 = Instant::now();
    tally.bytes += scratch.len();
    tally.max_bytes = tally.max_bytes.max(scratch.len());
    tally.encode_ns += (t1 - t0).as_nanos();
    tally.decode_ns += (t2 - t1).as_nanos();
    let problem = match decoded {
        Ok(d) if d == *target && d.hash() == target.hash() => None,
        Ok(d) => Some(format!(
            "packet {packet}: decoded hash {} differs from target {}",
            d.hash(),
            target.hash()
        )),
        Err(e) => Some(format!("packet {packet}: decode failed: {e}")),
    };
    if let Some(p) = problem {
        tally.bad += 1;
        tally.first_bad.get_or_insert(p);
    }
    (t2 - t0).as_nanos()
}

/// Runs the codec over every packet of `trace` and reports. `progress` is
/// called with the number of packets done after each one.
pub fn run(
    trace: &Trace,
    lag: usize,
    hz: f64,
    mut progress: impl FnMut(usize),
) -> Result<Report, MeasureError> {
    if lag == 0 {
        return Err(MeasureError::ZeroLag);
    }
    let frames = &trace.frames;
    if frames.len() <= lag {
        return Err(MeasureError::TooShort {
            frames: frames.len(),
            lag,
        });
    }
    let packets = frames.len() - lag;
    let span = u32::try_from(lag).unwrap_or(u32::MAX);
    let mut scratch = Vec::new();
    let mut predicted = Tally::default();
    let mut plain = Tally::default();
    let mut totals = Vec::with_capacity(packets);
    let mut full_total = 0usize;
    let mut bitpack = trace.records.as_ref().map(|_| Tally::default());

    for i in lag..frames.len() {
        let base = &frames[i - lag];
        let target = &frames[i];
        let prediction = (i >= 2 * lag).then(|| Prediction {
            prev: &frames[i - 2 * lag],
            span,
            ahead: span,
        });
        let ns = code_one(
            trace,
            base,
            prediction,
            target,
            i,
            &mut scratch,
            &mut predicted,
        );
        totals.push(ns);
        code_one(trace, base, None, target, i, &mut scratch, &mut plain);

        if let (Some(records), Some(tally)) = (&trace.records, bitpack.as_mut()) {
            let (base, target) = (&records[i - lag], &records[i]);
            scratch.clear();
            let t0 = Instant::now();
            bitpack::encode(base, target, &mut scratch)
                .map_err(|source| MeasureError::Bitpack { packet: i, source })?;
            let t1 = Instant::now();
            let decoded = bitpack::decode(base, &scratch);
            let t2 = Instant::now();
            tally.bytes += scratch.len();
            tally.max_bytes = tally.max_bytes.max(scratch.len());
            tally.encode_ns += (t1 - t0).as_nanos();
            tally.decode_ns += (t2 - t1).as_nanos();
            if decoded.as_deref() != Ok(target.as_slice()) {
                tally.bad += 1;
            }
        }
        full_total += full_bits(&trace.layout, target).div_ceil(8);
        progress(i + 1 - lag);
    }

    let n = packets;
    let per = |bytes: usize| bytes as f64 / n as f64;
    let kbps = |bytes_per_packet: f64| bytes_per_packet * 8.0 * hz / 1000.0;
    let us = |ns: u128| ns as f64 / 1000.0 / n as f64;
    totals.sort_unstable();
    let p99 = totals[((n * 99).div_ceil(100)).saturating_sub(1).min(n - 1)] as f64 / 1000.0;

    let bytes_per_packet = per(predicted.bytes);
    let full = per(full_total);
    let no_prediction = per(plain.bytes);
    let bitpack_bytes = bitpack.as_ref().map(|t| per(t.bytes));
    Ok(Report {
        world: trace.world().to_string(),
        format: trace.format.name().to_string(),
        frames: frames.len(),
        entities: frames.last().map_or(0, Snapshot::len),
        lag,
        hz,
        packets: n,
        bytes_per_packet,
        max_bytes_per_packet: predicted.max_bytes,
        kbps: kbps(bytes_per_packet),
        encode_us: us(predicted.encode_ns),
        decode_us: us(predicted.decode_ns),
        encode_decode_us_p99: p99,
        exact: predicted.bad == 0 && plain.bad == 0,
        mismatches: predicted.bad + plain.bad,
        first_mismatch: predicted.first_bad.or(plain.first_bad),
        bytes_per_packet_no_prediction: no_prediction,
        kbps_no_prediction: kbps(no_prediction),
        encode_us_no_prediction: us(plain.encode_ns),
        decode_us_no_prediction: us(plain.decode_ns),
        full_bytes_per_packet: full,
        full_kbps: kbps(full),
        bitpack_bytes_per_packet: bitpack_bytes,
        bitpack_kbps: bitpack_bytes.map(kbps),
        bitpack_encode_us: bitpack.as_ref().map(|t| us(t.encode_ns)),
        bitpack_decode_us: bitpack.as_ref().map(|t| us(t.decode_ns)),
        bitpack_exact: bitpack.as_ref().map(|t| t.bad == 0),
        ratio_vs_bitpack: bitpack_bytes.map(|b| bytes_per_packet / b),
        ratio_no_prediction_vs_bitpack: bitpack_bytes.map(|b| no_prediction / b),
        ratio_vs_full: bytes_per_packet / full,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use origin::worlds::cubes;

    fn cubes_trace(ticks: usize) -> Trace {
        let mut sim = cubes::Cubes::new(5);
        let layout = cubes::schema().layout().unwrap();
        let frames = crate::record(&mut sim, &layout, ticks);
        let records = frames.iter().map(cubes::to_records).collect();
        Trace::from_cubes_records(records).unwrap()
    }

    #[test]
    fn every_packet_is_coded_checked_and_counted() {
        let trace = cubes_trace(40);
        let mut seen = Vec::new();
        let r = run(&trace, 6, 60.0, |done| seen.push(done)).unwrap();
        assert_eq!(seen, (1..=34).collect::<Vec<_>>());
        assert_eq!(r.packets, 34);
        assert!(r.exact && r.mismatches == 0 && r.first_mismatch.is_none());
        assert_eq!(r.bitpack_exact, Some(true));
        assert_eq!(r.full_bytes_per_packet, 8222.0);
        assert!(r.bytes_per_packet > 0.0 && r.bytes_per_packet < r.full_bytes_per_packet);
        assert!(r.max_bytes_per_packet as f64 >= r.bytes_per_packet);
        let bitpack = r.bitpack_bytes_per_packet.unwrap();
        assert_eq!(r.ratio_vs_bitpack, Some(r.bytes_per_packet / bitpack));
        assert!((r.kbps - r.bytes_per_packet * 0.48).abs() < 1e-9);
    }

    #[test]
    fn a_trace_too_short_for_the_lag_is_refused() {
        let trace = cubes_trace(6);
        assert!(matches!(
            run(&trace, 6, 60.0, |_| {}),
            Err(MeasureError::TooShort { frames: 6, lag: 6 })
        ));
        assert!(matches!(
            run(&trace, 0, 60.0, |_| {}),
            Err(MeasureError::ZeroLag)
        ));
        assert_eq!(run(&trace, 5, 60.0, |_| {}).unwrap().packets, 1);
    }

    #[test]
    fn records_the_baseline_cannot_code_name_their_packet() {
        // Records outside the challenge's ranges (which the snapshots of a
        // loaded trace can never hold) stop the run with the packet named.
        let mut trace = cubes_trace(8);
        let records = trace.records.as_mut().unwrap();
        records[7][0][7] = 2; // interacting out of range
        let err = run(&trace, 6, 60.0, |_| {}).unwrap_err();
        assert!(
            matches!(err, MeasureError::Bitpack { packet: 7, .. }),
            "{err}"
        );
    }
}
