//! Limits, versions and stable numbers of the message layer: oversized
//! declarations are refused before anything is allocated, every type's
//! limit is what its largest message takes, and the wire numbers never move.

use bytes::Bytes;
use statecast_proto::msg::*;
use statecast_proto::wire::{Encode, VarInt, put_bytes};
use statecast_proto::{Component, Encoding, Field, Schema};

fn varint(x: u64, out: &mut Vec<u8>) {
    VarInt::from_u64(x).unwrap().encode(out);
}

/// A frame around a hand-written body.
fn frame(ty: MessageType, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(1 + body.len() as u64, &mut out);
    out.push(ty.to_u8());
    out.extend_from_slice(body);
    out
}

fn schema() -> Schema {
    Schema {
        name: "cubes".into(),
        components: vec![Component {
            name: "transform".into(),
            fields: vec![Field {
                name: "x".into(),
                encoding: Encoding::Float {
                    min: -10.0,
                    max: 10.0,
                    bits: 12,
                },
            }],
        }],
        position: None,
        max_entities: 100,
    }
}

fn welcome() -> Welcome {
    Welcome {
        version: VERSION,
        session: 7,
        world: "cubes".into(),
        schema: schema(),
        tick_rate: 30,
        tick: 1234,
        relay_id: "relay-1".into(),
        region: "eu-west".into(),
    }
}

fn encode(msg: impl Into<Message>) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    let result = msg.into().encode(&mut out);
    if result.is_err() {
        assert!(out.is_empty(), "a refused message writes nothing");
    }
    result.map(|()| out)
}

#[test]
fn a_frame_declaring_2_pow_60_bytes_is_refused_at_its_header() {
    let mut bytes = Vec::new();
    varint(1 << 60, &mut bytes);
    let refused = Err(DecodeError::TooLarge {
        what: "frame",
        len: 1 << 60,
        max: MAX_FRAME as u64,
    });
    assert_eq!(decode_frame(&bytes, VERSION).map(|_| ()), refused);
    assert_eq!(
        Message::decode(&mut &bytes[..], VERSION).map(|_| ()),
        refused
    );
    let mut reader = FrameReader::new(VERSION);
    reader.extend_from_slice(&bytes);
    assert_eq!(reader.next_message().map(|_| ()), refused);
    // Just above the global limit.
    let mut bytes = Vec::new();
    varint(MAX_FRAME as u64 + 1, &mut bytes);
    assert!(matches!(
        decode_frame(&bytes, VERSION),
        Err(DecodeError::TooLarge { what: "frame", .. })
    ));
}

#[test]
fn a_frame_above_its_types_limit_is_refused_before_its_body_arrives() {
    for ty in MessageType::ALL {
        let mut bytes = Vec::new();
        varint(ty.max_len() as u64 + 1, &mut bytes);
        bytes.push(ty.to_u8());
        let result = decode_frame(&bytes, VERSION);
        if ty.max_len() < MAX_FRAME {
            assert_eq!(
                result.map(|_| ()),
                Err(DecodeError::TooLarge {
                    what: ty.name(),
                    len: ty.max_len() as u64 + 1,
                    max: ty.max_len() as u64,
                }),
                "{ty:?}"
            );
        } else {
            assert!(matches!(
                result,
                Err(DecodeError::TooLarge { what: "frame", .. })
            ));
        }
        // At the limit, the header is fine and the reader waits for the body.
        let mut bytes = Vec::new();
        varint(ty.max_len() as u64, &mut bytes);
        bytes.push(ty.to_u8());
        assert_eq!(decode_frame(&bytes, VERSION), Ok(None), "{ty:?}");
    }
}

#[test]
fn bad_headers_are_refused() {
    assert_eq!(
        decode_frame(&[0], VERSION).map(|_| ()),
        Err(DecodeError::BadValue {
            what: "frame length 0 (no type byte)"
        })
    );
    assert_eq!(
        decode_frame(&[1, 0x7f], VERSION).map(|_| ()),
        Err(DecodeError::UnknownType(0x7f))
    );
    assert_eq!(
        Message::decode_datagram(&[0x7f][..], VERSION),
        Err(DecodeError::UnknownType(0x7f))
    );
    assert_eq!(
        Message::decode_datagram(&[][..], VERSION),
        Err(DecodeError::Truncated)
    );
    assert_eq!(
        Message::decode_datagram(&[MessageType::Hello.to_u8()][..], VERSION),
        Err(DecodeError::NotDatagram(MessageType::Hello.to_u8()))
    );
}

#[test]
fn declared_lengths_and_counts_inside_a_body_are_checked_first() {
    // A hello whose token claims 2^40 bytes.
    let mut body = Vec::new();
    varint(VERSION.into(), &mut body);
    varint(1 << 40, &mut body);
    assert_eq!(
        decode_frame(&frame(MessageType::Hello, &body), VERSION).map(|_| ()),
        Err(DecodeError::TooLarge {
            what: "hello token",
            len: 1 << 40,
            max: MAX_TOKEN_LEN as u64
        })
    );
    // A token within its limit but longer than the frame: truncated.
    let mut body = Vec::new();
    varint(VERSION.into(), &mut body);
    varint(1000, &mut body);
    body.extend_from_slice(&[0; 10]);
    assert_eq!(
        decode_frame(&frame(MessageType::Hello, &body), VERSION).map(|_| ()),
        Err(DecodeError::Truncated)
    );
    // An update with more chunks than allowed, and one whose chunk count
    // exceeds what its bytes could hold (refused before the Vec is made).
    let update_head = |count: u64| {
        let mut body = Vec::new();
        varint(5, &mut body); // tick
        varint(0, &mut body); // keyframe
        varint(0, &mut body); // no prediction
        body.extend_from_slice(&[0; 16]); // time, hash
        varint(count, &mut body);
        body
    };
    assert_eq!(
        decode_frame(
            &frame(MessageType::Update, &update_head(MAX_CHUNKS as u64 + 1)),
            VERSION
        )
        .map(|_| ()),
        Err(DecodeError::TooLarge {
            what: "update chunks",
            len: MAX_CHUNKS as u64 + 1,
            max: MAX_CHUNKS as u64
        })
    );
    assert_eq!(
        decode_frame(
            &frame(MessageType::Update, &update_head(MAX_CHUNKS as u64)),
            VERSION
        )
        .map(|_| ()),
        Err(DecodeError::Truncated)
    );
    // A directory of 257 relays, an input batch above its count.
    let mut body = Vec::new();
    varint(MAX_RELAYS as u64 + 1, &mut body);
    assert!(matches!(
        decode_frame(&frame(MessageType::Directory, &body), VERSION),
        Err(DecodeError::TooLarge {
            what: "directory relays",
            ..
        })
    ));
    let mut body = Vec::new();
    varint(1, &mut body);
    varint(MAX_BATCH_INPUTS as u64 + 1, &mut body);
    assert!(matches!(
        decode_frame(&frame(MessageType::InputBatch, &body), VERSION),
        Err(DecodeError::TooLarge {
            what: "batched inputs",
            ..
        })
    ));
    // Five redundant inputs.
    let mut body = Vec::new();
    varint(9, &mut body);
    varint(5, &mut body);
    body.extend_from_slice(&[0; 5]);
    assert!(matches!(
        Message::decode_datagram(&frame(MessageType::Input, &body)[1..], VERSION),
        Err(DecodeError::TooLarge { what: "inputs", .. })
    ));
}

#[test]
fn semantic_checks_on_decode() {
    let decode = |ty, body: &[u8]| decode_frame(&frame(ty, body), VERSION).map(|_| ());
    // Baseline before tick 0.
    let mut body = Vec::new();
    varint(5, &mut body);
    varint(6, &mut body);
    varint(0, &mut body);
    body.extend_from_slice(&[0; 16]);
    varint(0, &mut body);
    assert!(matches!(
        decode(MessageType::Update, &body),
        Err(DecodeError::BadValue { .. })
    ));
    // Prediction without a baseline.
    let mut body = Vec::new();
    varint(5, &mut body);
    varint(0, &mut body);
    varint(1, &mut body);
    body.extend_from_slice(&[0; 16]);
    varint(0, &mut body);
    assert!(matches!(
        decode(MessageType::Update, &body),
        Err(DecodeError::BadValue { .. })
    ));
    // An input message with no input.
    assert!(matches!(
        decode(MessageType::Input, &[1, 0]),
        Err(DecodeError::BadValue { .. })
    ));
    // A flag that is neither 0 nor 1 (goaway redirect).
    assert!(matches!(
        decode(MessageType::Goaway, &[0, 2, 0]),
        Err(DecodeError::BadValue { .. })
    ));
    // Bad UTF-8 in an error message.
    assert_eq!(
        decode(MessageType::Error, &[5, 2, 0xc3, 0x28]),
        Err(DecodeError::BadUtf8 {
            what: "error message"
        })
    );
    // Trailing bytes after the last field.
    assert_eq!(
        decode(MessageType::Ack, &[5, 0]),
        Err(DecodeError::TrailingBytes(1))
    );
    // Non-finite coordinates in a pong.
    let mut pong = Vec::new();
    Message::from(Pong {
        nonce: 1,
        sent_us: 2,
        relay_id: "r".into(),
        region: "eu".into(),
        load: 3,
        origin_rtt_us: 4,
        coords: Some([1.0, 2.0, 3.0]),
    })
    .encode_datagram(&mut pong)
    .unwrap();
    let at = pong.len() - 4;
    pong[at..].copy_from_slice(&f32::NAN.to_be_bytes());
    assert!(matches!(
        Message::decode_datagram(&pong[..], VERSION),
        Err(DecodeError::BadValue { .. })
    ));
}

#[test]
fn versions_are_arguments_and_mismatches_are_refused() {
    let bytes = encode(welcome()).unwrap();
    assert_eq!(
        decode_frame(&bytes, 2),
        Err(DecodeError::UnsupportedVersion(2))
    );
    assert_eq!(
        Message::decode_datagram(&[MessageType::Ack.to_u8(), 0][..], 0),
        Err(DecodeError::UnsupportedVersion(0))
    );
    assert_eq!(
        FrameReader::new(3).next_message(),
        Err(DecodeError::UnsupportedVersion(3))
    );
    // A hello, a welcome, a subscribe and a ping stating another version.
    let hello = Hello {
        version: 2,
        token: Bytes::from_static(b"t"),
        world: "w".into(),
        resume: None,
        agent: "a".into(),
        interest: None,
    };
    let subscribe = Subscribe {
        version: 9,
        world: "w".into(),
        auth: Bytes::new(),
        relay_id: "r".into(),
    };
    let ping = Ping {
        version: u32::MAX,
        nonce: 1,
        sent_us: 2,
    };
    for (msg, stated) in [
        (Message::from(hello), 2),
        (
            Message::from(Welcome {
                version: 0,
                ..welcome()
            }),
            0,
        ),
        (Message::from(subscribe), 9),
        (Message::from(ping), u32::MAX),
    ] {
        let bytes = encode(msg.clone()).unwrap();
        let err = decode_frame(&bytes, VERSION).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedVersion(stated));
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
    }
}

#[test]
fn welcome_schemas_are_checked_on_both_ends() {
    // Encode: a schema that does not compile is refused.
    let mut bad = welcome();
    bad.schema.max_entities = 0;
    assert!(matches!(encode(bad.clone()), Err(EncodeError::Schema(_))));
    // Decode: the same schema, written by hand, is a clear schema error.
    let raw = postcard::to_allocvec(&bad.schema).unwrap();
    let mut body = Vec::new();
    varint(VERSION.into(), &mut body);
    body.extend_from_slice(&7u64.to_be_bytes());
    put_bytes(&mut body, b"cubes");
    put_bytes(&mut body, &raw);
    varint(30, &mut body);
    varint(1234, &mut body);
    put_bytes(&mut body, b"relay-1");
    put_bytes(&mut body, b"eu-west");
    let err = decode_frame(&frame(MessageType::Welcome, &body), VERSION).unwrap_err();
    assert!(matches!(err, DecodeError::Schema(_)), "{err:?}");
    assert!(err.to_string().contains("max_entities"), "{err}");
    // Garbage in place of the schema.
    let mut body = Vec::new();
    varint(VERSION.into(), &mut body);
    body.extend_from_slice(&7u64.to_be_bytes());
    put_bytes(&mut body, b"cubes");
    put_bytes(&mut body, &[0xff; 5]);
    assert!(matches!(
        decode_frame(&frame(MessageType::Welcome, &body), VERSION),
        Err(DecodeError::SchemaEncoding(_))
    ));
    // A schema above MAX_SCHEMA_LEN is refused by the encoder.
    let mut huge = welcome();
    huge.schema.components = (0..600)
        .map(|i| Component {
            name: format!("{i:0>60}"),
            fields: vec![],
        })
        .collect();
    huge.schema.components[0].fields = schema().components[0].fields.clone();
    assert!(matches!(
        encode(huge),
        Err(EncodeError::TooLarge { what: "schema", .. })
    ));
    // Tick rate 0.
    assert!(matches!(
        encode(Welcome {
            tick_rate: 0,
            ..welcome()
        }),
        Err(EncodeError::BadValue { .. })
    ));
}

#[test]
fn encoders_refuse_what_decoders_would_refuse() {
    let hello = Hello {
        version: VERSION,
        token: Bytes::from(vec![0; MAX_TOKEN_LEN + 1]),
        world: "w".into(),
        resume: None,
        agent: String::new(),
        interest: None,
    };
    assert_eq!(
        encode(hello),
        Err(EncodeError::TooLarge {
            what: "hello token",
            len: MAX_TOKEN_LEN as u64 + 1,
            max: MAX_TOKEN_LEN as u64
        })
    );
    let update = Update {
        tick: 10,
        base: Some(10),
        predict_from: None,
        origin_time_us: 0,
        hash: 0,
        chunks: vec![],
        dropped: vec![],
    };
    assert!(matches!(
        encode(update.clone()),
        Err(EncodeError::BadValue { .. })
    ));
    let update = Update {
        base: Some(4),
        predict_from: Some(4),
        ..update
    };
    assert!(matches!(
        encode(update.clone()),
        Err(EncodeError::BadValue { .. })
    ));
    let keyframe = Update {
        base: None,
        predict_from: Some(1),
        ..update
    };
    assert!(matches!(
        encode(keyframe.clone()),
        Err(EncodeError::BadValue { .. })
    ));
    let far = Update {
        tick: 1 << 62,
        base: None,
        predict_from: None,
        ..keyframe
    };
    assert!(matches!(
        encode(far.clone()),
        Err(EncodeError::TooLarge { .. })
    ));
    // Five chunks of 1 MiB: each is fine, the whole is above MAX_FRAME.
    let big = Update {
        tick: 1,
        chunks: (0..5)
            .map(|i| Chunk {
                cell: CellId { x: i, y: 0 },
                data: Bytes::from(vec![0; 1 << 20]),
            })
            .collect(),
        ..far
    };
    assert!(matches!(
        encode(big),
        Err(EncodeError::TooLarge { what: "update", .. })
    ));
    assert!(matches!(
        encode(Input {
            seq: 1,
            inputs: vec![]
        }),
        Err(EncodeError::BadValue { .. })
    ));
    assert!(matches!(
        encode(Input {
            seq: 1,
            inputs: vec![Bytes::from(vec![0; MAX_INPUT_LEN + 1])]
        }),
        Err(EncodeError::TooLarge { what: "input", .. })
    ));
    let relay = RelayInfo {
        id: "r".into(),
        addr: "a".into(),
        probe_addr: "p".into(),
        region: "x".into(),
        load: 0,
        origin_rtt_us: u32::MAX,
        coords: Some([0.0, f32::INFINITY, 0.0]),
    };
    assert!(matches!(
        encode(Directory {
            relays: vec![relay]
        }),
        Err(EncodeError::BadValue { .. })
    ));
    let error = Error {
        code: ErrorCode::Internal,
        message: "x".repeat(MAX_TEXT_LEN + 1),
    };
    assert!(matches!(encode(error), Err(EncodeError::TooLarge { .. })));
    let pong = Pong {
        nonce: 0,
        sent_us: 0,
        relay_id: "r".repeat(MAX_RELAY_ID_LEN + 1),
        region: String::new(),
        load: 0,
        origin_rtt_us: 0,
        coords: None,
    };
    assert!(pong.encode_reply(PING_LEN, &mut Vec::new()).is_err());
    let pong = Pong {
        relay_id: "r".into(),
        ..pong
    };
    assert_eq!(
        pong.encode_reply(20, &mut Vec::new()),
        Err(EncodeError::Amplification {
            reply: Message::from(pong.clone()).datagram_len(),
            request: 20
        })
    );
}

/// Largest value of every field, to show that each type's limit is exactly
/// what its largest message takes.
#[test]
fn type_limits_are_exactly_the_largest_messages() {
    let s = |n: usize| "s".repeat(n);
    let b = |n: usize| Bytes::from(vec![0xab; n]);
    let max_tick = VarInt::MAX.into_inner();
    let coords = Some([1.0, 2.0, 3.0]);
    let messages = [
        Message::from(Hello {
            version: u32::MAX,
            token: b(MAX_TOKEN_LEN),
            world: s(MAX_WORLD_LEN),
            resume: Some(Resume {
                session: u64::MAX,
                last_ack: max_tick,
                cells: vec![
                    CellId {
                        x: i32::MIN,
                        y: i32::MAX
                    };
                    MAX_RESUME_CELLS
                ],
            }),
            agent: s(MAX_AGENT_LEN),
            interest: Some(Area {
                x: 1.0,
                y: 2.0,
                radius: 3.0,
            }),
        }),
        Message::from(Error {
            code: ErrorCode::Unknown(u16::MAX),
            message: s(MAX_TEXT_LEN),
        }),
        Message::from(Goaway {
            reason: s(MAX_TEXT_LEN),
            redirect: Some(s(MAX_ADDR_LEN)),
            deadline_ms: u32::MAX,
        }),
        Message::from(Subscribe {
            version: u32::MAX,
            world: s(MAX_WORLD_LEN),
            auth: b(MAX_TOKEN_LEN),
            relay_id: s(MAX_RELAY_ID_LEN),
        }),
        Message::from(Ack { tick: max_tick }),
        Message::from(Input {
            seq: u32::MAX,
            inputs: vec![b(MAX_INPUT_LEN); MAX_INPUT_REDUNDANCY],
        }),
        Message::from(InputBatch {
            tick: max_tick,
            inputs: vec![
                SessionInput {
                    session: u64::MAX,
                    seq: u32::MAX,
                    data: b(MAX_INPUT_LEN),
                };
                MAX_BATCH_INPUTS
            ],
        }),
        Message::from(Directory {
            relays: vec![
                RelayInfo {
                    id: s(MAX_RELAY_ID_LEN),
                    addr: s(MAX_ADDR_LEN),
                    probe_addr: s(MAX_ADDR_LEN),
                    region: s(MAX_REGION_LEN),
                    load: u16::MAX,
                    origin_rtt_us: u32::MAX,
                    coords,
                };
                MAX_RELAYS
            ],
        }),
        Message::from(Pong {
            nonce: u64::MAX,
            sent_us: u64::MAX,
            relay_id: s(MAX_RELAY_ID_LEN),
            region: s(MAX_REGION_LEN),
            load: u16::MAX,
            origin_rtt_us: u32::MAX,
            coords,
        }),
    ];
    for msg in &messages {
        let ty = msg.message_type();
        assert_eq!(msg.datagram_len(), ty.max_len(), "{ty:?}");
        let bytes = encode(msg.clone()).unwrap();
        assert_eq!(bytes.len(), msg.encoded_len());
        // Those that state no version decode at their limit.
        if !matches!(ty, MessageType::Hello | MessageType::Subscribe) {
            let (back, _) = decode_frame(&bytes, VERSION).unwrap().unwrap();
            assert_eq!(&back, msg);
        }
    }
    // Update and Welcome are bounded by MAX_FRAME and MAX_SCHEMA_LEN.
    assert_eq!(MessageType::Update.max_len(), MAX_FRAME);
    assert!(MessageType::Welcome.max_len() > MAX_SCHEMA_LEN);
    assert!(MessageType::Welcome.max_len() < MAX_SCHEMA_LEN + 300);
    // A ping is always PING_LEN on the wire and a relay answers up to
    // MAX_PING_LEN.
    let ping = Message::from(Ping {
        version: u32::MAX,
        nonce: u64::MAX,
        sent_us: u64::MAX,
    });
    assert_eq!(ping.datagram_len(), PING_LEN);
    assert_eq!(MessageType::Ping.max_len(), MAX_PING_LEN);
    let mut big_ping = Vec::new();
    Message::from(Ping {
        version: VERSION,
        nonce: 1,
        sent_us: 1,
    })
    .encode_datagram(&mut big_ping)
    .unwrap();
    big_ping.resize(MAX_PING_LEN, 0);
    assert!(Message::decode_datagram(&big_ping[..], VERSION).is_ok());
    big_ping.push(0);
    assert!(matches!(
        Message::decode_datagram(&big_ping[..], VERSION),
        Err(DecodeError::TooLarge { what: "ping", .. })
    ));
}

#[test]
fn message_type_bytes_are_pinned() {
    let pinned = [
        (MessageType::Hello, 0x01, "hello", false),
        (MessageType::Welcome, 0x02, "welcome", false),
        (MessageType::Error, 0x03, "error", false),
        (MessageType::Goaway, 0x04, "goaway", false),
        (MessageType::Subscribe, 0x05, "subscribe", false),
        (MessageType::Update, 0x10, "update", true),
        (MessageType::Ack, 0x11, "ack", true),
        (MessageType::Input, 0x12, "input", true),
        (MessageType::InputBatch, 0x13, "input_batch", false),
        (MessageType::Interest, 0x14, "interest", false),
        (MessageType::Directory, 0x20, "directory", false),
        (MessageType::Ping, 0x30, "ping", true),
        (MessageType::Pong, 0x31, "pong", true),
    ];
    assert_eq!(pinned.len(), MessageType::ALL.len());
    for (i, (ty, byte, name, datagram)) in pinned.into_iter().enumerate() {
        assert_eq!(MessageType::ALL[i], ty);
        assert_eq!(ty.to_u8(), byte, "{ty:?}");
        assert_eq!(ty.name(), name);
        assert_eq!(ty.datagram(), datagram, "{ty:?}");
    }
    for byte in 0..=u8::MAX {
        match MessageType::from_u8(byte) {
            Some(ty) => assert_eq!(ty.to_u8(), byte),
            None => assert!(pinned.iter().all(|p| p.1 != byte)),
        }
    }
    assert_eq!(VERSION, 1);
}

#[test]
fn error_codes_are_pinned() {
    use Retry::*;
    let pinned = [
        (ErrorCode::Normal, 0, "normal", Never, Fault::Nobody),
        (
            ErrorCode::UnsupportedVersion,
            1,
            "unsupported_version",
            Never,
            Fault::Recipient,
        ),
        (
            ErrorCode::BadToken,
            2,
            "bad_token",
            NewToken,
            Fault::Recipient,
        ),
        (
            ErrorCode::TokenExpired,
            3,
            "token_expired",
            NewToken,
            Fault::Recipient,
        ),
        (
            ErrorCode::UnknownWorld,
            4,
            "unknown_world",
            Never,
            Fault::Recipient,
        ),
        (
            ErrorCode::Malformed,
            5,
            "malformed",
            Never,
            Fault::Recipient,
        ),
        (ErrorCode::TooLarge, 6, "too_large", Never, Fault::Recipient),
        (
            ErrorCode::RateLimited,
            7,
            "rate_limited",
            Later,
            Fault::Recipient,
        ),
        (
            ErrorCode::Overloaded,
            8,
            "overloaded",
            Elsewhere,
            Fault::Sender,
        ),
        (ErrorCode::Draining, 9, "draining", Elsewhere, Fault::Sender),
        (
            ErrorCode::UpstreamLost,
            10,
            "upstream_lost",
            Elsewhere,
            Fault::Sender,
        ),
        (
            ErrorCode::Internal,
            11,
            "internal",
            Elsewhere,
            Fault::Sender,
        ),
        (
            ErrorCode::HashMismatch,
            12,
            "hash_mismatch",
            Elsewhere,
            Fault::Recipient,
        ),
        (
            ErrorCode::ProtocolViolation,
            13,
            "protocol_violation",
            Never,
            Fault::Recipient,
        ),
        (
            ErrorCode::IdleTimeout,
            14,
            "idle_timeout",
            Later,
            Fault::Recipient,
        ),
    ];
    assert_eq!(pinned.len(), ErrorCode::ALL.len());
    for (i, (code, number, name, retry, fault)) in pinned.into_iter().enumerate() {
        assert_eq!(ErrorCode::ALL[i], code);
        assert_eq!(code.to_code(), number, "{code:?}");
        assert_eq!(ErrorCode::from_code(number), code);
        assert_eq!(code.name(), name);
        assert_eq!(code.retry(), retry, "{code:?}");
        assert_eq!(code.retry_elsewhere(), retry == Elsewhere);
        assert_eq!(code.fault(), fault, "{code:?}");
        assert_eq!(code.to_string(), format!("{name} ({number})"));
    }
    for number in 0..=u16::MAX {
        let code = ErrorCode::from_code(number);
        assert_eq!(code.to_code(), number);
        if usize::from(number) >= pinned.len() {
            assert_eq!(code, ErrorCode::Unknown(number));
            assert_eq!(code.retry(), Later);
            assert_eq!(code.fault(), Fault::Unknown);
        }
    }
    // Unknown codes travel and come back as they were.
    let bytes = encode(Error {
        code: ErrorCode::Unknown(999),
        message: "from the future".into(),
    })
    .unwrap();
    let (msg, _) = decode_frame(&bytes, VERSION).unwrap().unwrap();
    assert_eq!(
        msg,
        Message::from(Error {
            code: ErrorCode::Unknown(999),
            message: "from the future".into()
        })
    );
    // Decode errors say how to close.
    assert_eq!(DecodeError::Truncated.code(), ErrorCode::Malformed);
    assert_eq!(
        DecodeError::TooLarge {
            what: "x",
            len: 2,
            max: 1
        }
        .code(),
        ErrorCode::TooLarge
    );
}

#[test]
fn frame_encoding_is_byte_exact() {
    // One pinned encoding per layer, so that no refactor moves a byte.
    let bytes = encode(Ack { tick: 300 }).unwrap();
    assert_eq!(bytes, [3, 0x11, 0x41, 0x2c]);
    let bytes = encode(Update {
        tick: 100,
        base: Some(98),
        predict_from: Some(97),
        origin_time_us: 1,
        hash: 2,
        chunks: vec![
            Chunk {
                cell: CellId::WORLD,
                data: Bytes::from_static(b"ab"),
            },
            Chunk {
                cell: CellId { x: -1, y: 1 },
                data: Bytes::new(),
            },
        ],
        dropped: vec![CellId { x: 0, y: 0 }],
    })
    .unwrap();
    let mut expected = vec![32, 0x10, 0x40, 100, 2, 1];
    expected.extend_from_slice(&1u64.to_be_bytes());
    expected.extend_from_slice(&2u64.to_be_bytes());
    expected.push(2);
    expected.push(0);
    expected.extend_from_slice(&[2, b'a', b'b']);
    expected.extend_from_slice(&[2, 2]);
    expected.push(0);
    expected.extend_from_slice(&[1, 1, 0]);
    assert_eq!(bytes, expected);
}
