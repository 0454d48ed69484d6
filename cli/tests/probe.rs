//! `statecast probe` against real probe responders on loopback.
//!
//! Two `relay::probe` responders run in-process, each behind a tap: a small
//! UDP forwarder that records every request and reply (to check that no
//! reply is larger than its request) and delays one relay's traffic, so the
//! choice is known in advance. The real binary probes the taps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::msg::{Message, VERSION};
use relay::probe::{Info, Limits};
use serde_json::Value;
use statecast::demo::dns::{self, Dns, Entry};
use tokio::net::UdpSocket;
use tokio::sync::watch;

const BIN: &str = env!("CARGO_BIN_EXE_statecast");

/// Starts a responder on 127.0.0.1:0; it stops when `stop` turns true.
async fn responder(info: Info, stop: &watch::Receiver<bool>) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let counts = relay::metrics::Metrics::new().probes;
    let mut stop = stop.clone();
    tokio::spawn(relay::probe::serve(
        socket,
        move || info.clone(),
        Limits::default(),
        counts,
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
    ));
    addr
}

/// What a tap saw: (nonce, bytes) of each request and each reply.
#[derive(Default, Debug)]
struct Seen {
    requests: Vec<(u64, usize)>,
    replies: Vec<(u64, usize)>,
}

/// Forwards datagrams between clients and `relay`, adding `delay` to each
/// request, and records them. Returns the address clients use.
async fn tap(
    relay: SocketAddr,
    delay: Duration,
    seen: Arc<Mutex<Seen>>,
    stop: &watch::Receiver<bool>,
) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let mut stop = stop.clone();
    tokio::spawn(async move {
        let (mut a, mut b) = ([0u8; 2048], [0u8; 2048]);
        loop {
            tokio::select! {
                _ = async { drop(stop.wait_for(|s| *s).await) } => return,
                r = front.recv_from(&mut a) => {
                    let (n, from) = r.unwrap();
                    *client.lock().unwrap() = Some(from);
                    let nonce = match Message::decode_datagram(&a[..n], VERSION) {
                        Ok(Message::Ping(p)) => p.nonce,
                        other => panic!("the probe command sent {other:?}"),
                    };
                    seen.lock().unwrap().requests.push((nonce, n));
                    let (back, bytes) = (back.clone(), a[..n].to_vec());
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        back.send_to(&bytes, relay).await.unwrap();
                    });
                }
                r = back.recv_from(&mut b) => {
                    let (n, _) = r.unwrap();
                    let nonce = match Message::decode_datagram(&b[..n], VERSION) {
                        Ok(Message::Pong(p)) => p.nonce,
                        other => panic!("the responder sent {other:?}"),
                    };
                    seen.lock().unwrap().replies.push((nonce, n));
                    let to = client.lock().unwrap().expect("a request came first");
                    front.send_to(&b[..n], to).await.unwrap();
                }
            }
        }
    });
    addr
}

fn info(id: &str, region: &str, load: u16, origin_ms: u64) -> Info {
    Info {
        relay_id: id.into(),
        region: region.into(),
        load,
        origin_rtt: Some(Duration::from_millis(origin_ms)),
        coords: None,
    }
}

async fn statecast(args: &[&str]) -> std::process::Output {
    let child = tokio::process::Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .expect("statecast probe finishes within 30 s")
        .expect("the statecast binary runs")
}

fn f(row: &Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {row:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_ranks_two_relays_and_no_reply_outgrows_its_request() {
    let (stop_tx, stop) = watch::channel(false);
    let near = responder(info("relay-eu-1", "eu-west", 100, 5), &stop).await;
    let far = responder(info("relay-us-1", "us-east", 300, 8), &stop).await;
    let seen_near = Arc::new(Mutex::new(Seen::default()));
    let seen_far = Arc::new(Mutex::new(Seen::default()));
    let near = tap(near, Duration::ZERO, seen_near.clone(), &stop).await;
    let far = tap(far, Duration::from_millis(40), seen_far.clone(), &stop).await;

    let relays = format!("{far},{near}");
    let out = statecast(&[
        "probe",
        "--relays",
        &relays,
        "--count",
        "4",
        "--interval-ms",
        "20",
        "--json",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed:\n{stdout}\n{stderr}");
    assert!(stderr.contains("probing 2 relays"), "progress: {stderr}");
    let rows: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let rows = rows.as_array().expect("an array");
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let chosen: Vec<&Value> = rows.iter().filter(|r| r["chosen"] == true).collect();
    assert_eq!(chosen.len(), 1, "{rows:#?}");
    let (n, fr) = (&rows[0], &rows[1]);
    assert_eq!(n["addr"], near.to_string(), "best first: {rows:#?}");
    assert_eq!(n["chosen"], true);
    assert_eq!(fr["addr"], far.to_string());
    assert_eq!(n["region"], "eu-west");
    assert_eq!(fr["region"], "us-east");
    assert_eq!(n["relay_id"], "relay-eu-1");
    assert_eq!(n["load"], 100);
    assert_eq!(fr["load"], 300);
    assert_eq!(f(n, "origin_rtt_ms"), 5.0);
    assert_eq!(f(fr, "origin_rtt_ms"), 8.0);
    for r in [n, fr] {
        assert_eq!(f(r, "loss"), 0.0, "{r:#}");
        assert_eq!(r["sent"], 4);
        assert_eq!(r["received"], 4);
        let (min, med, p95) = (
            f(r, "rtt_min_ms"),
            f(r, "rtt_median_ms"),
            f(r, "rtt_p95_ms"),
        );
        assert!(min > 0.0 && min <= med && med <= p95, "{r:#}");
        assert!(f(r, "jitter_ms") >= 0.0);
        // The score is the sum of its parts, and at least RTT + origin.
        let parts = &r["score_parts"];
        let sum =
            f(parts, "rtt_ms") + f(parts, "origin_ms") + f(parts, "load_ms") + f(parts, "loss_ms");
        assert!((f(r, "score") - sum).abs() < 0.01, "{r:#}");
        assert!(f(r, "score") >= min + f(r, "origin_rtt_ms"));
    }
    assert!(
        f(fr, "rtt_min_ms") >= 40.0,
        "the far tap adds 40 ms: {fr:#}"
    );
    assert!(f(n, "rtt_min_ms") < 40.0, "{n:#}");
    let why = n["why"].as_str().unwrap();
    assert!(
        why.contains("lowest score") && why.contains(&far.to_string()),
        "{why}"
    );

    // Every reply the taps saw answers a request, and is no larger.
    for (name, seen) in [("near", &seen_near), ("far", &seen_far)] {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.requests.len(), 4, "{name}: {seen:?}");
        assert_eq!(seen.replies.len(), 4, "{name}: {seen:?}");
        let requests: HashMap<u64, usize> = seen.requests.iter().copied().collect();
        for (nonce, len) in &seen.replies {
            let asked = requests.get(nonce).expect("a reply answers a request");
            assert!(len <= asked, "{name}: reply {len} > request {asked}");
        }
    }
    stop_tx.send_replace(true);
}

#[tokio::test]
async fn probe_fails_when_no_relay_answers_and_says_so() {
    // A bound socket that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let out = statecast(&[
        "probe",
        "--relays",
        &addr,
        "--count",
        "2",
        "--interval-ms",
        "10",
        "--timeout-ms",
        "200",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("no relay answered"), "{stderr}");
    assert!(
        stdout.contains(&addr) && stdout.contains("no answer"),
        "{stdout}"
    );
    // It did send: two pings reached the silent socket.
    let mut buf = [0u8; 2048];
    for _ in 0..2 {
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), silent.recv_from(&mut buf))
            .await
            .expect("a ping was sent")
            .unwrap();
        assert!(matches!(
            Message::decode_datagram(&buf[..n], VERSION),
            Ok(Message::Ping(_))
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_discovers_relays_in_dns() {
    let (stop_tx, stop) = watch::channel(false);
    let near = responder(info("relay-eu-1", "eu-west", 100, 5), &stop).await;
    let far = responder(info("relay-us-1", "us-east", 300, 8), &stop).await;
    let far = tap(far, Duration::from_millis(40), Arc::default(), &stop).await;
    // The demo's zone server (hickory-server, in-process): one client
    // region, `zone`, under which both relays are listed. The SRV port is
    // never used by a probe.
    let entry = |relay: &str, region: &str, probe_port: u16| Entry {
        relay: relay.into(),
        relay_region: region.into(),
        quic_port: 4434,
        probe_port,
    };
    let zone = Dns::serve(&[(
        "zone".to_string(),
        vec![
            entry("relay1", "eu-west", near.port()),
            entry("relay2", "us-east", far.port()),
        ],
    )])
    .await
    .unwrap();
    let dns = zone.addr.to_string();
    let domain = dns::domain("zone");
    let out = statecast(&[
        "probe",
        "--discover",
        &domain,
        "--dns-server",
        &dns,
        "--count",
        "3",
        "--interval-ms",
        "20",
        "--json",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let rows: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows.len(), 2, "{stdout}");
    // Named by their DNS host and TXT probe port; the near one chosen.
    assert_eq!(rows[0]["addr"], format!("relay1.{domain}:{}", near.port()));
    assert_eq!(rows[0]["region"], "eu-west");
    assert_eq!(rows[0]["chosen"], true);
    assert_eq!(rows[1]["addr"], format!("relay2.{domain}:{}", far.port()));
    assert_eq!(rows[1]["region"], "us-east");
    assert_eq!(rows[1]["chosen"], false);
    assert!(f(&rows[1], "rtt_min_ms") >= 40.0, "{:#}", rows[1]);

    // A domain without relays: a clear error, quickly.
    let out = statecast(&[
        "probe",
        "--discover",
        "nothing.demo.test",
        "--dns-server",
        &dns,
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no such name") && stderr.contains("nothing.demo.test"),
        "{stderr}"
    );
    stop_tx.send_replace(true);
    zone.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_watch_prints_one_json_array_per_round() {
    let (stop_tx, stop) = watch::channel(false);
    let near = responder(info("relay-eu-1", "eu-west", 100, 5), &stop).await;
    let far = responder(info("relay-us-1", "us-east", 300, 8), &stop).await;
    let relays = format!("{near},{far}");
    let out = statecast(&[
        "probe",
        "--relays",
        &relays,
        "--count",
        "2",
        "--interval-ms",
        "10",
        "--watch",
        "--rounds",
        "2",
        "--json",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let rounds: Vec<Vec<Value>> = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Vec<Value>>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(rounds.len(), 2, "{stdout}");
    assert_eq!(stdout.lines().count(), 2, "one array per line: {stdout}");
    for round in &rounds {
        assert_eq!(round.len(), 2, "{round:?}");
        assert_eq!(round.iter().filter(|r| r["chosen"] == true).count(), 1);
        for row in round {
            for key in [
                "addr",
                "region",
                "rtt_min_ms",
                "rtt_median_ms",
                "rtt_p95_ms",
                "jitter_ms",
                "loss",
                "origin_rtt_ms",
                "load",
                "score",
                "chosen",
            ] {
                assert!(row.get(key).is_some(), "{key} missing in {row:#}");
            }
        }
    }
    // The second round adds to the first's samples: more pings resolved.
    assert!(
        rounds[1][0]["sent"].as_u64() > rounds[0][0]["sent"].as_u64(),
        "{stdout}"
    );
    stop_tx.send_replace(true);
}
