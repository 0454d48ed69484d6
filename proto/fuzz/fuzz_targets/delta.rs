//! The delta codec on untrusted bytes: `delta::decode` against a fixed
//! world (schema and a 20-entity baseline) must never panic; whatever
//! decodes is a valid snapshot of that world, re-encodes against the same
//! baseline and decodes to the same snapshot.
//!
//! The first input byte picks the case: 0 a keyframe (empty baseline), 1 a
//! delta from the baseline, 2 and up a delta from the baseline with linear
//! prediction from an older snapshot (span and ahead from the byte).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use proto::delta::{self, Codec, Prediction};
use proto::{Component, Encoding, Field, Layout, Position, Schema, Snapshot};

struct World {
    layout: Layout,
    empty: Snapshot,
    prev: Snapshot,
    base: Snapshot,
}

fn layout() -> Layout {
    let field = |name: &str, encoding| Field {
        name: name.into(),
        encoding,
    };
    Schema {
        name: "fuzz".into(),
        components: vec![
            Component {
                name: "transform".into(),
                fields: vec![
                    field(
                        "x",
                        Encoding::Float {
                            min: -100.0,
                            max: 100.0,
                            bits: 16,
                        },
                    ),
                    field("y", Encoding::Int { min: -5, max: 1000 }),
                    field("rot", Encoding::Quat { bits: 9 }),
                ],
            },
            Component {
                name: "meta".into(),
                fields: vec![
                    field("on", Encoding::Bool),
                    field("tag", Encoding::Bytes { max_len: 8 }),
                    field(
                        "wide",
                        Encoding::Int {
                            min: i64::from(i32::MIN),
                            max: i64::from(i32::MAX),
                        },
                    ),
                ],
            },
        ],
        position: Some(Position {
            fields: vec!["transform.x".into(), "transform.y".into()],
        }),
        max_entities: 64,
    }
    .layout()
    .expect("the fuzz schema compiles")
}

/// 20 entities with deterministic pseudo-random values; `shift` moves them.
fn snapshot(layout: &Layout, shift: u32) -> Snapshot {
    let mut seed = 0x9e37_79b9u32;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    let rows: Vec<(u32, Vec<u32>, Vec<Vec<u8>>)> = (0..20u32)
        .map(|i| {
            let lanes = layout
                .lanes()
                .iter()
                .map(|kind| {
                    let v = next().wrapping_add(shift.wrapping_mul(i + 1));
                    if kind.max() == u32::MAX {
                        v
                    } else {
                        v % (kind.max() + 1)
                    }
                })
                .collect();
            let blob = vec![b"abcdefgh"[..(i % 9) as usize].to_vec()];
            (i * 3 + shift % 2, lanes, blob)
        })
        .collect();
    Snapshot::from_entities(
        layout,
        rows.iter()
            .map(|(id, lanes, blobs)| (*id, &lanes[..], &blobs[..])),
    )
    .expect("the fuzz snapshot is valid")
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let layout = layout();
        World {
            empty: Snapshot::empty(&layout),
            prev: snapshot(&layout, 0),
            base: snapshot(&layout, 1),
            layout,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let w = world();
    let (base, prediction) = match mode {
        0 => (&w.empty, None),
        1 => (&w.base, None),
        m => (
            &w.base,
            Some(Prediction {
                prev: &w.prev,
                span: u32::from(m & 7),
                ahead: u32::from(m >> 3),
            }),
        ),
    };
    let Ok(snapshot) = delta::decode(&w.layout, base, prediction, bytes) else {
        return;
    };
    assert!(snapshot.fits(&w.layout));
    assert!(snapshot.len() <= w.layout.max_entities());
    assert!(snapshot.ids().windows(2).all(|p| p[0] < p[1]));
    for i in 0..snapshot.len() {
        for (value, kind) in snapshot.lanes(i).iter().zip(w.layout.lanes()) {
            assert!(*value <= kind.max());
        }
    }
    let _ = snapshot.hash();

    // Re-encode against the same baseline and prediction, decode again.
    let mut out = Vec::new();
    delta::encode(&w.layout, base, prediction, &snapshot, &mut out);
    let again = delta::decode(&w.layout, base, prediction, &out).expect("re-encoding decodes");
    assert!(again == snapshot, "delta round trip differs");

    // A reused codec gives the same answers.
    let mut codec = Codec::new(&w.layout);
    let reused = codec
        .decode(&w.layout, base, prediction, bytes)
        .expect("decodes again");
    assert!(reused == snapshot, "reused codec differs");

    // And as a keyframe.
    out.clear();
    delta::keyframe(&w.layout, &snapshot, &mut out);
    let key = delta::decode_keyframe(&w.layout, &out).expect("keyframe decodes");
    assert!(key == snapshot, "keyframe round trip differs");
});
