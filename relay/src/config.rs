//! Relay configuration: a TOML file, then command-line flags over it.
//!
//! Every field has a default that is safe on one machine (loopback
//! addresses, a local development CA), so `statecast relay` runs with no
//! arguments next to `statecast origin`.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// Everything a relay needs to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Relay id, reported to clients and in probe replies.
    pub id: String,
    /// Region name (e.g. `eu-west`).
    pub region: String,
    /// QUIC address clients connect to (ALPN `statecast/1`).
    pub listen: SocketAddr,
    /// Upstream: the origin, or a parent relay's publish address.
    pub upstream: SocketAddr,
    /// TLS server name of the upstream.
    pub upstream_name: String,
    /// Shared secret presented upstream (`Subscribe.auth`).
    pub upstream_auth: Option<String>,
    /// Where this relay serves child relays (ALPN `statecast-up/1`), if it
    /// is a regional tier.
    pub publish: Option<SocketAddr>,
    /// Shared secret child relays must present.
    pub publish_auth: Option<String>,
    /// Admin HTTP (metrics, health) address: an internal listener.
    pub admin: SocketAddr,
    /// UDP address answering latency probes (clients choose relays with
    /// them); none turns probing off. Relays sharing a machine each need
    /// their own (tests: `127.0.0.1:0`).
    pub probe: Option<SocketAddr>,
    /// Edge length of an interest cell, in world units.
    pub cell_size: f64,
    /// Ticks of history kept per world (at least one second of ticks is
    /// kept whatever this says).
    pub ring_ticks: usize,
    /// Most clients at once.
    pub max_clients: usize,
    /// Seconds a world stays subscribed after its last client left.
    pub release_after_secs: u64,
    /// Most inputs per client per second (0: twice the tick rate).
    pub input_rate: u32,
    /// Seconds a drain waits for clients to leave before exiting.
    pub drain_secs: u64,
    /// Share encoded chunks between clients (off only to measure its gain).
    pub chunk_cache: bool,
    /// Schedule the fan-out's threads (one per core, pinned; they split
    /// ticks, code chunks and hand updates to quinn) `SCHED_FIFO` at the
    /// lowest real-time priority, so that the connection drivers wait the
    /// few milliseconds of a tick's fan-out instead of every client's
    /// update waiting for them (see [`crate::priority`]). Needs
    /// `CAP_SYS_NICE`; without it, `fanout_nice`; the relay logs which.
    pub fanout_realtime: bool,
    /// Nice value of the fan-out's threads when they are not real-time
    /// (-20 to 19; lowering it needs `CAP_SYS_NICE` too). None: unchanged.
    pub fanout_nice: Option<i32>,
    /// Compute this relay's network coordinates by pinging its directory
    /// peers (see [`crate::coords`]); its pongs and its directory entry
    /// then carry them. Off by default: coordinates come from the
    /// directory entries ops configure.
    pub auto_coords: bool,
    /// With `auto_coords`: milliseconds between pings to each peer.
    pub coords_interval_ms: u64,
    /// TLS: certificate chain (PEM); none means the development CA.
    pub cert: Option<PathBuf>,
    /// TLS: private key (PEM).
    pub key: Option<PathBuf>,
    /// TLS: CA to trust for upstream connections (PEM).
    pub ca: Option<PathBuf>,
    /// Data directory of the development CA.
    pub data_dir: Option<PathBuf>,
    /// Other relays of the network, sent to every client in a directory
    /// message right after the welcome (with this relay's own entry and its
    /// current load). Empty: no directory is sent. An entry with this
    /// relay's own id gives the addresses clients should use for it
    /// (useful when `listen` is a wildcard address). In TOML, `[[directory]]`
    /// tables.
    pub directory: Vec<Peer>,
}

/// Another relay, as this relay tells clients about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Its relay id.
    pub id: String,
    /// Its QUIC client address, `host:port` (an IP address, or a name the
    /// client resolves).
    pub addr: String,
    /// Its UDP probe address, `host:port`.
    pub probe_addr: String,
    /// Its region (may be empty: unknown).
    #[serde(default)]
    pub region: String,
    /// Its network coordinates `[x, y, height]` in milliseconds, if known.
    #[serde(default)]
    pub coords: Option<[f32; 3]>,
    /// Its RTT to the origin in milliseconds, if known (what its DNS TXT
    /// `origin=MS` publishes). This relay's own entry always carries the
    /// RTT it measures itself instead.
    #[serde(default)]
    pub origin_ms: Option<f32>,
}

impl Peer {
    /// Checks what the wire and clients would refuse: field lengths, a
    /// port in both addresses, finite coordinates.
    pub fn check(&self) -> Result<(), String> {
        use proto::msg::{MAX_ADDR_LEN, MAX_REGION_LEN, MAX_RELAY_ID_LEN};
        if self.id.is_empty() || self.id.len() > MAX_RELAY_ID_LEN {
            return Err(format!(
                "peer id must be 1 to {MAX_RELAY_ID_LEN} bytes, not {:?}",
                self.id
            ));
        }
        for (what, addr) in [("addr", &self.addr), ("probe_addr", &self.probe_addr)] {
            if addr.len() > MAX_ADDR_LEN {
                return Err(format!(
                    "peer {}: {what} is longer than {MAX_ADDR_LEN} bytes",
                    self.id
                ));
            }
            let port = addr
                .rsplit_once(':')
                .filter(|(host, _)| !host.is_empty())
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .filter(|port| *port != 0);
            if port.is_none() {
                return Err(format!(
                    "peer {}: {what} must be host:port with a port from 1 to 65535, not {addr:?}",
                    self.id
                ));
            }
        }
        if self.region.len() > MAX_REGION_LEN {
            return Err(format!(
                "peer {}: region is longer than {MAX_REGION_LEN} bytes",
                self.id
            ));
        }
        if let Some(c) = self.coords
            && !c.iter().all(|v| v.is_finite())
        {
            return Err(format!("peer {}: coordinates must be finite", self.id));
        }
        if let Some(ms) = self.origin_ms
            && !(ms.is_finite() && (0.0..=MAX_ORIGIN_MS).contains(&ms))
        {
            return Err(format!(
                "peer {}: origin RTT must be 0 to {MAX_ORIGIN_MS} ms, not {ms}",
                self.id
            ));
        }
        Ok(())
    }
}

/// The largest origin RTT a peer entry may name, in ms (what fits the
/// wire's microseconds, with room to spare).
pub const MAX_ORIGIN_MS: f32 = 60_000.0;

impl Peer {
    /// The origin RTT as the directory message carries it (microseconds,
    /// `u32::MAX`: unknown).
    pub fn origin_rtt_us(&self) -> u32 {
        self.origin_ms
            .filter(|ms| ms.is_finite() && (0.0..=MAX_ORIGIN_MS).contains(ms))
            .map_or(u32::MAX, |ms| (ms * 1000.0).round() as u32)
    }
}

/// `id=ID,addr=HOST:PORT,probe=HOST:PORT[,region=NAME][,coords=X,Y,H][,origin=MS]`, the
/// form of `statecast relay --peer` (`probe_addr=` is accepted for
/// `probe=`). The entry is [checked](Peer::check).
impl FromStr for Peer {
    type Err = String;

    fn from_str(s: &str) -> Result<Peer, String> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for part in s.split(',') {
            match part.split_once('=') {
                Some((key, value)) => pairs.push((key.trim().to_owned(), value.trim().to_owned())),
                // `coords=1,2,3`: the values after the first belong to it.
                None => match pairs.last_mut() {
                    Some((key, value)) if key == "coords" => {
                        value.push(',');
                        value.push_str(part.trim());
                    }
                    _ => return Err(format!("expected key=value, not {part:?}")),
                },
            }
        }
        let (mut id, mut addr, mut probe_addr, mut region, mut coords, mut origin_ms) =
            (None, None, None, String::new(), None, None);
        for (key, value) in pairs {
            match key.as_str() {
                "id" => id = Some(value),
                "addr" => addr = Some(value),
                "probe" | "probe_addr" => probe_addr = Some(value),
                "region" => region = value,
                "coords" => {
                    let parts: Vec<f32> = value
                        .split(',')
                        .map(|v| v.trim().parse::<f32>())
                        .collect::<Result<_, _>>()
                        .map_err(|_| format!("bad coordinates {value:?}: expected X,Y,H"))?;
                    match parts[..] {
                        [x, y, h] => coords = Some([x, y, h]),
                        _ => return Err(format!("bad coordinates {value:?}: expected X,Y,H")),
                    }
                }
                "origin" => {
                    origin_ms =
                        Some(value.parse::<f32>().map_err(|_| {
                            format!("bad origin RTT {value:?}: expected milliseconds")
                        })?);
                }
                other => {
                    return Err(format!(
                        "unknown key {other:?} (id, addr, probe, region, coords, origin)"
                    ));
                }
            }
        }
        let missing = |what: &str| format!("{what}= is missing");
        let peer = Peer {
            id: id.ok_or_else(|| missing("id"))?,
            addr: addr.ok_or_else(|| missing("addr"))?,
            probe_addr: probe_addr.ok_or_else(|| missing("probe"))?,
            region,
            coords,
            origin_ms,
        };
        peer.check()?;
        Ok(peer)
    }
}

/// The `[[directory]]` tables of a TOML file on their own (what
/// `statecast relay --directory FILE` reads).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryFile {
    /// The peers.
    #[serde(default)]
    pub directory: Vec<Peer>,
}

/// Checks a directory: every entry, distinct ids, and few enough entries
/// for one directory message (this relay's own entry included).
pub fn check_directory(own_id: &str, peers: &[Peer]) -> Result<(), String> {
    let mut ids = std::collections::HashSet::new();
    for peer in peers {
        peer.check()?;
        if !ids.insert(peer.id.as_str()) {
            return Err(format!("peer id {:?} is listed twice", peer.id));
        }
    }
    let total = peers.len() + usize::from(!ids.contains(own_id));
    if total > proto::msg::MAX_RELAYS {
        return Err(format!(
            "a directory holds at most {} relays (this one included), not {total}",
            proto::msg::MAX_RELAYS
        ));
    }
    Ok(())
}

fn default_listen() -> SocketAddr {
    // Loopback: nothing is exposed until an operator chooses an address.
    SocketAddr::from(([127, 0, 0, 1], 4434))
}

fn default_upstream() -> SocketAddr {
    // Where `statecast origin` listens by default.
    SocketAddr::from(([127, 0, 0, 1], 4433))
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9434))
}

fn default_probe() -> Option<SocketAddr> {
    // Loopback like the rest, next to the client port, so `statecast
    // probe` with no arguments finds `statecast relay` with none.
    Some(SocketAddr::from(([127, 0, 0, 1], 4435)))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: "relay-1".into(),
            region: "local".into(),
            listen: default_listen(),
            upstream: default_upstream(),
            upstream_name: "localhost".into(),
            upstream_auth: None,
            publish: None,
            publish_auth: None,
            admin: default_admin(),
            probe: default_probe(),
            // 50 m cells: a 100 m interest radius touches about a dozen.
            cell_size: 50.0,
            // 64 ticks: over a second at 60 Hz, three at 20 Hz.
            ring_ticks: 64,
            max_clients: 10_000,
            // Long enough to ride out a client reconnecting.
            release_after_secs: 10,
            input_rate: 0,
            drain_secs: 10,
            chunk_cache: true,
            fanout_realtime: true,
            fanout_nice: Some(-10),
            auto_coords: false,
            coords_interval_ms: 1000,
            cert: None,
            key: None,
            ca: None,
            data_dir: None,
            directory: Vec::new(),
        }
    }
}

impl Config {
    /// Parses a TOML file's text.
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// How the fan-out's threads ask to be scheduled (`fanout_realtime`,
    /// `fanout_nice`).
    pub fn fanout_priority(&self) -> crate::priority::Priority {
        crate::priority::Priority {
            realtime: self.fanout_realtime,
            nice: self.fanout_nice,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_toml_is_the_default_and_unknown_keys_are_refused() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
        assert!(Config::from_toml("lissen = \"127.0.0.1:1\"").is_err());
        let c = Config::from_toml("region = \"eu-west\"\nlisten = \"127.0.0.1:5000\"").unwrap();
        assert_eq!(c.region, "eu-west");
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.admin, default_admin());
        assert_eq!(c.probe, default_probe());
        let c = Config::from_toml("probe = \"127.0.0.1:0\"").unwrap();
        assert_eq!(c.probe, Some(SocketAddr::from(([127, 0, 0, 1], 0))));
    }

    #[test]
    fn directory_entries_from_toml_and_flags() {
        let c = Config::from_toml(
            r#"
                [[directory]]
                id = "relay-us-1"
                addr = "relay-us-1.example.net:4434"
                probe_addr = "relay-us-1.example.net:4435"
                region = "us-east"
                coords = [1.5, -2.0, 0.25]

                [[directory]]
                id = "relay-ap-1"
                addr = "10.0.0.3:4434"
                probe_addr = "10.0.0.3:4435"
            "#,
        )
        .unwrap();
        assert_eq!(c.directory.len(), 2);
        assert_eq!(c.directory[0].coords, Some([1.5, -2.0, 0.25]));
        assert_eq!(c.directory[1].region, "");
        check_directory(&c.id, &c.directory).unwrap();
        assert!(Config::from_toml("[[directory]]\nid = \"x\"\naddr = \"a:1\"").is_err());

        let p: Peer = "id=relay-us-1,addr=relay-us-1.example.net:4434,probe=10.0.0.2:4435,\
                       region=us-east,coords=1.5,-2,0.25"
            .parse()
            .unwrap();
        assert_eq!(p, c.directory[0].clone().with_probe("10.0.0.2:4435"));
        let p: Peer = "id=a,addr=[::1]:4434,probe_addr=[::1]:4435"
            .parse()
            .unwrap();
        assert_eq!((p.region.as_str(), p.coords, p.origin_ms), ("", None, None));
        assert_eq!(p.origin_rtt_us(), u32::MAX);
        let p: Peer = "id=a,addr=1.2.3.4:1,probe=1.2.3.4:2,origin=12.5"
            .parse()
            .unwrap();
        assert_eq!((p.origin_ms, p.origin_rtt_us()), (Some(12.5), 12_500));
        for bad in [
            "id=a,addr=1.2.3.4:1,probe=1.2.3.4:2,origin=-1",
            "id=a,addr=1.2.3.4:1,probe=1.2.3.4:2,origin=NaN",
            "id=a,addr=1.2.3.4:1,probe=1.2.3.4:2,origin=fast",
            "id=a,addr=1.2.3.4:1,probe=1.2.3.4:2,origin=1e9",
        ] {
            let err = bad.parse::<Peer>().unwrap_err();
            assert!(err.contains("origin"), "{bad:?}: {err}");
        }
        for bad in [
            "",
            "id=a",
            "id=a,addr=1.2.3.4:1",
            "id=a,addr=1.2.3.4,probe=1.2.3.4:2",
            "id=a,addr=1.2.3.4:0,probe=1.2.3.4:2",
            "id=a,addr=:1,probe=1.2.3.4:2",
            "id=,addr=1.2.3.4:1,probe=1.2.3.4:2",
            "id=a,addr=1.2.3.4:1,probe=1.2.3.4:2,coords=1,2",
            "id=a,addr=1.2.3.4:1,probe=1.2.3.4:2,coords=1,2,NaN",
            "id=a,addr=1.2.3.4:1,probe=1.2.3.4:2,colour=red",
            "id=a,addr=1.2.3.4:1,probe=1.2.3.4:2,oops",
        ] {
            assert!(bad.parse::<Peer>().is_err(), "{bad:?}");
        }
        let twice = vec![p.clone(), p.clone()];
        assert!(check_directory("me", &twice).unwrap_err().contains("twice"));
        let many: Vec<Peer> = (0..proto::msg::MAX_RELAYS)
            .map(|i| Peer {
                id: format!("r{i}"),
                ..p.clone()
            })
            .collect();
        // 256 peers and this relay make 257.
        assert!(check_directory("me", &many).is_err());
        assert!(check_directory("r0", &many).is_ok());
    }

    impl Peer {
        fn with_probe(mut self, probe: &str) -> Peer {
            self.probe_addr = probe.to_owned();
            self
        }
    }
}
