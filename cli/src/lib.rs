//! # statecast: the command line
//!
//! One binary for every role of a statecast network. For now it records and
//! measures traces of the built-in worlds (`trace record`, `trace bench`) and
//! runs a local origin with a live view (`demo`); the origin, relay, probe,
//! client and lab subcommands arrive with their crates.
//!
//! `main.rs` only parses the command line and calls [`run`]; tests and tools
//! call the subcommand modules directly.

pub mod client_cmd;
pub mod demo;
pub mod lab_cmd;
pub mod logging;
pub mod origin_cmd;
pub mod probe_cmd;
pub mod relay_cmd;
pub mod trace;

use clap::{Parser, Subcommand};

/// Edge relay and state-sync network for real-time shared worlds.
#[derive(Debug, Parser)]
#[command(name = "statecast", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr (filter with RUST_LOG, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = logging::Format::Human, env = "STATECAST_LOG_FORMAT")]
    pub log_format: logging::Format,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Join a world through a relay as a headless client: verify every
    /// tick, show a live status line, end with a summary.
    Client(client_cmd::Args),
    /// Run an origin with a built-in world and show what it sends, live.
    Demo(demo::Args),
    /// Lab tools: emulate network links (delay, jitter, loss, rate) on
    /// one machine; run the relay selector against a latency matrix.
    #[command(subcommand)]
    Lab(lab_cmd::Command),
    /// Run an origin: a world's authoritative simulation, served to relays.
    Origin(origin_cmd::Args),
    /// Ping relays' probe ports and show which one a client would pick,
    /// and why.
    Probe(probe_cmd::Args),
    /// Run a relay: subscribe to an origin (or a parent relay) and fan its
    /// worlds out to clients; Ctrl-C or SIGTERM drains.
    Relay(relay_cmd::Args),
    /// Record worlds to trace files and measure the codec on them.
    #[command(subcommand)]
    Trace(trace::Command),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    logging::init(cli.log_format)?;
    match cli.command {
        Command::Client(args) => client_cmd::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Lab(command) => lab_cmd::run(command),
        Command::Origin(args) => origin_cmd::run(args),
        Command::Probe(args) => probe_cmd::run(args),
        Command::Relay(args) => relay_cmd::run(args),
        Command::Trace(command) => trace::run(command),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn trace_bench_defaults_to_the_challenge_lag() {
        let cli = Cli::try_parse_from(["statecast", "trace", "bench", "--trace", "t.bin"]).unwrap();
        match cli.command {
            Command::Trace(trace::Command::Bench(args)) => {
                assert_eq!(args.lag, 6);
                assert_eq!(args.hz, 60.0);
                assert!(!args.json);
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["statecast", "trace", "record", "--world", "cubes"]).is_err());
    }
}
