//! Property tests of the delta codec: exact round trips over random worlds.

use proptest::prelude::*;
use statecast_proto::delta::{self, Codec, Prediction};
use statecast_proto::{Component, Encoding, Field, LaneKind, Layout, Schema, Snapshot};

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![
        (1u8..=32, -1000.0f64..1000.0, 0.5f64..5000.0).prop_map(|(bits, min, w)| Encoding::Float {
            min,
            max: min + w,
            bits
        }),
        (2u8..=32).prop_map(|bits| Encoding::Quat { bits }),
        (any::<i32>(), 0u32..=u32::MAX).prop_map(|(min, span)| Encoding::Int {
            min: min as i64,
            max: min as i64 + span as i64
        }),
        (-50i64..50, 0i64..300).prop_map(|(min, span)| Encoding::Int {
            min,
            max: min + span
        }),
        Just(Encoding::Bool),
        (0u32..12).prop_map(|max_len| Encoding::Bytes { max_len }),
    ]
}

fn schema() -> impl Strategy<Value = Schema> {
    prop::collection::vec(encoding(), 1..8).prop_map(|encodings| Schema {
        name: "random".into(),
        components: vec![Component {
            name: "c".into(),
            fields: encodings
                .into_iter()
                .enumerate()
                .map(|(i, encoding)| Field {
                    name: format!("f{i}"),
                    encoding,
                })
                .collect(),
        }],
        position: None,
        max_entities: 200,
    })
}

/// A random entity value drawn from `seed`, sometimes close to `near`.
fn lane_value(kind: LaneKind, seed: u64, near: Option<u32>) -> u32 {
    let max = kind.max() as u64;
    match (near, seed % 4) {
        (Some(n), 0) => n,
        (Some(n), 1 | 2) => {
            let step = (seed >> 8) % 9;
            let v = if seed & 0x10 == 0 {
                n as u64 + step
            } else {
                (n as u64).saturating_sub(step)
            };
            v.min(max) as u32
        }
        _ => ((seed >> 3) % (max + 1)) as u32,
    }
}

type Row = (u32, Vec<u32>, Vec<Vec<u8>>);

#[derive(Debug)]
struct World {
    layout: Layout,
    prev: Snapshot,
    base: Snapshot,
    target: Snapshot,
}

fn build(layout: &Layout, rows: &[Row]) -> Snapshot {
    Snapshot::from_entities(layout, rows.iter().map(|(id, l, b)| (*id, &l[..], &b[..]))).unwrap()
}

/// prev -> base -> target, each step moving, adding and removing entities.
fn world() -> impl Strategy<Value = World> {
    (
        schema(),
        prop::collection::vec(any::<u64>(), 1..600),
        0usize..80,
    )
        .prop_map(|(schema, seeds, start)| {
            let layout = schema.layout().unwrap();
            let mut seeds = seeds.into_iter().cycle();
            let mut next = move || {
                seeds
                    .next()
                    .unwrap()
                    .rotate_left(7)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            };
            let blob_max: Vec<u32> = layout
                .fields()
                .iter()
                .filter(|s| s.blob.is_some())
                .map(|s| s.max_len)
                .collect();
            let fresh = |next: &mut dyn FnMut() -> u64, near: Option<&Row>| {
                let lanes: Vec<u32> = layout
                    .lanes()
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| lane_value(k, next(), near.map(|n| n.1[i])))
                    .collect();
                let blobs: Vec<Vec<u8>> = blob_max
                    .iter()
                    .enumerate()
                    .map(|(i, &max)| match near {
                        Some(n) if next() % 3 != 0 => n.2[i].clone(),
                        _ => (0..next() % (max as u64 + 1))
                            .map(|_| next() as u8)
                            .collect(),
                    })
                    .collect();
                (lanes, blobs)
            };
            let mut rows: Vec<Row> = Vec::new();
            let count = (start % 60) + 1;
            for _ in 0..count {
                let id = (next() % 150) as u32;
                if rows.iter().any(|r| r.0 == id) {
                    continue;
                }
                let (l, b) = fresh(&mut next, None);
                rows.push((id, l, b));
            }
            let mut frames = Vec::new();
            for _ in 0..3 {
                frames.push(build(&layout, &rows));
                let mut out = Vec::new();
                for row in &rows {
                    match next() % 10 {
                        0 => {} // removed
                        1..=4 => out.push(row.clone()),
                        _ => {
                            let (l, b) = fresh(&mut next, Some(row));
                            out.push((row.0, l, b));
                        }
                    }
                }
                for _ in 0..next() % 8 {
                    let id = (next() % 150) as u32;
                    if out.iter().any(|r| r.0 == id) {
                        continue;
                    }
                    let (l, b) = fresh(&mut next, None);
                    out.push((id, l, b));
                }
                rows = out;
            }
            let target = frames.pop().unwrap();
            let base = frames.pop().unwrap();
            let prev = frames.pop().unwrap();
            World {
                layout,
                prev,
                base,
                target,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn delta_round_trips_exactly(w in world(), ahead in 0u32..8, span in 0u32..8) {
        let mut codec = Codec::new(&w.layout);
        for prediction in [None, Some(Prediction { prev: &w.prev, span, ahead })] {
            let mut bytes = Vec::new();
            codec.encode(&w.layout, &w.base, prediction, &w.target, &mut bytes);
            // A reused codec (lazily reset models) codes as a fresh one.
            let mut fresh = Vec::new();
            delta::encode(&w.layout, &w.base, prediction, &w.target, &mut fresh);
            prop_assert_eq!(&bytes, &fresh);
            let decoded = codec.decode(&w.layout, &w.base, prediction, &bytes).unwrap();
            prop_assert_eq!(&decoded, &w.target);
            prop_assert_eq!(decoded.hash(), w.target.hash());
        }
        let mut key = Vec::new();
        delta::keyframe(&w.layout, &w.target, &mut key);
        let decoded = delta::decode_keyframe(&w.layout, &key).unwrap();
        prop_assert_eq!(decoded.hash(), w.target.hash());
        prop_assert_eq!(decoded, w.target.clone());
        // Identical snapshots cost next to nothing.
        let mut same = Vec::new();
        codec.encode(&w.layout, &w.target, None, &w.target, &mut same);
        prop_assert!(same.len() <= 4 + w.target.len() / 30, "{} bytes for no change", same.len());
    }

    #[test]
    fn garbage_never_panics(w in world(), bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let mut codec = Codec::new(&w.layout);
        let prediction = Some(Prediction { prev: &w.prev, span: 2, ahead: 2 });
        for p in [None, prediction] {
            if let Ok(s) = codec.decode(&w.layout, &w.base, p, &bytes) {
                // Whatever decodes is a valid snapshot that re-encodes exactly.
                prop_assert!(s.len() <= w.layout.max_entities());
                let mut again = Vec::new();
                codec.encode(&w.layout, &w.base, p, &s, &mut again);
                prop_assert_eq!(codec.decode(&w.layout, &w.base, p, &again).unwrap(), s);
            }
        }
    }
}

#[test]
fn too_many_entities_is_refused_before_allocating() {
    let schema = Schema {
        name: "small".into(),
        components: vec![Component {
            name: "c".into(),
            fields: vec![Field {
                name: "v".into(),
                encoding: Encoding::Bool,
            }],
        }],
        position: None,
        max_entities: 10,
    };
    let layout = schema.layout().unwrap();
    let rows: Vec<Row> = (0..10).map(|i| (i, vec![1], vec![])).collect();
    let ten = build(&layout, &rows);
    let mut bytes = Vec::new();
    delta::keyframe(&layout, &ten, &mut bytes);
    assert_eq!(delta::decode_keyframe(&layout, &bytes).unwrap(), ten);
    // The same keyframe against a world that allows fewer entities.
    let mut small = schema.clone();
    small.max_entities = 9;
    let small = small.layout().unwrap();
    assert!(matches!(
        delta::decode_keyframe(&small, &bytes),
        Err(delta::DeltaError::TooManyEntities { count: 10, max: 9 })
    ));
}
