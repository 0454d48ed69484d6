//! The upstream feed over real loopback QUIC: a publisher of a small
//! in-test world (300 entities changing every tick, some coming and going)
//! and subscribers that verify every tick against what was published.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::within;
use proto::msg::{Ack, InputBatch, SessionInput};
use proto::{Component, Encoding, ErrorCode, Field, Layout, Message, Schema, Snapshot};
use statecast_transport::feed::{self, OpenFuture};
use statecast_transport::{
    ALPN_UPSTREAM, FeedError, FeedStats, FeedTick, FramedRecv, FramedSend, PublisherConfig, Source,
    Subscription, TlsConfig, Trust, WorldInfo, Worlds, client_endpoint, server_endpoint,
};
use tokio::sync::{mpsc, watch};

const TICK_RATE: u32 = 50;
const ENTITIES: u32 = 300;
const KEYFRAME_AFTER: u32 = 20;
const SECRET: &[u8] = b"feed-test-secret";

fn schema() -> Schema {
    let int = |name: &str, max| Field {
        name: name.into(),
        encoding: Encoding::Int { min: 0, max },
    };
    Schema {
        name: "test".into(),
        components: vec![Component {
            name: "body".into(),
            fields: vec![int("x", 65535), int("y", 65535), int("mood", 7)],
        }],
        position: None,
        max_entities: 1024,
    }
}

/// The world at `tick`: every entity moves every tick, and a seventeenth of
/// them are absent, a different seventeenth every ten ticks.
fn snapshot(layout: &Layout, tick: u64) -> Snapshot {
    let rows: Vec<(u32, [u32; 3])> = (0..ENTITIES)
        .filter(|&id| (u64::from(id) + tick / 10) % 17 != 0)
        .map(|id| {
            let i = u64::from(id);
            let x = (i * 977 + tick * (1 + i % 5)) % 65536;
            let y = (i * 7919 + tick * 31 + (tick * i) % 97) % 65536;
            let mood = (tick / 7 + i) % 8;
            (id, [x as u32, y as u32, mood as u32])
        })
        .collect();
    Snapshot::from_entities(layout, rows.iter().map(|(id, l)| (*id, &l[..], &[][..]))).unwrap()
}

struct TestWorlds {
    info: WorldInfo,
    ticks: watch::Receiver<Option<Arc<FeedTick>>>,
    inputs: mpsc::Sender<InputBatch>,
}

impl Worlds for TestWorlds {
    fn open(&self, world: &str) -> OpenFuture<'_> {
        let result = if world == self.info.world {
            Ok(Source {
                info: self.info.clone(),
                ticks: self.ticks.clone(),
                inputs: self.inputs.clone(),
            })
        } else {
            Err((ErrorCode::UnknownWorld, format!("no world {world:?} here")))
        };
        Box::pin(std::future::ready(result))
    }
}

/// A publisher of the test world on 127.0.0.1, and a client endpoint.
struct Fixture {
    addr: SocketAddr,
    client: quinn::Endpoint,
    published: Arc<Mutex<BTreeMap<u64, Arc<FeedTick>>>>,
    ticks: watch::Receiver<Option<Arc<FeedTick>>>,
    inputs: mpsc::Receiver<InputBatch>,
    stats: Arc<FeedStats>,
    stop: watch::Sender<bool>,
    serve: tokio::task::JoinHandle<()>,
    producer: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let tls: TlsConfig = Trust::dev(dir.path()).load().unwrap();
        let endpoint = server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            tls.server_config(&[ALPN_UPSTREAM]).unwrap(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let info = WorldInfo::new("test", schema(), TICK_RATE).unwrap();
        let (tick_tx, ticks) = watch::channel(None);
        let (input_tx, inputs) = mpsc::channel(64);
        let published = Arc::new(Mutex::new(BTreeMap::new()));
        let producer = {
            let layout = info.layout.clone();
            let published = published.clone();
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(Duration::from_secs(1) / TICK_RATE);
                for tick in 1.. {
                    interval.tick().await;
                    let snapshot = snapshot(&layout, tick);
                    let feed_tick = Arc::new(FeedTick {
                        tick,
                        origin_time_us: 1_700_000_000_000_000 + tick * 20_000,
                        hash: snapshot.hash(),
                        snapshot: Arc::new(snapshot),
                    });
                    published.lock().unwrap().insert(tick, feed_tick.clone());
                    tick_tx.send_replace(Some(feed_tick));
                }
            })
        };
        let worlds = Arc::new(TestWorlds {
            info,
            ticks: ticks.clone(),
            inputs: input_tx,
        });
        let stats = Arc::new(FeedStats::default());
        let (stop, mut stop_rx) = watch::channel(false);
        let config = PublisherConfig {
            id: "pub-1".into(),
            region: "test-region".into(),
            auth: Some(SECRET.to_vec()),
            keyframe_after: Some(KEYFRAME_AFTER),
            max_connections: 16,
        };
        let serve = tokio::spawn(feed::serve(
            endpoint,
            worlds,
            config,
            stats.clone(),
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        ));
        let mut client = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(tls.client_config(&[ALPN_UPSTREAM]).unwrap());
        Fixture {
            addr,
            client,
            published,
            ticks,
            inputs,
            stats,
            stop,
            serve,
            producer,
            _dir: dir,
        }
    }

    async fn subscribe(&self, world: &str, auth: &[u8]) -> Result<Subscription, FeedError> {
        within(
            "subscribe",
            Subscription::connect(&self.client, self.addr, "localhost", world, auth, "relay-t"),
        )
        .await
    }

    /// Checks a received tick against what was published, bit for bit.
    fn verify(&self, got: &FeedTick) {
        let published = self.published.lock().unwrap();
        let want = published
            .get(&got.tick)
            .unwrap_or_else(|| panic!("tick {} was never published", got.tick));
        assert_eq!(got.hash, want.hash, "tick {}", got.tick);
        assert_eq!(*got.snapshot, *want.snapshot, "tick {}", got.tick);
        assert_eq!(got.origin_time_us, want.origin_time_us);
    }

    /// Waits until the world has published `tick`.
    async fn wait_for_tick(&mut self, tick: u64) {
        within(
            "publisher tick",
            self.ticks
                .wait_for(|t| t.as_ref().is_some_and(|t| t.tick >= tick)),
        )
        .await
        .unwrap();
    }

    fn newest(&self) -> u64 {
        self.ticks.borrow().as_ref().map_or(0, |t| t.tick)
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        within("publisher shutdown", self.serve).await.unwrap();
        self.producer.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_subscribers_receive_verified_ticks() {
    let fixture = Fixture::start().await;
    let mut a = fixture.subscribe("test", SECRET).await.unwrap();
    let mut b = fixture.subscribe("test", SECRET).await.unwrap();
    assert_eq!(a.publisher_id, "pub-1");
    assert_eq!(a.region, "test-region");
    assert_eq!(a.info.tick_rate, TICK_RATE);
    assert_eq!(a.info.schema, schema());

    const TICKS: usize = 60;
    let mut runs = Vec::new();
    for sub in [&mut a, &mut b] {
        let mut ticks = Vec::new();
        let first = within("first tick", sub.next()).await.unwrap();
        fixture.verify(&first);
        ticks.push(first.tick);
        while ticks.len() < TICKS {
            let got = within("next tick", sub.next()).await.unwrap();
            fixture.verify(&got);
            assert!(got.tick > *ticks.last().unwrap(), "ticks go forward");
            ticks.push(got.tick);
        }
        runs.push(ticks);
    }
    // The first update is a keyframe; a subscriber that keeps up gets (nearly)
    // every tick after it as a delta.
    for (sub, ticks) in [&a, &b].into_iter().zip(&runs) {
        let consecutive = ticks.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(
            consecutive * 4 >= (TICKS - 1) * 3,
            "only {consecutive} of {} steps were consecutive: {ticks:?}",
            TICKS - 1
        );
        assert_eq!(sub.counters().updates.load(Ordering::Relaxed), TICKS as u64);
        assert!(sub.counters().keyframes.load(Ordering::Relaxed) >= 1);
        assert_eq!(sub.tick(), ticks.last().copied());
    }
    assert_eq!(fixture.stats.subscribers.load(Ordering::Relaxed), 2);
    assert!(fixture.stats.updates_sent.load(Ordering::Relaxed) >= 2 * TICKS as u64);
    assert!(fixture.stats.bytes_sent.load(Ordering::Relaxed) > 0);
    assert!(a.rtt() < Duration::from_secs(1));
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_jumps_to_the_newest_state() {
    let mut fixture = Fixture::start().await;
    let mut sub = fixture.subscribe("test", SECRET).await.unwrap();
    for _ in 0..10 {
        let got = within("tick", sub.next()).await.unwrap();
        fixture.verify(&got);
    }
    let stalled_at = sub.tick().unwrap();
    let keyframes_before = sub.counters().keyframes.load(Ordering::Relaxed);
    // Stop reading while the world moves on four times `keyframe_after`.
    let stall_ticks = 4 * u64::from(KEYFRAME_AFTER);
    fixture.wait_for_tick(stalled_at + stall_ticks).await;
    let resume_newest = fixture.newest();

    // Resume: what was in flight arrives, then the newest state.
    let mut received = 0;
    let mut last = stalled_at;
    while last < resume_newest {
        let got = within("tick after the stall", sub.next()).await.unwrap();
        fixture.verify(&got);
        assert!(got.tick > last);
        last = got.tick;
        received += 1;
    }
    let published = resume_newest - stalled_at;
    assert!(
        received * 4 <= published,
        "{received} updates to catch up on {published} ticks: a backlog was replayed"
    );
    assert!(
        sub.counters().keyframes.load(Ordering::Relaxed) > keyframes_before,
        "a subscriber {published} ticks behind gets a keyframe"
    );
    assert!(fixture.stats.ticks_superseded.load(Ordering::Relaxed) > 0);
    // And it keeps following, verified.
    for _ in 0..10 {
        let got = within("tick", sub.next()).await.unwrap();
        fixture.verify(&got);
    }
    fixture.stop().await;
}

#[tokio::test]
async fn unknown_world_and_bad_auth_are_refused() {
    let fixture = Fixture::start().await;
    match fixture.subscribe("nowhere", SECRET).await {
        Err(FeedError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::UnknownWorld);
            assert!(message.contains("nowhere"), "{message}");
        }
        other => panic!("expected an unknown world refusal, got {other:?}"),
    }
    match fixture.subscribe("test", b"wrong").await {
        Err(e @ FeedError::Refused { .. }) => {
            assert!(
                matches!(
                    e,
                    FeedError::Refused {
                        code: ErrorCode::BadToken,
                        ..
                    }
                ),
                "{e:?}"
            );
            assert!(!e.retry_safe());
        }
        other => panic!("expected a bad token refusal, got {other:?}"),
    }
    // A refusal ends the stream, not the connection: the next world on the
    // same connection is served.
    let conn = within(
        "connect",
        fixture.client.connect(fixture.addr, "localhost").unwrap(),
    )
    .await
    .unwrap();
    let refused = within(
        "subscribe",
        Subscription::open(conn.clone(), "nowhere", SECRET, "relay-t"),
    )
    .await;
    assert!(matches!(
        refused,
        Err(FeedError::Refused {
            code: ErrorCode::UnknownWorld,
            ..
        })
    ));
    let mut sub = within(
        "subscribe",
        Subscription::open(conn, "test", SECRET, "relay-t"),
    )
    .await
    .unwrap();
    let got = within("tick", sub.next()).await.unwrap();
    fixture.verify(&got);
    assert_eq!(fixture.stats.refused.load(Ordering::Relaxed), 3);
    fixture.stop().await;
}

#[tokio::test]
async fn inputs_reach_the_world() {
    let mut fixture = Fixture::start().await;
    let mut sub = fixture.subscribe("test", SECRET).await.unwrap();
    let got = within("tick", sub.next()).await.unwrap();
    let batches: Vec<InputBatch> = (0..3u32)
        .map(|i| InputBatch {
            tick: got.tick,
            inputs: vec![
                SessionInput {
                    session: 7,
                    seq: i,
                    data: Bytes::from(vec![1, 2, i as u8]),
                },
                SessionInput {
                    session: 9,
                    seq: 100 + i,
                    data: Bytes::from_static(b"\x7f\x00"),
                },
            ],
        })
        .collect();
    for batch in &batches {
        sub.send_inputs(batch.clone()).unwrap();
    }
    for want in &batches {
        let batch = within("input batch", fixture.inputs.recv()).await.unwrap();
        assert_eq!(&batch, want);
    }
    assert_eq!(fixture.stats.input_batches.load(Ordering::Relaxed), 3);
    assert_eq!(fixture.stats.inputs.load(Ordering::Relaxed), 6);
    // Batches above the protocol's limits are refused here, not sent.
    let huge = InputBatch {
        tick: 1,
        inputs: vec![
            SessionInput {
                session: 1,
                seq: 1,
                data: Bytes::from(vec![0; proto::msg::MAX_INPUT_LEN + 1]),
            };
            1
        ],
    };
    assert!(sub.send_inputs(huge).is_err());
    fixture.stop().await;
}

/// Opens a raw stream on a new connection, writes `bytes`, and returns what
/// the publisher answered and how it closed the connection.
async fn raw_exchange(
    fixture: &Fixture,
    bytes: &[u8],
) -> (Option<Message>, quinn::ConnectionError) {
    let conn = within(
        "connect",
        fixture.client.connect(fixture.addr, "localhost").unwrap(),
    )
    .await
    .unwrap();
    let (send, recv) = within("open stream", conn.open_bi()).await.unwrap();
    let mut send = FramedSend::new(send);
    send.stream_mut().write_all(bytes).await.unwrap();
    let mut recv = FramedRecv::new(recv);
    let answer = within("error reply", recv.recv()).await.ok().flatten();
    let closed = within("connection close", conn.closed()).await;
    (answer, closed)
}

fn close_code(e: &quinn::ConnectionError) -> Option<ErrorCode> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Some(ErrorCode::from_code(
            u16::try_from(c.error_code.into_inner()).unwrap(),
        )),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_a_protocol_error_and_others_are_still_served() {
    let fixture = Fixture::start().await;
    let mut good = fixture.subscribe("test", SECRET).await.unwrap();
    fixture.verify(&within("tick", good.next()).await.unwrap());

    // A frame of an unknown type.
    let (answer, closed) = raw_exchange(&fixture, &[0x03, 0x7e, 0xde, 0xad]).await;
    match answer {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::Malformed, "{e:?}"),
        other => panic!("expected an error message, got {other:?}"),
    }
    assert_eq!(
        close_code(&closed),
        Some(ErrorCode::Malformed),
        "{closed:?}"
    );

    // A well-formed message out of place: an ack before subscribing.
    let mut ack = Vec::new();
    Message::Ack(Ack { tick: 5 }).encode(&mut ack).unwrap();
    let (answer, closed) = raw_exchange(&fixture, &ack).await;
    match answer {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::ProtocolViolation, "{e:?}"),
        other => panic!("expected an error message, got {other:?}"),
    }
    assert_eq!(
        close_code(&closed),
        Some(ErrorCode::ProtocolViolation),
        "{closed:?}"
    );
    assert_eq!(fixture.stats.protocol_errors.load(Ordering::Relaxed), 2);

    // The well-behaved subscriber never noticed.
    let mut last = good.tick().unwrap();
    for _ in 0..20 {
        let got = within("tick", good.next()).await.unwrap();
        fixture.verify(&got);
        assert!(got.tick > last);
        last = got.tick;
    }
    fixture.stop().await;
}

#[tokio::test]
async fn shutdown_sends_goaway() {
    let fixture = Fixture::start().await;
    let mut sub = fixture.subscribe("test", SECRET).await.unwrap();
    fixture.verify(&within("tick", sub.next()).await.unwrap());
    let stats = fixture.stats.clone();
    let stopping = tokio::spawn(fixture.stop());
    let end = within("goaway", async {
        loop {
            match sub.next().await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        }
    })
    .await;
    assert!(matches!(end, FeedError::Goaway { .. }), "{end:?}");
    assert!(end.retry_safe());
    within("shutdown", stopping).await.unwrap();
    assert_eq!(stats.subscribers.load(Ordering::Relaxed), 0);
    assert_eq!(stats.connections.load(Ordering::Relaxed), 0);
}
