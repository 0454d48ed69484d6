//! Datagrams: `decode_datagram` on raw bytes must never panic; whatever
//! decodes re-encodes and decodes to the same message; a ping can always be
//! answered with a pong no larger than itself.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use proto::msg::{MAX_REGION_LEN, MAX_RELAY_ID_LEN, Message, Pong, VERSION};

fuzz_target!(|data: &[u8]| {
    let from_slice = Message::decode_datagram(data, VERSION);
    let from_bytes = Message::decode_datagram(Bytes::copy_from_slice(data), VERSION);
    assert_eq!(from_slice, from_bytes);
    let Ok(msg) = from_slice else {
        return;
    };
    assert!(msg.message_type().datagram());
    let mut out = Vec::new();
    msg.encode_datagram(&mut out)
        .expect("a decoded datagram re-encodes");
    assert_eq!(out.len(), msg.datagram_len());
    assert_eq!(
        Message::decode_datagram(&out[..], VERSION).expect("re-encoding decodes"),
        msg
    );
    // The same message also travels framed.
    let mut framed = Vec::new();
    msg.encode(&mut framed).expect("a datagram message frames");
    let (again, _) = proto::msg::decode_frame(&framed, VERSION)
        .expect("frame decodes")
        .expect("frame is whole");
    assert_eq!(again, msg);

    if let Message::Ping(ping) = msg {
        // The largest reply a relay can make.
        let pong = Pong {
            nonce: ping.nonce,
            sent_us: ping.sent_us,
            relay_id: "r".repeat(MAX_RELAY_ID_LEN),
            region: "g".repeat(MAX_REGION_LEN),
            load: u16::MAX,
            origin_rtt_us: u32::MAX,
            coords: Some([1.0, 2.0, 3.0]),
        };
        let mut reply = Vec::new();
        pong.encode_reply(data.len(), &mut reply)
            .expect("every ping can be answered");
        assert!(reply.len() <= data.len(), "amplification");
    }
});
