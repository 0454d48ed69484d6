//! Property tests of message framing: exact round trips for every message,
//! "need more bytes" for every strict prefix of a frame, no panic on any
//! input, and no probe reply larger than its request.

use bytes::{BufMut, Bytes};
use proptest::prelude::*;
use statecast_proto::msg::*;
use statecast_proto::wire::{Encode, VarInt};
use statecast_proto::{Component, Encoding, Field, Position, Schema};

const MAX_TICK: u64 = (1 << 62) - 1;

/// Strings of at most `max` bytes: full-length ASCII, or any characters.
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::string::string_regex(&format!("[ -~]{{0,{max}}}")).unwrap(),
        prop::collection::vec(any::<char>(), 0..=max / 4).prop_map(String::from_iter),
    ]
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

fn tick() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..100_000, 0..=MAX_TICK]
}

fn coords() -> impl Strategy<Value = Option<Coords>> {
    prop::option::of([-1e6f32..1e6, -1e6f32..1e6, 0f32..1e4])
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![
        (-1e6f64..1e6, 0.001f64..1e6, 1u8..=32).prop_map(|(min, w, bits)| Encoding::Float {
            min,
            max: min + w,
            bits
        }),
        (2u8..=32).prop_map(|bits| Encoding::Quat { bits }),
        (any::<i32>(), any::<u32>()).prop_map(|(min, span)| Encoding::Int {
            min: min.into(),
            max: i64::from(min) + i64::from(span)
        }),
        Just(Encoding::Bool),
        (0u32..=4096).prop_map(|max_len| Encoding::Bytes { max_len }),
    ]
}

fn schema() -> impl Strategy<Value = Schema> {
    (
        "[a-z][a-z0-9_]{0,20}",
        prop::collection::vec(prop::collection::vec(encoding(), 0..6), 1..4),
        any::<bool>(),
        1u32..=1 << 20,
    )
        .prop_map(|(name, components, position, max_entities)| {
            let components: Vec<Component> = components
                .into_iter()
                .enumerate()
                .map(|(c, encodings)| Component {
                    name: format!("component{c}"),
                    fields: encodings
                        .into_iter()
                        .enumerate()
                        .map(|(f, encoding)| Field {
                            name: format!("field{f}"),
                            encoding,
                        })
                        .collect(),
                })
                .collect();
            let numeric: Vec<String> = components
                .iter()
                .flat_map(|c| {
                    c.fields.iter().filter_map(move |f| match f.encoding {
                        Encoding::Float { .. } | Encoding::Int { .. } => {
                            Some(format!("{}.{}", c.name, f.name))
                        }
                        _ => None,
                    })
                })
                .take(3)
                .collect();
            let position = (position && numeric.len() >= 2).then_some(Position { fields: numeric });
            Schema {
                name,
                components,
                position,
                max_entities,
            }
        })
        .prop_filter("schema compiles", |s| s.layout().is_ok())
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        bytes(MAX_TOKEN_LEN),
        text(MAX_WORLD_LEN),
        prop::option::of((
            any::<u64>(),
            tick(),
            prop::collection::vec(any::<(i32, i32)>(), 0..8),
        )),
        text(MAX_AGENT_LEN),
        prop::option::of((-1e6f32..1e6, -1e6f32..1e6, 0f32..1e4)),
    )
        .prop_map(|(token, world, resume, agent, area)| Hello {
            version: VERSION,
            token,
            world,
            resume: resume.map(|(session, last_ack, cells)| Resume {
                session,
                last_ack,
                cells: cells.into_iter().map(|(x, y)| CellId { x, y }).collect(),
            }),
            agent,
            interest: area.map(|(x, y, radius)| Area { x, y, radius }),
        })
}

fn welcome() -> impl Strategy<Value = Welcome> {
    (
        any::<u64>(),
        text(MAX_WORLD_LEN),
        schema(),
        1u32..=MAX_TICK_RATE,
        tick(),
        text(MAX_RELAY_ID_LEN),
        text(MAX_REGION_LEN),
    )
        .prop_map(
            |(session, world, schema, tick_rate, tick, relay_id, region)| Welcome {
                version: VERSION,
                session,
                world,
                schema,
                tick_rate,
                tick,
                relay_id,
                region,
            },
        )
}

fn chunk() -> impl Strategy<Value = Chunk> {
    (
        prop_oneof![
            Just(CellId::WORLD),
            (-3i32..3, -3i32..3).prop_map(|(x, y)| CellId { x, y }),
            any::<(i32, i32)>().prop_map(|(x, y)| CellId { x, y }),
        ],
        bytes(48),
    )
        .prop_map(|(cell, data)| Chunk { cell, data })
}

fn update() -> impl Strategy<Value = Update> {
    (
        tick(),
        any::<Option<(u64, Option<u64>)>>(),
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(chunk(), 0..6),
        prop::collection::vec(any::<(i32, i32)>().prop_map(|(x, y)| CellId { x, y }), 0..4),
    )
        .prop_map(|(tick, gaps, origin_time_us, hash, chunks, dropped)| {
            let (mut base, mut predict_from) = (None, None);
            if let (Some((b, p)), true) = (gaps, tick > 0) {
                let b = tick - 1 - b % tick.min(1000);
                base = Some(b);
                if let (Some(p), true) = (p, b > 0) {
                    predict_from = Some(b - 1 - p % b.min(1000));
                }
            }
            Update {
                tick,
                base,
                predict_from,
                origin_time_us,
                hash,
                chunks,
                dropped,
            }
        })
}

fn input() -> impl Strategy<Value = Input> {
    (
        any::<u32>(),
        prop::collection::vec(bytes(MAX_INPUT_LEN), 1..=MAX_INPUT_REDUNDANCY),
    )
        .prop_map(|(seq, inputs)| Input { seq, inputs })
}

fn input_batch() -> impl Strategy<Value = InputBatch> {
    (
        tick(),
        prop::collection::vec(
            (any::<u64>(), any::<u32>(), bytes(MAX_INPUT_LEN))
                .prop_map(|(session, seq, data)| SessionInput { session, seq, data }),
            0..10,
        ),
    )
        .prop_map(|(tick, inputs)| InputBatch { tick, inputs })
}

fn relay_info() -> impl Strategy<Value = RelayInfo> {
    (
        text(MAX_RELAY_ID_LEN),
        text(MAX_ADDR_LEN),
        text(40),
        text(MAX_REGION_LEN),
        any::<u16>(),
        any::<u32>(),
        coords(),
    )
        .prop_map(
            |(id, addr, probe_addr, region, load, origin_rtt_us, coords)| RelayInfo {
                id,
                addr,
                probe_addr,
                region,
                load,
                origin_rtt_us,
                coords,
            },
        )
}

fn pong() -> impl Strategy<Value = Pong> {
    (
        any::<u64>(),
        any::<u64>(),
        text(MAX_RELAY_ID_LEN),
        text(MAX_REGION_LEN),
        any::<u16>(),
        any::<u32>(),
        coords(),
    )
        .prop_map(
            |(nonce, sent_us, relay_id, region, load, origin_rtt_us, coords)| Pong {
                nonce,
                sent_us,
                relay_id,
                region,
                load,
                origin_rtt_us,
                coords,
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        hello().prop_map(Message::from),
        welcome().prop_map(Message::from),
        (any::<u16>(), text(MAX_TEXT_LEN)).prop_map(|(code, message)| Message::from(Error {
            code: ErrorCode::from_code(code),
            message
        })),
        (
            text(MAX_TEXT_LEN),
            prop::option::of(text(MAX_ADDR_LEN)),
            any::<u32>()
        )
            .prop_map(|(reason, redirect, deadline_ms)| Message::from(Goaway {
                reason,
                redirect,
                deadline_ms
            })),
        (
            text(MAX_WORLD_LEN),
            bytes(MAX_TOKEN_LEN),
            text(MAX_RELAY_ID_LEN)
        )
            .prop_map(|(world, auth, relay_id)| Message::from(Subscribe {
                version: VERSION,
                world,
                auth,
                relay_id
            })),
        update().prop_map(Message::from),
        tick().prop_map(|tick| Message::from(Ack { tick })),
        input().prop_map(Message::from),
        input_batch().prop_map(Message::from),
        prop::option::of((-1e6f32..1e6, -1e6f32..1e6, 0f32..1e4)).prop_map(|area| {
            Message::from(Interest {
                area: area.map(|(x, y, radius)| Area { x, y, radius }),
            })
        }),
        prop::collection::vec(relay_info(), 0..6)
            .prop_map(|relays| Message::from(Directory { relays })),
        any::<(u64, u64)>().prop_map(|(nonce, sent_us)| Message::from(Ping {
            version: VERSION,
            nonce,
            sent_us
        })),
        pong().prop_map(Message::from),
    ]
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    msg.encode(&mut out).expect("generated messages are valid");
    out
}

/// Whatever decodes must encode, and decode again to the same message.
fn assert_canonical(msg: &Message) {
    let bytes = frame(msg);
    assert_eq!(bytes.len(), msg.encoded_len());
    let (again, used) = decode_frame(&bytes, VERSION).unwrap().unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!(&again, msg);
    if msg.message_type().datagram() {
        let mut out = Vec::new();
        msg.encode_datagram(&mut out).unwrap();
        assert_eq!(Message::decode_datagram(&out[..], VERSION).unwrap(), *msg);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips_framed(msg in message()) {
        let bytes = frame(&msg);
        prop_assert_eq!(bytes.len(), msg.encoded_len());
        prop_assert!(bytes.len() - msg.datagram_len() <= 4);
        let (decoded, used) = decode_frame(&bytes, VERSION).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&decoded, &msg);
        // The Buf-based decoder, from a slice and from shared bytes.
        let mut slice = &bytes[..];
        prop_assert_eq!(&Message::decode(&mut slice, VERSION).unwrap(), &msg);
        prop_assert!(slice.is_empty());
        let mut shared = Bytes::from(bytes.clone());
        prop_assert_eq!(&Message::decode(&mut shared, VERSION).unwrap(), &msg);
        prop_assert!(shared.is_empty());
    }

    #[test]
    fn datagram_types_round_trip_as_datagrams(msg in message()) {
        let mut out = Vec::new();
        let result = msg.encode_datagram(&mut out);
        if msg.message_type().datagram() {
            prop_assert!(result.is_ok());
            prop_assert_eq!(out.len(), msg.datagram_len());
            prop_assert_eq!(Message::decode_datagram(&out[..], VERSION).unwrap(), msg.clone());
            prop_assert_eq!(
                Message::decode_datagram(Bytes::from(out.clone()), VERSION).unwrap(),
                msg.clone()
            );
            // A datagram's strict prefixes never decode: they are cut short.
            for cut in 0..out.len() {
                prop_assert!(Message::decode_datagram(&out[..cut], VERSION).is_err());
            }
        } else {
            prop_assert_eq!(result, Err(EncodeError::NotDatagram(msg.message_type().to_u8())));
            prop_assert!(out.is_empty());
            // Its framed body with a bare type byte is refused as a datagram.
            let bytes = frame(&msg);
            let header = FrameHeader::peek(&bytes).unwrap().unwrap();
            prop_assert_eq!(
                Message::decode_datagram(&bytes[header.prefix_len..], VERSION),
                Err(DecodeError::NotDatagram(msg.message_type().to_u8()))
            );
        }
    }

    #[test]
    fn every_strict_prefix_is_incomplete(msg in message()) {
        let bytes = frame(&msg);
        for cut in 0..bytes.len() {
            let prefix = &bytes[..cut];
            prop_assert_eq!(decode_frame(prefix, VERSION), Ok(None), "cut at {}", cut);
            prop_assert_eq!(
                Message::decode(&mut &prefix[..], VERSION),
                Err(DecodeError::Incomplete),
                "cut at {}",
                cut
            );
        }
    }

    #[test]
    fn frame_reader_reassembles_any_split(
        msgs in prop::collection::vec(message(), 1..5),
        splits in prop::collection::vec(1usize..40, 1..50),
    ) {
        let stream: Vec<u8> = msgs.iter().flat_map(frame).collect();
        let mut reader = FrameReader::new(VERSION);
        let mut got = Vec::new();
        let mut at = 0;
        let mut sizes = splits.iter().cycle();
        while at < stream.len() {
            let end = (at + sizes.next().unwrap()).min(stream.len());
            reader.extend_from_slice(&stream[at..end]);
            at = end;
            while let Some(msg) = reader.next_message().unwrap() {
                got.push(msg);
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_untrusted(&bytes);
    }

    #[test]
    fn random_bytes_with_a_valid_header_never_panic(
        ty in prop::sample::select(MessageType::ALL.to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let len = VarInt::from_u64(1 + body.len() as u64).unwrap();
        let mut bytes = Vec::new();
        len.encode(&mut bytes);
        bytes.push(ty.to_u8());
        bytes.extend_from_slice(&body);
        check_untrusted(&bytes);
        check_untrusted(&bytes[len.size()..]);
    }

    #[test]
    fn mutated_encodings_never_panic(
        msg in message(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = frame(&msg);
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        check_untrusted(&bytes);
        let end = cut.index(bytes.len() + 1);
        check_untrusted(&bytes[..end]);
        if msg.message_type().datagram() {
            let mut dgram = Vec::new();
            msg.encode_datagram(&mut dgram).unwrap();
            let i = cut.index(dgram.len());
            dgram[i] ^= 0x5a;
            check_untrusted(&dgram);
        }
    }

    #[test]
    fn pong_is_never_larger_than_the_ping_it_answers(
        pong in pong(),
        ping_len in 0usize..200,
        long_id in text(64),
    ) {
        let mut out = Vec::new();
        match pong.encode_reply(ping_len, &mut out) {
            Ok(()) => prop_assert!(out.len() <= ping_len),
            Err(_) => prop_assert!(out.is_empty()),
        }
        // Any valid pong fits any ping that a relay accepts.
        out.clear();
        pong.encode_reply(PING_LEN, &mut out).unwrap();
        prop_assert!(out.len() <= MAX_PONG_LEN && MAX_PONG_LEN <= PING_LEN);
        prop_assert_eq!(Message::decode_datagram(&out[..], VERSION).unwrap(), Message::Pong(pong.clone()));
        // An oversized id is refused, not sent.
        let bad = Pong { relay_id: long_id.clone(), ..pong };
        out.clear();
        let result = bad.encode_reply(usize::MAX, &mut out);
        prop_assert_eq!(result.is_ok(), long_id.len() <= MAX_RELAY_ID_LEN);
        if result.is_err() {
            prop_assert!(out.is_empty());
        }
    }

    #[test]
    fn any_decodable_ping_can_be_answered(
        nonce in any::<u64>(),
        sent_us in any::<u64>(),
        extra in 0usize..(MAX_PING_LEN - PING_LEN),
        pong in pong(),
    ) {
        let mut dgram = Vec::new();
        Message::from(Ping { version: VERSION, nonce, sent_us }).encode_datagram(&mut dgram).unwrap();
        prop_assert_eq!(dgram.len(), PING_LEN);
        dgram.resize(PING_LEN + extra, 0xee);
        let Message::Ping(ping) = Message::decode_datagram(&dgram[..], VERSION).unwrap() else {
            panic!("not a ping");
        };
        prop_assert_eq!((ping.nonce, ping.sent_us), (nonce, sent_us));
        let reply = Pong { nonce: ping.nonce, sent_us: ping.sent_us, ..pong };
        let mut out = Vec::new();
        reply.encode_reply(dgram.len(), &mut out).unwrap();
        prop_assert!(out.len() <= dgram.len());
        // One byte short of a ping is no ping.
        prop_assert!(Message::decode_datagram(&dgram[..PING_LEN - 1], VERSION).is_err());
    }
}

/// Feeds untrusted bytes to every decoder: none may panic, and whatever
/// decodes must be canonical.
fn check_untrusted(bytes: &[u8]) {
    if let Ok(Some((msg, used))) = decode_frame(bytes, VERSION) {
        assert!(used <= bytes.len());
        assert_canonical(&msg);
    }
    let mut cur = bytes;
    if let Ok(msg) = Message::decode(&mut cur, VERSION) {
        assert_canonical(&msg);
    }
    if let Ok(msg) = Message::decode_datagram(bytes, VERSION) {
        assert!(msg.message_type().datagram());
        assert_canonical(&msg);
    }
    let mut reader = FrameReader::new(VERSION);
    reader.extend_from_slice(bytes);
    for _ in 0..bytes.len() + 1 {
        match reader.next_message() {
            Ok(Some(msg)) => assert_canonical(&msg),
            Ok(None) | Err(_) => break,
        }
    }
}

#[test]
fn byte_fields_share_the_datagram_buffer() {
    let update = Update {
        tick: 10,
        base: Some(8),
        predict_from: Some(5),
        origin_time_us: 1,
        hash: 2,
        chunks: vec![Chunk {
            cell: CellId { x: 1, y: -1 },
            data: Bytes::from_static(b"delta bytes"),
        }],
        dropped: vec![],
    };
    let mut out = bytes::BytesMut::new();
    Message::from(update.clone())
        .encode_datagram(&mut out)
        .unwrap();
    let dgram = out.freeze();
    let Message::Update(decoded) = Message::decode_datagram(dgram.clone(), VERSION).unwrap() else {
        panic!("not an update");
    };
    assert_eq!(decoded, update);
    let range = dgram.as_ptr_range();
    assert!(range.contains(&decoded.chunks[0].data.as_ptr()));
    // BufMut into a fixed slice: too small is an error, not a panic.
    let mut small = [0u8; 8];
    let mut slot = &mut small[..];
    assert!(matches!(
        Message::from(update).encode_datagram(&mut slot),
        Err(EncodeError::BufferTooSmall { .. })
    ));
    let mut fit = [0u8; 16];
    let mut slot = &mut fit[..];
    Message::from(Ack { tick: 70000 })
        .encode(&mut slot)
        .unwrap();
    assert_eq!(slot.remaining_mut(), 16 - 6);
}
