//! Relay configuration: a TOML file, then command-line flags over it.
//!
//! Every field has a default that is safe on one machine (loopback
//! addresses, a local development CA), so `statecast relay` runs with no
//! arguments next to `statecast origin`.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// TLS: certificate chain (PEM); none means the development CA.
    pub cert: Option<PathBuf>,
    /// TLS: private key (PEM).
    pub key: Option<PathBuf>,
    /// TLS: CA to trust for upstream connections (PEM).
    pub ca: Option<PathBuf>,
    /// Data directory of the development CA.
    pub data_dir: Option<PathBuf>,
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
            cert: None,
            key: None,
            ca: None,
            data_dir: None,
        }
    }
}

impl Config {
    /// Parses a TOML file's text.
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
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
}
