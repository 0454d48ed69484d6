//! `statecast relay`: subscribe to an origin (or a parent relay) and fan its
//! worlds out to clients.
//!
//! The configuration is [`relay::Config`]: read from a TOML file
//! (`--config`, see `infra/config/relay.toml`), then overridden by the flags
//! given (or their `STATECAST_RELAY_*` variables). Every flag is optional,
//! so a flag left out never replaces what the file says, and with neither
//! file nor flags the relay runs a safe local default: clients on
//! 127.0.0.1:4434, admin on 127.0.0.1:9434, upstream the local origin on
//! 127.0.0.1:4433, the development CA.
//!
//! Other relays of the network (`[[directory]]` in the file, `--directory
//! FILE`, or repeated `--peer` flags) are sent to every client right after
//! the welcome, with this relay's own entry and load, as route candidates.
//!
//! Ctrl-C or SIGTERM drains: the relay stops accepting clients, sends every
//! client a goaway, and exits once they have left or `drain_secs` has
//! passed. A second signal during the drain stops at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use relay::Config;
use relay::config::{DirectoryFile, Peer, check_directory};

use crate::origin_cmd::shutdown_signal;

/// Arguments of `statecast relay`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// TOML configuration file; the flags below override what it says.
    #[arg(long, value_name = "FILE", env = "STATECAST_RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Upstream to subscribe to: an origin, or a parent relay's --publish
    /// address [default: 127.0.0.1:4433].
    #[arg(long, value_name = "ADDR", env = "STATECAST_RELAY_ORIGIN")]
    pub origin: Option<SocketAddr>,
    /// Address clients connect to, QUIC [default: 127.0.0.1:4434].
    #[arg(long, value_name = "ADDR", env = "STATECAST_RELAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the admin HTTP listener (/metrics, /healthz, /readyz)
    /// [default: 127.0.0.1:9434].
    #[arg(long, value_name = "ADDR", env = "STATECAST_RELAY_ADMIN")]
    pub admin: Option<SocketAddr>,
    /// UDP address answering latency probes, with which clients choose
    /// relays [default: 127.0.0.1:4435].
    #[arg(long, value_name = "ADDR", env = "STATECAST_RELAY_PROBE")]
    pub probe: Option<SocketAddr>,
    /// Answer no latency probes.
    #[arg(long, env = "STATECAST_RELAY_NO_PROBE", conflicts_with = "probe")]
    pub no_probe: bool,
    /// This relay's region, as clients and child relays see it [default:
    /// local].
    #[arg(long, value_name = "NAME", env = "STATECAST_RELAY_REGION")]
    pub region: Option<String>,
    /// This relay's id [default: relay-1].
    #[arg(long, env = "STATECAST_RELAY_ID")]
    pub id: Option<String>,
    /// Also serve child relays (tiers) on this address, QUIC [default:
    /// off].
    #[arg(long, value_name = "ADDR", env = "STATECAST_RELAY_PUBLISH")]
    pub publish: Option<SocketAddr>,
    /// Edge length of an interest cell, in world units [default: 50].
    #[arg(long, value_name = "M", env = "STATECAST_RELAY_CELL_SIZE")]
    pub cell_size: Option<f64>,
    /// Encode chunks per client instead of sharing them between clients
    /// (only to measure what the shared cache saves).
    #[arg(long, env = "STATECAST_RELAY_NO_CHUNK_CACHE")]
    pub no_chunk_cache: bool,
    /// Compute this relay's network coordinates by pinging its directory
    /// peers' probe ports, and publish them in pongs and the directory
    /// (otherwise the coordinates are whatever the directory entries say).
    #[arg(long, env = "STATECAST_RELAY_AUTO_COORDS")]
    pub auto_coords: bool,
    /// Seconds a drain waits for clients to leave [default: 10].
    #[arg(long, value_name = "SECS", env = "STATECAST_RELAY_DRAIN_SECS")]
    pub drain_secs: Option<u64>,
    /// Most clients at once [default: 10000].
    #[arg(long, value_name = "N", env = "STATECAST_RELAY_MAX_CLIENTS")]
    pub max_clients: Option<usize>,
    /// Certificate chain (PEM) to present; with --key. Without any of
    /// --cert, --key and --ca, the local development CA is used.
    #[arg(long, value_name = "FILE", env = "STATECAST_RELAY_CERT")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", env = "STATECAST_RELAY_KEY")]
    pub key: Option<PathBuf>,
    /// CA certificate(s) (PEM) trusted for the upstream's certificate.
    #[arg(long, value_name = "FILE", env = "STATECAST_RELAY_CA")]
    pub ca: Option<PathBuf>,
    /// Data directory holding the development CA [default: $STATECAST_DATA,
    /// else ./.statecast]. The variable is the one every statecast process
    /// reads, so that processes on one machine share the CA.
    #[arg(long, value_name = "DIR", env = "STATECAST_DATA")]
    pub data_dir: Option<PathBuf>,
    /// Name the upstream's certificate must carry [default: localhost, which
    /// development certificates carry].
    #[arg(long, value_name = "NAME", env = "STATECAST_RELAY_UPSTREAM_NAME")]
    pub upstream_name: Option<String>,
    /// Shared secret presented upstream [default: none].
    #[arg(
        long,
        value_name = "SECRET",
        env = "STATECAST_RELAY_UPSTREAM_AUTH",
        hide_env_values = true
    )]
    pub upstream_auth: Option<String>,
    /// Shared secret child relays must present on --publish [default:
    /// none].
    #[arg(
        long,
        value_name = "SECRET",
        env = "STATECAST_RELAY_PUBLISH_AUTH",
        hide_env_values = true
    )]
    pub publish_auth: Option<String>,
    /// Another relay of the network, told to clients in the directory
    /// (repeatable): `id=ID,addr=HOST:PORT,probe=HOST:PORT[,region=NAME]
    /// [,coords=X,Y,H][,origin=MS]`. Given (or with --directory), the peers replace the
    /// file's `[[directory]]` entries.
    #[arg(long = "peer", value_name = "PEER")]
    pub peers: Vec<Peer>,
    /// A TOML file of `[[directory]]` tables (id, addr, probe_addr, region,
    /// coords, origin_ms), replacing the configuration file's; --peer entries are
    /// added to it.
    #[arg(long, value_name = "FILE", env = "STATECAST_RELAY_DIRECTORY")]
    pub directory: Option<PathBuf>,
}

impl Args {
    /// The configuration: the file (or the defaults), then the flags given.
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => read_config(path)?,
            None => Config::default(),
        };
        self.apply(&mut config);
        if let Some(path) = &self.directory {
            let file: DirectoryFile = crate::origin_cmd::read_toml(path)
                .with_context(|| format!("cannot read the directory {}", path.display()))?;
            config.directory = file.directory;
            config.directory.extend(self.peers.iter().cloned());
        }
        validate(&config)
            .map_err(anyhow::Error::msg)
            .context("invalid relay configuration")?;
        Ok(config)
    }

    /// Overrides `config` with every flag that was given, and only those.
    pub fn apply(&self, config: &mut Config) {
        use crate::origin_cmd::{set, set_opt};
        set(&self.origin, &mut config.upstream);
        set(&self.listen, &mut config.listen);
        set(&self.admin, &mut config.admin);
        set_opt(&self.probe, &mut config.probe);
        if self.no_probe {
            config.probe = None;
        }
        set(&self.region, &mut config.region);
        set(&self.id, &mut config.id);
        set_opt(&self.publish, &mut config.publish);
        set(&self.cell_size, &mut config.cell_size);
        // A switch can only turn the cache off: left out, the file decides.
        if self.no_chunk_cache {
            config.chunk_cache = false;
        }
        // A switch can only turn it on: left out, the file decides.
        if self.auto_coords {
            config.auto_coords = true;
        }
        set(&self.drain_secs, &mut config.drain_secs);
        set(&self.max_clients, &mut config.max_clients);
        set_opt(&self.cert, &mut config.cert);
        set_opt(&self.key, &mut config.key);
        set_opt(&self.ca, &mut config.ca);
        set_opt(&self.data_dir, &mut config.data_dir);
        set(&self.upstream_name, &mut config.upstream_name);
        set_opt(&self.upstream_auth, &mut config.upstream_auth);
        set_opt(&self.publish_auth, &mut config.publish_auth);
        // Peers given replace the file's; --directory is read by `load`.
        if !self.peers.is_empty() {
            config.directory = self.peers.clone();
        }
    }
}

/// Reads a relay configuration file (TOML, unknown keys refused).
pub fn read_config(path: &Path) -> anyhow::Result<Config> {
    crate::origin_cmd::read_toml(path)
}

/// Checks what the wire would refuse later (or the relay would silently
/// replace), with a message that names the field.
pub fn validate(config: &Config) -> Result<(), String> {
    let within = |what: &str, value: &str, max: usize| {
        if value.is_empty() || value.len() > max {
            Err(format!("{what} must be 1 to {max} bytes, not {value:?}"))
        } else {
            Ok(())
        }
    };
    within("id", &config.id, proto::msg::MAX_RELAY_ID_LEN)?;
    within("region", &config.region, proto::msg::MAX_REGION_LEN)?;
    if config.upstream_name.is_empty() {
        return Err("upstream_name must not be empty".to_owned());
    }
    for (what, secret) in [
        ("upstream_auth", &config.upstream_auth),
        ("publish_auth", &config.publish_auth),
    ] {
        if let Some(secret) = secret {
            within(what, secret, proto::msg::MAX_TOKEN_LEN)?;
        }
    }
    if !(config.cell_size.is_finite() && config.cell_size > 0.0) {
        return Err(format!(
            "cell_size must be a positive number of world units, not {}",
            config.cell_size
        ));
    }
    check_directory(&config.id, &config.directory).map_err(|e| format!("directory: {e}"))?;
    if let Some(nice) = config.fanout_nice
        && !(-20..=19).contains(&nice)
    {
        return Err(format!("fanout_nice must be -20 to 19, not {nice}"));
    }
    if config.max_clients == 0 {
        return Err("max_clients must be at least 1".to_owned());
    }
    if config
        .publish
        .is_some_and(|p| p == config.listen && p.port() != 0)
    {
        return Err(format!(
            "publish and listen must differ (both {})",
            config.listen
        ));
    }
    // With certificate files, the relay needs its own identity (for clients
    // and child relays) and a CA for its upstream: files trust no CA unless
    // told, and there is no development CA to fall back on.
    let files = [&config.cert, &config.key, &config.ca];
    if files.iter().any(|f| f.is_some()) && !files.iter().all(|f| f.is_some()) {
        return Err("cert, key and ca go together: give all three (production) \
             or none (the development CA)"
            .to_owned());
    }
    Ok(())
}

/// Runs `statecast relay` until Ctrl-C or SIGTERM, then drains.
pub fn run(args: Args) -> anyhow::Result<()> {
    let config = args.load()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("statecast-relay")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let drain_secs = config.drain_secs;
    let handle = relay::start(config)
        .await
        .context("relay failed to start")?;
    shutdown_signal().await;
    tracing::info!(
        clients = handle.clients(),
        deadline_s = drain_secs,
        "draining (a second Ctrl-C or SIGTERM stops at once)"
    );
    tokio::select! {
        () = handle.drain() => {}
        () = shutdown_signal() => tracing::warn!("second signal: stopping without waiting for clients"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/config/relay.toml");

    fn relay_args(flags: &[&str]) -> Args {
        let argv = ["statecast", "relay"].iter().chain(flags);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Relay(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn sample_config_parses() {
        let config = read_config(SAMPLE.as_ref()).unwrap();
        validate(&config).unwrap();
        assert_eq!(config.id, "relay-eu-1");
        assert_eq!(config.region, "eu-west");
        assert_eq!(config.listen, "127.0.0.1:4434".parse().unwrap());
        assert_eq!(config.upstream, "127.0.0.1:4433".parse().unwrap());
        assert_eq!(config.admin, "127.0.0.1:9434".parse().unwrap());
        assert!(config.publish.is_none());
        assert_eq!(config.probe, Some("127.0.0.1:4435".parse().unwrap()));
        assert!(config.upstream_auth.is_none());
        assert!(config.chunk_cache);
        assert!(config.fanout_realtime);
        assert_eq!(config.fanout_nice, Some(-10));
        assert_eq!(config.drain_secs, 10);
        // Through the command line too.
        let loaded = relay_args(&["--config", SAMPLE]).load().unwrap();
        assert_eq!(loaded, config);
    }

    #[test]
    fn no_file_and_no_flags_is_the_local_default() {
        let config = relay_args(&[]).load().unwrap();
        assert_eq!(config, Config::default());
        assert!(config.listen.ip().is_loopback());
        assert!(config.admin.ip().is_loopback());
    }

    #[test]
    fn cli_does_not_clobber_toml() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            r#"
                id = "edge-7"
                region = "eu-west"
                listen = "0.0.0.0:5000"
                upstream = "10.0.0.1:4433"
                upstream_name = "origin.example"
                upstream_auth = "from-file"
                publish = "0.0.0.0:5001"
                cell_size = 25.0
                chunk_cache = false
                drain_secs = 30
                data_dir = "/srv/statecast"
            "#,
        )
        .unwrap();
        let path = path.to_str().unwrap();

        // Flags given win over the file...
        let config = relay_args(&[
            "--config",
            path,
            "--region",
            "us-east",
            "--admin",
            "127.0.0.1:9999",
            "--origin",
            "10.0.0.2:4433",
            "--cell-size",
            "75",
        ])
        .load()
        .unwrap();
        assert_eq!(config.region, "us-east");
        assert_eq!(config.admin, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(config.upstream, "10.0.0.2:4433".parse().unwrap());
        assert_eq!(config.cell_size, 75.0);
        // ...and flags left out leave the file alone, even where the flag
        // has a default of its own (the chunk-cache switch included).
        assert_eq!(config.id, "edge-7");
        assert_eq!(config.listen, "0.0.0.0:5000".parse().unwrap());
        assert_eq!(config.upstream_name, "origin.example");
        assert_eq!(config.upstream_auth.as_deref(), Some("from-file"));
        assert_eq!(config.publish, Some("0.0.0.0:5001".parse().unwrap()));
        assert!(!config.chunk_cache);
        assert_eq!(config.drain_secs, 30);
        assert_eq!(
            config.data_dir.as_deref(),
            Some(Path::new("/srv/statecast"))
        );
        // What neither says keeps the default.
        assert_eq!(config.max_clients, Config::default().max_clients);
        assert_eq!(config.ring_ticks, Config::default().ring_ticks);
        assert_eq!(config.probe, Config::default().probe);
        assert!(config.cert.is_none());

        // The probe switch turns off what the file turns on.
        let off = relay_args(&["--config", path, "--no-probe"])
            .load()
            .unwrap();
        assert_eq!(off.probe, None);

        // Without any flag, the file stands as written.
        let plain = relay_args(&["--config", path]).load().unwrap();
        assert_eq!(plain.region, "eu-west");
        assert_eq!(plain.admin, Config::default().admin);
        assert_eq!(plain.upstream, "10.0.0.1:4433".parse().unwrap());
        assert_eq!(plain.cell_size, 25.0);
    }

    #[test]
    fn peers_come_from_the_file_a_directory_file_or_flags() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            "[[directory]]\nid = \"from-config\"\naddr = \"10.0.0.1:4434\"\n\
             probe_addr = \"10.0.0.1:4435\"\n",
        )
        .unwrap();
        let peers = dir.path().join("peers.toml");
        std::fs::write(
            &peers,
            "[[directory]]\nid = \"from-file\"\naddr = \"relay.example:4434\"\n\
             probe_addr = \"relay.example:4435\"\nregion = \"us-east\"\ncoords = [1.0, 2.0, 0.5]\n",
        )
        .unwrap();
        let config = config.to_str().unwrap();
        let ids = |flags: &[&str]| -> Vec<String> {
            let c = relay_args(flags).load().unwrap();
            c.directory.into_iter().map(|p| p.id).collect()
        };
        assert_eq!(ids(&["--config", config]), ["from-config"]);
        let peer = "id=from-flag,addr=10.0.0.2:4434,probe=10.0.0.2:4435,coords=1,2,3";
        assert_eq!(ids(&["--config", config, "--peer", peer]), ["from-flag"]);
        let file = peers.to_str().unwrap();
        assert_eq!(
            ids(&["--config", config, "--directory", file]),
            ["from-file"]
        );
        assert_eq!(
            ids(&["--directory", file, "--peer", peer]),
            ["from-file", "from-flag"]
        );
        let c = relay_args(&["--peer", peer]).load().unwrap();
        assert_eq!(c.directory[0].coords, Some([1.0, 2.0, 3.0]));
        let missing = relay_args(&["--directory", "/nonexistent/peers.toml"])
            .load()
            .unwrap_err();
        assert!(format!("{missing:#}").contains("peers.toml"), "{missing:#}");
    }

    #[test]
    fn every_flag_lands_in_its_field() {
        let config = relay_args(&[
            "--origin",
            "127.0.0.1:7000",
            "--listen",
            "127.0.0.1:7001",
            "--admin",
            "127.0.0.1:7002",
            "--probe",
            "127.0.0.1:7004",
            "--publish",
            "127.0.0.1:7003",
            "--region",
            "ap-south",
            "--id",
            "r9",
            "--cell-size",
            "12.5",
            "--no-chunk-cache",
            "--drain-secs",
            "3",
            "--max-clients",
            "7",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--ca",
            "ca.pem",
            "--data-dir",
            "/tmp/d",
            "--upstream-name",
            "up.example",
            "--upstream-auth",
            "s1",
            "--publish-auth",
            "s2",
        ])
        .load()
        .unwrap();
        let expected = Config {
            id: "r9".into(),
            region: "ap-south".into(),
            listen: "127.0.0.1:7001".parse().unwrap(),
            upstream: "127.0.0.1:7000".parse().unwrap(),
            upstream_name: "up.example".into(),
            upstream_auth: Some("s1".into()),
            publish: Some("127.0.0.1:7003".parse().unwrap()),
            publish_auth: Some("s2".into()),
            admin: "127.0.0.1:7002".parse().unwrap(),
            probe: Some("127.0.0.1:7004".parse().unwrap()),
            cell_size: 12.5,
            max_clients: 7,
            drain_secs: 3,
            chunk_cache: false,
            cert: Some("c.pem".into()),
            key: Some("k.pem".into()),
            ca: Some("ca.pem".into()),
            data_dir: Some("/tmp/d".into()),
            ..Config::default()
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn bad_files_and_values_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("typo.toml");
        std::fs::write(&path, "regoin = \"eu-west\"\n").unwrap();
        let err = relay_args(&["--config", path.to_str().unwrap()])
            .load()
            .unwrap_err();
        assert!(format!("{err:#}").contains("regoin"), "{err:#}");

        let reason = |flags: &[&str]| format!("{:#}", relay_args(flags).load().unwrap_err());
        assert!(reason(&["--cell-size", "0"]).contains("cell_size"));
        assert!(reason(&["--cell-size", "NaN"]).contains("cell_size"));
        assert!(reason(&["--region", &"x".repeat(25)]).contains("region"));
        assert!(reason(&["--id", ""]).contains("id"));
        assert!(reason(&["--max-clients", "0"]).contains("max_clients"));
        assert!(reason(&["--cert", "c.pem", "--key", "k.pem"]).contains("ca"));
        assert!(reason(&["--publish", "127.0.0.1:4434"]).contains("differ"));
        assert!(Cli::try_parse_from(["statecast", "relay", "--origin", "nowhere"]).is_err());
        let err = Cli::try_parse_from(["statecast", "relay", "--peer", "id=a,addr=x"]).unwrap_err();
        assert!(err.to_string().contains("probe"), "{err}");
        let twice = [
            "--peer",
            "id=a,addr=h:1,probe=h:2",
            "--peer",
            "id=a,addr=h:3,probe=h:4",
        ];
        assert!(reason(&twice).contains("twice"));
        let both = ["statecast", "relay", "--probe", "127.0.0.1:1", "--no-probe"];
        assert!(Cli::try_parse_from(both).is_err());
        let nice = dir.path().join("nice.toml");
        std::fs::write(&nice, "fanout_nice = -21\n").unwrap();
        assert!(reason(&["--config", nice.to_str().unwrap()]).contains("fanout_nice"));
    }
}
