//! The probe responder: stateless answers to UDP latency probes.
//!
//! Clients choose a relay by pinging several candidates on their probe port
//! ([`proto::msg::Ping`]) and comparing the replies ([`proto::msg::Pong`]):
//! round-trip time, the relay's own RTT to its origin, and its load. The
//! responder keeps no state per probe, and it never helps an attacker:
//!
//! - **No amplification.** A reply is encoded with
//!   [`Pong::encode_reply`], which refuses to write more bytes than the
//!   request had; a ping is at least [`PING_LEN`] bytes and every pong fits
//!   in that.
//! - **Rate limits.** A token bucket per source (per IPv4 address, per /64
//!   for IPv6, since one host commonly holds a whole /64) and one for the
//!   whole responder cap what spoofed floods can reflect at a victim. The
//!   per-source table is bounded ([`Limits::max_sources`]); when it is full
//!   the oldest entry is evicted, and the global bucket still bounds the
//!   total.
//! - **Silence on garbage.** Anything that is not a valid ping is dropped
//!   without an answer and only counted.
//!
//! [`Responder`] is the core without I/O (datagram and time in, reply out);
//! [`serve`] runs it on a tokio UDP socket. A relay starts one on its
//! `probe` address ([`crate::Config::probe`]); tests and tools can run a
//! responder alone, with no upstream.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use proto::msg::{Coords, MAX_PING_LEN, Message, PING_LEN, Pong, VERSION};
use tracing::debug;

/// What a relay says about itself in each pong.
#[derive(Clone, Debug, PartialEq)]
pub struct Info {
    /// Relay id (at most [`proto::msg::MAX_RELAY_ID_LEN`] bytes; longer ids
    /// are cut).
    pub relay_id: String,
    /// Region (at most [`proto::msg::MAX_REGION_LEN`] bytes; longer names
    /// are cut).
    pub region: String,
    /// Load in permille of capacity (1000: full).
    pub load: u16,
    /// RTT to the origin, if known.
    pub origin_rtt: Option<Duration>,
    /// Network coordinates, if computed.
    pub coords: Option<Coords>,
}

impl Info {
    /// The pong answering a ping with `nonce` and `sent_us`.
    fn pong(&self, nonce: u64, sent_us: u64) -> Pong {
        Pong {
            nonce,
            sent_us,
            relay_id: cut(&self.relay_id, proto::msg::MAX_RELAY_ID_LEN),
            region: cut(&self.region, proto::msg::MAX_REGION_LEN),
            load: self.load,
            origin_rtt_us: origin_rtt_us(self.origin_rtt),
            coords: self.coords.filter(|c| c.iter().all(|v| v.is_finite())),
        }
    }
}

/// The wire value of an origin RTT: microseconds, `u32::MAX` when unknown
/// (and at most `u32::MAX - 1` when known, about 71 minutes).
pub fn origin_rtt_us(rtt: Option<Duration>) -> u32 {
    match rtt {
        None => u32::MAX,
        Some(d) => d.as_micros().min(u32::MAX as u128 - 1) as u32,
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Rate limits of a responder.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Probes answered per second per source, sustained.
    pub per_source_rate: f64,
    /// Probes a source may send at once after a quiet spell.
    pub per_source_burst: f64,
    /// Probes answered per second in total, sustained.
    pub global_rate: f64,
    /// Probes answered at once in total.
    pub global_burst: f64,
    /// Sources tracked at once (each entry is a few dozen bytes).
    pub max_sources: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            // A selector sends a few pings per round and a round every few
            // seconds; 50/s with a burst of 100 leaves room for many clients
            // behind one NAT address and still caps what a spoofed flood
            // reflects at one victim to about 50 small replies a second.
            per_source_rate: 50.0,
            per_source_burst: 100.0,
            // 5000 replies of under 100 bytes: under 0.5 MB/s of egress,
            // noise next to the relay's fan-out.
            global_rate: 5000.0,
            global_burst: 10_000.0,
            // 16384 sources: well under a megabyte of table.
            max_sources: 16_384,
        }
    }
}

/// A token bucket: `rate` tokens a second up to `burst`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    /// Refills for the time since the last call and takes one token if
    /// there is one.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Gives back a token taken in vain (the global bucket refused).
    fn refund(&mut self, burst: f64) {
        self.tokens = (self.tokens + 1.0).min(burst);
    }
}

/// The key a source is limited under: the IPv4 address, or the /64 of an
/// IPv6 address (an IPv4-mapped IPv6 address counts as IPv4).
fn source_key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        // The top 64 bits with a marker bit set, so that no IPv6 key equals
        // an IPv4 one.
        IpAddr::V6(v6) => (u128::from(v6) >> 64) | (1 << 64),
    }
}

/// Per-source and global token buckets, with a bounded table of sources.
#[derive(Debug)]
pub struct RateLimiter {
    limits: Limits,
    global: Bucket,
    sources: HashMap<u128, Bucket>,
    /// Sources in the order they entered the table, for eviction.
    order: VecDeque<u128>,
}

impl RateLimiter {
    /// A limiter with every bucket full at `now`.
    pub fn new(limits: Limits, now: Instant) -> RateLimiter {
        RateLimiter {
            global: Bucket::full(limits.global_burst, now),
            limits,
            sources: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether a probe from `ip` may be answered at `now`; takes a token
    /// from its source's bucket and from the global one if so.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = source_key(ip);
        let (rate, burst) = (self.limits.per_source_rate, self.limits.per_source_burst);
        if !self.sources.contains_key(&key) {
            let max = self.limits.max_sources.max(1);
            while self.sources.len() >= max {
                let Some(old) = self.order.pop_front() else {
                    break;
                };
                self.sources.remove(&old);
            }
            self.sources.insert(key, Bucket::full(burst, now));
            self.order.push_back(key);
        }
        let bucket = self.sources.get_mut(&key).expect("inserted above");
        if !bucket.take(rate, burst, now) {
            return false;
        }
        let global = (self.limits.global_rate, self.limits.global_burst);
        if !self.global.take(global.0, global.1, now) {
            // The source did nothing wrong: it keeps its token.
            bucket.refund(burst);
            return false;
        }
        true
    }

    /// Sources tracked now.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }
}

/// What the responder did with one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered: the reply is this many bytes (never more than the request).
    Answered(usize),
    /// Dropped: its source, or the responder as a whole, is over its rate.
    RateLimited,
    /// Dropped: not a valid ping.
    Malformed,
}

impl Outcome {
    /// The `result` label of `statecast_relay_probes_total`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Answered(_) => "answered",
            Outcome::RateLimited => "rate_limited",
            Outcome::Malformed => "malformed",
        }
    }
}

/// The probe protocol without I/O: a datagram and the time in, a reply out.
#[derive(Debug)]
pub struct Responder {
    limiter: RateLimiter,
}

impl Responder {
    /// A responder with fresh rate limits at `now`.
    pub fn new(limits: Limits, now: Instant) -> Responder {
        Responder {
            limiter: RateLimiter::new(limits, now),
        }
    }

    /// Handles one datagram from `from`. When it is a ping within the rate
    /// limits, writes the pong (with what `info` says now) into `reply`,
    /// which it clears first, and returns [`Outcome::Answered`]; otherwise
    /// leaves `reply` empty. The rate limit is checked first, so floods of
    /// garbage cost no decoding.
    pub fn handle(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        info: impl FnOnce() -> Info,
        reply: &mut Vec<u8>,
    ) -> Outcome {
        reply.clear();
        if !self.limiter.allow(from.ip(), now) {
            return Outcome::RateLimited;
        }
        // Checked before decoding too: the decoder would refuse it anyway,
        // but the no-amplification rule should not rest on that alone.
        if datagram.len() < PING_LEN || datagram.len() > MAX_PING_LEN {
            return Outcome::Malformed;
        }
        let ping = match Message::decode_datagram(datagram, VERSION) {
            Ok(Message::Ping(ping)) => ping,
            Ok(_) | Err(_) => return Outcome::Malformed,
        };
        let pong = info().pong(ping.nonce, ping.sent_us);
        match pong.encode_reply(datagram.len(), reply) {
            Ok(()) => Outcome::Answered(reply.len()),
            Err(e) => {
                // Unreachable for a checked pong: MAX_PONG_LEN <= PING_LEN.
                debug!(error = %e, "pong does not encode");
                reply.clear();
                Outcome::Malformed
            }
        }
    }

    /// The rate limiter (for its table size).
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }
}

/// Answers probes on `socket` until `shutdown` resolves, counting each
/// datagram in `counts` (`statecast_relay_probes_total`, label `result`).
/// `info` is asked for the relay's state for each answer, so it should be
/// cheap.
pub async fn serve<I, S>(
    socket: tokio::net::UdpSocket,
    info: I,
    limits: Limits,
    counts: IntCounterVec,
    shutdown: S,
) where
    I: Fn() -> Info + Send,
    S: Future<Output = ()>,
{
    let mut responder = Responder::new(limits, Instant::now());
    let counters = [
        counts.with_label_values(&["answered"]),
        counts.with_label_values(&["rate_limited"]),
        counts.with_label_values(&["malformed"]),
    ];
    // One byte more than the largest ping: a longer datagram arrives
    // truncated to this, still longer than any ping, and is refused.
    let mut buf = vec![0u8; MAX_PING_LEN + 1];
    let mut reply = Vec::with_capacity(PING_LEN);
    tokio::pin!(shutdown);
    loop {
        let (len, from) = tokio::select! {
            _ = &mut shutdown => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors from earlier replies surface here on some
                    // systems; they concern one peer, not the socket.
                    debug!(error = %e, "probe socket receive error");
                    continue;
                }
            },
        };
        let outcome = responder.handle(from, &buf[..len], Instant::now(), &info, &mut reply);
        let counter = match outcome {
            Outcome::Answered(_) => &counters[0],
            Outcome::RateLimited => &counters[1],
            Outcome::Malformed => &counters[2],
        };
        counter.inc();
        if let Outcome::Answered(_) = outcome
            && let Err(e) = socket.send_to(&reply, from).await
        {
            debug!(%from, error = %e, "probe reply not sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::msg::Ping;

    fn info() -> Info {
        Info {
            relay_id: "relay-eu-1".into(),
            region: "eu-west".into(),
            load: 250,
            origin_rtt: Some(Duration::from_micros(12_345)),
            coords: None,
        }
    }

    fn ping(nonce: u64) -> Vec<u8> {
        let mut out = Vec::new();
        Message::Ping(Ping {
            version: VERSION,
            nonce,
            sent_us: 77,
        })
        .encode_datagram(&mut out)
        .unwrap();
        out
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn answers_a_ping_with_a_pong_no_larger_than_it() {
        let now = Instant::now();
        let mut r = Responder::new(Limits::default(), now);
        let mut reply = Vec::new();
        let request = ping(42);
        let out = r.handle(addr("10.0.0.1:5000"), &request, now, info, &mut reply);
        assert_eq!(out, Outcome::Answered(reply.len()));
        assert!(reply.len() <= request.len());
        match Message::decode_datagram(&reply[..], VERSION).unwrap() {
            Message::Pong(p) => {
                assert_eq!(p.nonce, 42);
                assert_eq!(p.sent_us, 77);
                assert_eq!(p.relay_id, "relay-eu-1");
                assert_eq!(p.region, "eu-west");
                assert_eq!(p.load, 250);
                assert_eq!(p.origin_rtt_us, 12_345);
                assert_eq!(p.coords, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_largest_pong_still_fits_the_smallest_ping() {
        let now = Instant::now();
        let mut r = Responder::new(Limits::default(), now);
        let mut reply = Vec::new();
        let big = || Info {
            relay_id: "é".repeat(40),
            region: "ü".repeat(40),
            load: u16::MAX,
            origin_rtt: None,
            coords: Some([1.0, -2.0, 3.0]),
        };
        let request = ping(1);
        assert_eq!(request.len(), PING_LEN);
        let out = r.handle(addr("10.0.0.1:1"), &request, now, big, &mut reply);
        assert!(
            matches!(out, Outcome::Answered(n) if n <= PING_LEN),
            "{out:?}"
        );
        match Message::decode_datagram(&reply[..], VERSION).unwrap() {
            Message::Pong(p) => {
                assert_eq!(p.relay_id.len(), 32);
                assert_eq!(p.region.len(), 24);
                assert_eq!(p.origin_rtt_us, u32::MAX);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_short_pings_and_other_messages_get_no_answer() {
        let now = Instant::now();
        let mut r = Responder::new(Limits::default(), now);
        let mut reply = Vec::new();
        let from = addr("10.0.0.2:1");
        let mut short = ping(1);
        short.truncate(PING_LEN - 1);
        let mut pong = Vec::new();
        info().pong(1, 2).encode_reply(PING_LEN, &mut pong).unwrap();
        let mut wrong_version = Vec::new();
        Message::Ping(Ping {
            version: VERSION + 1,
            nonce: 1,
            sent_us: 1,
        })
        .encode_datagram(&mut wrong_version)
        .unwrap();
        let too_long = [ping(1), vec![0; MAX_PING_LEN]].concat();
        for bad in [
            &[][..],
            &[0x30][..],
            &short[..],
            &pong[..],
            &wrong_version[..],
            &too_long[..],
            &[0xff; 200][..],
        ] {
            assert_eq!(
                r.handle(from, bad, now, info, &mut reply),
                Outcome::Malformed,
                "{bad:?}"
            );
            assert!(reply.is_empty());
        }
        // A padded ping longer than PING_LEN is fine, and the reply stays
        // below it.
        let mut long = ping(9);
        long.resize(500, 7);
        assert!(matches!(
            r.handle(from, &long, now, info, &mut reply),
            Outcome::Answered(n) if n <= PING_LEN
        ));
    }

    #[test]
    fn each_source_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let limits = Limits {
            per_source_rate: 50.0,
            per_source_burst: 100.0,
            ..Limits::default()
        };
        let mut l = RateLimiter::new(limits, t0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let allowed = (0..1000).filter(|_| l.allow(a, t0)).count();
        assert_eq!(allowed, 100);
        // Another source is not affected.
        assert!(l.allow(b, t0));
        // One second later: 50 more for a.
        let t1 = t0 + Duration::from_secs(1);
        let allowed = (0..1000).filter(|_| l.allow(a, t1)).count();
        assert_eq!(allowed, 50);
        // Ten seconds of steady 100/s from a: about 50/s answered.
        let mut answered = 0;
        for i in 0..1000u32 {
            let t = t1 + Duration::from_millis(10) * (i + 1);
            answered += l.allow(a, t) as u32;
        }
        assert!((495..=505).contains(&answered), "{answered}");
    }

    #[test]
    fn ipv6_sources_share_a_bucket_per_64() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(Limits::default(), t0);
        let mut allowed = 0;
        for i in 0..1000u32 {
            let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            allowed += l.allow(ip, t0) as u32;
        }
        assert_eq!(allowed, 100);
        assert!(l.allow("2001:db8:1:3::1".parse().unwrap(), t0));
        // A mapped IPv4 address is the IPv4 address.
        let v4: IpAddr = "10.9.9.9".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.9.9.9".parse().unwrap();
        let allowed = (0..200)
            .filter(|i| l.allow(if i % 2 == 0 { v4 } else { mapped }, t0))
            .count();
        assert_eq!(allowed, 100);
    }

    #[test]
    fn the_global_bucket_caps_a_spoofed_flood_and_the_table_stays_bounded() {
        let t0 = Instant::now();
        let limits = Limits {
            global_rate: 1000.0,
            global_burst: 2000.0,
            max_sources: 1000,
            ..Limits::default()
        };
        let mut l = RateLimiter::new(limits, t0);
        // 100 000 probes in one second, each from a different address.
        let mut answered = 0u32;
        for i in 0..100_000u32 {
            let t = t0 + Duration::from_micros(10) * i;
            let ip = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
            answered += l.allow(ip, t) as u32;
            assert!(l.sources() <= 1000);
        }
        // The burst plus one second of rate.
        assert!((2900..=3001).contains(&answered), "{answered}");
    }

    #[test]
    fn a_refused_global_token_is_not_charged_to_the_source() {
        let t0 = Instant::now();
        let limits = Limits {
            per_source_burst: 2.0,
            per_source_rate: 0.0,
            global_burst: 1.0,
            global_rate: 0.0,
            ..Limits::default()
        };
        let mut l = RateLimiter::new(limits, t0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(l.allow(b, t0));
        assert!(!l.allow(a, t0));
        assert_eq!(l.sources.get(&source_key(a)).unwrap().tokens, 2.0);
    }

    #[tokio::test]
    async fn serve_answers_over_udp_and_counts() {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = socket.local_addr().unwrap();
        let metrics = crate::metrics::Metrics::new();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            socket,
            info,
            Limits::default(),
            metrics.probes.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"hello", at).await.unwrap();
        client.send_to(&ping(5), at).await.unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("a pong within 5 s")
            .unwrap();
        assert_eq!(from, at);
        assert!(n <= PING_LEN);
        assert!(matches!(
            Message::decode_datagram(&buf[..n], VERSION).unwrap(),
            Message::Pong(Pong { nonce: 5, .. })
        ));
        let count = |r: &str| metrics.probes.with_label_values(&[r]).get();
        assert_eq!(count("answered"), 1);
        assert_eq!(count("malformed"), 1);
        assert_eq!(count("rate_limited"), 0);
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve stops on shutdown")
            .unwrap();
    }
}
