//! A started relay answers probes on its probe address, counts them, and
//! frees the port when it stops. No upstream is needed: a relay only
//! subscribes when a client asks for a world.

use std::net::SocketAddr;
use std::time::Duration;

use proto::msg::{Message, PING_LEN, Ping, Pong, VERSION};
use statecast_relay::{Config, start};
use tokio::net::UdpSocket;

fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn config(test: &str) -> Config {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("relay-probe-{test}"));
    std::fs::create_dir_all(&dir).unwrap();
    Config {
        id: "relay-test-1".into(),
        region: "eu-west".into(),
        listen: local(),
        admin: local(),
        probe: Some(local()),
        max_clients: 4,
        data_dir: Some(dir),
        ..Config::default()
    }
}

async fn ping(socket: &UdpSocket, to: SocketAddr, nonce: u64) -> (Pong, usize) {
    let mut out = Vec::new();
    Message::Ping(Ping {
        version: VERSION,
        nonce,
        sent_us: 1234,
    })
    .encode_datagram(&mut out)
    .unwrap();
    assert_eq!(out.len(), PING_LEN);
    socket.send_to(&out, to).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .expect("a pong within 5 s")
        .unwrap();
    assert_eq!(from, to);
    match Message::decode_datagram(&buf[..n], VERSION).unwrap() {
        Message::Pong(pong) => (pong, n),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_relay_answers_probes_and_frees_the_port_on_shutdown() {
    let relay = start(config("answers")).await.unwrap();
    let at = relay.probe_addr.expect("probing is on");
    assert!(at.ip().is_loopback() && at.port() != 0);
    let client = UdpSocket::bind(local()).await.unwrap();
    let (pong, len) = ping(&client, at, 99).await;
    assert!(len <= PING_LEN);
    assert_eq!(pong.nonce, 99);
    assert_eq!(pong.sent_us, 1234);
    assert_eq!(pong.relay_id, "relay-test-1");
    assert_eq!(pong.region, "eu-west");
    assert_eq!(pong.load, 0, "no clients");
    assert_eq!(pong.origin_rtt_us, u32::MAX, "no world subscribed: unknown");
    client.send_to(b"not a ping", at).await.unwrap();
    let _ = ping(&client, at, 100).await;
    let count = |r: &str| relay.metrics.probes.with_label_values(&[r]).get();
    assert_eq!(count("answered"), 2);
    assert_eq!(count("malformed"), 1);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&relay.metrics.registry.gather())
        .unwrap();
    assert!(
        text.contains("statecast_relay_probes_total{result=\"answered\"} 2"),
        "{text}"
    );
    relay.shutdown().await;
    // The responder stopped and closed its socket: the port is free again.
    UdpSocket::bind(at)
        .await
        .expect("the probe port is released");
}

#[tokio::test]
async fn probing_can_be_turned_off() {
    let relay = start(Config {
        probe: None,
        ..config("off")
    })
    .await
    .unwrap();
    assert_eq!(relay.probe_addr, None);
    relay.shutdown().await;
}

#[tokio::test]
async fn a_taken_probe_port_is_a_clear_error() {
    let taken = UdpSocket::bind(local()).await.unwrap();
    let addr = taken.local_addr().unwrap();
    let err = match start(Config {
        probe: Some(addr),
        ..config("taken")
    })
    .await
    {
        Ok(_) => panic!("started on a taken port"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&addr.to_string()), "{err}");
}
