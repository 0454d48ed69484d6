//! `statecast origin`: run a world's authoritative simulation and serve it to
//! relays.
//!
//! The configuration is [`origin::Config`]: read from a TOML file
//! (`--config`, see `infra/config/origin.toml`), then overridden by the flags
//! given (or their `STATECAST_ORIGIN_*` variables). Every flag is optional,
//! so a flag left out never replaces what the file says, and with neither
//! file nor flags the origin runs a safe local default (cubes on
//! 127.0.0.1:4433, admin on 127.0.0.1:9433, the development CA).
//!
//! Runs until Ctrl-C or SIGTERM, then tells subscribed relays to go away and
//! stops.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use origin::Config;

/// Arguments of `statecast origin`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// TOML configuration file; the flags below override what it says.
    #[arg(long, value_name = "FILE", env = "STATECAST_ORIGIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// World to run: cubes or plaza [default: cubes].
    #[arg(long, env = "STATECAST_ORIGIN_WORLD")]
    pub world: Option<String>,
    /// For plaza: number of avatars [default: the world's own].
    #[arg(long, env = "STATECAST_ORIGIN_AVATARS")]
    pub avatars: Option<u32>,
    /// Seed of the world's random choices [default: 1].
    #[arg(long, env = "STATECAST_ORIGIN_SEED")]
    pub seed: Option<u64>,
    /// Address relays subscribe to, QUIC [default: 127.0.0.1:4433].
    #[arg(long, value_name = "ADDR", env = "STATECAST_ORIGIN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the admin HTTP listener (/metrics, /healthz, /readyz)
    /// [default: 127.0.0.1:9433].
    #[arg(long, value_name = "ADDR", env = "STATECAST_ORIGIN_ADMIN")]
    pub admin: Option<SocketAddr>,
    /// This origin's id, as relays see it [default: origin].
    #[arg(long, env = "STATECAST_ORIGIN_ID")]
    pub id: Option<String>,
    /// This origin's region [default: local].
    #[arg(long, env = "STATECAST_ORIGIN_REGION")]
    pub region: Option<String>,
    /// Certificate chain (PEM) to present; with --key. Without any of
    /// --cert, --key and --ca, the local development CA is used.
    #[arg(long, value_name = "FILE", env = "STATECAST_ORIGIN_CERT")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", env = "STATECAST_ORIGIN_KEY")]
    pub key: Option<PathBuf>,
    /// CA certificate(s) (PEM) trusted for relays' certificates.
    #[arg(long, value_name = "FILE", env = "STATECAST_ORIGIN_CA")]
    pub ca: Option<PathBuf>,
    /// Data directory holding the development CA [default: ./.statecast].
    #[arg(long, value_name = "DIR", env = "STATECAST_DATA")]
    pub data_dir: Option<PathBuf>,
    /// Shared secret relays must present to subscribe [default: none].
    #[arg(
        long,
        value_name = "SECRET",
        env = "STATECAST_ORIGIN_AUTH_SECRET",
        hide_env_values = true
    )]
    pub auth_secret: Option<String>,
    /// Ticks behind after which a relay gets a keyframe [default: one
    /// second of ticks].
    #[arg(long, value_name = "TICKS", env = "STATECAST_ORIGIN_KEYFRAME_AFTER")]
    pub keyframe_after: Option<u32>,
    /// Most relay connections at once [default: 256].
    #[arg(long, value_name = "N", env = "STATECAST_ORIGIN_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
}

impl Args {
    /// The configuration: the file (or the defaults), then the flags given.
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => read_config(path)?,
            None => Config::default(),
        };
        self.apply(&mut config);
        config
            .validate()
            .map_err(anyhow::Error::msg)
            .context("invalid origin configuration")?;
        Ok(config)
    }

    /// Overrides `config` with every flag that was given, and only those.
    pub fn apply(&self, config: &mut Config) {
        set(&self.world, &mut config.world);
        set_opt(&self.avatars, &mut config.avatars);
        set(&self.seed, &mut config.seed);
        set(&self.listen, &mut config.listen);
        set(&self.admin, &mut config.admin);
        set(&self.id, &mut config.id);
        set(&self.region, &mut config.region);
        set_opt(&self.cert, &mut config.tls.cert);
        set_opt(&self.key, &mut config.tls.key);
        set_opt(&self.ca, &mut config.tls.ca);
        set_opt(&self.data_dir, &mut config.tls.data_dir);
        set_opt(&self.auth_secret, &mut config.auth_secret);
        set_opt(&self.keyframe_after, &mut config.keyframe_after);
        set(&self.max_connections, &mut config.max_connections);
    }
}

/// Reads an origin configuration file (TOML, unknown keys refused).
pub fn read_config(path: &std::path::Path) -> anyhow::Result<Config> {
    read_toml(path)
}

/// Reads a TOML configuration file; shared by the subcommands that take one.
pub(crate) fn read_toml<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))
}

/// Sets `field` to the flag's value when the flag was given.
pub(crate) fn set<T: Clone>(flag: &Option<T>, field: &mut T) {
    if let Some(value) = flag {
        *field = value.clone();
    }
}

/// Sets an optional `field` to the flag's value when the flag was given.
pub(crate) fn set_opt<T: Clone>(flag: &Option<T>, field: &mut Option<T>) {
    if flag.is_some() {
        field.clone_from(flag);
    }
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

/// Runs `statecast origin` until Ctrl-C or SIGTERM.
pub fn run(args: Args) -> anyhow::Result<()> {
    let config = args.load()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("statecast-origin")
        .build()
        .context("cannot start the async runtime")?;
    runtime
        .block_on(origin::run(config, shutdown_signal()))
        .context("origin failed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../infra/config/origin.toml");

    fn origin_args(flags: &[&str]) -> Args {
        let argv = ["statecast", "origin"].iter().chain(flags);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Origin(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn sample_config_parses() {
        let config = read_config(SAMPLE.as_ref()).unwrap();
        config.validate().unwrap();
        assert_eq!(config.world, "plaza");
        assert_eq!(config.id, "origin-1");
        assert_eq!(config.listen, "127.0.0.1:4433".parse().unwrap());
        assert!(config.auth_secret.is_none());
        assert!(!config.tls.verify_clients);
        // Through the command line too.
        let loaded = origin_args(&["--config", SAMPLE]).load().unwrap();
        assert_eq!(loaded, config);
    }

    #[test]
    fn no_file_and_no_flags_is_the_local_default() {
        assert_eq!(origin_args(&[]).load().unwrap(), Config::default());
    }

    #[test]
    fn cli_does_not_clobber_toml() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("origin.toml");
        std::fs::write(
            &path,
            r#"
                world = "plaza"
                avatars = 3000
                seed = 9
                listen = "0.0.0.0:5000"
                region = "eu-west"
                auth_secret = "from-file"
                [tls]
                data_dir = "/srv/statecast"
            "#,
        )
        .unwrap();
        let path = path.to_str().unwrap();

        // Flags given win over the file...
        let config = origin_args(&[
            "--config",
            path,
            "--region",
            "us-east",
            "--admin",
            "127.0.0.1:9999",
            "--seed",
            "3",
        ])
        .load()
        .unwrap();
        assert_eq!(config.region, "us-east");
        assert_eq!(config.admin, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(config.seed, 3);
        // ...and flags left out leave the file alone, even where the flag
        // has a default of its own.
        assert_eq!(config.world, "plaza");
        assert_eq!(config.avatars, Some(3000));
        assert_eq!(config.listen, "0.0.0.0:5000".parse().unwrap());
        assert_eq!(config.auth_secret.as_deref(), Some("from-file"));
        assert_eq!(
            config.tls.data_dir.as_deref(),
            Some(std::path::Path::new("/srv/statecast"))
        );
        // What neither says keeps the default.
        assert_eq!(config.id, Config::default().id);
        assert_eq!(config.max_connections, Config::default().max_connections);

        // Without any flag, the file stands as written.
        let plain = origin_args(&["--config", path]).load().unwrap();
        assert_eq!(plain.region, "eu-west");
        assert_eq!(plain.admin, Config::default().admin);
        assert_eq!(plain.seed, 9);
    }

    #[test]
    fn certificate_flags_fill_the_tls_section() {
        let config = origin_args(&["--cert", "c.pem", "--key", "k.pem", "--ca", "ca.pem"])
            .load()
            .unwrap();
        assert_eq!(config.tls.cert.as_deref(), Some("c.pem".as_ref()));
        assert_eq!(config.tls.key.as_deref(), Some("k.pem".as_ref()));
        assert_eq!(config.tls.ca.as_deref(), Some("ca.pem".as_ref()));
    }

    #[test]
    fn bad_files_and_values_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("typo.toml");
        std::fs::write(&path, "wrold = \"plaza\"\n").unwrap();
        let err = origin_args(&["--config", path.to_str().unwrap()])
            .load()
            .unwrap_err();
        assert!(format!("{err:#}").contains("wrold"), "{err:#}");

        let err = origin_args(&["--world", "cubes", "--avatars", "10"])
            .load()
            .unwrap_err();
        assert!(format!("{err:#}").contains("plaza"), "{err:#}");
        assert!(Cli::try_parse_from(["statecast", "origin", "--listen", "nowhere"]).is_err());
    }
}
