//! Relays that compute their own coordinates (`auto_coords`): three relays
//! whose probe ports reach each other only through emulated links of 20, 50
//! and 60 ms RTT ping their directory peers and settle on coordinates whose
//! distances are those RTTs; their pongs carry them, and a relay that does
//! not compute them sends none. No upstream is needed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use client::coords::distance;
use lab::{Direction, Link, LinkConfig};
use proto::msg::{Message, Ping, VERSION};
use statecast_relay::config::Peer;
use statecast_relay::{Config, RelayHandle, start};
use tokio::net::UdpSocket;

fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn config(id: &str, auto: bool) -> Config {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("relay-coords-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    Config {
        id: id.into(),
        region: "lab".into(),
        listen: local(),
        admin: local(),
        probe: Some(local()),
        data_dir: Some(dir),
        auto_coords: auto,
        coords_interval_ms: 40,
        ..Config::default()
    }
}

async fn pong_coords(at: SocketAddr) -> Option<proto::msg::Coords> {
    let socket = UdpSocket::bind(local()).await.unwrap();
    let mut out = Vec::new();
    Message::Ping(Ping {
        version: VERSION,
        nonce: 7,
        sent_us: 1,
    })
    .encode_datagram(&mut out)
    .unwrap();
    socket.send_to(&out, at).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .expect("a pong within 5 s")
        .unwrap();
    match Message::decode_datagram(&buf[..n], VERSION).unwrap() {
        Message::Pong(pong) => pong.coords,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_settle_on_coordinates_that_match_their_rtts() {
    let ids = ["a", "b", "c"];
    let mut relays: Vec<RelayHandle> = Vec::new();
    for id in ids {
        relays.push(start(config(id, true)).await.unwrap());
    }
    // RTTs between the pairs; a link per (from, to) into `to`'s probe port.
    let rtt = |i: usize, j: usize| -> f64 {
        match (i.min(j), i.max(j)) {
            (0, 1) => 20.0,
            (0, 2) => 60.0,
            _ => 50.0,
        }
    };
    let mut links = Vec::new();
    for (i, relay) in relays.iter().enumerate() {
        let mut peers = Vec::new();
        for (j, other) in relays.iter().enumerate() {
            if i == j {
                continue;
            }
            let one_way = Duration::from_secs_f64(rtt(i, j) / 2000.0);
            let link = Link::start(
                local(),
                other.probe_addr.unwrap(),
                LinkConfig::symmetric(Direction::delayed(one_way)),
            )
            .await
            .unwrap();
            peers.push(Peer {
                id: ids[j].into(),
                addr: other.client_addr.to_string(),
                probe_addr: link.local_addr().to_string(),
                region: "lab".into(),
                coords: None,
                origin_ms: None,
            });
            links.push(link);
        }
        relay.set_directory(peers).unwrap();
    }

    // Converged: every pair's distance within max(15%, 3 ms) of its RTT,
    // after enough samples, within 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let errors = loop {
        let coords: Vec<_> = relays.iter().map(|r| r.own_coords().unwrap()).collect();
        let mut errors = Vec::new();
        for i in 0..3 {
            for j in i + 1..3 {
                let d = distance(&coords[i].0, &coords[j].0);
                errors.push((i, j, d, rtt(i, j)));
            }
        }
        let enough = coords.iter().all(|(_, samples)| *samples >= 100);
        let close = errors
            .iter()
            .all(|&(_, _, d, r)| (d - r).abs() <= (0.15 * r).max(3.0));
        if enough && close {
            break errors;
        }
        assert!(
            Instant::now() < deadline,
            "coordinates did not settle: {coords:?}, (i, j, distance, rtt) {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("(i, j, distance ms, rtt ms): {errors:?}");

    // Pongs carry them.
    let (own, _) = relays[0].own_coords().unwrap();
    let sent = pong_coords(relays[0].probe_addr.unwrap())
        .await
        .expect("a relay computing coordinates sends them");
    // (Sampling goes on between the two reads: close, not equal.)
    let moved = own
        .iter()
        .zip(&sent)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(moved < 5.0, "{own:?} vs {sent:?}");

    // A relay that does not compute them sends none.
    let plain = start(config("plain", false)).await.unwrap();
    assert_eq!(plain.own_coords(), None);
    assert_eq!(pong_coords(plain.probe_addr.unwrap()).await, None);

    plain.shutdown().await;
    for link in links {
        link.stop().await;
    }
    for relay in relays {
        relay.shutdown().await;
    }
}
