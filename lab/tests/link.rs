//! The link emulator does what it promises: measured on loopback, with
//! real sockets, against the conditions it was given.
//!
//! Every wait has a deadline; the only fixed waits are where a test must
//! show that something does *not* arrive.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use statecast_lab::link::{Direction, Link, LinkConfig, LinkStats, RATE_QUEUE_BYTES};
use tokio::net::UdpSocket;
use tokio::time::{Instant, MissedTickBehavior, timeout_at};

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn bind() -> UdpSocket {
    UdpSocket::bind(loopback()).await.unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A packet that says which it is: sequence number, then padding.
fn packet(seq: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len.max(8)];
    data[..8].copy_from_slice(&seq.to_be_bytes());
    data
}

fn seq_of(data: &[u8]) -> u64 {
    u64::from_be_bytes(data[..8].try_into().unwrap())
}

/// What a receiver saw: (sequence number, size, arrival).
type Arrivals = Vec<(u64, usize, Instant)>;

/// Receives on `socket` until `count` packets came or `deadline` passed.
fn receive(
    socket: UdpSocket,
    count: usize,
    deadline: Instant,
) -> tokio::task::JoinHandle<Arrivals> {
    tokio::spawn(async move {
        let mut arrivals = Vec::with_capacity(count);
        let mut buf = vec![0u8; 65536];
        while arrivals.len() < count {
            match timeout_at(deadline, socket.recv_from(&mut buf)).await {
                Ok(Ok((len, _))) => {
                    let now = Instant::now();
                    if len >= 8 {
                        arrivals.push((seq_of(&buf[..len]), len, now));
                    }
                }
                Ok(Err(e)) => panic!("receive failed: {e}"),
                Err(_) => break,
            }
        }
        arrivals
    })
}

/// Receives on a socket in the background, for tests that learn only
/// later how many packets to expect.
struct Collector {
    seqs: Arc<std::sync::Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    fn start(socket: UdpSocket) -> Collector {
        let seqs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let seqs = seqs.clone();
            async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((len, _)) = socket.recv_from(&mut buf).await {
                    if len >= 8 {
                        seqs.lock().unwrap().push(seq_of(&buf[..len]));
                    }
                }
            }
        });
        Collector { seqs, task }
    }

    /// Waits until `count` packets came (or the deadline), and returns how
    /// many came.
    async fn wait_for(&self, count: usize, deadline: Instant) -> usize {
        while self.seqs.lock().unwrap().len() < count && Instant::now() < deadline {
            tokio::time::sleep(ms(5)).await;
        }
        self.seqs.lock().unwrap().len()
    }

    fn seqs(&self) -> Vec<u64> {
        self.seqs.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `count` numbered packets of `len` bytes to `to`, `per_tick` every
/// `tick`, and returns each one's send time.
async fn send_paced(
    socket: &UdpSocket,
    to: SocketAddr,
    count: u64,
    len: usize,
    per_tick: u64,
    tick: Duration,
) -> Vec<Instant> {
    let mut sent = Vec::with_capacity(count as usize);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0;
    while seq < count {
        interval.tick().await;
        for _ in 0..per_tick.min(count - seq) {
            let data = packet(seq, len);
            sent.push(Instant::now());
            socket.send_to(&data, to).await.unwrap();
            seq += 1;
        }
    }
    sent
}

/// Waits until `done(stats)` holds, or panics at the deadline.
async fn wait_stats(
    link: &Link,
    deadline: Instant,
    done: impl Fn(&LinkStats) -> bool,
) -> LinkStats {
    loop {
        let stats = link.stats();
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "stats never settled: {stats:?}");
        tokio::time::sleep(ms(5)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Arrivals that came after a packet with a higher sequence number.
fn out_of_order(arrivals: &Arrivals) -> usize {
    let mut max = None;
    let mut late = 0;
    for &(seq, _, _) in arrivals {
        match max {
            Some(m) if seq < m => late += 1,
            _ => max = Some(seq),
        }
    }
    late
}

fn up_only(up: Direction, seed: u64) -> LinkConfig {
    LinkConfig {
        up,
        down: Direction::default(),
        seed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_is_a_floor_and_jitter_spreads_it() {
    const N: u64 = 600;
    let server = bind().await;
    let config = up_only(
        Direction {
            delay: ms(30),
            jitter: ms(5),
            ..Direction::default()
        },
        1,
    );
    let link = Link::start(loopback(), server.local_addr().unwrap(), config)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    let receiver = receive(server, N as usize, deadline);
    let client = bind().await;
    // 600 packets over about two seconds, three at a time: jitter keeps
    // order, so a packet waits for the one ahead of it, and only packets
    // further apart than the jitter draw it freely.
    let sent = send_paced(&client, link.local_addr(), N, 64, 3, ms(10)).await;
    let arrivals = receiver.await.unwrap();
    assert_eq!(arrivals.len(), N as usize, "a lossless link lost packets");
    assert_eq!(out_of_order(&arrivals), 0, "jitter reordered packets");

    let mut delays: Vec<Duration> = arrivals
        .iter()
        .map(|&(seq, _, at)| at.duration_since(sent[seq as usize]))
        .collect();
    delays.sort();
    let (min, p5, median, p95) = (
        delays[0],
        percentile(&delays, 0.05),
        percentile(&delays, 0.5),
        percentile(&delays, 0.95),
    );
    eprintln!(
        "one-way delay over {N} packets: min {min:?}, p5 {p5:?}, median {median:?}, p95 {p95:?}"
    );
    assert!(min >= ms(29), "a packet arrived before the delay: {min:?}");
    assert!(
        median >= ms(29) && median <= ms(40),
        "median {median:?} is not about 30 ms + jitter"
    );
    // Uniform jitter in [0, 5] ms, each of three packets no earlier than
    // the one ahead: p5..p95 spread over about 4 ms.
    assert!(
        p95 - p5 >= ms(2),
        "jitter did not spread delays: p5 {p5:?}, p95 {p95:?}"
    );
    let stats = link.stats();
    assert_eq!(stats.up.packets_in, N);
    assert_eq!(stats.up.forwarded, N);
    assert_eq!(stats.up.dropped_loss + stats.up.dropped_queue, 0);
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_drops_its_share() {
    const N: u64 = 5000;
    let server = bind().await;
    let config = up_only(
        Direction {
            loss: 0.1,
            ..Direction::default()
        },
        2,
    );
    let link = Link::start(loopback(), server.local_addr().unwrap(), config)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(6);
    let collector = Collector::start(server);
    let client = bind().await;
    send_paced(&client, link.local_addr(), N, 32, 10, ms(1)).await;
    let stats = wait_stats(&link, deadline, |s| {
        s.up.packets_in == N && s.up.forwarded + s.up.dropped_loss == N
    })
    .await;
    // Everything the link forwarded arrives, and nothing more.
    let received = collector
        .wait_for(stats.up.forwarded as usize, deadline)
        .await;
    assert_eq!(received, stats.up.forwarded as usize);
    let lost = N as f64 - received as f64;
    let share = lost / N as f64;
    eprintln!("loss 0.1: {lost} of {N} lost ({:.2}%)", share * 100.0);
    assert!((0.07..=0.13).contains(&share), "lost {share}");
    assert_eq!(stats.up.dropped_loss, N - stats.up.forwarded);
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_reorder_reorders_and_jitter_keeps_order() {
    const N: u64 = 1000;
    let cases = [
        ("reorder 0.2", 0.2, ms(0)),
        ("jitter 5 ms", 0.0, ms(5)),
        ("neither", 0.0, ms(0)),
    ];
    for (name, reorder, jitter) in cases {
        let server = bind().await;
        let config = up_only(
            Direction {
                delay: ms(10),
                jitter,
                reorder,
                ..Direction::default()
            },
            3,
        );
        let link = Link::start(loopback(), server.local_addr().unwrap(), config)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let receiver = receive(server, N as usize, deadline);
        let client = bind().await;
        send_paced(&client, link.local_addr(), N, 32, 10, ms(1)).await;
        let arrivals = receiver.await.unwrap();
        assert_eq!(arrivals.len(), N as usize, "{name}: packets lost");
        let late = out_of_order(&arrivals);
        let stats = link.stats();
        eprintln!(
            "{name}: {late} of {N} arrived out of order (link counted {})",
            stats.up.reordered
        );
        if reorder > 0.0 {
            // A fifth is held back 10 ms, behind about 100 later packets.
            assert!(
                (100..=300).contains(&late),
                "{name}: {late} out of order, expected about 200"
            );
            assert!(stats.up.reordered > 0);
        } else {
            // Jitter (5 ms, packets 1 ms apart: a jitter that reordered
            // would swap hundreds) delays but keeps order, as a queue does.
            assert_eq!(late, 0, "{name}: order was not kept");
            assert_eq!(stats.up.reordered, 0);
        }
        link.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_delivers_its_rate_and_drops_the_excess() {
    const LEN: usize = 1000;
    const RATE_KBPS: u64 = 500;
    let server = bind().await;
    let config = up_only(
        Direction {
            rate_kbps: Some(RATE_KBPS),
            ..Direction::default()
        },
        4,
    );
    let link = Link::start(loopback(), server.local_addr().unwrap(), config)
        .await
        .unwrap();
    let window = Duration::from_secs(2);
    let start = Instant::now();
    // Receive until two seconds after the first arrival.
    let receiver = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut arrivals: Vec<Instant> = Vec::new();
        let mut deadline = start + Duration::from_secs(4);
        while let Ok(Ok(_)) = timeout_at(deadline, server.recv_from(&mut buf)).await {
            let now = Instant::now();
            if arrivals.is_empty() {
                deadline = now + window;
            }
            arrivals.push(now);
        }
        arrivals
    });
    let client = bind().await;
    // 2 Mbit/s offered: two 1000-byte packets every 8 ms, for 2 s.
    let sent = send_paced(&client, link.local_addr(), 500, LEN, 2, ms(8)).await;
    let offered_secs = sent.last().unwrap().duration_since(sent[0]).as_secs_f64();
    let arrivals = receiver.await.unwrap();
    let first = arrivals[0];
    let in_window = arrivals
        .iter()
        .filter(|&&t| t > first && t <= first + window)
        .count();
    let kbps = (in_window * LEN * 8) as f64 / window.as_secs_f64() / 1000.0;
    let offered_kbps = (500 * LEN * 8) as f64 / offered_secs / 1000.0;
    let stats = link.stats();
    eprintln!(
        "rate {RATE_KBPS} kbps: offered {offered_kbps:.0} kbps, delivered {kbps:.0} kbps; \
         in {}, forwarded {}, dropped {}, queued {}",
        stats.up.packets_in, stats.up.forwarded, stats.up.dropped_queue, stats.up.queued
    );
    assert!(offered_kbps > 1800.0, "the test did not offer 2 Mbit/s");
    let rate = RATE_KBPS as f64;
    assert!(
        (rate * 0.85..=rate * 1.15).contains(&kbps),
        "delivered {kbps:.0} kbps through a {rate} kbps limit"
    );
    // The excess beyond the bounded queue was dropped, and every packet is
    // accounted for.
    assert!(stats.up.dropped_queue > 0, "nothing dropped: {stats:?}");
    assert!(stats.up.queued as usize * LEN <= RATE_QUEUE_BYTES + 1500);
    let accounted = stats.up.forwarded + stats.up.dropped_queue + stats.up.queued;
    assert!(
        stats.up.packets_in.abs_diff(accounted) <= 1,
        "packets unaccounted for: {stats:?}"
    );
    link.stop().await;
}

/// Echoes every datagram back to its sender, tagged with the sender's
/// address as the server saw it.
fn echo(server: UdpSocket) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((len, from)) = server.recv_from(&mut buf).await else {
                continue;
            };
            let _ = server.send_to(&buf[..len], from).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_back_to_the_right_client() {
    let server = bind().await;
    let server_addr = server.local_addr().unwrap();
    let echo = echo(server);
    let link = Link::start(
        loopback(),
        server_addr,
        LinkConfig::symmetric(Direction::delayed(ms(5))),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut clients = Vec::new();
    for id in 0..3u64 {
        let socket = Arc::new(bind().await);
        let receiver = {
            let socket = socket.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let mut got = Vec::new();
                while got.len() < 20 {
                    match timeout_at(deadline, socket.recv_from(&mut buf)).await {
                        Ok(Ok((len, _))) => got.push(buf[..len].to_vec()),
                        _ => break,
                    }
                }
                got
            })
        };
        clients.push((id, socket, receiver));
    }
    for k in 0..20u64 {
        for (id, socket, _) in &clients {
            let mut data = packet(*id, 16);
            data[8..16].copy_from_slice(&k.to_be_bytes());
            socket.send_to(&data, link.local_addr()).await.unwrap();
        }
    }
    for (id, _, receiver) in clients {
        let got = receiver.await.unwrap();
        assert_eq!(got.len(), 20, "client {id} got {} replies", got.len());
        for reply in got {
            assert_eq!(seq_of(&reply), id, "client {id} got another's reply");
        }
    }
    assert_eq!(link.stats().flows, 3);
    let stats = link.stats();
    assert_eq!((stats.up.forwarded, stats.down.forwarded), (60, 60));
    link.stop().await;
    echo.abort();
}

/// Sends one packet through the link and waits for its echo.
async fn ping(client: &UdpSocket, to: SocketAddr, seq: u64, wait: Duration) -> bool {
    client.send_to(&packet(seq, 16), to).await.unwrap();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 64];
    while let Ok(Ok((len, _))) = timeout_at(deadline, client.recv_from(&mut buf)).await {
        if len >= 8 && seq_of(&buf[..len]) == seq {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_link_live_and_healing_it() {
    let server = bind().await;
    let server_addr = server.local_addr().unwrap();
    let echo = echo(server);
    let open = LinkConfig::symmetric(Direction::delayed(ms(5)));
    let link = Link::start(loopback(), server_addr, open.clone())
        .await
        .unwrap();
    let client = bind().await;
    let to = link.local_addr();
    assert!(ping(&client, to, 1, Duration::from_secs(2)).await);

    link.set(LinkConfig::symmetric(Direction {
        delay: ms(5),
        loss: 1.0,
        ..Direction::default()
    }));
    assert_eq!(link.config().up.loss, 1.0);
    let before = link.stats();
    for seq in 100..120 {
        client.send_to(&packet(seq, 16), to).await.unwrap();
    }
    // All 20 reached the link and were dropped there...
    let deadline = Instant::now() + Duration::from_secs(2);
    let stats = wait_stats(&link, deadline, |s| {
        s.up.packets_in == before.up.packets_in + 20
    })
    .await;
    assert_eq!(stats.up.dropped_loss, before.up.dropped_loss + 20);
    assert_eq!(stats.up.forwarded, before.up.forwarded);
    // ...and nothing comes back (ten times the RTT to show it).
    let mut buf = [0u8; 64];
    let silent = timeout_at(Instant::now() + ms(100), client.recv_from(&mut buf)).await;
    assert!(silent.is_err(), "a packet crossed a cut link");

    link.set(open);
    assert!(
        ping(&client, to, 2, Duration::from_secs(2)).await,
        "the link did not heal"
    );
    link.stop().await;
    echo.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_datagram_size_passes_and_stop_frees_the_port() {
    let server = bind().await;
    let server_addr = server.local_addr().unwrap();
    let echo = echo(server);
    let link = Link::start(
        loopback(),
        server_addr,
        LinkConfig::symmetric(Direction::delayed(ms(1))),
    )
    .await
    .unwrap();
    let client = bind().await;
    let to = link.local_addr();
    let mut buf = vec![0u8; 65536];
    // Largest IPv4 UDP payload, then an empty datagram, then a small one.
    for len in [65_507usize, 0, 9] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        client.send_to(&data, to).await.unwrap();
        let (got, _) = timeout_at(
            Instant::now() + Duration::from_secs(2),
            client.recv_from(&mut buf),
        )
        .await
        .expect("no echo")
        .unwrap();
        assert_eq!(&buf[..got], &data[..], "datagram of {len} bytes changed");
    }
    link.stop().await;
    // The listening port is free again once stop returns.
    UdpSocket::bind(to).await.expect("stop left the port bound");
    echo.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_fate() {
    async fn survivors(seed: u64) -> Vec<u64> {
        const N: u64 = 300;
        let server = bind().await;
        let config = up_only(
            Direction {
                loss: 0.5,
                ..Direction::default()
            },
            seed,
        );
        let link = Link::start(loopback(), server.local_addr().unwrap(), config)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let collector = Collector::start(server);
        let client = bind().await;
        send_paced(&client, link.local_addr(), N, 16, 10, ms(1)).await;
        let stats = wait_stats(&link, deadline, |s| s.up.forwarded + s.up.dropped_loss == N).await;
        let received = collector
            .wait_for(stats.up.forwarded as usize, deadline)
            .await;
        assert_eq!(received as u64, stats.up.forwarded);
        link.stop().await;
        let mut seqs: Vec<u64> = collector.seqs();
        seqs.sort();
        seqs
    }
    let a = survivors(7).await;
    let b = survivors(7).await;
    let c = survivors(8).await;
    assert_eq!(a, b, "the same seed dropped different packets");
    assert_ne!(a, c, "different seeds dropped the same packets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_handshakes_and_exchanges_data_through_a_lossy_link() {
    let dir = tempfile::tempdir().unwrap();
    let tls = transport::Trust::dev(dir.path()).load().unwrap();
    let server =
        transport::server_endpoint(loopback(), tls.server_config(&[b"t"]).unwrap()).unwrap();
    let server_addr = server.local_addr().unwrap();
    let condition = Direction {
        delay: ms(20),
        loss: 0.05,
        ..Direction::default()
    };
    let config = LinkConfig {
        up: condition.clone(),
        down: condition,
        seed: 9,
    };
    let link = Link::start(loopback(), server_addr, config).await.unwrap();

    const LEN: usize = 200_000;
    let serve = tokio::spawn(async move {
        let incoming = server.accept().await.expect("no connection");
        let connection = incoming.await.expect("server handshake failed");
        let (mut send, mut recv) = connection.accept_bi().await.unwrap();
        let data = recv.read_to_end(LEN).await.unwrap();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        // Keep the connection until the client closes it.
        connection.closed().await;
        server.wait_idle().await;
    });

    let client = transport::client_endpoint(loopback()).unwrap();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(12);
    let exchange = async {
        let connection = client
            .connect_with(
                tls.client_config(&[b"t"]).unwrap(),
                link.local_addr(),
                "localhost",
            )
            .unwrap()
            .await
            .expect("client handshake failed");
        let handshake = started.elapsed();
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        let data: Vec<u8> = (0..LEN).map(|i| (i % 253) as u8).collect();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        let echoed = recv.read_to_end(LEN).await.unwrap();
        assert!(echoed == data, "the echo differs");
        let rtt = connection.rtt();
        connection.close(0u32.into(), b"done");
        (handshake, rtt)
    };
    let (handshake, rtt) = timeout_at(deadline, exchange)
        .await
        .expect("QUIC exchange through the link timed out");
    let stats = link.stats();
    eprintln!(
        "QUIC through 20 ms + 5% loss each way: handshake {handshake:?}, rtt {rtt:?}, \
         {LEN} bytes echoed in {:?}; dropped up {} / down {}",
        started.elapsed(),
        stats.up.dropped_loss,
        stats.down.dropped_loss
    );
    assert!(
        rtt >= ms(38),
        "QUIC measured an RTT of {rtt:?} through a 40 ms link"
    );
    assert!(
        stats.up.dropped_loss + stats.down.dropped_loss > 0,
        "nothing was lost: {stats:?}"
    );
    let _ = timeout_at(Instant::now() + Duration::from_secs(2), serve).await;
    link.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_conditions_and_a_dead_server_do_not_stop_the_link() {
    // Nothing listens behind the link: its sends draw ICMP errors.
    let dead = bind().await.local_addr().unwrap();
    let absurd = Direction {
        delay: Duration::MAX,
        jitter: Duration::MAX,
        loss: f64::NAN,
        reorder: f64::INFINITY,
        rate_kbps: Some(u64::MAX),
    };
    let link = Link::start(loopback(), dead, LinkConfig::symmetric(absurd))
        .await
        .unwrap();
    let client = bind().await;
    let to = link.local_addr();
    let deadline = Instant::now() + Duration::from_secs(5);
    let burst = |len| {
        let client = &client;
        async move {
            for seq in 0..10 {
                client.send_to(&packet(seq, len), to).await.unwrap();
            }
        }
    };
    // Held for an hour (the clamp), not lost: NaN loss is no loss.
    burst(100).await;
    wait_stats(&link, deadline, |s| s.up.queued == 10).await;

    // A zero rate lets nothing through.
    link.set(LinkConfig::symmetric(Direction {
        loss: -1.0,
        rate_kbps: Some(0),
        ..Direction::default()
    }));
    burst(100).await;
    wait_stats(&link, deadline, |s| s.up.dropped_queue == 10).await;

    // A plain link sends on to the dead server; the errors are counted, and
    // the link keeps taking packets.
    link.set(LinkConfig::default());
    for round in 0..3 {
        burst(1000).await;
        let want = 30 + round * 10;
        wait_stats(&link, deadline, |s| {
            s.up.packets_in == want && s.up.forwarded + s.up.send_errors == want - 20
        })
        .await;
    }
    let stats = link.stats();
    eprintln!("dead server: {stats:?}");
    assert_eq!(stats.up.queued, 10);
    link.stop().await;
}
