//! A real origin on loopback, with a relay's side of the feed
//! (`transport::feed::Subscription`) and its admin HTTP.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proto::ErrorCode;
use proto::msg::{InputBatch, SessionInput};
use statecast_origin::{self as origin, Config, OriginHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::feed::{FeedTick, Subscription};
use transport::{ALPN_UPSTREAM, FeedError, Trust};

/// Longest any single step may take before a test fails.
const STEP: Duration = Duration::from_secs(15);

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(STEP, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what} did not finish within {STEP:?}"),
    }
}

/// Plaza with 2000 avatars: 20 Hz, quick to step.
fn plaza_config(dir: &tempfile::TempDir) -> Config {
    let mut config = Config {
        world: "plaza".into(),
        avatars: Some(2000),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        id: "origin-test".into(),
        region: "test".into(),
        ..Config::default()
    };
    config.tls.data_dir = Some(dir.path().to_owned());
    config
}

/// A client endpoint that trusts the origin's development CA.
fn relay_endpoint(dir: &tempfile::TempDir) -> quinn::Endpoint {
    let tls = Trust::dev(dir.path()).load().unwrap();
    let mut endpoint = transport::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(tls.client_config(&[ALPN_UPSTREAM]).unwrap());
    endpoint
}

async fn subscribe(
    endpoint: &quinn::Endpoint,
    origin: &OriginHandle,
    world: &str,
    auth: &[u8],
) -> Result<Subscription, FeedError> {
    within(
        "subscribe",
        Subscription::connect(
            endpoint,
            origin.upstream_addr,
            "localhost",
            world,
            auth,
            "relay-test",
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_receives_verified_ticks_on_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let origin = origin::start(plaza_config(&dir)).await.unwrap();
    assert_eq!(origin.world.world, "plaza");
    assert_eq!(origin.world.tick_rate, 20);
    let endpoint = relay_endpoint(&dir);
    let mut sub = subscribe(&endpoint, &origin, "plaza", b"").await.unwrap();
    assert_eq!(sub.publisher_id, "origin-test");
    assert_eq!(sub.region, "test");
    assert_eq!(sub.info.schema, origin.world.schema);

    // Sixty ticks, three seconds: each verified against the origin's hash
    // (`next` checks it), each newer than the one before.
    let mut ticks: Vec<Arc<FeedTick>> = Vec::new();
    while ticks.len() < 60 {
        let tick = within("tick", sub.next()).await.unwrap();
        assert_eq!(tick.snapshot.len(), 2000);
        if let Some(last) = ticks.last() {
            assert!(tick.tick > last.tick, "{} after {}", tick.tick, last.tick);
        }
        ticks.push(tick);
    }
    let consecutive = ticks
        .windows(2)
        .filter(|w| w[1].tick == w[0].tick + 1)
        .count();
    assert!(
        consecutive >= 50,
        "only {consecutive} of 59 steps consecutive"
    );

    // The schedule: tick n is stamped near start + n * period. Fit the
    // offset from schedule against the tick number: a loop that sleeps a
    // period after its work drifts by the work's duration every tick (a few
    // milliseconds here); this one must not drift at all.
    let period_us = 1e6 / 20.0;
    let (t0, n0) = (ticks[0].origin_time_us as f64, ticks[0].tick as f64);
    let points: Vec<(f64, f64)> = ticks
        .iter()
        .map(|t| {
            let n = t.tick as f64 - n0;
            (n, (t.origin_time_us as f64 - t0) - n * period_us)
        })
        .collect();
    let mean_n = points.iter().map(|p| p.0).sum::<f64>() / points.len() as f64;
    let mean_e = points.iter().map(|p| p.1).sum::<f64>() / points.len() as f64;
    let slope = points
        .iter()
        .map(|(n, e)| (n - mean_n) * (e - mean_e))
        .sum::<f64>()
        / points
            .iter()
            .map(|(n, _)| (n - mean_n).powi(2))
            .sum::<f64>();
    assert!(
        slope.abs() < 150.0,
        "the tick loop drifts by {slope:.0} us per tick"
    );
    let worst = points.iter().map(|p| p.1.abs()).fold(0.0, f64::max);
    assert!(
        worst < 100_000.0,
        "a tick came {worst:.0} us off its schedule"
    );
    origin.shutdown().await;
}

/// The avatar a session drives (the `state.controlled` lane set), and its x.
fn driven(tick: &FeedTick, layout: &proto::Layout) -> Option<(u32, f64)> {
    let controlled = layout.fields()[layout.field_index("state.controlled").unwrap()].lane;
    let x_field = layout.field_index("transform.x").unwrap();
    let x_lane = layout.fields()[x_field].lane;
    let s = &tick.snapshot;
    (0..s.len())
        .find(|&i| s.lanes(i)[controlled] == 1)
        .map(|i| (s.ids()[i], layout.dequantize(x_field, s.lanes(i)[x_lane])))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_move_the_driven_avatar_and_it_is_released_with_its_relay() {
    let dir = tempfile::tempdir().unwrap();
    let origin = origin::start(plaza_config(&dir)).await.unwrap();
    let layout = origin.world.layout.clone();
    let endpoint = relay_endpoint(&dir);
    let mut sub = subscribe(&endpoint, &origin, "plaza", b"").await.unwrap();
    let first = within("tick", sub.next()).await.unwrap();
    assert_eq!(driven(&first, &layout), None, "nobody drives before inputs");

    // Steer towards the middle of the square, one input per tick.
    let input = |seq: u32, tick: u64, east: bool| InputBatch {
        tick,
        inputs: vec![SessionInput {
            session: 42,
            seq,
            data: Bytes::from(vec![if east { 127 } else { 0x81 }, 0]),
        }],
    };
    let mut seq = 1;
    let mut east = true;
    let mut start: Option<(u32, f64, u64)> = None;
    let moved = loop {
        let tick = within("tick", sub.next()).await.unwrap();
        if let Some((id, x)) = driven(&tick, &layout) {
            match start {
                None => {
                    east = x < 1000.0;
                    start = Some((id, x, tick.tick));
                }
                Some((first_id, x0, t0)) => {
                    assert_eq!(id, first_id, "the session keeps its avatar");
                    // 1.25 s of walking at 1.6 m/s.
                    if tick.tick >= t0 + 25 {
                        break x - x0;
                    }
                }
            }
        }
        sub.send_inputs(input(seq, tick.tick, east)).unwrap();
        seq += 1;
    };
    let toward = if east { moved } else { -moved };
    assert!(
        toward > 1.0,
        "the driven avatar moved {moved:.2} m, not east={east}"
    );
    let applied = metric_value(&origin, "statecast_origin_inputs_total", Some("applied"));
    assert!(applied >= 20.0, "{applied} inputs applied");

    // The relay goes away: its session leaves, and the avatar is nobody's.
    drop(sub);
    let mut ticks = origin.ticks();
    within(
        "the session to leave",
        ticks.wait_for(|t| t.as_ref().is_some_and(|t| driven(t, &layout).is_none())),
    )
    .await
    .unwrap();
    origin.shutdown().await;
}

fn metric_value(origin: &OriginHandle, name: &str, result: Option<&str>) -> f64 {
    let families = origin.registry().gather();
    let family = families.iter().find(|f| f.name() == name).unwrap();
    let metric = family
        .get_metric()
        .iter()
        .find(|m| {
            result.is_none_or(|r| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "result" && l.value() == r)
            })
        })
        .unwrap();
    metric.get_counter().get_value()
}

/// A plain HTTP/1.1 GET: the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = within("admin connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    within("admin response", stream.read_to_end(&mut response))
        .await
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_and_readiness_follows_the_first_tick() {
    let dir = tempfile::tempdir().unwrap();
    let origin = origin::start(plaza_config(&dir)).await.unwrap();
    let mut ticks = origin.ticks();
    within("first tick", ticks.wait_for(|t| t.is_some()))
        .await
        .unwrap();
    let (status, body) = http_get(origin.admin_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_get(origin.admin_addr, "/healthz").await;
    assert_eq!(status, 200);

    let endpoint = relay_endpoint(&dir);
    let mut sub = subscribe(&endpoint, &origin, "plaza", b"").await.unwrap();
    for _ in 0..5 {
        within("tick", sub.next()).await.unwrap();
    }
    let (status, body) = http_get(origin.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    let mut samples = std::collections::HashMap::new();
    for line in body.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        // `name{labels} value` or `name value`.
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line:?}"));
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                assert!(labels.ends_with('}'), "{line:?}");
                name
            }
            None => series,
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line:?}"
        );
        samples.insert(series.to_owned(), value);
    }
    let get = |series: &str| {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{body}"))
    };
    assert!(get("statecast_origin_ticks_total") >= 5.0);
    assert!(get("statecast_origin_tick_seconds_count") >= 5.0);
    assert!(get("statecast_origin_tick_lag_seconds") >= 0.0);
    assert_eq!(get("statecast_origin_ticks_skipped_total"), 0.0);
    assert_eq!(get("statecast_origin_subscribers"), 1.0);
    assert!(get("statecast_origin_updates_sent_total") >= 5.0);
    assert!(get("statecast_origin_keyframes_sent_total") >= 1.0);
    assert!(get("statecast_origin_bytes_sent_total") > 1000.0);
    assert_eq!(get("statecast_origin_entities"), 2000.0);
    assert_eq!(
        get("statecast_origin_inputs_total{result=\"applied\"}"),
        0.0
    );
    assert_eq!(
        get("statecast_origin_inputs_total{result=\"rejected\"}"),
        0.0
    );
    origin.shutdown().await;
}

#[tokio::test]
async fn wrong_world_and_wrong_secret_are_refused_and_shutdown_says_goaway() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = plaza_config(&dir);
    config.auth_secret = Some("sesame".into());
    let origin = origin::start(config).await.unwrap();
    let endpoint = relay_endpoint(&dir);
    match subscribe(&endpoint, &origin, "cubes", b"sesame").await {
        Err(FeedError::Refused { code, .. }) => assert_eq!(code, ErrorCode::UnknownWorld),
        other => panic!("expected unknown world, got {other:?}"),
    }
    match subscribe(&endpoint, &origin, "plaza", b"open").await {
        Err(FeedError::Refused { code, .. }) => assert_eq!(code, ErrorCode::BadToken),
        other => panic!("expected bad token, got {other:?}"),
    }
    let mut sub = subscribe(&endpoint, &origin, "plaza", b"sesame")
        .await
        .unwrap();
    within("tick", sub.next()).await.unwrap();
    let stopping = tokio::spawn(origin.shutdown());
    let end = within("goaway", async {
        loop {
            if let Err(e) = sub.next().await {
                break e;
            }
        }
    })
    .await;
    assert!(matches!(end, FeedError::Goaway { .. }), "{end:?}");
    within("shutdown", stopping).await.unwrap();
}

#[tokio::test]
async fn run_serves_until_its_shutdown_future_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(origin::run(plaza_config(&dir), async move {
        let _ = rx.await;
    }));
    tx.send(()).unwrap();
    within("run to return", running).await.unwrap().unwrap();

    let mut bad = plaza_config(&dir);
    bad.world = "atlantis".into();
    bad.avatars = None;
    let err = origin::run(bad, std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("atlantis"), "{err}");
}
