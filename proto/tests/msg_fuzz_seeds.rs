//! Golden encodings: one sample of every message, framed and as a datagram,
//! kept in `proto/fuzz/seeds/` where they seed the fuzzers. The test fails
//! when an encoding moves, since peers of one `VERSION` must agree byte for
//! byte. After an intended change of the wire format (a new `VERSION` once
//! statecast has users), rewrite the files with
//! `STATECAST_WRITE_SEEDS=1 cargo test -p statecast-proto --test msg_fuzz_seeds`.

use std::path::PathBuf;

use bytes::Bytes;
use statecast_proto::msg::*;
use statecast_proto::{Component, Encoding, Field, Position, Schema};

fn schema() -> Schema {
    Schema {
        name: "cubes".into(),
        components: vec![
            Component {
                name: "transform".into(),
                fields: vec![
                    Field {
                        name: "x".into(),
                        encoding: Encoding::Float {
                            min: -100.0,
                            max: 100.0,
                            bits: 16,
                        },
                    },
                    Field {
                        name: "y".into(),
                        encoding: Encoding::Int { min: -5, max: 1000 },
                    },
                    Field {
                        name: "rot".into(),
                        encoding: Encoding::Quat { bits: 9 },
                    },
                ],
            },
            Component {
                name: "meta".into(),
                fields: vec![
                    Field {
                        name: "on".into(),
                        encoding: Encoding::Bool,
                    },
                    Field {
                        name: "tag".into(),
                        encoding: Encoding::Bytes { max_len: 16 },
                    },
                ],
            },
        ],
        position: Some(Position {
            fields: vec!["transform.x".into(), "transform.y".into()],
        }),
        max_entities: 1000,
    }
}

fn samples() -> Vec<(&'static str, Message)> {
    vec![
        (
            "hello",
            Hello {
                version: VERSION,
                token: Bytes::from_static(b"token-bytes"),
                world: "cubes".into(),
                resume: Some(Resume {
                    session: 0x0123_4567_89ab_cdef,
                    last_ack: 4321,
                    cells: vec![CellId { x: 3, y: -4 }],
                }),
                agent: "statecast-client/0.1".into(),
                interest: Some(Area {
                    x: 10.0,
                    y: 20.0,
                    radius: 50.0,
                }),
            }
            .into(),
        ),
        (
            "welcome",
            Welcome {
                version: VERSION,
                session: 0x0123_4567_89ab_cdef,
                world: "cubes".into(),
                schema: schema(),
                tick_rate: 30,
                tick: 4400,
                relay_id: "relay-eu-1".into(),
                region: "eu-west".into(),
            }
            .into(),
        ),
        (
            "error",
            Error {
                code: ErrorCode::TokenExpired,
                message: "token expired".into(),
            }
            .into(),
        ),
        (
            "goaway",
            Goaway {
                reason: "draining".into(),
                redirect: Some("relay-eu-2.example:4433".into()),
                deadline_ms: 5000,
            }
            .into(),
        ),
        (
            "subscribe",
            Subscribe {
                version: VERSION,
                world: "cubes".into(),
                auth: Bytes::from_static(b"secret"),
                relay_id: "relay-eu-1".into(),
            }
            .into(),
        ),
        (
            "update",
            Update {
                tick: 4401,
                base: Some(4399),
                predict_from: Some(4398),
                origin_time_us: 1_790_000_000_000_000,
                hash: 0xfeed_beef,
                chunks: vec![
                    Chunk {
                        cell: CellId { x: -2, y: 3 },
                        data: Bytes::from_static(&[0x12, 0x34, 0x56]),
                    },
                    Chunk {
                        cell: CellId::WORLD,
                        data: Bytes::from_static(&[0xab; 7]),
                    },
                ],
                dropped: vec![CellId { x: 5, y: -5 }],
            }
            .into(),
        ),
        (
            "keyframe",
            Update {
                tick: 9,
                base: None,
                predict_from: None,
                origin_time_us: 1,
                hash: 2,
                chunks: vec![Chunk {
                    cell: CellId::WORLD,
                    data: Bytes::from_static(b"keyframe"),
                }],
                dropped: vec![],
            }
            .into(),
        ),
        ("ack", Ack { tick: 4401 }.into()),
        (
            "interest",
            Interest {
                area: Some(Area {
                    x: -5.0,
                    y: 7.5,
                    radius: 30.0,
                }),
            }
            .into(),
        ),
        (
            "input",
            Input {
                seq: 77,
                inputs: vec![
                    Bytes::from_static(b"jump"),
                    Bytes::from_static(b"left"),
                    Bytes::new(),
                ],
            }
            .into(),
        ),
        (
            "input_batch",
            InputBatch {
                tick: 4401,
                inputs: vec![
                    SessionInput {
                        session: 1,
                        seq: 77,
                        data: Bytes::from_static(b"jump"),
                    },
                    SessionInput {
                        session: 2,
                        seq: 3,
                        data: Bytes::from_static(b"fire"),
                    },
                ],
            }
            .into(),
        ),
        (
            "directory",
            Directory {
                relays: vec![
                    RelayInfo {
                        id: "relay-eu-1".into(),
                        addr: "127.0.0.2:4433".into(),
                        probe_addr: "127.0.0.2:4434".into(),
                        region: "eu-west".into(),
                        load: 420,
                        origin_rtt_us: 18_250,
                        coords: Some([12.5, -3.0, 1.5]),
                    },
                    RelayInfo {
                        id: "relay-us-1".into(),
                        addr: "127.0.0.3:4433".into(),
                        probe_addr: "127.0.0.3:4434".into(),
                        region: "us-east".into(),
                        load: 80,
                        origin_rtt_us: u32::MAX,
                        coords: None,
                    },
                ],
            }
            .into(),
        ),
        (
            "ping",
            Ping {
                version: VERSION,
                nonce: 0x5eed,
                sent_us: 123_456,
            }
            .into(),
        ),
        (
            "pong",
            Pong {
                nonce: 0x5eed,
                sent_us: 123_456,
                relay_id: "relay-eu-1".into(),
                region: "eu-west".into(),
                load: 420,
                origin_rtt_us: 18_000,
                coords: Some([12.5, -3.0, 1.5]),
            }
            .into(),
        ),
    ]
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stream = Vec::new();
    for (name, msg) in samples() {
        let mut frame = Vec::new();
        msg.encode(&mut frame).unwrap();
        stream.extend_from_slice(&frame);
        files.push((format!("frame/{name}"), frame));
        if msg.message_type().datagram() {
            let mut dgram = Vec::new();
            msg.encode_datagram(&mut dgram).unwrap();
            files.push((format!("datagram/{name}"), dgram));
        }
    }
    files.push(("frame/stream".into(), stream));
    files.push((
        "schema/cubes.postcard".into(),
        postcard::to_allocvec(&schema()).unwrap(),
    ));
    files.push((
        "schema/cubes.json".into(),
        serde_json::to_vec_pretty(&schema()).unwrap(),
    ));
    files
}

#[test]
fn golden_encodings_match_the_seed_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let write = std::env::var_os("STATECAST_WRITE_SEEDS").is_some();
    for (name, bytes) in seeds() {
        let path = dir.join(&name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let stored = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (write with STATECAST_WRITE_SEEDS=1)",
                path.display()
            )
        });
        assert!(
            stored == bytes,
            "{name}: the encoding changed; if intended, rewrite the seeds (see the file's doc)"
        );
    }
    // Every stored frame decodes to its sample, and the stream to all.
    for (name, msg) in samples() {
        let frame = std::fs::read(dir.join("frame").join(name)).unwrap();
        let (decoded, used) = decode_frame(&frame, VERSION).unwrap().unwrap();
        assert_eq!((decoded, used), (msg, frame.len()));
    }
    let stream = std::fs::read(dir.join("frame/stream")).unwrap();
    let mut reader = FrameReader::new(VERSION);
    reader.extend_from_slice(&stream);
    for (_, msg) in samples() {
        assert_eq!(reader.next_message().unwrap(), Some(msg));
    }
    assert_eq!(reader.next_message().unwrap(), None);
}
