//! The demo's discovery zone: an authoritative DNS server (hickory-server)
//! on a loopback port, in-process.
//!
//! Every client region gets its own name, `REGION.demo.test`, as a
//! latency-based DNS service would give each region its own answers. Under
//! `_statecast._udp.REGION.demo.test` one SRV record per relay points at
//! `RELAY.REGION.demo.test`: its A record is the loopback address, the SRV
//! port is the region's emulated link to the relay's QUIC port, and its TXT
//! record carries the relay's region and the port of the region's emulated
//! link to its probe port. So a bot that discovers, probes and connects
//! does all of it through its region's links.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use hickory_server::Server;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::rr::rdata::{A, SOA, SRV, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

/// The zone every demo name is under.
pub const ZONE: &str = "demo.test";

/// Short TTLs: a real deployment would let clients notice a removed relay
/// within half a minute.
const TTL: u32 = 30;

/// One relay as one region sees it.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The relay's name (a DNS label).
    pub relay: String,
    /// The relay's region.
    pub relay_region: String,
    /// The QUIC port clients of this region connect to (a link).
    pub quic_port: u16,
    /// The probe port clients of this region ping (a link).
    pub probe_port: u16,
}

/// The domain bots of `region` discover relays under.
pub fn domain(region: &str) -> String {
    format!("{region}.{ZONE}")
}

fn name(text: &str) -> anyhow::Result<Name> {
    Name::from_ascii(text).with_context(|| format!("{text:?} is not a DNS name"))
}

/// A running zone; dropping it stops the server.
pub struct Dns {
    /// Where it answers (UDP).
    pub addr: SocketAddr,
    server: Server<Catalog>,
}

impl Dns {
    /// Serves the zone: for each client region, its view of every relay.
    pub async fn serve(regions: &[(String, Vec<Entry>)]) -> anyhow::Result<Dns> {
        let origin = name(&format!("{ZONE}."))?;
        let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        );
        let soa = SOA::new(
            name(&format!("ns.{ZONE}."))?,
            name(&format!("admin.{ZONE}."))?,
            1,
            3600,
            600,
            86_400,
            TTL,
        );
        let mut records = vec![Record::from_rdata(origin.clone(), TTL, RData::SOA(soa))];
        for (region, entries) in regions {
            let service = name(&format!(
                "{}.{}.",
                client::discover::SERVICE,
                domain(region)
            ))?;
            for e in entries {
                let host = name(&format!("{}.{}.", e.relay, domain(region)))?;
                records.push(Record::from_rdata(
                    service.clone(),
                    TTL,
                    RData::SRV(SRV::new(10, 10, e.quic_port, host.clone())),
                ));
                records.push(Record::from_rdata(
                    host.clone(),
                    TTL,
                    RData::TXT(TXT::new(vec![
                        format!("region={}", e.relay_region),
                        format!("probe={}", e.probe_port),
                        format!("v={}", proto::msg::VERSION),
                    ])),
                ));
                records.push(Record::from_rdata(
                    host,
                    TTL,
                    RData::A(A(Ipv4Addr::LOCALHOST)),
                ));
            }
        }
        for record in records {
            let shown = record.to_string();
            anyhow::ensure!(zone.upsert_mut(record, 1), "the zone refused {shown}");
        }
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone)]);
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .context("cannot bind the demo's DNS server")?;
        let addr = socket.local_addr()?;
        let mut server = Server::new(catalog);
        server.register_socket(socket);
        Ok(Dns { addr, server })
    }

    /// Stops answering.
    pub async fn stop(mut self) {
        if let Err(e) = self.server.shutdown_gracefully().await {
            tracing::debug!(error = %e, "DNS server stopped with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use client::discover::Discoverer;
    use std::time::Duration;

    #[tokio::test]
    async fn each_region_discovers_its_own_view() {
        let entries = |q: u16| {
            vec![
                Entry {
                    relay: "eu-1".into(),
                    relay_region: "eu".into(),
                    quic_port: q,
                    probe_port: q + 1,
                },
                Entry {
                    relay: "us-1".into(),
                    relay_region: "us".into(),
                    quic_port: q + 2,
                    probe_port: q + 3,
                },
            ]
        };
        let dns = Dns::serve(&[("eu".into(), entries(5000)), ("us".into(), entries(6000))])
            .await
            .unwrap();
        let d = Discoverer::with_server(dns.addr, Duration::from_secs(5));
        let found = d.discover(&domain("us")).await.unwrap();
        let mut relays: Vec<_> = found
            .relays
            .iter()
            .map(|r| (r.region.clone().unwrap(), r.connect.port(), r.probe.port()))
            .collect();
        relays.sort();
        assert_eq!(
            relays,
            [("eu".into(), 6000, 6001), ("us".into(), 6002, 6003)]
        );
        assert!(found.relays.iter().all(|r| r.connect.ip().is_loopback()));
        assert!(d.discover(&domain("ap")).await.is_err());
        dns.stop().await;
    }
}
