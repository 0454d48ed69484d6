//! Schemas from untrusted bytes (postcard, as in a `Welcome`, and JSON, as
//! in files): decoding and `Schema::layout` must never panic; a schema that
//! compiles round-trips through postcard and travels in a `Welcome`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::msg::{MAX_SCHEMA_LEN, Message, VERSION, Welcome, decode_frame};
use proto::{Encoding, Schema, Snapshot};

fn check(schema: Schema) {
    let Ok(layout) = schema.layout() else {
        return;
    };
    assert_eq!(layout.schema(), &schema);
    let _ = Snapshot::empty(&layout);
    for index in 0..layout.fields().len() {
        let _ = layout.field_path(index);
        if let Encoding::Float { min, max, .. } = layout.encoding(index) {
            for v in [min, max, (min + max) / 2.0, f64::NAN, f64::INFINITY] {
                let q = layout.quantize_float(index, v);
                let _ = layout.dequantize(index, q);
            }
        }
        if let Encoding::Int { min, max } = layout.encoding(index) {
            for v in [min, max, i64::MIN, i64::MAX] {
                let q = layout.quantize_int(index, v);
                let _ = layout.dequantize(index, q);
            }
        }
    }

    let bytes = postcard::to_allocvec(&schema).expect("a schema serializes");
    let back: Schema = postcard::from_bytes(&bytes).expect("its encoding decodes");
    assert_eq!(back, schema);
    assert_eq!(back.layout().expect("it still compiles"), layout);

    // JSON floats may move by one unit in the last place through serde_json,
    // so only check that the text parses again.
    let json = serde_json::to_string(&schema).expect("a schema prints as JSON");
    let _: Schema = serde_json::from_str(&json).expect("its JSON parses");

    if bytes.len() <= MAX_SCHEMA_LEN {
        let welcome = Message::from(Welcome {
            version: VERSION,
            session: 1,
            world: "w".into(),
            schema,
            tick_rate: 30,
            tick: 0,
            relay_id: "r".into(),
            region: "g".into(),
        });
        let mut out = Vec::new();
        welcome.encode(&mut out).expect("a valid schema travels");
        let (again, _) = decode_frame(&out, VERSION)
            .expect("the welcome decodes")
            .expect("the welcome is whole");
        assert_eq!(again, welcome);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok((schema, _)) = postcard::take_from_bytes::<Schema>(data) {
        check(schema);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(schema) = serde_json::from_str::<Schema>(text)
    {
        check(schema);
    }
});
