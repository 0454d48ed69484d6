//! The client session against a fake relay built from the real pieces: a
//! quinn server with a development CA in a temporary directory, ALPN
//! `statecast/1`, the relay's fan-out core (`WorldState`, `ClientView`,
//! `ChunkCache`) fed with plaza snapshots, updates sent as datagrams or, when
//! too large, on their own unidirectional streams, and acks read back.
//!
//! The fake relay serves lock-step: it sends a tick, then waits for its ack
//! (with a deadline, past which it carries on as a real relay would), so the
//! tests are deterministic without sleeping. Every wait has a deadline.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use origin::Simulation;
use origin::worlds::plaza::{Plaza, PlazaConfig};
use proto::interest::Grid;
use proto::msg::{
    Area, Error as ErrorMsg, Goaway, Hello, Input, Message, Resume, VERSION, Welcome,
};
use proto::{ErrorCode, Layout};
use relay::fanout::{ChunkCache, ClientView, Interest, TickState, WorldState};
use statecast_client::session::{self, Config, Session, SessionError, SessionEvent};
use tokio::sync::mpsc;
use tokio::time::Instant;
use transport::{ALPN_CLIENT, FramedRecv, FramedSend, TlsConfig, TransportTuning, Trust};

/// The longest any single wait of these tests may take.
const DEADLINE: Duration = Duration::from_secs(20);
/// How long the fake relay waits for an ack before carrying on.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// How long it waits for the ack of a tampered update, which never comes.
const NO_ACK_WAIT: Duration = Duration::from_millis(100);
const WORLD: &str = "plaza";
const SESSION_ID: u64 = 0x5e55_1014;

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {DEADLINE:?}"))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A development CA in a temporary directory, trusted by both ends.
struct Pki {
    tls: TlsConfig,
    _dir: tempfile::TempDir,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let tls = Trust::dev(dir.path()).load().unwrap();
    Pki { tls, _dir: dir }
}

fn relay_endpoint(tls: &TlsConfig) -> quinn::Endpoint {
    transport::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        tls.server_config(&[ALPN_CLIENT]).unwrap(),
    )
    .unwrap()
}

fn client_endpoint(tls: &TlsConfig) -> quinn::Endpoint {
    session::endpoint(tls, "127.0.0.1:0".parse().unwrap()).unwrap()
}

fn config(relay: SocketAddr) -> Config {
    Config::new(relay, WORLD)
}

/// The plaza as a relay holds it.
struct World {
    plaza: Plaza,
    layout: Arc<Layout>,
    state: WorldState,
    cache: ChunkCache,
    tick: u64,
}

impl World {
    /// 200 avatars on 300 m: a keyframe of the whole world (about 2 KB) is
    /// too large for a datagram, the deltas (about 700 bytes) fit one.
    fn new() -> World {
        let plaza = Plaza::new(PlazaConfig {
            avatars: 200,
            size_m: 300.0,
            seed: 3,
        });
        let layout = Arc::new(plaza.schema().layout().unwrap());
        let state = WorldState::new(layout.clone(), Some(Grid::new(50.0)), 64);
        World {
            plaza,
            layout,
            state,
            cache: ChunkCache::new(true),
            tick: 0,
        }
    }

    fn step(&mut self) -> Arc<TickState> {
        self.plaza.step();
        self.tick += 1;
        let snapshot = Arc::new(self.plaza.snapshot(&self.layout));
        let hash = snapshot.hash();
        let (state, evicted) = self
            .state
            .push(self.tick, now_us(), hash, snapshot)
            .unwrap();
        if let Some(old) = evicted {
            self.cache.evict_before(old + 1);
        }
        state
    }

    fn welcome(&self) -> Welcome {
        Welcome {
            version: VERSION,
            session: SESSION_ID,
            world: WORLD.to_owned(),
            schema: self.plaza.schema().clone(),
            tick_rate: 20,
            tick: self.tick,
            relay_id: "fake-relay".to_owned(),
            region: "test".to_owned(),
        }
    }
}

fn fanout_interest(area: Option<Area>) -> Interest {
    match area {
        None => Interest::All,
        Some(a) => Interest::Around {
            x: a.x.into(),
            y: a.y.into(),
            radius: a.radius.into(),
        },
    }
}

/// What the fake relay does after the handshake.
#[derive(Clone, Debug)]
enum Script {
    /// Sends an error instead of a welcome (or, with `message: false`,
    /// closes the connection with the code and says nothing).
    Refuse { code: ErrorCode, message: bool },
    /// Answers the hello with bytes that are no message.
    GarbageBeforeWelcome,
    /// Welcomes the client and serves ticks.
    Serve(Serve),
}

#[derive(Clone, Debug, Default)]
struct Serve {
    /// Ticks the world runs before the welcome (a relay joined late, or the
    /// relay a client resumes on).
    skip: u64,
    /// Ticks to serve.
    ticks: u64,
    /// Tick whose update gets a wrong hash.
    tamper: Option<u64>,
    /// Tick before which an update stream is opened, half written and reset.
    reset_before: Option<u64>,
    /// Tick before which an update stream is opened, half written and
    /// finished (a relay that drops a stream instead of resetting it).
    truncate_before: Option<u64>,
    /// What to do after the last tick.
    then: Then,
}

#[derive(Clone, Debug, Default)]
enum Then {
    /// Keep the connection until the client closes it or it times out.
    #[default]
    Hold,
    /// Send garbage on the control stream.
    Garbage,
    /// Send a goaway, then an error with this code, then wait for the close.
    Leave(ErrorCode),
}

/// What the fake relay saw and did.
#[derive(Debug, Default)]
struct Report {
    hello: Option<Hello>,
    keyframes: u64,
    deltas: u64,
    datagrams: u64,
    streams: u64,
    first_update: Option<(u64, Option<u64>)>,
    acks: Vec<u64>,
    inputs: Vec<Input>,
    interests: Vec<Option<Area>>,
    closed: Option<quinn::ConnectionError>,
}

enum FromClient {
    Ack(u64),
    Input(Input),
    Interest(Option<Area>),
}

struct FakeRelay {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<Report>,
    _endpoint: quinn::Endpoint,
}

impl FakeRelay {
    fn start(tls: &TlsConfig, script: Script) -> FakeRelay {
        let endpoint = relay_endpoint(tls);
        let addr = endpoint.local_addr().unwrap();
        let task = tokio::spawn(serve_one(endpoint.clone(), script));
        FakeRelay {
            addr,
            task,
            _endpoint: endpoint,
        }
    }

    async fn report(self) -> Report {
        within("the fake relay's report", self.task).await.unwrap()
    }
}

async fn serve_one(endpoint: quinn::Endpoint, script: Script) -> Report {
    let mut report = Report::default();
    let incoming = endpoint.accept().await.expect("a client connects");
    let conn = incoming.await.expect("QUIC handshake");
    let (send, recv) = conn.accept_bi().await.expect("the control stream");
    let mut send = FramedSend::new(send);
    let mut recv = FramedRecv::new(recv);
    let hello = match recv.recv().await {
        Ok(Some(Message::Hello(hello))) => hello,
        other => panic!("expected a hello, got {other:?}"),
    };
    assert_eq!(hello.version, VERSION);
    assert!(
        hello.agent.starts_with("statecast-client/"),
        "{}",
        hello.agent
    );
    report.hello = Some(hello.clone());
    let serve = match script {
        Script::Refuse { code, message } => {
            if message {
                let error = ErrorMsg {
                    code,
                    message: format!("no world named {:?}", hello.world),
                };
                send.send(&Message::Error(error)).await.unwrap();
                send.finish().unwrap();
            } else {
                conn.close(code.to_code().into(), b"go away");
            }
            report.closed = Some(conn.closed().await);
            return report;
        }
        Script::GarbageBeforeWelcome => {
            // Length 5, type 0x7f (no such message), then junk.
            send.stream_mut().write_all(b"\x05\x7fjunk").await.unwrap();
            report.closed = Some(conn.closed().await);
            return report;
        }
        Script::Serve(serve) => serve,
    };

    let mut world = World::new();
    for _ in 0..serve.skip {
        world.step();
    }
    send.send(&Message::Welcome(world.welcome())).await.unwrap();
    let interest = fanout_interest(hello.interest);
    let mut view = match &hello.resume {
        Some(Resume {
            last_ack, cells, ..
        }) => ClientView::resume(interest, 64, *last_ack, cells.clone()),
        None => ClientView::new(interest, 64),
    };

    let (tx, mut rx) = mpsc::unbounded_channel();
    let datagrams = tokio::spawn({
        let conn = conn.clone();
        let tx = tx.clone();
        async move {
            while let Ok(datagram) = conn.read_datagram().await {
                match Message::decode_datagram(datagram, VERSION) {
                    Ok(Message::Ack(ack)) => _ = tx.send(FromClient::Ack(ack.tick)),
                    Ok(Message::Input(input)) => _ = tx.send(FromClient::Input(input)),
                    other => {
                        panic!("the client sent a datagram that is no ack or input: {other:?}")
                    }
                }
            }
        }
    });
    let control = tokio::spawn(async move {
        while let Ok(Some(msg)) = recv.recv().await {
            match msg {
                Message::Interest(i) => _ = tx.send(FromClient::Interest(i.area)),
                other => panic!("the client sent {other:?} on the control stream"),
            }
        }
    });

    let handle = |msg: FromClient, view: &mut ClientView, report: &mut Report| match msg {
        FromClient::Ack(tick) => {
            view.on_ack(tick);
            report.acks.push(tick);
        }
        FromClient::Input(input) => report.inputs.push(input),
        FromClient::Interest(area) => {
            view.set_interest(fanout_interest(area));
            report.interests.push(area);
        }
    };

    for _ in 0..serve.ticks {
        let state = world.step();
        let tick = state.tick;
        while let Ok(msg) = rx.try_recv() {
            handle(msg, &mut view, &mut report);
        }
        if serve.reset_before == Some(tick) {
            let mut stream = conn.open_uni().await.unwrap();
            // The head of a large frame, then abandoned.
            stream.write_all(&[0x48, 0x00, 0x10, 0x01]).await.unwrap();
            stream.reset(0u32.into()).unwrap();
        }
        if serve.truncate_before == Some(tick) {
            let mut stream = conn.open_uni().await.unwrap();
            stream.write_all(&[0x48, 0x00, 0x10, 0x01]).await.unwrap();
            stream.finish().unwrap();
        }
        let built = view
            .build_update(&world.state, &state, &world.cache)
            .unwrap();
        if built.keyframe {
            report.keyframes += 1;
        } else {
            report.deltas += 1;
        }
        let mut update = built.update;
        report
            .first_update
            .get_or_insert((update.tick, update.base));
        let tampered = serve.tamper == Some(tick);
        if tampered {
            update.hash ^= 1;
        }
        let msg = Message::Update(update);
        if msg.datagram_len() <= conn.max_datagram_size().unwrap() {
            transport::send_datagram(&conn, &msg).unwrap();
            report.datagrams += 1;
        } else {
            let mut stream = FramedSend::new(conn.open_uni().await.unwrap());
            stream.send(&msg).await.unwrap();
            stream.finish().unwrap();
            report.streams += 1;
        }
        // Lock-step: wait for this tick's ack, as long as a real relay
        // would wait for a tick (or briefly, for the tampered one).
        let deadline = Instant::now() + if tampered { NO_ACK_WAIT } else { ACK_WAIT };
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            let acked = matches!(msg, FromClient::Ack(t) if t >= tick);
            handle(msg, &mut view, &mut report);
            if acked {
                break;
            }
        }
    }

    match serve.then {
        Then::Hold => {}
        Then::Garbage => {
            send.stream_mut().write_all(b"\x05\x7fjunk").await.unwrap();
        }
        Then::Leave(code) => {
            let goaway = Goaway {
                reason: "draining".to_owned(),
                redirect: Some("127.0.0.1:9".to_owned()),
                deadline_ms: 500,
            };
            send.send(&Message::Goaway(goaway)).await.unwrap();
            let error = ErrorMsg {
                code,
                message: "this relay is shutting down".to_owned(),
            };
            send.send(&Message::Error(error)).await.unwrap();
            send.finish().unwrap();
        }
    }
    report.closed = Some(conn.closed().await);
    datagrams.abort();
    control.abort();
    while let Ok(msg) = rx.try_recv() {
        handle(msg, &mut view, &mut report);
    }
    report
}

/// Every `next_event` until the session reaches `tick` (or ends), with a
/// deadline for the whole run.
async fn run_until(session: &mut Session, tick: u64) -> Vec<SessionEvent> {
    within("the session to reach its tick", async {
        let mut events = Vec::new();
        loop {
            let event = session.next_event().await.expect("a session event");
            let done = match &event {
                SessionEvent::Applied { tick: t, .. } => *t >= tick,
                SessionEvent::Closed { .. } => true,
                _ => false,
            };
            events.push(event);
            if done {
                return events;
            }
        }
    })
    .await
}

#[tokio::test]
async fn applies_verified_ticks_mostly_as_deltas_and_recovers_from_a_divergence() {
    let pki = pki();
    let relay = FakeRelay::start(
        &pki.tls,
        Script::Serve(Serve {
            ticks: 60,
            tamper: Some(20),
            reset_before: Some(30),
            truncate_before: Some(35),
            ..Serve::default()
        }),
    );
    let endpoint = client_endpoint(&pki.tls);
    let mut config = config(relay.addr);
    config.events = true;
    let mut session = within("connect", Session::connect(&endpoint, config))
        .await
        .unwrap();
    assert_eq!(session.session_id(), SESSION_ID);
    assert_eq!(session.welcome().world, WORLD);
    assert_eq!(session.welcome().tick_rate, 20);

    let mut events = run_until(&mut session, 10).await;
    // A burst of six inputs: two go at once, the rest wait for the pace.
    for i in 0..6u8 {
        session.send_input(&[b'i', i]).unwrap();
    }
    assert!(matches!(
        session.send_input(&[0; 65]),
        Err(SessionError::InputTooLarge { len: 65, max: 64 })
    ));
    events.extend(run_until(&mut session, 40).await);
    let area = Area {
        x: 150.0,
        y: 150.0,
        radius: 60.0,
    };
    within("set_interest", session.set_interest(Some(area)))
        .await
        .unwrap();
    assert_eq!(session.interest(), Some(area));
    events.extend(run_until(&mut session, 60).await);

    // Exactly one divergence, for the tampered tick, then recovery.
    let divergences: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Divergence {
                tick,
                expected,
                got,
            } => Some((*tick, *expected, *got)),
            _ => None,
        })
        .collect();
    assert_eq!(divergences.len(), 1, "{divergences:?}");
    let (tick, expected, got) = divergences[0];
    assert_eq!(tick, 20);
    assert_eq!(expected.0 ^ 1, got.0, "only the hash was tampered with");
    let applied: Vec<(u64, bool)> = events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Applied { tick, keyframe, .. } => Some((*tick, *keyframe)),
            _ => None,
        })
        .collect();
    assert!(!applied.iter().any(|(t, _)| *t == 20));
    let after = applied.iter().find(|(t, _)| *t > 20).unwrap();
    assert_eq!(after.0, 21, "the next update repairs the replica");
    assert!(
        applied.windows(2).all(|w| w[0].0 < w[1].0),
        "ticks only move forward"
    );

    // The first event is a keyframe of the whole world, with every entity
    // added; later ticks report changes.
    match &events[0] {
        SessionEvent::Applied {
            keyframe: true,
            events,
            latency_us,
            ..
        } => {
            assert_eq!(events.len(), 200);
            assert!(
                events
                    .iter()
                    .all(|e| matches!(e, statecast_client::Event::Added(_)))
            );
            assert!(latency_us.is_some());
        }
        other => panic!("first event: {other:?}"),
    }
    assert!(events.iter().skip(1).any(|e| matches!(
        e,
        SessionEvent::Applied { events, .. } if events.iter().any(|e| matches!(e, statecast_client::Event::Changed(_)))
    )));

    let stats = session.stats().clone();
    let held = session.replica().current().unwrap();
    assert_eq!(held.tick(), 60);
    assert!(
        held.entity_count() < 200,
        "the narrower interest holds part of the world"
    );
    let token = session.resume_token().unwrap();
    assert_eq!(token.session, SESSION_ID);
    assert_eq!(token.last_ack, 60);
    assert_eq!(token.cells, held.cells().collect::<Vec<_>>());
    session.close().await;
    let report = relay.report().await;

    assert_eq!(stats.divergences, 1);
    assert_eq!(stats.hash_checked, stats.ticks_applied + 1);
    assert!(
        stats.ticks_applied >= 55,
        "applied {} of 59",
        stats.ticks_applied
    );
    assert!(
        stats.keyframes <= 2,
        "{} keyframes: acks must flow",
        stats.keyframes
    );
    assert_eq!(stats.keyframes, report.keyframes);
    assert!(report.deltas >= 55, "{report:?}");
    assert!(report.streams >= 1, "the keyframe goes on a stream");
    assert!(report.datagrams >= 50, "deltas go as datagrams");
    assert_eq!(
        stats.updates_received,
        report.streams + report.datagrams,
        "loopback loses nothing"
    );
    assert_eq!(stats.updates_on_streams, report.streams);
    assert!(stats.bytes_received > 0);
    assert_eq!(stats.stream_resets, 1, "the reset stream is only counted");
    assert_eq!(stats.streams_truncated, 1, "so is the truncated one");
    assert_eq!(stats.decode_errors, 0);
    assert_eq!(stats.latency_ms.count(), stats.ticks_applied);
    assert!(stats.latency_ms.p99_ms().unwrap() < 5_000.0);
    assert_eq!(stats.acks_sent, stats.ticks_applied);
    assert!(
        !report.acks.contains(&20),
        "a divergent tick is never acked"
    );
    // Every applied tick is acked; the close may overtake the last ack.
    assert!(
        report
            .acks
            .iter()
            .all(|t| applied.iter().any(|(a, _)| a == t))
    );
    assert!(report.acks.len() as u64 + 1 >= stats.ticks_applied);
    assert_eq!(report.interests, vec![Some(area)]);

    // Inputs: newest first, up to three older ones repeated; together they
    // carry all six, and the rate limit held some back.
    assert!(stats.inputs_deferred >= 1, "{stats:?}");
    assert_eq!(stats.inputs_sent as usize, report.inputs.len());
    let last = report.inputs.last().unwrap();
    assert_eq!(last.seq, 5);
    let expect: Vec<Bytes> = (2..6u8).rev().map(|i| Bytes::from(vec![b'i', i])).collect();
    assert_eq!(last.inputs, expect);
    let mut seen = std::collections::BTreeSet::new();
    for input in &report.inputs {
        for (i, data) in input.inputs.iter().enumerate() {
            let seq = input.seq - i as u32;
            assert_eq!(data[..], [b'i', seq as u8]);
            seen.insert(seq);
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );

    match report.closed {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code.into_inner(), 0);
        }
        other => panic!("the client should close normally: {other:?}"),
    }
    endpoint.wait_idle().await;
}

#[tokio::test]
async fn a_refusal_is_refused_with_the_relays_code() {
    let pki = pki();
    let endpoint = client_endpoint(&pki.tls);
    for message in [true, false] {
        let relay = FakeRelay::start(
            &pki.tls,
            Script::Refuse {
                code: ErrorCode::UnknownWorld,
                message,
            },
        );
        let mut config = config(relay.addr);
        config.world = "atlantis".to_owned();
        let error = within("connect", Session::connect(&endpoint, config))
            .await
            .unwrap_err();
        match &error {
            SessionError::Refused {
                code,
                message: text,
            } => {
                assert_eq!(*code, ErrorCode::UnknownWorld);
                if message {
                    assert!(text.contains("atlantis"), "{text}");
                }
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(
            !error.is_retry_safe(),
            "an unknown world is unknown anywhere"
        );
        let report = relay.report().await;
        assert_eq!(report.hello.unwrap().world, "atlantis");
        assert!(report.closed.is_some());
    }
}

#[tokio::test]
async fn garbage_from_the_relay_is_a_protocol_error() {
    let pki = pki();
    let endpoint = client_endpoint(&pki.tls);

    // Instead of a welcome.
    let relay = FakeRelay::start(&pki.tls, Script::GarbageBeforeWelcome);
    let error = within("connect", Session::connect(&endpoint, config(relay.addr)))
        .await
        .unwrap_err();
    assert!(matches!(error, SessionError::Protocol(_)), "{error:?}");
    assert_eq!(error.blame(), statecast_client::Blame::Relay);
    let report = relay.report().await;
    match report.closed {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(
                close.error_code.into_inner(),
                u64::from(ErrorCode::Malformed.to_code())
            );
        }
        other => panic!("the client should close with `malformed`: {other:?}"),
    }

    // After the welcome, on the control stream.
    let relay = FakeRelay::start(
        &pki.tls,
        Script::Serve(Serve {
            ticks: 3,
            then: Then::Garbage,
            ..Serve::default()
        }),
    );
    let mut session = within("connect", Session::connect(&endpoint, config(relay.addr)))
        .await
        .unwrap();
    let error = within("the protocol error", async {
        loop {
            match session.next_event().await {
                Ok(SessionEvent::Applied { .. }) => {}
                Ok(other) => panic!("unexpected event {other:?}"),
                Err(e) => break e,
            }
        }
    })
    .await;
    match &error {
        SessionError::Protocol(message) => {
            assert!(message.contains("control stream"), "{message}")
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert_eq!(session.stats().ticks_applied, 3);
    assert!(matches!(
        session.next_event().await,
        Err(SessionError::Closed { .. })
    ));
    assert!(session.send_input(b"x").is_err());
    let report = relay.report().await;
    assert!(matches!(
        report.closed,
        Some(quinn::ConnectionError::ApplicationClosed(_))
    ));
}

#[tokio::test]
async fn a_draining_relay_says_goaway_then_closed() {
    let pki = pki();
    let endpoint = client_endpoint(&pki.tls);
    let relay = FakeRelay::start(
        &pki.tls,
        Script::Serve(Serve {
            ticks: 5,
            then: Then::Leave(ErrorCode::Draining),
            ..Serve::default()
        }),
    );
    let mut session = within("connect", Session::connect(&endpoint, config(relay.addr)))
        .await
        .unwrap();
    let events = run_until(&mut session, u64::MAX).await;
    let goaway = events
        .iter()
        .find_map(|e| match e {
            SessionEvent::Goaway(g) => Some(g.clone()),
            _ => None,
        })
        .expect("a goaway");
    assert_eq!(goaway.redirect.as_deref(), Some("127.0.0.1:9"));
    match events.last().unwrap() {
        SessionEvent::Closed { code, reason } => {
            assert_eq!(*code, Some(ErrorCode::Draining));
            assert!(reason.contains("shutting down"), "{reason}");
        }
        other => panic!("expected the end, got {other:?}"),
    }
    let error = session.next_event().await.unwrap_err();
    assert!(matches!(
        error,
        SessionError::Closed {
            code: Some(ErrorCode::Draining),
            ..
        }
    ));
    assert_eq!(error.retry(), proto::msg::Retry::Elsewhere);
    // Whatever arrived before the end was applied.
    assert!(session.stats().ticks_applied >= 4);
    relay.report().await;
}

/// A UDP forwarder that can be cut, to make a relay vanish without a word.
struct Cable {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

async fn cable(to: SocketAddr) -> Cable {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(to).await.unwrap();
    let addr = front.local_addr().unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn({
        let cut = cut.clone();
        async move {
            let mut client = None;
            let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut up) => {
                        client = Some(from);
                        if !cut.load(Ordering::SeqCst) {
                            let _ = back.send(&up[..n]).await;
                        }
                    }
                    Ok(n) = back.recv(&mut down) => {
                        if let (Some(c), false) = (client, cut.load(Ordering::SeqCst)) {
                            let _ = front.send_to(&down[..n], c).await;
                        }
                    }
                }
            }
        }
    });
    Cable { addr, cut, task }
}

#[tokio::test]
async fn a_relay_that_vanishes_ends_the_session_as_closed() {
    let pki = pki();
    let relay = FakeRelay::start(
        &pki.tls,
        Script::Serve(Serve {
            ticks: 5,
            ..Serve::default()
        }),
    );
    let cable = cable(relay.addr).await;
    // A short idle timeout, so the loss is noticed within a second.
    let mut tuning = TransportTuning::default();
    tuning.keep_alive = Duration::from_millis(200);
    tuning.idle_timeout = Duration::from_secs(1);
    let endpoint = client_endpoint(&pki.tls.clone().with_transport(tuning));
    let mut session = within("connect", Session::connect(&endpoint, config(cable.addr)))
        .await
        .unwrap();
    run_until(&mut session, 5).await;
    cable.cut.store(true, Ordering::SeqCst);
    let events = run_until(&mut session, u64::MAX).await;
    match events.last().unwrap() {
        SessionEvent::Closed { code, reason } => {
            assert_eq!(*code, None, "nobody said anything");
            assert!(reason.contains("idle timeout"), "{reason}");
        }
        other => panic!("expected the end, got {other:?}"),
    }
    let error = session.next_event().await.unwrap_err();
    assert_eq!(error.retry(), proto::msg::Retry::Elsewhere);
    assert_eq!(error.blame(), statecast_client::Blame::Network);
    cable.task.abort();
    let report = relay.report().await;
    assert!(matches!(
        report.closed,
        Some(quinn::ConnectionError::TimedOut)
    ));
}

#[tokio::test]
async fn a_session_resumes_on_another_relay_without_a_keyframe() {
    let pki = pki();
    let endpoint = client_endpoint(&pki.tls);
    let area = Area {
        x: 100.0,
        y: 120.0,
        radius: 70.0,
    };
    let first = FakeRelay::start(
        &pki.tls,
        Script::Serve(Serve {
            ticks: 10,
            ..Serve::default()
        }),
    );
    let mut config = config(first.addr);
    config.interest = Some(area);
    let mut session = within("connect", Session::connect(&endpoint, config.clone()))
        .await
        .unwrap();
    run_until(&mut session, 10).await;
    let token = session.resume_token().expect("a tick is held");
    assert_eq!(token.last_ack, 10);
    assert!(!token.cells.is_empty());
    let hash = session.replica().current().unwrap().hash();
    let mut replica = session.into_replica();
    assert_eq!(replica.current().unwrap().hash(), hash);
    first.report().await;

    // The second relay runs the same world; ticks are global.
    let second = FakeRelay::start(
        &pki.tls,
        Script::Serve(Serve {
            skip: 10,
            ticks: 10,
            ..Serve::default()
        }),
    );
    config.relay = second.addr;
    config.resume = Some(token.clone());
    let mut session = within("resume", Session::resume(&endpoint, config, &mut replica))
        .await
        .unwrap();
    assert!(replica.current().is_none(), "the session took the state");
    let events = run_until(&mut session, 20).await;
    match &events[0] {
        SessionEvent::Applied {
            tick: 11,
            keyframe: false,
            ..
        } => {}
        other => panic!("expected a delta for tick 11, got {other:?}"),
    }
    let stats = session.stats().clone();
    assert_eq!(stats.keyframes, 0);
    assert_eq!(stats.divergences, 0);
    assert_eq!(stats.ticks_applied, 10);
    session.close().await;
    let report = second.report().await;
    assert_eq!(report.hello.unwrap().resume, Some(token));
    assert_eq!(report.keyframes, 0);
    assert_eq!(report.first_update, Some((11, Some(10))));
}
