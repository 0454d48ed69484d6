//! Messages over a real loopback QUIC connection: framed on streams, whole
//! in datagrams, with limits and clear errors.

mod common;

use bytes::Bytes;
use common::{STEP, accept, connect, server, within};
use proto::msg::{Ack, CellId, Chunk, Goaway, Update};
use proto::{ErrorCode, Message};
use statecast_transport::framed::encode_frame;
use statecast_transport::{
    ALPN_CLIENT, FrameError, FramedRecv, FramedSend, TlsConfig, Trust, read_datagram,
    send_datagram, write_message,
};

/// A connected pair: (client side, server side).
async fn pair() -> (quinn::Connection, quinn::Connection, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let tls: TlsConfig = Trust::dev(dir.path()).load().unwrap();
    let (endpoint, addr) = server(&tls, &[ALPN_CLIENT]);
    let (client, accepted) = tokio::join!(
        connect(&tls, &[ALPN_CLIENT], addr, "localhost"),
        accept(&endpoint)
    );
    // The endpoints live as long as their connections hold them.
    (client.unwrap(), accepted.unwrap(), dir)
}

fn update(tick: u64, data_len: usize) -> Message {
    Message::Update(Update {
        tick,
        base: Some(tick - 1),
        predict_from: None,
        origin_time_us: 1_700_000_000_000_000,
        hash: 0x1234_5678_9abc_def0,
        chunks: vec![Chunk {
            cell: CellId { x: 3, y: -2 },
            data: Bytes::from(vec![0xa5; data_len]),
        }],
        dropped: vec![CellId { x: 1, y: 1 }],
    })
}

fn goaway() -> Message {
    Message::Goaway(Goaway {
        reason: "draining for a deploy".to_owned(),
        redirect: Some("relay2.statecast.test:4433".to_owned()),
        deadline_ms: 5000,
    })
}

#[tokio::test]
async fn framed_messages_cross_a_stream_in_order() {
    let (client, server, _dir) = pair().await;
    let sent = vec![
        goaway(),
        update(10, 3),
        update(11, 200_000),
        Message::Ack(Ack { tick: 11 }),
    ];

    let sender = {
        let sent = sent.clone();
        async move {
            let (send, _recv) = client.open_bi().await.unwrap();
            let mut framed = FramedSend::new(send);
            for msg in &sent {
                framed.send(msg).await.unwrap();
            }
            framed.finish().unwrap();
            framed.into_inner().stopped().await.unwrap();
            client
        }
    };
    let receiver = async {
        let (_send, recv) = server.accept_bi().await.unwrap();
        let mut framed = FramedRecv::new(recv);
        let mut got = Vec::new();
        while let Some(msg) = framed.recv().await.unwrap() {
            got.push(msg);
        }
        got
    };
    let (_client, got) = within("stream exchange", async { tokio::join!(sender, receiver) }).await;
    assert_eq!(got, sent);
}

#[tokio::test]
async fn write_message_and_a_uni_stream() {
    let (client, server, _dir) = pair().await;
    let msg = update(7, 5000);
    let sender = async {
        let mut send = client.open_uni().await.unwrap();
        write_message(&mut send, &msg).await.unwrap();
        send.finish().unwrap();
    };
    let receiver = async {
        let recv = server.accept_uni().await.unwrap();
        let mut framed = FramedRecv::new(recv);
        let first = framed.recv().await.unwrap();
        let end = framed.recv().await.unwrap();
        (first, end)
    };
    let ((), (first, end)) = within("uni stream", async { tokio::join!(sender, receiver) }).await;
    assert_eq!(first, Some(msg));
    assert_eq!(end, None);
}

#[tokio::test]
async fn a_datagram_goes_through() {
    let (client, server, _dir) = pair().await;
    let ack = Message::Ack(Ack { tick: 42 });
    let small = update(43, 100);
    send_datagram(&client, &ack).unwrap();
    send_datagram(&client, &small).unwrap();
    // Loopback does not lose packets, but it may reorder: collect both.
    let mut got = vec![
        within("datagram", read_datagram(&server, proto::VERSION))
            .await
            .unwrap(),
        within("datagram", read_datagram(&server, proto::VERSION))
            .await
            .unwrap(),
    ];
    got.sort_by_key(|m| matches!(m, Message::Update(_)));
    assert_eq!(got, vec![ack, small]);
}

#[tokio::test]
async fn oversized_and_stream_only_datagrams_are_refused_locally() {
    let (client, _server, _dir) = pair().await;
    let max = client.max_datagram_size().expect("datagrams are enabled");
    match send_datagram(&client, &update(5, max + 10)) {
        Err(FrameError::DatagramTooLarge { len, max: m }) => {
            assert!(len > m);
            assert_eq!(m, max);
        }
        other => panic!("expected DatagramTooLarge, got {other:?}"),
    }
    let err = send_datagram(&client, &goaway()).unwrap_err();
    assert!(matches!(err, FrameError::Encode(_)), "{err}");
}

#[tokio::test]
async fn a_frame_above_the_stream_limit_fails_at_its_header() {
    let (client, server, _dir) = pair().await;
    let big = update(9, 10_000);
    let frame = encode_frame(&big).unwrap();
    let sender = async {
        let mut send = client.open_uni().await.unwrap();
        // Only the head of the frame: the reader must refuse it without
        // waiting for the body.
        send.write_all(&frame[..16]).await.unwrap();
        send
    };
    let receiver = async {
        let recv = server.accept_uni().await.unwrap();
        let mut framed = FramedRecv::new(recv).with_max_frame(1024);
        framed.recv().await
    };
    let (_send, result) = within("limit check", async { tokio::join!(sender, receiver) }).await;
    match result {
        Err(err @ FrameError::FrameTooLarge { .. }) => {
            assert!(err.is_peer_fault());
            assert_eq!(err.code(), Some(ErrorCode::TooLarge));
            assert!(err.to_string().contains("update"), "{err}");
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
}

#[tokio::test]
async fn the_sender_refuses_a_message_above_its_limit() {
    let (client, _server, _dir) = pair().await;
    let send = client.open_uni().await.unwrap();
    let mut framed = FramedSend::new(send).with_max_frame(256);
    let err = framed.send(&update(3, 1000)).await.unwrap_err();
    assert!(matches!(err, FrameError::MessageTooLarge { .. }), "{err}");
    assert!(!err.is_peer_fault());
}

#[tokio::test]
async fn a_stream_ending_inside_a_frame_is_truncated() {
    let (client, server, _dir) = pair().await;
    let frame = encode_frame(&update(9, 300)).unwrap();
    let sender = async {
        let mut send = client.open_uni().await.unwrap();
        send.write_all(&frame[..frame.len() - 1]).await.unwrap();
        send.finish().unwrap();
        send
    };
    let receiver = async {
        let recv = server.accept_uni().await.unwrap();
        FramedRecv::new(recv).recv().await
    };
    let (_send, result) =
        within("truncated stream", async { tokio::join!(sender, receiver) }).await;
    match result {
        Err(err @ FrameError::Truncated { buffered }) => {
            assert_eq!(buffered, frame.len() - 1);
            assert_eq!(err.code(), Some(ErrorCode::Malformed));
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_is_a_decode_error() {
    let (client, server, _dir) = pair().await;
    let sender = async {
        let mut send = client.open_uni().await.unwrap();
        // Length 2, unknown type 0x7f, one body byte.
        send.write_all(&[0x02, 0x7f, 0x00]).await.unwrap();
        send.finish().unwrap();
        send
    };
    let receiver = async {
        let recv = server.accept_uni().await.unwrap();
        FramedRecv::new(recv).recv().await
    };
    let (_send, result) = within("garbage", async { tokio::join!(sender, receiver) }).await;
    let err = result.unwrap_err();
    assert!(matches!(err, FrameError::Decode(_)), "{err}");
    assert!(err.is_peer_fault());
}

#[tokio::test]
async fn a_closed_connection_ends_reads_with_an_error() {
    let (client, server, _dir) = pair().await;
    let reader = async {
        let recv = server.accept_uni().await;
        let recv = match recv {
            Ok(recv) => recv,
            Err(e) => return Err(FrameError::Connection(e)),
        };
        FramedRecv::new(recv).recv().await
    };
    client.close(quinn::VarInt::from_u32(0), b"bye");
    let result = tokio::time::timeout(STEP, reader)
        .await
        .expect("read returns");
    let err = result.unwrap_err();
    assert!(!err.is_peer_fault());
    assert_eq!(err.code(), None);
}
