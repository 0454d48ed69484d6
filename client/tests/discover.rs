//! Discovery against a real DNS server: an authoritative zone served by
//! hickory-server on a loopback port, in-process.

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
            &["region=us-east probe=5435 coords=1.5,-2,0.25"],
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
    assert_eq!(r2.version, None);
    assert_eq!((r2.priority, r2.weight), (10, 80));
    let r1 = &found.relays[1];
    assert_eq!(r1.probe, "127.0.0.2:4435".parse().unwrap());
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
