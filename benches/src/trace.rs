//! Trace files: recorded worlds that the codec is measured on.
//!
//! Two formats:
//!
//! - **cubes**, the public format of the 2015 networked-physics compression
//!   challenge: no header; each frame is 901 records of eight little-endian
//!   `i32` (orientation_largest, orientation_a, orientation_b,
//!   orientation_c, position_x, position_y, position_z, interacting). Results
//!   on it compare with published work and with other codecs run on the same
//!   file.
//! - **SCTRACE1**, statecast's own format for any world:
//!
//!   ```text
//!   magic           8 bytes  "SCTRACE1"
//!   schema length   u32 LE   (at most 1 MiB)
//!   schema          JSON of proto::Schema
//!   then per frame:
//!     length        u32 LE   (at most 256 MiB)
//!     keyframe      proto::delta::encode of the frame against the empty snapshot
//!   ```
//!
//! A file is read as SCTRACE1 when it starts with the magic, else as cubes.

use anyhow::{Context, bail, ensure};
use origin::worlds::cubes;
use proto::{Layout, Schema, Snapshot};
use std::io::Write;
use std::path::Path;

pub use cubes::Record;

/// First bytes of a statecast trace.
pub const MAGIC: &[u8; 8] = b"SCTRACE1";
/// Longest schema a trace may declare.
pub const MAX_SCHEMA_BYTES: usize = 1 << 20;
/// Longest keyframe a trace may hold.
pub const MAX_FRAME_BYTES: usize = 256 << 20;
/// Bytes of one frame of the cubes format.
pub const CUBES_FRAME_BYTES: usize = cubes::CUBES * 8 * 4;

/// Which format a trace was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The challenge's headerless cubes format.
    Cubes,
    /// statecast's SCTRACE1.
    Statecast,
}

impl Format {
    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Format::Cubes => "cubes",
            Format::Statecast => "sctrace1",
        }
    }
}

/// A loaded trace: the world's layout and its frames as snapshots.
pub struct Trace {
    /// Format the trace was read from.
    pub format: Format,
    /// Layout of the world's schema.
    pub layout: Layout,
    /// Frames, oldest first.
    pub frames: Vec<Snapshot>,
    /// For cubes traces, the frames as challenge records too.
    pub records: Option<Vec<Vec<Record>>>,
}

impl Trace {
    /// Name of the world (the schema's name).
    pub fn world(&self) -> &str {
        &self.layout.schema().name
    }

    /// Builds a cubes trace from challenge records.
    pub fn from_cubes_records(records: Vec<Vec<Record>>) -> anyhow::Result<Trace> {
        let layout = cubes::schema()
            .layout()
            .context("the cubes schema is invalid")?;
        let frames = records
            .iter()
            .enumerate()
            .map(|(i, frame)| {
                cubes::from_records(&layout, frame)
                    .with_context(|| format!("frame {i} holds values outside the cubes ranges"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Trace {
            format: Format::Cubes,
            layout,
            frames,
            records: Some(records),
        })
    }
}

/// Reads a trace file, detecting its format.
pub fn load(path: &Path) -> anyhow::Result<Trace> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read trace {}", path.display()))?;
    parse(&bytes).with_context(|| format!("cannot load trace {}", path.display()))
}

/// Parses the bytes of a trace file, detecting its format.
pub fn parse(bytes: &[u8]) -> anyhow::Result<Trace> {
    ensure!(!bytes.is_empty(), "the trace is empty");
    if bytes.starts_with(MAGIC) {
        parse_statecast(&bytes[MAGIC.len()..])
    } else {
        parse_cubes(bytes)
    }
}

fn parse_cubes(bytes: &[u8]) -> anyhow::Result<Trace> {
    if bytes.len() % CUBES_FRAME_BYTES != 0 {
        bail!(
            "truncated cubes trace: {} bytes is not a whole number of frames \
             ({CUBES_FRAME_BYTES} bytes each: {} cubes of eight little-endian i32); \
             {} whole frames and {} bytes left over",
            bytes.len(),
            cubes::CUBES,
            bytes.len() / CUBES_FRAME_BYTES,
            bytes.len() % CUBES_FRAME_BYTES,
        );
    }
    let records = cubes::read_trace(&mut &bytes[..]).context("cannot read cubes records")?;
    Trace::from_cubes_records(records)
}

/// Takes a u32 LE length and that many bytes from the front of `rest`.
fn take_chunk<'a>(rest: &mut &'a [u8], limit: usize, what: &str) -> anyhow::Result<&'a [u8]> {
    ensure!(
        rest.len() >= 4,
        "truncated trace: {what} length cut short ({} bytes left)",
        rest.len()
    );
    let len = u32::from_le_bytes(rest[..4].try_into().expect("four bytes")) as usize;
    ensure!(
        len <= limit,
        "{what} declares {len} bytes, more than the limit of {limit}"
    );
    ensure!(
        rest.len() - 4 >= len,
        "truncated trace: {what} declares {len} bytes, only {} remain",
        rest.len() - 4
    );
    let chunk = &rest[4..4 + len];
    *rest = &rest[4 + len..];
    Ok(chunk)
}

fn parse_statecast(mut rest: &[u8]) -> anyhow::Result<Trace> {
    let schema = take_chunk(&mut rest, MAX_SCHEMA_BYTES, "schema")?;
    let schema: Schema =
        serde_json::from_slice(schema).context("the trace's schema is not valid JSON")?;
    let layout = schema.layout().context("the trace's schema is invalid")?;
    let empty = Snapshot::empty(&layout);
    let mut frames = Vec::new();
    while !rest.is_empty() {
        let what = format!("frame {}", frames.len());
        let bytes = take_chunk(&mut rest, MAX_FRAME_BYTES, &what)?;
        let frame = proto::delta::decode(&layout, &empty, None, bytes)
            .with_context(|| format!("{what}: the keyframe does not decode"))?;
        frames.push(frame);
    }
    Ok(Trace {
        format: Format::Statecast,
        layout,
        frames,
        records: None,
    })
}

/// Writes an SCTRACE1 trace, frame by frame.
pub struct Writer<W: Write> {
    out: W,
    layout: Layout,
    empty: Snapshot,
    scratch: Vec<u8>,
    bytes: u64,
}

impl<W: Write> Writer<W> {
    /// Writes the header for `schema`.
    pub fn new(mut out: W, schema: &Schema) -> anyhow::Result<Self> {
        let layout = schema.layout().context("the world's schema is invalid")?;
        let json = serde_json::to_vec(schema).context("cannot serialize the schema")?;
        ensure!(
            json.len() <= MAX_SCHEMA_BYTES,
            "the schema is too large for a trace"
        );
        out.write_all(MAGIC)?;
        out.write_all(&(json.len() as u32).to_le_bytes())?;
        out.write_all(&json)?;
        let empty = Snapshot::empty(&layout);
        Ok(Writer {
            out,
            layout,
            empty,
            scratch: Vec::new(),
            bytes: (MAGIC.len() + 4 + json.len()) as u64,
        })
    }

    /// Appends one frame as a keyframe.
    pub fn frame(&mut self, frame: &Snapshot) -> anyhow::Result<()> {
        self.scratch.clear();
        proto::delta::encode(&self.layout, &self.empty, None, frame, &mut self.scratch);
        ensure!(
            self.scratch.len() <= MAX_FRAME_BYTES,
            "a keyframe of {} bytes is too large for a trace",
            self.scratch.len()
        );
        self.out
            .write_all(&(self.scratch.len() as u32).to_le_bytes())?;
        self.out.write_all(&self.scratch)?;
        self.bytes += 4 + self.scratch.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Flushes and returns the inner writer.
    pub fn finish(mut self) -> anyhow::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use origin::worlds::plaza::{Plaza, PlazaConfig};

    fn plaza_frames(ticks: usize) -> (Schema, Vec<Snapshot>) {
        let mut sim = Plaza::new(PlazaConfig {
            avatars: 60,
            seed: 3,
            ..PlazaConfig::default()
        });
        let schema = origin::Simulation::schema(&sim).clone();
        let layout = schema.layout().unwrap();
        let frames = crate::record(&mut sim, &layout, ticks);
        (schema, frames)
    }

    #[test]
    fn sctrace_round_trips_and_counts_its_bytes() {
        let (schema, frames) = plaza_frames(5);
        let mut writer = Writer::new(Vec::new(), &schema).unwrap();
        for f in &frames {
            writer.frame(f).unwrap();
        }
        let bytes_counted = writer.bytes();
        let bytes = writer.finish().unwrap();
        assert_eq!(bytes.len() as u64, bytes_counted);
        assert!(bytes.starts_with(MAGIC));
        let trace = parse(&bytes).unwrap();
        assert_eq!(trace.format, Format::Statecast);
        assert_eq!(trace.layout.schema(), &schema);
        assert!(trace.records.is_none());
        assert_eq!(trace.frames, frames);
    }

    #[test]
    fn damaged_sctrace_is_refused_with_reasons() {
        let (schema, frames) = plaza_frames(2);
        let mut writer = Writer::new(Vec::new(), &schema).unwrap();
        for f in &frames {
            writer.frame(f).unwrap();
        }
        let bytes = writer.finish().unwrap();
        let err = |b: &[u8]| format!("{:#}", parse(b).err().expect("refused"));
        // Cut anywhere inside the last frame or its length.
        for cut in [1, 2, 3, 5] {
            let e = err(&bytes[..bytes.len() - cut]);
            assert!(e.contains("truncated trace: frame 1"), "{e}");
        }
        // Cut inside the schema.
        assert!(err(&bytes[..14]).contains("schema declares"));
        assert!(err(&bytes[..10]).contains("schema length cut short"));
        // A length beyond the limit is refused before any allocation.
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(err(&huge).contains("more than the limit"));
        // A schema that is not JSON, and one that is not a valid schema.
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&3u32.to_le_bytes());
        bad.extend_from_slice(b"{{{");
        assert!(err(&bad).contains("not valid JSON"));
        let mut invalid = schema.clone();
        invalid.max_entities = 0;
        let json = serde_json::to_vec(&invalid).unwrap();
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&(json.len() as u32).to_le_bytes());
        bad.extend_from_slice(&json);
        assert!(err(&bad).contains("schema is invalid"));
        // A frame whose keyframe is garbage.
        let head = MAGIC.len() + 4 + serde_json::to_vec(&schema).unwrap().len();
        let mut garbage = bytes[..head].to_vec();
        garbage.extend_from_slice(&4u32.to_le_bytes());
        garbage.extend_from_slice(&[0xff; 4]);
        assert!(err(&garbage).contains("frame 0: the keyframe does not decode"));
        assert!(err(&[]).contains("empty"));
    }

    #[test]
    fn cubes_files_are_whole_frames_of_records() {
        let mut sim = origin::worlds::cubes::Cubes::new(2);
        let layout = cubes::schema().layout().unwrap();
        let frames = crate::record(&mut sim, &layout, 3);
        let mut bytes = Vec::new();
        for f in &frames {
            cubes::write_frame(&mut bytes, &cubes::to_records(f)).unwrap();
        }
        assert_eq!(bytes.len(), 3 * CUBES_FRAME_BYTES);
        let trace = parse(&bytes).unwrap();
        assert_eq!(trace.format, Format::Cubes);
        assert_eq!(trace.frames, frames);
        assert_eq!(
            trace.records.as_ref().unwrap()[2],
            cubes::to_records(&frames[2])
        );
        let e = format!("{:#}", parse(&bytes[..bytes.len() - 1]).err().unwrap());
        assert!(
            e.contains("truncated cubes trace") && e.contains("2 whole frames"),
            "{e}"
        );
    }
}
