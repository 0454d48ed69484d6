//! `statecast lab`: tools that let one machine stand in for a network.
//!
//! `lab link` puts an emulated link (delay, jitter, loss, reordering, rate
//! limit; see [`lab::link`]) in front of a UDP server, for instance a relay:
//! clients connect to `--listen` and reach `--forward` through it. It prints
//! the link's counters every second on stderr until Ctrl-C or SIGTERM, then
//! a summary.
//!
//! `lab route` runs the real relay selector for every client of a latency
//! matrix, in simulated time (see [`lab::route`] for the model and
//! [`lab::matrix`] for the CSV format), and reports how often clients chose
//! the best relay, their regret, and what probing cost: a table, or one
//! JSON object with `--json`. `--compare` adds the baselines (eight relays
//! by region hints, eight without hints, every relay) to the same run.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use lab::link::{Direction, DirectionStats, Link, LinkConfig, LinkStats};
use lab::matrix::Matrix;
use lab::route::{Network, Report, RouteConfig, Strategy};
use tokio::time::{Instant, MissedTickBehavior};

/// The `lab` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Emulate a network link in front of a UDP server: clients send to
    /// `--listen`, the link delays, jitters, drops, reorders and
    /// rate-limits each direction, and forwards to `--forward`.
    Link(LinkArgs),
    /// Run the relay selector for every client of a latency matrix, in
    /// simulated time, and report how well it chose and what it probed.
    Route(RouteArgs),
}

/// Arguments of `lab route`.
#[derive(Debug, Clone, clap::Args)]
pub struct RouteArgs {
    /// The latency matrix: CSV `a,b,rtt_ms`, one pair a line, symmetric,
    /// header optional, missing pairs unreachable.
    #[arg(long)]
    pub matrix: PathBuf,
    /// The relays, by node name (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "relays_from_matrix"
    )]
    pub relays: Vec<String>,
    /// Every node whose name starts with this prefix is a relay (with the
    /// shipped lab/data/world.csv: `r-`).
    #[arg(long, conflicts_with = "relays")]
    pub relays_from_matrix: Option<String>,
    /// The origin node: a relay's score counts its RTT to it (default: no
    /// origin, RTT 0).
    #[arg(long)]
    pub origin: Option<String>,
    /// Extra delay per probe, uniform in [0, J) milliseconds.
    #[arg(long, default_value_t = 5.0, value_parser = parse_ms)]
    pub jitter_ms: f64,
    /// Probability that a probe or its pong is lost, 0 to 1.
    #[arg(long, default_value_t = 0.02, value_parser = parse_share)]
    pub loss: f64,
    /// Seed of every draw: the same seed gives the same report.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also run the baselines: region hints, no hints (8 relays each), and
    /// every relay probed.
    #[arg(long)]
    pub compare: bool,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `lab link`. The conditions apply to both directions; the
/// `--down-*` flags give replies (server to client) their own.
#[derive(Debug, Clone, clap::Args)]
pub struct LinkArgs {
    /// Address clients send to.
    #[arg(long, default_value = "127.0.0.1:4440")]
    pub listen: String,
    /// Address of the server behind the link (default: a local relay's
    /// client port).
    #[arg(long, default_value = "127.0.0.1:4434")]
    pub forward: String,
    /// One-way delay in milliseconds: a floor, nothing arrives earlier.
    #[arg(long, default_value_t = 0.0, value_parser = parse_ms)]
    pub delay: f64,
    /// Extra delay per packet, drawn uniformly from [0, JITTER]
    /// milliseconds.
    #[arg(long, default_value_t = 0.0, value_parser = parse_ms)]
    pub jitter: f64,
    /// Probability that a packet is lost, 0 to 1.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub loss: f64,
    /// Share of packets held back an extra max(delay, 10 ms), so that
    /// later ones overtake them, 0 to 1.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub reorder: f64,
    /// Rate limit in kbit/s (token bucket, 256 KiB queue, tail drop).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Delay of replies (server to client), if it differs from `--delay`.
    #[arg(long, value_parser = parse_ms)]
    pub down_delay: Option<f64>,
    /// Jitter of replies, if it differs from `--jitter`.
    #[arg(long, value_parser = parse_ms)]
    pub down_jitter: Option<f64>,
    /// Loss of replies, if it differs from `--loss`.
    #[arg(long, value_parser = parse_share)]
    pub down_loss: Option<f64>,
    /// Reordering of replies, if it differs from `--reorder`.
    #[arg(long, value_parser = parse_share)]
    pub down_reorder: Option<f64>,
    /// Rate limit of replies in kbit/s, if it differs from `--rate`.
    #[arg(long)]
    pub down_rate: Option<u64>,
    /// Seed of the random draws: the same seed and traffic give the same
    /// losses and delays.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn parse_ms(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ms) if ms.is_finite() && (0.0..=3_600_000.0).contains(&ms) => Ok(ms),
        _ => Err(format!(
            "{text:?} is not a number of milliseconds between 0 and 3600000"
        )),
    }
}

fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{text:?} is not a probability between 0 and 1")),
    }
}

fn millis(ms: f64) -> Duration {
    Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::ZERO)
}

impl LinkArgs {
    /// The link conditions these flags ask for.
    pub fn config(&self) -> LinkConfig {
        let up = Direction {
            delay: millis(self.delay),
            jitter: millis(self.jitter),
            loss: self.loss,
            reorder: self.reorder,
            rate_kbps: self.rate,
        };
        let down = Direction {
            delay: self.down_delay.map_or(up.delay, millis),
            jitter: self.down_jitter.map_or(up.jitter, millis),
            loss: self.down_loss.unwrap_or(up.loss),
            reorder: self.down_reorder.unwrap_or(up.reorder),
            rate_kbps: self.down_rate.or(up.rate_kbps),
        };
        LinkConfig {
            up,
            down,
            seed: self.seed,
        }
    }
}

async fn resolve(what: &str, text: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(text)
        .await
        .with_context(|| format!("cannot resolve --{what} {text:?}"))?
        .next()
        .with_context(|| format!("--{what} {text:?} resolves to no address"))
}

/// Starts the link the flags describe.
pub async fn start_link(args: &LinkArgs) -> anyhow::Result<Link> {
    let listen = resolve("listen", &args.listen).await?;
    let forward = resolve("forward", &args.forward).await?;
    Link::start(listen, forward, args.config())
        .await
        .with_context(|| format!("cannot listen on {listen}"))
}

fn describe(d: &Direction) -> String {
    let mut text = format!("delay {:?}", d.delay);
    if !d.jitter.is_zero() {
        text += &format!(" + jitter 0..{:?}", d.jitter);
    }
    if d.loss > 0.0 {
        text += &format!(", loss {}%", d.loss * 100.0);
    }
    if d.reorder > 0.0 {
        text += &format!(", reorder {}%", d.reorder * 100.0);
    }
    if let Some(rate) = d.rate_kbps {
        text += &format!(", rate {rate} kbit/s");
    }
    text
}

/// One direction's line: rates over the last interval, totals of drops.
fn direction_line(now: &DirectionStats, before: &DirectionStats, secs: f64) -> String {
    let secs = secs.max(1e-3);
    let pps = now.forwarded.saturating_sub(before.forwarded) as f64 / secs;
    let kbps =
        now.bytes_forwarded.saturating_sub(before.bytes_forwarded) as f64 * 8.0 / 1000.0 / secs;
    format!(
        "{pps:.0} pkt/s {kbps:.0} kbit/s, {} in, {} out, lost {}, queue-dropped {}, reordered {}, queued {}",
        now.packets_in,
        now.forwarded,
        now.dropped_loss,
        now.dropped_queue,
        now.reordered,
        now.queued
    )
}

/// One status line for the interval from `before` to `now`.
pub fn status_line(now: &LinkStats, before: &LinkStats, secs: f64) -> String {
    format!(
        "flows {} | up: {} | down: {}",
        now.flows,
        direction_line(&now.up, &before.up, secs),
        direction_line(&now.down, &before.down, secs)
    )
}

/// Runs the link until `shutdown` resolves, printing its counters every
/// second on stderr; returns the final counters.
pub async fn serve(
    args: LinkArgs,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<LinkStats> {
    let link = start_link(&args).await?;
    let config = link.config();
    eprintln!(
        "lab link {} -> {}\n  up (client to server):   {}\n  down (server to client): {}",
        link.local_addr(),
        args.forward,
        describe(&config.up),
        describe(&config.down)
    );
    let started = Instant::now();
    let mut ticker =
        tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut before = link.stats();
    let mut last = started;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {
                let now = Instant::now();
                let stats = link.stats();
                eprintln!(
                    "[{:>5.0}s] {}",
                    now.duration_since(started).as_secs_f64(),
                    status_line(&stats, &before, now.duration_since(last).as_secs_f64())
                );
                before = stats;
                last = now;
            }
        }
    }
    let stats = link.stats();
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "lab link stopped after {elapsed:.1} s; averages: {}",
        status_line(&stats, &LinkStats::default(), elapsed)
    );
    link.stop().await;
    Ok(stats)
}

/// The relays and origin `args` name, as matrix nodes.
fn route_config(matrix: &Matrix, args: &RouteArgs) -> anyhow::Result<RouteConfig> {
    let relays: Vec<usize> = match &args.relays_from_matrix {
        Some(prefix) => {
            let relays = lab::route::nodes_with_prefix(matrix, prefix);
            anyhow::ensure!(
                !relays.is_empty(),
                "no node of the matrix starts with {prefix:?}"
            );
            relays
        }
        None => args
            .relays
            .iter()
            .filter(|name| !name.trim().is_empty())
            .map(|name| {
                matrix
                    .node(name)
                    .with_context(|| format!("relay {name:?} is not in the matrix"))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let origin = match &args.origin {
        Some(name) => Some(
            matrix
                .node(name)
                .with_context(|| format!("origin {name:?} is not in the matrix"))?,
        ),
        None => None,
    };
    Ok(RouteConfig {
        jitter_ms: args.jitter_ms,
        loss: args.loss,
        seed: args.seed,
        ..RouteConfig::new(relays, origin)
    })
}

/// The strategies a `lab route` run compares: coordinates first.
fn strategies(compare: bool) -> Vec<Strategy> {
    let mut all = vec![Strategy::coords()];
    if compare {
        all.extend([Strategy::region(), Strategy::unhinted(), Strategy::all()]);
    }
    all
}

/// Runs `lab route`: the reports, coordinates first, and the relays'
/// coordinate quality. Progress goes to stderr when the run takes more
/// than a second.
pub fn route(args: &RouteArgs) -> anyhow::Result<(Vec<Report>, lab::route::CoordsQuality)> {
    let started = std::time::Instant::now();
    let matrix = Matrix::from_file(&args.matrix)?;
    let config = route_config(&matrix, args)?;
    let net = Network::new(&matrix, config).context("cannot simulate")?;
    let quality = net.coords_quality();
    let strategies = strategies(args.compare);
    let mut reports = Vec::with_capacity(strategies.len());
    let mut shown = false;
    for strategy in &strategies {
        let mut progress = |done: usize, total: usize| {
            if started.elapsed() > Duration::from_secs(1) && (done % 25 == 0 || done == total) {
                eprint!("\r{}: {done}/{total} clients", strategy.name);
                shown = true;
            }
        };
        reports.push(net.run(strategy, &mut progress));
    }
    if shown {
        eprintln!();
    }
    Ok((reports, quality))
}

/// The human-readable table of a `lab route` run.
pub fn route_table(reports: &[Report], quality: &lab::route::CoordsQuality) -> String {
    let mut out = String::new();
    if let Some(r) = reports.first() {
        out += &format!(
            "{} clients ({} unserved: no usable relay), {} relays; relay coordinates off by {:.1}% (median), {:.1}% (p90)\n",
            r.clients,
            r.unserved,
            r.relays,
            quality.relay_pairs_p50 * 100.0,
            quality.relay_pairs_p90 * 100.0
        );
    }
    out += &format!(
        "{:<10} {:>6} {:>6} {:>8} {:>8} {:>8} {:>7} {:>8} {:>9}\n",
        "strategy", "best", "near", "p50 ms", "p95 ms", "max ms", "probed", "packets", "decide ms"
    );
    for r in reports {
        out += &format!(
            "{:<10} {:>5.1}% {:>5.1}% {:>8.1} {:>8.1} {:>8.1} {:>7.1} {:>8.1} {:>9.0}\n",
            r.strategy,
            r.best_share * 100.0,
            r.near_best_share * 100.0,
            r.regret_p50_ms,
            r.regret_p95_ms,
            r.regret_max_ms,
            r.relays_probed_per_client,
            r.probe_packets_per_client,
            r.decision_p50_ms
        );
    }
    out += "near: within max(5 ms, 10%) of the best score (RTT to the relay + relay to origin)\n";
    out
}

/// The `--json` object: the coordinates run's fields at the top, the
/// baselines (with `--compare`) under `baselines`.
pub fn route_json(reports: &[Report], quality: &lab::route::CoordsQuality) -> serde_json::Value {
    let mut object = reports
        .first()
        .map(|r| serde_json::to_value(r).unwrap_or_default())
        .unwrap_or_else(|| serde_json::json!({}));
    if let Some(map) = object.as_object_mut() {
        map.insert(
            "relay_coords_error_p50".into(),
            serde_json::json!(quality.relay_pairs_p50),
        );
        map.insert(
            "relay_coords_error_p90".into(),
            serde_json::json!(quality.relay_pairs_p90),
        );
        if reports.len() > 1 {
            map.insert(
                "baselines".into(),
                serde_json::to_value(&reports[1..]).unwrap_or_default(),
            );
        }
    }
    object
}

/// Runs a `lab` subcommand.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Route(args) => {
            let (reports, quality) = route(&args)?;
            if args.json {
                println!("{}", route_json(&reports, &quality));
            } else {
                print!("{}", route_table(&reports, &quality));
            }
            Ok(())
        }
        Command::Link(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("statecast-lab")
                .build()
                .context("cannot start the async runtime")?;
            runtime
                .block_on(serve(args, crate::origin_cmd::shutdown_signal()))
                .map(drop)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command as Top};
    use clap::Parser;

    fn link_args(extra: &[&str]) -> LinkArgs {
        let mut argv = vec!["statecast", "lab", "link"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Top::Lab(Command::Link(args)) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn flags_set_both_directions_and_down_flags_override() {
        let args = link_args(&[
            "--delay",
            "30",
            "--jitter",
            "5",
            "--loss",
            "0.01",
            "--rate",
            "800",
            "--down-delay",
            "12.5",
            "--down-loss",
            "0",
            "--seed",
            "4",
        ]);
        let config = args.config();
        assert_eq!(config.seed, 4);
        assert_eq!(config.up.delay, Duration::from_millis(30));
        assert_eq!(config.up.jitter, Duration::from_millis(5));
        assert_eq!(config.up.loss, 0.01);
        assert_eq!(config.up.rate_kbps, Some(800));
        assert_eq!(config.down.delay, Duration::from_micros(12_500));
        assert_eq!(config.down.jitter, Duration::from_millis(5));
        assert_eq!(config.down.loss, 0.0);
        assert_eq!(config.down.rate_kbps, Some(800));
        // No flags: a transparent link on local defaults.
        let plain = link_args(&[]).config();
        assert_eq!(plain.up, Direction::default());
        assert_eq!(plain.down, Direction::default());
    }

    fn route_args(extra: &[&str]) -> Result<RouteArgs, clap::Error> {
        let mut argv = vec!["statecast", "lab", "route"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Top::Lab(Command::Route(args)) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn world() -> String {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../lab/data/world.csv").to_string()
    }

    #[test]
    fn route_takes_a_relay_list_or_a_prefix() {
        let args =
            route_args(&["--matrix", "m.csv", "--relays", "a,b,c", "--origin", "o"]).unwrap();
        assert_eq!(args.relays, ["a", "b", "c"]);
        assert_eq!((args.jitter_ms, args.loss, args.seed), (5.0, 0.02, 1));
        let args = route_args(&["--matrix", "m.csv", "--relays-from-matrix", "r-"]).unwrap();
        assert_eq!(args.relays_from_matrix.as_deref(), Some("r-"));
        // One of the two, not both, not neither; conditions checked.
        assert!(route_args(&["--matrix", "m.csv"]).is_err());
        assert!(
            route_args(&[
                "--matrix",
                "m.csv",
                "--relays",
                "a",
                "--relays-from-matrix",
                "r-"
            ])
            .is_err()
        );
        assert!(route_args(&["--matrix", "m.csv", "--relays", "a", "--loss", "2"]).is_err());
        assert!(route_args(&["--matrix", "m.csv", "--relays", "a", "--jitter-ms", "-1"]).is_err());
    }

    #[test]
    fn route_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.csv");
        std::fs::write(&path, "r-a-1,c-a-1,10\nr-a-1,c-a-2,oops\n").unwrap();
        let m = path.to_str().unwrap();
        let error = route(&route_args(&["--matrix", m, "--relays", "r-a-1"]).unwrap()).unwrap_err();
        assert!(error.to_string().contains("line 2"), "{error}");
        std::fs::write(&path, "r-a-1,c-a-1,10\n").unwrap();
        let error =
            route(&route_args(&["--matrix", m, "--relays", "r-a-1,nope"]).unwrap()).unwrap_err();
        assert!(
            error.to_string().contains("\"nope\" is not in the matrix"),
            "{error}"
        );
        let error =
            route(&route_args(&["--matrix", m, "--relays", "r-a-1", "--origin", "x"]).unwrap())
                .unwrap_err();
        assert!(error.to_string().contains("origin \"x\""), "{error}");
        let error = route(&route_args(&["--matrix", m, "--relays-from-matrix", "z-"]).unwrap())
            .unwrap_err();
        assert!(error.to_string().contains("\"z-\""), "{error}");
    }

    #[test]
    fn route_reports_the_issue_fields_as_json_and_a_table() {
        // The shipped matrix, with the relays of two regions only: quick.
        let args = route_args(&[
            "--matrix",
            &world(),
            "--relays-from-matrix",
            "r-eu",
            "--origin",
            "o-euc",
            "--compare",
            "--json",
        ])
        .unwrap();
        let (reports, quality) = route(&args).unwrap();
        assert_eq!(reports.len(), 4);
        let json = route_json(&reports, &quality);
        for field in [
            "clients",
            "best_share",
            "near_best_share",
            "regret_p50_ms",
            "regret_p95_ms",
            "relays_probed_per_client",
            "probe_packets_per_client",
        ] {
            assert!(json[field].is_number(), "{field} in {json}");
        }
        assert_eq!(json["relays"], 30);
        assert!(json["clients"].as_u64().unwrap() >= 290);
        assert!(json["relays_probed_max"].as_u64().unwrap() <= 8);
        let baselines = json["baselines"].as_array().unwrap();
        assert_eq!(baselines.len(), 3);
        assert_eq!(baselines[2]["strategy"], "all");
        assert_eq!(baselines[2]["relays_probed_per_client"], 30.0);
        let table = route_table(&reports, &quality);
        for name in ["coords", "region", "unhinted", "all"] {
            assert!(table.contains(name), "{table}");
        }
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            &["--loss", "1.5"][..],
            &["--loss", "NaN"],
            &["--reorder", "-0.1"],
            &["--delay", "-1"],
            &["--jitter", "inf"],
            &["--rate", "-3"],
        ] {
            let mut argv = vec!["statecast", "lab", "link"];
            argv.extend_from_slice(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} was accepted");
        }
    }

    #[tokio::test]
    async fn the_link_forwards_and_serve_reports_its_counters() {
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let forward = server.local_addr().unwrap().to_string();
        let args = link_args(&[
            "--listen",
            "127.0.0.1:0",
            "--forward",
            &forward,
            "--delay",
            "20",
        ]);
        let link = start_link(&args).await.unwrap();
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sent = Instant::now();
        client.send_to(b"hello", link.local_addr()).await.unwrap();
        let mut buf = [0u8; 16];
        let (len, _) = tokio::time::timeout(Duration::from_secs(5), server.recv_from(&mut buf))
            .await
            .expect("nothing came through the link")
            .unwrap();
        assert_eq!(&buf[..len], b"hello");
        assert!(sent.elapsed() >= Duration::from_millis(20));
        let stats = link.stats();
        assert_eq!((stats.up.forwarded, stats.flows), (1, 1));
        let line = status_line(&stats, &LinkStats::default(), 1.0);
        assert!(line.contains("1 in, 1 out"), "{line}");
        link.stop().await;

        // serve starts, and stops when told.
        let args = link_args(&["--listen", "127.0.0.1:0", "--forward", &forward]);
        let stats = serve(args, async {}).await.unwrap();
        assert_eq!(stats.up.packets_in, 0);
    }
}
