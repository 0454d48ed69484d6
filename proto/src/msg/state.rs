//! State down, inputs up: update, ack, input, input batch.

use bytes::{Buf, BufMut, Bytes};

use super::{
    Body, MAX_BATCH_INPUTS, MAX_CHUNK_LEN, MAX_CHUNKS, MAX_INPUT_LEN, MAX_INPUT_REDUNDANCY,
    MessageType,
};
use crate::wire::{
    DecodeError, EncodeError, bytes_len, check_len, check_varint, get, get_bytes, get_count,
    get_varint, get_varint_u32, put_bytes, put_varint, varint_len,
};

/// A spatial cell of a world's interest grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellId {
    /// Column.
    pub x: i32,
    /// Row.
    pub y: i32,
}

impl CellId {
    /// The single cell of a world without cells (no position, or interest
    /// management off). One byte on the wire.
    pub const WORLD: CellId = CellId {
        x: i32::MIN,
        y: i32::MIN,
    };

    /// Wire form: `0` for [`CellId::WORLD`], otherwise
    /// `varint(zigzag(x) + 1) | varint(zigzag(y))`.
    pub(super) fn encoded_len(self) -> usize {
        if self == CellId::WORLD {
            1
        } else {
            varint_len(zigzag(self.x) + 1) + varint_len(zigzag(self.y))
        }
    }

    pub(super) fn encode<B: BufMut>(self, out: &mut B) {
        if self == CellId::WORLD {
            put_varint(out, 0);
        } else {
            put_varint(out, zigzag(self.x) + 1);
            put_varint(out, zigzag(self.y));
        }
    }

    pub(super) fn decode<B: Buf>(buf: &mut B) -> Result<CellId, DecodeError> {
        let x = get_varint(buf)?;
        if x == 0 {
            return Ok(CellId::WORLD);
        }
        let x = unzigzag(x - 1)?;
        let y = unzigzag(get_varint(buf)?)?;
        Ok(CellId { x, y })
    }
}

fn zigzag(v: i32) -> u64 {
    u64::from(((v << 1) ^ (v >> 31)) as u32)
}

fn unzigzag(v: u64) -> Result<i32, DecodeError> {
    let v = u32::try_from(v).map_err(|_| DecodeError::BadValue {
        what: "cell coordinate",
    })?;
    Ok(((v >> 1) as i32) ^ -((v & 1) as i32))
}

/// A client's area of interest: the cells within `radius` of `(x, y)`, in
/// the world's position units.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Area {
    /// Centre x.
    pub x: f32,
    /// Centre y.
    pub y: f32,
    /// Radius, at least 0.
    pub radius: f32,
}

impl Area {
    /// Bytes on the wire.
    pub(super) const LEN: usize = 12;

    pub(super) fn check(&self) -> Result<(), EncodeError> {
        if !(self.x.is_finite() && self.y.is_finite() && self.radius.is_finite())
            || self.radius < 0.0
        {
            return Err(EncodeError::BadValue {
                what: "interest area (finite centre, radius >= 0)",
            });
        }
        Ok(())
    }

    pub(super) fn encode<B: BufMut>(&self, out: &mut B) {
        out.put_f32(self.x);
        out.put_f32(self.y);
        out.put_f32(self.radius);
    }

    pub(super) fn decode<B: Buf>(buf: &mut B) -> Result<Area, DecodeError> {
        if buf.remaining() < Self::LEN {
            return Err(DecodeError::Incomplete);
        }
        let area = Area {
            x: buf.get_f32(),
            y: buf.get_f32(),
            radius: buf.get_f32(),
        };
        if area.check().is_err() {
            return Err(DecodeError::BadValue {
                what: "interest area (finite centre, radius >= 0)",
            });
        }
        Ok(area)
    }

    /// Encodes an optional area: a flag byte, then the area.
    pub(super) fn encode_opt<B: BufMut>(area: Option<&Area>, out: &mut B) {
        match area {
            None => out.put_u8(0),
            Some(a) => {
                out.put_u8(1);
                a.encode(out);
            }
        }
    }

    pub(super) fn decode_opt<B: Buf>(buf: &mut B) -> Result<Option<Area>, DecodeError> {
        if crate::wire::get_flag(buf, "interest flag")? {
            Ok(Some(Area::decode(buf)?))
        } else {
            Ok(None)
        }
    }
}

/// Client → relay, on the control stream: from the next update on, send the
/// cells of this area (`None`: the whole world).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interest {
    /// The new area.
    pub area: Option<Area>,
}

impl Body for Interest {
    const TYPE: MessageType = MessageType::Interest;

    fn check(&self) -> Result<(), EncodeError> {
        self.area.as_ref().map_or(Ok(()), Area::check)
    }

    fn body_len(&self) -> usize {
        1 + self.area.map_or(0, |_| Area::LEN)
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        Area::encode_opt(self.area.as_ref(), out);
    }

    fn decode_body<B: Buf>(buf: &mut B, _version: u32) -> Result<Interest, DecodeError> {
        Ok(Interest {
            area: Area::decode_opt(buf)?,
        })
    }
}

/// The delta of one cell in an [`Update`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The cell ([`CellId::WORLD`] in worlds without cells).
    pub cell: CellId,
    /// The delta bytes ([`crate::delta`]), from the update's baseline.
    pub data: Bytes,
}

/// Smallest encoding of a chunk: WORLD cell, empty data.
const MIN_CHUNK_LEN: usize = 1 + 1;

/// Origin → relay → client: the world (or the cells a client holds) at one
/// tick, as deltas from a baseline the receiver holds.
///
/// Updates are never resent: the next one supersedes a lost one. The chunks
/// of one update are for distinct cells; checking that is the session's
/// business, not the decoder's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// The tick this update brings the receiver to.
    pub tick: u64,
    /// The baseline tick the chunks are coded against (before `tick`);
    /// `None` for a keyframe, coded against the empty state.
    pub base: Option<u64>,
    /// The older tick the codec predicted from (before `base`), if any.
    pub predict_from: Option<u64>,
    /// Origin wall clock when the tick was made, in microseconds since the
    /// UNIX epoch (for end-to-end latency).
    pub origin_time_us: u64,
    /// State hash of everything the receiver holds once the update is
    /// applied: the sum of the hashes of its cells, carried ones included.
    pub hash: u64,
    /// One chunk per cell, at most [`MAX_CHUNKS`](super::MAX_CHUNKS).
    pub chunks: Vec<Chunk>,
    /// Cells the receiver held at the baseline and no longer holds (out of
    /// its interest), at most [`MAX_CHUNKS`](super::MAX_CHUNKS). Cells
    /// neither chunked nor dropped are carried from the baseline unchanged.
    pub dropped: Vec<CellId>,
}

impl Update {
    /// Gap from `tick` back to the baseline, 0 for a keyframe.
    fn base_gap(&self) -> u64 {
        self.base.map_or(0, |base| self.tick.wrapping_sub(base))
    }

    /// Gap from the baseline back to the prediction source, 0 for none.
    fn predict_gap(&self) -> u64 {
        match (self.base, self.predict_from) {
            (Some(base), Some(from)) => base.wrapping_sub(from),
            _ => 0,
        }
    }
}

impl Body for Update {
    const TYPE: MessageType = MessageType::Update;

    fn check(&self) -> Result<(), EncodeError> {
        check_varint("update tick", self.tick)?;
        match (self.base, self.predict_from) {
            (Some(base), _) if base >= self.tick => {
                return Err(EncodeError::BadValue {
                    what: "update baseline (must be before the tick)",
                });
            }
            (Some(base), Some(from)) if from >= base => {
                return Err(EncodeError::BadValue {
                    what: "update prediction source (must be before the baseline)",
                });
            }
            (None, Some(_)) => {
                return Err(EncodeError::BadValue {
                    what: "update prediction source (a keyframe has none)",
                });
            }
            _ => {}
        }
        check_len("update chunks", self.chunks.len(), MAX_CHUNKS)?;
        for chunk in &self.chunks {
            check_len("chunk", chunk.data.len(), MAX_CHUNK_LEN)?;
        }
        check_len("update dropped cells", self.dropped.len(), MAX_CHUNKS)?;
        Ok(())
    }

    fn body_len(&self) -> usize {
        varint_len(self.tick)
            + varint_len(self.base_gap())
            + varint_len(self.predict_gap())
            + 8
            + 8
            + varint_len(self.chunks.len() as u64)
            + self
                .chunks
                .iter()
                .map(|c| c.cell.encoded_len() + bytes_len(c.data.len()))
                .sum::<usize>()
            + varint_len(self.dropped.len() as u64)
            + self.dropped.iter().map(|c| c.encoded_len()).sum::<usize>()
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        put_varint(out, self.tick);
        put_varint(out, self.base_gap());
        put_varint(out, self.predict_gap());
        out.put_u64(self.origin_time_us);
        out.put_u64(self.hash);
        put_varint(out, self.chunks.len() as u64);
        for chunk in &self.chunks {
            chunk.cell.encode(out);
            put_bytes(out, &chunk.data);
        }
        put_varint(out, self.dropped.len() as u64);
        for cell in &self.dropped {
            cell.encode(out);
        }
    }

    fn decode_body<B: Buf>(buf: &mut B, _version: u32) -> Result<Update, DecodeError> {
        let tick = get_varint(buf)?;
        let base = match get_varint(buf)? {
            0 => None,
            gap => Some(tick.checked_sub(gap).ok_or(DecodeError::BadValue {
                what: "update baseline (before tick 0)",
            })?),
        };
        let predict_from = match (get_varint(buf)?, base) {
            (0, _) => None,
            (_, None) => {
                return Err(DecodeError::BadValue {
                    what: "update prediction source (a keyframe has none)",
                });
            }
            (gap, Some(base)) => Some(base.checked_sub(gap).ok_or(DecodeError::BadValue {
                what: "update prediction source (before tick 0)",
            })?),
        };
        let origin_time_us = get(buf)?;
        let hash = get(buf)?;
        let count = get_count(buf, MAX_CHUNKS, MIN_CHUNK_LEN, "update chunks")?;
        let mut chunks = Vec::with_capacity(count);
        for _ in 0..count {
            let cell = CellId::decode(buf)?;
            let data = get_bytes(buf, MAX_CHUNK_LEN, "chunk")?;
            chunks.push(Chunk { cell, data });
        }
        let count = get_count(buf, MAX_CHUNKS, 1, "update dropped cells")?;
        let mut dropped = Vec::with_capacity(count);
        for _ in 0..count {
            dropped.push(CellId::decode(buf)?);
        }
        Ok(Update {
            tick,
            base,
            predict_from,
            origin_time_us,
            hash,
            chunks,
            dropped,
        })
    }
}

/// Client → relay: the newest tick the client applied (and so holds as a
/// baseline). Latest wins; a lost ack is superseded by the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ack {
    /// Newest applied tick.
    pub tick: u64,
}

impl Body for Ack {
    const TYPE: MessageType = MessageType::Ack;

    fn check(&self) -> Result<(), EncodeError> {
        check_varint("ack tick", self.tick)
    }

    fn body_len(&self) -> usize {
        varint_len(self.tick)
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        put_varint(out, self.tick);
    }

    fn decode_body<B: Buf>(buf: &mut B, _version: u32) -> Result<Ack, DecodeError> {
        Ok(Ack {
            tick: get_varint(buf)?,
        })
    }
}

/// Client → relay: the client's newest input, with a few older ones repeated
/// so that a lost datagram loses nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Sequence number of `inputs[0]`; `inputs[i]` is input
    /// `seq.wrapping_sub(i)`.
    pub seq: u32,
    /// Newest first: 1 to [`MAX_INPUT_REDUNDANCY`](super::MAX_INPUT_REDUNDANCY)
    /// inputs of at most [`MAX_INPUT_LEN`](super::MAX_INPUT_LEN) bytes each.
    pub inputs: Vec<Bytes>,
}

impl Body for Input {
    const TYPE: MessageType = MessageType::Input;

    fn check(&self) -> Result<(), EncodeError> {
        if self.inputs.is_empty() {
            return Err(EncodeError::BadValue {
                what: "input (holds no input)",
            });
        }
        check_len("inputs", self.inputs.len(), MAX_INPUT_REDUNDANCY)?;
        for input in &self.inputs {
            check_len("input", input.len(), MAX_INPUT_LEN)?;
        }
        Ok(())
    }

    fn body_len(&self) -> usize {
        varint_len(self.seq.into())
            + varint_len(self.inputs.len() as u64)
            + self
                .inputs
                .iter()
                .map(|i| bytes_len(i.len()))
                .sum::<usize>()
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        put_varint(out, self.seq.into());
        put_varint(out, self.inputs.len() as u64);
        for input in &self.inputs {
            put_bytes(out, input);
        }
    }

    fn decode_body<B: Buf>(buf: &mut B, _version: u32) -> Result<Input, DecodeError> {
        let seq = get_varint_u32(buf, "input sequence number")?;
        let count = get_count(buf, MAX_INPUT_REDUNDANCY, 1, "inputs")?;
        if count == 0 {
            return Err(DecodeError::BadValue {
                what: "input (holds no input)",
            });
        }
        let mut inputs = Vec::with_capacity(count);
        for _ in 0..count {
            inputs.push(get_bytes(buf, MAX_INPUT_LEN, "input")?);
        }
        Ok(Input { seq, inputs })
    }
}

/// One client's input inside an [`InputBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInput {
    /// The session the input belongs to (the origin applies it to the
    /// entity that session owns).
    pub session: u64,
    /// The input's sequence number.
    pub seq: u32,
    /// The input, at most [`MAX_INPUT_LEN`](super::MAX_INPUT_LEN) bytes.
    pub data: Bytes,
}

/// Smallest encoding of a session input: session, 1-byte seq, empty data.
const MIN_SESSION_INPUT_LEN: usize = 8 + 1 + 1;

/// Relay → origin (or parent relay): the inputs a relay received for one
/// tick, checked for size and rate and stripped of repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputBatch {
    /// The tick the relay collected them for (its newest received tick).
    pub tick: u64,
    /// At most [`MAX_BATCH_INPUTS`](super::MAX_BATCH_INPUTS); a relay with
    /// more sends several batches for the same tick.
    pub inputs: Vec<SessionInput>,
}

impl Body for InputBatch {
    const TYPE: MessageType = MessageType::InputBatch;

    fn check(&self) -> Result<(), EncodeError> {
        check_varint("input batch tick", self.tick)?;
        check_len("batched inputs", self.inputs.len(), MAX_BATCH_INPUTS)?;
        for input in &self.inputs {
            check_len("input", input.data.len(), MAX_INPUT_LEN)?;
        }
        Ok(())
    }

    fn body_len(&self) -> usize {
        varint_len(self.tick)
            + varint_len(self.inputs.len() as u64)
            + self
                .inputs
                .iter()
                .map(|i| 8 + varint_len(i.seq.into()) + bytes_len(i.data.len()))
                .sum::<usize>()
    }

    fn encode_body<B: BufMut>(&self, out: &mut B) {
        put_varint(out, self.tick);
        put_varint(out, self.inputs.len() as u64);
        for input in &self.inputs {
            out.put_u64(input.session);
            put_varint(out, input.seq.into());
            put_bytes(out, &input.data);
        }
    }

    fn decode_body<B: Buf>(buf: &mut B, _version: u32) -> Result<InputBatch, DecodeError> {
        let tick = get_varint(buf)?;
        let count = get_count(
            buf,
            MAX_BATCH_INPUTS,
            MIN_SESSION_INPUT_LEN,
            "batched inputs",
        )?;
        let mut inputs = Vec::with_capacity(count);
        for _ in 0..count {
            inputs.push(SessionInput {
                session: get(buf)?,
                seq: get_varint_u32(buf, "input sequence number")?,
                data: get_bytes(buf, MAX_INPUT_LEN, "input")?,
            });
        }
        Ok(InputBatch { tick, inputs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_round_trips_extremes() {
        for v in [0, 1, -1, 2, -2, i32::MAX, i32::MIN, 12345, -12345] {
            assert_eq!(unzigzag(zigzag(v)), Ok(v));
        }
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
        assert!(unzigzag(u64::from(u32::MAX) + 1).is_err());
    }

    #[test]
    fn world_cell_takes_one_byte() {
        let mut out = Vec::new();
        CellId::WORLD.encode(&mut out);
        assert_eq!(out, [0]);
        let cell = CellId { x: -3, y: 7 };
        let mut out = Vec::new();
        cell.encode(&mut out);
        assert_eq!(out.len(), cell.encoded_len());
        assert_eq!(CellId::decode(&mut &out[..]), Ok(cell));
    }
}
