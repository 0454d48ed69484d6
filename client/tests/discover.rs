//! Discovery against real DNS servers: an authoritative zone served by
//! hickory-server on a loopback port, in-process; and the same zone served
//! by a dnsmasq process (skipped when dnsmasq is not installed, except under
//! `CI=true`, where that fails). Also the other sources of candidates: a
//! relay's directory (sent to a real session) and static lists.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::Server;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::rdata::{A, SOA, SRV, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use statecast_client::discover::{DiscoverError, Discoverer, SERVICE};
use tokio::net::UdpSocket;

const TTL: u32 = 30;

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn srv(domain: &str, priority: u16, weight: u16, port: u16, target: &str) -> Record {
    srv_ttl(domain, priority, weight, port, target, TTL)
}

fn srv_ttl(domain: &str, priority: u16, weight: u16, port: u16, target: &str, ttl: u32) -> Record {
    Record::from_rdata(
        name(&format!("{SERVICE}.{domain}")),
        ttl,
        RData::SRV(SRV::new(priority, weight, port, name(target))),
    )
}

fn txt(host: &str, strings: &[&str], ttl: u32) -> Record {
    Record::from_rdata(
        name(host),
        ttl,
        RData::TXT(TXT::new(strings.iter().map(|s| s.to_string()).collect())),
    )
}

fn a(host: &str, ip: [u8; 4]) -> Record {
    Record::from_rdata(name(host), TTL, RData::A(A(Ipv4Addr::from(ip))))
}

type Zone = InMemoryZoneHandler<TokioRuntimeProvider>;

/// Serves the zone `zone.test.` with `records` on 127.0.0.1, UDP.
async fn serve(records: Vec<Record>) -> (SocketAddr, Server<Catalog>) {
    let (addr, server, _) = serve_zone(records).await;
    (addr, server)
}

/// The same, with a handle to change the zone while it is served.
async fn serve_zone(records: Vec<Record>) -> (SocketAddr, Server<Catalog>, Arc<Zone>) {
    let origin = name("zone.test.");
    let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
        origin.clone(),
        ZoneType::Primary,
        AxfrPolicy::Deny,
    );
    let soa = SOA::new(
        name("ns.zone.test."),
        name("admin.zone.test."),
        1,
        3600,
        600,
        86_400,
        TTL,
    );
    assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)), 1));
    for record in records {
        assert!(zone.upsert_mut(record, 1));
    }
    let zone = Arc::new(zone);
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&origin), vec![zone.clone()]);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let mut server = Server::new(catalog);
    server.register_socket(socket);
    (addr, server, zone)
}

fn zone() -> Vec<Record> {
    vec![
        srv("zone.test.", 10, 50, 4434, "relay1.zone.test."),
        srv("zone.test.", 10, 80, 5434, "relay2.zone.test."),
        srv("zone.test.", 20, 50, 6434, "relay3.zone.test."),
        srv("zone.test.", 10, 10, 7434, "old.zone.test."),
        srv("zone.test.", 10, 10, 8434, "noprobe.zone.test."),
        txt(
            "relay1.zone.test.",
            &["region=eu-west", "probe=4435", "v=1"],
            TTL,
        ),
        // Everything in one string, and a shorter TTL.
        txt(
            "relay2.zone.test.",
            &["region=us-east probe=5435 coords=1.5,-2,0.25 origin=12.5"],
            7,
        ),
        txt("relay3.zone.test.", &["probe=6435"], TTL),
        txt("old.zone.test.", &["region=eu-west probe=7435 v=99"], TTL),
        txt("noprobe.zone.test.", &["region=eu-west"], TTL),
        a("relay1.zone.test.", [127, 0, 0, 2]),
        a("relay2.zone.test.", [127, 0, 0, 3]),
        a("relay3.zone.test.", [127, 0, 0, 4]),
        a("old.zone.test.", [127, 0, 0, 5]),
        a("noprobe.zone.test.", [127, 0, 0, 6]),
        // A name that exists, without SRV records.
        txt("_statecast._udp.empty.zone.test.", &["nothing here"], TTL),
        // A domain whose only relay is unusable.
        srv("broken.zone.test.", 10, 10, 4434, "noprobe.zone.test."),
    ]
}

#[tokio::test]
async fn finds_relays_with_their_probe_ports_regions_and_ttl() {
    let (dns, _server) = serve(zone()).await;
    check_zone(dns).await;
}

/// What every server of [`zone`] must give: the usable relays in order
/// with their addresses, TXT data and SRV fields, the unusable ones with
/// their reasons, and an answer that expires with the shortest TTL (7 s).
async fn check_zone(dns: SocketAddr) {
    let discoverer = Discoverer::with_server(dns, Duration::from_secs(5));
    let before = Instant::now();
    let found = discoverer.discover("zone.test").await.unwrap();
    let after = Instant::now();
    let hosts: Vec<&str> = found.relays.iter().map(|r| r.host.as_str()).collect();
    // Priority first, then the heavier weight.
    assert_eq!(
        hosts,
        ["relay2.zone.test", "relay1.zone.test", "relay3.zone.test"]
    );
    let r2 = &found.relays[0];
    assert_eq!(r2.connect, "127.0.0.3:5434".parse().unwrap());
    assert_eq!(r2.probe, "127.0.0.3:5435".parse().unwrap());
    assert_eq!(r2.region.as_deref(), Some("us-east"));
    assert_eq!(r2.coords, Some([1.5, -2.0, 0.25]));
    assert_eq!(r2.origin_rtt, Some(Duration::from_micros(12_500)));
    assert_eq!(r2.version, None);
    assert_eq!((r2.priority, r2.weight), (10, 80));
    let r1 = &found.relays[1];
    assert_eq!(r1.probe, "127.0.0.2:4435".parse().unwrap());
    assert_eq!(r1.origin_rtt, None);
    assert_eq!(r1.version, Some(1));
    assert_eq!(found.relays[2].region, None);
    // The skipped ones, with their reasons.
    let mut skipped: Vec<(String, String)> = found
        .skipped
        .iter()
        .map(|s| (s.host.clone(), s.reason.clone()))
        .collect();
    skipped.sort();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].0, "noprobe.zone.test");
    assert!(skipped[0].1.contains("probe"), "{skipped:?}");
    assert_eq!(skipped[1].0, "old.zone.test");
    assert!(skipped[1].1.contains("version 99"), "{skipped:?}");
    // The answer expires with its shortest TTL (relay2's TXT: 7 s),
    // counted from when the answer came.
    let seven = Duration::from_secs(7);
    assert!(
        found.valid_until >= before + seven && found.valid_until <= after + seven,
        "{:?} after the start",
        found.valid_until - before
    );
    // As selector candidates.
    let c = r2.candidate(Some(Duration::from_millis(12)));
    assert_eq!((c.addr, c.connect), (r2.probe, r2.connect));
    assert_eq!(c.region.as_deref(), Some("us-east"));
    assert_eq!(c.hint, Some(Duration::from_millis(12)));
}

#[tokio::test]
async fn missing_names_and_records_are_told_apart() {
    let (dns, _server) = serve(zone()).await;
    check_missing(dns).await;
}

/// No such name, no SRV records, no usable relay, a bad name: each its own
/// error.
async fn check_missing(dns: SocketAddr) {
    let discoverer = Discoverer::with_server(dns, Duration::from_secs(5));
    match discoverer.discover("nothing.zone.test").await {
        Err(DiscoverError::NoSuchName { name }) => {
            assert_eq!(name, "_statecast._udp.nothing.zone.test.")
        }
        other => panic!("{other:?}"),
    }
    match discoverer.discover("empty.zone.test").await {
        Err(DiscoverError::NoRecords { .. }) => {}
        other => panic!("{other:?}"),
    }
    match discoverer.discover("broken.zone.test").await {
        Err(e @ DiscoverError::NoUsableRelay { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("noprobe.zone.test") && text.contains("probe"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        discoverer.discover("").await,
        Err(DiscoverError::BadName { .. })
    ));
}

#[tokio::test]
async fn a_silent_server_times_out_by_the_deadline() {
    // Bound, but nothing answers.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let deadline = Duration::from_millis(600);
    let discoverer = Discoverer::with_server(silent.local_addr().unwrap(), deadline);
    let start = Instant::now();
    let result = discoverer.discover("zone.test").await;
    let took = start.elapsed();
    assert!(
        matches!(result, Err(DiscoverError::Timeout { .. })),
        "{result:?}"
    );
    assert!(took < deadline + Duration::from_secs(1), "{took:?}");
    // The query did go out.
    let mut buf = [0u8; 512];
    let got = tokio::time::timeout(Duration::from_secs(1), silent.recv_from(&mut buf)).await;
    assert!(got.is_ok(), "no query reached the server");
}

#[tokio::test]
async fn answers_are_cached_for_their_ttl_and_refreshed_after() {
    let (dns, _server, zone) = serve_zone(vec![
        srv_ttl("zone.test.", 10, 10, 4434, "relay1.zone.test.", 2),
        txt("relay1.zone.test.", &["probe=4435"], 2),
        a("relay1.zone.test.", [127, 0, 0, 2]),
    ])
    .await;
    let discoverer = Discoverer::with_server(dns, Duration::from_secs(5));
    let first = discoverer.discover("zone.test").await.unwrap();
    assert_eq!(first.relays.len(), 1);
    assert!(first.valid_until <= Instant::now() + Duration::from_secs(2));
    // A second relay is published.
    assert!(
        zone.upsert(
            srv_ttl("zone.test.", 10, 10, 5434, "relay2.zone.test.", 2),
            2
        )
        .await
    );
    assert!(
        zone.upsert(txt("relay2.zone.test.", &["probe=5435"], 2), 2)
            .await
    );
    assert!(zone.upsert(a("relay2.zone.test.", [127, 0, 0, 3]), 2).await);
    // Until the answer expires, it is served from the cache ...
    let cached = discoverer.discover("zone.test").await.unwrap();
    assert!(Instant::now() < first.valid_until, "the test was too slow");
    assert_eq!(cached.relays.len(), 1);
    // ... and after, asked again.
    tokio::time::sleep_until((first.valid_until + Duration::from_millis(50)).into()).await;
    let fresh = discoverer.discover("zone.test").await.unwrap();
    assert_eq!(fresh.relays.len(), 2, "{:?}", fresh.relays);
}

// ---------------------------------------------------------------------------
// The same zone served by dnsmasq.

/// A dnsmasq process serving [`zone`] on a loopback port; killed on drop.
struct Dnsmasq {
    child: std::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// [`zone`] as dnsmasq configuration lines (a file rather than flags:
/// only the file parser unquotes a TXT string holding commas). dnsmasq has
/// one TTL for all its local records, set to 7 s, the shortest TTL of the
/// hickory-server zone, so that the same expiry check holds.
fn dnsmasq_zone() -> Vec<String> {
    let srv = |domain: &str, target: &str, port: u16, priority: u16, weight: u16| {
        format!("srv-host={SERVICE}.{domain},{target},{port},{priority},{weight}")
    };
    let mut args = vec![
        srv("zone.test", "relay1.zone.test", 4434, 10, 50),
        srv("zone.test", "relay2.zone.test", 5434, 10, 80),
        srv("zone.test", "relay3.zone.test", 6434, 20, 50),
        srv("zone.test", "old.zone.test", 7434, 10, 10),
        srv("zone.test", "noprobe.zone.test", 8434, 10, 10),
        srv("broken.zone.test", "noprobe.zone.test", 4434, 10, 10),
        // Three strings.
        "txt-record=relay1.zone.test,region=eu-west,probe=4435,v=1".into(),
        // One string (quoted: it holds commas).
        r#"txt-record=relay2.zone.test,"region=us-east probe=5435 coords=1.5,-2,0.25 origin=12.5""#
            .into(),
        "txt-record=relay3.zone.test,probe=6435".into(),
        "txt-record=old.zone.test,region=eu-west probe=7435 v=99".into(),
        "txt-record=noprobe.zone.test,region=eu-west".into(),
        format!("txt-record={SERVICE}.empty.zone.test,nothing here"),
    ];
    for (host, last) in [
        ("relay1", 2),
        ("relay2", 3),
        ("relay3", 4),
        ("old", 5),
        ("noprobe", 6),
    ] {
        args.push(format!("host-record={host}.zone.test,127.0.0.{last}"));
    }
    args
}

/// Whether a dnsmasq test must run: under `CI=true` a missing dnsmasq is a
/// failure, elsewhere a skip with a note.
fn dnsmasq_binary() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("dnsmasq"))
        .find(|path| path.is_file());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "dnsmasq is not installed, and CI must run this test \
             (Debian package dnsmasq-base; scripts/test.sh installs it)"
        );
        eprintln!("skipped: dnsmasq is not installed (Debian package dnsmasq-base)");
    }
    found
}

impl Dnsmasq {
    /// Starts dnsmasq on a free loopback port and waits (up to 10 s) until
    /// it answers for the zone.
    async fn start(binary: &std::path::Path) -> Dnsmasq {
        let deadline = Instant::now() + Duration::from_secs(10);
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("zone.conf");
        std::fs::write(&conf, dnsmasq_zone().join("\n") + "\n").unwrap();
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A port that was free a moment ago; if dnsmasq loses a race
            // for it, it exits and the next attempt takes another.
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = std::process::Command::new(binary)
                .args([
                    "--keep-in-foreground",
                    // Only this file: not /etc/dnsmasq.conf.
                    "--pid-file=",
                    "--user=root",
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    "--no-resolv",
                    "--no-hosts",
                    "--local=/zone.test/",
                    "--local-ttl=7",
                    "--log-facility=-",
                ])
                .arg(format!("--port={port}"))
                .arg(format!("--conf-file={}", conf.display()))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("dnsmasq starts");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let probe = Discoverer::with_server(addr, Duration::from_millis(300));
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut err);
                    }
                    assert!(
                        attempt < 5 && Instant::now() < deadline,
                        "dnsmasq exited ({status}): {err}"
                    );
                    break;
                }
                if probe.discover("zone.test").await.is_ok() {
                    // Stderr is not read any more: let it go nowhere.
                    drop(child.stderr.take());
                    return Dnsmasq {
                        child,
                        addr,
                        _dir: dir,
                    };
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    panic!("dnsmasq did not answer on {addr} within 10 s");
                }
            }
        }
    }
}

#[tokio::test]
async fn dnsmasq_serves_the_same_discovery() {
    let Some(binary) = dnsmasq_binary() else {
        return;
    };
    let dnsmasq = Dnsmasq::start(&binary).await;
    check_zone(dnsmasq.addr).await;
    check_missing(dnsmasq.addr).await;
}

// ---------------------------------------------------------------------------
// A relay's directory, through a real session, and static lists.

use proto::msg::{Directory, RelayInfo};
use statecast_client::discover::{Candidates, from_directory, from_static};
use statecast_client::session::{self, Session, SessionEvent};

fn peer(id: &str, addr: &str, probe_addr: &str, region: &str) -> relay::config::Peer {
    relay::config::Peer {
        id: id.into(),
        addr: addr.into(),
        probe_addr: probe_addr.into(),
        region: region.into(),
        coords: None,
        origin_ms: None,
    }
}

/// The next directory the session reports, within 10 s.
async fn next_directory(session: &mut Session) -> Directory {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match session.next_event().await.expect("the session goes on") {
                SessionEvent::Directory(directory) => return directory,
                SessionEvent::Closed { reason, .. } => panic!("closed: {reason}"),
                _ => {}
            }
        }
    })
    .await
    .expect("a directory within 10 s")
}

fn reasons(c: &Candidates) -> Vec<(String, String)> {
    let mut r: Vec<_> = c
        .skipped
        .iter()
        .map(|s| (s.host.clone(), s.reason.clone()))
        .collect();
    r.sort();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relays_directory_reaches_the_session_and_becomes_candidates() {
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let stack = common::stack(relay::Config {
        id: "relay-eu-1".into(),
        region: "eu-west".into(),
        probe: Some(local),
        directory: vec![
            relay::config::Peer {
                coords: Some([40.0, -3.5, 2.0]),
                origin_ms: Some(42.5),
                ..peer("relay-us-1", "127.0.0.3:5434", "127.0.0.3:5435", "us-east")
            },
            // A name: resolved through DNS, or skipped without it.
            peer(
                "relay-ap-1",
                "relay1.zone.test:6434",
                "relay1.zone.test:6435",
                "ap-south",
            ),
        ],
        ..relay::Config::default()
    })
    .await;
    let (relay, endpoint) = (&stack.relay, &stack.endpoint);
    let mut session = Session::connect(endpoint, session::Config::new(relay.client_addr, "plaza"))
        .await
        .expect("the session opens");

    // Right after the welcome: the relay itself first, with its bound
    // addresses and load, then its peers.
    let directory = next_directory(&mut session).await;
    let ids: Vec<&str> = directory.relays.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["relay-eu-1", "relay-us-1", "relay-ap-1"]);
    let own = &directory.relays[0];
    assert_eq!(own.addr, relay.client_addr.to_string());
    assert_eq!(own.probe_addr, relay.probe_addr.unwrap().to_string());
    assert_eq!(own.region, "eu-west");
    assert!(own.load < 1000, "{own:?}");
    // Its own origin RTT, as it measures it (loopback: well under a
    // second); a peer's as configured.
    assert!(own.origin_rtt_us < 1_000_000, "{own:?}");
    assert_eq!(directory.relays[1].origin_rtt_us, 42_500);
    assert_eq!(directory.relays[1].coords, Some([40.0, -3.5, 2.0]));
    assert_eq!(directory.relays[2].origin_rtt_us, u32::MAX);

    // Without DNS: the literal addresses only, the name skipped.
    let found = from_directory(&directory);
    let probes: Vec<SocketAddr> = found.candidates.iter().map(|c| c.addr).collect();
    assert_eq!(
        probes,
        [relay.probe_addr.unwrap(), "127.0.0.3:5435".parse().unwrap()]
    );
    assert_eq!(found.candidates[0].connect, relay.client_addr);
    assert_eq!(found.candidates[1].region.as_deref(), Some("us-east"));
    // What the relays publish about themselves travels with the candidates.
    assert_eq!(
        found.candidates[0].origin_rtt,
        Some(Duration::from_micros(own.origin_rtt_us.into()))
    );
    assert_eq!(
        found.candidates[1].origin_rtt,
        Some(Duration::from_micros(42_500))
    );
    assert_eq!(found.candidates[1].coords, Some([40.0, -3.5, 2.0]));
    assert_eq!(found.candidates[0].coords, None);
    let skipped = reasons(&found);
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].0, "relay-ap-1");
    assert!(skipped[0].1.contains("DNS lookup"), "{skipped:?}");

    // With DNS (the hickory-server zone): the name resolves too.
    let (dns, _server) = serve(zone()).await;
    let discoverer = Discoverer::with_server(dns, Duration::from_secs(2));
    let found = discoverer.from_directory(&directory).await;
    assert!(found.skipped.is_empty(), "{:?}", found.skipped);
    let ap = &found.candidates[2];
    assert_eq!(ap.addr, "127.0.0.2:6435".parse().unwrap());
    assert_eq!(ap.connect, "127.0.0.2:6434".parse().unwrap());
    assert_eq!(ap.region.as_deref(), Some("ap-south"));

    // A change reaches connected clients.
    relay
        .set_directory(vec![peer(
            "relay-us-2",
            "127.0.0.4:5434",
            "127.0.0.4:5435",
            "",
        )])
        .unwrap();
    let directory = next_directory(&mut session).await;
    let ids: Vec<&str> = directory.relays.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["relay-eu-1", "relay-us-2"]);
    assert!(
        relay
            .set_directory(vec![peer("x", "nowhere", "127.0.0.4:5435", "")])
            .is_err()
    );

    session.close().await;
    stack.stop().await;
}

#[tokio::test]
async fn malformed_directory_entries_are_skipped_with_reasons() {
    let info = |id: &str, addr: &str, probe: &str| RelayInfo {
        id: id.into(),
        addr: addr.into(),
        probe_addr: probe.into(),
        region: String::new(),
        load: 0,
        origin_rtt_us: u32::MAX,
        coords: None,
    };
    let directory = Directory {
        relays: vec![
            info("good", "127.0.0.2:4434", "127.0.0.2:4435"),
            info("v6", "[::1]:4434", "[::1]:4435"),
            info("no-probe", "127.0.0.2:4434", ""),
            info("no-port", "127.0.0.2", "127.0.0.2:4435"),
            info("port-0", "127.0.0.2:0", "127.0.0.2:4435"),
            info("junk", "not an address:1", "127.0.0.2:4435"),
            info("twice", "127.0.0.9:4434", "127.0.0.2:4435"),
            info("nxdomain", "nothing.zone.test:1", "nothing.zone.test:2"),
        ],
    };
    let found = from_directory(&directory);
    let probes: Vec<String> = found
        .candidates
        .iter()
        .map(|c| c.addr.to_string())
        .collect();
    assert_eq!(probes, ["127.0.0.2:4435", "[::1]:4435"]);
    let skipped = reasons(&found);
    let reason = |id: &str| {
        skipped
            .iter()
            .find(|(h, _)| h == id)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{id} not skipped: {skipped:?}"))
    };
    assert!(reason("no-probe").contains("no probe address"));
    assert!(reason("no-port").contains("host:port") || reason("no-port").contains("port"));
    assert!(reason("port-0").contains("port 0"));
    assert!(reason("junk").contains("neither an IP address nor a host name"));
    assert!(reason("twice").contains("listed twice"));
    assert!(reason("nxdomain").contains("DNS lookup"));
    assert_eq!(skipped.len(), 6, "{skipped:?}");

    // Through DNS, the missing name is told as such; by the deadline even
    // when the server never answers.
    let (dns, _server) = serve(zone()).await;
    let found = Discoverer::with_server(dns, Duration::from_secs(2))
        .from_directory(&directory)
        .await;
    let skipped = reasons(&found);
    let nx = skipped.iter().find(|(h, _)| h == "nxdomain").unwrap();
    assert!(nx.1.contains("no such name"), "{nx:?}");
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let deadline = Duration::from_millis(500);
    let start = Instant::now();
    let found = Discoverer::with_server(silent.local_addr().unwrap(), deadline)
        .from_directory(&directory)
        .await;
    assert!(start.elapsed() < deadline + Duration::from_secs(1));
    assert_eq!(found.candidates.len(), 2);
    let nx = reasons(&found)
        .into_iter()
        .find(|(h, _)| h == "nxdomain")
        .unwrap();
    assert!(
        nx.1.contains("timed out") || nx.1.contains("within"),
        "{nx:?}"
    );
}

#[test]
fn static_lists_give_connect_and_probe_addresses() {
    let found = from_static(&[
        "127.0.0.2:4434",
        "127.0.0.3:5434/5999",
        "127.0.0.4:6434/127.0.0.5:6435",
        " ",
        "127.0.0.6:65535",
        "relay.example:4434",
        "127.0.0.7:1/0",
    ]);
    let pairs: Vec<(String, String)> = found
        .candidates
        .iter()
        .map(|c| (c.connect.to_string(), c.addr.to_string()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("127.0.0.2:4434".into(), "127.0.0.2:4435".into()),
            ("127.0.0.3:5434".into(), "127.0.0.3:5999".into()),
            ("127.0.0.4:6434".into(), "127.0.0.5:6435".into()),
        ]
    );
    let skipped = reasons(&found);
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(skipped[0].1.contains("no port after 65535"), "{skipped:?}");
    assert!(skipped[1].1.contains("probe port 0"), "{skipped:?}");
    assert!(skipped[2].1.contains("DNS lookup"), "{skipped:?}");
}
