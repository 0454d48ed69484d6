//! Stream framing: `decode_frame` on raw bytes must never panic; whatever
//! decodes re-encodes and decodes to the same message; the slice, `Buf` and
//! `FrameReader` decoders agree on every input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::msg::{DecodeError, FrameReader, Message, VERSION, decode_frame};

fn round_trip(msg: &Message) {
    let mut out = Vec::new();
    msg.encode(&mut out).expect("a decoded message re-encodes");
    assert_eq!(out.len(), msg.encoded_len());
    let (again, used) = decode_frame(&out, VERSION)
        .expect("re-encoding decodes")
        .expect("re-encoding is whole");
    assert_eq!(used, out.len());
    assert_eq!(&again, msg);
}

fuzz_target!(|data: &[u8]| {
    // The first frame, three ways.
    let first = decode_frame(data, VERSION);
    let mut cur = data;
    let by_buf = Message::decode(&mut cur, VERSION);
    match &first {
        Ok(Some((msg, used))) => {
            assert!(*used <= data.len());
            round_trip(msg);
            assert_eq!(by_buf.as_ref(), Ok(msg));
            assert_eq!(data.len() - cur.len(), *used);
        }
        Ok(None) => assert_eq!(by_buf, Err(DecodeError::Incomplete)),
        Err(e) => assert_eq!(by_buf.as_ref(), Err(e)),
    }

    // The whole input as a stream, fed in two pieces to a reader, against
    // repeated decode_frame calls.
    let mut expected = Vec::new();
    let mut rest = data;
    let end = loop {
        match decode_frame(rest, VERSION) {
            Ok(Some((msg, used))) => {
                expected.push(msg);
                rest = &rest[used..];
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    let mut reader = FrameReader::new(VERSION);
    let split = data.len() / 2;
    let mut got = Vec::new();
    let mut reader_end = Ok(());
    'feed: for piece in [&data[..split], &data[split..]] {
        reader.extend_from_slice(piece);
        loop {
            match reader.next_message() {
                Ok(Some(msg)) => got.push(msg),
                Ok(None) => break,
                Err(e) => {
                    reader_end = Err(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(got, expected);
    assert_eq!(reader_end, end);
    if end.is_ok() {
        assert_eq!(reader.buffered(), rest.len());
    }
});
