// The roamer with many candidates: a coordinate guide decides which few it
// probes. Forty real probe responders, each behind an emulated link with
// the RTT its place on a map gives it (what a network would do); all
// forty name one real relay (in-process origin and relay) as their QUIC
// address, so the roamer really connects once it has picked.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use lab::{Direction, Link, LinkConfig};
use proto::msg::Coords;
use relay::probe::{Info, Limits};
use statecast_client::roam::{self, Roamer};
use statecast_client::select::Candidate;
use tokio::net::UdpSocket;

/// Height of every relay (and of the client), ms.
const HEIGHT: f32 = 1.0;

/// Relay `i` of the grid: 8 x 5 points, 9 ms apart.
fn place(i: usize) -> (f32, f32) {
    ((i % 8) as f32 * 9.0, (i / 8) as f32 * 9.0)
}

/// The client's point: between relays, nearest to relay 29 (5, 3).
const CLIENT: (f32, f32) = (47.0, 28.0);

fn rtt_ms(relay: (f32, f32)) -> f64 {
    let (dx, dy) = (relay.0 - CLIENT.0, relay.1 - CLIENT.1);
    f64::from((dx * dx + dy * dy).sqrt() + 2.0 * HEIGHT)
}

/// A real probe responder (`relay::probe::serve`) publishing `coords`,
/// reached through an emulated link of `rtt`: the probe address to use,
/// and the link (dropping it would stop it).
async fn responder(rtt: Duration, coords: Coords, id: String) -> (SocketAddr, Link) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let at = socket.local_addr().unwrap();
    let info = move || Info {
        relay_id: id.clone(),
        region: "grid".into(),
        load: 0,
        origin_rtt: None,
        coords: Some(coords),
    };
    tokio::spawn(relay::probe::serve(
        socket,
        info,
        Limits::default(),
        relay::metrics::Metrics::new().probes,
        std::future::pending(),
    ));
    let link = Link::start(
        "127.0.0.1:0".parse().unwrap(),
        at,
        LinkConfig::symmetric(Direction::delayed(rtt / 2)),
    )
    .await
    .unwrap();
    (link.local_addr(), link)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guide_probes_few_of_many_candidates_and_finds_a_near_best_one() {
    let stack = common::stack(relay::Config {
        id: "relay-grid".into(),
        ..relay::Config::default()
    })
    .await;
    let (relay, endpoint) = (&stack.relay, &stack.endpoint);

    // Listed farthest first, so that an unguided selector (no hints: the
    // order given) would probe the far corner of the map.
    let mut order: Vec<usize> = (0..40).collect();
    order.sort_by(|&a, &b| rtt_ms(place(b)).total_cmp(&rtt_ms(place(a))));
    let mut candidates = Vec::new();
    let mut links = Vec::new();
    let mut truth = std::collections::HashMap::new();
    for &i in &order {
        let (x, y) = place(i);
        let rtt = rtt_ms((x, y));
        let (probe, link) = responder(
            Duration::from_secs_f64(rtt / 1000.0),
            [x, y, HEIGHT],
            format!("r{i}"),
        )
        .await;
        links.push(link);
        truth.insert(probe, rtt);
        candidates.push(Candidate {
            coords: Some([x, y, HEIGHT]),
            ..Candidate::new(probe, relay.client_addr)
        });
    }
    let best = truth.values().copied().fold(f64::INFINITY, f64::min);

    let config = |guided: bool| {
        let mut c = roam::Config::new("plaza");
        c.select.probes_per_round = 3;
        c.select.probe_interval = Duration::from_millis(10);
        c.select.nonce_seed = 7;
        c.first_pick_timeout = Duration::from_secs(20);
        if !guided {
            c.guide = None;
        }
        c
    };

    for guided in [true, false] {
        let roamer = Roamer::connect(endpoint, candidates.clone(), config(guided))
            .await
            .expect("the roamer connects");
        let probed = roamer.estimates().iter().filter(|e| e.probed).count();
        let picked = roamer.relay().expect("connected").probe;
        let picked_rtt = truth[&picked];
        let near = best + (best * 0.1).max(5.0);
        eprintln!("guided {guided}: probed {probed}, picked {picked_rtt:.1} ms, best {best:.1} ms");
        if guided {
            assert!(probed <= 8, "guided: {probed} relays probed");
            assert!(
                picked_rtt <= near,
                "guided: picked a relay at {picked_rtt:.1} ms, the best is at {best:.1} ms"
            );
        } else {
            // The same forty without coordinates' help: the first eight in
            // the order given, all far. What the guide is for.
            assert!(probed <= 8, "unguided: {probed} relays probed");
            assert!(
                picked_rtt > near,
                "unguided: picked a relay at {picked_rtt:.1} ms (best {best:.1} ms): the test \
                 does not show what the guide adds"
            );
        }
        roamer.close().await;
    }

    for link in links {
        link.stop().await;
    }
    stack.stop().await;
}
