//! The origin's configuration: what `statecast origin` reads from its TOML
//! file and flags. Every field has a default that runs a safe local origin,
//! so an empty file (or none) is a valid configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How an origin runs. See [`crate::server::start`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Built-in world to run ([`crate::worlds::WORLDS`]).
    #[serde(default = "default_world")]
    pub world: String,
    /// Seed of the world's random choices.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// For `plaza`: number of avatars (`None`: the world's default).
    #[serde(default)]
    pub avatars: Option<u32>,
    /// Address of the upstream QUIC listener that relays subscribe to.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the admin HTTP listener (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// This origin's id, sent to relays in every welcome (at most 32 bytes).
    #[serde(default = "default_id")]
    pub id: String,
    /// This origin's region, sent to relays (at most 24 bytes).
    #[serde(default = "default_region")]
    pub region: String,
    /// Shared secret relays must present when they subscribe; `None` serves
    /// any relay that passes TLS.
    #[serde(default)]
    pub auth_secret: Option<String>,
    /// Certificates.
    #[serde(default)]
    pub tls: Tls,
    /// A relay this many ticks behind gets a keyframe instead of a delta
    /// (`None`: one second of ticks).
    #[serde(default)]
    pub keyframe_after: Option<u32>,
    /// Most relay connections served at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

/// Where the origin's certificates come from. With none of `cert`, `key`
/// and `ca`, a development CA in `data_dir` (created on first use) that every
/// statecast process on this machine trusts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Certificate chain (PEM) the origin presents.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// CA certificate(s) (PEM) trusted for relays' client certificates.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Data directory of the development CA (`None`: `$STATECAST_DATA`, else
    /// `./.statecast`).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Require relays to present a certificate from the trusted CA (mutual
    /// TLS), on top of the shared secret if any.
    #[serde(default)]
    pub verify_clients: bool,
}

impl Tls {
    /// The trust these settings ask for.
    pub fn trust(&self) -> transport::Trust {
        transport::Trust::from_flags(
            self.cert.clone(),
            self.key.clone(),
            self.ca.clone(),
            self.data_dir.clone(),
        )
    }
}

/// `cubes`: small and dense, the world every other tool defaults to.
fn default_world() -> String {
    "cubes".to_owned()
}

/// A fixed seed, so two runs show the same world (as `statecast demo` does).
fn default_seed() -> u64 {
    1
}

/// Loopback only: an origin is reachable from elsewhere only when asked to.
/// 4433 is the customary QUIC test port.
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4433))
}

/// Loopback only: the admin listener has no authentication.
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9433))
}

/// Names the node in relays' logs and probe replies; override it once there
/// are several origins.
fn default_id() -> String {
    "origin".to_owned()
}

/// One machine is one region until told otherwise.
fn default_region() -> String {
    "local".to_owned()
}

/// Relays are few (a handful per region, or a tier of regional relays); this
/// leaves room for all of them and bounds what a stray client can take.
fn default_max_connections() -> usize {
    256
}

impl Default for Config {
    fn default() -> Config {
        Config {
            world: default_world(),
            seed: default_seed(),
            avatars: None,
            listen: default_listen(),
            admin: default_admin(),
            id: default_id(),
            region: default_region(),
            auth_secret: None,
            tls: Tls::default(),
            keyframe_after: None,
            max_connections: default_max_connections(),
        }
    }
}

impl Config {
    /// Checks what the wire and the worlds would refuse later, with a message
    /// that names the field.
    pub fn validate(&self) -> Result<(), String> {
        let within = |what: &str, value: &str, max: usize| {
            if value.is_empty() || value.len() > max {
                Err(format!("{what} must be 1 to {max} bytes, not {value:?}"))
            } else {
                Ok(())
            }
        };
        within("id", &self.id, proto::msg::MAX_RELAY_ID_LEN)?;
        within("region", &self.region, proto::msg::MAX_REGION_LEN)?;
        within("world", &self.world, proto::msg::MAX_WORLD_LEN)?;
        if let Some(secret) = &self.auth_secret
            && (secret.is_empty() || secret.len() > proto::msg::MAX_TOKEN_LEN)
        {
            return Err(format!(
                "auth_secret must be 1 to {} bytes",
                proto::msg::MAX_TOKEN_LEN
            ));
        }
        if self.keyframe_after == Some(0) {
            return Err("keyframe_after must be at least 1 tick".to_owned());
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".to_owned());
        }
        if self.avatars.is_some() && self.world != "plaza" {
            return Err(format!(
                "avatars applies to the plaza world only, not {:?}",
                self.world
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_local_and_valid() {
        let config = Config::default();
        assert!(config.listen.ip().is_loopback());
        assert!(config.admin.ip().is_loopback());
        assert_eq!(config.world, "cubes");
        assert!(matches!(config.tls.trust(), transport::Trust::DevCa { .. }));
        config.validate().unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |f: fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(|c| c.id = "x".repeat(33)).contains("id"));
        assert!(bad(|c| c.region = String::new()).contains("region"));
        assert!(bad(|c| c.auth_secret = Some(String::new())).contains("auth_secret"));
        assert!(bad(|c| c.keyframe_after = Some(0)).contains("keyframe_after"));
        assert!(bad(|c| c.avatars = Some(10)).contains("plaza"));
    }
}
